//! Device helper processes every backend may need beside its VMM: finding them, starting
//! virtiofsd, waiting for a helper's socket. The qemu backend adds vhost-device-vsock on top;
//! husk-vmm serves vsock itself and needs only virtiofsd.
//!
//! Facts behind the choices (FIELD-NOTES): virtiofsd gets no `--tag` (QEMU 7.x crashes on it;
//! the tag is the VMM's); it runs in its own namespace sandbox as root, exits when its VMM
//! disconnects, and holds a lock on `<socket>.pid` until it is fully gone. Helpers are found on
//! PATH, then in `~/.cargo/bin` (where `cargo install` puts them).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::Supervised;
use crate::{Error, Result};

pub const VIRTIOFSD: &str = "virtiofsd";

/// How long a helper may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds `name` on PATH or in `~/.cargo/bin`.
pub fn find(name: &str) -> Result<PathBuf> {
    crate::qemu::find_in_path(name)
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            let p = Path::new(&home).join(".cargo/bin").join(name);
            p.is_file().then_some(p)
        })
        .ok_or_else(|| Error::MissingProgram {
            program: name.into(),
            fix: format!(
                "install it with `cargo install --locked {name}` (cargo xtask setup does)"
            ),
        })
}

/// Opens `path` for appending, twice: a child's stdout and stderr.
pub fn log_file(path: &Path) -> Result<(Stdio, Stdio)> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(Error::io(format!("creating {}", path.display())))?;
    let g = f
        .try_clone()
        .map_err(Error::io(format!("opening {}", path.display())))?;
    Ok((f.into(), g.into()))
}

/// Starts virtiofsd on `shared_dir`, sandboxed in its own namespaces, serving vhost-user on
/// `socket` and logging to `log`; returns once the socket exists.
pub fn start_virtiofsd(shared_dir: &Path, socket: &Path, log: &Path) -> Result<Supervised> {
    let program = find(VIRTIOFSD)?;
    let (out, err) = log_file(log)?;
    let mut cmd = Command::new(program);
    cmd.arg("--shared-dir")
        .arg(shared_dir)
        .arg("--socket-path")
        .arg(socket)
        .args(["--sandbox", "namespace", "--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let mut p = Supervised::spawn(VIRTIOFSD, cmd)?;
    wait_for_socket(&mut p, socket, log)?;
    Ok(p)
}

/// virtiofsd's pid file beside its socket (the lock in it is released once virtiofsd is
/// gone): removed with the socket.
pub fn virtiofsd_pid_file(socket: &Path) -> PathBuf {
    let mut p = socket.to_path_buf().into_os_string();
    p.push(".pid");
    PathBuf::from(p)
}

/// Waits until `sock` exists; if `p` exits first, the error carries what it logged.
pub fn wait_for_socket(p: &mut Supervised, sock: &Path, log: &Path) -> Result<()> {
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    loop {
        if let Some(status) = p.try_wait()? {
            let out = std::fs::read_to_string(log).unwrap_or_default();
            return Err(Error::Config(format!(
                "{} exited at start ({status}): {}",
                p.name(),
                out.trim()
            )));
        }
        if sock.exists() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = p.kill();
            return Err(Error::Config(format!(
                "{}: no socket {} within {SOCKET_TIMEOUT:?} — see {}",
                p.name(),
                sock.display(),
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
