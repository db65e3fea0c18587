//! containerd's task API (shim v2) mapped onto the sandbox's VM and agent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, Status,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{Context, ExitSignal, Task, TtrpcContext, TtrpcResult};
use husk_protocols::agent::{
    ContainerRef, CreateContainerRequest, ExecProcessRequest as AgentExec, ProcessRef,
    RemoveContainerRequest, SignalProcessRequest, TtyWinResizeRequest, UpdateContainerRequest,
    WaitProcessResponse,
};
use husk_protocols::ttrpc::{self, Code};

use crate::agent::{describe, short};
use crate::config::{config_path_from_options, Config};
use crate::io::{self, StdioPaths};
use crate::sandbox::Sandbox;
use crate::share;

pub(crate) mod events;
mod metrics;
mod oom;
mod process;
mod watch;

use events::Publisher;

use oom::watch_oom;
use process::{exit_of, Container, Proc};
use watch::watch_vm;

/// Exit status reported for a process whose VM died under it (Kata and runc use 255 too when
/// the real status is unknown).
pub const UNKNOWN_EXIT: u32 = 255;

/// The signal number of SIGKILL (what containerd's KillRequest carries).
const SIGKILL: u32 = 9;

/// How long the sandbox's own init may outlive a SIGKILL the agent acknowledged before the
/// VM is killed instead. A guest can acknowledge and not deliver (root in it controls the
/// agent), or the process can sit in uninterruptible sleep (a virtio-fs request its server
/// never answers); either way the kill must still end the pod, as it would under runc.
/// Ample for an honest guest under TCG on a loaded host: the exit normally follows in
/// milliseconds.
const KILL_BOUND: Duration = Duration::from_secs(10);

fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// An agent call for `id` (and exec `exec`) failed.
fn failed<'a>(
    id: &'a str,
    exec: &'a str,
    what: &'a str,
) -> impl FnOnce(ttrpc::Error) -> ttrpc::Error + 'a {
    move |e| {
        let who = if exec.is_empty() {
            format!("container {id}")
        } else {
            format!("{id}/{exec}")
        };
        err(Code::INTERNAL, format!("{who}: {what}: {}", describe(&e)))
    }
}

fn container_ref(id: &str) -> ContainerRef {
    ContainerRef {
        container_id: id.to_string(),
        ..Default::default()
    }
}

#[derive(Default)]
struct Inner {
    sandbox: Option<Arc<Sandbox>>,
    containers: HashMap<String, Container>,
}

pub struct Service {
    namespace: String,
    publisher: Arc<Publisher>,
    exit: Arc<ExitSignal>,
    inner: Arc<Mutex<Inner>>,
}

