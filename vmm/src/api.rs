//! The control API: a unix socket the shim uses to pause, resume and shut down the VM and
//! to read its counters.
//!
//! Protocol: one request per line (`pause`, `resume`, `shutdown`, `counters`, `state`),
//! one JSON object per line in reply, always with `"ok"`; failures add `"error"`.
//! `counters` answers `vm_exits` by kind, each device's counters, and
//! `first_entry_monotonic_ns`: `CLOCK_MONOTONIC` when vCPU 0 first entered the guest (null
//! before), for a launcher to see how long husk-vmm took to start it.
//! docs/ARCHITECTURE.md: this line protocol stands in for ttrpc until the `protocols`
//! crate carries a VMM service, and maps one to one onto it.
//!
//! Clients are served one at a time on the API thread, under the API threads' seccomp
//! filter; the API never touches guest memory, only the run state, the exit channel and
//! the counters. Debug builds also take `debug-forbidden …` ([`crate::debug_hooks`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::devices::bus::Bus;
use crate::exit::{ExitReason, ExitSender};
use crate::seccomp::{Filters, ThreadKind};
use crate::vstate::run_state::RunState;
use crate::vstate::vcpu::ExitCounters;

/// How long `pause` waits for every vCPU to stop.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors while setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process is serving on the path.
    #[error("api socket {0}: in use by another process — stop it or give another --api-sock")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("api socket {0}: a file that is not a socket is in the way — remove it or give another --api-sock")]
    NotASocket(PathBuf),
    /// Binding failed.
    #[error("api socket {path}: {source} — give a writable path with --api-sock")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Binds the API socket. A stale socket (nobody answers on it) is replaced; a live one or
/// any other file is an error.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.to_owned()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(|source| ApiError::Bind {
            path: path.to_owned(),
            source,
        })?;
    }
    UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// What the API acts on.
#[derive(Debug, Clone)]
pub struct ApiContext {
    /// vCPU run state.
    pub run_state: Arc<RunState>,
    /// Where shutdown is requested.
    pub exit_tx: ExitSender,
    /// vCPU exit counters.
    pub exits: Arc<ExitCounters>,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
}

fn bus_counters(bus: &Bus, out: &mut Map<String, Value>) {
    for d in bus.counters() {
        let fields: Map<String, Value> = d
            .counters
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        out.insert(format!("{}@{:#x}", d.name, d.base), Value::Object(fields));
    }
}

impl ApiContext {
    /// The counters object.
    pub fn counters(&self) -> Value {
        let e = &self.exits;
        let mut devices = Map::new();
        bus_counters(&self.pio, &mut devices);
        bus_counters(&self.mmio, &mut devices);
        json!({
            "vm_exits": {
                "pio": e.pio.load(Ordering::Relaxed),
                "mmio": e.mmio.load(Ordering::Relaxed),
                "hlt": e.hlt.load(Ordering::Relaxed),
                "interrupted": e.interrupted.load(Ordering::Relaxed),
                "other": e.other.load(Ordering::Relaxed),
            },
            // CLOCK_MONOTONIC (ns) of vCPU 0's first guest entry; null before it.
            "first_entry_monotonic_ns": Some(e.first_entry_ns.load(Ordering::Relaxed))
                .filter(|ns| *ns != 0),
            "devices": devices,
        })
    }

    /// Answers one request line.
    pub fn handle(&self, request: &str) -> Value {
        let fail = |e: String| json!({"ok": false, "error": e});
        match request.trim() {
            "pause" => match self.run_state.pause(PAUSE_TIMEOUT) {
                Ok(()) => json!({"ok": true}),
                Err(e) => fail(e.to_string()),
            },
            "resume" => match self.run_state.resume() {
                Ok(()) => json!({"ok": true}),
                Err(e) => fail(e.to_string()),
            },
            "shutdown" => match self.exit_tx.send(ExitReason::HostShutdown) {
                Ok(()) => json!({"ok": true}),
                Err(_) => fail("the VM is already stopping".into()),
            },
            "counters" => json!({"ok": true, "counters": self.counters()}),
            "state" => {
                let state = if self.run_state.stopping() {
                    "stopping"
                } else if self.run_state.pause_requested() {
                    "paused"
                } else {
                    "running"
                };
                json!({"ok": true, "state": state})
            }
            #[cfg(debug_assertions)]
            other if other.starts_with("debug-forbidden") => self.debug_forbidden(other),
            other => fail(format!(
                "unknown request {other:?}: use pause, resume, shutdown, counters or state"
            )),
        }
    }

