//! Missing or wrong input to husk-vmm: one line on stderr naming the thing and the fix,
//! a failing exit status, and no guest started.

use std::time::Duration;

use husk_tests::vmm::{guest, require_kvm, run_vmm, TempDir};

const DEADLINE: Duration = Duration::from_secs(30);

fn one_line_error(args: &[&str], must_contain: &[&str]) {
    let run = run_vmm(args, DEADLINE);
    assert_eq!(
        run.status.code(),
        Some(1),
        "{args:?}: status {:?}",
        run.status
    );
    assert_eq!(run.stdout, "", "{args:?} started a guest");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got {:?}",
        run.stderr
    );
    for needle in must_contain {
        assert!(
            lines[0].contains(needle),
            "{args:?}: {:?} lacks {needle:?}",
            lines[0]
        );
    }
}

#[test]
fn missing_kernel_names_the_file_and_the_flag() {
    require_kvm();
    one_line_error(
        &["--kernel", "/nonexistent/vmlinux"],
        &["/nonexistent/vmlinux", "--kernel"],
    );
}

#[test]
fn non_elf_kernel_says_to_give_the_vmlinux() {
    require_kvm();
    let dir = TempDir::new("vmm-errors");
    let bz = dir.0.join("bzImage");
    std::fs::write(&bz, b"MZ this is not an ELF file").unwrap();
    one_line_error(
        &["--kernel", bz.to_str().unwrap()],
        &["bzImage", "not an ELF", "vmlinux"],
    );
}

#[test]
fn too_little_memory_says_how_much_is_needed() {
    require_kvm();
    let g = guest("hello");
    one_line_error(
        &["--kernel", g.to_str().unwrap(), "--memory", "4"],
        &["4 MiB", "at least", "--memory"],
    );
}

#[test]
fn unwritable_console_log_names_the_path() {
    require_kvm();
    let g = guest("hello");
    one_line_error(
        &[
            "--kernel",
            g.to_str().unwrap(),
            "--console-log",
            "/nonexistent/dir/console.log",
        ],
        &["/nonexistent/dir/console.log", "--console-log"],
    );
}

#[test]
fn missing_initrd_names_the_file() {
    require_kvm();
    let g = guest("hello");
    one_line_error(
        &[
            "--kernel",
            g.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initramfs.cpio",
        ],
        &["/nonexistent/initramfs.cpio", "--initrd"],
    );
}
