//! The agent in a real guest (qemu backend; TCG here), reached over hybrid vsock: containers
//! on a virtio-fs rootfs with byte-exact stdio, exit codes, exec, signals, a TTY, stdin EOF,
//! pause/resume, cgroup limits (an OOM kill that is reported, a pids limit), a sandbox whose
//! containers share uts/ipc but not PIDs, and malformed specs that leave nothing behind.

use std::time::{Duration, Instant};

use husk_protocols::agent::*;
use husk_protocols::ttrpc::{context, Code};
use husk_tests::agent::{spec, status_of};
use husk_tests::guest::Guest;
use serde_json::json;

fn sh(script: &str) -> serde_json::Value {
    spec(&["sh", "-c", script])
}

fn ctx() -> context::Context {
    context::with_timeout(120_000_000_000)
}

/// Guests that boot together on a busy host keep a clock that is not jiffies: under TCG
/// each guest is told the host's TSC rate (where the host's TSC is invariant) instead of
/// measuring it against its emulated PIT, which fails when the vCPU is starved (four guests
/// booting at once on the 2-core development host: all four fell back to 4 ms jiffies
/// before). Under KVM the guest has kvm-clock.
#[test]
fn guests_booted_together_keep_a_fine_clock() {
    let host = husk_hypervisor::host::detect();
    let tcg = host.backend.qemu_accel() == husk_hypervisor::Accel::Tcg;
    if tcg {
        assert!(
            host.guest_tsc_khz.is_some(),
            "this host's TSC rate is unknown to husk ({:?}): the test needs an invariant TSC and /dev/kvm to read it",
            host.kvm
        );
    }
    let guests: Vec<std::thread::JoinHandle<String>> = (0..4)
        .map(|_| {
            std::thread::spawn(|| {
                let g = Guest::boot(256);
                g.agent
                    .client
                    .get_guest_details(ctx(), &GuestDetailsRequest::new())
                    .unwrap()
                    .clocksource
            })
        })
        .collect();
    let clocks: Vec<String> = guests.into_iter().map(|g| g.join().unwrap()).collect();
    let fine: &[&str] = if tcg {
        &["tsc-early", "tsc"]
    } else {
        &["kvm-clock", "tsc-early", "tsc"]
    };
    assert!(
        clocks.iter().all(|c| fine.contains(&c.as_str())),
        "guests booted together run on {clocks:?}, not {fine:?}"
    );
}

#[test]
fn versions_details_round_trip_and_destroy_powers_off() {
    let mut g = Guest::boot(256);
    let c = g.agent.check();
    assert_eq!(c.api_version, husk_protocols::API_VERSION);
    assert_eq!(c.agent_version, env!("CARGO_PKG_VERSION"));
    let d = g
        .agent
        .client
        .get_guest_details(ctx(), &GuestDetailsRequest::new())
        .unwrap();
    assert_eq!(d.api_version, husk_protocols::API_VERSION);
    assert!(d.kernel_release.starts_with("6.1."), "{d:?}");
    assert!(!d.clocksource.is_empty(), "{d:?}");
    for ctl in ["cpu", "memory", "pids"] {
        assert!(
            d.cgroup_controllers.iter().any(|c| c == ctl),
            "{ctl} missing in {:?}",
            d.cgroup_controllers
        );
    }
    // Round trip: median of 200 Checks.
    let mut t: Vec<Duration> = (0..200)
        .map(|_| {
            let s = Instant::now();
            g.agent.check();
            s.elapsed()
        })
        .collect();
    t.sort();
    let median = t[t.len() / 2];
    eprintln!(
        "guest boot to agent ready: {} ms (guest clock), {} ms (host, incl. QEMU start); Check round trip median {:?}",
        g.ready.since_boot_ms,
        g.boot.as_millis(),
        median
    );
    assert!(
        median < Duration::from_millis(50),
        "Check round trip {median:?}"
    );
    // Set the guest clock, then DestroySandbox: the reply comes back, then the VM powers off.
    g.agent
        .client
        .set_guest_date_time(
            ctx(),
            &SetGuestDateTimeRequest {
                seconds: 2_000_000_000,
                ..Default::default()
            },
        )
        .unwrap();
    g.agent
        .client
        .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
        .expect("DestroySandbox replies");
    let status =
        g.vm.wait(Some(Duration::from_secs(60)))
            .unwrap()
            .expect("VM ended after DestroySandbox");
    assert!(status.success(), "{status}");
    assert!(
        g.console().contains("powering off: DestroySandbox"),
        "{}",
        g.console()
    );
}

