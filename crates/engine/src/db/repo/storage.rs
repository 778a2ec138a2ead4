//! Storage domains, their membership in data centers' pools, disks and volumes.

use std::collections::BTreeMap;

use sqlx::any::AnyRow;

use super::infra::check_name as validate_name;
use super::missing_or_conflict;
use crate::db::list::{order_and_page, ListQuery, Ref, TextMatch, Where};
use crate::db::sql::{b2i, u2i, Arg, RowExt, Sql};
use crate::db::{Conn, DbError};
use crate::model::*;

// ---------------------------------------------------------------- storage domains

const SD_COLS: &str = "id, name, description, domain_type, storage_type, address, path, \
    mount_options, vfs_type, format_version, capacity_bytes, free_bytes, \
    warning_low_space_indicator, critical_space_action_blocker, created_at, revision";

fn sd_from_row(r: &AnyRow) -> Result<StorageDomain, DbError> {
    Ok(StorageDomain {
        id: r.parse("id")?,
        name: r.text("name")?,
        description: r.text("description")?,
        domain_type: r.parse("domain_type")?,
        storage_type: r.parse("storage_type")?,
        address: r.opt_text("address")?,
        path: r.text("path")?,
        mount_options: r.opt_text("mount_options")?,
        vfs_type: r.opt_text("vfs_type")?,
        format_version: r.u32("format_version")?,
        capacity_bytes: r.opt_uint("capacity_bytes")?,
        free_bytes: r.opt_uint("free_bytes")?,
        warning_low_space_indicator: r.u32("warning_low_space_indicator")?,
        critical_space_action_blocker: r.u32("critical_space_action_blocker")?,
        created_at: r.ts("created_at")?,
        revision: r.int("revision")?,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SdFilter {
    pub name: Option<TextMatch>,
    pub domain_type: Vec<SdType>,
    pub storage_type: Vec<StorageType>,
    /// Attached to this data center.
    pub data_center: Option<Ref<DcId>>,
    /// Status in any data center; `unattached` matches domains in none.
    pub status: Vec<SdStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdSort {
    Name,
    DomainType,
    FreeSpace,
    CreatedAt,
}

fn check_sd(sd: &StorageDomain) -> Result<(), DbError> {
    validate_name("storage domain name", &sd.name)?;
    if sd.path.is_empty() {
        return Err(DbError::Invalid {
            what: "storage domain path",
            detail: format!("storage domain {} has an empty path", sd.name),
        });
    }
    if sd.warning_low_space_indicator > 100 {
        return Err(DbError::Invalid {
            what: "warning_low_space_indicator",
            detail: format!(
                "storage domain {}: the low space warning is a percent of the domain, 0..100, not {}",
                sd.name, sd.warning_low_space_indicator
            ),
        });
    }
    if sd.storage_type == StorageType::Nfs && sd.address.as_deref().unwrap_or("").is_empty() {
        return Err(DbError::Invalid {
            what: "storage domain address",
            detail: format!("NFS storage domain {} needs a server address", sd.name),
        });
    }
    Ok(())
}

fn sd_args(q: &mut Sql, sd: &StorageDomain) -> Result<(), DbError> {
    q.arg(sd.name.as_str())
        .push(", ")
        .arg(sd.description.as_str())
        .push(", ")
        .arg(sd.domain_type.as_str())
        .push(", ")
        .arg(sd.storage_type.as_str())
        .push(", ")
        .arg(Arg::Text(sd.address.clone()))
        .push(", ")
        .arg(sd.path.as_str())
        .push(", ")
        .arg(Arg::Text(sd.mount_options.clone()))
        .push(", ")
        .arg(Arg::Text(sd.vfs_type.clone()))
        .push(", ")
        .arg(i64::from(sd.format_version))
        .push(", ")
        .arg(Arg::Int(
            sd.capacity_bytes.map(|v| u2i("capacity", v)).transpose()?,
        ))
        .push(", ")
        .arg(Arg::Int(sd.free_bytes.map(|v| u2i("free space", v)).transpose()?))
        .push(", ")
        .arg(i64::from(sd.warning_low_space_indicator))
        .push(", ")
        .arg(i64::from(sd.critical_space_action_blocker));
    Ok(())
}

async fn sd_insert(c: &mut Conn<'_>, sd: &StorageDomain) -> Result<StorageDomain, DbError> {
    check_sd(sd)?;
    let mut q = Sql::new("INSERT INTO storage_domains (id, name, description, domain_type, storage_type, address, path, mount_options, vfs_type, format_version, capacity_bytes, free_bytes, warning_low_space_indicator, critical_space_action_blocker, created_at, revision) VALUES (");
    q.arg(sd.id.to_string()).push(", ");
    sd_args(&mut q, sd)?;
    q.push(", ").arg(c.now.as_millis()).push(", 1)");
    c.exec_as(&q, "storage domain", &sd.name).await?;
    sd_get(c, sd.id)
        .await?
        .ok_or_else(|| DbError::not_found("storage domain", sd.id))
}

async fn sd_get(c: &mut Conn<'_>, id: SdUuid) -> Result<Option<StorageDomain>, DbError> {
    let mut q = Sql::new(&format!("SELECT {SD_COLS} FROM storage_domains WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(sd_from_row).transpose()
}

async fn sd_get_by_name(c: &mut Conn<'_>, name: &str) -> Result<Option<StorageDomain>, DbError> {
    let mut q = Sql::new(&format!("SELECT {SD_COLS} FROM storage_domains WHERE name = "));
    q.arg(name);
    c.opt(&q).await?.as_ref().map(sd_from_row).transpose()
}

fn sd_where(w: &mut Where<'_>, f: &SdFilter) {
    w.text("name", &f.name);
    w.any_of("domain_type", &f.domain_type);
    w.any_of("storage_type", &f.storage_type);
    w.reference_in(
        "id IN (SELECT storage_domain_id FROM storage_pool_members WHERE data_center_id IN {ids})",
        "data_centers",
        &f.data_center,
    );
    if !f.status.is_empty() {
        let attached: Vec<&SdStatus> = f.status.iter().filter(|s| **s != SdStatus::Unattached).collect();
        let unattached = f.status.contains(&SdStatus::Unattached);
        let sql = w.and();
        sql.push("(");
        if unattached {
            sql.push("NOT EXISTS (SELECT 1 FROM storage_pool_members m WHERE m.storage_domain_id = storage_domains.id)");
        }
        if !attached.is_empty() {
            if unattached {
                sql.push(" OR ");
            }
            sql.push("id IN (SELECT storage_domain_id FROM storage_pool_members WHERE status IN (");
            for (i, s) in attached.iter().enumerate() {
                if i > 0 {
                    sql.push(", ");
                }
                sql.arg(s.as_str());
            }
            sql.push("))");
        }
        sql.push(")");
    }
}

async fn sd_list(c: &mut Conn<'_>, lq: &ListQuery<SdFilter, SdSort>) -> Result<Vec<StorageDomain>, DbError> {
    let mut q = Sql::new(&format!("SELECT {SD_COLS} FROM storage_domains"));
    Where::new(&mut q, c.backend).each(lq, sd_where);
    order_and_page(
        &mut q,
        lq,
        |k| match k {
            SdSort::Name => "name",
            SdSort::DomainType => "domain_type",
            SdSort::FreeSpace => "free_bytes",
            SdSort::CreatedAt => "created_at",
        },
        "id",
    );
    c.all(&q).await?.iter().map(sd_from_row).collect()
}

async fn sd_count(c: &mut Conn<'_>, f: &SdFilter) -> Result<u64, DbError> {
    let mut q = Sql::new("SELECT COUNT(*) AS n FROM storage_domains");
    sd_where(&mut Where::new(&mut q, c.backend), f);
    c.count(&q).await
}

async fn sd_update(c: &mut Conn<'_>, sd: &StorageDomain) -> Result<StorageDomain, DbError> {
    check_sd(sd)?;
    let mut q = Sql::new("UPDATE storage_domains SET (name, description, domain_type, storage_type, address, path, mount_options, vfs_type, format_version, capacity_bytes, free_bytes, warning_low_space_indicator, critical_space_action_blocker) = (");
    sd_args(&mut q, sd)?;
    q.push("), revision = revision + 1 WHERE id = ")
        .arg(sd.id.to_string())
        .push(" AND revision = ")
        .arg(sd.revision);
    if c.exec_as(&q, "storage domain", &sd.name).await? == 0 {
        let rev = sd.revision;
        return Err(
            missing_or_conflict(c, "storage_domains", "storage domain", &sd.id.to_string(), || {
                format!("revision {rev} is stale")
            })
            .await,
        );
    }
    sd_get(c, sd.id)
        .await?
        .ok_or_else(|| DbError::not_found("storage domain", sd.id))
}

/// Monitoring's view of the domain's space; not a configuration change.
async fn sd_set_space(c: &mut Conn<'_>, id: SdUuid, capacity: u64, free: u64) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE storage_domains SET capacity_bytes = ");
    q.arg(u2i("capacity", capacity)?)
        .push(", free_bytes = ")
        .arg(u2i("free space", free)?)
        .push(" WHERE id = ")
        .arg(id.to_string());
    if c.exec(&q).await? == 0 {
        return Err(DbError::not_found("storage domain", id));
    }
    Ok(())
}

async fn sd_delete(c: &mut Conn<'_>, id: SdUuid) -> Result<(), DbError> {
    let mut q = Sql::new("DELETE FROM storage_domains WHERE id = ");
    q.arg(id.to_string());
    if c.delete_as(&q, "storage domain", id).await? == 0 {
        return Err(DbError::not_found("storage domain", id));
    }
    Ok(())
}

// ---------------------------------------------------------------- pool membership

fn member_from_row(r: &AnyRow) -> Result<PoolMember, DbError> {
    Ok(PoolMember {
        data_center_id: r.parse("data_center_id")?,
        storage_domain_id: r.parse("storage_domain_id")?,
        status: r.parse("status")?,
        master: r.flag("is_master")?,
    })
}

const MEMBER_SELECT: &str =
    "SELECT data_center_id, storage_domain_id, status, is_master FROM storage_pool_members";

/// Adds the domain to the data center's pool. A data domain belongs to one pool at most.
async fn pool_attach(c: &mut Conn<'_>, m: &PoolMember) -> Result<(), DbError> {
    let sd = sd_get(c, m.storage_domain_id)
        .await?
        .ok_or_else(|| DbError::not_found("storage domain", m.storage_domain_id))?;
    if sd.domain_type == SdType::Data {
        let others = pool_attachments(c, m.storage_domain_id).await?;
        if let Some(o) = others.iter().find(|o| o.data_center_id != m.data_center_id) {
            return Err(DbError::InUse {
                kind: "storage domain",
                id: sd.id.to_string(),
                detail: format!("attached to data center {}", o.data_center_id),
            });
        }
    }
    let mut q = Sql::new(
        "INSERT INTO storage_pool_members (data_center_id, storage_domain_id, status, is_master) VALUES (",
    );
    q.arg(m.data_center_id.to_string())
        .push(", ")
        .arg(m.storage_domain_id.to_string())
        .push(", ")
        .arg(m.status.as_str())
        .push(", ")
        .arg(b2i(m.master))
        .push(")");
    c.exec_as(
        &q,
        "storage domain attachment",
        format!("{} in data center {}", sd.name, m.data_center_id),
    )
    .await?;
    Ok(())
}

async fn pool_detach(c: &mut Conn<'_>, dc: DcId, sd: SdUuid) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM storage_pool_members WHERE data_center_id = ");
    q.arg(dc.to_string())
        .push(" AND storage_domain_id = ")
        .arg(sd.to_string());
    Ok(c.exec(&q).await? == 1)
}

async fn pool_members(c: &mut Conn<'_>, dc: DcId) -> Result<Vec<PoolMember>, DbError> {
    let mut q = Sql::new(&format!("{MEMBER_SELECT} WHERE data_center_id = "));
    q.arg(dc.to_string())
        .push(" ORDER BY is_master DESC, storage_domain_id");
    c.all(&q).await?.iter().map(member_from_row).collect()
}

async fn pool_attachments(c: &mut Conn<'_>, sd: SdUuid) -> Result<Vec<PoolMember>, DbError> {
    let mut q = Sql::new(&format!("{MEMBER_SELECT} WHERE storage_domain_id = "));
    q.arg(sd.to_string()).push(" ORDER BY data_center_id");
    c.all(&q).await?.iter().map(member_from_row).collect()
}

/// Compare-and-set of a domain's status in a pool (any when `expected` is empty).
async fn pool_set_status(
    c: &mut Conn<'_>,
    dc: DcId,
    sd: SdUuid,
    expected: &[SdStatus],
    to: SdStatus,
) -> Result<SdStatus, DbError> {
    let mut q = Sql::new(&format!("{MEMBER_SELECT} WHERE data_center_id = "));
    q.arg(dc.to_string())
        .push(" AND storage_domain_id = ")
        .arg(sd.to_string());
    let before = match c.opt(&q).await? {
        None => {
            return Err(DbError::NotFound {
                kind: "storage domain attachment",
                id: format!("{sd} in data center {dc}"),
            })
        }
        Some(r) => member_from_row(&r)?.status,
    };
    let mut u = Sql::new("UPDATE storage_pool_members SET status = ");
    u.arg(to.as_str())
        .push(" WHERE data_center_id = ")
        .arg(dc.to_string())
        .push(" AND storage_domain_id = ")
        .arg(sd.to_string())
        .push(" AND status = ")
        .arg(before.as_str());
    if !(expected.is_empty() || expected.contains(&before)) || c.exec(&u).await? == 0 {
        return Err(DbError::Conflict {
            kind: "storage domain",
            id: sd.to_string(),
            detail: format!("status in data center {dc} is {before}, expected one of {expected:?}"),
        });
    }
    Ok(before)
}

/// Makes `sd` the pool's master domain (and no other).
async fn pool_set_master(c: &mut Conn<'_>, dc: DcId, sd: SdUuid) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE storage_pool_members SET is_master = 0 WHERE data_center_id = ");
    q.arg(dc.to_string())
        .push(" AND storage_domain_id <> ")
        .arg(sd.to_string());
    c.exec(&q).await?;
    let mut q = Sql::new("UPDATE storage_pool_members SET is_master = 1 WHERE data_center_id = ");
    q.arg(dc.to_string())
        .push(" AND storage_domain_id = ")
        .arg(sd.to_string());
    if c.exec(&q).await? == 0 {
        return Err(DbError::NotFound {
            kind: "storage domain attachment",
            id: format!("{sd} in data center {dc}"),
        });
    }
    Ok(())
}

async fn pool_master(c: &mut Conn<'_>, dc: DcId) -> Result<Option<SdUuid>, DbError> {
    let mut q = Sql::new(
        "SELECT storage_domain_id FROM storage_pool_members WHERE is_master = 1 AND data_center_id = ",
    );
    q.arg(dc.to_string());
    c.opt(&q).await?.map(|r| r.parse("storage_domain_id")).transpose()
}

// ---------------------------------------------------------------- disks

const DISK_COLS: &str = "d.id, d.name, d.description, d.format, d.sparse, d.provisioned_size, \
    d.actual_size, d.storage_domain_id, d.status, d.locked_by, d.shareable, \
    d.wipe_after_delete, d.content_type, d.disk_profile_id, d.created_at, d.revision";

pub(crate) fn disk_from_row(r: &AnyRow) -> Result<Disk, DbError> {
    Ok(Disk {
        id: r.parse("id")?,
        name: r.text("name")?,
        description: r.text("description")?,
        format: r.parse("format")?,
        sparse: r.flag("sparse")?,
        provisioned_size: r.uint("provisioned_size")?,
        actual_size: r.uint("actual_size")?,
        storage_domain_id: r.parse("storage_domain_id")?,
        status: r.parse("status")?,
        locked_by: r.opt_parse("locked_by")?,
        shareable: r.flag("shareable")?,
        wipe_after_delete: r.flag("wipe_after_delete")?,
        content_type: r.parse("content_type")?,
        disk_profile_id: r.opt_parse("disk_profile_id")?,
        created_at: r.ts("created_at")?,
        revision: r.int("revision")?,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskFilter {
    pub name: Option<TextMatch>,
    pub status: Vec<DiskStatus>,
    pub storage_domain: Option<Ref<SdUuid>>,
    /// Attached to this VM.
    pub vm: Option<Ref<VmId>>,
    /// `Some(true)`: attached to no VM and no template.
    pub floating: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSort {
    Name,
    Status,
    ProvisionedSize,
    CreatedAt,
}

fn check_disk(d: &Disk) -> Result<(), DbError> {
    if d.name.is_empty() || d.name.len() > 255 {
        return Err(DbError::Invalid {
            what: "disk name",
            detail: "must be 1-255 characters".into(),
        });
    }
    if d.provisioned_size == 0 {
        return Err(DbError::Invalid {
            what: "disk size",
            detail: format!("disk {} has provisioned size 0", d.name),
        });
    }
    if d.format == DiskFormat::Cow && !d.sparse {
        // VDSM allows preallocated qcow2 only on block storage; file domains refuse it.
        return Err(DbError::Invalid {
            what: "disk allocation",
            detail: format!("disk {}: a cow disk on file storage must be sparse", d.name),
        });
    }
    Ok(())
}

async fn disk_insert(c: &mut Conn<'_>, d: &Disk) -> Result<Disk, DbError> {
    check_disk(d)?;
    let mut q = Sql::new("INSERT INTO disks (id, name, description, format, sparse, provisioned_size, actual_size, storage_domain_id, status, locked_by, shareable, wipe_after_delete, content_type, disk_profile_id, created_at, revision) VALUES (");
    q.arg(d.id.to_string())
        .push(", ")
        .arg(d.name.as_str())
        .push(", ")
        .arg(d.description.as_str())
        .push(", ")
        .arg(d.format.as_str())
        .push(", ")
        .arg(b2i(d.sparse))
        .push(", ")
        .arg(u2i("disk size", d.provisioned_size)?)
        .push(", ")
        .arg(u2i("disk actual size", d.actual_size)?)
        .push(", ")
        .arg(d.storage_domain_id.to_string())
        .push(", ")
        .arg(d.status.as_str())
        .push(", ")
        .arg(Arg::Text(d.locked_by.map(|o| o.to_string())))
        .push(", ")
        .arg(b2i(d.shareable))
        .push(", ")
        .arg(b2i(d.wipe_after_delete))
        .push(", ")
        .arg(d.content_type.as_str())
        .push(", ")
        .arg(Arg::Text(d.disk_profile_id.map(|p| p.to_string())))
        .push(", ")
        .arg(c.now.as_millis())
        .push(", 1)");
    c.exec_as(&q, "disk", d.id).await?;
    disk_get(c, d.id)
        .await?
        .ok_or_else(|| DbError::not_found("disk", d.id))
}

async fn disk_get(c: &mut Conn<'_>, id: DiskId) -> Result<Option<Disk>, DbError> {
    let mut q = Sql::new(&format!("SELECT {DISK_COLS} FROM disks d WHERE d.id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(disk_from_row).transpose()
}

async fn disk_list(c: &mut Conn<'_>, lq: &ListQuery<DiskFilter, DiskSort>) -> Result<Vec<Disk>, DbError> {
    let mut q = Sql::new(&format!("SELECT {DISK_COLS} FROM disks d"));
    Where::new(&mut q, c.backend).each(lq, |w, f| {
        w.text("d.name", &f.name);
        w.any_of("d.status", &f.status);
        w.reference("d.storage_domain_id", "storage_domains", &f.storage_domain);
        w.reference_in(
            "d.id IN (SELECT disk_id FROM disk_attachments WHERE vm_id IN {ids})",
            "vms",
            &f.vm,
        );
        if let Some(floating) = f.floating {
            w.and().push(if floating { "NOT " } else { "" }).push(
                "(EXISTS (SELECT 1 FROM disk_attachments a WHERE a.disk_id = d.id) \
                 OR EXISTS (SELECT 1 FROM template_disks t WHERE t.disk_id = d.id))",
            );
        }
    });
    order_and_page(
        &mut q,
        lq,
        |k| match k {
            DiskSort::Name => "d.name",
            DiskSort::Status => "d.status",
            DiskSort::ProvisionedSize => "d.provisioned_size",
            DiskSort::CreatedAt => "d.created_at",
        },
        "d.id",
    );
    c.all(&q).await?.iter().map(disk_from_row).collect()
}

async fn disk_update(c: &mut Conn<'_>, d: &Disk) -> Result<Disk, DbError> {
    check_disk(d)?;
    let mut q = Sql::new("UPDATE disks SET name = ");
    q.arg(d.name.as_str())
        .push(", description = ")
        .arg(d.description.as_str())
        .push(", provisioned_size = ")
        .arg(u2i("disk size", d.provisioned_size)?)
        .push(", shareable = ")
        .arg(b2i(d.shareable))
        .push(", wipe_after_delete = ")
        .arg(b2i(d.wipe_after_delete))
        .push(", disk_profile_id = ")
        .arg(Arg::Text(d.disk_profile_id.map(|p| p.to_string())))
        .push(", revision = revision + 1 WHERE id = ")
        .arg(d.id.to_string())
        .push(" AND revision = ")
        .arg(d.revision);
    if c.exec_as(&q, "disk", d.id).await? == 0 {
        let rev = d.revision;
        return Err(missing_or_conflict(c, "disks", "disk", &d.id.to_string(), || {
            format!("revision {rev} is stale")
        })
        .await);
    }
    disk_get(c, d.id)
        .await?
        .ok_or_else(|| DbError::not_found("disk", d.id))
}

/// Compare-and-set of the disk's status; `Conflict` names the status it has.
async fn disk_set_status(
    c: &mut Conn<'_>,
    id: DiskId,
    expected: &[DiskStatus],
    to: DiskStatus,
) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE disks SET status = ");
    q.arg(to.as_str())
        .push(", locked_by = NULL WHERE id = ")
        .arg(id.to_string());
    if !expected.is_empty() {
        q.push(" AND status IN (");
        for (i, s) in expected.iter().enumerate() {
            if i > 0 {
                q.push(", ");
            }
            q.arg(s.as_str());
        }
        q.push(")");
    }
    if c.exec(&q).await? == 0 {
        let now = disk_get(c, id).await?;
        return Err(match now {
            None => DbError::not_found("disk", id),
            Some(d) => DbError::Conflict {
                kind: "disk",
                id: id.to_string(),
                detail: format!("status is {}, expected one of {expected:?}", d.status),
            },
        });
    }
    Ok(())
}

/// `ok` → `locked` by `owner`; a no-op when `owner` holds it already (a retried step);
/// `Conflict` when anyone else does or the disk is not `ok`.
async fn disk_lock(c: &mut Conn<'_>, id: DiskId, owner: SagaId) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE disks SET status = 'locked', locked_by = ");
    q.arg(owner.to_string())
        .push(" WHERE id = ")
        .arg(id.to_string())
        .push(" AND (status = 'ok' OR (status = 'locked' AND locked_by = ")
        .arg(owner.to_string())
        .push("))");
    if c.exec(&q).await? == 0 {
        let now = disk_get(c, id).await?;
        return Err(match now {
            None => DbError::not_found("disk", id),
            Some(d) => DbError::Conflict {
                kind: "disk",
                id: id.to_string(),
                detail: match d.locked_by {
                    Some(o) => format!("locked by {o}"),
                    None => format!("status is {}", d.status),
                },
            },
        });
    }
    Ok(())
}

/// `locked` by `owner` → `to`. Returns whether `owner` held the lock: an undo may call it
/// whether or not its lock step got the lock, and never releases another owner's lock.
async fn disk_unlock(c: &mut Conn<'_>, id: DiskId, owner: SagaId, to: DiskStatus) -> Result<bool, DbError> {
    let mut q = Sql::new("UPDATE disks SET status = ");
    q.arg(to.as_str())
        .push(", locked_by = NULL WHERE id = ")
        .arg(id.to_string())
        .push(" AND status = 'locked' AND locked_by = ")
        .arg(owner.to_string());
    Ok(c.exec(&q).await? == 1)
}

async fn disk_set_actual_size(c: &mut Conn<'_>, id: DiskId, size: u64) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE disks SET actual_size = ");
    q.arg(u2i("disk actual size", size)?)
        .push(" WHERE id = ")
        .arg(id.to_string());
    if c.exec(&q).await? == 0 {
        return Err(DbError::not_found("disk", id));
    }
    Ok(())
}

/// Deletes the disk and its volumes; `InUse` while attached to a template or while another
/// disk's volume (a thin clone) has one of its volumes as parent.
async fn disk_delete(c: &mut Conn<'_>, id: DiskId) -> Result<(), DbError> {
    let mut q = Sql::new("DELETE FROM disks WHERE id = ");
    q.arg(id.to_string());
    if c.delete_as(&q, "disk", id).await? == 0 {
        return Err(DbError::not_found("disk", id));
    }
    Ok(())
}

// ---------------------------------------------------------------- volumes

const VOL_COLS: &str = "id, disk_id, storage_domain_id, parent_id, voltype, format, actual_size, created_at";

fn vol_from_row(r: &AnyRow) -> Result<Volume, DbError> {
    Ok(Volume {
        id: r.parse("id")?,
        disk_id: r.parse("disk_id")?,
        storage_domain_id: r.parse("storage_domain_id")?,
        parent_id: r.opt_parse("parent_id")?,
        voltype: r.parse("voltype")?,
        format: r.parse("format")?,
        actual_size: r.uint("actual_size")?,
        created_at: r.ts("created_at")?,
    })
}

async fn volume_insert(c: &mut Conn<'_>, v: &Volume) -> Result<Volume, DbError> {
    if v.parent_id == Some(v.id) {
        return Err(DbError::Invalid {
            what: "volume parent",
            detail: format!("volume {} cannot be its own parent", v.id),
        });
    }
    let mut q = Sql::new(&format!("INSERT INTO volumes ({VOL_COLS}) VALUES ("));
    q.arg(v.id.to_string())
        .push(", ")
        .arg(v.disk_id.to_string())
        .push(", ")
        .arg(v.storage_domain_id.to_string())
        .push(", ")
        .arg(Arg::Text(v.parent_id.map(|p| p.to_string())))
        .push(", ")
        .arg(v.voltype.as_str())
        .push(", ")
        .arg(v.format.as_str())
        .push(", ")
        .arg(u2i("volume size", v.actual_size)?)
        .push(", ")
        .arg(c.now.as_millis())
        .push(")");
    c.exec_as(&q, "volume", v.id).await?;
    volume_get(c, v.id)
        .await?
        .ok_or_else(|| DbError::not_found("volume", v.id))
}

async fn volume_get(c: &mut Conn<'_>, id: VolUuid) -> Result<Option<Volume>, DbError> {
    let mut q = Sql::new(&format!("SELECT {VOL_COLS} FROM volumes WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(vol_from_row).transpose()
}

/// The disk's own volumes ordered from base to leaf (following parents; a parent in another
/// disk, such as a template's, is not included).
async fn volume_chain(c: &mut Conn<'_>, disk: DiskId) -> Result<Vec<Volume>, DbError> {
    let mut q = Sql::new(&format!("SELECT {VOL_COLS} FROM volumes WHERE disk_id = "));
    q.arg(disk.to_string()).push(" ORDER BY created_at, id");
    let vols: Vec<Volume> = c
        .all(&q)
        .await?
        .iter()
        .map(vol_from_row)
        .collect::<Result<_, _>>()?;
    Ok(chain_order(vols))
}

/// One disk's volumes, base first.
fn chain_order(mut vols: Vec<Volume>) -> Vec<Volume> {
    let mut ordered = Vec::with_capacity(vols.len());
    // The base is the volume whose parent is not one of this disk's volumes.
    let ids: Vec<VolUuid> = vols.iter().map(|v| v.id).collect();
    let mut next = vols
        .iter()
        .position(|v| v.parent_id.is_none_or(|p| !ids.contains(&p)));
    while let Some(i) = next {
        let v = vols.swap_remove(i);
        let id = v.id;
        ordered.push(v);
        next = vols.iter().position(|c| c.parent_id == Some(id));
    }
    // Volumes not on the chain (a broken chain) still come back, after it.
    ordered.extend(vols);
    ordered
}

/// Every disk's volume chain, in one query (the OVF stores' bulk read).
async fn volume_chains(c: &mut Conn<'_>) -> Result<BTreeMap<DiskId, Vec<Volume>>, DbError> {
    let q = Sql::new(&format!("SELECT {VOL_COLS} FROM volumes ORDER BY created_at, id"));
    let mut by_disk: BTreeMap<DiskId, Vec<Volume>> = BTreeMap::new();
    for r in c.all(&q).await? {
        let v = vol_from_row(&r)?;
        by_disk.entry(v.disk_id).or_default().push(v);
    }
    Ok(by_disk.into_iter().map(|(d, v)| (d, chain_order(v))).collect())
}

async fn volume_set_parent(c: &mut Conn<'_>, id: VolUuid, parent: Option<VolUuid>) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE volumes SET parent_id = ");
    q.arg(Arg::Text(parent.map(|p| p.to_string())))
        .push(" WHERE id = ")
        .arg(id.to_string());
    if c.exec_as(&q, "volume", id).await? == 0 {
        return Err(DbError::not_found("volume", id));
    }
    Ok(())
}

async fn volume_set_type(c: &mut Conn<'_>, id: VolUuid, t: VolType) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE volumes SET voltype = ");
    q.arg(t.as_str()).push(" WHERE id = ").arg(id.to_string());
    if c.exec(&q).await? == 0 {
        return Err(DbError::not_found("volume", id));
    }
    Ok(())
}

/// Records disk `id` and its own volumes as living on domain `sd`. Its disk profile was the
/// old domain's: the disk leaves it (unlimited until given one of `sd`'s).
async fn disk_set_domain(c: &mut Conn<'_>, id: DiskId, sd: SdUuid) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE disks SET storage_domain_id = ");
    q.arg(sd.to_string())
        .push(", disk_profile_id = NULL, revision = revision + 1 WHERE id = ")
        .arg(id.to_string());
    if c.exec_as(&q, "disk", id).await? == 0 {
        return Err(DbError::not_found("disk", id));
    }
    let mut q = Sql::new("UPDATE volumes SET storage_domain_id = ");
    q.arg(sd.to_string())
        .push(" WHERE disk_id = ")
        .arg(id.to_string());
    c.exec(&q).await?;
    Ok(())
}

/// `InUse` while a volume has it as parent or a snapshot records it. Returns whether it
/// existed (idempotent for undo steps).
async fn volume_delete(c: &mut Conn<'_>, id: VolUuid) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM volumes WHERE id = ");
    q.arg(id.to_string());
    Ok(c.delete_as(&q, "volume", id).await? == 1)
}

repo! {
    write sd_insert(sd: &StorageDomain) -> StorageDomain = sd_insert;
    read sd_get(id: SdUuid) -> Option<StorageDomain> = sd_get;
    read sd_get_by_name(name: &str) -> Option<StorageDomain> = sd_get_by_name;
    read sd_list(q: &ListQuery<SdFilter, SdSort>) -> Vec<StorageDomain> = sd_list;
    read sd_count(f: &SdFilter) -> u64 = sd_count;
    write sd_update(sd: &StorageDomain) -> StorageDomain = sd_update;
    /// Monitoring's capacity and free space (no revision bump).
    write sd_set_space(id: SdUuid, capacity: u64, free: u64) -> () = sd_set_space;
    /// `InUse` while attached or holding disks.
    write sd_delete(id: SdUuid) -> () = sd_delete;

    /// Adds a domain to a data center's pool with a status; a data domain joins one pool only.
    write pool_attach(m: &PoolMember) -> () = pool_attach;
    /// Returns whether it was attached.
    write pool_detach(dc: DcId, sd: SdUuid) -> bool = pool_detach;
    /// The pool's domains, the master first.
    read pool_members(dc: DcId) -> Vec<PoolMember> = pool_members;
    /// The pools a domain is in (empty: unattached).
    read pool_attachments(sd: SdUuid) -> Vec<PoolMember> = pool_attachments;
    /// Compare-and-set of a domain's status in a pool; returns the old status.
    write pool_set_status(dc: DcId, sd: SdUuid, expected: &[SdStatus], to: SdStatus) -> SdStatus = pool_set_status;
    write pool_set_master(dc: DcId, sd: SdUuid) -> () = pool_set_master;
    read pool_master(dc: DcId) -> Option<SdUuid> = pool_master;

    write disk_insert(d: &Disk) -> Disk = disk_insert;
    read disk_get(id: DiskId) -> Option<Disk> = disk_get;
    read disk_list(q: &ListQuery<DiskFilter, DiskSort>) -> Vec<Disk> = disk_list;
    /// Writes name, description, size, shareable and wipe-after-delete if `revision` is current.
    write disk_update(d: &Disk) -> Disk = disk_update;
    /// Compare-and-set of the status (any when `expected` is empty).
    write disk_set_status(id: DiskId, expected: &[DiskStatus], to: DiskStatus) -> () = disk_set_status;
    /// `ok` → `locked` by `owner` (idempotent for the same owner); `Conflict` if another holds it.
    write disk_lock(id: DiskId, owner: SagaId) -> () = disk_lock;
    /// `locked` by `owner` → `to` (`ok`, or `illegal` after a failure that broke it); returns
    /// whether `owner` held it.
    write disk_unlock(id: DiskId, owner: SagaId, to: DiskStatus) -> bool = disk_unlock;
    write disk_set_actual_size(id: DiskId, size: u64) -> () = disk_set_actual_size;
    write disk_delete(id: DiskId) -> () = disk_delete;
    /// The disk and its own volumes now live on `sd` (one transaction).
    write disk_set_domain(id: DiskId, sd: SdUuid) -> () = disk_set_domain;

    write volume_insert(v: &Volume) -> Volume = volume_insert;
    read volume_get(id: VolUuid) -> Option<Volume> = volume_get;
    /// The disk's volumes from base to leaf.
    read volume_chain(disk: DiskId) -> Vec<Volume> = volume_chain;
    read volume_chains() -> BTreeMap<DiskId, Vec<Volume>> = volume_chains;
    write volume_set_parent(id: VolUuid, parent: Option<VolUuid>) -> () = volume_set_parent;
    write volume_set_type(id: VolUuid, t: VolType) -> () = volume_set_type;
    write volume_delete(id: VolUuid) -> bool = volume_delete;
}
