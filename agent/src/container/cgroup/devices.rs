//! `linux.resources.devices` on cgroup v2: the OCI rule list becomes an eBPF program of type
//! `BPF_PROG_TYPE_CGROUP_DEVICE` attached to the container's cgroup. The kernel runs it on
//! every open (read/write) and mknod of a device node by a process in the cgroup; 0 refuses
//! with EPERM.
//!
//! The semantics, and where they differ from runc:
//! - Rules apply in order and the last rule that matches a device wins. With no rule
//!   matching, access is allowed, as in a fresh cgroup v1 — so a list that starts with the
//!   usual deny-all (`{"allow": false, "access": "rwm"}`) is an allow-list. runc starts from
//!   deny even without a deny-all; both agree on every list that has one (containerd's and
//!   CRI's always do).
//! - Each access (r, w, m) is decided on its own and an open needing read and write needs
//!   both. runc asks one rule to cover the whole request, and refuses a deny that punches a
//!   hole in an allowed wildcard (cgroup v1 silently ignored it); here `allow c *:* rwm` then
//!   `deny c 1:3 w` does what it says.
//! - Like runc and crun, every container may use the OCI default devices: `c *:* m`,
//!   `b *:* m`, /dev/null, zero, full, random, urandom, tty, console, ptmx, /dev/pts/* and
//!   /dev/net/tun (their lists). CRI writes only a deny-all plus the pod's own devices and
//!   relies on this. Unlike runc, they are rules placed right after the list's last
//!   all-devices rule, not an override: a later rule that names one of them (`deny c 1:3 w`)
//!   still applies.
//! - A list that is absent or empty attaches no program: everything is allowed, as before
//!   this module (runc would still confine such a container to its default devices).
//!   UpdateContainer with a non-empty list replaces the program atomically (`BPF_F_REPLACE`);
//!   one without devices leaves it as it is.
//! - The program is attached when the cgroup is made, before the container's helper joins it:
//!   the helper's mknod of the spec's `linux.devices` is subject to it, which the default
//!   `c *:* m` / `b *:* m` allow unless a later rule denies `m`.
//! - Unset type, major, minor or access mean all (OCI); a negative major or minor is a
//!   wildcard too (runc's -1). Type `p`/`u` and access letters other than r, w, m are errors.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

use super::bpf::{self, Asm, Insn, Reg};
use super::bpf_syscall;

/// Why device rules are refused or their program cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A rule the program cannot express; `index` is its place in `linux.resources.devices`.
    #[error("linux.resources.devices[{index}]: {what}")]
    Rule { index: usize, what: String },
    /// The rules do not fit one program (the jumps' 16-bit offsets).
    #[error("linux.resources.devices: {0}")]
    Program(#[source] bpf::Error),
    /// The container's cgroup directory cannot be opened.
    #[error("opening {}: {source}", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bpf(2) step on the cgroup failed.
    #[error("device cgroup {}: {source}", path.display())]
    Bpf {
        path: std::path::PathBuf,
        #[source]
        source: bpf_syscall::Error,
    },
}

/// `struct bpf_cgroup_dev_ctx.access_type`: the device type in the low 16 bits…
pub(crate) const DEV_BLOCK: u32 = 1;
pub(crate) const DEV_CHAR: u32 = 2;
/// …and the requested access in the high 16 bits.
pub(crate) const ACC_MKNOD: u32 = 1;
pub(crate) const ACC_READ: u32 = 2;
pub(crate) const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    All,
    Block,
    Char,
}

/// One rule, checked and in the kernel's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    pub kind: Kind,
    /// `None`: any.
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// ACC_* bits.
    pub access: u32,
}

impl Rule {
    const fn allow_char(major: u32, minor: Option<u32>, access: u32) -> Self {
        Self {
            allow: true,
            kind: Kind::Char,
            major: Some(major),
            minor,
            access,
        }
    }

    /// Type `a` with both numbers wildcards: every device.
    fn all_devices(&self) -> bool {
        self.kind == Kind::All && self.major.is_none() && self.minor.is_none()
    }

