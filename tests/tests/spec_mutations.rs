//! The spec mutation run (#13): 10,000 OCI specs derived from real ones — `ctr`'s default spec
//! and one with `--seccomp`, both captured from containerd 1.6, and CRI's pod sandbox and app
//! container specs in containerd 1.6's shape (`agent/fuzz/specs/`) — with fields deleted,
//! retyped, oversized, paths with `..`, NULs, relative and absolute, huge and negative numbers,
//! deep nesting and grafted entries the fixtures lack (devices, sysctls, rlimits, namespaces,
//! hooks, unified keys …), plus 2,000 mutated exec processes. Each goes through what the shim
//! does with a config.json (parse, `sandbox_of`, `host_namespaces`, `size_for`, `netns_path`,
//! the bind-mount plan) and through the agent's request handling without a guest (the request
//! encoded and decoded as ttrpc's protobuf, `check_create`, `namespaces`, the cgroup writes,
//! the exec configuration, the helper's config round trip, `check_exec`, `parse_resources`).
//!
//! Asserted: no panic anywhere; every refusal names the field (its JSON path or OCI key) that
//! the mutation touched (or one of its parents or children) and says why; no message is longer
//! than [`MAX_MESSAGE`] whatever the input; every real spec passes unmutated; what the agent
//! accepts, it can hand to its helper and read back.
//!
//! No VM, no root. Deterministic: the seed is fixed (`HUSK_MUTATION_SEED` overrides it,
//! `HUSK_MUTATIONS` the count), and a failure prints its seed, index and mutations.
//! Executions and findings are recorded in agent/fuzz/README.md.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use husk_agent::container::{self, cgroup, exec, mounts, spec};
use husk_protocols::agent::{CreateContainerRequest, ExecProcessRequest};
use husk_protocols::protobuf::Message;
use husk_shim::{config::Config, network, sandbox, sandbox_dir::SandboxDir, share};
use serde_json::{json, Map, Value};

const SPECS: [(&str, &str); 4] = [
    (
        "ctr-default",
        include_str!("../../agent/fuzz/specs/ctr-default.json"),
    ),
    (
        "ctr-seccomp",
        include_str!("../../agent/fuzz/specs/ctr-seccomp.json"),
    ),
    (
        "cri-sandbox",
        include_str!("../../agent/fuzz/specs/cri-sandbox.json"),
    ),
    (
        "cri-container",
        include_str!("../../agent/fuzz/specs/cri-container.json"),
    ),
];
const EXECS: [(&str, &str); 2] = [
    (
        "exec-ctr",
        include_str!("../../agent/fuzz/specs/exec-ctr.json"),
    ),
    (
        "exec-cri",
        include_str!("../../agent/fuzz/specs/exec-cri.json"),
    ),
];

const DEFAULT_SEED: u64 = 0x6875_736b_2331_3300; // "husk#13\0"
const DEFAULT_SPECS: usize = 10_000;
/// The longest refusal message allowed, whatever the input's size.
const MAX_MESSAGE: usize = 1024;
/// ttrpc's largest message: a bigger spec never reaches the agent.
const MAX_SPEC_BYTES: usize = 4 << 20;

/// splitmix64: small, fast, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap()).unwrap()
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Idx(usize),
}

