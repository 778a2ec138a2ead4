//! Live storage migration: moving a running VM's disk to another data domain while the guest
//! writes to it, as oVirt's "Move" of a disk whose VM is up.
//!
//! The command takes an automatic snapshot of the disk (so the guest writes only to a new,
//! empty leaf from then on), runs [`LiveMoveDiskSaga`], and removes the snapshot again (a
//! live merge on whichever domain the disk ended on). The saga:
//!
//! ```text
//!  lock ─► clone (SPM: the chain made again on the destination, empty, ILLEGAL)
//!       ─► sync (SPM: every volume below the leaf copied; the guest only reads those)
//!       ─► replicate_start (the VM's host: the copy opened, the leaf mirrored onto it)
//!       ─► replicate_finish (the host: mirror in step, the disk switched to the copy)
//!       ─► record ◆ (the copy's leaf LEGAL, the disk on the destination in the database)
//!       ─► delete_source ─► unlock                    ◆ point of no return
//! ```
//!
//! Undos: an aborted mirror (`diskReplicateFinish` onto the source) and the copy deleted. The
//! switch can happen unheard (an answer lost): then the host says the disk is on the copy,
//! and the undos of the replica steps turn the saga forward — the guest writes there now.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::app::App;
use crate::model::{DcId, DiskId, DiskStatus, SdUuid, VmId, VolUuid};
use crate::nodes::{NodeClient, NodeError};
use crate::saga::{SagaDef, Step, StepCtx, StepError};

use super::step_err;
use super::storage::{delete_image, disk_lock_step};

/// The description of the snapshot a live storage migration takes and removes (oVirt's).
pub const LSM_SNAPSHOT: &str = "Auto-generated for Live Storage Migration";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveMoveDiskParams {
    pub disk: DiskId,
    pub dc: DcId,
    pub src: SdUuid,
    pub dst: SdUuid,
    pub vm: VmId,
    /// The leaf the guest writes (the automatic snapshot's): mirrored, not synced.
    pub leaf: VolUuid,
}

impl LiveMoveDiskParams {
    fn drive(&self, sd: SdUuid) -> Value {
        json!({ "domainID": sd, "imageID": self.disk, "volumeID": self.leaf, "device": "disk" })
    }
}

/// The node running the VM now (it cannot migrate while a replica runs: the node refuses).
async fn vm_node(app: &App, vm: VmId) -> Result<NodeClient, StepError> {
    let v = app
        .db
        .vm_get(vm)
        .await?
        .ok_or_else(|| step_err(format!("VM {vm} is gone")))?;
    let host = v
        .runtime
        .run_on_host
        .ok_or_else(|| step_err(format!("VM {} is not running", v.name)))?;
    app.host_client(host).await.map_err(step_err)
}

/// Whether the VM on `node` has disk `disk` on domain `sd`; `None` when the node does not run
/// the VM.
async fn disk_on(node: &NodeClient, vm: VmId, disk: DiskId, sd: SdUuid) -> Result<Option<bool>, NodeError> {
    let info = match node.call("VM.getInfo", json!({ "vmID": vm })).await {
        Ok(info) => info,
        Err(e) if e.code() == Some(oxvirt_types::api::ErrorCode::NoVm.code()) => return Ok(None),
        Err(e) => return Err(e),
    };
    let (sd, img) = (sd.to_string(), disk.to_string());
    Ok(Some(info["disks"].as_array().into_iter().flatten().any(|d| {
        d["image"]["sd"].as_str() == Some(sd.as_str()) && d["image"]["img"].as_str() == Some(img.as_str())
    })))
}

/// For the undos: a disk that runs on the copy already was switched (unheard) — the saga
/// must go forward. A node that cannot tell leaves the undo failing (an admin looks).
async fn forward_if_switched(app: &App, p: &LiveMoveDiskParams) -> Result<(), StepError> {
    let node = match vm_node(app, p.vm).await {
        Ok(n) => n,
        // Not running any more: nothing of it writes the copy.
        Err(_) => return Ok(()),
    };
    match disk_on(&node, p.vm, p.disk, p.dst).await {
        Ok(Some(true)) => Err(StepError::forward(format!(
            "VM {} already runs disk {} on storage domain {}",
            p.vm, p.disk, p.dst
        ))),
        Ok(_) => Ok(()),
        Err(e) => Err(step_err(format!(
            "cannot tell whether VM {} runs disk {} on its copy, so the copy stays: {e}",
            p.vm, p.disk
        ))),
    }
}

pub struct LiveMoveDiskSaga;

impl SagaDef for LiveMoveDiskSaga {
    type Ctx = App;
    type Params = LiveMoveDiskParams;
    const NAME: &'static str = "live_move_disk";

