//! `husk-agent`: the guest's PID 1.
//!
//! Owns everything inside the VM: it mounts the basic file systems, reaps every orphan,
//! reports readiness on the console and stops the VM. The agent API (ttrpc on vsock, OCI
//! containers) is built on top of this under the agent issue; until then the agent answers
//! one request on its console, `poweroff`, and powers off by itself after `husk.timeout=SECS`
//! from the kernel command line.
//!
//! It must never exit: when PID 1 exits the kernel panics. Every fatal error therefore ends
//! in a clean power-off, with the reason on the console.

mod guest_info;
mod pid1;
mod power;

use std::io::BufRead;
use std::time::Duration;

fn main() {
    if std::process::id() != 1 {
        eprintln!("husk-agent: must run as PID 1 inside a husk guest (it is the initramfs's /init)");
        std::process::exit(2);
    }
    if let Err(e) = pid1::mount_basics() {
        power::fatal(&format!("mounting the basic file systems: {e}"));
    }
    if let Err(e) = pid1::start_reaper() {
        power::fatal(&format!("starting the zombie reaper: {e}"));
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let info = guest_info::GuestInfo::read();
    println!("{}", info.ready_line());

    if let Some(secs) = guest_info::timeout_from_cmdline(&cmdline) {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            power::off(&format!("husk.timeout={secs} expired"));
        });
    }

    // Console requests, one per line.
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        match line.as_deref().map(str::trim) {
            Ok("poweroff") => power::off("poweroff requested on the console"),
            Ok("") => {}
            Ok(other) => println!("husk-agent: unknown console request {other:?} (known: poweroff)"),
            Err(e) => {
                println!("husk-agent: console read failed: {e}");
                break;
            }
        }
    }
    // No console input (closed or unreadable): wait for the timeout, if any, forever.
    loop {
        std::thread::park();
    }
}
