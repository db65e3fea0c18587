//! The broker: a small process of husk-vmm's own that does the path operations a running
//! VM needs, because no husk-vmm thread may take a path once its seccomp filter is on
//! ([`crate::seccomp`]):
//! - the host end of a guest-initiated vsock connection to host port P: it connects a
//!   non-blocking unix stream to `<vsock socket>_P` and hands back the fd;
//! - on the way out, removing the sockets husk-vmm created (API, vsock).
//!
//! It is forked before the VM is built and before any thread exists, so it holds no VM
//! fd and the fork copies a single thread; it closes every fd but its end of a
//! `SOCK_SEQPACKET` pair, and runs under a filter of its own (`socket(AF_UNIX,
//! SOCK_STREAM)`, `connect`, `unlink`, I/O on the pair, the allocator). What it can be
//! asked is bounded by construction: a port number — the path is built here from a prefix
//! fixed before the fork — and which of the two known sockets to remove. A husk-vmm taken
//! over by its guest can make it connect to `<vsock socket>_<any port>`, nothing else.
//!
//! It ends when asked to ([`Broker::finish`]), when its end of the pair reads EOF, or
//! with SIGKILL when husk-vmm's main thread dies (`PR_SET_PDEATHSIG`).

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use seccompiler::BpfProgram;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::devices::virtio::vsock::unix::HostConnector;

/// How the broker opens the streams it hands over (and the only socket its filter allows).
pub(crate) const STREAM_FLAGS: libc::c_int =
    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;

/// Request: connect to `<vsock socket>_<arg>`.
const OP_CONNECT: u32 = 1;
/// Request: remove the sockets whose bits are set in `arg` ([`Owned`]), answer, end.
const OP_FINISH: u32 = 2;
/// What the broker calls itself in `ps` (15 bytes at most).
const NAME: &std::ffi::CStr = c"husk-vmm-broker";

/// Sockets husk-vmm creates and the broker removes at the end, as bits of a mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owned {
    /// The control API socket (`--api-sock`).
    Api = 1,
    /// The hybrid vsock socket (`--vsock-sock`).
    Vsock = 2,
}

/// Errors starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The socket pair to the broker could not be made.
    #[error("starting husk-vmm's broker process: socketpair: {0} — the process is out of file descriptors")]
    Pair(#[source] io::Error),
    /// fork failed.
    #[error(
        "starting husk-vmm's broker process: fork: {0} — the host is out of processes or memory"
    )]
    Fork(#[source] io::Error),
    /// A socket path holds a NUL byte (paths from the command line cannot).
    #[error("socket path {0}: holds a NUL byte — give a plain path")]
    Nul(PathBuf),
}

/// What the broker is for.
#[derive(Debug, Default)]
pub struct BrokerConfig {
    /// The hybrid vsock socket: guest connections to port P go to `<this>_P`.
    pub vsock_sock: Option<PathBuf>,
    /// The control API socket.
    pub api_sock: Option<PathBuf>,
    /// The broker's own seccomp filter ([`crate::seccomp::broker_filter`]); `None`: none.
    pub filter: Option<BpfProgram>,
}

/// The broker, from husk-vmm's side: requests go one at a time over the pair.
#[derive(Debug)]
pub struct Broker {
    pair: Mutex<UnixStream>,
    pid: libc::pid_t,
}

