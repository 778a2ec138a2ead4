//! Networks in oVirt's v4 shapes: logical networks (`/networks`, `/datacenters/{id}/networks`),
//! cluster networks (`/clusters/{id}/networks`), vNIC profiles (`/vnicprofiles`, one per VM
//! network), host NICs (`/hosts/{id}/nics`, live from the node), host network attachments
//! (`/hosts/{id}/networkattachments`, `/hosts/{id}/setupnetworks`) and VM NICs
//! (`/vms/{id}/nics`, their network given as a `vnic_profile`).
//!
//! A host NIC's id is its interface name (the node names NICs, not the engine).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::Value;

use crate::commands::{AddNetwork, AddNic, SetupHostNetworks, UpdateNetwork, UpdateNic};
use crate::model::*;
use crate::network::{
    network_of_profile, vnic_profile_of, ClusterNetwork, HostAttachment, HostBond, HostIp, LogicalNetwork,
    MacPool, MacRange, NetworkAttachment, NetworkAttachmentId, NetworkId, VnicProfileId,
};

use super::super::fault::ApiError;
use super::super::input::Elem;
use super::super::out::Out;
use super::super::write::{collection, href};
use super::super::{Req, Resp, API};
use super::infra::root_entity;
use super::{action_complete, dc_ref, parse_id, required, run_action};

// ------------------------------------------------------------------------------- writers

fn reference(o: &mut Out, name: &str, coll: &str, id: impl std::fmt::Display) {
    let id = id.to_string();
    o.reference(name, &id, &href(coll, &id));
}

/// Where a network is shown: on its own, under its data center, or under a cluster.
#[derive(Clone, Copy)]
enum NetScope<'a> {
    Top,
    Dc,
    Cluster(ClusterId, &'a ClusterNetwork),
}

fn network(o: &mut Out, n: &LogicalNetwork, scope: NetScope<'_>, management: bool) {
    let hr = match scope {
        NetScope::Top => href("networks", n.id),
        NetScope::Dc => format!("{API}/datacenters/{}/networks/{}", n.data_center_id, n.id),
        NetScope::Cluster(c, _) => format!("{API}/clusters/{c}/networks/{}", n.id),
    };
    o.open("network", Some(&n.id.to_string()), Some(&hr));
    o.leaf("name", &n.name);
    o.leaf("description", &n.description);
    o.leaf("mtu", n.mtu.unwrap_or(0));
    o.leaf("stp", false);
    if let Some(v) = n.vlan {
        o.open("vlan", Some(&v.to_string()), None);
        o.close("vlan");
    }
    let cluster_mgmt = matches!(scope, NetScope::Cluster(_, cn) if cn.management);
    o.open("usages", None, None);
    o.array_open("usage");
    if n.vm_network {
        o.leaf("usage", "vm");
    }
    if cluster_mgmt || (management && !matches!(scope, NetScope::Cluster(..))) {
        o.leaf("usage", "management");
    }
    o.array_close();
    o.close("usages");
    reference(o, "data_center", "datacenters", n.data_center_id);
    if let NetScope::Cluster(c, cn) = scope {
        reference(o, "cluster", "clusters", c);
        o.leaf("required", cn.required || cn.management);
        o.leaf("display", false);
        o.leaf("status", "operational");
    }
    if !matches!(scope, NetScope::Cluster(..)) {
        o.links(&href("networks", n.id), &["vnicprofiles"]);
    }
    o.close("network");
}

fn vnic_profile(o: &mut Out, n: &LogicalNetwork) {
    let id = n.vnic_profile();
    o.open(
        "vnic_profile",
        Some(&id.to_string()),
        Some(&href("vnicprofiles", id)),
    );
    o.leaf("name", &n.name);
    o.leaf("description", "");
    o.open("pass_through", None, None);
    o.leaf("mode", "disabled");
    o.close("pass_through");
    o.leaf("port_mirroring", false);
    reference(o, "network", "networks", n.id);
    o.close("vnic_profile");
}

fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    Ipv4Addr::from(bits)
}

fn ip(o: &mut Out, address: &str, prefix: Option<u8>, gateway: Option<&str>) {
    o.open("ip", None, None);
    o.leaf("address", address);
    if let Some(p) = prefix {
        o.leaf("netmask", netmask(p));
    }
    o.opt_leaf("gateway", gateway);
    o.leaf("version", "v4");
    o.close("ip");
}

/// A host NIC from the node's capabilities (`nics.<name>`), with the network on it if any.
fn host_nic(
    o: &mut Out,
    host: HostUuid,
    name: &str,
    c: &Value,
    network: Option<&LogicalNetwork>,
    bonding: bool,
) {
    let hr = format!("{API}/hosts/{host}/nics/{name}");
    o.open("host_nic", Some(name), Some(&hr));
    o.leaf("name", name);
    if let Some(m) = c["hwaddr"].as_str() {
        o.open("mac", None, None);
        o.leaf("address", m);
        o.close("mac");
    }
    if let Some(m) = c["mtu"].as_u64() {
        o.leaf("mtu", m);
    }
    o.leaf("status", if c["up"] == true { "up" } else { "down" });
    let addr = c["ipv4addrs"][0].as_str();
    o.leaf("boot_protocol", if addr.is_some() { "static" } else { "none" });
    if let Some((a, p)) = addr.and_then(|a| a.split_once('/')) {
        ip(o, a, p.parse().ok(), None);
    }
    o.leaf("bridged", network.is_some_and(|n| n.vm_network));
    if bonding {
        o.open("bonding", None, None);
        o.open("slaves", None, None);
        o.array_open("host_nic");
        for s in c["slaves"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            o.reference("host_nic", s, &format!("{API}/hosts/{host}/nics/{s}"));
        }
        o.array_close();
        o.close("slaves");
        o.close("bonding");
    }
    if let Some(n) = network {
        reference(o, "network", "networks", n.id);
    }
    reference(o, "host", "hosts", host);
    o.close("host_nic");
}

