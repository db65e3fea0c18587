//! What a VM is made of, as the CLI (or a library caller) describes it.

use std::path::PathBuf;

/// The command line every guest gets before any extra arguments: serial console, reset
/// through the i8042 controller, no PCI probing, no modules.
pub(crate) const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Default vCPU count.
pub const DEFAULT_VCPUS: u8 = 1;
/// Default guest CID (0-2 are reserved).
pub const DEFAULT_VSOCK_CID: u64 = 3;
/// Default memory size in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 128;

/// A VM's configuration.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// The ELF kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: Option<PathBuf>,
    /// Arguments appended to [`DEFAULT_CMDLINE`] (and to the devices' `virtio_mmio.device=`).
    pub cmdline_extra: Option<String>,
    /// Replace the default command line instead of extending it.
    pub cmdline_replace: bool,
    /// vCPU count.
    pub vcpus: u8,
    /// RAM size in MiB.
    pub memory_mib: u64,
    /// Where the serial console is logged.
    pub console_log: Option<PathBuf>,
    /// Also (or only) copy the serial console to stdout.
    pub console_stdout: bool,
    /// Give the guest a virtio-rng device.
    pub rng: bool,
    /// Give the guest a hybrid virtio-vsock device served on this unix socket.
    pub vsock_sock: Option<PathBuf>,
    /// The guest's vsock CID.
    pub vsock_cid: u64,
    /// virtio-net cards, each on its tap with its MAC.
    pub net: Vec<NicConfig>,
    /// virtio-fs devices: (tag, vhost-user socket of its backend).
    pub fs: Vec<(String, PathBuf)>,
}

/// A virtio-net card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    /// Tap name (opened, or created if missing).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// The MAC a card gets when none is given: locally administered, "husk".
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x68, 0x75, 0x73, 0x6b, 0x00];

impl MachineConfig {
    /// A configuration with every default, booting `kernel`.
    pub fn new(kernel: PathBuf) -> Self {
        Self {
            kernel,
            initrd: None,
            cmdline_extra: None,
            cmdline_replace: false,
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            console_log: None,
            console_stdout: true,
            rng: false,
            vsock_sock: None,
            vsock_cid: DEFAULT_VSOCK_CID,
            net: Vec::new(),
            fs: Vec::new(),
        }
    }

    /// The full kernel command line, with the devices' own arguments.
    pub fn cmdline(&self, device_args: &[String]) -> String {
        let mut parts: Vec<String> = Vec::new();
        if !self.cmdline_replace {
            parts.push(DEFAULT_CMDLINE.to_owned());
        }
        parts.extend(device_args.iter().cloned());
        if let Some(extra) = &self.cmdline_extra {
            parts.push(extra.clone());
        }
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_defaults_then_devices_then_extra() {
        let mut c = MachineConfig::new("vmlinux".into());
        c.cmdline_extra = Some("quiet".into());
        let s = c.cmdline(&["virtio_mmio.device=4K@0xd0000000:5".into()]);
        assert!(s.starts_with(DEFAULT_CMDLINE));
        assert!(s.ends_with("virtio_mmio.device=4K@0xd0000000:5 quiet"));
        c.cmdline_replace = true;
        assert_eq!(c.cmdline(&[]), "quiet");
    }
}
