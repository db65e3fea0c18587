//! `husk-hypervisor`: one small interface for starting and stopping a husk microVM, its
//! backends, and the host checks that choose between them.
//!
//! - [`Hypervisor`] starts a VM from a [`VmConfig`]; the [`Vm`] it returns is paused,
//!   resumed, stopped, killed and waited for. Nothing else: the trait grows only when a caller
//!   needs it (Kata's forty-method trait is what we avoid).
//! - [`qemu::Qemu`]: QEMU's `microvm` machine, with KVM where the host runs our guest natively
//!   and TCG elsewhere.
//! - [`husk_vmm::HuskVmm`]: husk's own VMM (`vmm/`), the default where the host has hardware
//!   KVM; it serves hybrid vsock itself and runs virtiofsd for the shared directory.
//! - [`host`]: what kind of host this is (hardware KVM, PVM, none) and so which backend husk
//!   uses by default; `cargo xtask doctor` prints the same verdict.
//! - [`console`]: reading the guest's serial console log, and the agent's ready line.
//! - [`Programs`]: the QEMU, husk-vmm, virtiofsd and vhost-device-vsock a caller names instead
//!   of the usual lookup ([`helpers::check_program`] checks such a path before use).
//! - [`vsock`]: the host side of hybrid vsock (`CONNECT <port>\n` → `OK …\n`), how the shim
//!   reaches the agent on any backend.
//!
//! The qemu backend runs the two vhost-user helpers a husk guest needs next to QEMU
//! (virtiofsd for [`VmConfig::shared_dir`], vhost-device-vsock for [`VmConfig::vsock`]); a
//! helper that dies stops its VM, and [`Vm::wait`] says which one ([`Error::HelperExited`]).
//!
//! Every process a backend starts is reaped: on stop, on kill, and when the [`Vm`] is dropped.

pub mod console;
pub mod guest_text;
pub mod helpers;
pub mod host;
pub mod husk_vmm;
pub mod jail;
pub mod kernel;
pub mod lookup;
pub mod process;
pub mod qemu;
pub mod vsock;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

/// Errors of the hypervisor layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input that cannot make a VM: a missing kernel, a bad size.
    #[error("{0}")]
    Config(String),
    /// A program the backend needs is not installed.
    #[error("{program} not found — {fix}")]
    MissingProgram { program: String, fix: String },
    #[error("starting {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} (console log: {console})")]
    Guest { what: String, console: PathBuf },
    #[error("QEMU monitor (QMP) at {socket}: {what}")]
    Qmp { socket: PathBuf, what: String },
    /// husk-vmm's control API refused or did not answer a request.
    #[error("husk-vmm API at {socket}, request {request:?}: {what}")]
    Api {
        socket: PathBuf,
        request: String,
        what: String,
    },
    /// A device helper (virtiofsd, vhost-device-vsock) ended while its VM ran; the VM was
    /// stopped because of it.
    #[error(
        "{program} (pid {pid}) ended while the VM ran ({status}); the VM was stopped — see {log}"
    )]
    HelperExited {
        program: String,
        pid: u32,
        status: ExitStatus,
        log: PathBuf,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which accelerator a backend runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's software emulator: slow, but a real VM boundary on any host.
    Tcg,
}

/// What to boot and with what.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Uncompressed `vmlinux` (ELF, with a PVH note).
    pub kernel: PathBuf,
    /// Uncompressed newc cpio whose `/init` is `husk-agent`.
    pub initramfs: PathBuf,
    /// Appended to the backend's own kernel command line.
    pub cmdline_extra: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Directory for this VM's sockets and console log (e.g. `/run/husk/<sandbox-id>`). It
    /// must exist; the backend creates files in it but never removes the directory.
    pub state_dir: PathBuf,
    /// A host directory the guest mounts over virtio-fs (tag [`SHARED_FS_TAG`]), served by a
    /// sandboxed virtiofsd the backend runs. `None`: no virtio-fs device.
    pub shared_dir: Option<PathBuf>,
    /// Give the guest a vsock device (CID [`GUEST_CID`]); the host reaches its ports through
    /// the hybrid-vsock socket [`Vm::vsock_socket`] (see [`vsock`]).
    pub vsock: bool,
    /// One virtio-net device per entry, in order (the guest sees them as eth0, eth1, …
    /// before the agent renames them). Empty: the guest has loopback only.
    pub nets: Vec<NetConfig>,
    /// Run the VMM and its vsock helper jailed ([`jail`]); `state_dir` must then be owned by
    /// the jail's uid. `None`: they run as the caller (tests of the backends themselves).
    pub jail: Option<jail::JailSpec>,
}

/// The programs a backend runs, where the caller names them (`/etc/husk/config.toml`'s
/// `*_path` keys); `None` is the usual lookup: QEMU, virtiofsd and vhost-device-vsock on
/// `PATH` (the helpers also in `~/.cargo/bin`), husk-vmm beside the calling program, then on
/// `PATH`. A named program is used as it is: the caller checks it first
/// ([`helpers::check_program`]), so a wrong path fails before anything starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Programs {
    pub qemu: Option<PathBuf>,
    pub husk_vmm: Option<PathBuf>,
    pub virtiofsd: Option<PathBuf>,
    pub vhost_vsock: Option<PathBuf>,
}

