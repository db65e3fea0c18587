//! `kubectl port-forward` into the guest.
//!
//! containerd 1.6's CRI `PortForward` enters the pod's network namespace on the host and dials
//! `localhost:<port>` there (`tcp4` first, then `tcp6`). Under runc the pod's servers listen
//! in that netns; under husk they listen in the guest, and the host side of the pod netns has
//! nothing but CNI's veth and our tap, whose traffic tc moves past its stack. So, in the pod
//! netns only:
//!
//! ```text
//! ip addr add 169.254.231.1/30 dev tap0_husk          # the host end of a private link
//! sysctl net.ipv4.conf.tap0_husk.route_localnet=1      # 127/8 may leave and come back on it
//! tc filter add dev tap0_husk ingress prio 1 protocol ip  u32 match ip dst 169.254.231.1/32 flowid ffff:1
//! tc filter add dev tap0_husk ingress prio 2 protocol arp u32 match u32 0xa9fee701 0xffffffff at 24 flowid ffff:1
//! tc filter add dev eth0 ingress prio 1 protocol ip  u32 match ip src 169.254.231.1/32 flowid ffff:1
//! table ip husk_port_forward {
//!   chain output      { type nat hook output priority -100; ip daddr 127.0.0.0/8 meta l4proto tcp dnat to 169.254.231.2 }
//!   chain postrouting { type nat hook postrouting priority 100; ip daddr 169.254.231.2 snat to 169.254.231.1 }
//! }
//! ```
//!
//! and the guest NIC gets `169.254.231.2/30` besides the veth's addresses (the agent's
//! `UpdateInterface`, which also makes that NIC the guest end of the link: see below). A
//! connection to `127.0.0.1:P` in the pod netns is rewritten to
//! `169.254.231.1 → 169.254.231.2:P` and leaves through the tap into the guest. The guest
//! answers through the same NIC (its /30 route); on the tap's ingress the two filters above
//! (which come before the match-all redirect to the veth) hand packets for 169.254.231.1, and
//! ARP about it, to the pod netns's own stack instead, where conntrack undoes the NAT.
//! (The filters have no action: a terminal u32 match without one ends classification with
//! "ok", so the packet goes up the stack. That needs no `act_gact`, which not every host
//! kernel has.)
//!
//! In the guest, the agent mirrors this (`agent/src/network.rs`, `port_forward_chains`):
//!
//! ```text
//! sysctl net.ipv4.conf.eth0.route_localnet=1
//! table ip husk_port_forward {
//!   chain prerouting { type nat hook prerouting priority -100;
//!     iif eth0 ip saddr 169.254.231.1 ip daddr 169.254.231.2 meta l4proto tcp dnat to 127.0.0.1 }
//! }
//! ```
//!
//! so the connection arrives at the guest's `127.0.0.1:P`, as containerd's dial arrives at
//! the pod's loopback under runc: a server listening only on `127.0.0.1` is reached, one on
//! the wildcard address too, a port nobody listens on is refused at once (RST), and a server
//! bound only to the pod's IP is not reached (nor is it under runc). Kernel NAT rather than
//! a relay through the shim: the guest's own TCP answers travel back unchanged, so a refused
//! port is refused (a relay would have accepted the connection before knowing), no process
//! holds buffers for it, and nothing listens.
//!
//! Only the host end's address is trusted by the guest's NAT, so a third filter, on the
//! veth's ingress ahead of its redirect to the tap, hands any packet from the pod network
//! whose *source* is 169.254.231.1 to the pod netns's stack instead of the guest; that
//! stack drops it (a local address as a source is martian). Nothing from outside the pod
//! netns can reach the guest's loopback.
//!
//! Nothing listens anywhere: no socket is opened, in the pod netns or outside it, and
//! nothing changes outside the pod netns. The NAT only ever applies to connections made
//! *inside* the pod netns on the host — which under husk only containerd's port-forward does.
//! What reaches the pod netns's stack from the guest is only what is addressed to
//! 169.254.231.1; `route_localnet` on the tap cannot let anything else from the guest or the
//! pod network in, because every other packet on the tap is redirected before the stack sees
//! it.
//!
//! Differences from runc that remain (listed in deploy/README.md): a server that listens
//! only on IPv6 is not reached (containerd's `tcp6` dial has no NAT here), and the guest NIC
//! shows the extra link-local address. If CNI itself uses addresses or routes overlapping
//! 169.254.231.0/30, port-forward is left off for that pod (with a warning in the log).
//!
//! Removal: the table is deleted on teardown and by [`super::cleanup_leftovers`]; the
//! address, the sysctl and the tap's filters go with the tap, the veth's filter with the
//! veth's ingress qdisc (removed on teardown). The guest's table goes with the VM.

