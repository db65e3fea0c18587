//! The shim's side of the pool: claiming a VM, starting a holder where none runs, the
//! `status` command, and [`KeptVm`], the [`Vm`] of a claimed VM.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use husk_hypervisor::Vm;
use serde_json::Value;

use super::wire::{self, Claimed, KeeperReply, KeeperRequest, Reply, Request};
use super::{PoolError, PoolPaths, Shape};
use crate::config::Config;
use crate::sandbox_dir::SandboxDir;

/// How long a claim may take (the holder answers at once: a handover is one round trip).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// A claimed VM, ready for the sandbox to use.
#[derive(Debug)]
pub struct Pooled {
    pub claimed: Claimed,
    pub vm: KeptVm,
    /// The agent connection its keeper opened while the VM waited (`None`: the keeper could
    /// not pass it; the sandbox connects itself).
    pub agent: Option<KeptAgent>,
}

/// The agent connection a pooled VM's keeper opened for its claimer.
#[derive(Debug)]
pub struct KeptAgent {
    /// Connected (the vsock handshake done), nothing sent on it yet.
    pub stream: UnixStream,
    /// The agent's version, if the keeper checked this VM's agent's API version: the
    /// claimer's `Check` would be a round trip into the guest for what is known.
    pub agent_version: Option<String>,
}

/// Asks the pool for a VM for sandbox `sid` of this size; `None` (logged with the reason):
/// boot cold. Starts a holder when the pool is configured and none answers.
pub fn claim(
    config: &Config,
    sid: &str,
    spec: &Value,
    vcpus: u32,
    memory_mib: u32,
) -> Option<Pooled> {
    if config.pool.size == 0 {
        // A holder killed while it had no VM (no keeper to take its files) left its socket,
        // lock and log; with the pool no longer configured no holder comes to take them
        // over, so the next sandbox removes them (nothing when there are none, or when a
        // holder still runs: [`PoolPaths::remove_abandoned`]).
        PoolPaths::new(&config.state_root).remove_abandoned();
        return None;
    }
    let nics = match crate::network::interface_count(spec) {
        Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
        Err(e) => {
            log::info!(
                "sandbox {sid}: boots cold — counting its network interfaces: {}",
                crate::network::chain(&e)
            );
            return None;
        }
    };
    let shape = match Shape::of(config, vcpus, memory_mib, nics) {
        Ok(s) => s,
        Err(why) => {
            log::info!("sandbox {sid}: boots cold — {why}");
            return None;
        }
    };
    let paths = PoolPaths::new(&config.state_root);
    let conn = match UnixStream::connect(&paths.socket) {
        Ok(c) => c,
        Err(e) => {
            log::info!(
                "sandbox {sid}: boots cold — no pool holder answers at {} ({e}); starting one",
                paths.socket.display()
            );
            if let Err(e) = start_holder(config) {
                log::warn!("starting the pool holder: {e}");
            }
            return None;
        }
    };
    let asked = Instant::now();
    match ask(config, &conn, sid, shape) {
        Ok(p) => {
            log::info!(
                "sandbox {sid}: claimed {} from the warm pool in {} ms",
                p.claimed.vmid,
                asked.elapsed().as_millis()
            );
            Some(p)
        }
        Err(why) => {
            log::info!("sandbox {sid}: boots cold — the pool: {why}");
            // A claim cut short (the holder died in the middle) may have renamed a VM's
            // directory to this sandbox's; its keeper removes it (the connection never reached
            // us): give it a moment rather than fail on a directory that is on its way out.
            if let Ok(dir) = SandboxDir::new(&config.state_root, sid) {
                let deadline = Instant::now() + Duration::from_secs(3);
                while dir.root().exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            None
        }
    }
}

fn ask(config: &Config, conn: &UnixStream, sid: &str, shape: Shape) -> Result<Pooled, String> {
    let _ = conn.set_read_timeout(Some(CLAIM_TIMEOUT));
    let _ = conn.set_write_timeout(Some(CLAIM_TIMEOUT));
    wire::write_msg(
        &mut &*conn,
        &Request::Claim {
            sid: sid.to_string(),
            shape: Box::new(shape),
        },
    )
    .map_err(|e| format!("sending the claim: {e}"))?;
    let (reply, fd) =
        wire::recv_msg_with_fd::<Reply>(conn).map_err(|e| format!("reading the answer: {e}"))?;
    let reply = reply.ok_or("the holder closed without answering")?;
    if !reply.ok {
        return Err(reply.error.unwrap_or_else(|| "refused".into()));
    }
    let (Some(claimed), Some(fd)) = (reply.claimed, fd) else {
        return Err("the holder's answer lacks the VM or its keeper's connection".into());
    };
    // Where the VM's directory now is: computed here, never taken from the answer.
    let mut vm = KeptVm::new(fd, &claimed, &vm_dir(config, sid)?);
    let agent = match vm.take_agent_connection() {
        Ok(c) => Some(c),
        Err(why) => {
            log::info!("sandbox {sid}: connects to the agent itself — the keeper: {why}");
            None
        }
    };
    Ok(Pooled { vm, claimed, agent })
}

/// Starts a detached holder for `config` (its own session, stdout and stderr to the pool's
/// log) and returns without waiting for it: a second one exits at once on the lock.
pub fn start_holder(config: &Config) -> Result<(), PoolError> {
    let paths = PoolPaths::new(&config.state_root);
    paths.create()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .map_err(super::io("opening", &paths.log))?;
    let exe = super::program_path().map_err(super::io("finding", Path::new("/proc/self/exe")))?;
    let mut cmd = Command::new(&exe);
    cmd.args(["pool", "run"]);
    if let Some(p) = &config.source {
        cmd.arg("--config").arg(p);
    }
    let err = log.try_clone().map_err(super::io("opening", &paths.log))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .current_dir("/");
    // SAFETY: between fork and exec the closure only calls setsid(2) and fork(2)/_exit(2),
    // which are async-signal-safe, and touches no memory of the parent. The first child
    // forks once more and exits, so the holder is nobody's child here (not a zombie of this
    // shim) and leads a session of its own (no signal to the shim's group reaches it).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            match libc::fork() {
                -1 => Err(std::io::Error::last_os_error()),
                0 => Ok(()),
                _ => libc::_exit(0),
            }
        });
    }
    let mut child = cmd.spawn().map_err(super::io("starting", &exe))?;
    let _ = child.wait();
    Ok(())
}

