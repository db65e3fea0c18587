//! Reading rtnetlink's messages: the attributes both ends of a pod's network read — the shim
//! in the pod netns CNI made (`shim/src/network/endpoint.rs`), the agent on the guest's NICs
//! (`agent/src/network.rs`) — so that each end reads a link, an address or a route the same
//! way. Writing (adding addresses, routes, taps, qdiscs) stays with each end: they change
//! different things.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

/// The main routing table's id.
pub const MAIN_TABLE: u8 = 254;

/// A link's name (`eth0`), empty if the message has none.
pub fn link_name(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// A link's hardware address, as the kernel gave it (6 bytes for Ethernet).
pub fn link_mac(l: &LinkMessage) -> Option<&[u8]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

/// A link's MTU.
pub fn link_mtu(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// A link's kind (`veth`, `tun`, …), if it says.
pub fn link_kind(l: &LinkMessage) -> Option<InfoKind> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    })
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An address message's address: its local address where it has one (a point-to-point
/// link's `Address` is the peer's), else its address.
pub fn address_of(a: &AddressMessage) -> Option<IpAddr> {
    let local = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A route's destination as `ADDRESS/PREFIX`; the default route is `0.0.0.0/0` or `::/0`.
pub fn route_destination(r: &RouteMessage) -> String {
    let dst = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => route_addr(d),
        _ => None,
    });
    match dst {
        Some(ip) => format!("{ip}/{}", r.header.destination_prefix_length),
        None if r.header.address_family == AddressFamily::Inet6 => "::/0".into(),
        None => "0.0.0.0/0".into(),
    }
}

/// A route's gateway, if it has one (an on-link route has none).
pub fn route_gateway(r: &RouteMessage) -> Option<IpAddr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => route_addr(g),
        _ => None,
    })
}

/// A route's preferred source address, if it has one.
pub fn route_source(r: &RouteMessage) -> Option<IpAddr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(s) => route_addr(s),
        _ => None,
    })
}

/// The index of the link a route goes out of.
pub fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// The unicast routes of the main table, IPv4 then IPv6.
pub async fn main_routes(h: &Handle) -> Result<Vec<RouteMessage>, rtnetlink::Error> {
    let mut out = Vec::new();
    for fam in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let rs: Vec<RouteMessage> = h.route().get(fam).execute().try_collect().await?;
        out.extend(
            rs.into_iter()
                .filter(|r| r.header.table == MAIN_TABLE && r.header.kind == RouteType::Unicast),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn a_link_is_read_by_name_mac_mtu_and_kind() {
        let mut l = LinkMessage::default();
        assert_eq!(
            (link_name(&l), link_mac(&l), link_mtu(&l)),
            (String::new(), None, None)
        );
        l.attributes = vec![
            LinkAttribute::IfName("eth0".into()),
            LinkAttribute::Address(vec![0x0a, 0x58, 0, 0, 0, 0xff]),
            LinkAttribute::Mtu(1450),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
        ];
        assert_eq!(link_name(&l), "eth0");
        assert_eq!(mac_string(link_mac(&l).unwrap()), "0a:58:00:00:00:ff");
        assert_eq!(link_mtu(&l), Some(1450));
        assert_eq!(link_kind(&l), Some(InfoKind::Veth));
    }

    #[test]
    fn an_address_prefers_the_local_one() {
        let mut a = AddressMessage::default();
        assert_eq!(address_of(&a), None);
        let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let local = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        a.attributes = vec![AddressAttribute::Address(peer)];
        assert_eq!(address_of(&a), Some(peer));
        a.attributes.push(AddressAttribute::Local(local));
        assert_eq!(address_of(&a), Some(local));
    }

    #[test]
    fn routes_read_as_cidr_gateway_source_and_device() {
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        assert_eq!(route_destination(&r), "0.0.0.0/0");
        r.header.address_family = AddressFamily::Inet6;
        assert_eq!(route_destination(&r), "::/0");
        r.header.address_family = AddressFamily::Inet;
        r.header.destination_prefix_length = 24;
        r.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(10, 1, 2, 0))),
            RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 1, 2, 1))),
            RouteAttribute::PrefSource(RouteAddress::Inet6(Ipv6Addr::LOCALHOST)),
            RouteAttribute::Oif(3),
        ];
        assert_eq!(route_destination(&r), "10.1.2.0/24");
        assert_eq!(route_gateway(&r), Some("10.1.2.1".parse().unwrap()));
        assert_eq!(route_source(&r), Some("::1".parse().unwrap()));
        assert_eq!(route_oif(&r), Some(3));
    }
}
