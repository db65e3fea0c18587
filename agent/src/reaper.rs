//! Reaping children and handing exit statuses to whoever waits for them.
//!
//! One thread waits for SIGCHLD (blocked in every other thread) and reaps with
//! `waitpid(-1, WNOHANG)`. As PID 1 it reaps every orphan of the guest; statuses of the
//! processes the agent started itself ([`register`]ed) are kept until [`wait`]ed for.
//!
//! The registration race (a child exiting before it is registered) is closed by holding the
//! table's lock across the spawn: see [`Exits::spawn_registered`].

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
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

#[derive(Default)]
pub struct Exits {
    table: Mutex<HashMap<i32, Option<Exit>>>,
    changed: Condvar,
}

static EXITS: OnceLock<Exits> = OnceLock::new();

pub fn exits() -> &'static Exits {
    EXITS.get_or_init(Exits::default)
}

impl Exits {
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Option<Exit>>> {
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
        t.insert(pid, None);
        Ok((pid, v))
    }

    fn record(&self, pid: i32, exit: Exit) {
        let mut t = self.lock();
        if let Some(slot) = t.get_mut(&pid) {
            *slot = Some(exit);
            self.changed.notify_all();
        }
    }

    /// Waits for a registered process to end, up to `timeout` (forever with `None`). The
    /// status stays available to later waiters until [`Exits::forget`].
    pub fn wait(&self, pid: i32, timeout: Option<Duration>) -> Option<Exit> {
        let mut t = self.lock();
        let deadline = timeout.map(|d| std::time::Instant::now() + d);
        loop {
            match t.get(&pid) {
                Some(Some(e)) => return Some(*e),
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
        self.lock().get(&pid).copied().flatten()
    }

    pub(crate) fn forget(&self, pid: i32) {
        self.lock().remove(&pid);
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
