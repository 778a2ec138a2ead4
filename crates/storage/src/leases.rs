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

fn lease_err(what: String, path: &Path) -> impl FnOnce(oxvirt_lease::LeaseError) -> StorageError + '_ {
    move |e| StorageError::Lease {
        what,
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

/// Formats the host-id lockspace of domain `sd` at the start of `ids`.
pub fn init_lockspace(ids: &Path, sd: SdUuid, io_timeout_secs: u16) -> Result<()> {
    oxvirt_lease::direct::init_lockspace(ids, 0, &sd.to_string(), io_timeout_secs)
        .map_err(lease_err(format!("lockspace {sd}"), ids))
}

/// Formats resource `name` of lockspace `sd` at `offset` in `path`.
pub fn init_resource(path: &Path, offset: u64, sd: SdUuid, name: &str) -> Result<()> {
    oxvirt_lease::direct::init_resource(path, offset, &sd.to_string(), name)
        .map_err(lease_err(format!("resource {name}"), path))
}

/// Verifies that `ids` holds lockspace `sd` (host 1's delta lease decodes for it).
pub fn verify_lockspace(ids: &Path, sd: SdUuid) -> std::result::Result<(), String> {
    oxvirt_lease::direct::read_delta_leader(ids, 0, &sd.to_string(), 1)
        .map(drop)
        .map_err(|e| error_chain(&e))
}

/// Verifies that `path` holds resource `name` of lockspace `sd` at `offset`.
pub fn verify_resource(path: &Path, offset: u64, sd: SdUuid, name: &str) -> std::result::Result<(), String> {
    oxvirt_lease::direct::read_paxos_leader(path, offset, &sd.to_string(), name)
        .map(drop)
        .map_err(|e| error_chain(&e))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
