//! The virtio-rng queue logic, over any guest memory: every chain on the request queue is
//! filled (write-only descriptors only) and returned with the number of bytes written.
//!
//! A bad chain — a read-only descriptor, an address outside guest memory, a loop — ends
//! that request with what was written so far; it never panics and never writes outside
//! guest memory (vm-memory checks every access).
//!
//! The entropy source and the counters live here, beside the logic that uses them; the
//! device (`device.rs`) depends on this module, never the other way.

use std::fs::File;
use std::io::{self, Read};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemory};

use crate::devices::virtio::QueueError;

/// Where random bytes come from.
pub trait EntropySource: Send {
    /// Fills `buf` completely.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()>;
}

impl EntropySource for File {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.read_exact(buf)
    }
}

/// What the device has done, for the control API.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RngCounters {
    /// Requests served (chains returned to the driver).
    pub requests: u64,
    /// Random bytes written into guest memory.
    pub bytes: u64,
    /// Descriptors refused: read-only, or outside guest memory.
    pub bad_descriptors: u64,
    /// Times the entropy source failed.
    pub source_errors: u64,
}

/// Most bytes handed out per request: a guest asking for a 1 GiB buffer gets this much
/// (the driver accepts short fills) rather than stalling its vCPU.
pub(crate) const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// Fills one chain; returns the bytes written. Stops at the first bad descriptor.
fn fill_chain<M: GuestMemory, S: EntropySource + ?Sized>(
    chain: virtio_queue::DescriptorChain<&M>,
    mem: &M,
    src: &mut S,
    counters: &mut RngCounters,
) -> u32 {
    let mut written: u32 = 0;
    let mut buf = [0u8; 4096];
    for desc in chain {
        if !desc.is_write_only() {
            counters.bad_descriptors += 1;
            break;
        }
        let mut addr = desc.addr();
        let mut left = desc.len().min(MAX_BYTES_PER_REQUEST - written);
        while left > 0 {
            let n = left.min(4096) as usize;
            if src.fill(&mut buf[..n]).is_err() {
                counters.source_errors += 1;
                return written;
            }
            if mem.write_slice(&buf[..n], addr).is_err() {
                counters.bad_descriptors += 1;
                return written;
            }
            let n32 = u32::try_from(n).expect("at most 4096");
            written += n32;
            left -= n32;
            addr = match addr.checked_add(u64::from(n32)) {
                Some(a) => a,
                None => {
                    counters.bad_descriptors += 1;
                    return written;
                }
            };
        }
        if written >= MAX_BYTES_PER_REQUEST {
            break;
        }
    }
    written
}

/// Serves every available request on `queue`; returns whether the driver must be
/// interrupted.
pub(crate) fn process_requests<M: GuestMemory, S: EntropySource + ?Sized>(
    queue: &mut Queue,
    mem: &M,
    src: &mut S,
    counters: &mut RngCounters,
) -> Result<bool, QueueError> {
    let mut used_any = false;
    loop {
        // Collect the heads first: the iterator borrows the queue, add_used needs it too.
        let mut done = Vec::new();
        for chain in queue.iter(mem)? {
            let head = chain.head_index();
            let len = fill_chain(chain, mem, src, counters);
            counters.requests += 1;
            counters.bytes += u64::from(len);
            done.push((head, len));
        }
        for (head, len) in &done {
            queue.add_used(mem, *head, *len)?;
            used_any = true;
        }
        // With EVENT_IDX this re-arms notifications and tells whether more arrived.
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    Ok(used_any && queue.needs_notification(mem)?)
}
