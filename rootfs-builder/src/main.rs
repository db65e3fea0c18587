//! `husk-rootfs-builder`: command-line front end of the library (also used by `cargo xtask`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use husk_rootfs_builder::{image, initramfs, tree::Tree};

#[derive(Parser)]
#[command(about = "Build the husk guest initramfs and small OCI images, without a registry")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The guest initramfs: an uncompressed newc cpio with AGENT as /init.
    Initramfs {
        #[arg(long)]
        agent: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// An OCI image tarball for `ctr image import`.
    Image {
        /// Image name, e.g. husk.local/busybox:latest.
        #[arg(long)]
        name: String,
        /// Output tarball.
        #[arg(long)]
        out: PathBuf,
        /// Make the image from this directory (e.g. a debootstrap tree) …
        #[arg(long, conflicts_with_all = ["busybox", "pause"])]
        from_dir: Option<PathBuf>,
        /// … or from this static busybox, with every applet linked in /bin …
        #[arg(long)]
        busybox: Option<PathBuf>,
        /// … or the pause image (busybox `sleep infinity`) from this busybox.
        #[arg(long, conflicts_with = "busybox")]
        pause: Option<PathBuf>,
        /// The command (default: `sh`, or `sleep infinity` for the pause image).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Initramfs { agent, out } => {
            initramfs::build(&agent, &out).with_context(|| {
                format!(
                    "building the initramfs {} from {}",
                    out.display(),
                    agent.display()
                )
            })?;
            println!("{}", out.display());
        }
        Cmd::Image {
            name,
            out,
            from_dir,
            busybox,
            pause,
            cmd,
        } => {
            let (tree, default_cmd): (Tree, &[&str]) = match (from_dir, busybox, pause) {
                (Some(dir), None, None) => (
                    Tree::from_dir(&dir).with_context(|| format!("reading {}", dir.display()))?,
                    &["/bin/sh"],
                ),
                (None, Some(bb), None) => (image::busybox_tree(&bb)?, &["sh"]),
                (None, None, Some(bb)) => (image::pause_tree(&bb)?, &["/bin/sleep", "infinity"]),
                _ => anyhow::bail!("say what to make the image from: --from-dir DIR, --busybox PATH or --pause PATH"),
            };
            let mut spec = image::ImageSpec::new(&name, default_cmd);
            if !cmd.is_empty() {
                spec.cmd = cmd;
            }
            let written = image::build(&tree, &spec, &out)
                .with_context(|| format!("writing the image {}", out.display()))?;
            println!(
                "{} {} {}",
                out.display(),
                written.name,
                written.manifest_digest
            );
        }
    }
    Ok(())
}
