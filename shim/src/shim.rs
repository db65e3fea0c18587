//! The shim's life as containerd drives it: `start` (one shim per sandbox), `delete` (cleanup
//! after every teardown, and after a crash), and serving the task API.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::api::DeleteResponse;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config as ShimConfig, ExitSignal, Flags, Shim, StartOpts};

use crate::config::Config;
use crate::sandbox_dir::SandboxDir;
use crate::share;
use crate::task::Service;

/// Exit status `delete` reports for a task whose shim is gone: killed (128 + SIGKILL), as
/// containerd's own shims do.
pub const DELETED_EXIT: u32 = 137;

pub struct HuskShim {
    namespace: String,
    id: String,
    bundle: String,
    exit: Arc<ExitSignal>,
}

impl HuskShim {
    fn bundle(&self) -> PathBuf {
        if self.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&self.bundle)
        }
    }
}

/// Whether `pid` is (still) one of our VM processes, so a recycled PID is never killed.
fn is_vm_process(pid: u32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.starts_with("qemu-system") || name == "husk-vmm" || name == "virtiofsd" || name == "vhost-device-vsock"
}

/// Cleans up after container `id` of the bundle, whatever state the shim left: unmounts its
/// rootfs and volumes; for the sandbox's own container also kills what is left of the VM and
/// removes `/run/husk/<sid>/`. Idempotent.
pub fn cleanup(id: &str, bundle: &Path, config: &Config) -> Result<(), String> {
    let spec = share::read_spec(bundle, id).ok();
    let sid = spec.as_ref().and_then(share::sandbox_of).unwrap_or_else(|| id.to_string());
    let dir = SandboxDir::new(&config.state_root, &sid).map_err(|e| e.to_string())?;
    dir.remove_container(id).map_err(|e| e.to_string())?;
    if sid == id {
        for pid in dir.read_pids() {
            if is_vm_process(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)), nix::sys::signal::Signal::SIGKILL);
            }
        }
        dir.destroy().map_err(|e| e.to_string())?;
    }
    Ok(())
}

impl Shim for HuskShim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        Self {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // Containers of one sandbox share its shim (and so its VM): group by sandbox id.
        let bundle = std::env::current_dir().map_err(|e| containerd_shim::Error::Other(format!("bundle directory: {e}")))?;
        let spec = share::read_spec(&bundle, &opts.id).map_err(|e| containerd_shim::Error::InvalidArgument(e.to_string()))?;
        let grouping = share::sandbox_of(&spec).unwrap_or_else(|| opts.id.clone());
        let (_, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let config = Config::load(None).unwrap_or_default();
        if let Err(e) = cleanup(&self.id, &self.bundle(), &config) {
            // containerd shows this; the response stays valid so its teardown goes on.
            eprintln!("containerd-shim-husk-v2: cleaning up {}: {e}", self.id);
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: DELETED_EXIT,
            exited_at: MessageField::some(Timestamp::now()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        Service::new(&self.namespace, publisher, self.exit.clone())
    }
}

/// Options for containerd-shim's bootstrap: the shim reaps its own children (the VM
/// processes, through `husk-hypervisor`), so the crate's reaper must not steal their exits.
pub fn shim_config() -> ShimConfig {
    ShimConfig {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    }
}
