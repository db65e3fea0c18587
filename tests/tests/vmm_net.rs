//! virtio-net end to end: in a network namespace the test creates, a tap with 10.99.0.1
//! faces a synthetic guest that broadcasts an ARP request for it; the host kernel's reply
//! must come back through husk-vmm to the guest.

use std::process::Command;
use std::time::Duration;

use husk_tests::vmm::{guest, require_kvm, run_vmm, run_vmm_via};

/// A network namespace, deleted (with its tap) when dropped.
struct Netns(String);

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("prerequisite missing: cannot run `ip` ({e}) — install iproute2")
    });
    assert!(
        out.status.success(),
        "ip {args:?} failed: {} — these tests need root (CAP_NET_ADMIN) and /dev/net/tun",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    fn with_tap(tag: &str) -> Self {
        let ns = Netns(format!("husk-{tag}-{}", std::process::id()));
        ip(&["netns", "add", &ns.0]);
        ip(&["-n", &ns.0, "tuntap", "add", "dev", "hk0", "mode", "tap"]);
        ip(&["-n", &ns.0, "addr", "add", "10.99.0.1/24", "dev", "hk0"]);
        ip(&["-n", &ns.0, "link", "set", "hk0", "up"]);
        ns
    }

    fn tap_mac(&self) -> String {
        let out = ip(&["-n", &self.0, "link", "show", "hk0"]);
        let at = out
            .find("link/ether ")
            .expect("a tap has an ethernet address")
            + "link/ether ".len();
        out[at..at + 17].to_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn guest_arp_request_is_answered_through_the_tap() {
    require_kvm();
    let ns = Netns::with_tap("net");
    let g = guest("net_arp");
    let run = run_vmm_via(
        &["ip", "netns", "exec", &ns.0],
        &[
            "--kernel",
            g.to_str().unwrap(),
            "--net-tap",
            "hk0",
            "--net-mac",
            "02:00:00:00:00:02",
        ],
        Duration::from_secs(60),
    );
    assert!(run.status.success(), "{:?} {}", run.status, run.stderr);
    assert_eq!(
        run.stdout.trim_end(),
        format!("husk net: arp reply from {}", ns.tap_mac())
    );
    // The host side saw the guest's frame: one 42-byte ARP request (at least; the guest
    // resends when a reply is slow). Neighbour entries cannot be checked here: they are
    // flushed when the tap loses its carrier as husk-vmm exits.
    let stat = |name: &str| -> u64 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.0,
                "cat",
                &format!("/sys/class/net/hk0/statistics/{name}"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: {out:?}"))
    };
    let (packets, bytes) = (stat("rx_packets"), stat("rx_bytes"));
    assert!(
        packets >= 1 && bytes == 42 * packets,
        "host saw {packets} frames, {bytes} bytes"
    );
}

#[test]
fn bad_tap_names_and_macs_are_refused_in_one_line() {
    require_kvm();
    let g = guest("hello");
    for (args, needle) in [
        (vec!["--net-tap", "a-very-long-tap-name"], "--net-tap"),
        (
            vec!["--net-tap", "hk0", "--net-mac", "02:00:00:00:00"],
            "--net-mac",
        ),
    ] {
        let mut all = vec!["--kernel", g.to_str().unwrap()];
        all.extend(args.iter());
        let run = run_vmm(&all, Duration::from_secs(30));
        assert_eq!(run.status.code(), Some(1), "{all:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
        assert!(run.stderr.contains(needle), "{}", run.stderr);
        assert_eq!(run.stdout, "");
    }
}
