//! Tier 4, the full stack on husk-vmm: containerd → `containerd-shim-husk-v2` with
//! `backend = "husk-vmm"` → our Linux guest and agent, as on a node with hardware KVM. `ctr
//! run` with stdin, stdout, stderr and the exit code, `ctr task exec`, a CNI bridge pod
//! network (a netns the test makes) whose tap husk-vmm takes as an fd, HTTP from the host
//! into the pod and through the port-forward link (127.0.0.1 in the pod netns), the guest
//! NIC with the veth's MAC, pause/resume, a killed VMM, and nothing left behind afterwards: no
//! process, mount, /run/husk directory or jail id, no tap or qdisc in the pod netns, no
//! shim socket.
//!
//! Which subset, and why: tier 3 (`shim_ctr.rs`, `net_cni.rs`, …) runs every path of the
//! shim on QEMU; what is new here is the VMM under them, so these three tests take the paths
//! where the backend matters (the VM's start and end, vsock stdio and exec, pause/resume
//! through the VMM's control API, the tap fd, the VMM's crash) once each. On our kvm_pvm machines they run inside the nested tier's L1 (QEMU TCG with
//! emulated AMD SVM, the host's `/` read-only, `xtask/src/nested/`), where every L2 boot
//! costs seconds of the CI budget; more would repeat tier 3 at ten times its price.
//!
//! Only hardware KVM runs our stock kernel on husk-vmm, so these are `#[ignore]`d as tier 4:
//! `cargo xtask test` runs them directly on hardware-KVM hosts and in L1 elsewhere (the
//! summary says `passed (nested, emulated SVM)`); `cargo xtask nested-test` runs only them.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_hypervisor::host::{self, HostKind};
use husk_tests::cni::{BridgeNetwork, Netns};
use husk_tests::http;
use husk_tests::husk::{assert_sandbox_gone, debug_console, HuskContainerd, BUSYBOX};
use husk_tests::require_root;

const RUNTIME: &str = "io.containerd.husk.v2";
/// The shim's configuration: husk-vmm by name, so a fall-back to QEMU fails the test instead
/// of passing it (`auto` picks husk-vmm on hardware KVM too); everything else as installed.
const CONFIG: &str = "backend = \"husk-vmm\"";
const PAGE: &str = "husk-vmm-pod-ok";
const HTTPD: &str =
    "mkdir -p /www && echo husk-vmm-pod-ok > /www/index.html && exec httpd -f -p 8080 -h /www";

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn require_hardware_kvm() {
    let report = host::detect();
    assert!(
        matches!(report.kind, HostKind::HardwareKvm { .. }),
        "this test needs hardware KVM (VT-x/AMD-V) — `cargo xtask test` runs it in the nested tier elsewhere; this host is {:?}: {}",
        report.kind,
        report.why
    );
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The shim sockets under containerd's shared `/run/containerd/s` (one per running shim).
fn shim_sockets() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/run/containerd/s")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn field(pid: u32, file: &str) -> String {
    std::fs::read(format!("/proc/{pid}/{file}"))
        .map(|b| text(&b))
        .unwrap_or_default()
}

fn parent(pid: u32) -> Option<u32> {
    field(pid, "status")
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
}

/// The processes below sandbox `id`'s shim (`-id <id>` on its command line): `(pid, name)`.
fn below_shim(id: &str) -> Vec<(u32, String)> {
    let marker = format!("\0-id\0{id}\0");
    let mut names = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let mut up = parent(pid);
        let mut hops = 0;
        while let Some(p) = up.filter(|p| *p > 1 && hops < 16) {
            if field(p, "cmdline").contains(&marker) {
                names.push((pid, field(pid, "comm").trim().to_string()));
                break;
            }
            up = parent(p);
            hops += 1;
        }
    }
    names
}

/// Sandbox `id` runs on husk-vmm, not QEMU.
/// Returns the husk-vmm's PID.
fn assert_on_husk_vmm(id: &str) -> u32 {
    let below = below_shim(id);
    let vmm = below.iter().find(|(_, n)| n == "husk-vmm");
    assert!(
        vmm.is_some() && !below.iter().any(|(_, n)| n.starts_with("qemu")),
        "sandbox {id} is not on husk-vmm: the processes below its shim are {below:?}"
    );
    vmm.map_or(0, |(pid, _)| *pid)
}

