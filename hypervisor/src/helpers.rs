//! Device helper processes every backend may need beside its VMM: finding them, starting
//! virtiofsd, waiting for a helper's socket. The qemu backend adds vhost-device-vsock on top;
//! husk-vmm serves vsock itself and needs only virtiofsd.
//!
//! The facts behind it (docs/FIELD-NOTES.md): virtiofsd gets no `--tag` (QEMU 7.x crashes on it;
//! the tag is the VMM's); it runs in its own namespace sandbox as root, exits when its VMM
//! disconnects, and holds a lock on `<socket>.pid` until it is fully gone. Helpers are the
//! programs the caller names ([`crate::Programs`]), else found on PATH, then in
//! `~/.cargo/bin` (where `cargo install` puts them).

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::process::Supervised;
use crate::{Error, Result};

pub(crate) const VIRTIOFSD: &str = "virtiofsd";

/// How long a helper may take to listen on its socket.
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
/// socket listens.
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

/// Waits until the helper `p` listens on `sock`; if `p` exits first, the error carries what
/// it logged.
///
/// The socket's file appears at `bind(2)`, before `listen(2)`: a VMM that connects in between
/// is refused (QEMU then exits with "Connection refused"), which a helper preempted between
/// the two on a loaded host makes happen. Connecting to find out is no answer: a vhost-user
/// backend takes its first connection for its frontend's. So this waits for the file, then
/// for the kernel's table of unix sockets to show one listening at that path
/// ([`listening_at`]).
///
/// That table is per network namespace, and a socket stays in the one it was made in. A
/// helper makes it either where it started, which is the namespace of the thread that
/// spawned it and now waits here (virtiofsd, which then moves into a network namespace of
/// its own), or where it now is (a jailed helper, which a jail put in its own before exec).
/// So both tables are read: `/proc/thread-self/net/unix` and `/proc/<pid>/net/unix`.
pub fn wait_for_socket(p: &mut Supervised, sock: &Path, log: &Path) -> Result<()> {
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    let tables = [
        PathBuf::from(format!("/proc/{}/net/unix", p.pid())),
        PathBuf::from("/proc/thread-self/net/unix"),
    ];
    let path = sock.as_os_str().as_bytes();
    loop {
        if let Some(status) = p.try_wait()? {
            let out = std::fs::read_to_string(log).unwrap_or_default();
            return Err(Error::Config(format!(
                "{} exited at start ({status}): {}",
                p.name(),
                out.trim()
            )));
        }
        // Unreadable (the helper ending as we look) is "not yet": the exit is seen above.
        if sock.exists()
            && tables
                .iter()
                .any(|t| std::fs::read(t).is_ok_and(|t| listening_at(&t, path)))
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = p.kill();
            let what = if sock.exists() {
                "listening on its socket"
            } else {
                "a socket"
            };
            return Err(Error::Config(format!(
                "{}: not {what} {} within {SOCKET_TIMEOUT:?} — see {}",
                p.name(),
                sock.display(),
                log.display()
            )));
        }
        // A helper's socket appears a few ms after its spawn, and the VMM waits for it on
        // every cold start: a short poll (a stat, a read of the table once the file is there,
        // and a non-blocking wait) loses at most this much of that start.
        std::thread::sleep(SOCKET_POLL);
    }
}

/// Whether `table`, the text of a `/proc/<pid>/net/unix`, has a listening socket bound at
/// `path`. Each line after the header is `Num: RefCount Protocol Flags Type St Inode Path`;
/// a socket that listens has `__SO_ACCEPTCON` (0x10000) in its flags. The path is the rest
/// of the line, so this compares whole lines' tails, never a prefix. Parsed here: the procfs
/// crate's `UnixNetEntry` drops the flags, and its state (`St`) is the same for a socket that
/// is only bound.
fn listening_at(table: &[u8], path: &[u8]) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    table.split(|&b| b == b'\n').skip(1).any(|line| {
        let mut rest = line;
        let mut fields = [&[][..]; 7];
        for f in fields.iter_mut() {
            rest = trim_start(rest);
            let end = rest
                .iter()
                .position(u8::is_ascii_whitespace)
                .unwrap_or(rest.len());
            (*f, rest) = rest.split_at(end);
        }
        let flags = std::str::from_utf8(fields[3])
            .ok()
            .and_then(|f| u32::from_str_radix(f, 16).ok());
        flags.is_some_and(|f| f & SO_ACCEPTCON != 0) && rest.strip_prefix(b" ") == Some(path)
    })
}

