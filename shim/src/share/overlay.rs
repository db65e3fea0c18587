//! Overlay rootfs mounts whose option string does not fit `mount(2)`: an image of many layers.
//!
//! `mount(2)` copies one page of option data (4095 bytes and the NUL). containerd's overlay
//! snapshotter names every layer by its absolute path (`…/snapshots/<n>/fs`, ~75 bytes here),
//! so an image of ~55 layers or more does not fit; Docker allows 127 and runc runs them.
//!
//! - **Linux 6.8+**: the new mount API with overlay's `lowerdir+` parameter, one `fsconfig`
//!   per layer (`fsopen("overlay")` … `fsmount`), then the detached mount is moved onto the
//!   mount point's fd like every other mount of the shim ([`host_fs::move_onto`]). No length
//!   limit but the kernel's 500 layers (each path under 256 bytes).
//! - **Older kernels** (no `lowerdir+`: overlay took the new API's parameters only in 6.5, and
//!   `lowerdir+` in 6.8; `fsconfig` strings are capped at 256 bytes, so the whole list cannot
//!   travel as one `lowerdir`): containerd's own way — the layers' common parent directory is
//!   made the current directory and `lowerdir` lists paths relative to it (`<n>/fs`, ~8 bytes
//!   a layer), then classic `mount(2)`. The current directory is per process and the shim is
//!   multi-threaded, so the mount runs on a short-lived thread that first leaves the shared
//!   fs state with `unshare(CLONE_FS)` (the thread's cwd is then its own; the other threads
//!   never see it move). A forked helper would do the same, but fork in a multi-threaded
//!   process may only run async-signal-safe code and its exit status would race the shim's
//!   own child reaping; a thread has neither problem. (containerd ≥ 1.7 does the same with a
//!   locked OS thread.)
//!
//! The new API is tried first; where the kernel refuses `lowerdir+` (EINVAL, or ENOSYS for no
//! `fsopen` at all) the fallback runs, and if that fails too the error says both.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;

use crate::host_fs::{self, FsContext, MountAttrs};

/// The longest option string `mount(2)` takes: one page, less the terminating NUL.
pub(crate) const MAX_DATA: usize = 4095;

#[derive(Debug, thiserror::Error)]
pub(crate) enum OverlayError {
    #[error("the overlay mount options name no lowerdir (options: {0:?})")]
    NoLowerdir(String),
    #[error("lowerdir has an empty layer path (options: {0:?})")]
    EmptyLayer(String),
    #[error("new mount API, {step}: {source}{}", log_suffix(.log))]
    NewApi {
        step: String,
        #[source]
        source: std::io::Error,
        log: Vec<String>,
    },
    #[error(
        "the {len}-byte options do not fit mount(2)'s page and the layers share no parent \
         directory to shorten them from; this kernel has no overlay `lowerdir+` (Linux 6.8+), \
         which takes any number of layers — run the node on Linux 6.8 or later"
    )]
    NoCommonDir { len: usize },
    #[error(
        "even relative to {dir}, the options are {len} bytes, more than mount(2)'s {MAX_DATA}; \
         this kernel has no overlay `lowerdir+` (Linux 6.8+), which takes any number of layers \
         — run the node on Linux 6.8 or later"
    )]
    StillTooLong { dir: PathBuf, len: usize },
    #[error("mount(2) of the overlay with layers relative to {dir}: {source}")]
    Mount {
        dir: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("the mount thread for layers relative to {dir}: {message}")]
    Thread { dir: PathBuf, message: String },
    #[error("{new_api}; and the fallback for kernels without lowerdir+: {fallback}")]
    Both {
        new_api: Box<OverlayError>,
        fallback: Box<OverlayError>,
    },
}

fn log_suffix(log: &[String]) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!(" (kernel: {})", log.join("; "))
    }
}

/// containerd's overlay options split into the layers and the rest (kept in order).
#[derive(Debug, PartialEq, Eq)]
struct Options<'a> {
    lowers: Vec<&'a str>,
    /// Where `lowerdir=` stood among the options.
    lower_index: usize,
    rest: Vec<&'a str>,
}

