//! vsock packets as the muxer sees them: a header's worth of fields plus owned data,
//! independent of where they sit in guest memory (the device copies them in and out
//! through virtio-vsock's checked `VsockPacket`).

/// The host's CID.
pub(crate) const HOST_CID: u64 = 2;
/// Stream sockets, the only type supported.
pub(crate) const TYPE_STREAM: u16 = 1;

/// Operations.
pub mod op {
    /// Connection request.
    pub(crate) const REQUEST: u16 = 1;
    /// Connection accepted.
    pub(crate) const RESPONSE: u16 = 2;
    /// Connection reset.
    pub const RST: u16 = 3;
    /// No more data in one or both directions.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub(crate) const RW: u16 = 5;
    /// Credit announcement.
    pub(crate) const CREDIT_UPDATE: u16 = 6;
    /// Credit announcement wanted.
    pub(crate) const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive / send no more.
pub(crate) const SHUTDOWN_BOTH: u32 = 3;

/// One packet, host side.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Pkt {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed.
    pub fwd_cnt: u32,
    /// Payload (RW only).
    pub data: Vec<u8>,
}
