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
    pub done: bool,
    /// The boot probe's samples (JSON) and failed boots.
    pub samples: Vec<String>,
    pub failed_samples: Vec<String>,
}

impl L1Results {
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
                    format!("L1 failed before the tests: {f}")
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
            l1: &l1,
            root: initramfs::Root::HostExport,
            busybox,
            programs: Vec::new(),
            files: Vec::new(),
            guest_kernel: paths::vmlinux(),
            guest_initramfs: paths::initramfs(),
            body: initramfs::tests_body(&binaries),
            env,
            keep: kept_dirs(&binaries, &husk_vmm),
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
    let results = boot(
        &qemu,
        &l1.vmlinux,
        &cpio,
        &dir,
        deadline,
        initramfs::Root::HostExport,
        &[],
    )?;
    let mut outcome = results.outcome(&binaries);
    outcome.failed.append(&mut outcome_missing);
    let took = elapsed(start);
    println!(
        "    nested tier: {} passed, {} failed in {took} (L1 up at {})",
        outcome.passed.len(),
        outcome.failed.len(),
        outcome.l1_up.as_deref().unwrap_or("?")
    );
    for (test, secs) in &outcome.took {
        println!("    in L1: {test} took {secs} s");
    }
    if let Some(kib) = results.qemu_peak_rss_kib {
        println!("    L1's QEMU peak RSS on the host: {} MiB", kib / 1024);
    }
    if !outcome.failed.is_empty() {
        println!(
            "    L1 results port ({}), last lines:\n{}",
            dir.join("results.log").display(),
            indent(&tail(&dir.join("results.log"), 60))
        );
        println!(
            "    L1 console ({}), last lines:\n{}",
            dir.join("console.log").display(),
            indent(&tail(&dir.join("console.log"), 60))
        );
    }
    Ok(outcome)
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
    let mut cmd = Command::new(qemu);
    cmd.args(QEMU_ARGS)
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
    let status = loop {
        feed(&mut results);
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
        if started.elapsed() > deadline || done_grace {
            // Our own child, by its handle.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    feed(&mut results);
    if !pending.trim().is_empty() {
        results.line(pending.trim_end());
    }
    match status {
        // DONE came, but L1 did not power off: the results are complete all the same.
        None if results.done => {}
        None => {
            let why = format!("L1 did not finish within {}s (killed)", deadline.as_secs());
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
