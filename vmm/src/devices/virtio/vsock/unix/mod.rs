//! The host side of husk's hybrid vsock: a unix socket the host connects to (then
//! `CONNECT <port>\n` → `OK <host_port>\n`), and `<path>_<port>` sockets the guest's
//! connections to host port `<port>` are forwarded to.

pub mod muxer;

pub use muxer::{DirectConnector, HostConnector, Muxer, MuxerError};
