//! `cargo xtask bench`: husk against runc (both under one private containerd) and husk-vmm
//! against QEMU `microvm`, each scenario alternating the two sides, written to
//! `BENCHMARKS.md`, `benchmarks/bench.json` (every sample) and `benchmarks/start-latency.svg`.
//!
//! Modules: [`env`] (the private containerd and its cleanup), [`runner`] (alternation,
//! progress, timing a command), [`scenarios`] and [`vmm`] (what is measured), [`breakdown`]
//! (scenario 4's instruments), [`procfs`] (processes and their memory), [`stats`],
//! [`results`], [`report`] (Markdown + JSON) and [`chart`] (SVG). Figures are never written
//! by hand: the report is rendered from the samples of the run.
//!
//! `--only 5,12` runs only the steps that make those scenarios (one step can make several:
//! 2 and 4, 3, 5 and 9 come together) and writes its report where `--quick` writes, never
//! over BENCHMARKS.md.

pub mod breakdown;
pub mod chart;
pub mod cri_pool;
pub mod env;
pub mod io;
pub mod jail;
pub mod network;
pub mod pod_kvm;
pub mod pool;
pub mod procfs;
pub mod report;
pub mod results;
pub mod runner;
pub mod scenarios;
pub mod stats;
pub mod vmm;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use husk_hypervisor::host::{self, BackendChoice};
use husk_hypervisor::Accel;

use crate::run::{elapsed, step};
use crate::{demo, paths};
use results::{Results, Scenario};
use scenarios::Sides;

/// How many runs of what: the full bench, or `--quick` for a CI smoke run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    start: usize,
    first_output: usize,
    idle_pods: usize,
    execs: usize,
    density: usize,
    io_rounds: usize,
    net_rounds: usize,
    net_mib: usize,
    io_mib: u32,
    vmm: usize,
    vmm_mem: usize,
    vmm_linux: usize,
    /// Pods per side in scenario 14 (after a warm-up).
    pod_kvm: usize,
}

const FULL: Plan = Plan {
    start: 30,
    first_output: 20,
    idle_pods: 5,
    execs: 6,
    density: 10,
    io_rounds: 5,
    net_rounds: 20,
    net_mib: 64,
    io_mib: 256,
    vmm: 30,
    vmm_mem: 5,
    vmm_linux: 8,
    pod_kvm: 3,
};
const QUICK: Plan = Plan {
    start: 3,
    first_output: 2,
    idle_pods: 1,
    execs: 3,
    density: 2,
    io_rounds: 1,
    net_rounds: 3,
    net_mib: 8,
    io_mib: 32,
    vmm: 3,
    vmm_mem: 1,
    vmm_linux: 1,
    pod_kvm: 1,
};

/// Compilers and other benchmarks running beside us (they share the 2 cores).
fn busy_processes() -> Vec<String> {
    // Not us, nor the `cargo xtask` that runs us.
    let me = [std::process::id(), std::os::unix::process::parent_id()];
    let mut v: Vec<String> = procfs::processes()
        .into_iter()
        .filter(|p| !me.contains(&p.pid))
        .filter(|p| ["rustc", "cc1", "cc1plus", "ld", "cargo", "make"].contains(&p.exe.as_str()))
        .map(|p| p.exe)
        .collect();
    v.sort();
    v.dedup();
    v
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_gib = procfs_meminfo_gib();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let os = std::fs::read_to_string("/etc/debian_version")
        .map(|v| format!("Debian {}", v.trim()))
        .unwrap_or_default();
    let kvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "/dev/kvm is kvm_pvm"
    } else {
        "/dev/kvm present"
    };
    format!(
        "{cores} × {cpu}, {mem_gib:.0} GiB RAM, {os}, host kernel {}; {kvm}",
        kernel.trim()
    )
}

fn procfs_meminfo_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0)
}

/// At most `n` characters of `s`, with an ellipsis if cut.
fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

