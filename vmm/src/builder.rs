//! Putting a VM together from a [`MachineConfig`] and running it to its end, each thread under
//! the seccomp filter of its kind ([`crate::seccomp`]).

use std::fs::OpenOptions;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::SERIAL_IRQ;
use crate::arch::mptable;
use crate::boot::{self, BootSource};
use crate::config::MachineConfig;
use crate::device_manager::MmioDeviceManager;
use crate::devices::bus::Bus;
use crate::devices::legacy::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::legacy::rtc::{Rtc, RTC_BASE, RTC_LEN};
use crate::devices::legacy::serial::{spawn_input, ConsoleOut, SerialDevice, COM1_BASE, COM1_LEN};
use crate::devices::virtio::fs::{event_handler as fs_event_handler, VhostUserFs};
use crate::devices::virtio::net::{event_handler as net_event_handler, FrameIo, Net, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::unix::{HostConnector, Muxer};
use crate::devices::virtio::vsock::{event_handler as vsock_event_handler, Vsock};
use crate::exit::ExitReason;
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::vstate::memory::{create_guest_ram, GuestRam};
use crate::vstate::run_state::{install_kick_handler, RunState};
use crate::vstate::vcpu::{ExitCounters, Vcpu, VcpuShared};
use crate::vstate::vm::{open_kvm, KvmVm};

/// Errors while building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// KVM or the VM.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::vstate::memory::MemoryError),
    /// Kernel, initramfs, command line.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// The console log cannot be created.
    #[error("console log {path}: {source} — give a writable path with --console-log")]
    ConsoleLog {
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Creating an eventfd or registering an irqfd failed.
    #[error("wiring {what}: {source}")]
    Irq {
        /// Which interrupt.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A device range clash (a bug in the VMM's layout).
    #[error("placing a device: {0}")]
    Bus(#[from] crate::devices::bus::BusError),
    /// A virtio device.
    #[error(transparent)]
    Devices(#[from] crate::device_manager::DeviceManagerError),
    /// The vsock socket.
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::unix::MuxerError),
    /// virtio-fs.
    #[error(transparent)]
    Fs(#[from] crate::devices::virtio::fs::FsError),
    /// The tap.
    #[error(transparent)]
    Tap(#[from] crate::devices::virtio::net::TapError),
    /// The vsock CID is reserved.
    #[error("vsock CID {0} is reserved (0-2): give 3 or more with --vsock-cid")]
    VsockCid(u64),
    /// The host entropy source for virtio-rng.
    #[error("virtio-rng: opening /dev/urandom: {0}")]
    Entropy(#[source] std::io::Error),
    /// A device or vCPU thread (or its eventfd) could not be set up.
    #[error("starting a VMM thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The main thread's seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// How the VM's threads are confined once it runs.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// The seccomp filter of each thread kind ([`Filters::off`]: none).
    pub filters: Filters,
    /// Who opens the host end of guest-initiated vsock connections. `None`: the muxer
    /// connects by path itself, which the filters forbid — give the broker
    /// ([`crate::broker::Broker`]) whenever they are on.
    pub connector: Option<Arc<dyn HostConnector>>,
}

/// A built VM, ready to run. Field order matters: the VM is dropped before its RAM.
#[derive(Debug)]
pub struct Vmm {
    vcpus: Vec<Vcpu>,
    shared: VcpuShared,
    vm: KvmVm,
    ram: GuestRam,
}

impl Vmm {
    /// Builds the VM described by `cfg`; its device threads start under their filter from
    /// `confinement`.
    ///
    /// Guest RAM is registered with KVM on a short-lived thread of its own while this one
    /// builds the rest (devices, kernel and initramfs, vCPUs): registering it is the slowest
    /// step of a VM's start and only `KVM_RUN` needs it ([`KvmVm::register_ram`]). That thread
    /// touches nothing the guest wrote (no vCPU has run yet) and ends before this returns.
    pub fn build(cfg: &MachineConfig, confinement: &Confinement) -> Result<Self, BuildError> {
        let kvm = open_kvm()?;
        let ram = create_guest_ram(cfg.memory_mib)?;
        let vm = KvmVm::without_ram(kvm)?;
        let (vcpus, shared) = thread::scope(|s| {
            let slots = thread::Builder::new()
                .name("ram-slots".into())
                .spawn_scoped(s, || vm.register_ram(&ram))
                .map_err(BuildError::Thread)?;
            let rest = Self::build_on(cfg, confinement, &vm, &ram);
            let slots = slots
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            // A failure of the rest is reported first: it is the more specific one.
            let rest = rest?;
            slots?;
            Ok::<_, BuildError>(rest)
        })?;
        Ok(Self {
            vcpus,
            shared,
            vm,
            ram,
        })
    }

    /// Everything of [`Self::build`] but RAM registration.
    fn build_on(
        cfg: &MachineConfig,
        confinement: &Confinement,
        vm: &KvmVm,
        ram: &GuestRam,
    ) -> Result<(Vec<Vcpu>, VcpuShared), BuildError> {
        let filters = &confinement.filters;

        let (exit_tx, exit_rx) = mpsc::channel();
        let mut pio = Bus::new();
        let console_file = match &cfg.console_log {
            Some(path) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| BuildError::ConsoleLog {
                        path: path.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        let irq_err = |what| move |source| BuildError::Irq { what, source };
        let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(irq_err("COM1 eventfd"))?;
        vm.fd
            .register_irqfd(&serial_evt, SERIAL_IRQ)
            .map_err(|e| BuildError::Irq {
                what: "COM1 irqfd",
                source: e.into(),
            })?;
        let console_stdout = cfg.console_stdout || cfg.console_log.is_none();
        let out = ConsoleOut::new(console_file, console_stdout);
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_evt, out)));
        pio.insert(COM1_BASE, COM1_LEN, serial.clone())?;
        if console_stdout {
            // The console is on the terminal: what is typed there goes to the guest.
            spawn_input(serial, std::io::stdin(), filters).map_err(BuildError::Thread)?;
        }
        pio.insert(
            I8042_BASE,
            I8042_LEN,
            Arc::new(Mutex::new(I8042::new(exit_tx.clone()))),
        )?;
        pio.insert(RTC_BASE, RTC_LEN, Arc::new(Mutex::new(Rtc::default())))?;
        let mut mmio = Bus::new();
        let mut devices = MmioDeviceManager::new();
        if cfg.rng {
            let rng = Rng::from_urandom().map_err(BuildError::Entropy)?;
            devices.add(&vm.fd, &mut mmio, &ram.mem, Box::new(rng))?;
        }
        if let Some(path) = &cfg.vsock_sock {
            if cfg.vsock_cid <= 2 || cfg.vsock_cid > u64::from(u32::MAX) {
                return Err(BuildError::VsockCid(cfg.vsock_cid));
            }
            let mut muxer = Muxer::new(cfg.vsock_cid, path)?;
            if let Some(c) = &confinement.connector {
                muxer.set_connector(c.clone());
            }
            let muxer = Arc::new(Mutex::new(muxer));
            let vsock = Vsock::new(cfg.vsock_cid, muxer.clone());
            let (_, transport) = devices.add(&vm.fd, &mut mmio, &ram.mem, Box::new(vsock))?;
            vsock_event_handler::spawn(muxer, transport, filters).map_err(BuildError::Thread)?;
        }
        for (tag, socket) in &cfg.fs {
            let fs = VhostUserFs::connect(socket, tag)?;
            let calls = fs.call_fds().map_err(BuildError::Thread)?;
            let (_, transport) = devices.add(&vm.fd, &mut mmio, &ram.mem, Box::new(fs))?;
            let irq = transport.lock().expect("transport lock").irq();
            fs_event_handler::spawn(calls, irq, filters).map_err(BuildError::Thread)?;
        }
        for net_cfg in &cfg.net {
            let tap = Tap::open_spec(&net_cfg.tap)?;
            let tap_fd = tap.poll_fd().expect("a tap has an fd");
            let net = Net::new(tap, net_cfg.mac).map_err(BuildError::Thread)?;
            let (_, blocked, kick) = net.event_parts().map_err(BuildError::Thread)?;
            let (_, transport) = devices.add(&vm.fd, &mut mmio, &ram.mem, Box::new(net))?;
            net_event_handler::spawn(tap_fd, blocked, kick, transport, filters)
                .map_err(BuildError::Thread)?;
        }

        let src = BootSource {
            kernel: cfg.kernel.clone(),
            initrd: cfg.initrd.clone(),
            cmdline: cfg.cmdline(&devices.cmdline_args()),
        };
        let entry = boot::load(&ram.mem, &src)?;
        mptable::setup_mptable(&ram.mem, cfg.vcpus)?;

        let supported = vm
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| crate::vstate::vm::VmError::Kvm {
                what: "get supported CPUID",
                source,
            })?;
        let emulated = crate::arch::cpuid::Emulated::of(&vm.kvm);
        let vcpus = (0..cfg.vcpus)
            .map(|i| Vcpu::new(vm, &ram.mem, &supported, emulated, i, cfg.vcpus, entry))
            .collect::<Result<Vec<_>, _>>()?;

        let shared = VcpuShared {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            run_state: Arc::new(RunState::default()),
            counters: Arc::new(ExitCounters::default()),
            exit_tx,
            exit_rx: Arc::new(Mutex::new(exit_rx)),
            filters: filters.clone(),
        };
        Ok((vcpus, shared))
    }

    /// What the control API needs to act on this VM.
    pub fn api_context(&self) -> crate::api::ApiContext {
        crate::api::ApiContext {
            run_state: self.shared.run_state.clone(),
            exit_tx: self.shared.exit_tx.clone(),
            exits: self.shared.counters.clone(),
            pio: self.shared.pio.clone(),
            mmio: self.shared.mmio.clone(),
        }
    }

    /// Where to report an exit reason from outside the VM (signals, the control API).
    pub fn exit_sender(&self) -> crate::exit::ExitSender {
        self.shared.exit_tx.clone()
    }

    /// Runs the vCPUs until the guest or the host ends the VM; returns why. Once the vCPU
    /// threads are started, the calling thread goes under the VMM thread's filter: start
    /// every other thread (API, signals) before calling this.
    pub fn run(self) -> Result<ExitReason, BuildError> {
        install_kick_handler();
        let Vmm {
            vcpus,
            shared,
            vm,
            ram,
        } = self;
        let mut handles = Vec::new();
        for vcpu in vcpus {
            let s = shared.clone();
            let h = thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index()))
                .spawn(move || vcpu.run(&s))
                .map_err(BuildError::Thread)?;
            handles.push(h);
        }
        // The last thread is started: from here on this one only waits and stops the VM.
        shared.filters.install(ThreadKind::Vmm)?;
        let reason = shared
            .exit_rx
            .lock()
            .expect("exit receiver lock")
            .recv()
            .unwrap_or_else(|_| {
                ExitReason::Fatal("all vCPU threads ended without a reason".into())
            });
        shared
            .run_state
            .stop(|| handles.iter().all(|h| h.is_finished()));
        for h in handles {
            let _ = h.join();
        }
        drop(vm);
        drop(ram);
        Ok(reason)
    }
}