fn attachment(o: &mut Out, a: &NetworkAttachment, in_sync: bool) {
    let hr = format!("{API}/hosts/{}/networkattachments/{}", a.host_id, a.id);
    o.open("network_attachment", Some(&a.id.to_string()), Some(&hr));
    reference(o, "network", "networks", a.network_id);
    let nic = &a.attachment.nic;
    o.reference("host_nic", nic, &format!("{API}/hosts/{}/nics/{nic}", a.host_id));
    o.open("ip_address_assignments", None, None);
    o.array_open("ip_address_assignment");
    o.open("ip_address_assignment", None, None);
    match &a.attachment.ip {
        HostIp::None => o.leaf("assignment_method", "none"),
        HostIp::Dhcp => o.leaf("assignment_method", "dhcp"),
        HostIp::Static {
            address,
            prefix,
            gateway,
        } => {
            o.leaf("assignment_method", "static");
            ip(
                o,
                &address.to_string(),
                Some(*prefix),
                gateway.map(|g| g.to_string()).as_deref(),
            );
        }
    }
    o.close("ip_address_assignment");
    o.array_close();
    o.close("ip_address_assignments");
    o.leaf("default_route", a.attachment.default_route);
    o.leaf("in_sync", in_sync);
    reference(o, "host", "hosts", a.host_id);
    o.close("network_attachment");
}

/// A VM NIC; its network is shown as the network's vNIC profile.
fn nic(o: &mut Out, n: &Nic, profiles: &BTreeMap<String, VnicProfileId>) {
    let hr = format!("{API}/vms/{}/nics/{}", n.vm_id, n.id);
    o.open("nic", Some(&n.id.to_string()), Some(&hr));
    o.leaf("name", &n.name);
    o.leaf("interface", n.interface);
    o.leaf("linked", n.linked);
    o.leaf("plugged", n.plugged);
    o.open("mac", None, None);
    o.leaf("address", n.mac);
    o.close("mac");
    if let Some(p) = n.network.as_ref().and_then(|net| profiles.get(net)) {
        reference(o, "vnic_profile", "vnicprofiles", p);
    }
    reference(o, "vm", "vms", n.vm_id);
    o.close("nic");
}

fn template_nic(o: &mut Out, n: &TemplateNic, profiles: &BTreeMap<String, VnicProfileId>) {
    let hr = format!("{API}/templates/{}/nics/{}", n.template_id, n.id);
    o.open("nic", Some(&n.id.to_string()), Some(&hr));
    o.leaf("name", &n.name);
    o.leaf("interface", n.interface);
    o.leaf("linked", n.linked);
    if let Some(p) = n.network.as_ref().and_then(|net| profiles.get(net)) {
        reference(o, "vnic_profile", "vnicprofiles", p);
    }
    reference(o, "template", "templates", n.template_id);
    o.close("nic");
}

fn one(r: &Req, f: impl FnOnce(&mut Out)) -> Out {
    let mut o = r.out();
    root_entity(&mut o, f);
    o
}

// ------------------------------------------------------------------------------- readers

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::bad_request(m)
}

/// Whether the network is some cluster's management network.
async fn is_management(r: &Req, n: &LogicalNetwork) -> Result<bool, ApiError> {
    Ok(r.db()
        .network_clusters(n.id)
        .await?
        .iter()
        .any(|(_, c)| c.management))
}

/// A network definition from a body (`name`, `description`, `mtu`, `vlan id`, `usages`).
fn network_fields(b: &Elem) -> Result<UpdateNetwork, ApiError> {
    let mtu = match b.u32("mtu")? {
        None => None,
        Some(0) => Some(None),
        Some(m) => Some(Some(m)),
    };
    let vlan = match b.get("vlan") {
        None => None,
        Some(v) => match v.id() {
            None => Some(None),
            Some(id) => Some(Some(
                id.parse::<u16>()
                    .map_err(|_| bad(format!("<vlan id> {id:?} is not a VLAN id")))?,
            )),
        },
    };
    let vm_network = b
        .get("usages")
        .map(|u| u.children_named("usage").any(|x| x.text.trim() == "vm"));
    Ok(UpdateNetwork {
        name: b.string("name"),
        description: b.get("description").map(|d| d.text.trim().to_string()),
        mtu,
        vlan,
        vm_network,
    })
}

async fn net_by_id(r: &Req, i: usize) -> Result<LogicalNetwork, ApiError> {
    let id: NetworkId = r.id(i, "network")?;
    r.db()
        .network_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("network {id} not found")))
}

