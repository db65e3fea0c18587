//! The QEMU command line for a husk guest on the `microvm` machine.
//!
//! Facts behind each choice (QEMU 7.2, see docs/FIELD-NOTES.md):
//! - `acpi=off`: otherwise microvm does not put `virtio_mmio.device=` on the kernel command
//!   line and our ACPI-less kernel sees no virtio devices;
//! - `rtc=on`: without the CMOS clock Linux 6.1 waits ~1 s at boot;
//! - guest RAM is a shared memfd (`memory-backend-memfd,share=on`): vhost-user backends
//!   (virtiofsd, vhost-device-vsock) must map it;
//! - `reboot=t panic=-1` in the guest and `-no-reboot` here: a guest reboot (the agent's
//!   power-off) or panic ends QEMU;
//! - under KVM, `-cpu host,-arch-capabilities` (QEMU aborts setting MSR 0x10a otherwise);
//!   under TCG, `-cpu max`;
//! - virtio-fs is `vhost-user-fs-device` with the tag set here: virtiofsd's own `--tag` makes
//!   QEMU 7.x crash; vsock is `vhost-user-vsock-device` (no /dev/vhost-vsock needed). QEMU is
//!   the vhost-user client: the helpers listen on the sockets before QEMU starts.
//! - the serial console: a socket chardev (for console input) whose `logfile=` is the
//!   write end of the console relay's pipe, handed over with `-add-fd` and opened as
//!   `/dev/fdset/N` (no /proc needed in the jail) with `logappend=on` (QEMU truncates a
//!   log file otherwise, which fails on a pipe): QEMU itself never writes `console.log`,
//!   which the relay keeps under a size cap ([`crate::console`]);
//! - network: `-netdev tap,fd=N` with the caller's open tap (inherited by QEMU under the same
//!   number, see `Qemu::start`) + `virtio-net-device` on virtio-mmio; no vhost-net (the host
//!   has no /dev/vhost-net), so QEMU's own thread moves the packets.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use crate::{Accel, VmConfig, SHARED_FS_TAG};

/// The kernel command line every husk guest gets before the caller's extras.
///
/// `no_timer_check`: a guest whose vCPU is starved (TCG on a loaded host) can fail Linux's
/// IO-APIC timer check and panic ("IO-APIC + timer doesn't work!"); a VM's timer is known to
/// work, so the check is skipped, as Kata and Firecracker do. `dummy.numdummies=0`: the
/// kernel has dummy devices built in (for NET_ADMIN containers: guest-kernel-config/
/// 45-netadmin.config), which would otherwise make a `dummy0` the pod never asked for.
pub(crate) const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=t panic=-1 quiet no_timer_check dummy.numdummies=0";

/// TCG's translation buffer, MiB, unless configured (`tcg_buffer_mib`). QEMU's default
/// reserves 1 GiB. What matters is the guest's code working set: a booted husk guest holds
/// ~24.5–29 MiB of translations at the agent's ready line, and starting containers and execs
/// brings it to ~43 MiB; a smaller buffer is flushed and everything retranslated whenever it
/// fills, and the buffer costs a pod what it holds (up to its size, anonymous memory). Measured
/// on the 2-core development host (docs/FIELD-NOTES.md, "Container creation under TCG" and
/// "Where an idle pod's host memory is under TCG"): at 16 MiB TCG flushed ~9 times over 3
/// creates and 3 execs (create → first output 409 ms); at 32 the boot fits and the first
/// container's start flushes once (a cold pod's create → first output ~310 ms against ~230 at
/// 48, bench scenario 4), and 10 idle pods cost 53 MiB each against 61 at 48 (scenario 6). A
/// warm pool's VMs rehearse a container before their claim (the agent's `rehearsal`), so a
/// pooled start is as quick at 32 as at 48 (first output ~200 ms, scenario 12). So 32: the
/// memory target with the pool's speed. A host short of time rather than memory sets 48 (no
/// flush); one short of memory 16 (boot then flushes once; 8 flushes five times and costs
/// every boot ~200 ms more).
pub const DEFAULT_TCG_BUFFER_MIB: u32 = 32;

/// How QEMU runs the guest: the accelerator, and what only TCG uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acceleration {
    pub accel: Accel,
    /// TCG's translation buffer, MiB ([`DEFAULT_TCG_BUFFER_MIB`]).
    pub tcg_buffer_mib: u32,
    /// The host's invariant TSC rate, kHz ([`crate::host::invariant_tsc_khz`]), which a TCG
    /// guest reads as its own: told it (`tsc_early_khz`, and `tsc=reliable` so the kernel's
    /// clocksource watchdog, whose jiffies lag on a busy host, does not overrule it), the
    /// guest neither measures its TSC against its PIT nor falls back to jiffies when that
    /// measurement fails. Six guests booting at once on the 2-core development host: all six
    /// marked their TSC unstable and kept time in 4 ms steps without it, none with it
    /// (docs/FIELD-NOTES.md, "QEMU TCG (no KVM) runs our guest"). With KVM the guest has
    /// kvm-clock and is told nothing.
    pub tsc_khz: Option<u32>,
}

