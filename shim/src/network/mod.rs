//! Pod networking on the host: the CNI network namespace reaches the guest through a tap.
//!
//! Owns, per sandbox: one tap per CNI interface in the pod netns, the ingress qdiscs and
//! mirred redirect filters that tie each veth to its tap (see [`tc`]), and the guest NIC
//! configuration copied from the veth (see [`guest`]). It never touches the veths
//! themselves beyond their ingress qdisc: they, their addresses and the netns belong to CNI.
//!
//! - no network namespace path in the spec (plain `ctr run`): nothing is made and the guest
//!   has loopback only, as with runc;
//! - with one, also the path `kubectl port-forward` takes into the guest: a NAT table and a
//!   private link-local /30 on the first tap (see [`port_forward`]);
//! - [`Network::setup`] before the VM starts (the VM needs the tap fds),
//!   [`Network::configure_guest`] once the agent answers, [`Network::teardown`] on delete
//!   (also run when a [`Network`] is dropped, so a failed bring-up leaves nothing).
//!
//! Modules: [`netns`] (running netlink work in the pod netns), [`endpoint`] (what CNI made),
//! [`tap`] (creating taps), [`tc`] (the redirects), [`guest`] (the agent calls),
//! [`port_forward`] and [`nft`] (CRI's PortForward into the guest).

pub(crate) mod endpoint;
pub mod guest;
pub mod netns;
pub use husk_nft as nft;
pub mod port_forward;
pub mod tap;
pub mod tc;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::agent::AgentClient;
use husk_hypervisor::NetConfig;
use rtnetlink::LinkUnspec;
use serde_json::Value;

use endpoint::Link;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {path}: cannot enter it — check that the netns exists (CNI made it) and that the shim runs as root")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("configuring the guest network: {what}: {message}")]
    Guest { what: String, message: String },
    #[error("port-forward NAT in the pod netns: {what}")]
    Nft {
        what: String,
        #[source]
        source: nft::NftError,
    },
}

/// `e` with its sources, `outer: inner: …`, for messages that travel as strings (to
/// containerd, through `ctr`).
pub use crate::error::chain;

/// The network namespace path of an OCI spec (`linux.namespaces[]` of type `network` with a
/// `path`), as containerd's CRI and `ctr run --with-ns network:<path>` write it. `None`: the
/// container would get a new, empty netns — for us, a guest with loopback only.
pub fn netns_path(spec: &Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find_map(|ns| {
            let path = ns["path"].as_str().filter(|p| !p.is_empty())?;
            (ns["type"].as_str() == Some("network")).then(|| PathBuf::from(path))
        })
}

/// One CNI interface mirrored to a tap.
#[derive(Debug)]
pub struct Endpoint {
    pub veth: Link,
    pub tap_name: String,
    pub tap_index: u32,
    /// Our copy of the tap's file (handed to the VM at its start); `None` for a pooled VM's
    /// tap, which its keeper and VM hold (it was moved into the pod netns at claim).
    pub tap: Option<Arc<OwnedFd>>,
}

/// The sandbox's network on the host side.
#[derive(Debug, Default)]
pub(crate) struct Network {
    netns: Option<PathBuf>,
    endpoints: Vec<Endpoint>,
    /// Whether [`port_forward::install`] succeeded on the first endpoint's tap (the guest NIC
    /// then gets [`port_forward::GUEST_ADDR`]).
    port_forward: bool,
    /// For a pooled VM: the MAC each guest NIC has now, which the agent replaces with its
    /// veth's (empty for a cold VM, whose NICs were given the veths' MACs at boot).
    guest_macs: Vec<String>,
}

/// A pooled VM's NIC: its tap (in the keeper's network namespace until claimed) and the MAC
/// the guest NIC was booted with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PooledNic {
    pub tap: String,
    pub mac: String,
}

/// How many interfaces CNI left in the spec's network namespace (0 without one): how many
/// NICs the sandbox's VM needs.
pub(crate) fn interface_count(spec: &Value) -> Result<usize, NetworkError> {
    let Some(path) = netns_path(spec) else {
        return Ok(0);
    };
    netns::run_in(&path, async move |h| Ok(endpoint::scan(&h).await?.len()))
}

