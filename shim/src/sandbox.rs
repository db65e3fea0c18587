//! A sandbox: one VM, its state directory and its agent.
//!
//! Bring-up on the first container: create `/run/husk/<sid>/` and its shared mount, start the
//! VM through `husk-hypervisor` (backend from the configuration; `auto` is what `doctor` says),
//! connect to the agent with a deadline, `CreateSandbox`. A failure at any step tears down
//! everything started before it, and its error carries the tail of the guest console.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use husk_hypervisor::host::{self, BackendChoice};
use husk_hypervisor::husk_vmm::HuskVmm;
use husk_hypervisor::jail::{JailIds, JailSpec};
use husk_hypervisor::qemu::Qemu;
use husk_hypervisor::{Accel, Hypervisor, Programs, Vm, VmConfig};
use husk_protocols::agent::{CreateSandboxRequest, DestroySandboxRequest};
use serde_json::Value;

use crate::agent::{self, Agent};
use crate::config::{Backend, Config};
use crate::debug_console;
use crate::host_cgroup::HostCgroup;
use crate::network::Network;
use crate::sandbox_dir::SandboxDir;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A step of the bring-up failed; the message carries the whole cause (only text reaches
    /// containerd), the source keeps it typed.
    #[error("sandbox {sid}: {step}: {}", crate::error::chain(source))]
    Step {
        sid: String,
        step: &'static str,
        #[source]
        source: Box<StepSource>,
    },
    #[error("sandbox {sid}: {step}: {message}\n--- last lines of the guest console ({console}) ---\n{tail}")]
    Guest {
        sid: String,
        step: &'static str,
        message: String,
        console: PathBuf,
        tail: String,
    },
}

