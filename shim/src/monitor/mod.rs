//! `containerd-shim-husk-v2 monitor`: the node's metrics endpoint, in the Prometheus text
//! format (what `kata-monitor` is to Kata).
//!
//! A subcommand of the shim, not a binary of its own: every node that runs husk already has
//! this binary (the installer puts it there), and the monitor reads what the shims of the same
//! version write — the snapshot on each sandbox's metrics socket and the state directory's
//! layout — so the two can never be of different versions on a node.
//!
//! At each scrape it lists the sandbox directories under the state root (`/run/husk`), asks
//! each sandbox's shim for its snapshot (`metrics.sock`, see [`crate::metrics`]), all at once
//! on threads of their own, and meanwhile reads /proc once: the processes under each shim (the
//! VMM, virtiofsd, vhost-device-vsock) by their parent links. A sandbox whose shim does not
//! answer (starting, ending, stuck) is left out of that scrape and counted in
//! `husk_monitor_sandboxes_skipped`; a scrape itself never fails.
//!
//! Every metric is described in [`FAMILIES`] and documented in `deploy/README.md` (a unit test
//! holds the two together).

pub mod collect;
pub mod text;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use collect::{Role, Usage};
use text::{count_value, Desc, Exposition, Kind};

use crate::metrics::{Snapshot, RPC_BUCKETS};

/// Where the monitor listens unless told (`--listen`).
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:9891";

/// At most this many scrapes are served at once; more get 503.
const MAX_CLIENTS: usize = 4;

macro_rules! families {
    ($($id:ident = $name:literal, $kind:ident, $help:literal;)*) => {
        $(const $id: Desc = Desc { name: $name, kind: Kind::$kind, help: $help };)*
        /// Every metric family the monitor writes (the tests check the docs against it).
        #[cfg_attr(not(test), allow(dead_code))]
        pub(crate) const FAMILIES: &[Desc] = &[$($id),*];
    };
}

families! {
    BUILD_INFO = "husk_build_info", Gauge,
        "The monitor's build (containerd-shim-husk-v2), always 1.";
    SCRAPE_SECONDS = "husk_monitor_scrape_duration_seconds", Gauge,
        "How long this scrape took to gather.";
    SANDBOXES = "husk_monitor_sandboxes", Gauge,
        "Sandboxes whose shim answered this scrape.";
    SKIPPED = "husk_monitor_sandboxes_skipped", Gauge,
        "Sandbox directories whose shim did not answer this scrape (starting, ending or stuck).";
    SANDBOX_INFO = "husk_sandbox_info", Gauge,
        "A sandbox's backend and versions, always 1.";
    START_TIME = "husk_sandbox_start_time_seconds", Gauge,
        "When the sandbox came up, in seconds since the Unix epoch.";
    SANDBOX_START = "husk_sandbox_start_seconds", Gauge,
        "The shim's bring-up of the sandbox: from its state directory to CreateSandbox answered.";
    VM_BOOT = "husk_vm_boot_seconds", Gauge,
        "From starting the VM's processes to the agent's ready line on the console (host clock).";
    GUEST_BOOT = "husk_guest_boot_seconds", Gauge,
        "From the guest kernel's start to the agent serving, as the guest reports it.";
    RPC_SECONDS = "husk_agent_rpc_duration_seconds", Histogram,
        "Latency of the shim's short calls to the agent, by method.";
    RPC_ERRORS = "husk_agent_rpc_errors_total", Counter,
        "The shim's calls to the agent that failed, by method.";
    CONTAINERS = "husk_containers", Gauge,
        "The sandbox's containers, by the state of their init process.";
    EXECS = "husk_exec_processes", Gauge,
        "Exec'd processes running in the sandbox's containers.";
    OOM_EVENTS = "husk_oom_events_total", Counter,
        "Container OOM events the shim forwarded to containerd (TaskOOM).";
    GUEST_MEM_TOTAL = "husk_guest_memory_total_bytes", Gauge,
        "The guest's memory (MemTotal), as the guest reports it.";
    GUEST_MEM_AVAILABLE = "husk_guest_memory_available_bytes", Gauge,
        "Memory available to the guest's processes (MemAvailable), as the guest reports it.";
    GUEST_MEM_FREE = "husk_guest_memory_free_bytes", Gauge,
        "The guest's unused memory (MemFree), as the guest reports it.";
    GUEST_MEM_USED = "husk_guest_memory_used_bytes", Gauge,
        "The guest's memory in use: MemTotal - MemAvailable.";
    PROCESSES = "husk_processes", Gauge,
        "Host processes of the sandbox (the shim and everything under it), by kind.";
    CPU = "husk_process_cpu_seconds_total", Counter,
        "CPU time (user + system) of the sandbox's host processes, by kind.";
    RSS = "husk_process_resident_memory_bytes", Gauge,
        "Resident memory of the sandbox's host processes, by kind (guest RAM touched included).";
    PSS = "husk_process_pss_bytes", Gauge,
        "Proportional set size of the sandbox's host processes, by kind: shared pages split among their users.";
    FDS = "husk_process_open_fds", Gauge,
        "Open file descriptors of the sandbox's host processes, by kind.";
    THREADS = "husk_process_threads", Gauge,
        "Threads of the sandbox's host processes, by kind.";
    VIRTIOFS = "husk_virtiofs_bytes_total", Counter,
        "Bytes virtiofsd read and wrote through system calls (rchar/wchar): the guest's file I/O on the shared directory.";
    VSOCK = "husk_vsock_bytes_total", Counter,
        "Bytes vhost-device-vsock moved between the guest and the host's unix sockets (rchar: to the guest, wchar: from the guest; 8-byte eventfd notifications included). QEMU backend only.";
    NET_RX_BYTES = "husk_network_receive_bytes_total", Counter,
        "Bytes the pod received on a CNI interface (its tap's transmit counter).";
    NET_TX_BYTES = "husk_network_transmit_bytes_total", Counter,
        "Bytes the pod sent on a CNI interface (its tap's receive counter).";
    NET_RX_PACKETS = "husk_network_receive_packets_total", Counter,
        "Packets the pod received on a CNI interface.";
    NET_TX_PACKETS = "husk_network_transmit_packets_total", Counter,
        "Packets the pod sent on a CNI interface.";
}

