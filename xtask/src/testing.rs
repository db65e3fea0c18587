//! `cargo xtask test`: the same set-up as the demo, then the whole test suite, then one
//! summary: what passed, what failed, and which tests did not run and why.
//!
//! Tier-4 tests (Linux on husk-vmm) are marked `#[ignore = "tier 4: …"]`: they need hardware
//! KVM. On a host that has it they run in the main run with `--include-ignored`; on any other
//! host (kvm_pvm, no KVM) the main run reports them ignored, and they then run in the nested
//! tier ([`crate::nested`]): inside an L1 VM under QEMU TCG with emulated AMD SVM, tallied as
//! `passed (nested, emulated SVM)`. A tier-4 test that cannot run there counts as failed.
//! Other ignored tests are listed by name as not run, never counted as passed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use husk_hypervisor::host::{self, HostKind};

use crate::run::{elapsed, step};
use crate::{demo, nested, paths};

/// The `#[ignore]` reason that marks a tier-4 test.
pub const TIER4: &str = "tier 4";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    /// Names of the tests that passed.
    pub passes: Vec<String>,
    /// Tier-4 tests that passed in the nested tier (also counted in `passed`).
    pub nested_passed: Vec<String>,
    /// What the nested tier had to do besides run the tests (an L1 that hung and was replaced).
    pub nested_notes: Vec<String>,
    /// `(test name, reason)` of tests that were ignored.
    pub not_run: Vec<(String, String)>,
    pub failures: Vec<String>,
    /// A test whose `test NAME ... ` line was cut by another process's output (a child
    /// writing to the inherited stderr): its outcome comes on a later line of its own.
    pending: Option<String>,
    /// Names in libtest's closing `failures:` list, while it is being read.
    failure_list: Option<Vec<String>>,
}

impl Tally {
    /// Reads one line of libtest's output.
    pub fn line(&mut self, line: &str) {
        let trimmed = line.trim();
        if let Some(list) = &mut self.failure_list {
            if let Some(name) = line.strip_prefix("    ").filter(|n| !n.contains(' ')) {
                list.push(name.to_string());
                return;
            }
        }
        if trimmed == "failures:" {
            // libtest prints two blocks so titled; the second (names only) is the one kept.
            self.failure_list = Some(Vec::new());
            return;
        }
        if trimmed.starts_with("test result:") {
            // Backstop: a failure whose own line was garbled is still in libtest's list.
            for name in self.failure_list.take().unwrap_or_default() {
                if !self.failures.contains(&name) {
                    self.failed += 1;
                    self.failures.push(name);
                }
            }
            self.pending = None;
            return;
        }
        if let Some(name) = self.pending.take() {
            if !self.outcome(&name, trimmed) {
                self.pending = Some(name);
            }
        }
        let Some(rest) = line.strip_prefix("test ") else {
            return;
        };
        if let Some((name, outcome)) = rest.split_once(" ... ") {
            if !self.outcome(name, outcome.trim()) {
                self.pending = Some(name.to_string());
            }
        }
    }

    /// Records `outcome` for `name` if it is one of libtest's; false if it is not.
    fn outcome(&mut self, name: &str, outcome: &str) -> bool {
        if outcome == "ok" {
            self.passed += 1;
            self.passes.push(name.to_string());
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
        } else {
            return false;
        }
        true
    }

