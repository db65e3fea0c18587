//! Container creation on the host: the static agent runs as `husk-agent serve` on a unix
//! socket (root needed), with busybox rootfses in a temp dir, and each OCI field takes effect
//! in the container. Host cgroups are v1 here, so the cgroup features are tested in the guest
//! (agent_vm.rs); these run without a cgroup.

use std::path::Path;
use std::time::Duration;

use husk_protocols::ttrpc::Code;
use husk_tests::agent::{spec, status_of, HostAgent};
use serde_json::json;

#[test]
fn destroy_sandbox_kills_what_runs_and_ends_the_agent() {
    let mut h = HostAgent::start();
    h.rootfs("left");
    h.agent
        .create("left", &spec(&["sleep", "1000"]), false)
        .unwrap();
    let pid = h.agent.start("left");
    h.agent
        .client
        .destroy_sandbox(
            husk_protocols::ttrpc::context::with_timeout(10_000_000_000),
            &husk_protocols::agent::DestroySandboxRequest::new(),
        )
        .unwrap();
    let status = h.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        !husk_tests::process_alive(pid),
        "container init {pid} outlived DestroySandbox"
    );
}

fn sh(script: &str) -> serde_json::Value {
    spec(&["sh", "-c", script])
}

#[test]
fn id_hostname_env_and_cwd() {
    let h = HostAgent::start();
    let mut s = sh("id; hostname; echo \"$FOO\"; pwd");
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    s["process"]["cwd"] = json!("/tmp");
    let out = h.run("c1", &s);
    assert_eq!(out.status, 0, "{out:?}");
    assert_eq!(
        out.stdout_str(),
        "uid=0(root) gid=0(root)\nhusk-test\nbar baz\n/tmp\n",
        "{out:?}"
    );
}

#[test]
fn user_and_additional_groups() {
    let h = HostAgent::start();
    let mut s = sh("id -u; id -g; id -G");
    s["process"]["user"] = json!({ "uid": 1000, "gid": 1001, "additionalGids": [10, 20] });
    let out = h.run("u1", &s);
    assert_eq!(out.status, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout_str().leak().lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1], "1001");
    let groups: Vec<&str> = lines[2].split_whitespace().collect();
    assert!(
        groups.contains(&"10") && groups.contains(&"20"),
        "{lines:?}"
    );
}

#[test]
fn capabilities_and_no_new_privileges() {
    let h = HostAgent::start();
    let mut s = sh("grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status");
    s["process"]["noNewPrivileges"] = json!(true);
    let out = h.run("caps", &s);
    assert_eq!(out.status, 0, "{out:?}");
    // CHOWN(0) KILL(5) SETGID(6) SETUID(7) NET_BIND_SERVICE(10)
    let want = format!(
        "{:016x}",
        (1u64 << 0) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 10)
    );
    let text = out.stdout_str();
    for key in ["CapEff", "CapPrm", "CapBnd"] {
        assert!(
            text.contains(&format!("{key}:\t{want}")),
            "{key} should be {want}:\n{text}"
        );
    }
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");

    let mut s = sh("grep NoNewPrivs /proc/self/status");
    s["process"]["noNewPrivileges"] = json!(false);
    assert!(h.run("caps2", &s).stdout_str().contains("NoNewPrivs:\t0"));
}