/// What made a step of the bring-up fail.
#[derive(Debug, thiserror::Error)]
pub enum StepSource {
    /// The pod or the state asks for what the shim refuses; the text says why and the fix.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Dir(#[from] crate::sandbox_dir::DirError),
    #[error(transparent)]
    Cgroup(#[from] crate::host_cgroup::CgroupError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error(transparent)]
    Hypervisor(#[from] husk_hypervisor::Error),
    #[error("{}: {source}", path.display())]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The VM thread ended without a word.
    #[error(transparent)]
    VmThread(#[from] mpsc::RecvError),
}

impl From<String> for StepSource {
    fn from(why: String) -> Self {
        Self::Refused(why)
    }
}

/// vCPUs and memory for a sandbox: the configured base plus the pod's limits.
/// Pod annotations (passed through containerd's `pod_annotations = ["io.husk.*"]`) that size a
/// sandbox's VM: extra vCPUs and MiB on top of the configured base, for pods whose containers'
/// limits are only known after the sandbox exists (the VM's size is fixed at boot).
pub const ANNOTATION_EXTRA_VCPUS: &str = "io.husk.extra-vcpus";
pub const ANNOTATION_EXTRA_MEMORY_MIB: &str = "io.husk.extra-memory-mib";

/// A sandbox whose spec shares one of the host's namespaces (no `network`, `ipc` or `pid`
/// entry in `linux.namespaces`: CRI's hostNetwork, hostIPC, hostPID, or `ctr run --net-host`)
/// asks for something a VM cannot give: its processes run in the guest, never in the node's
/// namespaces. Refused, naming the field, rather than silently given the guest's own.
pub fn host_namespaces(spec: &Value) -> Result<(), String> {
    let Some(list) = spec["linux"]["namespaces"].as_array() else {
        return Ok(());
    };
    let has = |kind: &str| list.iter().any(|n| n["type"].as_str() == Some(kind));
    for (kind, field) in [
        ("network", "hostNetwork (or ctr run --net-host)"),
        ("ipc", "hostIPC"),
        ("pid", "hostPID"),
    ] {
        if !has(kind) {
            return Err(format!(
                "linux.namespaces: no {kind} namespace, i.e. the pod asks for the host's ({field}): a husk pod runs in its own VM and cannot share the node's {kind} namespace — remove {field} from the pod, or run it with runc"
            ));
        }
    }
    Ok(())
}

/// The host's CPU count and memory (MiB): the default bounds of annotation-driven sizes.
fn host_size() -> (u32, u32) {
    let cpus = std::thread::available_parallelism()
        .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    (cpus, u32::try_from(mem_kib / 1024).unwrap_or(u32::MAX))
}

/// vCPUs and memory for a sandbox: the configured base, plus the pod's limits, plus the
/// annotations the configuration enables, within `max_vcpus`/`max_memory_mib`. A pod
/// annotation that is not enabled, not a number, or past a bound is refused with the
/// annotation, the value and the bound.
pub fn size_for(config: &Config, spec: &Value) -> Result<(u32, u32), String> {
    let res = &spec["linux"]["resources"];
    let quota = res["cpu"]["quota"].as_i64().unwrap_or(0);
    let period = res["cpu"]["period"].as_u64().unwrap_or(0);
    let extra_cpus = if quota > 0 && period > 0 {
        u32::try_from((quota.unsigned_abs()).div_ceil(period)).unwrap_or(u32::MAX)
    } else {
        0
    };
    let limit = res["memory"]["limit"].as_i64().unwrap_or(0);
    let extra_mib = if limit > 0 {
        u32::try_from(limit.unsigned_abs().div_ceil(1 << 20)).unwrap_or(u32::MAX)
    } else {
        0
    };
    let annotations = spec["annotations"].as_object();
    for key in annotations.into_iter().flat_map(|a| a.keys()) {
        if key.starts_with("io.husk.")
            && key != crate::share::ANNOTATION_SANDBOX_ID
            && !config.enable_annotations.iter().any(|k| k == key)
        {
            return Err(format!(
                "annotation {key}: not enabled in {} (enable_annotations = {:?}) — remove it from the pod, or ask the node's admin to enable it",
                config.source_name(),
                config.enable_annotations
            ));
        }
    }
    let annotation = |key: &str| -> Result<u32, String> {
        if !config.enable_annotations.iter().any(|k| k == key) {
            return Ok(0);
        }
        match spec["annotations"][key].as_str() {
            None => Ok(0),
            Some(v) => v.trim().parse::<u32>().map_err(|e| {
                format!(
                    "annotation {key} = {}: not a whole number ({e})",
                    crate::share::shown(v)
                )
            }),
        }
    };
    let (host_cpus, host_mib) = host_size();
    let max_cpus = match config.max_vcpus {
        0 => host_cpus,
        n => n,
    }
    .min(husk_hypervisor::MAX_VCPUS);
    let max_mib = match config.max_memory_mib {
        0 => host_mib,
        n => n,
    };
    let ann_cpus = annotation(ANNOTATION_EXTRA_VCPUS)?;
    let ann_mib = annotation(ANNOTATION_EXTRA_MEMORY_MIB)?;
    let vcpus = config
        .vcpus
        .saturating_add(extra_cpus)
        .saturating_add(ann_cpus);
    let mib = config
        .memory_mib
        .saturating_add(extra_mib)
        .saturating_add(ann_mib);
    if ann_cpus > 0 && vcpus > max_cpus {
        return Err(format!(
            "annotation {ANNOTATION_EXTRA_VCPUS} = {ann_cpus}: the VM would get {vcpus} vCPUs, more than max_vcpus = {max_cpus} — ask for fewer"
        ));
    }
    if ann_mib > 0 && mib > max_mib {
        return Err(format!(
            "annotation {ANNOTATION_EXTRA_MEMORY_MIB} = {ann_mib}: the VM would get {mib} MiB, more than max_memory_mib = {max_mib} — ask for less"
        ));
    }
    Ok((
        vcpus.clamp(1, max_cpus.max(1)),
        mib.min(max_mib.max(husk_hypervisor::MIN_MEMORY_MIB)),
    ))
}

/// The backend for a sandbox: the configured one, or for `auto` what `doctor` says this host
/// runs best (husk-vmm on hardware KVM, pods with a network included: it takes their tap
/// fds). It runs the configured `programs`.
pub(crate) fn backend(
    config: &Config,
    programs: &Programs,
) -> Result<Box<dyn Hypervisor + Send>, husk_hypervisor::Error> {
    // Probed at every sandbox start, not cached: `detect` (open /dev/kvm, create a VM and a
    // vCPU, read /proc/cpuinfo) measured 0.7 ms median, 1.6 ms at most over 90 calls on the
    // 2-core kvm_pvm development host — nothing next to a VM boot, and a cache would need
    // invalidating when KVM modules change. Needed where the backend is chosen here, and
    // under TCG for the TSC rate the guest is told.
    let report = matches!(config.backend, Backend::Auto | Backend::QemuTcg).then(host::detect);
    let choice = match config.backend {
        Backend::QemuKvm => BackendChoice::Qemu(Accel::Kvm),
        Backend::QemuTcg => BackendChoice::Qemu(Accel::Tcg),
        Backend::HuskVmm => BackendChoice::HuskVmm,
        Backend::Auto => report
            .as_ref()
            .map_or_else(|| host::detect().backend, |r| r.backend),
    };
    if choice == BackendChoice::Qemu(Accel::Tcg) {
        if !config.allow_emulation {
            return Err(husk_hypervisor::Error::Config(format!(
                "{}: allow_emulation = false, and this sandbox would run under QEMU's TCG emulator \
                 (backend {}; no KVM that runs our guest here) — run it on a host with hardware \
                 KVM, or set allow_emulation = true to accept the emulator as the boundary",
                config.source_name(),
                config.backend
            )));
        }
        log::warn!(
            "the guest runs under QEMU's TCG emulator: the boundary is then the emulator, which \
             QEMU's security policy does not cover (set allow_emulation = false to refuse this)"
        );
    }
    Ok(match choice {
        BackendChoice::Qemu(accel) => {
            let mut q = Qemu::with_programs(accel, programs)?;
            q.tcg_buffer_mib = config.tcg_buffer_mib;
            q.guest_tsc_khz = report.and_then(|r| r.guest_tsc_khz);
            Box::new(q)
        }
        BackendChoice::HuskVmm => Box::new(HuskVmm::with_programs(programs)?),
    })
}

/// The sandbox's jail: its own uid/gid (claimed under the state root, released with the
/// sandbox), which then owns the VM's state directory.
pub(crate) fn jail_for(
    config: &Config,
    sid: &str,
    dir: &SandboxDir,
) -> Result<JailSpec, SandboxError> {
    let fail = |source: StepSource| SandboxError::Step {
        sid: sid.to_string(),
        step: "preparing the VM's jail",
        source: Box::new(source),
    };
    let id = JailIds::new(&config.state_root)
        .claim(sid)
        .map_err(|e| fail(e.into()))?;
    let vm = dir.vm();
    if let Err(source) = std::os::unix::fs::lchown(&vm, Some(id), Some(id)) {
        return Err(fail(StepSource::Path { path: vm, source }));
    }
    Ok(JailSpec {
        uid: id,
        gid: id,
        root: dir.jail_root(),
    })
}

/// The VM while a bring-up may still fail: dropped, it kills the VM (every failure after the
/// VM started ends it, whatever the step); [`KillOnDrop::keep`] hands it on once the sandbox
/// is up.
struct KillOnDrop(Option<Box<dyn Vm>>);

impl KillOnDrop {
    fn keep(mut self) -> Box<dyn Vm> {
        self.0.take().expect("a KillOnDrop holds its VM until kept")
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Box<dyn Vm>;
    fn deref(&self) -> &Self::Target {
        self.0
            .as_ref()
            .expect("a KillOnDrop holds its VM until kept")
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0
            .as_mut()
            .expect("a KillOnDrop holds its VM until kept")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(vm) = self.0.as_mut() {
            let _ = vm.kill();
        }
    }
}

/// What the guest's kernel command line gets beyond the base: the debug console's parameters
/// (its shell shared first), then the configured ones, which win.
fn cmdline_extra(
    config: &Config,
    prepared: &Prepared,
    dir: &SandboxDir,
    sid: &str,
) -> Result<String, SandboxError> {
    let mut extra = String::new();
    if let Some(shell) = &prepared.debug_shell {
        debug_console::share_shell(dir, shell).map_err(|source| {
            step_error(sid, "sharing the debug console's shell")(StepSource::Path {
                path: shell.clone(),
                source,
            })
        })?;
        extra = debug_console::kernel_params();
    }
    // The configured parameters last: they win over the debug console's loglevel.
    if !config.kernel_params.trim().is_empty() {
        if !extra.is_empty() {
            extra.push(' ');
        }
        extra.push_str(config.kernel_params.trim());
    }
    Ok(extra)
}

/// A VM [`boot_cold`] started: dropping `keep` ends the thread its processes are tied to.
struct ColdVm {
    vm: Box<dyn Vm>,
    backend: String,
    keep: mpsc::Sender<()>,
}

/// Boots a VM for the sandbox (not from the pool): the backend, the jail, then the backend's
/// start on a thread that lives as long as the sandbox — the VM's processes die with the
/// thread that started them, which ends when the returned `keep` sender is dropped. That
/// thread enters the pod's host cgroup first (`cgroup`), so the VM's processes are born in it.
fn boot_cold(
    config: &Config,
    prepared: &Prepared,
    dir: &SandboxDir,
    sid: &str,
    cmdline_extra: String,
    (vcpus, memory_mib): (u32, u32),
    (nets, cgroup): (
        Vec<husk_hypervisor::NetConfig>,
        Option<crate::host_cgroup::Entry>,
    ),
) -> Result<ColdVm, SandboxError> {
    let backend =
        backend(config, &prepared.programs).map_err(step_error(sid, "choosing the hypervisor"))?;
    let jail = if config.jail {
        Some(jail_for(config, sid, dir)?)
    } else {
        None
    };
    let vm_config = VmConfig {
        kernel: config.kernel.clone(),
        initramfs: config.initramfs.clone(),
        cmdline_extra,
        vcpus,
        memory_mib,
        state_dir: dir.vm(),
        shared_dir: Some(dir.shared()),
        vsock: true,
        nets,
        jail,
    };
    let backend_name = backend.name();
    let (vm_tx, vm_rx) = mpsc::channel();
    let (keep_tx, keep_rx) = mpsc::channel::<()>();
    let thread_sid = sid.to_string();
    std::thread::Builder::new()
        .name(format!("vm-{sid}"))
        .spawn(move || {
            // Into the pod's host cgroup first: what this thread starts is born there.
            if let Some(Err(e)) = cgroup.map(|c| c.enter()) {
                let _ = vm_tx.send(Err(step_error(&thread_sid, "host cgroup")(e)));
                return;
            }
            let started = backend.start(&vm_config);
            let _ = vm_tx.send(started.map_err(step_error(&thread_sid, "starting the VM")));
            let _ = keep_rx.recv();
        })
        .map_err(step_error(sid, "starting the VM thread"))?;
    match vm_rx.recv() {
        Ok(Ok(vm)) => Ok(ColdVm {
            vm,
            backend: backend_name,
            keep: keep_tx,
        }),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(step_error(sid, "starting the VM")(e)),
    }
}

/// How a failure of `step` becomes the sandbox's error.
fn step_error<E: Into<StepSource>>(
    sid: &str,
    step: &'static str,
) -> impl FnOnce(E) -> SandboxError {
    let sid = sid.to_string();
    move |e| SandboxError::Step {
        sid,
        step,
        source: Box::new(e.into()),
    }
}

/// What `start` checked before creating anything, for `start_in`.
struct Prepared {
    programs: Programs,
    /// The debug console's shell, when `debug_console` is on.
    debug_shell: Option<PathBuf>,
}

pub struct Sandbox {
    pub id: String,
    pub dir: SandboxDir,
    vm: Mutex<Box<dyn Vm>>,
    pub vm_pid: u32,
    /// For a VM from the warm pool: its keeper's pid (the VM's processes are under it).
    pub keeper_pid: Option<u32>,
    pub agent: Agent,
    pub backend: String,
    /// Taps and tc redirects in the pod netns (empty without one).
    network: Mutex<Network>,
    /// Dropping it ends the thread the VM processes are tied to (see `Hypervisor::start`).
    keeper: Mutex<Option<mpsc::Sender<()>>>,
    destroyed: std::sync::atomic::AtomicBool,
    cgroup: Mutex<Option<HostCgroup>>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("vm_pid", &self.vm_pid)
            .finish()
    }
}

/// `what at N ms` for each step of a bring-up (times since its start: network setup since
/// the bring-up's, the rest since the VM was started or claimed), then the total.
fn steps_text(steps: &[(&str, Duration)], total: Duration) -> String {
    let mut parts: Vec<String> = steps
        .iter()
        .map(|(what, at)| format!("{what} at {} ms", at.as_millis()))
        .collect();
    parts.push(format!("bring-up {} ms", total.as_millis()));
    parts.join(", ")
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// The console tail, followed by what the VM's helpers logged (QEMU, virtiofsd,
/// vhost-device-vsock, husk-vmm): the state directory goes with the failed sandbox.
fn helper_logs(state: &std::path::Path, console_tail: &str) -> String {
    let mut out = console_tail.to_string();
    let Ok(entries) = std::fs::read_dir(state) else {
        return out;
    };
    let mut logs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log") && !p.ends_with("console.log"))
        .collect();
    logs.sort();
    for log in logs {
        let tail = husk_hypervisor::console::tail(&log, 10);
        if !tail.trim().is_empty() {
            out.push_str(&format!(
                "\n--- {} ---\n{tail}",
                log.file_name().unwrap_or_default().to_string_lossy()
            ));
        }
    }
    out
}

impl Sandbox {
    pub fn start(
        config: &Config,
        id: &str,
        spec: &Value,
        hostname: &str,
    ) -> Result<Self, SandboxError> {
        // What the spec asks for that a VM cannot give is refused before anything exists.
        host_namespaces(spec).map_err(step_error(id, "checking the pod's namespaces"))?;
        let (vcpus, memory_mib) =
            size_for(config, spec).map_err(step_error(id, "sizing the VM from the pod"))?;
        // The configuration's programs first: a wrong path fails here, before anything exists.
        let programs = config.programs().map_err(step_error(id, "configuration"))?;
        let debug_shell = config
            .debug_shell()
            .map_err(step_error(id, "configuration"))?;
        let dir =
            SandboxDir::new(&config.state_root, id).map_err(step_error(id, "state directory"))?;
        if dir.root().exists() {
            return Err(step_error(id, "state directory")(format!(
                "{} exists: another shim runs this sandbox, or a dead one was not cleaned up (`ctr task delete` runs the cleanup)",
                dir.root().display()
            )));
        }
        let prepared = Prepared {
            programs,
            debug_shell,
        };
        // A VM from the warm pool if one of this sandbox's exact shape is ready; its state
        // directory is then already ours (the holder renamed it to this sandbox's).
        if let Some(pooled) = crate::pool::client::claim(config, id, spec, vcpus, memory_mib) {
            let vmid = pooled.claimed.vmid.clone();
            match Self::start_with(config, &prepared, id, spec, hostname, &dir, Some(pooled)) {
                Ok(s) => return Ok(s),
                Err(e) => log::warn!("sandbox {id}: pooled VM {vmid} failed, booting cold: {e}"),
            }
        }
        Self::start_with(config, &prepared, id, spec, hostname, &dir, None)
    }

    /// The sandbox directory (unless a pooled VM brought it), the host cgroup, then
    /// [`Self::start_in`]; undoes all of it on failure.
    fn start_with(
        config: &Config,
        prepared: &Prepared,
        id: &str,
        spec: &Value,
        hostname: &str,
        dir: &SandboxDir,
        pooled: Option<crate::pool::client::Pooled>,
    ) -> Result<Self, SandboxError> {
        if pooled.is_none() {
            dir.create().map_err(|e| {
                let _ = dir.destroy();
                step_error(id, "state directory")(e)
            })?;
        }
        let bring_up = std::time::Instant::now();
        // The pod's host cgroup first: the thread that starts a cold VM enters it, so the
        // VM's processes are born inside; the shim itself and a pooled VM's processes (its
        // keeper and all below it) are moved in while the VM boots or is taken over
        // (`HostCgroup::settle`, waited for before the sandbox is up).
        let cgroup = match spec["linux"]["cgroupsPath"]
            .as_str()
            .filter(|p| !p.is_empty())
        {
            Some(p) => match HostCgroup::create(p) {
                Ok(c) => Some(c),
                Err(e) => {
                    drop(pooled);
                    let _ = dir.destroy();
                    return Err(step_error(id, "host cgroup")(e));
                }
            },
            None => None,
        };
        let started = Self::start_in(
            config,
            prepared,
            (id, spec, hostname),
            dir.clone(),
            pooled,
            (cgroup.as_ref(), bring_up),
        );
        match started {
            Ok(mut s) => {
                s.cgroup = Mutex::new(cgroup);
                Ok(s)
            }
            Err(e) => {
                if let Some(mut c) = cgroup {
                    c.leave();
                }
                let _ = dir.destroy();
                Err(e)
            }
        }
    }

    /// The bring-up proper: network, VM (cold or claimed), agent. `bring_up`: when the
    /// sandbox's start began (its host cgroup made since).
    fn start_in(
        config: &Config,
        prepared: &Prepared,
        (id, spec, hostname): (&str, &Value, &str),
        dir: SandboxDir,
        pooled: Option<crate::pool::client::Pooled>,
        (cgroup, bring_up): (Option<&HostCgroup>, std::time::Instant),
    ) -> Result<Self, SandboxError> {
        let sid = id.to_string();
        let keeper_pid = pooled.as_ref().map(|p| p.claimed.keeper_pid);
        let cgroup_made = bring_up.elapsed();
        let (vcpus, memory_mib) =
            size_for(config, spec).map_err(step_error(&sid, "sizing the VM from the pod"))?;
        let cmdline_extra = cmdline_extra(config, prepared, &dir, &sid)?;
        // Before the VM: it gets the taps. Dropped (torn down) on any failure below.
        let network = match &pooled {
            // A pooled VM's taps are moved in from its keeper's network namespace.
            Some(p) => Network::setup_pooled(
                spec,
                Path::new(&format!("/proc/{}/ns/net", p.claimed.keeper_pid)),
                &p.claimed.nics,
            ),
            None => Network::setup(spec),
        }
        .map_err(step_error(&sid, "setting up the pod network"))?;
        let nets = network.vm_nets();
        let vm_started = std::time::Instant::now();
        // Where the bring-up's time goes, for the log line below (#17's breakdown).
        let mut steps: Vec<(&str, Duration)> = vec![
            ("host cgroup made", cgroup_made),
            ("network setup", bring_up.elapsed()),
        ];
        let pooled_vm = pooled.as_ref().map(|p| p.claimed.vmid.clone());
        let mut pooled = pooled;
        let kept_agent = pooled.as_mut().and_then(|p| p.agent.take());
        let (vm, backend_name, keep_tx): (Box<dyn Vm>, String, Option<mpsc::Sender<()>>) =
            match pooled {
                // Claimed: its NICs' taps are already the VM's (moved in above).
                Some(p) => (Box::new(p.vm), p.claimed.backend, None),
                None => {
                    let cold = boot_cold(
                        config,
                        prepared,
                        &dir,
                        &sid,
                        cmdline_extra,
                        (vcpus, memory_mib),
                        (nets, cgroup.map(HostCgroup::entry)),
                    )?;
                    (cold.vm, cold.backend, Some(cold.keep))
                }
            };
        steps.push((
            if pooled_vm.is_some() {
                "claimed VM taken over"
            } else {
                "VM started"
            },
            vm_started.elapsed(),
        ));
        // The rest of the cgroup moves meanwhile: the shim, and the VM's processes where they
        // were not born inside. Dropped on a failure below, it is waited for first.
        let settling = cgroup.map(|c| c.settle(keeper_pid.unwrap_or_else(std::process::id)));
        // From here on, a failure kills the VM (then the VM thread and the network go, as they
        // are dropped after it).
        let mut vm = KillOnDrop(Some(vm));
        let console = vm.console_log().to_path_buf();
        let root = dir.vm();
        let guest_err = |step: &'static str, message: String| SandboxError::Guest {
            sid: id.to_string(),
            step,
            message,
            tail: helper_logs(&root, &husk_hypervisor::console::tail(&console, 20)),
            console: console.clone(),
        };
        let vm_pid = vm.pid();
        let _ = dir.write_pids(&[vm_pid]);
        let record = debug_console::Record {
            debug_console: prepared.debug_shell.is_some(),
            config: config.source_name(),
            vsock_socket: vm.vsock_socket().map(PathBuf::from),
        };
        if let Err(e) = record.write(&dir) {
            log::warn!("sandbox {id}: recording the debug console's state: {e}");
        }
        let Some(socket) = vm.vsock_socket().map(PathBuf::from) else {
            return Err(guest_err(
                "connecting to the agent",
                "the VM has no vsock device".into(),
            ));
        };
        // Connect only once the agent has said on the console that it serves: a connection
        // attempted while the guest's vsock driver is still coming up has been seen to leave
        // vhost-device-vsock never answering later ones. Waiting on the console also reports a
        // VM that dies while booting (a kernel panic, a crashed helper) at once.
        let timeout = Duration::from_secs(config.agent_timeout_secs);
        let deadline = std::time::Instant::now() + timeout;
        let ready = husk_hypervisor::console::wait_for_ready(vm.as_mut(), timeout);
        if let Err(e) = &ready {
            let ended = vm.wait(Some(Duration::ZERO)).ok().flatten();
            let what = match ended {
                Some(status) => format!("the VM ended ({status}) before its agent answered"),
                None => format!(
                    "the agent did not answer within {timeout:?} (agent_timeout_secs): {}",
                    first_line(&e.to_string())
                ),
            };
            return Err(guest_err("connecting to the agent", what));
        }
        let vm_boot = vm_started.elapsed();
        steps.push(("agent ready", vm_boot));
        let left = deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_secs(5));
        // A pooled VM's keeper opened the connection while the VM waited (and checked the
        // agent's version); should it not work, a connection of our own is tried as for a
        // cold VM, here or at its first call below.
        let over_kept = kept_agent.map(|k| {
            Agent::over(k.stream, &socket, k.agent_version).map_err(|e| {
                log::warn!(
                    "sandbox {id}: the agent connection its keeper opened: {e}; connecting anew"
                );
            })
        });
        let mut kept = matches!(over_kept, Some(Ok(_)));
        let connected = match over_kept {
            Some(Ok(a)) => Ok(a),
            _ => Agent::connect(&socket, left),
        };
        let mut agent = match connected {
            Ok(a) => a,
            Err(e) => {
                return Err(guest_err(
                    "connecting to the agent",
                    format!("the agent said it was ready, but: {e}"),
                ));
            }
        };
        steps.push(("agent connected", vm_started.elapsed()));
        let req = CreateSandboxRequest {
            sandbox_id: id.to_string(),
            hostname: hostname.to_string(),
            ..Default::default()
        };
        let mut created = agent.client().create_sandbox(agent::short(), &req);
        // A kept connection the keeper already checked is first used here: had it broken
        // while the VM waited, the request may not have reached the agent, so it is sent
        // again on a new connection (one that did arrive makes the second fail as a sandbox
        // that exists, never a second sandbox).
        if kept && created.as_ref().is_err_and(agent::connection_broke) {
            log::warn!(
                "sandbox {id}: the agent connection its keeper opened: {}; connecting anew",
                created
                    .as_ref()
                    .err()
                    .map(agent::describe)
                    .unwrap_or_default()
            );
            agent = Agent::connect(&socket, left).map_err(|e| {
                guest_err(
                    "connecting to the agent",
                    format!("the agent said it was ready, but: {e}"),
                )
            })?;
            kept = false;
            created = agent.client().create_sandbox(agent::short(), &req);
        }
        if let Err(e) = created {
            return Err(guest_err("CreateSandbox", agent::describe(&e)));
        }
        steps.push(("CreateSandbox", vm_started.elapsed()));
        if let Err(e) = network.configure_guest(agent.client()) {
            return Err(guest_err(
                "configuring the guest network",
                crate::network::chain(&e),
            ));
        }
        if let Some(s) = settling {
            s.wait().map_err(step_error(&sid, "host cgroup"))?;
            steps.push(("host cgroup joined", vm_started.elapsed()));
        }
        let guest_boot_ms = ready.map_or(0, |r| r.since_boot_ms);
        crate::metrics::record_boot(bring_up.elapsed(), vm_boot, guest_boot_ms);
        log::info!(
            "sandbox {id}: VM {vm_pid} on {} with {vcpus} vCPU, {memory_mib} MiB; agent {}{}; {}; {}",
            backend_name,
            agent.agent_version,
            if kept {
                " over the connection its keeper opened"
            } else {
                ""
            },
            pooled_vm.map_or("booted cold".to_string(), |v| format!(
                "{v} from the warm pool"
            )),
            steps_text(&steps, bring_up.elapsed())
        );
        Ok(Self {
            id: id.to_string(),
            dir,
            vm: Mutex::new(vm.keep()),
            vm_pid,
            keeper_pid,
            agent,
            backend: backend_name,
            network: Mutex::new(network),
            keeper: Mutex::new(keep_tx),
            destroyed: std::sync::atomic::AtomicBool::new(false),
            cgroup: Mutex::new(None),
        })
    }

    /// Kills the VM's processes at once, for a guest that no longer answers: the VM watcher
    /// then ends every process of the sandbox (see `task::watch`).
    pub fn kill_vm(&self) {
        let mut vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = vm.kill() {
            log::error!("sandbox {}: killing the VM: {e}", self.id);
        }
    }

    /// How the VM ended, if it has: its exit status, or why it was stopped (a device helper
    /// that ended first, which `wait` reports as an error) or cannot be waited for.
    pub fn vm_exited(&self) -> Option<String> {
        let mut vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        match vm.wait(Some(Duration::ZERO)) {
            Ok(None) => None,
            Ok(Some(status)) => Some(status.to_string()),
            Err(e) => Some(crate::error::chain(&e)),
        }
    }

    /// A descriptor that turns readable once the VM has ended ([`husk_hypervisor::Vm::exit_fd`]).
    pub fn vm_exit_fd(&self) -> Option<std::os::fd::OwnedFd> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner()).exit_fd()
    }

