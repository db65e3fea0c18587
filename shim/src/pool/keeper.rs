//! `containerd-shim-husk-v2 pool-keeper`: the process one pooled VM lives under.
//!
//! The holder starts it with one end of a socketpair as stdin: its control connection. The
//! keeper creates the VM's directory (`.pool/<vmid>/`, laid out like a sandbox's), starts the
//! VM on its main thread (so QEMU / husk-vmm and the helpers, tied to that thread by
//! `PR_SET_PDEATHSIG`, die with the keeper and only with it), waits for the agent's ready
//! line and says so on the connection; a holder that dies meanwhile ends the boot at once
//! (the VM is killed, everything removed). From then on it sleeps on three things: a pidfd of
//! its owner, the connection, and the VM's exit descriptor (`Vm::exit_fd`).
//! - The owner dies (the holder, or later the claiming shim): the VM is killed, the VM's
//!   directory (wherever it was renamed to, if it is still the same directory) and the jail
//!   id's record are removed, the keeper exits.
//! - A request: `handover` (from the holder: the owner becomes the claiming shim's pid),
//!   then from the shim `agent_connection` (once: the agent connection the keeper opened
//!   while the VM waited, passed over), `status`, `pause`, `resume`, `stop`, `kill`, `exit`
//!   ([`super::wire::KeeperRequest`]). `exit`, or the connection closing while the owner
//!   lives, ends the VM and the keeper but leaves the directory: a living owner cleans up
//!   its own sandbox, as it does for a cold VM.
//! - The VM ends by itself while unclaimed, or is stopped because a device helper of it
//!   ended: the keeper cleans up and exits (the holder boots another). While claimed it
//!   stays, to report the exit status to its shim.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_hypervisor::process::{pidfd_open, readable};
use husk_hypervisor::{Vm, VmConfig};

use super::wire::{self, KeeperEvent, KeeperReply, KeeperRequest};
use super::{PoolError, PoolPaths};
use crate::config::Config;
use crate::sandbox_dir::SandboxDir;

/// How often a pooled VM is looked at where its backend gives no exit descriptor.
const POOLED_VM_LOOK: Duration = Duration::from_millis(200);

/// The keeper's arguments.
#[derive(Debug)]
struct Args {
    config: Option<PathBuf>,
    vmid: String,
    holder: u32,
}

fn parse(args: &[std::ffi::OsString]) -> Result<Args, String> {
    let mut config = None;
    let mut vmid = None;
    let mut holder = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .and_then(|v| v.to_str())
                .map(str::to_string)
                .ok_or_else(|| format!("{a:?} needs a value"))
        };
        match a.to_str() {
            Some("--config") => config = Some(PathBuf::from(value()?)),
            Some("--vmid") => vmid = Some(value()?),
            Some("--holder") => {
                holder = Some(value()?.parse().map_err(|e| format!("--holder: {e}"))?)
            }
            _ => return Err(format!("{a:?}: unknown argument")),
        }
    }
    Ok(Args {
        config,
        vmid: vmid.ok_or("--vmid is missing")?,
        holder: holder.ok_or("--holder is missing")?,
    })
}

/// `containerd-shim-husk-v2 pool-keeper --vmid ID --holder PID [--config FILE]`, stdin the
/// control connection. Run by the holder only.
pub fn main(args: &[std::ffi::OsString]) -> i32 {
    let args = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2 pool-keeper: {e} (the pool holder runs this; people do not)");
            return 2;
        }
    };
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2 pool-keeper: {e}");
            return 1;
        }
    };
    super::init_log(
        &config,
        format!("keeper {}[{}]", args.vmid, std::process::id()),
    );
    // SAFETY: fd 0 is the control connection the holder gave this process as stdin; from
    // here on this OwnedFd alone owns it.
    let conn = UnixStream::from(unsafe { OwnedFd::from_raw_fd(0) });
    match run(&config, &args, conn) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            1
        }
    }
}