/// The tap of the `i`-th interface (Kata names them `tap<i>_kata`).
fn tap_name(i: usize) -> String {
    format!("tap{i}_husk")
}

/// In the pod netns: for each interface CNI made, its tap (already here: created, or moved
/// in), set to the veth's MTU and up, mirrored both ways with tc; then the port-forward link
/// on the first. Removes what it made on failure.
async fn plumb(
    h: &rtnetlink::Handle,
    links: Vec<Link>,
    taps: Vec<(String, Option<Arc<OwnedFd>>)>,
) -> Result<(Vec<Endpoint>, bool), NetworkError> {
    let mut made: Vec<Endpoint> = Vec::new();
    let r = async {
        for (veth, (name, fd)) in links.into_iter().zip(taps) {
            let index = endpoint::index_of(h, &name).await?.ok_or_else(|| {
                NetworkError::Invalid(format!("tap {name}: created but not listed"))
            })?;
            made.push(Endpoint {
                veth,
                tap_name: name,
                tap_index: index,
                tap: fd,
            });
            let e = made.last().expect("just pushed");
            h.link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .mtu(e.veth.mtu)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|source| NetworkError::Netlink {
                    what: format!("setting tap {} up with MTU {}", e.tap_name, e.veth.mtu),
                    source,
                })?;
            tc::redirect(h, (&e.veth.name, e.veth.index), (&e.tap_name, e.tap_index)).await?;
            tc::redirect(h, (&e.tap_name, e.tap_index), (&e.veth.name, e.veth.index)).await?;
        }
        Ok::<(), NetworkError>(())
    }
    .await;
    if let Err(e) = r {
        remove(h, &made).await;
        return Err(e);
    }
    let port_forward = match made.first() {
        None => false,
        Some(e) => match port_forward::conflict(std::slice::from_ref(&e.veth)) {
            Some(what) => {
                log::warn!(
                    "network: kubectl port-forward is off for this pod: CNI's {what} overlaps {}/{}, the link husk would use",
                    port_forward::HOST_ADDR,
                    port_forward::PREFIX
                );
                false
            }
            None => match port_forward::install(
                h,
                (&e.tap_name, e.tap_index),
                (&e.veth.name, e.veth.index),
            )
            .await
            {
                Ok(()) => true,
                Err(err) => {
                    // A pod whose port-forward cannot work still runs; the log says why.
                    let _ = port_forward::remove_nat();
                    log::warn!(
                        "network: kubectl port-forward is off for this pod: {}",
                        chain(&err)
                    );
                    false
                }
            },
        },
    };
    Ok((made, port_forward))
}

impl Network {
    /// Mirrors each interface of the spec's network namespace to a new tap. Without a netns
    /// path, an empty network (loopback only in the guest).
    pub fn setup(spec: &Value) -> Result<Self, NetworkError> {
        let Some(path) = netns_path(spec) else {
            return Ok(Self::default());
        };
        let endpoints = netns::run_in(&path, async move |h| {
            let links = endpoint::scan(&h).await?;
            let mut taps = Vec::new();
            for i in 0..links.len() {
                let name = tap_name(i);
                taps.push((name.clone(), Some(Arc::new(tap::create(&name)?))));
            }
            plumb(&h, links, taps).await
        })?;
        let (endpoints, port_forward) = endpoints;
        Ok(Self {
            netns: Some(path),
            endpoints,
            port_forward,
            guest_macs: Vec::new(),
        }
        .logged())
    }

