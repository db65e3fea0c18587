//! `/run/husk/<sandbox-id>/`: the sandbox's state on the host, and what is mounted in it.
//!
//! ```text
//! /run/husk/<sid>/            0700, removed with the sandbox
//!   vm/                       the VM's state directory: console.log, *.sock, helper logs
//!                             (owned by the sandbox's jail uid: see husk_hypervisor::jail)
//!   jail/                     empty; the jails' tmpfs roots are mounted on it in their own
//!                             mount namespaces
//!   vm.pids                   PIDs of the VM's processes and their programs, for `delete`
//!                             after a shim crash
//!   debug-console.json        whether the debug console is on (see debug_console.rs)
//!   metrics.sock              the shim's measurements of the sandbox (see metrics.rs)
//!   mounts/                   host-only: every host-side mount happens here
//!     .husk-debug/sh          the debug console's shell, when it is on
//!     <cid>/rootfs            containerd's rootfs mounts for container <cid>
//!     <cid>/mounts/<n>        the container's bind mounts (volumes, /etc/hosts, …)
//!   shared/                   a read-only bind of mounts/, exported to the guest by
//!                             virtiofsd (guest: /run/husk/shared)
//! ```
//!
//! The guest can write inside a container's rootfs and its read-write volumes (those are
//! mounts of their own, which keep their flags in `shared/`), but it cannot create, rename or
//! replace a single entry of `shared/` itself: so nothing it plants can redirect what the
//! host later mounts for the pod's next container (Kata's CVE-2020-2026, fixed there the same
//! way). And the shim never resolves a path inside `mounts/` by following a symlink
//! (`host_fs`), as a second wall.
//!
//! Propagation: `mounts/` is a bind mount of itself made shared; `shared/` is a bind of it,
//! made read-only, then a slave of `mounts/` (so mounts made later under `mounts/` appear
//! under `shared/`) and shared in turn, because virtiofsd sandboxes itself in a mount
//! namespace that is a slave of ours and sees new mounts only through propagation.

use std::path::{Path, PathBuf};

use std::os::fd::OwnedFd;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::host_fs;

