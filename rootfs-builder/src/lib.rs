//! `husk-rootfs-builder`: builds, without any registry, the two kinds of file system husk
//! boots from.
//!
//! - [`initramfs`]: the guest's initramfs, an *uncompressed* newc cpio whose `/init` is the
//!   statically linked `husk-agent` (decompression would be pure boot time).
//! - [`image`]: small OCI image tarballs (`ctr image import` accepts them) for the tests and
//!   the demo, from Debian's `busybox-static` or from any directory (e.g. a debootstrap tree).
//!
//! Both are built from a [`tree::Tree`] and are byte-for-byte reproducible: entries are sorted,
//! mtimes are fixed and inode numbers are assigned in order. This crate never runs anything in
//! a VM or talks to containerd; it only writes files.

pub mod image;
pub mod initramfs;
pub mod tree;

/// The fixed modification time stamped on every entry, so that outputs are reproducible.
/// (`SOURCE_DATE_EPOCH` convention: 0 is the epoch; tools read it back without complaint.)
pub const FIXED_MTIME: u64 = 0;
