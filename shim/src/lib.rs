//! `containerd-shim-husk-v2`: the containerd shim-v2 that maps containerd's task API onto one
//! microVM per sandbox.
//!
//! Owns the sandbox's life on the host: `/run/husk/<sandbox-id>/`, the VM (started through
//! `husk-hypervisor`), sharing rootfs and volumes with the guest, relaying stdio fifos,
//! publishing events, and cleaning up on every path (the `delete` command included).
//!
//! - [`shim`]: start/delete and the bootstrap containerd drives;
//! - [`task`]: the task API;
//! - [`sandbox`]: the VM, its agent connection, bring-up and teardown;
//! - [`sandbox_dir`] and [`share`]: the state directory and what is mounted in it;
//! - [`network`]: the pod netns mirrored to the guest's NICs (taps + tc redirects);
//! - [`io`]: stdio relays; [`agent`]: the agent client; [`config`]: `/etc/husk/config.toml`;
//! - [`debug_console`]: the guest's root shell for debugging, and the `console` command that
//!   attaches to it; [`elf`]: whether a program runs without a dynamic loader;
//! - [`metrics`]: what the shim measures of its sandbox, served on its metrics socket;
//!   [`monitor`]: the node's Prometheus endpoint (`containerd-shim-husk-v2 monitor`);
//! - [`pool`]: the warm pool of pre-booted VMs (`containerd-shim-husk-v2 pool`).

pub mod agent;
pub mod config;
pub mod debug_console;
pub mod elf;
pub mod error;
pub mod host_cgroup;
pub mod host_fs;
pub mod io;
pub mod metrics;
pub mod monitor;
pub mod network;
pub(crate) mod pool;
pub mod sandbox;
pub mod sandbox_dir;
pub mod share;
pub mod shim;
pub(crate) mod task;

/// The runtime name containerd resolves to this binary.
pub const RUNTIME_ID: &str = "io.containerd.husk.v2";
