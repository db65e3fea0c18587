//! Tier 3: a container gets no more than runc would give it (#13), husk and runc side by side
//! under one private containerd:
//! - an exec into a `ctr run --seccomp` container runs under the container's filter (Seccomp
//!   2 on both) and a call the default profile denies fails alike; the exec's capabilities,
//!   user and groups, cwd, env and rlimits are the same as under runc;
//! - an image whose `/etc` is a symlink to `/` and whose volume destination is a dangling
//!   symlink to `/run/husk`: the mounts land inside the container's root on both (the
//!   symlinks are followed *inside* it), with the same view from the container;
//! - an exec that leaves a background process writing to its stdout ends on both.

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_rootfs_builder::image::{build, ImageSpec};
use husk_rootfs_builder::tree::{Content, Tree};
use husk_tests::husk::{HuskContainerd, BUSYBOX};
use husk_tests::{require_program, require_root};

const RUNTIMES: [&str; 2] = ["io.containerd.runc.v2", "io.containerd.husk.v2"];

fn unique(name: &str, runtime: &str) -> String {
    format!(
        "{name}-{}-{}",
        runtime.split('.').nth(2).unwrap(),
        std::process::id()
    )
}

/// What an exec sees of itself. (`ulimit -n` is the spec's RLIMIT_NOFILE; limits the spec
/// leaves out come from the kernel's defaults, which follow the machine's memory — the
/// node's under runc, the guest's under husk — and are not compared.)
const PROBE: &str = "grep -E '^(Seccomp|NoNewPrivs|Cap(Inh|Prm|Eff|Bnd|Amb)):' /proc/self/status; \
                     id; pwd; echo FOO=$FOO; ulimit -n; \
                     unshare -r true 2>&1 | sed 's/unshare: //'; echo unshare=$?";

#[test]
fn an_exec_gets_what_runc_gives_it() {
    require_root("containerd");
    let h = HuskContainerd::start();
    let mut seen = Vec::new();
    for runtime in RUNTIMES {
        let id = unique("execpar", runtime);
        h.ctd.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            runtime,
            "--seccomp",
            "--env",
            "FOO=bar",
            BUSYBOX,
            &id,
            "sleep",
            "1000",
        ]);
        let plain = h
            .ctd
            .ctr_ok(&["task", "exec", "--exec-id", "p", &id, "sh", "-c", PROBE]);
        let user = h.ctd.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            "u",
            "--user",
            "65534:65534",
            "--cwd",
            "/tmp",
            &id,
            "sh",
            "-c",
            PROBE,
        ]);
        assert!(
            plain.contains("Seccomp:\t2"),
            "{runtime}: the exec runs unconfined:\n{plain}"
        );
        assert!(user.contains("Seccomp:\t2"), "{runtime}:\n{user}");
        seen.push((runtime, plain, user));
        h.remove(&id);
    }
    let (_, runc_plain, runc_user) = &seen[0];
    let (_, husk_plain, husk_user) = &seen[1];
    assert_eq!(husk_plain, runc_plain, "exec as root differs from runc's");
    assert_eq!(
        husk_user, runc_user,
        "exec as another user differs from runc's"
    );
    assert!(
        runc_user.contains("uid=65534")
            && runc_user.contains("/tmp")
            && runc_user.contains("FOO=bar")
    );
}

/// An image whose `/etc` is a symlink to `/` and whose `/data` points at `/run/husk`.
fn symlink_image(h: &HuskContainerd, dir: &Path) -> String {
    let busybox = require_program("busybox", "busybox-static");
    let mut t = Tree::new();
    t.file("bin/busybox", Content::HostFile(busybox), 0o755)
        .unwrap();
    for applet in ["sh", "cat", "ls", "echo", "test", "readlink"] {
        t.symlink(&format!("bin/{applet}"), "busybox").unwrap();
    }
    for d in ["dev", "proc", "sys", "tmp", "run"] {
        t.dir(d, 0o755).unwrap();
    }
    t.symlink("etc", "/").unwrap();
    t.symlink("data", "/run/husk").unwrap();
    let name = format!("husk.local/symlinks-{}:latest", std::process::id());
    let tar = dir.join("symlinks.tar");
    build(&t, &ImageSpec::new(&name, &["sh"]), &tar).unwrap();
    h.ctd.ctr_ok(&["image", "import", tar.to_str().unwrap()]);
    name
}

