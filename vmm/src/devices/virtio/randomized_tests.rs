//! Guest memory is untrusted: these tests fill rings, descriptors and registers with
//! pseudo-random garbage (a fixed-seed xorshift, so failures reproduce) and check that
//! the devices and the transport neither panic nor stop serving. They stand in for
//! `cargo fuzz` targets, which need a nightly toolchain this project does not assume.

use std::sync::{Arc, Mutex};

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::rng::{EntropySource, Rng};
use super::vsock::unix::Muxer;
use super::vsock::Vsock;
use super::{IrqTrigger, VirtioDevice};
use crate::devices::bus::BusDevice;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

struct Zeros;
impl EntropySource for Zeros {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
}

const ROUNDS: u32 = 3000;

/// Garbage in the first 16 KiB (where the rings are) and pointers into and around RAM;
/// the available index of the rings at `avail_idx_addrs` is mostly small, so chains are
/// actually walked rather than refused at the index check.
fn scramble(mem: &GuestMemoryMmap, rng: &mut XorShift, avail_idx_addrs: &[u64]) {
    let mut junk = vec![0u8; 0x4000];
    rng.fill(&mut junk);
    // Descriptor addresses: mostly inside the 1 MiB of RAM, sometimes far outside.
    for d in junk[..0x1000].chunks_mut(16) {
        let addr = match rng.next() % 4 {
            0 => rng.next(),
            _ => rng.next() % 0x10_0000,
        };
        d[..8].copy_from_slice(&addr.to_le_bytes());
    }
    mem.write_slice(&junk, GuestAddress(0)).unwrap();
    for a in avail_idx_addrs {
        if rng.next() % 8 != 0 {
            let idx = u16::try_from(rng.next() % 17).unwrap();
            mem.write_obj(idx, GuestAddress(*a)).unwrap();
        }
    }
}

#[test]
fn rng_survives_garbage_rings() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mut r = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut dev = Rng::new(Zeros);
    for _ in 0..ROUNDS {
        let mq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut q: Queue = mq.create_queue().unwrap();
        scramble(&mem, &mut r, &[mq.avail_addr().0 + 2]);
        let _ = VirtioDevice::<GuestMemoryMmap>::process(
            &mut dev,
            Some(0),
            std::slice::from_mut(&mut q),
            &mem,
        );
    }
    let c = dev.counters();
    assert!(
        c.requests > ROUNDS as u64 && c.bytes > 0 && c.bad_descriptors > 0,
        "garbage was not exercised: {c:?}"
    );
}

/// Half the vsock rounds get one well-formed tx packet with random fields (mostly the
/// right CIDs, any op, small ports) and valid rx buffers, so the muxer's paths run too.
fn plausible_vsock_round(
    mem: &GuestMemoryMmap,
    r: &mut XorShift,
    rx: &MockSplitQueue<GuestMemoryMmap>,
    tx: &MockSplitQueue<GuestMemoryMmap>,
) {
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    let mut hdr = [0u8; 44];
    r.fill(&mut hdr);
    let (src_cid, dst_cid) = if r.next() % 4 == 0 {
        (r.next() % 5, r.next() % 5)
    } else {
        (3, 2)
    };
    let len = u32::try_from(r.next() % 64).unwrap();
    hdr[0..8].copy_from_slice(&src_cid.to_le_bytes());
    hdr[8..16].copy_from_slice(&dst_cid.to_le_bytes());
    hdr[16..20].copy_from_slice(&u32::try_from(r.next() % 4).unwrap().to_le_bytes());
    hdr[20..24].copy_from_slice(&u32::try_from(r.next() % 4).unwrap().to_le_bytes());
    hdr[24..28].copy_from_slice(&len.to_le_bytes());
    hdr[28..30].copy_from_slice(&1u16.to_le_bytes());
    hdr[30..32].copy_from_slice(&u16::try_from(r.next() % 9).unwrap().to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(0x8000)).unwrap();
    let to_raw = |addr, len, flags| RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0));
    tx.add_desc_chains(&[to_raw(0x8000, 44 + len, 0)], 0)
        .unwrap();
    rx.add_desc_chains(&[to_raw(0x9000, 0x1000, 2), to_raw(0xa000, 0x1000, 2)], 0)
        .unwrap();
}

#[test]
fn vsock_survives_garbage_rings() {
    /// Removes the directory even when the test fails.
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(std::env::temp_dir().join(format!("husk-vsock-rand-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let dir = &dir.0;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let muxer = Arc::new(Mutex::new(Muxer::new(3, &dir.join("v.sock")).unwrap()));
    let mut dev = Vsock::new(3, muxer);
    let mut r = XorShift(0x2545_f491_4f6c_dd1d);
    for _ in 0..ROUNDS {
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let ev = MockSplitQueue::create(&mem, GuestAddress(0x2000), 16);
        let mut qs: Vec<Queue> = vec![
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
            ev.create_queue().unwrap(),
        ];
        scramble(
            &mem,
            &mut r,
            &[rx.avail_addr().0 + 2, tx.avail_addr().0 + 2],
        );
        if r.next() % 2 == 0 {
            plausible_vsock_round(&mem, &mut r, &rx, &tx);
        }
        let _ = dev.process(Some(1), &mut qs, &mem);
    }
    let c = dev.counters();
    assert!(
        c.tx_packets > 0 && c.rx_packets > 0 && c.bad_descriptors > 0,
        "garbage was not exercised: {c:?}"
    );
}

#[test]
fn transport_survives_random_register_traffic() {
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(Box::new(Rng::new(Zeros)), mem.clone(), irq);
    let mut r = XorShift(0xdead_beef_cafe_f00d);
    let mut junk = vec![0u8; 0x4000];
    r.fill(&mut junk);
    mem.write_slice(&junk, GuestAddress(0)).unwrap();
    for _ in 0..ROUNDS * 20 {
        // Mostly real registers with plausible values, sometimes anything.
        let offset = match r.next() % 8 {
            0 => r.next() % 0x1000,
            _ => (r.next() % 0x40) * 4,
        };
        let len = [1usize, 2, 4, 8][usize::try_from(r.next() % 4).unwrap()];
        let mut data = vec![0u8; len];
        if r.next() % 2 == 0 {
            let v = match r.next() % 3 {
                0 => r.next() % 16,
                1 => r.next() % 0x1000,
                _ => r.next(),
            };
            data.copy_from_slice(&v.to_le_bytes()[..len]);
            t.write(offset, &data);
        } else {
            t.read(offset, &mut data);
        }
    }
    // Whatever state it reached, a reset brings it back.
    t.write(0x70, &0u32.to_le_bytes());
    let mut status = [0xffu8; 4];
    t.read(0x70, &mut status);
    assert_eq!(status, [0; 4]);
    let mut ready = [0xffu8; 4];
    t.read(0x44, &mut ready);
    assert_eq!(ready, [0; 4]);
}
