//! Times the agent's own steps in a real TCG guest, alternating guest images: new agent
//! connections (the hybrid-vsock handshake, then the first Check on it and a second: a
//! connection opened before `HUSK_LAT_IDLE_MS` of waiting, as a pooled VM's keeper opens its
//! claimer's, then three opened after it, the last left to settle 100 ms), CreateSandbox,
//! then for each container CreateContainer, StartContainer, the first byte of stdout, and
//! RemoveContainer, and ExecProcess → first output in a running container. Each round boots
//! one guest per image (in turn, so load drift hits all alike) and reports medians per image.
//!
//! The spec is ctr's default (`agent/fuzz/specs/ctr-default.json`: `echo hi`, containerd 1.6's
//! masked and read-only paths, device rules, a cgroup path), as `ctr run` and the bench's
//! scenario 2 send it.
//!
//! ```text
//! cargo run --release -p husk-tests --example agent_latency -- ROUNDS CONTAINERS EXECS \
//!     LABEL=INITRAMFS[,VAR=VALUE...] [LABEL=INITRAMFS[,VAR=VALUE...] ...]
//! ```
//! Each `VAR=VALUE` is set in the environment for that variant's boots only (e.g. `PATH` to
//! try another QEMU). `HUSK_LAT_PROVISIONAL` set: a provisional CreateSandbox first, untimed,
//! as the warm pool's keeper makes one, which the timed CreateSandbox then takes over.
//! `HUSK_LAT_CMDLINE=husk.log=debug` adds to the guest's command line; the agent's
//! CreateContainer step lines (`steps`) are then printed after each round (the serial console
//! is slow under TCG: time with it off).
//! HUSK_KERNEL as for the tests. Root, QEMU and virtiofsd as for `agent_vm`. A measuring
//! tool, not a test: it asserts only that each step worked.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use husk_protocols::agent::CreateSandboxRequest;
use husk_protocols::ttrpc::context;
use husk_tests::guest::Guest;
use serde_json::{json, Value};

const CTR_DEFAULT: &str = include_str!("../../agent/fuzz/specs/ctr-default.json");

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// With `HUSK_LAT_MONITOR_DIR` set (a QEMU started with an HMP monitor on
/// `<dir>/<its pid>.sock`): TCG's translation buffer as `info jit` tells it, (code bytes
/// generated in MiB, flushes).
fn jit(pid: u32) -> Option<(f64, f64)> {
    use std::io::{Read, Write};
    let dir = std::env::var_os("HUSK_LAT_MONITOR_DIR")?;
    let sock = std::path::Path::new(&dir).join(format!("{pid}.sock"));
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"info jit\n").ok()?;
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while text.matches("(qemu)").count() < 2 {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((
        field("gen code size")? / 1048576.0,
        field("TB flush count")?,
    ))
}

