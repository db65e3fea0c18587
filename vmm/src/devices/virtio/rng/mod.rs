//! virtio-rng (virtio-entropy): fills the buffers the driver offers with bytes from the
//! host's entropy source.

pub mod device;
pub mod handler;

pub use device::Rng;
pub use handler::{EntropySource, RngCounters};
