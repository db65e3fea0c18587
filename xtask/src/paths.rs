//! Where things live: the workspace, its `target/husk/` artefacts, and the cache outside the
//! clone (`/var/cache/husk`, or `HUSK_CACHE_DIR`).

use std::path::{Path, PathBuf};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Guest artefacts of this checkout: `target/husk/`.
pub fn artifacts() -> PathBuf {
    workspace().join("target").join("husk")
}

pub fn vmlinux() -> PathBuf {
    artifacts().join("vmlinux")
}

pub fn initramfs() -> PathBuf {
    artifacts().join("initramfs.cpio")
}

pub fn images() -> PathBuf {
    artifacts().join("images")
}

/// Slow artefacts shared by every checkout on the machine, keyed by their inputs.
pub fn cache() -> PathBuf {
    std::env::var_os("HUSK_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/husk"))
}

/// `cargo`, as the one running us.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The directory `cargo install` puts binaries in.
pub fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// A program on PATH or in cargo's bin directory (the hypervisor crate's one lookup).
pub fn find_program(name: &str) -> Option<PathBuf> {
    husk_hypervisor::lookup::find_program(name).or_else(|| {
        let p = cargo_bin().join(name);
        p.is_file().then_some(p)
    })
}
