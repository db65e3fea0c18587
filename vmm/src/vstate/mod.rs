//! KVM state: the VM, its vCPUs, guest memory.

pub mod memory;
pub mod vcpu;
pub mod vm;
