//! Leak accounting for soak runs (`tests/tests/soak.rs`, `cargo xtask soak`): what the runtime
//! holds on the host, counted for one containerd and the sandboxes a run made, so that other
//! containerds and sandboxes on the machine do not count. A [`Sample`] is taken when no pod of
//! the run but its long-lived sentinel is up; [`judge`] says what grew beyond noise.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a soak run counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sample {
    /// Cycles done when it was taken.
    pub cycle: usize,
    pub elapsed: Duration,
    /// The run's shims (and the jail supervisors forked from them), and every QEMU, husk-vmm,
    /// virtiofsd and vhost-device-vsock naming one of the run's sandboxes.
    pub processes: usize,
    pub containerd_fds: usize,
    pub containerd_rss_kib: u64,
    /// Mount points under the containerd's directory, naming one of the run's ids, or one of
    /// its network namespaces.
    pub mounts: usize,
    /// Taps (`*_husk`) on the host and in the run's network namespaces that still exist.
    pub taps: usize,
    /// Ports of the run's CNI bridges (the host ends of the pods' veths).
    pub veths: usize,
    /// The run's network namespaces that still exist.
    pub netns: usize,
    /// `/run/husk/<id>` directories and `/run/husk/.jail-ids` records of the run's sandboxes.
    pub state: usize,
    /// Host cgroups named after one of the run's ids.
    pub cgroups: usize,
    /// The sentinel pod's shim: open fds and threads.
    pub shim_fds: usize,
    pub shim_threads: usize,
}

