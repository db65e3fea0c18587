//! The containerd scenarios: container start (1), time to first output (2) with husk's boot
//! breakdown (4), and idle pods (exec latency 3, host memory 5, shim alone 9), density (6).
//! Each runs husk and runc under the same private containerd, alternating.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::breakdown::{log_offset_ms, Watcher};
use super::env::{Env, HUSK_RUNTIME, RUNC_RUNTIME};
use super::procfs::{self, Mem};
use super::results::{one_line, Row, Scenario, Series};
use super::runner::{alternate, ms, timed};

const DEADLINE: Duration = Duration::from_secs(120);

/// The two sides: husk (label names the backend) and runc.
pub struct Sides {
    pub husk: String,
    pub runc: String,
}

impl Sides {
    pub fn labels(&self) -> [&str; 2] {
        [&self.husk, &self.runc]
    }
    pub fn runtime(side: usize) -> &'static str {
        if side == 0 {
            HUSK_RUNTIME
        } else {
            RUNC_RUNTIME
        }
    }
    pub fn row(&self, metric: &str, unit: &str, v: [Vec<f64>; 2]) -> Row {
        let [h, b] = v;
        Row {
            metric: metric.into(),
            unit: unit.into(),
            husk: Series {
                backend: self.husk.clone(),
                samples: h,
            },
            baseline: Some(Series {
                backend: self.runc.clone(),
                samples: b,
            }),
        }
    }
    fn husk_row(&self, metric: &str, unit: &str, v: Vec<f64>) -> Row {
        Row {
            metric: metric.into(),
            unit: unit.into(),
            husk: Series {
                backend: self.husk.clone(),
                samples: v,
            },
            baseline: None,
        }
    }
}

fn run_args<'a>(env: &'a Env, runtime: &'a str, id: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["run", "--rm", "--runtime", runtime, env.image(), id];
    a.extend_from_slice(cmd);
    a
}

/// Scenario 1: `ctr run --rm … /bin/true`, wall time.
pub fn container_start(env: &Env, sides: &Sides, rounds: usize) -> Result<Scenario> {
    let mut sc = Scenario::new(
        1,
        "Container start",
        "`ctr run --rm --runtime R husk.local/busybox:latest ID /bin/true`, wall time from \
         spawning ctr to its exit (VM boot, container run and teardown included), after one \
         unrecorded warm-up run each.",
    );
    let v = alternate("start", sides.labels(), "ms", 1, rounds, |side| {
        let id = env.new_id("start");
        let mut c = env.ctr_cmd();
        c.args(run_args(env, Sides::runtime(side), &id, &["/bin/true"]));
        Ok(ms(timed(&mut c, DEADLINE)?.total))
    })?;
    sc.rows.push(sides.row("ctr run --rm /bin/true", "ms", v));
    Ok(sc)
}

/// Phase names of scenario 4, in order.
pub const PHASES: [&str; 8] = [
    "ctr spawned → shim serving (containerd, shim start)",
    "shim serving → sandbox dir created (task Create, rootfs mount)",
    "sandbox dir → QEMU console open (virtiofsd, vhost-device-vsock, QEMU start)",
    "QEMU console open → guest kernel start (QEMU init and load, est.)",
    "guest kernel start → agent ready (guest clock)",
    "agent ready → sandbox ready (vsock connect, CreateSandbox)",
    "sandbox ready → first output (create + start container in the guest, echo)",
    "first output → ctr exit (exit, delete, VM teardown)",
];

