//! Starting a container helper: `clone(2)` into the new namespaces, then at once `execve` of
//! the agent's own binary (`/proc/self/exe init|exec|pause`).
//!
//! Why re-exec: the agent is multi-threaded, and between clone and exec only
//! async-signal-safe calls are allowed; the container's setup (mounts, pivot_root, user,
//! capabilities) needs allocation and file I/O. The fresh, single-threaded helper does it, and
//! talks to the agent over a socketpair on fd 3 (see [`Sync`]).

use std::collections::VecDeque;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use nix::sched::CloneFlags;

use crate::reaper::exits;

/// The helper's fd for the sync socket.
pub(crate) const SYNC_FD: RawFd = 3;

/// Why a helper could not be started or talked to. A helper's own `error <message>` line is
/// [`Error::Helper`]: the message names what failed in the container.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("dup fd {fd}: {source} — the agent is out of file descriptors")]
    Dup {
        fd: RawFd,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("socketpair: {0} — the agent is out of file descriptors")]
    SocketPair(#[source] std::io::Error),
    #[error("helper mode {0:?} has a NUL")]
    ModeNul(String),
    #[error("clone with {flags:?}: {source}")]
    Clone {
        flags: CloneFlags,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("opening PID namespace {}: {source}", path.display())]
    OpenPidNamespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("entering PID namespace {}: {source}", path.display())]
    EnterPidNamespace {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("the thread entering the PID namespace panicked")]
    PidNamespaceThread,
    #[error("helper config too large ({0} bytes, at most 4 GiB)")]
    ConfigTooLarge(usize),
    #[error("sending the helper its config: {0}")]
    SendConfig(#[source] std::io::Error),
    #[error("telling the helper {line:?}: {source}")]
    Send {
        line: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sync timeout: {0}")]
    SetTimeout(#[source] std::io::Error),
    /// The helper said nothing within the setup timeout.
    #[error("waiting for the container helper: timed out")]
    TimedOut,
    #[error("waiting for the container helper: {0}")]
    Recv(#[source] nix::errno::Errno),
    #[error("the container helper passed more than {MAX_FDS} fds at once")]
    TooManyFds,
    /// The helper's `error <message>` line.
    #[error("{0}")]
    Helper(String),
    #[error("passing the agent the {line} fd: {source}")]
    SendFd {
        line: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("passing the agent the {line} fd: short send ({sent} of {len} bytes)")]
    ShortSend {
        line: String,
        sent: usize,
        len: usize,
    },
    #[error("reading the config length: {0} — the agent went away")]
    ReadConfigLength(#[source] std::io::Error),
    #[error("reading the config: {0} — the agent went away")]
    ReadConfig(#[source] std::io::Error),
}

/// Size of the stack the clone child runs on until its execve.
const STACK_SIZE: usize = 64 * 1024;

fn dup_high(fd: RawFd) -> Result<OwnedFd, Error> {
    let n = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))
        .map_err(|source| Error::Dup { fd, source })?;
    // SAFETY: fcntl just returned this new fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// The agent's execution domain with `ADDR_NO_RANDOMIZE`: what a helper is exec'd with, so
/// that every helper's image sits at the same address.
///
/// Why: under QEMU TCG the guest's code runs as translations cached by guest *virtual*
/// address. The agent is a static PIE; exec'd at a random base each time, every helper's code
/// was translated afresh (a few MiB of translation per container and per exec) and filled
/// QEMU's 16 MiB translation buffer, whose flush then costs every later step its
/// retranslation too. At one address, the second helper reuses the first one's translations.
/// The helper clears the flag again first thing ([`clear_fixed_layout`]), so the container's
/// own processes get a randomized layout as usual.
fn fixed_layout_persona() -> libc::c_ulong {
    // SAFETY: personality(0xffffffff) only reads this task's persona.
    let current = unsafe { libc::personality(0xffff_ffff) };
    let current = libc::c_ulong::try_from(current).unwrap_or(0);
    current | libc::c_ulong::try_from(libc::ADDR_NO_RANDOMIZE).unwrap_or(0)
}

/// Helper side: drops `ADDR_NO_RANDOMIZE` (see [`fixed_layout_persona`]) so that nothing the
/// helper execs (the container's process) inherits it.
pub(crate) fn clear_fixed_layout() {
    // SAFETY: personality(0xffffffff) only reads this task's persona.
    let current = unsafe { libc::personality(0xffff_ffff) };
    let flag = libc::c_int::try_from(libc::ADDR_NO_RANDOMIZE).unwrap_or(0);
    if current != -1 && current & flag != 0 {
        let cleared = libc::c_ulong::try_from(current & !flag).unwrap_or(0);
        // SAFETY: as above, setting this task's own persona.
        unsafe { libc::personality(cleared) };
    }
}

/// Clones a helper in new namespaces `flags` with `stdio` as its fds 0-2. Returns its PID
/// (registered with the reaper) and the agent's end of the sync socket.
pub fn spawn(mode: &str, flags: CloneFlags, stdio: [RawFd; 3]) -> Result<(i32, UnixStream), Error> {
    let (ours, theirs) = UnixStream::pair().map_err(Error::SocketPair)?;
    // High, close-on-exec copies, so the child's dup2 to 0..3 cannot clobber a source.
    let fds = [
        dup_high(stdio[0])?,
        dup_high(stdio[1])?,
        dup_high(stdio[2])?,
        dup_high(theirs.as_raw_fd())?,
    ];
    let raw: [RawFd; 4] = [
        fds[0].as_raw_fd(),
        fds[1].as_raw_fd(),
        fds[2].as_raw_fd(),
        fds[3].as_raw_fd(),
    ];
    let exe = CString::new("/proc/self/exe").expect("no NUL");
    let argv0 = CString::new("husk-agent").expect("no NUL");
    let argv1 = CString::new(mode).map_err(|_| Error::ModeNul(mode.into()))?;
    let argv = [argv0.as_ptr(), argv1.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    let mut stack = vec![0u8; STACK_SIZE];
    let persona = fixed_layout_persona();
    let child = Box::new(|| -> isize {
        // Only async-signal-safe calls from here to execve.
        // SAFETY: personality(2) only sets this task's execution domain flags; a plain syscall.
        unsafe { libc::personality(persona) };
        for (target, fd) in (0 as libc::c_int..).zip(raw.iter()) {
            // SAFETY: dup2 on fds this process holds; target < 4.
            if unsafe { libc::dup2(*fd, target) } < 0 {
                // SAFETY: _exit is async-signal-safe and ends only this child.
                unsafe { libc::_exit(126) };
            }
        }
        // SAFETY: exe/argv/envp are NUL-terminated and live in the parent's memory, which this
        // child shares a copy of until execve.
        unsafe { libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        // SAFETY: as above.
        unsafe { libc::_exit(127) }
    });
    // The child shares our memory until its execve (CLONE_VM) and we wait until then
    // (CLONE_VFORK), as posix_spawn does: a plain fork copies the agent's page tables and then
    // takes a copy-on-write fault for each page either side writes, which under TCG (an
    // emulated guest CPU) cost more than the helper's whole exec. Its stack is `stack`,
    // which outlives it since we wait.
    let clone_flags = flags | CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK;
    let (pid, ()) = exits().spawn_registered(|| {
        // SAFETY: the child runs the closure above on its own stack, calling only
        // async-signal-safe functions (dup2, execve, _exit) that write nothing of ours but
        // errno; SIGCHLD makes it a normal child. The agent installs no signal handlers, so a
        // signal before its execve cannot run our code on its stack.
        let pid = unsafe { nix::sched::clone(child, &mut stack, clone_flags, Some(libc::SIGCHLD)) }
            .map_err(|source| Error::Clone { flags, source })?;
        Ok((pid.as_raw(), ()))
    })?;
    drop(fds);
    drop(theirs);
    Ok((pid, ours))
}

/// [`spawn`], but the helper starts in the existing PID namespace `pid_ns` (a
/// `/proc/<pid>/ns/pid` path) instead of a new one.
///
/// Entering a PID namespace only changes where a thread's *children* go, and it is allowed in
/// a multi-threaded process (unlike a mount namespace); so a short-lived thread enters it and
/// does the clone, and the agent's other threads stay where they are.
pub(crate) fn spawn_in_pid_namespace(
    pid_ns: &std::path::Path,
    mode: &str,
    flags: CloneFlags,
    stdio: [RawFd; 3],
) -> Result<(i32, UnixStream), Error> {
    let ns = std::fs::File::open(pid_ns).map_err(|source| Error::OpenPidNamespace {
        path: pid_ns.to_path_buf(),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWPID).map_err(|source| {
                Error::EnterPidNamespace {
                    path: pid_ns.to_path_buf(),
                    source,
                }
            })?;
            spawn(mode, flags, stdio)
        })
        .join()
        .map_err(|_| Error::PidNamespaceThread)?
    })
}

/// The agent's end of a helper's sync socket: lines from the helper, and the fds it passes
/// along with them (a terminal's master).
///
/// Read with `recvmsg` into our own buffer rather than through a `BufReader`: a buffered
/// `read` would take the bytes that carry an `SCM_RIGHTS` message and the kernel would
/// close the fds with nobody to receive them.
#[derive(Debug)]
pub struct Sync {
    sock: UnixStream,
    /// Bytes received but not yet returned as a line.
    buf: Vec<u8>,
    /// Bytes received, and bytes returned as lines, since the start.
    received: u64,
    returned: u64,
    /// Fds received, oldest first, until taken, each with the stream offset just past the
    /// bytes of its message (a read that takes fds ends with the bytes sent with them).
    fds: VecDeque<(u64, OwnedFd)>,
}

/// The most fds the helper passes in one message.
const MAX_FDS: usize = 4;

impl Sync {
    pub fn new(s: UnixStream) -> Self {
        Self {
            sock: s,
            buf: Vec::new(),
            received: 0,
            returned: 0,
            fds: VecDeque::new(),
        }
    }

    /// Sends the helper its configuration (length-prefixed JSON).
    pub(crate) fn send_config(&mut self, json: &[u8]) -> Result<(), Error> {
        let len = u32::try_from(json.len()).map_err(|_| Error::ConfigTooLarge(json.len()))?;
        self.sock
            .write_all(&len.to_le_bytes())
            .and_then(|()| self.sock.write_all(json))
            .map_err(Error::SendConfig)
    }

    pub fn send(&mut self, line: &str) -> Result<(), Error> {
        self.sock
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|source| Error::Send {
                line: line.into(),
                source,
            })
    }

    /// The helper's next line: `Ok(None)` at EOF (the helper exec'd or died). A line
    /// `error <message>` becomes [`Error::Helper`]. Fds that came with it wait in [`Self::take_fd`].
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<String>, Error> {
        self.sock
            .set_read_timeout(Some(timeout))
            .map_err(Error::SetTimeout)?;
        let mut line = loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                break self.buf.drain(..=i).collect::<Vec<u8>>();
            }
            if self.recv_some()? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                // A last line without its newline.
                break std::mem::take(&mut self.buf);
            }
        };
        self.returned += line.len() as u64;
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        let line = String::from_utf8_lossy(&line).trim_end().to_string();
        match line.strip_prefix("error ") {
            Some(msg) => Err(Error::Helper(msg.to_string())),
            None => Ok(Some(line)),
        }
    }

    /// The oldest fd that came with a line [`Self::recv`] returned and that nobody took yet.
    pub(crate) fn take_fd(&mut self) -> Option<OwnedFd> {
        match self.fds.front() {
            Some((end, _)) if *end <= self.returned => self.fds.pop_front().map(|(_, fd)| fd),
            _ => None,
        }
    }

    /// One `recvmsg`: appends the bytes to `buf`, the fds to `fds`. Returns the byte count
    /// (0 at EOF).
    fn recv_some(&mut self) -> Result<usize, Error> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut chunk = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        loop {
            let mut iov = [std::io::IoSliceMut::new(&mut chunk)];
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Err(Error::TimedOut),
                Err(e) => return Err(Error::Recv(e)),
            };
            let n = msg.bytes;
            self.received += n as u64;
            let end = self.received;
            // On MSG_CTRUNC the kernel closed what did not fit: an error, never silently less.
            let cmsgs = msg.cmsgs().map_err(|_| Error::TooManyFds)?;
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    // SAFETY: the kernel just installed these fds in this process (close-on-exec)
                    // for this message; nothing else owns them.
                    self.fds.extend(
                        fds.into_iter()
                            .map(|fd| (end, unsafe { OwnedFd::from_raw_fd(fd) })),
                    );
                }
            }
            self.buf.extend_from_slice(&chunk[..n]);
            return Ok(n);
        }
    }
}

