//! The guest's serial console as seen from the host: a log file, and the agent's ready line.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// What the agent reports when it is ready (see `husk-agent`'s `guest_info`):
/// `husk-agent ready: 649 ms since kernel start; kernel 6.1.192; 2 vcpus; 248132 KiB memory; agent 0.1.0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    pub since_boot_ms: u64,
    pub kernel_release: String,
    pub vcpus: u32,
    pub mem_total_kib: u64,
    pub agent_version: String,
}

const READY_PREFIX: &str = "husk-agent ready: ";

impl ReadyLine {
    /// Parses one console line; `None` if it is not the ready line.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.trim_end_matches(['\r', '\n']);
        let rest = &rest[rest.find(READY_PREFIX)? + READY_PREFIX.len()..];
        let mut fields = rest.split("; ");
        let since_boot_ms = fields.next()?.strip_suffix(" ms since kernel start")?.parse().ok()?;
        let kernel_release = fields.next()?.strip_prefix("kernel ")?.to_string();
        let vcpus = fields.next()?.strip_suffix(" vcpus")?.parse().ok()?;
        let mem_total_kib = fields.next()?.strip_suffix(" KiB memory")?.parse().ok()?;
        let agent_version = fields.next()?.strip_prefix("agent ")?.to_string();
        Some(Self {
            since_boot_ms,
            kernel_release,
            vcpus,
            mem_total_kib,
            agent_version,
        })
    }
}

/// The last `n` lines of a console log, for error messages.
pub fn tail(log: &Path, n: usize) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until a console line satisfies `pick`, the VM ends (`alive` returns false), or
/// `timeout` passes.
pub fn wait_for_line<T>(
    log: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
    mut pick: impl FnMut(&str) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut seen = 0usize;
    loop {
        let running = alive();
        if let Ok(bytes) = std::fs::read(log) {
            // Only complete lines, and only those not looked at before.
            let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            if end > seen {
                for line in String::from_utf8_lossy(&bytes[seen..end]).lines() {
                    if let Some(t) = pick(line) {
                        return Ok(t);
                    }
                }
                seen = end;
            }
        }
        if !running {
            return Err(Error::Guest {
                what: format!(
                    "the VM ended before the awaited console line; last lines:\n{}",
                    tail(log, 20)
                ),
                console: log.to_path_buf(),
            });
        }
        if Instant::now() >= deadline {
            return Err(Error::Guest {
                what: format!(
                    "no awaited console line within {timeout:?}; last lines:\n{}",
                    tail(log, 20)
                ),
                console: log.to_path_buf(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for the agent's ready line on the VM's console.
pub fn wait_for_ready(vm: &mut dyn crate::Vm, timeout: Duration) -> Result<ReadyLine> {
    let log = vm.console_log().to_path_buf();
    wait_for_line(
        &log,
        timeout,
        || matches!(vm.wait(Some(Duration::ZERO)), Ok(None)),
        ReadyLine::parse,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_agents_ready_line() {
        let l = "husk-agent ready: 649 ms since kernel start; kernel 6.1.192; 2 vcpus; 248132 KiB memory; agent 0.1.0\r";
        assert_eq!(
            ReadyLine::parse(l),
            Some(ReadyLine {
                since_boot_ms: 649,
                kernel_release: "6.1.192".into(),
                vcpus: 2,
                mem_total_kib: 248132,
                agent_version: "0.1.0".into()
            })
        );
        assert_eq!(ReadyLine::parse("husk-agent: powering off"), None);
        assert_eq!(ReadyLine::parse("husk-agent ready: x ms since kernel start"), None);
    }

    #[test]
    fn waits_for_a_line_written_later_and_reports_a_dead_vm() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("console.log");
        std::fs::write(&log, "boot\npartial").unwrap();
        let l2 = log.clone();
        let w = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(&l2, "boot\npartial line\nhusk-agent ready: 5 ms since kernel start; kernel 6.1; 1 vcpus; 1 KiB memory; agent 0\n").unwrap();
        });
        let r = wait_for_line(&log, Duration::from_secs(5), || true, ReadyLine::parse).unwrap();
        assert_eq!(r.since_boot_ms, 5);
        w.join().unwrap();
        let e = wait_for_line(&log, Duration::from_secs(5), || false, |l| l.contains("never").then_some(())).unwrap_err();
        assert!(e.to_string().contains("ended before") && e.to_string().contains("partial line"), "{e}");
        let e = wait_for_line(&log, Duration::from_millis(20), || true, |l| l.contains("never").then_some(())).unwrap_err();
        assert!(e.to_string().contains("no awaited console line"), "{e}");
    }
}
