//! The pool holder: keeps `[pool] size` VMs of the default shape booted (each under its own
//! keeper), and answers `claim` and `status` on `pool.sock`.
//!
//! State machine of a slot: `Booting` (its keeper started, no ready line yet) → `Ready` →
//! taken out of the list by one claim, under the state's lock, before anything else is done
//! with it, so no two claimers ever see the same VM and a claimed VM never comes back. A
//! keeper that ends while its slot is listed (its VM died, its boot failed) drops the slot.
//! The filler keeps `booting + ready` at `size`, never above; after a failed boot it waits
//! [`RETRY_AFTER`] before the next, so a broken configuration does not spin the CPU.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::wire::{self, Claimed, KeeperEvent, KeeperReply, KeeperRequest, Reply, Request};
use super::{PoolError, PoolPaths, Shape};
use crate::config::Config;
use crate::sandbox_dir::SandboxDir;

/// How long after a failed boot the next one starts.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// How long a client may take to send its request, and a keeper to answer a handover.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum SlotState {
    Booting,
    Ready {
        vm_pid: u32,
        backend: String,
        console: PathBuf,
        vsock: Option<PathBuf>,
        guest_boot_ms: u64,
        nics: Vec<crate::network::PooledNic>,
    },
}

#[derive(Debug)]
struct Slot {
    vmid: String,
    keeper_pid: u32,
    since: Instant,
    state: SlotState,
    /// The keeper's control connection (given away on claim).
    conn: UnixStream,
}

#[derive(Debug, Default)]
struct State {
    slots: VecDeque<Slot>,
    next: u64,
    booted: u64,
    claimed: u64,
    died: u64,
    failed: u64,
    last_failure: Option<Instant>,
    last_error: Option<String>,
}

#[derive(Debug)]
struct Holder {
    config: Config,
    paths: PoolPaths,
    shape: Shape,
    size: usize,
    state: Mutex<State>,
    changed: Condvar,
}

impl Holder {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs the holder until it is killed. Refuses to start beside a live one.
pub fn run(config: Config) -> Result<(), PoolError> {
    super::init_log(&config, format!("holder[{}]", std::process::id()));
    let size = usize::try_from(config.pool.size).unwrap_or(0);
    if size == 0 {
        return Err(PoolError::Config(format!(
            "{}: [pool] size is 0 — set it to the number of VMs to keep booted",
            config.source_name()
        )));
    }
    let shape = Shape::default_of(&config).map_err(|e| {
        PoolError::Config(format!(
            "{}: no VM can be pooled: {e}",
            config.source_name()
        ))
    })?;
    let paths = PoolPaths::new(&config.state_root);
    // SIGTERM and SIGINT end the holder through `leave` (a thread of their own), not by
    // default: blocked here, before any thread starts, so every thread inherits the mask.
    let mut ending = nix::sys::signal::SigSet::empty();
    ending.add(nix::sys::signal::Signal::SIGTERM);
    ending.add(nix::sys::signal::Signal::SIGINT);
    ending
        .thread_block()
        .map_err(|e| PoolError::Config(format!("blocking SIGTERM: {e}")))?;
    let lock = paths.lock_holder()?;
    sweep(&paths, &config);
    match std::fs::remove_file(&paths.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(super::io("removing the old", &paths.socket)(e)),
    }
    let listener =
        UnixListener::bind(&paths.socket).map_err(super::io("binding", &paths.socket))?;
    std::fs::set_permissions(&paths.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(super::io("making root-only", &paths.socket))?;
    log::info!(
        "holding {size} VM(s) of {} vCPU, {} MiB on {} ({}), socket {}",
        shape.vcpus,
        shape.memory_mib,
        shape.backend,
        config.source_name(),
        paths.socket.display()
    );
    let holder = Arc::new(Holder {
        config,
        paths,
        shape,
        size,
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
    });
    let signalled = holder.paths.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = ending.wait();
            leave(&signalled, &format!("{sig:?}"));
        })
        .map_err(super::io(
            "starting the signal thread of",
            &holder.paths.dir,
        ))?;
    let watched = holder.clone();
    let path = holder.config.source.clone();
    std::thread::Builder::new()
        .name("watch".into())
        .spawn(move || watch_config(&watched, path.as_deref()))
        .map_err(super::io("starting the watch thread of", &holder.paths.dir))?;
    let filler = holder.clone();
    std::thread::Builder::new()
        .name("fill".into())
        .spawn(move || fill(&filler))
        .map_err(super::io(
            "starting the filler thread of",
            &holder.paths.dir,
        ))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let h = holder.clone();
        let _ = std::thread::Builder::new()
            .name("client".into())
            .spawn(move || serve(&h, conn));
    }
    drop(lock);
    Ok(())
}