#[test]
fn stdout_byte_exact_exit_codes_stdin_eof_exec_and_signals() {
    let g = Guest::boot(256);
    // 10 MiB of non-repeating bytes through stdout.
    let root = g.rootfs("big");
    let payload: Vec<u8> = (0u32..10 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13).to_le_bytes()[0])
        .collect();
    std::fs::write(root.join("payload"), &payload).unwrap();
    let t = Instant::now();
    let out = g
        .agent
        .run("big", &sh("cat /payload; echo -n err >&2; exit 42"));
    let took = t.elapsed();
    assert_eq!(out.status, 42);
    assert_eq!(out.stderr, b"err");
    assert!(
        out.stdout == payload,
        "10 MiB stdout differs (got {} bytes)",
        out.stdout.len()
    );
    eprintln!("10 MiB container stdout over vsock (virtio-fs read included): {took:?}");

    // Figures: stdout throughput alone, and a virtio-fs write.
    g.rootfs("fig");
    let t = Instant::now();
    let out = g.agent.run("fig", &sh("head -c 33554432 /dev/zero"));
    let stdout_took = t.elapsed();
    assert_eq!(out.stdout.len(), 32 << 20);
    let t = Instant::now();
    let out = g.agent.run(
        "fig",
        &sh("dd if=/dev/zero of=/written bs=1048576 count=32 2>/dev/null; sync"),
    );
    let write_took = t.elapsed();
    assert_eq!(out.status, 0);
    assert_eq!(
        std::fs::metadata(g.shared().join("fig/rootfs/written"))
            .unwrap()
            .len(),
        32 << 20
    );
    let mibs = |d: Duration| 32.0 / d.as_secs_f64();
    eprintln!(
        "32 MiB container stdout: {stdout_took:?} ({:.0} MiB/s); 32 MiB virtio-fs write: {write_took:?} ({:.0} MiB/s), both including container start",
        mibs(stdout_took),
        mibs(write_took)
    );

    // stdin reaches the process and EOF ends it.
    g.rootfs("io");
    g.agent
        .create("io", &sh("cat; echo eof >&2"), false)
        .unwrap();
    g.agent.start("io");
    g.agent.write_stdin("io", "", b"\x00binary\xffline\n");
    g.agent.close_stdin("io", "");
    let out = g.agent.collect("io", "");
    assert_eq!(
        (out.status, out.stdout.as_slice(), out.stderr.as_slice()),
        (0, &b"\x00binary\xffline\n"[..], &b"eof\n"[..])
    );
    g.agent.remove("io", false).unwrap();

    // exec into a running container; signals end processes with their signal.
    g.rootfs("svc");
    g.agent
        .create("svc", &spec(&["sleep", "1000"]), false)
        .unwrap();
    g.agent.start("svc");
    let p = json!({ "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", "echo in-$(hostname); exit 3"], "env": ["PATH=/bin"], "cwd": "/" });
    g.agent.exec("svc", "e1", &p).unwrap();
    let out = g.agent.collect("svc", "e1");
    assert_eq!(
        (out.status, out.stdout_str().as_str()),
        (3, "in-husk-test\n")
    );
    let p = json!({ "user": {"uid": 0, "gid": 0}, "args": ["sleep", "1000"], "env": ["PATH=/bin"], "cwd": "/" });
    g.agent.exec("svc", "e2", &p).unwrap();
    g.agent.signal("svc", "e2", 15);
    let w = g.agent.wait("svc", "e2");
    assert_eq!((w.exit_status, w.signal), (128 + 15, 15));
    g.agent.signal("svc", "", 9);
    let w = g.agent.wait("svc", "");
    assert_eq!((w.exit_status, w.signal), (137, 9));
    g.agent.remove("svc", false).unwrap();
}

