//! The Intel MultiProcessor table: how a guest without ACPI finds its CPUs, its IOAPIC and
//! how the ISA IRQs are wired. Linux scans the first KiB of the EBDA for it.
//!
//! The table is built as bytes with explicit little-endian fields (MP spec 1.4), which keeps
//! this module free of `unsafe` layout tricks.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IOAPIC_PINS};

/// Most vCPUs an MP table (8-bit APIC ids, one for the IOAPIC) can describe here.
pub const MAX_VCPUS: u8 = 254;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for an MP table.
    #[error("{0} vCPUs do not fit an MP table: give at most {MAX_VCPUS} (--vcpus)")]
    TooManyCpus(u8),
    /// No vCPUs at all.
    #[error("0 vCPUs: give at least 1 (--vcpus)")]
    NoCpus,
    /// Guest memory does not hold the EBDA.
    #[error("writing the MP table at {EBDA_START:#x}: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Builds the floating pointer and the configuration table for `num_cpus` CPUs, as they
/// must appear at guest address `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let table_addr = u32::try_from(base + 16).expect("MP table lives below 4 GiB");

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: APIC, FPU
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..u8::try_from(IOAPIC_PINS).expect("24 pins") {
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = u16::try_from(44 + entries.len()).expect("MP table fits 64 KiB");
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.extend_from_slice(&[4, 0]); // spec 1.4, checksum placeholder
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"husk-vmm    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 16 bytes, spec 1.4
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table for `num_cpus` CPUs into the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_are_zero_and_pointer_is_right() {
        let t = build(4, EBDA_START).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, EBDA_START + 16);
        let len = u16::from_le_bytes(t[20..22].try_into().unwrap()) as usize;
        assert_eq!(&t[16..20], b"PCMP");
        assert_eq!(len, t.len() - 16);
        assert_eq!(sum(&t[16..]), 0);
        // The table must fit the 1 KiB of EBDA Linux scans.
        assert!(t.len() <= 1024);
    }

    #[test]
    fn one_processor_entry_per_cpu_and_only_the_first_is_bsp() {
        let t = build(3, EBDA_START).unwrap();
        let cpus: Vec<&[u8]> = t[16 + 44..].chunks(20).take(3).collect();
        for (i, c) in cpus.iter().enumerate() {
            assert_eq!(c[0], 0);
            assert_eq!(c[1] as usize, i);
            assert_eq!(c[3] & CPU_BOOTPROCESSOR != 0, i == 0);
        }
        let count = u16::from_le_bytes(t[16 + 34..16 + 36].try_into().unwrap());
        assert_eq!(count, 3 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        assert!(matches!(build(0, EBDA_START), Err(MptableError::NoCpus)));
        assert!(matches!(
            build(255, EBDA_START),
            Err(MptableError::TooManyCpus(255))
        ));
    }
}
