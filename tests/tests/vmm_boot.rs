//! Tier 2: husk-vmm boots synthetic guests under real KVM through the same ELF/PVH path as
//! Linux, and they see what the VMM handed over (vCPUs, RAM, command line).

use std::time::Duration;

use husk_tests::vmm::{guest, require_kvm, run_vmm, TempDir};

const DEADLINE: Duration = Duration::from_secs(30);

fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn hello_guest_prints_on_com1_and_resets_with_status_0() {
    require_kvm();
    let g = guest("hello");
    let run = run_vmm(&["--kernel", s(&g)], DEADLINE);
    assert!(
        run.status.success(),
        "status {:?}, stderr: {}",
        run.status,
        run.stderr
    );
    assert_eq!(run.stdout, "husk guest: hello\n");
    assert_eq!(run.stderr, "");
    println!(
        "hello guest: first serial byte after {:?}, exit after {:?}",
        run.first_byte.expect("a byte was printed"),
        run.total
    );
}

/// Parses `key=0x...` out of the sysinfo guest's line.
fn field(line: &str, key: &str) -> u64 {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=0x")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    u64::from_str_radix(v, 16).unwrap_or_else(|e| panic!("{key}={v}: {e}"))
}

fn sysinfo(vcpus: u8, memory_mib: u64, extra: &str) -> String {
    let g = guest("sysinfo");
    let (v, m) = (vcpus.to_string(), memory_mib.to_string());
    let run = run_vmm(
        &[
            "--kernel",
            s(&g),
            "--vcpus",
            &v,
            "--memory",
            &m,
            "--cmdline",
            extra,
        ],
        DEADLINE,
    );
    assert!(
        run.status.success(),
        "status {:?}, stderr: {}",
        run.status,
        run.stderr
    );
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("husk sysinfo:"))
        .unwrap_or_else(|| panic!("no sysinfo line in {:?}", run.stdout));
    assert!(!line.contains("bad boot information"), "{line}");
    line.to_owned()
}

/// RAM the PVH memory map reports: everything but the legacy hole [EBDA, 1 MiB).
fn expected_ram(memory_mib: u64) -> u64 {
    (memory_mib << 20) - (0x10_0000 - 0x9_fc00)
}

#[test]
fn sysinfo_guest_sees_the_vcpus_memory_and_cmdline_handed_over() {
    require_kvm();
    for (vcpus, mib) in [(1u8, 32u64), (2, 128), (4, 256)] {
        let line = sysinfo(vcpus, mib, "husk.marker=sysinfo");
        assert_eq!(
            field(&line, "mp_cpus"),
            u64::from(vcpus),
            "MP table: {line}"
        );
        assert_eq!(
            field(&line, "cpuid_cpus"),
            u64::from(vcpus),
            "CPUID: {line}"
        );
        assert_eq!(field(&line, "ram"), expected_ram(mib), "PVH memmap: {line}");
        assert!(
            line.contains("console=ttyS0"),
            "default cmdline missing: {line}"
        );
        assert!(
            line.ends_with(" husk.marker=sysinfo>"),
            "extra cmdline missing: {line}"
        );
    }
}

#[test]
fn ram_beyond_the_mmio_hole_is_mapped_above_4gib() {
    require_kvm();
    // 4 GiB of RAM: 3 GiB below the hole, 1 GiB above 4 GiB (the memfd is sparse).
    let line = sysinfo(1, 4096, "x");
    assert_eq!(field(&line, "ram"), expected_ram(4096), "{line}");
}

#[test]
fn elf_without_pvh_note_boots_through_the_64_bit_protocol() {
    require_kvm();
    let g = guest("boot64");
    let run = run_vmm(
        &["--kernel", s(&g), "--cmdline", "husk.marker=boot64"],
        DEADLINE,
    );
    assert!(
        run.status.success(),
        "status {:?}, stderr: {}",
        run.status,
        run.stderr
    );
    let line = run.stdout.lines().next().unwrap_or_default();
    assert!(
        line.starts_with("husk boot64: e820=0x00000002 cmdline=<console=ttyS0"),
        "{line}"
    );
    assert!(line.ends_with("husk.marker=boot64>"), "{line}");
}

#[test]
fn cmdline_replace_hands_over_exactly_the_given_line() {
    require_kvm();
    let g = guest("sysinfo");
    let run = run_vmm(
        &[
            "--kernel",
            s(&g),
            "--cmdline",
            "only=this",
            "--cmdline-replace",
        ],
        DEADLINE,
    );
    assert!(run.status.success(), "{}", run.stderr);
    assert!(run.stdout.contains("cmdline=<only=this>"), "{}", run.stdout);
}

#[test]
fn console_log_receives_serial_output_and_stdout_stays_quiet() {
    require_kvm();
    let dir = TempDir::new("vmm-console");
    let log = dir.0.join("console.log");
    let g = guest("hello");
    let run = run_vmm(&["--kernel", s(&g), "--console-log", s(&log)], DEADLINE);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.stdout, "");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "husk guest: hello\n"
    );

    let both = run_vmm(
        &[
            "--kernel",
            s(&g),
            "--console-log",
            s(&log),
            "--console-stdout",
        ],
        DEADLINE,
    );
    assert!(both.status.success(), "{}", both.stderr);
    assert_eq!(both.stdout, "husk guest: hello\n");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "husk guest: hello\nhusk guest: hello\n"
    );
}

#[test]
fn application_processors_come_up_on_init_sipi_sipi() {
    require_kvm();
    let g = guest("smp");
    for vcpus in [1u8, 2, 4] {
        let v = vcpus.to_string();
        let run = run_vmm(&["--kernel", s(&g), "--vcpus", &v], DEADLINE);
        assert!(
            run.status.success(),
            "status {:?}, stderr: {}",
            run.status,
            run.stderr
        );
        let line = run.stdout.lines().next().unwrap_or_default();
        assert_eq!(field(line, "cpus"), u64::from(vcpus), "{line}");
        assert_eq!(
            field(line, "aps_up"),
            u64::from(vcpus - 1),
            "not every AP ran: {line}"
        );
    }
}

#[test]
fn console_input_on_stdin_reaches_the_guest() {
    use std::io::Write;
    require_kvm();
    let g = guest("serial_echo");
    let mut vm =
        husk_tests::vmm::spawn_vmm_with_stdin(&["--kernel", s(&g)], std::process::Stdio::piped());
    vm.wait_line("the ready line", DEADLINE, |l| l == "husk serial: ready");
    // More than the UART's FIFO holds, so the input thread must wait for the guest.
    let line = format!("typed on the host {}\n", "x".repeat(150));
    vm.child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(line.as_bytes())
        .unwrap();
    let (_, got) = vm.wait_line("the echoed line", DEADLINE, |l| {
        l.starts_with("husk serial: got ")
    });
    assert_eq!(got, format!("husk serial: got {}", line.trim_end()));
    assert_eq!(vm.wait_exit(DEADLINE).code(), Some(0));
}
