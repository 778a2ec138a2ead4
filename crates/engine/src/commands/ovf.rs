//! OVF stores: every active data domain keeps, in two raw volumes of its own (oVirt's
//! OVF_STORE disks, `DISKTYPE=OVFS`), the OVFs of the VMs and templates whose disks it holds,
//! so that the domain alone is enough to bring them back: detached and attached elsewhere,
//! imported by another engine, or after this one lost its database.
//!
//! Writing ([`Commands::update_ovf_store`]): the content is built from the database (VMs and
//! templates with a disk on the domain, diskless ones of the data center, and the domain's
//! still-unregistered entities) and written through the SPM into each store in turn, oldest
//! first. A store is marked `"Updated":false` in its description before its data is written
//! and `"Updated":true` with the tar's `"Size"` after, so a crash mid-write leaves the other
//! store as the one a reader picks. A domain whose content has not changed since its last
//! write is skipped. Writes run under one lock: the periodic pass (every
//! [`OVF_UPDATE_INTERVAL`], as oVirt), deactivation, and the REST `updateovfstore` action
//! never interleave on a store.
//!
//! Reading ([`Commands::load_ovf_stores`]): the first time the engine meets an attached
//! domain's stores (after an attach or import, or before its first write) it adopts them and
//! records the entities of the newest one that it has no record of as unregistered. They are
//! listed, registered ([`Commands::register_vm`], [`Commands::register_template`]) or removed
//! with their disks ([`Commands::remove_unregistered`]); until then every write keeps them.
//!
//! Detaching a domain forgets the entities that live on it (see `detach_storage_domain`),
//! which is safe only with a current store: detach refuses when the domain's OVFs differ
//! from what its stores last received.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::db::{ListQuery, Ref, TemplateFilter, VmFilter};
use crate::model::{
    DcId, Disk, DiskAttachment, DiskId, NewEvent, OvfEntityType, OvfStore, SdStatus, SdType, SdUuid,
    Severity, SnapshotType, TemplateId, UnregisteredOvf, VmId, VmStatus, VolUuid, BLANK_TEMPLATE_ID,
};
use crate::nodes::NodeClient;
use crate::ovf::{self, OvfDisk, OvfEntity, OvfTemplate, OvfVm, StoreContent};
use crate::time::Timestamp;

use super::storage::create_volume;
use super::{CommandError, Commands};

/// How often every data center's stores are brought up to date (oVirt's
/// `OvfUpdateIntervalInMinutes`).
pub const OVF_UPDATE_INTERVAL: Duration = Duration::from_secs(3600);
/// Stores per domain (oVirt's `StorageDomainOvfStoreCount`).
const STORES_PER_DOMAIN: usize = 2;
/// A store's capacity (oVirt's: 128 MiB).
const STORE_SIZE: u64 = 128 << 20;
/// Bytes per `Volume.writeData`/`readData` call (the node's limit).
const CHUNK: usize = 512 * 1024;

pub const OVF_STORE_UPDATE_FAILED: i32 = 1016;
pub const VM_REGISTERED: i32 = 180;
pub const TEMPLATE_REGISTERED: i32 = 186;

/// How a registration maps what the OVF says onto this engine (oVirt's `register` action).
#[derive(Debug, Clone, Default)]
pub struct RegisterOptions {
    /// The cluster to register into; by default the one the OVF names, in the domain's data
    /// center.
    pub cluster: Option<crate::model::ClusterId>,
    /// A new name (the OVF's is taken).
    pub name: Option<String>,
    /// Register without the disks that are missing from storage.
    pub allow_partial_import: bool,
    /// NICs whose MAC address is taken (or none) get a new one from the cluster's pool.
    pub reassign_bad_macs: bool,
    /// oVirt's cluster mappings: the OVF's cluster (by name) → a cluster here, used when no
    /// cluster is given.
    pub cluster_mappings: Vec<(String, crate::model::ClusterId)>,
    /// oVirt's vNIC profile mappings, by network (a network's one profile here): the OVF's
    /// network (`None`: NICs on none) → a network here (`None`: unwired).
    pub network_mappings: Vec<(Option<String>, Option<String>)>,
}

impl RegisterOptions {
    /// The cluster asked for, or the one the OVF's cluster maps to.
    fn cluster_for(&self, ovf_cluster: &str) -> Option<crate::model::ClusterId> {
        self.cluster.or_else(|| {
            self.cluster_mappings
                .iter()
                .find(|(from, _)| from == ovf_cluster)
                .map(|(_, to)| *to)
        })
    }

    /// Where a NIC on OVF network `net` goes, when a mapping says.
    fn network_for(&self, net: Option<&str>) -> Option<Option<String>> {
        self.network_mappings
            .iter()
            .find(|(from, _)| from.as_deref().filter(|f| !f.is_empty()) == net)
            .map(|(_, to)| to.clone().filter(|t| !t.is_empty()))
    }
}

/// Each entity's id and the SHA-256 of its OVF. The VMs' statuses are left out: a VM
/// starting is no reason to rewrite a store.
fn hashes_of(c: &StoreContent) -> BTreeMap<String, String> {
    c.ovfs
        .iter()
        .map(|(id, x)| (id.clone(), format!("{:x}", Sha256::digest(x.as_bytes()))))
        .collect()
}