    /// The tests the main run left ignored as tier 4.
    pub fn tier4(&self) -> Vec<String> {
        self.not_run
            .iter()
            .filter(|(_, why)| why.starts_with(TIER4))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Folds in the nested tier's verdicts on `names`: each is no longer "not run".
    pub fn nested(&mut self, names: &[String], outcome: &nested::Outcome) {
        self.not_run.retain(|(n, _)| !names.contains(n));
        for n in &outcome.passed {
            self.passed += 1;
            self.nested_passed.push(n.clone());
        }
        for (n, why) in &outcome.failed {
            self.failed += 1;
            self.failures
                .push(format!("{n} ({}): {why}", nested::LABEL));
        }
        self.nested_notes.extend(outcome.l1_hangs.iter().cloned());
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
            " (tier 4 afterwards, nested: this host has no hardware KVM)"
        }
    ));
    // The tier-2 tests run the static husk-vmm users get (with the debug hooks they need).
    let husk_vmm = crate::binaries::vmm_for_tests()?;
    let mut cmd = Command::new(paths::cargo());
    cmd.current_dir(paths::workspace())
        .args(["test", "--workspace", "--no-fail-fast"])
        .env("HUSK_VMM", &husk_vmm)
        .env("HUSK_KERNEL", paths::vmlinux())
        .env("HUSK_INITRAMFS", paths::initramfs())
        .env("HUSK_IMAGES", paths::images())
        // tests/tests/soak.rs: a short soak (the long one is `cargo xtask soak`).
        .env("HUSK_SOAK_CYCLES", crate::soak::CI_CYCLES.to_string())
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

    let tier4 = tally.tier4();
    if !hardware && !tier4.is_empty() {
        let outcome = nested::run(&tier4).unwrap_or_else(|e| nested::Outcome {
            failed: tier4
                .iter()
                .map(|n| (n.clone(), format!("the nested tier could not run: {e:#}")))
                .collect(),
            ..nested::Outcome::default()
        });
        tally.nested(&tier4, &outcome);
    }

    println!();
    println!("==> test summary ({})", elapsed(start));
    for n in &tally.nested_passed {
        println!("    passed ({}): {n}", nested::LABEL);
    }
    for n in &tally.nested_notes {
        println!("    note ({}): {n}", nested::LABEL);
    }
    for f in &tally.failures {
        println!("    FAILED: {f}");
    }
    for (name, why) in &tally.not_run {
        println!("    not run: {name} — {why}");
    }
    println!(
        "summary: {} passed{}, {} failed, {} skipped",
        tally.passed,
        if tally.nested_passed.is_empty() {
            String::new()
        } else {
            format!(" ({} of them {})", tally.nested_passed.len(), nested::LABEL)
        },
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
        assert_eq!(t.passes, ["a::b"]);
        assert_eq!(t.tier4(), ["linux_on_husk_vmm"]);
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

    #[test]
    fn outcomes_cut_by_a_childs_stderr_still_count() {
        let mut t = Tally::default();
        for l in [
            "running 3 tests",
            "test exec_and_signals ... husk-agent: request failed (FAILED_PRECONDITION): ex: still running",
            "ok",
            "husk-agent serve: listening on unix:///tmp/x/agent.sock",
            "test malformed_specs ... husk-agent: request failed (INVALID_ARGUMENT): bad",
            "FAILED",
            "test garbled ... husk-agent: FAILED_PRECONDITION, and the outcome was lost",
            "",
            "failures:",
            "",
            "---- malformed_specs stdout ----",
            "thread 'malformed_specs' panicked at tests/tests/x.rs:1:5:",
            "   0: __rustc::rust_begin_unwind",
            "",
            "failures:",
            "    garbled",
            "    malformed_specs",
            "",
            "test result: FAILED. 1 passed; 2 failed; 0 ignored",
        ] {
            t.line(l);
        }
        assert_eq!(t.passes, ["exec_and_signals"]);
        assert_eq!(t.failures, ["malformed_specs", "garbled"]);
        assert_eq!((t.passed, t.failed), (1, 2));
    }

    #[test]
    fn nested_verdicts_replace_not_run() {
        let mut t = Tally::default();
        t.line("test plain ... ok");
        t.line("test linux_a ... ignored, tier 4: needs hardware KVM");
        t.line("test linux_b ... ignored, tier 4: needs hardware KVM");
        t.line("test other ... ignored, needs a GPU");
        let tier4 = t.tier4();
        assert_eq!(tier4, ["linux_a", "linux_b"]);
        t.nested(
            &tier4,
            &nested::Outcome {
                passed: vec!["linux_a".into()],
                failed: vec![("linux_b".into(), "failed in L1 (x)".into())],
                ..nested::Outcome::default()
            },
        );
        assert_eq!(t.passed, 2);
        assert_eq!(t.nested_passed, ["linux_a"]);
        assert_eq!(t.failed, 1);
        assert_eq!(
            t.failures,
            ["linux_b (nested, emulated SVM): failed in L1 (x)"]
        );
        assert_eq!(
            t.not_run,
            [("other".to_string(), "needs a GPU".to_string())]
        );
    }
}
