//! Stdio of one process: containerd's fifos on the host side, the agent's stdio RPCs on the
//! guest side (see `husk-protocols` for why RPCs).
//!
//! - stdout/stderr: a thread per stream long-polls `ReadStdout`/`ReadStderr` and writes what
//!   arrives to the fifo, byte for byte, until the agent says `eof`. If nobody reads the fifo
//!   (a detached client), output is still drained (and dropped) so the process never blocks
//!   on a full pipe. See [`Sink`] for how a fifo is opened, written and closed.
//! - stdin: a thread reads the fifo and calls `WriteStdin`; EOF on the fifo becomes
//!   `CloseStdin`, so EOF reaches the process.
//! - the waiter calls `WaitProcess`, then waits for the output threads: the exit is reported
//!   only after all output has been written to the fifos and taken from them by their reader
//!   (or nobody came for it in time). A stream that goes on after the process ended — a
//!   background process it left holds the pipe and keeps writing, or a guest withholds the
//!   end — gets a bounded time and amount from the agent ([`AfterExit`]); then its end is not
//!   waited for, as under runc, whose shim reports an exec's exit while a background child
//!   still writes. The fifos are closed when containerd deletes the process
//!   ([`Outputs::close`]) in any case.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::AgentClient;
use husk_protocols::agent::{
    ProcessRef, ReadStreamRequest, WaitProcessResponse, WriteStdinRequest,
};

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
    fifos: Vec<Arc<Slot>>,
}

