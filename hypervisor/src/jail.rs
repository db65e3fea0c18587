//! The jail every VM-side host process runs in (Firecracker's jailer is the model): no host
//! root, no capabilities, `no_new_privs`, its own mount, IPC and UTS namespaces (and network
//! namespace where it needs no host network: taps arrive as fds), and a root directory that
//! holds only what it needs: the system's programs and libraries read-only, the VM's own
//! state directory, the kernel and initramfs read-only, and a `/dev` with `null`, `zero`,
//! `urandom` and, for KVM, a `kvm` node of its own.
//!
//! How it is applied: [`Jail::apply`] prepares every path and string in the parent, then
//! registers a `pre_exec` step that, between fork and exec, only makes system calls (no
//! allocation): unshare, make every mount private, mount a tmpfs on the (empty) jail
//! directory, build the root there, `pivot_root` into it, drop the old root, drop to the
//! sandbox's uid/gid (which clears every capability), set `no_new_privs`. The process then
//! execs its program inside the jail, as PID 1 of a PID namespace of its own: that takes
//! effect for children only, so the spawned process forks once more and stays behind as the
//! program's supervisor in the host's namespace (`supervise`; the backends report the
//! program's own PID, [`crate::process::Supervised::program_pid`]).
//!
//! Which uid: [`JailIds`] hands out one uid/gid pair per sandbox from a range no host user
//! has, and records it under `/run/husk/.jail-ids/` so two sandboxes never share one (a
//! jailed process could signal or ptrace another jail's processes of the same uid).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// The first uid (and gid) handed to jails: far above any login or system user.
pub(crate) const FIRST_JAIL_ID: u32 = 0x4855_0000; // "HU" << 16
/// How many ids the range holds.
pub(crate) const JAIL_ID_COUNT: u32 = 0x1_0000;

/// Who a VM's processes run as, and where their jail's root is mounted: what the caller of a
/// backend gives ([`crate::VmConfig::jail`]); the backend makes a [`Jail`] per process from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    pub uid: u32,
    pub gid: u32,
    /// An empty directory (the jail's tmpfs is mounted on it in the jail's namespace only).
    pub root: PathBuf,
}

impl JailSpec {
    /// The jail of one VM-side process that runs `program`, writes `state_dir` and reads
    /// `files`.
    pub(crate) fn for_process(
        &self,
        program: &Path,
        state_dir: &Path,
        files: &[&Path],
        kvm: bool,
    ) -> Jail {
        let mut ro_files = vec![program.to_path_buf()];
        ro_files.extend(files.iter().map(|f| f.to_path_buf()));
        Jail {
            uid: self.uid,
            gid: self.gid,
            root: self.root.clone(),
            rw_dirs: vec![state_dir.to_path_buf()],
            ro_files,
            kvm,
            new_net: true,
        }
    }
}

/// What one jailed process gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Jail {
    /// uid and gid the process runs as.
    pub uid: u32,
    pub gid: u32,
    /// The empty directory whose tmpfs becomes the jail's root (in the jail's mount
    /// namespace only).
    pub root: PathBuf,
    /// Directories the process may write (bound at the same path): the VM's state directory.
    pub rw_dirs: Vec<PathBuf>,
    /// Files it may read (bound read-only at the same path): kernel, initramfs, its program.
    pub ro_files: Vec<PathBuf>,
    /// Give it a `/dev/kvm` of its own (owned by `uid`).
    pub kvm: bool,
    /// Give it a network namespace of its own (no host network).
    pub new_net: bool,
}

/// One prepared step of the jail's set-up, all strings made in the parent.
#[derive(Debug)]
enum Op {
    Mkdir(CString, libc::mode_t),
    Touch(CString),
    Symlink(CString, CString),
    BindRo(CString, CString),
    BindRw(CString, CString),
    Mknod(CString, libc::dev_t),
}

/// The system directories a dynamically linked program needs (read-only): on a merged-/usr
/// system the others are symlinks into `/usr`, and are made as the same symlinks.
const SYSTEM_DIRS: &[&str] = &["/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc"];

