//! Paths in a container's rootfs, in a real guest (qemu backend; TCG here): every path the
//! agent resolves there is resolved inside it, as runc does since 1.0.0-rc95 (the class of
//! CVE-2021-30465). An image whose `/etc` is a symlink to `/`, a volume whose destination is a
//! dangling symlink to `/run/husk` (where the guest keeps the shared directory) and a cwd that
//! is a dangling symlink all land inside the rootfs, and nothing outside it in the guest
//! changes. And a privileged container's device nodes (containerd copies the host's `/dev`
//! into its spec) are made with the directories above them.

use std::os::unix::fs::symlink;

use husk_protocols::ttrpc::Code;
use husk_tests::agent::{spec, status_of, Output};
use husk_tests::guest::Guest;
use serde_json::{json, Value};

fn sh(script: &str) -> Value {
    spec(&["sh", "-c", script])
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        out.stdout_str(),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What a container that sees the guest's root read-only (at /guest) lists there: the guest
/// root, its /run/husk (the shared directory's parent) and any stray files a mount made.
fn guest_view(g: &Guest) -> String {
    let mut s = sh("ls -a /guest /guest/run/husk; ls -la /guest/hosts /guest/made 2>&1");
    s["mounts"].as_array_mut().unwrap().push(json!({ "destination": "/guest", "type": "bind", "source": "/", "options": ["rbind", "ro"] }));
    let out = g.agent.run("look", &s);
    text(&out)
}

#[test]
fn symlinks_in_the_image_and_volumes_are_followed_inside_the_rootfs() {
    let g = Guest::boot(256);
    g.rootfs("look");
    let before = guest_view(&g);
    assert!(before.contains("No such file"), "{before}");

    // The image: /etc -> /, /data -> /run/husk (dangling in the image), /wd -> /made/by/cwd.
    let root = g.rootfs("evil");
    std::fs::remove_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    symlink("/", root.join("etc")).unwrap();
    symlink("/run/husk", root.join("data")).unwrap();
    symlink("/made/by/cwd", root.join("wd")).unwrap();
    // The volumes, in the shared directory (the guest's /run/husk/shared).
    std::fs::create_dir(g.shared().join("vol")).unwrap();
    std::fs::write(g.shared().join("vol/inside"), "volume\n").unwrap();
    std::fs::write(g.shared().join("hosts"), "1.2.3.4 evil\n").unwrap();

    let mut s = sh("cat /etc/hosts /hosts /data/inside; pwd; cut -d' ' -f5 /proc/self/mountinfo | grep -x '/hosts\\|/run/husk'");
    s["process"]["cwd"] = json!("/wd");
    s["mounts"].as_array_mut().unwrap().extend([
        json!({ "destination": "/etc/hosts", "type": "bind", "source": "/run/husk/shared/hosts", "options": ["rbind", "ro"] }),
        json!({ "destination": "/data", "type": "bind", "source": "/run/husk/shared/vol", "options": ["rbind", "rw"] }),
    ]);
    let out = g.agent.run("evil", &s);
    assert_eq!(
        (out.status, out.stdout_str().as_str()),
        (
            0,
            "1.2.3.4 evil\n1.2.3.4 evil\nvolume\n/made/by/cwd\n/hosts\n/run/husk\n"
        ),
        "{out:?}"
    );
    // What the mounts needed was made in the rootfs, as runc makes it.
    assert!(root.join("hosts").is_file());
    assert!(root.join("run/husk").is_dir());
    assert!(root.join("made/by/cwd").is_dir());
    assert!(std::fs::symlink_metadata(root.join("data"))
        .unwrap()
        .file_type()
        .is_symlink());
    // And the guest outside the rootfs is as it was.
    assert_eq!(guest_view(&g), before);

    // A mount destination with `..` is refused up front (the spec check), naming it.
    let mut s = sh("true");
    s["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "destination": "/../x", "type": "tmpfs", "source": "tmpfs" }));
    let (code, msg) = status_of(g.agent.create("evil", &s, false));
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("/../x") && msg.contains("`..`"), "{msg}");
}

/// A device node as containerd's `WithHostDevices` writes it for a privileged container.
fn node(path: &str, typ: &str, major: i64, minor: i64, mode: u32, gid: u32) -> Value {
    json!({ "path": path, "type": typ, "major": major, "minor": minor, "fileMode": mode, "uid": 0, "gid": gid })
}

#[test]
fn a_privileged_containers_host_devices_are_made_with_their_directories() {
    let g = Guest::boot(256);
    g.rootfs("priv");
    let mut s = sh("ls -ln /dev/cpu/0/cpuid /dev/dri/renderD128 /dev/null /dev/vda | tr -s ' ' | cut -d' ' -f1,3-6");
    s["process"]["capabilities"] = json!({ "bounding": ["CAP_SYS_ADMIN", "CAP_MKNOD"], "effective": ["CAP_SYS_ADMIN", "CAP_MKNOD"], "permitted": ["CAP_SYS_ADMIN", "CAP_MKNOD"] });
    s["linux"]["resources"] = json!({ "devices": [{ "allow": true, "access": "rwm" }] });
    s["linux"]["devices"] = json!([
        // No driver for these in the guest (most likely): made all the same, as runc makes them.
        node("/dev/cpu/0/cpuid", "c", 203, 0, 0o600, 0),
        node("/dev/dri/renderD128", "c", 226, 128, 0o660, 44),
        node("/dev/vda", "b", 254, 0, 0o660, 6),
        // Already there (a default device): kept.
        node("/dev/null", "c", 1, 3, 0o666, 0),
    ]);
    let out = g.agent.run("priv", &s);
    assert_eq!(
        (out.status, out.stdout_str().as_str()),
        (
            0,
            "crw------- 0 0 203, 0\ncrw-rw---- 0 44 226, 128\ncrw-rw-rw- 0 0 1, 3\nbrw-rw---- 0 6 254, 0\n"
        ),
        "{out:?}"
    );
}
