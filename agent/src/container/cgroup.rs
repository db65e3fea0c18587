//! A container's cgroup v2: created by the agent under `<root>/husk/<id>`, limits written from
//! OCI `linux.resources`, frozen and thawed, read for stats and OOM kills, removed with it.
//! Device rules become an eBPF program attached to it ([`devices`]).

mod bpf;
mod bpf_syscall;
pub mod devices;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

/// Why a container's cgroup could not be made, changed or removed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating cgroup {}: {source} — the agent needs cgroup2 mounted with a `husk` child it may write", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {value:?} to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// cgroup.events did not show the asked freezer state in time.
    #[error("{}: not {} within 10 s — a process in it may be stuck in the kernel", path.display(), if *frozen { "frozen" } else { "thawed" })]
    Freeze { path: PathBuf, frozen: bool },
    /// The directory stayed busy after cgroup.kill.
    #[error("removing cgroup {}: {source} — a process in it did not die within 5 s", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Devices(#[from] devices::Error),
}

#[derive(Debug, Clone)]
pub(crate) struct Cgroup {
    pub path: PathBuf,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), Error> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|source| Error::Write {
        path,
        value: value.into(),
        source,
    })
}

fn read(dir: &Path, file: &str) -> Result<String, Error> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).map_err(|source| Error::Read { path, source })
}

/// `key value` lines (cpu.stat, memory.events, …) → the value of `key`.
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A limit file's value: `max` is no limit (0 here).
fn limit(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// The cgroup v2 file writes that `linux.resources` asks for, in order.
pub fn resource_writes(r: &LinuxResources) -> Vec<(&'static str, String)> {
    let mut w = Vec::new();
    if let Some(cpu) = r.cpu() {
        if let Some(shares) = cpu.shares() {
            // The conversion runc and crun use: shares [2, 262144] → weight [1, 10000].
            let s = shares.clamp(2, 262_144);
            w.push(("cpu.weight", (1 + ((s - 2) * 9999) / 262_142).to_string()));
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            w.push((
                "cpu.max",
                format!("{quota} {}", cpu.period().unwrap_or(100_000)),
            ));
        }
        if let Some(cpus) = cpu.cpus() {
            w.push(("cpuset.cpus", cpus.clone()));
        }
        if let Some(mems) = cpu.mems() {
            w.push(("cpuset.mems", mems.clone()));
        }
    }
    if let Some(mem) = r.memory() {
        if let Some(res) = mem.reservation() {
            w.push(("memory.low", res.to_string()));
        }
        if let Some(l) = mem.limit() {
            w.push((
                "memory.max",
                if l < 0 { "max".into() } else { l.to_string() },
            ));
            // No swap for containers unless asked: a limit must OOM-kill, not swap.
            if mem.swap().is_none() {
                w.push(("memory.swap.max", "0".into()));
            }
        }
        if let (Some(s), Some(l)) = (mem.swap(), mem.limit()) {
            // OCI swap is memory+swap; v2 swap.max is swap alone.
            let v = if s < 0 {
                "max".into()
            } else {
                (s - l).max(0).to_string()
            };
            w.push(("memory.swap.max", v));
        }
    }
    if let Some(p) = r.pids() {
        let l = p.limit();
        w.push((
            "pids.max",
            if l <= 0 { "max".into() } else { l.to_string() },
        ));
    }
    if let Some(u) = r.unified() {
        let mut keys: Vec<_> = u.iter().collect();
        keys.sort();
        for (k, v) in keys {
            // Only the names cgroup v2 knows; the kernel rejects the rest.
            if let Some(name) = KNOWN_UNIFIED.iter().find(|n| **n == k.as_str()) {
                w.push((name, v.clone()));
            }
        }
    }
    w
}

/// `linux.resources.unified` keys the agent passes through.
const KNOWN_UNIFIED: [&str; 9] = [
    "cpu.weight",
    "cpu.max",
    "memory.max",
    "memory.high",
    "memory.low",
    "memory.swap.max",
    "memory.oom.group",
    "pids.max",
    "io.weight",
];

/// Cumulative figures for StatsContainer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub memory_current: u64,
    pub memory_max: u64,
    pub pids_current: u64,
    pub pids_max: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    pub oom_kills: u64,
}

