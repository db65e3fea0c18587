//! Register state-machine tests of the MMIO transport, over mock guest memory.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::QueueError;

#[derive(Debug, Default)]
struct Log {
    activated: Option<u64>,
    resets: u32,
    processed: Vec<usize>,
    fail_next: bool,
}

struct Fake(Arc<Mutex<Log>>);

const FAKE_FEATURES: u64 = VIRTIO_F_VERSION_1 | 0b101;

impl VirtioDevice<GuestMemoryMmap> for Fake {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        FAKE_FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = u8::try_from(offset).unwrap() + u8::try_from(i).unwrap();
        }
    }
    fn activate(&mut self, acked: u64) {
        self.0.lock().unwrap().activated = Some(acked);
    }
    fn process_queue(
        &mut self,
        index: usize,
        _: &mut Queue,
        _: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        let mut log = self.0.lock().unwrap();
        log.processed.push(index);
        if std::mem::take(&mut log.fail_next) {
            return Err(QueueError::Queue(
                virtio_queue::Error::InvalidAvailRingIndex,
            ));
        }
        Ok(true)
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().resets += 1;
    }
    fn name(&self) -> &'static str {
        "fake"
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

struct Rig {
    t: MmioTransport<GuestMemoryMmap>,
    log: Arc<Mutex<Log>>,
    irq: Arc<IrqTrigger>,
}

fn rig() -> Rig {
    let log = Arc::new(Mutex::new(Log::default()));
    let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let t = MmioTransport::new(Box::new(Fake(log.clone())), mem(), irq.clone());
    Rig { t, log, irq }
}

fn r(t: &mut MmioTransport<GuestMemoryMmap>, off: u32) -> u32 {
    let mut d = [0u8; 4];
    t.read(u64::from(off), &mut d);
    u32::from_le_bytes(d)
}

fn w(t: &mut MmioTransport<GuestMemoryMmap>, off: u32, v: u32) {
    t.write(u64::from(off), &v.to_le_bytes());
}

fn negotiate(t: &mut MmioTransport<GuestMemoryMmap>, features: u64) {
    w(t, reg::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    w(t, reg::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(
        t,
        reg::VIRTIO_MMIO_DRIVER_FEATURES,
        u32::try_from(features & 0xffff_ffff).unwrap(),
    );
    w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(
        t,
        reg::VIRTIO_MMIO_DRIVER_FEATURES,
        u32::try_from(features >> 32).unwrap(),
    );
    w(
        t,
        reg::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
    );
}

fn setup_queue(
    t: &mut MmioTransport<GuestMemoryMmap>,
    sel: u32,
    desc: u64,
    avail: u64,
    used: u64,
    size: u32,
) {
    let lo = |a: u64| u32::try_from(a & 0xffff_ffff).unwrap();
    let hi = |a: u64| u32::try_from(a >> 32).unwrap();
    w(t, reg::VIRTIO_MMIO_QUEUE_SEL, sel);
    w(t, reg::VIRTIO_MMIO_QUEUE_NUM, size);
    w(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, lo(desc));
    w(t, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, hi(desc));
    w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, lo(avail));
    w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, hi(avail));
    w(t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, lo(used));
    w(t, reg::VIRTIO_MMIO_QUEUE_USED_HIGH, hi(used));
    w(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
}

const FULL: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

#[test]
fn identity_registers() {
    let mut x = rig();
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_DEVICE_ID), 42);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    w(&mut x.t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 0b101);
    w(&mut x.t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 1);
    w(&mut x.t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 0);
}

#[test]
fn full_negotiation_activates_and_notify_interrupts() {
    let mut x = rig();
    negotiate(&mut x.t, VIRTIO_F_VERSION_1 | 0b1);
    assert_eq!(
        r(&mut x.t, reg::VIRTIO_MMIO_STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK
    );
    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    setup_queue(&mut x.t, 0, 0x1000, 0x2000, 0x3000, 16);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
    w(&mut x.t, reg::VIRTIO_MMIO_STATUS, FULL);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_STATUS), FULL);
    assert_eq!(
        x.log.lock().unwrap().activated,
        Some(VIRTIO_F_VERSION_1 | 0b1)
    );

    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(x.log.lock().unwrap().processed, vec![0]);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING);
    assert_eq!(x.irq.eventfd().read().unwrap(), 1);
    w(&mut x.t, reg::VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(x.t.counters().notifications, 1);
}

