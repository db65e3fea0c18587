//! The L1 kernel of the nested tier: Debian 12's own `linux-image-6.1.0-*-amd64`, its ELF
//! `vmlinux` (PVH note: QEMU boots it directly) and the modules L1 loads, with every module
//! they depend on, in load order: kvm-amd (a real `/dev/kvm` on QEMU's emulated AMD SVM:
//! irqbypass, ccp, kvm, kvm-amd), virtio-pci, 9p and overlay (L1's root: the host's `/`
//! read-only with a tmpfs over it, see [`super::initramfs`]), and what a pod's network needs
//! on a node (tun, veth, bridge, the tc ingress qdisc with u32 and mirred, nf_tables NAT for
//! the shim's port-forward link). The dependencies come from each module's own `.modinfo`
//! (`depends=`), so no `depmod`/`modprobe` is needed on the host or in L1.
//!
//! Why Debian's package and not a kernel of ours with KVM built in: it is what was measured
//! (FIELD-NOTES: kvm_amd loads with npt and nested, L1 at /init in ~3 s), it costs one
//! `apt-get download` (~70 MB, a second or two) and an unpack of five files instead of a
//! second 8-minute kernel build on a 2-core machine, and its modules are the stock kernel's
//! KVM — the one users run.
//!
//! Cached outside the clone like the guest kernel, by a hash of the inputs (recipe, package
//! name and version, modules): `<cache>/l1-kernel/<hash>/{vmlinux, <module>.ko…, package}`.
//! Present means done; the directory is filled under a temporary name and renamed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::bzimage;
use crate::paths;
use crate::run::{elapsed, output, step};

/// Bump when the extraction below changes, so cached L1 kernels are redone.
const RECIPE: &str = "husk-l1-kernel-recipe-2";
/// The metapackage that names the current kernel ABI (`linux-image-6.1.0-N-amd64`).
const META_PACKAGE: &str = "linux-image-amd64";
/// The modules L1 wants (file names without `.ko`); their dependencies are added, and all
/// are loaded dependencies first. KVM first, as measured (FIELD-NOTES). `crc32c_generic` is
/// libcrc32c's soft dependency (`softdep=pre: crc32c`, an alias no file is named after), which
/// nf_conntrack's init needs.
pub const MODULES: &[&str] = &[
    "kvm-amd",
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "tun",
    "veth",
    "bridge",
    "sch_ingress",
    "cls_u32",
    "act_mirred",
    "crc32c_generic",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
];

/// The file in a cached L1 kernel's directory that lists its modules in load order.
const ORDER_FILE: &str = "modules.order";

/// A ready L1 kernel.
#[derive(Debug, Clone)]
pub struct L1Kernel {
    pub vmlinux: PathBuf,
    /// The `.ko` files of [`MODULES`] and their dependencies, in load order.
    pub modules: Vec<PathBuf>,
    /// `linux-image-6.1.0-N-amd64 <version>`.
    pub package: String,
}

fn cache_root() -> PathBuf {
    paths::cache().join("l1-kernel")
}

/// The cache key of a package name and version.
pub fn input_hash(package: &str, version: &str) -> String {
    let mut h = Sha256::new();
    for part in [RECIPE, package, version]
        .into_iter()
        .chain(MODULES.iter().copied())
    {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())[..16].to_string()
}

/// The kernel package `apt-cache depends linux-image-amd64` names.
pub fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_string)
}

/// The `Version:` field of `apt-cache show`.
pub fn parse_version(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
}

/// The package and version APT would download now, if its lists know one.
fn candidate() -> Result<(String, String)> {
    let deps = output(Command::new("apt-cache").args(["depends", META_PACKAGE]))?;
    let package = parse_depends(&deps)
        .with_context(|| format!("`apt-cache depends {META_PACKAGE}` names no kernel package"))?;
    let show = output(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))?;
    let version = parse_version(&show)
        .with_context(|| format!("`apt-cache show {package}` gives no version"))?;
    Ok((package, version))
}

