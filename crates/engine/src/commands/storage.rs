//! Storage domains, the pool, and disks.
//!
//! Adding a domain creates it on storage through any up host; attaching the first domain to a
//! data center creates its pool with that domain as master. Connecting hosts to the pool and
//! electing the SPM is the monitor's continuous job ([`crate::monitor`]), so a command returns
//! once storage and the database agree, and the domain turns `active` when the pool is served.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::app::App;
use crate::db::{ListQuery, Ref, VmFilter};
use crate::model::{
    DataCenter, DcId, DcStatus, Disk, DiskContentType, DiskFormat, DiskId, DiskStatus, Host, HostStatus,
    HostUuid, NewEvent, PoolMember, SdStatus, SdType, SdUuid, Severity, SpmStatus, StorageDomain,
    StorageType, VmId, VolType, VolUuid, Volume,
};
use crate::nodes::NodeClient;
use crate::saga::{SagaDef, Step, StepCtx, StepError};

use super::step_err;
use super::{Added, CommandError, Commands};

/// The largest disk (the storage's limit on a volume's capacity, 1 PiB).
const MAX_DISK_SIZE: u64 = 1 << 50;

/// Node error codes this module reacts to (see `oxvirt_types::api::ErrorCode`).
const CODE_DOMAIN_NOT_FOUND: i64 = 358;
const CODE_IMAGE_NOT_FOUND: i64 = oxvirt_types::api::ErrorCode::ImageNotFound.code();
const CODE_SPM_BUSY: i64 = oxvirt_types::api::ErrorCode::SpmBusy.code();

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddStorageDomain {
    pub name: String,
    pub description: String,
    pub domain_type: SdType,
    pub storage_type: StorageType,
    /// NFS server (nfs only).
    pub address: Option<String>,
    pub path: String,
    pub vfs_type: Option<String>,
    pub mount_options: Option<String>,
    /// The host that creates it.
    pub host: HostUuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddDisk {
    pub name: String,
    pub description: String,
    pub storage_domain: SdUuid,
    pub provisioned_size: u64,
    pub format: DiskFormat,
    pub sparse: bool,
    pub shareable: bool,
    /// `iso`: an ISO image for CD-ROMs (raw, never attached as a disk).
    #[serde(default = "data_content")]
    pub content_type: DiskContentType,
    /// Attach to this VM once created.
    pub attach_to: Option<super::AddVmDisk>,
    /// A disk profile of `storage_domain` (its storage QoS); none: unlimited.
    #[serde(default)]
    pub disk_profile: Option<crate::model::DiskProfileId>,
}

fn data_content() -> DiskContentType {
    DiskContentType::Data
}

/// The storage server connection a node needs for a domain.
pub(crate) fn connection_params(sd: &StorageDomain) -> Value {
    let path = match (sd.storage_type, &sd.address) {
        (StorageType::Nfs, Some(a)) => format!("{a}:{}", sd.path),
        _ => sd.path.clone(),
    };
    json!({
        "id": App::connection_id(sd.id),
        "kind": sd.storage_type.as_str(),
        "path": path,
        "vfsType": sd.vfs_type,
        "mountOptions": sd.mount_options,
    })
}

/// Connects a host to the storage servers of `domains`; fails on the first refusal.
pub(crate) async fn connect_storage(c: &NodeClient, domains: &[StorageDomain]) -> Result<(), CommandError> {
    if domains.is_empty() {
        return Ok(());
    }
    let conns: Vec<Value> = domains.iter().map(connection_params).collect();
    let r = c
        .call(
            "StoragePool.connectStorageServer",
            json!({ "connectionParams": conns }),
        )
        .await?;
    for s in r["statuslist"].as_array().into_iter().flatten() {
        if s["status"] != 0 {
            return Err(CommandError::Conflict(format!(
                "host {} cannot connect storage {}: {}",
                c.name,
                s["id"],
                s["message"].as_str().unwrap_or("refused")
            )));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Add a storage domain.

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddStorageDomainParams {
    pub sd: SdUuid,
    pub req: AddStorageDomain,
    /// The domain exists on storage (an import): checked, never created, never formatted.
    #[serde(default)]
    pub import: bool,
}

pub struct AddStorageDomainSaga;

impl AddStorageDomainSaga {
    fn domain(p: &AddStorageDomainParams) -> StorageDomain {
        domain_record(p.sd, &p.req)
    }
}

/// oVirt's `isDomainWithinThresholds` and space checks before something takes space on `sd`:
/// refused (`action` says what) when the domain's monitored free space is under its
/// `critical_space_action_blocker` or under `needed` bytes. A domain not yet monitored passes,
/// as in oVirt; the node still fails cleanly if the space is not there.
pub(crate) async fn check_space(
    app: &App,
    sd: SdUuid,
    needed: u64,
    action: &str,
) -> Result<(), CommandError> {
    let d = app
        .db
        .sd_get(sd)
        .await?
        .ok_or_else(|| CommandError::not_found("storage domain", sd))?;
    let Some(free) = d.free_bytes else {
        return Ok(());
    };
    let critical = u64::from(d.critical_space_action_blocker) << 30;
    if free < critical || free < needed {
        let why = if free < critical {
            format!(
                "the domain's critical_space_action_blocker is {} GB",
                d.critical_space_action_blocker
            )
        } else {
            format!("{} MiB needed", needed.div_ceil(1 << 20))
        };
        return Err(CommandError::Conflict(format!(
            "Cannot {action}. Low disk space on Storage Domain {}: {} GB free, {why}.",
            d.name,
            free >> 30
        )));
    }
    Ok(())
}

/// A disk's base volume DESCRIPTION as oVirt writes it (`{"DiskAlias":…,"DiskDescription":…}`),
/// so that an engine importing the domain finds the disk's name: within VDSM's 210 bytes, the
/// description shortened first.
pub(crate) fn volume_description(alias: &str, description: &str) -> String {
    const LIMIT: usize = 210;
    let make = |d: &str| json!({ "DiskAlias": alias, "DiskDescription": d }).to_string();
    let mut d: String = description.chars().filter(|c| !c.is_control()).collect();
    loop {
        let text = make(&d);
        if text.len() <= LIMIT {
            return text;
        }
        if d.pop().is_none() {
            // The alias alone is too long for the JSON form: the bare alias, cut.
            let mut a: String = alias.chars().filter(|c| !c.is_control()).collect();
            while a.len() > LIMIT {
                a.pop();
            }
            return a;
        }
    }
}

/// The record of domain `id` as `req` describes it.
fn domain_record(id: SdUuid, req: &AddStorageDomain) -> StorageDomain {
    let mut sd = StorageDomain::new(&req.name, req.domain_type, req.storage_type, &req.path);
    sd.id = id;
    sd.description = req.description.clone();
    sd.address = req.address.clone();
    sd.vfs_type = req.vfs_type.clone();
    sd.mount_options = req.mount_options.clone();
    sd
}

/// Whether storage says domain `info` (`StorageDomain.getInfo`) can be imported as a data
/// domain: an error naming what stops it.
fn importable(sd: SdUuid, info: &Value) -> Result<(), CommandError> {
    let name = info["name"].as_str().unwrap_or_default();
    if !info["class"]
        .as_str()
        .is_some_and(|c| c.eq_ignore_ascii_case("data"))
    {
        return Err(CommandError::invalid(format!(
            "storage domain {sd} ({name}) is of class {}: only data domains are imported",
            info["class"]
        )));
    }
    // A domain still in another pool is imported all the same (a disaster recovery: that data
    // center is gone); attaching it takes it over, which storage allows only once that pool's
    // hosts have stopped renewing their leases on it (see `take_over`).
    if let Some(p) = info["pool"].as_array().and_then(|p| p.first()) {
        tracing::warn!(sd = %sd, name, pool = %p, "importing a storage domain that names another pool");
    }
    Ok(())
}

/// A domain whose metadata still names another pool (its data center died without detaching
/// it: a disaster recovery) is taken out of that pool first, through `node`, which refuses
/// while the other pool's hosts renew their leases on the domain and waits out a dead SPM's
/// (the node's `StoragePool.forcedDetachStorageDomain`). Nothing to do for an unattached domain.
async fn take_over(
    app: &App,
    node: &NodeClient,
    host: HostUuid,
    dc: &DataCenter,
    sd: SdUuid,
) -> Result<(), StepError> {
    let info = node
        .call("StorageDomain.getInfo", json!({ "sdUUID": sd }))
        .await
        .map_err(step_err)?;
    let ours = dc.storage_pool_id.to_string();
    let foreign: Vec<&str> = info["pool"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|p| *p != ours)
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    tracing::warn!(sd = %sd, pools = ?foreign, "taking the storage domain over from another pool");
    let host_id = app.lockspace_id(dc.id, host).await.map_err(step_err)?;
    let s = &app.settings;
    let args = json!({
        "sdUUID": sd, "hostID": host_id.get(),
        "ioTimeout": s.io_timeout.as_secs_f64(), "fenceMargin": s.fence_margin.as_secs_f64(),
    });
    // The other pool's slowest renewal and a dead SPM's 8N + M, with their N unknown here.
    let bound = (s.io_timeout.max(Duration::from_secs(10)) * 20) + s.fence_margin;
    node.run_job("StoragePool.forcedDetachStorageDomain", args, bound)
        .await
        .map_err(step_err)?;
    Ok(())
}

async fn host_client(app: &App, id: HostUuid) -> Result<(Host, NodeClient), StepError> {
    let h = app.host(id).await.map_err(step_err)?;
    let c = app.client(&h).map_err(step_err)?;
    Ok((h, c))
}

impl SagaDef for AddStorageDomainSaga {
    type Ctx = App;
    type Params = AddStorageDomainParams;
    const NAME: &'static str = "add_storage_domain";

    fn description(p: &Self::Params) -> String {
        format!("Adding storage domain {}", p.req.name)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "connect",
                |c: StepCtx<Self>| async move {
                    let (_, node) = host_client(c.app(), c.params().req.host).await?;
                    connect_storage(&node, &[Self::domain(c.params())])
                        .await
                        .map_err(step_err)
                },
                |c: StepCtx<Self>| async move {
                    let (_, node) = host_client(c.app(), c.params().req.host).await?;
                    let id = App::connection_id(c.params().sd);
                    node.call(
                        "StoragePool.disconnectStorageServer",
                        json!({ "connectionIDs": [id] }),
                    )
                    .await
                    .map_err(step_err)?;
                    Ok(())
                },
            )
            .describe("Connecting the host to the storage"),
            Step::new(
                "create",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let (_, node) = host_client(c.app(), p.req.host).await?;
                    if p.import {
                        let info = node
                            .call("StorageDomain.getInfo", json!({ "sdUUID": p.sd }))
                            .await
                            .map_err(step_err)?;
                        return importable(p.sd, &info).map_err(step_err);
                    }
                    let r = node
                        .call(
                            "StorageDomain.create",
                            json!({
                                "sdUUID": p.sd, "connectionID": App::connection_id(p.sd),
                                "description": p.req.name, "storageType": p.req.storage_type.as_str(),
                            }),
                        )
                        .await;
                    match r {
                        Ok(_) => Ok(()),
                        // Re-run after a crash: the domain we created is there already.
                        Err(e)
                            if node
                                .call("StorageDomain.getInfo", json!({ "sdUUID": p.sd }))
                                .await
                                .is_ok_and(|i| i["name"] == json!(p.req.name)) =>
                        {
                            tracing::info!(sd = %p.sd, error = %e, "storage domain already created");
                            Ok(())
                        }
                        Err(e) => Err(step_err(e)),
                    }
                },
                |c: StepCtx<Self>| async move {
                    if c.params().import {
                        return Ok(()); // it was there before: it stays
                    }
                    let (_, node) = host_client(c.app(), c.params().req.host).await?;
                    match node
                        .call("StorageDomain.format", json!({ "sdUUID": c.params().sd }))
                        .await
                    {
                        Ok(_) => Ok(()),
                        Err(e) if e.code() == Some(CODE_DOMAIN_NOT_FOUND) => Ok(()),
                        Err(e) => Err(step_err(e)),
                    }
                },
            )
            .describe("Creating the domain on storage"),
            Step::new(
                "record",
                |c: StepCtx<Self>| async move {
                    if c.db().sd_get(c.params().sd).await?.is_none() {
                        c.db().sd_insert(&Self::domain(c.params())).await?;
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    if c.db().sd_get(c.params().sd).await?.is_some() {
                        c.db().sd_delete(c.params().sd).await?;
                    }
                    Ok(())
                },
            )
            .describe("Recording the domain"),
        ]
    }
}

// ------------------------------------------------------------------------------------------
// Attach a domain to a data center.

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachParams {
    pub dc: DcId,
    pub sd: SdUuid,
    /// The host that creates the pool (first domain) — `None` when the pool exists (the SPM
    /// attaches).
    pub creator: Option<HostUuid>,
}

pub struct AttachStorageDomainSaga;

impl SagaDef for AttachStorageDomainSaga {
    type Ctx = App;
    type Params = AttachParams;
    const NAME: &'static str = "attach_storage_domain";

    fn description(p: &Self::Params) -> String {
        format!("Attaching storage domain {} to data center {}", p.sd, p.dc)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "storage",
                |c: StepCtx<Self>| async move {
                    let app = c.app();
                    let p = c.params();
                    let dc = app.dc(p.dc).await.map_err(step_err)?;
                    let sd = c.db().sd_get(p.sd).await?.ok_or_else(|| step_err(format!("storage domain {} is gone", p.sd)))?;
                    match p.creator {
                        Some(host) => {
                            let (_, node) = host_client(app, host).await?;
                            connect_storage(&node, std::slice::from_ref(&sd)).await.map_err(step_err)?;
                            take_over(app, &node, host, &dc, p.sd).await?;
                            let r = node
                                .call(
                                    "StoragePool.create",
                                    json!({ "spUUID": dc.storage_pool_id, "poolName": dc.name, "masterDom": p.sd, "masterVersion": 1 }),
                                )
                                .await;
                            if let Err(e) = r {
                                // Re-run after a crash: the pool is there with this master.
                                let info = node.call("StorageDomain.getInfo", json!({ "sdUUID": p.sd })).await.map_err(step_err)?;
                                if !info["pool"].as_array().is_some_and(|a| a.contains(&json!(dc.storage_pool_id))) {
                                    return Err(step_err(e));
                                }
                            }
                        }
                        None => {
                            let (spm_host, spm) = app.spm(&dc).await.map_err(step_err)?;
                            for h in app.dc_hosts(p.dc, true).await.map_err(step_err)? {
                                let node = app.client(&h).map_err(step_err)?;
                                connect_storage(&node, std::slice::from_ref(&sd)).await.map_err(step_err)?;
                            }
                            take_over(app, &spm, spm_host.id, &dc, p.sd).await?;
                            let args = json!({ "sdUUID": p.sd, "spUUID": dc.storage_pool_id });
                            spm.call("StoragePool.attachStorageDomain", args.clone()).await.map_err(step_err)?;
                            spm.call("StoragePool.activateStorageDomain", args).await.map_err(step_err)?;
                        }
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let app = c.app();
                    let p = c.params();
                    if p.creator.is_none() {
                        let dc = app.dc(p.dc).await.map_err(step_err)?;
                        if let Ok((_, spm)) = app.spm(&dc).await {
                            let args = json!({ "sdUUID": p.sd, "spUUID": dc.storage_pool_id });
                            let _ = spm.call("StoragePool.deactivateStorageDomain", args.clone()).await;
                            let _ = spm.call("StoragePool.detachStorageDomain", args).await;
                        }
                    }
                    // A pool created here lives in its master domain's metadata; the domain row
                    // stays unattached and a new attach re-creates the pool over it.
                    Ok(())
                },
            )
            .describe("Attaching the domain on storage"),
            Step::new(
                "record",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let db = c.db();
                    let first = p.creator.is_some();
                    if !db.pool_members(p.dc).await?.iter().any(|m| m.storage_domain_id == p.sd) {
                        db.pool_attach(&PoolMember {
                            data_center_id: p.dc,
                            storage_domain_id: p.sd,
                            status: if first { SdStatus::Activating } else { SdStatus::Active },
                            master: false,
                        })
                        .await?;
                    }
                    if first {
                        db.pool_set_master(p.dc, p.sd).await?;
                        let dc = db.dc_get(p.dc).await?.ok_or_else(|| step_err("data center is gone"))?;
                        if dc.master_version < 1 {
                            db.dc_set_master_version(p.dc, dc.master_version, 1).await?;
                        }
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    c.db().pool_detach(c.params().dc, c.params().sd).await?;
                    Ok(())
                },
            )
            .describe("Recording the attachment"),
        ]
    }
}

// ------------------------------------------------------------------------------------------
// Disks.

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddDiskParams {
    pub disk: DiskId,
    pub volume: VolUuid,
    pub dc: DcId,
    pub req: AddDisk,
}

pub struct AddDiskSaga;

impl SagaDef for AddDiskSaga {
    type Ctx = App;
    type Params = AddDiskParams;
    const NAME: &'static str = "add_disk";

    fn description(p: &Self::Params) -> String {
        format!("Adding disk {}", p.req.name)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "record",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let db = c.db();
                    if db.disk_get(p.disk).await?.is_none() {
                        let mut d = Disk::new(
                            &p.req.name,
                            p.req.storage_domain,
                            p.req.format,
                            p.req.provisioned_size,
                        );
                        d.id = p.disk;
                        d.description = p.req.description.clone();
                        d.sparse = p.req.sparse;
                        d.shareable = p.req.shareable;
                        d.content_type = p.req.content_type;
                        d.disk_profile_id = p.req.disk_profile;
                        db.disk_insert(&d).await?;
                        db.volume_insert(&Volume {
                            id: p.volume,
                            disk_id: p.disk,
                            storage_domain_id: p.req.storage_domain,
                            parent_id: None,
                            voltype: VolType::Leaf,
                            format: p.req.format,
                            actual_size: 0,
                            created_at: crate::time::Timestamp::from_millis(0),
                        })
                        .await?;
                    }
                    db.disk_lock(p.disk, c.saga_id).await?;
                    // Attached at once, locked: the VM cannot start or snapshot without it
                    // while the volume is made (an add answered early shows it so).
                    if let Some(a) = &p.req.attach_to {
                        if db.attachment_get(a.vm, p.disk).await?.is_none() {
                            db.attachment_add(&a.attachment(p.disk)).await?;
                        }
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    if let Some(a) = &p.req.attach_to {
                        c.db().attachment_remove(a.vm, p.disk).await?;
                    }
                    c.db().volume_delete(p.volume).await?;
                    if c.db().disk_get(p.disk).await?.is_some() {
                        c.db().disk_delete(p.disk).await?;
                    }
                    Ok(())
                },
            )
            .describe("Recording the disk"),
            Step::new(
                "create",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                    let args = json!({
                        "sdUUID": p.req.storage_domain, "spUUID": dc.storage_pool_id, "imgUUID": p.disk,
                        "size": p.req.provisioned_size, "volFormat": vol_format(p.req.format),
                        "preallocate": if p.req.sparse { "SPARSE" } else { "PREALLOCATED" },
                        "volUUID": p.volume, "desc": volume_description(&p.req.name, &p.req.description),
                        "diskType": match p.req.content_type {
                            DiskContentType::Iso => "ISOF",
                            DiskContentType::Data => "DATA",
                        },
                    });
                    create_volume(
                        &spm,
                        args,
                        p.req.storage_domain,
                        p.disk,
                        p.volume,
                        app.settings.task_timeout,
                    )
                    .await
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    delete_image(c.app(), p.dc, p.req.storage_domain, p.disk).await
                },
            )
            .describe("Creating the volume"),
            Step::without_undo("unlock", |c: StepCtx<Self>| async move {
                c.db()
                    .disk_unlock(c.params().disk, c.saga_id, DiskStatus::Ok)
                    .await?;
                Ok(())
            }),
        ]
    }
}

