//! What every PID 1 must do: mount the kernel file systems and reap orphans.

use nix::mount::{mount, MsFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Mounts proc, sysfs, devtmpfs and tmpfs on /run and /tmp (all but /dev `nosuid,nodev`).
pub fn mount_basics() -> Result<(), String> {
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    let mounts: [(&str, &str, MsFlags, Option<&str>); 5] = [
        ("proc", "/proc", common, None),
        ("sysfs", "/sys", common, None),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=0755")),
        ("tmpfs", "/run", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755")),
        ("tmpfs", "/tmp", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777")),
    ];
    for (fstype, target, flags, data) in mounts {
        mount(Some(fstype), target, Some(fstype), flags, data)
            .map_err(|e| format!("mount {fstype} on {target}: {e}"))?;
    }
    Ok(())
}

/// Blocks SIGCHLD in every thread and reaps children on a dedicated thread as they exit.
/// Must run before any other thread is started (the mask is inherited).
pub fn start_reaper() -> Result<(), String> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.thread_block().map_err(|e| format!("blocking SIGCHLD: {e}"))?;
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || loop {
            if set.wait().is_err() {
                continue;
            }
            // One SIGCHLD may stand for several exits: reap until none is left.
            while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                if matches!(status, WaitStatus::StillAlive) {
                    break;
                }
            }
        })
        .map_err(|e| format!("spawning the reaper thread: {e}"))?;
    Ok(())
}