#[test]
fn symlinks_in_an_image_never_redirect_a_mount_out_of_its_root() {
    require_root("containerd");
    let h = HuskContainerd::start();
    let host = tempfile::tempdir().unwrap();
    let image = symlink_image(&h, host.path());
    let vol = host.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::fs::write(vol.join("marker"), "volume\n").unwrap();
    let file = host.path().join("hosts");
    std::fs::write(&file, "127.0.0.1 bound\n").unwrap();
    let dir_mount = format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display());
    let file_mount = format!(
        "type=bind,src={},dst=/etc/hosts,options=rbind:ro",
        file.display()
    );
    // What the container sees: the bind landed at /hosts (through /etc -> /) and /run/husk
    // (through /data -> /run/husk), inside its own root.
    let script = "cat /hosts; cat /run/husk/marker; ls /run/husk; readlink /etc; echo done";
    let mut seen = Vec::new();
    for runtime in RUNTIMES {
        let id = unique("symlinks", runtime);
        let out = h.ctd.run_rm(
            Some(runtime),
            &["--mount", &dir_mount, "--mount", &file_mount],
            &image,
            &id,
            &["sh", "-c", script],
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        seen.push((runtime, out.status.success(), text));
    }
    assert_eq!(
        seen[1].1, seen[0].1,
        "runc {:?} vs husk {:?}",
        seen[0], seen[1]
    );
    assert_eq!(seen[1].2, seen[0].2, "husk's view differs from runc's");
    assert!(
        seen[0].2.contains("127.0.0.1 bound") && seen[0].2.contains("volume"),
        "{:?}",
        seen[0]
    );
    // Nothing outside the container's root changed on the host (runc) or in the guest: the
    // host's /run/husk is untouched by the runc side and the guest's by the husk side (the
    // container saw the volume, not the guest's share, at /run/husk).
    assert!(
        !seen[1].2.contains("shared"),
        "the container saw the guest's /run/husk: {}",
        seen[1].2
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "127.0.0.1 bound\n");
}

/// Runs `ctr ARGS` to its end, failing the test if it takes longer than `bound`: its exit
/// code and stdout.
fn ctr_within(h: &HuskContainerd, args: &[&str], bound: Duration) -> (Option<i32>, String) {
    let mut child = h
        .ctd
        .ctr_command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running ctr");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ctr {args:?} did not end within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), reader.join().unwrap())
}

/// An exec that leaves a background process writing to its stdout (`cmd &`, then exit):
/// under runc the exec's exit is reported and `ctr task exec` returns while the background
/// process goes on; husk must not wait for a stream that never ends (it used to, for ever:
/// the agent ends a stream only once it goes quiet after the exit).
#[test]
fn an_exec_that_leaves_a_writer_behind_still_ends() {
    require_root("containerd");
    let h = HuskContainerd::start();
    for runtime in RUNTIMES {
        let id = unique("bgwriter", runtime);
        h.ctd.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            runtime,
            BUSYBOX,
            &id,
            "sleep",
            "1000",
        ]);
        let t = Instant::now();
        let (code, out) = ctr_within(
            &h,
            &[
                "task",
                "exec",
                "--exec-id",
                "bg",
                &id,
                "sh",
                "-c",
                "(while :; do echo more; usleep 50000; done) & echo started; exit 3",
            ],
            Duration::from_secs(60),
        );
        eprintln!("{runtime}: the exec ended after {:?}", t.elapsed());
        assert_eq!(code, Some(3), "{runtime}: exit status; output:\n{out}");
        // The background loop may print before `echo started` runs.
        assert!(
            out.lines().any(|l| l == "started"),
            "{runtime}: output:\n{out}"
        );
        // The container still works: the background writer did not wedge it.
        let again = h
            .ctd
            .ctr_ok(&["task", "exec", "--exec-id", "again", &id, "echo", "ok"]);
        assert_eq!(again, "ok\n", "{runtime}");
        h.remove(&id);
    }
}
