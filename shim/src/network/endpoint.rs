//! What CNI left in the pod netns: each interface but loopback (and but our own taps), with
//! its MAC, MTU, addresses and the routes through it. This is what the guest NIC copies.

use std::collections::HashMap;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{InfoKind, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol};
use rtnetlink::Handle;

use husk_netlink::{
    address_of, link_kind, link_mac, link_mtu, link_name, main_routes, route_destination,
    route_gateway, route_oif, route_source,
};

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

fn describe_route(r: &RouteMessage) -> Route {
    Route {
        destination: route_destination(r),
        gateway: route_gateway(r).map(|g| g.to_string()).unwrap_or_default(),
        source: route_source(r).map(|s| s.to_string()).unwrap_or_default(),
    }
}

/// Whether the scan takes this link: not loopback, not a tap/tun (ours, or anyone's: a tap
/// has no peer CNI could have configured).
fn is_endpoint(l: &LinkMessage) -> bool {
    !l.header.flags.contains(LinkFlags::Loopback)
        && !matches!(link_kind(l), Some(InfoKind::Tun))
        && link_name(l) != "lo"
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
    // CNI's routes: the kernel's own prefix routes for the addresses the guest makes again.
    let routes: Vec<RouteMessage> = main_routes(h)
        .await
        .map_err(nl("listing the routes"))?
        .into_iter()
        .filter(|r| r.header.protocol != RouteProtocol::Kernel)
        .collect();
    let mut by_index: HashMap<u32, Vec<Route>> = HashMap::new();
    for r in &routes {
        if let Some(oif) = route_oif(r) {
            by_index.entry(oif).or_default().push(describe_route(r));
        }
    }
    let mut out = Vec::new();
    for l in links.iter().filter(|l| is_endpoint(l)) {
        let n = link_name(l);
        let mac = link_mac(l)
            .and_then(|m| <[u8; 6]>::try_from(m).ok())
            .ok_or_else(|| NetworkError::Unsupported(format!("interface {n} has no Ethernet MAC address: only Ethernet interfaces (veth, macvlan, …) can be mirrored to the guest")))?;
        let mtu = link_mtu(l).unwrap_or(1500);
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
        .find(|l| link_name(l) == name)
        .map(|l| l.header.index))
}
