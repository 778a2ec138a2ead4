//! rtnetlink: observing the host's links, addresses and default route, and executing [`Op`]s.
//!
//! One [`Rtnl`] per namespace; its socket was opened inside that namespace, so every request
//! acts there whichever thread sends it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::IntoRawFd;
use std::os::unix::io::FromRawFd;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    BondMode, InfoData, InfoKind, InfoVlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::sys::TokioSocket;
use rtnetlink::{Handle, LinkBond, LinkBridge, LinkUnspec, LinkVlan, RouteMessageBuilder};

use super::model::{DefaultRoute, HostNet, Ipv4Cidr, Link, LinkStats, Op};
use super::netns::NetNs;

/// A netlink failure, with the errno when the kernel sent one.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct RtnlError {
    pub what: String,
    pub errno: Option<i32>,
    pub detail: String,
}

impl RtnlError {
    fn new(what: impl Into<String>, e: rtnetlink::Error) -> RtnlError {
        let errno = match &e {
            rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
            _ => None,
        };
        let detail = match errno {
            Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
            None => e.to_string(),
        };
        RtnlError {
            what: what.into(),
            errno,
            detail,
        }
    }

    fn missing(what: impl Into<String>, name: &str) -> RtnlError {
        RtnlError {
            what: what.into(),
            errno: Some(libc::ENODEV),
            detail: format!("no interface {name:?}"),
        }
    }
}

#[derive(Clone)]
pub struct Rtnl {
    handle: Handle,
}

impl Rtnl {
    /// Opens a route netlink connection inside `ns`. Must run inside a Tokio runtime.
    pub fn connect(ns: &NetNs) -> std::io::Result<Rtnl> {
        let fd = ns.netlink_socket()?;
        // SAFETY: `fd` is an open netlink socket we own; TokioSocket takes it over.
        let sock = unsafe { TokioSocket::from_raw_fd(fd.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(sock);
        tokio::spawn(conn);
        Ok(Rtnl { handle })
    }

    /// All links with their IPv4 addresses, and the main table's IPv4 default route.
    ///
    /// A dump the kernel interrupts because the lists changed meanwhile (links coming up add
    /// IPv6 addresses) ends in EBUSY; it is taken again, a few times, before that is an error.
    pub async fn observe(&self) -> Result<HostNet, RtnlError> {
        let mut attempt = 0;
        loop {
            match self.observe_once().await {
                Err(e) if e.errno == Some(libc::EBUSY) && attempt < 5 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "netlink dump interrupted; taking it again");
                    tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
                }
                r => return r,
            }
        }
    }

