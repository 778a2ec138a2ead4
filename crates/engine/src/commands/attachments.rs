//! Disk attachments: which disks a VM has, and hot plug and unplug on a running VM.
//!
//! An attachment's `active` flag says whether the VM's QEMU has the disk. While the VM is down
//! a change is a row; while it is up or paused, activating a disk hot plugs it on the VM's
//! host (`VM.hotplugDisk`) and deactivating or detaching an active one hot unplugs it
//! (`VM.hotunplugDisk`, answered once the guest released it). In every other state (a
//! suspended VM resumes only with the devices it was saved with; a migrating one is between
//! hosts) such changes are refused.
//!
//! The node acts first and the row follows: an engine that dies in between leaves the row
//! as before, and the same request made again finds the node already done (plugging a disk
//! the VM has, or unplugging one it has not, succeeds).

use serde_json::json;

use oxvirt_types::api::ErrorCode;

use crate::model::{Disk, DiskAttachment, DiskId, DiskInterface, DiskStatus, HostUuid, Vm, VmId, VmStatus};

use super::{AddVmDisk, CommandError, Commands};

impl Commands {
    /// Where a change to the disks `v`'s QEMU has must happen: nowhere while the VM is down
    /// (its next start has it), on its host while it is up or paused (hot plug). `what`
    /// names the change in the refusal for any other state.
    pub fn disk_hot_host(&self, v: &Vm, what: &str) -> Result<Option<HostUuid>, CommandError> {
        match v.runtime.status {
            VmStatus::Down => Ok(None),
            VmStatus::Up | VmStatus::Paused => v
                .runtime
                .run_on_host
                .map(Some)
                .ok_or_else(|| CommandError::Conflict(format!("VM {} runs nowhere", v.name))),
            s => Err(CommandError::Conflict(format!(
                "VM {} is {s}: {what} only while it is down, up or paused",
                v.name
            ))),
        }
    }

    /// Refuses `todo` (start the VM, snapshot it…) on `v` while one of its disks is locked by
    /// a running job: being made, copied or snapshotted, its volumes are not there yet, or are
    /// being read as they are.
    pub(crate) async fn refuse_locked_disks(&self, v: &Vm, todo: &str) -> Result<(), CommandError> {
        for a in self.app.db.attachments_of_vm(v.id).await? {
            let d = self.disk(a.disk_id).await?;
            if d.status == DiskStatus::Locked {
                return Err(CommandError::Conflict(format!(
                    "disk {} of VM {} is locked by a running job: {todo} when it ends",
                    d.name, v.name
                )));
            }
        }
        Ok(())
    }

