//! The Linux-boot probe: our vmlinux + initramfs on husk-vmm and on QEMU `microvm` (KVM),
//! alternating, where the VMMs run — inside the nested tier's L1 (`cargo xtask nested-boot`,
//! bench scenario 8) or directly on a host with hardware KVM. Each boot is timed from spawning
//! the VMM to its first serial byte and to the agent's `husk-agent ready:` line (which also
//! says how long the guest kernel took), then, 0.5 s later, the VMM process's memory is read
//! from smaps and husk-vmm's exit counters from its control API; then the VMM is killed.
//!
//! Inside L1 it runs as `xtask boot-probe …` (a hidden subcommand of the xtask binary packed
//! into L1) and writes one `HUSK-NESTED SAMPLE <json>` line per boot on its stdout, which
//! is L1's results port.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::bench::procfs;

/// The (#15) command line, as Firecracker's and QEMU's runs used it: the same for
/// both VMMs.
pub const CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=1 pci=off no_timer_check i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";
/// The guest shape.
pub const MEMORY_MIB: u32 = 256;
/// Marker of a sample line (the nested tier's results-port prefix).
pub const SAMPLE: &str = "SAMPLE";
/// Where QEMU's firmware (qboot for `microvm`) lives.
pub const QEMU_DATA_DIR: &str = "/usr/share/qemu";
/// A boot that has not reached the agent in this long failed.
const BOOT_DEADLINE: Duration = Duration::from_secs(60);
/// How long after the ready line the memory is read (the guest is idle by then).
const SETTLE: Duration = Duration::from_millis(500);

/// The two VMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Vmm {
    #[serde(rename = "husk-vmm")]
    Husk,
    #[serde(rename = "qemu-microvm")]
    Qemu,
}

impl Vmm {
    pub fn label(self) -> &'static str {
        match self {
            Vmm::Husk => "husk-vmm",
            Vmm::Qemu => "qemu microvm",
        }
    }
}

/// One boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub vmm: Vmm,
    /// 0 is the warm-up round.
    pub round: usize,
    pub first_byte_ms: f64,
    /// Spawn → the agent's ready line on the console.
    pub ready_ms: f64,
    /// The agent's own "N ms since kernel start".
    pub kernel_to_agent_ms: Option<u64>,
    /// The VMM process, guest RAM included (KiB).
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// The VMM process outside guest RAM (KiB).
    pub rss_outside_kib: u64,
    pub pss_outside_kib: u64,
    /// husk-vmm's exit counters (`counters` on its API), as it answered.
    pub counters: Option<serde_json::Value>,
    /// The host KVM's own statistics of this VM (debugfs `kvm/<pid>-<fd>/`: exits, faults,
    /// halts, … summed over its vCPUs), where debugfs is mounted.
    #[serde(default)]
    pub kvm_stats: std::collections::BTreeMap<String, u64>,
    /// CPU time of the VMM process (all threads, user + system) from spawn to the ready line.
    #[serde(default)]
    pub vmm_cpu_ms: Option<f64>,
    /// Time the machine's CPUs were idle between spawn and the ready line (summed over CPUs).
    #[serde(default)]
    pub idle_ms: Option<f64>,
    /// Spawn → husk-vmm's vCPU 0 about to enter the guest for the first time: husk-vmm's own
    /// start (its `first_entry_monotonic_ns` against the clock read at spawn).
    #[serde(default)]
    pub vmm_start_ms: Option<f64>,
}

/// `CLOCK_MONOTONIC` in ns, the clock husk-vmm stamps its first guest entry with.
fn monotonic_ns() -> Option<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let (s, ns) = (
        u64::try_from(t.tv_sec()).ok()?,
        u64::try_from(t.tv_nsec()).ok()?,
    );
    Some(s * 1_000_000_000 + ns)
}

/// Spawn (`spawned_ns`) → the first guest entry husk-vmm's counters report, in ms.
fn start_ms(counters: &serde_json::Value, spawned_ns: u64) -> Option<f64> {
    let entry = counters
        .get("counters")?
        .get("first_entry_monotonic_ns")?
        .as_u64()?;
    #[allow(clippy::cast_precision_loss)] // ns of a boot: far below 2^52
    entry.checked_sub(spawned_ns).map(|d| d as f64 / 1e6)
}

