//! Stopping the VM from the inside.
//!
//! The kernel runs with `reboot=t panic=-1` and the VMM with "no reboot": a reboot is a triple
//! fault that ends the VM process cleanly. (`poweroff` without ACPI would only halt the CPUs.)

use nix::sys::reboot::{reboot, RebootMode};

/// Syncs file systems and stops the VM. Never returns.
pub fn off(reason: &str) -> ! {
    println!("husk-agent: powering off: {reason}");
    nix::unistd::sync();
    let err = reboot(RebootMode::RB_AUTOBOOT);
    // Only reached if the kernel refused; exiting PID 1 panics the kernel, which with
    // panic=-1 also ends the VM.
    println!("husk-agent: reboot failed ({err:?}); exiting so the kernel stops the VM");
    std::process::exit(1)
}

/// A fatal error: say so on the console and stop the VM.
pub fn fatal(what: &str) -> ! {
    println!("husk-agent: fatal: {what}");
    off("fatal error")
}