    pub fn console_tail(&self) -> String {
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        husk_hypervisor::console::tail(vm.console_log(), 20)
    }

    pub fn pause(&self) -> Result<(), husk_hypervisor::Error> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner()).pause()
    }

    pub fn resume(&self) -> Result<(), husk_hypervisor::Error> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner()).resume()
    }

    /// The pod netns and, per CNI interface, `(its name, its tap)`: for the metrics.
    pub fn interfaces(&self) -> (Option<PathBuf>, Vec<(String, String)>) {
        let net = self.network.lock().unwrap_or_else(|e| e.into_inner());
        let taps = net
            .endpoints()
            .iter()
            .map(|e| (e.veth.name.clone(), e.tap_name.clone()))
            .collect();
        (net.netns().map(PathBuf::from), taps)
    }

    pub fn is_destroyed(&self) -> bool {
        self.destroyed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Asks the agent to end the sandbox, stops the VM, removes the state directory.
    pub fn destroy(&self) {
        self.destroyed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        if vm.wait(Some(Duration::ZERO)).ok().flatten().is_none() {
            let ctx = husk_protocols::ttrpc::context::with_duration(Duration::from_secs(5));
            let _ = self
                .agent
                .client()
                .destroy_sandbox(ctx, &DestroySandboxRequest::default());
            // The agent powers the VM off after answering; give it a moment, then stop it.
            if vm
                .wait(Some(Duration::from_secs(3)))
                .ok()
                .flatten()
                .is_none()
            {
                let _ = vm.stop(Duration::from_secs(3));
            }
        }
        let _ = vm.kill();
        drop(vm);
        self.keeper.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut c) = self.cgroup.lock().unwrap_or_else(|e| e.into_inner()).take() {
            c.leave();
        }
        if let Err(e) = self
            .network
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .teardown()
        {
            log::error!(
                "sandbox {}: removing the pod network plumbing: {}",
                self.id,
                crate::network::chain(&e)
            );
        }
        if let Err(e) = self.dir.destroy() {
            log::error!("sandbox {}: cleaning up: {e}", self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::process::ExitStatus;

    /// A VM that only counts the kills it gets.
    #[derive(Debug)]
    struct CountingVm(std::sync::Arc<std::sync::atomic::AtomicU32>);

    impl Vm for CountingVm {
        fn pid(&self) -> u32 {
            0
        }
        fn console_log(&self) -> &Path {
            Path::new("/dev/null")
        }
        fn vsock_socket(&self) -> Option<&Path> {
            None
        }
        fn console_write(&mut self, _: &[u8]) -> husk_hypervisor::Result<()> {
            Ok(())
        }
        fn pause(&mut self) -> husk_hypervisor::Result<()> {
            Ok(())
        }
        fn resume(&mut self) -> husk_hypervisor::Result<()> {
            Ok(())
        }
        fn wait(&mut self, _: Option<Duration>) -> husk_hypervisor::Result<Option<ExitStatus>> {
            Ok(None)
        }
        fn stop(&mut self, _: Duration) -> husk_hypervisor::Result<ExitStatus> {
            self.kill()
        }
        fn kill(&mut self) -> husk_hypervisor::Result<ExitStatus> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            use std::os::unix::process::ExitStatusExt;
            Ok(ExitStatus::from_raw(9))
        }
    }

    #[test]
    fn a_failed_bring_up_kills_its_vm_and_a_kept_one_lives() {
        let kills = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let count = || kills.load(std::sync::atomic::Ordering::SeqCst);
        let failed = || -> Result<(), &'static str> {
            let vm = KillOnDrop(Some(Box::new(CountingVm(kills.clone()))));
            assert_eq!(vm.pid(), 0);
            Err("CreateSandbox")?;
            drop(vm.keep());
            Ok(())
        };
        assert!(failed().is_err());
        assert_eq!(count(), 1, "the failed bring-up killed its VM once");
        let kept = KillOnDrop(Some(Box::new(CountingVm(kills.clone())))).keep();
        assert_eq!(count(), 1, "a kept VM is not killed");
        drop(kept);
        assert_eq!(count(), 1);
    }

    #[test]
    fn host_namespaces_are_refused_by_name() {
        let ns = |kinds: &[&str]| json!({"linux": {"namespaces": kinds.iter().map(|k| json!({"type": k})).collect::<Vec<_>>()}});
        host_namespaces(&ns(&["pid", "ipc", "uts", "mount", "network"])).unwrap();
        host_namespaces(&json!({})).unwrap();
        let e = host_namespaces(&ns(&["pid", "ipc", "uts", "mount"])).unwrap_err();
        assert!(
            e.starts_with("linux.namespaces: no network namespace"),
            "{e}"
        );
        assert!(
            e.contains("hostNetwork") && e.contains("network namespace"),
            "{e}"
        );
        let e = host_namespaces(&ns(&["pid", "uts", "mount", "network"])).unwrap_err();
        assert!(e.contains("hostIPC"), "{e}");
        let e = host_namespaces(&ns(&["ipc", "uts", "mount", "network"])).unwrap_err();
        assert!(e.contains("hostPID"), "{e}");
    }

    #[test]
    fn pod_limits_grow_the_vm() {
        let c = Config {
            max_vcpus: 8,
            max_memory_mib: 4096,
            ..Config::default()
        };
        assert_eq!(size_for(&c, &json!({})).unwrap(), (1, 256));
        let spec = json!({"linux": {"resources": {"cpu": {"quota": 150000, "period": 100000}, "memory": {"limit": 134217728}}}});
        assert_eq!(size_for(&c, &spec).unwrap(), (3, 384));
        let neg = json!({"linux": {"resources": {"cpu": {"quota": -1, "period": 100000}, "memory": {"limit": -1}}}});
        assert_eq!(size_for(&c, &neg).unwrap(), (1, 256));
        let ann =
            json!({"annotations": {"io.husk.extra-vcpus": "2", "io.husk.extra-memory-mib": "512"}});
        assert_eq!(size_for(&c, &ann).unwrap(), (3, 768));
        // Limits alone past the bounds are clamped to them.
        let big = json!({"linux": {"resources": {"cpu": {"quota": 5000000, "period": 100000}, "memory": {"limit": 1i64 << 40}}}});
        assert_eq!(size_for(&c, &big).unwrap(), (8, 4096));
    }

    #[test]
    fn annotations_are_checked_against_the_allowlist_and_the_bounds() {
        let c = Config {
            max_vcpus: 4,
            max_memory_mib: 1024,
            ..Config::default()
        };
        for (ann, words) in [
            (
                json!({"io.husk.extra-vcpus": "-1"}),
                vec!["io.husk.extra-vcpus", "\"-1\"", "whole number"],
            ),
            (
                json!({"io.husk.extra-memory-mib": "lots"}),
                vec!["io.husk.extra-memory-mib", "lots"],
            ),
            (
                json!({"io.husk.extra-vcpus": "8"}),
                vec!["io.husk.extra-vcpus", "= 8", "max_vcpus = 4"],
            ),
            (
                json!({"io.husk.extra-memory-mib": "4294967295"}),
                vec!["io.husk.extra-memory-mib", "max_memory_mib = 1024"],
            ),
            (
                json!({"io.husk.kernel-params": "init=/bin/sh"}),
                vec!["io.husk.kernel-params", "not enabled", "enable_annotations"],
            ),
        ] {
            let e = size_for(&c, &json!({"annotations": ann})).unwrap_err();
            for w in words {
                assert!(e.contains(w), "{w:?} missing in: {e}");
            }
        }
        let off = Config {
            enable_annotations: vec![],
            ..c.clone()
        };
        let e = size_for(&off, &json!({"annotations": {"io.husk.extra-vcpus": "1"}})).unwrap_err();
        assert!(e.contains("not enabled"), "{e}");
        // The ctr grouping annotation is not a sizing one: allowed here.
        size_for(&off, &json!({"annotations": {"io.husk.sandbox-id": "x"}})).unwrap();
        // By default the bounds are the host's.
        let host = size_for(
            &Config::default(),
            &json!({"annotations": {"io.husk.extra-memory-mib": "99999999"}}),
        )
        .unwrap_err();
        assert!(host.contains("max_memory_mib"), "{host}");
    }
}