/// `ctr task ls`'s status of task `id` (RUNNING, PAUSED, STOPPED, …).
fn task_status(h: &HuskContainerd, id: &str) -> String {
    h.ctd
        .ctr_ok(&["task", "ls"])
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_default()
        .to_string()
}

/// Waits up to `secs` for task `id` to reach `status`.
fn wait_status(h: &HuskContainerd, id: &str, status: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let now = task_status(h, id);
        if now == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} is {now:?}, not {status} after {secs} s: {}",
            h.ctd.ctr_ok(&["task", "ls"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ctr run --rm` with stdin, stdout, stderr and the exit code; then a detached container
/// with `ctr task exec`, pause and resume, and the debug console; each sandbox gone after,
/// its shim socket too.
#[test]
#[ignore = "tier 4: needs hardware KVM (VT-x/AMD-V); this host's /dev/kvm is kvm_pvm or missing, where our stock Linux guest cannot run on husk-vmm"]
fn ctr_run_exec_pause_resume_on_husk_vmm_with_stdio_and_exit_codes() {
    require_hardware_kvm();
    require_root("containerd");
    let sockets = shim_sockets();
    let h = HuskContainerd::start_with_config(&format!("{CONFIG}\ndebug_console = true\n"));

    let id = unique("hvrun");
    let mut child = h
        .ctd
        .run_rm_command(
            Some(RUNTIME),
            &[],
            BUSYBOX,
            &id,
            &[
                "sh",
                "-c",
                "cat; echo hello from husk-vmm; uname -r; echo to-stderr >&2; exit 3",
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ctr run");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout {stdout}\nstderr {}\ncontainerd log:\n{}",
        text(&out.stderr),
        h.ctd.log()
    );
    // The guest's kernel, not the host's: the container ran in the VM.
    assert!(
        stdout.starts_with("from stdin\nhello from husk-vmm\n6.1."),
        "{stdout}"
    );
    assert!(
        text(&out.stderr).contains("to-stderr"),
        "{}",
        text(&out.stderr)
    );
    assert_sandbox_gone(&id);

    let id = unique("hvexec");
    h.run_idle(&id, &[]);
    assert_on_husk_vmm(&id);
    let out = h.ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo exec-out; cat /proc/1/cmdline | tr '\\0' ' '; echo exec-err >&2; exit 7",
    ]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "exec: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "exec-out\nsleep 1000 ");
    assert!(
        text(&out.stderr).contains("exec-err"),
        "{}",
        text(&out.stderr)
    );
    // Pause and resume go through husk-vmm's control API; an exec works after.
    h.ctd.ctr_ok(&["task", "pause", &id]);
    wait_status(&h, &id, "PAUSED", 30);
    h.ctd.ctr_ok(&["task", "resume", &id]);
    wait_status(&h, &id, "RUNNING", 30);
    let after = h
        .ctd
        .ctr_ok(&["task", "exec", "--exec-id", "e2", &id, "echo", "resumed"]);
    assert_eq!(after, "resumed\n");
    // The debug console: a root shell in the guest over husk-vmm's hybrid vsock.
    let out = debug_console(
        &id,
        b"echo $((6 * 7)); cat /proc/1/comm; exit\n",
        Duration::from_secs(60),
    );
    let console = text(&out.stdout);
    assert!(
        out.status.success() && console.contains("42") && console.contains("init"),
        "debug console: {console}\n{}",
        text(&out.stderr)
    );
    h.remove(&id);
    assert_sandbox_gone(&id);
    drop(h);
    assert_eq!(
        shim_sockets(),
        sockets,
        "shim sockets left in /run/containerd/s"
    );
}

/// The MAC address in `ip link show` output.
fn mac_in(ip_link: &str) -> String {
    ip_link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// A pod on a CNI bridge: husk-vmm takes the shim's tap as an fd, the guest NIC has the
/// veth's MAC, the host reaches the guest's httpd at the pod IP; after delete the netns holds
/// only what CNI made.
#[test]
#[ignore = "tier 4: needs hardware KVM (VT-x/AMD-V); this host's /dev/kvm is kvm_pvm or missing, where our stock Linux guest cannot run on husk-vmm"]
fn a_pod_network_on_husk_vmm_serves_http_to_the_host() {
    require_hardware_kvm();
    require_root("network namespaces, CNI and containerd");
    let sockets = shim_sockets();
    let h = HuskContainerd::start_with_config(CONFIG);
    let ns = Netns::new("hvnet");
    let mut net = BridgeNetwork::new(1500);
    let a = net.attach(&ns);
    let veth_mac = mac_in(&ns.ip(&["link", "show", "eth0"]));

    let id = unique("hvpod");
    let with_ns = format!("network:{}", ns.path().display());
    h.ctd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--with-ns",
        &with_ns,
        BUSYBOX,
        &id,
        "sh",
        "-c",
        HTTPD,
    ]);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_on_husk_vmm(&id);
        assert!(
            ns.ip(&["link", "show"]).contains("tap0_husk"),
            "no tap in the pod netns"
        );
        let page = http::get_until((a.ip, 8080).into(), PAGE, Duration::from_secs(90));
        assert!(page.contains(PAGE), "{page}");
        let out = h.ctd.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            "mac",
            &id,
            "cat",
            "/sys/class/net/eth0/address",
        ]);
        assert_eq!(
            out.trim(),
            veth_mac,
            "the guest NIC's MAC is not the veth's"
        );
        // containerd's CRI PortForward path: 127.0.0.1 dialled in the pod netns reaches the
        // guest's httpd through the shim's NAT link on the same tap.
        let page = http::get_in_netns(&ns.path(), 8080).expect("127.0.0.1:8080 in the pod netns");
        assert!(text(&page).contains(PAGE), "{}", text(&page));
    }));
    h.remove(&id);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert_sandbox_gone(&id);
    let links = ns.ip(&["link", "show"]);
    assert!(
        !links.contains("tap0_husk"),
        "tap left in the pod netns: {links}"
    );
    let qdiscs = ns.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(
        !qdiscs.contains("ingress"),
        "ingress qdisc left on the veth: {qdiscs}"
    );
    net.detach(&ns);
    drop(h);
    assert_eq!(
        shim_sockets(),
        sockets,
        "shim sockets left in /run/containerd/s"
    );
}

/// kill -9 of a pod's husk-vmm (a crash): its task stops, and delete leaves nothing — no
/// process, mount, directory or jail id, no tap or qdisc in the pod netns.
#[test]
#[ignore = "tier 4: needs hardware KVM (VT-x/AMD-V); this host's /dev/kvm is kvm_pvm or missing, where our stock Linux guest cannot run on husk-vmm"]
fn a_pod_whose_husk_vmm_is_killed_stops_and_leaves_nothing() {
    require_hardware_kvm();
    require_root("network namespaces, CNI and containerd");
    let h = HuskContainerd::start_with_config(CONFIG);
    let ns = Netns::new("hvkill");
    let mut net = BridgeNetwork::new(1500);
    net.attach(&ns);
    let id = unique("hvkill");
    let with_ns = format!("network:{}", ns.path().display());
    h.run_idle(&id, &["--with-ns", &with_ns]);
    let vmm = assert_on_husk_vmm(&id);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(vmm).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_status(&h, &id, "STOPPED", 30);
    h.ctd.ctr_ok(&["task", "delete", &id]);
    h.ctd.ctr_ok(&["containers", "delete", &id]);
    assert_sandbox_gone(&id);
    let links = ns.ip(&["link", "show"]);
    assert!(
        !links.contains("tap0_husk"),
        "tap left in the pod netns: {links}"
    );
    let qdiscs = ns.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(
        !qdiscs.contains("ingress"),
        "ingress qdisc left on the veth: {qdiscs}"
    );
    net.detach(&ns);
}
