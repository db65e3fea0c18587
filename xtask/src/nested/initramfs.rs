//! L1's initramfs: busybox, L1's modules ([`super::l1::MODULES`] and their dependencies),
//! and the two-stage init that makes L1's root and runs stage 2's body in it. Two kinds of
//! root ([`Root`]):
//!
//! - **The host's `/`, read-only** (the nested tier's tests): QEMU exports `/` over virtio-9p
//!   (`readonly=on`: L1 cannot write a byte of the host), stage 1 mounts it under a tmpfs
//!   overlay and switch_roots into that, and stage 2 mounts fresh tmpfs on `/tmp`, `/run`,
//!   `/var/tmp` and `/var/lib/containerd` (containerd's overlay snapshots and the shim's
//!   state want a real filesystem under them, not an overlay). containerd, runc, ctr, the CNI
//!   plugins, the shim, husk-vmm, virtiofsd, the test binaries, the guest kernel and images
//!   are then at their host paths, with no second install: the full stack runs as on a node.
//!   Only busybox (for the stages) and the modules are packed (~9 MB). What L1 can see: every
//!   file of the host (QEMU runs as root); L1 runs only this tree's tests and their guests
//!   from our own images, so a test run must not happen on a host whose files those may not
//!   read. Nothing L1 writes reaches the host.
//! - **Packed** (the boot probe, `cargo xtask nested-boot`): the programs L1 runs (xtask,
//!   husk-vmm, QEMU with its firmware) and the shared libraries `ldd` names for them, our
//!   guest vmlinux and initramfs (~100 MB after `objcopy --strip-debug`). L1 then sees
//!   nothing of the host, and it is exactly the measured recipe (FIELD-NOTES).
//!
//! Either way the root is not the initramfs when anything runs: virtiofsd's namespace sandbox
//! cannot pivot_root out of an initramfs (rootfs) root.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use husk_rootfs_builder::initramfs::write_cpio;
use husk_rootfs_builder::tree::{Content, Tree};

use super::l1::L1Kernel;
use super::TestBinary;
use crate::run::output;

/// Where things are inside L1.
pub const BIN_DIR: &str = "/nested/bin";
pub const GUEST_KERNEL: &str = "/nested/vmlinux";
pub const GUEST_INITRAMFS: &str = "/nested/initramfs.cpio";
const MODULE_DIR: &str = "/nested/modules";
/// The serial port (COM2) that carries only the markers and the tests' stdout; COM1 is L1's
/// console (kernel messages, stderr), kept apart so a kernel line never splits a result line.
pub const RESULTS_TTY: &str = "/dev/ttyS1";
/// Every marker line on the results port starts with this.
pub const MARKER: &str = "HUSK-NESTED";
/// The 9p mount tag of the host's `/` ([`Root::HostExport`]).
pub const EXPORT_TAG: &str = "hostroot";

/// Where L1's root comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// Everything L1 runs is in the initramfs.
    Packed,
    /// The host's `/` over read-only virtio-9p with a tmpfs overlay; `programs`, `files` and
    /// the guest kernel and initramfs of [`Inputs`] are then not packed (L1 sees them at
    /// their host paths).
    HostExport,
}

/// A program for L1's `BIN_DIR`, with the libraries `ldd` names for it.
pub struct Program {
    pub name: String,
    pub path: PathBuf,
    /// Copy it without debug sections (Rust programs built here).
    pub strip: bool,
}

impl Program {
    pub fn new(name: &str, path: PathBuf, strip: bool) -> Self {
        Self {
            name: name.to_string(),
            path,
            strip,
        }
    }
}