/// Scenarios 2 and 4: time to first output, and husk's boot breakdown from the same runs.
pub fn first_output(env: &Env, sides: &Sides, rounds: usize) -> Result<(Scenario, Scenario)> {
    let mut s2 = Scenario::new(
        2,
        "Time to first output",
        "`ctr run --rm … ID echo hi`: from spawning ctr to the first byte on its stdout.",
    );
    let mut s4 = Scenario::new(
        4,
        "Boot breakdown (husk)",
        "From the same runs as scenario 2. No instrumentation was added to the runtime: the \
         bench polls `/run/husk/<id>/` and its `vm/console.log` every 2 ms (the directory appears \
         when the shim starts the sandbox, the log when QEMU opens its console), the agent's \
         ready line gives the guest's own ms since kernel start (kernel start is that line's \
         arrival minus those ms), and the shim's own info lines in containerd's log (`shim ID \
         serving`, `sandbox ID: VM …`) give their wall-clock times. Phases can be off by the \
         2 ms poll.",
    );
    let mut phases: Vec<Vec<f64>> = vec![Vec::new(); PHASES.len()];
    let mut incomplete = 0usize;
    let v = alternate("first output", sides.labels(), "ms", 0, rounds, |side| {
        let id = env.new_id("echo");
        let mut c = env.ctr_cmd();
        c.args(run_args(env, Sides::runtime(side), &id, &["echo", "hi"]));
        let t0 = Instant::now();
        let watcher = (side == 0).then(|| Watcher::start(&id, t0));
        let t = timed(&mut c, DEADLINE)?;
        let first = ms(t.first_byte.context("no output from echo")?);
        if let Some(w) = watcher {
            let seen = w.finish();
            let log = env.log();
            let serving = log_offset_ms(&log, &[&format!("shim {id} serving")], t.started_at);
            let sandbox = log_offset_ms(&log, &[&format!("sandbox {id}: VM")], t.started_at);
            match (serving, seen.state_dir, seen.console, seen.ready, sandbox) {
                (Some(sv), Some(dir), Some(con), Some((ready, since)), Some(sb)) => {
                    let (dir, con, ready) = (ms(dir), ms(con), ms(ready));
                    #[allow(clippy::cast_precision_loss)]
                    let kstart = ready - since as f64;
                    let pts = [sv, dir, con, kstart, ready, sb, first, ms(t.total)];
                    let mut prev = 0.0;
                    for (i, p) in pts.iter().enumerate() {
                        phases[i].push(p - prev);
                        prev = *p;
                    }
                }
                _ => incomplete += 1,
            }
        }
        Ok(first)
    })?;
    s2.rows.push(sides.row("first stdout byte", "ms", v));
    for (name, samples) in PHASES.iter().zip(phases) {
        s4.rows.push(sides.husk_row(name, "ms", samples));
    }
    if incomplete > 0 {
        s4.notes.push(format!(
            "{incomplete} run(s) could not be split (a log line or console event was not seen) and are left out."
        ));
    }
    Ok((s2, s4))
}

/// Scenario 5's rows that split the VMM's PSS (targets.rs reads them by these names).
pub(super) const VMM_CODE_BUFFER: &str =
    "VMM: anonymous executable mappings (TCG's translated-code buffer)";
pub(super) const VMM_BOOT_FILES: &str =
    "VMM: guest kernel and initramfs files it keeps mapped (page cache)";
pub(super) const VMM_PROGRAM: &str = "VMM: its program and libraries (page cache)";
pub(super) const VMM_OTHER_ANON: &str =
    "VMM: other anonymous memory (heap, malloc arenas, thread stacks, written data)";

/// How a pod's parts name the jail's supervisors (forks of the shim, one per jailed program).
pub(crate) const JAIL_SUPERVISORS: &str = "jail supervisors (forks of the shim)";

/// One idle pod's processes, measured.
pub(crate) struct PodMem {
    /// PSS outside guest RAM, summed over the pod's host processes, KiB.
    pub(crate) total: u64,
    /// Of `total`, anonymous memory (heap, arenas, stacks, buffers, written copies of file
    /// pages): the pod's own, which a second pod does not share.
    pub(crate) anon: u64,
    /// Of `total`, file pages (programs, libraries, the guest kernel and initramfs): page
    /// cache, split among every process that maps the same file, other pods' included.
    pub(crate) file: u64,
    /// husk: guest RAM touched (RSS of the memfd in the VMM).
    pub(crate) guest_touched: u64,
    pub(crate) shim_pss: u64,
    shim_threads: u64,
    /// (executable, PSS KiB) of each other process.
    pub(crate) parts: Vec<(String, u64)>,
    /// The VMM's memory, if the pod has one.
    vmm: Option<VmmMem>,
}

