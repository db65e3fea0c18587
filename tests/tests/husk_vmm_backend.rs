//! Tier 2: the husk-vmm backend through the `Hypervisor` trait, with synthetic guests: the
//! hybrid-vsock socket the trait hands out reaches the guest's echo server; pause, resume
//! and stop go through husk-vmm's API; the console is written and read; virtio-fs is served
//! by the virtiofsd the backend starts; stop, kill, drop and a guest power-off leave no
//! process or socket behind.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use husk_hypervisor::console::wait_for_line;
use husk_hypervisor::husk_vmm::HuskVmm;
use husk_hypervisor::{vsock, Hypervisor, Vm, VmConfig};
use husk_tests::process_alive;
use husk_tests::vmm::{guest, require_kvm, vmm_binary};

const DEADLINE: Duration = Duration::from_secs(30);

fn backend() -> HuskVmm {
    require_kvm();
    HuskVmm::with_program(vmm_binary()).expect("husk-vmm backend")
}

/// A config booting synthetic guest `name`; the initramfs is a small file the guest ignores.
fn config(dir: &Path, name: &str, vsock: bool) -> VmConfig {
    let initramfs = dir.join("initramfs.cpio");
    std::fs::write(&initramfs, b"not read by synthetic guests").unwrap();
    VmConfig {
        kernel: guest(name),
        initramfs,
        cmdline_extra: String::new(),
        vcpus: 1,
        memory_mib: 64,
        state_dir: dir.to_path_buf(),
        shared_dir: None,
        vsock,
        nets: Vec::new(),
        jail: None,
    }
}

fn console(vm: &dyn Vm) -> String {
    std::fs::read_to_string(vm.console_log()).unwrap_or_default()
}

fn wait_console(vm: &mut dyn Vm, what: &str, want: &str) -> String {
    let log = vm.console_log().to_path_buf();
    let got = wait_for_line(
        &log,
        DEADLINE,
        || matches!(vm.wait(Some(Duration::ZERO)), Ok(None)),
        |l| l.contains(want).then(|| l.to_string()),
    );
    got.unwrap_or_else(|e| panic!("{what}: {e}; console:\n{}", console(vm)))
}

/// Every file the VM left in `dir` that is a socket or virtiofsd's pid file.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".sock"))
        .collect()
}

fn echo(s: &mut std::os::unix::net::UnixStream, payload: &[u8]) {
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, payload);
}

#[test]
fn vsock_socket_reaches_the_echo_guest_and_stop_reaps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let hv = backend();
    assert_eq!(hv.name(), "husk-vmm");
    let mut vm = hv
        .start(&config(dir.path(), "vsock_echo", true))
        .expect("starting the VM");
    wait_console(
        vm.as_mut(),
        "the echo guest's ready line",
        "husk vsock: ready",
    );
    let sock = vm.vsock_socket().expect("a vsock socket").to_path_buf();
    assert_eq!(sock, dir.path().join("vsock.sock"));

    let mut s =
        vsock::connect(&sock, 1024, DEADLINE).expect("CONNECT 1024 through the trait's socket");
    echo(&mut s, b"hello through husk-vmm's hybrid vsock");
    // Paused, the guest cannot answer; resumed, the same connection works again.
    vm.pause().unwrap();
    s.write_all(b"while paused").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(s.read(&mut b).is_err(), "a paused guest echoed");
    vm.resume().unwrap();
    let mut back = [0u8; 12];
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"while paused");
    echo(&mut s, &[0x5a; 10_000]);
    drop(s);

    let pid = vm.pid();
    let status = vm.stop(Duration::from_secs(10)).unwrap();
    assert!(
        status.success(),
        "husk-vmm exit {status} after an API shutdown"
    );
    assert!(!process_alive(pid), "husk-vmm {pid} survived stop");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
    assert!(vm.pause().is_err(), "pause after stop must fail, not hang");
    assert!(vm.console_write(b"x").is_err());
}

