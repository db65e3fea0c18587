//! The virtio-mmio transport (virtio 1.x, "version 2" register layout): the registers,
//! the device-status state machine, feature negotiation and queue setup. Everything the
//! driver writes is checked here before a device sees it; a device only ever gets a
//! ready, valid queue after DRIVER_OK.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use super::{IrqTrigger, VirtioDevice, INT_CONFIG, INT_VRING, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

/// "virt" in little endian.
pub(crate) const MMIO_MAGIC: u32 = 0x7472_6976;
/// The non-legacy register layout.
pub(crate) const MMIO_VERSION: u32 = 2;
/// Our vendor id: "HUSK" in little endian.
pub(crate) const VENDOR_ID: u32 = 0x4b53_5548;
/// Where the device configuration space starts.
pub(crate) const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Counters of one transport, for the control API.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TransportCounters {
    /// QueueNotify writes handled.
    pub notifications: u64,
    /// Times the device was marked DEVICE_NEEDS_RESET.
    pub needs_reset: u64,
    /// Driver writes refused (bad transition, write in the wrong state).
    pub refused_writes: u64,
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport<M> {
    device: Box<dyn VirtioDevice<M>>,
    mem: M,
    irq: Arc<IrqTrigger>,
    status: u32,
    features_select: u32,
    acked_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    queues: Vec<Queue>,
    config_generation: u32,
    counters: TransportCounters,
}

impl<M> std::fmt::Debug for MmioTransport<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .finish()
    }
}