/// Ends the holder: its unclaimed VMs die with it (each keeper holds a pidfd of it), and what
/// it keeps under `.pool/` goes first ([`PoolPaths::remove`]).
fn leave(paths: &PoolPaths, why: &str) -> ! {
    log::info!("exiting ({why}); the unclaimed VMs end with this holder");
    paths.remove();
    std::process::exit(0);
}

/// How often the holder looks at its configuration file.
const CONFIG_POLL: Duration = Duration::from_secs(5);

/// What of a configuration the holder acts on: its shape and size.
fn pool_of(config: &Config) -> Result<(Shape, usize), String> {
    Ok((
        Shape::default_of(config)?,
        usize::try_from(config.pool.size).unwrap_or(0),
    ))
}

/// Ends the holder when its program file was replaced (an upgrade: a shim of the new version
/// then starts a new holder), or when its configuration file now asks for another pool (shape or size):
/// its VMs die with it (their keepers see it gone), and the next shim that wants a VM starts
/// a holder of the new configuration (a DaemonSet restarts it). A file that cannot be read
/// or parsed meanwhile changes nothing: the holder keeps what it has and says why.
fn watch_config(h: &Holder, path: Option<&std::path::Path>) {
    let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = path.and_then(mtime);
    loop {
        std::thread::sleep(CONFIG_POLL);
        rotate_log(&h.paths);
        if super::program_replaced() {
            log::warn!(
                "this program was replaced (an upgrade) — exiting, so that a holder of the new version takes over (the VMs held now die with this one)"
            );
            leave(&h.paths, "upgrade");
        }
        let Some(path) = path else { continue };
        let now = mtime(path);
        if now == seen {
            continue;
        }
        seen = now;
        match Config::load(Some(path))
            .map_err(|e| e.to_string())
            .and_then(|c| pool_of(&c))
        {
            Ok((shape, size)) if shape == h.shape && size == h.size => {}
            Ok((shape, size)) => {
                log::warn!(
                    "{} changed: the pool is now {size} VM(s) of {} vCPU, {} MiB on {} — exiting, so that a holder of the new configuration takes over (the VMs held now die with this one)",
                    path.display(),
                    shape.vcpus,
                    shape.memory_mib,
                    shape.backend
                );
                leave(&h.paths, "configuration changed");
            }
            Err(e) => log::error!(
                "{} changed but cannot be used ({e}); the pool keeps its configuration",
                path.display()
            ),
        }
    }
}

/// The most `pool.log` holds before it is rotated (it lives in /run, i.e. in memory).
const LOG_CAP: u64 = 4 << 20;

/// When the holder's stderr is `pool.log` (a holder a shim started) and the file has grown
/// past [`LOG_CAP`]: renames it to `pool.log.1` (replacing the previous one) and continues in
/// a new `pool.log`, so the log never holds more than twice the cap. Keepers started before
/// write on into `pool.log.1`.
fn rotate_log(paths: &PoolPaths) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let Ok(ours) = nix::sys::stat::fstat(libc::STDERR_FILENO) else {
        return;
    };
    let Ok(file) = std::fs::metadata(&paths.log) else {
        return;
    };
    if (file.dev(), file.ino()) != (ours.st_dev, ours.st_ino) || file.len() <= LOG_CAP {
        return;
    }
    let old = paths.log.with_extension("log.1");
    let fresh = std::fs::rename(&paths.log, &old).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log)
    });
    match fresh {
        Ok(f) => {
            // SAFETY: dup2 onto this process's own stderr; `f` stays open across the call and
            // no Rust object owns fd 2 (std's stderr writes through the fd number).
            let r = unsafe { libc::dup2(f.as_raw_fd(), libc::STDERR_FILENO) };
            if r >= 0 {
                log::info!(
                    "pool.log rotated: the previous lines are in {}",
                    old.display()
                );
            }
        }
        Err(e) => log::error!("rotating {}: {e}", paths.log.display()),
    }
}

