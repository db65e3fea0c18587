//! `cargo xtask kernel`: the guest `vmlinux` from Debian's `linux-source-6.1` and our Kconfig
//! fragments, cached outside the clone by a hash of its inputs.
//!
//! Layout of the cache (`/var/cache/husk` or `HUSK_CACHE_DIR`):
//! - `kernel-src/<package version>/linux-source-6.1/`: the unpacked source, shared by builds;
//! - `kernel/<hash>/build/`: the out-of-tree build (`make O=`), kept for incremental rebuilds;
//! - `kernel/<hash>/vmlinux` + `config`: the result. Present means done: a rebuild with no
//!   change takes as long as hashing the fragments.
//!
//! The checkout's `target/husk/vmlinux` is a symlink to the cached result.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::kconfig;
use crate::paths;
use crate::run::{elapsed, output, run, step};

const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Bump when the build procedure below changes, so cached kernels are rebuilt.
const RECIPE: &str = "husk-kernel-recipe-1";

fn fragments_dir() -> PathBuf {
    paths::workspace().join("guest-kernel-config")
}

/// The fragments to merge, in order: every `*.config`, plus the debug one when asked.
pub fn fragments(debug: bool) -> Result<Vec<PathBuf>> {
    let dir = fragments_dir();
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "config"))
        .collect();
    v.sort();
    if debug {
        v.push(dir.join("debug.config.optional"));
    }
    Ok(v)
}

fn source_version() -> Result<String> {
    let v = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", SOURCE_PACKAGE])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if v.is_empty() || !Path::new(SOURCE_TARBALL).exists() {
        bail!("{SOURCE_PACKAGE} is not installed ({SOURCE_TARBALL} missing) — run `cargo xtask setup`");
    }
    Ok(v)
}

/// The cache key: source version, recipe, and every fragment's name and bytes.
pub fn input_hash(version: &str, fragments: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    h.update(RECIPE.as_bytes());
    h.update([0]);
    h.update(version.as_bytes());
    h.update([0]);
    for f in fragments {
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        h.update([0]);
        h.update(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
        h.update([0]);
    }
    Ok(hex::encode(h.finalize())[..16].to_string())
}

/// Unpacks the source once per package version.
fn source_tree(version: &str) -> Result<PathBuf> {
    let base = paths::cache().join("kernel-src").join(version);
    let tree = base.join(SOURCE_PACKAGE);
    let done = base.join(".unpacked");
    if done.exists() {
        return Ok(tree);
    }
    step(&format!(
        "kernel: unpacking {SOURCE_TARBALL} into {}",
        base.display()
    ));
    if tree.exists() {
        std::fs::remove_dir_all(&tree)
            .with_context(|| format!("removing partial {}", tree.display()))?;
    }
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(SOURCE_TARBALL)
        .arg("-C")
        .arg(&base))?;
    std::fs::write(&done, version)?;
    Ok(tree)
}

fn make(src: &Path, build: &Path) -> Command {
    let mut c = Command::new("make");
    c.current_dir(src)
        .arg(format!("O={}", build.display()))
        .arg("ARCH=x86_64");
    c
}

/// Builds (or finds in the cache) the vmlinux; links it at `target/husk/vmlinux`.
pub fn build(debug: bool) -> Result<PathBuf> {
    let version = source_version()?;
    let frags = fragments(debug)?;
    let hash = input_hash(&version, &frags)?;
    let out_dir = paths::cache().join("kernel").join(&hash);
    let vmlinux = out_dir.join("vmlinux");
    // Two `cargo xtask` runs at once (a test run beside a demo) would build into the same
    // directory and break each other's objects: the second waits for the first.
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let lock_path = out_dir.join(".lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", lock_path.display()))?;
    if vmlinux.is_file() {
        step(&format!(
            "kernel: cached {} (inputs {hash})",
            vmlinux.display()
        ));
    } else {
        build_into(&version, &frags, &out_dir)?;
    }
    link_into_checkout(&vmlinux)?;
    Ok(vmlinux)
}

