//! Tier 3, the node's metrics: `containerd-shim-husk-v2 monitor` against sandboxes of a private
//! containerd. Two pods (one on a CNI bridge, one with a memory limit that an exec runs into)
//! show every metric family deploy/README.md documents, with sane values; scrapes in a loop
//! while pods start and stop never fail; and the cost of a scrape of ten pods is measured and
//! bounded.
//!
//! Other sandboxes may run on the machine at the same time (other test binaries): every check
//! here looks at the series of this test's own sandboxes only.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_tests::cni::{BridgeNetwork, Netns};
use husk_tests::husk::{assert_sandbox_gone, shim_binary, HuskContainerd};
use husk_tests::require_root;

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// One sample: family name with suffix, its labels, its value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the exposition strictly enough to catch a malformed line: `# HELP`/`# TYPE`
/// comments, or `name{k="v",…} value`.
fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value: {line:?}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| format!("bad value: {line:?}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((n, rest)) => {
                let rest = rest
                    .strip_suffix('}')
                    .ok_or_else(|| format!("unclosed labels: {line:?}"))?;
                let mut labels = BTreeMap::new();
                let mut chars = rest.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    if chars.next() != Some('"') {
                        return Err(format!("label {key} not quoted: {line:?}"));
                    }
                    let mut v = String::new();
                    loop {
                        match chars.next() {
                            Some('\\') => match chars.next() {
                                Some('n') => v.push('\n'),
                                Some(c) => v.push(c),
                                None => return Err(format!("bad escape: {line:?}")),
                            },
                            Some('"') => break,
                            Some(c) => v.push(c),
                            None => return Err(format!("unterminated label: {line:?}")),
                        }
                    }
                    labels.insert(key, v);
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                }
                (n.to_string(), labels)
            }
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("bad metric name: {line:?}"));
        }
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

/// The value of `name` for sandbox `sb` with the extra labels `with`, if present.
fn value(samples: &[Sample], name: &str, sb: &str, with: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.get("sandbox").map(String::as_str) == Some(sb)
                && with
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// User + system CPU seconds of process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After ")": state is field 3, utime 14, stime 15 (clock ticks of 1/100 s).
    (ticks(11) + ticks(12)) / 100.0
}

/// `containerd-shim-husk-v2 monitor --listen 127.0.0.1:0`, killed (by PID) on drop.
struct Monitor {
    child: Child,
    addr: String,
}

impl Monitor {
    fn start() -> Self {
        let mut child = Command::new(shim_binary())
            .args([
                "monitor",
                "--listen",
                "127.0.0.1:0",
                "--state-root",
                "/run/husk",
            ])
            .env_remove("HUSK_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting containerd-shim-husk-v2 monitor");
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| panic!("the monitor did not say where it serves: {line:?}"))
            .to_string();
        Self { child, addr }
    }

    fn get(&self, path: &str) -> (String, String) {
        get(&self.addr, path)
    }

    fn scrape(&self) -> Vec<Sample> {
        scrape(&self.addr)
    }
}

