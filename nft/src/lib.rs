//! Just enough of nf_tables over netlink (`NETLINK_NETFILTER`) for the port-forward NAT: one
//! table of our own with NAT base chains and rules made of payload / meta / cmp / immediate
//! / nat expressions, sent as one atomic batch; and deleting that table. No `nft` or
//! `iptables` binary (nodes may have either, or neither, and iptables-legacy vs -nft), no
//! libnftnl: the messages are small and written out here from the kernel's
//! `include/uapi/linux/netfilter/nf_tables.h` and `nfnetlink.h`.
//!
//! The socket is opened in the calling thread's network namespace, so everything lands
//! there: the shim calls it from a thread inside the pod's netns on the host
//! (`shim/src/network/port_forward.rs`), the agent in the guest's own
//! (`agent/src/network.rs`, the guest end of port-forward). It never opens anything else and
//! holds no state between calls.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NLMSG_ERROR: u16 = 0x2;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;

const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_IPV4: u8 = 2;
const NFT_REG_1: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_META_IIF: u32 = 4;
const NFT_META_L4PROTO: u32 = 16;
const NFT_NAT_SNAT: u32 = 0;
const NFT_NAT_DNAT: u32 = 1;

/// Netfilter hooks (`enum nf_inet_hooks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Every packet arriving, before routing (`NF_INET_PRE_ROUTING`).
    Prerouting = 0,
    /// Locally generated packets, before routing (`NF_INET_LOCAL_OUT`).
    Output = 3,
    /// Every packet leaving, after routing (`NF_INET_POST_ROUTING`).
    Postrouting = 4,
}

/// The IPv4 header's destination address, and its first byte.
const IPV4_DADDR: (u32, u32) = (16, 4);
/// The IPv4 header's source address.
const IPV4_SADDR: (u32, u32) = (12, 4);
const IPV4_DADDR_FIRST_BYTE: (u32, u32) = (16, 1);

/// One match or action of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// The IPv4 destination address equals this one.
    DaddrIs(Ipv4Addr),
    /// The IPv4 source address equals this one.
    SaddrIs(Ipv4Addr),
    /// The packet arrived on the interface of this index (`meta iif`).
    IifIs(u32),
    /// The IPv4 destination address is in `first.0.0.0/8`.
    DaddrFirstByteIs(u8),
    /// The layer-4 protocol (`meta l4proto`) is this one (e.g. 6, TCP).
    L4ProtoIs(u8),
    /// `dnat to ADDR` (the port is kept).
    Dnat(Ipv4Addr),
    /// `snat to ADDR` (the port is kept when it can be).
    Snat(Ipv4Addr),
}

/// A NAT base chain of the table and its rules.
#[derive(Debug, Clone)]
pub struct Chain {
    pub name: &'static str,
    pub hook: Hook,
    pub priority: i32,
    pub rules: Vec<Vec<Expr>>,
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nf_tables netlink socket: {what}")]
    Socket {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("nf_tables: {what}: {source} — the kernel needs nf_tables with NAT (CONFIG_NF_TABLES, CONFIG_NFT_NAT, CONFIG_NF_NAT)")]
    Kernel {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nf_tables: no answer to {0}")]
    NoAnswer(String),
}

/// A netlink message being written: header, `nfgenmsg`, attributes.
struct Msg {
    buf: Vec<u8>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl Msg {
    fn new(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Self { buf }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = u16::try_from(4 + data.len()).expect("attributes here are small");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v)
    }

    /// nf_tables integers are big-endian.
    fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_be_bytes())
    }

    fn nested(&mut self, ty: u16, f: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        f(self);
        let len = u16::try_from(self.buf.len() - start).expect("attributes here are small");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).expect("messages here are small");
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn expr(m: &mut Msg, name: &str, data: impl FnOnce(&mut Msg)) {
    m.nested(NFTA_LIST_ELEM, |m| {
        m.str(NFTA_EXPR_NAME, name);
        m.nested(NFTA_EXPR_DATA, data);
    });
}