fn parse<'a>(data: &[&'a str]) -> Result<Options<'a>, OverlayError> {
    let joined = || data.join(",");
    let lower_index = data
        .iter()
        .position(|o| o.starts_with("lowerdir="))
        .ok_or_else(|| OverlayError::NoLowerdir(joined()))?;
    let lowers: Vec<&str> = data[lower_index]["lowerdir=".len()..].split(':').collect();
    if lowers.iter().any(|l| l.is_empty()) {
        return Err(OverlayError::EmptyLayer(joined()));
    }
    let rest = data
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != lower_index)
        .map(|(_, o)| *o)
        .collect();
    Ok(Options {
        lowers,
        lower_index,
        rest,
    })
}

/// Mounts the overlay `source` with `flags` and option `data` (containerd's, one option per
/// entry: `index=off`, `workdir=…`, `upperdir=…`, `lowerdir=A:B:…`) on `point`, however many
/// layers it has.
pub fn mount(
    source: &str,
    flags: MsFlags,
    data: &[&str],
    point: &OwnedFd,
) -> Result<(), OverlayError> {
    let opts = parse(data)?;
    match mount_lowerdir_plus(source, flags, &opts, point) {
        Ok(()) => Ok(()),
        Err(Attempt::Failed(e)) => Err(e),
        Err(Attempt::Unsupported(new_api)) => {
            log::info!("overlay: {new_api}; mounting with layers relative to their parent directory instead");
            mount_relative(source, flags, &opts, point).map_err(|fallback| OverlayError::Both {
                new_api: Box::new(new_api),
                fallback: Box::new(fallback),
            })
        }
    }
}

/// How the new-API attempt ended: refused in a way that means "this kernel cannot" (so the
/// fallback runs), or failed for a reason the fallback would hit as well.
enum Attempt {
    Unsupported(OverlayError),
    Failed(OverlayError),
}

/// The mount attributes matching `flags` (what mount(2) would have applied).
fn attrs(flags: MsFlags) -> MountAttrs {
    MountAttrs {
        readonly: flags.contains(MsFlags::MS_RDONLY),
        nosuid: flags.contains(MsFlags::MS_NOSUID),
        nodev: flags.contains(MsFlags::MS_NODEV),
        noexec: flags.contains(MsFlags::MS_NOEXEC),
        noatime: flags.contains(MsFlags::MS_NOATIME),
    }
}

fn mount_lowerdir_plus(
    source: &str,
    flags: MsFlags,
    opts: &Options,
    point: &OwnedFd,
) -> Result<(), Attempt> {
    let fail =
        |ctx: Option<&FsContext>, step: String, source: std::io::Error| OverlayError::NewApi {
            step,
            source,
            log: ctx.map(FsContext::log).unwrap_or_default(),
        };
    let ctx = FsContext::open("overlay").map_err(|e| {
        let unsupported = e.raw_os_error() == Some(libc::ENOSYS);
        let err = fail(None, "fsopen(\"overlay\")".into(), e);
        if unsupported {
            Attempt::Unsupported(err)
        } else {
            Attempt::Failed(err)
        }
    })?;
    // EINVAL: a kernel whose overlay has no `lowerdir+` (6.5–6.7: unknown parameter; before
    // 6.5 the legacy option page overflows), or a layer path of 256 bytes or more — the
    // fallback handles all of these.
    let einval = |e: &std::io::Error| e.raw_os_error() == Some(libc::EINVAL);
    for (i, layer) in opts.lowers.iter().enumerate() {
        ctx.set_string("lowerdir+", layer).map_err(|e| {
            let unsupported = einval(&e);
            let err = fail(Some(&ctx), format!("lowerdir+ {layer} (layer {i})"), e);
            if unsupported {
                Attempt::Unsupported(err)
            } else {
                Attempt::Failed(err)
            }
        })?;
    }
    for o in &opts.rest {
        let r = match o.split_once('=') {
            Some((k, v)) => ctx.set_string(k, v),
            None => ctx.set_flag(o),
        };
        r.map_err(|e| Attempt::Failed(fail(Some(&ctx), format!("option {o}"), e)))?;
    }
    ctx.set_string("source", source)
        .map_err(|e| Attempt::Failed(fail(Some(&ctx), format!("source {source}"), e)))?;
    if flags.contains(MsFlags::MS_RDONLY) {
        ctx.set_flag("ro")
            .map_err(|e| Attempt::Failed(fail(Some(&ctx), "ro".into(), e)))?;
    }
    ctx.create().map_err(|e| {
        let unsupported = einval(&e);
        let err = fail(
            Some(&ctx),
            format!("creating the overlay of {} layers", opts.lowers.len()),
            e,
        );
        if unsupported {
            Attempt::Unsupported(err)
        } else {
            Attempt::Failed(err)
        }
    })?;
    let tree = ctx
        .mount(attrs(flags))
        .map_err(|e| Attempt::Failed(fail(Some(&ctx), "fsmount".into(), e)))?;
    host_fs::move_onto(&tree, point).map_err(|e| {
        Attempt::Failed(fail(
            None,
            "moving the overlay onto its mount point".into(),
            e,
        ))
    })
}

