//! Scenario 8, the VMM alone: husk-vmm against QEMU `microvm`, both on /dev/kvm, on the smallest
//! synthetic guest (`tests/guests/hello.s`: prints a line on COM1, resets through port 0x64)
//! and, for memory, the idle guest (`idle.s`: prints a line, then halts). The guests are
//! assembled here exactly as `tests/build.rs` does. Guest RAM is a memfd in both VMMs, so
//! its pages are told apart in smaps.
//!
//! Then our Linux guest (vmlinux + initramfs, the agent as /init) on both VMMs: on hardware
//! KVM directly, elsewhere inside one boot of the nested tier's L1
//! ([`crate::nested::linux_boot`]). A failed L1 leaves the synthetic rows standing and says
//! why the Linux rows are missing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::procfs;
use super::report::fmt_num;
use super::results::{Row, Scenario, Series};
use super::runner::{alternate, ms, timed};
use crate::nested::linux_boot::{self, Measured};
use crate::nested::probe::{Sample, Vmm};
use crate::paths;
use crate::run::output;

const MEMORY_MIB: u32 = 128;

/// Assembles `tests/guests/<name>.s` into `dir/<name>.elf`.
fn guest(name: &str, dir: &Path) -> Result<PathBuf> {
    let src = paths::workspace().join("tests/guests");
    let (obj, elf) = (
        dir.join(format!("{name}.o")),
        dir.join(format!("{name}.elf")),
    );
    output(
        Command::new("as")
            .arg("--64")
            .arg("-I")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .arg(src.join(format!("{name}.s"))),
    )
    .context("assembling a synthetic guest (binutils' `as`)")?;
    output(
        Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "--build-id=none",
                "-z",
                "max-page-size=0x1000",
                "--no-warn-rwx-segments",
                "-T",
            ])
            .arg(src.join("guest.ld"))
            .arg("-o")
            .arg(&elf)
            .arg(&obj),
    )?;
    Ok(elf)
}

fn husk_vmm(kernel: &Path) -> Result<Command> {
    let bin = paths::workspace().join("target/release/husk-vmm");
    if !bin.is_file() {
        bail!("{}: missing — `cargo xtask build` makes it", bin.display());
    }
    let mut c = Command::new(bin);
    c.arg("--kernel")
        .arg(kernel)
        .args(["--memory", &MEMORY_MIB.to_string()]);
    Ok(c)
}

fn qemu(kernel: &Path) -> Result<Command> {
    let bin = paths::find_program("qemu-system-x86_64")
        .context("qemu-system-x86_64: not found — run `cargo xtask setup`")?;
    let mut c = Command::new(bin);
    c.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off,memory-backend=mem",
        "-object",
        &format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
        "-m",
        &format!("{MEMORY_MIB}M"),
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        // microvm has no keyboard controller of its own; the guest resets through it.
        "-device",
        "i8042",
        "-kernel",
    ])
    .arg(kernel);
    Ok(c)
}

/// Starts an idle guest, waits for its line, lets it settle, and reads its memory.
fn idle_mem(mut cmd: Command) -> Result<procfs::Mem> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("husk idle: ready") {
                let _ = tx.send(());
            }
        }
    });
    let res = (|| {
        rx.recv_timeout(Duration::from_secs(30))
            .context("the idle guest did not print its line within 30 s")?;
        std::thread::sleep(Duration::from_millis(500));
        procfs::mem(child.id()).context("reading smaps")
    })();
    // Our own child, by pid.
    let _ = child.kill();
    let _ = child.wait();
    res
}

fn row(metric: &str, unit: &str, v: [Vec<f64>; 2], labels: [&str; 2]) -> Row {
    let [h, b] = v;
    Row {
        metric: metric.into(),
        unit: unit.into(),
        husk: Series {
            backend: labels[0].into(),
            samples: h,
        },
        baseline: Some(Series {
            backend: labels[1].into(),
            samples: b,
        }),
    }
}

