//! A VM's CD-ROM: which ISO disk it holds, in the VM's configuration (the next start) or in the
//! running VM's drive (oVirt's `current=true`), and the checks that keep ISOs apart from data
//! disks. Every VM has one drive (oVirt's cdrom `00000000-0000-0000-0000-000000000000`); the
//! node puts it on virtio-scsi, or on SATA for a Windows OS type.
//!
//! Invariants: a CD-ROM holds only a disk of content type `iso` whose status is `ok`; an ISO
//! disk is never attached as a disk, and cannot be removed while a VM's CD-ROM holds it.

use serde_json::{json, Value};

use crate::model::{Disk, DiskContentType, DiskId, DiskStatus, Vm, VmId, VmStatus};

use super::{CommandError, Commands};

/// The ISO disk `disk`, checked to be one a CD-ROM can hold.
pub(crate) async fn iso_disk(c: &Commands, disk: DiskId) -> Result<Disk, CommandError> {
    let d = c
        .app
        .db
        .disk_get(disk)
        .await?
        .ok_or_else(|| CommandError::not_found("disk", disk))?;
    if d.content_type != DiskContentType::Iso {
        return Err(CommandError::invalid(format!(
            "disk {} holds {} and is no ISO: a CD-ROM takes a disk of content type iso",
            d.name, d.content_type
        )));
    }
    if d.status != DiskStatus::Ok {
        return Err(CommandError::Conflict(format!(
            "ISO disk {} is {}",
            d.name, d.status
        )));
    }
    Ok(d)
}

/// The node's `cdrom` parameter for `v` holding `disk`.
pub(crate) async fn cdrom_params(
    c: &crate::app::App,
    v: &Vm,
    disk: Option<DiskId>,
) -> Result<Value, CommandError> {
    let drive = match disk {
        Some(id) => match c.db.disk_get(id).await? {
            Some(d) => json!({ "domainID": d.storage_domain_id, "imageID": d.id }),
            // Removed meanwhile (it cannot be while a CD-ROM holds it): start empty.
            None => Value::Null,
        },
        None => Value::Null,
    };
    let iface = if v.os.is_windows() { "sata" } else { "scsi" };
    Ok(json!({ "iface": iface, "drive": drive }))
}

impl Commands {
    /// Puts ISO disk `disk` into `vm`'s CD-ROM (`None`: ejects it): with `current`, into the
    /// running VM's drive only (the configuration keeps what the next start uses); otherwise
    /// into the configuration only, as oVirt does.
    pub async fn set_vm_cdrom(
        &self,
        vm: VmId,
        disk: Option<DiskId>,
        current: bool,
    ) -> Result<Vm, CommandError> {
        let v = self.vm(vm).await?;
        if let Some(d) = disk {
            iso_disk(self, d).await?;
        }
        if !current {
            let mut nv = v.clone();
            nv.cdrom = disk;
            return Ok(self.app.db.vm_update(&nv).await?);
        }
        let host = match (v.runtime.status, v.runtime.run_on_host) {
            (VmStatus::Up | VmStatus::Paused | VmStatus::PoweringUp | VmStatus::PoweringDown, Some(h)) => h,
            (s, _) => {
                return Err(CommandError::Conflict(format!(
                    "VM {} is {s}: the CD of a running VM changes with current=true; change the \
                     configuration without it",
                    v.name
                )))
            }
        };
        let params = cdrom_params(&self.app, &v, disk).await?;
        let node = self.app.host_client(host).await?;
        node.call("VM.changeCD", json!({ "vmID": vm, "drive": params["drive"] }))
            .await?;
        self.app.db.vm_set_run_cdrom(vm, disk).await?;
        tracing::info!(vm = %v.name, iso = ?disk, "CD changed in the running VM");
        self.vm(vm).await
    }

    /// Refuses to remove ISO disk `d` while a VM's CD-ROM holds it.
    pub(crate) async fn refuse_iso_in_use(&self, d: &Disk) -> Result<(), CommandError> {
        if d.content_type != DiskContentType::Iso {
            return Ok(());
        }
        let users = self.app.db.vms_with_cdrom(d.id).await?;
        if users.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = users.iter().map(|v| v.name.as_str()).collect();
        Err(CommandError::Conflict(format!(
            "ISO disk {} is in the CD-ROM of VM(s) {}: eject it first",
            d.name,
            names.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::super::vms::{RunOnce, RunOnceCd};

    #[test]
    fn a_run_once_keeps_an_empty_cd_apart_from_no_change() {
        let ro = RunOnce {
            cdrom: Some(RunOnceCd::Empty),
            boot_devices: None,
        };
        let back: RunOnce = serde_json::from_value(serde_json::to_value(&ro).unwrap()).unwrap();
        assert_eq!(back, ro);
        let none: RunOnce = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(none.cdrom, None);
    }

    #[test]
    fn windows_guests_get_a_sata_cdrom() {
        let mut os = crate::model::VmOs::default();
        assert!(!os.is_windows());
        os.os_type = "windows_2022".into();
        assert!(os.is_windows());
    }
}
