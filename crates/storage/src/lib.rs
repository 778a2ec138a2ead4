//! Shared storage in VDSM's format: file storage domains, images and volume chains, the storage
//! pool and its master domain, SPM duties, the task journal and the mailbox.
//!
//! Architecture invariant: this crate never talks to the engine; everything it knows is on
//! shared storage.
