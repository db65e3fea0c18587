//! `containerd-shim-husk-v2` (also installable as `containerd-shim-kata-v2`).

fn main() {
    containerd_shim::run::<husk_shim::shim::HuskShim>(husk_shim::RUNTIME_ID, Some(husk_shim::shim::shim_config()));
}
