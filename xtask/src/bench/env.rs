//! The bench's private world: a containerd of its own (root, state, sockets in a temporary
//! directory, CRI off) that finds `containerd-shim-husk-v2` from this checkout and runc's shim
//! from the system, with the busybox image imported. Everything it made — containers, tasks,
//! VMs, /run/husk/<id> directories, mounts, containerd itself — is removed when it is dropped,
//! on success and on failure. Only processes it started (by PID) are ended.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{paths, rootfs};

pub const HUSK_RUNTIME: &str = "io.containerd.husk.v2";
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

pub struct Env {
    dir: PathBuf,
    child: Child,
    pub namespace: String,
    /// Every container id the bench handed out, for the cleanup.
    ids: Mutex<BTreeSet<String>>,
    counter: Mutex<u32>,
    torn_down: bool,
}

impl Env {
    pub fn start() -> Result<Self> {
        let containerd = paths::find_program("containerd")
            .context("containerd: not found — run `cargo xtask setup`")?;
        paths::find_program("ctr").context("ctr: not found — run `cargo xtask setup`")?;
        paths::find_program("containerd-shim-runc-v2").context(
            "containerd-shim-runc-v2: not found — run `cargo xtask setup` (Debian's containerd)",
        )?;
        let shim = paths::workspace().join("target/release/containerd-shim-husk-v2");
        if !shim.is_file() {
            bail!("{}: missing — `cargo xtask build` makes it", shim.display());
        }
        let dir = PathBuf::from(format!("/tmp/husk-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin"))?;
        std::os::unix::fs::symlink(&shim, dir.join("bin/containerd-shim-husk-v2"))?;
        let husk_config = dir.join("husk.toml");
        std::fs::write(
            &husk_config,
            format!(
                "kernel = {}\ninitramfs = {}\n",
                toml_string(&paths::vmlinux().to_string_lossy()),
                toml_string(&paths::initramfs().to_string_lossy())
            ),
        )?;
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{0}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{0}/containerd.sock.ttrpc\"\n",
                dir.display()
            ),
        )?;
        let mut path = OsString::from(dir.join("bin"));
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        // Its own process group: a Ctrl-C on the terminal reaches the bench, which then stops
        // containerd itself after the cleanup that needs it.
        let child = Command::new(containerd)
            .process_group(0)
            .env("PATH", path)
            .env("HUSK_CONFIG", &husk_config)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let env = Self {
            namespace: format!("husk-bench-{}", std::process::id()),
            dir,
            child,
            ids: Mutex::new(BTreeSet::new()),
            counter: Mutex::new(0),
            torn_down: false,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !env.socket().exists() {
            if Instant::now() > deadline {
                bail!(
                    "containerd did not open {} within 30 s; see {}",
                    env.socket().display(),
                    env.log_path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let image = paths::images().join("busybox.tar");
        env.ctr_ok(&["images", "import", image.to_str().context("image path")?])?;
        Ok(env)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The husk configuration the private containerd's shims read (`HUSK_CONFIG`).
    pub fn husk_config(&self) -> PathBuf {
        self.dir.join("husk.toml")
    }

    pub fn image(&self) -> &'static str {
        rootfs::BUSYBOX_IMAGE
    }

    /// A fresh container id, remembered for the cleanup.
    pub fn new_id(&self, tag: &str) -> String {
        let mut n = self.counter.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        let id = format!("bench-{}-{tag}-{}", std::process::id(), *n);
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone());
        id
    }

    /// `ctr` against this containerd, in its namespace, with `args` still to add.
    pub fn ctr_cmd(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(&self.namespace);
        c
    }

    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        self.ctr_cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")
    }

    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args)?;
        if !out.status.success() {
            bail!(
                "ctr {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills and deletes the task and container `id`, waiting for the task to stop.
    pub fn remove(&self, id: &str) -> Result<()> {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.ctr(&["task", "delete", id])?;
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.success() || err.contains("not found") {
                break;
            }
            if Instant::now() > deadline {
                bail!("task {id} did not stop within 30 s of SIGKILL: {err}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = self.ctr(&["containers", "delete", id])?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !err.contains("not found") {
            bail!("deleting container {id}: {err}");
        }
        Ok(())
    }

    /// Cleans up every container the bench made; returns what it could not remove.
    fn cleanup(&self) -> Vec<String> {
        let mut left = Vec::new();
        let ids: Vec<String> = self
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let listed = self.ctr_ok(&["containers", "ls", "-q"]).unwrap_or_default();
        for id in listed.lines().filter(|l| ids.iter().any(|i| i == l.trim())) {
            if let Err(e) = self.remove(id.trim()) {
                left.push(format!("{id}: {e:#}"));
            }
        }
        left
    }
}

impl Env {
    /// The bench namespace's host cgroups: ctr gives each container `/<namespace>/<id>`, and
    /// runc removes its leaf but leaves `/<namespace>` behind in every hierarchy (as it leaves
    /// `/default` under a plain containerd); ours is removed once its containers are gone. A
    /// container's leaf still there is reported (and removed when empty).
    fn remove_namespace_cgroups(&self) -> Vec<String> {
        let mut found = Vec::new();
        for mount in cgroup_mounts() {
            let ns = mount.join(&self.namespace);
            let Ok(entries) = std::fs::read_dir(&ns) else {
                continue;
            };
            for leaf in entries.flatten().filter(|e| e.path().is_dir()) {
                let removed = std::fs::remove_dir(leaf.path()).is_ok();
                found.push(format!(
                    "host cgroup {} was left behind{}",
                    leaf.path().display(),
                    if removed { "; removed" } else { " (busy)" }
                ));
            }
            if let Err(e) = std::fs::remove_dir(&ns) {
                found.push(format!("host cgroup {}: not removed: {e}", ns.display()));
            }
        }
        found
    }
}

/// Where each cgroup hierarchy is mounted (v1 and v2), from /proc/self/mountinfo.
fn cgroup_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split(' ').nth(4)?;
            matches!(post.split(' ').next()?, "cgroup" | "cgroup2").then(|| PathBuf::from(mount))
        })
        .collect()
}

