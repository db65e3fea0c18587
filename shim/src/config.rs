//! `/etc/husk/config.toml`: what the shim boots and with how much.
//!
//! Every field has a default that works after `cargo xtask install`. A different file can be
//! named per runtime in containerd's config (`options.ConfigPath`, delivered to the shim as
//! `runtimeoptions.v1.Options`), per `ctr run --runtime-config-path`, or with `HUSK_CONFIG`.

use std::path::{Path, PathBuf};

use husk_hypervisor::helpers::check_program;
use husk_hypervisor::Programs;
use serde::{Deserialize, Serialize};

/// The default configuration file.
pub const DEFAULT_PATH: &str = "/etc/husk/config.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid configuration: {message}")]
    Parse { path: PathBuf, message: String },
    /// A configured program that cannot be run.
    #[error("{file}: {key} = {path:?}: {reason} — correct the path, or remove the line to use the {program} {found}")]
    Program {
        file: String,
        key: &'static str,
        path: PathBuf,
        reason: String,
        program: &'static str,
        found: &'static str,
    },
    /// A number outside what the key allows.
    #[error("{file}: {key} = {value}: must be between {min} and {max} — {why}")]
    Range {
        file: String,
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
        why: &'static str,
    },
    /// The debug console's shell cannot run in the guest.
    #[error("{file}: debug_shell = {path:?}: {reason} — the guest has no shell and no dynamic loader of its own: give a statically linked shell (Debian's busybox-static installs /bin/busybox), or set debug_console = false")]
    DebugShell {
        file: String,
        path: PathBuf,
        reason: String,
    },
}

/// Which backend starts the VM: `backend = "auto" | "qemu-tcg" | "qemu-kvm" | "husk-vmm"`
/// (another value is refused when the file is read, naming the key and the choices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// What `cargo xtask doctor` says this host runs best (also an empty value).
    #[default]
    #[serde(alias = "")]
    Auto,
    QemuTcg,
    QemuKvm,
    /// husk's own VMM (hardware KVM only).
    HuskVmm,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::QemuTcg => "qemu-tcg",
            Self::QemuKvm => "qemu-kvm",
            Self::HuskVmm => "husk-vmm",
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Guest kernel (uncompressed vmlinux with a PVH note).
    pub kernel: PathBuf,
    /// Guest initramfs (husk-agent as /init).
    pub initramfs: PathBuf,
    /// `auto`, `qemu-tcg`, `qemu-kvm` or `husk-vmm`.
    pub backend: Backend,
    /// vCPUs of a sandbox before its pod's CPU limits are added.
    pub vcpus: u32,
    /// Guest memory of a sandbox, MiB, before its pod's memory limit is added.
    pub memory_mib: u32,
    /// How long the agent may take to answer after the VM starts (TCG boots in ~1 s).
    pub agent_timeout_secs: u64,
    /// Extra guest kernel command line.
    pub kernel_params: String,
    /// Log level of the shim (error, warn, info, debug, trace).
    pub log_level: String,
    /// Where per-sandbox state lives.
    pub state_root: PathBuf,
    /// The programs the backends run; empty: found as without this file (QEMU, virtiofsd and
    /// vhost-device-vsock on PATH or in ~/.cargo/bin, husk-vmm beside the shim or on PATH).
    pub qemu_path: PathBuf,
    pub husk_vmm_path: PathBuf,
    pub virtiofsd_path: PathBuf,
    pub vhost_vsock_path: PathBuf,
    /// A root shell in each guest on vsock port 1026 (`containerd-shim-husk-v2 console
    /// <sandbox-id>`), the guest kernel at loglevel 7 and the agent logging at debug level.
    pub debug_console: bool,
    /// The statically linked shell shared into the guest for the debug console (a busybox
    /// is run as `sh`).
    pub debug_shell: PathBuf,
    /// Run the VMM and the vsock helper jailed: an unprivileged uid of their own per
    /// sandbox, no capabilities, own mount/IPC/UTS/network namespaces, a root holding only
    /// the VM's files (docs/SECURITY.md). Off only for debugging.
    pub jail: bool,
    /// Allow guests under QEMU's TCG emulator (hosts without usable KVM). TCG is outside
    /// QEMU's security policy: the boundary is then the emulator itself. `false`: such a
    /// sandbox is refused.
    pub allow_emulation: bool,
    /// The `io.husk.*` pod annotations this runtime honours (Kata's `enable_annotations`);
    /// a pod carrying any other is refused, naming it. `io.husk.sandbox-id` is not one of
    /// them: it groups `ctr` containers and is refused on CRI pods.
    pub enable_annotations: Vec<String>,
    /// Most vCPUs a sandbox may get through annotations (0: the host's CPU count).
    pub max_vcpus: u32,
    /// Most guest memory (MiB) a sandbox may get through annotations (0: the host's memory).
    pub max_memory_mib: u32,
    /// QEMU TCG's translation buffer, MiB (only when the guest is emulated; default
    /// `husk_hypervisor::qemu::cmdline::DEFAULT_TCG_BUFFER_MIB`, 32): what does not fit of the
    /// guest's code working set is retranslated each time the buffer fills — 48 holds a husk
    /// guest's whole (containers and execs included) for ~8 MiB more per pod; 16 saves
    /// ~16 MiB at ~3× the container start (docs/FIELD-NOTES.md). 4 to 2048.
    pub tcg_buffer_mib: u32,
    /// The warm pool of pre-booted VMs (`crate::pool`); off (size 0) unless configured.
    pub pool: PoolConfig,
    /// The file this was read from; `None`: no file, the defaults.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[pool]`: VMs booted ahead of need by `containerd-shim-husk-v2 pool`, each handed whole
