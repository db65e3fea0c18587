//! The sandbox's cgroup on the host (the spec's `linux.cgroupsPath`), on cgroup v1, hybrid and
//! v2 hosts.
//!
//! The shim moves itself into that cgroup before it starts the VM, so the VMM (QEMU or
//! husk-vmm), virtiofsd and vhost-device-vsock inherit it: the pod's whole host-side cost is
//! accounted (and limitable) where the kubelet looks for it — Kata's `sandbox_cgroup_only`.
//! On teardown the shim moves back to where it came from and removes the directories it
//! created.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long removing the sandbox's own cgroup waits for its last processes to be gone: the
/// VM's processes die asynchronously (SIGKILL, and PDEATHSIG when the VM thread ends) just
/// before the shim leaves, and a cgroup with a task in it cannot be removed (EBUSY). Without
/// the wait, one CRI pod in 300 left its cgroup behind in the soak.
pub(crate) const LEAF_PATIENCE: Duration = Duration::from_secs(2);

/// Removes the cgroup `dir` (the sandbox's own, the leaf), retrying while it is busy with
/// tasks on their way out, for up to [`LEAF_PATIENCE`].
fn remove_leaf(dir: &Path) {
    let deadline = Instant::now() + LEAF_PATIENCE;
    loop {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => return,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroupsPath {0:?}: not an absolute path or a systemd slice:prefix:name")]
    BadPath(String),
}

/// One mounted hierarchy: where it is mounted, and whether it is cpuset (v1), which needs
/// its parent's cpus and mems copied into every new directory.
#[derive(Debug, Clone)]
struct Hierarchy {
    mount: PathBuf,
    cpuset_v1: bool,
    /// This process's cgroup in it before joining (relative to the mount).
    original: String,
}

/// `/a/b` stays; systemd's `slice:prefix:name` becomes `/slice/prefix-name.scope`, the path
/// the systemd driver would use.
pub fn normalise(cgroups_path: &str) -> Result<String, CgroupError> {
    if cgroups_path.starts_with('/') {
        if cgroups_path.split('/').any(|c| c == "..") {
            return Err(CgroupError::BadPath(cgroups_path.into()));
        }
        return Ok(cgroups_path.trim_end_matches('/').to_string());
    }
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    match parts.as_slice() {
        [slice, prefix, name]
            if !name.is_empty()
                && !slice.contains('/')
                && !name.contains('/')
                && !prefix.contains('/') =>
        {
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            Ok(format!("/{slice}/{prefix}-{name}.scope"))
        }
        _ => Err(CgroupError::BadPath(cgroups_path.into())),
    }
}

/// The cgroup hierarchies mounted on this host and this process's place in each.
fn hierarchies() -> Vec<Hierarchy> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own_for = |v2: bool, controllers: &[&str]| -> String {
        own.lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
                let matches = if v2 {
                    ctrl.is_empty()
                } else {
                    ctrl.split(',').any(|c| controllers.contains(&c))
                };
                matches.then(|| path.to_string())
            })
            .next()
            .unwrap_or_else(|| "/".into())
    };
    let mut v = Vec::new();
    for line in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
    {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mount = pre.split(' ').nth(4).unwrap_or("");
        let mut post = post.split(' ');
        let fstype = post.next().unwrap_or("");
        let opts = post.nth(1).unwrap_or("");
        match fstype {
            "cgroup2" => v.push(Hierarchy {
                mount: mount.into(),
                cpuset_v1: false,
                original: own_for(true, &[]),
            }),
            "cgroup" => {
                let controllers: Vec<&str> = opts
                    .split(',')
                    .filter(|o| {
                        !matches!(*o, "rw" | "ro" | "nosuid" | "nodev" | "noexec" | "relatime")
                    })
                    .collect();
                // The named systemd hierarchy has no controller to account with.
                if controllers.iter().all(|c| c.starts_with("name=")) {
                    continue;
                }
                v.push(Hierarchy {
                    mount: mount.into(),
                    cpuset_v1: controllers.contains(&"cpuset"),
                    original: own_for(false, &controllers),
                });
            }
            _ => {}
        }
    }
    v
}

/// The sandbox's cgroup, joined.
#[derive(Debug)]
pub(crate) struct HostCgroup {
    path: String,
    joined: Vec<(Hierarchy, Vec<PathBuf>)>,
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { path, what, source }
}

