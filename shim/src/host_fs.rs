//! Host-side file and mount operations inside a sandbox's directory that never follow a
//! symlink, and mounts made on file descriptors rather than on paths.
//!
//! Everything under `/run/husk/<sid>/mounts/` is made by the shim, and the guest only sees a
//! read-only bind of it (`shared/`), so the guest cannot plant anything there. These helpers
//! are the second wall (docs/SECURITY.md): every path is resolved with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`) from a directory fd, new
//! entries are created exclusively (`O_EXCL`, never truncating), and a mount goes onto the fd
//! that was resolved (`move_mount` to an `O_PATH` fd), so a path swapped between check and use
//! cannot redirect it. Read-only binds are read-only all the way down (`mount_setattr` with
//! `AT_RECURSIVE`), not only at their top.
//!
//! The new mount API (open_tree/move_mount/mount_setattr, Linux 5.12+; fsopen/fsconfig/fsmount,
//! Linux 5.2+, for a new file system: [`FsContext`]) has no wrapper in nix 0.29 and libc does
//! not export its constants on every target, so the few constants are written out here from
//! the kernel's `include/uapi/linux/mount.h`.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR_NOATIME: u64 = 0x10;
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;

/// `struct open_how` of `openat2(2)` (libc's is non-exhaustive, so it cannot be built).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path holds a NUL"))
}

fn check(ret: libc::c_long) -> std::io::Result<libc::c_long> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    let fd = RawFd::try_from(fd).expect("the kernel returns fds that fit an int");
    // SAFETY: `fd` was just returned by the kernel as a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Opens `rel` beneath the directory `dir` without following any symlink (not even in the
