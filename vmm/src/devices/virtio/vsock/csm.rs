//! The state of one vsock connection between a guest port and a host unix stream, and
//! its credit accounting (virtio spec 5.10.6.3): we never send the guest more than it
//! said it can buffer, and we tell it how much we have forwarded so it can send more.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

/// Receive buffer we advertise per connection (bytes the guest may have in flight to us).
pub(crate) const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Announce our forwarded count after this much progress even with nothing else to send.
pub(crate) const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// Largest payload per packet we build.
pub(crate) const MAX_PKT_DATA: u32 = 64 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
    /// The host side ended; SHUTDOWN sent, waiting for the guest's RST.
    Closing,
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Connection {
    /// Its host unix stream (non-blocking).
    pub stream: UnixStream,
    /// Its state.
    pub state: ConnState,
    /// Guest's receive buffer size.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed.
    peer_fwd_cnt: u32,
    /// Bytes we have sent the guest.
    tx_cnt: u32,
    /// Bytes from the guest we have written to the host stream.
    fwd_cnt: u32,
    /// The fwd_cnt the guest last heard from us.
    last_fwd_cnt_sent: u32,
    /// The guest sent CREDIT_REQUEST and has not heard our credit since. A flag, not a
    /// count: one CREDIT_UPDATE answers any number of requests, so a guest that keeps
    /// asking while posting no rx buffers costs nothing more.
    credit_requested: bool,
    /// Guest data the host stream has not taken yet.
    to_host: Vec<u8>,
    /// The host stream may have data for the guest.
    pub host_readable: bool,
    /// When the connection was created (host-initiated ones time out unanswered).
    pub since: std::time::Instant,
}