/// A JSON path as the messages spell it: `linux.namespaces[2].type` (keys joined by `.`, so
/// `linux.sysctl["net.ipv4.x"]` and `annotation io.husk.x` normalise to the same text).
fn shown(root: &str, path: &[Seg]) -> String {
    let mut s = root.to_string();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Idx(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn get_mut<'a>(v: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    let mut cur = v;
    for seg in path {
        cur = match seg {
            Seg::Key(k) => cur.as_object_mut()?.get_mut(k)?,
            Seg::Idx(i) => cur.as_array_mut()?.get_mut(*i)?,
        };
    }
    Some(cur)
}

/// Every node's path (the root's is empty), depth first.
fn paths(v: &Value, at: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                at.push(Seg::Key(k.clone()));
                paths(c, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                at.push(Seg::Idx(i));
                paths(c, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

/// Entries the real specs lack, grafted at their place: (parent path, key or `[]` to append,
/// value).
fn grafts() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "linux",
            "devices",
            json!([{ "path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438, "uid": 0, "gid": 0 }]),
        ),
        (
            "linux",
            "devices",
            json!([{ "path": "/dev/sda", "type": "b", "major": 8, "minor": 0 }, { "path": "/dev/fifo", "type": "p", "major": 0, "minor": 0 }]),
        ),
        (
            "linux",
            "sysctl",
            json!({ "kernel.shm_rmid_forced": "1", "net.ipv4.conf.all.forwarding": "0" }),
        ),
        (
            "linux",
            "sysctl",
            json!({ "net/ipv4/conf/eth0.100/forwarding": "1" }),
        ),
        (
            "process",
            "rlimits",
            json!([{ "type": "RLIMIT_CORE", "soft": 0, "hard": 0 }, { "type": "RLIMIT_NPROC", "soft": 64, "hard": 128 }]),
        ),
        (
            "linux",
            "namespaces",
            json!([{ "type": "pid" }, { "type": "mount" }, { "type": "network" }, { "type": "ipc" }, { "type": "uts" }, { "type": "cgroup" }]),
        ),
        ("linux.namespaces", "[]", json!({ "type": "user" })),
        ("linux.namespaces", "[]", json!({ "type": "time" })),
        (
            "linux.namespaces",
            "[]",
            json!({ "type": "cgroup", "path": "/proc/1/ns/cgroup" }),
        ),
        (
            "linux.namespaces",
            "[]",
            json!({ "type": "mount", "path": "/proc/1/ns/mnt" }),
        ),
        (
            "linux",
            "uidMappings",
            json!([{ "containerID": 0, "hostID": 100000, "size": 65536 }]),
        ),
        (
            "",
            "hooks",
            json!({ "prestart": [{ "path": "/usr/bin/true", "args": ["true"], "timeout": 5 }] }),
        ),
        (
            "linux.resources",
            "unified",
            json!({ "memory.high": "100000000", "io.weight": "100", "cgroup.procs": "1" }),
        ),
        (
            "linux.resources",
            "memory",
            json!({ "limit": 1048576, "swap": 2097152, "reservation": 524288 }),
        ),
        ("linux.resources", "pids", json!({ "limit": 100 })),
        (
            "linux.resources",
            "cpu",
            json!({ "shares": 1024, "quota": -1, "period": 100000, "cpus": "0-1", "mems": "0" }),
        ),
        (
            "linux.resources",
            "devices",
            json!([{ "allow": true, "type": "c", "major": 10, "minor": 200, "access": "rwm" }]),
        ),
        ("annotations", "io.husk.extra-vcpus", json!("2")),
        ("annotations", "io.husk.extra-memory-mib", json!("128")),
        ("annotations", "io.husk.not-enabled", json!("1")),
        ("annotations", "io.husk.sandbox-id", json!("another-pod")),
        (
            "annotations",
            "io.kubernetes.cri.container-type",
            json!("sandbox"),
        ),
        (
            "mounts",
            "[]",
            json!({ "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=65536k"] }),
        ),
        (
            "mounts",
            "[]",
            json!({ "destination": "/vol", "type": "bind", "source": "/var/lib/kubelet/pods/x/volumes/v", "options": ["bind", "ro", "rslave"] }),
        ),
        (
            "linux",
            "seccomp",
            json!({ "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "syscalls": [{ "names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW" }, { "names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{ "index": 0, "value": 8, "op": "SCMP_CMP_EQ" }] }] }),
        ),
        ("linux", "rootfsPropagation", json!("rslave")),
        (
            "process",
            "consoleSize",
            json!({ "height": 24, "width": 80 }),
        ),
        ("process", "oomScoreAdj", json!(-1000)),
        ("process.user", "umask", json!(18)),
        ("", "hostname", json!("pod-a")),
        ("linux", "personality", json!({ "domain": "LINUX" })),
        ("linux", "intelRdt", json!({ "closID": "x" })),
    ]
}

