//! virtio-fs as a vhost-user frontend: the queues are served by an external backend
//! (virtiofsd) that maps guest RAM through the memfd; husk-vmm only negotiates, forwards
//! the driver's notifications (kick eventfds) and turns the backend's call eventfds into
//! interrupts.

pub mod device;
pub(crate) mod event_handler;

pub use device::{FsError, VhostUserFs};
