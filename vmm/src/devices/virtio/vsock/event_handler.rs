//! The vsock event thread: waits until a host socket of the muxer is ready, lets the muxer
//! take the events, and when there is something for the guest has the transport run the
//! device (under the transport's lock, as a vCPU's QueueNotify would).
//!
//! It never spins: the muxer drains its epoll set on every round, and a packet that cannot
//! be delivered for want of rx buffers waits for the guest's next rx notification. If
//! waiting itself fails, the thread stops and says why (see [`crate::devices::thread`]).

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::unix::Muxer;
use crate::device_manager::SharedTransport;
use crate::devices::thread::{self, ThreadStop};
use crate::seccomp::Filters;

/// Starts the thread for `muxer`, whose device sits in `transport`.
pub fn spawn(
    muxer: Arc<Mutex<Muxer>>,
    transport: SharedTransport,
    filters: &Filters,
) -> std::io::Result<()> {
    let fd: RawFd = muxer.lock().expect("muxer lock").epoll_fd();
    // The epoll fd lives as long as the muxer, which this thread keeps alive through its Arc.
    let timeouts = muxer.clone();
    thread::spawn("vsock", filters, move || {
        Err(run(
            fd,
            || timeouts.lock().expect("muxer lock").next_timeout(),
            || {
                let pending = {
                    let mut m = muxer.lock().expect("muxer lock");
                    m.poll_host();
                    m.has_pending_rx()
                };
                if pending {
                    transport.lock().expect("transport lock").service();
                }
            },
        ))
    })
}

/// Waits for the muxer's epoll fd `fd` — or the next connect timeout, which
/// `next_timeout` gives — and calls `ready` after each wait; returns only when waiting
/// fails.
fn run(
    fd: RawFd,
    mut next_timeout: impl FnMut() -> Option<Duration>,
    mut ready: impl FnMut(),
) -> ThreadStop {
    loop {
        let mut pfd = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        // Wake up for the next connect timeout too, not only for socket events.
        let timeout = next_timeout().map_or(-1, |d| {
            libc::c_int::try_from(d.as_millis() + 1).unwrap_or(libc::c_int::MAX)
        });
        if let Err(why) = thread::poll("the vsock muxer's epoll fd", &mut pfd, timeout) {
            return why;
        }
        ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_wait_stops_the_loop_with_the_reason() {
        let why = run(1_000_000, || None, || panic!("nothing is ready"));
        assert_eq!(
            why.to_string(),
            "polling the vsock muxer's epoll fd: fd 1000000 is not open"
        );
    }
}