/// Helper side: sends `line` with `fd` attached (`SCM_RIGHTS`) on the sync socket.
pub(crate) fn send_fd(sync: &UnixStream, line: &str, fd: RawFd) -> Result<(), Error> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let data = format!("{line}\n");
    let fds = [fd];
    let n = sendmsg::<()>(
        sync.as_raw_fd(),
        &[std::io::IoSlice::new(data.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|source| Error::SendFd {
        line: line.into(),
        source,
    })?;
    // A unix stream socket takes a short line whole; a short send would split the line.
    if n != data.len() {
        return Err(Error::ShortSend {
            line: line.into(),
            sent: n,
            len: data.len(),
        });
    }
    Ok(())
}

/// Helper side: reads the configuration the agent sent on [`SYNC_FD`].
pub(crate) fn read_config(sync: &mut UnixStream) -> Result<Vec<u8>, Error> {
    let mut len = [0u8; 4];
    sync.read_exact(&mut len).map_err(Error::ReadConfigLength)?;
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    sync.read_exact(&mut buf).map_err(Error::ReadConfig)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn inode(fd: &impl AsRawFd) -> (u64, u64) {
        let m = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        (m.dev(), m.ino())
    }

    #[test]
    fn lines_and_passed_fds_arrive_in_order() {
        let (agent, mut helper) = UnixStream::pair().unwrap();
        let mut sync = Sync::new(agent);
        let file = tempfile_like();
        // Lines before and after the fd's, written so that they may arrive in one read.
        helper.write_all(b"one\ntw").unwrap();
        helper.write_all(b"o\n").unwrap();
        send_fd(&helper, "pty", file.as_raw_fd()).unwrap();
        helper.write_all(b"ready\nerror it broke\nlast").unwrap();
        drop(helper);
        let t = Duration::from_secs(5);
        assert_eq!(sync.recv(t).unwrap().as_deref(), Some("one"));
        assert_eq!(sync.recv(t).unwrap().as_deref(), Some("two"));
        assert!(sync.take_fd().is_none(), "an fd before its line");
        assert_eq!(sync.recv(t).unwrap().as_deref(), Some("pty"));
        let fd = sync.take_fd().expect("the fd passed with the pty line");
        assert_eq!(inode(&fd), inode(&file));
        assert!(sync.take_fd().is_none());
        assert_eq!(sync.recv(t).unwrap().as_deref(), Some("ready"));
        assert!(matches!(sync.recv(t), Err(Error::Helper(m)) if m == "it broke"));
        assert_eq!(sync.recv(t).unwrap().as_deref(), Some("last"));
        assert!(matches!(sync.recv(t), Ok(None)));
    }

    #[test]
    fn a_silent_helper_times_out() {
        let (agent, _helper) = UnixStream::pair().unwrap();
        let e = Sync::new(agent)
            .recv(Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(e, Error::TimedOut), "{e}");
        assert!(e.to_string().contains("timed out"), "{e}");
    }

    /// A helper's image is exec'd without address randomization, and the helper takes the
    /// flag off again so that the container's process is randomized as usual. (A persona is
    /// per task: a thread of its own keeps the test's.)
    #[test]
    fn helpers_run_at_a_fixed_layout_and_their_execs_do_not() {
        let flag = libc::ADDR_NO_RANDOMIZE;
        std::thread::spawn(move || {
            // SAFETY: reading and setting this thread's own persona.
            let get = || unsafe { libc::personality(0xffff_ffff) };
            let before = get();
            assert_eq!(before & flag, 0, "the test runs randomized");
            let fixed = fixed_layout_persona();
            assert_eq!(
                i64::try_from(fixed).unwrap(),
                i64::from(before | flag),
                "only the flag is added"
            );
            // SAFETY: as above.
            unsafe { libc::personality(fixed) };
            assert_ne!(get() & flag, 0);
            clear_fixed_layout();
            assert_eq!(get(), before);
            // Clearing a persona without the flag leaves it as it is.
            clear_fixed_layout();
            assert_eq!(get(), before);
        })
        .join()
        .unwrap();
    }

    fn tempfile_like() -> std::fs::File {
        std::fs::File::open("/proc/self/exe").unwrap()
    }
}
