//! A private CNI network for tests: a network namespace the test makes (`ip netns add`), and
//! Debian's containernetworking-plugins (`/usr/lib/cni`: bridge + host-local) invoked
//! directly with a configuration written here — a bridge of our own and a private /24 that
//! no host interface or route uses. Everything is removed when the guards drop, also when
//! the test fails: CNI DEL, the netns, the bridge, host-local's state directory.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where Debian installs the plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call (interface names are at most 15 bytes).
pub fn unique(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}{n}", std::process::id() % 100_000)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs `ip ARGS`, failing the test with its output unless it succeeds.
pub fn ip(args: &[&str]) -> String {
    let out = run(Command::new("ip").args(args));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `tc ARGS` (for looking only: the shim itself never shells out).
pub fn tc(args: &[&str]) -> String {
    let out = run(Command::new("tc").args(args));
    assert!(
        out.status.success(),
        "tc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`/var/run/netns/<name>`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        crate::stale::record("netns", &name);
        ip(&["netns", "add", &name]);
        Self { name }
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// `tc -n NAME ARGS`.
    pub fn tc(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        tc(&a)
    }

    /// A file of the namespace's own /proc/net or /sys/class/net view, read through
    /// `ip netns exec` (which mounts a matching /sys).
    pub fn cat(&self, file: &str) -> String {
        let out = run(Command::new("ip").args(["netns", "exec", &self.name, "cat", file]));
        assert!(
            out.status.success(),
            "cat {file} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        crate::stale::done("netns", &self.name);
    }
}

/// What CNI ADD gave a pod.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

/// A bridge network (bridge + host-local, gateway on the bridge, no masquerade: nothing
/// leaves the host) on a private /24 that nothing on the host uses.
#[derive(Debug)]
pub struct BridgeNetwork {
    pub name: String,
    pub bridge: String,
    pub subnet: String,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    data_dir: tempfile::TempDir,
    attached: Vec<(String, PathBuf)>,
}

/// Subnets this process has handed out (their bridges appear only at the first attach, so
/// the host's routes do not show them yet).
static TAKEN: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// A 10.213.N.0/24 not seen in the host's addresses or routes nor taken by this process.
fn free_subnet() -> u8 {
    let used = format!(
        "{}{}",
        ip(&["-4", "addr"]),
        ip(&["-4", "route", "show", "table", "all"])
    );
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    let start = u8::try_from(std::process::id() % 200).unwrap_or(0);
    let n = (0..250u8)
        .map(|i| start.wrapping_add(i) % 250 + 1)
        .find(|n| !taken.contains(n) && !used.contains(&format!("10.213.{n}.")))
        .expect("no free 10.213.x.0/24 on this host");
    taken.push(n);
    n
}

impl BridgeNetwork {
    /// A new network; the bridge appears with the first attachment (CNI makes it).
    pub fn new(mtu: u32) -> Self {
        assert!(Path::new(CNI_PATH).join("bridge").is_file(), "{CNI_PATH}/bridge: missing — install Debian's containernetworking-plugins (`cargo xtask setup` does)");
        let n = free_subnet();
        let bridge = unique("hskbr");
        crate::stale::record("link", &bridge);
        Self {
            name: format!("husk-test-{bridge}"),
            subnet: format!("10.213.{n}.0/24"),
            gateway: Ipv4Addr::new(10, 213, n, 1),
            bridge,
            mtu,
            data_dir: tempfile::Builder::new()
                .prefix("husk-cni-")
                .tempdir()
                .unwrap(),
            attached: Vec::new(),
        }
    }

    fn conf(&self) -> String {
        serde_json::json!({
            "cniVersion": "0.4.0",
            "name": self.name,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "mtu": self.mtu,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet, "gateway": self.gateway.to_string()}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.data_dir.path(),
            }
        })
        .to_string()
    }

    fn plugin(&self, command: &str, container_id: &str, netns: &Path) -> Output {
        plugin("bridge", &self.conf(), "eth0", command, container_id, netns)
    }

    /// CNI ADD of `eth0` in `netns` (and loopback up, as the loopback plugin does).
    pub fn attach(&mut self, netns: &Netns) -> Attachment {
        let id = format!("{}-{}", self.name, netns.name);
        self.attached.push((id.clone(), netns.path()));
        let out = self.plugin("ADD", &id, &netns.path());
        assert!(
            out.status.success(),
            "CNI ADD in {}: {}{}",
            netns.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lo = plugin("loopback", LOOPBACK_CONF, "lo", "ADD", &id, &netns.path());
        assert!(
            lo.status.success(),
            "CNI loopback ADD in {}: {}",
            netns.name,
            String::from_utf8_lossy(&lo.stderr)
        );
        let result: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("CNI result JSON");
        let addr = result["ips"][0]["address"]
            .as_str()
            .expect("an address in the CNI result")
            .to_string();
        let (ip, prefix) = addr.split_once('/').unwrap();
        Attachment {
            netns: netns.path(),
            ip: ip.parse().unwrap(),
            prefix: prefix.parse().unwrap(),
        }
    }
}

impl BridgeNetwork {
    /// CNI DEL of what [`Self::attach`] added in `netns` (before the netns goes).
    pub fn detach(&mut self, netns: &Netns) {
        let id = format!("{}-{}", self.name, netns.name);
        let out = self.plugin("DEL", &id, &netns.path());
        assert!(
            out.status.success(),
            "CNI DEL in {}: {}{}",
            netns.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = plugin("loopback", LOOPBACK_CONF, "lo", "DEL", &id, &netns.path());
        self.attached.retain(|(a, _)| *a != id);
    }
}

impl Drop for BridgeNetwork {
    fn drop(&mut self) {
        for (id, netns) in std::mem::take(&mut self.attached) {
            let _ = self.plugin("DEL", &id, &netns);
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        crate::stale::done("link", &self.bridge);
    }
}

const LOOPBACK_CONF: &str = r#"{"cniVersion": "0.4.0", "name": "lo", "type": "loopback"}"#;

/// Runs CNI plugin `name` with `conf` on stdin.
fn plugin(
    name: &str,
    conf: &str,
    ifname: &str,
    command: &str,
    container_id: &str,
    netns: &Path,
) -> Output {
    let mut child = Command::new(Path::new(CNI_PATH).join(name))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running the CNI plugin {CNI_PATH}/{name}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Whether the host has a link called `name`.
pub fn host_link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