impl Outputs {
    /// Closes the fifos: output that still arrives is dropped, and the fifos' reader sees EOF.
    /// Returns within one [`SLICE`] even while a relay waits for room in a fifo.
    pub fn close(&self) {
        for f in &self.fifos {
            f.closed.store(true, Ordering::SeqCst);
            f.sink.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

/// How long the relay of an output stream waits for the fifo's reader.
///
/// containerd's client opens the read end of an output fifo asynchronously (`fifo.OpenFifo`
/// with `O_NONBLOCK` returns before a goroutine performs the blocking `open(2)`), so an
/// attached `ctr run` may have no reader yet when the process has already written, or even
/// ended; and `ctr run -d` (detached) stops reading when it exits right after Start. The two
/// cannot be told apart from the fifo, so output waits this long for a reader, then is
/// dropped: a detached client costs at most `no_reader` once per stream, never a hang.
#[derive(Clone, Copy, Debug)]
struct Patience {
    /// How long output may wait in a fifo that nobody but us holds open for reading.
    no_reader: Duration,
    /// At the end of the stream, how long a reader that is there may take to empty the fifo
    /// before it is closed anyway (closing does not lose what it holds for that reader).
    drain: Duration,
}

/// The relays' patience. Two seconds: the client issues its reader's open before it even
/// asks for the process to start; under load here (300 short execs and a dozen runs at a
/// load average of ~15) about one fifo in 600 had no reader yet at Start, and none got its
/// reader only after the stream had ended. A detached client's exit is reported at most
/// this much later, and only when it left output unread.
const PATIENCE: Patience = Patience {
    no_reader: Duration::from_secs(2),
    drain: Duration::from_secs(2),
};

/// How long a relay waits for room in a full fifo between looks at [`Slot::closed`].
const SLICE: Duration = Duration::from_millis(50);

/// What a stream may still bring once its process has ended, before the relay stops taking
/// it and the exit is reported without its end.
///
/// An honest agent ends a stream 250 ms after the process ended and the pipe went quiet
/// (`AFTER_EXIT_IDLE` in `agent/src/container/stdio.rs`), and, while a background process
/// the exited one left (an exec's `cmd &`) keeps writing, at the first empty pipe 1 s after
/// the exit (`AFTER_EXIT_MOST` there; runc's shim too ends such an exec, after 2.07 s in
/// `shim_runc_parity::an_exec_that_leaves_a_writer_behind_still_ends`, husk's after 1.47 s),
/// after at most the 1 MiB its pipe held (`PIPE_SIZE` there). Those bounds are the guest's, measured
/// in its own time; these are the host's backstop against a guest that will not end a
/// stream, which may not keep the exit from containerd for long. The wait is generous
/// because the host's clock also counts the time the host itself keeps the guest from
/// running: with six busy loops on two cores beside four short execs at a time under TCG,
/// about one exec in four took more than a second to bring its streams' ends, and at a 1 s bound
/// one in 300 lost its stderr (`tests/tests/shim_output.rs`). Time the relay spends writing
/// to the fifo (a slow reader) does not count: only the wait for the agent does.
#[derive(Clone, Copy, Debug)]
struct AfterExit {
    /// Time spent waiting for the agent's next chunk after the exit.
    wait: Duration,
    /// Bytes taken from the agent after the exit.
    bytes: usize,
}

const AFTER_EXIT: AfterExit = AfterExit {
    wait: Duration::from_secs(10),
    bytes: 2 << 20,
};

/// The end of a process, shared by its waiter and its output relays.
#[derive(Debug, Default)]
struct Ending {
    exited_at: Mutex<Option<Instant>>,
}

impl Ending {
    fn mark(&self) {
        self.exited_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now);
    }

    fn at(&self) -> Option<Instant> {
        *self.exited_at.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One relay's dealings with the agent since its process ended, for the relay's own budget
/// and for the waiter, which must not wait on a relay stuck in an unanswered call.
#[derive(Debug, Default)]
struct Asking {
    inner: Mutex<AskingState>,
    /// Set when the relay has returned.
    done: AtomicBool,
}

#[derive(Debug, Default)]
struct AskingState {
    /// Since when the relay has been waiting for the agent, while it is.
    since: Option<Instant>,
    /// Time waited for the agent after the exit, calls that ended only.
    waited: Duration,
    /// Bytes taken after the exit.
    bytes: usize,
}

impl Asking {
    fn lock(&self) -> std::sync::MutexGuard<'_, AskingState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(&self) {
        self.lock().since = Some(Instant::now());
    }

    /// The call begun by [`Asking::begin`] returned `bytes`.
    fn end(&self, ending: &Ending, bytes: usize) {
        let exited_at = ending.at();
        let mut s = self.lock();
        let since = s.since.take();
        if let (Some(exit), Some(since)) = (exited_at, since) {
            s.waited += Instant::now().saturating_duration_since(since.max(exit));
            s.bytes += bytes;
        }
    }

    /// What it has waited for the agent after the exit, counting a call still in flight, and
    /// the bytes it took; `None` before the exit.
    fn after_exit(&self, ending: &Ending) -> Option<(Duration, usize)> {
        let exit = ending.at()?;
        let s = self.lock();
        let open = s
            .since
            .map(|since| Instant::now().saturating_duration_since(since.max(exit)))
            .unwrap_or_default();
        Some((s.waited + open, s.bytes))
    }

    /// Whether the stream has had all it may have after the exit.
    fn over(&self, ending: &Ending, budget: AfterExit) -> bool {
        self.after_exit(ending)
            .is_some_and(|(waited, bytes)| waited > budget.wait || bytes > budget.bytes)
    }
}

/// Where one output stream goes.
///
/// A fifo is opened both for writing and, by us, for reading, neither open waiting: so the
/// write end never fails to open for want of a reader (`ENXIO`, which used to drop the whole
/// stream of a client whose reader was late) and never blocks (which used to hang the exit of
/// a detached client for ever). While we hold our read end, writes succeed up to the fifo's
/// buffer and a reader that opens late finds every byte there. When the fifo stays full for
/// [`Patience::no_reader`], our read end is dropped: a write then fails with `EPIPE` if
/// nobody else reads (the stream is dropped) and waits for room if someone does (a slow
/// reader is backpressure, as under runc's shim). At the stream's end see [`Slot::finish`].
#[derive(Debug)]
enum Sink {
    /// A fifo: our write end (non-blocking) and, while we hold one, our own read end.
    Fifo { w: File, r: Option<File> },
    /// Anything else (a regular file): plain blocking writes.
    Other(File),
}

impl Sink {
    /// Opens `path`; `what` names the stream in logs.
    fn open(path: &str, what: &str) -> std::io::Result<Self> {
        if !std::fs::metadata(path)?.file_type().is_fifo() {
            return OpenOptions::new().write(true).open(path).map(Sink::Other);
        }
        let nonblocking = |write: bool, p: &std::path::Path| {
            OpenOptions::new()
                .read(!write)
                .write(write)
                .custom_flags(libc::O_NONBLOCK)
                .open(p)
        };
        // Each end is opened through the other's fd, so both are the same fifo even if the
        // path is replaced meanwhile.
        let (w, r) = match nonblocking(true, path.as_ref()) {
            Ok(w) => {
                let r = nonblocking(false, &fd_path(&w))?;
                (w, r)
            }
            // No reader yet: with our own read end open first, the write end opens at once.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                log::debug!("{what}: the fifo has no reader yet; its output waits for one");
                let r = nonblocking(false, path.as_ref())?;
                (nonblocking(true, &fd_path(&r))?, r)
            }
            Err(e) => return Err(e),
        };
        Ok(Sink::Fifo { w, r: Some(r) })
    }
}

fn fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// Bytes in the fifo that nobody has read yet.
fn unread(f: &File) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int, which we own; the fd is open.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return 0;
    }
    usize::try_from(n).unwrap_or(0)
}

