//! What a killed test process left behind. The harnesses clean up in `Drop`, which never runs
//! when the test process is killed (a timeout, SIGKILL, a session or machine shutting down): its
//! containerd's state directory keeps mounts (a runc container's overlay rootfs, a CRI pod's
//! netns), its bridges and named netns stay, a husk sandbox keeps `/run/husk/<id>/`.
//!
//! So every harness writes what it creates into a ledger of its process
//! (`/run/husk-tests/<pid>-<start time>`, a line per thing: `dir PATH`, `netns NAME`,
//! `link NAME`), and the first harness of every later test process sweeps the ledgers whose
//! process is gone, with the runtime's own cleanup where there is one (the husk shim's
//! `delete`, `runc delete`), never by process name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const LEDGERS: &str = "/run/husk-tests";

/// One writer of this process's ledger at a time (tests run on threads).
static LEDGER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// This process's identity: its PID and its start time (so a reused PID is not taken for it).
fn identity(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command's closing parenthesis; the start time is field 22.
    let after = stat.rsplit_once(')')?.1;
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{pid}-{start}"))
}

fn ledger() -> PathBuf {
    let me = identity(&std::process::id().to_string()).expect("reading /proc/self/stat");
    Path::new(LEDGERS).join(me)
}

/// Records `kind name` (`dir`, `netns`, `link`) in this process's ledger, after sweeping dead
/// processes' ledgers once per process.
pub fn record(kind: &str, name: &str) {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep);
    let _one = LEDGER.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(LEDGERS).expect("creating /run/husk-tests");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ledger())
        .expect("opening this test process's ledger");
    writeln!(f, "{kind} {name}").expect("writing this test process's ledger");
}

/// Cleans up after every test process whose ledger remains but which is gone.
pub fn sweep() {
    for e in std::fs::read_dir(LEDGERS).into_iter().flatten().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some((pid, _)) = file.split_once('-') else {
            continue;
        };
        if identity(pid).as_deref() == Some(file.as_str()) {
            continue; // still running
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for line in text.lines().rev() {
            match line.split_once(' ') {
                Some(("dir", d)) => sweep_dir(Path::new(d)),
                Some(("netns", n)) => quiet(Command::new("ip").args(["netns", "del", n])),
                Some(("link", l)) => quiet(Command::new("ip").args(["link", "del", l])),
                _ => {}
            }
        }
        eprintln!(
            "husk-tests: cleaned up after the dead test process {file}: {}",
            text.lines().collect::<Vec<_>>().join(", ")
        );
        let _ = std::fs::remove_file(e.path());
    }
}

fn quiet(c: &mut Command) {
    let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// A containerd directory whose harness is gone (or ending): its processes (by PID: those naming the directory,
/// its containerd and shims), its tasks (each through its runtime's own cleanup), its mounts,
/// its CNI bridge, then the directory.
pub fn sweep_dir(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    let needle = dir.to_string_lossy().into_owned();
    for pid in crate::husk::processes_mentioning(&needle) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let tasks = dir.join("state/io.containerd.runtime.v2.task");
    for ns in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
        let ns_name = ns.file_name().to_string_lossy().into_owned();
        for b in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            let id = b.file_name().to_string_lossy().into_owned();
            let shim =
                std::fs::read_to_string(b.path().join("shim-binary-path")).unwrap_or_default();
            if shim.ends_with("runc-v2") {
                let root = format!("/run/containerd/runc/{ns_name}");
                quiet(Command::new("runc").args(["--root", &root, "delete", "--force", &id]));
                let _ = std::fs::remove_dir(&root);
            } else {
                // The husk shim's `delete` (what containerd runs for a dead shim): the VM's
                // processes, mounts and /run/husk/<id>/.
                quiet(
                    Command::new(crate::husk::shim_binary())
                        .args(["-namespace", &ns_name, "-id", &id, "-bundle"])
                        .arg(b.path())
                        .arg("delete")
                        .current_dir(b.path()),
                );
            }
        }
    }
    for m in crate::husk::mounts_under(dir) {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    // A CRI harness's bridge, named in its CNI configuration.
    for c in std::fs::read_dir(dir.join("cni"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let conf = std::fs::read_to_string(c.path()).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&conf).unwrap_or_default();
        for p in v["plugins"].as_array().into_iter().flatten() {
            if let Some(bridge) = p["bridge"].as_str() {
                quiet(Command::new("ip").args(["link", "del", bridge]));
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Takes `kind name` out of this process's ledger: its harness cleaned it up itself.
pub fn done(kind: &str, name: &str) {
    let _one = LEDGER.lock().unwrap_or_else(|e| e.into_inner());
    let path = ledger();
    let line = format!("{kind} {name}");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let left: Vec<&str> = text.lines().filter(|l| *l != line).collect();
    if left.is_empty() {
        let _ = std::fs::remove_file(&path);
    } else {
        let _ = std::fs::write(&path, left.join("\n") + "\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dead process's ledger: its directory (with a mount in it), its netns and its link are
    /// removed by the next sweep, and the ledger with them; a live process's is left alone.
    #[test]
    fn a_dead_test_process_is_cleaned_up_after() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test mounts and makes netns: run it as root (cargo xtask check)"
        );
        let me = std::process::id();
        let dir = std::env::temp_dir().join(format!("husk-ctd-stale{me}"));
        std::fs::create_dir_all(dir.join("state/m")).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &dir.join("state/m"),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let netns = format!("hkstale{me}");
        let link = format!("hkst{me}");
        quiet(Command::new("ip").args(["netns", "add", &netns]));
        quiet(Command::new("ip").args(["link", "add", &link, "type", "dummy"]));
        std::fs::create_dir_all(LEDGERS).unwrap();
        // No process has this identity: PID 0 never shows in /proc.
        let dead = Path::new(LEDGERS).join(format!("0-{me}"));
        std::fs::write(
            &dead,
            format!("dir {}\nnetns {netns}\nlink {link}\n", dir.display()),
        )
        .unwrap();
        record("dir", "/nonexistent/husk-live-test");
        sweep();
        assert!(!dir.exists(), "{} left", dir.display());
        assert!(crate::husk::mounts_under(&dir).is_empty());
        assert!(!Path::new("/var/run/netns").join(&netns).exists());
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&links.stdout).contains(&link));
        assert!(!dead.exists());
        assert!(
            std::fs::read_to_string(ledger())
                .unwrap()
                .contains("dir /nonexistent/husk-live-test"),
            "a live process's ledger was swept"
        );
        done("dir", "/nonexistent/husk-live-test");
    }
}