/// What goes into L1.
pub struct Inputs<'a> {
    pub l1: &'a L1Kernel,
    pub root: Root,
    pub busybox: PathBuf,
    pub programs: Vec<Program>,
    /// Host files L1 gets at the same path (QEMU's firmware).
    pub files: Vec<PathBuf>,
    pub guest_kernel: PathBuf,
    pub guest_initramfs: PathBuf,
    /// What stage 2 runs once L1 is up ([`tests_body`], or the boot probe).
    pub body: String,
    /// Environment stage 2 exports before `body` (with [`Root::HostExport`]: the host's
    /// `PATH`, the artefacts' paths).
    pub env: Vec<(String, String)>,
    /// With [`Root::HostExport`]: host directories that stay visible at their paths although
    /// stage 2 covers `/tmp`, `/run`, `/var/tmp` with fresh tmpfs (the workspace, when CI's
    /// clone is under `/tmp`).
    pub keep: Vec<PathBuf>,
}

/// The libraries (and the program interpreter) in `ldd`'s output, by the path the host's
/// loader resolved; an error for a library it could not find.
pub fn parse_ldd(out: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("{}: not found by the host's loader", name.trim());
                }
                rest
            }
            None => line,
        };
        if let Some(path) = target.split(" (").next().filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn is_static(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let elf = goblin::elf::Elf::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not an ELF program: {e}", path.display()))?;
    Ok(elf.interpreter.is_none() && elf.libraries.is_empty())
}

fn libraries(program: &Path) -> Result<Vec<PathBuf>> {
    if is_static(program)? {
        return Ok(Vec::new());
    }
    let out = output(Command::new("ldd").arg(program))?;
    parse_ldd(&out).with_context(|| format!("libraries of {}", program.display()))
}

/// A copy of `program` without debug sections in `work` (a debug test binary is ~70 MB, ~10
/// without them; symbols stay, so a backtrace still names functions).
fn stripped(program: &Path, work: &Path, name: &str) -> Result<PathBuf> {
    let dest = work.join(name);
    output(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(program)
            .arg(&dest),
    )
    .with_context(|| format!("stripping {} (objcopy: binutils)", program.display()))?;
    Ok(dest)
}

/// `s` quoted for L1's shell.
pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn lib_path_var(libs: &[PathBuf]) -> String {
    let mut dirs: Vec<String> = libs
        .iter()
        .filter_map(|l| l.parent().map(|p| p.display().to_string()))
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs.join(":")
}

/// Stage 1, L1's `/init`: move everything to a tmpfs, then switch_root into stage 2.
pub fn stage1(top_level: &[String]) -> String {
    let entries: Vec<String> = top_level.iter().map(|e| format!("/{e}")).collect();
    format!(
        r#"#!/bin/busybox sh
# husk nested tier, L1 stage 1 (written by cargo xtask test): virtiofsd's namespace sandbox
# cannot pivot_root out of the initramfs root, so the root moves to a tmpfs first.
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs -o mode=0755 root /newroot
/bin/busybox mkdir -p /newroot/dev
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox mv {} /newroot/
exec /newroot/bin/busybox switch_root /newroot /stage2
"#,
        entries.join(" ")
    )
}

/// The names under `MODULE_DIR` of L1's modules, in load order.
fn module_names(l1: &L1Kernel) -> Vec<String> {
    l1.modules
        .iter()
        .filter_map(|m| Some(m.file_stem()?.to_string_lossy().into_owned()))
        .collect()
}