/// Reads the TTY until `want` shows up.
fn read_until(g: &Guest, id: &str, want: &str) -> String {
    g.agent.read_until(id, "", want, Duration::from_secs(60))
}

#[test]
fn tty_round_trip_and_resize() {
    let g = Guest::boot(256);
    g.rootfs("tty");
    // The spec's terminal flag and console size are enough (the request's flag is false).
    let mut s = spec(&["sh"]);
    s["process"]["terminal"] = json!(true);
    s["process"]["consoleSize"] = json!({ "height": 24, "width": 77 });
    g.agent.create("tty", &s, false).unwrap();
    g.agent.start("tty");
    // The pty is the container's own: its devpts has it, `tty` names it.
    g.agent.write_stdin(
        "tty",
        "",
        b"stty size; echo TTY=$(tty) PTS=$(ls /dev/pts); echo SZ-$((1+1))\n",
    );
    let seen = read_until(&g, "tty", "SZ-2\r\n");
    assert!(seen.contains("24 77\r\n"), "{seen:?}");
    assert!(seen.contains("TTY=/dev/pts/0 PTS=0 ptmx\r\n"), "{seen:?}");
    g.agent
        .client
        .tty_win_resize(
            ctx(),
            &TtyWinResizeRequest {
                container_id: "tty".into(),
                rows: 41,
                columns: 101,
                ..Default::default()
            },
        )
        .unwrap();
    // The tty echoes the typed line: the marker is computed so only the output matches.
    g.agent
        .write_stdin("tty", "", b"stty size; test -t 0 && echo TTY-$((6*7))\n");
    let seen = read_until(&g, "tty", "TTY-42\r\n");
    assert!(seen.contains("41 101\r\n"), "{seen:?}");
    // An exec with its own terminal, a second pty of the container's devpts, of its own size.
    let p = json!({ "terminal": true, "consoleSize": { "height": 30, "width": 90 }, "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", "test -t 0 && test -t 1 && echo EXEC-TTY $(tty) $(ls /dev/pts) $(stty size)"], "env": ["PATH=/bin"], "cwd": "/" });
    g.agent.exec("tty", "t2", &p).unwrap();
    let out = g.agent.collect("tty", "t2");
    assert_eq!(
        (out.status, out.stdout_str().as_str()),
        (0, "EXEC-TTY /dev/pts/1 0 1 ptmx 30 90\r\n"),
        "{out:?}"
    );
    g.agent.write_stdin("tty", "", b"exit 5\n");
    assert_eq!(g.agent.wait("tty", "").exit_status, 5);
    g.agent.remove("tty", false).unwrap();
}

