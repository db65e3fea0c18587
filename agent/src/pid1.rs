//! What the agent does as the guest's PID 1 before serving: the kernel file systems,
//! cgroup v2 with its controllers handed down, loopback, and the shared virtio-fs.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

/// Where the shim's shared directory (virtio-fs) is mounted in the guest.
pub const SHARED_DIR: &str = "/run/husk/shared";
/// The virtio-fs tag the host's VMM gives the shared directory (`husk_hypervisor::SHARED_FS_TAG`).
pub const SHARED_FS_TAG: &str = "husk-shared";
/// Where cgroup2 is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Where a pooled VM's rehearsal container lives while it runs: on the tmpfs root, beside
/// the agent's binary that it hard-links (`container::rehearsal`).
pub const REHEARSAL_DIR: &str = "/.husk-rehearsal";

/// The agent's binary on the tmpfs root (copied there by [`switch_to_tmpfs_root`]).
pub const AGENT_BINARY: &str = "/init";

/// Why the guest's PID 1 setup failed. The kernel is ours (`guest-kernel-config/`): most of
/// these mean a kernel built without the option the message names, or a full guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {fstype} on {target}: {source} — the guest kernel needs {fstype} built in")]
    Mount {
        fstype: &'static str,
        target: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{step}: {source}")]
    Root {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}: {source}")]
    RootSys {
        step: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{what} lo: {source}")]
    Loopback {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {}: {source} — is cgroup2 mounted there?", path.display())]
    Controllers {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("enabling {controllers} in {}: {source}", dir.display())]
    Enable {
        controllers: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn create_dir(path: impl Into<PathBuf>) -> Result<(), Error> {
    let path = path.into();
    std::fs::create_dir_all(&path).map_err(|source| Error::CreateDir { path, source })
}

fn mount_one(
    fstype: &'static str,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Error> {
    create_dir(target)?;
    mount(Some(fstype), target, Some(fstype), flags, data).map_err(|source| Error::Mount {
        fstype,
        target: target.into(),
        source,
    })
}

/// Mounts proc, sysfs, devtmpfs, devpts, tmpfs on /run and /tmp, /dev/shm, and cgroup2.
pub fn mount_basics() -> Result<(), Error> {
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_one("proc", "/proc", common, None)?;
    mount_one("sysfs", "/sys", common, None)?;
    mount_one(
        "devtmpfs",
        "/dev",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755"),
    )?;
    mount_one(
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_one("tmpfs", "/dev/shm", common, Some("mode=1777"))?;
    mount_one(
        "tmpfs",
        "/run",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_one(
        "tmpfs",
        "/tmp",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    // favordynmods: moving a process into a cgroup (every container's and exec's helper
    // does) waits for no RCU grace period, at an atomic more per fork and exit (FIELD-NOTES,
    // "Container creation under TCG").
    mount_one(
        "cgroup2",
        CGROUP_ROOT,
        common,
        Some("nsdelegate,favordynmods"),
    )?;
    Ok(())
}

/// Mounts the shared virtio-fs at [`SHARED_DIR`], if the VM has one (`Ok(false)` if not).
pub fn mount_shared() -> Result<bool, Error> {
    // Linux 6.1 does not list virtio-fs tags in sysfs; trying the mount is the test. The
    // virtiofs driver answers EINVAL for an unknown tag ("tag <…> not found" in dmesg).
    create_dir(SHARED_DIR)?;
    match mount(
        Some(SHARED_FS_TAG),
        SHARED_DIR,
        Some("virtiofs"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENODEV | nix::errno::Errno::EINVAL) => {
            Ok(false)
        }
        Err(source) => Err(Error::RootSys {
            step: format!("mount virtio-fs tag {SHARED_FS_TAG} on {SHARED_DIR}"),
            source,
        }),
    }
}

/// Brings `lo` up (an ioctl; netlink is for the real interfaces).
pub fn loopback_up() -> Result<(), Error> {
    // SAFETY: plain socket(2); the fd is owned and closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::Loopback {
            what: "socket for",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    let res = (|| {
        // SAFETY: SIOCGIFFLAGS reads into our ifreq, which outlives the call.
        if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
            return Err(Error::Loopback {
                what: "SIOCGIFFLAGS",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS filled in.
        unsafe {
            // IFF_UP | IFF_RUNNING is 0x41: it fits the short.
            ifr.ifr_ifru.ifru_flags |=
                libc::c_short::try_from(libc::IFF_UP | libc::IFF_RUNNING).unwrap_or(1);
        }
        // SAFETY: SIOCSIFFLAGS reads our ifreq.
        if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) } < 0 {
            return Err(Error::Loopback {
                what: "SIOCSIFFLAGS",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    })();
    // SAFETY: fd is ours and not used after.
    unsafe { libc::close(fd) };
    res
}

/// Hands every controller the root offers down to the `husk` cgroup that holds the
/// containers. Returns the controllers.
pub fn enable_controllers(root: &Path) -> Result<Vec<String>, Error> {
    let path = root.join("cgroup.controllers");
    let avail = match std::fs::read_to_string(&path) {
        Ok(a) => a,
        Err(source) => return Err(Error::Controllers { path, source }),
    };
    let ctrls: Vec<String> = avail.split_whitespace().map(String::from).collect();
    let enable: String = ctrls.iter().map(|c| format!("+{c} ")).collect();
    let husk = root.join("husk");
    create_dir(&husk)?;
    for dir in [root, husk.as_path()] {
        std::fs::write(dir.join("cgroup.subtree_control"), enable.trim()).map_err(|source| {
            Error::Enable {
                controllers: enable.trim().into(),
                dir: dir.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(ctrls)
}

/// Moves the agent from the initramfs (rootfs) onto a tmpfs root, as `switch_root` does.
///
/// Why: `pivot_root(2)` refuses to work while the caller's root is the initial rootfs (it has
/// no parent mount), and containers pivot_root into their rootfs. The initramfs holds only
/// `/init` (this binary) and empty mount points, so the move costs one copy of the binary.
pub fn switch_to_tmpfs_root() -> Result<(), Error> {
    let new = "/.husk-root";
    let io = |step: String| move |source| Error::Root { step, source };
    let sys = |step: String| move |source| Error::RootSys { step, source };
    mount_one("tmpfs", new, MsFlags::MS_NOSUID, Some("mode=0755"))?;
    for d in ["dev", "proc", "sys", "run", "tmp"] {
        create_dir(format!("{new}/{d}"))?;
    }
    std::fs::copy("/init", format!("{new}/init")).map_err(io(format!("copying /init to {new}")))?;
    // The initramfs copy is no longer needed; its memory is the guest's.
    let _ = std::fs::remove_file("/init");
    std::env::set_current_dir(new).map_err(io(format!("chdir {new}")))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys(format!("moving {new} onto /")))?;
    nix::unistd::chroot(".").map_err(sys("chroot into the new root".into()))?;
    std::env::set_current_dir("/").map_err(io("chdir /".into()))?;
    Ok(())
}
