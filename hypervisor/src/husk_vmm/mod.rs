//! The `husk-vmm` backend: husk's own VMM (`vmm/`), with virtiofsd for the shared directory.
//!
//! husk-vmm serves the hybrid-vsock socket itself, so virtiofsd is the only helper. A
//! [`HuskVmmVm`] owns both processes: pause, resume and shutdown go through husk-vmm's
//! control API socket; every path that ends the VM (the guest powers off, `stop`, `kill`,
//! drop, a crashed virtiofsd) ends and reaps both and removes their sockets.
//!
//! Where it runs: husk-vmm boots any guest under KVM, but our stock Linux guest only runs at
//! speed with hardware virtualisation ([`crate::host`] makes it the default only there);
//! under kvm_pvm it runs the synthetic test guests.

pub mod api;
pub mod args;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;

use crate::console::ConsoleRelay;
use crate::helpers;
use crate::process::Supervised;
use crate::{Error, Hypervisor, Programs, Result, Vm, VmConfig};
use args::Paths;

/// The program this backend runs.
pub(crate) const PROGRAM: &str = "husk-vmm";

/// How long husk-vmm may take to build the VM and answer on its API socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// After virtiofsd ends, how long husk-vmm gets to end by itself before it counts as a crash
/// (virtiofsd ends when its frontend disconnects, slightly before husk-vmm is reaped).
const HELPER_EXIT_GRACE: Duration = Duration::from_millis(500);

/// Longest path a unix socket address can hold (`sun_path`, with its NUL).
const SUN_PATH_MAX: usize = 107;

/// Once husk-vmm has ended, how long the console relay gets to write the rest of its output.
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);

/// The `husk-vmm` backend.
#[derive(Debug, Clone)]
pub struct HuskVmm {
    pub program: PathBuf,
    /// virtiofsd to run; `None`: found at each start.
    pub virtiofsd: Option<PathBuf>,
}

impl HuskVmm {
    /// The backend with the `husk-vmm` found next to the calling program (its own directory,
    /// or the one above when it is a test in `target/<profile>/deps`), else on `PATH`.
    pub fn new() -> Result<Self> {
        Self::with_programs(&Programs::default())
    }

    /// The backend with the husk-vmm and virtiofsd that `programs` names; the others are
    /// found as usual ([`HuskVmm::new`]).
    pub fn with_programs(programs: &Programs) -> Result<Self> {
        let program = match &programs.husk_vmm {
            Some(p) => p.clone(),
            None => Self::find()?,
        };
        Ok(Self {
            program,
            virtiofsd: programs.virtiofsd.clone(),
        })
    }

    fn find() -> Result<PathBuf> {
        let beside = std::env::current_exe().ok().and_then(|exe| {
            let dir = exe.parent()?.to_path_buf();
            let mut dirs = vec![dir.clone()];
            if dir.file_name().is_some_and(|n| n == "deps") {
                dirs.extend(dir.parent().map(Path::to_path_buf));
            }
            dirs.into_iter()
                .map(|d| d.join(PROGRAM))
                .find(|p| p.is_file())
        });
        let program = beside
            .or_else(|| crate::lookup::on_path(PROGRAM))
            .ok_or_else(|| Error::MissingProgram {
                program: PROGRAM.into(),
                fix: "build it with `cargo xtask build` (it lands in target/release/) or put it on PATH".into(),
            })?;
        Ok(program)
    }

    /// The backend with an explicit `husk-vmm` binary.
    pub fn with_program(program: impl Into<PathBuf>) -> Result<Self> {
        let program = program.into();
        if !program.is_file() {
            return Err(Error::MissingProgram {
                program: program.display().to_string(),
                fix: "give the path of a built husk-vmm (`cargo xtask build` puts it in target/release/)".into(),
            });
        }
        Ok(Self {
            program,
            virtiofsd: None,
        })
    }
}