/// Where the VMM's PSS outside guest RAM is, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct VmmMem {
    /// Anonymous executable mappings: under TCG, the translated-code buffer.
    code_buffer: u64,
    /// The guest kernel and initramfs files (QEMU keeps them mapped: the kernel's ELF
    /// segments as ROMs it copies into guest RAM at reset, the initramfs for fw_cfg).
    boot_files: u64,
    /// Its program and shared libraries: file pages.
    program: u64,
    /// Every other anonymous page: heap, malloc arenas, thread stacks, written data.
    other_anon: u64,
}

impl VmmMem {
    /// Splits a VMM's [`Mem`] measured with its kernel and initramfs named.
    fn of(m: &Mem) -> Self {
        Self {
            code_buffer: m.code_buffer_kib,
            boot_files: m.named_files_pss_kib,
            program: m.file_pss_kib.saturating_sub(m.named_files_pss_kib),
            other_anon: m.anon_kib.saturating_sub(m.code_buffer_kib),
        }
    }
}

/// The values of a VMM's `-kernel` and `-initrd` (QEMU) or `--kernel` and `--initramfs`
/// (husk-vmm) arguments.
fn boot_files(argv: &[String]) -> Vec<&str> {
    argv.windows(2)
        .filter(|w| ["-kernel", "-initrd", "--kernel", "--initramfs"].contains(&w[0].as_str()))
        .map(|w| w[1].as_str())
        .collect()
}

/// The processes of pod `id` on `side`: its shim, and the rest (husk: the VM's processes and
/// the shim's own children; runc: the shim's children).
fn pod_processes<'a>(
    all: &'a [procfs::Proc],
    side: usize,
    id: &str,
) -> Result<(u32, Vec<&'a procfs::Proc>)> {
    let shim_exe = if side == 0 {
        "containerd-shim-husk"
    } else {
        "containerd-shim-runc"
    };
    let shim = procfs::shim_of(all, shim_exe, id)
        .with_context(|| format!("no {shim_exe} process for {id}"))?;
    let others: Vec<&procfs::Proc> = if side == 0 {
        // The VM's processes, and the shim's own children: a jailed program's supervisor is a
        // fork of the shim that stays (see the jail), sharing the shim's pages copy-on-write,
        // so PSS splits those pages between them.
        let needle = format!("/run/husk/{id}/");
        all.iter()
            .filter(|p| {
                p.pid != shim && (p.ppid == shim || p.argv.iter().any(|a| a.contains(&needle)))
            })
            .collect()
    } else {
        all.iter().filter(|p| p.ppid == shim).collect()
    };
    Ok((shim, others))
}

/// User + system CPU time (ms) that pod `id`'s processes have used so far.
pub(crate) fn pod_cpu_ms(side: usize, id: &str) -> Result<f64> {
    let all = procfs::processes();
    let (shim, others) = pod_processes(&all, side, id)?;
    Ok(std::iter::once(shim)
        .chain(others.iter().map(|p| p.pid))
        .filter_map(procfs::cpu_ms)
        .sum())
}

pub(crate) fn measure_pod(side: usize, id: &str) -> Result<PodMem> {
    let all = procfs::processes();
    let (shim, others) = pod_processes(&all, side, id)?;
    let shim_mem = procfs::mem(shim).context("reading the shim's smaps")?;
    let shim_name = all
        .iter()
        .find(|p| p.pid == shim)
        .map(|p| p.exe.clone())
        .unwrap_or_default();
    let mut total = shim_mem.pss_kib;
    let shim_split = procfs::split(shim).unwrap_or_default();
    let (mut anon, mut file) = (shim_split.anon_kib, shim_split.file_kib);
    let mut guest_touched = 0;
    let mut vmm = None;
    // Summed per executable: virtiofsd, for one, runs as two processes.
    let mut parts: std::collections::BTreeMap<String, u64> = Default::default();
    for p in others {
        let is_vmm = p.exe.starts_with("qemu-system") || p.exe == "husk-vmm";
        let names = if is_vmm {
            boot_files(&p.argv)
        } else {
            Vec::new()
        };
        let m: Mem = procfs::mem_with(p.pid, &names).unwrap_or_default();
        let split = procfs::split(p.pid).unwrap_or_default();
        total += m.pss_kib;
        anon += split.anon_kib;
        file += split.file_kib;
        guest_touched = guest_touched.max(m.guest_rss_kib);
        let part = if p.exe == shim_name {
            JAIL_SUPERVISORS.to_string()
        } else {
            p.exe.clone()
        };
        *parts.entry(part).or_default() += m.pss_kib;
        if is_vmm {
            vmm = Some(VmmMem::of(&m));
        }
    }
    let parts = parts.into_iter().collect();
    Ok(PodMem {
        total,
        anon,
        file,
        guest_touched,
        shim_pss: shim_mem.pss_kib,
        shim_threads: procfs::status_field(shim, "Threads").unwrap_or(0),
        parts,
        vmm,
    })
}

