//! Snapshots: create (cold, or live with the VM running), restore, delete (= merge, cold or
//! live), and oVirt's preview with its commit or undo.
//!
//! A snapshot records, per disk, the volume that was the disk's leaf when it was taken; a new
//! leaf on top of it becomes the disk's active layer. Deleting a snapshot merges its volume's
//! child into it, which removes the child from the chain.
//!
//! Preview: oVirt (with VDSM) branches a second leaf off the previewed snapshot's volume and
//! keeps the present leaf aside. Our storage keeps chains linear (one leaf per image), so the
//! preview leaf goes on top of the present leaf instead and is made to show the snapshot's
//! content (storage copies in exactly the clusters that differ; see
//! `FileStorageDomain::create_snapshot_of`). Every existing volume stays untouched, so:
//! - the present is recorded as a `preview`-type snapshot ("Active VM before the preview")
//!   naming the kept leaf of each disk, and the previewed snapshot is `in_preview`;
//! - undo deletes the volumes above the kept leaf: the disk is exactly as before the preview;
//! - commit keeps the preview leaf as the present and drops the records of the kept state and
//!   of the snapshots newer than the previewed one (their volumes stay as plain layers of the
//!   chain under the preview leaf; a later snapshot removal merges them like any other).
//!
//! While a preview is open the VM takes no other snapshot operation (as in oVirt); preview,
//! commit and undo want the VM down.

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::app::App;
use crate::model::{
    DcId, DiskFormat, DiskId, HostUuid, Snapshot, SnapshotDisk, SnapshotId, SnapshotMemory, SnapshotStatus,
    SnapshotType, StateVolume, VmConfiguration, VmId, VmStatus, VolType, VolUuid, Volume,
};
use crate::saga::{SagaDef, Step, StepCtx, StepError};

use super::step_err;
use super::storage::{create_volume, delete_image};

const CODE_VOLUME_NOT_FOUND: i64 = oxvirt_types::api::ErrorCode::VolumeNotFound.code();
use super::vms::create_state_volume;
use super::{Added, CommandError, Commands};

/// Whether the VM running on `node` writes to every one of `leaves` (each the top of one of
/// its disks' chains): the node did switch to them, whatever the engine heard. A VM the node
/// does not run writes to nothing there; a node that does not answer leaves it unknown (`Err`).
async fn runs_on_leaves(
    node: &crate::nodes::NodeClient,
    vm: VmId,
    leaves: &[VolUuid],
) -> Result<bool, crate::nodes::NodeError> {
    let info = match node.call("VM.getInfo", json!({ "vmID": vm })).await {
        Ok(info) => info,
        Err(e) if e.code() == Some(oxvirt_types::api::ErrorCode::NoVm.code()) => return Ok(false),
        Err(e) => return Err(e),
    };
    let tops: Vec<String> = info["chains"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_array()?.last()?.as_str())
        .filter_map(|p| {
            Some(
                std::path::Path::new(p)
                    .file_name()?
                    .to_string_lossy()
                    .into_owned(),
            )
        })
        .collect();
    Ok(leaves.iter().all(|l| tops.contains(&l.to_string())))
}

/// VM `vm`'s configuration as a snapshot keeps it.
async fn configuration_of(app: &App, vm: VmId) -> Result<VmConfiguration, StepError> {
    let v = app
        .db
        .vm_get(vm)
        .await?
        .ok_or_else(|| step_err(format!("VM {vm} is gone")))?;
    Ok(v.configuration())
}

/// Gives VM `vm` the configuration snapshot `snapshot` kept (nothing for a snapshot that kept
/// none, or is gone: a crash after the step that dropped it). An ISO removed since leaves the
/// CD-ROM empty. Idempotent.
async fn restore_configuration(app: &App, vm: VmId, snapshot: SnapshotId) -> Result<(), StepError> {
    let Some(mut config) = app.db.snapshot_get(snapshot).await?.and_then(|s| s.configuration) else {
        return Ok(());
    };
    if let Some(iso) = config.cdrom {
        if app.db.disk_get(iso).await?.is_none() {
            config.cdrom = None;
        }
    }
    let v = app
        .db
        .vm_get(vm)
        .await?
        .ok_or_else(|| step_err(format!("VM {vm} is gone")))?;
    if v.configuration() != config {
        app.db.vm_update(&v.with_configuration(&config)).await?;
    }
    Ok(())
}

/// For the undos of a live snapshot: when the running VM already writes to the new volumes
/// (the switch happened, unheard) the snapshot is taken and the saga turns forward to record
/// it; when its node cannot tell, the undo refuses (the saga waits for an admin) — deleting
/// what a guest may write to would lose its data.
async fn refuse_if_switched(app: &App, p: &AddSnapshotParams) -> Result<(), StepError> {
    let Some(host) = p.live_on else { return Ok(()) };
    let node = app
        .client(&app.host(host).await.map_err(step_err)?)
        .map_err(step_err)?;
    let leaves: Vec<VolUuid> = p.disks.iter().map(|d| d.new_leaf).collect();
    match runs_on_leaves(&node, p.vm, &leaves).await {
        Ok(false) => Ok(()),
        Ok(true) => Err(StepError::forward(format!(
            "VM {} already writes to the snapshot's new volumes: the snapshot is taken",
            p.vm
        ))),
        Err(e) => Err(step_err(format!(
            "cannot tell whether VM {} writes to the snapshot's new volumes, so they stay: {e}",
            p.vm
        ))),
    }
}

/// Deletes the records of snapshots the VM no longer has, with the volumes holding the
/// memory they saved. A replay finds them gone.
async fn forget_snapshots(app: &App, dc: DcId, ids: &[SnapshotId]) -> Result<(), StepError> {
    for s in ids {
        if let Some(m) = app.db.snapshot_memory_get(*s).await? {
            delete_image(app, dc, m.state.sd, m.state.img).await?;
        }
        app.db.snapshot_delete(*s).await?;
    }
    Ok(())
}

