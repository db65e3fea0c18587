//! Tier 3, the warm pool under CRI (issue #17): a pod on a CNI bridge network starts in a
//! pooled VM — its tap moved from the keeper's network namespace into the pod's, mirrored to
//! the veth, the guest NIC given the veth's MAC and addresses — serves HTTP to the node, its
//! two containers share the VM, and removing it leaves nothing behind.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::cri::{sweep_cgroups, CriContainerd, CriPod};
use husk_tests::http;
use husk_tests::husk::{assert_sandbox_gone, processes_mentioning, shim_binary};
use husk_tests::require_root;

fn status(config: &Path) -> Option<serde_json::Value> {
    let out = Command::new(shim_binary())
        .args(["pool", "status", "--config"])
        .arg(config)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("status is JSON"))
}

/// The holder, killed by PID when dropped.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        // SIGTERM: the holder removes what it keeps under .pool/ as it ends.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

#[test]
fn a_cri_pod_on_a_cni_network_starts_in_a_pooled_vm() {
    require_root("CRI pods, CNI networks and pooled VMs need root");
    let cri = CriContainerd::start_with_husk_config("pool.size = 1\n");
    let config = cri.dir().join("husk.toml");
    let log = cri.dir().join("holder.log");
    let _holder = Holder(
        Command::new(shim_binary())
            .args(["pool", "run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let holder_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(90);
    while status(&config).and_then(|s| s["ready"].as_u64()) != Some(1) {
        assert!(
            Instant::now() < deadline,
            "no pooled VM ready; holder log:\n{}",
            holder_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let pod = CriPod::run(&cri, "pooled", "husk", "husk-pool-test", |_| {}).unwrap();
    let claim = format!(" claimed by sandbox {} ", pod.id);
    let vmid = holder_log()
        .lines()
        .find(|l| l.contains(&claim))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("vm-")))
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!(
                "the pod did not get the pooled VM; holder log:\n{}",
                holder_log()
            )
        });

    let sec = k8s_cri::v1::LinuxContainerSecurityContext::default();
    let web = pod.start(
        "web",
        &["sh", "-c", "mkdir -p /www && echo hello-from-the-pool > /www/index.html && exec httpd -f -p 8080 -h /www"],
        sec.clone(),
        vec![],
    );
    let app = pod.start("app", &["sleep", "1000"], sec, vec![]);

    // HTTP from the node to the pod's IP, through the moved tap.
    let mut rt = cri.rt.clone();
    let ip = cri
        .block_on(rt.pod_sandbox_status(k8s_cri::v1::PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: false,
        }))
        .unwrap()
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(
        ip.starts_with(&format!(
            "{}.",
            cri.bridge.subnet.rsplit_once('.').unwrap().0
        )),
        "pod IP {ip:?}"
    );
    let ip_addr: std::net::Ipv4Addr = ip.parse().expect("the pod IP");
    http::get_until(
        (ip_addr, 8080).into(),
        "hello-from-the-pool",
        Duration::from_secs(10),
    );
    // The pod's containers share the VM, and its NIC has the pod's address.
    let (code, out, _) = pod.exec(&app, &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"]);
    assert_eq!((code, out.as_str()), (0, "hello-from-the-pool\n"));
    // The pod's hostname, set when its CreateSandbox took over the pooled VM's sandbox.
    let (_, host, _) = pod.exec(&app, &["hostname"]);
    assert_eq!(host, "pooled\n");
    let (_, addrs, _) = pod.exec(&app, &["ip", "-o", "addr", "show", "eth0"]);
    assert!(addrs.contains(&format!("inet {ip}/")), "{addrs}");
    let _ = web;

    let id = pod.id.clone();
    pod.remove();
    assert_sandbox_gone(&id);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !processes_mentioning(&format!("/run/husk/.pool/{vmid}/")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{vmid}'s processes outlived the pod"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sweep_cgroups("husk-pool-test");
}
