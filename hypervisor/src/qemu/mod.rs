//! The `qemu` backend: QEMU's `microvm` machine, KVM or TCG, with the vhost-user devices the
//! agent needs (virtio-fs through virtiofsd, vsock through vhost-device-vsock).
//!
//! A [`QemuVm`] owns QEMU and its helpers. A watcher thread notices a helper that ends while
//! QEMU runs and stops QEMU (SIGTERM, which QEMU handles as a clean shutdown); `wait` then
//! reports [`Error::HelperExited`]. When QEMU ends, for whatever reason, the helpers are ended
//! and reaped and every socket is removed.

pub mod cmdline;
pub mod helpers;
pub mod qmp;

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::console::ConsoleRelay;
use crate::process::{readable, Supervised};
use crate::{Accel, Error, Hypervisor, Programs, Result, Vm, VmConfig};
use cmdline::Paths;
use qmp::Qmp;

/// The program this backend runs.
pub(crate) const QEMU_PROGRAM: &str = "qemu-system-x86_64";

/// How long QEMU may take to open its monitor socket after starting.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest path a unix socket address can hold (`sun_path`, with its NUL).
const SUN_PATH_MAX: usize = 107;

/// Once QEMU has ended, how long the console relay gets to write the rest of its output.
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);

/// The `qemu` backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub program: PathBuf,
    pub accel: Accel,
    /// virtiofsd to run; `None`: found at each start.
    pub virtiofsd: Option<PathBuf>,
    /// vhost-device-vsock to run; `None`: found at each start.
    pub vhost_vsock: Option<PathBuf>,
    /// TCG's translation buffer, MiB (see [`cmdline::DEFAULT_TCG_BUFFER_MIB`]); unused with KVM.
    pub tcg_buffer_mib: u32,
    /// The host's invariant TSC rate, told to a TCG guest (see [`cmdline::Acceleration`]):
    /// the caller's, from [`crate::host::detect`]; `None` leaves the guest to measure it.
    pub guest_tsc_khz: Option<u32>,
}

impl Qemu {
    /// The backend with `qemu-system-x86_64` from `PATH`, and the helpers found as usual.
    pub fn new(accel: Accel) -> Result<Self> {
        Self::with_programs(accel, &Programs::default())
    }