/// middle of the path, nor as its last component: `RESOLVE_NO_SYMLINKS` refuses that with
/// ELOOP even for `O_PATH`, which `O_NOFOLLOW` would not) and without leaving `dir`. `flags`
/// are `open(2)` flags (`O_CLOEXEC` is always added).
pub(crate) fn open_beneath(
    dir: &impl AsRawFd,
    rel: &Path,
    flags: libc::c_int,
) -> std::io::Result<OwnedFd> {
    let path = cstr(rel)?;
    let how = OpenHow {
        flags: u64::try_from(flags | libc::O_CLOEXEC).unwrap_or(0),
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads `path` (NUL-terminated, alive for the call) and `how` (a valid
    // open_how whose size is passed); it returns a new fd or -1.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    })?;
    Ok(owned(fd))
}

/// Opens the directory `path` itself, refusing a symlink as its last component.
pub(crate) fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    let p = cstr(path)?;
    // SAFETY: `p` is NUL-terminated and alive for the call; open returns a new fd or -1.
    let fd = check(
        unsafe {
            libc::open(
                p.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        }
        .into(),
    )?;
    Ok(owned(fd))
}

/// Splits `rel` into its parent and its last component (which must be a plain name).
fn split(rel: &Path) -> std::io::Result<(&Path, CString)> {
    let name = rel
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let parent = rel.parent().unwrap_or(Path::new(""));
    let name = CString::new(name.as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "name holds a NUL"))?;
    Ok((parent, name))
}

fn parent_fd(dir: &impl AsRawFd, parent: &Path) -> std::io::Result<OwnedFd> {
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    open_beneath(dir, parent, libc::O_PATH | libc::O_DIRECTORY)
}

/// Creates the directory `rel` beneath `dir` (its parent must exist, with no symlink on the
/// way) and returns an `O_PATH` fd of it. An existing entry of that name is an error.
pub(crate) fn mkdir_beneath(
    dir: &impl AsRawFd,
    rel: &Path,
    mode: libc::mode_t,
) -> std::io::Result<OwnedFd> {
    let (parent, name) = split(rel)?;
    let pfd = parent_fd(dir, parent)?;
    // SAFETY: `name` is NUL-terminated and alive; mkdirat creates one entry in `pfd`.
    check(unsafe { libc::mkdirat(pfd.as_raw_fd(), name.as_ptr(), mode) }.into())?;
    open_beneath(
        &pfd,
        Path::new(name.to_str().unwrap_or("")),
        libc::O_PATH | libc::O_DIRECTORY,
    )
}

/// Creates the empty regular file `rel` beneath `dir` exclusively (never truncating or
/// following anything that is there) and returns an `O_PATH` fd of it.
pub(crate) fn create_file_beneath(
    dir: &impl AsRawFd,
    rel: &Path,
    mode: libc::mode_t,
) -> std::io::Result<OwnedFd> {
    let (parent, name) = split(rel)?;
    let pfd = parent_fd(dir, parent)?;
    // SAFETY: `name` is NUL-terminated and alive; openat returns a new fd or -1.
    let fd = check(
        unsafe {
            libc::openat(
                pfd.as_raw_fd(),
                name.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_WRONLY | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        }
        .into(),
    )?;
    drop(owned(fd));
    open_beneath(&pfd, Path::new(name.to_str().unwrap_or("")), libc::O_PATH)
}

/// Mount attributes for [`bind_onto`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BindAttrs {
    pub readonly: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    /// The tree's propagation, all the way down (`MS_PRIVATE`, `MS_SLAVE`), set before it is
    /// attached; 0 keeps the source's (a copy of a shared mount is its peer).
    pub propagation: u64,
}

/// Binds `source` (a host path given by containerd or the pod spec: followed as runc would)
/// onto the mount point `target` (an fd from this module), recursively when `recursive`, and
/// applies `attrs` to the whole tree: a read-only bind is read-only in every submount too.
pub(crate) fn bind_onto(
    source: &Path,
    target: &OwnedFd,
    recursive: bool,
    attrs: BindAttrs,
) -> std::io::Result<()> {
    let src = cstr(source)?;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: `src` is NUL-terminated and alive; open_tree returns a new fd (a detached copy
    // of the mount tree at `source`) or -1.
    let tree = owned(check(unsafe {
        libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, src.as_ptr(), flags)
    })?);
    let mut set = 0;
    if attrs.readonly {
        set |= MOUNT_ATTR_RDONLY;
    }
    if attrs.nosuid {
        set |= MOUNT_ATTR_NOSUID;
    }
    if attrs.nodev {
        set |= MOUNT_ATTR_NODEV;
    }
    if attrs.noexec {
        set |= MOUNT_ATTR_NOEXEC;
    }
    if set != 0 || attrs.propagation != 0 {
        setattr(&tree, set, attrs.propagation)?;
    }
    move_onto(&tree, target)
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE, set, propagation)`.
fn setattr(tree: &OwnedFd, set: u64, propagation: u64) -> std::io::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    // SAFETY: the empty path is a static NUL-terminated string; `attr` is a valid mount_attr
    // whose size is passed.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// Attaches the detached mount tree `tree` (from open_tree or fsmount) on the mount point
/// `target`, both given as fds.
pub(crate) fn move_onto(tree: &OwnedFd, target: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: both paths are the static empty string; both fds are open.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// Attributes of a new mount made by [`FsContext::mount`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MountAttrs {
    pub readonly: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub noatime: bool,
}

impl MountAttrs {
    fn bits(self) -> u64 {
        [
            (self.readonly, MOUNT_ATTR_RDONLY),
            (self.nosuid, MOUNT_ATTR_NOSUID),
            (self.nodev, MOUNT_ATTR_NODEV),
            (self.noexec, MOUNT_ATTR_NOEXEC),
            (self.noatime, MOUNT_ATTR_NOATIME),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |acc, (_, bit)| acc | bit)
    }
}

/// A file system being configured with the new mount API: `fsopen`, one `fsconfig` per
/// parameter (no page-sized limit on the whole option string, unlike `mount(2)`), then
/// `FSCONFIG_CMD_CREATE` and `fsmount`, which gives a detached mount for [`move_onto`].
#[derive(Debug)]
pub(crate) struct FsContext {
    fd: OwnedFd,
}

impl FsContext {
    /// `fsopen(fstype, FSOPEN_CLOEXEC)`.
    pub fn open(fstype: &str) -> std::io::Result<Self> {
        let name = CString::new(fstype)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in fstype"))?;
        // SAFETY: `name` is NUL-terminated and alive for the call; fsopen returns a new fd or -1.
        let fd = check(unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) })?;
        Ok(Self { fd: owned(fd) })
    }

    fn config(
        &self,
        cmd: libc::c_uint,
        key: Option<&str>,
        value: Option<&str>,
    ) -> std::io::Result<()> {
        let nul = |s: &str| {
            CString::new(s).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a mount parameter")
            })
        };
        let key = key.map(nul).transpose()?;
        let value = value.map(nul).transpose()?;
        // SAFETY: key and value are NUL-terminated strings alive for the call, or NULL where
        // the command takes none; aux is 0; the fd is an open fs context.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.fd.as_raw_fd(),
                cmd,
                key.as_ref().map_or(std::ptr::null(), |k| k.as_ptr()),
                value.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
                0,
            )
        })
        .map(drop)
    }

    /// `fsconfig(FSCONFIG_SET_STRING, key, value)` (the kernel takes values under 256 bytes).
    pub(crate) fn set_string(&self, key: &str, value: &str) -> std::io::Result<()> {
        self.config(FSCONFIG_SET_STRING, Some(key), Some(value))
    }

    /// `fsconfig(FSCONFIG_SET_FLAG, key)`.
    pub(crate) fn set_flag(&self, key: &str) -> std::io::Result<()> {
        self.config(FSCONFIG_SET_FLAG, Some(key), None)
    }

    /// `fsconfig(FSCONFIG_CMD_CREATE)`: makes the superblock.
    pub fn create(&self) -> std::io::Result<()> {
        self.config(FSCONFIG_CMD_CREATE, None, None)
    }

    /// `fsmount`: the created file system as a detached mount, with `attrs`.
    pub fn mount(&self, attrs: MountAttrs) -> std::io::Result<OwnedFd> {
        // SAFETY: the fd is an fs context in the created state; fsmount returns a new fd or -1.
        let fd = check(unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                self.fd.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                attrs.bits(),
            )
        })?;
        Ok(owned(fd))
    }

    /// What the file system said while being configured (the kernel's messages, e.g.
    /// `e overlayfs: failed to resolve 'x': -2`), oldest first; empty if it said nothing.
    pub fn log(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        // The context keeps at most 8 messages; each read takes one.
        for _ in 0..16 {
            // SAFETY: `buf` is a writable buffer of the given length; read returns the bytes
            // written or -1 (ENODATA once the log is empty).
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let Ok(n) = usize::try_from(n) else { break };
            if n == 0 {
                break;
            }
            out.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_string());
        }
        out
    }
}

/// The `/proc/self/fd/N` path of `fd`, for the classic mount(2) when a file system (an
/// overlay) has to be mounted on a mount point held as an fd.
pub(crate) fn proc_fd_path(fd: &OwnedFd) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_beneath_refuses_symlinks_and_escapes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("a")).unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("a/link")).unwrap();
        std::os::unix::fs::symlink("a", d.path().join("rel")).unwrap();
        let fd = open_dir(d.path()).unwrap();
        open_beneath(&fd, Path::new("a"), libc::O_PATH).unwrap();
        for bad in [
            "a/link",
            "a/link/passwd",
            "rel/link",
            "rel",
            "../",
            "a/../..",
        ] {
            assert!(
                open_beneath(&fd, Path::new(bad), libc::O_PATH).is_err(),
                "{bad}"
            );
        }
        assert!(
            open_dir(&d.path().join("rel")).is_err(),
            "a symlinked dir itself is refused"
        );
    }

    #[test]
    fn creation_is_exclusive_and_never_follows() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        std::fs::create_dir(d.path().join("base")).unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("base/f")).unwrap();
        std::os::unix::fs::symlink(d.path(), d.path().join("base/dir")).unwrap();
        let fd = open_dir(&d.path().join("base")).unwrap();
        assert!(create_file_beneath(&fd, Path::new("f"), 0o644).is_err());
        assert!(mkdir_beneath(&fd, Path::new("dir"), 0o755).is_err());
        assert!(create_file_beneath(&fd, Path::new("dir/x"), 0o644).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        mkdir_beneath(&fd, Path::new("new"), 0o755).unwrap();
        create_file_beneath(&fd, Path::new("new/file"), 0o644).unwrap();
        assert!(d.path().join("base/new/file").is_file());
    }

    #[test]
    fn readonly_binds_are_readonly_all_the_way_down() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test mounts: run it as root (cargo xtask test)"
        );
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let sub = src.join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &sub,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::create_dir(d.path().join("base")).unwrap();
        let base = open_dir(&d.path().join("base")).unwrap();
        let target = mkdir_beneath(&base, Path::new("t"), 0o755).unwrap();
        let attrs = BindAttrs {
            readonly: true,
            ..Default::default()
        };
        bind_onto(&src, &target, true, attrs).unwrap();
        let t = d.path().join("base/t");
        assert!(
            std::fs::write(t.join("top"), "x").is_err(),
            "top is read-only"
        );
        assert!(
            std::fs::write(t.join("sub/deep"), "x").is_err(),
            "the submount is read-only too"
        );
        std::fs::write(sub.join("deep"), "host").unwrap();
        assert_eq!(std::fs::read_to_string(t.join("sub/deep")).unwrap(), "host");
        for m in [t.join("sub"), t, sub] {
            nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).unwrap();
        }
    }

    /// A volume's propagation on the host side: a private copy never sees the host's later
    /// mounts under the source, a slave one does; a mount made under either copy never
    /// reaches the source.
    #[test]
    fn a_binds_propagation_follows_what_was_asked() {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let none = None::<&str>;
        mount(Some("tmpfs"), &src, Some("tmpfs"), MsFlags::empty(), none).unwrap();
        mount(none, &src, none, MsFlags::MS_SHARED, none).unwrap();
        std::fs::create_dir(src.join("later")).unwrap();
        std::fs::create_dir(d.path().join("base")).unwrap();
        let base = open_dir(&d.path().join("base")).unwrap();
        let bind = |name: &str, propagation: MsFlags| {
            let target = mkdir_beneath(&base, Path::new(name), 0o755).unwrap();
            let attrs = BindAttrs {
                propagation: propagation.bits(),
                ..Default::default()
            };
            bind_onto(&src, &target, true, attrs).unwrap();
            d.path().join("base").join(name)
        };
        let private = bind("private", MsFlags::MS_PRIVATE);
        let slave = bind("slave", MsFlags::MS_SLAVE);
        mount(
            Some("tmpfs"),
            &src.join("later"),
            Some("tmpfs"),
            MsFlags::empty(),
            none,
        )
        .unwrap();
        std::fs::write(src.join("later/f"), "late").unwrap();
        let seen = |t: &Path| std::fs::read_to_string(t.join("later/f")).ok();
        assert_eq!(
            seen(&private),
            None,
            "a private copy saw a later host mount"
        );
        assert_eq!(seen(&slave).as_deref(), Some("late"));
        std::fs::create_dir(slave.join("back")).unwrap();
        mount(
            Some("tmpfs"),
            &slave.join("back"),
            Some("tmpfs"),
            MsFlags::empty(),
            none,
        )
        .unwrap();
        std::fs::write(slave.join("back/g"), "x").unwrap();
        assert!(
            !src.join("back/g").exists(),
            "a slave's mount reached its source"
        );
        for m in [
            slave.join("back"),
            slave.join("later"),
            slave,
            private,
            src.join("later"),
            src,
        ] {
            let _ = umount2(&m, MntFlags::MNT_DETACH);
        }
    }
}
