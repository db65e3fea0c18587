//! What only the shim knows about its sandbox, for the node's metrics endpoint
//! (`containerd-shim-husk-v2 monitor`, see [`crate::monitor`]): boot times, the latency of each
//! agent call, container counts, OOM events, the guest's memory and the pod's network counters.
//!
//! One shim serves one sandbox, so the measurements are process-wide. The shim serves them on
//! `/run/husk/<sid>/metrics.sock` (the state directory is root-only, and the jailed VM
//! processes never see it): a client connects, the shim writes one JSON [`Snapshot`] and
//! closes. Nothing is computed between scrapes beyond counting. The guest's memory is asked for
//! (`GetGuestStats`) on a thread of its own, once when the sandbox comes up and again after
//! each scrape, so a scrape answers at once with the previous answer and never waits for a
//! guest (under TCG a guest round trip is 3–90 ms on a loaded host; a stalled guest would stall
//! it for the deadline). What the host can measure itself — CPU, memory and I/O of the VMM and
//! its helpers — the monitor reads from /proc.
//!
//! Agent call latencies: [`TimedClient`] wraps the control connection's client and times each
//! short call; long polls (`WaitProcess`, `ReadStdout`, `GetOOMEvent`, …) run on connections of
//! their own and are not latencies, so they are not timed.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::agent::AgentClient;
use husk_protocols::agent as pb;
use husk_protocols::ttrpc;
use serde::{Deserialize, Serialize};

use crate::sandbox::Sandbox;

/// Version of the [`Snapshot`] document; the monitor skips a shim that speaks another.
pub(crate) const SNAPSHOT_VERSION: u32 = 1;

/// Deadline of a `GetGuestStats` call.
pub(crate) const GUEST_STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// Upper bounds (seconds) of the agent call latency histogram: a `Check` is ~0.3 ms under QEMU
/// TCG here, a `CreateContainer` tens to hundreds of ms, and a short call's deadline is 30 s.
pub(crate) const RPC_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// One agent method's latencies: counts per bucket of [`RPC_BUCKETS`] (not cumulative) plus
/// the calls slower than the last bound.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// `buckets[i]`: calls that took at most `RPC_BUCKETS[i]` and more than the bound before.
    pub buckets: Vec<u64>,
    /// Calls slower than the last bound.
    pub over: u64,
    pub count: u64,
    pub sum_seconds: f64,
    /// Calls that returned an error (timed like the others).
    pub errors: u64,
}

impl Histogram {
    pub(crate) fn observe(&mut self, seconds: f64, failed: bool) {
        if self.buckets.len() != RPC_BUCKETS.len() {
            self.buckets = vec![0; RPC_BUCKETS.len()];
        }
        match RPC_BUCKETS.iter().position(|b| seconds <= *b) {
            Some(i) => self.buckets[i] += 1,
            None => self.over += 1,
        }
        self.count += 1;
        self.sum_seconds += seconds;
        if failed {
            self.errors += 1;
        }
    }
}

/// Boot times of the sandbox, recorded once it is up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Boot {
    /// When the sandbox came up (seconds since the Unix epoch).
    pub started_at: f64,
    /// The shim's bring-up: from the state directory made to `CreateSandbox` answered.
    pub sandbox_start_seconds: f64,
    /// From starting the VM's processes to the agent's ready line on the console (host clock).
    pub vm_boot_seconds: f64,
    /// From the guest kernel's start to the agent serving (the ready line; guest clock).
    pub guest_boot_seconds: f64,
}

/// The sandbox's containers by the state of their init process, and its running execs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Containers {
    pub created: u64,
    pub running: u64,
    pub paused: u64,
    pub stopped: u64,
    pub execs_running: u64,
}

/// What the guest says of its memory (`GetGuestStats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemory {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub available_bytes: u64,
}

/// One pod interface's counters, from the pod's side: `receive` is what reached the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// The CNI interface the guest NIC copies (e.g. `eth0`).
    pub name: String,
    /// Its tap in the pod netns, whose counters these are.
    pub tap: String,
    pub receive_bytes: u64,
    pub receive_packets: u64,
    pub transmit_bytes: u64,
    pub transmit_packets: u64,
}

