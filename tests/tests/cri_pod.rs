//! Tier 3, Kubernetes' path: pods through containerd's CRI plugin with runtime handler
//! `husk` — and, in the same test, with `runc` as the baseline, to show the two behave alike.
//! A pod of two app containers on a CNI bridge: pod IP, localhost shared between them, one
//! kernel, exit codes and logs through CRI, volumes as the kubelet gives them, stats, resource
//! updates, and nothing left after RemovePodSandbox. A second pod shares its process
//! namespace (`shareProcessNamespace: true`): its containers see each other's processes and
//! the pause process as PID 1, and can signal each other.

use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::cri::CriContainerd;
use husk_tests::husk::{mounts_under, processes_mentioning, BUSYBOX};
use husk_tests::require_root;
use k8s_cri::v1::*;

/// The test's own cgroup parent for its pods, removed at the end.
fn cgroup_root() -> String {
    format!("husk-cri-test-{}", std::process::id())
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
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(cgroup_root()));
    }
}

struct Pod<'a> {
    cri: &'a mut CriContainerd,
    id: String,
    config: PodSandboxConfig,
    /// `Pod` for a pod with shareProcessNamespace, else `Container`.
    pid: NamespaceMode,
}

/// The namespace options the kubelet gives a pod's sandbox and containers.
fn namespace_options(pid: NamespaceMode) -> Option<NamespaceOption> {
    Some(NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: pid as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    })
}

