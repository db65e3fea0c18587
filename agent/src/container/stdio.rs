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
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
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

/// After the first bytes of a read, how long to wait for more before replying: coalesces a
/// writer's small writes into large replies (bulk output is bound by RPC round trips
/// otherwise) at the cost of at most this much latency per reply.
const COALESCE: Duration = Duration::from_millis(2);

/// After the process ended, how long its stream may stay silent before it counts as ended.
/// (A pty's last bytes pass through the tty layer's work queue after the write returns; this
/// leaves them ample time.)
pub(crate) const AFTER_EXIT_IDLE: Duration = Duration::from_millis(250);

/// How often a blocked read looks whether the process has ended.
const EXIT_CHECK: Duration = Duration::from_millis(100);

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(Error::Pipe)?;
    // Best effort: a smaller pipe only costs throughput.
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own, integer argument.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    Ok((r, w))
}

/// Whether `fd` has bytes (or EOF) within `timeout`.
fn readable(fd: &File, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll on one pollfd we own.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// Waits until `f` is readable (bytes or EOF): true; false once the process has `ended` and
/// `f` then stays silent for [`AFTER_EXIT_IDLE`].
fn wait_readable(f: &File, ended: &impl Fn() -> bool) -> bool {
    let mut silent_since: Option<Instant> = None;
    loop {
        if readable(f, EXIT_CHECK) {
            return true;
        }
        match silent_since {
            None if ended() => silent_since = Some(Instant::now()),
            Some(t) if t.elapsed() >= AFTER_EXIT_IDLE => return false,
            _ => {}
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
    /// `ended` says whether the process has ended (see [`AFTER_EXIT_IDLE`]).
    pub fn read(
        &self,
        err: bool,
        max: usize,
        ended: impl Fn() -> bool,
    ) -> Result<Option<Vec<u8>>, Error> {
        let m = if err { &self.stderr } else { &self.stdout };
        let mut g = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(f) = g.as_mut() else {
            return Ok(None);
        };
        if !wait_readable(f, &ended) {
            *g = None;
            return Ok(None);
        }
        let mut buf = vec![0u8; max];
        let mut len = 0;
        let mut deadline: Option<Instant> = None;
        loop {
            if let Some(d) = deadline {
                let now = Instant::now();
                if len == max || now >= d || !readable(f, d - now) {
                    buf.truncate(len);
                    return Ok(Some(buf));
                }
            }
            match f.read(&mut buf[len..]) {
                // EOF (or a pty whose slave is gone): reply with what we have; the next read
                // sees the end again and reports it.
                Ok(0) => {}
                Err(e) if e.raw_os_error() == Some(libc::EIO) && self.pty.is_some() => {}
                Ok(n) => {
                    len += n;
                    deadline.get_or_insert_with(|| Instant::now() + COALESCE);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Read {
                        stream: if err { "stderr" } else { "stdout" },
                        source,
                    })
                }
            }
            if len == 0 {
                *g = None;
                return Ok(None);
            }
            buf.truncate(len);
            return Ok(Some(buf));
        }
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
            stdio.read(false, 1024, || true).unwrap().as_deref(),
            Some(&b"last words"[..])
        );
        assert_eq!(stdio.read(false, 1024, || true).unwrap(), None);
        assert!(t.elapsed() >= AFTER_EXIT_IDLE, "ended before the idle time");
        drop(ends);
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
            stdio.read(false, 1024, || false).unwrap().as_deref(),
            Some(&b"later"[..])
        );
        drop(writer.join().unwrap());
        // All writers gone: a plain EOF.
        assert_eq!(stdio.read(false, 1024, || false).unwrap(), None);
    }
}
