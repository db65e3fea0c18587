//! Scenario 12: the warm pool (issue #17, docs/ARCHITECTURE.md "The warm pool"). Under the
//! bench's containerd, husk with a copy of its configuration that adds `[pool] size = 1`
//! (handed to `ctr run --runtime-config-path`; a holder the bench runs serves it) against
//! the plain configuration (cold boot), and against runc; and what one pooled VM holds on the
//! host while it waits.
//!
//! Before every run the bench waits (untimed) until the pool is full again, so no run shares
//! the CPU with a pooled VM's boot: the figures are a start that finds a VM ready, and a cold
//! start on a quiet machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::env::{Env, HUSK_RUNTIME, RUNC_RUNTIME};
use super::procfs;
use super::results::{Row, Scenario, Series};
use super::runner::{alternate, ms, timed};
use super::scenarios::mib;

const DEADLINE: Duration = Duration::from_secs(120);
const POOLED: &str = "husk, pooled";

fn row(metric: &str, unit: &str, labels: [&str; 2], [a, b]: [Vec<f64>; 2]) -> Row {
    Row {
        metric: metric.into(),
        unit: unit.into(),
        husk: Series {
            backend: labels[0].into(),
            samples: a,
        },
        baseline: Some(Series {
            backend: labels[1].into(),
            samples: b,
        }),
    }
}

fn husk_row(metric: &str, unit: &str, v: Vec<f64>) -> Row {
    Row {
        metric: metric.into(),
        unit: unit.into(),
        husk: Series {
            backend: POOLED.into(),
            samples: v,
        },
        baseline: None,
    }
}

