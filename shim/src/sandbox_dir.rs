//! `/run/husk/<sandbox-id>/`: the sandbox's state on the host, and what is mounted in it.
//!
//! ```text
//! /run/husk/<sid>/            0700, removed with the sandbox
//!   console.log, *.sock       the VM's (see husk-hypervisor)
//!   vm.pids                   PIDs of the VM's processes and their programs, for `delete`
//!                             after a shim crash
//!   debug-console.json        whether the debug console is on (see debug_console.rs)
//!   shared/.husk-debug/sh     the debug console's shell, when it is on
//!   shared/                   exported to the guest by virtiofsd (guest: /run/husk/shared)
//!     <cid>/rootfs            containerd's rootfs mounts for container <cid>
//!     <cid>/mounts/<n>        the container's bind mounts (volumes, /etc/hosts, …)
//! ```
//!
//! `shared/` is bind-mounted on itself and made a shared mount before virtiofsd starts:
//! virtiofsd sandboxes itself in a mount namespace that is a slave of ours, so only through
//! propagation does it see the container rootfs mounts made afterwards.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where the guest sees `shared/`.
pub const GUEST_SHARED: &str = "/run/husk/shared";

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Sys {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("sandbox id {0:?}: not usable as a directory name")]
    BadId(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DirError {
    let path = path.to_path_buf();
    move |source| DirError::Io { what, path, source }
}

fn sys(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> DirError {
    let path = path.to_path_buf();
    move |source| DirError::Sys { what, path, source }
}

/// Ids become path components: refuse anything that could climb out.
pub fn check_id(id: &str) -> Result<(), DirError> {
    if id.is_empty()
        || id == "."
        || id == ".."
        || id.contains('/')
        || id.contains('\0')
        || id.len() > 128
    {
        return Err(DirError::BadId(id.to_string()));
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct SandboxDir {
    root: PathBuf,
}

impl SandboxDir {
    pub fn new(state_root: &Path, sandbox_id: &str) -> Result<Self, DirError> {
        check_id(sandbox_id)?;
        Ok(Self {
            root: state_root.join(sandbox_id),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }

    pub fn pids_file(&self) -> PathBuf {
        self.root.join("vm.pids")
    }

    pub fn container(&self, cid: &str) -> PathBuf {
        self.shared().join(cid)
    }

    pub fn rootfs(&self, cid: &str) -> PathBuf {
        self.container(cid).join("rootfs")
    }

    /// Creates the directory and the shared mount.
    pub fn create(&self) -> Result<(), DirError> {
        use std::os::unix::fs::DirBuilderExt;
        if let Some(parent) = self.root.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.root)
            .map_err(io("creating", &self.root))?;
        let shared = self.shared();
        std::fs::create_dir(&shared).map_err(io("creating", &shared))?;
        mount(
            Some(&shared),
            &shared,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys("bind-mounting", &shared))?;
        mount(
            None::<&str>,
            &shared,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys("making a shared mount of", &shared))?;
        Ok(())
    }

    /// Records the PIDs of the VM's processes, each with the program it runs now.
    pub fn write_pids(&self, pids: &[u32]) -> Result<(), DirError> {
        let text: String = pids
            .iter()
            .map(|p| match std::fs::read_link(format!("/proc/{p}/exe")) {
                Ok(exe) => format!("{p} {}\n", exe.display()),
                Err(_) => format!("{p}\n"),
            })
            .collect();
        std::fs::write(self.pids_file(), text).map_err(io("writing", &self.pids_file()))
    }

    /// The recorded PIDs, with their programs where known.
    pub fn read_pids(&self) -> Vec<(u32, Option<PathBuf>)> {
        std::fs::read_to_string(self.pids_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (pid, exe) = l.trim().split_once(' ').unwrap_or((l.trim(), ""));
                let exe = (!exe.is_empty()).then(|| PathBuf::from(exe));
                Some((pid.parse().ok()?, exe))
            })
            .collect()
    }

    /// Unmounts everything under the container's directory and removes it.
    pub fn remove_container(&self, cid: &str) -> Result<(), DirError> {
        let dir = self.container(cid);
        unmount_under(&dir)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("removing", &dir))?;
        }
        Ok(())
    }

    /// Unmounts everything under the sandbox directory and removes it. Idempotent.
    pub fn destroy(&self) -> Result<(), DirError> {
        unmount_under(&self.root)?;
        if self.root.exists() {
            std::fs::remove_dir_all(&self.root).map_err(io("removing", &self.root))?;
        }
        Ok(())
    }
}

/// Mount points at or under `dir`, deepest first, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount at or under `dir` (stacked mounts included).
pub fn unmount_under(dir: &Path) -> Result<(), DirError> {
    for _ in 0..16 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Ok(());
        }
        for m in mounts {
            match umount2(&m, MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
                Err(e) => return Err(sys("unmounting", &m)(e)),
            }
        }
    }
    Err(DirError::Io {
        what: "unmounting everything under",
        path: dir.to_path_buf(),
        source: std::io::Error::other("mounts keep reappearing"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_climb_out() {
        for bad in ["", ".", "..", "a/b", "../x"] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
        check_id("4f2c-abc_1.x").unwrap();
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn create_and_destroy_leave_nothing() {
        if !nix::unistd::Uid::effective().is_root() {
            panic!("this test mounts: run it as root (cargo xtask test)");
        }
        let base = tempfile::tempdir().unwrap();
        let d = SandboxDir::new(base.path(), "sb1").unwrap();
        d.create().unwrap();
        let rootfs = d.rootfs("c1");
        std::fs::create_dir_all(&rootfs).unwrap();
        mount(
            Some("tmpfs"),
            &rootfs,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        assert_eq!(mounts_under(d.root()).len(), 2);
        let me = std::process::id();
        d.write_pids(&[me]).unwrap();
        assert_eq!(
            d.read_pids(),
            vec![(me, Some(std::env::current_exe().unwrap()))]
        );
        d.remove_container("c1").unwrap();
        assert!(!d.container("c1").exists());
        d.destroy().unwrap();
        d.destroy().unwrap();
        assert!(!d.root().exists());
        assert!(mounts_under(base.path()).is_empty());
    }
}
