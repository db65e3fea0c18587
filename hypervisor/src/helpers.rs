//! Device helper processes every backend may need beside its VMM: finding them, starting
//! virtiofsd, waiting for a helper's socket. The qemu backend adds vhost-device-vsock on top;
//! husk-vmm serves vsock itself and needs only virtiofsd.
//!
//! The facts behind it (docs/FIELD-NOTES.md): virtiofsd gets no `--tag` (QEMU 7.x crashes on it;
//! the tag is the VMM's); it runs in its own namespace sandbox as root, exits when its VMM
//! disconnects, and holds a lock on `<socket>.pid` until it is fully gone. Helpers are the
//! programs the caller names ([`crate::Programs`]), else found on PATH, then in
//! `~/.cargo/bin` (where `cargo install` puts them).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::process::Supervised;
use crate::{Error, Result};

pub(crate) const VIRTIOFSD: &str = "virtiofsd";

/// How long a helper may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How often [`wait_for_socket`] looks.
const SOCKET_POLL: Duration = Duration::from_micros(250);

/// Finds `name` on PATH or in cargo's bin directory ([`crate::lookup::find_program`]).
pub fn find(name: &str) -> Result<PathBuf> {
    crate::lookup::find_program(name).ok_or_else(|| Error::MissingProgram {
        program: name.into(),
        fix: format!("install it with `cargo install --locked {name}` (cargo xtask setup does)"),
    })
}

/// `configured` if given (the caller checked it with [`check_program`]), else [`find`]`(name)`.
pub fn program(configured: Option<&Path>, name: &str) -> Result<PathBuf> {
    match configured {
        Some(p) => Ok(p.to_path_buf()),
        None => find(name),
    }
}

/// Why `path` cannot be run as a program, if it cannot: it must be absolute (a relative path
/// would depend on the caller's working directory), exist, be a regular file (after
/// symlinks) and be executable by someone. `Ok(())` says nothing about whether it is the
/// right program.
pub fn check_program(path: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if !path.is_absolute() {
        return Err("not an absolute path".into());
    }
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        _ => e.to_string(),
    })?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mode = meta.permissions().mode();
    if mode & 0o111 == 0 {
        return Err(format!("not executable (mode {:o})", mode & 0o7777));
    }
    Ok(())
}

/// Opens `path` for appending, twice: a child's stdout and stderr.
pub(crate) fn log_file(path: &Path) -> Result<(Stdio, Stdio)> {
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

/// Starts virtiofsd (`program`, else the one [`find`] finds) on `shared_dir`, sandboxed in
/// its own namespaces, serving vhost-user on `socket` and logging to `log`; returns once the
/// socket exists.
pub fn start_virtiofsd(
    program: Option<&Path>,
    shared_dir: &Path,
    socket: &Path,
    log: &Path,
) -> Result<Supervised> {
    let mut p = spawn_virtiofsd(program, shared_dir, socket, log)?;
    wait_for_socket(&mut p, socket, log)?;
    Ok(p)
}

/// [`start_virtiofsd`] without waiting for the socket: for a caller that starts other
/// helpers meanwhile and then waits ([`wait_for_socket`]).
pub fn spawn_virtiofsd(
    program: Option<&Path>,
    shared_dir: &Path,
    socket: &Path,
    log: &Path,
) -> Result<Supervised> {
    let program = self::program(program, VIRTIOFSD)?;
    let (out, err) = log_file(log)?;
    let mut cmd = crate::process::vm_command(&program);
    cmd.arg("--shared-dir")
        .arg(shared_dir)
        .arg("--socket-path")
        .arg(socket)
        .args(["--sandbox", "namespace", "--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    Supervised::spawn(VIRTIOFSD, cmd)
}

/// virtiofsd's pid file beside its socket (the lock in it is released once virtiofsd is
/// gone): removed with the socket.
pub(crate) fn virtiofsd_pid_file(socket: &Path) -> PathBuf {
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
        // A helper's socket appears a few ms after its spawn, and the VMM waits for it on
        // every cold start: a short poll (a stat and a non-blocking wait) loses at most
        // this much of that start.
        std::thread::sleep(SOCKET_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn programs_are_checked_before_use() {
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("tool");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_program(&exe).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&exe, &link).unwrap();
        check_program(&link).unwrap();

        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            check_program(&exe).unwrap_err(),
            "not executable (mode 644)"
        );
        assert_eq!(check_program(d.path()).unwrap_err(), "not a regular file");
        assert_eq!(
            check_program(&d.path().join("none")).unwrap_err(),
            "no such file"
        );
        assert_eq!(
            check_program(Path::new("bin/virtiofsd")).unwrap_err(),
            "not an absolute path"
        );
        assert_eq!(program(Some(&exe), VIRTIOFSD).unwrap(), exe);
    }
}
