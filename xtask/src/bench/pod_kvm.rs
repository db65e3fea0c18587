//! Scenario 14: one idle pod's host memory with husk-vmm as its VMM — the backend of a node
//! with hardware KVM — against runc under the same containerd ([`crate::nested::pod_probe`]:
//! on hardware KVM directly, elsewhere in the nested tier's L1, where memory is what it is on
//! a node although the CPU is emulated). Issue 17's target there: ≤ 24 MiB per pod.

use anyhow::{bail, Result};

use super::report::fmt_num;
use super::results::{Row, Scenario, Series};
use super::scenarios::mib;
use crate::nested::pod_probe::{self, Measured, PodSample, Side};

/// Issue 17's per-pod memory target where husk-vmm runs the pod (MiB, PSS outside guest RAM).
pub const TARGET_MIB: f64 = 24.0;

fn series(m: &Measured, side: Side, f: impl Fn(&PodSample) -> Option<u64>) -> Vec<f64> {
    m.samples
        .iter()
        .filter(|s| s.side == side && s.round > 0)
        .filter_map(|s| f(s).map(mib))
        .collect()
}

fn part(s: &PodSample, exe: &str) -> Option<u64> {
    s.parts.iter().find(|(e, _)| e == exe).map(|(_, k)| *k)
}

pub fn run(rounds: usize) -> Result<Scenario> {
    let m = pod_probe::measure(rounds)?;
    if m.samples
        .iter()
        .all(|s| s.side != Side::HuskVmm || s.round == 0)
    {
        bail!(
            "no husk-vmm pod was measured ({})",
            if m.failed.is_empty() {
                "no sample came back".to_string()
            } else {
                m.failed.join("; ")
            }
        );
    }
    let nested = m.place.starts_with("nested");
    let where_ = if nested { "nested L1" } else { "hardware KVM" };
    let (h, r) = (
        format!("husk, husk-vmm ({where_})"),
        format!("runc ({where_})"),
    );
    // A row of husk's pods and, with `runc`, runc's beside it.
    let row = |metric: &str, runc: bool, f: &dyn Fn(&PodSample) -> Option<u64>| Row {
        metric: metric.into(),
        unit: "MiB".into(),
        husk: Series {
            backend: h.clone(),
            samples: series(&m, Side::HuskVmm, f),
        },
        baseline: runc.then(|| Series {
            backend: r.clone(),
            samples: series(&m, Side::Runc, f),
        }),
    };
    let both = |metric: &str, f: &dyn Fn(&PodSample) -> Option<u64>| row(metric, true, f);
    let husk_only = |metric: &str, f: &dyn Fn(&PodSample) -> Option<u64>| row(metric, false, f);
    let mut sc = Scenario::new(
        14,
        "A pod on husk-vmm: host memory",
        format!(
            "One idle `sleep` container per pod, husk with `backend = \"husk-vmm\"` (the \
             backend a node with hardware KVM runs) and runc under one private containerd, \
             alternating, one pod at a time, {rounds} pod(s) per side after a warm-up, read 5 s \
             after `ctr run -d` returned as scenario 5 reads its pods (PSS outside guest RAM, \
             from smaps; guest RAM apart). Where: {}. Memory does not depend on how fast the \
             CPU is emulated: the shim, husk-vmm, virtiofsd, the guest kernel and agent, and \
             the guest RAM they touch are those of a node.",
            m.place
        ),
    );
    sc.rows
        .push(both("pod PSS outside guest RAM", &|s| Some(s.pss_kib)));
    sc.rows
        .push(both("of which anonymous (the pod's own)", &|s| {
            Some(s.anon_kib)
        }));
    sc.rows.push(both(
        "of which file pages (programs, libraries, boot files: page cache)",
        &|s| Some(s.file_kib),
    ));
    sc.rows
        .push(both("of which the shim", &|s| Some(s.shim_kib)));
    sc.rows
        .push(husk_only("of which husk-vmm", &|s| part(s, "husk-vmm")));
    sc.rows
        .push(husk_only("of which virtiofsd", &|s| part(s, "virtiofsd")));
    sc.rows.push(husk_only("guest RAM touched", &|s| {
        Some(s.guest_touched_kib)
    }));
    sc.rows.push(both(
        "the pod's host memory with its guest RAM touched (PSS + guest RAM)",
        &|s| Some(s.pss_kib + s.guest_touched_kib),
    ));
    for f in &m.failed {
        sc.notes.push(format!(
            "A failed pod, left out of the figures: {}",
            super::results::one_line(f)
        ));
    }
    let pss = sc.rows[0].husk.summary().map(|x| x.median);
    if let Some(p) = pss {
        let verdict = if p <= TARGET_MIB {
            format!(
                "met ({} MiB against {} MiB)",
                fmt_num(p),
                fmt_num(TARGET_MIB)
            )
        } else {
            format!(
                "missed: {} MiB against {} MiB, {} MiB over",
                fmt_num(p),
                fmt_num(TARGET_MIB),
                fmt_num(p - TARGET_MIB)
            )
        };
        sc.notes.push(format!(
            "Target (#17, where husk-vmm runs the pod): ≤ {} MiB per pod outside its guest's \
             touched RAM: {verdict}. A pod alone is charged its programs' and boot files' page \
             cache in full; pods on one node share it. The guest RAM the pod touched is on \
             top ({} MiB; the last row adds it).",
            fmt_num(TARGET_MIB),
            sc.rows
                .iter()
                .find(|r| r.metric == "guest RAM touched")
                .and_then(|r| r.husk.summary())
                .map_or("?".into(), |x| fmt_num(x.median)),
        ));
    }
    Ok(sc)
}