/// `GET path` of the monitor at `addr`: status line and body.
fn get(addr: &str, path: &str) -> (String, String) {
    let mut c = TcpStream::connect(addr).expect("connecting to the monitor");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// A scrape that must answer 200 with a well-formed exposition.
fn scrape(addr: &str) -> Vec<Sample> {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_scrape_shows_every_metric_of_running_pods_and_never_fails_while_pods_come_and_go() {
    require_root("containerd, network namespaces");
    let h = HuskContainerd::start();
    let mut net = BridgeNetwork::new(1500);
    let ns = Netns::new("hskmon");
    let gateway = net.gateway;
    net.attach(&ns);
    let plain = unique("mon-plain");
    let netpod = unique("mon-net");
    // 64 MiB for the container (the VM grows by as much): an exec that needs more is
    // OOM-killed in the guest.
    h.run_idle(&plain, &["--memory-limit", "67108864"]);
    let with_ns = format!("network:{}", ns.path().display());
    h.run_idle(&netpod, &["--with-ns", &with_ns]);
    h.ctd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "ping",
        &netpod,
        "ping",
        "-c",
        "3",
        "-W",
        "5",
        &gateway.to_string(),
    ]);
    let oom = h.ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "oom",
        &plain,
        "sh",
        "-c",
        "head -c 200m /dev/zero | tail > /dev/null",
    ]);
    assert_eq!(
        oom.status.code(),
        Some(137),
        "an exec past the container's memory limit is OOM-killed: {}",
        String::from_utf8_lossy(&oom.stderr)
    );
    // The OOM event reaches the shim asynchronously (a long poll on the agent).
    std::thread::sleep(Duration::from_secs(2));

    let mon = Monitor::start();
    let (status, _) = mon.get("/nowhere");
    assert!(status.contains("404"), "{status}");
    let s = mon.scrape();
    let text_of = |s: &[Sample]| {
        s.iter()
            .filter(|x| {
                x.labels
                    .get("sandbox")
                    .is_some_and(|v| v == &plain || v == &netpod)
            })
            .map(|x| format!("{} {:?} {}", x.name, x.labels, x.value))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let all = text_of(&s);
    let check = |name: &str, sb: &str, with: &[(&str, &str)], ok: &dyn Fn(f64) -> bool| {
        let v = value(&s, name, sb, with)
            .unwrap_or_else(|| panic!("{name}{with:?} missing for {sb}:\n{all}"));
        assert!(ok(v), "{name}{with:?} of {sb} = {v}: out of range\n{all}");
    };
    assert!(s
        .iter()
        .any(|x| x.name == "husk_build_info" && x.value == 1.0));
    assert!(
        s.iter()
            .any(|x| x.name == "husk_monitor_sandboxes" && x.value >= 2.0),
        "{all}"
    );
    for sb in [&plain, &netpod] {
        check("husk_sandbox_info", sb, &[], &|v| v == 1.0);
        check("husk_sandbox_start_time_seconds", sb, &[], &|v| v > 1.7e9);
        check("husk_sandbox_start_seconds", sb, &[], &|v| {
            v > 0.0 && v < 300.0
        });
        check("husk_vm_boot_seconds", sb, &[], &|v| v > 0.0 && v < 300.0);
        check("husk_guest_boot_seconds", sb, &[], &|v| {
            v > 0.0 && v < 300.0
        });
        // The guest's part of the boot is within the host's view of it.
        let guest = value(&s, "husk_guest_boot_seconds", sb, &[]).unwrap();
        let vm = value(&s, "husk_vm_boot_seconds", sb, &[]).unwrap();
        let start = value(&s, "husk_sandbox_start_seconds", sb, &[]).unwrap();
        assert!(
            guest < vm + 0.5 && vm <= start,
            "guest {guest} vm {vm} start {start}"
        );
        for method in [
            "Check",
            "CreateSandbox",
            "CreateContainer",
            "StartContainer",
            "ExecProcess",
        ] {
            let m = [("method", method)];
            check("husk_agent_rpc_duration_seconds_count", sb, &m, &|v| {
                v >= 1.0
            });
            check("husk_agent_rpc_duration_seconds_sum", sb, &m, &|v| {
                v > 0.0 && v < 60.0
            });
            check(
                "husk_agent_rpc_duration_seconds_bucket",
                sb,
                &[("method", method), ("le", "+Inf")],
                &|v| v >= 1.0,
            );
            check("husk_agent_rpc_errors_total", sb, &m, &|v| v == 0.0);
        }
        check("husk_containers", sb, &[("state", "running")], &|v| {
            v == 1.0
        });
        check("husk_containers", sb, &[("state", "stopped")], &|v| {
            v == 0.0
        });
        check("husk_exec_processes", sb, &[], &|v| v == 0.0);
        check("husk_guest_memory_total_bytes", sb, &[], &|v| {
            v > 100e6 && v < 2e9
        });
        let total = value(&s, "husk_guest_memory_total_bytes", sb, &[]).unwrap();
        check("husk_guest_memory_available_bytes", sb, &[], &|v| {
            v > 0.0 && v < total
        });
        check("husk_guest_memory_free_bytes", sb, &[], &|v| {
            v > 0.0 && v < total
        });
        check("husk_guest_memory_used_bytes", sb, &[], &|v| {
            v > 0.0 && v < total
        });
        for (p, n) in [("shim", 1.0), ("qemu", 1.0), ("vhost-device-vsock", 1.0)] {
            check("husk_processes", sb, &[("process", p)], &|v| v == n);
        }
        check("husk_processes", sb, &[("process", "virtiofsd")], &|v| {
            v >= 1.0
        });
        // The jail keeps a supervisor above each jailed program; nothing is left unnamed.
        check(
            "husk_processes",
            sb,
            &[("process", "jail-supervisor")],
            &|v| v >= 1.0,
        );
        assert!(
            value(&s, "husk_processes", sb, &[("process", "other")]).is_none(),
            "a process of {sb} of no known kind:\n{all}"
        );
        for p in ["shim", "qemu", "virtiofsd", "vhost-device-vsock"] {
            let l = [("process", p)];
            check("husk_process_cpu_seconds_total", sb, &l, &|v| v >= 0.0);
            check("husk_process_resident_memory_bytes", sb, &l, &|v| v > 1e6);
            check("husk_process_pss_bytes", sb, &l, &|v| v > 1e5);
            check("husk_process_open_fds", sb, &l, &|v| v >= 3.0);
            check("husk_process_threads", sb, &l, &|v| v >= 1.0);
        }
        // TCG runs the guest on QEMU's threads: it has used CPU, and its guest RAM is resident.
        check(
            "husk_process_cpu_seconds_total",
            sb,
            &[("process", "qemu")],
            &|v| v > 0.1,
        );
        check(
            "husk_process_resident_memory_bytes",
            sb,
            &[("process", "qemu")],
            &|v| v > 50e6,
        );
        // The container's rootfs came over virtio-fs, the agent calls over vsock.
        check(
            "husk_virtiofs_bytes_total",
            sb,
            &[("direction", "read")],
            &|v| v > 100e3,
        );
        check(
            "husk_virtiofs_bytes_total",
            sb,
            &[("direction", "write")],
            &|v| v >= 0.0,
        );
        check(
            "husk_vsock_bytes_total",
            sb,
            &[("direction", "to_guest")],
            &|v| v > 1e3,
        );
        check(
            "husk_vsock_bytes_total",
            sb,
            &[("direction", "from_guest")],
            &|v| v > 100.0,
        );
    }
    check("husk_oom_events_total", &plain, &[], &|v| v >= 1.0);
    check("husk_oom_events_total", &netpod, &[], &|v| v == 0.0);
    // The memory limit grew the VM: 64 MiB more guest memory than the other pod's.
    let (a, b) = (
        value(&s, "husk_guest_memory_total_bytes", &plain, &[]).unwrap(),
        value(&s, "husk_guest_memory_total_bytes", &netpod, &[]).unwrap(),
    );
    assert!(
        (a - b - 64.0 * 1048576.0).abs() < 8.0 * 1048576.0,
        "{a} vs {b}"
    );
    // Three pings and their replies, at least, on the pod's NIC; none on the plain pod.
    for name in [
        "husk_network_receive_bytes_total",
        "husk_network_transmit_bytes_total",
    ] {
        check(name, &netpod, &[("interface", "eth0")], &|v| {
            v >= 3.0 * 98.0
        });
    }
    for name in [
        "husk_network_receive_packets_total",
        "husk_network_transmit_packets_total",
    ] {
        check(name, &netpod, &[("interface", "eth0")], &|v| v >= 3.0);
    }
    assert!(value(
        &s,
        "husk_network_receive_bytes_total",
        &plain,
        &[("interface", "eth0")]
    )
    .is_none());
    // The scrape's own cost, as it reports it.
    let took = s
        .iter()
        .find(|x| x.name == "husk_monitor_scrape_duration_seconds")
        .unwrap()
        .value;
    eprintln!("a scrape of this node took {:.1} ms", took * 1000.0);

    // Scrapes in a loop while pods start and stop: every one answers, well-formed.
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let stop = stop.clone();
        let addr = mon.addr.clone();
        std::thread::spawn(move || {
            let mut n = 0u32;
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                scrape(&addr);
                slowest = slowest.max(t.elapsed());
                n += 1;
            }
            (n, slowest)
        })
    };
    for i in 0..3 {
        let id = unique(&format!("mon-churn{i}"));
        h.run_idle(&id, &[]);
        h.ctd
            .ctr_ok(&["task", "exec", "--exec-id", "e", &id, "true"]);
        h.remove(&id);
        assert_sandbox_gone(&id);
    }
    stop.store(true, Ordering::SeqCst);
    let (n, slowest) = scraper
        .join()
        .expect("a scrape failed while pods came and went");
    eprintln!("{n} scrapes while 3 pods started and stopped; slowest {slowest:?}");
    assert!(n >= 5, "only {n} scrapes");

    h.remove(&plain);
    h.remove(&netpod);
    assert_sandbox_gone(&plain);
    assert_sandbox_gone(&netpod);
    let s = mon.scrape();
    assert!(value(&s, "husk_sandbox_info", &plain, &[]).is_none());
}

