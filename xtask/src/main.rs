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
        Cmd::Bench { quick } => bench::run(quick),
        Cmd::Soak {
            cycles,
            parallel,
            no_setup,
            record,
        } => soak::run(cycles, parallel, !no_setup, record),
        Cmd::Install => install::run(),
        Cmd::Doctor => doctor::run(),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
