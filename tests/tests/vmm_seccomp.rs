//! husk-vmm's seccomp filter covers every one of its threads once the VM runs (vCPUs,
//! signals, API, vsock event loop), the guest's devices keep working under it (the other
//! vmm_* tests and husk_vmm_backend run with it on, as it is the default), and the orderly
//! shutdown path (socket removal, exit) is allowed. That a call outside the list kills the
//! process is shown on the filter itself, in `husk_vmm::seccomp`'s unit tests.

mod vmm_support;

use std::time::Duration;

use vmm_support::{guest, require_kvm, spawn_vmm, TempDir};

/// The `Seccomp:` mode of every thread of `pid` (0 none, 2 filter).
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let get = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        modes.push((get("Name:"), get("Seccomp:")));
    }
    modes
}

fn run(no_seccomp: bool) -> Vec<(String, String)> {
    require_kvm();
    let dir = TempDir::new(if no_seccomp {
        "seccomp-off"
    } else {
        "seccomp-on"
    });
    let g = guest("vsock_echo");
    let vsock = dir.0.join("v.sock");
    let api = dir.0.join("api.sock");
    let mut args = vec![
        "--kernel",
        g.to_str().unwrap(),
        "--vsock-sock",
        vsock.to_str().unwrap(),
        "--api-sock",
        api.to_str().unwrap(),
    ];
    if no_seccomp {
        args.push("--no-seccomp");
    }
    let mut vm = spawn_vmm(&args);
    vm.wait_line(
        "the echo guest's ready line",
        Duration::from_secs(30),
        |l| l == "husk vsock: ready",
    );
    let modes = seccomp_modes(vm.child.id());
    let status = vm.terminate(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "orderly shutdown under the filter");
    assert!(
        !api.exists() && !vsock.exists(),
        "sockets removed on the way out"
    );
    modes
}

#[test]
fn every_thread_runs_under_the_filter_and_shutdown_is_allowed() {
    let modes = run(false);
    assert!(
        modes.len() >= 4,
        "expected vCPU, signal, API and vsock threads: {modes:?}"
    );
    assert!(
        modes.iter().all(|(_, m)| m == "2"),
        "a thread without the filter: {modes:?}"
    );
}

#[test]
fn no_seccomp_turns_it_off() {
    let modes = run(true);
    assert!(modes.iter().all(|(_, m)| m == "0"), "{modes:?}");
}
