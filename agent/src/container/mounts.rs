//! A container's file system view, built inside its new mount namespace: the spec's mounts
//! under the rootfs, the default devices, pivot_root, masked and read-only paths.
//!
//! Runs in the container's init helper (a single-threaded process), never in the agent.

use std::ffi::CString;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount, Spec};

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

/// `dest` (absolute, from the spec) under `root`, refusing `..` so no mount lands outside.
pub fn under(root: &Path, dest: &Path) -> Result<PathBuf, String> {
    let mut p = root.to_path_buf();
    for c in dest.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => p.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!(
                    "mount destination {}: must not contain `..`",
                    dest.display()
                ))
            }
        }
    }
    // A symlink in the rootfs must not lead a mount outside it: resolve what exists.
    if let Ok(real) = p.canonicalize() {
        if !real.starts_with(root) {
            return Err(format!(
                "mount destination {}: resolves to {} outside the rootfs",
                dest.display(),
                real.display()
            ));
        }
        return Ok(real);
    }
    Ok(p)
}

fn ensure_target(target: &Path, file: bool) -> Result<(), String> {
    if target.exists() {
        return Ok(());
    }
    if file {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        std::fs::File::create(target)
            .map(drop)
            .map_err(|e| format!("creating {}: {e}", target.display()))
    } else {
        std::fs::create_dir_all(target).map_err(|e| format!("creating {}: {e}", target.display()))
    }
}

fn do_mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(src, target, fstype, flags, data).map_err(|e| {
        format!(
            "mount {} on {} (type {}, data {:?}): {e}",
            src.map(|s| s.display().to_string())
                .unwrap_or_else(|| "none".into()),
            target.display(),
            fstype.unwrap_or("-"),
            data.unwrap_or("")
        )
    })
}

/// Mounts one OCI mount under `root`.
pub fn mount_one(root: &Path, m: &Mount) -> Result<(), String> {
    let target = under(root, m.destination())?;
    let o = parse_options(m.options().as_deref().unwrap_or(&[]));
    let typ = m.typ().as_deref().unwrap_or("");
    let data = o.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    if o.bind || typ == "bind" {
        let src = m
            .source()
            .as_ref()
            .ok_or_else(|| format!("bind mount on {}: no source", m.destination().display()))?;
        let meta = std::fs::metadata(src)
            .map_err(|e| format!("bind mount source {}: {e}", src.display()))?;
        ensure_target(&target, !meta.is_dir())?;
        let base = MsFlags::MS_BIND | (o.flags & MsFlags::MS_REC);
        do_mount(Some(src), &target, None, base, None)?;
        // Bind mounts take other flags only on a remount.
        let extra = o.flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            do_mount(
                None,
                &target,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None,
            )?;
        }
    } else {
        ensure_target(&target, false)?;
        // cgroup v1 names mean v2 here: the guest only has the unified hierarchy.
        let fstype = if typ == "cgroup" { "cgroup2" } else { typ };
        let src = m.source().clone().unwrap_or_else(|| PathBuf::from(fstype));
        let flags = o.flags;
        // mqueue/devpts refuse some data options they do not know; pass what the spec says.
        do_mount(Some(&src), &target, Some(fstype), flags, data)?;
    }
    for p in &o.propagation {
        do_mount(None, &target, None, *p, None)?;
    }
    Ok(())
}

/// Default devices every container gets (OCI runtime spec, "Default Devices"): bind mounts of
/// the guest's nodes, which work on any file system the rootfs is on (virtio-fs included).
pub const DEFAULT_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

pub fn default_devices(root: &Path) -> Result<(), String> {
    let dev = root.join("dev");
    if !dev.is_dir() {
        std::fs::create_dir_all(&dev).map_err(|e| format!("creating {}: {e}", dev.display()))?;
    }
    for name in DEFAULT_DEVICES {
        let target = dev.join(name);
        ensure_target(&target, true)?;
        let src = Path::new("/dev").join(name);
        do_mount(Some(&src), &target, None, MsFlags::MS_BIND, None)?;
    }
    let links: [(&str, &str); 5] = [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    for (name, to) in links {
        let l = dev.join(name);
        if name == "ptmx" && !dev.join("pts").is_dir() {
            continue;
        }
        if l.symlink_metadata().is_ok() {
            if name != "ptmx" {
                continue;
            }
            let _ = std::fs::remove_file(&l);
        }
        symlink(to, &l).map_err(|e| format!("symlink {} -> {to}: {e}", l.display()))?;
    }
    Ok(())
}

/// Makes `root` the root: pivot_root, then the old root is detached.
pub fn pivot_root(root: &Path) -> Result<(), String> {
    nix::unistd::chdir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    nix::unistd::pivot_root(".", ".")
        .map_err(|e| format!("pivot_root into {}: {e}", root.display()))?;
    // The old root is stacked under the new one at "."; make sure nothing propagates back.
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("making the old root a slave: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detaching the old root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir / in the new root: {e}"))?;
    Ok(())
}

