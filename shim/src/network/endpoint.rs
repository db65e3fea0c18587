//! What CNI left in the pod netns: each interface but loopback (and but our own taps), with
//! its MAC, MTU, addresses and the routes through it. This is what the guest NIC copies.

use std::collections::HashMap;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

use super::NetworkError;

/// An interface CNI made (a veth, usually `eth0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// (address, prefix length); IPv6 link-local addresses are left out (the guest makes its
    /// own from the same MAC).
    pub addresses: Vec<(IpAddr, u8)>,
    pub routes: Vec<Route>,
}

/// A route of the main table through a [`Link`] that is not the kernel's own prefix route
/// (the guest kernel makes those when the agent adds the addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `10.0.0.0/24`, `0.0.0.0/0`.
    pub destination: String,
    /// Empty for an on-link route.
    pub gateway: String,
    /// Preferred source, empty if none.
    pub source: String,
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

fn name(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| {
            if let LinkAttribute::IfName(n) = a {
                Some(n.clone())
            } else {
                None
            }
        })
        .unwrap_or_default()
}

fn kind(l: &LinkMessage) -> Option<InfoKind> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| {
            if let LinkInfo::Kind(k) = i {
                Some(k.clone())
            } else {
                None
            }
        }),
        _ => None,
    })
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn address_of(a: &AddressMessage) -> Option<IpAddr> {
    let local = a.attributes.iter().find_map(|x| {
        if let AddressAttribute::Local(ip) = x {
            Some(*ip)
        } else {
            None
        }
    });
    local.or_else(|| {
        a.attributes.iter().find_map(|x| {
            if let AddressAttribute::Address(ip) = x {
                Some(*ip)
            } else {
                None
            }
        })
    })
}

fn describe_route(r: &RouteMessage) -> Route {
    let dst = r.attributes.iter().find_map(|a| {
        if let RouteAttribute::Destination(d) = a {
            route_addr(d)
        } else {
            None
        }
    });
    let destination = match dst {
        Some(ip) => format!("{ip}/{}", r.header.destination_prefix_length),
        None if r.header.address_family == AddressFamily::Inet6 => "::/0".into(),
        None => "0.0.0.0/0".into(),
    };
    let gateway = r.attributes.iter().find_map(|a| {
        if let RouteAttribute::Gateway(g) = a {
            route_addr(g)
        } else {
            None
        }
    });
    let source = r.attributes.iter().find_map(|a| {
        if let RouteAttribute::PrefSource(s) = a {
            route_addr(s)
        } else {
            None
        }
    });
    Route {
        destination,
        gateway: gateway.map(|g| g.to_string()).unwrap_or_default(),
        source: source.map(|s| s.to_string()).unwrap_or_default(),
    }
}

/// Whether the scan takes this link: not loopback, not a tap/tun (ours, or anyone's: a tap
/// has no peer CNI could have configured).
fn is_endpoint(l: &LinkMessage) -> bool {
    !l.header.flags.contains(LinkFlags::Loopback)
        && !matches!(kind(l), Some(InfoKind::Tun))
        && name(l) != "lo"
}

/// The interfaces of the current netns that the guest should mirror, ordered by index.
pub async fn scan(h: &Handle) -> Result<Vec<Link>, NetworkError> {
    let links: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing the interfaces"))?;
    let addrs: Vec<AddressMessage> = h
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing the addresses"))?;
    let mut routes: Vec<RouteMessage> = Vec::new();
    for fam in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let rs: Vec<RouteMessage> = h
            .route()
            .get(fam)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing the routes"))?;
        routes.extend(rs.into_iter().filter(|r| {
            r.header.table == 254
                && r.header.kind == RouteType::Unicast
                && r.header.protocol != RouteProtocol::Kernel
        }));
    }
    let mut by_index: HashMap<u32, Vec<Route>> = HashMap::new();
    for r in &routes {
        if let Some(oif) = r.attributes.iter().find_map(|a| {
            if let RouteAttribute::Oif(i) = a {
                Some(*i)
            } else {
                None
            }
        }) {
            by_index.entry(oif).or_default().push(describe_route(r));
        }
    }
    let mut out = Vec::new();
    for l in links.iter().filter(|l| is_endpoint(l)) {
        let n = name(l);
        let mac = l
            .attributes
            .iter()
            .find_map(|a| if let LinkAttribute::Address(m) = a { <[u8; 6]>::try_from(m.as_slice()).ok() } else { None })
            .ok_or_else(|| NetworkError::Unsupported(format!("interface {n} has no Ethernet MAC address: only Ethernet interfaces (veth, macvlan, …) can be mirrored to the guest")))?;
        let mtu = l
            .attributes
            .iter()
            .find_map(|a| {
                if let LinkAttribute::Mtu(m) = a {
                    Some(*m)
                } else {
                    None
                }
            })
            .unwrap_or(1500);
        let addresses = addrs
            .iter()
            .filter(|a| a.header.index == l.header.index && a.header.scope != AddressScope::Link)
            .filter_map(|a| Some((address_of(a)?, a.header.prefix_len)))
            .collect();
        out.push(Link {
            name: n,
            index: l.header.index,
            mac,
            mtu,
            addresses,
            routes: by_index.remove(&l.header.index).unwrap_or_default(),
        });
    }
    out.sort_by_key(|l| l.index);
    Ok(out)
}

/// The index of the link called `name`, if there is one.
pub async fn index_of(h: &Handle, name: &str) -> Result<Option<u32>, NetworkError> {
    let links: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing the interfaces"))?;
    Ok(links
        .iter()
        .find(|l| self::name(l) == name)
        .map(|l| l.header.index))
}