pub(crate) fn utc_now() -> String {
    crate::run::output(std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The bench's steps: the scenarios each one makes, in the order they run. A new scenario
/// adds its step here (or its number to the step that makes it) and runs under
/// `if only.wants(&[N])` in [`run`]; `--only` refuses a number that is not here.
const STEPS: [&[u32]; 11] = [
    &[1],
    &[2, 4],
    &[3, 5, 9],
    &[6],
    &[7],
    &[10],
    &[11],
    &[12],
    &[13],
    &[8],
    &[14],
];

/// The steps that run without the bench's containerd: scenario 8 (VMMs alone), 13 (its own
/// containerd with CRI on) and 14 (its own containerd where husk-vmm runs pods: L1 here).
const OWN_SETUP: [&[u32]; 3] = [&[8], &[13], &[14]];

/// Which scenarios a run makes: every one, or those `--only` names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Only(Vec<u32>);

impl Only {
    /// `numbers` from `--only` (empty: every scenario). A number no step makes is refused,
    /// naming the numbers there are.
    pub fn new(numbers: &[u32]) -> Result<Self> {
        let known: Vec<u32> = STEPS.iter().flat_map(|s| s.iter().copied()).collect();
        if let Some(n) = numbers.iter().find(|n| !known.contains(n)) {
            let mut k = known.clone();
            k.sort_unstable();
            bail!(
                "--only {n}: no scenario has that number — give some of {}",
                k.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            );
        }
        Ok(Self(numbers.to_vec()))
    }

    /// Whether every scenario runs.
    pub fn all(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the step that makes `scenarios` runs.
    pub fn wants(&self, scenarios: &[u32]) -> bool {
        self.all() || scenarios.iter().any(|n| self.0.contains(n))
    }

    /// Whether any step under the bench's containerd runs (every one but [`OWN_SETUP`]).
    fn wants_containerd(&self) -> bool {
        STEPS
            .iter()
            .filter(|s| !OWN_SETUP.contains(s))
            .any(|s| self.wants(s))
    }
}

pub fn run(quick: bool, only: &Only) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("cargo xtask bench needs root (containerd, virtiofsd, /run/husk) — run it as root");
    }
    let plan = if quick { QUICK } else { FULL };
    demo::prepare(false)?;
    runner::catch_interrupts()?;
    let began = Instant::now();
    // The backend the shim takes for the bench's pods (they have no network).
    let backend = match host::detect().backend {
        BackendChoice::HuskVmm => "husk-vmm/KVM",
        BackendChoice::Qemu(Accel::Kvm) => "qemu/KVM",
        BackendChoice::Qemu(Accel::Tcg) => "qemu/TCG",
    };
    let kvm_kind = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "KVM, kvm_pvm"
    } else {
        "KVM"
    };
    let sides = Sides {
        husk: format!("husk ({backend})"),
        runc: "runc".into(),
    };
    let date = utc_now();
    let mut busy = busy_processes();
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let mut done: Vec<Scenario> = Vec::new();
    let mut not_done: Vec<String> = Vec::new();
    let note_busy = |busy: &mut Vec<String>| {
        busy.extend(busy_processes());
        busy.sort();
        busy.dedup();
    };
    // Failed runs go to the first scenario of the step that just ran.
    let note_failures = |done: &mut Vec<Scenario>, first: u32| {
        let f = runner::take_failures();
        if let Some(s) = done.iter_mut().find(|s| s.number == first) {
            for e in f {
                s.notes.push(format!(
                    "A failed run, left out of the figures: {}",
                    truncate(&e, 900)
                ));
            }
        }
    };
    let leftovers: Vec<String> = if only.wants_containerd() {
        step("bench: private containerd with husk and runc");
        let env = env::Env::start()?;
        if only.wants(&[1]) {
            step(&format!(
                "bench 1: container start, {} runs each",
                plan.start
            ));
            match scenarios::container_start(&env, &sides, plan.start) {
                Ok(s) => done.push(s),
                Err(e) => not_done.push(format!("1. Container start: failed in this run: {e:#}")),
            }
            note_failures(&mut done, 1);
            note_busy(&mut busy);
        }
        if only.wants(&[2, 4]) {
            step(&format!(
                "bench 2 + 4: time to first output and husk's boot breakdown, {} runs each",
                plan.first_output
            ));
            match scenarios::first_output(&env, &sides, plan.first_output) {
                Ok((s2, s4)) => {
                    done.push(s2);
                    done.push(s4);
                }
                Err(e) => not_done.push(format!(
                    "2 and 4. Time to first output, boot breakdown: failed in this run: {e:#}"
                )),
            }
            note_failures(&mut done, 2);
            note_busy(&mut busy);
        }
        if only.wants(&[3, 5, 9]) {
            step(&format!(
                "bench 3 + 5 + 9: {} idle pod(s) per side, {} execs each",
                plan.idle_pods, plan.execs
            ));
            match scenarios::idle_pods(&env, &sides, plan.idle_pods, plan.execs) {
                Ok(s) => done.extend(s),
                Err(e) => not_done.push(format!(
                    "3, 5 and 9. Exec latency, pod memory, shim alone: failed in this run: {e:#}"
                )),
            }
            note_failures(&mut done, 3);
            note_busy(&mut busy);
        }
        if only.wants(&[6]) {
            step(&format!("bench 6: density, {} pods per side", plan.density));
            match scenarios::density(&env, &sides, plan.density) {
                Ok(s) => done.push(s),
                Err(e) => not_done.push(format!("6. Density: failed in this run: {e:#}")),
            }
            note_busy(&mut busy);
        }
        if only.wants(&[7]) {
            step(&format!(
                "bench 7: I/O, {} MiB, {} run(s) each",
                plan.io_mib, plan.io_rounds
            ));
            match io::run(&env, &sides, plan.io_rounds, plan.io_mib) {
                Ok(s) => done.push(s),
                Err(e) => not_done.push(format!("7. I/O: failed in this run: {e:#}")),
            }
            note_failures(&mut done, 7);
            note_busy(&mut busy);
        }
        if only.wants(&[10]) {
            step(&format!(
                "bench 10: pod network, {} requests and {} MiB sends each",
                plan.net_rounds, plan.net_mib
            ));
            match network::run(&env, &sides, plan.net_rounds, plan.net_mib) {
                Ok(s) => done.push(s),
                Err(e) => not_done.push(format!("10. Pod network: failed in this run: {e:#}")),
            }
            note_failures(&mut done, 10);
            note_busy(&mut busy);
        }
        if only.wants(&[11]) {
            step(&format!(
                "bench 11: the jail's cost, {} runs each",
                plan.start.div_ceil(2)
            ));
            match jail::run(&env, plan.start.div_ceil(2)) {
                Ok(s) => done.push(s),
                Err(e) => not_done.push(format!("11. The jail's cost: failed in this run: {e:#}")),
            }
            note_failures(&mut done, 11);
            note_busy(&mut busy);
        }
        if only.wants(&[12]) {
            step(&format!(
                "bench 12: the warm pool, {} runs each",
                plan.first_output
            ));
            match pool::run(&env, plan.first_output) {
                Ok(s) => done.push(s),
                Err(e) => not_done.push(format!("12. The warm pool: failed in this run: {e:#}")),
            }
            note_failures(&mut done, 12);
            note_busy(&mut busy);
        }
        step("bench: stopping containerd, removing what the bench made");
        env.shutdown()
    } else {
        Vec::new()
    };
    if runner::interrupted() {
        bail!("interrupted: everything the bench started was removed; no report written");
    }
    if only.wants(&[13]) {
        let rounds = plan.first_output.div_ceil(2);
        step(&format!(
            "bench 13: a CRI pod start with the warm pool, {rounds} runs each"
        ));
        match cri_pool::run_scenario(rounds) {
            Ok(s) => done.push(s),
            Err(e) => not_done.push(format!(
                "13. A CRI pod start with the warm pool: failed in this run: {e:#}"
            )),
        }
        note_failures(&mut done, 13);
        note_busy(&mut busy);
    }
    if only.wants(&[8]) {
        step(&format!(
            "bench 8: VMM alone, {} runs each; our Linux guest, {} rounds",
            plan.vmm, plan.vmm_linux
        ));
        match vmm::run(plan.vmm, plan.vmm_mem, plan.vmm_linux, kvm_kind) {
            Ok(s) => done.push(s),
            Err(e) => not_done.push(format!("8. VMM alone: failed in this run: {e:#}")),
        }
        note_failures(&mut done, 8);
        note_busy(&mut busy);
    }
    if only.wants(&[14]) {
        step(&format!(
            "bench 14: a pod on husk-vmm, host memory, {} pod(s) per side",
            plan.pod_kvm
        ));
        match pod_kvm::run(plan.pod_kvm) {
            Ok(s) => done.push(s),
            Err(e) => not_done.push(format!(
                "14. A pod on husk-vmm: host memory: failed in this run: {e:#}"
            )),
        }
        note_busy(&mut busy);
    }
    if runner::interrupted() {
        bail!("interrupted: everything the bench started was removed; no report written");
    }
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    done.sort_by_key(|s| s.number);
    targets::annotate(&mut done);
    let load_note = format!(
        "The machine is shared: load average {} at the start, {} at the end{}. Total bench time {}.",
        load_start.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        load_end.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        if busy.is_empty() {
            "; no compiler was seen running beside it".to_string()
        } else {
            format!("; seen running beside it at some point (other engineers' builds): {}", busy.join(", "))
        },
        elapsed(began)
    );
    let load_note = if leftovers.is_empty() {
        format!("{load_note} At the end no shim, VM, helper or /run/husk directory of the bench's containers was left.")
    } else {
        format!(
            "{load_note} **Left behind by the runtime** (found and removed by the bench's cleanup): {}.",
            leftovers.join("; ")
        )
    };
    let results = Results {
        date,
        machine: machine(),
        quick,
        only: only.0.clone(),
        load_note,
        scenarios: done,
        not_done,
    };

    // A partial run never replaces the committed report.
    let (md, dir) = if quick || !only.all() {
        let d = paths::artifacts().join("bench");
        (d.join("BENCHMARKS.md"), d.join("benchmarks"))
    } else {
        (
            paths::workspace().join("BENCHMARKS.md"),
            paths::workspace().join("benchmarks"),
        )
    };
    std::fs::create_dir_all(&dir)?;
    let json: PathBuf = dir.join("bench.json");
    let svg_name = "start-latency.svg";
    let chart_series: Vec<(String, Vec<f64>)> = results
        .scenarios
        .iter()
        .filter(|s| [1, 2].contains(&s.number))
        .flat_map(|s| {
            let what = if s.number == 1 {
                "ctr run /bin/true"
            } else {
                "first output"
            };
            s.rows.iter().take(1).flat_map(move |r| {
                std::iter::once(&r.husk)
                    .chain(r.baseline.as_ref())
                    .map(move |x| (format!("{what}: {}", x.backend), x.samples.clone()))
            })
        })
        .collect();
    let charted = !chart_series.is_empty()
        && match chart::write_svg(
            &dir.join(svg_name),
            "Start latency: husk and runc under one containerd (empirical CDF)",
            &chart_series,
        ) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("bench: no chart: {e:#}");
                false
            }
        };
    let svg_name = if charted { svg_name } else { "" };
    report::write(&results, &md, &json, svg_name)?;
    step(&format!(
        "bench: wrote {} and {}{}",
        md.display(),
        json.display(),
        if charted {
            format!(", {}", dir.join(svg_name).display())
        } else {
            String::new()
        }
    ));
    print!("{}", report::render(&results, "bench.json", svg_name));
    Ok(())
}

mod targets;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_runs_the_steps_that_make_the_named_scenarios() {
        let all = Only::new(&[]).unwrap();
        assert!(all.all() && all.wants(&[8]) && all.wants_containerd());
        let five = Only::new(&[5]).unwrap();
        assert!(five.wants(&[3, 5, 9]));
        assert!(!five.wants(&[1]) && !five.wants(&[8]));
        assert!(five.wants_containerd());
        let eight = Only::new(&[8]).unwrap();
        assert!(eight.wants(&[8]) && !eight.wants_containerd());
        // Scenario 13 starts a containerd of its own.
        let cri = Only::new(&[13]).unwrap();
        assert!(cri.wants(&[13]) && !cri.wants(&[12]) && !cri.wants_containerd());
        // So does 14 (in L1 here).
        let kvm = Only::new(&[14]).unwrap();
        assert!(kvm.wants(&[14]) && !kvm.wants(&[8]) && !kvm.wants_containerd());
    }

    #[test]
    fn only_refuses_a_number_no_scenario_has() {
        let e = Only::new(&[5, 15]).unwrap_err().to_string();
        assert!(e.contains("--only 15") && e.contains("1, 2, 3"), "{e}");
    }
}
