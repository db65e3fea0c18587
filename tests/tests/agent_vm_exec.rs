//! ExecProcess in a real guest (qemu backend; TCG here): an exec'd process gets what
//! `runc exec` gives it (the list is `agent/src/container/exec.rs`'s `config`): the
//! container's seccomp filter and oom_score_adj, the exec spec's capabilities, user and groups,
//! cwd, env and rlimits (the container's where the exec spec has none), no_new_privs, and the
//! container's namespaces and cgroup.

use husk_protocols::agent::*;
use husk_protocols::ttrpc::context;
use husk_tests::agent::{spec, Output};
use husk_tests::guest::Guest;
use serde_json::{json, Value};

fn ctx() -> context::Context {
    context::with_timeout(120_000_000_000)
}

/// The lines of `/proc/self/status` the checks look at, whitespace-normalised.
const STATUS: &str = "grep -E '^(Uid|Gid|Groups|CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t ' '  '";

fn lines(out: &Output) -> Vec<String> {
    out.stdout_str()
        .lines()
        .map(|l| l.trim_end().to_string())
        .collect()
}

fn exec(g: &Guest, id: &str, exec_id: &str, p: &Value) -> Output {
    g.agent
        .exec(id, exec_id, p)
        .unwrap_or_else(|e| panic!("ExecProcess {id}/{exec_id}: {e:?}"));
    g.agent.collect(id, exec_id)
}

/// A container confined as `ctr run --seccomp` confines one, with an OOM score, no_new_privs
/// and an rlimit; its init sleeps.
fn confined() -> Value {
    let mut s = spec(&["sleep", "1000"]);
    s["process"]["noNewPrivileges"] = json!(true);
    s["process"]["oomScoreAdj"] = json!(123);
    s["process"]["rlimits"] = json!([{ "type": "RLIMIT_NOFILE", "soft": 321, "hard": 654 }]);
    // Everything allowed but mkdir, which fails with a telling errno (EOPNOTSUPP).
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [ { "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 95 } ]
    });
    s
}

#[test]
fn an_exec_gets_the_containers_filter_oom_score_and_defaults() {
    let g = Guest::boot(256);
    g.rootfs("conf");
    g.agent.create("conf", &confined(), false).unwrap();
    g.agent.start("conf");

    // An exec spec that leaves capabilities, rlimits and noNewPrivileges out: the container's.
    let script = format!("{STATUS}; cat /proc/self/oom_score_adj; grep 'Max open files' /proc/self/limits | tr -s ' '; mkdir /tmp/denied");
    let p = json!({ "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", script], "env": ["PATH=/bin"], "cwd": "/" });
    let out = exec(&g, "conf", "plain", &p);
    assert_eq!(
        lines(&out),
        [
            "Uid: 0 0 0 0",
            "Gid: 0 0 0 0",
            "Groups:",
            "CapPrm: 00000000000004e1",
            "CapEff: 00000000000004e1",
            "CapBnd: 00000000000004e1",
            "NoNewPrivs: 1",
            "Seccomp: 2",
            "123",
            "Max open files 321 654 files",
        ],
        "{out:?}"
    );
    // The profile's denial reaches the exec'd process, with the profile's errno.
    assert_ne!(out.status, 0);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not supported"),
        "{out:?}"
    );

    // An exec spec with its own settings: those, and the container's filter all the same
    // (installed before the user switch, as no_new_privs is off).
    std::fs::create_dir_all(g.shared().join("conf/rootfs/tmp/work")).unwrap();
    let script = format!("{STATUS}; pwd; echo \"FOO=$FOO HOME=${{HOME-unset}}\"; grep 'Max open files' /proc/self/limits | tr -s ' '; cat /proc/self/oom_score_adj");
    let p = json!({
        "user": { "uid": 1000, "gid": 1001, "additionalGids": [10, 20] },
        "args": ["sh", "-c", script],
        "env": ["PATH=/bin", "FOO=bar baz"],
        "cwd": "/tmp/work",
        "noNewPrivileges": false,
        "rlimits": [{ "type": "RLIMIT_NOFILE", "soft": 77, "hard": 88 }],
        // Ambient as well: a process that is not root keeps no capability across execve otherwise.
        "capabilities": {
            "bounding": ["CAP_CHOWN", "CAP_KILL"],
            "effective": ["CAP_KILL"],
            "permitted": ["CAP_KILL"],
            "inheritable": ["CAP_KILL"],
            "ambient": ["CAP_KILL"]
        }
    });
    let out = exec(&g, "conf", "own", &p);
    assert_eq!(
        (out.status, lines(&out)),
        (
            0,
            vec![
                "Uid: 1000 1000 1000 1000".to_string(),
                "Gid: 1001 1001 1001 1001".into(),
                "Groups: 10 20".into(),
                "CapPrm: 0000000000000020".into(),
                "CapEff: 0000000000000020".into(),
                "CapBnd: 0000000000000021".into(),
                "NoNewPrivs: 0".into(),
                "Seccomp: 2".into(),
                "/tmp/work".into(),
                "FOO=bar baz HOME=unset".into(),
                "Max open files 77 88 files".into(),
                "123".into(),
            ]
        ),
        "{out:?}"
    );
    g.agent.remove("conf", true).unwrap();

    // A container without a filter (a privileged one has none): its execs have none either.
    g.rootfs("free");
    g.agent
        .create("free", &spec(&["sleep", "1000"]), false)
        .unwrap();
    g.agent.start("free");
    let p = json!({ "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", "grep Seccomp: /proc/self/status | tr -s '\\t' ' '; cat /proc/self/oom_score_adj; mkdir /tmp/fine && echo made"], "env": ["PATH=/bin"], "cwd": "/" });
    let out = exec(&g, "free", "e", &p);
    assert_eq!(
        (out.status, out.stdout_str().as_str()),
        (0, "Seccomp: 0\n0\nmade\n"),
        "{out:?}"
    );
    g.agent.remove("free", true).unwrap();
}

