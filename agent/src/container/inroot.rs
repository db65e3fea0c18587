//! Paths inside a container's root, resolved without ever leaving it: the defence against
//! the class of runc's CVE-2021-30465 (a symlink in an image or a shared volume that turns a
//! mount, a mkdir or a mknod aimed at the container into one on the guest).
//!
//! Everything starts from an `O_PATH` fd of the root, never from a path string joined to it:
//! - an existing path is opened with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` ([`Root::open`]):
//!   the kernel follows symlinks as if the root were `/`, and `..` stops at it;
//! - a path to use or create ([`Root::at`]) is walked one component at a time, each opened
//!   `O_NOFOLLOW` from its parent's fd (`openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`).
//!   Symlinks are followed by hand, inside the root: an absolute target starts again at the
//!   root, `..` never climbs above it. So an image's `/etc -> /` makes `/etc/hosts` the root's
//!   `/hosts`, and a dangling `/data -> /run/husk` makes `<root>/run/husk` — as runc does. What is
//!   missing is made with `mkdirat`, `openat(O_CREAT | O_EXCL | O_NOFOLLOW)` or `mknodat`
//!   relative to the fd of the directory just resolved.
//!
//! The caller then acts on the result's fd (a mount on `/proc/self/fd/N`, see [`Entry::proc_path`]),
//! so nothing a container swaps in after the walk can redirect it. A symlink on procfs (where the
//! magic links live) is refused rather than followed.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};

/// Symlinks followed in one lookup before it is called a loop (the kernel's limit).
const MAX_SYMLINKS: u32 = 40;

/// A path in a container's root that could not be resolved or made; `path` is the path as
/// the spec gave it, `root` the container's root directory in the guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the container's root {root}: {errno}")]
    Root { root: PathBuf, errno: Errno },
    #[error("{path}: a relative path — give an absolute path inside the container")]
    Relative { path: PathBuf },
    #[error("{path} in the container's root: {step} {name:?}: {errno}")]
    Io {
        path: PathBuf,
        step: &'static str,
        name: OsString,
        errno: Errno,
    },
    #[error("{path} in the container's root: {name:?} is not a directory, and the path goes on below it")]
    NotDir { path: PathBuf, name: OsString },
    #[error("{path} in the container's root: more than {MAX_SYMLINKS} symlinks — a symlink loop in the image or volume")]
    Loop { path: PathBuf },
    #[error("{path} in the container's root: {name:?} is a symlink on procfs, which is never followed inside a container's root")]
    ProcLink { path: PathBuf, name: OsString },
    #[error("{path} resolves to the container's root itself, which cannot be replaced")]
    IsRoot { path: PathBuf },
}

/// What [`Root::at`] makes when the path's last component is missing (the components before
/// it are always made as directories, mode 0755).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Make {
    /// A directory (mode 0755).
    Dir,
    /// An empty regular file (mode 0644), e.g. the target of a file bind mount.
    File,
    /// A device node or fifo: `mode` carries the file type bits and the permissions. An
    /// existing last component is kept as it is, even a symlink (never followed).
    Node {
        mode: libc::mode_t,
        dev: libc::dev_t,
    },
}

/// A resolved path: an `O_PATH` fd of it, and its parent directory's fd and name in it (to
/// reopen it after a mount, when the fd still names what is under the mount).
#[derive(Debug)]
pub struct Entry {
    pub fd: OwnedFd,
    parent: OwnedFd,
    name: OsString,
    /// Whether [`Root::at`] made the last component.
    pub created: bool,
    /// The path as the caller gave it, for messages.
    pub shown: PathBuf,
}

impl Entry {
    /// The fd as a path the kernel resolves to exactly this file (for `mount(2)`).
    pub(crate) fn proc_path(&self) -> String {
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }

    /// Opens the entry again by name from its parent: after a mount on it, the new fd is the
    /// mount on top (the old one still names the file under it), which a remount or a
    /// propagation change must be given. A mount point cannot be renamed or replaced, so the
    /// name still means the same entry.
    pub fn reopen(&mut self) -> Result<(), Error> {
        self.fd = open_beneath(self.parent.as_fd(), &self.name).map_err(|errno| Error::Io {
            path: self.shown.clone(),
            step: "reopening",
            name: self.name.clone(),
            errno,
        })?;
        Ok(())
    }

    pub fn parent(&self) -> BorrowedFd<'_> {
        self.parent.as_fd()
    }

    pub fn name(&self) -> &OsStr {
        &self.name
    }

    pub fn is_dir(&self) -> bool {
        nix::sys::stat::fstat(self.fd.as_raw_fd())
            .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
    }
}

/// A container's root directory, held by fd.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

fn retry_eintr<T>(mut f: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match f() {
            Err(Errno::EINTR) => {}
            r => return r,
        }
    }
}

fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: called only with an fd a successful open just returned, which nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// One component below `dir`, not following it if it is a symlink (`O_PATH | O_NOFOLLOW`).
fn open_beneath(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    retry_eintr(|| nix::fcntl::openat2(dir.as_raw_fd(), name, how)).map(owned)
}

fn file_type(fd: &OwnedFd) -> nix::Result<SFlag> {
    Ok(SFlag::from_bits_truncate(nix::sys::stat::fstat(fd.as_raw_fd())?.st_mode) & SFlag::S_IFMT)
}

/// The components of a path from a spec: absolute, `.` dropped, `..` kept (the walk stops it
/// at the root).
fn components(path: &Path, shown: &Path) -> Result<VecDeque<OsString>, Error> {
    let mut out = VecDeque::new();
    let mut comps = path.components();
    if comps.next() != Some(Component::RootDir) {
        return Err(Error::Relative { path: shown.into() });
    }
    for c in comps {
        match c {
            Component::Normal(n) => out.push_back(n.to_os_string()),
            Component::ParentDir => out.push_back("..".into()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

/// A symlink's target as components to walk next (`..` kept), and whether it is absolute.
fn link_components(target: &OsStr) -> (bool, Vec<OsString>) {
    let p = Path::new(target);
    let comps = p
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    (p.has_root(), comps)
}

impl Root {
    /// Holds `path` (a directory in the guest) as a container's root.
    pub fn new(path: &Path) -> Result<Self, Error> {
        let fd = retry_eintr(|| {
            nix::fcntl::open(
                path,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
        })
        .map(owned)
        .map_err(|errno| Error::Root {
            root: path.into(),
            errno,
        })?;
        Ok(Self {
            fd,
            path: path.into(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens an existing `path` (absolute, as the container sees it) with `flags`, resolved
    /// by the kernel inside the root. `Ok(None)` if it does not exist.
    pub fn open(&self, path: &Path, flags: OFlag) -> Result<Option<OwnedFd>, Error> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        // EAGAIN: a rename raced with a `..`; the kernel asks us to try again.
        let mut tries = 0;
        loop {
            match nix::fcntl::openat2(self.fd.as_raw_fd(), path, how) {
                Ok(fd) => return Ok(Some(owned(fd))),
                Err(Errno::ENOENT) => return Ok(None),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) if tries < 16 => tries += 1,
                Err(errno) => {
                    return Err(Error::Io {
                        path: path.into(),
                        step: "opening",
                        name: path.as_os_str().to_os_string(),
                        errno,
                    })
                }
            }
        }
    }

    /// Resolves `path` (absolute, as the container sees it) inside the root, following
    /// symlinks inside it (a symlink as the last component too, unless `make` is a node).
    /// What is missing is made if `make` says what to make of the last component, else the
    /// answer is `Ok(None)`.
    pub fn at(&self, path: &Path, make: Option<Make>) -> Result<Option<Entry>, Error> {
        let io = |step: &'static str, name: &OsStr, errno: Errno| Error::Io {
            path: path.into(),
            step,
            name: name.into(),
            errno,
        };
        let mut queue = components(path, path)?;
        // The directories walked below the root, each with its name in the one before.
        let mut stack: Vec<(OwnedFd, OsString)> = Vec::new();
        let mut links = 0;
        // Each round takes a component, or makes one (at most once per component, unless a
        // racing process removes it again: bounded all the same).
        let mut rounds = 0;
        let mut created = false;
        while let Some(name) = queue.pop_front() {
            rounds += 1;
            if rounds > 4096 {
                return Err(Error::Loop { path: path.into() });
            }
            if name == ".." {
                stack.pop();
                continue;
            }
            let last = queue.is_empty();
            let cur = stack.last().map_or(self.fd.as_fd(), |(fd, _)| fd.as_fd());
            match open_beneath(cur, &name) {
                Ok(fd) => {
                    let kind = file_type(&fd).map_err(|e| io("examining", &name, e))?;
                    let keep_link = last && matches!(make, Some(Make::Node { .. }));
                    if kind == SFlag::S_IFLNK && !keep_link {
                        if nix::sys::statfs::fstatfs(cur).is_ok_and(|s| {
                            s.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC
                        }) {
                            return Err(Error::ProcLink {
                                path: path.into(),
                                name,
                            });
                        }
                        links += 1;
                        if links > MAX_SYMLINKS {
                            return Err(Error::Loop { path: path.into() });
                        }
                        let target =
                            nix::fcntl::readlinkat(Some(cur.as_raw_fd()), name.as_os_str())
                                .map_err(|e| io("reading the symlink", &name, e))?;
                        let (absolute, comps) = link_components(&target);
                        if absolute {
                            stack.clear();
                        }
                        for c in comps.into_iter().rev() {
                            queue.push_front(c);
                        }
                        continue;
                    }
                    if !last && kind != SFlag::S_IFDIR {
                        return Err(Error::NotDir {
                            path: path.into(),
                            name,
                        });
                    }
                    stack.push((fd, name));
                }
                Err(Errno::ENOENT) => {
                    let Some(make) = make else { return Ok(None) };
                    let what = if last { make } else { Make::Dir };
                    match create(cur, &name, what) {
                        Ok(()) => created |= last,
                        // Made by someone else meanwhile: take it as it is now.
                        Err(Errno::EEXIST) => {}
                        Err(e) => return Err(io("creating", &name, e)),
                    }
                    queue.push_front(name);
                }
                Err(e) => return Err(io("opening", &name, e)),
            }
        }
        let Some((fd, name)) = stack.pop() else {
            return Err(Error::IsRoot { path: path.into() });
        };
        let parent = match stack.pop() {
            Some((p, _)) => p,
            None => self.fd.try_clone().map_err(|e| {
                io(
                    "duplicating the root fd for",
                    &name,
                    Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                )
            })?,
        };
        Ok(Some(Entry {
            fd,
            parent,
            name,
            created,
            shown: path.into(),
        }))
    }
}

/// Makes `name` in `dir` as `what`, never following a symlink that is already there.
fn create(dir: BorrowedFd<'_>, name: &OsStr, what: Make) -> nix::Result<()> {
    let raw = Some(dir.as_raw_fd());
    match what {
        Make::Dir => {
            retry_eintr(|| nix::sys::stat::mkdirat(raw, name, Mode::from_bits_truncate(0o755)))
        }
        Make::File => {
            let flags = OFlag::O_CREAT
                | OFlag::O_EXCL
                | OFlag::O_NOFOLLOW
                | OFlag::O_WRONLY
                | OFlag::O_CLOEXEC;
            retry_eintr(|| nix::fcntl::openat(raw, name, flags, Mode::from_bits_truncate(0o644)))
                .map(|fd| drop(owned(fd)))
        }
        Make::Node { mode, dev } => {
            let kind = SFlag::from_bits_truncate(mode & libc::S_IFMT);
            let perm = Mode::from_bits_truncate(mode & !libc::S_IFMT);
            retry_eintr(|| nix::sys::stat::mknodat(raw, name, kind, perm, dev))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A temp dir as a container root: `root/`, next to `outside/` (which nothing may touch).
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("root")).unwrap();
            std::fs::create_dir(dir.path().join("outside")).unwrap();
            Self { dir }
        }
        fn root(&self) -> PathBuf {
            self.dir.path().join("root")
        }
        fn outside(&self) -> PathBuf {
            self.dir.path().join("outside")
        }
        fn open(&self) -> Root {
            Root::new(&self.root()).unwrap()
        }
        fn outside_untouched(&self) {
            let left: Vec<_> = std::fs::read_dir(self.outside())
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert!(left.is_empty(), "made outside the root: {left:?}");
        }
    }

    /// The entry's real path (through /proc), relative to the fixture's root.
    fn where_is(f: &Fixture, e: &Entry) -> PathBuf {
        let real = std::fs::read_link(e.proc_path()).unwrap();
        let root = f.root().canonicalize().unwrap();
        real.strip_prefix(&root)
            .unwrap_or_else(|_| panic!("{} is outside the root {}", real.display(), root.display()))
            .to_path_buf()
    }

    #[test]
    fn missing_directories_are_made_one_by_one() {
        let f = Fixture::new();
        let e = f
            .open()
            .at(Path::new("/a/b/c"), Some(Make::Dir))
            .unwrap()
            .unwrap();
        assert!(e.created && e.is_dir());
        assert_eq!(where_is(&f, &e), Path::new("a/b/c"));
        assert_eq!(e.name(), "c");
        // Existing now: found, not made.
        let e = f
            .open()
            .at(Path::new("/a/b/c"), Some(Make::Dir))
            .unwrap()
            .unwrap();
        assert!(!e.created);
        assert!(f.open().at(Path::new("/a/nope"), None).unwrap().is_none());
    }

    #[test]
    fn an_absolute_symlink_is_followed_inside_the_root() {
        let f = Fixture::new();
        // The image's /etc is a symlink to /: /etc/hosts is the root's /hosts.
        symlink("/", f.root().join("etc")).unwrap();
        let e = f
            .open()
            .at(Path::new("/etc/hosts"), Some(Make::File))
            .unwrap()
            .unwrap();
        assert_eq!(where_is(&f, &e), Path::new("hosts"));
        assert!(f.root().join("hosts").is_file());
        // And one pointing at the outside by its real path lands inside, under that name.
        symlink(f.outside(), f.root().join("out")).unwrap();
        let e = f
            .open()
            .at(Path::new("/out/x"), Some(Make::Dir))
            .unwrap()
            .unwrap();
        assert!(where_is(&f, &e).starts_with(f.outside().strip_prefix("/").unwrap()));
        f.outside_untouched();
    }

    #[test]
    fn a_dangling_symlink_makes_its_target_inside_the_root() {
        let f = Fixture::new();
        symlink("/run/husk", f.root().join("data")).unwrap();
        let e = f
            .open()
            .at(Path::new("/data"), Some(Make::Dir))
            .unwrap()
            .unwrap();
        assert_eq!(where_is(&f, &e), Path::new("run/husk"));
        assert!(e.created);
        // A relative one climbing out stops at the root.
        symlink("../../../../outside/new", f.root().join("up")).unwrap();
        let e = f
            .open()
            .at(Path::new("/up/file"), Some(Make::File))
            .unwrap()
            .unwrap();
        assert_eq!(where_is(&f, &e), Path::new("outside/new/file"));
        f.outside_untouched();
    }

    #[test]
    fn dotdot_in_the_path_stops_at_the_root() {
        let f = Fixture::new();
        let e = f
            .open()
            .at(Path::new("/../../outside/x"), Some(Make::Dir))
            .unwrap()
            .unwrap();
        assert_eq!(where_is(&f, &e), Path::new("outside/x"));
        f.outside_untouched();
        assert!(matches!(
            f.open().at(Path::new("/.."), Some(Make::Dir)),
            Err(Error::IsRoot { .. })
        ));
        assert!(matches!(
            f.open().at(Path::new("rel"), Some(Make::Dir)),
            Err(Error::Relative { .. })
        ));
    }

    #[test]
    fn kernel_resolution_agrees() {
        let f = Fixture::new();
        symlink("/", f.root().join("etc")).unwrap();
        std::fs::write(f.root().join("hosts"), "in").unwrap();
        std::fs::write(f.outside().join("hosts"), "out").unwrap();
        let r = f.open();
        let fd = r
            .open(Path::new("/etc/hosts"), OFlag::O_RDONLY)
            .unwrap()
            .unwrap();
        let text = std::fs::read_to_string(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert_eq!(text, "in");
        assert!(r
            .open(Path::new("/etc/missing"), OFlag::O_PATH)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_node_is_made_after_its_parents_and_an_existing_one_is_kept() {
        let f = Fixture::new();
        // A fifo: mknod of one needs no privilege.
        let e = f
            .open()
            .at(
                Path::new("/dev/cpu/0/fifo"),
                Some(Make::Node {
                    mode: libc::S_IFIFO | 0o600,
                    dev: 0,
                }),
            )
            .unwrap()
            .unwrap();
        assert!(e.created);
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(f.root().join("dev/cpu/0/fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        // A symlink where a node goes is left alone, never followed.
        symlink(f.outside().join("victim"), f.root().join("dev/evil")).unwrap();
        let e = f
            .open()
            .at(
                Path::new("/dev/evil"),
                Some(Make::Node {
                    mode: libc::S_IFIFO | 0o600,
                    dev: 0,
                }),
            )
            .unwrap()
            .unwrap();
        assert!(!e.created);
        f.outside_untouched();
    }

    #[test]
    fn loops_and_files_in_the_middle_are_named() {
        let f = Fixture::new();
        symlink("b", f.root().join("a")).unwrap();
        symlink("a", f.root().join("b")).unwrap();
        let e = f.open().at(Path::new("/a/x"), Some(Make::Dir)).unwrap_err();
        assert!(matches!(e, Error::Loop { .. }), "{e}");
        std::fs::write(f.root().join("file"), "").unwrap();
        let e = f
            .open()
            .at(Path::new("/file/x"), Some(Make::Dir))
            .unwrap_err();
        assert!(e.to_string().contains("\"file\" is not a directory"), "{e}");
    }

    #[test]
    fn procfs_symlinks_are_not_followed() {
        // /proc as the root: /proc/self is a symlink on procfs.
        let r = Root::new(Path::new("/proc")).unwrap();
        let e = r.at(Path::new("/self/status"), None).unwrap_err();
        assert!(matches!(e, Error::ProcLink { .. }), "{e}");
    }

    #[test]
    fn reopen_finds_what_is_on_top() {
        let f = Fixture::new();
        let mut e = f
            .open()
            .at(Path::new("/a/b"), Some(Make::Dir))
            .unwrap()
            .unwrap();
        // No mount here (unprivileged): reopening gives the same directory.
        let before = nix::sys::stat::fstat(e.fd.as_raw_fd()).unwrap().st_ino;
        e.reopen().unwrap();
        assert_eq!(
            nix::sys::stat::fstat(e.fd.as_raw_fd()).unwrap().st_ino,
            before
        );
    }
}
