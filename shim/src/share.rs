//! Sharing a container's file systems with the guest: containerd's rootfs mounts under
//! `mounts/<cid>/rootfs`, each OCI bind mount (volumes, /etc/hosts, /etc/resolv.conf,
//! /etc/hostname, secrets) under `mounts/<cid>/mounts/<n>`, and the spec the agent gets
//! rewritten to point at the guest's view of them (`/run/husk/shared/…`, through the
//! read-only `shared/` bind: see sandbox_dir.rs). Every mount point is created exclusively
//! and without following symlinks, and mounted on its fd (`host_fs`). An overlay of more
//! layers than mount(2)'s one page of options holds is mounted as [`overlay`] says.

use std::path::{Path, PathBuf};

use std::os::fd::OwnedFd;

use containerd_shim::protos::types::mount::Mount as ContainerdMount;
use nix::mount::{mount, MsFlags};
use serde_json::Value;

use crate::host_fs::{self, BindAttrs};
use crate::sandbox_dir::{DirError, SandboxDir, GUEST_SHARED};

mod overlay;

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("{cid}: mounting the rootfs ({fstype} from {source_path}) on {target}: {message}")]
    Rootfs {
        cid: String,
        fstype: String,
        source_path: String,
        target: PathBuf,
        message: String,
    },
    #[error("{cid}: bind mount {source_path} -> {destination}: {message}")]
    Bind {
        cid: String,
        source_path: String,
        destination: String,
        message: String,
    },
    #[error("{cid}: config.json: {message}")]
    Spec { cid: String, message: String },
    /// A field of config.json the shim cannot use, named by its JSON path.
    #[error("{cid}: {field} = {value}: {message}")]
    Field {
        cid: String,
        field: String,
        value: String,
        message: String,
    },
    #[error("annotation {annotation} = {value}: {message}")]
    Annotation {
        annotation: &'static str,
        value: String,
        message: String,
    },
}

/// Mounts containerd's rootfs mounts for `cid` (or binds the bundle's `rootfs/` when
/// containerd mounted it already) under `mounts/<cid>/rootfs`.
pub(crate) fn mount_rootfs(
    dir: &SandboxDir,
    cid: &str,
    mounts: &[ContainerdMount],
    bundle: &Path,
) -> Result<PathBuf, ShareError> {
    let target = dir.rootfs(cid);
    let fail = |fstype: &str, source: &str, message: String| ShareError::Rootfs {
        cid: cid.into(),
        fstype: fstype.into(),
        source_path: source.into(),
        target: target.clone(),
        message,
    };
    let point = dir
        .create_container(cid)
        .map_err(|e| fail("-", "-", e.to_string()))?;
    if mounts.is_empty() {
        let src = bundle.join("rootfs");
        host_fs::bind_onto(&src, &point, true, BindAttrs::default())
            .map_err(|e| fail("bind", &src.display().to_string(), e.to_string()))?;
        return Ok(target);
    }
    for m in mounts {
        mount_one(&m.type_, &m.source, &m.options, &point)
            .map_err(|e| fail(&m.type_, &m.source, e))?;
    }
    Ok(target)
}

/// Mount flags among containerd's mount options; the rest is file-system data.
fn split_options(options: &[String]) -> (MsFlags, Vec<&str>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => flags &= !MsFlags::MS_RDONLY,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            other => data.push(other),
        }
    }
    (flags, data)
}

