//! The shim's life as containerd drives it: `start` (one shim per sandbox), `delete` (cleanup
//! after every teardown, and after a crash), and serving the task API.
//!
//! containerd-shim's own bootstrap (`containerd_shim::run`) is not used: version 0.12 speaks
//! only what containerd ≥ 2.0 expects — `start` answers in JSON and the task service is
//! registered as `containerd.task.v3.Task` — while containerd 1.6 (Debian 12's) reads a bare
//! address and calls `containerd.task.v2.Task`. The messages of both versions are the same, so
//! the task service is registered under both names and `start` prints the bare address, which
//! every containerd understands. The crate's pieces (flags, spawn, logger, the generated
//! service) are still used; events go out through `task::events` (an async ttrpc client:
//! the crate's sync publisher polls its socket every 10 ms).

use std::io::Write;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::api::DeleteResponse;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::shim::shim_ttrpc::create_task;
use containerd_shim::protos::ttrpc::Server;
use containerd_shim::{ExitSignal, Flags, StartOpts, Task};

use crate::config::Config;
use crate::sandbox_dir::SandboxDir;
use crate::share;
use crate::task::Service;

/// Exit status `delete` reports for a task whose shim is gone: killed (128 + SIGKILL), as
/// containerd's own shims do.
pub(crate) const DELETED_EXIT: u32 = 137;

const TASK_V3: &str = "/containerd.task.v3.Task/";
const TASK_V2: &str = "/containerd.task.v2.Task/";

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0}")]
    Shim(#[from] containerd_shim::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimError {
    let what = what.into();
    move |source| ShimError::Io { what, source }
}

/// Whether `pid` is (still) one of our VM processes, so a recycled PID is never killed: it
/// runs the program recorded with its PID (a configured `qemu_path` may have any name), or
/// one of the VM programs' usual names.
fn is_vm_process(pid: u32, recorded: Option<&Path>) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    if recorded.is_some_and(|r| r == exe) {
        return true;
    }
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.starts_with("qemu-system")
        || name == "husk-vmm"
        || name == "virtiofsd"
        || name == "vhost-device-vsock"
}

