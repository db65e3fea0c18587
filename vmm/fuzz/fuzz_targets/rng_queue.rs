//! virtio-rng's request queue over guest memory the input fills: chains of any shape,
//! addresses anywhere, rings rewritten between notifications.
#![no_main]

use husk_vmm::devices::virtio::rng::{EntropySource, Rng};
use husk_vmm::devices::virtio::VirtioDevice;
use husk_vmm_fuzz::{memory, poke, queue, Input};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;

struct Counting(u8);

impl EntropySource for Counting {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        for b in buf {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mem = memory();
    let mut dev = Rng::new(Counting(0));
    let max = VirtioDevice::<GuestMemoryMmap>::queue_max_sizes(&dev)[0];
    let Some(q) = queue(&mut inp, &mem, max) else {
        return;
    };
    let mut qs = [q];
    while !inp.is_empty() {
        poke(&mut inp, &mem);
        if VirtioDevice::<GuestMemoryMmap>::process(&mut dev, Some(0), &mut qs, &mem).is_err() {
            // The transport marks the device NEEDS_RESET here; a driver would reset.
            return;
        }
    }
});
