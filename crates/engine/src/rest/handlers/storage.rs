//! Storage domains (top level and attached to a data center) and disks.

use crate::commands::AddStorageDomain;
use crate::db::{DiskFilter, DiskSort, ListQuery, Ref, SdFilter, SdSort};
use crate::model::*;

use super::super::fault::ApiError;
use super::super::input::Elem;
use super::super::search::translate;
use super::super::write::{self, collection, href};
use super::super::{Req, Resp, API};
use super::infra::root_entity;
use super::{action_complete, check_follow, host_ref, is_async, required, run_action, sd_ref};

async fn sd(r: &Req, i: usize) -> Result<StorageDomain, ApiError> {
    let id: SdUuid = r.id(i, "storage domain")?;
    r.db()
        .sd_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("storage domain {id} not found")))
}

async fn member(r: &Req, sd: SdUuid) -> Result<Option<PoolMember>, ApiError> {
    Ok(r.db().pool_attachments(sd).await?.into_iter().next())
}

fn one_sd(
    r: &Req,
    sd: &StorageDomain,
    m: Option<&PoolMember>,
    under: Option<DcId>,
) -> super::super::out::Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::storage_domain(o, sd, m, under));
    o
}

pub async fn sd_list(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let q = translate(
        &r.search()?,
        r.list_params()?,
        "storage domains",
        |f: &mut SdFilter, c, x| {
            match c.field.as_str() {
                "name" => f.name = Some(x.text(c)?),
                "status" => f.status.push(x.value(c)?),
                "type" => f.domain_type.push(x.value(c)?),
                "storage_type" | "storage.type" => f.storage_type.push(x.value(c)?),
                _ => {
                    if let Some(d) = x.reference(c, "datacenter")? {
                        f.data_center = Some(d);
                    } else {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        },
        |k| match k {
            "name" => Some(SdSort::Name),
            "type" => Some(SdSort::DomainType),
            _ => None,
        },
    )?;
    let sds = r.db().sd_list(&q).await?;
    let mut items = Vec::with_capacity(sds.len());
    for s in sds {
        let m = member(r, s.id).await?;
        items.push((s, m));
    }
    let mut o = r.out();
    collection(
        &mut o,
        "storage_domains",
        "storage_domain",
        &items,
        |o, (s, m)| write::storage_domain(o, s, m.as_ref(), None),
    );
    Ok(Resp::ok(o))
}

pub async fn sd_get(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let s = sd(r, 0).await?;
    let m = member(r, s.id).await?;
    Ok(Resp::ok(one_sd(r, &s, m.as_ref(), None)))
}

pub async fn sd_add(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("storage_domain")?;
    let st = b
        .get("storage")
        .ok_or_else(|| ApiError::bad_request("<storage_domain> needs <storage> with <type> and <path>"))?;
    let host = match b.get("host") {
        Some(h) => host_ref(r, h).await?,
        None => {
            return Err(ApiError::bad_request(
                "<storage_domain> needs the <host> that creates it",
            ))
        }
    };
    let storage_type: StorageType = st
        .parse("type")?
        .ok_or_else(|| ApiError::bad_request("<storage> needs <type> (nfs, localfs, posixfs)"))?;
    // `<import>true</import>`: a domain that exists under the path (its name from storage
    // unless given; `<storage_domain id>` chooses among several).
    if b.bool("import")?.unwrap_or(false) {
        let want = match b.id() {
            Some(i) => Some(
                i.parse::<SdUuid>()
                    .map_err(|_| ApiError::bad_request(format!("storage domain id {i:?} is not a UUID")))?,
            ),
            None => None,
        };
        let req = AddStorageDomain {
            name: b.string("name").unwrap_or_default(),
            description: b.string("description").unwrap_or_default(),
            domain_type: SdType::Data,
            storage_type,
            address: st.string("address"),
            path: required(st, "path")?.to_string(),
            vfs_type: st.string("vfs_type"),
            mount_options: st.string("mount_options"),
            host,
        };
        let s = r
            .cmds()
            .import_storage_domain(req, want, r.correlation_id.clone())
            .await?;
        return Ok(Resp::created(
            one_sd(r, &s, None, None),
            href("storagedomains", s.id),
        ));
    }
    // Checked before anything is created; set once the domain exists.
    let mut thresholds = StorageDomain::new("", SdType::Data, storage_type, "");
    let with_thresholds = space_thresholds(&b, &mut thresholds)?;
    let req = AddStorageDomain {
        name: required(&b, "name")?.to_string(),
        description: b.string("description").unwrap_or_default(),
        domain_type: b.parse("type")?.unwrap_or(SdType::Data),
        storage_type,
        address: st.string("address"),
        path: required(st, "path")?.to_string(),
        vfs_type: st.string("vfs_type"),
        mount_options: st.string("mount_options"),
        host,
    };
    let mut s = r.cmds().add_storage_domain(req, r.correlation_id.clone()).await?;
    if with_thresholds {
        s.warning_low_space_indicator = thresholds.warning_low_space_indicator;
        s.critical_space_action_blocker = thresholds.critical_space_action_blocker;
        s = r.db().sd_update(&s).await?;
    }
    Ok(Resp::created(
        one_sd(r, &s, None, None),
        href("storagedomains", s.id),
    ))
}

/// oVirt's `<warning_low_space_indicator>` (percent, 0..100) and
/// `<critical_space_action_blocker>` (GiB) from `b` into `s`; whether either was given.
fn space_thresholds(b: &Elem, s: &mut StorageDomain) -> Result<bool, ApiError> {
    let warning: Option<u32> = b.parse("warning_low_space_indicator")?;
    let critical: Option<u32> = b.parse("critical_space_action_blocker")?;
    if let Some(w) = warning {
        if w > 100 {
            return Err(ApiError::bad_request(format!(
                "warning_low_space_indicator is a percent of the domain, 0..100, not {w}"
            )));
        }
        s.warning_low_space_indicator = w;
    }
    if let Some(c) = critical {
        s.critical_space_action_blocker = c;
    }
    Ok(warning.is_some() || critical.is_some())
}

pub async fn sd_update(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("storage_domain")?;
    let mut s = sd(r, 0).await?;
    if let Some(n) = b.str("name") {
        s.name = n.to_string();
    }
    if let Some(n) = b.get("description") {
        s.description = n.text.trim().to_string();
    }
    space_thresholds(&b, &mut s)?;
    let s = r.db().sd_update(&s).await?;
    let m = member(r, s.id).await?;
    Ok(Resp::ok(one_sd(r, &s, m.as_ref(), None)))
}

pub async fn sd_remove(r: &Req) -> Result<Resp, ApiError> {
    let s = sd(r, 0).await?;
    let destroy = r.q_bool("destroy")?.unwrap_or(false) || r.q_bool("format")?.unwrap_or(false);
    let host = match r.q("host") {
        None | Some("") => None,
        Some(h) => {
            let mut e = Elem::new("host");
            match h.parse::<HostUuid>() {
                Ok(_) => e.attrs.push(("id".into(), h.to_string())),
                Err(_) => {
                    let mut n = Elem::new("name");
                    n.text = h.to_string();
                    e.children.push(n);
                }
            }
            Some(host_ref(r, &e).await?)
        }
    };
    r.cmds().remove_storage_domain(s.id, host, destroy).await?;
    Ok(action_complete(r))
}

pub async fn sd_disks(r: &Req) -> Result<Resp, ApiError> {
    let s = sd(r, 0).await?;
    if r.q_bool("unregistered")?.unwrap_or(false) {
        let ds: Vec<Disk> = r
            .cmds()
            .unregistered_disks(s.id)
            .await?
            .into_iter()
            .map(|u| u.disk)
            .collect();
        let mut o = r.out();
        collection(&mut o, "disks", "disk", &ds, write::disk);
        return Ok(Resp::ok(o));
    }
    let mut q = disk_query(r)?;
    q.filters_mut()
        .for_each(|f| f.storage_domain = Some(Ref::Id(s.id)));
    let ds = r.db().disk_list(&q).await?;
    let mut o = r.out();
    collection(&mut o, "disks", "disk", &ds, write::disk);
    Ok(Resp::ok(o))
}

/// `POST /storagedomains/{sd}/disks?unregistered=true` with `<disk id="…"/>`: registers a disk
/// found on the domain (oVirt's register of an unregistered disk).
pub async fn sd_disk_register(r: &Req) -> Result<Resp, ApiError> {
    let s = sd(r, 0).await?;
    if !r.q_bool("unregistered")?.unwrap_or(false) {
        return Err(ApiError::bad_request(
            "disks are added under /disks; here only unregistered ones are registered \
             (unregistered=true)",
        ));
    }
    let b = r.body("disk")?;
    let id = b
        .id()
        .ok_or_else(|| ApiError::bad_request("<disk> needs the id of the unregistered disk"))?;
    let id: DiskId = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("disk id {id:?} is not a UUID")))?;
    let d = r.cmds().register_disk(s.id, id).await?;
    Ok(Resp::created(one_disk(r, &d), href("disks", d.id)))
}

/// The disk snapshots on a storage domain: per regular snapshot of every VM, each disk's
/// volume as of it, when that volume is on this domain and still there.
pub async fn sd_disk_snapshots(r: &Req) -> Result<Resp, ApiError> {
    let s = sd(r, 0).await?;
    let mut items = Vec::new();
    for v in r.db().vm_list(&ListQuery::new()).await? {
        for snap in r.db().snapshots_of_vm(v.id).await? {
            if snap.snapshot_type != SnapshotType::Regular {
                continue;
            }
            for sdisk in &snap.disks {
                let Some(vol) = r.db().volume_get(sdisk.volume_id).await? else {
                    continue;
                };
                if vol.storage_domain_id != s.id {
                    continue;
                }
                if let Some(d) = r.db().disk_get(sdisk.disk_id).await? {
                    items.push((d, vol, snap.clone()));
                }
            }
        }
    }
    let mut o = r.out();
    collection(
        &mut o,
        "disk_snapshots",
        "disk_snapshot",
        &items,
        |o, (d, v, snap)| write::disk_snapshot(o, d, v, snap, false),
    );
    Ok(Resp::ok(o))
}

// ------------------------------------------------------------- attached to a data center

async fn dc_of(r: &Req) -> Result<DataCenter, ApiError> {
    let id: DcId = r.id(0, "data center")?;
    r.db()
        .dc_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("data center {id} not found")))
}

