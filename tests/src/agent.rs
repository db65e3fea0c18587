//! Driving husk-agent from a test: the static agent binary, a busybox rootfs in a shared
//! directory, OCI specs for it, and a small client over the agent API (on the host through
//! `husk-agent serve` on a unix socket, in a VM through hybrid vsock).

use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_protocols::agent::*;
use husk_protocols::agent_ttrpc::AgentClient;
use husk_protocols::ttrpc::{self, context};
use serde_json::{json, Value};

/// The static agent (`HUSK_AGENT`, else the guest build's output).
pub fn agent_binary() -> PathBuf {
    let p = std::env::var_os("HUSK_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            crate::workspace().join("target/x86_64-unknown-linux-gnu/guest/husk-agent")
        });
    assert!(
        p.is_file(),
        "{}: missing — build it with CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build -p husk-agent --profile guest --target x86_64-unknown-linux-gnu (or point HUSK_AGENT at one)",
        p.display()
    );
    p
}

/// The static busybox the rootfs is made of.
pub fn busybox() -> PathBuf {
    crate::require_program("busybox", "busybox-static")
}

/// Applets linked in the test rootfs.
const APPLETS: [&str; 25] = [
    "sh",
    "cat",
    "echo",
    "true",
    "false",
    "sleep",
    "id",
    "hostname",
    "head",
    "dd",
    "wc",
    "ls",
    "mkdir",
    "touch",
    "kill",
    "grep",
    "stty",
    "tr",
    "readlink",
    "ps",
    "sha256sum",
    "yes",
    "tail",
    "usleep",
    "cut",
];