fn tcg_accel(buffer_mib: u32) -> String {
    format!("tcg,tb-size={buffer_mib}")
}

/// `-sandbox`: every optional part of QEMU's seccomp filter denied.
pub(crate) const SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The `-add-fd` set that carries the console output pipe.
pub(crate) const CONSOLE_FDSET: u32 = 1;

/// Files this VM keeps in its state directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub console_log: PathBuf,
    pub console_sock: PathBuf,
    pub qmp_sock: PathBuf,
    pub qemu_log: PathBuf,
    /// virtiofsd's vhost-user socket.
    pub virtiofsd_sock: PathBuf,
    pub virtiofsd_log: PathBuf,
    /// vhost-device-vsock's vhost-user socket.
    pub vhost_vsock_sock: PathBuf,
    pub vhost_vsock_log: PathBuf,
    /// The hybrid-vsock socket the host connects to (vhost-device-vsock's `uds-path`); guest
    /// connections to host port P arrive on `<vsock_sock>_P`.
    pub vsock_sock: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            console_log: state_dir.join("console.log"),
            console_sock: state_dir.join("console.sock"),
            qmp_sock: state_dir.join("qmp.sock"),
            qemu_log: state_dir.join("qemu.log"),
            virtiofsd_sock: state_dir.join("virtiofsd.sock"),
            virtiofsd_log: state_dir.join("virtiofsd.log"),
            vhost_vsock_sock: state_dir.join("vhost-vsock.sock"),
            vhost_vsock_log: state_dir.join("vhost-vsock.log"),
            vsock_sock: state_dir.join("vsock.sock"),
        }
    }

    /// The sockets, which the VM's end leaves behind when QEMU or a helper is killed.
    pub fn sockets(&self) -> [&Path; 5] {
        [
            &self.console_sock,
            &self.qmp_sock,
            &self.virtiofsd_sock,
            &self.vhost_vsock_sock,
            &self.vsock_sock,
        ]
    }
}