use std::net::{IpAddr, Ipv4Addr};

use rtnetlink::packet_route::tc::{
    TcFilterU32Option, TcHandle, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use rtnetlink::Handle;

use super::endpoint::Link;
use super::nft::{self, Chain, Expr, Hook};
use super::NetworkError;

/// The host end (the tap's address in the pod netns).
pub(crate) const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 231, 1);
/// The guest end (an extra address of the guest NIC).
pub(crate) const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 231, 2);
/// The link's prefix length: 169.254.231.0/30.
pub(crate) const PREFIX: u8 = 30;
/// Our nf_tables table in the pod netns (family `ip`).
pub(crate) const TABLE: &str = "husk_port_forward";

/// The ingress qdisc's handle, `ffff:`, and the filters' priorities (before the redirect,
/// which the kernel gives priority 49152).
const INGRESS_HANDLE: u32 = 0xffff_0000;
const PRIO_IP: u16 = 1;
const PRIO_ARP: u16 = 2;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
/// Offsets, from the network header, of the IPv4 destination and of ARP's target protocol
/// address (Ethernet/IPv4 ARP: 8 header bytes, sender MAC and IP, target MAC).
const IPV4_DST_OFFSET: i32 = 16;
const IPV4_SRC_OFFSET: i32 = 12;
const ARP_TPA_OFFSET: i32 = 24;
const TCP: u8 = 6;

fn overlaps(net: Ipv4Addr, prefix: u8) -> bool {
    let p = prefix.min(PREFIX);
    let mask = if p == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(p))
    };
    u32::from(net) & mask == u32::from(HOST_ADDR) & mask
}

/// What of CNI's configuration overlaps 169.254.231.0/30, if anything: an address, or a route
/// other than the default route (which the more specific /30 does not disturb).
pub(crate) fn conflict(links: &[Link]) -> Option<String> {
    for l in links {
        for (ip, p) in &l.addresses {
            if let IpAddr::V4(v4) = ip {
                if overlaps(*v4, *p) {
                    return Some(format!("address {ip}/{p} of {}", l.name));
                }
            }
        }
        for r in &l.routes {
            let Some((dst, p)) = r.destination.split_once('/') else {
                continue;
            };
            let (Ok(dst), Ok(p)) = (dst.parse::<Ipv4Addr>(), p.parse::<u8>()) else {
                continue;
            };
            if p > 0 && overlaps(dst, p) {
                return Some(format!(
                    "route {} via {:?} on {}",
                    r.destination, r.gateway, l.name
                ));
            }
        }
    }
    None
}

/// The NAT of the module comment.
fn chains() -> Vec<Chain> {
    vec![
        Chain {
            name: "output",
            hook: Hook::Output,
            priority: -100,
            rules: vec![vec![
                Expr::DaddrFirstByteIs(127),
                Expr::L4ProtoIs(TCP),
                Expr::Dnat(GUEST_ADDR),
            ]],
        },
        Chain {
            name: "postrouting",
            hook: Hook::Postrouting,
            priority: 100,
            rules: vec![vec![Expr::DaddrIs(GUEST_ADDR), Expr::Snat(HOST_ADDR)]],
        },
    ]
}