impl HostCgroup {
    /// Creates `cgroups_path` in every hierarchy and moves this process into it.
    pub fn join(cgroups_path: &str) -> Result<Self, CgroupError> {
        let path = normalise(cgroups_path)?;
        let mut me = Self {
            path: path.clone(),
            joined: Vec::new(),
        };
        for h in hierarchies() {
            let mut created = Vec::new();
            let mut dir = h.mount.clone();
            for comp in path.split('/').filter(|c| !c.is_empty()) {
                let parent = dir.clone();
                dir.push(comp);
                if !dir.exists() {
                    if let Err(e) = std::fs::create_dir(&dir) {
                        me.joined.push((h.clone(), created));
                        me.leave();
                        return Err(io(&dir, "creating")(e));
                    }
                    created.push(dir.clone());
                    if h.cpuset_v1 {
                        for f in ["cpuset.cpus", "cpuset.mems"] {
                            let v = std::fs::read_to_string(parent.join(f)).unwrap_or_default();
                            let _ = std::fs::write(dir.join(f), v.trim());
                        }
                    }
                }
            }
            let procs = dir.join("cgroup.procs");
            let joined = std::fs::write(&procs, std::process::id().to_string());
            me.joined.push((h, created));
            if let Err(e) = joined {
                me.leave();
                return Err(io(&procs, "joining")(e));
            }
        }
        Ok(me)
    }

    /// Moves process `pid` and every process below it (a pooled VM's keeper, its jail
    /// supervisors, QEMU or husk-vmm and the helpers) into this cgroup, in every hierarchy.
    /// Parents go first, so a child forked meanwhile is born inside.
    pub(crate) fn adopt_tree(&self, pid: u32) -> Result<(), CgroupError> {
        let mut pids = vec![pid];
        let mut i = 0;
        while i < pids.len() {
            let p = pids[i];
            i += 1;
            for task in std::fs::read_dir(format!("/proc/{p}/task"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                pids.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        for (h, _) in &self.joined {
            let procs = h
                .mount
                .join(self.path.trim_start_matches('/'))
                .join("cgroup.procs");
            for p in &pids {
                match std::fs::write(&procs, p.to_string()) {
                    Ok(()) => {}
                    // Gone meanwhile: nothing to move.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => return Err(io(&procs, "moving a pooled VM's process into")(e)),
                }
            }
        }
        Ok(())
    }

    /// Moves this process back where it was and removes the directories `join` created (the
    /// sandbox's own once its last processes are gone, see [`LEAF_PATIENCE`]).
    pub fn leave(&mut self) {
        for (h, created) in self.joined.drain(..) {
            let back = h
                .mount
                .join(h.original.trim_start_matches('/'))
                .join("cgroup.procs");
            let _ = std::fs::write(&back, std::process::id().to_string());
            let leaf = h.mount.join(self.path.trim_start_matches('/'));
            for dir in created.iter().rev() {
                if *dir == leaf {
                    remove_leaf(dir);
                } else {
                    let _ = std::fs::remove_dir(dir);
                }
            }
        }
    }
}

/// After a shim crash: removes the sandbox's leaf cgroup (its processes are gone).
pub fn remove(cgroups_path: &str) {
    let Ok(path) = normalise(cgroups_path) else {
        return;
    };
    for h in hierarchies() {
        remove_leaf(&h.mount.join(path.trim_start_matches('/')));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_in_both_driver_styles() {
        assert_eq!(normalise("/default/c1/").unwrap(), "/default/c1");
        assert_eq!(
            normalise("kubepods.slice:cri-containerd:abc").unwrap(),
            "/kubepods.slice/cri-containerd-abc.scope"
        );
        assert!(normalise("../x").is_err());
        assert!(normalise("/a/../../x").is_err());
        assert!(normalise("a:b").is_err());
    }

    #[test]
    fn this_host_has_hierarchies() {
        assert!(!hierarchies().is_empty(), "no cgroup file system mounted?");
    }

    #[test]
    fn leaving_waits_for_the_last_processes_to_be_gone() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test makes host cgroups: run it as root (cargo xtask test)"
        );
        let path = format!("/husk-unit-{}/leaf", std::process::id());
        let mut c = HostCgroup::join(&path).unwrap();
        // A process of the sandbox still exiting when the shim leaves: it inherited the
        // cgroup and ends a moment later.
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let started = Instant::now();
        c.leave();
        let waited = started.elapsed();
        let _ = child.wait();
        for h in hierarchies() {
            let leaf = h.mount.join(path.trim_start_matches('/'));
            assert!(!leaf.exists(), "{} left behind", leaf.display());
            assert!(!leaf.parent().unwrap().exists());
        }
        assert!(
            waited >= Duration::from_millis(200),
            "did not wait: {waited:?}"
        );
        assert!(
            waited < LEAF_PATIENCE,
            "waited the whole patience: {waited:?}"
        );
    }
}
