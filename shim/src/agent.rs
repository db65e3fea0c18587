//! The shim's side of the agent API: ttrpc over the VM's hybrid-vsock socket.
//!
//! One control connection carries the short calls. Each process gets a connection of its
//! own for its long polls (`WaitProcess`, `ReadStdout`, `ReadStderr`): a ttrpc server serves
//! a connection with a bounded pool of threads, and blocked long polls must never starve the
//! control calls of another container.

use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_protocols::agent::CheckRequest;
use husk_protocols::agent_ttrpc::AgentClient;

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
        ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
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

fn open(socket: &Path, timeout: Duration) -> Result<AgentClient, AgentError> {
    let stream = husk_hypervisor::vsock::connect_retry(socket, AGENT_VSOCK_PORT, timeout)?;
    client_on(stream, socket)
}

/// A ttrpc client on a connection whose hybrid-vsock handshake is done.
fn client_on(stream: UnixStream, socket: &Path) -> Result<AgentClient, AgentError> {
    let client = ttrpc::Client::new(stream.into_raw_fd()).map_err(|e| AgentError::Client {
        socket: socket.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(AgentClient::new(client))
}

impl Agent {
    /// Connects (retrying until `timeout`: the guest may still be booting) and checks that the
    /// agent speaks our API version.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, AgentError> {
        Self::checked(open(socket, timeout)?, socket)
    }

    /// [`Agent::connect`] over a connection opened already (a pooled VM's, from its keeper:
    /// the handshake done, nothing sent on it). `socket`: where later connections are made.
    pub fn over(stream: UnixStream, socket: &Path) -> Result<Self, AgentError> {
        Self::checked(client_on(stream, socket)?, socket)
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
                agent_version: resp.agent_version,
            });
        }
        Ok(Self {
            socket: socket.to_path_buf(),
            control,
            agent_version: resp.agent_version,
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