    async fn observe_once(&self) -> Result<HostNet, RtnlError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| RtnlError::new("list links", e))?;
        let names: BTreeMap<u32, String> = msgs
            .iter()
            .filter_map(|m| link_name(m).map(|n| (m.header.index, n)))
            .collect();
        let mut links: BTreeMap<String, Link> = BTreeMap::new();
        for m in &msgs {
            if let Some(l) = parse_link(m, &names) {
                links.insert(l.name.clone(), l);
            }
        }
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| RtnlError::new("list addresses", e))?;
        for a in addrs {
            let Some(name) = names.get(&a.header.index) else {
                continue;
            };
            let ip = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
            });
            if let (Some(ip), Some(l)) = (ip, links.get_mut(name)) {
                l.ipv4.push(Ipv4Cidr {
                    addr: ip,
                    prefix: a.header.prefix_len,
                });
            }
        }
        for l in links.values_mut() {
            l.ipv4.sort();
        }
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| RtnlError::new("list routes", e))?;
        let default_route = routes.iter().find_map(|r| {
            if r.header.destination_prefix_length != 0 || r.header.table != 254 {
                return None;
            }
            let gw = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            })?;
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })?;
            Some(DefaultRoute {
                gateway: gw,
                dev: names.get(&oif)?.clone(),
            })
        });
        Ok(HostNet { links, default_route })
    }

    /// The index of link `name`.
    pub async fn index(&self, name: &str) -> Result<u32, RtnlError> {
        let mut s = self.handle.link().get().match_name(name.to_string()).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(m.header.index),
            Ok(None) => Err(RtnlError::missing(format!("look up {name}"), name)),
            Err(e) => {
                let e = RtnlError::new(format!("look up {name}"), e);
                if e.errno == Some(libc::ENODEV) {
                    Err(RtnlError::missing(format!("look up {name}"), name))
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Runs one planned change. DHCP ops are the caller's.
    pub async fn execute(&self, op: &Op) -> Result<(), RtnlError> {
        let what = format!("{op:?}");
        let link = self.handle.link();
        let res = match op {
            Op::DeleteLink { name } => {
                let idx = match self.index(name).await {
                    Ok(i) => i,
                    // Gone already (a bond takes its VLAN devices with it).
                    Err(e) if e.errno == Some(libc::ENODEV) => return Ok(()),
                    Err(e) => return Err(e),
                };
                link.del(idx).execute().await
            }
            Op::CreateBridge { name } => link.add(LinkBridge::new(name).build()).execute().await,
            Op::CreateVlan { name, base, id } => {
                let base = self.index(base).await?;
                link.add(LinkVlan::new(name, base, *id).build()).execute().await
            }
            Op::CreateBond { name, options } => {
                link.add(
                    LinkBond::new(name)
                        .mode(BondMode::from(options.mode))
                        .miimon(options.miimon)
                        .build(),
                )
                .execute()
                .await
            }
            Op::SetMaster { name, master } => {
                let idx = self.index(name).await?;
                let b = LinkUnspec::new_with_index(idx);
                let b = match master {
                    Some(m) => b.controller(self.index(m).await?),
                    None => b.nocontroller(),
                };
                link.set(b.build()).execute().await
            }
            Op::SetMtu { name, mtu } => {
                let idx = self.index(name).await?;
                link.set(LinkUnspec::new_with_index(idx).mtu(*mtu).build())
                    .execute()
                    .await
            }
            Op::SetUp { name, up } => {
                let idx = self.index(name).await?;
                let b = LinkUnspec::new_with_index(idx);
                let b = if *up { b.up() } else { b.down() };
                link.set(b.build()).execute().await
            }
            Op::AddAddr { name, addr } => {
                let idx = self.index(name).await?;
                self.handle
                    .address()
                    .add(idx, IpAddr::V4(addr.addr), addr.prefix)
                    .execute()
                    .await
            }
            Op::DelAddr { name, addr } => {
                let idx = self.index(name).await?;
                let found: Vec<AddressMessage> = self
                    .handle
                    .address()
                    .get()
                    .set_link_index_filter(idx)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(|e| RtnlError::new(what.clone(), e))?;
                for m in found {
                    let hit = m.header.prefix_len == addr.prefix
                        && m.attributes.iter().any(|a| {
                            matches!(a, AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) if *ip == addr.addr)
                        });
                    if hit {
                        self.handle
                            .address()
                            .del(m)
                            .execute()
                            .await
                            .map_err(|e| RtnlError::new(what.clone(), e))?;
                    }
                }
                Ok(())
            }
            Op::ReplaceDefaultRoute(r) => {
                let idx = self.index(&r.dev).await?;
                self.handle
                    .route()
                    .add(
                        RouteMessageBuilder::<Ipv4Addr>::new()
                            .gateway(r.gateway)
                            .output_interface(idx)
                            .build(),
                    )
                    .replace()
                    .execute()
                    .await
            }
            Op::DelDefaultRoute(r) => {
                let idx = self.index(&r.dev).await?;
                self.handle
                    .route()
                    .del(
                        RouteMessageBuilder::<Ipv4Addr>::new()
                            .gateway(r.gateway)
                            .output_interface(idx)
                            .build(),
                    )
                    .execute()
                    .await
            }
            Op::StartDhcp { .. } | Op::StopDhcp { .. } => return Ok(()),
        };
        match res.map_err(|e| RtnlError::new(what, e)) {
            // Already gone: the kernel flushes a route when the address it went through goes.
            Err(e) if matches!(op, Op::DelDefaultRoute(_)) && e.errno == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    /// Puts link `name` into bridge `bridge` with the bridge's MTU, and brings it up.
    pub async fn enslave(&self, name: &str, bridge: &str) -> Result<(), RtnlError> {
        let br = self.index(bridge).await?;
        let mtu = self
            .handle
            .link()
            .get()
            .match_index(br)
            .execute()
            .try_next()
            .await
            .map_err(|e| RtnlError::new(format!("look up {bridge}"), e))?
            .and_then(|m| {
                m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                })
            });
        let idx = self.index(name).await?;
        let mut b = LinkUnspec::new_with_index(idx).controller(br);
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(|e| RtnlError::new(format!("attach {name} to bridge {bridge}"), e))?;
        self.execute(&Op::SetUp {
            name: name.into(),
            up: true,
        })
        .await
    }
}

fn link_name(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn parse_link(m: &LinkMessage, names: &BTreeMap<u32, String>) -> Option<Link> {
    let name = link_name(m)?;
    let mut l = Link {
        index: m.header.index,
        name,
        kind: None,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        carrier: m.header.flags.contains(LinkFlags::LowerUp),
        master: None,
        mac: None,
        vlan: None,
        ipv4: vec![],
        stats: LinkStats::default(),
    };
    let mut lower = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Controller(i) => l.master = names.get(i).cloned(),
            LinkAttribute::Link(i) => lower = names.get(i).cloned(),
            LinkAttribute::Address(b) if b.len() == 6 => {
                l.mac = Some(b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":"))
            }
            LinkAttribute::Stats64(s) => {
                l.stats = LinkStats {
                    rx_bytes: s.rx_bytes,
                    tx_bytes: s.tx_bytes,
                    rx_packets: s.rx_packets,
                    tx_packets: s.tx_packets,
                    rx_errors: s.rx_errors,
                    tx_errors: s.tx_errors,
                    rx_dropped: s.rx_dropped,
                    tx_dropped: s.tx_dropped,
                }
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => l.kind = Some(kind_name(k)),
                        LinkInfo::Data(InfoData::Vlan(v)) => {
                            if let Some(id) = v.iter().find_map(|x| match x {
                                InfoVlan::Id(id) => Some(*id),
                                _ => None,
                            }) {
                                l.vlan = Some((String::new(), id));
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if let Some((base, _)) = l.vlan.as_mut() {
        *base = lower.unwrap_or_default();
    }
    Some(l)
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Vlan => "vlan".into(),
        InfoKind::Bond => "bond".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Dummy => "dummy".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}
