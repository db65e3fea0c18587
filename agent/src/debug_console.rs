//! The debug console: an interactive root shell in the guest's own namespaces, for looking at
//! a running sandbox from inside (Kata's `debug_console_enabled` + `kata-runtime exec`).
//!
//! Offered only when the kernel command line carries `husk.debug_console=1` (the shim's
//! `debug_console = true`): then the agent listens on vsock port 1026 and gives each
//! connection its own shell on a pty. Without the flag nothing listens there. The guest's
//! initramfs has no shell, so the shell is the static binary the shim put in the shared
//! directory (`.husk-debug/sh`), run as `sh` with PATH, HOME=/ and TERM set, in a new session
//! whose controlling terminal is the pty. The connection carries raw terminal bytes both ways.
//!
//! A session ends when nothing holds the terminal any more (the shell and what it started
//! have exited): the agent closes the connection. When the host closes the connection first,
//! the terminal is hung up (SIGHUP to the shell's process group, as a modem hang-up would).
//!
//! Must never take the agent down: a failure ends that one session, reported on the console.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
use nix::unistd::Pid;

use husk_protocols::{DEBUG_CONSOLE_FLAG, DEBUG_CONSOLE_VSOCK_PORT};

use crate::logging::debug;
use crate::reaper::exits;

/// PATH of the shell: the shell's own directory first (a multi-call binary's applets are found
/// without it, but a separate static tool dropped beside it is found too), then the usual.
const PATH_TAIL: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why the console could not listen, or a session failed (that session ends, the agent stays).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source} — the guest kernel needs CONFIG_VIRTIO_VSOCKETS, and nothing else may listen on vsock port {DEBUG_CONSOLE_VSOCK_PORT}")]
    Listen {
        what: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("starting {}: {source} — the shim copies the shell to .husk-debug/sh of the share when debug_console = true", shell.display())]
    Shell {
        shell: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {0} out of range")]
    Pid(u32),
    #[error("the shell did not end after SIGKILL")]
    Unkillable,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Whether the kernel command line asks for the console.
pub fn enabled(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == DEBUG_CONSOLE_FLAG)
}

/// Listens on the debug console's vsock port and serves each connection on its own thread.
pub fn start(shell: PathBuf) -> Result<(), Error> {
    let port = DEBUG_CONSOLE_VSOCK_PORT;
    let listen = |what| move |source| Error::Listen { what, source };
    let listener = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(listen("vsock socket"))?;
    socket::bind(
        listener.as_raw_fd(),
        &VsockAddr::new(libc::VMADDR_CID_ANY, port),
    )
    .map_err(listen("binding the vsock port"))?;
    let backlog = Backlog::new(8).map_err(listen("listen backlog"))?;
    socket::listen(&listener, backlog).map_err(listen("listening on the vsock port"))?;
    println!(
        "husk-agent: debug console on vsock port {port} (shell {})",
        shell.display()
    );
    std::thread::Builder::new()
        .name("debug-console".into())
        .spawn(move || accept_loop(&listener, &shell))
        .map_err(io("starting the debug console thread"))?;
    Ok(())
}