fn load_payload(m: &mut Msg, (offset, len): (u32, u32)) {
    expr(m, "payload", |m| {
        m.u32(NFTA_PAYLOAD_DREG, NFT_REG_1)
            .u32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER)
            .u32(NFTA_PAYLOAD_OFFSET, offset)
            .u32(NFTA_PAYLOAD_LEN, len);
    });
}

fn cmp_eq(m: &mut Msg, value: &[u8]) {
    expr(m, "cmp", |m| {
        m.u32(NFTA_CMP_SREG, NFT_REG_1)
            .u32(NFTA_CMP_OP, NFT_CMP_EQ)
            .nested(NFTA_CMP_DATA, |m| {
                m.attr(NFTA_DATA_VALUE, value);
            });
    });
}

fn nat(m: &mut Msg, kind: u32, addr: Ipv4Addr) {
    expr(m, "immediate", |m| {
        m.u32(NFTA_IMMEDIATE_DREG, NFT_REG_1)
            .nested(NFTA_IMMEDIATE_DATA, |m| {
                m.attr(NFTA_DATA_VALUE, &addr.octets());
            });
    });
    expr(m, "nat", |m| {
        m.u32(NFTA_NAT_TYPE, kind)
            .u32(NFTA_NAT_FAMILY, u32::from(NFPROTO_IPV4))
            .u32(NFTA_NAT_REG_ADDR_MIN, NFT_REG_1);
    });
}

fn encode(m: &mut Msg, e: &Expr) {
    match e {
        Expr::DaddrIs(a) => {
            load_payload(m, IPV4_DADDR);
            cmp_eq(m, &a.octets());
        }
        Expr::SaddrIs(a) => {
            load_payload(m, IPV4_SADDR);
            cmp_eq(m, &a.octets());
        }
        Expr::IifIs(index) => {
            expr(m, "meta", |m| {
                m.u32(NFTA_META_DREG, NFT_REG_1)
                    .u32(NFTA_META_KEY, NFT_META_IIF);
            });
            // The kernel stores the index in host byte order.
            cmp_eq(m, &index.to_ne_bytes());
        }
        Expr::DaddrFirstByteIs(b) => {
            load_payload(m, IPV4_DADDR_FIRST_BYTE);
            cmp_eq(m, &[*b]);
        }
        Expr::L4ProtoIs(p) => {
            expr(m, "meta", |m| {
                m.u32(NFTA_META_DREG, NFT_REG_1)
                    .u32(NFTA_META_KEY, NFT_META_L4PROTO);
            });
            cmp_eq(m, &[*p]);
        }
        Expr::Dnat(a) => nat(m, NFT_NAT_DNAT, *a),
        Expr::Snat(a) => nat(m, NFT_NAT_SNAT, *a),
    }
}

fn msg_type(cmd: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | cmd
}

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const REQ_ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;
const CREATE: u16 = 0x400;
const APPEND: u16 = 0x800;
const AF_UNSPEC: u8 = 0;

/// A batch of nf_tables messages, each described for error messages.
struct Batch {
    msgs: Vec<(String, Vec<u8>)>,
    seq: u32,
}

impl Batch {
    fn new() -> Self {
        Self {
            msgs: Vec::new(),
            seq: 1,
        }
    }

    fn push(&mut self, what: String, cmd: u16, flags: u16, f: impl FnOnce(&mut Msg)) {
        self.seq += 1;
        let mut m = Msg::new(msg_type(cmd), REQ_ACK | flags, self.seq, NFPROTO_IPV4, 0);
        f(&mut m);
        self.msgs.push((what, m.finish()));
    }

