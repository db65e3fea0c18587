//! Stdio of one process: containerd's fifos on the host side, the agent's stdio RPCs on the
//! guest side (see `husk-protocols` for why RPCs).
//!
//! - stdout/stderr: a thread per stream long-polls `ReadStdout`/`ReadStderr` and writes what
//!   arrives to the fifo, byte for byte, until the agent says `eof`. If the fifo's reader has
//!   gone, output is still drained (and dropped) so the process never blocks on a full pipe.
//! - stdin: a thread reads the fifo and calls `WriteStdin`; EOF on the fifo becomes
//!   `CloseStdin`, so EOF reaches the process.
//! - the waiter calls `WaitProcess`, then waits for the output threads: the exit is reported
//!   only after all output has been written — unless the streams stay open with nothing moving
//!   for [`DRAIN_IDLE`] after the process ended (a background process it left behind holds its
//!   stdout): then the exit is reported anyway and the relays go on until the streams end, as
//!   containerd's runc shim does, so such a process cannot keep a task RUNNING forever. Its
//!   fifos are closed when containerd deletes the process ([`Outputs::close`]), which is what
//!   lets containerd's own copy of them end.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// After a process ended, how long its output streams may stay open with no bytes moving
/// before its exit is reported anyway.
pub const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// When an output relay last moved bytes (ms since `epoch`), shared by a process's relays.
#[derive(Debug)]
struct Progress {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Progress {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Waits until every relay has finished, or none has moved a byte for `idle` (then returns
/// false and leaves them running).
fn drained(relays: &[JoinHandle<()>], progress: &Progress, idle: Duration) -> bool {
    progress.touch();
    loop {
        if relays.iter().all(JoinHandle::is_finished) {
            return true;
        }
        if progress.idle() >= idle {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
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

fn relay_output(
    client: AgentClient,
    cid: String,
    eid: String,
    stream: Stream,
    path: String,
    progress: Arc<Progress>,
    fifo_slot: Arc<Mutex<Option<File>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let fifo = if path.is_empty() {
            None
        } else {
            // Blocks until containerd has the read end open (it opened it before Create).
            match OpenOptions::new().write(true).open(&path) {
                Ok(f) => Some(f),
                Err(e) => {
                    log::warn!("{cid}/{eid}: opening {path}: {e}; output is dropped");
                    None
                }
            }
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
                    progress.touch();
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
                        return;
                    }
                }
                Err(e) => {
                    log::warn!("{cid}/{eid}: {stream:?}: {}", describe(&e));
                    return;
                }
            }
        }
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
/// agent's answer to `WaitProcess`, after all output reached the fifos (see [`DRAIN_IDLE`]).
/// Returns the handle that closes the fifos.
pub fn start(
    client: AgentClient,
    cid: &str,
    eid: &str,
    stdio: &StdioPaths,
    on_exit: impl FnOnce(Result<WaitProcessResponse, String>) + Send + 'static,
) -> Outputs {
    let progress = Progress::new();
    let mut outputs = Outputs::default();
    outputs.fifos.push(Arc::default());
    let mut relays = vec![relay_output(
        client.clone(),
        cid.into(),
        eid.into(),
        Stream::Stdout,
        stdio.stdout.clone(),
        progress.clone(),
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
            progress.clone(),
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
    let (cid, eid) = (cid.to_string(), eid.to_string());
    std::thread::spawn(move || {
        let result = client
            .wait_process(long_poll(), &req)
            .map_err(|e| describe(&e));
        if !drained(&relays, &progress, DRAIN_IDLE) {
            log::warn!(
                "{cid}/{eid}: ended, but its output is still open {DRAIN_IDLE:?} later (a process it started holds it); reporting the exit"
            );
        }
        unblock_stdin(&stdin);
        on_exit(result);
    });
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drained_waits_for_finished_relays() {
        let p = Progress::new();
        let relays = vec![std::thread::spawn(|| std::thread::sleep(Duration::from_millis(50)))];
        assert!(drained(&relays, &p, Duration::from_secs(10)));
        assert!(relays[0].is_finished());
    }

    #[test]
    fn drained_gives_up_on_idle_streams_but_not_on_busy_ones() {
        let p = Progress::new();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p2, stop2) = (p.clone(), stop.clone());
        // Busy for 300 ms (bytes every 10 ms), then silent but open.
        let relays = vec![std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(300) {
                p2.touch();
                std::thread::sleep(Duration::from_millis(10));
            }
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
            }
        })];
        let t = Instant::now();
        assert!(!drained(&relays, &p, Duration::from_millis(100)));
        assert!(t.elapsed() >= Duration::from_millis(300), "gave up while bytes moved");
        stop.store(true, Ordering::Relaxed);
    }
}