impl Connection {
    /// A connection over `stream` (set non-blocking here).
    pub fn new(stream: UnixStream, state: ConnState) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            credit_requested: false,
            to_host: Vec::new(),
            host_readable: false,
            since: std::time::Instant::now(),
        })
    }

    /// Takes the guest's credit fields from any packet it sent.
    pub(crate) fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes we may still send the guest.
    pub(crate) fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Our fwd_cnt, to put in a header; remembers that the guest has heard it (every
    /// header carries our credit, so it also answers a pending CREDIT_REQUEST).
    pub(crate) fn fwd_cnt_for_header(&mut self) -> u32 {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.credit_requested = false;
        self.fwd_cnt
    }

    /// The guest asked for our credit (CREDIT_REQUEST): the next packet for this
    /// connection answers it, and until then at most one CREDIT_UPDATE is owed.
    pub(crate) fn request_credit_update(&mut self) {
        self.credit_requested = true;
    }

    /// Whether the guest should hear our fwd_cnt even without data to carry it: it asked,
    /// or we have forwarded enough since it last heard.
    pub(crate) fn needs_credit_update(&self) -> bool {
        self.credit_requested
            || self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Guest bytes buffered for the host stream (never more than [`CONN_BUF_ALLOC`]).
    #[cfg(test)]
    pub(crate) fn pending_to_host(&self) -> usize {
        self.to_host.len()
    }

    /// Whether guest data waits for the host stream.
    pub(crate) fn has_pending_to_host(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// Whether the guest may send `len` more bytes (it must respect our credit).
    fn within_our_credit(&self, len: usize) -> bool {
        self.to_host.len() + len <= CONN_BUF_ALLOC as usize
    }

    /// Delivers guest data to the host stream, keeping what it cannot take yet.
    /// Err means the guest overran our credit or the host stream failed: reset.
    pub(crate) fn send_to_host(&mut self, data: &[u8]) -> io::Result<()> {
        if !self.within_our_credit(data.len()) {
            return Err(io::Error::other("guest overran its credit"));
        }
        self.to_host.extend_from_slice(data);
        self.flush_to_host()
    }

    /// Writes as much pending guest data to the host stream as it takes.
    pub(crate) fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self
                        .fwd_cnt
                        .wrapping_add(u32::try_from(n).expect("bounded by CONN_BUF_ALLOC"));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads host data for the guest, at most `max` bytes and never beyond the guest's
    /// credit. Ok(None): nothing now (would block or no credit); Ok(Some(empty)): EOF.
    pub(crate) fn read_from_host(&mut self, max: u32) -> io::Result<Option<Vec<u8>>> {
        let n = max.min(self.peer_credit()).min(MAX_PKT_DATA) as usize;
        if n == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; n];
        loop {
            match self.stream.read(&mut buf) {
                Ok(got) => {
                    buf.truncate(got);
                    if got == 0 {
                        self.host_readable = false;
                    }
                    self.tx_cnt = self
                        .tx_cnt
                        .wrapping_add(u32::try_from(got).expect("at most MAX_PKT_DATA"));
                    return Ok(Some(buf));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Connection::new(a, ConnState::Established).unwrap(), b)
    }

    #[test]
    fn no_data_goes_to_the_guest_without_credit() {
        let (mut c, mut host) = pair();
        host.write_all(b"0123456789").unwrap();
        c.host_readable = true;
        assert_eq!(
            c.read_from_host(1000).unwrap(),
            None,
            "no credit announced yet"
        );
        c.update_peer_credit(4, 0);
        assert_eq!(c.read_from_host(1000).unwrap().unwrap(), b"0123");
        assert_eq!(c.peer_credit(), 0);
        assert_eq!(c.read_from_host(1000).unwrap(), None);
        // The guest consumed 4 bytes.
        c.update_peer_credit(4, 4);
        assert_eq!(c.read_from_host(1000).unwrap().unwrap(), b"4567");
        c.update_peer_credit(100, 8);
        assert_eq!(c.read_from_host(1000).unwrap().unwrap(), b"89");
        assert_eq!(c.read_from_host(1000).unwrap(), None, "would block");
        assert!(!c.host_readable);
        drop(host);
        assert_eq!(c.read_from_host(1000).unwrap(), Some(Vec::new()), "EOF");
    }

    #[test]
    fn guest_data_reaches_the_host_and_counts_as_forwarded() {
        let (mut c, mut host) = pair();
        c.send_to_host(b"hello").unwrap();
        let mut buf = [0u8; 5];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(c.fwd_cnt_for_header(), 5);
        assert!(!c.needs_credit_update());
    }

    #[test]
    fn a_full_host_stream_buffers_within_credit_and_overruns_are_errors() {
        let (mut c, mut host) = pair();
        // Nobody reads the host side: once its socket buffer is full, guest data waits in
        // to_host, up to the credit we advertised.
        let chunk = vec![7u8; 16 * 1024];
        let mut sent = 0;
        while c.to_host.len() + chunk.len() <= CONN_BUF_ALLOC as usize {
            c.send_to_host(&chunk).unwrap();
            sent += chunk.len();
        }
        assert!(c.has_pending_to_host());
        assert!(
            c.send_to_host(&chunk).is_err(),
            "the guest overran the credit we gave"
        );
        // Draining the host side lets the rest through and raises fwd_cnt.
        host.set_nonblocking(true).unwrap();
        let mut total = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while total < sent {
            c.flush_to_host().unwrap();
            match host.read(&mut buf) {
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(total, sent);
        assert!(!c.has_pending_to_host());
        assert!(c.needs_credit_update());
        assert_eq!(c.fwd_cnt_for_header() as usize, sent);
    }

    #[test]
    fn any_number_of_credit_requests_owe_one_update() {
        let (mut c, _host) = pair();
        assert!(!c.needs_credit_update());
        for _ in 0..100_000 {
            c.request_credit_update();
        }
        assert!(c.needs_credit_update());
        assert_eq!(c.fwd_cnt_for_header(), 0);
        assert!(!c.needs_credit_update(), "one header answers them all");
    }

    #[test]
    fn credit_arithmetic_wraps() {
        let (mut c, _host) = pair();
        c.tx_cnt = u32::MAX - 1;
        c.update_peer_credit(10, u32::MAX - 3);
        assert_eq!(c.peer_credit(), 8);
    }
}
