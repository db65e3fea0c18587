//! Containers from OCI runtime specs, written by hand with one module per concern:
//! [`spawn`] (clone + re-exec), [`helper`] (the in-namespace setup), [`exec`] (what an exec'd
//! process gets), [`mounts`] (every path in the rootfs resolved [`inroot`]), [`caps`],
//! [`seccomp`], [`cgroup`], [`stdio`].
//!
//! Why not youki's libcontainer: it brings its own process model (a main/intermediate/init
//! triple with its own state directory and sync protocol, systemd and cgroup v1 managers,
//! hooks, rootless) that the guest does not need, and doubles the static agent's size. The
//! guest has exactly one case: root, cgroup v2, rootfs on virtio-fs; this is ~1,500 lines.
//!
//! Namespaces: each container gets a new mount namespace. Its uts and ipc namespaces are the
//! sandbox's (CreateSandbox) when the spec asks for them, so a pod's containers share them, as
//! with Kata; a namespace *path* in the spec names a host process's namespace (CRI writes the
//! pause container's) and so also means the sandbox's. A PID namespace is new unless the spec
//! gives a path: then (CRI's `shareProcessNamespace` pods) the container joins the PID
//! namespace of the sandbox's own container (the pod's pause container, whose id is the
//! sandbox id), which is PID 1 there, as under runc. The network namespace is the VM's: the
//! guest *is* the pod's network namespace, so `network` entries (whose paths name host
//! namespaces) are ignored. `user` and `time` namespaces are refused, and so is joining a mount
//! namespace by path.

pub mod caps;
pub mod cgroup;
pub mod exec;
pub mod helper;
pub mod holder;
pub(crate) mod inroot;
pub mod mounts;
pub mod oom;
pub mod rehearsal;
pub mod seccomp;
pub mod spawn;
pub mod spec;
pub mod stdio;
pub mod steps;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Process as OciProcess, Spec};

use crate::reaper::{exits, Exit};
use cgroup::Cgroup;
use helper::InitConfig;
use spawn::Sync;
use stdio::Stdio;

/// How long a helper may take to set a container up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the container engine; each names the container (and process) and the step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong (bad spec, bad id): INVALID_ARGUMENT.
    #[error("{id}: {what}")]
    Invalid { id: String, what: String },
    #[error("{0}: no such container")]
    NotFound(String),
    #[error("{id}: no such process {exec_id:?}")]
    NoProcess { id: String, exec_id: String },
    #[error("{0}: already exists")]
    Exists(String),
    /// Not in a state that allows it (start twice, remove a running one): FAILED_PRECONDITION.
    #[error("{id}: {what}")]
    State { id: String, what: String },
    /// A step failed in the guest: INTERNAL.
    #[error("{id}: {source}")]
    Failed {
        id: String,
        #[source]
        source: StepError,
    },
}

