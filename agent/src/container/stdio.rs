//! A process's stdio on the agent's side: pipes, or a pty whose master carries both ways.
//! The pty comes from the container's own devpts: the helper opens it and passes the master
//! back over the sync socket, as runc does.
//!
//! Reads block until bytes are there or the stream ends (long-poll RPCs, see
//! `husk_protocols`). A pty master returns EIO once the last slave is closed: that is EOF.
//!
//! A stream also ends when its process has ended and nothing more arrives for
//! [`AFTER_EXIT_IDLE`]: a background process it left behind may hold the pipe (or the pty's
//! slave) open for ever, and runc's shim likewise stops copying shortly after the exit. All
//! the process itself wrote is in the pipe before it ends, so none of that is lost; only what
//! a leftover process writes later is not relayed. Measured here in the guest, next to the
//! pipe, so a slow host or a busy vsock cannot cut output short.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a process's stdio could not be made, written, read or resized.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pipe: {0} — the guest is out of file descriptors or memory")]
    Pipe(#[source] nix::errno::Errno),
    #[error("dup pty master: {0}")]
    DupPty(#[source] std::io::Error),
    #[error("opening /dev/null: {0} — the guest's /dev is the agent's devtmpfs")]
    DevNull(#[source] std::io::Error),
    /// CloseStdin came first.
    #[error("stdin is closed")]
    StdinClosed,
    #[error("writing stdin: {0}")]
    WriteStdin(#[source] std::io::Error),
    #[error("sending EOF to the pty: {0}")]
    PtyEof(#[source] std::io::Error),
    #[error("reading {stream}: {source}")]
    Read {
        stream: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A resize of a process started without `terminal`.
    #[error("the process has no terminal — resize only a process started with terminal: true")]
    NoTerminal,
    #[error("resizing the terminal: {0}")]
    Resize(#[source] std::io::Error),
}

/// The agent's ends.
#[derive(Debug)]
pub struct Stdio {
    stdin: Mutex<Option<File>>,
    stdout: Mutex<Option<File>>,
    stderr: Mutex<Option<File>>,
    /// When a read first found the process ended (see [`AFTER_EXIT_MOST`]).
    exit_seen: Mutex<Option<Instant>>,
    /// A handle on the pty master (also behind stdin/stdout) for window resizes, so a resize
    /// never waits behind a blocked read.
    pty: Option<File>,
}

/// The child's ends: fds 0, 1, 2 of the process. Dropped by the agent after the spawn.
#[derive(Debug)]
pub(crate) struct ChildEnds {
    pub fds: [OwnedFd; 3],
}

/// Pipe buffer for stdout/stderr: big enough that the process keeps writing while a read
/// RPC is in flight (the default 64 KiB stalls it every few round trips).
const PIPE_SIZE: libc::c_int = 1 << 20;

/// After the first bytes of a read, at most how long to let more gather in the pipe before
/// replying: coalesces a writer's small writes into large replies.
///
/// The wait sleeps in [`COALESCE_TICK`]s and looks at how much the pipe holds
/// ([`unread`]) instead of polling for readability: a pipe wakes its reader on every write,
/// so a reader that polls runs once per write (4 KiB for busybox `head`), and under TCG,
/// where the guest's CPU is emulated and the writer and this relay share one vCPU, those
/// wake-ups cost more than the bytes (measured: `head -c 64M /dev/zero | cat` took 1.9× the
/// time of `head` alone, `dd bs=1M | cat` a quarter of it). It ends early once
/// [`COALESCE_ENOUGH`] bytes are there or a tick passes with nothing new (a writer that
/// paused: interactive output waits one tick, not the whole window).
const COALESCE: Duration = Duration::from_millis(20);

/// How often the coalescing wait looks at the pipe.
const COALESCE_TICK: Duration = Duration::from_millis(1);

/// Bytes in the pipe that end the coalescing wait at once: well under [`PIPE_SIZE`], so the
/// writer does not block on a full pipe meanwhile.
const COALESCE_ENOUGH: usize = 512 << 10;

/// After the process ended, how long its stream may stay silent before it counts as ended.
/// (A pty's last bytes pass through the tty layer's work queue after the write returns; this
/// leaves them ample time.)
pub(crate) const AFTER_EXIT_IDLE: Duration = Duration::from_millis(250);

/// After the process ended, how long its streams are relayed at most while something keeps
/// writing to them (a background process it left, `cmd &`): from then on a stream ends as
/// soon as its pipe is empty. What the process itself wrote is in the pipe before it ends
/// and is read first, so none of it is cut. Bounded here in the guest, where the time is
/// the guest's own: the host's bound (`AFTER_EXIT` in `shim/src/io.rs`) can then be a
/// generous backstop against a guest that does not end its streams, and a host too busy to
/// run the guest promptly does not cut an honest process's last output short.
pub(crate) const AFTER_EXIT_MOST: Duration = Duration::from_secs(1);

/// How often a blocked read looks whether the process has ended, where no exit fd tells it
/// ([`Ending::fd`]).
const EXIT_CHECK: Duration = Duration::from_millis(100);

/// How a blocked read learns that the process has ended: `fd` (the reaper's
/// [`crate::reaper::Exits::ended_fd`]) becomes readable then, so the read sleeps in `poll`
/// on the stream and it with no timeout at all: an idle container's two streams cost its
/// guest no wake-up (looking every [`EXIT_CHECK`] instead woke an idle pod's vCPU 20 times a
/// second for its init's stdout and stderr alone, and 20 more per exec that ran; under TCG
/// each wake-up is emulated: docs/FIELD-NOTES.md, "Where an idle pod's host memory is under
/// TCG"). `ended` answers where there is no such fd, and after it fired.
pub struct Ending<'a, F: Fn() -> bool> {
    pub ended: F,
    pub fd: Option<BorrowedFd<'a>>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(Error::Pipe)?;
    // Best effort: a smaller pipe only costs throughput.
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own, integer argument.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    Ok((r, w))
}

/// Whether `fd` has bytes (or EOF) within `timeout` (zero: right now, no wait).
fn readable(fd: impl AsFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll on one pollfd we own, for an fd borrowed for the call.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// Bytes in the pipe (or pty) `f` that nobody has read yet (0 if it cannot say).
fn unread(f: &File) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int, which we own; the fd is open.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return 0;
    }
    usize::try_from(n).unwrap_or(0)
}

/// Lets bytes gather in `f`, which has some: see [`COALESCE`]. Returns once `max` (or
/// [`COALESCE_ENOUGH`]) bytes are there, a tick brought nothing new, or [`COALESCE`] passed.
fn gather(f: &File, max: usize) {
    let deadline = Instant::now() + COALESCE;
    let enough = max.min(COALESCE_ENOUGH);
    let mut seen = unread(f);
    // Readable with nothing in it: the end (or a file that cannot say); nothing to wait for.
    if seen == 0 {
        return;
    }
    while seen < enough && Instant::now() < deadline {
        std::thread::sleep(COALESCE_TICK);
        let now = unread(f);
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// Waits until `f` or `exit` is readable; `(f readable, exit readable)`. Retries on EINTR.
fn readable_or_ended(f: &File, exit: BorrowedFd<'_>) -> (bool, bool) {
    let mut p = [
        libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: exit.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll on two pollfds we own; both fds are open for the call.
        let n = unsafe { libc::poll(p.as_mut_ptr(), 2, -1) };
        if n > 0 {
            return (p[0].revents != 0, p[1].revents != 0);
        }
        if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // Nothing to wait on (cannot happen with two open fds): say "ended", and the
            // caller's timed wait decides.
            return (false, true);
        }
    }
}

/// Waits until `f` is readable (bytes or EOF): true; false once the process has ended
/// ([`Ending`]) and `f` then stays silent for [`AFTER_EXIT_IDLE`].
fn wait_readable<F: Fn() -> bool>(f: &File, ending: &Ending<'_, F>) -> bool {
    let mut silent_since: Option<Instant> = None;
    loop {
        if let (Some(exit), None) = (ending.fd, silent_since) {
            match readable_or_ended(f, exit) {
                (true, _) => return true,
                (false, _) => silent_since = Some(Instant::now()),
            }
            continue;
        }
        let wait = match silent_since {
            // After the end: only as long as the rest of the idle time.
            Some(t) => match AFTER_EXIT_IDLE.checked_sub(t.elapsed()) {
                Some(left) if !left.is_zero() => left,
                _ => return false,
            },
            None => EXIT_CHECK,
        };
        if readable(f, wait) {
            return true;
        }
        if silent_since.is_none() && (ending.ended)() {
            silent_since = Some(Instant::now());
        }
    }
}

impl Stdio {
    /// Pipes for stdin, stdout and stderr.
    pub(crate) fn pipes() -> Result<(Self, ChildEnds), Error> {
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        Ok((
            Self {
                stdin: Mutex::new(Some(File::from(in_w))),
                stdout: Mutex::new(Some(File::from(out_r))),
                stderr: Mutex::new(Some(File::from(err_r))),
                exit_seen: Mutex::new(None),
                pty: None,
            },
            ChildEnds {
                fds: [in_r, out_w, err_w],
            },
        ))
    }

    /// A terminal: `master` is the pty master the helper opened from the container's own
    /// devpts and passed back (see `helper`; received close-on-exec); it carries stdin and
    /// stdout, there is no stderr.
    pub fn pty(master: OwnedFd) -> Result<Self, Error> {
        let master = File::from(master);
        let m2 = master.try_clone().map_err(Error::DupPty)?;
        let m3 = master.try_clone().map_err(Error::DupPty)?;
        Ok(Self {
            stdin: Mutex::new(Some(m2)),
            stdout: Mutex::new(Some(master)),
            stderr: Mutex::new(None),
            exit_seen: Mutex::new(None),
            pty: Some(m3),
        })
    }

    /// What a helper starts with: pipes (and our ends of them), or for a terminal, which the
    /// helper opens itself, nothing yet and `/dev/null` as its fds 0-2.
    pub(crate) fn for_helper(terminal: bool) -> Result<(Option<Self>, ChildEnds), Error> {
        if !terminal {
            return Self::pipes().map(|(s, e)| (Some(s), e));
        }
        let open = || -> Result<OwnedFd, Error> {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(Error::DevNull)?;
            Ok(OwnedFd::from(f))
        };
        Ok((
            None,
            ChildEnds {
                fds: [open()?, open()?, open()?],
            },
        ))
    }

    pub fn write_stdin(&self, data: &[u8]) -> Result<usize, Error> {
        let mut g = self
            .stdin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let f = g.as_mut().ok_or(Error::StdinClosed)?;
        f.write_all(data).map_err(Error::WriteStdin)?;
        Ok(data.len())
    }

    /// Closes stdin: the process reads EOF. On a pty, sends the EOF character (^D) instead,
    /// since the master also carries the output.
    pub fn close_stdin(&self) -> Result<(), Error> {
        let mut g = self
            .stdin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.pty.is_some() {
            if let Some(f) = g.as_mut() {
                f.write_all(&[4]).map_err(Error::PtyEof)?;
            }
        }
        *g = None;
        Ok(())
    }

    /// Reads up to `max` bytes of stdout (`err`: stderr), blocking until there are some.
    /// `Ok(None)`: the stream has ended.
    /// `ending` says when the process has ended (see [`AFTER_EXIT_IDLE`]).
    pub fn read<F: Fn() -> bool>(
        &self,
        err: bool,
        max: usize,
        ending: Ending<'_, F>,
    ) -> Result<Option<Vec<u8>>, Error> {
        let m = if err { &self.stderr } else { &self.stdout };
        let mut g = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(f) = g.as_mut() else {
            return Ok(None);
        };
        if self.past_exit(&ending) && unread(f) == 0 {
            *g = None;
            return Ok(None);
        }
        if !wait_readable(f, &ending) {
            *g = None;
            return Ok(None);
        }
        gather(f, max);
        // What is there (a 64 KiB read if it cannot say, or to see the end): one read, into
        // memory that is neither zeroed first nor larger than the reply.
        let want = unread(f).max(64 << 10).min(max);
        let mut buf: Vec<u8> = Vec::with_capacity(want);
        loop {
            let spare = buf.spare_capacity_mut();
            // SAFETY: read(2) writes at most `spare.len()` bytes into `spare`, memory this Vec
            // owns and does not otherwise use; the fd is open (we hold it under the lock).
            let n = unsafe { libc::read(f.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
            let n = match usize::try_from(n) {
                Ok(n) => n,
                Err(_) => {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        // A pty whose slave is gone: its end.
                        Some(libc::EIO) if self.pty.is_some() => 0,
                        _ => {
                            return Err(Error::Read {
                                stream: if err { "stderr" } else { "stdout" },
                                source: e,
                            })
                        }
                    }
                }
            };
            if n == 0 {
                *g = None;
                return Ok(None);
            }
            // SAFETY: read(2) initialized the first `n` bytes of the spare capacity, and
            // n <= spare.len() = capacity - len.
            unsafe { buf.set_len(n) };
            return Ok(Some(buf));
        }
    }

    /// Whether the process ended more than [`AFTER_EXIT_MOST`] ago, as first seen by a read.
    /// With an exit fd, looks at it (no wait) rather than at the process.
    fn past_exit<F: Fn() -> bool>(&self, ending: &Ending<'_, F>) -> bool {
        let mut seen = self
            .exit_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.is_none() {
            let ended = match ending.fd {
                Some(fd) => readable(fd, Duration::ZERO),
                None => (ending.ended)(),
            };
            if ended {
                *seen = Some(Instant::now());
            }
        }
        seen.is_some_and(|t| t.elapsed() >= AFTER_EXIT_MOST)
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), Error> {
        let fd = self.pty.as_ref().ok_or(Error::NoTerminal)?.as_raw_fd();
        set_winsize(fd, rows, cols)
    }
}

/// Sets the window size of the pty `fd` (master or slave).
pub(crate) fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> Result<(), Error> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize we own; fd is open for the duration of the call.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(Error::Resize(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// An end that is only looked at (no exit fd).
    fn checked<F: Fn() -> bool>(ended: F) -> Ending<'static, F> {
        Ending { ended, fd: None }
    }

    #[test]
    fn with_an_exit_fd_a_silent_stream_waits_without_looking() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (stdio, ends) = Stdio::pipes().unwrap();
        let exit: OwnedFd = nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
        )
        .unwrap()
        .into();
        let fire = exit.try_clone().unwrap();
        let looked = AtomicUsize::new(0);
        let ender = std::thread::spawn(move || {
            std::thread::sleep(EXIT_CHECK * 4);
            nix::unistd::write(&fire, &1u64.to_ne_bytes()).unwrap();
        });
        let t = Instant::now();
        let ending = Ending {
            ended: || {
                looked.fetch_add(1, Ordering::SeqCst);
                true
            },
            fd: Some(exit.as_fd()),
        };
        // `ends` (a leftover process's copy) keeps the pipe open: the read ends by the exit.
        assert_eq!(stdio.read(false, 1024, ending).unwrap(), None);
        assert!(
            t.elapsed() >= EXIT_CHECK * 4 + AFTER_EXIT_IDLE,
            "{:?}",
            t.elapsed()
        );
        assert_eq!(
            looked.load(Ordering::SeqCst),
            0,
            "the read looked at the process instead of sleeping on its exit fd"
        );
        ender.join().unwrap();
        drop(ends);
    }

    fn write_child_stdout(ends: &ChildEnds, data: &[u8]) {
        let mut f = File::from(ends.fds[1].try_clone().unwrap());
        f.write_all(data).unwrap();
    }

    #[test]
    fn a_stream_held_open_after_the_exit_ends_once_drained() {
        let (stdio, ends) = Stdio::pipes().unwrap();
        // The process wrote and ended; `ends` stands for a leftover process holding the pipe.
        write_child_stdout(&ends, b"last words");
        let t = Instant::now();
        assert_eq!(
            stdio
                .read(false, 1024, checked(|| true))
                .unwrap()
                .as_deref(),
            Some(&b"last words"[..])
        );
        assert_eq!(stdio.read(false, 1024, checked(|| true)).unwrap(), None);
        assert!(t.elapsed() >= AFTER_EXIT_IDLE, "ended before the idle time");
        drop(ends);
    }

    #[test]
    fn what_is_in_the_pipe_comes_in_replies_of_at_most_max() {
        let (stdio, ends) = Stdio::pipes().unwrap();
        let data: Vec<u8> = (0..300u32 << 10).map(|i| (i % 251) as u8).collect();
        write_child_stdout(&ends, &data);
        drop(ends);
        let mut got = Vec::new();
        let mut replies = 0;
        while let Some(chunk) = stdio.read(false, 128 << 10, checked(|| false)).unwrap() {
            assert!(
                !chunk.is_empty() && chunk.len() <= 128 << 10,
                "{}",
                chunk.len()
            );
            got.extend_from_slice(&chunk);
            replies += 1;
        }
        assert!(got == data, "got {} of {} bytes", got.len(), data.len());
        // 300 KiB in 128 KiB replies: three, each as full as the pipe allows.
        assert_eq!(replies, 3);
    }

    #[test]
    fn a_writer_that_keeps_writing_is_gathered_into_one_reply() {
        // The gathering waits a tick for more; a writer thread that the host has not run
        // within that tick (a loaded machine: CI's unit tests run two at a time beside other
        // builds) rightly ends it early. So a few attempts, each with its own pipe; without
        // the gathering, every one of them carries only the first write.
        let mut sizes = Vec::new();
        for _ in 0..5 {
            let (stdio, ends) = Stdio::pipes().unwrap();
            write_child_stdout(&ends, &[b'x'; 4096]);
            // Small writes in a row, as busybox `head` makes them, while the read gathers.
            let writer = std::thread::spawn(move || {
                for _ in 0..64 {
                    write_child_stdout(&ends, &[b'y'; 4096]);
                }
                ends
            });
            let first = stdio
                .read(false, 1 << 20, checked(|| false))
                .unwrap()
                .unwrap();
            let ends = writer.join().unwrap();
            drop(ends);
            let mut total = first.len();
            while let Some(c) = stdio.read(false, 1 << 20, checked(|| false)).unwrap() {
                total += c.len();
            }
            assert_eq!(total, 65 * 4096);
            if first.len() > 4096 {
                return;
            }
            sizes.push(first.len());
        }
        panic!("every reply carried only the first write: {sizes:?} bytes");
    }

    #[test]
    fn a_running_process_keeps_its_stream_across_silences() {
        let (stdio, ends) = Stdio::pipes().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(AFTER_EXIT_IDLE * 2);
            write_child_stdout(&ends, b"later");
            ends
        });
        assert_eq!(
            stdio
                .read(false, 1024, checked(|| false))
                .unwrap()
                .as_deref(),
            Some(&b"later"[..])
        );
        drop(writer.join().unwrap());
        // All writers gone: a plain EOF.
        assert_eq!(stdio.read(false, 1024, checked(|| false)).unwrap(), None);
    }

    #[test]
    fn a_background_writer_keeps_the_stream_only_for_a_while_after_the_exit() {
        // `sh -c '(while :; do echo more; sleep 0.05; done) & exit 0'`: the leftover writes
        // more often than the idle time, so only the bound ends its stream.
        let (stdio, ends) = Stdio::pipes().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    write_child_stdout(&ends, b"more\n");
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let t = Instant::now();
        let mut replies = 0;
        while stdio.read(false, 1024, checked(|| true)).unwrap().is_some() {
            replies += 1;
            assert!(
                t.elapsed() < AFTER_EXIT_MOST * 5,
                "the stream went on for {:?} after the exit",
                t.elapsed()
            );
        }
        assert!(
            t.elapsed() >= AFTER_EXIT_MOST,
            "ended early: {:?}",
            t.elapsed()
        );
        assert!(replies > 1, "{replies}");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        writer.join().unwrap();
    }

    #[test]
    fn what_the_process_wrote_comes_whole_however_late_it_is_read() {
        // A host too busy to ask for the output promptly: the bound has passed when most
        // of the process's own output is still in the pipe; all of it still comes.
        let (stdio, ends) = Stdio::pipes().unwrap();
        let data: Vec<u8> = (0..200u32 << 10).map(|i| (i % 251) as u8).collect();
        write_child_stdout(&ends, &data);
        let mut got = stdio
            .read(false, 16 << 10, checked(|| true))
            .unwrap()
            .unwrap();
        std::thread::sleep(AFTER_EXIT_MOST + Duration::from_millis(100));
        while let Some(c) = stdio.read(false, 16 << 10, checked(|| true)).unwrap() {
            got.extend_from_slice(&c);
        }
        assert!(got == data, "got {} of {} bytes", got.len(), data.len());
        drop(ends);
    }
}
