//! Giving the guest NIC what the veth had: the agent's `UpdateInterface` (matched by MAC:
//! name, MTU, addresses, up) and `UpdateRoutes` (the veth's routes, default route included).

use crate::agent::AgentClient;
use husk_protocols::agent::{
    Interface, IpAddress, PortForward, Route, UpdateInterfaceRequest, UpdateRoutesRequest,
};

use super::endpoint::Link;
use super::NetworkError;
use crate::agent;

/// The agent's view of `link`: same name, MAC, MTU and addresses, up.
pub fn interface(link: &Link) -> Interface {
    Interface {
        name: link.name.clone(),
        mac: husk_netlink::mac_string(&link.mac),
        mtu: link.mtu,
        up: true,
        addresses: link
            .addresses
            .iter()
            .map(|(ip, p)| IpAddress {
                address: ip.to_string(),
                prefix_len: u32::from(*p),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The routes through `link`, on the guest NIC of the same name.
pub fn routes(link: &Link) -> Vec<Route> {
    link.routes
        .iter()
        .map(|r| Route {
            destination: r.destination.clone(),
            gateway: r.gateway.clone(),
            device: link.name.clone(),
            source: r.source.clone(),
            ..Default::default()
        })
        .collect()
}

/// The guest end of port-forward, for the first NIC (see `port_forward.rs`).
pub fn port_forward() -> PortForward {
    PortForward {
        host: super::port_forward::HOST_ADDR.to_string(),
        guest: super::port_forward::GUEST_ADDR.to_string(),
        ..Default::default()
    }
}

/// Configures the guest NICs for `links`: interfaces first (routes need their addresses),
/// then all routes in one call. With `port_forward`, the first NIC is the guest end of it.
/// `guest_macs[i]`, if given, is the MAC the `i`-th guest NIC has now (a pooled VM's): the
/// agent finds it by that and gives it the veth's.
pub(crate) fn configure(
    client: &AgentClient,
    links: &[Link],
    port_forward: bool,
    guest_macs: &[String],
) -> Result<(), NetworkError> {
    for (i, link) in links.iter().enumerate() {
        let req = UpdateInterfaceRequest {
            interface: Some(interface(link)).into(),
            port_forward: (port_forward && i == 0).then(self::port_forward).into(),
            match_mac: guest_macs.get(i).cloned().unwrap_or_default(),
            ..Default::default()
        };
        let got =
            client
                .update_interface(agent::short(), &req)
                .map_err(|e| NetworkError::Guest {
                    what: format!(
                        "UpdateInterface {} ({})",
                        link.name,
                        husk_netlink::mac_string(&link.mac)
                    ),
                    message: agent::describe(&e),
                })?;
        if !got.up || got.mtu != link.mtu {
            return Err(NetworkError::Guest {
                what: format!("UpdateInterface {}", link.name),
                message: format!(
                    "the guest NIC reports up={} mtu={} after the update, wanted up with mtu {}",
                    got.up, got.mtu, link.mtu
                ),
            });
        }
    }
    let all: Vec<Route> = links.iter().flat_map(routes).collect();
    if all.is_empty() {
        return Ok(());
    }
    let req = UpdateRoutesRequest {
        routes: all,
        ..Default::default()
    };
    client
        .update_routes(agent::short(), &req)
        .map_err(|e| NetworkError::Guest {
            what: "UpdateRoutes".into(),
            message: agent::describe(&e),
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::endpoint::Route as HostRoute;

    #[test]
    fn the_guest_gets_the_veths_name_mac_mtu_addresses_and_routes() {
        let link = Link {
            name: "eth0".into(),
            index: 2,
            mac: [0x0a, 0x58, 0x0a, 0x58, 0, 0x07],
            mtu: 1400,
            addresses: vec![("10.88.0.7".parse().unwrap(), 24)],
            routes: vec![HostRoute {
                destination: "0.0.0.0/0".into(),
                gateway: "10.88.0.1".into(),
                source: String::new(),
            }],
        };
        let i = interface(&link);
        assert_eq!(
            (i.name.as_str(), i.mac.as_str(), i.mtu, i.up),
            ("eth0", "0a:58:0a:58:00:07", 1400, true)
        );
        assert_eq!(i.addresses.len(), 1);
        assert_eq!(
            (i.addresses[0].address.as_str(), i.addresses[0].prefix_len),
            ("10.88.0.7", 24)
        );
        let r = routes(&link);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (
                r[0].destination.as_str(),
                r[0].gateway.as_str(),
                r[0].device.as_str()
            ),
            ("0.0.0.0/0", "10.88.0.1", "eth0")
        );
    }
}
