//! BENCHMARKS.md and the JSON file of every sample. The Markdown is rendered from
//! [`Results`] alone, so every figure in it comes from a run.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::results::{one_line, Results, Row};
// The number format every part of the report uses (a leaf, so the runner can use it too).
pub use super::stats::fmt_num;

fn row_lines(out: &mut String, row: &Row) {
    let ratio = row
        .ratio()
        .map_or_else(|| "—".to_string(), |r| format!("{r:.2}×"));
    let mut line = |series: &super::results::Series, ratio: &str| match series.summary() {
        Some(s) => {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                row.metric,
                series.backend,
                fmt_num(s.median),
                fmt_num(s.p95),
                fmt_num(s.min),
                fmt_num(s.max),
                s.runs,
                ratio
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| {} | {} | no sample | | | | 0 | |",
                row.metric, series.backend
            );
        }
    };
    line(&row.husk, &ratio);
    if let Some(b) = &row.baseline {
        line(b, "");
    }
}

/// The Markdown of BENCHMARKS.md.
pub fn render(r: &Results, json_name: &str, svg_name: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# husk benchmarks\n");
    let _ = writeln!(
        out,
        "Written by `cargo xtask bench{}{}` on {} UTC, on {}.\n{}\n",
        if r.quick { " --quick" } else { "" },
        if r.only.is_empty() {
            String::new()
        } else {
            format!(
                " --only {}",
                r.only
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            )
        },
        r.date,
        r.machine,
        r.load_note
    );
    // No chart when the run made none (`--only` without scenarios 1 and 2).
    let charted = if svg_name.is_empty() {
        String::new()
    } else {
        format!(
            "; the start-latency distributions are charted in \
             [`benchmarks/{svg_name}`](benchmarks/{svg_name})"
        )
    };
    let _ = writeln!(
        out,
        "Every sample is in [`benchmarks/{json_name}`](benchmarks/{json_name}){charted}. Each \
         scenario alternates husk and the baseline (A B A B …) so that drift of a shared \
         machine hits both. Medians and p95 (nearest rank) are over the runs shown; the ratio is \
         husk's median over the baseline's. Targets are goals, not assertions.\n"
    );
    if !svg_name.is_empty() {
        let _ = writeln!(out, "![start latency](benchmarks/{svg_name})\n");
    }
    for s in &r.scenarios {
        let _ = writeln!(out, "## {}. {}\n", s.number, s.title);
        let _ = writeln!(out, "{}\n", s.method);
        if !s.rows.is_empty() {
            let _ = writeln!(
                out,
                "| metric | backend | median | p95 | min | max | runs | husk/baseline |"
            );
            let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|");
            for row in &s.rows {
                let mut m = row.clone();
                m.metric = format!("{} ({})", row.metric, row.unit);
                row_lines(&mut out, &m);
            }
            out.push('\n');
        }
        for n in &s.notes {
            let _ = writeln!(out, "- {}", one_line(n));
        }
        if !s.notes.is_empty() {
            out.push('\n');
        }
    }
    if !r.not_done.is_empty() {
        let _ = writeln!(out, "## Not measured yet\n");
        for n in &r.not_done {
            let _ = writeln!(out, "- {}", one_line(n));
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "## Reproduce\n\n`cargo xtask bench` (as root; it builds what it needs, starts a private \
         containerd with husk and runc, and removes every container, VM and directory it made). \
         `cargo xtask bench --quick` runs fewer iterations; `--only 5` (or `--only 5,12`) only \
         the steps that make those scenarios. Both write to target/husk/bench/ instead."
    );
    out
}

/// BENCHMARKS.md's lines from this one on are not the bench's (`cargo xtask soak --record`
/// writes its section there): a bench run keeps them.
pub const KEPT: &str = "<!-- What follows is not written by cargo xtask bench, which keeps it. -->";

/// `rendered`, followed by what `old` has from the [`KEPT`] marker on.
fn keep_tail(rendered: String, old: &str) -> String {
    match old.find(KEPT) {
        Some(i) => format!("{}\n\n{}", rendered.trim_end(), &old[i..]),
        None => rendered,
    }
}

/// Writes BENCHMARKS.md at `md` (keeping what it has from [`KEPT`] on) and the samples as
/// pretty JSON at `json`.
pub fn write(r: &Results, md: &Path, json: &Path, svg_name: &str) -> Result<()> {
    let json_name = json
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let old = std::fs::read_to_string(md).unwrap_or_default();
    std::fs::write(md, keep_tail(render(r, &json_name, svg_name), &old))
        .with_context(|| format!("writing {}", md.display()))?;
    let text = serde_json::to_string_pretty(r)?;
    std::fs::write(json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bench_run_keeps_the_sections_after_the_marker() {
        let old = format!("# old bench\n\n## 1\n\nold\n\n{KEPT}\n## Soak\n\ntable\n");
        let new = keep_tail("# new bench\n\n## 1\n\nnew\n".into(), &old);
        assert_eq!(
            new,
            format!("# new bench\n\n## 1\n\nnew\n\n{KEPT}\n## Soak\n\ntable\n")
        );
        assert_eq!(keep_tail("# new\n".into(), "# old\n"), "# new\n");
    }
    use crate::bench::results::{Scenario, Series};

    fn results() -> Results {
        let mut s = Scenario::new(1, "Container start", "ctr run --rm … /bin/true");
        s.rows.push(Row {
            metric: "wall time".into(),
            unit: "ms".into(),
            husk: Series {
                backend: "husk (qemu/TCG)".into(),
                samples: vec![2000.0, 1800.0, 2200.0],
            },
            baseline: Some(Series {
                backend: "runc".into(),
                samples: vec![150.0, 100.0, 200.0, 120.0],
            }),
        });
        s.notes.push("missed by a lot".into());
        s.notes
            .push("an error\n--- console ---\nlast line\n".into());
        Results {
            date: "2026-11-29 05:00".into(),
            machine: "test box".into(),
            quick: true,
            only: Vec::new(),
            load_note: "quiet".into(),
            scenarios: vec![s],
            not_done: vec!["7. I/O: later".into()],
        }
    }

    #[test]
    fn a_partial_run_says_which_scenarios_it_ran() {
        let mut r = results();
        r.only = vec![5, 12];
        let md = render(&r, "b.json", "");
        assert!(
            md.contains("`cargo xtask bench --quick --only 5,12` on 2026-11-29"),
            "{md}"
        );
        // It made no chart, and links none.
        assert!(!md.contains(".svg"), "{md}");
        assert!(md.contains("(benchmarks/b.json). Each scenario"), "{md}");
    }

    #[test]
    fn the_table_names_backends_and_gives_the_ratio_of_medians() {
        let md = render(&results(), "b.json", "b.svg");
        assert!(
            md.contains(
                "| wall time (ms) | husk (qemu/TCG) | 2000 | 2200 | 1800 | 2200 | 3 | 14.81× |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| wall time (ms) | runc | 135 | 200 | 100 | 200 | 4 |  |"),
            "{md}"
        );
        assert!(md.contains("`cargo xtask bench --quick` on 2026-11-29 05:00 UTC, on test box."));
        assert!(md.contains("- missed by a lot"));
        assert!(
            md.contains("- an error ⏎ --- console --- ⏎ last line\n"),
            "{md}"
        );
        assert!(md.contains("## Not measured yet\n\n- 7. I/O: later"));
    }

    #[test]
    fn json_keeps_every_sample() {
        let d = tempfile::tempdir().unwrap();
        let (md, json) = (d.path().join("B.md"), d.path().join("b.json"));
        write(&results(), &md, &json, "b.svg").unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(
            v["scenarios"][0]["rows"][0]["baseline"]["samples"]
                .as_array()
                .unwrap()
                .len(),
            4
        );
        assert!(std::fs::read_to_string(&md)
            .unwrap()
            .contains("benchmarks/b.json"));
    }
}