async fn attached(r: &Req) -> Result<(DataCenter, StorageDomain, PoolMember), ApiError> {
    let dc = dc_of(r).await?;
    let s = sd(r, 1).await?;
    let m = r
        .db()
        .pool_members(dc.id)
        .await?
        .into_iter()
        .find(|m| m.storage_domain_id == s.id)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "storage domain {} is not attached to data center {}",
                s.name, dc.name
            ))
        })?;
    Ok((dc, s, m))
}

pub async fn dc_sd_list(r: &Req) -> Result<Resp, ApiError> {
    let dc = dc_of(r).await?;
    let mut items = Vec::new();
    for m in r.db().pool_members(dc.id).await? {
        if let Some(s) = r.db().sd_get(m.storage_domain_id).await? {
            items.push((s, m));
        }
    }
    items.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let mut o = r.out();
    collection(
        &mut o,
        "storage_domains",
        "storage_domain",
        &items,
        |o, (s, m)| write::storage_domain(o, s, Some(m), Some(dc.id)),
    );
    Ok(Resp::ok(o))
}

pub async fn dc_sd_get(r: &Req) -> Result<Resp, ApiError> {
    let (dc, s, m) = attached(r).await?;
    Ok(Resp::ok(one_sd(r, &s, Some(&m), Some(dc.id))))
}

