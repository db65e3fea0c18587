//! What kind of host this is, and so which backend runs husk's guests by default.
//!
//! 1. hardware KVM (VT-x/AMD-V, bare metal or nested): our Linux guest runs natively;
//! 2. PVM (`kvm_pvm`): KVM ioctls work, but only PVM-enlightened guest kernels run at speed — a
//!    stock kernel's ring-0 code is emulated and dies at its first system call;
//! 3. no usable KVM.
//!
//! Host 1 runs our guest on husk-vmm. Hosts 2 and 3 run it under QEMU's TCG emulator: slow,
//! but a real VM boundary (our stock Linux guest cannot run under kvm_pvm; husk-vmm still
//! runs the synthetic test guests there).

use std::path::Path;

use kvm_ioctls::Kvm;

use crate::Accel;

/// What /dev/kvm gave when probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmProbe {
    /// A VM and a vCPU were created. `tsc_khz`: the vCPU's TSC rate as KVM reports it
    /// (`KVM_GET_TSC_KHZ`: the host's own unless scaled), where it does.
    Usable {
        api_version: i32,
        tsc_khz: Option<u32>,
    },
    /// Not usable, with the reason and the fix.
    Unusable(String),
}

/// The kind of host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKind {
    /// KVM backed by VT-x or AMD-V.
    HardwareKvm { vendor: &'static str },
    /// KVM backed by `kvm_pvm` (software virtualisation).
    Pvm,
    /// No usable KVM.
    NoKvm,
}

/// The backend a host gets by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Qemu(Accel),
    /// husk's own VMM: only where the host runs our Linux guest natively (hardware KVM).
    HuskVmm,
}

impl BackendChoice {
    /// The accelerator for callers that run only the qemu backend: husk-vmm is chosen where
    /// the host has hardware KVM, so there QEMU runs with KVM too.
    pub fn qemu_accel(self) -> Accel {
        match self {
            BackendChoice::Qemu(a) => a,
            BackendChoice::HuskVmm => Accel::Kvm,
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendChoice::Qemu(Accel::Kvm) => f.write_str("qemu-kvm"),
            BackendChoice::Qemu(Accel::Tcg) => f.write_str("qemu-tcg"),
            BackendChoice::HuskVmm => f.write_str(crate::husk_vmm::PROGRAM),
        }
    }
}

/// Everything `doctor` and the shim need to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    pub kvm: KvmProbe,
    pub kind: HostKind,
    pub backend: BackendChoice,
    /// Why that backend, in one sentence.
    pub why: String,
    /// The TSC rate (kHz) a guest under QEMU's TCG should be told ([`invariant_tsc_khz`]).
    pub guest_tsc_khz: Option<u32>,
}

/// Opens /dev/kvm and creates a VM with one vCPU.
pub(crate) fn probe_kvm() -> KvmProbe {
    if !Path::new("/dev/kvm").exists() {
        return KvmProbe::Unusable(
            "/dev/kvm: not present — enable virtualisation (VT-x/AMD-V, or nested virtualisation for a cloud VM) and load kvm_intel or kvm_amd".into(),
        );
    }
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) if e.errno() == libc::EACCES => {
            return KvmProbe::Unusable(
                "/dev/kvm: permission denied — run as root or add the user to group kvm".into(),
            )
        }
        Err(e) => return KvmProbe::Unusable(format!("/dev/kvm: cannot open: {e}")),
    };
    let vm = match kvm.create_vm() {
        Ok(vm) => vm,
        Err(e) => return KvmProbe::Unusable(format!("/dev/kvm: KVM_CREATE_VM failed: {e}")),
    };
    let vcpu = match vm.create_vcpu(0) {
        Ok(v) => v,
        Err(e) => return KvmProbe::Unusable(format!("/dev/kvm: KVM_CREATE_VCPU failed: {e}")),
    };
    let tsc_khz = kvm
        .check_extension(kvm_ioctls::Cap::GetTscKhz)
        .then(|| vcpu.get_tsc_khz().ok())
        .flatten()
        .filter(|k| *k > 0);
    KvmProbe::Usable {
        api_version: kvm.get_api_version(),
        tsc_khz,
    }
}

/// The rate of the host's TSC, kHz, where a guest under QEMU's TCG may be told it
/// (`tsc_early_khz`, and `tsc=reliable`): under TCG the guest's `rdtsc` reads the host's TSC,
/// so this is the guest's TSC rate too. Only where the host's TSC is invariant (`constant_tsc`
/// and `nonstop_tsc` in /proc/cpuinfo: it ticks at one rate in every power state), the host's
/// own kernel keeps time with it (`clocksource`: its current clocksource is `tsc`, so it found
/// the CPUs' TSCs in step, which a vCPU thread that moves between them relies on), and KVM
/// reports the rate (`KVM_GET_TSC_KHZ` on a fresh vCPU is the host kernel's own `tsc_khz`). Told
/// nothing, the guest measures its TSC against its emulated PIT while it boots, and on a
/// busy host (a few guests booting at once on 2 cores) that measurement fails: the guest then
/// marks its TSC unstable and keeps time in 4 ms jiffies (docs/FIELD-NOTES.md, "QEMU TCG
/// (no KVM) runs our guest").
pub fn invariant_tsc_khz(kvm: &KvmProbe, cpuinfo: &str, clocksource: &str) -> Option<u32> {
    let KvmProbe::Usable { tsc_khz, .. } = kvm else {
        return None;
    };
    if clocksource.trim() != "tsc" {
        return None;
    }
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    (flags.contains(&"constant_tsc") && flags.contains(&"nonstop_tsc"))
        .then_some(*tsc_khz)
        .flatten()
}

