//! The vhost-user-fs device: config space (tag, one request queue), feature negotiation
//! with the backend, and at DRIVER_OK the memory table and the vrings handed over.

use std::path::{Path, PathBuf};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::{QueueError, VirtioDevice, VIRTIO_F_VERSION_1};

/// virtio device id of virtio-fs.
pub(crate) const FS_DEVICE_TYPE: u32 = 26;
/// Queue size of each queue.
pub(crate) const FS_QUEUE_SIZE: u16 = 1024;
/// hiprio + one request queue.
const NUM_QUEUES: usize = 2;
/// Longest tag the config space holds.
pub(crate) const FS_TAG_LEN: usize = 36;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Errors while setting up virtio-fs.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag does not fit.
    #[error("virtio-fs tag {0:?}: must be 1 to {FS_TAG_LEN} bytes — give another --fs-tag")]
    BadTag(String),
    /// The backend socket does not answer.
    #[error("virtio-fs socket {path}: {source} — start virtiofsd with --socket-path={path} first")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The vhost-user error.
        #[source]
        source: vhost::Error,
    },
    /// The backend refused the handshake.
    #[error("virtio-fs backend at {path}: {what}: {source}")]
    Handshake {
        /// The socket.
        path: PathBuf,
        /// Which step.
        what: &'static str,
        /// The vhost-user error.
        #[source]
        source: vhost::Error,
    },
    /// An eventfd could not be created.
    #[error("virtio-fs eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// The vhost-user-fs frontend device.
pub struct VhostUserFs {
    frontend: Frontend,
    path: PathBuf,
    tag: String,
    backend_features: u64,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    activated: bool,
}

impl std::fmt::Debug for VhostUserFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFs")
            .field("path", &self.path)
            .field("tag", &self.tag)
            .finish()
    }
}

impl VhostUserFs {
    /// Connects to the backend at `path` and takes ownership of it.
    pub fn connect(path: &Path, tag: &str) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > FS_TAG_LEN {
            return Err(FsError::BadTag(tag.to_owned()));
        }
        let frontend =
            Frontend::connect(path, NUM_QUEUES as u64).map_err(|source| FsError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let hs = |what| {
            move |source| FsError::Handshake {
                path: path.to_owned(),
                what,
                source,
            }
        };
        frontend.set_owner().map_err(hs("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(hs("GET_FEATURES"))?;
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for _ in 0..NUM_QUEUES {
            kicks.push(EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::EventFd)?);
            calls.push(EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::EventFd)?);
        }
        Ok(Self {
            frontend,
            path: path.to_owned(),
            tag: tag.to_owned(),
            backend_features,
            kicks,
            calls,
            activated: false,
        })
    }

    /// Clones of the call eventfds (the backend signals used buffers on them).
    pub(crate) fn call_fds(&self) -> std::io::Result<Vec<EventFd>> {
        self.calls.iter().map(EventFd::try_clone).collect()
    }

    fn hva(mem: &GuestMemoryMmap, gpa: u64) -> Option<u64> {
        mem.get_host_address(GuestAddress(gpa))
            .ok()
            .map(|p| p as u64)
    }

    fn start_backend(
        &mut self,
        acked: u64,
        queues: &[Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), vhost::Error> {
        let protocol = self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        let mut features = acked;
        if protocol {
            features |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        self.frontend.set_features(features)?;
        if protocol {
            let offered = self.frontend.get_protocol_features()?;
            // Nothing optional is needed; REPLY_ACK, if offered, makes errors visible sooner.
            self.frontend
                .set_protocol_features(offered & VhostUserProtocolFeatures::REPLY_ACK)?;
        }
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<_, _>>()?;
        self.frontend.set_mem_table(&regions)?;
        for (i, q) in queues.iter().enumerate().filter(|(_, q)| q.ready()) {
            let addr = |gpa| Self::hva(mem, gpa).ok_or(vhost::Error::InvalidGuestMemory);
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: addr(q.desc_table())?,
                used_ring_addr: addr(q.used_ring())?,
                avail_ring_addr: addr(q.avail_ring())?,
                log_addr: None,
            };
            self.frontend.set_vring_num(i, q.size())?;
            self.frontend.set_vring_addr(i, &cfg)?;
            self.frontend.set_vring_base(i, 0)?;
            self.frontend.set_vring_call(i, &self.calls[i])?;
            self.frontend.set_vring_kick(i, &self.kicks[i])?;
            if protocol {
                self.frontend.set_vring_enable(i, true)?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice<GuestMemoryMmap> for VhostUserFs {
    fn device_type(&self) -> u32 {
        FS_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[FS_QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        (self.backend_features & !VHOST_USER_F_PROTOCOL_FEATURES) | VIRTIO_F_VERSION_1
    }

    /// `struct virtio_fs_config`: tag[36], num_request_queues (1).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; FS_TAG_LEN + 4];
        cfg[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        cfg[FS_TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| cfg.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate_queues(&mut self, acked: u64, queues: &[Queue], mem: &GuestMemoryMmap) -> bool {
        // A second activation would need the backend reset first; refuse it instead.
        if self.activated {
            return false;
        }
        self.activated = self.start_backend(acked, queues, mem).is_ok();
        self.activated
    }

    fn process(
        &mut self,
        notified: Option<usize>,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        if let Some(kick) = notified.and_then(|i| self.kicks.get(i)) {
            // The backend watches this eventfd; a full counter still wakes it.
            let _ = kick.write(1);
        }
        Ok(false)
    }

    fn name(&self) -> &'static str {
        "virtio-fs"
    }
}