const SPECIAL_STRINGS: [&str; 14] = [
    "",
    " ",
    ".",
    "..",
    "/",
    "\u{0}",
    "a\u{0}b",
    "é\u{202e}",
    "-1",
    "0x10",
    "1e3",
    "max",
    "NaN",
    "SCMP_ACT_NOTIFY",
];
const PATH_EDITS: [&str; 12] = [
    "../",
    "/../../..",
    "\u{0}",
    "relative",
    "/",
    "",
    ".",
    "..",
    "/proc/self/fd/3",
    "//x//",
    "/a/./b",
    "/run/husk/shared/../../etc",
];
const NUMBERS: [&str; 12] = [
    "18446744073709551615",
    "-9223372036854775808",
    "9223372036854775807",
    "-1",
    "0",
    "4294967296",
    "2147483648",
    "1e300",
    "-0.0",
    "1.5",
    "65536",
    "-4294967297",
];

/// Deep nesting goes in after serialisation (a deeply nested `Value` would overflow the
/// test's own stack when dropped): the placeholder string is replaced by the nesting.
const DEEP: &str = "\u{1}DEEP\u{1}";

/// One mutation of `v`; returns the path it touched, as text.
fn mutate(rng: &mut Rng, v: &mut Value, root: &str, depth: &mut Option<usize>) -> Option<String> {
    let kind = rng.below(100);
    // A graft: an entry the fixtures lack.
    if kind < 14 {
        let all = grafts();
        let (parent, key, val) = rng.pick(&all).clone();
        let parent_path: Vec<Seg> = parent
            .split('.')
            .filter(|s| !s.is_empty())
            .map(|s| Seg::Key(s.to_string()))
            .collect();
        // Make the parents when they are missing.
        let mut cur = &mut *v;
        for seg in &parent_path {
            let Seg::Key(k) = seg else { unreachable!() };
            let obj = cur.as_object_mut()?;
            cur = obj.entry(k.clone()).or_insert_with(|| {
                if k == "namespaces" || k == "mounts" {
                    json!([])
                } else {
                    json!({})
                }
            });
        }
        let mut touched = parent_path.clone();
        if key == "[]" {
            let a = cur.as_array_mut()?;
            touched.push(Seg::Idx(a.len()));
            a.push(val);
        } else {
            cur.as_object_mut()?.insert(key.to_string(), val);
            touched.push(Seg::Key(key.to_string()));
        }
        return Some(shown(root, &touched));
    }
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let path = rng.pick(&all).clone();
    let at = shown(root, &path);
    if kind < 26 {
        // Delete.
        let (last, parent) = path.split_last()?;
        let p = get_mut(v, parent)?;
        match (last, p) {
            (Seg::Key(k), Value::Object(m)) => {
                m.remove(k);
            }
            (Seg::Idx(i), Value::Array(a)) => {
                a.remove(*i);
                // Every later element moved: the array is what was touched.
                return Some(shown(root, parent));
            }
            _ => return None,
        }
        return Some(at);
    }
    let node = get_mut(v, &path)?;
    let old = node.clone();
    *node = match kind {
        // Retype.
        26..=41 => {
            let choices = [
                Value::Null,
                json!(true),
                json!(0),
                json!(-1),
                json!("str"),
                json!([]),
                json!({}),
                json!(1.5),
                json!(["a"]),
                json!({ "k": "v" }),
            ];
            let mut c = rng.pick(&choices).clone();
            while std::mem::discriminant(&c) == std::mem::discriminant(&old) {
                c = rng.pick(&choices).clone();
            }
            c
        }
        // Huge, negative, fractional numbers.
        42..=55 => {
            let n: &&str = rng.pick(&NUMBERS);
            serde_json::from_str(n).unwrap()
        }
        // Oversized strings.
        56..=63 => {
            let n = if rng.chance(3) {
                1 << 20
            } else {
                *rng.pick(&[64, 65, 256, 4096, 65_537])
            };
            let base = old.as_str().unwrap_or("A");
            let unit = if base.is_empty() { "A" } else { base };
            Value::String(unit.repeat(n / unit.len().max(1) + 1))
        }
        // Oversized arrays: an element repeated.
        64..=70 => {
            let Value::Array(a) = &old else { return None };
            let first = a.first().cloned().unwrap_or(json!("x"));
            let n = *rng.pick(&[2, 100, 5_000, 66_000]);
            Value::Array(vec![first; n])
        }
        // Path edits on strings.
        71..=84 => {
            let Value::String(s) = &old else { return None };
            let edit = *rng.pick(&PATH_EDITS);
            Value::String(match rng.below(4) {
                0 => format!("{edit}{s}"),
                1 => format!("{s}{edit}"),
                2 => s.trim_start_matches('/').to_string(),
                _ => edit.to_string(),
            })
        }
        // Special strings.
        85..=91 => Value::String(rng.pick(&SPECIAL_STRINGS).to_string()),
        // Deep nesting (below and past serde_json's 128 levels).
        92..=95 if depth.is_none() => {
            *depth = Some(*rng.pick(&[10, 127, 129, 300, 100_000]));
            Value::String(DEEP.into())
        }
        // An unknown key.
        _ => {
            if let Value::Object(m) = &old {
                let mut m: Map<String, Value> = m.clone();
                m.insert("x-unknown".into(), json!({ "nested": [1, "two", null] }));
                Value::Object(m)
            } else {
                return None;
            }
        }
    };
    Some(at)
}

