//! Gathering one scrape: each shim's snapshot from its metrics socket, and what /proc says of
//! the processes under each shim (the VMM and its helpers). Anything that vanishes half-way —
//! a sandbox ending, a process exiting — is skipped, never an error.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::metrics::{Snapshot, SNAPSHOT_VERSION};

/// How long a shim may take to answer (it asks its guest, with a shorter deadline).
pub(crate) const SHIM_TIMEOUT: Duration = Duration::from_secs(2);

/// A larger answer is not a snapshot.
const MAX_SNAPSHOT: u64 = 4 << 20;

/// What a process is to its sandbox, from its name (`comm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Shim,
    /// A fork of the shim that never exec'd: the jail's supervisor of a jailed program (see
    /// `husk_hypervisor::jail`), the program's parent.
    JailSupervisor,
    /// The keeper of a VM that came from the warm pool (`crate::pool::keeper`): the VM's
    /// processes are under it, not under the shim.
    PoolKeeper,
    Qemu,
    HuskVmm,
    Virtiofsd,
    VhostVsock,
    Other,
}

impl Role {
    /// `comm` is at most 15 bytes: `qemu-system-x86`, `vhost-device-vs`, `containerd-shim`.
    pub fn of(comm: &str) -> Self {
        if comm.starts_with("containerd-shim") {
            Role::Shim
        } else if comm.starts_with("qemu-system") {
            Role::Qemu
        } else if comm == "husk-vmm" {
            Role::HuskVmm
        } else if comm == "virtiofsd" {
            Role::Virtiofsd
        } else if comm.starts_with("vhost-device-vs") {
            Role::VhostVsock
        } else {
            Role::Other
        }
    }

    /// The `process` label.
    pub fn label(self) -> &'static str {
        match self {
            Role::Shim => "shim",
            Role::JailSupervisor => "jail-supervisor",
            Role::PoolKeeper => "pool-keeper",
            Role::Qemu => "qemu",
            Role::HuskVmm => "husk-vmm",
            Role::Virtiofsd => "virtiofsd",
            Role::VhostVsock => "vhost-device-vsock",
            Role::Other => "other",
        }
    }
}

/// The fields of /proc/PID/stat the monitor uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub ppid: u32,
    pub comm: String,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub threads: u64,
}

/// Parses /proc/PID/stat. `comm` is in parentheses and may hold spaces or `)`: the last `)`
/// ends it.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    // After ")": state(3) ppid(4) … utime(14) stime(15) … num_threads(20); index 0 = state.
    let f: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        ppid: u32::try_from(num(1)?).ok()?,
        comm,
        cpu_ticks: num(11)?.saturating_add(num(12)?),
        threads: num(17)?,
    })
}

/// Every process's stat, by PID.
pub(crate) fn scan_proc() -> HashMap<u32, Stat> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(s) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(parse_stat)
        {
            out.insert(pid, s);
        }
    }
    out
}

/// `root` and all its descendants in `procs`.
pub fn tree(procs: &HashMap<u32, Stat>, root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, s) in procs {
        children.entry(s.ppid).or_default().push(*pid);
    }
    let mut out = Vec::new();
    if !procs.contains_key(&root) {
        return out;
    }
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        out.push(p);
        if let Some(c) = children.get(&p) {
            todo.extend(c.iter().copied().filter(|c| !out.contains(c)));
        }
    }
    out
}

/// `Key:   123 kB` of /proc/PID/smaps_rollup (or status), in bytes.
pub(crate) fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|k| k.saturating_mul(1024))
}

/// `key: 123` of /proc/PID/io.
pub(crate) fn io_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// One role's processes under a shim, summed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub processes: u64,
    pub cpu_seconds: f64,
    pub threads: u64,
    pub rss_bytes: u64,
    pub pss_bytes: u64,
    pub open_fds: u64,
    /// `rchar`/`wchar` of /proc/PID/io: bytes through read/write-family system calls.
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// The role of `pid` in the tree of the shim `shim_pid`: by its name, except that a process
/// under the shim running the shim's own program is a jail supervisor (its name is the thread
/// that forked it).
fn role_in_tree(pid: u32, stat: &Stat, shim_pid: u32, shim_exe: Option<&Path>) -> Role {
    if pid == shim_pid {
        return Role::Shim;
    }
    match Role::of(&stat.comm) {
        Role::Other | Role::Shim
            if shim_exe.is_some()
                && std::fs::read_link(format!("/proc/{pid}/exe"))
                    .ok()
                    .as_deref()
                    == shim_exe =>
        {
            Role::JailSupervisor
        }
        role => role,
    }
}

