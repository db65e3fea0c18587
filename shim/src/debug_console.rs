//! The debug console, host side: `debug_console = true` in the configuration gives each
//! sandbox's guest a root shell on vsock port 1026, and `containerd-shim-husk-v2 console
//! <sandbox-id>` attaches a terminal to it.
//!
//! At sandbox start (only when enabled): the configured static shell is copied into the
//! shared directory (`shared/.husk-debug/sh`; the guest's initramfs has no shell, and a copy
//! — not a bind mount — keeps a guest that writes to its share away from the host's binary),
//! and the kernel command line gets the agent's flag, `loglevel=7` and the agent's debug
//! level. Every sandbox records in its state directory whether the console is on, and from
//! which configuration file ([`Record`]), so that `console` can tell a user what to change.
//!
//! `console` connects to the sandbox's hybrid-vsock socket, does the `CONNECT 1026`
//! handshake, puts the local terminal in raw mode when stdin is one, and relays bytes both
//! ways until the guest closes the connection (the shell has exited). The end of a
//! non-terminal stdin reaches the shell as the terminal's EOF character (^D), as it would from
//! a keyboard. At a terminal, `~.` at the start of a line detaches (ssh's escape: a shell that
//! hangs, or a guest that stops reading, cannot keep the terminal; `~~` sends one `~`); the
//! agent then hangs up the shell.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_protocols::{
    DEBUG_CONSOLE_FLAG, DEBUG_CONSOLE_VSOCK_PORT, DEBUG_LOG_FLAG, DEBUG_SHELL_IN_SHARE,
};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::sandbox_dir::SandboxDir;

/// What the guest's kernel command line gets with the debug console.
pub fn kernel_params() -> String {
    format!("loglevel=7 {DEBUG_LOG_FLAG} {DEBUG_CONSOLE_FLAG}")
}

/// The record file in the sandbox's state directory.
const RECORD: &str = "debug-console.json";

/// What `console` needs to know about a running sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub debug_console: bool,
    /// The configuration file the sandbox was started with (as [`Config::source_name`]).
    pub config: String,
    /// The VM's hybrid-vsock socket.
    pub vsock_socket: Option<PathBuf>,
}

impl Record {
    pub fn write(&self, dir: &SandboxDir) -> std::io::Result<()> {
        let text = serde_json::to_string(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.root().join(RECORD), text)
    }

    pub fn read(dir: &SandboxDir) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(dir.root().join(RECORD))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }
}

/// Copies the shell into the sandbox's shared directory, where the agent looks for it.
pub(crate) fn share_shell(dir: &SandboxDir, shell: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let to = dir.mounts().join(DEBUG_SHELL_IN_SHARE);
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(shell, &to)?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o555))?;
    Ok(to)
}

const USAGE: &str = "usage: containerd-shim-husk-v2 console [--config FILE] <sandbox-id>\n\
    Attaches this terminal to a root shell in the sandbox's guest (needs debug_console = true\n\
    in the configuration the sandbox was started with). `exit` in the shell ends it.";

/// `containerd-shim-husk-v2 console …` (`args` after `console`). Returns the exit code.
pub fn main(args: &[std::ffi::OsString]) -> i32 {
    let mut config_path = None;
    let mut sid = None;
    let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return 0;
            }
            "--config" => config_path = it.next().map(PathBuf::from),
            _ if sid.is_none() && !a.starts_with('-') => sid = Some(a),
            _ => {
                eprintln!("{USAGE}");
                return 2;
            }
        }
    }
    let Some(sid) = sid else {
        eprintln!("{USAGE}");
        return 2;
    };
    match attach(config_path.as_deref(), &sid) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2 console: {e}");
            1
        }
    }
}

/// Finds the sandbox's console and relays this process's stdin/stdout to it.
fn attach(config_path: Option<&Path>, sid: &str) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
    let dir = SandboxDir::new(&config.state_root, sid).map_err(|e| e.to_string())?;
    if !dir.root().is_dir() {
        return Err(format!(
            "no sandbox {sid} in {} — is it running (`ctr task ls`)? For a sandbox under another state_root, give its configuration with --config",
            config.state_root.display()
        ));
    }
    let record = Record::read(&dir).map_err(|e| {
        format!(
            "sandbox {sid}: {}: {e} — the sandbox is still starting, or its shim predates the debug console",
            dir.root().join(RECORD).display()
        )
    })?;
    if !record.debug_console {
        return Err(format!(
            "debug console is not enabled for sandbox {sid}: set debug_console = true in {} and start the sandbox again",
            record.config
        ));
    }
    let socket = record
        .vsock_socket
        .ok_or_else(|| format!("sandbox {sid}: its VM has no vsock device"))?;
    let conn =
        husk_hypervisor::vsock::connect(&socket, DEBUG_CONSOLE_VSOCK_PORT, Duration::from_secs(10))
            .map_err(|e| format!("sandbox {sid}: {}", error_chain(&e)))?;
    let raw = RawTerminal::enter();
    if raw.is_some() {
        eprint!(
            "[husk: root shell in sandbox {sid}'s guest; `exit` ends it, ~. at the start of a line detaches]\r\n"
        );
    }
    let escape = raw.is_some().then(Escape::default);
    let ended = relay(conn, escape)?;
    if raw.is_some() && ended == Ended::Detached {
        eprint!("[husk: detached from sandbox {sid}'s guest]\r\n");
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// How a console session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The guest closed the connection (the shell exited, or the VM went away).
    ByGuest,
    /// The user typed the escape to detach.
    Detached,
}

/// ssh's escape on what the user types: `~` right after Enter (or first of all) is held; a `.`
/// after it detaches, a second `~` sends one, anything else sends the `~` and itself.
#[derive(Debug)]
struct Escape {
    at_line_start: bool,
    held_tilde: bool,
}

