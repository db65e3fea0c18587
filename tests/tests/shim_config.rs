//! Tier 3: what `/etc/husk/config.toml` changes, through a private containerd — the programs
//! the backends run (`virtiofsd_path`: a wrong one fails `ctr run` before anything starts, a
//! copy of the real one is the one that runs) and the debug console (`debug_console = true`:
//! a root shell in the guest through `containerd-shim-husk-v2 console`; off: nothing listens
//! on its port and `console` says what to set).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use husk_hypervisor::vsock::{self, VsockError};
use husk_tests::husk::{
    assert_sandbox_gone, debug_console, processes_mentioning, shim_binary, vm_dir, HuskContainerd,
    BUSYBOX,
};
use husk_tests::{require_program, require_root};

const RUNTIME: &str = "io.containerd.husk.v2";
const DEBUG_CONSOLE_PORT: u32 = husk_protocols::DEBUG_CONSOLE_VSOCK_PORT;

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn console(sid: &str, input: &[u8], deadline: Duration) -> Output {
    debug_console(sid, input, deadline)
}

/// A `containerd-shim-husk-v2 console <sid>` whose stdin, stdout and stderr are a terminal
/// (a pty whose master the test holds), as a person would run it.
struct TerminalConsole {
    child: std::process::Child,
    master: std::fs::File,
    /// What a thread reads from the master, chunk by chunk.
    output: std::sync::mpsc::Receiver<Vec<u8>>,
    /// Kept to read the terminal's settings after the console has ended.
    slave: std::os::fd::OwnedFd,
    /// The terminal's settings before the console started (it switches them to raw).
    before: nix::sys::termios::Termios,
    seen: String,
}

