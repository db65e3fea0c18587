//! Alternation and progress: each round runs husk then the baseline (A B A B …), so the
//! drift of a shared machine hits both sides; a line per round shows where the run is.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Runs that failed since the last [`take_failures`]: a failed run is a result (left out of
/// the figures, named in the report), not the end of the scenario.
static FAILURES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// A side may fail this many runs of one scenario before the scenario gives up.
const MAX_FAILURES: usize = 3;

/// The failed runs recorded since the last call.
pub fn take_failures() -> Vec<String> {
    std::mem::take(&mut *FAILURES.lock().unwrap_or_else(|e| e.into_inner()))
}

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM no longer end the bench at once: they set a flag that every run checks,
/// so the bench stops at the next run and its cleanup (containers, VMs, containerd) still
/// happens.
pub fn catch_interrupts() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }
            .with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once Ctrl-C (or SIGTERM) was received.
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs `rounds` rounds of `f(side)` for sides 0 (husk) and 1 (baseline), alternating, after
/// `warmup` unrecorded rounds; prints one progress line per round. Returns each side's values.
#[allow(clippy::needless_range_loop)] // side indexes labels and results together
pub fn alternate(
    what: &str,
    labels: [&str; 2],
    unit: &str,
    warmup: usize,
    rounds: usize,
    mut f: impl FnMut(usize) -> Result<f64>,
) -> Result<[Vec<f64>; 2]> {
    for w in 0..warmup {
        for side in 0..2 {
            check_interrupt()?;
            f(side).with_context(|| format!("{what}: warm-up {} on {}", w + 1, labels[side]))?;
        }
    }
    let mut out = [Vec::with_capacity(rounds), Vec::with_capacity(rounds)];
    let mut failed = [0usize; 2];
    for r in 0..rounds {
        let mut shown = String::new();
        for side in 0..2 {
            check_interrupt()?;
            match f(side) {
                Ok(v) => {
                    shown.push_str(&format!("  {} {}", labels[side], fmt(v, unit)));
                    out[side].push(v);
                }
                Err(e) => {
                    let e = e.context(format!("{what}: run {} on {}", r + 1, labels[side]));
                    failed[side] += 1;
                    if failed[side] >= MAX_FAILURES {
                        return Err(
                            e.context(format!("{MAX_FAILURES} runs failed on {}", labels[side]))
                        );
                    }
                    shown.push_str(&format!("  {} FAILED", labels[side]));
                    FAILURES
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("{e:#}"));
                }
            }
        }
        println!("    {what} {:>2}/{rounds}:{shown}", r + 1);
        let _ = std::io::stdout().flush();
    }
    Ok(out)
}

fn fmt(v: f64, unit: &str) -> String {
    format!("{} {unit}", super::stats::fmt_num(v))
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One timed command: wall time to exit, and to its first stdout byte.
#[derive(Debug, Clone)]
pub struct Timed {
    /// Wall clock at spawn, to line up with log timestamps.
    pub started_at: SystemTime,
    pub first_byte: Option<Duration>,
    pub last_byte: Option<Duration>,
    pub total: Duration,
    /// Bytes on stdout in all.
    pub bytes: u64,
    /// The first MiB of stdout.
    pub stdout: Vec<u8>,
}

const KEEP: usize = 1 << 20;

/// Spawns `cmd` (stdout piped, stderr captured) and times it; fails unless it exits 0.
pub fn timed(cmd: &mut Command, deadline: Duration) -> Result<Timed> {
    let started_at = SystemTime::now();
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", crate::run::show(cmd)))?;
    let mut stdout = child.stdout.take().context("piped stdout")?;
    let mut stderr = child.stderr.take().context("piped stderr")?;
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let (mut first, mut last, mut bytes) = (None, None, 0u64);
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            first.get_or_insert_with(|| start.elapsed());
            last = Some(start.elapsed());
            bytes += n as u64;
            if all.len() < KEEP {
                all.extend_from_slice(&buf[..n.min(KEEP - all.len())]);
            }
        }
        (first, last, bytes, all)
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{}` did not end within {deadline:?}",
                crate::run::show(cmd)
            );
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    let total = start.elapsed();
    let (first_byte, last_byte, bytes, out) = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "`{}` failed ({status}): {}{}",
            crate::run::show(cmd),
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
    }
    Ok(Timed {
        started_at,
        first_byte,
        last_byte,
        total,
        bytes,
        stdout: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternates_and_keeps_going_past_a_failed_run() {
        let mut order = Vec::new();
        let mut n = 0;
        let v = alternate("t", ["a", "b"], "ms", 1, 3, |side| {
            n += 1;
            order.push(side);
            if n == 4 {
                bail!("boom");
            }
            Ok(f64::from(n))
        })
        .unwrap();
        assert_eq!(order, [0, 1, 0, 1, 0, 1, 0, 1]);
        // Warm-up (1, 2) is not recorded; run 4 failed on side b.
        assert_eq!(v, [vec![3.0, 5.0, 7.0], vec![6.0, 8.0]]);
        let f = take_failures();
        assert!(
            f.len() == 1 && f[0].contains("t: run 1 on b") && f[0].contains("boom"),
            "{f:?}"
        );
        let e = alternate("u", ["a", "b"], "ms", 0, 5, |side| {
            if side == 0 {
                bail!("no")
            } else {
                Ok(1.0)
            }
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("3 runs failed on a"), "{e:#}");
        take_failures();
    }
}