/// A network reference in a body: its id, or its name within `dc`.
async fn network_ref(r: &Req, e: &Elem, dc: DcId) -> Result<LogicalNetwork, ApiError> {
    if let Some(id) = e.id() {
        let id: NetworkId = parse_id(id, "network")?;
        return r
            .db()
            .network_get(id)
            .await?
            .filter(|n| n.data_center_id == dc)
            .ok_or_else(|| ApiError::not_found(format!("network {id} not found in the data center")));
    }
    let n = e
        .str("name")
        .ok_or_else(|| bad(format!("<{}> needs an id or a <name>", e.name)))?;
    r.db()
        .network_get_by_name(dc, n)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("network {n} not found in the data center")))
}

// ------------------------------------------------------------------------------- networks

async fn list(r: &Req, dc: Option<DcId>, scope: NetScope<'_>) -> Result<Resp, ApiError> {
    let mut nets = Vec::new();
    for n in r.db().network_list(dc).await? {
        let m = is_management(r, &n).await?;
        nets.push((n, m));
    }
    let mut o = r.out();
    collection(&mut o, "networks", "network", &nets, |o, (n, m)| {
        network(o, n, scope, *m)
    });
    Ok(Resp::ok(o))
}

pub async fn net_list(r: &Req) -> Result<Resp, ApiError> {
    list(r, None, NetScope::Top).await
}

pub async fn dc_net_list(r: &Req) -> Result<Resp, ApiError> {
    let dc: DcId = r.id(0, "data center")?;
    r.cmds().app.dc(dc).await?;
    list(r, Some(dc), NetScope::Dc).await
}

async fn add(r: &Req, dc: Option<DcId>) -> Result<Resp, ApiError> {
    let b = r.body("network")?;
    let dc = match dc {
        Some(d) => d,
        None => {
            let e = b
                .get("data_center")
                .ok_or_else(|| bad("<network> needs a <data_center>"))?;
            dc_ref(r, e).await?
        }
    };
    let f = network_fields(&b)?;
    let n = r
        .cmds()
        .add_network(AddNetwork {
            name: required(&b, "name")?.to_string(),
            description: f.description.unwrap_or_default(),
            data_center: dc,
            mtu: f.mtu.flatten(),
            vlan: f.vlan.flatten(),
            vm_network: f.vm_network.unwrap_or(true),
        })
        .await?;
    Ok(Resp::created(
        one(r, |o| network(o, &n, NetScope::Top, false)),
        href("networks", n.id),
    ))
}

pub async fn net_add(r: &Req) -> Result<Resp, ApiError> {
    add(r, None).await
}

pub async fn dc_net_add(r: &Req) -> Result<Resp, ApiError> {
    let dc: DcId = r.id(0, "data center")?;
    r.cmds().app.dc(dc).await?;
    add(r, Some(dc)).await
}

/// The network at path parameter `i`, checked to belong to the data center at 0 when `in_dc`.
async fn scoped(r: &Req, in_dc: bool) -> Result<(LogicalNetwork, NetScope<'static>), ApiError> {
    if !in_dc {
        return Ok((net_by_id(r, 0).await?, NetScope::Top));
    }
    let dc: DcId = r.id(0, "data center")?;
    let n = net_by_id(r, 1).await?;
    if n.data_center_id != dc {
        return Err(ApiError::not_found(format!(
            "network {} not found in data center {dc}",
            n.id
        )));
    }
    Ok((n, NetScope::Dc))
}

pub async fn net_get(r: &Req, in_dc: bool) -> Result<Resp, ApiError> {
    let (n, scope) = scoped(r, in_dc).await?;
    let m = is_management(r, &n).await?;
    Ok(Resp::ok(one(r, |o| network(o, &n, scope, m))))
}

pub async fn net_update(r: &Req, in_dc: bool) -> Result<Resp, ApiError> {
    let (n, scope) = scoped(r, in_dc).await?;
    let b = r.body("network")?;
    let n = r.cmds().update_network(n.id, network_fields(&b)?).await?;
    let m = is_management(r, &n).await?;
    Ok(Resp::ok(one(r, |o| network(o, &n, scope, m))))
}

pub async fn net_remove(r: &Req, in_dc: bool) -> Result<Resp, ApiError> {
    let (n, _) = scoped(r, in_dc).await?;
    r.cmds().remove_network(n.id).await?;
    Ok(action_complete(r))
}

/// `/networks/{id}/vnicprofiles`: the network's one profile (none for a non-VM network).
pub async fn net_profiles(r: &Req) -> Result<Resp, ApiError> {
    let n = net_by_id(r, 0).await?;
    let items: Vec<&LogicalNetwork> = std::iter::once(&n).filter(|n| n.vm_network).collect();
    let mut o = r.out();
    collection(&mut o, "vnic_profiles", "vnic_profile", &items, |o, n| {
        vnic_profile(o, n)
    });
    Ok(Resp::ok(o))
}

// ------------------------------------------------------------------------------- vNIC profiles

pub async fn profile_list(r: &Req) -> Result<Resp, ApiError> {
    let nets: Vec<LogicalNetwork> = r
        .db()
        .network_list(None)
        .await?
        .into_iter()
        .filter(|n| n.vm_network)
        .collect();
    let mut o = r.out();
    collection(&mut o, "vnic_profiles", "vnic_profile", &nets, vnic_profile);
    Ok(Resp::ok(o))
}

