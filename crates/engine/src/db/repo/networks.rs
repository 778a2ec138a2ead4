//! Logical networks, their cluster attachments, host network attachments, the networks hosts
//! report, and MAC address pools (allocation with the NIC row in one transaction).

use std::collections::{BTreeMap, BTreeSet};

use sqlx::any::AnyRow;

use super::missing_or_conflict;
use crate::db::sql::{b2i, Arg, RowExt, Sql};
use crate::db::{Conn, DbError};
use crate::model::*;
use crate::network::{
    ClusterNetwork, HostAttachment, HostIp, LogicalNetwork, MacPool, MacPoolState, MacRange,
    NetworkAttachment, NetworkError, NetworkId,
};

// ---------------------------------------------------------------- networks

const NET_COLS: &str =
    "id, name, description, data_center_id, mtu, vlan_id, vm_network, created_at, revision";

fn net_from_row(r: &AnyRow) -> Result<LogicalNetwork, DbError> {
    let small = |col: &str, v: Option<i64>| -> Result<Option<i64>, DbError> {
        match v {
            Some(x) if !(0..=65535).contains(&x) => Err(DbError::Corrupt {
                column: col.into(),
                detail: format!("{x} is out of range"),
            }),
            v => Ok(v),
        }
    };
    Ok(LogicalNetwork {
        id: r.parse("id")?,
        name: r.text("name")?,
        data_center_id: r.parse("data_center_id")?,
        description: r.text("description")?,
        mtu: small("mtu", r.opt_int("mtu")?)?.map(|v| v as u32),
        vlan: small("vlan_id", r.opt_int("vlan_id")?)?.map(|v| v as u16),
        vm_network: r.flag("vm_network")?,
        created_at: r.ts("created_at")?,
        revision: r.int("revision")?,
    })
}

async fn network_insert(c: &mut Conn<'_>, n: &LogicalNetwork) -> Result<LogicalNetwork, DbError> {
    let mut q = Sql::new(&format!("INSERT INTO networks ({NET_COLS}) VALUES ("));
    q.arg(n.id.to_string())
        .push(", ")
        .arg(n.name.as_str())
        .push(", ")
        .arg(n.description.as_str())
        .push(", ")
        .arg(n.data_center_id.to_string())
        .push(", ")
        .arg(Arg::Int(n.mtu.map(i64::from)))
        .push(", ")
        .arg(Arg::Int(n.vlan.map(i64::from)))
        .push(", ")
        .arg(b2i(n.vm_network))
        .push(", ")
        .arg(c.now.as_millis())
        .push(", 1)");
    c.exec_as(&q, "network", &n.name).await?;
    network_get(c, n.id)
        .await?
        .ok_or_else(|| DbError::not_found("network", n.id))
}