/// The deepest directory that holds every layer strictly below it (`None` if that is `/`, or
/// a layer path is not absolute and normal).
fn common_parent(lowers: &[&str]) -> Option<PathBuf> {
    let split = |l: &str| -> Option<Vec<String>> {
        let p = Path::new(l);
        if !p.is_absolute() {
            return None;
        }
        p.components()
            .skip(1)
            .map(|c| match c {
                Component::Normal(n) => n.to_str().map(str::to_string),
                _ => None,
            })
            .collect()
    };
    let all: Vec<Vec<String>> = lowers.iter().map(|l| split(l)).collect::<Option<_>>()?;
    let first = all.first()?;
    let mut n = all.iter().fold(first.len(), |n, p| {
        n.min(p.len())
            .min(first.iter().zip(p).take_while(|(a, b)| a == b).count())
    });
    // Strictly below: no layer may be the common directory itself.
    if all.iter().any(|p| p.len() == n) {
        n = n.checked_sub(1)?;
    }
    if n == 0 {
        return None;
    }
    Some(
        first[..n]
            .iter()
            .fold(PathBuf::from("/"), |acc, c| acc.join(c)),
    )
}

/// The options with `lowerdir` relative to `dir`, for [`mount_relative`].
fn relative_data(opts: &Options, dir: &Path) -> String {
    let rel: Vec<&str> = opts
        .lowers
        .iter()
        .map(|l| {
            Path::new(l)
                .strip_prefix(dir)
                .ok()
                .and_then(Path::to_str)
                .unwrap_or(l)
        })
        .collect();
    let lower = format!("lowerdir={}", rel.join(":"));
    let mut all: Vec<&str> = opts.rest.clone();
    all.insert(opts.lower_index.min(all.len()), &lower);
    all.join(",")
}