pub async fn profile_get(r: &Req) -> Result<Resp, ApiError> {
    let id: VnicProfileId = r.id(0, "vNIC profile")?;
    let n = r
        .db()
        .network_get(network_of_profile(id))
        .await?
        .filter(|n| n.vm_network)
        .ok_or_else(|| ApiError::not_found(format!("vNIC profile {id} not found")))?;
    Ok(Resp::ok(one(r, |o| vnic_profile(o, &n))))
}

// ------------------------------------------------------------------------------- MAC pools

fn mac_pool(o: &mut Out, c: &Cluster, pool: &MacPool) {
    let h = format!("{API}/macpools/{}", c.id);
    o.open("mac_pool", Some(&c.id.to_string()), Some(&h));
    o.leaf("name", &c.name);
    o.leaf("description", format!("MAC addresses of cluster {}", c.name));
    o.leaf("allow_duplicates", false);
    o.leaf("default_pool", false);
    o.open("ranges", None, None);
    o.array_open("range");
    for r in &pool.state().ranges {
        o.open("range", None, None);
        o.leaf("from", r.start.to_string());
        o.leaf("to", r.end.to_string());
        o.close("range");
    }
    o.array_close();
    o.close("ranges");
    o.leaf("free", pool.free());
    o.close("mac_pool");
}

pub async fn mac_pool_list(r: &Req) -> Result<Resp, ApiError> {
    let mut pools = Vec::new();
    for c in r.db().cluster_list(&Default::default()).await? {
        let p = r.cmds().mac_pool(c.id).await?;
        pools.push((c, p));
    }
    let mut o = r.out();
    collection(&mut o, "mac_pools", "mac_pool", &pools, |o, (c, p)| {
        mac_pool(o, c, p)
    });
    Ok(Resp::ok(o))
}

pub async fn mac_pool_get(r: &Req) -> Result<Resp, ApiError> {
    let c = cluster_of(r).await?;
    let p = r.cmds().mac_pool(c.id).await?;
    Ok(Resp::ok(one(r, |o| mac_pool(o, &c, &p))))
}

/// `PUT /macpools/{id}`: `<ranges>` replaces the ranges; the name stays the cluster's.
pub async fn mac_pool_update(r: &Req) -> Result<Resp, ApiError> {
    let c = cluster_of(r).await?;
    let b = r.body("mac_pool")?;
    if b.str("name").is_some_and(|n| n != c.name) {
        return Err(bad(format!(
            "the MAC pool of cluster {} is named after its cluster: rename the cluster instead",
            c.name
        )));
    }
    if b.bool("allow_duplicates")? == Some(true) {
        return Err(bad(
            "MAC pools never allow duplicates: a MAC is unique across NICs",
        ));
    }
    let p = match b.get("ranges") {
        None => r.cmds().mac_pool(c.id).await?,
        Some(rs) => {
            let mut ranges = Vec::new();
            for e in rs.children_named("range") {
                let mac = |k: &str| -> Result<MacAddr, ApiError> {
                    let v = e.str(k).ok_or_else(|| {
                        bad(format!("a MAC pool <range> needs <from> and <to>: {k} missing"))
                    })?;
                    v.parse()
                        .map_err(|_| bad(format!("{v:?} in a MAC pool range is not a MAC address")))
                };
                ranges.push(MacRange::new(mac("from")?, mac("to")?));
            }
            r.cmds().set_mac_pool_ranges(c.id, ranges).await?
        }
    };
    Ok(Resp::ok(one(r, |o| mac_pool(o, &c, &p))))
}

// ------------------------------------------------------------------------------- cluster networks

async fn cluster_of(r: &Req) -> Result<Cluster, ApiError> {
    let id: ClusterId = r.id(0, "cluster")?;
    r.db()
        .cluster_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("cluster {id} not found")))
}

pub async fn cluster_net_list(r: &Req) -> Result<Resp, ApiError> {
    let cl = cluster_of(r).await?;
    let nets = r.cmds().cluster_networks(cl.id).await?;
    let mut o = r.out();
    collection(&mut o, "networks", "network", &nets, |o, (n, cn)| {
        network(o, n, NetScope::Cluster(cl.id, cn), cn.management)
    });
    Ok(Resp::ok(o))
}

async fn cluster_net_reply(r: &Req, cl: ClusterId, cn: &ClusterNetwork) -> Result<Out, ApiError> {
    let n = r.cmds().network(cn.network_id).await?;
    Ok(one(r, |o| {
        network(o, &n, NetScope::Cluster(cl, cn), cn.management)
    }))
}

pub async fn cluster_net_add(r: &Req) -> Result<Resp, ApiError> {
    let cl = cluster_of(r).await?;
    let b = r.body("network")?;
    let n = network_ref(r, &b, cl.data_center_id).await?;
    let required = b.bool("required")?.unwrap_or(true);
    let cn = r.cmds().attach_cluster_network(cl.id, n.id, required).await?;
    let o = cluster_net_reply(r, cl.id, &cn).await?;
    Ok(Resp::created(
        o,
        format!("{API}/clusters/{}/networks/{}", cl.id, n.id),
    ))
}

async fn cluster_net(r: &Req) -> Result<(Cluster, ClusterNetwork), ApiError> {
    let cl = cluster_of(r).await?;
    let id: NetworkId = r.id(1, "network")?;
    let cn = r
        .cmds()
        .cluster_networks(cl.id)
        .await?
        .into_iter()
        .map(|(_, cn)| cn)
        .find(|cn| cn.network_id == id)
        .ok_or_else(|| ApiError::not_found(format!("network {id} is not attached to cluster {}", cl.name)))?;
    Ok((cl, cn))
}

