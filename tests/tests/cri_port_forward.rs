//! Tier 3, `kubectl port-forward`'s path: CRI's `PortForward` through containerd 1.6's
//! streaming server, on a husk pod and — in the same test, as the baseline — a runc pod.
//!
//! The kubelet asks CRI for a URL and hands the stream to kubectl; here the test speaks to
//! that URL itself, with the streaming server's WebSocket protocol (`v4.channel.k8s.io`: one
//! binary channel pair, data and error, per port, each opened by the port number in two
//! little-endian bytes), which containerd serves next to SPDY with the same forwarder — it
//! enters the pod netns on the host and dials `localhost:<port>`. Checked: an HTTP server in
//! the pod answers byte for byte (a small page and a 170 KB one), and a port nobody listens
//! on is refused at once (the error channel says "connection refused"), not left hanging.
//! A server that listens only on the pod's 127.0.0.1 is reached on both (under husk the
//! guest's agent sends the forwarded connection to its loopback), and one bound only to the
//! pod's IP is refused on both (containerd dials localhost). Nothing of the forward is
//! reachable from outside the pod's netns: from the node, the pod IP's loopback-only port
//! is not served; from a network namespace on the pod's bridge that claims the link's host
//! address (169.254.231.1) and sends straight to the guest's end of it, nothing answers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::cri::CriContainerd;
use husk_tests::husk::{processes_mentioning, BUSYBOX};
use husk_tests::require_root;
use k8s_cri::v1::*;

fn cgroup_root() -> String {
    format!("husk-cri-pf-test-{}", std::process::id())
}

/// Removes the pods' (empty) cgroup parents the runtimes left.
struct CgroupSweep;

impl Drop for CgroupSweep {
    fn drop(&mut self) {
        for entry in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let root = entry.path().join(cgroup_root());
            for pod in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(pod.path());
            }
            let _ = std::fs::remove_dir(root);
        }
    }
}

const PAGE: &str = "hello-from-web\n";
/// `seq 1 30000` in the pod: 168,894 bytes, many TCP segments through the forward.
fn big() -> String {
    (1..=30000).map(|i| format!("{i}\n")).collect()
}

fn sandbox_config(cri: &CriContainerd, name: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: cri.logs_dir(name).display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("/{}/pod-{name}", cgroup_root()),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod running busybox httpd on 8080 (every address) and on 127.0.0.1:8082; returns
/// (sandbox id, container id).
fn web_pod(cri: &mut CriContainerd, name: &str, handler: &str) -> (String, String) {
    let config = sandbox_config(cri, name);
    let mut rt = cri.rt.clone();
    let sid = cri
        .block_on(rt.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        }))
        .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}\n{}", cri.log()))
        .into_inner()
        .pod_sandbox_id;
    let script = "mkdir -p /www && echo hello-from-web > /www/index.html \
                  && seq 1 30000 > /www/big && httpd -p 127.0.0.1:8082 -h /www \
                  && ip=$(ip -4 -o addr show dev eth0 | grep -v ' 169[.]254[.]' \
                          | sed -n 's|.* inet \\([0-9.]*\\)/.*|\\1|p' | head -n 1) \
                  && httpd -p $ip:8083 -h /www \
                  && exec httpd -f -p 8080 -h /www";
    let cid = cri
        .block_on(rt.create_container(CreateContainerRequest {
            pod_sandbox_id: sid.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "web".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: BUSYBOX.into(),
                    ..Default::default()
                }),
                command: ["sh", "-c", script].iter().map(|s| s.to_string()).collect(),
                log_path: "web.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(config),
        }))
        .unwrap_or_else(|e| panic!("CreateContainer ({handler}): {e}\n{}", cri.log()))
        .into_inner()
        .container_id;
    cri.block_on(rt.start_container(StartContainerRequest {
        container_id: cid.clone(),
    }))
    .unwrap_or_else(|e| panic!("StartContainer ({handler}): {e}"));
    // Serving inside the pod before anything is forwarded.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = cri
            .block_on(
                rt.exec_sync(ExecSyncRequest {
                    container_id: cid.clone(),
                    cmd: ["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"]
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                    timeout: 30,
                }),
            )
            .unwrap_or_else(|e| panic!("ExecSync ({handler}): {e}"))
            .into_inner();
        if r.exit_code == 0 && r.stdout == PAGE.as_bytes() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{handler}: httpd never served in the pod: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (sid, cid)
}

/// What one forwarded connection gave: the data channel's bytes (after its port prefix) and
/// the error channel's text, and how long the session lasted.
#[derive(Debug)]
struct Forwarded {
    data: Vec<u8>,
    error: String,
    took: Duration,
}

