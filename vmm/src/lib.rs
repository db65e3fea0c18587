//! `husk-vmm`: husk's own KVM microVM monitor.
//!
//! Owns the KVM VM and its vCPU threads, guest memory (a shared memfd, so vhost-user
//! backends can map it), Linux boot (PVH or the 64-bit boot protocol), the serial console,
//! reset/shutdown, the virtio-mmio transport and its devices (vsock, net, fs, rng).
//!
//! It must never trust the guest: every address, length and index read from guest memory
//! or an MMIO register is validated, and a bad one fails that request, never the VMM.
//!
//! The VMM itself is built under its own issue; until then the `qemu` backend of the
//! `husk-hypervisor` crate runs our guests.