pub async fn cluster_net_get(r: &Req) -> Result<Resp, ApiError> {
    let (cl, cn) = cluster_net(r).await?;
    Ok(Resp::ok(cluster_net_reply(r, cl.id, &cn).await?))
}

pub async fn cluster_net_update(r: &Req) -> Result<Resp, ApiError> {
    let (cl, cn) = cluster_net(r).await?;
    let b = r.body("network")?;
    let required = b.bool("required")?.unwrap_or(cn.required);
    let cn = r
        .cmds()
        .attach_cluster_network(cl.id, cn.network_id, required)
        .await?;
    Ok(Resp::ok(cluster_net_reply(r, cl.id, &cn).await?))
}

pub async fn cluster_net_remove(r: &Req) -> Result<Resp, ApiError> {
    let (cl, cn) = cluster_net(r).await?;
    r.cmds().detach_cluster_network(cl.id, cn.network_id).await?;
    Ok(action_complete(r))
}

// ------------------------------------------------------------------------------- hosts

async fn host_of(r: &Req) -> Result<Host, ApiError> {
    let id: HostUuid = r.id(0, "host")?;
    r.db()
        .host_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("host {id} not found")))
}

async fn dc_networks(r: &Req, h: &Host) -> Result<(DcId, Vec<LogicalNetwork>), ApiError> {
    let dc = r.cmds().app.host_dc(h).await?.id;
    Ok((dc, r.db().network_list(Some(dc)).await?))
}

/// The host's NICs and bonds (name, capabilities entry, is a bond), with the network each
/// carries per the engine's attachments.
async fn host_nics(
    r: &Req,
    h: &Host,
) -> Result<Vec<(String, Value, bool, Option<LogicalNetwork>)>, ApiError> {
    let caps = r.cmds().host_network_capabilities(h.id).await?;
    let (_, nets) = dc_networks(r, h).await?;
    let atts = r.db().host_attachments(h.id).await?;
    let on = |name: &str| {
        atts.iter()
            .find(|a| a.attachment.nic == name)
            .and_then(|a| nets.iter().find(|n| n.id == a.network_id).cloned())
    };
    let mut out = Vec::new();
    for (section, bond) in [("nics", false), ("bonds", true)] {
        for (name, c) in caps[section].as_object().into_iter().flatten() {
            out.push((name.clone(), c.clone(), bond, on(name)));
        }
    }
    Ok(out)
}

pub async fn host_nic_list(r: &Req) -> Result<Resp, ApiError> {
    let h = host_of(r).await?;
    let nics = host_nics(r, &h).await?;
    let mut o = r.out();
    collection(&mut o, "host_nics", "host_nic", &nics, |o, (name, c, bond, n)| {
        host_nic(o, h.id, name, c, n.as_ref(), *bond)
    });
    Ok(Resp::ok(o))
}

pub async fn host_nic_get(r: &Req) -> Result<Resp, ApiError> {
    let h = host_of(r).await?;
    let want = r.param(1).to_string();
    let (name, c, bond, n) = host_nics(r, &h)
        .await?
        .into_iter()
        .find(|(name, ..)| *name == want)
        .ok_or_else(|| ApiError::not_found(format!("NIC {want} of host {} not found", h.name)))?;
    Ok(Resp::ok(one(r, |o| {
        host_nic(o, h.id, &name, &c, n.as_ref(), bond)
    })))
}

/// A `<network_attachment>` of a request: the network and how the host carries it.
async fn attachment_in(
    r: &Req,
    e: &Elem,
    dc: DcId,
    existing: Option<&NetworkAttachment>,
) -> Result<(NetworkId, HostAttachment), ApiError> {
    let network = match (e.get("network"), existing) {
        (Some(n), _) => network_ref(r, n, dc).await?.id,
        (None, Some(a)) => a.network_id,
        (None, None) => return Err(bad("<network_attachment> needs a <network>")),
    };
    let nic = match (e.get("host_nic"), existing) {
        (Some(n), _) => n
            .str("name")
            .or_else(|| n.id())
            .ok_or_else(|| bad("<host_nic> needs a <name>"))?
            .to_string(),
        (None, Some(a)) => a.attachment.nic.clone(),
        (None, None) => return Err(bad("<network_attachment> needs a <host_nic>")),
    };
    let assignment = e.get("ip_address_assignments/ip_address_assignment");
    let ip = match assignment {
        None => existing.map(|a| a.attachment.ip.clone()).unwrap_or(HostIp::None),
        Some(a) => match a.str("assignment_method").unwrap_or("none") {
            "none" => HostIp::None,
            "dhcp" => HostIp::Dhcp,
            "static" => {
                let address: Ipv4Addr = a
                    .str("ip/address")
                    .ok_or_else(|| bad("a static <ip> needs an <address>"))?
                    .parse()
                    .map_err(|_| bad("<ip><address> is not an IPv4 address"))?;
                let mask = a
                    .str("ip/netmask")
                    .ok_or_else(|| bad("a static <ip> needs a <netmask>"))?;
                let prefix = match mask.parse::<u8>() {
                    Ok(p) if p <= 32 => p,
                    Ok(p) => return Err(bad(format!("prefix length {p} is over 32"))),
                    Err(_) => {
                        let m: Ipv4Addr = mask.parse().map_err(|_| {
                            bad(format!(
                                "<netmask> {mask:?} is neither a netmask nor a prefix length"
                            ))
                        })?;
                        let bits = u32::from(m);
                        if bits.leading_ones() + bits.trailing_zeros() != 32 {
                            return Err(bad(format!("<netmask> {mask} is not contiguous")));
                        }
                        bits.leading_ones() as u8
                    }
                };
                let gateway = match a.str("ip/gateway") {
                    None => None,
                    Some(g) => Some(
                        g.parse()
                            .map_err(|_| bad("<ip><gateway> is not an IPv4 address"))?,
                    ),
                };
                HostIp::Static {
                    address,
                    prefix,
                    gateway,
                }
            }
            other => {
                return Err(bad(format!(
                    "<assignment_method> {other:?} is not none, dhcp or static"
                )))
            }
        },
    };
    let default_route = e
        .bool("default_route")?
        .unwrap_or(existing.is_some_and(|a| a.attachment.default_route));
    Ok((
        network,
        HostAttachment {
            nic,
            ip,
            default_route,
        },
    ))
}

