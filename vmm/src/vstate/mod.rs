//! KVM state: the VM, its vCPUs, guest memory.

pub mod memory;
pub mod run_state;
pub mod vcpu;
pub mod vm;
