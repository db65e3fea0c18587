//! Tier 3: the VM boundary, tried from both sides through a private containerd (docs/SECURITY.md).
//!
//! - Root in the guest (the debug console's shell) plants symlinks, fifos, device nodes and
//!   hard links where the host is about to mount the pod's next container, and renames a
//!   container's directory away; none of it lands (the guest's view of the share is read-only
//!   outside the mounts), and the next container, with a file and a directory bind mount,
//!   works and leaves nothing on the host outside the sandbox's directory.
//! - The VM-side processes of a running pod are jailed: the VMM (QEMU here) and the vsock
//!   helper run as the sandbox's own uid, with no capabilities, `no_new_privs`, their own
//!   mount/network/IPC/UTS namespaces and a root without the host's files; QEMU is under its
//!   seccomp filter; virtiofsd is in its own namespaces. The task's PID is the VMM's host PID.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use husk_tests::husk::{
    assert_sandbox_gone, debug_console, jail_id_of, mounts_under, processes_mentioning, vm_dir,
    HuskContainerd, BUSYBOX,
};
use husk_tests::{require_program, require_root};

const RUNTIME: &str = "io.containerd.husk.v2";

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn exe_name(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

#[test]
fn root_in_the_guest_cannot_plant_what_the_host_mounts_on() {
    require_root("containerd, mounts");
    require_program("busybox", "busybox-static");
    let h = HuskContainerd::start_with_config("debug_console = true\n");
    let sb = unique("plant");
    let c2 = format!("{sb}-c2");
    h.run_idle(&sb, &[]);

    // Host files the guest aims at.
    let host = tempfile::tempdir().unwrap();
    let canary = host.path().join("canary");
    std::fs::write(&canary, "host secret\n").unwrap();
    let vol = host.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::fs::write(vol.join("data"), "volume data\n").unwrap();
    let file = host.path().join("file");
    std::fs::write(&file, "bound file\n").unwrap();
    let canary_before = std::fs::metadata(&canary).unwrap();

    let s = "/run/husk/shared";
    let script = format!(
        "cd {s}; \
         ln -s {canary} {c2} 2>&1 || echo REFUSED-symlink; \
         mkdir {c2} 2>&1 || echo REFUSED-mkdir; \
         mknod {c2}-fifo p 2>&1 || echo REFUSED-fifo; \
         mknod {c2}-dev c 1 3 2>&1 || echo REFUSED-dev; \
         ln .husk-debug/sh hardlink 2>&1 || echo REFUSED-hardlink; \
         mv {sb} moved 2>&1 || echo REFUSED-rename; \
         echo x > {sb}/mounts-planted 2>&1 || echo REFUSED-write; \
         echo inside > {sb}/rootfs/tmp/planted && echo ROOTFS-WRITABLE; \
         head -c 3000000 /dev/zero | tr '\\0' x > /dev/console; echo filled; \
         exit\n",
        canary = canary.display(),
    );
    let out = debug_console(&sb, script.as_bytes(), Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout);
    for refused in [
        "REFUSED-symlink",
        "REFUSED-mkdir",
        "REFUSED-fifo",
        "REFUSED-dev",
        "REFUSED-hardlink",
        "REFUSED-rename",
        "REFUSED-write",
    ] {
        assert!(
            text.contains(refused),
            "the guest was not refused ({refused}):\n{text}"
        );
    }
    assert!(text.contains("Read-only file system"), "{text}");
    assert!(
        text.contains("ROOTFS-WRITABLE"),
        "the container's rootfs must stay writable:\n{text}"
    );
    assert!(text.contains("filled"), "{text}");
    let shared = Path::new("/run/husk").join(&sb).join("shared");
    for planted in [c2.as_str(), "hardlink", "moved"] {
        assert!(
            std::fs::symlink_metadata(shared.join(planted)).is_err(),
            "{planted} landed in the share"
        );
    }
    assert_eq!(
        std::fs::read_to_string(
            Path::new("/run/husk")
                .join(&sb)
                .join("mounts")
                .join(&sb)
                .join("rootfs/tmp/planted")
        )
        .unwrap(),
        "inside\n"
    );

    // The pod's next container, with a directory and a file bind mount.
    let ann = format!("io.husk.sandbox-id={sb}");
    let dir_mount = format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display());
    let file_mount = format!(
        "type=bind,src={},dst=/etc/bound,options=rbind:ro",
        file.display()
    );
    let out = h.ctd.run_rm(
        Some(RUNTIME),
        &[
            "--annotation",
            &ann,
            "--mount",
            &dir_mount,
            "--mount",
            &file_mount,
        ],
        BUSYBOX,
        &c2,
        &[
            "sh",
            "-c",
            "cat /data/data /etc/bound; echo new > /data/new; echo x > /etc/bound || echo RO",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.ctd.log()
    );
    assert!(
        stdout.contains("volume data") && stdout.contains("bound file"),
        "{stdout}"
    );
    assert!(
        stdout.contains("RO"),
        "a read-only file bind was writable: {stdout}"
    );
    assert_eq!(std::fs::read_to_string(vol.join("new")).unwrap(), "new\n");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "bound file\n");

    // Nothing outside the sandbox's directory changed.
    let after = std::fs::metadata(&canary).unwrap();
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "host secret\n");
    assert_eq!(
        (after.ino(), after.size(), after.mode()),
        (
            canary_before.ino(),
            canary_before.size(),
            canary_before.mode()
        )
    );
    assert!(
        mounts_under(host.path()).is_empty(),
        "{:?}",
        mounts_under(host.path())
    );
    // The console log stays bounded however much the guest writes to it.
    let log = std::fs::metadata(vm_dir(&sb).join("console.log"))
        .unwrap()
        .len();
    assert!(log < 3_000_000, "the console log grew to {log} bytes");

    h.remove(&sb);
    assert_sandbox_gone(&sb);
}

