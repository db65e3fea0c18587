//! `husk-cri-start`: the bench's CRI pod start (scenario 13 of `cargo xtask bench`, issue #17):
//! a private containerd with its CRI plugin (the tests' harness), runtime handlers `runc`,
//! `husk-pooled` (`pool.size = 1`, served by a holder this program runs) and `husk-cold` (the
//! same configuration without the pool), each pod on the harness's CNI bridge. Rounds
//! alternate the three (the order rotating); before each pooled run it waits, untimed, until
//! the pool holds a ready VM. A run is a kubelet's pod start: RunPodSandbox, CreateContainer
//! and StartContainer of busybox `sh -c 'echo hi; exec sleep 1000'`; timed to
//! StartContainer's return and to `hi` in the container's CRI log. Then the pod is removed,
//! untimed.
//!
//! Prints one JSON object per run on stdout: `{"handler", "start_ms", "first_output_ms"}`; a
//! pooled run that did not take a VM from the pool is an error. Written here rather than in
//! xtask because its CRI client needs protoc at build time, which xtask must not.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::cri::{sweep_cgroups, CriContainerd, CriPod};
use husk_tests::husk::shim_binary;

const CGROUP_ROOT: &str = "husk-cri-start";
const HANDLERS: [&str; 3] = ["runc", "husk-cold", "husk-pooled"];

/// The pool holder, killed by PID when dropped (its VMs die with it).
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        // SIGTERM: the holder removes what it keeps under .pool/ as it ends.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap_or(0)),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn pool_ready(config: &Path) -> bool {
    Command::new(shim_binary())
        .args(["pool", "status", "--config"])
        .arg(config)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .is_some_and(|s| s["ready"].as_u64().is_some_and(|n| n >= 1))
}

fn usage() -> ! {
    eprintln!("usage: husk-cri-start [--rounds N]");
    std::process::exit(2);
}

fn main() {
    let mut rounds = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            _ => usage(),
        }
    }
    let cri = CriContainerd::start_with_handlers(
        "",
        &[("husk-cold", ""), ("husk-pooled", "pool.size = 1\n")],
    );
    let pooled_config = cri.dir().join("husk-pooled.toml");
    let holder_log = cri.dir().join("holder.log");
    let _holder = Holder(
        Command::new(shim_binary())
            .args(["pool", "run", "--config"])
            .arg(&pooled_config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&holder_log).expect("creating the holder's log"))
            .spawn()
            .expect("starting the pool holder"),
    );
    let claimed = |id: &str| {
        std::fs::read_to_string(&holder_log)
            .unwrap_or_default()
            .contains(&format!(" claimed by sandbox {id} "))
    };
    // One untimed warm-up of each (images unpacked, caches warm), then the rounds.
    for round in 0..=rounds {
        for k in 0..HANDLERS.len() {
            let handler = HANDLERS[(round + k) % HANDLERS.len()];
            if handler == "husk-pooled" {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !pool_ready(&pooled_config) {
                    assert!(
                        Instant::now() < deadline,
                        "no pooled VM ready within 120 s; holder log:\n{}",
                        std::fs::read_to_string(&holder_log).unwrap_or_default()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let name = format!("{handler}-{round}");
            let t = Instant::now();
            let pod = CriPod::run(&cri, &name, handler, CGROUP_ROOT, |_| {})
                .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}"));
            pod.start(
                "c",
                &["sh", "-c", "echo hi; exec sleep 1000"],
                Default::default(),
                vec![],
            );
            let started = t.elapsed();
            let log = cri.logs_dir(&name).join("c.log");
            let deadline = Instant::now() + Duration::from_secs(30);
            while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains(" hi")) {
                assert!(
                    Instant::now() < deadline,
                    "{handler}: no output in {} within 30 s",
                    log.display()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            let first_output = t.elapsed();
            if handler == "husk-pooled" && !claimed(&pod.id) {
                panic!(
                    "the pooled pod {} booted cold; holder log:\n{}",
                    pod.id,
                    std::fs::read_to_string(&holder_log).unwrap_or_default()
                );
            }
            pod.remove();
            if round > 0 {
                println!(
                    "{}",
                    serde_json::json!({
                        "handler": handler,
                        "start_ms": started.as_secs_f64() * 1e3,
                        "first_output_ms": first_output.as_secs_f64() * 1e3,
                    })
                );
            }
        }
    }
    sweep_cgroups(CGROUP_ROOT);
}