#[test]
fn seccomp_rule_gives_eperm() {
    let h = HostAgent::start();
    let mut s = sh("mkdir /tmp/denied; echo mkdir=$?; touch /tmp/allowed; echo touch=$?");
    s["process"]["noNewPrivileges"] = json!(true);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [ { "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 } ]
    });
    let out = h.run("sc1", &s);
    assert_eq!(out.stdout_str(), "mkdir=1\ntouch=0\n", "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );
    assert!(!h.shared().join("sc1/rootfs/tmp/denied").exists());
}

#[test]
fn rlimits_apply() {
    let h = HostAgent::start();
    let mut s = sh("ulimit -n; ulimit -Hn");
    s["process"]["rlimits"] = json!([{ "type": "RLIMIT_NOFILE", "soft": 123, "hard": 456 }]);
    let out = h.run("rl", &s);
    assert_eq!(out.stdout_str(), "123\n456\n", "{out:?}");
}

#[test]
fn readonly_root_masked_and_readonly_paths() {
    let h = HostAgent::start();
    let mut s = sh("touch /x 2>&1; echo touch=$?; wc -c < /proc/timer_list; echo h > /proc/sys/kernel/hostname; echo sysctl=$?");
    s["root"]["readonly"] = json!(true);
    let out = h.run("ro", &s);
    let text = out.stdout_str();
    assert!(
        text.contains("Read-only file system") && text.contains("touch=1"),
        "{out:?}"
    );
    assert!(
        text.contains("\n0\n"),
        "/proc/timer_list must read empty (masked): {out:?}"
    );
    assert!(
        text.contains("sysctl=1"),
        "/proc/sys must be read-only: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{out:?}"
    );
    assert!(!h.shared().join("ro/rootfs/x").exists());
}

#[test]
fn default_devices_and_mounts() {
    let h = HostAgent::start();
    let s = sh("for d in null zero full random urandom tty; do test -c /dev/$d && echo $d; done; readlink /dev/ptmx; head -c 4 /dev/zero | wc -c; grep -c ' /dev/mqueue ' /proc/self/mountinfo");
    let out = h.run("dev", &s);
    assert_eq!(
        out.stdout_str(),
        "null\nzero\nfull\nrandom\nurandom\ntty\npts/ptmx\n4\n1\n",
        "{out:?}"
    );
}

#[test]
fn terminals_come_from_the_containers_own_devpts() {
    let h = HostAgent::start();
    h.rootfs("tty");
    let mut s = spec(&["sh"]);
    s["process"]["terminal"] = json!(true);
    s["process"]["consoleSize"] = json!({ "height": 24, "width": 77 });
    h.agent.create("tty", &s, false).unwrap();
    h.agent.start("tty");
    // The tty echoes the typed line: each marker is computed so only the output matches.
    h.agent.write_stdin(
        "tty",
        "",
        b"echo TTY=$(tty) PTS=$(ls /dev/pts) SIZE=$(stty size); test -t 0 && echo T-$((6*7))\n",
    );
    let seen = h
        .agent
        .read_until("tty", "", "T-42\r\n", Duration::from_secs(30));
    assert!(
        seen.contains("TTY=/dev/pts/0 PTS=0 ptmx SIZE=24 77\r\n"),
        "{seen:?}"
    );
    h.agent
        .client
        .tty_win_resize(
            husk_protocols::ttrpc::context::with_timeout(10_000_000_000),
            &husk_protocols::agent::TtyWinResizeRequest {
                container_id: "tty".into(),
                rows: 41,
                columns: 101,
                ..Default::default()
            },
        )
        .unwrap();
    h.agent
        .write_stdin("tty", "", b"echo SIZE=$(stty size)-$((1+1))\n");
    let seen = h
        .agent
        .read_until("tty", "", "-2\r\n", Duration::from_secs(30));
    assert!(seen.contains("SIZE=41 101-2\r\n"), "{seen:?}");
    // An exec's terminal: the next pty of the same devpts, of the exec's own size.
    let p = json!({ "terminal": true, "consoleSize": { "height": 30, "width": 90 }, "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", "test -t 0 && echo $(tty) $(ls /dev/pts) $(stty size)"], "env": ["PATH=/bin"], "cwd": "/" });
    h.agent.exec("tty", "t2", &p).unwrap();
    let out = h.agent.collect("tty", "t2");
    assert_eq!(
        (out.status, out.stdout_str().as_str()),
        (0, "/dev/pts/1 0 1 ptmx 30 90\r\n"),
        "{out:?}"
    );
    // A process that is not root owns its terminal, so it can reopen it (as under runc).
    let p3 = json!({ "terminal": true, "user": {"uid": 1000, "gid": 1000}, "args": ["sh", "-c", "echo via-$((2+3)) > /dev/stdout"], "env": ["PATH=/bin"], "cwd": "/" });
    h.agent.exec("tty", "t3", &p3).unwrap();
    let out = h.agent.collect("tty", "t3");
    assert_eq!(
        (out.status, out.stdout_str().as_str()),
        (0, "via-5\r\n"),
        "{out:?}"
    );
    // ^D ends the shell; its pty then reads to the end (EIO is EOF).
    h.agent.close_stdin("tty", "");
    assert_eq!(h.agent.wait("tty", "").exit_status, 0);
    h.agent.read_all("tty", "", false);
    h.agent.remove("tty", false).unwrap();

    // No devpts in the container: no terminal, and the error says where it failed.
    h.rootfs("nopty");
    let mut s = spec(&["sleep", "1000"]);
    s["mounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["type"] != "devpts");
    s["process"]["terminal"] = json!(true);
    let (code, msg) = status_of(h.agent.create("nopty", &s, false));
    assert_eq!(code, Code::INTERNAL);
    assert!(
        msg.starts_with("nopty: opening the container's /dev/ptmx for its terminal: "),
        "{msg}"
    );
    s["process"]["terminal"] = json!(false);
    h.agent.create("nopty", &s, false).unwrap();
    h.agent.start("nopty");
    let (code, msg) = status_of(h.agent.exec("nopty", "t", &p));
    assert_eq!(code, Code::INTERNAL);
    assert!(
        msg.starts_with("nopty: exec t: opening the container's /dev/ptmx for its terminal: "),
        "{msg}"
    );
    h.agent.remove("nopty", true).unwrap();
}

#[test]
fn containers_get_a_cgroup_namespace_by_default() {
    let h = HostAgent::start();
    // Every hierarchy (v1 here, and the unified one) is rooted at the container's cgroup.
    let out = h.run("cgns", &sh("grep -c . /proc/self/cgroup; grep -v ':/$' /proc/self/cgroup; readlink /proc/self/ns/cgroup"));
    let text = out.stdout_str();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() == 2 && lines[0].parse::<u32>().unwrap() > 0,
        "{out:?}"
    );
    assert_ne!(
        Some(std::fs::read_link("/proc/self/ns/cgroup").unwrap()),
        lines.get(1).map(std::path::PathBuf::from),
        "{out:?}"
    );
}

