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
    /// Anonymous pages outside guest RAM (smaps' `Anonymous`: heap, malloc arenas, stacks,
    /// written copies of file pages): memory only this process has, whatever else runs.
    pub anon_kib: u64,
    /// RSS of anonymous executable mappings: under TCG, QEMU's translated-code buffer.
    pub code_buffer_kib: u64,
    /// PSS of file pages (mappings with a path, guest RAM excepted), without the anonymous
    /// copies among them: page cache that every process mapping the same file shares.
    pub file_pss_kib: u64,
    /// Of `file_pss_kib`, the files [`parse_smaps_with`] was asked to single out (the guest
    /// kernel and initramfs a VMM keeps mapped).
    pub named_files_pss_kib: u64,
}

/// Whether a smaps mapping is guest RAM: husk-vmm's memfd (`/memfd:husk-guest-ram`) or
/// QEMU's (`/memfd:memory-backend-memfd`, its object's type name), which only the VMM and the
/// vhost-user helpers that map guest memory have. Any other memfd counts as the process's
/// own memory: QEMU's TCG with `split-wx=on`, for one, keeps its code buffer in a memfd.
fn is_guest_ram(path: &str) -> bool {
    ["/memfd:husk-guest-ram", "/memfd:memory-backend-memfd"]
        .iter()
        .any(|name| {
            path == *name
                || path
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' '))
        })
}

/// Whether a mapping's path is one of `names`: the same path, or the same file name (a jailed
/// VMM sees the kernel at the path it was bound to, which /proc may show from its own root).
fn is_named(path: &str, names: &[&str]) -> bool {
    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    names
        .iter()
        .any(|n| !n.is_empty() && (path == *n || base(path) == base(n)))
}

/// Splits the text of /proc/PID/smaps into [`Mem`], with the PSS of the files `names`
/// counted apart as well.
pub fn parse_smaps_with(text: &str, names: &[&str]) -> Mem {
    let mut m = Mem::default();
    let (mut guest, mut anon, mut size) = (false, false, 0);
    let (mut file, mut named, mut exec) = (false, false, false);
    // A file mapping's PSS and anonymous pages, settled when its block ends.
    let (mut pss, mut anon_pages) = (0u64, 0u64);
    let settle = |m: &mut Mem, file: bool, named: bool, pss: u64, anon_pages: u64| {
        if file {
            let f = pss.saturating_sub(anon_pages);
            m.file_pss_kib += f;
            if named {
                m.named_files_pss_kib += f;
            }
        }
    };
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if !first.ends_with(':') && first.contains('-') {
            settle(&mut m, file, named, pss, anon_pages);
            (pss, anon_pages) = (0, 0);
            // A mapping header: range perms offset dev inode [path].
            let mut fields = line.split_whitespace();
            let perms = fields.nth(1).unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            guest = is_guest_ram(path);
            anon = path.is_empty();
            exec = perms.contains('x');
            file = path.starts_with('/') && !guest;
            named = file && is_named(path, names);
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
            ("Pss:", false) => {
                m.pss_kib += kib();
                pss = kib();
            }
            ("Rss:", false) => {
                m.rss_kib += kib();
                if anon && kib() > m.anon_max_rss_kib {
                    m.anon_max_rss_kib = kib();
                    m.anon_max_size_kib = size;
                }
                if anon && exec {
                    m.code_buffer_kib += kib();
                }
            }
            ("Anonymous:", false) => {
                m.anon_kib += kib();
                anon_pages = kib();
            }
            ("Pss:", true) => m.guest_pss_kib += kib(),
            ("Rss:", true) => m.guest_rss_kib += kib(),
            _ => {}
        }
    }
    settle(&mut m, file, named, pss, anon_pages);
    m
}

pub fn mem(pid: u32) -> Option<Mem> {
    mem_with(pid, &[])
}

/// [`mem`], with the files `names` counted apart ([`Mem::named_files_pss_kib`]).
pub fn mem_with(pid: u32, names: &[&str]) -> Option<Mem> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .ok()
        .map(|t| parse_smaps_with(&t, names))
}

/// PSS of a process's anonymous pages and of its file pages (`Pss_Anon`, `Pss_File` of
/// /proc/PID/smaps_rollup), KiB: exact where smaps' per-mapping `Anonymous` counts a page
/// that a forked child shares in full. Guest RAM (a memfd: `Pss_Shmem`) is in neither.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Split {
    pub anon_kib: u64,
    pub file_kib: u64,
}

/// Reads [`Split`] from the text of /proc/PID/smaps_rollup.
pub fn parse_rollup(text: &str) -> Split {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Split {
        anon_kib: field("Pss_Anon:"),
        file_kib: field("Pss_File:"),
    }
}

pub fn split(pid: u32) -> Option<Split> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .map(|t| parse_rollup(&t))
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

/// User + system CPU time of process `pid` (all its threads), from /proc/PID/stat.
pub fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')' (0-based 11, 12).
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    #[allow(clippy::cast_precision_loss)]
    Some(ticks as f64 * 1000.0 / clock_ticks())
}