pub(crate) fn vol_format(f: DiskFormat) -> &'static str {
    match f {
        DiskFormat::Cow => "COW",
        DiskFormat::Raw => "RAW",
    }
}

/// `Volume.create` on the SPM; succeeds when a crash already created this very volume.
pub(crate) async fn create_volume(
    spm: &NodeClient,
    args: Value,
    sd: SdUuid,
    img: DiskId,
    vol: VolUuid,
    timeout: Duration,
) -> Result<(), StepError> {
    match spm.run_task("Volume.create", args, timeout).await {
        Ok(()) => Ok(()),
        Err(e) => {
            let info = spm
                .call(
                    "Volume.getInfo",
                    json!({ "sdUUID": sd, "imgUUID": img, "volUUID": vol }),
                )
                .await;
            match info {
                Ok(i) if i["meta"]["legality"] == "LEGAL" || i["meta"]["legality"] == "Legal" => Ok(()),
                _ => Err(step_err(e)),
            }
        }
    }
}

/// An image copied on the SPM into one volume of a new image (`Image.copy`, LEAF, sparse).
pub(crate) struct CollapsedCopy {
    pub src_sd: SdUuid,
    pub src_img: DiskId,
    pub dst_sd: SdUuid,
    pub dst_img: DiskId,
    pub dst_vol: VolUuid,
    pub format: DiskFormat,
    /// Copy the source as it was when this volume was its leaf (a snapshot's).
    pub src_vol: Option<VolUuid>,
}

/// Runs `copy` on the SPM. A copy made by an earlier run of the step whose answer was lost is
/// recognised by its volume being there and LEGAL.
pub(crate) async fn copy_collapsed(
    app: &App,
    spm: &NodeClient,
    pool: crate::model::PoolUuid,
    copy: &CollapsedCopy,
) -> Result<(), StepError> {
    let mut args = json!({
        "spUUID": pool, "sdUUID": copy.src_sd, "dstSdUUID": copy.dst_sd,
        "srcImgUUID": copy.src_img, "dstImgUUID": copy.dst_img, "dstVolUUID": copy.dst_vol,
        "volType": "LEAF", "volFormat": copy.format.as_str().to_uppercase(),
        "preallocate": "SPARSE",
    });
    if let Some(v) = copy.src_vol {
        args["srcVolUUID"] = json!(v);
    }
    if let Err(e) = spm.run_task("Image.copy", args, app.settings.task_timeout).await {
        let info = spm
            .call(
                "Volume.getInfo",
                json!({ "sdUUID": copy.dst_sd, "imgUUID": copy.dst_img, "volUUID": copy.dst_vol }),
            )
            .await;
        if !info.is_ok_and(|i| {
            i["meta"]["legality"]
                .as_str()
                .is_some_and(|l| l.eq_ignore_ascii_case("legal"))
        }) {
            return Err(step_err(e));
        }
    }
    Ok(())
}

