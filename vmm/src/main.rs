//! The `husk-vmm` binary: parse the CLI, start the broker, build the VM, put every thread
//! under its seccomp filter, run the VM, exit with its status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use husk_vmm::broker::{Broker, BrokerConfig, Owned};
use husk_vmm::config::{DEFAULT_MEMORY_MIB, DEFAULT_VCPUS};
use husk_vmm::exit::{die_with_parent, TerminationSignals};
use husk_vmm::seccomp::{self, Filters};
use husk_vmm::{Confinement, ExitReason, MachineConfig, Vmm};

/// husk's KVM microVM monitor.
#[derive(Debug, Parser)]
#[command(name = "husk-vmm", version)]
struct Cli {
    /// The guest kernel: an uncompressed ELF vmlinux (PVH note preferred).
    #[arg(long)]
    kernel: PathBuf,
    /// An initramfs (uncompressed cpio) handed to the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended to the defaults.
    #[arg(long)]
    cmdline: Option<String>,
    /// Use --cmdline as the whole command line instead of appending it to the defaults.
    #[arg(long, requires = "cmdline")]
    cmdline_replace: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = DEFAULT_VCPUS, value_parser = clap::value_parser!(u8).range(1..=254))]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    memory: u64,
    /// Append the serial console to this file (then stdout only with --console-stdout).
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Copy the serial console to stdout too when --console-log is given.
    #[arg(long)]
    console_stdout: bool,
    /// Serve the control API (pause, resume, shutdown, counters) on this unix socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Give the guest a hybrid virtio-vsock device: the host connects to this unix socket
    /// and writes `CONNECT <port>\n`; guest connections to host port P go to `<path>_P`.
    #[arg(long)]
    vsock_sock: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = husk_vmm::config::DEFAULT_VSOCK_CID)]
    vsock_cid: u64,
    /// Give the guest a virtio-fs device served by the vhost-user backend (virtiofsd)
    /// listening on this socket. Repeatable, paired in order with --fs-tag.
    #[arg(long, requires = "fs_tag")]
    fs_sock: Vec<PathBuf>,
    /// The tag the guest mounts the matching --fs-sock by.
    #[arg(long, requires = "fs_sock")]
    fs_tag: Vec<String>,
    /// Give the guest a virtio-net card on this tap (opened by name, created if missing; or
    /// `fd:N`, a tap handed over open under descriptor N). Repeatable.
    #[arg(long)]
    net_tap: Vec<String>,
    /// The MAC of the matching --net-tap (default 02:68:75:73:6b:NN, NN = card index).
    #[arg(long, requires = "net_tap")]
    net_mac: Vec<String>,
    /// End the VM (as on SIGTERM) when the parent process dies. The kernel ties this to the
    /// parent *thread* that spawned us: spawn husk-vmm from a thread that lives as long as
    /// the parent (not a pool thread), or the VM ends when that thread does.
    #[arg(long)]
    die_with_parent: bool,
    /// Give the guest a virtio-rng device (fed from the host's /dev/urandom).
    #[arg(long)]
    rng: bool,
    /// Run without the seccomp filters (which, once the VM is built, allow each kind of
    /// thread only the system calls it makes in a running VM). For debugging only.
    #[arg(long)]
    no_seccomp: bool,
}