#[test]
fn stdin_reaches_the_process_and_eof_ends_it_with_its_exit_code() {
    let h = HostAgent::start();
    h.rootfs("io");
    h.agent
        .create("io", &sh("cat; echo done >&2; exit 3"), false)
        .unwrap();
    h.agent.start("io");
    h.agent.write_stdin("io", "", b"hello\nworld");
    h.agent.close_stdin("io", "");
    let out = h.agent.collect("io", "");
    assert_eq!(
        out,
        husk_tests::agent::Output {
            status: 3,
            stdout: b"hello\nworld".to_vec(),
            stderr: b"done\n".to_vec()
        }
    );
    h.agent.remove("io", false).unwrap();
}

#[test]
fn exec_and_signals() {
    let h = HostAgent::start();
    h.rootfs("ex");
    h.agent
        .create("ex", &spec(&["sleep", "1000"]), false)
        .unwrap();
    let pid = h.agent.start("ex");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    h.agent.exec("ex", "e1", &json!({ "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", "echo $$; hostname; exit 7"], "env": ["PATH=/bin"], "cwd": "/" })).unwrap();
    let out = h.agent.collect("ex", "e1");
    assert_eq!(out.status, 7, "{out:?}");
    // The exec runs in the container's PID namespace (sleep is PID 1 there).
    let text = out.stdout_str();
    let mut lines = text.lines();
    let inner_pid: u32 = lines.next().unwrap().parse().unwrap();
    assert!(
        inner_pid > 1 && inner_pid < 100,
        "exec's PID in the container: {inner_pid}"
    );
    assert_eq!(lines.next(), Some("husk-test"));
    // A running container refuses a plain remove.
    let (code, msg) = status_of(h.agent.remove("ex", false));
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert!(
        msg.starts_with("ex: ") && msg.contains("still running"),
        "{msg}"
    );
    h.agent.signal("ex", "", 9);
    let w = h.agent.wait("ex", "");
    assert_eq!((w.exit_status, w.signal), (128 + 9, 9));
    h.agent.remove("ex", false).unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}/status")).exists()
            || !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .contains("sleep")
    );
}

