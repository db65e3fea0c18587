//! The warm pool: VMs booted to their agent's ready line before any sandbox asks, each handed
//! whole to exactly one new sandbox, which then skips the boot (issue #17; Kata's VM cache is
//! the model, but a guest is never reused: a claimed VM is never given back).
//!
//! Three kinds of process:
//! - the **holder** (`containerd-shim-husk-v2 pool`, [`holder`]): keeps `[pool] size` VMs of
//!   the default shape booted, answers claims and status on `<state_root>/.pool/pool.sock`
//!   (0600, requests bounded by [`wire::MAX_LINE`]), logs each boot, claim and death to
//!   `.pool/pool.log`. The first shim that finds `[pool]` configured and no holder starts one
//!   (`pool start`: detached, its own session; the lock `.pool/holder.lock` lets only one
//!   live), or an admin runs it (`cargo xtask install` does not, the DaemonSet may).
//! - a **keeper** per VM (`containerd-shim-husk-v2 pool-keeper`, [`keeper`]): starts the VM
//!   through the same [`husk_hypervisor::Hypervisor`] a cold sandbox uses, so QEMU / husk-vmm
//!   and its helpers are the keeper's children and keep their `PR_SET_PDEATHSIG` to it. It
//!   holds a pidfd of its **owner** — the holder, then the claiming shim — and when the owner
//!   dies it kills the VM and removes what the VM left. That is what lets ownership move:
//!   PDEATHSIG ties a process to its parent *thread*, which can never change, so the VM's
//!   parent must be a process that stays (the keeper) and ownership a pidfd that can be
//!   swapped. Unclaimed VMs thus die with the holder; a claimed one does not (its pod runs
//!   on) but dies with its shim.
//! - the **claiming shim** ([`client`]): asks for a VM of its exact [`Shape`]; the holder
//!   takes a ready one out of the pool (one VM, one claimer: under the holder's lock, never
//!   returned), hands the keeper over to the shim's pid, renames the VM's directory
//!   `.pool/<vmid>/` to `<state_root>/<sid>/` (`RENAME_NOREPLACE`, same file system: no
//!   symlink, nothing a guest can touch), moves the jail id's record to the sandbox, and
//!   passes the keeper's control connection to the shim (`SCM_RIGHTS`). The shim then drives
//!   the VM through [`client::KeptVm`], a [`husk_hypervisor::Vm`] like any other.
//!
//! The state directory of a pooled VM is laid out as a sandbox's ([`crate::sandbox_dir`]);
//! its mounts move with the rename, and `shared/` keeps propagating mounts made later under
//! `mounts/` (the jailed processes and virtiofsd hold their views through their own mount
//! namespaces, which the rename does not touch).
//!
//! NIC: each keeper lives in a network namespace of its own, where its VM's tap waits; on claim
//! the shim moves the tap into the pod's netns and mirrors it to the veth, and the agent gives
//! the guest NIC the veth's MAC (`crate::network::Network::setup_pooled`).
//!
//! Not pooled (they boot cold, as before, and the shim logs why): a pod with more CNI
//! interfaces than a pooled VM has NICs ([`POOL_NICS`]), pod limits or sizing annotations that change the
//! VM's size, a debug console, or any other configuration than the holder's.

pub mod client;
pub mod holder;
pub mod keeper;
pub mod priority;
pub mod wire;

