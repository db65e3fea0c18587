//! The guest's serial console as seen from the host: a bounded log file, and the agent's
//! ready line.
//!
//! Everything in the console log comes from the guest, which may print without end. So the
//! log never grows past [`MAX_LOG_BYTES`]: it keeps its head (the first [`HEAD_BYTES`]:
//! the kernel's boot messages and the agent's ready line) and a tail of at most
//! [`TAIL_BYTES`]; a marker line between them counts the bytes dropped there.
//!
//! Who writes it: no VMM writes `console.log` itself. Both backends write the guest's
//! serial output into a pipe, and a [`ConsoleRelay`] thread in the process that started the
//! VM copies it into the log through a [`CappedLog`]:
//! - husk-vmm: the pipe is its stdout (it runs with `--console-stdout` and no
//!   `--console-log`);
//! - QEMU: the pipe is the serial chardev's `logfile=` (handed over with `-add-fd` and
//!   opened as `/dev/fdset/N`, which needs no /proc inside the jail). QEMU writes a chardev
//!   log file itself and has no size limit for it, so a bound for QEMU has to sit between
//!   QEMU and the file anyway; one relay for both backends is one implementation of the
//!   bound instead of two. The pipe also gives back-pressure: a guest that prints faster
//!   than the relay writes waits on its own serial port, never on host memory.
//!
//! When the tail is full, its older half goes: the relay writes head + marker + newer half
//! to a new file and renames it over `console.log`. Whoever holds the old file still reads
//! it whole, and [`wait_for_line`] reads incrementally from an offset, moving to the new
//! file where it left off (the marker's count says where that is).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
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
        let since_boot_ms = fields
            .next()?
            .strip_suffix(" ms since kernel start")?
            .parse()
            .ok()?;
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

/// Bytes kept from the start of the console: a quiet boot of our guest prints a few KiB,
/// a full one a few tens.
pub(crate) const HEAD_BYTES: u64 = 256 * 1024;
/// Most bytes kept from the end of the console.
pub(crate) const TAIL_BYTES: u64 = 768 * 1024;
/// The console log never grows past this (the bound the tests check).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const MAX_LOG_BYTES: u64 = HEAD_BYTES + MARKER_LEN + TAIL_BYTES;

const MARKER_PREFIX: &str = "\n[husk: ";
const MARKER_SUFFIX: &str = " bytes of console output dropped here]\n";
/// The marker's length: its count is padded to the 20 digits of any u64.
const MARKER_LEN: u64 = (MARKER_PREFIX.len() + 20 + MARKER_SUFFIX.len()) as u64;

/// The line between head and tail. It is written as soon as the head is full (counting 0
/// while nothing is dropped), so the bytes at the head's end are always ours, never the
/// guest's: a guest cannot forge one.
fn marker(dropped: u64) -> Vec<u8> {
    format!("{MARKER_PREFIX}{dropped:>20}{MARKER_SUFFIX}").into_bytes()
}

fn parse_marker(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes)
        .ok()?
        .strip_prefix(MARKER_PREFIX)?
        .strip_suffix(MARKER_SUFFIX)?
        .trim_start()
        .parse()
        .ok()
}

/// How much a log keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Caps {
    head: u64,
    tail: u64,
}

const CAPS: Caps = Caps {
    head: HEAD_BYTES,
    tail: TAIL_BYTES,
};

/// Opens `path` for writing without following a symlink (nothing in a sandbox directory is
/// followed), truncating it, or creating it only if it does not exist (`new`).
fn open_log(path: &Path, new: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).custom_flags(libc::O_NOFOLLOW);
    if new {
        o.create_new(true);
    } else {
        o.create(true).truncate(true);
    }
    o.open(path)
}