#[test]
fn malformed_specs_are_refused_and_leave_nothing_behind() {
    let h = HostAgent::start();
    h.rootfs("bad");
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    let (code, msg) = status_of(h.agent.create_raw("bad", b"{ not json"));
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(
        msg.starts_with("bad: ") && msg.contains("not valid JSON"),
        "{msg}"
    );

    let mut s = spec(&["true"]);
    s.as_object_mut().unwrap().remove("root");
    let (code, msg) = status_of(h.agent.create("bad", &s, false));
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.starts_with("bad: root: missing"), "{msg}");

    let mut s = spec(&["true"]);
    s["linux"]["namespaces"] = json!([{ "type": "pid" }, { "type": "bogus" }]);
    let (code, msg) = status_of(h.agent.create("bad", &s, false));
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("bogus"), "{msg}");

    let mut s = spec(&["true"]);
    s["process"]["user"]["uid"] = json!(-1);
    let (code, msg) = status_of(h.agent.create("bad", &s, false));
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("-1"), "{msg}");

    let (code, msg) = status_of(h.agent.create("nope", &spec(&["true"]), false));
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("nope/rootfs: no such directory"), "{msg}");

    // A failure inside the helper (a mount that cannot work) leaves no container behind.
    let mut s = spec(&["true"]);
    s["mounts"] = json!([{ "destination": "/data", "type": "bind", "source": "/nonexistent/husk", "options": ["rbind"] }]);
    let (code, msg) = status_of(h.agent.create("bad", &s, false));
    assert_eq!(code, Code::INTERNAL);
    assert!(
        msg.starts_with("bad: ") && msg.contains("/nonexistent/husk"),
        "{msg}"
    );

    // None of these left a container: the id is free and a good spec runs.
    let out = h.agent.run("bad", &sh("echo ok"));
    assert_eq!(out.stdout_str(), "ok\n");
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    assert_eq!(
        mounts_before, mounts_after,
        "mounts leaked into the host's namespace"
    );
}

#[test]
fn sysctls_and_oom_score_adj() {
    let h = HostAgent::start();
    // kernel.msgmax belongs to the container's own ipc namespace: the host's stays as it was.
    let host_msgmax = std::fs::read_to_string("/proc/sys/kernel/msgmax").unwrap();
    let mut s = sh("cat /proc/sys/kernel/msgmax /proc/self/oom_score_adj");
    s["linux"]["sysctl"] = json!({ "kernel.msgmax": "12345" });
    // Raising the score needs no privilege (lowering needs CAP_SYS_RESOURCE, which hosts of
    // this kind lack).
    s["process"]["oomScoreAdj"] = json!(500);
    let out = h.run("sys", &s);
    assert_eq!(out.stdout_str(), "12345\n500\n", "{out:?}");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/msgmax").unwrap(),
        host_msgmax
    );
}

#[test]
fn bind_mounts_read_only_and_propagation() {
    let h = HostAgent::start();
    let data = h.shared().join("vol");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f"), "from the host\n").unwrap();
    let mut s = sh("cat /ro/f; echo x > /ro/g; echo w=$?; echo y > /rw/g; grep -E ' /(ro|rw) ' /proc/self/mountinfo | cut -d' ' -f5,6,7");
    s["mounts"].as_array_mut().unwrap().extend([
        json!({ "destination": "/ro", "type": "bind", "source": data, "options": ["rbind", "ro", "rprivate"] }),
        json!({ "destination": "/rw", "type": "bind", "source": data, "options": ["rbind", "rw", "rslave"] }),
    ]);
    let out = h.run("bind", &s);
    let text = out.stdout_str();
    assert!(text.starts_with("from the host\nw=1\n"), "{out:?}");
    assert_eq!(std::fs::read_to_string(data.join("g")).unwrap(), "y\n");
    let lines: Vec<&str> = text.lines().skip(2).collect();
    let ro = lines
        .iter()
        .find(|l| l.starts_with("/ro "))
        .expect("/ro in mountinfo");
    let rw = lines
        .iter()
        .find(|l| l.starts_with("/rw "))
        .expect("/rw in mountinfo");
    assert!(
        ro.contains("ro,") && !ro.contains("master:") && !ro.contains("shared:"),
        "{ro}"
    );
    assert!(rw.contains("rw,"), "{rw}");
}