#[test]
fn the_vm_side_processes_are_jailed_and_the_task_pid_is_the_vmms() {
    require_root("containerd");
    let h = HuskContainerd::start();
    let id = unique("jailed");
    h.run_idle(&id, &[]);

    // `ctr task ls`: the PID is a live host process of this sandbox's VM.
    let ls = h.ctd.ctr_ok(&["task", "ls"]);
    let pid: u32 = ls
        .lines()
        .find(|l| l.starts_with(&id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid for {id} in:\n{ls}"));
    assert!(
        exe_name(pid).starts_with("qemu-system"),
        "task pid {pid} is {:?}, not the VMM",
        exe_name(pid)
    );
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .into_owned();
    assert!(cmdline.contains(&format!("/run/husk/{id}/")), "{cmdline}");
    assert!(cmdline.contains("elevateprivileges=deny"), "{cmdline}");

    let jail = jail_id_of(&id).expect("the sandbox holds a jail id");
    let me = std::process::id().to_string();
    let vm_procs = processes_mentioning(&format!("/run/husk/{id}/"));
    let vsock = vm_procs
        .iter()
        .copied()
        .find(|p| exe_name(*p) == "vhost-device-vsock")
        .expect("vhost-device-vsock runs");
    // virtiofsd's sandbox forks: the parent waits in the host's namespaces, the child serves.
    let virtiofsd: Vec<u32> = vm_procs
        .iter()
        .copied()
        .filter(|p| exe_name(*p) == "virtiofsd")
        .collect();
    for (name, p) in [("qemu", pid), ("vhost-device-vsock", vsock)] {
        let uid = status_field(p, "Uid");
        assert!(
            uid.split_whitespace().all(|u| u == jail.to_string()),
            "{name}: uid {uid}, want {jail}"
        );
        assert_eq!(status_field(p, "CapEff"), "0000000000000000", "{name}");
        assert_eq!(status_field(p, "CapPrm"), "0000000000000000", "{name}");
        assert_eq!(status_field(p, "NoNewPrivs"), "1", "{name}");
        for kind in ["mnt", "net", "ipc", "uts", "pid"] {
            assert_ne!(
                ns(&p.to_string(), kind),
                ns(&me, kind),
                "{name}: {kind} namespace is the host's"
            );
        }
        let root = Path::new("/proc").join(p.to_string()).join("root");
        assert!(root.join("usr/bin").is_dir(), "{name}: no /usr in its root");
        // The kernel and initramfs are there (read-only), but nothing beside them.
        let beside_kernel = husk_tests::workspace().join("Cargo.toml");
        let beside_kernel = beside_kernel.strip_prefix("/").unwrap().to_str().unwrap();
        for host_only in [
            "home",
            "root/.bashrc",
            "var",
            "etc/shadow",
            "etc/passwd",
            beside_kernel,
        ] {
            assert!(
                std::fs::symlink_metadata(root.join(host_only)).is_err(),
                "{name} sees the host's /{host_only}"
            );
        }
        assert!(
            std::fs::symlink_metadata(root.join(format!("run/husk/{id}/mounts"))).is_err(),
            "{name} sees the containers' file systems"
        );
    }
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "QEMU runs without its seccomp filter"
    );
    // None of the shim's environment reaches them (containerd gives every shim
    // TTRPC_ADDRESS and LD_LIBRARY_PATH=/opt/containerd/lib:, whose empty entry is the
    // working directory), and none runs from the task's bundle.
    for p in vm_procs.iter().copied() {
        let name = exe_name(p);
        if !["qemu-system-x86_64", "vhost-device-vsock", "virtiofsd"].contains(&name.as_str()) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{p}/environ")).unwrap();
        let vars: Vec<String> = environ
            .split(|b| *b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        assert!(
            vars.iter().any(|v| v.starts_with("PATH=")),
            "{name} ({p}): no PATH in {vars:?}"
        );
        for v in &vars {
            let key = v.split('=').next().unwrap_or_default();
            assert!(
                ["PATH", "MALLOC_ARENA_MAX", "G_SLICE"].contains(&key),
                "{name} ({p}) inherited {v:?}; its environment: {vars:?}"
            );
        }
        if name == "virtiofsd" {
            // Not jailed by us: its working directory is the host's `/` (or, in its
            // sandbox, the share's root), never the shim's.
            let cwd = std::fs::read_link(format!("/proc/{p}/cwd")).unwrap();
            assert!(
                cwd == Path::new("/") || cwd.ends_with("shared"),
                "virtiofsd ({p}) runs in {}",
                cwd.display()
            );
        }
    }
    assert!(
        virtiofsd.iter().any(|p| ["mnt", "net", "pid"]
            .iter()
            .all(|kind| ns(&p.to_string(), kind) != ns(&me, kind))),
        "no virtiofsd process in mount, network and PID namespaces of its own: {virtiofsd:?}"
    );
    // Two sandboxes never share a uid.
    let other = unique("jailed2");
    h.run_idle(&other, &[]);
    assert_ne!(jail_id_of(&other), Some(jail));
    h.remove(&other);
    h.remove(&id);
    assert_sandbox_gone(&id);
    assert_sandbox_gone(&other);
}

#[test]
fn a_pod_annotation_cannot_steer_the_vm() {
    require_root("containerd");
    let h = HuskContainerd::start_with_config("max_memory_mib = 1024\n");
    let id = unique("annot");
    for (ann, want) in [
        ("io.husk.extra-memory-mib=4096", "max_memory_mib = 1024"),
        ("io.husk.kernel-params=init=/bin/sh", "not enabled"),
    ] {
        let out = h.ctd.run_rm(
            Some(RUNTIME),
            &["--annotation", ann],
            BUSYBOX,
            &id,
            &["true"],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{ann} was accepted");
        assert!(
            err.contains(want) && err.contains(ann.split('=').next().unwrap()),
            "{ann}: {err}"
        );
        let _ = h.ctd.ctr(&["containers", "delete", &id]);
        assert_sandbox_gone(&id);
    }
}