fn load(dir: &Path) -> Option<L1Kernel> {
    let vmlinux = dir.join("vmlinux");
    let order = std::fs::read_to_string(dir.join(ORDER_FILE)).ok()?;
    let modules: Vec<PathBuf> = order
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|m| dir.join(format!("{}.ko", m.trim())))
        .collect();
    let package = std::fs::read_to_string(dir.join("package")).ok()?;
    (vmlinux.is_file() && modules.iter().all(|m| m.is_file())).then(|| L1Kernel {
        vmlinux,
        modules,
        package: package.trim().to_string(),
    })
}

/// The most recently made L1 kernel in the cache, whatever its package.
fn newest_cached() -> Option<(PathBuf, L1Kernel)> {
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(cache_root())
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().contains(".tmp"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dirs.sort();
    dirs.into_iter()
        .rev()
        .find_map(|(_, d)| load(&d).map(|k| (d, k)))
}

/// One line for `doctor`: where the L1 kernel is, or how it will be fetched.
pub fn describe() -> String {
    match candidate() {
        Ok((package, version)) => {
            let dir = cache_root().join(input_hash(&package, &version));
            if load(&dir).is_some() {
                format!("L1 kernel {package} {version} cached in {}", dir.display())
            } else {
                format!(
                    "L1 kernel {package} {version}: fetched by the first `cargo xtask test` (apt-get download, ~70 MB)"
                )
            }
        }
        Err(_) => match newest_cached() {
            Some((dir, k)) => format!("L1 kernel {} cached in {}", k.package, dir.display()),
            None => format!(
                "L1 kernel: APT knows no {META_PACKAGE} — run `apt-get update`, then `cargo xtask test` fetches it"
            ),
        },
    }
}

/// The L1 kernel: from the cache, else downloaded and extracted into it.
pub fn get() -> Result<L1Kernel> {
    let (package, version) = match candidate() {
        Ok(pv) => pv,
        Err(e) => {
            // Offline with stale APT lists: any L1 kernel made before does the job.
            if let Some((dir, k)) = newest_cached() {
                step(&format!(
                    "nested: APT names no kernel ({e:#}); using the cached {} in {}",
                    k.package,
                    dir.display()
                ));
                return Ok(k);
            }
            return Err(e.context(format!(
                "finding Debian's kernel package for L1 — run `apt-get update` so APT knows {META_PACKAGE}"
            )));
        }
    };
    let hash = input_hash(&package, &version);
    let dir = cache_root().join(&hash);
    if let Some(k) = load(&dir) {
        step(&format!(
            "nested: L1 kernel cached: {} (inputs {hash})",
            k.package
        ));
        return Ok(k);
    }
    make(&package, &version, &dir)?;
    load(&dir).with_context(|| format!("{} is incomplete after extraction", dir.display()))
}

fn make(package: &str, version: &str, dir: &Path) -> Result<()> {
    let start = Instant::now();
    step(&format!(
        "nested: L1 kernel: apt-get download {package}={version}, extracting vmlinux and {} with their dependencies",
        MODULES.join(", ")
    ));
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = fill(package, version, &tmp);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    println!("    L1 kernel in {} ({})", dir.display(), elapsed(start));
    Ok(())
}

fn fill(package: &str, version: &str, out: &Path) -> Result<()> {
    let work = out.join("work");
    std::fs::create_dir_all(&work)?;
    // As root, APT's download sandbox user `_apt` cannot write here; the file is APT's own
    // verified download either way.
    output(
        Command::new("apt-get")
            .current_dir(&work)
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .arg(format!("{package}={version}")),
    )
    .context("downloading the L1 kernel package (Debian's mirror)")?;
    let deb = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;

    // Unpack the kernel and every module (~390 MB, ~3 s); the ones L1 loads are kept.
    let tree = work.join("tree");
    std::fs::create_dir_all(&tree)?;
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting dpkg-deb")?;
    // Debian 12 ships plain `.ko` files (a pattern that matches nothing fails tar).
    let patterns = ["*/vmlinuz-*", "*.ko"];
    let tar = Command::new("tar")
        .args(["-x", "--wildcards", "-C"])
        .arg(&tree)
        .args(patterns)
        .stdin(dpkg.stdout.take().expect("piped"))
        .output()
        .context("starting tar")?;
    let dpkg_status = dpkg.wait()?;
    if !dpkg_status.success() || !tar.status.success() {
        bail!(
            "unpacking {} failed (dpkg-deb {dpkg_status}, tar {}): {}",
            deb.display(),
            tar.status,
            String::from_utf8_lossy(&tar.stderr).trim()
        );
    }
    let files = walk(&tree);
    let find = |pred: &dyn Fn(&str) -> bool, what: &str| -> Result<PathBuf> {
        files
            .iter()
            .find(|p| p.file_name().is_some_and(|n| pred(&n.to_string_lossy())))
            .cloned()
            .with_context(|| format!("{} has no {what}", deb.display()))
    };
    let vmlinuz = find(&|n| n.starts_with("vmlinuz-"), "/boot/vmlinuz-*")?;
    bzimage::extract_vmlinux(&vmlinuz, &out.join("vmlinux"))?;
    match husk_hypervisor::kernel::pvh_entry(&out.join("vmlinux")) {
        Ok(Some(_)) => {}
        Ok(None) => {
            bail!("the vmlinux of {package} has no PVH entry note; QEMU cannot boot it directly")
        }
        Err(e) => bail!("the vmlinux of {package}: {e}"),
    }
    // Every module file by its name (`kvm-amd` and `kvm_amd` alike: `depends=` uses `_`).
    let mut by_name = std::collections::BTreeMap::new();
    for f in &files {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        if let Some((stem, _)) = name.split_once(".ko") {
            by_name.insert(module_key(stem), f.clone());
        }
    }
    let mut plain_of = std::collections::BTreeMap::new();
    let order = load_order(MODULES, |m| {
        let ko = by_name
            .get(&module_key(m))
            .with_context(|| format!("{} has no module {m}", deb.display()))?;
        let stem = ko
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .split_once(".ko")
            .map(|(s, _)| s.to_string())
            .unwrap_or_default();
        let dest = out.join(format!("{stem}.ko"));
        let name = ko.file_name().unwrap_or_default().to_string_lossy();
        match name.rsplit_once(".ko.") {
            Some((_, "xz")) => decompress("xz", ko, &dest)?,
            Some((_, "zst")) => decompress("zstd", ko, &dest)?,
            Some((_, other)) => bail!("{}: unknown module compression .{other}", ko.display()),
            None => {
                std::fs::copy(ko, &dest)?;
            }
        }
        let bytes = std::fs::read(&dest)?;
        let info = modinfo(&bytes).with_context(|| format!("reading {}", ko.display()))?;
        plain_of.insert(module_key(m), stem);
        Ok(dependencies(&info))
    })?;
    let stems: Vec<String> = order
        .iter()
        .map(|m| {
            plain_of
                .get(&module_key(m))
                .cloned()
                .unwrap_or_else(|| m.clone())
        })
        .collect();
    std::fs::write(out.join(ORDER_FILE), stems.join("\n") + "\n")?;
    std::fs::write(out.join("package"), format!("{package} {version}\n"))?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// A module's name as `depends=` spells it (`kvm-amd.ko` is `kvm_amd`).
pub fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

/// The `key=value` strings of a module's `.modinfo` section.
pub fn modinfo(ko: &[u8]) -> Result<Vec<(String, String)>> {
    let elf = goblin::elf::Elf::parse(ko).map_err(|e| anyhow::anyhow!("not an ELF module: {e}"))?;
    let section = elf
        .section_headers
        .iter()
        .find(|sh| elf.shdr_strtab.get_at(sh.sh_name) == Some(".modinfo"))
        .context("no .modinfo section")?;
    let range = section
        .file_range()
        .filter(|r| r.end <= ko.len())
        .context(".modinfo lies outside the file")?;
    Ok(ko[range]
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = std::str::from_utf8(kv).ok()?;
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect())
}

/// What a module needs loaded before it: its `depends=` (comma-separated). A `softdep=`
/// names aliases, not files: [`MODULES`] names such a module itself.
pub fn dependencies(info: &[(String, String)]) -> Vec<String> {
    let mut deps = Vec::new();
    for (k, v) in info {
        if k == "depends" {
            deps.extend(v.split(',').filter(|d| !d.is_empty()).map(str::to_string));
        }
    }
    deps
}

/// `wanted` and everything they depend on, dependencies first, each once; `deps` gives a
/// module's dependencies (and may fail: an unknown module). A cycle is an error.
pub fn load_order(
    wanted: &[&str],
    mut deps: impl FnMut(&str) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    fn visit(
        m: &str,
        deps: &mut dyn FnMut(&str) -> Result<Vec<String>>,
        done: &mut Vec<String>,
        path: &mut Vec<String>,
    ) -> Result<()> {
        let key = module_key(m);
        if done.iter().any(|d| module_key(d) == key) {
            return Ok(());
        }
        if path.contains(&key) {
            bail!("module dependency cycle: {} -> {m}", path.join(" -> "));
        }
        path.push(key);
        for d in deps(m)? {
            visit(&d, deps, done, path)?;
        }
        path.pop();
        done.push(m.to_string());
        Ok(())
    }
    let mut done = Vec::new();
    for m in wanted {
        visit(m, &mut deps, &mut done, &mut Vec::new())?;
    }
    Ok(done)
}

/// `tool -dc src > dest` (insmod in L1 wants plain `.ko` files).
fn decompress(tool: &str, src: &Path, dest: &Path) -> Result<()> {
    let f = std::fs::File::create(dest)?;
    let st = Command::new(tool)
        .arg("-dc")
        .arg(src)
        .stdout(f)
        .status()
        .with_context(|| format!("starting {tool}"))?;
    if !st.success() {
        bail!("{tool} -dc {} failed ({st})", src.display());
    }
    Ok(())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_apt_cache_output() {
        let deps = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            parse_depends(deps).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
        let show = "Package: linux-image-6.1.0-57-amd64\nSource: linux-signed-amd64 (6.1.192+3)\nVersion: 6.1.192-3\n";
        assert_eq!(parse_version(show).as_deref(), Some("6.1.192-3"));
    }

    #[test]
    fn hash_follows_package_and_version() {
        let a = input_hash("linux-image-6.1.0-57-amd64", "6.1.192-3");
        assert_eq!(a, input_hash("linux-image-6.1.0-57-amd64", "6.1.192-3"));
        assert_ne!(a, input_hash("linux-image-6.1.0-58-amd64", "6.1.193-1"));
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn modules_load_after_their_dependencies_once() {
        let deps = |m: &str| -> Result<Vec<String>> {
            Ok(match m {
                "kvm-amd" => vec!["kvm".into(), "ccp".into()],
                "kvm" => vec!["irqbypass".into()],
                "nft_nat" => vec!["nf_tables".into(), "nf_nat".into()],
                "nf_nat" => vec!["nf_conntrack".into(), "libcrc32c".into()],
                "nf_tables" => vec!["libcrc32c".into()],
                "irqbypass" | "ccp" | "nf_conntrack" | "libcrc32c" => vec![],
                other => bail!("no module {other}"),
            })
        };
        assert_eq!(
            load_order(&["kvm-amd", "nft_nat", "kvm_amd"], deps).unwrap(),
            [
                "irqbypass",
                "kvm",
                "ccp",
                "kvm-amd",
                "libcrc32c",
                "nf_tables",
                "nf_conntrack",
                "nf_nat",
                "nft_nat"
            ]
        );
        let e = load_order(&["tun"], deps).unwrap_err().to_string();
        assert!(e.contains("no module tun"), "{e}");
        let cyclic = |m: &str| -> Result<Vec<String>> {
            Ok(vec![if m == "a" { "b" } else { "a" }.to_string()])
        };
        let e = load_order(&["a"], cyclic).unwrap_err().to_string();
        assert!(e.contains("cycle: a -> b -> a"), "{e}");
    }

    #[test]
    fn reads_depends_from_modinfo() {
        let info = vec![
            ("license".to_string(), "GPL".to_string()),
            ("depends".to_string(), "kvm,ccp".to_string()),
            ("name".to_string(), "kvm_amd".to_string()),
        ];
        assert_eq!(dependencies(&info), ["kvm", "ccp"]);
        let none = vec![("depends".to_string(), String::new())];
        assert!(dependencies(&none).is_empty());
        assert!(modinfo(b"not an elf").is_err());
    }
}
