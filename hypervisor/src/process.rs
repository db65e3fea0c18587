//! Child processes a backend starts (QEMU, and later virtiofsd and vhost-device-vsock):
//! tied to the starting thread's life, ended and reaped on every path.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{Error, Result};

/// A pidfd of process `pid` (`pidfd_open(2)`, Linux 5.3): readable once the process has
/// ended, whoever its parent is, and never about another process that reuses the pid.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
    // is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Which of `fds` are readable (or hung up) within `timeout`, `None` waiting as long as it
/// takes; an interrupted wait (EINTR) counts as none.
pub fn readable(fds: &[&dyn AsFd], timeout: Option<Duration>) -> Vec<bool> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // Rounded up: a wait of 0.4 ms must not become a busy poll of 0 ms.
    let ms = timeout.map_or(-1, |t| {
        i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
    });
    let n = libc::nfds_t::try_from(p.len()).unwrap_or(0);
    // SAFETY: `p` is a live array of `n` pollfd structs for the duration of the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), n, ms) };
    if r <= 0 {
        return vec![false; fds.len()];
    }
    p.iter().map(|x| x.revents != 0).collect()
}

/// One descriptor that is readable while any of `fds` is (an epoll instance holding them),
/// for a caller that sleeps on a single descriptor.
pub fn any_readable(fds: &[BorrowedFd<'_>]) -> std::io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes flags and returns a new descriptor or -1.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    for fd in fds {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0,
        };
        // SAFETY: `ep` and `fd` are open descriptors; `ev` lives for the call.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) }
            < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(ep)
}

/// Empties the calling thread's signal mask. For a child between fork and exec (async-signal-
/// safe): a child inherits the mask of the thread that forks it, and std's `Command` does not
/// reset it. The pool's holder blocks SIGTERM and SIGINT in every thread (it takes them on a
/// thread of its own) and its keepers inherit that (they end with their owner, not by
/// signal); the QEMU a keeper started had them blocked too, so the SIGTERM that stops a VM
/// whose helper ended stayed pending and the VM ran on.
pub(crate) fn unblock_signals() -> std::io::Result<()> {
    // SAFETY: sigemptyset fills the set on our stack; sigprocmask reads it and writes no
    // old set (null).
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A child process that is killed and reaped when dropped, unless it was already reaped.
#[derive(Debug)]
pub struct Supervised {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    /// A pidfd of the child, which waits sleep on instead of polling; `None` where the
    /// kernel has no pidfd_open (before 5.3), and waits poll.
    exited: Option<OwnedFd>,
}

impl Supervised {
    /// Spawns `cmd`, asking the kernel to SIGKILL the child if the spawning thread dies, so a
    /// crashed shim never leaves a VM behind.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        // SAFETY: the closure runs between fork and exec and only calls prctl(2),
        // sigemptyset(3) and sigprocmask(2), which are async-signal-safe; it touches only a
        // sigset on its own stack.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                unblock_signals()
            });
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            program: name.to_string(),
            source,
        })?;
        // The child is not reaped before this (only `try_wait` reaps): the pid is still its.
        let exited = pidfd_open(child.id()).ok();
        Ok(Self {
            name: name.to_string(),
            child,
            status: None,
            exited,
        })
    }

    /// A descriptor that turns readable once the child has ended (a pidfd), for a caller
    /// that waits for several things at once; `None` on a kernel without pidfds.
    pub fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        self.exited.as_ref().map(AsFd::as_fd)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The PID of the program itself: for a jailed one, the only child of the spawned
    /// process (its supervisor, see [`crate::jail`]); else the spawned process.
    pub(crate) fn program_pid(&self) -> u32 {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|c| {
                let mut it = c.split_whitespace();
                let only = it.next()?.parse().ok();
                it.next().is_none().then_some(only).flatten()
            })
            .unwrap_or(pid)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reaps the child if it has ended; never blocks.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(Error::io(format!("waiting for {}", self.name)))?;
        }
        Ok(self.status)
    }

    /// Waits for the child to end, up to `timeout` (forever with `None`).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let Some(timeout) = timeout else {
            let s = self
                .child
                .wait()
                .map_err(Error::io(format!("waiting for {}", self.name)))?;
            self.status = Some(s);
            return Ok(Some(s));
        };
        // std has no timed wait: sleep on the pidfd until the child ends; without one, poll
        // with a short, growing interval (1 ms .. 20 ms).
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            match &self.exited {
                Some(fd) => {
                    readable(&[fd], Some(deadline - now));
                }
                None => {
                    std::thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
        }
    }

    /// Sends `signal` if the child has not been reaped yet.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        match kill(pid, signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(Error::Io {
                what: format!("sending {signal} to {} (pid {pid})", self.name),
                source: e.into(),
            }),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once reaped.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        if let Some(s) = self.wait(Some(grace))? {
            return Ok(s);
        }
        self.kill()
    }

    /// SIGKILL; returns once reaped.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        Ok(self
            .wait(None)?
            .expect("wait without timeout returns a status"))
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.kill();
        }
    }
}

