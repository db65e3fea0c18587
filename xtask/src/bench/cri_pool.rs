//! Scenario 13: a CRI pod start with the warm pool (issue #17). Runs `husk-cri-start`
//! (`tests/src/bin/cri_start.rs`: its CRI client needs protoc, so it lives in the tests crate,
//! built here after `setup` installed protoc): a private containerd with CRI on and handlers
//! `runc`, `husk-cold` and `husk-pooled`, each pod on a CNI bridge, rounds alternating.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::results::{Row, Scenario, Series};
use crate::paths;
use crate::run::{output, run};

const POOLED: &str = "husk, pooled";
const LABELS: [(&str, &str); 3] = [
    ("husk-pooled", POOLED),
    ("husk-cold", "husk, cold"),
    ("runc", "runc"),
];

fn row(metric: &str, husk: (&str, &[f64]), base: (&str, &[f64])) -> Row {
    Row {
        metric: metric.into(),
        unit: "ms".into(),
        husk: Series {
            backend: husk.0.into(),
            samples: husk.1.to_vec(),
        },
        baseline: Some(Series {
            backend: base.0.into(),
            samples: base.1.to_vec(),
        }),
    }
}

/// `(start, first output)` samples per handler, from the program's JSON lines.
type Samples = BTreeMap<String, (Vec<f64>, Vec<f64>)>;

fn parse(out: &str) -> Result<Samples> {
    let mut by = Samples::new();
    for line in out.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("husk-cri-start said {line:?}"))?;
        let (Some(h), Some(s), Some(f)) = (
            v["handler"].as_str(),
            v["start_ms"].as_f64(),
            v["first_output_ms"].as_f64(),
        ) else {
            bail!("husk-cri-start said {line:?}: not a run");
        };
        let e = by.entry(h.to_string()).or_default();
        e.0.push(s);
        e.1.push(f);
    }
    Ok(by)
}

pub fn run_scenario(rounds: usize) -> Result<Scenario> {
    let ws = paths::workspace();
    run(Command::new(paths::cargo()).current_dir(&ws).args([
        "build",
        "-q",
        "-p",
        "husk-tests",
        "--bin",
        "husk-cri-start",
    ]))?;
    let out = output(
        Command::new(ws.join("target/debug/husk-cri-start"))
            .args(["--rounds", &rounds.to_string()])
            .env("HUSK_KERNEL", paths::vmlinux())
            .env("HUSK_INITRAMFS", paths::initramfs())
            .env("HUSK_IMAGES", paths::images()),
    )?;
    let by = parse(&out)?;
    let get = |h: &str| -> Result<&(Vec<f64>, Vec<f64>)> {
        by.get(h)
            .with_context(|| format!("husk-cri-start reported no run of handler {h}"))
    };
    let mut sc = Scenario::new(
        13,
        "A CRI pod start with the warm pool",
        "A private containerd with its CRI plugin on (`husk-cri-start`, the tests' CRI harness) \
         and three runtime handlers: `husk-pooled` (`pool.size = 1`; a holder the program runs \
         keeps one VM booted), `husk-cold` (the same configuration without the pool, as a \
         second RuntimeClass would name it) and `runc`; every pod on a CNI bridge. A run is a \
         kubelet's pod start — RunPodSandbox, CreateContainer and StartContainer of busybox \
         `sh -c 'echo hi; exec sleep 1000'` — timed to StartContainer's return and to `hi` in \
         the container's CRI log; the three alternate, one untimed warm-up each; before every \
         pooled run the program waits, untimed, until the pool holds a ready VM again. Every \
         pooled run is checked to have claimed the pooled VM.",
    );
    let (pooled, cold, runc) = (get(LABELS[0].0)?, get(LABELS[1].0)?, get(LABELS[2].0)?);
    sc.rows.push(row(
        "CRI pod start: RunPodSandbox → StartContainer returned",
        (LABELS[0].1, &pooled.0),
        (LABELS[1].1, &cold.0),
    ));
    sc.rows.push(row(
        "CRI pod start: RunPodSandbox → StartContainer returned",
        (LABELS[0].1, &pooled.0),
        (LABELS[2].1, &runc.0),
    ));
    sc.rows.push(row(
        "CRI pod start: RunPodSandbox → first output in the container's log",
        (LABELS[0].1, &pooled.1),
        (LABELS[2].1, &runc.1),
    ));
    Ok(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_grouped_by_handler_and_junk_is_refused() {
        let out = "log line\n\
                   {\"handler\":\"runc\",\"start_ms\":1.5,\"first_output_ms\":2.0}\n\
                   {\"handler\":\"husk-pooled\",\"start_ms\":10,\"first_output_ms\":20}\n\
                   {\"handler\":\"runc\",\"start_ms\":3,\"first_output_ms\":4}\n";
        let by = parse(out).unwrap();
        assert_eq!(by["runc"], (vec![1.5, 3.0], vec![2.0, 4.0]));
        assert_eq!(by["husk-pooled"], (vec![10.0], vec![20.0]));
        assert!(parse("{\"handler\":\"runc\"}\n").is_err());
        assert!(parse("{not json\n").is_err());
    }
}