    /// `debug-forbidden <kind> <call>`: see [`crate::debug_hooks`].
    #[cfg(debug_assertions)]
    fn debug_forbidden(&self, request: &str) -> Value {
        use crate::debug_hooks;
        let args = request.trim_start_matches("debug-forbidden");
        match debug_hooks::parse(args) {
            Ok((ThreadKind::Api, call)) => {
                json!({"ok": true, "result": debug_hooks::attempt(&call)})
            }
            Ok((kind, call)) => {
                debug_hooks::request(kind, call);
                if kind == ThreadKind::Vcpu {
                    self.run_state.kick_all();
                }
                json!({"ok": true, "queued": kind.name()})
            }
            Err(e) => json!({"ok": false, "error": e}),
        }
    }

    fn serve_client(&self, stream: UnixStream) -> std::io::Result<()> {
        let mut writer = stream.try_clone()?;
        for line in BufReader::new(stream).lines() {
            let reply = self.handle(&line?);
            writeln!(writer, "{reply}")?;
        }
        Ok(())
    }

    /// Serves `listener` on a thread of its own for the life of the process, under the
    /// API threads' filter from `filters`.
    pub fn serve(self, listener: UnixListener, filters: &Filters) -> std::io::Result<()> {
        let filters = filters.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                filters.install_or_exit(ThreadKind::Api, "api");
                for stream in listener.incoming().flatten() {
                    // A client that goes away mid-request only ends its own connection.
                    let _ = self.serve_client(stream);
                }
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn ctx() -> (ApiContext, mpsc::Receiver<ExitReason>) {
        let (tx, rx) = mpsc::channel();
        let c = ApiContext {
            run_state: Arc::new(RunState::default()),
            exit_tx: tx,
            exits: Arc::new(ExitCounters::default()),
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
        };
        (c, rx)
    }

    #[test]
    fn shutdown_sends_host_shutdown() {
        let (c, rx) = ctx();
        assert_eq!(c.handle("shutdown\n"), json!({"ok": true}));
        assert_eq!(rx.try_recv(), Ok(ExitReason::HostShutdown));
    }

    #[test]
    fn unknown_requests_list_the_valid_ones() {
        let (c, _rx) = ctx();
        let r = c.handle("reboot");
        assert_eq!(r["ok"], json!(false));
        assert!(r["error"]
            .as_str()
            .unwrap()
            .contains("pause, resume, shutdown, counters or state"));
    }

    #[test]
    fn pause_without_vcpus_succeeds_and_state_follows() {
        let (c, _rx) = ctx();
        assert_eq!(c.handle("state")["state"], json!("running"));
        assert_eq!(c.handle("pause"), json!({"ok": true}));
        assert_eq!(c.handle("state")["state"], json!("paused"));
        assert_eq!(c.handle("resume"), json!({"ok": true}));
        assert_eq!(c.handle("state")["state"], json!("running"));
    }

    #[test]
    fn counters_cover_exits_and_devices() {
        let (c, _rx) = ctx();
        c.exits.pio.store(7, Ordering::Relaxed);
        let r = c.handle("counters");
        assert_eq!(r["counters"]["vm_exits"]["pio"], json!(7));
        assert!(r["counters"]["devices"].is_object());
    }

    #[test]
    fn the_first_guest_entry_is_null_until_it_happens() {
        let (c, _rx) = ctx();
        let r = c.handle("counters");
        assert_eq!(r["counters"]["first_entry_monotonic_ns"], Value::Null);
        let now = crate::vstate::vcpu::monotonic_ns();
        c.exits.first_entry_ns.store(now, Ordering::Relaxed);
        let r = c.handle("counters");
        assert_eq!(r["counters"]["first_entry_monotonic_ns"], json!(now));
    }

    #[test]
    fn bind_refuses_live_sockets_and_other_files_and_replaces_stale_ones() {
        let dir = std::env::temp_dir().join(format!("husk-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("api.sock");
        let live = bind(&p).unwrap();
        assert!(matches!(bind(&p), Err(ApiError::InUse(_))));
        drop(live); // the socket file stays behind, stale
        let again = bind(&p).unwrap();
        drop(again);
        let f = dir.join("file");
        std::fs::write(&f, b"x").unwrap();
        let e = bind(&f).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