/// What failed in a step of the engine: the source of [`Error::Failed`]. Each message
/// carries its own source's text, so what crosses ttrpc (`to_string`) has the whole cause.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Spawn(#[from] spawn::Error),
    #[error(transparent)]
    Stdio(#[from] stdio::Error),
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    /// The container's OOM kills cannot be watched.
    #[error("cgroup: {0}")]
    Oom(#[from] oom::Error),
    #[error("opening /dev/null: {0} — the guest's /dev is the agent's devtmpfs")]
    DevNull(#[source] std::io::Error),
    #[error("starting the sandbox namespaces: {0}")]
    SandboxHolder(#[source] holder::Error),
    #[error("taking over the provisional sandbox: setting its hostname: {0}")]
    TakeOver(#[source] std::io::Error),
    #[error("encoding the helper config: {0}")]
    HelperConfig(#[source] serde_json::Error),
    #[error("the container helper answered {0:?}")]
    HelperAnswered(String),
    #[error("the container helper ended during setup ({0:?})")]
    HelperEnded(Option<Exit>),
    #[error("starting the process: {0}")]
    Start(#[source] spawn::Error),
    #[error("exec {exec_id}: {source}")]
    Exec {
        exec_id: String,
        #[source]
        source: Box<StepError>,
    },
    #[error("exec helper answered {0:?}")]
    ExecAnswered(String),
    #[error("the exec helper ended during setup")]
    ExecEnded,
    #[error("expected the terminal from the container helper, got {0:?}")]
    PtyExpected(String),
    #[error("the container helper ended before passing the terminal")]
    PtyEnded,
    #[error("the container helper's pty line came without the terminal's fd")]
    PtyNoFd,
    #[error("waiting for {0:?}: the process is not known to the reaper")]
    NotReaped(String),
    /// A signal to a process that has already ended.
    #[error("the process has exited")]
    Exited,
    #[error("kill {sig}: {source}")]
    Kill {
        sig: Signal,
        #[source]
        source: nix::errno::Errno,
    },
}

/// Why a container whose spec names a PID namespace path cannot join the sandbox container's.
#[derive(Debug, thiserror::Error)]
pub enum PidNamespaceError {
    #[error("a PID namespace path names a host namespace, which the guest cannot enter — create the sandbox (CreateSandbox) and its container first, whose PID namespace such containers share")]
    NoSandbox,
    #[error("the sandbox's own container cannot join another PID namespace")]
    OwnContainer,
    #[error("sharing the pod's PID namespace means joining the sandbox container's, and container {0} does not exist in this guest")]
    NoSandboxContainer(String),
    #[error("the sandbox container {0} has exited, and its PID namespace with it")]
    SandboxExited(String),
}

type Result<T> = std::result::Result<T, Error>;

/// Sets `hostname` in the uts namespace of process `pid` (the sandbox holder): the calling
/// thread enters that namespace, sets the name and goes back to its own. A uts namespace is a
/// thread's own to enter (unlike a mount namespace), so the agent's other threads are never in
/// it. No thread is started for it: under TCG a thread's start and end cost a pooled claim's
/// CreateSandbox most of its time (FIELD-NOTES, "A pooled claim's hostname"). Should the way
/// back fail, this thread would keep the pod's hostname for what it does later (a holder it
/// clones copies it, then sets its own); the error says so.
fn set_hostname_of(pid: i32, hostname: &str) -> std::io::Result<()> {
    let target = std::fs::File::open(format!("/proc/{pid}/ns/uts"))?;
    let own = std::fs::File::open("/proc/thread-self/ns/uts")?;
    nix::sched::setns(&target, CloneFlags::CLONE_NEWUTS)?;
    let set = nix::unistd::sethostname(hostname);
    nix::sched::setns(&own, CloneFlags::CLONE_NEWUTS).map_err(|e| {
        std::io::Error::other(format!(
            "returning to the agent's uts namespace after setting the hostname: {e}"
        ))
    })?;
    Ok(set?)
}

fn failed<E: Into<StepError>>(id: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Failed {
        id: id.into(),
        source: e.into(),
    }
}

/// A process of a container: its init, or an exec.
#[derive(Debug)]
pub struct Process {
    /// The PID the agent waits for (an exec's mirroring helper).
    pub wait_pid: i32,
    /// The PID signals go to (the process itself).
    pub pid: i32,
    pub stdio: Stdio,
}

impl Process {
    fn signal(&self, sig: Signal) -> std::result::Result<(), StepError> {
        if exits().exited(self.wait_pid).is_some() {
            return Err(StepError::Exited);
        }
        nix::sys::signal::kill(Pid::from_raw(self.pid), sig)
            .map_err(|source| StepError::Kill { sig, source })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
}

#[derive(Debug)]
pub struct Container {
    pub id: String,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    cgroup: Option<Cgroup>,
    /// What its execs take from it (seccomp, oom_score_adj, process defaults).
    inherited: exec::Inherited,
    state: Mutex<State>,
    /// The init helper's sync socket until StartContainer.
    sync: Mutex<Option<Sync>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NoProcess {
                id: self.id.clone(),
                exec_id: exec_id.into(),
            })
    }

    fn init_exited(&self) -> bool {
        exits().exited(self.init.wait_pid).is_some()
    }
}

/// How a new container gets its namespaces.
#[derive(Debug)]
pub struct Namespaces {
    /// New namespaces for the init helper's clone.
    pub flags: CloneFlags,
    /// Namespaces the helper enters after the clone: (clone flag bits, path).
    pub join: Vec<(i32, PathBuf)>,
    /// Whether the container sets its hostname (it has its own uts namespace).
    pub set_hostname: bool,
    /// A PID namespace to clone the helper into (entering one only affects children, so it
    /// is entered before the clone, not by the helper).
    pub pid: Option<PathBuf>,
}

/// Where the engine finds things.
#[derive(Debug, Clone)]
pub struct Config {
    /// The shared directory: a container's rootfs is `<shared>/<id>/rootfs`.
    pub shared_dir: PathBuf,
    /// The cgroup2 mount whose `husk` child holds the containers; `None` runs without cgroups
    /// (the host tests, whose hosts use cgroup v1).
    pub cgroup_root: Option<PathBuf>,
    /// Where a provisional sandbox rehearses a container's creation ([`rehearsal`]). `None`
    /// (the agent outside a VM, on a host's file system) only warms a helper.
    pub rehearsal: Option<rehearsal::Place>,
}

#[derive(Debug)]
struct Sandbox {
    /// The sandbox id: also the id of the pod's own (pause) container, if it runs here.
    id: String,
    holder: holder::Holder,
    /// Made ahead of its pod (`CreateSandboxRequest.provisional`): the next CreateSandbox
    /// takes it over.
    provisional: bool,
}

/// All containers of the sandbox.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids being created (reserved, not yet in `containers`).
    creating: Mutex<std::collections::HashSet<String>>,
    sandbox: Mutex<Option<Sandbox>>,
    oom: Arc<oom::OomWatch>,
}

/// CreateContainer's checks that need nothing but the request: the id, then the spec parsed
/// and checked ([`spec`]). Touches nothing; the fuzz targets and the spec mutation run drive it.
pub fn check_create(id: &str, spec_json: &[u8]) -> Result<Spec> {
    if !valid_id(id) {
        return Err(Error::Invalid {
            id: id.into(),
            what: format!(
                "container id {}: must be 1-128 of [A-Za-z0-9_.-], not starting with '.'",
                spec::shown(id)
            ),
        });
    }
    let invalid = |e: spec::SpecError| Error::Invalid {
        id: id.into(),
        what: e.to_string(),
    };
    let spec = spec::parse_spec(spec_json).map_err(invalid)?;
    spec::check_spec(&spec).map_err(invalid)?;
    Ok(spec)
}

/// ExecProcess's checks that need nothing but the request: the exec id, then the process
/// parsed and checked ([`spec::check_process`]).
pub fn check_exec(id: &str, exec_id: &str, process_json: &[u8]) -> Result<OciProcess> {
    let invalid = |what: String| Error::Invalid {
        id: id.into(),
        what,
    };
    if !valid_id(exec_id) {
        return Err(invalid(format!(
            "exec id {}: must be 1-128 of [A-Za-z0-9_.-], not starting with '.'",
            spec::shown(exec_id)
        )));
    }
    let process =
        spec::parse_process(process_json).map_err(|e| invalid(format!("exec {exec_id}: {e}")))?;
    spec::check_process(&process, "process")
        .map_err(|e| invalid(format!("exec {exec_id}: {e}")))?;
    Ok(process)
}

/// Container and exec ids become paths: a conservative alphabet, as runc's.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// How a container described by `spec` gets its namespaces (see the module docs), given the
/// sandbox holder's PID (`pause`, if CreateSandbox ran) and how to find the sandbox
/// container's PID namespace (`sandbox_pid`, asked only when the spec names a PID namespace
/// path; its error says why there is none). Pure: the fuzz targets call it.
pub fn namespaces(
    id: &str,
    spec: &Spec,
    pause: Option<i32>,
    sandbox_pid: impl Fn() -> std::result::Result<PathBuf, PidNamespaceError>,
) -> Result<Namespaces> {
    let mut flags = CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS;
    let mut join = Vec::new();
    let mut set_hostname = false;
    let mut pid_ns = None;
    let nss = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_deref())
        .unwrap_or(&[]);
    for (i, ns) in nss.iter().enumerate() {
        let path = ns.path().as_deref();
        let invalid = |what: String| Error::Invalid {
            id: id.into(),
            what: format!("linux.namespaces[{i}]{what}"),
        };
        let shown = |p: &std::path::Path| spec::shown(&p.to_string_lossy());
        match ns.typ() {
            LinuxNamespaceType::Mount if path.is_some() => {
                return Err(invalid(format!(
                    ".path = {}: joining a mount namespace by path is not supported: each container gets its own",
                    shown(path.unwrap_or(std::path::Path::new("")))
                )))
            }
            LinuxNamespaceType::Pid if path.is_some() => {
                flags.remove(CloneFlags::CLONE_NEWPID);
                let p = path.unwrap_or(std::path::Path::new(""));
                pid_ns = Some(sandbox_pid().map_err(|why| {
                    invalid(format!(".path = {}: {why}", shown(p)))
                })?);
            }
            LinuxNamespaceType::Pid | LinuxNamespaceType::Mount | LinuxNamespaceType::Network => {}
            LinuxNamespaceType::Cgroup => {} // unshared by the helper after joining the cgroup
            t @ (LinuxNamespaceType::Uts | LinuxNamespaceType::Ipc) => {
                let (flag, name) = if t == LinuxNamespaceType::Uts {
                    (CloneFlags::CLONE_NEWUTS, "uts")
                } else {
                    (CloneFlags::CLONE_NEWIPC, "ipc")
                };
                match (path, pause) {
                    // A path names a namespace of the *host* (the pod's pause process, as
                    // containerd's CRI writes it): in the guest, the sandbox's is that.
                    (_, Some(pause)) => join.push((flag.bits(), PathBuf::from(format!("/proc/{pause}/ns/{name}")))),
                    (Some(p), None) => {
                        return Err(invalid(format!(
                            ".path = {}: the {name} namespace path names a host namespace, which the guest cannot enter — create the sandbox (CreateSandbox) first, whose namespaces such containers share",
                            shown(p)
                        )))
                    }
                    (None, None) => {
                        flags |= flag;
                        set_hostname |= t == LinuxNamespaceType::Uts;
                    }
                }
            }
            other => {
                let name = format!("{other:?}").to_lowercase();
                return Err(invalid(format!(
                    ".type = {name:?}: {name} namespaces are not supported in the husk guest — remove the entry"
                )));
            }
        }
    }
    Ok(Namespaces {
        flags,
        join,
        set_hostname,
        pid: pid_ns,
    })
}

impl Engine {
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Self {
            config,
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(std::collections::HashSet::new()),
            sandbox: Mutex::new(None),
            oom: oom::OomWatch::start(),
        })
    }

    fn get(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.into()))
    }

    /// Starts the holder of the pod's shared uts and ipc namespaces. A provisional sandbox
    /// (made ahead of its pod) is taken over by the next CreateSandbox that is not: it gets
    /// that id, and the hostname is set in its uts namespace (an empty one leaves the guest's,
    /// as a new sandbox would).
    pub fn create_sandbox(&self, id: &str, hostname: &str, provisional: bool) -> Result<()> {
        let mut sb = lock(&self.sandbox);
        if let Some(s) = sb.as_mut() {
            if !s.provisional || provisional {
                return Err(Error::Exists(format!("sandbox {id}")));
            }
            if hostname.len() > holder::MAX_HOSTNAME {
                return Err(Error::Invalid {
                    id: id.into(),
                    what: holder::Error::HostnameTooLong(hostname.into()).to_string(),
                });
            }
            if !hostname.is_empty() {
                set_hostname_of(s.holder.pid(), hostname)
                    .map_err(|e| failed(id)(StepError::TakeOver(e)))?;
            }
            s.id = id.into();
            s.provisional = false;
            return Ok(());
        }
        let holder = holder::Holder::start(hostname).map_err(|e| match e {
            holder::Error::HostnameTooLong(_) => Error::Invalid {
                id: id.into(),
                what: e.to_string(),
            },
            e => failed(id)(StepError::SandboxHolder(e)),
        })?;
        *sb = Some(Sandbox {
            id: id.into(),
            holder,
            provisional,
        });
        drop(sb);
        if provisional {
            // A pool's VM, before its pod: walk a container's creation once, off the pod's
            // path, so that its first container's finds it translated under TCG (see
            // `rehearsal`); without a rehearsal directory (the agent outside a VM), at least
            // a helper's start (the holder is no helper: no exec). Only a speed-up: a
            // failure is logged, not returned.
            let warmed = match &self.config.rehearsal {
                Some(place) => rehearsal::run(self, place),
                None => warm_helper().map_err(|e| format!("warming the helper: {e}")),
            };
            if let Err(e) = warmed {
                println!("husk-agent: warning: sandbox {id}: rehearsal: {e}");
            }
        }
        Ok(())
    }

    /// Kills every container and the sandbox holder.
    pub(crate) fn destroy_all(&self) {
        let ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
        for id in ids {
            let _ = self.remove(&id, true);
        }
        // Dropping the holder kills and reaps it.
        drop(lock(&self.sandbox).take());
    }

    /// CreateContainer: everything up to the point where the process would exec.
    pub fn create(&self, id: &str, spec_json: &[u8], terminal: bool) -> Result<()> {
        let invalid = |what: String| Error::Invalid {
            id: id.into(),
            what,
        };
        let spec = check_create(id, spec_json)?;
        let rootfs = self.config.shared_dir.join(id).join("rootfs");
        if !rootfs.is_dir() {
            return Err(invalid(format!(
                "rootfs {}: no such directory — the shim shares it before CreateContainer",
                rootfs.display()
            )));
        }
        let rootfs = rootfs
            .canonicalize()
            .map_err(|e| invalid(format!("rootfs {}: {e}", rootfs.display())))?;
        self.create_at(id, spec, rootfs, terminal)
    }

    /// CreateContainer of a checked spec on a resolved rootfs (the shared directory's, or
    /// the rehearsal's own).
    fn create_at(&self, id: &str, spec: Spec, rootfs: PathBuf, terminal: bool) -> Result<()> {
        let mut trace = steps::Trace::new();
        // The request's flag or the spec's own `process.terminal`.
        let terminal = terminal
            || spec
                .process()
                .as_ref()
                .and_then(|p| p.terminal())
                .unwrap_or(false);
        // Reserve the id, and do the slow part without holding the table: other containers'
        // RPCs go on meanwhile.
        {
            let containers = lock(&self.containers);
            let mut creating = lock(&self.creating);
            if containers.contains_key(id) || !creating.insert(id.to_string()) {
                return Err(Error::Exists(id.into()));
            }
        }
        if let Some(t) = trace.as_mut() {
            t.mark("checked");
        }
        let r = self.create_reserved(id, spec, rootfs, terminal, &mut trace);
        if let Some(t) = trace.as_mut() {
            t.mark(if r.is_ok() { "ready" } else { "failed" });
            crate::logging::debug!("CreateContainer {id} steps (ms): {}", t.render());
        }
        lock(&self.creating).remove(id);
        r
    }

    fn create_reserved(
        &self,
        id: &str,
        spec: Spec,
        rootfs: PathBuf,
        terminal: bool,
        trace: &mut Option<steps::Trace>,
    ) -> Result<()> {
        let invalid = |what: String| Error::Invalid {
            id: id.into(),
            what,
        };
        let ns = self.namespaces(id, &spec)?;
        let cgroup = match &self.config.cgroup_root {
            Some(root) => Some(
                Cgroup::create(
                    root,
                    id,
                    spec.linux().as_ref().and_then(|l| l.resources().as_ref()),
                )
                .map_err(|e| invalid(format!("cgroup: {e}")))?,
            ),
            None => None,
        };
        if let Some(cg) = &cgroup {
            if let Err(e) = self.oom.add(id, &cg.path) {
                let _ = cg.remove();
                return Err(failed(id)(e));
            }
        }
        if let Some(t) = trace.as_mut() {
            t.mark("cgroup");
        }
        let made = self.spawn_init(id, spec, rootfs, cgroup.clone(), ns, terminal, trace);
        match made {
            Ok(c) => {
                lock(&self.containers).insert(id.into(), Arc::new(c));
                Ok(())
            }
            Err(e) => {
                if let Some(cg) = &cgroup {
                    self.oom.remove(id);
                    let _ = cg.remove();
                }
                Err(e)
            }
        }
    }

    /// Clone flags, namespaces to join, and whether to set the hostname.
    fn namespaces(&self, id: &str, spec: &Spec) -> Result<Namespaces> {
        let pause = lock(&self.sandbox).as_ref().map(|s| s.holder.pid());
        namespaces(id, spec, pause, || self.sandbox_pid_namespace(id))
    }

    /// The PID namespace a container whose spec names a PID namespace path joins: the sandbox
    /// container's. The error says why not.
    fn sandbox_pid_namespace(&self, id: &str) -> std::result::Result<PathBuf, PidNamespaceError> {
        let sandbox = lock(&self.sandbox)
            .as_ref()
            .map(|s| s.id.clone())
            .ok_or(PidNamespaceError::NoSandbox)?;
        if sandbox == id {
            return Err(PidNamespaceError::OwnContainer);
        }
        let Some(c) = lock(&self.containers).get(&sandbox).cloned() else {
            return Err(PidNamespaceError::NoSandboxContainer(sandbox));
        };
        if c.init_exited() {
            return Err(PidNamespaceError::SandboxExited(sandbox));
        }
        Ok(PathBuf::from(format!("/proc/{}/ns/pid", c.init.pid)))
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_init(
        &self,
        id: &str,
        spec: Spec,
        rootfs: PathBuf,
        cgroup: Option<Cgroup>,
        ns: Namespaces,
        terminal: bool,
        trace: &mut Option<steps::Trace>,
    ) -> Result<Container> {
        // A terminal comes from the helper, out of the container's devpts (see `recv_pty`).
        let (pipes, ends) = Stdio::for_helper(terminal).map_err(failed(id))?;
        let console_size = spec.process().as_ref().and_then(|p| p.console_size());
        use std::os::fd::AsRawFd;
        let fds = [
            ends.fds[0].as_raw_fd(),
            ends.fds[1].as_raw_fd(),
            ends.fds[2].as_raw_fd(),
        ];
        let spawned = match &ns.pid {
            Some(pid_ns) => spawn::spawn_in_pid_namespace(pid_ns, "init", ns.flags, fds),
            None => spawn::spawn("init", ns.flags, fds),
        };
        let (pid, sock) = spawned.map_err(failed(id))?;
        if let Some(t) = trace.as_mut() {
            t.mark("spawned");
        }
        drop(ends);
        let inherited = exec::Inherited::from_spec(&spec);
        let cfg = InitConfig {
            id: id.into(),
            spec,
            rootfs,
            cgroup: cgroup.as_ref().map(|c| c.path.clone()),
            join: ns.join,
            set_hostname: ns.set_hostname,
            terminal,
            steps: trace.is_some(),
        };
        let setup = (|| -> std::result::Result<(Sync, Stdio), StepError> {
            let mut sync = Sync::new(sock);
            let json = serde_json::to_vec(&cfg).map_err(StepError::HelperConfig)?;
            sync.send_config(&json)?;
            if let Some(t) = trace.as_mut() {
                t.mark("config sent");
            }
            let stdio = match pipes {
                Some(s) => s,
                None => {
                    let s = recv_pty(&mut sync)?;
                    if let Some(size) = console_size {
                        let clamp = |v: u64| u16::try_from(v).unwrap_or(u16::MAX);
                        s.resize(clamp(size.height()), clamp(size.width()))?;
                    }
                    s
                }
            };
            let mut answer = sync.recv(SETUP_TIMEOUT)?;
            if let (Some(l), Some(t)) = (&answer, trace.as_mut()) {
                if l.starts_with("steps ") {
                    t.add_helper(l);
                    answer = sync.recv(SETUP_TIMEOUT)?;
                }
            }
            match answer {
                Some(l) if l == "ready" => Ok((sync, stdio)),
                Some(l) => Err(StepError::HelperAnswered(l)),
                None => Err(StepError::HelperEnded(
                    exits().wait(pid, Some(Duration::from_secs(5))),
                )),
            }
        })();
        match setup {
            Ok((sync, stdio)) => Ok(Container {
                id: id.into(),
                init: Arc::new(Process {
                    wait_pid: pid,
                    pid,
                    stdio,
                }),
                execs: Mutex::new(HashMap::new()),
                cgroup,
                inherited,
                state: Mutex::new(State::Created),
                sync: Mutex::new(Some(sync)),
            }),
            Err(e) => {
                kill_and_reap(pid);
                Err(failed(id)(e))
            }
        }
    }

    /// StartContainer: the init helper execs the container's process.
    pub fn start(&self, id: &str) -> Result<u32> {
        let c = self.get(id)?;
        let mut sync = lock(&c.sync).take().ok_or_else(|| Error::State {
            id: id.into(),
            what: "already started".into(),
        })?;
        sync.send("start").map_err(failed(id))?;
        match sync.recv(SETUP_TIMEOUT) {
            Ok(None) => {}
            Ok(Some(l)) => return Err(failed(id)(StepError::HelperAnswered(l))),
            Err(e) => return Err(failed(id)(StepError::Start(e))),
        }
        *lock(&c.state) = State::Running;
        Ok(u32::try_from(c.init.pid).unwrap_or(0))
    }

    /// ExecProcess: a new process in a running container's namespaces and cgroup.
    pub fn exec(&self, id: &str, exec_id: &str, process_json: &[u8]) -> Result<u32> {
        let c = self.get(id)?;
        let process = check_exec(id, exec_id, process_json)?;
        match *lock(&c.state) {
            // The helper would join the frozen cgroup and freeze with it.
            State::Paused => {
                return Err(Error::State {
                    id: id.into(),
                    what: format!("exec {exec_id}: the container is paused — resume it first"),
                })
            }
            State::Created => {
                return Err(Error::State {
                    id: id.into(),
                    what: format!("exec {exec_id}: the container is not started"),
                })
            }
            State::Running if c.init_exited() => {
                return Err(Error::State {
                    id: id.into(),
                    what: format!("exec {exec_id}: the container has exited"),
                })
            }
            State::Running => {}
        }
        let mut execs = lock(&c.execs);
        if execs.contains_key(exec_id) {
            return Err(Error::Exists(format!("{id}: exec {exec_id}")));
        }
        let terminal = process.terminal().unwrap_or(false);
        let (pipes, ends) = Stdio::for_helper(terminal).map_err(failed(id))?;
        use std::os::fd::AsRawFd;
        let fds = [
            ends.fds[0].as_raw_fd(),
            ends.fds[1].as_raw_fd(),
            ends.fds[2].as_raw_fd(),
        ];
        let (helper_pid, sock) =
            spawn::spawn("exec", CloneFlags::empty(), fds).map_err(failed(id))?;
        drop(ends);
        let cfg = exec::config(
            id,
            c.init.pid,
            &c.inherited,
            process,
            c.cgroup.as_ref().map(|g| g.path.clone()),
            terminal,
        );
        let r = (|| -> std::result::Result<(i32, Stdio), StepError> {
            let mut sync = Sync::new(sock);
            sync.send_config(&serde_json::to_vec(&cfg).map_err(StepError::HelperConfig)?)?;
            // The helper set the terminal's consoleSize before the process could ask.
            let stdio = match pipes {
                Some(s) => s,
                None => recv_pty(&mut sync)?,
            };
            let pid = match sync.recv(SETUP_TIMEOUT)? {
                Some(l) => l
                    .strip_prefix("pid ")
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| StepError::ExecAnswered(l.clone()))?,
                None => return Err(StepError::ExecEnded),
            };
            // EOF: the process exec'd; a line: it failed before.
            match sync.recv(SETUP_TIMEOUT)? {
                None => Ok((pid, stdio)),
                Some(l) => Err(StepError::ExecAnswered(l)),
            }
        })();
        match r {
            Ok((pid, stdio)) => {
                execs.insert(
                    exec_id.into(),
                    Arc::new(Process {
                        wait_pid: helper_pid,
                        pid,
                        stdio,
                    }),
                );
                Ok(u32::try_from(pid).unwrap_or(0))
            }
            Err(e) => {
                kill_and_reap(helper_pid);
                Err(failed(id)(StepError::Exec {
                    exec_id: exec_id.into(),
                    source: Box::new(e),
                }))
            }
        }
    }

    pub fn signal(&self, id: &str, exec_id: &str, sig: u32, all: bool) -> Result<()> {
        let c = self.get(id)?;
        let sig = i32::try_from(sig)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| Error::Invalid {
                id: id.into(),
                what: format!("signal {sig}: not a signal"),
            })?;
        if all {
            let pids = match &c.cgroup {
                Some(cg) => cg.pids().map_err(failed(id))?,
                None => vec![u32::try_from(c.init.pid).unwrap_or(0)],
            };
            for p in pids {
                let _ = nix::sys::signal::kill(Pid::from_raw(i32::try_from(p).unwrap_or(0)), sig);
            }
            return Ok(());
        }
        let p = c.process(exec_id)?;
        p.signal(sig).map_err(|e| Error::State {
            id: id.into(),
            what: format!("signal {exec_id:?}: {e}"),
        })
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> Result<Exit> {
        let c = self.get(id)?;
        let p = c.process(exec_id)?;
        exits()
            .wait(p.wait_pid, None)
            .ok_or_else(|| failed(id)(StepError::NotReaped(exec_id.into())))
    }

    pub fn stdio(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        self.get(id)?.process(exec_id)
    }

    pub fn pause(&self, id: &str, frozen: bool) -> Result<()> {
        let c = self.get(id)?;
        let cg = c.cgroup.as_ref().ok_or_else(|| Error::State {
            id: id.into(),
            what: "no cgroup: pause needs cgroup v2".into(),
        })?;
        let mut st = lock(&c.state);
        match (*st, frozen) {
            (State::Running, true) | (State::Paused, false) => {}
            (s, _) => {
                return Err(Error::State {
                    id: id.into(),
                    what: format!(
                        "cannot {} a container that is {s:?}",
                        if frozen { "pause" } else { "resume" }
                    ),
                })
            }
        }
        cg.freeze(frozen).map_err(failed(id))?;
        *st = if frozen {
            State::Paused
        } else {
            State::Running
        };
        Ok(())
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let c = self.get(id)?;
        let r = spec::parse_resources(resources_json).map_err(|e| Error::Invalid {
            id: id.into(),
            what: e.to_string(),
        })?;
        let cg = c.cgroup.as_ref().ok_or_else(|| Error::State {
            id: id.into(),
            what: "no cgroup to update".into(),
        })?;
        cg.update(&r).map_err(failed(id))
    }

    pub fn stats(&self, id: &str) -> Result<cgroup::Stats> {
        let c = self.get(id)?;
        let cg = c.cgroup.as_ref().ok_or_else(|| Error::State {
            id: id.into(),
            what: "no cgroup: stats need cgroup v2".into(),
        })?;
        Ok(cg.stats())
    }

    pub fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.get(id)?;
        match &c.cgroup {
            Some(cg) => cg.pids().map_err(failed(id)),
            None => Ok(vec![u32::try_from(c.init.pid).unwrap_or(0)]),
        }
    }

    /// RemoveContainer: only a stopped (or never started) container unless `force`.
    pub fn remove(&self, id: &str, force: bool) -> Result<()> {
        let c = self.get(id)?;
        let started = lock(&c.sync).is_none();
        if started && !c.init_exited() && !force {
            return Err(Error::State {
                id: id.into(),
                what: "still running — stop it first or remove with force".into(),
            });
        }
        if *lock(&c.state) == State::Paused {
            if let Some(cg) = &c.cgroup {
                let _ = cg.freeze(false);
            }
        }
        if let Some(cg) = &c.cgroup {
            let _ = std::fs::write(cg.path.join("cgroup.kill"), "1");
        }
        kill_and_reap(c.init.wait_pid);
        for p in lock(&c.execs).values() {
            kill_and_reap(p.wait_pid);
        }
        if let Some(cg) = &c.cgroup {
            self.oom.remove(id);
            cg.remove().map_err(failed(id))?;
        }
        lock(&self.containers).remove(id);
        Ok(())
    }

    /// Blocks until a container is OOM-killed; its id.
    pub(crate) fn next_oom(&self) -> String {
        self.oom.next()
    }
}

