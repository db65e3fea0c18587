//! What an exec'd process (ExecProcess: `ctr task exec`, `kubectl exec`, CRI's ExecSync and
//! exec probes) gets: the same as under `runc exec`, from the container and from the
//! exec's own process spec. Without this an exec'd process ran unconfined next to confined
//! ones that could then ptrace it.

use oci_spec::runtime::{LinuxSeccomp, Process, Spec};
use serde::{Deserialize, Serialize};

use super::helper::ExecConfig;

/// What an exec takes from its container, kept from the container's spec at CreateContainer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Inherited {
    /// The container's seccomp profile; `None` if it has none (a privileged container's
    /// spec carries none).
    pub seccomp: Option<LinuxSeccomp>,
    /// The container's process spec: the defaults of an exec spec's missing fields.
    pub process: Option<Process>,
}

impl Inherited {
    pub fn from_spec(spec: &Spec) -> Self {
        Self {
            seccomp: spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
            process: spec.process().clone(),
        }
    }
}

/// The exec helper's configuration for `process` in the container. Each item is what
/// `runc exec` gives the process, and the agent's in-VM tests check each one
/// (`tests/tests/agent_vm_exec.rs`):
///
/// | what | from |
/// |---|---|
/// | seccomp filter | the container's `linux.seccomp` (none if it has none); installed last, before execve, or before the user switch without no_new_privs, as for the init |
/// | capabilities (bounding, effective, permitted, inheritable, ambient) | the exec spec's; the container's if the exec spec has none |
/// | no_new_privs | the exec spec's `noNewPrivileges`; the container's if the exec spec leaves it out (runc reads a missing one as false: every client copies the container's process, so they agree) |
/// | rlimits | the exec spec's; the container's if the exec spec has none |
/// | user: uid, gid, additional gids, umask | the exec spec's |
/// | cwd | the exec spec's, resolved inside the container's root |
/// | env, args, terminal, console size | the exec spec's (no merge with the container's env, as runc) |
/// | namespaces: mount (and so its root), pid, ipc, uts, net, cgroup | the container's init's |
/// | cgroup | the container's |
/// | oom_score_adj | the container's `process.oomScoreAdj` (an exec spec's own is ignored, as runc does) |
/// | AppArmor, SELinux | not applicable: the guest kernel has neither |
/// | sysctls, hostname, mounts | the container's, through its namespaces |
pub fn config(
    id: &str,
    init_pid: i32,
    inherited: &Inherited,
    mut process: Process,
    cgroup: Option<std::path::PathBuf>,
    terminal: bool,
) -> ExecConfig {
    if let Some(container) = &inherited.process {
        if process.capabilities().is_none() {
            process.set_capabilities(container.capabilities().clone());
        }
        if process.rlimits().as_ref().is_none_or(|r| r.is_empty()) {
            process.set_rlimits(container.rlimits().clone());
        }
        if process.no_new_privileges().is_none() {
            process.set_no_new_privileges(container.no_new_privileges());
        }
    }
    ExecConfig {
        id: id.into(),
        init_pid,
        process,
        cgroup,
        terminal,
        seccomp: inherited.seccomp.clone(),
        oom_score_adj: inherited.process.as_ref().and_then(|p| p.oom_score_adj()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container() -> Spec {
        serde_json::from_value(json!({
            "ociVersion": "1.0.2",
            "process": {
                "user": { "uid": 0, "gid": 0 }, "args": ["sleep"], "cwd": "/",
                "noNewPrivileges": true, "oomScoreAdj": 123,
                "capabilities": { "bounding": ["CAP_KILL"], "effective": ["CAP_KILL"] },
                "rlimits": [{ "type": "RLIMIT_NOFILE", "soft": 100, "hard": 200 }]
            },
            "linux": { "seccomp": { "defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                { "names": ["mkdir"], "action": "SCMP_ACT_ERRNO" } ] } }
        }))
        .unwrap()
    }

    fn process(v: serde_json::Value) -> Process {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn an_exec_gets_the_containers_filter_and_oom_score_and_its_defaults() {
        let inh = Inherited::from_spec(&container());
        let p = process(
            json!({ "user": { "uid": 5, "gid": 6 }, "args": ["id"], "cwd": "/tmp", "env": ["A=b"], "oomScoreAdj": -999 }),
        );
        let c = config("c", 42, &inh, p, None, false);
        assert!(c.seccomp.is_some(), "the container's seccomp profile");
        assert_eq!(
            c.oom_score_adj,
            Some(123),
            "the container's oom_score_adj, not the exec spec's"
        );
        assert_eq!(c.process.no_new_privileges(), Some(true));
        assert_eq!(c.process.rlimits().as_ref().unwrap()[0].soft(), 100);
        assert!(c
            .process
            .capabilities()
            .as_ref()
            .unwrap()
            .bounding()
            .as_ref()
            .unwrap()
            .contains(&oci_spec::runtime::Capability::Kill));
        assert_eq!((c.process.user().uid(), c.process.user().gid()), (5, 6));
        assert_eq!(c.process.cwd(), std::path::Path::new("/tmp"));
        assert_eq!(c.process.env().as_deref(), Some(&["A=b".to_string()][..]));
    }

    #[test]
    fn the_exec_specs_own_settings_win() {
        let inh = Inherited::from_spec(&container());
        let p = process(json!({
            "user": { "uid": 0, "gid": 0 }, "args": ["id"], "cwd": "/",
            "noNewPrivileges": false, "capabilities": { "bounding": ["CAP_CHOWN"] },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "soft": 7, "hard": 8 }]
        }));
        let c = config("c", 42, &inh, p, None, false);
        assert_eq!(c.process.no_new_privileges(), Some(false));
        assert_eq!(c.process.rlimits().as_ref().unwrap()[0].soft(), 7);
        let caps = c.process.capabilities().clone().unwrap();
        assert!(caps
            .bounding()
            .as_ref()
            .unwrap()
            .contains(&oci_spec::runtime::Capability::Chown));
        assert!(caps.effective().is_none());
    }

    #[test]
    fn a_container_without_a_filter_gives_none() {
        let inh = Inherited::from_spec(
            &serde_json::from_value(json!({ "ociVersion": "1.0.2" })).unwrap(),
        );
        let c = config(
            "c",
            42,
            &inh,
            process(json!({ "user": { "uid": 0, "gid": 0 }, "args": ["id"], "cwd": "/" })),
            None,
            false,
        );
        assert!(c.seccomp.is_none());
        assert_eq!(c.oom_score_adj, None);
    }
}
