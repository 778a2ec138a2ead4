//! OVF stores and the unregistered entities an attached domain's stores describe.

use sqlx::any::AnyRow;

use crate::db::sql::{Arg, RowExt, Sql};
use crate::db::{Conn, DbError};
use crate::model::*;
use crate::time::Timestamp;

const STORE_COLS: &str = "disk_id, storage_domain_id, volume_id, ready, updated_at, entity_hashes";

fn store_from_row(r: &AnyRow) -> Result<OvfStore, DbError> {
    Ok(OvfStore {
        disk_id: r.parse("disk_id")?,
        storage_domain_id: r.parse("storage_domain_id")?,
        volume_id: r.parse("volume_id")?,
        ready: r.flag("ready")?,
        updated_at: r.opt_ts("updated_at")?,
        entity_hashes: r.opt_text("entity_hashes")?,
    })
}

async fn ovf_store_insert(c: &mut Conn<'_>, s: &OvfStore) -> Result<(), DbError> {
    let mut q = Sql::new(&format!("INSERT INTO ovf_stores ({STORE_COLS}) VALUES ("));
    q.arg(s.disk_id.to_string())
        .push(", ")
        .arg(s.storage_domain_id.to_string())
        .push(", ")
        .arg(s.volume_id.to_string())
        .push(", ")
        .arg(i64::from(s.ready))
        .push(", ")
        .arg(Arg::Int(s.updated_at.map(Timestamp::as_millis)))
        .push(", ")
        .arg(Arg::Text(s.entity_hashes.clone()))
        .push(")");
    c.exec_as(&q, "OVF store", s.disk_id).await?;
    Ok(())
}

/// The domain's stores, the one written longest ago (or never) first: the next to write.
async fn ovf_stores_of(c: &mut Conn<'_>, sd: SdUuid) -> Result<Vec<OvfStore>, DbError> {
    let mut q = Sql::new(&format!(
        "SELECT {STORE_COLS} FROM ovf_stores WHERE storage_domain_id = "
    ));
    q.arg(sd.to_string())
        .push(" ORDER BY COALESCE(updated_at, -1), disk_id");
    c.all(&q).await?.iter().map(store_from_row).collect()
}

async fn ovf_store_ready(c: &mut Conn<'_>, disk: DiskId) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE ovf_stores SET ready = 1 WHERE disk_id = ");
    q.arg(disk.to_string());
    c.exec(&q).await?;
    Ok(())
}

/// Records a complete write of OVFs with `hashes` into the store, now; `None` marks it being
/// written.
async fn ovf_store_written(c: &mut Conn<'_>, disk: DiskId, hashes: Option<&str>) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE ovf_stores SET entity_hashes = ");
    q.arg(Arg::Text(hashes.map(str::to_string)));
    if hashes.is_some() {
        q.push(", updated_at = ").arg(c.now.as_millis());
    }
    q.push(" WHERE disk_id = ").arg(disk.to_string());
    c.exec(&q).await?;
    Ok(())
}

async fn ovf_store_delete(c: &mut Conn<'_>, disk: DiskId) -> Result<(), DbError> {
    let mut q = Sql::new("DELETE FROM ovf_stores WHERE disk_id = ");
    q.arg(disk.to_string());
    c.exec(&q).await?;
    Ok(())
}

/// Forgets the domain's stores and unregistered entities (it leaves the data center; storage
/// keeps both).
async fn ovf_forget_domain(c: &mut Conn<'_>, sd: SdUuid) -> Result<(), DbError> {
    for table in ["ovf_stores", "unregistered_ovfs"] {
        let mut q = Sql::new(&format!("DELETE FROM {table} WHERE storage_domain_id = "));
        q.arg(sd.to_string());
        c.exec(&q).await?;
    }
    Ok(())
}

const UNREG_COLS: &str = "entity_id, storage_domain_id, entity_type, name, ovf, vm_status";

fn unreg_from_row(r: &AnyRow) -> Result<UnregisteredOvf, DbError> {
    Ok(UnregisteredOvf {
        entity_id: r.parse("entity_id")?,
        storage_domain_id: r.parse("storage_domain_id")?,
        entity_type: r.parse("entity_type")?,
        name: r.text("name")?,
        ovf: r.text("ovf")?,
        vm_status: r.opt_int("vm_status")?.and_then(|s| i32::try_from(s).ok()),
    })
}

/// Records (or replaces) an unregistered entity of a domain.
async fn unregistered_ovf_put(c: &mut Conn<'_>, u: &UnregisteredOvf) -> Result<(), DbError> {
    unregistered_ovf_remove(c, u.storage_domain_id, u.entity_id).await?;
    let mut q = Sql::new(&format!("INSERT INTO unregistered_ovfs ({UNREG_COLS}) VALUES ("));
    q.arg(u.entity_id.to_string())
        .push(", ")
        .arg(u.storage_domain_id.to_string())
        .push(", ")
        .arg(u.entity_type.as_str())
        .push(", ")
        .arg(u.name.as_str())
        .push(", ")
        .arg(u.ovf.as_str())
        .push(", ")
        .arg(Arg::Int(u.vm_status.map(i64::from)))
        .push(")");
    c.exec_as(&q, "unregistered OVF", u.entity_id).await?;
    Ok(())
}

/// A domain's unregistered entities of `kind` (all kinds with `None`), by name.
async fn unregistered_ovfs(
    c: &mut Conn<'_>,
    sd: SdUuid,
    kind: Option<OvfEntityType>,
) -> Result<Vec<UnregisteredOvf>, DbError> {
    let mut q = Sql::new(&format!(
        "SELECT {UNREG_COLS} FROM unregistered_ovfs WHERE storage_domain_id = "
    ));
    q.arg(sd.to_string());
    if let Some(k) = kind {
        q.push(" AND entity_type = ").arg(k.as_str());
    }
    q.push(" ORDER BY name, entity_id");
    c.all(&q).await?.iter().map(unreg_from_row).collect()
}

async fn unregistered_ovf_remove(c: &mut Conn<'_>, sd: SdUuid, id: uuid::Uuid) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM unregistered_ovfs WHERE storage_domain_id = ");
    q.arg(sd.to_string())
        .push(" AND entity_id = ")
        .arg(id.to_string());
    Ok(c.exec(&q).await? > 0)
}

repo! {
    write ovf_store_insert(s: &OvfStore) -> () = ovf_store_insert;
    read ovf_stores_of(sd: SdUuid) -> Vec<OvfStore> = ovf_stores_of;
    write ovf_store_ready(disk: DiskId) -> () = ovf_store_ready;
    write ovf_store_written(disk: DiskId, hashes: Option<&str>) -> () = ovf_store_written;
    write ovf_store_delete(disk: DiskId) -> () = ovf_store_delete;
    write ovf_forget_domain(sd: SdUuid) -> () = ovf_forget_domain;
    write unregistered_ovf_put(u: &UnregisteredOvf) -> () = unregistered_ovf_put;
    read unregistered_ovfs(sd: SdUuid, kind: Option<OvfEntityType>) -> Vec<UnregisteredOvf> = unregistered_ovfs;
    write unregistered_ovf_remove(sd: SdUuid, id: uuid::Uuid) -> bool = unregistered_ovf_remove;
}