/// The terminal a helper opened in the container's devpts: its `pty` line carries the master.
fn recv_pty(sync: &mut Sync) -> std::result::Result<Stdio, StepError> {
    match sync.recv(SETUP_TIMEOUT)? {
        Some(l) if l == "pty" => {}
        Some(l) => return Err(StepError::PtyExpected(l)),
        None => return Err(StepError::PtyEnded),
    }
    let master = sync.take_fd().ok_or(StepError::PtyNoFd)?;
    Ok(Stdio::pty(master)?)
}

/// SIGKILL, then wait for the reaper to see the end (bounded), then forget the status.
/// Runs a `warm` helper to its end (see `helper`).
fn warm_helper() -> std::result::Result<(), StepError> {
    let null = std::fs::File::open("/dev/null").map_err(StepError::DevNull)?;
    use std::os::fd::AsRawFd;
    let fd = null.as_raw_fd();
    let (pid, sock) = spawn::spawn("warm", CloneFlags::empty(), [fd, fd, fd])?;
    let mut sync = Sync::new(sock);
    let r = sync
        .send_config(b"")
        .and_then(|()| sync.recv(SETUP_TIMEOUT));
    kill_and_reap(pid);
    match r {
        Ok(Some(l)) if l == "ready" => Ok(()),
        Ok(l) => Err(StepError::HelperAnswered(l.unwrap_or_default())),
        Err(e) => Err(e.into()),
    }
}

