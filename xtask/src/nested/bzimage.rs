//! The ELF `vmlinux` inside a distribution's `bzImage`, like the kernel's
//! `scripts/extract-vmlinux`, but from the boot header instead of a byte-pattern scan.
//!
//! Why: QEMU boots an ELF `vmlinux` with a PVH note directly (L1 reaches /init in ~3 s), while
//! the bzImage's own decompressor under TCG takes 7–9 s (FIELD-NOTES). The x86 boot protocol
//! (Documentation/x86/boot.rst, version ≥ 2.08) says where the compressed payload is:
//! `payload_offset` (0x248) and `payload_length` (0x24c), counted from the start of the
//! protected-mode code, which follows the `setup_sects` (0x1f1) 512-byte setup sectors and
//! the boot sector. The payload is the compressor's output, and for every format but gzip
//! the build appends the uncompressed size as 4 little-endian bytes (`size_append`).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// How the payload is compressed (the formats Linux 6.1 can build, by their magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    Lzma,
    Bzip2,
    Lzo,
    Lz4,
}

impl Compression {
    fn from_magic(b: &[u8]) -> Option<Self> {
        const MAGICS: &[(&[u8], Compression)] = &[
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (b"BZh", Compression::Bzip2),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzo),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
        ];
        MAGICS
            .iter()
            .find(|(m, _)| b.starts_with(m))
            .map(|(_, c)| *c)
    }

    /// The decompressor, reading stdin and writing stdout, and the Debian package it is in.
    fn tool(self) -> (&'static str, &'static [&'static str], &'static str) {
        match self {
            Compression::Gzip => ("gzip", &["-dc"], "gzip"),
            // --single-stream: stop at the end of the first stream (a trailing size is no error).
            Compression::Xz => ("xz", &["-dc", "--single-stream"], "xz-utils"),
            Compression::Lzma => ("xz", &["-dc", "--format=lzma"], "xz-utils"),
            Compression::Zstd => ("zstd", &["-dcq"], "zstd"),
            Compression::Bzip2 => ("bzip2", &["-dc"], "bzip2"),
            Compression::Lzo => ("lzop", &["-dc"], "lzop"),
            Compression::Lz4 => ("lz4", &["-dc"], "lz4"),
        }
    }

    /// Whether the build appended the uncompressed size after the compressed stream.
    fn size_appended(self) -> bool {
        self != Compression::Gzip
    }
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The compressed payload of a bzImage and how it is compressed.
pub fn payload(bz: &[u8]) -> Result<(Compression, &[u8])> {
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a bzImage: no \"HdrS\" boot header at 0x202");
    }
    let version = le16(bz, 0x206).unwrap_or(0);
    if version < 0x208 {
        bail!("boot protocol {version:#x} has no payload fields (needs 2.08 or later)");
    }
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let offset = le32(bz, 0x248).ok_or_else(|| anyhow!("truncated boot header"))?;
    let length = le32(bz, 0x24c).ok_or_else(|| anyhow!("truncated boot header"))?;
    let start = pm_start + usize::try_from(offset)?;
    let end = start + usize::try_from(length)?;
    let data = bz.get(start..end).ok_or_else(|| {
        anyhow!(
            "payload {start:#x}..{end:#x} lies beyond the file's end ({:#x})",
            bz.len()
        )
    })?;
    let compression = Compression::from_magic(data).ok_or_else(|| {
        anyhow!(
            "unknown compression of the payload (first bytes {:02x?})",
            &data[..data.len().min(6)]
        )
    })?;
    let data = if compression.size_appended() && data.len() > 4 {
        &data[..data.len() - 4]
    } else {
        data
    };
    Ok((compression, data))
}

/// Decompresses the bzImage at `bzimage` into the ELF `vmlinux` at `out`.
pub fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    let bz = std::fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let (compression, data) =
        payload(&bz).with_context(|| format!("reading {}", bzimage.display()))?;
    let (tool, args, package) = compression.tool();
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("starting {tool} to decompress the {compression:?} kernel — apt-get install {package}")
        })?;
    let mut stdin = child.stdin.take().expect("piped");
    // A decompressor may stop reading early; its exit status and the ELF check below judge.
    let _ = stdin.write_all(data);
    drop(stdin);
    let result = child.wait_with_output()?;
    // gzip exits 2 for "trailing garbage ignored": the ELF check is what counts.
    let elf = std::fs::read(out).unwrap_or_default();
    if !elf.starts_with(b"\x7fELF") {
        bail!(
            "{tool} did not turn {}'s {compression:?} payload into an ELF ({}): {}",
            bzimage.display(),
            result.status,
            String::from_utf8_lossy(&result.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped buffer: `setup_sects` setup sectors, then a payload at `offset`.
    fn fake(setup_sects: u8, offset: u32, payload: &[u8]) -> Vec<u8> {
        let sects = if setup_sects == 0 { 4 } else { setup_sects };
        let pm = (usize::from(sects) + 1) * 512;
        let mut b = vec![0u8; pm + offset as usize + payload.len() + 16];
        b[0x1f1] = setup_sects;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&offset.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        b[pm + offset as usize..][..payload.len()].copy_from_slice(payload);
        b
    }

    #[test]
    fn finds_the_payload_and_drops_the_appended_size() {
        let xz = [
            0xfd, b'7', b'z', b'X', b'Z', 0x00, 1, 2, 3, 0xaa, 0xbb, 0xcc, 0xdd,
        ];
        let b = fake(27, 0x3b4, &xz);
        let (c, data) = payload(&b).unwrap();
        assert_eq!(c, Compression::Xz);
        assert_eq!(data, &xz[..xz.len() - 4]);

        let gz = [0x1f, 0x8b, 8, 0, 9, 9];
        let b = fake(0, 0x10, &gz);
        let (c, data) = payload(&b).unwrap();
        assert_eq!(c, Compression::Gzip);
        assert_eq!(data, &gz);
    }

    #[test]
    fn rejects_what_is_not_a_bzimage() {
        assert!(payload(&[0u8; 4096]).is_err());
        let mut b = fake(4, 0, &[0x42; 8]);
        assert!(payload(&b)
            .unwrap_err()
            .to_string()
            .contains("unknown compression"));
        b[0x24c..0x250].copy_from_slice(&0x10_0000u32.to_le_bytes());
        assert!(payload(&b).unwrap_err().to_string().contains("beyond"));
    }
}
