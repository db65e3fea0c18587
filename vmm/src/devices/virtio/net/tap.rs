//! A tap device opened by name (created if missing, attached if it exists), or handed over
//! open (`fd:N`, inherited from the caller, as the shim does: the tap lives in the pod's
//! network namespace, which husk-vmm never enters), without packet information headers,
//! non-blocking. A handed-over tap may carry a virtio-net header (`IFF_VNET_HDR`, as the
//! shim opens them for QEMU): it is stripped on read and a zero one (no offloads) is
//! prepended on write, so the device sees plain frames either way.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUN_PATH: &str = "/dev/net/tun";
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFNAMSIZ: usize = 16;
/// `TUNGETIFF` = `_IOR('T', 210, unsigned int)`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `TUNGETVNETHDRSZ` = `_IOR('T', 215, int)`.
const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;
const IFF_VNET_HDR: u16 = 0x4000;
/// The largest virtio-net header a tap may be set to prepend.
const MAX_VNET_HDR: usize = 64;

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
    /// An `fd:N` that is not an open tap this process may use.
    #[error("--net-tap fd:{fd}: {why} — hand husk-vmm an open tap (IFF_TAP | IFF_NO_PI), inherited under that number")]
    NotATap {
        /// The descriptor number.
        fd: RawFd,
        /// What is wrong with it.
        why: String,
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
    /// The size of the virtio-net header the tap prepends, 0 without `IFF_VNET_HDR`.
    vnet_hdr: usize,
    /// Frame + header, for taps with a header (allocated once; no readv/writev, which the
    /// device threads' seccomp filter does not allow).
    scratch: Vec<u8>,
}

impl Tap {
    /// `name`, or `fd:N` for a tap handed over open.
    pub(crate) fn open_spec(spec: &str) -> Result<Self, TapError> {
        match spec.strip_prefix("fd:") {
            Some(n) => {
                let fd: RawFd = n.parse().map_err(|_| TapError::NotATap {
                    fd: -1,
                    why: format!("{n:?} is not a descriptor number"),
                })?;
                Self::from_fd(fd)
            }
            None => Self::open(spec),
        }
    }