/// Masked paths: /dev/null over files, an empty read-only tmpfs over directories.
pub fn mask(paths: &[String]) -> Result<(), String> {
    for p in paths {
        let path = Path::new(p);
        match std::fs::metadata(path) {
            Err(_) => continue,
            Ok(m) if m.is_dir() => do_mount(
                Some(Path::new("tmpfs")),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None,
            )?,
            Ok(_) => do_mount(
                Some(Path::new("/dev/null")),
                path,
                None,
                MsFlags::MS_BIND,
                None,
            )?,
        }
    }
    Ok(())
}

/// Read-only paths: bound onto themselves and remounted read-only.
pub fn readonly(paths: &[String]) -> Result<(), String> {
    for p in paths {
        let path = Path::new(p);
        if !path.exists() {
            continue;
        }
        do_mount(
            Some(path),
            path,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        do_mount(
            None,
            path,
            None,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None,
        )?;
    }
    Ok(())
}

/// The whole view, in the order runc uses. `rootfs` must be a directory.
pub fn build(spec: &Spec, rootfs: &Path) -> Result<(), String> {
    let linux = spec.linux().clone().unwrap_or_default();
    let prop = match linux.rootfs_propagation().as_deref() {
        Some("shared") | Some("rshared") => MsFlags::MS_SHARED,
        Some("private") | Some("rprivate") => MsFlags::MS_PRIVATE,
        Some("unbindable") | Some("runbindable") => MsFlags::MS_UNBINDABLE,
        _ => MsFlags::MS_SLAVE,
    };
    do_mount(None, Path::new("/"), None, MsFlags::MS_REC | prop, None)?;
    do_mount(
        Some(rootfs),
        rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    for m in spec.mounts().as_deref().unwrap_or(&[]) {
        mount_one(rootfs, m)?;
    }
    default_devices(rootfs)?;
    for d in linux.devices().as_deref().unwrap_or(&[]) {
        let target = under(rootfs, d.path())?;
        if target.exists() {
            continue;
        }
        let kind = match d.typ() {
            oci_spec::runtime::LinuxDeviceType::B => libc::S_IFBLK,
            oci_spec::runtime::LinuxDeviceType::P => libc::S_IFIFO,
            _ => libc::S_IFCHR,
        };
        let mode = d.file_mode().unwrap_or(0o666);
        let c = CString::new(target.as_os_str().as_encoded_bytes())
            .map_err(|e| format!("device {}: {e}", d.path().display()))?;
        let devnum = libc::makedev(
            u32::try_from(d.major()).unwrap_or(0),
            u32::try_from(d.minor()).unwrap_or(0),
        );
        // SAFETY: mknod with a NUL-terminated path we own.
        if unsafe { libc::mknod(c.as_ptr(), kind | mode, devnum) } != 0 {
            return Err(format!(
                "mknod {}: {}",
                d.path().display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    pivot_root(rootfs)?;
    mask(linux.masked_paths().as_deref().unwrap_or(&[]))?;
    readonly(linux.readonly_paths().as_deref().unwrap_or(&[]))?;
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        do_mount(
            None,
            Path::new("/"),
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

    #[test]
    fn destinations_stay_under_the_root() {
        let d = std::env::temp_dir();
        assert_eq!(
            under(Path::new("/r"), Path::new("/proc")).unwrap(),
            PathBuf::from("/r/proc")
        );
        assert!(under(Path::new("/r"), Path::new("/../etc"))
            .unwrap_err()
            .contains(".."));
        let root = d.join(format!("husk-under-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("evil")).unwrap();
        let e = under(&root, Path::new("/evil")).unwrap_err();
        std::fs::remove_dir_all(&root).unwrap();
        assert!(e.contains("outside the rootfs"), "{e}");
    }
}