/// The processes of the tree under `shim_pid` and, for a VM from the warm pool, the tree
/// under its keeper `keeper_pid`, summed by role. A process that exits while it is read still
/// counts with what was read of it.
pub(crate) fn usage(
    procs: &HashMap<u32, Stat>,
    shim_pid: u32,
    keeper_pid: Option<u32>,
    ticks_per_second: f64,
) -> BTreeMap<Role, Usage> {
    let mut out: BTreeMap<Role, Usage> = BTreeMap::new();
    let shim_exe = std::fs::read_link(format!("/proc/{shim_pid}/exe")).ok();
    let mut pids = tree(procs, shim_pid);
    if let Some(k) = keeper_pid.filter(|k| *k != shim_pid) {
        pids.extend(
            tree(procs, k)
                .into_iter()
                .filter(|p| !pids.contains(p))
                .collect::<Vec<_>>(),
        );
    }
    for pid in pids {
        let Some(stat) = procs.get(&pid) else {
            continue;
        };
        let role = if Some(pid) == keeper_pid {
            Role::PoolKeeper
        } else {
            role_in_tree(pid, stat, shim_pid, shim_exe.as_deref())
        };
        let u = out.entry(role).or_default();
        u.processes += 1;
        #[allow(clippy::cast_precision_loss)]
        let ticks = stat.cpu_ticks as f64;
        u.cpu_seconds += ticks / ticks_per_second;
        u.threads += stat.threads;
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        u.rss_bytes += kib_field(&rollup, "Rss").unwrap_or(0);
        u.pss_bytes += kib_field(&rollup, "Pss").unwrap_or(0);
        u.open_fds += std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        if matches!(role, Role::Virtiofsd | Role::VhostVsock) {
            let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
            u.read_bytes += io_field(&io, "rchar").unwrap_or(0);
            u.write_bytes += io_field(&io, "wchar").unwrap_or(0);
        }
    }
    out
}