/// What the shim answers on its metrics socket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    pub sandbox: String,
    pub shim_version: String,
    pub shim_pid: u32,
    /// The VMM's host PID (the task PID containerd reports).
    pub vm_pid: u32,
    /// For a VM from the warm pool: its keeper, the parent of the VM's processes.
    #[serde(default)]
    pub pool_keeper_pid: Option<u32>,
    pub backend: String,
    pub agent_version: String,
    pub boot: Option<Boot>,
    pub containers: Containers,
    /// TaskOOM events the shim forwarded to containerd.
    pub oom_events: u64,
    /// As the guest answered the previous scrape's request (or the one made when the sandbox
    /// came up): a scrape never waits for a guest. `None` when the guest did not answer within
    /// [`GUEST_STATS_TIMEOUT`].
    pub guest: Option<GuestMemory>,
    /// Latencies per agent method (ttrpc method name, e.g. `CreateContainer`).
    pub rpc: BTreeMap<String, Histogram>,
    pub interfaces: Vec<Interface>,
}

static RPC: Mutex<BTreeMap<&'static str, Histogram>> = Mutex::new(BTreeMap::new());
static BOOT: Mutex<Option<Boot>> = Mutex::new(None);
static OOM_EVENTS: AtomicU64 = AtomicU64::new(0);

/// Records one agent call.
pub(crate) fn observe_rpc(method: &'static str, took: Duration, failed: bool) {
    RPC.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(method)
        .or_default()
        .observe(took.as_secs_f64(), failed);
}

/// Records the sandbox's boot times (once it is up).
pub(crate) fn record_boot(sandbox_start: Duration, vm_boot: Duration, guest_boot_ms: u64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    *BOOT.lock().unwrap_or_else(|e| e.into_inner()) = Some(Boot {
        started_at: now.saturating_sub(sandbox_start).as_secs_f64(),
        sandbox_start_seconds: sandbox_start.as_secs_f64(),
        vm_boot_seconds: vm_boot.as_secs_f64(),
        guest_boot_seconds: Duration::from_millis(guest_boot_ms).as_secs_f64(),
    });
}

/// Counts one OOM event forwarded to containerd.
pub(crate) fn oom_event() {
    OOM_EVENTS.fetch_add(1, Ordering::Relaxed);
}

/// The agent client of the control connection, timing each short call into the process's
/// histogram. Every other method of [`AgentClient`] (through `Deref`) is not timed.
#[derive(Clone)]
pub struct TimedClient {
    inner: AgentClient,
}

impl TimedClient {
    pub fn new(inner: AgentClient) -> Self {
        Self { inner }
    }
}

impl std::ops::Deref for TimedClient {
    type Target = AgentClient;
    fn deref(&self) -> &AgentClient {
        &self.inner
    }
}

macro_rules! timed {
    ($($method:ident($req:ty) -> $resp:ty = $name:literal;)*) => {
        impl TimedClient {
            $(
                #[doc = concat!("`", $name, "`, timed.")]
                pub fn $method(
                    &self,
                    ctx: ttrpc::context::Context,
                    req: &$req,
                ) -> ttrpc::Result<$resp> {
                    let start = Instant::now();
                    let r = self.inner.$method(ctx, req);
                    observe_rpc($name, start.elapsed(), r.is_err());
                    r
                }
            )*
        }
    };
}

