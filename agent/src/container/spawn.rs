//! Starting a container helper: `clone(2)` into the new namespaces, then at once `execve` of
//! the agent's own binary (`/proc/self/exe init|exec|pause`).
//!
//! Why re-exec: the agent is multi-threaded, and between clone and exec only
//! async-signal-safe calls are allowed; the container's setup (mounts, pivot_root, user,
//! capabilities) needs allocation and file I/O. The fresh, single-threaded helper does it, and
//! talks to the agent over a socketpair on fd 3 (see [`Sync`]).

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sched::CloneFlags;

use crate::reaper::exits;

/// The helper's fd for the sync socket.
pub const SYNC_FD: RawFd = 3;

/// Size of the stack the clone child runs on until its execve.
const STACK_SIZE: usize = 64 * 1024;

fn dup_high(fd: RawFd) -> Result<OwnedFd, String> {
    let n = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100)).map_err(|e| format!("dup fd {fd}: {e}"))?;
    // SAFETY: fcntl just returned this new fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Clones a helper in new namespaces `flags` with `stdio` as its fds 0-2. Returns its PID
/// (registered with the reaper) and the agent's end of the sync socket.
pub fn spawn(mode: &str, flags: CloneFlags, stdio: [RawFd; 3]) -> Result<(i32, UnixStream), String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    // High, close-on-exec copies, so the child's dup2 to 0..3 cannot clobber a source.
    let fds = [
        dup_high(stdio[0])?,
        dup_high(stdio[1])?,
        dup_high(stdio[2])?,
        dup_high(theirs.as_raw_fd())?,
    ];
    let raw: [RawFd; 4] = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd(), fds[3].as_raw_fd()];
    let exe = CString::new("/proc/self/exe").expect("no NUL");
    let argv0 = CString::new("husk-agent").expect("no NUL");
    let argv1 = CString::new(mode).map_err(|_| "helper mode has a NUL".to_string())?;
    let argv = [argv0.as_ptr(), argv1.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    let mut stack = vec![0u8; STACK_SIZE];
    let child = Box::new(|| -> isize {
        // Only async-signal-safe calls from here to execve.
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
    let (pid, ()) = exits().spawn_registered(|| {
        // SAFETY: the child runs the closure above, which calls only async-signal-safe
        // functions before execve, on its own stack; SIGCHLD makes it a normal child.
        let pid = unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
            .map_err(|e| format!("clone with {flags:?}: {e}"))?;
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
pub fn spawn_in_pid_namespace(pid_ns: &std::path::Path, mode: &str, flags: CloneFlags, stdio: [RawFd; 3]) -> Result<(i32, UnixStream), String> {
    let ns = std::fs::File::open(pid_ns).map_err(|e| format!("opening PID namespace {}: {e}", pid_ns.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWPID).map_err(|e| format!("entering PID namespace {}: {e}", pid_ns.display()))?;
            spawn(mode, flags, stdio)
        })
        .join()
        .map_err(|_| "the thread entering the PID namespace panicked".to_string())?
    })
}

/// The agent's end of a helper's sync socket.
#[derive(Debug)]
pub struct Sync {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Sync {
    pub fn new(s: UnixStream) -> Result<Self, String> {
        let writer = s.try_clone().map_err(|e| format!("dup sync socket: {e}"))?;
        Ok(Self {
            reader: BufReader::new(s),
            writer,
        })
    }

    /// Sends the helper its configuration (length-prefixed JSON).
    pub fn send_config(&mut self, json: &[u8]) -> Result<(), String> {
        let len = u32::try_from(json.len()).map_err(|_| "helper config too large".to_string())?;
        self.writer.write_all(&len.to_le_bytes()).and_then(|()| self.writer.write_all(json)).map_err(|e| format!("sending the helper its config: {e}"))
    }

    pub fn send(&mut self, line: &str) -> Result<(), String> {
        self.writer.write_all(format!("{line}\n").as_bytes()).map_err(|e| format!("telling the helper {line:?}: {e}"))
    }

    /// The helper's next line: `Ok(None)` at EOF (the helper exec'd or died). A line
    /// `error <message>` becomes `Err(message)`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<String>, String> {
        self.reader.get_ref().set_read_timeout(Some(timeout)).map_err(|e| format!("sync timeout: {e}"))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => {
                let line = line.trim_end().to_string();
                match line.strip_prefix("error ") {
                    Some(msg) => Err(msg.to_string()),
                    None => Ok(Some(line)),
                }
            }
            Err(e) => Err(format!("waiting for the container helper: {e}")),
        }
    }
}

/// Helper side: reads the configuration the agent sent on [`SYNC_FD`].
pub fn read_config(sync: &mut UnixStream) -> Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    sync.read_exact(&mut len).map_err(|e| format!("reading the config length: {e}"))?;
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    sync.read_exact(&mut buf).map_err(|e| format!("reading the config: {e}"))?;
    Ok(buf)
}
