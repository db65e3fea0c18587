//! What device threads share: a poll(2) that reports every failure instead of spinning or
//! ending quietly, and the thread start that installs the device threads' seccomp filter
//! and logs why a device thread stopped.
//!
//! A device thread that returns without a word leaves a device that no longer moves data
//! (a vsock the shim cannot reach, a NIC that drops every frame) and nothing in husk-vmm's
//! log (its stderr, `vmm.log` under the shim) to say so. Every loop therefore returns a
//! [`ThreadStop`] when it fails, and [`spawn`] writes it to stderr before the thread ends
//! (an input that simply ends, as console input at EOF, ends its thread quietly).

use std::io::{self, Write};
use std::os::fd::RawFd;

use crate::seccomp::{Filters, ThreadKind};

/// Why a device thread stopped.
#[derive(Debug, thiserror::Error)]
pub enum ThreadStop {
    /// poll(2) failed.
    #[error("polling {what}: {source}")]
    Poll {
        /// The fds waited on.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An fd waited on is not open (poll says POLLNVAL): it would report ready forever.
    #[error("polling {what}: fd {fd} is not open")]
    NotOpen {
        /// The fds waited on.
        what: &'static str,
        /// The fd.
        fd: RawFd,
    },
    /// Reading the input the thread forwards failed.
    #[error("reading {what}: {source}")]
    Read {
        /// The input.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Waits on `fds` for at most `timeout_ms` (-1: no limit), retrying on EINTR; returns how
/// many have events. An fd that is not open is an error, not an event.
pub fn poll(
    what: &'static str,
    fds: &mut [libc::pollfd],
    timeout_ms: libc::c_int,
) -> Result<usize, ThreadStop> {
    let n = libc::nfds_t::try_from(fds.len()).expect("a handful of fds");
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed slice of `n` pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ThreadStop::Poll { what, source: e });
        }
        if let Some(bad) = fds.iter().find(|p| p.revents & libc::POLLNVAL != 0) {
            return Err(ThreadStop::NotOpen { what, fd: bad.fd });
        }
        #[cfg(debug_assertions)]
        crate::debug_hooks::run_pending(ThreadKind::Device);
        return Ok(usize::try_from(rc).expect("poll's count is non-negative"));
    }
}

/// Writes the line saying that device thread `name` stopped, and why.
pub(crate) fn report_stop(out: &mut dyn Write, name: &str, why: &ThreadStop) {
    // Nothing is left to tell if stderr itself fails.
    let _ = writeln!(
        out,
        "husk-vmm: device thread {name} stopped: {why} — nothing more passes through it until the VM is restarted"
    );
}

/// Starts thread `name` running `body` under the device threads' seccomp filter
/// (installed first, before anything the guest controls is touched); when `body` fails,
/// says why on stderr.
pub fn spawn<F>(name: &'static str, filters: &Filters, body: F) -> io::Result<()>
where
    F: FnOnce() -> Result<(), ThreadStop> + Send + 'static,
{
    let filters = filters.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            filters.install_or_exit(ThreadKind::Device, name);
            if let Err(why) = body() {
                report_stop(&mut io::stderr().lock(), name, &why);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An fd number no test process has open.
    const NOT_OPEN: RawFd = 1_000_000;

    #[test]
    fn a_closed_fd_is_an_error_not_an_event() {
        let mut fds = [libc::pollfd {
            fd: NOT_OPEN,
            events: libc::POLLIN,
            revents: 0,
        }];
        let e = poll("the test fd", &mut fds, 0).unwrap_err();
        assert!(matches!(e, ThreadStop::NotOpen { fd: NOT_OPEN, .. }), "{e}");
        assert_eq!(e.to_string(), "polling the test fd: fd 1000000 is not open");
    }

    #[test]
    fn a_ready_fd_counts_and_an_idle_one_times_out() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut fds = [libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&a),
            events: libc::POLLIN,
            revents: 0,
        }];
        assert_eq!(poll("a", &mut fds, 0).unwrap(), 0);
        (&b).write_all(b"x").unwrap();
        assert_eq!(poll("a", &mut fds, 1000).unwrap(), 1);
    }

    #[test]
    fn the_stop_line_names_the_thread_and_the_cause() {
        let mut out = Vec::new();
        let why = ThreadStop::NotOpen {
            what: "the muxer's epoll fd",
            fd: 7,
        };
        report_stop(&mut out, "vsock", &why);
        let line = String::from_utf8(out).unwrap();
        assert!(
            line.starts_with(
                "husk-vmm: device thread vsock stopped: polling the muxer's epoll fd: fd 7 is not open"
            ),
            "{line}"
        );
    }
}