impl Cgroup {
    /// Creates `<root>/husk/<id>` and applies `resources`. On error nothing is left behind.
    pub fn create(
        root: &Path,
        id: &str,
        resources: Option<&LinuxResources>,
    ) -> Result<Self, Error> {
        let path = root.join("husk").join(id);
        if let Err(source) = std::fs::create_dir(&path) {
            return Err(Error::Create { path, source });
        }
        let cg = Self { path };
        if let Some(r) = resources {
            if let Err(e) = cg.update(r) {
                let _ = cg.remove();
                return Err(e);
            }
        }
        Ok(cg)
    }

    pub fn update(&self, r: &LinuxResources) -> Result<(), Error> {
        // Checked before anything is written: a bad rule changes nothing. No rules: the
        // device program (if any) stays as it is.
        let devices = match r.devices().as_deref() {
            Some(d) if !d.is_empty() => Some(devices::compile(d)?),
            _ => None,
        };
        for (file, value) in resource_writes(r) {
            // memory.swap.max is absent without swap support: nothing to limit then.
            if file == "memory.swap.max" && !self.path.join(file).exists() {
                continue;
            }
            write(&self.path, file, &value)?;
        }
        if let Some(prog) = devices {
            devices::install(&self.path, &prog)?;
        }
        Ok(())
    }

    /// Freezes (`true`) or thaws, and waits until the kernel says it is done.
    pub(crate) fn freeze(&self, frozen: bool) -> Result<(), Error> {
        write(&self.path, "cgroup.freeze", if frozen { "1" } else { "0" })?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if read(&self.path, "cgroup.events")?
                .lines()
                .any(|l| l == want)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Freeze {
                    path: self.path.clone(),
                    frozen,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn pids(&self) -> Result<Vec<u32>, Error> {
        Ok(read(&self.path, "cgroup.procs")?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    pub fn oom_kills(&self) -> u64 {
        read(&self.path, "memory.events")
            .ok()
            .and_then(|t| keyed(&t, "oom_kill"))
            .unwrap_or(0)
    }

    pub fn stats(&self) -> Stats {
        let cpu = read(&self.path, "cpu.stat").unwrap_or_default();
        let mut s = Stats {
            cpu_usage_usec: keyed(&cpu, "usage_usec").unwrap_or(0),
            cpu_user_usec: keyed(&cpu, "user_usec").unwrap_or(0),
            cpu_system_usec: keyed(&cpu, "system_usec").unwrap_or(0),
            memory_current: read(&self.path, "memory.current")
                .map(|t| limit(&t))
                .unwrap_or(0),
            memory_max: read(&self.path, "memory.max")
                .map(|t| limit(&t))
                .unwrap_or(0),
            pids_current: read(&self.path, "pids.current")
                .map(|t| limit(&t))
                .unwrap_or(0),
            pids_max: read(&self.path, "pids.max").map(|t| limit(&t)).unwrap_or(0),
            oom_kills: self.oom_kills(),
            ..Stats::default()
        };
        // io.stat: "MAJ:MIN rbytes=N wbytes=N rios=N …" per device.
        for line in read(&self.path, "io.stat").unwrap_or_default().lines() {
            for kv in line.split_whitespace().skip(1) {
                match kv.split_once('=') {
                    Some(("rbytes", v)) => s.io_read_bytes += v.parse().unwrap_or(0),
                    Some(("wbytes", v)) => s.io_write_bytes += v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        s
    }

    /// Kills what is left (cgroup.kill) and removes the directory.
    pub fn remove(&self) -> Result<(), Error> {
        if !self.path.exists() {
            return Ok(());
        }
        let _ = write(&self.path, "cgroup.kill", "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                // Busy while the killed processes are being reaped.
                Err(source) if Instant::now() >= deadline => {
                    return Err(Error::Remove {
                        path: self.path.clone(),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_become_cgroup_v2_writes() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":33554432},"pids":{"limit":16},"cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0"}}"#,
        )
        .unwrap();
        let w = resource_writes(&r);
        let get = |k: &str| w.iter().find(|(f, _)| *f == k).map(|(_, v)| v.as_str());
        assert_eq!(get("memory.max"), Some("33554432"));
        assert_eq!(get("memory.swap.max"), Some("0"));
        assert_eq!(get("pids.max"), Some("16"));
        assert_eq!(get("cpu.weight"), Some("39"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("cpuset.cpus"), Some("0"));
    }

    #[test]
    fn keyed_files() {
        assert_eq!(
            keyed("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n", "oom_kill"),
            Some(1)
        );
        assert_eq!(keyed("usage_usec 12\n", "user_usec"), None);
    }
}
