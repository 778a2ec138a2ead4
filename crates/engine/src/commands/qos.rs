//! Storage QoS (oVirt's `qoss` of type storage) and disk profiles.
//!
//! A data center's QoS limits throughput (MB/s) and IOPS; a storage domain's disk profile
//! points at one of its data center's QoS entries (or none); a disk has a profile of its own
//! domain (or none: unlimited). The limits reach QEMU as VDSM's `ioTune` in each drive of
//! `VM.create`, and — when a QoS, a profile or a disk's profile changes — the running VMs
//! whose disks they cover get them at once through `VM.setIoTune` (QMP
//! `block_set_io_throttle`), as oVirt's `updateVmPolicy` does.
//!
//! Invariants: a QoS's limits pass [`IoLimits::check`]; a profile's QoS is of the data center
//! its domain is attached to; a disk's profile is of the disk's domain.

use serde_json::{json, Value};

use crate::app::App;
use crate::model::{DcId, Disk, DiskId, DiskProfile, DiskProfileId, IoLimits, Qos, QosId, SdUuid, VmStatus};

use super::{CommandError, Commands};

/// A change to a QoS or profile; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UpdateQos {
    pub name: Option<String>,
    pub description: Option<String>,
    pub limits: Option<IoLimits>,
}

#[derive(Debug, Clone, Default)]
pub struct UpdateDiskProfile {
    pub name: Option<String>,
    pub description: Option<String>,
    /// `Some(None)`: no QoS (unlimited).
    pub qos: Option<Option<QosId>>,
}

/// The `ioTune` of disk `d`: its profile's QoS limits, or all zeros (unlimited).
pub(crate) async fn disk_io_tune(app: &App, d: &Disk) -> Result<Value, CommandError> {
    let limits = match d.disk_profile_id {
        None => IoLimits::default(),
        Some(p) => match app.db.disk_profile_get(p).await?.and_then(|p| p.qos_id) {
            None => IoLimits::default(),
            Some(q) => app.db.qos_get(q).await?.map(|q| q.limits).unwrap_or_default(),
        },
    };
    Ok(limits.io_tune())
}

