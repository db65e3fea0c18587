//! The host side of hybrid vsock: reaching a guest's AF_VSOCK port through the VMM's unix
//! socket (the Firecracker / Cloud Hypervisor convention, which vhost-device-vsock's `uds-path`
//! speaks too).
//!
//! The host connects to the socket, writes `CONNECT <port>\n` and reads one line, `OK <n>\n`,
//! where `n` is whatever the backend chose (its own local port; implementations differ, so
//! only the `OK ` prefix is checked). From then on the stream is the guest's connection. If
//! nothing listens on that port in the guest, the backend closes the stream instead.
//!
//! Used by the shim (to reach the agent) and by the tests. Owns no process and no socket file.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors reaching a guest port.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("connecting to the hybrid-vsock socket {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid-vsock handshake for port {port} on {socket}")]
    Handshake {
        socket: PathBuf,
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("guest port {port} on {socket}: the backend answered {answer:?} instead of \"OK …\" — nothing listens on that port in the guest (yet)")]
    Refused {
        socket: PathBuf,
        port: u32,
        answer: String,
    },
    #[error("guest port {port} on {socket}: not reachable within {timeout:?} (last error: {last}) — is the agent running? see the console log")]
    Timeout {
        socket: PathBuf,
        port: u32,
        timeout: Duration,
        last: String,
    },
}

/// Longest answer line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_ANSWER: usize = 64;

/// One attempt: connects and does the handshake. The returned stream has no timeouts set.
pub fn connect(
    socket: &Path,
    port: u32,
    handshake_timeout: Duration,
) -> Result<UnixStream, VsockError> {
    let mut s = UnixStream::connect(socket).map_err(|source| VsockError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    let hs = |source| VsockError::Handshake {
        socket: socket.to_path_buf(),
        port,
        source,
    };
    s.set_read_timeout(Some(handshake_timeout)).map_err(hs)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(hs)?;
    // Byte by byte: anything after the newline already belongs to the guest's stream.
    let mut answer = Vec::with_capacity(16);
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => {
                answer.push(b[0]);
                if answer.len() > MAX_ANSWER {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A reset while reading the answer is the backend turning the port down.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(hs(e)),
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if !answer.starts_with("OK ") {
        return Err(VsockError::Refused {
            socket: socket.to_path_buf(),
            port,
            answer,
        });
    }
    s.set_read_timeout(None).map_err(hs)?;
    Ok(s)
}

/// Retries [`connect`] until it succeeds or `timeout` passes: while the guest boots, the
/// socket may not exist yet and the port may not be listened on.
pub fn connect_retry(
    socket: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, VsockError> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match connect(
            socket,
            port,
            left.max(Duration::from_millis(100))
                .min(Duration::from_secs(5)),
        ) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(VsockError::Timeout {
                    socket: socket.to_path_buf(),
                    port,
                    timeout,
                    last: e.to_string(),
                })
            }
            Err(_) => {}
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    /// A fake backend: answers each connection with `answer`, then echoes.
    fn backend(path: &Path, answer: &'static str) -> std::thread::JoinHandle<String> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let mut w = s;
            // The answer and the first guest bytes in one write: connect must not eat them.
            w.write_all(format!("{answer}guest-hello").as_bytes())
                .unwrap();
            line
        })
    }

    #[test]
    fn handshake_accepts_any_ok_and_keeps_following_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.sock");
        let t = backend(&p, "OK 1073741824\n");
        let mut s = connect(&p, 1024, Duration::from_secs(5)).unwrap();
        let mut buf = [0u8; 11];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"guest-hello");
        assert_eq!(t.join().unwrap(), "CONNECT 1024\n");
    }

    #[test]
    fn refusal_and_timeout_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.sock");
        let t = backend(&p, "FAILURE\n");
        let e = connect(&p, 1024, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("FAILURE") && e.contains("port 1024"), "{e}");
        t.join().unwrap();
        let e = connect_retry(&d.path().join("none.sock"), 1024, Duration::from_millis(50))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("none.sock") && e.contains("not reachable"),
            "{e}"
        );
    }
}
