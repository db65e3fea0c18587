//! The pure part of CreateContainer, ExecProcess and UpdateContainer: request bytes → a
//! checked OCI spec, process or resources, without touching the system. Everything a spec can
//! get wrong that the agent would otherwise find late (in the container helper, after a cgroup
//! and a process exist, as an INTERNAL "helper answered" error) or never (a value silently
//! turned into another) is refused here, as INVALID_ARGUMENT, naming the field as config.json
//! spells it (`process.args[2]`, `linux.sysctl["kernel.shmmax"]`, `mounts[3].destination`)
//! and why.
//!
//! What is refused, beyond what the OCI types refuse when parsing (with the field's JSON path):
//!
//! | field | refused when | because |
//! |---|---|---|
//! | `root`, `process` | missing | the container needs both |
//! | `process.args` | missing or empty; an entry with a NUL | execve |
//! | `process.env[i]` | a NUL; no `=`, or an empty name | execve; runc refuses the same |
//! | `process.cwd` | not absolute; a NUL | the OCI spec requires an absolute path |
//! | `process.rlimits[i]` | soft above hard | setrlimit(2) refuses it |
//! | `process.oomScoreAdj` | outside -1000..=1000 | the kernel's range |
//! | `process.user.additionalGids` | more than 65536 | the kernel's NGROUPS_MAX |
//! | `hostname` | longer than 64 bytes; a NUL | sethostname(2) |
//! | `mounts[i].destination` | not absolute; `..`; a NUL | it is resolved inside the rootfs |
//! | `mounts[i].source`, `.type`, `.options[j]` | a NUL; a bind without a source; data over a page | mount(2) |
//! | `linux.devices[i]` | path not absolute, `..`, a NUL; major/minor negative or past the kernel's 12/20 bits (b, c, u) | mknod(2) would make another node |
//! | `linux.sysctl` keys | not a dotted or slashed name of `[A-Za-z0-9_-]` parts | the key becomes a path under /proc/sys, which it must not leave |
//! | `linux.maskedPaths[i]`, `linux.readonlyPaths[i]` | not absolute; a NUL | resolved inside the rootfs |
//! | `linux.rootfsPropagation` | not a mount(8) propagation name | runc refuses it too |
//! | `linux.seccomp` | does not compile; a filter past the kernel's 4096 instructions | seccomp(2) |
//! | `linux.resources.devices` | a rule the device program cannot express | see `cgroup::devices` |
//!
//! Namespaces (`linux.namespaces`) depend on the sandbox's state: see
//! [`super::namespaces`].

use std::path::{Component, Path};

use oci_spec::runtime::{LinuxDeviceType, LinuxResources, Process, Spec};
use serde::de::DeserializeOwned;

/// The kernel's `HOST_NAME_MAX`.
const HOST_NAME_MAX: usize = 64;
/// The kernel's `NGROUPS_MAX`.
const NGROUPS_MAX: usize = 65536;
/// The kernel's `BPF_MAXINSNS`: the most instructions one classic BPF (seccomp) filter takes.
pub(crate) const BPF_MAXINSNS: usize = 4096;
/// mount(2) copies one page of file-system data.
const MOUNT_DATA_MAX: usize = 4095;
/// The kernel's dev_t as mknod(2) takes it: 12 bits of major, 20 of minor.
const MAJOR_MAX: i64 = (1 << 12) - 1;
const MINOR_MAX: i64 = (1 << 20) - 1;
/// How much of a refused value an error message shows.
const SHOWN: usize = 96;

/// Why a request's spec, process or resources are refused: each names the field as
/// config.json spells it and says why.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The bytes are not JSON (or not only JSON, or nested deeper than the parser's 128
    /// levels); `field` is where the parser was (the document itself: `spec`, `process`).
    #[error("{field}: not valid JSON ({message}) — send the OCI {what} as one JSON object")]
    NotJson {
        what: &'static str,
        field: String,
        message: String,
    },
    /// A field whose type, shape or value its OCI type does not take.
    #[error("{field}: {message}")]
    Type { field: String, message: String },
    /// A required field is missing.
    #[error("{field}: missing — {why}")]
    Missing { field: String, why: &'static str },
    /// A field's value is refused.
    #[error("{field} = {value}: {why}")]
    Value {
        field: String,
        value: String,
        why: String,
    },
}

type Result<T> = std::result::Result<T, SpecError>;

