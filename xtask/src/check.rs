//! `cargo xtask check`: the habits CI holds the tree to, beside the test suite: formatting,
//! clippy on every target with warnings as errors, and the unit tests of every crate.
//!
//! Unit tests are the `#[cfg(test)]` modules of each crate's library and binaries: they need
//! no VM, no containerd and nothing `setup` installs beyond [`setup::CHECK_PACKAGES`] (protoc,
//! busybox-static, cpio), which `check` installs itself: it runs first in CI, on a machine
//! with nothing else installed. Everything under a crate's `tests/` — the VM, containerd and CRI tiers of
//! `tests/tests/`, `protocols/tests/`, `xtask/tests/` — runs in `cargo xtask test`.
//!
//! All three run even when one fails, so one CI run shows every problem.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::run::{self, elapsed, step};
use crate::{paths, setup};

const STEPS: &[(&str, &[&str])] = &[
    ("formatting", &["fmt", "--all", "--check"]),
    (
        "clippy",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            // Every crate's warnings, not only those of the first crate that fails.
            "--keep-going",
            "--",
            "-D",
            "warnings",
        ],
    ),
    ("unit tests", &["test", "--workspace", "--lib", "--bins"]),
];

pub fn run() -> Result<()> {
    let start = Instant::now();
    setup::for_check()?;
    let mut failed = Vec::new();
    for (what, args) in STEPS {
        step(&format!("check: cargo {}", args.join(" ")));
        let result = run::run(
            Command::new(paths::cargo())
                .current_dir(paths::workspace())
                .args(*args),
        );
        if let Err(e) = result {
            println!("    {what} failed: {e:#}");
            failed.push(*what);
        }
    }
    if !failed.is_empty() {
        bail!("check failed ({}): {}", elapsed(start), failed.join(", "));
    }
    println!("    check passed in {}", elapsed(start));
    Ok(())
}
