//! The vhost-user device helpers a QEMU VM needs: virtiofsd (virtio-fs) and
//! vhost-device-vsock (vsock). Each listens on its own socket in the VM's state directory
//! before QEMU starts and connects to it.
//!
//! Facts behind the choices (FIELD-NOTES): virtiofsd gets no `--tag` (QEMU 7.x crashes on
//! it; the tag is set on QEMU's device); it runs in its own namespace sandbox as root, and
//! exits when QEMU disconnects. vhost-device-vsock keeps running after QEMU is gone: the VM
//! kills it. Both are found on PATH, then in `~/.cargo/bin` (where `cargo install` puts them).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::cmdline::Paths;
use crate::process::Supervised;
use crate::{Error, Result, GUEST_CID};

pub const VIRTIOFSD: &str = "virtiofsd";
pub const VHOST_DEVICE_VSOCK: &str = "vhost-device-vsock";

/// How long a helper may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds `name` on PATH or in `~/.cargo/bin`.
pub fn find(name: &str) -> Result<PathBuf> {
    super::find_in_path(name)
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            let p = Path::new(&home).join(".cargo/bin").join(name);
            p.is_file().then_some(p)
        })
        .ok_or_else(|| Error::MissingProgram {
            program: name.into(),
            fix: format!("install it with `cargo install --locked {name}` (cargo xtask setup does)"),
        })
}

fn log_file(path: &Path) -> Result<(Stdio, Stdio)> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(Error::io(format!("creating {}", path.display())))?;
    let g = f.try_clone().map_err(Error::io(format!("opening {}", path.display())))?;
    Ok((f.into(), g.into()))
}

/// Starts virtiofsd on `shared_dir`, sandboxed in its own namespaces, and waits for its socket.
pub fn start_virtiofsd(shared_dir: &Path, paths: &Paths) -> Result<Supervised> {
    let program = find(VIRTIOFSD)?;
    let (out, err) = log_file(&paths.virtiofsd_log)?;
    let mut cmd = Command::new(program);
    cmd.arg("--shared-dir")
        .arg(shared_dir)
        .arg("--socket-path")
        .arg(&paths.virtiofsd_sock)
        .args(["--sandbox", "namespace", "--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let mut p = Supervised::spawn(VIRTIOFSD, cmd)?;
    wait_for_socket(&mut p, &paths.virtiofsd_sock, &paths.virtiofsd_log)?;
    Ok(p)
}

/// Starts vhost-device-vsock with the hybrid-vsock socket at `paths.vsock_sock`, and waits for
/// its vhost-user socket. One process per VM: guests of different VMs never see each other.
pub fn start_vhost_vsock(paths: &Paths) -> Result<Supervised> {
    let program = find(VHOST_DEVICE_VSOCK)?;
    let (out, err) = log_file(&paths.vhost_vsock_log)?;
    let mut cmd = Command::new(program);
    cmd.arg("--guest-cid")
        .arg(GUEST_CID.to_string())
        .arg("--socket")
        .arg(&paths.vhost_vsock_sock)
        .arg("--uds-path")
        .arg(&paths.vsock_sock)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let mut p = Supervised::spawn(VHOST_DEVICE_VSOCK, cmd)?;
    wait_for_socket(&mut p, &paths.vhost_vsock_sock, &paths.vhost_vsock_log)?;
    Ok(p)
}

fn wait_for_socket(p: &mut Supervised, sock: &Path, log: &Path) -> Result<()> {
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
