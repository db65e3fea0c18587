//! The shim's side of the agent API: ttrpc over the VM's hybrid-vsock socket.
//!
//! One control connection carries the short calls. Each process gets a connection of its
//! own for its long polls (`WaitProcess`, `ReadStdout`, `ReadStderr`): a ttrpc server serves
//! a connection with a bounded pool of threads, and blocked long polls must never starve the
//! control calls of another container.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use husk_protocols::agent::{self as pb, CheckRequest};
use husk_protocols::agent_ttrpc_async;

use crate::metrics::TimedClient;
use husk_protocols::ttrpc;
use husk_protocols::{AGENT_VSOCK_PORT, API_VERSION};

/// Deadline of a short call (anything but the long polls).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reaching the agent: {0}")]
    Connect(#[from] husk_hypervisor::vsock::VsockError),
    #[error("ttrpc client on {socket}: {message}")]
    Client { socket: PathBuf, message: String },
    #[error("the agent speaks API version {agent} (agent {agent_version}); this shim speaks {API_VERSION} — install matching shim and initramfs")]
    Version { agent: u32, agent_version: String },
    #[error("{call}: {message}")]
    Call { call: &'static str, message: String },
}

/// Turns a ttrpc error into a readable message (the agent's status message when it has one).
pub fn describe(e: &ttrpc::Error) -> String {
    match e {
        // The guest's words: bounded and escaped before they reach a log or containerd.
        ttrpc::Error::RpcStatus(s) => format!(
            "{:?}: {}",
            s.code(),
            husk_hypervisor::guest_text::message(s.message())
        ),
        other => other.to_string(),
    }
}

/// Whether `stream` is open at both ends with nothing waiting to be read (a poll that does
/// not wait). A poll that fails counts as not: the caller then connects anew.
fn quiet_and_open(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one live pollfd for the duration of the call; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 0
}

/// Whether a call failed because its connection is closed or broken: the request may not
/// have reached the agent, and a new connection may do better. Not a deadline (the agent
/// may still be working on it) nor an answer from the agent.
pub fn connection_broke(e: &ttrpc::Error) -> bool {
    match e {
        ttrpc::Error::Socket(_) | ttrpc::Error::LocalClosed | ttrpc::Error::RemoteClosed => true,
        // ttrpc 0.10's async client, for a request on a connection whose task has ended
        // (its far end closed), has no variant of its own: "reserve channel capacity failed:
        // channel closed". The unit tests below pin it.
        ttrpc::Error::Others(m) => m.ends_with("channel closed"),
        _ => false,
    }
}

/// A context with the short-call deadline.
pub fn short() -> ttrpc::context::Context {
    ttrpc::context::with_duration(CALL_TIMEOUT)
}

/// A context without deadline, for long polls.
pub(crate) fn long_poll() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

#[derive(Clone)]
pub struct Agent {
    socket: PathBuf,
    control: TimedClient,
    pub agent_version: String,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("socket", &self.socket)
            .finish()
    }
}

