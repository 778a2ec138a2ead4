//! Storage QoS (`/datacenters/{dc}/qoss`, type storage only) and disk profiles
//! (`/diskprofiles`, `/storagedomains/{sd}/diskprofiles`), as oVirt's `QossService` and
//! `DiskProfilesService` serve them. Limits are MB/s and IOPS; an absent or 0 limit is none.

use crate::commands::{UpdateDiskProfile, UpdateQos};
use crate::model::*;

use super::super::fault::ApiError;
use super::super::input::Elem;
use super::super::out::Out;
use super::super::write::{self, collection, href};
use super::super::{Req, Resp, API};
use super::infra::root_entity;
use super::{action_complete, check_follow, parse_id, required, sd_ref};

async fn dc_id(r: &Req) -> Result<DcId, ApiError> {
    let id: DcId = r.id(0, "data center")?;
    r.db()
        .dc_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("data center {id} not found")))?;
    Ok(id)
}

async fn qos(r: &Req) -> Result<Qos, ApiError> {
    let dc = dc_id(r).await?;
    let id: QosId = r.id(1, "QoS")?;
    r.db()
        .qos_get(id)
        .await?
        .filter(|q| q.data_center_id == dc)
        .ok_or_else(|| ApiError::not_found(format!("QoS {id} not found in data center {dc}")))
}

fn one_qos(r: &Req, q: &Qos) -> Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::qos(o, q));
    o
}

/// The limits in `b` over `base`: only storage QoS is served.
fn limits_of(b: &Elem, base: IoLimits) -> Result<IoLimits, ApiError> {
    if let Some(t) = b.str("type") {
        if t != "storage" {
            return Err(ApiError::bad_request(format!(
                "QoS type {t} is not served: oxvirt has storage QoS (disk profiles) only"
            )));
        }
    }
    let n = |name: &str, old: Option<u64>| -> Result<Option<u64>, ApiError> {
        Ok(match b.u64(name)? {
            Some(0) => None,
            Some(v) => Some(v),
            None => old,
        })
    };
    Ok(IoLimits {
        max_throughput: n("max_throughput", base.max_throughput)?,
        max_read_throughput: n("max_read_throughput", base.max_read_throughput)?,
        max_write_throughput: n("max_write_throughput", base.max_write_throughput)?,
        max_iops: n("max_iops", base.max_iops)?,
        max_read_iops: n("max_read_iops", base.max_read_iops)?,
        max_write_iops: n("max_write_iops", base.max_write_iops)?,
    })
}

pub async fn qos_list(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let dc = dc_id(r).await?;
    let qs = r.db().qoss_of_dc(dc).await?;
    let mut o = r.out();
    collection(&mut o, "qoss", "qos", &qs, write::qos);
    Ok(Resp::ok(o))
}

pub async fn qos_add(r: &Req) -> Result<Resp, ApiError> {
    let dc = dc_id(r).await?;
    let b = r.body("qos")?;
    if b.str("type").is_none() {
        return Err(ApiError::bad_request("<qos> needs <type>storage</type>"));
    }
    let limits = limits_of(&b, IoLimits::default())?;
    let q = r
        .cmds()
        .add_qos(
            dc,
            required(&b, "name")?,
            &b.string("description").unwrap_or_default(),
            limits,
        )
        .await?;
    Ok(Resp::created(
        one_qos(r, &q),
        format!("{API}/datacenters/{dc}/qoss/{}", q.id),
    ))
}

pub async fn qos_get(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let q = qos(r).await?;
    Ok(Resp::ok(one_qos(r, &q)))
}

pub async fn qos_update(r: &Req) -> Result<Resp, ApiError> {
    let q = qos(r).await?;
    let b = r.body("qos")?;
    let limits = limits_of(&b, q.limits)?;
    let q = r
        .cmds()
        .update_qos(
            q.id,
            UpdateQos {
                name: b.string("name"),
                description: b.get("description").map(|d| d.text.trim().to_string()),
                limits: Some(limits),
            },
        )
        .await?;
    Ok(Resp::ok(one_qos(r, &q)))
}

pub async fn qos_remove(r: &Req) -> Result<Resp, ApiError> {
    let q = qos(r).await?;
    r.cmds().remove_qos(q.id).await?;
    Ok(action_complete(r))
}

// ------------------------------------------------------------------------- disk profiles

async fn profile(r: &Req, i: usize) -> Result<DiskProfile, ApiError> {
    let id: DiskProfileId = r.id(i, "disk profile")?;
    r.db()
        .disk_profile_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("disk profile {id} not found")))
}

fn one_profile(r: &Req, p: &DiskProfile) -> Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::disk_profile(o, p));
    o
}

/// `<qos id="…"/>`: that QoS; `<qos/>`: none.
fn qos_of(b: &Elem) -> Result<Option<Option<QosId>>, ApiError> {
    match b.get("qos") {
        None => Ok(None),
        Some(q) => match q.id() {
            Some(id) => Ok(Some(Some(parse_id(id, "QoS")?))),
            None => Ok(Some(None)),
        },
    }
}

pub async fn profile_list(r: &Req, of_sd: bool) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let sd = if of_sd {
        let id: SdUuid = r.id(0, "storage domain")?;
        r.db()
            .sd_get(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("storage domain {id} not found")))?;
        Some(id)
    } else {
        None
    };
    let ps = r.db().disk_profiles(sd).await?;
    let mut o = r.out();
    collection(&mut o, "disk_profiles", "disk_profile", &ps, write::disk_profile);
    Ok(Resp::ok(o))
}

pub async fn profile_add(r: &Req, of_sd: bool) -> Result<Resp, ApiError> {
    let b = r.body("disk_profile")?;
    let sd = if of_sd {
        r.id(0, "storage domain")?
    } else {
        let e = b
            .get("storage_domain")
            .ok_or_else(|| ApiError::bad_request("<disk_profile> needs <storage_domain>"))?;
        sd_ref(r, e).await?
    };
    let p = r
        .cmds()
        .add_disk_profile(
            sd,
            required(&b, "name")?,
            &b.string("description").unwrap_or_default(),
            qos_of(&b)?.flatten(),
        )
        .await?;
    Ok(Resp::created(one_profile(r, &p), href("diskprofiles", p.id)))
}

pub async fn profile_get(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let p = profile(r, 0).await?;
    Ok(Resp::ok(one_profile(r, &p)))
}

pub async fn profile_update(r: &Req) -> Result<Resp, ApiError> {
    let p = profile(r, 0).await?;
    let b = r.body("disk_profile")?;
    let p = r
        .cmds()
        .update_disk_profile(
            p.id,
            UpdateDiskProfile {
                name: b.string("name"),
                description: b.get("description").map(|d| d.text.trim().to_string()),
                qos: qos_of(&b)?,
            },
        )
        .await?;
    Ok(Resp::ok(one_profile(r, &p)))
}

pub async fn profile_remove(r: &Req) -> Result<Resp, ApiError> {
    let p = profile(r, 0).await?;
    r.cmds().remove_disk_profile(p.id).await?;
    Ok(action_complete(r))
}

/// A disk body's `<disk_profile id="…"/>` (`Some(None)`: `<disk_profile/>`, none).
pub fn disk_profile_of(b: &Elem) -> Result<Option<Option<DiskProfileId>>, ApiError> {
    match b.get("disk_profile") {
        None => Ok(None),
        Some(p) => match p.id() {
            Some(id) => Ok(Some(Some(parse_id(id, "disk profile")?))),
            None => Ok(Some(None)),
        },
    }
}
