//! `linux.resources.devices` in a real guest (qemu backend; TCG here): the agent's eBPF device
//! program, as the guest kernel enforces it. A denied open or write fails with EPERM before the
//! driver is reached; an allowed one reaches the driver, so a node with no driver behind it
//! answers ENXIO ("No such device or address") and a locked pty answers EIO — which tells an
//! allowed device from a denied one without needing real hardware.

use husk_protocols::agent::*;
use husk_protocols::ttrpc::{context, Code};
use husk_tests::agent::{spec, status_of, Output};
use husk_tests::guest::Guest;
use serde_json::{json, Value};

const EPERM: &str = "Operation not permitted";

fn ctx() -> context::Context {
    context::with_timeout(120_000_000_000)
}

/// containerd 1.6's rules for `ctr run`: oci.populateDefaultUnixSpec's deny-all, then
/// oci.WithDefaultUnixDevices (containerd v1.6.20, oci/spec.go and oci/spec_opts.go).
fn containerd_default_rules() -> Value {
    let allow = |major: i64, minor: Option<i64>| {
        let mut r = json!({ "allow": true, "type": "c", "major": major, "access": "rwm" });
        if let Some(m) = minor {
            r["minor"] = json!(m);
        }
        r
    };
    json!([
        { "allow": false, "access": "rwm" },
        allow(1, Some(3)),  // /dev/null
        allow(1, Some(8)),  // /dev/random
        allow(1, Some(7)),  // /dev/full
        allow(5, Some(0)),  // /dev/tty
        allow(1, Some(5)),  // /dev/zero
        allow(1, Some(9)),  // /dev/urandom
        allow(5, Some(1)),  // /dev/console
        allow(136, None),   // /dev/pts/*
        allow(5, Some(2)),  // /dev/ptmx
    ])
}

/// A busybox spec running `script`, with `rules` as linux.resources.devices (none: no
/// resources) and device nodes `(path, type, major, minor)` made by the runtime.
fn with_devices(script: &str, rules: Option<Value>, nodes: &[(&str, &str, i64, i64)]) -> Value {
    let mut s = spec(&["sh", "-c", script]);
    if let Some(r) = rules {
        s["linux"]["resources"] = json!({ "devices": r });
    }
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|(path, t, major, minor)| json!({ "path": path, "type": t, "major": major, "minor": minor, "fileMode": 0o666 }))
        .collect();
    s["linux"]["devices"] = json!(nodes);
    s
}

/// /dev/kmsg (char 1:11): a real device in the guest, writable without capabilities, and in
/// no default list.
const KMSG: (&str, &str, i64, i64) = ("/dev/kmsg", "c", 1, 11);

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        out.stdout_str(),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn process(script: &str) -> Value {
    json!({ "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", script], "env": ["PATH=/bin"], "cwd": "/" })
}