    /// Every device `other` matches, this matches too.
    fn covers(&self, other: &Rule) -> bool {
        (self.kind == Kind::All || self.kind == other.kind)
            && (self.major.is_none() || self.major == other.major)
            && (self.minor.is_none() || self.minor == other.minor)
    }

    #[cfg(test)]
    fn matches(&self, dev_type: u32, major: u32, minor: u32) -> bool {
        let kind = match self.kind {
            Kind::All => true,
            Kind::Block => dev_type == DEV_BLOCK,
            Kind::Char => dev_type == DEV_CHAR,
        };
        kind && self.major.is_none_or(|m| m == major) && self.minor.is_none_or(|m| m == minor)
    }
}

/// What every container may use (see the module docs): runc's and crun's lists, which are
/// containerd's defaults plus mknod of anything and /dev/net/tun.
pub(crate) const DEFAULT_ALLOWED: [Rule; 12] = [
    Rule {
        allow: true,
        kind: Kind::Char,
        major: None,
        minor: None,
        access: ACC_MKNOD,
    },
    Rule {
        allow: true,
        kind: Kind::Block,
        major: None,
        minor: None,
        access: ACC_MKNOD,
    },
    Rule::allow_char(1, Some(3), ACC_ALL),    // /dev/null
    Rule::allow_char(1, Some(8), ACC_ALL),    // /dev/random
    Rule::allow_char(1, Some(7), ACC_ALL),    // /dev/full
    Rule::allow_char(5, Some(0), ACC_ALL),    // /dev/tty
    Rule::allow_char(1, Some(5), ACC_ALL),    // /dev/zero
    Rule::allow_char(1, Some(9), ACC_ALL),    // /dev/urandom
    Rule::allow_char(5, Some(1), ACC_ALL),    // /dev/console
    Rule::allow_char(136, None, ACC_ALL),     // /dev/pts/*
    Rule::allow_char(5, Some(2), ACC_ALL),    // /dev/ptmx
    Rule::allow_char(10, Some(200), ACC_ALL), // /dev/net/tun
];

/// A spec rule as a [`Rule`]; errors name the rule by its index.
fn parse_one(i: usize, d: &LinuxDeviceCgroup) -> Result<Rule, Error> {
    let at = |what: String| Error::Rule { index: i, what };
    let kind = match d.typ().unwrap_or_default() {
        LinuxDeviceType::A => Kind::All,
        LinuxDeviceType::B => Kind::Block,
        LinuxDeviceType::C => Kind::Char,
        t => {
            return Err(at(format!(
                "type {:?} has no device cgroup rule: use a, b or c",
                t.as_str()
            )))
        }
    };
    let number = |what: &str, v: Option<i64>| match v {
        None => Ok(None),
        Some(n) if n < 0 => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| at(format!("{what} {n} is out of range"))),
    };
    let mut access = 0;
    match d.access().as_deref() {
        None | Some("") => access = ACC_ALL,
        Some(s) => {
            for c in s.chars() {
                access |= match c {
                    'r' => ACC_READ,
                    'w' => ACC_WRITE,
                    'm' => ACC_MKNOD,
                    other => {
                        return Err(at(format!("access {s:?}: {other:?} is not one of r, w, m")))
                    }
                };
            }
        }
    }
    Ok(Rule {
        allow: d.allow(),
        kind,
        major: number("major", d.major())?,
        minor: number("minor", d.minor())?,
        access,
    })
}

/// The spec's rules with [`DEFAULT_ALLOWED`] placed after the last all-devices rule (or first,
/// when there is none), in evaluation order.
pub fn policy(spec: &[LinuxDeviceCgroup]) -> Result<Vec<Rule>, Error> {
    let rules = spec
        .iter()
        .enumerate()
        .map(|(i, d)| parse_one(i, d))
        .collect::<Result<Vec<_>, _>>()?;
    let at = rules
        .iter()
        .rposition(Rule::all_devices)
        .map_or(0, |p| p + 1);
    let mut all = rules[..at].to_vec();
    all.extend(DEFAULT_ALLOWED);
    all.extend_from_slice(&rules[at..]);
    Ok(all)
}