fn accept_loop(listener: &OwnedFd, shell: &Path) {
    static SESSIONS: AtomicU32 = AtomicU32::new(0);
    loop {
        let fd = match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
            Err(e) => {
                println!("husk-agent: debug console: accept: {e}");
                // Out of descriptors or memory: do not spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed) + 1;
        let shell = shell.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name(format!("debug-console-{n}"))
            .spawn(move || {
                let conn = File::from(fd);
                match session(&conn, &shell) {
                    Ok(status) => {
                        println!("husk-agent: debug console: session {n} ended ({status})")
                    }
                    Err(e) => {
                        println!("husk-agent: debug console: session {n}: {e}");
                        // The person at the other end sees why, not just a closed connection.
                        let _ = (&conn)
                            .write_all(format!("husk-agent: debug console: {e}\r\n").as_bytes());
                    }
                }
            });
        if let Err(e) = spawned {
            println!("husk-agent: debug console: starting session {n}: {e}");
        }
    }
}

/// One shell on a pty, relayed to `conn` until the terminal is gone. Returns how the shell
/// ended.
fn session(conn: &File, shell: &Path) -> Result<String, Error> {
    let mut conn = conn.try_clone().map_err(io("dup connection"))?;
    let size = nix::pty::Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).map_err(|source| Error::Sys {
        what: "openpty",
        source,
    })?;
    for fd in [pty.master.as_raw_fd(), pty.slave.as_raw_fd()] {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|source| Error::Sys {
            what: "pty cloexec",
            source,
        })?;
    }
    let mut cmd = shell_command(shell, pty.slave)?;
    let (pid, _child) = exits().spawn_registered(|| {
        let child = cmd.spawn().map_err(|source| Error::Shell {
            shell: shell.to_path_buf(),
            source,
        })?;
        let pid = i32::try_from(child.id()).map_err(|_| Error::Pid(child.id()))?;
        Ok((pid, child))
    })?;
    // The command (and with it our copies of the slave) goes: only the shell holds the
    // terminal now, so the master reads EIO once the shell and its children are gone.
    drop(cmd);
    debug!("debug console: shell {pid} started");
    let mut master = File::from(pty.master);
    let master_in = master.try_clone().map_err(io("dup pty master"))?;
    let conn_in = conn.try_clone().map_err(io("dup connection"))?;
    let shell_pid = ShellPid(Arc::new(Mutex::new(Some(pid))));
    let for_input = shell_pid.clone();
    std::thread::Builder::new()
        .name(format!("debug-console-in-{pid}"))
        .spawn(move || host_to_shell(conn_in, master_in, &for_input))
        .map_err(io("starting the input relay"))?;
    // Shell to host, until the terminal is gone (EIO) or the host is.
    let mut buf = [0u8; 16 * 1024];
    loop {
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    shell_pid.hang_up();
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EIO: no process holds the slave any more.
            Err(_) => break,
        }
    }
    // The session ends on our side: closing the connection must not hang up anything.
    shell_pid.disarm();
    let _ = socket::shutdown(conn.as_raw_fd(), socket::Shutdown::Both);
    drop(master);
    // The shell has closed its terminal, which it does as it exits; one that lives on without
    // it (it closed or redirected all three) is not waited for forever.
    let exit = match exits().wait(pid, Some(Duration::from_secs(5))) {
        Some(e) => e,
        None => {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            exits()
                .wait(pid, Some(Duration::from_secs(5)))
                .ok_or(Error::Unkillable)?
        }
    };
    exits().forget(pid);
    Ok(match exit {
        crate::reaper::Exit::Code(c) => format!("exit code {c}"),
        crate::reaper::Exit::Signal(s) => format!("signal {s}"),
    })
}

/// The shell as `sh` on the pty's slave, in a new session with the pty as its controlling
/// terminal, in `/` with a clean environment.
fn shell_command(shell: &Path, slave: OwnedFd) -> Result<Command, Error> {
    let dup = |f: &OwnedFd| f.try_clone().map_err(io("dup pty slave"));
    let (out, err) = (dup(&slave)?, dup(&slave)?);
    let dir = shell
        .parent()
        .map(|d| format!("{}:", d.display()))
        .unwrap_or_default();
    let mut cmd = Command::new(shell);
    cmd.arg0("sh")
        .env_clear()
        .env("PATH", format!("{dir}{PATH_TAIL}"))
        .env("HOME", "/")
        .env("TERM", "vt100")
        .current_dir("/")
        .stdin(Stdio::from(slave))
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    // SAFETY: runs in the child between fork and exec, after std has put the slave on fds
    // 0-2; setsid(2) and ioctl(2) are async-signal-safe and touch no parent memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Host to shell: keystrokes (raw bytes) into the pty. When the host closes the connection,
/// the terminal is hung up.
fn host_to_shell(mut conn: File, mut master: File, shell: &ShellPid) {
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if master.write_all(&buf[..n]).is_err() {
                    // The terminal is gone: the other direction ends the session.
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    shell.hang_up();
}

/// The shell's PID while the input side may hang it up: registered with the reaper (so not
/// yet forgotten, and checked not yet reaped: no other process can have been given it) and
/// the session not ending on the shell's side already.
#[derive(Clone)]
struct ShellPid(Arc<Mutex<Option<i32>>>);

impl ShellPid {
    /// SIGHUP to the shell's process group (its PID: it leads its own session).
    fn hang_up(&self) {
        let g = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pid) = *g {
            if exits().exited(pid).is_none() {
                debug!("debug console: hanging up shell {pid}");
                let _ = killpg(Pid::from_raw(pid), Signal::SIGHUP);
            }
        }
    }

    /// From now on [`ShellPid::hang_up`] does nothing.
    fn disarm(&self) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_flag_enables_it() {
        assert!(enabled("console=ttyS0 husk.debug_console=1 quiet"));
        assert!(!enabled("console=ttyS0 quiet"));
        assert!(!enabled("husk.debug_console=0"));
        assert!(!enabled("xhusk.debug_console=1"));
    }
}
