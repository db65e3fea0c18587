//! An in-memory description of a file tree: what the cpio and OCI layer writers serialise.
//!
//! Paths are relative (no leading `/`) and kept sorted, so a parent always precedes its
//! children and the order never depends on the host's directory listing.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Errors while describing a tree.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A path that is absolute after normalisation, empty, or climbs out with `..`.
    #[error("{0}: not a relative path inside the tree")]
    BadPath(String),
    /// Reading the host file system failed.
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file kind that has no place in an image (sockets, fifos).
    #[error("{0}: unsupported file type (only files, directories, symlinks and device nodes)")]
    Unsupported(PathBuf),
}

/// The content of a regular file: bytes in memory or a host file read when written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Bytes(Vec<u8>),
    HostFile(PathBuf),
}

impl Content {
    /// Reads the whole content.
    pub fn read(&self) -> Result<Vec<u8>, TreeError> {
        match self {
            Content::Bytes(b) => Ok(b.clone()),
            Content::HostFile(p) => fs::read(p).map_err(|source| TreeError::Read {
                path: p.clone(),
                source,
            }),
        }
    }
}

/// One entry of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Content),
    Symlink(PathBuf),
    CharDev { major: u32, minor: u32 },
    BlockDev { major: u32, minor: u32 },
}

/// An entry with its permission bits and owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits only (`0o755`); the file type comes from `kind`.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Node {
    /// The full `st_mode`: file type bits plus permissions.
    pub fn mode(&self) -> u32 {
        let ty = match self.kind {
            Kind::Dir => libc_mode::S_IFDIR,
            Kind::File(_) => libc_mode::S_IFREG,
            Kind::Symlink(_) => libc_mode::S_IFLNK,
            Kind::CharDev { .. } => libc_mode::S_IFCHR,
            Kind::BlockDev { .. } => libc_mode::S_IFBLK,
        };
        ty | (self.perm & 0o7777)
    }
}

/// File type bits of `st_mode` (POSIX values, identical on every Linux architecture).
mod libc_mode {
    pub const S_IFDIR: u32 = 0o040000;
    pub const S_IFREG: u32 = 0o100000;
    pub const S_IFLNK: u32 = 0o120000;
    pub const S_IFCHR: u32 = 0o020000;
    pub const S_IFBLK: u32 = 0o060000;
}

/// A sorted set of entries keyed by relative path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    entries: BTreeMap<PathBuf, Node>,
}

fn normalise(path: &str) -> Result<PathBuf, TreeError> {
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(TreeError::BadPath(path.to_string()))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(TreeError::BadPath(path.to_string()));
    }
    Ok(out)
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an entry owned by root, creating missing parent directories (0755).
    pub fn insert(&mut self, path: &str, kind: Kind, perm: u32) -> Result<(), TreeError> {
        self.insert_node(
            path,
            Node {
                kind,
                perm,
                uid: 0,
                gid: 0,
            },
        )
    }

    fn insert_node(&mut self, path: &str, node: Node) -> Result<(), TreeError> {
        let path = normalise(path)?;
        let mut parent = path.parent();
        while let Some(p) = parent {
            if p.as_os_str().is_empty() {
                break;
            }
            self.entries.entry(p.to_path_buf()).or_insert(Node {
                kind: Kind::Dir,
                perm: 0o755,
                uid: 0,
                gid: 0,
            });
            parent = p.parent();
        }
        self.entries.insert(path, node);
        Ok(())
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), TreeError> {
        self.insert(path, Kind::Dir, perm)
    }

    pub fn file(&mut self, path: &str, content: Content, perm: u32) -> Result<(), TreeError> {
        self.insert(path, Kind::File(content), perm)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), TreeError> {
        self.insert(path, Kind::Symlink(PathBuf::from(target)), 0o777)
    }

    pub fn char_dev(
        &mut self,
        path: &str,
        major: u32,
        minor: u32,
        perm: u32,
    ) -> Result<(), TreeError> {
        self.insert(path, Kind::CharDev { major, minor }, perm)
    }

    /// Entries in path order (parents first).
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &Node)> {
        self.entries.iter().map(|(p, n)| (p.as_path(), n))
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        normalise(path).ok().and_then(|p| self.entries.get(&p))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Describes a host directory: files (read lazily), directories, symlinks and device
    /// nodes, keeping permissions and owners. Modification times are dropped on purpose.
    pub fn from_dir(root: &Path) -> Result<Self, TreeError> {
        let mut tree = Tree::new();
        let read = |path: &Path, source| TreeError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let entries = fs::read_dir(&dir).map_err(|e| read(&dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| read(&dir, e))?;
                let path = entry.path();
                let meta = fs::symlink_metadata(&path).map_err(|e| read(&path, e))?;
                let rel = path
                    .strip_prefix(root)
                    .map_err(|_| TreeError::BadPath(path.display().to_string()))?
                    .to_string_lossy()
                    .into_owned();
                let ft = meta.file_type();
                let rdev = meta.rdev();
                let kind = if ft.is_dir() {
                    stack.push(path.clone());
                    Kind::Dir
                } else if ft.is_file() {
                    Kind::File(Content::HostFile(path.clone()))
                } else if ft.is_symlink() {
                    Kind::Symlink(fs::read_link(&path).map_err(|e| read(&path, e))?)
                } else if ft.is_char_device() {
                    Kind::CharDev {
                        major: libc::major(rdev),
                        minor: libc::minor(rdev),
                    }
                } else if ft.is_block_device() {
                    Kind::BlockDev {
                        major: libc::major(rdev),
                        minor: libc::minor(rdev),
                    }
                } else {
                    return Err(TreeError::Unsupported(path));
                };
                tree.insert_node(
                    &rel,
                    Node {
                        kind,
                        perm: meta.permissions().mode() & 0o7777,
                        uid: meta.uid(),
                        gid: meta.gid(),
                    },
                )?;
            }
        }
        Ok(tree)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_created_and_sorted_first() {
        let mut t = Tree::new();
        t.file("usr/bin/x", Content::Bytes(b"x".to_vec()), 0o755)
            .unwrap();
        t.dir("a", 0o700).unwrap();
        let paths: Vec<_> = t
            .iter()
            .map(|(p, _)| p.to_string_lossy().into_owned())
            .collect();
        assert_eq!(paths, ["a", "usr", "usr/bin", "usr/bin/x"]);
        assert_eq!(t.get("/usr/bin/x").unwrap().mode(), 0o100755);
    }

    #[test]
    fn paths_that_climb_out_are_refused() {
        let mut t = Tree::new();
        assert!(matches!(t.dir("../etc", 0o755), Err(TreeError::BadPath(_))));
        assert!(matches!(t.dir("/", 0o755), Err(TreeError::BadPath(_))));
    }

    #[test]
    fn from_dir_reads_files_links_and_devices() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("bin")).unwrap();
        fs::write(d.path().join("bin/tool"), b"hello").unwrap();
        std::os::unix::fs::symlink("tool", d.path().join("bin/alias")).unwrap();
        let t = Tree::from_dir(d.path()).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.get("bin/alias").unwrap().kind,
            Kind::Symlink(PathBuf::from("tool"))
        );
        match &t.get("bin/tool").unwrap().kind {
            Kind::File(c) => assert_eq!(c.read().unwrap(), b"hello"),
            k => panic!("unexpected {k:?}"),
        }
    }
}
