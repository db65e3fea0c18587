//! The xtask binary builds from bare Rust: nothing `cargo xtask setup` installs may be needed
//! to compile it, or the README's two commands cannot start on a fresh machine (issue 14: the
//! CRI client's build script ran protoc before `setup` could install it).
//!
//! Two checks, each failing on its own:
//! - xtask's build graph (normal and build dependencies, with the features xtask asks for)
//!   holds no crate known to run protoc at build time (k8s-cri, prost-build, tonic-build, …);
//! - `cargo build -p xtask` succeeds with a PATH that has only cargo, rustc, cc, as and ld
//!   (no protoc, pkg-config, qemu-system-*, containerd, ctr, runc, CNI plugins, virtiofsd,
//!   vhost-device-vsock, make, …), `PROTOC` unset, and none of the caller's environment but
//!   home, toolchain and network settings. It builds in a target directory of its own under
//!   `target/tmp/` (kept between runs, so a rerun takes seconds): no build script result from
//!   the main target directory, where protoc was at hand, can stand in for one that needs it.
//!   A crate new to the graph is built there for the first time, under the reduced PATH.
//!
//! These are xtask's own tests rather than `tests/`'s: `cargo test -p xtask` builds only
//! xtask's graph, so the check itself runs on a machine without protoc.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Crates whose build script needs a protoc binary (or fetches or builds one).
const PROTOC_CRATES: &[&str] = &[
    "k8s-cri",
    "prost-build",
    "tonic-build",
    "tonic-prost-build",
    "protobuf-src",
];
/// Any crate named `protoc*` (protoc-rust, protoc-bin-vendored, protoc-prebuilt, …).
const PROTOC_PREFIX: &str = "protoc";

/// The only programs the build may find: what a machine with just Rust and gcc has.
const TOOLS: &[&str] = &["cargo", "rustc", "cc", "as", "ld"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The cargo running this test, not a rustup proxy: the toolchain's own binary.
fn cargo() -> PathBuf {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO")))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Where each tool of [`TOOLS`] is on this machine: cargo is the running one, rustc the one
/// beside it (same toolchain), the rest from PATH.
fn tool(name: &str) -> PathBuf {
    let found = match name {
        "cargo" => Some(cargo()),
        "rustc" => cargo()
            .parent()
            .map(|d| d.join("rustc"))
            .filter(|p| p.is_file())
            .or_else(|| find_in_path("rustc")),
        _ => find_in_path(name),
    };
    found.unwrap_or_else(|| {
        panic!("{name} not found on PATH: a machine with Rust and gcc has it (binutils: as, ld)")
    })
}

/// A directory of symlinks to [`TOOLS`], and nothing else, to be the build's whole PATH.
fn bare_path_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    for name in TOOLS {
        std::os::unix::fs::symlink(tool(name), dir.path().join(name))
            .unwrap_or_else(|e| panic!("linking {name} into {}: {e}", dir.path().display()));
    }
    dir
}

/// Whether the build may see this variable of the caller's environment: home, toolchain and
/// registry/network settings. Everything else (PROTOC, PROTOC_INCLUDE, CC, PKG_CONFIG_PATH,
/// RUSTFLAGS, CARGO_TARGET_DIR, the CARGO_* cargo sets for this test, …) is left out.
fn kept(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "HOME",
        "USER",
        "LANG",
        "TERM",
        "TMPDIR",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
    ];
    const PREFIXES: &[&str] = &[
        "LC_",
        "SSL_CERT_",
        "CARGO_HTTP_",
        "CARGO_NET_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
    ];
    EXACT.contains(&name)
        || PREFIXES.iter().any(|p| name.starts_with(p))
        || name.to_ascii_lowercase().ends_with("_proxy")
}

/// A cargo command in the workspace with the bare PATH and the filtered environment.
fn bare_cargo(path_dir: &Path) -> Command {
    let mut cmd = Command::new(path_dir.join("cargo"));
    cmd.current_dir(workspace()).env_clear();
    for (k, v) in std::env::vars_os() {
        if k.to_str().is_some_and(kept) {
            cmd.env(k, v);
        }
    }
    cmd.env("PATH", path_dir);
    cmd
}

fn describe(what: &str, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    format!(
        "{what} failed ({}); last lines of its output:\n{}",
        out.status,
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

/// The packages of `cargo tree` output lines (`name vX.Y.Z [(path)] [(*)]`).
fn tree_packages(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn protoc_crates(packages: &BTreeSet<String>) -> Vec<&str> {
    packages
        .iter()
        .map(String::as_str)
        .filter(|p| PROTOC_CRATES.contains(p) || p.starts_with(PROTOC_PREFIX))
        .collect()
}

#[test]
fn no_crate_in_xtasks_build_graph_runs_protoc() {
    let path = bare_path_dir();
    let out = bare_cargo(path.path())
        .args(["tree", "--locked", "-p", "xtask", "-e", "normal,build"])
        .args(["--prefix", "none", "--format", "{p}"])
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "{}",
        describe("cargo tree -p xtask", &out)
    );
    let packages = tree_packages(&String::from_utf8_lossy(&out.stdout));
    assert!(
        packages.contains("husk-tests") && packages.contains("protobuf"),
        "cargo tree gave an unexpected graph: {packages:?}"
    );
    let bad = protoc_crates(&packages);
    assert!(
        bad.is_empty(),
        "xtask's build graph holds {bad:?}, whose build scripts need protoc — which only \
         `cargo xtask setup` installs, so xtask would not compile on a fresh machine. Keep \
         such crates out of xtask (husk-tests' CRI client is behind its `cri` feature: xtask \
         must depend on husk-tests with `default-features = false`)."
    );
}

#[test]
fn xtask_builds_with_only_rust_and_gcc_on_path() {
    let path = bare_path_dir();
    let entries: BTreeSet<OsString> = std::fs::read_dir(path.path())
        .expect("reading the PATH directory")
        .map(|e| e.expect("directory entry").file_name())
        .collect();
    assert_eq!(
        entries,
        TOOLS.iter().map(OsString::from).collect::<BTreeSet<_>>()
    );
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xtask-bootstrap");
    let out = bare_cargo(path.path())
        .args(["build", "--locked", "-p", "xtask", "--target-dir"])
        .arg(&target)
        // Without debug info: a third of the disk and link time, and nothing this test is about.
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .output()
        .expect("running cargo build");
    assert!(
        out.status.success(),
        "{}\n(the build ran with PATH={} holding only {TOOLS:?}, and PROTOC unset: \
         something needed to compile xtask is missing from a machine that has only Rust)",
        describe("cargo build -p xtask", &out),
        path.path().display()
    );
    let xtask = target.join("debug").join("xtask");
    let help = Command::new(&xtask)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", xtask.display()));
    assert!(help.status.success(), "{}", describe("xtask --help", &help));
}

#[test]
fn reads_cargo_tree_and_spots_protoc_crates() {
    let tree = "xtask v0.1.0 (/w/xtask)\nhusk-tests v0.1.0 (/w/tests)\nk8s-cri v0.11.0\n\
                prost-build v0.14.1 (*)\nprotobuf-parse v3.7.2\nprotoc-bin-vendored v3.1.0\n";
    let p = tree_packages(tree);
    assert_eq!(
        protoc_crates(&p),
        ["k8s-cri", "prost-build", "protoc-bin-vendored"]
    );
}
