//! The agent API (husk-protocols) served with ttrpc: maps each RPC onto the container
//! [`Engine`](crate::container::Engine) and its errors onto ttrpc status codes.
//!
//! ttrpc's async server runs a connection as tasks on the agent's one runtime thread
//! (see [`start`]), where its sync server started four threads for each connection before it read
//! the first request: under TCG, a cold pod's first connection spent ~10–14 ms of ~80 on
//! them (FIELD-NOTES, "A task-based server instead"). A request that can block — a long poll,
//! a wait, a container's creation, a netlink call — runs on one of the runtime's blocking
//! threads, which tokio keeps for further requests until one has idled 10 s; one that answers from
//! memory or `/proc`, and a sandbox's creation (a clone, the one request of a cold start's
//! path besides `Check`), runs on the runtime thread itself, where it costs no hop between
//! threads on a guest's single vCPU.

use std::sync::Arc;
use std::time::Duration;

use husk_protocols::agent::*;
use husk_protocols::agent_ttrpc_async::{create_agent, Agent};
use husk_protocols::ttrpc::r#async::TtrpcContext;
use husk_protocols::ttrpc::{self, Code};
use husk_protocols::{API_VERSION, MAX_READ_CHUNK};

use crate::container::{Engine, Error};
use crate::guest_info::GuestInfo;

/// What DestroySandbox ends: the VM (as PID 1), or just this process (the host tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDestroy {
    PowerOff,
    Exit,
}

pub struct Service {
    pub engine: Arc<Engine>,
    pub ready_ms: u64,
    pub on_destroy: OnDestroy,
    pub cgroup_controllers: Vec<String>,
}

/// Why the agent API cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("starting the server's thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("starting the server's tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("binding {addr}: {source} — the guest kernel needs CONFIG_VIRTIO_VSOCKETS (a unix socket's directory must exist for `serve`)")]
    Bind {
        addr: String,
        #[source]
        source: ttrpc::Error,
    },
    #[error("starting the ttrpc server on {addr}: {source}")]
    Start {
        addr: String,
        #[source]
        source: ttrpc::Error,
    },
    #[error("the server's thread ended before it served {0}")]
    Gone(String),
}

/// Serves the agent API on `addr` from a thread of its own, which drives the server's
/// current-thread runtime for as long as the agent lives; returns once the server accepts
/// connections, or with why it cannot.
pub fn start(addr: &str, service: Service) -> Result<(), ServeError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let owned = addr.to_string();
    std::thread::Builder::new()
        .name("ttrpc".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                // A pod's pending long polls and waits each hold one (as ttrpc's sync server
                // held one of its threads); the bound is the sync server's.
                .max_blocking_threads(256)
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(ServeError::Runtime(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let server = match ttrpc::r#async::Server::new().bind(&owned) {
                    Ok(s) => s,
                    Err(source) => {
                        let _ = tx.send(Err(ServeError::Bind {
                            addr: owned,
                            source,
                        }));
                        return;
                    }
                };
                let api = create_agent(Arc::new(Api(Arc::new(service))));
                let mut server = server.register_service(crate::logging::log_requests(api));
                if let Err(source) = server.start().await {
                    let _ = tx.send(Err(ServeError::Start {
                        addr: owned,
                        source,
                    }));
                    return;
                }
                let _ = tx.send(Ok(()));
                // The server lives as long as this future: to the end of the agent.
                std::future::pending::<()>().await;
                drop(server);
            });
        })
        .map_err(ServeError::Thread)?;
    rx.recv()
        .unwrap_or_else(|_| Err(ServeError::Gone(addr.to_string())))
}

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn map(e: Error) -> ttrpc::Error {
    let code = match &e {
        Error::Invalid { .. } => Code::INVALID_ARGUMENT,
        Error::NotFound(_) | Error::NoProcess { .. } => Code::NOT_FOUND,
        Error::Exists(_) => Code::ALREADY_EXISTS,
        Error::State { .. } => Code::FAILED_PRECONDITION,
        Error::Failed { .. } => Code::INTERNAL,
    };
    // The console is the guest's log: every refused or failed request is on it.
    println!("husk-agent: request failed ({code:?}): {e}");
    status(code, e.to_string())
}

