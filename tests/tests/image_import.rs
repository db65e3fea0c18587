//! The OCI images rootfs-builder writes are accepted by `ctr image import` in a private
//! containerd, carry the names we gave them, and run (under runc, the baseline runtime).

use husk_rootfs_builder::image::{self, ImageSpec};
use husk_tests::containerd::PrivateContainerd;
use husk_tests::{require_program, require_root};

#[test]
fn ctr_imports_busybox_and_pause_images_and_runc_runs_them() {
    require_root("containerd and runc");
    let busybox = require_program("busybox", "busybox-static");
    require_program("runc", "runc");
    let dir = tempfile::tempdir().unwrap();
    let bb_tar = dir.path().join("busybox.tar");
    let pause_tar = dir.path().join("pause.tar");
    image::build(
        &image::busybox_tree(&busybox).unwrap(),
        &ImageSpec::new("husk.local/test-busybox:latest", &["sh"]),
        &bb_tar,
    )
    .unwrap();
    image::build(
        &image::pause_tree(&busybox).unwrap(),
        &ImageSpec::new("husk.local/test-pause:latest", &["/bin/sleep", "infinity"]),
        &pause_tar,
    )
    .unwrap();

    let ctd = PrivateContainerd::start();
    ctd.ctr_ok(&["images", "import", bb_tar.to_str().unwrap()]);
    ctd.ctr_ok(&["images", "import", pause_tar.to_str().unwrap()]);
    let names = ctd.ctr_ok(&["images", "ls", "-q"]);
    assert!(
        names.lines().any(|l| l == "husk.local/test-busybox:latest"),
        "{names}"
    );
    assert!(
        names.lines().any(|l| l == "husk.local/test-pause:latest"),
        "{names}"
    );

    let id = format!("bb-{}", std::process::id());
    let out = ctd.run_rm_ok(
        None,
        &[],
        "husk.local/test-busybox:latest",
        &id,
        &["sh", "-c", "echo hello; id -u; cat /etc/passwd | head -1"],
    );
    assert_eq!(out, "hello\n0\nroot:x:0:0:root:/root:/bin/sh\n");

    // The pause image's default command keeps running until killed.
    let pid_name = format!("pause-{}", std::process::id());
    ctd.ctr_ok(&["run", "-d", "husk.local/test-pause:latest", &pid_name]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let tasks = ctd.ctr_ok(&["tasks", "ls"]);
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with(&pid_name) && l.contains("RUNNING")),
        "{tasks}"
    );
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &pid_name]);
    for _ in 0..100 {
        if ctd.ctr(&["tasks", "delete", &pid_name]).status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ctd.ctr_ok(&["containers", "delete", &pid_name]);
}
