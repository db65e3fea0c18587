//! What /proc says about processes: finding a pod's processes, and their memory split into
//! guest RAM (the memfd the VMM and the vhost-user helpers share) and everything else.

use std::path::PathBuf;

/// Memory of one process, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Mem {
    /// PSS outside guest RAM.
    pub pss_kib: u64,
    /// RSS outside guest RAM.
    pub rss_kib: u64,
    /// PSS of guest-RAM mappings (shared between the VMM and the vhost-user helpers).
    pub guest_pss_kib: u64,
    /// RSS of guest-RAM mappings: the guest pages touched so far.
    pub guest_rss_kib: u64,
    /// The anonymous mapping (no path) with the most RSS: its RSS and size (under TCG, this
    /// is QEMU's translated-code buffer).
    pub anon_max_rss_kib: u64,
    pub anon_max_size_kib: u64,
}

/// Whether a smaps mapping is guest RAM: a memfd (`/memfd:husk-guest-ram`, QEMU's
/// `/memfd:mem`), which only the VMM and the vhost-user helpers that map guest memory have.
fn is_guest_ram(path: &str) -> bool {
    path.starts_with("/memfd:")
}

/// Splits the text of /proc/PID/smaps into [`Mem`].
pub fn parse_smaps(text: &str) -> Mem {
    let mut m = Mem::default();
    let (mut guest, mut anon, mut size) = (false, false, 0);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if !first.ends_with(':') && first.contains('-') {
            // A mapping header: range perms offset dev inode [path].
            let path = line.split_whitespace().nth(5).unwrap_or("");
            guest = is_guest_ram(path);
            anon = path.is_empty();
            continue;
        }
        let kib = || {
            words
                .clone()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match (first, guest) {
            ("Size:", _) => size = kib(),
            ("Pss:", false) => m.pss_kib += kib(),
            ("Rss:", false) => {
                m.rss_kib += kib();
                if anon && kib() > m.anon_max_rss_kib {
                    m.anon_max_rss_kib = kib();
                    m.anon_max_size_kib = size;
                }
            }
            ("Pss:", true) => m.guest_pss_kib += kib(),
            ("Rss:", true) => m.guest_rss_kib += kib(),
            _ => {}
        }
    }
    m
}

pub fn mem(pid: u32) -> Option<Mem> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .ok()
        .map(|t| parse_smaps(&t))
}

/// A field of /proc/PID/status as a number (e.g. `Threads`, `VmRSS` in kB).
pub fn status_field(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A live process: pid, argv, executable's file name, parent pid.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub argv: Vec<String>,
    pub exe: String,
}

/// Every live (non-zombie) process.
pub fn processes() -> Vec<Proc> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        if f.next() == Some("Z") {
            continue;
        }
        let ppid = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let argv = std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p: PathBuf| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        v.push(Proc {
            pid,
            ppid,
            argv,
            exe,
        });
    }
    v
}

/// The shim serving container `id`: a process of executable `shim` with `-id <id>`.
pub fn shim_of(all: &[Proc], shim: &str, id: &str) -> Option<u32> {
    all.iter()
        .find(|p| p.exe.starts_with(shim) && p.argv.windows(2).any(|w| w[0] == "-id" && w[1] == id))
        .map(|p| p.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_split_guest_ram_from_the_rest() {
        let t = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:01 123  /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
7f0000000000-7f0010000000 rw-s 00000000 00:01 9    /memfd:mem (deleted)
Size:             262144 kB
Rss:               40000 kB
Pss:               20000 kB
7f0020000000-7f0020001000 rw-p 00000000 00:00 0
Size:                  8 kB
Rss:                   4 kB
Pss:                   4 kB
7f0030000000-7f0070000000 rw-p 00000000 00:00 0
Size:            1048576 kB
Rss:               36000 kB
Pss:               36000 kB
";
        assert_eq!(
            parse_smaps(t),
            Mem {
                pss_kib: 36404,
                rss_kib: 36804,
                guest_pss_kib: 20000,
                guest_rss_kib: 40000,
                anon_max_rss_kib: 36000,
                anon_max_size_kib: 1048576
            }
        );
    }
}