/// The tokio runtime every agent connection of this shim lives on: one worker thread, whose
/// epoll waits on all of them. ttrpc 0.10's sync client gives each connection a receiver
/// thread that polls its socket with a 10 ms timeout (`POLL_MAX_TIME`) for as long as the
/// connection lives: an idle pod's shim (the control connection, the OOM watch and one per
/// process) woke ~300 times a second for nothing and used ~1 % of a core
/// (docs/FIELD-NOTES.md, "Where an idle pod's host memory is under TCG").
fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("agent-io")
                .enable_all()
                .build()
                .map_err(|e| format!("starting the agent connections' runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A connection to the agent, called from the shim's (blocking) threads: ttrpc's async
/// client on [`runtime`], each call waited for on the calling thread. Clones share the
/// connection; it closes when the last clone goes.
#[derive(Clone)]
pub struct AgentClient {
    inner: agent_ttrpc_async::AgentClient,
    runtime: &'static tokio::runtime::Runtime,
}

macro_rules! blocking_calls {
    ($($method:ident($req:ty) -> $resp:ty;)*) => {
        impl AgentClient {
            $(
                #[doc = concat!("`", stringify!($method), "`, waited for on this thread.")]
                pub fn $method(
                    &self,
                    ctx: ttrpc::context::Context,
                    req: &$req,
                ) -> ttrpc::Result<$resp> {
                    self.runtime.block_on(self.inner.$method(ctx, req))
                }
            )*
        }
    };
}

blocking_calls! {
    check(pb::CheckRequest) -> pb::CheckResponse;
    get_guest_details(pb::GuestDetailsRequest) -> pb::GuestDetails;
    create_sandbox(pb::CreateSandboxRequest) -> pb::Empty;
    destroy_sandbox(pb::DestroySandboxRequest) -> pb::Empty;
    create_container(pb::CreateContainerRequest) -> pb::Empty;
    start_container(pb::ContainerRef) -> pb::ProcessStarted;
    remove_container(pb::RemoveContainerRequest) -> pb::Empty;
    pause_container(pb::ContainerRef) -> pb::Empty;
    resume_container(pb::ContainerRef) -> pb::Empty;
    update_container(pb::UpdateContainerRequest) -> pb::Empty;
    stats_container(pb::ContainerRef) -> pb::ContainerStats;
    list_processes(pb::ContainerRef) -> pb::ProcessList;
    exec_process(pb::ExecProcessRequest) -> pb::ProcessStarted;
    signal_process(pb::SignalProcessRequest) -> pb::Empty;
    wait_process(pb::ProcessRef) -> pb::WaitProcessResponse;
    write_stdin(pb::WriteStdinRequest) -> pb::WriteStdinResponse;
    close_stdin(pb::ProcessRef) -> pb::Empty;
    read_stdout(pb::ReadStreamRequest) -> pb::ReadStreamResponse;
    read_stderr(pb::ReadStreamRequest) -> pb::ReadStreamResponse;
    tty_win_resize(pb::TtyWinResizeRequest) -> pb::Empty;
    update_interface(pb::UpdateInterfaceRequest) -> pb::Interface;
    update_routes(pb::UpdateRoutesRequest) -> pb::Routes;
    list_interfaces(pb::ListInterfacesRequest) -> pb::Interfaces;
    set_guest_date_time(pb::SetGuestDateTimeRequest) -> pb::Empty;
    get_oom_event(pb::GetOOMEventRequest) -> pb::OOMEvent;
    get_guest_stats(pb::GuestStatsRequest) -> pb::GuestStats;
}

fn open(socket: &Path, timeout: Duration) -> Result<AgentClient, AgentError> {
    let stream = husk_hypervisor::vsock::connect_retry(socket, AGENT_VSOCK_PORT, timeout)?;
    client_on(stream, socket)
}

/// ttrpc's async client on `stream`, living on [`runtime`] (which it returns too): the
/// socket is registered with the runtime's reactor, and the client starts its connection
/// task there. For the agent's connections and containerd's event service alike.
pub(crate) fn async_client(
    stream: UnixStream,
) -> Result<(ttrpc::r#async::Client, &'static tokio::runtime::Runtime), String> {
    let runtime = runtime()?;
    let _in_runtime = runtime.enter();
    let socket = ttrpc::r#async::transport::Socket::try_from(stream)
        .map_err(|e| format!("registering the connection with the runtime: {e}"))?;
    Ok((ttrpc::r#async::Client::new(socket), runtime))
}

/// A ttrpc client on a connection whose hybrid-vsock handshake is done.
fn client_on(stream: UnixStream, socket: &Path) -> Result<AgentClient, AgentError> {
    let (client, runtime) = async_client(stream).map_err(|message| AgentError::Client {
        socket: socket.to_path_buf(),
        message,
    })?;
    Ok(AgentClient {
        inner: agent_ttrpc_async::AgentClient::new(client),
        runtime,
    })
}

impl Agent {
    /// Connects (retrying until `timeout`: the guest may still be booting) and checks that the
    /// agent speaks our API version.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, AgentError> {
        Self::checked(open(socket, timeout)?, socket)
    }

    /// [`Agent::connect`] over a connection opened already (a pooled VM's, from its keeper:
    /// the handshake done, nothing sent on it). `socket`: where later connections are made.
    /// `agent_version`: the agent's, if the keeper checked this VM's agent's API version
    /// already; then nothing is asked here, and a connection that broke shows at its first
    /// call ([`connection_broke`]).
    pub fn over(
        stream: UnixStream,
        socket: &Path,
        agent_version: Option<String>,
    ) -> Result<Self, AgentError> {
        if agent_version.is_some() {
            // Nothing is asked, so a connection whose far end is gone is found here, before a
            // request goes out: the caller then connects anew with nothing sent.
            if !quiet_and_open(&stream) {
                return Err(AgentError::Client {
                    socket: socket.to_path_buf(),
                    message: "the kept connection was closed or sent unasked".into(),
                });
            }
        }
        let client = client_on(stream, socket)?;
        match agent_version {
            Some(v) => Ok(Self {
                socket: socket.to_path_buf(),
                control: TimedClient::new(client),
                agent_version: husk_hypervisor::guest_text::message(&v),
            }),
            None => Self::checked(client, socket),
        }
    }

    /// Checks that the agent on `client` speaks our API version.
    fn checked(client: AgentClient, socket: &Path) -> Result<Self, AgentError> {
        let control = TimedClient::new(client);
        let req = CheckRequest {
            api_version: API_VERSION,
            ..Default::default()
        };
        let resp = control.check(short(), &req).map_err(|e| AgentError::Call {
            call: "Check",
            message: describe(&e),
        })?;
        if resp.api_version != API_VERSION {
            return Err(AgentError::Version {
                agent: resp.api_version,
                agent_version: husk_hypervisor::guest_text::message(&resp.agent_version),
            });
        }
        Ok(Self {
            socket: socket.to_path_buf(),
            control,
            agent_version: husk_hypervisor::guest_text::message(&resp.agent_version),
        })
    }

    /// The control connection (its short calls are timed for the metrics).
    pub fn client(&self) -> &TimedClient {
        &self.control
    }

    /// A new connection, for one process's long polls.
    pub fn connection(&self) -> Result<AgentClient, AgentError> {
        open(&self.socket, CALL_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocols::agent::CreateSandboxRequest;

    fn sandbox() -> CreateSandboxRequest {
        CreateSandboxRequest {
            sandbox_id: "sb".into(),
            ..Default::default()
        }
    }

    const SOCKET: &str = "/run/husk/x/vm/vsock.sock";

    #[test]
    fn a_kept_connection_closed_before_use_is_refused_with_nothing_sent() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let e = Agent::over(ours, Path::new(SOCKET), Some("0.1.0".into())).unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
        // Something sent unasked is refused too: ttrpc would take it for an answer.
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut theirs, b"x").unwrap();
        assert!(Agent::over(ours, Path::new(SOCKET), Some("0.1.0".into())).is_err());
        // A live, quiet one is taken, with the version given and nothing asked.
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let agent = Agent::over(ours, Path::new(SOCKET), Some("0.1.0".into())).unwrap();
        assert_eq!(agent.agent_version, "0.1.0");
    }

    #[test]
    fn a_connection_that_breaks_under_a_call_shows_as_broken() {
        // At once (the client may not have seen the end yet) and after its connection task
        // has seen it: ttrpc words the two differently; both count.
        for wait in [Duration::ZERO, Duration::from_millis(200)] {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let agent = Agent::over(ours, Path::new(SOCKET), Some("0.1.0".into())).unwrap();
            drop(theirs);
            std::thread::sleep(wait);
            let e = agent
                .client()
                .create_sandbox(short(), &sandbox())
                .expect_err("nobody is at the other end");
            assert!(connection_broke(&e), "after {wait:?}: {e:?}");
        }
    }

    #[test]
    fn a_call_that_is_not_answered_in_time_is_no_broken_connection() {
        // The agent may still be working on it: sending it again could do it twice.
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let agent = Agent::over(ours, Path::new(SOCKET), Some("0.1.0".into())).unwrap();
        let e = agent
            .client()
            .create_sandbox(
                ttrpc::context::with_duration(Duration::from_millis(200)),
                &sandbox(),
            )
            .expect_err("nobody answers");
        assert!(!connection_broke(&e), "{e:?}");
        let status =
            ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::ALREADY_EXISTS, "sandbox sb"));
        assert!(!connection_broke(&status));
    }
}