fn net(e: crate::network::Error) -> ttrpc::Error {
    let code = match e {
        crate::network::Error::Invalid(_) => Code::INVALID_ARGUMENT,
        _ => Code::INTERNAL,
    };
    status(code, e.to_string())
}

type R<T> = ttrpc::Result<T>;

/// The agent API as ttrpc's async server calls it: each method answers on the runtime thread
/// or on a blocking thread (the module's introduction says which and why), by the
/// [`Service`] method of the same name.
pub struct Api(pub Arc<Service>);

impl Api {
    /// `f` on one of the runtime's blocking threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Service) -> R<T> + Send + 'static,
    ) -> R<T> {
        let service = self.0.clone();
        tokio::task::spawn_blocking(move || f(&service))
            .await
            .map_err(|e| status(Code::INTERNAL, format!("the request's thread failed: {e}")))?
    }
}

/// The API's methods, each by the [`Service`] method of the same name: `inline` ones on the
/// runtime thread, `blocking` ones through [`Api::blocking`].
macro_rules! api {
    (
        inline { $($i:ident($it:ty) -> $io:ty;)* }
        blocking { $($b:ident($bt:ty) -> $bo:ty;)* }
    ) => {
        #[async_trait::async_trait]
        impl Agent for Api {
            $(
                async fn $i(&self, _: &TtrpcContext, r: $it) -> R<$io> {
                    self.0.$i(r)
                }
            )*
            $(
                async fn $b(&self, _: &TtrpcContext, r: $bt) -> R<$bo> {
                    self.blocking(move |s| s.$b(r)).await
                }
            )*
            async fn create_sandbox(&self, _: &TtrpcContext, r: CreateSandboxRequest) -> R<Empty> {
                // A pool's provisional sandbox rehearses a container's creation (seconds
                // under TCG): off the runtime thread, which serves the pool's checks meanwhile.
                if r.provisional {
                    self.blocking(move |s| s.create_sandbox(r)).await
                } else {
                    self.0.create_sandbox(r)
                }
            }
        }
    };
}

api! {
    inline {
        check(CheckRequest) -> CheckResponse;
        get_guest_details(GuestDetailsRequest) -> GuestDetails;
        get_guest_stats(GuestStatsRequest) -> GuestStats;
        destroy_sandbox(DestroySandboxRequest) -> Empty;
        set_guest_date_time(SetGuestDateTimeRequest) -> Empty;
    }
    blocking {
        create_container(CreateContainerRequest) -> Empty;
        start_container(ContainerRef) -> ProcessStarted;
        remove_container(RemoveContainerRequest) -> Empty;
        pause_container(ContainerRef) -> Empty;
        resume_container(ContainerRef) -> Empty;
        update_container(UpdateContainerRequest) -> Empty;
        stats_container(ContainerRef) -> ContainerStats;
        list_processes(ContainerRef) -> ProcessList;
        exec_process(ExecProcessRequest) -> ProcessStarted;
        signal_process(SignalProcessRequest) -> Empty;
        wait_process(ProcessRef) -> WaitProcessResponse;
        write_stdin(WriteStdinRequest) -> WriteStdinResponse;
        close_stdin(ProcessRef) -> Empty;
        read_stdout(ReadStreamRequest) -> ReadStreamResponse;
        read_stderr(ReadStreamRequest) -> ReadStreamResponse;
        tty_win_resize(TtyWinResizeRequest) -> Empty;
        update_interface(UpdateInterfaceRequest) -> Interface;
        update_routes(UpdateRoutesRequest) -> Routes;
        list_interfaces(ListInterfacesRequest) -> Interfaces;
        get_oom_event(GetOOMEventRequest) -> OOMEvent;
    }
}

