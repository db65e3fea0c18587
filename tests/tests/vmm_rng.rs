//! virtio-rng end to end: a synthetic guest drives the virtio-mmio transport (probe,
//! feature negotiation, queue setup, notify) and reads random bytes from husk-vmm.

use std::time::Duration;

use husk_tests::vmm::{guest, require_kvm, run_vmm};

const DEADLINE: Duration = Duration::from_secs(30);

fn value<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn guest_negotiates_virtio_rng_and_reads_random_bytes() {
    require_kvm();
    let g = guest("rng");
    let run = run_vmm(&["--kernel", g.to_str().unwrap(), "--rng"], DEADLINE);
    assert!(
        run.status.success(),
        "status {:?}, stderr: {}",
        run.status,
        run.stderr
    );
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("husk rng:"))
        .unwrap_or_else(|| panic!("{}", run.stdout));
    assert!(!line.contains("FAIL"), "{line}");
    assert!(
        line.starts_with("husk rng: len=0x00000010 0x00000010 "),
        "{line}"
    );
    assert_eq!(
        value(line, "bad_len"),
        "0x00000000",
        "a buffer outside RAM must come back empty: {line}"
    );
    assert_eq!(
        value(line, "status"),
        "0x0000000f",
        "device must stay DRIVER_OK: {line}"
    );
    let (a, b) = (value(line, "a"), value(line, "b"));
    assert_eq!((a.len(), b.len()), (32, 32), "{line}");
    assert_ne!(a, b, "two requests returned the same bytes: {line}");
    assert_ne!(a, "0".repeat(32), "{line}");
}

#[test]
fn without_rng_the_window_is_empty_and_the_guest_says_so() {
    require_kvm();
    let g = guest("rng");
    let run = run_vmm(&["--kernel", g.to_str().unwrap()], DEADLINE);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.stdout.trim_end(), "husk rng: FAIL magic");
}
