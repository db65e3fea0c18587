//! Kubernetes' view of husk: a private containerd with its CRI plugin on, runtime handlers
//! `husk` and `runc`, a CNI bridge network of the test's own, and a CRI client (the
//! `k8s-cri` crate's generated gRPC client, API v1) over containerd's socket.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::husk::{image, shim_binary};
use crate::{initramfs, kernel, require_program};

/// A bridge network the test owns: name, subnet, gateway. Removed when dropped.
pub struct TestBridge {
    pub name: String,
    pub subnet: String,
    pub gateway: String,
}

impl TestBridge {
    fn new() -> Self {
        // Unique per test process; 10.233.0.0/16 is used for nothing else on these machines.
        let n = std::process::id() % 250 + 1;
        Self {
            name: format!("huskbr{n}"),
            subnet: format!("10.233.{n}.0/24"),
            gateway: format!("10.233.{n}.1"),
        }
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

pub struct CriContainerd {
    dir: tempfile::TempDir,
    child: std::process::Child,
    pub bridge: TestBridge,
    pub runtime: tokio::runtime::Runtime,
    pub rt: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

impl CriContainerd {
    pub fn start() -> Self {
        Self::start_with_husk_config("")
    }

    /// With extra lines at the top of the shim's configuration (`husk.toml` in [`Self::dir`]).
    pub fn start_with_husk_config(extra: &str) -> Self {
        Self::start_with_handlers(extra, &[])
    }

    /// [`Self::start_with_husk_config`], plus a husk runtime handler per `(name, extra)`, each
    /// with its own configuration (`<name>.toml` in [`Self::dir`], handed to the shim as the
    /// runtime's `options.ConfigPath`, as a cluster names one per RuntimeClass): `extra`
    /// lines, then the same kernel and initramfs.
    pub fn start_with_handlers(extra: &str, handlers: &[(&str, &str)]) -> Self {
        let bin = require_program("containerd", "containerd");
        require_program("ctr", "containerd");
        require_program("runc", "runc");
        assert!(
            Path::new("/usr/lib/cni/bridge").exists(),
            "/usr/lib/cni/bridge: missing — install containernetworking-plugins (cargo xtask setup)"
        );
        let dir = tempfile::Builder::new()
            .prefix("husk-cri-")
            .tempdir()
            .unwrap();
        let base = dir.path().to_path_buf();
        crate::stale::record("dir", &base.to_string_lossy());
        let bridge = TestBridge::new();
        // The shim under its runtime name, and its configuration.
        let shims = base.join("bin");
        std::fs::create_dir(&shims).unwrap();
        std::os::unix::fs::symlink(shim_binary(), shims.join("containerd-shim-husk-v2")).unwrap();
        let husk_config = base.join("husk.toml");
        std::fs::write(
            &husk_config,
            format!(
                "{extra}kernel = \"{}\"\ninitramfs = \"{}\"\n",
                kernel().display(),
                initramfs().display()
            ),
        )
        .unwrap();
        let mut more_runtimes = String::new();
        for (name, extra) in handlers {
            let path = base.join(format!("{name}.toml"));
            std::fs::write(
                &path,
                format!(
                    "{extra}kernel = \"{}\"\ninitramfs = \"{}\"\n",
                    kernel().display(),
                    initramfs().display()
                ),
            )
            .unwrap();
            more_runtimes.push_str(&format!(
                "    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{name}]\n      \
                 runtime_type = \"io.containerd.husk.v2\"\n      \
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{name}.options]\n        \
                 ConfigPath = \"{}\"\n",
                path.display()
            ));
        }
        let cni = base.join("cni");
        std::fs::create_dir(&cni).unwrap();
        std::fs::write(
            cni.join("10-husk-test.conflist"),
            format!(
                r#"{{"cniVersion": "1.0.0", "name": "husk-test", "plugins": [{{"type": "bridge", "bridge": "{}", "isGateway": true, "ipMasq": false, "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{}/ipam"}}}}]}}"#,
                bridge.name,
                bridge.subnet,
                base.display()
            ),
        )
        .unwrap();
        let config = base.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{b}/root"
state = "{b}/state"
[grpc]
  address = "{b}/containerd.sock"
[ttrpc]
  address = "{b}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "husk.local/pause:latest"
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
      runtime_type = "io.containerd.husk.v2"
      pod_annotations = ["io.husk.*"]
{more_runtimes}  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{b}/cni"
"#,
                b = base.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(base.join("containerd.log")).unwrap();
        let mut path = OsString::from(&shims);
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("HUSK_CONFIG", &husk_config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let sock = base.join("containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start; log:\n{}",
                std::fs::read_to_string(base.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // CRI only sees images in namespace k8s.io.
        for img in ["busybox.tar", "pause.tar"] {
            let out = Command::new("ctr")
                .arg("--address")
                .arg(&sock)
                .args(["-n", "k8s.io", "images", "import"])
                .arg(image(img))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "importing {img}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let channel = runtime.block_on(async {
            let sock = sock.clone();
            Endpoint::try_from("http://[::]:50051")
                .unwrap()
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let sock = sock.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(sock).await?,
                        ))
                    }
                }))
                .await
                .expect("connecting to containerd's CRI")
        });
        Self {
            dir,
            child,
            bridge,
            runtime,
            rt: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's gRPC socket (also `ctr --address`).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// containerd's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs a future on the test's runtime.
    /// Runs one CRI call; a call that has not answered after [`CRI_CALL_DEADLINE`] fails the
    /// test (with containerd's log) instead of hanging it.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match self
            .runtime
            .block_on(async { tokio::time::timeout(CRI_CALL_DEADLINE, f).await })
        {
            Ok(out) => out,
            Err(_) => panic!(
                "a CRI call did not answer within {CRI_CALL_DEADLINE:?}\ncontainerd log (tail):\n{}",
                tail(&self.log(), 6000)
            ),
        }
    }

