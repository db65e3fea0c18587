//! virtio-fs end to end: a real virtiofsd shares a temporary directory; a synthetic guest
//! speaks FUSE over husk-vmm's vhost-user-fs device (INIT, LOOKUP, OPEN, READ, WRITE),
//! reads a file the host wrote and appends a line the host then finds.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::vmm::{guest, kill_child, require_kvm, run_vmm, TempDir};

/// virtiofsd: `$HUSK_VIRTIOFSD`, else on PATH, else in cargo's bin directory.
fn virtiofsd() -> PathBuf {
    if let Some(p) = std::env::var_os("HUSK_VIRTIOFSD") {
        return PathBuf::from(p);
    }
    if let Some(p) = husk_hypervisor::lookup::find_program("virtiofsd") {
        return p;
    }
    panic!("prerequisite missing: virtiofsd — install it with `cargo install --locked virtiofsd` or set HUSK_VIRTIOFSD");
}

/// A virtiofsd we started; killed (by pid) and reaped if still running when dropped.
struct Virtiofsd(Child);

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            kill_child(&mut self.0);
        }
    }
}

fn start_virtiofsd(dir: &TempDir) -> (Virtiofsd, PathBuf, PathBuf) {
    let share = dir.0.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let sock = dir.0.join("fs.sock");
    let child = Command::new(virtiofsd())
        .arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", share.display()))
        .arg("--sandbox=none")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting virtiofsd");
    let d = Virtiofsd(child);
    // Never probe by connecting: virtiofsd serves exactly one client and would take the
    // probe for husk-vmm. Wait until the kernel lists the socket as listening instead.
    let start = Instant::now();
    while !listening(&sock) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "virtiofsd never listened on {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (d, sock, share)
}

/// Whether a unix socket is bound at `path` and listening (/proc/net/unix flag
/// __SO_ACCEPTCON).
fn listening(path: &std::path::Path) -> bool {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path = path.to_string_lossy();
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[7] == path && f[3] == "00010000"
    })
}

#[test]
fn guest_reads_and_writes_a_host_file_through_virtiofsd() {
    require_kvm();
    let dir = TempDir::new("vmm-fs");
    let (mut fsd, sock, share) = start_virtiofsd(&dir);
    std::fs::write(share.join("hello.txt"), "hello from the host\n").unwrap();
    let g = guest("fs_rw");
    let run = run_vmm(
        &[
            "--kernel",
            g.to_str().unwrap(),
            "--fs-sock",
            sock.to_str().unwrap(),
            "--fs-tag",
            "husk",
        ],
        Duration::from_secs(60),
    );
    assert!(run.status.success(), "{:?} {}", run.status, run.stderr);
    assert_eq!(
        run.stdout,
        "husk fs: read hello from the host\nhusk fs: wrote 0x00000015\n"
    );
    assert_eq!(
        std::fs::read_to_string(share.join("hello.txt")).unwrap(),
        "hello from the host\nwritten by the guest\n"
    );
    // virtiofsd ends when its frontend goes away.
    let start = Instant::now();
    while fsd.0.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "virtiofsd outlived husk-vmm"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_missing_virtiofsd_socket_says_to_start_it() {
    require_kvm();
    let dir = TempDir::new("vmm-fs-missing");
    let sock = dir.0.join("nobody.sock");
    let g = guest("hello");
    let run = run_vmm(
        &[
            "--kernel",
            g.to_str().unwrap(),
            "--fs-sock",
            sock.to_str().unwrap(),
            "--fs-tag",
            "husk",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(run.status.code(), Some(1));
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("nobody.sock") && run.stderr.contains("virtiofsd"),
        "{}",
        run.stderr
    );
}