use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// The pool's directory under the state root. The leading dot keeps it apart from sandbox
/// ids: containerd's ids start with a letter or digit, so no sandbox can be called this.
pub const POOL_DIR: &str = ".pool";

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another pool holder runs for {0} (it holds the lock) — use it, or stop it first")]
    Running(PathBuf),
    #[error("no pool holder answers at {socket}: {source} — start one with `containerd-shim-husk-v2 pool start`, or set [pool] size in the configuration so a shim starts it")]
    NotRunning {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PoolError {
    let path = path.to_path_buf();
    move |source| PoolError::Io { what, path, source }
}

/// Where the pool's files live.
#[derive(Debug, Clone)]
pub struct PoolPaths {
    /// `<state_root>/.pool/`, root-only.
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub lock: PathBuf,
    pub log: PathBuf,
}

impl PoolPaths {
    pub fn new(state_root: &Path) -> Self {
        let dir = state_root.join(POOL_DIR);
        Self {
            socket: dir.join("pool.sock"),
            lock: dir.join("holder.lock"),
            log: dir.join("pool.log"),
            dir,
        }
    }

    /// What a holder that ends leaves: nothing. Its socket first (no client reaches a holder
    /// that is gone), then its logs, then the lock file — the last, so that a holder starting
    /// meanwhile, which must first take the lock on a new file, never loses what it made —
    /// then the directory, unless a keeper's VM directory is still on its way out.
    pub fn remove(&self) {
        let logs = [self.log.clone(), self.log.with_extension("log.1")];
        for f in [&self.socket].into_iter().chain(&logs).chain([&self.lock]) {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }

    /// Takes the holder's lock, or says that a live holder has it ([`PoolError::Running`]).
    /// If the lock file was removed between opening and locking it (by a holder ending, or by
    /// the last keeper of a killed one: [`PoolPaths::remove_abandoned`]), the lock is taken
    /// again on the file that is there now, so that two holders never lock different files.
    ///
    /// `.pool/` is root's alone (0700) and no guest's share lies in it but inside a VM's
    /// own directory; the lock file is still never followed if it is a symlink.
    pub fn lock_holder(&self) -> Result<Flock<std::fs::File>, PoolError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            // Made again if the last keeper of an ended holder removed it meanwhile.
            self.create()?;
            let file = match std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&self.lock)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("opening", &self.lock)(e)),
            };
            let locked = Flock::lock(file, FlockArg::LockExclusiveNonblock)
                .map_err(|_| PoolError::Running(self.dir.clone()))?;
            let still_there = match (locked.metadata(), std::fs::symlink_metadata(&self.lock)) {
                (Ok(ours), Ok(now)) => (ours.dev(), ours.ino()) == (now.dev(), now.ino()),
                _ => false,
            };
            if still_there {
                return Ok(locked);
            }
        }
        Err(io("locking", &self.lock)(std::io::Error::other(format!(
            "removed or replaced while it was being locked, {ATTEMPTS} times"
        ))))
    }

    /// What a holder that was killed (SIGKILL, the OOM killer) left, since it could not
    /// [`remove`](PoolPaths::remove) it itself: if no holder holds the lock, its socket, logs
    /// and lock file go, under the lock (a holder starting meanwhile locks the file it makes
    /// anew: [`PoolPaths::lock_holder`]), and the directory if nothing else is in it. With a
    /// live holder, only an empty directory goes. Each keeper calls it as it cleans up, so the
    /// last VM of a killed holder takes the holder's files with it.
    pub fn remove_abandoned(&self) {
        use std::os::unix::fs::OpenOptionsExt;
        let free = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.lock)
            .ok()
            .and_then(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock).ok());
        match free {
            Some(_held) => self.remove(),
            None => {
                let _ = std::fs::remove_dir(&self.dir);
            }
        }
    }

    /// Creates the directory (0700) if needed.
    pub fn create(&self) -> Result<(), PoolError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io("creating", &self.dir))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("making root-only", &self.dir))
    }

    /// A pooled VM's directory.
    pub fn vm_dir(&self, vmid: &str) -> PathBuf {
        self.dir.join(vmid)
    }
}

/// The owner name a pooled VM's jail id is recorded under until it is claimed.
pub fn jail_owner(vmid: &str) -> String {
    format!("{POOL_DIR}/{vmid}")
}

/// Everything that makes two VMs interchangeable for a sandbox: a VM is claimed only by a
/// sandbox whose shape is equal, field by field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    pub backend: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel_params: String,
    pub jail: bool,
    pub programs: [Option<PathBuf>; 4],
    /// Network devices: a sandbox's, or as many as a pooled VM has ([`POOL_NICS`]).
    pub nics: u32,
}

/// The NICs of a pooled VM: one, the tap in its keeper's network namespace until a pod with a
/// CNI interface claims it (a pod with none leaves it down; a pod with more boots cold).
pub const POOL_NICS: u32 = 1;