impl Default for Escape {
    fn default() -> Self {
        Self {
            at_line_start: true,
            held_tilde: false,
        }
    }
}

impl Escape {
    /// Appends to `out` what of `input` goes to the guest; true when the user asked to
    /// detach (what follows the escape is dropped).
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.held_tilde {
                self.held_tilde = false;
                match b {
                    b'.' => return true,
                    b'~' => {
                        out.push(b'~');
                        self.at_line_start = false;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if self.at_line_start && b == b'~' {
                self.held_tilde = true;
                continue;
            }
            out.push(b);
            self.at_line_start = matches!(b, b'\r' | b'\n');
        }
        false
    }
}

/// Relays stdin to the guest (its end as ^D) and the guest to stdout, until the guest closes
/// or, with `escape`, the user detaches.
fn relay(conn: std::os::unix::net::UnixStream, escape: Option<Escape>) -> Result<Ended, String> {
    let mut to_guest = conn
        .try_clone()
        .map_err(|e| format!("dup connection: {e}"))?;
    let detached = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let detach = detached.clone();
    // Not joined: a blocked read of the terminal must not keep us once the shell has gone.
    std::thread::spawn(move || {
        let mut escape = escape;
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        let mut out = Vec::with_capacity(buf.len() + 1);
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => {
                    // EOF as a terminal sends it: the shell sees the end of its input.
                    let _ = to_guest.write_all(b"\x04");
                    return;
                }
                Ok(n) => {
                    out.clear();
                    let leave = match escape.as_mut() {
                        Some(e) => e.feed(&buf[..n], &mut out),
                        None => {
                            out.extend_from_slice(&buf[..n]);
                            false
                        }
                    };
                    if to_guest.write_all(&out).is_err() {
                        return;
                    }
                    if leave {
                        // Closing our side ends the read below; the agent hangs up the shell.
                        detach.store(true, std::sync::atomic::Ordering::SeqCst);
                        let _ = to_guest.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    let ended = || {
        if detached.load(std::sync::atomic::Ordering::SeqCst) {
            Ended::Detached
        } else {
            Ended::ByGuest
        }
    };
    let mut from_guest = conn;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from_guest.read(&mut buf) {
            Ok(0) => return Ok(ended()),
            Ok(n) => {
                stdout
                    .write_all(&buf[..n])
                    .and_then(|()| stdout.flush())
                    .map_err(|e| format!("writing to stdout: {e}"))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The guest side went away abruptly (the VM ended): the session is over.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(ended()),
            Err(e) => return Err(format!("reading from the guest: {e}")),
        }
    }
}

/// The local terminal in raw mode (no echo, no line editing, ^C and ^D passed through to the
/// guest's shell) for as long as this lives; restored when dropped.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    /// `None` when stdin is not a terminal (then it is left as it is).
    fn enter() -> Option<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut e = Escape::default();
        let mut out = Vec::new();
        for c in chunks {
            if e.feed(c, &mut out) {
                return (out, true);
            }
        }
        (out, false)
    }

    #[test]
    fn tilde_dot_at_the_start_of_a_line_detaches() {
        assert_eq!(typed(&[b"~."]), (vec![], true));
        assert_eq!(typed(&[b"ls\r~.rest"]), (b"ls\r".to_vec(), true));
        assert_eq!(typed(&[b"ls\n", b"~", b"."]), (b"ls\n".to_vec(), true));
    }

    #[test]
    fn a_tilde_anywhere_else_or_doubled_is_sent_as_typed() {
        assert_eq!(typed(&[b"echo a~.b\r"]), (b"echo a~.b\r".to_vec(), false));
        assert_eq!(typed(&[b"~~."]), (b"~.".to_vec(), false));
        assert_eq!(typed(&[b"~", b"x"]), (b"~x".to_vec(), false));
        assert_eq!(typed(&[b"\r~/bin\r"]), (b"\r~/bin\r".to_vec(), false));
        // ^C (the shell's interrupt) passes through and does not start a line.
        assert_eq!(typed(&[b"\x03~."]), (b"\x03~.".to_vec(), false));
    }

    #[test]
    fn the_record_round_trips() {
        let base = tempfile::tempdir().unwrap();
        let dir = SandboxDir::new(base.path(), "sb").unwrap();
        std::fs::create_dir(dir.root()).unwrap();
        assert!(Record::read(&dir).is_err());
        let r = Record {
            debug_console: true,
            config: "/etc/husk/config.toml".into(),
            vsock_socket: Some(dir.root().join("vsock.sock")),
        };
        r.write(&dir).unwrap();
        assert_eq!(Record::read(&dir).unwrap(), r);
    }

    #[test]
    fn a_sandbox_without_the_console_says_what_to_set() {
        let base = tempfile::tempdir().unwrap();
        let cfg = base.path().join("c.toml");
        std::fs::write(
            &cfg,
            format!("state_root = \"{}\"\n", base.path().display()),
        )
        .unwrap();
        let e = attach(Some(&cfg), "nosuch").unwrap_err();
        assert!(e.contains("no sandbox nosuch"), "{e}");
        let dir = SandboxDir::new(base.path(), "sb").unwrap();
        std::fs::create_dir(dir.root()).unwrap();
        Record {
            debug_console: false,
            config: "/etc/husk/other.toml".into(),
            vsock_socket: None,
        }
        .write(&dir)
        .unwrap();
        let e = attach(Some(&cfg), "sb").unwrap_err();
        assert_eq!(
            e,
            "debug console is not enabled for sandbox sb: set debug_console = true in /etc/husk/other.toml and start the sandbox again"
        );
    }
}
