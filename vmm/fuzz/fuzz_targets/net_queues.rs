//! virtio-net's rx and tx queues over guest memory the input fills, with a tap double
//! that has frames of input-chosen sizes waiting and takes every frame the guest sends.
#![no_main]

use std::collections::VecDeque;
use std::io;

use husk_vmm::devices::virtio::net::device::Net;
use husk_vmm::devices::virtio::net::tap::FrameIo;
use husk_vmm::devices::virtio::VirtioDevice;
use husk_vmm_fuzz::{memory, poke, queue, Input};
use libfuzzer_sys::fuzz_target;

#[derive(Default)]
struct Wire {
    inbound: VecDeque<Vec<u8>>,
    sent: usize,
}

impl FrameIo for Wire {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let f = self.inbound.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        // A real tap truncates a frame longer than the buffer; so does this.
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        assert!(frame.len() <= 65_562, "a frame larger than any tap takes: {}", frame.len());
        self.sent += 1;
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mem = memory();
    let mut wire = Wire::default();
    for _ in 0..(inp.u8() % 8) {
        let len = usize::from(inp.u16() % 9000);
        wire.inbound.push_back(vec![0xab; len]);
    }
    let Ok(mut dev) = Net::new(wire, [2, 0, 0, 0, 0, 1]) else {
        return;
    };
    let max = dev.queue_max_sizes().to_vec();
    let (Some(rx), Some(tx)) = (queue(&mut inp, &mem, max[0]), queue(&mut inp, &mem, max[1])) else {
        return;
    };
    dev.activate(husk_vmm::devices::virtio::VIRTIO_F_VERSION_1);
    let mut qs = [rx, tx];
    while !inp.is_empty() {
        poke(&mut inp, &mem);
        let notified = match inp.u8() % 3 {
            0 => Some(0),
            1 => Some(1),
            _ => None,
        };
        if dev.process(notified, &mut qs, &mem).is_err() {
            return;
        }
    }
});
