//! `cargo xtask doctor`: checks this host the way `kata-runtime check` does — one line per
//! check, and a fix for every failure.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};
use husk_hypervisor::host::{self, BackendChoice, HostKind, KvmProbe};
use husk_hypervisor::Accel;

use crate::paths;

#[derive(Debug)]
pub struct Check {
    pub ok: bool,
    pub what: String,
    pub detail: String,
}

fn check(ok: bool, what: &str, detail: impl Into<String>) -> Check {
    Check {
        ok,
        what: what.into(),
        detail: detail.into(),
    }
}

fn version_of(program: &Path, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

fn program(name: &str, arg: &str, fix: &str) -> Check {
    match paths::find_program(name) {
        Some(p) => check(
            true,
            name,
            format!("{} ({})", p.display(), version_of(&p, arg)),
        ),
        None => check(false, name, format!("not found — {fix}")),
    }
}

/// What stands between a guest and the host with this backend. Under TCG it is QEMU's
/// emulator, which QEMU's security policy does not cover (it treats only KVM guests as a
/// security boundary): said plainly, with the switch that refuses it.
fn isolation(backend: &BackendChoice) -> Check {
    match backend {
        BackendChoice::Qemu(Accel::Tcg) => check(
            true,
            "isolation",
            "the guest runs under QEMU's TCG emulator: the boundary is then the emulator, which \
             QEMU's security policy does not treat as a security boundary — fine for development \
             and CI, not for untrusted workloads; set allow_emulation = false in \
             /etc/husk/config.toml to refuse such sandboxes (docs/SECURITY.md)",
        ),
        _ => check(
            true,
            "isolation",
            "hardware virtualisation (KVM), with the VMM and its helpers jailed (docs/SECURITY.md)",
        ),
    }
}

pub fn checks() -> Vec<Check> {
    let report = host::detect();
    let mut v = Vec::new();
    v.push(match &report.kvm {
        KvmProbe::Usable { api_version, .. } => check(
            true,
            "/dev/kvm",
            format!("present; a VM and a vCPU were created (KVM API {api_version})"),
        ),
        KvmProbe::Unusable(why) => check(false, "/dev/kvm", why.clone()),
    });
    let kind = match &report.kind {
        HostKind::HardwareKvm { vendor } => format!("hardware KVM ({vendor})"),
        HostKind::Pvm => "PVM (kvm_pvm: software virtualisation, no VT-x/AMD-V)".into(),
        HostKind::NoKvm => "no usable KVM".into(),
    };
    v.push(check(true, "host kind", kind));
    v.push(check(
        true,
        "backend",
        format!("{} — {}", report.backend, report.why),
    ));
    v.push(isolation(&report.backend));
    if report.backend == BackendChoice::Qemu(Accel::Tcg) {
        // Informational either way: a guest without the rate still runs, with a coarse clock
        // when the host is busy.
        v.push(check(
            true,
            "guest clock (TCG)",
            match report.guest_tsc_khz {
                Some(k) => format!(
                    "the host's invariant TSC, {k} kHz, is given to each guest (tsc_early_khz), so a guest keeps a TSC clock however busy the host"
                ),
                None => "the host's TSC is not known to be invariant (constant_tsc, nonstop_tsc), the host's kernel does not keep time with it (its clocksource is not tsc), or KVM does not report its rate: each guest measures its TSC against its PIT, and on a busy host falls back to a 4 ms jiffies clock".into(),
            },
        ));
    }
    v.push(tier4(&report.kind));
    v.push(guest_ram_pages());
    v.push(pool());
    v.push(program(
        "qemu-system-x86_64",
        "--version",
        "apt-get install qemu-system-x86 (cargo xtask setup)",
    ));
    v.push(program(
        "containerd",
        "--version",
        "apt-get install containerd (cargo xtask setup)",
    ));
    v.push(program(
        "ctr",
        "--version",
        "apt-get install containerd (cargo xtask setup)",
    ));
    v.push(program(
        "runc",
        "--version",
        "apt-get install runc (cargo xtask setup)",
    ));
    v.push(program(
        "virtiofsd",
        "--version",
        "cargo install --locked virtiofsd (cargo xtask setup)",
    ));
    v.push(program(
        "vhost-device-vsock",
        "--version",
        "cargo install --locked vhost-device-vsock (cargo xtask setup)",
    ));
    let cni = Path::new("/usr/lib/cni/bridge");
    v.push(check(
        cni.is_file(),
        "CNI plugins",
        if cni.is_file() {
            "/usr/lib/cni (bridge, host-local, loopback)".to_string()
        } else {
            "/usr/lib/cni/bridge not found — apt-get install containernetworking-plugins (cargo xtask setup)".into()
        },
    ));
    let kernel = paths::vmlinux();
    v.push(match husk_hypervisor::kernel::pvh_entry(&kernel) {
        Ok(Some(entry)) => check(
            true,
            "guest kernel",
            format!(
                "{} (PVH entry {entry:#x})",
                std::fs::canonicalize(&kernel).unwrap_or(kernel).display()
            ),
        ),
        Ok(None) => check(
            false,
            "guest kernel",
            format!(
                "{}: no PVH entry note — rebuild with `cargo xtask kernel`",
                kernel.display()
            ),
        ),
        Err(_) => check(
            false,
            "guest kernel",
            format!(
                "{}: missing — build it with `cargo xtask kernel`",
                kernel.display()
            ),
        ),
    });
    let initramfs = paths::initramfs();
    let magic = std::fs::read(&initramfs)
        .ok()
        .map(|b| b.starts_with(b"070701"));
    v.push(match magic {
        Some(true) => check(
            true,
            "guest initramfs",
            format!("{} (newc, uncompressed)", initramfs.display()),
        ),
        Some(false) => check(
            false,
            "guest initramfs",
            format!(
                "{}: not an uncompressed newc cpio — rebuild with `cargo xtask rootfs`",
                initramfs.display()
            ),
        ),
        None => check(
            false,
            "guest initramfs",
            format!(
                "{}: missing — build it with `cargo xtask rootfs`",
                initramfs.display()
            ),
        ),
    });
    v
}

const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// The selected word of `shmem_enabled` (`always within_size [advise] never deny force`).
pub fn selected_mode(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
}

/// Whether husk-vmm's guest RAM (a memfd it marks `MADV_HUGEPAGE`) gets 2 MiB pages here:
/// a hint, never a failure — 4 KiB pages only make the guest's boot slower (BENCHMARKS.md,
/// "Linux boot on husk-vmm in L1").
fn guest_ram_pages() -> Check {
    const WHAT: &str = "guest RAM pages (husk-vmm)";
    let text = std::fs::read_to_string(SHMEM_ENABLED).unwrap_or_default();
    match selected_mode(&text) {
        Some(m @ ("always" | "within_size" | "advise" | "force")) => {
            check(true, WHAT, format!("2 MiB (shmem_enabled={m})"))
        }
        Some(m) => check(
            true,
            WHAT,
            format!(
                "4 KiB (shmem_enabled={m}); for 2 MiB pages and a quicker guest boot: echo advise > {SHMEM_ENABLED}"
            ),
        ),
        None => check(true, WHAT, "4 KiB (this kernel has no transparent huge pages)"),
    }
}

/// The warm pool (`[pool]` in the shim's configuration), as `containerd-shim-husk-v2 pool
/// status` reports it: off, or how many VMs are ready of how many, and the last failure.
fn pool() -> Check {
    const WHAT: &str = "warm pool";
    let built = paths::workspace().join("target/release/containerd-shim-husk-v2");
    let shim = if built.is_file() {
        Some(built)
    } else {
        paths::find_program("containerd-shim-husk-v2")
    };
    let Some(shim) = shim else {
        return check(
            true,
            WHAT,
            "not checked: containerd-shim-husk-v2 is not built (cargo xtask build)",
        );
    };
    let out = Command::new(&shim).args(["pool", "status"]).output();
    let Ok(out) = out else {
        return check(false, WHAT, format!("{}: cannot run it", shim.display()));
    };
    if !out.status.success() {
        return check(
            true,
            WHAT,
            "no holder runs (the pool is off unless [pool] size is set in /etc/husk/config.toml; the first shim then starts one)",
        );
    }
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let (ready, size) = (
        s["ready"].as_u64().unwrap_or(0),
        s["size"].as_u64().unwrap_or(0),
    );
    let failing = ready == 0 && s["failed"].as_u64().unwrap_or(0) > 0;
    check(
        !failing,
        WHAT,
        format!(
            "holder {}: {ready} of {size} VM(s) ready, {} booting ({} vCPU, {} MiB on {}); claimed {}, died {}, failed boots {}{}",
            s["holder_pid"],
            s["booting"],
            s["shape"]["vcpus"],
            s["shape"]["memory_mib"],
            s["shape"]["backend"].as_str().unwrap_or("?"),
            s["claimed"],
            s["died"],
            s["failed"],
            s["last_error"]
                .as_str()
                .map(|e| format!(" — last error: {}", e.lines().next().unwrap_or("")))
                .unwrap_or_default()
        ),
    )
}

/// Where this host runs the tier-4 tests (Linux on husk-vmm) of `cargo xtask test`.
fn tier4(kind: &HostKind) -> Check {
    const WHAT: &str = "tier 4 (Linux on husk-vmm)";
    match kind {
        HostKind::HardwareKvm { vendor } => {
            check(true, WHAT, format!("direct: on this host's {vendor}"))
        }
        HostKind::Pvm | HostKind::NoKvm => match paths::find_program("qemu-system-x86_64") {
            Some(_) => check(
                true,
                WHAT,
                format!(
                    "nested: in an L1 VM under QEMU TCG with emulated AMD SVM (`-cpu max`), whose kvm_amd gives a real /dev/kvm; {}",
                    crate::nested::l1::describe()
                ),
            ),
            None => check(
                false,
                WHAT,
                "nested (this host has no hardware KVM), which needs qemu-system-x86_64 — apt-get install qemu-system-x86 (cargo xtask setup)",
            ),
        },
    }
}

pub fn print(checks: &[Check]) {
    for c in checks {
        println!(
            "[{}] {}: {}",
            if c.ok { " ok " } else { "FAIL" },
            c.what,
            c.detail
        );
    }
}

pub fn run() -> Result<()> {
    let c = checks();
    print(&c);
    let failed = c.iter().filter(|c| !c.ok).count();
    if failed > 0 {
        bail!("{failed} check(s) failed; `cargo xtask setup`, `cargo xtask kernel` and `cargo xtask rootfs` fix most");
    }
    println!("husk can run on this host.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_selected_shmem_mode() {
        assert_eq!(
            selected_mode("always within_size [advise] never deny force\n"),
            Some("advise")
        );
        assert_eq!(
            selected_mode("always within_size advise [never] deny force"),
            Some("never")
        );
        assert_eq!(selected_mode(""), None);
    }
}
