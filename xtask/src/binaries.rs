//! `cargo xtask build`: husk's binaries. The agent is built separately: statically linked
//! (glibc's static libc, the one C library this machine has for Rust's gnu target) and with
//! the small `guest` profile, because it is the guest's `/init`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};

use crate::paths;
use crate::run::{run, step};

const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the static agent; returns its path.
pub fn agent() -> Result<PathBuf> {
    step("build: husk-agent (static, guest profile)");
    run(Command::new(paths::cargo())
        .current_dir(paths::workspace())
        // Only the agent's own target gets crt-static; build scripts and proc macros stay
        // dynamic host programs.
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .args([
            "build",
            "--quiet",
            "-p",
            "husk-agent",
            "--profile",
            "guest",
            "--target",
            HOST_TARGET,
        ]))?;
    let bin = paths::workspace()
        .join("target")
        .join(HOST_TARGET)
        .join("guest")
        .join("husk-agent");
    let bytes = std::fs::read(&bin)?;
    let elf = goblin::elf::Elf::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not an ELF binary: {e}", bin.display()))?;
    if elf.interpreter.is_some() || !elf.libraries.is_empty() {
        bail!(
            "{} is dynamically linked ({:?}); it must be static to run as the guest's /init",
            bin.display(),
            elf.libraries
        );
    }
    println!("    {} ({} KiB, static)", bin.display(), bytes.len() / 1024);
    Ok(bin)
}

/// Release builds of the host binaries.
pub fn host() -> Result<()> {
    step("build: host binaries (release)");
    run(Command::new(paths::cargo())
        .current_dir(paths::workspace())
        .args([
            "build",
            "--quiet",
            "--release",
            "--bins",
            "--workspace",
            "--exclude",
            "xtask",
            "--exclude",
            "husk-agent",
        ]))
}

pub fn build_all() -> Result<PathBuf> {
    host()?;
    agent()
}
