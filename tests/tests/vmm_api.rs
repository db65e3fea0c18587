//! The control API on a unix socket, against a running guest: pause stops the guest's
//! progress, resume restarts it, counters reflect what the guest did, shutdown ends the
//! VMM with status 0 and removes the socket; a taken socket path is refused in one line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::vmm::{guest, require_kvm, run_vmm, spawn_vmm, Running, TempDir};

fn request(sock: &Path, req: &str) -> String {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.trim_end().to_owned()
}

/// The number after `"key":` in a JSON reply (first occurrence).
fn number(reply: &str, key: &str) -> u64 {
    let at = reply
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("no {key} in {reply}"));
    reply[at + key.len() + 3..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

fn wait_for_socket(p: &Path) {
    let start = Instant::now();
    while UnixStream::connect(p).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "api socket {} never came up",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Lines the guest prints within `window`, after draining what was already in flight.
fn ticks_within(vm: &mut Running, window: Duration) -> usize {
    let before = vm.seen.len();
    let end = Instant::now() + window;
    while Instant::now() < end {
        if vm
            .try_line(end.saturating_duration_since(Instant::now()))
            .is_none()
        {
            break;
        }
    }
    vm.seen.len() - before
}

#[test]
fn pause_resume_counters_and_shutdown_over_the_api_socket() {
    require_kvm();
    let dir = TempDir::new("vmm-api");
    let sock = dir.0.join("api.sock");
    let g = guest("ticker");
    let mut vm = spawn_vmm(&[
        "--kernel",
        g.to_str().unwrap(),
        "--vcpus",
        "2",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    vm.wait_line("a first tick", Duration::from_secs(30), |l| {
        l.starts_with("husk tick ")
    });
    wait_for_socket(&sock);
    assert_eq!(request(&sock, "state"), r#"{"ok":true,"state":"running"}"#);

    assert_eq!(request(&sock, "pause"), r#"{"ok":true}"#);
    assert_eq!(request(&sock, "state"), r#"{"ok":true,"state":"paused"}"#);
    ticks_within(&mut vm, Duration::from_millis(200)); // drain lines already in the pipe
    let paused_ticks = ticks_within(&mut vm, Duration::from_millis(700));
    assert_eq!(paused_ticks, 0, "the guest kept running while paused");
    let bytes_paused = number(&request(&sock, "counters"), "bytes_out");

    assert_eq!(request(&sock, "resume"), r#"{"ok":true}"#);
    vm.wait_line("a tick after resume", Duration::from_secs(10), |l| {
        l.starts_with("husk tick ")
    });
    let counters = request(&sock, "counters");
    assert!(
        counters.contains(r#""ok":true"#) && counters.contains(r#""counters":{"#),
        "{counters}"
    );
    assert!(number(&counters, "bytes_out") > bytes_paused, "{counters}");
    assert!(
        number(&counters, "pio") >= number(&counters, "bytes_out"),
        "every byte is a PIO exit: {counters}"
    );

    assert!(request(&sock, "reboot").contains(r#""ok":false"#));
    assert_eq!(request(&sock, "shutdown"), r#"{"ok":true}"#);
    let status = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!sock.exists(), "the api socket must be removed on exit");
}

#[test]
fn a_taken_api_socket_path_is_refused_in_one_line() {
    require_kvm();
    let dir = TempDir::new("vmm-api-taken");
    let sock = dir.0.join("api.sock");
    let g = guest("idle");
    let mut first = spawn_vmm(&[
        "--kernel",
        g.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    first.wait_line("the idle guest", Duration::from_secs(30), |l| {
        l == "husk idle: ready"
    });
    wait_for_socket(&sock);
    let second = run_vmm(
        &[
            "--kernel",
            g.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(second.status.code(), Some(1));
    assert_eq!(second.stderr.lines().count(), 1, "{}", second.stderr);
    assert!(
        second.stderr.contains("in use") && second.stderr.contains("--api-sock"),
        "{}",
        second.stderr
    );
    assert!(
        sock.exists(),
        "the refused VMM must leave the other's socket alone"
    );
    let status = first.terminate(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists());
}