timed! {
    check(pb::CheckRequest) -> pb::CheckResponse = "Check";
    get_guest_details(pb::GuestDetailsRequest) -> pb::GuestDetails = "GetGuestDetails";
    get_guest_stats(pb::GuestStatsRequest) -> pb::GuestStats = "GetGuestStats";
    create_sandbox(pb::CreateSandboxRequest) -> pb::Empty = "CreateSandbox";
    destroy_sandbox(pb::DestroySandboxRequest) -> pb::Empty = "DestroySandbox";
    create_container(pb::CreateContainerRequest) -> pb::Empty = "CreateContainer";
    start_container(pb::ContainerRef) -> pb::ProcessStarted = "StartContainer";
    remove_container(pb::RemoveContainerRequest) -> pb::Empty = "RemoveContainer";
    pause_container(pb::ContainerRef) -> pb::Empty = "PauseContainer";
    resume_container(pb::ContainerRef) -> pb::Empty = "ResumeContainer";
    update_container(pb::UpdateContainerRequest) -> pb::Empty = "UpdateContainer";
    stats_container(pb::ContainerRef) -> pb::ContainerStats = "StatsContainer";
    list_processes(pb::ContainerRef) -> pb::ProcessList = "ListProcesses";
    exec_process(pb::ExecProcessRequest) -> pb::ProcessStarted = "ExecProcess";
    signal_process(pb::SignalProcessRequest) -> pb::Empty = "SignalProcess";
    close_stdin(pb::ProcessRef) -> pb::Empty = "CloseStdin";
    tty_win_resize(pb::TtyWinResizeRequest) -> pb::Empty = "TtyWinResize";
    update_interface(pb::UpdateInterfaceRequest) -> pb::Interface = "UpdateInterface";
    update_routes(pb::UpdateRoutesRequest) -> pb::Routes = "UpdateRoutes";
    list_interfaces(pb::ListInterfacesRequest) -> pb::Interfaces = "ListInterfaces";
    set_guest_date_time(pb::SetGuestDateTimeRequest) -> pb::Empty = "SetGuestDateTime";
}

/// One line of /proc/net/dev: `name: rx_bytes rx_packets … (8 fields) tx_bytes tx_packets …`.
fn parse_net_dev(text: &str) -> BTreeMap<String, [u64; 4]> {
    let mut out = BTreeMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        if v.len() >= 10 {
            // rx bytes, rx packets, tx bytes, tx packets
            out.insert(name.trim().to_string(), [v[0], v[1], v[8], v[9]]);
        }
    }
    out
}

/// The counters of `taps` (`(interface, tap)`) in the network namespace `netns`, read as
/// /proc/net/dev on a short-lived thread that entered it (the shim's other threads never change
/// namespace). A tap's receive is what the VM sent, so the pod's view swaps the directions.
fn interfaces(netns: &Path, taps: &[(String, String)]) -> Vec<Interface> {
    let path = netns.to_path_buf();
    let read = std::thread::Builder::new()
        .name("metrics-netns".into())
        .spawn(move || -> std::io::Result<String> {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            std::fs::read_to_string("/proc/thread-self/net/dev")
        })
        .ok()
        .and_then(|h| h.join().ok())
        .and_then(Result::ok);
    let Some(text) = read else {
        return Vec::new();
    };
    let dev = parse_net_dev(&text);
    taps.iter()
        .filter_map(|(name, tap)| {
            let [rx_b, rx_p, tx_b, tx_p] = dev.get(tap)?;
            Some(Interface {
                name: name.clone(),
                tap: tap.clone(),
                receive_bytes: *tx_b,
                receive_packets: *tx_p,
                transmit_bytes: *rx_b,
                transmit_packets: *rx_p,
            })
        })
        .collect()
}

/// What the guest says of its memory, asked with a short deadline; `None` if it does not
/// answer in time.
fn guest_memory(sb: &Sandbox) -> Option<GuestMemory> {
    sb.agent
        .client()
        .get_guest_stats(
            ttrpc::context::with_duration(GUEST_STATS_TIMEOUT),
            &pb::GuestStatsRequest::default(),
        )
        .ok()
        .map(|s| GuestMemory {
            total_bytes: s.mem_total_kib.saturating_mul(1024),
            free_bytes: s.mem_free_kib.saturating_mul(1024),
            available_bytes: s.mem_available_kib.saturating_mul(1024),
        })
}

/// The snapshot of this shim's sandbox now, with `guest` as last asked.
pub fn snapshot(sb: &Sandbox, containers: Containers, guest: Option<GuestMemory>) -> Snapshot {
    let (netns, taps) = sb.interfaces();
    Snapshot {
        version: SNAPSHOT_VERSION,
        sandbox: sb.id.clone(),
        shim_version: env!("CARGO_PKG_VERSION").into(),
        shim_pid: std::process::id(),
        vm_pid: sb.vm_pid,
        pool_keeper_pid: sb.keeper_pid,
        backend: sb.backend.clone(),
        agent_version: sb.agent.agent_version.clone(),
        boot: BOOT.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        containers,
        oom_events: OOM_EVENTS.load(Ordering::Relaxed),
        guest,
        rpc: RPC
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect(),
        interfaces: netns.map(|ns| interfaces(&ns, &taps)).unwrap_or_default(),
    }
}

