//! `containerd-shim-husk-v2`: the containerd shim-v2 that maps containerd's task API onto one
//! microVM per sandbox.
//!
//! Owns the sandbox's life on the host: `/run/husk/<sandbox-id>/`, the VM (started through
//! `husk-hypervisor`), sharing rootfs and volumes with the guest, wiring the pod network
//! namespace to a tap, relaying stdio fifos, publishing events, and cleaning up on every path.
//! It lands with the shim issue.