impl<M: GuestMemory + Send> MmioTransport<M> {
    /// Puts `device` behind a transport that reaches guest memory through `mem` and
    /// interrupts through `irq`.
    pub fn new(device: Box<dyn VirtioDevice<M>>, mem: M, irq: Arc<IrqTrigger>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are valid powers of two"))
            .collect();
        Self {
            device,
            mem,
            irq,
            status: 0,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            queues,
            config_generation: 0,
            counters: TransportCounters::default(),
        }
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver acknowledged.
    #[cfg(test)]
    pub(crate) fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The device's interrupt (for devices whose backend signals used buffers itself).
    pub fn irq(&self) -> Arc<IrqTrigger> {
        self.irq.clone()
    }

    /// Transport counters.
    pub fn counters(&self) -> TransportCounters {
        self.counters
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues
            .get_mut(usize::try_from(self.queue_select).ok()?)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK, on a queue the
    /// driver has not made ready yet.
    fn queue_config_allowed(&mut self) -> bool {
        self.status & (FEATURES_OK | DRIVER_OK | FAILED) == FEATURES_OK
            && self.selected_queue().is_some_and(|q| !q.ready())
    }

    fn refuse(&mut self) {
        self.counters.refused_writes += 1;
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.features_select = 0;
        self.acked_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.irq.ack(u32::MAX);
    }

    fn mark_needs_reset(&mut self) {
        self.status |= NEEDS_RESET;
        self.counters.needs_reset += 1;
        self.config_generation = self.config_generation.wrapping_add(1);
        // If the interrupt cannot be raised the driver still sees the status bit.
        let _ = self.irq.trigger(INT_CONFIG);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver may only add bits; FAILED may be added at any time.
        if v & old != old {
            return self.refuse();
        }
        let added = v & !old & !NEEDS_RESET;
        if added == FAILED {
            self.status |= FAILED;
            return;
        }
        let base = old & !NEEDS_RESET;
        match (base, added) {
            (0, ACKNOWLEDGE) => self.status |= ACKNOWLEDGE,
            (ACKNOWLEDGE, DRIVER) => self.status |= DRIVER,
            (b, FEATURES_OK) if b == ACKNOWLEDGE | DRIVER => {
                let offered = self.device.features();
                let ok = self.acked_features & !offered == 0
                    && self.acked_features & VIRTIO_F_VERSION_1 != 0;
                // Refused features leave FEATURES_OK clear: the driver reads it back.
                if ok {
                    self.status |= FEATURES_OK;
                } else {
                    self.refuse();
                }
            }
            (b, DRIVER_OK) if b == ACKNOWLEDGE | DRIVER | FEATURES_OK => {
                self.status |= DRIVER_OK;
                if self
                    .queues
                    .iter()
                    .any(|q| q.ready() && !q.is_valid(&self.mem))
                    || !self
                        .device
                        .activate_queues(self.acked_features, &self.queues, &self.mem)
                {
                    self.mark_needs_reset();
                }
            }
            _ => self.refuse(),
        }
    }

    fn notify(&mut self, index: u32) {
        let Some(i) = usize::try_from(index)
            .ok()
            .filter(|i| *i < self.queues.len())
        else {
            return self.refuse();
        };
        if self.status & (DRIVER_OK | NEEDS_RESET | FAILED) != DRIVER_OK || !self.queues[i].ready()
        {
            return self.refuse();
        }
        self.counters.notifications += 1;
        let result = self.device.process(Some(i), &mut self.queues, &self.mem);
        self.after_processing(result);
    }

    fn after_processing(&mut self, result: Result<bool, super::QueueError>) {
        match result {
            Ok(true) => {
                let _ = self.irq.trigger(INT_VRING);
            }
            Ok(false) => {}
            Err(_) => self.mark_needs_reset(),
        }
    }

    /// Lets the device work on its queues because its backend has something for the
    /// driver (called from the device's event thread). Nothing happens before DRIVER_OK
    /// or once the device needs a reset.
    pub fn service(&mut self) {
        if self.status & (DRIVER_OK | NEEDS_RESET | FAILED) == DRIVER_OK {
            let result = self.device.process(None, &mut self.queues, &self.mem);
            self.after_processing(result);
        }
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => {
                let f = self.device.features();
                #[allow(clippy::cast_possible_truncation)] // halves of a u64
                match self.features_select {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            reg::VIRTIO_MMIO_QUEUE_READY => {
                self.selected_queue().map_or(0, |q| u32::from(q.ready()))
            }
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.irq.status(),
            reg::VIRTIO_MMIO_STATUS => self.status,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, v: u32) {
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.features_select = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.acked_features_select = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & (ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED)
                    != ACKNOWLEDGE | DRIVER
                {
                    return self.refuse();
                }
                match self.acked_features_select {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => self.refuse(),
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = v,
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.irq.ack(v),
            reg::VIRTIO_MMIO_STATUS => self.set_status(v),
            reg::VIRTIO_MMIO_QUEUE_NUM
            | reg::VIRTIO_MMIO_QUEUE_READY
            | reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if !self.queue_config_allowed() {
                    return self.refuse();
                }
                let q = self
                    .selected_queue()
                    .expect("checked by queue_config_allowed");
                match offset {
                    // Sizes that are not a power of two up to the maximum are ignored by
                    // set_size; is_valid() catches what remains at DRIVER_OK.
                    reg::VIRTIO_MMIO_QUEUE_NUM => q.set_size(u16::try_from(v).unwrap_or(0)),
                    reg::VIRTIO_MMIO_QUEUE_READY => q.set_ready(v == 1),
                    reg::VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                    reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                    reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
                    reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
                    reg::VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
                    _ => q.set_used_ring_address(None, Some(v)),
                }
            }
            _ => self.refuse(),
        }
    }
}

impl<M: GuestMemory + Send> BusDevice for MmioTransport<M> {
    fn name(&self) -> &'static str {
        self.device.name()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        let mut v = vec![
            ("notifications", c.notifications),
            ("needs_reset", c.needs_reset),
            ("refused_writes", c.refused_writes),
        ];
        v.extend(self.device.counters());
        v
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            return self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
        }
        // Registers are 32 bits wide and must be accessed as such.
        match (u32::try_from(offset), data.len()) {
            (Ok(off), 4) if off % 4 == 0 => {
                data.copy_from_slice(&self.read_register(off).to_le_bytes())
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            return self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
        }
        match (u32::try_from(offset), <[u8; 4]>::try_from(data)) {
            (Ok(off), Ok(bytes)) if off % 4 == 0 => {
                self.write_register(off, u32::from_le_bytes(bytes))
            }
            _ => self.refuse(),
        }
    }
}

#[cfg(test)]
mod tests;