/// A mutated document: its bytes and the paths the mutations touched.
struct Mutant {
    bytes: Vec<u8>,
    touched: Vec<String>,
}

fn mutant(rng: &mut Rng, base: &Value, root: &str) -> Mutant {
    loop {
        let mut v = base.clone();
        let mut depth = None;
        let mut touched = Vec::new();
        for _ in 0..1 + rng.below(3) {
            if let Some(t) = mutate(rng, &mut v, root, &mut depth) {
                touched.push(t);
            }
        }
        if touched.is_empty() {
            continue;
        }
        let mut text = serde_json::to_string(&v).unwrap();
        if let Some(d) = depth {
            let placeholder = serde_json::to_string(DEEP).unwrap();
            text = text.replacen(
                &placeholder,
                &format!("{}1{}", "[".repeat(d), "]".repeat(d)),
                1,
            );
        }
        if text.len() > MAX_SPEC_BYTES {
            continue;
        }
        return Mutant {
            bytes: text.into_bytes(),
            touched,
        };
    }
}

/// The field a refusal names: the text before its first `: ` or ` = `, normalised as
/// [`shown`] spells paths.
fn named_field(message: &str) -> String {
    let end = [message.find(": "), message.find(" = ")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(message.len());
    let f = &message[..end];
    let f = f
        .strip_prefix("annotation ")
        .map_or_else(|| f.to_string(), |k| format!("annotations.{k}"));
    f.replace("[\"", ".")
        .replace("\"]", "")
        .replace("\\\"", "\"")
}

fn related(named: &str, touched: &str) -> bool {
    let under = |a: &str, b: &str| {
        a == b || (a.starts_with(b) && matches!(a.as_bytes().get(b.len()), Some(b'.' | b'[')))
    };
    // A mutation that deletes or retypes a parent makes the parent's missing field the one
    // named (`process: missing field `cwd``), and one below a named field belongs to it.
    // Annotations act together (a CRI container-type makes io.husk.sandbox-id refused).
    touched.is_empty() // the document itself: retyped, or everything deleted
        || under(named, touched)
        || under(touched, named)
        || (named.starts_with("annotations.") && under(touched, "annotations"))
        || (touched == "annotations" && named.starts_with("annotations"))
}

#[derive(Default)]
struct Tally {
    runs: usize,
    accepted: usize,
    refused: usize,
    failures: Vec<String>,
}

impl Tally {
    /// Checks one refusal: it names a field the mutations touched (or a parent or child of
    /// one), says why, and is not oversized.
    fn refusal(&mut self, ctx: &str, layer: &str, message: &str, touched: &[String]) {
        self.refused += 1;
        let named = named_field(message);
        let why = message.len() > named.len() + 10;
        let ok_field = touched.iter().any(|t| related(&named, t));
        if !ok_field || !why || message.len() > MAX_MESSAGE {
            self.failures.push(format!(
                "{ctx}: {layer} refused without naming a touched field and why ({} bytes; named {named:?}; touched {touched:?}): {}",
                message.len(),
                spec::shown(message)
            ));
        }
    }

    fn panicked(&mut self, ctx: &str, layer: &str, p: Box<dyn std::any::Any + Send>) {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        self.failures
            .push(format!("{ctx}: {layer} PANICKED: {msg}"));
    }
}

fn quiet<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    catch_unwind(AssertUnwindSafe(f))
}