async fn network_get(c: &mut Conn<'_>, id: NetworkId) -> Result<Option<LogicalNetwork>, DbError> {
    let mut q = Sql::new(&format!("SELECT {NET_COLS} FROM networks WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(net_from_row).transpose()
}

async fn network_get_by_name(
    c: &mut Conn<'_>,
    dc: DcId,
    name: &str,
) -> Result<Option<LogicalNetwork>, DbError> {
    let mut q = Sql::new(&format!(
        "SELECT {NET_COLS} FROM networks WHERE data_center_id = "
    ));
    q.arg(dc.to_string()).push(" AND name = ").arg(name);
    c.opt(&q).await?.as_ref().map(net_from_row).transpose()
}

/// Every network (`dc: None`) or a data center's, by name.
async fn network_list(c: &mut Conn<'_>, dc: Option<DcId>) -> Result<Vec<LogicalNetwork>, DbError> {
    let mut q = Sql::new(&format!("SELECT {NET_COLS} FROM networks"));
    if let Some(dc) = dc {
        q.push(" WHERE data_center_id = ").arg(dc.to_string());
    }
    q.push(" ORDER BY name, id");
    c.all(&q).await?.iter().map(net_from_row).collect()
}

/// Writes the definition if `n.revision` is still current.
async fn network_update(c: &mut Conn<'_>, n: &LogicalNetwork) -> Result<LogicalNetwork, DbError> {
    let mut q = Sql::new("UPDATE networks SET name = ");
    q.arg(n.name.as_str())
        .push(", description = ")
        .arg(n.description.as_str())
        .push(", mtu = ")
        .arg(Arg::Int(n.mtu.map(i64::from)))
        .push(", vlan_id = ")
        .arg(Arg::Int(n.vlan.map(i64::from)))
        .push(", vm_network = ")
        .arg(b2i(n.vm_network))
        .push(", revision = revision + 1 WHERE id = ")
        .arg(n.id.to_string())
        .push(" AND revision = ")
        .arg(n.revision);
    if c.exec_as(&q, "network", &n.name).await? == 0 {
        let id = n.id.to_string();
        return Err(missing_or_conflict(c, "networks", "network", &id, || {
            format!("revision {} is stale", n.revision)
        })
        .await);
    }
    network_get(c, n.id)
        .await?
        .ok_or_else(|| DbError::not_found("network", n.id))
}

async fn network_delete(c: &mut Conn<'_>, id: NetworkId) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM networks WHERE id = ");
    q.arg(id.to_string());
    Ok(c.delete_as(&q, "network", id).await? == 1)
}

/// The VM and template NICs of the network's data center that name it.
async fn network_nic_count(c: &mut Conn<'_>, n: &LogicalNetwork) -> Result<u64, DbError> {
    let mut total = 0;
    for (nics, owners, owner) in [
        ("nics", "vms", "vm_id"),
        ("template_nics", "templates", "template_id"),
    ] {
        let mut q = Sql::new(&format!(
            "SELECT COUNT(*) AS n FROM {nics} JOIN {owners} ON {owners}.id = {nics}.{owner} \
             JOIN clusters ON clusters.id = {owners}.cluster_id WHERE clusters.data_center_id = "
        ));
        q.arg(n.data_center_id.to_string())
            .push(&format!(" AND {nics}.network = "))
            .arg(n.name.as_str());
        total += c.count(&q).await?;
    }
    Ok(total)
}

// ---------------------------------------------------------------- cluster networks

fn cn_from_row(r: &AnyRow) -> Result<ClusterNetwork, DbError> {
    Ok(ClusterNetwork {
        network_id: r.parse("network_id")?,
        name: r.text("name")?,
        required: r.flag("required")?,
        management: r.flag("management")?,
    })
}

const CN_SELECT: &str = "SELECT cn.cluster_id AS cluster_id, cn.network_id AS network_id, n.name AS name, \
    cn.required AS required, cn.management AS management FROM cluster_networks cn \
    JOIN networks n ON n.id = cn.network_id";

/// Attaches (or re-attaches with new flags) a network to a cluster. A new management network
/// takes the role from the previous one.
async fn cluster_network_set(
    c: &mut Conn<'_>,
    cluster: ClusterId,
    network: NetworkId,
    required: bool,
    management: bool,
) -> Result<(), DbError> {
    if management {
        let mut q = Sql::new("UPDATE cluster_networks SET management = 0 WHERE cluster_id = ");
        q.arg(cluster.to_string())
            .push(" AND network_id <> ")
            .arg(network.to_string());
        c.exec(&q).await?;
    }
    let mut q = Sql::new("DELETE FROM cluster_networks WHERE cluster_id = ");
    q.arg(cluster.to_string())
        .push(" AND network_id = ")
        .arg(network.to_string());
    c.exec(&q).await?;
    let mut q =
        Sql::new("INSERT INTO cluster_networks (cluster_id, network_id, required, management) VALUES (");
    q.arg(cluster.to_string())
        .push(", ")
        .arg(network.to_string())
        .push(", ")
        .arg(b2i(required || management))
        .push(", ")
        .arg(b2i(management))
        .push(")");
    c.exec_as(&q, "cluster network", format!("{network} in cluster {cluster}"))
        .await?;
    Ok(())
}

async fn cluster_network_remove(
    c: &mut Conn<'_>,
    cluster: ClusterId,
    network: NetworkId,
) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM cluster_networks WHERE cluster_id = ");
    q.arg(cluster.to_string())
        .push(" AND network_id = ")
        .arg(network.to_string());
    Ok(c.exec(&q).await? == 1)
}

async fn cluster_networks(c: &mut Conn<'_>, cluster: ClusterId) -> Result<Vec<ClusterNetwork>, DbError> {
    let mut q = Sql::new(CN_SELECT);
    q.push(" WHERE cn.cluster_id = ")
        .arg(cluster.to_string())
        .push(" ORDER BY n.name");
    c.all(&q).await?.iter().map(cn_from_row).collect()
}

/// The clusters a network is attached to, with the attachment.
async fn network_clusters(
    c: &mut Conn<'_>,
    network: NetworkId,
) -> Result<Vec<(ClusterId, ClusterNetwork)>, DbError> {
    let mut q = Sql::new(CN_SELECT);
    q.push(" WHERE cn.network_id = ")
        .arg(network.to_string())
        .push(" ORDER BY cn.cluster_id");
    c.all(&q)
        .await?
        .iter()
        .map(|r| Ok((r.parse("cluster_id")?, cn_from_row(r)?)))
        .collect()
}

// ---------------------------------------------------------------- host attachments

const ATT_SELECT: &str =
    "SELECT a.id AS id, a.host_id AS host_id, a.network_id AS network_id, n.name AS name, \
    a.nic AS nic, a.boot_protocol AS boot_protocol, a.address AS address, a.prefix AS prefix, \
    a.gateway AS gateway, a.default_route AS default_route \
    FROM host_network_attachments a JOIN networks n ON n.id = a.network_id";

fn att_from_row(r: &AnyRow) -> Result<NetworkAttachment, DbError> {
    let corrupt = |col: &str, d: String| DbError::Corrupt {
        column: col.into(),
        detail: d,
    };
    let ip = match r.str_ref("boot_protocol")? {
        "none" => HostIp::None,
        "dhcp" => HostIp::Dhcp,
        "static" => HostIp::Static {
            address: r.parse("address")?,
            prefix: u8::try_from(r.int("prefix")?).map_err(|e| corrupt("prefix", e.to_string()))?,
            gateway: r.opt_parse("gateway")?,
        },
        other => return Err(corrupt("boot_protocol", format!("unknown {other:?}"))),
    };
    Ok(NetworkAttachment {
        id: r.parse("id")?,
        host_id: r.parse("host_id")?,
        network_id: r.parse("network_id")?,
        network: r.text("name")?,
        attachment: HostAttachment {
            nic: r.text("nic")?,
            ip,
            default_route: r.flag("default_route")?,
        },
    })
}

async fn host_attachments(c: &mut Conn<'_>, host: HostUuid) -> Result<Vec<NetworkAttachment>, DbError> {
    let mut q = Sql::new(ATT_SELECT);
    q.push(" WHERE a.host_id = ")
        .arg(host.to_string())
        .push(" ORDER BY n.name");
    c.all(&q).await?.iter().map(att_from_row).collect()
}

async fn network_attachment_count(c: &mut Conn<'_>, network: NetworkId) -> Result<u64, DbError> {
    let mut q = Sql::new("SELECT COUNT(*) AS n FROM host_network_attachments WHERE network_id = ");
    q.arg(network.to_string());
    c.count(&q).await
}

/// Records a confirmed `setupNetworks`: `set` are written (replacing the host's attachment of
/// the same network), `removed` networks' attachments deleted, together.
async fn host_attachments_apply(
    c: &mut Conn<'_>,
    host: HostUuid,
    set: &[NetworkAttachment],
    removed: &[NetworkId],
) -> Result<(), DbError> {
    for n in removed.iter().chain(set.iter().map(|a| &a.network_id)) {
        let mut q = Sql::new("DELETE FROM host_network_attachments WHERE host_id = ");
        q.arg(host.to_string())
            .push(" AND network_id = ")
            .arg(n.to_string());
        c.exec(&q).await?;
    }
    for a in set {
        let (proto, address, prefix, gateway) = match &a.attachment.ip {
            HostIp::None => ("none", None, None, None),
            HostIp::Dhcp => ("dhcp", None, None, None),
            HostIp::Static {
                address,
                prefix,
                gateway,
            } => (
                "static",
                Some(address.to_string()),
                Some(i64::from(*prefix)),
                gateway.map(|g| g.to_string()),
            ),
        };
        let mut q = Sql::new(
            "INSERT INTO host_network_attachments (id, host_id, network_id, nic, boot_protocol, address, prefix, gateway, default_route) VALUES (",
        );
        q.arg(a.id.to_string())
            .push(", ")
            .arg(host.to_string())
            .push(", ")
            .arg(a.network_id.to_string())
            .push(", ")
            .arg(a.attachment.nic.as_str())
            .push(", ")
            .arg(proto)
            .push(", ")
            .arg(Arg::Text(address))
            .push(", ")
            .arg(Arg::Int(prefix))
            .push(", ")
            .arg(Arg::Text(gateway))
            .push(", ")
            .arg(b2i(a.attachment.default_route))
            .push(")");
        c.exec_as(&q, "network attachment", format!("{} on host {host}", a.network))
            .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- reported networks

async fn host_reported_networks(c: &mut Conn<'_>, host: HostUuid) -> Result<BTreeSet<String>, DbError> {
    let mut q = Sql::new("SELECT name FROM host_reported_networks WHERE host_id = ");
    q.arg(host.to_string());
    c.all(&q).await?.iter().map(|r| r.text("name")).collect()
}

/// Replaces what `host` reports; whether it changed.
async fn host_reported_networks_set(
    c: &mut Conn<'_>,
    host: HostUuid,
    names: &BTreeSet<String>,
) -> Result<bool, DbError> {
    if host_reported_networks(c, host).await? == *names {
        return Ok(false);
    }
    let mut q = Sql::new("DELETE FROM host_reported_networks WHERE host_id = ");
    q.arg(host.to_string());
    c.exec(&q).await?;
    for n in names {
        let mut q = Sql::new("INSERT INTO host_reported_networks (host_id, name) VALUES (");
        q.arg(host.to_string()).push(", ").arg(n.as_str()).push(")");
        c.exec_as(&q, "reported network", n).await?;
    }
    Ok(true)
}

/// What the hosts of a cluster report, by host.
async fn cluster_reported_networks(
    c: &mut Conn<'_>,
    cluster: ClusterId,
) -> Result<BTreeMap<HostUuid, BTreeSet<String>>, DbError> {
    let mut q = Sql::new(
        "SELECT r.host_id AS host_id, r.name AS name FROM host_reported_networks r \
         JOIN hosts h ON h.id = r.host_id WHERE h.cluster_id = ",
    );
    q.arg(cluster.to_string());
    let mut out: BTreeMap<HostUuid, BTreeSet<String>> = BTreeMap::new();
    for r in c.all(&q).await? {
        out.entry(r.parse("host_id")?)
            .or_default()
            .insert(r.text("name")?);
    }
    Ok(out)
}

/// The networks the plugged NICs of a cluster's VMs use, by VM.
async fn cluster_vm_networks(
    c: &mut Conn<'_>,
    cluster: ClusterId,
) -> Result<BTreeMap<VmId, BTreeSet<String>>, DbError> {
    let mut q = Sql::new(
        "SELECT nics.vm_id AS vm_id, nics.network AS network FROM nics JOIN vms ON vms.id = nics.vm_id \
         WHERE nics.plugged = 1 AND nics.network IS NOT NULL AND vms.cluster_id = ",
    );
    q.arg(cluster.to_string());
    let mut out: BTreeMap<VmId, BTreeSet<String>> = BTreeMap::new();
    for r in c.all(&q).await? {
        out.entry(r.parse("vm_id")?)
            .or_default()
            .insert(r.text("network")?);
    }
    Ok(out)
}

// ---------------------------------------------------------------- MAC pools

fn pool_err(e: NetworkError) -> DbError {
    match e {
        NetworkError::Exhausted { .. } => DbError::Exhausted {
            what: "MAC address in the cluster's pool",
        },
        NetworkError::InUse(m) => DbError::AlreadyExists {
            kind: "MAC address",
            key: m.to_string(),
        },
        other => DbError::Invalid {
            what: "MAC address",
            detail: other.to_string(),
        },
    }
}

/// The cluster's pool ranges and cursor (oVirt's default range when none was set).
async fn mac_pool_load(
    c: &mut Conn<'_>,
    cluster: ClusterId,
) -> Result<(Vec<MacRange>, Option<MacAddr>), DbError> {
    let mut q = Sql::new("SELECT ranges, cursor FROM cluster_mac_pools WHERE cluster_id = ");
    q.arg(cluster.to_string());
    match c.opt(&q).await? {
        None => Ok((vec![MacRange::ovirt_default()], None)),
        Some(r) => {
            let ranges = serde_json::from_str(r.str_ref("ranges")?).map_err(|e| DbError::Corrupt {
                column: "ranges".into(),
                detail: e.to_string(),
            })?;
            Ok((ranges, r.opt_parse("cursor")?))
        }
    }
}

async fn mac_pool_store(
    c: &mut Conn<'_>,
    cluster: ClusterId,
    ranges: &[MacRange],
    cursor: Option<MacAddr>,
) -> Result<(), DbError> {
    let ranges = serde_json::to_string(ranges).map_err(|e| DbError::Invalid {
        what: "MAC ranges",
        detail: e.to_string(),
    })?;
    let mut q = Sql::new("DELETE FROM cluster_mac_pools WHERE cluster_id = ");
    q.arg(cluster.to_string());
    c.exec(&q).await?;
    let mut q = Sql::new("INSERT INTO cluster_mac_pools (cluster_id, ranges, cursor) VALUES (");
    q.arg(cluster.to_string())
        .push(", ")
        .arg(ranges)
        .push(", ")
        .arg(Arg::Text(cursor.map(|m| m.to_string())))
        .push(")");
    c.exec_as(&q, "MAC pool", format!("of cluster {cluster}")).await?;
    Ok(())
}

/// The cluster's pool with every NIC MAC inside its ranges marked allocated (MACs are unique
/// across NICs, and stored lowercase fixed-width, so text order is address order).
async fn mac_pool_of(c: &mut Conn<'_>, cluster: ClusterId) -> Result<MacPool, DbError> {
    let (ranges, cursor) = mac_pool_load(c, cluster).await?;
    let mut allocated = BTreeSet::new();
    for r in &ranges {
        let mut q = Sql::new("SELECT mac FROM nics WHERE mac >= ");
        q.arg(r.start.to_string())
            .push(" AND mac <= ")
            .arg(r.end.to_string());
        for row in c.all(&q).await? {
            allocated.insert(row.parse::<MacAddr>("mac")?);
        }
    }
    MacPool::from_state(MacPoolState {
        ranges,
        allocated,
        cursor,
    })
    .map_err(pool_err)
}

/// Sets a cluster's pool ranges (checked; addresses in use stay in use).
async fn mac_pool_set_ranges(
    c: &mut Conn<'_>,
    cluster: ClusterId,
    ranges: &[MacRange],
) -> Result<(), DbError> {
    MacPool::new(ranges.to_vec()).map_err(pool_err)?;
    mac_pool_store(c, cluster, ranges, None).await
}

/// Inserts a NIC with `mac`, or with the next free address of its VM's cluster pool, in one
/// transaction with the pool's cursor.
async fn nic_insert_pooled(
    c: &mut Conn<'_>,
    n: &Nic,
    cluster: ClusterId,
    mac: Option<MacAddr>,
) -> Result<Nic, DbError> {
    let mut nic = n.clone();
    match mac {
        Some(m) => {
            if m.0[0] & 1 == 1 {
                return Err(pool_err(NetworkError::NotUnicast(m)));
            }
            nic.mac = m;
        }
        None => {
            let mut pool = mac_pool_of(c, cluster).await?;
            nic.mac = pool.allocate().map_err(pool_err)?;
            mac_pool_store(c, cluster, &pool.state().ranges, pool.state().cursor).await?;
        }
    }
    let mut q = Sql::new("SELECT COUNT(*) AS n FROM nics WHERE mac = ");
    q.arg(nic.mac.to_string());
    if c.count(&q).await? > 0 {
        return Err(pool_err(NetworkError::InUse(nic.mac)));
    }
    let mut q =
        Sql::new("INSERT INTO nics (id, vm_id, name, network, mac, interface, plugged, linked) VALUES (");
    q.arg(nic.id.to_string())
        .push(", ")
        .arg(nic.vm_id.to_string())
        .push(", ")
        .arg(nic.name.as_str())
        .push(", ")
        .arg(Arg::Text(nic.network.clone()))
        .push(", ")
        .arg(nic.mac.to_string())
        .push(", ")
        .arg(nic.interface.as_str())
        .push(", ")
        .arg(b2i(nic.plugged))
        .push(", ")
        .arg(b2i(nic.linked))
        .push(")");
    c.exec_as(&q, "NIC", format!("{} on VM {}", nic.name, nic.vm_id))
        .await?;
    Ok(nic)
}

repo! {
    write network_insert(n: &LogicalNetwork) -> LogicalNetwork = network_insert;
    read network_get(id: NetworkId) -> Option<LogicalNetwork> = network_get;
    read network_get_by_name(dc: DcId, name: &str) -> Option<LogicalNetwork> = network_get_by_name;
    read network_list(dc: Option<DcId>) -> Vec<LogicalNetwork> = network_list;
    write network_update(n: &LogicalNetwork) -> LogicalNetwork = network_update;
    write network_delete(id: NetworkId) -> bool = network_delete;
    read network_nic_count(n: &LogicalNetwork) -> u64 = network_nic_count;

    write cluster_network_set(cluster: ClusterId, network: NetworkId, required: bool, management: bool) -> () = cluster_network_set;
    write cluster_network_remove(cluster: ClusterId, network: NetworkId) -> bool = cluster_network_remove;
    read cluster_networks(cluster: ClusterId) -> Vec<ClusterNetwork> = cluster_networks;
    read network_clusters(network: NetworkId) -> Vec<(ClusterId, ClusterNetwork)> = network_clusters;

    read host_attachments(host: HostUuid) -> Vec<NetworkAttachment> = host_attachments;
    read network_attachment_count(network: NetworkId) -> u64 = network_attachment_count;
    write host_attachments_apply(host: HostUuid, set: &[NetworkAttachment], removed: &[NetworkId]) -> () = host_attachments_apply;

    read host_reported_networks(host: HostUuid) -> BTreeSet<String> = host_reported_networks;
    write host_reported_networks_set(host: HostUuid, names: &BTreeSet<String>) -> bool = host_reported_networks_set;
    read cluster_reported_networks(cluster: ClusterId) -> BTreeMap<HostUuid, BTreeSet<String>> = cluster_reported_networks;
    read cluster_vm_networks(cluster: ClusterId) -> BTreeMap<VmId, BTreeSet<String>> = cluster_vm_networks;

    read mac_pool_of(cluster: ClusterId) -> MacPool = mac_pool_of;
    write mac_pool_set_ranges(cluster: ClusterId, ranges: &[MacRange]) -> () = mac_pool_set_ranges;
    /// Adds a NIC with `mac`, or the next free address of `cluster`'s pool when `None`.
    write nic_insert_pooled(n: &Nic, cluster: ClusterId, mac: Option<MacAddr>) -> Nic = nic_insert_pooled;
}
