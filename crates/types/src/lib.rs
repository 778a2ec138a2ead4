//! Identifiers and plain data shared by the engine and the node.
//!
//! This crate owns the vocabulary — typed UUIDs for every domain object, host ids — and
//! nothing else.
//!
//! Architecture invariant: no logic beyond parsing and validating values lives here; no I/O.

pub mod api;
mod ids;

pub use ids::{
    AffinityGroupId, ClusterId, DcId, DiskProfileId, HostId, HostIdError, HostUuid, IdError, ImgUuid, JobId,
    NetworkAttachmentId, NetworkId, NicId, PoolUuid, QosId, SagaId, SdUuid, SnapshotId, StepId, TagId,
    TaskId, TemplateId, TransferId, UserId, VmId, VnicProfileId, VolUuid,
};