/// One of containerd's rootfs mounts (overlay from the snapshotter, or a bind), done in this
/// process on the mount point `point`. containerd-shim's `mount_rootfs` is not used: it forks
/// and waits for the child through the crate's reaper, which this shim does not run (it
/// reaps its own children).
fn mount_one(
    fstype: &str,
    source: &str,
    options: &[String],
    point: &OwnedFd,
) -> Result<(), String> {
    let (flags, data) = split_options(options);
    if flags.contains(MsFlags::MS_BIND) {
        let attrs = BindAttrs {
            readonly: flags.contains(MsFlags::MS_RDONLY),
            nosuid: flags.contains(MsFlags::MS_NOSUID),
            nodev: flags.contains(MsFlags::MS_NODEV),
            noexec: flags.contains(MsFlags::MS_NOEXEC),
            propagation: 0,
        };
        return host_fs::bind_onto(
            Path::new(source),
            point,
            flags.contains(MsFlags::MS_REC),
            attrs,
        )
        .map_err(|e| e.to_string());
    }
    let joined = data.join(",");
    // mount(2) takes one page of option data: an overlay of many layers takes another way
    // (`lowerdir+`, or layers relative to their parent directory: see overlay.rs).
    if joined.len() > overlay::MAX_DATA {
        if fstype == "overlay" {
            return overlay::mount(source, flags, &data, point).map_err(|e| e.to_string());
        }
        return Err(format!(
            "mount options are {} bytes, more than mount(2)'s one page (only overlay mounts \
             have a way around it)",
            joined.len()
        ));
    }
    mount(
        Some(source),
        &host_fs::proc_fd_path(point),
        Some(fstype),
        flags,
        (!joined.is_empty()).then_some(joined.as_str()),
    )
    .map_err(|e| e.to_string())
}

fn is_bind(m: &Value) -> bool {
    m.get("type").and_then(Value::as_str) == Some("bind")
        || m.get("options").and_then(Value::as_array).is_some_and(|o| {
            o.iter()
                .any(|x| matches!(x.as_str(), Some("bind" | "rbind")))
        })
}

/// How much of a value from a spec an error message shows: a megabyte annotation must not
/// become a megabyte log line (and containerd event).
pub fn shown(s: &str) -> String {
    const SHOWN: usize = 96;
    match s.char_indices().nth(SHOWN) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

/// One bind mount of a spec, as the shim shares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Its index in `mounts`.
    pub index: usize,
    pub source: String,
}

/// The bind mounts of `spec` the shim would share, checked before anything is mounted: each
/// needs a source that is an absolute host path. Pure: the spec mutation run drives it.
pub fn bind_plan(cid: &str, spec: &Value) -> Result<Vec<Bind>, ShareError> {
    let Some(mounts) = spec.get("mounts").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    let mut plan = Vec::new();
    for (index, m) in mounts.iter().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let fail = |value: String, message: &str| ShareError::Field {
            cid: cid.into(),
            field: format!("mounts[{index}].source"),
            value,
            message: message.into(),
        };
        let source = match m.get("source") {
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(fail(
                    shown(&other.to_string()),
                    "not a string — a bind mount's source is the host path to share",
                ))
            }
            None => {
                return Err(fail(
                    "(missing)".into(),
                    "a bind mount needs a source: the host path to share",
                ))
            }
        };
        if !source.starts_with('/') {
            return Err(fail(
                shown(source),
                "the source must be an absolute host path",
            ));
        }
        if source.contains('\0') {
            return Err(fail(
                shown(source),
                "contains a NUL byte, which no host path holds",
            ));
        }
        if let Some(option) = options_of(m)
            .into_iter()
            .find(|o| matches!(*o, "shared" | "rshared"))
        {
            let destination = m.get("destination").and_then(Value::as_str).unwrap_or("");
            return Err(ShareError::Field {
                cid: cid.into(),
                field: format!("mounts[{index}].options"),
                value: option.into(),
                message: format!(
                    "the volume at {} asks for {option} propagation (Kubernetes' \
                     mountPropagation: Bidirectional), which a VM cannot give: the container's \
                     mounts stay in the guest and never reach the node — use HostToContainer \
                     (rslave) or None (rprivate), or run the pod under runc",
                    shown(destination)
                ),
            });
        }
        plan.push(Bind {
            index,
            source: source.clone(),
        });
    }
    Ok(plan)
}

