//! The storage crate's error type.

use std::path::PathBuf;

use oxvirt_types::{ImgUuid, SdUuid, VolUuid};

use crate::chain::ChainError;
use crate::sdmeta::MetadataError;
use crate::volmeta::VolMetaError;

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata of storage domain at {} is invalid", path.display())]
    DomainMetadata {
        path: PathBuf,
        #[source]
        source: MetadataError,
    },
    #[error("metadata of volume {vol} in image {img} is invalid")]
    VolumeMetadata {
        img: ImgUuid,
        vol: VolUuid,
        #[source]
        source: VolMetaError,
    },
    #[error("a storage domain already exists at {}", .0.display())]
    DomainExists(PathBuf),
    #[error("no storage domain at {}", .0.display())]
    NoDomain(PathBuf),
    #[error("storage domain at {} is version {version}; oxvirt handles version 5", path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("image {img} does not exist in storage domain {sd}")]
    NoImage { sd: SdUuid, img: ImgUuid },
    #[error("image {img} already exists in storage domain {sd}")]
    ImageExists { sd: SdUuid, img: ImgUuid },
    #[error("volume {vol} does not exist in image {img}")]
    NoVolume { img: ImgUuid, vol: VolUuid },
    #[error("volume {vol} already exists in storage domain {sd}")]
    VolumeExists { sd: SdUuid, vol: VolUuid },
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: &'static str, reason: String },
    #[error("volume {vol} of image {img} {state}; {verb} needs {needed}")]
    WrongState {
        img: ImgUuid,
        vol: VolUuid,
        verb: &'static str,
        state: String,
        needed: &'static str,
    },
    #[error("template volume {vol} of image {img} is used by images {clones:?}")]
    TemplateInUse {
        img: ImgUuid,
        vol: VolUuid,
        clones: Vec<ImgUuid>,
    },
    #[error("qemu-img failed on {subject}")]
    Qemu {
        subject: String,
        #[source]
        source: oxvirt_qemu::img::ImgError,
    },
    #[error("cannot initialize the lease {what} in {}", path.display())]
    Lease {
        what: String,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("operation {op} ({verb}) failed at step {step}: {desc}")]
    Step {
        op: uuid::Uuid,
        verb: String,
        step: usize,
        desc: String,
        #[source]
        source: Box<StorageError>,
    },
    #[error("operation {op} ({verb}) failed and its rollback failed too; the journal keeps it for recovery")]
    RollbackFailed {
        op: uuid::Uuid,
        verb: String,
        #[source]
        source: Box<StorageError>,
    },
    #[error("injected failure before step {step} of {verb}")]
    Injected { verb: String, step: usize },
    #[error("journal entry {} is unreadable", path.display())]
    Journal {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("storage domain {0} is needed by a journaled operation but was not given to recovery")]
    DomainUnavailable(SdUuid),
}

impl StorageError {
    pub fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| StorageError::Io { action, path, source }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        StorageError::InvalidArgument {
            what,
            reason: reason.into(),
        }
    }
}
