//! Placement of virtio-mmio devices: each gets the next 4 KiB window above
//! [`MMIO_DEVICES_START`] and the next IOAPIC pin from [`VIRTIO_IRQ_BASE`], an irqfd for
//! that pin, a place on the MMIO bus, and a `virtio_mmio.device=` argument so Linux finds
//! it without ACPI or a device tree.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{IOAPIC_PINS, MMIO_DEVICES_START, MMIO_DEVICE_SIZE, VIRTIO_IRQ_BASE};
use crate::devices::bus::{Bus, BusError};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{IrqTrigger, VirtioDevice};

/// A transport as the bus and a device's event thread share it.
pub type SharedTransport = Arc<Mutex<MmioTransport<GuestMemoryMmap>>>;

/// Errors while adding a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// Every IOAPIC pin for virtio devices is taken.
    #[error("too many virtio devices: at most {} fit the IOAPIC", IOAPIC_PINS - VIRTIO_IRQ_BASE)]
    NoIrq,
    /// The eventfd or irqfd for the device's interrupt failed.
    #[error("wiring the interrupt of virtio device {index}: {source}")]
    Irq {
        /// Device index.
        index: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The window clashes on the bus (a VMM bug).
    #[error("placing virtio device: {0}")]
    Bus(#[from] BusError),
}

/// Where one device ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Window base address.
    pub addr: u64,
    /// IOAPIC pin.
    pub irq: u32,
}

impl MmioSlot {
    /// The kernel argument announcing this device.
    pub fn cmdline_arg(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            MMIO_DEVICE_SIZE >> 10,
            self.addr,
            self.irq
        )
    }
}

/// The virtio-mmio devices of a VM.
#[derive(Debug, Default)]
pub struct MmioDeviceManager {
    slots: Vec<MmioSlot>,
}

impl MmioDeviceManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self::default()
    }

    /// The slot the next device will get.
    pub fn next_slot(&self) -> Option<MmioSlot> {
        let n = u32::try_from(self.slots.len()).ok()?;
        let irq = VIRTIO_IRQ_BASE + n;
        (irq < IOAPIC_PINS).then(|| MmioSlot {
            addr: MMIO_DEVICES_START + u64::from(n) * MMIO_DEVICE_SIZE,
            irq,
        })
    }

    /// Adds `device`: interrupt wired through KVM, transport on `bus`. Returns where it
    /// went and the transport (for devices with an event thread of their own).
    pub fn add(
        &mut self,
        vm: &VmFd,
        bus: &mut Bus,
        mem: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice<GuestMemoryMmap>>,
    ) -> Result<(MmioSlot, SharedTransport), DeviceManagerError> {
        let slot = self.next_slot().ok_or(DeviceManagerError::NoIrq)?;
        let index = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        let irq_err = |source| DeviceManagerError::Irq { index, source };
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(irq_err)?;
        vm.register_irqfd(&evt, slot.irq)
            .map_err(|e| irq_err(e.into()))?;
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            mem.clone(),
            Arc::new(IrqTrigger::new(evt)),
        )));
        bus.insert(slot.addr, MMIO_DEVICE_SIZE, transport.clone())?;
        self.slots.push(slot);
        Ok((slot, transport))
    }

    /// Kernel arguments for every device.
    pub fn cmdline_args(&self) -> Vec<String> {
        self.slots.iter().map(MmioSlot::cmdline_arg).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_consecutive_windows_and_pins() {
        let mut m = MmioDeviceManager::new();
        let first = m.next_slot().unwrap();
        assert_eq!(
            first,
            MmioSlot {
                addr: 0xd000_0000,
                irq: 5
            }
        );
        assert_eq!(first.cmdline_arg(), "virtio_mmio.device=4K@0xd0000000:5");
        m.slots.push(first);
        assert_eq!(
            m.next_slot().unwrap(),
            MmioSlot {
                addr: 0xd000_1000,
                irq: 6
            }
        );
        for _ in 1..(IOAPIC_PINS - VIRTIO_IRQ_BASE) {
            let s = m.next_slot().unwrap();
            m.slots.push(s);
        }
        assert_eq!(m.next_slot(), None, "pins run out at the IOAPIC's 24");
    }
}
