//! Stdio of one process: containerd's fifos on the host side, the agent's stdio RPCs on the
//! guest side (see `husk-protocols` for why RPCs).
//!
//! - stdout/stderr: a thread per stream long-polls `ReadStdout`/`ReadStderr` and writes what
//!   arrives to the fifo, byte for byte, until the agent says `eof`. If the fifo's reader has
//!   gone, output is still drained (and dropped) so the process never blocks on a full pipe.
//! - stdin: a thread reads the fifo and calls `WriteStdin`; EOF on the fifo becomes
//!   `CloseStdin`, so EOF reaches the process.
//! - the waiter calls `WaitProcess`, then joins the output threads: the exit is reported only
//!   after all output has been written. (A stream a leftover background process holds open
//!   still ends: the agent ends it once the process has ended and the stream is drained.) The
//!   fifos are closed when containerd deletes the process ([`Outputs::close`]) in any case.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use husk_protocols::agent::{
    ProcessRef, ReadStreamRequest, WaitProcessResponse, WriteStdinRequest,
};
use husk_protocols::agent_ttrpc::AgentClient;

use crate::agent::{describe, long_poll, short};

/// The fifos containerd gave for a process (empty: none).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The host ends (fifos) of a process's output relays.
#[derive(Debug, Default)]
pub struct Outputs {
    fifos: Vec<Arc<Mutex<Option<File>>>>,
}