/// Serves snapshots on the sandbox's metrics socket, one client at a time, for as long as the
/// sandbox lives; `containers` counts its containers at each scrape. A failure to listen is
/// logged and leaves the sandbox without metrics, nothing more.
pub fn serve<F>(sb: &Arc<Sandbox>, containers: F)
where
    F: Fn() -> Containers + Send + 'static,
{
    let path: PathBuf = sb.dir.metrics_socket();
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            log::warn!("sandbox {}: no metrics ({}: {e})", sb.id, path.display());
            return;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    // The guest's memory, refreshed on a thread of its own: requests coalesce (one pending at
    // most), and the thread ends with the sandbox or with the server.
    let guest: Arc<Mutex<Option<GuestMemory>>> = Arc::default();
    let (refresh, requests) = mpsc::sync_channel::<()>(1);
    let (weak, latest) = (Arc::downgrade(sb), guest.clone());
    let asker = std::thread::Builder::new()
        .name("metrics-guest".into())
        .spawn(move || {
            for () in requests {
                let Some(sb) = weak.upgrade() else {
                    return;
                };
                if sb.is_destroyed() {
                    return;
                }
                let g = guest_memory(&sb);
                drop(sb);
                *latest.lock().unwrap_or_else(|e| e.into_inner()) = g;
            }
        });
    if let Err(e) = asker {
        log::warn!(
            "sandbox {}: no guest memory in the metrics (thread: {e})",
            sb.id
        );
    }
    let _ = refresh.try_send(());
    let weak = Arc::downgrade(sb);
    let spawned = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Some(sb) = weak.upgrade() else {
                    return;
                };
                if sb.is_destroyed() {
                    return;
                }
                let Ok(mut conn) = conn else {
                    continue;
                };
                let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                let g = guest.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let snap = snapshot(&sb, containers(), g);
                drop(sb);
                if let Ok(json) = serde_json::to_vec(&snap) {
                    let _ = conn.write_all(&json);
                }
                let _ = refresh.try_send(());
            }
        });
    if let Err(e) = spawned {
        log::warn!("sandbox {}: no metrics (thread: {e})", sb.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_puts_each_call_in_its_bucket() {
        let mut h = Histogram::default();
        h.observe(0.0003, false);
        h.observe(0.0005, false);
        h.observe(0.02, true);
        h.observe(99.0, false);
        assert_eq!(h.buckets[0], 2, "{h:?}");
        assert_eq!(h.buckets[5], 1, "{h:?}");
        assert_eq!(h.over, 1);
        assert_eq!(h.count, 4);
        assert_eq!(h.errors, 1);
        assert!((h.sum_seconds - 99.0208).abs() < 1e-9);
    }

    #[test]
    fn net_dev_counters_by_interface() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
 lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n\
tap0_husk:    1500      10    0    0    0     0          0         0     9000      20    0    0    0     0       0          0\n";
        let dev = parse_net_dev(text);
        assert_eq!(dev["tap0_husk"], [1500, 10, 9000, 20]);
        assert_eq!(dev["lo"], [0, 0, 0, 0]);
    }

    #[test]
    fn a_snapshot_survives_the_json_round_trip() {
        let mut rpc = BTreeMap::new();
        let mut h = Histogram::default();
        h.observe(0.001, false);
        rpc.insert("Check".to_string(), h);
        let s = Snapshot {
            version: SNAPSHOT_VERSION,
            sandbox: "sb".into(),
            boot: Some(Boot {
                started_at: 1.5,
                sandbox_start_seconds: 1.2,
                vm_boot_seconds: 1.0,
                guest_boot_seconds: 0.8,
            }),
            guest: Some(GuestMemory {
                total_bytes: 1,
                free_bytes: 2,
                available_bytes: 3,
            }),
            rpc,
            ..Snapshot::default()
        };
        let back: Snapshot = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
