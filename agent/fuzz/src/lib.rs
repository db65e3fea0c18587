//! What the targets share: everything the agent does with an accepted request before it
//! touches the system, with the properties it must keep.

use husk_agent::container::{self, cgroup, exec, mounts, spec};
use oci_spec::runtime::Spec;

/// The exec process every accepted spec's container is given (`ctr task exec`'s shape).
pub const EXEC: &[u8] = include_bytes!("../specs/exec-ctr.json");

/// A refusal must say which field and why, in a bounded message.
pub fn check_refusal(e: &container::Error) {
    let msg = e.to_string();
    assert!(
        matches!(e, container::Error::Invalid { .. }),
        "a bad request is INVALID_ARGUMENT: {msg}"
    );
    assert!(msg.len() <= 1024, "a refusal of {} bytes", msg.len());
}

/// After `check_create` accepted `s`: namespaces with and without a sandbox, the cgroup
/// writes, the mount options, what the init helper reads back, an exec's configuration.
pub fn after_create(id: &str, s: &Spec) {
    let sandbox = container::namespaces(id, s, Some(7), || Ok("/proc/8/ns/pid".into()));
    let alone = container::namespaces(id, s, None, || Err(container::PidNamespaceError::NoSandbox));
    for r in [&sandbox, &alone] {
        if let Err(e) = r {
            check_refusal(e);
        }
    }
    if let Some(r) = s.linux().as_ref().and_then(|l| l.resources().as_ref()) {
        let _ = cgroup::resource_writes(r);
    }
    for m in s.mounts().as_deref().unwrap_or(&[]) {
        let _ = mounts::parse_options(m.options().as_deref().unwrap_or(&[]));
    }
    let again = serde_json::to_vec(s).expect("an accepted spec serialises");
    let back = spec::parse_spec(&again).expect("the helper reads the spec the agent accepted");
    assert_eq!(&back, s, "the helper reads what the agent checked");
    let inherited = exec::Inherited::from_spec(s);
    let p = container::check_exec(id, "e1", EXEC).expect("the real exec process is accepted");
    let cfg = exec::config(id, 8, &inherited, p, None, false);
    serde_json::to_vec(&cfg).expect("an exec configuration serialises");
}
