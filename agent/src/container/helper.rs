//! The container helper: the agent's binary re-executed as `husk-agent init|exec|warm` in a
//! container's namespaces (see `spawn`). Single-threaded; everything it does ends in the
//! container's process image or in `error <message>` on the sync socket and exit 1.
//!
//! - `init`: PID 1 of the container's new PID namespace. Joins the cgroup and the namespaces
//!   it is told to, makes its own cgroup namespace (rooted at the container's cgroup), builds
//!   the mount view, pivot_roots, opens the terminal if it has one, reports `ready`, waits for
//!   `start`, applies the process settings and execs the container's process.
//! - `exec`: joins a running container's namespaces and cgroup, opens the terminal if it has
//!   one, forks (entering a PID namespace takes effect for children only), reports
//!   `pid <global pid>` and mirrors the process's exit so the agent can wait for it.
//! - `warm`: reads its (empty) config, reports `ready` and exits: run once in a pooled VM so
//!   that under QEMU TCG the first container's helper finds the start of a helper translated
//!   (see `Engine::create_sandbox`).
//!
//! A terminal is a pty of the container's own devpts, as with runc: the helper opens the
//! container's `/dev/ptmx` (so `tty` names a `/dev/pts/N` the container sees), makes the slave
//! fds 0-2 and the controlling terminal, and passes the master to the agent with its `pty`
//! line (`SCM_RIGHTS`, see [`spawn::send_fd`]).

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sched::{setns, CloneFlags};
use oci_spec::runtime::{LinuxSeccomp, PosixRlimitType, Process, Spec};
use serde::{Deserialize, Serialize};

use super::{caps, inroot, mounts, seccomp, spawn, spec, stdio, steps};

/// What a container without a terminal device of its own should have.
const NEEDS_PTMX: &str = "the container needs a devpts mounted at /dev/pts (the OCI default mounts have one) or a /dev/ptmx of its own";

