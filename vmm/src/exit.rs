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
pub type ExitSender = mpsc::Sender<ExitReason>;
