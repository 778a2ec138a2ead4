//! The node daemon: serves storage, SPM, pool and VM verbs, runs VMs, monitors domains.
//!
//! Architecture invariant: the node stores nothing outside shared storage and its run directory;
//! a restarted node rebuilds its state from both.

pub mod api;
pub mod daemon;
pub mod enroll;
pub mod events;
pub mod host;
pub mod http;
pub mod imageio;
pub mod jobs;
pub mod net;
pub mod service;
pub mod storage;
pub mod vm;
pub mod watchdog;
