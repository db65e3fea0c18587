//! The vsock muxer: turns guest packets into actions on host unix streams and host stream
//! events into packets for the guest. It never touches guest memory (the device copies
//! packets in and out) and never blocks: every stream is non-blocking, and readiness comes
//! from its epoll set, which the device's event thread waits on.
//!
//! Everything the guest can make it hold is bounded, because a guest that sends packets
//! and posts no rx buffers to take the answers must not grow husk-vmm without limit:
//! - control packets for the guest (RST, RESPONSE, REQUEST): at most [`MAX_CONTROL`];
//!   beyond that a reset is dropped and a new connection refused;
//! - credit updates: a per-connection flag, never a queue ([`Connection::request_credit_update`]);
//! - connections, in every state and both directions: at most [`MAX_CONNECTIONS`];
//! - guest data waiting for a slow host stream: the credit we advertise,
//!   [`CONN_BUF_ALLOC`] per connection (more is an overrun, and the connection is reset);
//! - host clients still sending their `CONNECT` line: at most [`MAX_HANDSHAKES`], each
//!   line at most [`MAX_HANDSHAKE`] bytes.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::super::csm::{ConnState, Connection, CONN_BUF_ALLOC};
use super::super::packet::{op, Pkt, HOST_CID, SHUTDOWN_BOTH, TYPE_STREAM};

/// Longest `CONNECT <port>\n` line accepted.
pub(crate) const MAX_HANDSHAKE: usize = 32;
/// Most host clients that have connected but not yet sent their whole `CONNECT` line;
/// more are closed at once (they see EOF and may retry).
pub(crate) const MAX_HANDSHAKES: usize = 64;
/// Most control packets (RST, RESPONSE, REQUEST) queued for the guest. A guest that floods
/// us with bad packets, or opens and resets connections, while posting no rx buffers must
/// not grow host memory without bound: beyond this, new resets are dropped and new
/// connections refused (the guest is misbehaving anyway).
pub(crate) const MAX_CONTROL: usize = 1024;
/// Most connections at once, in any state and either direction. Each holds a host stream
/// (an fd); a guest that opens connections and never closes them meets this limit, not
/// husk-vmm's fd limit. The agent needs a handful.
pub(crate) const MAX_CONNECTIONS: usize = 512;
/// How long a host-initiated connection waits for the guest's answer. Until the guest's
/// vsock driver is up nobody answers; the client then sees EOF and retries rather than
/// hanging on a request the guest may never see.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Host ports handed out for host-initiated connections start here (as Firecracker's do).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Errors while setting up the muxer.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The socket path is served by someone else.
    #[error("vsock socket {0}: in use by another process — stop it or give another --vsock-sock")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("vsock socket {0}: a file that is not a socket is in the way — remove it or give another --vsock-sock")]
    NotASocket(PathBuf),
    /// Binding or epoll setup failed.
    #[error("vsock socket {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Connection key: (host port, guest port).
type Key = (u32, u32);

/// What an fd in the epoll set is.
#[derive(Debug, Clone, Copy)]
enum Source {
    Listener,
    Handshake,
    Conn(Key),
}

/// Counters, for the control API.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MuxerCounters {
    /// Connections established (both directions).
    pub connections: u64,
    /// Resets sent to the guest.
    pub resets_sent: u64,
    /// Payload bytes guest → host.
    pub bytes_to_host: u64,
    /// Payload bytes host → guest.
    pub bytes_to_guest: u64,
}

/// The hybrid vsock muxer.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    sources: HashMap<RawFd, Source>,
    handshakes: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    conns: HashMap<Key, Connection>,
    control: VecDeque<Pkt>,
    next_local_port: u32,
    counters: MuxerCounters,
    connect_timeout: Duration,
    connector: Arc<dyn HostConnector>,
}

/// Opens the host end of a guest-initiated connection to host port `port`: a unix stream
/// connected to `<vsock socket>_<port>`. Under seccomp no husk-vmm thread may connect to a
/// path, so husk-vmm's binary hands the muxer the broker ([`crate::broker::Broker`]).
pub trait HostConnector: Send + Sync + std::fmt::Debug {
    /// A stream connected to the socket serving `port`, without waiting for it.
    fn connect(&self, port: u32) -> io::Result<UnixStream>;
}

/// Connects from the calling thread, by path (unit tests, the fuzz targets, a library
/// caller without filters).
#[derive(Debug)]
pub struct DirectConnector {
    /// The vsock socket; port P is served at `<base>_P`.
    pub base: PathBuf,
}

impl HostConnector for DirectConnector {
    fn connect(&self, port: u32) -> io::Result<UnixStream> {
        connect_nonblocking(&PathBuf::from(format!("{}_{}", self.base.display(), port)))
    }
}

