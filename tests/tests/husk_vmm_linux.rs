//! Tier 4: our Linux guest (vmlinux + initramfs with the agent as /init) on the husk-vmm
//! backend, through the `Hypervisor` trait: to the agent's ready line, a `Check` to the agent
//! over husk-vmm's hybrid vsock, a virtio-fs share served by the backend's virtiofsd, and a
//! power-off from the console that ends the VM cleanly.
//!
//! Only hardware KVM runs our stock 6.1 kernel on husk-vmm (kvm_pvm emulates its ring-0
//! code and it dies at the first system call, docs/FIELD-NOTES.md), so this is `#[ignore]`d
//! as tier 4: `cargo xtask test` runs it directly on hardware-KVM hosts and, elsewhere, inside
//! an L1 VM under QEMU TCG with emulated AMD SVM, whose kvm_amd is hardware KVM to this test
//! (`xtask/src/nested/`; the summary says `passed (nested, emulated SVM)`).

use std::time::Duration;

use husk_hypervisor::console::wait_for_ready;
use husk_hypervisor::host::{self, HostKind};
use husk_hypervisor::husk_vmm::HuskVmm;
use husk_hypervisor::{Hypervisor, VmConfig};
use husk_tests::agent::Agent;
use husk_tests::{initramfs, kernel, process_alive, require_root};

/// Natively our kernel reaches the agent in well under a second; leave room for a loaded host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
#[ignore = "tier 4: needs hardware KVM (VT-x/AMD-V); this host's /dev/kvm is kvm_pvm or missing, where our stock Linux guest cannot run on husk-vmm"]
fn linux_guest_on_husk_vmm_reaches_the_agent_over_vsock() {
    let report = host::detect();
    assert!(
        matches!(report.kind, HostKind::HardwareKvm { .. }),
        "this test needs hardware KVM (VT-x/AMD-V); this host is {:?}: {}",
        report.kind,
        report.why
    );
    require_root("virtiofsd's namespace sandbox needs root");
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let cfg = VmConfig {
        kernel: kernel(),
        initramfs: initramfs(),
        cmdline_extra: String::new(),
        vcpus: 2,
        memory_mib: 256,
        state_dir: dir.path().to_path_buf(),
        shared_dir: Some(shared),
        vsock: true,
        nets: Vec::new(),
        jail: None,
    };
    let hv = HuskVmm::with_program(husk_tests::vmm::vmm_binary()).expect("husk-vmm backend");
    let mut vm = hv.start(&cfg).expect("starting the VM on husk-vmm");
    let console = |vm: &dyn husk_hypervisor::Vm| {
        std::fs::read_to_string(vm.console_log()).unwrap_or_default()
    };
    let ready = wait_for_ready(vm.as_mut(), BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("agent ready line: {e}; console:\n{}", console(vm.as_ref())));
    assert!(ready.kernel_release.starts_with("6.1."), "{ready:?}");
    assert_eq!(ready.vcpus, 2, "{ready:?}");

    let sock = vm.vsock_socket().expect("vsock socket").to_path_buf();
    let agent = Agent::connect_vsock(&sock, Duration::from_secs(10));
    let check = agent.check();
    assert_eq!(check.api_version, husk_protocols::API_VERSION);
    assert_eq!(check.agent_version, env!("CARGO_PKG_VERSION"));
    drop(agent);

    let pid = vm.pid();
    vm.console_write(b"poweroff\n").unwrap();
    let status = vm
        .wait(Some(Duration::from_secs(30)))
        .unwrap()
        .expect("the VM ended after poweroff");
    assert!(
        status.success(),
        "husk-vmm exit {status}; console:\n{}",
        console(vm.as_ref())
    );
    assert!(!process_alive(pid));
    assert!(!dir.path().join("api.sock").exists() && !dir.path().join("vsock.sock").exists());
}
