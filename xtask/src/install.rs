//! `cargo xtask install`: puts the built husk on this machine — binaries in /usr/local/bin,
//! guest kernel and initramfs in /usr/share/husk.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::run::step;
use crate::{binaries, kernel, paths, rootfs};

pub const BIN_DIR: &str = "/usr/local/bin";
pub const SHARE_DIR: &str = "/usr/share/husk";

/// Host binaries of the workspace that are installed when built.
const BINARIES: &[&str] = &["husk-vmm", "containerd-shim-husk-v2", "husk-rootfs-builder"];

fn copy(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("husk-new");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to)
        .with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    println!("    {} -> {}", from.display(), to.display());
    Ok(())
}

pub fn run() -> Result<()> {
    let vmlinux = kernel::build(false)?;
    let agent = binaries::build_all()?;
    rootfs::build(&agent)?;
    step("install");
    std::fs::create_dir_all(SHARE_DIR).with_context(|| format!("creating {SHARE_DIR}"))?;
    copy(&vmlinux, &Path::new(SHARE_DIR).join("vmlinux"))?;
    copy(
        &paths::initramfs(),
        &Path::new(SHARE_DIR).join("initramfs.cpio"),
    )?;
    let release: PathBuf = paths::workspace().join("target").join("release");
    for b in BINARIES {
        let from = release.join(b);
        if from.is_file() {
            copy(&from, &Path::new(BIN_DIR).join(b))?;
        }
    }
    Ok(())
}