/// Whether anyone holds the fifo of `w` open for reading: a non-blocking open for writing
/// fails with `ENXIO` when nobody does (it counts our own read end too: drop it first).
fn has_reader(w: &File) -> bool {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fd_path(w))
        .is_ok()
}

/// Waits up to `timeout` for room in the fifo (or its reader's end).
fn wait_writable(f: &File, timeout: Duration) {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll on one pollfd we own, for a bounded time.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// An output stream's fifo, shared by its relay and [`Outputs::close`].
#[derive(Debug, Default)]
struct Slot {
    sink: Mutex<Option<Sink>>,
    /// Set by [`Outputs::close`]: the relay lets go of the fifo.
    closed: AtomicBool,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Sink>> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes all of `data`, or drops the fifo (and so the rest of the stream's output) when
    /// nobody reads it (see [`Sink`]) or a write fails.
    fn write_all(&self, mut data: &[u8], patience: Patience, what: &str) {
        let mut full_since: Option<Instant> = None;
        while !data.is_empty() && !self.closed.load(Ordering::SeqCst) {
            let mut g = self.lock();
            let (w, r) = match g.as_mut() {
                None => return,
                Some(Sink::Other(f)) => {
                    if let Err(e) = f.write_all(data) {
                        log::warn!("{what}: {e}; further output is dropped");
                        *g = None;
                    }
                    return;
                }
                Some(Sink::Fifo { w, r }) => (w, r),
            };
            match w.write(data) {
                Ok(n) => {
                    data = &data[n..];
                    full_since = None;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let since = *full_since.get_or_insert_with(Instant::now);
                    if r.is_some() && since.elapsed() >= patience.no_reader {
                        // Without our read end, the next write tells whether anyone else reads.
                        *r = None;
                        continue;
                    }
                    wait_writable(w, SLICE);
                }
                Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                    log::debug!(
                        "{what}: nobody reads the fifo (the client detached or went away); \
                         further output is dropped"
                    );
                    *g = None;
                    return;
                }
                Err(e) => {
                    log::warn!("{what}: writing the fifo: {e}; further output is dropped");
                    *g = None;
                    return;
                }
            }
        }
    }

    /// The stream has ended: closes the fifo, so its reader sees EOF (containerd's CRI waits
    /// for that before it deletes an exec) — but only once the reader has taken what the
    /// fifo holds, or nobody came to read it within [`Patience::no_reader`], or the reader
    /// that is there took longer than [`Patience::drain`]. Returning earlier would let the
    /// exit be reported while the output still sits in the fifo, and containerd's client
    /// before 1.6.22 (Debian's 1.6.20 among them) closes its read end as soon as it sees the
    /// exit (`task.Delete` calls `io.Close` before `io.Wait`), dropping what it had not read.
    fn finish(&self, patience: Patience, what: &str) {
        let sink = self.lock().take();
        let Some(Sink::Fifo { w, r }) = sink else {
            return;
        };
        // From here on only a reader other than us counts.
        drop(r);
        let start = Instant::now();
        let mut reader_since: Option<Instant> = None;
        let mut nap = Duration::from_millis(1);
        let mut waited_for: Option<usize> = None;
        loop {
            let left = unread(&w);
            if left == 0 {
                if let Some(n) = waited_for {
                    log::debug!(
                        "{what}: the reader took the last {n} bytes {:?} after the stream ended",
                        start.elapsed()
                    );
                }
                return;
            }
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            waited_for.get_or_insert(left);
            if has_reader(&w) {
                let since = *reader_since.get_or_insert_with(|| {
                    if start.elapsed() > Duration::from_millis(5) {
                        log::debug!(
                            "{what}: a reader came {:?} after the stream ended",
                            start.elapsed()
                        );
                    }
                    Instant::now()
                });
                if since.elapsed() >= patience.drain {
                    log::debug!(
                        "{what}: the reader left {left} bytes in the fifo for {:?}; closing it",
                        patience.drain
                    );
                    return;
                }
            } else {
                reader_since = None;
                if start.elapsed() >= patience.no_reader {
                    log::debug!(
                        "{what}: nobody came to read the fifo within {:?} (a detached client); \
                         {left} bytes are dropped",
                        patience.no_reader
                    );
                    return;
                }
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(20));
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

/// The relay of one output stream, apart from where its bytes come from: `next` returns the
/// next chunk and whether the stream has ended. Returns once the stream has ended (or had
/// all it may have after the process's exit, [`AfterExit`]) and the fifo is closed
/// ([`Slot::finish`]).
fn relay(
    what: &str,
    path: &str,
    slot: &Slot,
    patience: Patience,
    watch: (&Ending, &Asking, AfterExit),
    mut next: impl FnMut() -> Result<(Vec<u8>, bool), String>,
) {
    let (ending, asking, budget) = watch;
    if !path.is_empty() {
        match Sink::open(path, what) {
            Ok(s) => {
                // Under the lock: `Outputs::close` sets `closed` before it takes the lock.
                let mut g = slot.lock();
                if !slot.closed.load(Ordering::SeqCst) {
                    *g = Some(s);
                }
            }
            Err(e) => log::warn!("{what}: opening {path}: {e}; output is dropped"),
        }
    }
    loop {
        if asking.over(ending, budget) {
            log::warn!(
                "{what}: the stream is still open well after the process ended (a background \
                 process holds it, or the guest does not end it); its output is no longer \
                 relayed and the exit is reported"
            );
            break;
        }
        asking.begin();
        let chunk = next();
        asking.end(ending, chunk.as_ref().map_or(0, |(d, _)| d.len()));
        match chunk {
            Ok((data, eof)) => {
                if !data.is_empty() {
                    slot.write_all(&data, patience, what);
                }
                if eof {
                    break;
                }
            }
            Err(e) => {
                log::warn!("{what}: {e}");
                break;
            }
        }
    }
    slot.finish(patience, what);
    asking.done.store(true, Ordering::SeqCst);
}

/// Waits until every relay in `relays` has returned, or the ones left are stuck in a call to
/// the agent for longer than the budget allows after the exit (`ending` is marked): those are
/// left to end when the connection does. `done` gets a message each time a relay returns.
fn wait_relays(
    relays: &[Arc<Asking>],
    ending: &Ending,
    budget: AfterExit,
    done: &std::sync::mpsc::Receiver<()>,
    what: &str,
) {
    loop {
        let left: Vec<&Arc<Asking>> = relays
            .iter()
            .filter(|a| !a.done.load(Ordering::SeqCst))
            .collect();
        if left.is_empty() {
            return;
        }
        if left.iter().all(|a| a.over(ending, budget)) {
            log::warn!(
                "{what}: the guest has not answered for an output stream {:?} after the process \
                 ended; the exit is reported without its end",
                budget.wait
            );
            return;
        }
        let _ = done.recv_timeout(Duration::from_millis(25));
    }
}

/// What a relay thread shares with the waiter.
struct RelayWatch {
    ending: Arc<Ending>,
    asking: Arc<Asking>,
    done: std::sync::mpsc::Sender<()>,
}

fn relay_output(
    client: AgentClient,
    (cid, eid): (String, String),
    stream: Stream,
    path: String,
    slot: Arc<Slot>,
    watch: RelayWatch,
) {
    std::thread::spawn(move || {
        let req = ReadStreamRequest {
            container_id: cid.clone(),
            exec_id: eid.clone(),
            max_len: 0,
            ..Default::default()
        };
        let what = format!("{cid}/{eid}: {stream:?}");
        let RelayWatch {
            ending,
            asking,
            done,
        } = watch;
        relay(
            &what,
            &path,
            &slot,
            PATIENCE,
            (&ending, &asking, AFTER_EXIT),
            || {
                match stream {
                    Stream::Stdout => client.read_stdout(long_poll(), &req),
                    Stream::Stderr => client.read_stderr(long_poll(), &req),
                }
                .map(|r| (r.data, r.eof))
                .map_err(|e| describe(&e))
            },
        );
        let _ = done.send(());
    });
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
pub(crate) fn unblock_stdin(path: &str) {
    if !path.is_empty() {
        let _ = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(PathBuf::from(path));
    }
}

/// Starts the relays and the waiter of a started process. `on_exit` runs once, with the
/// agent's answer to `WaitProcess`, after all output reached the fifos (or what is left of it
/// outlived the process beyond [`AfterExit`]). Returns the handle that closes the fifos.
pub fn start(
    client: AgentClient,
    cid: &str,
    eid: &str,
    stdio: &StdioPaths,
    on_exit: impl FnOnce(Result<WaitProcessResponse, String>) + Send + 'static,
) -> Outputs {
    let mut outputs = Outputs::default();
    let ending = Arc::new(Ending::default());
    let (done_tx, done) = std::sync::mpsc::channel();
    // With a terminal the pty merges stderr into stdout.
    let streams: &[(Stream, &String)] = if stdio.terminal {
        &[(Stream::Stdout, &stdio.stdout)]
    } else {
        &[
            (Stream::Stdout, &stdio.stdout),
            (Stream::Stderr, &stdio.stderr),
        ]
    };
    let mut relays = Vec::new();
    for (stream, path) in streams {
        let slot = Arc::new(Slot::default());
        let asking = Arc::new(Asking::default());
        outputs.fifos.push(slot.clone());
        relays.push(asking.clone());
        relay_output(
            client.clone(),
            (cid.into(), eid.into()),
            *stream,
            (*path).clone(),
            slot,
            RelayWatch {
                ending: ending.clone(),
                asking,
                done: done_tx.clone(),
            },
        );
    }
    drop(done_tx);
    if !stdio.stdin.is_empty() {
        relay_stdin(client.clone(), cid.into(), eid.into(), stdio.stdin.clone());
    }
    let req = ProcessRef {
        container_id: cid.into(),
        exec_id: eid.into(),
        ..Default::default()
    };
    let stdin = stdio.stdin.clone();
    let what = format!("{cid}/{eid}");
    std::thread::spawn(move || {
        let result = client
            .wait_process(long_poll(), &req)
            .map_err(|e| describe(&e));
        ending.mark();
        wait_relays(&relays, &ending, AFTER_EXIT, &done, &what);
        unblock_stdin(&stdin);
        on_exit(result);
    });
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn fifo(dir: &std::path::Path) -> String {
        let p = dir.join("out");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p.display().to_string()
    }

    /// Opens the read end as containerd's client finally does: without waiting for a writer,
    /// then blocking reads (EOF once every writer has closed).
    fn open_reader(path: &str) -> File {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .unwrap();
        // SAFETY: F_GETFL/F_SETFL on an fd we own, integer arguments.
        unsafe {
            let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
            assert!(flags >= 0);
            assert_eq!(
                libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK),
                0
            );
        }
        f
    }

    const QUICK: Patience = Patience {
        no_reader: Duration::from_millis(300),
        drain: Duration::from_millis(300),
    };

    /// A relay running on a thread over `chunks` (then EOF).
    struct Relay {
        /// How many chunks it has taken (the fifo is open from the first one on).
        taken: Arc<std::sync::atomic::AtomicUsize>,
        /// Gets when it returned.
        done: mpsc::Receiver<Instant>,
    }

    impl Relay {
        fn spawn(path: &str, patience: Patience, chunks: Vec<Vec<u8>>) -> Self {
            let (tx, done) = mpsc::channel();
            let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let (path, count) = (path.to_string(), taken.clone());
            std::thread::spawn(move || {
                let slot = Slot::default();
                let mut it = chunks.into_iter().peekable();
                let watch = (&Ending::default(), &Asking::default(), AFTER_EXIT);
                relay("test", &path, &slot, patience, watch, || {
                    let c = it.next().unwrap_or_default();
                    count.fetch_add(1, Ordering::SeqCst);
                    Ok((c, it.peek().is_none()))
                });
                let _ = tx.send(Instant::now());
            });
            Self { taken, done }
        }

        /// Waits until it has taken `n` chunks.
        fn wait_taken(&self, n: usize) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.taken.load(Ordering::SeqCst) < n {
                assert!(
                    Instant::now() < deadline,
                    "the relay did not take {n} chunks"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        /// When it returned, failing with `why` unless within 10 s.
        fn ended(&self, why: &str) -> Instant {
            self.done.recv_timeout(Duration::from_secs(10)).expect(why)
        }
    }

    fn megabyte() -> Vec<Vec<u8>> {
        (0..16u8).map(|i| vec![b'a' + i; 64 * 1024]).collect()
    }

    #[test]
    fn a_reader_that_opens_late_gets_every_byte() {
        let d = tempfile::tempdir().unwrap();
        let p = fifo(d.path());
        let patient = Patience {
            no_reader: Duration::from_secs(10),
            drain: Duration::from_secs(10),
        };
        let relay = Relay::spawn(&p, patient, vec![b"hello ".to_vec(), b"world\n".to_vec()]);
        // The whole stream has been relayed before the reader comes (a `ctr run` whose
        // goroutine opened its end late, under load).
        relay.wait_taken(2);
        std::thread::sleep(Duration::from_millis(200));
        let mut got = Vec::new();
        open_reader(&p).read_to_end(&mut got).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), "hello world\n");
        relay.ended("the relay ended");
    }

    #[test]
    fn the_stream_ends_only_once_its_reader_took_every_byte() {
        // containerd's client before 1.6.22 closes its read end as soon as the exit is
        // reported, and the exit is reported when the relay returns.
        let d = tempfile::tempdir().unwrap();
        let p = fifo(d.path());
        let mut reader = open_reader(&p);
        let patient = Patience {
            no_reader: Duration::from_secs(10),
            drain: Duration::from_secs(10),
        };
        let relay = Relay::spawn(&p, patient, vec![b"ok\n".to_vec()]);
        relay.wait_taken(1);
        std::thread::sleep(Duration::from_millis(300));
        let read_at = Instant::now();
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ok\n");
        let ended = relay.ended("the relay ended");
        assert!(
            ended >= read_at,
            "the relay ended before its output was read"
        );
    }

    #[test]
    fn a_reader_that_never_comes_does_not_block_the_relay() {
        let d = tempfile::tempdir().unwrap();
        let p = fifo(d.path());
        // A little output (fits the fifo) and a megabyte (does not): both end, in bounded time,
        // and every chunk is taken from the agent, so the process never blocks.
        for chunks in [vec![b"ok\n".to_vec()], megabyte()] {
            let n = chunks.len();
            let t = Instant::now();
            let relay = Relay::spawn(&p, QUICK, chunks);
            relay.ended("the relay waited for ever for a reader that never comes");
            assert_eq!(relay.taken.load(Ordering::SeqCst), n);
            assert!(
                t.elapsed() >= QUICK.no_reader,
                "gave up on a late reader too early"
            );
        }
    }

    #[test]
    fn a_reader_that_leaves_does_not_block_the_relay() {
        // `ctr run -d`: the client reads, then exits.
        let d = tempfile::tempdir().unwrap();
        let p = fifo(d.path());
        let mut reader = open_reader(&p);
        let mut chunks = vec![b"first\n".to_vec()];
        chunks.extend(megabyte());
        let n = chunks.len();
        let relay = Relay::spawn(&p, QUICK, chunks);
        relay.wait_taken(1);
        let mut first = [0u8; 6];
        reader.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"first\n");
        drop(reader);
        relay.ended("the relay blocked on a fifo whose reader left");
        assert_eq!(relay.taken.load(Ordering::SeqCst), n);
    }

    #[test]
    fn a_slow_reader_is_waited_for_not_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = fifo(d.path());
        let mut reader = open_reader(&p);
        let chunks = megabyte();
        let want: Vec<u8> = chunks.concat();
        let relay = Relay::spawn(&p, QUICK, chunks);
        relay.wait_taken(1);
        // Pauses longer than `no_reader` while the fifo is full.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        for i in 0.. {
            if i < 3 {
                std::thread::sleep(QUICK.no_reader * 2);
            }
            match reader.read(&mut buf).unwrap() {
                0 => break,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
        assert!(got == want, "got {} of {} bytes", got.len(), want.len());
        relay.ended("the relay ended");
    }

    #[test]
    fn close_lets_go_of_a_fifo_the_relay_waits_on() {
        let d = tempfile::tempdir().unwrap();
        let p = fifo(d.path());
        let _reader = open_reader(&p); // there, but never reads
        let outputs = Outputs {
            fifos: vec![Arc::default()],
        };
        let slot = outputs.fifos[0].clone();
        let (tx, rx) = mpsc::channel();
        let path = p.clone();
        std::thread::spawn(move || {
            let mut chunks = megabyte().into_iter().peekable();
            let watch = (&Ending::default(), &Asking::default(), AFTER_EXIT);
            relay("test", &path, &slot, QUICK, watch, || {
                let c = chunks.next().unwrap_or_default();
                Ok((c, chunks.peek().is_none()))
            });
            let _ = tx.send(());
        });
        // The relay now waits for room (its reader is there, so for ever).
        std::thread::sleep(QUICK.no_reader * 2);
        assert!(rx.try_recv().is_err());
        let t = Instant::now();
        outputs.close();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "close waited for the relay's write"
        );
        // The relay drops the rest of the stream and ends.
        rx.recv_timeout(Duration::from_secs(2))
            .expect("the relay ended after close");
    }

    #[test]
    fn a_regular_file_gets_plain_writes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, b"").unwrap();
        let relay = Relay::spawn(
            p.to_str().unwrap(),
            QUICK,
            vec![b"a".to_vec(), b"b".to_vec()],
        );
        relay.ended("the relay ended");
        assert_eq!(std::fs::read(&p).unwrap(), b"ab");
    }

    /// A short budget for the tests.
    const SOON: AfterExit = AfterExit {
        wait: Duration::from_millis(300),
        bytes: 1 << 20,
    };

    /// Runs a relay into a regular file (no reader to wait for) with `next`, after the
    /// process has ended; returns how long it took, or fails after 10 s.
    fn relay_after_exit(
        next: impl FnMut() -> Result<(Vec<u8>, bool), String> + Send + 'static,
    ) -> Duration {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, b"").unwrap();
        let (tx, rx) = mpsc::channel();
        let t = Instant::now();
        std::thread::spawn(move || {
            let ending = Ending::default();
            ending.mark();
            let slot = Slot::default();
            relay(
                "test",
                p.to_str().unwrap(),
                &slot,
                QUICK,
                (&ending, &Asking::default(), SOON),
                next,
            );
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the relay stopped taking a stream that goes on after the exit");
        t.elapsed()
    }

    #[test]
    fn a_stream_a_background_process_keeps_writing_ends_after_the_exit() {
        // `sh -c 'while :; do echo x; sleep 0.05; done & exit 0'`: the agent keeps the stream.
        let took = relay_after_exit(|| {
            std::thread::sleep(Duration::from_millis(50));
            Ok((b"x\n".to_vec(), false))
        });
        assert!(took >= SOON.wait, "stopped before the budget: {took:?}");
    }

    #[test]
    fn a_guest_that_floods_after_the_exit_gets_a_bounded_amount() {
        let mut n = 0usize;
        relay_after_exit(move || {
            n += 1;
            assert!(n < 1000, "took {n} chunks of 64 KiB after the exit");
            Ok((vec![b'y'; 64 << 10], false))
        });
    }

    #[test]
    fn a_stream_that_ends_after_the_exit_is_relayed_whole() {
        // What an honest agent does: the pipe's last bytes, then the end.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, b"").unwrap();
        let ending = Ending::default();
        ending.mark();
        let mut chunks = vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()].into_iter();
        relay(
            "test",
            p.to_str().unwrap(),
            &Slot::default(),
            QUICK,
            (&ending, &Asking::default(), SOON),
            || {
                std::thread::sleep(Duration::from_millis(50));
                let c = chunks.next();
                Ok((c.clone().unwrap_or_default(), c.is_none()))
            },
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
    }

    #[test]
    fn a_slow_reader_after_the_exit_does_not_count_against_the_stream() {
        // The exit came before the output was read; the reader then pauses longer than the
        // after-exit budget while the fifo is full: nothing is lost.
        let d = tempfile::tempdir().unwrap();
        let p = fifo(d.path());
        let mut reader = open_reader(&p);
        let chunks = megabyte();
        let want: Vec<u8> = chunks.concat();
        let (tx, rx) = mpsc::channel();
        let path = p.clone();
        std::thread::spawn(move || {
            let ending = Ending::default();
            ending.mark();
            let mut it = chunks.into_iter().peekable();
            relay(
                "test",
                &path,
                &Slot::default(),
                Patience {
                    no_reader: Duration::from_secs(10),
                    drain: Duration::from_secs(10),
                },
                (&ending, &Asking::default(), SOON),
                || {
                    let c = it.next().unwrap_or_default();
                    Ok((c, it.peek().is_none()))
                },
            );
            let _ = tx.send(());
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        for i in 0.. {
            if i < 2 {
                std::thread::sleep(SOON.wait * 2);
            }
            match reader.read(&mut buf).unwrap() {
                0 => break,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
        assert!(got == want, "got {} of {} bytes", got.len(), want.len());
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn the_waiter_does_not_wait_on_a_call_the_guest_never_answers() {
        let ending = Ending::default();
        let (done_tx, done) = mpsc::channel();
        let answered = Arc::new(Asking::default());
        let stuck = Arc::new(Asking::default());
        stuck.begin(); // a ReadStdout the guest never answers
        let relays = vec![answered.clone(), stuck.clone()];
        // Before the exit, a stuck call is waited for.
        let (r, e) = (relays.clone(), Arc::new(ending));
        let (tx, rx) = mpsc::channel();
        let e2 = e.clone();
        std::thread::spawn(move || {
            wait_relays(&r, &e2, SOON, &done, "test");
            let _ = tx.send(Instant::now());
        });
        answered.done.store(true, Ordering::SeqCst);
        done_tx.send(()).unwrap();
        assert!(
            rx.recv_timeout(SOON.wait * 2).is_err(),
            "gave up before the exit"
        );
        let exit = Instant::now();
        e.mark();
        let returned = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the waiter waited for ever on a call the guest never answers");
        assert!(returned - exit >= SOON.wait);
    }

    #[test]
    fn the_waiter_returns_as_soon_as_the_relays_have() {
        let ending = Ending::default();
        let (done_tx, done) = mpsc::channel();
        let a = Arc::new(Asking::default());
        let t = Instant::now();
        std::thread::spawn({
            let a = a.clone();
            move || {
                std::thread::sleep(Duration::from_millis(100));
                a.done.store(true, Ordering::SeqCst);
                let _ = done_tx.send(());
            }
        });
        wait_relays(&[a], &ending, SOON, &done, "test");
        assert!(t.elapsed() >= Duration::from_millis(100));
    }
}
