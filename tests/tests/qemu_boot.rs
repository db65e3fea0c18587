//! Tier 3 (the guest on the best backend this host offers): our vmlinux + initramfs boot
//! through `husk-hypervisor`'s qemu backend to the agent's ready line; the guest sees the
//! vCPUs and memory asked for; the VM powers off on request and on its timeout; stop and kill
//! leave no process or socket behind.

use std::path::Path;
use std::time::Duration;

use husk_hypervisor::console::{wait_for_ready, ReadyLine};
use husk_hypervisor::host;
use husk_hypervisor::qemu::Qemu;
use husk_hypervisor::{Hypervisor, Vm, VmConfig};
use husk_tests::{initramfs, kernel, process_alive, require_program};

/// TCG boots our kernel in ~1 s here; leave room for a loaded 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

fn backend() -> Qemu {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let accel = host::detect().backend.qemu_accel();
    Qemu::new(accel).expect("qemu backend")
}

fn config(dir: &Path, vcpus: u32, memory_mib: u32, extra: &str) -> VmConfig {
    VmConfig {
        kernel: kernel(),
        initramfs: initramfs(),
        cmdline_extra: extra.into(),
        vcpus,
        memory_mib,
        state_dir: dir.to_path_buf(),
        shared_dir: None,
        vsock: false,
        nets: Vec::new(),
        jail: None,
    }
}

fn boot(dir: &Path, vcpus: u32, mem: u32, extra: &str) -> (Box<dyn Vm>, ReadyLine) {
    let mut vm = backend()
        .start(&config(dir, vcpus, mem, extra))
        .expect("starting the VM");
    let ready = wait_for_ready(vm.as_mut(), BOOT_TIMEOUT).expect("agent ready line");
    (vm, ready)
}

fn console(vm: &dyn Vm) -> String {
    std::fs::read_to_string(vm.console_log()).unwrap_or_default()
}

#[test]
fn guest_boots_to_agent_ready_and_powers_off_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, ready) = boot(dir.path(), 1, 256, "");
    assert!(ready.kernel_release.starts_with("6.1."), "{ready:?}");
    assert_eq!(ready.agent_version, env!("CARGO_PKG_VERSION"));
    let pid = vm.pid();
    vm.console_write(b"poweroff\n").unwrap();
    let status = vm
        .wait(Some(Duration::from_secs(60)))
        .unwrap()
        .expect("VM ended after poweroff");
    assert!(
        status.success(),
        "QEMU exit {status}; console:\n{}",
        console(vm.as_ref())
    );
    assert!(console(vm.as_ref()).contains("powering off: poweroff requested on the console"));
    assert!(!process_alive(pid));
    assert!(!dir.path().join("qmp.sock").exists() && !dir.path().join("console.sock").exists());
}

#[test]
fn guest_sees_the_vcpus_and_memory_asked_for_and_honours_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, ready) = boot(dir.path(), 2, 384, "husk.timeout=3");
    assert_eq!(ready.vcpus, 2, "{ready:?}");
    // MemTotal is RAM less what the kernel keeps for itself (a few MiB for this kernel).
    let asked_kib = 384 * 1024;
    assert!(
        ready.mem_total_kib <= asked_kib && ready.mem_total_kib > asked_kib - 48 * 1024,
        "guest MemTotal {} KiB for {asked_kib} KiB asked",
        ready.mem_total_kib
    );
    let status = vm
        .wait(Some(Duration::from_secs(60)))
        .unwrap()
        .expect("VM ended on its own");
    assert!(status.success());
    assert!(console(vm.as_ref()).contains("husk.timeout=3 expired"));
}

#[test]
fn pause_resume_stop_and_kill_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, _) = boot(dir.path(), 1, 128, "");
    vm.pause().unwrap();
    vm.resume().unwrap();
    let pid = vm.pid();
    vm.stop(Duration::from_secs(10)).unwrap();
    assert!(!process_alive(pid), "QEMU {pid} survived stop");
    assert!(!dir.path().join("qmp.sock").exists() && !dir.path().join("console.sock").exists());
    assert!(vm.pause().is_err(), "pause after stop must fail, not hang");

    let dir = tempfile::tempdir().unwrap();
    let mut vm = backend().start(&config(dir.path(), 1, 128, "")).unwrap();
    let pid = vm.pid();
    vm.kill().unwrap();
    assert!(!process_alive(pid), "QEMU {pid} survived kill");
    assert!(!dir.path().join("qmp.sock").exists());

    // Dropping a running VM kills and reaps it too.
    let dir = tempfile::tempdir().unwrap();
    let vm = backend().start(&config(dir.path(), 1, 128, "")).unwrap();
    let pid = vm.pid();
    drop(vm);
    assert!(!process_alive(pid), "QEMU {pid} survived drop");
}

#[test]
fn bad_input_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), 1, 256, "");
    c.kernel = dir.path().join("no-vmlinux");
    let e = backend().start(&c).unwrap_err().to_string();
    assert!(
        e.contains("no-vmlinux") && e.contains("cargo xtask kernel"),
        "{e}"
    );
    let mut c = config(dir.path(), 1, 16, "");
    let e = backend().start(&c).unwrap_err().to_string();
    assert!(e.contains("16 MiB") && e.contains("at least"), "{e}");
    c.memory_mib = 256;
    c.vcpus = 0;
    assert!(backend()
        .start(&c)
        .unwrap_err()
        .to_string()
        .contains("vcpus"));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created"
    );
}