/// Stage 1 of [`Root::HostExport`], L1's `/init`: loads every module (virtio-pci and 9p are
/// modules in Debian's kernel), mounts the host's `/` read-only with a tmpfs over it, copies
/// busybox and stage 2 there, and switch_roots into it. A failure says why on COM2.
pub fn stage1_export(modules: &[String]) -> String {
    format!(
        r#"#!/bin/busybox sh
# husk nested tier, L1 stage 1 (written by cargo xtask test): the root becomes the host's /
# (virtio-9p, read-only) under a tmpfs overlay.
B=/bin/busybox
$B mount -t devtmpfs devtmpfs /dev
fail() {{ echo "{MARKER} FAIL $*" >{RESULTS_TTY}; $B dmesg | $B tail -n 20; $B sleep 0.2; $B poweroff -f; }}
for m in {modules}; do
    $B insmod {MODULE_DIR}/$m.ko || fail "insmod $m.ko failed"
done
$B mkdir -p /host /upper
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 {EXPORT_TAG} /host \
    || fail "mounting the host's / (virtio-9p tag {EXPORT_TAG}) failed"
$B mount -t tmpfs -o mode=0755 upper /upper
$B mkdir -p /upper/data /upper/work
$B mount -t overlay -o lowerdir=/host,upperdir=/upper/data,workdir=/upper/work root /newroot \
    || fail "the tmpfs overlay on the host's / failed"
$B mkdir -p /newroot/nested/bin
$B cp /bin/busybox /newroot/nested/bin/busybox
$B cp /stage2 /newroot/nested/stage2
$B mount --move /dev /newroot/dev
exec $B switch_root /newroot /nested/stage2
"#,
        modules = modules.join(" "),
    )
}

fn exports(env: &[(String, String)]) -> String {
    env.iter()
        .map(|(k, v)| format!("export {k}={}\n", quote(v)))
        .collect()
}

/// Stage 2 of [`Root::HostExport`]: fresh filesystems where the stack writes, loopback up,
/// `env`, then `body` with `say` for marker lines on COM2 (fd 3), then `DONE` and power-off.
pub fn stage2_export(body: &str, env: &[(String, String)], keep: &[PathBuf]) -> String {
    // Each kept directory is bound aside before the tmpfs mounts and moved back after.
    let (mut aside, mut back) = (String::new(), String::new());
    for (i, k) in keep.iter().enumerate() {
        let k = quote(&k.to_string_lossy());
        aside += &format!("$B mkdir -p /nested/keep/{i} && $B mount --bind {k} /nested/keep/{i} || keep_failed=\"$keep_failed {k}\"\n");
        back += &format!("$B mkdir -p {k} && $B mount --move /nested/keep/{i} {k} || keep_failed=\"$keep_failed {k}\"\n");
    }
    let mut s = format!(
        r#"#!/nested/bin/busybox sh
# husk nested tier, L1 stage 2 (written by cargo xtask test), on the host's / (read-only).
B=/nested/bin/busybox
$B mount -t proc proc /proc
read -r stage2_at _ </proc/uptime
$B mount -t sysfs sysfs /sys
keep_failed=
{aside}$B mount -t tmpfs -o mode=1777 tmp /tmp
$B mount -t tmpfs -o mode=0755 run /run
$B mount -t tmpfs -o mode=1777 vartmp /var/tmp
$B mkdir -p /var/lib/containerd /dev/pts /dev/shm
$B mount -t tmpfs -o mode=0711 containerd /var/lib/containerd
{back}$B mount -t tmpfs -o mode=1777 shm /dev/shm
$B mount -t devpts devpts /dev/pts
$B mount -t cgroup2 cgroup2 /sys/fs/cgroup
$B mount -t debugfs debugfs /sys/kernel/debug
$B ip link set lo up
exec 3>{RESULTS_TTY}
say() {{ echo "{MARKER} $*" >&3; }}
bye() {{ exec 3>&-; $B sleep 0.2; $B poweroff -f; }}
fail() {{ say "FAIL $*"; $B dmesg | $B tail -n 20; bye; }}
[ -z "$keep_failed" ] || fail "keeping the host's$keep_failed visible under the fresh tmpfs failed"
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm-amd"
# As a husk node is set up (deploy/README.md): shared memory (husk-vmm's memfd guest RAM)
# may have transparent huge pages where the VMM asks for them.
echo advise >/sys/kernel/mm/transparent_hugepage/shmem_enabled || fail "setting shmem_enabled"
say "L1 up $($B cut -d' ' -f1 /proc/uptime) s (root: the host's / over 9p at $stage2_at s), $($B grep -c ^processor /proc/cpuinfo) CPU, $($B free -m | $B awk '/Mem:/ {{print $2}}') MiB, kvm_amd nested=$($B cat /sys/module/kvm_amd/parameters/nested) npt=$($B cat /sys/module/kvm_amd/parameters/npt)"
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
{exports}cd /tmp
"#,
        exports = exports(env),
    );
    s += body;
    s += "say DONE\nbye\n";
    s
}