/// The status a down VM rests in once a saga on its images ends: `suspended` when its next
/// start resumes from a saved state (a snapshot's memory, after a preview or restore with
/// it), else `down`.
async fn resting(app: &App, vm: VmId) -> Result<crate::model::VmRuntime, StepError> {
    let status = match app.db.vm_hibernation_get(vm).await? {
        Some(_) => VmStatus::Suspended,
        None => VmStatus::Down,
    };
    Ok(crate::model::VmRuntime {
        status,
        ..Default::default()
    })
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AddSnapshot {
    pub description: String,
    pub persist_memory: bool,
    /// The disks to snapshot (oVirt's `disk_attachments`); all the VM's when `None`.
    #[serde(default)]
    pub disks: Option<Vec<DiskId>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapDisk {
    pub disk: DiskId,
    pub sd: crate::model::SdUuid,
    pub capacity: u64,
    pub old_leaf: VolUuid,
    pub new_leaf: VolUuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddSnapshotParams {
    pub snapshot: SnapshotId,
    pub vm: VmId,
    pub dc: DcId,
    pub description: String,
    pub disks: Vec<SnapDisk>,
    /// The host the VM runs on when the snapshot is live.
    pub live_on: Option<HostUuid>,
    /// Where the running VM's memory goes, for a snapshot with memory.
    #[serde(default)]
    pub memory: Option<SnapshotMemory>,
    #[serde(default)]
    pub memory_volume_size: u64,
}

pub struct AddSnapshotSaga;

impl SagaDef for AddSnapshotSaga {
    type Ctx = App;
    type Params = AddSnapshotParams;
    const NAME: &'static str = "add_snapshot";

    fn description(p: &Self::Params) -> String {
        format!("Creating snapshot {:?} of VM {}", p.description, p.vm)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "record",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    if c.db().snapshot_get(p.snapshot).await?.is_none() {
                        let config = configuration_of(c.app(), p.vm).await?;
                        c.db()
                            .snapshot_insert(&Snapshot::locked(
                                p.snapshot,
                                p.vm,
                                p.description.clone(),
                                SnapshotType::Regular,
                                p.disks.iter().map(|d| SnapshotDisk { disk_id: d.disk, volume_id: d.old_leaf }).collect(),
                                config,
                            ))
                            .await?;
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    c.db().snapshot_delete(c.params().snapshot).await?;
                    Ok(())
                },
            )
            .describe("Recording the snapshot"),
            Step::new(
                "volumes",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                    for d in &p.disks {
                        let args = json!({
                            "sdUUID": d.sd, "spUUID": dc.storage_pool_id, "imgUUID": d.disk, "size": d.capacity,
                            "volFormat": "COW", "preallocate": "SPARSE", "volUUID": d.new_leaf,
                            "desc": p.description, "srcImgUUID": d.disk, "srcVolUUID": d.old_leaf,
                        });
                        create_volume(&spm, args, d.sd, d.disk, d.new_leaf, app.settings.task_timeout).await?;
                        if c.db().volume_get(d.new_leaf).await?.is_none() {
                            c.db()
                                .volume_insert(&Volume {
                                    id: d.new_leaf,
                                    disk_id: d.disk,
                                    storage_domain_id: d.sd,
                                    parent_id: Some(d.old_leaf),
                                    voltype: VolType::Leaf,
                                    format: DiskFormat::Cow,
                                    actual_size: 0,
                                    created_at: crate::time::Timestamp::from_millis(0),
                                })
                                .await?;
                            c.db().volume_set_type(d.old_leaf, VolType::Internal).await?;
                        }
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    refuse_if_switched(app, p).await?;
                    let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                    for d in &p.disks {
                        let args = json!({ "sdUUID": d.sd, "spUUID": dc.storage_pool_id, "imgUUID": d.disk, "volUUID": d.new_leaf });
                        if let Err(e) = spm.run_task("Volume.delete", args, app.settings.task_timeout).await {
                            let info = spm.call("Volume.getInfo", json!({ "sdUUID": d.sd, "imgUUID": d.disk, "volUUID": d.new_leaf })).await;
                            if info.is_ok() {
                                return Err(step_err(e));
                            }
                        }
                        if c.db().volume_delete(d.new_leaf).await? {
                            c.db().volume_set_type(d.old_leaf, VolType::Leaf).await?;
                        }
                    }
                    Ok(())
                },
            )
            .describe("Creating the new active volumes"),
            Step::new(
                "memory",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let Some(m) = p.memory else { return Ok(()) };
                    let desc = format!("memory of snapshot {:?} of VM {}", p.description, p.vm);
                    create_state_volume(c.app(), p.dc, &m.state, p.memory_volume_size, &desc).await
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    if let Some(m) = p.memory {
                        // A snapshot taken unheard keeps the memory it saved.
                        refuse_if_switched(c.app(), p).await?;
                        delete_image(c.app(), p.dc, m.state.sd, m.state.img).await?;
                    }
                    Ok(())
                },
            )
            .describe("Creating the volume for the VM's memory"),
            Step::without_undo("live", |c: StepCtx<Self>| async move {
                let p = c.params();
                let Some(host) = p.live_on else { return Ok(()) };
                let h = c.app().host(host).await.map_err(step_err)?;
                let node = c.app().client(&h).map_err(step_err)?;
                let drives: Vec<_> =
                    p.disks.iter().map(|d| json!({ "domainID": d.sd, "imageID": d.disk, "volumeID": d.new_leaf })).collect();
                let mut args = json!({ "vmID": p.vm, "snapDrives": drives });
                if let Some(m) = p.memory {
                    args["snapMemory"] = json!({ "sdUUID": m.state.sd, "imgUUID": m.state.img, "volUUID": m.state.vol });
                }
                match node.run_job("VM.snapshot", args, c.app().settings.migration_timeout).await {
                    Ok(_) => Ok(()),
                    // The answer can be lost (a timeout, the node restarting) after the switch:
                    // then the snapshot is taken (the node saves the memory before switching),
                    // and undoing it would delete the volumes the guest writes to.
                    Err(e) => {
                        let leaves: Vec<VolUuid> = p.disks.iter().map(|d| d.new_leaf).collect();
                        if runs_on_leaves(&node, p.vm, &leaves).await.unwrap_or(false) {
                            tracing::warn!(vm = %p.vm, error = %e, "the snapshot's switch happened though its job failed");
                            Ok(())
                        } else {
                            Err(step_err(e))
                        }
                    }
                }
            })
            .describe("Switching the running VM to the new volumes"),
            Step::without_undo("done", |c: StepCtx<Self>| async move {
                let p = c.params();
                if let Some(m) = &p.memory {
                    c.db().snapshot_memory_set(p.snapshot, m).await?;
                }
                c.db().snapshot_set_status(p.snapshot, &[], SnapshotStatus::Ok).await?;
                Ok(())
            })
            // After the switch the guest writes to the new volumes: only forward from here.
            .point_of_no_return(),
        ]
    }
}

