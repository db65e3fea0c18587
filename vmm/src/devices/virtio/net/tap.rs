//! A tap device opened by name (created if missing, attached if it exists), without
//! packet information headers, non-blocking.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUN_PATH: &str = "/dev/net/tun";
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFNAMSIZ: usize = 16;

/// Errors while opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("tap name {0:?}: must be 1 to 15 bytes without NUL — give another --net-tap")]
    BadName(String),
    /// /dev/net/tun is missing.
    #[error("{TUN_PATH}: not found — load the tun module or run where it exists")]
    NoTun,
    /// Not allowed to open or create the tap.
    #[error("tap {0}: permission denied — run as root (CAP_NET_ADMIN)")]
    Denied(String),
    /// Another process has the tap.
    #[error("tap {0}: in use by another process — give another --net-tap")]
    Busy(String),
    /// Anything else.
    #[error("tap {name}: {source}")]
    Io {
        /// The tap name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A MAC address that does not parse.
    #[error("MAC address {0:?}: write it as six hex bytes, e.g. 02:00:00:00:00:01 (--net-mac)")]
    BadMac(String),
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], TapError> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || TapError::BadMac(s.to_owned());
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// Something frames can be read from and written to (the tap, or a test double).
pub trait FrameIo: Send {
    /// Reads one frame; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// The fd to poll for readability, if any.
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }
}

/// An open tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or creates) the tap `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
            return Err(TapError::BadName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => TapError::NoTun,
                io::ErrorKind::PermissionDenied => TapError::Denied(name.to_owned()),
                _ => TapError::Io {
                    name: name.to_owned(),
                    source: e,
                },
            })?;
        // struct ifreq: the name, then the flags as the first member of the union.
        let mut ifreq = [0u8; 40];
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        ifreq[IFNAMSIZ..IFNAMSIZ + 2].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifreq` is big enough
        // for (40 bytes on 64-bit Linux); the fd is the tun device we just opened.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, ifreq.as_mut_ptr()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Denied(name.to_owned()),
                Some(libc::EBUSY) => TapError::Busy(name.to_owned()),
                _ => TapError::Io {
                    name: name.to_owned(),
                    source: e,
                },
            });
        }
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl FrameIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        // A tap takes a whole frame per write or refuses it.
        self.file.write(frame).map(|_| ())
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_bad_ones_say_how_to_write_them() {
        assert_eq!(
            parse_mac("02:00:0a:ff:00:01").unwrap(),
            [2, 0, 10, 255, 0, 1]
        );
        for bad in [
            "02:00:00:00:00",
            "02:00:00:00:00:001",
            "zz:00:00:00:00:00",
            "",
        ] {
            let e = parse_mac(bad).unwrap_err();
            assert!(e.to_string().contains("six hex bytes"), "{e}");
        }
    }

    #[test]
    fn bad_tap_names_are_refused_before_any_syscall() {
        assert!(matches!(Tap::open(""), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::open("a-very-long-tap-name"),
            Err(TapError::BadName(_))
        ));
    }
}