impl Sample {
    /// The counts that must come back exactly to the baseline once the run's pods are gone.
    fn exact(&self) -> [(&'static str, usize); 7] {
        [
            ("runtime processes", self.processes),
            ("mounts", self.mounts),
            ("taps", self.taps),
            ("veths", self.veths),
            ("netns entries", self.netns),
            ("/run/husk entries", self.state),
            ("cgroups", self.cgroups),
        ]
    }
}

/// containerd's fds may differ by this much from the warmed-up baseline: idle gRPC/ttrpc
/// connections and its event subscribers come and go.
pub const CONTAINERD_FDS_NOISE: usize = 10;

/// The sentinel shim's threads may differ by this much from the warmed-up baseline: its ttrpc
/// server keeps a pool of workers that grows with concurrent requests (28 → 30 after the first
/// three execs at once, then steady, in the first runs).
pub const SHIM_THREADS_NOISE: usize = 4;

/// containerd's RSS may grow by this much (or by [`CONTAINERD_RSS_NOISE_PERCENT`], whichever
/// is larger) over the warmed-up baseline: Go's heap and its scavenger move in steps.
pub const CONTAINERD_RSS_NOISE_KIB: u64 = 24 * 1024;
pub const CONTAINERD_RSS_NOISE_PERCENT: u64 = 20;

/// Whether `line`'s `/run/husk/<x>` paths name one of `ids`.
fn names_a_sandbox(text: &str, ids: &HashSet<String>) -> bool {
    text.match_indices("/run/husk/").any(|(i, m)| {
        let rest = &text[i + m.len()..];
        let id: String = rest
            .chars()
            .take_while(|c| *c != '/' && *c != '\0' && *c != ' ' && *c != ',')
            .collect();
        ids.contains(&id)
    })
}

/// The interfaces of the network namespace at `path` (/proc/net/dev read from a short-lived
/// thread that entered it); none if it cannot be entered.
fn links_in(path: &Path) -> Vec<String> {
    let path = path.to_path_buf();
    std::thread::spawn(move || -> Option<Vec<String>> {
        let ns = std::fs::File::open(&path).ok()?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev").ok()?;
        Some(
            dev.lines()
                .skip(2)
                .filter_map(|l| Some(l.split_once(':')?.0.trim().to_string()))
                .collect(),
        )
    })
    .join()
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// The scope of one soak run, and the counting.
#[derive(Debug)]
pub struct Scope {
    pub containerd_pid: u32,
    /// containerd's gRPC socket: its shims' `-address`.
    pub containerd_socket: PathBuf,
    /// containerd's own directory (root, state, CRI's sandbox mounts).
    pub containerd_dir: PathBuf,
    /// The CNI bridges whose ports are counted.
    pub bridges: Vec<String>,
    /// The sentinel pod's shim, once known.
    pub sentinel_shim: Mutex<Option<u32>>,
    ids: Mutex<HashSet<String>>,
    netns: Mutex<HashSet<PathBuf>>,
}

impl Scope {
    pub fn new(
        containerd_pid: u32,
        containerd_socket: &Path,
        containerd_dir: &Path,
        bridges: &[String],
    ) -> Self {
        Self {
            containerd_pid,
            containerd_socket: containerd_socket.to_path_buf(),
            containerd_dir: containerd_dir.to_path_buf(),
            bridges: bridges.to_vec(),
            sentinel_shim: Mutex::new(None),
            ids: Mutex::default(),
            netns: Mutex::default(),
        }
    }

    /// A sandbox or container id the run made.
    pub fn add_id(&self, id: &str) {
        self.ids.lock().unwrap().insert(id.to_string());
    }

    /// A network namespace the run made (or CRI made for it), by its path.
    pub fn add_netns(&self, path: &Path) {
        self.netns.lock().unwrap().insert(path.to_path_buf());
    }

    /// How many ids the run has made so far.
    pub fn ids(&self) -> usize {
        self.ids.lock().unwrap().len()
    }

    fn processes(&self, ids: &HashSet<String>) -> usize {
        let address = format!("-address\0{}\0", self.containerd_socket.display());
        let mut n = 0;
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if !crate::process_alive(pid) {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let vm_side = ["qemu-system", "virtiofsd", "vhost-device-vs", "husk-vmm"]
                .iter()
                .any(|p| comm.starts_with(p));
            if cmd.contains(&address) || (vm_side && names_a_sandbox(&cmd, ids)) {
                n += 1;
            }
        }
        n
    }

    fn mounts(&self, ids: &HashSet<String>, netns: &HashSet<PathBuf>) -> usize {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| {
                let p = Path::new(m);
                p.starts_with(&self.containerd_dir)
                    || names_a_sandbox(m, ids)
                    || p.components().any(|c| {
                        let c = c.as_os_str().to_string_lossy();
                        ids.contains(c.as_ref())
                    })
                    || netns.contains(p)
                    || (m.starts_with("/run/netns/")
                        && netns.contains(
                            &Path::new("/var/run/netns")
                                .join(p.strip_prefix("/run/netns").unwrap_or(p)),
                        ))
            })
            .count()
    }

    fn taps(&self, netns: &HashSet<PathBuf>) -> usize {
        let host = std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with("_husk"))
            .count();
        let inside: usize = netns
            .iter()
            .filter(|p| p.exists())
            .map(|p| links_in(p).iter().filter(|l| l.ends_with("_husk")).count())
            .sum();
        host + inside
    }

    fn veths(&self) -> usize {
        self.bridges
            .iter()
            .map(|b| {
                std::fs::read_dir(Path::new("/sys/class/net").join(b).join("brif"))
                    .map(|d| d.count())
                    .unwrap_or(0)
            })
            .sum()
    }