/// What the keeper removes when its owner dies: the VM's directory, if the path (the claimed
/// one first, then the pool's) still names the very directory it created, and the jail id.
struct Leftovers {
    state_root: PathBuf,
    /// (dev, ino) of the VM's directory.
    ident: (u64, u64),
    roots: Vec<PathBuf>,
    jail_owners: Vec<String>,
}

impl Leftovers {
    fn remove(&self) {
        for root in self.roots.iter().rev() {
            let Ok(m) = std::fs::symlink_metadata(root) else {
                continue;
            };
            if (m.dev(), m.ino()) != self.ident || !m.is_dir() {
                continue;
            }
            let (Some(parent), Some(name)) = (root.parent(), root.file_name()) else {
                continue;
            };
            match SandboxDir::new(parent, &name.to_string_lossy()).map(|d| d.destroy()) {
                Ok(Ok(())) => log::info!("removed {}", root.display()),
                Ok(Err(e)) => log::error!("removing {}: {e}", root.display()),
                Err(e) => log::error!("removing {}: {e}", root.display()),
            }
        }
        let ids = husk_hypervisor::jail::JailIds::new(&self.state_root);
        for owner in &self.jail_owners {
            ids.release(owner);
        }
        // The last VM of a holder that has ended takes `.pool/` with it, and those of one that
        // was killed its socket, lock and log first (while a holder runs, they are its own).
        PoolPaths::new(&self.state_root).remove_abandoned();
    }
}

