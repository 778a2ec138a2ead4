//! Storage QoS entries of data centers and the disk profiles of storage domains.

use sqlx::any::AnyRow;

use super::infra::check_name;
use crate::db::sql::{u2i, Arg, RowExt, Sql};
use crate::db::{Conn, DbError};
use crate::model::*;

const QOS_COLS: &str = "id, data_center_id, name, description, max_throughput, max_read_throughput, \
    max_write_throughput, max_iops, max_read_iops, max_write_iops";

fn qos_from_row(r: &AnyRow) -> Result<Qos, DbError> {
    Ok(Qos {
        id: r.parse("id")?,
        data_center_id: r.parse("data_center_id")?,
        name: r.text("name")?,
        description: r.text("description")?,
        limits: IoLimits {
            max_throughput: r.opt_uint("max_throughput")?,
            max_read_throughput: r.opt_uint("max_read_throughput")?,
            max_write_throughput: r.opt_uint("max_write_throughput")?,
            max_iops: r.opt_uint("max_iops")?,
            max_read_iops: r.opt_uint("max_read_iops")?,
            max_write_iops: r.opt_uint("max_write_iops")?,
        },
    })
}

fn limit_args(q: &mut Sql, l: &IoLimits) -> Result<(), DbError> {
    let v = |x: Option<u64>| x.map(|x| u2i("QoS limit", x)).transpose();
    q.arg(Arg::Int(v(l.max_throughput)?))
        .push(", ")
        .arg(Arg::Int(v(l.max_read_throughput)?))
        .push(", ")
        .arg(Arg::Int(v(l.max_write_throughput)?))
        .push(", ")
        .arg(Arg::Int(v(l.max_iops)?))
        .push(", ")
        .arg(Arg::Int(v(l.max_read_iops)?))
        .push(", ")
        .arg(Arg::Int(v(l.max_write_iops)?));
    Ok(())
}

async fn qos_insert(c: &mut Conn<'_>, x: &Qos) -> Result<Qos, DbError> {
    check_name("QoS name", &x.name)?;
    let mut q = Sql::new(&format!("INSERT INTO qoss ({QOS_COLS}) VALUES ("));
    q.arg(x.id.to_string())
        .push(", ")
        .arg(x.data_center_id.to_string())
        .push(", ")
        .arg(x.name.as_str())
        .push(", ")
        .arg(x.description.as_str())
        .push(", ");
    limit_args(&mut q, &x.limits)?;
    q.push(")");
    c.exec_as(&q, "QoS", &x.name).await?;
    qos_get(c, x.id)
        .await?
        .ok_or_else(|| DbError::not_found("QoS", x.id))
}

async fn qos_update(c: &mut Conn<'_>, x: &Qos) -> Result<Qos, DbError> {
    check_name("QoS name", &x.name)?;
    let mut q = Sql::new(
        "UPDATE qoss SET (name, description, max_throughput, max_read_throughput, max_write_throughput, \
         max_iops, max_read_iops, max_write_iops) = (",
    );
    q.arg(x.name.as_str())
        .push(", ")
        .arg(x.description.as_str())
        .push(", ");
    limit_args(&mut q, &x.limits)?;
    q.push(") WHERE id = ").arg(x.id.to_string());
    if c.exec_as(&q, "QoS", &x.name).await? == 0 {
        return Err(DbError::not_found("QoS", x.id));
    }
    qos_get(c, x.id)
        .await?
        .ok_or_else(|| DbError::not_found("QoS", x.id))
}