    fn bytes(&self) -> Vec<u8> {
        let res_id = NFNL_SUBSYS_NFTABLES;
        let flags = NLM_F_REQUEST;
        let mut out = Msg::new(NFNL_MSG_BATCH_BEGIN, flags, 1, AF_UNSPEC, res_id).finish();
        for (_, m) in &self.msgs {
            out.extend_from_slice(m);
        }
        out.extend(Msg::new(NFNL_MSG_BATCH_END, flags, self.seq + 1, AF_UNSPEC, res_id).finish());
        out
    }

    /// Sends the batch on a new socket (in the calling thread's netns) and waits for every
    /// message's acknowledgement; the first error names its message. The kernel applies
    /// all of it or none.
    fn send(&self) -> Result<(), NftError> {
        let sock = socket()?;
        let bytes = self.bytes();
        // SAFETY: `bytes` is a valid buffer of the given length; the socket is open.
        let n = unsafe { libc::send(sock.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if usize::try_from(n).ok() != Some(bytes.len()) {
            return Err(NftError::Socket {
                what: "sending the batch",
                source: std::io::Error::last_os_error(),
            });
        }
        let mut pending: Vec<u32> = (2..=self.seq).collect();
        let what = |seq: u32| {
            usize::try_from(seq - 2)
                .ok()
                .and_then(|i| self.msgs.get(i))
                .map_or_else(|| format!("message {seq}"), |(w, _)| w.clone())
        };
        let mut buf = vec![0u8; 65536];
        while !pending.is_empty() {
            // SAFETY: `buf` is a writable buffer of the given length; the socket is open.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n = usize::try_from(n).map_err(|_| {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    NftError::NoAnswer(what(pending[0]))
                } else {
                    NftError::Socket {
                        what: "reading the answers",
                        source: e,
                    }
                }
            })?;
            let mut off = 0;
            while off + 16 <= n {
                let word =
                    |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
                let len = word(off) as usize;
                let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let seq = word(off + 8);
                if len < 16 || off + len > n {
                    break;
                }
                if ty == NLMSG_ERROR && len >= 20 {
                    let code =
                        i32::from_ne_bytes(buf[off + 16..off + 20].try_into().expect("4 bytes"));
                    if code != 0 {
                        return Err(NftError::Kernel {
                            what: what(seq),
                            source: std::io::Error::from_raw_os_error(-code),
                        });
                    }
                    pending.retain(|s| *s != seq);
                }
                off += align4(len);
            }
        }
        Ok(())
    }
}