#[test]
fn namespace_paths_mean_the_sandboxs_namespaces() {
    let h = HostAgent::start();
    h.rootfs("cri");
    let mut s = sh("hostname; readlink /proc/self/ns/ipc");
    // As containerd's CRI writes them: the host's pause process.
    s["linux"]["namespaces"] = json!([
        { "type": "pid" }, { "type": "mount" },
        { "type": "ipc", "path": "/proc/999999/ns/ipc" }, { "type": "uts", "path": "/proc/999999/ns/uts" },
        { "type": "network", "path": "/var/run/netns/cni-0000" }
    ]);
    let (code, msg) = status_of(h.agent.create("cri", &s, false));
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("CreateSandbox"), "{msg}");
    h.agent
        .client
        .create_sandbox(
            husk_protocols::ttrpc::context::with_timeout(10_000_000_000),
            &husk_protocols::agent::CreateSandboxRequest {
                sandbox_id: "pod".into(),
                hostname: "pod-host".into(),
                ..Default::default()
            },
        )
        .unwrap();
    let out = h.agent.run("cri", &s);
    let text = out.stdout_str();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("pod-host"), "{out:?}");
    let host_ipc = std::fs::read_link("/proc/self/ns/ipc").unwrap();
    assert_ne!(
        lines.next().map(std::path::PathBuf::from),
        Some(host_ipc),
        "the container must not be in the host's ipc namespace"
    );
}

/// `linux.rootfsPropagation` as runc gives it: the root is shared with `rshared` (pivot_root
/// used to refuse it: EINVAL, the new root's parent mount being shared), and a recursive
/// slave or private otherwise; the container still starts, and a mount it makes under its
/// root stays in its own namespace (the agent's view of the shared directory is unchanged).
#[test]
fn rootfs_propagation_as_runc() {
    let h = HostAgent::start();
    for (id, prop) in [
        ("rshared", "rshared"),
        ("rslave", "rslave"),
        ("rprivate", "rprivate"),
    ] {
        let mut s = sh("mkdir -p /tmp/m && mount -t tmpfs t /tmp/m && grep -E '^[0-9]+ [0-9]+ [^ ]+ [^ ]+ / ' /proc/self/mountinfo");
        s["linux"]["rootfsPropagation"] = json!(prop);
        // mount(8) in the container needs CAP_SYS_ADMIN, which the test spec's default set
        // lacks.
        s["process"]["capabilities"]["bounding"] = json!(["CAP_SYS_ADMIN"]);
        s["process"]["capabilities"]["effective"] = json!(["CAP_SYS_ADMIN"]);
        s["process"]["capabilities"]["permitted"] = json!(["CAP_SYS_ADMIN"]);
        let out = h.run(id, &s);
        assert_eq!(out.status, 0, "{prop}: {out:?}");
        let root = out.stdout_str();
        assert_eq!(
            root.contains(" shared:"),
            prop == "rshared",
            "{prop}: the root's line: {root}"
        );
        let leaked = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.contains(&format!("/{id}/rootfs/tmp/m ")));
        assert!(!leaked, "{prop}: the container's mount reached the host");
    }
}

