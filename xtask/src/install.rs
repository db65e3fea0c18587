//! `cargo xtask install`: puts the built husk on this machine — the shim (also under the Kata
//! name) and husk-vmm in /usr/local/bin, guest kernel and initramfs in /usr/share/husk, the
//! default configuration in /etc/husk/config.toml when there is none.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::run::step;
use crate::{binaries, kernel, paths, rootfs};

pub const BIN_DIR: &str = "/usr/local/bin";
pub const SHARE_DIR: &str = "/usr/share/husk";
pub const CONFIG: &str = "/etc/husk/config.toml";

/// Host binaries of the workspace that are installed.
const BINARIES: &[&str] = &["containerd-shim-husk-v2", "husk-vmm", "husk-rootfs-builder"];
/// Helpers the VM backends run, linked into BIN_DIR when cargo installed them elsewhere (a
/// containerd started by systemd does not search ~/.cargo/bin).
const HELPERS: &[&str] = &["virtiofsd", "vhost-device-vsock"];

fn copy(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("husk-new");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to)
        .with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    println!("    {} -> {}", from.display(), to.display());
    Ok(())
}

fn link(target: &Path, link: &Path) -> Result<()> {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
    println!("    {} -> {}", link.display(), target.display());
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
        copy(&release.join(b), &Path::new(BIN_DIR).join(b))?;
    }
    link(
        &Path::new(BIN_DIR).join("containerd-shim-husk-v2"),
        &Path::new(BIN_DIR).join("containerd-shim-kata-v2"),
    )?;
    for h in HELPERS {
        match paths::find_program(h) {
            Some(p) if !p.starts_with(BIN_DIR) => link(&p, &Path::new(BIN_DIR).join(h))?,
            Some(_) => {}
            None => anyhow::bail!("{h} not found — run `cargo xtask setup`"),
        }
    }
    if Path::new(CONFIG).exists() {
        println!("    {CONFIG} exists; left as it is (defaults: deploy/config.toml)");
    } else {
        std::fs::create_dir_all("/etc/husk")?;
        std::fs::write(CONFIG, include_str!("../../deploy/config.toml"))
            .with_context(|| format!("writing {CONFIG}"))?;
        println!("    {CONFIG} written");
    }
    println!(
        "    for Kubernetes, add deploy/containerd-husk.toml to containerd's config and restart it"
    );
    Ok(())
}