/// `s` as an error message shows it: quoted, and cut past [`SHOWN`] characters (a fuzzed
/// megabyte string must not become a megabyte console line).
pub fn shown(s: &str) -> String {
    let mut chars = s.char_indices();
    match chars.nth(SHOWN) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

fn cut(message: String) -> String {
    if message.chars().nth(2 * SHOWN).is_none() {
        return message;
    }
    let end = message
        .char_indices()
        .nth(2 * SHOWN)
        .map_or(message.len(), |(i, _)| i);
    format!("{}… ({} bytes in all)", &message[..end], message.len())
}

fn value(field: impl Into<String>, v: &str, why: impl Into<String>) -> SpecError {
    SpecError::Value {
        field: field.into(),
        value: shown(v),
        why: why.into(),
    }
}

fn path_value(field: impl Into<String>, p: &Path, why: impl Into<String>) -> SpecError {
    value(field, &p.to_string_lossy(), why)
}

/// Parses `json` as `T`; an error names the field by its JSON path under `root` (`""`: the
/// document is config.json itself) and says what the OCI type wanted there.
fn parse<T: DeserializeOwned>(json: &[u8], what: &'static str, root: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let t: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner();
        let path = e.path().to_string();
        let message = cut(inner.to_string());
        if inner.is_syntax() || inner.is_eof() {
            let field = match (root, path.as_str()) {
                (_, ".") => what.to_string(),
                ("", p) => p.to_string(),
                (r, p) if p.starts_with('[') => format!("{r}{p}"),
                (r, p) => format!("{r}.{p}"),
            };
            return SpecError::NotJson {
                what,
                field,
                message,
            };
        }
        let field = match (root, path.as_str()) {
            ("", ".") => format!("the {what} (top level)"),
            ("", p) => p.to_string(),
            (r, ".") => r.to_string(),
            (r, p) if p.starts_with('[') => format!("{r}{p}"),
            (r, p) => format!("{r}.{p}"),
        };
        SpecError::Type { field, message }
    })?;
    de.end().map_err(|e| SpecError::NotJson {
        what,
        field: what.to_string(),
        message: cut(e.to_string()),
    })?;
    Ok(t)
}

/// CreateContainer's `oci_spec_json`.
pub fn parse_spec(json: &[u8]) -> Result<Spec> {
    parse(json, "spec", "")
}

/// ExecProcess's `oci_process_json` (a spec's `process`).
pub(crate) fn parse_process(json: &[u8]) -> Result<Process> {
    parse(json, "process", "process")
}

/// UpdateContainer's `oci_resources_json` (a spec's `linux.resources`), checked as
/// [`check_resources`] does.
pub fn parse_resources(json: &[u8]) -> Result<LinuxResources> {
    let r = parse(json, "resources", "linux.resources")?;
    check_resources(&r)?;
    Ok(r)
}

fn no_nul(field: impl Into<String>, s: &str) -> Result<()> {
    if s.contains('\0') {
        return Err(value(
            field,
            s,
            "contains a NUL byte, which no system call passes on",
        ));
    }
    Ok(())
}

/// An absolute path without `..` and without NUL: a path as the container sees it, resolved
/// inside its rootfs.
fn container_path(field: &str, p: &Path, dotdot: bool) -> Result<()> {
    let s = p.to_string_lossy();
    no_nul(field, &s)?;
    if !p.is_absolute() {
        return Err(path_value(
            field,
            p,
            "a relative path — give an absolute path as the container sees it",
        ));
    }
    if !dotdot && p.components().any(|c| c == Component::ParentDir) {
        return Err(path_value(
            field,
            p,
            "must not contain `..` — give the path as the container sees it",
        ));
    }
    Ok(())
}

/// A spec's `process`, or an exec's; `at` is its field (`process`).
pub(crate) fn check_process(p: &Process, at: &str) -> Result<()> {
    let args = p.args().as_deref().unwrap_or(&[]);
    if args.is_empty() {
        return Err(SpecError::Missing {
            field: format!("{at}.args"),
            why: "the process needs at least the program to run",
        });
    }
    for (i, a) in args.iter().enumerate() {
        no_nul(format!("{at}.args[{i}]"), a)?;
    }
    for (i, e) in p.env().as_deref().unwrap_or(&[]).iter().enumerate() {
        let field = format!("{at}.env[{i}]");
        no_nul(&field, e)?;
        match e.split_once('=') {
            Some((name, _)) if !name.is_empty() => {}
            _ => return Err(value(field, e, "an environment entry is NAME=value")),
        }
    }
    // `..` in a cwd is resolved inside the root like any symlink there: allowed, as by runc.
    container_path(&format!("{at}.cwd"), p.cwd(), true)?;
    for (i, r) in p.rlimits().as_deref().unwrap_or(&[]).iter().enumerate() {
        if r.soft() > r.hard() {
            return Err(SpecError::Value {
                field: format!("{at}.rlimits[{i}]"),
                value: format!("{{soft: {}, hard: {}}}", r.soft(), r.hard()),
                why: format!("the soft limit of {} is above its hard limit", r.typ()),
            });
        }
    }
    if let Some(adj) = p.oom_score_adj() {
        if !(-1000..=1000).contains(&adj) {
            return Err(value(
                format!("{at}.oomScoreAdj"),
                &adj.to_string(),
                "outside the kernel's range -1000..=1000",
            ));
        }
    }
    if let Some(gids) = p.user().additional_gids() {
        if gids.len() > NGROUPS_MAX {
            return Err(value(
                format!("{at}.user.additionalGids"),
                &format!("[{} gids]", gids.len()),
                format!("more than the kernel's NGROUPS_MAX ({NGROUPS_MAX})"),
            ));
        }
    }
    Ok(())
}

