//! Linux boot on husk-vmm against QEMU `microvm`, measured where husk-vmm boots Linux: on
//! hardware KVM directly, elsewhere in one boot of the nested tier's L1 (both VMMs inside the
//! same L1, alternating, the same vmlinux + initramfs, 1 vCPU, 256 MiB, the command
//! line). The measuring itself is [`super::probe`]; this module packs it into L1, boots L1
//! and reads the samples back. `cargo xtask nested-boot` prints them; bench scenario 8
//! reports them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_hypervisor::host::{self, HostKind};

use super::initramfs::{self, quote, Program, BIN_DIR, GUEST_INITRAMFS, GUEST_KERNEL};
use super::probe::{self, Probe, Sample};
use crate::paths;
use crate::run::{elapsed, step};

/// QEMU's firmware for `microvm` (qboot, and the option ROMs it may load), at the path QEMU
/// looks in.
const QEMU_FIRMWARE: &[&str] = &[
    "/usr/share/qemu/bios-microvm.bin",
    "/usr/share/qemu/qboot.rom",
    "/usr/share/qemu/pvh.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
];

/// What one measuring run gave.
#[derive(Debug, Default)]
pub struct Measured {
    /// Round 0 is the warm-up.
    pub samples: Vec<Sample>,
    /// Boots that failed, with why.
    pub failed: Vec<String>,
    /// Where it ran: `nested (L1 …)` or `hardware KVM`.
    pub place: String,
    pub nested: bool,
}

/// The release husk-vmm every measurement uses (what `cargo xtask build` makes).
pub fn husk_vmm() -> Result<PathBuf> {
    let bin = paths::workspace().join("target/release/husk-vmm");
    if !bin.is_file() {
        bail!("{}: missing — `cargo xtask build` makes it", bin.display());
    }
    Ok(bin)
}

fn qemu() -> Result<PathBuf> {
    paths::find_program("qemu-system-x86_64").context(
        "qemu-system-x86_64 not found — apt-get install qemu-system-x86 (cargo xtask setup)",
    )
}

/// How to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rounds of both VMMs after the warm-up round.
    pub rounds: usize,
    pub cmdline: String,
    /// Print each console line with its time (to see where a boot goes).
    pub show_console: bool,
    /// Another husk-vmm than the release build (to compare two builds).
    pub husk_vmm: Option<PathBuf>,
    /// QEMU boots first (in round 0, the warm-up, and every even round).
    pub qemu_first: bool,
    /// L1's `shmem_enabled` (transparent huge pages for shared memory) when not `advise`,
    /// which L1's stage 2 sets as on a husk node (to compare: `never`, Debian's default).
    pub l1_shmem_thp: Option<String>,
    /// L1 frees memory without clearing it (Debian's default) instead of with
    /// [`L1_CLEAR_FREED`]: to see what that costs the guests that boot after the first.
    pub l1_keep_freed: bool,
}

/// L1 clears the pages it frees (`init_on_free=1`). Without it every guest but L1's first runs
/// ~2× slower, whichever the VMM: its RAM is L1 memory an earlier guest ran code from, L0's
/// TCG still holds translations of that code, and while a page holds any, every store to it
/// (L1 clearing the page for its new owner, byte by byte) goes through TCG's slow path that
/// looks the translations up and drops them (docs/FIELD-NOTES.md, "Where our guest's boot goes
/// in L1"). Cleared when freed, the page has lost its translations before the next guest asks
/// for it, so each boot is measured as the first one is; the clearing falls in the teardown of
/// the VM before, which nothing times. A property of TCG under L1, not of either VMM: on
/// hardware KVM there are no translations to drop.
pub const L1_CLEAR_FREED: &str = "init_on_free=1";

/// The boot probe's additions to L1's kernel command line.
fn l1_args(o: &Options) -> Vec<&'static str> {
    if o.l1_keep_freed {
        Vec::new()
    } else {
        vec![L1_CLEAR_FREED]
    }
}