/// A sandbox made ahead of its pod (the warm pool: `provisional`) is taken over by the next
/// CreateSandbox — its id and hostname — and its containers see that hostname; a sandbox that
/// is not provisional is never taken over.
#[test]
fn a_provisional_sandbox_is_taken_over_by_its_pod() {
    use husk_protocols::agent::CreateSandboxRequest;
    let h = HostAgent::start();
    h.rootfs("late");
    let ctx = || husk_protocols::ttrpc::context::with_timeout(10_000_000_000);
    let create = |id: &str, host: &str, provisional: bool| {
        h.agent.client.create_sandbox(
            ctx(),
            &CreateSandboxRequest {
                sandbox_id: id.into(),
                hostname: host.into(),
                provisional,
                ..Default::default()
            },
        )
    };
    create("vm-1", "", true).unwrap();
    create("pod", "late-host", false).unwrap();
    let (code, msg) = status_of(create("again", "x", false));
    assert_eq!(code, Code::ALREADY_EXISTS, "{msg}");
    let mut s = sh("hostname");
    s["linux"]["namespaces"] = json!([
        { "type": "pid" }, { "type": "mount" },
        { "type": "ipc", "path": "/proc/999999/ns/ipc" }, { "type": "uts", "path": "/proc/999999/ns/uts" },
        { "type": "network", "path": "/var/run/netns/cni-0000" }
    ]);
    let out = h.agent.run("late", &s);
    assert_eq!(out.stdout_str(), "late-host\n", "{out:?}");
    // The takeover set the hostname from one of the agent's threads, which entered the
    // holder's uts namespace for it: every thread is back in the agent's own.
    let agent = h.child.id();
    let own = std::fs::read_link(format!("/proc/{agent}/ns/uts")).unwrap();
    for task in std::fs::read_dir(format!("/proc/{agent}/task")).unwrap() {
        let task = task.unwrap().path();
        if let Ok(ns) = std::fs::read_link(task.join("ns/uts")) {
            assert_eq!(
                ns,
                own,
                "{} stayed in the pod's uts namespace",
                task.display()
            );
        }
    }
}

/// The children of `agent` in a uts namespace other than its own: its sandbox holders.
fn holders_of(agent: u32) -> Vec<u32> {
    let uts = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/uts")).ok();
    let own = uts(agent);
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After the command's closing parenthesis: state, then the parent's PID.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            ppid == Some(agent) && uts(*pid).is_some() && uts(*pid) != own
        })
        .collect()
}

/// The sandbox holder (a clone of the agent, no exec) keeps none of the agent's fds, holds
/// the pod's hostname, is taken over rather than doubled, refuses a hostname Linux cannot
/// take before starting anything, and is gone after DestroySandbox.
#[test]
fn the_sandbox_holder_keeps_no_fd_and_ends_with_the_sandbox() {
    use husk_protocols::agent::{CreateSandboxRequest, DestroySandboxRequest};
    let h = HostAgent::start();
    let agent = h.child.id();
    let ctx = || husk_protocols::ttrpc::context::with_timeout(10_000_000_000);
    let create = |id: &str, host: &str, provisional: bool| {
        h.agent.client.create_sandbox(
            ctx(),
            &CreateSandboxRequest {
                sandbox_id: id.into(),
                hostname: host.into(),
                provisional,
                ..Default::default()
            },
        )
    };
    let (code, msg) = status_of(create("pod", &"h".repeat(65), false));
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("at most 64"), "{msg}");
    assert!(
        holders_of(agent).is_empty(),
        "a refused sandbox left a holder"
    );
    create("vm-1", "first-host", true).unwrap();
    let holders = holders_of(agent);
    assert_eq!(holders.len(), 1, "{holders:?}");
    let pid = holders[0];
    let fds: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert!(fds.is_empty(), "the holder keeps fds {fds:?}");
    let (code, msg) = status_of(create("pod", &"h".repeat(65), false));
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    create("pod", "pod-host", false).unwrap();
    assert_eq!(
        holders_of(agent),
        vec![pid],
        "taken over, not started again"
    );
    let mut s = sh("hostname");
    s["linux"]["namespaces"] = json!([
        { "type": "pid" }, { "type": "mount" },
        { "type": "ipc", "path": "/proc/999999/ns/ipc" }, { "type": "uts", "path": "/proc/999999/ns/uts" }
    ]);
    let out = h.run("c", &s);
    assert_eq!(out.stdout_str(), "pod-host\n", "{out:?}");
    h.agent
        .client
        .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the holder {pid} outlived DestroySandbox"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