fn trim_start(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    &b[start..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_socket_counts_once_it_listens_at_exactly_its_path() {
        // Lines as the kernel prints them (`%pK: %08X %08X %08X %04X %02X %5lu` and the
        // path), from a host with a listener, a connected socket and a longer path.
        let table = b"Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01  4242 /run/husk/a/vm/fs.sock\n\
            0000000000000000: 00000003 00000000 00000000 0001 03  4243 /run/husk/b/vm/fs.sock\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 14244 /run/husk/c/vm/fs.sock.x\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 14245\n";
        assert!(listening_at(table, b"/run/husk/a/vm/fs.sock"));
        // Bound (and connected), not listening.
        assert!(!listening_at(table, b"/run/husk/b/vm/fs.sock"));
        // Only a longer path listens.
        assert!(!listening_at(table, b"/run/husk/c/vm/fs.sock"));
        assert!(!listening_at(table, b"/run/husk/c/vm/fs"));
        assert!(!listening_at(b"", b"/run/husk/a/vm/fs.sock"));
    }

    /// A helper (Python) that binds `sock`, takes a second to listen, then waits for one
    /// connection. `netns` is when it moves to a network namespace of its own: "first" (as a
    /// jailed helper is), "after-bind" (virtiofsd moves after it listens: a table read late
    /// enough finds nothing in its namespace, and this makes every read that late) or "never".
    fn binds_then_listens(sock: &Path, netns: &str) -> Supervised {
        let mut cmd = std::process::Command::new("python3");
        cmd.args([
            "-c",
            "import ctypes, os, socket, sys, time\n\
             unshare = ctypes.CDLL(None, use_errno=True).unshare\n\
             flags = 0x40000000 | (0 if os.geteuid() == 0 else 0x10000000)\n\
             def own_netns():\n\
             \x20   assert unshare(flags) == 0, ctypes.get_errno()\n\
             if sys.argv[2] == 'first': own_netns()\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.bind(sys.argv[1])\n\
             if sys.argv[2] == 'after-bind': own_netns()\n\
             time.sleep(1)\n\
             s.listen()\n\
             s.accept()\n",
        ])
        .arg(sock)
        .arg(netns);
        Supervised::spawn("binds-then-listens", cmd).unwrap()
    }

    #[test]
    fn a_helper_is_waited_for_until_it_listens_not_until_it_binds() {
        // The socket's file exists for a second before the helper listens: a VMM connecting
        // then would be refused. Wherever the helper's socket is, it is found.
        for netns in ["never", "first", "after-bind"] {
            let d = tempfile::tempdir().unwrap();
            let sock = d.path().join("helper.sock");
            let log = d.path().join("helper.log");
            let mut p = binds_then_listens(&sock, netns);
            wait_for_socket(&mut p, &sock, &log).unwrap_or_else(|e| panic!("{netns}: {e}"));
            std::os::unix::net::UnixStream::connect(&sock).unwrap_or_else(|e| {
                panic!("{netns}: the helper listens once wait_for_socket returns: {e}")
            });
            let status = p.wait(Some(Duration::from_secs(10))).unwrap();
            assert!(status.unwrap().success(), "{netns}: {status:?}");
        }
    }

    #[test]
    fn a_helper_that_exits_before_listening_is_an_error_with_its_log() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("helper.sock");
        let log = d.path().join("helper.log");
        std::fs::write(&log, "cannot serve: no such device\n").unwrap();
        let mut cmd = std::process::Command::new("python3");
        cmd.args([
            "-c",
            "import socket, sys\n\
             socket.socket(socket.AF_UNIX).bind(sys.argv[1])\n\
             sys.exit(3)\n",
        ])
        .arg(&sock);
        let mut p = Supervised::spawn("exits", cmd).unwrap();
        let e = wait_for_socket(&mut p, &sock, &log)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exits exited at start") && e.contains("cannot serve: no such device"),
            "{e}"
        );
    }

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