#[test]
fn a_denied_dev_null_fails_with_eperm_and_no_rules_change_nothing() {
    let g = Guest::boot(256);
    // No devices section: no program; every device the container has a node for works.
    g.rootfs("plain");
    let out = g.agent.run(
        "plain",
        &with_devices(
            "echo x > /dev/null && echo hi > /dev/kmsg && echo plain-ok",
            None,
            &[KMSG],
        ),
    );
    assert_eq!(
        (out.status, out.stdout_str().as_str()),
        (0, "plain-ok\n"),
        "{out:?}"
    );

    // Denying /dev/null's read and write: both fail with EPERM, /dev/zero still reads, and
    // mknod (not denied) still works for the runtime's node.
    g.rootfs("nonull");
    let rules = json!([{ "allow": false, "type": "c", "major": 1, "minor": 3, "access": "rw" }]);
    let script = "echo x > /dev/null && echo write-ok || echo write-denied; cat /dev/null && echo read-ok || echo read-denied; \
        head -c 5 /dev/zero | wc -c; echo hi > /dev/kmsg && echo kmsg-ok";
    let out = g
        .agent
        .run("nonull", &with_devices(script, Some(rules), &[KMSG]));
    assert_eq!(
        out.stdout_str(),
        "write-denied\nread-denied\n5\nkmsg-ok\n",
        "{out:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("/dev/null: {EPERM}")), "{err}");
    assert_eq!(err.matches(EPERM).count(), 2, "{err}");

    // A rule that is not r, w, m is refused before anything exists: INVALID_ARGUMENT, no cgroup.
    g.rootfs("bad");
    let rules = json!([{ "allow": false, "access": "rwm" }, { "allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwx" }]);
    let (code, msg) = status_of(g.agent.create(
        "bad",
        &with_devices("true", Some(rules), &[]),
        false,
    ));
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(
        msg.contains("linux.resources.devices[1]: access \"rwx\": 'x' is not one of r, w, m"),
        "{msg}"
    );
    let mut s = with_devices("ls /cg/husk | grep -c '^bad$'", None, &[]);
    s["mounts"].as_array_mut().unwrap().push(json!({ "destination": "/cg", "type": "bind", "source": "/sys/fs/cgroup", "options": ["rbind", "ro"] }));
    g.rootfs("look");
    assert_eq!(g.agent.run("look", &s).stdout_str(), "0\n");
}

#[test]
fn containerd_defaults_let_a_tty_container_use_its_devices_and_a_deny_all_list_allows_only_the_listed(
) {
    let g = Guest::boot(256);
    // containerd's default list, in a TTY container as `ctr run -t` makes it. /dev/tty is the
    // controlling terminal, /dev/stdout reopens the pty slave (char 136:N, /dev/pts/0 of the
    // container's own devpts) through /proc/self/fd; the new pty from /dev/ptmx is /dev/pts/1,
    // whose slave is locked, so opening it answers EIO ("Input/output error") once the device
    // cgroup let it through. /dev/kmsg is in no list: EPERM.
    g.rootfs("ctrd");
    let script = "echo x > /dev/null && head -c 4 /dev/zero | wc -c && head -c 4 /dev/urandom | wc -c \
        && echo via-tty > /dev/tty && echo via-pts > /dev/stdout && exec 3<>/dev/ptmx && ls /dev/pts | grep -c '^0$'; \
        (exec 4<>/dev/pts/1); echo hi > /dev/kmsg; echo END-$((6*7))";
    let mut s = with_devices(script, Some(containerd_default_rules()), &[KMSG]);
    s["process"]["terminal"] = json!(true);
    g.agent.create("ctrd", &s, false).unwrap();
    g.agent.start("ctrd");
    let out = g.agent.collect("ctrd", "");
    g.agent.remove("ctrd", false).unwrap();
    let tty = out.stdout_str();
    assert_eq!(out.status, 0, "{tty:?}");
    for want in [
        "4\r\n4\r\nvia-tty\r\nvia-pts\r\n1\r\n",
        "/dev/pts/1: Input/output error",
        &format!("/dev/kmsg: {EPERM}"),
        "END-42",
    ] {
        assert!(tty.contains(want), "{want:?} missing from {tty:?}");
    }

    // CRI writes only the deny-all (plus the pod's own devices): the default devices still
    // work, as under runc.
    g.rootfs("cri");
    let script =
        "echo x > /dev/null && head -c 3 /dev/zero | wc -c && echo hi > /dev/kmsg; echo done";
    let out = g.agent.run(
        "cri",
        &with_devices(
            script,
            Some(json!([{ "allow": false, "access": "rwm" }])),
            &[KMSG],
        ),
    );
    assert_eq!(out.stdout_str(), "3\ndone\n", "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("/dev/kmsg: {EPERM}")),
        "{out:?}"
    );

    // Deny-all, then kmsg for writing and the block device 8:0 for reading. Each listed access
    // reaches its driver (8:0 has none: ENXIO); everything else is EPERM.
    g.rootfs("listed");
    let rules = json!([
        { "allow": false, "access": "rwm" },
        { "allow": true, "type": "c", "major": 1, "minor": 11, "access": "w" },
        { "allow": true, "type": "b", "major": 8, "minor": 0, "access": "r" },
    ]);
    let nodes = [
        KMSG,
        ("/dev/ttyS0", "c", 4, 64),
        ("/dev/sda", "b", 8, 0),
        ("/dev/sdb", "b", 8, 16),
    ];
    let script = "echo hi > /dev/kmsg && echo kmsg-write-ok; \
        for t in 'if=/dev/kmsg' 'of=/dev/ttyS0' 'if=/dev/ttyS0' 'if=/dev/sda' 'of=/dev/sda' 'if=/dev/sdb'; do \
          dd $t bs=512 count=1 2>&1 </dev/zero >/dev/null | grep -o \"can't open.*\"; done";
    let out = g
        .agent
        .run("listed", &with_devices(script, Some(rules), &nodes));
    assert_eq!(
        text(&out),
        format!(
            "kmsg-write-ok\n\
             can't open '/dev/kmsg': {EPERM}\n\
             can't open '/dev/ttyS0': {EPERM}\n\
             can't open '/dev/ttyS0': {EPERM}\n\
             can't open '/dev/sda': No such device or address\n\
             can't open '/dev/sda': {EPERM}\n\
             can't open '/dev/sdb': {EPERM}\n"
        ),
        "{out:?}"
    );
}

#[test]
fn update_container_replaces_the_device_program_of_a_running_container() {
    let g = Guest::boot(256);
    g.rootfs("u");
    let rules = json!([{ "allow": false, "access": "rwm" }]);
    g.agent
        .create(
            "u",
            &with_devices("sleep 1000", Some(rules), &[KMSG]),
            false,
        )
        .unwrap();
    g.agent.start("u");
    let mut n = 0;
    let mut probe = |g: &Guest| {
        n += 1;
        let id = format!("p{n}");
        g.agent
            .exec(
                "u",
                &id,
                &process("echo hi > /dev/kmsg && echo kmsg-ok; echo x > /dev/null && echo null-ok"),
            )
            .unwrap();
        text(&g.agent.collect("u", &id))
    };
    let update = |g: &Guest, r: Value| {
        g.agent.client.update_container(
            ctx(),
            &UpdateContainerRequest {
                container_id: "u".into(),
                oci_resources_json: serde_json::to_vec(&r).unwrap(),
                ..Default::default()
            },
        )
    };
    // (stdout, then stderr)
    let denied = format!("null-ok\nsh: can't create /dev/kmsg: {EPERM}\n");
    assert_eq!(probe(&g), denied);

    // A list that also allows kmsg: allowed at once — so the old program, which denies it,
    // is no longer attached (attached programs must all allow).
    update(&g, json!({ "devices": [{ "allow": false, "access": "rwm" }, { "allow": true, "type": "c", "major": 1, "minor": 11, "access": "w" }] })).unwrap();
    assert_eq!(probe(&g), "kmsg-ok\nnull-ok\n");
    // The same rules again: the agent loads each distinct program once, so this replaces the
    // attached program by itself, which the kernel allows.
    update(&g, json!({ "devices": [{ "allow": false, "access": "rwm" }, { "allow": true, "type": "c", "major": 1, "minor": 11, "access": "w" }] })).unwrap();
    assert_eq!(probe(&g), "kmsg-ok\nnull-ok\n");

    // Resources without devices leave the program alone.
    update(&g, json!({ "pids": { "limit": 100 } })).unwrap();
    assert_eq!(probe(&g), "kmsg-ok\nnull-ok\n");

    // A bad list is refused and changes nothing.
    let (code, msg) = status_of(update(
        &g,
        json!({ "devices": [{ "allow": true, "type": "p" }] }),
    ));
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(
        msg.starts_with("u: ") && msg.contains("linux.resources.devices[0]: type \"p\""),
        "{msg}"
    );
    assert_eq!(probe(&g), "kmsg-ok\nnull-ok\n");

    // Back to deny-all, then a list without one: the default devices can be denied by name.
    update(
        &g,
        json!({ "devices": [{ "allow": false, "access": "rwm" }] }),
    )
    .unwrap();
    assert_eq!(probe(&g), denied);
    update(&g, json!({ "devices": [{ "allow": false, "type": "c", "major": 1, "minor": 3, "access": "w" }] })).unwrap();
    assert_eq!(
        probe(&g),
        format!("kmsg-ok\nsh: can't create /dev/null: {EPERM}\n")
    );
    g.agent.remove("u", true).unwrap();
}