/// Stage 2 of [`Root::Packed`]: mounts, L1's modules, then `body` with a `say` for marker
/// lines on COM2 (whose fd 3 is COM2), then `DONE` and power-off.
pub fn stage2(body: &str, lib_path: &str, modules: &[String]) -> String {
    let mut s = format!(
        r#"#!/bin/busybox sh
# husk nested tier, L1 stage 2 (written by cargo xtask test).
/bin/busybox mkdir -p /proc /sys /tmp /run /root
/bin/busybox mount -t proc proc /proc
read -r stage2_at _ </proc/uptime
/bin/busybox --install -s /bin
export PATH={BIN_DIR}:/bin
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=1777 tmp /tmp
mount -t tmpfs run /run
mkdir -p /dev/pts /sys/fs/cgroup
mount -t devpts devpts /dev/pts
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t debugfs debugfs /sys/kernel/debug
exec 3>{RESULTS_TTY}
say() {{ echo "{MARKER} $*" >&3; }}
bye() {{ exec 3>&-; sleep 0.2; poweroff -f; }}
fail() {{ say "FAIL $*"; dmesg | tail -n 20; bye; }}
for m in {modules}; do
    insmod {MODULE_DIR}/$m.ko || fail "insmod $m.ko failed"
done
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm-amd"
# As a husk node is set up (deploy/README.md): shared memory (husk-vmm's memfd guest RAM)
# may have transparent huge pages where the VMM asks for them.
echo advise >/sys/kernel/mm/transparent_hugepage/shmem_enabled || fail "setting shmem_enabled"
say "L1 up $(cut -d' ' -f1 /proc/uptime) s (root on tmpfs at $stage2_at s), $(grep -c ^processor /proc/cpuinfo) CPU, kvm_amd nested=$(cat /sys/module/kvm_amd/parameters/nested) npt=$(cat /sys/module/kvm_amd/parameters/npt)"
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1 LD_LIBRARY_PATH={lib_path}
export HUSK_KERNEL={GUEST_KERNEL} HUSK_INITRAMFS={GUEST_INITRAMFS} HUSK_VMM={BIN_DIR}/husk-vmm
cd /tmp
"#,
        modules = modules.join(" "),
        lib_path = quote(lib_path),
    );
    s += body;
    s += "say DONE\nbye\n";
    s
}

/// Stage 2's body for the nested tier: each test binary (at its host path: [`Root::HostExport`])
/// run once per test, one at a time, results on COM2 (uncoloured: it is a terminal, and the
/// tally reads libtest's plain `ok`), each test's time on L1's clock
/// (`TOOK <test> <seconds>`), the binary's worst exit code in its `END` line.
pub fn tests_body(binaries: &[TestBinary]) -> String {
    let mut s = String::new();
    for b in binaries {
        s += &format!("say \"BEGIN {}\"\nrc=0\n", b.name);
        for t in &b.tests {
            s += &format!(
                "t0=$(cut -d' ' -f1 /proc/uptime)\n{exe} --include-ignored --exact --test-threads=1 --color never {test} </dev/null >&3 || rc=$?\nsay \"TOOK {name} $(awk -v a=\"$t0\" -v b=\"$(cut -d' ' -f1 /proc/uptime)\" 'BEGIN {{ printf \"%.1f\", b - a }}')\"\n",
                exe = quote(&b.path.to_string_lossy()),
                test = quote(t),
                name = t,
            );
        }
        s += &format!("say \"END {} $rc\"\n", b.name);
    }
    s
}