pub async fn dc_sd_attach(r: &Req) -> Result<Resp, ApiError> {
    let dc = dc_of(r).await?;
    let b = r.body("storage_domain")?;
    let sd_id = sd_ref(r, &b).await?;
    let m = r
        .cmds()
        .attach_storage_domain(dc.id, sd_id, r.correlation_id.clone())
        .await?;
    r.engine.cmds.app.kick.notify_one();
    let s = r
        .db()
        .sd_get(sd_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("storage domain {sd_id} not found")))?;
    Ok(Resp::created(
        one_sd(r, &s, Some(&m), Some(dc.id)),
        format!("{API}/datacenters/{}/storagedomains/{}", dc.id, s.id),
    ))
}

pub async fn dc_sd_detach(r: &Req) -> Result<Resp, ApiError> {
    let (dc, s, _) = attached(r).await?;
    r.cmds().detach_storage_domain(dc.id, s.id).await?;
    Ok(action_complete(r))
}

pub async fn dc_sd_activate(r: &Req, up: bool) -> Result<Resp, ApiError> {
    let (dc, s, _) = attached(r).await?;
    let body = r.action_body()?;
    let (dc, sd) = (dc.id, s.id);
    run_action(
        r,
        Some(&body),
        if up { "activate" } else { "deactivate" },
        move |e| async move {
            if up {
                e.cmds.activate_storage_domain(dc, sd).await?;
            } else {
                e.cmds.deactivate_storage_domain(dc, sd).await?;
            }
            e.cmds.app.kick.notify_one();
            Ok(())
        },
    )
    .await
}