/// One disk's merge: `top` (the snapshot volume's child) goes into `base` (the snapshot's).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MergeDisk {
    pub disk: DiskId,
    pub sd: crate::model::SdUuid,
    pub base: VolUuid,
    pub top: VolUuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveSnapshotParams {
    pub snapshot: SnapshotId,
    pub vm: VmId,
    pub dc: DcId,
    pub merges: Vec<MergeDisk>,
    pub live_on: Option<HostUuid>,
}

pub struct RemoveSnapshotSaga;

impl SagaDef for RemoveSnapshotSaga {
    type Ctx = App;
    type Params = RemoveSnapshotParams;
    const NAME: &'static str = "remove_snapshot";

    fn description(p: &Self::Params) -> String {
        format!("Removing snapshot {} of VM {}", p.snapshot, p.vm)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "lock",
                |c: StepCtx<Self>| async move {
                    c.db().snapshot_set_status(c.params().snapshot, &[SnapshotStatus::Ok, SnapshotStatus::Locked], SnapshotStatus::Locked).await?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let _ = c.db().snapshot_set_status(c.params().snapshot, &[SnapshotStatus::Locked], SnapshotStatus::Ok).await;
                    Ok(())
                },
            ),
            // Past this point data moves between volumes: forward only (storage's journal
            // finishes a merge an SPM crash interrupted).
            Step::without_undo("merge", |c: StepCtx<Self>| async move {
                let p = c.params();
                let app = c.app();
                let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                for m in &p.merges {
                    if c.db().volume_get(m.top).await?.is_none() {
                        continue; // merged before a crash
                    }
                    let args = json!({ "sdUUID": m.sd, "spUUID": dc.storage_pool_id, "imgUUID": m.disk, "ancestor": m.base, "successor": m.top });
                    // A retry after the storage side finished (its answer lost): only the
                    // records are left to update.
                    let info = |vol: VolUuid| spm.call("Volume.getInfo", json!({ "sdUUID": m.sd, "imgUUID": m.disk, "volUUID": vol }));
                    let top_gone = matches!(info(m.top).await, Err(e) if e.code() == Some(CODE_VOLUME_NOT_FOUND));
                    match p.live_on {
                        _ if top_gone => {}
                        None => spm.run_task("Image.mergeSnapshots", args, app.settings.task_timeout).await.map_err(step_err)?,
                        Some(host) => {
                            if let Err(e) = spm.run_task("Image.prepareMerge", args.clone(), app.settings.task_timeout).await {
                                // Prepared by an earlier attempt: the base is ILLEGAL already.
                                let prepared = info(m.base).await.is_ok_and(|i| {
                                    i["meta"]["legality"].as_str().is_some_and(|l| l.eq_ignore_ascii_case("illegal"))
                                });
                                if !prepared {
                                    return Err(step_err(e));
                                }
                            }
                            let h = app.host(host).await.map_err(step_err)?;
                            let node = app.client(&h).map_err(step_err)?;
                            node.run_job(
                                "VM.merge",
                                json!({ "vmID": p.vm, "domainID": m.sd, "imageID": m.disk, "baseVolUUID": m.base, "topVolUUID": m.top }),
                                app.settings.task_timeout,
                            )
                            .await
                            .map_err(step_err)?;
                            spm.run_task("Image.finalizeMerge", args, app.settings.task_timeout).await.map_err(step_err)?;
                        }
                    }
                    // The chain without `top`: its child (if any) now sits on `base`, which takes
                    // `top`'s role.
                    let top = c.db().volume_get(m.top).await?.ok_or_else(|| step_err("volume row vanished"))?;
                    for v in c.db().volume_chain(m.disk).await? {
                        if v.parent_id == Some(m.top) {
                            c.db().volume_set_parent(v.id, Some(m.base)).await?;
                        }
                    }
                    c.db().volume_set_type(m.base, top.voltype).await?;
                    for s in c.db().snapshots_of_vm(p.vm).await? {
                        if s.disks.iter().any(|d| d.disk_id == m.disk && d.volume_id == m.top) {
                            c.db().snapshot_set_disk_volume(s.id, m.disk, m.base).await?;
                        }
                    }
                    c.db().volume_delete(m.top).await?;
                }
                Ok(())
            })
            .describe("Merging the snapshot's data")
            .point_of_no_return(),
            Step::without_undo("record", |c: StepCtx<Self>| async move {
                let p = c.params();
                forget_snapshots(c.app(), p.dc, &[p.snapshot]).await
            }),
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreDisk {
    pub disk: DiskId,
    pub sd: crate::model::SdUuid,
    pub capacity: u64,
    /// Volumes above the snapshot's, leaf first: deleted.
    pub discard: Vec<VolUuid>,
    pub snapshot_volume: VolUuid,
    pub new_leaf: VolUuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreSnapshotParams {
    pub snapshot: SnapshotId,
    pub vm: VmId,
    pub dc: DcId,
    pub disks: Vec<RestoreDisk>,
    /// Snapshots newer than the restored one: they lose their volumes and go.
    pub newer: Vec<SnapshotId>,
    /// The snapshot's saved memory, restored with it: the VM's next start resumes from it.
    #[serde(default)]
    pub memory: Option<StateVolume>,
}

pub struct RestoreSnapshotSaga;

impl SagaDef for RestoreSnapshotSaga {
    type Ctx = App;
    type Params = RestoreSnapshotParams;
    const NAME: &'static str = "restore_snapshot";

    fn description(p: &Self::Params) -> String {
        format!("Restoring VM {} to snapshot {}", p.vm, p.snapshot)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "lock",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let rt = crate::model::VmRuntime { status: VmStatus::ImageLocked, ..Default::default() };
                    c.db().vm_set_runtime(p.vm, &[VmStatus::Down, VmStatus::ImageLocked], &rt).await?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let _ = c.db().vm_set_runtime(c.params().vm, &[VmStatus::ImageLocked], &Default::default()).await;
                    Ok(())
                },
            ),
            Step::without_undo("discard", |c: StepCtx<Self>| async move {
                let p = c.params();
                let app = c.app();
                let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                for d in &p.disks {
                    for v in &d.discard {
                        if c.db().volume_get(*v).await?.is_none() {
                            continue;
                        }
                        let args = json!({ "sdUUID": d.sd, "spUUID": dc.storage_pool_id, "imgUUID": d.disk, "volUUID": v });
                        if let Err(e) = spm.run_task("Volume.delete", args, app.settings.task_timeout).await {
                            let still = spm.call("Volume.getInfo", json!({ "sdUUID": d.sd, "imgUUID": d.disk, "volUUID": v })).await;
                            if still.is_ok() {
                                return Err(step_err(e));
                            }
                        }
                        c.db().volume_delete(*v).await?;
                    }
                    let args = json!({
                        "sdUUID": d.sd, "spUUID": dc.storage_pool_id, "imgUUID": d.disk, "size": d.capacity,
                        "volFormat": "COW", "preallocate": "SPARSE", "volUUID": d.new_leaf, "desc": "restored",
                        "srcImgUUID": d.disk, "srcVolUUID": d.snapshot_volume,
                    });
                    create_volume(&spm, args, d.sd, d.disk, d.new_leaf, app.settings.task_timeout).await?;
                    if c.db().volume_get(d.new_leaf).await?.is_none() {
                        c.db()
                            .volume_insert(&Volume {
                                id: d.new_leaf,
                                disk_id: d.disk,
                                storage_domain_id: d.sd,
                                parent_id: Some(d.snapshot_volume),
                                voltype: VolType::Leaf,
                                format: DiskFormat::Cow,
                                actual_size: 0,
                                created_at: crate::time::Timestamp::from_millis(0),
                            })
                            .await?;
                    }
                }
                forget_snapshots(app, p.dc, &p.newer).await
            })
            .describe("Discarding newer data and starting from the snapshot")
            .point_of_no_return(),
            Step::without_undo("unlock", |c: StepCtx<Self>| async move {
                let p = c.params();
                if let Some(st) = &p.memory {
                    c.db().vm_hibernation_set(p.vm, st).await?;
                }
                restore_configuration(c.app(), p.vm, p.snapshot).await?;
                let rt = resting(c.app(), p.vm).await?;
                let _ = c.db().vm_set_runtime(p.vm, &[VmStatus::ImageLocked], &rt).await;
                Ok(())
            }),
        ]
    }
}

