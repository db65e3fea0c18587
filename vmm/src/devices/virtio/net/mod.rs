//! virtio-net on a tap device: `tap.rs` opens the tap, `device.rs` moves frames between
//! the queues and the tap, `event_handler.rs` wakes the device when the tap has frames.
//! No offloads: every frame crosses as-is behind a zeroed virtio-net header.

pub mod device;
pub(crate) mod event_handler;
pub mod tap;

pub use device::{Net, NetCounters};
pub use tap::{parse_mac, FrameIo, Tap, TapError};
