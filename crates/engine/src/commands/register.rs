//! Disks on a storage domain that the engine has no record of (oVirt's unregistered disks): an
//! imported domain's, a domain detached from another oVirt or oxvirt setup, one whose engine
//! lost its database. They are read from the volumes' VDSM metadata through the domain's data
//! center's SPM and registered one at a time: the disk and its volume chain recorded as storage
//! has them, in one transaction, so a disk is registered whole or not at all.
//!
//! The alias comes from the base volume's DESCRIPTION: oVirt's `{"DiskAlias": …,
//! "DiskDescription": …}`, or oxvirt's plain name. Images that hold no guest disk (oVirt's
//! OVF stores and memory volumes, `DISKTYPE` OVFS/MEMD/MEMM; state volumes the engine knows),
//! template images (SHARED volumes, read by their clones) and thin clones of a template image
//! are not offered: templates come back with their configuration, which this does not read.

use serde_json::{json, Value};

use crate::model::{
    DcId, Disk, DiskContentType, DiskFormat, DiskId, DiskStatus, SdUuid, VolType, VolUuid, Volume,
};

use super::{CommandError, Commands};

/// A disk found on storage, not recorded: what registering it records.
#[derive(Debug, Clone)]
pub struct UnregisteredDisk {
    pub disk: Disk,
    /// Base first.
    pub volumes: Vec<Volume>,
}

/// Volume metadata `DISKTYPE`s that are no guest disk.
const NOT_DISKS: &[&str] = &["OVFS", "MEMD", "MEMM"];

/// The alias and description VDSM metadata gives a disk.
fn alias_of(description: &str, img: DiskId) -> (String, String) {
    if let Ok(v) = serde_json::from_str::<Value>(description) {
        if let Some(a) = v["DiskAlias"].as_str().filter(|a| !a.is_empty()) {
            let d = v["DiskDescription"].as_str().unwrap_or_default();
            return (a.to_string(), d.to_string());
        }
    }
    match description.trim() {
        "" => (format!("disk-{}", &img.to_string()[..8]), String::new()),
        d => (d.to_string(), String::new()),
    }
}

fn field<'a>(v: &'a Value, what: &str) -> Result<&'a str, CommandError> {
    v[what]
        .as_str()
        .ok_or_else(|| CommandError::invalid(format!("volume metadata without {what}: {v}")))
}

impl Commands {
    /// The data center domain `sd` is attached to, which must be active there.
    async fn attached_dc(&self, sd: SdUuid) -> Result<DcId, CommandError> {
        let m = self.domain_member(sd).await?;
        if m.status != crate::model::SdStatus::Active {
            return Err(CommandError::Conflict(format!(
                "storage domain {sd} is {}: activate it first",
                m.status
            )));
        }
        Ok(m.data_center_id)
    }

    /// The disks on domain `sd` (attached and active) the engine has no record of.
    pub async fn unregistered_disks(&self, sd: SdUuid) -> Result<Vec<UnregisteredDisk>, CommandError> {
        let dc = self.attached_dc(sd).await?;
        let (_, spm) = self.app.dc_spm(dc).await?;
        let images = spm
            .call("StorageDomain.getImages", json!({ "sdUUID": sd }))
            .await?;
        let mut out = Vec::new();
        for img in images.as_array().into_iter().flatten() {
            let Some(img) = img.as_str().and_then(|s| s.parse::<DiskId>().ok()) else {
                continue;
            };
            if self.app.db.disk_get(img).await?.is_some() || self.app.db.state_volume_image_known(img).await?
            {
                continue;
            }
            if let Some(d) = self.read_unregistered(&spm, sd, img).await? {
                out.push(d);
            }
        }
        out.sort_by(|a, b| a.disk.name.cmp(&b.disk.name).then(a.disk.id.cmp(&b.disk.id)));
        Ok(out)
    }

