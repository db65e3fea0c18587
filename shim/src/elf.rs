//! Whether a program can run in the guest, which has no dynamic loader: a 64-bit x86-64 ELF
//! without a `PT_INTERP` header (static or static-pie). A leaf: the configuration checks the
//! debug shell with it, and the debug console shares that shell.

use std::io::Read;
use std::path::Path;

/// ELF `e_machine` of x86-64, the guest's architecture.
const EM_X86_64: u16 = 62;
/// Program header type naming the dynamic loader.
const PT_INTERP: u32 = 3;

/// Why `path` cannot run in the guest without a dynamic loader, if it cannot: it must be a
/// 64-bit little-endian x86-64 ELF without a `PT_INTERP` program header (static or
/// static-pie). Reads the ELF and program headers only.
pub(crate) fn check_static(path: &Path) -> Result<(), String> {
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut h = [0u8; 64];
    if f.read_exact(&mut h).is_err() || &h[..4] != b"\x7fELF" {
        return Err(
            "not an ELF executable (a script needs an interpreter the guest does not have)".into(),
        );
    }
    if h[4] != 2 || h[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(v)
    };
    let machine = u16_at(&h, 18);
    if machine != EM_X86_64 {
        return Err(format!("built for ELF machine {machine}, not x86-64"));
    }
    let phoff = u64_at(&h, 32);
    let phentsize = usize::from(u16_at(&h, 54));
    let phnum = usize::from(u16_at(&h, 56));
    if phnum == 0 {
        return Ok(());
    }
    if phentsize < 56 {
        return Err(format!("malformed ELF (program header size {phentsize})"));
    }
    let mut table = vec![0u8; phentsize * phnum];
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(phoff))
        .and_then(|_| f.read_exact(&mut table))
        .map_err(|e| format!("malformed ELF (program headers: {e})"))?;
    for ph in table.chunks_exact(phentsize) {
        if u32_at(ph, 0) == PT_INTERP {
            let (offset, size) = (u64_at(ph, 8), u64_at(ph, 32).min(256));
            let mut interp = vec![0u8; usize::try_from(size).unwrap_or(0)];
            let _ = f
                .seek(std::io::SeekFrom::Start(offset))
                .and_then(|_| f.read_exact(&mut interp));
            let interp = String::from_utf8_lossy(&interp)
                .trim_end_matches('\0')
                .to_string();
            return Err(format!("dynamically linked (it needs the loader {interp})"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 x86-64 header with `phdrs` program header types.
    fn elf(machine: u16, phdrs: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&u16::try_from(phdrs.len()).unwrap().to_le_bytes());
        let interp_at = 64 + 56 * phdrs.len();
        for t in phdrs {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            ph[8..16].copy_from_slice(&(interp_at as u64).to_le_bytes());
            ph[32..40].copy_from_slice(&28u64.to_le_bytes());
            b.extend_from_slice(&ph);
        }
        b.extend_from_slice(b"/lib64/ld-linux-x86-64.so.2\0");
        b
    }

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        let d = tempfile::tempdir().unwrap();
        let check = |bytes: &[u8]| {
            let p = d.path().join("x");
            std::fs::write(&p, bytes).unwrap();
            check_static(&p)
        };
        // PT_LOAD (1) and PT_GNU_STACK: static.
        check(&elf(EM_X86_64, &[1, 0x6474_e551])).unwrap();
        let e = check(&elf(EM_X86_64, &[6, PT_INTERP, 1])).unwrap_err();
        assert_eq!(
            e,
            "dynamically linked (it needs the loader /lib64/ld-linux-x86-64.so.2)"
        );
        let e = check(&elf(183, &[1])).unwrap_err();
        assert!(e.contains("machine 183"), "{e}");
        let e = check(b"#!/bin/sh\necho hi\n").unwrap_err();
        assert!(e.contains("not an ELF"), "{e}");
        // A real dynamically linked program: this test.
        let me = std::env::current_exe().unwrap();
        assert!(check_static(&me)
            .unwrap_err()
            .starts_with("dynamically linked"));
    }
}
