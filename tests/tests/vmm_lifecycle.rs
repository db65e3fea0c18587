//! An idle guest: husk-vmm neither exits nor spins while the guest halts, stays small,
//! and ends cleanly (status 0) when the host asks with SIGTERM.

use std::time::Duration;

use husk_tests::vmm::{guest, require_kvm, spawn_vmm};

#[test]
fn idle_guest_costs_no_cpu_and_sigterm_ends_the_vmm_with_status_0() {
    require_kvm();
    let g = guest("idle");
    let mut vm = spawn_vmm(&["--kernel", g.to_str().unwrap(), "--vcpus", "2"]);
    let (at, _) = vm.wait_line(
        "the idle guest's ready line",
        Duration::from_secs(30),
        |l| l == "husk idle: ready",
    );
    // Let the boot settle, then measure CPU use over a quiet second.
    std::thread::sleep(Duration::from_millis(200));
    let before = vm.cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let used = vm.cpu_time() - before;
    let rss_kib = vm.status_kb("VmRSS");
    println!("idle guest: ready after {at:?}; VMM RSS {rss_kib} KiB; CPU over 1 s idle: {used:?}");
    assert!(
        used < Duration::from_millis(200),
        "an idle guest made husk-vmm use {used:?} of CPU in 1 s"
    );
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "husk-vmm exited while the guest idled"
    );
    let status = vm.terminate(Duration::from_secs(5));
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM should end husk-vmm cleanly: {status:?}"
    );
}

#[test]
fn triple_fault_ends_the_vmm_with_status_0() {
    require_kvm();
    let g = guest("triplefault");
    let run = husk_tests::vmm::run_vmm(&["--kernel", g.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(run.stdout, "husk triplefault: faulting\n");
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
}

#[test]
fn kvm_internal_error_is_fatal_with_a_register_dump() {
    require_kvm();
    let g = guest("mmiojump");
    let run = husk_tests::vmm::run_vmm(&["--kernel", g.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(run.stdout, "husk mmiojump: jumping to 0xe0000000\n");
    assert_eq!(run.status.code(), Some(1), "stderr: {}", run.stderr);
    assert!(run.stderr.contains("KVM internal error"), "{}", run.stderr);
    assert!(
        run.stderr.contains("rip=0x00000000e0000000"),
        "no register dump: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains("cr0="),
        "no special registers: {}",
        run.stderr
    );
}

#[test]
fn the_vmm_dies_with_its_parent() {
    require_kvm();
    let dir = husk_tests::vmm::TempDir::new("vmm-orphan");
    let log = dir.0.join("console.log");
    let g = guest("idle");
    // A shell stands in for the shim: it starts husk-vmm, reports its pid, and exits.
    let script = format!(
        "'{}' --kernel '{}' --console-log '{}' --die-with-parent </dev/null >/dev/null 2>&1 & echo $!; sleep 1",
        husk_tests::vmm::vmm_binary().display(),
        g.display(),
        log.display()
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("running sh");
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the vmm's pid");
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
            .unwrap_or(false)
    };
    let start = std::time::Instant::now();
    while alive() {
        if start.elapsed() > Duration::from_secs(10) {
            // Our own (grand)child: end it before failing.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("husk-vmm {pid} outlived its parent by 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "husk idle: ready\n",
        "the guest had started"
    );
}
