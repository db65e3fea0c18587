//! Tier 3, the warm pool (issue #17): `containerd-shim-husk-v2 pool` keeps VMs booted, a new
//! sandbox of the pool's shape claims one instead of booting.
//! - pooled `ctr run`s (output, exit code), two at once (never the same VM), a pod of two
//!   containers in a pooled VM; a sandbox of another size boots cold; the pool never holds
//!   more than its size;
//! - killing the holder (its unclaimed VMs die, a claimed one runs on, nothing is left, the
//!   next start works and starts a holder again), killing the holder while its VMs boot (they
//!   end at once, not when their boot would), killing a claimed VM's QEMU, an unclaimed
//!   one's, and a claiming shim right after its claim: nothing is left behind (processes,
//!   mounts, directories, jail ids) and the next start works.
//!
//! The holder's state root is the default `/run/husk` (the sandboxes' assertions look there);
//! the test runs its own holder and ends it (by PID) with every VM it booted.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::guest::{silent_initramfs, SILENT_INIT_UP};
use husk_tests::husk::{
    assert_sandbox_gone, processes_mentioning, shim_binary, HuskContainerd, BUSYBOX,
};
use husk_tests::{initramfs, kernel, require_root};

const RUNTIME: &str = "io.containerd.husk.v2";
const POOL: &str = "/run/husk/.pool";
/// The pool's configuration: two VMs of the default shape.
const EXTRA: &str = "pool.size = 2\n";

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// The same file the test's containerd gives its shims (same keys, same values).
fn config_file(dir: &Path) -> PathBuf {
    config_file_of(dir, &initramfs(), "")
}

/// [`config_file`] with another initramfs and `more` keys.
fn config_file_of(dir: &Path, initramfs: &Path, more: &str) -> PathBuf {
    let p = dir.join("pool-config.toml");
    std::fs::write(
        &p,
        format!(
            "{EXTRA}\nkernel = \"{}\"\ninitramfs = \"{}\"\n{more}",
            kernel().display(),
            initramfs.display()
        ),
    )
    .unwrap();
    p
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pooled VM directories and jail ids recorded for pooled VMs.
fn pool_leftovers() -> (Vec<String>, Vec<String>) {
    let dirs = std::fs::read_dir(POOL)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let ids = std::fs::read_dir("/run/husk/.jail-ids")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|owner| owner.starts_with(".pool/"))
        .collect();
    (dirs, ids)
}

fn status(config: &Path) -> Option<serde_json::Value> {
    let out = Command::new(shim_binary())
        .args(["pool", "status", "--config"])
        .arg(config)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("status is JSON"))
}

/// A holder this test started, killed (by PID) when dropped; waits for its VMs to go.
struct Holder {
    child: Child,
    log: PathBuf,
    config: PathBuf,
}

impl Holder {
    fn start(dir: &Path) -> Self {
        Self::start_from(dir, &shim_binary())
    }

    /// The holder of `program` (a copy of the shim, for the upgrade test).
    fn start_from(dir: &Path, program: &Path) -> Self {
        Self::start_with(dir, program, config_file(dir))
    }

