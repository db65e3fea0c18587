//! `cargo xtask test`: the same set-up as the demo, then the whole test suite, then one
//! summary: what passed, what failed, and which tests did not run and why.
//!
//! Tests that need a kind of host this one is not (tier 4: Linux on husk-vmm needs hardware
//! KVM) are marked `#[ignore = "tier 4: …"]`. On a host that can run them they are run with
//! `--include-ignored`; elsewhere they are listed by name as not run, never counted as passed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use husk_hypervisor::host::{self, HostKind};

use crate::run::{elapsed, step};
use crate::{demo, paths};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    /// `(test name, reason)` of tests that were ignored.
    pub not_run: Vec<(String, String)>,
    pub failures: Vec<String>,
}

impl Tally {
    /// Reads one line of libtest's output.
    pub fn line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test ") else {
            return;
        };
        if let Some((name, outcome)) = rest.split_once(" ... ") {
            let outcome = outcome.trim();
            if outcome == "ok" {
                self.passed += 1;
            } else if outcome.starts_with("FAILED") {
                self.failed += 1;
                self.failures.push(name.to_string());
            } else if let Some(reason) = outcome.strip_prefix("ignored") {
                let reason = reason.trim_start_matches(',').trim();
                self.not_run.push((
                    name.to_string(),
                    if reason.is_empty() {
                        "ignored".into()
                    } else {
                        reason.into()
                    },
                ));
            }
        }
    }
}

pub fn run(with_setup: bool, filter: Option<&str>) -> Result<()> {
    let start = Instant::now();
    demo::prepare(with_setup)?;
    let hardware = matches!(host::detect().kind, HostKind::HardwareKvm { .. });
    step(&format!(
        "test: cargo test --workspace{}",
        if hardware {
            " (including tier 4: this host has hardware KVM)"
        } else {
            ""
        }
    ));
    let mut cmd = Command::new(paths::cargo());
    cmd.current_dir(paths::workspace())
        .args(["test", "--workspace", "--no-fail-fast"])
        .env("HUSK_KERNEL", paths::vmlinux())
        .env("HUSK_INITRAMFS", paths::initramfs())
        .env("HUSK_IMAGES", paths::images())
        .arg("--")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(f) = filter {
        cmd.arg(f);
    }
    if hardware {
        cmd.arg("--include-ignored");
    }
    // One test at a time within each test binary: the integration tests boot VMs, which under
    // TCG keep a core busy each; two of them plus their helpers starve each other on a 2-core
    // machine and turn deadlines into noise. (shim_density runs several VMs at once on purpose.)
    cmd.arg("--test-threads=1");
    let mut child = cmd.spawn().context("starting cargo test")?;
    let mut tally = Tally::default();
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(|l| l.ok())
    {
        println!("{line}");
        tally.line(&line);
    }
    let status = child.wait()?;

    println!();
    println!("==> test summary ({})", elapsed(start));
    for f in &tally.failures {
        println!("    FAILED: {f}");
    }
    for (name, why) in &tally.not_run {
        println!("    not run: {name} — {why}");
    }
    println!(
        "summary: {} passed, {} failed, {} skipped",
        tally.passed,
        tally.failed,
        tally.not_run.len()
    );
    if !status.success() || tally.failed > 0 {
        bail!("the test suite failed");
    }
    if tally.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_libtest_output() {
        let mut t = Tally::default();
        for l in [
            "running 3 tests",
            "test a::b ... ok",
            "test c ... FAILED",
            "test linux_on_husk_vmm ... ignored, tier 4: needs hardware KVM",
            "test plain ... ignored",
            "test result: FAILED. 1 passed; 1 failed; 2 ignored",
        ] {
            t.line(l);
        }
        assert_eq!(t.passed, 1);
        assert_eq!(t.failed, 1);
        assert_eq!(t.failures, ["c"]);
        assert_eq!(
            t.not_run,
            [
                (
                    "linux_on_husk_vmm".to_string(),
                    "tier 4: needs hardware KVM".to_string()
                ),
                ("plain".to_string(), "ignored".to_string())
            ]
        );
    }
}
