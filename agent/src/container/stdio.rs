//! A process's stdio on the agent's side: pipes, or a pty whose master carries both ways.
//!
//! Reads block until bytes are there or the stream ends (long-poll RPCs, see
//! `husk_protocols`). A pty master returns EIO once the last slave is closed: that is EOF.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;

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
pub struct ChildEnds {
    pub fds: [OwnedFd; 3],
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))
}

impl Stdio {
    /// Pipes for stdin, stdout and stderr.
    pub fn pipes() -> Result<(Self, ChildEnds), String> {
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
            ChildEnds { fds: [in_r, out_w, err_w] },
        ))
    }

    /// A pty: the slave is the child's stdin, stdout and stderr.
    pub fn pty() -> Result<(Self, ChildEnds), String> {
        let p = nix::pty::openpty(None, None).map_err(|e| format!("openpty: {e}"))?;
        for fd in [p.master.as_raw_fd(), p.slave.as_raw_fd()] {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
                .map_err(|e| format!("pty cloexec: {e}"))?;
        }
        let master = File::from(p.master);
        let m2 = master.try_clone().map_err(|e| format!("dup pty master: {e}"))?;
        let m3 = master.try_clone().map_err(|e| format!("dup pty master: {e}"))?;
        let s1 = p.slave.try_clone().map_err(|e| format!("dup pty slave: {e}"))?;
        let s2 = p.slave.try_clone().map_err(|e| format!("dup pty slave: {e}"))?;
        Ok((
            Self {
                stdin: Mutex::new(Some(m2)),
                stdout: Mutex::new(Some(master)),
                stderr: Mutex::new(None),
                pty: Some(m3),
            },
            ChildEnds { fds: [p.slave, s1, s2] },
        ))
    }

    pub fn write_stdin(&self, data: &[u8]) -> Result<usize, String> {
        let mut g = self.stdin.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let f = g.as_mut().ok_or("stdin is closed")?;
        f.write_all(data).map_err(|e| format!("writing stdin: {e}"))?;
        Ok(data.len())
    }

    /// Closes stdin: the process reads EOF. On a pty, sends the EOF character (^D) instead,
    /// since the master also carries the output.
    pub fn close_stdin(&self) -> Result<(), String> {
        let mut g = self.stdin.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.pty.is_some() {
            if let Some(f) = g.as_mut() {
                f.write_all(&[4]).map_err(|e| format!("sending EOF to the pty: {e}"))?;
            }
        }
        *g = None;
        Ok(())
    }

    /// Reads up to `max` bytes of stdout (`err`: stderr), blocking until there are some.
    /// `Ok(None)`: the stream has ended.
    pub fn read(&self, err: bool, max: usize) -> Result<Option<Vec<u8>>, String> {
        let m = if err { &self.stderr } else { &self.stdout };
        let mut g = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(f) = g.as_mut() else {
            return Ok(None);
        };
        let mut buf = vec![0u8; max];
        loop {
            match f.read(&mut buf) {
                Ok(0) => {
                    *g = None;
                    return Ok(None);
                }
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EIO) && self.pty.is_some() => {
                    *g = None;
                    return Ok(None);
                }
                Err(e) => return Err(format!("reading {}: {e}", if err { "stderr" } else { "stdout" })),
            }
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), String> {
        let fd = self.pty.as_ref().ok_or("the process has no terminal")?.as_raw_fd();
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize we own; fd is the pty master this struct owns.
        if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(format!("resizing the terminal: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}
