//! Guest networking over netlink (rtnetlink): list the interfaces, configure one (matched by
//! MAC: name, MTU, addresses, up), replace the routes on given devices. No shelling out.
//!
//! rtnetlink is async; each call runs on a small current-thread tokio runtime of its own (a
//! few per pod lifetime: no runtime is kept around in the agent).

use std::net::{IpAddr, Ipv4Addr};

use futures_util::stream::TryStreamExt;
use husk_netlink::{
    address_of, link_mac, link_mtu, link_name, mac_string, main_routes, route_destination,
    route_gateway, route_oif, route_source,
};
use husk_protocols::agent::{Interface, IpAddress, Route};
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::link::{LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Errors name the interface or route and the netlink step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}: {source}")]
    Nft {
        what: String,
        #[source]
        source: husk_nft::NftError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, Error>;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |source| Error::Netlink { what, source }
}

fn run<T>(f: impl AsyncFnOnce(Handle) -> Result<T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| Error::Io {
            what: "starting the netlink runtime".into(),
            source,
        })?;
    rt.block_on(async move {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| Error::Io {
            what: "opening a netlink socket".into(),
            source,
        })?;
        let task = tokio::spawn(conn);
        let r = f(handle).await;
        task.abort();
        r
    })
}

fn parse_mac(s: &str) -> Result<Vec<u8>> {
    let v: std::result::Result<Vec<u8>, _> =
        s.split(':').map(|p| u8::from_str_radix(p, 16)).collect();
    match v {
        Ok(v) if v.len() == 6 => Ok(v),
        _ => Err(Error::Invalid(format!(
            "MAC {s:?}: expected six hex bytes like aa:bb:cc:dd:ee:ff"
        ))),
    }
}

/// "10.0.0.0/24" → (10.0.0.0, 24); a bare address is a host route.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    let bad = || Error::Invalid(format!("{s:?}: expected ADDRESS/PREFIX, e.g. 10.0.0.0/24"));
    let (a, p) = s.split_once('/').unwrap_or((s, ""));
    let ip: IpAddr = a.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let p: u8 = if p.is_empty() {
        max
    } else {
        p.parse().map_err(|_| bad())?
    };
    if p > max {
        return Err(bad());
    }
    Ok((ip, p))
}

async fn links(h: &Handle) -> Result<Vec<LinkMessage>> {
    h.link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing links"))
}

async fn addresses(h: &Handle, index: u32) -> Result<Vec<AddressMessage>> {
    h.address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("listing addresses of link {index}")))
}

async fn describe(h: &Handle, l: &LinkMessage) -> Result<Interface> {
    let addrs = addresses(h, l.header.index).await?;
    Ok(Interface {
        name: link_name(l),
        mac: link_mac(l).map(mac_string).unwrap_or_default(),
        mtu: link_mtu(l).unwrap_or(0),
        up: l.header.flags.contains(LinkFlags::Up),
        addresses: addrs
            .iter()
            .filter_map(|a| {
                Some(IpAddress {
                    address: address_of(a)?.to_string(),
                    prefix_len: u32::from(a.header.prefix_len),
                    ..Default::default()
                })
            })
            .collect(),
        ..Default::default()
    })
}

pub fn list_interfaces() -> Result<Vec<Interface>> {
    run(async |h| {
        let mut out = Vec::new();
        for l in links(&h).await? {
            out.push(describe(&h, &l).await?);
        }
        Ok(out)
    })
}

/// The guest end of port-forward (the host end's address, ours), as the shim sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
}

impl PortForward {
    pub fn parse(pf: &husk_protocols::agent::PortForward) -> Result<Self> {
        let ip = |what: &str, s: &str| {
            s.parse::<Ipv4Addr>().map_err(|_| {
                Error::Invalid(format!(
                    "port_forward.{what} {s:?}: not an IPv4 address — give the link's {what} end"
                ))
            })
        };
        Ok(Self {
            host: ip("host", &pf.host)?,
            guest: ip("guest", &pf.guest)?,
        })
    }
}

/// Our nf_tables table in the guest (family `ip`), as in the pod netns on the host.
pub const PORT_FORWARD_TABLE: &str = "husk_port_forward";