// ---------------------------------------------------------------------------------- disks

fn disk_query(r: &Req) -> Result<ListQuery<DiskFilter, DiskSort>, ApiError> {
    translate(
        &r.search()?,
        r.list_params()?,
        "disks",
        |f: &mut DiskFilter, c, x| {
            match c.field.as_str() {
                "name" | "alias" => f.name = Some(x.text(c)?),
                "status" => f.status.push(x.value(c)?),
                _ => {
                    if let Some(s) = x.reference(c, "storage")? {
                        f.storage_domain = Some(s);
                    } else if let Some(s) = x.reference(c, "storage_domain")? {
                        f.storage_domain = Some(s);
                    } else if let Some(v) = x.reference(c, "vm")? {
                        f.vm = Some(v);
                    } else if c.field == "vm_names" {
                        f.vm = Some(Ref::Name(x.text(c)?));
                    } else {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        },
        |k| match k {
            "name" | "alias" => Some(DiskSort::Name),
            "status" => Some(DiskSort::Status),
            "provisioned_size" | "size" => Some(DiskSort::ProvisionedSize),
            _ => None,
        },
    )
}

async fn disk(r: &Req, i: usize) -> Result<Disk, ApiError> {
    let id: DiskId = r.id(i, "disk")?;
    r.db()
        .disk_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("disk {id} not found")))
}

fn one_disk(r: &Req, d: &Disk) -> super::super::out::Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::disk(o, d));
    o
}

pub async fn disk_list(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let ds = r.db().disk_list(&disk_query(r)?).await?;
    let mut o = r.out();
    collection(&mut o, "disks", "disk", &ds, write::disk);
    Ok(Resp::ok(o))
}

pub async fn disk_get(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let d = disk(r, 0).await?;
    Ok(Resp::ok(one_disk(r, &d)))
}

/// The parameters of a new disk from a `<disk>` element.
pub async fn new_disk(r: &Req, b: &Elem) -> Result<crate::commands::AddDisk, ApiError> {
    let sd_elem = b
        .get("storage_domains")
        .and_then(|s| s.child("storage_domain"))
        .or_else(|| b.get("storage_domain"))
        .ok_or_else(|| {
            ApiError::bad_request("<disk> needs <storage_domains><storage_domain> for its volumes")
        })?;
    let storage_domain = sd_ref(r, sd_elem).await?;
    let name = b
        .str("name")
        .or_else(|| b.str("alias"))
        .ok_or_else(|| ApiError::bad_request("<disk> needs <name> (or <alias>)"))?
        .to_string();
    let provisioned_size = b
        .u64("provisioned_size")?
        .or(b.u64("size")?)
        .ok_or_else(|| ApiError::bad_request("<disk> needs <provisioned_size> in bytes"))?;
    let format: DiskFormat = b.parse("format")?.unwrap_or(DiskFormat::Cow);
    Ok(crate::commands::AddDisk {
        name,
        description: b.string("description").unwrap_or_default(),
        storage_domain,
        provisioned_size,
        format,
        sparse: b.bool("sparse")?.unwrap_or(format == DiskFormat::Cow),
        shareable: b.bool("shareable")?.unwrap_or(false),
        content_type: b.parse("content_type")?.unwrap_or(DiskContentType::Data),
        attach_to: None,
        disk_profile: super::qos::disk_profile_of(b)?.flatten(),
    })
}

