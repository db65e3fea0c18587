//! A booted guest with the agent reachable over vsock: the VM (qemu backend, virtio-fs on
//! `<state>/shared`, vsock), its state directory, and a connected agent client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_hypervisor::console::{wait_for_ready, ReadyLine};
use husk_hypervisor::host;
use husk_hypervisor::qemu::Qemu;
use husk_hypervisor::{Hypervisor, Vm, VmConfig};

use crate::agent::{busybox_rootfs, Agent};

/// The line the guest of [`silent_initramfs`] prints once its /init runs.
pub const SILENT_INIT_UP: &str = "silent-init-up";

/// Writes `dir/silent.cpio`: an initramfs whose /init (busybox sh) boots, prints
/// [`SILENT_INIT_UP`] on the console and sleeps, never serving the agent API nor printing
/// its ready line. Returns its path.
pub fn silent_initramfs(dir: &Path) -> PathBuf {
    use husk_rootfs_builder::initramfs::write_cpio;
    use husk_rootfs_builder::tree::{Content, Tree};
    let busybox = crate::require_program("busybox", "busybox-static");
    let mut t = Tree::new();
    let init = format!("#!/bin/sh\necho {SILENT_INIT_UP}\nexec sleep 1000\n");
    t.file("init", Content::Bytes(init.into_bytes()), 0o755)
        .unwrap();
    t.file("bin/busybox", Content::HostFile(busybox), 0o755)
        .unwrap();
    t.symlink("bin/sh", "busybox").unwrap();
    t.symlink("bin/sleep", "busybox").unwrap();
    t.char_dev("dev/console", 5, 1, 0o600).unwrap();
    let cpio = dir.join("silent.cpio");
    std::fs::write(&cpio, write_cpio(&t, Vec::new()).unwrap()).unwrap();
    cpio
}

/// TCG boots our kernel in ~1 s here; leave room for a loaded 2-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Guest {
    pub vm: Box<dyn Vm>,
    pub agent: Agent,
    pub ready: ReadyLine,
    /// Boot to ready as the host saw it.
    pub boot: Duration,
    pub dir: tempfile::TempDir,
}

impl Guest {
    /// Boots a guest (`memory_mib`) and connects to its agent.
    pub fn boot(memory_mib: u32) -> Self {
        Self::boot_with(memory_mib, "")
    }

    /// [`Guest::boot`] with more kernel command line (e.g. `husk.log=debug`).
    pub fn boot_with(memory_mib: u32, cmdline_extra: &str) -> Self {
        crate::require_root("virtiofsd's sandbox and the guest's containers need root");
        crate::require_program("qemu-system-x86_64", "qemu-system-x86");
        let host = host::detect();
        let accel = host.backend.qemu_accel();
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let cfg = VmConfig {
            kernel: crate::kernel(),
            initramfs: crate::initramfs(),
            cmdline_extra: cmdline_extra.into(),
            vcpus: 1,
            memory_mib,
            state_dir: dir.path().to_path_buf(),
            shared_dir: Some(shared),
            vsock: true,
            nets: Vec::new(),
            jail: None,
        };
        let t0 = std::time::Instant::now();
        let mut qemu = Qemu::new(accel).expect("qemu backend");
        qemu.guest_tsc_khz = host.guest_tsc_khz;
        let mut vm = qemu.start(&cfg).expect("starting the VM");
        let ready = wait_for_ready(vm.as_mut(), BOOT_TIMEOUT).expect("agent ready line");
        let boot = t0.elapsed();
        let sock = vm.vsock_socket().expect("vsock socket").to_path_buf();
        let agent = Agent::connect_vsock(&sock, Duration::from_secs(30));
        Self {
            vm,
            agent,
            ready,
            boot,
            dir,
        }
    }

    pub fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    /// A busybox rootfs for container `id` in the shared directory.
    pub fn rootfs(&self, id: &str) -> PathBuf {
        busybox_rootfs(&self.shared(), id)
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.vm.console_log()).unwrap_or_default()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.vm.kill();
    }
}
