//! husk-agent's code as a library, so that what does not need a guest can be driven without
//! one: the binary (`main.rs`) is the guest's PID 1 and the container helper; the fuzz targets
//! (`agent/fuzz/`) and the spec mutation run (`tests/tests/spec_mutations.rs`) call the pure
//! request handling ([`container::spec`], [`container::check_create`],
//! [`container::check_exec`]) directly.

pub mod container;
pub mod debug_console;
pub mod guest_info;
pub mod logging;
pub(crate) mod network;
pub mod pid1;
pub mod power;
pub mod reaper;
pub mod server;
