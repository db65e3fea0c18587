//! OCI seccomp profiles, compiled to BPF with `seccompiler` (rust-vmm, pure Rust; no
//! libseccomp in a static guest binary).
//!
//! seccompiler's filter has one action on match and one on mismatch, while an OCI profile
//! gives each rule its own action. The profile becomes a stack of filters, which the kernel
//! evaluates together, taking the most severe result (KILL > TRAP > ERRNO > TRACE > LOG >
//! ALLOW):
//! - for each action A other than ALLOW: "A on the rules with action A, else ALLOW";
//! - if the default action D is not ALLOW: "ALLOW on any rule, else D".
//!
//! A syscall no rule names gets D (every other filter allows it); one a rule names gets that
//! rule's action, because the "else D" filter allows it. Names unknown to this architecture's
//! table are skipped, as runc does.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, LinuxSyscall};

use serde_json::{json, Value};

/// Why a profile does not compile or install.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OCI action seccompiler has no equivalent of.
    #[error("seccomp action {0} is not supported — use one of SCMP_ACT_ALLOW, _ERRNO, _KILL, _KILL_THREAD, _KILL_PROCESS, _TRAP, _LOG, _TRACE")]
    Action(String),
    /// The action does not serialise (a bug here, not in the profile).
    #[error("naming the seccomp action: {0}")]
    ActionName(#[source] serde_json::Error),
    /// seccompiler refused the filters built from the profile.
    #[error("compiling the seccomp profile: {0}")]
    Compile(#[source] seccompiler::Error),
    /// A filter longer than a `sock_fprog` can say.
    #[error("the seccomp filter has {0} instructions, more than the kernel takes — merge rules or name fewer syscalls")]
    TooLong(usize),
    /// seccomp(SECCOMP_SET_MODE_FILTER) failed.
    #[error("installing the seccomp filter: {0} — without noNewPrivileges the process needs CAP_SYS_ADMIN until the filter is in")]
    Install(#[source] std::io::Error),
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<Value, Error> {
    let name = serde_json::to_value(a).map_err(Error::ActionName)?;
    Ok(match name.as_str().unwrap_or("") {
        "SCMP_ACT_ALLOW" => json!("allow"),
        "SCMP_ACT_ERRNO" => json!({ "errno": errno.unwrap_or(libc::EPERM as u32) }),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => json!("kill_thread"),
        "SCMP_ACT_KILL_PROCESS" => json!("kill_process"),
        "SCMP_ACT_TRAP" => json!("trap"),
        "SCMP_ACT_LOG" => json!("log"),
        "SCMP_ACT_TRACE" => json!({ "trace": errno.unwrap_or(0) }),
        other => return Err(Error::Action(other.to_string())),
    })
}

/// One OCI entry's argument conditions in seccompiler's JSON form (empty: unconditional).
fn conditions(sc: &LinuxSyscall) -> Vec<Value> {
    sc.args()
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .map(|a| {
            let (op, val) = match a.op() {
                LinuxSeccompOperator::ScmpCmpNe => (json!("ne"), a.value()),
                LinuxSeccompOperator::ScmpCmpLt => (json!("lt"), a.value()),
                LinuxSeccompOperator::ScmpCmpLe => (json!("le"), a.value()),
                LinuxSeccompOperator::ScmpCmpEq => (json!("eq"), a.value()),
                LinuxSeccompOperator::ScmpCmpGe => (json!("ge"), a.value()),
                LinuxSeccompOperator::ScmpCmpGt => (json!("gt"), a.value()),
                LinuxSeccompOperator::ScmpCmpMaskedEq => (
                    json!({ "masked_eq": a.value() }),
                    a.value_two().unwrap_or(0),
                ),
            };
            json!({ "index": a.index(), "type": "qword", "op": op, "val": val })
        })
        .collect()
}

/// Rules of one filter: per syscall, `None` = unconditional, else the alternatives (each an
/// AND of conditions). seccompiler reads "no conditions" as "match always" only when the
/// syscall has no conditional rule at all, so an unconditional entry absorbs the others.
#[derive(Default)]
struct Group(BTreeMap<String, Option<Vec<Vec<Value>>>>);

impl Group {
    fn add(&mut self, name: &str, conds: &[Value]) {
        let slot = self
            .0
            .entry(name.to_string())
            .or_insert_with(|| Some(Vec::new()));
        match (slot.as_mut(), conds.is_empty()) {
            (None, _) => {}
            (Some(_), true) => *slot = None,
            (Some(alts), false) => alts.push(conds.to_vec()),
        }
    }

    fn json(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for (name, alts) in &self.0 {
            match alts {
                None => out.push(json!({ "syscall": name })),
                Some(alts) => {
                    out.extend(alts.iter().map(|c| json!({ "syscall": name, "args": c })))
                }
            }
        }
        out
    }
}

/// The filters, in the seccompiler JSON form, skipping the `skip` names.
fn filters(p: &LinuxSeccomp, skip: &[String]) -> Result<Value, Error> {
    // A set: a fuzzed profile may name tens of thousands of unknown syscalls.
    let skip: std::collections::HashSet<&String> = skip.iter().collect();
    let default = action(p.default_action(), p.default_errno_ret())?;
    let mut by_action: BTreeMap<String, (Value, Group)> = BTreeMap::new();
    let mut all = Group::default();
    for sc in p.syscalls().as_deref().unwrap_or(&[]) {
        let a = action(sc.action(), sc.errno_ret())?;
        let conds = conditions(sc);
        for name in sc.names().iter().filter(|n| !skip.contains(*n)) {
            all.add(name, &conds);
            if a != json!("allow") {
                by_action
                    .entry(a.to_string())
                    .or_insert_with(|| (a.clone(), Group::default()))
                    .1
                    .add(name, &conds);
            }
        }
    }
    let mut out = serde_json::Map::new();
    for (i, (_, (a, g))) in by_action.into_iter().enumerate() {
        let rules = g.json();
        if !rules.is_empty() {
            out.insert(
                format!("f{i}"),
                json!({ "mismatch_action": "allow", "match_action": a, "filter": rules }),
            );
        }
    }
    if default != json!("allow") {
        out.insert(
            "default".into(),
            json!({ "mismatch_action": default, "match_action": "allow", "filter": all.json() }),
        );
    }
    Ok(Value::Object(out))
}

/// Whether seccompiler's x86_64 table knows `name`: probed once per name with a one-rule
/// filter, and remembered (up to [`KNOWN_CACHE`] names: a fuzzed profile's made-up names are
/// probed, not kept).
fn known(name: &str) -> bool {
    static CACHE: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let lock = || {
        cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if let Some(k) = lock().get(name) {
        return *k;
    }
    let probe = json!({ "p": { "mismatch_action": "allow", "match_action": "log", "filter": [{ "syscall": name }] } });
    let k = match seccompiler::compile_from_json(
        probe.to_string().as_bytes(),
        seccompiler::TargetArch::x86_64,
    ) {
        Ok(_) => true,
        // Any other complaint is the real compile's to report.
        Err(e) => unknown_name(&e.to_string()).is_none(),
    };
    let mut c = lock();
    if c.len() < KNOWN_CACHE {
        c.insert(name.to_string(), k);
    }
    k
}

/// The most syscall names [`known`] remembers (the x86_64 table has about 375; containerd's
/// default profile names 60 more of other architectures).
const KNOWN_CACHE: usize = 4096;

/// Compiles the profile; returns the BPF programs to install.
///
/// Names this architecture does not know are skipped (as runc does): found by [`known`] first,
/// so the profile compiles once. (Finding them from the compiler's errors, one name per
/// failed compile, compiled containerd's default profile 61 times: 0.37 s per container and
/// per exec in a debug build.)
pub fn compile(p: &LinuxSeccomp) -> Result<Vec<seccompiler::BpfProgram>, Error> {
    let mut skip: Vec<String> = p
        .syscalls()
        .iter()
        .flatten()
        .flat_map(|sc| sc.names())
        .filter(|n| !known(n))
        .cloned()
        .collect();
    skip.sort();
    skip.dedup();
    loop {
        let f = filters(p, &skip)?;
        let text = f.to_string();
        match seccompiler::compile_from_json(text.as_bytes(), seccompiler::TargetArch::x86_64) {
            Ok(map) => return Ok(map.into_values().filter(|p| !p.is_empty()).collect()),
            // The frontend's error type is private; its message names the syscall.
            Err(e) => match unknown_name(&e.to_string()) {
                Some(name) if !skip.contains(&name) => skip.push(name),
                _ => return Err(Error::Compile(e)),
            },
        }
    }
}

/// The syscall in seccompiler's "Invalid syscall name: NAME for given arch: …" message.
fn unknown_name(msg: &str) -> Option<String> {
    let rest = msg.split("Invalid syscall name: ").nth(1)?;
    Some(rest.split(" for given arch").next()?.to_string())
}

/// Compiles and installs the profile on the calling thread (inherited across execve).
///
/// Not through seccompiler's `apply_filter`, which sets no_new_privs first: a process whose
/// spec leaves `noNewPrivileges` off must keep it off (`NoNewPrivs: 0`, setuid binaries work),
/// as under runc, which tells libseccomp not to set it. Without it the kernel wants
/// CAP_SYS_ADMIN, which the helper has until the user switch (see `helper::exec_process`).
pub fn install(p: &LinuxSeccomp) -> Result<(), Error> {
    for prog in compile(p)? {
        let len = u16::try_from(prog.len()).map_err(|_| Error::TooLong(prog.len()))?;
        // seccompiler's `sock_filter` is the kernel's (repr(C): code, jt, jf, k), as libc's.
        let fprog = libc::sock_fprog {
            len,
            filter: prog.as_ptr().cast::<libc::sock_filter>().cast_mut(),
        };
        // SAFETY: the kernel copies `len` instructions from `filter`, which `prog` holds for the
        // call, and does not keep the pointer.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(Error::Install(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_becomes_a_stack_and_unknown_names_are_skipped() {
        let p: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["read","write","no_such_syscall"],"action":"SCMP_ACT_ALLOW"},
                {"names":["mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":13},
                {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]}]}"#,
        )
        .unwrap();
        let progs = compile(&p).unwrap();
        assert_eq!(
            progs.len(),
            2,
            "one errno(13) filter and the default filter"
        );
        let f = filters(&p, &["no_such_syscall".into()]).unwrap();
        assert_eq!(f["default"]["mismatch_action"], json!({"errno": 1}));
        assert_eq!(f["f0"]["match_action"], json!({"errno": 13}));
    }

    #[test]
    fn an_unconditional_entry_absorbs_conditional_ones_for_the_same_syscall() {
        let p: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"}]},
                {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                {"names":["clone"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]},
                {"names":["clone"],"action":"SCMP_ACT_ALLOW"}]}"#,
        )
        .unwrap();
        let f = filters(&p, &[]).unwrap();
        let rules = f["default"]["filter"].as_array().unwrap();
        let clone: Vec<&Value> = rules.iter().filter(|r| r["syscall"] == "clone").collect();
        assert_eq!(clone, vec![&json!({"syscall": "clone"})]);
        assert_eq!(
            rules
                .iter()
                .filter(|r| r["syscall"] == "personality")
                .count(),
            2
        );
        assert_eq!(compile(&p).unwrap().len(), 1);
    }
}