/// Removes what dead keepers left under `.pool/` (a VM directory whose lock nobody holds).
fn sweep(paths: &PoolPaths, config: &Config) {
    let Ok(entries) = std::fs::read_dir(&paths.dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(f) = std::fs::File::open(e.path()) else {
            continue;
        };
        // Held until the directory is gone: a keeper starting meanwhile cannot take it.
        let Ok(_held) = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            continue;
        };
        let vmid = e.file_name().to_string_lossy().into_owned();
        match SandboxDir::new(&paths.dir, &vmid).map(|d| d.destroy()) {
            Ok(Ok(())) => log::info!("removed {} (its keeper is gone)", e.path().display()),
            Ok(Err(err)) => log::error!("removing {}: {err}", e.path().display()),
            Err(err) => log::error!("removing {}: {err}", e.path().display()),
        }
        husk_hypervisor::jail::JailIds::new(&config.state_root).release(&super::jail_owner(&vmid));
    }
}

/// Keeps `booting + ready` at `size`.
fn fill(h: &Arc<Holder>) {
    let mut st = h.lock();
    loop {
        let backoff = st
            .last_failure
            .map(|t| RETRY_AFTER.saturating_sub(t.elapsed()))
            .filter(|d| !d.is_zero());
        if st.slots.len() >= h.size || backoff.is_some() {
            let wait = backoff.unwrap_or(Duration::from_secs(60));
            st = h
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        st.next += 1;
        let vmid = format!("vm-{}-{}", std::process::id(), st.next);
        match spawn_keeper(h, &vmid) {
            Ok((child, conn)) => {
                log::info!("booting {vmid} (keeper {})", child.id());
                st.slots.push_back(Slot {
                    vmid: vmid.clone(),
                    keeper_pid: child.id(),
                    since: Instant::now(),
                    state: SlotState::Booting,
                    conn,
                });
                let h2 = h.clone();
                let _ = std::thread::Builder::new()
                    .name(format!("keeper-{vmid}"))
                    .spawn(move || watch(&h2, vmid, child));
            }
            Err(e) => {
                log::error!("starting a keeper: {e}");
                st.failed += 1;
                st.last_failure = Some(Instant::now());
                st.last_error = Some(e.to_string());
            }
        }
    }
}

fn spawn_keeper(h: &Holder, vmid: &str) -> Result<(std::process::Child, UnixStream), PoolError> {
    // The holder's own program file, even once an upgrade replaced it: a keeper speaks its
    // holder's version of the protocol (the holder itself exits soon after an upgrade).
    let exe = PathBuf::from("/proc/self/exe");
    let (ours, theirs) =
        UnixStream::pair().map_err(super::io("creating a socketpair in", &h.paths.dir))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("pool-keeper")
        .args(["--vmid", vmid, "--holder", &std::process::id().to_string()]);
    if let Some(p) = &h.config.source {
        cmd.arg("--config").arg(p);
    }
    cmd.stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .current_dir("/");
    // Boots in the background (super::priority): everything it starts inherits this.
    // SAFETY: pre_exec runs one async-signal-safe syscall.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            super::priority::set_own_nice(super::priority::BOOT_NICE)
        });
    }
    let child = cmd.spawn().map_err(super::io("starting", &exe))?;
    Ok((child, ours))
}

/// Waits for a keeper's ready line, then for its end.
fn watch(h: &Arc<Holder>, vmid: String, mut child: std::process::Child) {
    let conn = h
        .lock()
        .slots
        .iter()
        .find(|s| s.vmid == vmid)
        .and_then(|s| s.conn.try_clone().ok());
    let event = conn.and_then(|mut c| {
        let timeout = Duration::from_secs(h.config.agent_timeout_secs.saturating_add(30));
        let _ = c.set_read_timeout(Some(timeout));
        let e = wire::read_msg::<KeeperEvent>(&mut c);
        let _ = c.set_read_timeout(None);
        e.ok().flatten()
    });
    {
        let mut st = h.lock();
        match event {
            Some(KeeperEvent::Ready {
                vm_pid,
                backend,
                console,
                vsock,
                guest_boot_ms,
                nics,
            }) => {
                if let Some(s) = st.slots.iter_mut().find(|s| s.vmid == vmid) {
                    log::info!("{vmid} ready: VM {vm_pid}, {} ms since its keeper started (guest {guest_boot_ms} ms)", s.since.elapsed().as_millis());
                    // Booted: a pod may claim it any moment, and must not share the lowest
                    // priority with the next VM's boot.
                    let failed = super::priority::renice_tree(s.keeper_pid, 0);
                    if failed > 0 {
                        log::warn!("{vmid}: {failed} of its threads kept the boot's low CPU priority (setpriority failed)");
                    }
                    s.state = SlotState::Ready {
                        vm_pid,
                        backend,
                        console,
                        vsock,
                        guest_boot_ms,
                        nics,
                    };
                    s.since = Instant::now();
                }
                st.booted += 1;
                st.last_failure = None;
            }
            Some(KeeperEvent::Failed { error }) => {
                log::error!("{vmid} failed to boot: {error}");
                st.failed += 1;
                st.last_failure = Some(Instant::now());
                st.last_error = Some(error);
                st.slots.retain(|s| s.vmid != vmid);
            }
            None => {
                log::error!("{vmid}: its keeper said nothing before ending or timing out");
                st.failed += 1;
                st.last_failure = Some(Instant::now());
                st.slots.retain(|s| s.vmid != vmid);
                let _ = child.kill();
            }
        }
        h.changed.notify_all();
    }
    let status = child.wait();
    let mut st = h.lock();
    if let Some(i) = st.slots.iter().position(|s| s.vmid == vmid) {
        st.slots.remove(i);
        st.died += 1;
        log::warn!("{vmid}: its keeper ended while pooled ({status:?}); booting another");
        h.changed.notify_all();
    } else {
        log::info!("{vmid}: keeper ended ({status:?})");
    }
}