    /// The backend with the QEMU, virtiofsd and vhost-device-vsock that `programs` names;
    /// the others are found as usual.
    pub fn with_programs(accel: Accel, programs: &Programs) -> Result<Self> {
        let program = match &programs.qemu {
            Some(p) => p.clone(),
            None => crate::lookup::on_path(QEMU_PROGRAM).ok_or_else(|| Error::MissingProgram {
                program: QEMU_PROGRAM.into(),
                fix: "install Debian's qemu-system-x86 (cargo xtask setup does)".into(),
            })?,
        };
        Ok(Self {
            program,
            accel,
            virtiofsd: programs.virtiofsd.clone(),
            vhost_vsock: programs.vhost_vsock.clone(),
            tcg_buffer_mib: cmdline::DEFAULT_TCG_BUFFER_MIB,
            guest_tsc_khz: None,
        })
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> String {
        match self.accel {
            Accel::Kvm => "qemu-kvm".into(),
            Accel::Tcg => "qemu-tcg".into(),
        }
    }

    fn start(&self, config: &VmConfig) -> Result<Box<dyn Vm>> {
        config.validate()?;
        let paths = Paths::new(&config.state_dir);
        for sock in paths.sockets() {
            if sock.as_os_str().len() > SUN_PATH_MAX {
                return Err(Error::Config(format!(
                    "{}: longer than a unix socket path may be ({SUN_PATH_MAX} bytes) — use a shorter state directory",
                    sock.display()
                )));
            }
            if sock.exists() {
                return Err(Error::Config(format!(
                    "{}: already exists — another VM uses this state directory, or one was not cleaned up",
                    sock.display()
                )));
            }
        }
        // Helpers first: QEMU connects to their sockets at start. Both are spawned before
        // either is waited for, so their starts overlap.
        let mut helpers = Vec::new();
        let started = (|| -> Result<()> {
            let fs = match &config.shared_dir {
                Some(dir) => {
                    helpers.push(Helper {
                        process: helpers::spawn_virtiofsd(self.virtiofsd.as_deref(), dir, &paths)?,
                        log: paths.virtiofsd_log.clone(),
                    });
                    Some(helpers.len() - 1)
                }
                None => None,
            };
            let vsock = if config.vsock {
                helpers.push(Helper {
                    process: helpers::spawn_vhost_vsock(
                        self.vhost_vsock.as_deref(),
                        &paths,
                        config.jail.as_ref(),
                        &config.state_dir,
                    )?,
                    log: paths.vhost_vsock_log.clone(),
                });
                Some(helpers.len() - 1)
            } else {
                None
            };
            if let Some(i) = fs {
                helpers::wait_for_virtiofsd(&mut helpers[i].process, &paths)?;
                if let Some(j) = &config.jail {
                    // virtiofsd runs as root (it serves files with their owners); the jailed
                    // QEMU must be able to connect to its socket.
                    crate::jail::give_socket(&paths.virtiofsd_sock, j)?;
                }
            }
            if let Some(i) = vsock {
                helpers::wait_for_vhost_vsock(&mut helpers[i].process, &paths)?;
            }
            Ok(())
        })();
        // The guest's console output: QEMU writes it into this pipe (its chardev log), the
        // relay writes it to console.log, capped.
        let console = started.and_then(|()| ConsoleRelay::start(&paths.console_log));
        let (mut console, console_out) = match console {
            Ok(c) => c,
            Err(e) => {
                end_helpers(&mut helpers);
                remove_sockets(&paths);
                return Err(e);
            }
        };
        let spawned = (|| -> Result<Supervised> {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&paths.qemu_log)
                .map_err(Error::io(format!("creating {}", paths.qemu_log.display())))?;
            let log2 = log
                .try_clone()
                .map_err(Error::io(format!("opening {}", paths.qemu_log.display())))?;
            let mut cmd = qemu_command(
                &self.program,
                cmdline::args(
                    config,
                    cmdline::Acceleration {
                        accel: self.accel,
                        tcg_buffer_mib: self.tcg_buffer_mib,
                        tsc_khz: self.guest_tsc_khz,
                    },
                    &paths,
                    console_out.as_raw_fd(),
                ),
            );
            cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
            if let Some(j) = &config.jail {
                // Taps arrive as fds, so QEMU needs no network namespace of the host.
                j.for_process(
                    &self.program,
                    &config.state_dir,
                    &[&config.kernel, &config.initramfs],
                    self.accel == Accel::Kvm,
                )
                .apply(&mut cmd)?;
            }
            let mut fds: Vec<RawFd> = config.nets.iter().map(|n| n.tap.as_raw_fd()).collect();
            fds.push(console_out.as_raw_fd());
            crate::process::inherit_fds(&mut cmd, fds);
            Supervised::spawn(QEMU_PROGRAM, cmd)
        })();
        // QEMU holds the only write end now: the relay sees EOF when QEMU ends.
        drop(console_out);
        let mut process = match spawned {
            Ok(p) => p,
            Err(e) => {
                console.finish(CONSOLE_DRAIN);
                end_helpers(&mut helpers);
                remove_sockets(&paths);
                return Err(e);
            }
        };
        let qmp = match connect_monitor(&mut process, &paths) {
            Ok(q) => q,
            Err(e) => {
                let _ = process.kill();
                console.finish(CONSOLE_DRAIN);
                end_helpers(&mut helpers);
                remove_sockets(&paths);
                return Err(e);
            }
        };
        tracing::debug!(pid = process.pid(), backend = %self.name(), helpers = helpers.len(), "VM started");
        let procs = Arc::new(Mutex::new(Procs {
            qemu: process,
            helpers,
            helper_exit: None,
        }));
        // The watcher's end turns readable when the VM handle drops the other (`finish`).
        let (quit, quit_seen) =
            UnixStream::pair().map_err(Error::io("making the helper watcher's quit socket"))?;
        let watcher = {
            let procs = procs.clone();
            std::thread::Builder::new()
                .name("qemu-helper-watch".into())
                .spawn(move || watch(&procs, &quit_seen))
                .map_err(Error::io("starting the helper watcher thread"))?
        };
        let pid = procs.lock().map(|p| p.qemu.program_pid()).unwrap_or(0);
        Ok(Box::new(QemuVm {
            pid,
            procs,
            quit: Some(quit),
            watcher: Some(watcher),
            qmp: Some(qmp),
            console,
            vsock: config.vsock.then(|| paths.vsock_sock.clone()),
            paths,
            finished: false,
        }))
    }
}