async fn attachments_reply(
    r: &Req,
    h: &Host,
    atts: &[NetworkAttachment],
) -> Result<Vec<(NetworkAttachment, bool)>, ApiError> {
    let have = r.db().host_reported_networks(h.id).await?;
    Ok(atts
        .iter()
        .map(|a| (a.clone(), have.contains(&a.network)))
        .collect())
}

pub async fn host_att_list(r: &Req) -> Result<Resp, ApiError> {
    let h = host_of(r).await?;
    let atts = r.db().host_attachments(h.id).await?;
    let items = attachments_reply(r, &h, &atts).await?;
    let mut o = r.out();
    collection(
        &mut o,
        "network_attachments",
        "network_attachment",
        &items,
        |o, (a, s)| attachment(o, a, *s),
    );
    Ok(Resp::ok(o))
}

async fn host_att(r: &Req) -> Result<(Host, NetworkAttachment), ApiError> {
    let h = host_of(r).await?;
    let id: NetworkAttachmentId = r.id(1, "network attachment")?;
    let a = r
        .db()
        .host_attachments(h.id)
        .await?
        .into_iter()
        .find(|a| a.id == id)
        .ok_or_else(|| {
            ApiError::not_found(format!("network attachment {id} of host {} not found", h.name))
        })?;
    Ok((h, a))
}

async fn one_att(r: &Req, h: &Host, network: NetworkId) -> Result<Out, ApiError> {
    let atts = r.db().host_attachments(h.id).await?;
    let a = atts
        .iter()
        .find(|a| a.network_id == network)
        .ok_or_else(|| ApiError::internal(format!("the attachment of network {network} was not recorded")))?;
    let in_sync = r.db().host_reported_networks(h.id).await?.contains(&a.network);
    Ok(one(r, |o| attachment(o, a, in_sync)))
}

pub async fn host_att_get(r: &Req) -> Result<Resp, ApiError> {
    let (h, a) = host_att(r).await?;
    let in_sync = r.db().host_reported_networks(h.id).await?.contains(&a.network);
    Ok(Resp::ok(one(r, |o| attachment(o, &a, in_sync))))
}

pub async fn host_att_add(r: &Req) -> Result<Resp, ApiError> {
    let h = host_of(r).await?;
    let b = r.body("network_attachment")?;
    let (dc, _) = dc_networks(r, &h).await?;
    let (net, att) = attachment_in(r, &b, dc, None).await?;
    let req = SetupHostNetworks {
        attach: vec![(net, att)],
        ..Default::default()
    };
    r.cmds()
        .setup_host_networks(h.id, req, r.correlation_id.clone())
        .await?;
    let o = one_att(r, &h, net).await?;
    let id = r
        .db()
        .host_attachments(h.id)
        .await?
        .into_iter()
        .find(|a| a.network_id == net)
        .map(|a| a.id.to_string())
        .unwrap_or_default();
    Ok(Resp::created(
        o,
        format!("{API}/hosts/{}/networkattachments/{id}", h.id),
    ))
}

pub async fn host_att_update(r: &Req) -> Result<Resp, ApiError> {
    let (h, a) = host_att(r).await?;
    let b = r.body("network_attachment")?;
    let (dc, _) = dc_networks(r, &h).await?;
    let (net, att) = attachment_in(r, &b, dc, Some(&a)).await?;
    if net != a.network_id {
        return Err(bad(
            "an attachment keeps its network: remove it and attach the other network",
        ));
    }
    let req = SetupHostNetworks {
        attach: vec![(net, att)],
        ..Default::default()
    };
    r.cmds()
        .setup_host_networks(h.id, req, r.correlation_id.clone())
        .await?;
    Ok(Resp::ok(one_att(r, &h, net).await?))
}

pub async fn host_att_remove(r: &Req) -> Result<Resp, ApiError> {
    let (h, a) = host_att(r).await?;
    let req = SetupHostNetworks {
        detach: vec![a.network_id],
        ..Default::default()
    };
    r.cmds()
        .setup_host_networks(h.id, req, r.correlation_id.clone())
        .await?;
    Ok(action_complete(r))
}