    pub(crate) async fn disk(&self, id: DiskId) -> Result<Disk, CommandError> {
        self.app
            .db
            .disk_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("disk", id))
    }

    async fn attachment(&self, vm: VmId, disk: DiskId) -> Result<DiskAttachment, CommandError> {
        self.app
            .db
            .attachment_get(vm, disk)
            .await?
            .ok_or_else(|| CommandError::not_found("disk attachment", disk))
    }

    /// Hot plugs the disk of attachment `a` into `v`, running on `host`.
    async fn plug_disk(&self, v: &Vm, host: HostUuid, a: &DiskAttachment) -> Result<(), CommandError> {
        refuse_cold_only(a.interface)?;
        let d = self.disk(a.disk_id).await?;
        if d.status != DiskStatus::Ok {
            return Err(CommandError::Conflict(format!(
                "disk {} is {}: it is plugged once it is ok",
                d.name, d.status
            )));
        }
        let mut drive = drive_params(&d, a);
        drive["ioTune"] = super::qos::disk_io_tune(&self.app, &d).await?;
        self.node_of(host)
            .await?
            .call("VM.hotplugDisk", json!({ "vmID": v.id, "drive": drive }))
            .await?;
        tracing::info!(vm = %v.name, disk = %d.name, host = %host, "disk hot plugged");
        Ok(())
    }

    /// Hot unplugs the disk of attachment `a` from `v`, running on `host`; a disk the VM does
    /// not have is already unplugged.
    async fn unplug_disk(&self, v: &Vm, host: HostUuid, a: &DiskAttachment) -> Result<(), CommandError> {
        refuse_cold_only(a.interface)?;
        let d = self.disk(a.disk_id).await?;
        if d.status == DiskStatus::Locked {
            return Err(CommandError::Conflict(format!(
                "disk {} is locked by a running job: unplug it after the job",
                d.name
            )));
        }
        let drive = json!({ "domainID": d.storage_domain_id, "imageID": d.id });
        let r = self
            .node_of(host)
            .await?
            .call("VM.hotunplugDisk", json!({ "vmID": v.id, "drive": drive }))
            .await;
        match r {
            Ok(_) => tracing::info!(vm = %v.name, disk = %d.name, host = %host, "disk hot unplugged"),
            Err(e) if e.code() == Some(ErrorCode::ImageNotFound.code()) => {
                tracing::info!(vm = %v.name, disk = %d.name, "disk was not plugged");
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Attaches an existing disk to a VM; an active disk is hot plugged into a running VM.
    pub async fn attach_disk(
        &self,
        vm: VmId,
        disk: DiskId,
        how: AddVmDisk,
    ) -> Result<DiskAttachment, CommandError> {
        let v = self.vm(vm).await?;
        let hot = match how.active {
            true => self.disk_hot_host(&v, "an active disk is attached")?,
            false => None,
        };
        let d = self.disk(disk).await?;
        if d.content_type == crate::model::DiskContentType::Iso {
            return Err(CommandError::invalid(format!(
                "disk {} is an ISO: put it in the VM's CD-ROM instead of attaching it",
                d.name
            )));
        }
        if !d.shareable && !self.app.db.attachments_of_disk(disk).await?.is_empty() {
            return Err(CommandError::Conflict(format!(
                "disk {} is attached to another VM",
                d.name
            )));
        }
        let a = how.attachment(disk);
        if let Some(h) = hot {
            self.plug_disk(&v, h, &a).await?;
        }
        if let Err(e) = self.app.db.attachment_add(&a).await {
            if let Some(h) = hot {
                // The row is the truth: QEMU gives back what the database does not have.
                if let Err(u) = self.unplug_disk(&v, h, &a).await {
                    tracing::error!(vm = %v.name, disk = %d.name, error = %u, "a disk stays plugged without its attachment");
                }
            }
            return Err(e.into());
        }
        Ok(a)
    }

    /// Hot plugs a disk that was just attached inactive to a running VM (a new disk: plugged
    /// once its volume exists) and records it active. On failure the disk stays attached,
    /// inactive, and the error says so.
    pub(crate) async fn activate_new_disk(&self, vm: VmId, disk: DiskId) -> Result<(), CommandError> {
        self.set_disk_active(vm, disk, true).await.map(drop).map_err(|e| {
            CommandError::Conflict(format!(
                "disk {disk} was created and attached inactive, but plugging it into the running VM failed: {e}"
            ))
        })
    }

    /// Activates or deactivates a VM's disk (see [`Commands::update_disk_attachment`]).
    pub async fn set_disk_active(
        &self,
        vm: VmId,
        disk: DiskId,
        active: bool,
    ) -> Result<DiskAttachment, CommandError> {
        let a = DiskAttachment {
            active,
            ..self.attachment(vm, disk).await?
        };
        self.update_disk_attachment(a).await
    }

    /// Changes how a disk is attached (active, bootable, interface, read-only). On a running
    /// VM, activation hot plugs the disk and deactivation hot unplugs it; its interface and
    /// mode change only while it is not plugged.
    pub async fn update_disk_attachment(&self, a: DiskAttachment) -> Result<DiskAttachment, CommandError> {
        let v = self.vm(a.vm_id).await?;
        let before = self.attachment(a.vm_id, a.disk_id).await?;
        // What QEMU has: the active disks, each with its interface and mode.
        let device = |x: &DiskAttachment| x.active.then_some((x.interface, x.read_only));
        if device(&a) != device(&before) {
            let hot = self.disk_hot_host(&v, "a disk is activated, deactivated or changed")?;
            if let Some(h) = hot {
                match (before.active, a.active) {
                    (false, true) => self.plug_disk(&v, h, &a).await?,
                    (true, false) => self.unplug_disk(&v, h, &before).await?,
                    _ => {
                        return Err(CommandError::Conflict(format!(
                            "disk {} is plugged into running VM {}: deactivate it before changing its \
                             interface or mode",
                            a.disk_id, v.name
                        )))
                    }
                }
            }
        }
        self.app.db.attachment_update(&a).await?;
        Ok(a)
    }

    /// Detaches a disk from a VM, hot unplugging it from a running VM first.
    pub async fn detach_disk(&self, vm: VmId, disk: DiskId) -> Result<(), CommandError> {
        let v = self.vm(vm).await?;
        let a = self.attachment(vm, disk).await?;
        if a.active {
            if let Some(h) = self.disk_hot_host(&v, "an active disk is detached")? {
                self.unplug_disk(&v, h, &a).await?;
            }
        }
        self.app.db.attachment_remove(vm, disk).await?;
        Ok(())
    }
}

/// Refuses to hot plug or unplug a disk on an interface that cannot (SATA and IDE, as in
/// oVirt): such a disk changes while its VM is down.
pub(crate) fn refuse_cold_only(interface: DiskInterface) -> Result<(), CommandError> {
    match interface {
        DiskInterface::Virtio | DiskInterface::VirtioScsi => Ok(()),
        DiskInterface::Sata | DiskInterface::Ide => Err(CommandError::Conflict(format!(
            "a disk on {interface} cannot be plugged into or unplugged from a running VM: change it while \
             the VM is down, or use virtio or virtio_scsi"
        ))),
    }
}

/// The node's drive parameters (VDSM's drive dict) for disk `d` as attachment `a` has it.
pub(crate) fn drive_params(d: &Disk, a: &DiskAttachment) -> serde_json::Value {
    let iface = match a.interface {
        DiskInterface::Virtio => "virtio",
        DiskInterface::VirtioScsi => "scsi",
        DiskInterface::Sata => "sata",
        DiskInterface::Ide => "ide",
    };
    json!({ "domainID": d.storage_domain_id, "imageID": d.id, "readonly": a.read_only, "iface": iface })
}