#[allow(clippy::cast_precision_loss)]
pub(super) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// How long scenario 5 watches an idle pod's CPU time. The pod's processes are read at its
/// start and end, so its own reading (a walk of /proc) is not in it.
const IDLE_CPU_WINDOW: Duration = Duration::from_secs(5);

/// Scenarios 3, 5 and 9: idle pods (one `sleep` container each), measured, then exec'd into.
#[allow(clippy::needless_range_loop)] // side indexes several arrays at once
pub fn idle_pods(env: &Env, sides: &Sides, rounds: usize, execs: usize) -> Result<[Scenario; 3]> {
    let mut s3 = Scenario::new(
        3,
        "Exec latency",
        format!(
            "`ctr task exec --exec-id E ID /bin/true` into a running idle container (`sleep`), \
             wall time; {execs} execs per pod, alternating, in each of {rounds} pod(s) per side."
        ),
    );
    let mut s5 = Scenario::new(
        5,
        "Host memory per idle pod",
        format!(
            "One idle `sleep` container per pod, measured 3 s after `ctr run -d` returned. husk: PSS \
         outside guest RAM summed over containerd-shim-husk-v2, QEMU, virtiofsd and \
         vhost-device-vsock (guest RAM is the shared memfd they all map; its touched pages \
         are shown separately, as the RSS of that memfd). runc: PSS of containerd-shim-runc-v2 \
         plus the container's processes. From /proc/PID/smaps. PSS splits each shared page \
         among every process that maps it, other engineers' QEMUs on this machine included, \
         so it moves with what else runs. Then the CPU time the same processes use while the \
         pod idles, over the next {IDLE_CPU_WINDOW:?} (ms of CPU per second: 10 is 1 % of a \
         core)."
        ),
    );
    let mut s9 = Scenario::new(
        9,
        "Shim alone",
        "The shim process of the same idle pods: PSS (from smaps) and threads.",
    );
    let mut total = [Vec::new(), Vec::new()];
    let mut shim_pss = [Vec::new(), Vec::new()];
    let mut threads = [Vec::new(), Vec::new()];
    let mut guest = Vec::new();
    let mut anon = [Vec::new(), Vec::new()];
    let mut file = [Vec::new(), Vec::new()];
    let mut vmm: [Vec<f64>; 4] = Default::default();
    let mut parts: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut exec = [Vec::new(), Vec::new()];
    let mut idle_cpu = [Vec::new(), Vec::new()];
    for r in 0..rounds {
        let ids = [env.new_id("idle"), env.new_id("idle")];
        let res = (|| -> Result<()> {
            for side in 0..2 {
                super::runner::check_interrupt()?;
                env.ctr_ok(&[
                    "run",
                    "-d",
                    "--runtime",
                    Sides::runtime(side),
                    env.image(),
                    &ids[side],
                    "sleep",
                    "100000",
                ])?;
            }
            std::thread::sleep(Duration::from_secs(3));
            for side in 0..2 {
                let m = measure_pod(side, &ids[side])?;
                total[side].push(mib(m.total));
                anon[side].push(mib(m.anon));
                file[side].push(mib(m.file));
                shim_pss[side].push(mib(m.shim_pss));
                #[allow(clippy::cast_precision_loss)]
                threads[side].push(m.shim_threads as f64);
                if side == 0 {
                    guest.push(mib(m.guest_touched));
                    if let Some(v) = m.vmm {
                        for (i, kib) in [v.code_buffer, v.boot_files, v.program, v.other_anon]
                            .into_iter()
                            .enumerate()
                        {
                            vmm[i].push(mib(kib));
                        }
                    }
                    for (exe, kib) in m.parts {
                        parts.entry(exe).or_default().push(mib(kib));
                    }
                }
                println!(
                    "    idle pod {}/{rounds} {}: {:.1} MiB PSS outside guest RAM, shim {:.1} MiB / {} threads",
                    r + 1,
                    sides.labels()[side],
                    mib(m.total),
                    mib(m.shim_pss),
                    m.shim_threads
                );
            }
            let before = [pod_cpu_ms(0, &ids[0])?, pod_cpu_ms(1, &ids[1])?];
            std::thread::sleep(IDLE_CPU_WINDOW);
            for side in 0..2 {
                let used = pod_cpu_ms(side, &ids[side])? - before[side];
                idle_cpu[side].push(used / IDLE_CPU_WINDOW.as_secs_f64());
            }
            let mut n = 0;
            let v = alternate("exec", sides.labels(), "ms", 0, execs, |side| {
                n += 1;
                let eid = format!("e{n}");
                let mut c = env.ctr_cmd();
                c.args(["task", "exec", "--exec-id", &eid, &ids[side], "/bin/true"]);
                Ok(ms(timed(&mut c, DEADLINE)?.total))
            })?;
            for side in 0..2 {
                exec[side].extend_from_slice(&v[side]);
            }
            Ok(())
        })();
        for id in &ids {
            let _ = env.remove(id);
        }
        res?;
    }
    s3.rows
        .push(sides.row("ctr task exec /bin/true", "ms", exec));
    s5.rows
        .push(sides.row("pod PSS outside guest RAM", "MiB", total));
    s5.rows.push(sides.row(
        "of which anonymous (the pod's own: heap, arenas, stacks, buffers)",
        "MiB",
        anon,
    ));
    s5.rows.push(sides.row(
        "of which file pages (programs, libraries, guest kernel and initramfs: shared with every pod)",
        "MiB",
        file,
    ));
    s5.rows
        .push(sides.husk_row("guest RAM touched (memfd RSS)", "MiB", guest));
    s5.rows.push(sides.row(
        "CPU while the pod idles (ms of CPU per second)",
        "ms/s",
        idle_cpu,
    ));
    for (exe, v) in parts {
        s5.rows
            .push(sides.husk_row(&format!("of which {exe} PSS"), "MiB", v));
    }
    if !vmm[0].is_empty() {
        let [code, boot, program, other] = vmm;
        for (what, v) in [
            (VMM_CODE_BUFFER, code),
            (VMM_BOOT_FILES, boot),
            (VMM_PROGRAM, program),
            (VMM_OTHER_ANON, other),
        ] {
            s5.rows.push(sides.husk_row(what, "MiB", v));
        }
    }
    s9.rows.push(sides.row("shim PSS", "MiB", shim_pss));
    s9.rows.push(sides.row("shim threads", "threads", threads));
    Ok([s3, s5, s9])
}