/// Classifies the host from what the probe, sysfs and /proc/cpuinfo say.
pub(crate) fn classify(kvm: &KvmProbe, sys_module: &Path, cpuinfo: &str) -> HostKind {
    if !matches!(kvm, KvmProbe::Usable { .. }) {
        return HostKind::NoKvm;
    }
    // kvm_pvm serves /dev/kvm whenever it is loaded: check it first.
    if sys_module.join("kvm_pvm").exists() {
        return HostKind::Pvm;
    }
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    if flags.contains(&"vmx") || sys_module.join("kvm_intel").exists() {
        HostKind::HardwareKvm {
            vendor: "Intel VT-x",
        }
    } else if flags.contains(&"svm") || sys_module.join("kvm_amd").exists() {
        HostKind::HardwareKvm { vendor: "AMD-V" }
    } else {
        // KVM works but nothing says how: treat it like PVM, the cautious choice.
        HostKind::Pvm
    }
}

/// The default backend for a kind of host, and why.
pub(crate) fn choose_backend(kind: &HostKind) -> (BackendChoice, String) {
    match kind {
        HostKind::HardwareKvm { vendor } => (
            BackendChoice::HuskVmm,
            format!("{vendor} runs our guest natively, so husk's own VMM runs it (QEMU microvm with KVM remains available)"),
        ),
        HostKind::Pvm => (
            BackendChoice::Qemu(Accel::Tcg),
            "kvm_pvm runs only PVM-enlightened guest kernels and ours is a stock 6.1, so QEMU emulates the guest (TCG); husk-vmm still runs synthetic guests here".into(),
        ),
        HostKind::NoKvm => (
            BackendChoice::Qemu(Accel::Tcg),
            "no usable KVM, so QEMU emulates the guest (TCG): slow, but still a VM boundary".into(),
        ),
    }
}

/// Probes and classifies this host.
pub fn detect() -> HostReport {
    let kvm = probe_kvm();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let kind = classify(&kvm, Path::new("/sys/module"), &cpuinfo);
    let (backend, why) = choose_backend(&kind);
    let clocksource =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_default();
    let guest_tsc_khz = invariant_tsc_khz(&kvm, &cpuinfo, &clocksource);
    HostReport {
        kvm,
        kind,
        backend,
        why,
        guest_tsc_khz,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(names: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for n in names {
            std::fs::create_dir(d.path().join(n)).unwrap();
        }
        d
    }

    const USABLE: KvmProbe = KvmProbe::Usable {
        api_version: 12,
        tsc_khz: Some(2_596_142),
    };

    #[test]
    fn a_tcg_guest_is_told_the_tsc_rate_only_where_it_is_invariant() {
        let both = "flags\t\t: fpu tsc constant_tsc rep_good nonstop_tsc cpuid";
        assert_eq!(invariant_tsc_khz(&USABLE, both, "tsc\n"), Some(2_596_142));
        for one in [
            "flags : fpu tsc constant_tsc",
            "flags : fpu tsc nonstop_tsc",
        ] {
            assert_eq!(invariant_tsc_khz(&USABLE, one, "tsc\n"), None, "{one}");
        }
        // The host's kernel does not keep time with its TSC (or cannot say).
        for other in ["hpet\n", "kvm-clock\n", ""] {
            assert_eq!(invariant_tsc_khz(&USABLE, both, other), None, "{other:?}");
        }
        let unreported = KvmProbe::Usable {
            api_version: 12,
            tsc_khz: None,
        };
        assert_eq!(invariant_tsc_khz(&unreported, both, "tsc\n"), None);
        let unusable = KvmProbe::Unusable("x".into());
        assert_eq!(invariant_tsc_khz(&unusable, both, "tsc\n"), None);
    }

    #[test]
    fn this_hosts_probe_reports_a_plausible_rate() {
        // Where /dev/kvm works and says: a TSC between 100 MHz and 10 GHz.
        if let KvmProbe::Usable {
            tsc_khz: Some(k), ..
        } = probe_kvm()
        {
            assert!((100_000..10_000_000).contains(&k), "{k} kHz");
        }
    }

    #[test]
    fn pvm_wins_over_cpu_flags() {
        let m = modules(&["kvm", "kvm_pvm"]);
        assert_eq!(
            classify(&USABLE, m.path(), "flags : fpu vmx sse"),
            HostKind::Pvm
        );
        assert_eq!(choose_backend(&HostKind::Pvm).0.to_string(), "qemu-tcg");
    }

    #[test]
    fn hardware_kvm_from_flags_or_modules() {
        let m = modules(&["kvm"]);
        assert_eq!(
            classify(&USABLE, m.path(), "flags\t\t: fpu svm sse"),
            HostKind::HardwareKvm { vendor: "AMD-V" }
        );
        let m = modules(&["kvm", "kvm_intel"]);
        assert_eq!(
            classify(&USABLE, m.path(), "flags : fpu"),
            HostKind::HardwareKvm {
                vendor: "Intel VT-x"
            }
        );
        assert_eq!(
            choose_backend(&HostKind::HardwareKvm { vendor: "AMD-V" })
                .0
                .to_string(),
            "husk-vmm"
        );
        assert_eq!(BackendChoice::HuskVmm.qemu_accel(), Accel::Kvm);
    }

    #[test]
    fn unusable_kvm_means_tcg() {
        let m = modules(&["kvm_intel"]);
        let k = KvmProbe::Unusable("x".into());
        assert_eq!(classify(&k, m.path(), "flags : vmx"), HostKind::NoKvm);
        assert_eq!(
            choose_backend(&HostKind::NoKvm).0,
            BackendChoice::Qemu(Accel::Tcg)
        );
        assert_eq!(choose_backend(&HostKind::NoKvm).0.qemu_accel(), Accel::Tcg);
    }
}