/// The allocator settings QEMU runs with. Measured on an idle pod's QEMU under TCG (5 runs
/// each, anonymous memory outside guest RAM, docs/FIELD-NOTES.md "Where an idle pod's QEMU
/// memory is"): 31.8 MiB as it comes, 31.6 with `MALLOC_ARENA_MAX=1` (its 4 threads share one
/// malloc arena instead of one per thread), 30.9 with `G_SLICE=always-malloc` (GLib's slice
/// allocator keeps per-thread magazines of freed blocks), 30.8 with both. Neither is on a hot
/// path: TCG translates with its own pool allocator.
pub(crate) const QEMU_ENV: [(&str, &str); 2] =
    [("MALLOC_ARENA_MAX", "1"), ("G_SLICE", "always-malloc")];

/// QEMU with its arguments; its environment is [`QEMU_ENV`] and `PATH`
/// ([`crate::process::vm_command`]), nothing of the caller's.
fn qemu_command(program: &Path, args: Vec<std::ffi::OsString>) -> Command {
    let mut cmd = crate::process::vm_command(program);
    cmd.args(args).envs(QEMU_ENV);
    cmd
}

/// A device helper and where it logs.
#[derive(Debug)]
struct Helper {
    process: Supervised,
    log: PathBuf,
}

/// What the watcher saw end while QEMU ran.
#[derive(Debug, Clone)]
struct HelperExit {
    program: String,
    pid: u32,
    status: ExitStatus,
    log: PathBuf,
}

/// QEMU and its helpers, shared by the VM handle and the watcher thread.
#[derive(Debug)]
struct Procs {
    qemu: Supervised,
    helpers: Vec<Helper>,
    helper_exit: Option<HelperExit>,
}

/// How often the watcher looks at the helpers where the kernel has no pidfds.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);
/// After a helper ends, how long QEMU gets to end by itself before it counts as a crash
/// (virtiofsd ends when QEMU disconnects, slightly before QEMU is reaped).
const HELPER_EXIT_GRACE: Duration = Duration::from_millis(500);

