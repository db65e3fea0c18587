//! The virtio-net device: queue 0 receives (tap → guest), queue 1 transmits (guest →
//! tap). The config space is the MAC and a link-up status. Frames that do not fit, chains
//! that are malformed, and tap errors drop that one frame and are counted.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::tap::FrameIo;
use crate::devices::virtio::{QueueError, VirtioDevice, VIRTIO_F_VERSION_1};

/// virtio device id of a network card.
pub(crate) const NET_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Queue size.
pub(crate) const NET_QUEUE_SIZE: u16 = 256;
const VIRTIO_NET_F_MAC: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
/// `struct virtio_net_hdr_v1`: what precedes every frame with VERSION_1.
pub(crate) const VNET_HDR_LEN: usize = 12;
/// Largest frame: 64 KiB of payload plus an Ethernet header (no GSO offered).
pub(crate) const MAX_FRAME: usize = 65_550;
const RX: usize = 0;
const TX: usize = 1;

/// Device counters, for the control API.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames dropped (too big for the buffer, tap refused, malformed chain).
    pub dropped: u64,
}

/// The virtio-net device.
pub struct Net<T: FrameIo> {
    io: T,
    mac: [u8; 6],
    pending: Option<Vec<u8>>,
    rx_blocked: Arc<AtomicBool>,
    kick: EventFd,
    counters: NetCounters,
}

impl<T: FrameIo> std::fmt::Debug for Net<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .field("counters", &self.counters)
            .finish()
    }
}

impl<T: FrameIo> Net<T> {
    /// A NIC with address `mac` on `io`.
    pub fn new(io: T, mac: [u8; 6]) -> io::Result<Self> {
        Ok(Self {
            io,
            mac,
            pending: None,
            rx_blocked: Arc::new(AtomicBool::new(true)),
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            counters: NetCounters::default(),
        })
    }

    /// What the event thread needs: the frame fd, the "don't poll the tap" flag, the kick.
    pub(crate) fn event_parts(
        &self,
    ) -> io::Result<(Option<std::os::fd::RawFd>, Arc<AtomicBool>, EventFd)> {
        Ok((
            self.io.poll_fd(),
            self.rx_blocked.clone(),
            self.kick.try_clone()?,
        ))
    }

    /// Counters so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    fn unblock_rx(&self) {
        self.rx_blocked.store(false, Ordering::Release);
        // The event thread may be waiting for exactly this.
        let _ = self.kick.write(1);
    }

    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let frame = chain.reader(mem).ok().and_then(|mut r| {
                let n = r.available_bytes();
                if !(VNET_HDR_LEN..=VNET_HDR_LEN + MAX_FRAME).contains(&n) {
                    return None;
                }
                let mut buf = vec![0u8; n];
                io::Read::read_exact(&mut r, &mut buf).ok()?;
                Some(buf)
            });
            match frame {
                Some(buf) if self.io.write_frame(&buf[VNET_HDR_LEN..]).is_ok() => {
                    self.counters.tx_frames += 1;
                    self.counters.tx_bytes += (buf.len() - VNET_HDR_LEN) as u64;
                }
                _ => self.counters.dropped += 1,
            }
            queue.add_used(mem, head, 0)?;
            used = true;
        }
        Ok(used)
    }

    fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => {
                    let mut buf = vec![0u8; MAX_FRAME];
                    match self.io.read_frame(&mut buf) {
                        Ok(n) => {
                            buf.truncate(n);
                            buf
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        // Drained (or the tap failed): the event thread may poll again.
                        Err(_) => {
                            self.unblock_rx();
                            return Ok(used);
                        }
                    }
                }
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // No buffers: keep the frame, stop polling until the guest posts some.
                self.pending = Some(frame);
                self.rx_blocked.store(true, Ordering::Release);
                return Ok(used);
            };
            let head = chain.head_index();
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            let written = chain.writer(mem).ok().and_then(|mut w| {
                if w.available_bytes() < VNET_HDR_LEN + frame.len() {
                    return None;
                }
                io::Write::write_all(&mut w, &hdr).ok()?;
                io::Write::write_all(&mut w, &frame).ok()?;
                Some(VNET_HDR_LEN + frame.len())
            });
            let len = match written {
                Some(n) => {
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += frame.len() as u64;
                    u32::try_from(n).expect("bounded by MAX_FRAME")
                }
                None => {
                    self.counters.dropped += 1;
                    0
                }
            };
            queue.add_used(mem, head, len)?;
            used = true;
        }
    }
}

impl<T: FrameIo> VirtioDevice<GuestMemoryMmap> for Net<T> {
    fn device_type(&self) -> u32 {
        NET_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[NET_QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    /// `struct virtio_net_config`: mac[6], status (1 = link up).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&1u16.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| cfg.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, _acked_features: u64) {
        self.unblock_rx();
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
        if queues[RX].ready() && self.process_rx(&mut queues[RX], mem)? {
            irq |= queues[RX].needs_notification(mem)?;
        }
        Ok(irq)
    }

    fn reset(&mut self) {
        self.pending = None;
        self.rx_blocked.store(true, Ordering::Release);
    }

    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("tx_frames", c.tx_frames),
            ("tx_bytes", c.tx_bytes),
            ("rx_frames", c.rx_frames),
            ("rx_bytes", c.rx_bytes),
            ("dropped", c.dropped),
        ]
    }
}

#[cfg(test)]
mod tests;