/// Scenario 6, density: `pods` idle pods started one after another, total time and host
/// memory (outside guest RAM, and guest RAM touched), then all removed; husk's batch, then
/// runc's. A pod that fails to start is a result too: it is counted, its error kept, and the
/// batch goes on.
pub fn density(env: &Env, sides: &Sides, pods: usize) -> Result<Scenario> {
    let mut sc = Scenario::new(
        6,
        "Density",
        format!(
            "{pods} idle pods (`ctr run -d … sleep`) started one after another on one side, \
             measured 3 s after the last, then all removed; then the other side. One batch per \
             side: the totals are single measurements (runs = 1); the per-pod start times are \
             one sample per pod."
        ),
    );
    let mut start_each = [Vec::new(), Vec::new()];
    let mut totals = [Vec::new(), Vec::new()];
    let mut mem_total = [Vec::new(), Vec::new()];
    let mut guest_total = Vec::new();
    let mut failures: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for side in 0..2 {
        let ids: Vec<String> = (0..pods).map(|_| env.new_id("dense")).collect();
        let mut started = Vec::new();
        let res = (|| -> Result<()> {
            let t0 = Instant::now();
            for (i, id) in ids.iter().enumerate() {
                super::runner::check_interrupt()?;
                let t = Instant::now();
                match env.ctr_ok(&[
                    "run",
                    "-d",
                    "--runtime",
                    Sides::runtime(side),
                    env.image(),
                    id,
                    "sleep",
                    "100000",
                ]) {
                    Ok(_) => {
                        start_each[side].push(ms(t.elapsed()));
                        started.push(id.clone());
                        println!(
                            "    density {}: pod {}/{pods} in {:.0} ms",
                            sides.labels()[side],
                            i + 1,
                            ms(t.elapsed())
                        );
                    }
                    Err(e) => {
                        println!(
                            "    density {}: pod {}/{pods} FAILED after {:.0} ms",
                            sides.labels()[side],
                            i + 1,
                            ms(t.elapsed())
                        );
                        failures[side].push(format!(
                            "pod {} after {:.0} ms: {}",
                            i + 1,
                            ms(t.elapsed()),
                            one_line(&format!("{e:#}"))
                        ));
                    }
                }
            }
            totals[side].push(t0.elapsed().as_secs_f64());
            std::thread::sleep(Duration::from_secs(3));
            let (mut sum, mut g) = (0u64, 0u64);
            for id in &started {
                let m = measure_pod(side, id)?;
                sum += m.total;
                g += m.guest_touched;
            }
            mem_total[side].push(mib(sum));
            if side == 0 {
                guest_total.push(mib(g));
            }
            Ok(())
        })();
        for id in &ids {
            let _ = env.remove(id);
        }
        res?;
    }
    let n = [pods - failures[0].len(), pods - failures[1].len()];
    sc.rows
        .push(sides.row("start of each pod", "ms", start_each));
    sc.rows
        .push(sides.row(&format!("all {pods} attempts made"), "s", totals));
    sc.rows.push(sides.row(
        &format!("pods started of {pods}"),
        "pods",
        [vec![n[0] as f64], vec![n[1] as f64]],
    ));
    sc.rows
        .push(sides.row("all started pods, PSS outside guest RAM", "MiB", mem_total));
    sc.rows
        .push(sides.husk_row("all started pods, guest RAM touched", "MiB", guest_total));
    for (label, fs) in sides.labels().iter().zip(&failures) {
        for f in fs {
            sc.notes.push(format!("{label} failed to start {f}"));
        }
    }
    Ok(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vmms_boot_files_are_the_values_of_its_kernel_and_initramfs_arguments() {
        let argv: Vec<String> = [
            "qemu-system-x86_64",
            "-m",
            "256M",
            "-kernel",
            "/usr/share/husk/vmlinux",
            "-initrd",
            "/usr/share/husk/initramfs.cpio",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            boot_files(&argv),
            ["/usr/share/husk/vmlinux", "/usr/share/husk/initramfs.cpio"]
        );
        let vmm: Vec<String> = ["husk-vmm", "--kernel", "/k", "--initramfs", "/i"]
            .map(String::from)
            .to_vec();
        assert_eq!(boot_files(&vmm), ["/k", "/i"]);
        assert!(boot_files(&["virtiofsd".to_string()]).is_empty());
    }

    #[test]
    fn a_vmms_memory_splits_into_four_parts_that_add_up_to_its_pss() {
        let m = Mem {
            pss_kib: 60_000,
            anon_kib: 30_000,
            code_buffer_kib: 16_000,
            file_pss_kib: 30_000,
            named_files_pss_kib: 15_000,
            ..Mem::default()
        };
        let v = VmmMem::of(&m);
        assert_eq!(
            v,
            VmmMem {
                code_buffer: 16_000,
                boot_files: 15_000,
                program: 15_000,
                other_anon: 14_000
            }
        );
        assert_eq!(
            v.code_buffer + v.boot_files + v.program + v.other_anon,
            m.pss_kib
        );
    }
}
