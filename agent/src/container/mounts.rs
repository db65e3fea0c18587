//! A container's file system view, built inside its new mount namespace: the spec's mounts
//! under the rootfs, the default devices and the spec's device nodes, the process's cwd,
//! masked and read-only paths, then pivot_root.
//!
//! Every path inside the rootfs is resolved inside it ([`inroot`]: a symlink in the image or a
//! volume is followed as if the rootfs were `/`, and never leads out of it), what is missing
//! is made there component by component, and every mount is made on the resolved fd
//! (`/proc/self/fd/N`), never on a path a symlink swapped in meanwhile could redirect.
//!
//! Runs in the container's init helper (a single-threaded process), never in the agent, and
//! entirely before pivot_root: the guest's /proc (for the fd paths) and /dev (the sources of
//! the default devices and of masking) are the guest's own, which no container can replace.

use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

use super::inroot::{self, Make, Root};
use super::steps::mark;

/// Why the container's file system view could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Path(#[from] inroot::Error),
    #[error(
        "mount destination {0}: must not contain `..` — give the path as the container sees it"
    )]
    DotDot(PathBuf),
    #[error("bind mount on {0}: no source — give the mount a source path in the guest")]
    NoSource(PathBuf),
    #[error("bind mount source {src} (for {dest}): {source}")]
    Source {
        src: PathBuf,
        dest: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {src} on {target} (type {fstype}, data {data:?}): {errno}")]
    Mount {
        src: String,
        target: String,
        fstype: String,
        data: String,
        errno: Errno,
    },
    #[error("device node {path} ({kind} {major}:{minor}): {source}")]
    Device {
        path: PathBuf,
        kind: char,
        major: i64,
        minor: i64,
        #[source]
        source: inroot::Error,
    },
    #[error("device node {path}: giving it to {uid}:{gid}: {errno}")]
    DeviceOwner {
        path: PathBuf,
        uid: u32,
        gid: u32,
        errno: Errno,
    },
    #[error("/dev/{name} in the container: {what}: {errno}")]
    DevLink {
        name: &'static str,
        what: &'static str,
        errno: Errno,
    },
    #[error("reading /proc/self/mountinfo to find the mount {0} is on: {1}")]
    MountInfo(PathBuf, #[source] std::io::Error),
    #[error("pivot_root into {root}: {step}: {errno}")]
    Pivot {
        root: PathBuf,
        step: &'static str,
        errno: Errno,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// Mount flags, propagation changes and the file system data of one OCI mount's options.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub flags: MsFlags,
    /// Flags the `flags` must lose (e.g. `rw`, `suid`), relevant on a bind remount.
    pub propagation: Vec<MsFlags>,
    pub data: Vec<String>,
    pub bind: bool,
}

/// Parses OCI mount options (mount(8) names) into flags and data.
pub fn parse_options(opts: &[String]) -> Options {
    let mut o = Options {
        flags: MsFlags::empty(),
        propagation: Vec::new(),
        data: Vec::new(),
        bind: false,
    };
    for opt in opts {
        let (set, clear, prop) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty(), None),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY, None),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty(), None),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID, None),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty(), None),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV, None),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty(), None),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC, None),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty(), None),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS, None),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty(), None),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty(), None),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME, None),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty(), None),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty(), None),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty(), None),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty(), None),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK, None),
            "bind" => {
                o.bind = true;
                (MsFlags::MS_BIND, MsFlags::empty(), None)
            }
            "rbind" => {
                o.bind = true;
                (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty(), None)
            }
            "private" => (
                MsFlags::empty(),
                MsFlags::empty(),
                Some(MsFlags::MS_PRIVATE),
            ),
            "rprivate" => (
                MsFlags::empty(),
                MsFlags::empty(),
                Some(MsFlags::MS_PRIVATE | MsFlags::MS_REC),
            ),
            "shared" => (MsFlags::empty(), MsFlags::empty(), Some(MsFlags::MS_SHARED)),
            "rshared" => (
                MsFlags::empty(),
                MsFlags::empty(),
                Some(MsFlags::MS_SHARED | MsFlags::MS_REC),
            ),
            "slave" => (MsFlags::empty(), MsFlags::empty(), Some(MsFlags::MS_SLAVE)),
            "rslave" => (
                MsFlags::empty(),
                MsFlags::empty(),
                Some(MsFlags::MS_SLAVE | MsFlags::MS_REC),
            ),
            "unbindable" => (
                MsFlags::empty(),
                MsFlags::empty(),
                Some(MsFlags::MS_UNBINDABLE),
            ),
            "runbindable" => (
                MsFlags::empty(),
                MsFlags::empty(),
                Some(MsFlags::MS_UNBINDABLE | MsFlags::MS_REC),
            ),
            _ => {
                o.data.push(opt.clone());
                continue;
            }
        };
        o.flags = (o.flags | set) - clear;
        if let Some(p) = prop {
            o.propagation.push(p);
        }
    }
    o
}

