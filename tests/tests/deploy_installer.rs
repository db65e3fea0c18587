//! The node installer (`deploy/installer/husk-install.sh`, shipped in the husk-deploy image):
//! it puts husk on a node root, adds the `husk` runtime to containerd's config exactly once
//! (containerd itself loads the result), and `uninstall` takes exactly that back; containerd
//! is restarted through the node's PID 1 (nsenter + systemctl) only when its config changed.
//! Also run from its image under containerd, as the DaemonSet would.

use std::path::{Path, PathBuf};
use std::process::Command;

use husk_tests::containerd::PrivateContainerd;
use husk_tests::husk::image;
use husk_tests::{require_program, require_root, workspace};

fn script() -> PathBuf {
    workspace().join("deploy/installer/husk-install.sh")
}

/// A payload laid out like the image's /opt/husk-payload, from this checkout's build.
fn payload(dir: &Path) -> PathBuf {
    let p = dir.join("payload");
    std::fs::create_dir_all(p.join("bin")).unwrap();
    std::fs::create_dir_all(p.join("share")).unwrap();
    let shim = husk_tests::husk::shim_binary();
    std::fs::copy(&shim, p.join("bin/containerd-shim-husk-v2")).unwrap();
    std::fs::copy(husk_tests::kernel(), p.join("share/vmlinux")).unwrap();
    std::fs::copy(husk_tests::initramfs(), p.join("share/initramfs.cpio")).unwrap();
    std::fs::copy(
        workspace().join("deploy/config.toml"),
        p.join("config.toml"),
    )
    .unwrap();
    std::fs::copy(
        workspace().join("deploy/containerd-husk.toml"),
        p.join("containerd-husk.toml"),
    )
    .unwrap();
    p
}