fn config() -> Config {
    Config {
        max_vcpus: 8,
        max_memory_mib: 8192,
        ..Config::default()
    }
}

/// What the shim does with a config.json before the VM exists.
fn shim_side(t: &mut Tally, ctx: &str, m: &Mutant) {
    let r = quiet(|| -> Vec<(&'static str, String)> {
        let mut refusals = Vec::new();
        let v = match share::parse_spec(&m.bytes, "c1") {
            Ok(v) => v,
            Err(e) => return vec![("shim parse", strip_cid(&e.to_string()))],
        };
        match share::sandbox_of(&v) {
            Ok(Some(sid)) => {
                if let Err(e) = SandboxDir::new(std::path::Path::new("/run/husk"), &sid) {
                    // The grouping names a sandbox id the state directory cannot hold.
                    refusals.push((
                        "shim sandbox id",
                        format!("annotations.io.kubernetes.cri.sandbox-id: {e}"),
                    ));
                }
            }
            Ok(None) => {}
            Err(e) => refusals.push(("shim sandbox_of", e.to_string())),
        }
        if let Err(e) = sandbox::host_namespaces(&v) {
            refusals.push(("shim host_namespaces", e));
        }
        if let Err(e) = sandbox::size_for(&config(), &v) {
            refusals.push(("shim size_for", e));
        }
        let _ = network::netns_path(&v);
        if let Err(e) = share::bind_plan("c1", &v) {
            refusals.push(("shim bind_plan", strip_cid(&e.to_string())));
        }
        refusals
    });
    match r {
        Ok(refusals) if refusals.is_empty() => t.accepted += 1,
        Ok(refusals) => {
            for (layer, msg) in refusals {
                t.refusal(ctx, layer, &msg, &m.touched);
            }
        }
        Err(p) => t.panicked(ctx, "shim", p),
    }
}

/// The shim's `c1: config.json: …` prefix.
fn strip_cid(s: &str) -> String {
    let s = s.strip_prefix("c1: ").unwrap_or(s);
    s.strip_prefix("config.json: ").unwrap_or(s).to_string()
}

fn invalid_what(e: &container::Error) -> String {
    match e {
        container::Error::Invalid { what, .. } => what.clone(),
        other => format!("not INVALID_ARGUMENT: {other}"),
    }
}

