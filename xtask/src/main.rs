//! `cargo xtask`: the only entry points a user of husk needs.
//!
//! `setup` installs what the project needs, `kernel` and `rootfs` build the guest, `build`
//! the binaries, `demo` and `test` do all of that and then show or test it, `doctor` checks the
//! host, `install` puts husk on this machine. Each step is skipped when already done, so the
//! two README commands (`cargo xtask demo`, `cargo xtask test`) work on a fresh machine and
//! are quick on a warm one.

mod bench;
mod binaries;
mod check;
mod demo;
mod deploy_image;
mod doctor;
mod install;
mod kconfig;
mod kernel;
mod nested;
mod paths;
mod rootfs;
mod run;
mod setup;
mod soak;
mod testing;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Set up, build, demo, test and install husk"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what husk needs (apt-get, cargo install); skips what is present.
    Setup,
    /// Build (or reuse from the cache) the guest vmlinux.
    Kernel {
        /// Also merge guest-kernel-config/debug.config.optional.
        #[arg(long)]
        debug: bool,
    },
    /// Build the guest initramfs and the test/demo OCI images.
    Rootfs,
    /// Build husk's binaries (the static agent included).
    Build,
    /// Build the node installer image (husk.local/husk-deploy:latest) → target/husk/images/.
    DeployImage,
    /// Set everything up and run the demo.
    Demo,
    /// Formatting, clippy (warnings are errors) and every crate's unit tests, as CI runs them.
    Check,
    /// Set everything up and run the whole test suite.
    Test {
        /// Skip `setup` (for a machine already set up).
        #[arg(long)]
        no_setup: bool,
        /// Only tests whose name contains this (passed to cargo test).
        filter: Option<String>,
    },
    /// Benchmarks (husk against runc and QEMU) → BENCHMARKS.md, benchmarks/.
    Bench {
        /// Fewer runs, for a CI smoke test; writes to target/husk/bench/ instead.
        #[arg(long)]
        quick: bool,
        /// Only the steps that make these scenarios (numbers as in BENCHMARKS.md, e.g.
        /// `--only 5` or `--only 5,12`); the report then goes where `--quick` writes it.
        #[arg(long, value_delimiter = ',')]
        only: Vec<u32>,
    },
    /// Soak: N create/start/exec/stop/delete cycles (ctr and CRI pods) with leak accounting.
    Soak {
        /// How many cycles.
        #[arg(long, default_value_t = soak::DEFAULT_CYCLES)]
        cycles: usize,
        /// How many at once.
        #[arg(long, default_value_t = 3)]
        parallel: usize,
        /// Skip `setup` (for a machine already set up).
        #[arg(long)]
        no_setup: bool,
        /// Put the table in BENCHMARKS.md's "Soak" section.
        #[arg(long)]
        record: bool,
    },
    /// Install binaries, kernel and initramfs on this machine.
    Install,
    /// Check this host like `kata-runtime check`.
    Doctor,
    /// Linux boot on husk-vmm against QEMU microvm (in the nested tier's L1 where the host has
    /// no hardware KVM): spawn → agent ready, memory, husk-vmm's exit counters.
    NestedBoot {
        /// Rounds of both VMMs (after a warm-up round).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The guest's command line (default: the one of issue #15, as the bench uses).
        #[arg(long)]
        cmdline: Option<String>,
        /// Print every console line with its time since spawn.
        #[arg(long)]
        show_console: bool,
        /// Boot this husk-vmm instead of target/release/husk-vmm (to compare builds).
        #[arg(long)]
        husk_vmm: Option<std::path::PathBuf>,
        /// QEMU boots first (in the warm-up round and every even round).
        #[arg(long)]
        qemu_first: bool,
        /// L1's /sys/kernel/mm/transparent_hugepage/shmem_enabled (default `advise`, as on a
        /// husk node; `never` is Debian's default).
        #[arg(long)]
        l1_shmem_thp: Option<String>,
        /// L1 frees memory without clearing it (Debian's default) instead of with
        /// init_on_free=1: later guests then pay for TCG dropping an earlier guest's code.
        #[arg(long)]
        l1_keep_freed: bool,
    },
    /// The nested tier of `cargo xtask test` alone: the tier-4 tests (Linux and the full stack
    /// on husk-vmm) in an L1 VM under QEMU TCG with emulated AMD SVM, on the host's `/`
    /// read-only. Run `cargo xtask build` first.
    NestedTest {
        /// Only tier-4 tests whose name contains this.
        filter: Option<String>,
    },
    /// Inside L1: the boot probe `nested-boot` runs (samples on stdout).
    #[command(hide = true)]
    BootProbe {
        #[arg(long)]
        rounds: usize,
        #[arg(long)]
        husk_vmm: std::path::PathBuf,
        #[arg(long)]
        qemu: std::path::PathBuf,
        #[arg(long)]
        kernel: std::path::PathBuf,
        #[arg(long)]
        initrd: std::path::PathBuf,
        #[arg(long)]
        cmdline: String,
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        show_console: bool,
        #[arg(long)]
        qemu_first: bool,
    },
    /// Inside the nested tier's L1: idle pods on husk-vmm and on runc, their host memory
    /// (bench scenario 14).
    #[command(hide = true)]
    PodProbe {
        #[arg(long)]
        rounds: usize,
        #[arg(long)]
        husk_vmm: std::path::PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Kernel { debug } => kernel::build(debug).map(drop),
        Cmd::Rootfs => binaries::agent().and_then(|a| rootfs::build(&a)),
        Cmd::Build => binaries::build_all().map(drop),
        Cmd::DeployImage => binaries::build_all()
            .and_then(|_| deploy_image::build())
            .map(drop),
        Cmd::Demo => demo::run(),
        Cmd::Check => check::run(),
        Cmd::Test { no_setup, filter } => testing::run(!no_setup, filter.as_deref()),
        Cmd::Bench { quick, only } => bench::Only::new(&only).and_then(|o| bench::run(quick, &o)),
        Cmd::Soak {
            cycles,
            parallel,
            no_setup,
            record,
        } => soak::run(cycles, parallel, !no_setup, record),
        Cmd::Install => install::run(),
        Cmd::Doctor => doctor::run(),
        Cmd::NestedTest { filter } => nested::run_alone(filter.as_deref()),
        Cmd::NestedBoot {
            rounds,
            cmdline,
            show_console,
            husk_vmm,
            qemu_first,
            l1_shmem_thp,
            l1_keep_freed,
        } => {
            let mut o = nested::linux_boot::Options::new(rounds);
            if let Some(c) = cmdline {
                o.cmdline = c;
            }
            o.show_console = show_console;
            o.husk_vmm = husk_vmm;
            o.qemu_first = qemu_first;
            o.l1_shmem_thp = l1_shmem_thp;
            o.l1_keep_freed = l1_keep_freed;
            nested::linux_boot::print(&o)
        }
        Cmd::PodProbe { rounds, husk_vmm } => nested::pod_probe::main(&husk_vmm, rounds),
        Cmd::BootProbe {
            rounds,
            husk_vmm,
            qemu,
            kernel,
            initrd,
            cmdline,
            dir,
            show_console,
            qemu_first,
        } => nested::probe::main(
            &nested::probe::Probe {
                husk_vmm,
                qemu,
                kernel,
                initramfs: initrd,
                cmdline,
                show_console,
                dir,
                qemu_first,
            },
            rounds,
        ),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