/// One WebSocket frame from the client: binary, final, masked (RFC 6455 §5.3).
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x4e, 0x71, 0x9a, 0x2c];
    let mut f = vec![0x82];
    match payload.len() {
        n if n < 126 => f.push(0x80 | u8::try_from(n).unwrap()),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one frame: (opcode, payload). `None` at EOF.
fn read_frame(s: &mut TcpStream) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut h = [0u8; 2];
    match s.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b)?;
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b)?;
        len = u64::from_be_bytes(b);
    }
    let mut mask = [0u8; 4];
    if h[1] & 0x80 != 0 {
        s.read_exact(&mut mask)?;
    }
    let mut payload = vec![0u8; usize::try_from(len).unwrap()];
    s.read_exact(&mut payload)?;
    if h[1] & 0x80 != 0 {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(Some((h[0] & 0x0f, payload)))
}

/// CRI `PortForward` for `port` of pod `sid`, then the stream as kubectl would drive it:
/// `send` on the data channel, and everything read until the server ends the session.
fn port_forward(cri: &mut CriContainerd, sid: &str, port: u16, send: &[u8]) -> Forwarded {
    let mut rt = cri.rt.clone();
    let url = cri
        .block_on(rt.port_forward(PortForwardRequest {
            pod_sandbox_id: sid.into(),
            port: vec![i32::from(port)],
        }))
        .unwrap_or_else(|e| panic!("PortForward: {e}"))
        .into_inner()
        .url;
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("streaming URL {url}"));
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    assert!(
        host.starts_with("127.0.0.1:"),
        "the streaming server is on loopback: {url}"
    );
    let started = Instant::now();
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: aHVzay1wb3J0LWZ3ZC10ZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("the upgrade answer");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("v4.channel.k8s.io"), "{head}");
    if !send.is_empty() {
        let mut m = vec![0u8]; // data channel of the first port
        m.extend_from_slice(send);
        s.write_all(&client_frame(&m)).unwrap();
    }
    let mut channels: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut last = 0usize;
    while let Some((op, payload)) = read_frame(&mut s).expect("reading the stream") {
        match op {
            0x8 => break,
            0x1 | 0x2 if !payload.is_empty() => {
                last = usize::from(payload[0]);
                assert!(last < 2, "channel {last} of one port");
                channels[last].extend_from_slice(&payload[1..]);
            }
            0x0 => channels[last].extend_from_slice(&payload),
            _ => {}
        }
    }
    for c in &channels {
        assert_eq!(
            &c[..2],
            &port.to_le_bytes(),
            "each channel opens with the port"
        );
    }
    Forwarded {
        data: channels[0][2..].to_vec(),
        error: String::from_utf8_lossy(&channels[1][2..]).into_owned(),
        took: started.elapsed(),
    }
}

/// What port-forward gave, to compare husk with runc.
#[derive(Debug, PartialEq)]
struct Observed {
    page_status: String,
    page_body: String,
    big_body_exact: bool,
    refused: bool,
    refused_quickly: bool,
    /// What a server listening only on the pod's 127.0.0.1 gave: its page, or "refused".
    loopback_only_server: String,
    /// Likewise for one bound only to the pod's IP.
    pod_ip_only_server: String,
    /// From the node (outside the pod netns), the pod IP's 8080 serves and 8082 does not.
    from_node: (bool, bool),
    /// From a netns on the bridge claiming 169.254.231.1: is 169.254.231.2:8082 served?
    spoofed_link_served: bool,
}

fn body(http: &[u8]) -> (String, Vec<u8>) {
    let text = String::from_utf8_lossy(http);
    let status = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end()
        .to_string();
    let at = http
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(http.len(), |i| i + 4);
    (status, http[at..].to_vec())
}

fn flow(cri: &mut CriContainerd, handler: &str) -> (Observed, String) {
    let (sid, web) = web_pod(cri, &format!("{handler}-pf"), handler);
    let page = port_forward(cri, &sid, 8080, b"GET / HTTP/1.0\r\n\r\n");
    assert!(page.error.is_empty(), "{handler}: {}", page.error);
    let (page_status, page_body) = body(&page.data);
    let large = port_forward(cri, &sid, 8080, b"GET /big HTTP/1.0\r\n\r\n");
    let (_, big_body) = body(&large.data);
    if big_body != big().as_bytes() {
        eprintln!(
            "{handler}: /big came back as {} bytes, want {}",
            big_body.len(),
            big().len()
        );
    }
    let closed = port_forward(cri, &sid, 8081, b"");
    eprintln!(
        "{handler}: port 8081 ended after {:?}: {}",
        closed.took, closed.error
    );
    let mut served = |port| {
        let f = port_forward(cri, &sid, port, b"GET / HTTP/1.0\r\n\r\n");
        if f.error.contains("connection refused") {
            "refused".to_string()
        } else {
            format!("{}{}", String::from_utf8_lossy(&body(&f.data).1), f.error)
        }
    };
    let loopback_only_server = served(8082);
    let pod_ip_only_server = served(8083);
    let ip = pod_ip(cri, &sid);
    let get = |addr: std::net::SocketAddr| http_get(addr).is_some_and(|b| b == PAGE);
    let from_node = (get((ip, 8080).into()), get((ip, 8082).into()));
    let mac = pod_mac(cri, &web);
    // Only husk has the link (a runc pod's netns would route the packet on to the node's
    // default route instead: nothing to test there, and nothing to send out).
    let spoofed_link_served = handler == "husk" && spoof_link(cri, &mac);
    let observed = Observed {
        page_status,
        page_body: String::from_utf8_lossy(&page_body).into_owned(),
        big_body_exact: big_body == big().as_bytes(),
        refused: closed.error.contains("connection refused") && closed.data.is_empty(),
        refused_quickly: closed.took < Duration::from_secs(10),
        loopback_only_server,
        pod_ip_only_server,
        from_node,
        spoofed_link_served,
    };
    let mut rt = cri.rt.clone();
    cri.block_on(rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: sid.clone(),
    }))
    .unwrap();
    cri.block_on(rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: sid.clone(),
    }))
    .unwrap();
    (observed, sid)
}