    /// Takes the open tap `fd` (inherited from the caller) for this process: checks with
    /// `TUNGETIFF` that it is a tap without packet information, learns its name and its
    /// virtio-net header size, makes it non-blocking and close-on-exec.
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        let not_a_tap = |why: String| TapError::NotATap { fd, why };
        if fd < 3 {
            return Err(not_a_tap(
                "not a descriptor a tap can be inherited under".into(),
            ));
        }
        // SAFETY: F_GETFD only reads the descriptor's flags; a closed number gives EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(not_a_tap(format!("{}", io::Error::last_os_error())));
        }
        let mut ifreq = [0u8; 40];
        // SAFETY: TUNGETIFF writes a struct ifreq (40 bytes on 64-bit Linux) into `ifreq`;
        // on a descriptor that is not a tun file it fails with EBADFD/ENOTTY.
        if unsafe { libc::ioctl(fd, TUNGETIFF as _, ifreq.as_mut_ptr()) } < 0 {
            return Err(not_a_tap(format!(
                "not a tun/tap file ({})",
                io::Error::last_os_error()
            )));
        }
        let flags = u16::from_ne_bytes([ifreq[IFNAMSIZ], ifreq[IFNAMSIZ + 1]]);
        if flags & IFF_TAP == 0 || flags & IFF_NO_PI == 0 {
            return Err(not_a_tap(format!(
                "flags {flags:#x}: a tap without packet information (IFF_TAP | IFF_NO_PI) is needed"
            )));
        }
        let name_len = ifreq[..IFNAMSIZ]
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&ifreq[..name_len]).into_owned();
        let vnet_hdr = if flags & IFF_VNET_HDR != 0 {
            let mut size: libc::c_int = 0;
            // SAFETY: TUNGETVNETHDRSZ writes one int into `size`.
            if unsafe { libc::ioctl(fd, TUNGETVNETHDRSZ as _, &mut size as *mut libc::c_int) } < 0 {
                return Err(not_a_tap(format!(
                    "reading its header size: {}",
                    io::Error::last_os_error()
                )));
            }
            usize::try_from(size)
                .ok()
                .filter(|s| (10..=MAX_VNET_HDR).contains(s))
                .ok_or_else(|| not_a_tap(format!("a virtio-net header of {size} bytes")))?
        } else {
            0
        };
        // SAFETY: F_GETFL/F_SETFL/F_SETFD change only this descriptor's flags.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(not_a_tap(format!("{}", io::Error::last_os_error())));
            }
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        // SAFETY: the caller handed this descriptor to husk-vmm for the tap; from here the
        // File owns it (nothing else in this process uses the number).
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self {
            file,
            name,
            vnet_hdr,
            scratch: Vec::new(),
        })
    }

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
            vnet_hdr: 0,
            scratch: Vec::new(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl FrameIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.vnet_hdr == 0 {
            return self.file.read(buf);
        }
        self.scratch.resize(buf.len() + self.vnet_hdr, 0);
        let n = self.file.read(&mut self.scratch)?;
        // A read shorter than the header carries no frame.
        let frame = n.saturating_sub(self.vnet_hdr);
        buf[..frame].copy_from_slice(&self.scratch[self.vnet_hdr..self.vnet_hdr + frame]);
        Ok(frame)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        // A tap takes a whole frame per write or refuses it.
        if self.vnet_hdr == 0 {
            return self.file.write(frame).map(|_| ());
        }
        // A zero header: no checksum to complete, no segmentation (no offload is set).
        self.scratch.clear();
        self.scratch.resize(self.vnet_hdr, 0);
        self.scratch.extend_from_slice(frame);
        self.file.write(&self.scratch).map(|_| ())
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
    fn a_handed_over_fd_must_be_a_tap() {
        for spec in ["fd:x", "fd:1", "fd:999999"] {
            let e = Tap::open_spec(spec).unwrap_err().to_string();
            assert!(e.contains("--net-tap fd:"), "{spec}: {e}");
        }
        let f = File::open("/dev/null").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
        let e = Tap::from_fd(fd).unwrap_err().to_string();
        assert!(e.contains("not a tun/tap file"), "{e}");
        // SAFETY: `fd` was ours (into_raw_fd above) and from_fd refused it.
        unsafe { libc::close(fd) };
    }

    /// A tap with a virtio-net header: frames go out with a zero header in front and come
    /// back without it (a tap in a network namespace of the test's own).
    #[test]
    fn vnet_header_taps_carry_plain_frames() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test creates a tap: run it as root (cargo xtask test)");
        }
        // A thread in a new network namespace of its own: the tap lives and dies there.
        std::thread::spawn(|| {
            // SAFETY: unshare of this thread's network namespace only.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(TUN_PATH)
                .unwrap();
            let mut ifreq = [0u8; 40];
            ifreq[..3].copy_from_slice(b"hk0");
            ifreq[IFNAMSIZ..IFNAMSIZ + 2]
                .copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
            // SAFETY: TUNSETIFF on the tun file with a 40-byte ifreq.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, ifreq.as_mut_ptr()) };
            assert_eq!(rc, 0);
            let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
            let mut tap = Tap::from_fd(fd).unwrap();
            assert_eq!((tap.name(), tap.vnet_hdr), ("hk0", 10));
            // Down, the tap drops what is written and has nothing to read.
            let mut buf = [0u8; 64];
            assert_eq!(
                tap.read_frame(&mut buf).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
            let e = tap.write_frame(&[0xff; 60]);
            assert!(
                e.is_ok() || e.as_ref().unwrap_err().raw_os_error() == Some(libc::EIO),
                "{e:?}"
            );
        })
        .join()
        .unwrap();
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
