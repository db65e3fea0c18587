//! The qemu backend's vhost-user devices: virtiofsd and vhost-device-vsock start with the VM,
//! the hybrid-vsock socket is exposed, a helper's crash stops the VM with a named error, and
//! every end path leaves no helper process and no socket behind.

use std::path::Path;
use std::time::Duration;

use husk_hypervisor::console::wait_for_ready;
use husk_hypervisor::host;
use husk_hypervisor::qemu::Qemu;
use husk_hypervisor::{Error, Hypervisor, VmConfig};
use husk_tests::procs::children_named;
use husk_tests::{initramfs, kernel, process_alive, require_program, require_root};

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

fn config(dir: &Path) -> VmConfig {
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    VmConfig {
        kernel: kernel(),
        initramfs: initramfs(),
        cmdline_extra: String::new(),
        vcpus: 1,
        memory_mib: 256,
        state_dir: dir.to_path_buf(),
        shared_dir: Some(shared),
        vsock: true,
        nets: Vec::new(),
        jail: None,
    }
}

fn backend() -> Qemu {
    require_root("virtiofsd's namespace sandbox needs root");
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let accel = host::detect().backend.qemu_accel();
    Qemu::new(accel).expect("qemu backend")
}

fn no_sockets_left(dir: &Path) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".sock"))
        .collect();
    assert!(
        left.is_empty(),
        "sockets left in {}: {left:?}",
        dir.display()
    );
}

/// Both helpers run while the VM runs; the test (their parent) sees them. Tests in this file
/// run one at a time (a mutex), or they would see each other's helpers.
fn helpers() -> (Vec<u32>, Vec<u32>) {
    (
        children_named("virtiofsd"),
        children_named("vhost-device-vs"),
    )
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn helpers_start_with_the_vm_and_end_with_stop() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut vm = backend()
        .start(&config(dir.path()))
        .expect("starting the VM with devices");
    let (fs, vs) = helpers();
    assert_eq!(
        (fs.len(), vs.len()),
        (1, 1),
        "one virtiofsd and one vhost-device-vsock"
    );
    let sock = vm.vsock_socket().expect("vsock socket").to_path_buf();
    assert_eq!(sock, dir.path().join("vsock.sock"));
    wait_for_ready(vm.as_mut(), BOOT_TIMEOUT).expect("agent ready with the devices attached");
    let qemu = vm.pid();
    vm.stop(Duration::from_secs(10)).unwrap();
    for pid in fs.iter().chain(&vs).chain([&qemu]) {
        assert!(!process_alive(*pid), "process {pid} survived stop");
    }
    assert_eq!(helpers(), (vec![], vec![]));
    no_sockets_left(dir.path());
}

#[test]
fn a_crashed_vsock_helper_stops_the_vm_with_a_named_error() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut vm = backend().start(&config(dir.path())).unwrap();
    wait_for_ready(vm.as_mut(), BOOT_TIMEOUT).unwrap();
    let (fs, vs) = helpers();
    assert_eq!(vs.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vs[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let qemu = vm.pid();
    match vm.wait(Some(Duration::from_secs(30))) {
        Err(Error::HelperExited { program, .. }) => assert_eq!(program, "vhost-device-vsock"),
        other => panic!("expected HelperExited, got {other:?}"),
    }
    assert!(!process_alive(qemu), "QEMU survived its helper's crash");
    for pid in &fs {
        assert!(!process_alive(*pid), "virtiofsd {pid} survived");
    }
    no_sockets_left(dir.path());
}

#[test]
fn dropping_the_vm_ends_the_helpers() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let vm = backend().start(&config(dir.path())).unwrap();
    let (fs, vs) = helpers();
    drop(vm);
    for pid in fs.iter().chain(&vs) {
        assert!(!process_alive(*pid), "helper {pid} survived drop");
    }
    no_sockets_left(dir.path());
}

#[test]
fn a_crashed_virtiofsd_stops_the_vm_too() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut vm = backend().start(&config(dir.path())).unwrap();
    wait_for_ready(vm.as_mut(), BOOT_TIMEOUT).unwrap();
    let (fs, vs) = helpers();
    assert_eq!(fs.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fs[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    match vm.wait(Some(Duration::from_secs(30))) {
        Err(Error::HelperExited { program, .. }) => assert_eq!(program, "virtiofsd"),
        other => panic!("expected HelperExited, got {other:?}"),
    }
    for pid in &vs {
        assert!(!process_alive(*pid), "vhost-device-vsock {pid} survived");
    }
    no_sockets_left(dir.path());
}
