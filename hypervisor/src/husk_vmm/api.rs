//! A client for husk-vmm's control API: one request per line, one JSON object per line back,
//! always with `"ok"` and, on failure, `"error"` (see `vmm/src/api.rs`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::{Error, Result};

/// How long one request may take (pause waits up to 2 s for every vCPU to stop).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `request` on a fresh connection and returns the reply when it says `"ok": true`.
pub fn request(sock: &Path, request: &str) -> Result<serde_json::Value> {
    let fail = |what: String| Error::Api {
        socket: sock.to_path_buf(),
        request: request.to_string(),
        what,
    };
    let mut s = UnixStream::connect(sock).map_err(|e| {
        fail(format!(
            "cannot connect ({e}) — the VM has ended or is not started"
        ))
    })?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(|e| fail(format!("setting a timeout: {e}")))?;
    writeln!(s, "{request}").map_err(|e| fail(format!("writing: {e}")))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| fail(format!("reading the reply: {e}")))?;
    if line.is_empty() {
        return Err(fail("no reply (the VM ended meanwhile)".into()));
    }
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|e| fail(format!("unreadable reply {line:?}: {e}")))?;
    if v.get("ok") == Some(&serde_json::Value::Bool(true)) {
        Ok(v)
    } else {
        let msg = v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("refused without a reason");
        Err(fail(msg.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve_once(
        reply: &'static str,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        std::thread::JoinHandle<String>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("api.sock");
        let l = UnixListener::bind(&p).unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            (&s).write_all(reply.as_bytes()).unwrap();
            line
        });
        (d, p, h)
    }

    #[test]
    fn ok_reply_is_returned_and_the_request_is_one_line() {
        let (_d, p, h) = serve_once("{\"ok\":true}\n");
        request(&p, "pause").unwrap();
        assert_eq!(h.join().unwrap(), "pause\n");
    }

    #[test]
    fn refusal_carries_the_vmm_error() {
        let (_d, p, h) = serve_once("{\"ok\":false,\"error\":\"not paused\"}\n");
        let e = request(&p, "resume").unwrap_err().to_string();
        h.join().unwrap();
        assert!(
            e.contains("not paused") && e.contains("resume") && e.contains("api.sock"),
            "{e}"
        );
    }

    #[test]
    fn no_socket_says_the_vm_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let e = request(&d.path().join("api.sock"), "pause")
            .unwrap_err()
            .to_string();
        assert!(e.contains("has ended"), "{e}");
    }
}
