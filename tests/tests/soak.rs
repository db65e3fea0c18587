//! The soak: many create/start/exec/stop/delete cycles against one containerd, with leak
//! accounting (`husk_tests::leaks`). Cycles alternate between a `ctr` pod in a network
//! namespace of the test's own (CNI bridge) and a CRI pod (RunPodSandbox with containerd's CNI,
//! a container, ExecSync, Stop/Remove), a few at once. A sentinel pod runs throughout and gets
//! an exec every cycle, so its shim serves as many execs as the run has cycles.
//!
//! After the sentinel starts, and after every `HUSK_SOAK_EVERY` cycles (once no other pod of
//! the run is up), the host's resources are counted: the runtime's processes, containerd's
//! fds and RSS, mounts, taps, veths, netns entries, /run/husk entries, cgroups, the sentinel
//! shim's fds and threads. The run fails if any of them grew beyond noise; the table is
//! printed either way (and written to `HUSK_SOAK_REPORT` if set). At the end a pod is left
//! running on purpose, to check that the accounting sees each thing a pod holds.
//!
//! `HUSK_SOAK_CYCLES` (default 50, what `cargo xtask test` runs; `cargo xtask soak` defaults to
//! 1000), `HUSK_SOAK_PARALLEL` (default 3).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_tests::cni::{BridgeNetwork, Netns};
use husk_tests::cri::CriContainerd;
use husk_tests::husk::{image, BUSYBOX};
use husk_tests::leaks::{judge, table, Sample, Scope};
use husk_tests::require_root;
use k8s_cri::v1::*;

const RUNTIME: &str = "io.containerd.husk.v2";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The run: its containerd (with CRI), the ctr namespace, the test's own CNI network.
struct Soak {
    cri: CriContainerd,
    namespace: String,
    net: Mutex<BridgeNetwork>,
    scope: Scope,
    tag: String,
}