    fn description(p: &Self::Params) -> String {
        format!(
            "Moving disk {} of running VM {} from storage domain {} to {}",
            p.disk, p.vm, p.src, p.dst
        )
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            disk_lock_step(|p: &Self::Params| p.disk).describe("Locking the disk"),
            Step::new(
                "clone",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                    let args = json!({
                        "spUUID": dc.storage_pool_id, "sdUUID": p.src, "imgUUID": p.disk, "dstSdUUID": p.dst,
                    });
                    if let Err(e) = spm
                        .run_task("Image.cloneStructure", args, app.settings.task_timeout)
                        .await
                    {
                        // Made by an earlier run whose answer was lost: the leaf is there.
                        let info = spm
                            .call(
                                "Volume.getInfo",
                                json!({ "sdUUID": p.dst, "imgUUID": p.disk, "volUUID": p.leaf }),
                            )
                            .await;
                        if info.is_err() {
                            return Err(step_err(e));
                        }
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    forward_if_switched(c.app(), p).await?;
                    delete_image(c.app(), p.dc, p.dst, p.disk).await
                },
            )
            .describe("Creating the disk's volumes on the destination"),
            Step::without_undo("sync", |c: StepCtx<Self>| async move {
                let p = c.params();
                let app = c.app();
                let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                let args = json!({
                    "spUUID": dc.storage_pool_id, "sdUUID": p.src, "imgUUID": p.disk, "dstSdUUID": p.dst,
                    "syncType": "INTERNAL",
                });
                // Idempotent: volumes synced by an earlier run are LEGAL and skipped.
                spm.run_task("Image.syncData", args, app.settings.task_timeout)
                    .await
                    .map_err(step_err)
            })
            .describe("Copying the data below the disk's active volume"),
            Step::new(
                "replicate_start",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let node = vm_node(c.app(), p.vm).await?;
                    node.call(
                        "VM.diskReplicateStart",
                        json!({ "vmID": p.vm, "srcDisk": p.drive(p.src), "dstDisk": p.drive(p.dst) }),
                    )
                    .await
                    .map_err(step_err)?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    let Ok(node) = vm_node(app, p.vm).await else {
                        return Ok(()); // the VM stopped: its mirror ended with it
                    };
                    let r = node
                        .run_job(
                            "VM.diskReplicateFinish",
                            json!({ "vmID": p.vm, "srcDisk": p.drive(p.src), "dstDisk": p.drive(p.src) }),
                            app.settings.task_timeout,
                        )
                        .await;
                    match r {
                        Ok(v) if v["pivoted"] == json!(true) => Err(StepError::forward(format!(
                            "VM {} already runs disk {} on storage domain {}",
                            p.vm, p.disk, p.dst
                        ))),
                        Ok(_) => Ok(()),
                        Err(e) if e.code() == Some(oxvirt_types::api::ErrorCode::NoVm.code()) => Ok(()),
                        // No replica to drop (it never started): the disk says where it is.
                        Err(e) => match disk_on(&node, p.vm, p.disk, p.src).await {
                            Ok(Some(true)) | Ok(None) => Ok(()),
                            _ => Err(step_err(e)),
                        },
                    }
                },
            )
            .describe("Mirroring the disk's active volume to the destination"),
            Step::new(
                "replicate_finish",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    let node = vm_node(app, p.vm).await?;
                    node.run_job(
                        "VM.diskReplicateFinish",
                        json!({ "vmID": p.vm, "srcDisk": p.drive(p.src), "dstDisk": p.drive(p.dst) }),
                        app.settings.task_timeout,
                    )
                    .await
                    .map_err(step_err)?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move { forward_if_switched(c.app(), c.params()).await },
            )
            .describe("Switching the running VM to the destination"),
            Step::without_undo("record", |c: StepCtx<Self>| async move {
                let p = c.params();
                let app = c.app();
                let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                let args = json!({
                    "spUUID": dc.storage_pool_id, "sdUUID": p.dst, "imgUUID": p.disk, "volUUID": p.leaf,
                    "legality": "LEGAL",
                });
                spm.run_task("Volume.setLegality", args, app.settings.task_timeout)
                    .await
                    .map_err(step_err)?;
                c.db().disk_set_domain(p.disk, p.dst).await?;
                Ok(())
            })
            // The guest writes to the copy now: only forward.
            .point_of_no_return()
            .describe("Recording the new domain"),
            Step::without_undo("delete_source", |c: StepCtx<Self>| async move {
                let p = c.params();
                delete_image(c.app(), p.dc, p.src, p.disk).await
            })
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

impl super::Commands {
    /// The live path of [`super::Commands::move_disk`]: the automatic snapshot, the saga, and
    /// the snapshot's removal (a live merge), which runs whatever the saga's end — a failed
    /// move leaves the disk where it was, without the extra volume.
    pub(super) async fn live_move_disk(
        &self,
        d: crate::model::Disk,
        to: crate::model::StorageDomain,
        dc: crate::model::DataCenter,
        vm: crate::model::Vm,
        correlation_id: Option<String>,
    ) -> Result<crate::model::Disk, super::CommandError> {
        use super::CommandError;
        let src = d.storage_domain_id;
        let snap = self
            .add_snapshot(
                vm.id,
                super::AddSnapshot {
                    description: LSM_SNAPSHOT.into(),
                    persist_memory: false,
                    disks: Some(vec![d.id]),
                },
                correlation_id.clone(),
            )
            .await?;
        let leaf = self
            .app
            .db
            .volume_chain(d.id)
            .await?
            .last()
            .map(|v| v.id)
            .ok_or_else(|| CommandError::Conflict(format!("disk {} has no volumes", d.name)))?;
        let what = format!(
            "Moving disk {} of running VM {} from storage domain {} to {}",
            d.name,
            vm.name,
            self.sd_label(src).await,
            to.name
        );
        let moved = self
            .run_as::<LiveMoveDiskSaga>(
                LiveMoveDiskParams {
                    disk: d.id,
                    dc: dc.id,
                    src,
                    dst: to.id,
                    vm: vm.id,
                    leaf,
                },
                Some(what),
                correlation_id.clone(),
            )
            .await;
        if let Err(e) = self.remove_snapshot(vm.id, snap.id, correlation_id).await {
            // The move stands; the snapshot stays for an administrator to remove, as in oVirt.
            tracing::warn!(disk = %d.id, vm = %vm.id, snapshot = %snap.id, error = %e,
                "cannot remove the live storage migration's snapshot");
        }
        moved?;
        self.app
            .db
            .disk_get(d.id)
            .await?
            .ok_or_else(|| CommandError::not_found("disk", d.id))
    }
}