/// A log file that keeps the first bytes written to it and the last ones, never more than
/// head + marker + tail bytes in all (see the module's documentation).
#[derive(Debug)]
pub(crate) struct CappedLog {
    path: PathBuf,
    /// Where a compacted copy is built before it replaces `path`.
    tmp: PathBuf,
    file: File,
    /// The file's length.
    len: u64,
    /// Bytes written but dropped so far.
    dropped: u64,
    caps: Caps,
}

impl CappedLog {
    /// Creates (or truncates) the log at `path`, with the sizes of [`HEAD_BYTES`] and
    /// [`TAIL_BYTES`].
    pub fn create(path: &Path) -> io::Result<Self> {
        Self::with_caps(path, CAPS)
    }

    fn with_caps(path: &Path, caps: Caps) -> io::Result<Self> {
        assert!(caps.head > 0 && caps.tail >= 2, "caps {caps:?} too small");
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".compacting");
        Ok(Self {
            file: open_log(path, false)?,
            path: path.to_owned(),
            tmp: tmp.into(),
            len: 0,
            dropped: 0,
            caps,
        })
    }

    /// Bytes written but dropped so far.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, self.len)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Drops the older part of the tail (`tail_len` bytes now): writes head, marker and
    /// the newer half of the tail, from the start of a line where one starts early enough
    /// in it, to a new file and puts it in place of the log.
    fn compact(&mut self, tail_len: u64) -> io::Result<()> {
        let Caps { head, tail } = self.caps;
        let mut keep = tail_len.min(tail / 2);
        let mut probe = vec![0u8; usize::try_from(keep.min(4096)).expect("at most 4 KiB")];
        self.file.read_exact_at(&mut probe, self.len - keep)?;
        if let Some(i) = probe.iter().position(|b| *b == b'\n') {
            keep -= i as u64 + 1;
        }
        let dropped = self.dropped + (tail_len - keep);
        let _ = std::fs::remove_file(&self.tmp);
        let new = open_log(&self.tmp, true)?;
        copy_range(&self.file, 0, &new, 0, head)?;
        new.write_all_at(&marker(dropped), head)?;
        copy_range(&self.file, self.len - keep, &new, head + MARKER_LEN, keep)?;
        std::fs::rename(&self.tmp, &self.path)?;
        self.file = new;
        self.len = head + MARKER_LEN + keep;
        self.dropped = dropped;
        Ok(())
    }
}

