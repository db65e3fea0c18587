//! The `qemu` backend: QEMU's `microvm` machine, KVM or TCG.

pub mod cmdline;
pub mod qmp;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::process::Supervised;
use crate::{Accel, Error, Hypervisor, Result, Vm, VmConfig};
use cmdline::Paths;
use qmp::Qmp;

/// The program this backend runs.
pub const QEMU_PROGRAM: &str = "qemu-system-x86_64";

/// How long QEMU may take to open its monitor socket after starting.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest path a unix socket address can hold (`sun_path`, with its NUL).
const SUN_PATH_MAX: usize = 107;

/// The `qemu` backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub program: PathBuf,
    pub accel: Accel,
}

impl Qemu {
    /// The backend with `qemu-system-x86_64` from `PATH`.
    pub fn new(accel: Accel) -> Result<Self> {
        let program = find_in_path(QEMU_PROGRAM).ok_or_else(|| Error::MissingProgram {
            program: QEMU_PROGRAM.into(),
            fix: "install Debian's qemu-system-x86 (cargo xtask setup does)".into(),
        })?;
        Ok(Self { program, accel })
    }
}

/// The first executable called `name` on `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.qemu_log)
            .map_err(Error::io(format!("creating {}", paths.qemu_log.display())))?;
        let log2 = log
            .try_clone()
            .map_err(Error::io(format!("opening {}", paths.qemu_log.display())))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(cmdline::args(config, self.accel, &paths))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let mut process = Supervised::spawn(QEMU_PROGRAM, cmd)?;
        let qmp = match connect_monitor(&mut process, &paths) {
            Ok(q) => q,
            Err(e) => {
                let _ = process.kill();
                remove_sockets(&paths);
                return Err(e);
            }
        };
        tracing::debug!(pid = process.pid(), backend = %self.name(), "VM started");
        Ok(Box::new(QemuVm {
            process,
            qmp: Some(qmp),
            paths,
        }))
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
}

/// A VM run by QEMU.
#[derive(Debug)]
pub struct QemuVm {
    process: Supervised,
    qmp: Option<Qmp>,
    paths: Paths,
}

impl QemuVm {
    fn qmp(&mut self) -> Result<&mut Qmp> {
        self.qmp.as_mut().ok_or_else(|| Error::Qmp {
            socket: self.paths.qmp_sock.clone(),
            what: "the monitor connection is closed (the VM has ended)".into(),
        })
    }

    fn finish(&mut self, status: ExitStatus) -> ExitStatus {
        self.qmp = None;
        remove_sockets(&self.paths);
        status
    }
}

impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn console_log(&self) -> &Path {
        &self.paths.console_log
    }

    fn console_write(&mut self, bytes: &[u8]) -> Result<()> {
        // One short connection per write: QEMU sends the guest's output to a connected
        // client too, and a client that stops reading would stall the guest's serial port.
        let sock = &self.paths.console_sock;
        let mut s = UnixStream::connect(sock).map_err(Error::io(format!("connecting to {}", sock.display())))?;
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
        let status = self.process.wait(timeout)?;
        Ok(status.map(|s| self.finish(s)))
    }

    fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if self.process.try_wait()?.is_none() {
            // "quit" ends QEMU at once; it may close the connection before answering.
            let asked = self.qmp().and_then(|q| q.execute("quit")).is_ok();
            if !asked {
                self.process.signal(nix::sys::signal::Signal::SIGTERM)?;
            }
        }
        let status = match self.process.wait(Some(grace))? {
            Some(s) => s,
            None => self.process.kill()?,
        };
        Ok(self.finish(status))
    }

    fn kill(&mut self) -> Result<ExitStatus> {
        let status = self.process.kill()?;
        Ok(self.finish(status))
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        // `Supervised` kills and reaps QEMU; the sockets it leaves are ours to remove.
        let _ = self.process.kill();
        remove_sockets(&self.paths);
    }
}
