//! The sandbox's cgroup on the host (the spec's `linux.cgroupsPath`), on cgroup v1, hybrid and
//! v2 hosts.
//!
//! The VMM (QEMU or husk-vmm), virtiofsd and vhost-device-vsock are born in that cgroup (the
//! thread that starts them enters it first) and the shim moves itself in while the VM boots:
//! the pod's whole host-side cost is accounted (and limitable) where the kubelet looks for
//! it — Kata's `sandbox_cgroup_only`. Moving a process waits for an RCU grace period (the
//! kernel's process-wide cgroup lock), 6–14 ms on this host, which a cold start used to wait
//! for; a thread moving itself in a v1 hierarchy does not (docs/FIELD-NOTES.md). On teardown
//! the shim moves back to where it came from and removes the directories it created.

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
    /// cgroup2 (the unified hierarchy).
    v2: bool,
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
                v2: true,
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
                    v2: false,
                    cpuset_v1: controllers.contains(&"cpuset"),
                    original: own_for(false, &controllers),
                });
            }
            _ => {}
        }
    }
    v
}

/// The sandbox's cgroup: made in every hierarchy, then entered in two steps so that a start
/// does not wait for the move that is slow ([`HostCgroup::create`]).
#[derive(Debug)]
pub(crate) struct HostCgroup {
    path: String,
    joined: Vec<(Hierarchy, Vec<PathBuf>)>,
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { path, what, source }
}

/// How one thread enters the sandbox's cgroup before it starts the VM's processes, which are
/// born where it is ([`HostCgroup::entry`]): in a v1 hierarchy that thread alone moves
/// (`tasks`, `0`: the kernel skips the process-wide lock whose taking waits for an RCU grace
/// period, 6–14 ms on this host, for a thread that moves itself); in a v2 hierarchy whose
/// cgroup accounts something (a thread cannot leave its process's domain there) the whole
/// process does, as before. A v2 hierarchy that enables no controller for the sandbox's
/// cgroup (the hybrid layout's) is left to [`Settling`]: nothing is counted there.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    thread_files: Vec<PathBuf>,
    process_files: Vec<PathBuf>,
}

impl Entry {
    /// Moves the calling thread (or, see above, its process) in.
    pub(crate) fn enter(&self) -> Result<(), CgroupError> {
        for f in &self.thread_files {
            std::fs::write(f, "0").map_err(io(f, "moving the VM's starting thread into"))?;
        }
        for f in &self.process_files {
            std::fs::write(f, std::process::id().to_string()).map_err(io(f, "joining"))?;
        }
        Ok(())
    }
}

/// The process-wide part of joining, on a thread of its own while the VM boots or is taken
/// over ([`HostCgroup::settle`]): the shim itself, then every process below `tree` (the
/// VM's, born inside already in the hierarchies [`Entry`] covered; a pooled VM's keeper and
/// all below it), in every hierarchy. Dropped, it waits for that thread, so the cgroup is
/// never left (or removed) while a move is on its way.
#[derive(Debug)]
pub(crate) struct Settling(Option<SettlingState>);

#[derive(Debug)]
enum SettlingState {
    Running(std::thread::JoinHandle<Result<(), CgroupError>>),
    /// No thread could be started, so the moves were made at once.
    Done(Result<(), CgroupError>),
}

impl Settling {
    /// Waits for the moves; their first failure.
    pub(crate) fn wait(mut self) -> Result<(), CgroupError> {
        match self.0.take() {
            Some(SettlingState::Running(t)) => t.join().unwrap_or_else(|_| {
                Err(CgroupError::Io {
                    path: PathBuf::from("/proc/self/cgroup"),
                    what: "moving the sandbox's processes in",
                    source: std::io::Error::other("the thread moving them panicked"),
                })
            }),
            Some(SettlingState::Done(r)) => r,
            None => Ok(()),
        }
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        if let Some(SettlingState::Running(t)) = self.0.take() {
            let _ = t.join();
        }
    }
}

/// Every pid in the process tree under `root` (`root` first; parents before children).
fn tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
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
            for c in children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                if !pids.contains(&c) {
                    pids.push(c);
                }
            }
        }
    }
    pids
}

/// [`Settling`]'s moves: this process into each of `procs`, then every process under
/// `tree_root` (for a cold VM this process itself: its only lasting children are the VM's,
/// as the warm pool's holder is started detached).
fn move_in(procs: &[PathBuf], tree_root: u32) -> Result<(), CgroupError> {
    for f in procs {
        move_pids(f, &[std::process::id()])?;
    }
    let pids = tree(tree_root);
    for f in procs {
        move_pids(f, &pids)?;
    }
    Ok(())
}

/// Writes each pid into `procs`; one that is gone meanwhile is skipped.
fn move_pids(procs: &Path, pids: &[u32]) -> Result<(), CgroupError> {
    for p in pids {
        match std::fs::write(procs, p.to_string()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(io(procs, "moving the sandbox's processes into")(e)),
        }
    }
    Ok(())
}

