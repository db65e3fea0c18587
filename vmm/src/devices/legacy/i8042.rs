//! The i8042 keyboard controller, reduced to what a microVM needs: the CPU reset line
//! (command 0xfe on port 0x64), and the controller commands Linux's i8042 driver issues
//! at probe, answered the way a controller with no keyboard or mouse plugged in would.
//!
//! Linux reads the controller configuration byte (CTR, command 0x20) first and gives up
//! on the controller after ~1 s of polling for the answer ("i8042: Can't read CTR while
//! initializing i8042") when the status register never says the output buffer is full —
//! which is what a device reading as all-zero did. So commands that answer put their byte
//! in the output buffer and set the status register's output-buffer-full bit until the
//! guest reads port 0x60, as on real hardware (and as Firecracker's i8042 does).
//!
//! There is no keyboard behind it: bytes the guest sends to the keyboard itself (port 0x60
//! with no controller command waiting for a parameter) are dropped. husk-vmm's kernel
//! command line has `i8042.dumbkbd`, so Linux never sends any.

use std::collections::VecDeque;

use crate::devices::bus::BusDevice;
use crate::exit::{ExitReason, ExitSender};

/// The controller's first port; the device spans 0x60..=0x64.
pub(crate) const I8042_BASE: u64 = 0x60;
/// Its range length.
pub(crate) const I8042_LEN: u64 = 5;
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

/// Controller commands (written to port 0x64).
mod cmd {
    /// Read the configuration byte (CTR).
    pub(crate) const READ_CTR: u8 = 0x20;
    /// Write the configuration byte: the next byte on port 0x60.
    pub(crate) const WRITE_CTR: u8 = 0x60;
    /// Disable the aux (mouse) port.
    pub(crate) const DISABLE_AUX: u8 = 0xa7;
    /// Enable the aux port.
    pub(crate) const ENABLE_AUX: u8 = 0xa8;
    /// Test the aux port's interface: 0 means no error.
    pub(crate) const TEST_AUX: u8 = 0xa9;
    /// Controller self-test: 0x55 means passed.
    pub(crate) const SELF_TEST: u8 = 0xaa;
    /// Test the keyboard port's interface: 0 means no error.
    pub(crate) const TEST_KBD: u8 = 0xab;
    /// Disable the keyboard port.
    pub(crate) const DISABLE_KBD: u8 = 0xad;
    /// Enable the keyboard port.
    pub(crate) const ENABLE_KBD: u8 = 0xae;
    /// Read the output port.
    pub(crate) const READ_OUTPUT_PORT: u8 = 0xd0;
    /// Write the output port: the next byte on port 0x60.
    pub(crate) const WRITE_OUTPUT_PORT: u8 = 0xd1;
    /// Pulse the CPU reset line.
    pub(crate) const RESET_CPU: u8 = 0xfe;
}

/// Status register bits (read from port 0x64).
mod status {
    /// Output buffer full: a byte waits on port 0x60.
    pub(crate) const OUTPUT_FULL: u8 = 0x01;
    /// System flag: the self-test passed (set at power-on by the firmware we do not run).
    pub(crate) const SYSTEM: u8 = 0x04;
    /// The last byte written went to the command port (0x64), not the data port.
    pub(crate) const COMMAND: u8 = 0x08;
    /// Keyboard not inhibited (clear means the key lock is on; Linux warns about it).
    pub(crate) const UNLOCKED: u8 = 0x10;
}

/// Configuration byte (CTR) bits.
mod ctr {
    /// Keyboard interrupt enabled.
    pub(crate) const KBD_INT: u8 = 0x01;
    /// System flag (POST passed).
    pub(crate) const SYSTEM: u8 = 0x04;
    /// Keyboard port disabled.
    pub(crate) const KBD_DISABLED: u8 = 0x10;
    /// Aux port disabled.
    pub(crate) const AUX_DISABLED: u8 = 0x20;
}

/// The CTR at power-on, as Firecracker's: keyboard interrupt on, POST passed. No
/// scancode translation bit: Linux then drives the keyboard port untranslated.
const INITIAL_CTR: u8 = ctr::KBD_INT | ctr::SYSTEM;
/// The output port at power-on: reset line high (not resetting), A20 enabled.
const INITIAL_OUTPUT_PORT: u8 = 0x03;
/// Answer to a passed self-test.
const SELF_TEST_OK: u8 = 0x55;
/// Answer to a passed interface test.
const INTERFACE_OK: u8 = 0x00;
/// Most bytes waiting in the output buffer. Real hardware holds one; a few more cost
/// nothing, and a guest that issues commands without reading the answers cannot grow it.
pub(crate) const OUTPUT_BUFFER_LEN: usize = 16;