/// What the agent does with a CreateContainer request before touching the system.
fn agent_create(t: &mut Tally, ctx: &str, m: &Mutant, exec_base: &[u8]) {
    let r = quiet(|| -> Result<(), (&'static str, String)> {
        let req = CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec_json: m.bytes.clone(),
            terminal: false,
            ..Default::default()
        };
        let wire = req
            .write_to_bytes()
            .map_err(|e| ("encode", e.to_string()))?;
        let req = CreateContainerRequest::parse_from_bytes(&wire)
            .map_err(|e| ("decode", e.to_string()))?;
        let s = container::check_create(&req.container_id, &req.oci_spec_json)
            .map_err(|e| ("agent check_create", invalid_what(&e)))?;
        container::namespaces("c1", &s, Some(7), || Ok("/proc/8/ns/pid".into()))
            .map_err(|e| ("agent namespaces", invalid_what(&e)))?;
        if let Some(r) = s.linux().as_ref().and_then(|l| l.resources().as_ref()) {
            let _ = cgroup::resource_writes(r);
        }
        for mnt in s.mounts().as_deref().unwrap_or(&[]) {
            let _ = mounts::parse_options(mnt.options().as_deref().unwrap_or(&[]));
        }
        // What the init helper gets, it must read back and find as good.
        let again = serde_json::to_vec(&s).expect("a checked spec serialises");
        let back = spec::parse_spec(&again).expect("the helper reads the spec the agent accepted");
        assert_eq!(
            back, s,
            "the spec the helper reads is the one the agent checked"
        );
        let inherited = exec::Inherited::from_spec(&s);
        let p = container::check_exec("c1", "e1", exec_base)
            .expect("the real exec process is accepted");
        let cfg = exec::config("c1", 8, &inherited, p, None, false);
        let _ = serde_json::to_vec(&cfg).expect("an exec config serialises");
        Ok(())
    });
    match r {
        Ok(Ok(())) => t.accepted += 1,
        Ok(Err((layer, msg))) => t.refusal(ctx, layer, &msg, &m.touched),
        Err(p) => t.panicked(ctx, "agent create", p),
    }
}

/// UpdateContainer with the mutated spec's `linux.resources`, when it has any.
fn agent_update(t: &mut Tally, ctx: &str, m: &Mutant) {
    let Ok(v) = serde_json::from_slice::<Value>(&m.bytes) else {
        return;
    };
    let Some(res) = v.get("linux").and_then(|l| l.get("resources")) else {
        return;
    };
    let bytes = serde_json::to_vec(res).unwrap();
    let r = quiet(|| spec::parse_resources(&bytes).map(|r| cgroup::resource_writes(&r).len()));
    match r {
        Ok(Ok(_)) => t.accepted += 1,
        Ok(Err(e)) => t.refusal(ctx, "agent parse_resources", &e.to_string(), &m.touched),
        Err(p) => t.panicked(ctx, "agent update", p),
    }
}

/// What the agent does with an ExecProcess request before touching the system.
fn agent_exec(t: &mut Tally, ctx: &str, m: &Mutant, inherited: &exec::Inherited) {
    let r = quiet(|| -> Result<(), (&'static str, String)> {
        let req = ExecProcessRequest {
            container_id: "c1".into(),
            exec_id: "e1".into(),
            oci_process_json: m.bytes.clone(),
            ..Default::default()
        };
        let wire = req
            .write_to_bytes()
            .map_err(|e| ("encode", e.to_string()))?;
        let req =
            ExecProcessRequest::parse_from_bytes(&wire).map_err(|e| ("decode", e.to_string()))?;
        let p = container::check_exec(&req.container_id, &req.exec_id, &req.oci_process_json)
            .map_err(|e| {
                let what = invalid_what(&e);
                (
                    "agent check_exec",
                    what.strip_prefix("exec e1: ").unwrap_or(&what).to_string(),
                )
            })?;
        let terminal = p.terminal().unwrap_or(false);
        let cfg = exec::config("c1", 8, inherited, p, None, terminal);
        let json = serde_json::to_vec(&cfg).expect("an exec config serialises");
        let _: husk_agent::container::helper::ExecConfig =
            serde_json::from_slice(&json).expect("the exec helper reads its config back");
        Ok(())
    });
    match r {
        Ok(Ok(())) => t.accepted += 1,
        Ok(Err((layer, msg))) => t.refusal(ctx, layer, &msg, &m.touched),
        Err(p) => t.panicked(ctx, "agent exec", p),
    }
}

