//! Running commands: say what runs, fail with what it printed.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// A step header, so a long run reads as a list of what happened.
pub fn step(what: &str) {
    println!("==> {what}");
}

/// Runs `cmd` with its output shown; fails naming the command.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly; returns stdout, or fails with stdout and stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = show(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `1m23s` / `4.2s`.
pub fn elapsed(since: Instant) -> String {
    let s = since.elapsed().as_secs_f64();
    if s >= 60.0 {
        format!("{}m{:02}s", (s / 60.0).floor(), (s % 60.0).floor())
    } else {
        format!("{s:.1}s")
    }
}