/// `Image.delete` on the SPM; an image that is already gone is fine.
pub(crate) async fn delete_image(app: &App, dc: DcId, sd: SdUuid, img: DiskId) -> Result<(), StepError> {
    let (dc, spm) = app.dc_spm(dc).await.map_err(step_err)?;
    let args = json!({ "sdUUID": sd, "spUUID": dc.storage_pool_id, "imgUUID": img });
    match spm
        .run_task("Image.delete", args, app.settings.task_timeout)
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(CODE_IMAGE_NOT_FOUND) => Ok(()),
        Err(e) => {
            // The task may fail because the image is gone; check before giving up.
            let imgs = spm
                .call("StorageDomain.getImages", json!({ "sdUUID": sd }))
                .await
                .map_err(step_err)?;
            if imgs.as_array().is_some_and(|a| a.contains(&json!(img))) {
                Err(step_err(e))
            } else {
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveDiskParams {
    pub disk: DiskId,
    pub dc: DcId,
}

pub struct RemoveDiskSaga;

impl SagaDef for RemoveDiskSaga {
    type Ctx = App;
    type Params = RemoveDiskParams;
    const NAME: &'static str = "remove_disk";

    fn description(p: &Self::Params) -> String {
        format!("Removing disk {}", p.disk)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            disk_lock_step(|p: &Self::Params| p.disk),
            // No undo past this point: a deleted image cannot come back.
            Step::without_undo("delete", |c: StepCtx<Self>| async move {
                let p = c.params();
                let d = c
                    .db()
                    .disk_get(p.disk)
                    .await?
                    .ok_or_else(|| step_err("disk is gone"))?;
                delete_image(c.app(), p.dc, d.storage_domain_id, p.disk).await
            })
            .point_of_no_return(),
            Step::without_undo("record", |c: StepCtx<Self>| async move {
                forget_disk(c.db(), c.params().disk).await
            }),
        ]
    }
}

/// Deletes a disk's records (its own volumes, its attachments, the disk) once its image is
/// gone; idempotent.
pub(super) async fn forget_disk(db: &crate::db::Db, disk: DiskId) -> Result<(), StepError> {
    for v in db.volume_chain(disk).await? {
        if v.disk_id == disk {
            db.volume_delete(v.id).await?;
        }
    }
    for a in db.attachments_of_disk(disk).await? {
        db.attachment_remove(a.vm_id, disk).await?;
    }
    if db.disk_get(disk).await?.is_some() {
        db.disk_delete(disk).await?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Move a disk to another domain.

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveDiskParams {
    pub disk: DiskId,
    pub dc: DcId,
    pub src: SdUuid,
    pub dst: SdUuid,
}

/// A cold move: the disk locked, its whole chain copied to the destination (undo: that copy
/// deleted), the records switched (undo: back), then the source image deleted — the point of no
/// return, after which the saga only goes forward.
pub struct MoveDiskSaga;

impl SagaDef for MoveDiskSaga {
    type Ctx = App;
    type Params = MoveDiskParams;
    const NAME: &'static str = "move_disk";

    fn description(p: &Self::Params) -> String {
        format!(
            "Moving disk {} from storage domain {} to {}",
            p.disk, p.src, p.dst
        )
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            disk_lock_step(|p: &Self::Params| p.disk).describe("Locking the disk"),
            Step::new(
                "copy",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                    let args = json!({
                        "spUUID": dc.storage_pool_id, "srcDomUUID": p.src, "dstDomUUID": p.dst,
                        "imgUUID": p.disk, "op": "copy",
                    });
                    if let Err(e) = spm.run_task("Image.move", args, app.settings.task_timeout).await {
                        // Copied by an earlier run whose answer was lost: the destination has it.
                        let imgs = spm
                            .call("StorageDomain.getImages", json!({ "sdUUID": p.dst }))
                            .await
                            .map_err(step_err)?;
                        if !imgs.as_array().is_some_and(|a| a.contains(&json!(p.disk))) {
                            return Err(step_err(e));
                        }
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    delete_image(c.app(), p.dc, p.dst, p.disk).await
                },
            )
            .describe("Copying the disk's volumes"),
            Step::new(
                "record",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    c.db().disk_set_domain(p.disk, p.dst).await?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    c.db().disk_set_domain(p.disk, p.src).await?;
                    Ok(())
                },
            )
            .describe("Recording the new domain"),
            Step::without_undo("delete_source", |c: StepCtx<Self>| async move {
                let p = c.params();
                delete_image(c.app(), p.dc, p.src, p.disk).await
            })
            .point_of_no_return()
            .describe("Deleting the source volumes"),
            Step::without_undo("unlock", |c: StepCtx<Self>| async move {
                c.db()
                    .disk_unlock(c.params().disk, c.saga_id, DiskStatus::Ok)
                    .await?;
                Ok(())
            })
            .describe("Unlocking the disk"),
        ]
    }
}

// ------------------------------------------------------------------------------------------
// Copy a disk, to the same or another domain.

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyDiskParams {
    pub disk: DiskId,
    pub dc: DcId,
    pub src: SdUuid,
    pub dst: SdUuid,
    /// The copy: a new disk of one volume.
    pub copy: DiskId,
    pub volume: VolUuid,
    pub name: String,
    pub format: DiskFormat,
}

/// oVirt's "Copy disk": the source locked (its VMs down), a new disk recorded `locked`, the
/// source's whole chain (a template's base included) collapsed into the new disk's one volume
/// on the destination (undo: that image deleted), then both unlocked. The copy is independent
/// of the source and of any template.
pub struct CopyDiskSaga;

impl SagaDef for CopyDiskSaga {
    type Ctx = App;
    type Params = CopyDiskParams;
    const NAME: &'static str = "copy_disk";

    fn description(p: &Self::Params) -> String {
        format!(
            "Copying disk {} to storage domain {} as {}",
            p.disk, p.dst, p.name
        )
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            disk_lock_step(|p: &Self::Params| p.disk).describe("Locking the source disk"),
            Step::new(
                "record",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    if c.db().disk_get(p.copy).await?.is_some() {
                        return Ok(());
                    }
                    let src = c
                        .db()
                        .disk_get(p.disk)
                        .await?
                        .ok_or_else(|| step_err("the source disk is gone"))?;
                    let mut d = Disk::new(&p.name, p.dst, p.format, src.provisioned_size);
                    d.id = p.copy;
                    d.description = src.description.clone();
                    d.shareable = src.shareable;
                    d.wipe_after_delete = src.wipe_after_delete;
                    d.status = DiskStatus::Locked;
                    d.locked_by = Some(c.saga_id);
                    c.db().disk_insert(&d).await?;
                    c.db()
                        .volume_insert(&Volume {
                            id: p.volume,
                            disk_id: p.copy,
                            storage_domain_id: p.dst,
                            parent_id: None,
                            voltype: VolType::Leaf,
                            format: p.format,
                            actual_size: 0,
                            created_at: crate::time::Timestamp::from_millis(0),
                        })
                        .await?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    c.db().volume_delete(p.volume).await?;
                    if c.db().disk_get(p.copy).await?.is_some() {
                        c.db().disk_delete(p.copy).await?;
                    }
                    Ok(())
                },
            )
            .describe("Recording the new disk"),
            Step::new(
                "copy",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                    let copy = CollapsedCopy {
                        src_sd: p.src,
                        src_img: p.disk,
                        dst_sd: p.dst,
                        dst_img: p.copy,
                        dst_vol: p.volume,
                        format: p.format,
                        src_vol: None,
                    };
                    copy_collapsed(app, &spm, dc.storage_pool_id, &copy).await?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    delete_image(c.app(), p.dc, p.dst, p.copy).await
                },
            )
            .describe("Copying the disk's volumes into one"),
            Step::without_undo("unlock", |c: StepCtx<Self>| async move {
                let p = c.params();
                c.db().disk_unlock(p.copy, c.saga_id, DiskStatus::Ok).await?;
                c.db().disk_unlock(p.disk, c.saga_id, DiskStatus::Ok).await?;
                Ok(())
            })
            .describe("Unlocking the disks"),
        ]
    }
}

// ------------------------------------------------------------------------------------------
// Extend a disk.

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExtendDiskParams {
    pub disk: DiskId,
    pub dc: DcId,
    pub sd: SdUuid,
    pub leaf: VolUuid,
    pub size: u64,
    /// The VM running the disk and its host: the guest sees the new size at once.
    pub live: Option<(VmId, HostUuid)>,
}

/// oVirt's disk extend (a bigger `provisioned_size`). Down: the SPM grows the leaf
/// (`Volume.extendSize`: `qemu-img resize` and the new capacity in its metadata). Running: the
/// VM's host grows the active layer under the guest (`VM.diskSizeExtend`, QEMU's
/// `block_resize`: QEMU holds the image, so nobody else may resize it), then the SPM records
/// the capacity (its resize finds the image grown already). Growing cannot be undone, so the
/// live step is the point of no return; the SPM's verb is idempotent, so a resumed saga just
/// asks again.
pub struct ExtendDiskSaga;

impl SagaDef for ExtendDiskSaga {
    type Ctx = App;
    type Params = ExtendDiskParams;
    const NAME: &'static str = "extend_disk";

    fn description(p: &Self::Params) -> String {
        format!("Extending disk {} to {} bytes", p.disk, p.size)
    }

    fn steps() -> Vec<Step<Self>> {
        async fn spm_extend(c: &StepCtx<ExtendDiskSaga>) -> Result<(), StepError> {
            let p = c.params();
            let app = c.app();
            let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
            let args = json!({
                "spUUID": dc.storage_pool_id, "sdUUID": p.sd, "imgUUID": p.disk,
                "volUUID": p.leaf, "newSize": p.size,
            });
            spm.run_task("Volume.extendSize", args, app.settings.task_timeout)
                .await
                .map_err(step_err)?;
            Ok(())
        }
        vec![
            disk_lock_step(|p: &Self::Params| p.disk).describe("Locking the disk"),
            Step::new(
                "extend",
                |c: StepCtx<Self>| async move {
                    if c.params().live.is_none() {
                        spm_extend(&c).await?;
                    }
                    Ok(())
                },
                // A volume does not shrink; grown, it is harmless: no guest saw the new size and
                // the records keep the old one.
                |_c: StepCtx<Self>| async move { Ok(()) },
            )
            .describe("Growing the volume"),
            Step::without_undo("live", |c: StepCtx<Self>| async move {
                let p = c.params();
                if let Some((vm, host)) = p.live {
                    let app = c.app();
                    let h = app.host(host).await.map_err(step_err)?;
                    let node = app.client(&h).map_err(step_err)?;
                    node.call(
                        "VM.diskSizeExtend",
                        json!({
                            "vmID": vm,
                            "driveSpecs": { "domainID": p.sd, "imageID": p.disk, "volumeID": p.leaf },
                            "newSize": p.size.to_string(),
                        }),
                    )
                    .await
                    .map_err(step_err)?;
                    spm_extend(&c).await?;
                }
                Ok(())
            })
            .point_of_no_return()
            .describe("Growing the disk under the running guest"),
            Step::without_undo("record", |c: StepCtx<Self>| async move {
                let p = c.params();
                let mut d = c
                    .db()
                    .disk_get(p.disk)
                    .await?
                    .ok_or_else(|| step_err("the disk is gone"))?;
                if d.provisioned_size < p.size {
                    d.provisioned_size = p.size;
                    c.db().disk_update(&d).await?;
                }
                c.db().disk_unlock(p.disk, c.saga_id, DiskStatus::Ok).await?;
                Ok(())
            })
            .describe("Recording the new size"),
        ]
    }
}