impl Commands {
    async fn qos(&self, id: QosId) -> Result<Qos, CommandError> {
        self.app
            .db
            .qos_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("QoS", id))
    }

    async fn disk_profile(&self, id: DiskProfileId) -> Result<DiskProfile, CommandError> {
        self.app
            .db
            .disk_profile_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("disk profile", id))
    }

    pub async fn add_qos(
        &self,
        dc: DcId,
        name: &str,
        description: &str,
        limits: IoLimits,
    ) -> Result<Qos, CommandError> {
        self.app.dc(dc).await?;
        limits
            .check()
            .map_err(|e| CommandError::invalid(format!("QoS {name}: {e}")))?;
        if self.app.db.qoss_of_dc(dc).await?.iter().any(|q| q.name == name) {
            return Err(CommandError::Conflict(format!(
                "a QoS named {name} exists in the data center"
            )));
        }
        let q = Qos {
            id: QosId::new_random(),
            data_center_id: dc,
            name: name.to_string(),
            description: description.to_string(),
            limits,
        };
        Ok(self.app.db.qos_insert(&q).await?)
    }

    pub async fn update_qos(&self, id: QosId, req: UpdateQos) -> Result<Qos, CommandError> {
        let mut q = self.qos(id).await?;
        if let Some(n) = req.name.filter(|n| *n != q.name) {
            if self
                .app
                .db
                .qoss_of_dc(q.data_center_id)
                .await?
                .iter()
                .any(|x| x.name == n)
            {
                return Err(CommandError::Conflict(format!(
                    "a QoS named {n} exists in the data center"
                )));
            }
            q.name = n;
        }
        if let Some(d) = req.description {
            q.description = d;
        }
        if let Some(l) = req.limits {
            l.check()
                .map_err(|e| CommandError::invalid(format!("QoS {}: {e}", q.name)))?;
            q.limits = l;
        }
        let q = self.app.db.qos_update(&q).await?;
        self.retune_qos(id).await?;
        Ok(q)
    }

    /// Removes a QoS: its profiles become unlimited, and so do the running VMs' disks.
    pub async fn remove_qos(&self, id: QosId) -> Result<(), CommandError> {
        self.qos(id).await?;
        let profiles: Vec<DiskProfileId> = self
            .app
            .db
            .disk_profiles(None)
            .await?
            .into_iter()
            .filter(|p| p.qos_id == Some(id))
            .map(|p| p.id)
            .collect();
        self.app.db.qos_delete(id).await?;
        for p in profiles {
            self.retune_profile(p).await?;
        }
        Ok(())
    }

    /// The QoS a profile of `sd` may point at: one of the data center `sd` is attached to.
    async fn profile_qos(&self, sd: SdUuid, qos: Option<QosId>) -> Result<Option<QosId>, CommandError> {
        let Some(q) = qos else { return Ok(None) };
        let q = self.qos(q).await?;
        let dc = self.domain_dc(sd).await.map_err(|_| {
            CommandError::Conflict(format!(
                "storage domain {sd} is in no data center: its profiles take a QoS once it is attached"
            ))
        })?;
        if dc.id != q.data_center_id {
            return Err(CommandError::Conflict(format!(
                "QoS {} is of another data center than storage domain {sd}",
                q.name
            )));
        }
        Ok(Some(q.id))
    }

    pub async fn add_disk_profile(
        &self,
        sd: SdUuid,
        name: &str,
        description: &str,
        qos: Option<QosId>,
    ) -> Result<DiskProfile, CommandError> {
        self.app
            .db
            .sd_get(sd)
            .await?
            .ok_or_else(|| CommandError::not_found("storage domain", sd))?;
        if self
            .app
            .db
            .disk_profiles(Some(sd))
            .await?
            .iter()
            .any(|p| p.name == name)
        {
            return Err(CommandError::Conflict(format!(
                "a disk profile named {name} exists on the storage domain"
            )));
        }
        let p = DiskProfile {
            id: DiskProfileId::new_random(),
            name: name.to_string(),
            description: description.to_string(),
            storage_domain_id: sd,
            qos_id: self.profile_qos(sd, qos).await?,
        };
        Ok(self.app.db.disk_profile_insert(&p).await?)
    }

    pub async fn update_disk_profile(
        &self,
        id: DiskProfileId,
        req: UpdateDiskProfile,
    ) -> Result<DiskProfile, CommandError> {
        let mut p = self.disk_profile(id).await?;
        if let Some(n) = req.name.filter(|n| *n != p.name) {
            if self
                .app
                .db
                .disk_profiles(Some(p.storage_domain_id))
                .await?
                .iter()
                .any(|x| x.name == n)
            {
                return Err(CommandError::Conflict(format!(
                    "a disk profile named {n} exists on the storage domain"
                )));
            }
            p.name = n;
        }
        if let Some(d) = req.description {
            p.description = d;
        }
        if let Some(q) = req.qos {
            p.qos_id = self.profile_qos(p.storage_domain_id, q).await?;
        }
        let p = self.app.db.disk_profile_update(&p).await?;
        self.retune_profile(id).await?;
        Ok(p)
    }

    /// Removes a profile no disk uses.
    pub async fn remove_disk_profile(&self, id: DiskProfileId) -> Result<(), CommandError> {
        let p = self.disk_profile(id).await?;
        if let Some(d) = self.disks_with_profile(id).await?.first() {
            return Err(CommandError::Conflict(format!(
                "disk profile {} is used by disk {}",
                p.name, d.name
            )));
        }
        Ok(self.app.db.disk_profile_delete(id).await?)
    }

    /// Gives disk `disk` profile `profile` (of its own domain; `None`: unlimited); a running
    /// VM gets the new limits at once.
    pub async fn set_disk_profile(
        &self,
        disk: DiskId,
        profile: Option<DiskProfileId>,
    ) -> Result<Disk, CommandError> {
        let mut d = self.disk(disk).await?;
        if let Some(p) = profile {
            let p = self.disk_profile(p).await?;
            if p.storage_domain_id != d.storage_domain_id {
                return Err(CommandError::Conflict(format!(
                    "disk profile {} is of another storage domain than disk {}",
                    p.name, d.name
                )));
            }
        }
        d.disk_profile_id = profile;
        let d = self.app.db.disk_update(&d).await?;
        self.retune_disk(&d).await?;
        Ok(d)
    }

    async fn disks_with_profile(&self, p: DiskProfileId) -> Result<Vec<Disk>, CommandError> {
        let all = self.app.db.disk_list(&Default::default()).await?;
        Ok(all.into_iter().filter(|d| d.disk_profile_id == Some(p)).collect())
    }

    async fn retune_qos(&self, q: QosId) -> Result<(), CommandError> {
        for p in self.app.db.disk_profiles(None).await? {
            if p.qos_id == Some(q) {
                self.retune_profile(p.id).await?;
            }
        }
        Ok(())
    }

    async fn retune_profile(&self, p: DiskProfileId) -> Result<(), CommandError> {
        for d in self.disks_with_profile(p).await? {
            self.retune_disk(&d).await?;
        }
        Ok(())
    }

    /// Sends disk `d`'s limits to the running VMs it is plugged into. A VM that is not
    /// running gets them at its next start; one whose node refuses keeps its old limits and
    /// the error says which.
    async fn retune_disk(&self, d: &Disk) -> Result<(), CommandError> {
        let tune = disk_io_tune(&self.app, d).await?;
        for a in self.app.db.attachments_of_disk(d.id).await? {
            if !a.active {
                continue;
            }
            let Some(v) = self.app.db.vm_get(a.vm_id).await? else {
                continue;
            };
            let (VmStatus::Up | VmStatus::Paused, Some(h)) = (v.runtime.status, v.runtime.run_on_host) else {
                continue;
            };
            self.node_of(h)
                .await?
                .call(
                    "VM.setIoTune",
                    json!({ "vmID": v.id, "drive": { "domainID": d.storage_domain_id, "imageID": d.id }, "ioTune": tune }),
                )
                .await?;
            tracing::info!(vm = %v.name, disk = %d.name, io_tune = %tune, "disk limits changed in the running VM");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_exclude_a_total_with_its_parts_and_become_vdsm_io_tune() {
        let ok = IoLimits {
            max_write_throughput: Some(2),
            max_iops: Some(100),
            ..Default::default()
        };
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(
            ok.io_tune(),
            json!({ "total_bytes_sec": 0, "read_bytes_sec": 0, "write_bytes_sec": 2 << 20,
                    "total_iops_sec": 100, "read_iops_sec": 0, "write_iops_sec": 0 })
        );
        let both = IoLimits {
            max_throughput: Some(10),
            max_read_throughput: Some(5),
            ..Default::default()
        };
        assert!(both.check().unwrap_err().contains("total throughput"));
        let iops = IoLimits {
            max_iops: Some(10),
            max_write_iops: Some(5),
            ..Default::default()
        };
        assert!(iops.check().unwrap_err().contains("IOPS"));
        // A zero part is unlimited, not a conflict.
        let zero = IoLimits {
            max_throughput: Some(10),
            max_read_throughput: Some(0),
            ..Default::default()
        };
        assert_eq!(zero.check(), Ok(()));
    }
}
