//! Debug builds only: the control API's `debug-forbidden` request, which makes one kind of
//! husk-vmm thread attempt a system call its seccomp filter forbids, so the tier-2 tests
//! can watch the filter kill a running VMM (`tests/tests/vmm_seccomp.rs`). Release builds
//! contain none of this.
//!
//! `debug-forbidden <api|vcpu|device> <create PATH|unlink PATH|inet-socket>`: the API
//! thread makes the call at once; a vCPU thread when it next comes out of KVM_RUN (the API
//! kicks them); a device thread when its poll next returns (a client connecting to the
//! vsock socket wakes the vsock thread). Without filters (`--no-seccomp`) the call goes
//! through and its result is printed on stderr, which the tests use as the control.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::seccomp::ThreadKind;

/// A call no thread of a running husk-vmm may make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forbidden {
    /// `open(PATH, O_CREAT | O_EXCL)`: a new file.
    Create(CString),
    /// `unlink(PATH)`.
    Unlink(CString),
    /// `socket(AF_INET, SOCK_STREAM)`.
    InetSocket,
}

/// Whether anything is queued (one load per check point when nothing is).
static ANY: AtomicBool = AtomicBool::new(false);
/// Calls waiting for a thread of their kind.
static PENDING: Mutex<Vec<(ThreadKind, Forbidden)>> = Mutex::new(Vec::new());

/// Parses `<api|vcpu|device> <create PATH|unlink PATH|inet-socket>`.
pub fn parse(args: &str) -> Result<(ThreadKind, Forbidden), String> {
    let usage = "use debug-forbidden <api|vcpu|device> <create PATH|unlink PATH|inet-socket>";
    let mut words = args.split_whitespace();
    let kind = match words.next() {
        Some("api") => ThreadKind::Api,
        Some("vcpu") => ThreadKind::Vcpu,
        Some("device") => ThreadKind::Device,
        _ => return Err(usage.into()),
    };
    let path = |p: Option<&str>| {
        p.and_then(|p| CString::new(p).ok())
            .ok_or_else(|| usage.to_owned())
    };
    let call = match words.next() {
        Some("create") => Forbidden::Create(path(words.next())?),
        Some("unlink") => Forbidden::Unlink(path(words.next())?),
        Some("inet-socket") => Forbidden::InetSocket,
        _ => return Err(usage.into()),
    };
    Ok((kind, call))
}

/// Queues `call` for the next thread of `kind` that reaches a check point.
pub fn request(kind: ThreadKind, call: Forbidden) {
    PENDING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((kind, call));
    ANY.store(true, Ordering::Release);
}

/// A check point of a thread of `kind`: makes the calls queued for that kind.
pub(crate) fn run_pending(kind: ThreadKind) {
    if !ANY.load(Ordering::Acquire) {
        return;
    }
    let mine: Vec<Forbidden> = {
        let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        let (mine, rest): (Vec<_>, Vec<_>) = pending.drain(..).partition(|(k, _)| *k == kind);
        *pending = rest;
        ANY.store(!pending.is_empty(), Ordering::Release);
        mine.into_iter().map(|(_, c)| c).collect()
    };
    for call in mine {
        let result = attempt(&call);
        eprintln!("husk-vmm: debug: a {kind} thread made {call:?}: {result}");
    }
}

/// Makes `call` on the calling thread; says what it gave (seen only without a filter).
pub fn attempt(call: &Forbidden) -> String {
    let rc = match call {
        // SAFETY: a plain open of a NUL-terminated path; the fd is closed at once.
        Forbidden::Create(p) => unsafe {
            let fd = libc::open(
                p.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                0o600,
            );
            if fd >= 0 {
                libc::close(fd);
            }
            fd
        },
        // SAFETY: a plain unlink of a NUL-terminated path.
        Forbidden::Unlink(p) => unsafe { libc::unlink(p.as_ptr()) },
        // SAFETY: plain socket(2); the fd is closed at once.
        Forbidden::InetSocket => unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd >= 0 {
                libc::close(fd);
            }
            fd
        },
    };
    if rc < 0 {
        format!("failed: {}", std::io::Error::last_os_error())
    } else {
        "done".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_give_the_usage() {
        assert_eq!(
            parse("vcpu unlink /tmp/x").unwrap(),
            (
                ThreadKind::Vcpu,
                Forbidden::Unlink(CString::new("/tmp/x").unwrap())
            )
        );
        assert_eq!(
            parse("device inet-socket").unwrap(),
            (ThreadKind::Device, Forbidden::InetSocket)
        );
        for bad in ["", "vmm inet-socket", "api create", "api chmod /x"] {
            assert!(
                parse(bad).unwrap_err().starts_with("use debug-forbidden"),
                "{bad}"
            );
        }
    }

    #[test]
    fn queued_calls_wait_for_a_thread_of_their_kind() {
        let dir = std::env::temp_dir().join(format!("husk-hooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("made");
        let path = CString::new(f.to_str().unwrap()).unwrap();
        // vCPU: no other unit test passes a vCPU check point (device threads' poll is one).
        request(ThreadKind::Vcpu, Forbidden::Create(path.clone()));
        run_pending(ThreadKind::Api);
        assert!(!f.exists(), "an API check point does not take a vCPU call");
        run_pending(ThreadKind::Vcpu);
        assert!(f.exists(), "unfiltered, the call goes through");
        assert_eq!(attempt(&Forbidden::Unlink(path)), "done");
        assert!(!f.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
