//! Checks on the guest kernel image.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Xen's ELF note type for the 32-bit PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`), which is
/// how a `vmlinux` says it can be booted through PVH.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Cheap check, done at every VM start: the file exists and is an ELF image.
pub(crate) fn check_elf(path: &Path) -> Result<()> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| {
        Error::Config(format!(
            "kernel {}: {e} — build it with `cargo xtask kernel` or set `kernel` in /etc/husk/config.toml",
            path.display()
        ))
    })?;
    if f.read_exact(&mut magic).is_err() || &magic != b"\x7fELF" {
        return Err(Error::Config(format!(
            "kernel {}: not an ELF file — give the uncompressed vmlinux, not a bzImage",
            path.display()
        )));
    }
    Ok(())
}

/// The PVH entry address of a `vmlinux`, if it has one. Reads the whole file: for `doctor`
/// and builds, not for the hot path.
pub fn pvh_entry(path: &Path) -> Result<Option<u64>> {
    check_elf(path)?;
    let bytes = std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))?;
    let elf = goblin::elf::Elf::parse(&bytes)
        .map_err(|e| Error::Config(format!("kernel {}: unreadable ELF ({e})", path.display())))?;
    let Some(notes) = elf.iter_note_headers(&bytes) else {
        return Ok(None);
    };
    for note in notes.flatten() {
        if note.n_type == XEN_ELFNOTE_PHYS32_ENTRY && note.name == "Xen" {
            let entry = match note.desc.len() {
                4 => u64::from(u32::from_le_bytes(note.desc.try_into().unwrap_or([0; 4]))),
                8 => u64::from_le_bytes(note.desc.try_into().unwrap_or([0; 8])),
                _ => continue,
            };
            return Ok(Some(entry));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_elf_and_missing_kernels_are_named() {
        let d = tempfile::tempdir().unwrap();
        let bz = d.path().join("bzImage");
        std::fs::write(&bz, b"MZ\x00\x00 not elf").unwrap();
        let e = check_elf(&bz).unwrap_err().to_string();
        assert!(
            e.contains("not an ELF file") && e.contains("bzImage"),
            "{e}"
        );
        let e = check_elf(&d.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("cargo xtask kernel"), "{e}");
    }

    #[test]
    fn host_binary_has_no_pvh_note() {
        // Any ELF without the Xen note: our own test binary.
        let me = std::env::current_exe().unwrap();
        assert_eq!(pvh_entry(&me).unwrap(), None);
    }
}