/// The sandbox directories under the state root (everything but dot entries).
pub(crate) fn sandbox_dirs(state_root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(state_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Why a sandbox was skipped in a scrape.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("{socket}: {source}")]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{socket}: not a snapshot: {source}")]
    Parse {
        socket: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{socket}: snapshot version {found}, this monitor reads {SNAPSHOT_VERSION} — run the monitor of the shim's version")]
    Version { socket: PathBuf, found: u32 },
}

/// Asks the shim of the sandbox in `dir` for its snapshot.
pub(crate) fn fetch(dir: &Path) -> Result<Snapshot, FetchError> {
    let socket = dir.join("metrics.sock");
    let io = |source| FetchError::Io {
        socket: socket.clone(),
        source,
    };
    let stream = UnixStream::connect(&socket).map_err(io)?;
    stream.set_read_timeout(Some(SHIM_TIMEOUT)).map_err(io)?;
    let mut buf = Vec::new();
    stream
        .take(MAX_SNAPSHOT)
        .read_to_end(&mut buf)
        .map_err(io)?;
    let snap: Snapshot = serde_json::from_slice(&buf).map_err(|source| FetchError::Parse {
        socket: socket.clone(),
        source,
    })?;
    if snap.version != SNAPSHOT_VERSION {
        return Err(FetchError::Version {
            socket,
            found: snap.version,
        });
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_a_strange_comm() {
        let text = "4242 (a b) c)) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 123 1000 50 18446744073709551615";
        let s = parse_stat(text).unwrap();
        assert_eq!(s.comm, "a b) c)");
        assert_eq!(s.ppid, 17);
        assert_eq!(s.cpu_ticks, 300);
        assert_eq!(s.threads, 7);
        assert_eq!(parse_stat("1 (x) S"), None);
    }

    #[test]
    fn roles_from_comm() {
        assert_eq!(Role::of("containerd-shim"), Role::Shim);
        assert_eq!(Role::of("qemu-system-x86"), Role::Qemu);
        assert_eq!(Role::of("vhost-device-vs"), Role::VhostVsock);
        assert_eq!(Role::of("virtiofsd"), Role::Virtiofsd);
        assert_eq!(Role::of("husk-vmm"), Role::HuskVmm);
        assert_eq!(Role::of("sh"), Role::Other);
    }

    #[test]
    fn a_tree_is_the_root_and_its_descendants() {
        let p = |ppid| Stat {
            ppid,
            comm: "x".into(),
            cpu_ticks: 0,
            threads: 1,
        };
        let procs: HashMap<u32, Stat> = [
            (10, p(1)),
            (11, p(10)),
            (12, p(11)),
            (13, p(10)),
            (20, p(1)),
        ]
        .into();
        let mut t = tree(&procs, 10);
        t.sort_unstable();
        assert_eq!(t, [10, 11, 12, 13]);
        assert!(tree(&procs, 99).is_empty());
    }

    #[test]
    fn a_pooled_vms_keeper_and_its_tree_count_for_the_sandbox() {
        // Our own process stands in for the shim, a child of ours for the keeper.
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let keeper = child.id();
        let mut procs = scan_proc();
        // As seen from the monitor: the keeper is not under the shim.
        if let Some(s) = procs.get_mut(&keeper) {
            s.ppid = 1;
        }
        let without = usage(&procs, me, None, 100.0);
        assert!(!without.contains_key(&Role::PoolKeeper), "{without:?}");
        let with = usage(&procs, me, Some(keeper), 100.0);
        assert_eq!(
            with.get(&Role::PoolKeeper).map(|u| u.processes),
            Some(1),
            "{with:?}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn fields_of_smaps_rollup_and_io() {
        let rollup = "00400000-7fff [rollup]\nRss:                1024 kB\nPss:                 512 kB\nPss_Anon: 1 kB\n";
        assert_eq!(kib_field(rollup, "Rss"), Some(1 << 20));
        assert_eq!(kib_field(rollup, "Pss"), Some(512 << 10));
        let io = "rchar: 4096\nwchar: 100\nsyscr: 3\n";
        assert_eq!(io_field(io, "rchar"), Some(4096));
        assert_eq!(io_field(io, "wchar"), Some(100));
    }

    #[test]
    fn a_fork_of_the_shim_that_never_exec_d_is_a_jail_supervisor() {
        // This test binary plays the shim.
        let me = std::process::id();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let stat = |comm: &str| Stat {
            ppid: 1,
            comm: comm.into(),
            cpu_ticks: 0,
            threads: 1,
        };
        assert_eq!(role_in_tree(me, &stat("x"), me, Some(&exe)), Role::Shim);
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let sleep = child.id();
        let other = role_in_tree(sleep, &stat("sleep"), me, Some(&exe));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(other, Role::Other);
        // A thread of ours has our exe, as a forked child that never exec'd would.
        let tid = u32::try_from(nix::unistd::gettid().as_raw()).unwrap();
        assert_eq!(
            role_in_tree(tid, &stat("vm-pod"), me, Some(&exe)),
            Role::JailSupervisor
        );
        assert_eq!(
            role_in_tree(tid, &stat("qemu-system-x86"), me, Some(&exe)),
            Role::Qemu
        );
    }

    #[test]
    fn our_own_process_tree_is_measured() {
        let procs = scan_proc();
        let me = std::process::id();
        assert!(procs.contains_key(&me));
        let u = usage(&procs, me, None, 100.0);
        let total: u64 = u.values().map(|u| u.processes).sum();
        assert!(total >= 1, "{u:?}");
        let mine = u.values().find(|u| u.rss_bytes > 0).expect("an RSS");
        assert!(mine.open_fds > 0 && mine.threads > 0, "{mine:?}");
    }
}
