//! husk-vmm's seccomp filters, on a running VM:
//! - every thread (vCPUs, signals, API, vsock event loop, the main thread) and the broker
//!   process run under a filter; the orderly shutdown path (socket removal through the
//!   broker, exit) is allowed, and `--no-seccomp` turns it all off;
//! - a forbidden call made after start — a new file opened on the API thread, an AF_INET
//!   socket on a device thread, an unlink on a vCPU thread — kills husk-vmm with SIGSYS
//!   and does not happen; without the filters the same calls go through (the control).
//!
//! The calls are made through the control API's `debug-forbidden` request, which only
//! debug builds of husk-vmm have (`husk_vmm::debug_hooks`). The guest's devices keep
//! working under the filters: the other vmm_* tests and husk_vmm_backend run with them on,
//! as it is the default. Each filter's list is checked call by call in
//! `husk_vmm::seccomp`'s unit tests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_tests::vmm::{guest, require_kvm, spawn_vmm, Running, TempDir};

/// `PF_USER_WORKER`: a thread the kernel runs for the process (KVM's NX huge page
/// recovery worker); it never runs user code, and is named after its creator until it
/// names itself.
const PF_USER_WORKER: u64 = 0x4000;

/// Whether thread `task` (a /proc/PID/task/TID directory) is a kernel worker.
fn kernel_worker(task: &Path) -> bool {
    let stat = std::fs::read_to_string(task.join("stat")).unwrap_or_default();
    // Fields after the ")" that closes the name; `flags` is the 9th field overall.
    let flags = stat
        .rfind(')')
        .and_then(|i| stat[i + 2..].split_whitespace().nth(6))
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    flags & PF_USER_WORKER != 0
}

/// The `Name:` and `Seccomp:` (0 none, 2 filter) of every thread of `pid` that runs user
/// code.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        if kernel_worker(&t.path()) {
            continue;
        }
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

/// The child processes of `pid` (the broker).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// A running echo guest with a vsock and an API socket.
struct Vm {
    run: Running,
    dir: TempDir,
    api: PathBuf,
    vsock: PathBuf,
}

fn start(tag: &str, no_seccomp: bool) -> Vm {
    require_kvm();
    let dir = TempDir::new(tag);
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
    let mut run = spawn_vmm(&args);
    run.wait_line(
        "the echo guest's ready line",
        Duration::from_secs(30),
        |l| l == "husk vsock: ready",
    );
    Vm {
        run,
        dir,
        api,
        vsock,
    }
}

/// One API request; the reply line, or None if husk-vmm went away first.
fn request(sock: &Path, req: &str) -> Option<String> {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(n) if n > 0 => Some(line.trim_end().to_owned()),
        _ => None,
    }
}

/// Sends `debug-forbidden <args>`; fails the test if this husk-vmm has no such request.
fn forbidden(vm: &Vm, args: &str) -> Option<String> {
    let reply = request(&vm.api, &format!("debug-forbidden {args}"));
    if let Some(r) = &reply {
        assert!(
            !r.contains("unknown request"),
            "husk-vmm has no debug-forbidden request ({r}): these tests need a debug build of \
             husk-vmm (cargo test without --release, or HUSK_VMM pointing at one)"
        );
    }
    reply
}

/// Wakes the vsock device thread: a host client connecting to the vsock socket.
fn wake_vsock_thread(vm: &Vm) -> Option<UnixStream> {
    UnixStream::connect(&vm.vsock).ok()
}

