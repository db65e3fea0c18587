//! Watching a sandbox's VM from the shim.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_hypervisor::process::readable;

use super::events::Publisher;

use super::process::Proc;
use super::{Inner, UNKNOWN_EXIT};
use crate::sandbox::Sandbox;

/// How often the VM is looked at where its backend gives no exit descriptor (a kernel
/// without pidfds), and again after a wake-up that `wait` does not call an end (a helper's
/// grace counting down).
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// The longest the watcher sleeps on an exit descriptor before it looks anyway.
const EXIT_FD_RECHECK: Duration = Duration::from_secs(5);

/// Watches the VM: if it ends while containers run, every unfinished process exits with
/// [`UNKNOWN_EXIT`] (its waiter also sees the broken connection) — this thread makes sure even
/// processes that never started are released, and logs why. Ends with the sandbox.
pub(super) fn watch_vm(
    sb: Arc<Sandbox>,
    inner: Arc<Mutex<Inner>>,
    publisher: Arc<Publisher>,
    ns: String,
) {
    let weak = Arc::downgrade(&sb);
    let exit = sb.vm_exit_fd();
    drop(sb);
    std::thread::spawn(move || loop {
        // Asleep until the VM ends where the backend says when (QEMU's pidfd: an idle pod's
        // shim does not wake for it); else, and for a sandbox gone without its VM ending
        // (which cannot last: its VM is killed with it), a look every so often.
        let woken = match &exit {
            Some(fd) => readable(&[fd], Some(EXIT_FD_RECHECK))[0],
            None => {
                std::thread::sleep(POLL_INTERVAL);
                false
            }
        };
        let Some(sb) = weak.upgrade() else {
            return;
        };
        if sb.is_destroyed() {
            return;
        }
        let Some(status) = sb.vm_exited() else {
            if woken {
                // Readable, yet not ended as `wait` sees it: no busy loop over it.
                std::thread::sleep(POLL_INTERVAL);
            }
            continue;
        };
        log::error!(
            "sandbox {}: the VM ended ({status}); console:\n{}",
            sb.id,
            sb.console_tail()
        );
        let procs: Vec<Arc<Proc>> = inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .containers
            .values()
            .flat_map(|c| std::iter::once(c.init.clone()).chain(c.execs.values().cloned()))
            .collect();
        for p in procs {
            p.finish(UNKNOWN_EXIT, &publisher, &ns);
        }
        return;
    });
}
