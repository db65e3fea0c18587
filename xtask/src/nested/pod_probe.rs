//! One idle pod's host memory with husk-vmm as the VMM — the backend a node with hardware KVM
//! runs pods on — against runc, both under one private containerd ([`crate::bench::env`]):
//! on hardware KVM directly, elsewhere inside one boot of the nested tier's L1 (the host's `/`
//! over 9p, as the tier's tests see it). Memory does not depend on how fast the CPU runs, so
//! what L1's emulated SVM costs in time does not enter these figures: the same shim, husk-vmm,
//! virtiofsd, guest kernel and agent, with the same guest RAM touched, as on a node.
//!
//! Each round starts one `sleep` pod per side (alternating which goes first), waits for it
//! to settle, reads the pod's processes' memory from smaps as scenario 5 does
//! ([`crate::bench::scenarios::measure_pod`]) and removes the pod; one pod runs at a time,
//! so PSS charges the page cache of the programs and boot files to that pod in full, as for
//! scenario 5's pod alone. Inside L1 it runs as `xtask pod-probe …` and writes one
//! `HUSK-NESTED SAMPLE <json>` line per pod on its stdout, L1's results port.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_hypervisor::host::{self, HostKind};
use serde::{Deserialize, Serialize};

use super::initramfs;
use crate::bench::env::{toml_string, Env, HUSK_RUNTIME, RUNC_RUNTIME};
use crate::bench::scenarios::measure_pod;
use crate::paths;
use crate::run::{elapsed, step};

/// How long after `ctr run -d` returned the pod is read (scenario 5 waits 3 s on the host;
/// L1's emulated CPU is slower to settle).
const SETTLE: Duration = Duration::from_secs(5);

/// The two sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    #[serde(rename = "husk-vmm")]
    HuskVmm,
    #[serde(rename = "runc")]
    Runc,
}

impl Side {
    fn runtime(self) -> &'static str {
        match self {
            Side::HuskVmm => HUSK_RUNTIME,
            Side::Runc => RUNC_RUNTIME,
        }
    }

    /// [`measure_pod`]'s side index.
    fn index(self) -> usize {
        match self {
            Side::HuskVmm => 0,
            Side::Runc => 1,
        }
    }
}

/// One pod, measured (KiB).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodSample {
    pub side: Side,
    /// 0 is the warm-up round.
    pub round: usize,
    /// PSS outside guest RAM, summed over the pod's host processes.
    pub pss_kib: u64,
    /// Of it, anonymous memory (the pod's own).
    pub anon_kib: u64,
    /// Of it, file pages (page cache a pod alone is charged in full).
    pub file_kib: u64,
    /// Guest RAM the VM has touched (husk-vmm's memfd).
    pub guest_touched_kib: u64,
    /// The shim's own PSS.
    pub shim_kib: u64,
    /// (executable, PSS KiB) of the pod's other processes.
    pub parts: Vec<(String, u64)>,
}

/// The husk configuration's lines that make the pods' VMMs husk-vmm.
fn husk_vmm_config(husk_vmm: &Path) -> String {
    format!(
        "backend = \"husk-vmm\"\nhusk_vmm_path = {}\n",
        toml_string(&husk_vmm.to_string_lossy())
    )
}

/// Measures `rounds` pods per side after a warm-up round, under a private containerd whose
/// husk pods run on `husk_vmm`; each pod as it is measured goes to `emit`.
pub fn run(husk_vmm: &Path, rounds: usize, mut emit: impl FnMut(Result<PodSample>)) -> Result<()> {
    let env = Env::start()?;
    let config = env.husk_config();
    let mut text = std::fs::read_to_string(&config)
        .with_context(|| format!("reading {}", config.display()))?;
    text += &husk_vmm_config(husk_vmm);
    std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    for round in 0..=rounds {
        let order = if round % 2 == 0 {
            [Side::HuskVmm, Side::Runc]
        } else {
            [Side::Runc, Side::HuskVmm]
        };
        for side in order {
            emit(one_pod(&env, side, round));
        }
    }
    let left = env.shutdown();
    if !left.is_empty() {
        bail!("left behind: {}", left.join("; "));
    }
    Ok(())
}

fn one_pod(env: &Env, side: Side, round: usize) -> Result<PodSample> {
    let id = env.new_id(match side {
        Side::HuskVmm => "kvmpod",
        Side::Runc => "runcpod",
    });
    env.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        side.runtime(),
        env.image(),
        &id,
        "sleep",
        "100000",
    ])?;
    std::thread::sleep(SETTLE);
    let measured = measure_pod(side.index(), &id);
    let removed = env.remove(&id);
    let m = measured?;
    removed?;
    if side == Side::HuskVmm && !m.parts.iter().any(|(exe, _)| exe == "husk-vmm") {
        bail!(
            "pod {id}: no husk-vmm process among its processes ({:?})",
            m.parts
        );
    }
    Ok(PodSample {
        side,
        round,
        pss_kib: m.total,
        anon_kib: m.anon,
        file_kib: m.file,
        guest_touched_kib: m.guest_touched,
        shim_kib: m.shim_pss,
        parts: m.parts,
    })
}