impl Service {
    pub fn new(namespace: &str, publisher: Publisher, exit: Arc<ExitSignal>) -> Self {
        Self {
            namespace: namespace.into(),
            publisher: Arc::new(publisher),
            exit,
            inner: Arc::new(Mutex::new(Inner::default())),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        publish(&self.publisher, &self.namespace, topic, event);
    }

    fn lookup(&self, id: &str, exec_id: &str) -> TtrpcResult<(Arc<Proc>, Arc<Sandbox>)> {
        let inner = self.inner();
        let c = inner.containers.get(id).ok_or_else(|| {
            err(
                Code::NOT_FOUND,
                format!("container {id}: not found in this shim"),
            )
        })?;
        let p = if exec_id.is_empty() {
            c.init.clone()
        } else {
            c.execs.get(exec_id).cloned().ok_or_else(|| {
                err(
                    Code::NOT_FOUND,
                    format!("container {id}: exec {exec_id}: not found"),
                )
            })?
        };
        let sb = inner.sandbox.clone().ok_or_else(|| {
            err(
                Code::FAILED_PRECONDITION,
                format!("container {id}: the sandbox is gone"),
            )
        })?;
        Ok((p, sb))
    }

    fn sandbox(&self, id: &str) -> TtrpcResult<Arc<Sandbox>> {
        self.lookup(id, "").map(|(_, s)| s)
    }

    /// Brings the sandbox up and starts the threads that watch it.
    fn start_sandbox(
        &self,
        config: &Config,
        sid: &str,
        spec: &serde_json::Value,
    ) -> TtrpcResult<Arc<Sandbox>> {
        // Without a hostname in the spec the guest would be "(none)"; runc would show the
        // host's name, which a VM must not leak. Use the sandbox id, as Docker does.
        let hostname = match spec["hostname"].as_str() {
            Some(h) if !h.is_empty() => h.to_string(),
            _ => sid.chars().take(63).collect(),
        };
        let hostname = hostname.as_str();
        let sb = Arc::new(
            Sandbox::start(config, sid, spec, hostname)
                .map_err(|e| err(Code::INTERNAL, e.to_string()))?,
        );
        watch_oom(
            &sb,
            self.inner.clone(),
            self.publisher.clone(),
            self.namespace.clone(),
        );
        metrics::serve(&sb, &self.inner);
        watch_vm(
            sb.clone(),
            self.inner.clone(),
            self.publisher.clone(),
            self.namespace.clone(),
        );
        Ok(sb)
    }

    /// Starts the stdio relays and the waiter of a started process.
    fn run_process(&self, sb: &Arc<Sandbox>, p: &Arc<Proc>) -> TtrpcResult<()> {
        let client = sb
            .agent
            .connection()
            .map_err(|e| err(Code::UNAVAILABLE, format!("container {}: {e}", p.cid)))?;
        let proc_ = p.clone();
        let publisher = self.publisher.clone();
        let ns = self.namespace.clone();
        let sandbox = sb.clone();
        let outputs = io::start(
            client,
            &p.cid,
            &p.eid,
            &p.stdio,
            move |result: Result<WaitProcessResponse, String>| {
                let status = match result {
                    Ok(r) => u32::try_from(r.exit_status).unwrap_or(UNKNOWN_EXIT),
                    Err(e) => {
                        log::warn!(
                            "{}/{}: waiting for the process failed ({e}); VM exit: {:?}",
                            proc_.cid,
                            proc_.eid,
                            sandbox.vm_exited()
                        );
                        UNKNOWN_EXIT
                    }
                };
                proc_.finish(status, &publisher, &ns);
            },
        );
        *p.outputs.lock().unwrap_or_else(|e| e.into_inner()) = Some(outputs);
        Ok(())
    }

    /// Ends the sandbox when no container is left.
    fn shutdown_if_empty(&self) {
        let sb = {
            let mut inner = self.inner();
            if !inner.containers.is_empty() {
                return;
            }
            inner.sandbox.take()
        };
        if let Some(sb) = sb {
            sb.destroy();
        }
        self.exit.signal();
    }
}

pub fn publish(publisher: &Publisher, ns: &str, topic: &str, event: Box<dyn MessageDyn>) {
    if let Err(e) = publisher.publish(Context::default(), topic, ns, event) {
        log::warn!("publishing {topic}: {e}");
    }
}

/// After a SIGKILL of the sandbox's init that the agent acknowledged: if no exit follows
/// within [`KILL_BOUND`], kills the VM (see there); its watcher then reports the exit.
fn enforce_kill(p: Arc<Proc>, sb: Arc<Sandbox>) {
    if !p.claim_kill_watch() {
        return;
    }
    std::thread::spawn(move || {
        if p.wait_exit(KILL_BOUND) || sb.is_destroyed() {
            return;
        }
        log::error!(
            "{}: no exit {KILL_BOUND:?} after a SIGKILL the agent acknowledged (a process in \
             uninterruptible sleep, or a guest that did not deliver it); killing the VM of \
             sandbox {}",
            p.cid,
            sb.id
        );
        sb.kill_vm();
    });
}

/// What Create's request is, checked before anything is made.
struct CreateChecked {
    cid: String,
    bundle: PathBuf,
    spec: serde_json::Value,
    config: Config,
    sid: String,
}

/// Create's guest side: the rootfs and bind mounts shared, then CreateContainer. The caller
/// undoes what is left on an error.
fn create_in_guest(
    sb: &Arc<Sandbox>,
    cid: &str,
    req: &CreateTaskRequest,
    bundle: &Path,
    spec: &mut serde_json::Value,
) -> TtrpcResult<()> {
    let shared = share::mount_rootfs(&sb.dir, cid, &req.rootfs, bundle)
        .and_then(|_| share::share_bind_mounts(&sb.dir, cid, spec));
    if let Err(e) = shared {
        // A field of the spec the shim cannot honour is the caller's to change.
        let code = match e {
            share::ShareError::Field { .. } => Code::INVALID_ARGUMENT,
            _ => Code::INTERNAL,
        };
        return Err(err(code, e.to_string()));
    }
    let agent_req = CreateContainerRequest {
        container_id: cid.to_string(),
        oci_spec_json: serde_json::to_vec(spec).unwrap_or_default(),
        terminal: req.terminal,
        ..Default::default()
    };
    sb.agent
        .client()
        .create_container(short(), &agent_req)
        .map(|_| ())
        .map_err(|e| {
            err(
                Code::INTERNAL,
                format!("container {cid}: CreateContainer: {}", describe(&e)),
            )
        })
}

impl Service {
    /// Create's checks: the id, the bundle's spec, the configuration, not a known container,
    /// the sandbox it names.
    fn check_create(&self, req: &CreateTaskRequest) -> TtrpcResult<CreateChecked> {
        let invalid = |e: &dyn std::fmt::Display| err(Code::INVALID_ARGUMENT, e.to_string());
        let cid = req.id.clone();
        crate::sandbox_dir::check_id(&cid).map_err(|e| invalid(&e))?;
        let bundle = PathBuf::from(&req.bundle);
        let spec = share::read_spec(&bundle, &cid).map_err(|e| invalid(&e))?;
        let config_path = req
            .options
            .as_ref()
            .and_then(|o| config_path_from_options(&o.value));
        let config = Config::load(config_path.as_deref()).map_err(|e| invalid(&e))?;
        if self.inner().containers.contains_key(&cid) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {cid}: already exists"),
            ));
        }
        let sid = share::sandbox_of(&spec)
            .map_err(|e| invalid(&e))?
            .unwrap_or_else(|| cid.clone());
        Ok(CreateChecked {
            cid,
            bundle,
            spec,
            config,
            sid,
        })
    }

    /// This shim's sandbox, started now by its first container (`true`); a container of
    /// another sandbox is refused.
    fn sandbox_for(
        &self,
        config: &Config,
        sid: &str,
        cid: &str,
        spec: &serde_json::Value,
    ) -> TtrpcResult<(Arc<Sandbox>, bool)> {
        let (sb, new_sandbox) = match self.inner().sandbox.clone() {
            Some(sb) => (sb, false),
            None => (self.start_sandbox(config, sid, spec)?, true),
        };
        if sb.id != sid {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!(
                    "container {cid}: belongs to sandbox {sid}, but this shim runs sandbox {}",
                    sb.id
                ),
            ));
        }
        Ok((sb, new_sandbox))
    }

    /// Records the created container (and a new sandbox) and publishes TaskCreate.
    fn register(&self, sb: &Arc<Sandbox>, new_sandbox: bool, req: CreateTaskRequest) {
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Proc::new(&req.id, "", stdio, Vec::new());
        {
            let mut inner = self.inner();
            if new_sandbox {
                inner.sandbox = Some(sb.clone());
            }
            inner.containers.insert(
                req.id.clone(),
                Container {
                    bundle: req.bundle.clone(),
                    init,
                    execs: HashMap::new(),
                },
            );
        }
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id,
                bundle: req.bundle,
                rootfs: req.rootfs,
                io: MessageField::some(TaskIO {
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid: sb.vm_pid,
                ..Default::default()
            }),
        );
    }
}

