//! The crate's error type.

use crate::format::{NameError, RecordProblem};
use crate::io::IoError;

/// Why a lease operation failed. Messages name the lockspace, host id or resource involved.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("invalid {what} name {name:?}")]
    Name {
        what: &'static str,
        name: String,
        #[source]
        source: NameError,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("cannot open lease file {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} {object} failed")]
    Io {
        /// "reading", "writing".
        action: &'static str,
        /// e.g. "the leader of resource SDM", "the delta lease of host 3 in lockspace LS".
        object: String,
        #[source]
        source: IoError,
    },
    #[error("{object} cannot be trusted")]
    BadRecord {
        object: String,
        #[source]
        problem: RecordProblem,
    },
    #[error(
        "host id {host_id} of lockspace {space} is held by host {owner_name:?} (generation {generation})"
    )]
    HostIdBusy {
        space: String,
        host_id: u64,
        owner_name: String,
        generation: u64,
    },
    #[error("resource {resource} is owned by host {host_id} generation {generation} (lver {lver})")]
    OwnedByOther {
        resource: String,
        host_id: u64,
        generation: u64,
        lver: u64,
    },
    #[error("resource {resource} is held shared by live hosts {hosts:?}")]
    SharedHeld { resource: String, hosts: Vec<u64> },
    #[error("resource {resource} is already held by this lockspace")]
    AlreadyHeld { resource: String },
    #[error("resource {resource}: ballots for lver {lver} kept losing to other hosts")]
    Contended { resource: String, lver: u64 },
    #[error("resource {resource} has lver {found}, the caller asked for {expected}")]
    LverMismatch {
        resource: String,
        expected: u64,
        found: u64,
    },
    #[error("releasing resource {resource}: {reason}")]
    ReleaseMismatch { resource: String, reason: String },
    #[error("lockspace {space} host id {host_id} is no longer valid: {reason}")]
    Fenced {
        space: String,
        host_id: u64,
        reason: String,
    },
    #[error("lockspace {space} still holds {count} resource lease(s); release them first")]
    ResourcesHeld { space: String, count: usize },
    #[error("cannot start the {what} thread of lockspace {space}")]
    Spawn {
        what: &'static str,
        space: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lockspace {space} host id {host_id}: operation stopped")]
    Stopped { space: String, host_id: u64 },
}

impl LeaseError {
    pub(crate) fn io_read(object: impl Into<String>, source: IoError) -> LeaseError {
        LeaseError::Io {
            action: "reading",
            object: object.into(),
            source,
        }
    }

    pub(crate) fn io_write(object: impl Into<String>, source: IoError) -> LeaseError {
        LeaseError::Io {
            action: "writing",
            object: object.into(),
            source,
        }
    }

    pub(crate) fn bad(object: impl Into<String>, problem: RecordProblem) -> LeaseError {
        LeaseError::BadRecord {
            object: object.into(),
            problem,
        }
    }

    /// True for errors that say something about the lease's state (owned, busy, corrupt) rather
    /// than about the storage being unreachable.
    pub fn is_io(&self) -> bool {
        matches!(self, LeaseError::Io { .. })
    }
}