/// The NAT of the guest end: TCP from the host end to our end, arriving on the NIC of index
/// `nic`, goes to 127.0.0.1 at the same port — so a server listening only on the pod's
/// loopback is reached as under runc (where containerd dials the pod's 127.0.0.1), one on
/// the wildcard address still is, a closed port answers RST (refused at once), and a server
/// bound only to the pod's IP is not reached (nor is it under runc). Only packets with the
/// link's host address as their source match; the shim's filter on the pod's veth keeps any
/// such packet from the pod network out of the guest (`shim/src/network/port_forward.rs`).
pub fn port_forward_chains(nic: u32, pf: PortForward) -> Vec<husk_nft::Chain> {
    use husk_nft::{Chain, Expr, Hook};
    vec![Chain {
        name: "prerouting",
        hook: Hook::Prerouting,
        priority: -100,
        rules: vec![vec![
            Expr::IifIs(nic),
            Expr::SaddrIs(pf.host),
            Expr::DaddrIs(pf.guest),
            Expr::L4ProtoIs(6),
            Expr::Dnat(Ipv4Addr::LOCALHOST),
        ]],
    }]
}

/// Installs the guest end of port-forward on `nic` (`name`): `route_localnet` on it (a
/// packet whose destination becomes 127.0.0.1 may arrive there, and its answers leave from
/// 127.0.0.1 before conntrack undoes the NAT) and the NAT table.
fn install_port_forward(nic: u32, name: &str, pf: PortForward) -> Result<()> {
    let sysctl = format!("/proc/sys/net/ipv4/conf/{name}/route_localnet");
    std::fs::write(&sysctl, "1").map_err(|source| Error::Io {
        what: format!("writing 1 to {sysctl} (port-forward to the pod's loopback)"),
        source,
    })?;
    husk_nft::replace_nat_table(PORT_FORWARD_TABLE, &port_forward_chains(nic, pf)).map_err(
        |source| Error::Nft {
            what: format!("installing table ip {PORT_FORWARD_TABLE} on {name}"),
            source,
        },
    )
}

/// Applies `want` to the link whose MAC matches: name, MTU, addresses (replacing the old
/// ones), up/down; with `pf`, the link becomes the guest end of port-forward (`pf.guest`
/// must be one of its addresses).
pub fn update_interface(
    want: &Interface,
    pf: Option<PortForward>,
    match_mac: Option<&str>,
) -> Result<Interface> {
    let mac = parse_mac(&want.mac)?;
    // The NIC to update: by `match_mac` when given (it then takes `want.mac`), else by `want.mac`.
    let find = match match_mac {
        Some(m) => parse_mac(m)?,
        None => mac.clone(),
    };
    let mut new_addrs = Vec::new();
    for a in &want.addresses {
        let (ip, p) = parse_cidr(&format!("{}/{}", a.address, a.prefix_len))?;
        new_addrs.push((ip, p));
    }
    if let Some(pf) = pf {
        if !new_addrs.iter().any(|(ip, _)| *ip == IpAddr::V4(pf.guest)) {
            return Err(Error::Invalid(format!(
                "port_forward.guest {}: not among the interface's addresses — add it to them",
                pf.guest
            )));
        }
    }
    run(async |h| {
        let all = links(&h).await?;
        let link = all
            .iter()
            .find(|l| link_mac(l) == Some(find.as_slice()))
            .ok_or_else(|| {
                Error::Invalid(format!("no interface with MAC {}", mac_string(&find)))
            })?;
        let idx = link.header.index;
        let label = format!("interface {} ({})", link_name(link), want.mac);
        // A rename needs the link down.
        h.link()
            .set(LinkUnspec::new_with_index(idx).down().build())
            .execute()
            .await
            .map_err(nl(format!("{label}: setting down")))?;
        let mut b = LinkUnspec::new_with_index(idx);
        if !want.name.is_empty() && want.name != link_name(link) {
            b = b.name(want.name.clone());
        }
        if want.mtu != 0 {
            b = b.mtu(want.mtu);
        }
        if find != mac {
            b = b.address(mac.clone());
        }
        h.link().set(b.build()).execute().await.map_err(nl(format!(
            "{label}: setting name {:?} / mtu {}",
            want.name, want.mtu
        )))?;
        for old in addresses(&h, idx).await? {
            h.address()
                .del(old)
                .execute()
                .await
                .map_err(nl(format!("{label}: removing an old address")))?;
        }
        for (ip, p) in &new_addrs {
            h.address()
                .add(idx, *ip, *p)
                .execute()
                .await
                .map_err(nl(format!("{label}: adding {ip}/{p}")))?;
        }
        if want.up {
            h.link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(nl(format!("{label}: setting up")))?;
        }
        let now: Vec<LinkMessage> = links(&h)
            .await?
            .into_iter()
            .filter(|l| l.header.index == idx)
            .collect();
        let l = now
            .first()
            .ok_or_else(|| Error::Invalid(format!("{label}: gone after the update")))?;
        let got = describe(&h, l).await?;
        if let Some(pf) = pf {
            install_port_forward(idx, &got.name, pf)?;
        }
        Ok(got)
    })
}

fn invalid<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Invalid(format!("{what}: {e}"))
}

