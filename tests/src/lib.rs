//! Shared helpers of husk's integration tests: where the built artefacts are, a private
//! containerd, and small process utilities.
//!
//! Tests here need root, KVM/QEMU or containerd. A missing prerequisite is a test *failure*
//! with a message naming it and the fix, never a silent pass: `cargo xtask test` installs and
//! builds everything first.

pub mod agent;
pub mod cni;
pub mod containerd;
#[cfg(feature = "cri")]
pub mod cri;
pub mod guest;
pub mod http;
pub mod husk;
pub mod leaks;
pub mod procs;
pub mod stale;
pub mod vmm;

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// Where `cargo xtask` puts the guest artefacts: `target/husk/`.
pub fn artifacts_dir() -> PathBuf {
    workspace().join("target").join("husk")
}

fn artifact(env: &str, name: &str, how: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| artifacts_dir().join(name));
    assert!(
        path.is_file(),
        "{}: missing — {how} (or point {env} at one); `cargo xtask test` builds it",
        path.display()
    );
    path
}

/// The guest kernel (`HUSK_KERNEL`, else `target/husk/vmlinux`).
pub fn kernel() -> PathBuf {
    artifact(
        "HUSK_KERNEL",
        "vmlinux",
        "build it with `cargo xtask kernel`",
    )
}

/// The guest initramfs (`HUSK_INITRAMFS`, else `target/husk/initramfs.cpio`).
pub fn initramfs() -> PathBuf {
    artifact(
        "HUSK_INITRAMFS",
        "initramfs.cpio",
        "build it with `cargo xtask rootfs`",
    )
}

/// Asserts the test runs as root, with the reason.
pub fn require_root(why: &str) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root ({why}); run `cargo xtask test` as root"
    );
}

/// The first executable called `name` on PATH, or a failure naming the package.
pub fn require_program(name: &str, package: &str) -> PathBuf {
    husk_hypervisor::lookup::on_path(name).unwrap_or_else(|| {
        panic!("{name}: not found on PATH — install Debian's {package} (`cargo xtask setup` does)")
    })
}

/// Whether a process with this PID exists (zombies count as gone).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}
