//! Scenario 4's instruments: where a husk `ctr run` spends its time. Nothing is added to the
//! runtime for this: a watcher polls the sandbox's state directory and `vm/console.log` every
//! 2 ms while the command runs (the state directory appears when the shim starts the sandbox,
//! `console.log` when QEMU opens its console, the agent's ready line carries the guest's own
//! ms since kernel start), and the shim's two info lines in containerd's log ("shim ID serving
//! on …", "sandbox ID: VM … agent …") give their wall-clock times.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use husk_hypervisor::console::ReadyLine;

/// What the watcher saw, as offsets from when it started.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub state_dir: Option<Duration>,
    pub console: Option<Duration>,
    pub ready: Option<(Duration, u64)>,
}

pub struct Watcher {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Seen>>,
}

impl Drop for Watcher {
    /// A run that failed drops its watcher unfinished: stop the thread all the same.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Watcher {
    /// Starts watching `/run/husk/<id>/`; offsets count from `t0`.
    pub fn start(id: &str, t0: Instant) -> Self {
        let dir = Path::new("/run/husk").join(id);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || watch(&dir, t0, &s));
        Self {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

fn watch(dir: &Path, t0: Instant, stop: &AtomicBool) -> Seen {
    // The VM's own files (its console among them) live in the sandbox's `vm/` directory.
    let console: PathBuf = dir.join("vm").join("console.log");
    let mut seen = Seen::default();
    while !stop.load(Ordering::SeqCst) && seen.ready.is_none() {
        if seen.state_dir.is_none() && dir.exists() {
            seen.state_dir = Some(t0.elapsed());
        }
        if seen.state_dir.is_some() {
            if seen.console.is_none() && console.exists() {
                seen.console = Some(t0.elapsed());
            }
            if seen.console.is_some() {
                if let Ok(text) = std::fs::read(&console) {
                    let at = t0.elapsed();
                    if let Some(r) = String::from_utf8_lossy(&text)
                        .lines()
                        .find_map(ReadyLine::parse)
                    {
                        seen.ready = Some((at, r.since_boot_ms));
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    seen
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses an RFC 3339 time (`2026-11-29T05:01:02.123456789Z`, or with `+hh:mm`) to
/// nanoseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i128> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let (clock, offset_s) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0i64)
    } else {
        let i = time.rfind(['+', '-'])?;
        let (c, off) = time.split_at(i);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':')?;
        (
            c,
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60),
        )
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, se) = (t.next()??, t.next()??, t.next()??);
    let mut nanos: i128 = 0;
    if !frac.is_empty() {
        let digits: String = frac.chars().take(9).collect();
        nanos = digits.parse::<i128>().ok()? * 10i128.pow(9 - u32::try_from(digits.len()).ok()?);
    }
    let secs = days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + se - offset_s;
    Some(i128::from(secs) * 1_000_000_000 + nanos)
}

/// The time of the first containerd log line (shim lines arrive there) that contains every
/// one of `needles`, as ms after `since` (negative if before).
pub fn log_offset_ms(log: &str, needles: &[&str], since: SystemTime) -> Option<f64> {
    let since_ns = i128::try_from(since.duration_since(UNIX_EPOCH).ok()?.as_nanos()).ok()?;
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .find_map(|l| {
            let t = l.split("time=\"").nth(1)?.split('"').next()?;
            let ns = parse_rfc3339(t)?;
            #[allow(clippy::cast_precision_loss)]
            Some((ns - since_ns) as f64 / 1e6)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_to_epoch_nanos() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01Z"), Some(1_000_000_000));
        assert_eq!(
            parse_rfc3339("2000-03-01T00:00:00.5Z"),
            Some(951_868_800_500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2000-03-01T01:00:00.000000001+01:00"),
            Some(951_868_800_000_000_001)
        );
        assert_eq!(parse_rfc3339("nonsense"), None);
    }

    #[test]
    fn finds_a_shim_line_in_the_log() {
        let since = UNIX_EPOCH + Duration::from_secs(951_868_800);
        let log = "time=\"2000-03-01T00:00:00.250Z\" level=info msg=\"shim abc serving on /x\"\n";
        assert_eq!(
            log_offset_ms(log, &["shim abc serving"], since),
            Some(250.0)
        );
        assert_eq!(log_offset_ms(log, &["shim xyz serving"], since), None);
    }
}
