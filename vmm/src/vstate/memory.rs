//! Guest RAM: one memfd, mapped shared, split around the MMIO hole below 4 GiB.
//!
//! The memfd is what vhost-user backends (virtiofsd) map, so guest RAM must never be
//! anonymous private memory. This module owns only the layout of RAM; it never interprets
//! what the guest writes there.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{MIN_MEMORY_MIB, MMIO_GAP_END, MMIO_GAP_START};

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size cannot hold a guest.
    #[error("memory size {0} MiB is too small: give at least {MIN_MEMORY_MIB} MiB (--memory)")]
    TooSmall(u64),
    /// The requested size does not fit this host's address space.
    #[error("memory size {0} MiB is too large for this host: give less (--memory)")]
    TooLarge(u64),
    /// memfd_create or ftruncate failed.
    #[error("guest RAM memfd of {size_mib} MiB: {source}; is the host out of memory?")]
    Memfd {
        /// Requested size.
        size_mib: u64,
        /// Underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memfd failed.
    #[error("mapping guest RAM: {0}")]
    Mmap(#[from] vm_memory::mmap::FromRangesError),
}

/// The RAM ranges (guest address, length) for `size` bytes of RAM: everything below the
/// MMIO hole first, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Guest RAM and the memfd behind it.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapped memory.
    pub mem: GuestMemoryMmap,
    /// The memfd backing it (kept for vhost-user backends).
    pub file: File,
    /// RAM size in bytes.
    pub size: u64,
}

/// Creates `size_mib` MiB of guest RAM backed by a shared memfd.
pub fn create_guest_ram(size_mib: u64) -> Result<GuestRam, MemoryError> {
    if size_mib < MIN_MEMORY_MIB {
        return Err(MemoryError::TooSmall(size_mib));
    }
    let size = size_mib
        .checked_mul(1 << 20)
        .filter(|s| usize::try_from(*s).is_ok() && *s < (1u64 << 46))
        .ok_or(MemoryError::TooLarge(size_mib))?;
    let memfd_err = |source| MemoryError::Memfd { size_mib, source };

    // SAFETY: the name is a valid NUL-terminated string and the flags are valid.
    let fd = unsafe { libc::memfd_create(c"husk-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(memfd_err(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(memfd_err)?;

    let mut ranges = Vec::new();
    for (addr, len) in ram_ranges(size) {
        // The file offset of a range is its offset in RAM, so the memfd holds RAM contiguously.
        let offset = if addr.0 >= MMIO_GAP_END {
            addr.0 - MMIO_GAP_END + MMIO_GAP_START
        } else {
            addr.0
        };
        let clone = file.try_clone().map_err(memfd_err)?;
        let len = usize::try_from(len).map_err(|_| MemoryError::TooLarge(size_mib))?;
        ranges.push((addr, len, Some(FileOffset::new(clone, offset))));
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(ranges)?;
    Ok(GuestRam { mem, file, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn ram_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
    }

    #[test]
    fn too_small_is_refused_with_the_fix() {
        let e = create_guest_ram(2).unwrap_err();
        assert!(e.to_string().contains("at least 8 MiB"), "{e}");
    }

    #[test]
    fn ram_is_a_shared_memfd() {
        let ram = create_guest_ram(16).unwrap();
        assert_eq!(ram.mem.num_regions(), 1);
        assert_eq!(ram.mem.iter().next().unwrap().len(), 16 << 20);
        ram.mem
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // The write is visible through the memfd, which only holds for a shared mapping.
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }
}