/// What to boot, with which programs.
#[derive(Debug, Clone)]
pub struct Probe {
    pub husk_vmm: PathBuf,
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    /// Print every console line with its time since spawn (for a look at where the boot goes).
    pub show_console: bool,
    /// Scratch directory (the API socket).
    pub dir: PathBuf,
    /// QEMU boots first in round 0 (and every even round).
    pub qemu_first: bool,
}

impl Probe {
    fn command(&self, vmm: Vmm) -> Command {
        match vmm {
            Vmm::Husk => {
                let mut c = Command::new(&self.husk_vmm);
                c.arg("--kernel")
                    .arg(&self.kernel)
                    .arg("--initrd")
                    .arg(&self.initramfs)
                    .args(["--vcpus", "1", "--memory", &MEMORY_MIB.to_string()])
                    .args(["--cmdline", &self.cmdline, "--cmdline-replace"])
                    .arg("--api-sock")
                    .arg(self.api_sock());
                c
            }
            Vmm::Qemu => {
                let mut c = Command::new(&self.qemu);
                // QEMU finds its firmware relative to its own path unless told.
                c.args(["-L", QEMU_DATA_DIR]);
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
                    "-smp",
                    "1",
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-no-reboot",
                    "-serial",
                    "stdio",
                    // The same legacy devices as husk-vmm's guest sees: an i8042 controller.
                    "-device",
                    "i8042",
                    "-kernel",
                ])
                .arg(&self.kernel)
                .arg("-initrd")
                .arg(&self.initramfs)
                .args(["-append", &self.cmdline]);
                c
            }
        }
    }

    fn api_sock(&self) -> PathBuf {
        self.dir.join("husk-vmm-api.sock")
    }

    /// Boots once on `vmm`, measures, and kills the VMM.
    pub fn boot(&self, vmm: Vmm, round: usize) -> Result<Sample> {
        let _ = std::fs::remove_file(self.api_sock());
        let mut cmd = self.command(vmm);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let idle_at_spawn = idle_ms();
        let spawned_ns = monotonic_ns();
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", crate::run::show(&cmd)))?;
        let res = self.follow(vmm, round, &mut child, start).map(|mut s| {
            s.idle_ms = s.idle_ms.zip(idle_at_spawn).map(|(a, b)| a - b);
            s.vmm_start_ms = s
                .counters
                .as_ref()
                .zip(spawned_ns)
                .and_then(|(c, ns)| start_ms(c, ns));
            s
        });
        // Our own child, by its handle.
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(self.api_sock());
        res.with_context(|| format!("{} round {round}", vmm.label()))
    }

    fn follow(&self, vmm: Vmm, round: usize, child: &mut Child, start: Instant) -> Result<Sample> {
        let stdout = child.stdout.take().context("piped stdout")?;
        let mut stderr = child.stderr.take().context("piped stderr")?;
        let (tx, rx) = mpsc::channel();
        let show = self.show_console.then(|| vmm.label());
        std::thread::spawn(move || console_reader(stdout, start, show, tx));
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut first = None;
        let ready = loop {
            let left = BOOT_DEADLINE.saturating_sub(start.elapsed());
            match rx.recv_timeout(left) {
                Ok(Event::FirstByte(t)) => first = Some(t),
                Ok(Event::Ready(t, line)) => {
                    break (t, line, procfs::cpu_ms(child.id()), idle_ms())
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("no `husk-agent ready:` line within {BOOT_DEADLINE:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait()?;
                    let err = err.join().unwrap_or_default();
                    bail!(
                        "the VMM ended ({status}) before the agent's ready line; stderr: {}",
                        err.trim()
                    );
                }
            }
        };
        std::thread::sleep(SETTLE);
        let counters = match vmm {
            Vmm::Husk => Some(api_counters(&self.api_sock())?),
            Vmm::Qemu => None,
        };
        let mem = procfs::mem(child.id()).context("reading the VMM's smaps")?;
        let kvm_stats = kvm_debugfs_stats(child.id());
        Ok(Sample {
            vmm,
            round,
            first_byte_ms: ms(first.unwrap_or(ready.0)),
            ready_ms: ms(ready.0),
            kernel_to_agent_ms: parse_agent_ms(&ready.1),
            rss_kib: mem.rss_kib + mem.guest_rss_kib,
            pss_kib: mem.pss_kib + mem.guest_pss_kib,
            rss_outside_kib: mem.rss_kib,
            pss_outside_kib: mem.pss_kib,
            counters,
            kvm_stats,
            vmm_cpu_ms: ready.2,
            idle_ms: ready.3,
            vmm_start_ms: None,
        })
    }
}

