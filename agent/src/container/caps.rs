//! Linux capabilities by OCI name, and applying a process's capability sets.

use std::collections::HashSet;

use oci_spec::runtime::{Capability, LinuxCapabilities};

/// Why a process's capabilities could not be set (in the container helper, before its exec).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PR_CAPBSET_DROP failed: the helper lacks CAP_SETPCAP, or the kernel does not know `cap`.
    #[error("dropping capability {cap} from the bounding set: {source} — the helper must still hold CAP_SETPCAP (drop it only through process.capabilities)")]
    DropBounding {
        cap: u32,
        #[source]
        source: std::io::Error,
    },
    /// capset(2) refused the sets: one names a capability outside the bounding set.
    #[error("setting the effective/permitted/inheritable capabilities: {source} — each must be in process.capabilities.bounding")]
    Set {
        #[source]
        source: std::io::Error,
    },
    /// PR_CAP_AMBIENT_RAISE refused one: it must be permitted and inheritable too.
    #[error("raising ambient capability {cap}: {source} — an ambient capability must also be in the permitted and inheritable sets")]
    Ambient {
        cap: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Capability names in kernel order (number = index), as in `<linux/capability.h>` (6.1).
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The kernel number of a capability, `None` if this kernel generation does not know it.
pub fn number(cap: &Capability) -> Option<u32> {
    let name = serde_json::to_value(cap).ok()?;
    let name = name.as_str()?;
    NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| u32::try_from(i).ok())
}

/// A capability set as the kernel's 64-bit mask.
pub fn mask(set: Option<&HashSet<Capability>>) -> u64 {
    set.into_iter()
        .flatten()
        .filter_map(number)
        .fold(0, |m, n| m | (1u64 << n))
}

/// The highest capability number the running kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops every capability outside `bounding` from the bounding set (needs CAP_SETPCAP, so
/// before the user switch).
pub(crate) fn drop_bounding(caps: Option<&LinuxCapabilities>) -> Result<(), Error> {
    let keep = mask(caps.and_then(|c| c.bounding().as_ref()));
    for n in 0..=last_cap().min(63) {
        if keep & (1 << n) == 0 {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(n), 0, 0, 0) } != 0 {
                return Err(Error::DropBounding {
                    cap: n,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Sets the effective, permitted and inheritable sets, then raises the ambient ones.
pub(crate) fn apply(caps: Option<&LinuxCapabilities>) -> Result<(), Error> {
    let get = |f: fn(&LinuxCapabilities) -> &Option<HashSet<Capability>>| {
        mask(caps.and_then(|c| f(c).as_ref()))
    };
    let (e, p, i) = (
        get(LinuxCapabilities::effective),
        get(LinuxCapabilities::permitted),
        get(LinuxCapabilities::inheritable),
    );
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let lo = |m: u64| (m & 0xffff_ffff) as u32;
    let hi = |m: u64| (m >> 32) as u32;
    let mut data = [
        CapData {
            effective: lo(e),
            permitted: lo(p),
            inheritable: lo(i),
        },
        CapData {
            effective: hi(e),
            permitted: hi(p),
            inheritable: hi(i),
        },
    ];
    // SAFETY: capset reads a v3 header and two data structs, which we own for the call.
    if unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    } != 0
    {
        return Err(Error::Set {
            source: std::io::Error::last_os_error(),
        });
    }
    let ambient = get(LinuxCapabilities::ambient);
    for n in 0..64u32 {
        if ambient & (1u64 << n) != 0 {
            // SAFETY: prctl with integer arguments only.
            let r = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    libc::c_ulong::from(n),
                    0,
                    0,
                )
            };
            if r != 0 {
                return Err(Error::Ambient {
                    cap: n,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_kernel_numbers() {
        assert_eq!(number(&Capability::Chown), Some(0));
        assert_eq!(number(&Capability::NetBindService), Some(10));
        assert_eq!(number(&Capability::SysAdmin), Some(21));
        assert_eq!(number(&Capability::CheckpointRestore), Some(40));
        let set: HashSet<Capability> = [Capability::Kill, Capability::Bpf].into_iter().collect();
        assert_eq!(mask(Some(&set)), (1 << 5) | (1 << 39));
        assert_eq!(mask(None), 0);
    }
}