/// One disk's preview: a new leaf over the present leaf `keep`, showing `snapshot_volume`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreviewDisk {
    pub disk: DiskId,
    pub sd: crate::model::SdUuid,
    pub capacity: u64,
    pub keep: VolUuid,
    pub snapshot_volume: VolUuid,
    pub new_leaf: VolUuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreviewSnapshotParams {
    /// The previewed snapshot.
    pub snapshot: SnapshotId,
    /// The record of the present kept aside (type `preview`).
    pub kept: SnapshotId,
    pub vm: VmId,
    pub dc: DcId,
    pub disks: Vec<PreviewDisk>,
    /// The snapshot's saved memory, previewed with it: the VM's next start resumes from it.
    #[serde(default)]
    pub memory: Option<StateVolume>,
}

/// The VM's status while a saga works on its images (the VM was down and will be again).
fn locked() -> crate::model::VmRuntime {
    crate::model::VmRuntime {
        status: VmStatus::ImageLocked,
        ..Default::default()
    }
}

pub struct PreviewSnapshotSaga;

impl SagaDef for PreviewSnapshotSaga {
    type Ctx = App;
    type Params = PreviewSnapshotParams;
    const NAME: &'static str = "preview_snapshot";

    fn description(p: &Self::Params) -> String {
        format!("Previewing snapshot {} of VM {}", p.snapshot, p.vm)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "lock",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    c.db().vm_set_runtime(p.vm, &[VmStatus::Down, VmStatus::ImageLocked], &locked()).await?;
                    c.db().snapshot_set_status(p.snapshot, &[SnapshotStatus::Ok, SnapshotStatus::Locked], SnapshotStatus::Locked).await?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let _ = c.db().snapshot_set_status(p.snapshot, &[SnapshotStatus::Locked], SnapshotStatus::Ok).await;
                    let _ = c.db().vm_set_runtime(p.vm, &[VmStatus::ImageLocked], &Default::default()).await;
                    Ok(())
                },
            )
            .describe("Locking the VM and the snapshot"),
            Step::new(
                "record",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    if c.db().snapshot_get(p.kept).await?.is_none() {
                        let config = configuration_of(c.app(), p.vm).await?;
                        c.db()
                            .snapshot_insert(&Snapshot::locked(
                                p.kept,
                                p.vm,
                                "Active VM before the preview",
                                SnapshotType::Preview,
                                p.disks.iter().map(|d| SnapshotDisk { disk_id: d.disk, volume_id: d.keep }).collect(),
                                config,
                            ))
                            .await?;
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    c.db().snapshot_delete(c.params().kept).await?;
                    Ok(())
                },
            )
            .describe("Recording the present state kept aside"),
            Step::new(
                "volumes",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                    for d in &p.disks {
                        // srcVolUUID below the leaf: the new leaf shows that volume's content.
                        let args = json!({
                            "sdUUID": d.sd, "spUUID": dc.storage_pool_id, "imgUUID": d.disk, "size": d.capacity,
                            "volFormat": "COW", "preallocate": "SPARSE", "volUUID": d.new_leaf,
                            "desc": "preview", "srcImgUUID": d.disk, "srcVolUUID": d.snapshot_volume,
                        });
                        create_volume(&spm, args, d.sd, d.disk, d.new_leaf, app.settings.task_timeout).await?;
                        if c.db().volume_get(d.new_leaf).await?.is_none() {
                            c.db()
                                .volume_insert(&Volume {
                                    id: d.new_leaf,
                                    disk_id: d.disk,
                                    storage_domain_id: d.sd,
                                    parent_id: Some(d.keep),
                                    voltype: VolType::Leaf,
                                    format: DiskFormat::Cow,
                                    actual_size: 0,
                                    created_at: crate::time::Timestamp::from_millis(0),
                                })
                                .await?;
                            c.db().volume_set_type(d.keep, VolType::Internal).await?;
                        }
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                    for d in &p.disks {
                        delete_leaf(&spm, &dc, d.sd, d.disk, d.new_leaf, app.settings.task_timeout).await?;
                        if c.db().volume_delete(d.new_leaf).await? {
                            c.db().volume_set_type(d.keep, VolType::Leaf).await?;
                        }
                    }
                    Ok(())
                },
            )
            .describe("Creating the preview volumes"),
            Step::new(
                "done",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    c.db().snapshot_set_status(p.kept, &[], SnapshotStatus::Ok).await?;
                    c.db().snapshot_set_status(p.snapshot, &[SnapshotStatus::Locked, SnapshotStatus::InPreview], SnapshotStatus::InPreview).await?;
                    if let Some(st) = &p.memory {
                        c.db().vm_hibernation_set(p.vm, st).await?;
                    }
                    restore_configuration(c.app(), p.vm, p.snapshot).await?;
                    let rt = resting(c.app(), p.vm).await?;
                    let _ = c.db().vm_set_runtime(p.vm, &[VmStatus::ImageLocked], &rt).await;
                    Ok(())
                },
                // Back to what the lock step made, so that its undo and the others' apply.
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    restore_configuration(c.app(), p.vm, p.kept).await?;
                    let _ = c.db().snapshot_set_status(p.snapshot, &[SnapshotStatus::InPreview], SnapshotStatus::Locked).await;
                    if p.memory.is_some() {
                        c.db().vm_hibernation_clear(p.vm).await?;
                    }
                    let _ = c.db().vm_set_runtime(p.vm, &[VmStatus::Down, VmStatus::Suspended], &locked()).await;
                    Ok(())
                },
            ),
        ]
    }
}