/// `s` as a TOML basic string (quoted, `"` `\\` and control characters escaped), for the husk
/// configurations the bench writes.
pub fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Mount points under `dir` (from /proc/self/mountinfo), deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// Every thread's stack of a process left behind, by gdb where it is installed, into
/// `target/husk/bench/stacks-<pid>.txt`: what it waits for, for the report.
fn backtraces(pid: u32) -> Option<PathBuf> {
    let out = Command::new("gdb")
        .args([
            "-p",
            &pid.to_string(),
            "-batch",
            "-ex",
            "thread apply all bt",
        ])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let file = crate::paths::workspace().join(format!("target/husk/bench/stacks-{pid}.txt"));
    std::fs::create_dir_all(file.parent()?).ok()?;
    std::fs::write(&file, [out.stdout, out.stderr].concat()).ok()?;
    Some(file)
}

/// A process's threads, as `name/wchan` (the kernel function each waits in), for a report.
fn threads_of(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    let mut out: Vec<String> = tasks
        .flatten()
        .map(|t| {
            let read = |f: &str| {
                std::fs::read_to_string(t.path().join(f))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default()
            };
            format!("{}/{}", read("comm"), read("wchan"))
        })
        .collect();
    out.sort();
    out.join(" ")
}

/// Ends `pids` (processes our containerd's shims started): SIGTERM, then SIGKILL after 5 s.
fn end_processes(pids: &[u32]) {
    use nix::sys::signal::{kill, Signal};
    let pid = |p: u32| nix::unistd::Pid::from_raw(i32::try_from(p).unwrap_or(i32::MAX));
    for p in pids {
        let _ = kill(pid(*p), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pids {
        if Path::new(&format!("/proc/{p}")).exists() {
            let _ = kill(pid(*p), Signal::SIGKILL);
        }
    }
}

impl Env {
    /// Removes everything the bench made and stops containerd; returns what it found left
    /// behind by the runtimes (a finding in itself: the report says so).
    pub fn shutdown(mut self) -> Vec<String> {
        self.teardown()
    }

    fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut found = self.cleanup();
        // containerd: SIGTERM, then SIGKILL; it is our child.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Shims, VMs and helpers of our containers still running now that their containerd
        // is gone (they are ours: our containerd started them), and sandbox directories a
        // shim did not remove.
        let ids: Vec<String> = self
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let stopped = Instant::now();
        let all = super::procfs::processes();
        for id in ids {
            let needle = format!("/run/husk/{id}/");
            let left: Vec<&super::procfs::Proc> = all
                .iter()
                .filter(|p| {
                    p.argv.iter().any(|a| a.contains(&needle))
                        || (p.exe.starts_with("containerd-shim")
                            && p.argv.windows(2).any(|w| w[0] == "-id" && w[1] == id))
                })
                .collect();
            if !left.is_empty() {
                // What each was doing (its threads' names and kernel wait channels), then a
                // grace of 3 s: a process that ends by itself was slow, one that does not was
                // stuck. Either is reported.
                let names: Vec<String> = left
                    .iter()
                    .map(|p| format!("{} ({}: {})", p.exe, p.pid, threads_of(p.pid)))
                    .collect();
                let pids: Vec<u32> = left.iter().map(|p| p.pid).collect();
                for p in &pids {
                    if let Some(f) = backtraces(*p) {
                        found.push(format!("the threads' stacks of {p}: {}", f.display()));
                    }
                }
                let alive = |p: &u32| Path::new(&format!("/proc/{p}")).exists();
                let grace = Instant::now() + Duration::from_secs(3);
                while pids.iter().any(alive) && Instant::now() < grace {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let fate = if pids.iter().any(alive) {
                    "still running 3 s later; ended".to_string()
                } else {
                    format!(
                        "it ended by itself {} ms after containerd stopped",
                        stopped.elapsed().as_millis()
                    )
                };
                found.push(format!(
                    "{id}: still running after its container was removed and containerd \
                     stopped: {}; {fate}",
                    names.join(", ")
                ));
                end_processes(&pids);
            }
            let d = Path::new("/run/husk").join(&id);
            if d.exists() {
                found.push(format!("{} was left behind; removed", d.display()));
                for m in mounts_under(&d) {
                    let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
                }
                let _ = std::fs::remove_dir_all(&d);
            }
            // Its jail uid's record too, which the shim gives back only when it cleans up.
            let jail_ids = husk_hypervisor::jail::JailIds::new(Path::new("/run/husk"));
            if let Some(uid) = jail_ids.of(&id) {
                found.push(format!(
                    "{id}: its jail id {uid} was still claimed; released"
                ));
                jail_ids.release(&id);
            }
        }
        for m in mounts_under(&self.dir) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        found.extend(self.remove_namespace_cgroups());
        if !found.is_empty() {
            // containerd's log (the shims' lines included) outlives the bench's directory.
            let keep =
                crate::paths::workspace().join("target/husk/bench/containerd-left-behind.log");
            if std::fs::create_dir_all(keep.parent().unwrap_or(Path::new(".")))
                .and_then(|()| std::fs::copy(self.dir.join("containerd.log"), &keep))
                .is_ok()
            {
                found.push(format!("containerd's log kept in {}", keep.display()));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        for f in &found {
            eprintln!("bench cleanup: {f}");
        }
        found
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.teardown();
    }
}