    /// The holder of `program` with the configuration file `config`.
    fn start_with(dir: &Path, program: &Path, config: PathBuf) -> Self {
        let log = dir.join("holder.log");
        let child = Command::new(program)
            .args(["pool", "run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log, config }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        status(&self.config).unwrap_or_else(|| panic!("no status; holder log:\n{}", self.log()))
    }

    /// Waits until `n` VMs are ready; checks on the way that the pool never holds more
    /// than its size.
    fn wait_ready(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(s) = status(&self.config) {
                let held = s["vms"].as_array().map_or(0, Vec::len);
                assert!(
                    held <= 2,
                    "the pool holds {held} VMs, more than its size 2: {s}"
                );
                // A VM boots at the lowest CPU priority, and is put back once ready.
                for vm in s["vms"].as_array().into_iter().flatten() {
                    let want = if vm["state"] == "ready" { 0 } else { 19 };
                    assert!(
                        vm["nice"].is_null() || vm["nice"] == want,
                        "pooled VM's priority: {vm}"
                    );
                }
                if s["ready"].as_u64() == Some(n) {
                    return;
                }
            }
            let log = self.log();
            assert!(
                !log.contains("another pool holder runs"),
                "a pool holder this test did not start holds /run/husk/.pool: stop it first\n{log}"
            );
            assert!(
                Instant::now() < deadline,
                "{n} pooled VMs not ready within 90 s; holder log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The VM sandbox `sid` claimed, from the holder's log.
    fn claimed_by(&self, sid: &str) -> Option<String> {
        let needle = format!(" claimed by sandbox {sid} ");
        self.log()
            .lines()
            .find(|l| l.contains(&needle))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("vm-")))
            .map(str::to_string)
    }

    /// Stops the holder (SIGTERM, as a service manager would); waits until every VM it held
    /// unclaimed is gone, and checks it left nothing under `.pool/`.
    fn end(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let held: Vec<String> = status(&self.config)
            .and_then(|s| {
                s["vms"].as_array().map(|v| {
                    v.iter()
                        .filter_map(|m| m["vmid"].as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_default();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        for vmid in held {
            vm_gone(&vmid);
        }
        // The last keeper removes its VM directory only as it ends.
        wait_until(
            "the ended holder's .pool/ to be gone",
            Duration::from_secs(10),
            || !Path::new(POOL).exists(),
        );
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.end();
    }
}

/// `ctr run --rm` of `sh -c script`: (stdout, exit code).
fn run_rm(h: &HuskContainerd, id: &str, options: &[&str], script: &str) -> (String, i32) {
    let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
    args.extend_from_slice(options);
    args.extend_from_slice(&[BUSYBOX, id, "sh", "-c", script]);
    let out = h.ctd.ctr(&args);
    if !out.status.success() {
        // Shown only when the test fails: what ctr said and what containerd and the shim logged.
        let log = h.ctd.log();
        let tail: Vec<&str> = log.lines().rev().take(80).collect();
        eprintln!(
            "ctr run {id} ended with {}: {}\ncontainerd's log, last lines:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

fn qemu_of(vmid: &str) -> u32 {
    processes_mentioning(&format!("{POOL}/{vmid}/"))
        .into_iter()
        .find(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .is_ok_and(|e| e.to_string_lossy().contains("qemu-system"))
        })
        .unwrap_or_else(|| panic!("no QEMU for {vmid}"))
}

fn vm_gone(vmid: &str) {
    wait_until(
        &format!("{vmid}'s processes to end"),
        Duration::from_secs(20),
        || processes_mentioning(&format!("{POOL}/{vmid}/")).is_empty(),
    );
}

/// Starts an idle pod `sb` in a pooled VM, ends that VM with `end` (given its vmid) and waits
/// for the task to stop; returns the vmid. The caller then removes it ([`remove_claimed`]).
fn end_claimed(h: &HuskContainerd, holder: &Holder, sb: &str, end: impl FnOnce(&str)) -> String {
    h.run_idle(sb, &[]);
    let vm = holder.claimed_by(sb).expect("pooled");
    end(&vm);
    wait_until("the task to end", Duration::from_secs(15), || {
        h.ctd
            .ctr_ok(&["task", "ls"])
            .lines()
            .any(|l| l.starts_with(sb) && l.contains("STOPPED"))
    });
    vm
}

/// Removes the stopped pod `sb` of [`end_claimed`]: nothing of it or of its VM is left.
fn remove_claimed(h: &HuskContainerd, sb: &str, vm: &str) {
    h.remove(sb);
    assert_sandbox_gone(sb);
    vm_gone(vm);
}

/// Ends an unclaimed VM of the pool with `end` (given its vmid): its keeper ends and removes
/// its directory, and the holder boots another, counting `died` VMs so far.
fn end_pooled(holder: &Holder, died: u64, end: impl FnOnce(&str)) {
    holder.wait_ready(2);
    let pooled = holder.status()["vms"][0]["vmid"]
        .as_str()
        .unwrap()
        .to_string();
    end(&pooled);
    vm_gone(&pooled);
    // Its VM's processes end before the keeper removes the directory and exits.
    wait_until(
        "the ended VM's directory to go (its keeper to end)",
        Duration::from_secs(15),
        || !Path::new(POOL).join(&pooled).exists(),
    );
    holder.wait_ready(2);
    assert_eq!(holder.status()["died"], died, "{}", holder.log());
}

#[test]
fn pooled_starts_and_the_pools_bounds() {
    require_root("the pool boots VMs and mounts their shares");
    let h = HuskContainerd::start_with_config(EXTRA);
    let t = tempfile::tempdir().unwrap();
    let holder = Holder::start(t.path());
    holder.wait_ready(2);
    // Every thread of a ready VM's QEMU is back at the normal priority.
    for vm in holder.status()["vms"].as_array().unwrap() {
        let qemu = qemu_of(vm["vmid"].as_str().unwrap());
        for task in std::fs::read_dir(format!("/proc/{qemu}/task"))
            .unwrap()
            .flatten()
        {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let nice = stat
                .rsplit_once(") ")
                .and_then(|(_, r)| r.split_whitespace().nth(16))
                .unwrap_or_default();
            assert_eq!(nice, "0", "a ready pooled VM's QEMU thread: {stat}");
        }
    }

    // Two at once: each gets a VM of its own, both pooled.
    let (a, b) = (unique("pool-a"), unique("pool-b"));
    let (out_a, out_b) = std::thread::scope(|s| {
        let ra = s.spawn(|| run_rm(&h, &a, &[], "echo from-a; exit 3"));
        let rb = s.spawn(|| run_rm(&h, &b, &[], "echo from-b; exit 4"));
        (ra.join().unwrap(), rb.join().unwrap())
    });
    assert_eq!(out_a, ("from-a\n".to_string(), 3), "{}", h.ctd.log());
    assert_eq!(out_b, ("from-b\n".to_string(), 4));
    let (va, vb) = (holder.claimed_by(&a), holder.claimed_by(&b));
    assert!(
        va.is_some() && vb.is_some(),
        "both pooled:\n{}",
        holder.log()
    );
    assert_ne!(va, vb, "two sandboxes got the same VM");
    // Each used the agent connection its VM's keeper opened while the VM waited.
    let log = h.ctd.log();
    for id in [&a, &b] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("sandbox {id}: VM "))
                    && l.contains("over the connection its keeper opened")),
            "{id} did not take its keeper's agent connection:\n{}",
            log.lines()
                .filter(|l| l.contains(id.as_str()))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    for (id, vm) in [(&a, &va), (&b, &vb)] {
        assert_sandbox_gone(id);
        vm_gone(vm.as_ref().unwrap());
    }
    assert_eq!(holder.status()["claimed"], 2);

    // A pod of two containers in one pooled VM.
    holder.wait_ready(2);
    let (sb, c2) = (unique("pool-pod"), unique("pool-c2"));
    h.run_idle(&sb, &[]);
    let vm = holder
        .claimed_by(&sb)
        .expect("the pod's VM comes from the pool");
    let ann = format!("io.husk.sandbox-id={sb}");
    h.run_idle(&c2, &["--annotation", &ann]);
    let boot = |id: &str| {
        h.ctd.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            "b",
            id,
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ])
    };
    assert_eq!(boot(&sb), boot(&c2), "both containers in the one VM");
    assert!(
        !Path::new("/run/husk").join(&c2).exists()
            && Path::new("/run/husk")
                .join(&sb)
                .join("vm/console.log")
                .exists(),
        "the pooled VM's directory is the sandbox's"
    );
    // Pause and resume reach the pooled VM through its keeper.
    h.ctd.ctr_ok(&["task", "pause", &sb]);
    assert!(
        h.ctd
            .ctr_ok(&["task", "ls"])
            .lines()
            .any(|l| l.starts_with(&sb) && l.contains("PAUSED")),
        "{}",
        h.ctd.ctr_ok(&["task", "ls"])
    );
    h.ctd.ctr_ok(&["task", "resume", &sb]);
    assert_eq!(
        h.ctd
            .ctr_ok(&["task", "exec", "--exec-id", "r", &sb, "echo", "resumed"]),
        "resumed\n"
    );
    // The node's metrics count the pooled VM's processes for the sandbox, under its keeper.
    let metrics = Command::new(shim_binary())
        .args(["monitor", "--once"])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    for process in ["pool-keeper", "qemu", "virtiofsd", "vhost-device-vsock"] {
        let series = format!("husk_processes{{sandbox=\"{sb}\",process=\"{process}\"}}");
        assert!(
            metrics.lines().any(|l| l.starts_with(&series)),
            "no {series} in the monitor's scrape:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains(&sb))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    h.remove(&c2);
    h.remove(&sb);
    assert_sandbox_gone(&sb);
    vm_gone(&vm);

    // Another size boots cold; the pool keeps its VMs.
    holder.wait_ready(2);
    let big = unique("pool-big");
    let out = run_rm(&h, &big, &["--memory-limit", "134217728"], "echo cold");
    assert_eq!(out, ("cold\n".to_string(), 0));
    assert_eq!(
        holder.claimed_by(&big),
        None,
        "a VM of the wrong size was used"
    );
    assert!(
        holder.log().contains(&format!("sandbox {big} (shim")),
        "the holder said why not:\n{}",
        holder.log()
    );
    let s = holder.status();
    assert_eq!(
        (s["claimed"].as_u64(), s["ready"].as_u64()),
        (Some(3), Some(2)),
        "{s}"
    );
    assert_sandbox_gone(&big);
}

#[test]
fn killing_the_holder_leaves_nothing_and_the_next_start_works() {
    require_root("the pool boots VMs and mounts their shares");
    let h = HuskContainerd::start_with_config(EXTRA);
    let t = tempfile::tempdir().unwrap();
    let mut holder = Holder::start(t.path());
    holder.wait_ready(2);
    let keep = unique("pool-keep");
    h.run_idle(&keep, &[]);
    let claimed = holder.claimed_by(&keep).expect("pooled");
    holder.wait_ready(2);

    holder.end();
    // Only the claimed VM is left: it belongs to its sandbox now.
    wait_until(
        "the unclaimed VMs and their directories to go",
        Duration::from_secs(20),
        || {
            let (dirs, ids) = pool_leftovers();
            dirs.is_empty() && ids.is_empty()
        },
    );
    assert_eq!(
        processes_mentioning(&format!("{POOL}/vm-")).len(),
        processes_mentioning(&format!("{POOL}/{claimed}/")).len(),
        "a process of an unclaimed VM outlived the holder"
    );
    let out = h.ctd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "e",
        &keep,
        "echo",
        "still-here",
    ]);
    assert_eq!(out, "still-here\n");

    // The next start boots cold and starts a holder again (detached; ended here by PID).
    let next = unique("pool-next");
    assert_eq!(
        run_rm(&h, &next, &[], "echo works"),
        ("works\n".to_string(), 0)
    );
    assert_sandbox_gone(&next);
    let config = config_file(t.path());
    wait_until(
        "a holder started by the shim",
        Duration::from_secs(20),
        || status(&config).is_some(),
    );
    let again = u32::try_from(status(&config).unwrap()["holder_pid"].as_u64().unwrap()).unwrap();
    // Its log (its stderr, in /run: memory) is rotated once past 4 MiB.
    let log = Path::new(POOL).join("pool.log");
    let rotated = Path::new(POOL).join("pool.log.1");
    let _ = std::fs::remove_file(&rotated);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&vec![b'#'; 5 << 20]).unwrap();
    }
    wait_until("pool.log to be rotated", Duration::from_secs(15), || {
        rotated.exists()
            && std::fs::read_to_string(&log).is_ok_and(|l| l.contains("pool.log rotated"))
    });
    assert!(std::fs::metadata(&log).unwrap().len() < 1 << 20);
    std::fs::remove_file(&rotated).unwrap();
    kill(again);
    wait_until(
        "the second holder's VMs to go",
        Duration::from_secs(20),
        || {
            processes_mentioning(&format!("{POOL}/vm-{again}-")).is_empty()
                && status(&config).is_none()
        },
    );
    // A holder killed cannot remove its files; the last of its VMs' keepers does.
    wait_until(
        "the killed holder's socket, lock and log to go",
        Duration::from_secs(10),
        || {
            ["pool.sock", "holder.lock", "pool.log"]
                .iter()
                .all(|f| !Path::new(POOL).join(f).exists())
        },
    );

    h.remove(&keep);
    assert_sandbox_gone(&keep);
    vm_gone(&claimed);
    let (dirs, ids) = pool_leftovers();
    assert!(dirs.is_empty() && ids.is_empty(), "left: {dirs:?} {ids:?}");
    assert!(!Path::new(POOL).exists(), "{POOL} is left");
}

#[test]
fn killing_the_holder_while_its_vms_boot_ends_them_at_once() {
    require_root("the pool boots VMs and mounts their shares");
    // Guests that never get ready: their keepers would wait for them until the agent's
    // deadline (10 minutes here) unless they watch the holder while the guest boots.
    let t = tempfile::tempdir().unwrap();
    let silent = silent_initramfs(t.path());
    let config = config_file_of(t.path(), &silent, "agent_timeout_secs = 600\n");
    let mut holder = Holder::start_with(t.path(), &shim_binary(), config);
    let mut booting: Vec<String> = Vec::new();
    wait_until(
        "two pooled guests to be up and not ready",
        Duration::from_secs(90),
        || {
            let Some(s) = status(&holder.config) else {
                return false;
            };
            booting = s["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|vm| vm["state"] == "booting")
                .filter_map(|vm| vm["vmid"].as_str().map(str::to_string))
                .collect();
            booting.len() == 2
                && booting.iter().all(|vm| {
                    std::fs::read_to_string(Path::new(POOL).join(vm).join("vm/console.log"))
                        .is_ok_and(|c| c.contains(SILENT_INIT_UP))
                })
        },
    );
    // The holder's children: a keeper per VM (a jail's supervisor, a fork of a keeper that
    // never execs, has a keeper's arguments too).
    let holder_pid = holder.child.id();
    let keepers: Vec<u32> = processes_mentioning(&format!("--holder\0{holder_pid}\0"))
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| {
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    == Some(&holder_pid.to_string())
            })
        })
        .collect();
    assert_eq!(keepers.len(), 2, "a keeper per booting VM: {keepers:?}");
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    wait_until(
        "the booting VMs, their keepers and .pool/ to go",
        Duration::from_secs(20),
        || {
            !keepers.iter().any(|&k| husk_tests::process_alive(k))
                && processes_mentioning(&format!("{POOL}/vm-")).is_empty()
                && !Path::new(POOL).exists()
        },
    );
    let (dirs, ids) = pool_leftovers();
    assert!(dirs.is_empty() && ids.is_empty(), "left: {dirs:?} {ids:?}");
    for vm in booting {
        vm_gone(&vm);
    }
}

#[test]
fn killing_a_pooled_vm_or_a_claiming_shim_leaves_nothing() {
    require_root("the pool boots VMs and mounts their shares");
    let h = HuskContainerd::start_with_config(EXTRA);
    let t = tempfile::tempdir().unwrap();
    let holder = Holder::start(t.path());
    holder.wait_ready(2);

    // A claimed VM's QEMU killed: the task ends, delete leaves nothing.
    let sb = unique("pool-qemu");
    let vm = end_claimed(&h, &holder, &sb, |vm| kill(qemu_of(vm)));
    remove_claimed(&h, &sb, &vm);

    // An unclaimed VM's QEMU killed: its keeper ends, the holder boots another.
    end_pooled(&holder, 1, |vm| kill(qemu_of(vm)));

    // The claiming shim killed right after its claim.
    let victim = unique("pool-victim");
    let mut run = h.ctd.ctr_command(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        &victim,
        "sleep",
        "1000",
    ]);
    let mut child = run
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vm = None;
    // Polled every 2 ms: the shim is then still bringing the sandbox up (moving the VM into
    // its cgroup, connecting to the agent, CreateSandbox: ~150 ms here) when it is killed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.is_none() {
        assert!(
            Instant::now() < deadline,
            "no claim for {victim}:\n{}",
            holder.log()
        );
        std::thread::sleep(Duration::from_millis(2));
        vm = holder.claimed_by(&victim);
    }
    let marker = format!("-id\0{victim}\0");
    for p in processes_mentioning(&victim) {
        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&marker)
            && std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.starts_with("containerd-shim"))
        {
            kill(p);
        }
    }
    let _ = child.wait();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    vm_gone(vm.as_ref().unwrap());
    let _ = h.ctd.ctr(&["task", "delete", "-f", &victim]);
    let _ = h.ctd.ctr(&["containers", "delete", &victim]);
    assert_sandbox_gone(&victim);

    // And the next start works.
    let next = unique("pool-after");
    assert_eq!(
        run_rm(&h, &next, &[], "echo after"),
        ("after\n".to_string(), 0),
        "the killed claim's ctr said: {err}\nthe holder's log:\n{}",
        holder.log()
    );
    assert_sandbox_gone(&next);
}

