//! Linux early boot on husk-vmm: our vmlinux, entered through PVH, prints its banner and
//! echoes the command line on the serial console. The command line masks the CPU
//! features kvm_pvm's instruction emulator cannot run, so this passes on every machine
//! with KVM; on kvm_pvm the kernel dies later (emulation failure), which is expected and
//! why the test stops the VM as soon as the lines it checks have appeared.
//!
//! The kernel is `$HUSK_KERNEL`, else `<workspace>/target/husk/vmlinux`; if neither
//! exists the test fails and says how to get one.

use std::path::PathBuf;
use std::time::Duration;

use husk_tests::vmm::{require_kvm, spawn_vmm, workspace};

const PVM_SAFE_CMDLINE: &str = "earlyprintk=ttyS0 noxsave nopcid noinvpcid \
    clearcpuid=cx16,popcnt,rdrand,rdseed,movbe,abm,bmi1,bmi2,fsgsbase,smap,smep,rdpid,clwb,\
clflushopt,umip,sse4_2,sse4_1";

fn kernel() -> PathBuf {
    let p = std::env::var_os("HUSK_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/husk/vmlinux"));
    assert!(
        p.is_file(),
        "prerequisite missing: guest kernel {} — build it with `cargo xtask setup` or point HUSK_KERNEL at a vmlinux",
        p.display()
    );
    p
}

#[test]
fn linux_prints_its_banner_and_echoes_the_command_line() {
    require_kvm();
    let k = kernel();
    let marker = format!("husk.test={}", std::process::id());
    let cmdline = format!("{PVM_SAFE_CMDLINE} {marker}");
    let mut vm = spawn_vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "256",
        "--rng",
        "--cmdline",
        &cmdline,
    ]);
    let (banner_at, banner) = vm.wait_line("`Linux version`", Duration::from_secs(60), |l| {
        l.starts_with("Linux version ")
    });
    let (_, echoed) = vm.wait_line("`Command line:`", Duration::from_secs(60), |l| {
        l.starts_with("Command line: ")
    });
    println!("{banner}\n`Linux version` after {banner_at:?}");
    assert!(
        echoed.contains("console=ttyS0"),
        "default arguments missing: {echoed}"
    );
    assert!(echoed.ends_with(&marker), "our arguments missing: {echoed}");
    assert!(
        echoed.contains(" virtio_mmio.device=4K@0xd0000000:5 "),
        "virtio-rng not announced: {echoed}"
    );
    // The MP table and memory map reached the kernel too.
    vm.wait_line("the MP table", Duration::from_secs(60), |l| {
        l.starts_with("found SMP MP-table at")
    });
    let status = vm.terminate(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
}