pub fn run(
    rounds: usize,
    mem_rounds: usize,
    linux_rounds: usize,
    kvm_kind: &str,
) -> Result<Scenario> {
    let dir = tempfile_dir()?;
    let res = run_in(&dir, rounds, mem_rounds, kvm_kind);
    let _ = std::fs::remove_dir_all(&dir);
    let mut sc = res?;
    first_byte_target(&mut sc);
    super::runner::check_interrupt()?;
    match linux_boot::measure(&linux_boot::Options::new(linux_rounds)) {
        Ok(m) if m.samples.iter().any(|s| s.round > 0) => linux_rows(&mut sc, &m),
        Ok(m) => sc.notes.push(format!(
            "Our Linux guest: not measured in this run ({}): no boot reached the agent{}",
            m.place,
            if m.failed.is_empty() {
                String::new()
            } else {
                format!(": {}", m.failed.join("; "))
            }
        )),
        Err(e) => sc
            .notes
            .push(format!("Our Linux guest: not measured in this run: {e:#}")),
    }
    Ok(sc)
}

/// Issue 15's target for the VMM's own start: husk-vmm's first serial byte within 0.15× of
/// QEMU's, in the same run.
fn first_byte_target(sc: &mut Scenario) {
    let Some(r) = sc
        .rows
        .iter()
        .find(|r| r.metric == "spawn → first serial byte")
    else {
        return;
    };
    let Some(ratio) = r.ratio() else { return };
    sc.notes.push(format!(
        "Target: husk-vmm's first serial byte ≤ 0.15× QEMU's (issue 15: the static husk-vmm \
         against Firecracker's static build, 0.8× its 7.3 ms): {:.3}× — {}.",
        ratio,
        if ratio <= 0.15 { "met" } else { "missed" }
    ));
}

/// One figure of a boot.
type SampleValue = fn(&Sample) -> Option<f64>;

fn linux_series(m: &Measured, vmm: Vmm, f: impl Fn(&Sample) -> Option<f64>) -> Vec<f64> {
    m.samples
        .iter()
        .filter(|s| s.vmm == vmm && s.round > 0)
        .filter_map(f)
        .collect()
}