/// to one sandbox of the default shape (the configured `vcpus`, `memory_mib`, kernel,
/// initramfs, backend, no pod limits or sizing annotations, at most one NIC, no debug
/// console). Off by default: every pooled VM holds its memory while it waits, which a node's
/// admin must ask for.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// How many booted VMs the pool keeps ready; 0: no pool.
    pub size: u32,
}

/// `tcg_buffer_mib`'s range.
const TCG_BUFFER_MIB: (u32, u32) = (4, 2048);

/// The `*_path` keys: (key, program, how it is found when the key is empty).
const PROGRAM_KEYS: [(&str, &str, &str); 4] = [
    ("qemu_path", "qemu-system-x86_64", "found on PATH"),
    (
        "husk_vmm_path",
        "husk-vmm",
        "found beside the shim or on PATH",
    ),
    (
        "virtiofsd_path",
        "virtiofsd",
        "found on PATH or in ~/.cargo/bin",
    ),
    (
        "vhost_vsock_path",
        "vhost-device-vsock",
        "found on PATH or in ~/.cargo/bin",
    ),
];

impl Default for Config {
    fn default() -> Self {
        Self {
            kernel: "/usr/share/husk/vmlinux".into(),
            initramfs: "/usr/share/husk/initramfs.cpio".into(),
            backend: Backend::Auto,
            vcpus: 1,
            memory_mib: 256,
            agent_timeout_secs: 60,
            kernel_params: String::new(),
            log_level: "info".into(),
            state_root: "/run/husk".into(),
            qemu_path: PathBuf::new(),
            husk_vmm_path: PathBuf::new(),
            virtiofsd_path: PathBuf::new(),
            vhost_vsock_path: PathBuf::new(),
            debug_console: false,
            debug_shell: "/bin/busybox".into(),
            jail: true,
            allow_emulation: true,
            enable_annotations: vec![
                "io.husk.extra-vcpus".into(),
                "io.husk.extra-memory-mib".into(),
            ],
            max_vcpus: 0,
            max_memory_mib: 0,
            tcg_buffer_mib: husk_hypervisor::qemu::cmdline::DEFAULT_TCG_BUFFER_MIB,
            pool: PoolConfig::default(),
            source: None,
        }
    }
}

