//! The bpf(2) calls a device cgroup needs: load a `BPF_PROG_TYPE_CGROUP_DEVICE` program,
//! attach it to a cgroup directory (`BPF_CGROUP_DEVICE`, `BPF_F_ALLOW_MULTI`, optionally
//! `BPF_F_REPLACE`), list what is attached, detach. Only the agent calls these (root in the
//! guest); the container helpers never do.
//!
//! The attribute structs are the prefixes of `union bpf_attr` that these commands read
//! (include/uapi/linux/bpf.h, Linux 6.1); the kernel treats the bytes we do not pass as zero.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::bpf::{encode, Insn};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_PROG_QUERY: libc::c_long = 16;

const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;
const BPF_F_REPLACE: u32 = 1 << 2;

/// Where a failure names the kernel configuration as the likely cause.
const KERNEL_HINT: &str = " — the guest kernel needs CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message carries the verifier's log when the kernel wrote one.
    #[error("BPF_PROG_LOAD ({insns} instructions): {errno}{detail}")]
    Load {
        insns: usize,
        #[source]
        errno: std::io::Error,
        detail: String,
    },
    #[error("BPF_PROG_ATTACH: {errno}{hint}")]
    Attach {
        #[source]
        errno: std::io::Error,
        hint: &'static str,
    },
    #[error("BPF_PROG_DETACH of program {id}: {errno}")]
    Detach {
        id: u32,
        #[source]
        errno: std::io::Error,
    },
    #[error("BPF_PROG_QUERY: {errno}{hint}")]
    Query {
        #[source]
        errno: std::io::Error,
        hint: &'static str,
    },
    #[error("BPF_PROG_GET_FD_BY_ID {id}: {errno}")]
    GetFd {
        id: u32,
        #[source]
        errno: std::io::Error,
    },
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// bpf(cmd, attr, sizeof attr): the result, or errno.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised #[repr(C)] prefix of union bpf_attr of exactly
    // size_of::<T>() bytes; every pointer inside it points at memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<c_void>(),
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn raw(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// A new file descriptor from bpf(2)'s return value.
fn owned(r: libc::c_long) -> OwnedFd {
    let fd = i32::try_from(r).unwrap_or(-1);
    // SAFETY: the commands that return a file descriptor return a new one we now own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Loads a device program; on failure loads it again with the verifier log on, for the message.
pub fn load_device_program(prog: &[Insn]) -> Result<OwnedFd, Error> {
    let code = encode(prog);
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"husk_devices");
    let attr = |log: &mut Vec<u8>| ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(prog.len()).unwrap_or(u32::MAX),
        insns: code.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: u32::from(!log.is_empty()),
        log_size: u32::try_from(log.len()).unwrap_or(0),
        log_buf: if log.is_empty() {
            0
        } else {
            log.as_mut_ptr() as u64
        },
        prog_name: name,
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    let errno = match bpf(BPF_PROG_LOAD, &mut attr(&mut Vec::new())) {
        Ok(fd) => return Ok(owned(fd)),
        Err(e) => e,
    };
    let mut log = vec![0u8; 64 << 10];
    let _ = bpf(BPF_PROG_LOAD, &mut attr(&mut log));
    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    // The verifier's last lines say what it rejected.
    let tail: Vec<&str> = text
        .lines()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let detail = if !tail.is_empty() {
        format!(" (verifier: {})", tail.join(" / "))
    } else if matches!(errno.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
        KERNEL_HINT.to_string()
    } else {
        String::new()
    };
    Err(Error::Load {
        insns: prog.len(),
        errno,
        detail,
    })
}

/// Attaches `prog` to the cgroup directory `cgroup` beside any other device programs there; with
/// `replace`, atomically in place of that one.
pub fn attach(
    cgroup: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    replace: Option<BorrowedFd<'_>>,
) -> Result<(), Error> {
    let mut a = AttachAttr {
        target_fd: raw(cgroup),
        attach_bpf_fd: raw(prog),
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI | if replace.is_some() { BPF_F_REPLACE } else { 0 },
        replace_bpf_fd: replace.map(raw).unwrap_or(0),
    };
    bpf(BPF_PROG_ATTACH, &mut a).map(drop).map_err(|errno| {
        let hint = if errno.raw_os_error() == Some(libc::EINVAL) {
            KERNEL_HINT
        } else {
            ""
        };
        Error::Attach { errno, hint }
    })
}

pub fn detach(cgroup: BorrowedFd<'_>, prog: BorrowedFd<'_>, id: u32) -> Result<(), Error> {
    let mut a = AttachAttr {
        target_fd: raw(cgroup),
        attach_bpf_fd: raw(prog),
        attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    bpf(BPF_PROG_DETACH, &mut a)
        .map(drop)
        .map_err(|errno| Error::Detach { id, errno })
}

/// The ids of the device programs attached to `cgroup` itself (not inherited ones).
pub fn attached(cgroup: BorrowedFd<'_>) -> Result<Vec<u32>, Error> {
    // A cgroup holds at most 64 programs per attach type (BPF_CGROUP_MAX_PROGS).
    let mut ids = vec![0u32; 64];
    let mut q = QueryAttr {
        target_fd: raw(cgroup),
        attach_type: BPF_CGROUP_DEVICE,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: u32::try_from(ids.len()).unwrap_or(0),
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut q).map_err(|errno| {
        let hint = if errno.raw_os_error() == Some(libc::EINVAL) {
            KERNEL_HINT
        } else {
            ""
        };
        Error::Query { errno, hint }
    })?;
    ids.truncate(usize::try_from(q.prog_cnt).unwrap_or(0));
    Ok(ids)
}

pub fn prog_by_id(id: u32) -> Result<OwnedFd, Error> {
    let mut a = GetFdByIdAttr {
        prog_id: id,
        ..Default::default()
    };
    bpf(BPF_PROG_GET_FD_BY_ID, &mut a)
        .map(owned)
        .map_err(|errno| Error::GetFd { id, errno })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel() {
        // Offsets of union bpf_attr's members in Linux 6.1.
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 72);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::size_of::<AttachAttr>(), 20);
        assert_eq!(std::mem::offset_of!(QueryAttr, prog_ids), 16);
        assert_eq!(std::mem::offset_of!(QueryAttr, prog_cnt), 24);
        assert_eq!(std::mem::size_of::<GetFdByIdAttr>(), 12);
    }
}