/// The holder the bench runs (killed by PID, its VMs with it, when dropped).
struct Holder {
    child: Child,
    shim: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl Holder {
    fn start(shim: &Path, config: &Path, log: &Path) -> Result<Self> {
        let child = Command::new(shim)
            .args(["pool", "run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("starting the pool holder")?;
        Ok(Self {
            child,
            shim: shim.to_path_buf(),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(&self.shim)
            .args(["pool", "status", "--config"])
            .arg(&self.config)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Waits until every VM of the pool is ready.
    fn full(&self) -> Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(s) = self.status() {
                if s["ready"].as_u64().is_some() && s["ready"] == s["size"] {
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the pool was not full within 120 s; holder log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn claims(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" claimed by sandbox "))
            .count()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // SIGTERM: the holder removes what it keeps under .pool/ as it ends.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0)),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        // Its keepers kill their VMs when they see it gone.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline
            && procfs::processes()
                .iter()
                .any(|p| p.argv.iter().any(|a| a.contains("/run/husk/.pool/vm-")))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What the pooled VM `vmid` holds on the host: (PSS outside guest RAM of its keeper and every
/// process of the VM, guest RAM touched, the keeper's own PSS), KiB.
fn pooled_vm_memory(keeper: u32, vmid: &str) -> (u64, u64, u64) {
    let needle = format!("/run/husk/.pool/{vmid}/");
    let (mut pss, mut guest, mut keeper_pss) = (0, 0, 0);
    for p in procfs::processes()
        .iter()
        .filter(|p| p.pid == keeper || p.argv.iter().any(|a| a.contains(&needle)))
    {
        let m = procfs::mem(p.pid).unwrap_or_default();
        pss += m.pss_kib;
        if p.pid == keeper {
            keeper_pss = m.pss_kib;
        }
        guest = guest.max(m.guest_rss_kib);
    }
    (pss, guest, keeper_pss)
}

pub fn run(env: &Env, rounds: usize) -> Result<Scenario> {
    let cold = env.husk_config();
    let pooled = cold.with_file_name("husk-pool.toml");
    let text = std::fs::read_to_string(&cold).context("reading the bench's husk config")?;
    std::fs::write(&pooled, format!("{text}\n[pool]\nsize = 1\n"))
        .context("writing the pool's config")?;
    let shim = crate::paths::workspace().join("target/release/containerd-shim-husk-v2");
    let holder = Holder::start(&shim, &pooled, &cold.with_file_name("pool-holder.log"))?;
    holder.full()?;
    let mut sc = Scenario::new(
        12,
        "The warm pool",
        "husk with `[pool] size = 1` (a copy of the bench's configuration, chosen per run with \
         `ctr run --runtime-config-path`; a holder started by the bench keeps one VM booted) \
         against the same husk booting cold, and against runc, alternating. Before every run \
         the bench waits, untimed, until the pool holds a ready VM again, so no run shares the \
         CPU with a pooled VM's boot. Start: `ctr run --rm … /bin/true`, wall time. First \
         output: `ctr run --rm … echo hi`, to the first byte of ctr's stdout. Memory: the \
         ready pooled VM's keeper and VM processes, PSS outside guest RAM, and the guest RAM \
         it has touched.",
    );
    let run_husk = |config: &Path, id: &str, cmd: &[&str]| {
        let mut c = env.ctr_cmd();
        c.args([
            "run",
            "--rm",
            "--runtime",
            HUSK_RUNTIME,
            "--runtime-config-path",
        ])
        .arg(config)
        .args([env.image(), id])
        .args(cmd);
        timed(&mut c, DEADLINE)
    };
    let labels = [POOLED, "husk, cold"];
    let start = alternate("pool: start", labels, "ms", 1, rounds, |side| {
        holder.full()?;
        let id = env.new_id("pool");
        let config = if side == 0 { &pooled } else { &cold };
        Ok(ms(run_husk(config, &id, &["/bin/true"])?.total))
    })?;
    sc.rows
        .push(row("ctr run --rm /bin/true", "ms", labels, start));
    let labels = [POOLED, "runc"];
    let first = alternate("pool: first output", labels, "ms", 1, rounds, |side| {
        holder.full()?;
        let id = env.new_id("poolecho");
        let t = if side == 0 {
            run_husk(&pooled, &id, &["echo", "hi"])?
        } else {
            let mut c = env.ctr_cmd();
            c.args([
                "run",
                "--rm",
                "--runtime",
                RUNC_RUNTIME,
                env.image(),
                &id,
                "echo",
                "hi",
            ]);
            timed(&mut c, DEADLINE)?
        };
        Ok(ms(t.first_byte.context("no output")?))
    })?;
    sc.rows
        .push(row("first output (echo hi)", "ms", labels, first));
    let pooled_runs = holder.claims();
    let (mut pss, mut guest, mut keeper_pss) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.div_ceil(3).max(1) {
        let s = holder.full()?;
        // Let the guest settle after its boot, as scenario 5 does.
        std::thread::sleep(Duration::from_secs(2));
        let vm = &s["vms"][0];
        let (Some(vmid), Some(keeper)) = (vm["vmid"].as_str(), vm["keeper_pid"].as_u64()) else {
            bail!("the pool's status names no VM: {s}");
        };
        let (p, g, k) = pooled_vm_memory(u32::try_from(keeper).unwrap_or(0), vmid);
        pss.push(mib(p));
        guest.push(mib(g));
        keeper_pss.push(mib(k));
        // A fresh VM for the next sample: claim this one away with a run.
        run_husk(&pooled, &env.new_id("poolmem"), &["/bin/true"])?;
    }
    sc.rows.push(husk_row(
        "a pooled VM waiting: host PSS outside guest RAM (keeper, QEMU, helpers)",
        "MiB",
        pss,
    ));
    sc.rows
        .push(husk_row("of which its keeper process", "MiB", keeper_pss));
    sc.rows.push(husk_row(
        "a pooled VM waiting: guest RAM touched",
        "MiB",
        guest,
    ));
    let steps = pooled_steps(&env.log());
    if !steps.is_empty() {
        let col = |f: fn(&PooledSteps) -> f64| steps.iter().map(f).collect::<Vec<_>>();
        sc.rows.push(husk_row(
            "pooled start, in the shim: the claim (holder and keeper round trips)",
            "ms",
            col(|s| s.claim),
        ));
        sc.rows.push(husk_row(
            "pooled start, in the shim: pod network set up, VM taken over",
            "ms",
            col(|s| s.taken_over),
        ));
        sc.rows.push(husk_row(
            "pooled start, in the shim: VM taken over → agent connected (vsock)",
            "ms",
            col(|s| s.connected - s.taken_over),
        ));
        sc.rows.push(husk_row(
            "pooled start, in the shim: CreateSandbox (its guest side under TCG)",
            "ms",
            col(|s| s.create_sandbox - s.connected),
        ));
        sc.rows.push(husk_row(
            "pooled start, in the shim: claim + bring-up, all of the above",
            "ms",
            col(|s| s.claim + s.bring_up),
        ));
    }
    let runs = 2 * (rounds + 1);
    if pooled_runs >= runs {
        sc.notes.push(format!(
            "The holder's log shows {pooled_runs} claims for the {runs} pooled runs (warm-ups \
             included): every pooled run took a VM from the pool."
        ));
    } else {
        sc.notes.push(format!(
            "**Some pooled runs booted cold** ({pooled_runs} claims for {runs} runs): see the \
             holder's log."
        ));
    }
    if !steps.is_empty() {
        sc.notes.push(format!(
            "The shim's own steps of a pooled start ({} runs, from its log line per sandbox): \
             the runtime's share of a pooled start is the claim plus the bring-up rows above \
             (target ≤ 30 ms, #17).",
            steps.len()
        ));
    }
    Ok(sc)
}

/// The shim's steps of one pooled sandbox start, ms, from its log lines (`sandbox ID:
/// claimed vm-… from the warm pool in N ms`, then `sandbox ID: VM … from the warm pool;
/// network setup at … ms, claimed VM taken over at … ms, agent ready at … ms, agent connected
/// at … ms, CreateSandbox at … ms, bring-up … ms`). Offsets other than the claim count from
/// the bring-up's start, after the claim.
#[derive(Debug, Clone, PartialEq)]
struct PooledSteps {
    claim: f64,
    taken_over: f64,
    connected: f64,
    create_sandbox: f64,
    bring_up: f64,
}

fn pooled_steps(log: &str) -> Vec<PooledSteps> {
    let number_before = |s: &str, end: &str| -> Option<f64> {
        let i = s.find(end)?;
        s[..i].rsplit(' ').next()?.parse().ok()
    };
    let sandbox_of = |l: &str| -> Option<String> {
        let i = l.find("sandbox ")? + "sandbox ".len();
        Some(l[i..].split(':').next()?.to_string())
    };
    let mut claims = std::collections::HashMap::new();
    let mut out = Vec::new();
    for line in log.lines() {
        if let Some(i) = line.find(" from the warm pool in ") {
            if let (Some(sid), Some(ms)) =
                (sandbox_of(&line[..i]), number_before(&line[i..], " ms"))
            {
                claims.insert(sid, ms);
            }
        } else if let Some(i) = line.find(" from the warm pool; ") {
            let steps = &line[i + " from the warm pool; ".len()..];
            let at = |name: &str| -> Option<f64> {
                let j = steps.find(&format!("{name} at "))? + name.len() + " at ".len();
                steps[j..].split(' ').next()?.parse().ok()
            };
            let bring_up = steps.find("bring-up ").and_then(|j| {
                steps[j + "bring-up ".len()..]
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            });
            let claim = sandbox_of(&line[..i]).and_then(|sid| claims.get(&sid).copied());
            if let (
                Some(claim),
                Some(taken_over),
                Some(connected),
                Some(create_sandbox),
                Some(bring_up),
            ) = (
                claim,
                at("claimed VM taken over"),
                at("agent connected"),
                at("CreateSandbox"),
                bring_up,
            ) {
                out.push(PooledSteps {
                    claim,
                    taken_over,
                    connected,
                    create_sandbox,
                    bring_up,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pooled_starts_steps_are_read_from_the_shims_log_lines() {
        let log = "time=\"x\" level=info msg=\"sandbox p1: claimed vm-7 from the warm pool in 4 ms\" runtime=io.containerd.husk.v2\n\
                   time=\"x\" level=info msg=\"sandbox p1: VM 42 on qemu-tcg with 2 vCPU, 384 MiB; agent 0.1.0; vm-7 from the warm pool; network setup at 1 ms, claimed VM taken over at 3 ms, agent ready at 3 ms, agent connected at 9 ms, CreateSandbox at 30 ms, bring-up 31 ms\"\n\
                   time=\"x\" level=info msg=\"sandbox c1: VM 43 on qemu-tcg with 2 vCPU, 384 MiB; agent 0.1.0; booted cold; network setup at 1 ms, VM started at 20 ms, bring-up 700 ms\"\n";
        assert_eq!(
            pooled_steps(log),
            vec![PooledSteps {
                claim: 4.0,
                taken_over: 3.0,
                connected: 9.0,
                create_sandbox: 30.0,
                bring_up: 31.0,
            }]
        );
        // A start whose claim line is missing is left out, not guessed.
        let without_claim: String = log.lines().skip(1).collect::<Vec<_>>().join("\n");
        assert!(pooled_steps(&without_claim).is_empty());
    }
}
