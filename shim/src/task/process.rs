//! A process of a container as the shim tracks it: its state, exit, and the event that
//! reports the exit.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::events::Publisher;
use containerd_shim::api::Status;
use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;

use super::publish;
use crate::io::StdioPaths;

fn now() -> Timestamp {
    Timestamp::now()
}

#[derive(Debug, Clone)]
pub(super) struct ProcState {
    pub(super) pid: u32,
    pub(super) status: Status,
    pub(super) exit: Option<(u32, Timestamp)>,
}

/// One process (a container's init, exec id "", or an exec).
#[derive(Debug)]
pub(super) struct Proc {
    pub(super) cid: String,
    pub(super) eid: String,
    pub(super) stdio: StdioPaths,
    /// For execs: the OCI process as JSON.
    pub(super) process_json: Vec<u8>,
    pub(super) state: Mutex<ProcState>,
    pub(super) exited: Condvar,
    /// The output fifos once the process runs; closed when containerd deletes it.
    pub(super) outputs: Mutex<Option<crate::io::Outputs>>,
    /// Whether a SIGKILL's outcome is being watched.
    kill_watched: std::sync::atomic::AtomicBool,
}

impl Proc {
    pub(super) fn new(cid: &str, eid: &str, stdio: StdioPaths, process_json: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            cid: cid.into(),
            eid: eid.into(),
            stdio,
            process_json,
            state: Mutex::new(ProcState {
                pid: 0,
                status: Status::CREATED,
                exit: None,
            }),
            exited: Condvar::new(),
            outputs: Mutex::new(None),
            kill_watched: Default::default(),
        })
    }

    /// Waits up to `bound` for the exit; whether it came.
    pub(super) fn wait_exit(&self, bound: std::time::Duration) -> bool {
        let s = self.state();
        let (s, _) = self
            .exited
            .wait_timeout_while(s, bound, |s| s.exit.is_none())
            .unwrap_or_else(|e| e.into_inner());
        s.exit.is_some()
    }

    /// Claims the one watch of a SIGKILL's outcome ([`super::Service::kill`]): true for the
    /// first caller only, so repeated kills do not pile up watchers.
    pub(super) fn claim_kill_watch(&self) -> bool {
        !self
            .kill_watched
            .swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    pub(super) fn state(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the exit once; returns false if it was already recorded.
    pub(super) fn set_exit(&self, status: u32) -> bool {
        let mut s = self.state();
        if s.exit.is_some() {
            return false;
        }
        s.exit = Some((status, now()));
        s.status = Status::STOPPED;
        self.exited.notify_all();
        true
    }

    /// Records the exit and tells containerd (once, whoever sees the end first).
    pub(super) fn finish(&self, status: u32, publisher: &Publisher, ns: &str) {
        if !self.set_exit(status) {
            return;
        }
        let s = self.state();
        let ev = TaskExit {
            container_id: self.cid.clone(),
            id: self.id().to_string(),
            pid: s.pid,
            exit_status: status,
            exited_at: MessageField::some(s.exit.as_ref().map(|e| e.1.clone()).unwrap_or_else(now)),
            ..Default::default()
        };
        drop(s);
        publish(publisher, ns, topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev));
    }

    /// Closes the output fifos (on Delete): what a lingering process still writes is
    /// dropped, and containerd's reader of the fifos sees their end.
    pub(super) fn close_output(&self) {
        if let Some(o) = self
            .outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            o.close();
        }
    }

    pub(super) fn id(&self) -> &str {
        if self.eid.is_empty() {
            &self.cid
        } else {
            &self.eid
        }
    }
}

#[derive(Debug)]
pub(super) struct Container {
    pub(super) bundle: String,
    pub(super) init: Arc<Proc>,
    pub(super) execs: HashMap<String, Arc<Proc>>,
}

pub(super) fn exit_of(s: &ProcState) -> (u32, MessageField<Timestamp>) {
    match &s.exit {
        Some((code, at)) => (*code, MessageField::some(at.clone())),
        None => (0, MessageField::none()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn proc_() -> Arc<Proc> {
        Proc::new("c", "", StdioPaths::default(), Vec::new())
    }

    #[test]
    fn wait_exit_sees_an_exit_that_comes_and_gives_up_on_one_that_does_not() {
        let p = proc_();
        let t = Instant::now();
        assert!(!p.wait_exit(Duration::from_millis(200)));
        assert!(t.elapsed() >= Duration::from_millis(200));
        let q = p.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            q.set_exit(137);
        });
        assert!(p.wait_exit(Duration::from_secs(10)));
        // Already ended: at once.
        assert!(p.wait_exit(Duration::ZERO));
    }

    #[test]
    fn a_kill_watch_is_claimed_once() {
        let p = proc_();
        assert!(p.claim_kill_watch());
        assert!(!p.claim_kill_watch());
    }
}