#[test]
fn a_pooled_vm_whose_virtiofsd_dies_is_ended_and_replaced() {
    require_root("the pool boots VMs and mounts their shares");
    let h = HuskContainerd::start_with_config(EXTRA);
    let t = tempfile::tempdir().unwrap();
    let holder = Holder::start(t.path());
    holder.wait_ready(2);
    let kill_virtiofsd = |dir: &str| {
        let helpers: Vec<u32> = processes_mentioning(dir)
            .into_iter()
            .filter(|p| {
                std::fs::read_link(format!("/proc/{p}/exe"))
                    .is_ok_and(|e| e.to_string_lossy().ends_with("/virtiofsd"))
            })
            .collect();
        assert!(!helpers.is_empty(), "no virtiofsd under {dir}");
        for p in helpers {
            kill(p);
        }
    };

    // Claimed: the keeper stops the VM, and the claiming shim, asleep on the VM's pidfd,
    // ends the task and says why. (The VM's processes' command lines still name the
    // directory where it was pooled.)
    let sb = unique("pool-fsd");
    let vm = end_claimed(&h, &holder, &sb, |vm| {
        kill_virtiofsd(&format!("{POOL}/{vm}/"))
    });
    let said = |log: String| {
        log.lines()
            .find(|l| l.contains(&format!("sandbox {sb}: the VM ended (")))
            .map(str::to_string)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while said(h.ctd.log()).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let line =
        said(h.ctd.log()).unwrap_or_else(|| panic!("no word of the VM's end:\n{}", h.ctd.log()));
    assert!(line.contains("virtiofsd"), "{line}");
    remove_claimed(&h, &sb, &vm);

    // Unclaimed: its keeper stops the VM after the helper's grace and ends, and the holder
    // boots another (a VM without its share is not kept for a sandbox).
    end_pooled(&holder, 1, |vm| kill_virtiofsd(&format!("{POOL}/{vm}/")));
    assert!(
        holder.log().contains("the VM ended while pooled"),
        "{}",
        holder.log()
    );
}

#[test]
fn a_changed_configuration_ends_the_holder_and_its_vms() {
    require_root("the pool boots VMs and mounts their shares");
    let t = tempfile::tempdir().unwrap();
    let mut holder = Holder::start(t.path());
    holder.wait_ready(2);
    let held: Vec<String> = holder.status()["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vmid"].as_str().unwrap().to_string())
        .collect();
    // An edit that leaves the pool as it is changes nothing.
    let text = std::fs::read_to_string(&holder.config).unwrap();
    std::fs::write(&holder.config, format!("{text}\n# an edit\n")).unwrap();
    std::thread::sleep(Duration::from_secs(7));
    assert!(
        holder.child.try_wait().unwrap().is_none(),
        "the holder ended on an edit that does not change the pool:\n{}",
        holder.log()
    );
    // Another VM size: the holder ends, and its VMs with it.
    std::fs::write(&holder.config, format!("memory_mib = 320\n{text}")).unwrap();
    wait_until("the holder to end", Duration::from_secs(15), || {
        holder.child.try_wait().unwrap().is_some()
    });
    assert!(
        holder
            .log()
            .contains("changed: the pool is now 2 VM(s) of 1 vCPU, 320 MiB"),
        "{}",
        holder.log()
    );
    for vmid in held {
        vm_gone(&vmid);
    }
    wait_until(
        "the pooled VMs' directories and jail ids to go",
        Duration::from_secs(10),
        || {
            let (dirs, ids) = pool_leftovers();
            dirs.is_empty() && ids.is_empty()
        },
    );
}

#[test]
fn an_upgrade_of_the_binary_ends_the_holder_and_its_vms() {
    require_root("the pool boots VMs and mounts their shares");
    let t = tempfile::tempdir().unwrap();
    let program = t.path().join("containerd-shim-husk-v2");
    std::fs::copy(shim_binary(), &program).unwrap();
    let mut holder = Holder::start_from(t.path(), &program);
    holder.wait_ready(2);
    let held: Vec<String> = holder.status()["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vmid"].as_str().unwrap().to_string())
        .collect();
    // An upgrade: a new file renamed over the old one.
    let new = t.path().join("new");
    std::fs::copy(shim_binary(), &new).unwrap();
    std::fs::rename(&new, &program).unwrap();
    wait_until("the holder to end", Duration::from_secs(15), || {
        holder.child.try_wait().unwrap().is_some()
    });
    assert!(
        holder.log().contains("was replaced (an upgrade)"),
        "{}",
        holder.log()
    );
    for vmid in held {
        vm_gone(&vmid);
    }
    wait_until(
        "the pooled VMs' directories and jail ids to go",
        Duration::from_secs(10),
        || {
            let (dirs, ids) = pool_leftovers();
            dirs.is_empty() && ids.is_empty()
        },
    );
}