fn run(config: &Config, args: &Args, mut conn: UnixStream) -> Result<(), PoolError> {
    let fail = |e: String| PoolError::Config(e);
    let mut owner = pidfd_open(args.holder)
        .map_err(|e| fail(format!("the holder (pid {}) is gone: {e}", args.holder)))?;
    if nix::unistd::getppid().as_raw() != i32::try_from(args.holder).unwrap_or(-1) {
        return Err(fail(format!(
            "started by a process other than the holder (pid {})",
            args.holder
        )));
    }
    // A network namespace of the keeper's own (nothing else runs in it): the pooled VM's tap
    // waits here, where no pod's traffic can reach it, until a claim moves it into a pod's.
    // Done before any thread exists, so every later one (and the VM's processes) is in it.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| fail(format!("unsharing the network namespace: {e}")))?;
    let paths = PoolPaths::new(&config.state_root);
    let dir = SandboxDir::new(&paths.dir, &args.vmid).map_err(|e| fail(e.to_string()))?;
    if dir.root().exists() {
        return Err(fail(format!("{} exists already", dir.root().display())));
    }
    dir.create().map_err(|e| {
        let _ = dir.destroy();
        fail(e.to_string())
    })?;
    // Held until exit: the holder sweeps a directory under .pool/ whose lock is free.
    let dir_fd = std::fs::File::open(dir.root()).map_err(super::io("opening", dir.root()))?;
    let dir_fd = nix::fcntl::Flock::lock(dir_fd, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| fail(format!("locking {}: {e}", dir.root().display())))?;
    let meta = dir_fd
        .metadata()
        .map_err(super::io("reading", dir.root()))?;
    let owner_name = super::jail_owner(&args.vmid);
    let mut left = Leftovers {
        state_root: config.state_root.clone(),
        ident: (meta.dev(), meta.ino()),
        roots: vec![dir.root().to_path_buf()],
        jail_owners: vec![owner_name.clone()],
    };
    let booted = boot(config, &dir, &owner_name, &args.vmid, &owner);
    let Booted {
        mut vm,
        event,
        mut agent_conn,
        agent_version,
    } = match booted {
        Ok(v) => v,
        Err(BootError::OwnerDied) => {
            left.remove();
            log::info!("the holder died while the VM booted: the VM is gone, the keeper exits");
            return Ok(());
        }
        Err(BootError::Failed(e)) => {
            let _ = wire::write_msg(&mut conn, &KeeperEvent::Failed { error: e.clone() });
            left.remove();
            return Err(fail(e));
        }
    };
    if let Err(e) = wire::write_msg(&mut conn, &event) {
        let _ = vm.kill();
        left.remove();
        return Err(fail(format!("telling the holder the VM is ready: {e}")));
    }
    let mut claimed = false;
    // Whether the claimer has spoken on the connection, i.e. received it: a connection that
    // closes after the handover but before that was lost on its way (the holder died before
    // passing it on), and the renamed directory is nobody's but the keeper's to remove.
    let mut delivered = false;
    let end = |vm: &mut Box<dyn Vm>, left: &Leftovers, clean: bool, why: &str| {
        let _ = vm.kill();
        if clean {
            left.remove();
        }
        log::info!("{why}: the VM is gone, the keeper exits");
    };
    // Asleep until something happens: the owner dies, a request comes, or the VM ends (where
    // its backend gives a descriptor for that; else a pooled VM is looked at every
    // POOLED_VM_LOOK, and a claimed one whenever its claimer asks). Looking at it is what
    // stops it when a device helper of it has ended (`Vm::wait`), claimed or not.
    let vm_exit = vm.exit_fd();
    let mut vm_ended = false;
    loop {
        let mut wait_on: Vec<&dyn AsFd> = vec![&owner, &conn];
        let timeout = match &vm_exit {
            Some(exit) if !vm_ended => {
                wait_on.push(exit);
                None
            }
            None if !claimed => Some(POOLED_VM_LOOK),
            _ => None,
        };
        let ready = readable(&wait_on, timeout);
        if ready[0] {
            end(&mut vm, &left, true, "the owner died");
            return Ok(());
        }
        let vm_woke = ready.get(2).copied().unwrap_or(false);
        if !vm_ended && (!claimed || vm_woke) {
            let ended = match vm.wait(Some(Duration::ZERO)) {
                Ok(None) => None,
                Ok(Some(status)) => Some(status.to_string()),
                Err(e) => Some(crate::error::chain(&e)),
            };
            match ended {
                Some(how) if !claimed => {
                    end(
                        &mut vm,
                        &left,
                        true,
                        &format!("the VM ended while pooled ({how})"),
                    );
                    return Ok(());
                }
                // The claimer learns it when it asks (Status), as it would of its own VM.
                Some(_) => vm_ended = true,
                // Woken by a helper's end: `wait` counts down its grace; look again soon.
                None if vm_woke => std::thread::sleep(POOLED_VM_LOOK),
                None => {}
            }
        }
        if !ready[1] {
            continue;
        }
        let req = match wire::read_msg::<KeeperRequest>(&mut conn) {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => {
                // The connection closed: an owner that lives keeps its directory; one that is
                // dying (its files close just before its pidfd turns readable) does not.
                let dying = readable(&[&owner], Some(Duration::from_millis(300)))[0];
                end(
                    &mut vm,
                    &left,
                    dying || !delivered,
                    "the owner closed the connection",
                );
                return Ok(());
            }
        };
        if claimed && !matches!(req, KeeperRequest::Handover { .. }) {
            delivered = true;
        }
        // The agent connection travels with its reply; every other reply is a plain line.
        let mut passing: Option<UnixStream> = None;
        let reply = match req {
            KeeperRequest::AgentConnection {} if !claimed => reply_err(
                "not handed over: only the claiming shim takes the agent connection".into(),
            ),
            KeeperRequest::AgentConnection {} => match agent_conn.take() {
                Some(c) => {
                    passing = Some(c);
                    KeeperReply {
                        ok: true,
                        agent_version: Some(agent_version.clone()),
                        ..Default::default()
                    }
                }
                None => reply_err("the agent connection was taken already".into()),
            },
            KeeperRequest::Handover { pid, dir } if !claimed => match pidfd_open(pid) {
                Ok(fd) => {
                    owner = fd;
                    claimed = true;
                    if let Some(sid) = dir.file_name() {
                        left.jail_owners.push(sid.to_string_lossy().into_owned());
                    }
                    log::info!("handed over to pid {pid}, as {}", dir.display());
                    left.roots.push(dir);
                    KeeperReply {
                        ok: true,
                        ..Default::default()
                    }
                }
                Err(e) => {
                    end(
                        &mut vm,
                        &left,
                        true,
                        &format!("the claimer (pid {pid}) is gone: {e}"),
                    );
                    return Ok(());
                }
            },
            KeeperRequest::Handover { .. } => reply_err("handed over already".into()),
            KeeperRequest::Status {} => status_reply(vm.wait(Some(Duration::ZERO))),
            KeeperRequest::Pause {} => unit_reply(vm.pause()),
            KeeperRequest::Resume {} => unit_reply(vm.resume()),
            KeeperRequest::Stop { grace_ms } => status_reply(
                vm.stop(Duration::from_millis(grace_ms.min(60_000)))
                    .map(Some),
            ),
            KeeperRequest::Kill {} => status_reply(vm.kill().map(Some)),
            KeeperRequest::Exit {} => {
                let _ = wire::write_msg(
                    &mut conn,
                    &KeeperReply {
                        ok: true,
                        ..Default::default()
                    },
                );
                end(&mut vm, &left, !delivered, "the owner is done");
                return Ok(());
            }
        };
        let sent = match &passing {
            Some(c) => wire::send_msg_with_fd(&conn, &reply, c.as_raw_fd()),
            None => wire::write_msg(&mut conn, &reply),
        };
        // The keeper's copy closes here: the claiming shim holds the only one.
        drop(passing);
        if sent.is_err() {
            let dying = readable(&[&owner], Some(Duration::from_millis(300)))[0];
            end(
                &mut vm,
                &left,
                dying || !delivered,
                "the owner's connection broke",
            );
            return Ok(());
        }
    }
}

