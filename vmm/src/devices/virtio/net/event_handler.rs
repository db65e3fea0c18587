//! The virtio-net event thread: polls the tap (unless the device said it cannot take
//! frames now) and the device's kick eventfd; when the tap has frames it has the
//! transport run the device. The flag is set before each run, so a device that cannot
//! take the frames (not active, no rx buffers) leaves it set and the thread waits for the
//! kick instead of spinning on a readable tap. If waiting itself fails, the thread stops
//! and says why (see [`crate::devices::thread`]).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::SharedTransport;
use crate::devices::thread::{self, ThreadStop};
use crate::seccomp::Filters;

/// Starts the thread.
pub fn spawn(
    tap: RawFd,
    rx_blocked: Arc<AtomicBool>,
    kick: EventFd,
    transport: SharedTransport,
    filters: &Filters,
) -> std::io::Result<()> {
    // The tap fd is owned by the device, which lives as long as the VMM; the kick is
    // owned by the thread.
    thread::spawn("net", filters, move || {
        Err(run(tap, &rx_blocked, &kick, || {
            transport.lock().expect("transport lock").service();
        }))
    })
}

/// Waits for the kick or a readable `tap`, and calls `service` when the tap has frames;
/// returns only when waiting fails.
fn run(
    tap: RawFd,
    rx_blocked: &AtomicBool,
    kick: &EventFd,
    mut service: impl FnMut(),
) -> ThreadStop {
    loop {
        let tap_events = if rx_blocked.load(Ordering::Acquire) {
            0
        } else {
            libc::POLLIN
        };
        let mut fds = [
            libc::pollfd {
                fd: kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: tap,
                events: tap_events,
                revents: 0,
            },
        ];
        if let Err(why) = thread::poll("the tap and the net kick eventfd", &mut fds, -1) {
            return why;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let _ = kick.read();
        }
        if fds[1].revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
            rx_blocked.store(true, Ordering::Release);
            service();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_wait_stops_the_loop_with_the_reason() {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // Even while the device cannot take frames (no tap events asked for), a tap fd
        // that is not open ends the loop instead of being ignored.
        let blocked = AtomicBool::new(true);
        let why = run(1_000_000, &blocked, &kick, || panic!("no frames"));
        assert_eq!(
            why.to_string(),
            "polling the tap and the net kick eventfd: fd 1000000 is not open"
        );
    }
}