/// The reference semantics the program implements: each requested access bit is decided by
/// the last rule matching the device that names that bit, allowed when none does.
#[cfg(test)]
pub(crate) fn decide(policy: &[Rule], dev_type: u32, major: u32, minor: u32, access: u32) -> bool {
    [ACC_MKNOD, ACC_READ, ACC_WRITE]
        .into_iter()
        .filter(|b| access & b != 0)
        .all(|bit| {
            policy
                .iter()
                .rev()
                .find(|r| r.access & bit != 0 && r.matches(dev_type, major, minor))
                .is_none_or(|r| r.allow)
        })
}

/// The rules that can decide `bit`, last first, and the verdict when none of them matches.
/// The scan stops at an all-devices rule (nothing before it can decide); a rule whose devices
/// a later one already covers never decides, and rules at the end of the scan that give the
/// verdict of falling through are dropped.
fn section(policy: &[Rule], bit: u32) -> (Vec<Rule>, bool) {
    let mut scan: Vec<Rule> = Vec::new();
    let mut fallback = true;
    for r in policy.iter().rev().filter(|r| r.access & bit != 0) {
        if r.all_devices() {
            fallback = r.allow;
            break;
        }
        if !scan.iter().any(|later| later.covers(r)) {
            scan.push(*r);
        }
    }
    while scan.last().is_some_and(|r| r.allow == fallback) {
        scan.pop();
    }
    (scan, fallback)
}

/// The program for `policy`:
///
/// ```text
///   r2 = type, r3 = access, r4 = major, r5 = minor      (from bpf_cgroup_dev_ctx at r1)
///   for bit in m, r, w:                                  (sections with rules only)
///     if !(r3 & bit) goto next_bit
///     for rule naming bit, last first:
///       if type/major/minor differ goto next_rule; goto allow ? next_bit : deny
///     goto fallback ? next_bit : deny
///   next_bit: …
///   r0 = 1; exit
///   deny: r0 = 0; exit                                   (only when jumped to)
/// ```
///
/// The verifier rejects unreachable instructions, so nothing is emitted that no path reaches.
pub fn program(policy: &[Rule]) -> Result<Vec<Insn>, Error> {
    let mut a = Asm::new();
    let deny = a.label();
    a.ldx_w(Reg::R2, Reg::R1, 0);
    a.and32(Reg::R2, 0xffff);
    a.ldx_w(Reg::R3, Reg::R1, 0);
    a.rsh32(Reg::R3, 16);
    a.ldx_w(Reg::R4, Reg::R1, 4);
    a.ldx_w(Reg::R5, Reg::R1, 8);
    for bit in [ACC_MKNOD, ACC_READ, ACC_WRITE] {
        let (scan, fallback) = section(policy, bit);
        if scan.is_empty() && fallback {
            continue;
        }
        let next_bit = a.label();
        let this_bit = a.label();
        a.jset(Reg::R3, i32::try_from(bit).unwrap_or(0), this_bit);
        a.ja(next_bit);
        a.bind(this_bit);
        for r in scan {
            let next_rule = a.label();
            match r.kind {
                Kind::All => {}
                Kind::Block => a.jne32(Reg::R2, DEV_BLOCK, next_rule),
                Kind::Char => a.jne32(Reg::R2, DEV_CHAR, next_rule),
            }
            if let Some(m) = r.major {
                a.jne32(Reg::R4, m, next_rule);
            }
            if let Some(m) = r.minor {
                a.jne32(Reg::R5, m, next_rule);
            }
            a.ja(if r.allow { next_bit } else { deny });
            a.bind(next_rule);
        }
        if !fallback {
            a.ja(deny);
        }
        a.bind(next_bit);
    }
    a.mov64(Reg::R0, 1);
    a.exit();
    if a.used(deny) {
        a.bind(deny);
        a.mov64(Reg::R0, 0);
        a.exit();
    }
    a.finish().map_err(Error::Program)
}

/// Checks `rules` and builds their program, before anything is written to the cgroup.
pub fn compile(rules: &[LinuxDeviceCgroup]) -> Result<Vec<Insn>, Error> {
    program(&policy(rules)?)
}

/// Loads `prog` and makes it the cgroup's only device program: in place of the one attached
/// (atomically), or beside several (then the old ones are detached: while both are attached,
/// access is what both allow, never more).
/// How many loaded programs [`loaded`] keeps.
const PROGRAM_CACHE: usize = 8;

