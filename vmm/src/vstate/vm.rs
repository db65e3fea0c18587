//! The KVM VM: opening /dev/kvm, the in-kernel interrupt controllers (PIC, IOAPIC, LAPICs)
//! and PIT, and guest RAM registered as memory slots.

use std::path::Path;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestRam;

/// Where KVM lives.
pub const KVM_PATH: &str = "/dev/kvm";
/// KVM needs three pages for the TSS on Intel hosts; put them just below the BIOS area
/// at the top of the 32-bit space, inside the MMIO hole.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors while creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is missing.
    #[error("{KVM_PATH}: not found — this host has no KVM; enable virtualisation or use the qemu backend")]
    KvmMissing,
    /// /dev/kvm cannot be opened by this user.
    #[error("{KVM_PATH}: permission denied — run as root or add the user to group kvm")]
    KvmDenied,
    /// /dev/kvm exists but fails to open.
    #[error("{KVM_PATH}: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// What was being set up.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_op(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens /dev/kvm, turning the usual failures into actionable errors.
pub fn open_kvm() -> Result<Kvm, VmError> {
    if !Path::new(KVM_PATH).exists() {
        return Err(VmError::KvmMissing);
    }
    Kvm::new().map_err(|e| match e.errno() {
        libc::EACCES | libc::EPERM => VmError::KvmDenied,
        libc::ENOENT | libc::ENODEV => VmError::KvmMissing,
        _ => VmError::KvmOpen(e),
    })
}

/// A VM with its interrupt controllers and RAM in place.
#[derive(Debug)]
pub struct KvmVm {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// The VM handle.
    pub fd: VmFd,
}

impl KvmVm {
    /// Creates the VM with its irqchip and PIT, but no RAM yet ([`Self::register_ram`]).
    pub fn without_ram(kvm: Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(kvm_op("create VM"))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(kvm_op("set TSS address"))?;
        fd.create_irq_chip().map_err(kvm_op("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_op("create PIT"))?;
        Ok(Self { kvm, fd })
    }

    /// Registers `ram` as the VM's memory slots. It must be done before a vCPU runs, and
    /// nothing else in building a VM needs it, so [`crate::Vmm::build`] does it on a thread
    /// of its own beside the rest: on the hosts measured it is the slowest step of a VM's
    /// start (5–6 ms on the 2-core kvm_pvm machine, mostly waiting in KVM, not CPU).
    pub fn register_ram(&self, ram: &GuestRam) -> Result<(), VmError> {
        let fd = &self.fd;
        for (slot, region) in ram.mem.iter().enumerate() {
            let host = ram
                .mem
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::Kvm {
                    what: "map guest RAM",
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let region_desc = kvm_userspace_memory_region {
                slot: u32::try_from(slot).expect("a few slots"),
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range belongs to `ram`'s mapping, which the caller keeps alive
            // for as long as the VM (the Vmm owns both and drops the VM first).
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(kvm_op("register guest RAM"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_errors_say_what_to_do() {
        assert!(VmError::KvmDenied.to_string().contains("group kvm"));
        assert!(VmError::KvmMissing.to_string().contains("qemu backend"));
    }
}