/// Cleans up after container `id` of the bundle, whatever state the shim left: unmounts its
/// rootfs and volumes; for the sandbox's own container also kills what is left of the VM and
/// removes `/run/husk/<sid>/`. Idempotent, and safe to run twice at once (containerd's
/// cleanup of a dead shim and a `ctr task delete` can overlap). Every step is tried even when
/// one before it failed: a step that fails must not leave the others' resources behind.
pub fn cleanup(id: &str, bundle: &Path, config: &Config) -> Result<(), String> {
    let spec = share::read_spec(bundle, id).ok();
    let sid = spec
        .as_ref()
        .and_then(|s| share::sandbox_of(s).ok().flatten())
        .unwrap_or_else(|| id.to_string());
    let dir = SandboxDir::new(&config.state_root, &sid).map_err(|e| e.to_string())?;
    let mut failed: Vec<String> = Vec::new();
    if sid == id {
        // The VM first, so that nothing of it still uses the share while it is taken apart.
        end_vm_processes(&dir);
    }
    if let Err(e) = dir.remove_container(id) {
        failed.push(e.to_string());
    }
    if sid == id {
        if let Err(e) = dir.destroy() {
            failed.push(e.to_string());
        }
        if let Some(p) = spec
            .as_ref()
            .and_then(|s| s["linux"]["cgroupsPath"].as_str())
        {
            crate::host_cgroup::remove(p);
        }
        if let Some(spec) = &spec {
            if let Err(e) = crate::network::cleanup_leftovers(spec) {
                failed.push(crate::network::chain(&e));
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// How long `cleanup` waits for the killed VM's processes to be gone.
const VM_EXIT_PATIENCE: Duration = Duration::from_secs(2);

/// Kills the VM processes the sandbox recorded (still alive when its shim was killed) and
/// waits, up to [`VM_EXIT_PATIENCE`], until they are gone.
fn end_vm_processes(dir: &SandboxDir) {
    let alive = |pids: &[(u32, Option<PathBuf>)]| -> Vec<(u32, Option<PathBuf>)> {
        pids.iter()
            .filter(|(pid, exe)| is_vm_process(*pid, exe.as_deref()))
            .cloned()
            .collect()
    };
    let mut left = alive(&dir.read_pids());
    for (pid, _) in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(*pid).unwrap_or(0)),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = std::time::Instant::now() + VM_EXIT_PATIENCE;
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left = alive(&left);
    }
}

/// `start`: spawns the sandbox's shim and returns its address. Containers of one sandbox
/// share its shim, and so its VM: the socket is keyed by the sandbox id, and a second shim
/// for the same sandbox finds the socket served and exits.
pub fn start(flags: &Flags) -> Result<String, ShimError> {
    let bundle = std::env::current_dir().map_err(io_err("the bundle directory"))?;
    let spec = share::read_spec(&bundle, &flags.id).map_err(|e| ShimError::Other(e.to_string()))?;
    let grouping = share::sandbox_of(&spec)
        .map_err(|e| ShimError::Other(e.to_string()))?
        .unwrap_or_else(|| flags.id.clone());
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    let (_, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
    containerd_shim::util::write_address(&address)?;
    Ok(address)
}

/// `delete`: cleans up and answers with a valid exit record, even when there was nothing to
/// clean (it runs on every teardown).
pub fn delete(flags: &Flags) -> DeleteResponse {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().unwrap_or_default()
    } else {
        PathBuf::from(&flags.bundle)
    };
    let config = Config::load(None).unwrap_or_default();
    if let Err(e) = cleanup(&flags.id, &bundle, &config) {
        // containerd logs stderr; the response stays valid so its teardown goes on.
        eprintln!("containerd-shim-husk-v2: cleaning up {}: {e}", flags.id);
    }
    remove_dead_socket(&bundle);
    DeleteResponse {
        pid: 0,
        exit_status: DELETED_EXIT,
        exited_at: MessageField::some(Timestamp::now()),
        ..Default::default()
    }
}

/// The shim's task socket (the bundle's `address`, which containerd wrote) once no shim
/// serves it any more: a shim killed with SIGKILL cannot remove its own, and containerd leaves
/// it to the shim's `delete`, as containerd's runc shim does. A socket something still
/// accepts on (the sandbox's shim serving its other containers) stays.
fn remove_dead_socket(bundle: &Path) {
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else {
        return;
    };
    let path = Path::new(socket_path(address.trim()));
    let is_socket = std::fs::symlink_metadata(path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
    if is_socket
        && UnixStream::connect(path)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    {
        let _ = std::fs::remove_file(path);
    }
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Serves the task API on `flags.socket` until the service says the sandbox is gone.
pub fn serve(flags: &Flags) -> Result<(), ShimError> {
    let path = socket_path(&flags.socket).to_string();
    // Whatever happens next, the `start` process waiting on our stdout must be released.
    let _release = ReleaseOnDrop;
    if let Some(parent) = Path::new(&path).parent() {
        std::fs::create_dir_all(parent)
            .map_err(io_err(format!("creating {}", parent.display())))?;
    }
    let listener = match std::os::unix::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // Another container of a sandbox whose shim already runs: that shim serves it.
            if UnixStream::connect(&path).is_ok() {
                return Ok(());
            }
            std::fs::remove_file(&path)
                .map_err(io_err(format!("removing the stale socket {path}")))?;
            std::os::unix::net::UnixListener::bind(&path)
                .map_err(io_err(format!("binding {path}")))?
        }
        Err(e) => return Err(io_err(format!("binding {path}"))(e)),
    };
    // The log level of the default configuration (HUSK_CONFIG or /etc/husk/config.toml): a
    // per-runtime config path only arrives with the first Create, after logging has started.
    let level = Config::load(None)
        .map(|c| c.log_level)
        .unwrap_or_else(|_| "info".into());
    containerd_shim::logger::init(flags.debug, &level, &flags.namespace, &flags.id)?;
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").map_err(|_| {
        ShimError::Other("TTRPC_ADDRESS is not set: the shim must be started by containerd".into())
    })?;
    let publisher = crate::task::events::Publisher::connect(&ttrpc_address)?;
    let exit = Arc::new(ExitSignal::default());
    let task: Arc<dyn Task + Send + Sync> =
        Arc::new(Service::new(&flags.namespace, publisher, exit.clone()));
    let mut methods = create_task(task.clone());
    let v2: Vec<_> = create_task(task)
        .into_iter()
        .map(|(name, handler)| (name.replacen(TASK_V3, TASK_V2, 1), handler))
        .collect();
    methods.extend(v2);
    let mut server = Server::new()
        .add_listener(listener.into_raw_fd())
        .map_err(|e| ShimError::Other(format!("ttrpc listener on {path}: {e}")))?
        .register_service(methods);
    server
        .start()
        .map_err(|e| ShimError::Other(format!("starting the ttrpc server on {path}: {e}")))?;
    release_starter();
    log::info!("shim {} serving on {path}", flags.id);
    exit.wait();
    // The sandbox is gone by now (Shutdown destroyed it): the server's own shutdown is all that
    // is left, and it is bounded (see `SERVER_SHUTDOWN_BOUND`).
    if !finishes_within(SERVER_SHUTDOWN_BOUND, move || server.shutdown()) {
        log::warn!(
            "shim {}: the ttrpc server's shutdown did not finish within {SERVER_SHUTDOWN_BOUND:?} \
             (a connection thread of ttrpc's sync server missed its wakeup); exiting anyway",
            flags.id
        );
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// How long the shim waits for ttrpc's sync server to shut down before it exits anyway.
/// `ttrpc` 0.10's `Server::shutdown` joins its reaper thread, which joins every connection's
/// handler thread. In 3 of 13 runs of bench scenario 12 (some 80 husk shims each; 2 of 8 with
/// the warm pool's agent-connection change, 1 of 5 without it) one shim stayed after its container
/// was removed: its stacks (gdb) showed the main thread joining the reaper, one connection's
/// `client_handler` waiting on its control channel and that connection's writer on its
/// response channel, the reader and the workers gone, i.e. a wakeup the handler never got.
/// Its normal shutdown takes milliseconds; the sandbox is already destroyed when it starts.
const SERVER_SHUTDOWN_BOUND: Duration = Duration::from_secs(1);

/// Runs `f` on a thread of its own and waits at most `bound` for it: `true` if it finished.
/// A `f` that does not finish is left running (the caller is about to exit).
fn finishes_within(bound: Duration, f: impl FnOnce() + Send + 'static) -> bool {
    let (done, finished) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("server-shutdown".into())
        .spawn(move || {
            f();
            let _ = done.send(());
        });
    spawned.is_ok() && finished.recv_timeout(bound).is_ok()
}

/// `start` waits until the served shim closes its stdout (containerd-shim's `spawn` copies
/// it): point fd 1 at stderr, as containerd's own shims do, once the server is up.
fn release_starter() {
    // SAFETY: dup2 on the process's own standard descriptors; no Rust object owns fd 1
    // (stdout is only ever written through std's lock, which tolerates the swap).
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}

struct ReleaseOnDrop;

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        release_starter();
    }
}