fn sandbox_config(cri: &CriContainerd, name: &str, pid: NamespaceMode) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: cri.logs_dir(name).display().to_string(),
        // husk sizes the pod's VM from it (containerd passes io.husk.* pod annotations on).
        annotations: [("io.husk.extra-memory-mib".to_string(), "128".to_string())].into(),
        linux: Some(LinuxPodSandboxConfig {
            // As the kubelet (cgroupfs driver) gives it; CRI's sandbox stats read this cgroup.
            cgroup_parent: format!("/{}/pod-{name}", cgroup_root()),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: namespace_options(pid),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl<'a> Pod<'a> {
    fn run(cri: &'a mut CriContainerd, name: &str, handler: &str) -> Self {
        Self::run_with(cri, name, handler, NamespaceMode::Container)
    }

    fn run_with(cri: &'a mut CriContainerd, name: &str, handler: &str, pid: NamespaceMode) -> Self {
        let config = sandbox_config(cri, name, pid);
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        let mut rt = cri.rt.clone();
        let id = match cri.block_on(rt.run_pod_sandbox(req)) {
            Ok(r) => r.into_inner().pod_sandbox_id,
            Err(e) => panic!(
                "RunPodSandbox ({handler}): {e}\ncontainerd log:\n{}",
                cri.log()
            ),
        };
        Self {
            cri,
            id,
            config,
            pid,
        }
    }

    fn container(&mut self, name: &str, command: &[&str], mounts: Vec<Mount>) -> String {
        let req = CreateContainerRequest {
            pod_sandbox_id: self.id.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: BUSYBOX.into(),
                    ..Default::default()
                }),
                command: command.iter().map(|s| s.to_string()).collect(),
                log_path: format!("{name}.log"),
                mounts,
                // As the kubelet does: the container's PID namespace is its own, or the pod's
                // with shareProcessNamespace.
                linux: Some(LinuxContainerConfig {
                    security_context: Some(LinuxContainerSecurityContext {
                        namespace_options: namespace_options(self.pid),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(self.config.clone()),
        };
        let mut rt = self.cri.rt.clone();
        let id = match self.cri.block_on(rt.create_container(req)) {
            Ok(r) => r.into_inner().container_id,
            Err(e) => panic!(
                "CreateContainer {name}: {e}\ncontainerd log:\n{}",
                self.cri.log()
            ),
        };
        self.cri
            .block_on(rt.start_container(StartContainerRequest {
                container_id: id.clone(),
            }))
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
        id
    }

    fn exec(&mut self, cid: &str, cmd: &[&str]) -> ExecSyncResponse {
        let mut rt = self.cri.rt.clone();
        let req = ExecSyncRequest {
            container_id: cid.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        self.cri
            .block_on(rt.exec_sync(req))
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"))
            .into_inner()
    }

    fn exec_ok(&mut self, cid: &str, cmd: &[&str]) -> String {
        let r = self.exec(cid, cmd);
        assert_eq!(
            r.exit_code,
            0,
            "{cmd:?}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
        String::from_utf8_lossy(&r.stdout).into_owned()
    }

    fn status(&mut self, cid: &str) -> ContainerStatus {
        let mut rt = self.cri.rt.clone();
        self.cri
            .block_on(rt.container_status(ContainerStatusRequest {
                container_id: cid.into(),
                verbose: false,
            }))
            .unwrap()
            .into_inner()
            .status
            .unwrap()
    }

    fn wait_exited(&mut self, cid: &str) -> ContainerStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status(cid);
            if s.state == ContainerState::ContainerExited as i32 {
                return s;
            }
            assert!(Instant::now() < deadline, "{cid} did not exit: {s:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn remove(self) -> String {
        let mut rt = self.cri.rt.clone();
        let list = self
            .cri
            .block_on(rt.list_containers(ListContainersRequest { filter: None }))
            .unwrap()
            .into_inner();
        for c in list
            .containers
            .iter()
            .filter(|c| c.pod_sandbox_id == self.id)
        {
            self.cri
                .block_on(rt.stop_container(StopContainerRequest {
                    container_id: c.id.clone(),
                    timeout: 2,
                }))
                .unwrap();
            self.cri
                .block_on(rt.remove_container(RemoveContainerRequest {
                    container_id: c.id.clone(),
                }))
                .unwrap();
        }
        self.cri
            .block_on(rt.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: self.id.clone(),
            }))
            .unwrap();
        self.cri
            .block_on(rt.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: self.id.clone(),
            }))
            .unwrap();
        self.id
    }
}

/// What the pod flow observed, to compare husk with runc.
#[derive(Debug, PartialEq)]
struct Observed {
    localhost_http: String,
    same_kernel_boot: bool,
    exit_code: i32,
    log_has_stdout_and_stderr: bool,
    volume_write_on_host: String,
    configmap_read_only: bool,
    termination_log_written: String,
    memory_limit_after_update: String,
    pod_stats_answered: bool,
}

fn pod_flow(cri: &mut CriContainerd, handler: &str) -> (Observed, String) {
    let name = format!("{handler}-pod");
    let empty_dir = tempfile::tempdir().unwrap();
    let configmap = tempfile::tempdir().unwrap();
    std::fs::write(configmap.path().join("key"), "value\n").unwrap();
    let termination = tempfile::NamedTempFile::new().unwrap();
    let subnet_prefix = cri.bridge.gateway.rsplit_once('.').unwrap().0.to_string();
    let mut pod = Pod::run(cri, &name, handler);

    // The pod IP comes from our CNI bridge's subnet.
    let mut rt = pod.cri.rt.clone();
    let st = pod
        .cri
        .block_on(rt.pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: false,
        }))
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let ip = st.network.map(|n| n.ip).unwrap_or_default();
    assert!(
        ip.starts_with(&format!("{subnet_prefix}.")),
        "{handler}: pod IP {ip:?} not in the test bridge's subnet"
    );

    let web = pod.container(
        "web",
        &["sh", "-c", "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 8080 -h /www"],
        vec![],
    );
    let mounts = vec![
        Mount {
            container_path: "/data".into(),
            host_path: empty_dir.path().display().to_string(),
            ..Default::default()
        },
        Mount {
            container_path: "/config".into(),
            host_path: configmap.path().display().to_string(),
            readonly: true,
            ..Default::default()
        },
        Mount {
            container_path: "/dev/termination-log".into(),
            host_path: termination.path().display().to_string(),
            ..Default::default()
        },
    ];
    let app = pod.container("app", &["sleep", "1000"], mounts);

    // Two containers of the pod share localhost.
    let mut localhost_http = String::new();
    for _ in 0..50 {
        let r = pod.exec(&app, &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"]);
        if r.exit_code == 0 {
            localhost_http = String::from_utf8_lossy(&r.stdout).into_owned();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let boot = |pod: &mut Pod, c: &str| pod.exec_ok(c, &["cat", "/proc/sys/kernel/random/boot_id"]);
    let same_kernel_boot = boot(&mut pod, &web) == boot(&mut pod, &app);

    // Volumes as the kubelet gives them.
    pod.exec_ok(
        &app,
        &[
            "sh",
            "-c",
            "echo from-pod > /data/file; echo terminated-ok > /dev/termination-log",
        ],
    );
    let volume_write_on_host =
        std::fs::read_to_string(empty_dir.path().join("file")).unwrap_or_default();
    let configmap_read_only = pod
        .exec(&app, &["sh", "-c", "cat /config/key && touch /config/new"])
        .exit_code
        != 0
        && pod.exec_ok(&app, &["cat", "/config/key"]) == "value\n";
    let termination_log_written = std::fs::read_to_string(termination.path()).unwrap_or_default();
    // CRI's own files are there too.
    assert!(
        pod.exec_ok(&app, &["cat", "/etc/hosts"])
            .contains("localhost"),
        "{handler}: /etc/hosts"
    );

    // Stats and resource updates reach the container.
    let mut rt = pod.cri.rt.clone();
    let stats = pod
        .cri
        .block_on(rt.container_stats(ContainerStatsRequest {
            container_id: app.clone(),
        }))
        .unwrap_or_else(|e| panic!("{handler}: ContainerStats: {e}"))
        .into_inner()
        .stats
        .unwrap();
    assert!(
        stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .map(|v| v.value)
            .unwrap_or(0)
            > 0,
        "{handler}: no memory stats"
    );
    pod.cri
        .block_on(
            rt.update_container_resources(UpdateContainerResourcesRequest {
                container_id: app.clone(),
                linux: Some(LinuxContainerResources {
                    memory_limit_in_bytes: 96 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
        .unwrap_or_else(|e| panic!("{handler}: UpdateContainerResources: {e}"));
    // husk: the container's cgroup v2 in the guest; runc: the container's cgroup on this
    // (cgroup v1) host, as CRI names it.
    let memory_limit_after_update = if handler == "husk" {
        // The container's own cgroup, whether or not the agent gives it a cgroup namespace.
        pod.exec_ok(
            &app,
            &[
                "sh",
                "-c",
                "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max",
            ],
        )
    } else {
        // No cgroup namespace under runc on this v1 host: /proc/self/cgroup names the host path.
        let cg = pod.exec_ok(&app, &["cat", "/proc/self/cgroup"]);
        let mem = cg
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
            .unwrap_or_default();
        let unified = cg
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("")
            .to_string();
        std::fs::read_to_string(format!("/sys/fs/cgroup/memory{mem}/memory.limit_in_bytes"))
            .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup{unified}/memory.max")))
            .unwrap_or_default()
    };

    let pod_stats_answered = pod
        .cri
        .block_on(rt.pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod.id.clone(),
        }))
        .map(|r| r.into_inner().stats.is_some())
        .unwrap_or_else(|e| panic!("{handler}: PodSandboxStats: {e}"));

    if handler == "husk" {
        // The VM was sized from the pod annotation: 256 MiB base + 128 MiB.
        let meminfo = pod.exec_ok(&app, &["head", "-1", "/proc/meminfo"]);
        let kib: u64 = meminfo
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            kib > 330 * 1024 && kib <= 384 * 1024,
            "guest MemTotal {kib} KiB for a 384 MiB VM"
        );
    }

    // A container's exit code and logs come back through CRI.
    let job = pod.container(
        "job",
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
        vec![],
    );
    let s = pod.wait_exited(&job);
    let log = std::fs::read_to_string(Path::new(&pod.config.log_directory).join("job.log"))
        .unwrap_or_default();
    let log_has_stdout_and_stderr = log
        .lines()
        .any(|l| l.contains(" stdout ") && l.ends_with("to-stdout"))
        && log
            .lines()
            .any(|l| l.contains(" stderr ") && l.ends_with("to-stderr"));

    let observed = Observed {
        localhost_http,
        same_kernel_boot,
        exit_code: s.exit_code,
        log_has_stdout_and_stderr,
        volume_write_on_host,
        configmap_read_only,
        termination_log_written,
        memory_limit_after_update,
        pod_stats_answered,
    };
    (observed, pod.remove())
}

#[test]
fn a_pod_of_two_containers_runs_alike_on_husk_and_runc() {
    require_root("containerd with CRI, CNI");
    let _sweep = CgroupSweep;
    let mut cri = CriContainerd::start();
    let expected = Observed {
        localhost_http: "hello-from-web\n".into(),
        same_kernel_boot: true,
        exit_code: 3,
        log_has_stdout_and_stderr: true,
        volume_write_on_host: "from-pod\n".into(),
        configmap_read_only: true,
        termination_log_written: "terminated-ok\n".into(),
        memory_limit_after_update: format!("{}\n", 96u64 << 20),
        pod_stats_answered: true,
    };
    let (runc, _) = pod_flow(&mut cri, "runc");
    assert_eq!(runc, expected, "runc baseline");
    let (husk, sid) = pod_flow(&mut cri, "husk");
    assert_eq!(husk, expected, "husk behaves like runc");

    assert_nothing_left(&mut cri, &sid);
}

/// What a pod sharing its process namespace observed.
#[derive(Debug, PartialEq)]
struct SharedPids {
    /// PID 1 as a container sees it: the pod's pause process.
    pid1: String,
    /// Whether container b sees container a's process.
    sees_neighbour: bool,
    /// a's exit code after b sent it SIGTERM.
    neighbour_exit_code: i32,
}

fn shared_pid_flow(cri: &mut CriContainerd, handler: &str) -> (SharedPids, String) {
    let mut pod = Pod::run_with(
        cri,
        &format!("{handler}-shared-pid"),
        handler,
        NamespaceMode::Pod,
    );
    let a = pod.container("a", &["sleep", "1001"], vec![]);
    let b = pod.container("b", &["sleep", "1002"], vec![]);
    let pid1 = pod.exec_ok(&b, &["sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline"]);
    let procs = pod.exec_ok(
        &b,
        &[
            "sh",
            "-c",
            "for c in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $c; echo; done",
        ],
    );
    let sees_neighbour = procs.lines().any(|l| l.trim_end() == "sleep 1001");
    // The pattern is written so that it does not match this shell's own command line.
    pod.exec_ok(
        &b,
        &[
            "sh",
            "-c",
            "for c in /proc/[0-9]*; do grep -q '100[1]' $c/cmdline && kill -TERM ${c#/proc/}; done; true",
        ],
    );
    let neighbour_exit_code = pod.wait_exited(&a).exit_code;
    let observed = SharedPids {
        pid1: pid1.trim_end().to_string(),
        sees_neighbour,
        neighbour_exit_code,
    };
    (observed, pod.remove())
}

#[test]
fn a_pod_sharing_its_process_namespace_runs_alike_on_husk_and_runc() {
    require_root("containerd with CRI, CNI");
    let _sweep = CgroupSweep;
    let mut cri = CriContainerd::start();
    let expected = SharedPids {
        pid1: "/bin/sleep infinity".into(),
        sees_neighbour: true,
        neighbour_exit_code: 143,
    };
    let (runc, _) = shared_pid_flow(&mut cri, "runc");
    assert_eq!(runc, expected, "runc baseline");
    let (husk, sid) = shared_pid_flow(&mut cri, "husk");
    assert_eq!(husk, expected, "husk behaves like runc");
    assert_nothing_left(&mut cri, &sid);
}

/// RemovePodSandbox left nothing: no sandbox, no VM processes, no mounts, no /run/husk.
fn assert_nothing_left(cri: &mut CriContainerd, sid: &str) {
    let mut rt = cri.rt.clone();
    let pods = cri
        .block_on(rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }))
        .unwrap()
        .into_inner();
    assert!(pods.items.is_empty(), "{:?}", pods.items);
    let deadline = Instant::now() + Duration::from_secs(20);
    let dir = Path::new("/run/husk").join(sid);
    while dir.exists() || !processes_mentioning(&format!("/run/husk/{sid}/")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "sandbox {sid} left: {:?}",
            mounts_under(&dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Entries of /run/husk (sandboxes and jail ids), to see that a refused pod left none.
fn husk_state() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/run/husk")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .chain(
            std::fs::read_dir("/run/husk/.jail-ids")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| format!(".jail-ids/{}", e.file_name().to_string_lossy())),
        )
        .collect();
    v.sort();
    v
}

/// RunPodSandbox on husk with `config`, which must fail; returns containerd's error.
fn refused_pod(cri: &mut CriContainerd, config: PodSandboxConfig) -> String {
    let before = husk_state();
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let mut rt = cri.rt.clone();
    let req = RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: "husk".into(),
    };
    let e = match cri.block_on(rt.run_pod_sandbox(req)) {
        Ok(r) => panic!("the pod ran: {}", r.into_inner().pod_sandbox_id),
        Err(e) => e.message().to_string(),
    };
    let pods = cri
        .block_on(rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }))
        .unwrap()
        .into_inner();
    let refused: Vec<_> = pods
        .items
        .into_iter()
        .filter(|p| p.metadata.as_ref().is_some_and(|m| m.name == name))
        .collect();
    assert!(
        refused
            .iter()
            .all(|p| p.state != PodSandboxState::SandboxReady as i32),
        "{refused:?}"
    );
    for p in refused {
        let _ = cri.block_on(rt.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: p.id,
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while husk_state() != before {
        assert!(
            Instant::now() < deadline,
            "a refused pod left {:?} (before: {before:?})",
            husk_state()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    e
}

/// A pod asks for what a VM cannot give (the node's network namespace), names another pod's
/// VM in `io.husk.sandbox-id`, or asks for more memory than allowed: each is refused at
/// RunPodSandbox with the reason, and leaves nothing behind; the pod it named keeps its VM.
#[test]
fn pods_that_ask_for_the_node_or_another_pods_vm_are_refused() {
    require_root("containerd with CRI, CNI");
    let _sweep = CgroupSweep;
    let mut cri = CriContainerd::start();

    let mut host_net = sandbox_config(&cri, "husk-hostnet", NamespaceMode::Container);
    if let Some(ns) = host_net
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.network = NamespaceMode::Node as i32;
    }
    let e = refused_pod(&mut cri, host_net);
    assert!(e.contains("hostNetwork") && e.contains("own VM"), "{e}");

    let mut victim = Pod::run(&mut cri, "husk-victim", "husk");
    let web = victim.container("web", &["sleep", "1000"], vec![]);
    let victim_boot = victim.exec_ok(&web, &["cat", "/proc/sys/kernel/random/boot_id"]);
    let victim_id = victim.id.clone();
    // The pod holds containerd's handle while it runs: the refused pods go through it.
    let cri2 = &mut *victim.cri;
    let mut steer = sandbox_config(cri2, "husk-steer", NamespaceMode::Container);
    steer
        .annotations
        .insert("io.husk.sandbox-id".into(), victim_id.clone());
    let e = refused_pod(cri2, steer);
    assert!(
        e.contains("io.husk.sandbox-id") && e.contains(&victim_id),
        "{e}"
    );

    let mut big = sandbox_config(cri2, "husk-big", NamespaceMode::Container);
    big.annotations
        .insert("io.husk.extra-memory-mib".into(), "999999999".into());
    let e = refused_pod(cri2, big);
    assert!(
        e.contains("io.husk.extra-memory-mib") && e.contains("max_memory_mib"),
        "{e}"
    );

    // The named pod still runs in its own VM.
    assert_eq!(
        victim.exec_ok(&web, &["cat", "/proc/sys/kernel/random/boot_id"]),
        victim_boot
    );
    let sid = victim.remove();
    assert_nothing_left(&mut cri, &sid);
}