#[test]
fn pause_resume_and_stats() {
    let g = Guest::boot(256);
    let root = g.rootfs("p");
    g.agent
        .create(
            "p",
            &sh("i=0; while true; do i=$((i+1)); echo $i > /tick; usleep 20000; done"),
            false,
        )
        .unwrap();
    g.agent.start("p");
    let tick = || {
        std::fs::read_to_string(root.join("tick"))
            .unwrap_or_default()
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while tick() < 3 {
        assert!(Instant::now() < deadline, "the container never ticked");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = ContainerRef {
        container_id: "p".into(),
        ..Default::default()
    };
    g.agent.client.pause_container(ctx(), &r).unwrap();
    let frozen = tick();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(tick(), frozen, "ticks went on while paused");
    let (code, msg) = status_of(g.agent.client.pause_container(ctx(), &r));
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    let p =
        json!({ "user": {"uid": 0, "gid": 0}, "args": ["true"], "env": ["PATH=/bin"], "cwd": "/" });
    let (code, msg) = status_of(g.agent.exec("p", "x", &p));
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert!(msg.contains("paused — resume it first"), "{msg}");
    g.agent.client.resume_container(ctx(), &r).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tick() <= frozen {
        assert!(Instant::now() < deadline, "no ticks after resume");
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = g.agent.client.stats_container(ctx(), &r).unwrap();
    assert!(
        s.cpu_usage_usec > 0 && s.memory_current_bytes > 0 && s.pids_current >= 1,
        "{s:?}"
    );
    let pids = g.agent.client.list_processes(ctx(), &r).unwrap().pids;
    assert!(!pids.is_empty(), "{pids:?}");
    g.agent.remove("p", true).unwrap();
}

#[test]
fn memory_limit_oom_kill_is_reported_and_pids_limit_holds() {
    let g = Guest::boot(384);
    g.rootfs("oom");
    let mut s = spec(&["tail", "/dev/zero"]);
    s["linux"]["resources"] = json!({ "memory": { "limit": 16 << 20 } });
    g.agent.create("oom", &s, false).unwrap();
    g.agent.start("oom");
    let w = g.agent.wait("oom", "");
    assert_eq!(
        w.signal, 9,
        "the OOM killer ends the process with SIGKILL: {w:?}"
    );
    let ev = g
        .agent
        .client
        .get_oom_event(ctx(), &GetOOMEventRequest::new())
        .unwrap();
    assert_eq!(ev.container_id, "oom");
    let st = g
        .agent
        .client
        .stats_container(
            ctx(),
            &ContainerRef {
                container_id: "oom".into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        st.oom_kills >= 1 && st.memory_max_bytes == 16 << 20,
        "{st:?}"
    );
    g.agent.remove("oom", false).unwrap();

    g.rootfs("pids");
    // busybox sh gives up at the first failed fork; the sleeps it did start stay (in the cgroup).
    let mut s =
        sh("for i in 1 2 3 4 5 6 7 8; do sleep 30 >/dev/null 2>&1 & done; echo all-started");
    s["linux"]["resources"] = json!({ "pids": { "limit": 4 } });
    g.agent.create("pids", &s, false).unwrap();
    g.agent.start("pids");
    let out = g.agent.collect("pids", "");
    let text = format!(
        "{}{}",
        out.stdout_str(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("all-started"),
        "8 forks succeeded under pids.max=4: {text:?}"
    );
    let st = g
        .agent
        .client
        .stats_container(
            ctx(),
            &ContainerRef {
                container_id: "pids".into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(st.pids_max, 4);
    assert!(st.pids_current <= 4, "{st:?}");
    assert!(
        text.contains("fork") || text.contains("Resource temporarily unavailable"),
        "expected fork failures: {text:?}"
    );
    g.agent.remove("pids", true).unwrap();
}

#[test]
fn cgroup_namespace_shows_the_containers_own_subtree() {
    let g = Guest::boot(256);
    g.rootfs("cg");
    let mut s = spec(&["sleep", "1000"]);
    s["linux"]["resources"] = json!({ "memory": { "limit": 48 << 20 } });
    // The spec lists no cgroup namespace: the container gets one all the same.
    s["mounts"].as_array_mut().unwrap().push(json!({ "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"] }));
    g.agent.create("cg", &s, false).unwrap();
    g.agent.start("cg");
    let probe = "cat /proc/self/cgroup /sys/fs/cgroup/memory.max; test -e /sys/fs/cgroup/husk || echo own-subtree";
    let p = json!({ "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", probe], "env": ["PATH=/bin"], "cwd": "/" });
    g.agent.exec("cg", "look", &p).unwrap();
    let out = g.agent.collect("cg", "look");
    assert_eq!(
        (out.status, out.stdout_str().as_str()),
        (0, "0::/\n50331648\nown-subtree\n"),
        "{out:?}"
    );
    // It is the live cgroup: an update shows inside.
    let r = json!({ "memory": { "limit": 80 << 20 } });
    g.agent
        .client
        .update_container(
            ctx(),
            &UpdateContainerRequest {
                container_id: "cg".into(),
                oci_resources_json: serde_json::to_vec(&r).unwrap(),
                ..Default::default()
            },
        )
        .unwrap();
    g.agent.exec("cg", "look2", &p).unwrap();
    let out = g.agent.collect("cg", "look2");
    assert_eq!(out.stdout_str(), "0::/\n83886080\nown-subtree\n", "{out:?}");
    // The guest's cgroup2 is mounted favordynmods (a process's move into a cgroup does not
    // wait for an RCU grace period): the option is the super block's, so the container's
    // mount shows it.
    let p = json!({ "user": {"uid": 0, "gid": 0}, "args": ["grep", "cgroup2", "/proc/self/mountinfo"], "env": ["PATH=/bin"], "cwd": "/" });
    g.agent.exec("cg", "opts", &p).unwrap();
    let out = g.agent.collect("cg", "opts");
    assert!(
        out.stdout_str().contains("favordynmods"),
        "{}",
        out.stdout_str()
    );
    g.agent.remove("cg", true).unwrap();

    // A cgroup namespace by path (the host's, as CRI writes it) keeps the guest's view.
    g.rootfs("host-ns");
    let mut s = sh("cat /proc/self/cgroup");
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "type": "cgroup", "path": "/proc/4242/ns/cgroup" }));
    let out = g.agent.run("host-ns", &s);
    assert_eq!(out.stdout_str(), "0::/husk/host-ns\n", "{out:?}");
}

#[test]
fn sandbox_containers_share_uts_and_ipc_but_not_pids() {
    let g = Guest::boot(256);
    g.agent
        .client
        .create_sandbox(
            ctx(),
            &CreateSandboxRequest {
                sandbox_id: "pod".into(),
                hostname: "pod-host".into(),
                ..Default::default()
            },
        )
        .unwrap();
    g.rootfs("c1");
    g.rootfs("c2");
    g.agent
        .create("c1", &spec(&["sleep", "1000"]), false)
        .unwrap();
    g.agent.start("c1");
    let probe = "hostname; readlink /proc/self/ns/uts; readlink /proc/self/ns/ipc; readlink /proc/self/ns/pid; ls /proc | grep -c '^[0-9]'";
    let out = g.agent.run("c2", &sh(probe));
    let p = json!({ "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", probe], "env": ["PATH=/bin"], "cwd": "/" });
    g.agent.exec("c1", "probe", &p).unwrap();
    let in_c1 = g.agent.collect("c1", "probe");
    let a: Vec<String> = out.stdout_str().lines().map(String::from).collect();
    let b: Vec<String> = in_c1.stdout_str().lines().map(String::from).collect();
    assert_eq!(a[0], "pod-host", "{a:?}");
    assert_eq!(b[0], "pod-host", "{b:?}");
    assert_eq!(a[1], b[1], "uts namespaces differ");
    assert_eq!(a[2], b[2], "ipc namespaces differ");
    assert_ne!(a[3], b[3], "pid namespaces are shared");
    // c2 sees only itself (sh + ls): not c1's sleep.
    let n: u32 = a[4].parse().unwrap();
    assert!(n <= 3, "c2 sees {n} processes: {a:?}");
    g.agent.remove("c1", true).unwrap();
}

#[test]
fn a_pid_namespace_path_joins_the_sandbox_containers_pid_namespace() {
    let g = Guest::boot(256);
    g.agent
        .client
        .create_sandbox(
            ctx(),
            &CreateSandboxRequest {
                sandbox_id: "pod".into(),
                hostname: "pod-host".into(),
                ..Default::default()
            },
        )
        .unwrap();
    // As CRI writes it for a shareProcessNamespace pod: the path names the *host* PID of the
    // sandbox task (the VM), which means the sandbox container's namespace in the guest.
    let shared = |args: &[&str]| {
        let mut s = spec(args);
        s["linux"]["namespaces"][0] = json!({ "type": "pid", "path": "/proc/4242/ns/pid" });
        s
    };
    // Before the sandbox's container exists there is nothing to join: a clear error, and
    // nothing made.
    g.rootfs("app");
    let (code, msg) = status_of(g.agent.create("app", &shared(&["true"]), false));
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(
        msg.starts_with("app: linux.namespaces[0].path = \"/proc/4242/ns/pid\"")
            && msg.contains("container pod does not exist"),
        "{msg}"
    );

    g.rootfs("pod");
    g.agent
        .create("pod", &spec(&["sleep", "1000"]), false)
        .unwrap();
    g.agent.start("pod");
    g.agent
        .create("app", &shared(&["sleep", "1001"]), false)
        .unwrap();
    g.agent.start("app");
    g.rootfs("probe");
    let probe = "readlink /proc/self/ns/pid; tr '\\0' ' ' < /proc/1/cmdline; echo; for c in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $c; echo; done";
    let out = g.agent.run("probe", &shared(&["sh", "-c", probe]));
    assert_eq!(out.status, 0, "{out:?}");
    let lines: Vec<String> = out.stdout_str().lines().map(String::from).collect();
    // PID 1 is the sandbox container's process, and the app's process is visible.
    assert_eq!(lines[1].trim_end(), "sleep 1000", "{lines:?}");
    assert!(
        lines.iter().any(|l| l.trim_end() == "sleep 1001"),
        "{lines:?}"
    );
    // An exec into the app container is in the same namespace, and can signal its neighbour.
    let p = json!({ "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", "readlink /proc/self/ns/pid; for c in /proc/[0-9]*; do grep -q '100[1]' $c/cmdline && kill -TERM ${c#/proc/}; done; true"], "env": ["PATH=/bin"], "cwd": "/" });
    g.agent.exec("app", "kill", &p).unwrap();
    let e = g.agent.collect("app", "kill");
    assert_eq!(e.status, 0, "{e:?}");
    assert_eq!(
        e.stdout_str().lines().next(),
        lines.first().map(String::as_str),
        "exec's PID namespace differs"
    );
    // The app's process ended by that signal (SIGTERM: 143).
    assert_eq!(g.agent.wait("app", "").exit_status, 143);
    for c in ["app", "pod"] {
        g.agent.remove(c, true).unwrap();
    }
}