fn build_into(version: &str, frags: &[PathBuf], out_dir: &Path) -> Result<()> {
    let start = Instant::now();
    let src = source_tree(version)?;
    let build = out_dir.join("build");
    std::fs::create_dir_all(&build).with_context(|| format!("creating {}", build.display()))?;
    step(&format!(
        "kernel: configuring {SOURCE_PACKAGE} {version}: tinyconfig + {} fragments",
        frags.len()
    ));
    output(make(&src, &build).arg("tinyconfig"))?;
    let config = build.join(".config");
    output(
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&src)
            .env("ARCH", "x86_64")
            .arg("-m")
            .arg("-O")
            .arg(&build)
            .arg(&config)
            .args(frags),
    )?;
    output(make(&src, &build).arg("olddefconfig"))?;
    check_config(&src, frags, &config)?;

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    step(&format!(
        "kernel: building vmlinux with {jobs} jobs (a cold build takes minutes)"
    ));
    compile_with_progress(
        make(&src, &build).arg(format!("-j{jobs}")).arg("vmlinux"),
        start,
    )?;

    let built = build.join("vmlinux");
    match husk_hypervisor::kernel::pvh_entry(&built) {
        Ok(Some(_)) => {}
        Ok(None) => bail!(
            "{}: no PVH entry note — is CONFIG_PVH set?",
            built.display()
        ),
        Err(e) => bail!("{}: {e}", built.display()),
    }
    std::fs::copy(&config, out_dir.join("config"))?;
    // Copy, then rename: a reader never sees a half-written kernel.
    let tmp = out_dir.join("vmlinux.tmp");
    std::fs::copy(&built, &tmp)?;
    std::fs::rename(&tmp, out_dir.join("vmlinux"))?;
    let size = std::fs::metadata(out_dir.join("vmlinux"))?.len();
    step(&format!(
        "kernel: built {} ({:.1} MB) in {}",
        out_dir.join("vmlinux").display(),
        size as f64 / 1e6,
        elapsed(start)
    ));
    Ok(())
}

/// Fails naming every symbol a fragment asked for that Kconfig did not keep.
fn check_config(src: &Path, frags: &[PathBuf], config: &Path) -> Result<()> {
    let mut requests = Vec::new();
    for f in frags {
        let name = f
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        requests.extend(kconfig::parse(&name, &std::fs::read_to_string(f)?));
    }
    let final_config = kconfig::parse_config(&std::fs::read_to_string(config)?);
    let known = kconfig::known_symbols(src).context("reading the kernel's Kconfig files")?;
    let dropped = kconfig::check(&requests, &final_config, Some(&known));
    if !dropped.is_empty() {
        let list: Vec<String> = dropped.iter().map(|d| format!("  {d}")).collect();
        bail!(
            "the kernel configuration lost {} symbol(s) the fragments in guest-kernel-config/ ask for:\n{}\n\
             Fix the fragment (add the missing dependency, or use this kernel's name for the symbol); \
             the merged config is {}",
            dropped.len(),
            list.join("\n"),
            config.display()
        );
    }
    println!(
        "    all {} requested symbols are set as asked",
        requests.len()
    );
    Ok(())
}

/// Runs the compile, printing a progress line every 15 s (objects built, time so far) and the
/// last lines of output if it fails.
fn compile_with_progress(cmd: &mut Command, start: Instant) -> Result<()> {
    let shown = crate::run::show(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{shown}`"))?;
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
            .collect::<Vec<_>>()
    });
    let mut objects = 0usize;
    let mut tail: Vec<String> = Vec::new();
    let mut last_report = Instant::now();
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(|l| l.ok())
    {
        if line.trim_start().starts_with("CC ") || line.trim_start().starts_with("AS ") {
            objects += 1;
        }
        tail.push(line);
        if tail.len() > 30 {
            tail.remove(0);
        }
        if last_report.elapsed() >= Duration::from_secs(15) {
            println!("    kernel: {objects} objects compiled, {}", elapsed(start));
            last_report = Instant::now();
        }
    }
    let status = child.wait()?;
    let errors = err_thread.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "`{shown}` failed ({status}); last output:\n{}\n{}",
            tail.join("\n"),
            errors[errors.len().saturating_sub(30)..].join("\n")
        );
    }
    println!("    kernel: {objects} objects compiled");
    Ok(())
}

fn link_into_checkout(vmlinux: &Path) -> Result<()> {
    let dest = paths::vmlinux();
    std::fs::create_dir_all(paths::artifacts())?;
    let _ = std::fs::remove_file(&dest);
    std::os::unix::fs::symlink(vmlinux, &dest)
        .with_context(|| format!("linking {} to {}", dest.display(), vmlinux.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_changes_with_any_input() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("00-a.config");
        std::fs::write(&a, "CONFIG_X=y\n").unwrap();
        let h1 = input_hash("6.1.192-3", std::slice::from_ref(&a)).unwrap();
        assert_eq!(
            h1,
            input_hash("6.1.192-3", std::slice::from_ref(&a)).unwrap()
        );
        assert_ne!(
            h1,
            input_hash("6.1.193-1", std::slice::from_ref(&a)).unwrap()
        );
        std::fs::write(&a, "CONFIG_X=n\n").unwrap();
        assert_ne!(h1, input_hash("6.1.192-3", &[a]).unwrap());
    }

    #[test]
    fn fragments_are_sorted_and_debug_is_optional() {
        let f = fragments(false).unwrap();
        assert!(f.windows(2).all(|w| w[0] < w[1]));
        assert!(f.iter().all(|p| p.extension().unwrap() == "config"));
        assert_eq!(fragments(true).unwrap().len(), f.len() + 1);
    }
}
