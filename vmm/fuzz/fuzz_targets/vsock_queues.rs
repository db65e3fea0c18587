//! virtio-vsock's rx/tx queues and its connection state machine over guest memory the
//! input fills. Guest connections to host port 1 reach a real listener (which answers a
//! few bytes and hangs up); every other port has none, so both the connected and the
//! refused paths run.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use husk_vmm::devices::virtio::vsock::unix::muxer::Muxer;
use husk_vmm::devices::virtio::vsock::Vsock;
use husk_vmm::devices::virtio::VirtioDevice;
use husk_vmm_fuzz::{memory, poke, queue, Input};
use libfuzzer_sys::fuzz_target;

/// The hybrid socket path of this fuzzing process; `<path>_1` is served by a thread.
fn socket_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("husk-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fuzz directory");
        let path = dir.join("v.sock");
        let host = UnixListener::bind(dir.join("v.sock_1")).expect("host listener");
        std::thread::spawn(move || {
            for s in host.incoming().flatten() {
                let mut s = s;
                let _ = s.write_all(b"hello guest");
            }
        });
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mem = memory();
    let Ok(muxer) = Muxer::new(3, socket_path()) else {
        return;
    };
    let mut dev = Vsock::new(3, Arc::new(Mutex::new(muxer)));
    let max = dev.queue_max_sizes().to_vec();
    let (Some(rx), Some(tx), Some(ev)) = (
        queue(&mut inp, &mem, max[0]),
        queue(&mut inp, &mem, max[1]),
        queue(&mut inp, &mem, max[2]),
    ) else {
        return;
    };
    let mut qs = [rx, tx, ev];
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