/// Idle time of all CPUs so far, from /proc/stat's `cpu` line (idle + iowait).
fn idle_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    #[allow(clippy::cast_precision_loss)]
    Some((f.get(3)? + f.get(4)?) as f64 * 1000.0 / procfs::clock_ticks())
}

/// KVM's debugfs directory of each VM is `<pid>-<vm fd>`; its files hold one number each.
const KVM_DEBUGFS: &str = "/sys/kernel/debug/kvm";
/// The figures kept (the ones that tell where a boot's time goes).
const KVM_STATS: &[&str] = &[
    "exits",
    "io_exits",
    "mmio_exits",
    "irq_exits",
    "halt_exits",
    "halt_wakeup",
    "pf_fixed",
    "pf_taken",
    "pf_emulate",
    "insn_emulation",
    "irq_injections",
    "nmi_window_exits",
    "irq_window_exits",
    "request_irq_exits",
    "signal_exits",
    "host_state_reload",
    "tlb_flush",
    "pages_4k",
    "pages_2m",
    "pages_1g",
];

fn kvm_debugfs_stats(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(KVM_DEBUGFS) else {
        return out;
    };
    let prefix = format!("{pid}-");
    for vm in dir.flatten() {
        if !vm.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        for name in KVM_STATS {
            let v = std::fs::read_to_string(vm.path().join(name))
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok());
            if let Some(v) = v {
                *out.entry((*name).to_string()).or_default() += v;
            }
        }
    }
    out
}

enum Event {
    FirstByte(Duration),
    Ready(Duration, String),
}