impl Hypervisor for HuskVmm {
    fn name(&self) -> String {
        PROGRAM.into()
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
        // virtiofsd first: husk-vmm connects to its socket while building the VM.
        let virtiofsd = match &config.shared_dir {
            Some(dir) => {
                match helpers::start_virtiofsd(
                    self.virtiofsd.as_deref(),
                    dir,
                    &paths.virtiofsd_sock,
                    &paths.virtiofsd_log,
                ) {
                    Ok(p) => {
                        if let Some(j) = &config.jail {
                            // virtiofsd runs as root; the jailed husk-vmm connects to it.
                            if let Err(e) = crate::jail::give_socket(&paths.virtiofsd_sock, j) {
                                remove_sockets(&paths);
                                return Err(e);
                            }
                        }
                        Some(p)
                    }
                    Err(e) => {
                        remove_sockets(&paths);
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let mut vm = HuskVmmVm {
            vmm: None,
            virtiofsd,
            console_in: None,
            console_out: None,
            vsock: config.vsock.then(|| paths.vsock_sock.clone()),
            paths,
            pid: 0,
            helper_exit: None,
            helper_seen: None,
            finished: false,
        };
        // On error `vm` is dropped: whatever was started is ended and its sockets removed.
        let (process, console_in, console_out) = spawn(&self.program, config, &vm.paths)?;
        vm.pid = process.program_pid();
        vm.vmm = Some(process);
        vm.console_in = Some(console_in);
        vm.console_out = Some(console_out);
        vm.wait_started()?;
        tracing::debug!(
            pid = vm.pid,
            backend = PROGRAM,
            virtiofsd = vm.virtiofsd.is_some(),
            "VM started"
        );
        Ok(Box::new(vm))
    }
}

/// Spawns husk-vmm with a pipe on its stdin (the guest's console input) and one on its
/// stdout (the guest's console output, which the relay writes to the capped console log).
fn spawn(
    program: &Path,
    config: &VmConfig,
    paths: &Paths,
) -> Result<(Supervised, File, ConsoleRelay)> {
    let (_, log) = helpers::log_file(&paths.vmm_log)?;
    // Our copy of the write end goes with `cmd`: the relay sees EOF once husk-vmm ends.
    let (relay, console_out) = ConsoleRelay::start(&paths.console_log)?;
    // O_CLOEXEC: our end must not leak into husk-vmm or any other child (it would keep the
    // guest's input open); the read end loses the flag when it becomes husk-vmm's stdin.
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("creating the console input pipe")(e.into()))?;
    let mut cmd = crate::process::vm_command(program);
    cmd.args(args::args(config, paths))
        .stdin(Stdio::from(read))
        .stdout(Stdio::from(console_out))
        .stderr(log);
    crate::process::inherit_fds(
        &mut cmd,
        config.nets.iter().map(|n| n.tap.as_raw_fd()).collect(),
    );
    if let Some(j) = &config.jail {
        // husk-vmm opens /dev/kvm (a node of the jail's own), the kernel and initramfs
        // (read-only binds), its sockets in the state directory, and /dev/urandom; guest
        // connections to host vsock ports reach `<vsock>_PORT` in the same directory.
        j.for_process(
            program,
            &config.state_dir,
            &[&config.kernel, &config.initramfs],
            true,
        )
        .apply(&mut cmd)?;
    }
    let p = Supervised::spawn(PROGRAM, cmd)?;
    Ok((p, File::from(write), relay))
}

/// A device helper that ended while the VM ran.
#[derive(Debug, Clone)]
struct HelperExit {
    pid: u32,
    status: ExitStatus,
}

/// A VM run by husk-vmm, with its virtiofsd.
#[derive(Debug)]
pub(crate) struct HuskVmmVm {
    /// `None` only while starting.
    vmm: Option<Supervised>,
    virtiofsd: Option<Supervised>,
    console_in: Option<File>,
    /// Writes the guest's console output to `console.log`, capped.
    console_out: Option<ConsoleRelay>,
    paths: Paths,
    vsock: Option<PathBuf>,
    pid: u32,
    helper_exit: Option<HelperExit>,
    /// When the watch in `wait` first saw virtiofsd gone.
    helper_seen: Option<Instant>,
    finished: bool,
}

impl HuskVmmVm {
    fn vmm(&mut self) -> &mut Supervised {
        self.vmm
            .as_mut()
            .expect("husk-vmm is spawned before the VM is handed out")
    }

    /// Waits until husk-vmm answers on its API socket, which it serves only once the VM is
    /// built (kernel loaded, devices connected); if it exits first, the error carries what
    /// it printed.
    fn wait_started(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.vmm().try_wait()? {
                let out = std::fs::read_to_string(&self.paths.vmm_log).unwrap_or_default();
                return Err(Error::Guest {
                    what: format!("husk-vmm exited at start ({status}): {}", out.trim()),
                    console: self.paths.console_log.clone(),
                });
            }
            if self.paths.api_sock.exists() && api::request(&self.paths.api_sock, "state").is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Api {
                    socket: self.paths.api_sock.clone(),
                    request: "state".into(),
                    what: format!(
                        "no answer within {START_TIMEOUT:?} — see {}",
                        self.paths.vmm_log.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Looks at virtiofsd once: if it has been gone for longer than the grace while
    /// husk-vmm runs, remembers that and asks husk-vmm to end.
    fn watch_helper(&mut self) {
        let Some(fsd) = self.virtiofsd.as_mut() else {
            return;
        };
        if self.helper_exit.is_some() {
            return;
        }
        if let Ok(Some(status)) = fsd.try_wait() {
            let pid = fsd.pid();
            let since = *self.helper_seen.get_or_insert_with(Instant::now);
            if since.elapsed() >= HELPER_EXIT_GRACE {
                tracing::warn!(%status, "virtiofsd ended; stopping the VM");
                self.helper_exit = Some(HelperExit { pid, status });
                let _ = self.vmm().signal(Signal::SIGTERM);
            }
        }
    }

    /// husk-vmm has ended: end virtiofsd, close the console, remove the sockets. Idempotent.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.console_in = None;
        if let Some(relay) = self.console_out.as_mut() {
            // husk-vmm is gone: the rest of its output is in the pipe.
            relay.finish(CONSOLE_DRAIN);
        }
        if let Some(fsd) = self.virtiofsd.as_mut() {
            // It ends by itself once husk-vmm is gone; give it a moment, then kill it.
            if let Ok(None) = fsd.wait(Some(Duration::from_secs(2))) {
                let _ = fsd.kill();
            }
        }
        remove_sockets(&self.paths);
    }
}

fn remove_sockets(paths: &Paths) {
    for s in paths.sockets() {
        let _ = std::fs::remove_file(s);
    }
    let _ = std::fs::remove_file(helpers::virtiofsd_pid_file(&paths.virtiofsd_sock));
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

impl Vm for HuskVmmVm {
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
        let pipe = self
            .console_in
            .as_mut()
            .ok_or_else(|| Error::Config("console input: the VM has ended".into()))?;
        pipe.write_all(bytes)
            .map_err(Error::io("writing to husk-vmm's console input (its stdin)"))
    }

    fn pause(&mut self) -> Result<()> {
        api::request(&self.paths.api_sock, "pause").map(drop)
    }

    fn resume(&mut self) -> Result<()> {
        api::request(&self.paths.api_sock, "resume").map(drop)
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<Option<ExitStatus>> {
        // Polled, so that a crashed virtiofsd is noticed while waiting.
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut pause = Duration::from_millis(1);
        let status = loop {
            if let Some(s) = self.vmm().try_wait()? {
                break s;
            }
            self.watch_helper();
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            let left = deadline.map_or(pause, |d| d - now);
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(Duration::from_millis(20));
        };
        self.finish();
        if let Some(h) = self.helper_exit.clone() {
            return Err(Error::HelperExited {
                program: helpers::VIRTIOFSD.into(),
                pid: h.pid,
                status: h.status,
                log: self.paths.virtiofsd_log.clone(),
            });
        }
        Ok(Some(status))
    }

    /// Readable once husk-vmm or virtiofsd has ended: `wait` then either reports the end or
    /// counts down virtiofsd's grace (and a caller looks again until it has passed).
    fn exit_fd(&self) -> Option<OwnedFd> {
        let mut fds = vec![self.vmm.as_ref()?.exit_fd()?];
        if let Some(fsd) = &self.virtiofsd {
            fds.push(fsd.exit_fd()?);
        }
        crate::process::any_readable(&fds).ok()
    }

    fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if self.vmm().try_wait()?.is_none() {
            // An orderly shutdown through the API; a signal if the API does not answer.
            if api::request(&self.paths.api_sock, "shutdown").is_err() {
                self.vmm().signal(Signal::SIGTERM)?;
            }
        }
        match self.wait(Some(grace)) {
            Ok(Some(s)) => Ok(s),
            Ok(None) => {
                let s = self.vmm().kill()?;
                self.finish();
                Ok(s)
            }
            // virtiofsd crashed meanwhile; the VM is stopped, which is what was asked.
            Err(Error::HelperExited { .. }) => Ok(self
                .vmm()
                .try_wait()?
                .expect("wait reports a helper exit only after husk-vmm ended")),
            Err(e) => Err(e),
        }
    }

    fn kill(&mut self) -> Result<ExitStatus> {
        let status = self.vmm().kill()?;
        self.finish();
        Ok(status)
    }
}

impl Drop for HuskVmmVm {
    fn drop(&mut self) {
        if let Some(vmm) = self.vmm.as_mut() {
            let _ = vmm.kill();
        }
        self.finish();
        // `Supervised` kills and reaps whatever is left (virtiofsd) when it goes.
    }
}
