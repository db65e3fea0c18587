//! The virtio-fs call thread: the backend writes a call eventfd when it has returned used
//! buffers; this thread turns that into the device's interrupt (InterruptStatus bit and
//! irqfd), without taking any lock. If waiting fails, the thread stops and says why (see
//! [`crate::devices::thread`]).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::thread::{self, ThreadStop};
use crate::devices::virtio::{IrqTrigger, INT_VRING};
use crate::seccomp::Filters;

/// Starts the thread for `calls`, raising `irq`.
pub fn spawn(calls: Vec<EventFd>, irq: Arc<IrqTrigger>, filters: &Filters) -> std::io::Result<()> {
    thread::spawn("virtio-fs", filters, move || {
        Err(run(&calls, || {
            let _ = irq.trigger(INT_VRING);
        }))
    })
}

/// Waits for any of `calls` and calls `fire` once per wake-up that consumed a call;
/// returns only when waiting fails.
fn run(calls: &[EventFd], mut fire: impl FnMut()) -> ThreadStop {
    loop {
        let mut fds: Vec<libc::pollfd> = calls
            .iter()
            .map(|e| libc::pollfd {
                fd: e.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if let Err(why) = thread::poll("the virtio-fs call eventfds", &mut fds, -1) {
            return why;
        }
        let mut fired = false;
        for (fd, evt) in fds.iter().zip(calls) {
            if fd.revents & libc::POLLIN != 0 {
                let _ = evt.read();
                fired = true;
            }
        }
        if fired {
            fire();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    #[test]
    fn a_failed_wait_stops_the_loop_with_the_reason() {
        let ok = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // SAFETY: 1_000_000 is no open fd; the EventFd is forgotten below, never closed.
        let bad = unsafe { EventFd::from_raw_fd(1_000_000) };
        let calls = vec![ok, bad];
        let why = run(&calls, || panic!("nothing was called"));
        assert_eq!(
            why.to_string(),
            "polling the virtio-fs call eventfds: fd 1000000 is not open"
        );
        for e in calls.into_iter().skip(1) {
            std::mem::forget(e);
        }
    }
}