/// QEMU's arguments (without the program name). `console_out`: the fd (inherited by QEMU
/// under the same number) the guest's serial output goes to.
pub fn args(
    config: &VmConfig,
    acceleration: Acceleration,
    paths: &Paths,
    console_out: RawFd,
) -> Vec<OsString> {
    let Acceleration {
        accel,
        tcg_buffer_mib,
        tsc_khz,
    } = acceleration;
    let mem = config.memory_mib;
    let mut cmdline = BASE_CMDLINE.to_string();
    if let (Accel::Tcg, Some(khz)) = (accel, tsc_khz) {
        // Before the caller's extras: a `kernel_params` of the user's may still override it.
        cmdline.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    if !config.cmdline_extra.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(config.cmdline_extra.trim());
    }
    let (accel, cpu) = match accel {
        Accel::Kvm => ("kvm".to_string(), "host,-arch-capabilities"),
        Accel::Tcg => (tcg_accel(tcg_buffer_mib), "max"),
    };
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    push("-M");
    push("microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off,memory-backend=mem");
    push("-object");
    push(&format!("memory-backend-memfd,id=mem,size={mem}M,share=on"));
    push("-m");
    push(&format!("{mem}M"));
    push("-accel");
    push(&accel);
    push("-cpu");
    push(cpu);
    push("-smp");
    push(&config.vcpus.to_string());
    for s in [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ] {
        push(s);
    }
    // QEMU's own seccomp filter: no obsolete calls, no set*uid/gid, no fork/exec, no
    // scheduler or priority changes (the jail already dropped root before QEMU started).
    push("-sandbox");
    push(SANDBOX);
    push("-add-fd");
    push(&format!("fd={console_out},set={CONSOLE_FDSET}"));
    push("-chardev");
    push(&format!(
        "socket,id=con0,path={},server=on,wait=off,logfile=/dev/fdset/{CONSOLE_FDSET},logappend=on",
        paths.console_sock.display(),
    ));
    push("-serial");
    push("chardev:con0");
    push("-qmp");
    push(&format!(
        "unix:{},server=on,wait=off",
        paths.qmp_sock.display()
    ));
    if config.shared_dir.is_some() {
        push("-chardev");
        push(&format!(
            "socket,id=fs0,path={}",
            paths.virtiofsd_sock.display()
        ));
        push("-device");
        push(&format!(
            "vhost-user-fs-device,chardev=fs0,tag={SHARED_FS_TAG}"
        ));
    }
    if config.vsock {
        push("-chardev");
        push(&format!(
            "socket,id=vs0,path={}",
            paths.vhost_vsock_sock.display()
        ));
        push("-device");
        push("vhost-user-vsock-device,chardev=vs0");
    }
    for (i, net) in config.nets.iter().enumerate() {
        push("-netdev");
        push(&format!("tap,fd={},id=net{i}", net.tap.as_raw_fd()));
        push("-device");
        push(&format!(
            "virtio-net-device,netdev=net{i},mac={}",
            net.mac_string()
        ));
    }
    push("-append");
    push(&cmdline);
    a.push("-kernel".into());
    a.push(config.kernel.clone().into_os_string());
    a.push("-initrd".into());
    a.push(config.initramfs.clone().into_os_string());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio".into(),
            cmdline_extra: " husk.timeout=5 ".into(),
            vcpus: 2,
            memory_mib: 384,
            state_dir: "/run/husk/abc".into(),
            shared_dir: None,
            vsock: false,
            nets: Vec::new(),
            jail: None,
        }
    }

    fn tcg(tcg_buffer_mib: u32) -> Acceleration {
        Acceleration {
            accel: Accel::Tcg,
            tcg_buffer_mib,
            tsc_khz: None,
        }
    }

    fn joined(acceleration: Acceleration) -> String {
        let c = cfg();
        args(&c, acceleration, &Paths::new(&c.state_dir), 9)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn tcg_line_has_the_measured_settings() {
        let l = joined(tcg(DEFAULT_TCG_BUFFER_MIB));
        for want in [
            "-M microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off,memory-backend=mem",
            "memory-backend-memfd,id=mem,size=384M,share=on",
            "-m 384M",
            "-accel tcg,tb-size=32 -cpu max -smp 2",
            "-no-reboot",
            "-add-fd fd=9,set=1 -chardev socket,id=con0,path=/run/husk/abc/console.sock,server=on,wait=off,logfile=/dev/fdset/1,logappend=on -serial chardev:con0",
            "-append console=ttyS0 reboot=t panic=-1 quiet no_timer_check dummy.numdummies=0 husk.timeout=5 -kernel",
            "-kernel /k/vmlinux -initrd /k/initramfs.cpio",
        ] {
            assert!(l.contains(want), "missing {want:?} in {l}");
        }
    }

    #[test]
    fn devices_only_when_asked_and_the_tag_is_set_on_the_qemu_side() {
        let mut c = cfg();
        let line = |c: &VmConfig| {
            args(c, tcg(DEFAULT_TCG_BUFFER_MIB), &Paths::new(&c.state_dir), 9)
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(!line(&c).contains("vhost-user"));
        c.shared_dir = Some("/run/husk/abc/shared".into());
        c.vsock = true;
        let l = line(&c);
        for want in [
            "-chardev socket,id=fs0,path=/run/husk/abc/virtiofsd.sock -device vhost-user-fs-device,chardev=fs0,tag=husk-shared",
            "-chardev socket,id=vs0,path=/run/husk/abc/vhost-vsock.sock -device vhost-user-vsock-device,chardev=vs0",
        ] {
            assert!(l.contains(want), "missing {want:?} in {l}");
        }
    }

    #[test]
    fn one_netdev_and_virtio_net_device_per_tap_with_its_fd_and_mac() {
        use std::os::fd::{AsRawFd, OwnedFd};
        use std::sync::Arc;
        let mut c = cfg();
        let f = |path: &str| Arc::new(OwnedFd::from(std::fs::File::open(path).unwrap()));
        let (a, b) = (f("/dev/null"), f("/dev/null"));
        let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
        c.nets = vec![
            crate::NetConfig {
                tap: a,
                mac: [0x02, 0, 0, 0, 0, 0x0a],
            },
            crate::NetConfig {
                tap: b,
                mac: [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff],
            },
        ];
        let l = args(&c, tcg(16), &Paths::new(&c.state_dir), 9)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        // A configured translation buffer reaches the command line.
        assert!(l.contains("-accel tcg,tb-size=16 "), "{l}");
        for want in [
            format!("-netdev tap,fd={fa},id=net0 -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:0a"),
            format!("-netdev tap,fd={fb},id=net1 -device virtio-net-device,netdev=net1,mac=aa:bb:cc:dd:ee:ff"),
        ] {
            assert!(l.contains(&want), "missing {want:?} in {l}");
        }
        c.nets.clear();
        let l = args(&c, tcg(16), &Paths::new(&c.state_dir), 9)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(!l.contains("netdev"), "no tap, no NIC: {l}");
    }

    #[test]
    fn kvm_line_masks_arch_capabilities() {
        let kvm = Acceleration {
            accel: Accel::Kvm,
            tsc_khz: Some(2_596_142),
            ..tcg(DEFAULT_TCG_BUFFER_MIB)
        };
        let l = joined(kvm);
        assert!(l.contains("-accel kvm -cpu host,-arch-capabilities"), "{l}");
        assert!(!l.contains("tsc"), "a KVM guest has kvm-clock: {l}");
    }

    #[test]
    fn a_tcg_guest_is_told_the_hosts_tsc_rate_when_known() {
        let told = joined(Acceleration {
            tsc_khz: Some(2_596_142),
            ..tcg(DEFAULT_TCG_BUFFER_MIB)
        });
        assert!(
            told.contains(
                "-append console=ttyS0 reboot=t panic=-1 quiet no_timer_check dummy.numdummies=0 tsc_early_khz=2596142 tsc=reliable husk.timeout=5 -kernel"
            ),
            "{told}"
        );
        assert!(!joined(tcg(DEFAULT_TCG_BUFFER_MIB)).contains("tsc"));
    }
}