fn cstring(p: &Path) -> Result<CString, BrokerError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| BrokerError::Nul(p.to_owned()))
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both fds are open and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Broker {
    /// Forks the broker. Call it before any thread exists: the child carries on with a
    /// copy of this one thread only.
    pub fn spawn(cfg: BrokerConfig) -> Result<Self, BrokerError> {
        // Everything the child uses is made here, before the fork.
        let prefix = cfg
            .vsock_sock
            .as_deref()
            .map(|p| {
                let mut b = p.as_os_str().as_bytes().to_vec();
                b.push(b'_');
                b
            })
            .unwrap_or_default();
        let removable = [
            cfg.api_sock.as_deref().map(cstring).transpose()?,
            cfg.vsock_sock.as_deref().map(cstring).transpose()?,
        ];
        let (ours, theirs) = seqpacket_pair().map_err(BrokerError::Pair)?;
        // SAFETY: fork has no preconditions; the child only runs `child_main`, which never
        // returns, and (the caller guarantees) this process has one thread, so no lock the
        // child might need is held by a thread that does not exist in it.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(BrokerError::Fork(io::Error::last_os_error()));
        }
        if pid == 0 {
            child_main(theirs.as_raw_fd(), &prefix, &removable, cfg.filter.as_ref());
        }
        drop(theirs);
        Ok(Self {
            pair: Mutex::new(UnixStream::from(ours)),
            pid,
        })
    }

    /// The broker's process id.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Sends one request and reads its answer: an fd, or the broker's OS error.
    fn request(&self, op: u32, arg: u32) -> io::Result<Option<OwnedFd>> {
        let pair = self.pair.lock().unwrap_or_else(|e| e.into_inner());
        let mut req = [0u8; 8];
        req[..4].copy_from_slice(&op.to_le_bytes());
        req[4..].copy_from_slice(&arg.to_le_bytes());
        (&*pair).write_all(&req)?;
        let mut status = [0u8; 4];
        let (n, file) = pair.recv_with_fd(&mut status).map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the broker process has ended",
            ));
        }
        if n != status.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the broker answered {n} bytes instead of 4"),
            ));
        }
        match i32::from_le_bytes(status) {
            0 => Ok(file.map(OwnedFd::from)),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }

    /// Has the broker remove the sockets in `owned`, end, and be reaped. Later requests
    /// fail.
    pub fn finish(&self, owned: &[Owned]) -> io::Result<()> {
        let mask = owned.iter().fold(0u32, |m, o| m | *o as u32);
        let removed = self.request(OP_FINISH, mask).map(drop);
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out pointer; no rusage wanted.
        let rc = unsafe { libc::wait4(self.pid, &mut status, 0, std::ptr::null_mut()) };
        if rc < 0 && removed.is_ok() {
            return Err(io::Error::last_os_error());
        }
        removed
    }
}

impl HostConnector for Broker {
    fn connect(&self, port: u32) -> io::Result<UnixStream> {
        match self.request(OP_CONNECT, port)? {
            Some(fd) => Ok(UnixStream::from(fd)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the broker answered a connect without a stream",
            )),
        }
    }
}

/// The last OS error's number, for an answer.
fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Writes `value` in decimal into `buf`; returns how many bytes.
fn decimal(mut value: u32, buf: &mut [u8; 10]) -> usize {
    let mut tmp = [0u8; 10];
    let mut n = 0;
    loop {
        tmp[n] = b'0' + u8::try_from(value % 10).expect("a digit");
        n += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for (i, d) in tmp[..n].iter().rev().enumerate() {
        buf[i] = *d;
    }
    n
}

/// The address `<prefix><port>`, or ENAMETOOLONG when it does not fit `sun_path`.
fn port_address(prefix: &[u8], port: u32) -> Result<libc::sockaddr_un, i32> {
    // SAFETY: all-zero is a valid sockaddr_un; the path stays NUL-terminated below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut digits = [0u8; 10];
    let n = decimal(port, &mut digits);
    if prefix.is_empty() || prefix.len() + n >= addr.sun_path.len() {
        return Err(libc::ENAMETOOLONG);
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).expect("AF_UNIX fits");
    for (dst, src) in addr
        .sun_path
        .iter_mut()
        .zip(prefix.iter().chain(&digits[..n]))
    {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    Ok(addr)
}

/// A non-blocking stream connected to `<prefix><port>`.
fn connect_port(prefix: &[u8], port: u32) -> Result<OwnedFd, i32> {
    let addr = port_address(prefix, port)?;
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, STREAM_FLAGS, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: `fd` was just created here and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .expect("sockaddr_un fits socklen_t");
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un of `len` bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        // Unix stream sockets connect at once or fail (EAGAIN: the backlog is full).
        return Err(errno());
    }
    Ok(fd)
}

/// Closes every fd but `keep`.
fn close_all_but(keep: RawFd) {
    let keep = keep.unsigned_abs();
    // SAFETY: closing fds this process does not use any more; close_range takes plain ints.
    let ok = unsafe {
        (keep == 0 || libc::syscall(libc::SYS_close_range, 0u32, keep - 1, 0u32) == 0)
            && libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0u32) == 0
    };
    if !ok {
        // Kernels before 5.9: one by one, as far as fds usually go.
        for fd in (0..4096).filter(|fd| *fd != keep) {
            // SAFETY: as above; closing an fd that is not open is harmless.
            unsafe { libc::close(i32::try_from(fd).expect("small")) };
        }
    }
}

