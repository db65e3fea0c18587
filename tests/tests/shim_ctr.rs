//! Tier 3, the front door: `ctr run --runtime io.containerd.husk.v2` against a private
//! containerd runs each sandbox in its own microVM (QEMU TCG here) — output byte-exact, exit
//! codes, stdin EOF, exec, pause/resume, stats, kill, the Kata runtime name, a VM that dies
//! under its task — and leaves no VM process, mount or /run/husk directory behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_tests::husk::{
    assert_sandbox_gone, mounts_under, processes_mentioning, HuskContainerd, BUSYBOX,
};
use husk_tests::require_root;

const RUNTIME: &str = "io.containerd.husk.v2";

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

#[test]
fn ctr_run_runs_in_a_microvm_with_exact_output_and_exit_codes() {
    require_root("containerd");
    let h = HuskContainerd::start();
    let id = unique("run");
    let out = h.ctd.run_rm(
        Some(RUNTIME),
        &[],
        BUSYBOX,
        &id,
        &[
            "sh",
            "-c",
            "echo hello from husk; uname -r; echo to-stderr >&2; exit 3",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout {stdout}\nstderr {}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.ctd.log()
    );
    // The guest's kernel, not the host's: the container ran in the VM.
    assert!(stdout.starts_with("hello from husk\n6.1."), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"));
    assert_sandbox_gone(&id);

    // A megabyte of binary-safe output arrives byte for byte.
    let id = unique("bulk");
    let out = h.ctd.run_rm(
        Some(RUNTIME),
        &[],
        BUSYBOX,
        &id,
        &[
            "sh",
            "-c",
            "head -c 1048576 /dev/zero | tr '\\0' 'x'; echo; echo end",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout.len(),
        1048576 + 1 + 4,
        "ctr stderr: {}\ncontainerd's warnings:\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.ctd
            .log()
            .lines()
            .filter(|l| l.contains("level=warn") || l.contains("level=error"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(out.stdout.ends_with(b"x\nend\n"));
    assert_sandbox_gone(&id);
}

#[test]
fn stdin_reaches_the_container_and_eof_ends_it() {
    require_root("containerd");
    let h = HuskContainerd::start();
    let id = unique("stdin");
    let mut child = h
        .ctd
        .run_rm_command(
            Some(RUNTIME),
            &[],
            BUSYBOX,
            &id,
            &["sh", "-c", "cat; echo done"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "line one\nline two\ndone\n"
    );
    assert_sandbox_gone(&id);
}

#[test]
fn exec_pause_resume_stats_kill_and_the_kata_name() {
    require_root("containerd");
    let h = HuskContainerd::start();
    let id = unique("long");
    h.ctd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.kata.v2",
        BUSYBOX,
        &id,
        "sleep",
        "1000",
    ]);
    assert!(Path::new("/run/husk").join(&id).join("shared").is_dir());
    // The VM's processes and every thread of the shim live in the sandbox's host cgroup
    // (ctr's cgroupsPath: /<ns>/<id>) in every hierarchy: the thread that starts the VM
    // enters it alone, the rest moves while the VM boots; either way it is done before
    // `ctr run -d` returns.
    let cgroup = format!("/{}/{id}", h.ctd.namespace);
    let vm_procs = processes_mentioning(&format!("/run/husk/{id}/"));
    assert!(!vm_procs.is_empty());
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()
    };
    let mut shim = vm_procs[0];
    while std::fs::read_to_string(format!("/proc/{shim}/comm"))
        .is_ok_and(|c| !c.starts_with("containerd-shim"))
    {
        shim = parent(shim)
            .filter(|p| *p > 1)
            .expect("the VM's processes descend from the shim");
    }
    let mut tasks: Vec<String> = vm_procs.iter().map(|p| format!("/proc/{p}")).collect();
    for t in std::fs::read_dir(format!("/proc/{shim}/task"))
        .unwrap()
        .flatten()
    {
        tasks.push(t.path().display().to_string());
    }
    for t in &tasks {
        let cg = std::fs::read_to_string(format!("{t}/cgroup")).unwrap_or_default();
        // The named systemd hierarchy holds no controller; the shim does not use it.
        let outside: Vec<&str> = cg
            .lines()
            .filter(|l| !l.contains(":name=") && !l.ends_with(&cgroup))
            .collect();
        assert!(
            outside.is_empty() && cg.lines().count() > 1,
            "{t} (of shim {shim}) is not in {cgroup} everywhere: {outside:?}"
        );
    }
    let out = h.ctd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo exec-ok; exit 0",
    ]);
    assert_eq!(out, "exec-ok\n");
    let out = h
        .ctd
        .ctr(&["task", "exec", "--exec-id", "e2", &id, "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    // An exec that leaves a background process holding its stdout still ends: its exit is
    // reported once the output stops moving, as under runc (the sleep outlives the test
    // only if that is broken; the SIGKILL below ends it).
    let mut bg = h
        .ctd
        .ctr_command(&[
            "task",
            "exec",
            "--exec-id",
            "e3",
            &id,
            "sh",
            "-c",
            "sleep 600 & echo bg-started",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = bg.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = bg.kill();
            let _ = bg.wait();
            panic!("ctr task exec of a shell that left a background process did not return");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut bg.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(out, "bg-started\n");
    let ps = h.ctd.ctr_ok(&["task", "ps", &id]);
    assert!(ps.lines().count() >= 2, "{ps}");
    h.ctd.ctr_ok(&["task", "pause", &id]);
    assert!(h
        .ctd
        .ctr_ok(&["task", "ls"])
        .lines()
        .any(|l| l.starts_with(&id) && l.contains("PAUSED")));
    h.ctd.ctr_ok(&["task", "resume", &id]);
    let metrics = h.ctd.ctr_ok(&["task", "metrics", &id]);
    assert!(
        metrics.contains("memory") || metrics.contains("pids"),
        "{metrics}"
    );
    h.ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !h.ctd.ctr(&["task", "delete", &id]).status.success() {
        assert!(
            Instant::now() < deadline,
            "task did not stop after SIGKILL: {}",
            h.ctd.ctr_ok(&["task", "ls"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    h.ctd.ctr_ok(&["containers", "delete", &id]);
    assert_sandbox_gone(&id);
    for root in [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ] {
        let leaf = Path::new(root).join(cgroup.trim_start_matches('/'));
        assert!(!leaf.exists(), "{} left behind", leaf.display());
    }
}

#[test]
fn a_vm_that_dies_ends_its_task_and_delete_cleans_up() {
    require_root("containerd");
    let h = HuskContainerd::start();
    let id = unique("crash");
    h.run_idle(&id, &[]);
    let vm = processes_mentioning(&format!("/run/husk/{id}/"))
        .into_iter()
        .find(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .is_ok_and(|e| e.to_string_lossy().contains("qemu-system"))
        })
        .expect("the sandbox's QEMU process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = h.ctd.ctr_ok(&["task", "ls"]);
        if ls
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("STOPPED"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the task did not stop after its VM died: {ls}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    h.ctd.ctr_ok(&["task", "delete", &id]);
    h.ctd.ctr_ok(&["containers", "delete", &id]);
    assert_sandbox_gone(&id);
}

#[test]
fn a_killed_shim_is_cleaned_up_by_delete() {
    require_root("containerd");
    let h = HuskContainerd::start();
    let id = unique("shimkill");
    h.run_idle(&id, &[]);
    assert!(!mounts_under(&Path::new("/run/husk").join(&id)).is_empty());
    // The shim's task socket, which a killed shim cannot remove itself.
    let address = std::fs::read_to_string(
        h.ctd
            .dir()
            .join("state/io.containerd.runtime.v2.task")
            .join(&h.ctd.namespace)
            .join(&id)
            .join("address"),
    )
    .unwrap();
    let socket = PathBuf::from(address.trim().trim_start_matches("unix://"));
    assert!(socket.exists(), "{}", socket.display());
    let shim = processes_mentioning(&id)
        .into_iter()
        .find(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .is_ok_and(|e| e.ends_with("containerd-shim-husk-v2"))
        })
        .expect("the sandbox's shim process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // containerd sees the shim go, runs `containerd-shim-husk-v2 delete`, and that removes the
    // mounts and the state directory; the VM died with its shim.
    assert_sandbox_gone(&id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !h.ctd.ctr(&["task", "delete", &id]).status.success()
        && h.ctd.ctr_ok(&["task", "ls"]).contains(&id)
    {
        assert!(
            Instant::now() < deadline,
            "task still listed: {}",
            h.ctd.ctr_ok(&["task", "ls"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    h.ctd.ctr_ok(&["containers", "delete", &id]);
    assert!(
        !socket.exists(),
        "the killed shim's socket {} was left",
        socket.display()
    );
}

#[test]
fn sigkill_gives_exit_status_137() {
    require_root("containerd");
    let h = HuskContainerd::start();
    // A container killed with SIGKILL exits 137, as under runc.
    let id = unique("sigkill");
    let child = h
        .ctd
        .run_rm_command(Some(RUNTIME), &[], BUSYBOX, &id, &["sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !h
        .ctd
        .ctr_ok(&["task", "ls"])
        .lines()
        .any(|l| l.starts_with(&id) && l.contains("RUNNING"))
    {
        assert!(Instant::now() < deadline, "the container did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    h.ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_sandbox_gone(&id);
}

#[test]
fn a_missing_kernel_fails_ctr_run_with_the_reason() {
    require_root("containerd");
    let h = HuskContainerd::start_with_config("kernel = \"/nonexistent/vmlinux\"\n");
    let id = unique("nokernel");
    let out = h.ctd.run_rm(Some(RUNTIME), &[], BUSYBOX, &id, &["true"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/vmlinux") && err.contains("cargo xtask kernel"),
        "{err}"
    );
    assert_sandbox_gone(&id);
    let _ = h.ctd.ctr(&["containers", "delete", &id]);
}

#[test]
fn ctr_run_t_gives_the_container_a_terminal() {
    require_root("containerd");
    husk_tests::require_program("script", "bsdutils");
    let h = HuskContainerd::start();
    let id = unique("tty");
    // `ctr run -t` needs a terminal of its own: `script` gives it one. (Its size is 0x0 here,
    // as script's own input is a pipe, so `stty size` has nothing to report.)
    let ctr = format!(
        "ctr --address {} --namespace {} run --rm -t --runtime {RUNTIME} {BUSYBOX} {id} sh -c 'test -t 0 && test -t 1 && echo TTY-$((6*7)); stty -a | head -1'",
        h.ctd.socket().display(),
        h.ctd.namespace
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &ctr, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Keep script's stdin open, as a user at a terminal would: its EOF would reach the
    // container's terminal as ^D.
    let stdin = child.stdin.take();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("TTY-42"), "{text}");
    assert!(text.contains("speed 38400 baud"), "{text}");
    assert_sandbox_gone(&id);
}