impl Options {
    pub fn new(rounds: usize) -> Self {
        Self {
            rounds,
            cmdline: probe::CMDLINE.to_string(),
            show_console: false,
            husk_vmm: None,
            qemu_first: false,
            l1_shmem_thp: None,
            l1_keep_freed: false,
        }
    }

    fn husk_vmm(&self) -> Result<PathBuf> {
        match &self.husk_vmm {
            Some(p) => Ok(p.clone()),
            None => husk_vmm(),
        }
    }
}

/// Measures on this host's hardware KVM, or in L1.
pub fn measure(o: &Options) -> Result<Measured> {
    let report = host::detect();
    if matches!(report.kind, HostKind::HardwareKvm { .. }) {
        return direct(o);
    }
    nested(o)
}

fn direct(o: &Options) -> Result<Measured> {
    let (rounds, cmdline, show_console) = (o.rounds, o.cmdline.as_str(), o.show_console);
    let dir = std::env::temp_dir().join(format!("husk-boot-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let p = Probe {
        husk_vmm: o.husk_vmm()?,
        qemu: qemu()?,
        kernel: paths::vmlinux(),
        initramfs: paths::initramfs(),
        cmdline: cmdline.to_string(),
        show_console,
        dir: dir.clone(),
        qemu_first: o.qemu_first,
    };
    let mut m = Measured {
        place: "hardware KVM".into(),
        ..Measured::default()
    };
    probe::run(&p, rounds, |s| match s {
        Ok(s) => {
            println!(
                "    boot {} round {}: ready {:.0} ms",
                s.vmm.label(),
                s.round,
                s.ready_ms
            );
            m.samples.push(s);
        }
        Err(e) => m.failed.push(format!("{e:#}")),
    });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(m)
}

fn nested(o: &Options) -> Result<Measured> {
    let (rounds, cmdline, show_console) = (o.rounds, o.cmdline.as_str(), o.show_console);
    let start = Instant::now();
    step(&format!(
        "nested boot: husk-vmm and QEMU microvm in one L1 (QEMU TCG, emulated AMD SVM), {rounds} round(s) + a warm-up"
    ));
    let qemu = qemu()?;
    let busybox = paths::find_program("busybox")
        .context("busybox not found — apt-get install busybox-static (cargo xtask setup)")?;
    let xtask = std::env::current_exe().context("finding the xtask executable")?;
    let l1 = super::l1::get()?;
    let mut files = Vec::new();
    for f in QEMU_FIRMWARE {
        let p = PathBuf::from(f);
        if !p.is_file() {
            bail!("{f}: missing — apt-get install qemu-system-x86 (cargo xtask setup)");
        }
        files.push(p);
    }
    let dir = paths::artifacts().join("nested-boot");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut body = String::new();
    if let Some(mode) = &o.l1_shmem_thp {
        body += &format!(
            "echo {} > /sys/kernel/mm/transparent_hugepage/shmem_enabled || fail 'setting shmem_enabled'\n",
            quote(mode)
        );
    }
    body += "say \"THP $(cat /sys/kernel/mm/transparent_hugepage/enabled) / shmem $(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled)\"\n";
    body += &format!(
        "{BIN_DIR}/xtask boot-probe --rounds {rounds} --husk-vmm {BIN_DIR}/husk-vmm --qemu {BIN_DIR}/qemu-system-x86_64 --kernel {GUEST_KERNEL} --initrd {GUEST_INITRAMFS} --dir /tmp --cmdline {}{} </dev/null >&3 2>&1\n",
        quote(cmdline),
        match (show_console, o.qemu_first) {
            (false, false) => "",
            (true, false) => " --show-console",
            (false, true) => " --qemu-first",
            (true, true) => " --show-console --qemu-first",
        }
    );
    // L1 up in ~5 s; each boot ~3–6 s in L1 plus the settle time; generous for a loaded host.
    let deadline = Duration::from_secs(120 + 2 * 30 * (rounds as u64 + 1));
    let results = super::pack_and_boot(
        &qemu,
        &initramfs::Inputs {
            l1: &l1,
            root: initramfs::Root::Packed,
            busybox,
            programs: vec![
                Program::new("xtask", xtask, true),
                Program::new("husk-vmm", o.husk_vmm()?, true),
                Program::new("qemu-system-x86_64", qemu.clone(), false),
            ],
            files,
            guest_kernel: paths::vmlinux(),
            guest_initramfs: paths::initramfs(),
            body,
            env: Vec::new(),
            keep: Vec::new(),
        },
        &dir,
        deadline,
        &l1_args(o),
    )?;
    let (samples, failed) = results.parse_samples()?;
    let m = Measured {
        place: format!(
            "nested: one L1 VM under QEMU TCG (`-cpu max`, emulated AMD SVM), {}{}, L1 up at {}",
            l1.package,
            if o.l1_keep_freed {
                ", freed memory not cleared (Debian's default)"
            } else {
                ", init_on_free=1"
            },
            results.l1_up.as_deref().unwrap_or("?")
        ),
        nested: true,
        samples,
        failed,
    };
    println!(
        "    nested boot: {} sample(s), {} failed, in {}",
        m.samples.len(),
        m.failed.len(),
        elapsed(start)
    );
    Ok(m)
}

/// Median of `v` (sorted copy); `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// `cargo xtask nested-boot`: measures and prints a summary per VMM.
pub fn print(o: &Options) -> Result<()> {
    let m = measure(o)?;
    println!("where: {}", m.place);
    for f in &m.failed {
        println!("failed: {f}");
    }
    for vmm in [probe::Vmm::Husk, probe::Vmm::Qemu] {
        let s: Vec<&Sample> = m
            .samples
            .iter()
            .filter(|s| s.vmm == vmm && s.round > 0)
            .collect();
        println!(
            "{:<14} each: {}",
            vmm.label(),
            s.iter()
                .map(|x| format!(
                    "{:.0}/{} (cpu {:.0}, idle {:.0})",
                    x.ready_ms,
                    x.kernel_to_agent_ms.map_or("-".into(), |v| v.to_string()),
                    x.vmm_cpu_ms.unwrap_or(f64::NAN),
                    x.idle_ms.unwrap_or(f64::NAN),
                ))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let col = |f: &dyn Fn(&Sample) -> f64| {
            let v: Vec<f64> = s.iter().map(|x| f(x)).collect();
            median(&v).map_or("-".to_string(), |m| format!("{m:.0}"))
        };
        #[allow(clippy::cast_precision_loss)]
        let kib = |k: u64| k as f64 / 1024.0;
        println!(
            "{:<14} n={:<3} first byte {} ms, agent ready {} ms (kernel → agent {} ms), RSS {} MiB (outside guest RAM {}), PSS {} MiB",
            vmm.label(),
            s.len(),
            col(&|x| x.first_byte_ms),
            col(&|x| x.ready_ms),
            col(&|x| x.kernel_to_agent_ms.map_or(f64::NAN, |v| v as f64)),
            col(&|x| kib(x.rss_kib)),
            col(&|x| kib(x.rss_outside_kib)),
            col(&|x| kib(x.pss_kib)),
        );
        if let Some(w) = m.samples.iter().find(|s| s.vmm == vmm && s.round == 0) {
            println!(
                "    warm-up (round 0): ready {:.0} ms, kernel → agent {} ms",
                w.ready_ms,
                w.kernel_to_agent_ms.map_or("-".into(), |v| v.to_string())
            );
        }
        let starts: Vec<f64> = s.iter().filter_map(|x| x.vmm_start_ms).collect();
        if let Some(m) = median(&starts) {
            println!("    spawn → first guest entry (the VMM's own start), median: {m:.0} ms");
        }
        if let Some(c) = s.last().and_then(|x| x.counters.as_ref()) {
            println!("    last husk-vmm counters: {c}");
        }
        if let Some(k) = s.last().map(|x| &x.kvm_stats).filter(|k| !k.is_empty()) {
            println!("    last boot, KVM's statistics of the VM: {k:?}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_clears_freed_memory_unless_told_to_keep_it() {
        let mut o = Options::new(1);
        assert_eq!(l1_args(&o), vec!["init_on_free=1"]);
        o.l1_keep_freed = true;
        assert!(l1_args(&o).is_empty());
    }

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
