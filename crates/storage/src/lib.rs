//! Shared storage in VDSM's format: file storage domains, images and volume chains (this
//! crate's core today), later the storage pool and its master domain, SPM duties, the task
//! journal and the mailbox.
//!
//! Layout:
//! - pure codecs and rules, no I/O: [`sdmeta`] (domain metadata and its `_SHA_CKSUM`),
//!   [`volmeta`] (`.meta` records), [`xleases`] (external-lease index), [`chain`] (chain order
//!   and well-formedness);
//! - the file-system edge: [`fsio`] (atomic writes, direct reads), [`leases`] (lease areas via
//!   the `lease` crate);
//! - the domain and its verbs: [`domain`] (create/open/info/health/recover), `image.rs` (volume
//!   and image verbs), `check.rs` (the checker), [`ops`] (steps, journal, failpoints, recovery).
//!
//! Architecture invariant: this crate never talks to the engine; everything it knows is on
//! shared storage. Ids reach the file system only as typed UUIDs. Every verb validates before it
//! changes anything and runs as a journaled [`ops::Operation`] whose crash leaves either the
//! old state or one that [`FileStorageDomain::recover`] completes.

pub mod bench;
pub mod chain;
mod check;
pub mod domain;
pub mod error;
pub mod fsio;
mod image;
pub mod leases;
pub mod mailbox;
pub mod ops;
pub mod pool;
pub mod sdmeta;
pub mod spm;
pub mod tasks;
pub mod volmeta;
pub mod xlease_ops;
pub mod xleases;

pub use chain::{Chain, ChainError, ChainVolume};
pub use check::{CheckReport, Problem, Severity};
pub use domain::{DomainStats, FileStorageDomain, Health, NewDomain, RecoveryReport};
pub use error::{Result, StorageError};
pub use image::{CopyMode, ImageChainReport, SyncType, VolumeInfo, VolumeSpec, CAPACITY_ALIGN, MAX_CAPACITY};
pub use ops::{FailMode, Failpoint};
pub use sdmeta::{DomainClass, DomainMetadata, DomainType};
pub use volmeta::{Allocation, Legality, VolFormat, VolRole, VolumeMetadata};
