//! An idle guest: husk-vmm neither exits nor spins while the guest halts, stays small,
//! and ends cleanly (status 0) when the host asks with SIGTERM.

mod vmm_support;

use std::time::Duration;

use vmm_support::{guest, require_kvm, spawn_vmm};

#[test]
fn idle_guest_costs_no_cpu_and_sigterm_ends_the_vmm_with_status_0() {
    require_kvm();
    let g = guest("idle");
    let mut vm = spawn_vmm(&["--kernel", g.to_str().unwrap(), "--vcpus", "2"]);
    let (at, _) = vm.wait_line("the idle guest's ready line", Duration::from_secs(30), |l| l == "husk idle: ready");
    // Let the boot settle, then measure CPU use over a quiet second.
    std::thread::sleep(Duration::from_millis(200));
    let before = vm.cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let used = vm.cpu_time() - before;
    let rss_kib = vm.status_kb("VmRSS");
    println!("idle guest: ready after {at:?}; VMM RSS {rss_kib} KiB; CPU over 1 s idle: {used:?}");
    assert!(used < Duration::from_millis(200), "an idle guest made husk-vmm use {used:?} of CPU in 1 s");
    assert!(vm.child.try_wait().unwrap().is_none(), "husk-vmm exited while the guest idled");
    let status = vm.terminate(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "SIGTERM should end husk-vmm cleanly: {status:?}");
}
