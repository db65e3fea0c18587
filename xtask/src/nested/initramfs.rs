//! L1's initramfs: busybox, the KVM modules, the programs L1 runs (for the tests: the tier-4
//! test binaries with husk-vmm and virtiofsd; for the boot probe: xtask, husk-vmm and QEMU
//! with its firmware) and the shared libraries `ldd` names for them, our guest vmlinux and
//! initramfs, and the two-stage init that runs them.
//!
//! Why pack the files instead of exporting the host's `/` to L1 (9p or virtio-fs): the
//! Debian kernel has 9p and virtio-pci only as modules (eight more to load, in order), a
//! virtio-fs export needs a second virtiofsd on the host, and the whole set here is ~100 MB
//! after `objcopy --strip-debug` — unpacked by L1's kernel in a fraction of its boot. It is
//! also exactly the measured recipe (FIELD-NOTES), and L1 then sees nothing of the host.
//! The full-stack subset (containerd, runc, CNI plugins) is where an export of `/` pays off.
//!
//! The root is moved to a tmpfs before anything runs: virtiofsd's namespace sandbox cannot
//! pivot_root out of an initramfs (rootfs) root.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use husk_rootfs_builder::initramfs::write_cpio;
use husk_rootfs_builder::tree::{Content, Tree};

use super::l1::{L1Kernel, MODULES};
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
    pub busybox: PathBuf,
    pub programs: Vec<Program>,
    /// Host files L1 gets at the same path (QEMU's firmware).
    pub files: Vec<PathBuf>,
    pub guest_kernel: PathBuf,
    pub guest_initramfs: PathBuf,
    /// What stage 2 runs once L1 is up ([`tests_body`], or the boot probe).
    pub body: String,
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

fn quote(s: &str) -> String {
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

/// Stage 2: mounts, KVM modules, then `body` with a `say` for marker lines on COM2
/// (whose fd 3 is COM2), then `DONE` and power-off.
pub fn stage2(body: &str, lib_path: &str) -> String {
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
        modules = MODULES.join(" "),
        lib_path = quote(lib_path),
    );
    s += body;
    s += "say DONE\nbye\n";
    s
}

/// Stage 2's body for the nested tier: each test binary with its tests, results on COM2.
pub fn tests_body(binaries: &[TestBinary]) -> String {
    let mut s = String::new();
    for b in binaries {
        let tests: Vec<String> = b.tests.iter().map(|t| quote(t)).collect();
        s += &format!(
            "say \"BEGIN {name}\"\n{BIN_DIR}/{name} --include-ignored --exact --test-threads=1 {tests} </dev/null >&3\nsay \"END {name} $?\"\n",
            name = b.name,
            tests = tests.join(" "),
        );
    }
    s
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
    let mut programs = Vec::new();
    for p in &inputs.programs {
        let path = if p.strip {
            stripped(&p.path, work, &p.name)?
        } else {
            p.path.clone()
        };
        programs.push((p.name.clone(), path));
    }
    let mut libs = Vec::new();
    for (name, path) in &programs {
        t.file(&format!("{BIN_DIR}/{name}"), host(path), 0o755)?;
        libs.extend(libraries(path)?);
    }
    libs.sort();
    libs.dedup();
    for lib in &libs {
        // At the path the host's loader found it (and the interpreter at its PT_INTERP path):
        // L1 has no ld.so.cache, and glibc's built-in search covers /lib/x86_64-linux-gnu.
        t.file(&lib.to_string_lossy(), host(lib), 0o755)?;
    }
    for (m, ko) in MODULES.iter().zip(&inputs.l1.modules) {
        t.file(&format!("{MODULE_DIR}/{m}.ko"), host(ko), 0o644)?;
    }
    for f in &inputs.files {
        t.file(&f.to_string_lossy(), host(f), 0o644)?;
    }
    t.file(GUEST_KERNEL, host(&inputs.guest_kernel), 0o644)?;
    t.file(GUEST_INITRAMFS, host(&inputs.guest_initramfs), 0o644)?;
    t.file(
        "stage2",
        Content::Bytes(stage2(&inputs.body, &lib_path_var(&libs)).into_bytes()),
        0o755,
    )?;
    let top_level: Vec<String> = {
        let mut v: Vec<String> = t
            .iter()
            .filter(|(p, _)| p.components().count() == 1)
            .map(|(p, _)| p.to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    t.file(
        "init",
        Content::Bytes(stage1(&top_level).into_bytes()),
        0o755,
    )?;
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
    fn stage2_runs_each_binary_with_its_tests_exactly() {
        let b = [TestBinary {
            name: "husk_vmm_linux".into(),
            path: PathBuf::from("/x"),
            tests: vec!["a".into(), "m::b".into()],
        }];
        let s = stage2(&tests_body(&b), "/lib/x86_64-linux-gnu");
        assert!(s.contains(
            "/nested/bin/husk_vmm_linux --include-ignored --exact --test-threads=1 'a' 'm::b' </dev/null >&3\n"
        ));
        assert!(s.contains("say \"BEGIN husk_vmm_linux\""));
        assert!(s.contains("say \"END husk_vmm_linux $?\""));
        assert!(s.contains("insmod /nested/modules/$m.ko"));
        assert!(s.contains("echo advise >/sys/kernel/mm/transparent_hugepage/shmem_enabled"));
        assert!(s.contains("for m in irqbypass ccp kvm kvm-amd;"));
        assert!(s.trim_end().ends_with("say DONE\nbye"));
        let s1 = stage1(&["bin".into(), "nested".into(), "stage2".into()]);
        assert!(s1.contains("mv /bin /nested /stage2 /newroot/"));
    }
}
