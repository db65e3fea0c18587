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
        let _ = self.child.kill();
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
    sc.notes.push(format!(
        "The holder's log shows {pooled_runs} claims for the {} pooled runs (warm-ups included): \
         every pooled run took a VM from the pool.",
        2 * (rounds + 1)
    ));
    if pooled_runs < 2 * (rounds + 1) {
        sc.notes.push(format!(
            "**Some pooled runs booted cold** ({pooled_runs} claims for {} runs): see the holder's log.",
            2 * (rounds + 1)
        ));
    }
    Ok(sc)
}
