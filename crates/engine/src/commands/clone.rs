//! Cloning a VM that is down (oVirt's `POST /vms/{id}/clone`), or any VM from one of its
//! snapshots (oVirt's `POST /vms` with `<snapshots><snapshot id>`): a new VM with the source's
//! configuration (memory, CPUs, boot settings, high availability, placement, the CD-ROM's
//! ISO; a snapshot's own where it kept one), each of its disks copied on the SPM into one
//! volume of its own (snapshots and a template below are collapsed, so the clone depends on
//! nothing; from a snapshot, the chain up to the snapshot's volume), and its NICs with MACs
//! of their own from the cluster's pool.
//!
//! The saga: `record` locks the source (its disks locked; the VM `image_locked` unless it
//! runs, which only a clone from a snapshot allows: the volumes read are below the leaf the
//! guest writes, and the locked disks keep merges, restores and previews away) and records
//! the clone with its disks and attachments, locked; `copy` runs `Image.copy` per disk
//! ([`super::storage::copy_collapsed`]); `unlock` releases both. Undo deletes the copied
//! images and the clone's records and unlocks the source, so a failure or crash at any point
//! leaves the source as it was and either no clone or a whole one. The NICs are added once
//! the saga is done, as for a VM made from a template. Shareable disks are not copied: the
//! clone shares them, as the source does.

use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::model::{
    DcId, Disk, DiskAttachment, DiskFormat, DiskId, DiskStatus, SnapshotId, SnapshotStatus, SnapshotType, Vm,
    VmConfiguration, VmId, VmRuntime, VmStatus, VolType, VolUuid, Volume, BLANK_TEMPLATE_ID,
};
use crate::saga::{SagaDef, Step, StepCtx};

use super::step_err;
use super::storage::{copy_collapsed, delete_image, CollapsedCopy};
use super::{Added, CommandError, Commands};

/// One disk of the source and its copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClonedDisk {
    pub src: DiskId,
    /// The source's volume the copy stops at (a snapshot's); its whole chain when `None`.
    #[serde(default)]
    pub src_vol: Option<VolUuid>,
    pub disk: DiskId,
    pub volume: VolUuid,
    /// Raw for a source of one raw volume, else qcow2 (the chain collapsed).
    pub format: DiskFormat,
    /// The clone's attachment of the copy (the source's, with the new ids).
    pub attachment: DiskAttachment,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneVmParams {
    pub src: VmId,
    /// The clone as recorded (down; its runtime is set by the saga).
    pub vm: Vm,
    pub dc: DcId,
    pub disks: Vec<ClonedDisk>,
    /// Shareable disks of the source, attached to the clone as they are.
    #[serde(default)]
    pub shared: Vec<DiskAttachment>,
    /// The snapshot cloned, locked meanwhile.
    #[serde(default)]
    pub snapshot: Option<SnapshotId>,
    /// The source VM runs (a clone from a snapshot): its status is left alone.
    #[serde(default)]
    pub src_running: bool,
}

pub struct CloneVmSaga;

impl SagaDef for CloneVmSaga {
    type Ctx = App;
    type Params = CloneVmParams;
    const NAME: &'static str = "clone_vm";