fn serve(h: &Holder, mut conn: UnixStream) {
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let req = match wire::read_msg::<Request>(&mut conn) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            let _ = wire::write_msg(&mut conn, &Reply::error(format!("bad request: {e}")));
            return;
        }
    };
    match req {
        Request::Status {} => {
            let _ = wire::write_msg(
                &mut conn,
                &Reply {
                    ok: true,
                    error: None,
                    claimed: None,
                    status: Some(status(h)),
                },
            );
        }
        Request::Claim { sid, shape } => {
            let pid = getsockopt(&conn, PeerCredentials).map(|c| c.pid());
            let pid = match pid.map(u32::try_from) {
                Ok(Ok(p)) if p > 0 => p,
                _ => {
                    let _ = wire::write_msg(
                        &mut conn,
                        &Reply::error("the claimer's pid is unknown (SO_PEERCRED)"),
                    );
                    return;
                }
            };
            match claim(h, &sid, &shape, pid) {
                Ok((claimed, keeper)) => {
                    let reply = Reply {
                        ok: true,
                        error: None,
                        claimed: Some(claimed.clone()),
                        status: None,
                    };
                    match wire::send_msg_with_fd(&conn, &reply, keeper.as_raw_fd()) {
                        Ok(()) => {
                            log::info!("{} claimed by sandbox {sid} (shim {pid})", claimed.vmid)
                        }
                        // The keeper's owner is the claimer now: when it is gone, so is the VM.
                        Err(e) => log::error!(
                            "{}: answering the claim of sandbox {sid}: {e}",
                            claimed.vmid
                        ),
                    }
                }
                Err(e) => {
                    log::info!("sandbox {sid} (shim {pid}): {e}");
                    let _ = wire::write_msg(&mut conn, &Reply::error(e));
                }
            }
        }
    }
}

