//! A pooled VM boots in the background: its keeper, and so everything the keeper starts (the
//! VMM, virtiofsd, vhost-device-vsock, their threads), runs at the lowest CPU priority until
//! the VM is ready, then every thread of it is put back to the normal priority.
//!
//! Why: the pool refills the moment a VM is claimed, exactly when the claiming pod's own VM
//! needs the CPU. Measured on the 2-core development host (QEMU TCG, bench scenario 12): the
//! claimed VM's vsock connection and first agent call took 35–95 ms while its replacement
//! booted beside it, 5–10 ms on a quiet machine. A nice value is per thread in Linux and a new
//! thread takes its creator's, so one `setpriority` before the keeper's exec covers the whole
//! boot, and the way back walks every thread of every process below the keeper.

use std::path::Path;

/// The nice value a pooled VM boots at: the lowest priority.
pub const BOOT_NICE: libc::c_int = 19;

/// Sets the calling thread's nice value (for `pre_exec`: async-signal-safe, one syscall).
pub fn set_own_nice(nice: libc::c_int) -> std::io::Result<()> {
    // SAFETY: setpriority on the calling thread (who 0), integer arguments.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The nice value of thread `tid`, from `/proc/<tid>/stat` (field 19).
pub fn nice_of(tid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).ok()?;
    // The command may hold spaces and parentheses: the fields follow its last ')'.
    let rest = stat.rsplit_once(") ")?.1;
    rest.split_whitespace().nth(16)?.parse().ok()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `root` and every process below it, read from `/proc` (the processes of a jail's own PID
/// namespace included: `/proc` here is the host's).
pub fn tree(root: u32) -> Vec<u32> {
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let parents: std::collections::HashMap<u32, u32> = pids
        .iter()
        .filter_map(|p| Some((*p, parent_of(*p)?)))
        .collect();
    pids.into_iter()
        .filter(|p| {
            let mut at = *p;
            // Bounded: a parent chain is short, and a cycle cannot be (pids are a tree), but a
            // process that exits and whose pid is reused mid-walk must not loop us.
            for _ in 0..64 {
                if at == root {
                    return true;
                }
                match parents.get(&at) {
                    Some(pp) if *pp != at => at = *pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

/// Puts every thread of `root` and of every process below it at `nice`. Returns how many
/// threads could not be changed (they may have ended meanwhile).
pub fn renice_tree(root: u32, nice: libc::c_int) -> usize {
    let mut failed = 0;
    // Twice: a thread created while the first pass ran took its creator's old value.
    for _ in 0..2 {
        failed = 0;
        for pid in tree(root) {
            let tasks = std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("task"));
            for tid in tasks
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<libc::id_t>().ok())
            {
                // SAFETY: setpriority on one thread id, integer arguments.
                if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } < 0 {
                    failed += 1;
                }
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    #[test]
    fn a_tree_started_at_the_lowest_priority_is_put_back_whole() {
        // A process with a child and a grandchild, started as a keeper is.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sh -c 'sleep 30' & sleep 30"]);
        // SAFETY: pre_exec runs one async-signal-safe syscall.
        unsafe {
            cmd.pre_exec(|| set_own_nice(BOOT_NICE));
        }
        let mut child = cmd.spawn().unwrap();
        let root = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while tree(root).len() < 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "tree {:?}",
                tree(root)
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let all = tree(root);
        assert!(
            all.iter().all(|p| nice_of(*p) == Some(BOOT_NICE)),
            "{all:?}"
        );
        // Not our own process, nor anything outside the tree.
        assert!(!all.contains(&std::process::id()));
        if nix::unistd::Uid::effective().is_root() {
            assert_eq!(renice_tree(root, 0), 0);
            assert!(all.iter().all(|p| nice_of(*p) == Some(0)), "{all:?}");
        }
        for p in all.iter().rev() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.wait();
    }
}
