//! Finding the processes a test's VM started (QEMU's helpers are children of the test).

/// PIDs of this process's children whose command name (`/proc/PID/comm`, at most 15 bytes)
/// starts with `comm_prefix`.
pub fn children_named(comm_prefix: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((comm, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(") "))
        else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or("");
        let ppid: u32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == me && state != "Z" && comm.starts_with(comm_prefix) {
            out.push(pid);
        }
    }
    out
}
