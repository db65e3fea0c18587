//! A private containerd for one test: its own root, state, sockets and config in a temporary
//! directory, stopped (by PID) and removed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::require_program;

#[derive(Debug)]
pub struct PrivateContainerd {
    dir: tempfile::TempDir,
    child: Child,
    /// The extra environment it was started with (kept for [`Self::restart`]).
    env: Vec<(String, std::ffi::OsString)>,
    /// A namespace unique to this instance (containerd's /run/containerd/{s,fifo} are shared
    /// by every containerd on the machine).
    pub namespace: String,
}

impl PrivateContainerd {
    /// Starts containerd with the CRI plugin disabled and waits for its socket.
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    /// Like [`Self::start`], with extra environment for containerd (and so for the shims it
    /// starts: `PATH` to find them, `HUSK_CONFIG`).
    pub fn start_with_env(env: &[(&str, std::ffi::OsString)]) -> Self {
        require_program("containerd", "containerd");
        require_program("ctr", "containerd");
        let dir = tempfile::Builder::new()
            .prefix("husk-ctd-")
            .tempdir()
            .expect("creating a temporary directory");
        let base = dir.path();
        crate::stale::record("dir", &base.to_string_lossy());
        let config = base.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{0}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{0}/containerd.sock.ttrpc\"\n",
                base.display()
            ),
        )
        .expect("writing containerd's config");
        let env: Vec<(String, std::ffi::OsString)> = env
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect();
        let child = spawn(base, &env);
        let me = Self {
            namespace: format!("husk-test-{}-{}", std::process::id(), child.id()),
            dir,
            child,
            env,
        };
        me.wait_ready();
        me
    }

    /// containerd's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket().exists() || !self.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not answer on {} within 30 s; its log:\n{}",
                self.socket().display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops containerd (SIGTERM, by PID) and starts it again with the same configuration and
    /// environment, as a node's service manager would; its shims keep running meanwhile.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn(self.dir.path(), &self.env);
        self.wait_ready();
    }

    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// A `ctr` command against this containerd in its namespace, for callers that need its
    /// stdio or want it running in the background.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args);
        c
    }

    /// Runs `ctr` against this containerd in its namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ctr")
    }

    /// `ctr run --rm [--runtime RUNTIME] OPTIONS… IMAGE ID ARGS…` as a command, for callers
    /// that need its stdio or want it in the background: the container runs to its end (ctr's
    /// exit status is the process's) and is deleted after. `runtime` `None` is containerd's
    /// default (runc).
    pub fn run_rm_command(
        &self,
        runtime: Option<&str>,
        options: &[&str],
        image: &str,
        id: &str,
        args: &[&str],
    ) -> Command {
        let mut all = vec!["run", "--rm"];
        if let Some(r) = runtime {
            all.extend(["--runtime", r]);
        }
        all.extend_from_slice(options);
        all.extend([image, id]);
        all.extend_from_slice(args);
        self.ctr_command(&all)
    }

    /// [`Self::run_rm_command`] with stdin from /dev/null, to its end: ctr's output.
    pub fn run_rm(
        &self,
        runtime: Option<&str>,
        options: &[&str],
        image: &str,
        id: &str,
        args: &[&str],
    ) -> Output {
        self.run_rm_command(runtime, options, image, id, args)
            .stdin(Stdio::null())
            .output()
            .expect("running ctr")
    }

    /// [`Self::run_rm`], failing the test with ctr's output unless it succeeds: the stdout.
    pub fn run_rm_ok(
        &self,
        runtime: Option<&str>,
        options: &[&str],
        image: &str,
        id: &str,
        args: &[&str],
    ) -> String {
        let out = self.run_rm(runtime, options, image, id, args);
        assert!(
            out.status.success(),
            "ctr run --rm {image} {id} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Like [`Self::ctr`], failing the test with ctr's output unless it succeeds.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Starts containerd with the configuration in `base`, its output appended to the log there.
fn spawn(base: &Path, env: &[(String, std::ffi::OsString)]) -> Child {
    let bin = require_program("containerd", "containerd");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(base.join("containerd.log"))
        .expect("opening the log");
    Command::new(bin)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("--config")
        .arg(base.join("config.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("starting containerd")
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        // runc (and containerd) remove a task's leaf cgroup but not the namespace's parent
        // directory; this namespace is ours alone, so remove it once it is empty.
        struct CgroupSweep(String);
        impl Drop for CgroupSweep {
            fn drop(&mut self) {
                for entry in std::fs::read_dir("/sys/fs/cgroup")
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let _ = std::fs::remove_dir(entry.path().join(&self.0));
                }
                let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&self.0));
            }
        }
        let _sweep = CgroupSweep(self.namespace.clone());
        self.stop();
        // What a failed test left running under this containerd (a runc task's shim and its
        // overlay rootfs, a husk shim and its sandbox) goes with it.
        let dir = self.dir.path().to_string_lossy().into_owned();
        crate::stale::sweep_dir(self.dir.path());
        // runc's root for this namespace (containerd's runc shim makes it and leaves it).
        let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&self.namespace));
        crate::stale::done("dir", &dir);
    }
}