/// Loaded device programs with their instructions, least recently used first.
static LOADED: Mutex<Vec<(Vec<Insn>, Arc<OwnedFd>)>> = Mutex::new(Vec::new());

/// `prog` loaded into the kernel, once per distinct program: a pod's containers (every `ctr`
/// container too) carry the same rules, and one program may be attached to any number of
/// cgroups, so the load and its verifier run (~5 ms of a container's creation under TCG) are
/// paid once. The rules are pod-spec input: at most [`PROGRAM_CACHE`] programs are kept, the
/// least recently used dropped (a cgroup it is attached to keeps it alive in the kernel).
fn loaded(prog: &[Insn]) -> Result<Arc<OwnedFd>, bpf_syscall::Error> {
    let mut cache = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(i) = cache.iter().position(|(p, _)| p.as_slice() == prog) {
        let hit = cache.remove(i);
        let fd = hit.1.clone();
        cache.push(hit);
        return Ok(fd);
    }
    let fd = Arc::new(bpf_syscall::load_device_program(prog)?);
    if cache.len() >= PROGRAM_CACHE {
        cache.remove(0);
    }
    cache.push((prog.to_vec(), fd.clone()));
    Ok(fd)
}

pub fn install(cgroup: &Path, prog: &[Insn]) -> Result<(), Error> {
    let ctx = |source: bpf_syscall::Error| Error::Bpf {
        path: cgroup.to_path_buf(),
        source,
    };
    let dir: OwnedFd = std::fs::File::open(cgroup)
        .map_err(|source| Error::Open {
            path: cgroup.to_path_buf(),
            source,
        })?
        .into();
    let old = bpf_syscall::attached(dir.as_fd()).map_err(ctx)?;
    let old: Vec<(u32, OwnedFd)> = old
        .into_iter()
        .map(|id| bpf_syscall::prog_by_id(id).map(|fd| (id, fd)))
        .collect::<Result<_, _>>()
        .map_err(ctx)?;
    match old.as_slice() {
        [(_, one)] => {
            // Replacing a program by itself (an update with the same rules) is allowed.
            let new = loaded(prog).map_err(ctx)?;
            bpf_syscall::attach(dir.as_fd(), new.as_fd(), Some(one.as_fd())).map_err(ctx)?
        }
        [] => {
            let new = loaded(prog).map_err(ctx)?;
            bpf_syscall::attach(dir.as_fd(), new.as_fd(), None).map_err(ctx)?
        }
        _ => {
            // Several (not all ours): a program of our cache may be among them, and the
            // kernel refuses to attach one twice; a fresh one never is.
            let new = bpf_syscall::load_device_program(prog).map_err(ctx)?;
            bpf_syscall::attach(dir.as_fd(), new.as_fd(), None).map_err(ctx)?;
            for (id, fd) in &old {
                bpf_syscall::detach(dir.as_fd(), fd.as_fd(), *id).map_err(ctx)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::bpf::{
        CLASS_ALU, CLASS_ALU64, CLASS_JMP, CLASS_JMP32, CLASS_LDX, JMP_JA, JMP_JNE, JMP_JSET,
    };
    use super::*;

    fn rules(json: &str) -> Vec<LinuxDeviceCgroup> {
        serde_json::from_str(json).unwrap()
    }

    /// Each distinct program is loaded once and reused; the cache keeps the most recently
    /// used [`PROGRAM_CACHE`]. (Loads real programs: root, as the other tests here.)
    #[test]
    fn a_program_is_loaded_once_and_the_cache_is_bounded() {
        let prog = |major: i64| {
            compile(&rules(&format!(
                r#"[{{"allow": false, "access": "rwm"}}, {{"allow": true, "type": "c", "major": {major}, "minor": 3, "access": "rwm"}}]"#
            )))
            .unwrap()
        };
        // Majors no other test uses, so the shared cache's other entries do not matter.
        let first = loaded(&prog(9001)).unwrap();
        assert!(Arc::ptr_eq(&first, &loaded(&prog(9001)).unwrap()));
        assert!(!Arc::ptr_eq(&first, &loaded(&prog(9002)).unwrap()));
        for major in 9003..9003 + i64::try_from(PROGRAM_CACHE).unwrap() {
            loaded(&prog(major)).unwrap();
        }
        let cache = LOADED.lock().unwrap();
        assert!(cache.len() <= PROGRAM_CACHE);
        assert!(
            !cache.iter().any(|(_, fd)| Arc::ptr_eq(fd, &first)),
            "the least recently used program stayed"
        );
    }

    /// containerd 1.6's default for `ctr run`: oci.populateDefaultUnixSpec's deny-all, then
    /// oci.WithDefaultUnixDevices.
    pub(crate) const CONTAINERD_DEFAULT: &str = r#"[
        {"allow": false, "access": "rwm"},
        {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
        {"allow": true, "type": "c", "major": 1, "minor": 8, "access": "rwm"},
        {"allow": true, "type": "c", "major": 1, "minor": 7, "access": "rwm"},
        {"allow": true, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
        {"allow": true, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
        {"allow": true, "type": "c", "major": 1, "minor": 9, "access": "rwm"},
        {"allow": true, "type": "c", "major": 5, "minor": 1, "access": "rwm"},
        {"allow": true, "type": "c", "major": 136, "access": "rwm"},
        {"allow": true, "type": "c", "major": 5, "minor": 2, "access": "rwm"}
    ]"#;

    /// What the kernel's verifier checks first, without running anything: known opcodes only,
    /// registers in range, context reads inside bpf_cgroup_dev_ctx, every jump forward and
    /// inside the program, no path running off the end, r0 set before each exit, and no
    /// instruction unreachable.
    fn check_shape(p: &[Insn]) {
        // BPF_COMPLEXITY_LIMIT_INSNS: the most a privileged loader may pass.
        assert!(
            !p.is_empty() && p.len() <= 1_000_000,
            "{} instructions",
            p.len()
        );
        let mut reachable = vec![false; p.len()];
        reachable[0] = true;
        for (i, ins) in p.iter().enumerate() {
            if !reachable[i] {
                panic!("instruction {i} is unreachable: {ins:?}");
            }
            assert!(
                ins.dst <= 5 && ins.src <= 5,
                "{i}: register out of range: {ins:?}"
            );
            let class = ins.class();
            match class {
                CLASS_LDX => {
                    assert_eq!(
                        (ins.src, ins.off % 4),
                        (1, 0),
                        "{i}: loads only words of the context"
                    );
                    assert!(
                        (0..12).contains(&ins.off),
                        "{i}: read outside bpf_cgroup_dev_ctx"
                    );
                }
                CLASS_ALU | CLASS_ALU64 => {}
                CLASS_JMP | CLASS_JMP32 if ins.is_exit() => {
                    assert!(
                        i > 0 && p[i - 1].code == CLASS_ALU64 | 0xb0 && p[i - 1].dst == 0,
                        "{i}: exit without setting r0"
                    );
                }
                CLASS_JMP | CLASS_JMP32 => {
                    let op = ins.code & 0xf0;
                    assert!(
                        [JMP_JA, JMP_JSET, JMP_JNE].contains(&op),
                        "{i}: unexpected jump {ins:?}"
                    );
                    assert!(ins.off >= 0, "{i}: backward jump");
                    let to = i + 1 + usize::try_from(ins.off).unwrap();
                    assert!(to < p.len(), "{i}: jump to {to} past the end ({})", p.len());
                    reachable[to] = true;
                }
                _ => panic!("{i}: unexpected instruction {ins:?}"),
            }
            let falls_through = !(ins.is_exit() || ins.is_ja());
            if falls_through {
                assert!(
                    i + 1 < p.len(),
                    "{i}: the last instruction falls off the end"
                );
                reachable[i + 1] = true;
            }
        }
    }

    /// Runs the program on one request: an evaluator for exactly the instructions `program`
    /// emits (the in-VM tests check the kernel agrees).
    fn run(p: &[Insn], dev_type: u32, access: u32, major: u32, minor: u32) -> bool {
        let ctx = [dev_type | (access << 16), major, minor];
        let mut r = [0u64; 6];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, imm) = (usize::from(i.dst), i.imm);
            let imm_u32 = u32::from_ne_bytes(imm.to_ne_bytes());
            pc += 1;
            let jump = |taken: bool, pc: &mut usize| {
                if taken {
                    *pc += usize::try_from(i.off).unwrap();
                }
            };
            match i.code {
                0x61 => r[dst] = u64::from(ctx[usize::try_from(i.off / 4).unwrap()]),
                0x54 => r[dst] = (r[dst] & 0xffff_ffff) & u64::from(imm_u32),
                0x74 => r[dst] = (r[dst] & 0xffff_ffff) >> imm,
                0xb7 => r[dst] = u64::from_ne_bytes(i64::from(imm).to_ne_bytes()),
                0x56 => jump((r[dst] & 0xffff_ffff) != u64::from(imm_u32), &mut pc),
                0x45 => jump(
                    r[dst] & u64::from_ne_bytes(i64::from(imm).to_ne_bytes()) != 0,
                    &mut pc,
                ),
                0x05 => jump(true, &mut pc),
                0x95 => return r[0] == 1,
                other => panic!("opcode {other:#x}"),
            }
        }
    }

    /// Every request on these devices, by the program and by `decide`.
    fn agree(policy: &[Rule], p: &[Insn]) {
        let devices = [
            (DEV_CHAR, 1, 3),
            (DEV_CHAR, 1, 5),
            (DEV_CHAR, 1, 11),
            (DEV_CHAR, 136, 4),
            (DEV_CHAR, 5, 2),
            (DEV_CHAR, 10, 200),
            (DEV_BLOCK, 1, 3),
            (DEV_BLOCK, 8, 0),
            (DEV_BLOCK, 254, 1),
            (DEV_CHAR, 4095, 1_048_575),
        ];
        for (t, major, minor) in devices {
            for access in 1..=ACC_ALL {
                assert_eq!(
                    run(p, t, access, major, minor),
                    decide(policy, t, major, minor, access),
                    "type {t} {major}:{minor} access {access:03b} under {policy:?}"
                );
            }
        }
    }

    fn build(json: &str) -> (Vec<Rule>, Vec<Insn>) {
        let pol = policy(&rules(json)).unwrap();
        let p = program(&pol).unwrap();
        check_shape(&p);
        agree(&pol, &p);
        (pol, p)
    }

    fn allowed(p: &[Insn], t: u32, major: u32, minor: u32, acc: &str) -> bool {
        let access = acc.chars().map(|c| match c {
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            _ => ACC_MKNOD,
        });
        run(p, t, access.fold(0, |a, b| a | b), major, minor)
    }

    #[test]
    fn one_deny_rule_is_this_program() {
        // Only writes have a rule left to check: the defaults' allows are what falling through
        // gives anyway, and /dev/null's default allow is covered by the later deny.
        let (_, p) =
            build(r#"[{"allow": false, "type": "c", "major": 1, "minor": 3, "access": "w"}]"#);
        let want: [(u8, u8, u8, i16, i32); 16] = [
            (0x61, 2, 1, 0, 0),      // r2 = ctx->access_type
            (0x54, 2, 0, 0, 0xffff), // r2 &= 0xffff: the type
            (0x61, 3, 1, 0, 0),      // r3 = ctx->access_type
            (0x74, 3, 0, 0, 16),     // r3 >>= 16: the access
            (0x61, 4, 1, 4, 0),      // r4 = ctx->major
            (0x61, 5, 1, 8, 0),      // r5 = ctx->minor
            (0x45, 3, 0, 1, 4),      // if r3 & WRITE goto +1
            (0x05, 0, 0, 4, 0),      // goto allow
            (0x56, 2, 0, 3, 2),      // if (u32)r2 != CHAR goto allow
            (0x56, 4, 0, 2, 1),      // if (u32)r4 != 1 goto allow
            (0x56, 5, 0, 1, 3),      // if (u32)r5 != 3 goto allow
            (0x05, 0, 0, 2, 0),      // goto deny
            (0xb7, 0, 0, 0, 1),      // allow: r0 = 1
            (0x95, 0, 0, 0, 0),      // exit
            (0xb7, 0, 0, 0, 0),      // deny: r0 = 0
            (0x95, 0, 0, 0, 0),      // exit
        ];
        let got: Vec<(u8, u8, u8, i16, i32)> = p
            .iter()
            .map(|i| (i.code, i.dst, i.src, i.off, i.imm))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn containerd_default_list_allows_the_default_devices_and_nothing_else() {
        let (pol, p) = build(CONTAINERD_DEFAULT);
        // The deny-all, the implicit defaults right after it, then containerd's nine allows.
        assert_eq!(pol.len(), 1 + DEFAULT_ALLOWED.len() + 9);
        assert_eq!(pol[1], DEFAULT_ALLOWED[0]);
        for (major, minor) in [
            (1, 3),
            (1, 5),
            (1, 9),
            (1, 8),
            (1, 7),
            (5, 0),
            (5, 2),
            (136, 0),
            (136, 7),
        ] {
            assert!(
                allowed(&p, DEV_CHAR, major, minor, "rw"),
                "c {major}:{minor}"
            );
        }
        for (t, major, minor) in [
            (DEV_CHAR, 1, 11),
            (DEV_CHAR, 4, 64),
            (DEV_BLOCK, 8, 0),
            (DEV_BLOCK, 1, 3),
        ] {
            assert!(
                !allowed(&p, t, major, minor, "r") && !allowed(&p, t, major, minor, "w"),
                "{t} {major}:{minor}"
            );
            assert!(
                allowed(&p, t, major, minor, "m"),
                "mknod stays allowed: {t} {major}:{minor}"
            );
        }
        // Three sections (m, r, w), each ending in the deny-all's jump; containerd's allows
        // that repeat the defaults are emitted once.
        assert_eq!(p.len(), 140, "{p:?}");
        assert_eq!(
            p.iter()
                .filter(|i| i.code == (CLASS_JMP | JMP_JSET))
                .count(),
            3
        );
    }

    #[test]
    fn cri_deny_all_alone_still_allows_the_default_devices() {
        let (_, p) = build(r#"[{"allow": false, "access": "rwm"}]"#);
        assert!(
            allowed(&p, DEV_CHAR, 1, 3, "rw")
                && allowed(&p, DEV_CHAR, 136, 2, "rw")
                && allowed(&p, DEV_CHAR, 10, 200, "rw")
        );
        assert!(!allowed(&p, DEV_CHAR, 1, 11, "w") && !allowed(&p, DEV_BLOCK, 7, 0, "r"));
    }

    #[test]
    fn a_later_rule_denies_a_default_device() {
        // No deny-all: allowed unless denied, and the deny names /dev/null's read-write.
        let (_, p) =
            build(r#"[{"allow": false, "type": "c", "major": 1, "minor": 3, "access": "rw"}]"#);
        assert!(
            !allowed(&p, DEV_CHAR, 1, 3, "w")
                && !allowed(&p, DEV_CHAR, 1, 3, "r")
                && !allowed(&p, DEV_CHAR, 1, 3, "rw")
        );
        assert!(
            allowed(&p, DEV_CHAR, 1, 3, "m")
                && allowed(&p, DEV_CHAR, 1, 5, "rw")
                && allowed(&p, DEV_BLOCK, 8, 0, "rw")
        );
        // After containerd's list too.
        let mut list: Vec<serde_json::Value> = serde_json::from_str(CONTAINERD_DEFAULT).unwrap();
        list.push(
            serde_json::json!({"allow": false, "type": "c", "major": 1, "minor": 3, "access": "w"}),
        );
        let (_, p) = build(&serde_json::to_string(&list).unwrap());
        assert!(
            !allowed(&p, DEV_CHAR, 1, 3, "w")
                && !allowed(&p, DEV_CHAR, 1, 3, "rw")
                && allowed(&p, DEV_CHAR, 1, 3, "r")
        );
    }

    #[test]
    fn last_match_wins_per_access_and_wildcards_can_have_holes() {
        let (_, p) = build(
            r#"[{"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "access": "rwm"},
                {"allow": false, "type": "c", "major": 1, "minor": 11, "access": "w"},
                {"allow": true, "type": "b", "major": 8, "minor": 0, "access": "r"},
                {"allow": true, "type": "b", "major": 8, "minor": 0, "access": "w"}]"#,
        );
        assert!(
            allowed(&p, DEV_CHAR, 1, 11, "r")
                && !allowed(&p, DEV_CHAR, 1, 11, "w")
                && !allowed(&p, DEV_CHAR, 1, 11, "rw")
        );
        assert!(allowed(&p, DEV_CHAR, 1, 1, "rw"));
        // Read and write allowed by two rules: an open for both is allowed.
        assert!(allowed(&p, DEV_BLOCK, 8, 0, "rw") && !allowed(&p, DEV_BLOCK, 8, 1, "r"));
        // An allow-all at the end wins over everything before it: no checks are emitted.
        let (_, p) = build(
            r#"[{"allow": false, "access": "rwm"}, {"allow": true, "type": "a", "access": "rwm"}]"#,
        );
        assert_eq!(p.len(), 8, "{p:?}");
        assert!(allowed(&p, DEV_BLOCK, 8, 0, "rwm"));
    }

    #[test]
    fn partial_all_devices_rules_decide_only_their_access() {
        // Deny all writes: reads stay allowed everywhere, writes only on the defaults.
        let (_, p) = build(r#"[{"allow": false, "type": "a", "access": "w"}]"#);
        assert!(
            allowed(&p, DEV_BLOCK, 8, 0, "r")
                && !allowed(&p, DEV_BLOCK, 8, 0, "w")
                && allowed(&p, DEV_CHAR, 1, 3, "w")
        );
        // Type a with a major: both kinds with that major.
        let (_, p) = build(r#"[{"allow": false, "type": "a", "major": 8, "access": "r"}]"#);
        assert!(
            !allowed(&p, DEV_BLOCK, 8, 3, "r")
                && !allowed(&p, DEV_CHAR, 8, 3, "r")
                && allowed(&p, DEV_BLOCK, 9, 3, "r")
        );
    }

    #[test]
    fn numbers_beyond_i32_compare_as_unsigned() {
        let (_, p) = build(
            r#"[{"allow": false, "access": "rwm"}, {"allow": true, "type": "c", "major": 4294967295, "minor": 2147483648, "access": "r"}]"#,
        );
        assert!(run(&p, DEV_CHAR, ACC_READ, u32::MAX, 1 << 31));
        assert!(!run(&p, DEV_CHAR, ACC_READ, u32::MAX, 0));
    }

    #[test]
    fn bad_rules_are_named() {
        let err = |json: &str| policy(&rules(json)).unwrap_err().to_string();
        assert_eq!(
            err(r#"[{"allow": true}, {"allow": true, "type": "c", "access": "rwx"}]"#),
            "linux.resources.devices[1]: access \"rwx\": 'x' is not one of r, w, m"
        );
        assert_eq!(
            err(r#"[{"allow": true, "type": "p"}]"#),
            "linux.resources.devices[0]: type \"p\" has no device cgroup rule: use a, b or c"
        );
        assert_eq!(
            err(r#"[{"allow": true, "major": 4294967296}]"#),
            "linux.resources.devices[0]: major 4294967296 is out of range"
        );
        // Unset access is all access; -1 is a wildcard.
        let pol = policy(&rules(r#"[{"allow": false, "major": -1, "minor": -1}]"#)).unwrap();
        assert_eq!(
            pol[0],
            Rule {
                allow: false,
                kind: Kind::All,
                major: None,
                minor: None,
                access: ACC_ALL
            }
        );
    }

    #[test]
    fn long_lists_build_or_fail_by_name() {
        let many: Vec<String> = (0..1000)
            .map(|i| {
                format!(
                    r#"{{"allow": true, "type": "c", "major": 200, "minor": {i}, "access": "rw"}}"#
                )
            })
            .collect();
        let (_, p) = build(&format!(
            r#"[{{"allow": false, "access": "rwm"}}, {}]"#,
            many.join(",")
        ));
        assert!(p.len() < 10_000, "{}", p.len());
        let many: Vec<String> = (0..4000)
            .map(|i| format!(r#"{{"allow": false, "type": "c", "major": 200, "minor": {i}}}"#))
            .collect();
        let e = compile(&rules(&format!("[{}]", many.join(","))))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("linux.resources.devices: a jump from instruction"),
            "{e}"
        );
    }
}
