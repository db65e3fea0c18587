//! virtio over MMIO: the transport (register state machine, feature negotiation, queue
//! setup) and the devices behind it.
//!
//! A device here is split the vmm-reference way: `device.rs` says what the device is
//! (type, features, config space) and `handler.rs` holds its queue logic as a pure
//! function over a queue and guest memory, generic over the memory type so unit tests
//! run it on mock queues. Queue notifications are handled on the vCPU thread that wrote
//! QueueNotify: fine for devices that never block (rng); devices that wait on host I/O
//! (vsock, net) get an event loop of their own.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

#[cfg(test)]
mod randomized_tests;

/// Feature bit: the device speaks virtio 1.x (no legacy interface). Every device offers it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// A failed queue: the guest handed over something the device cannot continue from.
/// The transport marks the device DEVICE_NEEDS_RESET; the VMM goes on.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue itself is broken (ring index out of range, unreadable ring).
    #[error("virtio queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// The ring is in guest memory the device cannot reach.
    #[error("virtio queue memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What a virtio device must provide to sit behind the MMIO transport.
pub trait VirtioDevice<M>: Send {
    /// The virtio device id (4 = entropy, 19 = vsock, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each of its queues; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads from the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    /// Writes to the device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, acked_features: u64) {
        let _ = acked_features;
    }
    /// DRIVER_OK, for devices that hand their queues to someone else (a vhost-user
    /// backend): they get the queues as the driver set them up. Returns false when the
    /// device cannot start, which marks it DEVICE_NEEDS_RESET.
    fn activate_queues(&mut self, acked_features: u64, queues: &[Queue], mem: &M) -> bool {
        let _ = (queues, mem);
        self.activate(acked_features);
        true
    }
    /// Processes what the driver made available on queue `index`; returns whether the
    /// driver must be interrupted. An `Err` marks the device DEVICE_NEEDS_RESET.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, QueueError> {
        let _ = (index, queue, mem);
        Ok(false)
    }
    /// Processes the device's queues: after the driver notified queue `notified`, or when
    /// the device's own backend has work (`None`). Devices whose queues depend on each
    /// other (vsock) override this; the default hands the notified queue to
    /// [`process_queue`](Self::process_queue).
    fn process(
        &mut self,
        notified: Option<usize>,
        queues: &mut [Queue],
        mem: &M,
    ) -> Result<bool, QueueError> {
        match notified.and_then(|i| queues.get_mut(i).map(|q| (i, q))) {
            Some((i, q)) => self.process_queue(i, q, mem),
            None => Ok(false),
        }
    }
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// A short name for counters and logs.
    fn name(&self) -> &'static str;
    /// The device's own counters (requests, bytes, ...).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// The device's interrupt: the MMIO InterruptStatus bits plus an eventfd KVM injects.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

/// InterruptStatus bit: a used buffer was returned.
pub(crate) const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the configuration (or device status) changed.
pub(crate) const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

impl IrqTrigger {
    /// A trigger raising `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::AcqRel);
        self.evt.write(1)
    }

    /// InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears `bits`.
    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// The eventfd (for KVM's irqfd, and for tests).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}