impl HostCgroup {
    /// Creates `cgroups_path` in every hierarchy; no process moves yet ([`Self::entry`],
    /// [`Self::settle`]). What it created is removed again on failure.
    ///
    /// Other shims create and remove the same ancestors at the same time (the sandboxes of one
    /// containerd namespace share `/<namespace>`): an ancestor another shim made a moment ago
    /// is used as it is, and one another shim removes under our feet is made again
    /// ([`make_path`]).
    pub fn create(cgroups_path: &str) -> Result<Self, CgroupError> {
        let path = normalise(cgroups_path)?;
        let mut me = Self {
            path: path.clone(),
            joined: Vec::new(),
        };
        for h in hierarchies() {
            let mut created = Vec::new();
            let made = make_path(&h, &path, &mut created);
            me.joined.push((h, created));
            if let Err(e) = made {
                me.leave();
                return Err(e);
            }
        }
        Ok(me)
    }

    /// `name` in the sandbox's cgroup of each hierarchy.
    fn files(&self, name: &str) -> Vec<PathBuf> {
        self.joined
            .iter()
            .map(|(h, _)| self.dir(h).join(name))
            .collect()
    }

    fn dir(&self, h: &Hierarchy) -> PathBuf {
        h.mount.join(self.path.trim_start_matches('/'))
    }

    /// What the thread that starts the VM runs first ([`Entry`]).
    pub(crate) fn entry(&self) -> Entry {
        let mut e = Entry {
            thread_files: Vec::new(),
            process_files: Vec::new(),
        };
        for (h, _) in &self.joined {
            let dir = self.dir(h);
            if !h.v2 {
                e.thread_files.push(dir.join("tasks"));
            } else if std::fs::read_to_string(dir.join("cgroup.controllers"))
                .map_or(true, |c| !c.trim().is_empty())
            {
                e.process_files.push(dir.join("cgroup.procs"));
            }
        }
        e
    }

    /// Starts the process-wide moves ([`Settling`]): this process, then the tree under
    /// `tree` (this process for a VM it started, a pooled VM's keeper).
    pub(crate) fn settle(&self, tree_root: u32) -> Settling {
        let procs = self.files("cgroup.procs");
        let on_thread = procs.clone();
        match std::thread::Builder::new()
            .name("host-cgroup".into())
            .spawn(move || move_in(&on_thread, tree_root))
        {
            Ok(t) => Settling(Some(SettlingState::Running(t))),
            Err(_) => Settling(Some(SettlingState::Done(move_in(&procs, tree_root)))),
        }
    }

    /// Moves this process back where it was and removes the directories `create` made (the
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

/// How often [`make_path`] starts again when an ancestor it walked through was removed by
/// another shim's teardown before it could make the next directory in it.
const MAKE_PATH_ATTEMPTS: usize = 5;

/// Makes each directory of `path` under `h`'s mount that is missing, recording in `created`
/// the ones this call made. In a v1 cpuset hierarchy every directory on the way, made now or
/// found, gets its parent's cpus and mems if it has none: a task cannot join a cpuset without
/// them (ENOSPC), and a directory can be found without them when the shim that made it was
/// killed before it copied them, or is copying them right now.
fn make_path(h: &Hierarchy, path: &str, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
    let mut attempt = 0;
    'walk: loop {
        attempt += 1;
        let mut dir = h.mount.clone();
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            let parent = dir.clone();
            dir.push(comp);
            match std::fs::create_dir(&dir) {
                Ok(()) => created.push(dir.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound && attempt < MAKE_PATH_ATTEMPTS =>
                {
                    continue 'walk;
                }
                Err(e) => return Err(io(&dir, "creating")(e)),
            }
            if h.cpuset_v1 {
                inherit_cpuset(&parent, &dir)?;
            }
        }
        return Ok(());
    }
}