#[test]
fn every_thread_and_the_broker_run_under_a_filter_and_shutdown_is_allowed() {
    let mut vm = start("seccomp-on", false);
    let pid = vm.run.child.id();
    // A thread installs its filter as the first thing it does; on a busy host one may not
    // have been scheduled yet (it still has husk-vmm's name then), so look until all have.
    let deadline = Instant::now() + Duration::from_secs(5);
    let modes = loop {
        let modes = seccomp_modes(pid);
        if modes.iter().all(|(_, m)| m == "2") || Instant::now() > deadline {
            break modes;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        modes.iter().all(|(_, m)| m == "2"),
        "a thread without a filter: {modes:?}"
    );
    let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["husk-vmm", "vcpu0", "signals", "api", "vsock"] {
        assert!(names.contains(&want), "no {want} thread: {modes:?}");
    }
    let brokers = children(pid);
    assert_eq!(brokers.len(), 1, "one child, the broker: {brokers:?}");
    let broker = seccomp_modes(brokers[0]);
    assert_eq!(
        broker,
        vec![("husk-vmm-broker".to_string(), "2".to_string())],
        "the broker is one filtered thread"
    );
    let status = vm.run.terminate(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "orderly shutdown under the filters");
    assert!(
        !vm.api.exists() && !vm.vsock.exists(),
        "sockets removed on the way out (by the broker)"
    );
    assert!(
        !Path::new(&format!("/proc/{}", brokers[0])).exists(),
        "the broker is gone and reaped with husk-vmm"
    );
}

#[test]
fn no_seccomp_turns_it_off() {
    let mut vm = start("seccomp-off", true);
    let pid = vm.run.child.id();
    let modes = seccomp_modes(pid);
    assert!(modes.iter().all(|(_, m)| m == "0"), "{modes:?}");
    let broker = seccomp_modes(children(pid)[0]);
    assert!(broker.iter().all(|(_, m)| m == "0"), "{broker:?}");
    let status = vm.run.terminate(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(!vm.api.exists() && !vm.vsock.exists());
}

/// Waits for husk-vmm to die of SIGSYS, failing the test otherwise.
fn expect_sigsys(vm: &mut Vm, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = vm.run.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "husk-vmm still runs 10 s after {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGSYS as i32),
        "{what}: husk-vmm ended with {status:?}, not SIGSYS"
    );
}

#[test]
fn a_new_file_opened_on_the_api_thread_kills_husk_vmm() {
    let mut vm = start("seccomp-api", false);
    let target = vm.dir.0.join("created-by-husk-vmm");
    let reply = forbidden(&vm, &format!("api create {}", target.display()));
    assert_eq!(reply, None, "the API thread answered instead of dying");
    expect_sigsys(&mut vm, "open(O_CREAT) on the API thread");
    assert!(!target.exists(), "the file was created");
}

#[test]
fn an_inet_socket_on_a_device_thread_kills_husk_vmm() {
    let mut vm = start("seccomp-device", false);
    let reply = forbidden(&vm, "device inet-socket").expect("queued");
    assert!(reply.contains("\"queued\""), "{reply}");
    let _client = wake_vsock_thread(&vm);
    expect_sigsys(&mut vm, "socket(AF_INET) on the vsock thread");
}

#[test]
fn an_unlink_on_a_vcpu_thread_kills_husk_vmm() {
    let mut vm = start("seccomp-vcpu", false);
    let victim = vm.dir.0.join("must-stay");
    std::fs::write(&victim, b"x").unwrap();
    // The API kicks the vCPUs as it queues the call: husk-vmm may die before it answers, or
    // while it writes the answer (seen under load: `{"ok"`, cut).
    if let Some(reply) = forbidden(&vm, &format!("vcpu unlink {}", victim.display())) {
        let cut = !reply.trim_end().ends_with('}');
        assert!(reply.contains("\"queued\"") || cut, "{reply}");
    }
    expect_sigsys(&mut vm, "unlink on a vCPU thread");
    assert!(victim.exists(), "the file was removed");
}

#[test]
fn without_the_filters_the_same_calls_go_through() {
    let mut vm = start("seccomp-control", true);
    let by_api = vm.dir.0.join("by-api");
    let reply = forbidden(&vm, &format!("api create {}", by_api.display())).unwrap();
    assert!(reply.contains("\"done\""), "{reply}");
    assert!(by_api.exists());
    let by_device = vm.dir.0.join("by-device");
    forbidden(&vm, &format!("device create {}", by_device.display())).unwrap();
    let _client = wake_vsock_thread(&vm);
    let victim = vm.dir.0.join("by-vcpu");
    std::fs::write(&victim, b"x").unwrap();
    forbidden(&vm, &format!("vcpu unlink {}", victim.display())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !by_device.exists() || victim.exists() {
        assert!(
            Instant::now() < deadline,
            "device create: {}, vcpu unlink: {}",
            by_device.exists(),
            !victim.exists()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(vm.run.child.try_wait().unwrap().is_none(), "still running");
    let status = vm.run.terminate(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}
