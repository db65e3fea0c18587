//! Guest RAM: one memfd, mapped shared, split around the MMIO hole below 4 GiB.
//!
//! The memfd is what vhost-user backends (virtiofsd) map, so guest RAM must never be
//! anonymous private memory. This module owns only the layout of RAM; it never interprets
//! what the guest writes there.
//!
//! Page size: the mapping is `madvise(MADV_HUGEPAGE)`d, so where the host lets shared memory
//! have transparent huge pages (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` =
//! `advise`, `within_size` or `always`) guest RAM is backed by 2 MiB pages and KVM maps it
//! with 2 MiB entries: each first touch of guest memory is then one fault (an exit to the
//! host kernel) per 2 MiB instead of per 4 KiB. Measured in the nested tier (BENCHMARKS.md,
//! "Linux boot in L1"): our guest kernel reached its agent in ~2.0 s instead of ~3.1 s
//! (medians of 4 boots, one L1 run each). With `never` (Debian's default) it stays 4 KiB:
//! the advice costs nothing there.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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

/// Guest RAM, mapped from a shared memfd (each region holds its own handle of it, which the
/// vhost-user backends are given).
#[derive(Debug)]
pub struct GuestRam {
    /// The mapped memory.
    pub mem: GuestMemoryMmap,
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
    for region in mem.iter() {
        advise_huge_pages(region.as_ptr(), region.len());
    }
    Ok(GuestRam { mem })
}

/// Asks for transparent huge pages on a guest RAM mapping. Best effort: a kernel without
/// THP (EINVAL) keeps 4 KiB pages, which only costs speed.
fn advise_huge_pages(addr: *mut u8, len: u64) {
    let Ok(len) = usize::try_from(len) else {
        return;
    };
    // SAFETY: the range is one whole mapping of guest RAM that `mem` owns; MADV_HUGEPAGE
    // changes only how the kernel backs it, never its contents or protection.
    let _ = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
}

/// The page size shared memory gets on this host for an `madvise(MADV_HUGEPAGE)`d mapping,
/// from the selected word of `shmem_enabled` (`always within_size [advise] never deny force`):
/// what the tests expect of the mapping.
#[cfg(test)]
fn shmem_huge_pages(shmem_enabled: &str) -> bool {
    let selected = shmem_enabled
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'));
    matches!(
        selected,
        Some("always" | "within_size" | "advise" | "force")
    )
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
    fn reads_the_selected_shmem_thp_mode() {
        assert!(shmem_huge_pages(
            "always within_size [advise] never deny force\n"
        ));
        assert!(shmem_huge_pages(
            "[always] within_size advise never deny force"
        ));
        assert!(!shmem_huge_pages(
            "always within_size advise [never] deny force"
        ));
        assert!(!shmem_huge_pages(
            "always within_size advise never [deny] force"
        ));
        assert!(!shmem_huge_pages(""));
    }

    #[test]
    fn ram_is_advised_huge_where_the_host_allows_it() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .map(|s| shmem_huge_pages(&s))
            .unwrap_or(false);
        let ram = create_guest_ram(16).unwrap();
        let region = ram.mem.iter().next().unwrap();
        let start = region.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        // The mapping's VmFlags carry `hg` (MADV_HUGEPAGE) however the host is configured.
        let mut in_ram = false;
        let mut flags = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, _)) = range.split_once('-') {
                    if let Ok(lo) = usize::from_str_radix(lo, 16) {
                        in_ram = lo == start;
                        continue;
                    }
                }
            }
            if in_ram {
                if let Some(f) = line.strip_prefix("VmFlags:") {
                    flags = Some(f.to_string());
                }
            }
        }
        let flags = flags.expect("guest RAM in smaps");
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "{flags} (THP for shmem: {thp})"
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
        let region = ram.mem.iter().next().unwrap();
        let file = region.file_offset().expect("a file-backed region").file();
        file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }
}