    fn description(p: &Self::Params) -> String {
        format!("Cloning VM {} as {}", p.src, p.vm.name)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "record",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let db = c.db();
                    let locked = VmRuntime {
                        status: VmStatus::ImageLocked,
                        ..Default::default()
                    };
                    if !p.src_running {
                        db.vm_set_runtime(p.src, &[VmStatus::Down, VmStatus::ImageLocked], &locked)
                            .await?;
                    }
                    for d in &p.disks {
                        db.disk_lock(d.src, c.saga_id).await?;
                    }
                    if let Some(s) = p.snapshot {
                        let from = [SnapshotStatus::Ok, SnapshotStatus::Locked];
                        db.snapshot_set_status(s, &from, SnapshotStatus::Locked).await?;
                    }
                    if db.vm_get(p.vm.id).await?.is_none() {
                        db.vm_insert(&p.vm).await?;
                    }
                    db.vm_set_runtime(p.vm.id, &[VmStatus::Down, VmStatus::ImageLocked], &locked)
                        .await?;
                    for d in &p.disks {
                        let src = db
                            .disk_get(d.src)
                            .await?
                            .ok_or_else(|| step_err("a source disk is gone"))?;
                        if db.disk_get(d.disk).await?.is_none() {
                            let mut n = Disk::new(
                                &format!("{}_{}", p.vm.name, src.name),
                                src.storage_domain_id,
                                d.format,
                                src.provisioned_size,
                            );
                            n.id = d.disk;
                            n.description = src.description.clone();
                            n.sparse = d.format == DiskFormat::Cow || src.sparse;
                            n.wipe_after_delete = src.wipe_after_delete;
                            db.disk_insert(&n).await?;
                            db.volume_insert(&Volume {
                                id: d.volume,
                                disk_id: d.disk,
                                storage_domain_id: src.storage_domain_id,
                                parent_id: None,
                                voltype: VolType::Leaf,
                                format: d.format,
                                actual_size: 0,
                                created_at: crate::time::Timestamp::from_millis(0),
                            })
                            .await?;
                        }
                        db.disk_lock(d.disk, c.saga_id).await?;
                        if db.attachment_get(p.vm.id, d.disk).await?.is_none() {
                            db.attachment_add(&d.attachment).await?;
                        }
                    }
                    for a in &p.shared {
                        if db.attachment_get(p.vm.id, a.disk_id).await?.is_none() {
                            db.attachment_add(a).await?;
                        }
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let db = c.db();
                    for d in &p.disks {
                        if db.disk_get(d.disk).await?.is_some() {
                            db.attachment_remove(p.vm.id, d.disk).await?;
                            db.volume_delete(d.volume).await?;
                            db.disk_delete(d.disk).await?;
                        }
                        db.disk_unlock(d.src, c.saga_id, DiskStatus::Ok).await?;
                    }
                    if db.vm_get(p.vm.id).await?.is_some() {
                        let _ = db
                            .vm_set_runtime(p.vm.id, &[VmStatus::ImageLocked], &VmRuntime::default())
                            .await;
                        // Its shared attachments go with it.
                        db.vm_delete(p.vm.id).await?;
                    }
                    if !p.src_running {
                        let _ = db
                            .vm_set_runtime(p.src, &[VmStatus::ImageLocked], &VmRuntime::default())
                            .await;
                    }
                    unlock_snapshot(db, p).await;
                    Ok(())
                },
            )
            .describe("Recording the clone, the source locked"),
            Step::new(
                "copy",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    if p.disks.is_empty() {
                        return Ok(());
                    }
                    let app = c.app();
                    let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                    for d in &p.disks {
                        let src = c
                            .db()
                            .disk_get(d.src)
                            .await?
                            .ok_or_else(|| step_err("a source disk is gone"))?;
                        let sd = src.storage_domain_id;
                        let copy = CollapsedCopy {
                            src_sd: sd,
                            src_img: d.src,
                            dst_sd: sd,
                            dst_img: d.disk,
                            dst_vol: d.volume,
                            format: d.format,
                            src_vol: d.src_vol,
                        };
                        copy_collapsed(app, &spm, dc.storage_pool_id, &copy).await?;
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    for d in &p.disks {
                        if let Some(n) = c.db().disk_get(d.disk).await? {
                            delete_image(c.app(), p.dc, n.storage_domain_id, d.disk).await?;
                        }
                    }
                    Ok(())
                },
            )
            .describe("Copying the disks"),
            Step::without_undo("unlock", |c: StepCtx<Self>| async move {
                let p = c.params();
                let db = c.db();
                for d in &p.disks {
                    db.disk_unlock(d.disk, c.saga_id, DiskStatus::Ok).await?;
                    db.disk_unlock(d.src, c.saga_id, DiskStatus::Ok).await?;
                }
                let down = VmRuntime::default();
                let _ = db.vm_set_runtime(p.vm.id, &[VmStatus::ImageLocked], &down).await;
                if !p.src_running {
                    let _ = db.vm_set_runtime(p.src, &[VmStatus::ImageLocked], &down).await;
                }
                unlock_snapshot(db, p).await;
                Ok(())
            })
            .describe("Unlocking the VMs and disks"),
        ]
    }
}

/// The cloned snapshot back to `ok` (it may have gone meanwhile: nothing to do then).
async fn unlock_snapshot(db: &crate::db::Db, p: &CloneVmParams) {
    if let Some(s) = p.snapshot {
        let _ = db
            .snapshot_set_status(s, &[SnapshotStatus::Locked], SnapshotStatus::Ok)
            .await;
    }
}

impl Commands {
    /// Clones VM `src`, which must be down, as a new VM `name` (see the module docs).
    pub async fn clone_vm(
        &self,
        src: VmId,
        name: &str,
        correlation_id: Option<String>,
    ) -> Result<Added<Vm>, CommandError> {
        let v = self.vm(src).await?;
        if v.runtime.status != VmStatus::Down {
            return Err(CommandError::Conflict(format!(
                "VM {} is {}: a VM is cloned while it is down (or from one of its snapshots)",
                v.name, v.runtime.status
            )));
        }
        let mut disks = Vec::new();
        for a in self.app.db.attachments_of_vm(src).await? {
            disks.push((self.disk(a.disk_id).await?, a, None));
        }
        self.clone_from(v.clone(), v.configuration(), disks, None, name, correlation_id)
            .await
    }

