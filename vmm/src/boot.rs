//! Loading a Linux (or synthetic) ELF kernel, its initramfs and command line, and writing
//! the boot parameters of the protocol it is entered with: PVH when the ELF carries the
//! Xen PHYS32_ENTRY note, the Linux 64-bit boot protocol otherwise.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::arch::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::arch::regs::BootProtocol;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Errors while loading what the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("kernel {path}: {source} — give an existing vmlinux with --kernel")]
    KernelOpen {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is not an ELF image.
    #[error("kernel {0}: not an ELF file — give the uncompressed vmlinux, not a bzImage")]
    KernelNotElf(PathBuf),
    /// linux-loader rejected the ELF.
    #[error("kernel {path}: cannot load it: {source}")]
    KernelLoad {
        /// The path given.
        path: PathBuf,
        /// The loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initramfs cannot be read.
    #[error("initramfs {path}: {source} — give an existing cpio archive with --initrd")]
    InitrdOpen {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the end of low RAM.
    #[error("initramfs {path} ({size} bytes) does not fit in guest RAM — give more --memory")]
    InitrdTooBig {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line: {0} — shorten --cmdline (at most {CMDLINE_MAX_SIZE} bytes)")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// Writing the command line or the boot parameters failed.
    #[error("writing boot parameters: {0}")]
    Params(String),
}

/// Where and how the first vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    /// The boot protocol.
    pub protocol: BootProtocol,
    /// The entry address.
    pub entry: u64,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSource {
    /// The vmlinux (ELF) path.
    pub kernel: PathBuf,
    /// The initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The full kernel command line.
    pub cmdline: String,
}

/// Loads the ELF kernel at its physical addresses and picks the boot protocol.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<(KernelEntry, u64), BootError> {
    let open_err = |source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() || magic != *b"\x7fELF" {
        return Err(BootError::KernelNotElf(path.to_owned()));
    }
    let result =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BootError::KernelLoad {
                path: path.to_owned(),
                source,
            }
        })?;
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => KernelEntry {
            protocol: BootProtocol::Pvh,
            entry: addr.raw_value(),
        },
        _ => KernelEntry {
            protocol: BootProtocol::Linux64,
            entry: result.kernel_load.raw_value(),
        },
    };
    Ok((entry, result.kernel_end))
}

/// End of the RAM below the MMIO hole.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

/// Loads the initramfs at the top of low RAM (page aligned); returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let open_err = |source| BootError::InitrdOpen {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let too_big = || BootError::InitrdTooBig {
        path: path.to_owned(),
        size,
    };
    let addr = low_ram_end(mem).checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end {
        return Err(too_big());
    }
    let len = usize::try_from(size).map_err(|_| too_big())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| BootError::InitrdOpen {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
    Ok((addr, size))
}

/// The RAM map handed to the guest: low memory up to the EBDA, then from 1 MiB on.
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for r in mem.iter() {
        let start = r.start_addr().raw_value().max(HIMEM_START);
        let end = r.start_addr().raw_value() + r.len();
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

/// Writes the command line and the protocol's boot parameters.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    entry: KernelEntry,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE)?;
    cl.insert_str(cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Params(e.to_string()))?;
    let cmdline_len = cl.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);
    let map = memory_map(mem);
    let params_err = |e: linux_loader::configurator::Error| BootError::Params(e.to_string());

    match entry.protocol {
        BootProtocol::Pvh => {
            let memmap: Vec<hvm_memmap_table_entry> = map
                .iter()
                .map(|(addr, size)| hvm_memmap_table_entry {
                    addr: *addr,
                    size: *size,
                    type_: E820_RAM,
                    reserved: 0,
                })
                .collect();
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: u32::try_from(memmap.len()).expect("a few entries"),
                ..Default::default()
            };
            let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
            if let Some((addr, size)) = initrd {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
                params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
                let module = hvm_modlist_entry {
                    paddr: addr,
                    size,
                    ..Default::default()
                };
                params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
            }
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(params_err)
        }
        BootProtocol::Linux64 => {
            let mut bp = boot_params::default();
            bp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            bp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            bp.hdr.header = KERNEL_HDR_MAGIC;
            bp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            bp.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).expect("below 4 GiB");
            bp.hdr.cmdline_size = u32::try_from(cmdline_len).expect("bounded by CMDLINE_MAX_SIZE");
            if let Some((addr, size)) = initrd {
                bp.hdr.ramdisk_image = u32::try_from(addr).expect("initrd in low RAM");
                bp.hdr.ramdisk_size = u32::try_from(size).expect("initrd in low RAM");
            }
            for (i, (addr, size)) in map.iter().enumerate() {
                bp.e820_table[i].addr = *addr;
                bp.e820_table[i].size = *size;
                bp.e820_table[i].r#type = E820_RAM;
            }
            bp.e820_entries = u8::try_from(map.len()).expect("a few entries");
            let params = BootParams::new(&bp, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&params, mem).map_err(params_err)
        }
    }
}