/// `pool status`: the holder's answer, as JSON.
pub fn status(config: &Config) -> Result<String, PoolError> {
    let paths = PoolPaths::new(&config.state_root);
    let mut conn = UnixStream::connect(&paths.socket).map_err(|source| PoolError::NotRunning {
        socket: paths.socket.clone(),
        source,
    })?;
    let _ = conn.set_read_timeout(Some(CLAIM_TIMEOUT));
    let ask = wire::write_msg(&mut conn, &Request::Status {})
        .and_then(|()| wire::read_msg::<Reply>(&mut conn));
    match ask {
        Ok(Some(Reply {
            ok: true,
            status: Some(s),
            ..
        })) => Ok(serde_json::to_string_pretty(&s).unwrap_or_default()),
        Ok(other) => Err(PoolError::Config(format!(
            "{}: unexpected answer {other:?}",
            paths.socket.display()
        ))),
        Err(source) => Err(PoolError::NotRunning {
            socket: paths.socket.clone(),
            source,
        }),
    }
}

/// A claimed VM: its keeper runs it, this drives it over the keeper's control connection.
/// A keeper that is gone means a VM that is gone (its processes die with the keeper's
/// thread): reported as killed.
#[derive(Debug)]
pub struct KeptVm {
    conn: Option<UnixStream>,
    pid: u32,
    console: PathBuf,
    vsock: Option<PathBuf>,
    exited: Option<ExitStatus>,
    /// A pidfd of the VM's program, opened at the claim: the keeper stops the VM when a
    /// helper of it ends, so the VM's end covers the rest.
    program: Option<OwnedFd>,
}

impl KeptVm {
    /// `vm_dir`: the VM's state directory where the sandbox has it.
    pub fn new(conn: OwnedFd, claimed: &Claimed, vm_dir: &Path) -> Self {
        Self {
            conn: Some(UnixStream::from(conn)),
            pid: claimed.vm_pid,
            console: vm_dir.join(&claimed.console),
            vsock: claimed.vsock.as_ref().map(|v| vm_dir.join(v)),
            exited: None,
            program: husk_hypervisor::process::pidfd_open(claimed.vm_pid).ok(),
        }
    }