    fn state(&self, ids: &HashSet<String>) -> usize {
        let dirs = std::fs::read_dir("/run/husk")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| ids.contains(e.file_name().to_string_lossy().as_ref()))
            .count();
        let jail = std::fs::read_dir("/run/husk/.jail-ids")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path()).is_ok_and(|owner| ids.contains(owner.trim()))
            })
            .count();
        dirs + jail
    }

    fn cgroups(&self, ids: &HashSet<String>) -> usize {
        // Up to four levels under each hierarchy: /<ns>/<id>, /k8s.io/<id>, /<parent>/<pod>/<id>.
        fn walk(dir: &Path, depth: usize, ids: &HashSet<String>) -> usize {
            if depth == 0 {
                return 0;
            }
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| {
                    usize::from(ids.contains(e.file_name().to_string_lossy().as_ref()))
                        + walk(&e.path(), depth - 1, ids)
                })
                .sum()
        }
        let mut n = 0;
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            for top in std::fs::read_dir(h.path()).into_iter().flatten().flatten() {
                let name = top.file_name().to_string_lossy().into_owned();
                if name.starts_with("husk-soak-") || name == "k8s.io" {
                    n += walk(&top.path(), 3, ids);
                }
            }
        }
        n
    }

    /// Counts everything now.
    pub fn sample(&self, cycle: usize, elapsed: Duration) -> Sample {
        let ids = self.ids.lock().unwrap().clone();
        let netns = self.netns.lock().unwrap().clone();
        let ctd = self.containerd_pid;
        let status = std::fs::read_to_string(format!("/proc/{ctd}/status")).unwrap_or_default();
        let field = |text: &str, key: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        let fds = |pid: u32| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| d.count())
                .unwrap_or(0)
        };
        let shim = *self.sentinel_shim.lock().unwrap();
        let shim_status = shim
            .map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default())
            .unwrap_or_default();
        Sample {
            cycle,
            elapsed,
            processes: self.processes(&ids),
            containerd_fds: fds(ctd),
            containerd_rss_kib: field(&status, "VmRSS:"),
            mounts: self.mounts(&ids, &netns),
            taps: self.taps(&netns),
            veths: self.veths(),
            netns: netns.iter().filter(|p| p.exists()).count(),
            state: self.state(&ids),
            cgroups: self.cgroups(&ids),
            shim_fds: shim.map_or(0, fds),
            shim_threads: usize::try_from(field(&shim_status, "Threads:")).unwrap_or(0),
        }
    }

    /// A sample once the exact counts are back at `baseline`'s (teardown finishes
    /// asynchronously for a moment after the last call returns), or after `settle`.
    pub fn settled_sample(
        &self,
        baseline: Option<&Sample>,
        cycle: usize,
        elapsed: Duration,
        settle: Duration,
    ) -> Sample {
        let deadline = Instant::now() + settle;
        loop {
            let s = self.sample(cycle, elapsed);
            // The sentinel's own exec of the last cycle may still hold its fifos for a moment
            // (the shim closes them once the reader has drained them): wait for those too.
            let back =
                baseline.map_or(true, |b| s.exact() == b.exact() && s.shim_fds <= b.shim_fds);
            if back || Instant::now() >= deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// What grew beyond noise, one sentence each; empty if nothing did. The exact counts are
/// compared with the first sample (the sentinel alone, before any cycle); containerd's fds and
/// RSS and the sentinel shim's fds and threads with the second (after a first round of cycles
/// has warmed them up), when there is one.
pub fn judge(samples: &[Sample]) -> Vec<String> {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return vec!["no sample taken".into()];
    };
    let mut out = Vec::new();
    for ((what, base), (_, now)) in first.exact().iter().zip(last.exact().iter()) {
        if now != base {
            out.push(format!(
                "{what}: {base} with the sentinel alone at the start, {now} after {} cycles",
                last.cycle
            ));
        }
    }
    let warm = samples.get(1).unwrap_or(first);
    if last.shim_fds != warm.shim_fds {
        out.push(format!(
            "the sentinel shim's fds: {} after {} cycles, {} after {}",
            warm.shim_fds, warm.cycle, last.shim_fds, last.cycle
        ));
    }
    if last.shim_threads > warm.shim_threads + SHIM_THREADS_NOISE {
        out.push(format!(
            "the sentinel shim's threads: {} after {} cycles, {} after {} (noise: {SHIM_THREADS_NOISE})",
            warm.shim_threads, warm.cycle, last.shim_threads, last.cycle
        ));
    }
    if last.containerd_fds > warm.containerd_fds + CONTAINERD_FDS_NOISE {
        out.push(format!(
            "containerd's fds: {} after {} cycles, {} after {} (noise: {CONTAINERD_FDS_NOISE})",
            last.containerd_fds, warm.cycle, last.containerd_fds, last.cycle
        ));
    }
    let noise =
        CONTAINERD_RSS_NOISE_KIB.max(warm.containerd_rss_kib * CONTAINERD_RSS_NOISE_PERCENT / 100);
    if last.containerd_rss_kib > warm.containerd_rss_kib + noise {
        out.push(format!(
            "containerd's RSS: {} KiB after {} cycles, {} KiB after {} (noise: {noise} KiB)",
            warm.containerd_rss_kib, warm.cycle, last.containerd_rss_kib, last.cycle
        ));
    }
    out
}

/// The samples as a Markdown table.
pub fn table(samples: &[Sample]) -> String {
    let mut t = String::from(
        "| cycles | elapsed | runtime procs | containerd fds | containerd RSS (MiB) | mounts | taps | veths | netns | /run/husk | cgroups | shim fds | shim threads |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for s in samples {
        let secs = s.elapsed.as_secs();
        t.push_str(&format!(
            "| {} | {}m{:02}s | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.cycle,
            secs / 60,
            secs % 60,
            s.processes,
            s.containerd_fds,
            s.containerd_rss_kib as f64 / 1024.0,
            s.mounts,
            s.taps,
            s.veths,
            s.netns,
            s.state,
            s.cgroups,
            s.shim_fds,
            s.shim_threads
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(cycle: usize) -> Sample {
        Sample {
            cycle,
            processes: 7,
            containerd_fds: 40,
            containerd_rss_kib: 50_000,
            mounts: 5,
            taps: 1,
            veths: 1,
            netns: 1,
            state: 2,
            cgroups: 1,
            shim_fds: 20,
            shim_threads: 9,
            ..Sample::default()
        }
    }

    #[test]
    fn nothing_grown_is_no_verdict() {
        let mut b = s(100);
        b.containerd_fds += CONTAINERD_FDS_NOISE;
        b.containerd_rss_kib += CONTAINERD_RSS_NOISE_KIB;
        assert!(judge(&[s(0), s(10), b]).is_empty());
    }

    #[test]
    fn any_exact_count_that_grew_is_named() {
        let mut b = s(100);
        b.mounts += 1;
        b.shim_fds += 2;
        let v = judge(&[s(0), s(10), b]);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(
            v[0].starts_with("mounts: 5 ") && v[0].contains("6 after 100 cycles"),
            "{v:?}"
        );
        assert!(
            v[1].contains("sentinel shim's fds: 20 after 10 cycles, 22 after 100"),
            "{v:?}"
        );
    }

    #[test]
    fn the_shims_thread_pool_may_warm_up() {
        let mut warm = s(10);
        warm.shim_threads += 2;
        let mut last = s(100);
        last.shim_threads += 2 + SHIM_THREADS_NOISE;
        assert!(judge(&[s(0), warm.clone(), last.clone()]).is_empty());
        last.shim_threads += 1;
        let v = judge(&[s(0), warm, last]);
        assert!(v.len() == 1 && v[0].contains("threads"), "{v:?}");
    }

    #[test]
    fn containerd_beyond_noise_is_named() {
        let mut b = s(1000);
        b.containerd_fds += CONTAINERD_FDS_NOISE + 1;
        b.containerd_rss_kib += 200_000;
        let v = judge(&[s(0), s(100), b]);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("containerd's fds"), "{v:?}");
        assert!(v[1].contains("containerd's RSS"), "{v:?}");
        // Warm-up growth (before the second sample) is not a leak.
        let mut warm = s(100);
        warm.containerd_rss_kib += 200_000;
        let mut last = warm.clone();
        last.cycle = 1000;
        assert!(judge(&[s(0), warm, last]).is_empty());
    }

    #[test]
    fn sandbox_paths_are_matched_by_whole_id() {
        let ids: HashSet<String> = ["pod-1".to_string()].into();
        assert!(names_a_sandbox(
            "qemu\0-chardev\0socket,path=/run/husk/pod-1/vm/qmp.sock",
            &ids
        ));
        assert!(!names_a_sandbox("/run/husk/pod-10/vm/qmp.sock", &ids));
        assert!(!names_a_sandbox("/run/husk/.jail-ids", &ids));
    }

    #[test]
    fn the_table_has_a_row_per_sample() {
        let t = table(&[s(0), s(100)]);
        assert_eq!(t.lines().count(), 4, "{t}");
        assert!(
            t.lines()
                .nth(3)
                .unwrap()
                .starts_with("| 100 | 0m00s | 7 | 40 | 48.8 |"),
            "{t}"
        );
    }
}