/// Why a helper could not set a container or process up. It ends as `error <message>` on the
/// sync socket, which the agent returns as the request's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown helper mode {0:?} — the agent runs its helpers as init, exec or warm")]
    Mode(String),
    #[error(transparent)]
    Sync(#[from] spawn::Error),
    #[error("helper config: {0}")]
    Config(#[source] serde_json::Error),
    #[error("joining cgroup {}: {source}", path.display())]
    JoinCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening namespace {}: {source}", path.display())]
    OpenNamespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("entering namespace {}: {source}", path.display())]
    EnterNamespace {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("new cgroup namespace: {0}")]
    CgroupNamespace(#[source] nix::errno::Errno),
    #[error("sethostname {name:?}: {source}")]
    Hostname {
        name: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("the spec has no process — give the container a process")]
    NoProcess,
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error("sysctl {key}={value}: {source}")]
    Sysctl {
        key: String,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Mounts(#[from] mounts::Error),
    #[error("reporting ready: {0}")]
    Ready(#[source] std::io::Error),
    #[error("the agent went away before start")]
    AgentGone,
    #[error("expected start, got {0:?}")]
    NotStart(String),
    #[error("opening the container's /dev/ptmx for its terminal: {0} — {NEEDS_PTMX}")]
    OpenPtmx(#[source] inroot::Error),
    #[error(
        "opening the container's /dev/ptmx for its terminal: it does not exist — {NEEDS_PTMX}"
    )]
    NoPtmx,
    #[error("unlocking the container's pty: {0}")]
    UnlockPty(#[source] std::io::Error),
    #[error("opening the slave of the container's pty: {0}")]
    PtySlave(#[source] std::io::Error),
    #[error("making the pty slave fd {fd}: {source}")]
    SlaveStdio {
        fd: i32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("setsid: {0}")]
    Setsid(#[source] nix::errno::Errno),
    #[error("making the pty the controlling terminal: {0}")]
    ControllingTty(#[source] std::io::Error),
    #[error("oom_score_adj {adj}: {source} — process.oomScoreAdj is -1000..=1000")]
    OomScoreAdj {
        adj: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("opening {path}: {source} — has the container's init exited?")]
    OpenInitNamespace {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entering the container's {name} namespace: {source}")]
    EnterContainerNamespace {
        name: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error(transparent)]
    Stdio(#[from] stdio::Error),
    #[error("fork: {0}")]
    Fork(#[source] nix::errno::Errno),
    #[error("unknown rlimit {0:?} — remove it from process.rlimits")]
    UnknownRlimit(PosixRlimitType),
    #[error("setrlimit {resource:?}: {source}")]
    Setrlimit {
        resource: PosixRlimitType,
        #[source]
        source: std::io::Error,
    },
    #[error("cwd: {0}")]
    Cwd(#[source] inroot::Error),
    #[error("cwd {}: no such directory in the container — set process.cwd to a directory of the image", .0.display())]
    NoCwd(PathBuf),
    #[error("chdir to cwd {}: {source}", path.display())]
    Chdir {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
    #[error(transparent)]
    Caps(#[from] caps::Error),
    #[error("setgroups {gids:?}: {source}")]
    Setgroups {
        gids: Vec<nix::unistd::Gid>,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("giving fd {fd} to uid {uid}: {source}")]
    OwnStdio {
        fd: i32,
        uid: nix::unistd::Uid,
        #[source]
        source: std::io::Error,
    },
    #[error("setgid {gid}: {source}")]
    Setgid {
        gid: nix::unistd::Gid,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("setuid {uid}: {source}")]
    Setuid {
        uid: nix::unistd::Uid,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("no_new_privileges: {0}")]
    NoNewPrivileges(#[source] std::io::Error),
    #[error("the process has no args — give process.args at least the program")]
    NoArgs,
    #[error("exec {arg0}: not found on PATH {path}")]
    NotOnPath { arg0: String, path: String },
    #[error("{what} {value:?} contains a NUL")]
    Nul { what: &'static str, value: String },
    #[error("exec {}: {source}", path.display())]
    Exec {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
}

/// What `init` is told.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct InitConfig {
    pub id: String,
    pub spec: Spec,
    pub rootfs: PathBuf,
    /// The container's cgroup directory, joined first.
    pub cgroup: Option<PathBuf>,
    /// Namespaces to enter (`/proc/<pid>/ns/<type>` or a spec path), as (clone flag bits, path).
    pub join: Vec<(i32, PathBuf)>,
    /// Set the spec's hostname (the container has its own uts namespace).
    pub set_hostname: bool,
    pub terminal: bool,
    /// Send the agent a `steps` line before `ready` (debug level, see `steps`).
    #[serde(default)]
    pub steps: bool,
}

/// What `exec` is told: built by [`super::exec::config`], which says where each part comes from.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExecConfig {
    pub id: String,
    pub init_pid: i32,
    pub process: Process,
    pub cgroup: Option<PathBuf>,
    pub terminal: bool,
    /// The container's seccomp profile.
    pub seccomp: Option<LinuxSeccomp>,
    /// The container's oom_score_adj.
    pub oom_score_adj: Option<i32>,
}

fn sync_stream() -> UnixStream {
    // SAFETY: the agent put the sync socket on fd 3 before exec; we take ownership once.
    unsafe { UnixStream::from_raw_fd(spawn::SYNC_FD) }
}

fn fail(sync: &mut UnixStream, e: &Error) -> ! {
    let _ = sync.write_all(format!("error {}\n", e.to_string().replace('\n', " ")).as_bytes());
    std::process::exit(1)
}

/// Signals as a fresh process expects them: the agent blocks SIGCHLD and Rust ignores SIGPIPE,
/// and both would be inherited by the container's process.
fn reset_signals() {
    let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
    // SAFETY: restoring the default disposition of SIGPIPE; no handler is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn set_cloexec(fd: i32) {
    let _ = nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
}

fn join_cgroup(cg: &Option<PathBuf>) -> Result<(), Error> {
    if let Some(dir) = cg {
        std::fs::write(dir.join("cgroup.procs"), "0").map_err(|source| Error::JoinCgroup {
            path: dir.clone(),
            source,
        })?;
    }
    Ok(())
}

pub fn main(mode: &str) -> ! {
    steps::mark("main");
    spawn::clear_fixed_layout();
    reset_signals();
    set_cloexec(spawn::SYNC_FD);
    let mut sync = sync_stream();
    let r = match mode {
        "init" => init(&mut sync),
        "exec" => exec(&mut sync),
        "warm" => warm(&mut sync),
        other => Err(Error::Mode(other.into())),
    };
    match r {
        Err(e) => fail(&mut sync, &e),
        Ok(never) => match never {},
    }
}

enum Never {}

fn init(sync: &mut UnixStream) -> Result<Never, Error> {
    let cfg: InitConfig =
        serde_json::from_slice(&spawn::read_config(sync)?).map_err(Error::Config)?;
    steps::mark("config read");
    join_cgroup(&cfg.cgroup)?;
    for (flag, path) in &cfg.join {
        let f = std::fs::File::open(path).map_err(|source| Error::OpenNamespace {
            path: path.clone(),
            source,
        })?;
        setns(f, CloneFlags::from_bits_truncate(*flag)).map_err(|source| {
            Error::EnterNamespace {
                path: path.clone(),
                source,
            }
        })?;
    }
    if private_cgroup_namespace(&cfg.spec) {
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP).map_err(Error::CgroupNamespace)?;
    }
    if cfg.set_hostname {
        if let Some(h) = cfg.spec.hostname() {
            nix::unistd::sethostname(h).map_err(|source| Error::Hostname {
                name: h.clone(),
                source,
            })?;
        }
    }
    steps::mark("namespaces");
    let process = cfg.spec.process().clone().ok_or(Error::NoProcess)?;
    // Things that need the guest's /proc, before it is gone with the old root.
    set_oom_score_adj(process.oom_score_adj())?;
    if let Some(sysctl) = cfg.spec.linux().as_ref().and_then(|l| l.sysctl().as_ref()) {
        for (k, v) in sysctl {
            // Checked at CreateContainer (`spec::check_spec`); never a path outside /proc/sys.
            let path = spec::sysctl_path(k)?;
            std::fs::write(&path, v).map_err(|source| Error::Sysctl {
                key: k.clone(),
                value: v.clone(),
                source,
            })?;
        }
    }
    steps::mark("sysctls");
    mounts::build(&cfg.spec, &cfg.rootfs)?;
    if cfg.terminal {
        // After pivot_root: the container's /dev/ptmx.
        let (master, slave) = open_pty()?;
        slave_as_stdio(&slave)?;
        drop(slave);
        controlling_tty()?;
        spawn::send_fd(sync, "pty", master.as_raw_fd())?;
        steps::mark("terminal");
    }
    if cfg.steps {
        sync.write_all(format!("{}\n", steps::line()).as_bytes())
            .map_err(Error::Ready)?;
    }
    sync.write_all(b"ready\n").map_err(Error::Ready)?;
    let mut line = [0u8; 6];
    std::io::Read::read_exact(sync, &mut line).map_err(|_| Error::AgentGone)?;
    if &line != b"start\n" {
        return Err(Error::NotStart(String::from_utf8_lossy(&line).into()));
    }
    exec_process(
        &process,
        cfg.spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()),
    )
}

/// Whether the container gets a cgroup namespace of its own: yes, as containerd and Docker
/// default to on cgroup v2, unless the spec names one by path. Such a path is the host's (CRI
/// writes the pause container's), which the guest cannot enter: the container stays in the
/// guest's, as a spec without a cgroup namespace once did.
pub(crate) fn private_cgroup_namespace(spec: &Spec) -> bool {
    let nss = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    !nss.is_some_and(|ns| {
        ns.iter()
            .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Cgroup && n.path().is_some())
    })
}

/// A pty of the container's own devpts: `/dev/ptmx` as the container sees it (after
/// pivot_root, or after entering its mount namespace), unlocked, and its slave.
fn open_pty() -> Result<(OwnedFd, OwnedFd), Error> {
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    // Resolved inside the container's root, never through a magic link it could plant there.
    let master = inroot::Root::new(Path::new("/"))
        .and_then(|root| root.open(Path::new("/dev/ptmx"), flags))
        .map_err(Error::OpenPtmx)?
        .ok_or(Error::NoPtmx)?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int we own; master is an open pty master.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(Error::UnlockPty(std::io::Error::last_os_error()));
    }
    // TIOCGPTPEER opens the slave through the master's own devpts mount: no lookup of
    // /dev/pts/N by name, which the container's processes could have mounted over.
    // SAFETY: TIOCGPTPEER takes open flags as its integer argument and returns a new fd.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags.bits()) };
    if fd < 0 {
        return Err(Error::PtySlave(std::io::Error::last_os_error()));
    }
    // SAFETY: the ioctl just returned this new fd; nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((master, slave))
}

/// Makes the pty slave our fds 0, 1 and 2 (the process's stdio).
fn slave_as_stdio(slave: &OwnedFd) -> Result<(), Error> {
    for target in 0..3 {
        nix::unistd::dup2(slave.as_raw_fd(), target)
            .map_err(|source| Error::SlaveStdio { fd: target, source })?;
    }
    Ok(())
}

fn controlling_tty() -> Result<(), Error> {
    nix::unistd::setsid().map_err(Error::Setsid)?;
    // SAFETY: TIOCSCTTY on our stdin (the pty slave), integer argument.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
        return Err(Error::ControllingTty(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes our oom_score_adj (inherited by what we exec and fork), through the guest's /proc:
/// before entering the container's mount namespace or pivoting into its root.
fn set_oom_score_adj(adj: Option<i32>) -> Result<(), Error> {
    if let Some(adj) = adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|source| Error::OomScoreAdj { adj, source })?;
    }
    Ok(())
}

fn warm(sync: &mut UnixStream) -> Result<Never, Error> {
    spawn::read_config(sync)?;
    sync.write_all(b"ready\n").map_err(Error::Ready)?;
    std::process::exit(0)
}

fn exec(sync: &mut UnixStream) -> Result<Never, Error> {
    let cfg: ExecConfig =
        serde_json::from_slice(&spawn::read_config(sync)?).map_err(Error::Config)?;
    set_oom_score_adj(cfg.oom_score_adj)?;
    join_cgroup(&cfg.cgroup)?;
    // Open them all first: after entering the mount namespace /proc is the container's.
    let kinds = [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    let mut opened = Vec::new();
    for (name, flag) in kinds {
        let path = format!("/proc/{}/ns/{name}", cfg.init_pid);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(source) => return Err(Error::OpenInitNamespace { path, source }),
        };
        opened.push((name, flag, f));
    }
    for (name, flag, f) in opened {
        // Entering our own namespace again is a no-op, but EINVAL for some kinds: skip those.
        let own = std::fs::read_link(format!("/proc/self/ns/{name}")).ok();
        let theirs = std::fs::read_link(format!("/proc/{}/ns/{name}", cfg.init_pid)).ok();
        if own.is_some() && own == theirs {
            continue;
        }
        setns(f, flag).map_err(|source| Error::EnterContainerNamespace { name, source })?;
    }
    // In the container's mount namespace (and at its root) now: its /dev/ptmx.
    let pty = if cfg.terminal {
        let (master, slave) = open_pty()?;
        // Here, not in the agent after the pass: the process may ask for its size at once.
        if let Some(size) = cfg.process.console_size() {
            let clamp = |v: u64| u16::try_from(v).unwrap_or(u16::MAX);
            stdio::set_winsize(
                master.as_raw_fd(),
                clamp(size.height()),
                clamp(size.width()),
            )?;
        }
        Some((master, slave))
    } else {
        None
    };
    // SAFETY: this helper is single-threaded, so fork is safe; the child only runs our code.
    match unsafe { nix::unistd::fork() }.map_err(Error::Fork)? {
        nix::unistd::ForkResult::Child => {
            if let Some((master, slave)) = pty {
                drop(master);
                if let Err(e) = slave_as_stdio(&slave).and_then(|()| controlling_tty()) {
                    fail(sync, &e);
                }
            }
            match exec_process(&cfg.process, cfg.seccomp.as_ref()) {
                Err(e) => fail(sync, &e),
                Ok(never) => match never {},
            }
        }
        nix::unistd::ForkResult::Parent { child } => {
            if let Some((master, slave)) = pty {
                // Only the process holds the slave, so the master reads EOF (EIO) when it ends.
                drop(slave);
                if let Err(e) = spawn::send_fd(sync, "pty", master.as_raw_fd()) {
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                    fail(sync, &e.into());
                }
            }
            let _ = sync.write_all(format!("pid {child}\n").as_bytes());
            // Our copy must close so the agent sees EOF when the child execs.
            // SAFETY: closing the fd the UnixStream wraps; it is not used after (we exit).
            unsafe { libc::close(sync.as_raw_fd()) };
            // Forward the signals a shim sends to the exec'd process's group leader? No: the
            // agent signals the process itself (by its global PID). We only mirror its end.
            loop {
                match nix::sys::wait::waitpid(child, None) {
                    Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => std::process::exit(code),
                    Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => {
                        // Die the same way, so the agent sees the same status.
                        // SAFETY: restoring the default action, then raising it on ourselves.
                        unsafe {
                            libc::signal(sig as i32, libc::SIG_DFL);
                            libc::raise(sig as i32);
                        }
                        std::process::exit(128 + sig as i32)
                    }
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(_) => std::process::exit(255),
                }
            }
        }
    }
}

fn rlimit_resource(t: PosixRlimitType) -> Option<libc::__rlimit_resource_t> {
    let name = serde_json::to_value(t).ok()?;
    Some(match name.as_str()? {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `args[0]` as execve wants it: as is with a `/`, else the first match on PATH.
pub fn resolve(arg0: &str, env: &[String]) -> Result<PathBuf, Error> {
    if arg0.contains('/') {
        return Ok(PathBuf::from(arg0));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join(arg0);
        if let Ok(m) = std::fs::metadata(&p) {
            use std::os::unix::fs::PermissionsExt;
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(p);
            }
        }
    }
    Err(Error::NotOnPath {
        arg0: arg0.into(),
        path: path.into(),
    })
}

fn cstrings(v: &[String], what: &'static str) -> Result<Vec<CString>, Error> {
    v.iter()
        .map(|s| {
            CString::new(s.as_bytes()).map_err(|_| Error::Nul {
                what,
                value: s.clone(),
            })
        })
        .collect()
}

/// Gives the process's user its own stdio (the pty slave, the pipes), as runc does, so a
/// process that is not root can reopen them (`/dev/stdout`, `/proc/self/fd/1`, `tty`
/// programs). The group stays (devpts gives slaves the tty group). /dev/null is left alone.
fn own_stdio(uid: nix::unistd::Uid) -> Result<(), Error> {
    if uid.is_root() {
        return Ok(());
    }
    let null = nix::sys::stat::stat("/dev/null").ok().map(|s| s.st_rdev);
    for fd in 0..3 {
        let Ok(st) = nix::sys::stat::fstat(fd) else {
            continue;
        };
        let is_char = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
        if is_char && Some(st.st_rdev) == null {
            continue;
        }
        // SAFETY: fchown on one of our own fds, integer arguments (-1: keep the group).
        if unsafe { libc::fchown(fd, uid.as_raw(), u32::MAX) } != 0 {
            return Err(Error::OwnStdio {
                fd,
                uid,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Makes `cwd` our working directory, resolved inside the root we run in (after pivot_root, or
/// after entering the container's mount namespace, `/` is the container's root): a symlink
/// on the way is followed inside it, and a magic link is refused.
fn enter_cwd(cwd: &Path) -> Result<(), Error> {
    let fd = inroot::Root::new(Path::new("/"))
        .and_then(|root| root.open(cwd, OFlag::O_PATH | OFlag::O_DIRECTORY))
        .map_err(Error::Cwd)?
        .ok_or_else(|| Error::NoCwd(cwd.to_path_buf()))?;
    nix::unistd::fchdir(fd.as_raw_fd()).map_err(|source| Error::Chdir {
        path: cwd.to_path_buf(),
        source,
    })
}

/// Applies a process's settings (rlimits, user, capabilities, cwd, no_new_privileges,
/// seccomp) and execs it.
fn exec_process(
    p: &Process,
    seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
) -> Result<Never, Error> {
    for r in p.rlimits().as_deref().unwrap_or(&[]) {
        let res = rlimit_resource(r.typ()).ok_or(Error::UnknownRlimit(r.typ()))?;
        let lim = libc::rlimit {
            rlim_cur: r.soft(),
            rlim_max: r.hard(),
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(Error::Setrlimit {
                resource: r.typ(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    // Before the user switch (a directory only root may enter is allowed, as with runc) and
    // before a filter that might not allow openat2.
    enter_cwd(p.cwd())?;
    let nnp = p.no_new_privileges().unwrap_or(false);
    // Without no_new_privileges, installing a filter needs CAP_SYS_ADMIN, which the user
    // switch may drop: install it first then (the profile must allow the setup syscalls that
    // follow, as with runc).
    if let (Some(profile), false) = (seccomp, nnp) {
        seccomp::install(profile)?;
    }
    let user = p.user();
    caps::drop_bounding(p.capabilities().as_ref())?;
    let gids: Vec<nix::unistd::Gid> = user
        .additional_gids()
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    if let Err(source) = nix::unistd::setgroups(&gids) {
        return Err(Error::Setgroups { gids, source });
    }
    // SAFETY: prctl with integer arguments; keeps the permitted set across the uid change.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let gid = nix::unistd::Gid::from_raw(user.gid());
    let uid = nix::unistd::Uid::from_raw(user.uid());
    own_stdio(uid)?;
    nix::unistd::setresgid(gid, gid, gid).map_err(|source| Error::Setgid { gid, source })?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|source| Error::Setuid { uid, source })?;
    caps::apply(p.capabilities().as_ref())?;
    if let Some(mask) = user.umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }
    if nnp {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(Error::NoNewPrivileges(std::io::Error::last_os_error()));
        }
    }
    let args = p.args().clone().unwrap_or_default();
    let arg0 = args.first().ok_or(Error::NoArgs)?;
    let env = p.env().clone().unwrap_or_default();
    let path = resolve(arg0, &env)?;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::Nul {
        what: "path",
        value: path.to_string_lossy().into_owned(),
    })?;
    let c_args = cstrings(&args, "argument")?;
    let c_env = cstrings(&env, "environment entry")?;
    if let (Some(profile), true) = (seccomp, nnp) {
        seccomp::install(profile)?;
    }
    let source = nix::unistd::execve(&c_path, &c_args, &c_env).unwrap_err();
    Err(Error::Exec { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(namespaces: serde_json::Value) -> Spec {
        serde_json::from_value(
            serde_json::json!({ "ociVersion": "1.0.2", "linux": { "namespaces": namespaces } }),
        )
        .unwrap()
    }

    #[test]
    fn a_cgroup_namespace_unless_the_spec_names_one_by_path() {
        assert!(private_cgroup_namespace(&spec_with(
            serde_json::json!([{ "type": "pid" }])
        )));
        assert!(private_cgroup_namespace(&spec_with(
            serde_json::json!([{ "type": "cgroup" }])
        )));
        assert!(!private_cgroup_namespace(&spec_with(
            serde_json::json!([{ "type": "cgroup", "path": "/proc/42/ns/cgroup" }])
        )));
        let no_linux: Spec =
            serde_json::from_value(serde_json::json!({ "ociVersion": "1.0.2" })).unwrap();
        assert!(private_cgroup_namespace(&no_linux));
    }
}