/// The `xtask pod-probe` entry point (inside L1): samples as marker lines on stdout.
pub fn main(husk_vmm: &Path, rounds: usize) -> Result<()> {
    let r = run(husk_vmm, rounds, super::probe::emit);
    if let Err(e) = &r {
        super::probe::emit::<PodSample>(Err(anyhow::anyhow!("{e:#}")));
    }
    r
}

/// What one measuring run gave.
#[derive(Debug, Default)]
pub struct Measured {
    /// Round 0 is the warm-up.
    pub samples: Vec<PodSample>,
    /// Pods (or the run) that failed, with why.
    pub failed: Vec<String>,
    /// Where it ran.
    pub place: String,
}

/// Measures on this host's hardware KVM, or in L1.
pub fn measure(rounds: usize) -> Result<Measured> {
    let husk_vmm = super::linux_boot::husk_vmm()?;
    if matches!(host::detect().kind, HostKind::HardwareKvm { .. }) {
        let mut m = Measured {
            place: "hardware KVM".into(),
            ..Measured::default()
        };
        run(&husk_vmm, rounds, |s| match s {
            Ok(s) => m.samples.push(s),
            Err(e) => m.failed.push(format!("{e:#}")),
        })?;
        return Ok(m);
    }
    nested(&husk_vmm, rounds)
}

fn nested(husk_vmm: &Path, rounds: usize) -> Result<Measured> {
    let start = Instant::now();
    step(&format!(
        "nested pod memory: husk-vmm and runc pods under one containerd in L1 (QEMU TCG, emulated AMD SVM), {rounds} round(s) + a warm-up"
    ));
    let qemu = paths::find_program("qemu-system-x86_64").context(
        "qemu-system-x86_64 not found — apt-get install qemu-system-x86 (cargo xtask setup)",
    )?;
    let busybox = paths::find_program("busybox")
        .context("busybox not found — apt-get install busybox-static (cargo xtask setup)")?;
    let xtask = std::env::current_exe().context("finding the xtask executable")?;
    let l1 = super::l1::get()?;
    let dir = paths::artifacts().join("nested-pod");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let env: Vec<(String, String)> = vec![
        ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
        ("HUSK_VMM".into(), husk_vmm.display().to_string()),
    ];
    let body = format!(
        "{} pod-probe --rounds {rounds} --husk-vmm {} </dev/null >&3 2>&1\n",
        initramfs::quote(&xtask.to_string_lossy()),
        initramfs::quote(&husk_vmm.to_string_lossy()),
    );
    let mut keep = vec![paths::workspace(), paths::images()];
    keep.extend(
        [xtask.as_path(), husk_vmm]
            .iter()
            .filter_map(|p| p.parent().map(PathBuf::from)),
    );
    // L1 up in ~5 s, containerd in a few, each husk-vmm pod's start and removal ~10–20 s in L1.
    let deadline = Duration::from_secs(180 + 2 * 60 * (rounds as u64 + 1));
    let results = super::pack_and_boot(
        &qemu,
        &initramfs::Inputs {
            l1: &l1,
            root: initramfs::Root::HostExport,
            busybox,
            programs: Vec::new(),
            files: Vec::new(),
            guest_kernel: paths::vmlinux(),
            guest_initramfs: paths::initramfs(),
            body,
            env,
            keep: super::outermost(keep),
        },
        &dir,
        deadline,
        &[],
    )?;
    let (samples, failed) = results.parse_samples()?;
    let m = Measured {
        place: format!(
            "nested: one L1 VM under QEMU TCG (`-cpu max`, emulated AMD SVM), {}, L1 up at {}",
            l1.package,
            results.l1_up.as_deref().unwrap_or("?")
        ),
        samples,
        failed,
    };
    println!(
        "    nested pod memory: {} sample(s), {} failed, in {}",
        m.samples.len(),
        m.failed.len(),
        elapsed(start)
    );
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_vmm_is_husk_vmm_at_the_given_path() {
        assert_eq!(
            husk_vmm_config(Path::new("/w/target/release/husk-vmm")),
            "backend = \"husk-vmm\"\nhusk_vmm_path = \"/w/target/release/husk-vmm\"\n"
        );
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn samples_travel_as_json() {
        let s = PodSample {
            side: Side::HuskVmm,
            round: 1,
            pss_kib: 20_000,
            anon_kib: 9_000,
            file_kib: 11_000,
            guest_touched_kib: 30_000,
            shim_kib: 5_000,
            parts: vec![("husk-vmm".into(), 3_000)],
        };
        let back: PodSample = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back.side, Side::HuskVmm);
        assert_eq!(back.parts, s.parts);
        assert!(serde_json::to_string(&s)
            .unwrap()
            .contains("\"side\":\"husk-vmm\""));
    }
}