fn mount_relative(
    source: &str,
    flags: MsFlags,
    opts: &Options,
    point: &OwnedFd,
) -> Result<(), OverlayError> {
    let full = {
        let mut d = opts.rest.clone();
        let lower = format!("lowerdir={}", opts.lowers.join(":"));
        d.push(&lower);
        d.join(",").len()
    };
    let dir = common_parent(&opts.lowers).ok_or(OverlayError::NoCommonDir { len: full })?;
    let data = relative_data(opts, &dir);
    if data.len() > MAX_DATA {
        return Err(OverlayError::StillTooLong {
            dir,
            len: data.len(),
        });
    }
    let target = host_fs::proc_fd_path(point);
    let thread_dir = dir.clone();
    let r = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("overlay-mount".into())
            .spawn_scoped(s, || -> Result<(), OverlayError> {
                let mnt = |source| OverlayError::Mount {
                    dir: thread_dir.clone(),
                    source,
                };
                // This thread's cwd becomes its own; the shim's other threads keep theirs.
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).map_err(mnt)?;
                nix::unistd::chdir(&thread_dir).map_err(mnt)?;
                nix::mount::mount(
                    Some(source),
                    &target,
                    Some("overlay"),
                    flags,
                    Some(data.as_str()),
                )
                .map_err(mnt)
            })
            .map(|h| h.join())
    });
    match r {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(OverlayError::Thread {
            dir,
            message: "panicked".into(),
        }),
        Err(e) => Err(OverlayError::Thread {
            dir,
            message: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_layers_and_the_rest() {
        let o = parse(&[
            "index=off",
            "lowerdir=/a/1/fs:/a/2/fs",
            "upperdir=/a/3/fs",
            "workdir=/a/3/work",
        ])
        .unwrap();
        assert_eq!(o.lowers, ["/a/1/fs", "/a/2/fs"]);
        assert_eq!(o.lower_index, 1);
        assert_eq!(
            o.rest,
            ["index=off", "upperdir=/a/3/fs", "workdir=/a/3/work"]
        );
        assert!(matches!(
            parse(&["index=off"]),
            Err(OverlayError::NoLowerdir(_))
        ));
        assert!(matches!(
            parse(&["lowerdir=/a::/b"]),
            Err(OverlayError::EmptyLayer(_))
        ));
    }

    #[test]
    fn layers_are_shortened_relative_to_their_common_parent() {
        let snaps = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots";
        let lowers: Vec<String> = (1..=3).map(|i| format!("{snaps}/{i}/fs")).collect();
        let l: Vec<&str> = lowers.iter().map(String::as_str).collect();
        assert_eq!(common_parent(&l), Some(PathBuf::from(snaps)));
        // One layer being the common directory itself: its parent is taken.
        assert_eq!(
            common_parent(&["/x/a", "/x/a/b"]),
            Some(PathBuf::from("/x"))
        );
        assert_eq!(common_parent(&["/x/a"]), Some(PathBuf::from("/x")));
        // Nothing in common but `/`, or not absolute: no shortening.
        assert_eq!(common_parent(&["/x/a", "/y/b"]), None);
        assert_eq!(common_parent(&["x/a", "x/b"]), None);
        assert_eq!(common_parent(&["/x/../a", "/x/b"]), None);
        let lower = format!("lowerdir={}", l.join(":"));
        let opts = parse(&["index=off", &lower, "upperdir=/u/fs"]).unwrap();
        assert_eq!(
            relative_data(&opts, Path::new(snaps)),
            "index=off,lowerdir=1/fs:2/fs:3/fs,upperdir=/u/fs"
        );
    }

    /// `n` layer directories under a long path (so their option string is well over a page),
    /// each with a file of its own and a `shadow` file naming its layer; the last (bottom)
    /// layer also has `bottom`.
    fn layers(base: &Path, n: usize) -> Vec<String> {
        let deep = base.join("io.containerd.snapshotter.v1.overlayfs-with-a-long-name/snapshots");
        (0..n)
            .map(|i| {
                let d = deep.join(format!("{i}/fs"));
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join(format!("f{i}")), i.to_string()).unwrap();
                std::fs::write(d.join("shadow"), i.to_string()).unwrap();
                if i == n - 1 {
                    std::fs::write(d.join("bottom"), "from the bottom layer").unwrap();
                }
                d.display().to_string()
            })
            .collect()
    }

    fn check_mounted(point_path: &Path, n: usize) {
        assert_eq!(
            std::fs::read_to_string(point_path.join("bottom")).unwrap(),
            "from the bottom layer"
        );
        assert_eq!(
            std::fs::read_to_string(point_path.join("shadow")).unwrap(),
            "0",
            "the first lowerdir is the top layer"
        );
        assert_eq!(std::fs::read_dir(point_path).unwrap().count(), n + 2);
    }

    fn require_root() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test mounts: run it as root (cargo xtask test)"
        );
    }

    /// 128 layers through the new mount API's `lowerdir+` (this host runs Linux 6.18).
    #[test]
    fn an_overlay_of_128_layers_mounts_with_lowerdir_plus() {
        require_root();
        let d = tempfile::tempdir().unwrap();
        let lowers = layers(d.path(), 128);
        let lower = format!("lowerdir={}", lowers.join(":"));
        assert!(
            lower.len() > MAX_DATA,
            "the test must not fit mount(2): {} bytes",
            lower.len()
        );
        std::fs::create_dir(d.path().join("point")).unwrap();
        let point = host_fs::open_dir(&d.path().join("point")).unwrap();
        let opts = parse(&["index=off", &lower]).unwrap();
        match mount_lowerdir_plus("overlay", MsFlags::MS_RDONLY, &opts, &point) {
            Ok(()) => {}
            Err(Attempt::Unsupported(e) | Attempt::Failed(e)) => panic!("lowerdir+: {e}"),
        }
        check_mounted(&d.path().join("point"), 128);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(d.path().join("point").to_str().unwrap()))
            .unwrap();
        assert!(
            line.contains(" ro,") && line.contains(" overlay "),
            "{line}"
        );
        nix::mount::umount2(&d.path().join("point"), nix::mount::MntFlags::MNT_DETACH).unwrap();
    }

    /// The fallback for kernels without `lowerdir+`, run here directly: layers relative to
    /// their parent, from a thread with a cwd of its own — and the shim's cwd has not moved.
    #[test]
    fn an_overlay_of_128_layers_mounts_relative_to_their_parent() {
        require_root();
        let d = tempfile::tempdir().unwrap();
        let lowers = layers(d.path(), 128);
        let lower = format!("lowerdir={}", lowers.join(":"));
        std::fs::create_dir_all(d.path().join("upper/fs")).unwrap();
        std::fs::create_dir_all(d.path().join("upper/work")).unwrap();
        let upper = format!("upperdir={}", d.path().join("upper/fs").display());
        let work = format!("workdir={}", d.path().join("upper/work").display());
        std::fs::create_dir(d.path().join("point")).unwrap();
        let point = host_fs::open_dir(&d.path().join("point")).unwrap();
        let cwd = std::env::current_dir().unwrap();
        let opts = parse(&["index=off", &work, &upper, &lower]).unwrap();
        mount_relative("overlay", MsFlags::empty(), &opts, &point).unwrap();
        assert_eq!(std::env::current_dir().unwrap(), cwd);
        check_mounted(&d.path().join("point"), 128);
        std::fs::write(d.path().join("point/new"), "rw").unwrap();
        assert!(
            d.path().join("upper/fs/new").exists(),
            "writes go to the upper layer"
        );
        nix::mount::umount2(&d.path().join("point"), nix::mount::MntFlags::MNT_DETACH).unwrap();
    }

    #[test]
    fn layers_without_a_common_parent_are_refused_with_the_fix() {
        let lowers: Vec<String> = (0..300)
            .map(|i| format!("/l{i:04}/a-long-layer-directory-name"))
            .collect();
        let lower = format!("lowerdir={}", lowers.join(":"));
        let opts = parse(&[&lower]).unwrap();
        let d = tempfile::tempdir().unwrap();
        let point = host_fs::open_dir(d.path()).unwrap();
        let e = mount_relative("overlay", MsFlags::empty(), &opts, &point)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Linux 6.8") && e.contains("share no parent"),
            "{e}"
        );
        let many: Vec<String> = (0..2000).map(|i| format!("/s/{i}/fs")).collect();
        let lower = format!("lowerdir={}", many.join(":"));
        let opts = parse(&[&lower]).unwrap();
        let e = mount_relative("overlay", MsFlags::empty(), &opts, &point)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("even relative to /s") && e.contains("Linux 6.8"),
            "{e}"
        );
    }
}
