//! Shared helpers for the husk-vmm tests (`vmm_*.rs`, `husk_vmm_*.rs`): find (build) the
//! `husk-vmm` binary, find the synthetic guests, run a VM with a deadline and capture what it
//! printed.
//!
//! Prerequisites are checked, not assumed: without /dev/kvm or root a test fails with a
//! message saying so; it never passes silently.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use crate::workspace;

/// Fails the test unless this machine can run husk-vmm guests.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "prerequisite missing: /dev/kvm — these tests need KVM (hardware or kvm_pvm)"
    );
    assert!(
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok(),
        "prerequisite missing: cannot open /dev/kvm read-write — run the tests as root or in group kvm"
    );
}

/// The `husk-vmm` binary: `$HUSK_VMM` if set, else built from this workspace (once per
/// test process) into the same target directory and profile as the tests.
pub fn vmm_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("HUSK_VMM") {
            return PathBuf::from(p);
        }
        // The test executable is <target>/<profile>/deps/<name>.
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps");
        let target = profile_dir.parent().expect("<target>/<profile>");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "husk-vmm", "--bin", "husk-vmm"])
            .arg("--manifest-path")
            .arg(workspace().join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", target);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo to build husk-vmm");
        assert!(status.success(), "building husk-vmm failed: {status}");
        let bin = profile_dir.join("husk-vmm");
        assert!(
            bin.exists(),
            "husk-vmm was built but {} is missing",
            bin.display()
        );
        bin
    })
    .clone()
}

/// A synthetic guest built from `tests/guests/<name>.s`.
pub fn guest(name: &str) -> PathBuf {
    let p = Path::new(env!("HUSK_GUESTS_DIR")).join(format!("{name}.elf"));
    assert!(p.exists(), "synthetic guest {} was not built", p.display());
    p
}

/// What a finished VMM run left behind.
#[derive(Debug)]
pub struct Run {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout (the serial console by default).
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
    /// From spawning the process to the first byte on stdout.
    pub first_byte: Option<Duration>,
    /// From spawning the process to its exit.
    pub total: Duration,
}

/// Kills (by pid, it is our own child) and reaps a VMM that overran its deadline.
pub fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs husk-vmm with `args`, failing the test if it does not end within `deadline`.
pub fn run_vmm(args: &[&str], deadline: Duration) -> Run {
    run_vmm_via(&[], args, deadline)
}

/// Like [`run_vmm`], but through a launcher (e.g. `ip netns exec NS`), which must exec
/// husk-vmm in its own process.
pub fn run_vmm_via(launcher: &[&str], args: &[&str], deadline: Duration) -> Run {
    let bin = vmm_binary();
    let mut cmd = match launcher.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let start = Instant::now();
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let (first_tx, first_rx) = mpsc::channel();
    let out_thread = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if all.is_empty() {
                        let _ = first_tx.send(start.elapsed());
                    }
                    all.extend_from_slice(&buf[..n]);
                }
            }
        }
        all
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for husk-vmm") {
            break status;
        }
        if start.elapsed() > deadline {
            kill_child(&mut child);
            let so = out_thread.join().unwrap_or_default();
            let se = err_thread.join().unwrap_or_default();
            panic!(
                "husk-vmm {args:?} did not end within {deadline:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&so),
                String::from_utf8_lossy(&se)
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let total = start.elapsed();
    let stdout = String::from_utf8_lossy(&out_thread.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&err_thread.join().expect("stderr reader")).into_owned();
    Run {
        status,
        stdout,
        stderr,
        first_byte: first_rx.try_recv().ok(),
        total,
    }
}

/// A temporary directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("husk-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A husk-vmm process the test watches line by line. Dropping it kills the process (our
/// own child, by pid) if it is still running.
pub struct Running {
    /// The process.
    pub child: Child,
    /// When it was spawned.
    pub start: Instant,
    lines: mpsc::Receiver<(Duration, String)>,
    /// Every line seen so far.
    pub seen: Vec<String>,
}

/// Spawns husk-vmm with `args`; its stdout is read line by line.
pub fn spawn_vmm(args: &[&str]) -> Running {
    spawn_vmm_with_stdin(args, Stdio::null())
}

/// Like [`spawn_vmm`], with the given stdin (`Stdio::piped()` to type into the console).
pub fn spawn_vmm_with_stdin(args: &[&str], stdin: Stdio) -> Running {
    let bin = vmm_binary();
    let start = Instant::now();
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut reader = std::io::BufReader::new(out);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_owned();
            if tx.send((start.elapsed(), line)).is_err() {
                break;
            }
            buf.clear();
        }
    });
    Running {
        child,
        start,
        lines: rx,
        seen: Vec::new(),
    }
}

impl Running {
    /// Waits for a line satisfying `pred`; returns it and when it arrived after spawning.
    /// Fails the test on timeout or if the process ends first.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (Duration, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return (at, line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "no {what} within {timeout:?}; console so far:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!(
                        "husk-vmm ended ({status:?}) before {what}; console:\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// The next line within `timeout`, if any (recorded in `seen`).
    pub fn try_line(&mut self, timeout: Duration) -> Option<String> {
        let (_, line) = self.lines.recv_timeout(timeout).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Waits (up to `timeout`) for the process to end by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "husk-vmm did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = i32::try_from(self.child.id()).expect("pid fits i32");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM to our husk-vmm");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "husk-vmm did not exit within {timeout:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A field of /proc/<pid>/status, in kB (e.g. "VmRSS").
    pub fn status_kb(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc status"))
    }

    /// CPU time (user + system, all threads) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("read /proc stat");
        // Fields after the ")" that closes the command name; utime and stime are 14 and 15.
        let rest = &s[s.rfind(')').expect("stat has a comm") + 2..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // /proc counts in USER_HZ, which is 100 on x86-64 Linux (a fixed ABI value).
        let ticks = f[11] + f[12];
        Duration::from_millis(ticks * 10)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            kill_child(&mut self.child);
        }
    }
}
