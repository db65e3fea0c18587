//! The pool's messages: one JSON object per line, on unix stream sockets only root can reach
//! (the holder's `pool.sock`, 0600 in a 0700 directory; a keeper's socketpair).
//!
//! Every line is read byte by byte up to [`MAX_LINE`]: no reader ever buffers past the end of
//! its message, so a keeper's connection can be handed to a shim (`SCM_RIGHTS`) with nothing
//! of it left behind in the holder, and a peer that never ends its line cannot grow a buffer.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use super::Shape;
use crate::network::PooledNic;

/// The longest message line either side accepts.
pub const MAX_LINE: usize = 16 * 1024;

/// A request to the holder, on `pool.sock`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// A ready VM of `shape` for sandbox `sid`; the claimer is the connecting process
    /// (`SO_PEERCRED`), never a pid the request names.
    Claim { sid: String, shape: Box<Shape> },
    /// What the pool holds now.
    Status {},
}

/// What the holder hands the claiming shim, with the keeper's control connection attached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claimed {
    pub vmid: String,
    /// The VM program's pid (QEMU or husk-vmm), as a cold VM's [`husk_hypervisor::Vm::pid`].
    pub vm_pid: u32,
    /// The keeper: parent of the VM's processes, ours now.
    pub keeper_pid: u32,
    pub backend: String,
    /// The console log and the hybrid-vsock socket, relative to the VM's state directory
    /// (`vm/` of the sandbox directory it was renamed to).
    pub console: PathBuf,
    pub vsock: Option<PathBuf>,
    /// The guest's own boot time to the agent's ready line.
    pub guest_boot_ms: u64,
    /// Its NICs' taps (in the keeper's network namespace, `/proc/<keeper_pid>/ns/net`).
    pub nics: Vec<PooledNic>,
}

/// The holder's answer to a claim or a status request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed: Option<Claimed>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

impl Reply {
    pub fn error(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(e.into()),
            claimed: None,
            status: None,
        }
    }
}

/// What a keeper says first, to the holder that started it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeeperEvent {
    Ready {
        vm_pid: u32,
        backend: String,
        console: PathBuf,
        vsock: Option<PathBuf>,
        guest_boot_ms: u64,
        nics: Vec<PooledNic>,
    },
    Failed {
        error: String,
    },
}

/// A request to a keeper from its owner (the holder, then the claiming shim).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeeperRequest {
    /// From the holder only: the owner is now process `pid`, and the VM's directory becomes
    /// `dir` (the holder renames it next).
    Handover {
        pid: u32,
        dir: PathBuf,
    },
    /// The VM's exit status (raw wait status) if it has ended.
    Status {},
    Pause {},
    Resume {},
    Stop {
        grace_ms: u64,
    },
    Kill {},
    /// From the claiming shim, once: the agent connection the keeper opened when the VM was
    /// ready (vsock handshake done, nothing sent on it), passed with the reply (`SCM_RIGHTS`).
    /// The guest's side of a new connection (its ttrpc server's threads) costs ~20 ms under
    /// TCG on first use, ~2 ms once settled: made while the VM waits, off the claim's path.
    /// The reply carries the agent's version ([`KeeperReply::agent_version`]).
    AgentConnection {},
    /// The owner is done: the keeper kills what is left and exits (the owner cleans up).
    Exit {},
}

/// A keeper's answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeeperReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Raw wait status of the VM program, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited: Option<i32>,
    /// With the agent connection: the agent's version, from the keeper's own `Check` of this
    /// VM's agent (whose API version matched), so that the claimer does not ask again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// Reads one line (without its `\n`). `Ok(None)`: the peer closed before sending a byte.
/// A line longer than `max`, or cut by EOF, is an error naming the bound.
pub fn read_line(r: &mut impl Read, max: usize) -> std::io::Result<Option<String>> {
    read_line_after(r, max, Vec::new())
}

/// [`read_line`] of a line whose first bytes (`line`, no `\n` among them) were already read.
fn read_line_after(
    r: &mut impl Read,
    max: usize,
    mut line: Vec<u8>,
) -> std::io::Result<Option<String>> {
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the peer closed in the middle of a message",
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                if line.len() >= max {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("a message longer than {max} bytes"),
                    ));
                }
                line.push(byte[0]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "a message not in UTF-8"))
}