fn kill_and_reap(pid: i32) {
    if exits().exited(pid).is_none() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = exits().wait(pid, Some(Duration::from_secs(10)));
    exits().forget(pid);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only `to_string` crosses ttrpc: a failed step's message has the step and the OS error,
    /// and the typed chain is still there for a printer on this side.
    #[test]
    fn a_failed_step_carries_its_cause_in_text_and_chain() {
        let root = std::env::temp_dir().join(format!("husk-no-cgroup-root-{}", std::process::id()));
        let e = Cgroup::create(&root, "c1", None).unwrap_err();
        let e = failed("c1")(e);
        let text = e.to_string();
        assert!(
            text.starts_with("c1: creating cgroup ")
                && text.contains("No such file or directory")
                && text.contains("— the agent needs cgroup2"),
            "{text}"
        );
        let step = std::error::Error::source(&e).expect("the step");
        let os = step.source().expect("the OS error");
        assert!(os.downcast_ref::<std::io::Error>().is_some(), "{os:?}");
        let helper = Error::Failed {
            id: "c1".into(),
            source: StepError::Exec {
                exec_id: "e1".into(),
                source: Box::new(spawn::Error::Helper("exec sh: ENOENT".into()).into()),
            },
        };
        assert_eq!(helper.to_string(), "c1: exec e1: exec sh: ENOENT");
    }
}