/// Deletes a leaf volume on the SPM; a volume already gone counts as deleted.
async fn delete_leaf(
    spm: &crate::nodes::NodeClient,
    dc: &crate::model::DataCenter,
    sd: crate::model::SdUuid,
    disk: DiskId,
    vol: VolUuid,
    timeout: std::time::Duration,
) -> Result<(), StepError> {
    let args = json!({ "sdUUID": sd, "spUUID": dc.storage_pool_id, "imgUUID": disk, "volUUID": vol });
    if let Err(e) = spm.run_task("Volume.delete", args, timeout).await {
        let info = spm
            .call(
                "Volume.getInfo",
                json!({ "sdUUID": sd, "imgUUID": disk, "volUUID": vol }),
            )
            .await;
        if info.is_ok() {
            return Err(step_err(e));
        }
    }
    Ok(())
}

/// How an open preview ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PreviewEnd {
    /// The preview becomes the present; the kept state and newer snapshots go.
    Commit,
    /// The kept state comes back; the preview's volumes go.
    Undo,
}

/// One disk on undo: its volumes above `keep`, leaf first, are deleted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UndoDisk {
    pub disk: DiskId,
    pub sd: crate::model::SdUuid,
    pub keep: VolUuid,
    pub discard: Vec<VolUuid>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndPreviewParams {
    pub end: PreviewEnd,
    pub snapshot: SnapshotId,
    pub kept: SnapshotId,
    pub vm: VmId,
    pub dc: DcId,
    /// Undo: the disks to return to their kept leaf.
    pub disks: Vec<UndoDisk>,
    /// Commit: the snapshots newer than the previewed one, whose records go.
    pub newer: Vec<SnapshotId>,
    /// Undo: the VM waits to resume from the previewed snapshot's memory; it no longer does.
    #[serde(default)]
    pub drop_memory: bool,
}

pub struct EndPreviewSaga;

impl SagaDef for EndPreviewSaga {
    type Ctx = App;
    type Params = EndPreviewParams;
    const NAME: &'static str = "end_preview";

    fn description(p: &Self::Params) -> String {
        match p.end {
            PreviewEnd::Commit => format!("Committing the preview of snapshot {} of VM {}", p.snapshot, p.vm),
            PreviewEnd::Undo => format!("Undoing the preview of snapshot {} of VM {}", p.snapshot, p.vm),
        }
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "lock",
                |c: StepCtx<Self>| async move {
                    c.db()
                        .vm_set_runtime(
                            c.params().vm,
                            &[VmStatus::Down, VmStatus::Suspended, VmStatus::ImageLocked],
                            &locked(),
                        )
                        .await?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let rt = resting(c.app(), c.params().vm).await?;
                    let _ = c
                        .db()
                        .vm_set_runtime(c.params().vm, &[VmStatus::ImageLocked], &rt)
                        .await;
                    Ok(())
                },
            )
            .describe("Locking the VM"),
            // Forward only: each action is idempotent, a crash resumes where it stopped.
            Step::without_undo("volumes", |c: StepCtx<Self>| async move {
                let p = c.params();
                if p.end == PreviewEnd::Commit || p.disks.is_empty() {
                    return Ok(());
                }
                let app = c.app();
                let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                for d in &p.disks {
                    for v in &d.discard {
                        if c.db().volume_get(*v).await?.is_none() {
                            continue;
                        }
                        delete_leaf(&spm, &dc, d.sd, d.disk, *v, app.settings.task_timeout).await?;
                        c.db().volume_delete(*v).await?;
                    }
                    c.db().volume_set_type(d.keep, VolType::Leaf).await?;
                }
                Ok(())
            })
            .describe("Returning the disks to the state kept aside")
            .point_of_no_return(),
            Step::without_undo("records", |c: StepCtx<Self>| async move {
                let p = c.params();
                if p.end == PreviewEnd::Undo {
                    restore_configuration(c.app(), p.vm, p.kept).await?;
                }
                forget_snapshots(c.app(), p.dc, &p.newer).await?;
                forget_snapshots(c.app(), p.dc, &[p.kept]).await?;
                let _ = c
                    .db()
                    .snapshot_set_status(p.snapshot, &[SnapshotStatus::InPreview], SnapshotStatus::Ok)
                    .await;
                if p.drop_memory {
                    c.db().vm_hibernation_clear(p.vm).await?;
                }
                let rt = resting(c.app(), p.vm).await?;
                let _ = c.db().vm_set_runtime(p.vm, &[VmStatus::ImageLocked], &rt).await;
                Ok(())
            }),
        ]
    }
}