fn describe_route(r: &RouteMessage, names: &std::collections::HashMap<u32, String>) -> Route {
    Route {
        destination: route_destination(r),
        gateway: route_gateway(r).map(|g| g.to_string()).unwrap_or_default(),
        device: route_oif(r)
            .and_then(|i| names.get(&i).cloned())
            .unwrap_or_default(),
        source: route_source(r).map(|s| s.to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

/// Replaces the routes on the devices the new routes name (the kernel's own prefix routes
/// for the devices' addresses stay); returns the main table's routes afterwards.
pub fn update_routes(want: &[Route]) -> Result<Vec<Route>> {
    run(async |h| {
        let names: std::collections::HashMap<u32, String> = links(&h)
            .await?
            .iter()
            .map(|l| (l.header.index, link_name(l)))
            .collect();
        let index = |dev: &str| {
            names
                .iter()
                .find(|(_, n)| n.as_str() == dev)
                .map(|(i, _)| *i)
        };
        let mut devs = std::collections::HashSet::new();
        for r in want {
            let i = index(&r.device).ok_or_else(|| {
                Error::Invalid(format!(
                    "route to {}: no device {:?}",
                    r.destination, r.device
                ))
            })?;
            devs.insert(i);
        }
        for old in main_routes(&h).await.map_err(nl("listing routes"))? {
            if old.header.protocol != RouteProtocol::Kernel
                && route_oif(&old).is_some_and(|i| devs.contains(&i))
            {
                h.route()
                    .del(old)
                    .execute()
                    .await
                    .map_err(nl("removing an old route"))?;
            }
        }
        // Routes without a gateway (on-link) first: a gateway must be reachable when added.
        let mut ordered: Vec<&Route> = want.iter().collect();
        ordered.sort_by_key(|r| !r.gateway.is_empty());
        for r in ordered {
            let what = format!(
                "route {} via {:?} dev {}",
                r.destination, r.gateway, r.device
            );
            let (dst, p) = parse_cidr(&r.destination)?;
            let mut b = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(dst, p)
                .map_err(invalid(&what))?
                .output_interface(index(&r.device).unwrap_or(0));
            if !r.gateway.is_empty() {
                let gw: IpAddr = r
                    .gateway
                    .parse()
                    .map_err(|_| Error::Invalid(format!("{what}: bad gateway")))?;
                b = b.gateway(gw).map_err(invalid(&what))?;
            }
            if !r.source.is_empty() {
                let src: IpAddr = r
                    .source
                    .parse()
                    .map_err(|_| Error::Invalid(format!("{what}: bad source")))?;
                b = b.pref_source(src).map_err(invalid(&what))?;
            }
            h.route().add(b.build()).execute().await.map_err(nl(what))?;
        }
        Ok(main_routes(&h)
            .await
            .map_err(nl("listing routes"))?
            .iter()
            .map(|r| describe_route(r, &names))
            .collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_forward_sends_the_links_tcp_to_loopback_only() {
        let pf = PortForward::parse(&husk_protocols::agent::PortForward {
            host: "169.254.231.1".into(),
            guest: "169.254.231.2".into(),
            ..Default::default()
        })
        .unwrap();
        let c = port_forward_chains(3, pf);
        assert_eq!(
            (c[0].hook, c[0].priority),
            (husk_nft::Hook::Prerouting, -100)
        );
        use husk_nft::Expr::*;
        assert_eq!(
            c[0].rules,
            [vec![
                IifIs(3),
                SaddrIs(pf.host),
                DaddrIs(pf.guest),
                L4ProtoIs(6),
                Dnat(Ipv4Addr::LOCALHOST)
            ]]
        );
        let bad = PortForward::parse(&husk_protocols::agent::PortForward {
            host: "fe80::1".into(),
            guest: "169.254.231.2".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(bad.to_string().contains("port_forward.host"), "{bad}");
    }

    #[test]
    fn cidrs_and_macs() {
        assert_eq!(
            parse_cidr("10.0.0.0/24").unwrap(),
            ("10.0.0.0".parse().unwrap(), 24)
        );
        assert_eq!(parse_cidr("10.0.0.1").unwrap().1, 32);
        assert_eq!(parse_cidr("fd00::/64").unwrap().1, 64);
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nonsense")
            .unwrap_err()
            .to_string()
            .contains("ADDRESS/PREFIX"));
        assert_eq!(
            parse_mac("AA:bb:0c:dd:ee:ff").unwrap(),
            vec![0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0xff]
        );
        assert!(parse_mac("aa:bb").is_err());
        assert_eq!(mac_string(&[0xaa, 0x0b, 0, 1, 2, 3]), "aa:0b:00:01:02:03");
    }
}
