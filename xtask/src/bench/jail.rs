//! Scenario 11: what the jail costs (docs/SECURITY.md). Both sides are husk under the same
//! private containerd: the default configuration (VMM and vsock helper jailed) against a copy
//! with `jail = false`, handed to `ctr run --runtime-config-path`, alternating.

use std::time::Duration;

use anyhow::{Context, Result};

use super::env::{Env, HUSK_RUNTIME};
use super::results::{Row, Scenario, Series};
use super::runner::{alternate, ms, timed};
use super::scenarios::{measure_pod, mib};

const DEADLINE: Duration = Duration::from_secs(120);
const LABELS: [&str; 2] = ["husk, jailed", "husk, no jail"];

fn row(metric: &str, unit: &str, [jailed, open]: [Vec<f64>; 2]) -> Row {
    Row {
        metric: metric.into(),
        unit: unit.into(),
        husk: Series {
            backend: LABELS[0].into(),
            samples: jailed,
        },
        baseline: Some(Series {
            backend: LABELS[1].into(),
            samples: open,
        }),
    }
}

pub fn run(env: &Env, rounds: usize) -> Result<Scenario> {
    let jailed = env.husk_config();
    let open = jailed.with_file_name("husk-no-jail.toml");
    let text = std::fs::read_to_string(&jailed).context("reading the bench's husk config")?;
    std::fs::write(&open, format!("{text}\njail = false\n"))
        .context("writing the unjailed config")?;
    let config = |side: usize| if side == 0 { &jailed } else { &open };
    let mut sc = Scenario::new(
        11,
        "The jail's cost",
        "husk against husk under one containerd: the default configuration (VMM and vsock \
         helper jailed: own uid, namespaces, pivot_root) against `jail = false`, chosen per run \
         with `ctr run --runtime-config-path`, alternating. Start: `ctr run --rm … /bin/true`, \
         wall time. Memory: one idle pod (`sleep`), PSS of its host processes outside guest RAM.",
    );
    let start = alternate("jail: start", LABELS, "ms", 1, rounds, |side| {
        let id = env.new_id("jail");
        let mut c = env.ctr_cmd();
        c.args([
            "run",
            "--rm",
            "--runtime",
            HUSK_RUNTIME,
            "--runtime-config-path",
        ])
        .arg(config(side))
        .args([env.image(), &id, "/bin/true"]);
        Ok(ms(timed(&mut c, DEADLINE)?.total))
    })?;
    sc.rows.push(row("ctr run --rm /bin/true", "ms", start));
    let mem = alternate(
        "jail: pod memory",
        LABELS,
        "MiB",
        0,
        rounds.div_ceil(3).max(1),
        |side| {
            let id = env.new_id("jailmem");
            let cfg = config(side).display().to_string();
            env.ctr_ok(&[
                "run",
                "-d",
                "--runtime",
                HUSK_RUNTIME,
                "--runtime-config-path",
                &cfg,
                env.image(),
                &id,
                "sleep",
                "600",
            ])?;
            // Let the guest settle after its boot, as scenario 5 does.
            std::thread::sleep(Duration::from_secs(2));
            let m = measure_pod(0, &id);
            env.remove(&id)?;
            Ok(mib(m?.total))
        },
    )?;
    sc.rows
        .push(row("idle pod, host PSS outside guest RAM", "MiB", mem));
    Ok(sc)
}
