//! Tier 3: the shim's sandbox semantics through containerd — volumes shared with the guest,
//! containers grouped into one VM by annotation, the events containerd gets, and an agent
//! that never answers (a deadline error with the console, not a hang, and nothing left).

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_tests::guest::{silent_initramfs, SILENT_INIT_UP};
use husk_tests::husk::{
    assert_sandbox_gone, mounts_under, processes_mentioning, HuskContainerd, BUSYBOX,
};
use husk_tests::require_root;

const RUNTIME: &str = "io.containerd.husk.v2";

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

#[test]
fn volumes_reach_the_guest_and_annotated_containers_share_the_sandbox_vm() {
    require_root("containerd, mounts");
    let h = HuskContainerd::start();
    let vol = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("config"), "from the host\n").unwrap();
    let sb = unique("pod");
    let rw_mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        vol.path().display()
    );
    let ro_mount = format!(
        "type=bind,src={},dst=/config,options=rbind:ro",
        ro.path().display()
    );
    h.ctd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--mount",
        &rw_mount,
        "--mount",
        &ro_mount,
        BUSYBOX,
        &sb,
        "sleep",
        "1000",
    ]);

    let out = h.ctd.ctr_ok(&["task", "exec", "--exec-id", "w", &sb, "sh", "-c", "echo written-in-guest > /data/out; cat /config/config; touch /config/x 2>/dev/null || echo read-only"]);
    assert_eq!(out, "from the host\nread-only\n");
    assert_eq!(
        std::fs::read_to_string(vol.path().join("out")).unwrap(),
        "written-in-guest\n"
    );

    // A second container naming the sandbox joins its VM: same guest boot id, one VM process.
    let c2 = unique("pod-c2");
    let ann = format!("io.husk.sandbox-id={sb}");
    h.ctd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        &ann,
        BUSYBOX,
        &c2,
        "sleep",
        "1000",
    ]);
    let boot = |id: &str, e: &str| {
        h.ctd.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            e,
            id,
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ])
    };
    assert_eq!(boot(&sb, "b1"), boot(&c2, "b2"));
    let vms: Vec<u32> = processes_mentioning(&format!("/run/husk/{sb}/"))
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .is_ok_and(|e| e.to_string_lossy().contains("qemu-system"))
        })
        .collect();
    assert_eq!(vms.len(), 1, "one VM for the sandbox: {vms:?}");
    assert!(
        !Path::new("/run/husk").join(&c2).exists(),
        "the second container must not get a sandbox of its own"
    );
    // Each container sees its own processes only.
    let ps = h
        .ctd
        .ctr_ok(&["task", "exec", "--exec-id", "p", &c2, "ps", "-o", "args"]);
    assert!(
        !ps.contains("/data") && ps.lines().filter(|l| l.contains("sleep")).count() == 1,
        "{ps}"
    );

    h.remove(&c2);
    assert!(
        Path::new("/run/husk").join(&sb).is_dir(),
        "the sandbox outlives its other containers"
    );
    h.remove(&sb);
    assert_sandbox_gone(&sb);
    assert!(mounts_under(vol.path()).is_empty());
}

#[test]
fn task_events_reach_containerd() {
    require_root("containerd");
    let h = HuskContainerd::start();
    let mut events = h
        .ctd
        .ctr_command(&["events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let id = unique("ev");
    h.run_idle(&id, &[]);
    h.ctd
        .ctr_ok(&["task", "exec", "--exec-id", "e1", &id, "true"]);
    h.ctd.ctr_ok(&["task", "pause", &id]);
    h.ctd.ctr_ok(&["task", "resume", &id]);
    h.remove(&id);
    assert_sandbox_gone(&id);
    std::thread::sleep(Duration::from_millis(300));
    let _ = events.kill();
    let mut out = String::new();
    events
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = events.wait();
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(
            out.lines().any(|l| l.contains(topic) && l.contains(&id)),
            "no {topic} event for {id}:\n{out}"
        );
    }
}

#[test]
fn an_agent_that_never_answers_is_a_deadline_error_and_leaves_nothing() {
    require_root("containerd");
    // A guest whose /init boots but never serves the agent API.
    let dir = tempfile::tempdir().unwrap();
    let cpio = silent_initramfs(dir.path());
    let h = HuskContainerd::start_with_config(&format!(
        "initramfs = \"{}\"\nagent_timeout_secs = 5\n",
        cpio.display()
    ));
    let id = unique("silent");
    let started = Instant::now();
    let out = h.ctd.run_rm(Some(RUNTIME), &[], BUSYBOX, &id, &["true"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.contains("did not answer within 5s"), "{err}");
    assert!(
        err.contains(SILENT_INIT_UP),
        "the error carries the console tail: {err}"
    );
    assert_sandbox_gone(&id);
    let _ = h.ctd.ctr(&["containers", "delete", &id]);
}

#[test]
fn a_guest_that_dies_at_boot_is_reported_at_once() {
    require_root("containerd");
    // panic=-1 on the command line: a kernel that cannot find /init panics and the VM ends.
    let h = HuskContainerd::start_with_config(
        "kernel_params = \"rdinit=/nonexistent\"\nagent_timeout_secs = 300\n",
    );
    let id = unique("panic");
    let started = Instant::now();
    let out = h.ctd.run_rm(Some(RUNTIME), &[], BUSYBOX, &id, &["true"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the VM ended") && err.contains("before its agent answered"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "waited {:?}: the deadline, not the VM's end",
        started.elapsed()
    );
    assert_sandbox_gone(&id);
    let _ = h.ctd.ctr(&["containers", "delete", &id]);
}

#[test]
fn shims_left_running_are_cleaned_up_without_their_bundle() {
    require_root("containerd");
    let id = unique("orphan");
    {
        let h = HuskContainerd::start();
        h.run_idle(&id, &[]);
        assert!(Path::new("/run/husk").join(&id).is_dir());
        // Dropped with the task running: its containerd goes, the shim stays, and the
        // harness ends it and runs `containerd-shim-husk-v2 delete` with no bundle at hand.
    }
    assert_sandbox_gone(&id);
    assert!(mounts_under(&Path::new("/run/husk").join(&id)).is_empty());
}
