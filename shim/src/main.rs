//! `containerd-shim-husk-v2` (also installable as `containerd-shim-kata-v2`).

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    std::process::exit(husk_shim::shim::main(&args));
}
