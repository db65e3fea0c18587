//! `cargo xtask build`: husk's binaries. The agent is built separately: statically linked
//! (glibc's static libc, the one C library this machine has for Rust's gnu target) and with
//! the small `guest` profile, because it is the guest's `/init`. husk-vmm is static too (a
//! static-pie with glibc's libc.a): no dynamic loader, no relocations of shared libraries
//! before `main` — the start of every VM (issue 15; bench scenario 8). It needs nothing a
//! static glibc cannot give: no NSS (no user, group or host lookups), no `dlopen`, no
//! `iconv`; its seccomp filters allow the same calls (the tier-2 tests run it). It is put at
//! `target/release/husk-vmm`, where the shim (beside it), `install`, the deploy image, the
//! bench and the nested tier take it.

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
    if !is_static(&bin)? {
        bail!(
            "{} is dynamically linked; it must be static to run as the guest's /init",
            bin.display(),
        );
    }
    println!(
        "    {} ({} KiB, static)",
        bin.display(),
        std::fs::metadata(&bin)?.len() / 1024
    );
    Ok(bin)
}

/// Whether the ELF at `path` is statically linked (no interpreter, no shared libraries).
pub fn is_static(path: &std::path::Path) -> Result<bool> {
    let bytes = std::fs::read(path)?;
    let elf = goblin::elf::Elf::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not an ELF binary: {e}", path.display()))?;
    Ok(elf.interpreter.is_none() && elf.libraries.is_empty())
}

/// Release builds of the host binaries (husk-vmm: [`vmm`]).
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
            "--exclude",
            "husk-vmm",
        ]))?;
    vmm().map(drop)
}

/// Builds husk-vmm as a static-pie for the explicit host target (so only its own crates get
/// crt-static: build scripts and proc macros stay dynamic host programs, and the other
/// binaries' build is untouched), in the release or the debug profile; returns the path
/// cargo wrote it to, checked static.
fn static_vmm(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new(paths::cargo());
    cmd.current_dir(paths::workspace())
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .args([
            "build",
            "--quiet",
            "-p",
            "husk-vmm",
            "--bin",
            "husk-vmm",
            "--target",
            HOST_TARGET,
        ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let built = paths::workspace()
        .join("target")
        .join(HOST_TARGET)
        .join(if release { "release" } else { "debug" })
        .join("husk-vmm");
    if !is_static(&built)? {
        bail!(
            "{} is dynamically linked; crt-static did not take (is glibc's libc.a installed? apt-get install libc6-dev)",
            built.display()
        );
    }
    Ok(built)
}

/// The static husk-vmm, put at `target/release/husk-vmm`. Returns that path.
pub fn vmm() -> Result<PathBuf> {
    step("build: husk-vmm (release, static-pie)");
    let built = static_vmm(true)?;
    let target = paths::workspace().join("target");
    let dest = target.join("release").join("husk-vmm");
    std::fs::create_dir_all(target.join("release"))?;
    // Copied under a temporary name and renamed: a husk-vmm starting meanwhile sees either
    // the old file or the new one, never a half-written one.
    let tmp = target.join("release").join(".husk-vmm.static.tmp");
    std::fs::copy(&built, &tmp)?;
    std::fs::rename(&tmp, &dest)?;
    println!(
        "    {} ({} KiB, static-pie)",
        dest.display(),
        std::fs::metadata(&dest)?.len() / 1024
    );
    Ok(dest)
}

/// The static husk-vmm in the debug profile, for the tests (`HUSK_VMM`): the same binary as
/// users run but for the debug-only hooks `tests/tests/vmm_seccomp.rs` drives
/// (`husk_vmm::debug_hooks`). Returns its path.
pub fn vmm_for_tests() -> Result<PathBuf> {
    step("build: husk-vmm for the tests (debug, static-pie)");
    static_vmm(false)
}

pub fn build_all() -> Result<PathBuf> {
    host()?;
    agent()
}
