//! The virtio-vsock device: queue 0 carries packets to the guest (rx), queue 1 packets
//! from it (tx), queue 2 events (unused: no live migration). Packets are parsed and built
//! with virtio-vsock's `VsockPacket`, which checks every descriptor against guest memory;
//! a malformed chain is returned empty and counted, never trusted.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::packet::Pkt;
use super::unix::Muxer;
use crate::devices::virtio::{QueueError, VirtioDevice, VIRTIO_F_VERSION_1};

/// virtio device id of vsock.
pub(crate) const VSOCK_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// Queue size of each queue.
pub(crate) const VSOCK_QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Largest payload accepted from the guest per packet.
const MAX_PKT_DATA: u32 = 64 * 1024;

/// Device counters, for the control API.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockCounters {
    /// Packets taken from the tx queue.
    pub tx_packets: u64,
    /// Packets written to the rx queue.
    pub rx_packets: u64,
    /// Chains refused as malformed.
    pub bad_descriptors: u64,
}

/// The vsock device.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    muxer: Arc<Mutex<Muxer>>,
    counters: VsockCounters,
}

impl Vsock {
    /// A device for guest `cid` backed by `muxer`.
    pub fn new(cid: u64, muxer: Arc<Mutex<Muxer>>) -> Self {
        Self {
            cid,
            muxer,
            counters: VsockCounters::default(),
        }
    }

    /// The muxer (shared with the event thread).
    pub fn muxer(&self) -> Arc<Mutex<Muxer>> {
        self.muxer.clone()
    }

    /// Counters so far.
    pub fn counters(&self) -> VsockCounters {
        self.counters
    }

    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(vp) => {
                    let mut data = vec![0u8; vp.len() as usize];
                    let copied = match vp.data_slice() {
                        Some(s) if !data.is_empty() => s.read_slice(&mut data, 0).is_ok(),
                        _ => data.is_empty(),
                    };
                    if copied {
                        let pkt = Pkt {
                            src_cid: vp.src_cid(),
                            dst_cid: vp.dst_cid(),
                            src_port: vp.src_port(),
                            dst_port: vp.dst_port(),
                            type_: vp.type_(),
                            op: vp.op(),
                            flags: vp.flags(),
                            buf_alloc: vp.buf_alloc(),
                            fwd_cnt: vp.fwd_cnt(),
                            data,
                        };
                        self.counters.tx_packets += 1;
                        self.muxer.lock().expect("muxer lock").send_pkt(&pkt);
                    } else {
                        self.counters.bad_descriptors += 1;
                    }
                }
                Err(_) => self.counters.bad_descriptors += 1,
            }
            queue.add_used(mem, head, 0)?;
            used = true;
        }
        Ok(used)
    }

    fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used = false;
        let mut muxer = self.muxer.lock().expect("muxer lock");
        while muxer.has_pending_rx() {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut vp) => {
                    let room = vp
                        .data_slice()
                        .map_or(0, |s| u32::try_from(s.len()).unwrap_or(u32::MAX));
                    let Some(pkt) = muxer.recv_pkt(room) else {
                        // Nothing after all (e.g. the stream would block): give the buffer back.
                        queue.go_to_previous_position();
                        break;
                    };
                    let data_len = u32::try_from(pkt.data.len()).expect("bounded by room");
                    vp.set_src_cid(pkt.src_cid)
                        .set_dst_cid(pkt.dst_cid)
                        .set_src_port(pkt.src_port)
                        .set_dst_port(pkt.dst_port)
                        .set_type(pkt.type_)
                        .set_op(pkt.op)
                        .set_flags(pkt.flags)
                        .set_buf_alloc(pkt.buf_alloc)
                        .set_fwd_cnt(pkt.fwd_cnt)
                        .set_len(data_len);
                    if let (Some(s), false) = (vp.data_slice(), pkt.data.is_empty()) {
                        // In range: recv_pkt was bounded by this slice's length.
                        let _ = s.write_slice(&pkt.data, 0);
                    }
                    self.counters.rx_packets += 1;
                    u32::try_from(PKT_HEADER_SIZE).expect("44") + data_len
                }
                Err(_) => {
                    self.counters.bad_descriptors += 1;
                    0
                }
            };
            queue.add_used(mem, head, len)?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice<GuestMemoryMmap> for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[VSOCK_QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// The config space is the guest's CID, a little-endian u64.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cid = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| cid.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn process(
        &mut self,
        _notified: Option<usize>,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        let mut irq = false;
        if queues[TX].ready() && self.process_tx(&mut queues[TX], mem)? {
            irq |= queues[TX].needs_notification(mem)?;
        }
        self.muxer.lock().expect("muxer lock").poll_host();
        if queues[RX].ready() && self.process_rx(&mut queues[RX], mem)? {
            irq |= queues[RX].needs_notification(mem)?;
        }
        Ok(irq)
    }

    fn name(&self) -> &'static str {
        "virtio-vsock"
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        let m = self.muxer.lock().expect("muxer lock").counters();
        vec![
            ("tx_packets", c.tx_packets),
            ("rx_packets", c.rx_packets),
            ("bad_descriptors", c.bad_descriptors),
            ("connections", m.connections),
            ("resets_sent", m.resets_sent),
            ("bytes_to_host", m.bytes_to_host),
            ("bytes_to_guest", m.bytes_to_guest),
        ]
    }
}

#[cfg(test)]
mod tests;