/// Copies `parent`'s `cpuset.cpus` and `cpuset.mems` into `dir` where `dir`'s are empty (a
/// cpuset directory starts empty unless its parent sets `cgroup.clone_children`).
fn inherit_cpuset(parent: &Path, dir: &Path) -> Result<(), CgroupError> {
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let file = dir.join(f);
        let own = std::fs::read_to_string(&file).map_err(io(&file, "reading"))?;
        if !own.trim().is_empty() {
            continue;
        }
        let from = parent.join(f);
        let v = std::fs::read_to_string(&from).map_err(io(&from, "reading"))?;
        std::fs::write(&file, v.trim()).map_err(io(&file, "copying its parent's value into"))?;
    }
    Ok(())
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

    /// The tests below move this whole test process between cgroups: one at a time.
    static MOVES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Where `/proc/<pid>` or `/proc/<pid>/task/<tid>` is, hierarchy by hierarchy (the
    /// named systemd one left out).
    fn places(proc_dir: &str) -> Vec<String> {
        std::fs::read_to_string(format!("{proc_dir}/cgroup"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains(":name="))
            .map(|l| l.splitn(3, ':').nth(2).unwrap_or("").to_string())
            .collect()
    }

    #[test]
    fn the_vm_thread_brings_its_children_and_settling_moves_the_rest() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test makes host cgroups: run it as root (cargo xtask test)"
        );
        let _one = MOVES.lock().unwrap_or_else(|e| e.into_inner());
        let path = format!("/husk-unit-{}-settle/leaf", std::process::id());
        let mut c = HostCgroup::create(&path).unwrap();
        let v2_accounts = c.entry().process_files.len();
        let entry = c.entry();
        // What a VM thread does: enter, then start a process (which is born inside).
        let (child, thread_places) = std::thread::spawn(move || {
            entry.enter().unwrap();
            let tid = nix::unistd::gettid();
            let child = std::process::Command::new("sleep")
                .arg("0.3")
                .spawn()
                .unwrap();
            (child, places(&format!("/proc/self/task/{tid}")))
        })
        .join()
        .unwrap();
        let mut child = child;
        let v1_count = hierarchies().iter().filter(|h| !h.v2).count();
        let inside = |ps: &[String]| ps.iter().filter(|p| **p == path).count();
        // Every v1 hierarchy (and a v2 one that accounts) holds the thread and its child;
        // the rest of this process is still where it was.
        assert_eq!(inside(&thread_places), v1_count + v2_accounts);
        assert_eq!(
            inside(&places(&format!("/proc/{}", child.id()))),
            v1_count + v2_accounts
        );
        let main = format!("/proc/self/task/{}", std::process::id());
        assert_eq!(inside(&places(&main)), v2_accounts);
        // Settling: this process, and the tree under it, everywhere.
        c.settle(std::process::id()).wait().unwrap();
        let all = hierarchies().len();
        assert_eq!(inside(&places(&main)), all);
        assert_eq!(inside(&places(&format!("/proc/{}", child.id()))), all);
        c.leave();
        let _ = child.wait();
        assert_eq!(inside(&places(&main)), 0, "did not move back");
        for h in hierarchies() {
            let leaf = h.mount.join(path.trim_start_matches('/'));
            assert!(!leaf.exists(), "{} left behind", leaf.display());
            assert!(!leaf.parent().unwrap().exists());
        }
    }

    #[test]
    fn a_cpuset_parent_left_without_cpus_is_filled_and_the_vm_thread_can_join() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test makes host cgroups: run it as root (cargo xtask test)"
        );
        let cpuset = hierarchies()
            .into_iter()
            .find(|h| h.cpuset_v1)
            .expect("this test is for hosts with a v1 cpuset hierarchy, as CI's is");
        let _one = MOVES.lock().unwrap_or_else(|e| e.into_inner());
        // What a shim killed between making the namespace's directory and copying its
        // parent's cpus into it leaves: a directory no task can join (ENOSPC).
        let parent = format!("/husk-unit-{}-cpuset", std::process::id());
        let parent_dir = cpuset.mount.join(parent.trim_start_matches('/'));
        std::fs::create_dir(&parent_dir).unwrap();
        // Not made by the HostCgroup, so not removed by it: removed here, whatever happens.
        struct Remove(PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir(self.0.join("leaf"));
                let _ = std::fs::remove_dir(&self.0);
            }
        }
        let _remove = Remove(parent_dir.clone());
        let cpus = |d: &Path| std::fs::read_to_string(d.join("cpuset.cpus")).unwrap();
        assert_eq!(cpus(&parent_dir).trim(), "", "the host sets clone_children");
        let path = format!("{parent}/leaf");
        let mut c = HostCgroup::create(&path).unwrap();
        assert_eq!(cpus(&parent_dir), cpus(&cpuset.mount));
        assert_eq!(cpus(&parent_dir.join("leaf")), cpus(&cpuset.mount));
        let entry = c.entry();
        let joined = std::thread::spawn(move || entry.enter()).join().unwrap();
        c.leave();
        joined.unwrap();
    }

    #[test]
    fn directories_found_are_used_and_only_those_made_are_recorded() {
        let h = hierarchies()
            .into_iter()
            .next()
            .expect("no cgroup file system mounted?");
        // make_path against a scratch tree standing in for a mount: a directory another shim
        // made is used and left out of what leave() removes; a missing one is made.
        let t = tempfile::tempdir().unwrap();
        let h = Hierarchy {
            mount: t.path().to_path_buf(),
            cpuset_v1: false,
            ..h
        };
        std::fs::create_dir(t.path().join("ns")).unwrap();
        let mut created = Vec::new();
        make_path(&h, "/ns/a", &mut created).unwrap();
        assert_eq!(created, vec![t.path().join("ns/a")]);
        std::fs::remove_dir_all(t.path().join("ns")).unwrap();
        let mut created = Vec::new();
        make_path(&h, "/ns/b", &mut created).unwrap();
        assert_eq!(created, vec![t.path().join("ns"), t.path().join("ns/b")]);
    }

    #[test]
    fn leaving_waits_for_the_last_processes_to_be_gone() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test makes host cgroups: run it as root (cargo xtask test)"
        );
        let _one = MOVES.lock().unwrap_or_else(|e| e.into_inner());
        let path = format!("/husk-unit-{}-leave/leaf", std::process::id());
        let mut c = HostCgroup::create(&path).unwrap();
        c.settle(std::process::id()).wait().unwrap();
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
