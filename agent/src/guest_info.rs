//! What the guest sees of itself: uptime, kernel, vCPUs, memory. Printed in the ready line so
//! the host can check that the VM it asked for is the VM it got.

use nix::time::{clock_gettime, ClockId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    /// Time since the kernel started, when the agent became ready.
    pub since_boot_ms: u64,
    pub kernel_release: String,
    pub vcpus: usize,
    pub mem_total_kib: u64,
}

impl GuestInfo {
    pub fn read() -> Self {
        let since_boot_ms = clock_gettime(ClockId::CLOCK_BOOTTIME)
            .map(|t| {
                u64::try_from(t.tv_sec()).unwrap_or(0) * 1000
                    + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1_000_000
            })
            .unwrap_or(0);
        let kernel_release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        let vcpus = std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|s| cpu_list_len(&s))
            .unwrap_or(0);
        let mem_total_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| mem_total_kib(&s))
            .unwrap_or(0);
        Self {
            since_boot_ms,
            kernel_release,
            vcpus,
            mem_total_kib,
        }
    }

    /// The one line the host waits for. Its format is read by `husk-hypervisor`
    /// (`ReadyLine::parse`): keep the two in step.
    pub fn ready_line(&self) -> String {
        format!(
            "husk-agent ready: {} ms since kernel start; kernel {}; {} vcpus; {} KiB memory; agent {}",
            self.since_boot_ms,
            self.kernel_release,
            self.vcpus,
            self.mem_total_kib,
            env!("CARGO_PKG_VERSION")
        )
    }
}

/// The kernel's current clocksource (`tsc`, `kvm-clock`, `refined-jiffies` …); empty if sysfs
/// does not say. Read when asked (`GetGuestDetails`), not on the way to the ready line.
pub fn clocksource() -> String {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Number of CPUs in a kernel CPU list such as `0-3,5`.
pub(crate) fn cpu_list_len(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => {
                b.parse::<usize>()
                    .ok()?
                    .checked_sub(a.parse::<usize>().ok()?)?
                    + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    Some(n)
}

/// `MemTotal` from /proc/meminfo, in KiB.
pub fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo_kib(meminfo, "MemTotal")
}

/// Field `key` of /proc/meminfo (`Key:   123 kB`), in KiB.
pub(crate) fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The guest's memory now, for `GetGuestStats`. (OOM kills are not here: our kernel has no
/// VM event counters, so /proc/vmstat has no `oom_kill`; the shim counts the containers' OOM
/// events it forwards.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestStats {
    pub mem_total_kib: u64,
    pub mem_free_kib: u64,
    pub mem_available_kib: u64,
}

impl GuestStats {
    /// Reads /proc/meminfo (a missing field reads as 0).
    pub fn read() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
    }

    pub fn parse(meminfo: &str) -> Self {
        Self {
            mem_total_kib: meminfo_kib(meminfo, "MemTotal").unwrap_or(0),
            mem_free_kib: meminfo_kib(meminfo, "MemFree").unwrap_or(0),
            mem_available_kib: meminfo_kib(meminfo, "MemAvailable").unwrap_or(0),
        }
    }
}

/// `husk.timeout=SECS` from the kernel command line.
pub fn timeout_from_cmdline(cmdline: &str) -> Option<u64> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("husk.timeout="))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list_len("0\n"), Some(1));
        assert_eq!(cpu_list_len("0-3,5"), Some(5));
        assert_eq!(cpu_list_len("3-1"), None);
        assert_eq!(cpu_list_len("x"), None);
    }

    #[test]
    fn meminfo_and_cmdline() {
        assert_eq!(
            mem_total_kib("MemTotal:        1012345 kB\nMemFree: 1 kB\n"),
            Some(1012345)
        );
        assert_eq!(
            timeout_from_cmdline("console=ttyS0 husk.timeout=30 quiet"),
            Some(30)
        );
        assert_eq!(timeout_from_cmdline("console=ttyS0"), None);
    }

    #[test]
    fn guest_stats_from_meminfo() {
        let mem = "MemTotal:         240000 kB\nMemFree:          100000 kB\nMemAvailable:     180000 kB\nBuffers: 1 kB\n";
        assert_eq!(
            GuestStats::parse(mem),
            GuestStats {
                mem_total_kib: 240000,
                mem_free_kib: 100000,
                mem_available_kib: 180000,
            }
        );
        // A prefix of another key is not that key; a missing field is 0.
        assert_eq!(meminfo_kib("MemTotalX: 5 kB\n", "MemTotal"), None);
        assert_eq!(GuestStats::parse(""), GuestStats::default());
    }

    #[test]
    fn ready_line_format() {
        let info = GuestInfo {
            since_boot_ms: 812,
            kernel_release: "6.1.192".into(),
            vcpus: 2,
            mem_total_kib: 240000,
        };
        assert!(info
            .ready_line()
            .starts_with("husk-agent ready: 812 ms since kernel start; kernel 6.1.192; 2 vcpus; 240000 KiB memory; agent "));
    }
}