impl Config {
    /// Reads `path`; a missing default file means the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env = std::env::var_os("HUSK_CONFIG").map(PathBuf::from);
        let (path, explicit) = match (path, env) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default())
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        config.source = Some(path);
        config.check_ranges()?;
        Ok(config)
    }

    /// The numbers whose range serde cannot say.
    fn check_ranges(&self) -> Result<(), ConfigError> {
        let (min, max) = TCG_BUFFER_MIB;
        if !(min..=max).contains(&self.tcg_buffer_mib) {
            return Err(ConfigError::Range {
                file: self.source_name(),
                key: "tcg_buffer_mib",
                value: u64::from(self.tcg_buffer_mib),
                min: u64::from(min),
                max: u64::from(max),
                why: "QEMU refuses a smaller translation buffer, and a larger one only reserves memory no husk guest fills",
            });
        }
        Ok(())
    }

    /// The file to name in messages: the one read, or the default path when there was none.
    pub fn source_name(&self) -> String {
        match &self.source {
            Some(p) => p.display().to_string(),
            None => format!("{DEFAULT_PATH} (absent: the defaults)"),
        }
    }

    fn path_of(&self, key: &str) -> &Path {
        match key {
            "qemu_path" => &self.qemu_path,
            "husk_vmm_path" => &self.husk_vmm_path,
            "virtiofsd_path" => &self.virtiofsd_path,
            _ => &self.vhost_vsock_path,
        }
    }

    /// The programs the backends are to run, each configured one checked: a path that is
    /// not absolute, does not exist or cannot be executed is an error naming the key, the
    /// path and this file. Called before a sandbox starts anything.
    pub fn programs(&self) -> Result<Programs, ConfigError> {
        let mut checked = [None, None, None, None];
        for (slot, (key, program, found)) in checked.iter_mut().zip(PROGRAM_KEYS) {
            let path = self.path_of(key);
            if path.as_os_str().is_empty() {
                continue;
            }
            check_program(path).map_err(|reason| ConfigError::Program {
                file: self.source_name(),
                key,
                path: path.to_path_buf(),
                reason,
                program,
                found,
            })?;
            *slot = Some(path.to_path_buf());
        }
        let [qemu, husk_vmm, virtiofsd, vhost_vsock] = checked;
        Ok(Programs {
            qemu,
            husk_vmm,
            virtiofsd,
            vhost_vsock,
        })
    }

    /// With `debug_console`, the shell to share into the guest, checked: it must be a
    /// statically linked x86-64 executable (the guest has no dynamic loader).
    pub fn debug_shell(&self) -> Result<Option<PathBuf>, ConfigError> {
        if !self.debug_console {
            return Ok(None);
        }
        let path = &self.debug_shell;
        check_program(path)
            .and_then(|()| crate::elf::check_static(path))
            .map_err(|reason| ConfigError::DebugShell {
                file: self.source_name(),
                path: path.clone(),
                reason,
            })?;
        Ok(Some(path.clone()))
    }
}

