//! Hybrid vsock end to end: a synthetic guest runs a virtio-vsock echo server; the host
//! talks to it through husk-vmm's unix socket (`CONNECT <port>\n` → `OK <port>\n`), over
//! several connections at once, with payloads larger than the guest's 4 KiB credit;
//! and a synthetic guest client connects out to a host unix socket `<path>_<port>`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use husk_tests::vmm::{guest, require_kvm, run_vmm, spawn_vmm, Running, TempDir};

fn start(dir: &TempDir, extra: &[&str]) -> (Running, std::path::PathBuf) {
    let sock = dir.0.join("vsock.sock");
    let g = guest("vsock_echo");
    let mut args = vec![
        "--kernel",
        g.to_str().unwrap(),
        "--vsock-sock",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = spawn_vmm(&refs);
    vm.wait_line(
        "the echo guest's ready line",
        Duration::from_secs(30),
        |l| l == "husk vsock: ready",
    );
    (vm, sock)
}

/// Connects through the hybrid socket to guest `port`; returns the stream after `OK`.
fn connect(sock: &Path, port: u32) -> UnixStream {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    // Read the reply byte by byte so no echoed data is taken with it.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b).expect("reading the OK line");
        line.push(b[0]);
    }
    let line = String::from_utf8(line).unwrap();
    assert!(
        line.starts_with("OK ") && line.trim_end()[3..].parse::<u32>().is_ok(),
        "{line:?}"
    );
    s
}

fn echo(s: &mut UnixStream, payload: &[u8]) {
    let mut writer = s.try_clone().unwrap();
    let data = payload.to_vec();
    // Write from another thread: the echo comes back while we are still sending.
    let w = std::thread::spawn(move || writer.write_all(&data).unwrap());
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got).expect("reading the echo");
    w.join().unwrap();
    assert!(got == payload, "echo differs");
}

#[test]
fn hybrid_vsock_echoes_over_several_connections_at_once() {
    require_kvm();
    let dir = TempDir::new("vmm-vsock");
    let (mut vm, sock) = start(&dir, &[]);
    let workers: Vec<_> = (0..8u8)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = connect(&sock, 1024 + u32::from(i));
                echo(&mut s, format!("hello from connection {i}").as_bytes());
                // 48 KiB: twelve times the guest's credit, so credit updates must flow; eight
                // connections share the guest's eight rx buffers.
                let big: Vec<u8> = (0..48 * 1024u32)
                    .map(|n| u8::try_from(n % 251).unwrap() ^ i)
                    .collect();
                echo(&mut s, &big);
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a connection failed");
    }
    let status = vm.terminate(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "the vsock socket must be removed on exit");
}

#[test]
fn closed_connections_are_cleaned_up_and_counted() {
    require_kvm();
    let dir = TempDir::new("vmm-vsock-close");
    let api = dir.0.join("api.sock");
    let (mut vm, sock) = start(&dir, &["--api-sock", api.to_str().unwrap()]);
    for round in 0..3 {
        let mut s = connect(&sock, 1024);
        echo(&mut s, format!("round {round}").as_bytes());
        // Host closes: the guest gets SHUTDOWN and answers RST.
    }
    let mut s = connect(&sock, 2048);
    echo(&mut s, b"still serving");
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    let mut c = UnixStream::connect(&api).unwrap();
    writeln!(c, "counters").unwrap();
    let mut reply = String::new();
    BufReader::new(c).read_line(&mut reply).unwrap();
    let count = |key: &str| -> u64 {
        let at = reply
            .find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("no {key} in {reply}"));
        reply[at + key.len() + 3..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    assert_eq!(count("connections"), 4, "{reply}");
    assert_eq!(count("bytes_to_host"), count("bytes_to_guest"), "{reply}");
    assert_eq!(count("bad_descriptors"), 0, "{reply}");
    assert_eq!(vm.terminate(Duration::from_secs(5)).code(), Some(0));
}

#[test]
fn a_taken_vsock_socket_path_is_refused_in_one_line() {
    require_kvm();
    let dir = TempDir::new("vmm-vsock-taken");
    let (mut first, sock) = start(&dir, &[]);
    let g = guest("vsock_echo");
    let second = run_vmm(
        &[
            "--kernel",
            g.to_str().unwrap(),
            "--vsock-sock",
            sock.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(second.status.code(), Some(1));
    assert_eq!(second.stderr.lines().count(), 1, "{}", second.stderr);
    assert!(
        second.stderr.contains("in use") && second.stderr.contains("--vsock-sock"),
        "{}",
        second.stderr
    );
    // The first VMM still serves.
    let mut s = connect(&sock, 1024);
    echo(&mut s, b"first is fine");
    assert_eq!(first.terminate(Duration::from_secs(5)).code(), Some(0));
}

#[test]
fn guest_connections_reach_the_unix_socket_path_underscore_port() {
    require_kvm();
    let dir = TempDir::new("vmm-vsock-guest");
    let sock = dir.0.join("vsock.sock");
    let listener = std::os::unix::net::UnixListener::bind(dir.0.join("vsock.sock_5000")).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = [0u8; 21];
        s.read_exact(&mut got).unwrap();
        s.write_all(b"hello from the host").unwrap();
        // The guest shuts down: we see EOF.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        (got, rest)
    });
    let g = guest("vsock_client");
    let run = run_vmm(
        &[
            "--kernel",
            g.to_str().unwrap(),
            "--vsock-sock",
            sock.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert!(run.status.success(), "{:?} {}", run.status, run.stderr);
    assert_eq!(run.stdout, "husk vsock-client: got hello from the host");
    let (got, rest) = server.join().unwrap();
    assert_eq!(&got, b"hello from the guest\n");
    assert!(rest.is_empty());
    assert!(!sock.exists());
}

#[test]
fn a_guest_connection_nobody_serves_is_refused() {
    require_kvm();
    let dir = TempDir::new("vmm-vsock-refused");
    let sock = dir.0.join("vsock.sock");
    let g = guest("vsock_client");
    let run = run_vmm(
        &[
            "--kernel",
            g.to_str().unwrap(),
            "--vsock-sock",
            sock.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert!(run.status.success(), "{:?} {}", run.status, run.stderr);
    assert_eq!(run.stdout, "husk vsock-client: refused\n");
}

#[test]
fn a_host_connection_the_guest_never_answers_ends_in_eof() {
    require_kvm();
    let dir = TempDir::new("vmm-vsock-noanswer");
    let sock = dir.0.join("vsock.sock");
    let g = guest("idle"); // no vsock driver: nobody will answer
    let mut vm = spawn_vmm(&[
        "--kernel",
        g.to_str().unwrap(),
        "--vsock-sock",
        sock.to_str().unwrap(),
    ]);
    vm.wait_line("the idle guest", Duration::from_secs(30), |l| {
        l == "husk idle: ready"
    });
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(s, "CONNECT 1024").unwrap();
    let start = std::time::Instant::now();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).expect("EOF, not a read timeout"), 0);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(vm.terminate(Duration::from_secs(5)).code(), Some(0));
}