impl Commands {
    async fn vm_disks_leaves(
        &self,
        vm: VmId,
    ) -> Result<Vec<(crate::model::Disk, Vec<Volume>)>, CommandError> {
        let mut out = Vec::new();
        for a in self.app.db.attachments_of_vm(vm).await? {
            let d = self
                .app
                .db
                .disk_get(a.disk_id)
                .await?
                .ok_or_else(|| CommandError::not_found("disk", a.disk_id))?;
            let chain = self.app.db.volume_chain(d.id).await?;
            out.push((d, chain));
        }
        Ok(out)
    }

    pub async fn add_snapshot(
        &self,
        vm: VmId,
        req: AddSnapshot,
        correlation_id: Option<String>,
    ) -> Result<Added<Snapshot>, CommandError> {
        let v = self.vm(vm).await?;
        self.refuse_in_preview(&v).await?;
        self.refuse_locked_disks(&v, "snapshot the VM").await?;
        let live_on = match v.runtime.status {
            VmStatus::Down => None,
            VmStatus::Up | VmStatus::Paused => v.runtime.run_on_host,
            s => {
                return Err(CommandError::Conflict(format!(
                    "VM {} is {s}: snapshots are taken when it is down or up",
                    v.name
                )))
            }
        };
        let dc = self.cluster_dc_of(v.cluster_id).await?;
        let mut disks = Vec::new();
        let all = self.vm_disks_leaves(vm).await?;
        if let Some(want) = &req.disks {
            if want.is_empty() {
                return Err(CommandError::invalid("a snapshot of no disks"));
            }
            if let Some(d) = want.iter().find(|d| !all.iter().any(|(x, _)| x.id == **d)) {
                return Err(CommandError::invalid(format!(
                    "disk {d} is not attached to VM {}",
                    v.name
                )));
            }
        }
        let chosen = |d: &crate::model::Disk| req.disks.as_ref().is_none_or(|w| w.contains(&d.id));
        for (d, chain) in all.into_iter().filter(|(d, _)| chosen(d)) {
            // Each new leaf starts as a qcow2 header.
            super::storage::check_space(
                &self.app,
                d.storage_domain_id,
                1 << 20,
                &format!("snapshot VM {}", v.name),
            )
            .await?;
            let leaf = chain
                .last()
                .ok_or_else(|| CommandError::Conflict(format!("disk {} has no volumes", d.name)))?;
            disks.push(SnapDisk {
                disk: d.id,
                sd: d.storage_domain_id,
                capacity: d.provisioned_size,
                old_leaf: leaf.id,
                new_leaf: VolUuid::new_random(),
            });
        }
        // As oVirt: the memory of a VM that is down is not there to save; that of a paused
        // one is refused (after the save its disks' block nodes stay inactive until it runs).
        let (memory, memory_volume_size) = match (req.persist_memory, v.runtime.status) {
            (true, VmStatus::Up) => {
                if let Some(h) = v.runtime.run_on_host {
                    self.refuse_hot_plugged(&v, h, "saved with a snapshot").await?;
                }
                let (state, size) = self.new_state_volume(&v).await?;
                let m = SnapshotMemory {
                    state,
                    memory_bytes: v.memory_bytes,
                    cpus: v.cpu.vcpus() as u32,
                };
                (Some(m), size)
            }
            (true, VmStatus::Paused) => {
                return Err(CommandError::Conflict(format!(
                    "VM {} is paused: its memory is saved only while it runs",
                    v.name
                )))
            }
            _ => (None, 0),
        };
        let snapshot = SnapshotId::new_random();
        let storage_work = !disks.is_empty();
        let what = format!("Creating snapshot {:?} of VM {}", req.description, v.name);
        let pending = self
            .run_adding::<AddSnapshotSaga, _, _>(
                AddSnapshotParams {
                    snapshot,
                    vm,
                    dc,
                    description: req.description,
                    disks,
                    live_on,
                    memory,
                    memory_volume_size,
                },
                Some(what),
                correlation_id,
                storage_work,
                |_| async { Ok(()) },
            )
            .await?;
        let entity = self
            .app
            .db
            .snapshot_get(snapshot)
            .await?
            .ok_or_else(|| CommandError::not_found("snapshot", snapshot))?;
        Ok(Added { entity, pending })
    }

    pub async fn remove_snapshot(
        &self,
        vm: VmId,
        snapshot: SnapshotId,
        correlation_id: Option<String>,
    ) -> Result<(), CommandError> {
        let v = self.unpaused(self.vm(vm).await?).await?;
        let s = self
            .app
            .db
            .snapshot_get(snapshot)
            .await?
            .filter(|s| s.vm_id == vm)
            .ok_or_else(|| CommandError::not_found("snapshot", snapshot))?;
        if s.snapshot_type == SnapshotType::Active {
            return Err(CommandError::Conflict(
                "the active snapshot cannot be removed".into(),
            ));
        }
        self.refuse_in_preview(&v).await?;
        self.refuse_locked_disks(&v, "remove the snapshot").await?;
        let live_on = match v.runtime.status {
            VmStatus::Down => None,
            VmStatus::Up => v.runtime.run_on_host,
            st => return Err(CommandError::Conflict(format!("VM {} is {st}", v.name))),
        };
        let dc = self.cluster_dc_of(v.cluster_id).await?;
        let mut merges = Vec::new();
        for sd in &s.disks {
            let d = self
                .app
                .db
                .disk_get(sd.disk_id)
                .await?
                .ok_or_else(|| CommandError::not_found("disk", sd.disk_id))?;
            let chain = self.app.db.volume_chain(d.id).await?;
            let top = chain
                .iter()
                .find(|v| v.parent_id == Some(sd.volume_id))
                .ok_or_else(|| {
                    CommandError::Conflict(format!(
                        "snapshot volume {} of disk {} has no child",
                        sd.volume_id, d.name
                    ))
                })?;
            merges.push(MergeDisk {
                disk: d.id,
                sd: d.storage_domain_id,
                base: sd.volume_id,
                top: top.id,
            });
        }
        self.run_as::<RemoveSnapshotSaga>(
            RemoveSnapshotParams {
                snapshot,
                vm,
                dc,
                merges,
                live_on,
            },
            Some(format!("Removing snapshot {:?} of VM {}", s.description, v.name)),
            correlation_id,
        )
        .await?;
        Ok(())
    }