fn c(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Config(format!("{}: a path with a NUL byte", p.display())))
}

impl Jail {
    /// The steps that build the root under [`Jail::root`].
    fn plan(&self) -> Result<Vec<Op>> {
        let mut ops = Vec::new();
        let mut made: Vec<PathBuf> = SYSTEM_DIRS
            .iter()
            .chain(&["/dev", "/tmp"])
            .map(PathBuf::from)
            .collect();
        let root = &self.root;
        let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
        let parents = |p: &Path, ops: &mut Vec<Op>, made: &mut Vec<PathBuf>| -> Result<()> {
            let mut acc = PathBuf::from("/");
            for comp in p.parent().unwrap_or(Path::new("/")).components().skip(1) {
                acc.push(comp);
                if !made.contains(&acc) {
                    made.push(acc.clone());
                    ops.push(Op::Mkdir(c(&inside(&acc))?, 0o755));
                }
            }
            Ok(())
        };
        for dir in SYSTEM_DIRS {
            let host = Path::new(dir);
            match std::fs::symlink_metadata(host) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(host)
                        .map_err(Error::io(format!("reading the link {dir}")))?;
                    ops.push(Op::Symlink(c(&target)?, c(&inside(host))?));
                }
                Ok(m) if m.is_dir() && *dir != "/etc" => {
                    ops.push(Op::Mkdir(c(&inside(host))?, 0o755));
                    ops.push(Op::BindRo(c(host)?, c(&inside(host))?));
                }
                _ => {}
            }
        }
        // /etc: only what the C library reads at start (no passwd, no shadow).
        ops.push(Op::Mkdir(c(&inside(Path::new("/etc")))?, 0o755));
        for f in ["/etc/ld.so.cache", "/etc/localtime"] {
            if Path::new(f).is_file() {
                ops.push(Op::Touch(c(&inside(Path::new(f)))?));
                ops.push(Op::BindRo(c(Path::new(f))?, c(&inside(Path::new(f)))?));
            }
        }
        ops.push(Op::Mkdir(c(&inside(Path::new("/dev")))?, 0o755));
        for dev in ["/dev/null", "/dev/zero", "/dev/urandom"] {
            ops.push(Op::Touch(c(&inside(Path::new(dev)))?));
            ops.push(Op::BindRw(c(Path::new(dev))?, c(&inside(Path::new(dev)))?));
        }
        if self.kvm {
            ops.push(Op::Mknod(
                c(&inside(Path::new("/dev/kvm")))?,
                libc::makedev(10, 232),
            ));
        }
        ops.push(Op::Mkdir(c(&inside(Path::new("/tmp")))?, 0o1777));
        for d in &self.rw_dirs {
            parents(d, &mut ops, &mut made)?;
            ops.push(Op::Mkdir(c(&inside(d))?, 0o700));
            ops.push(Op::BindRw(c(d)?, c(&inside(d))?));
        }
        for f in &self.ro_files {
            if SYSTEM_DIRS.iter().any(|s| f.starts_with(s)) {
                continue; // already there, read-only
            }
            parents(f, &mut ops, &mut made)?;
            ops.push(Op::Touch(c(&inside(f))?));
            ops.push(Op::BindRo(c(f)?, c(&inside(f))?));
        }
        Ok(ops)
    }

    /// Makes `cmd` run in this jail. Call it before any other `pre_exec` step that must run
    /// inside the jail (the parent-death signal is cleared by the uid change, so it must be
    /// set after: [`crate::process::Supervised::spawn`] does).
    pub fn apply(&self, cmd: &mut Command) -> Result<()> {
        if !self.root.is_dir() {
            return Err(Error::Config(format!(
                "jail root {}: not a directory — create it (empty) before starting the VM",
                self.root.display()
            )));
        }
        let ops = self.plan()?;
        let root = c(&self.root)?;
        let (uid, gid) = (self.uid, self.gid);
        // The thread that will spawn the command (`apply` is called on it, as every caller
        // does right before `Supervised::spawn`): the jailed program dies with it.
        // SAFETY: gettid(2) has no arguments and cannot fail.
        let spawner = unsafe { libc::gettid() };
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if self.new_net {
            flags |= libc::CLONE_NEWNET;
        }
        // SAFETY: the closure runs in the child between fork and exec. It only makes system
        // calls on strings prepared above (owned by the closure, alive until exec) and
        // allocates nothing; every failure returns the OS error, which fails the spawn.
        unsafe {
            cmd.pre_exec(move || {
                fn ok(r: libc::c_int) -> std::io::Result<()> {
                    if r < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                }
                let null = std::ptr::null::<libc::c_char>();
                ok(libc::unshare(flags))?;
                ok(libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                ok(libc::mount(
                    c"tmpfs".as_ptr(),
                    root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID,
                    c"mode=0755,size=1m".as_ptr().cast(),
                ))?;
                for op in &ops {
                    match op {
                        Op::Mkdir(p, mode) => match libc::mkdir(p.as_ptr(), *mode) {
                            0 => {}
                            _ if *libc::__errno_location() == libc::EEXIST => {}
                            _ => return Err(std::io::Error::last_os_error()),
                        },
                        Op::Touch(p) => {
                            let fd = libc::open(
                                p.as_ptr(),
                                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                                0o600,
                            );
                            ok(fd)?;
                            libc::close(fd);
                        }
                        Op::Symlink(target, p) => ok(libc::symlink(target.as_ptr(), p.as_ptr()))?,
                        Op::BindRo(src, dst) | Op::BindRw(src, dst) => {
                            ok(libc::mount(
                                src.as_ptr(),
                                dst.as_ptr(),
                                null,
                                libc::MS_BIND | libc::MS_REC,
                                std::ptr::null(),
                            ))?;
                            let mut remount = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
                            if matches!(op, Op::BindRo(..)) {
                                remount |= libc::MS_RDONLY | libc::MS_NODEV;
                            }
                            ok(libc::mount(
                                null,
                                dst.as_ptr(),
                                null,
                                remount,
                                std::ptr::null(),
                            ))?;
                        }
                        Op::Mknod(p, dev) => {
                            ok(libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o600, *dev))?;
                            ok(libc::chown(p.as_ptr(), uid, gid))?;
                        }
                    }
                }
                // The tmpfs itself read-only from now on (only the binds inside stay writable).
                ok(libc::mount(
                    null,
                    root.as_ptr(),
                    null,
                    libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                    std::ptr::null(),
                ))?;
                ok(libc::chdir(root.as_ptr()))?;
                // pivot_root returns 0 or -1: the sign is all that matters.
                ok(
                    libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()).signum()
                        as libc::c_int,
                )?;
                ok(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
                ok(libc::chdir(c"/".as_ptr()))?;
                // A PID namespace of its own: it takes effect for children only, so fork; the
                // child (PID 1 there) goes on to exec the program, this process stays as its
                // supervisor (see `supervise`) and never returns.
                ok(libc::unshare(libc::CLONE_NEWPID))?;
                let child = libc::fork();
                ok(child)?;
                let drop_privileges = || -> std::io::Result<()> {
                    ok(libc::setgroups(0, std::ptr::null()))?;
                    ok(libc::setresgid(gid, gid, gid))?;
                    ok(libc::setresuid(uid, uid, uid))?;
                    ok(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
                };
                if child > 0 {
                    supervise(child, spawner, &drop_privileges);
                }
                drop_privileges()?;
                Ok(())
            });
        }
        Ok(())
    }
}