impl Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let CreateChecked {
            cid,
            bundle,
            mut spec,
            config,
            sid,
        } = self.check_create(&req)?;
        let (sb, new_sandbox) = self.sandbox_for(&config, &sid, &cid, &spec)?;
        if let Err(e) = create_in_guest(&sb, &cid, &req, &bundle, &mut spec) {
            let _ = sb.dir.remove_container(&cid);
            if new_sandbox {
                sb.destroy();
            }
            return Err(e);
        }
        self.register(&sb, new_sandbox, req);
        Ok(CreateTaskResponse {
            pid: sb.vm_pid,
            ..Default::default()
        })
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let (p, sb) = self.lookup(&req.id, &req.exec_id)?;
        if p.state().status != Status::CREATED {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("{}/{}: already started", req.id, req.exec_id),
            ));
        }
        let started = if req.exec_id.is_empty() {
            let r = container_ref(&req.id);
            sb.agent.client().start_container(short(), &r)
        } else {
            let r = AgentExec {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                oci_process_json: p.process_json.clone(),
                ..Default::default()
            };
            sb.agent.client().exec_process(short(), &r)
        }
        .map_err(failed(&req.id, &req.exec_id, "start"))?;
        // containerd and host tools (`ctr task ls`, `nsenter -t`, `kill`, monitoring) take the
        // task's PID as a host PID: report the VMM's, as Kata does. The guest's PID stays in
        // the log and in `Pids` (`ctr task ps`), where it belongs.
        let pid = sb.vm_pid;
        log::debug!("{}/{}: guest pid {}", req.id, req.exec_id, started.pid);
        {
            let mut s = p.state();
            s.pid = pid;
            s.status = Status::RUNNING;
        }
        self.run_process(&sb, &p)?;
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id,
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id,
                    exec_id: req.exec_id,
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let (p, _) = self.lookup(&req.id, &req.exec_id)?;
        let bundle = self
            .inner()
            .containers
            .get(&req.id)
            .map(|c| c.bundle.clone())
            .unwrap_or_default();
        let s = p.state();
        let (exit_status, exited_at) = exit_of(&s);
        Ok(StateResponse {
            id: req.id,
            bundle,
            pid: s.pid,
            status: s.status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status,
            exited_at,
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let (p, _) = self.lookup(&req.id, &req.exec_id)?;
        let mut s = p.state();
        while s.exit.is_none() {
            s = p.exited.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let (exit_status, exited_at) = exit_of(&s);
        Ok(WaitResponse {
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let (p, sb) = self.lookup(&req.id, &req.exec_id)?;
        let status = p.state().status;
        match status {
            Status::STOPPED if !req.all => {
                return Err(err(
                    Code::NOT_FOUND,
                    format!("{}/{}: process already finished", req.id, req.exec_id),
                ))
            }
            Status::CREATED => {
                // Never started in the guest: nothing to signal, the process simply ends.
                p.finish(128 + req.signal, &self.publisher, &self.namespace);
                return Ok(Empty::new());
            }
            _ => {}
        }
        let r = SignalProcessRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            signal: req.signal,
            all: req.all,
            ..Default::default()
        };
        if let Err(e) = sb.agent.client().signal_process(short(), &r) {
            // No answer within the deadline (a guest stalled or gone), not a refusal: SIGKILL
            // must still end the process, and only ending the VM can. Its processes then exit
            // with UNKNOWN_EXIT (the VM watcher publishes it).
            if req.signal == SIGKILL && !matches!(e, ttrpc::Error::RpcStatus(_)) {
                log::error!(
                    "{}/{}: SIGKILL: the agent did not answer ({}); killing the VM of sandbox {}",
                    req.id,
                    req.exec_id,
                    describe(&e),
                    sb.id
                );
                sb.kill_vm();
                return Ok(Empty::new());
            }
            return Err(err(
                Code::INTERNAL,
                format!(
                    "{}/{}: signal {}: {}",
                    req.id,
                    req.exec_id,
                    req.signal,
                    describe(&e)
                ),
            ));
        }
        if req.signal == SIGKILL && req.exec_id.is_empty() && req.id == sb.id {
            enforce_kill(p, sb);
        }
        Ok(Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let spec = req.spec.as_ref().map(|a| a.value.clone()).ok_or_else(|| {
            err(
                Code::INVALID_ARGUMENT,
                format!("{}/{}: exec without a process spec", req.id, req.exec_id),
            )
        })?;
        {
            let mut inner = self.inner();
            let c = inner
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("container {}: not found", req.id)))?;
            if c.execs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("{}/{}: exec id already in use", req.id, req.exec_id),
                ));
            }
            let stdio = StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            };
            c.execs.insert(
                req.exec_id.clone(),
                Proc::new(&req.id, &req.exec_id, stdio, spec),
            );
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id,
                exec_id: req.exec_id,
                ..Default::default()
            }),
        );
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let (_, sb) = self.lookup(&req.id, &req.exec_id)?;
        let r = TtyWinResizeRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            rows: req.height,
            columns: req.width,
            ..Default::default()
        };
        sb.agent
            .client()
            .tty_win_resize(short(), &r)
            .map_err(failed(&req.id, &req.exec_id, "resize"))?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let (p, sb) = self.lookup(&req.id, &req.exec_id)?;
        if !req.stdin || p.state().status != Status::RUNNING {
            return Ok(Empty::new());
        }
        if !p.stdio.stdin.is_empty() {
            // containerd closes its end of the fifo before asking; the stdin relay still has
            // to forward what is buffered in the fifo, and it closes the process's stdin when
            // it reads EOF. Closing here would race it and lose that data. (If the relay is
            // still waiting to open the fifo, this open-and-close lets it through.)
            io::unblock_stdin(&p.stdio.stdin);
            return Ok(Empty::new());
        }
        let r = ProcessRef {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        sb.agent.client().close_stdin(short(), &r).map_err(failed(
            &req.id,
            &req.exec_id,
            "close stdin",
        ))?;
        Ok(Empty::new())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let sb = self.sandbox(&req.id)?;
        let r = container_ref(&req.id);
        let list = sb
            .agent
            .client()
            .list_processes(short(), &r)
            .map_err(failed(&req.id, "", "pids"))?;
        Ok(PidsResponse {
            processes: list
                .pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        let (p, sb) = self.lookup(&req.id, "")?;
        let r = container_ref(&req.id);
        sb.agent
            .client()
            .pause_container(short(), &r)
            .map_err(failed(&req.id, "", "pause"))?;
        p.state().status = Status::PAUSED;
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: req.id,
                ..Default::default()
            }),
        );
        Ok(Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        let (p, sb) = self.lookup(&req.id, "")?;
        let r = container_ref(&req.id);
        sb.agent
            .client()
            .resume_container(short(), &r)
            .map_err(failed(&req.id, "", "resume"))?;
        {
            let mut s = p.state();
            if s.status == Status::PAUSED {
                s.status = Status::RUNNING;
            }
        }
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: req.id,
                ..Default::default()
            }),
        );
        Ok(Empty::new())
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let sb = self.sandbox(&req.id)?;
        let r = container_ref(&req.id);
        let s = sb
            .agent
            .client()
            .stats_container(short(), &r)
            .map_err(failed(&req.id, "", "stats"))?;
        let m = Metrics {
            pids: MessageField::some(PidsStat {
                current: s.pids_current,
                limit: s.pids_max,
                ..Default::default()
            }),
            cpu: MessageField::some(CPUStat {
                usage_usec: s.cpu_usage_usec,
                user_usec: s.cpu_user_usec,
                system_usec: s.cpu_system_usec,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: s.memory_current_bytes,
                usage_limit: s.memory_max_bytes,
                ..Default::default()
            }),
            io: MessageField::some(IOStat {
                usage: vec![IOEntry {
                    rbytes: s.io_read_bytes,
                    wbytes: s.io_write_bytes,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            memory_events: MessageField::some(MemoryEvents {
                oom_kill: s.oom_kills,
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = Any {
            type_url: "io.containerd.cgroups.v2.Metrics".into(),
            value: m
                .write_to_bytes()
                .map_err(|e| err(Code::INTERNAL, e.to_string()))?,
            ..Default::default()
        };
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let sb = self.sandbox(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| {
                err(
                    Code::INVALID_ARGUMENT,
                    format!("container {}: update without resources", req.id),
                )
            })?;
        let r = UpdateContainerRequest {
            container_id: req.id.clone(),
            oci_resources_json: resources,
            ..Default::default()
        };
        sb.agent
            .client()
            .update_container(short(), &r)
            .map_err(failed(&req.id, "", "update"))?;
        Ok(Empty::new())
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let (p, sb) = self.lookup(&req.id, &req.exec_id)?;
        let s = p.state().clone();
        if matches!(s.status, Status::RUNNING | Status::PAUSED) {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!(
                    "{}/{}: still running; kill it before deleting",
                    req.id, req.exec_id
                ),
            ));
        }
        let (exit_status, exited_at) = exit_of(&s);
        p.close_output();
        if req.exec_id.is_empty() {
            let r = RemoveContainerRequest {
                container_id: req.id.clone(),
                force: true,
                ..Default::default()
            };
            // A dead VM has nothing left to remove.
            if sb.vm_exited().is_none() {
                if let Err(e) = sb.agent.client().remove_container(short(), &r) {
                    log::warn!("container {}: RemoveContainer: {}", req.id, describe(&e));
                }
            }
            if let Err(e) = sb.dir.remove_container(&req.id) {
                return Err(err(Code::INTERNAL, e.to_string()));
            }
            self.inner().containers.remove(&req.id);
            self.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    id: req.id.clone(),
                    pid: s.pid,
                    exit_status,
                    exited_at: exited_at.clone(),
                    ..Default::default()
                }),
            );
        } else if let Some(c) = self.inner().containers.get_mut(&req.id) {
            c.execs.remove(&req.exec_id);
        }
        Ok(DeleteResponse {
            pid: s.pid,
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self.sandbox(&req.id).map(|s| s.vm_pid).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: "2".into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        self.shutdown_if_empty();
        Ok(Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: containerd_shim::api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            format!(
                "container {}: checkpoint is not supported by husk (the container runs inside a VM; CRIU on the host cannot reach it)",
                req.id
            ),
        ))
    }
}