fn socket() -> Result<OwnedFd, NftError> {
    // SAFETY: plain socket(2); returns a new fd or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(NftError::Socket {
            what: "opening it",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // An answer that never comes must not hang the sandbox's start.
    let tv = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval; `tv` is valid for the call and its size is given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).expect("16 bytes"),
        )
    };
    if rc != 0 {
        return Err(NftError::Socket {
            what: "setting its receive timeout",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(sock)
}

fn table_msg(b: &mut Batch, cmd: u16, flags: u16, table: &str) {
    let verb = if cmd == NFT_MSG_DELTABLE {
        "deleting"
    } else {
        "adding"
    };
    b.push(format!("{verb} table ip {table}"), cmd, flags, |m| {
        m.str(NFTA_TABLE_NAME, table);
    });
}

/// Makes `table ip <table>` hold exactly `chains` (NAT base chains), replacing whatever a
/// table of that name held, in one atomic batch.
pub fn replace_nat_table(table: &str, chains: &[Chain]) -> Result<(), NftError> {
    let mut b = Batch::new();
    // "add; delete; add": the table exists whatever was there, then is empty.
    table_msg(&mut b, NFT_MSG_NEWTABLE, CREATE, table);
    table_msg(&mut b, NFT_MSG_DELTABLE, 0, table);
    table_msg(&mut b, NFT_MSG_NEWTABLE, CREATE, table);
    for c in chains {
        b.push(
            format!(
                "adding chain {} (nat, hook {:?}, priority {})",
                c.name, c.hook, c.priority
            ),
            NFT_MSG_NEWCHAIN,
            CREATE,
            |m| {
                m.str(NFTA_CHAIN_TABLE, table)
                    .str(NFTA_CHAIN_NAME, c.name)
                    .nested(NFTA_CHAIN_HOOK, |m| {
                        m.u32(NFTA_HOOK_HOOKNUM, c.hook as u32)
                            .attr(NFTA_HOOK_PRIORITY, &c.priority.to_be_bytes());
                    })
                    .str(NFTA_CHAIN_TYPE, "nat");
            },
        );
        for (i, rule) in c.rules.iter().enumerate() {
            b.push(
                format!("adding rule {i} of chain {} ({rule:?})", c.name),
                NFT_MSG_NEWRULE,
                CREATE | APPEND,
                |m| {
                    m.str(NFTA_RULE_TABLE, table)
                        .str(NFTA_RULE_CHAIN, c.name)
                        .nested(NFTA_RULE_EXPRESSIONS, |m| {
                            for e in rule {
                                encode(m, e);
                            }
                        });
                },
            );
        }
    }
    b.send()
}

/// Deletes `table ip <table>` and everything in it. A table that is not there is fine, and
/// so is a kernel without nf_tables (no table can be there).
pub fn delete_table(table: &str) -> Result<(), NftError> {
    let mut b = Batch::new();
    table_msg(&mut b, NFT_MSG_DELTABLE, 0, table);
    let absent = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::ENOENT | libc::EPROTONOSUPPORT | libc::EOPNOTSUPP | libc::EAFNOSUPPORT)
        )
    };
    match b.send() {
        Err(NftError::Kernel { source, .. } | NftError::Socket { source, .. })
            if absent(&source) =>
        {
            Ok(())
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_aligned_and_nested_lengths_cover_their_children() {
        let mut m = Msg::new(msg_type(NFT_MSG_NEWTABLE), REQ_ACK, 7, NFPROTO_IPV4, 0);
        m.str(NFTA_TABLE_NAME, "husk");
        m.nested(NFTA_CHAIN_HOOK, |m| {
            m.u32(NFTA_HOOK_HOOKNUM, 3);
        });
        let b = m.finish();
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 0x0a00);
        assert_eq!(&b[16..20], &[NFPROTO_IPV4, 0, 0, 0]);
        // "husk\0": 4 + 5 = 9 bytes, padded to 12.
        assert_eq!(u16::from_ne_bytes([b[20], b[21]]), 9);
        assert_eq!(&b[24..29], b"husk\0");
        // The nested hook: header 4 + one u32 attribute of 8.
        assert_eq!(u16::from_ne_bytes([b[32], b[33]]), 12);
        assert_eq!(
            u16::from_ne_bytes([b[34], b[35]]),
            NFTA_CHAIN_HOOK | NLA_F_NESTED
        );
        assert_eq!(&b[40..44], &3u32.to_be_bytes());
        assert_eq!(b.len(), 44);
    }

    /// `ip saddr A` loads 4 bytes at offset 12 of the network header; `meta iif N` loads
    /// key 4 and compares the index in host byte order.
    #[test]
    fn source_address_and_input_interface_matches() {
        let mut m = Msg::new(msg_type(NFT_MSG_NEWRULE), REQ_ACK, 1, NFPROTO_IPV4, 0);
        encode(&mut m, &Expr::SaddrIs(Ipv4Addr::new(169, 254, 231, 1)));
        encode(&mut m, &Expr::IifIs(7));
        let b = m.finish();
        let has = |needle: &[u8]| b.windows(needle.len()).any(|w| w == needle);
        // NFTA_PAYLOAD_OFFSET (3), length 8, value 12 big-endian.
        assert!(has(&[8, 0, 3, 0, 0, 0, 0, 12]));
        assert!(has(&[169, 254, 231, 1]));
        // NFTA_META_KEY (2), length 8, value 4 big-endian; then the index as the host has it.
        assert!(has(&[8, 0, 2, 0, 0, 0, 0, 4]));
        assert!(has(&7u32.to_ne_bytes()));
    }
}