#[test]
fn features_not_offered_or_without_version_1_are_refused() {
    for bad in [VIRTIO_F_VERSION_1 | 0b10, 0b1] {
        let mut x = rig();
        negotiate(&mut x.t, bad);
        assert_eq!(
            r(&mut x.t, reg::VIRTIO_MMIO_STATUS),
            ACKNOWLEDGE | DRIVER,
            "features {bad:#x}"
        );
        // Without FEATURES_OK, DRIVER_OK is refused too.
        w(
            &mut x.t,
            reg::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | DRIVER_OK,
        );
        assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
        assert_eq!(x.log.lock().unwrap().activated, None);
    }
}

#[test]
fn status_steps_out_of_order_or_clearing_bits_are_refused() {
    let mut x = rig();
    w(&mut x.t, reg::VIRTIO_MMIO_STATUS, DRIVER);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_STATUS), 0);
    w(&mut x.t, reg::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    w(&mut x.t, reg::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | FEATURES_OK);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_STATUS), ACKNOWLEDGE);
    w(&mut x.t, reg::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    // Clearing ACKNOWLEDGE while setting FEATURES_OK is not a valid step.
    w(&mut x.t, reg::VIRTIO_MMIO_STATUS, DRIVER | FEATURES_OK);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
    // FAILED can always be added.
    w(
        &mut x.t,
        reg::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FAILED,
    );
    assert_eq!(
        r(&mut x.t, reg::VIRTIO_MMIO_STATUS),
        ACKNOWLEDGE | DRIVER | FAILED
    );
    assert!(x.t.counters().refused_writes >= 3);
}

#[test]
fn driver_features_are_only_taken_in_the_driver_state() {
    let mut x = rig();
    w(&mut x.t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 0b1);
    assert_eq!(x.t.acked_features(), 0);
    negotiate(&mut x.t, VIRTIO_F_VERSION_1);
    w(&mut x.t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(&mut x.t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 0b101);
    assert_eq!(
        x.t.acked_features(),
        VIRTIO_F_VERSION_1,
        "changed after FEATURES_OK"
    );
}

#[test]
fn queue_registers_only_change_between_features_ok_and_driver_ok() {
    let mut x = rig();
    w(&mut x.t, reg::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    w(&mut x.t, reg::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    setup_queue(&mut x.t, 0, 0x1000, 0x2000, 0x3000, 16);
    assert_eq!(
        r(&mut x.t, reg::VIRTIO_MMIO_QUEUE_READY),
        0,
        "queue set up before FEATURES_OK"
    );
    w(&mut x.t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(&mut x.t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(
        &mut x.t,
        reg::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
    );
    setup_queue(&mut x.t, 0, 0x1000, 0x2000, 0x3000, 16);
    w(&mut x.t, reg::VIRTIO_MMIO_STATUS, FULL);
    // After DRIVER_OK the rings cannot move.
    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000);
    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    // A queue that does not exist has no size and cannot be notified.
    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_SEL, 9);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 9);
    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, u32::MAX);
    // An existing but not ready queue is not processed either.
    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert!(x.log.lock().unwrap().processed.is_empty());
}

#[test]
fn driver_ok_with_an_invalid_queue_marks_needs_reset() {
    // Descriptor table beyond guest memory; available ring above 4 GiB; used ring running
    // off the end of RAM. (Misaligned addresses and sizes that are not a power of two never
    // reach the queue: virtio-queue ignores such writes.)
    for (desc, avail, used) in [
        (0x4000_0000u64, 0x2000u64, 0x3000u64),
        (0x1000, 0x1_0000_2000, 0x3000),
        (0x1000, 0x2000, 0xf_ffc0),
    ] {
        let mut x = rig();
        negotiate(&mut x.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut x.t, 0, desc, avail, used, 16);
        w(&mut x.t, reg::VIRTIO_MMIO_STATUS, FULL);
        let status = r(&mut x.t, reg::VIRTIO_MMIO_STATUS);
        assert_ne!(
            status & NEEDS_RESET,
            0,
            "desc {desc:#x} avail {avail:#x} used {used:#x}: {status:#x}"
        );
        assert_ne!(
            r(&mut x.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG,
            0
        );
        assert_eq!(x.log.lock().unwrap().activated, None);
        w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(
            x.log.lock().unwrap().processed.is_empty(),
            "a broken device must not process"
        );
    }
}

#[test]
fn a_failing_queue_marks_needs_reset_and_reset_recovers() {
    let mut x = rig();
    negotiate(&mut x.t, VIRTIO_F_VERSION_1);
    setup_queue(&mut x.t, 0, 0x1000, 0x2000, 0x3000, 16);
    w(&mut x.t, reg::VIRTIO_MMIO_STATUS, FULL);
    x.log.lock().unwrap().fail_next = true;
    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_STATUS), FULL | NEEDS_RESET);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_CONFIG_GENERATION), 1);
    assert_eq!(x.t.counters().needs_reset, 1);
    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(
        x.log.lock().unwrap().processed,
        vec![0],
        "no processing while NEEDS_RESET"
    );

    w(&mut x.t, reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_STATUS), 0);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(x.t.acked_features(), 0);
    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(x.log.lock().unwrap().resets, 1);
    // And the device can be brought up again.
    negotiate(&mut x.t, VIRTIO_F_VERSION_1);
    setup_queue(&mut x.t, 0, 0x1000, 0x2000, 0x3000, 16);
    w(&mut x.t, reg::VIRTIO_MMIO_STATUS, FULL);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_STATUS), FULL);
}

