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
        let bridge = TestBridge::new();
        // The shim under its runtime name, and its configuration.
        let shims = base.join("bin");
        std::fs::create_dir(&shims).unwrap();
        std::os::unix::fs::symlink(shim_binary(), shims.join("containerd-shim-husk-v2")).unwrap();
        let husk_config = base.join("husk.toml");
        std::fs::write(
            &husk_config,
            format!(
                "kernel = \"{}\"\ninitramfs = \"{}\"\n",
                kernel().display(),
                initramfs().display()
            ),
        )
        .unwrap();
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
  [plugins."io.containerd.grpc.v1.cri".cni]
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