/// Where the guest sees `shared/`.
pub(crate) const GUEST_SHARED: &str = "/run/husk/shared";

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
pub(crate) fn check_id(id: &str) -> Result<(), DirError> {
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

    /// The VM's state directory (sockets, console log, helper logs).
    pub fn vm(&self) -> PathBuf {
        self.root.join("vm")
    }

    /// The empty mount point of the jails' roots.
    pub(crate) fn jail_root(&self) -> PathBuf {
        self.root.join("jail")
    }

    /// The read-only view of [`Self::mounts`] that virtiofsd exports to the guest.
    pub fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }

    /// The host-only directory where the shim mounts rootfs and volumes.
    pub fn mounts(&self) -> PathBuf {
        self.root.join("mounts")
    }

    /// An `O_PATH` fd of [`Self::mounts`], the base every host-side path is resolved from.
    pub(crate) fn mounts_fd(&self) -> Result<OwnedFd, DirError> {
        let path = self.mounts();
        host_fs::open_dir(&path).map_err(io("opening", &path))
    }

    /// The shim's metrics socket (`crate::metrics`), root-only like the directory.
    pub(crate) fn metrics_socket(&self) -> PathBuf {
        self.root.join("metrics.sock")
    }

    pub(crate) fn pids_file(&self) -> PathBuf {
        self.root.join("vm.pids")
    }

    /// Container `cid`'s directory under [`Self::mounts`].
    pub fn container(&self, cid: &str) -> PathBuf {
        self.mounts().join(cid)
    }

    pub fn rootfs(&self, cid: &str) -> PathBuf {
        self.container(cid).join("rootfs")
    }

    /// Creates the directory, the host-only `mounts/` and its read-only view `shared/`.
    pub fn create(&self) -> Result<(), DirError> {
        use std::os::unix::fs::DirBuilderExt;
        if let Some(parent) = self.root.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.root)
            .map_err(io("creating", &self.root))?;
        let (mounts, shared) = (self.mounts(), self.shared());
        let (vm, jail) = (self.vm(), self.jail_root());
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&vm)
            .map_err(io("creating", &vm))?;
        for d in [&mounts, &shared, &jail] {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(d)
                .map_err(io("creating", d))?;
        }
        let none = None::<&str>;
        mount(Some(&mounts), &mounts, none, MsFlags::MS_BIND, none)
            .map_err(sys("bind-mounting", &mounts))?;
        mount(none, &mounts, none, MsFlags::MS_SHARED, none)
            .map_err(sys("making a shared mount of", &mounts))?;
        mount(Some(&mounts), &shared, none, MsFlags::MS_BIND, none)
            .map_err(sys("bind-mounting mounts/ on", &shared))?;
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(
            none,
            &shared,
            none,
            ro | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            none,
        )
        .map_err(sys("making read-only", &shared))?;
        mount(none, &shared, none, MsFlags::MS_SLAVE, none)
            .map_err(sys("making a slave mount of", &shared))?;
        mount(none, &shared, none, MsFlags::MS_SHARED, none)
            .map_err(sys("making a shared mount of", &shared))?;
        Ok(())
    }

    /// Creates container `cid`'s directory and its empty `rootfs/` mount point under
    /// `mounts/`, without following anything; returns an fd of the mount point.
    pub fn create_container(&self, cid: &str) -> Result<OwnedFd, DirError> {
        check_id(cid)?;
        let base = self.mounts_fd()?;
        let dir = self.container(cid);
        host_fs::mkdir_beneath(&base, Path::new(cid), 0o755).map_err(io("creating", &dir))?;
        host_fs::mkdir_beneath(&base, &Path::new(cid).join("rootfs"), 0o755)
            .map_err(io("creating", &self.rootfs(cid)))
    }

    /// Records the PIDs of the VM's processes, each with the program it runs now.
    pub(crate) fn write_pids(&self, pids: &[u32]) -> Result<(), DirError> {
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
    pub(crate) fn read_pids(&self) -> Vec<(u32, Option<PathBuf>)> {
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
        check_id(cid)?;
        let dir = self.container(cid);
        unmount_under(&self.shared().join(cid))?;
        unmount_under(&dir)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("removing", &dir))?;
        }
        Ok(())
    }

    /// Unmounts everything under the sandbox directory, removes it and gives back the
    /// sandbox's jail id. Idempotent.
    pub(crate) fn destroy(&self) -> Result<(), DirError> {
        unmount_under(&self.root)?;
        if self.root.exists() {
            std::fs::remove_dir_all(&self.root).map_err(io("removing", &self.root))?;
        }
        if let (Some(state_root), Some(sid)) = (self.root.parent(), self.root.file_name()) {
            husk_hypervisor::jail::JailIds::new(state_root).release(&sid.to_string_lossy());
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
pub(crate) fn unmount_under(dir: &Path) -> Result<(), DirError> {
    for _ in 0..16 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Ok(());
        }
        for m in mounts {
            match umount2(&m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
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
        let point = d.create_container("c1").unwrap();
        let rootfs = host_fs::proc_fd_path(&point);
        mount(
            Some("tmpfs"),
            &rootfs,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        // mounts/, shared/, the rootfs and its copy propagated into shared/.
        assert_eq!(
            mounts_under(d.root()).len(),
            4,
            "{:?}",
            mounts_under(d.root())
        );
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

    /// What the guest sees (`shared/`) is read-only except inside the mounts the host made,
    /// and those arrive there by propagation.
    #[test]
    fn the_guests_view_is_read_only_but_rootfs_stays_writable() {
        if !nix::unistd::Uid::effective().is_root() {
            panic!("this test mounts: run it as root (cargo xtask test)");
        }
        let base = tempfile::tempdir().unwrap();
        let d = SandboxDir::new(base.path(), "sb2").unwrap();
        d.create().unwrap();
        let shared = d.shared();
        for attempt in [
            std::fs::create_dir(shared.join("c2")).err(),
            std::os::unix::fs::symlink("/etc/shadow", shared.join("c2")).err(),
            std::fs::write(shared.join("f"), "x").err(),
        ] {
            let e = attempt.expect("writing shared/ must fail");
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        }
        let point = d.create_container("c1").unwrap();
        let rootfs = host_fs::proc_fd_path(&point);
        mount(
            Some("tmpfs"),
            &rootfs,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(shared.join("c1/rootfs/file"), "guest data").unwrap();
        assert_eq!(
            std::fs::read_to_string(d.rootfs("c1").join("file")).unwrap(),
            "guest data"
        );
        assert!(std::fs::create_dir(shared.join("c1/mounts")).is_err());
        d.destroy().unwrap();
        assert!(mounts_under(base.path()).is_empty());
    }
}