/// A virtio-net device backed by a tap the caller opened (in whatever network namespace the
/// tap must live in). The backend hands the open file to the VM process; it never opens a
/// tap by name, so the VM process needs neither CAP_NET_ADMIN nor the namespace.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The tap's file descriptor (from `TUNSETIFF` with `IFF_TAP | IFF_NO_PI`, with or
    /// without `IFF_VNET_HDR`). Close-on-exec in the caller; the backend makes it inherited
    /// by the VM process only.
    pub tap: Arc<OwnedFd>,
    /// The guest NIC's MAC address.
    pub mac: [u8; 6],
}

impl NetConfig {
    /// The MAC as QEMU and `ip` write it: `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// The virtio-fs tag of [`VmConfig::shared_dir`]; the agent mounts it at `/run/husk/shared`.
pub const SHARED_FS_TAG: &str = "husk-shared";
/// The guest's vsock CID (each VM has its own device, so every guest can use the same one).
pub const GUEST_CID: u32 = 3;

/// The smallest guest memory our kernel boots in.
pub const MIN_MEMORY_MIB: u32 = 64;
/// The most vCPUs a husk guest gets (the guest kernel's NR_CPUS is 64; be modest).
pub const MAX_VCPUS: u32 = 32;

impl VmConfig {
    /// Checks what can be checked before starting anything.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "vcpus = {}: must be between 1 and {MAX_VCPUS}",
                self.vcpus
            )));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(Error::Config(format!(
                "memory = {} MiB: too small for the guest kernel, give at least {MIN_MEMORY_MIB} MiB",
                self.memory_mib
            )));
        }
        kernel::check_elf(&self.kernel)?;
        if !self.initramfs.is_file() {
            return Err(Error::Config(format!(
                "initramfs {}: not found — build it with `cargo xtask rootfs`",
                self.initramfs.display()
            )));
        }
        if !self.state_dir.is_dir() {
            return Err(Error::Config(format!(
                "state directory {}: not a directory — create it before starting the VM",
                self.state_dir.display()
            )));
        }
        if let Some(dir) = &self.shared_dir {
            if !dir.is_dir() {
                return Err(Error::Config(format!(
                    "shared directory {}: not a directory — create it before starting the VM",
                    dir.display()
                )));
            }
        }
        for (i, n) in self.nets.iter().enumerate() {
            if n.mac[0] & 1 != 0 || n.mac == [0; 6] {
                return Err(Error::Config(format!(
                    "network device {i}: MAC {} is multicast or zero — give the guest NIC a unicast MAC (the veth's)",
                    n.mac_string()
                )));
            }
        }
        Ok(())
    }
}

/// A backend that can start VMs.
pub trait Hypervisor {
    /// Short name for logs and reports, e.g. `qemu-tcg`.
    fn name(&self) -> String;

    /// Starts a VM. Returns once the VM process runs; the guest boots asynchronously (wait for
    /// the agent's ready line with [`console::wait_for_ready`]).
    ///
    /// The VM process is tied to the *calling thread* (`PR_SET_PDEATHSIG`): if that thread
    /// ends, the VM is killed. Call it from a thread that lives as long as the VM.
    fn start(&self, config: &VmConfig) -> Result<Box<dyn Vm>>;
}

/// A running VM.
pub trait Vm: Send + std::fmt::Debug {
    /// PID of the VM process (the VMM or QEMU).
    fn pid(&self) -> u32;
    /// The guest's serial console, as a log file on the host.
    fn console_log(&self) -> &Path;
    /// The hybrid-vsock unix socket through which the host reaches the guest's vsock ports
    /// (`None` if the VM has no vsock device). Connect with [`vsock::connect`].
    fn vsock_socket(&self) -> Option<&Path>;
    /// Writes to the guest's serial console input.
    fn console_write(&mut self, bytes: &[u8]) -> Result<()>;
    /// Stops the vCPUs.
    fn pause(&mut self) -> Result<()>;
    /// Continues after [`Vm::pause`].
    fn resume(&mut self) -> Result<()>;
    /// Waits for the VM to end by itself (the guest powered off), up to `timeout` if given.
    /// `Ok(None)`: still running when the timeout passed.
    fn wait(&mut self, timeout: Option<Duration>) -> Result<Option<ExitStatus>>;
    /// A descriptor of its own (the caller closes it) that turns readable once the VM has
    /// ended or something happened that [`Vm::wait`] must look at (a helper ended: `wait`
    /// counts down its grace, so a caller woken while `wait` still says running looks again a
    /// little later rather than at once); for a caller that sleeps until then instead of
    /// calling `wait` now and then. `None` where the kernel has no pidfds, or the backend has
    /// nothing to sleep on: call `wait` now and then.
    fn exit_fd(&self) -> Option<std::os::fd::OwnedFd> {
        None
    }
    /// Ends the VM in order (the monitor is asked to quit), killing it if it has not ended
    /// after `grace`; every helper process is ended and reaped.
    fn stop(&mut self, grace: Duration) -> Result<ExitStatus>;
    /// Kills the VM and its helpers at once and reaps them.
    fn kill(&mut self) -> Result<ExitStatus>;
}