/// `POST /hosts/{id}/setupnetworks`: `modified_network_attachments`,
/// `removed_network_attachments` (by id or network), `modified_bonds` (`host_nic`s with
/// `bonding`), `removed_bonds`, `check_connectivity`, `connectivity_timeout`.
pub async fn host_setup_networks(r: &Req) -> Result<Resp, ApiError> {
    let h = host_of(r).await?;
    let body = r.action_body()?;
    let (dc, _) = dc_networks(r, &h).await?;
    let current = r.db().host_attachments(h.id).await?;
    let by_id = |e: &Elem| -> Result<Option<NetworkAttachment>, ApiError> {
        match e.id() {
            None => Ok(None),
            Some(id) => {
                let id: NetworkAttachmentId = parse_id(id, "network attachment")?;
                current
                    .iter()
                    .find(|a| a.id == id)
                    .cloned()
                    .map(Some)
                    .ok_or_else(|| {
                        ApiError::not_found(format!("network attachment {id} of host {} not found", h.name))
                    })
            }
        }
    };
    let mut req = SetupHostNetworks {
        check_connectivity: body.bool("check_connectivity")?.unwrap_or(true),
        connectivity_timeout: body.u64("connectivity_timeout")?,
        ..Default::default()
    };
    if let Some(m) = body.get("modified_network_attachments") {
        for e in m.children_named("network_attachment") {
            let existing = by_id(e)?;
            req.attach.push(attachment_in(r, e, dc, existing.as_ref()).await?);
        }
    }
    if let Some(m) = body.get("removed_network_attachments") {
        for e in m.children_named("network_attachment") {
            let net = match (by_id(e)?, e.get("network")) {
                (Some(a), _) => a.network_id,
                (None, Some(n)) => network_ref(r, n, dc).await?.id,
                (None, None) => return Err(bad("a removed <network_attachment> needs an id or a <network>")),
            };
            req.detach.push(net);
        }
    }
    if let Some(m) = body.get("modified_bonds") {
        for e in m.children_named("host_nic") {
            req.bonds.push(bond_in(e)?);
        }
    }
    if let Some(m) = body.get("removed_bonds") {
        for e in m.children_named("host_nic") {
            req.removed_bonds.push(nic_name(e, "a removed bond")?);
        }
    }
    let corr = r.correlation_id.clone();
    let host = h.id;
    run_action(r, Some(&body), "setupnetworks", move |e| async move {
        e.cmds.setup_host_networks(host, req, corr).await?;
        Ok(())
    })
    .await
}

/// A host NIC named by `<name>` or by its id (host NIC ids are their names).
fn nic_name(e: &Elem, what: &str) -> Result<String, ApiError> {
    e.string("name")
        .or_else(|| e.id().map(str::to_string))
        .ok_or_else(|| bad(format!("{what} <host_nic> needs a <name> or an id")))
}

/// A `<host_nic>` of `modified_bonds`: its name, `bonding/slaves`, and `bonding/options` as
/// name/value pairs (VDSM's option string).
fn bond_in(e: &Elem) -> Result<HostBond, ApiError> {
    let name = nic_name(e, "a bond")?;
    let bonding = e
        .get("bonding")
        .ok_or_else(|| bad(format!("bond {name} needs <bonding> with its <slaves>")))?;
    let slaves = match bonding.get("slaves") {
        Some(s) => s
            .children_named("host_nic")
            .map(|n| nic_name(n, "a slave"))
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let mut options = Vec::new();
    if let Some(o) = bonding.get("options") {
        for opt in o.children_named("option") {
            match (opt.str("name"), opt.str("value")) {
                (Some(k), Some(v)) => options.push(format!("{k}={v}")),
                _ => {
                    return Err(bad(format!(
                        "bond {name}: an <option> needs a <name> and a <value>"
                    )))
                }
            }
        }
    }
    Ok(HostBond {
        name,
        slaves,
        options: options.join(" "),
    })
}

// ------------------------------------------------------------------------------- VM NICs

async fn vm_of(r: &Req) -> Result<(Vm, DcId), ApiError> {
    let id: VmId = r.id(0, "VM")?;
    let v = r
        .db()
        .vm_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("VM {id} not found")))?;
    let dc = r
        .db()
        .cluster_get(v.cluster_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("cluster {} not found", v.cluster_id)))?
        .data_center_id;
    Ok((v, dc))
}

async fn profiles(r: &Req, dc: DcId) -> Result<BTreeMap<String, VnicProfileId>, ApiError> {
    Ok(r.db()
        .network_list(Some(dc))
        .await?
        .into_iter()
        .map(|n| (n.name.clone(), vnic_profile_of(n.id)))
        .collect())
}

/// The network a NIC body names: `<vnic_profile id>` (empty: no network) or, as oVirt's v3
/// did, `<network><name>`. `None`: the body names none.
async fn nic_network(r: &Req, b: &Elem, dc: DcId) -> Result<Option<Option<String>>, ApiError> {
    if let Some(p) = b.get("vnic_profile") {
        let Some(id) = p.id() else {
            return Ok(Some(None));
        };
        let id: VnicProfileId = parse_id(id, "vNIC profile")?;
        let n = r
            .db()
            .network_get(network_of_profile(id))
            .await?
            .filter(|n| n.data_center_id == dc && n.vm_network)
            .ok_or_else(|| {
                ApiError::not_found(format!("vNIC profile {id} not found in the VM's data center"))
            })?;
        return Ok(Some(Some(n.name)));
    }
    if let Some(n) = b.get("network") {
        return Ok(Some(Some(network_ref(r, n, dc).await?.name)));
    }
    Ok(None)
}