impl TerminalConsole {
    fn start(sid: &str) -> Self {
        use std::os::unix::process::CommandExt;
        let pty = nix::pty::openpty(None, None).unwrap();
        let before = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
        let dup = || Stdio::from(pty.slave.try_clone().unwrap());
        let mut cmd = Command::new(shim_binary());
        cmd.args(["console", sid])
            .env_remove("HUSK_CONFIG")
            .stdin(dup())
            .stdout(dup())
            .stderr(dup());
        // SAFETY: between fork and exec, only setsid(2) and ioctl(2) (async-signal-safe) on
        // the child's own stdin: the pty becomes its controlling terminal, so an unhandled ^C
        // would reach it as SIGINT, as at a real terminal.
        unsafe {
            cmd.pre_exec(|| {
                if nix::libc::setsid() < 0 || nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("starting containerd-shim-husk-v2 console");
        let master = std::fs::File::from(pty.master);
        let mut reader = master.try_clone().unwrap();
        let (tx, output) = std::sync::mpsc::channel();
        // Ends when the terminal is gone (EIO once every slave descriptor is closed).
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            master,
            output,
            slave: pty.slave,
            before,
            seen: String::new(),
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    /// Reads what the console printed until `done(all output so far)` or `deadline` passes
    /// (then returns false). Never blocks past the deadline.
    fn read_until(&mut self, deadline: Instant, done: impl Fn(&str) -> bool) -> bool {
        use std::sync::mpsc::RecvTimeoutError;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        true
    }

    /// How the console process ended, reading its output meanwhile; fails the test if it is
    /// still running at `deadline` (`when`: what should have ended it).
    fn wait_end(&mut self, deadline: Instant, when: &str) -> std::process::ExitStatus {
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "console did not end {when}: {:?}",
                self.seen
            );
            self.read_until(Instant::now() + Duration::from_millis(100), |_| false);
        }
    }
}

impl Drop for TerminalConsole {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn console_log(sid: &str) -> String {
    std::fs::read_to_string(vm_dir(sid).join("console.log")).unwrap_or_default()
}

/// The console log once it contains `needle` (the agent logs a session's end after the
/// connection has closed, so a little after the client has ended), up to 20 s.
fn console_log_with(sid: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = console_log(sid);
        if log.contains(needle) || Instant::now() >= deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// For a failure message: each `sh` and `sleep` in the guest with its process group, session,
/// terminal's foreground group, signal masks and current system call, from a second console
/// session.
fn guest_shell_states(sid: &str) -> String {
    let script = b"for p in /proc/[0-9]*; do c=$(cat $p/comm); case $c in sh|sleep) \
        echo ${p#/proc/} $c $(cut -d' ' -f3-8 $p/stat) \
        $(grep -E 'SigPnd|SigBlk|SigIgn|SigCgt' $p/status | tr -s '\\t\\n' '  ') \
        syscall $(cat $p/syscall);; esac; done; exit\n";
    let out = console(sid, script, Duration::from_secs(30));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn vsock_socket(sid: &str) -> PathBuf {
    vm_dir(sid).join("vsock.sock")
}

#[test]
fn a_wrong_virtiofsd_path_fails_ctr_run_before_anything_starts() {
    require_root("containerd");
    let h = HuskContainerd::start_with_config("virtiofsd_path = \"/nonexistent/bin/virtiofsd\"\n");
    let id = unique("badfsd");
    let started = Instant::now();
    let out = h.ctd.run_rm(Some(RUNTIME), &[], BUSYBOX, &id, &["true"]);
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("virtiofsd_path")
            && err.contains("/nonexistent/bin/virtiofsd")
            && err.contains("no such file"),
        "{err}"
    );
    // The file it came from: the private containerd's HUSK_CONFIG.
    assert!(
        err.contains("husk-bin-") && err.contains("config.toml"),
        "{err}"
    );
    // No VM was booted (a TCG boot alone takes about a second): the check came first.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(!console_log(&id).contains("Linux"), "a VM was started");
    assert_sandbox_gone(&id);
    let _ = h.ctd.ctr(&["containers", "delete", &id]);
}

#[test]
fn virtiofsd_path_is_the_virtiofsd_that_runs() {
    require_root("containerd");
    let real =
        husk_hypervisor::helpers::find("virtiofsd").expect("virtiofsd: run `cargo xtask setup`");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("virtiofsd-copy");
    std::fs::copy(&real, &copy).unwrap();
    let h =
        HuskContainerd::start_with_config(&format!("virtiofsd_path = \"{}\"\n", copy.display()));
    let id = unique("cpfsd");
    h.run_idle(&id, &[]);
    // The container runs from its rootfs over virtio-fs, served by the copy.
    let out = h
        .ctd
        .ctr_ok(&["task", "exec", "--exec-id", "e", &id, "ls", "/bin/busybox"]);
    assert_eq!(out, "/bin/busybox\n");
    let exes: Vec<PathBuf> = processes_mentioning(&format!("/run/husk/{id}/vm/virtiofsd.sock"))
        .into_iter()
        .filter_map(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
        .collect();
    assert!(
        exes.contains(&copy),
        "virtiofsd processes run {exes:?}, not {}",
        copy.display()
    );
    assert!(!exes.contains(&real), "{exes:?}");
    h.remove(&id);
    assert_sandbox_gone(&id);
}

#[test]
fn the_debug_console_is_a_root_shell_in_the_guest() {
    require_root("containerd");
    require_program("busybox", "busybox-static");
    let h = HuskContainerd::start_with_config("debug_console = true\n");
    let id = unique("dbgcon");
    h.run_idle(&id, &[]);
    let out = console(
        &id,
        b"uname -r; cat /proc/1/comm; exit\n",
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().map(|l| l.trim_end_matches('\r')).collect();
    let host = nix::sys::utsname::uname().unwrap();
    let host_release = host.release().to_string_lossy().into_owned();
    // The guest's kernel (the host's differs), and the agent as PID 1 (the initramfs's /init):
    // the guest's own namespaces, not a container's (where PID 1 is `sleep`).
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("6.1.") && *l != host_release),
        "no guest kernel release (host: {host_release}) in:\n{stdout}"
    );
    assert!(lines.contains(&"init"), "no `init` as PID 1 in:\n{stdout}");

    // At a terminal: raw mode passes ^C to the guest (it interrupts the guest's foreground
    // command, not the local console), and the terminal's settings come back at the end.
    let mut t = TerminalConsole::start(&id);
    let before = t.before.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    assert!(
        t.read_until(deadline, |s| s.contains("/ # ")),
        "no prompt: {:?}",
        t.seen
    );
    // The foreground job prints the marker itself (`sh -c`), so that the ^C reaches a running
    // job: busybox ash (Debian's static glibc build) catches SIGINT in the interactive shell
    // and longjmps out of its handler, so a ^C that lands while the shell itself is inside
    // stdio (its `echo` builtin) leaves a glibc lock held and the shell deadlocks in a futex
    // wait for good — found by sending ^C 0–25 ms after the output of `echo …; sleep 1000`.
    // That is the shell's race, not the console's; a user's ^C reaches a running command.
    // `$((…))` so that the marker is in the output only, not in the echoed command line.
    t.write(b"sh -c 'echo st$((1+1))rt; exec sleep 1000'\r");
    assert!(
        t.read_until(deadline, |s| s.contains("st2rt\r\n")),
        "{:?}",
        t.seen
    );
    // One ^C: the job that printed the marker is the terminal's foreground process group.
    t.write(b"\x03");
    let interrupted = t.read_until(deadline, |s| {
        s.rsplit_once("st2rt\r\n")
            .is_some_and(|(_, after)| after.contains("/ # "))
    });
    assert!(
        interrupted,
        "^C did not interrupt sleep: {:?}\nthe guest's shells and sleeps (pid, comm, state, \
         ppid, pgrp, session, tty, foreground pgrp, signal masks, syscall):\n{}",
        t.seen,
        guest_shell_states(&id)
    );
    t.write(b"echo af$((2+2))ter; exit\r");
    assert!(
        t.read_until(deadline, |s| s.contains("af4ter\r\n")),
        "{:?}",
        t.seen
    );
    let status = t.wait_end(deadline, "after `exit`");
    assert!(status.success(), "{status}: {:?}", t.seen);
    let after = nix::sys::termios::tcgetattr(&t.slave).unwrap();
    assert!(
        after
            .local_flags
            .contains(nix::sys::termios::LocalFlags::ICANON | nix::sys::termios::LocalFlags::ECHO),
        "terminal left in raw mode"
    );
    assert_eq!(
        format!("{:?}", after.local_flags),
        format!("{:?}", before.local_flags)
    );
    drop(t);

    // `~.` at the start of a line detaches (a hung shell cannot keep the terminal): the
    // console ends at once with the terminal restored, and the agent hangs up the shell.
    let mut t = TerminalConsole::start(&id);
    assert!(
        t.read_until(deadline, |s| s.contains("/ # ")),
        "no prompt: {:?}",
        t.seen
    );
    let before = t.before.clone();
    t.write(b"\r~.");
    let status = t.wait_end(deadline, "on ~.");
    t.read_until(Instant::now() + Duration::from_secs(2), |s| {
        s.contains("detached")
    });
    assert!(status.success(), "{status}: {:?}", t.seen);
    assert!(
        t.seen.contains("[husk: detached from sandbox"),
        "{:?}",
        t.seen
    );
    let after = nix::sys::termios::tcgetattr(&t.slave).unwrap();
    assert_eq!(
        format!("{:?}", after.local_flags),
        format!("{:?}", before.local_flags)
    );
    drop(t);
    let log = console_log_with(&id, "debug console: session 3 ended");
    assert!(
        log.contains("debug console: session 3 ended (signal 1)"),
        "the detached session's shell was not hung up:\n{log}"
    );

    // Debug mode: the kernel logs at loglevel 7 (its banner, which `quiet` hides, is on the
    // console) and the agent logs each request.
    let log = console_log_with(&id, "debug console: session 2 ended");
    assert!(log.contains("Linux version 6.1."), "{log}");
    assert!(log.contains("husk-agent: debug: CreateContainer"), "{log}");
    assert!(
        log.contains("debug console: session 1 ended (exit code 0)"),
        "{log}"
    );
    assert!(
        log.contains("debug console: session 2 ended (exit code 0)"),
        "{log}"
    );
    h.remove(&id);
    assert_sandbox_gone(&id);
}

#[test]
fn without_the_debug_console_nothing_listens_and_console_says_what_to_set() {
    require_root("containerd");
    let h = HuskContainerd::start();
    let id = unique("nocon");
    h.run_idle(&id, &[]);
    let out = console(&id, b"exit\n", Duration::from_secs(30));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "debug console is not enabled for sandbox {id}: set debug_console = true in"
        )) && err.contains("config.toml"),
        "{err}"
    );
    // Nothing listens on the port in the guest: the backend turns the connection down. The
    // agent's port on the same socket answers, so the socket itself works.
    match vsock::connect(
        &vsock_socket(&id),
        DEBUG_CONSOLE_PORT,
        Duration::from_secs(10),
    ) {
        Err(VsockError::Refused { .. }) => {}
        other => panic!("port {DEBUG_CONSOLE_PORT}: {other:?}"),
    }
    vsock::connect(
        &vsock_socket(&id),
        husk_protocols::AGENT_VSOCK_PORT,
        Duration::from_secs(10),
    )
    .expect("the agent's port");
    let log = console_log(&id);
    assert!(
        !log.contains("Linux version"),
        "quiet kernel by default:\n{log}"
    );
    assert!(!log.contains("husk-agent: debug:"), "{log}");
    h.remove(&id);
    assert_sandbox_gone(&id);
}
