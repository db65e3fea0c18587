//! Tier 3: mount propagation through containerd 1.6's CRI, husk beside runc on one
//! containerd (#16). A volume whose source is a shared mount on the host, given to one
//! container twice: `None` (containerd: `rprivate`) and `HostToContainer` (`rslave`, which
//! also makes containerd set `rootfsPropagation: rslave`). After the container started, the
//! host mounts a tmpfs under the source: the `rslave` view shows it, the `rprivate` one does
//! not; a mount the container makes under its `rslave` view never reaches the host. Then
//! `Bidirectional` (`rshared`, and `rootfsPropagation: rshared`): under runc a container's
//! mount under the volume appears on the host; a VM cannot do that, so husk refuses the
//! container when its task is created (CRI's StartContainer) naming the mount and the option, and leaves nothing of it.

use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::cri::{sweep_cgroups, CriContainerd, CriPod};
use husk_tests::husk::mounts_under;
use husk_tests::require_root;
use k8s_cri::v1::*;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

fn cgroup_root() -> String {
    format!("husk-cri-prop-test-{}", std::process::id())
}

/// A tmpfs made shared, as a kubelet's volume sources are on a systemd node (containerd
/// refuses HostToContainer and Bidirectional on a source that is not).
struct SharedSource {
    dir: tempfile::TempDir,
}