/// Connects to the host socket `path` without waiting: a server whose accept backlog is
/// full refuses at once (EAGAIN) instead of stalling the thread that handles the guest's
/// packets (a vCPU's, on its queue notification) in a blocking connect.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    let bytes = path.as_os_str().as_bytes();
    // SAFETY: all-zero is a valid sockaddr_un (family and path are filled in below).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long for sun_path",
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).expect("AF_UNIX fits");
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created here and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .expect("sockaddr_un fits socklen_t");
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un of `len` bytes that outlives
    // the call; `fd` is an open socket.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        // Unix stream sockets connect at once or fail (EAGAIN: backlog full).
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MuxerError + '_ {
    move |source| MuxerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Binds `path`, replacing a stale socket but refusing a live one or any other file.
fn bind(path: &Path) -> Result<UnixListener, MuxerError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(MuxerError::NotASocket(path.to_owned()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(MuxerError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io_err(path))?;
    }
    UnixListener::bind(path).map_err(io_err(path))
}

impl Muxer {
    /// A muxer for guest `guest_cid` serving `path`.
    pub fn new(guest_cid: u64, path: &Path) -> Result<Self, MuxerError> {
        let listener = bind(path)?;
        listener.set_nonblocking(true).map_err(io_err(path))?;
        let epoll = Epoll::new().map_err(io_err(path))?;
        let mut m = Self {
            guest_cid,
            path: path.to_owned(),
            listener,
            epoll,
            sources: HashMap::new(),
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            counters: MuxerCounters::default(),
            connect_timeout: CONNECT_TIMEOUT,
            connector: Arc::new(DirectConnector {
                base: path.to_owned(),
            }),
        };
        let fd = m.listener.as_raw_fd();
        m.watch(fd, Source::Listener, EventSet::IN)
            .map_err(io_err(path))?;
        Ok(m)
    }

    /// Has `connector` open the host ends of guest-initiated connections.
    pub(crate) fn set_connector(&mut self, connector: Arc<dyn HostConnector>) {
        self.connector = connector;
    }

    /// The epoll fd that becomes readable when a host stream needs attention.
    pub(crate) fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counters so far.
    pub fn counters(&self) -> MuxerCounters {
        self.counters
    }