    /// For a pooled VM: moves its taps (`nics`, in its keeper's network namespace
    /// `keeper_netns`) into the spec's network namespace, one per CNI interface, and mirrors
    /// them as [`Self::setup`] does; the agent then gives each guest NIC its veth's MAC. A
    /// spec without a netns path leaves the taps where they are and the guest NICs down.
    pub(crate) fn setup_pooled(
        spec: &Value,
        keeper_netns: &Path,
        nics: &[PooledNic],
    ) -> Result<Self, NetworkError> {
        use std::os::fd::AsRawFd;
        let Some(path) = netns_path(spec) else {
            return Ok(Self::default());
        };
        let links = netns::run_in(&path, async move |h| endpoint::scan(&h).await)?;
        if links.len() > nics.len() {
            return Err(NetworkError::Invalid(format!(
                "{}: {} interfaces, and the pooled VM has {} NIC(s)",
                path.display(),
                links.len(),
                nics.len()
            )));
        }
        let used = &nics[..links.len()];
        let target = std::fs::File::open(&path).map_err(|source| NetworkError::Netns {
            path: path.clone(),
            source,
        })?;
        let target_fd = target.as_raw_fd();
        let names: Vec<String> = used.iter().map(|n| n.tap.clone()).collect();
        let moving = names.clone();
        let dest = path.display().to_string();
        // The move is asked of the namespace the tap is in; `target` outlives the call.
        netns::run_in(keeper_netns, async move |h| {
            for name in &moving {
                let index = endpoint::index_of(&h, name).await?.ok_or_else(|| {
                    NetworkError::Invalid(format!(
                        "tap {name}: not in the pooled VM's network namespace"
                    ))
                })?;
                h.link()
                    .set(
                        LinkUnspec::new_with_index(index)
                            .setns_by_fd(target_fd)
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(|source| NetworkError::Netlink {
                        what: format!("moving tap {name} into {dest}"),
                        source,
                    })?;
            }
            Ok(())
        })?;
        drop(target);
        let (endpoints, port_forward) = netns::run_in(&path, async move |h| {
            let links = endpoint::scan(&h).await?;
            plumb(&h, links, names.into_iter().map(|n| (n, None)).collect()).await
        })?;
        Ok(Self {
            netns: Some(path),
            endpoints,
            port_forward,
            guest_macs: used.iter().map(|n| n.mac.clone()).collect(),
        }
        .logged())
    }

    fn logged(self) -> Self {
        for e in &self.endpoints {
            log::info!(
                "network: {} ({}, mtu {}, {:?}) ↔ {} in {}",
                e.veth.name,
                husk_netlink::mac_string(&e.veth.mac),
                e.veth.mtu,
                e.veth.addresses,
                e.tap_name,
                self.netns
                    .as_deref()
                    .map(Path::display)
                    .map(|d| d.to_string())
                    .unwrap_or_default()
            );
        }
        self
    }

    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    pub(crate) fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The VM's NICs: each tap, with its veth's MAC.
    pub(crate) fn vm_nets(&self) -> Vec<NetConfig> {
        self.endpoints
            .iter()
            .filter_map(|e| {
                Some(NetConfig {
                    tap: e.tap.clone()?,
                    mac: e.veth.mac,
                })
            })
            .collect()
    }

    /// Gives the guest NICs the veths' addresses, MTU and routes (and the first one the guest
    /// end of the port-forward link).
    pub(crate) fn configure_guest(&self, client: &AgentClient) -> Result<(), NetworkError> {
        let mut links: Vec<Link> = self.endpoints.iter().map(|e| e.veth.clone()).collect();
        if self.port_forward {
            if let Some(first) = links.first_mut() {
                first.addresses.push((
                    std::net::IpAddr::V4(port_forward::GUEST_ADDR),
                    port_forward::PREFIX,
                ));
            }
        }
        guest::configure(client, &links, self.port_forward, &self.guest_macs)
    }

    /// Removes the port-forward NAT, the redirects, the ingress qdiscs and the taps.
    /// Idempotent; a netns that is already gone (CNI deleted it) took all of it along.
    pub fn teardown(&mut self) -> Result<(), NetworkError> {
        let Some(path) = self.netns.take() else {
            return Ok(());
        };
        let endpoints = std::mem::take(&mut self.endpoints);
        if endpoints.is_empty() || !path.exists() {
            return Ok(());
        }
        let desc: Vec<(String, u32, String, u32)> = endpoints
            .iter()
            .map(|e| {
                (
                    e.veth.name.clone(),
                    e.veth.index,
                    e.tap_name.clone(),
                    e.tap_index,
                )
            })
            .collect();
        // Our copies of the tap fds go first; the VM's went with the VM.
        drop(endpoints);
        let port_forward = std::mem::take(&mut self.port_forward);
        netns::run_in(&path, async move |h| {
            let mut first_err = None;
            if port_forward {
                if let Err(e) = port_forward::remove_nat() {
                    first_err.get_or_insert(e);
                }
            }
            for (veth, veth_index, tap, tap_index) in &desc {
                if let Err(e) = tc::remove_ingress(&h, (veth, *veth_index)).await {
                    first_err.get_or_insert(e);
                }
                if let Err(e) = delete_tap(&h, tap, *tap_index).await {
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        })
    }
}

/// After a shim that died without its teardown (the `delete` command): in the spec's netns,
/// deletes our port-forward NAT table, our taps (`tap<i>_husk`, with the port-forward address
/// and filters on them) and the ingress qdisc of each interface whose ingress filters redirect
/// to one of them or to an interface that no longer exists (the tap went with the VM).
/// Interfaces without such a redirect are not touched. Idempotent.
pub(crate) fn cleanup_leftovers(spec: &Value) -> Result<(), NetworkError> {
    let Some(path) = netns_path(spec) else {
        return Ok(());
    };
    if !path.exists() {
        return Ok(());
    }
    netns::run_in(&path, async move |h| {
        use futures_util::TryStreamExt;
        use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
        // Its failure does not keep the rest from being removed; it is reported at the end.
        let nat = port_forward::remove_nat();
        let links: Vec<LinkMessage> =
            h.link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(|source| NetworkError::Netlink {
                    what: "listing the interfaces".into(),
                    source,
                })?;
        let name = |l: &LinkMessage| {
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
        };
        let ours = |n: &str| n.starts_with("tap") && n.ends_with("_husk");
        let taps: Vec<(String, u32)> = links
            .iter()
            .filter(|l| ours(&name(l)))
            .map(|l| (name(l), l.header.index))
            .collect();
        for l in links.iter().filter(|l| !ours(&name(l))) {
            let targets = tc::mirred_targets(&h, l.header.index).await?;
            let stale = targets.iter().any(|t| {
                taps.iter().any(|(_, i)| i == t) || !links.iter().any(|x| x.header.index == *t)
            });
            if stale {
                tc::remove_ingress(&h, (&name(l), l.header.index)).await?;
            }
        }
        for (n, i) in &taps {
            delete_tap(&h, n, *i).await?;
        }
        nat
    })
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            log::error!("network teardown: {e}");
        }
    }
}

/// Deletes tap `name` if it still exists under `index` (it vanishes by itself once every
/// file on it is closed, so "not there" is success).
async fn delete_tap(h: &rtnetlink::Handle, name: &str, index: u32) -> Result<(), NetworkError> {
    if endpoint::index_of(h, name).await? != Some(index) {
        return Ok(());
    }
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e))
            if matches!(e.raw_code().abs(), libc::ENODEV | libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(NetworkError::Netlink {
            what: format!("deleting tap {name}"),
            source,
        }),
    }
}

