//! Whether the vCPUs run, are paused or must stop, and how their threads are told: a flag
//! plus a real-time signal that knocks a thread out of KVM_RUN. A kick can land just before
//! a thread enters KVM_RUN and be lost, so every request is repeated until each thread
//! has acknowledged it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that knocks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the (empty) handler for the kick signal, once per process. Without a handler
/// the signal would kill the process; with it, KVM_RUN returns EINTR.
pub fn install_kick_handler() {
    static HANDLER: Once = Once::new();
    HANDLER.call_once(|| {
        // Registration only fails for an invalid signal number, and SIGRTMIN is valid.
        register_signal_handler(kick_signal(), kick_handler).expect("SIGRTMIN handler");
    });
}

/// Errors of pause/resume.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunStateError {
    /// Not every vCPU stopped in time.
    #[error("{parked} of {total} vCPUs paused within {waited:?}")]
    PauseTimeout {
        /// vCPUs that did pause.
        parked: usize,
        /// vCPUs in the VM.
        total: usize,
        /// How long we waited.
        waited: Duration,
    },
    /// The VM is stopping.
    #[error("the VM is stopping")]
    Stopping,
}

/// Shared run state of all vCPU threads.
#[derive(Debug, Default)]
pub struct RunState {
    stop: AtomicBool,
    paused: Mutex<bool>,
    resumed: Condvar,
    parked: AtomicUsize,
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl RunState {
    /// Records the calling thread as a vCPU thread (to be kicked).
    pub fn register_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads.lock().expect("run state lock").push(me);
    }

    /// Whether the VM is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Whether a pause is requested.
    pub fn pause_requested(&self) -> bool {
        *self.paused.lock().expect("run state lock")
    }

    /// vCPU threads currently parked.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Acquire)
    }

    /// Called by a vCPU thread that saw a pause request: blocks until resumed or stopped.
    pub fn park(&self) {
        let mut paused = self.paused.lock().expect("run state lock");
        self.parked.fetch_add(1, Ordering::AcqRel);
        while *paused && !self.stopping() {
            paused = self.resumed.wait(paused).expect("run state lock");
        }
        self.parked.fetch_sub(1, Ordering::AcqRel);
    }

    /// Knocks every vCPU thread out of KVM_RUN once (it goes round its loop and re-enters).
    pub fn kick_all(&self) {
        let threads = self.threads.lock().expect("run state lock");
        for t in threads.iter() {
            // SAFETY: every registered thread is a vCPU thread that lives until the VM has
            // stopped, and the handler for this signal is installed.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    fn thread_count(&self) -> usize {
        self.threads.lock().expect("run state lock").len()
    }

    /// Pauses every vCPU and waits until all are parked.
    pub fn pause(&self, timeout: Duration) -> Result<(), RunStateError> {
        if self.stopping() {
            return Err(RunStateError::Stopping);
        }
        *self.paused.lock().expect("run state lock") = true;
        let start = Instant::now();
        let total = self.thread_count();
        while self.parked() < total {
            if start.elapsed() > timeout {
                return Err(RunStateError::PauseTimeout {
                    parked: self.parked(),
                    total,
                    waited: timeout,
                });
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), RunStateError> {
        if self.stopping() {
            return Err(RunStateError::Stopping);
        }
        *self.paused.lock().expect("run state lock") = false;
        self.resumed.notify_all();
        Ok(())
    }

    /// Tells every vCPU thread to return, waking parked ones and kicking running ones,
    /// until `all_done` says they have.
    pub fn stop(&self, all_done: impl Fn() -> bool) {
        self.stop.store(true, Ordering::Release);
        {
            let _guard = self.paused.lock().expect("run state lock");
            self.resumed.notify_all();
        }
        while !all_done() {
            self.kick_all();
            self.resumed.notify_all();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A stand-in vCPU thread: parks when asked, returns when stopped.
    fn fake_vcpu(state: Arc<RunState>) -> std::thread::JoinHandle<u32> {
        std::thread::spawn(move || {
            state.register_current_thread();
            let mut parks = 0;
            while !state.stopping() {
                if state.pause_requested() {
                    state.park();
                    parks += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            parks
        })
    }

    #[test]
    fn pause_waits_for_every_thread_and_resume_releases_them() {
        install_kick_handler();
        let state = Arc::new(RunState::default());
        let threads: Vec<_> = (0..3).map(|_| fake_vcpu(state.clone())).collect();
        while state.thread_count() < 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        state.pause(Duration::from_secs(5)).unwrap();
        assert_eq!(state.parked(), 3);
        state.resume().unwrap();
        while state.parked() > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        state.pause(Duration::from_secs(5)).unwrap();
        state.stop(|| threads.iter().all(|t| t.is_finished()));
        assert_eq!(
            state.pause(Duration::from_secs(1)),
            Err(RunStateError::Stopping)
        );
        for t in threads {
            assert_eq!(t.join().unwrap(), 2);
        }
    }

    #[test]
    fn pause_times_out_when_a_thread_never_parks() {
        install_kick_handler();
        let state = Arc::new(RunState::default());
        let s = state.clone();
        let stuck = std::thread::spawn(move || {
            s.register_current_thread();
            while !s.stopping() {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        while state.thread_count() < 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = state.pause(Duration::from_millis(50)).unwrap_err();
        assert!(
            matches!(
                e,
                RunStateError::PauseTimeout {
                    parked: 0,
                    total: 1,
                    ..
                }
            ),
            "{e}"
        );
        state.stop(|| stuck.is_finished());
        stuck.join().unwrap();
    }
}
