//! Tier 3: a pod's security settings through containerd 1.6's CRI, checked with ExecSync, on
//! husk and runc side by side in one containerd (#16). In one privileged pod per runtime:
//! - seccomp `RuntimeDefault`: the filter is on (`Seccomp: 2`) and `unshare -r` is denied;
//! - seccomp `Localhost` (a profile file on the host) that denies `mkdir`: mkdir fails EPERM;
//! - a `Localhost` profile that denies `sethostname`, with `SYS_ADMIN` added: `hostname`
//!   fails EPERM (and succeeds in a container with `SYS_ADMIN` and no profile);
//! - a privileged container given that profile: containerd 1.6 drops a privileged
//!   container's profile, so no filter (`Seccomp: 0`) and `hostname` works;
//! - the privileged container's /dev: the host's device nodes containerd puts in the spec,
//!   by name, type and number, the same list as under runc (under husk the numbers mean the
//!   guest's drivers: a node of a device the VM lacks opens with ENXIO/ENODEV);
//! - `CAP_NET_ADMIN` added: `ip link add … type bridge` and `brctl addbr` work; without it
//!   (the default set) they are refused with EPERM; a privileged container can too.
//!
//! The outcomes must be equal on both runtimes, and each is also asserted as expected.

use std::time::Instant;

use husk_tests::cri::{sweep_cgroups, CriContainerd, CriPod};
use husk_tests::require_root;
use k8s_cri::v1::*;

fn cgroup_root() -> String {
    format!("husk-cri-sec-test-{}", std::process::id())
}

/// An allow-all profile (OCI/Docker JSON, as `localhost/<path>` takes) that denies `names`
/// with EPERM.
fn deny_profile(names: &[&str]) -> String {
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{ "names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": 1 }]
    })
    .to_string()
}

fn seccomp(profile_type: security_profile::ProfileType, path: &str) -> Option<SecurityProfile> {
    Some(SecurityProfile {
        profile_type: profile_type as i32,
        localhost_ref: path.into(),
    })
}

