//! The virtio-mmio transport's register state machine, as a guest drives it: any sequence
//! of reads and writes of any width at any offset, with a virtio-rng device behind it (whose
//! queue runs on QueueNotify) and guest memory the input fills.
#![no_main]

use std::sync::Arc;

use husk_vmm::devices::bus::BusDevice;
use husk_vmm::devices::virtio::mmio::MmioTransport;
use husk_vmm::devices::virtio::rng::{EntropySource, Rng};
use husk_vmm::devices::virtio::IrqTrigger;
use husk_vmm_fuzz::{memory, poke, Input};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

struct Zeros;

impl EntropySource for Zeros {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mem = memory();
    let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    let mut t = MmioTransport::new(Box::new(Rng::new(Zeros)), mem.clone(), irq);
    while !inp.is_empty() {
        let op = inp.u8();
        // Mostly the real registers (0x000..0x100, 4-byte aligned), sometimes anything.
        let offset = if op & 0x80 != 0 {
            u64::from(inp.u16())
        } else {
            u64::from(inp.u8() & 0x3f) * 4
        };
        let len = [1usize, 2, 4, 8][usize::from((op >> 1) & 3)];
        match op & 0x61 {
            0x00 | 0x20 => {
                let v = inp.u64().to_le_bytes();
                t.write(offset, &v[..len]);
            }
            0x01 | 0x21 => {
                let mut d = [0u8; 8];
                t.read(offset, &mut d[..len]);
            }
            _ => poke(&mut inp, &mem),
        }
    }
});
