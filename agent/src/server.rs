//! The agent API (husk-protocols) served with ttrpc: maps each RPC onto the container
//! [`Engine`](crate::container::Engine) and its errors onto ttrpc status codes.

use std::sync::Arc;
use std::time::Duration;

use husk_protocols::agent::*;
use husk_protocols::agent_ttrpc::Agent;
use husk_protocols::ttrpc::{self, Code, TtrpcContext};
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

impl Agent for Service {
    fn check(&self, _: &TtrpcContext, _: CheckRequest) -> R<CheckResponse> {
        Ok(CheckResponse {
            api_version: API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn get_guest_details(&self, _: &TtrpcContext, _: GuestDetailsRequest) -> R<GuestDetails> {
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

    fn get_guest_stats(&self, _: &TtrpcContext, _: GuestStatsRequest) -> R<GuestStats> {
        let s = crate::guest_info::GuestStats::read();
        Ok(GuestStats {
            mem_total_kib: s.mem_total_kib,
            mem_free_kib: s.mem_free_kib,
            mem_available_kib: s.mem_available_kib,
            ..Default::default()
        })
    }

    fn create_sandbox(&self, _: &TtrpcContext, r: CreateSandboxRequest) -> R<Empty> {
        self.engine
            .create_sandbox(&r.sandbox_id, &r.hostname, r.provisional)
            .map_err(map)?;
        Ok(Empty::new())
    }

    fn destroy_sandbox(&self, _: &TtrpcContext, _: DestroySandboxRequest) -> R<Empty> {
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

    fn create_container(&self, _: &TtrpcContext, r: CreateContainerRequest) -> R<Empty> {
        self.engine
            .create(&r.container_id, &r.oci_spec_json, r.terminal)
            .map_err(map)?;
        Ok(Empty::new())
    }

    fn start_container(&self, _: &TtrpcContext, r: ContainerRef) -> R<ProcessStarted> {
        let pid = self.engine.start(&r.container_id).map_err(map)?;
        Ok(ProcessStarted {
            pid,
            ..Default::default()
        })
    }

    fn remove_container(&self, _: &TtrpcContext, r: RemoveContainerRequest) -> R<Empty> {
        self.engine.remove(&r.container_id, r.force).map_err(map)?;
        Ok(Empty::new())
    }

    fn pause_container(&self, _: &TtrpcContext, r: ContainerRef) -> R<Empty> {
        self.engine.pause(&r.container_id, true).map_err(map)?;
        Ok(Empty::new())
    }

    fn resume_container(&self, _: &TtrpcContext, r: ContainerRef) -> R<Empty> {
        self.engine.pause(&r.container_id, false).map_err(map)?;
        Ok(Empty::new())
    }

    fn update_container(&self, _: &TtrpcContext, r: UpdateContainerRequest) -> R<Empty> {
        self.engine
            .update(&r.container_id, &r.oci_resources_json)
            .map_err(map)?;
        Ok(Empty::new())
    }

    fn stats_container(&self, _: &TtrpcContext, r: ContainerRef) -> R<ContainerStats> {
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

    fn list_processes(&self, _: &TtrpcContext, r: ContainerRef) -> R<ProcessList> {
        Ok(ProcessList {
            pids: self.engine.pids(&r.container_id).map_err(map)?,
            ..Default::default()
        })
    }

    fn exec_process(&self, _: &TtrpcContext, r: ExecProcessRequest) -> R<ProcessStarted> {
        let pid = self
            .engine
            .exec(&r.container_id, &r.exec_id, &r.oci_process_json)
            .map_err(map)?;
        Ok(ProcessStarted {
            pid,
            ..Default::default()
        })
    }

    fn signal_process(&self, _: &TtrpcContext, r: SignalProcessRequest) -> R<Empty> {
        self.engine
            .signal(&r.container_id, &r.exec_id, r.signal, r.all)
            .map_err(map)?;
        Ok(Empty::new())
    }

    fn wait_process(&self, _: &TtrpcContext, r: ProcessRef) -> R<WaitProcessResponse> {
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

    fn write_stdin(&self, _: &TtrpcContext, r: WriteStdinRequest) -> R<WriteStdinResponse> {
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

    fn close_stdin(&self, _: &TtrpcContext, r: ProcessRef) -> R<Empty> {
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

    fn read_stdout(&self, _: &TtrpcContext, r: ReadStreamRequest) -> R<ReadStreamResponse> {
        self.read(r, false)
    }

    fn read_stderr(&self, _: &TtrpcContext, r: ReadStreamRequest) -> R<ReadStreamResponse> {
        self.read(r, true)
    }

    fn tty_win_resize(&self, _: &TtrpcContext, r: TtyWinResizeRequest) -> R<Empty> {
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

    fn update_interface(&self, _: &TtrpcContext, r: UpdateInterfaceRequest) -> R<Interface> {
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

    fn update_routes(&self, _: &TtrpcContext, r: UpdateRoutesRequest) -> R<Routes> {
        let routes = crate::network::update_routes(&r.routes).map_err(net)?;
        Ok(Routes {
            routes,
            ..Default::default()
        })
    }

    fn list_interfaces(&self, _: &TtrpcContext, _: ListInterfacesRequest) -> R<Interfaces> {
        Ok(Interfaces {
            interfaces: crate::network::list_interfaces().map_err(net)?,
            ..Default::default()
        })
    }

    fn set_guest_date_time(&self, _: &TtrpcContext, r: SetGuestDateTimeRequest) -> R<Empty> {
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

    fn get_oom_event(&self, _: &TtrpcContext, _: GetOOMEventRequest) -> R<OOMEvent> {
        Ok(OOMEvent {
            container_id: self.engine.next_oom(),
            ..Default::default()
        })
    }
}

impl Service {
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