/// Copies `len` bytes at `from` in `src` to `to` in `dst`, 64 KiB at a time.
fn copy_range(src: &File, from: u64, dst: &File, to: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0;
    while done < len {
        let n = usize::try_from((len - done).min(buf.len() as u64)).expect("at most 64 KiB");
        src.read_exact_at(&mut buf[..n], from + done)?;
        dst.write_all_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let Caps { head, tail } = self.caps;
        if self.len < head {
            let room = usize::try_from(head - self.len).unwrap_or(usize::MAX);
            let n = buf.len().min(room);
            self.append(&buf[..n])?;
            return Ok(n);
        }
        if self.len == head {
            self.append(&marker(0))?;
        }
        // At most half the tail at once, so that what compaction keeps and this fit.
        let n = buf
            .len()
            .min(usize::try_from(tail / 2).unwrap_or(usize::MAX));
        let tail_len = self.len - head - MARKER_LEN;
        if tail_len + n as u64 > tail {
            self.compact(tail_len)?;
        }
        self.append(&buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Longest line handed to a line waiter; the rest of a longer one is dropped (a guest that
/// never prints a newline must not grow the waiter's buffer).
const MAX_LINE: usize = 64 * 1024;

/// The file a [`LineReader`] is reading, and where.
#[derive(Debug)]
struct Cursor {
    file: File,
    ino: u64,
    offset: u64,
    /// Bytes dropped before this file's tail, once its marker has been read.
    dropped: Option<u64>,
}

/// Reads a capped console log's complete lines as they are written: each byte once, from
/// where the last read ended, following the log into its compacted copies.
#[derive(Debug)]
struct LineReader {
    path: PathBuf,
    head: u64,
    cur: Option<Cursor>,
    /// The line read so far, up to its newline.
    partial: Vec<u8>,
    /// Bytes read from files so far (never more than were written).
    bytes_read: u64,
}

impl LineReader {
    fn new(path: &Path, head: u64) -> Self {
        Self {
            path: path.to_owned(),
            head,
            cur: None,
            partial: Vec::new(),
            bytes_read: 0,
        }
    }

    /// Hands every complete line written since the last call to `pick`, until it picks one.
    fn poll<T>(&mut self, pick: &mut impl FnMut(&str) -> Option<T>) -> Option<T> {
        if self.cur.is_none() {
            let file = File::open(&self.path).ok()?;
            let ino = file.metadata().ok()?.ino();
            self.cur = Some(Cursor {
                file,
                ino,
                offset: 0,
                dropped: None,
            });
        }
        if let Some(t) = self.drain(pick) {
            return Some(t);
        }
        let ino = std::fs::metadata(&self.path).ok()?.ino();
        if self.cur.as_ref().is_some_and(|c| c.ino == ino) {
            return None;
        }
        // Compacted: what the old file has is final now (the new one was renamed over it
        // after the last write to it), so finish it, then go on in the new one.
        if let Some(t) = self.drain(pick) {
            return Some(t);
        }
        self.switch();
        self.drain(pick)
    }

    /// Moves to the file now at the path, to the byte after the last one read.
    fn switch(&mut self) {
        let old = self.cur.take().expect("a file was being read");
        // Where the stream stands: past the head, a file's offsets run ahead of the stream
        // by the marker and behind it by what was dropped.
        let at = match old.dropped {
            Some(d) if old.offset > self.head => old.offset - MARKER_LEN + d,
            _ => old.offset.min(self.head),
        };
        let Ok(file) = File::open(&self.path) else {
            return;
        };
        let Ok(meta) = file.metadata() else {
            return;
        };
        let mut m = vec![0u8; usize::try_from(MARKER_LEN).expect("a short line")];
        let dropped = file
            .read_exact_at(&mut m, self.head)
            .ok()
            .and_then(|()| parse_marker(&m));
        let tail_start = self.head + MARKER_LEN;
        let offset = match dropped {
            Some(d) if at >= self.head + d => tail_start + (at - self.head - d),
            // The bytes after ours were dropped before we read them: go on at the oldest
            // kept byte; the line we were in lost its end.
            Some(_) => {
                self.partial.clear();
                tail_start
            }
            // Not one of ours: read it from the start.
            None => {
                self.partial.clear();
                0
            }
        };
        self.cur = Some(Cursor {
            file,
            ino: meta.ino(),
            offset: offset.min(meta.len()),
            dropped,
        });
    }

    /// Reads the current file from where the last read ended to its end.
    fn drain<T>(&mut self, pick: &mut impl FnMut(&str) -> Option<T>) -> Option<T> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let cur = self.cur.as_mut()?;
            if cur.offset == self.head {
                // The marker: wait until it is whole, then step over it.
                let mut m = vec![0u8; usize::try_from(MARKER_LEN).expect("a short line")];
                cur.file.read_exact_at(&mut m, self.head).ok()?;
                let d = parse_marker(&m)?;
                cur.dropped = Some(d);
                cur.offset += MARKER_LEN;
                if d > 0 {
                    // The head's last line lost its end (a line split by the marker whilst
                    // nothing was dropped goes on after it).
                    if let Some(t) = self.line(pick) {
                        return Some(t);
                    }
                }
                continue;
            }
            // Up to the marker, never into it.
            let want = if cur.offset < self.head {
                buf.len()
                    .min(usize::try_from(self.head - cur.offset).unwrap_or(usize::MAX))
            } else {
                buf.len()
            };
            let n = match cur.file.read_at(&mut buf[..want], cur.offset) {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            cur.offset += n as u64;
            self.bytes_read += n as u64;
            let mut rest = &buf[..n];
            while let Some(i) = rest.iter().position(|b| *b == b'\n') {
                self.take(&rest[..i]);
                rest = &rest[i + 1..];
                if let Some(t) = self.line(pick) {
                    return Some(t);
                }
            }
            self.take(rest);
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.partial.len());
        self.partial
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// Hands the line read so far to `pick`.
    fn line<T>(&mut self, pick: &mut impl FnMut(&str) -> Option<T>) -> Option<T> {
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        pick(line.strip_suffix('\r').unwrap_or(&line))
    }
}

/// How much of the log's end [`tail`] reads.
const TAIL_READ: u64 = 64 * 1024;

/// The last `n` lines of a console log, for error messages (read from its last 64 KiB).
pub fn tail(log: &Path, n: usize) -> String {
    let Ok(f) = File::open(log) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(TAIL_READ);
    let mut bytes = vec![0u8; usize::try_from(len - from).expect("at most 64 KiB")];
    let got = f.read_at(&mut bytes, from).unwrap_or(0);
    bytes.truncate(got);
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    if from > 0 && !lines.is_empty() {
        lines.remove(0); // begun mid-line
    }
    // The guest wrote it: its control characters escaped (see `guest_text`).
    crate::guest_text::bounded(
        &lines[lines.len().saturating_sub(n)..].join("\n"),
        usize::try_from(TAIL_READ).unwrap_or(usize::MAX),
    )
}

/// How often [`wait_for_line`] looks at the log. The agent's ready line starts the shim's
/// own share of a start (vsock connect, CreateSandbox), which has a 30 ms target: at 5 ms
/// the poll alone added 2.5 ms on average to it. A poll reads only the log's new bytes
/// and asks the VMM whether it still runs, and the wait lasts only as long as the boot.
const LINE_POLL: Duration = Duration::from_millis(1);

/// Waits until a console line satisfies `pick`, the VM ends (`alive` returns false), or
/// `timeout` passes. Each poll reads only what was written since the last one.
pub fn wait_for_line<T>(
    log: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
    mut pick: impl FnMut(&str) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut reader = LineReader::new(log, HEAD_BYTES);
    loop {
        let running = alive();
        if let Some(t) = reader.poll(&mut pick) {
            return Ok(t);
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
        std::thread::sleep(LINE_POLL);
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

/// Copies a VMM's console output from a pipe into a [`CappedLog`] on a thread of its own,
/// until the VMM's end of the pipe closes (see the module's documentation for why).
#[derive(Debug)]
pub(crate) struct ConsoleRelay {
    done: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl ConsoleRelay {
    /// Creates the log at `log` and the pipe; returns the relay and the pipe's write end
    /// (close-on-exec: hand it to the VMM only, as its stdout or an inherited fd).
    pub fn start(log: &Path) -> Result<(Self, OwnedFd)> {
        let capped =
            CappedLog::create(log).map_err(Error::io(format!("creating {}", log.display())))?;
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::io("creating the console output pipe")(e.into()))?;
        let (tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("console-relay".into())
            .spawn(move || {
                relay(File::from(read), capped);
                let _ = tx.send(());
            })
            .map_err(Error::io("starting the console relay thread"))?;
        Ok((
            Self {
                done,
                thread: Some(thread),
            },
            write,
        ))
    }

    /// Waits, at most `timeout`, until the VMM's end of the pipe is closed and all it
    /// wrote is in the log. Call it once the VMM has ended; a relay still waiting then (a
    /// leaked copy of the write end) is left to end by itself.
    pub fn finish(&mut self, timeout: Duration) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        match self.done.recv_timeout(timeout) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    ?timeout,
                    "the console relay still has a writer after the VM ended; leaving it"
                );
            }
        }
    }
}

/// The relay's loop: everything read goes to `log`; if the log cannot be written, the
/// output is still drained (a full pipe would stall the guest's serial port) and dropped.
fn relay(mut input: File, mut log: CappedLog) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut writing = true;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(log = %log.path.display(), error = %e, "reading the VM's console output failed; the console log ends here");
                return;
            }
        };
        if writing {
            if let Err(e) = log.write_all(&buf[..n]) {
                tracing::warn!(log = %log.path.display(), error = %e, "writing the console log failed; the rest of the guest's console output is dropped");
                writing = false;
            }
        }
    }
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
        assert_eq!(
            ReadyLine::parse("husk-agent ready: x ms since kernel start"),
            None
        );
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
        let e = wait_for_line(
            &log,
            Duration::from_secs(5),
            || false,
            |l| l.contains("never").then_some(()),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("ended before") && e.to_string().contains("partial line"),
            "{e}"
        );
        let e = wait_for_line(
            &log,
            Duration::from_millis(20),
            || true,
            |l| l.contains("never").then_some(()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no awaited console line"), "{e}");
    }

    /// The marker's length, as an index.
    fn ml() -> usize {
        usize::try_from(MARKER_LEN).unwrap()
    }

    /// Line `i` of the test output: numbered, so head and tail can be checked.
    fn numbered(i: u64) -> String {
        format!("line {i:08} {}\n", "x".repeat(40))
    }

    #[test]
    fn a_flood_leaves_a_log_within_the_cap_with_head_and_tail_intact() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let mut log = CappedLog::create(&path).unwrap();
        log.write_all(b"Linux version 6.1\n").unwrap();
        // ~24 MiB in console-sized writes, far more than the cap.
        let mut i = 0;
        let mut written = 18u64;
        let mut chunk = String::new();
        while written < 24 << 20 {
            chunk.clear();
            for _ in 0..64 {
                chunk.push_str(&numbered(i));
                i += 1;
            }
            log.write_all(chunk.as_bytes()).unwrap();
            written += chunk.len() as u64;
            assert!(std::fs::metadata(&path).unwrap().len() <= MAX_LOG_BYTES);
        }
        log.write_all(b"the last line\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() as u64 <= MAX_LOG_BYTES, "{} bytes", text.len());
        assert!(
            text.starts_with("Linux version 6.1\nline 00000000 "),
            "head kept"
        );
        assert!(
            text.ends_with(&format!("{}the last line\n", numbered(i - 1))),
            "tail kept"
        );
        // One marker, right after the head, counting what is missing.
        let at = usize::try_from(HEAD_BYTES).unwrap();
        let m = parse_marker(&text.as_bytes()[at..at + ml()]).unwrap();
        assert_eq!(m, log.dropped());
        assert_eq!(
            text.matches("bytes of console output dropped here").count(),
            1
        );
        assert_eq!(written + 14 - m + MARKER_LEN, text.len() as u64);
        // The tail starts at a line's start and its lines are consecutive.
        let tail = &text[at + ml()..];
        let nums: Vec<u64> = tail
            .lines()
            .filter_map(|l| l.strip_prefix("line ")?.get(..8)?.parse().ok())
            .collect();
        assert!(tail.starts_with("line "), "{:?}", &tail[..40]);
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(
            nums.len() as u64 * 50 > TAIL_BYTES / 2,
            "at least half the tail kept"
        );
    }

    #[test]
    fn a_small_log_is_the_output_itself() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let mut log = CappedLog::create(&path).unwrap();
        log.write_all(b"boot\nready\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"boot\nready\n");
        // Exactly the head: no marker yet.
        let mut log = CappedLog::with_caps(&path, Caps { head: 8, tail: 16 }).unwrap();
        log.write_all(b"12345678").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"12345678");
        log.write_all(b"9").unwrap();
        let text = std::fs::read(&path).unwrap();
        assert_eq!(&text[..8], b"12345678");
        assert_eq!(parse_marker(&text[8..8 + ml()]), Some(0));
        assert_eq!(&text[8 + ml()..], b"9");
    }

    #[test]
    fn the_line_waiter_reads_each_byte_once_even_across_compactions() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let caps = Caps {
            head: 4096,
            tail: 64 * 1024,
        };
        let mut log = CappedLog::with_caps(&path, caps).unwrap();
        let mut reader = LineReader::new(&path, caps.head);
        let mut seen = Vec::new();
        let mut pick = |l: &str| -> Option<()> {
            seen.push(l.to_string());
            l.starts_with("husk-agent ready").then_some(())
        };
        // Many MB, polled now and then (each poll sees up to a few compactions' worth).
        let mut written = 0u64;
        for i in 0..200_000 {
            let line = numbered(i);
            log.write_all(line.as_bytes()).unwrap();
            written += line.len() as u64;
            if i % 500 == 0 {
                assert!(reader.poll(&mut pick).is_none());
            }
        }
        assert!(written > 10 << 20);
        log.write_all(b"husk-agent ready: 1 ms since kernel start; kernel 6.1; 1 vcpus; 1 KiB memory; agent 0\n").unwrap();
        assert!(
            reader.poll(&mut pick).is_some(),
            "the line after many MB is found"
        );
        assert!(
            reader.bytes_read <= written + 200,
            "read {} bytes of {written}: nothing read twice",
            reader.bytes_read
        );
        // Every line handed over is whole, and in order.
        let nums: Vec<u64> = seen
            .iter()
            .filter_map(|l| l.strip_prefix("line ")?.get(..8)?.parse().ok())
            .collect();
        assert!(nums.windows(2).all(|w| w[1] > w[0]), "in order");
        assert!(seen
            .iter()
            .all(|l| l.starts_with("line ") || l.starts_with("husk-agent")));
        assert_eq!(nums.first(), Some(&0));
        assert_eq!(nums.last(), Some(&199_999));
    }

    #[test]
    fn a_line_waiter_that_keeps_up_misses_nothing() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let caps = Caps {
            head: 1000,
            tail: 8000,
        };
        let mut log = CappedLog::with_caps(&path, caps).unwrap();
        let mut reader = LineReader::new(&path, caps.head);
        let mut nums = Vec::new();
        for i in 0..20_000 {
            log.write_all(numbered(i).as_bytes()).unwrap();
            reader.poll(&mut |l: &str| -> Option<()> {
                nums.push(l[5..13].parse::<u64>().unwrap());
                None
            });
        }
        assert!(log.dropped() > 0);
        assert_eq!(nums, (0..20_000).collect::<Vec<_>>());
    }

    #[test]
    fn an_endless_line_does_not_grow_the_waiter() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let mut log = CappedLog::create(&path).unwrap();
        let mut reader = LineReader::new(&path, HEAD_BYTES);
        let junk = vec![b'x'; 1 << 20];
        for _ in 0..8 {
            log.write_all(&junk).unwrap();
            assert!(reader.poll(&mut |_: &str| Some(())).is_none());
            assert!(reader.partial.len() <= MAX_LINE);
        }
        log.write_all(b"\nhello\n").unwrap();
        let mut lines = Vec::new();
        reader.poll(&mut |l: &str| -> Option<()> {
            lines.push(l.len());
            None
        });
        assert_eq!(lines, [MAX_LINE, 5]);
    }

    #[test]
    fn the_relay_copies_until_the_writer_closes() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let (mut relay, out) = ConsoleRelay::start(&path).unwrap();
        let mut out = File::from(out);
        out.write_all(b"boot\n").unwrap();
        for i in 0..40_000 {
            out.write_all(numbered(i).as_bytes()).unwrap();
        }
        out.write_all(b"bye\n").unwrap();
        drop(out);
        relay.finish(Duration::from_secs(10));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() as u64 <= MAX_LOG_BYTES);
        assert!(text.starts_with("boot\nline 00000000"));
        assert!(text.ends_with(&format!("{}bye\n", numbered(39_999))));
        assert_eq!(tail(&path, 2), format!("{}bye", numbered(39_999)));
    }
}