fn stored_hashes(s: &OvfStore) -> Option<BTreeMap<String, String>> {
    s.entity_hashes
        .as_deref()
        .and_then(|h| serde_json::from_str(h).ok())
}

fn ovf_err(e: ovf::OvfError) -> CommandError {
    CommandError::Invalid(e.to_string())
}

impl Commands {
    /// The pool attachment of data domain `sd`, which must be active, and its SPM.
    async fn store_domain(
        &self,
        sd: SdUuid,
    ) -> Result<(DcId, crate::model::PoolUuid, NodeClient), CommandError> {
        let m = self.domain_member(sd).await?;
        if m.status != SdStatus::Active {
            return Err(CommandError::Conflict(format!(
                "storage domain {} is {}: its OVF stores are written and read while it is active",
                self.sd_label(sd).await,
                m.status
            )));
        }
        let dom = self
            .app
            .db
            .sd_get(sd)
            .await?
            .ok_or_else(|| CommandError::not_found("storage domain", sd))?;
        if dom.domain_type != SdType::Data {
            return Err(CommandError::Conflict(format!(
                "storage domain {} is an {} domain: only data domains keep OVF stores",
                dom.name, dom.domain_type
            )));
        }
        let (dc, spm) = self.app.dc_spm(m.data_center_id).await?;
        Ok((dc.id, dc.storage_pool_id, spm))
    }

    // --------------------------------------------------------------------------------------
    // Content.