/// The whole binary: dispatches containerd's actions, `console` (for people, see
/// [`crate::debug_console`]) and `monitor` (the node's metrics, see [`crate::monitor`]).
/// Returns the exit code.
pub fn main(args: &[std::ffi::OsString]) -> i32 {
    if args.get(1).is_some_and(|a| a == "console") {
        return crate::debug_console::main(args.get(2..).unwrap_or_default());
    }
    if args.get(1).is_some_and(|a| a == "monitor") {
        return crate::monitor::main(args.get(2..).unwrap_or_default());
    }
    if args.get(1).is_some_and(|a| a == "pool") {
        return crate::pool::main(args.get(2..).unwrap_or_default());
    }
    if args.get(1).is_some_and(|a| a == "pool-keeper") {
        return crate::pool::keeper::main(args.get(2..).unwrap_or_default());
    }
    let flags = match containerd_shim::parse(args.get(1..).unwrap_or_default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: {e}");
            return 2;
        }
    };
    if flags.version {
        println!("containerd-shim-husk-v2 {}", env!("CARGO_PKG_VERSION"));
        return 0;
    }
    match flags.action.as_str() {
        "start" => match start(&flags) {
            Ok(address) => {
                print!("{address}");
                0
            }
            Err(e) => {
                eprintln!("containerd-shim-husk-v2 start: {e}");
                1
            }
        },
        "delete" => {
            let resp = delete(&flags);
            let mut out = std::io::stdout().lock();
            match resp.write_to_bytes() {
                Ok(bytes) if out.write_all(&bytes).is_ok() => 0,
                _ => 1,
            }
        }
        _ if flags.namespace.is_empty() || flags.socket.is_empty() => {
            eprintln!("containerd-shim-husk-v2: started by hand? containerd runs it with -namespace, -id, -address and -socket; `containerd-shim-husk-v2 console <sandbox-id>` attaches to a sandbox's debug console; `containerd-shim-husk-v2 monitor` serves the node's metrics");
            2
        }
        _ => match serve(&flags) {
            Ok(()) => 0,
            Err(e) => {
                log::error!("shim {}: {e}", flags.id);
                eprintln!("containerd-shim-husk-v2: {e}");
                1
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_shutdown_that_hangs_is_given_up_on_after_its_bound() {
        assert!(finishes_within(Duration::from_secs(5), || {}));
        let t = Instant::now();
        let (_keep, never) = std::sync::mpsc::channel::<()>();
        assert!(!finishes_within(Duration::from_millis(200), move || {
            let _ = never.recv();
        }));
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }
}