fn caps(add: &[&str]) -> Option<Capability> {
    Some(Capability {
        add_capabilities: add.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

/// What one runtime showed.
#[derive(Debug, PartialEq)]
struct Observed {
    default_seccomp: String,
    default_unshare_denied: bool,
    localhost_seccomp: String,
    localhost_mkdir: Outcome,
    sethostname_profile_with_sys_admin: Outcome,
    sethostname_no_profile_with_sys_admin: Outcome,
    privileged_seccomp: String,
    privileged_sethostname: Outcome,
    privileged_bridge: Outcome,
    net_admin_bridge: Outcome,
    net_admin_brctl: Outcome,
    plain_bridge: Outcome,
    plain_brctl: Outcome,
}

/// How a command ended: 0, refused with EPERM, or something else (with its output).
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok,
    Eperm,
    Other(i32, String),
}

fn outcome((code, out, err): (i32, String, String)) -> Outcome {
    match code {
        0 => Outcome::Ok,
        _ if err.contains("Operation not permitted") || out.contains("Operation not permitted") => {
            Outcome::Eperm
        }
        _ => Outcome::Other(code, format!("{out}{err}")),
    }
}

fn seccomp_line(pod: &CriPod, c: &str) -> String {
    let (code, out, err) = pod.exec(c, &["grep", "^Seccomp:", "/proc/self/status"]);
    assert_eq!(code, 0, "{}: {err}", pod.handler);
    out.trim().to_string()
}

const DEVICES: &str = "find /dev -type c -o -type b | sort | xargs stat -c '%n %F %t:%T'";

fn flow(cri: &CriContainerd, handler: &str, profiles: &tempfile::TempDir) -> (Observed, String) {
    let mkdir = profiles.path().join("deny-mkdir.json");
    let sethostname = profiles.path().join("deny-sethostname.json");
    let (mkdir, sethostname) = (mkdir.to_str().unwrap(), sethostname.to_str().unwrap());
    // A privileged container needs a privileged sandbox (containerd refuses it otherwise).
    let pod = CriPod::run(
        cri,
        &format!("{handler}-sec"),
        handler,
        &cgroup_root(),
        |c| {
            let sc = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
            sc.privileged = true;
        },
    )
    .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}\n{}", cri.log()));
    let sleep = ["sleep", "1000"];
    use security_profile::ProfileType::*;
    let start = |name: &str, sc: LinuxContainerSecurityContext| pod.start(name, &sleep, sc, vec![]);
    let default = start(
        "default",
        LinuxContainerSecurityContext {
            seccomp: seccomp(RuntimeDefault, ""),
            ..Default::default()
        },
    );
    let localhost = start(
        "localhost",
        LinuxContainerSecurityContext {
            seccomp: seccomp(Localhost, mkdir),
            ..Default::default()
        },
    );
    let sethost = start(
        "sethost",
        LinuxContainerSecurityContext {
            seccomp: seccomp(Localhost, sethostname),
            capabilities: caps(&["SYS_ADMIN"]),
            ..Default::default()
        },
    );
    let sys_admin = start(
        "sysadmin",
        LinuxContainerSecurityContext {
            capabilities: caps(&["SYS_ADMIN"]),
            ..Default::default()
        },
    );
    let privileged = start(
        "privileged",
        LinuxContainerSecurityContext {
            privileged: true,
            seccomp: seccomp(Localhost, sethostname),
            ..Default::default()
        },
    );
    let net_admin = start(
        "netadmin",
        LinuxContainerSecurityContext {
            capabilities: caps(&["NET_ADMIN"]),
            ..Default::default()
        },
    );
    let plain = start("plain", Default::default());

    let ex = |c: &str, cmd: &[&str]| outcome(pod.exec(c, cmd));
    let (code, _, _) = pod.exec(&default, &["unshare", "-r", "true"]);
    let observed = Observed {
        default_seccomp: seccomp_line(&pod, &default),
        default_unshare_denied: code != 0,
        localhost_seccomp: seccomp_line(&pod, &localhost),
        localhost_mkdir: ex(&localhost, &["mkdir", "/tmp/made"]),
        sethostname_profile_with_sys_admin: ex(&sethost, &["hostname", "blocked-name"]),
        sethostname_no_profile_with_sys_admin: ex(&sys_admin, &["hostname", "allowed-name"]),
        privileged_seccomp: seccomp_line(&pod, &privileged),
        privileged_sethostname: ex(&privileged, &["hostname", "privileged-name"]),
        privileged_bridge: ex(&privileged, &["ip", "link", "add", "brp", "type", "bridge"]),
        net_admin_bridge: ex(&net_admin, &["ip", "link", "add", "brn", "type", "bridge"]),
        net_admin_brctl: ex(&net_admin, &["brctl", "addbr", "brc"]),
        plain_bridge: ex(&plain, &["ip", "link", "add", "brx", "type", "bridge"]),
        plain_brctl: ex(&plain, &["brctl", "addbr", "bry"]),
    };
    // The bridges exist in the pod's network namespace (the pod's, shared by its containers).
    let (code, links, err) = pod.exec(&plain, &["ip", "-o", "link", "show"]);
    assert_eq!(code, 0, "{handler}: {err}");
    for br in ["brp", "brn", "brc"] {
        assert!(
            links.contains(&format!(": {br}:")),
            "{handler}: {br} missing:\n{links}"
        );
    }
    let (code, devices, err) = pod.exec(&privileged, &["sh", "-c", DEVICES]);
    assert_eq!(code, 0, "{handler}: listing /dev: {err}");
    pod.remove();
    (observed, devices)
}

#[test]
fn seccomp_privileged_and_net_admin_alike_on_husk_and_runc() {
    require_root("CRI pods need root (containerd, netns, mounts)");
    let _sweep = Sweep;
    let profiles = tempfile::tempdir().unwrap();
    std::fs::write(
        profiles.path().join("deny-mkdir.json"),
        deny_profile(&["mkdir", "mkdirat"]),
    )
    .unwrap();
    std::fs::write(
        profiles.path().join("deny-sethostname.json"),
        deny_profile(&["sethostname"]),
    )
    .unwrap();
    let cri = CriContainerd::start();
    let started = Instant::now();
    let (runc, runc_dev) = flow(&cri, "runc", &profiles);
    let expected = Observed {
        default_seccomp: "Seccomp:\t2".into(),
        default_unshare_denied: true,
        localhost_seccomp: "Seccomp:\t2".into(),
        localhost_mkdir: Outcome::Eperm,
        sethostname_profile_with_sys_admin: Outcome::Eperm,
        sethostname_no_profile_with_sys_admin: Outcome::Ok,
        privileged_seccomp: "Seccomp:\t0".into(),
        privileged_sethostname: Outcome::Ok,
        privileged_bridge: Outcome::Ok,
        net_admin_bridge: Outcome::Ok,
        net_admin_brctl: Outcome::Ok,
        plain_bridge: Outcome::Eperm,
        plain_brctl: Outcome::Eperm,
    };
    assert_eq!(runc, expected, "runc's baseline");
    let (husk, husk_dev) = flow(&cri, "husk", &profiles);
    assert_eq!(husk, runc, "husk differs from runc");
    // The host's devices, as containerd listed them for each container (the host's /dev can
    // change between the two runs only by devices other tests add: none of ours).
    assert!(
        runc_dev.contains("/dev/null character special file 1:3"),
        "runc's /dev:\n{runc_dev}"
    );
    assert_eq!(
        husk_dev, runc_dev,
        "the privileged container's /dev differs"
    );
    eprintln!("both runtimes in {:?}", started.elapsed());
}

struct Sweep;

impl Drop for Sweep {
    fn drop(&mut self) {
        sweep_cgroups(&cgroup_root());
    }
}