#[test]
fn port_forward_reaches_the_pod_alike_on_husk_and_runc() {
    require_root("containerd with CRI, CNI");
    let _sweep = CgroupSweep;
    let mut cri = CriContainerd::start();
    let expected = Observed {
        page_status: "HTTP/1.1 200 OK".into(),
        page_body: PAGE.into(),
        big_body_exact: true,
        refused: true,
        refused_quickly: true,
        loopback_only_server: PAGE.into(),
        pod_ip_only_server: "refused".into(),
        from_node: (true, false),
        spoofed_link_served: false,
    };
    let (runc, _) = flow(&mut cri, "runc");
    assert_eq!(runc, expected, "runc baseline");
    let (husk, sid) = flow(&mut cri, "husk");
    assert_eq!(husk, expected, "husk forwards as runc does");

    // The pod is gone with everything of husk's.
    let dir = Path::new("/run/husk").join(&sid);
    let deadline = Instant::now() + Duration::from_secs(20);
    while dir.exists() || !processes_mentioning(&format!("/run/husk/{sid}/")).is_empty() {
        assert!(Instant::now() < deadline, "sandbox {sid} left behind");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pod's IPv4 address, from CRI.
fn pod_ip(cri: &CriContainerd, sid: &str) -> std::net::Ipv4Addr {
    let mut rt = cri.rt.clone();
    let st = cri
        .block_on(rt.pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sid.into(),
            verbose: false,
        }))
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let ip = st.network.map(|n| n.ip).unwrap_or_default();
    ip.parse().unwrap_or_else(|_| panic!("pod IP {ip:?}"))
}

/// The MAC of the pod's eth0 as its containers see it (under husk the guest NIC copies the
/// veth's).
fn pod_mac(cri: &CriContainerd, cid: &str) -> String {
    let mut rt = cri.rt.clone();
    let r = cri
        .block_on(rt.exec_sync(ExecSyncRequest {
            container_id: cid.into(),
            cmd: vec!["cat".into(), "/sys/class/net/eth0/address".into()],
            timeout: 30,
        }))
        .unwrap()
        .into_inner();
    assert_eq!(r.exit_code, 0, "{r:?}");
    String::from_utf8_lossy(&r.stdout).trim().to_string()
}

/// GET / from this thread's netns with short timeouts: the body, or `None` if nothing
/// answered (refused, unreachable, timed out).
fn http_get(addr: std::net::SocketAddr) -> Option<String> {
    let v = husk_tests::http::get(addr, Duration::from_secs(3)).ok()?;
    Some(String::from_utf8_lossy(&body(&v).1).into_owned())
}

/// A netns of the test's own on the pod's bridge that claims the port-forward link's host
/// address (169.254.231.1/30) and knows the guest end's MAC (the pod's): does
/// 169.254.231.2:8082 — the pod's loopback-only server, were the link's NAT open to it —
/// serve it? Removed before returning.
fn spoof_link(cri: &CriContainerd, pod_mac: &str) -> bool {
    let ns = format!("huskpfspoof{}", std::process::id());
    let (outer, inner) = (format!("hpfo{}", std::process::id() % 100000), "spoof0");
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .output();
    ip(&["netns", "add", &ns]);
    struct Del(String, String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.1])
                .output();
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .output();
        }
    }
    let _del = Del(ns.clone(), outer.clone());
    ip(&[
        "link", "add", &outer, "type", "veth", "peer", "name", inner, "netns", &ns,
    ]);
    ip(&["link", "set", &outer, "master", &cri.bridge.name, "up"]);
    ip(&["-n", &ns, "link", "set", inner, "up"]);
    ip(&["-n", &ns, "addr", "add", "169.254.231.1/30", "dev", inner]);
    ip(&[
        "-n",
        &ns,
        "neigh",
        "replace",
        "169.254.231.2",
        "lladdr",
        pod_mac,
        "dev",
        inner,
    ]);
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        http_get(([169, 254, 231, 2], 8082).into()).is_some()
    })
    .join()
    .unwrap()
}
