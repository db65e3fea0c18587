//! `cargo xtask rootfs`: the guest initramfs and the OCI images of tests and demo, in
//! `target/husk/`.

use std::path::Path;

use anyhow::{Context, Result};
use husk_rootfs_builder::image::{self, ImageSpec};
use husk_rootfs_builder::initramfs;

use crate::paths;
use crate::run::step;

/// Debian's busybox-static.
pub const BUSYBOX: &str = "/bin/busybox";
pub const BUSYBOX_IMAGE: &str = "husk.local/busybox:latest";
pub const PAUSE_IMAGE: &str = "husk.local/pause:latest";

pub fn build(agent: &Path) -> Result<()> {
    std::fs::create_dir_all(paths::images())?;
    let out = paths::initramfs();
    initramfs::build(agent, &out).with_context(|| format!("building {}", out.display()))?;
    step(&format!(
        "rootfs: {} ({} KiB, uncompressed newc)",
        out.display(),
        std::fs::metadata(&out)?.len() / 1024
    ));
    let bb = Path::new(BUSYBOX);
    for (tree, spec, file) in [
        (
            image::busybox_tree(bb)?,
            ImageSpec::new(BUSYBOX_IMAGE, &["sh"]),
            "busybox.tar",
        ),
        (
            image::pause_tree(bb)?,
            ImageSpec::new(PAUSE_IMAGE, &["/bin/sleep", "infinity"]),
            "pause.tar",
        ),
    ] {
        let dest = paths::images().join(file);
        let w = image::build(&tree, &spec, &dest)
            .with_context(|| format!("writing {}", dest.display()))?;
        step(&format!(
            "rootfs: {} = {} ({})",
            dest.display(),
            w.name,
            w.manifest_digest
        ));
    }
    Ok(())
}