// ------------------------------------------------------------------------------------------
// Deactivate, detach and remove a domain.

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeactivateParams {
    pub dc: DcId,
    pub sd: SdUuid,
    /// The domain's status before, which an undo restores.
    pub prior: SdStatus,
}

/// What a deactivation did with the master role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MasterHandOver {
    /// The domain was not the master.
    NotMaster,
    /// The role moved to another active data domain.
    Moved,
    /// It was the last data domain: the data center went to maintenance (its status before).
    PoolDown(DcStatus),
}

/// `active` → `preparing_for_maintenance` → (master role handed over, or the data center to
/// maintenance with its last domain) → deactivated on storage → `maintenance`. A crash resumes
/// it: each step finds its own effect done (the SPM's verbs are idempotent, a moved master is
/// read back from storage).
pub struct DeactivateStorageDomainSaga;

impl SagaDef for DeactivateStorageDomainSaga {
    type Ctx = App;
    type Params = DeactivateParams;
    const NAME: &'static str = "deactivate_storage_domain";

    fn description(p: &Self::Params) -> String {
        format!("Deactivating storage domain {} in data center {}", p.sd, p.dc)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            member_status_step(
                "lock",
                |p: &DeactivateParams| (p.dc, p.sd, p.prior),
                SdStatus::PreparingForMaintenance,
            )
            .describe("Preparing the domain for maintenance"),
            Step::new(
                "master",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    let dcr = app.dc(p.dc).await.map_err(step_err)?;
                    if app.db.pool_master(p.dc).await? != Some(p.sd) {
                        return Ok(MasterHandOver::NotMaster);
                    }
                    if dcr.status == DcStatus::Maintenance {
                        // A re-run after the data center went down with this domain: finish
                        // stopping its pool (a crash may have come before); an undo has the
                        // monitor bring it back (reconnect, elect) as an activation does.
                        let _election = app.spm_elections.lock().await;
                        stop_pool(app, &dcr).await.map_err(step_err)?;
                        return Ok(MasterHandOver::PoolDown(DcStatus::Uninitialized));
                    }
                    match next_master(app, p.dc, p.sd).await.map_err(step_err)? {
                        Some(new) => {
                            move_master(app, &dcr, p.sd, new).await.map_err(step_err)?;
                            Ok(MasterHandOver::Moved)
                        }
                        None => {
                            let before = pool_to_maintenance(app, &dcr, p.sd).await.map_err(step_err)?;
                            Ok(MasterHandOver::PoolDown(before))
                        }
                    }
                },
                |c: StepCtx<Self>| async move {
                    // A data center taken down comes back as it was: the monitor reconnects its
                    // hosts and elects an SPM. A moved master stays where it went.
                    if let Some(MasterHandOver::PoolDown(before)) = c.own_output::<MasterHandOver>() {
                        let app = c.app();
                        app.db.dc_set_status(c.params().dc, before).await?;
                        app.kick.notify_one();
                    }
                    Ok(())
                },
            )
            .describe("Handing over the master role"),
            Step::new(
                "storage",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    if matches!(c.output::<MasterHandOver>("master")?, MasterHandOver::PoolDown(_)) {
                        return Ok(());
                    }
                    let app = c.app();
                    let dcr = app.dc(p.dc).await.map_err(step_err)?;
                    let (_, spm) = app.spm(&dcr).await.map_err(step_err)?;
                    spm.call(
                        "StoragePool.deactivateStorageDomain",
                        json!({ "sdUUID": p.sd, "spUUID": dcr.storage_pool_id }),
                    )
                    .await
                    .map_err(step_err)?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    if let Ok(dcr) = app.dc(p.dc).await {
                        if let Ok((_, spm)) = app.spm(&dcr).await {
                            let _ = spm
                                .call(
                                    "StoragePool.activateStorageDomain",
                                    json!({ "sdUUID": p.sd, "spUUID": dcr.storage_pool_id }),
                                )
                                .await;
                        }
                    }
                    Ok(())
                },
            )
            .describe("Deactivating the domain on storage"),
            // Undone back to where the lock's undo finds it.
            member_status_step(
                "record",
                |p: &DeactivateParams| (p.dc, p.sd, SdStatus::PreparingForMaintenance),
                SdStatus::Maintenance,
            )
            .describe("Recording the maintenance"),
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetachParams {
    pub dc: DcId,
    pub sd: SdUuid,
    /// What the engine forgets with the domain, chosen before the saga starts.
    #[serde(default)]
    pub leaving: Leaving,
}

/// What leaves the engine's records with a detached domain: the VMs and templates whose
/// disks all live on it (described in its OVF stores, registered again from there), and every
/// disk on it. Storage keeps all of it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Leaving {
    pub vms: Vec<VmId>,
    pub templates: Vec<crate::model::TemplateId>,
    /// Templates' disks last: their volumes are the parents of their clones'.
    pub disks: Vec<DiskId>,
}

impl Leaving {
    /// The VMs' and templates' ids, as OVF stores name them.
    pub fn entity_ids(&self) -> std::collections::BTreeSet<String> {
        self.vms
            .iter()
            .map(|v| v.to_string())
            .chain(self.templates.iter().map(|t| t.to_string()))
            .collect()
    }
}