/// The PID of the jailed program, for signal forwarding in its supervisor.
static JAILED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    // SAFETY: kill(2) is async-signal-safe; JAILED is set before the handler is installed.
    unsafe { libc::kill(JAILED.load(std::sync::atomic::Ordering::Relaxed), sig) };
}

/// The jailed program's supervisor, between fork and exec's other side: the process the
/// backend spawned (and signals, and waits for) stays in the host's PID namespace as the
/// parent of the program, which is PID 1 in a namespace of its own. It closes every
/// descriptor it inherited (it must not hold a fifo or a socket of the shim open), drops to
/// the jail's uid too, dies with its parent, forwards the termination signals, and ends as
/// the program ended (same exit code, or the same signal). Only async-signal-safe calls: it
/// is a fork of a multi-threaded process. Never returns.
///
/// `spawner` is the thread of the parent process that spawned the jail (the parent-death
/// signal's "parent" is that thread, not the process).
///
/// # Safety
/// Only to be called in a freshly forked child, before exec.
unsafe fn supervise(
    child: libc::pid_t,
    spawner: libc::pid_t,
    drop_privileges: &dyn Fn() -> std::io::Result<()>,
) -> ! {
    // SAFETY: plain system calls on this process's own state (the whole block); the
    // sigaction struct is zeroed, then given a valid handler.
    unsafe {
        let parent = libc::getppid();
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        if drop_privileges().is_err() {
            libc::kill(child, libc::SIGKILL);
        }
        // After the uid change, which clears the parent-death signal (set before it, it was
        // gone: a killed shim left its jailed helpers running). A parent that died before the
        // prctl is seen as a changed parent PID; a spawning thread that ended before it while
        // its process lives (the signal is tied to the thread) as that thread gone (tgkill
        // with no signal: ESRCH; EPERM, from our new uid, means it is there). The jail's setup
        // before this takes milliseconds: a thread ending right after the spawn (a test's)
        // fell in that window under load.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        let spawner_gone = libc::syscall(libc::SYS_tgkill, parent, spawner, 0) != 0
            && *libc::__errno_location() == libc::ESRCH;
        if libc::getppid() != parent || spawner_gone {
            libc::kill(child, libc::SIGKILL);
            libc::_exit(128 + libc::SIGKILL);
        }
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        JAILED.store(child, std::sync::atomic::Ordering::Relaxed);
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGCONT,
        ] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
        // The mask is the spawning thread's (a pool keeper's blocks SIGTERM and SIGINT), and
        // a blocked signal would never be forwarded; unblocked only now that the handlers
        // are there. (The program's own is emptied in `Supervised::spawn`.)
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        let mut status = 0;
        while libc::waitpid(child, &mut status, 0) < 0 {
            if *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}

/// Hands the unix socket `path` (made by a helper that runs as root) to the jail's uid, so
/// the jailed VMM can connect to it. Refuses a symlink.
pub(crate) fn give_socket(path: &Path, jail: &JailSpec) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(jail.uid), Some(jail.gid)).map_err(Error::io(format!(
        "giving {} to the jail's uid {}",
        path.display(),
        jail.uid
    )))
}