/// Takes a ready VM of `shape` out of the pool for sandbox `sid` of process `pid`.
fn claim(h: &Holder, sid: &str, shape: &Shape, pid: u32) -> Result<(Claimed, UnixStream), String> {
    if sid.starts_with('.') {
        return Err(format!("sandbox id {sid:?}: not a sandbox id"));
    }
    let target = SandboxDir::new(&h.config.state_root, sid).map_err(|e| e.to_string())?;
    if !h.shape.fits(shape) {
        return Err(format!(
            "no pooled VM of this shape (the pool holds {} vCPU, {} MiB, {} NIC(s) on {}; asked {} vCPU, {} MiB, {} NIC(s) on {})",
            h.shape.vcpus, h.shape.memory_mib, h.shape.nics, h.shape.backend, shape.vcpus, shape.memory_mib, shape.nics, shape.backend
        ));
    }
    let mut slot = {
        let mut st = h.lock();
        let Some(i) = st
            .slots
            .iter()
            .position(|s| matches!(s.state, SlotState::Ready { .. }))
        else {
            return Err(format!("no pooled VM ready ({} booting)", st.slots.len()));
        };
        let slot = st.slots.remove(i).expect("a listed slot");
        st.claimed += 1;
        h.changed.notify_all();
        slot
    };
    // From here on the slot is ours alone; on any failure dropping `slot.conn` ends its
    // keeper (which kills the VM and removes its directory).
    let SlotState::Ready {
        vm_pid,
        backend,
        console,
        vsock,
        guest_boot_ms,
        nics,
    } = slot.state
    else {
        unreachable!("only ready slots are taken")
    };
    if target.root().exists() {
        return Err(format!("{} exists already", target.root().display()));
    }
    let _ = slot.conn.set_read_timeout(Some(IO_TIMEOUT));
    wire::write_msg(
        &mut slot.conn,
        &KeeperRequest::Handover {
            pid,
            dir: target.root().to_path_buf(),
        },
    )
    .map_err(|e| format!("{}: handing over: {e}", slot.vmid))?;
    match wire::read_msg::<KeeperReply>(&mut slot.conn) {
        Ok(Some(KeeperReply { ok: true, .. })) => {}
        other => {
            return Err(format!(
                "{}: its keeper refused the handover: {other:?}",
                slot.vmid
            ))
        }
    }
    let _ = slot.conn.set_read_timeout(None);
    let from = h.paths.vm_dir(&slot.vmid);
    nix::fcntl::renameat2(
        None,
        &from,
        None,
        target.root(),
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|e| {
        format!(
            "renaming {} to {}: {e}",
            from.display(),
            target.root().display()
        )
    })?;
    husk_hypervisor::jail::JailIds::new(&h.config.state_root)
        .rename(&super::jail_owner(&slot.vmid), sid)
        .map_err(|e| format!("{}: moving its jail id to sandbox {sid}: {e}", slot.vmid))?;
    Ok((
        Claimed {
            vmid: slot.vmid,
            vm_pid,
            keeper_pid: slot.keeper_pid,
            backend,
            console,
            vsock,
            guest_boot_ms,
            nics,
        },
        slot.conn,
    ))
}

fn status(h: &Holder) -> serde_json::Value {
    let st = h.lock();
    let slots: Vec<serde_json::Value> = st
        .slots
        .iter()
        .map(|s| {
            let (state, vm_pid) = match &s.state {
                SlotState::Booting => ("booting", None),
                SlotState::Ready { vm_pid, .. } => ("ready", Some(*vm_pid)),
            };
            serde_json::json!({
                "vmid": s.vmid,
                "state": state,
                "keeper_pid": s.keeper_pid,
                "vm_pid": vm_pid,
                // The keeper's CPU priority: 19 while booting, 0 once ready.
                "nice": super::priority::nice_of(s.keeper_pid),
                "for_ms": u64::try_from(s.since.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
        })
        .collect();
    serde_json::json!({
        "holder_pid": std::process::id(),
        "size": h.size,
        "shape": h.shape,
        "ready": st.slots.iter().filter(|s| matches!(s.state, SlotState::Ready { .. })).count(),
        "booting": st.slots.iter().filter(|s| matches!(s.state, SlotState::Booting)).count(),
        "vms": slots,
        "booted": st.booted,
        "claimed": st.claimed,
        "died": st.died,
        "failed": st.failed,
        "last_error": st.last_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(state_root: &std::path::Path) -> Holder {
        let config = Config {
            state_root: state_root.to_path_buf(),
            pool: crate::config::PoolConfig { size: 2 },
            ..crate::pool::tests::tcg_config()
        };
        Holder {
            shape: Shape::default_of(&config).unwrap(),
            paths: PoolPaths::new(state_root),
            size: 2,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            config,
        }
    }

    #[test]
    fn a_claim_is_refused_with_the_reason_and_changes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let h = holder(t.path());
        let e = claim(&h, "sb", &h.shape, 1).unwrap_err();
        assert!(e.contains("no pooled VM ready"), "{e}");
        let other = Shape {
            memory_mib: 512,
            ..h.shape.clone()
        };
        let e = claim(&h, "sb", &other, 1).unwrap_err();
        assert!(
            e.contains("no pooled VM of this shape")
                && e.contains("256 MiB")
                && e.contains("512 MiB"),
            "{e}"
        );
        for bad in [".pool", "..", "a/b", ""] {
            assert!(claim(&h, bad, &h.shape, 1).is_err(), "{bad:?} accepted");
        }
        assert_eq!(h.lock().claimed, 0);
        assert!(!t.path().join("sb").exists());
    }

    #[test]
    fn the_status_names_the_shape_and_the_counts() {
        let t = tempfile::tempdir().unwrap();
        let h = holder(t.path());
        let s = status(&h);
        assert_eq!(s["size"], 2);
        assert_eq!(s["ready"], 0);
        assert_eq!(s["shape"]["memory_mib"], 256);
        assert_eq!(s["shape"]["backend"], "qemu-tcg");
    }
}