impl Shape {
    /// The shape a sandbox of `config` with this size and these NICs gets; `Err`: a sandbox
    /// of this configuration is never pooled (why, for the log).
    pub fn of(config: &Config, vcpus: u32, memory_mib: u32, nics: u32) -> Result<Self, String> {
        if config.debug_console {
            return Err("debug_console is on (pooled VMs boot without it)".into());
        }
        let programs = config.programs().map_err(|e| e.to_string())?;
        let backend = crate::sandbox::backend(config, &programs)
            .map_err(|e| crate::error::chain(&e))?
            .name();
        Ok(Self {
            backend,
            kernel: config.kernel.clone(),
            initramfs: config.initramfs.clone(),
            vcpus,
            memory_mib,
            kernel_params: config.kernel_params.trim().to_string(),
            jail: config.jail,
            programs: [
                programs.qemu,
                programs.husk_vmm,
                programs.virtiofsd,
                programs.vhost_vsock,
            ],
            nics,
        })
    }

    /// The shape the holder boots: the configured base size, [`POOL_NICS`] NICs.
    pub fn default_of(config: &Config) -> Result<Self, String> {
        let (vcpus, memory_mib) = crate::sandbox::size_for(config, &serde_json::json!({}))?;
        Self::of(config, vcpus, memory_mib, POOL_NICS)
    }

    /// Whether a VM of this shape serves a sandbox that wants `want`: every field equal, and
    /// no more NICs wanted than there are.
    pub fn fits(&self, want: &Shape) -> bool {
        want.nics <= self.nics
            && Shape {
                nics: self.nics,
                ..want.clone()
            } == *self
    }
}

/// The link of `/proc/self/exe` marks a program file that was replaced (an upgrade) or
/// removed since the process started.
const DELETED: &str = " (deleted)";

/// This program's path as installed now: after an upgrade replaced the file, the new one at the
/// same path (the holder a shim starts is the installed version).
pub fn program_path() -> std::io::Result<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let s = exe.to_string_lossy();
    Ok(match s.strip_suffix(DELETED) {
        Some(p) => PathBuf::from(p),
        None => exe,
    })
}

/// Whether this process's program file was replaced or removed since it started.
pub fn program_replaced() -> bool {
    std::fs::read_link("/proc/self/exe").is_ok_and(|e| e.to_string_lossy().ends_with(DELETED))
}

fn usage() -> String {
    "usage: containerd-shim-husk-v2 pool [run|start|status] [--config FILE]\n  run     the pool holder, in the foreground (for a DaemonSet or a service manager)\n  start   the holder, detached (what a shim does when it finds none); returns at once\n  status  what the running holder holds".into()
}

/// `containerd-shim-husk-v2 pool …`. Returns the exit code.
pub fn main(args: &[std::ffi::OsString]) -> i32 {
    let mut cmd = "run".to_string();
    let mut config_path = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--config") => match it.next() {
                Some(p) => config_path = Some(PathBuf::from(p)),
                None => {
                    eprintln!("--config needs a file\n{}", usage());
                    return 2;
                }
            },
            Some(c @ ("run" | "start" | "status")) => cmd = c.to_string(),
            _ => {
                eprintln!("{:?}: unknown\n{}", a, usage());
                return 2;
            }
        }
    }
    let config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2 pool: {e}");
            return 1;
        }
    };
    let result = match cmd.as_str() {
        "start" => client::start_holder(&config).map(|()| 0),
        "status" => client::status(&config).map(|s| {
            println!("{s}");
            0
        }),
        _ => holder::run(config).map(|()| 0),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2 pool {cmd}: {e}");
            1
        }
    }
}

/// A minimal logger for the pool's processes: one line per record on stderr (the holder
/// points it at `pool.log`), with the time and the process.
#[derive(Debug)]
struct StderrLog {
    level: log::LevelFilter,
    who: String,
}

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            // One write per line: the holder and its keepers share the log file.
            let line = format!(
                "{}.{:03} {} {} {}\n",
                now.as_secs(),
                now.subsec_millis(),
                r.level(),
                self.who,
                r.args()
            );
            use std::io::Write;
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }
    fn flush(&self) {}
}