    /// Makes a new VM `name` from snapshot `snapshot` of VM `src`, which may run meanwhile
    /// (see the module docs): the snapshot's configuration and its disks as they were then.
    pub async fn clone_vm_from_snapshot(
        &self,
        src: VmId,
        snapshot: SnapshotId,
        name: &str,
        correlation_id: Option<String>,
    ) -> Result<Added<Vm>, CommandError> {
        let v = self.vm(src).await?;
        let s = self
            .app
            .db
            .snapshot_get(snapshot)
            .await?
            .filter(|s| s.vm_id == src)
            .ok_or_else(|| CommandError::not_found("snapshot", snapshot))?;
        if s.snapshot_type != SnapshotType::Regular {
            return Err(CommandError::invalid(format!(
                "snapshot {} is the {} one: a VM is cloned from a regular snapshot (or, while \
                 it is down, from the VM itself)",
                s.id, s.snapshot_type
            )));
        }
        if s.status != SnapshotStatus::Ok {
            return Err(CommandError::Conflict(format!(
                "snapshot {:?} of VM {} is {}",
                s.description, v.name, s.status
            )));
        }
        let attachments = self.app.db.attachments_of_vm(src).await?;
        let mut disks = Vec::new();
        for sd in &s.disks {
            let d = self.disk(sd.disk_id).await?;
            // A disk detached since keeps the bus it would get attached anew.
            let a = attachments
                .iter()
                .find(|a| a.disk_id == d.id)
                .cloned()
                .unwrap_or(DiskAttachment {
                    vm_id: src,
                    disk_id: d.id,
                    interface: crate::model::DiskInterface::VirtioScsi,
                    bootable: false,
                    active: true,
                    read_only: false,
                });
            disks.push((d, a, Some(sd.volume_id)));
        }
        let config = s.configuration.clone().unwrap_or_else(|| v.configuration());
        self.clone_from(v, config, disks, Some(snapshot), name, correlation_id)
            .await
    }

    /// The clone of `v` (see the module docs) with configuration `config` and disks `disks`,
    /// each with the attachment the clone gets and the volume the copy stops at.
    async fn clone_from(
        &self,
        v: Vm,
        config: VmConfiguration,
        disks: Vec<(Disk, DiskAttachment, Option<VolUuid>)>,
        snapshot: Option<SnapshotId>,
        name: &str,
        correlation_id: Option<String>,
    ) -> Result<Added<Vm>, CommandError> {
        let src = v.id;
        if self.app.db.vm_get_by_name(name).await?.is_some() {
            return Err(CommandError::Conflict(format!("a VM named {name} exists")));
        }
        self.refuse_locked_disks(&v, "clone the VM").await?;
        let src_running = v.runtime.status != VmStatus::Down;
        let dc = self.app.cluster(v.cluster_id).await?.data_center_id;
        let mut vm = Vm::new(name, v.cluster_id).with_configuration(&config);
        vm.description = v.description.clone();
        vm.template_id = BLANK_TEMPLATE_ID;
        vm.ha = v.ha;
        vm.lease_storage_domain_id = v.lease_storage_domain_id;
        vm.resume_behavior = v.resume_behavior;
        vm.placement = v.placement.clone();
        for (d, _, _) in disks.iter().filter(|(d, _, _)| !d.shareable) {
            self.check_copy_space(d, d.storage_domain_id, &format!("clone VM {}", v.name))
                .await?;
        }
        let (mut cloned, mut shared) = (Vec::new(), Vec::new());
        for (d, a, src_vol) in disks {
            if d.shareable {
                shared.push(DiskAttachment { vm_id: vm.id, ..a });
                continue;
            }
            let chain = self.app.db.volume_chain(d.id).await?;
            let upto = match src_vol {
                Some(top) => {
                    let at = chain.iter().position(|x| x.id == top).ok_or_else(|| {
                        CommandError::Conflict(format!(
                            "snapshot volume {top} is not in disk {}'s chain",
                            d.name
                        ))
                    })?;
                    &chain[..=at]
                }
                None => &chain[..],
            };
            let format = match upto {
                [only] => only.format,
                _ => DiskFormat::Cow,
            };
            let disk = DiskId::new_random();
            cloned.push(ClonedDisk {
                src: d.id,
                src_vol,
                disk,
                volume: VolUuid::new_random(),
                format,
                attachment: DiskAttachment {
                    vm_id: vm.id,
                    disk_id: disk,
                    ..a
                },
            });
        }
        if !cloned.is_empty() {
            self.app.spm(&self.app.dc(dc).await?).await?;
        }
        let nics = self.app.db.nics_of_vm(src).await?;
        let id = vm.id;
        let storage_work = !cloned.is_empty();
        let what = match snapshot {
            Some(_) => format!("Cloning a snapshot of VM {} as {name}", v.name),
            None => format!("Cloning VM {} as {name}", v.name),
        };
        let pending = self
            .run_adding::<CloneVmSaga, _, _>(
                CloneVmParams {
                    src,
                    vm,
                    dc,
                    disks: cloned,
                    shared,
                    snapshot,
                    src_running,
                },
                Some(what),
                correlation_id,
                storage_work,
                move |cmds| async move {
                    for n in nics {
                        let req = crate::commands::networks::AddNic {
                            name: n.name,
                            network: n.network,
                            mac: None,
                            interface: n.interface,
                            plugged: n.plugged,
                            linked: n.linked,
                        };
                        cmds.add_nic(id, req).await?;
                    }
                    Ok(())
                },
            )
            .await?;
        Ok(Added {
            entity: self.vm(id).await?,
            pending,
        })
    }
}
