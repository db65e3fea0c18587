//! Why a VM stops, and how devices and vCPUs report it to the VMM's main thread.

use std::sync::mpsc;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 port 0x64 ← 0xfe, a KVM system event).
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN): Linux's `reboot=t`.
    TripleFault,
    /// A shutdown requested from the host (control API, signal).
    HostShutdown,
    /// Something the VMM cannot go on from; carries a register dump where one exists.
    Fatal(String),
}

impl ExitReason {
    /// The process exit status for this reason: 0 for every orderly end.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Fatal(_) => 1,
            _ => 0,
        }
    }
}

/// Where exit reasons go.
pub(crate) type ExitSender = mpsc::Sender<ExitReason>;

/// Asks the kernel to send SIGTERM when the parent process (the shim) dies, so a VMM never
/// outlives the process that supervises it. Returns false if the parent is already gone.
pub fn die_with_parent() -> std::io::Result<bool> {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; the unused arguments are 0.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The parent may have died before prctl took effect: then we were reparented.
    // SAFETY: getppid has no preconditions.
    Ok(unsafe { libc::getppid() } == parent)
}

/// SIGTERM, SIGINT and SIGHUP, blocked in every thread and turned into
/// [`ExitReason::HostShutdown`] by a thread of their own.
#[derive(Debug)]
pub struct TerminationSignals(libc::sigset_t);

impl TerminationSignals {
    /// Blocks the signals in the calling thread and so in every thread it starts later:
    /// call it first thing, before any thread exists.
    pub fn block() -> std::io::Result<Self> {
        // SAFETY: an all-zero sigset_t is a valid value to pass to sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, exclusively borrowed sigset_t and the signals are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGHUP);
        }
        // SAFETY: `set` is initialised above; a null old-set pointer is allowed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(Self(set))
    }

    /// Starts the thread that waits for the signals and reports them on `tx`, under the
    /// signal thread's filter from `filters`.
    pub fn forward_to(
        self,
        tx: ExitSender,
        filters: &crate::seccomp::Filters,
    ) -> std::io::Result<()> {
        let set = self.0;
        let filters = filters.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                filters.install_or_exit(crate::seccomp::ThreadKind::Signals, "signals");
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` holds blocked signals and `sig` is a valid out pointer.
                let rc = unsafe { libc::sigwait(&set, &mut sig) };
                let reason = if rc == 0 {
                    ExitReason::HostShutdown
                } else {
                    ExitReason::Fatal(format!(
                        "waiting for termination signals: {}",
                        std::io::Error::from_raw_os_error(rc)
                    ))
                };
                let _ = tx.send(reason);
            })?;
        Ok(())
    }
}
