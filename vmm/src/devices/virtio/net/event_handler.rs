//! The virtio-net event thread: polls the tap (unless the device said it cannot take
//! frames now) and the device's kick eventfd; when the tap has frames it has the
//! transport run the device. The flag is set before each run, so a device that cannot
//! take the frames (not active, no rx buffers) leaves it set and the thread waits for the
//! kick instead of spinning on a readable tap.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::SharedTransport;

/// Starts the thread.
pub fn spawn(
    tap: RawFd,
    rx_blocked: Arc<AtomicBool>,
    kick: EventFd,
    transport: SharedTransport,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("net".into())
        .spawn(move || loop {
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
            // SAFETY: `fds` is an array of two valid pollfds; both fds outlive this thread (the
            // kick is owned here, the tap by the device, which lives as long as the VMM).
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                let _ = kick.read();
            }
            if fds[1].revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
                rx_blocked.store(true, Ordering::Release);
                transport.lock().expect("transport lock").service();
            }
        })?;
    Ok(())
}