/// The sockets this run created; when dropped — however `run` ends — the broker removes
/// them and ends (no husk-vmm thread may unlink once the filters are on).
struct Leftovers {
    broker: Arc<Broker>,
    owned: Vec<Owned>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if let Err(e) = self.broker.finish(&self.owned) {
            eprintln!(
                "husk-vmm: removing its sockets ({:?}) through the broker: {e}",
                self.owned
            );
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitReason> {
    if cli.fs_sock.len() != cli.fs_tag.len() {
        anyhow::bail!(
            "give one --fs-tag for each --fs-sock ({} sockets, {} tags)",
            cli.fs_sock.len(),
            cli.fs_tag.len()
        );
    }
    if cli.net_mac.len() > cli.net_tap.len() {
        anyhow::bail!("more --net-mac than --net-tap: give at most one MAC per tap");
    }
    let mut net = Vec::new();
    for (i, tap) in cli.net_tap.iter().enumerate() {
        let mac = match cli.net_mac.get(i) {
            Some(m) => husk_vmm::devices::virtio::net::parse_mac(m)?,
            None => {
                let mut mac = husk_vmm::config::DEFAULT_MAC;
                mac[5] = u8::try_from(i).map_err(|_| anyhow::anyhow!("too many --net-tap"))?;
                mac
            }
        };
        net.push(husk_vmm::config::NicConfig {
            tap: tap.clone(),
            mac,
        });
    }
    // First, before any thread starts: every thread then has these signals blocked and
    // only the signal thread takes them.
    let signals =
        TerminationSignals::block().map_err(|e| anyhow::anyhow!("blocking SIGTERM/SIGINT: {e}"))?;
    // The VMM must not outlive the shim, its parent (docs/ARCHITECTURE.md): its death is a SIGTERM.
    if cli.die_with_parent
        && !die_with_parent().map_err(|e| anyhow::anyhow!("PR_SET_PDEATHSIG: {e}"))?
    {
        return Ok(ExitReason::HostShutdown);
    }
    let cfg = MachineConfig {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline_extra: cli.cmdline,
        cmdline_replace: cli.cmdline_replace,
        vcpus: cli.vcpus,
        memory_mib: cli.memory,
        console_stdout: cli.console_stdout || cli.console_log.is_none(),
        console_log: cli.console_log,
        rng: cli.rng,
        vsock_sock: cli.vsock_sock,
        vsock_cid: cli.vsock_cid,
        net,
        fs: cli
            .fs_tag
            .iter()
            .cloned()
            .zip(cli.fs_sock.iter().cloned())
            .collect(),
    };
    // The broker first, while this is the only thread and nothing is open but stdio: it
    // does the path operations no filtered thread may (vsock connections to `<uds>_P`,
    // removing our sockets at the end).
    let broker = Arc::new(Broker::spawn(BrokerConfig {
        vsock_sock: cfg.vsock_sock.clone(),
        api_sock: cli.api_sock.clone(),
        filter: (!cli.no_seccomp).then(seccomp::broker_filter).transpose()?,
    })?);
    let mut leftovers = Leftovers {
        broker: broker.clone(),
        owned: Vec::new(),
    };
    let filters = if cli.no_seccomp {
        Filters::off()
    } else {
        Filters::build(&seccomp::Context::current(Some(broker.pid())))?
    };
    // Bind first: a taken socket path is reported before any VM exists.
    let api = cli
        .api_sock
        .as_deref()
        .map(husk_vmm::api::bind)
        .transpose()?;
    // Once bound the socket file is ours: removed however this function ends.
    if api.is_some() {
        leftovers.owned.push(Owned::Api);
    }
    let confinement = Confinement {
        filters: filters.clone(),
        connector: Some(broker),
    };
    let vmm = Vmm::build(&cfg, &confinement)?;
    // The vsock socket is ours once the VM is built (a taken path fails the build first).
    if cfg.vsock_sock.is_some() {
        leftovers.owned.push(Owned::Vsock);
    }
    signals
        .forward_to(vmm.exit_sender(), &filters)
        .map_err(|e| anyhow::anyhow!("handling SIGTERM/SIGINT: {e}"))?;
    if let Some(listener) = api {
        vmm.api_context()
            .serve(listener, &filters)
            .map_err(|e| anyhow::anyhow!("starting the API thread: {e}"))?;
    }
    // Each thread started so far installs its filter as the first thing it does; the vCPU
    // threads and this one follow in `run`, after which no thread is started.
    Ok(vmm.run()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(reason) => {
            if let ExitReason::Fatal(msg) = &reason {
                eprintln!("husk-vmm: guest stopped: {msg}");
            }
            ExitCode::from(u8::try_from(reason.exit_code()).unwrap_or(1))
        }
        Err(e) => {
            // Every error message of the library already names its cause; printing the
            // source chain too would repeat it.
            eprintln!("husk-vmm: {e}");
            ExitCode::from(1)
        }
    }
}
