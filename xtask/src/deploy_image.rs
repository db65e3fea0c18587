//! The node installer image (`husk.local/husk-deploy:latest`, in the manner of kata-deploy):
//! busybox, `deploy/installer/husk-install.sh`, and the payload it puts on a node — the shim,
//! husk-vmm, virtiofsd, vhost-device-vsock, the guest kernel and initramfs, the default
//! config and containerd snippet. Written with rootfs-builder, no registry or docker needed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use husk_rootfs_builder::image::{self, ImageSpec};
use husk_rootfs_builder::tree::Content;

use crate::run::step;
use crate::{paths, rootfs};

pub const DEPLOY_IMAGE: &str = "husk.local/husk-deploy:latest";

pub fn build() -> Result<PathBuf> {
    let ws = paths::workspace();
    let mut t = image::busybox_tree(Path::new(rootfs::BUSYBOX))?;
    let file = |p: &Path| Content::HostFile(p.to_path_buf());
    t.file(
        "usr/local/bin/husk-install.sh",
        file(&ws.join("deploy/installer/husk-install.sh")),
        0o755,
    )?;
    let release = ws.join("target/release");
    for b in ["containerd-shim-husk-v2", "husk-vmm"] {
        t.file(
            &format!("opt/husk-payload/bin/{b}"),
            file(&release.join(b)),
            0o755,
        )?;
    }
    for h in ["virtiofsd", "vhost-device-vsock"] {
        let p = paths::find_program(h)
            .with_context(|| format!("{h} not found — run `cargo xtask setup`"))?;
        let p = std::fs::canonicalize(&p).unwrap_or(p);
        t.file(&format!("opt/husk-payload/bin/{h}"), file(&p), 0o755)?;
    }
    let vmlinux = std::fs::canonicalize(paths::vmlinux())
        .context("the guest kernel: run `cargo xtask kernel`")?;
    t.file("opt/husk-payload/share/vmlinux", file(&vmlinux), 0o644)?;
    t.file(
        "opt/husk-payload/share/initramfs.cpio",
        file(&paths::initramfs()),
        0o644,
    )?;
    t.file(
        "opt/husk-payload/config.toml",
        file(&ws.join("deploy/config.toml")),
        0o644,
    )?;
    t.file(
        "opt/husk-payload/containerd-husk.toml",
        file(&ws.join("deploy/containerd-husk.toml")),
        0o644,
    )?;
    let mut spec = ImageSpec::new(DEPLOY_IMAGE, &["/usr/local/bin/husk-install.sh", "install"]);
    spec.env.push("HUSK_WAIT=1".into());
    std::fs::create_dir_all(paths::images())?;
    let dest = paths::images().join("husk-deploy.tar");
    let w =
        image::build(&t, &spec, &dest).with_context(|| format!("writing {}", dest.display()))?;
    step(&format!(
        "deploy image: {} = {} ({} MB)",
        dest.display(),
        w.name,
        std::fs::metadata(&dest)?.len() / 1_000_000
    ));
    Ok(dest)
}