/// Shares every bind mount of `spec` with the guest and rewrites its source to the guest's
/// path. Returns the rewritten spec as JSON for the agent.
pub(crate) fn share_bind_mounts(
    dir: &SandboxDir,
    cid: &str,
    spec: &mut Value,
) -> Result<(), ShareError> {
    // Every bind checked before the first is mounted.
    bind_plan(cid, spec)?;
    let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) else {
        return Ok(());
    };
    let base = dir.mounts_fd()?;
    let rel_dir = Path::new(cid).join("mounts");
    let mut made_dir = false;
    for (n, m) in mounts.iter_mut().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let source = m
            .get("source")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let destination = m
            .get("destination")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let fail = |message: String| ShareError::Bind {
            cid: cid.into(),
            source_path: source.clone(),
            destination: destination.clone(),
            message,
        };
        if !source.starts_with('/') {
            return Err(fail("the source must be an absolute host path".into()));
        }
        let meta = std::fs::metadata(&source).map_err(|e| fail(e.to_string()))?;
        if !made_dir {
            // A directory that is there already is used, but only if it is one (no symlink).
            host_fs::mkdir_beneath(&base, &rel_dir, 0o755)
                .or_else(|e| match e.raw_os_error() {
                    Some(libc::EEXIST) => {
                        host_fs::open_beneath(&base, &rel_dir, libc::O_PATH | libc::O_DIRECTORY)
                    }
                    _ => Err(e),
                })
                .map_err(|e| {
                    fail(format!(
                        "creating {}: {e}",
                        dir.container(cid).join("mounts").display()
                    ))
                })?;
            made_dir = true;
        }
        let name = n.to_string();
        let rel = rel_dir.join(&name);
        let point = if meta.is_dir() {
            host_fs::mkdir_beneath(&base, &rel, 0o755)
        } else {
            host_fs::create_file_beneath(&base, &rel, 0o644)
        }
        .map_err(|e| fail(format!("creating the mount point: {e}")))?;
        let options = options_of(m);
        // runc: "bind" is one mount, "rbind" (or a bind-typed mount naming neither) the tree.
        let recursive = !options.contains(&"bind") || options.contains(&"rbind");
        // Read-only on the host side too, in every submount: a compromised guest cannot
        // write through it. Devices and setuid bits of a volume never act on the host.
        let attrs = BindAttrs {
            readonly: options.contains(&"ro"),
            nosuid: true,
            nodev: true,
            noexec: false,
            propagation: host_propagation(&options),
        };
        host_fs::bind_onto(Path::new(&source), &point, recursive, attrs)
            .map_err(|e| fail(e.to_string()))?;
        m["source"] = Value::String(format!("{GUEST_SHARED}/{cid}/mounts/{name}"));
    }
    Ok(())
}

/// A mount's options as strings (others are ignored: `bind_plan` has the say on shapes).
fn options_of(m: &Value) -> Vec<&str> {
    m.get("options")
        .and_then(Value::as_array)
        .map(|o| o.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The host-side copy's propagation, so that what the guest is shown of the host's later
/// mounts under the source is what runc's container would see (virtiofsd serves whatever is
/// mounted in its view, so the host side decides): `private`/`rprivate` — none of them;
/// otherwise (`slave`/`rslave`, or no option, which under runc is a slave of the host's
/// mount through its rslave root) a slave of the source, which sees them if the source is
/// shared. A slave, not a peer: nothing mounted on the shim's side ever reaches the source.
/// (`shared`/`rshared` are refused by [`bind_plan`].)
fn host_propagation(options: &[&str]) -> u64 {
    let private = options
        .iter()
        .rev()
        .find(|o| matches!(**o, "private" | "rprivate" | "slave" | "rslave"))
        .is_some_and(|o| o.ends_with("private"));
    if private {
        libc::MS_PRIVATE
    } else {
        libc::MS_SLAVE
    }
}

/// Reads the bundle's config.json.
pub(crate) fn read_spec(bundle: &Path, cid: &str) -> Result<Value, ShareError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| ShareError::Spec {
        cid: cid.into(),
        message: format!("{}: {e}", path.display()),
    })?;
    parse_spec(&text, cid)
}

