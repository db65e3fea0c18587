//! husk as containerd sees it: the shim binary under its runtime names, a configuration that
//! points at this checkout's kernel and initramfs, and a private containerd that finds both.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::containerd::PrivateContainerd;
use crate::{initramfs, kernel, workspace};

/// `containerd-shim-husk-v2` (`HUSK_SHIM`, else `target/release/`, which `cargo xtask build`
/// makes).
pub fn shim_binary() -> PathBuf {
    let p = std::env::var_os("HUSK_SHIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release/containerd-shim-husk-v2"));
    assert!(
        p.is_file(),
        "{}: missing — build it with `cargo xtask build` (or point HUSK_SHIM at one); `cargo xtask test` does",
        p.display()
    );
    p
}

/// The test images `cargo xtask rootfs` writes (`HUSK_IMAGES`, else `target/husk/images`).
pub fn image(name: &str) -> PathBuf {
    let dir = std::env::var_os("HUSK_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::artifacts_dir().join("images"));
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{}: missing — build it with `cargo xtask rootfs`",
        p.display()
    );
    p
}

pub const BUSYBOX: &str = "husk.local/busybox:latest";

/// A private containerd that runs husk, plus the files that make it so.
pub struct HuskContainerd {
    pub ctd: PrivateContainerd,
    _bin: tempfile::TempDir,
}

impl HuskContainerd {
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// With extra lines for the shim's config.toml (after `kernel` and `initramfs`, which they
    /// may override).
    pub fn start_with_config(extra: &str) -> Self {
        let bin = tempfile::Builder::new()
            .prefix("husk-bin-")
            .tempdir()
            .unwrap();
        crate::stale::record("dir", &bin.path().to_string_lossy());
        let shim = shim_binary();
        for name in ["containerd-shim-husk-v2", "containerd-shim-kata-v2"] {
            std::os::unix::fs::symlink(&shim, bin.path().join(name)).unwrap();
        }
        let config = bin.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "{extra}\n{}{}",
                if extra.contains("kernel =") {
                    String::new()
                } else {
                    format!("kernel = \"{}\"\n", kernel().display())
                },
                if extra.contains("initramfs =") {
                    String::new()
                } else {
                    format!("initramfs = \"{}\"\n", initramfs().display())
                }
            ),
        )
        .unwrap();
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut new_path = OsString::from(bin.path());
        new_path.push(":");
        new_path.push(path);
        let ctd = PrivateContainerd::start_with_env(&[
            ("PATH", new_path),
            ("HUSK_CONFIG", config.into_os_string()),
        ]);
        ctd.ctr_ok(&["images", "import", image("busybox.tar").to_str().unwrap()]);
        Self { ctd, _bin: bin }
    }
}

impl HuskContainerd {
    /// `ctr run -d` on husk of an idle busybox (`sleep 1000`), with extra `ctr run` options.
    pub fn run_idle(&self, id: &str, options: &[&str]) {
        let mut args = vec!["run", "-d", "--runtime", "io.containerd.husk.v2"];
        args.extend_from_slice(options);
        args.extend_from_slice(&[BUSYBOX, id, "sleep", "1000"]);
        self.ctd.ctr_ok(&args);
    }

    /// Kills task `id` (SIGKILL), waits until it can be deleted, deletes task and container.
    pub fn remove(&self, id: &str) {
        let _ = self.ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !self.ctd.ctr(&["task", "delete", id]).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "{id} did not stop within 30 s of SIGKILL: {}",
                self.ctd.ctr_ok(&["task", "ls"])
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.ctd.ctr_ok(&["containers", "delete", id]);
    }
}

impl Drop for HuskContainerd {
    /// A test that failed half-way leaves tasks behind, and their shims outlive containerd (as
    /// they must: containerd reconnects to them after a restart).
    fn drop(&mut self) {
        end_shims(
            &format!("-namespace\0{}\0", self.ctd.namespace),
            &self.ctd.namespace,
        );
        crate::stale::done("dir", &self._bin.path().to_string_lossy());
    }
}

/// Ends the husk shims whose command line contains `marker` (by PID; they were started by the
/// test's own containerd), then runs the shim's own `delete` for each sandbox, as containerd
/// would have, and removes its host cgroup.
pub fn end_shims(marker: &str, namespace: &str) {
    let mut ids = Vec::new();
    for pid in processes_mentioning("containerd-shim-husk-v2") {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).into_owned();
        if !cmd.contains(marker) {
            continue;
        }
        let args: Vec<&str> = cmd.split('\0').collect();
        if let Some(id) = args
            .iter()
            .position(|a| *a == "-id")
            .and_then(|i| args.get(i + 1))
        {
            // The shim runs in its bundle, where `delete` finds what to clean up (the task
            // socket named in the bundle's `address` file among them).
            let bundle = std::fs::read_link(format!("/proc/{pid}/cwd"))
                .unwrap_or_else(|_| std::path::PathBuf::from("/"));
            ids.push((id.to_string(), bundle));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for (id, bundle) in ids {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !processes_mentioning(&format!("/run/husk/{id}/")).is_empty()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = std::process::Command::new(shim_binary())
            .args(["-namespace", namespace, "-id", &id, "delete"])
            .current_dir(if bundle.is_dir() {
                bundle.as_path()
            } else {
                std::path::Path::new("/")
            })
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        for entry in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(entry.path().join(namespace).join(&id));
        }
    }
}

/// Waits (up to 20 s) until sandbox `id` has left nothing behind: no process naming its state
/// directory, no mount under it, no directory. Fails the test with what is left.
pub fn assert_sandbox_gone(id: &str) {
    let dir = Path::new("/run/husk").join(id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let procs = processes_mentioning(&format!("/run/husk/{id}/"));
        let mounts = mounts_under(&dir);
        let jail_id = jail_id_of(id);
        if procs.is_empty() && mounts.is_empty() && !dir.exists() && jail_id.is_none() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sandbox {id} left behind: processes {procs:?}, mounts {mounts:?}, dir exists {}, jail id {jail_id:?}",
            dir.exists()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The jail uid/gid sandbox `id` holds (its record under `/run/husk/.jail-ids/`), if any.
pub fn jail_id_of(id: &str) -> Option<u32> {
    std::fs::read_dir("/run/husk/.jail-ids")
        .ok()?
        .flatten()
        .find(|e| std::fs::read(e.path()).is_ok_and(|owner| owner == id.as_bytes()))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
}

/// Runs `containerd-shim-husk-v2 console <sid>` (the debug console: a root shell in the
/// guest) with `input` on its stdin (not a terminal), killing it (by PID) if it has not ended
/// within `deadline`.
pub fn debug_console(
    sid: &str,
    input: &[u8],
    deadline: std::time::Duration,
) -> std::process::Output {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let mut child = Command::new(shim_binary())
        .args(["console", sid])
        .env_remove("HUSK_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting containerd-shim-husk-v2 console");
    // A console that refuses at once may be gone before its input is written (EPIPE).
    let _ = child.stdin.take().unwrap().write_all(input);
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let end = std::time::Instant::now() + deadline;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`console {sid}` did not end within {deadline:?}; it printed:\n{}",
                String::from_utf8_lossy(&out.join().unwrap())
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The directory of sandbox `id`'s VM (console log, sockets, helper logs).
pub fn vm_dir(id: &str) -> PathBuf {
    Path::new("/run/husk").join(id).join("vm")
}

/// PIDs of processes whose command line mentions `needle` (e.g. a sandbox's state dir).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) && crate::process_alive(pid) {
            v.push(pid);
        }
    }
    v
}

/// Mount points under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(str::to_string)
        .collect()
}