#[test]
fn malformed_specs_leave_no_container_mount_or_cgroup_behind() {
    let g = Guest::boot(256);
    g.rootfs("bad");
    let (code, msg) = status_of(g.agent.create_raw("bad", b"[1,"));
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(
        msg.starts_with("bad: ") && msg.contains("invalid type"),
        "{msg}"
    );
    let mut s = spec(&["true"]);
    s.as_object_mut().unwrap().remove("root");
    let (code, msg) = status_of(g.agent.create("bad", &s, false));
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.starts_with("bad: root: missing"), "{msg}");
    let mut s = spec(&["true"]);
    s["linux"]["namespaces"] = json!([{ "type": "network2" }]);
    assert_eq!(
        status_of(g.agent.create("bad", &s, false)).0,
        Code::INVALID_ARGUMENT
    );
    let mut s = spec(&["true"]);
    s["process"]["user"]["uid"] = json!(-5);
    assert_eq!(
        status_of(g.agent.create("bad", &s, false)).0,
        Code::INVALID_ARGUMENT
    );
    // Fails inside the helper, after the cgroup was made (a memory limit is set first).
    let mut s = spec(&["true"]);
    s["linux"]["resources"] = json!({ "memory": { "limit": 64 << 20 } });
    s["mounts"] = json!([{ "destination": "/data", "type": "bind", "source": "/run/husk/shared/none", "options": ["rbind"] }]);
    let (code, msg) = status_of(g.agent.create("bad", &s, false));
    assert_eq!(code, Code::INTERNAL);
    assert!(
        msg.starts_with("bad: ") && msg.contains("/run/husk/shared/none"),
        "{msg}"
    );
    // Look from inside the guest: no cgroup "bad", no mount of bad's rootfs in the agent's view.
    g.rootfs("look");
    // And no zombie anywhere in the guest: PID 1 reaps.
    let mut s = sh("ls /cg/husk | grep -v '[.]'; grep -c /bad/ /hostproc/1/mountinfo; cat /hostproc/[0-9]*/stat | grep -c ') Z '");
    s["mounts"].as_array_mut().unwrap().extend([
        json!({ "destination": "/cg", "type": "bind", "source": "/sys/fs/cgroup", "options": ["rbind", "ro"] }),
        json!({ "destination": "/hostproc", "type": "bind", "source": "/proc", "options": ["rbind", "ro"] }),
    ]);
    let out = g.agent.run("look", &s);
    assert_eq!(out.stdout_str(), "look\n0\n0\n", "{out:?}");
    // And the id is free again; seccomp and capabilities work in the guest kernel too.
    let mut s = sh("echo fine; mkdir /denied || true; grep CapEff /proc/self/status");
    s["process"]["noNewPrivileges"] = json!(true);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [ { "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO" } ]
    });
    let out = g.agent.run("bad", &s);
    assert_eq!(
        out.stdout_str(),
        "fine\nCapEff:\t00000000000004e1\n",
        "{out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );
}