#[test]
fn an_exec_is_in_the_containers_namespaces_and_cgroup() {
    let g = Guest::boot(256);
    g.rootfs("ns");
    g.agent.create("ns", &confined(), false).unwrap();
    g.agent.start("ns");
    // PID 1 of the container's PID namespace is its init; the exec sees the same namespaces
    // (the caps match the init's, so it may read its links) and the same cgroup root.
    let probe = "for n in mnt pid ipc uts cgroup net; do [ \"$(readlink /proc/self/ns/$n)\" = \"$(readlink /proc/1/ns/$n)\" ] && echo same-$n; done; cat /proc/self/cgroup; hostname";
    let p = json!({ "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", probe], "env": ["PATH=/bin"], "cwd": "/" });
    let out = exec(&g, "ns", "look", &p);
    assert_eq!(
        (out.status, out.stdout_str().as_str()),
        (
            0,
            "same-mnt\nsame-pid\nsame-ipc\nsame-uts\nsame-cgroup\nsame-net\n0::/\nhusk-test\n"
        ),
        "{out:?}"
    );
    // And it is counted in the container's cgroup (its global PID is in cgroup.procs).
    let p = json!({ "user": {"uid": 0, "gid": 0}, "args": ["sleep", "1000"], "env": ["PATH=/bin"], "cwd": "/" });
    let pid = g.agent.exec("ns", "sleeper", &p).unwrap().pid;
    let procs = g
        .agent
        .client
        .list_processes(
            ctx(),
            &ContainerRef {
                container_id: "ns".into(),
                ..Default::default()
            },
        )
        .unwrap()
        .pids;
    assert!(
        procs.contains(&pid),
        "exec pid {pid} not in the container's cgroup {procs:?}"
    );
    g.agent.signal("ns", "sleeper", 9);
    g.agent.wait("ns", "sleeper");
    // The helpers run at a fixed layout (their code's translations are reused under TCG);
    // what they exec does not: an exec and a container's init get the default persona, so
    // their addresses are randomized as usual.
    let p = json!({ "user": {"uid": 0, "gid": 0}, "args": ["cat", "/proc/self/personality"], "env": ["PATH=/bin"], "cwd": "/" });
    let out = exec(&g, "ns", "persona", &p);
    assert_eq!((out.status, out.stdout_str().as_str()), (0, "00000000\n"));
    g.agent.remove("ns", true).unwrap();
    g.rootfs("init-persona");
    let out = g
        .agent
        .run("init-persona", &spec(&["cat", "/proc/self/personality"]));
    assert_eq!((out.status, out.stdout_str().as_str()), (0, "00000000\n"));
}
