//! The vhost-user device helpers a QEMU VM needs: virtiofsd (virtio-fs, started by the code
//! every backend shares, [`crate::helpers`]) and vhost-device-vsock (vsock). Each listens on
//! its own socket in the VM's state directory before QEMU starts and connects to it.
//!
//! Facts behind the choices (docs/FIELD-NOTES.md): virtiofsd gets no `--tag` (QEMU 7.x crashes on
//! it; the tag is set on QEMU's device); it runs in its own namespace sandbox as root, and
//! exits when QEMU disconnects. vhost-device-vsock keeps running after QEMU is gone: the VM
//! kills it. Both are the programs the caller named ([`crate::Programs`]), else found on PATH,
//! then in `~/.cargo/bin` (where `cargo install` puts them).

use std::path::Path;
use std::process::Stdio;

use super::cmdline::Paths;
use crate::helpers::{log_file, program, wait_for_socket};
use crate::jail::JailSpec;
use crate::process::Supervised;
use crate::{Result, GUEST_CID};

pub(crate) use crate::helpers::VIRTIOFSD;
pub(crate) const VHOST_DEVICE_VSOCK: &str = "vhost-device-vsock";

/// Starts virtiofsd (`program`, else found) on `shared_dir`, sandboxed in its own namespaces;
/// the caller waits for its socket ([`wait_for_virtiofsd`]).
pub fn spawn_virtiofsd(
    program: Option<&Path>,
    shared_dir: &Path,
    paths: &Paths,
) -> Result<Supervised> {
    crate::helpers::spawn_virtiofsd(
        program,
        shared_dir,
        &paths.virtiofsd_sock,
        &paths.virtiofsd_log,
    )
}

/// Waits for the socket of the virtiofsd [`spawn_virtiofsd`] started.
pub fn wait_for_virtiofsd(p: &mut Supervised, paths: &Paths) -> Result<()> {
    wait_for_socket(p, &paths.virtiofsd_sock, &paths.virtiofsd_log)
}

/// Starts vhost-device-vsock (`program`, else found) with the hybrid-vsock socket at
/// `paths.vsock_sock`; the caller waits for its vhost-user socket
/// ([`wait_for_vhost_vsock`]). One process per VM: guests of different VMs never see each
/// other.
///
/// With a jail it runs as the sandbox's unprivileged uid in a root that holds only the VM's
/// state directory (its sockets) and the system's libraries, with no network namespace of
/// the host: it only speaks on unix sockets.
pub(crate) fn spawn_vhost_vsock(
    program: Option<&Path>,
    paths: &Paths,
    jail: Option<&JailSpec>,
    state_dir: &Path,
) -> Result<Supervised> {
    let program = self::program(program, VHOST_DEVICE_VSOCK)?;
    let (out, err) = log_file(&paths.vhost_vsock_log)?;
    let mut cmd = crate::process::vm_command(&program);
    if let Some(j) = jail {
        j.for_process(&program, state_dir, &[], false)
            .apply(&mut cmd)?;
    }
    cmd.arg("--guest-cid")
        .arg(GUEST_CID.to_string())
        .arg("--socket")
        .arg(&paths.vhost_vsock_sock)
        .arg("--uds-path")
        .arg(&paths.vsock_sock)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    Supervised::spawn(VHOST_DEVICE_VSOCK, cmd)
}

/// Waits for the socket of the vhost-device-vsock [`spawn_vhost_vsock`] started.
pub(crate) fn wait_for_vhost_vsock(p: &mut Supervised, paths: &Paths) -> Result<()> {
    wait_for_socket(p, &paths.vhost_vsock_sock, &paths.vhost_vsock_log)
}
