//! HTTP/1.0 `GET /` from the node to a pod: the client side of every "HTTP into the pod"
//! test (a CNI pod's address, a pooled pod, the port-forward path inside the pod's netns).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// `GET /` to `addr`: the whole answer (status line, headers, body). `patience` bounds the
/// connect; the read may take twice as long.
pub fn get(addr: SocketAddr, patience: Duration) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, patience)?;
    s.set_read_timeout(Some(patience * 2))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut v = Vec::new();
    s.read_to_end(&mut v)?;
    Ok(v)
}

/// [`get`] retried until the answer contains `want` (the pod boots and starts its server),
/// failing the test after `timeout` with the last answer or error.
pub fn get_until(addr: SocketAddr, want: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match get(addr, Duration::from_secs(5)) {
            Ok(b) if String::from_utf8_lossy(&b).contains(want) => {
                return String::from_utf8_lossy(&b).into_owned()
            }
            Ok(b) => last = String::from_utf8_lossy(&b).into_owned(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("http://{addr}/ did not answer with {want:?} within {timeout:?}; last: {last}");
}

/// [`get`] to 127.0.0.1:`port` inside the network namespace at `netns` — as containerd
/// 1.6's CRI PortForward dials, from a thread that entered the netns.
pub fn get_in_netns(netns: &Path, port: u16) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(netns)?;
    std::thread::spawn(move || {
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        get(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(5),
        )
    })
    .join()
    .expect("the netns thread panicked")
}