impl Outputs {
    /// Closes the fifos: output that still arrives is dropped, and the fifos' reader sees EOF.
    pub fn close(&self) {
        for f in &self.fifos {
            f.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

/// Opens an output fifo for writing, without waiting for a reader: containerd and ctr open
/// the read ends before the task is created, so a fifo without a reader at Start has lost it
/// (`ctr run -d` exits right after Start) and `None` (drop the output) is the answer. A
/// blocking open would wait for a reader that never comes, and with it the exit of the
/// process, which is reported after its output. The fd is made blocking again for the writes.
fn open_output_fifo(path: &str) -> std::io::Result<Option<File>> {
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => {
            use std::os::fd::AsRawFd;
            // SAFETY: F_GETFL/F_SETFL on an fd we own, integer arguments.
            unsafe {
                let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
                if flags < 0
                    || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(Some(f))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            log::debug!("{path}: no reader (a detached client); this output is dropped");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn relay_output(
    client: AgentClient,
    cid: String,
    eid: String,
    stream: Stream,
    path: String,
    fifo_slot: Arc<Mutex<Option<File>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let fifo = if path.is_empty() {
            None
        } else {
            open_output_fifo(&path).unwrap_or_else(|e| {
                log::warn!("{cid}/{eid}: opening {path}: {e}; output is dropped");
                None
            })
        };
        *fifo_slot.lock().unwrap_or_else(|e| e.into_inner()) = fifo;
        let req = ReadStreamRequest {
            container_id: cid.clone(),
            exec_id: eid.clone(),
            max_len: 0,
            ..Default::default()
        };
        loop {
            let resp = match stream {
                Stream::Stdout => client.read_stdout(long_poll(), &req),
                Stream::Stderr => client.read_stderr(long_poll(), &req),
            };
            match resp {
                Ok(r) => {
                    if !r.data.is_empty() {
                        let mut fifo = fifo_slot.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(f) = fifo.as_mut() {
                            if let Err(e) = f.write_all(&r.data) {
                                log::warn!(
                                    "{cid}/{eid}: writing {path}: {e}; further output is dropped"
                                );
                                *fifo = None;
                            }
                        }
                    }
                    if r.eof {
                        break;
                    }
                }
                Err(e) => {
                    log::warn!("{cid}/{eid}: {stream:?}: {}", describe(&e));
                    break;
                }
            }
        }
        // The stream has ended: close the fifo now, so its reader sees EOF (containerd's CRI
        // waits for that before it deletes an exec), not only at Delete.
        fifo_slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    })
}

fn relay_stdin(client: AgentClient, cid: String, eid: String, path: String) {
    std::thread::spawn(move || {
        // Blocks until a writer opens the fifo; `unblock_stdin` opens it when the process has
        // ended without anyone having done so, so this thread never outlives its process.
        let mut fifo = match OpenOptions::new().read(true).open(&path) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("{cid}/{eid}: opening {path}: {e}");
                return;
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match fifo.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let req = WriteStdinRequest {
                        container_id: cid.clone(),
                        exec_id: eid.clone(),
                        data: buf[..n].to_vec(),
                        ..Default::default()
                    };
                    if let Err(e) = client.write_stdin(short(), &req) {
                        log::debug!("{cid}/{eid}: stdin: {}", describe(&e));
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("{cid}/{eid}: reading {path}: {e}");
                    break;
                }
            }
        }
        let req = ProcessRef {
            container_id: cid.clone(),
            exec_id: eid.clone(),
            ..Default::default()
        };
        if let Err(e) = client.close_stdin(short(), &req) {
            log::debug!("{cid}/{eid}: closing stdin: {}", describe(&e));
        }
    });
}

/// Opens and closes the write end of a stdin fifo, waking a relay blocked in `open`.
pub fn unblock_stdin(path: &str) {
    if !path.is_empty() {
        let _ = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(PathBuf::from(path));
    }
}

/// Starts the relays and the waiter of a started process. `on_exit` runs once, with the
/// agent's answer to `WaitProcess`, after all output reached the fifos.
/// Returns the handle that closes the fifos.
pub fn start(
    client: AgentClient,
    cid: &str,
    eid: &str,
    stdio: &StdioPaths,
    on_exit: impl FnOnce(Result<WaitProcessResponse, String>) + Send + 'static,
) -> Outputs {
    let mut outputs = Outputs::default();
    outputs.fifos.push(Arc::default());
    let mut relays = vec![relay_output(
        client.clone(),
        cid.into(),
        eid.into(),
        Stream::Stdout,
        stdio.stdout.clone(),
        outputs.fifos[0].clone(),
    )];
    // With a terminal the pty merges stderr into stdout.
    if !stdio.terminal {
        relays.push(relay_output(
            client.clone(),
            cid.into(),
            eid.into(),
            Stream::Stderr,
            stdio.stderr.clone(),
            {
                outputs.fifos.push(Arc::default());
                outputs.fifos[1].clone()
            },
        ));
    }
    if !stdio.stdin.is_empty() {
        relay_stdin(client.clone(), cid.into(), eid.into(), stdio.stdin.clone());
    }
    let req = ProcessRef {
        container_id: cid.into(),
        exec_id: eid.into(),
        ..Default::default()
    };
    let stdin = stdio.stdin.clone();
    std::thread::spawn(move || {
        let result = client
            .wait_process(long_poll(), &req)
            .map_err(|e| describe(&e));
        for r in relays {
            let _ = r.join();
        }
        unblock_stdin(&stdin);
        on_exit(result);
    });
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(dir: &std::path::Path) -> String {
        let p = dir.join("out");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p.display().to_string()
    }

    #[test]
    fn an_output_fifo_without_a_reader_is_not_waited_for() {
        let d = tempfile::tempdir().unwrap();
        let p = fifo(d.path());
        // On a thread: a blocking open would hang, not fail.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(open_output_fifo(&p).unwrap().is_none()));
        let none = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(none, Ok(true), "opening a fifo without a reader waited for one");
    }

    #[test]
    fn an_output_fifo_with_a_reader_gets_blocking_writes() {
        let d = tempfile::tempdir().unwrap();
        let p = fifo(d.path());
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p)
            .unwrap();
        let mut w = open_output_fifo(&p).unwrap().expect("a reader is there");
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL on an fd we own.
        let flags = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "writes must block, not fail with EAGAIN");
        w.write_all(b"hello").unwrap();
        drop(w);
        let mut got = String::new();
        reader.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello");
    }
}