impl Service {
    fn check(&self, _: CheckRequest) -> R<CheckResponse> {
        Ok(CheckResponse {
            api_version: API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn get_guest_details(&self, _: GuestDetailsRequest) -> R<GuestDetails> {
        let i = GuestInfo::read();
        Ok(GuestDetails {
            api_version: API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kernel_release: i.kernel_release,
            vcpus: u32::try_from(i.vcpus).unwrap_or(0),
            mem_total_kib: i.mem_total_kib,
            ready_ms: self.ready_ms,
            cgroup_controllers: self.cgroup_controllers.clone(),
            clocksource: crate::guest_info::clocksource(),
            ..Default::default()
        })
    }

    fn get_guest_stats(&self, _: GuestStatsRequest) -> R<GuestStats> {
        let s = crate::guest_info::GuestStats::read();
        Ok(GuestStats {
            mem_total_kib: s.mem_total_kib,
            mem_free_kib: s.mem_free_kib,
            mem_available_kib: s.mem_available_kib,
            ..Default::default()
        })
    }

    fn create_sandbox(&self, r: CreateSandboxRequest) -> R<Empty> {
        self.engine
            .create_sandbox(&r.sandbox_id, &r.hostname, r.provisional)
            .map_err(map)?;
        Ok(Empty::new())
    }

    fn destroy_sandbox(&self, _: DestroySandboxRequest) -> R<Empty> {
        let engine = self.engine.clone();
        let on = self.on_destroy;
        // Reply first: the power-off takes the connection with it.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            engine.destroy_all();
            match on {
                OnDestroy::PowerOff => crate::power::off("DestroySandbox"),
                OnDestroy::Exit => std::process::exit(0),
            }
        });
        Ok(Empty::new())
    }

    fn create_container(&self, r: CreateContainerRequest) -> R<Empty> {
        self.engine
            .create(&r.container_id, &r.oci_spec_json, r.terminal)
            .map_err(map)?;
        Ok(Empty::new())
    }

    fn start_container(&self, r: ContainerRef) -> R<ProcessStarted> {
        let pid = self.engine.start(&r.container_id).map_err(map)?;
        Ok(ProcessStarted {
            pid,
            ..Default::default()
        })
    }

    fn remove_container(&self, r: RemoveContainerRequest) -> R<Empty> {
        self.engine.remove(&r.container_id, r.force).map_err(map)?;
        Ok(Empty::new())
    }

    fn pause_container(&self, r: ContainerRef) -> R<Empty> {
        self.engine.pause(&r.container_id, true).map_err(map)?;
        Ok(Empty::new())
    }

    fn resume_container(&self, r: ContainerRef) -> R<Empty> {
        self.engine.pause(&r.container_id, false).map_err(map)?;
        Ok(Empty::new())
    }

    fn update_container(&self, r: UpdateContainerRequest) -> R<Empty> {
        self.engine
            .update(&r.container_id, &r.oci_resources_json)
            .map_err(map)?;
        Ok(Empty::new())
    }

    fn stats_container(&self, r: ContainerRef) -> R<ContainerStats> {
        let s = self.engine.stats(&r.container_id).map_err(map)?;
        Ok(ContainerStats {
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            memory_current_bytes: s.memory_current,
            memory_max_bytes: s.memory_max,
            pids_current: s.pids_current,
            pids_max: s.pids_max,
            io_read_bytes: s.io_read_bytes,
            io_write_bytes: s.io_write_bytes,
            oom_kills: s.oom_kills,
            ..Default::default()
        })
    }

    fn list_processes(&self, r: ContainerRef) -> R<ProcessList> {
        Ok(ProcessList {
            pids: self.engine.pids(&r.container_id).map_err(map)?,
            ..Default::default()
        })
    }

    fn exec_process(&self, r: ExecProcessRequest) -> R<ProcessStarted> {
        let pid = self
            .engine
            .exec(&r.container_id, &r.exec_id, &r.oci_process_json)
            .map_err(map)?;
        Ok(ProcessStarted {
            pid,
            ..Default::default()
        })
    }

    fn signal_process(&self, r: SignalProcessRequest) -> R<Empty> {
        self.engine
            .signal(&r.container_id, &r.exec_id, r.signal, r.all)
            .map_err(map)?;
        Ok(Empty::new())
    }

    fn wait_process(&self, r: ProcessRef) -> R<WaitProcessResponse> {
        let e = self.engine.wait(&r.container_id, &r.exec_id).map_err(map)?;
        Ok(WaitProcessResponse {
            exit_status: e.status(),
            signal: match e {
                crate::reaper::Exit::Signal(s) => u32::try_from(s).unwrap_or(0),
                crate::reaper::Exit::Code(_) => 0,
            },
            ..Default::default()
        })
    }

    fn write_stdin(&self, r: WriteStdinRequest) -> R<WriteStdinResponse> {
        let p = self
            .engine
            .stdio(&r.container_id, &r.exec_id)
            .map_err(map)?;
        let n = p.stdio.write_stdin(&r.data).map_err(|e| {
            status(
                Code::FAILED_PRECONDITION,
                format!("{} {:?}: {e}", r.container_id, r.exec_id),
            )
        })?;
        Ok(WriteStdinResponse {
            written: n as u64,
            ..Default::default()
        })
    }

    fn close_stdin(&self, r: ProcessRef) -> R<Empty> {
        let p = self
            .engine
            .stdio(&r.container_id, &r.exec_id)
            .map_err(map)?;
        p.stdio.close_stdin().map_err(|e| {
            status(
                Code::INTERNAL,
                format!("{} {:?}: {e}", r.container_id, r.exec_id),
            )
        })?;
        Ok(Empty::new())
    }

    fn read_stdout(&self, r: ReadStreamRequest) -> R<ReadStreamResponse> {
        self.read(r, false)
    }

    fn read_stderr(&self, r: ReadStreamRequest) -> R<ReadStreamResponse> {
        self.read(r, true)
    }

    fn tty_win_resize(&self, r: TtyWinResizeRequest) -> R<Empty> {
        let p = self
            .engine
            .stdio(&r.container_id, &r.exec_id)
            .map_err(map)?;
        let rows = u16::try_from(r.rows).unwrap_or(u16::MAX);
        let cols = u16::try_from(r.columns).unwrap_or(u16::MAX);
        p.stdio.resize(rows, cols).map_err(|e| {
            status(
                Code::FAILED_PRECONDITION,
                format!("{} {:?}: {e}", r.container_id, r.exec_id),
            )
        })?;
        Ok(Empty::new())
    }

    fn update_interface(&self, r: UpdateInterfaceRequest) -> R<Interface> {
        let want = r.interface.into_option().ok_or_else(|| {
            status(
                Code::INVALID_ARGUMENT,
                "UpdateInterface: no interface given",
            )
        })?;
        let pf = r
            .port_forward
            .as_ref()
            .map(crate::network::PortForward::parse)
            .transpose()
            .map_err(net)?;
        let match_mac = (!r.match_mac.is_empty()).then_some(r.match_mac.as_str());
        crate::network::update_interface(&want, pf, match_mac).map_err(net)
    }

    fn update_routes(&self, r: UpdateRoutesRequest) -> R<Routes> {
        let routes = crate::network::update_routes(&r.routes).map_err(net)?;
        Ok(Routes {
            routes,
            ..Default::default()
        })
    }

    fn list_interfaces(&self, _: ListInterfacesRequest) -> R<Interfaces> {
        Ok(Interfaces {
            interfaces: crate::network::list_interfaces().map_err(net)?,
            ..Default::default()
        })
    }

    fn set_guest_date_time(&self, r: SetGuestDateTimeRequest) -> R<Empty> {
        if self.on_destroy == OnDestroy::Exit {
            return Err(status(
                Code::FAILED_PRECONDITION,
                "SetGuestDateTime: refused outside a guest (the agent is not PID 1)",
            ));
        }
        let ts = nix::sys::time::TimeSpec::new(r.seconds, r.nanos);
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(|e| {
            status(
                Code::INTERNAL,
                format!("setting the guest clock to {}s: {e}", r.seconds),
            )
        })?;
        Ok(Empty::new())
    }

    fn get_oom_event(&self, _: GetOOMEventRequest) -> R<OOMEvent> {
        Ok(OOMEvent {
            container_id: self.engine.next_oom(),
            ..Default::default()
        })
    }

    fn read(&self, r: ReadStreamRequest, err: bool) -> R<ReadStreamResponse> {
        let p = self
            .engine
            .stdio(&r.container_id, &r.exec_id)
            .map_err(map)?;
        let max = if r.max_len == 0 {
            MAX_READ_CHUNK
        } else {
            r.max_len.min(MAX_READ_CHUNK)
        } as usize;
        let exits = crate::reaper::exits();
        let exit_fd = exits.ended_fd(p.wait_pid);
        let ending = crate::container::stdio::Ending {
            ended: || exits.exited(p.wait_pid).is_some(),
            fd: exit_fd.as_deref().map(std::os::fd::AsFd::as_fd),
        };
        match p.stdio.read(err, max, ending) {
            Ok(Some(data)) => Ok(ReadStreamResponse {
                data,
                eof: false,
                ..Default::default()
            }),
            Ok(None) => Ok(ReadStreamResponse {
                eof: true,
                ..Default::default()
            }),
            Err(e) => Err(status(
                Code::INTERNAL,
                format!("{} {:?}: {e}", r.container_id, r.exec_id),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocols::ttrpc::{Error as TtrpcError, Request};
    use std::os::fd::IntoRawFd;

    /// Every rpc that agent.proto declares, by name.
    fn declared_methods() -> Vec<&'static str> {
        include_str!("../../protocols/protos/agent.proto")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .collect()
    }

    /// A request of `method` with an empty (all-default) message.
    fn request(method: &str, timeout: Duration) -> Request {
        let mut r = Request::new();
        r.service = "husk.agent.v1.Agent".into();
        r.method = method.into();
        r.timeout_nano = i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX);
        r
    }

    /// The generated async `Agent` trait answers a method it is not given with "… is not
    /// supported": every declared method must be served, and a request that blocks (a long
    /// poll, here GetOOMEvent with no OOM ever coming) must not hold up the others, which the
    /// sync server ensured with a thread per request.
    #[test]
    fn every_method_is_served_and_a_blocked_one_holds_up_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::new(crate::container::Config {
            shared_dir: dir.path().join("shared"),
            cgroup_root: None,
            rehearsal: None,
        });
        let service = Service {
            engine,
            ready_ms: 0,
            on_destroy: OnDestroy::Exit,
            cgroup_controllers: Vec::new(),
        };
        let sock = dir.path().join("agent.sock");
        start(&format!("unix://{}", sock.display()), service).unwrap();
        let connect = || {
            let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            ttrpc::Client::new(s.into_raw_fd()).unwrap()
        };
        let blocked = connect();
        // Detached: it waits for an OOM for as long as the test process lives.
        std::thread::spawn(move || blocked.request(request("GetOOMEvent", Duration::ZERO)));
        std::thread::sleep(Duration::from_millis(100));

        let client = connect();
        let methods = declared_methods();
        assert!(
            methods.len() >= 26,
            "agent.proto's rpcs not found: {methods:?}"
        );
        // Not asked: DestroySandbox ends this process, UpdateRoutes would rewrite this host's
        // routes (the test may run as root) and CreateSandbox starts a holder process. The VM
        // tests use all three on every pod.
        let not_asked = [
            "DestroySandbox",
            "UpdateRoutes",
            "CreateSandbox",
            "GetOOMEvent",
        ];
        for method in methods.iter().filter(|m| !not_asked.contains(m)) {
            match client.request(request(method, Duration::from_secs(10))) {
                Ok(_) => {}
                Err(TtrpcError::RpcStatus(s)) => assert!(
                    !s.message().contains("is not supported"),
                    "{method} is not served: {}",
                    s.message()
                ),
                Err(e) => panic!("{method} got no answer while GetOOMEvent waits: {e}"),
            }
        }
    }
}
