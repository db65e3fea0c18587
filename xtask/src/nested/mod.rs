//! The nested tier of `cargo xtask test`: tier-4 tests (Linux on husk-vmm) on a host whose
//! KVM cannot run our Linux guest (kvm_pvm, or no KVM) run inside an L1 VM that QEMU's TCG
//! runs with emulated AMD SVM (`-cpu max`), where Debian's kvm_amd gives a real `/dev/kvm`
//! (FIELD-NOTES, "Linux on husk-vmm here").
//!
//! The steps: find the test executables that hold the tier-4 tests (`cargo test --no-run
//! --message-format=json`, then `<exe> --list --ignored`), take the release husk-vmm, get the L1 kernel
//! ([`l1`], cached), pack L1's small initramfs ([`initramfs`]: busybox and modules), boot L1
//! once on the host's `/` (read-only virtio-9p, a tmpfs overlay: containerd, runc, the CNI
//! plugins, the shim and the test binaries at their host paths) and run each test with
//! `<exe> --include-ignored --exact <test>`. Results come back on L1's second serial port
//! as libtest's own lines between marker lines ([`L1Results`]); L1's console (first port)
//! is kept for the failure report.
//!
//! The tier-4 tests are Linux on husk-vmm (`tests/tests/husk_vmm_linux.rs`) and the full
//! stack on husk-vmm (`tests/tests/husk_vmm_stack.rs`: containerd, `ctr run`, exec, stdio,
//! exit codes, a CNI pod network with HTTP from L1, nothing left behind) — a handful of
//! tests, not the tier-3 suite again: under TCG each L2 boot costs seconds, and the tier-3
//! files already run every path on QEMU; what is new here is the VMM under them.

pub mod bzimage;
pub mod initramfs;
pub mod l1;
pub mod linux_boot;
pub mod pod_probe;
pub mod probe;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::run::{elapsed, output, step};
use crate::testing::Tally;
use crate::{paths, run};

/// How the summary labels a test that passed here.
pub const LABEL: &str = "nested, emulated SVM";

/// L1's shape: the measured recipe. One vCPU (`-smp 2` does not help on 2 cores). Memory: see
/// [`memory`].
const QEMU_ARGS: &[&str] = &[
    "-accel",
    "tcg,thread=multi",
    "-cpu",
    "max",
    "-machine",
    "q35",
    "-smp",
    "1",
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
    "-nic",
    "none",
];
/// No output from L1 for this long means it is hung (see [`boot`]): every test prints when it
/// starts and ends, and the slowest takes under a minute in L1.
const L1_STALL: Duration = Duration::from_secs(150);
/// How often the runner asks QEMU's monitor whether L1's vCPU is wedged (see [`boot`]).
const WEDGE_LOOK_EVERY: Duration = Duration::from_secs(5);
/// L1 boots a nested run may take: a hung L1 is replaced by a fresh one for the tests it had
/// not finished (see [`run`]).
const L1_ATTEMPTS: usize = 8;
const L1_CMDLINE: &str = "console=ttyS0 panic=-1 loglevel=4";

/// L1's kernel command line: [`L1_CMDLINE`] and `extra`.
fn l1_cmdline(extra: &[&str]) -> String {
    std::iter::once(L1_CMDLINE)
        .chain(extra.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// L1's memory: packed, 1 GiB holds the tmpfs root (~100 MB) and a 256 MiB L2. On the host's
/// `/`, 2 GiB: the page cache of what L1 reads over 9p (containerd, the test binary: ~150
/// MB), containerd's snapshots and state on tmpfs, a few L2s of 256 MiB each at once
/// (`ctr run` of one pod while another is deleted). QEMU's TCG allocates it as L1 touches it.
fn memory(root: initramfs::Root) -> &'static str {
    match root {
        initramfs::Root::Packed => "1G",
        initramfs::Root::HostExport => "2G",
    }
}

/// QEMU's arguments for L1's root: the host's `/` as read-only virtio-9p (`multidevs=remap`:
/// `/` spans several host filesystems, whose inode numbers would collide in L1).
fn root_args(root: initramfs::Root) -> Vec<String> {
    let mut v = vec!["-m".to_string(), memory(root).to_string()];
    if root == initramfs::Root::HostExport {
        v.extend([
            "-fsdev".to_string(),
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap".to_string(),
            "-device".to_string(),
            format!(
                "virtio-9p-pci,fsdev=hostroot,mount_tag={}",
                initramfs::EXPORT_TAG
            ),
        ]);
    }
    v
}

/// What L1 must keep seeing at its host path under the fresh tmpfs of `/tmp`, `/run` and
/// `/var/tmp`: the workspace (CI clones it anywhere, `/tmp` included), and the directory of
/// each test binary and artefact outside it (a `CARGO_TARGET_DIR` elsewhere). Nested paths
/// collapse into the outermost.
fn kept_dirs(binaries: &[TestBinary], husk_vmm: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![paths::workspace()];
    let files = binaries.iter().map(|b| b.path.clone()).chain([
        husk_vmm.to_path_buf(),
        paths::vmlinux(),
        paths::initramfs(),
    ]);
    dirs.extend(files.filter_map(|f| f.parent().map(Path::to_path_buf)));
    dirs.push(paths::images());
    outermost(dirs)
}

/// `dirs` without those inside another of them, sorted.
fn outermost(mut dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    dirs.sort();
    dirs.dedup();
    let all = dirs.clone();
    dirs.retain(|d| !all.iter().any(|o| o != d && d.starts_with(o)));
    dirs
}

/// A test executable and the tier-4 tests in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    /// The cargo target name (`husk_vmm_linux`).
    pub name: String,
    pub path: PathBuf,
    pub tests: Vec<String>,
}