fn reply_err(e: String) -> KeeperReply {
    KeeperReply {
        ok: false,
        error: Some(e),
        ..Default::default()
    }
}

fn unit_reply(r: husk_hypervisor::Result<()>) -> KeeperReply {
    match r {
        Ok(()) => KeeperReply {
            ok: true,
            ..Default::default()
        },
        Err(e) => reply_err(crate::error::chain(&e)),
    }
}

fn status_reply(r: husk_hypervisor::Result<Option<std::process::ExitStatus>>) -> KeeperReply {
    use std::os::unix::process::ExitStatusExt;
    match r {
        Ok(s) => KeeperReply {
            ok: true,
            exited: s.map(|s| s.into_raw()),
            ..Default::default()
        },
        Err(e) => reply_err(crate::error::chain(&e)),
    }
}

/// Asks the pooled VM's agent for a provisional sandbox (see `CreateSandboxRequest`), on a
/// connection of its own that ends here. Returns the agent's version (`Agent::connect`
/// checked that it speaks our API).
fn provisional_sandbox(vm: &dyn Vm, vmid: &str) -> Result<String, String> {
    let socket = vm
        .vsock_socket()
        .ok_or("the VM has no vsock device")?
        .to_path_buf();
    let agent = crate::agent::Agent::connect(&socket, Duration::from_secs(10))
        .map_err(|e| format!("connecting to the agent: {e}"))?;
    let req = husk_protocols::agent::CreateSandboxRequest {
        sandbox_id: vmid.to_string(),
        provisional: true,
        ..Default::default()
    };
    agent
        .client()
        .create_sandbox(crate::agent::short(), &req)
        .map_err(|e| {
            format!(
                "CreateSandbox (provisional): {}",
                crate::agent::describe(&e)
            )
        })?;
    // One more request after it, only a speed-up (a failure is logged): the claimer's first
    // call on its kept connection took 20–27 ms without it, 10–14 ms with it (CreateSandbox,
    // bench 12 alternating, FIELD-NOTES). Likely the provisional sandbox's rehearsal pushes
    // the guest's request path out of TCG's translation buffer, and this translates it again
    // while the VM waits rather than on the claim's path.
    let again = husk_protocols::agent::CheckRequest {
        api_version: husk_protocols::API_VERSION,
        ..Default::default()
    };
    if let Err(e) = agent.client().check(crate::agent::short(), &again) {
        log::warn!(
            "Check after the provisional sandbox: {}",
            crate::agent::describe(&e)
        );
    }
    Ok(agent.agent_version)
}

