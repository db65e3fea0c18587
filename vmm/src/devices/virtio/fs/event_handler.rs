//! The virtio-fs call thread: the backend writes a call eventfd when it has returned used
//! buffers; this thread turns that into the device's interrupt (InterruptStatus bit and
//! irqfd), without taking any lock.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::{IrqTrigger, INT_VRING};

/// Starts the thread for `calls`, raising `irq`.
pub fn spawn(calls: Vec<EventFd>, irq: Arc<IrqTrigger>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("virtio-fs".into())
        .spawn(move || loop {
            let mut fds: Vec<libc::pollfd> = calls
                .iter()
                .map(|e| libc::pollfd {
                    fd: e.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let n = libc::nfds_t::try_from(fds.len()).expect("two fds");
            // SAFETY: `fds` holds valid pollfds for eventfds this thread owns.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, -1) };
            if rc < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            let mut fired = false;
            for (fd, evt) in fds.iter().zip(&calls) {
                if fd.revents & libc::POLLIN != 0 {
                    let _ = evt.read();
                    fired = true;
                }
            }
            if fired {
                let _ = irq.trigger(INT_VRING);
            }
        })?;
    Ok(())
}
