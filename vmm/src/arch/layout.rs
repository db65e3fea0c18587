//! Guest physical memory layout of an x86-64 husk microVM.
//!
//! Everything the VMM writes into guest memory before the first instruction lives at a
//! fixed address listed here, so the boot code, the MP table and the tests agree.

/// GDT used for both boot protocols.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the guest installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit boot protocol.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages, first GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we hand over (Linux's COMMAND_LINE_SIZE on x86 is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: the MP table lives in its first KiB, where Linux
/// scans for it.
pub const EBDA_START: u64 = 0x9fc00;
/// First address above the legacy 1 MiB area; kernels load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// The hole below 4 GiB for MMIO devices, the IOAPIC and the LAPIC: no RAM there.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of that hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio devices are placed, one 4 KiB window each.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Size of each virtio-mmio window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// The IOAPIC's MMIO address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO address.
pub const APIC_ADDR: u32 = 0xfee0_0000;

/// Legacy IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// First IRQ handed to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC provides.
pub const IOAPIC_PINS: u32 = 24;

/// The smallest guest we accept: room for the boot structures below 1 MiB and a kernel.
pub const MIN_MEMORY_MIB: u64 = 8;