    /// Image `img` on `sd` as a disk, or `None` when it holds no guest disk or is a thin clone
    /// of a template image.
    async fn read_unregistered(
        &self,
        spm: &crate::nodes::NodeClient,
        sd: SdUuid,
        img: DiskId,
    ) -> Result<Option<UnregisteredDisk>, CommandError> {
        let ids = spm
            .call("Image.getVolumes", json!({ "sdUUID": sd, "imgUUID": img }))
            .await?;
        let mut volumes = Vec::new();
        let mut metas = Vec::new();
        for id in ids.as_array().into_iter().flatten() {
            let vol: VolUuid = id
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| CommandError::invalid(format!("image {img} lists volume {id}")))?;
            let info = spm
                .call(
                    "Volume.getInfo",
                    json!({ "sdUUID": sd, "imgUUID": img, "volUUID": vol }),
                )
                .await?;
            let meta = info["meta"].clone();
            if field(&meta, "image")? != img.to_string() {
                // A template's volume under a thin clone: the template comes first.
                return Ok(None);
            }
            if NOT_DISKS.contains(&field(&meta, "disktype")?.to_ascii_uppercase().as_str()) {
                return Ok(None);
            }
            // A template's image: its volume is read-only, shared with its clones.
            if field(&meta, "role")?.eq_ignore_ascii_case("shared") {
                return Ok(None);
            }
            if !field(&meta, "legality")?.eq_ignore_ascii_case("legal") {
                return Ok(None);
            }
            let format = if field(&meta, "format")?.eq_ignore_ascii_case("cow") {
                DiskFormat::Cow
            } else {
                DiskFormat::Raw
            };
            let parent = field(&meta, "parent")?
                .parse::<VolUuid>()
                .ok()
                .filter(|p| !p.is_nil());
            volumes.push(Volume {
                id: vol,
                disk_id: img,
                storage_domain_id: sd,
                parent_id: parent,
                voltype: VolType::Internal,
                format,
                actual_size: info["true_size"].as_u64().unwrap_or(0),
                created_at: crate::time::Timestamp::from_millis(meta["ctime"].as_i64().unwrap_or(0) * 1000),
            });
            metas.push(meta);
        }
        let (Some(base), Some(leaf)) = (metas.first(), metas.last()) else {
            return Ok(None);
        };
        if let Some(l) = volumes.last_mut() {
            l.voltype = VolType::Leaf;
        }
        let (name, description) = alias_of(field(base, "description")?, img);
        let mut disk = Disk::new(
            &name,
            sd,
            volumes[0].format,
            leaf["capacity"].as_u64().unwrap_or(0),
        );
        disk.id = img;
        disk.description = description;
        disk.sparse = field(base, "allocation")?.eq_ignore_ascii_case("sparse");
        disk.actual_size = volumes.iter().map(|v| v.actual_size).sum();
        disk.status = DiskStatus::Ok;
        if field(base, "disktype")?.eq_ignore_ascii_case("ISOF") {
            disk.content_type = DiskContentType::Iso;
        }
        Ok(Some(UnregisteredDisk { disk, volumes }))
    }

    /// Registers unregistered disk `disk` of domain `sd`: records it with its volume chain.
    pub async fn register_disk(&self, sd: SdUuid, disk: DiskId) -> Result<Disk, CommandError> {
        if self.app.db.disk_get(disk).await?.is_some() {
            return Err(CommandError::Conflict(format!(
                "disk {disk} is registered already"
            )));
        }
        let dc = self.attached_dc(sd).await?;
        let (_, spm) = self.app.dc_spm(dc).await?;
        let found = self
            .read_unregistered(&spm, sd, disk)
            .await
            .map_err(|e| match e {
                CommandError::Node(n)
                    if n.code() == Some(oxvirt_types::api::ErrorCode::ImageNotFound.code()) =>
                {
                    CommandError::not_found("unregistered disk", disk)
                }
                e => e,
            })?;
        let u = found.ok_or_else(|| {
            CommandError::Conflict(format!(
                "image {disk} on storage domain {sd} holds no disk that can be registered (an OVF \
                 store, a memory volume, a volume not LEGAL, a template's image or a thin clone of \
                 one)"
            ))
        })?;
        let mut tx = self.app.db.begin().await?;
        tx.disk_insert(&u.disk).await?;
        for v in &u.volumes {
            tx.volume_insert(v).await?;
        }
        tx.commit().await?;
        tracing::info!(disk = %disk, name = %u.disk.name, sd = %sd, volumes = u.volumes.len(), "disk registered");
        self.disk(disk).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_we_write_we_read_back() {
        let id = DiskId::new_random();
        let d = super::super::storage::volume_description("web1-disk", "the root disk");
        assert_eq!(
            alias_of(&d, id),
            ("web1-disk".to_string(), "the root disk".to_string())
        );
        let long = "x".repeat(300);
        let d = super::super::storage::volume_description("web1-disk", &long);
        assert!(d.len() <= 210, "{}", d.len());
        assert_eq!(alias_of(&d, id).0, "web1-disk");
        let d = super::super::storage::volume_description(&long, "");
        assert_eq!(d.len(), 210);
    }

    #[test]
    fn aliases_come_from_ovirt_json_or_plain_text() {
        let id: DiskId = "6b1c7b2e-0a4f-4c41-9d55-6b1a2c3d4e5f".parse().unwrap();
        assert_eq!(
            alias_of(r#"{"DiskAlias":"web1_Disk1","DiskDescription":"root"}"#, id),
            ("web1_Disk1".to_string(), "root".to_string())
        );
        assert_eq!(alias_of("data2", id), ("data2".to_string(), String::new()));
        assert_eq!(alias_of("", id), ("disk-6b1c7b2e".to_string(), String::new()));
        assert_eq!(alias_of(r#"{"DiskAlias":""}"#, id).0, r#"{"DiskAlias":""}"#);
    }
}