/// A sysctl key as the path under /proc/sys it names: dotted (`net.ipv4.ip_forward`) or
/// slashed (`net/ipv4/conf/eth0.100/forwarding`, where a dot is part of a name) parts of
/// `[A-Za-z0-9_-]` (and `.` in the slashed form), never leaving /proc/sys.
pub(crate) fn sysctl_path(key: &str) -> Result<std::path::PathBuf> {
    let field = format!("linux.sysctl[{}]", shown(key));
    let bad = |why: &str| SpecError::Value {
        field: field.clone(),
        value: shown(key),
        why: why.to_string(),
    };
    let rel = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    let parts: Vec<&str> = rel.split('/').collect();
    let name_ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    };
    if parts.iter().any(|p| !name_ok(p)) {
        return Err(bad(
            "not a sysctl name: parts of [A-Za-z0-9_-] joined by `.` (or by `/`), which name a file under /proc/sys",
        ));
    }
    Ok(Path::new("/proc/sys").join(rel))
}

/// `linux.resources`: what the cgroup writes cannot express.
pub(crate) fn check_resources(r: &LinuxResources) -> Result<()> {
    if let Some(d) = r.devices().as_deref() {
        super::cgroup::devices::compile(d).map_err(|e| SpecError::Type {
            // The message names the rule: `linux.resources.devices[i]: …`.
            field: "linux.resources.devices".into(),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

/// Everything about a CreateContainer spec that does not depend on the sandbox's state
/// (namespaces do: [`super::namespaces`]).
pub(crate) fn check_spec(spec: &Spec) -> Result<()> {
    if spec.root().is_none() {
        return Err(SpecError::Missing {
            field: "root".into(),
            why: "the container needs a root (its path is the shared rootfs, whatever it says)",
        });
    }
    let process = spec.process().as_ref().ok_or(SpecError::Missing {
        field: "process".into(),
        why: "the container needs a process to run",
    })?;
    check_process(process, "process")?;
    if let Some(h) = spec.hostname() {
        no_nul("hostname", h)?;
        if h.len() > HOST_NAME_MAX {
            return Err(value(
                "hostname",
                h,
                format!("{} bytes, more than the kernel's {HOST_NAME_MAX}", h.len()),
            ));
        }
    }
    for (i, m) in spec.mounts().as_deref().unwrap_or(&[]).iter().enumerate() {
        container_path(&format!("mounts[{i}].destination"), m.destination(), false)?;
        if let Some(s) = m.source() {
            no_nul(format!("mounts[{i}].source"), &s.to_string_lossy())?;
        }
        if let Some(t) = m.typ() {
            no_nul(format!("mounts[{i}].type"), t)?;
        }
        let opts = m.options().as_deref().unwrap_or(&[]);
        for (j, o) in opts.iter().enumerate() {
            no_nul(format!("mounts[{i}].options[{j}]"), o)?;
        }
        let o = super::mounts::parse_options(opts);
        if (o.bind || m.typ().as_deref() == Some("bind")) && m.source().is_none() {
            return Err(SpecError::Missing {
                field: format!("mounts[{i}].source"),
                why: "a bind mount needs a source path in the guest",
            });
        }
        let data = o.data.join(",");
        if data.len() > MOUNT_DATA_MAX {
            return Err(value(
                format!("mounts[{i}].options"),
                &data,
                format!(
                    "{} bytes of file-system options, more than the page ({MOUNT_DATA_MAX} bytes) mount(2) takes",
                    data.len()
                ),
            ));
        }
    }
    let Some(linux) = spec.linux() else {
        return Ok(());
    };
    for (i, d) in linux.devices().as_deref().unwrap_or(&[]).iter().enumerate() {
        container_path(&format!("linux.devices[{i}].path"), d.path(), false)?;
        if d.typ() != LinuxDeviceType::P {
            for (what, n, max) in [
                ("major", d.major(), MAJOR_MAX),
                ("minor", d.minor(), MINOR_MAX),
            ] {
                if !(0..=max).contains(&n) {
                    return Err(value(
                        format!("linux.devices[{i}].{what}"),
                        &n.to_string(),
                        format!("outside 0..={max}, the {what} numbers the kernel's dev_t holds"),
                    ));
                }
            }
        }
    }
    for key in linux.sysctl().iter().flat_map(|s| s.keys()) {
        sysctl_path(key)?;
    }
    for (name, list) in [
        ("maskedPaths", linux.masked_paths()),
        ("readonlyPaths", linux.readonly_paths()),
    ] {
        for (i, p) in list.as_deref().unwrap_or(&[]).iter().enumerate() {
            container_path(&format!("linux.{name}[{i}]"), Path::new(p), true)?;
        }
    }
    if let Some(p) = linux.rootfs_propagation() {
        const KNOWN: [&str; 8] = [
            "shared",
            "rshared",
            "private",
            "rprivate",
            "slave",
            "rslave",
            "unbindable",
            "runbindable",
        ];
        if !KNOWN.contains(&p.as_str()) {
            return Err(value(
                "linux.rootfsPropagation",
                p,
                format!("not a propagation type: one of {}", KNOWN.join(", ")),
            ));
        }
    }
    if let Some(profile) = linux.seccomp() {
        let progs = super::seccomp::compile(profile).map_err(|e| SpecError::Type {
            field: "linux.seccomp".into(),
            message: e.to_string(),
        })?;
        if let Some(p) = progs.iter().find(|p| p.len() > BPF_MAXINSNS) {
            return Err(SpecError::Type {
                field: "linux.seccomp".into(),
                message: format!(
                    "the profile compiles to a filter of {} instructions, more than the kernel's {BPF_MAXINSNS} — merge rules or name fewer syscalls",
                    p.len()
                ),
            });
        }
    }
    if let Some(r) = linux.resources() {
        check_resources(r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> Spec {
        serde_json::from_value(v).unwrap()
    }

    fn minimal() -> serde_json::Value {
        json!({
            "ociVersion": "1.0.2",
            "root": { "path": "rootfs" },
            "process": { "user": { "uid": 0, "gid": 0 }, "args": ["sh"], "cwd": "/" }
        })
    }

    fn refused(v: serde_json::Value) -> String {
        check_spec(&spec(v)).unwrap_err().to_string()
    }

    #[test]
    fn a_type_error_names_the_json_path() {
        let e = parse_spec(
            br#"{"ociVersion":"1","process":{"user":{"uid":"root","gid":0},"cwd":"/"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("process.user.uid: invalid type: string \"root\", expected u32"),
            "{e}"
        );
        let e = parse_process(br#"{"user":{"uid":0,"gid":0},"cwd":"/","args":["a",7]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("process.args[1]: "), "{e}");
        let e = parse_spec(br#"{"ociVersion":"1"} trailing"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("spec: not valid JSON"), "{e}");
        // Deep nesting: an unknown field's is skipped without recursing (no stack overflow),
        // a typed field's is refused at its first level.
        let deep = |key: &str| {
            let n = 100_000;
            format!(r#"{{"{key}":{}1{}}}"#, "[".repeat(n), "]".repeat(n))
        };
        parse_spec(deep("x-unknown").as_bytes()).unwrap();
        let e = parse_spec(deep("hostname").as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("hostname: invalid type: sequence"), "{e}");
        let e = parse_spec(b"7").unwrap_err().to_string();
        assert!(
            e.starts_with("the spec (top level): invalid type: integer"),
            "{e}"
        );
    }

    #[test]
    fn an_oversized_value_is_shown_cut() {
        let long = "x".repeat(1 << 20);
        let e = parse_spec(
            format!(r#"{{"ociVersion":"1","process":{{"user":{{"uid":"{long}"}}}}}}"#).as_bytes(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.len() < 1000 && e.starts_with("process.user.uid: "),
            "{} bytes",
            e.len()
        );
        let mut v = minimal();
        v["hostname"] = json!(long);
        let e = refused(v);
        assert!(
            e.len() < 1000 && e.starts_with("hostname = \"xxx") && e.contains("1048576 bytes"),
            "{e}"
        );
    }

    #[test]
    fn process_fields_are_checked_before_the_helper_runs() {
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = minimal();
            f(&mut v);
            refused(v)
        };
        let e = with(&|v| v["process"]["args"] = json!([]));
        assert!(e.starts_with("process.args: missing"), "{e}");
        let e = with(&|v| v["process"]["args"] = json!(["sh", "a\u{0}b"]));
        assert!(
            e.starts_with("process.args[1] = ") && e.contains("NUL"),
            "{e}"
        );
        let e = with(&|v| v["process"]["env"] = json!(["PATH=/bin", "NOEQUALS"]));
        assert!(
            e.starts_with("process.env[1] = \"NOEQUALS\"") && e.contains("NAME=value"),
            "{e}"
        );
        let e = with(&|v| v["process"]["env"] = json!(["=x"]));
        assert!(e.starts_with("process.env[0]"), "{e}");
        let e = with(&|v| v["process"]["cwd"] = json!("relative/dir"));
        assert!(
            e.starts_with("process.cwd = \"relative/dir\": a relative path"),
            "{e}"
        );
        let e = with(&|v| {
            v["process"]["rlimits"] = json!([{ "type": "RLIMIT_NOFILE", "soft": 10, "hard": 5 }])
        });
        assert!(
            e.starts_with("process.rlimits[0]") && e.contains("RLIMIT_NOFILE"),
            "{e}"
        );
        let e = with(&|v| v["process"]["oomScoreAdj"] = json!(2_000_000));
        assert!(
            e.starts_with("process.oomScoreAdj = \"2000000\": outside"),
            "{e}"
        );
        // `..` in a cwd stays inside the root: allowed.
        let mut v = minimal();
        v["process"]["cwd"] = json!("/a/../b");
        check_spec(&spec(v)).unwrap();
    }

    #[test]
    fn missing_root_and_process_are_named() {
        let mut v = minimal();
        v.as_object_mut().unwrap().remove("root");
        assert!(refused(v).starts_with("root: missing"));
        let mut v = minimal();
        v.as_object_mut().unwrap().remove("process");
        assert!(refused(v).starts_with("process: missing"));
    }

    /// A sysctl key became `/proc/sys/` + the key with dots made slashes: a key with a `/`
    /// in front named any file of the guest (`Path::join` with an absolute path replaces).
    #[test]
    fn a_sysctl_key_cannot_leave_proc_sys() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/forwarding").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        for key in [
            "/etc/passwd",
            "net/../../etc",
            "",
            "kernel..shmmax",
            "a/./b",
            "a b",
            "x\0y",
            "net/",
        ] {
            let e = sysctl_path(key).unwrap_err().to_string();
            assert!(e.starts_with("linux.sysctl["), "{key:?}: {e}");
        }
        let mut v = minimal();
        v["linux"] = json!({ "sysctl": { "/init": "x" } });
        assert!(refused(v).starts_with("linux.sysctl[\"/init\"]"));
    }

    #[test]
    fn paths_devices_and_propagation_are_checked() {
        let with_linux = |l: serde_json::Value| {
            let mut v = minimal();
            v["linux"] = l;
            refused(v)
        };
        let e = with_linux(
            json!({ "devices": [{ "path": "/dev/x", "type": "c", "major": -1, "minor": 0 }] }),
        );
        assert!(
            e.starts_with("linux.devices[0].major = \"-1\": outside 0..=4095"),
            "{e}"
        );
        let e = with_linux(
            json!({ "devices": [{ "path": "/dev/x", "type": "b", "major": 8, "minor": 1_048_576 }] }),
        );
        assert!(e.starts_with("linux.devices[0].minor"), "{e}");
        let e = with_linux(
            json!({ "devices": [{ "path": "dev/x", "type": "c", "major": 1, "minor": 3 }] }),
        );
        assert!(e.starts_with("linux.devices[0].path"), "{e}");
        let e = with_linux(json!({ "maskedPaths": ["/proc/kcore", "proc/keys"] }));
        assert!(e.starts_with("linux.maskedPaths[1]"), "{e}");
        let e = with_linux(json!({ "rootfsPropagation": "sideways" }));
        assert!(
            e.starts_with("linux.rootfsPropagation = \"sideways\""),
            "{e}"
        );
        let mut v = minimal();
        v["mounts"] = json!([{ "destination": "/data", "type": "bind", "options": ["rbind"] }]);
        assert!(refused(v).starts_with("mounts[0].source: missing"));
        let mut v = minimal();
        v["mounts"] = json!([{ "destination": "/a/../../etc", "type": "tmpfs" }]);
        assert!(refused(v).starts_with("mounts[0].destination"));
        // A fifo has no numbers to check.
        let mut v = minimal();
        v["linux"] =
            json!({ "devices": [{ "path": "/dev/f", "type": "p", "major": -1, "minor": -1 }] });
        check_spec(&spec(v)).unwrap();
    }
}
