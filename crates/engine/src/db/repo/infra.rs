//! Data centers (with their SPM role), clusters, hosts and hosts' lockspace ids.

use sqlx::any::AnyRow;

use super::missing_or_conflict;
use crate::db::list::{order_and_page, ListQuery, Ref, TextMatch, Where};
use crate::db::sql::{b2i, Arg, RowExt, Sql};
use crate::db::{Conn, DbError};
use crate::model::*;

// ---------------------------------------------------------------- data centers

const DC_COLS: &str = "id, name, description, storage_pool_id, compat_major, compat_minor, \
    is_local, status, master_version, spm_host_id, spm_status, spm_lver, created_at, revision";

fn dc_from_row(r: &AnyRow) -> Result<DataCenter, DbError> {
    Ok(DataCenter {
        id: r.parse("id")?,
        name: r.text("name")?,
        description: r.text("description")?,
        storage_pool_id: r.parse("storage_pool_id")?,
        compatibility_version: Version {
            major: r.u32("compat_major")?,
            minor: r.u32("compat_minor")?,
        },
        local: r.flag("is_local")?,
        status: r.parse("status")?,
        master_version: r.int("master_version")?,
        spm_host: r.opt_parse("spm_host_id")?,
        spm_status: r.parse("spm_status")?,
        spm_lver: r.opt_int("spm_lver")?,
        created_at: r.ts("created_at")?,
        revision: r.int("revision")?,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DcFilter {
    pub name: Option<TextMatch>,
    pub status: Vec<DcStatus>,
    pub local: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DcSort {
    Name,
    Status,
    CreatedAt,
}

pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), DbError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DbError::Invalid {
            what,
            detail: format!(
                "name {:?} must be 1-255 letters, digits, '-', '_' or '.'",
                name.chars().take(64).collect::<String>()
            ),
        })
    }
}

async fn dc_insert(c: &mut Conn<'_>, dc: &DataCenter) -> Result<DataCenter, DbError> {
    check_name("data center name", &dc.name)?;
    let mut q = Sql::new("INSERT INTO data_centers (id, name, description, storage_pool_id, compat_major, compat_minor, is_local, status, master_version, created_at, revision) VALUES (");
    q.arg(dc.id.to_string())
        .push(", ")
        .arg(dc.name.as_str())
        .push(", ")
        .arg(dc.description.as_str())
        .push(", ")
        .arg(dc.storage_pool_id.to_string())
        .push(", ")
        .arg(i64::from(dc.compatibility_version.major))
        .push(", ")
        .arg(i64::from(dc.compatibility_version.minor))
        .push(", ")
        .arg(b2i(dc.local))
        .push(", ")
        .arg(dc.status.as_str())
        .push(", ")
        .arg(dc.master_version)
        .push(", ")
        .arg(c.now.as_millis())
        .push(", 1)");
    c.exec_as(&q, "data center", &dc.name).await?;
    dc_get(c, dc.id)
        .await?
        .ok_or_else(|| DbError::not_found("data center", dc.id))
}

