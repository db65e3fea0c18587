//! The tc plumbing between a CNI veth and its tap (Kata's "tcfilter" model): an ingress
//! qdisc on each, and on each a u32 match-all filter whose action is `mirred egress
//! redirect` to the other. Whatever arrives on the veth leaves through the tap (to the
//! guest), whatever the guest sends leaves through the veth; the host stack of the pod
//! netns never sees the packets. Equivalent to:
//!
//! ```text
//! tc qdisc add dev VETH ingress
//! tc filter add dev VETH parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev TAP
//! (and the same from TAP to VETH)
//! ```
//!
//! rtnetlink 0.24 builds exactly this filter (`TrafficFilterNewRequest::redirect`), so no
//! hand-written netlink messages are needed.

use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::Handle;

use super::NetworkError;

/// `ETH_P_ALL` as tc's `protocol all` puts it on the wire (network byte order).
#[allow(clippy::cast_possible_truncation)] // ETH_P_ALL is 0x0003
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: u32 = 0xffff_0000;

fn index(i: u32) -> Result<i32, NetworkError> {
    i32::try_from(i).map_err(|_| NetworkError::Invalid(format!("interface index {i} out of range")))
}

/// Adds the ingress qdisc on `from` and the filter redirecting everything it receives to
/// `to`'s egress.
pub async fn redirect(h: &Handle, from: (&str, u32), to: (&str, u32)) -> Result<(), NetworkError> {
    let (from_name, from_index) = from;
    let (to_name, to_index) = to;
    h.qdisc()
        .add(index(from_index)?)
        .ingress()
        .execute()
        .await
        .map_err(|source| NetworkError::Netlink {
            what: format!("adding the ingress qdisc on {from_name}"),
            source,
        })?;
    h.traffic_filter(index(from_index)?)
        .add()
        .parent(INGRESS_HANDLE)
        .protocol(PROTOCOL_ALL)
        .redirect(to_index)
        .map_err(|source| NetworkError::Netlink {
            what: format!("building the redirect filter {from_name} → {to_name}"),
            source,
        })?
        .execute()
        .await
        .map_err(|source| NetworkError::Netlink {
            what: format!("adding the redirect filter {from_name} → {to_name}"),
            source,
        })
}

/// Removes the ingress qdisc of `dev` (its filters go with it). A device without one is fine.
pub async fn remove_ingress(h: &Handle, dev: (&str, u32)) -> Result<(), NetworkError> {
    let mut req = h.qdisc().del(index(dev.1)?);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(INGRESS_HANDLE);
    match req.execute().await {
        Ok(()) => Ok(()),
        // ENOENT / EINVAL: no ingress qdisc there (already removed, or never added).
        Err(rtnetlink::Error::NetlinkError(e))
            if matches!(e.raw_code().abs(), libc::ENOENT | libc::EINVAL) =>
        {
            Ok(())
        }
        Err(source) => Err(NetworkError::Netlink {
            what: format!("removing the ingress qdisc of {}", dev.0),
            source,
        }),
    }
}

/// The interfaces the ingress filters of `dev` redirect to with `mirred` (what [`redirect`]
/// installs), for finding what a dead shim left behind.
pub async fn mirred_targets(h: &Handle, dev: u32) -> Result<Vec<u32>, NetworkError> {
    use futures_util::TryStreamExt;
    use rtnetlink::packet_route::tc::{
        TcActionAttribute, TcActionMirrorOption, TcActionOption, TcAttribute, TcFilterU32Option,
        TcOption,
    };
    let filters: Vec<_> = h
        .traffic_filter(index(dev)?)
        .get()
        .ingress()
        .execute()
        .try_collect()
        .await
        .map_err(|source| NetworkError::Netlink {
            what: format!("listing the ingress filters of interface {dev}"),
            source,
        })?;
    let mut out = Vec::new();
    for f in &filters {
        for a in &f.attributes {
            let TcAttribute::Options(opts) = a else {
                continue;
            };
            for o in opts {
                let TcOption::U32(TcFilterU32Option::Action(actions)) = o else {
                    continue;
                };
                for act in actions {
                    for aa in &act.attributes {
                        let TcActionAttribute::Options(ao) = aa else {
                            continue;
                        };
                        for x in ao {
                            if let TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) = x {
                                out.push(p.ifindex);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}