/// The config path in containerd's runtime options: a protobuf `runtimeoptions.v1.Options`
/// (`type_url` = 1, `config_path` = 2). Decoded by hand: the message is not among
/// containerd-shim-protos' types, and two string fields do not justify generating code.
pub fn config_path_from_options(value: &[u8]) -> Option<PathBuf> {
    let mut i = 0;
    while i < value.len() {
        let (key, n) = varint(&value[i..])?;
        i += n;
        match key & 7 {
            0 => i += varint(&value[i..])?.1,
            2 => {
                let (len, n) = varint(&value[i..])?;
                i += n;
                let end = i.checked_add(usize::try_from(len).ok()?)?;
                let bytes = value.get(i..end)?;
                if key >> 3 == 2 && !bytes.is_empty() {
                    return Some(PathBuf::from(String::from_utf8_lossy(bytes).into_owned()));
                }
                i = end;
            }
            1 => i += 8,
            5 => i += 4,
            _ => return None,
        }
    }
    None
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, "vcpus = 2\nbackend = \"qemu-tcg\"\n").unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.backend, Backend::QemuTcg);
        std::fs::write(&p, "backend = \"husk-vmm\"\n").unwrap();
        assert_eq!(Config::load(Some(&p)).unwrap().backend, Backend::HuskVmm);
        std::fs::write(&p, "backend = \"\"\n").unwrap();
        assert_eq!(Config::load(Some(&p)).unwrap().backend, Backend::Auto);
        assert_eq!(Backend::QemuKvm.to_string(), "qemu-kvm");
    }

    #[test]
    fn bad_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, "vcpu = 2\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("vcpu"), "{e}");
        std::fs::write(&p, "backend = \"firecracker\"\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(
            e.contains("c.toml") && e.contains("backend") && e.contains("firecracker"),
            "{e}"
        );
        for choice in ["auto", "qemu-tcg", "qemu-kvm", "husk-vmm"] {
            assert!(e.contains(choice), "{e}");
        }
        let e = Config::load(Some(&d.path().join("none.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.toml"), "{e}");
        for bad in [0, 3, 2049] {
            std::fs::write(&p, format!("tcg_buffer_mib = {bad}\n")).unwrap();
            let e = Config::load(Some(&p)).unwrap_err().to_string();
            assert!(
                e.contains("c.toml")
                    && e.contains(&format!("tcg_buffer_mib = {bad}"))
                    && e.contains("between 4 and 2048"),
                "{e}"
            );
        }
        std::fs::write(&p, "tcg_buffer_mib = 16\n").unwrap();
        assert_eq!(Config::load(Some(&p)).unwrap().tcg_buffer_mib, 16);
    }

    #[test]
    fn program_paths_are_checked_and_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        let exe = d.path().join("virtiofsd-copy");
        std::fs::copy("/bin/true", &exe).unwrap();
        std::fs::write(&p, format!("virtiofsd_path = \"{}\"\n", exe.display())).unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.source.as_deref(), Some(p.as_path()));
        let programs = c.programs().unwrap();
        assert_eq!(programs.virtiofsd.as_deref(), Some(exe.as_path()));
        assert_eq!(programs.qemu, None, "empty: looked up as before");
        assert_eq!(Config::default().programs().unwrap(), Programs::default());

        std::fs::write(
            &p,
            "vhost_vsock_path = \"/nonexistent/vhost-device-vsock\"\n",
        )
        .unwrap();
        // Loading still works (`delete` must clean up whatever the file says); using fails.
        let e = Config::load(Some(&p))
            .unwrap()
            .programs()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.toml")
                && e.contains("vhost_vsock_path")
                && e.contains("/nonexistent/vhost-device-vsock")
                && e.contains("no such file"),
            "{e}"
        );
        std::fs::write(&p, "qemu_path = \"qemu-system-x86_64\"\n").unwrap();
        let e = Config::load(Some(&p))
            .unwrap()
            .programs()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("qemu_path") && e.contains("not an absolute path"),
            "{e}"
        );
    }

    #[test]
    fn the_debug_shell_must_be_static() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        assert_eq!(
            Config::default().debug_shell().unwrap(),
            None,
            "off by default"
        );
        // A dynamically linked program: the test binary itself.
        let me = std::env::current_exe().unwrap();
        std::fs::write(
            &p,
            format!("debug_console = true\ndebug_shell = \"{}\"\n", me.display()),
        )
        .unwrap();
        let e = Config::load(Some(&p))
            .unwrap()
            .debug_shell()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.toml") && e.contains("debug_shell") && e.contains("dynamically linked"),
            "{e}"
        );
        std::fs::write(
            &p,
            "debug_console = true\ndebug_shell = \"/nonexistent/sh\"\n",
        )
        .unwrap();
        let e = Config::load(Some(&p))
            .unwrap()
            .debug_shell()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/sh") && e.contains("no such file"),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_config_spells_out_the_defaults() {
        let text = include_str!("../../deploy/config.toml");
        let shipped: Config = toml::from_str(text).unwrap();
        assert_eq!(format!("{shipped:?}"), format!("{:?}", Config::default()));
        // Every key, not just the values of those it has.
        let keys = |t: toml::Table| t.keys().cloned().collect::<Vec<_>>();
        let mut listed = keys(text.parse().unwrap());
        let mut all = keys(toml::Table::try_from(Config::default()).unwrap());
        listed.sort();
        all.sort();
        assert_eq!(listed, all);
    }

    #[test]
    fn runtime_options_config_path() {
        // type_url = "x", config_path = "/etc/husk/t.toml"
        let mut m = vec![0x0a, 1, b'x', 0x12, 16];
        m.extend_from_slice(b"/etc/husk/t.toml");
        assert_eq!(
            config_path_from_options(&m),
            Some(PathBuf::from("/etc/husk/t.toml"))
        );
        assert_eq!(config_path_from_options(&[0x0a, 1, b'x']), None);
        assert_eq!(config_path_from_options(&[0x12, 200]), None, "truncated");
    }
}