/// The broker's life; never returns.
fn child_main(
    fd: RawFd,
    prefix: &[u8],
    removable: &[Option<CString>; 2],
    filter: Option<&BpfProgram>,
) -> ! {
    let exit = |code| -> ! {
        // SAFETY: _exit ends this process at once, without running the parent's
        // destructors or atexit handlers in the copy.
        unsafe { libc::_exit(code) }
    };
    close_all_but(fd);
    // SAFETY: prctl with an option and plain integer or C-string arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        libc::prctl(libc::PR_SET_NAME, NAME.as_ptr(), 0, 0, 0);
    }
    if let Some(f) = filter {
        if seccompiler::apply_filter(f).is_err() {
            exit(1);
        }
    }
    // SAFETY: `fd` is open (kept above) and owned by this loop from here on.
    let pair = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    loop {
        let mut req = [0u8; 8];
        // SAFETY: `req` is a valid buffer of its length; `fd` is the pair.
        let n = unsafe { libc::read(fd, req.as_mut_ptr().cast(), req.len()) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            // husk-vmm is gone.
            exit(0);
        }
        let op = u32::from_le_bytes(req[..4].try_into().expect("4 bytes"));
        let arg = u32::from_le_bytes(req[4..].try_into().expect("4 bytes"));
        let answer = |status: i32, stream: Option<&OwnedFd>| {
            let bytes = status.to_le_bytes();
            let sent = match stream {
                Some(s) => pair.send_with_fd(&bytes[..], s.as_raw_fd()).is_ok(),
                None => (&pair).write_all(&bytes).is_ok(),
            };
            if !sent {
                exit(0);
            }
        };
        match (op, n) {
            (OP_CONNECT, 8) => match connect_port(prefix, arg) {
                Ok(stream) => answer(0, Some(&stream)),
                Err(e) => answer(e, None),
            },
            (OP_FINISH, 8) => {
                let mut status = 0;
                for (bit, path) in removable.iter().enumerate() {
                    let Some(path) = path.as_ref().filter(|_| arg & (1 << bit) != 0) else {
                        continue;
                    };
                    // SAFETY: `path` is a valid NUL-terminated string.
                    if unsafe { libc::unlink(path.as_ptr()) } != 0
                        && errno() != libc::ENOENT
                        && status == 0
                    {
                        status = errno();
                    }
                }
                answer(status, None);
                exit(0);
            }
            _ => answer(libc::EINVAL, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn port_paths_are_the_prefix_and_the_decimal_port() {
        let mut buf = [0u8; 10];
        for (v, s) in [(0, "0"), (7, "7"), (1024, "1024"), (u32::MAX, "4294967295")] {
            let n = decimal(v, &mut buf);
            assert_eq!(&buf[..n], s.as_bytes());
        }
        let a = port_address(b"/run/x/v.sock_", 1025).unwrap();
        let path: Vec<u8> = a
            .sun_path
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| c.to_ne_bytes()[0])
            .collect();
        assert_eq!(path, b"/run/x/v.sock_1025");
        // 101 + 7 digits leaves no room for the NUL in sun_path's 108 bytes.
        let long = vec![b'a'; 101];
        assert_eq!(
            port_address(&long, 1234567).unwrap_err(),
            libc::ENAMETOOLONG
        );
        assert_eq!(port_address(b"", 1).unwrap_err(), libc::ENAMETOOLONG);
    }

    #[test]
    fn the_broker_connects_to_port_paths_and_removes_what_it_is_told() {
        let dir = std::env::temp_dir().join(format!("husk-broker-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Removed however the test ends (a failed assertion left it behind).
        struct RemoveOnDrop(std::path::PathBuf);
        impl Drop for RemoveOnDrop {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _remove = RemoveOnDrop(dir.clone());
        let vsock = dir.join("v.sock");
        let api = dir.join("api.sock");
        std::fs::write(&vsock, b"").unwrap();
        std::fs::write(&api, b"").unwrap();
        let served = UnixListener::bind(dir.join("v.sock_1024")).unwrap();
        // The test process has threads; the broker's child side only makes system calls
        // and touches memory prepared before the fork, which is safe there too.
        let b = Broker::spawn(BrokerConfig {
            vsock_sock: Some(vsock.clone()),
            api_sock: Some(api.clone()),
            filter: Some(crate::seccomp::broker_filter().unwrap()),
        })
        .unwrap();
        let mut s = b.connect(1024).unwrap();
        let (mut peer, _) = served.accept().unwrap();
        s.set_nonblocking(false).unwrap();
        s.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        std::io::Read::read_exact(&mut peer, &mut got).unwrap();
        assert_eq!(&got, b"hi");
        let e = b.connect(2048).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        b.finish(&[Owned::Vsock]).unwrap();
        assert!(!vsock.exists(), "asked to remove the vsock socket");
        assert!(api.exists(), "not asked to remove the API socket");
        let e = b.connect(1024).unwrap_err();
        assert!(
            matches!(e.kind(), io::ErrorKind::BrokenPipe),
            "after finish: {e}"
        );
    }
}