#[test]
fn cpu_cpuset_limits_and_update_container() {
    let g = Guest::boot(256);
    g.rootfs("lim");
    g.rootfs("look");
    let mut s = spec(&["sleep", "1000"]);
    s["linux"]["resources"] = json!({
        "cpu": { "shares": 512, "quota": 25000, "period": 100000, "cpus": "0", "mems": "0" },
        "memory": { "limit": 64 << 20 }
    });
    g.agent.create("lim", &s, false).unwrap();
    g.agent.start("lim");
    let look = |g: &Guest| {
        let mut s = sh("cd /cg/husk/lim && cat cpu.max cpu.weight cpuset.cpus memory.max");
        s["mounts"].as_array_mut().unwrap().push(json!({ "destination": "/cg", "type": "bind", "source": "/sys/fs/cgroup", "options": ["rbind", "ro"] }));
        g.agent.run("look", &s).stdout_str()
    };
    assert_eq!(look(&g), "25000 100000\n20\n0\n67108864\n");
    let r = json!({ "memory": { "limit": 96 << 20 }, "pids": { "limit": 50 } });
    g.agent
        .client
        .update_container(
            ctx(),
            &UpdateContainerRequest {
                container_id: "lim".into(),
                oci_resources_json: serde_json::to_vec(&r).unwrap(),
                ..Default::default()
            },
        )
        .unwrap();
    let st = g
        .agent
        .client
        .stats_container(
            ctx(),
            &ContainerRef {
                container_id: "lim".into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((st.memory_max_bytes, st.pids_max), (96 << 20, 50), "{st:?}");
    let (code, msg) = status_of(g.agent.client.update_container(
        ctx(),
        &UpdateContainerRequest {
            container_id: "lim".into(),
            oci_resources_json: b"{\"memory\": 5}".to_vec(),
            ..Default::default()
        },
    ));
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.starts_with("lim: linux.resources.memory"), "{msg}");
    g.agent.remove("lim", true).unwrap();
}

/// `linux.rootfsPropagation: rshared` in the guest, where the rootfs is a directory of the
/// virtio-fs share: pivot_root refused it (EINVAL: the share's mount, the new root's parent,
/// was shared) until the agent made that mount private first, as runc does. rslave and
/// rprivate start too; the root is shared only with rshared, and a mount the container
/// makes under its root is its own.
#[test]
fn rootfs_propagation_as_runc_in_the_guest() {
    let g = Guest::boot(256);
    for prop in ["rshared", "rslave", "rprivate"] {
        g.rootfs(prop);
        let mut s = sh("mkdir -p /tmp/m && mount -t tmpfs t /tmp/m && grep -E '^[0-9]+ [0-9]+ [^ ]+ [^ ]+ / ' /proc/self/mountinfo");
        s["linux"]["rootfsPropagation"] = serde_json::json!(prop);
        for set in ["bounding", "effective", "permitted"] {
            s["process"]["capabilities"][set] = serde_json::json!(["CAP_SYS_ADMIN"]);
        }
        let out = g.agent.run(prop, &s);
        assert_eq!(out.status, 0, "{prop}: {out:?}");
        let root = out.stdout_str();
        assert_eq!(
            root.contains(" shared:"),
            prop == "rshared",
            "{prop}: the root's line: {root}"
        );
    }
}

/// At debug level the agent logs where each CreateContainer spent its time, its own steps and
/// its helper's, in order and in ms since the request (`agent/src/container/steps.rs`).
#[test]
fn debug_level_logs_a_creates_steps() {
    let g = Guest::boot_with(256, husk_protocols::DEBUG_LOG_FLAG);
    g.rootfs("traced");
    let out = g.agent.run("traced", &spec(&["true"]));
    assert_eq!(out.status, 0);
    let console = g.console();
    let line = console
        .lines()
        .find(|l| l.contains("CreateContainer traced steps (ms): "))
        .unwrap_or_else(|| panic!("no steps line in the console:\n{console}"));
    let steps: Vec<(&str, f64)> = line
        .split_once("steps (ms): ")
        .unwrap()
        .1
        .split(", ")
        .map(|s| {
            let (name, ms) = s.trim().rsplit_once(' ').unwrap();
            (name, ms.parse::<f64>().unwrap())
        })
        .collect();
    let names: Vec<&str> = steps.iter().map(|(n, _)| *n).collect();
    for want in [
        "checked",
        "spawned",
        "helper config read",
        "helper mounts: pivot root",
        "ready",
    ] {
        assert!(names.contains(&want), "{want} missing in {line}");
    }
    assert_eq!(names.last(), Some(&"ready"), "{line}");
    assert!(
        steps.windows(2).all(|w| w[0].1 <= w[1].1),
        "not in time order: {line}"
    );
}

/// A pooled VM's provisional CreateSandbox rehearses a container's creation
/// (`agent/src/container/rehearsal.rs`): the rehearsal's create runs to its end (its steps
/// line at debug level), and nothing of it is left for the pod — no warning, no cgroup, its id
/// free — while the pod that takes the sandbox over runs its containers as ever.
#[test]
fn a_provisional_sandbox_rehearses_a_container_and_leaves_nothing_of_it() {
    let g = Guest::boot_with(256, husk_protocols::DEBUG_LOG_FLAG);
    let sandbox = |id: &str, provisional: bool| {
        g.agent
            .client
            .create_sandbox(
                ctx(),
                &CreateSandboxRequest {
                    sandbox_id: id.into(),
                    hostname: "pod-host".into(),
                    provisional,
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("CreateSandbox {id}: {e:?}"))
    };
    sandbox("vm-1", true);
    let console = g.console();
    let line = console
        .lines()
        .find(|l| l.contains("CreateContainer husk-rehearsal steps (ms): "))
        .unwrap_or_else(|| panic!("no rehearsal in the console:\n{console}"));
    let last = line.rsplit(", ").next().unwrap_or_default();
    assert!(
        last.starts_with("ready "),
        "the rehearsal's create did not end ready: {line}"
    );
    assert!(
        !console.contains("rehearsal: "),
        "the rehearsal warned:\n{console}"
    );
    sandbox("pod", false);
    // The guest's cgroup tree as a container that keeps the guest's cgroup namespace sees it:
    // its own cgroup and nothing else under husk/.
    g.rootfs("probe");
    let mut s =
        sh("cd /sys/fs/cgroup/husk && for d in *; do test -d $d && echo $d; done; hostname");
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "type": "cgroup", "path": "/proc/4242/ns/cgroup" }));
    s["mounts"].as_array_mut().unwrap().push(json!({ "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "ro"] }));
    let out = g.agent.run("probe", &s);
    assert_eq!(
        (out.status, out.stdout_str().as_str()),
        (0, "probe\npod-host\n"),
        "{out:?}"
    );
    // The rehearsal's id is free again.
    g.rootfs("husk-rehearsal");
    let out = g.agent.run("husk-rehearsal", &sh("echo mine"));
    assert_eq!(
        (out.status, out.stdout_str().as_str()),
        (0, "mine\n"),
        "{out:?}"
    );
}
