//! `cargo xtask setup`: install what husk needs on a Debian 12 machine, skipping what is there.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::paths;
use crate::run::{self, elapsed, output, step};

/// Debian packages, and why each is needed.
pub const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "containerd",
        "the container manager husk plugs into (ctr, CRI)",
    ),
    ("runc", "the baseline runtime of tests and benchmarks"),
    (
        "containernetworking-plugins",
        "CNI bridge/host-local/loopback for pod networks",
    ),
    ("busybox-static", "the test and demo images"),
    ("linux-source-6.1", "the guest kernel source"),
    (
        "build-essential",
        "the kernel build (gcc, make) and C parts of crates",
    ),
    ("bc", "the kernel build"),
    ("bison", "the kernel build (Kconfig)"),
    ("flex", "the kernel build (Kconfig)"),
    ("libelf-dev", "the kernel build (objtool)"),
    ("libssl-dev", "the kernel build (sign-file, extract-cert)"),
    ("xz-utils", "unpacking linux-source-6.1.tar.xz"),
    ("qemu-system-x86", "the qemu backend (microvm machine)"),
    ("libseccomp-dev", "building virtiofsd"),
    ("libcap-ng-dev", "building virtiofsd"),
    ("pkg-config", "building virtiofsd"),
    ("cpio", "reading initramfs archives back in tests"),
    ("iproute2", "network namespaces in tests"),
    ("procps", "pgrep in tests (a helper that outlived its VM)"),
    (
        "protobuf-compiler",
        "protoc, for the Kubernetes CRI client the tests use",
    ),
];

/// rustup components, and the cargo subcommand each provides.
pub const RUST_COMPONENTS: &[(&str, &str)] = &[("rustfmt", "fmt"), ("clippy", "clippy")];

/// Programs installed with `cargo install --locked`.
pub const CARGO_PROGRAMS: &[(&str, &str)] = &[
    (
        "virtiofsd",
        "virtio-fs backend: shares container root file systems with the guest",
    ),
    (
        "vhost-device-vsock",
        "vsock backend of the qemu backend (hybrid vsock on a unix socket)",
    ),
];

fn apt_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", pkg])
        .output()
        .map(|o| o.status.success() && o.stdout.starts_with(b"ii"))
        .unwrap_or(false)
}

/// Those of `packages` that dpkg does not have installed.
fn not_installed<'a>(packages: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    packages.into_iter().filter(|p| !apt_installed(p)).collect()
}

pub fn missing_apt() -> Vec<&'static str> {
    not_installed(APT_PACKAGES.iter().map(|(p, _)| *p))
}

pub fn run() -> Result<()> {
    let start = Instant::now();
    rust_components()?;
    step("setup: Debian packages");
    let missing = missing_apt();
    if missing.is_empty() {
        println!("    all {} packages present", APT_PACKAGES.len());
    } else {
        apt_install(&missing)?;
    }
    step("setup: programs from crates.io");
    for (prog, why) in CARGO_PROGRAMS {
        if let Some(p) = paths::find_program(prog) {
            println!("    {prog}: {}", p.display());
            continue;
        }
        println!("    installing {prog} ({why}); takes a minute");
        run::run(Command::new(paths::cargo()).args(["install", "--locked", prog]))?;
    }
    println!("    setup done in {}", elapsed(start));
    Ok(())
}

/// Debian packages the unit tests use (`cargo xtask check` runs them before `setup`): protoc
/// (the tests crate's CRI client, which clippy compiles too), busybox-static (the image
/// builder's tests build a busybox image) and cpio (the initramfs writer's test reads its
/// archive back with the cpio tool). Each is also in [`APT_PACKAGES`].
pub const CHECK_PACKAGES: &[&str] = &["protobuf-compiler", "busybox-static", "cpio"];

/// What `cargo xtask check` needs beyond Rust: rustfmt, clippy, and [`CHECK_PACKAGES`]. Not
/// the rest of `run`'s list.
pub fn for_check() -> Result<()> {
    rust_components()?;
    let missing = not_installed(CHECK_PACKAGES.iter().copied());
    if !missing.is_empty() {
        step(&format!(
            "setup: {}, for clippy and the unit tests",
            missing.join(" ")
        ));
        apt_install(&missing)?;
    }
    Ok(())
}

/// rustup components `cargo xtask check` runs: `cargo fmt`, `cargo clippy`. A toolchain
/// installed with rustup's `minimal` profile has neither.
fn rust_components() -> Result<()> {
    let missing: Vec<&str> = RUST_COMPONENTS
        .iter()
        .filter(|(_, sub)| {
            !Command::new(paths::cargo())
                .args([sub, "--version"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(c, _)| *c)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "setup: rustup component add {}",
        missing.join(" ")
    ));
    run::run(
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing),
    )
    .with_context(|| {
        format!(
            "installing the Rust components {} (cargo fmt, cargo clippy) with rustup; \
             without rustup, install them the way your Rust was installed",
            missing.join(" ")
        )
    })
}

/// `apt-get install`s `packages`, saying why each is needed; fails unless all are then there.
fn apt_install(packages: &[&str]) -> Result<()> {
    if !nix_is_root() {
        bail!(
            "packages missing ({}) and installing them needs root: run `cargo xtask setup` as root",
            packages.join(" ")
        );
    }
    for p in packages {
        let why = APT_PACKAGES
            .iter()
            .find(|(n, _)| n == p)
            .map_or("", |(_, w)| w);
        println!("    installing {p}: {why}");
    }
    run::run(Command::new("apt-get").args(["update", "-q"]))?;
    run::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages),
    )?;
    let still = not_installed(packages.iter().copied());
    if !still.is_empty() {
        bail!("apt-get did not install: {}", still.join(" "));
    }
    Ok(())
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u"))
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_check_installs_setup_installs_too() {
        for p in CHECK_PACKAGES {
            assert!(
                APT_PACKAGES.iter().any(|(q, _)| q == p),
                "{p} is installed by `check` but missing from setup's list"
            );
        }
    }
}
