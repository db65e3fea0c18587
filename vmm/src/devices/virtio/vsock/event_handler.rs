//! The vsock event thread: waits until a host socket of the muxer is ready, lets the muxer
//! take the events, and when there is something for the guest has the transport run the
//! device (under the transport's lock, as a vCPU's QueueNotify would).
//!
//! It never spins: the muxer drains its epoll set on every round, and a packet that cannot
//! be delivered for want of rx buffers waits for the guest's next rx notification.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use super::unix::Muxer;
use crate::device_manager::SharedTransport;

/// Starts the thread for `muxer`, whose device sits in `transport`.
pub fn spawn(muxer: Arc<Mutex<Muxer>>, transport: SharedTransport) -> std::io::Result<()> {
    let fd: RawFd = muxer.lock().expect("muxer lock").epoll_fd();
    std::thread::Builder::new()
        .name("vsock".into())
        .spawn(move || loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // Wake up for the next connect timeout too, not only for socket events.
            let timeout = muxer
                .lock()
                .expect("muxer lock")
                .next_timeout()
                .map_or(-1, |d| {
                    libc::c_int::try_from(d.as_millis() + 1).unwrap_or(libc::c_int::MAX)
                });
            // SAFETY: `pfd` is one valid pollfd; the epoll fd lives as long as the muxer, which
            // this thread keeps alive through its Arc.
            let rc = unsafe { libc::poll(&mut pfd, 1, timeout) };
            if rc < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            let pending = {
                let mut m = muxer.lock().expect("muxer lock");
                m.poll_host();
                m.has_pending_rx()
            };
            if pending {
                transport.lock().expect("transport lock").service();
            }
        })?;
    Ok(())
}