#[test]
fn notify_before_driver_ok_is_ignored() {
    let mut x = rig();
    negotiate(&mut x.t, VIRTIO_F_VERSION_1);
    setup_queue(&mut x.t, 0, 0x1000, 0x2000, 0x3000, 16);
    w(&mut x.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert!(x.log.lock().unwrap().processed.is_empty());
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn registers_need_aligned_32_bit_accesses_and_config_space_passes_through() {
    let mut x = rig();
    let mut b = [0xffu8; 2];
    x.t.read(u64::from(reg::VIRTIO_MMIO_MAGIC_VALUE), &mut b);
    assert_eq!(b, [0, 0]);
    let mut d = [0xffu8; 4];
    x.t.read(2, &mut d);
    assert_eq!(d, [0; 4]);
    x.t.write(u64::from(reg::VIRTIO_MMIO_STATUS), &[1]);
    assert_eq!(r(&mut x.t, reg::VIRTIO_MMIO_STATUS), 0);
    let mut c = [0u8; 3];
    x.t.read(CONFIG_SPACE_OFFSET + 4, &mut c);
    assert_eq!(c, [4, 5, 6]);
}

#[test]
fn rng_behind_the_transport_fills_a_driver_buffer() {
    let m = mem();
    let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let rng = Rng::from_urandom().unwrap();
    let mut t = MmioTransport::new(Box::new(rng), m.clone(), irq.clone());
    let mq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    setup_queue(
        &mut t,
        0,
        mq.desc_table_addr().0,
        mq.avail_addr().0,
        mq.used_addr().0,
        16,
    );
    w(&mut t, reg::VIRTIO_MMIO_STATUS, FULL);
    assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), FULL);
    let flags = u16::try_from(VRING_DESC_F_WRITE).unwrap();
    mq.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(
            0x8000, 64, flags, 0,
        ))],
        0,
    )
    .unwrap();
    w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(mq.used().idx().load(), 1);
    assert_eq!(mq.used().ring().ref_at(0).unwrap().load().len(), 64);
    let mut buf = [0u8; 64];
    m.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();
    assert!(
        buf.iter().any(|b| *b != 0),
        "64 random bytes are not all zero"
    );
    assert_eq!(irq.status(), INT_VRING);
}