/// config.json's bytes as JSON; an error says where in the document (its JSON path: a spec
/// nested past the parser's 128 levels is refused there, naming the field).
pub fn parse_spec(text: &[u8], cid: &str) -> Result<Value, ShareError> {
    let fail = |field: String, e: &serde_json::Error| {
        let mut field = if field == "." {
            "the document".to_string()
        } else {
            field
        };
        if let Some((cut, _)) = field.char_indices().nth(160) {
            field.truncate(cut);
            field.push('…');
        }
        ShareError::Spec {
            cid: cid.into(),
            message: format!("{field}: not valid JSON ({e})"),
        }
    };
    let mut de = serde_json::Deserializer::from_slice(text);
    let v: Value = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| fail(e.path().to_string(), e.inner()))?;
    de.end().map_err(|e| fail(".".into(), &e))?;
    Ok(v)
}

/// The annotation `ctr` users group containers into one sandbox with.
pub(crate) const ANNOTATION_SANDBOX_ID: &str = "io.husk.sandbox-id";

/// The sandbox a container belongs to; `None` when the container is its own sandbox.
///
/// For CRI pods only containerd's own `io.kubernetes.cri.*` annotations count: a pod can set
/// `io.husk.*` annotations (the containerd snippet passes them through), so a pod's sandbox
/// naming another pod's sandbox in `io.husk.sandbox-id` would get its containers created in
/// that pod's VM. It is refused for a CRI sandbox, and ignored for a CRI container (whose
/// sandbox containerd names). `io.husk.sandbox-id` is for `ctr` users, whose specs carry no
/// CRI annotations.
pub fn sandbox_of(spec: &Value) -> Result<Option<String>, ShareError> {
    let Some(ann) = spec.get("annotations") else {
        return Ok(None);
    };
    let get = |k: &str| ann.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    // The grouping becomes the sandbox's state directory and shim socket: a usable id or
    // nothing, refused here naming the annotation.
    let grouping = |key: &'static str| -> Result<Option<String>, ShareError> {
        let Some(v) = get(key) else { return Ok(None) };
        crate::sandbox_dir::check_id(v).map_err(|_| ShareError::Annotation {
            annotation: key,
            value: shown(v),
            message: "not usable as a sandbox id: 1-128 bytes, no '/' or NUL, not . or ..".into(),
        })?;
        Ok(Some(v.to_string()))
    };
    match get("io.kubernetes.cri.container-type") {
        Some("container") => grouping("io.kubernetes.cri.sandbox-id"),
        Some(_) if get(ANNOTATION_SANDBOX_ID).is_some() => Err(ShareError::Annotation {
            annotation: ANNOTATION_SANDBOX_ID,
            value: shown(get(ANNOTATION_SANDBOX_ID).unwrap_or_default()),
            message: "a Kubernetes pod's VM is its own: the sandbox grouping of CRI pods comes \
                      only from containerd's io.kubernetes.cri.* annotations — remove the \
                      annotation from the pod"
                .into(),
        }),
        Some(_) => Ok(None),
        None => grouping(ANNOTATION_SANDBOX_ID),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let opts: Vec<String> = ["ro", "index=off", "lowerdir=/a:/b", "nosuid"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, data) = split_options(&opts);
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(data, ["index=off", "lowerdir=/a:/b"]);
    }

    #[test]
    fn sandbox_grouping_annotations() {
        let cri = json!({"annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "sb"}});
        assert_eq!(sandbox_of(&cri).unwrap().as_deref(), Some("sb"));
        let pause = json!({"annotations": {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "sb"}});
        assert_eq!(sandbox_of(&pause).unwrap(), None);
        assert_eq!(
            sandbox_of(&json!({"annotations": {"io.husk.sandbox-id": "x"}}))
                .unwrap()
                .as_deref(),
            Some("x")
        );
        assert_eq!(sandbox_of(&json!({})).unwrap(), None);
        // A pod naming another pod's sandbox: refused for its sandbox, ignored for its
        // containers (containerd names their sandbox).
        let hostile = json!({"annotations": {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "mine", "io.husk.sandbox-id": "victim"}});
        let e = sandbox_of(&hostile).unwrap_err().to_string();
        assert!(
            e.contains("io.husk.sandbox-id") && e.contains("victim"),
            "{e}"
        );
        let c = json!({"annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "mine", "io.husk.sandbox-id": "victim"}});
        assert_eq!(sandbox_of(&c).unwrap().as_deref(), Some("mine"));
    }

    /// Kubernetes' Bidirectional propagation (containerd: `rshared`) cannot reach the node
    /// from a VM: refused up front, naming the mount, the option and what to use instead.
    #[test]
    fn shared_volume_propagation_is_refused_naming_the_mount() {
        for option in ["rshared", "shared"] {
            let e = bind_plan(
                "c1",
                &json!({"mounts": [{"destination": "/proc", "type": "proc"}, {"destination": "/mnt/csi", "type": "bind", "source": "/v", "options": ["rbind", option, "rw"]}]}),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("mounts[1].options") && e.contains(option), "{e}");
            assert!(e.contains("/mnt/csi") && e.contains("Bidirectional"), "{e}");
            assert!(e.contains("HostToContainer"), "{e}");
        }
    }

    #[test]
    fn host_side_propagation_follows_the_volumes() {
        assert_eq!(host_propagation(&["rbind", "rprivate"]), libc::MS_PRIVATE);
        assert_eq!(host_propagation(&["private"]), libc::MS_PRIVATE);
        assert_eq!(host_propagation(&["rbind", "rslave"]), libc::MS_SLAVE);
        assert_eq!(host_propagation(&["rbind"]), libc::MS_SLAVE);
        // The last one named wins, as with mount(8).
        assert_eq!(host_propagation(&["rprivate", "rslave"]), libc::MS_SLAVE);
    }

    /// Found by the spec mutation run (tests/tests/spec_mutations.rs): a bind mount's bad
    /// source was reported as "bind mount  -> /x" (no field), a config.json nested past the
    /// parser's limit as "recursion limit exceeded at line 1 column N", a megabyte annotation
    /// was echoed whole, and a grouping annotation that is no usable sandbox id went on to
    /// fail at the state directory without naming the annotation.
    #[test]
    fn spec_refusals_name_the_field_and_stay_short() {
        let e = bind_plan("c1", &json!({"mounts": [{"destination": "/p", "type": "proc"}, {"destination": "/x", "type": "bind", "source": "rel/dir"}]}))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "c1: mounts[1].source = \"rel/dir\": the source must be an absolute host path"
            ),
            "{e}"
        );
        let e = bind_plan(
            "c1",
            &json!({"mounts": [{"destination": "/x", "options": ["rbind"]}]}),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("c1: mounts[0].source = (missing)"), "{e}");
        let e = bind_plan(
            "c1",
            &json!({"mounts": [{"destination": "/x", "type": "bind", "source": 7}]}),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("mounts[0].source = \"7\": not a string"), "{e}");
        assert_eq!(
            bind_plan(
                "c1",
                &json!({"mounts": [{"destination": "/x", "type": "bind", "source": "/v"}]})
            )
            .unwrap(),
            vec![Bind {
                index: 0,
                source: "/v".into()
            }]
        );
        let deep = format!(
            r#"{{"linux":{{"x":{}1{}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let e = parse_spec(deep.as_bytes(), "c1").unwrap_err().to_string();
        assert!(
            e.starts_with("c1: config.json: linux.x[0][0]") && e.contains("recursion limit"),
            "{e}"
        );
        let e = parse_spec(b"{} x", "c1").unwrap_err().to_string();
        assert!(
            e.starts_with("c1: config.json: the document: not valid JSON"),
            "{e}"
        );
        let big = "v".repeat(1 << 20);
        let hostile = json!({"annotations": {"io.kubernetes.cri.container-type": "sandbox", "io.husk.sandbox-id": big}});
        let e = sandbox_of(&hostile).unwrap_err().to_string();
        assert!(
            e.len() < 500 && e.contains("1048576 bytes"),
            "{} bytes",
            e.len()
        );
        for bad in ["..", "a/b", "x\0y"] {
            let e = sandbox_of(&json!({"annotations": {"io.husk.sandbox-id": bad}}))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("annotation io.husk.sandbox-id = ") && e.contains("sandbox id"),
                "{e}"
            );
        }
    }

    #[test]
    fn binds_are_shared_and_rewritten() {
        if !nix::unistd::Uid::effective().is_root() {
            panic!("this test mounts: run it as root (cargo xtask test)");
        }
        let base = tempfile::tempdir().unwrap();
        let vol = tempfile::tempdir().unwrap();
        std::fs::write(vol.path().join("f"), "data").unwrap();
        let hosts = vol.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let d = SandboxDir::new(base.path(), "sb").unwrap();
        d.create().unwrap();
        d.create_container("c1").unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": vol.path(), "options": ["rbind", "rw"]},
            {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "ro"]},
        ]});
        share_bind_mounts(&d, "c1", &mut spec).unwrap();
        assert_eq!(spec["mounts"][0]["source"], "proc");
        assert_eq!(spec["mounts"][1]["source"], "/run/husk/shared/c1/mounts/1");
        assert_eq!(spec["mounts"][2]["source"], "/run/husk/shared/c1/mounts/2");
        let shared_dir = d.container("c1").join("mounts");
        assert_eq!(
            std::fs::read_to_string(shared_dir.join("1/f")).unwrap(),
            "data"
        );
        assert!(
            std::fs::write(shared_dir.join("2"), "x").is_err(),
            "read-only bind must refuse writes"
        );
        assert_eq!(
            std::fs::read_to_string(d.shared().join("c1/mounts/1/f")).unwrap(),
            "data",
            "the guest's view shows the volume"
        );
        std::fs::write(d.shared().join("c1/mounts/1/g"), "guest").unwrap();
        assert_eq!(
            std::fs::read_to_string(vol.path().join("g")).unwrap(),
            "guest"
        );
        let e = share_bind_mounts(&d, "c2", &mut json!({"mounts": [{"destination": "/x", "type": "bind", "source": "/nonexistent/v"}]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c2") && e.contains("/nonexistent/v"), "{e}");
        d.destroy().unwrap();
        assert!(!d.root().exists());
    }

    /// Whatever sits where a mount point is to be made (a symlink to a host file, here) is
    /// refused, never followed, truncated or mounted over.
    #[test]
    fn a_planted_symlink_is_never_followed() {
        if !nix::unistd::Uid::effective().is_root() {
            panic!("this test mounts: run it as root (cargo xtask test)");
        }
        let base = tempfile::tempdir().unwrap();
        let victim_dir = tempfile::tempdir().unwrap();
        let victim = victim_dir.path().join("shadow");
        std::fs::write(&victim, "secret").unwrap();
        let vol = tempfile::tempdir().unwrap();
        let file = vol.path().join("hosts");
        std::fs::write(&file, "guest-writable").unwrap();
        let d = SandboxDir::new(base.path(), "sb").unwrap();
        d.create().unwrap();
        d.create_container("c1").unwrap();
        std::fs::create_dir(d.container("c1").join("mounts")).unwrap();
        std::os::unix::fs::symlink(&victim, d.container("c1").join("mounts/0")).unwrap();
        let mut spec = json!({"mounts": [{"destination": "/etc/hosts", "type": "bind", "source": file, "options": ["rbind", "rw"]}]});
        let e = share_bind_mounts(&d, "c1", &mut spec)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c1") && e.contains("mount point") && e.contains("File exists"),
            "{e}"
        );
        std::fs::remove_dir_all(d.container("c1").join("mounts")).unwrap();
        std::os::unix::fs::symlink(victim_dir.path(), d.container("c1").join("mounts")).unwrap();
        let e = share_bind_mounts(&d, "c1", &mut spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c1"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret");
        assert!(crate::sandbox_dir::mounts_under(victim_dir.path()).is_empty());
        // A symlinked container directory is refused as well.
        std::os::unix::fs::symlink(victim_dir.path(), d.container("c2")).unwrap();
        let e = mount_rootfs(&d, "c2", &[], vol.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("c2"), "{e}");
        assert!(crate::sandbox_dir::mounts_under(victim_dir.path()).is_empty());
        d.destroy().unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret");
    }
}