/// A pooled VM, booted and ready for a claim.
struct Booted {
    vm: Box<dyn Vm>,
    /// What the holder is told (`KeeperEvent::Ready`).
    event: KeeperEvent,
    /// The claimer's agent connection (see `KeeperRequest::AgentConnection`).
    agent_conn: Option<UnixStream>,
    /// The agent's version, passed with that connection.
    agent_version: String,
}

/// Why a pooled VM is not ready for a claim.
#[derive(Debug)]
enum BootError {
    /// The holder died before the VM was ready (the VM is killed at once: a boot can take
    /// seconds, and nobody is left to report to).
    OwnerDied,
    /// The VM could not be started or its agent made ready: what the holder is told.
    Failed(String),
}

impl From<String> for BootError {
    fn from(e: String) -> Self {
        Self::Failed(e)
    }
}

/// Starts the VM of the configuration's default shape in `dir`, waits for its agent, makes
/// the provisional sandbox and opens the connection its claimer will use. `holder` (a pidfd)
/// is watched throughout: while the guest boots, and between the steps after it.
fn boot(
    config: &Config,
    dir: &SandboxDir,
    owner: &str,
    vmid: &str,
    holder: &OwnedFd,
) -> Result<Booted, BootError> {
    let holder_died = || readable(&[holder], Some(Duration::ZERO))[0];
    // The holder's shape (`Shape::default_of`): the base size, no NIC, no debug console.
    let (vcpus, memory_mib) = crate::sandbox::size_for(config, &serde_json::json!({}))?;
    let programs = config.programs().map_err(|e| e.to_string())?;
    let backend =
        crate::sandbox::backend(config, &programs).map_err(|e| crate::error::chain(&e))?;
    let jail = if config.jail {
        Some(crate::sandbox::jail_for(config, owner, dir).map_err(|e| e.to_string())?)
    } else {
        None
    };
    // Its NICs' taps, in the keeper's network namespace, each with a random locally
    // administered MAC (the agent gives the guest NIC its pod's veth's at claim).
    let mut nics = Vec::new();
    for i in 0..super::POOL_NICS {
        let name = format!("tap{i}_husk");
        let tap = crate::network::tap::create(&name).map_err(|e| e.to_string())?;
        let mut mac = [0u8; 6];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut mac))
            .map_err(|e| format!("/dev/urandom: {e}"))?;
        mac[0] = (mac[0] & 0xfe) | 0x02;
        let net = husk_hypervisor::NetConfig {
            tap: std::sync::Arc::new(tap),
            mac,
        };
        let nic = crate::network::PooledNic {
            tap: name,
            mac: net.mac_string(),
        };
        nics.push((net, nic));
    }
    let vm_config = VmConfig {
        kernel: config.kernel.clone(),
        initramfs: config.initramfs.clone(),
        cmdline_extra: config.kernel_params.trim().to_string(),
        vcpus,
        memory_mib,
        state_dir: dir.vm(),
        shared_dir: Some(dir.shared()),
        vsock: true,
        nets: nics.iter().map(|(net, _)| net.clone()).collect(),
        jail,
    };
    let started = Instant::now();
    // On this (the main) thread: the VM's processes die with it, i.e. with the keeper.
    let mut vm = backend
        .start(&vm_config)
        .map_err(|e| format!("starting the VM: {}", crate::error::chain(&e)))?;
    let timeout = Duration::from_secs(config.agent_timeout_secs);
    // `wait_for_ready`, which also ends when the holder dies.
    let log = vm.console_log().to_path_buf();
    let waited = husk_hypervisor::console::wait_for_line(
        &log,
        timeout,
        || matches!(vm.wait(Some(Duration::ZERO)), Ok(None)) && !holder_died(),
        husk_hypervisor::console::ReadyLine::parse,
    );
    let ready = match waited {
        Ok(r) => r,
        Err(_) if holder_died() => {
            let _ = vm.kill();
            return Err(BootError::OwnerDied);
        }
        Err(e) => {
            let ended = vm.wait(Some(Duration::ZERO)).ok().flatten();
            let _ = vm.kill();
            let tail = husk_hypervisor::console::tail(&dir.vm().join("console.log"), 10);
            return Err(BootError::Failed(match ended {
                Some(s) => {
                    format!("the VM ended ({s}) before its agent was ready; console:\n{tail}")
                }
                None => {
                    format!("the agent was not ready within {timeout:?}: {e}; console:\n{tail}")
                }
            }));
        }
    };
    // The pod's sandbox (its uts and ipc namespaces' holder) is made now, off the claim's
    // path: the claiming shim's CreateSandbox then only takes it over (its id and hostname).
    let agent_version = match provisional_sandbox(vm.as_ref(), vmid) {
        Ok(v) => v,
        Err(e) => {
            let _ = vm.kill();
            return Err(if holder_died() {
                BootError::OwnerDied
            } else {
                BootError::Failed(e)
            });
        }
    };
    // The claimer's agent connection, opened now so that the guest's side of it is up and
    // settled before the claim (see `KeeperRequest::AgentConnection`). Nothing is sent on it
    // here: its ttrpc stream starts with the claimer's first call.
    let agent_conn = match vm.vsock_socket() {
        Some(socket) => match husk_hypervisor::vsock::connect_retry(
            socket,
            husk_protocols::AGENT_VSOCK_PORT,
            Duration::from_secs(10),
        ) {
            Ok(c) => Some(c),
            Err(e) => {
                let _ = vm.kill();
                return Err(BootError::Failed(format!(
                    "opening the claimer's agent connection: {e}"
                )));
            }
        },
        None => None,
    };
    let rel = |p: &Path| {
        p.strip_prefix(dir.vm())
            .map(Path::to_path_buf)
            .map_err(|_| format!("{}: not under {}", p.display(), dir.vm().display()))
    };
    let console = rel(vm.console_log())?;
    let vsock = vm.vsock_socket().map(rel).transpose()?;
    log::info!(
        "VM {} booted on {} in {} ms (guest {} ms to the agent)",
        vm.pid(),
        backend.name(),
        started.elapsed().as_millis(),
        ready.since_boot_ms
    );
    let event = KeeperEvent::Ready {
        vm_pid: vm.pid(),
        backend: backend.name(),
        console,
        vsock,
        guest_boot_ms: ready.since_boot_ms,
        nics: nics.into_iter().map(|(_, nic)| nic).collect(),
    };
    Ok(Booted {
        vm,
        event,
        agent_conn,
        agent_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_removed_only_where_the_same_directory_still_is() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        std::fs::create_dir(&a).unwrap();
        let m = std::fs::metadata(&a).unwrap();
        let b = t.path().join("b");
        std::fs::create_dir(&b).unwrap();
        let left = Leftovers {
            state_root: t.path().to_path_buf(),
            ident: (m.dev(), m.ino()),
            roots: vec![b.clone(), t.path().join("gone"), a.clone()],
            jail_owners: vec![],
        };
        left.remove();
        assert!(!a.exists(), "the keeper's own directory stays");
        assert!(
            b.exists(),
            "another directory at a path the keeper knew was removed"
        );
    }

    #[test]
    fn arguments_are_checked() {
        let a = |v: &[&str]| parse(&v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>());
        assert!(a(&["--vmid", "vm-1", "--holder", "12"]).is_ok());
        assert!(a(&["--vmid", "vm-1"]).unwrap_err().contains("--holder"));
        assert!(a(&["--holder", "x", "--vmid", "v"])
            .unwrap_err()
            .contains("--holder"));
        assert!(a(&["--frob"]).unwrap_err().contains("unknown"));
    }
}
