//! CPUID for each vCPU: KVM's supported set, normalised so every vCPU reports its own APIC
//! id, the VM's topology (N single-threaded cores in one package), the hypervisor bit, and
//! no PMU (a microVM has none to offer).
//!
//! Plus what KVM emulates but leaves out of `KVM_GET_SUPPORTED_CPUID` for the VMM to offer:
//! the TSC-deadline LAPIC timer (CPUID.1:ECX[24], `KVM_CAP_TSC_DEADLINE_TIMER`). Without it
//! Linux calibrates the LAPIC timer against the PIT at boot (`calibrate_APIC_clock`: ~100 ms
//! of ticks, then a verification that a starved vCPU can fail, leaving the guest without a
//! LAPIC timer); with it there is nothing to calibrate. Measured in the nested tier: ~0.5 s
//! of our guest's boot (BENCHMARKS.md, "Linux boot in L1"). Firecracker and QEMU set it too.
//! KVM's paravirtual leaves (0x40000000 signature, 0x40000001 features: kvm-clock, PV EOI,
//! …) come in KVM's supported set as they are: the guest finds kvm-clock there and takes
//! its TSC frequency from it, so there is no PIT calibration of the TSC.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// The topology the guest sees.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    /// This vCPU's index, which is also its APIC id.
    pub cpu_index: u8,
    /// vCPUs in the VM.
    pub cpu_count: u8,
}

/// What this host's KVM emulates beyond its supported CPUID.
#[derive(Debug, Clone, Copy, Default)]
pub struct Emulated {
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: the in-kernel LAPIC has the TSC-deadline mode.
    pub tsc_deadline_timer: bool,
}

impl Emulated {
    /// Asks KVM.
    pub fn of(kvm: &kvm_ioctls::Kvm) -> Self {
        Self {
            tsc_deadline_timer: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        }
    }
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to number `n` items (ceil(log2 n)).
fn id_bits(n: u8) -> u32 {
    if n <= 1 {
        0
    } else {
        u8::BITS - (n - 1).leading_zeros()
    }
}

fn normalise_entry(e: &mut kvm_cpuid_entry2, t: Topology, emulated: Emulated) {
    let apic = u32::from(t.cpu_index);
    let n = u32::from(t.cpu_count);
    match e.function {
        LEAF_FEATURES => {
            e.ebx = (e.ebx & 0x0000_ffff) | (apic << 24) | (n << 16);
            e.ecx |= ECX_HYPERVISOR;
            if emulated.tsc_deadline_timer {
                e.ecx |= ECX_TSC_DEADLINE;
            }
            if n > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // Cores per package in 31:26; caches above L2 are shared by all cores.
            let level = (e.eax >> 5) & 0x7;
            e.eax &= 0x3fff;
            e.eax |= (n - 1) << 26;
            if level >= 3 {
                e.eax |= (n - 1) << 14;
            }
        }
        LEAF_PMU => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            let (eax, ebx, level_type) = match e.index {
                0 => (0, 1, 1),                    // SMT: one thread per core
                1 => (id_bits(t.cpu_count), n, 2), // core: all vCPUs
                _ => (0, 0, 0),
            };
            e.eax = eax;
            e.ebx = ebx;
            e.ecx = (level_type << 8) | (e.index & 0xff);
            e.edx = apic;
        }
        _ => {}
    }
}

/// Normalises KVM's supported CPUID for one vCPU.
pub fn normalise(cpuid: &mut CpuId, t: Topology, emulated: Emulated) {
    for e in cpuid.as_mut_slice() {
        normalise_entry(e, t, emulated);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!(
            [id_bits(1), id_bits(2), id_bits(3), id_bits(4), id_bits(5)],
            [0, 1, 2, 2, 3]
        );
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = entry(1, 0);
        normalise_entry(
            &mut e,
            Topology {
                cpu_index: 3,
                cpu_count: 4,
            },
            Emulated::default(),
        );
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn leaf_b_reports_the_vm_topology() {
        let t = Topology {
            cpu_index: 1,
            cpu_count: 3,
        };
        let mut smt = entry(0xb, 0);
        let mut core = entry(0xb, 1);
        let mut end = entry(0xb, 2);
        for e in [&mut smt, &mut core, &mut end] {
            normalise_entry(e, t, Emulated::default());
        }
        assert_eq!((smt.ebx, smt.ecx >> 8, smt.edx), (1, 1, 1));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 3, 2));
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
    }

    #[test]
    fn pmu_is_hidden() {
        let mut e = entry(0xa, 0);
        normalise_entry(
            &mut e,
            Topology {
                cpu_index: 0,
                cpu_count: 1,
            },
            Emulated::default(),
        );
        assert_eq!((e.eax, e.ebx), (0, 0));
    }

    #[test]
    fn tsc_deadline_timer_is_offered_when_kvm_emulates_it() {
        let t = Topology {
            cpu_index: 0,
            cpu_count: 1,
        };
        let mut with = entry(1, 0);
        normalise_entry(
            &mut with,
            t,
            Emulated {
                tsc_deadline_timer: true,
            },
        );
        assert_ne!(with.ecx & ECX_TSC_DEADLINE, 0);
        let mut without = entry(1, 0);
        normalise_entry(&mut without, t, Emulated::default());
        assert_eq!(without.ecx & ECX_TSC_DEADLINE, 0);
        // Only leaf 1 carries it.
        let mut other = entry(7, 0);
        normalise_entry(
            &mut other,
            t,
            Emulated {
                tsc_deadline_timer: true,
            },
        );
        assert_eq!(other.ecx, 0);
    }
}