fn nl(what: String) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    move |source| NetworkError::Netlink { what, source }
}

/// A u32 filter on `dev`'s ingress that hands packets whose 32 bits at `off` are `value` to
/// the stack (a terminal match with a class id and no action).
async fn pass_filter(
    h: &Handle,
    dev: (&str, u32),
    prio: u16,
    protocol: u16,
    off: i32,
    value: Ipv4Addr,
) -> Result<(), NetworkError> {
    let what = format!(
        "adding the port-forward filter (priority {prio}, {value} at {off}) on {}",
        dev.0
    );
    let index = i32::try_from(dev.1)
        .map_err(|_| NetworkError::Invalid(format!("interface index {} out of range", dev.1)))?;
    let mut sel = TcU32Selector::default();
    sel.flags = TcU32SelectorFlags::Terminal;
    sel.nkeys = 1;
    let mut key = TcU32Key::default();
    key.mask = u32::MAX;
    key.val = u32::from(value);
    key.off = off;
    sel.keys = vec![key];
    h.traffic_filter(index)
        .add()
        .parent(INGRESS_HANDLE)
        .priority(prio)
        .protocol(protocol.to_be())
        .u32(&[
            TcFilterU32Option::ClassId(TcHandle {
                major: 0xffff,
                minor: 1,
            }),
            TcFilterU32Option::Selector(sel),
        ])
        .map_err(nl(what.clone()))?
        .execute()
        .await
        .map_err(nl(what))
}

/// Installs everything of the module comment on the pod netns side of `tap` and `veth`
/// (whose ingress qdiscs and redirects [`super::tc::redirect`] made). Runs inside the pod
/// netns.
pub async fn install(h: &Handle, tap: (&str, u32), veth: (&str, u32)) -> Result<(), NetworkError> {
    let (name, index) = tap;
    h.address()
        .add(index, IpAddr::V4(HOST_ADDR), PREFIX)
        .execute()
        .await
        .map_err(nl(format!("adding {HOST_ADDR}/{PREFIX} to {name}")))?;
    // /proc/sys/net is the calling thread's netns: the pod's.
    let sysctl = format!("/proc/sys/net/ipv4/conf/{name}/route_localnet");
    std::fs::write(&sysctl, "1").map_err(|source| NetworkError::Io {
        what: format!("writing 1 to {sysctl}"),
        source,
    })?;
    pass_filter(h, tap, PRIO_IP, ETH_P_IP, IPV4_DST_OFFSET, HOST_ADDR).await?;
    pass_filter(h, tap, PRIO_ARP, ETH_P_ARP, ARP_TPA_OFFSET, HOST_ADDR).await?;
    // From the pod network, a packet claiming the host end's address as its source never
    // reaches the guest (whose NAT trusts that source): it goes up this stack instead, which
    // drops it (a local address as a source is martian).
    pass_filter(h, veth, PRIO_IP, ETH_P_IP, IPV4_SRC_OFFSET, HOST_ADDR).await?;
    nft::replace_nat_table(TABLE, &chains()).map_err(|e| NetworkError::Nft {
        what: format!("installing table ip {TABLE}"),
        source: e,
    })
}