/// Loads everything in `src` and writes the boot parameters; returns the entry.
pub fn load(mem: &GuestMemoryMmap, src: &BootSource) -> Result<KernelEntry, BootError> {
    let (entry, kernel_end) = load_kernel(mem, &src.kernel)?;
    let initrd = match &src.initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_end)?),
        None => None,
    };
    write_boot_params(mem, entry, &src.cmdline, initrd)?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    #[test]
    fn missing_kernel_names_the_file_and_the_fix() {
        let e = load_kernel(&mem(16), Path::new("/nonexistent/vmlinux")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("/nonexistent/vmlinux") && s.contains("--kernel"),
            "{s}"
        );
    }

    #[test]
    fn non_elf_kernel_is_refused() {
        let dir = std::env::temp_dir().join(format!("husk-vmm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bzImage");
        std::fs::write(&p, b"MZ\x00\x00 not an elf").unwrap();
        let e = load_kernel(&mem(16), &p).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(e, BootError::KernelNotElf(_)), "{e}");
        assert!(e.to_string().contains("not an ELF"));
    }

    #[test]
    fn memory_map_skips_the_legacy_hole() {
        assert_eq!(
            memory_map(&mem(64)),
            vec![(0, EBDA_START), (HIMEM_START, (64 << 20) - HIMEM_START)]
        );
    }

    #[test]
    fn pvh_start_info_points_at_cmdline_and_memmap() {
        let m = mem(32);
        let entry = KernelEntry {
            protocol: BootProtocol::Pvh,
            entry: 0x100000,
        };
        write_boot_params(&m, entry, "console=ttyS0 quiet", Some((0x1f0_0000, 0x1000))).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.memmap_entries, 2);
        assert_eq!(info.nr_modules, 1);
        let second: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(
                info.memmap_paddr + std::mem::size_of::<hvm_memmap_table_entry>() as u64,
            ))
            .unwrap();
        assert_eq!(second.addr + second.size, 32 << 20);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x1f0_0000, 0x1000));
        let mut cl = [0u8; 20];
        m.read_slice(&mut cl, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cl[..19], b"console=ttyS0 quiet");
        assert_eq!(cl[19], 0);
    }

    #[test]
    fn zero_page_carries_e820_and_cmdline() {
        let m = mem(32);
        let entry = KernelEntry {
            protocol: BootProtocol::Linux64,
            entry: 0x100_0000,
        };
        write_boot_params(&m, entry, "console=ttyS0", None).unwrap();
        let bp: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ bp.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        let ptr = bp.hdr.cmd_line_ptr;
        assert_eq!(u64::from(ptr), CMDLINE_START);
        assert_eq!(bp.e820_entries, 2);
        assert_eq!({ bp.e820_table[1].size }, (32 << 20) - HIMEM_START);
    }

    #[test]
    fn initrd_too_big_says_give_more_memory() {
        let dir = std::env::temp_dir().join(format!("husk-vmm-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("big.cpio");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(20 << 20)
            .unwrap();
        let e = load_initrd(&mem(16), &p, 0x100_0000).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.to_string().contains("--memory"), "{e}");
    }
}
