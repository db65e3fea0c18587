//! What the fuzz targets share: a byte reader over the fuzzer's input, guest memory with a
//! hole (two regions, so chains that cross or fall into the gap are tried), and queues the
//! way a driver would set them up, with every address and size taken from the input.
//!
//! The input is read front to back; when it runs out every read yields zeros, so any input
//! is a valid program.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: 64 KiB at 0 and 64 KiB at 0x20000, a hole between.
pub const REGIONS: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];

/// Reads the fuzzer's bytes.
#[derive(Debug)]
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let s = self.bytes(2);
        b[..s.len()].copy_from_slice(s);
        u16::from_le_bytes(b)
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let s = self.bytes(8);
        b[..s.len()].copy_from_slice(s);
        u64::from_le_bytes(b)
    }
}

/// Fresh, zeroed guest memory.
pub fn memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|(a, s)| (GuestAddress(*a), *s)).collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

/// One write of guest memory from the input: offset (u16, in the first region), length
/// (u16), bytes. This is how the "driver" fills rings, descriptors and buffers.
pub fn poke(inp: &mut Input<'_>, mem: &GuestMemoryMmap) {
    let off = u64::from(inp.u16());
    let len = usize::from(inp.u16());
    let bytes = inp.bytes(len).to_vec();
    // Writes past the end of the region are cut short by vm-memory: fine, that is input too.
    let _ = mem.write_slice(&bytes, GuestAddress(off));
}

/// A queue set up as a driver would (size, three ring addresses in the first region,
/// EVENT_IDX on or off), or `None` when the transport would refuse it (`is_valid`).
pub fn queue(inp: &mut Input<'_>, mem: &GuestMemoryMmap, max_size: u16) -> Option<Queue> {
    let mut q = Queue::new(max_size).ok()?;
    let sel = inp.u8();
    let size = 1u16 << (u32::from(sel & 0x0f) % (max_size.trailing_zeros() + 1));
    q.set_size(size);
    q.set_desc_table_address(Some(u32::from(inp.u16())), Some(0));
    q.set_avail_ring_address(Some(u32::from(inp.u16())), Some(0));
    q.set_used_ring_address(Some(u32::from(inp.u16())), Some(0));
    q.set_event_idx(sel & 0x80 != 0);
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}
