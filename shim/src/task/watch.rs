//! Watching a sandbox's VM from the shim.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::events::Publisher;

use super::process::Proc;
use super::{Inner, UNKNOWN_EXIT};
use crate::sandbox::Sandbox;

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
    drop(sb);
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(250));
        let Some(sb) = weak.upgrade() else {
            return;
        };
        if sb.is_destroyed() {
            return;
        }
        let Some(status) = sb.vm_exited() else {
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