fn mac_in(b: &Elem) -> Result<Option<MacAddr>, ApiError> {
    b.str("mac/address")
        .map(|m| m.parse::<MacAddr>().map_err(|e| bad(e.to_string())))
        .transpose()
}

pub async fn vm_nic_list(r: &Req) -> Result<Resp, ApiError> {
    let (v, dc) = vm_of(r).await?;
    let ns = r.db().nics_of_vm(v.id).await?;
    let p = profiles(r, dc).await?;
    let mut o = r.out();
    collection(&mut o, "nics", "nic", &ns, |o, n| nic(o, n, &p));
    Ok(Resp::ok(o))
}

/// A template's NICs, and the vNIC profiles of its data center (none for Blank).
async fn template_nics(r: &Req) -> Result<(Vec<TemplateNic>, BTreeMap<String, VnicProfileId>), ApiError> {
    let id: TemplateId = r.id(0, "template")?;
    let t = r
        .db()
        .template_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("template {id} not found")))?;
    let p = match t.cluster_id {
        Some(cl) => match r.db().cluster_get(cl).await? {
            Some(c) => profiles(r, c.data_center_id).await?,
            None => BTreeMap::new(),
        },
        None => BTreeMap::new(),
    };
    Ok((r.db().nics_of_template(id).await?, p))
}

pub async fn template_nic_list(r: &Req) -> Result<Resp, ApiError> {
    let (ns, p) = template_nics(r).await?;
    let mut o = r.out();
    collection(&mut o, "nics", "nic", &ns, |o, n| template_nic(o, n, &p));
    Ok(Resp::ok(o))
}

pub async fn template_nic_get(r: &Req) -> Result<Resp, ApiError> {
    let (ns, p) = template_nics(r).await?;
    let id: NicId = r.id(1, "NIC")?;
    let n = ns
        .into_iter()
        .find(|n| n.id == id)
        .ok_or_else(|| ApiError::not_found(format!("NIC {id} of the template not found")))?;
    Ok(Resp::ok(one(r, |o| template_nic(o, &n, &p))))
}

async fn vm_nic(r: &Req) -> Result<(Vm, DcId, Nic), ApiError> {
    let (v, dc) = vm_of(r).await?;
    let id: NicId = r.id(1, "NIC")?;
    let n = r
        .db()
        .nic_get(id)
        .await?
        .filter(|n| n.vm_id == v.id)
        .ok_or_else(|| ApiError::not_found(format!("NIC {id} of VM {} not found", v.name)))?;
    Ok((v, dc, n))
}

pub async fn vm_nic_get(r: &Req) -> Result<Resp, ApiError> {
    let (_, dc, n) = vm_nic(r).await?;
    let p = profiles(r, dc).await?;
    Ok(Resp::ok(one(r, |o| nic(o, &n, &p))))
}

pub async fn vm_nic_add(r: &Req) -> Result<Resp, ApiError> {
    let (v, dc) = vm_of(r).await?;
    let b = r.body("nic")?;
    let req = AddNic {
        name: required(&b, "name")?.to_string(),
        network: nic_network(r, &b, dc).await?.flatten(),
        mac: mac_in(&b)?,
        interface: b.parse("interface")?.unwrap_or(NicInterface::Virtio),
        plugged: b.bool("plugged")?.unwrap_or(true),
        linked: b.bool("linked")?.unwrap_or(true),
    };
    let n = r.cmds().add_nic(v.id, req).await?;
    let p = profiles(r, dc).await?;
    Ok(Resp::created(
        one(r, |o| nic(o, &n, &p)),
        format!("{API}/vms/{}/nics/{}", v.id, n.id),
    ))
}

pub async fn vm_nic_update(r: &Req) -> Result<Resp, ApiError> {
    let (v, dc, n) = vm_nic(r).await?;
    let b = r.body("nic")?;
    let req = UpdateNic {
        name: b.string("name"),
        network: nic_network(r, &b, dc).await?,
        mac: mac_in(&b)?,
        interface: b.parse("interface")?,
        plugged: b.bool("plugged")?,
        linked: b.bool("linked")?,
    };
    let n = r.cmds().update_nic(v.id, n.id, req).await?;
    let p = profiles(r, dc).await?;
    Ok(Resp::ok(one(r, |o| nic(o, &n, &p))))
}

pub async fn vm_nic_remove(r: &Req) -> Result<Resp, ApiError> {
    let (v, _, n) = vm_nic(r).await?;
    r.cmds().remove_nic(v.id, n.id).await?;
    Ok(action_complete(r))
}

/// `POST /vms/{id}/nics/{nic}/activate|deactivate`: plug or unplug.
pub async fn vm_nic_plug(r: &Req, plugged: bool) -> Result<Resp, ApiError> {
    let (v, _, n) = vm_nic(r).await?;
    let body = r.action_body()?;
    let (vm, nic) = (v.id, n.id);
    run_action(r, Some(&body), "nic plug", move |e| async move {
        e.cmds
            .update_nic(
                vm,
                nic,
                UpdateNic {
                    plugged: Some(plugged),
                    ..Default::default()
                },
            )
            .await?;
        Ok(())
    })
    .await
}