async fn qos_get(c: &mut Conn<'_>, id: QosId) -> Result<Option<Qos>, DbError> {
    let mut q = Sql::new(&format!("SELECT {QOS_COLS} FROM qoss WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(qos_from_row).transpose()
}

async fn qoss_of_dc(c: &mut Conn<'_>, dc: DcId) -> Result<Vec<Qos>, DbError> {
    let mut q = Sql::new(&format!("SELECT {QOS_COLS} FROM qoss WHERE data_center_id = "));
    q.arg(dc.to_string()).push(" ORDER BY name, id");
    c.all(&q).await?.iter().map(qos_from_row).collect()
}

/// Removes a QoS; its profiles become unlimited.
async fn qos_delete(c: &mut Conn<'_>, id: QosId) -> Result<(), DbError> {
    let mut q = Sql::new("DELETE FROM qoss WHERE id = ");
    q.arg(id.to_string());
    if c.delete_as(&q, "QoS", id).await? == 0 {
        return Err(DbError::not_found("QoS", id));
    }
    Ok(())
}

const PROFILE_COLS: &str = "id, name, description, storage_domain_id, qos_id";

fn profile_from_row(r: &AnyRow) -> Result<DiskProfile, DbError> {
    Ok(DiskProfile {
        id: r.parse("id")?,
        name: r.text("name")?,
        description: r.text("description")?,
        storage_domain_id: r.parse("storage_domain_id")?,
        qos_id: r.opt_parse("qos_id")?,
    })
}

async fn disk_profile_insert(c: &mut Conn<'_>, p: &DiskProfile) -> Result<DiskProfile, DbError> {
    check_name("disk profile name", &p.name)?;
    let mut q = Sql::new(&format!("INSERT INTO disk_profiles ({PROFILE_COLS}) VALUES ("));
    q.arg(p.id.to_string())
        .push(", ")
        .arg(p.name.as_str())
        .push(", ")
        .arg(p.description.as_str())
        .push(", ")
        .arg(p.storage_domain_id.to_string())
        .push(", ")
        .arg(Arg::Text(p.qos_id.map(|q| q.to_string())))
        .push(")");
    c.exec_as(&q, "disk profile", &p.name).await?;
    disk_profile_get(c, p.id)
        .await?
        .ok_or_else(|| DbError::not_found("disk profile", p.id))
}

async fn disk_profile_update(c: &mut Conn<'_>, p: &DiskProfile) -> Result<DiskProfile, DbError> {
    check_name("disk profile name", &p.name)?;
    let mut q = Sql::new("UPDATE disk_profiles SET name = ");
    q.arg(p.name.as_str())
        .push(", description = ")
        .arg(p.description.as_str())
        .push(", qos_id = ")
        .arg(Arg::Text(p.qos_id.map(|q| q.to_string())))
        .push(" WHERE id = ")
        .arg(p.id.to_string());
    if c.exec_as(&q, "disk profile", &p.name).await? == 0 {
        return Err(DbError::not_found("disk profile", p.id));
    }
    disk_profile_get(c, p.id)
        .await?
        .ok_or_else(|| DbError::not_found("disk profile", p.id))
}

async fn disk_profile_get(c: &mut Conn<'_>, id: DiskProfileId) -> Result<Option<DiskProfile>, DbError> {
    let mut q = Sql::new(&format!("SELECT {PROFILE_COLS} FROM disk_profiles WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(profile_from_row).transpose()
}

/// Every profile, or those of one domain.
async fn disk_profiles(c: &mut Conn<'_>, sd: Option<SdUuid>) -> Result<Vec<DiskProfile>, DbError> {
    let mut q = Sql::new(&format!("SELECT {PROFILE_COLS} FROM disk_profiles"));
    if let Some(sd) = sd {
        q.push(" WHERE storage_domain_id = ").arg(sd.to_string());
    }
    q.push(" ORDER BY name, id");
    c.all(&q).await?.iter().map(profile_from_row).collect()
}

/// Removes a profile; refused (in use) while a disk has it.
async fn disk_profile_delete(c: &mut Conn<'_>, id: DiskProfileId) -> Result<(), DbError> {
    let mut q = Sql::new("DELETE FROM disk_profiles WHERE id = ");
    q.arg(id.to_string());
    if c.delete_as(&q, "disk profile", id).await? == 0 {
        return Err(DbError::not_found("disk profile", id));
    }
    Ok(())
}

repo! {
    write qos_insert(x: &Qos) -> Qos = qos_insert;
    write qos_update(x: &Qos) -> Qos = qos_update;
    read qos_get(id: QosId) -> Option<Qos> = qos_get;
    read qoss_of_dc(dc: DcId) -> Vec<Qos> = qoss_of_dc;
    write qos_delete(id: QosId) -> () = qos_delete;
    write disk_profile_insert(p: &DiskProfile) -> DiskProfile = disk_profile_insert;
    write disk_profile_update(p: &DiskProfile) -> DiskProfile = disk_profile_update;
    read disk_profile_get(id: DiskProfileId) -> Option<DiskProfile> = disk_profile_get;
    read disk_profiles(sd: Option<SdUuid>) -> Vec<DiskProfile> = disk_profiles;
    write disk_profile_delete(id: DiskProfileId) -> () = disk_profile_delete;
}