/// Best-effort removal of what a failed setup made (the port-forward NAT comes last in setup,
/// and is removed where it fails).
async fn remove(h: &rtnetlink::Handle, made: &[Endpoint]) {
    for e in made {
        let _ = tc::remove_ingress(h, (&e.veth.name, e.veth.index)).await;
        let _ = delete_tap(h, &e.tap_name, e.tap_index).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn netns_path_only_from_a_network_namespace_with_a_path() {
        assert_eq!(netns_path(&json!({})), None);
        let plain = json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]}});
        assert_eq!(netns_path(&plain), None);
        let empty = json!({"linux": {"namespaces": [{"type": "network", "path": ""}]}});
        assert_eq!(netns_path(&empty), None);
        let cni = json!({"linux": {"namespaces": [
            {"type": "ipc", "path": "/proc/1/ns/ipc"},
            {"type": "network", "path": "/var/run/netns/cni-1234"}
        ]}});
        assert_eq!(
            netns_path(&cni),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
    }

    #[test]
    fn no_netns_means_no_nics_and_nothing_to_tear_down() {
        let mut n =
            Network::setup(&json!({"linux": {"namespaces": [{"type": "network"}]}})).unwrap();
        assert!(n.vm_nets().is_empty() && n.netns().is_none());
        n.teardown().unwrap();
    }

    #[test]
    fn a_missing_netns_is_named_with_the_fix() {
        let spec = json!({"linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/husk-no-such-ns"}]}});
        let e = Network::setup(&spec).unwrap_err().to_string();
        assert!(
            e.contains("/var/run/netns/husk-no-such-ns")
                && e.contains("check that the netns exists"),
            "{e}"
        );
    }
}