/// The programs (stripped where asked, into `work`), the files, the guest kernel and
/// initramfs of a [`Root::Packed`] L1.
fn pack_programs(inputs: &Inputs, t: &mut Tree, work: &Path) -> Result<()> {
    let host = |p: &Path| Content::HostFile(p.to_path_buf());
    for p in &inputs.programs {
        let path = if p.strip {
            stripped(&p.path, work, &p.name)?
        } else {
            p.path.clone()
        };
        t.file(&format!("{BIN_DIR}/{}", p.name), host(&path), 0o755)?;
    }
    for f in &inputs.files {
        t.file(&f.to_string_lossy(), host(f), 0o644)?;
    }
    t.file(GUEST_KERNEL, host(&inputs.guest_kernel), 0o644)?;
    t.file(GUEST_INITRAMFS, host(&inputs.guest_initramfs), 0o644)?;
    Ok(())
}

/// The shared libraries of the packed programs, packed at the paths the host's loader found
/// them (and the interpreter at its PT_INTERP path): L1 has no ld.so.cache, and glibc's
/// built-in search covers /lib/x86_64-linux-gnu. Returns them.
fn pack_libraries(inputs: &Inputs, t: &mut Tree) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for p in &inputs.programs {
        // A stripped copy has the original's dynamic section: ask about the original.
        libs.extend(libraries(&p.path)?);
    }
    libs.sort();
    libs.dedup();
    for lib in &libs {
        t.file(
            &lib.to_string_lossy(),
            Content::HostFile(lib.clone()),
            0o755,
        )?;
    }
    Ok(libs)
}