pub async fn disk_add(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("disk")?;
    let req = new_disk(r, &b).await?;
    let d = r.adding().add_disk(req, r.correlation_id.clone()).await?;
    Ok(Resp::added(one_disk(r, &d), href("disks", d.id), d.pending))
}

pub async fn disk_update(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("disk")?;
    let mut d = disk(r, 0).await?;
    // Everything parsed before anything changes.
    let (shareable, wipe) = (b.bool("shareable")?, b.bool("wipe_after_delete")?);
    let size = b.u64("provisioned_size")?;
    let profile = super::qos::disk_profile_of(&b)?;
    // A bigger provisioned_size extends the disk (first: when it fails nothing changed).
    if let Some(size) = size.filter(|s| *s != d.provisioned_size) {
        d = r.cmds().extend_disk(d.id, size, r.correlation_id.clone()).await?;
    }
    if let Some(n) = b.str("name").or_else(|| b.str("alias")) {
        d.name = n.to_string();
    }
    if let Some(n) = b.get("description") {
        d.description = n.text.trim().to_string();
    }
    if let Some(s) = shareable {
        d.shareable = s;
    }
    if let Some(w) = wipe {
        d.wipe_after_delete = w;
    }
    let mut d = r.db().disk_update(&d).await?;
    // A new profile last: a running VM gets its limits at once.
    if let Some(p) = profile.filter(|p| *p != d.disk_profile_id) {
        d = r.cmds().set_disk_profile(d.id, p).await?;
    }
    Ok(Resp::ok(one_disk(r, &d)))
}

/// The `<storage_domain>` a disk action sends the disk to.
async fn destination(r: &Req, body: &Elem) -> Result<SdUuid, ApiError> {
    let to = body
        .get("storage_domain")
        .ok_or_else(|| ApiError::bad_request("the action needs <storage_domain id=\"…\"/>"))?;
    sd_ref(r, to).await
}

/// `POST /disks/{id}/move` with `<action><storage_domain id="…"/></action>` (or by name).
pub async fn disk_move(r: &Req) -> Result<Resp, ApiError> {
    let d = disk(r, 0).await?;
    let body = r.action_body()?;
    let dst = destination(r, &body).await?;
    let (id, corr) = (d.id, r.correlation_id.clone());
    run_action(r, Some(&body), "move disk", move |e| async move {
        e.cmds.move_disk(id, dst, corr).await?;
        Ok(())
    })
    .await
}

/// `POST /disks/{id}/copy` with `<action><storage_domain …/><disk><alias>…</alias></disk></action>`
/// (the name optional: oVirt's "<name>_Copy"). The reply names the new disk.
pub async fn disk_copy(r: &Req) -> Result<Resp, ApiError> {
    let d = disk(r, 0).await?;
    let body = r.action_body()?;
    let dst = destination(r, &body).await?;
    let name = body
        .get("disk")
        .and_then(|e| e.str("alias").or_else(|| e.str("name")))
        .map(str::to_string);
    let (id, corr) = (d.id, r.correlation_id.clone());
    if is_async(r, Some(&body))? {
        return run_action(r, Some(&body), "copy disk", move |e| async move {
            e.cmds.copy_disk(id, dst, name, corr).await?;
            Ok(())
        })
        .await;
    }
    let copy = r.cmds().copy_disk(id, dst, name, corr).await?;
    let mut o = r.out();
    o.root("action", None, None);
    o.reference("disk", &copy.id.to_string(), &href("disks", copy.id));
    o.leaf("status", "complete");
    o.close("action");
    Ok(Resp::ok(o))
}

