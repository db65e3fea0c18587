//! `cargo xtask soak [--cycles N]`: the long run of `tests/tests/soak.rs` — N create, start,
//! exec, stop, delete cycles of husk pods (`ctr` pods on a CNI bridge and CRI pods alternating,
//! a few at once) against one containerd, with the host's resources counted every 100 cycles.
//! It fails if anything grew beyond noise, and prints the table. `--record` puts the table,
//! with the date and the machine, in BENCHMARKS.md's "Soak" section (which `cargo xtask bench`
//! keeps).
//!
//! The cycles live in the test (the CRI client is the tests crate's, behind its `cri` feature,
//! which xtask does not build); `cargo xtask test` runs the same test with
//! [`CI_CYCLES`] cycles.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::bench::report::KEPT;
use crate::run::{elapsed, step};
use crate::{demo, paths};

/// What `cargo xtask test` runs (about 3 minutes here: a cycle takes ~9 s with three at once
/// on the 2-core development machine under QEMU TCG).
pub const CI_CYCLES: usize = 50;

/// The cycles of a `cargo xtask soak` without `--cycles`.
pub const DEFAULT_CYCLES: usize = 1000;

pub fn run(cycles: usize, parallel: usize, with_setup: bool, record: bool) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("cargo xtask soak needs root (containerd, CNI, /run/husk) — run it as root");
    }
    if cycles == 0 || parallel == 0 {
        bail!("--cycles and --parallel must be at least 1");
    }
    let start = Instant::now();
    demo::prepare(with_setup)?;
    let began = crate::bench::utc_now();
    step(&format!(
        "soak: {cycles} cycles, {parallel} at once (cargo test -p husk-tests --test soak)"
    ));
    let report = paths::artifacts().join("soak.md");
    let _ = std::fs::remove_file(&report);
    let status = Command::new(paths::cargo())
        .current_dir(paths::workspace())
        .args(["test", "-p", "husk-tests", "--test", "soak", "--"])
        .args(["--nocapture", "--test-threads=1"])
        .env("HUSK_KERNEL", paths::vmlinux())
        .env("HUSK_INITRAMFS", paths::initramfs())
        .env("HUSK_IMAGES", paths::images())
        .env("HUSK_SOAK_CYCLES", cycles.to_string())
        .env("HUSK_SOAK_PARALLEL", parallel.to_string())
        .env("HUSK_SOAK_REPORT", &report)
        .stdin(Stdio::null())
        .status()
        .context("starting cargo test")?;
    let table = std::fs::read_to_string(&report).unwrap_or_default();
    if record && !table.is_empty() {
        let md = paths::workspace().join("BENCHMARKS.md");
        let old = std::fs::read_to_string(&md).unwrap_or_default();
        let section = section(
            &began,
            &crate::bench::machine(),
            cycles,
            parallel,
            status.success(),
            &table,
        );
        std::fs::write(&md, with_soak_section(&old, &section))
            .with_context(|| format!("writing {}", md.display()))?;
        step(&format!("soak: the table is in {}", md.display()));
    }
    if !status.success() {
        bail!(
            "the soak failed after {} (what grew is above; the table is in {})",
            elapsed(start),
            report.display()
        );
    }
    println!("    soak passed in {}", elapsed(start));
    Ok(())
}

/// The "Soak" section of BENCHMARKS.md.
fn section(
    date: &str,
    machine: &str,
    cycles: usize,
    parallel: usize,
    passed: bool,
    table: &str,
) -> String {
    format!(
        "## Soak\n\n`cargo xtask soak --cycles {cycles}` on {date} UTC, on {machine}: `ctr` pods on a \
         CNI bridge and CRI pods alternating, {parallel} at once, each created, started, exec'd \
         into, stopped and deleted, plus an exec in a sentinel pod that runs throughout; the \
         host's resources counted with the sentinel alone at the start and every 100 cycles \
         once the cycles' pods are gone. Result: {}.\n\n{}\n",
        if passed {
            "nothing grew beyond noise"
        } else {
            "FAILED: something grew (see the table)"
        },
        table.trim_end()
    )
}

/// `old` with its soak section replaced by `section` (or added after the marker of what
/// `cargo xtask bench` keeps).
fn with_soak_section(old: &str, section: &str) -> String {
    let mut out = old.trim_end().to_string();
    if !out.contains(KEPT) {
        out.push_str("\n\n");
        out.push_str(KEPT);
        out.push('\n');
    }
    if let Some(start) = out.find("\n## Soak\n") {
        let rest = &out[start + 1..];
        let end = rest[3..]
            .find("\n## ")
            .map_or(out.len(), |i| start + 1 + 3 + i + 1);
        out.replace_range(start + 1..end, section);
        out.truncate(out.trim_end().len());
        out.push('\n');
        return out;
    }
    out.push('\n');
    out.push_str(section);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soak_section_is_added_once_then_replaced() {
        let bench = "# husk benchmarks\n\n## 1. Start\n\nfast\n";
        let s1 = section("2026-12-06 12:00", "a machine", 1000, 3, true, "| a |\n");
        let once = with_soak_section(bench, &s1);
        assert!(once.starts_with(bench.trim_end()), "{once}");
        assert!(
            once.contains(KEPT) && once.contains("| a |") && once.contains("nothing grew"),
            "{once}"
        );
        let s2 = section("2026-12-07 12:00", "a machine", 50, 3, false, "| b |\n");
        let twice = with_soak_section(&once, &s2);
        assert_eq!(twice.matches("## Soak").count(), 1, "{twice}");
        assert_eq!(twice.matches(KEPT).count(), 1, "{twice}");
        assert!(
            twice.contains("| b |") && !twice.contains("| a |") && twice.contains("FAILED"),
            "{twice}"
        );
        // A section after it survives.
        let more = format!("{twice}\n## Later\n\nkept\n");
        let thrice = with_soak_section(&more, &s1);
        assert!(
            thrice.contains("## Later\n\nkept") && thrice.contains("| a |"),
            "{thrice}"
        );
    }
}
