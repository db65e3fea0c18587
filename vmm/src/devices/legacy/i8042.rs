//! The i8042 keyboard controller, reduced to what a microVM needs: the CPU reset line
//! (command 0xfe on port 0x64), and a status register that says "nothing to read" so the
//! guest's keyboard probe ends quickly.

use crate::devices::bus::BusDevice;
use crate::exit::{ExitReason, ExitSender};

/// The controller's first port; the device spans 0x60..=0x64.
pub const I8042_BASE: u64 = 0x60;
/// Its range length.
pub const I8042_LEN: u64 = 5;
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 device.
#[derive(Debug)]
pub struct I8042 {
    exit: ExitSender,
    resets: u64,
}

impl I8042 {
    /// A controller that reports resets on `exit`.
    pub fn new(exit: ExitSender) -> Self {
        Self { exit, resets: 0 }
    }

    /// How many resets the guest asked for.
    pub fn resets(&self) -> u64 {
        self.resets
    }
}

impl BusDevice for I8042 {
    fn name(&self) -> &'static str {
        "i8042"
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("resets", self.resets)]
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Data (0x60): nothing was typed. Status (0x64): output and input buffers empty.
        // Both read as 0, which ends the guest's keyboard probe at once.
        let value = match offset {
            DATA_OFFSET | COMMAND_OFFSET => 0,
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.resets += 1;
            // The receiver only goes away when the VMM is already stopping.
            let _ = self.exit.send(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn reset_command_reports_a_reset() {
        let (tx, rx) = mpsc::channel();
        let mut dev = I8042::new(tx);
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::Reset));
        assert_eq!(dev.resets(), 1);
    }

    #[test]
    fn other_writes_do_nothing_and_status_is_empty() {
        let (tx, rx) = mpsc::channel();
        let mut dev = I8042::new(tx);
        dev.write(COMMAND_OFFSET, &[0xad]);
        dev.write(DATA_OFFSET, &[0xfe]);
        assert!(rx.try_recv().is_err());
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