/// Spec paths (mount destinations, devices) are absolute paths the container sees; a `..` in
/// one is refused rather than guessed at (symlinks in the rootfs may still hold `..`: those
/// are resolved inside it).
fn no_dotdot(dest: &Path) -> Result<()> {
    if dest.components().any(|c| c == Component::ParentDir) {
        return Err(Error::DotDot(dest.into()));
    }
    Ok(())
}

/// `mount(2)`; `target` is what the messages show (the spec's path), `at` what the kernel gets.
fn do_mount(
    src: Option<&str>,
    at: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(src, at, fstype, flags, data).map_err(|errno| Error::Mount {
        src: src.unwrap_or("none").into(),
        target: target.display().to_string(),
        fstype: fstype.unwrap_or("-").into(),
        data: data.unwrap_or("").into(),
        errno,
    })
}

/// Mounts one OCI mount inside `root`.
pub fn mount_one(root: &Root, m: &Mount) -> Result<()> {
    let dest = m.destination();
    no_dotdot(dest)?;
    let o = parse_options(m.options().as_deref().unwrap_or(&[]));
    let typ = m.typ().as_deref().unwrap_or("");
    let data = o.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    let target = if o.bind || typ == "bind" {
        let src = m
            .source()
            .as_ref()
            .ok_or_else(|| Error::NoSource(dest.into()))?;
        // The source is a path in the guest (the shared directory, a guest device), not in
        // the container: resolved as the guest sees it.
        let meta = std::fs::metadata(src).map_err(|source| Error::Source {
            src: src.clone(),
            dest: dest.into(),
            source,
        })?;
        let mut target = at(
            root,
            dest,
            if meta.is_dir() { Make::Dir } else { Make::File },
        )?;
        let base = MsFlags::MS_BIND | (o.flags & MsFlags::MS_REC);
        do_mount(
            Some(&src.to_string_lossy()),
            &target.proc_path(),
            dest,
            None,
            base,
            None,
        )?;
        target.reopen()?;
        // Bind mounts take other flags only on a remount (of the new mount: hence the reopen).
        let extra = o.flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            do_mount(
                None,
                &target.proc_path(),
                dest,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None,
            )?;
        }
        target
    } else {
        let mut target = at(root, dest, Make::Dir)?;
        // cgroup v1 names mean v2 here: the guest only has the unified hierarchy.
        let fstype = if typ == "cgroup" { "cgroup2" } else { typ };
        let src = m
            .source()
            .as_ref()
            .map_or_else(|| fstype.to_string(), |s| s.to_string_lossy().into_owned());
        // mqueue/devpts refuse some data options they do not know; pass what the spec says.
        do_mount(
            Some(&src),
            &target.proc_path(),
            dest,
            Some(fstype),
            o.flags,
            data,
        )?;
        target.reopen()?;
        target
    };
    for p in &o.propagation {
        do_mount(None, &target.proc_path(), dest, None, *p, None)?;
    }
    Ok(())
}

/// `path` in `root`, made as `make` if missing.
fn at(root: &Root, path: &Path, make: Make) -> Result<inroot::Entry> {
    // With something to make, the walk always ends in an entry.
    root.at(path, Some(make))?
        .ok_or_else(|| Error::Path(inroot::Error::Relative { path: path.into() }))
}

/// Default devices every container gets (OCI runtime spec, "Default Devices"): bind mounts of
/// the guest's nodes, which work on any file system the rootfs is on (virtio-fs included).
pub(crate) const DEFAULT_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

