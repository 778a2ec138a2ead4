//! What a restarted node reconnects to by itself: the storage connections and the pool
//! connection the engine last gave, recorded in the run directory (`storage-resume.json`).
//!
//! Why: our leases are renewed by the node process itself (sanlock's daemon would outlive
//! VDSM; nothing outlives us but QEMU and the fence watchdog). A node restarted while its VMs
//! run must renew their host ids again before the watchdog's deadline (8N after its last
//! renewal), and its thin disks need the pool's mailbox. With the engine there, the engine
//! reconnects it within seconds; with the engine away, nobody would, and the watchdog would
//! kill VMs that are perfectly fine. So the node keeps the last connection it was given and,
//! only when it finds running VMs at start, replays it.
//!
//! Invariants:
//! - The record is written atomically after each request that changes the connections
//!   (storage servers, pool connect/disconnect/refresh, master switch) succeeds, under one
//!   lock, so it always matches the last completed change.
//! - It is replayed only for running VMs: a node with none waits for the engine and never
//!   acts on a list the engine may have changed meanwhile. A replay is still safe against a
//!   stale record: host ids are delta leases (an id another host renews is not taken), the
//!   pool is checked against the domains' own metadata (a newer master found on the
//!   connected domains is followed), and VM leases held by another host make the node kill
//!   its own copy (`readopt_vm_leases`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use oxvirt_types::{PoolUuid, SdUuid};

use super::Connection;

/// The pool connection as `StoragePool.connect` gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolConnection {
    pub pool: PoolUuid,
    pub host_id: u64,
    pub master: SdUuid,
    pub master_version: u64,
    /// Seconds, as the request had them (`None`: the defaults).
    pub io_timeout: Option<f64>,
    pub fence_margin: Option<f64>,
    pub max_host_id: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResumeRecord {
    /// Storage server connections by the engine's id, in the order given.
    pub connections: Vec<Connection>,
    pub pool: Option<PoolConnection>,
}

impl ResumeRecord {
    pub fn is_empty(&self) -> bool {
        self.connections.is_empty() && self.pool.is_none()
    }
}

/// One change to the record, made after the request behind it succeeded.
#[derive(Debug, Clone)]
pub enum Change {
    /// Connections that connected (a connection with a known id replaces it).
    Connected(Vec<Connection>),
    Disconnected(Vec<String>),
    PoolConnected(PoolConnection),
    PoolDisconnected(PoolUuid),
    /// A refresh or a master switch: the pool's master is now `master` at `version`.
    Master {
        pool: PoolUuid,
        master: SdUuid,
        version: u64,
    },
}

impl ResumeRecord {
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Connected(conns) => {
                for c in conns {
                    match self.connections.iter_mut().find(|k| k.id == c.id) {
                        Some(k) => *k = c,
                        None => self.connections.push(c),
                    }
                }
            }
            Change::Disconnected(ids) => self.connections.retain(|c| !ids.contains(&c.id)),
            Change::PoolConnected(p) => self.pool = Some(p),
            Change::PoolDisconnected(pool) => {
                if self.pool.as_ref().is_some_and(|p| p.pool == pool) {
                    self.pool = None;
                }
            }
            Change::Master {
                pool,
                master,
                version,
            } => {
                if let Some(p) = self.pool.as_mut().filter(|p| p.pool == pool) {
                    p.master = master;
                    p.master_version = version;
                }
            }
        }
    }
}

/// The record on disk and its in-memory copy.
pub struct ResumeLog {
    path: PathBuf,
    record: Mutex<ResumeRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("cannot write the storage resume record {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ResumeLog {
    pub const FILE: &'static str = "storage-resume.json";

    /// Opens the record in `run_dir`; an unreadable one counts as empty (logged): the engine
    /// reconnects the node as it would without one.
    pub fn open(run_dir: &Path) -> ResumeLog {
        let path = run_dir.join(Self::FILE);
        let record = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable storage resume record");
                ResumeRecord::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ResumeRecord::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable storage resume record");
                ResumeRecord::default()
            }
        };
        ResumeLog {
            path,
            record: Mutex::new(record),
        }
    }

    pub fn record(&self) -> ResumeRecord {
        self.record.lock().expect("resume record").clone()
    }

    /// Applies `change` and writes the record (temp file, fsync, rename, fsync dir).
    pub fn apply(&self, change: Change) -> Result<(), ResumeError> {
        let mut rec = self.record.lock().expect("resume record");
        let mut next = rec.clone();
        next.apply(change);
        if next == *rec {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&next).expect("the record serializes");
        oxvirt_storage::fsio::atomic_write(&self.path, &bytes, 0o600).map_err(|source| {
            ResumeError::Write {
                path: self.path.clone(),
                source,
            }
        })?;
        *rec = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ConnectionKind;

    fn conn(id: &str, path: &str) -> Connection {
        Connection {
            id: id.into(),
            kind: ConnectionKind::Localfs,
            path: path.into(),
            vfs_type: None,
            mount_options: None,
        }
    }

    fn pool_conn(pool: PoolUuid, master: SdUuid) -> PoolConnection {
        PoolConnection {
            pool,
            host_id: 3,
            master,
            master_version: 1,
            io_timeout: Some(1.0),
            fence_margin: None,
            max_host_id: Some(8),
        }
    }

    #[test]
    fn changes_follow_the_requests_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = ResumeLog::open(dir.path());
        assert!(log.record().is_empty());
        let (pool, m1, m2) = (PoolUuid::new_random(), SdUuid::new_random(), SdUuid::new_random());
        log.apply(Change::Connected(vec![conn("a", "/a"), conn("b", "/b")]))
            .unwrap();
        log.apply(Change::Connected(vec![conn("a", "/a2")])).unwrap();
        log.apply(Change::PoolConnected(pool_conn(pool, m1))).unwrap();
        log.apply(Change::Master {
            pool,
            master: m2,
            version: 2,
        })
        .unwrap();
        // A change for another pool is not ours.
        log.apply(Change::Master {
            pool: PoolUuid::new_random(),
            master: m1,
            version: 9,
        })
        .unwrap();
        log.apply(Change::Disconnected(vec!["b".into()])).unwrap();

        let again = ResumeLog::open(dir.path()).record();
        assert_eq!(again.connections, vec![conn("a", "/a2")]);
        let p = again.pool.clone().unwrap();
        assert_eq!((p.master, p.master_version, p.host_id), (m2, 2, 3));
        assert_eq!(again, log.record());

        log.apply(Change::PoolDisconnected(PoolUuid::new_random()))
            .unwrap();
        assert!(log.record().pool.is_some(), "another pool's disconnect");
        log.apply(Change::PoolDisconnected(pool)).unwrap();
        log.apply(Change::Disconnected(vec!["a".into()])).unwrap();
        assert!(ResumeLog::open(dir.path()).record().is_empty());
    }

    #[test]
    fn a_damaged_record_counts_as_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ResumeLog::FILE), b"{ not json").unwrap();
        assert!(ResumeLog::open(dir.path()).record().is_empty());
    }

    #[test]
    fn a_failed_write_leaves_the_record_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        std::fs::create_dir(&gone).unwrap();
        let log = ResumeLog::open(&gone);
        std::fs::remove_dir(&gone).unwrap();
        let e = log.apply(Change::Connected(vec![conn("a", "/a")])).unwrap_err();
        assert!(e.to_string().contains("storage resume record"), "{e}");
        assert!(log.record().is_empty());
    }
}