/// A test that did not pass, and why.
pub type Failed = (String, String);

/// What came back from L1.
#[derive(Debug, Default)]
pub struct Outcome {
    pub passed: Vec<String>,
    pub failed: Vec<Failed>,
    /// L1 boot to its stage 2 ready line, as L1's own uptime said.
    pub l1_up: Option<String>,
    /// `(test, seconds)`: each test's time in L1, on L1's clock.
    pub took: Vec<(String, String)>,
    /// Each L1 that hung and was replaced by a fresh one: which test it hung in, and how.
    pub l1_hangs: Vec<String>,
}

/// `(target name, executable)` of every test artifact in cargo's JSON messages.
pub fn parse_test_artifacts(json_lines: &str) -> Vec<(String, PathBuf)> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["profile"]["test"] == true)
        .filter_map(|v| {
            Some((
                v["target"]["name"].as_str()?.to_string(),
                PathBuf::from(v["executable"].as_str()?),
            ))
        })
        .collect()
}

/// Test names in `<exe> --list` output (`name: test`).
pub fn parse_list(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

/// What L1's results port said: markers and libtest lines.
#[derive(Debug, Default)]
pub struct L1Results {
    pub tally: Tally,
    pub l1_up: Option<String>,
    /// `(binary, exit code)` per `END` marker.
    pub ended: Vec<(String, i32)>,
    /// `(test, seconds)` per `TOOK` marker.
    pub took: Vec<(String, String)>,
    /// L1's QEMU: its peak resident set on the host, KiB.
    pub qemu_peak_rss_kib: Option<u64>,
    pub fail: Option<String>,
    /// L1 stopped making progress and was killed ([`L1_STALL`]).
    pub hung: bool,
    /// What QEMU's monitor showed twice when L1 was seen hung that way
    /// ([`halted_with_interrupt_pending`]).
    pub wedged: Option<String>,
    /// Where a hung L1's vCPU was when it was given up on ([`hung_l1_report`]).
    pub hang_report: Option<String>,
    pub done: bool,
    /// The boot probe's samples (JSON) and failed boots.
    pub samples: Vec<String>,
    pub failed_samples: Vec<String>,
}

impl L1Results {
    /// A probe's samples (JSON, as `T`), and what failed: its failed samples, then L1's own
    /// failure if it had one.
    pub fn parse_samples<T: serde::de::DeserializeOwned>(&self) -> Result<(Vec<T>, Vec<String>)> {
        let samples = self
            .samples
            .iter()
            .map(|s| serde_json::from_str(s).with_context(|| format!("a sample from L1: {s}")))
            .collect::<Result<Vec<T>>>()?;
        let mut failed = self.failed_samples.clone();
        if let Some(f) = &self.fail {
            failed.push(format!("L1: {f}"));
        }
        Ok((samples, failed))
    }

    pub fn line(&mut self, line: &str) {
        let line = line.trim_end_matches('\r');
        let Some(m) = line
            .strip_prefix(initramfs::MARKER)
            .and_then(|m| m.strip_prefix(' '))
        else {
            self.tally.line(line);
            return;
        };
        if let Some(up) = m.strip_prefix("L1 up ") {
            self.l1_up = Some(up.to_string());
        } else if let Some(end) = m.strip_prefix("END ") {
            if let Some((bin, code)) = end.rsplit_once(' ') {
                self.ended
                    .push((bin.to_string(), code.trim().parse().unwrap_or(-1)));
            }
        } else if let Some(took) = m.strip_prefix("TOOK ") {
            if let Some((test, secs)) = took.rsplit_once(' ') {
                self.took.push((test.to_string(), secs.to_string()));
            }
        } else if let Some(why) = m.strip_prefix("FAIL ") {
            self.fail = Some(why.to_string());
        } else if let Some(json) = m.strip_prefix("SAMPLE ") {
            self.samples.push(json.to_string());
        } else if let Some(why) = m.strip_prefix("SAMPLE-FAILED ") {
            self.failed_samples.push(why.to_string());
        } else if m == "DONE" {
            self.done = true;
        }
    }

    /// The verdict on each expected test: passed only on libtest's own `ok`.
    pub fn outcome(&self, binaries: &[TestBinary]) -> Outcome {
        let mut o = Outcome {
            l1_up: self.l1_up.clone(),
            took: self.took.clone(),
            ..Outcome::default()
        };
        for b in binaries {
            let end = self.ended.iter().find(|(n, _)| *n == b.name);
            for t in &b.tests {
                if self.tally.passes.contains(t) {
                    o.passed.push(t.clone());
                    continue;
                }
                let why = if self.tally.failures.contains(t) {
                    format!("failed in L1 ({})", b.name)
                } else if let Some(f) = &self.fail {
                    if self.hung {
                        format!("no result: {f}")
                    } else {
                        format!("L1 failed before the tests: {f}")
                    }
                } else if let Some((_, code)) = end {
                    format!("no result from {} in L1 (exit {code})", b.name)
                } else {
                    format!("no result: L1 ended before {} finished", b.name)
                };
                o.failed.push((t.clone(), why));
            }
        }
        o
    }
}

fn cargo() -> Command {
    let mut c = Command::new(paths::cargo());
    c.current_dir(paths::workspace());
    c
}

/// Runs cargo with `--message-format=json`; its JSON lines, and on failure what went wrong
/// (the compiler's errors, not the JSON).
fn cargo_json(args: &[&str]) -> Result<(String, Option<String>)> {
    let mut cmd = cargo();
    cmd.args(args)
        .arg("--message-format=json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = run::show(&cmd);
    let out = cmd
        .output()
        .with_context(|| format!("starting `{shown}`"))?;
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok((json, None));
    }
    let errors: Vec<String> = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-message" && v["message"]["level"] == "error")
        .filter_map(|v| v["message"]["rendered"].as_str().map(str::to_string))
        .collect();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr: Vec<&str> = stderr.lines().collect();
    Ok((
        json,
        Some(format!(
            "`{shown}` failed ({}):\n{}{}",
            out.status,
            errors.join(""),
            stderr[stderr.len().saturating_sub(10)..].join("\n")
        )),
    ))
}

/// The test executables that hold `names`, each with the ones it holds; the names no
/// executable holds (with why, if cargo failed to build some).
fn find_binaries(names: &[String]) -> Result<(Vec<TestBinary>, Vec<Failed>)> {
    // --no-fail-fast: a test target that does not compile (someone else's) does not keep the
    // others from being built and listed.
    let (json, build_error) = cargo_json(&["test", "--workspace", "--no-run", "--no-fail-fast"])?;
    let mut found: Vec<TestBinary> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for (target, exe) in parse_test_artifacts(&json) {
        // Every test target of this workspace uses libtest (no `harness = false`), so
        // `--list` only lists.
        let list = output(Command::new(&exe).args(["--list", "--ignored"]))
            .with_context(|| format!("listing the ignored tests of {}", exe.display()))?;
        let tests: Vec<String> = parse_list(&list)
            .into_iter()
            .filter(|t| names.contains(t))
            .collect();
        if tests.is_empty() {
            continue;
        }
        seen.extend(tests.iter().cloned());
        // Two test binaries of one name (a unit and an integration target) get their own slots.
        let name = if found.iter().any(|b| b.name == target) {
            format!("{target}-{}", found.len())
        } else {
            target
        };
        found.push(TestBinary {
            name,
            path: exe,
            tests,
        });
    }
    let why = match &build_error {
        Some(e) => format!("no test executable lists it as ignored; the build failed: {e}"),
        None => "no test executable lists it as ignored".to_string(),
    };
    let missing = names
        .iter()
        .filter(|n| !seen.contains(n))
        .map(|n| (n.clone(), why.clone()))
        .collect();
    Ok((found, missing))
}

/// The tier-4 tests of the workspace whose names contain `filter`: libtest lists each
/// ignored test (`--list --ignored`), and running those names without `--ignored` prints
/// each one's reason without running it (`test NAME ... ignored, tier 4: …`).
pub fn tier4_tests(filter: Option<&str>) -> Result<Vec<String>> {
    let (json, build_error) = cargo_json(&["test", "--workspace", "--no-run", "--no-fail-fast"])?;
    if let Some(e) = build_error {
        bail!("building the test executables: {e}");
    }
    let mut names = Vec::new();
    for (_, exe) in parse_test_artifacts(&json) {
        let list = output(Command::new(&exe).args(["--list", "--ignored"]))
            .with_context(|| format!("listing the ignored tests of {}", exe.display()))?;
        let ignored: Vec<String> = parse_list(&list)
            .into_iter()
            .filter(|t| filter.map_or(true, |f| t.contains(f)))
            .collect();
        if ignored.is_empty() {
            continue;
        }
        let reasons = output(Command::new(&exe).arg("--exact").args(&ignored))
            .with_context(|| format!("reading why {} ignores its tests", exe.display()))?;
        let mut tally = Tally::default();
        reasons.lines().for_each(|l| tally.line(l));
        names.extend(tally.tier4());
    }
    Ok(names)
}

/// `cargo xtask nested-test [FILTER]`: the nested tier alone (after `cargo xtask build`), with
/// the summary `cargo xtask test` gives its tests.
pub fn run_alone(filter: Option<&str>) -> Result<()> {
    let start = Instant::now();
    let names = tier4_tests(filter)?;
    if names.is_empty() {
        bail!(
            "no tier-4 test{} — tier-4 tests are #[ignore = \"tier 4: …\"]",
            filter.map_or(String::new(), |f| format!(" matches {f:?}"))
        );
    }
    let outcome = run(&names)?;
    println!();
    println!("==> nested tier summary ({})", elapsed(start));
    for n in &outcome.passed {
        println!("    passed ({LABEL}): {n}");
    }
    for n in &outcome.l1_hangs {
        println!("    note ({LABEL}): {n}");
    }
    for (n, why) in &outcome.failed {
        println!("    FAILED: {n} ({LABEL}): {why}");
    }
    println!(
        "summary: {} passed, {} failed",
        outcome.passed.len(),
        outcome.failed.len()
    );
    if !outcome.failed.is_empty() {
        bail!("the nested tier failed");
    }
    Ok(())
}

/// The last `n` lines of a file, for a failure report.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs the tier-4 tests `names` inside L1. An `Err` means the tier could not run at all
/// (every one of `names` then counts as failed); test failures are in the [`Outcome`].
pub fn run(names: &[String]) -> Result<Outcome> {
    let start = Instant::now();
    step(&format!(
        "test: tier 4 nested ({}): {} test(s) in an L1 VM under QEMU TCG with emulated AMD SVM",
        LABEL,
        names.len()
    ));
    let (binaries, mut outcome_missing) = find_binaries(names)?;
    // Quick when the main run built everything; a rebuild here means the sources changed since.
    println!(
        "    test executables found in {}: {}",
        elapsed(start),
        binaries
            .iter()
            .map(|b| format!("{} ({})", b.name, b.tests.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if binaries.is_empty() {
        return Ok(Outcome {
            failed: outcome_missing,
            ..Outcome::default()
        });
    }
    let qemu = paths::find_program("qemu-system-x86_64").context(
        "qemu-system-x86_64 not found — apt-get install qemu-system-x86 (cargo xtask setup)",
    )?;
    let busybox = paths::find_program("busybox")
        .context("busybox not found — apt-get install busybox-static (cargo xtask setup)")?;
    // The static release build `cargo xtask build` made (the one users run; demo::prepare,
    // which `cargo xtask test` runs first, built it).
    let husk_vmm = linux_boot::husk_vmm()?;
    let l1 = l1::get()?;

    let dir = paths::artifacts().join("nested");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut outcome = Outcome::default();
    let mut pending = binaries;
    for attempt in 1..=L1_ATTEMPTS {
        let last = attempt == L1_ATTEMPTS;
        let results = run_in_l1(&l1, &qemu, &busybox, &husk_vmm, &pending, &dir)?;
        let o = results.outcome(&pending);
        outcome.l1_up = outcome.l1_up.or(o.l1_up);
        outcome.took.extend(o.took);
        outcome.passed.extend(o.passed);
        let report = |logs: &Path| {
            println!(
                "    L1 results port ({}), last lines:\n{}",
                logs.join("results.log").display(),
                indent(&tail(&logs.join("results.log"), 60))
            );
            println!(
                "    L1 console ({}), last lines:\n{}",
                logs.join("console.log").display(),
                indent(&tail(&logs.join("console.log"), 60))
            );
            if let Some(r) = &results.hang_report {
                let r = r.replace(
                    &dir.join("l1-hung.txt").display().to_string(),
                    &logs.join("l1-hung.txt").display().to_string(),
                );
                println!("    L1 hung; its vCPU then (QEMU monitor):\n{}", indent(&r));
            }
        };
        if results.wedged.is_some() && !last {
            // The tests with libtest's verdict keep it; the one L1 hung in, and those it never
            // reached, run again on a fresh L1. Only for this hang: L1's whole machine stopped,
            // its one vCPU halted over a timer interrupt it never takes (QEMU's emulated SVM,
            // FIELD-NOTES), below anything the test or husk-vmm can do; the summary names each
            // one. Silence for any other reason (a test that hangs) fails as it is.
            let (unfinished, rerun) = unfinished(std::mem::take(&mut pending), &results.tally);
            outcome.failed.extend(
                o.failed
                    .into_iter()
                    .filter(|(t, _)| !unfinished.contains(t)),
            );
            let during = unfinished.first().cloned().unwrap_or_default();
            let kept = dir.join(format!("attempt-{attempt}"));
            let _ = std::fs::create_dir_all(&kept);
            for f in ["console.log", "results.log", "qemu.log", "l1-hung.txt"] {
                let _ = std::fs::rename(dir.join(f), kept.join(f));
            }
            report(&kept);
            let note = format!(
                "L1 {attempt} of at most {L1_ATTEMPTS} hung during {during} ({}; its logs: {}); {} test(s) ran again on a fresh L1",
                results.fail.as_deref().unwrap_or("no reason recorded"),
                kept.display(),
                unfinished.len()
            );
            println!("    {note}");
            outcome.l1_hangs.push(note);
            pending = rerun;
            continue;
        }
        outcome.failed.extend(o.failed);
        if !outcome.failed.is_empty() {
            report(&dir);
        }
        if let Some(kib) = results.qemu_peak_rss_kib {
            println!("    L1's QEMU peak RSS on the host: {} MiB", kib / 1024);
        }
        break;
    }
    outcome.failed.append(&mut outcome_missing);
    let took = elapsed(start);
    println!(
        "    nested tier: {} passed, {} failed in {took} (L1 up at {}{})",
        outcome.passed.len(),
        outcome.failed.len(),
        outcome.l1_up.as_deref().unwrap_or("?"),
        if outcome.l1_hangs.is_empty() {
            String::new()
        } else {
            match outcome.l1_hangs.len() {
                1 => "; 1 L1 hung and was replaced".to_string(),
                n => format!("; {n} L1s hung and were replaced"),
            }
        }
    );
    for (test, secs) in &outcome.took {
        println!("    in L1: {test} took {secs} s");
    }
    Ok(outcome)
}

/// The tests of `tried` that have no verdict in `tally` (the one L1 was in when it hung, then
/// those it never reached), in order, and the binaries to run them again.
fn unfinished(tried: Vec<TestBinary>, tally: &Tally) -> (Vec<String>, Vec<TestBinary>) {
    let names: Vec<String> = tried
        .iter()
        .flat_map(|b| b.tests.iter())
        .filter(|t| !tally.passes.contains(t) && !tally.failures.contains(t))
        .cloned()
        .collect();
    let rerun = tried
        .into_iter()
        .filter_map(|mut b| {
            b.tests.retain(|t| names.contains(t));
            (!b.tests.is_empty()).then_some(b)
        })
        .collect();
    (names, rerun)
}

/// Packs `inputs` into `dir/l1.cpio` (its work directory removed after) and boots L1 on it
/// ([`boot`]): for a probe whose samples come back on the results port.
pub fn pack_and_boot(
    qemu: &Path,
    inputs: &initramfs::Inputs,
    dir: &Path,
    deadline: Duration,
    l1_args: &[&str],
) -> Result<L1Results> {
    let cpio = dir.join("l1.cpio");
    initramfs::build(inputs, &cpio, &dir.join("work"))?;
    let _ = std::fs::remove_dir_all(dir.join("work"));
    boot(
        qemu,
        &inputs.l1.vmlinux,
        &cpio,
        dir,
        deadline,
        inputs.root,
        l1_args,
    )
}

/// Packs an L1 that runs `binaries`' tests and boots it; what came back.
fn run_in_l1(
    l1: &l1::L1Kernel,
    qemu: &Path,
    busybox: &Path,
    husk_vmm: &Path,
    binaries: &[TestBinary],
    dir: &Path,
) -> Result<L1Results> {
    let cpio = dir.join("l1.cpio");
    let packed = Instant::now();
    // L1 sees the host's `/`: the programs are where the host has them, found as the main run
    // finds them (its PATH), the artefacts where the main run's tests take them.
    let env: Vec<(String, String)> = vec![
        ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
        ("HUSK_VMM".into(), husk_vmm.display().to_string()),
        ("HUSK_KERNEL".into(), paths::vmlinux().display().to_string()),
        (
            "HUSK_INITRAMFS".into(),
            paths::initramfs().display().to_string(),
        ),
        ("HUSK_IMAGES".into(), paths::images().display().to_string()),
    ];
    initramfs::build(
        &initramfs::Inputs {
            l1,
            root: initramfs::Root::HostExport,
            busybox: busybox.to_path_buf(),
            programs: Vec::new(),
            files: Vec::new(),
            guest_kernel: paths::vmlinux(),
            guest_initramfs: paths::initramfs(),
            body: initramfs::tests_body(binaries),
            env,
            keep: kept_dirs(binaries, husk_vmm),
        },
        &cpio,
        &dir.join("work"),
    )?;
    let _ = std::fs::remove_dir_all(dir.join("work"));
    println!(
        "    L1: {} + {} ({:.0} MB, packed in {}), root: the host's / read-only over virtio-9p",
        l1.package,
        cpio.display(),
        std::fs::metadata(&cpio).map_or(0.0, |m| m.len() as f64 / 1e6),
        elapsed(packed),
    );
    let tests: usize = binaries.iter().map(|b| b.tests.len()).sum();
    // L1 boots in ~3 s, each test boots L2 in 3–7 s; a test's own deadlines are well inside.
    let deadline = Duration::from_secs(120 + 240 * tests as u64);
    boot(
        qemu,
        &l1.vmlinux,
        &cpio,
        dir,
        deadline,
        initramfs::Root::HostExport,
        &[],
    )
}

/// What L1's QEMU says about its vCPU, sampled three times a second apart (registers, the
/// instructions at RIP, the local APIC: whether RIP moves, what is pending), saved to `save` in
/// full; returns the registers' and instructions' lines for the report.
fn hung_l1_report(monitor: &Path, save: &Path) -> String {
    let mut full = String::new();
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        for cmd in ["info registers", "x/4i $pc", "info lapic"] {
            let out = hmp(monitor, cmd).unwrap_or_else(|e| format!("(monitor: {e:#})"));
            full.push_str(&format!("--- sample {i}: {cmd}\n{out}\n"));
        }
    }
    let _ = std::fs::write(save, &full);
    let summary: Vec<&str> = full
        .lines()
        .filter(|l| {
            l.starts_with("---")
                || l.starts_with("RIP=")
                || l.starts_with("CS =")
                || l.starts_with("CR0=")
                || l.starts_with("EFER=")
                || l.starts_with("0x")
                || l.starts_with("(monitor")
        })
        .collect();
    format!("{}\n(all of it: {})", summary.join("\n"), save.display())
}

/// `Some("RIP=… IRR …")` when QEMU's monitor shows L1's vCPU halted with interrupts enabled and
/// an interrupt in its local APIC's IRR above the processor priority: one it should have been
/// woken for. `None` otherwise, or when the monitor does not answer.
fn halted_with_interrupt_pending(monitor: &Path) -> Option<String> {
    let regs = hmp(monitor, "info registers").ok()?;
    let lapic = hmp(monitor, "info lapic").ok()?;
    wedged_state(&regs, &lapic)
}

/// [`halted_with_interrupt_pending`] on the monitor's text.
fn wedged_state(regs: &str, lapic: &str) -> Option<String> {
    let line = regs.lines().find(|l| l.starts_with("RIP="))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_string)
    };
    let rip = field("RIP=")?;
    let rfl = u64::from_str_radix(&field("RFL=")?, 16).ok()?;
    if field("HLT=")? != "1" || rfl & 0x200 == 0 {
        return None;
    }
    let irr: Vec<u32> = lapic
        .lines()
        .find_map(|l| l.strip_prefix("IRR"))?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let ppr = lapic
        .lines()
        .find(|l| l.contains("PPR"))?
        .split_whitespace()
        .skip_while(|w| *w != "PPR")
        .nth(1)
        .and_then(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok())?;
    let deliverable: Vec<String> = irr
        .iter()
        .filter(|v| (*v & 0xf0) > (ppr & 0xf0))
        .map(u32::to_string)
        .collect();
    if deliverable.is_empty() {
        return None;
    }
    Some(format!(
        "RIP={rip} HLT=1 IF=1, IRR {} above PPR {ppr:#x}",
        deliverable.join(" ")
    ))
}

/// One human-monitor command over QEMU's monitor socket; its output.
fn hmp(socket: &Path, command: &str) -> Result<String> {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let read_prompt = |s: &mut UnixStream| -> Result<String> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // The monitor's output is bounded (registers, a few instructions); so is this.
        while !got.ends_with(b"(qemu) ") && got.len() < 1 << 20 {
            let n = s.read(&mut buf).context("reading the monitor")?;
            if n == 0 {
                bail!("the monitor closed");
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&got).into_owned())
    };
    read_prompt(&mut s)?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let out = read_prompt(&mut s)?;
    // The terminal echo of the command and the next prompt are not its output; the monitor
    // draws with escape sequences and carriage returns.
    let out = out.replace('\r', "");
    let mut lines: Vec<&str> = out.lines().filter(|l| !l.contains('\x1b')).collect();
    if lines.last().is_some_and(|l| l.starts_with("(qemu)")) {
        lines.pop();
    }
    Ok(lines.join("\n"))
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("      | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `VmHWM` (peak resident set, KiB) in a `/proc/<pid>/status`.
fn vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Boots L1 (`l1_args` added to its kernel command line), follows its results port until L1
/// powers off or the deadline passes.
pub fn boot(
    qemu: &Path,
    vmlinux: &Path,
    cpio: &Path,
    dir: &Path,
    deadline: Duration,
    root: initramfs::Root,
    l1_args: &[&str],
) -> Result<L1Results> {
    let console = dir.join("console.log");
    let results_log = dir.join("results.log");
    let stderr_log = dir.join("qemu.log");
    // In /tmp, not `dir`: a socket path longer than 107 bytes cannot be bound, and CI may
    // clone the workspace anywhere. One L1 at a time per runner process.
    let monitor = PathBuf::from(format!("/tmp/husk-l1-monitor-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&monitor);
    let mut cmd = Command::new(qemu);
    cmd.args(QEMU_ARGS)
        // For a hung L1's report: where its vCPU is (`hung_l1_report`).
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .args(root_args(root))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results_log.display()))
        .arg("-kernel")
        .arg(vmlinux)
        .arg("-initrd")
        .arg(cpio)
        .arg("-append")
        .arg(l1_cmdline(l1_args))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_log)?);
    println!("    {}", run::show(&cmd));
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let mut results = L1Results::default();
    let mut pending = String::new();
    let mut offset = 0usize;
    let mut feed = |results: &mut L1Results| {
        let Ok(mut f) = std::fs::File::open(&results_log) else {
            return;
        };
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() || buf.len() <= offset {
            return;
        }
        pending.push_str(&String::from_utf8_lossy(&buf[offset..]));
        offset = buf.len();
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            let line = line.trim_end();
            println!("    [L1 {:5.1}s] {line}", started.elapsed().as_secs_f64());
            results.line(line);
        }
    };
    let mut done_at: Option<Instant> = None;
    // Two ways to see that L1 is hung (FIELD-NOTES, "L1 hangs"): QEMU's monitor shows its vCPU
    // halted with an interrupt it should take pending, the same at two looks a few seconds
    // apart (a live L1 takes it within microseconds); or, whatever the cause, neither of its
    // ports printed for `L1_STALL` (each test prints as it starts and ends, and takes under a
    // minute). Either way waiting out the deadline tells nothing more.
    let mut progress = (0u64, 0u64, Instant::now());
    let mut wedged_look: (Instant, Option<String>) = (Instant::now(), None);
    let mut stalled;
    let status = loop {
        feed(&mut results);
        let sizes = (
            std::fs::metadata(&console).map_or(0, |m| m.len()),
            std::fs::metadata(&results_log).map_or(0, |m| m.len()),
        );
        if sizes != (progress.0, progress.1) {
            progress = (sizes.0, sizes.1, Instant::now());
        }
        stalled = !results.done && progress.2.elapsed() > L1_STALL;
        if !results.done && wedged_look.0.elapsed() > WEDGE_LOOK_EVERY {
            let now = halted_with_interrupt_pending(&monitor);
            if now.is_some() && now == wedged_look.1 {
                stalled = true;
                results.wedged = now.clone();
            }
            wedged_look = (Instant::now(), now);
        }
        // QEMU's peak RSS so far (its VmHWM; read while it still runs): L1's cost to the host.
        if let Some(kib) = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .ok()
            .and_then(|st| vm_hwm_kib(&st))
        {
            results.qemu_peak_rss_kib = Some(kib);
        }
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        // After DONE, L1 powers off at once; do not wait out the deadline if it hangs.
        let done_grace = results.done
            && done_at.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(15);
        if started.elapsed() > deadline || done_grace || stalled {
            if !results.done {
                results.hang_report = Some(hung_l1_report(&monitor, &dir.join("l1-hung.txt")));
            }
            // Our own child, by its handle.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = std::fs::remove_file(&monitor);
    feed(&mut results);
    if !pending.trim().is_empty() {
        results.line(pending.trim_end());
    }
    match status {
        // DONE came, but L1 did not power off: the results are complete all the same.
        None if results.done => {}
        None => {
            results.hung = stalled;
            let why = if let Some(w) = &results.wedged {
                format!("L1 hung: its vCPU halted with an interrupt pending that it never took ({w}; killed)")
            } else if stalled {
                format!(
                    "L1 hung: no output on its console or results port for {}s (killed)",
                    L1_STALL.as_secs()
                )
            } else {
                format!("L1 did not finish within {}s (killed)", deadline.as_secs())
            };
            results.fail.get_or_insert(why);
        }
        Some(st) if !results.done && results.fail.is_none() => {
            let qemu_err = tail(&stderr_log, 10);
            results.fail = Some(format!(
                "QEMU ended ({st}) before L1 said DONE{}",
                if qemu_err.is_empty() {
                    String::new()
                } else {
                    format!("; QEMU said: {qemu_err}")
                }
            ));
        }
        Some(_) => {}
    }
    if !results.done && results.tally.passes.is_empty() && results.l1_up.is_none() {
        bail!(
            "L1 did not reach the tests: {}\nL1 console ({}), last lines:\n{}",
            results.fail.as_deref().unwrap_or("no results"),
            console.display(),
            indent(&tail(&console, 60))
        );
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_directories_are_the_outermost_ones() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            outermost(vec![
                p("/tmp/ci/target/debug/deps"),
                p("/tmp/ci"),
                p("/srv/target/release"),
                p("/tmp/ci"),
                p("/tmp/cix"),
            ]),
            [p("/srv/target/release"), p("/tmp/ci"), p("/tmp/cix")]
        );
        // The workspace is always kept, whatever else is.
        assert!(kept_dirs(&[], Path::new("/x/husk-vmm")).contains(&paths::workspace()));
    }

    #[test]
    fn l1_cmdline_adds_the_extra_arguments() {
        assert_eq!(l1_cmdline(&[]), L1_CMDLINE);
        assert_eq!(
            l1_cmdline(&["init_on_free=1"]),
            "console=ttyS0 panic=-1 loglevel=4 init_on_free=1"
        );
    }

    fn bin(name: &str, tests: &[&str]) -> TestBinary {
        TestBinary {
            name: name.into(),
            path: PathBuf::from("/x"),
            tests: tests.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn a_vcpu_halted_over_a_pending_interrupt_is_wedged() {
        // As QEMU 7.2's monitor showed a hung L1 (2026-12-07).
        let regs = "CPU#0\nRAX=000000000001ad40 RBX=0000000000000000\n\
                    RIP=ffffffff81a592eb RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n\
                    ES =0000 0000000000000000 00000000 00000000";
        let lapic = "dumping local APIC state for CPU 0 \n\n\
                     LVTT\t 0x000000ec active-hi edge                 one-shot     Fixed  (vec 236)\n\
                     Timer\t DCR=0x3 (divide by 16) initial_count = 95069 current_count = 0\n\
                     ISR\t (none)\nIRR\t 236 \n\nAPR 0x00 TPR 0x10 DFR 0x0f LDR 0x01 PPR 0x10";
        assert_eq!(
            wedged_state(regs, lapic).as_deref(),
            Some("RIP=ffffffff81a592eb HLT=1 IF=1, IRR 236 above PPR 0x10")
        );
        // Running, or halted with nothing to take, or with interrupts off: not wedged.
        assert_eq!(wedged_state(&regs.replace("HLT=1", "HLT=0"), lapic), None);
        assert_eq!(
            wedged_state(regs, &lapic.replace("IRR\t 236 ", "IRR\t (none)")),
            None
        );
        assert_eq!(
            wedged_state(&regs.replace("RFL=00000246", "RFL=00000046"), lapic),
            None
        );
        assert_eq!(
            wedged_state(regs, &lapic.replace("PPR 0x10", "PPR 0xf0")),
            None
        );
    }

    #[test]
    fn a_hung_l1_leaves_its_unfinished_tests_to_the_next() {
        let mut tally = Tally::default();
        for l in [
            "test a1 ... ok",
            "test a2 ... FAILED",
            "test b1 ... ok",
            "test b2 ... ",
        ] {
            tally.line(l);
        }
        let (names, rerun) = unfinished(
            vec![bin("a", &["a1", "a2"]), bin("b", &["b1", "b2", "b3"])],
            &tally,
        );
        // The one L1 hung in first, then the one it never reached; verdicts stay.
        assert_eq!(names, ["b2", "b3"]);
        assert_eq!(rerun, [bin("b", &["b2", "b3"])]);
        let (names, rerun) = unfinished(vec![bin("a", &["a1"])], &tally);
        assert!(names.is_empty() && rerun.is_empty());
    }

    #[test]
    fn reads_cargo_artifacts_and_test_lists() {
        let json = r#"{"reason":"compiler-artifact","target":{"name":"husk_vmm_linux","kind":["test"]},"profile":{"test":true},"executable":"/t/debug/deps/husk_vmm_linux-0a1b"}
{"reason":"compiler-artifact","target":{"name":"husk_tests","kind":["lib"]},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","target":{"name":"husk-vmm","kind":["bin"]},"profile":{"test":false},"executable":"/t/debug/husk-vmm"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            parse_test_artifacts(json),
            [(
                "husk_vmm_linux".to_string(),
                PathBuf::from("/t/debug/deps/husk_vmm_linux-0a1b")
            )]
        );
        let list = "linux_guest_on_husk_vmm_reaches_the_agent_over_vsock: test\nm::other: test\n\n2 tests, 0 benchmarks\n";
        assert_eq!(
            parse_list(list),
            [
                "linux_guest_on_husk_vmm_reaches_the_agent_over_vsock",
                "m::other"
            ]
        );
    }

    #[test]
    fn tallies_what_l1_reports() {
        let mut r = L1Results::default();
        for l in [
            "HUSK-NESTED L1 up 3.41 s, 1 CPU, kvm_amd nested=1 npt=Y\r",
            "HUSK-NESTED BEGIN husk_vmm_linux",
            "",
            "running 2 tests",
            "test a ... ok\r",
            "test m::b ... FAILED",
            "test result: FAILED. 1 passed; 1 failed; 0 ignored",
            "HUSK-NESTED END husk_vmm_linux 101",
            "HUSK-NESTED BEGIN vmm_linux",
            "HUSK-NESTED DONE",
        ] {
            r.line(l);
        }
        assert!(r.done);
        assert_eq!(
            r.l1_up.as_deref(),
            Some("3.41 s, 1 CPU, kvm_amd nested=1 npt=Y")
        );
        assert_eq!(r.ended, [("husk_vmm_linux".to_string(), 101)]);
        let o = r.outcome(&[
            bin("husk_vmm_linux", &["a", "m::b"]),
            bin("vmm_linux", &["c"]),
        ]);
        assert_eq!(o.passed, ["a"]);
        assert_eq!(
            o.failed,
            [
                (
                    "m::b".to_string(),
                    "failed in L1 (husk_vmm_linux)".to_string()
                ),
                (
                    "c".to_string(),
                    "no result: L1 ended before vmm_linux finished".to_string()
                ),
            ]
        );
    }

    #[test]
    fn reads_test_times_and_the_peak_rss() {
        let mut r = L1Results::default();
        r.line("HUSK-NESTED TOOK m::a_test 14.2");
        assert_eq!(r.took, [("m::a_test".to_string(), "14.2".to_string())]);
        let o = r.outcome(&[]);
        assert_eq!(o.took, r.took);
        assert_eq!(
            vm_hwm_kib("Name:\tqemu\nVmPeak:\t 3000 kB\nVmHWM:\t  812345 kB\n"),
            Some(812345)
        );
        assert_eq!(vm_hwm_kib("Name:\tqemu\n"), None);
    }

    #[test]
    fn a_failure_before_the_tests_fails_every_test() {
        let mut r = L1Results::default();
        r.line("HUSK-NESTED FAIL insmod kvm-amd.ko failed");
        let o = r.outcome(&[bin("husk_vmm_linux", &["a"])]);
        assert!(o.passed.is_empty());
        assert_eq!(
            o.failed[0].1,
            "L1 failed before the tests: insmod kvm-amd.ko failed"
        );
    }
}