    /// Restores a down VM's disks to a snapshot (newer snapshots go); with `restore_memory`
    /// and a snapshot that saved its memory, the VM's next start resumes from that moment.
    pub async fn restore_snapshot(
        &self,
        vm: VmId,
        snapshot: SnapshotId,
        restore_memory: bool,
        correlation_id: Option<String>,
    ) -> Result<(), CommandError> {
        let v = self.down_vm(vm, "restoring a snapshot").await?;
        let s = self
            .app
            .db
            .snapshot_get(snapshot)
            .await?
            .filter(|s| s.vm_id == vm)
            .ok_or_else(|| CommandError::not_found("snapshot", snapshot))?;
        if s.snapshot_type != SnapshotType::Regular {
            return Err(CommandError::invalid(format!(
                "snapshot {} is the {} one: only regular snapshots are restored",
                s.id, s.snapshot_type
            )));
        }
        self.refuse_in_preview(&v).await?;
        self.refuse_locked_disks(&v, "restore the snapshot").await?;
        let memory = self.memory_to_restore(&v, &s, restore_memory).await?;
        let dc = self.cluster_dc_of(v.cluster_id).await?;
        let mut disks = Vec::new();
        for sd in &s.disks {
            let d = self
                .app
                .db
                .disk_get(sd.disk_id)
                .await?
                .ok_or_else(|| CommandError::not_found("disk", sd.disk_id))?;
            let chain = self.app.db.volume_chain(d.id).await?;
            let pos = chain.iter().position(|v| v.id == sd.volume_id).ok_or_else(|| {
                CommandError::Conflict(format!(
                    "snapshot volume {} is not in disk {}'s chain",
                    sd.volume_id, d.name
                ))
            })?;
            let discard = chain[pos + 1..].iter().rev().map(|v| v.id).collect();
            disks.push(RestoreDisk {
                disk: d.id,
                sd: d.storage_domain_id,
                capacity: d.provisioned_size,
                discard,
                snapshot_volume: sd.volume_id,
                new_leaf: VolUuid::new_random(),
            });
        }
        let newer = self
            .app
            .db
            .snapshots_of_vm(vm)
            .await?
            .into_iter()
            .filter(|o| o.snapshot_type == SnapshotType::Regular && o.created_at > s.created_at)
            .map(|o| o.id)
            .collect();
        self.run_as::<RestoreSnapshotSaga>(
            RestoreSnapshotParams {
                snapshot,
                vm,
                dc,
                disks,
                newer,
                memory,
            },
            Some(format!("Restoring VM {} to snapshot {:?}", v.name, s.description)),
            correlation_id,
        )
        .await?;
        Ok(())
    }

    /// The open preview of the VM: (the record of the kept state, the previewed snapshot).
    async fn open_preview(&self, vm: VmId) -> Result<Option<(Snapshot, Snapshot)>, CommandError> {
        let all = self.app.db.snapshots_of_vm(vm).await?;
        let Some(kept) = all.iter().find(|s| s.snapshot_type == SnapshotType::Preview) else {
            return Ok(None);
        };
        let previewed = all
            .iter()
            .find(|s| s.status == SnapshotStatus::InPreview)
            .ok_or_else(|| {
                CommandError::Conflict(format!(
                    "VM {vm} has the kept state {} of a preview but no snapshot in preview",
                    kept.id
                ))
            })?;
        Ok(Some((kept.clone(), previewed.clone())))
    }

    async fn refuse_in_preview(&self, v: &crate::model::Vm) -> Result<(), CommandError> {
        if let Some((_, s)) = self.open_preview(v.id).await? {
            return Err(CommandError::Conflict(format!(
                "VM {} is previewing snapshot {:?} ({}): commit or undo the preview first",
                v.name, s.description, s.id
            )));
        }
        Ok(())
    }

    async fn down_vm(&self, vm: VmId, what: &str) -> Result<crate::model::Vm, CommandError> {
        let v = self.vm(vm).await?;
        if v.runtime.status != VmStatus::Down {
            return Err(CommandError::Conflict(format!(
                "VM {} is {}: stop it before {what}",
                v.name, v.runtime.status
            )));
        }
        Ok(v)
    }

    /// Previews a snapshot of a VM that is down: its disks show the snapshot's data (and take
    /// writes) until [`Self::commit_snapshot`] or [`Self::undo_snapshot`]; the present is kept.
    /// With `restore_memory` and a snapshot that saved its memory, the VM is `suspended` at the
    /// snapshot's moment: its next start resumes from there.
    pub async fn preview_snapshot(
        &self,
        vm: VmId,
        snapshot: SnapshotId,
        restore_memory: bool,
        correlation_id: Option<String>,
    ) -> Result<(), CommandError> {
        let v = self.down_vm(vm, "previewing a snapshot").await?;
        let s = self
            .app
            .db
            .snapshot_get(snapshot)
            .await?
            .filter(|s| s.vm_id == vm)
            .ok_or_else(|| CommandError::not_found("snapshot", snapshot))?;
        if s.snapshot_type != SnapshotType::Regular {
            return Err(CommandError::invalid(format!(
                "snapshot {} is the {} one: only regular snapshots are previewed",
                s.id, s.snapshot_type
            )));
        }
        self.refuse_in_preview(&v).await?;
        self.refuse_locked_disks(&v, "preview the snapshot").await?;
        if s.status != SnapshotStatus::Ok {
            return Err(CommandError::Conflict(format!(
                "snapshot {:?} is {}",
                s.description, s.status
            )));
        }
        let memory = self.memory_to_restore(&v, &s, restore_memory).await?;
        let dc = self.cluster_dc_of(v.cluster_id).await?;
        let mut disks = Vec::new();
        for (d, chain) in self.vm_disks_leaves(vm).await? {
            // A disk attached after the snapshot was taken keeps its data.
            let Some(sd) = s.disks.iter().find(|x| x.disk_id == d.id) else {
                continue;
            };
            let leaf = chain
                .last()
                .ok_or_else(|| CommandError::Conflict(format!("disk {} has no volumes", d.name)))?;
            if !chain.iter().any(|x| x.id == sd.volume_id) {
                return Err(CommandError::Conflict(format!(
                    "snapshot volume {} is not in disk {}'s chain",
                    sd.volume_id, d.name
                )));
            }
            disks.push(PreviewDisk {
                disk: d.id,
                sd: d.storage_domain_id,
                capacity: d.provisioned_size,
                keep: leaf.id,
                snapshot_volume: sd.volume_id,
                new_leaf: VolUuid::new_random(),
            });
        }
        self.run_as::<PreviewSnapshotSaga>(
            PreviewSnapshotParams {
                snapshot,
                kept: SnapshotId::new_random(),
                vm,
                dc,
                disks,
                memory,
            },
            Some(format!(
                "Previewing snapshot {:?} of VM {}",
                s.description, v.name
            )),
            correlation_id,
        )
        .await?;
        Ok(())
    }

