//! The task service's part of the sandbox's metrics: its containers, counted at each scrape.

use std::sync::{Arc, Mutex};

use containerd_shim::api::Status;

use super::Inner;
use crate::metrics::Containers;
use crate::sandbox::Sandbox;

/// Serves the sandbox's metrics socket (see [`crate::metrics::serve`]), counting the
/// containers of `inner` by the state of their init process.
pub(super) fn serve(sb: &Arc<Sandbox>, inner: &Arc<Mutex<Inner>>) {
    let inner = Arc::downgrade(inner);
    crate::metrics::serve(sb, move || {
        let Some(inner) = inner.upgrade() else {
            return Containers::default();
        };
        let inner = inner.lock().unwrap_or_else(|e| e.into_inner());
        count(inner.containers.values().map(|c| {
            let execs = c
                .execs
                .values()
                .filter(|p| p.state().status == Status::RUNNING)
                .count();
            (c.init.state().status, execs)
        }))
    });
}

/// Containers by state, from `(init status, running execs)` per container.
fn count(containers: impl Iterator<Item = (Status, usize)>) -> Containers {
    let mut n = Containers::default();
    for (status, execs) in containers {
        match status {
            Status::CREATED => n.created += 1,
            Status::RUNNING => n.running += 1,
            Status::PAUSED | Status::PAUSING => n.paused += 1,
            _ => n.stopped += 1,
        }
        n.execs_running += u64::try_from(execs).unwrap_or(u64::MAX);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_are_counted_by_their_init_state() {
        let n = count(
            [
                (Status::RUNNING, 2),
                (Status::RUNNING, 0),
                (Status::CREATED, 0),
                (Status::PAUSED, 1),
                (Status::STOPPED, 0),
            ]
            .into_iter(),
        );
        assert_eq!(
            n,
            Containers {
                created: 1,
                running: 2,
                paused: 1,
                stopped: 1,
                execs_running: 3,
            }
        );
    }
}