impl SharedSource {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let none = None::<&str>;
        mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            MsFlags::empty(),
            none,
        )
        .unwrap();
        mount(none, dir.path(), none, MsFlags::MS_SHARED, none).unwrap();
        for d in ["late", "inner", "back"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SharedSource {
    fn drop(&mut self) {
        for m in mounts_under(self.dir.path()).into_iter().rev() {
            let _ = umount2(m.as_str(), MntFlags::MNT_DETACH);
        }
        let _ = umount2(self.dir.path(), MntFlags::MNT_DETACH);
    }
}

fn volume(dest: &str, src: &Path, propagation: MountPropagation) -> Mount {
    Mount {
        container_path: dest.into(),
        host_path: src.display().to_string(),
        propagation: propagation as i32,
        ..Default::default()
    }
}

/// mount(8) inside the container needs CAP_SYS_ADMIN.
fn sys_admin() -> LinuxContainerSecurityContext {
    LinuxContainerSecurityContext {
        capabilities: Some(Capability {
            add_capabilities: vec!["SYS_ADMIN".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn is_mount_point(p: &Path) -> bool {
    let needle = format!(" {} ", p.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(&needle))
}

/// What one runtime showed, compared between husk and runc.
#[derive(Debug, PartialEq)]
struct Observed {
    /// `cat /slave/late/f` after the host mounted `late`: (exit code, output).
    slave_sees_host_mount: (i32, String),
    /// `cat /private/late/f` likewise.
    private_sees_host_mount: (i32, String),
    /// The container mounted a tmpfs on /slave/inner: is it a mount point on the host?
    container_mount_on_host: bool,
}

fn flow(cri: &CriContainerd, handler: &str) -> Observed {
    let src = SharedSource::new();
    let pod = CriPod::run(
        cri,
        &format!("{handler}-prop"),
        handler,
        &cgroup_root(),
        |_| {},
    )
    .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}\n{}", cri.log()));
    let c = pod.start(
        "vol",
        &["sleep", "1000"],
        sys_admin(),
        vec![
            volume("/private", src.path(), MountPropagation::PropagationPrivate),
            volume(
                "/slave",
                src.path(),
                MountPropagation::PropagationHostToContainer,
            ),
        ],
    );
    // The container is running and has looked at the (empty) directory the host mounts on
    // next, so a guest that caches it must notice the change.
    let (code, _, err) = pod.exec(&c, &["ls", "-la", "/slave/late", "/private/late"]);
    assert_eq!(code, 0, "{handler}: {err}");
    let late = src.path().join("late");
    mount(
        Some("tmpfs"),
        &late,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    std::fs::write(late.join("f"), "mounted-later\n").unwrap();
    let cat = |path: &str| {
        let (code, out, _) = pod.exec(&c, &["cat", path]);
        (code, out)
    };
    // Under runc at once; under husk once the guest's cached entry for the directory
    // expires (virtiofsd's `auto` cache: about a second). Tried for up to 10 s.
    let mounted = Instant::now();
    let mut slave_sees_host_mount = cat("/slave/late/f");
    while slave_sees_host_mount.0 != 0 && mounted.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        slave_sees_host_mount = cat("/slave/late/f");
    }
    eprintln!(
        "{handler}: the host's mount showed in the rslave view after {:?}",
        mounted.elapsed()
    );
    let private_sees_host_mount = cat("/private/late/f");
    let (code, out, err) = pod.exec(
        &c,
        &[
            "sh",
            "-c",
            "mount -t tmpfs inner /slave/inner && echo x > /slave/inner/g",
        ],
    );
    assert_eq!(code, 0, "{handler}: mount in the container: {out}{err}");
    let container_mount_on_host =
        is_mount_point(&src.path().join("inner")) || src.path().join("inner/g").exists();
    pod.remove();
    Observed {
        slave_sees_host_mount,
        private_sees_host_mount,
        container_mount_on_host,
    }
}

/// Bidirectional under runc: a container's mount under the volume shows on the host.
fn bidirectional_runc(cri: &CriContainerd) -> bool {
    let src = SharedSource::new();
    let pod = CriPod::run(cri, "runc-bidi", "runc", &cgroup_root(), |_| {})
        .unwrap_or_else(|e| panic!("RunPodSandbox (runc): {e}\n{}", cri.log()));
    let c = pod.start(
        "bidi",
        &["sleep", "1000"],
        sys_admin(),
        vec![volume(
            "/bidi",
            src.path(),
            MountPropagation::PropagationBidirectional,
        )],
    );
    let (code, out, err) = pod.exec(
        &c,
        &[
            "sh",
            "-c",
            "mount -t tmpfs back /bidi/back && echo x > /bidi/back/g",
        ],
    );
    assert_eq!(code, 0, "runc: mount in the container: {out}{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = false;
    while !seen && Instant::now() < deadline {
        seen = src.path().join("back/g").exists();
        std::thread::sleep(Duration::from_millis(50));
    }
    pod.remove();
    seen
}

#[test]
fn volume_propagation_alike_on_husk_and_runc() {
    require_root("CRI pods need root (containerd, netns, mounts)");
    let _sweep = Sweep;
    let cri = CriContainerd::start();
    let runc = flow(&cri, "runc");
    assert_eq!(
        runc,
        Observed {
            slave_sees_host_mount: (0, "mounted-later\n".into()),
            private_sees_host_mount: (1, String::new()),
            container_mount_on_host: false,
        },
        "runc's baseline"
    );
    let husk = flow(&cri, "husk");
    assert_eq!(husk, runc, "husk differs from runc");

    assert!(
        bidirectional_runc(&cri),
        "runc: a Bidirectional volume's mount did not reach the host"
    );
    // husk: refused at CreateContainer, naming the mount and the option; the pod lives on.
    let src = SharedSource::new();
    let pod = CriPod::run(&cri, "husk-bidi", "husk", &cgroup_root(), |_| {})
        .unwrap_or_else(|e| panic!("RunPodSandbox (husk): {e}\n{}", cri.log()));
    // containerd 1.6's CreateContainer only records the container; the task (the shim's
    // Create) is made by StartContainer, which is where the refusal surfaces.
    let c = pod
        .create(
            "bidi",
            &["sleep", "1000"],
            sys_admin(),
            vec![volume(
                "/bidi",
                src.path(),
                MountPropagation::PropagationBidirectional,
            )],
        )
        .unwrap_or_else(|e| panic!("CreateContainer (husk): {e}"));
    let mut rt = cri.rt.clone();
    let e = cri
        .block_on(rt.start_container(StartContainerRequest { container_id: c }))
        .expect_err("husk started a container with a Bidirectional volume");
    let msg = e.message();
    eprintln!("husk's refusal: {msg}");
    // The shim's INVALID_ARGUMENT, as containerd words it.
    for want in [
        "/bidi",
        "rshared",
        "Bidirectional",
        "HostToContainer",
        "invalid argument",
    ] {
        assert!(msg.contains(want), "the refusal lacks {want:?}: {msg}");
    }
    let mounts = Path::new("/run/husk").join(&pod.id).join("mounts");
    let pause = mounts.join(&pod.id);
    let left: Vec<String> = mounts_under(&mounts)
        .into_iter()
        .filter(|m| Path::new(m) != mounts && !Path::new(m).starts_with(&pause))
        .collect();
    assert!(
        left.is_empty(),
        "the refused container left mounts: {left:?}"
    );
    // The pod still runs containers.
    let c = pod.start("after", &["sleep", "1000"], Default::default(), vec![]);
    assert_eq!(pod.exec(&c, &["true"]).0, 0);
    pod.remove();
}

struct Sweep;

impl Drop for Sweep {
    fn drop(&mut self) {
        sweep_cgroups(&cgroup_root());
    }
}
