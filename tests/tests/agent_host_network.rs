//! The network RPCs (netlink through rtnetlink) against a real kernel: the static agent runs
//! as `husk-agent serve` in a network namespace of its own, where the test makes a veth pair
//! with iproute2 and checks what the agent configured with iproute2 too.

use std::process::Command;

use husk_protocols::agent::*;
use husk_protocols::ttrpc::{context, Code};
use husk_tests::agent::{status_of, HostAgent};
use husk_tests::require_program;

/// Runs `ip ARGS` in the network namespace of agent `n`.
fn ip(n: &HostAgent, args: &str) -> String {
    let out = Command::new("nsenter")
        .arg("-t")
        .arg(n.child.id().to_string())
        .arg("-n")
        .arg("ip")
        .args(args.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The agent in a network namespace of its own, with iproute2 to look at it.
fn netns_agent() -> HostAgent {
    let n = HostAgent::in_new_netns();
    require_program("ip", "iproute2");
    n
}

fn ctx() -> context::Context {
    context::with_timeout(30_000_000_000)
}

#[test]
fn interfaces_are_listed_configured_by_mac_and_routed() {
    let n = netns_agent();
    let list = n
        .agent
        .client
        .list_interfaces(ctx(), &ListInterfacesRequest::new())
        .unwrap()
        .interfaces;
    assert_eq!(
        list.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["lo"],
        "{list:?}"
    );

    ip(&n, "link add v0 type veth peer name v1");
    ip(&n, "link set v1 up");
    let list = n
        .agent
        .client
        .list_interfaces(ctx(), &ListInterfacesRequest::new())
        .unwrap()
        .interfaces;
    let v0 = list.iter().find(|i| i.name == "v0").expect("v0 listed");
    assert_eq!(v0.mac.len(), 17, "{v0:?}");

    let want = Interface {
        name: "eth0".into(),
        mac: v0.mac.to_uppercase(),
        mtu: 1400,
        up: true,
        addresses: vec![
            IpAddress {
                address: "10.9.0.2".into(),
                prefix_len: 24,
                ..Default::default()
            },
            IpAddress {
                address: "fd00:9::2".into(),
                prefix_len: 64,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let got = n
        .agent
        .client
        .update_interface(
            ctx(),
            &UpdateInterfaceRequest {
                interface: Some(want).into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        (got.name.as_str(), got.mtu, got.up),
        ("eth0", 1400, true),
        "{got:?}"
    );
    assert!(
        got.addresses
            .iter()
            .any(|a| a.address == "10.9.0.2" && a.prefix_len == 24),
        "{got:?}"
    );
    let link = ip(&n, "-o addr show dev eth0");
    assert!(
        link.contains("inet 10.9.0.2/24") && link.contains("inet6 fd00:9::2/64"),
        "{link}"
    );
    assert!(ip(&n, "-o link show dev eth0").contains("mtu 1400"));

    let routes = vec![
        Route {
            destination: "0.0.0.0/0".into(),
            gateway: "10.9.0.1".into(),
            device: "eth0".into(),
            ..Default::default()
        },
        Route {
            destination: "10.10.0.0/16".into(),
            device: "eth0".into(),
            ..Default::default()
        },
    ];
    let got = n
        .agent
        .client
        .update_routes(
            ctx(),
            &UpdateRoutesRequest {
                routes,
                ..Default::default()
            },
        )
        .unwrap()
        .routes;
    assert!(
        got.iter()
            .any(|r| r.destination == "0.0.0.0/0" && r.gateway == "10.9.0.1" && r.device == "eth0"),
        "{got:?}"
    );
    let table = ip(&n, "-4 route show");
    assert!(table.contains("default via 10.9.0.1 dev eth0"), "{table}");
    assert!(table.contains("10.10.0.0/16 dev eth0"), "{table}");

    // Replacing: the old non-kernel routes on eth0 go.
    let routes = vec![Route {
        destination: "0.0.0.0/0".into(),
        gateway: "10.9.0.254".into(),
        device: "eth0".into(),
        ..Default::default()
    }];
    n.agent
        .client
        .update_routes(
            ctx(),
            &UpdateRoutesRequest {
                routes,
                ..Default::default()
            },
        )
        .unwrap();
    let table = ip(&n, "-4 route show");
    assert!(
        table.contains("default via 10.9.0.254 dev eth0") && !table.contains("10.10.0.0/16"),
        "{table}"
    );

    let bad = Interface {
        mac: "02:00:00:00:00:99".into(),
        ..Default::default()
    };
    let (code, msg) = status_of(n.agent.client.update_interface(
        ctx(),
        &UpdateInterfaceRequest {
            interface: Some(bad).into(),
            ..Default::default()
        },
    ));
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(
        msg.contains("no interface with MAC 02:00:00:00:00:99"),
        "{msg}"
    );
    let routes = vec![Route {
        destination: "0.0.0.0/0".into(),
        gateway: "10.9.0.1".into(),
        device: "nope0".into(),
        ..Default::default()
    }];
    let (code, msg) = status_of(n.agent.client.update_routes(
        ctx(),
        &UpdateRoutesRequest {
            routes,
            ..Default::default()
        },
    ));
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("no device \"nope0\""), "{msg}");
}

/// A VM booted before its pod (the warm pool) has a NIC of its own MAC: `match_mac` finds it
/// by that, and it takes the pod's; a `match_mac` no NIC has is refused naming it.
#[test]
fn a_nic_found_by_match_mac_takes_the_pods_mac() {
    let n = netns_agent();
    ip(
        &n,
        "link add v0 address 02:11:22:33:44:55 type veth peer name v1",
    );
    let want = Interface {
        name: "eth0".into(),
        mac: "0a:58:0a:58:00:07".into(),
        mtu: 1400,
        up: true,
        addresses: vec![IpAddress {
            address: "10.9.0.2".into(),
            prefix_len: 24,
            ..Default::default()
        }],
        ..Default::default()
    };
    let req = |match_mac: &str| UpdateInterfaceRequest {
        interface: Some(want.clone()).into(),
        match_mac: match_mac.into(),
        ..Default::default()
    };
    let (code, msg) = status_of(
        n.agent
            .client
            .update_interface(ctx(), &req("02:99:99:99:99:99")),
    );
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("02:99:99:99:99:99"), "{msg}");
    let got = n
        .agent
        .client
        .update_interface(ctx(), &req("02:11:22:33:44:55"))
        .unwrap();
    assert_eq!(
        (got.name.as_str(), got.mac.as_str(), got.mtu, got.up),
        ("eth0", "0a:58:0a:58:00:07", 1400, true),
        "{got:?}"
    );
    assert!(ip(&n, "-o link show dev eth0").contains("link/ether 0a:58:0a:58:00:07"));
}