/// The i8042 device.
#[derive(Debug)]
pub(crate) struct I8042 {
    exit: ExitSender,
    resets: u64,
    /// The configuration byte.
    ctr: u8,
    /// The output port.
    output_port: u8,
    /// Bytes for the guest to read on port 0x60 (status bit OUTPUT_FULL while not empty).
    output: VecDeque<u8>,
    /// A command that takes a parameter byte on port 0x60 next.
    pending: Option<u8>,
    /// Whether the last write went to the command port.
    last_was_command: bool,
}

impl I8042 {
    /// A controller that reports resets on `exit`.
    pub fn new(exit: ExitSender) -> Self {
        Self {
            exit,
            resets: 0,
            ctr: INITIAL_CTR,
            output_port: INITIAL_OUTPUT_PORT,
            output: VecDeque::with_capacity(OUTPUT_BUFFER_LEN),
            pending: None,
            last_was_command: false,
        }
    }

    /// How many resets the guest asked for.
    #[cfg(test)]
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Puts an answer in the output buffer (dropped if the guest has left it full).
    fn answer(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_BUFFER_LEN {
            self.output.push_back(byte);
        }
    }

    fn status(&self) -> u8 {
        let mut s = status::UNLOCKED | status::SYSTEM;
        if !self.output.is_empty() {
            s |= status::OUTPUT_FULL;
        }
        if self.last_was_command {
            s |= status::COMMAND;
        }
        s
    }