/// Deletes our NAT table from the calling thread's netns (the pod's); none there is fine.
pub(crate) fn remove_nat() -> Result<(), NetworkError> {
    nft::delete_table(TABLE).map_err(|e| NetworkError::Nft {
        what: format!("deleting table ip {TABLE}"),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::endpoint::Route;

    fn link(addresses: &[(&str, u8)], routes: &[&str]) -> Link {
        Link {
            name: "eth0".into(),
            index: 2,
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            addresses: addresses
                .iter()
                .map(|(a, p)| (a.parse().unwrap(), *p))
                .collect(),
            routes: routes
                .iter()
                .map(|d| Route {
                    destination: (*d).into(),
                    gateway: String::new(),
                    source: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn cni_configurations_that_overlap_the_link_are_found() {
        // What CNI plugins commonly make: a pod subnet, a default route, Calico's and AWS's
        // 169.254.1.1 gateway.
        let ok = link(
            &[("10.88.0.7", 24), ("fd00::7", 64)],
            &["0.0.0.0/0", "169.254.1.1/32", "10.0.0.0/8"],
        );
        assert_eq!(conflict(&[ok]), None);
        let addr = link(&[("169.254.231.2", 16)], &[]);
        assert!(conflict(&[addr]).unwrap().contains("169.254.231.2/16"));
        let wide = link(&[("10.88.0.7", 24)], &["169.254.0.0/16"]);
        assert!(conflict(&[wide]).unwrap().contains("169.254.0.0/16"));
        let inside = link(&[("10.88.0.7", 24)], &["169.254.231.1/32"]);
        assert!(conflict(&[inside]).is_some());
        let next_door = link(&[("169.254.231.4", 30)], &["169.254.231.8/29"]);
        assert_eq!(conflict(&[next_door]), None);
    }

    #[test]
    fn the_nat_rewrites_loopback_tcp_to_the_guest_and_the_source_to_the_host_end() {
        let c = chains();
        assert_eq!((c[0].hook, c[0].priority), (Hook::Output, -100));
        assert_eq!(
            c[0].rules,
            [vec![
                Expr::DaddrFirstByteIs(127),
                Expr::L4ProtoIs(6),
                Expr::Dnat(GUEST_ADDR)
            ]]
        );
        assert_eq!((c[1].hook, c[1].priority), (Hook::Postrouting, 100));
        assert_eq!(
            c[1].rules,
            [vec![Expr::DaddrIs(GUEST_ADDR), Expr::Snat(HOST_ADDR)]]
        );
        assert!(overlaps(GUEST_ADDR, 32) && overlaps(HOST_ADDR, 30));
    }

    /// A named netns of the test's own (`ip netns add`), deleted on drop.
    struct TestNetns(String);

    impl TestNetns {
        fn new(role: &str) -> Self {
            let name = format!("huskpf-{role}-{}", std::process::id());
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(std::process::Stdio::null())
                .status();
            ip(&["netns", "add", &name]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
            Self(name)
        }

        fn path(&self) -> std::path::PathBuf {
            std::path::Path::new("/var/run/netns").join(&self.0)
        }

        /// Runs `f` on a thread inside this netns.
        fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
            let ns = std::fs::File::open(self.path()).unwrap();
            std::thread::spawn(move || {
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    fn ip(args: &[&str]) {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Dials 127.0.0.1:`port` (from inside the pod netns, as containerd does), sends `ping`
    /// and reads to EOF.
    fn dial(port: u16) -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Write};
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut c = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        c.write_all(b"ping")?;
        c.shutdown(std::net::Shutdown::Write)?;
        let mut v = Vec::new();
        c.read_to_end(&mut v)?;
        Ok(v)
    }

    /// The plumbing, without a VM: a pod netns whose "tap" is a veth into a second netns
    /// playing the guest (with the guest end's address and a server on the wildcard
    /// address), and a second veth playing CNI's, both tied by the usual redirects. A dial
    /// of 127.0.0.1:P in the pod netns reaches the guest's server byte for byte; a port
    /// nobody listens on is refused at once; after the NAT is removed the dial stays in the
    /// pod netns (refused there), and removing it again is fine.
    #[test]
    fn loopback_in_the_pod_netns_reaches_the_guest_and_is_removed() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test makes network namespaces: run it as root (cargo xtask test)"
        );
        let pod = TestNetns::new("p");
        let guest = TestNetns::new("g");
        ip(&[
            "-n", &pod.0, "link", "add", "tapx", "type", "veth", "peer", "name", "geth", "netns",
            &guest.0,
        ]);
        ip(&[
            "-n", &pod.0, "link", "add", "eth0", "type", "veth", "peer", "name", "cni0",
        ]);
        for (ns, dev) in [
            (&pod.0, "tapx"),
            (&pod.0, "eth0"),
            (&pod.0, "cni0"),
            (&guest.0, "geth"),
        ] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&[
            "-n",
            &guest.0,
            "addr",
            "add",
            &format!("{GUEST_ADDR}/{PREFIX}"),
            "dev",
            "geth",
        ]);
        crate::network::netns::run_in(&pod.path(), async |h| {
            let idx = |n: &'static str| {
                let h = h.clone();
                async move {
                    crate::network::endpoint::index_of(&h, n)
                        .await
                        .map(Option::unwrap)
                }
            };
            let (tap, eth) = (idx("tapx").await?, idx("eth0").await?);
            crate::network::tc::redirect(&h, ("eth0", eth), ("tapx", tap)).await?;
            crate::network::tc::redirect(&h, ("tapx", tap), ("eth0", eth)).await?;
            install(&h, ("tapx", tap), ("eth0", eth)).await
        })
        .unwrap();
        // Nothing from the pod network claiming the host end's address reaches the guest.
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &pod.0, "tc", "filter", "show", "dev", "eth0", "ingress",
            ])
            .output()
            .unwrap();
        let filters = String::from_utf8_lossy(&out.stdout);
        assert!(
            filters.contains("match a9fee701/ffffffff at 12"),
            "no filter for the host end's address on the veth:\n{filters}"
        );
        // The guest end, as the agent makes it (agent/src/network.rs, port_forward_chains):
        // the link's TCP to 127.0.0.1, with route_localnet on the NIC.
        guest
            .run(move || {
                // (/sys is the host's: the index comes from this thread's netns.)
                // SAFETY: a NUL-terminated static name; if_nametoindex only reads it.
                let nic = unsafe { libc::if_nametoindex(c"geth".as_ptr()) };
                assert_ne!(nic, 0, "geth in the guest netns");
                std::fs::write("/proc/sys/net/ipv4/conf/geth/route_localnet", "1").unwrap();
                nft::replace_nat_table(
                    TABLE,
                    &[Chain {
                        name: "prerouting",
                        hook: Hook::Prerouting,
                        priority: -100,
                        rules: vec![vec![
                            Expr::IifIs(nic),
                            Expr::SaddrIs(HOST_ADDR),
                            Expr::DaddrIs(GUEST_ADDR),
                            Expr::L4ProtoIs(TCP),
                            Expr::Dnat(Ipv4Addr::LOCALHOST),
                        ]],
                    }],
                )
            })
            .unwrap();
        // A server on the wildcard address and one on the guest's loopback only.
        for bind in [Ipv4Addr::UNSPECIFIED, Ipv4Addr::LOCALHOST] {
            let listener = guest.run(move || std::net::TcpListener::bind((bind, 0)).unwrap());
            let port = listener.local_addr().unwrap().port();
            let server = std::thread::spawn(move || {
                use std::io::{Read, Write};
                let (mut c, peer) = listener.accept().unwrap();
                let mut got = Vec::new();
                c.read_to_end(&mut got).unwrap();
                c.write_all(b"pong from the guest: ").unwrap();
                c.write_all(&got).unwrap();
                peer
            });
            let reply = pod
                .run(move || dial(port))
                .unwrap_or_else(|e| panic!("dialling 127.0.0.1 in the pod netns ({bind}): {e}"));
            assert_eq!(reply, b"pong from the guest: ping", "{bind}");
            assert_eq!(
                server.join().unwrap().ip(),
                std::net::IpAddr::V4(HOST_ADDR),
                "{bind}"
            );
        }
        let listener = guest.run(|| std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap());
        let port = listener.local_addr().unwrap().port();
        let started = std::time::Instant::now();
        let e = pod
            .run(move || dial(port.wrapping_add(1).max(1)))
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "refused, not hung"
        );

        pod.run(remove_nat).unwrap();
        pod.run(remove_nat).unwrap();
        let e = pod.run(move || dial(port)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    }
}
