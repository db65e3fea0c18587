//! Tier 3: several sandboxes at once in one containerd, killed with SIGKILL together, round
//! after round: every task stops (TaskExit reaches containerd), and delete leaves nothing.
//! This caught a task that stayed RUNNING after SIGKILL under load: `ctr run -d` exits right
//! after Start, and a shim relay that opened its output fifo only then waited for a reader
//! for ever, and the exit waited for the relay. On failure this test prints the guests'
//! consoles and containerd's warnings.

use husk_tests::husk::{HuskContainerd, BUSYBOX};
use std::time::{Duration, Instant};
#[test]
fn sandboxes_killed_together_all_stop_round_after_round() {
    husk_tests::require_root("containerd");
    let h = HuskContainerd::start();
    for round in 0..3 {
        let ids: Vec<String> = (0..5)
            .map(|i| format!("ks{round}-{i}-{}", std::process::id()))
            .collect();
        for id in &ids {
            h.ctd.ctr_ok(&[
                "run",
                "-d",
                "--runtime",
                "io.containerd.husk.v2",
                BUSYBOX,
                id,
                "sleep",
                "1000",
            ]);
        }
        for id in &ids {
            h.ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ls = h.ctd.ctr_ok(&["task", "ls"]);
            let running: Vec<&str> = ls.lines().filter(|l| l.contains("RUNNING")).collect();
            if running.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for id in &ids {
                    let d = format!("/run/husk/{id}/console.log");
                    eprintln!("{id}: {}", std::fs::read_to_string(&d).unwrap_or_default());
                }
                panic!(
                    "round {round}: still running after SIGKILL: {running:?}\n{}",
                    h.ctd
                        .log()
                        .lines()
                        .filter(|l| l.contains("warn") || l.contains("error"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for id in &ids {
            h.ctd.ctr_ok(&["task", "delete", id]);
            h.ctd.ctr_ok(&["containers", "delete", id]);
        }
        for id in &ids {
            assert!(
                !std::path::Path::new("/run/husk").join(id).exists(),
                "{id} left /run/husk behind"
            );
        }
    }
}
