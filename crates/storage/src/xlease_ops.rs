//! External leases (VM leases) in a domain's `xleases` volume, as VDSM keeps them: an index of
//! records naming each lease and its offset, and a sanlock resource at that offset.
//!
//! Adding a lease follows VDSM's protocol so a crash is visible and repairable: the index is
//! marked updating, the record is written with its updating flag, the resource is formatted,
//! then the record and the index are marked done. A record still flagged updating is not a
//! lease: lookups ignore it and the next add reuses or completes it.
//!
//! Invariant: only the SPM adds or removes leases (the index has one writer); any host reads it.

use std::path::PathBuf;

use crate::domain::FileStorageDomain;
use crate::error::{Result, StorageError};
use crate::fsio;
use crate::leases;
use crate::xleases::{self, IndexMetadata, Record, INDEX_SIZE, MAX_RECORDS, METADATA_SIZE, RECORD_SIZE};

/// Where a lease lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct XleaseInfo {
    pub lease_id: String,
    pub path: PathBuf,
    pub offset: u64,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 48 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl FileStorageDomain {
    fn xleases_path(&self) -> PathBuf {
        self.md_dir().join("xleases")
    }

    fn read_xindex(&self) -> Result<(IndexMetadata, Vec<Record>)> {
        let path = self.xleases_path();
        let off = xleases::index_offset(self.metadata().alignment);
        let buf = fsio::read_at(&path, off, INDEX_SIZE).map_err(StorageError::io("read", &path))?;
        xleases::parse_index(&buf).map_err(|e| StorageError::invalid("xleases index", e.to_string()))
    }

    fn write_xmeta(&self, md: &IndexMetadata) -> Result<()> {
        let path = self.xleases_path();
        let off = xleases::index_offset(self.metadata().alignment);
        fsio::write_at(&path, off, &xleases::metadata_block(md)).map_err(StorageError::io("write", &path))
    }

    fn write_xrecord(&self, n: usize, r: &Record) -> Result<()> {
        let path = self.xleases_path();
        let off = xleases::index_offset(self.metadata().alignment) + (METADATA_SIZE + n * RECORD_SIZE) as u64;
        fsio::write_at(&path, off, &xleases::record_bytes(r)).map_err(StorageError::io("write", &path))
    }

    /// The lease named `id`, when it exists (complete, not being updated).
    pub fn lookup_xlease(&self, id: &str) -> Result<Option<XleaseInfo>> {
        let (_, recs) = self.read_xindex()?;
        Ok(recs
            .iter()
            .find(|r| r.resource == id && !r.updating)
            .map(|r| XleaseInfo {
                lease_id: id.to_string(),
                path: self.xleases_path(),
                offset: r.offset,
            }))
    }

    /// Adds lease `id` (SPM only); returns the existing one when it is there already.
    pub fn create_xlease(&self, id: &str) -> Result<XleaseInfo> {
        if !valid_id(id) {
            return Err(StorageError::invalid(
                "lease id",
                format!("{id:?} must be 1-48 letters, digits or '-'"),
            ));
        }
        let _g = self.lock_ops();
        let (mut md, recs) = self.read_xindex()?;
        if let Some(r) = recs.iter().find(|r| r.resource == id && !r.updating) {
            return Ok(XleaseInfo {
                lease_id: id.into(),
                path: self.xleases_path(),
                offset: r.offset,
            });
        }
        // Reuse a half-made record of the same lease, else the first empty slot.
        let n = recs
            .iter()
            .position(|r| r.resource == id)
            .or_else(|| recs.iter().position(Record::is_empty))
            .ok_or_else(|| {
                StorageError::invalid("xleases", format!("all {MAX_RECORDS} lease slots are used"))
            })?;
        let align = self.metadata().alignment;
        let offset = xleases::lease_offset(n, align);
        let path = self.xleases_path();
        fsio::ensure_len(&path, offset + align).map_err(StorageError::io("grow", &path))?;
        md.updating = true;
        self.write_xmeta(&md)?;
        self.write_xrecord(
            n,
            &Record {
                resource: id.into(),
                offset,
                updating: true,
            },
        )?;
        leases::init_resource(&path, offset, self.sd(), id)?;
        self.write_xrecord(
            n,
            &Record {
                resource: id.into(),
                offset,
                updating: false,
            },
        )?;
        md.updating = false;
        self.write_xmeta(&md)?;
        tracing::info!(sd = %self.sd(), lease = id, offset, "external lease created");
        Ok(XleaseInfo {
            lease_id: id.into(),
            path,
            offset,
        })
    }

    /// Removes lease `id` (SPM only); removing a missing lease is not an error.
    pub fn remove_xlease(&self, id: &str) -> Result<bool> {
        let _g = self.lock_ops();
        let (mut md, recs) = self.read_xindex()?;
        let Some(n) = recs.iter().position(|r| r.resource == id) else {
            return Ok(false);
        };
        md.updating = true;
        self.write_xmeta(&md)?;
        self.write_xrecord(
            n,
            &Record {
                resource: String::new(),
                offset: 0,
                updating: false,
            },
        )?;
        md.updating = false;
        self.write_xmeta(&md)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DomainType, NewDomain};
    use oxvirt_types::SdUuid;

    #[test]
    fn leases_are_added_found_reused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sd = SdUuid::new_random();
        let dom = FileStorageDomain::create(
            dir.path(),
            &NewDomain {
                sd,
                description: "d".into(),
                domain_type: DomainType::LocalFs,
                remote_path: None,
            },
        )
        .unwrap();
        assert!(dom.lookup_xlease("vm-1").unwrap().is_none());
        assert!(dom.create_xlease("../x").is_err());
        let a = dom.create_xlease("4f1c9a0e-2b3d-4c5e-8f70-0123456789ab").unwrap();
        let again = dom.create_xlease("4f1c9a0e-2b3d-4c5e-8f70-0123456789ab").unwrap();
        assert_eq!(a, again, "adding twice returns the same lease");
        let b = dom.create_xlease("5f1c9a0e-2b3d-4c5e-8f70-0123456789ab").unwrap();
        assert_ne!(a.offset, b.offset);
        assert_eq!(a.offset, xleases::lease_offset(0, 1 << 20));
        // The resource is a real sanlock resource named by the lease id.
        let leader =
            oxvirt_lease::direct::read_paxos_leader(&a.path, a.offset, &sd.to_string(), &a.lease_id).unwrap();
        assert_eq!(leader.resource_name.to_string(), a.lease_id);
        assert_eq!(dom.lookup_xlease(&b.lease_id).unwrap(), Some(b.clone()));
        assert!(dom.remove_xlease(&a.lease_id).unwrap());
        assert!(dom.lookup_xlease(&a.lease_id).unwrap().is_none());
        let c = dom.create_xlease("6f1c9a0e-2b3d-4c5e-8f70-0123456789ab").unwrap();
        assert_eq!(c.offset, a.offset, "the freed slot is reused");
        let (md, _) = dom.read_xindex().unwrap();
        assert!(!md.updating);
    }
}
