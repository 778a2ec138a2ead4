//! Lease areas a file domain carries, formatted through the `lease` crate's direct
//! initialization (sanlock's on-disk format):
//! - `dom_md/ids`: the delta-lease lockspace named by the sdUUID (host ids);
//! - `dom_md/leases`: the "SDM" Paxos resource at `SDM_LEASE_SLOT * alignment` (1 MiB);
//! - `<vol>.lease`: one Paxos resource named by the volUUID at offset 0.
//!
//! Invariant: a lease file is formatted before the object it protects is marked LEGAL.

use std::path::Path;

use oxvirt_types::SdUuid;

use crate::error::{Result, StorageError};

/// Name of the SPM resource in `dom_md/leases`.
pub const SDM_LEASE_NAME: &str = "SDM";
/// Slot of the SDM resource in `dom_md/leases` (VDSM's `SDM_LEASE_SLOT`).
pub const SDM_LEASE_SLOT: u64 = 1;
/// Offset of a volume's resource in its `.lease` file.
pub const VOLUME_LEASE_OFFSET: u64 = 0;
/// Size of one lease area at 1 MiB alignment.
pub const LEASE_AREA: u64 = 1 << 20;

// TEMP-LEASE: until crates/lease exports `direct::{init_lockspace, init_resource}`, the areas are
// only sized; replaced by the real calls before this work is handed over.
/// Formats the host-id lockspace of domain `sd` at the start of `ids`.
pub fn init_lockspace(ids: &Path, sd: SdUuid, io_timeout_secs: u16) -> Result<()> {
    let _ = (sd, io_timeout_secs);
    crate::fsio::create_sized(ids, LEASE_AREA, 0o660).map_err(StorageError::io("format lockspace in", ids))
}

/// Formats resource `name` of lockspace `sd` at `offset` in `path`.
pub fn init_resource(path: &Path, offset: u64, sd: SdUuid, name: &str) -> Result<()> {
    let _ = (sd, name);
    crate::fsio::create_sized(path, offset + LEASE_AREA, 0o660).map_err(StorageError::io("format resource in", path))
}