    pub fn logs_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join("logs").join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

/// Where this containerd's CRI puts its pods' network namespaces: under its own state
/// directory (`netns_mounts_under_state_dir`), not the machine's /var/run/netns, so that no
/// other test's containerd (and its cleanup) ever sees them.
pub fn netns_dir(dir: &Path) -> PathBuf {
    dir.join("state/io.containerd.grpc.v1.cri/netns")
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // After a failure half-way: pods' shims and VMs. CRI's network namespaces are mounts
        // under our state directory (see `netns_dir`), unmounted with the rest below.
        let sock = self.dir.path().join("containerd.sock");
        crate::husk::end_shims(&format!("-address\0{}\0", sock.display()), "k8s.io");
        // CRI's mounts (sandbox shm, network namespaces) and runc's cgroups of k8s.io pods are
        // under our root or removed by containerd; what a crashed run could leave is unmounted
        // here.
        for m in crate::husk::mounts_under(self.dir.path()).into_iter().rev() {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        crate::stale::done("dir", &self.dir.path().to_string_lossy());
    }
}

/// How long one CRI call may take (ExecSync itself times out after 60 s; a pod start under
/// TCG takes seconds).
pub const CRI_CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(180);

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    &s[start..]
}

/// A pod of one CRI containerd on one runtime handler, with the kubelet's defaults (its own
/// cgroup parent under `cgroup_root`, pod network, pod IPC, a PID namespace per container),
/// for tests that run the same steps on `husk` and `runc`. Removed (containers, then the
/// pod) by [`CriPod::remove`] or, after a failure, when dropped.
pub struct CriPod<'a> {
    pub cri: &'a CriContainerd,
    pub id: String,
    pub config: k8s_cri::v1::PodSandboxConfig,
    pub handler: String,
    removed: bool,
}

