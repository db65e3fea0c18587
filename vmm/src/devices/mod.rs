//! Devices: the bus that dispatches exits, legacy PC devices, virtio.

pub mod bus;
pub mod legacy;
pub mod thread;
pub mod virtio;