#[test]
fn kill_and_drop_reap_husk_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = backend().start(&config(dir.path(), "idle", true)).unwrap();
    wait_console(
        vm.as_mut(),
        "the idle guest's ready line",
        "husk idle: ready",
    );
    let pid = vm.pid();
    let status = vm.kill().unwrap();
    assert!(!status.success());
    assert!(!process_alive(pid), "husk-vmm {pid} survived kill");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );

    let dir = tempfile::tempdir().unwrap();
    let vm = backend().start(&config(dir.path(), "idle", true)).unwrap();
    let pid = vm.pid();
    drop(vm);
    assert!(!process_alive(pid), "husk-vmm {pid} survived drop");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[test]
fn console_write_reaches_the_guest_and_its_power_off_ends_wait() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = backend()
        .start(&config(dir.path(), "serial_echo", false))
        .unwrap();
    assert!(vm.vsock_socket().is_none());
    wait_console(vm.as_mut(), "the ready line", "husk serial: ready");
    vm.console_write(b"typed through the trait\n").unwrap();
    let got = wait_console(vm.as_mut(), "the echoed line", "husk serial: got ");
    assert_eq!(got.trim_end(), "husk serial: got typed through the trait");
    let status = vm
        .wait(Some(DEADLINE))
        .unwrap()
        .expect("the guest powered off");
    assert!(status.success(), "{status}");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[test]
fn shared_dir_is_served_by_the_virtiofsd_the_backend_starts() {
    husk_tests::require_root("virtiofsd's namespace sandbox needs root");
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("hello.txt"), "hello from the host\n").unwrap();
    let mut c = config(dir.path(), "fs_rw", false);
    c.shared_dir = Some(shared.clone());
    let mut vm = backend().start(&c).unwrap();
    let status = vm
        .wait(Some(Duration::from_secs(60)))
        .unwrap()
        .expect("the guest powered off");
    assert!(
        status.success(),
        "{status}; console:\n{}",
        console(vm.as_ref())
    );
    assert_eq!(
        console(vm.as_ref()),
        "husk fs: read hello from the host\nhusk fs: wrote 0x00000015\n"
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("hello.txt")).unwrap(),
        "hello from the host\nwritten by the guest\n"
    );
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
    let no_virtiofsd = std::process::Command::new("pgrep")
        .args(["-f", &format!("virtiofsd.*{}", shared.display())])
        .output()
        .unwrap();
    assert!(no_virtiofsd.stdout.is_empty(), "virtiofsd outlived its VM");
}

#[test]
fn a_taken_socket_and_a_failing_vmm_are_reported_and_clean_up() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.sock"), b"").unwrap();
    let e = backend()
        .start(&config(dir.path(), "idle", false))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("api.sock") && e.contains("already exists"),
        "{e}"
    );
    std::fs::remove_file(dir.path().join("api.sock")).unwrap();

    // An ELF file husk-vmm cannot load: the start fails with what husk-vmm said.
    let bad = dir.path().join("bad.elf");
    let mut elf = b"\x7fELF".to_vec();
    elf.extend_from_slice(&[0u8; 60]);
    std::fs::write(&bad, elf).unwrap();
    let mut c = config(dir.path(), "idle", true);
    c.kernel = bad;
    let e = backend().start(&c).unwrap_err().to_string();
    assert!(
        e.contains("husk-vmm exited at start") && e.contains("bad.elf"),
        "{e}"
    );
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