pub async fn disk_remove(r: &Req) -> Result<Resp, ApiError> {
    let d = disk(r, 0).await?;
    let id = d.id;
    let corr = r.correlation_id.clone();
    super::vms::run_remove(r, "remove disk", move |e| async move {
        e.cmds.remove_disk(id, corr).await?;
        Ok(())
    })
    .await
}

// ------------------------------------------------------------------------- image transfers

async fn transfer(r: &Req, i: usize) -> Result<ImageTransfer, ApiError> {
    let id: TransferId = r.id(i, "image transfer")?;
    r.db()
        .transfer_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("image transfer {id} not found")))
}

fn one_transfer(r: &Req, t: &ImageTransfer) -> super::super::out::Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::image_transfer(o, t));
    o
}

pub async fn transfer_list(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let mut ts = r.db().transfer_list().await?;
    if let Some(max) = r.list_params()?.max {
        ts.truncate(max as usize);
    }
    let mut o = r.out();
    collection(
        &mut o,
        "image_transfers",
        "image_transfer",
        &ts,
        write::image_transfer,
    );
    Ok(Resp::ok(o))
}

pub async fn transfer_get(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let t = transfer(r, 0).await?;
    Ok(Resp::ok(one_transfer(r, &t)))
}

/// `POST /imagetransfers` with `<image_transfer><disk id/><direction/>…</image_transfer>`
/// (`<image id>` names the disk too, as older clients send it).
pub async fn transfer_add(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("image_transfer")?;
    if b.get("backup").is_some() {
        return Err(ApiError::bad_request(
            "image transfers of backups are refused: transfer a disk (<disk id>) or a disk snapshot (<snapshot id>)",
        ));
    }
    // A disk snapshot (`<snapshot id>`, its volume) names its disk.
    let snapshot = match b.get("snapshot") {
        Some(s) => {
            let id: VolUuid = super::parse_id(
                s.id()
                    .ok_or_else(|| ApiError::bad_request("<image_transfer><snapshot> needs an id"))?,
                "disk snapshot",
            )?;
            let vol = r
                .db()
                .volume_get(id)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("disk snapshot {id} not found")))?;
            Some(vol)
        }
        None => None,
    };
    let disk: DiskId = match (b.get("disk").or_else(|| b.get("image")), &snapshot) {
        (Some(e), _) => super::parse_id(
            e.id()
                .ok_or_else(|| ApiError::bad_request("<image_transfer><disk> needs an id"))?,
            "disk",
        )?,
        (None, Some(v)) => v.disk_id,
        (None, None) => {
            return Err(ApiError::bad_request(
                "<image_transfer> needs <disk id=\"…\"/> (or <snapshot id=\"…\"/>, a disk snapshot)",
            ))
        }
    };
    if let Some(v) = snapshot.as_ref().filter(|v| v.disk_id != disk) {
        return Err(ApiError::bad_request(format!(
            "disk snapshot {} is not of disk {disk}",
            v.id
        )));
    }
    let direction: TransferDirection = b.parse("direction")?.unwrap_or(TransferDirection::Upload);
    let host = match b.get("host") {
        Some(h) => Some(host_ref(r, h).await?),
        None => None,
    };
    let req = crate::commands::AddImageTransfer {
        disk,
        snapshot: snapshot.map(|v| v.id),
        direction,
        host,
        format: b.parse("format")?,
        inactivity_timeout: b.u64("inactivity_timeout")?,
    };
    let t = r.cmds().add_image_transfer(req, r.correlation_id.clone()).await?;
    Ok(Resp::added(
        one_transfer(r, &t),
        href("imagetransfers", t.id),
        false,
    ))
}

pub async fn transfer_finalize(r: &Req) -> Result<Resp, ApiError> {
    let t = transfer(r, 0).await?;
    let _ = r.action_body()?;
    r.cmds().finalize_image_transfer(t.id).await?;
    Ok(action_complete(r))
}

pub async fn transfer_cancel(r: &Req) -> Result<Resp, ApiError> {
    let t = transfer(r, 0).await?;
    let _ = r.action_body()?;
    r.cmds().cancel_image_transfer(t.id).await?;
    Ok(action_complete(r))
}
