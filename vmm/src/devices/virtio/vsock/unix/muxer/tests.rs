//! Muxer tests with real unix sockets: host- and guest-initiated connections, data both
//! ways, credit, resets and shutdown.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use super::*;

const GUEST_CID: u64 = 3;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(tag: &str) -> (Dir, Muxer) {
    let d = std::env::temp_dir().join(format!("husk-mux-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let m = Muxer::new(GUEST_CID, &d.join("vsock.sock")).unwrap();
    (Dir(d), m)
}

fn from_guest(op: u16, guest_port: u32, host_port: u32, data: &[u8]) -> Pkt {
    Pkt {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
        data: data.to_vec(),
    }
}

/// Polls the host side until a packet for the guest is ready.
fn next_for_guest(m: &mut Muxer) -> Pkt {
    let start = Instant::now();
    loop {
        m.poll_host();
        if m.has_pending_rx() {
            if let Some(p) = m.recv_pkt(64 * 1024) {
                return p;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no packet for the guest"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn quiet(m: &mut Muxer) {
    std::thread::sleep(Duration::from_millis(20));
    m.poll_host();
    assert!(
        m.recv_pkt(64 * 1024).is_none(),
        "unexpected packet for the guest"
    );
}

/// Host client: connect + CONNECT line; the muxer sends REQUEST; returns (client, local port).
fn host_connect(m: &mut Muxer, guest_port: u32) -> (UnixStream, u32) {
    let mut client = UnixStream::connect(m.path()).unwrap();
    client
        .write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .unwrap();
    let req = next_for_guest(m);
    assert_eq!(
        (req.op, req.dst_port, req.dst_cid, req.src_cid),
        (op::REQUEST, guest_port, GUEST_CID, HOST_CID)
    );
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    (client, req.src_port)
}

#[test]
fn host_initiated_connection_carries_data_both_ways_until_reset() {
    let (_d, mut m) = setup("host");
    let (client, local) = host_connect(&mut m, 1024);
    m.send_pkt(&from_guest(op::RESPONSE, 1024, local, b""));
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {local}\n"));

    (&client).write_all(b"ping").unwrap();
    let rw = next_for_guest(&mut m);
    assert_eq!(
        (rw.op, rw.src_port, rw.dst_port, rw.data.as_slice()),
        (op::RW, local, 1024, &b"ping"[..])
    );

    m.send_pkt(&from_guest(op::RW, 1024, local, b"pong"));
    let mut buf = [0u8; 4];
    reader.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    assert_eq!(m.counters().bytes_to_host, 4);
    assert_eq!(m.counters().bytes_to_guest, 4);

    m.send_pkt(&from_guest(op::RST, 1024, local, b""));
    assert_eq!(m.connection_count(), 0);
    assert_eq!(reader.read(&mut buf).unwrap(), 0, "the host side sees EOF");
}

#[test]
fn guest_initiated_connection_reaches_path_underscore_port() {
    let (d, mut m) = setup("guest");
    let listener = UnixListener::bind(d.0.join("vsock.sock_5000")).unwrap();
    m.send_pkt(&from_guest(op::REQUEST, 40000, 5000, b""));
    let resp = next_for_guest(&mut m);
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (op::RESPONSE, 5000, 40000)
    );
    let (mut server, _) = listener.accept().unwrap();
    m.send_pkt(&from_guest(op::RW, 40000, 5000, b"hello host"));
    let mut buf = [0u8; 10];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    server.write_all(b"hi").unwrap();
    let rw = next_for_guest(&mut m);
    assert_eq!(rw.data, b"hi");
    // Host closes: the guest gets SHUTDOWN.
    drop(server);
    let sd = next_for_guest(&mut m);
    assert_eq!((sd.op, sd.flags), (op::SHUTDOWN, SHUTDOWN_BOTH));
    m.send_pkt(&from_guest(op::RST, 40000, 5000, b""));
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn connecting_to_a_port_nobody_serves_is_reset() {
    let (_d, mut m) = setup("refused");
    m.send_pkt(&from_guest(op::REQUEST, 40000, 6000, b""));
    let rst = next_for_guest(&mut m);
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, 6000, 40000));
    assert_eq!(m.counters().resets_sent, 1);
}

#[test]
fn packets_for_unknown_connections_or_other_cids_are_reset() {
    let (_d, mut m) = setup("unknown");
    m.send_pkt(&from_guest(op::RW, 1, 2, b"stray"));
    assert_eq!(next_for_guest(&mut m).op, op::RST);
    let mut spoofed = from_guest(op::REQUEST, 1, 2, b"");
    spoofed.src_cid = 99;
    m.send_pkt(&spoofed);
    assert_eq!(next_for_guest(&mut m).op, op::RST);
    // A reset is never answered with a reset.
    m.send_pkt(&from_guest(op::RST, 1, 2, b""));
    quiet(&mut m);
}

#[test]
fn the_guest_never_gets_more_than_its_credit() {
    let (_d, mut m) = setup("credit");
    let (client, local) = host_connect(&mut m, 1024);
    let mut resp = from_guest(op::RESPONSE, 1024, local, b"");
    resp.buf_alloc = 3;
    m.send_pkt(&resp);
    let mut line = String::new();
    BufReader::new(client.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    (&client).write_all(b"abcdef").unwrap();
    assert_eq!(next_for_guest(&mut m).data, b"abc");
    quiet(&mut m);
    // The guest consumed the three bytes and says so.
    let mut update = from_guest(op::CREDIT_UPDATE, 1024, local, b"");
    update.buf_alloc = 3;
    update.fwd_cnt = 3;
    m.send_pkt(&update);
    assert_eq!(next_for_guest(&mut m).data, b"def");
}

#[test]
fn credit_request_is_answered_and_bad_greetings_are_dropped() {
    let (_d, mut m) = setup("greet");
    let mut bad = UnixStream::connect(m.path()).unwrap();
    bad.write_all(b"HELLO 1024\n").unwrap();
    for _ in 0..50 {
        m.poll_host();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        m.recv_pkt(64 * 1024).is_none(),
        "a bad greeting never reaches the guest"
    );
    let mut buf = [0u8; 1];
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(bad.read(&mut buf).unwrap(), 0, "a bad greeting is closed");

    let (_client, local) = host_connect(&mut m, 7);
    m.send_pkt(&from_guest(op::RESPONSE, 7, local, b""));
    m.send_pkt(&from_guest(op::CREDIT_REQUEST, 7, local, b""));
    let up = next_for_guest(&mut m);
    assert_eq!((up.op, up.buf_alloc), (op::CREDIT_UPDATE, CONN_BUF_ALLOC));
}

#[test]
fn a_live_socket_path_is_refused_and_the_file_is_removed_on_drop() {
    let (d, m) = setup("inuse");
    let e = Muxer::new(GUEST_CID, m.path()).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    let p = m.path().to_owned();
    drop(m);
    assert!(!p.exists());
    drop(d);
}

#[test]
fn a_reset_flood_without_rx_buffers_stays_bounded() {
    let (_d, mut m) = setup("flood");
    for port in 0..u32::try_from(MAX_CONTROL * 4).unwrap() {
        m.send_pkt(&from_guest(op::RW, port, 1, b"x"));
    }
    assert_eq!(m.control.len(), MAX_CONTROL);
}

#[test]
fn unanswered_host_connections_time_out_and_the_client_sees_eof() {
    let (_d, mut m) = setup("timeout");
    m.set_connect_timeout(Duration::from_millis(50));
    // The guest got the REQUEST but never answers: after the timeout it gets a RST.
    let (delivered, local) = host_connect(&mut m, 1024);
    assert!(m.next_timeout().is_some());
    std::thread::sleep(Duration::from_millis(80));
    let rst = next_for_guest(&mut m);
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, local, 1024));
    delivered
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        (&delivered).read(&mut buf).unwrap(),
        0,
        "the client sees EOF"
    );
    assert_eq!(m.connection_count(), 0);
    assert_eq!(m.next_timeout(), None);

    // The REQUEST never left the queue (no rx buffers): it is withdrawn, no RST follows.
    let mut queued = UnixStream::connect(m.path()).unwrap();
    queued.write_all(b"CONNECT 7\n").unwrap();
    let start = Instant::now();
    while m.connection_count() == 0 {
        m.poll_host();
        assert!(start.elapsed() < Duration::from_secs(5));
    }
    std::thread::sleep(Duration::from_millis(80));
    m.poll_host();
    assert_eq!(m.connection_count(), 0);
    assert!(
        m.recv_pkt(64 * 1024).is_none(),
        "a withdrawn request needs no reset"
    );
    queued
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(queued.read(&mut buf).unwrap(), 0);
}

/// A guest-initiated connection to a host server on `vsock.sock_<host_port>`, answered:
/// returns the server's end and the listener.
fn guest_connect(
    d: &Dir,
    m: &mut Muxer,
    guest_port: u32,
    host_port: u32,
) -> (UnixStream, UnixListener) {
    let listener = UnixListener::bind(d.0.join(format!("vsock.sock_{host_port}"))).unwrap();
    m.send_pkt(&from_guest(op::REQUEST, guest_port, host_port, b""));
    let resp = next_for_guest(m);
    assert_eq!(resp.op, op::RESPONSE);
    let (server, _) = listener.accept().unwrap();
    (server, listener)
}

#[test]
fn a_credit_request_flood_without_rx_buffers_owes_one_update() {
    let (d, mut m) = setup("creditflood");
    let (_server, _l) = guest_connect(&d, &mut m, 40000, 5000);
    // The guest asks 100k times and posts no rx buffer to take a single answer.
    for _ in 0..100_000 {
        m.send_pkt(&from_guest(op::CREDIT_REQUEST, 40000, 5000, b""));
    }
    assert_eq!(m.control.len(), 0, "credit updates never queue");
    assert!(m.has_pending_rx());
    let up = m.recv_pkt(64 * 1024).unwrap();
    assert_eq!(
        (up.op, up.src_port, up.dst_port),
        (op::CREDIT_UPDATE, 5000, 40000)
    );
    assert!(
        m.recv_pkt(64 * 1024).is_none(),
        "one update answers them all"
    );
    assert!(!m.has_pending_rx());
    // A later request is answered again.
    m.send_pkt(&from_guest(op::CREDIT_REQUEST, 40000, 5000, b""));
    assert_eq!(m.recv_pkt(64 * 1024).unwrap().op, op::CREDIT_UPDATE);
}

#[test]
fn connect_and_reset_cycles_without_rx_buffers_stay_bounded() {
    let (d, mut m) = setup("cycle");
    let listener = UnixListener::bind(d.0.join("vsock.sock_5000")).unwrap();
    listener.set_nonblocking(true).unwrap();
    // Each REQUEST is accepted (a RESPONSE is queued), then reset by the guest: the
    // RESPONSEs must not pile up.
    for port in 0..u32::try_from(MAX_CONTROL * 3).unwrap() {
        m.send_pkt(&from_guest(op::REQUEST, port, 5000, b""));
        m.send_pkt(&from_guest(op::RST, port, 5000, b""));
        while listener.accept().is_ok() {}
    }
    assert_eq!(m.connection_count(), 0);
    assert!(m.control.len() <= MAX_CONTROL, "{}", m.control.len());
}

#[test]
fn connections_are_bounded_in_both_directions() {
    let (d, mut m) = setup("maxconn");
    let listener = UnixListener::bind(d.0.join("vsock.sock_5000")).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut port = 0;
    while m.connection_count() < MAX_CONNECTIONS {
        m.send_pkt(&from_guest(op::REQUEST, port, 5000, b""));
        port += 1;
        assert_eq!(m.recv_pkt(64 * 1024).unwrap().op, op::RESPONSE);
        while listener.accept().is_ok() {}
    }
    // One more from the guest is refused...
    m.send_pkt(&from_guest(op::REQUEST, port, 5000, b""));
    let rst = m.recv_pkt(64 * 1024).unwrap();
    assert_eq!((rst.op, rst.dst_port), (op::RST, port));
    assert_eq!(m.connection_count(), MAX_CONNECTIONS);
    // ... and so is one from the host: its client sees EOF, the guest hears nothing.
    let mut client = UnixStream::connect(m.path()).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    client.set_nonblocking(true).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 1];
    loop {
        m.poll_host();
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => panic!("the client got an answer"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no EOF");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(m.connection_count(), MAX_CONNECTIONS);
    // (The servers were dropped: the guest hears SHUTDOWNs, but no REQUEST.)
    while let Some(p) = m.recv_pkt(64 * 1024) {
        assert_ne!(p.op, op::REQUEST);
    }
}

#[test]
fn guest_data_for_a_slow_host_stream_is_bounded_by_our_credit() {
    let (d, mut m) = setup("slowhost");
    // The host server never reads: its socket buffer fills, then our per-connection buffer.
    let (_server, _l) = guest_connect(&d, &mut m, 40000, 5000);
    let chunk = vec![9u8; 64 * 1024];
    let mut sent = 0usize;
    while m.connection_count() == 1 {
        m.send_pkt(&from_guest(op::RW, 40000, 5000, &chunk));
        sent += chunk.len();
        if let Some(c) = m.conns.get(&(5000, 40000)) {
            assert!(c.pending_to_host() <= CONN_BUF_ALLOC as usize);
        }
        assert!(sent < 64 * 1024 * 1024, "the guest was never stopped");
    }
    // The guest overran the credit it was given: the connection is reset.
    assert_eq!(m.recv_pkt(64 * 1024).unwrap().op, op::RST);
}

#[test]
fn clients_that_never_finish_their_greeting_are_bounded() {
    let (_d, mut m) = setup("greetings");
    let clients: Vec<UnixStream> = (0..MAX_HANDSHAKES + 8)
        .map(|_| UnixStream::connect(m.path()).unwrap())
        .collect();
    for _ in 0..20 {
        m.poll_host();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(m.handshakes.len(), MAX_HANDSHAKES);
    // The ones beyond the limit were closed.
    let closed = clients
        .iter()
        .filter(|c| {
            let mut c: &UnixStream = c;
            c.set_nonblocking(true).unwrap();
            matches!(c.read(&mut [0u8; 1]), Ok(0))
        })
        .count();
    assert_eq!(closed, 8);
}

#[test]
fn a_host_server_with_a_full_backlog_is_refused_without_blocking() {
    let (d, mut m) = setup("backlog");
    let listener = UnixListener::bind(d.0.join("vsock.sock_5000")).unwrap();
    // Nobody accepts, and the backlog is as short as it goes.
    // SAFETY: listen(2) on a socket this test owns; calling it again only sets the backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ops = Vec::new();
        for port in 0..8 {
            m.send_pkt(&from_guest(op::REQUEST, port, 5000, b""));
            ops.push(m.recv_pkt(64 * 1024).unwrap().op);
        }
        let _ = tx.send(ops);
    });
    let ops = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a guest connect blocked on a full backlog");
    assert_eq!(ops[0], op::RESPONSE);
    assert_eq!(*ops.last().unwrap(), op::RST, "{ops:?}");
    drop(listener);
}
