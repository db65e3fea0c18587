//! Scenario 8, the VMM alone: husk-vmm against QEMU `microvm`, both on /dev/kvm, on the smallest
//! synthetic guest (`tests/guests/hello.s`: prints a line on COM1, resets through port 0x64)
//! and, for memory, the idle guest (`idle.s`: prints a line, then halts). The guests are
//! assembled here exactly as `tests/build.rs` does. Guest RAM is a memfd in both VMMs, so
//! its pages are told apart in smaps.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::procfs;
use super::results::{Row, Scenario, Series};
use super::runner::{alternate, ms, timed};
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

pub fn run(rounds: usize, mem_rounds: usize, kvm_kind: &str) -> Result<Scenario> {
    let dir = tempfile_dir()?;
    let res = run_in(&dir, rounds, mem_rounds, kvm_kind);
    let _ = std::fs::remove_dir_all(&dir);
    res
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
             (`idle.s`), 0.5 s after its line, from smaps, guest RAM excluded. Our Linux guest \
             on husk-vmm is not measured: this host (kvm_pvm) does not run it natively."
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