    fn command(&mut self, byte: u8) {
        // A new command cancels a parameter still awaited, as on hardware.
        self.pending = None;
        match byte {
            cmd::READ_CTR => self.answer(self.ctr),
            cmd::WRITE_CTR | cmd::WRITE_OUTPUT_PORT => self.pending = Some(byte),
            cmd::DISABLE_AUX => self.ctr |= ctr::AUX_DISABLED,
            cmd::ENABLE_AUX => self.ctr &= !ctr::AUX_DISABLED,
            cmd::TEST_AUX | cmd::TEST_KBD => self.answer(INTERFACE_OK),
            cmd::SELF_TEST => self.answer(SELF_TEST_OK),
            cmd::DISABLE_KBD => self.ctr |= ctr::KBD_DISABLED,
            cmd::ENABLE_KBD => self.ctr &= !ctr::KBD_DISABLED,
            cmd::READ_OUTPUT_PORT => self.answer(self.output_port),
            cmd::RESET_CPU => {
                self.resets += 1;
                // The receiver only goes away when the VMM is already stopping.
                let _ = self.exit.send(ExitReason::Reset);
            }
            // Anything else (password, LEDs, pulse lines other than reset...) does nothing.
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        match self.pending.take() {
            Some(cmd::WRITE_CTR) => self.ctr = byte,
            Some(cmd::WRITE_OUTPUT_PORT) => self.output_port = byte,
            // A byte for the keyboard, and there is none.
            _ => {}
        }
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
        let value = match offset {
            // Reading the data port empties (one byte of) the output buffer; an empty one
            // reads as 0.
            DATA_OFFSET => self.output.pop_front().unwrap_or(0),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else {
            return;
        };
        match offset {
            COMMAND_OFFSET => {
                self.last_was_command = true;
                self.command(byte);
            }
            DATA_OFFSET => {
                self.last_was_command = false;
                self.data(byte);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn dev() -> (I8042, mpsc::Receiver<ExitReason>) {
        let (tx, rx) = mpsc::channel();
        (I8042::new(tx), rx)
    }

    fn status(d: &mut I8042) -> u8 {
        let mut b = [0u8];
        d.read(COMMAND_OFFSET, &mut b);
        b[0]
    }

    /// What Linux's `i8042_command` does for a command with an answer: write it, poll
    /// the status until the output buffer is full, read the data port.
    fn command_with_answer(d: &mut I8042, c: u8) -> u8 {
        d.write(COMMAND_OFFSET, &[c]);
        assert_ne!(
            status(d) & status::OUTPUT_FULL,
            0,
            "command {c:#x}: no answer (Linux would poll for ~0.5 s, then give up)"
        );
        let mut b = [0u8];
        d.read(DATA_OFFSET, &mut b);
        assert_eq!(
            status(d) & status::OUTPUT_FULL,
            0,
            "read empties the buffer"
        );
        b[0]
    }

    #[test]
    fn reset_command_reports_a_reset() {
        let (mut d, rx) = dev();
        d.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::Reset));
        assert_eq!(d.resets(), 1);
    }

    #[test]
    fn linux_probe_sequence_is_answered() {
        let (mut d, rx) = dev();
        // i8042_flush: nothing to read, and the controller is there.
        let s = status(&mut d);
        assert_eq!(s & status::OUTPUT_FULL, 0);
        // i8042_controller_selftest.
        assert_eq!(command_with_answer(&mut d, cmd::SELF_TEST), SELF_TEST_OK);
        // i8042_controller_init: two equal CTR reads...
        let ctr0 = command_with_answer(&mut d, cmd::READ_CTR);
        let ctr1 = command_with_answer(&mut d, cmd::READ_CTR);
        assert_eq!((ctr0, ctr1), (INITIAL_CTR, INITIAL_CTR));
        // ...no key lock...
        assert_ne!(status(&mut d) & status::UNLOCKED, 0, "Keylock active");
        // ...then the CTR written back with the keyboard disabled and its interrupt off.
        let new_ctr = (ctr0 | ctr::KBD_DISABLED) & !ctr::KBD_INT;
        d.write(COMMAND_OFFSET, &[cmd::WRITE_CTR]);
        assert_ne!(status(&mut d) & status::COMMAND, 0);
        d.write(DATA_OFFSET, &[new_ctr]);
        assert_eq!(status(&mut d) & (status::OUTPUT_FULL | status::COMMAND), 0);
        assert_eq!(command_with_answer(&mut d, cmd::READ_CTR), new_ctr);
        // Interface tests.
        assert_eq!(command_with_answer(&mut d, cmd::TEST_KBD), INTERFACE_OK);
        assert_eq!(command_with_answer(&mut d, cmd::TEST_AUX), INTERFACE_OK);
        // i8042_enable_kbd_port: keyboard on, interrupt on.
        let on = (new_ctr & !ctr::KBD_DISABLED) | ctr::KBD_INT;
        d.write(COMMAND_OFFSET, &[cmd::WRITE_CTR]);
        d.write(DATA_OFFSET, &[on]);
        assert_eq!(command_with_answer(&mut d, cmd::READ_CTR), on);
        // None of it was a reset.
        assert!(rx.try_recv().is_err());
        assert_eq!(d.resets(), 0);
    }

    #[test]
    fn port_enable_and_disable_commands_change_the_ctr() {
        let (mut d, _rx) = dev();
        d.write(COMMAND_OFFSET, &[cmd::DISABLE_KBD]);
        d.write(COMMAND_OFFSET, &[cmd::DISABLE_AUX]);
        let c = command_with_answer(&mut d, cmd::READ_CTR);
        assert_eq!(
            c & (ctr::KBD_DISABLED | ctr::AUX_DISABLED),
            ctr::KBD_DISABLED | ctr::AUX_DISABLED
        );
        d.write(COMMAND_OFFSET, &[cmd::ENABLE_KBD]);
        d.write(COMMAND_OFFSET, &[cmd::ENABLE_AUX]);
        let c = command_with_answer(&mut d, cmd::READ_CTR);
        assert_eq!(c & (ctr::KBD_DISABLED | ctr::AUX_DISABLED), 0);
        // The output port round-trips too.
        d.write(COMMAND_OFFSET, &[cmd::WRITE_OUTPUT_PORT]);
        d.write(DATA_OFFSET, &[0x01]);
        assert_eq!(command_with_answer(&mut d, cmd::READ_OUTPUT_PORT), 0x01);
    }

    #[test]
    fn keyboard_bytes_and_unknown_commands_do_nothing() {
        let (mut d, rx) = dev();
        d.write(DATA_OFFSET, &[0xfe]);
        d.write(DATA_OFFSET, &[0xff]);
        d.write(COMMAND_OFFSET, &[0xc0]);
        // A parameter-taking command followed by another command is cancelled.
        d.write(COMMAND_OFFSET, &[cmd::WRITE_CTR]);
        d.write(COMMAND_OFFSET, &[cmd::ENABLE_KBD]);
        d.write(DATA_OFFSET, &[0x00]);
        assert_eq!(command_with_answer(&mut d, cmd::READ_CTR), INITIAL_CTR);
        assert!(rx.try_recv().is_err());
        let mut data = [0xffu8];
        d.read(DATA_OFFSET, &mut data);
        assert_eq!(data, [0], "an empty buffer reads as 0");
    }

    #[test]
    fn unread_answers_are_bounded() {
        let (mut d, _rx) = dev();
        for _ in 0..100_000 {
            d.write(COMMAND_OFFSET, &[cmd::READ_CTR]);
        }
        assert_eq!(d.output.len(), OUTPUT_BUFFER_LEN);
        for _ in 0..OUTPUT_BUFFER_LEN {
            assert_eq!(read_data(&mut d), INITIAL_CTR);
        }
        assert_eq!(status(&mut d) & status::OUTPUT_FULL, 0);
    }

    fn read_data(d: &mut I8042) -> u8 {
        let mut b = [0u8];
        d.read(DATA_OFFSET, &mut b);
        b[0]
    }
}