async fn dc_get(c: &mut Conn<'_>, id: DcId) -> Result<Option<DataCenter>, DbError> {
    let mut q = Sql::new(&format!("SELECT {DC_COLS} FROM data_centers WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(dc_from_row).transpose()
}

async fn dc_get_by_name(c: &mut Conn<'_>, name: &str) -> Result<Option<DataCenter>, DbError> {
    let mut q = Sql::new(&format!("SELECT {DC_COLS} FROM data_centers WHERE name = "));
    q.arg(name);
    c.opt(&q).await?.as_ref().map(dc_from_row).transpose()
}

async fn dc_list(c: &mut Conn<'_>, lq: &ListQuery<DcFilter, DcSort>) -> Result<Vec<DataCenter>, DbError> {
    let mut q = Sql::new(&format!("SELECT {DC_COLS} FROM data_centers"));
    Where::new(&mut q, c.backend).each(lq, |w, f| {
        w.text("name", &f.name);
        w.any_of("status", &f.status);
        w.eq_int("is_local", f.local.map(b2i));
    });
    order_and_page(
        &mut q,
        lq,
        |k| match k {
            DcSort::Name => "name",
            DcSort::Status => "status",
            DcSort::CreatedAt => "created_at",
        },
        "id",
    );
    c.all(&q).await?.iter().map(dc_from_row).collect()
}

/// Writes the configuration (name, description, compatibility version, local) if `dc.revision`
/// is still current.
async fn dc_update(c: &mut Conn<'_>, dc: &DataCenter) -> Result<DataCenter, DbError> {
    check_name("data center name", &dc.name)?;
    let mut q = Sql::new("UPDATE data_centers SET name = ");
    q.arg(dc.name.as_str())
        .push(", description = ")
        .arg(dc.description.as_str())
        .push(", compat_major = ")
        .arg(i64::from(dc.compatibility_version.major))
        .push(", compat_minor = ")
        .arg(i64::from(dc.compatibility_version.minor))
        .push(", is_local = ")
        .arg(b2i(dc.local))
        .push(", revision = revision + 1 WHERE id = ")
        .arg(dc.id.to_string())
        .push(" AND revision = ")
        .arg(dc.revision);
    if c.exec_as(&q, "data center", &dc.name).await? == 0 {
        let rev = dc.revision;
        return Err(
            missing_or_conflict(c, "data_centers", "data center", &dc.id.to_string(), || {
                format!("revision {rev} is stale")
            })
            .await,
        );
    }
    dc_get(c, dc.id)
        .await?
        .ok_or_else(|| DbError::not_found("data center", dc.id))
}

async fn dc_set_status(c: &mut Conn<'_>, id: DcId, status: DcStatus) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE data_centers SET status = ");
    q.arg(status.as_str()).push(" WHERE id = ").arg(id.to_string());
    if c.exec(&q).await? == 0 {
        return Err(DbError::not_found("data center", id));
    }
    Ok(())
}

/// Compare-and-set of the pool's master version (it must only ever grow by one writer).
async fn dc_set_master_version(c: &mut Conn<'_>, id: DcId, expected: i64, new: i64) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE data_centers SET master_version = ");
    q.arg(new)
        .push(" WHERE id = ")
        .arg(id.to_string())
        .push(" AND master_version = ")
        .arg(expected);
    if c.exec(&q).await? == 0 {
        return Err(
            missing_or_conflict(c, "data_centers", "data center", &id.to_string(), || {
                format!("master version is no longer {expected}")
            })
            .await,
        );
    }
    Ok(())
}

/// Marks `host` as contending for the data center's SPM role; fails with `Conflict` if any
/// host (including `host`) already holds or contends for it.
async fn dc_spm_contend(c: &mut Conn<'_>, id: DcId, host: HostUuid) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE data_centers SET spm_host_id = ");
    q.arg(host.to_string())
        .push(", spm_status = 'contending', spm_lver = NULL WHERE id = ")
        .arg(id.to_string())
        .push(" AND spm_host_id IS NULL");
    if c.exec(&q).await? == 0 {
        let holder = dc_get(c, id).await?.and_then(|d| d.spm_host);
        return Err(match holder {
            None => DbError::not_found("data center", id),
            Some(h) => DbError::Conflict {
                kind: "data center",
                id: id.to_string(),
                detail: format!("host {h} already holds or contends for the SPM role"),
            },
        });
    }
    Ok(())
}

/// The contending `host` became SPM with lease version `lver`.
async fn dc_spm_won(c: &mut Conn<'_>, id: DcId, host: HostUuid, lver: i64) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE data_centers SET spm_status = 'spm', spm_lver = ");
    q.arg(lver)
        .push(" WHERE id = ")
        .arg(id.to_string())
        .push(" AND spm_host_id = ")
        .arg(host.to_string());
    if c.exec(&q).await? == 0 {
        return Err(
            missing_or_conflict(c, "data_centers", "data center", &id.to_string(), || {
                format!("host {host} is not contending for the SPM role")
            })
            .await,
        );
    }
    Ok(())
}

/// `host` no longer holds or seeks the role. Returns whether it did.
async fn dc_spm_clear(c: &mut Conn<'_>, id: DcId, host: HostUuid) -> Result<bool, DbError> {
    let mut q = Sql::new(
        "UPDATE data_centers SET spm_host_id = NULL, spm_status = 'none', spm_lver = NULL WHERE id = ",
    );
    q.arg(id.to_string())
        .push(" AND spm_host_id = ")
        .arg(host.to_string());
    Ok(c.exec(&q).await? == 1)
}

async fn dc_delete(c: &mut Conn<'_>, id: DcId) -> Result<(), DbError> {
    let mut q = Sql::new("DELETE FROM data_centers WHERE id = ");
    q.arg(id.to_string());
    if c.delete_as(&q, "data center", id).await? == 0 {
        return Err(DbError::not_found("data center", id));
    }
    Ok(())
}

// ---------------------------------------------------------------- clusters

const CLUSTER_COLS: &str = "id, name, description, data_center_id, cpu_type, cpu_architecture, \
    scheduling_policy, memory_overcommit_percent, scheduling_properties, compat_major, compat_minor, \
    migration_bandwidth_mbps, migration_encrypted, created_at, revision";

fn cluster_from_row(r: &AnyRow) -> Result<Cluster, DbError> {
    Ok(Cluster {
        id: r.parse("id")?,
        name: r.text("name")?,
        description: r.text("description")?,
        data_center_id: r.parse("data_center_id")?,
        cpu_type: r.text("cpu_type")?,
        cpu_architecture: r.text("cpu_architecture")?,
        scheduling_policy: r.parse("scheduling_policy")?,
        memory_overcommit_percent: r.u32("memory_overcommit_percent")?,
        scheduling_properties: {
            let text = r.text("scheduling_properties")?;
            serde_json::from_str(&text).map_err(|e| DbError::Corrupt {
                column: "clusters.scheduling_properties".into(),
                detail: format!("{text:?}: {e}"),
            })?
        },
        compatibility_version: Version {
            major: r.u32("compat_major")?,
            minor: r.u32("compat_minor")?,
        },
        migration_bandwidth_mbps: r.opt_u32("migration_bandwidth_mbps")?,
        migration_encrypted: r.flag("migration_encrypted")?,
        created_at: r.ts("created_at")?,
        revision: r.int("revision")?,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterFilter {
    pub name: Option<TextMatch>,
    pub data_center: Option<Ref<DcId>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterSort {
    Name,
    CreatedAt,
}

fn cluster_args(q: &mut Sql, cl: &Cluster) {
    q.arg(cl.name.as_str())
        .push(", ")
        .arg(cl.description.as_str())
        .push(", ")
        .arg(cl.data_center_id.to_string())
        .push(", ")
        .arg(cl.cpu_type.as_str())
        .push(", ")
        .arg(cl.cpu_architecture.as_str())
        .push(", ")
        .arg(cl.scheduling_policy.as_str())
        .push(", ")
        .arg(i64::from(cl.memory_overcommit_percent))
        .push(", ")
        .arg(serde_json::to_string(&cl.scheduling_properties).expect("a string map serializes"))
        .push(", ")
        .arg(i64::from(cl.compatibility_version.major))
        .push(", ")
        .arg(i64::from(cl.compatibility_version.minor))
        .push(", ")
        .arg(Arg::Int(cl.migration_bandwidth_mbps.map(i64::from)))
        .push(", ")
        .arg(i64::from(cl.migration_encrypted));
}

async fn cluster_insert(c: &mut Conn<'_>, cl: &Cluster) -> Result<Cluster, DbError> {
    check_name("cluster name", &cl.name)?;
    let mut q = Sql::new("INSERT INTO clusters (id, name, description, data_center_id, cpu_type, cpu_architecture, scheduling_policy, memory_overcommit_percent, scheduling_properties, compat_major, compat_minor, migration_bandwidth_mbps, migration_encrypted, created_at, revision) VALUES (");
    q.arg(cl.id.to_string()).push(", ");
    cluster_args(&mut q, cl);
    q.push(", ").arg(c.now.as_millis()).push(", 1)");
    c.exec_as(&q, "cluster", &cl.name).await?;
    cluster_get(c, cl.id)
        .await?
        .ok_or_else(|| DbError::not_found("cluster", cl.id))
}

async fn cluster_get(c: &mut Conn<'_>, id: ClusterId) -> Result<Option<Cluster>, DbError> {
    let mut q = Sql::new(&format!("SELECT {CLUSTER_COLS} FROM clusters WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(cluster_from_row).transpose()
}

async fn cluster_get_by_name(c: &mut Conn<'_>, name: &str) -> Result<Option<Cluster>, DbError> {
    let mut q = Sql::new(&format!("SELECT {CLUSTER_COLS} FROM clusters WHERE name = "));
    q.arg(name);
    c.opt(&q).await?.as_ref().map(cluster_from_row).transpose()
}

async fn cluster_list(
    c: &mut Conn<'_>,
    lq: &ListQuery<ClusterFilter, ClusterSort>,
) -> Result<Vec<Cluster>, DbError> {
    let mut q = Sql::new(&format!("SELECT {CLUSTER_COLS} FROM clusters"));
    Where::new(&mut q, c.backend).each(lq, |w, f| {
        w.text("name", &f.name);
        w.reference("data_center_id", "data_centers", &f.data_center);
    });
    order_and_page(
        &mut q,
        lq,
        |k| match k {
            ClusterSort::Name => "name",
            ClusterSort::CreatedAt => "created_at",
        },
        "id",
    );
    c.all(&q).await?.iter().map(cluster_from_row).collect()
}

async fn cluster_update(c: &mut Conn<'_>, cl: &Cluster) -> Result<Cluster, DbError> {
    check_name("cluster name", &cl.name)?;
    let mut q = Sql::new("UPDATE clusters SET (name, description, data_center_id, cpu_type, cpu_architecture, scheduling_policy, memory_overcommit_percent, scheduling_properties, compat_major, compat_minor, migration_bandwidth_mbps, migration_encrypted) = (");
    cluster_args(&mut q, cl);
    q.push("), revision = revision + 1 WHERE id = ")
        .arg(cl.id.to_string())
        .push(" AND revision = ")
        .arg(cl.revision);
    if c.exec_as(&q, "cluster", &cl.name).await? == 0 {
        let rev = cl.revision;
        return Err(
            missing_or_conflict(c, "clusters", "cluster", &cl.id.to_string(), || {
                format!("revision {rev} is stale")
            })
            .await,
        );
    }
    cluster_get(c, cl.id)
        .await?
        .ok_or_else(|| DbError::not_found("cluster", cl.id))
}

async fn cluster_delete(c: &mut Conn<'_>, id: ClusterId) -> Result<(), DbError> {
    let mut q = Sql::new("DELETE FROM clusters WHERE id = ");
    q.arg(id.to_string());
    if c.delete_as(&q, "cluster", id).await? == 0 {
        return Err(DbError::not_found("cluster", id));
    }
    Ok(())
}

// ---------------------------------------------------------------- hosts

const HOST_SELECT: &str = "SELECT h.id, h.name, h.address, h.port, h.cluster_id, h.status, \
    h.status_detail, h.spm_priority, h.certificate_fingerprint, h.cpu_cores, h.memory_bytes, \
    h.free_memory_bytes, h.last_seen_at, h.created_at, h.revision, \
    COALESCE((SELECT d.spm_status FROM data_centers d WHERE d.spm_host_id = h.id), 'none') AS spm_status \
    FROM hosts h";

fn host_from_row(r: &AnyRow) -> Result<Host, DbError> {
    let port = r.int("port")?;
    Ok(Host {
        id: r.parse("id")?,
        name: r.text("name")?,
        address: r.text("address")?,
        port: u16::try_from(port).map_err(|_| DbError::Corrupt {
            column: "port".into(),
            detail: format!("{port} is out of range"),
        })?,
        cluster_id: r.parse("cluster_id")?,
        status: r.parse("status")?,
        status_detail: r.opt_text("status_detail")?,
        spm_status: r.parse("spm_status")?,
        spm_priority: r.int("spm_priority")? as i32,
        certificate_fingerprint: r.opt_text("certificate_fingerprint")?,
        cpu_cores: r.opt_uint("cpu_cores")?.map(|v| v as u32),
        memory_bytes: r.opt_uint("memory_bytes")?,
        free_memory_bytes: r.opt_uint("free_memory_bytes")?,
        last_seen_at: r.opt_ts("last_seen_at")?,
        created_at: r.ts("created_at")?,
        revision: r.int("revision")?,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFilter {
    pub name: Option<TextMatch>,
    pub status: Vec<HostStatus>,
    pub cluster: Option<Ref<ClusterId>>,
    pub data_center: Option<Ref<DcId>>,
    pub address: Option<String>,
    /// With this tag on it (`tag=`).
    pub tag: Option<Ref<TagId>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostSort {
    Name,
    Status,
    Address,
    CreatedAt,
}

fn check_spm_priority(p: i32) -> Result<(), DbError> {
    if (-1..=10).contains(&p) {
        Ok(())
    } else {
        Err(DbError::Invalid {
            what: "SPM priority",
            detail: format!("{p} is not in -1..=10"),
        })
    }
}

async fn host_insert(c: &mut Conn<'_>, h: &Host) -> Result<Host, DbError> {
    check_name("host name", &h.name)?;
    check_spm_priority(h.spm_priority)?;
    if h.address.is_empty() || h.port == 0 {
        return Err(DbError::Invalid {
            what: "host address",
            detail: format!("{:?}:{} is not an address and port", h.address, h.port),
        });
    }
    let mut q = Sql::new("INSERT INTO hosts (id, name, address, port, cluster_id, status, status_detail, spm_priority, certificate_fingerprint, cpu_cores, memory_bytes, free_memory_bytes, last_seen_at, created_at, revision) VALUES (");
    q.arg(h.id.to_string())
        .push(", ")
        .arg(h.name.as_str())
        .push(", ")
        .arg(h.address.as_str())
        .push(", ")
        .arg(i64::from(h.port))
        .push(", ")
        .arg(h.cluster_id.to_string())
        .push(", ")
        .arg(h.status.as_str())
        .push(", ")
        .arg(Arg::Text(h.status_detail.clone()))
        .push(", ")
        .arg(i64::from(h.spm_priority))
        .push(", ")
        .arg(Arg::Text(h.certificate_fingerprint.clone()))
        .push(", ")
        .arg(Arg::Int(h.cpu_cores.map(i64::from)))
        .push(", ")
        .arg(Arg::Int(h.memory_bytes.map(|v| v as i64)))
        .push(", ")
        .arg(Arg::Int(h.free_memory_bytes.map(|v| v as i64)))
        .push(", ")
        .arg(Arg::Int(h.last_seen_at.map(|t| t.as_millis())))
        .push(", ")
        .arg(c.now.as_millis())
        .push(", 1)");
    c.exec_as(&q, "host", &h.name).await?;
    host_get(c, h.id)
        .await?
        .ok_or_else(|| DbError::not_found("host", h.id))
}

async fn host_get(c: &mut Conn<'_>, id: HostUuid) -> Result<Option<Host>, DbError> {
    let mut q = Sql::new(&format!("{HOST_SELECT} WHERE h.id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(host_from_row).transpose()
}

async fn host_get_by_name(c: &mut Conn<'_>, name: &str) -> Result<Option<Host>, DbError> {
    let mut q = Sql::new(&format!("{HOST_SELECT} WHERE h.name = "));
    q.arg(name);
    c.opt(&q).await?.as_ref().map(host_from_row).transpose()
}

fn host_where(w: &mut Where<'_>, f: &HostFilter) {
    w.text("h.name", &f.name);
    w.any_of("h.status", &f.status);
    w.reference("h.cluster_id", "clusters", &f.cluster);
    w.reference_in(
        "h.cluster_id IN (SELECT id FROM clusters WHERE data_center_id IN {ids})",
        "data_centers",
        &f.data_center,
    );
    w.eq("h.address", &f.address);
    w.reference_in(
        "EXISTS (SELECT 1 FROM tag_hosts th WHERE th.host_id = h.id AND th.tag_id IN {ids})",
        "tags",
        &f.tag,
    );
}

async fn host_list(c: &mut Conn<'_>, lq: &ListQuery<HostFilter, HostSort>) -> Result<Vec<Host>, DbError> {
    let mut q = Sql::new(HOST_SELECT);
    Where::new(&mut q, c.backend).each(lq, host_where);
    order_and_page(
        &mut q,
        lq,
        |k| match k {
            HostSort::Name => "h.name",
            HostSort::Status => "h.status",
            HostSort::Address => "h.address",
            HostSort::CreatedAt => "h.created_at",
        },
        "h.id",
    );
    c.all(&q).await?.iter().map(host_from_row).collect()
}

async fn host_count(c: &mut Conn<'_>, f: &HostFilter) -> Result<u64, DbError> {
    let mut q = Sql::new("SELECT COUNT(*) AS n FROM hosts h");
    host_where(&mut Where::new(&mut q, c.backend), f);
    c.count(&q).await
}

/// Writes the configuration (name, address, port, cluster, SPM priority, certificate
/// fingerprint) if `h.revision` is still current.
async fn host_update(c: &mut Conn<'_>, h: &Host) -> Result<Host, DbError> {
    check_name("host name", &h.name)?;
    check_spm_priority(h.spm_priority)?;
    let mut q = Sql::new("UPDATE hosts SET name = ");
    q.arg(h.name.as_str())
        .push(", address = ")
        .arg(h.address.as_str())
        .push(", port = ")
        .arg(i64::from(h.port))
        .push(", cluster_id = ")
        .arg(h.cluster_id.to_string())
        .push(", spm_priority = ")
        .arg(i64::from(h.spm_priority))
        .push(", certificate_fingerprint = ")
        .arg(Arg::Text(h.certificate_fingerprint.clone()))
        .push(", revision = revision + 1 WHERE id = ")
        .arg(h.id.to_string())
        .push(" AND revision = ")
        .arg(h.revision);
    if c.exec_as(&q, "host", &h.name).await? == 0 {
        let rev = h.revision;
        return Err(missing_or_conflict(c, "hosts", "host", &h.id.to_string(), || {
            format!("revision {rev} is stale")
        })
        .await);
    }
    host_get(c, h.id)
        .await?
        .ok_or_else(|| DbError::not_found("host", h.id))
}

/// Moves the host to `to` (with its reason) if its status is one of `expected` (any when
/// empty). Returns the status it had.
async fn host_set_status(
    c: &mut Conn<'_>,
    id: HostUuid,
    expected: &[HostStatus],
    to: HostStatus,
    detail: Option<&str>,
) -> Result<HostStatus, DbError> {
    let before = host_get(c, id)
        .await?
        .ok_or_else(|| DbError::not_found("host", id))?
        .status;
    let mut q = Sql::new("UPDATE hosts SET status = ");
    q.arg(to.as_str())
        .push(", status_detail = ")
        .arg(Arg::Text(detail.map(str::to_string)))
        .push(" WHERE id = ")
        .arg(id.to_string())
        .push(" AND status = ")
        .arg(before.as_str());
    let expected_ok = expected.is_empty() || expected.contains(&before);
    if !expected_ok || c.exec(&q).await? == 0 {
        let now = host_get(c, id).await?.map(|h| h.status);
        return Err(DbError::Conflict {
            kind: "host",
            id: id.to_string(),
            detail: format!(
                "status is {}, expected one of {expected:?}",
                now.map_or("gone", |s| s.as_str())
            ),
        });
    }
    Ok(before)
}

async fn host_update_stats(c: &mut Conn<'_>, id: HostUuid, stats: &HostStats) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE hosts SET cpu_cores = ");
    q.arg(Arg::Int(stats.cpu_cores.map(i64::from)))
        .push(", memory_bytes = ")
        .arg(Arg::Int(stats.memory_bytes.map(|v| v as i64)))
        .push(", free_memory_bytes = ")
        .arg(Arg::Int(stats.free_memory_bytes.map(|v| v as i64)))
        .push(", last_seen_at = ")
        .arg(c.now.as_millis())
        .push(" WHERE id = ")
        .arg(id.to_string());
    if c.exec(&q).await? == 0 {
        return Err(DbError::not_found("host", id));
    }
    Ok(())
}

async fn host_delete(c: &mut Conn<'_>, id: HostUuid) -> Result<(), DbError> {
    let mut q = Sql::new("SELECT COUNT(*) AS n FROM data_centers WHERE spm_host_id = ");
    q.arg(id.to_string());
    if c.count(&q).await? > 0 {
        return Err(DbError::InUse {
            kind: "host",
            id: id.to_string(),
            detail: "it holds or contends for the SPM role".into(),
        });
    }
    let mut q = Sql::new("DELETE FROM hosts WHERE id = ");
    q.arg(id.to_string());
    if c.delete_as(&q, "host", id).await? == 0 {
        return Err(DbError::not_found("host", id));
    }
    Ok(())
}

/// The host's id in the data center's lockspaces, allocating the lowest free one (1..=250)
/// on first use. Stable: the same pair always gets the same id.
async fn host_spm_id_allocate(c: &mut Conn<'_>, dc: DcId, host: HostUuid) -> Result<HostId, DbError> {
    const MAX: i64 = 250;
    if let Some(id) = host_spm_id(c, dc, host).await? {
        return Ok(id);
    }
    let mut q = Sql::new("SELECT spm_id FROM host_spm_ids WHERE data_center_id = ");
    q.arg(dc.to_string()).push(" ORDER BY spm_id");
    let used: Vec<i64> = c
        .all(&q)
        .await?
        .iter()
        .map(|r| r.int("spm_id"))
        .collect::<Result<_, _>>()?;
    let mut next = 1;
    for u in used {
        if u != next {
            break;
        }
        next += 1;
    }
    if next > MAX {
        return Err(DbError::Exhausted {
            what: "lockspace host id in the data center (all 250 are used)",
        });
    }
    let mut q = Sql::new("INSERT INTO host_spm_ids (data_center_id, host_id, spm_id) VALUES (");
    q.arg(dc.to_string())
        .push(", ")
        .arg(host.to_string())
        .push(", ")
        .arg(next)
        .push(")");
    c.exec_as(&q, "lockspace host id", format!("{next} in data center {dc}"))
        .await?;
    Ok(HostId::new(next as u64).expect("1..=250"))
}

async fn host_spm_id(c: &mut Conn<'_>, dc: DcId, host: HostUuid) -> Result<Option<HostId>, DbError> {
    let mut q = Sql::new("SELECT spm_id FROM host_spm_ids WHERE data_center_id = ");
    q.arg(dc.to_string())
        .push(" AND host_id = ")
        .arg(host.to_string());
    match c.opt(&q).await? {
        None => Ok(None),
        Some(r) => {
            let v = r.uint("spm_id")?;
            HostId::new(v).map(Some).map_err(|e| DbError::Corrupt {
                column: "spm_id".into(),
                detail: e.to_string(),
            })
        }
    }
}

async fn host_spm_id_release(c: &mut Conn<'_>, dc: DcId, host: HostUuid) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM host_spm_ids WHERE data_center_id = ");
    q.arg(dc.to_string())
        .push(" AND host_id = ")
        .arg(host.to_string());
    Ok(c.exec(&q).await? == 1)
}

repo! {
    /// Inserts a data center; `created_at` and `revision` are set here.
    write dc_insert(dc: &DataCenter) -> DataCenter = dc_insert;
    read dc_get(id: DcId) -> Option<DataCenter> = dc_get;
    read dc_get_by_name(name: &str) -> Option<DataCenter> = dc_get_by_name;
    read dc_list(q: &ListQuery<DcFilter, DcSort>) -> Vec<DataCenter> = dc_list;
    /// Writes name, description, compatibility version and local if `revision` is current.
    write dc_update(dc: &DataCenter) -> DataCenter = dc_update;
    write dc_set_status(id: DcId, status: DcStatus) -> () = dc_set_status;
    /// Compare-and-set of the pool's MASTER_VERSION.
    write dc_set_master_version(id: DcId, expected: i64, new: i64) -> () = dc_set_master_version;
    /// `host` starts contending for the SPM role; `Conflict` if another host holds or seeks it.
    write dc_spm_contend(id: DcId, host: HostUuid) -> () = dc_spm_contend;
    /// The contending `host` became SPM with lease version `lver`.
    write dc_spm_won(id: DcId, host: HostUuid, lver: i64) -> () = dc_spm_won;
    /// `host` gives up the role; returns whether it had it.
    write dc_spm_clear(id: DcId, host: HostUuid) -> bool = dc_spm_clear;
    /// `InUse` while clusters or storage domains belong to it.
    write dc_delete(id: DcId) -> () = dc_delete;

    write cluster_insert(cl: &Cluster) -> Cluster = cluster_insert;
    read cluster_get(id: ClusterId) -> Option<Cluster> = cluster_get;
    read cluster_get_by_name(name: &str) -> Option<Cluster> = cluster_get_by_name;
    read cluster_list(q: &ListQuery<ClusterFilter, ClusterSort>) -> Vec<Cluster> = cluster_list;
    write cluster_update(cl: &Cluster) -> Cluster = cluster_update;
    write cluster_delete(id: ClusterId) -> () = cluster_delete;

    write host_insert(h: &Host) -> Host = host_insert;
    read host_get(id: HostUuid) -> Option<Host> = host_get;
    read host_get_by_name(name: &str) -> Option<Host> = host_get_by_name;
    read host_list(q: &ListQuery<HostFilter, HostSort>) -> Vec<Host> = host_list;
    read host_count(f: &HostFilter) -> u64 = host_count;
    write host_update(h: &Host) -> Host = host_update;
    /// Compare-and-set of the status (any when `expected` is empty); returns the old status.
    write host_set_status(id: HostUuid, expected: &[HostStatus], to: HostStatus, detail: Option<&str>) -> HostStatus = host_set_status;
    /// Records what monitoring saw, and when.
    write host_update_stats(id: HostUuid, stats: &HostStats) -> () = host_update_stats;
    /// `InUse` while it runs VMs or holds the SPM role.
    write host_delete(id: HostUuid) -> () = host_delete;
    /// The host's lockspace id in the data center, allocated (lowest free) on first call.
    write host_spm_id_allocate(dc: DcId, host: HostUuid) -> HostId = host_spm_id_allocate;
    read host_spm_id(dc: DcId, host: HostUuid) -> Option<HostId> = host_spm_id;
    write host_spm_id_release(dc: DcId, host: HostUuid) -> bool = host_spm_id_release;
}
