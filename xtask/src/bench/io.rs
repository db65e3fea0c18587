//! Scenario 7, I/O: sequential write and read of a file on the container's rootfs (husk:
//! virtio-fs to virtiofsd over the overlay snapshot; runc: the overlay itself), timed with
//! busybox `time -p` inside the container, and stdout throughput (`head -c N /dev/zero` in
//! the container, read by the bench through ctr).

use std::time::Duration;

use anyhow::{Context, Result};

use super::env::Env;
use super::results::Scenario;
use super::runner::{alternate, timed};
use super::scenarios::Sides;

/// The file is read this many times over, so that a fast read still spans many of `time`'s
/// 10 ms ticks.
const READ_PASSES: u32 = 32;

/// Seconds from a `time -p` line (`real 1.23`).
pub fn real_secs(line: &str) -> Option<f64> {
    line.trim().strip_prefix("real ")?.trim().parse().ok()
}

pub fn run(env: &Env, sides: &Sides, rounds: usize, mib: u32) -> Result<Scenario> {
    let mut sc = Scenario::new(
        7,
        "I/O",
        format!(
            "In one container per run: `dd if=/dev/zero of=/bench.dat bs=1M count={mib} \
             conv=fsync` (to the host's disk on both sides: virtiofsd passes the fsync on), \
             then {READ_PASSES} reads of it back in a row, `dd if=/bench.dat of=/dev/null \
             bs=1M` (timed together), then `head -c \
             {mib}M /dev/zero >/dev/null` (the container's own cost of making the bytes that \
             the stdout test sends), each timed by busybox `time -p` (10 ms resolution) inside \
             the container. The read is served from the host's page cache on both sides: husk \
             reads with `iflag=direct` so that the guest's page cache does not answer it \
             (virtiofsd does not pass O_DIRECT on to the host file by default), runc reads \
             plainly; so it compares virtio-fs against the host reading the same cached \
             file. The rootfs lives in containerd's overlay snapshot on the host's disk for \
             both. Stdout: `head -c {mib}M /dev/zero` in the container, bytes over the time \
             from the first to the last byte the bench read from ctr."
        ),
    );
    let script = |side: usize| {
        format!(
            "time -p dd if=/dev/zero of=/bench.dat bs=1M count={mib} conv=fsync 2>&1; \
             time -p sh -c 'i=0; while [ $i -lt {READ_PASSES} ]; do i=$((i+1)); dd if=/bench.dat of=/dev/null bs=1M {} 2>/dev/null; done' 2>&1; \
             rm -f /bench.dat; \
             time -p sh -c 'head -c {} /dev/zero >/dev/null' 2>&1",
            if side == 0 { "iflag=direct" } else { "" },
            u64::from(mib) << 20
        )
    };
    let mut reads = [Vec::new(), Vec::new()];
    let mut make = [Vec::new(), Vec::new()];
    let writes = alternate(
        "rootfs write+read",
        sides.labels(),
        "MiB/s written",
        0,
        rounds,
        |side| {
            let id = env.new_id("io");
            let mut c = env.ctr_cmd();
            c.args([
                "run",
                "--rm",
                "--runtime",
                Sides::runtime(side),
                env.image(),
                &id,
                "sh",
                "-c",
                &script(side),
            ]);
            let t = timed(&mut c, Duration::from_secs(600))?;
            let out = String::from_utf8_lossy(&t.stdout).into_owned();
            let mut secs = out.lines().filter_map(real_secs);
            let w = secs
                .next()
                .with_context(|| format!("no `real` time for the write: {out}"))?;
            let r = secs
                .next()
                .with_context(|| format!("no `real` time for the read: {out}"))?;
            let m = secs
                .next()
                .with_context(|| format!("no `real` time for head: {out}"))?;
            reads[side].push(f64::from(mib * READ_PASSES) / r.max(0.005));
            make[side].push(f64::from(mib) / m.max(0.005));
            Ok(f64::from(mib) / w.max(0.005))
        },
    )?;
    sc.rows.push(sides.row(
        &format!("rootfs sequential write, {mib} MiB"),
        "MiB/s",
        writes,
    ));
    sc.rows.push(sides.row(
        &format!("rootfs sequential read (host page cache), {mib} MiB"),
        "MiB/s",
        reads,
    ));
    let bytes = u64::from(mib) << 20;
    let stdout = alternate("stdout", sides.labels(), "MiB/s", 0, rounds, |side| {
        let id = env.new_id("cat");
        let mut c = env.ctr_cmd();
        let n = bytes.to_string();
        c.args([
            "run",
            "--rm",
            "--runtime",
            Sides::runtime(side),
            env.image(),
            &id,
            "head",
            "-c",
            &n,
            "/dev/zero",
        ]);
        let t = timed(&mut c, Duration::from_secs(600))?;
        anyhow::ensure!(
            t.bytes == bytes,
            "{} bytes on stdout, expected {bytes}",
            t.bytes
        );
        let span = t
            .last_byte
            .zip(t.first_byte)
            .map(|(l, f)| l.saturating_sub(f))
            .context("no output")?;
        #[allow(clippy::cast_precision_loss)]
        Ok(bytes as f64 / span.as_secs_f64().max(1e-6) / f64::from(1u32 << 20))
    })?;
    sc.rows
        .push(sides.row(&format!("stdout to the host, {mib} MiB"), "MiB/s", stdout));
    sc.rows.push(sides.row(
        &format!("head -c {mib}M >/dev/null in the container"),
        "MiB/s",
        make,
    ));
    Ok(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_time_p() {
        assert_eq!(real_secs("real 1.25"), Some(1.25));
        assert_eq!(real_secs("user 0.01"), None);
    }
}
