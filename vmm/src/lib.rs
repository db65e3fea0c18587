//! `husk-vmm`: husk's own KVM microVM monitor.
//!
//! Owns the KVM VM and its vCPU threads, guest memory (a shared memfd, so vhost-user
//! backends can map it), Linux boot (PVH or the 64-bit boot protocol), the serial console,
//! reset/shutdown, the virtio-mmio transport and its devices.
//!
//! It must never trust the guest: every address, length and index read from guest memory
//! or an MMIO register is validated, and a bad one fails that request, never the VMM.

pub mod api;
pub(crate) mod arch;
pub(crate) mod boot;
pub mod broker;
pub(crate) mod builder;
pub mod config;
#[cfg(debug_assertions)]
pub mod debug_hooks;
pub(crate) mod device_manager;
pub mod devices;
pub mod exit;
pub mod seccomp;
pub(crate) mod vstate;

pub use builder::{BuildError, Confinement, Vmm};
pub use config::MachineConfig;
pub use exit::ExitReason;