/// The per-sandbox uid/gid records under `<state_root>/.jail-ids/<id>` (each holds the
/// sandbox id that owns it).
#[derive(Debug, Clone)]
pub struct JailIds {
    dir: PathBuf,
}

impl JailIds {
    pub fn new(state_root: &Path) -> Self {
        Self {
            dir: state_root.join(".jail-ids"),
        }
    }

    /// A free id for `sandbox`, claimed with an exclusive create; the same sandbox asking
    /// again gets the id it has.
    pub fn claim(&self, sandbox: &str) -> Result<u32> {
        use std::io::Write;
        std::fs::create_dir_all(&self.dir)
            .map_err(Error::io(format!("creating {}", self.dir.display())))?;
        if let Some(id) = self.of(sandbox) {
            return Ok(id);
        }
        let start = sandbox
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
            % JAIL_ID_COUNT;
        let create = |id: u32| {
            let open = || {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(self.dir.join(id.to_string()))
            };
            match open() {
                // The last release removed the directory after our create_dir_all.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&self.dir)?;
                    open()
                }
                r => r,
            }
        };
        for i in 0..JAIL_ID_COUNT {
            let id = FIRST_JAIL_ID + (start + i) % JAIL_ID_COUNT;
            match create(id) {
                Ok(mut f) => {
                    f.write_all(sandbox.as_bytes())
                        .map_err(Error::io(format!("writing {}", self.dir.display())))?;
                    return Ok(id);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(Error::io(format!(
                        "claiming a jail id in {}",
                        self.dir.display()
                    ))(e))
                }
            }
        }
        Err(Error::Config(format!(
            "{}: all {JAIL_ID_COUNT} jail ids are taken — remove the records of sandboxes that are gone",
            self.dir.display()
        )))
    }

    /// The id `sandbox` holds, if any.
    pub fn of(&self, sandbox: &str) -> Option<u32> {
        std::fs::read_dir(&self.dir).ok()?.flatten().find_map(|e| {
            let owner = std::fs::read(e.path()).ok()?;
            (owner == sandbox.as_bytes())
                .then(|| e.file_name().to_str()?.parse().ok())
                .flatten()
        })
    }

    /// Moves the id `from` holds to `to` (a pooled VM's id to the sandbox that claimed it):
    /// the record is rewritten whole (a new file renamed over it), so a reader sees one owner
    /// or the other, never none.
    pub fn rename(&self, from: &str, to: &str) -> Result<u32> {
        let id = self.of(from).ok_or_else(|| {
            Error::Config(format!(
                "{}: no jail id is recorded for {from}",
                self.dir.display()
            ))
        })?;
        let tmp = self.dir.join(format!("{id}.new"));
        std::fs::write(&tmp, to.as_bytes())
            .map_err(Error::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, self.dir.join(id.to_string()))
            .map_err(Error::io(format!("renaming {}", tmp.display())))?;
        Ok(id)
    }

    /// Gives back the id `sandbox` holds, and the directory with the last one. Idempotent.
    pub fn release(&self, sandbox: &str) {
        if let Some(id) = self.of(sandbox) {
            let _ = std::fs::remove_file(self.dir.join(id.to_string()));
        }
        // Fails while another id is held; a claim racing with it makes the directory again.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_per_sandbox_and_released() {
        let d = tempfile::tempdir().unwrap();
        let ids = JailIds::new(d.path());
        let a = ids.claim("a").unwrap();
        let b = ids.claim("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(ids.claim("a").unwrap(), a, "a sandbox keeps its id");
        assert_eq!(
            ids.rename("a", "c").unwrap(),
            a,
            "a claimed VM's id moves to its sandbox"
        );
        assert_eq!(ids.of("c"), Some(a));
        assert_eq!(ids.of("a"), None);
        assert!(
            ids.rename("a", "d").is_err(),
            "nothing is recorded for a any more"
        );
        ids.release("c");
        assert_eq!(ids.of("c"), None);
        let a = ids.claim("a").unwrap();
        assert!((FIRST_JAIL_ID..FIRST_JAIL_ID + JAIL_ID_COUNT).contains(&a));
        ids.release("a");
        assert_eq!(ids.of("a"), None);
        assert_eq!(ids.of("b"), Some(b));
        // The last release takes the directory with it; a claim makes it again.
        assert!(ids.dir.exists());
        ids.release("b");
        assert!(!ids.dir.exists(), "an empty .jail-ids is left behind");
        assert!(ids.claim("e").is_ok());
    }

    /// A jail of uid and gid `id` in a scratch directory, with an empty root and one
    /// writable state directory (returned) that `id` owns. Needs root.
    fn jail_with_state(id: u32) -> (tempfile::TempDir, Jail, std::path::PathBuf) {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test builds a jail: run it as root (cargo xtask test)"
        );
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("jail");
        let state = d.path().join("state");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::os::unix::fs::chown(&state, Some(id), Some(id)).unwrap();
        let jail = Jail {
            uid: id,
            gid: id,
            root,
            rw_dirs: vec![state.clone()],
            ro_files: vec![],
            kvm: false,
            new_net: true,
        };
        (d, jail, state)
    }

    /// A jailed `sh` sees only its root, runs as the jail's uid with no capabilities and
    /// no_new_privs, in its own mount and network namespaces, and cannot write the system.
    #[test]
    fn a_jailed_process_has_no_root_and_sees_only_its_files() {
        let (d, jail, state) = jail_with_state(FIRST_JAIL_ID);
        let secret = d.path().join("secret");
        std::fs::write(&secret, "host").unwrap();
        let script = format!(
            "grep -E '^(Uid|CapEff|NoNewPrivs)' /proc/self/status 2>/dev/null; \
             id -u; echo ok > {s}/w && echo wrote; \
             test -e {secret} && echo SEES-SECRET; test -e /root && echo SEES-ROOT; \
             touch /usr/x 2>/dev/null && echo WROTE-USR; ls /dev; \
             echo pid=$$; echo end",
            s = state.display(),
            secret = secret.display()
        );
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", &script]);
        jail.apply(&mut cmd).unwrap();
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(&format!("{FIRST_JAIL_ID}\n")), "{text}");
        assert!(text.contains("wrote"), "{text}");
        assert!(
            text.contains("pid=1\n"),
            "not PID 1 of a namespace of its own: {text}"
        );
        assert!(!text.contains("SEES-"), "{text}");
        assert!(!text.contains("WROTE-USR"), "{text}");
        assert!(
            text.contains("null") && !text.contains("kvm") && !text.contains("sda"),
            "{text}"
        );
        assert_eq!(std::fs::read_to_string(state.join("w")).unwrap(), "ok\n");
        let owner =
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(state.join("w")).unwrap());
        assert_eq!(owner, FIRST_JAIL_ID);
    }

    /// A jailed program dies with the thread that started it (the shim's VM thread), as an
    /// unjailed one does: its supervisor keeps its parent-death signal across the uid change.
    #[test]
    fn a_jailed_program_dies_with_the_thread_that_started_it() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test builds a jail: run it as root (cargo xtask test)"
        );
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("jail");
        std::fs::create_dir_all(&root).unwrap();
        let jail = Jail {
            uid: FIRST_JAIL_ID + 1,
            gid: FIRST_JAIL_ID + 1,
            root,
            rw_dirs: vec![],
            ro_files: vec![],
            kvm: false,
            new_net: true,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut cmd = Command::new("/bin/sleep");
            cmd.arg("1000");
            jail.apply(&mut cmd).unwrap();
            let p = crate::process::Supervised::spawn("sleep", cmd).unwrap();
            // The supervisor, then the program under it, once it has forked.
            let program = loop {
                let pid = p.program_pid();
                if pid != p.pid() {
                    break pid;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            };
            tx.send((p, program)).unwrap();
            // The thread ends here: both must die.
        })
        .join()
        .unwrap();
        let (mut p, program) = rx.recv().unwrap();
        let status = p
            .wait(Some(std::time::Duration::from_secs(20)))
            .unwrap()
            .expect("the supervisor outlived the thread that started it");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::path::Path::new(&format!("/proc/{program}")).exists() {
            let stat = std::fs::read_to_string(format!("/proc/{program}/stat")).unwrap_or_default();
            if stat.contains(") Z") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the jailed program {program} outlived its supervisor"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn a_sigterm_reaches_the_jailed_program_whatever_its_spawner_blocked() {
        let (_d, jail, state) = jail_with_state(FIRST_JAIL_ID + 2);
        let ready = state.join("trapped");
        let script = format!(
            "trap 'exit 7' TERM; : > {}; while :; do sleep 0.05; done",
            ready.display()
        );
        // Spawned by a thread that blocks SIGTERM, as a pool keeper's threads do (and that
        // lives on: the jail dies with the thread that started it).
        let status = std::thread::spawn(move || {
            let mut term = nix::sys::signal::SigSet::empty();
            term.add(nix::sys::signal::Signal::SIGTERM);
            term.thread_block().unwrap();
            let mut cmd = Command::new("/bin/sh");
            cmd.args(["-c", &script]);
            jail.apply(&mut cmd).unwrap();
            let mut p = crate::process::Supervised::spawn("sh", cmd).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !ready.exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the program never set its trap"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            p.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
            let status = p.wait(Some(std::time::Duration::from_secs(10))).unwrap();
            let _ = p.kill();
            status
        })
        .join()
        .unwrap();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(7),
            "the SIGTERM was not forwarded (or not taken) by the supervisor"
        );
    }
}