/// One guest: its steps' times, by step name.
fn round(containers: usize, execs: usize, out: &mut BTreeMap<String, Vec<f64>>) {
    let t = Instant::now();
    let cmdline = std::env::var("HUSK_LAT_CMDLINE").unwrap_or_default();
    let g = Guest::boot_with(256, &cmdline);
    let jit_booted = jit(g.vm.pid());
    let mut put = |k: &str, d: Duration| out.entry(k.to_string()).or_default().push(ms(d));
    put("0 boot to agent connected", t.elapsed());
    // As the warm pool's keeper does before any pod claims the VM (untimed).
    if std::env::var_os("HUSK_LAT_PROVISIONAL").is_some() {
        g.agent
            .client
            .create_sandbox(
                context::with_timeout(120_000_000_000),
                &CreateSandboxRequest {
                    sandbox_id: "pooled".into(),
                    provisional: true,
                    ..Default::default()
                },
            )
            .expect("provisional CreateSandbox");
    }
    let sock = g.vm.vsock_socket().expect("vsock socket").to_path_buf();
    // A connection made before the wait, as a pooled VM's keeper could hold one for its claim.
    let pre = husk_hypervisor::vsock::connect(
        &sock,
        husk_protocols::AGENT_VSOCK_PORT,
        Duration::from_secs(30),
    )
    .expect("vsock connect");
    // As a pooled VM waits for its claim (HUSK_LAT_IDLE_MS, default none).
    if let Some(ms) = std::env::var("HUSK_LAT_IDLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let t = Instant::now();
    let pre = husk_tests::agent::Agent::from_stream(pre);
    pre.check();
    put("0 connected before the wait: first Check", t.elapsed());
    let t = Instant::now();
    pre.check();
    put("0 connected before the wait: Check again", t.elapsed());
    // A new connection, as the shim makes one at a claim or cold start: the hybrid-vsock
    // handshake (vhost-device-vsock asks the guest, the agent accepts), then Check on it, then
    // Check again (one bare round trip on a connection that is up).
    for (label, settle) in [("", 0), (" (2nd)", 0), (" (settled 100 ms)", 100)] {
        let t = Instant::now();
        let s = husk_hypervisor::vsock::connect(
            &sock,
            husk_protocols::AGENT_VSOCK_PORT,
            Duration::from_secs(30),
        )
        .expect("vsock connect");
        put(&format!("0a vsock connect (handshake){label}"), t.elapsed());
        std::thread::sleep(Duration::from_millis(settle));
        let t = Instant::now();
        let second = husk_tests::agent::Agent::from_stream(s);
        second.check();
        put(
            &format!("0b ttrpc client + first Check{label}"),
            t.elapsed(),
        );
        let t = Instant::now();
        second.check();
        put(&format!("0c Check again{label}"), t.elapsed());
    }
    let t = Instant::now();
    g.agent
        .client
        .create_sandbox(
            context::with_timeout(120_000_000_000),
            &CreateSandboxRequest {
                sandbox_id: "c0".into(),
                hostname: "c0".into(),
                ..Default::default()
            },
        )
        .expect("CreateSandbox");
    put("1 CreateSandbox", t.elapsed());
    let base: Value = serde_json::from_str(CTR_DEFAULT).expect("ctr-default.json");
    for i in 0..containers {
        let id = format!("c{i}");
        g.rootfs(&id);
        let mut spec = base.clone();
        spec["linux"]["cgroupsPath"] = json!(format!("/default/{id}"));
        let t0 = Instant::now();
        g.agent.create(&id, &spec, false).expect("CreateContainer");
        let t1 = Instant::now();
        g.agent.start(&id);
        let t2 = Instant::now();
        let first = g.agent.read(&id, "", false).expect("output");
        let t3 = Instant::now();
        assert_eq!(first, b"hi\n");
        let w = g.agent.wait(&id, "");
        assert_eq!(w.exit_status, 0);
        let t4 = Instant::now();
        g.agent.remove(&id, false).expect("RemoveContainer");
        let t5 = Instant::now();
        put("2 CreateContainer", t1 - t0);
        put("3 StartContainer", t2 - t1);
        put("4 create → first output", t3 - t0);
        put("5 RemoveContainer", t5 - t4);
    }
    if execs > 0 {
        let id = "svc";
        g.rootfs(id);
        let mut spec = base.clone();
        spec["process"]["args"] = json!(["sleep", "1000"]);
        spec["linux"]["cgroupsPath"] = json!("/default/svc");
        g.agent
            .create(id, &spec, false)
            .expect("CreateContainer svc");
        g.agent.start(id);
        let mut p = base["process"].clone();
        p["args"] = json!(["echo", "hi"]);
        for e in 0..execs {
            let eid = format!("e{e}");
            let t0 = Instant::now();
            g.agent.exec(id, &eid, &p).expect("ExecProcess");
            let t1 = Instant::now();
            let first = g.agent.read(id, &eid, false).expect("exec output");
            let t2 = Instant::now();
            assert_eq!(first, b"hi\n");
            g.agent.wait(id, &eid);
            put("6 ExecProcess", t1 - t0);
            put("7 exec → first output", t2 - t0);
        }
        g.agent.remove(id, true).expect("RemoveContainer svc");
    }
    if let (Some((c0, f0)), Some((c1, f1))) = (jit_booted, jit(g.vm.pid())) {
        let mut put = |k: &str, v: f64| out.entry(k.to_string()).or_default().push(v);
        put("9 TCG code at ready (MiB)", c0);
        put("9 TCG code at end (MiB)", c1);
        put("9 TCG flushes at ready", f0);
        put("9 TCG flushes after ready", f1 - f0);
    }
    // The agent's per-step lines (with `husk.log=debug` in HUSK_LAT_CMDLINE).
    for l in g.console().lines().filter(|l| l.contains(" steps (ms): ")) {
        eprintln!("  {}", l.trim());
    }
    // QEMU's whole PSS after all this (guest RAM it touched included), in MiB as "ms".
    let rollup =
        std::fs::read_to_string(format!("/proc/{}/smaps_rollup", g.vm.pid())).unwrap_or_default();
    if let Some(kib) = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
    {
        out.entry("8 VMM PSS after (MiB)".into())
            .or_default()
            .push(kib / 1024.0);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: agent_latency ROUNDS CONTAINERS EXECS LABEL=INITRAMFS...";
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).expect(usage);
    let containers: usize = args.get(1).and_then(|a| a.parse().ok()).expect(usage);
    let execs: usize = args.get(2).and_then(|a| a.parse().ok()).expect(usage);
    let images: Vec<(String, String)> = args[3..]
        .iter()
        .map(|a| {
            let (l, p) = a.split_once('=').expect(usage);
            (l.to_string(), p.to_string())
        })
        .collect();
    let base_env: Vec<(String, Option<std::ffi::OsString>)> = images
        .iter()
        .flat_map(|(_, p)| p.split(',').skip(1))
        .map(|kv| {
            let k = kv.split_once('=').expect(usage).0.to_string();
            let v = std::env::var_os(&k);
            (k, v)
        })
        .collect();
    assert!(!images.is_empty(), "{usage}");
    let mut results: Vec<BTreeMap<String, Vec<f64>>> = vec![BTreeMap::new(); images.len()];
    for r in 0..rounds {
        for (i, (label, path)) in images.iter().enumerate() {
            for (k, v) in &base_env {
                match v {
                    Some(v) => std::env::set_var(k, v),
                    None => std::env::remove_var(k),
                }
            }
            let mut parts = path.split(',');
            std::env::set_var("HUSK_INITRAMFS", parts.next().expect(usage));
            for kv in parts {
                let (k, v) = kv.split_once('=').expect(usage);
                std::env::set_var(k, v);
            }
            let mut one = BTreeMap::new();
            round(containers, execs, &mut one);
            eprintln!(
                "round {r} {label}: {}",
                one.iter()
                    .map(|(k, v)| format!(
                        "{k}: {}",
                        v.iter()
                            .map(|x| format!("{x:.0}"))
                            .collect::<Vec<_>>()
                            .join("/")
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            for (k, v) in one {
                results[i].entry(k).or_default().extend(v);
            }
        }
    }
    println!("medians (ms), {rounds} rounds alternating, n per cell in brackets:");
    for (i, (label, _)) in images.iter().enumerate() {
        for (k, v) in results[i].iter_mut() {
            let n = v.len();
            println!("{label:>12}  {k:<28} {:>8.1} [{n}]", median(v));
        }
    }
}
