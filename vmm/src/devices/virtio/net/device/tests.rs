//! virtio-net over mock queues and a mock tap.

use std::collections::VecDeque;
use std::sync::Mutex;

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;

/// Frames waiting to be read, and frames written, shared with the test.
#[derive(Default)]
struct Wire {
    inbound: VecDeque<Vec<u8>>,
    outbound: Vec<Vec<u8>>,
}

struct MockTap(Arc<Mutex<Wire>>);

impl FrameIo for MockTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let f = self
            .0
            .lock()
            .unwrap()
            .inbound
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        buf[..f.len()].copy_from_slice(&f);
        Ok(f.len())
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap().outbound.push(frame.to_vec());
        Ok(())
    }
}

#[allow(clippy::cast_possible_truncation)] // a 16-bit descriptor flag
const W: u16 = VRING_DESC_F_WRITE as u16;

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

struct Rig {
    mem: GuestMemoryMmap,
    wire: Arc<Mutex<Wire>>,
    dev: Net<MockTap>,
}

fn rig() -> Rig {
    let wire = Arc::new(Mutex::new(Wire::default()));
    let dev = Net::new(MockTap(wire.clone()), [2, 0, 0, 0, 0, 7]).unwrap();
    Rig {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        wire,
        dev,
    }
}

fn queues(
    mem: &GuestMemoryMmap,
) -> (
    MockSplitQueue<'_, GuestMemoryMmap>,
    MockSplitQueue<'_, GuestMemoryMmap>,
    Vec<Queue>,
) {
    let rx = MockSplitQueue::create(mem, GuestAddress(0), 16);
    let tx = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
    let qs = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
    (rx, tx, qs)
}

#[test]
fn transmitted_frames_reach_the_tap_without_the_virtio_header() {
    let mut r = rig();
    let (_rx, tx, mut qs) = queues(&r.mem);
    r.mem
        .write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(0x8000))
        .unwrap();
    r.mem
        .write_slice(b"ethernet frame", GuestAddress(0x9000))
        .unwrap();
    // Header and frame in separate descriptors of one chain.
    let mut d0 = SplitDescriptor::new(0x8000, 12, 1, 1); // NEXT
    d0.set_next(1);
    tx.add_desc_chains(&[RawDescriptor::from(d0), desc(0x9000, 14, 0)], 0)
        .unwrap();
    r.dev.process(Some(TX), &mut qs, &r.mem).unwrap();
    assert_eq!(
        r.wire.lock().unwrap().outbound,
        vec![b"ethernet frame".to_vec()]
    );
    assert_eq!(tx.used().idx().load(), 1);
    assert_eq!(
        (r.dev.counters().tx_frames, r.dev.counters().tx_bytes),
        (1, 14)
    );
}

#[test]
fn received_frames_get_a_header_and_the_thread_may_poll_again_when_drained() {
    let mut r = rig();
    let (rx, _tx, mut qs) = queues(&r.mem);
    r.wire
        .lock()
        .unwrap()
        .inbound
        .push_back(b"from the tap".to_vec());
    rx.add_desc_chains(&[desc(0x8000, 2048, W)], 0).unwrap();
    r.dev.process(None, &mut qs, &r.mem).unwrap();
    assert_eq!(rx.used().idx().load(), 1);
    assert_eq!(rx.used().ring().ref_at(0).unwrap().load().len(), 12 + 12);
    let mut got = [0u8; 24];
    r.mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[12..], b"from the tap");
    assert!(!r.dev.rx_blocked.load(Ordering::Acquire));
}

#[test]
fn without_rx_buffers_a_frame_waits_and_polling_stops_until_the_guest_posts_some() {
    let mut r = rig();
    let (rx, _tx, mut qs) = queues(&r.mem);
    r.wire.lock().unwrap().inbound.push_back(b"early".to_vec());
    r.dev.process(None, &mut qs, &r.mem).unwrap();
    assert!(r.dev.rx_blocked.load(Ordering::Acquire));
    rx.add_desc_chains(&[desc(0x8000, 2048, W)], 0).unwrap();
    r.dev.process(Some(RX), &mut qs, &r.mem).unwrap();
    assert_eq!(rx.used().idx().load(), 1);
    let mut got = [0u8; 5];
    r.mem
        .read_slice(&mut got, GuestAddress(0x8000 + 12))
        .unwrap();
    assert_eq!(&got, b"early");
    assert!(!r.dev.rx_blocked.load(Ordering::Acquire));
}

#[test]
fn bad_chains_drop_one_frame_and_nothing_else() {
    let mut r = rig();
    let (rx, tx, mut qs) = queues(&r.mem);
    // tx: shorter than the header; write-only; outside guest memory.
    tx.add_desc_chains(
        &[
            desc(0x8000, 4, 0),
            desc(0x8100, 64, W),
            desc(0x4000_0000, 64, 0),
        ],
        0,
    )
    .unwrap();
    // rx: too small for the frame; read-only; then a good one.
    r.wire
        .lock()
        .unwrap()
        .inbound
        .extend([vec![1u8; 100], vec![2u8; 100], vec![3u8; 100]]);
    rx.add_desc_chains(
        &[
            desc(0x9000, 50, W),
            desc(0xa000, 2048, 0),
            desc(0xb000, 2048, W),
        ],
        0,
    )
    .unwrap();
    r.dev.process(Some(TX), &mut qs, &r.mem).unwrap();
    assert!(r.wire.lock().unwrap().outbound.is_empty());
    assert_eq!(tx.used().idx().load(), 3);
    assert_eq!(rx.used().idx().load(), 3);
    assert_eq!(rx.used().ring().ref_at(0).unwrap().load().len(), 0);
    assert_eq!(rx.used().ring().ref_at(1).unwrap().load().len(), 0);
    assert_eq!(rx.used().ring().ref_at(2).unwrap().load().len(), 112);
    assert_eq!(r.dev.counters().dropped, 5);
    assert_eq!(r.dev.counters().rx_frames, 1);
}

#[test]
fn config_space_is_the_mac_and_link_up() {
    let r = rig();
    let d: &dyn VirtioDevice<GuestMemoryMmap> = &r.dev;
    let mut cfg = [0u8; 8];
    d.read_config(0, &mut cfg);
    assert_eq!(cfg, [2, 0, 0, 0, 0, 7, 1, 0]);
    assert_eq!(d.device_type(), 1);
    assert_ne!(d.features() & VIRTIO_NET_F_MAC, 0);
}
