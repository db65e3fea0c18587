//! Tier 3: what `/etc/husk/config.toml` changes, through a private containerd — the programs
//! the backends run (`virtiofsd_path`: a wrong one fails `ctr run` before anything starts, a
//! copy of the real one is the one that runs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_tests::husk::{assert_sandbox_gone, processes_mentioning, HuskContainerd, BUSYBOX};
use husk_tests::require_root;

const RUNTIME: &str = "io.containerd.husk.v2";

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn console_log(sid: &str) -> String {
    std::fs::read_to_string(Path::new("/run/husk").join(sid).join("console.log"))
        .unwrap_or_default()
}

#[test]
fn a_wrong_virtiofsd_path_fails_ctr_run_before_anything_starts() {
    require_root("containerd");
    let h = HuskContainerd::start_with_config("virtiofsd_path = \"/nonexistent/bin/virtiofsd\"\n");
    let id = unique("badfsd");
    let started = Instant::now();
    let out = h
        .ctd
        .ctr(&["run", "--rm", "--runtime", RUNTIME, BUSYBOX, &id, "true"]);
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
    let exes: Vec<PathBuf> = processes_mentioning(&format!("/run/husk/{id}/virtiofsd.sock"))
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