#[test]
fn a_scrape_of_ten_pods_costs_little() {
    require_root("containerd");
    let h = HuskContainerd::start();
    let ids: Vec<String> = (0..10).map(|i| unique(&format!("mon-ten{i}"))).collect();
    for id in &ids {
        h.run_idle(id, &[]);
    }
    let mon = Monitor::start();
    // Warm: the first scrape pages the binary in.
    mon.scrape();
    let cpu_before = cpu_seconds(mon.child.id());
    let mut gather = Vec::new();
    let mut round_trip = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let s = mon.scrape();
        round_trip.push(t.elapsed());
        let mine = ids
            .iter()
            .filter(|id| value(&s, "husk_sandbox_info", id, &[]).is_some())
            .count();
        assert_eq!(mine, 10, "every pod in every scrape");
        gather.push(Duration::from_secs_f64(
            s.iter()
                .find(|x| x.name == "husk_monitor_scrape_duration_seconds")
                .unwrap()
                .value,
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu_per_scrape = (cpu_seconds(mon.child.id()) - cpu_before) / 20.0;
    gather.sort();
    round_trip.sort();
    let load: f64 = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    eprintln!(
        "scrape of 10 pods: HTTP round trip median {:?} (max {:?}), gather median {:?} (max {:?}); monitor CPU {:.1} ms per scrape; load {load} on {cores} cores",
        round_trip[10],
        round_trip[19],
        gather[10],
        gather[19],
        cpu_per_scrape * 1000.0,
    );
    // The cost that depends least on the machine's load: the monitor's own CPU time (most of
    // it the kernel walking each QEMU's page tables for its PSS, ~2.5 ms per pod here; 37–50
    // ms in all measured). The bound catches a scrape that grows out of proportion.
    assert!(
        cpu_per_scrape < 0.1,
        "the monitor used {:.1} ms of CPU per scrape of 10 pods",
        cpu_per_scrape * 1000.0
    );
    // Wall time: under 100 ms, as long as the machine is not oversubscribed; on a busy one
    // every thread waits its turn, so the bound grows with the run queue.
    let bound = Duration::from_secs_f64(0.1 * (load / cores).max(1.0));
    assert!(
        round_trip[10] < bound,
        "a scrape of 10 pods takes {:?} (median): more than {bound:?} (load {load} on {cores} cores)",
        round_trip[10]
    );
    for id in &ids {
        h.remove(id);
    }
    for id in &ids {
        assert_sandbox_gone(id);
    }
}
