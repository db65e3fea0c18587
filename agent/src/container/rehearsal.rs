//! A pooled VM's rehearsal: before its pod exists, the agent creates, starts and removes one
//! container of its own, the way `ctr run` makes one, so that the pod's first container finds
//! the path already walked.
//!
//! Why: under TCG a guest's first container creation takes 150–300 ms where every later one
//! takes ~40 ms (docs/FIELD-NOTES.md, "Container creation under TCG"): the kernel's clone,
//! namespace, mount, cgroup and exec paths and the agent's helper are translated the first time
//! they run, and the device filter's BPF program is verified once per rule set. A pooled VM
//! has that time before its claim; a cold one does not, so only a provisional CreateSandbox
//! (the pool's keeper) rehearses. On hardware KVM nothing is translated and the rehearsal only
//! loads the device program ahead.
//!
//! What stays: nothing of the rehearsal's own. Its container is removed (process, cgroup,
//! OOM watch), its mount namespace ended with its process, its root directory (on the guest's
//! tmpfs root, never the shared directory the host sees) is deleted. What the guest keeps is
//! what any container leaves: translated code in the VMM, a device program in the agent's
//! cache, kernel caches. The VM is still its pod's alone: the rehearsal runs before any claim.
//!
//! The container is ctr's default spec (`agent/fuzz/specs/ctr-default.json`, containerd
//! 1.6's: namespaces, mounts, masked and read-only paths, capabilities, device rules), its
//! process the agent's own binary, hard-linked into the rootfs, in its `rehearse` mode (writes
//! a line, exits 0).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{check_create, Engine};
use crate::reaper::exits;

/// The rehearsal container's id. Only ever taken while the pool's keeper waits for the
/// provisional CreateSandbox, before the pod's shim can send anything.
pub const ID: &str = "husk-rehearsal";

/// The helper mode the rehearsal's process runs (`husk-agent rehearse`).
pub const MODE: &str = "rehearse";

/// containerd 1.6's `ctr run` spec, as the bench and `ctr run` send it.
const CTR_DEFAULT: &str = include_str!("../../fuzz/specs/ctr-default.json");

/// How long the rehearsal's process may take to end once started.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the `rehearse` mode does: what `echo hi` does.
pub fn process_main() -> ! {
    use std::io::Write;
    let _ = std::io::stdout().write_all(b"rehearsal\n");
    std::process::exit(0)
}

/// The rehearsal's spec, its process the binary at `/rehearse` in the rootfs.
fn spec_json() -> Vec<u8> {
    let mut spec: serde_json::Value =
        serde_json::from_str(CTR_DEFAULT).unwrap_or_else(|_| serde_json::json!({}));
    spec["process"]["args"] = serde_json::json!(["/rehearse", MODE]);
    spec["linux"]["cgroupsPath"] = serde_json::json!(format!("/default/{ID}"));
    serde_json::to_vec(&spec).unwrap_or_default()
}

/// Where the rehearsal runs.
#[derive(Debug, Clone)]
pub struct Place {
    /// A directory of the guest's own that the rehearsal creates and removes.
    pub dir: PathBuf,
    /// The agent's binary, on the same file system as `dir` (it is hard-linked). Not
    /// `/proc/self/exe`: PID 1 runs the initramfs's copy, which it left for the tmpfs root.
    pub binary: PathBuf,
}

/// Runs the rehearsal.
pub fn run(engine: &Engine, place: &Place) -> Result<(), String> {
    let dir = &place.dir;
    let rootfs = dir.join("rootfs");
    let r = (|| {
        std::fs::create_dir_all(&rootfs)
            .map_err(|e| format!("creating {}: {e}", rootfs.display()))?;
        link(&place.binary, &rootfs.join("rehearse"))?;
        run_container(engine, rootfs.clone())
    })();
    let cleaned =
        std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()));
    r.and(cleaned)
}

/// A hard link of the agent's binary (no copy of its megabytes, no mount to undo).
fn link(binary: &Path, to: &Path) -> Result<(), String> {
    std::fs::hard_link(binary, to).map_err(|e| {
        format!(
            "linking the agent's binary {} to {}: {e}",
            binary.display(),
            to.display()
        )
    })
}

fn run_container(engine: &Engine, rootfs: PathBuf) -> Result<(), String> {
    let spec = check_create(ID, &spec_json()).map_err(|e| format!("its spec: {e}"))?;
    engine
        .create_at(ID, spec, rootfs, false)
        .map_err(|e| format!("create: {e}"))?;
    let ran = (|| {
        let pid = engine.start(ID).map_err(|e| format!("start: {e}"))?;
        let pid = i32::try_from(pid).map_err(|_| format!("start: pid {pid}"))?;
        match exits().wait(pid, Some(EXIT_TIMEOUT)) {
            Some(crate::reaper::Exit::Code(0)) => Ok(()),
            Some(e) => Err(format!("its process ended with {e:?}")),
            None => Err(format!("its process did not end within {EXIT_TIMEOUT:?}")),
        }
    })();
    let removed = engine.remove(ID, true).map_err(|e| format!("remove: {e}"));
    ran.and(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_is_ctrs_with_our_process_and_passes_the_checks() {
        let spec = check_create(ID, &spec_json()).expect("the rehearsal's spec is valid");
        let p = spec.process().as_ref().expect("a process");
        assert_eq!(
            p.args().as_deref(),
            Some(&["/rehearse".to_string(), MODE.to_string()][..])
        );
        // ctr's own parts are still there: what the rehearsal is for.
        let linux = spec.linux().as_ref().expect("linux");
        assert!(linux.masked_paths().as_ref().is_some_and(|m| !m.is_empty()));
        assert!(linux
            .resources()
            .as_ref()
            .and_then(|r| r.devices().as_ref())
            .is_some_and(|d| !d.is_empty()));
        assert!(spec.mounts().as_ref().is_some_and(|m| m.len() >= 6));
    }

    #[test]
    fn the_id_is_a_valid_container_id() {
        assert!(super::super::valid_id(ID));
    }
}