/// What one scrape found.
#[derive(Debug, Default)]
pub struct Scrape {
    pub sandboxes: Vec<(Snapshot, BTreeMap<Role, Usage>)>,
    pub skipped: Vec<String>,
    pub took: Duration,
}

fn ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        #[allow(clippy::cast_precision_loss)]
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// Gathers one scrape of the sandboxes under `state_root`: the shims are asked all at once
/// while /proc is read, then each sandbox's processes are measured, a share of the sandboxes
/// per core.
pub fn gather(state_root: &Path) -> Scrape {
    let start = Instant::now();
    let dirs = collect::sandbox_dirs(state_root);
    let (fetched, procs) = std::thread::scope(|s| {
        let handles: Vec<_> = dirs
            .iter()
            .map(|d| s.spawn(move || collect::fetch(d)))
            .collect();
        let procs = collect::scan_proc();
        let fetched: Vec<_> = handles.into_iter().map(|h| h.join().ok()).collect();
        (fetched, procs)
    });
    let tps = ticks_per_second();
    let mut scrape = Scrape::default();
    let mut snaps = Vec::new();
    for (dir, result) in dirs.iter().zip(fetched) {
        match result {
            Some(Ok(snap)) => snaps.push(snap),
            other => {
                if let Some(Err(e)) = other {
                    log::debug!("monitor: skipping {}: {e}", dir.display());
                }
                scrape.skipped.push(
                    dir.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
            }
        }
    }
    // Most of a scrape's CPU time is the kernel walking each VMM's page tables for its PSS
    // (smaps_rollup: ~2.5 ms per QEMU of 256 MiB here): spread it over the cores, one thread
    // per core rather than per sandbox (on a busy machine every thread waits its turn).
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let chunk = snaps.len().div_ceil(workers).max(1);
    let procs = &procs;
    scrape.sandboxes = std::thread::scope(|s| {
        let handles: Vec<_> = snaps
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|snap| {
                            (
                                snap.clone(),
                                collect::usage(procs, snap.shim_pid, snap.pool_keeper_pid, tps),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .flatten()
            .collect()
    });
    scrape.took = start.elapsed();
    scrape
}

/// The exposition of a scrape.
pub fn render(scrape: &Scrape) -> String {
    let mut e = Exposition::default();
    e.sample(BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    e.sample(SCRAPE_SECONDS, &[], scrape.took.as_secs_f64());
    e.sample(SANDBOXES, &[], count_value(scrape.sandboxes.len() as u64));
    e.sample(SKIPPED, &[], count_value(scrape.skipped.len() as u64));
    for (snap, usage) in &scrape.sandboxes {
        let sb = snap.sandbox.as_str();
        let l = [("sandbox", sb)];
        e.sample(
            SANDBOX_INFO,
            &[
                ("sandbox", sb),
                ("backend", &snap.backend),
                ("shim_version", &snap.shim_version),
                ("agent_version", &snap.agent_version),
            ],
            1.0,
        );
        if let Some(b) = &snap.boot {
            e.sample(START_TIME, &l, b.started_at);
            e.sample(SANDBOX_START, &l, b.sandbox_start_seconds);
            e.sample(VM_BOOT, &l, b.vm_boot_seconds);
            e.sample(GUEST_BOOT, &l, b.guest_boot_seconds);
        }
        for (method, h) in &snap.rpc {
            let ml = [("sandbox", sb), ("method", method.as_str())];
            e.histogram(
                RPC_SECONDS,
                &ml,
                &RPC_BUCKETS,
                &h.buckets,
                h.over,
                h.sum_seconds,
            );
            e.sample(RPC_ERRORS, &ml, count_value(h.errors));
        }
        let c = &snap.containers;
        for (state, n) in [
            ("created", c.created),
            ("running", c.running),
            ("paused", c.paused),
            ("stopped", c.stopped),
        ] {
            e.sample(
                CONTAINERS,
                &[("sandbox", sb), ("state", state)],
                count_value(n),
            );
        }
        e.sample(EXECS, &l, count_value(c.execs_running));
        e.sample(OOM_EVENTS, &l, count_value(snap.oom_events));
        if let Some(g) = &snap.guest {
            e.sample(GUEST_MEM_TOTAL, &l, count_value(g.total_bytes));
            e.sample(GUEST_MEM_AVAILABLE, &l, count_value(g.available_bytes));
            e.sample(GUEST_MEM_FREE, &l, count_value(g.free_bytes));
            e.sample(
                GUEST_MEM_USED,
                &l,
                count_value(g.total_bytes.saturating_sub(g.available_bytes)),
            );
        }
        for (role, u) in usage {
            let pl = [("sandbox", sb), ("process", role.label())];
            e.sample(PROCESSES, &pl, count_value(u.processes));
            e.sample(CPU, &pl, u.cpu_seconds);
            e.sample(RSS, &pl, count_value(u.rss_bytes));
            e.sample(PSS, &pl, count_value(u.pss_bytes));
            e.sample(FDS, &pl, count_value(u.open_fds));
            e.sample(THREADS, &pl, count_value(u.threads));
            match role {
                Role::Virtiofsd => {
                    e.sample(
                        VIRTIOFS,
                        &[("sandbox", sb), ("direction", "read")],
                        count_value(u.read_bytes),
                    );
                    e.sample(
                        VIRTIOFS,
                        &[("sandbox", sb), ("direction", "write")],
                        count_value(u.write_bytes),
                    );
                }
                Role::VhostVsock => {
                    e.sample(
                        VSOCK,
                        &[("sandbox", sb), ("direction", "to_guest")],
                        count_value(u.read_bytes),
                    );
                    e.sample(
                        VSOCK,
                        &[("sandbox", sb), ("direction", "from_guest")],
                        count_value(u.write_bytes),
                    );
                }
                _ => {}
            }
        }
        for i in &snap.interfaces {
            let il = [("sandbox", sb), ("interface", i.name.as_str())];
            e.sample(NET_RX_BYTES, &il, count_value(i.receive_bytes));
            e.sample(NET_TX_BYTES, &il, count_value(i.transmit_bytes));
            e.sample(NET_RX_PACKETS, &il, count_value(i.receive_packets));
            e.sample(NET_TX_PACKETS, &il, count_value(i.transmit_packets));
        }
    }
    e.render()
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum MonitorError {
    #[error("monitor: {0}\nusage: containerd-shim-husk-v2 monitor [--listen ADDR:PORT] [--state-root DIR] [--once]")]
    Usage(String),
    #[error("monitor: listening on {addr}: {source} — pick a free port with --listen")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// The command line of `monitor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub listen: String,
    /// `None`: the configuration's `state_root`.
    pub state_root: Option<PathBuf>,
    /// Print one scrape on stdout and exit.
    pub once: bool,
}

pub(crate) fn parse_args(args: &[std::ffi::OsString]) -> Result<Options, MonitorError> {
    let mut o = Options {
        listen: DEFAULT_LISTEN.into(),
        state_root: None,
        once: false,
    };
    let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .ok_or_else(|| MonitorError::Usage(format!("{flag} needs a value")))
        };
        match a.as_str() {
            "--listen" => o.listen = value("--listen")?,
            "--state-root" => o.state_root = Some(PathBuf::from(value("--state-root")?)),
            "--once" => o.once = true,
            other => return Err(MonitorError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    Ok(o)
}

/// Reads an HTTP request's head (bounded) and answers it.
fn answer(mut conn: TcpStream, state_root: &Path, busy: bool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, kind, body) = if busy {
        (
            "503 Service Unavailable",
            "text/plain",
            "too many scrapes at once\n".to_string(),
        )
    } else if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        )
    } else if path == "/metrics" || path.starts_with("/metrics?") {
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(&gather(state_root)),
        )
    } else if path == "/" {
        (
            "200 OK",
            "text/plain",
            "husk monitor: see /metrics\n".to_string(),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "not found: see /metrics\n".to_string(),
        )
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Serves `/metrics` on `listener` for ever.
pub fn serve(listener: TcpListener, state_root: PathBuf) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(conn) = conn else {
            continue;
        };
        let busy = active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS;
        let done = active.clone();
        let root = state_root.clone();
        let spawned = std::thread::Builder::new()
            .name("monitor-http".into())
            .spawn(move || {
                answer(conn, &root, busy);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            // The closure (and its decrement) was dropped with the failed spawn.
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// `containerd-shim-husk-v2 monitor …`; returns the exit code.
pub fn main(args: &[std::ffi::OsString]) -> i32 {
    let opts = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let state_root = opts.state_root.clone().unwrap_or_else(|| {
        crate::config::Config::load(None)
            .map(|c| c.state_root)
            .unwrap_or_else(|_| crate::config::Config::default().state_root)
    });
    if opts.once {
        print!("{}", render(&gather(&state_root)));
        return 0;
    }
    let listener = match TcpListener::bind(&opts.listen) {
        Ok(l) => l,
        Err(source) => {
            eprintln!(
                "{}",
                MonitorError::Listen {
                    addr: opts.listen.clone(),
                    source
                }
            );
            return 1;
        }
    };
    eprintln!(
        "containerd-shim-husk-v2 monitor: serving http://{}/metrics for the sandboxes under {}",
        listener
            .local_addr()
            .map_or(opts.listen.clone(), |a| a.to_string()),
        state_root.display()
    );
    serve(listener, state_root);
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Boot, Containers, GuestMemory, Histogram, Interface};

    fn sample_scrape() -> Scrape {
        let mut h = Histogram::default();
        h.observe(0.0004, false);
        h.observe(0.2, true);
        let snap = Snapshot {
            version: crate::metrics::SNAPSHOT_VERSION,
            sandbox: "pod-1".into(),
            shim_version: "0.1.0".into(),
            shim_pid: 10,
            vm_pid: 11,
            pool_keeper_pid: None,
            backend: "qemu-tcg".into(),
            agent_version: "0.1.0".into(),
            boot: Some(Boot {
                started_at: 1_700_000_000.0,
                sandbox_start_seconds: 1.5,
                vm_boot_seconds: 1.25,
                guest_boot_seconds: 0.75,
            }),
            containers: Containers {
                running: 2,
                execs_running: 1,
                ..Containers::default()
            },
            oom_events: 3,
            guest: Some(GuestMemory {
                total_bytes: 1000,
                free_bytes: 300,
                available_bytes: 600,
            }),
            rpc: [("CreateContainer".to_string(), h)].into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                tap: "tap0_husk".into(),
                receive_bytes: 5,
                receive_packets: 1,
                transmit_bytes: 7,
                transmit_packets: 2,
            }],
        };
        let usage: BTreeMap<Role, Usage> = [
            (
                Role::Qemu,
                Usage {
                    processes: 1,
                    cpu_seconds: 2.5,
                    rss_bytes: 100,
                    pss_bytes: 90,
                    open_fds: 20,
                    threads: 4,
                    ..Usage::default()
                },
            ),
            (
                Role::Virtiofsd,
                Usage {
                    processes: 2,
                    read_bytes: 4096,
                    write_bytes: 512,
                    ..Usage::default()
                },
            ),
            (
                Role::VhostVsock,
                Usage {
                    processes: 1,
                    read_bytes: 64,
                    write_bytes: 32,
                    ..Usage::default()
                },
            ),
        ]
        .into();
        Scrape {
            sandboxes: vec![(snap, usage)],
            skipped: vec!["gone".into()],
            took: Duration::from_millis(3),
        }
    }

    #[test]
    fn a_scrape_has_every_family_with_its_values() {
        let text = render(&sample_scrape());
        for f in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {} ", f.name)),
                "{} missing:\n{text}",
                f.name
            );
            assert!(f.name.starts_with("husk_"), "{}", f.name);
            match f.kind {
                Kind::Counter => assert!(f.name.ends_with("_total"), "{}", f.name),
                _ => assert!(!f.name.ends_with("_total"), "{}", f.name),
            }
        }
        for line in [
            "husk_monitor_sandboxes 1\n",
            "husk_monitor_sandboxes_skipped 1\n",
            "husk_guest_boot_seconds{sandbox=\"pod-1\"} 0.75\n",
            "husk_agent_rpc_duration_seconds_bucket{sandbox=\"pod-1\",method=\"CreateContainer\",le=\"0.0005\"} 1\n",
            "husk_agent_rpc_duration_seconds_bucket{sandbox=\"pod-1\",method=\"CreateContainer\",le=\"+Inf\"} 2\n",
            "husk_agent_rpc_duration_seconds_count{sandbox=\"pod-1\",method=\"CreateContainer\"} 2\n",
            "husk_agent_rpc_errors_total{sandbox=\"pod-1\",method=\"CreateContainer\"} 1\n",
            "husk_containers{sandbox=\"pod-1\",state=\"running\"} 2\n",
            "husk_guest_memory_used_bytes{sandbox=\"pod-1\"} 400\n",
            "husk_process_cpu_seconds_total{sandbox=\"pod-1\",process=\"qemu\"} 2.5\n",
            "husk_processes{sandbox=\"pod-1\",process=\"virtiofsd\"} 2\n",
            "husk_virtiofs_bytes_total{sandbox=\"pod-1\",direction=\"read\"} 4096\n",
            "husk_vsock_bytes_total{sandbox=\"pod-1\",direction=\"from_guest\"} 32\n",
            "husk_network_receive_bytes_total{sandbox=\"pod-1\",interface=\"eth0\"} 5\n",
            "husk_network_transmit_packets_total{sandbox=\"pod-1\",interface=\"eth0\"} 2\n",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
    }

    #[test]
    fn an_empty_node_still_answers() {
        let text = render(&Scrape::default());
        assert!(text.contains("husk_build_info{version=\""), "{text}");
        assert!(text.contains("husk_monitor_sandboxes 0\n"), "{text}");
    }

    #[test]
    fn every_family_is_documented_in_the_deploy_readme() {
        let readme = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/README.md"),
        )
        .expect("deploy/README.md");
        for f in FAMILIES {
            assert!(
                readme.contains(&format!("`{}`", f.name)),
                "{} is not documented in deploy/README.md",
                f.name
            );
        }
    }

    #[test]
    fn a_vanished_or_silent_sandbox_is_skipped_not_an_error() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("no-socket")).unwrap();
        std::fs::create_dir(root.path().join(".jail-ids")).unwrap();
        // A socket that answers with something that is not a snapshot.
        let bad = root.path().join("bad");
        std::fs::create_dir(&bad).unwrap();
        let l = std::os::unix::net::UnixListener::bind(bad.join("metrics.sock")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            c.write_all(b"not json").unwrap();
        });
        let s = gather(root.path());
        t.join().unwrap();
        assert!(s.sandboxes.is_empty());
        assert_eq!(s.skipped, ["bad", "no-socket"]);
        assert!(gather(&root.path().join("missing")).skipped.is_empty());
    }

    #[test]
    fn arguments() {
        let a =
            |v: &[&str]| parse_args(&v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>());
        assert_eq!(
            a(&[]).unwrap(),
            Options {
                listen: DEFAULT_LISTEN.into(),
                state_root: None,
                once: false
            }
        );
        let o = a(&["--listen", "0.0.0.0:1", "--state-root", "/x", "--once"]).unwrap();
        assert_eq!(o.listen, "0.0.0.0:1");
        assert_eq!(o.state_root.as_deref(), Some(Path::new("/x")));
        assert!(o.once);
        assert!(a(&["--listen"])
            .unwrap_err()
            .to_string()
            .contains("needs a value"));
        assert!(a(&["--bogus"]).unwrap_err().to_string().contains("usage:"));
    }
}
