//! COM1: a 16550A UART (vm-superio) whose output goes to the console log and/or stdout,
//! and whose interrupt is an eventfd wired to IRQ 4 through KVM's irqfd.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::devices::thread::{self, ThreadStop};

/// COM1's first port.
pub(crate) const COM1_BASE: u64 = 0x3f8;
/// The UART's range length.
pub(crate) const COM1_LEN: u64 = 8;

/// The UART's interrupt line: an eventfd KVM turns into IRQ 4.
#[derive(Debug)]
pub(crate) struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes: any of a log file and stdout.
#[derive(Debug, Default)]
pub(crate) struct ConsoleOut {
    file: Option<File>,
    stdout: bool,
    bytes: u64,
}

impl ConsoleOut {
    /// Output to `file` (if any) and to stdout (if `stdout`).
    pub fn new(file: Option<File>, stdout: bool) -> Self {
        Self {
            file,
            stdout,
            bytes: 0,
        }
    }

    /// Bytes the guest has written so far.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(f) = &mut self.file {
            f.write_all(buf)?;
        }
        if self.stdout {
            let mut out = io::stdout().lock();
            out.write_all(buf)?;
            out.flush()?;
        }
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(f) = &mut self.file {
            f.flush()?;
        }
        Ok(())
    }
}

/// COM1 on the port I/O bus.
pub(crate) struct SerialDevice<W: Write + Send> {
    uart: Serial<EventFdTrigger, NoEvents, W>,
}

impl<W: Write + Send> std::fmt::Debug for SerialDevice<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: W) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// The output sink.
    #[cfg(test)]
    pub fn out(&self) -> &W {
        self.uart.writer()
    }

    /// Queues console input for the guest; returns how many bytes fit in the receive
    /// FIFO (0 when it is full: the guest has not read what came before).
    pub(crate) fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

/// Feeds `input` (stdin) to the guest's COM1 on a thread of its own until EOF. Input the
/// guest does not read waits: the thread retries while the FIFO is full. If reading the
/// input fails, the thread says so on stderr (see [`crate::devices::thread`]); EOF is the
/// input's normal end and ends the thread quietly.
pub(crate) fn spawn_input<W: Write + Send + 'static, R: Read + Send + 'static>(
    serial: Arc<Mutex<SerialDevice<W>>>,
    input: R,
    filters: &crate::seccomp::Filters,
) -> io::Result<()> {
    thread::spawn("console-in", filters, move || feed_input(&serial, input))
}

/// What the console input is called in the thread's stop line.
const INPUT: &str = "console input (stdin)";

/// Feeds `input` to the guest until it ends (Ok) or fails.
fn feed_input<W: Write + Send, R: Read>(
    serial: &Mutex<SerialDevice<W>>,
    mut input: R,
) -> Result<(), ThreadStop> {
    let mut buf = [0u8; 256];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(ThreadStop::Read {
                    what: INPUT,
                    source,
                })
            }
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let taken = serial.lock().expect("serial lock").enqueue_input(rest);
            rest = &rest[taken..];
            if taken == 0 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }
}

/// Something that counts the bytes written through it.
pub(crate) trait CountingSink {
    /// Bytes written so far.
    fn bytes_written(&self) -> u64;
}

impl CountingSink for ConsoleOut {
    fn bytes_written(&self) -> u64 {
        self.bytes
    }
}

impl CountingSink for Vec<u8> {
    fn bytes_written(&self) -> u64 {
        self.len() as u64
    }
}

impl<W: Write + Send + CountingSink> BusDevice for SerialDevice<W> {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("bytes_out", self.uart.writer().bytes_written())]
    }

    #[allow(clippy::cast_possible_truncation)] // offsets are < COM1_LEN
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < COM1_LEN && !data.is_empty() {
            data[0] = self.uart.read(offset as u8);
        }
    }

    #[allow(clippy::cast_possible_truncation)] // offsets are < COM1_LEN
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < COM1_LEN {
            if let Some(&v) = data.first() {
                // A failing console sink must not stop the guest; the byte is lost.
                let _ = self.uart.write(offset as u8, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_thr_reach_the_sink_and_lsr_says_empty() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Vec::new());
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(dev.out().as_slice(), b"hi\n");
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }

    #[test]
    fn input_fills_the_fifo_and_the_guest_reads_it() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Vec::new());
        let big = [b'x'; 100];
        let taken = dev.enqueue_input(&big);
        assert!(
            taken > 0 && taken < 100,
            "the FIFO takes part of it: {taken}"
        );
        assert_eq!(dev.enqueue_input(&big), 0, "full");
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x01, 0, "data ready");
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
        assert_eq!(dev.enqueue_input(b"y"), 1, "room again after a read");
    }

    #[test]
    fn console_input_reaches_the_guest_and_a_read_error_is_reported() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Mutex::new(SerialDevice::new(irq, Vec::new()));
        // EOF is the normal end: nothing to report.
        assert!(feed_input(&dev, &b"ok"[..]).is_ok());
        let mut dev = dev.into_inner().unwrap();
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'o');

        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Mutex::new(SerialDevice::new(irq, Vec::new()));
        let why = feed_input(&dev, Broken).unwrap_err();
        assert!(
            why.to_string()
                .starts_with("reading console input (stdin): Input/output error"),
            "{why}"
        );
    }

    #[test]
    fn console_out_writes_to_file_and_counts() {
        let dir = std::env::temp_dir().join(format!("husk-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("console.log");
        let mut out = ConsoleOut::new(Some(File::create(&p).unwrap()), false);
        out.write_all(b"Linux version").unwrap();
        assert_eq!(out.bytes(), 13);
        assert_eq!(std::fs::read(&p).unwrap(), b"Linux version");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
