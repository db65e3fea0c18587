//! Tier 3: an image of 100 layers — more than mount(2)'s one page of overlay options holds
//! with containerd's absolute snapshot paths — runs under husk (`ctr run --rm`, private
//! containerd) with the same output as under runc, and leaves nothing behind. The shim mounts
//! such an overlay with `lowerdir+` (Linux 6.8+, this host) or layers relative to their
//! parent directory (older kernels); see shim/src/share/overlay.rs.

use husk_rootfs_builder::image::{self, ImageSpec};
use husk_rootfs_builder::tree::{Content, Tree};
use husk_tests::husk::{assert_sandbox_gone, HuskContainerd};
use husk_tests::{require_program, require_root};

const LAYERS: usize = 100;
const IMAGE: &str = "husk.local/many-layers:latest";

/// Layer 0 is busybox; layer i (1..100) adds `/layers/NNN` and replaces `/etc/top`, so the
/// top layer's copy must win and every layer must be there.
fn layers(busybox: &std::path::Path) -> Vec<Tree> {
    let mut v = vec![image::busybox_tree(busybox).unwrap()];
    for i in 1..LAYERS {
        let mut t = Tree::new();
        let n = format!("{i:03}\n").into_bytes();
        t.file(&format!("layers/{i:03}"), Content::Bytes(n.clone()), 0o644)
            .unwrap();
        t.file("etc/top", Content::Bytes(n), 0o644).unwrap();
        v.push(t);
    }
    v
}

const SCRIPT: &str = "cat /etc/top; ls /layers | wc -l; cat /layers/001 /layers/050; \
                      echo written > /new && cat /new; ls /bin/busybox";

#[test]
fn an_image_of_100_layers_runs_as_under_runc() {
    require_root("containerd");
    let busybox = require_program("busybox", "busybox-static");
    require_program("runc", "runc");
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("many-layers.tar");
    let trees = layers(&busybox);
    let refs: Vec<&Tree> = trees.iter().collect();
    let written = image::build_layered(&refs, &ImageSpec::new(IMAGE, &["sh"]), &tar).unwrap();
    assert_eq!(written.layer_digests.len(), LAYERS);

    let h = HuskContainerd::start();
    h.ctd.ctr_ok(&["images", "import", tar.to_str().unwrap()]);
    // The overlay options containerd hands the runtime name every layer by absolute path:
    // well over mount(2)'s 4095 bytes here.
    let one = h
        .ctd
        .dir()
        .join("root/io.containerd.snapshotter.v1.overlayfs/snapshots/100/fs");
    let option_bytes = LAYERS * (one.as_os_str().len() + 1);
    assert!(
        option_bytes > 4096,
        "{option_bytes} bytes would fit one page"
    );

    let run = |runtime: &str, id: &str| {
        let out = h
            .ctd
            .run_rm(Some(runtime), &[], IMAGE, id, &["sh", "-c", SCRIPT]);
        assert!(
            out.status.success(),
            "{runtime}: ctr run failed: {}{}\ncontainerd log (tail):\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            h.ctd
                .log()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let expected = "099\n99\n001\n050\nwritten\n/bin/busybox\n";
    let id = format!("layers-{}", std::process::id());
    let runc = run("io.containerd.runc.v2", &format!("{id}-runc"));
    assert_eq!(runc, expected, "runc baseline");
    let husk = run("io.containerd.husk.v2", &id);
    assert_eq!(husk, expected, "husk runs it as runc does");
    assert_sandbox_gone(&id);
}