impl Soak {
    fn ctr(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("ctr")
            .arg("--address")
            .arg(self.cri.socket())
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running ctr")
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr run -d` of an idle busybox in a netns of our own on our bridge.
    fn run_ctr_pod(&self, id: &str, netns: &Netns) {
        self.net.lock().unwrap().attach(netns);
        self.scope.add_netns(&netns.path());
        self.scope.add_id(id);
        let with_ns = format!("network:{}", netns.path().display());
        self.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--with-ns",
            &with_ns,
            BUSYBOX,
            id,
            "sleep",
            "100000",
        ]);
    }

    /// SIGKILL, then task and container delete (retrying while the exit is on its way).
    fn remove_ctr_pod(&self, id: &str, netns: &Netns) {
        self.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ctr(&["task", "delete", id]).status.success() {
            assert!(
                Instant::now() < deadline,
                "{id}: not deletable 60 s after SIGKILL: {}",
                self.ctr_ok(&["task", "ls"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.ctr_ok(&["containers", "delete", id]);
        self.net.lock().unwrap().detach(netns);
    }

    fn ctr_cycle(&self, i: usize) {
        let id = format!("{}-c{i}", self.tag);
        let netns = Netns::new("sk");
        self.run_ctr_pod(&id, &netns);
        let out = self.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            "e",
            &id,
            "sh",
            "-c",
            &format!("echo soak-{i}"),
        ]);
        assert_eq!(out, format!("soak-{i}\n"), "exec in {id}");
        self.remove_ctr_pod(&id, &netns);
    }

    fn cri_cycle(&self, i: usize) {
        let name = format!("{}-p{i}", self.tag);
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.clone(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.clone(),
            log_directory: self.cri.logs_dir(&name).display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("/{}/pod-{i}", self.namespace),
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
        };
        let mut rt = self.cri.rt.clone();
        let pod = match self.cri.block_on(rt.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: "husk".into(),
        })) {
            Ok(r) => r.into_inner().pod_sandbox_id,
            Err(e) => panic!("RunPodSandbox {name}: {e}"),
        };
        self.scope.add_id(&pod);
        // The netns CRI made for the pod, from the sandbox's runtime spec.
        let status = self
            .cri
            .block_on(rt.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: true,
            }))
            .unwrap_or_else(|e| panic!("PodSandboxStatus {name}: {e}"))
            .into_inner();
        let info: serde_json::Value = status
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_default();
        if let Some(path) = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
        {
            self.scope.add_netns(std::path::Path::new(path));
        }
        let cid = match self
            .cri
            .block_on(rt.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: "app".into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: BUSYBOX.into(),
                        ..Default::default()
                    }),
                    command: vec!["sleep".into(), "100000".into()],
                    log_path: "app.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(config),
            })) {
            Ok(r) => r.into_inner().container_id,
            Err(e) => panic!("CreateContainer in {name}: {e}"),
        };
        self.scope.add_id(&cid);
        self.cri
            .block_on(rt.start_container(StartContainerRequest {
                container_id: cid.clone(),
            }))
            .unwrap_or_else(|e| panic!("StartContainer in {name}: {e}"));
        let r = self
            .cri
            .block_on(rt.exec_sync(ExecSyncRequest {
                container_id: cid.clone(),
                cmd: vec!["sh".into(), "-c".into(), format!("echo soak-{i}")],
                timeout: 60,
            }))
            .unwrap_or_else(|e| panic!("ExecSync in {name}: {e}"))
            .into_inner();
        assert_eq!(
            (r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned()),
            (0, format!("soak-{i}\n")),
            "ExecSync in {name}: stderr {}",
            String::from_utf8_lossy(&r.stderr)
        );
        self.cri
            .block_on(rt.stop_container(StopContainerRequest {
                container_id: cid.clone(),
                timeout: 0,
            }))
            .unwrap_or_else(|e| panic!("StopContainer in {name}: {e}"));
        self.cri
            .block_on(rt.remove_container(RemoveContainerRequest { container_id: cid }))
            .unwrap_or_else(|e| panic!("RemoveContainer in {name}: {e}"));
        self.cri
            .block_on(rt.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            }))
            .unwrap_or_else(|e| panic!("StopPodSandbox {name}: {e}"));
        self.cri
            .block_on(rt.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            }))
            .unwrap_or_else(|e| panic!("RemovePodSandbox {name}: {e}"));
    }

    /// One cycle (ctr and CRI alternate), and an exec in the sentinel.
    fn cycle(&self, i: usize, sentinel: &str) -> Duration {
        let start = Instant::now();
        if i % 2 == 0 {
            self.ctr_cycle(i);
        } else {
            self.cri_cycle(i);
        }
        let out = self.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            &format!("s{i}"),
            sentinel,
            "sh",
            "-c",
            &format!("echo sentinel-{i}"),
        ]);
        assert_eq!(out, format!("sentinel-{i}\n"));
        start.elapsed()
    }
}

/// The shim of sandbox `id`: the process naming it whose parent is not a shim (the jail's
/// supervisors are forks of the shim).
fn shim_of(id: &str) -> Option<u32> {
    let comm = |p: u32| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    let ppid = |p: u32| -> u32 {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    husk_tests::husk::processes_mentioning(&format!("-id\0{id}\0"))
        .into_iter()
        .find(|p| {
            comm(*p).starts_with("containerd-shim")
                && !comm(ppid(*p)).starts_with("containerd-shim")
        })
}

/// Removes the run's cgroup parents (empty by now: CRI leaves a pod's parent to the kubelet).
fn sweep_cgroups(root: &str) {
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let top = h.path().join(root);
        for pod in std::fs::read_dir(&top).into_iter().flatten().flatten() {
            let _ = std::fs::remove_dir(pod.path());
        }
        let _ = std::fs::remove_dir(top);
    }
}

#[test]
fn soak_cycles_leave_nothing_behind() {
    require_root("containerd, CRI, network namespaces");
    let cycles = env_usize("HUSK_SOAK_CYCLES", 50);
    let parallel = env_usize("HUSK_SOAK_PARALLEL", 3).max(1);
    let every = env_usize(
        "HUSK_SOAK_EVERY",
        if cycles >= 500 {
            100
        } else {
            (cycles / 5).max(1)
        },
    );
    let cri = CriContainerd::start();
    let tag = format!("soak{}", std::process::id());
    let namespace = format!("husk-soak-{}", std::process::id());
    let net = BridgeNetwork::new(1500);
    let scope = Scope::new(
        cri.pid(),
        &cri.socket(),
        cri.dir(),
        &[cri.bridge.name.clone(), net.bridge.clone()],
    );
    let soak = Soak {
        cri,
        namespace,
        net: Mutex::new(net),
        scope,
        tag,
    };
    soak.ctr_ok(&["images", "import", image("busybox.tar").to_str().unwrap()]);
    let sentinel = format!("{}-sentinel", soak.tag);
    let sentinel_ns = Netns::new("sks");
    soak.run_ctr_pod(&sentinel, &sentinel_ns);
    *soak.scope.sentinel_shim.lock().unwrap() = shim_of(&sentinel);
    assert!(
        soak.scope.sentinel_shim.lock().unwrap().is_some(),
        "the sentinel's shim"
    );
    eprintln!(
        "soak: {cycles} cycles (ctr and CRI pods alternating, {parallel} at once), leak accounting every {every}"
    );
    let settle = Duration::from_secs(30);
    let start = Instant::now();
    let mut samples: Vec<Sample> =
        vec![soak
            .scope
            .settled_sample(None, 0, Duration::ZERO, Duration::ZERO)];
    let mut times: Vec<Duration> = Vec::new();
    let mut done = 0;
    while done < cycles {
        let batch = parallel.min(cycles - done);
        let took: Vec<Duration> = std::thread::scope(|s| {
            let handles: Vec<_> = (done..done + batch)
                .map(|i| {
                    let soak = &soak;
                    let sentinel = &sentinel;
                    s.spawn(move || soak.cycle(i, sentinel))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        times.extend(took);
        let before = done;
        done += batch;
        if done / every > before / every || done == cycles {
            let s = soak
                .scope
                .settled_sample(Some(&samples[0]), done, start.elapsed(), settle);
            eprintln!(
                "soak: {}",
                table(std::slice::from_ref(&s)).lines().nth(2).unwrap_or("")
            );
            samples.push(s);
        }
    }
    times.sort();
    let summary = format!(
        "{cycles} cycles in {:.0} s ({parallel} at once): a cycle took {:.1} s median, {:.1} s p95, {:.1} s at most; {} sandbox and container ids",
        start.elapsed().as_secs_f64(),
        times[times.len() / 2].as_secs_f64(),
        times[(times.len() * 95 / 100).min(times.len() - 1)].as_secs_f64(),
        times[times.len() - 1].as_secs_f64(),
        soak.scope.ids(),
    );
    let report = format!("{}\n{summary}\n", table(&samples));
    println!("\n{report}");
    if let Ok(path) = std::env::var("HUSK_SOAK_REPORT") {
        std::fs::write(&path, &report).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
    let verdict = judge(&samples);
    // The accounting itself: a pod left running shows in every count a pod holds.
    let left = format!("{}-left", soak.tag);
    let left_ns = Netns::new("skl");
    soak.run_ctr_pod(&left, &left_ns);
    let with_pod = soak.scope.sample(done, start.elapsed());
    let seen = judge(&[samples[0].clone(), with_pod]);
    soak.remove_ctr_pod(&left, &left_ns);
    drop(left_ns);
    for what in [
        "runtime processes",
        "mounts",
        "taps",
        "veths",
        "netns entries",
        "/run/husk entries",
        "cgroups",
    ] {
        assert!(
            seen.iter().any(|v| v.starts_with(what)),
            "a pod left running is not seen in {what}: {seen:?}"
        );
    }
    soak.remove_ctr_pod(&sentinel, &sentinel_ns);
    drop(sentinel_ns);
    sweep_cgroups(&soak.namespace);
    assert!(
        verdict.is_empty(),
        "grew during the soak:\n  {}\n{report}",
        verdict.join("\n  ")
    );
}