/// With a jail, husk-vmm runs as the jail's uid with no capabilities, in its own mount and
/// network namespaces, and still serves the guest: /dev/kvm is the jail's own node, the
/// kernel a read-only bind, the vsock socket in the state directory the jail owns.
#[test]
fn a_jailed_husk_vmm_serves_the_guest_without_root() {
    husk_tests::require_root("building a jail");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("vm");
    let root = dir.path().join("jail");
    std::fs::create_dir(&state).unwrap();
    std::fs::create_dir(&root).unwrap();
    let ids = husk_hypervisor::jail::JailIds::new(dir.path());
    let uid = ids.claim("husk-vmm-test").unwrap();
    std::os::unix::fs::chown(&state, Some(uid), Some(uid)).unwrap();
    let mut cfg = config(&state, "vsock_echo", true);
    cfg.jail = Some(husk_hypervisor::jail::JailSpec {
        uid,
        gid: uid,
        root,
    });
    let mut vm = backend().start(&cfg).expect("starting the jailed VM");
    wait_console(
        vm.as_mut(),
        "the echo guest's ready line",
        "husk vsock: ready",
    );
    let pid = vm.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |f: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(f))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), vec![uid.to_string(); 4], "{status}");
    assert_eq!(field("CapEff:"), ["0000000000000000"], "{status}");
    assert_eq!(field("NoNewPrivs:"), ["1"], "{status}");
    for kind in ["mnt", "net"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{kind}")).unwrap(),
            "{kind}"
        );
    }
    let sock = vm.vsock_socket().expect("a vsock socket").to_path_buf();
    let mut s = vsock::connect(&sock, 1024, DEADLINE).expect("CONNECT 1024 to the jailed VMM");
    echo(&mut s, b"hello through a jailed husk-vmm");
    drop(s);
    let status = vm.stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "husk-vmm exit {status}");
    assert!(!process_alive(pid));
    ids.release("husk-vmm-test");
}

/// The caller's tap, handed over open as the shim does (with a virtio-net header, as it
/// opens them): the synthetic guest's ARP request for the tap's address is answered by the
/// host through it. The tap lives in a network namespace the test makes and deletes.
#[test]
fn a_tap_handed_over_as_an_fd_carries_the_guests_frames() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::process::Command;
    husk_tests::require_root("network namespaces and taps");
    let ns = format!("husk-vmmfd-{}", std::process::id());
    let ip = |args: &[&str]| {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("ip (iproute2)");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    ip(&["netns", "add", &ns]);
    let _del = Del(ns.clone());
    ip(&[
        "-n", &ns, "tuntap", "add", "dev", "hk0", "mode", "tap", "vnet_hdr",
    ]);
    ip(&["-n", &ns, "addr", "add", "10.99.0.1/24", "dev", "hk0"]);
    ip(&["-n", &ns, "link", "set", "hk0", "up"]);
    let link = ip(&["-n", &ns, "link", "show", "hk0"]);
    let at = link.find("link/ether ").unwrap() + "link/ether ".len();
    let tap_mac = link[at..at + 17].to_string();
    // Open the tap from a thread inside the namespace (a thread's netns is its own).
    let path = format!("/run/netns/{ns}");
    let fd = std::thread::spawn(move || {
        let netns = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut ifreq = [0u8; 40];
        ifreq[..3].copy_from_slice(b"hk0");
        ifreq[16..18].copy_from_slice(&(0x0002u16 | 0x1000 | 0x4000).to_ne_bytes());
        // SAFETY: TUNSETIFF (_IOW('T', 202, int)) on the tun file with a 40-byte ifreq.
        let rc = unsafe { nix::libc::ioctl(tun.as_raw_fd(), 0x4004_54ca, ifreq.as_mut_ptr()) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        let raw = std::os::fd::IntoRawFd::into_raw_fd(tun);
        // SAFETY: `raw` was just released by the File above; this OwnedFd owns it now.
        unsafe { OwnedFd::from_raw_fd(raw) }
    })
    .join()
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "net_arp", false);
    cfg.nets = vec![husk_hypervisor::NetConfig {
        tap: std::sync::Arc::new(fd),
        mac: [2, 0, 0, 0, 0, 2],
    }];
    let mut vm = backend()
        .start(&cfg)
        .expect("starting the VM with a tap fd");
    let line = wait_console(vm.as_mut(), "the guest's ARP reply", "husk net:");
    assert_eq!(
        line.trim_end(),
        format!("husk net: arp reply from {tap_mac}")
    );
    let _ = vm.kill();
}
