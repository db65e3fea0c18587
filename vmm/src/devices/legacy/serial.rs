//! COM1: a 16550A UART (vm-superio) whose output goes to the console log and/or stdout,
//! and whose interrupt is an eventfd wired to IRQ 4 through KVM's irqfd.

use std::fs::File;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// COM1's first port.
pub const COM1_BASE: u64 = 0x3f8;
/// The UART's range length.
pub const COM1_LEN: u64 = 8;

/// The UART's interrupt line: an eventfd KVM turns into IRQ 4.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes: any of a log file and stdout.
#[derive(Debug, Default)]
pub struct ConsoleOut {
    file: Option<File>,
    stdout: bool,
    bytes: u64,
}

impl ConsoleOut {
    /// Output to `file` (if any) and to stdout (if `stdout`).
    pub fn new(file: Option<File>, stdout: bool) -> Self {
        Self { file, stdout, bytes: 0 }
    }

    /// Bytes the guest has written so far.
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
pub struct SerialDevice<W: Write + Send> {
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
        Self { uart: Serial::new(EventFdTrigger(irq), out) }
    }

    /// The output sink.
    pub fn out(&self) -> &W {
        self.uart.writer()
    }
}

/// Something that counts the bytes written through it.
pub trait CountingSink {
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
