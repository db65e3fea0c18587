//! Reaping children and handing exit statuses to whoever waits for them.
//!
//! One thread waits for SIGCHLD (blocked in every other thread) and reaps with
//! `waitpid(-1, WNOHANG)`. As PID 1 it reaps every orphan of the guest; statuses of the
//! processes the agent started itself ([`register`]ed) are kept until [`wait`]ed for.
//!
//! The registration race (a child exiting before it is registered) is closed by holding the
//! table's lock across the spawn: see [`Exits::spawn_registered`].

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// Shell convention: the exit code, or 128 + the signal number.
    pub fn status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// A registered process: its exit once reaped, and the eventfd [`Exits::ended_fd`] handed
/// out, if any, which becomes readable then.
#[derive(Default)]
struct Slot {
    exit: Option<Exit>,
    ended: Option<Arc<OwnedFd>>,
}

#[derive(Default)]
pub struct Exits {
    table: Mutex<HashMap<i32, Slot>>,
    changed: Condvar,
}

/// Makes `fd` (an eventfd) readable for good: nobody reads it, so it stays so.
fn signal(fd: &OwnedFd) {
    // Cannot fail but by overflowing the counter, which one write per exit never does.
    let _ = nix::unistd::write(fd.as_fd(), &1u64.to_ne_bytes());
}

static EXITS: OnceLock<Exits> = OnceLock::new();

pub fn exits() -> &'static Exits {
    EXITS.get_or_init(Exits::default)
}

impl Exits {
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Slot>> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `spawn` (which returns the new child's PID) with the table locked, and registers
    /// the PID before the reaper can record its exit.
    pub(crate) fn spawn_registered<T, E>(
        &self,
        spawn: impl FnOnce() -> Result<(i32, T), E>,
    ) -> Result<(i32, T), E> {
        let mut t = self.lock();
        let (pid, v) = spawn()?;
        t.insert(pid, Slot::default());
        Ok((pid, v))
    }

    fn record(&self, pid: i32, exit: Exit) {
        let mut t = self.lock();
        if let Some(slot) = t.get_mut(&pid) {
            slot.exit = Some(exit);
            if let Some(fd) = &slot.ended {
                signal(fd);
            }
            self.changed.notify_all();
        }
    }

    /// A file descriptor that becomes readable (and stays so) once the registered process
    /// `pid` has ended, for a thread that waits in `poll` for that or for something else
    /// (a stream of the process): it then needs no timeout to notice the end. `None`: `pid`
    /// is not registered, or no eventfd could be made (the caller looks at [`Self::exited`]
    /// from time to time instead).
    pub fn ended_fd(&self, pid: i32) -> Option<Arc<OwnedFd>> {
        let mut t = self.lock();
        let slot = t.get_mut(&pid)?;
        if let Some(fd) = &slot.ended {
            return Some(fd.clone());
        }
        let fd = Arc::new(
            nix::sys::eventfd::EventFd::from_value_and_flags(
                0,
                nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
            )
            .ok()?
            .into(),
        );
        if slot.exit.is_some() {
            signal(&fd);
        }
        slot.ended = Some(fd.clone());
        Some(fd)
    }

    /// Waits for a registered process to end, up to `timeout` (forever with `None`). The
    /// status stays available to later waiters until [`Exits::forget`].
    pub fn wait(&self, pid: i32, timeout: Option<Duration>) -> Option<Exit> {
        let mut t = self.lock();
        let deadline = timeout.map(|d| std::time::Instant::now() + d);
        loop {
            match t.get(&pid).map(|s| s.exit) {
                Some(Some(e)) => return Some(e),
                Some(None) => {}
                None => return None,
            }
            t = match deadline {
                None => self
                    .changed
                    .wait(t)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.changed
                        .wait_timeout(t, d - now)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// The exit, if the process has ended (never blocks).
    pub fn exited(&self, pid: i32) -> Option<Exit> {
        self.lock().get(&pid).and_then(|s| s.exit)
    }

    /// Drops `pid`'s slot. A thread still waiting on its exit fd is woken as if it had
    /// ended: nobody waits for the process any more.
    pub(crate) fn forget(&self, pid: i32) {
        if let Some(Slot {
            ended: Some(fd), ..
        }) = self.lock().remove(&pid)
        {
            signal(&fd);
        }
    }
}

/// Why the reaper could not start (the agent then cannot run containers).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("blocking SIGCHLD: {0}")]
    BlockSigchld(#[source] nix::errno::Errno),
    #[error("spawning the reaper thread: {0} — the guest is out of memory or threads")]
    Thread(#[source] std::io::Error),
}

/// Blocks SIGCHLD in the calling thread (and so in every thread started after) and starts
/// the reaper thread. Call before starting any other thread.
pub fn start() -> Result<(), Error> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.thread_block().map_err(Error::BlockSigchld)?;
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || loop {
            // A timeout-free sigwait could miss nothing (SIGCHLD is level-like while a
            // zombie exists), but reap once per wake-up until none is left.
            if set.wait().is_err() {
                continue;
            }
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) => {
                        exits().record(pid.as_raw(), Exit::Code(code))
                    }
                    Ok(WaitStatus::Signaled(pid, sig, _)) => {
                        exits().record(pid.as_raw(), Exit::Signal(sig as i32))
                    }
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .map_err(Error::Thread)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: &OwnedFd) -> bool {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own, no waiting.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn the_exit_fd_becomes_readable_when_the_exit_is_recorded() {
        let exits = Exits::default();
        // Not registered: no fd, the caller looks instead.
        assert!(exits.ended_fd(41).is_none());
        for pid in [42, 43] {
            exits.spawn_registered(|| Ok::<_, ()>((pid, ()))).unwrap();
        }
        let fd = exits.ended_fd(42).unwrap();
        assert!(!readable(&fd));
        assert!(
            Arc::ptr_eq(&fd, &exits.ended_fd(42).unwrap()),
            "one fd per process"
        );
        exits.record(42, Exit::Code(0));
        assert!(readable(&fd) && readable(&fd), "stays readable");
        // Asked for after the exit: readable at once.
        exits.record(43, Exit::Signal(9));
        assert!(readable(&exits.ended_fd(43).unwrap()));
        exits.forget(42);
        assert!(readable(&fd), "a holder's fd outlives the slot");
        // Forgotten before it ended (a process that would not die): its waiters are woken.
        exits.spawn_registered(|| Ok::<_, ()>((44, ()))).unwrap();
        let fd = exits.ended_fd(44).unwrap();
        exits.forget(44);
        assert!(readable(&fd));
    }
}