fn init_log(config: &Config, who: String) {
    let level = config.log_level.parse().unwrap_or(log::LevelFilter::Info);
    if log::set_boxed_logger(Box::new(StderrLog { level, who })).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A TCG configuration whose QEMU is named, so that a shape resolves on a host without
    /// QEMU installed (`cargo xtask check` runs unit tests before `setup`). Nothing runs it.
    pub(crate) fn tcg_config() -> Config {
        Config {
            backend: crate::config::Backend::QemuTcg,
            qemu_path: PathBuf::from("/bin/sh"),
            ..Config::default()
        }
    }

    #[test]
    fn shapes_differ_by_any_field_and_a_debug_console_is_never_pooled() {
        let c = tcg_config();
        let a = Shape::of(&c, 1, 256, 0).unwrap();
        let pooled = Shape::default_of(&c).unwrap();
        assert!(
            pooled.fits(&a),
            "a sandbox without a network fits a pooled VM"
        );
        assert!(pooled.fits(&Shape::of(&c, 1, 256, POOL_NICS).unwrap()));
        assert!(
            !pooled.fits(&Shape::of(&c, 1, 256, POOL_NICS + 1).unwrap()),
            "more NICs than the pooled VM has"
        );
        assert!(!pooled.fits(&Shape::of(&c, 1, 512, 0).unwrap()));
        assert!(!pooled.fits(&Shape::of(&c, 2, 256, 0).unwrap()));
        assert_ne!(a, Shape::of(&c, 1, 512, 0).unwrap());
        assert_ne!(a, Shape::of(&c, 2, 256, 0).unwrap());
        assert_ne!(a, Shape::of(&c, 1, 256, 1).unwrap());
        let other = Config {
            kernel_params: "loglevel=7".into(),
            ..c.clone()
        };
        assert_ne!(a, Shape::of(&other, 1, 256, 0).unwrap());
        let unjailed = Config {
            jail: false,
            ..c.clone()
        };
        assert_ne!(a, Shape::of(&unjailed, 1, 256, 0).unwrap());
        let debug = Config {
            debug_console: true,
            ..c
        };
        let e = Shape::of(&debug, 1, 256, 0).unwrap_err();
        assert!(e.contains("debug_console"), "{e}");
    }

    #[test]
    fn the_pool_lives_apart_from_every_sandbox_id() {
        let p = PoolPaths::new(Path::new("/run/husk"));
        assert_eq!(p.socket, Path::new("/run/husk/.pool/pool.sock"));
        assert!(POOL_DIR.starts_with('.'));
        assert_eq!(jail_owner("vm-1"), ".pool/vm-1");
    }

    /// What a killed holder leaves: its lock file, socket and log.
    pub(super) fn killed_holders_files(p: &PoolPaths) {
        let lock = p.lock_holder().unwrap();
        std::fs::write(&p.socket, "").unwrap();
        std::fs::write(&p.log, "lines\n").unwrap();
        std::fs::write(p.log.with_extension("log.1"), "older lines\n").unwrap();
        drop(lock);
    }

    #[test]
    fn a_killed_holders_files_go_with_the_last_keeper_and_only_then() {
        let root = tempfile::tempdir().unwrap();
        let p = PoolPaths::new(root.path());
        killed_holders_files(&p);
        // A keeper's VM directory is still there: the holder's files go, the directory stays.
        let vm = p.vm_dir("vm-1");
        std::fs::create_dir(&vm).unwrap();
        p.remove_abandoned();
        assert!(!p.socket.exists() && !p.log.exists() && !p.lock.exists());
        assert!(!p.log.with_extension("log.1").exists());
        assert!(p.dir.exists());
        // The last keeper: nothing is left.
        std::fs::remove_dir(&vm).unwrap();
        p.remove_abandoned();
        assert!(!p.dir.exists());
    }

    #[test]
    fn a_symlink_in_place_of_the_lock_file_is_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let p = PoolPaths::new(root.path());
        p.create().unwrap();
        let target = root.path().join("elsewhere");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, &p.lock).unwrap();
        assert!(p.lock_holder().is_err(), "locked through a symlink");
        p.remove_abandoned();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert!(std::fs::symlink_metadata(&p.lock).unwrap().is_symlink());
    }

    #[test]
    fn a_live_holders_files_are_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let p = PoolPaths::new(root.path());
        let held = p.lock_holder().unwrap();
        std::fs::write(&p.socket, "").unwrap();
        p.remove_abandoned();
        assert!(p.socket.exists() && p.lock.exists());
        assert!(matches!(p.lock_holder(), Err(PoolError::Running(_))));
        drop(held);
        // Its successor, after a keeper took the dead one's files, locks a file of its own.
        p.remove_abandoned();
        let next = p.lock_holder().unwrap();
        use std::os::unix::fs::MetadataExt;
        let (ours, there) = (
            next.metadata().unwrap(),
            std::fs::metadata(&p.lock).unwrap(),
        );
        assert_eq!((ours.dev(), ours.ino()), (there.dev(), there.ino()));
    }
}