/// The kernel's clock ticks per second (`_SC_CLK_TCK`), the unit of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    #[allow(clippy::cast_precision_loss)]
    if t > 0 {
        t as f64
    } else {
        100.0
    }
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
7f0000000000-7f0010000000 rw-s 00000000 00:01 9    /memfd:memory-backend-memfd (deleted)
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
            parse_smaps_with(t, &[]),
            Mem {
                pss_kib: 36404,
                rss_kib: 36804,
                guest_pss_kib: 20000,
                guest_rss_kib: 40000,
                anon_max_rss_kib: 36000,
                anon_max_size_kib: 1048576,
                file_pss_kib: 400,
                ..Mem::default()
            }
        );
    }

    /// QEMU under TCG, cut down from a real smaps: its program (one written page), the guest
    /// kernel and initramfs it keeps mapped, guest RAM, the heap, the rwx code buffer.
    const QEMU: &str = "\
5625f73c0000-5625f750f000 r--p 00c94000 fe:00 10199064                   /usr/bin/qemu-system-x86_64
Size:               1340 kB
Rss:                1004 kB
Pss:                1004 kB
Anonymous:          1004 kB
5625f750f000-5625f78b8000 rw-p 00de3000 fe:00 10199064                   /usr/bin/qemu-system-x86_64
Size:               3748 kB
Rss:                1216 kB
Pss:                1216 kB
Anonymous:          1212 kB
5625f9e75000-5625fa55a000 rw-p 00000000 00:00 0                          [heap]
Size:               7060 kB
Rss:                4104 kB
Pss:                4104 kB
Anonymous:          4104 kB
7fc3b9600000-7fc3b9ac4000 r--p 00000000 fe:00 5515719                    /usr/share/husk/initramfs.cpio
Size:               4880 kB
Rss:                4880 kB
Pss:                4880 kB
Anonymous:             0 kB
7fc3b9c00000-7fc3bacf6000 rw-p 00000000 fe:00 1181039                    /var/cache/husk/kernel/6afac8203be33d57/vmlinux
Size:              17368 kB
Rss:               10624 kB
Pss:                5312 kB
Anonymous:             0 kB
7fc3bafff000-7fc3cafff000 rw-s 00000000 00:01 17685                      /memfd:memory-backend-memfd (deleted)
Size:             262144 kB
Rss:               34608 kB
Pss:               34488 kB
Anonymous:             0 kB
7fc3cb000000-7fc3cbfff000 rwxp 00000000 00:00 0 
Size:              16380 kB
Rss:               16380 kB
Pss:               16380 kB
Anonymous:         16380 kB
";

    #[test]
    fn only_the_vmms_guest_ram_memfds_are_guest_ram() {
        assert!(is_guest_ram("/memfd:husk-guest-ram"));
        assert!(is_guest_ram("/memfd:husk-guest-ram (deleted)"));
        assert!(is_guest_ram("/memfd:memory-backend-memfd (deleted)"));
        assert!(!is_guest_ram("/memfd:tcg-jit (deleted)"));
        assert!(!is_guest_ram("/memfd:husk-guest-ram-not"));
        assert!(!is_guest_ram("/usr/bin/qemu-system-x86_64"));
    }

    #[test]
    fn rollup_gives_anonymous_and_file_pss() {
        let t = "\
559ce31cb000-7ffcfce7e000 ---p 00000000 00:00 0                          [rollup]
Rss:               70000 kB
Pss:               60000 kB
Pss_Dirty:         30000 kB
Pss_Anon:          29000 kB
Pss_File:          21000 kB
Pss_Shmem:         10000 kB
Anonymous:         29500 kB
";
        assert_eq!(
            parse_rollup(t),
            Split {
                anon_kib: 29000,
                file_kib: 21000
            }
        );
        assert_eq!(parse_rollup(""), Split::default());
    }

    #[test]
    fn smaps_split_anonymous_memory_the_code_buffer_and_named_files() {
        let m = parse_smaps_with(
            QEMU,
            &["/usr/share/husk/vmlinux", "/usr/share/husk/initramfs.cpio"],
        );
        assert_eq!(m.pss_kib, 1004 + 1216 + 4104 + 4880 + 5312 + 16380);
        assert_eq!(m.anon_kib, 1004 + 1212 + 4104 + 16380);
        assert_eq!(m.code_buffer_kib, 16380);
        // The program's written pages are its own, not page cache: 4 KiB of it is file.
        assert_eq!(m.file_pss_kib, 4 + 4880 + 5312);
        // The kernel matched by its file name, the initramfs by its path.
        assert_eq!(m.named_files_pss_kib, 4880 + 5312);
        assert_eq!((m.guest_rss_kib, m.guest_pss_kib), (34608, 34488));
        // Nothing asked for, nothing singled out; the rest is the same.
        let plain = parse_smaps_with(QEMU, &[]);
        assert_eq!(plain.named_files_pss_kib, 0);
        assert_eq!(plain.file_pss_kib, m.file_pss_kib);
    }
}