    fn call(&mut self, req: &KeeperRequest) -> husk_hypervisor::Result<KeeperReply> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(KeeperReply {
                ok: true,
                exited: self.exited.map(|s| s.into_raw()),
                ..Default::default()
            });
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(90)));
        let answer = wire::write_msg(conn, req).and_then(|()| wire::read_msg::<KeeperReply>(conn));
        match answer {
            Ok(Some(r)) if r.ok => {
                if let Some(raw) = r.exited {
                    self.exited = Some(ExitStatus::from_raw(raw));
                }
                Ok(r)
            }
            Ok(Some(r)) => Err(husk_hypervisor::Error::Config(format!(
                "the keeper of VM {}: {}",
                self.pid,
                r.error.unwrap_or_default()
            ))),
            Ok(None) | Err(_) => {
                // The keeper is gone, and its VM with it (the VM's processes die with the
                // keeper; a keeper whose connection breaks kills its VM).
                self.conn = None;
                let status = *self
                    .exited
                    .get_or_insert(ExitStatus::from_raw(libc::SIGKILL));
                Ok(KeeperReply {
                    ok: true,
                    exited: Some(status.into_raw()),
                    ..Default::default()
                })
            }
        }
    }

    /// The agent connection the keeper opened for the claimer (once; see
    /// `KeeperRequest::AgentConnection`).
    fn take_agent_connection(&mut self) -> Result<KeptAgent, String> {
        let conn = self.conn.as_mut().ok_or("its connection is gone")?;
        let _ = conn.set_read_timeout(Some(CLAIM_TIMEOUT));
        wire::write_msg(conn, &KeeperRequest::AgentConnection {})
            .map_err(|e| format!("asking: {e}"))?;
        let (reply, fd) = wire::recv_msg_with_fd::<KeeperReply>(conn)
            .map_err(|e| format!("reading the answer: {e}"))?;
        match (reply, fd) {
            (Some(r), Some(fd)) if r.ok => Ok(KeptAgent {
                stream: UnixStream::from(fd),
                agent_version: r.agent_version,
            }),
            (Some(r), _) if !r.ok => Err(r.error.unwrap_or_else(|| "refused".into())),
            (Some(_), _) => Err("its answer came without the connection".into()),
            (None, _) => Err("it closed without answering".into()),
        }
    }

    fn gone(&self) -> husk_hypervisor::Error {
        husk_hypervisor::Error::Config(format!(
            "VM {} (pooled) has ended ({})",
            self.pid,
            self.exited
                .map_or("its keeper is gone".into(), |s| s.to_string())
        ))
    }

    fn status(&mut self) -> husk_hypervisor::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.call(&KeeperRequest::Status {})?;
        }
        Ok(self.exited)
    }

    /// Ends the keeper once the VM is gone.
    fn release(&mut self) {
        if self.conn.is_some() {
            let _ = self.call(&KeeperRequest::Exit {});
            self.conn = None;
        }
    }
}

/// A dropped claimed VM is ended and its keeper with it, before the caller goes on (e.g. to
/// remove the directory or boot cold), as a cold VM's processes are reaped on drop.
impl Drop for KeptVm {
    fn drop(&mut self) {
        if self.conn.is_some() {
            let _ = self.call(&KeeperRequest::Kill {});
            self.release();
        }
    }
}

impl Vm for KeptVm {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn console_log(&self) -> &Path {
        &self.console
    }
    fn vsock_socket(&self) -> Option<&Path> {
        self.vsock.as_deref()
    }
    fn console_write(&mut self, _bytes: &[u8]) -> husk_hypervisor::Result<()> {
        Err(husk_hypervisor::Error::Config(format!(
            "VM {}: console input is not relayed for a pooled VM (its keeper holds the console) — nothing in husk writes to a guest console",
            self.pid
        )))
    }
    fn pause(&mut self) -> husk_hypervisor::Result<()> {
        self.call(&KeeperRequest::Pause {})?;
        self.conn.as_ref().map(drop).ok_or_else(|| self.gone())
    }
    fn resume(&mut self) -> husk_hypervisor::Result<()> {
        self.call(&KeeperRequest::Resume {})?;
        self.conn.as_ref().map(drop).ok_or_else(|| self.gone())
    }
    fn wait(&mut self, timeout: Option<Duration>) -> husk_hypervisor::Result<Option<ExitStatus>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(s) = self.status()? {
                return Ok(Some(s));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn exit_fd(&self) -> Option<OwnedFd> {
        self.program.as_ref()?.try_clone().ok()
    }
    fn stop(&mut self, grace: Duration) -> husk_hypervisor::Result<ExitStatus> {
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.call(&KeeperRequest::Stop { grace_ms })?;
        self.release();
        Ok(self.exited.unwrap_or(ExitStatus::from_raw(libc::SIGKILL)))
    }
    fn kill(&mut self) -> husk_hypervisor::Result<ExitStatus> {
        self.call(&KeeperRequest::Kill {})?;
        self.release();
        Ok(self.exited.unwrap_or(ExitStatus::from_raw(libc::SIGKILL)))
    }
}

/// The VM directory of a claimed VM in sandbox `sid`'s directory.
pub fn vm_dir(config: &Config, sid: &str) -> Result<PathBuf, String> {
    SandboxDir::new(&config.state_root, sid)
        .map(|d| d.vm())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_the_pool_unconfigured_a_sandbox_removes_a_killed_holders_files() {
        let root = tempfile::tempdir().unwrap();
        let config = Config {
            state_root: root.path().to_path_buf(),
            ..Config::default()
        };
        assert_eq!(config.pool.size, 0);
        let p = PoolPaths::new(root.path());
        super::super::tests::killed_holders_files(&p);
        assert!(claim(&config, "sb", &Value::Null, 1, 256).is_none());
        assert!(!p.dir.exists(), "the killed holder's files are still there");
        // And a live holder's are left alone.
        let held = p.lock_holder().unwrap();
        std::fs::write(&p.socket, "").unwrap();
        assert!(claim(&config, "sb", &Value::Null, 1, 256).is_none());
        assert!(p.socket.exists() && p.lock.exists());
        drop(held);
    }
}