/// Spec `i` of the run (and, for every fifth, an exec process), from its own generator.
fn one(
    t: &mut Tally,
    seed: u64,
    i: usize,
    specs: &[(&str, Value)],
    execs: &[(&str, Value)],
    inherited: &[exec::Inherited],
    exec_base: &[u8],
) {
    let mut rng = Rng(seed
        ^ u64::try_from(i)
            .unwrap()
            .wrapping_mul(0xa076_1d64_78bd_642f));
    let (name, base) = rng.pick(specs);
    let m = mutant(&mut rng, base, "");
    let ctx = format!(
        "seed {seed:#x} spec #{i} ({name}, mutations {:?})",
        m.touched
    );
    shim_side(t, &ctx, &m);
    agent_create(t, &ctx, &m, exec_base);
    agent_update(t, &ctx, &m);
    t.runs += 1;
    if i % 5 == 0 {
        let (ename, ebase) = rng.pick(execs);
        let m = mutant(&mut rng, ebase, "process");
        let ctx = format!(
            "seed {seed:#x} exec #{i} ({ename}, mutations {:?})",
            m.touched
        );
        agent_exec(t, &ctx, &m, rng.pick(inherited));
        t.runs += 1;
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn ten_thousand_mutated_specs_are_refused_by_name_or_accepted_never_panic() {
    let seed = env_or("HUSK_MUTATION_SEED", DEFAULT_SEED);
    let count: usize = env_or("HUSK_MUTATIONS", DEFAULT_SPECS);
    let specs: Vec<(&str, Value)> = SPECS
        .iter()
        .map(|(n, t)| (*n, serde_json::from_str(t).unwrap()))
        .collect();
    let execs: Vec<(&str, Value)> = EXECS
        .iter()
        .map(|(n, t)| (*n, serde_json::from_str(t).unwrap()))
        .collect();
    let exec_base = EXECS[0].1.as_bytes();

    // The real specs pass everything unmutated.
    let mut t = Tally::default();
    for (name, v) in &specs {
        let m = Mutant {
            bytes: serde_json::to_vec(v).unwrap(),
            touched: Vec::new(),
        };
        shim_side(&mut t, name, &m);
        agent_create(&mut t, name, &m, exec_base);
        agent_update(&mut t, name, &m);
    }
    for (name, v) in &execs {
        let m = Mutant {
            bytes: serde_json::to_vec(v).unwrap(),
            touched: Vec::new(),
        };
        let inh = exec::Inherited::from_spec(&serde_json::from_value(specs[1].1.clone()).unwrap());
        agent_exec(&mut t, name, &m, &inh);
    }
    assert!(
        t.failures.is_empty() && t.refused == 0,
        "real specs refused: {:#?}",
        t.failures
    );

    let started = Instant::now();
    let inherited: Vec<exec::Inherited> = specs
        .iter()
        .map(|(_, v)| exec::Inherited::from_spec(&serde_json::from_value(v.clone()).unwrap()))
        .collect();
    // Each spec has its own generator (seed, index): the run is the same on any number of
    // threads, and one spec reproduces alone.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4);
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|w| {
                let (specs, execs, inherited) = (&specs, &execs, &inherited);
                scope.spawn(move || {
                    let mut t = Tally::default();
                    for i in (w..count).step_by(threads) {
                        one(&mut t, seed, i, specs, execs, inherited, exec_base);
                    }
                    t
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut t = Tally::default();
    for x in tallies {
        t.runs += x.runs;
        t.accepted += x.accepted;
        t.refused += x.refused;
        t.failures.extend(x.failures);
    }
    let took = started.elapsed();
    eprintln!(
        "spec mutation run: seed {seed:#x}, {count} specs + {} exec processes ({} runs), {} layer results accepted, {} refusals checked, {} findings; {threads} threads, {:.1} s",
        count.div_ceil(5),
        t.runs,
        t.accepted,
        t.refused,
        t.failures.len(),
        took.as_secs_f64()
    );
    if !t.failures.is_empty() {
        let shown: Vec<&String> = t.failures.iter().take(40).collect();
        panic!(
            "{} findings (first 40):\n{}",
            t.failures.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