/// Writes L1's initramfs to `dest`, using `work` for stripped copies.
pub fn build(inputs: &Inputs, dest: &Path, work: &Path) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let mut t = Tree::new();
    let host = |p: &Path| Content::HostFile(p.to_path_buf());
    t.file("bin/busybox", host(&inputs.busybox), 0o755)?;
    if !is_static(&inputs.busybox)? {
        bail!(
            "{} is not statically linked — apt-get install busybox-static (cargo xtask setup)",
            inputs.busybox.display()
        );
    }
    let modules = module_names(inputs.l1);
    for (m, ko) in modules.iter().zip(&inputs.l1.modules) {
        t.file(&format!("{MODULE_DIR}/{m}.ko"), host(ko), 0o644)?;
    }
    let init = match inputs.root {
        Root::HostExport => {
            if !inputs.programs.is_empty() || !inputs.files.is_empty() {
                bail!("L1 on the host's / takes programs and files from there: pack none");
            }
            t.file(
                "stage2",
                Content::Bytes(stage2_export(&inputs.body, &inputs.env, &inputs.keep).into_bytes()),
                0o755,
            )?;
            stage1_export(&modules)
        }
        Root::Packed => {
            pack_programs(inputs, &mut t, work)?;
            let lib_path = lib_path_var(&pack_libraries(inputs, &mut t)?);
            let mut body = exports(&inputs.env);
            body += &inputs.body;
            t.file(
                "stage2",
                Content::Bytes(stage2(&body, &lib_path, &modules).into_bytes()),
                0o755,
            )?;
            let mut top_level: Vec<String> = t
                .iter()
                .filter(|(p, _)| p.components().count() == 1)
                .map(|(p, _)| p.to_string_lossy().into_owned())
                .collect();
            top_level.sort();
            stage1(&top_level)
        }
    };
    t.file("init", Content::Bytes(init.into_bytes()), 0o755)?;
    for dir in ["dev", "newroot"] {
        t.dir(dir, 0o755)?;
    }
    t.char_dev("dev/console", 5, 1, 0o600)?;

    let tmp = dest.with_extension("cpio.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = write_cpio(&t, std::io::BufWriter::new(file))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::io::Write::flush(&mut w)?;
    drop(w);
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd5b9f2000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c1c5e0000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c1c3ff000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1c6a1000)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibseccomp.so.2 => not found\n")
            .unwrap_err()
            .to_string()
            .contains("libseccomp.so.2"));
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }

    #[test]
    fn stage2_runs_each_test_of_each_binary_exactly_and_times_it() {
        let b = [TestBinary {
            name: "husk_vmm_linux".into(),
            path: PathBuf::from("/w/target/debug/deps/husk_vmm_linux-0a"),
            tests: vec!["a".into(), "m::b".into()],
        }];
        let mods: Vec<String> = ["irqbypass", "ccp", "kvm", "kvm-amd"]
            .map(String::from)
            .to_vec();
        let s = stage2(&tests_body(&b), "/lib/x86_64-linux-gnu", &mods);
        for t in ["'a'", "'m::b'"] {
            assert!(s.contains(&format!(
                "'/w/target/debug/deps/husk_vmm_linux-0a' --include-ignored --exact --test-threads=1 --color never {t} </dev/null >&3 || rc=$?\n"
            )));
        }
        assert!(s.contains("say \"TOOK m::b $(awk"));
        assert!(s.contains("say \"BEGIN husk_vmm_linux\"\nrc=0\n"));
        assert!(s.contains("say \"END husk_vmm_linux $rc\""));
        assert!(s.contains("insmod /nested/modules/$m.ko"));
        assert!(s.contains("echo advise >/sys/kernel/mm/transparent_hugepage/shmem_enabled"));
        assert!(s.contains("for m in irqbypass ccp kvm kvm-amd;"));
        assert!(s.trim_end().ends_with("say DONE\nbye"));
        let s1 = stage1(&["bin".into(), "nested".into(), "stage2".into()]);
        assert!(s1.contains("mv /bin /nested /stage2 /newroot/"));
    }

    #[test]
    fn the_host_export_stages_mount_the_host_read_only_under_tmpfs() {
        let s1 = stage1_export(&["virtio".into(), "9p".into(), "overlay".into()]);
        assert!(s1.contains("for m in virtio 9p overlay;"));
        assert!(s1.contains("mount -t 9p -o trans=virtio,version=9p2000.L,ro,"));
        assert!(s1.contains("lowerdir=/host,upperdir=/upper/data,workdir=/upper/work"));
        assert!(s1.contains("exec $B switch_root /newroot /nested/stage2"));
        let env = vec![
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("HUSK_IMAGES".to_string(), "/w/it's".to_string()),
        ];
        let s2 = stage2_export("echo body\n", &env, &[PathBuf::from("/tmp/ci clone")]);
        for dir in ["/tmp", "/run", "/var/tmp", "/var/lib/containerd"] {
            assert!(
                s2.lines()
                    .any(|l| l.starts_with("$B mount -t tmpfs") && l.ends_with(&format!(" {dir}"))),
                "{dir}: {s2}"
            );
        }
        assert!(s2.contains("export PATH='/usr/bin:/bin'\nexport HUSK_IMAGES='/w/it'\\''s'\n"));
        assert!(s2.contains("[ -c /dev/kvm ] || fail"));
        // A kept directory (CI's clone under /tmp) is bound aside before the tmpfs covers
        // /tmp and moved back after; a failure fails L1 naming it.
        let line = |needle: &str| {
            s2.lines()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle}: {s2}"))
        };
        let (aside, tmp, back) = (
            line("mount --bind '/tmp/ci clone' /nested/keep/0"),
            line("mount -t tmpfs -o mode=1777 tmp /tmp"),
            line("mount --move /nested/keep/0 '/tmp/ci clone'"),
        );
        assert!(aside < tmp && tmp < back, "{s2}");
        assert!(s2.contains("[ -z \"$keep_failed\" ] || fail"));
        assert!(s2.trim_end().ends_with("echo body\nsay DONE\nbye"));
    }
}
