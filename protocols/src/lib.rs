//! The agent API between `containerd-shim-husk-v2` (host) and `husk-agent` (guest): the
//! `.proto` definitions in `protos/` and the ttrpc code generated from them at build time.
//!
//! Owns the wire format only; neither side's behaviour lives here.
//!
//! # Versions
//! [`API_VERSION`] is carried by `Check` and `GetGuestDetails`. A shim refuses an agent whose
//! API version differs from its own: fields are added compatibly within a version, and any
//! change of meaning bumps it.
//!
//! # Transport
//! ttrpc over vsock port [`AGENT_VSOCK_PORT`]; the optional debug console on
//! [`DEBUG_CONSOLE_VSOCK_PORT`]. The host reaches it through the VMM's
//! hybrid-vsock unix socket (`CONNECT 1024\n` → `OK …\n`), see `husk_hypervisor::vsock`.
//!
//! # Stdio: RPCs, not separate vsock streams
//! A process's stdin/stdout/stderr travel as `WriteStdin` / `ReadStdout` / `ReadStderr` /
//! `CloseStdin` calls on the one ttrpc connection. `ReadStdout` is a long poll: it blocks in
//! the agent until bytes are there (up to 1 MiB per reply) or the stream ends (`eof`), so there
//! is no polling interval and no latency cost beyond one round trip per chunk.
//! Separate vsock streams per stream would save the protobuf framing and the thread a pending
//! read holds in the agent, but each needs its own port allocation, a handshake naming the
//! process, and ordering against `WaitProcess` (the shim must know it has read *all* output
//! before it reports the exit). With RPCs, `eof` on stdout is that ordering, the connection's
//! lifetime is the only one to manage, and hybrid vsock (which needs a `CONNECT` per stream
//! and a listening host socket per guest-initiated port) adds nothing.
//!
//! The cost is one round trip per chunk (a `Check` round trip is ~0.3 ms under QEMU TCG
//! here). The agent coalesces a writer's small writes for up to 2 ms into replies of up to
//! 1 MiB and gives the pipes 1 MiB buffers, so the process keeps writing while a reply is in
//! flight: measured under TCG, a 10 MiB `cat` reaches the host in ~0.35 s and 32 MiB from
//! `head -c … /dev/zero` in 2–3.8 s, where the same `head` into a pipe inside the guest alone
//! takes ~2 s. Revisit (separate streams) if stdio throughput on a KVM host shows the RPC
//! path as the limit.

/// The agent API version this crate defines.
pub const API_VERSION: u32 = 1;

/// The vsock port the agent serves ttrpc on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The vsock port of the guest's debug console: an interactive root shell in the guest's
/// own namespaces, one per connection, offered only when the kernel command line carries
/// [`DEBUG_CONSOLE_FLAG`] (the shim's `debug_console = true`). The stream is raw terminal
/// bytes both ways (the agent runs the shell on a pty); nothing else is spoken on it.
pub const DEBUG_CONSOLE_VSOCK_PORT: u32 = 1026;

/// The kernel command line word that enables the debug console.
pub const DEBUG_CONSOLE_FLAG: &str = "husk.debug_console=1";

/// Where the shell of the debug console lives, relative to the shared virtio-fs directory
/// (the host's `/run/husk/<sid>/shared`, the guest's `/run/husk/shared`): the guest's
/// initramfs has no shell of its own, so the shim puts a static one there.
pub const DEBUG_SHELL_IN_SHARE: &str = ".husk-debug/sh";

/// The kernel command line word that makes the agent log at debug level (every API request
/// on the console, with its duration).
pub const DEBUG_LOG_FLAG: &str = "husk.log=debug";

/// Largest stdio chunk one `ReadStdout`/`ReadStderr` reply carries (ttrpc messages are capped
/// at 4 MiB).
pub const MAX_READ_CHUNK: u32 = 1 << 20;

/// A module of generated code from OUT_DIR, with the lints that code does not meet allowed
/// (the generated files' own inner attributes are stripped by build.rs).
macro_rules! generated {
    ($(#[$doc:meta])* $name:ident = $file:literal) => {
        $(#[$doc])*
        #[allow(
            clippy::all,
            clippy::pedantic,
            missing_docs,
            non_camel_case_types,
            non_snake_case,
            non_upper_case_globals,
            unused_imports,
            unused_results,
            unused_mut,
            dead_code,
            trivial_casts,
            unknown_lints
        )]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), $file));
        }
    };
}

generated! {
    /// The messages.
    agent = "/agent.rs"
}

generated! {
    /// The ttrpc client (`AgentClient`) and server glue (`Agent` trait, `create_agent`).
    agent_ttrpc = "/agent_ttrpc.rs"
}

generated! {
    /// The same client as [`agent_ttrpc::AgentClient`], async on tokio: its connection waits in
    /// the runtime's epoll, where the sync client's receiver thread wakes every 10 ms (ttrpc
    /// 0.10's `POLL_MAX_TIME`) for as long as the connection lives. And the server glue the
    /// agent serves with (`Agent` trait, `create_agent`): a connection is tasks on the agent's
    /// runtime, where ttrpc's sync server starts four threads for each one.
    agent_ttrpc_async = "/async/agent_ttrpc.rs"
}

pub use protobuf;
pub use ttrpc;