/// Makes `<shared>/<id>/rootfs` a busybox root (bin/, proc/, dev/, sys/, tmp/, etc/).
pub fn busybox_rootfs(shared: &Path, id: &str) -> PathBuf {
    let root = shared.join(id).join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(busybox(), root.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    root
}

/// A runc-like spec for `args` on the busybox rootfs: new pid, mount, ipc, uts namespaces,
/// proc/dev/devpts/shm/mqueue/sys mounts, default masked and read-only paths.
pub fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": { "path": "rootfs" },
        "hostname": "husk-test",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/bin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_NET_BIND_SERVICE"]
            }
        },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "namespaces": [ { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" } ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// A client with a default per-call timeout.
pub struct Agent {
    pub client: AgentClient,
}

/// Per-call timeout: TCG is slow, and WaitProcess/ReadStdout block on purpose.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

fn ctx() -> context::Context {
    context::with_timeout(i64::try_from(CALL_TIMEOUT.as_nanos()).unwrap_or(i64::MAX))
}

/// A finished process: exit status and its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl Agent {
    /// Over a unix socket (`husk-agent serve`), retrying until `timeout`.
    pub fn connect_unix(sock: &Path, timeout: Duration) -> Self {
        let deadline = Instant::now() + timeout;
        loop {
            match std::os::unix::net::UnixStream::connect(sock) {
                Ok(s) => return Self::from_fd(s.into_raw_fd()),
                Err(e) if Instant::now() >= deadline => {
                    panic!("connecting to the agent at {}: {e}", sock.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Over the VM's hybrid-vsock socket, port 1024.
    pub fn connect_vsock(sock: &Path, timeout: Duration) -> Self {
        let s =
            husk_hypervisor::vsock::connect_retry(sock, husk_protocols::AGENT_VSOCK_PORT, timeout)
                .unwrap_or_else(|e| panic!("reaching the agent: {e}"));
        Self::from_fd(s.into_raw_fd())
    }

    /// Over a connected stream (a hybrid-vsock connection after its handshake).
    pub fn from_stream(s: std::os::unix::net::UnixStream) -> Self {
        Self::from_fd(s.into_raw_fd())
    }

    fn from_fd(fd: i32) -> Self {
        Self {
            client: AgentClient::new(ttrpc::Client::new(fd).expect("ttrpc client")),
        }
    }

    pub fn check(&self) -> CheckResponse {
        self.client
            .check(
                ctx(),
                &CheckRequest {
                    api_version: husk_protocols::API_VERSION,
                    ..Default::default()
                },
            )
            .expect("Check")
    }

    pub fn create(&self, id: &str, spec: &Value, terminal: bool) -> ttrpc::Result<Empty> {
        self.client.create_container(
            ctx(),
            &CreateContainerRequest {
                container_id: id.into(),
                oci_spec_json: serde_json::to_vec(spec).unwrap(),
                terminal,
                ..Default::default()
            },
        )
    }

    pub fn create_raw(&self, id: &str, json: &[u8]) -> ttrpc::Result<Empty> {
        self.client.create_container(
            ctx(),
            &CreateContainerRequest {
                container_id: id.into(),
                oci_spec_json: json.to_vec(),
                ..Default::default()
            },
        )
    }

    pub fn start(&self, id: &str) -> u32 {
        self.client
            .start_container(
                ctx(),
                &ContainerRef {
                    container_id: id.into(),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("StartContainer {id}: {e:?}"))
            .pid
    }

    pub fn exec(&self, id: &str, exec_id: &str, process: &Value) -> ttrpc::Result<ProcessStarted> {
        self.client.exec_process(
            ctx(),
            &ExecProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                oci_process_json: serde_json::to_vec(process).unwrap(),
                ..Default::default()
            },
        )
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> WaitProcessResponse {
        self.client
            .wait_process(
                ctx(),
                &ProcessRef {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("WaitProcess {id}/{exec_id}: {e:?}"))
    }

    pub fn signal(&self, id: &str, exec_id: &str, sig: i32) {
        self.client
            .signal_process(
                ctx(),
                &SignalProcessRequest {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    signal: u32::try_from(sig).expect("signal numbers are positive"),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("SignalProcess {id}/{exec_id}: {e:?}"));
    }

    /// One chunk (or `None` at EOF).
    pub fn read(&self, id: &str, exec_id: &str, stderr: bool) -> Option<Vec<u8>> {
        let req = ReadStreamRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let r = if stderr {
            self.client.read_stderr(ctx(), &req)
        } else {
            self.client.read_stdout(ctx(), &req)
        }
        .unwrap_or_else(|e| panic!("Read {id}/{exec_id}: {e:?}"));
        (!r.eof).then_some(r.data)
    }

    pub fn read_all(&self, id: &str, exec_id: &str, stderr: bool) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = self.read(id, exec_id, stderr) {
            out.extend(chunk);
        }
        out
    }

    /// Reads stdout (a terminal's output) until `want` shows up within `timeout`; all of it.
    pub fn read_until(&self, id: &str, exec_id: &str, want: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains(want) {
            assert!(
                Instant::now() < deadline,
                "no {want:?} from {id}/{exec_id}; saw {:?}",
                String::from_utf8_lossy(&seen)
            );
            match self.read(id, exec_id, false) {
                Some(c) => seen.extend(c),
                None => panic!(
                    "{id}/{exec_id}: output ended before {want:?}; saw {:?}",
                    String::from_utf8_lossy(&seen)
                ),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    }

    pub fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) {
        self.client
            .write_stdin(
                ctx(),
                &WriteStdinRequest {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    data: data.to_vec(),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("WriteStdin {id}/{exec_id}: {e:?}"));
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) {
        self.client
            .close_stdin(
                ctx(),
                &ProcessRef {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("CloseStdin {id}/{exec_id}: {e:?}"));
    }

    pub fn remove(&self, id: &str, force: bool) -> ttrpc::Result<Empty> {
        self.client.remove_container(
            ctx(),
            &RemoveContainerRequest {
                container_id: id.into(),
                force,
                ..Default::default()
            },
        )
    }

    /// Starts the (already created) container, collects stdout and stderr to EOF on two
    /// threads, waits, and returns everything.
    pub fn run_created(&self, id: &str) -> Output {
        self.start(id);
        self.collect(id, "")
    }

    /// Reads both streams to EOF concurrently, then waits for the process.
    pub fn collect(&self, id: &str, exec_id: &str) -> Output {
        std::thread::scope(|s| {
            let err = s.spawn(|| self.read_all(id, exec_id, true));
            let stdout = self.read_all(id, exec_id, false);
            let stderr = err.join().unwrap();
            let status = self.wait(id, exec_id).exit_status;
            Output {
                status,
                stdout,
                stderr,
            }
        })
    }

    /// Create + start + collect + remove.
    pub fn run(&self, id: &str, spec: &Value) -> Output {
        self.create(id, spec, false)
            .unwrap_or_else(|e| panic!("CreateContainer {id}: {e:?}"));
        let out = self.run_created(id);
        self.remove(id, false)
            .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e:?}"));
        out
    }
}

/// `husk-agent serve` on the host (root, no VM): the agent on a unix socket in a temporary
/// directory, its shared directory beside it, and a client connected to it. The
/// `agent_host_*` tests use it; [`HostAgent::in_new_netns`] gives it a network namespace of
/// its own.
pub struct HostAgent {
    pub child: std::process::Child,
    dir: tempfile::TempDir,
    pub agent: Agent,
}

impl HostAgent {
    /// The agent in the test's own namespaces.
    pub fn start() -> Self {
        crate::require_root("creating containers needs root");
        Self::spawn(None)
    }

    /// The agent in a new network namespace (`unshare --net`, which execs it: the child's
    /// PID is the agent's), for the network RPCs.
    pub fn in_new_netns() -> Self {
        crate::require_root("network namespaces and netlink changes need root");
        crate::require_program("unshare", "util-linux");
        Self::spawn(Some(&["unshare", "--net"]))
    }

    fn spawn(launcher: Option<&[&str]>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shared")).unwrap();
        let sock = dir.path().join("agent.sock");
        let mut cmd = match launcher {
            Some([program, args @ ..]) => {
                let mut c = std::process::Command::new(program);
                c.args(args).arg(agent_binary());
                c
            }
            _ => std::process::Command::new(agent_binary()),
        };
        let child = cmd
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .arg("--shared-dir")
            .arg(dir.path().join("shared"))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("starting husk-agent serve");
        let agent = Agent::connect_unix(&sock, Duration::from_secs(10));
        Self { child, dir, agent }
    }

    /// The directory the agent takes as the share (a container's rootfs is `<id>/rootfs`).
    pub fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    /// A busybox rootfs for container `id` in the share.
    pub fn rootfs(&self, id: &str) -> PathBuf {
        busybox_rootfs(&self.shared(), id)
    }

    /// A rootfs for `id`, then the container created, started and waited for.
    pub fn run(&self, id: &str, spec: &Value) -> Output {
        self.rootfs(id);
        self.agent.run(id, spec)
    }
}

impl Drop for HostAgent {
    /// DestroySandbox first, so that containers a failed test left running are killed by the
    /// agent (they are not its children's children only: each is PID 1 of its own namespace);
    /// then the agent, which exits after it, is reaped (killed if it has not exited).
    fn drop(&mut self) {
        let _ = self.agent.client.destroy_sandbox(
            context::with_timeout(10_000_000_000),
            &DestroySandboxRequest::new(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ttrpc status of a failed call: (code, message).
pub fn status_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (ttrpc::Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    }
}
