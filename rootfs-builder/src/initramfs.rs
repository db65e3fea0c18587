//! The guest initramfs: an uncompressed newc cpio whose `/init` is `husk-agent`.
//!
//! Nothing else is required in it: the agent mounts proc, sysfs and devtmpfs itself. The
//! directories it mounts on and a `/dev/console` node are included because the kernel opens
//! `/dev/console` for PID 1's stdio *before* `/init` runs; without the node the agent would
//! start with no stdin/stdout/stderr ("unable to open an initial console").

use std::io::{self, Write};
use std::path::Path;

use crate::tree::{Content, Kind, Tree, TreeError};
use crate::FIXED_MTIME;

/// Errors while writing a cpio archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("{0}: larger than the 4 GiB a newc entry can hold")]
    TooLarge(String),
    #[error("writing the archive")]
    Write(#[from] io::Error),
}

/// The tree of the guest initramfs around the given agent binary.
pub fn guest_tree(agent: &Path) -> Result<Tree, TreeError> {
    let mut t = Tree::new();
    t.file("init", Content::HostFile(agent.to_path_buf()), 0o755)?;
    for dir in ["dev", "proc", "sys", "run", "tmp"] {
        t.dir(dir, 0o755)?;
    }
    t.insert("tmp", Kind::Dir, 0o1777)?;
    t.char_dev("dev/console", 5, 1, 0o600)?;
    Ok(t)
}

/// Writes `tree` as a newc cpio archive: entries in path order, owner root unless the tree
/// says otherwise, fixed mtimes, inode numbers 1, 2, … in order. The same tree always gives
/// the same bytes.
pub fn write_cpio<W: Write>(tree: &Tree, mut out: W) -> Result<W, CpioError> {
    let mtime = u32::try_from(FIXED_MTIME).unwrap_or(0);
    for (ino, (path, node)) in (1u32..).zip(tree.iter()) {
        let name = path.to_string_lossy();
        let data = match &node.kind {
            Kind::File(c) => c.read()?,
            Kind::Symlink(target) => target.as_os_str().as_encoded_bytes().to_vec(),
            Kind::Dir | Kind::CharDev { .. } | Kind::BlockDev { .. } => Vec::new(),
        };
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(name.to_string()))?;
        let (rmaj, rmin) = match node.kind {
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => (major, minor),
            _ => (0, 0),
        };
        let nlink = if matches!(node.kind, Kind::Dir) { 2 } else { 1 };
        let mut w = cpio::newc::Builder::new(&name)
            .ino(ino)
            .mode(node.mode())
            .uid(node.uid)
            .gid(node.gid)
            .nlink(nlink)
            .mtime(mtime)
            .rdev_major(rmaj)
            .rdev_minor(rmin)
            .write(out, size);
        w.write_all(&data)?;
        out = w.finish()?;
    }
    Ok(cpio::newc::trailer(out)?)
}

/// Builds the guest initramfs for `agent` into `dest` (written to a temporary file first and
/// renamed, so a reader never sees half an archive).
pub fn build(agent: &Path, dest: &Path) -> Result<(), CpioError> {
    let tree = guest_tree(agent)?;
    let tmp = dest.with_extension("cpio.tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut file = write_cpio(&tree, io::BufWriter::new(file))?;
    file.flush()?;
    drop(file);
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample_tree(dir: &Path) -> Tree {
        let agent = dir.join("agent");
        std::fs::write(&agent, b"\x7fELF pretend agent").unwrap();
        let mut t = guest_tree(&agent).unwrap();
        t.symlink("sbin/init", "/init").unwrap();
        t
    }

    #[test]
    fn same_tree_gives_same_bytes() {
        let d = tempfile::tempdir().unwrap();
        let a = write_cpio(&sample_tree(d.path()), Vec::new()).unwrap();
        // A different host mtime on the input must not matter.
        std::fs::write(d.path().join("agent"), b"\x7fELF pretend agent").unwrap();
        let b = write_cpio(&sample_tree(d.path()), Vec::new()).unwrap();
        assert_eq!(a, b);
        assert_eq!(&a[..6], b"070701", "newc magic");
    }

    #[test]
    fn cpio_tool_reads_it_back() {
        let d = tempfile::tempdir().unwrap();
        let bytes = write_cpio(&sample_tree(d.path()), Vec::new()).unwrap();
        let archive = d.path().join("initramfs.cpio");
        std::fs::write(&archive, &bytes).unwrap();
        let list = |verbose: bool| {
            let mut c = Command::new("cpio");
            c.args(if verbose {
                &["-t", "-v", "-F"][..]
            } else {
                &["-t", "-F"][..]
            })
            .arg(&archive);
            let out = c
                .output()
                .expect("the cpio tool (Debian package cpio) must be installed: cargo xtask setup");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let names = list(false);
        assert_eq!(
            names.lines().collect::<Vec<_>>(),
            [
                "dev",
                "dev/console",
                "init",
                "proc",
                "run",
                "sbin",
                "sbin/init",
                "sys",
                "tmp"
            ]
        );
        let listing = list(true);
        let console = listing
            .lines()
            .find(|l| l.ends_with("dev/console"))
            .unwrap();
        assert!(console.starts_with("crw-------"), "{console}");
        assert!(
            console.contains(" 5,") && console.contains(" 1 "),
            "{console}"
        );
        let init = listing.lines().find(|l| l.ends_with(" init")).unwrap();
        assert!(init.starts_with("-rwxr-xr-x"), "{init}");
        assert!(listing.contains("sbin/init -> /init"));
        // Extraction gives back the agent's bytes.
        let x = d.path().join("x");
        std::fs::create_dir(&x).unwrap();
        let st = Command::new("cpio")
            .args(["-i", "-d", "--quiet", "-F"])
            .arg(&archive)
            .current_dir(&x)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(
            std::fs::read(x.join("init")).unwrap(),
            b"\x7fELF pretend agent"
        );
    }
}