pub(crate) fn default_devices(root: &Root) -> Result<()> {
    at(root, Path::new("/dev"), Make::Dir)?;
    for name in DEFAULT_DEVICES {
        let dest = Path::new("/dev").join(name);
        let target = at(root, &dest, Make::File)?;
        // The guest's node: before pivot_root, /dev is the guest's devtmpfs.
        do_mount(
            Some(&format!("/dev/{name}")),
            &target.proc_path(),
            &dest,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    let links: [(&str, &str); 5] = [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    // Resolved again: a default device's mount does not move /dev, but the spec's could have.
    let dev = at(root, Path::new("/dev"), Make::Dir)?;
    let dir = Some(dev.fd.as_raw_fd());
    let has_pts = root
        .at(Path::new("/dev/pts"), None)?
        .is_some_and(|e| e.is_dir());
    for (name, to) in links {
        if name == "ptmx" && !has_pts {
            continue;
        }
        let err = |what, errno| Error::DevLink { name, what, errno };
        match nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(_) if name != "ptmx" => continue,
            // The container's pty multiplexer is its devpts's, whatever the image has there.
            Ok(_) => nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
                .map_err(|e| err("removing the image's", e))?,
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(err("examining", e)),
        }
        nix::unistd::symlinkat(to, dir, name).map_err(|e| err("making the symlink", e))?;
    }
    Ok(())
}

/// The spec's device nodes (`linux.devices`), each with the directories above it, as runc
/// makes them: a path that already exists is left as it is (a privileged container's spec
/// lists the host's `/dev`, which repeats the default devices), and a major:minor the guest
/// has no driver for is made all the same (opening it then fails with ENXIO).
pub fn devices(root: &Root, devices: &[LinuxDevice]) -> Result<()> {
    // The modes as the spec says, not as the helper's umask would cut them.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let r = devices.iter().try_for_each(|d| device(root, d));
    nix::sys::stat::umask(old);
    r
}

fn device(root: &Root, d: &LinuxDevice) -> Result<()> {
    let path = d.path();
    no_dotdot(path)?;
    let (kind, letter) = match d.typ() {
        LinuxDeviceType::B => (libc::S_IFBLK, 'b'),
        LinuxDeviceType::P => (libc::S_IFIFO, 'p'),
        LinuxDeviceType::C | LinuxDeviceType::U | LinuxDeviceType::A => (libc::S_IFCHR, 'c'),
    };
    let perm = d.file_mode().unwrap_or(0o666) & 0o7777;
    let major = u32::try_from(d.major()).unwrap_or(0);
    let minor = u32::try_from(d.minor()).unwrap_or(0);
    let make = Make::Node {
        mode: kind | perm,
        dev: libc::makedev(major, minor),
    };
    let e = root.at(path, Some(make)).map_err(|source| Error::Device {
        path: path.clone(),
        kind: letter,
        major: d.major(),
        minor: d.minor(),
        source,
    })?;
    let Some(e) = e else { return Ok(()) };
    if e.created && (d.uid().is_some() || d.gid().is_some()) {
        let (uid, gid) = (d.uid().unwrap_or(0), d.gid().unwrap_or(0));
        nix::unistd::fchownat(
            Some(e.parent().as_raw_fd()),
            e.name(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|errno| Error::DeviceOwner {
            path: path.clone(),
            uid,
            gid,
            errno,
        })?;
    }
    Ok(())
}

/// Makes `root` the root: pivot_root, then the old root is detached.
pub fn pivot_root(root: &Root) -> Result<()> {
    let err = |step, errno| Error::Pivot {
        root: root.path().into(),
        step,
        errno,
    };
    nix::unistd::fchdir(root.fd().as_raw_fd()).map_err(|e| err("fchdir", e))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| err("pivot_root", e))?;
    // The old root is stacked under the new one at "."; make sure nothing propagates back.
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err("making the old root a slave", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| err("detaching the old root", e))?;
    nix::unistd::chdir("/").map_err(|e| err("chdir / in the new root", e))?;
    Ok(())
}

/// A masked or read-only path: `None` if there is nothing to protect there (it does not
/// exist, or a file stands where the path needs a directory), as with runc.
fn existing(root: &Root, p: &str) -> Result<Option<inroot::Entry>> {
    match root.at(Path::new(p), None) {
        Ok(e) => Ok(e),
        Err(inroot::Error::NotDir { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Masked paths: the guest's /dev/null over files, an empty read-only tmpfs over directories.
pub fn mask(root: &Root, paths: &[String]) -> Result<()> {
    for p in paths {
        let Some(e) = existing(root, p)? else {
            continue;
        };
        if e.is_dir() {
            do_mount(
                Some("tmpfs"),
                &e.proc_path(),
                Path::new(p),
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None,
            )?;
        } else {
            do_mount(
                Some("/dev/null"),
                &e.proc_path(),
                Path::new(p),
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        }
    }
    Ok(())
}

/// Read-only paths: bound onto themselves and remounted read-only.
pub fn readonly(root: &Root, paths: &[String]) -> Result<()> {
    for p in paths {
        let Some(mut e) = existing(root, p)? else {
            continue;
        };
        let here = e.proc_path();
        do_mount(
            Some(&here),
            &here,
            Path::new(p),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        e.reopen()?;
        let flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC;
        do_mount(None, &e.proc_path(), Path::new(p), None, flags, None)?;
    }
    Ok(())
}

/// The propagation `linux.rootfsPropagation` names, as runc maps it (`r…` recursive); `None`
/// when the spec names none (the root is then made a recursive slave, as runc does).
fn root_propagation(p: Option<&str>) -> Option<MsFlags> {
    let rec = MsFlags::MS_REC;
    Some(match p? {
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | rec,
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | rec,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | rec,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | rec,
        _ => return None,
    })
}

/// One line's mount point and whether it is shared, from /proc/self/mountinfo.
fn mountinfo_line(line: &str) -> Option<(PathBuf, bool)> {
    let mut fields = line.split(' ');
    let point = fields.nth(4)?;
    // Optional fields (`shared:N`, `master:N`, …) run from the 7th to the `-` separator.
    let shared = fields
        .skip(1)
        .take_while(|f| *f != "-")
        .any(|f| f.starts_with("shared:"));
    Some((PathBuf::from(unescape_mountinfo(point)), shared))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` (octal).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount `path` is on (the longest mount point above it) and whether it is shared: runc's
/// `getParentMount`. `None` if the table names none (it always has `/`).
fn parent_mount(mountinfo: &str, path: &Path) -> Option<(PathBuf, bool)> {
    mountinfo
        .lines()
        .filter_map(mountinfo_line)
        .filter(|(point, _)| path.starts_with(point))
        .max_by_key(|(point, _)| point.components().count())
}

/// runc's `rootfsParentMountPrivate`: the mount the rootfs is on is made private in the
/// container's mount namespace if it is shared, so that the rootfs's bind onto itself does
/// not propagate anywhere and pivot_root accepts it (the kernel refuses a new root whose
/// parent mount is shared: EINVAL, as with `rootfsPropagation: rshared` before this).
fn rootfs_parent_private(rootfs: &Path) -> Result<()> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| Error::MountInfo(rootfs.into(), source))?;
    if let Some((point, true)) = parent_mount(&info, rootfs) {
        let shown = point.to_string_lossy();
        do_mount(None, &shown, &point, None, MsFlags::MS_PRIVATE, None)?;
    }
    Ok(())
}

/// The whole view, in the order runc uses. `rootfs` must be a directory.
pub fn build(spec: &Spec, rootfs: &Path) -> Result<()> {
    let linux = spec.linux().clone().unwrap_or_default();
    let prop = root_propagation(linux.rootfs_propagation().as_deref());
    let slash = Path::new("/");
    let first = prop.unwrap_or(MsFlags::MS_SLAVE | MsFlags::MS_REC);
    do_mount(None, "/", slash, None, first, None)?;
    rootfs_parent_private(rootfs)?;
    let shown = rootfs.to_string_lossy();
    do_mount(
        Some(&shown),
        &shown,
        rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    // Held from here on: the bind just made (a mount made through an fd of what is under it
    // would not be seen in the container).
    let root = Root::new(rootfs)?;
    mark("mounts: rootfs bound");
    for m in spec.mounts().as_deref().unwrap_or(&[]) {
        mount_one(&root, m)?;
    }
    mark("mounts: the spec's");
    default_devices(&root)?;
    mark("mounts: default devices");
    devices(&root, linux.devices().as_deref().unwrap_or(&[]))?;
    // runc makes the process's working directory if the image lacks it.
    if let Some(p) = spec.process() {
        match root.at(p.cwd(), Some(Make::Dir)) {
            // `/` (or a path back to it): nothing to make.
            Ok(_) | Err(inroot::Error::IsRoot { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    mark("mounts: devices and cwd");
    mask(&root, linux.masked_paths().as_deref().unwrap_or(&[]))?;
    mark("mounts: masked");
    readonly(&root, linux.readonly_paths().as_deref().unwrap_or(&[]))?;
    mark("mounts: read-only");
    pivot_root(&root)?;
    mark("mounts: pivot_root");
    // As runc: the root's own propagation once it is the root (made on the old root's mount
    // it would have reached the guest's namespace); private it is already.
    if let Some(p) = prop.filter(|p| !p.contains(MsFlags::MS_PRIVATE)) {
        do_mount(None, "/", slash, None, p, None)?;
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        do_mount(
            None,
            "/",
            slash,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn options_become_flags_and_data() {
        let o = parse_options(&s(&[
            "nosuid",
            "noexec",
            "mode=755",
            "size=65536k",
            "ro",
            "rw",
        ]));
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC);
        assert_eq!(o.data, s(&["mode=755", "size=65536k"]));
        let o = parse_options(&s(&["rbind", "ro", "rslave"]));
        assert!(o.bind);
        assert_eq!(
            o.flags,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY
        );
        assert_eq!(o.propagation, vec![MsFlags::MS_SLAVE | MsFlags::MS_REC]);
    }

    fn spec_device(path: &str, mode: u32) -> LinuxDevice {
        serde_json::from_value(serde_json::json!({ "path": path, "type": "p", "major": 0, "minor": 0, "fileMode": mode })).unwrap()
    }

    /// runc's getParentMount: the longest mount point above the path, escapes undone, and
    /// `shared:N` read from the optional fields only.
    #[test]
    fn the_parent_mount_of_the_rootfs_is_found_with_its_propagation() {
        let info = "\
1 0 0:2 / / rw - rootfs rootfs rw
20 1 0:21 / /run/husk/shared rw,relatime shared:5 - virtiofs husk-shared rw
21 20 0:22 / /run/husk/shared/c1/rootfs rw master:3 - virtiofs husk-shared rw
22 1 0:23 / /run/husk/share rw shared:9 - tmpfs tmpfs rw
23 1 0:24 / /mnt/with\\040space rw - tmpfs shared:7 rw
";
        let p = |s: &str| parent_mount(info, Path::new(s));
        assert_eq!(
            p("/run/husk/shared/c2/rootfs"),
            Some(("/run/husk/shared".into(), true))
        );
        assert_eq!(
            p("/run/husk/shared/c1/rootfs"),
            Some(("/run/husk/shared/c1/rootfs".into(), false))
        );
        assert_eq!(p("/run/husk/sharedx"), Some(("/".into(), false)));
        // `shared:7` after the separator is the super block's option, not propagation.
        assert_eq!(
            p("/mnt/with space/x"),
            Some(("/mnt/with space".into(), false))
        );
    }

    #[test]
    fn root_propagation_is_runcs() {
        assert_eq!(root_propagation(None), None);
        assert_eq!(
            root_propagation(Some("rshared")),
            Some(MsFlags::MS_SHARED | MsFlags::MS_REC)
        );
        assert_eq!(root_propagation(Some("slave")), Some(MsFlags::MS_SLAVE));
    }

    #[test]
    fn a_destination_with_dotdot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path()).unwrap();
        let m: Mount = serde_json::from_value(
            serde_json::json!({ "destination": "/../etc", "type": "tmpfs", "source": "tmpfs" }),
        )
        .unwrap();
        let e = mount_one(&root, &m).unwrap_err();
        assert!(matches!(e, Error::DotDot(_)), "{e}");
        assert!(e.to_string().contains("/../etc"), "{e}");
    }

    /// containerd puts the host's devices in a privileged container's spec, /dev/cpu/0/cpuid
    /// among them: the directories above a node are made, with the spec's mode whatever the
    /// umask, and a node already there is kept. (Fifos: mknod of one needs no privilege.)
    #[test]
    fn device_nodes_get_their_parent_directories_and_exact_modes() {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path()).unwrap();
        std::fs::create_dir(dir.path().join("dev")).unwrap();
        std::fs::write(dir.path().join("dev/null"), "kept").unwrap();
        devices(
            &root,
            &[
                spec_device("/dev/cpu/0/cpuid", 0o666),
                spec_device("/dev/null", 0o666),
            ],
        )
        .unwrap();
        let m = std::fs::symlink_metadata(dir.path().join("dev/cpu/0/cpuid")).unwrap();
        assert!(m.file_type().is_fifo());
        assert_eq!(m.permissions().mode() & 0o7777, 0o666);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("dev/null")).unwrap(),
            "kept"
        );
        // A device path through a symlink out of the root is made inside it.
        std::os::unix::fs::symlink("/", dir.path().join("dev/up")).unwrap();
        devices(&root, &[spec_device("/dev/up/tmp/fifo", 0o600)]).unwrap();
        assert!(dir.path().join("tmp/fifo").exists());
    }
}
