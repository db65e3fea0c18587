//! virtio-vsock, hybrid: the guest's AF_VSOCK stream sockets meet host unix sockets
//! (the Firecracker / Cloud Hypervisor convention). `csm` holds one connection's state and
//! credit, `unix` the host-side muxer, `device` the virtio device that moves packets
//! between the queues and the muxer, `event_handler` the thread that wakes the device
//! when a host socket is ready.

pub(crate) mod csm;
pub mod device;
pub(crate) mod event_handler;
pub mod packet;
pub mod unix;

pub use device::Vsock;