    /// Open connections.
    #[cfg(test)]
    pub(crate) fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn watch(&mut self, fd: RawFd, src: Source, events: EventSet) -> io::Result<()> {
        let fd_u64 = u64::try_from(fd).expect("fds are non-negative");
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, fd_u64))?;
        self.sources.insert(fd, src);
        Ok(())
    }

    fn rewatch(&self, fd: RawFd, events: EventSet) {
        let fd_u64 = u64::try_from(fd).expect("fds are non-negative");
        // Only fails for an fd not in the set, which the bookkeeping rules out.
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, fd_u64),
        );
    }

    fn unwatch(&mut self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.sources.remove(&fd);
    }

    /// Interest for a connection: readable unless we already know it is, writable while
    /// guest data waits for it.
    fn conn_interest(c: &Connection) -> EventSet {
        let mut ev = EventSet::empty();
        if !c.host_readable && c.state == ConnState::Established {
            ev |= EventSet::IN;
        }
        if c.has_pending_to_host() {
            ev |= EventSet::OUT;
        }
        ev
    }

    fn control_pkt(&self, key: Key, op: u16, flags: u32, fwd_cnt: u32) -> Pkt {
        Pkt {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt,
            data: Vec::new(),
        }
    }

    /// Queues a control packet for the guest unless [`MAX_CONTROL`] already wait; says
    /// whether it was queued.
    fn push_control(&mut self, pkt: Pkt) -> bool {
        if self.control.len() >= MAX_CONTROL {
            return false;
        }
        self.control.push_back(pkt);
        true
    }

    /// Whether a new connection fits: a free slot, and room for the packet that opens it.
    fn room_for_connection(&self) -> bool {
        self.conns.len() < MAX_CONNECTIONS && self.control.len() < MAX_CONTROL
    }

    fn reset(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.unwatch(c.stream.as_raw_fd());
        }
        if self.push_control(self.control_pkt(key, op::RST, 0, 0)) {
            self.counters.resets_sent += 1;
        }
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.unwatch(c.stream.as_raw_fd());
        }
    }

    /// Handles a packet the guest sent.
    pub(crate) fn send_pkt(&mut self, pkt: &Pkt) {
        let key = (pkt.dst_port, pkt.src_port);
        if pkt.dst_cid != HOST_CID || pkt.src_cid != self.guest_cid || pkt.type_ != TYPE_STREAM {
            // Not for us, or not a stream: refuse unless it is itself a reset.
            if pkt.op != op::RST {
                self.reset(key);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.update_peer_credit(pkt.buf_alloc, pkt.fwd_cnt);
        }
        match pkt.op {
            op::REQUEST => self.guest_connect(key, pkt),
            op::RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == ConnState::Connecting => {
                    let line = format!("OK {}\n", key.0);
                    // The client is waiting for exactly this line; a short write means it left.
                    if c.stream.write_all(line.as_bytes()).is_err() {
                        return self.reset(key);
                    }
                    c.state = ConnState::Established;
                    self.counters.connections += 1;
                    let fd = c.stream.as_raw_fd();
                    let ev = Self::conn_interest(c);
                    self.rewatch(fd, ev);
                }
                _ => self.reset(key),
            },
            op::RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return self.reset(key);
                };
                if c.state != ConnState::Established {
                    return; // data after our SHUTDOWN: dropped
                }
                if c.send_to_host(&pkt.data).is_err() {
                    return self.reset(key);
                }
                self.counters.bytes_to_host += pkt.data.len() as u64;
                let (fd, ev) = (c.stream.as_raw_fd(), Self::conn_interest(c));
                self.rewatch(fd, ev);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                // Answered by recv_pkt; any number of requests owe one update.
                if let Some(c) = self.conns.get_mut(&key) {
                    c.request_credit_update();
                }
            }
            op::SHUTDOWN => {
                // The guest is done: give the host what is left, then close both sides.
                if let Some(c) = self.conns.get_mut(&key) {
                    let _ = c.flush_to_host();
                }
                self.reset(key);
            }
            op::RST => self.remove(key),
            _ => self.reset(key),
        }
    }

    fn guest_connect(&mut self, key: Key, pkt: &Pkt) {
        if self.conns.contains_key(&key) || !self.room_for_connection() {
            return self.reset(key);
        }
        let conn = self
            .connector
            .connect(key.0)
            .and_then(|s| Connection::new(s, ConnState::Established));
        match conn {
            Ok(mut c) => {
                c.update_peer_credit(pkt.buf_alloc, pkt.fwd_cnt);
                let fd = c.stream.as_raw_fd();
                if self.watch(fd, Source::Conn(key), EventSet::IN).is_err() {
                    return self.reset(key);
                }
                self.conns.insert(key, c);
                self.counters.connections += 1;
                // Room was checked above.
                self.push_control(self.control_pkt(key, op::RESPONSE, 0, 0));
            }
            Err(_) => self.reset(key),
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    // Too many clients mid-greeting: this one is closed (EOF) and may retry.
                    if self.handshakes.len() >= MAX_HANDSHAKES || s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = s.as_raw_fd();
                    if self.watch(fd, Source::Handshake, EventSet::IN).is_ok() {
                        self.handshakes.insert(fd, (s, Vec::new()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads what a host client sent of its `CONNECT <port>\n` line; on a full line,
    /// starts the connection to the guest.
    fn handshake(&mut self, fd: RawFd) {
        let Some((stream, buf)) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte, so nothing after the newline (the client's first data) is eaten.
        let line = loop {
            match stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(String::from_utf8_lossy(buf).into_owned()),
                Ok(_) if buf.len() >= MAX_HANDSHAKE => break Err(()),
                Ok(_) => buf.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        self.unwatch(fd);
        let Some((stream, _)) = self.handshakes.remove(&fd) else {
            return;
        };
        let port = line.ok().and_then(|l| {
            l.strip_prefix("CONNECT ")
                .and_then(|p| p.trim().parse::<u32>().ok())
        });
        let Some(port) = port else {
            // Bad greeting: the client gets closed, the guest never hears of it.
            return;
        };
        if !self.room_for_connection() {
            // The guest holds every connection slot or has not taken its control packets:
            // the client sees EOF, as for a guest that does not answer.
            return;
        }
        let local = self.next_local_port;
        self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let key = (local, port);
        let Ok(c) = Connection::new(stream, ConnState::Connecting) else {
            return;
        };
        // Not readable until the guest answers: no IN interest yet.
        if self
            .watch(c.stream.as_raw_fd(), Source::Conn(key), EventSet::empty())
            .is_err()
        {
            return;
        }
        self.conns.insert(key, c);
        // Room was checked above.
        self.push_control(self.control_pkt(key, op::REQUEST, 0, 0));
    }

    /// Sets how long host-initiated connections wait for the guest (tests use a short one).
    #[cfg(test)]
    pub(crate) fn set_connect_timeout(&mut self, timeout: Duration) {
        self.connect_timeout = timeout;
    }

    /// How long until the next unanswered host connection times out, if any waits.
    pub(crate) fn next_timeout(&self) -> Option<Duration> {
        self.conns
            .values()
            .filter(|c| c.state == ConnState::Connecting)
            .map(|c| self.connect_timeout.saturating_sub(c.since.elapsed()))
            .min()
    }

    /// Closes host-initiated connections the guest has not answered in time: the client
    /// sees EOF; a REQUEST still queued is withdrawn, one already delivered is reset.
    fn expire_connecting(&mut self) {
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == ConnState::Connecting && c.since.elapsed() >= self.connect_timeout
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            let queued = self
                .control
                .iter()
                .position(|p| p.op == op::REQUEST && (p.src_port, p.dst_port) == key);
            match queued {
                Some(i) => {
                    self.control.remove(i);
                    self.remove(key);
                }
                None => self.reset(key),
            }
        }
    }

    /// Takes the host-side events that are ready (without blocking).
    pub(crate) fn poll_host(&mut self) {
        self.expire_connecting();
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for ev in &events[..n] {
                let Ok(fd) = RawFd::try_from(ev.data()) else {
                    continue;
                };
                let set = ev.event_set();
                match self.sources.get(&fd).copied() {
                    Some(Source::Listener) => self.accept_all(),
                    Some(Source::Handshake) => self.handshake(fd),
                    Some(Source::Conn(key)) => self.conn_event(key, set),
                    None => {}
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn conn_event(&mut self, key: Key, set: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let hangup = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        match c.state {
            // The client left before the guest answered: cancel towards the guest.
            ConnState::Connecting if hangup => return self.reset(key),
            ConnState::Connecting => return,
            // Only the guest's RST is awaited; a hung-up stream would report forever.
            ConnState::Closing => {
                let fd = c.stream.as_raw_fd();
                return self.unwatch(fd);
            }
            ConnState::Established => {}
        }
        if set.contains(EventSet::OUT) && c.flush_to_host().is_err() {
            return self.reset(key);
        }
        if hangup || set.contains(EventSet::IN) {
            c.host_readable = true;
        }
        let fd = c.stream.as_raw_fd();
        if hangup {
            // EPOLLHUP cannot be masked: stop watching; what is left is read, then EOF.
            self.unwatch(fd);
        } else {
            let ev = Self::conn_interest(c);
            self.rewatch(fd, ev);
        }
    }

    /// Whether a packet for the guest is ready.
    pub(crate) fn has_pending_rx(&self) -> bool {
        !self.control.is_empty()
            || self.conns.values().any(|c| {
                c.state == ConnState::Established
                    && ((c.host_readable && c.peer_credit() > 0) || c.needs_credit_update())
            })
    }

    /// The next packet for the guest, with at most `max_data` bytes of payload.
    pub(crate) fn recv_pkt(&mut self, max_data: u32) -> Option<Pkt> {
        if let Some(mut p) = self.control.pop_front() {
            if let Some(c) = self.conns.get_mut(&(p.src_port, p.dst_port)) {
                p.fwd_cnt = c.fwd_cnt_for_header();
            }
            return Some(p);
        }
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            let c = self.conns.get_mut(&key).expect("key from the map");
            if c.state != ConnState::Established {
                continue;
            }
            if c.host_readable && c.peer_credit() > 0 {
                match c.read_from_host(max_data) {
                    Ok(Some(data)) if data.is_empty() => {
                        // Host EOF: tell the guest, wait for its RST.
                        c.state = ConnState::Closing;
                        let fwd = c.fwd_cnt_for_header();
                        let (fd, ev) = (c.stream.as_raw_fd(), Self::conn_interest(c));
                        self.rewatch(fd, ev);
                        return Some(self.control_pkt(key, op::SHUTDOWN, SHUTDOWN_BOTH, fwd));
                    }
                    Ok(Some(data)) => {
                        let fwd = c.fwd_cnt_for_header();
                        self.counters.bytes_to_guest += data.len() as u64;
                        let mut p = self.control_pkt(key, op::RW, 0, fwd);
                        p.data = data;
                        return Some(p);
                    }
                    Ok(None) => {
                        let (fd, ev) = (c.stream.as_raw_fd(), Self::conn_interest(c));
                        self.rewatch(fd, ev);
                    }
                    Err(_) => {
                        self.reset(key);
                        return self.control.pop_front();
                    }
                }
            }
            let c = self.conns.get_mut(&key).expect("still there");
            if c.needs_credit_update() {
                let fwd = c.fwd_cnt_for_header();
                return Some(self.control_pkt(key, op::CREDIT_UPDATE, 0, fwd));
            }
        }
        None
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours; leave nothing behind. (In husk-vmm the muxer lives as
        // long as the process once the filters are on: this runs only when a build fails,
        // before them; the broker removes the socket at the end.)
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests;
