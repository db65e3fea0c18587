//! Creating a tap device (`/dev/net/tun`, `TUNSETIFF`) in the calling thread's network
//! namespace.
//!
//! The tap is not persistent: it exists while a file opened on it is open (the shim's and
//! the VM process's copies), so a crashed shim and VM leave no tap behind. The shim still
//! deletes it by name on teardown.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::NetworkError;

/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Packets carry a `virtio_net_hdr`, so checksum and segmentation offloads pass through
/// between the guest and the host stack; QEMU sees the flag on the fd and uses it.
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Longest interface name (IFNAMSIZ without the NUL).
pub(crate) const MAX_NAME: usize = 15;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags (the rest of the union
/// pads it to 40 bytes on 64-bit Linux).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens a new tap device called `name` (close-on-exec) in the calling thread's netns.
pub fn create(name: &str) -> Result<OwnedFd, NetworkError> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains(['/', ' ', '\0']) {
        return Err(NetworkError::Invalid(format!(
            "tap name {name:?}: must be 1..={MAX_NAME} bytes without '/', ' ' or NUL"
        )));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|source| NetworkError::Io {
            what: "opening /dev/net/tun (the host needs the tun driver; run the shim as root)"
                .into(),
            source,
        })?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a valid, initialised,
    // correctly sized (40 bytes) and aligned instance that lives across the call, and `file`
    // is an open /dev/net/tun descriptor.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc != 0 {
        return Err(NetworkError::Io {
            what: format!("creating tap {name} (TUNSETIFF)"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_is_the_kernels_size_and_bad_names_are_refused() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert!(create("").is_err());
        assert!(create("a-name-longer-than-15")
            .unwrap_err()
            .to_string()
            .contains("1..=15"));
        assert!(create("a/b").is_err());
    }
}
