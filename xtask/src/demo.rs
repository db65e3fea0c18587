//! `cargo xtask demo`: set everything up, start a private containerd, and run a container in
//! a husk microVM with `ctr run --runtime io.containerd.husk.v2`.

use std::time::Instant;

use anyhow::{bail, Result};
use husk_hypervisor::host;
use husk_tests::husk::{HuskContainerd, BUSYBOX};

use crate::run::step;
use crate::{binaries, deploy_image, kernel, rootfs, setup};

/// Prepares everything the demo and the tests need.
pub fn prepare(with_setup: bool) -> Result<()> {
    if with_setup {
        setup::run()?;
    }
    kernel::build(false)?;
    let agent = binaries::build_all()?;
    rootfs::build(&agent)?;
    deploy_image::build().map(drop)
}

const SCRIPT: &str = "echo \"Hello from a container in a husk microVM\"; \
     echo \"guest kernel: $(uname -r), $(nproc) vCPU, $(grep MemTotal /proc/meminfo | tr -s ' ')\"; \
     echo \"container: hostname $(hostname), user $(id -u), $(ls /bin | wc -l) busybox applets\"";

pub fn run() -> Result<()> {
    prepare(true)?;
    let report = host::detect();
    step(&format!(
        "demo: this host runs husk guests on {} — {}",
        report.backend, report.why
    ));
    step("demo: starting a private containerd and importing husk.local/busybox:latest");
    let h = HuskContainerd::start();
    let id = format!("husk-demo-{}", std::process::id());
    let cmd = [
        "run",
        "--rm",
        "--runtime",
        "io.containerd.husk.v2",
        BUSYBOX,
        &id,
        "sh",
        "-c",
        SCRIPT,
    ];
    step(&format!("demo: ctr {}", cmd[..5].join(" ")));
    let started = Instant::now();
    let out = h.ctd.ctr(&cmd);
    let took = started.elapsed();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!(
            "the demo container failed ({}); containerd's log:\n{}",
            out.status,
            h.ctd.log()
        );
    }
    println!(
        "    ran in {:.2} s: VM boot, agent, container and teardown (host kernel: {})",
        took.as_secs_f64(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    Ok(())
}