/// Reads one message line and parses it.
pub fn read_msg<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> std::io::Result<Option<T>> {
    let Some(line) = read_line(r, MAX_LINE)? else {
        return Ok(None);
    };
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn line_of(msg: &impl Serialize) -> std::io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(msg)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    line.push(b'\n');
    Ok(line)
}

/// Writes one message line.
pub fn write_msg(w: &mut impl Write, msg: &impl Serialize) -> std::io::Result<()> {
    w.write_all(&line_of(msg)?)
}

/// Writes one message line with `fd` attached to its first byte (`SCM_RIGHTS`).
pub fn send_msg_with_fd(sock: &UnixStream, msg: &impl Serialize, fd: RawFd) -> std::io::Result<()> {
    let line = line_of(msg)?;
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&line)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(std::io::Error::from)?;
    // The fd travelled with the first byte; the rest of a long line goes as plain bytes.
    (&*sock).write_all(&line[sent..])
}

/// Reads one message line and the descriptor sent with it, if any. The first `recvmsg` reads
/// one byte only, so nothing past this line is consumed.
pub fn recv_msg_with_fd<T: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
) -> std::io::Result<(Option<T>, Option<OwnedFd>)> {
    let mut first = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (n, fd) = {
        let mut iov = [IoSliceMut::new(&mut first)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let mut fd = None;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for (i, raw) in fds.into_iter().enumerate() {
                    // SAFETY: the kernel just installed `raw` in this process for us; nothing
                    // else owns it. Only the first is kept, any other is closed here.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if i == 0 && fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        (msg.bytes, fd)
    };
    if n == 0 {
        return Ok((None, fd));
    }
    let line = if first[0] == b'\n' {
        String::new()
    } else {
        read_line_after(&mut &*sock, MAX_LINE, vec![first[0]])?.unwrap_or_default()
    };
    let msg = serde_json::from_str(&line)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok((Some(msg), fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded_and_never_read_past() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"{\"op\":\"status\"}\nnext").unwrap();
        assert_eq!(
            read_msg::<Request>(&mut b).unwrap(),
            Some(Request::Status {})
        );
        let mut rest = [0u8; 4];
        b.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"next", "the reader took bytes past its line");
        a.write_all(&[b'x'; 100]).unwrap();
        let e = read_line(&mut b, 50).unwrap_err();
        assert!(e.to_string().contains("longer than 50"), "{e}");
        drop(a);
        let mut c = std::io::Cursor::new(b"half".to_vec());
        assert!(
            read_line(&mut c, 50).is_err(),
            "a cut line is not a message"
        );
        let mut empty = std::io::Cursor::new(Vec::new());
        assert_eq!(read_line(&mut empty, 50).unwrap(), None);
    }

    #[test]
    fn unknown_requests_and_fields_are_refused() {
        for bad in [
            "{\"op\":\"reuse\"}",
            "{\"op\":\"status\",\"extra\":1}",
            "{\"op\":\"handover\",\"pid\":1}",
            "{\"op\":\"agent_connection\",\"fd\":3}",
            "not json",
        ] {
            let mut c = std::io::Cursor::new(format!("{bad}\n").into_bytes());
            assert!(read_msg::<KeeperRequest>(&mut c).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_descriptor_travels_with_its_line() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut keep, give) = UnixStream::pair().unwrap();
        let reply = Reply::error("x".repeat(300));
        send_msg_with_fd(&a, &reply, give.as_raw_fd()).unwrap();
        drop(give);
        write_msg(&mut &a, &Reply::error("second")).unwrap();
        let (got, fd) = recv_msg_with_fd::<Reply>(&b).unwrap();
        assert_eq!(got.unwrap().error.unwrap().len(), 300);
        let mut passed = UnixStream::from(fd.expect("the descriptor"));
        passed.write_all(b"ping\n").unwrap();
        assert_eq!(read_line(&mut keep, 10).unwrap().as_deref(), Some("ping"));
        let (second, none) = recv_msg_with_fd::<Reply>(&b).unwrap();
        assert_eq!(second.unwrap().error.as_deref(), Some("second"));
        assert!(none.is_none());
    }
}