fn lock(procs: &Mutex<Procs>) -> MutexGuard<'_, Procs> {
    // A panic while holding the lock leaves plain process handles behind: still usable.
    procs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Descriptors that turn readable when QEMU or a helper ends (their pidfds, duplicated so
/// that the watcher sleeps on them without holding the lock); `None` where the kernel has no
/// pidfds, and the watcher looks every [`WATCH_INTERVAL`] instead.
fn exit_fds(p: &Procs) -> Option<(OwnedFd, Vec<OwnedFd>)> {
    let dup = |s: &Supervised| s.exit_fd().and_then(|f| f.try_clone_to_owned().ok());
    let qemu = dup(&p.qemu)?;
    let helpers = p
        .helpers
        .iter()
        .map(|h| dup(&h.process))
        .collect::<Option<Vec<_>>>()?;
    Some((qemu, helpers))
}

/// The watcher: sleeps until QEMU or a helper ends or `quit` turns readable (the VM handle
/// closed its end). A helper that ends gives QEMU [`HELPER_EXIT_GRACE`] to end by itself,
/// then QEMU is stopped. An idle pod's watcher does not wake up at all.
fn watch(procs: &Mutex<Procs>, quit: &UnixStream) {
    let fds = exit_fds(&lock(procs));
    let mut first_seen: Option<Instant> = None;
    loop {
        {
            let mut p = lock(procs);
            if !matches!(p.qemu.try_wait(), Ok(None)) {
                return;
            }
            let mut ended = None;
            for h in &mut p.helpers {
                if let Ok(Some(status)) = h.process.try_wait() {
                    ended = Some(HelperExit {
                        program: h.process.name().to_string(),
                        pid: h.process.pid(),
                        status,
                        log: h.log.clone(),
                    });
                    break;
                }
            }
            if let Some(exit) = ended {
                let since = *first_seen.get_or_insert_with(Instant::now);
                if since.elapsed() >= HELPER_EXIT_GRACE {
                    tracing::warn!(program = %exit.program, status = %exit.status, "device helper ended; stopping the VM");
                    p.helper_exit = Some(exit);
                    let _ = p.qemu.signal(nix::sys::signal::Signal::SIGTERM);
                    return;
                }
            }
        }
        let mut wait_on: Vec<&dyn AsFd> = vec![quit];
        let timeout = match (&fds, first_seen) {
            // A helper has ended (its pidfd stays readable): QEMU's end or the grace's.
            (Some((qemu, _)), Some(since)) => {
                wait_on.push(qemu);
                Some(HELPER_EXIT_GRACE.saturating_sub(since.elapsed()))
            }
            (Some((qemu, helpers)), None) => {
                wait_on.push(qemu);
                wait_on.extend(helpers.iter().map(|h| h as &dyn AsFd));
                None
            }
            (None, _) => Some(WATCH_INTERVAL),
        };
        if readable(&wait_on, timeout)[0] {
            return;
        }
    }
}

/// Ends every helper once QEMU is gone: virtiofsd gets a moment to end by itself (it does
/// once its vhost-user peer is gone) and is killed after that; vhost-device-vsock would
/// outlive QEMU and has nothing to flush, so it is killed at once. (A SIGTERM would not do:
/// jailed, it is PID 1 of its own PID namespace, where a signal it has no handler for is
/// ignored — it sat out the whole grace period on every pod's teardown.)
fn end_helpers(helpers: &mut [Helper]) {
    for h in helpers.iter_mut() {
        if h.process.name() == helpers::VIRTIOFSD {
            if let Ok(None) = h.process.wait(Some(Duration::from_secs(2))) {
                let _ = h.process.kill();
            }
        } else {
            let _ = h.process.kill();
        }
    }
}

/// Waits for QEMU's monitor socket and connects; if QEMU exits first, the error carries
/// what it printed.
fn connect_monitor(process: &mut Supervised, paths: &Paths) -> Result<Qmp> {
    let deadline = Instant::now() + MONITOR_TIMEOUT;
    loop {
        if let Some(status) = process.try_wait()? {
            let out = std::fs::read_to_string(&paths.qemu_log).unwrap_or_default();
            return Err(Error::Guest {
                what: format!("QEMU exited at start ({status}): {}", out.trim()),
                console: paths.console_log.clone(),
            });
        }
        if paths.qmp_sock.exists() {
            if let Ok(q) = Qmp::connect(&paths.qmp_sock, Duration::from_secs(10)) {
                return Ok(q);
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Qmp {
                socket: paths.qmp_sock.clone(),
                what: format!("no monitor within {MONITOR_TIMEOUT:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn remove_sockets(paths: &Paths) {
    for s in paths.sockets() {
        let _ = std::fs::remove_file(s);
    }
    // virtiofsd's pid file (its lock is released once virtiofsd is gone, which it is here).
    let mut pid_file = paths.virtiofsd_sock.clone().into_os_string();
    pid_file.push(".pid");
    let _ = std::fs::remove_file(pid_file);
    // Listening sockets for guest-initiated vsock connections: `<vsock_sock>_<port>`.
    if let (Some(dir), Some(name)) = (paths.vsock_sock.parent(), paths.vsock_sock.file_name()) {
        let prefix = format!("{}_", name.to_string_lossy());
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// A VM run by QEMU, with its device helpers.
#[derive(Debug)]
pub(crate) struct QemuVm {
    pid: u32,
    procs: Arc<Mutex<Procs>>,
    /// Dropped to end the watcher.
    quit: Option<UnixStream>,
    watcher: Option<JoinHandle<()>>,
    qmp: Option<Qmp>,
    /// Writes the guest's console output to `console.log`, capped.
    console: ConsoleRelay,
    paths: Paths,
    vsock: Option<PathBuf>,
    finished: bool,
}

impl QemuVm {
    fn qmp(&mut self) -> Result<&mut Qmp> {
        self.qmp.as_mut().ok_or_else(|| Error::Qmp {
            socket: self.paths.qmp_sock.clone(),
            what: "the monitor connection is closed (the VM has ended)".into(),
        })
    }

    /// QEMU has ended: end the helpers, stop the watcher, remove the sockets. Idempotent.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.qmp = None;
        self.quit = None;
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        // QEMU is gone: the rest of its console output is in the pipe.
        self.console.finish(CONSOLE_DRAIN);
        end_helpers(&mut lock(&self.procs).helpers);
        remove_sockets(&self.paths);
    }

    fn helper_exit(&self) -> Option<HelperExit> {
        lock(&self.procs).helper_exit.clone()
    }
}

impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn console_log(&self) -> &Path {
        &self.paths.console_log
    }

    fn vsock_socket(&self) -> Option<&Path> {
        self.vsock.as_deref()
    }

    fn console_write(&mut self, bytes: &[u8]) -> Result<()> {
        // One short connection per write: QEMU sends the guest's output to a connected
        // client too, and a client that stops reading would stall the guest's serial port.
        let sock = &self.paths.console_sock;
        let mut s = UnixStream::connect(sock)
            .map_err(Error::io(format!("connecting to {}", sock.display())))?;
        s.write_all(bytes)
            .map_err(Error::io(format!("writing to {}", sock.display())))?;
        // Give QEMU a moment to take the bytes before the hang-up.
        let _ = s.shutdown(std::net::Shutdown::Write);
        std::thread::sleep(Duration::from_millis(20));
        Ok(())
    }

    fn pause(&mut self) -> Result<()> {
        self.qmp()?.execute("stop").map(drop)
    }

    fn resume(&mut self) -> Result<()> {
        self.qmp()?.execute("cont").map(drop)
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<Option<ExitStatus>> {
        // Not a blocking wait under the lock, which the watcher thread needs in between:
        // asleep on QEMU's pidfd (a copy) outside it, or polled where there is none.
        let deadline = timeout.map(|t| Instant::now() + t);
        let exit = match timeout {
            Some(t) if t.is_zero() => None,
            _ => self.exit_fd(),
        };
        let mut pause = Duration::from_millis(1);
        let status = loop {
            if let Some(s) = lock(&self.procs).qemu.try_wait()? {
                break s;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            match &exit {
                Some(fd) => {
                    readable(&[fd], deadline.map(|d| d - now));
                }
                None => {
                    let left = deadline.map_or(pause, |d| d - now);
                    std::thread::sleep(pause.min(left));
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
        };
        self.finish();
        if let Some(h) = self.helper_exit() {
            return Err(Error::HelperExited {
                program: h.program,
                pid: h.pid,
                status: h.status,
                log: h.log,
            });
        }
        Ok(Some(status))
    }

    /// QEMU's pidfd: the watcher stops QEMU when a helper ends, so QEMU's end covers it.
    fn exit_fd(&self) -> Option<OwnedFd> {
        lock(&self.procs)
            .qemu
            .exit_fd()
            .and_then(|f| f.try_clone_to_owned().ok())
    }

    fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        let running = lock(&self.procs).qemu.try_wait()?.is_none();
        if running {
            // "quit" ends QEMU at once; it may close the connection before answering.
            let asked = self.qmp().and_then(|q| q.execute("quit")).is_ok();
            if !asked {
                lock(&self.procs)
                    .qemu
                    .signal(nix::sys::signal::Signal::SIGTERM)?;
            }
        }
        let status = match self.wait(Some(grace)) {
            Ok(Some(s)) => s,
            Ok(None) => {
                let s = lock(&self.procs).qemu.kill()?;
                self.finish();
                s
            }
            // A helper crashed meanwhile; the VM is stopped, which is what was asked.
            Err(Error::HelperExited { .. }) => {
                lock(&self.procs).qemu.try_wait()?.unwrap_or_else(|| {
                    unreachable!("wait reports a helper exit only after QEMU ended")
                })
            }
            Err(e) => return Err(e),
        };
        Ok(status)
    }

    fn kill(&mut self) -> Result<ExitStatus> {
        let status = lock(&self.procs).qemu.kill()?;
        self.finish();
        Ok(status)
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = lock(&self.procs).qemu.kill();
        self.finish();
        // `Supervised` kills and reaps whatever is left when `procs` goes.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_runs_with_one_malloc_arena_and_no_slice_magazines() {
        let cmd = qemu_command(Path::new("/usr/bin/qemu-system-x86_64"), vec!["-M".into()]);
        let env: Vec<(String, Option<String>)> = cmd
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        for (k, v) in [("MALLOC_ARENA_MAX", "1"), ("G_SLICE", "always-malloc")] {
            assert!(
                env.contains(&(k.to_string(), Some(v.to_string()))),
                "{k}={v} missing from {env:?}"
            );
        }
        assert_eq!(cmd.get_args().collect::<Vec<_>>(), ["-M"]);
    }
}