fn run(host: &Path, payload: &Path, action: &str) -> String {
    let out = Command::new("sh")
        .arg(script())
        .arg(action)
        .env("HUSK_HOST_ROOT", host)
        .env("HUSK_PAYLOAD", payload)
        .env("HUSK_RESTART", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{action}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// containerd's own reading of the config (`containerd config dump`).
fn containerd_reads(config: &Path) -> String {
    let out = Command::new("containerd")
        .arg("--config")
        .arg(config)
        .args(["config", "dump"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "containerd rejects {}: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn installer_is_idempotent_and_uninstall_takes_back_exactly_its_part() {
    require_program("containerd", "containerd");
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let etc = host.join("etc/containerd");
    std::fs::create_dir_all(&etc).unwrap();
    let original = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.local/pause:3.9\"\n";
    std::fs::write(etc.join("config.toml"), original).unwrap();
    let payload = payload(dir.path());

    let first = run(&host, &payload, "install");
    assert!(first.contains("added the husk runtime handler"), "{first}");
    let second = run(&host, &payload, "install");
    assert!(second.contains("nothing to change"), "{second}");
    let config = std::fs::read_to_string(etc.join("config.toml")).unwrap();
    assert_eq!(
        config.matches("husk runtime (husk-deploy) >>>").count(),
        1,
        "{config}"
    );
    assert!(
        config.starts_with(original),
        "the admin's config is kept as it was"
    );
    let dumped = containerd_reads(&etc.join("config.toml"));
    assert!(
        dumped.contains("runtimes.husk") && dumped.contains("io.containerd.husk.v2"),
        "{dumped}"
    );
    assert!(dumped.contains("registry.local/pause:3.9"));
    assert_eq!(
        std::fs::read_link(host.join("usr/local/bin/containerd-shim-kata-v2")).unwrap(),
        Path::new("/opt/husk/bin/containerd-shim-husk-v2")
    );
    assert!(host.join("opt/husk/share/vmlinux").is_file());
    let husk_config = std::fs::read_to_string(host.join("etc/husk/config.toml")).unwrap();
    assert!(
        husk_config.contains("kernel = \"/opt/husk/share/vmlinux\""),
        "{husk_config}"
    );

    run(&host, &payload, "uninstall");
    assert_eq!(
        std::fs::read_to_string(etc.join("config.toml"))
            .unwrap()
            .trim_end(),
        original.trim_end()
    );
    assert!(!host.join("opt/husk").exists());
    assert!(std::fs::symlink_metadata(host.join("usr/local/bin/containerd-shim-husk-v2")).is_err());
}

#[test]
fn the_installer_image_runs_under_containerd() {
    require_root("containerd");
    let ctd = PrivateContainerd::start();
    ctd.ctr_ok(&[
        "images",
        "import",
        image("husk-deploy.tar").to_str().unwrap(),
    ]);
    let host = tempfile::tempdir().unwrap();
    let mount = format!(
        "type=bind,src={},dst=/host,options=rbind:rw",
        host.path().display()
    );
    let id = format!("husk-deploy-{}", std::process::id());
    let out = ctd.run_rm_ok(
        None,
        &[
            "--mount",
            &mount,
            "--env",
            "HUSK_RESTART=0",
            "--env",
            "HUSK_WAIT=0",
        ],
        "husk.local/husk-deploy:latest",
        &id,
        &[],
    );
    assert!(out.contains("added the husk runtime handler"), "{out}");
    for f in [
        "opt/husk/bin/containerd-shim-husk-v2",
        "opt/husk/bin/husk-vmm",
        "opt/husk/bin/virtiofsd",
        "opt/husk/share/initramfs.cpio",
    ] {
        assert!(host.path().join(f).is_file(), "{f} not installed");
    }
    containerd_reads(&host.path().join("etc/containerd/config.toml"));
}

/// Runs the installer the way the DaemonSet pod does (hostPID): in a mount namespace of its
/// own, while the node's service manager lives in PID 1's. Here PID 1 is a shell in a new PID
/// and mount namespace whose `systemctl` (bind-mounted over /usr/local/sbin in *its* mount
/// namespace only) records what it was asked and exits with `systemctl_exit`; so the restart
/// can only be seen if the installer really entered PID 1's namespaces to run it.
fn run_as_daemonset(
    host: &Path,
    payload: &Path,
    action: &str,
    systemctl_exit: i32,
    log: &Path,
) -> std::process::Output {
    let stub = log.parent().unwrap().join("stub-sbin");
    std::fs::create_dir_all(&stub).unwrap();
    let systemctl = stub.join("systemctl");
    std::fs::write(
        &systemctl,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\nexit {systemctl_exit}\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &systemctl,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let init = format!(
        "mount --bind {stub} /usr/local/sbin && unshare --mount sh -c 'umount /usr/local/sbin && exec sh {script} {action}'",
        stub = stub.display(),
        script = script().display(),
    );
    Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--mount-proc",
            "sh",
            "-c",
            &init,
        ])
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HUSK_HOST_ROOT", host)
        .env("HUSK_PAYLOAD", payload)
        .env_remove("HUSK_RESTART")
        .output()
        .unwrap()
}

#[test]
fn the_installer_restarts_containerd_through_the_nodes_pid_1_only_when_its_config_changed() {
    require_root("mount and PID namespaces");
    require_program("unshare", "util-linux");
    require_program("nsenter", "util-linux");
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    std::fs::create_dir_all(host.join("etc/containerd")).unwrap();
    std::fs::write(host.join("etc/containerd/config.toml"), "version = 2\n").unwrap();
    let payload = payload(dir.path());
    let log = dir.path().join("systemctl.log");
    let calls = || std::fs::read_to_string(&log).unwrap_or_default();
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    let first = run_as_daemonset(&host, &payload, "install", 0, &log);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("containerd restarted"),
        "{}",
        text(&first)
    );
    assert_eq!(calls(), "restart containerd\n");
    // Nothing changed: no restart.
    let second = run_as_daemonset(&host, &payload, "install", 0, &log);
    assert!(second.status.success(), "{}", text(&second));
    assert_eq!(calls(), "restart containerd\n");
    // The config changes back: restarted again, and a failing restart is an error that says
    // what to do.
    let failed = run_as_daemonset(&host, &payload, "uninstall", 1, &log);
    assert!(!failed.status.success());
    assert!(
        text(&failed).contains("restarting containerd failed; restart it by hand"),
        "{}",
        text(&failed)
    );
    assert_eq!(calls(), "restart containerd\nrestart containerd\n");
    // The stub was only ever mounted inside the test's namespaces.
    let here = std::fs::read_to_string("/usr/local/sbin/systemctl").unwrap_or_default();
    assert!(
        !here.contains("systemctl.log"),
        "the stub leaked into this mount namespace"
    );
}