fn console_reader(
    stdout: impl Read,
    start: Instant,
    show: Option<&'static str>,
    tx: mpsc::Sender<Event>,
) {
    let mut r = BufReader::new(stdout);
    let mut line = Vec::new();
    let mut first = true;
    loop {
        line.clear();
        // Bounded by what the guest prints before its ready line (a few KiB); the VMM is
        // killed right after.
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let t = start.elapsed();
        if first {
            first = false;
            let _ = tx.send(Event::FirstByte(t));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if let Some(vmm) = show {
            println!("{:9.1} ms {vmm}| {text}", ms(t));
        }
        if let Some(i) = text.find("husk-agent ready:") {
            let _ = tx.send(Event::Ready(t, text[i..].to_string()));
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `N` of the agent's `husk-agent ready: N ms since kernel start; …`.
pub fn parse_agent_ms(line: &str) -> Option<u64> {
    line.strip_prefix("husk-agent ready:")?
        .trim_start()
        .split_once(" ms since kernel start")?
        .0
        .parse()
        .ok()
}

/// husk-vmm's `counters` answer (one JSON line).
fn api_counters(sock: &Path) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(sock)
        .with_context(|| format!("connecting to husk-vmm's API at {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"counters\n")?;
    let mut line = String::new();
    // One line, bounded: the answer is a few hundred bytes.
    BufReader::new(s.take(64 << 10)).read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("husk-vmm's counters answer {line:?}"))
}

/// Runs `rounds` rounds (after one warm-up round 0) of both VMMs, alternating which goes
/// first (husk-vmm in round 0, or QEMU with `qemu_first`), calling `emit` with each sample or
/// failure.
///
/// Inside L1 the very first VM of an L1 boot is the quickest by far (its guest RAM is L1
/// memory no earlier guest used; later guests reuse pages whose translated code L0's TCG
/// must throw away as they are written: FIELD-NOTES), which is why round 0 is a warm-up and
/// why the first VMM can be chosen.
pub fn run(probe: &Probe, rounds: usize, mut emit: impl FnMut(Result<Sample>)) {
    for round in 0..=rounds {
        let order = if (round % 2 == 0) != probe.qemu_first {
            [Vmm::Husk, Vmm::Qemu]
        } else {
            [Vmm::Qemu, Vmm::Husk]
        };
        for vmm in order {
            emit(probe.boot(vmm, round));
        }
    }
}

/// The `xtask boot-probe` entry point (inside L1): samples as marker lines on stdout.
pub fn main(probe: &Probe, rounds: usize) -> Result<()> {
    run(probe, rounds, emit);
    Ok(())
}

/// A probe's sample (or why it failed) as a marker line on stdout, L1's results port
/// ([`super::L1Results::parse_samples`] reads it).
pub fn emit<T: Serialize>(s: Result<T>) {
    let marker = super::initramfs::MARKER;
    match s {
        Ok(s) => println!(
            "{marker} {SAMPLE} {}",
            serde_json::to_string(&s).expect("a sample serialises")
        ),
        Err(e) => println!("{marker} {SAMPLE}-FAILED {e:#}"),
    }
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_agents_ready_line() {
        assert_eq!(
            parse_agent_ms("husk-agent ready: 649 ms since kernel start; kernel 6.1.192; 1 vcpus"),
            Some(649)
        );
        assert_eq!(parse_agent_ms("husk-agent ready: soon"), None);
    }

    #[test]
    fn samples_travel_as_json() {
        let s = Sample {
            vmm: Vmm::Husk,
            round: 1,
            first_byte_ms: 10.0,
            ready_ms: 900.5,
            kernel_to_agent_ms: Some(650),
            rss_kib: 40_000,
            pss_kib: 39_000,
            rss_outside_kib: 3000,
            pss_outside_kib: 2000,
            counters: Some(serde_json::json!({"pio": 10})),
            kvm_stats: [("exits".to_string(), 5)].into(),
            vmm_cpu_ms: Some(800.0),
            idle_ms: Some(10.0),
            vmm_start_ms: Some(210.0),
        };
        let line = serde_json::to_string(&s).unwrap();
        assert!(line.contains("\"vmm\":\"husk-vmm\""), "{line}");
        let back: Sample = serde_json::from_str(&line).unwrap();
        assert_eq!(back.ready_ms, 900.5);
        assert_eq!(back.vmm, Vmm::Husk);
        assert_eq!(back.vmm_start_ms, Some(210.0));
        // A sample from an older probe (no start figure) still reads.
        let old = line.replace(",\"vmm_start_ms\":210.0", "");
        assert!(!old.contains("vmm_start_ms"), "{old}");
        let back: Sample = serde_json::from_str(&old).unwrap();
        assert_eq!(back.vmm_start_ms, None);
    }

    #[test]
    fn husk_vmms_start_is_its_first_guest_entry_less_the_spawn() {
        let c = serde_json::json!({"ok": true, "counters": {"first_entry_monotonic_ns": 5_250_000_000_u64}});
        assert_eq!(start_ms(&c, 5_000_000_000), Some(250.0));
        // Not entered yet, an older husk-vmm, or a clock that went the wrong way: nothing.
        let none = serde_json::json!({"ok": true, "counters": {"first_entry_monotonic_ns": null}});
        assert_eq!(start_ms(&none, 1), None);
        assert_eq!(
            start_ms(&serde_json::json!({"ok": true, "counters": {}}), 1),
            None
        );
        assert_eq!(start_ms(&c, 6_000_000_000), None);
        assert!(monotonic_ns().unwrap() > 0);
    }

    #[test]
    fn both_vmms_get_the_same_guest() {
        let p = Probe {
            husk_vmm: "/b/husk-vmm".into(),
            qemu: "/b/qemu".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            cmdline: CMDLINE.into(),
            show_console: false,
            dir: "/tmp".into(),
            qemu_first: false,
        };
        for vmm in [Vmm::Husk, Vmm::Qemu] {
            let c = p.command(vmm);
            let args: Vec<String> = c
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            assert!(args.iter().any(|a| a == CMDLINE), "{vmm:?}: {args:?}");
            assert!(args.iter().any(|a| a == "/k") && args.iter().any(|a| a == "/i"));
            assert!(args.iter().any(|a| a.contains("256")), "{vmm:?}: {args:?}");
        }
    }
}