    /// Ends the VM's preview keeping the previewed data (and what the VM wrote since) as the
    /// present; the state kept aside and the snapshots newer than the previewed one go.
    pub async fn commit_snapshot(
        &self,
        vm: VmId,
        correlation_id: Option<String>,
    ) -> Result<(), CommandError> {
        self.end_preview(vm, PreviewEnd::Commit, correlation_id).await
    }

    /// Ends the VM's preview returning its disks to the state kept aside, exactly.
    pub async fn undo_snapshot(&self, vm: VmId, correlation_id: Option<String>) -> Result<(), CommandError> {
        self.end_preview(vm, PreviewEnd::Undo, correlation_id).await
    }

    async fn end_preview(
        &self,
        vm: VmId,
        end: PreviewEnd,
        correlation_id: Option<String>,
    ) -> Result<(), CommandError> {
        let what = match end {
            PreviewEnd::Commit => "committing a preview",
            PreviewEnd::Undo => "undoing a preview",
        };
        let v = self.vm(vm).await?;
        let (kept, previewed) = self
            .open_preview(vm)
            .await?
            .ok_or_else(|| CommandError::Conflict(format!("VM {} has no snapshot in preview", v.name)))?;
        // Suspended at the previewed snapshot's moment (a preview with memory) counts as down.
        let pending = self.app.db.vm_hibernation_get(vm).await?;
        let previewed_memory = self.app.db.snapshot_memory_get(previewed.id).await?;
        let memory_pending = pending.is_some() && pending == previewed_memory.map(|m| m.state);
        if !(v.runtime.status == VmStatus::Down || v.runtime.status == VmStatus::Suspended && memory_pending)
        {
            return Err(CommandError::Conflict(format!(
                "VM {} is {}: stop it before {what}",
                v.name, v.runtime.status
            )));
        }
        let dc = self.cluster_dc_of(v.cluster_id).await?;
        let mut disks = Vec::new();
        if end == PreviewEnd::Undo {
            for k in &kept.disks {
                let d = self
                    .app
                    .db
                    .disk_get(k.disk_id)
                    .await?
                    .ok_or_else(|| CommandError::not_found("disk", k.disk_id))?;
                let chain = self.app.db.volume_chain(d.id).await?;
                let pos = chain.iter().position(|x| x.id == k.volume_id).ok_or_else(|| {
                    CommandError::Conflict(format!(
                        "kept volume {} is not in disk {}'s chain",
                        k.volume_id, d.name
                    ))
                })?;
                disks.push(UndoDisk {
                    disk: d.id,
                    sd: d.storage_domain_id,
                    keep: k.volume_id,
                    discard: chain[pos + 1..].iter().rev().map(|x| x.id).collect(),
                });
            }
        }
        let newer = match end {
            PreviewEnd::Undo => Vec::new(),
            // The VM's snapshots come oldest first: the regular ones after the previewed.
            PreviewEnd::Commit => self
                .app
                .db
                .snapshots_of_vm(vm)
                .await?
                .into_iter()
                .skip_while(|o| o.id != previewed.id)
                .skip(1)
                .filter(|o| o.snapshot_type == SnapshotType::Regular)
                .map(|o| o.id)
                .collect(),
        };
        self.run_as::<EndPreviewSaga>(
            EndPreviewParams {
                end,
                snapshot: previewed.id,
                kept: kept.id,
                vm,
                dc,
                disks,
                newer,
                drop_memory: end == PreviewEnd::Undo && memory_pending,
            },
            Some(match end {
                PreviewEnd::Commit => format!(
                    "Committing the preview of snapshot {:?} of VM {}",
                    previewed.description, v.name
                ),
                PreviewEnd::Undo => format!(
                    "Undoing the preview of snapshot {:?} of VM {}",
                    previewed.description, v.name
                ),
            }),
            correlation_id,
        )
        .await?;
        Ok(())
    }

    /// The saved memory to restore with snapshot `s` of VM `v`, when asked and it has some. A
    /// state loads only into a VM of the same memory and CPUs.
    async fn memory_to_restore(
        &self,
        v: &crate::model::Vm,
        s: &Snapshot,
        restore_memory: bool,
    ) -> Result<Option<StateVolume>, CommandError> {
        if !restore_memory {
            return Ok(None);
        }
        let Some(m) = self.app.db.snapshot_memory_get(s.id).await? else {
            return Ok(None);
        };
        // The snapshot brings its configuration back with it; one that kept none, the VM's.
        let now = s.configuration.clone().unwrap_or_else(|| v.configuration());
        if m.memory_bytes != now.memory_bytes || u64::from(m.cpus) != now.cpu.vcpus() {
            return Err(CommandError::Conflict(format!(
                "snapshot {:?} saved the memory of VM {} with {} MiB and {} CPUs, and it has {} MiB \
                 and {} CPUs now: restore the snapshot without its memory",
                s.description,
                v.name,
                m.memory_bytes >> 20,
                m.cpus,
                v.memory_bytes >> 20,
                v.cpu.vcpus()
            )));
        }
        Ok(Some(m.state))
    }

    async fn cluster_dc_of(&self, cluster: crate::model::ClusterId) -> Result<DcId, CommandError> {
        let cl = self.app.cluster(cluster).await?;
        Ok(cl.data_center_id)
    }
}