#[allow(clippy::cast_precision_loss)]
fn linux_rows(sc: &mut Scenario, m: &Measured) {
    let place = if m.nested {
        "nested L1"
    } else {
        "hardware KVM"
    };
    let h = format!("husk-vmm ({place})");
    let q = format!("qemu microvm ({place})");
    let labels = [h.as_str(), q.as_str()];
    let rows: [(&str, &str, SampleValue); 5] = [
        ("Linux guest: spawn → agent ready", "ms", |s| {
            Some(s.ready_ms)
        }),
        (
            "Linux guest: kernel start → agent ready (the agent's own clock)",
            "ms",
            |s| s.kernel_to_agent_ms.map(|v| v as f64),
        ),
        (
            "Linux guest: VMM RSS with guest RAM, agent idle",
            "MiB",
            |s| Some(s.rss_kib as f64 / 1024.0),
        ),
        (
            "Linux guest: VMM PSS with guest RAM, agent idle",
            "MiB",
            |s| Some(s.pss_kib as f64 / 1024.0),
        ),
        (
            "Linux guest: VMM RSS outside guest RAM, agent idle",
            "MiB",
            |s| Some(s.rss_outside_kib as f64 / 1024.0),
        ),
    ];
    for (metric, unit, f) in rows {
        sc.rows.push(row(
            metric,
            unit,
            [linux_series(m, Vmm::Husk, f), linux_series(m, Vmm::Qemu, f)],
            labels,
        ));
    }
    let rounds = m.samples.iter().map(|s| s.round).max().unwrap_or(0);
    sc.notes.push(format!(
        "Our Linux guest (target/husk/vmlinux + initramfs.cpio, the agent as /init, no \
         devices but the console), 1 vCPU, 256 MiB of memfd guest RAM, issue 15's command line \
         `{}`, on both VMMs alternating, {rounds} rounds after a warm-up, in {}. Memory is read \
         0.5 s after the agent's ready line, then the VMM is killed.",
        crate::nested::probe::CMDLINE,
        m.place
    ));
    if let Some(ready) = sc
        .rows
        .iter()
        .find(|r| r.metric == "Linux guest: spawn → agent ready")
    {
        if let (Some(hs), Some(qs)) = (
            ready.husk.summary(),
            ready.baseline.as_ref().and_then(|b| b.summary()),
        ) {
            sc.notes.push(format!(
                "Linux boot: husk-vmm reaches the agent in {} ms, QEMU microvm in {} ms \
                 (median); issue 15's reference, measured in the same kind of L1: Firecracker \
                 1,740 ms, QEMU microvm 4,230 ms.",
                fmt_num(hs.median),
                fmt_num(qs.median)
            ));
        }
    }
    if !m.failed.is_empty() {
        sc.notes.push(format!(
            "Linux boots that failed, left out of the figures: {}",
            m.failed.join("; ")
        ));
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("husk-bench-guests-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn run_in(dir: &Path, rounds: usize, mem_rounds: usize, kvm_kind: &str) -> Result<Scenario> {
    let hello = guest("hello", dir)?;
    let idle = guest("idle", dir)?;
    let h_label = format!("husk-vmm ({kvm_kind})");
    let q_label = format!("qemu microvm ({kvm_kind})");
    let labels = [h_label.as_str(), q_label.as_str()];
    let mut sc = Scenario::new(
        8,
        "VMM alone",
        format!(
            "husk-vmm against QEMU 7.2 `microvm` (`-device i8042` so the guest's reset ends \
             it), both on /dev/kvm ({kvm_kind}), {MEMORY_MIB} MiB of memfd guest RAM, on the \
             smallest synthetic guest (`tests/guests/hello.s`): from spawning the process to \
             its first serial byte on stdout, and to its exit. Memory: the idle guest \
             (`idle.s`), 0.5 s after its line, from smaps, guest RAM excluded. Our Linux guest: \
             see the rows marked so and their note."
        ),
    );
    let mut exit = [Vec::new(), Vec::new()];
    let first = alternate("vmm hello", labels, "ms", 1, rounds, |side| {
        let mut c = if side == 0 {
            husk_vmm(&hello)?
        } else {
            qemu(&hello)?
        };
        let t = timed(&mut c, Duration::from_secs(30))?;
        if !String::from_utf8_lossy(&t.stdout).contains("husk guest: hello") {
            bail!(
                "the guest did not print its line: {:?}",
                String::from_utf8_lossy(&t.stdout)
            );
        }
        exit[side].push(ms(t.total));
        Ok(ms(t.first_byte.context("no serial output")?))
    })?;
    // The warm-up run recorded its exit too: drop it.
    for e in &mut exit {
        e.remove(0);
    }
    sc.rows
        .push(row("spawn → first serial byte", "ms", first, labels));
    sc.rows.push(row("spawn → exit", "ms", exit, labels));
    let mut rss = [Vec::new(), Vec::new()];
    let mut pss = [Vec::new(), Vec::new()];
    for r in 0..mem_rounds {
        for side in 0..2 {
            super::runner::check_interrupt()?;
            let c = if side == 0 {
                husk_vmm(&idle)?
            } else {
                qemu(&idle)?
            };
            let m = idle_mem(c).with_context(|| format!("idle guest on {}", labels[side]))?;
            #[allow(clippy::cast_precision_loss)]
            {
                rss[side].push(m.rss_kib as f64 / 1024.0);
                pss[side].push(m.pss_kib as f64 / 1024.0);
            }
            println!(
                "    vmm idle {}/{mem_rounds} {}: RSS {:.1} MiB, PSS {:.1} MiB outside guest RAM",
                r + 1,
                labels[side],
                m.rss_kib as f64 / 1024.0,
                m.pss_kib as f64 / 1024.0
            );
        }
    }
    sc.rows
        .push(row("RSS outside guest RAM, idle guest", "MiB", rss, labels));
    sc.rows
        .push(row("PSS outside guest RAM, idle guest", "MiB", pss, labels));
    Ok(sc)
}
