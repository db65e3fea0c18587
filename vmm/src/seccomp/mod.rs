//! husk-vmm's seccomp filters: one per thread kind, each installed by the thread on itself
//! before it touches anything the guest controls, once everything that opens files or
//! binds sockets is done. A call outside its thread's list kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`, seen as SIGSYS; the kernel log names the call).
//!
//! The kinds and what they may do beyond the common base (I/O on fds already open, the
//! allocator without executable memory, std's futex operations, sleeping, thread exit,
//! `abort`) — the lists are in [`rules`]:
//! - **vCPU** (`vcpu<N>`): `KVM_RUN`, the register reads of a fatal exit, and the device
//!   emulation queue notifications run (epoll, send/recvmsg, accept4, `FIONBIO`);
//! - **device** (`vsock`, `net`, `virtio-fs`, `console-in`): the same device emulation plus
//!   `poll`; no KVM ioctl;
//! - **API** (`api`): accept on its listener, read/write, the vCPU kick of `pause`;
//! - **signals**: waiting for SIGTERM/SIGINT/SIGHUP;
//! - **VMM** (the main thread, after it started the vCPUs): the vCPU kick of `stop`,
//!   and reaping the broker.
//!
//! No thread may take a path (`open*`, `unlink*`, `mkdir*`, `rename*`, `bind`, `connect`),
//! make a socket, `clone`/`fork`, `execve`, `ptrace`, `prctl`, signal another process,
//! or map executable memory. The two path operations a running VM needs — connecting a
//! guest's vsock connection to `<uds>_<port>` and removing husk-vmm's sockets on the way
//! out — are done by the broker process ([`crate::broker`]) under a filter of its own.
//! No thread is started after the filters: the main thread installs its own once the
//! vCPU threads run.
//!
//! Modelled on Firecracker's per-thread-category filters (`resources/seccomp/*.json`),
//! written for what this VMM does.

mod rules;
#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use rules::ioctl;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules do not compile (a bug here, not on the host).
    #[error("building the seccomp filters: {0}")]
    Build(#[source] seccompiler::Error),
    /// The kernel refused the filter.
    #[error("installing the {kind} thread's seccomp filter: {source} — the kernel needs CONFIG_SECCOMP_FILTER; run with --no-seccomp only to debug")]
    Install {
        /// The thread kind.
        kind: ThreadKind,
        /// seccompiler's error, with the OS error inside.
        #[source]
        source: seccompiler::Error,
    },
}

/// The kinds of husk-vmm threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread, once the vCPUs run: waits for the exit reason, stops the VM.
    Vmm,
    /// A vCPU thread: KVM_RUN and the exits it handles, device queue notifications included.
    Vcpu,
    /// A device event thread: vsock, net, virtio-fs, console input.
    Device,
    /// The control API thread.
    Api,
    /// The thread that waits for termination signals.
    Signals,
}

impl ThreadKind {
    /// Every kind.
    pub(crate) const ALL: [ThreadKind; 5] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Api,
        ThreadKind::Signals,
    ];

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "VMM",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Device => "device",
            ThreadKind::Api => "API",
            ThreadKind::Signals => "signal",
        }
    }

    fn index(self) -> usize {
        match self {
            ThreadKind::Vmm => 0,
            ThreadKind::Vcpu => 1,
            ThreadKind::Device => 2,
            ThreadKind::Api => 3,
            ThreadKind::Signals => 4,
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the rules need to know about this process, to allow only itself as a target.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// This process's id: signals may go to its own threads only.
    pub pid: libc::pid_t,
    /// The signal that kicks vCPU threads out of KVM_RUN.
    pub kick_signal: libc::c_int,
    /// The broker process, the one child the main thread may reap.
    pub broker_pid: Option<libc::pid_t>,
}

impl Context {
    /// The context of the calling process.
    pub fn current(broker_pid: Option<libc::pid_t>) -> Self {
        Self {
            // SAFETY: getpid has no preconditions.
            pid: unsafe { libc::getpid() },
            kick_signal: crate::vstate::run_state::kick_signal(),
            broker_pid,
        }
    }
}

fn compile(rules: rules::Rules) -> Result<BpfProgram, SeccompError> {
    let f = SeccompFilter::new(
        rules.into_map(),
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(e.into()))?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.into()))
}

/// The compiled filter of thread kind `kind`.
pub fn filter(kind: ThreadKind, ctx: &Context) -> Result<BpfProgram, SeccompError> {
    compile(rules::for_kind(kind, ctx)?)
}

/// The broker process's filter.
pub fn broker_filter() -> Result<BpfProgram, SeccompError> {
    compile(rules::for_broker()?)
}

/// The filters of every thread kind, compiled once and shared by the threads that
/// install them; or none at all (`--no-seccomp`). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Filters(Option<Arc<[BpfProgram; 5]>>);

impl Filters {
    /// No filters: every thread runs unconfined (`--no-seccomp`, unit tests).
    pub fn off() -> Self {
        Self(None)
    }

    /// Compiles the filter of every kind for the process `ctx` describes.
    pub fn build(ctx: &Context) -> Result<Self, SeccompError> {
        let [a, b, c, d, e] = ThreadKind::ALL.map(|k| filter(k, ctx));
        Ok(Self(Some(Arc::new([a?, b?, c?, d?, e?]))))
    }

    /// Whether there are filters to install.
    pub fn on(&self) -> bool {
        self.0.is_some()
    }

    /// Installs the filter of `kind` on the calling thread (nothing when off).
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let Some(all) = &self.0 else {
            return Ok(());
        };
        seccompiler::apply_filter(&all[kind.index()])
            .map_err(|source| SeccompError::Install { kind, source })
    }

    /// Installs the filter of `kind` on the calling thread, `thread`, or ends the process
    /// with a line saying why: a thread must never run unconfined by accident.
    pub(crate) fn install_or_exit(&self, kind: ThreadKind, thread: &str) {
        if let Err(e) = self.install(kind) {
            eprintln!("husk-vmm: thread {thread}: {e}");
            std::process::exit(1);
        }
    }
}
