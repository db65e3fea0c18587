//! The sandbox holder: the process whose uts and ipc namespaces a pod's containers share.
//!
//! It only has to exist, so it is not a helper: no exec of the agent's binary (under QEMU TCG
//! an exec and the start of a 5 MiB static PIE cost CreateSandbox most of its time). It is a
//! `clone(CLONE_VM | CLONE_NEWUTS | CLONE_NEWIPC)` of the agent that runs [`holder_main`] on a
//! stack of its own: it sets the hostname, says whether that worked, closes every fd it was
//! given a copy of, and sleeps until it is killed. It shares the agent's memory (so it costs
//! none and copies no page tables), which is safe because it touches nothing of it but its
//! stack and its arguments, both owned by its [`Holder`] until the process is reaped.
//!
//! The holder sits in the guest's PID namespace, out of the containers' sight, and runs no
//! code after `pause(2)`; the agent installs no signal handlers, so a signal either kills it
//! or is ignored.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sched::CloneFlags;

use crate::reaper::exits;

/// Linux's longest hostname (`HOST_NAME_MAX`).
pub const MAX_HOSTNAME: usize = 64;

/// The holder's stack: [`holder_main`] calls three system calls and needs little.
const STACK_SIZE: usize = 64 * 1024;

/// Why the holder could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hostname {0:?} is {len} bytes, at most {MAX_HOSTNAME} — give the pod a shorter hostname", len = .0.len())]
    HostnameTooLong(String),
    #[error("socketpair: {0} — the agent is out of file descriptors")]
    SocketPair(#[source] std::io::Error),
    #[error("clone with {flags:?}: {source}")]
    Clone {
        flags: CloneFlags,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("waiting for the sandbox holder: {0}")]
    Wait(#[source] std::io::Error),
    #[error("the sandbox holder could not set the hostname {0:?}")]
    Hostname(String),
    #[error("the sandbox holder ended before it was ready")]
    Ended,
}

/// What the holder process uses of our memory, never changed while it runs: the hostname,
/// the fd it reports on, and its stack.
struct Inner {
    hostname: Vec<u8>,
    /// The holder's end of the socket it reports on.
    fd: RawFd,
    stack: Vec<u8>,
}

/// A running sandbox holder. Dropping it kills the process and reaps it before its stack and
/// arguments are freed (or, should it outlive SIGKILL, never frees them).
pub struct Holder {
    pid: i32,
    inner: Option<Box<Inner>>,
}

impl std::fmt::Debug for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holder").field("pid", &self.pid).finish()
    }
}

/// The holder's whole life, on its own stack in the agent's memory. Only system calls: no
/// allocation, no lock, nothing that writes memory but its stack — and errno, which lives in
/// the cloning thread's TLS; no call here can fail with it once the hostname is checked,
/// except close_range on a kernel without it, whose errno nobody reads.
extern "C" fn holder_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Inner` the Holder owns, unchanged, until this process has been
    // reaped.
    let a = unsafe { &*(arg.cast_const().cast::<Inner>()) };
    let (name, len) = (a.hostname.as_ptr(), a.hostname.len());
    // SAFETY: the hostname bytes are the Holder's, `len` of them.
    let ok = len == 0 || unsafe { libc::sethostname(name.cast(), len) } == 0;
    let answer: u8 = if ok { b'r' } else { b'e' };
    // SAFETY: a one-byte write from our stack to our own copy of the socket.
    unsafe { libc::write(a.fd, std::ptr::from_ref(&answer).cast(), 1) };
    // Our fd table is a copy of the agent's: keep none of them (a pipe's write end held here
    // would keep a container's stdin from ever seeing EOF).
    // SAFETY: closing our own fds, every one.
    unsafe { libc::syscall(libc::SYS_close_range, 0, libc::c_uint::MAX, 0) };
    if !ok {
        // SAFETY: ends only this process (its own thread group).
        unsafe { libc::_exit(1) };
    }
    loop {
        // SAFETY: sleeps until a signal; none has a handler, so it never returns.
        unsafe { libc::pause() };
    }
}

impl Holder {
    /// Starts a holder in new uts and ipc namespaces with `hostname` set there (empty: the
    /// guest's), and waits until it is ready.
    pub fn start(hostname: &str) -> Result<Self, Error> {
        if hostname.len() > MAX_HOSTNAME {
            return Err(Error::HostnameTooLong(hostname.into()));
        }
        let (mut ours, theirs) = UnixStream::pair().map_err(Error::SocketPair)?;
        let inner = Box::new(Inner {
            hostname: hostname.as_bytes().to_vec(),
            fd: theirs.as_raw_fd(),
            stack: vec![0u8; STACK_SIZE],
        });
        let flags = CloneFlags::CLONE_VM | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
        let mut holder = Self {
            pid: 0,
            inner: Some(inner),
        };
        // Taken where the Holder keeps it (a Box: it stays at this address).
        let Some(inner) = holder.inner.as_deref_mut() else {
            unreachable!("just set")
        };
        let top = {
            let end = inner.stack.as_mut_ptr().wrapping_add(STACK_SIZE);
            // The ABI wants a 16-byte aligned stack top.
            end.wrapping_sub(end as usize % 16)
        };
        let arg: *mut Inner = inner;
        let (pid, ()) = exits().spawn_registered(|| {
            // SAFETY: the child runs holder_main on `top`, the top of a stack the Holder owns,
            // with `arg` the Holder's Inner; both outlive the child (Drop reaps it first).
            // SIGCHLD makes it a normal child of ours, which the reaper waits for.
            let pid = unsafe {
                libc::clone(
                    holder_main,
                    top.cast(),
                    flags.bits() | libc::SIGCHLD,
                    arg.cast(),
                )
            };
            if pid < 0 {
                return Err(Error::Clone {
                    flags,
                    source: nix::errno::Errno::last(),
                });
            }
            Ok((pid, ()))
        })?;
        holder.pid = pid;
        drop(theirs);
        // Its answer, or EOF if it died first (it closes every fd right after answering).
        ours.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(Error::Wait)?;
        let mut answer = [0u8; 1];
        use std::io::Read;
        let read = loop {
            match ours.read(&mut answer) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => break r,
            }
        };
        match read {
            Ok(1) if answer[0] == b'r' => Ok(holder),
            Ok(1) => Err(Error::Hostname(hostname.into())),
            Ok(_) => Err(Error::Ended),
            Err(e) => Err(Error::Wait(e)),
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if self.pid <= 0 {
            return;
        }
        if exits().exited(self.pid).is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if exits()
            .wait(self.pid, Some(Duration::from_secs(10)))
            .is_none()
        {
            // Still running on our memory: never free its stack or arguments.
            std::mem::forget(self.inner.take());
            return;
        }
        exits().forget(self.pid);
    }
}