/// What leaves with domain `sd` of `dc` (see [`Leaving`]). Refused when something that stays
/// would be cut: a VM or template with disks on other domains too, a VM not down, a VM made
/// from a leaving template, an ISO on the domain in a staying VM's CD-ROM.
async fn leaving_with(app: &App, dc: DcId, sd: SdUuid) -> Result<Leaving, CommandError> {
    use std::collections::BTreeSet;
    let db = &app.db;
    let disks = db
        .disk_list(&ListQuery {
            filter: crate::db::DiskFilter {
                storage_domain: Some(Ref::Id(sd)),
                ..Default::default()
            },
            ..Default::default()
        })
        .await?;
    let on: BTreeSet<DiskId> = disks.iter().map(|d| d.id).collect();
    let mut out = Leaving::default();
    let mut template_disks = BTreeSet::new();
    let templates = db
        .template_list(&ListQuery {
            filter: crate::db::TemplateFilter {
                data_center: Some(Ref::Id(dc)),
                ..Default::default()
            },
            ..Default::default()
        })
        .await?;
    for t in templates
        .iter()
        .filter(|t| t.id != crate::model::BLANK_TEMPLATE_ID)
    {
        let td = db.template_disks(t.id).await?;
        let here = td.iter().filter(|d| on.contains(&d.id)).count();
        if here == 0 {
            continue;
        }
        if here < td.len() {
            return Err(CommandError::Conflict(format!(
                "template {} has disks on storage domain {sd} and on other domains: it cannot leave with the domain",
                t.name
            )));
        }
        out.templates.push(t.id);
        template_disks.extend(td.iter().map(|d| d.id));
    }
    let mut vms = BTreeSet::new();
    for d in &disks {
        for a in db.attachments_of_disk(d.id).await? {
            vms.insert(a.vm_id);
        }
    }
    for id in vms {
        let Some(v) = db.vm_get(id).await? else {
            continue;
        };
        for a in db.attachments_of_vm(id).await? {
            if !on.contains(&a.disk_id) {
                return Err(CommandError::Conflict(format!(
                    "VM {} has disks on storage domain {sd} and on other domains: move them onto one first",
                    v.name
                )));
            }
        }
        if v.runtime.status != crate::model::VmStatus::Down {
            return Err(CommandError::Conflict(format!(
                "VM {} is {}: it leaves with the domain only when down",
                v.name, v.runtime.status
            )));
        }
        out.vms.push(id);
    }
    for t in &out.templates {
        let users = db
            .vm_list(&ListQuery {
                filter: VmFilter {
                    template: Some(Ref::Id(*t)),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await?;
        if let Some(v) = users.iter().find(|v| !out.vms.contains(&v.id)) {
            return Err(CommandError::Conflict(format!(
                "VM {} is made from template {t} on storage domain {sd} but stays (its disks are elsewhere): remove it or move the template's disks first",
                v.name
            )));
        }
    }
    // A staying VM's lease, and its saved states (a memory snapshot's, a suspended VM's), must
    // stay reachable.
    let staying = db
        .vm_list(&ListQuery {
            filter: VmFilter {
                data_center: Some(Ref::Id(dc)),
                ..Default::default()
            },
            ..Default::default()
        })
        .await?;
    if let Some(v) = staying
        .iter()
        .find(|v| !out.vms.contains(&v.id) && v.lease_storage_domain_id == Some(sd))
    {
        return Err(CommandError::Conflict(format!(
            "VM {} keeps its lease on storage domain {sd} and stays: move the lease to another domain first",
            v.name
        )));
    }
    let parts = db.vm_parts_in_dc(dc).await?;
    for (vm, snaps) in &parts.snapshots {
        if out.vms.contains(vm) {
            continue;
        }
        let mut states = Vec::new();
        for s in snaps.iter().filter(|s| s.persist_memory) {
            if let Some(m) = db.snapshot_memory_get(s.id).await? {
                states.push(m.state);
            }
        }
        states.extend(db.vm_hibernation_get(*vm).await?);
        if states.iter().any(|st| st.sd == sd) {
            let name = db
                .vm_get(*vm)
                .await?
                .map(|v| v.name)
                .unwrap_or_else(|| vm.to_string());
            return Err(CommandError::Conflict(format!(
                "VM {name} keeps a saved memory state on storage domain {sd} and stays: remove that snapshot (or resume the VM) first"
            )));
        }
    }
    for d in &disks {
        if let Some(v) = db
            .vms_with_cdrom(d.id)
            .await?
            .iter()
            .find(|v| !out.vms.contains(&v.id))
        {
            return Err(CommandError::Conflict(format!(
                "ISO {} on storage domain {sd} is in VM {}'s CD-ROM: eject it first",
                d.name, v.name
            )));
        }
    }
    let (mut plain, mut shared): (Vec<DiskId>, Vec<DiskId>) = (Vec::new(), Vec::new());
    for d in &disks {
        if template_disks.contains(&d.id) {
            shared.push(d.id);
        } else {
            plain.push(d.id);
        }
    }
    plain.extend(shared);
    out.disks = plain;
    Ok(out)
}

/// Forgets what left with a detached domain, in one transaction; repeatable.
async fn forget_leaving(db: &crate::db::Db, sd: SdUuid, l: &Leaving) -> Result<(), StepError> {
    let mut tx = db.begin().await?;
    for vm in &l.vms {
        if tx.vm_get(*vm).await?.is_some() {
            tx.vm_delete(*vm).await?;
        }
    }
    for t in &l.templates {
        if tx.template_get(*t).await?.is_some() {
            tx.template_delete(*t).await?;
        }
    }
    for d in &l.disks {
        for v in tx.volume_chain(*d).await?.iter().rev() {
            if v.disk_id == *d {
                tx.volume_delete(v.id).await?;
            }
        }
        for a in tx.attachments_of_disk(*d).await? {
            tx.attachment_remove(a.vm_id, *d).await?;
        }
        if tx.disk_get(*d).await?.is_some() {
            tx.disk_delete(*d).await?;
        }
    }
    tx.ovf_forget_domain(sd).await?;
    tx.commit().await?;
    Ok(())
}

/// `maintenance` → `detaching` → detached on storage (the pool forgets it, its metadata loses
/// the pool's id) → the attachment row goes → what lived on the domain is forgotten
/// ([`Leaving`]).
pub struct DetachStorageDomainSaga;

impl SagaDef for DetachStorageDomainSaga {
    type Ctx = App;
    type Params = DetachParams;
    const NAME: &'static str = "detach_storage_domain";

    fn description(p: &Self::Params) -> String {
        format!("Detaching storage domain {} from data center {}", p.sd, p.dc)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            member_status_step(
                "lock",
                |p: &DetachParams| (p.dc, p.sd, SdStatus::Maintenance),
                SdStatus::Detaching,
            )
            .describe("Locking the attachment"),
            Step::new(
                "storage",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    let dcr = app.dc(p.dc).await.map_err(step_err)?;
                    let (_, spm) = app.spm(&dcr).await.map_err(step_err)?;
                    spm.call(
                        "StoragePool.detachStorageDomain",
                        json!({ "sdUUID": p.sd, "spUUID": dcr.storage_pool_id }),
                    )
                    .await
                    .map_err(step_err)?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    // Attached again, inactive: as it was in maintenance.
                    let p = c.params();
                    let app = c.app();
                    let dcr = app.dc(p.dc).await.map_err(step_err)?;
                    let (_, spm) = app.spm(&dcr).await.map_err(step_err)?;
                    spm.call(
                        "StoragePool.attachStorageDomain",
                        json!({ "sdUUID": p.sd, "spUUID": dcr.storage_pool_id }),
                    )
                    .await
                    .map_err(step_err)?;
                    Ok(())
                },
            )
            .describe("Detaching the domain on storage"),
            Step::new(
                "record",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    c.db().pool_detach(p.dc, p.sd).await?;
                    Ok(())
                },
                // The row back as the lock left it, for the lock's undo.
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    if c.db().pool_attachments(p.sd).await?.is_empty() {
                        c.db()
                            .pool_attach(&PoolMember {
                                data_center_id: p.dc,
                                storage_domain_id: p.sd,
                                status: SdStatus::Detaching,
                                master: false,
                            })
                            .await?;
                    }
                    Ok(())
                },
            )
            .describe("Recording the detachment"),
            // Forgotten records do not come back by an undo (they come back by registration):
            // from here the saga only goes forward, and the step repeats harmlessly.
            Step::without_undo("forget", |c: StepCtx<Self>| async move {
                let p = c.params();
                forget_leaving(c.db(), p.sd, &p.leaving).await?;
                c.app().ovf_searched.lock().expect("ovf searched").remove(&p.sd);
                Ok(())
            })
            .point_of_no_return()
            .describe("Forgetting the VMs, templates and disks that left with the domain"),
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveDomainParams {
    pub sd: SdUuid,
    /// The host that formats the domain's storage (`None`: the storage stays).
    pub format_on: Option<HostUuid>,
}

/// Formats the domain's storage (if asked) and forgets the domain. Formatting cannot be undone:
/// from there the saga only goes forward (a format repeated finds the storage gone).
pub struct RemoveStorageDomainSaga;

impl SagaDef for RemoveStorageDomainSaga {
    type Ctx = App;
    type Params = RemoveDomainParams;
    const NAME: &'static str = "remove_storage_domain";

    fn description(p: &Self::Params) -> String {
        format!("Removing storage domain {}", p.sd)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::without_undo("format", |c: StepCtx<Self>| async move {
                let p = c.params();
                let Some(host) = p.format_on else {
                    return Ok(());
                };
                let Some(sd) = c.db().sd_get(p.sd).await? else {
                    return Ok(()); // removed by an earlier run
                };
                let (_, node) = host_client(c.app(), host).await?;
                connect_storage(&node, std::slice::from_ref(&sd))
                    .await
                    .map_err(step_err)?;
                match node.call("StorageDomain.format", json!({ "sdUUID": p.sd })).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.code() == Some(CODE_DOMAIN_NOT_FOUND) => Ok(()),
                    Err(e) => Err(step_err(e)),
                }
            })
            .point_of_no_return()
            .describe("Formatting the domain's storage"),
            Step::without_undo("record", |c: StepCtx<Self>| async move {
                match c.db().sd_delete(c.params().sd).await {
                    Ok(()) | Err(crate::db::DbError::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            })
            .describe("Forgetting the domain"),
        ]
    }
}

/// A step moving a domain's status in a data center — `at` names the data center, the domain
/// and the status it moves from — to `to` (a re-run finds it there already), undone by moving
/// it back.
fn member_status_step<S>(
    name: &'static str,
    at: fn(&S::Params) -> (DcId, SdUuid, SdStatus),
    to: SdStatus,
) -> Step<S>
where
    S: SagaDef<Ctx = App>,
{
    Step::new(
        name,
        move |c: StepCtx<S>| async move {
            let (dc, sd, from) = at(c.params());
            c.db().pool_set_status(dc, sd, &[from, to], to).await?;
            Ok(())
        },
        move |c: StepCtx<S>| async move {
            let (dc, sd, from) = at(c.params());
            let _ = c.db().pool_set_status(dc, sd, &[to], from).await;
            Ok(())
        },
    )
}

/// The step that locks a saga's disk (`ok` → `locked` by the saga), undone by unlocking it.
pub(super) fn disk_lock_step<S>(disk: fn(&S::Params) -> DiskId) -> Step<S>
where
    S: SagaDef<Ctx = App>,
{
    Step::new(
        "lock",
        move |c: StepCtx<S>| async move {
            c.db().disk_lock(disk(c.params()), c.saga_id).await?;
            Ok(())
        },
        move |c: StepCtx<S>| async move {
            c.db()
                .disk_unlock(disk(c.params()), c.saga_id, DiskStatus::Ok)
                .await?;
            Ok(())
        },
    )
}

/// `sd`'s attachment to data center `dc`.
async fn member(app: &App, dc: DcId, sd: SdUuid) -> Result<PoolMember, CommandError> {
    app.db
        .pool_members(dc)
        .await?
        .into_iter()
        .find(|m| m.storage_domain_id == sd)
        .ok_or_else(|| CommandError::not_found("storage domain attachment", sd))
}

/// The active data domain of `dc` other than `sd` that would take the master role.
async fn next_master(app: &App, dc: DcId, sd: SdUuid) -> Result<Option<SdUuid>, CommandError> {
    for o in app.db.pool_members(dc).await? {
        if o.storage_domain_id == sd || o.status != SdStatus::Active {
            continue;
        }
        let data = app.db.sd_get(o.storage_domain_id).await?;
        if data.is_some_and(|d| d.domain_type == SdType::Data) {
            return Ok(Some(o.storage_domain_id));
        }
    }
    Ok(None)
}

/// Refuses to let a domain that holds disks go (`action`: "detached", "removed").
async fn refuse_holding_disks(app: &App, sd: SdUuid, action: &str) -> Result<(), CommandError> {
    let q = ListQuery {
        filter: crate::db::DiskFilter {
            storage_domain: Some(Ref::Id(sd)),
            ..Default::default()
        },
        ..Default::default()
    };
    let disks = app.db.disk_list(&q).await?;
    if let Some(d) = disks.first() {
        return Err(CommandError::Conflict(format!(
            "storage domain {sd} holds {} disk(s) (the first: {}), so it is not {action}: remove or move them first",
            disks.len(),
            d.name
        )));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Commands.

impl Commands {
    pub async fn add_storage_domain(
        &self,
        req: AddStorageDomain,
        correlation_id: Option<String>,
    ) -> Result<StorageDomain, CommandError> {
        self.check_new_domain(&req, true).await?;
        let p = AddStorageDomainParams {
            sd: SdUuid::new_random(),
            req,
            import: false,
        };
        self.run_add_domain(p, correlation_id).await
    }

    /// Runs the `add_storage_domain` saga; returns the domain recorded.
    async fn run_add_domain(
        &self,
        p: AddStorageDomainParams,
        correlation_id: Option<String>,
    ) -> Result<StorageDomain, CommandError> {
        let sd = p.sd;
        self.run::<AddStorageDomainSaga>(p, correlation_id).await?;
        self.app
            .db
            .sd_get(sd)
            .await?
            .ok_or_else(|| CommandError::not_found("storage domain", sd))
    }

    /// Imports a data domain that exists on storage (oVirt's import of a storage domain, e.g.
    /// one detached from another oVirt or oxvirt setup): `req.host` finds it under the path,
    /// `want` chooses when the path holds several; without a name it keeps the one storage
    /// has. Its disks are then registered from `/storagedomains/{id}/disks;unregistered` once
    /// it is attached and active.
    pub async fn import_storage_domain(
        &self,
        mut req: AddStorageDomain,
        want: Option<SdUuid>,
        correlation_id: Option<String>,
    ) -> Result<StorageDomain, CommandError> {
        let named = !req.name.is_empty();
        self.check_new_domain(&req, named).await?;
        let h = self.app.host(req.host).await?;
        let node = self.app.client(&h)?;
        // A connection of its own to look: its id is no domain's.
        let probe = domain_record(SdUuid::new_random(), &req);
        let conn = App::connection_id(probe.id);
        connect_storage(&node, std::slice::from_ref(&probe)).await?;
        let looked = async {
            let found = node
                .call("Host.getStorageDomains", json!({ "connectionID": conn }))
                .await?;
            let found: Vec<SdUuid> = found
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str()?.parse().ok())
                .collect();
            let sd = match (want, found.as_slice()) {
                (Some(w), f) if f.contains(&w) => w,
                (Some(w), _) => {
                    return Err(CommandError::not_found(
                        "storage domain",
                        format!("{w} under {}", req.path),
                    ))
                }
                (None, [one]) => *one,
                (None, []) => {
                    return Err(CommandError::invalid(format!(
                        "no storage domain under {}",
                        req.path
                    )))
                }
                (None, many) => {
                    let ids: Vec<String> = many.iter().map(|s| s.to_string()).collect();
                    return Err(CommandError::invalid(format!(
                        "{} storage domains under {}: name one by id ({})",
                        many.len(),
                        req.path,
                        ids.join(", ")
                    )));
                }
            };
            let info = node
                .call("StorageDomain.getInfo", json!({ "sdUUID": sd }))
                .await?;
            Ok((sd, info))
        }
        .await;
        if let Err(e) = node
            .call(
                "StoragePool.disconnectStorageServer",
                json!({ "connectionIDs": [conn] }),
            )
            .await
        {
            tracing::warn!(host = %h.name, error = %e, "the import's look-up connection stays");
        }
        let (sd, info) = looked?;
        if let Some(known) = self.app.db.sd_get(sd).await? {
            return Err(CommandError::Conflict(format!(
                "storage domain {sd} is known already, as {}",
                known.name
            )));
        }
        importable(sd, &info)?;
        if !named {
            req.name = info["name"].as_str().unwrap_or_default().to_string();
            if req.name.is_empty() {
                req.name = format!("imported-{}", &sd.to_string()[..8]);
            }
            if self.app.db.sd_get_by_name(&req.name).await?.is_some() {
                return Err(CommandError::Conflict(format!(
                    "a storage domain named {} exists: give the import a name",
                    req.name
                )));
            }
        }
        let p = AddStorageDomainParams {
            sd,
            req,
            import: true,
        };
        let d = self.run_add_domain(p, correlation_id).await?;
        tracing::info!(sd = %sd, "storage domain imported");
        Ok(d)
    }

    /// The checks a new domain's request passes before anything is done (its name's with
    /// `name`).
    async fn check_new_domain(&self, req: &AddStorageDomain, name: bool) -> Result<(), CommandError> {
        if req.path.is_empty() || (req.storage_type != StorageType::Nfs && !req.path.starts_with('/')) {
            return Err(CommandError::invalid(format!(
                "storage path {:?} must be an absolute path",
                req.path
            )));
        }
        if req.storage_type == StorageType::Nfs && req.address.as_deref().unwrap_or("").is_empty() {
            return Err(CommandError::invalid(
                "an NFS storage domain needs the server's address",
            ));
        }
        if name && self.app.db.sd_get_by_name(&req.name).await?.is_some() {
            return Err(CommandError::Conflict(format!(
                "a storage domain named {} exists",
                req.name
            )));
        }
        let h = self.app.host(req.host).await?;
        if h.status != HostStatus::Up {
            return Err(CommandError::Conflict(format!(
                "host {} is {}, not up",
                h.name, h.status
            )));
        }
        Ok(())
    }

    pub async fn attach_storage_domain(
        &self,
        dc: DcId,
        sd: SdUuid,
        correlation_id: Option<String>,
    ) -> Result<PoolMember, CommandError> {
        let dcr = self.app.dc(dc).await?;
        self.app
            .db
            .sd_get(sd)
            .await?
            .ok_or_else(|| CommandError::not_found("storage domain", sd))?;
        if let Some(m) = self.app.db.pool_attachments(sd).await?.first() {
            if m.data_center_id == dc {
                return Ok(m.clone());
            }
            return Err(CommandError::Conflict(format!(
                "storage domain {sd} is attached to another data center"
            )));
        }
        let first = self.app.db.pool_members(dc).await?.is_empty();
        let creator = if first {
            let hosts = self.app.dc_hosts(dc, true).await?;
            let h = hosts
                .iter()
                .max_by_key(|h| h.spm_priority)
                .ok_or_else(|| CommandError::Conflict(format!("data center {} has no host up", dcr.name)))?;
            Some(h.id)
        } else {
            None
        };
        self.run_as::<AttachStorageDomainSaga>(
            AttachParams { dc, sd, creator },
            Some(format!(
                "Attaching storage domain {} to data center {}",
                self.sd_label(sd).await,
                dcr.name
            )),
            correlation_id,
        )
        .await?;
        let m = self
            .app
            .db
            .pool_members(dc)
            .await?
            .into_iter()
            .find(|m| m.storage_domain_id == sd);
        m.ok_or_else(|| CommandError::not_found("storage domain attachment", sd))
    }

    /// Waits until the domain is active in the data center (tests, `oxvirt up`).
    pub async fn wait_domain_active(
        &self,
        dc: DcId,
        sd: SdUuid,
        timeout: Duration,
    ) -> Result<(), CommandError> {
        let start = std::time::Instant::now();
        loop {
            let m = self
                .app
                .db
                .pool_members(dc)
                .await?
                .into_iter()
                .find(|m| m.storage_domain_id == sd);
            if m.as_ref().is_some_and(|m| m.status == SdStatus::Active) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(CommandError::Conflict(format!(
                    "storage domain {sd} is {} after {timeout:?}",
                    m.map_or("detached".to_string(), |m| m.status.to_string())
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// oVirt's "select as SPM": the current SPM steps down (its node refuses while SPM tasks
    /// run) and `host` takes the role, both through the storage leases as any election.
    pub async fn force_select_spm(&self, host: HostUuid) -> Result<(), CommandError> {
        let h = self.app.host(host).await?;
        let dc = self.app.host_dc(&h).await?;
        if dc.status == DcStatus::Maintenance {
            return Err(CommandError::Conflict(format!(
                "data center {} is in maintenance: activate its master domain first",
                dc.name
            )));
        }
        if self.app.db.pool_master(dc.id).await?.is_none() {
            return Err(CommandError::Conflict(format!(
                "data center {} has no storage: there is no SPM role to give",
                dc.name
            )));
        }
        // Checked before the current SPM steps down, so that a refusal changes nothing.
        let connected = self
            .app
            .host_rt(host)
            .pool
            .is_some_and(|(p, _)| p == dc.storage_pool_id);
        if h.status != HostStatus::Up || h.spm_priority < 0 || !connected {
            return Err(CommandError::Conflict(format!(
                "host {} cannot be the SPM: it is {}, {}connected to the pool of data center {}, SPM priority {}",
                h.name,
                h.status,
                if connected { "" } else { "not " },
                dc.name,
                h.spm_priority
            )));
        }
        let _election = self.app.spm_elections.lock().await;
        crate::monitor::elect_spm(&self.app, dc.id, Some(host)).await?;
        let d = self.app.dc(dc.id).await?;
        if (d.spm_status, d.spm_host) != (SpmStatus::Spm, Some(host)) {
            return Err(CommandError::Conflict(format!(
                "host {} did not become the SPM of data center {}",
                h.name, d.name
            )));
        }
        Ok(())
    }

    /// Puts an attached domain into maintenance. No running VM may have a disk on it. The
    /// master domain hands its role to another active data domain first; when there is none,
    /// the whole data center goes to maintenance ([`pool_to_maintenance`]), as in oVirt.
    pub async fn deactivate_storage_domain(&self, dc: DcId, sd: SdUuid) -> Result<(), CommandError> {
        let dcr = self.app.dc(dc).await?;
        let m = member(&self.app, dc, sd).await?;
        if m.status == SdStatus::Maintenance {
            return Ok(());
        }
        let users = running_vms(
            &self.app,
            VmFilter {
                storage_domain: Some(Ref::Id(sd)),
                ..Default::default()
            },
        )
        .await?;
        if let Some(v) = users.first() {
            return Err(CommandError::Conflict(format!(
                "storage domain {sd} is in use by running VM {} ({} in all): stop them first",
                v.name,
                users.len()
            )));
        }
        if m.master && next_master(&self.app, dc, sd).await?.is_none() {
            let running = running_vms(
                &self.app,
                VmFilter {
                    data_center: Some(Ref::Id(dc)),
                    ..Default::default()
                },
            )
            .await?;
            if let Some(v) = running.first() {
                return Err(CommandError::Conflict(format!(
                    "data center {} would go to maintenance with its last data domain, but VM {} runs in it: stop its VMs first",
                    dcr.name, v.name
                )));
            }
        }
        let prior = match m.status {
            SdStatus::PreparingForMaintenance => SdStatus::Active,
            s => s,
        };
        // oVirt's DeactivateStorageDomainWithOvfUpdate: the stores describe what the domain
        // holds before it goes quiet. A failure is an event (see `update_ovf_store`) and no
        // reason to keep the domain up; detach checks the stores again.
        let data = self
            .app
            .db
            .sd_get(sd)
            .await?
            .is_some_and(|d| d.domain_type == SdType::Data);
        if m.status == SdStatus::Active && data {
            if let Err(e) = self.update_ovf_store(sd, false).await {
                tracing::warn!(sd = %sd, error = %e, "OVF stores not updated before deactivation");
            }
        }
        self.run_as::<DeactivateStorageDomainSaga>(
            DeactivateParams { dc, sd, prior },
            Some(format!(
                "Deactivating storage domain {} in data center {}",
                self.sd_label(sd).await,
                dcr.name
            )),
            None,
        )
        .await?;
        Ok(())
    }

    /// Activates an attached domain. The master domain of a data center in maintenance brings
    /// the data center back: hosts reconnect and an SPM is elected (waited for, within a bound).
    pub async fn activate_storage_domain(&self, dc: DcId, sd: SdUuid) -> Result<(), CommandError> {
        let dcr = self.app.dc(dc).await?;
        if dcr.status == DcStatus::Maintenance && self.app.db.pool_master(dc).await? == Some(sd) {
            let db = &self.app.db;
            db.pool_set_status(dc, sd, &[], SdStatus::Active).await?;
            db.dc_set_status(dc, DcStatus::Uninitialized).await?;
            self.app.kick.notify_one();
            let s = &self.app.settings;
            let bound = s.io_timeout * 8 + s.fence_margin + Duration::from_secs(60);
            let start = std::time::Instant::now();
            loop {
                let d = self.app.dc(dc).await?;
                if d.status == DcStatus::Up && d.spm_status == SpmStatus::Spm {
                    return Ok(());
                }
                if start.elapsed() > bound {
                    return Err(CommandError::Conflict(format!(
                        "data center {} has its master domain active again but no SPM after {bound:?}",
                        d.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let (_, spm) = self.app.spm(&dcr).await?;
        spm.call(
            "StoragePool.activateStorageDomain",
            json!({ "sdUUID": sd, "spUUID": dcr.storage_pool_id }),
        )
        .await?;
        self.app.db.pool_set_status(dc, sd, &[], SdStatus::Active).await?;
        Ok(())
    }

    /// Detaches a domain in maintenance from its data center. What lives on it leaves the
    /// engine's records with it ([`Leaving`]), to be registered again wherever the domain is
    /// attached next; that is safe only when its OVF stores describe the leaving VMs and
    /// templates as they are, which deactivation sees to (refused otherwise).
    pub async fn detach_storage_domain(&self, dc: DcId, sd: SdUuid) -> Result<(), CommandError> {
        let dcr = self.app.dc(dc).await?;
        let m = member(&self.app, dc, sd).await?;
        if m.master {
            return Err(CommandError::Conflict(
                "the master domain cannot be detached".into(),
            ));
        }
        if !matches!(m.status, SdStatus::Maintenance | SdStatus::Detaching) {
            return Err(CommandError::Conflict(format!(
                "storage domain {sd} is {}: deactivate it first",
                m.status
            )));
        }
        let leaving = leaving_with(&self.app, dc, sd).await?;
        let outdated = self.ovf_outdated(dc, sd, &leaving.entity_ids()).await?;
        if !outdated.is_empty() {
            return Err(CommandError::Conflict(format!(
                "the OVF stores of storage domain {} do not describe {} of the VMs and templates that would leave with it (the first: {}): activate the domain and update its OVF stores, then deactivate and detach it",
                self.sd_label(sd).await,
                outdated.len(),
                outdated[0]
            )));
        }
        self.run_as::<DetachStorageDomainSaga>(
            DetachParams { dc, sd, leaving },
            Some(format!(
                "Detaching storage domain {} from data center {}",
                self.sd_label(sd).await,
                dcr.name
            )),
            None,
        )
        .await?;
        Ok(())
    }

    /// Removes an unattached domain that holds no disks; with `destroy` its storage is
    /// formatted through `host` (any up host when `None`).
    pub async fn remove_storage_domain(
        &self,
        sd: SdUuid,
        host: Option<HostUuid>,
        destroy: bool,
    ) -> Result<(), CommandError> {
        let s = self
            .app
            .db
            .sd_get(sd)
            .await?
            .ok_or_else(|| CommandError::not_found("storage domain", sd))?;
        if !self.app.db.pool_attachments(sd).await?.is_empty() {
            return Err(CommandError::Conflict(format!(
                "storage domain {} is attached: detach it first",
                s.name
            )));
        }
        refuse_holding_disks(&self.app, sd, "removed").await?;
        let format_on = match (destroy, host) {
            (false, _) => None,
            (true, Some(h)) => Some(self.app.host(h).await?.id),
            (true, None) => Some(
                self.app
                    .db
                    .host_list(&crate::db::ListQuery {
                        filter: crate::db::HostFilter {
                            status: vec![HostStatus::Up],
                            ..Default::default()
                        },
                        ..Default::default()
                    })
                    .await?
                    .into_iter()
                    .next()
                    .ok_or_else(|| CommandError::Conflict("no host is up to format the domain".into()))?
                    .id,
            ),
        };
        self.run_as::<RemoveStorageDomainSaga>(
            RemoveDomainParams { sd, format_on },
            Some(format!("Removing storage domain {}", s.name)),
            None,
        )
        .await?;
        Ok(())
    }

    /// A storage domain's name for a job's description (its id if it is gone).
    pub(crate) async fn sd_label(&self, sd: SdUuid) -> String {
        match self.app.db.sd_get(sd).await {
            Ok(Some(s)) => s.name,
            _ => sd.to_string(),
        }
    }

    /// The data center a domain is attached to.
    pub async fn domain_dc(&self, sd: SdUuid) -> Result<DataCenter, CommandError> {
        let m = self.domain_member(sd).await?;
        self.app.dc(m.data_center_id).await
    }

    /// A domain's attachment to its data center.
    pub(crate) async fn domain_member(&self, sd: SdUuid) -> Result<PoolMember, CommandError> {
        self.app
            .db
            .pool_attachments(sd)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                CommandError::Conflict(format!("storage domain {sd} is not attached to a data center"))
            })
    }

    pub async fn add_disk(
        &self,
        mut req: AddDisk,
        correlation_id: Option<String>,
    ) -> Result<Added<Disk>, CommandError> {
        if req.provisioned_size == 0 || req.provisioned_size > (64 << 40) {
            return Err(CommandError::invalid(format!(
                "disk size {} is outside 1 byte..64 TiB",
                req.provisioned_size
            )));
        }
        if req.content_type == DiskContentType::Iso
            && (req.format != DiskFormat::Raw || req.attach_to.is_some())
        {
            return Err(CommandError::invalid(format!(
                "ISO disk {}: an ISO is a raw disk, and goes into a CD-ROM rather than being attached",
                req.name
            )));
        }
        // A disk for a running VM is plugged once its volume exists: attached inactive first.
        let mut hot_vm = None;
        if let Some(a) = req.attach_to.as_mut().filter(|a| a.active) {
            let v = self.vm(a.vm).await?;
            if self.disk_hot_host(&v, "an active disk is attached")?.is_some() {
                super::attachments::refuse_cold_only(a.interface)?;
                a.active = false;
                hot_vm = Some(a.vm);
            }
        }
        let dc = self.domain_dc(req.storage_domain).await?;
        if dc.status != DcStatus::Up || dc.spm_status != SpmStatus::Spm {
            return Err(CommandError::Conflict(format!(
                "data center {} is {}: storage is not ready",
                dc.name, dc.status
            )));
        }
        if let Some(p) = req.disk_profile {
            let p = self
                .app
                .db
                .disk_profile_get(p)
                .await?
                .ok_or_else(|| CommandError::not_found("disk profile", p))?;
            if p.storage_domain_id != req.storage_domain {
                return Err(CommandError::Conflict(format!(
                    "disk profile {} is of another storage domain than disk {}",
                    p.name, req.name
                )));
            }
        }
        // oVirt's needs: the whole size when preallocated, a header's worth when sparse.
        let needed = if req.sparse { 1 << 20 } else { req.provisioned_size };
        check_space(
            &self.app,
            req.storage_domain,
            needed,
            &format!("add disk {}", req.name),
        )
        .await?;
        let disk = DiskId::new_random();
        let pending = self
            .run_adding::<AddDiskSaga, _, _>(
                AddDiskParams {
                    disk,
                    volume: VolUuid::new_random(),
                    dc: dc.id,
                    req,
                },
                None,
                correlation_id,
                true,
                move |cmds| async move {
                    match hot_vm {
                        Some(vm) => cmds.activate_new_disk(vm, disk).await,
                        None => Ok(()),
                    }
                },
            )
            .await?;
        let entity = self
            .app
            .db
            .disk_get(disk)
            .await?
            .ok_or_else(|| CommandError::not_found("disk", disk))?;
        Ok(Added { entity, pending })
    }

    pub async fn remove_disk(
        &self,
        disk: DiskId,
        correlation_id: Option<String>,
    ) -> Result<(), CommandError> {
        let d = self
            .app
            .db
            .disk_get(disk)
            .await?
            .ok_or_else(|| CommandError::not_found("disk", disk))?;
        self.refuse_iso_in_use(&d).await?;
        for a in self.app.db.attachments_of_disk(disk).await? {
            let vm = self.app.db.vm_get(a.vm_id).await?;
            if vm.is_some_and(|v| v.runtime.status != crate::model::VmStatus::Down) {
                return Err(CommandError::Conflict(format!(
                    "disk {} is attached to a running VM",
                    d.name
                )));
            }
        }
        if !self.app.db.template_list(&Default::default()).await?.is_empty() {
            for t in self.app.db.template_list(&Default::default()).await? {
                if self
                    .app
                    .db
                    .template_disks(t.id)
                    .await?
                    .iter()
                    .any(|td| td.id == disk)
                {
                    return Err(CommandError::Conflict(format!(
                        "disk {} belongs to template {}",
                        d.name, t.name
                    )));
                }
            }
        }
        let dc = self.domain_dc(d.storage_domain_id).await?;
        self.run_as::<RemoveDiskSaga>(
            RemoveDiskParams { disk, dc: dc.id },
            Some(format!("Removing disk {}", d.name)),
            correlation_id,
        )
        .await?;
        Ok(())
    }

    /// Moves a disk to another active data domain of its data center, as oVirt's "Move": cold
    /// when its VMs are down, live when the one VM using it is up (see [`super::live_move`]).
    /// A disk that is a thin clone of a template is refused: its chain starts at the
    /// template's volume, which would have to be on the destination first.
    pub async fn move_disk(
        &self,
        disk: DiskId,
        dst: SdUuid,
        correlation_id: Option<String>,
    ) -> Result<Disk, CommandError> {
        let (d, to, dc, running) = self.disk_transfer_check(disk, dst, "moves", true).await?;
        self.check_copy_space(&d, dst, &format!("move disk {}", d.name))
            .await?;
        let src = d.storage_domain_id;
        if dst == src {
            return Err(CommandError::invalid(format!(
                "disk {} is on storage domain {} already",
                d.name,
                self.sd_label(dst).await
            )));
        }
        if let Some(v) = self
            .app
            .db
            .volume_chain(disk)
            .await?
            .into_iter()
            .find(|v| v.disk_id != disk)
        {
            return Err(CommandError::Conflict(format!(
                "disk {} is a thin clone of a template (its base volume {} is the template's): it cannot move alone",
                d.name, v.id
            )));
        }
        if let Some(vm) = running {
            return self.live_move_disk(d, to, dc, vm, correlation_id).await;
        }
        let what = format!(
            "Moving disk {} from storage domain {} to {}",
            d.name,
            self.sd_label(src).await,
            to.name
        );
        self.run_as::<MoveDiskSaga>(
            MoveDiskParams {
                disk,
                dc: dc.id,
                src,
                dst,
            },
            Some(what),
            correlation_id,
        )
        .await?;
        self.app
            .db
            .disk_get(disk)
            .await?
            .ok_or_else(|| CommandError::not_found("disk", disk))
    }

    /// Copies a disk whose VMs are down into a new disk of one volume on `dst` (which may be
    /// the disk's own domain); `name` defaults to oVirt's "<name>_Copy". Returns the copy.
    pub async fn copy_disk(
        &self,
        disk: DiskId,
        dst: SdUuid,
        name: Option<String>,
        correlation_id: Option<String>,
    ) -> Result<Disk, CommandError> {
        let (d, to, dc, _) = self.disk_transfer_check(disk, dst, "is copied", false).await?;
        self.check_copy_space(&d, dst, &format!("copy disk {}", d.name))
            .await?;
        let name = name.unwrap_or_else(|| format!("{}_Copy", d.name));
        if name.trim().is_empty() {
            return Err(CommandError::invalid("the copy's name is empty"));
        }
        let chain = self.app.db.volume_chain(disk).await?;
        // A single raw volume stays raw; a chain collapses into qcow2.
        let format = match chain.as_slice() {
            [only] => only.format,
            _ => DiskFormat::Cow,
        };
        let copy = DiskId::new_random();
        let what = format!(
            "Copying disk {} from storage domain {} to {} as {}",
            d.name,
            self.sd_label(d.storage_domain_id).await,
            to.name,
            name
        );
        self.run_as::<CopyDiskSaga>(
            CopyDiskParams {
                disk,
                dc: dc.id,
                src: d.storage_domain_id,
                dst,
                copy,
                volume: VolUuid::new_random(),
                name,
                format,
            },
            Some(what),
            correlation_id,
        )
        .await?;
        self.app
            .db
            .disk_get(copy)
            .await?
            .ok_or_else(|| CommandError::not_found("disk", copy))
    }

    /// Grows a disk to `size` bytes (rounded up to 4 KiB, as the storage rounds capacities),
    /// under its running VM too. A disk already that big is returned as it is; shrinking, a
    /// template's disk and a shareable disk in use are refused.
    pub async fn extend_disk(
        &self,
        disk: DiskId,
        size: u64,
        correlation_id: Option<String>,
    ) -> Result<Disk, CommandError> {
        const ALIGN: u64 = 4096;
        let d = self
            .app
            .db
            .disk_get(disk)
            .await?
            .ok_or_else(|| CommandError::not_found("disk", disk))?;
        let size = size.div_ceil(ALIGN) * ALIGN;
        if size == d.provisioned_size {
            return Ok(d);
        }
        if size < d.provisioned_size {
            return Err(CommandError::invalid(format!(
                "disk {} has {} bytes: it cannot shrink to {size}",
                d.name, d.provisioned_size
            )));
        }
        if size > MAX_DISK_SIZE {
            return Err(CommandError::invalid(format!(
                "{size} bytes is more than a disk may have ({MAX_DISK_SIZE})"
            )));
        }
        if d.status != DiskStatus::Ok {
            return Err(CommandError::Conflict(format!("disk {} is {}", d.name, d.status)));
        }
        let chain = self.app.db.volume_chain(disk).await?;
        let leaf = chain
            .last()
            .ok_or_else(|| CommandError::Conflict(format!("disk {} has no volumes", d.name)))?;
        if leaf.voltype == VolType::Shared || leaf.disk_id != disk {
            return Err(CommandError::Conflict(format!(
                "disk {} belongs to a template: a template's disks do not change",
                d.name
            )));
        }
        let mut live = Vec::new();
        for a in self.app.db.attachments_of_disk(disk).await? {
            let Some(vm) = self.app.db.vm_get(a.vm_id).await? else {
                continue;
            };
            match vm.runtime.status {
                // A suspended VM's saved devices expect the disk's old size.
                crate::model::VmStatus::Down => {}
                crate::model::VmStatus::Up | crate::model::VmStatus::Paused if a.active => {
                    live.push((vm.id, vm.runtime.run_on_host.expect("a running VM has a host")))
                }
                s => {
                    return Err(CommandError::Conflict(format!(
                        "disk {} is attached to VM {}, which is {s}: extend it when the VM is up or down",
                        d.name, vm.name
                    )))
                }
            }
        }
        if live.len() > 1 {
            return Err(CommandError::Conflict(format!(
                "shareable disk {} is in use by {} running VMs: extend it while at most one runs",
                d.name,
                live.len()
            )));
        }
        let dc = self.domain_dc(d.storage_domain_id).await?;
        let what = format!("Extending disk {} to {}", d.name, crate::model::bytes(size));
        self.run_as::<ExtendDiskSaga>(
            ExtendDiskParams {
                disk,
                dc: dc.id,
                sd: d.storage_domain_id,
                leaf: leaf.id,
                size,
                live: live.pop(),
            },
            Some(what),
            correlation_id,
        )
        .await?;
        self.app
            .db
            .disk_get(disk)
            .await?
            .ok_or_else(|| CommandError::not_found("disk", disk))
    }

    /// What moving or copying a disk to `dst` needs: the disk `ok` and its VMs down, `dst` an
    /// active data domain of the disk's data center. Returns the disk, `dst` and the data center.
    /// The disk, the destination and the data center of a copy or move, checked; with `live`,
    /// the one VM that runs the disk (a live move), if it is up.
    /// [`check_space`] for a copy of disk `d` (its whole chain) on `dst`: its allocation, plus
    /// oVirt's 10 % for qcow2 metadata.
    pub(super) async fn check_copy_space(
        &self,
        d: &Disk,
        dst: SdUuid,
        action: &str,
    ) -> Result<(), CommandError> {
        let chain = self.app.db.volume_chain(d.id).await?;
        let actual: u64 = chain.iter().map(|v| v.actual_size).sum();
        let needed = match d.format {
            DiskFormat::Cow => actual.saturating_add(actual / 10),
            DiskFormat::Raw => actual,
        };
        check_space(&self.app, dst, needed, action).await
    }

    pub(super) async fn disk_transfer_check(
        &self,
        disk: DiskId,
        dst: SdUuid,
        verb: &str,
        live: bool,
    ) -> Result<(Disk, StorageDomain, DataCenter, Option<crate::model::Vm>), CommandError> {
        let d = self
            .app
            .db
            .disk_get(disk)
            .await?
            .ok_or_else(|| CommandError::not_found("disk", disk))?;
        if d.status != DiskStatus::Ok {
            return Err(CommandError::Conflict(format!("disk {} is {}", d.name, d.status)));
        }
        let src = d.storage_domain_id;
        let to = self
            .app
            .db
            .sd_get(dst)
            .await?
            .ok_or_else(|| CommandError::not_found("storage domain", dst))?;
        let dc = self.domain_dc(src).await?;
        let m = member(&self.app, dc.id, dst).await.map_err(|_| {
            CommandError::Conflict(format!(
                "storage domain {} is not in data center {}, where disk {} is",
                to.name, dc.name, d.name
            ))
        })?;
        if m.status != SdStatus::Active || to.domain_type != SdType::Data {
            return Err(CommandError::Conflict(format!(
                "storage domain {} is {} ({}): a disk {verb} to an active data domain",
                to.name, m.status, to.domain_type
            )));
        }
        let mut running = None;
        for a in self.app.db.attachments_of_disk(disk).await? {
            let Some(vm) = self.app.db.vm_get(a.vm_id).await? else {
                continue;
            };
            match vm.runtime.status {
                crate::model::VmStatus::Down => {}
                // Not plugged: the VM does not use it.
                crate::model::VmStatus::Up if live && !a.active => {}
                crate::model::VmStatus::Up if live && !d.shareable => running = Some(vm),
                s if live => {
                    return Err(CommandError::Conflict(format!(
                    "disk {} is attached to VM {}, which is {s}: a disk moves while its VM is down or up{}",
                    d.name,
                    vm.name,
                    if d.shareable {
                        " (and a shareable disk only while all are down)"
                    } else {
                        ""
                    }
                )))
                }
                s => {
                    return Err(CommandError::Conflict(format!(
                        "disk {} is attached to VM {}, which is {s}: stop it first",
                        d.name, vm.name
                    )))
                }
            }
        }
        Ok((d, to, dc, running))
    }

    /// Gives up the SPM role when `h` holds it (maintenance). An SPM with tasks running keeps
    /// the role and the request is refused, as oVirt refuses it: the role would otherwise be
    /// cleared here while the host still held the SDM lease, and no other host could take it.
    /// A host that cannot be reached is let go: its lease, not this record, guards the role.
    pub(crate) async fn release_spm_if_held(&self, h: &Host) -> Result<(), CommandError> {
        for dc in self.app.db.dc_list(&Default::default()).await? {
            if dc.spm_host == Some(h.id) {
                let node = self.app.client(h)?;
                match node
                    .call("StoragePool.spmStop", json!({ "spUUID": dc.storage_pool_id }))
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.code() == Some(CODE_SPM_BUSY) => {
                        return Err(CommandError::Conflict(format!(
                            "host {} is the SPM of data center {} and has storage tasks running: \
                             wait for them to end",
                            h.name, dc.name
                        )));
                    }
                    Err(e) => {
                        tracing::warn!(host = %h.name, dc = %dc.name, error = %e, "spmStop failed; the SPM lease decides who is SPM next")
                    }
                }
                self.app.db.dc_spm_clear(dc.id, h.id).await?;
            }
        }
        Ok(())
    }
}

async fn running_vms(app: &App, filter: VmFilter) -> Result<Vec<crate::model::Vm>, CommandError> {
    let q = ListQuery {
        filter,
        ..Default::default()
    };
    Ok(app
        .db
        .vm_list(&q)
        .await?
        .into_iter()
        .filter(|v| v.runtime.status.is_running())
        .collect())
}

/// Moves the master role (pool metadata, task journal, SDM lease) from `old` to `new` with
/// a bumped master version; connected hosts refresh to it on their next poll. Storage moves
/// first, then the database: should the engine stop in between, the deactivation repeated
/// finds the pool on another master already (as the SPM reports it) and only records that.
async fn move_master(app: &App, dcr: &DataCenter, old: SdUuid, new: SdUuid) -> Result<(), CommandError> {
    let (_, spm) = app.spm(dcr).await?;
    let info = spm
        .call("StoragePool.getInfo", json!({ "spUUID": dcr.storage_pool_id }))
        .await?;
    let on_storage: Option<SdUuid> = info["info"]["master_uuid"].as_str().and_then(|m| m.parse().ok());
    let (new, version) = match on_storage {
        Some(m) if m != old => {
            let v = info["info"]["master_ver"].as_i64();
            (m, v.unwrap_or(dcr.master_version + 1))
        }
        _ => {
            let version = dcr.master_version + 1;
            spm.call(
                "StoragePool.switchMaster",
                json!({
                    "spUUID": dcr.storage_pool_id, "oldMasterUUID": old, "newMasterUUID": new,
                    "masterVersion": version,
                }),
            )
            .await?;
            (new, version)
        }
    };
    let db = &app.db;
    db.pool_set_master(dcr.id, new).await?;
    db.dc_set_master_version(dcr.id, dcr.master_version, version)
        .await?;
    app.kick.notify_one();
    dc_event(
        app,
        dcr,
        1002,
        format!(
            "The master role of data center {} moved from storage domain {old} to {new} (master version {version})",
            dcr.name
        ),
    )
    .await
}

async fn dc_event(app: &App, dc: &DataCenter, code: i32, text: String) -> Result<(), CommandError> {
    let mut e = NewEvent::new(Severity::Normal, code, text);
    e.data_center_id = Some(dc.id);
    app.db.event_add(&e).await?;
    Ok(())
}

/// The last active data domain of a data center (`master`) goes to maintenance, and the data
/// center with it: the SPM stops, every host disconnects from the pool, and the monitor leaves
/// the data center alone until its master domain is activated again. Answers the data center's
/// status before, for an undo. The domain's own status is the caller's.
async fn pool_to_maintenance(app: &App, dcr: &DataCenter, master: SdUuid) -> Result<DcStatus, CommandError> {
    let running = running_vms(
        app,
        VmFilter {
            data_center: Some(Ref::Id(dcr.id)),
            ..Default::default()
        },
    )
    .await?;
    if let Some(v) = running.first() {
        return Err(CommandError::Conflict(format!(
            "data center {} would go to maintenance with its last data domain, but VM {} runs in it: stop its VMs first",
            dcr.name, v.name
        )));
    }
    let db = &app.db;
    // No election runs meanwhile (one in flight could restart the SPM just stopped), and the
    // status goes first so that the monitor neither elects nor reconnects hosts afterwards.
    let _election = app.spm_elections.lock().await;
    let dcr = &app.dc(dcr.id).await?;
    db.dc_set_status(dcr.id, DcStatus::Maintenance).await?;
    if let Err(e) = stop_pool(app, dcr).await {
        // Back as it was: the monitor reconnects whatever was disconnected and re-elects.
        db.dc_set_status(dcr.id, dcr.status).await?;
        app.kick.notify_one();
        return Err(e);
    }
    dc_event(
        app,
        dcr,
        1001,
        format!(
            "Data center {} is in maintenance: its last data domain {master} was deactivated",
            dcr.name
        ),
    )
    .await?;
    Ok(dcr.status)
}

/// Stops the SPM and disconnects every up host from the pool.
async fn stop_pool(app: &App, dcr: &DataCenter) -> Result<(), CommandError> {
    let db = &app.db;
    if let Ok((h, spm)) = app.spm(dcr).await {
        spm.call("StoragePool.spmStop", json!({ "spUUID": dcr.storage_pool_id }))
            .await?;
        db.dc_spm_clear(dcr.id, h.id).await?;
    }
    for h in app.dc_hosts(dcr.id, true).await? {
        let node = app.client(&h)?;
        match node
            .call("StoragePool.disconnect", json!({ "spUUID": dcr.storage_pool_id }))
            .await
        {
            Ok(_) => {}
            Err(e) if e.to_string().contains("not connected") => {}
            Err(e) => return Err(e.into()),
        }
        app.update_host_rt(h.id, |rt| {
            rt.pool = None;
            rt.domains.clear();
        });
    }
    Ok(())
}