impl<'a> CriPod<'a> {
    /// RunPodSandbox; `tweak` may change the kubelet-like configuration first.
    pub fn run(
        cri: &'a CriContainerd,
        name: &str,
        handler: &str,
        cgroup_root: &str,
        tweak: impl FnOnce(&mut k8s_cri::v1::PodSandboxConfig),
    ) -> Result<Self, tonic::Status> {
        use k8s_cri::v1::*;
        let mut config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}-{}", std::process::id()),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: cri.logs_dir(name).display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("/{cgroup_root}/pod-{name}"),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(Self::namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        tweak(&mut config);
        let mut rt = cri.rt.clone();
        let id = cri
            .block_on(rt.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            }))?
            .into_inner()
            .pod_sandbox_id;
        Ok(Self {
            cri,
            id,
            config,
            handler: handler.into(),
            removed: false,
        })
    }

    fn namespaces() -> k8s_cri::v1::NamespaceOption {
        use k8s_cri::v1::*;
        NamespaceOption {
            network: NamespaceMode::Pod as i32,
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        }
    }

    /// CreateContainer of busybox running `command`, with `security` as the container's
    /// security context (its namespace options are the kubelet's), and `mounts`; not started.
    pub fn create(
        &self,
        name: &str,
        command: &[&str],
        security: k8s_cri::v1::LinuxContainerSecurityContext,
        mounts: Vec<k8s_cri::v1::Mount>,
    ) -> Result<String, tonic::Status> {
        use k8s_cri::v1::*;
        let security = LinuxContainerSecurityContext {
            namespace_options: Some(Self::namespaces()),
            ..security
        };
        let req = CreateContainerRequest {
            pod_sandbox_id: self.id.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: crate::husk::BUSYBOX.into(),
                    ..Default::default()
                }),
                command: command.iter().map(|s| s.to_string()).collect(),
                log_path: format!("{name}.log"),
                mounts,
                linux: Some(LinuxContainerConfig {
                    security_context: Some(security),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(self.config.clone()),
        };
        let mut rt = self.cri.rt.clone();
        Ok(self
            .cri
            .block_on(rt.create_container(req))?
            .into_inner()
            .container_id)
    }

    /// [`CriPod::create`] then StartContainer; panics (with containerd's log) on failure.
    pub fn start(
        &self,
        name: &str,
        command: &[&str],
        security: k8s_cri::v1::LinuxContainerSecurityContext,
        mounts: Vec<k8s_cri::v1::Mount>,
    ) -> String {
        let id = self
            .create(name, command, security, mounts)
            .unwrap_or_else(|e| {
                panic!(
                    "CreateContainer {name} ({}): {e}\ncontainerd log (tail):\n{}",
                    self.handler,
                    tail(&self.cri.log(), 6000)
                )
            });
        let mut rt = self.cri.rt.clone();
        self.cri
            .block_on(rt.start_container(k8s_cri::v1::StartContainerRequest {
                container_id: id.clone(),
            }))
            .unwrap_or_else(|e| panic!("StartContainer {name} ({}): {e}", self.handler));
        id
    }

    /// ExecSync of `cmd` in `cid`: (exit code, stdout, stderr).
    pub fn exec(&self, cid: &str, cmd: &[&str]) -> (i32, String, String) {
        let mut rt = self.cri.rt.clone();
        let r = self
            .cri
            .block_on(rt.exec_sync(k8s_cri::v1::ExecSyncRequest {
                container_id: cid.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 60,
            }))
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?} ({}): {e}", self.handler))
            .into_inner();
        (
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    }

    /// Stops and removes every container of the pod, then the pod.
    pub fn remove(mut self) {
        self.removed = true;
        self.teardown()
            .unwrap_or_else(|e| panic!("removing pod {} ({}): {e}", self.id, self.handler));
    }

    fn teardown(&self) -> Result<(), tonic::Status> {
        use k8s_cri::v1::*;
        let mut rt = self.cri.rt.clone();
        let list = self
            .cri
            .block_on(rt.list_containers(ListContainersRequest { filter: None }))?
            .into_inner();
        for c in list
            .containers
            .iter()
            .filter(|c| c.pod_sandbox_id == self.id)
        {
            self.cri.block_on(rt.stop_container(StopContainerRequest {
                container_id: c.id.clone(),
                timeout: 2,
            }))?;
            self.cri
                .block_on(rt.remove_container(RemoveContainerRequest {
                    container_id: c.id.clone(),
                }))?;
        }
        self.cri
            .block_on(rt.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: self.id.clone(),
            }))?;
        self.cri
            .block_on(rt.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: self.id.clone(),
            }))?;
        Ok(())
    }
}

impl Drop for CriPod<'_> {
    fn drop(&mut self) {
        // After a failure: best effort (containerd's drop ends whatever is left).
        if !self.removed {
            let _ = self.teardown();
        }
    }
}

/// Removes the (empty) cgroup parents a test's pods left under `root` in every hierarchy.
pub fn sweep_cgroups(root: &str) {
    for entry in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = entry.path().join(root);
        for pod in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let _ = std::fs::remove_dir(pod.path());
        }
        let _ = std::fs::remove_dir(dir);
    }
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(root));
}