    /// What domain `sd` of data center `dc` should hold in its stores now: the VMs with a disk
    /// on it or with none, the templates likewise, and its unregistered entities. A few bulk
    /// reads for the whole data center, not a few per VM.
    pub(crate) async fn ovf_content(&self, dc: DcId, sd: SdUuid) -> Result<StoreContent, CommandError> {
        let db = &self.app.db;
        let mut c = StoreContent::default();
        let vms = db
            .vm_list(&ListQuery {
                filter: VmFilter {
                    data_center: Some(Ref::Id(dc)),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await?;
        let mut parts = db.vm_parts_in_dc(dc).await?;
        let disks: BTreeMap<DiskId, Disk> = db
            .disk_list(&ListQuery::default())
            .await?
            .into_iter()
            .map(|d| (d.id, d))
            .collect();
        let chains = db.volume_chains().await?;
        let clusters: BTreeMap<_, String> = db
            .cluster_list(&ListQuery::default())
            .await?
            .into_iter()
            .map(|c| (c.id, c.name))
            .collect();
        let templates = db
            .template_list(&ListQuery {
                filter: TemplateFilter {
                    data_center: Some(Ref::Id(dc)),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await?;
        let template_names: BTreeMap<TemplateId, String> =
            templates.iter().map(|t| (t.id, t.name.clone())).collect();
        // A disk as its OVF lists it: its own volumes (a thin clone's chain starts in its
        // template's image), each with the snapshot it belongs to.
        let ovf_disk =
            |d: &Disk,
             a: Option<&DiskAttachment>,
             snap: &dyn Fn(VolUuid) -> Option<crate::model::SnapshotId>| OvfDisk {
                volumes: chains
                    .get(&d.id)
                    .into_iter()
                    .flatten()
                    .filter(|v| v.disk_id == d.id)
                    .map(|v| (v.clone(), snap(v.id)))
                    .collect(),
                interface: a.map_or(crate::model::DiskInterface::Virtio, |a| a.interface),
                bootable: a.is_some_and(|a| a.bootable),
                read_only: a.is_some_and(|a| a.read_only),
                active: a.is_none_or(|a| a.active),
                disk: d.clone(),
            };
        for vm in &vms {
            let atts = parts.attachments.remove(&vm.id).unwrap_or_default();
            let here = atts.is_empty()
                || atts
                    .iter()
                    .any(|a| disks.get(&a.disk_id).is_some_and(|d| d.storage_domain_id == sd));
            if !here {
                continue;
            }
            let snapshots = parts.snapshots.remove(&vm.id).unwrap_or_default();
            let active = snapshots
                .iter()
                .find(|s| s.snapshot_type == SnapshotType::Active)
                .map(|s| s.id);
            let mut snap_of: BTreeMap<(DiskId, VolUuid), crate::model::SnapshotId> = BTreeMap::new();
            for s in &snapshots {
                for d in &s.disks {
                    snap_of.insert((d.disk_id, d.volume_id), s.id);
                }
            }
            let odisks = atts
                .iter()
                .filter_map(|a| {
                    let d = disks.get(&a.disk_id)?;
                    Some(ovf_disk(d, Some(a), &|v| {
                        snap_of.get(&(d.id, v)).copied().or(active)
                    }))
                })
                .collect();
            let mut memory = BTreeMap::new();
            for s in snapshots.iter().filter(|s| s.persist_memory) {
                if let Some(m) = db.snapshot_memory_get(s.id).await? {
                    memory.insert(s.id, m);
                }
            }
            let o = OvfVm {
                memory,
                vm: vm.clone(),
                cluster_name: clusters.get(&vm.cluster_id).cloned().unwrap_or_default(),
                template_name: template_names.get(&vm.template_id).cloned().unwrap_or_else(|| {
                    if vm.template_id == BLANK_TEMPLATE_ID {
                        "Blank".into()
                    } else {
                        String::new()
                    }
                }),
                disks: odisks,
                nics: parts.nics.remove(&vm.id).unwrap_or_default(),
                snapshots,
            };
            c.ovfs.insert(vm.id.to_string(), ovf::write_vm(&o));
            if vm.runtime.status != VmStatus::Down {
                c.vm_status.insert(vm.id.to_string(), 1);
            }
        }
        for t in templates.iter().filter(|t| t.id != BLANK_TEMPLATE_ID) {
            let tdisks = db.template_disks(t.id).await?;
            if !(tdisks.is_empty() || tdisks.iter().any(|d| d.storage_domain_id == sd)) {
                continue;
            }
            let o = OvfTemplate {
                template: t.clone(),
                cluster_name: t
                    .cluster_id
                    .and_then(|c| clusters.get(&c).cloned())
                    .unwrap_or_default(),
                disks: tdisks.iter().map(|d| ovf_disk(d, None, &|_| None)).collect(),
                nics: db.nics_of_template(t.id).await?,
            };
            c.ovfs.insert(t.id.to_string(), ovf::write_template(&o));
        }
        for u in db.unregistered_ovfs(sd, None).await? {
            let id = u.entity_id.to_string();
            if let Some(s) = u.vm_status {
                c.vm_status.insert(id.clone(), s);
            }
            c.ovfs.entry(id).or_insert(u.ovf);
        }
        Ok(c)
    }

    // --------------------------------------------------------------------------------------
    // The stores on storage.

    /// The OVF store volumes on `sd`, read from storage: (disk, volume, description).
    async fn stores_on_storage(
        &self,
        spm: &NodeClient,
        sd: SdUuid,
    ) -> Result<Vec<(DiskId, VolUuid, String)>, CommandError> {
        let images = spm
            .call("StorageDomain.getImages", json!({ "sdUUID": sd }))
            .await?;
        let mut out = Vec::new();
        for img in images.as_array().into_iter().flatten() {
            let Some(img) = img.as_str().and_then(|s| s.parse::<DiskId>().ok()) else {
                continue;
            };
            let vols = spm
                .call("Image.getVolumes", json!({ "sdUUID": sd, "imgUUID": img }))
                .await?;
            let ids: Vec<VolUuid> = vols
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().and_then(|s| s.parse().ok()))
                .collect();
            // A store is one raw volume.
            let [vol] = ids.as_slice() else {
                continue;
            };
            let info = spm
                .call(
                    "Volume.getInfo",
                    json!({ "sdUUID": sd, "imgUUID": img, "volUUID": vol }),
                )
                .await?;
            let meta = &info["meta"];
            let desc = meta["description"].as_str().unwrap_or_default();
            let ovfs = meta["disktype"]
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case("OVFS"))
                || desc.contains("OVF_STORE");
            if ovfs {
                out.push((img, *vol, desc.to_string()));
            }
        }
        Ok(out)
    }

    /// Reads `size` bytes of store volume `vol`.
    async fn read_store(
        &self,
        spm: &NodeClient,
        sd: SdUuid,
        img: DiskId,
        vol: VolUuid,
        size: u64,
    ) -> Result<Vec<u8>, CommandError> {
        use base64::Engine as _;
        if size > STORE_SIZE * 8 {
            return Err(CommandError::Invalid(format!(
                "OVF store {img} on storage domain {sd} claims {size} bytes"
            )));
        }
        let mut out = Vec::with_capacity(size as usize);
        while (out.len() as u64) < size {
            let len = (size - out.len() as u64).min(CHUNK as u64);
            let r = spm
                .call(
                    "Volume.readData",
                    json!({ "sdUUID": sd, "imgUUID": img, "volUUID": vol, "offset": out.len(), "length": len }),
                )
                .await?;
            let chunk = base64::engine::general_purpose::STANDARD
                .decode(r.as_str().unwrap_or_default())
                .map_err(|e| {
                    CommandError::Invalid(format!("OVF store {img}: the node's data is not base64: {e}"))
                })?;
            if chunk.is_empty() {
                break;
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Adopts the stores of attached domain `sd` and records the entities of the newest one
    /// that the engine does not know as unregistered. Done once per attachment: a domain whose
    /// stores are known is left alone. Answers how many entities were recorded.
    pub async fn load_ovf_stores(&self, sd: SdUuid) -> Result<usize, CommandError> {
        let _g = self.app.ovf_lock.lock().await;
        self.load_stores_locked(sd).await
    }

    async fn load_stores_locked(&self, sd: SdUuid) -> Result<usize, CommandError> {
        let db = &self.app.db;
        let searched = || self.app.ovf_searched.lock().expect("ovf searched").contains(&sd);
        if searched() || !db.ovf_stores_of(sd).await?.is_empty() {
            return Ok(0);
        }
        let (_, _, spm) = self.store_domain(sd).await?;
        let found = self.stores_on_storage(&spm, sd).await?;
        if found.is_empty() {
            // Nothing to adopt: not searched again until the domain is attached anew (the
            // first write makes the stores).
            self.app.ovf_searched.lock().expect("ovf searched").insert(sd);
        }
        let newest = found
            .iter()
            .filter_map(|(img, vol, d)| ovf::store_state(d, sd).map(|(size, at)| (at, size, *img, *vol)))
            .max();
        let mut recorded = 0;
        if let Some((_, size, img, vol)) = newest {
            let data = self.read_store(&spm, sd, img, vol, size).await?;
            let content = ovf::unpack(&data).map_err(ovf_err)?;
            for (id, xml) in &content.ovfs {
                let entity = match ovf::read(id, xml.as_bytes(), Some(sd)) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(sd = %sd, entity = %id, error = %e, "OVF skipped");
                        continue;
                    }
                };
                let (known, entity_type) = match &entity {
                    OvfEntity::Vm(v) => (db.vm_get(v.vm.id).await?.is_some(), OvfEntityType::Vm),
                    OvfEntity::Template(t) => (
                        db.template_get(t.template.id).await?.is_some(),
                        OvfEntityType::Template,
                    ),
                };
                if known {
                    continue;
                }
                db.unregistered_ovf_put(&UnregisteredOvf {
                    entity_id: entity.id(),
                    storage_domain_id: sd,
                    entity_type,
                    name: entity.name().to_string(),
                    ovf: xml.clone(),
                    vm_status: content.vm_status.get(id).copied(),
                })
                .await?;
                recorded += 1;
            }
        }
        for (img, vol, d) in &found {
            db.ovf_store_insert(&OvfStore {
                disk_id: *img,
                storage_domain_id: sd,
                volume_id: *vol,
                ready: true,
                updated_at: ovf::store_state(d, sd).map(|s| s.1),
                entity_hashes: None,
            })
            .await?;
        }
        tracing::info!(sd = %sd, stores = found.len(), unregistered = recorded, "OVF stores loaded");
        Ok(recorded)
    }

    /// The domain's stores, made when missing (recorded first, then created on storage).
    async fn ensure_stores(
        &self,
        spm: &NodeClient,
        pool: crate::model::PoolUuid,
        sd: SdUuid,
    ) -> Result<Vec<OvfStore>, CommandError> {
        let db = &self.app.db;
        let mut stores = db.ovf_stores_of(sd).await?;
        while stores.len() < STORES_PER_DOMAIN {
            let s = OvfStore {
                disk_id: DiskId::new_random(),
                storage_domain_id: sd,
                volume_id: VolUuid::new_random(),
                ready: false,
                updated_at: None,
                entity_hashes: None,
            };
            db.ovf_store_insert(&s).await?;
            stores.push(s);
        }
        for s in stores.iter_mut().filter(|s| !s.ready) {
            let args = json!({
                "sdUUID": sd, "spUUID": pool, "imgUUID": s.disk_id, "volUUID": s.volume_id,
                "size": STORE_SIZE, "volFormat": "RAW", "preallocate": "SPARSE",
                "desc": super::storage::volume_description("OVF_STORE", "OVF_STORE"),
                "diskType": "OVFS",
            });
            create_volume(
                spm,
                args,
                sd,
                s.disk_id,
                s.volume_id,
                self.app.settings.task_timeout,
            )
            .await
            .map_err(|e| {
                CommandError::Conflict(format!("creating an OVF store on storage domain {sd}: {e}"))
            })?;
            db.ovf_store_ready(s.disk_id).await?;
            s.ready = true;
        }
        Ok(stores)
    }

    /// Writes `data` into store `s`: marked being written, the data, then complete.
    async fn write_store(
        &self,
        spm: &NodeClient,
        pool: crate::model::PoolUuid,
        s: &OvfStore,
        data: &[u8],
        hashes: &str,
        now: Timestamp,
    ) -> Result<(), CommandError> {
        use base64::Engine as _;
        let sd = s.storage_domain_id;
        let vol = json!({ "spUUID": pool, "sdUUID": sd, "imgUUID": s.disk_id, "volUUID": s.volume_id });
        let describe = |d: String| {
            let mut a = vol.clone();
            a["description"] = json!(d);
            a
        };
        spm.call(
            "Volume.setDescription",
            describe(ovf::store_description(sd, None, s.updated_at)),
        )
        .await?;
        self.app.db.ovf_store_written(s.disk_id, None).await?;
        let chunks: Vec<&[u8]> = data.chunks(CHUNK).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut a = vol.clone();
            a["offset"] = json!(i * CHUNK);
            a["data"] = json!(base64::engine::general_purpose::STANDARD.encode(chunk));
            a["sync"] = json!(i + 1 == chunks.len());
            spm.call("Volume.writeData", a).await?;
        }
        spm.call(
            "Volume.setDescription",
            describe(ovf::store_description(sd, Some(data.len() as u64), Some(now))),
        )
        .await?;
        self.app.db.ovf_store_written(s.disk_id, Some(hashes)).await?;
        Ok(())
    }

    /// Brings domain `sd`'s stores up to date; with `force` even when nothing changed.
    /// Answers whether it wrote.
    pub async fn update_ovf_store(&self, sd: SdUuid, force: bool) -> Result<bool, CommandError> {
        let _g = self.app.ovf_lock.lock().await;
        let r = self.update_store_locked(sd, force).await;
        if let Err(e) = &r {
            let mut ev = NewEvent::new(
                Severity::Warning,
                OVF_STORE_UPDATE_FAILED,
                format!(
                    "Failed to update the OVF stores of storage domain {}: {e}",
                    self.sd_label(sd).await
                ),
            );
            ev.storage_domain_id = Some(sd);
            let _ = self.app.db.event_add(&ev).await;
        }
        r
    }

    async fn update_store_locked(&self, sd: SdUuid, force: bool) -> Result<bool, CommandError> {
        let (dc, pool, spm) = self.store_domain(sd).await?;
        self.load_stores_locked(sd).await?;
        let content = self.ovf_content(dc, sd).await?;
        let hashes = hashes_of(&content);
        let stores = self.ensure_stores(&spm, pool, sd).await?;
        if !force && stores.iter().all(|s| stored_hashes(s).as_ref() == Some(&hashes)) {
            return Ok(false);
        }
        let hashes = serde_json::to_string(&hashes).unwrap_or_default();
        let now = self.app.db.now();
        let data = ovf::pack(&content, sd, now).map_err(ovf_err)?;
        if data.len() as u64 > STORE_SIZE {
            return Err(CommandError::Conflict(format!(
                "the OVFs of storage domain {sd} take {} bytes, more than a store's {STORE_SIZE}",
                data.len()
            )));
        }
        // Oldest first: the newest stays readable until another one is complete.
        for s in &stores {
            self.write_store(&spm, pool, s, &data, &hashes, now).await?;
        }
        tracing::info!(sd = %sd, entities = content.ovfs.len(), bytes = data.len(), "OVF stores updated");
        Ok(true)
    }

    /// The entities of `ids` whose OVF, as the database has it now, is not what `sd`'s newest
    /// complete store holds (detach's safety check: what leaves with the domain must be
    /// described there).
    pub(crate) async fn ovf_outdated(
        &self,
        dc: DcId,
        sd: SdUuid,
        ids: &BTreeSet<String>,
    ) -> Result<Vec<String>, CommandError> {
        let now = hashes_of(&self.ovf_content(dc, sd).await?);
        let stores = self.app.db.ovf_stores_of(sd).await?;
        let newest = stores
            .iter()
            .filter(|s| s.entity_hashes.is_some())
            .max_by_key(|s| s.updated_at)
            .and_then(stored_hashes)
            .unwrap_or_default();
        Ok(ids
            .iter()
            .filter(|id| now.get(*id) != newest.get(*id))
            .cloned()
            .collect())
    }

    /// Updates the stores of every active data domain of every data center that is up: the
    /// periodic pass. Failures are logged and recorded as events; the pass goes on.
    pub async fn update_all_ovf_stores(&self) -> Result<usize, CommandError> {
        let mut written = 0;
        for dc in self.app.db.dc_list(&ListQuery::default()).await? {
            if dc.status != crate::model::DcStatus::Up {
                continue;
            }
            for m in self.app.db.pool_members(dc.id).await? {
                if m.status != SdStatus::Active {
                    continue;
                }
                let data = self.app.db.sd_get(m.storage_domain_id).await?;
                if data.is_none_or(|d| d.domain_type != SdType::Data) {
                    continue;
                }
                match self.update_ovf_store(m.storage_domain_id, false).await {
                    Ok(true) => written += 1,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(sd = %m.storage_domain_id, error = %e, "OVF store update failed")
                    }
                }
            }
        }
        Ok(written)
    }

    // --------------------------------------------------------------------------------------
    // Unregistered entities.

    /// The VMs (or templates) domain `sd`'s stores describe that the engine has no record of.
    pub async fn unregistered_entities(
        &self,
        sd: SdUuid,
        kind: OvfEntityType,
    ) -> Result<Vec<OvfEntity>, CommandError> {
        self.load_ovf_stores(sd).await?;
        let mut out = Vec::new();
        for u in self.app.db.unregistered_ovfs(sd, Some(kind)).await? {
            match ovf::read(&u.entity_id.to_string(), u.ovf.as_bytes(), Some(sd)) {
                Ok(e) => out.push(e),
                Err(e) => tracing::warn!(sd = %sd, entity = %u.entity_id, error = %e, "OVF skipped"),
            }
        }
        Ok(out)
    }

    async fn unregistered(
        &self,
        sd: SdUuid,
        kind: OvfEntityType,
        id: uuid::Uuid,
    ) -> Result<OvfEntity, CommandError> {
        let what = match kind {
            OvfEntityType::Vm => "unregistered VM",
            OvfEntityType::Template => "unregistered template",
        };
        let u = self
            .app
            .db
            .unregistered_ovfs(sd, Some(kind))
            .await?
            .into_iter()
            .find(|u| u.entity_id == id)
            .ok_or_else(|| CommandError::not_found(what, format!("{id} on storage domain {sd}")))?;
        ovf::read(&id.to_string(), u.ovf.as_bytes(), Some(sd)).map_err(ovf_err)
    }

    /// The disks of an OVF as storage has them: each disk's volumes checked there (present,
    /// LEGAL) with their sizes from storage. Disks the engine knows already are taken as they
    /// are (an admin may have registered one alone) unless another VM uses them. Missing disks
    /// are an error, or left out with `partial`.
    async fn disks_on_storage(
        &self,
        spm: &NodeClient,
        label: &str,
        disks: &[OvfDisk],
        partial: bool,
    ) -> Result<(Vec<OvfDisk>, Vec<DiskId>), CommandError> {
        let db = &self.app.db;
        let mut out = Vec::new();
        let mut known = Vec::new();
        for d in disks {
            let id = d.disk.id;
            if db.disk_get(id).await?.is_some() {
                if let Some(a) = db.attachments_of_disk(id).await?.first() {
                    return Err(CommandError::Conflict(format!(
                        "disk {} ({id}) of {label} is attached to VM {} already",
                        d.disk.name, a.vm_id
                    )));
                }
                known.push(id);
                out.push(d.clone());
                continue;
            }
            let mut found = d.clone();
            let mut missing = None;
            for (v, _) in found.volumes.iter_mut() {
                let info = spm
                    .call(
                        "Volume.getInfo",
                        json!({ "sdUUID": v.storage_domain_id, "imgUUID": id, "volUUID": v.id }),
                    )
                    .await;
                match info {
                    Ok(i)
                        if i["meta"]["legality"]
                            .as_str()
                            .is_some_and(|l| l.eq_ignore_ascii_case("legal")) =>
                    {
                        v.actual_size = i["true_size"].as_u64().unwrap_or(v.actual_size);
                        v.created_at =
                            Timestamp::from_millis(i["meta"]["ctime"].as_i64().unwrap_or(0) * 1000);
                    }
                    Ok(_) => missing = Some(format!("volume {} is not LEGAL", v.id)),
                    Err(e) => missing = Some(format!("volume {}: {e}", v.id)),
                }
                if missing.is_some() {
                    break;
                }
            }
            if found.volumes.is_empty() {
                missing = Some("it has no volume".into());
            }
            match missing {
                None => {
                    found.disk.actual_size = found.volumes.iter().map(|(v, _)| v.actual_size).sum();
                    out.push(found);
                }
                Some(_) if partial => {
                    tracing::warn!(disk = %id, entity = label, "disk missing from storage left out of the registration");
                }
                Some(why) => {
                    return Err(CommandError::Conflict(format!(
                        "disk {} ({id}) of {label} cannot be registered: {why} (register with allow_partial_import to leave it out)",
                        d.disk.name
                    )))
                }
            }
        }
        Ok((out, known))
    }

    /// The cluster an entity registers into: the one asked for, else the one its OVF names;
    /// it must be in the domain's data center.
    async fn register_cluster(
        &self,
        dc: DcId,
        asked: Option<crate::model::ClusterId>,
        ovf_cluster: &str,
    ) -> Result<crate::model::Cluster, CommandError> {
        let db = &self.app.db;
        let cl = match asked {
            Some(id) => self.app.cluster(id).await?,
            None => db.cluster_get_by_name(ovf_cluster).await?.ok_or_else(|| {
                CommandError::Conflict(format!(
                    "the OVF's cluster {ovf_cluster:?} is not in this engine: name a cluster to register into"
                ))
            })?,
        };
        if cl.data_center_id != dc {
            return Err(CommandError::Conflict(format!(
                "cluster {} is in another data center than the storage domain",
                cl.name
            )));
        }
        Ok(cl)
    }

    /// The names of the networks cluster `cl` has (where a registered NIC may go).
    async fn network_names(&self, cl: crate::model::ClusterId) -> Result<BTreeSet<String>, CommandError> {
        Ok(self
            .app
            .db
            .cluster_networks(cl)
            .await?
            .into_iter()
            .map(|n| n.name)
            .collect())
    }

    /// Registers unregistered VM `id` of domain `sd`: the VM with its disks (volume chains as
    /// storage has them), NICs and snapshots, in one transaction.
    pub async fn register_vm(
        &self,
        sd: SdUuid,
        id: VmId,
        opts: RegisterOptions,
    ) -> Result<crate::model::Vm, CommandError> {
        let _g = self.app.ovf_lock.lock().await;
        let db = &self.app.db;
        if db.vm_get(id).await?.is_some() {
            return Err(CommandError::Conflict(format!("VM {id} is registered already")));
        }
        let OvfEntity::Vm(o) = self.unregistered(sd, OvfEntityType::Vm, *id.as_uuid()).await? else {
            return Err(CommandError::not_found("unregistered VM", id));
        };
        let (dc, _, spm) = self.store_domain(sd).await?;
        let cl = self
            .register_cluster(dc, opts.cluster_for(&o.cluster_name), &o.cluster_name)
            .await?;
        let name = opts.name.clone().unwrap_or_else(|| o.vm.name.clone());
        if db.vm_get_by_name(&name).await?.is_some() {
            return Err(CommandError::Conflict(format!(
                "a VM named {name} exists: register VM {id} under another name"
            )));
        }
        if o.vm.template_id != BLANK_TEMPLATE_ID && db.template_get(o.vm.template_id).await?.is_none() {
            return Err(CommandError::Conflict(format!(
                "VM {name} is based on template {} ({}), which is not registered: register the template first",
                o.template_name, o.vm.template_id
            )));
        }
        let label = format!("VM {name}");
        let (disks, known) = self
            .disks_on_storage(&spm, &label, &o.disks, opts.allow_partial_import)
            .await?;
        let networks = self.network_names(cl.id).await?;

        // A snapshot's saved memory comes back when its volume is on storage, LEGAL.
        let mut memories = BTreeMap::new();
        for (snap, m) in &o.memory {
            let v = m.state;
            let info = spm
                .call(
                    "Volume.getInfo",
                    json!({ "sdUUID": v.sd, "imgUUID": v.img, "volUUID": v.vol }),
                )
                .await;
            match info {
                Ok(i)
                    if i["meta"]["legality"]
                        .as_str()
                        .is_some_and(|l| l.eq_ignore_ascii_case("legal")) =>
                {
                    memories.insert(*snap, *m);
                }
                _ => {
                    tracing::warn!(vm = %name, snapshot = %snap, "a snapshot's memory is not on storage; it registers without it")
                }
            }
        }
        let mut vm = o.vm.clone();
        vm.name = name.clone();
        vm.cluster_id = cl.id;
        // Pinning to hosts of another setup means nothing here; a lease domain must be ours.
        vm.placement.hosts.retain(|_| false);
        if let Some(l) = vm.lease_storage_domain_id {
            if !db
                .pool_members(dc)
                .await?
                .iter()
                .any(|m| m.storage_domain_id == l)
            {
                vm.lease_storage_domain_id = None;
            }
        }
        let mut tx = db.begin().await?;
        tx.vm_insert(&vm).await?;
        for d in &disks {
            if !known.contains(&d.disk.id) {
                tx.disk_insert(&d.disk).await?;
                for (v, _) in &d.volumes {
                    tx.volume_insert(v).await?;
                }
            }
            tx.attachment_add(&DiskAttachment {
                vm_id: vm.id,
                disk_id: d.disk.id,
                interface: d.interface,
                bootable: d.bootable,
                active: d.active,
                read_only: d.read_only,
            })
            .await?;
        }
        for n in &o.nics {
            let mut nic = n.clone();
            if let Some(to) = opts.network_for(nic.network.as_deref()) {
                if let Some(t) = to.as_ref().filter(|t| !networks.contains(*t)) {
                    return Err(CommandError::Conflict(format!(
                        "the vNIC profile mapping of NIC {} names network {t}, which cluster {} lacks",
                        nic.name, cl.name
                    )));
                }
                nic.network = to;
            } else if nic.network.as_ref().is_some_and(|net| !networks.contains(net)) {
                // The network is not in this cluster: the NIC comes back unwired (an empty
                // profile, as oVirt does without a mapping).
                nic.network = None;
            }
            let taken = nic.mac.0 == [0; 6] || db.nic_mac_in_use(nic.mac).await?;
            let mac = match (taken, opts.reassign_bad_macs) {
                (false, _) => Some(nic.mac),
                (true, true) => None,
                (true, false) => {
                    return Err(CommandError::Conflict(format!(
                        "MAC address {} of NIC {} is in use: register with reassign_bad_macs",
                        nic.mac, nic.name
                    )))
                }
            };
            tx.nic_insert_pooled(&nic, cl.id, mac).await?;
        }
        let registered: BTreeSet<DiskId> = disks.iter().map(|d| d.disk.id).collect();
        for s in o
            .snapshots
            .iter()
            .filter(|s| s.snapshot_type == SnapshotType::Regular)
        {
            let mut s = s.clone();
            s.disks.retain(|d| registered.contains(&d.disk_id));
            let memory = memories.get(&s.id);
            s.persist_memory = memory.is_some();
            tx.snapshot_insert(&s).await?;
            if let Some(m) = memory {
                tx.snapshot_memory_set(s.id, m).await?;
            }
        }
        tx.unregistered_ovf_remove(sd, *id.as_uuid()).await?;
        tx.commit().await?;
        let mut ev = NewEvent::new(
            Severity::Normal,
            VM_REGISTERED,
            format!(
                "VM {name} was registered from storage domain {} with {} disk(s)",
                self.sd_label(sd).await,
                disks.len()
            ),
        );
        ev.vm_id = Some(vm.id);
        ev.storage_domain_id = Some(sd);
        db.event_add(&ev).await?;
        tracing::info!(vm = %name, id = %id, sd = %sd, disks = disks.len(), "VM registered");
        self.vm(vm.id).await
    }

    /// Registers unregistered template `id` of domain `sd` with its disks and NICs.
    pub async fn register_template(
        &self,
        sd: SdUuid,
        id: TemplateId,
        opts: RegisterOptions,
    ) -> Result<crate::model::Template, CommandError> {
        let _g = self.app.ovf_lock.lock().await;
        let db = &self.app.db;
        if db.template_get(id).await?.is_some() {
            return Err(CommandError::Conflict(format!(
                "template {id} is registered already"
            )));
        }
        let OvfEntity::Template(o) = self
            .unregistered(sd, OvfEntityType::Template, *id.as_uuid())
            .await?
        else {
            return Err(CommandError::not_found("unregistered template", id));
        };
        let (dc, _, spm) = self.store_domain(sd).await?;
        let cl = self
            .register_cluster(dc, opts.cluster_for(&o.cluster_name), &o.cluster_name)
            .await?;
        let name = opts.name.clone().unwrap_or_else(|| o.template.name.clone());
        if db.template_get_by_name(&name).await?.is_some() {
            return Err(CommandError::Conflict(format!(
                "a template named {name} exists: register template {id} under another name"
            )));
        }
        let label = format!("template {name}");
        let (disks, known) = self
            .disks_on_storage(&spm, &label, &o.disks, opts.allow_partial_import)
            .await?;
        let mut t = o.template.clone();
        t.name = name.clone();
        t.cluster_id = Some(cl.id);
        let mut tx = db.begin().await?;
        tx.template_insert(&t).await?;
        for d in &disks {
            if !known.contains(&d.disk.id) {
                tx.disk_insert(&d.disk).await?;
                for (v, _) in &d.volumes {
                    let mut v = v.clone();
                    v.voltype = crate::model::VolType::Shared;
                    tx.volume_insert(&v).await?;
                }
            }
            tx.template_disk_add(t.id, d.disk.id).await?;
        }
        let networks = self.network_names(cl.id).await?;
        for n in &o.nics {
            let mut n = n.clone();
            n.network = opts
                .network_for(n.network.as_deref())
                .unwrap_or(n.network)
                .filter(|net| networks.contains(net));
            tx.template_nic_insert(&n).await?;
        }
        tx.unregistered_ovf_remove(sd, *id.as_uuid()).await?;
        tx.commit().await?;
        let mut ev = NewEvent::new(
            Severity::Normal,
            TEMPLATE_REGISTERED,
            format!(
                "Template {name} was registered from storage domain {} with {} disk(s)",
                self.sd_label(sd).await,
                disks.len()
            ),
        );
        ev.template_id = Some(t.id);
        ev.storage_domain_id = Some(sd);
        db.event_add(&ev).await?;
        db.template_get(t.id)
            .await?
            .ok_or_else(|| CommandError::not_found("template", t.id))
    }

    /// Removes unregistered entity `id` of domain `sd`: its images on the domain are deleted
    /// and it leaves the stores (oVirt's `DELETE /storagedomains/{sd}/vms/{id}`).
    pub async fn remove_unregistered(
        &self,
        sd: SdUuid,
        kind: OvfEntityType,
        id: uuid::Uuid,
    ) -> Result<(), CommandError> {
        let entity = {
            let _g = self.app.ovf_lock.lock().await;
            self.unregistered(sd, kind, id).await?
        };
        let (dc, _, _) = self.store_domain(sd).await?;
        for d in entity.disks() {
            if d.disk.storage_domain_id != sd || self.app.db.disk_get(d.disk.id).await?.is_some() {
                continue;
            }
            super::storage::delete_image(&self.app, dc, sd, d.disk.id)
                .await
                .map_err(|e| {
                    CommandError::Conflict(format!("deleting disk {} of {}: {e}", d.disk.name, entity.name()))
                })?;
        }
        self.app.db.unregistered_ovf_remove(sd, id).await?;
        self.update_ovf_store(sd, false).await?;
        Ok(())
    }
}

/// Values for a REST listing of an unregistered VM: the VM as its OVF has it.
pub fn unregistered_vm(e: &OvfEntity) -> Option<&OvfVm> {
    match e {
        OvfEntity::Vm(v) => Some(v),
        OvfEntity::Template(_) => None,
    }
}

/// The template of an unregistered-template listing.
pub fn unregistered_template(e: &OvfEntity) -> Option<&OvfTemplate> {
    match e {
        OvfEntity::Template(t) => Some(t),
        OvfEntity::Vm(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClusterId;

    #[test]
    fn mappings_choose_the_cluster_and_the_networks() {
        let (a, b) = (ClusterId::new_random(), ClusterId::new_random());
        let mut o = RegisterOptions {
            cluster_mappings: vec![("east".into(), a)],
            network_mappings: vec![
                (Some("red".into()), Some("blue".into())),
                (Some("green".into()), None),
                (None, Some("blue".into())),
            ],
            ..Default::default()
        };
        assert_eq!(o.cluster_for("east"), Some(a));
        assert_eq!(o.cluster_for("west"), None, "unmapped: the OVF's own, by name");
        o.cluster = Some(b);
        assert_eq!(o.cluster_for("east"), Some(b), "a cluster asked for wins");
        assert_eq!(o.network_for(Some("red")), Some(Some("blue".into())));
        assert_eq!(
            o.network_for(Some("green")),
            Some(None),
            "mapped to none: unwired"
        );
        assert_eq!(
            o.network_for(None),
            Some(Some("blue".into())),
            "NICs on no network"
        );
        assert_eq!(o.network_for(Some("yellow")), None, "unmapped");
    }
}
