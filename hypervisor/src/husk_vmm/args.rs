//! husk-vmm's command line for a husk guest, and the files the VM keeps in its state
//! directory.
//!
//! - the console goes to husk-vmm's stdout only (no `--console-log`): a pipe to the
//!   [`crate::console::ConsoleRelay`] that writes `console.log` with a size cap; on stdout,
//!   husk-vmm also feeds its stdin to COM1, which the backend keeps as a pipe
//!   ([`crate::Vm::console_write`]); husk-vmm's own messages (stderr) go to `vmm.log`;
//! - `--die-with-parent`: the VM ends with the thread that started it (as QEMU does through
//!   `Supervised`'s PDEATHSIG; husk-vmm turns it into an orderly shutdown);
//! - the kernel command line is husk-vmm's defaults (serial console, `reboot=k` through its
//!   i8042 reset port, `pci=off`) plus `quiet` and the caller's extras.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{VmConfig, GUEST_CID, SHARED_FS_TAG};

/// Added to husk-vmm's default kernel command line before the caller's extras.
/// (`no_timer_check`: see the qemu backend's command line.)
pub const CMDLINE: &str = "quiet no_timer_check dummy.numdummies=0";

/// Files this VM keeps in its state directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub console_log: PathBuf,
    /// husk-vmm's control API (`pause`, `resume`, `shutdown`, … one per line).
    pub api_sock: PathBuf,
    /// husk-vmm's own messages (its stderr).
    pub vmm_log: PathBuf,
    /// The hybrid-vsock socket; guest connections to host port P arrive on `<vsock_sock>_P`.
    pub vsock_sock: PathBuf,
    pub virtiofsd_sock: PathBuf,
    pub virtiofsd_log: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            console_log: state_dir.join("console.log"),
            api_sock: state_dir.join("api.sock"),
            vmm_log: state_dir.join("vmm.log"),
            vsock_sock: state_dir.join("vsock.sock"),
            virtiofsd_sock: state_dir.join("virtiofsd.sock"),
            virtiofsd_log: state_dir.join("virtiofsd.log"),
        }
    }

    /// The sockets, which a killed husk-vmm or virtiofsd leaves behind.
    pub fn sockets(&self) -> [&Path; 3] {
        [&self.api_sock, &self.vsock_sock, &self.virtiofsd_sock]
    }
}

/// husk-vmm's arguments (without the program name).
pub fn args(config: &VmConfig, paths: &Paths) -> Vec<OsString> {
    let mut cmdline = CMDLINE.to_string();
    if !config.cmdline_extra.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(config.cmdline_extra.trim());
    }
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |k: &str, v: &dyn AsRef<std::ffi::OsStr>| {
        a.push(k.into());
        a.push(v.as_ref().to_owned());
    };
    push("--kernel", &config.kernel);
    push("--initrd", &config.initramfs);
    push("--cmdline", &cmdline);
    push("--vcpus", &config.vcpus.to_string());
    push("--memory", &config.memory_mib.to_string());
    push("--api-sock", &paths.api_sock);
    if config.vsock {
        push("--vsock-sock", &paths.vsock_sock);
        push("--vsock-cid", &GUEST_CID.to_string());
    }
    if config.shared_dir.is_some() {
        push("--fs-sock", &paths.virtiofsd_sock);
        push("--fs-tag", &SHARED_FS_TAG);
    }
    // The caller's taps, open in the pod's network namespace: husk-vmm inherits each under
    // the same number (the backend clears close-on-exec for it alone).
    for net in &config.nets {
        push("--net-tap", &format!("fd:{}", net.tap.as_raw_fd()));
        push("--net-mac", &net.mac_string());
    }
    a.push("--console-stdout".into());
    a.push("--die-with-parent".into());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vsock: bool, shared: bool) -> VmConfig {
        VmConfig {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio".into(),
            cmdline_extra: " husk.timeout=3 ".into(),
            vcpus: 2,
            memory_mib: 256,
            state_dir: "/run/husk/x".into(),
            shared_dir: shared.then(|| "/run/husk/x/shared".into()),
            vsock,
            nets: Vec::new(),
            jail: None,
        }
    }

    fn joined(c: &VmConfig) -> String {
        let a = args(c, &Paths::new(&c.state_dir));
        a.iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn every_setting_reaches_the_command_line() {
        let s = joined(&config(true, true));
        for want in [
            "--kernel /k/vmlinux",
            "--initrd /k/initramfs.cpio",
            "--cmdline quiet no_timer_check dummy.numdummies=0 husk.timeout=3 --",
            "--vcpus 2",
            "--memory 256",
            "--api-sock /run/husk/x/api.sock",
            "--vsock-sock /run/husk/x/vsock.sock --vsock-cid 3",
            "--fs-sock /run/husk/x/virtiofsd.sock --fs-tag husk-shared",
            "--console-stdout",
            "--die-with-parent",
        ] {
            assert!(s.contains(want), "{want:?} missing from {s}");
        }
    }

    #[test]
    fn the_console_goes_to_stdout_only() {
        // husk-vmm writes no log file of its own: the relay behind its stdout caps it.
        let s = joined(&config(true, true));
        assert!(!s.contains("--console-log"), "{s}");
    }

    #[test]
    fn devices_only_when_asked() {
        let s = joined(&config(false, false));
        assert!(!s.contains("--vsock") && !s.contains("--fs-"), "{s}");
    }
}