/// The only variable of a VM-side process's environment besides its program's own
/// (QEMU's allocator settings): where a program would look for another one it runs.
pub(crate) const VM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A command for a VM-side program (the VMM and its device helpers): run from `/`, with an
/// environment of [`VM_PATH`] alone. Nothing of the shim's own environment reaches the
/// processes the guest talks to: containerd 1.6 gives its shims
/// `LD_LIBRARY_PATH=/opt/containerd/lib:`, whose empty entry makes the dynamic loader look
/// for every library in the working directory too (containerd starts a shim in the task's
/// bundle), and `TTRPC_ADDRESS`, `HUSK_CONFIG` and whatever the node's service manager set,
/// none of which a VMM needs. The loader's extra lookups were also ~560 failed `openat`s
/// at each QEMU start, ~2 ms (docs/FIELD-NOTES.md, "containerd 1.6.20").
pub(crate) fn vm_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear().env("PATH", VM_PATH).current_dir("/");
    cmd
}

/// Makes `fds` (close-on-exec in the shim, so no other child gets them) inherited by `cmd`'s
/// child under the same numbers, which the command line names (`-netdev tap,fd=N`,
/// `-add-fd fd=N`).
pub(crate) fn inherit_fds(cmd: &mut Command, fds: Vec<RawFd>) {
    if fds.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl(2),
    // which is async-signal-safe, on descriptors the parent keeps open across the spawn (the
    // caller's `NetConfig` and `start`'s console pipe own them until after the spawn); it
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn drop_kills_and_reaps() {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let p = Supervised::spawn("sleep", cmd).unwrap();
        let pid = p.pid();
        assert!(alive(pid));
        drop(p);
        assert!(
            !alive(pid),
            "child {pid} survived its guard (or is a zombie)"
        );
    }

    #[test]
    fn timed_wait_and_terminate() {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let mut p = Supervised::spawn("sleep", cmd).unwrap();
        assert_eq!(p.wait(Some(Duration::from_millis(30))).unwrap(), None);
        let s = p.terminate(Duration::from_secs(5)).unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(s.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn a_vm_side_program_sees_none_of_the_callers_environment() {
        // `cargo test` runs us with dozens of variables (CARGO_*, HOME, PATH …).
        assert!(std::env::vars_os().count() > 1);
        let mut cmd = vm_command(Path::new("/usr/bin/env"));
        cmd.stdout(std::process::Stdio::piped());
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("PATH={VM_PATH}\n")
        );
        let mut cmd = vm_command(Path::new("/bin/pwd"));
        cmd.arg("-P");
        let out = cmd.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/\n");
    }

    #[test]
    fn a_pidfd_turns_readable_when_its_process_ends() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        assert_eq!(
            readable(&[&fd], Some(Duration::from_millis(50))),
            vec![false]
        );
        child.kill().unwrap();
        assert_eq!(readable(&[&fd], Some(Duration::from_secs(5))), vec![true]);
        child.wait().unwrap();
    }

    #[test]
    fn a_timed_wait_sleeps_until_the_child_ends_not_until_the_timeout() {
        let mut cmd = Command::new("sleep");
        cmd.arg("0.2");
        let mut p = Supervised::spawn("sleep", cmd).unwrap();
        let exit = p.exit_fd().expect("a pidfd on this kernel");
        assert_eq!(readable(&[&exit], Some(Duration::ZERO)), vec![false]);
        let started = Instant::now();
        assert!(p.wait(Some(Duration::from_secs(20))).unwrap().is_some());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            readable(&[&p.exit_fd().unwrap()], Some(Duration::ZERO)),
            vec![true]
        );
    }

    #[test]
    fn one_descriptor_for_several_turns_readable_when_any_does() {
        let spawn = |secs: &str| {
            let mut cmd = Command::new("sleep");
            cmd.arg(secs);
            Supervised::spawn("sleep", cmd).unwrap()
        };
        let (mut long, mut short) = (spawn("60"), spawn("0.1"));
        let any = any_readable(&[long.exit_fd().unwrap(), short.exit_fd().unwrap()]).unwrap();
        assert_eq!(readable(&[&any], Some(Duration::ZERO)), vec![false]);
        assert_eq!(readable(&[&any], Some(Duration::from_secs(20))), vec![true]);
        assert!(short.wait(Some(Duration::ZERO)).unwrap().is_some());
        assert!(long.try_wait().unwrap().is_none());
        long.kill().unwrap();
    }

    #[test]
    fn a_child_starts_with_no_signal_blocked_whatever_its_spawner_blocks() {
        let blocked = std::thread::spawn(|| {
            let mut term = nix::sys::signal::SigSet::empty();
            term.add(Signal::SIGTERM);
            term.add(Signal::SIGINT);
            term.thread_block().unwrap();
            let mut cmd = Command::new("sleep");
            cmd.arg("60");
            let p = Supervised::spawn("sleep", cmd).unwrap();
            let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
            let mask = status
                .lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .unwrap()
                .trim()
                .to_string();
            drop(p);
            mask
        })
        .join()
        .unwrap();
        assert_eq!(blocked, "0000000000000000");
    }

    #[test]
    fn missing_program_is_named() {
        let e = Supervised::spawn("no-such-tool", Command::new("/nonexistent/tool")).unwrap_err();
        assert!(e.to_string().contains("no-such-tool"), "{e}");
    }
}
