//! The vsock device over mock queues: packets move between guest memory and the muxer,
//! and malformed chains are returned empty without harm.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::vsock::packet::{op, HOST_CID, TYPE_STREAM};

const GUEST_CID: u64 = 3;
#[allow(clippy::cast_possible_truncation)] // a 16-bit descriptor flag
const W: u16 = VRING_DESC_F_WRITE as u16;

struct Rig {
    dir: PathBuf,
    mem: GuestMemoryMmap,
    dev: Vsock,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rig(tag: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("husk-vsockdev-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let muxer = Muxer::new(GUEST_CID, &dir.join("v.sock")).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    Rig {
        dir,
        mem,
        dev: Vsock::new(GUEST_CID, Arc::new(Mutex::new(muxer))),
    }
}

fn header(src_port: u32, dst_port: u32, op: u16, len: u32) -> [u8; 44] {
    let mut h = [0u8; 44];
    h[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
    h[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&len.to_le_bytes());
    h[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
    h[30..32].copy_from_slice(&op.to_le_bytes());
    h[36..40].copy_from_slice(&65536u32.to_le_bytes());
    h
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn u16_at(mem: &GuestMemoryMmap, a: u64) -> u16 {
    mem.read_obj(GuestAddress(a)).unwrap()
}

fn u32_at(mem: &GuestMemoryMmap, a: u64) -> u32 {
    mem.read_obj(GuestAddress(a)).unwrap()
}

#[test]
fn guest_connects_sends_data_and_gets_a_reply() {
    let mut r = rig("flow");
    let listener = UnixListener::bind(r.dir.join("v.sock_5000")).unwrap();
    let rxq = MockSplitQueue::create(&r.mem, GuestAddress(0x0), 16);
    let txq = MockSplitQueue::create(&r.mem, GuestAddress(0x1000), 16);
    let evq = MockSplitQueue::create(&r.mem, GuestAddress(0x2000), 16);
    let mut queues: Vec<Queue> = vec![
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        evq.create_queue().unwrap(),
    ];
    // Two rx buffers, header + 4 KiB each.
    rxq.add_desc_chains(
        &[desc(0x40000, 44 + 4096, W), desc(0x42000, 44 + 4096, W)],
        0,
    )
    .unwrap();

    // REQUEST from guest port 40000 to host port 5000.
    r.mem
        .write_slice(&header(40000, 5000, op::REQUEST, 0), GuestAddress(0x30000))
        .unwrap();
    txq.add_desc_chains(&[desc(0x30000, 44, 0)], 0).unwrap();
    assert!(
        r.dev.process(Some(TX), &mut queues, &r.mem).unwrap(),
        "the guest must be interrupted"
    );
    assert_eq!(txq.used().idx().load(), 1);
    assert_eq!(rxq.used().idx().load(), 1);
    assert_eq!(u16_at(&r.mem, 0x40000 + 30), op::RESPONSE);
    assert_eq!(u32_at(&r.mem, 0x40000 + 16), 5000, "src_port");
    assert_eq!(u32_at(&r.mem, 0x40000 + 20), 40000, "dst_port");
    let (mut server, _) = listener.accept().unwrap();

    // RW "hi" from the guest, header and data in one buffer.
    r.mem
        .write_slice(&header(40000, 5000, op::RW, 2), GuestAddress(0x31000))
        .unwrap();
    r.mem
        .write_slice(b"hi", GuestAddress(0x31000 + 44))
        .unwrap();
    txq.add_desc_chains(&[desc(0x31000, 46, 0)], 1).unwrap();
    r.dev.process(Some(TX), &mut queues, &r.mem).unwrap();
    let mut buf = [0u8; 2];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");

    // The host answers; the device (as its event thread would) delivers it.
    server.write_all(b"hello guest").unwrap();
    let start = std::time::Instant::now();
    while rxq.used().idx().load() < 2 {
        r.dev.process(None, &mut queues, &r.mem).unwrap();
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }
    assert_eq!(u16_at(&r.mem, 0x42000 + 30), op::RW);
    assert_eq!(u32_at(&r.mem, 0x42000 + 24), 11);
    let mut got = [0u8; 11];
    r.mem
        .read_slice(&mut got, GuestAddress(0x42000 + 44))
        .unwrap();
    assert_eq!(&got, b"hello guest");
    assert_eq!(rxq.used().ring().ref_at(1).unwrap().load().len(), 44 + 11);
    let c = r.dev.counters();
    assert_eq!((c.tx_packets, c.rx_packets, c.bad_descriptors), (2, 2, 0));
}

#[test]
fn malformed_tx_chains_are_returned_empty() {
    let mut r = rig("bad");
    let rxq = MockSplitQueue::create(&r.mem, GuestAddress(0x0), 16);
    let txq = MockSplitQueue::create(&r.mem, GuestAddress(0x1000), 16);
    let evq = MockSplitQueue::create(&r.mem, GuestAddress(0x2000), 16);
    let mut queues: Vec<Queue> = vec![
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        evq.create_queue().unwrap(),
    ];
    // Write-only tx buffer; header shorter than 44 bytes; header outside guest memory;
    // a length field far beyond the buffer.
    r.mem
        .write_slice(&header(1, 2, op::RW, 60000), GuestAddress(0x33000))
        .unwrap();
    txq.add_desc_chains(
        &[
            desc(0x30000, 44, W),
            desc(0x31000, 20, 0),
            desc(0x4000_0000, 44, 0),
            desc(0x33000, 44, 0),
        ],
        0,
    )
    .unwrap();
    r.dev.process(Some(TX), &mut queues, &r.mem).unwrap();
    assert_eq!(txq.used().idx().load(), 4, "every chain is returned");
    assert_eq!(r.dev.counters().bad_descriptors, 4);
    assert_eq!(r.dev.counters().tx_packets, 0);
}

#[test]
fn read_only_rx_buffers_are_returned_empty() {
    let mut r = rig("badrx");
    let rxq = MockSplitQueue::create(&r.mem, GuestAddress(0x0), 16);
    let txq = MockSplitQueue::create(&r.mem, GuestAddress(0x1000), 16);
    let evq = MockSplitQueue::create(&r.mem, GuestAddress(0x2000), 16);
    let mut queues: Vec<Queue> = vec![
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        evq.create_queue().unwrap(),
    ];
    rxq.add_desc_chains(&[desc(0x40000, 4096, 0), desc(0x42000, 4096, W)], 0)
        .unwrap();
    // A REQUEST to a port nobody serves: the RST needs an rx buffer.
    r.mem
        .write_slice(&header(40000, 6000, op::REQUEST, 0), GuestAddress(0x30000))
        .unwrap();
    txq.add_desc_chains(&[desc(0x30000, 44, 0)], 0).unwrap();
    r.dev.process(Some(TX), &mut queues, &r.mem).unwrap();
    assert_eq!(rxq.used().idx().load(), 2);
    assert_eq!(
        rxq.used().ring().ref_at(0).unwrap().load().len(),
        0,
        "read-only buffer refused"
    );
    assert_eq!(u16_at(&r.mem, 0x42000 + 30), op::RST);
    assert_eq!(r.dev.counters().bad_descriptors, 1);
}

#[test]
fn config_space_is_the_guest_cid() {
    let r = rig("cfg");
    let d: &dyn VirtioDevice<GuestMemoryMmap> = &r.dev;
    let mut b = [0u8; 8];
    d.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), GUEST_CID);
    let mut hi = [0xffu8; 4];
    d.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    let mut past = [0xffu8; 4];
    d.read_config(100, &mut past);
    assert_eq!(past, [0; 4]);
    assert_eq!(d.device_type(), 19);
    assert_eq!(d.queue_max_sizes().len(), 3);
}
