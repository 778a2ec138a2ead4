//! The storage pool: a data center's storage domains, one of which — the **master** — carries
//! the pool metadata, the task journal (`master/tasks`) and the SPM lease.
//!
//! Pool metadata lives in the master domain's `dom_md/metadata`, next to its own keys, as VDSM
//! keeps it on file domains:
//!
//! | key | value |
//! |---|---|
//! | `ROLE` | `Master` on the master domain, `Regular` elsewhere |
//! | `POOL_UUID` | the pool, on every attached domain |
//! | `POOL_DESCRIPTION` | the pool's name (at most 50 characters) |
//! | `POOL_DOMAINS` | `sdUUID:Active,sdUUID:Attached,…` |
//! | `POOL_SPM_ID` | host id of the SPM that last wrote, -1 when none |
//! | `POOL_SPM_LVER` | that SPM's lease version (its fencing token), -1 when none |
//! | `MASTER_VERSION` | bumped each time the master role moves |
//!
//! Invariant: **only the holder of the SDM lease with the current lver writes pool metadata.**
//! Every write goes through [`PoolWriter`], which re-reads the metadata, refuses if it names a
//! larger lver than ours (a newer SPM exists: we were fenced), asks the [`SpmFence`] that our
//! lease is still valid right before the atomic replace, and writes our lver back. Creating a
//! pool is the only write without an SPM (there is none yet), and it refuses a domain that
//! already belongs to a pool.
//!
//! Moving the master ([`switch_master`]) writes the new master first, with a larger
//! `MASTER_VERSION`, then demotes the old one: a crash in between leaves two domains claiming
//! the role and readers ([`find_master`]) take the larger version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oxvirt_types::{PoolUuid, SdUuid};
use serde::Serialize;

use crate::domain::DOMAIN_MD_DIR;
use crate::fsio;
use crate::sdmeta::{DomainMetadata, DomainRole};

pub const PMDK_DOMAINS: &str = "POOL_DOMAINS";
pub const PMDK_POOL_DESCRIPTION: &str = "POOL_DESCRIPTION";
pub const PMDK_LVER: &str = "POOL_SPM_LVER";
pub const PMDK_SPM_ID: &str = "POOL_SPM_ID";
pub const PMDK_MASTER_VER: &str = "MASTER_VERSION";
pub const POOL_KEYS: [&str; 5] = [
    PMDK_DOMAINS,
    PMDK_POOL_DESCRIPTION,
    PMDK_LVER,
    PMDK_SPM_ID,
    PMDK_MASTER_VER,
];
pub const SPM_ID_FREE: i64 = -1;
pub const LVER_INVALID: i64 = -1;
pub const MAX_POOL_DESCRIPTION: usize = 50;
/// The master domain's directory of pool-wide files.
pub const MASTER_DIR: &str = "master";
pub const TASKS_DIR: &str = "tasks";
pub const VMS_DIR: &str = "vms";

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata of storage domain at {} is invalid", path.display())]
    Metadata {
        path: PathBuf,
        #[source]
        source: crate::sdmeta::MetadataError,
    },
    #[error("pool metadata key {key} has an invalid value {value:?}")]
    Key { key: &'static str, value: String },
    #[error("storage domain {sd} is not the master of a pool")]
    NotMaster { sd: SdUuid },
    #[error("storage domain {sd} belongs to pool {found}, not {expected}")]
    WrongPool {
        sd: SdUuid,
        expected: PoolUuid,
        found: PoolUuid,
    },
    #[error("storage domain {sd} already belongs to pool {pool}")]
    AlreadyInPool { sd: SdUuid, pool: PoolUuid },
    #[error("storage domain {sd} is not attached to pool {pool}")]
    NotAttached { sd: SdUuid, pool: PoolUuid },
    #[error("storage domain {sd} is {status:?} in pool {pool}; {verb} needs it {needed}")]
    DomainState {
        sd: SdUuid,
        pool: PoolUuid,
        status: DomainStatus,
        verb: &'static str,
        needed: &'static str,
    },
    #[error("storage domain {sd} is the master of pool {pool}; move the master role first")]
    IsMaster { sd: SdUuid, pool: PoolUuid },
    #[error("master version mismatch for pool {pool}: storage has {found}, the caller expected {expected}")]
    MasterVersion {
        pool: PoolUuid,
        expected: u64,
        found: u64,
    },
    #[error("pool {pool}: this host is not the SPM ({reason})")]
    NotSpm { pool: PoolUuid, reason: String },
    #[error("pool {pool}: its metadata names SPM lver {stored}, ours is {ours}: another host became SPM")]
    StaleLver { pool: PoolUuid, stored: i64, ours: u64 },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("no master domain of pool {pool} among the given domains")]
    NoMaster { pool: PoolUuid },
}

fn io_err(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> PoolError {
    let path = path.into();
    move |source| PoolError::Io { action, path, source }
}

/// A domain's place in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum DomainStatus {
    /// Attached and in use: hosts hold their host id in its lockspace.
    Active,
    /// Attached but not in use.
    Attached,
}

impl DomainStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainStatus::Active => "Active",
            DomainStatus::Attached => "Attached",
        }
    }
}

/// The pool's keys on the master domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolMetadata {
    pub pool: PoolUuid,
    pub master: SdUuid,
    pub description: String,
    pub domains: BTreeMap<SdUuid, DomainStatus>,
    pub spm_id: i64,
    pub lver: i64,
    pub master_version: u64,
}

/// `sdUUID:Status,…` (VDSM's `_domainListEncoder`).
pub fn encode_domains(d: &BTreeMap<SdUuid, DomainStatus>) -> String {
    d.iter()
        .map(|(sd, st)| format!("{sd}:{}", st.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn decode_domains(s: &str) -> Result<BTreeMap<SdUuid, DomainStatus>, PoolError> {
    let bad = || PoolError::Key {
        key: PMDK_DOMAINS,
        value: s.to_string(),
    };
    let mut out = BTreeMap::new();
    for decl in s.split(',').filter(|d| !d.trim().is_empty()) {
        let (k, v) = decl.split_once(':').ok_or_else(bad)?;
        let sd: SdUuid = k.trim().trim_matches('\'').parse().map_err(|_| bad())?;
        let st = match v.trim().trim_matches('\'').to_ascii_lowercase().as_str() {
            "active" => DomainStatus::Active,
            "attached" => DomainStatus::Attached,
            _ => return Err(bad()),
        };
        out.insert(sd, st);
    }
    Ok(out)
}

pub fn validate_description(d: &str) -> Result<(), PoolError> {
    if d.chars().count() > MAX_POOL_DESCRIPTION || d.contains(['\n', '\r', '\0', '=']) {
        return Err(PoolError::Invalid {
            what: "pool description",
            reason: format!(
                "{d:?} must be at most {MAX_POOL_DESCRIPTION} characters without newlines or '='"
            ),
        });
    }
    Ok(())
}

impl PoolMetadata {
    /// Reads the pool keys of a master domain's metadata.
    pub fn from_domain(md: &DomainMetadata) -> Result<PoolMetadata, PoolError> {
        if md.role != DomainRole::Master {
            return Err(PoolError::NotMaster { sd: md.sd });
        }
        let pool = *md.pools.first().ok_or(PoolError::NotMaster { sd: md.sd })?;
        let get = |k: &'static str| md.extra.get(k).cloned().unwrap_or_default();
        let int = |k: &'static str, default: i64| -> Result<i64, PoolError> {
            let v = get(k);
            if v.trim().is_empty() {
                return Ok(default);
            }
            v.trim().parse().map_err(|_| PoolError::Key { key: k, value: v })
        };
        Ok(PoolMetadata {
            pool,
            master: md.sd,
            description: get(PMDK_POOL_DESCRIPTION),
            domains: decode_domains(&get(PMDK_DOMAINS))?,
            spm_id: int(PMDK_SPM_ID, SPM_ID_FREE)?,
            lver: int(PMDK_LVER, LVER_INVALID)?,
            master_version: int(PMDK_MASTER_VER, 0)?.max(0) as u64,
        })
    }

    /// Writes the pool keys into the master domain's metadata (and makes it the master).
    pub fn apply(&self, md: &mut DomainMetadata) {
        md.role = DomainRole::Master;
        md.pools = vec![self.pool];
        let e = &mut md.extra;
        e.insert(PMDK_DOMAINS.into(), encode_domains(&self.domains));
        e.insert(PMDK_POOL_DESCRIPTION.into(), self.description.clone());
        e.insert(PMDK_SPM_ID.into(), self.spm_id.to_string());
        e.insert(PMDK_LVER.into(), self.lver.to_string());
        e.insert(PMDK_MASTER_VER.into(), self.master_version.to_string());
    }

    pub fn status(&self, sd: SdUuid) -> Option<DomainStatus> {
        self.domains.get(&sd).copied()
    }

    /// Domains in use (the master first).
    pub fn active_domains(&self) -> Vec<SdUuid> {
        let mut v = vec![self.master];
        v.extend(
            self.domains
                .iter()
                .filter(|(sd, st)| **st == DomainStatus::Active && **sd != self.master)
                .map(|(sd, _)| *sd),
        );
        v
    }
}

/// Removes the pool keys and the master role (the domain stays in the pool).
pub fn demote(md: &mut DomainMetadata) {
    md.role = DomainRole::Regular;
    for k in POOL_KEYS {
        md.extra.remove(k);
    }
}

/// Takes the domain at `root` out of every pool its metadata names, whatever its state there
/// (VDSM's forced detach, the first step of a disaster recovery): `POOL_UUID` emptied, the
/// master role and the pool keys dropped. Answers the pools it was in. The caller holds the
/// domain's SDM lease, so that no SPM of those pools writes the domain meanwhile.
pub fn force_detach(root: &Path) -> Result<Vec<PoolUuid>, PoolError> {
    let mut md = read_domain_metadata(root)?;
    let old = std::mem::take(&mut md.pools);
    if old.is_empty() && md.role == DomainRole::Regular {
        return Ok(old);
    }
    demote(&mut md);
    write_domain_metadata(root, &md)?;
    Ok(old)
}

fn metadata_path(root: &Path) -> PathBuf {
    root.join(DOMAIN_MD_DIR).join("metadata")
}

/// Reads a domain's metadata from storage (never cached: another host may have changed it).
pub fn read_domain_metadata(root: &Path) -> Result<DomainMetadata, PoolError> {
    let path = metadata_path(root);
    let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
    DomainMetadata::decode(&bytes).map_err(|source| PoolError::Metadata { path, source })
}

/// Replaces a domain's metadata atomically.
pub fn write_domain_metadata(root: &Path, md: &DomainMetadata) -> Result<(), PoolError> {
    let path = metadata_path(root);
    let text = md.encode().map_err(|source| PoolError::Metadata {
        path: path.clone(),
        source,
    })?;
    fsio::atomic_write(&path, text.as_bytes(), 0o660).map_err(io_err("write", path))
}

pub fn master_dir(root: &Path) -> PathBuf {
    root.join(MASTER_DIR)
}

pub fn tasks_dir(root: &Path) -> PathBuf {
    master_dir(root).join(TASKS_DIR)
}

fn make_dir(p: &Path) -> Result<(), PoolError> {
    match std::fs::create_dir(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("create", p)(e)),
    }
    fsio::fsync_dir(p.parent().unwrap_or(Path::new("."))).map_err(io_err("sync", p))
}

/// Makes domain `master_root` the master of new pool `pool` (VDSM's `createStoragePool`): the
/// domain must belong to no pool. Creates `master/tasks` and `master/vms`.
pub fn create_pool(
    master_root: &Path,
    pool: PoolUuid,
    description: &str,
    master_version: u64,
) -> Result<PoolMetadata, PoolError> {
    validate_description(description)?;
    let mut md = read_domain_metadata(master_root)?;
    if let Some(p) = md.pools.first() {
        if *p != pool || md.role == DomainRole::Master {
            return Err(PoolError::AlreadyInPool { sd: md.sd, pool: *p });
        }
    }
    let pm = PoolMetadata {
        pool,
        master: md.sd,
        description: description.to_string(),
        domains: BTreeMap::from([(md.sd, DomainStatus::Active)]),
        spm_id: SPM_ID_FREE,
        lver: LVER_INVALID,
        master_version,
    };
    make_dir(&master_dir(master_root))?;
    make_dir(&tasks_dir(master_root))?;
    make_dir(&master_dir(master_root).join(VMS_DIR))?;
    pm.apply(&mut md);
    write_domain_metadata(master_root, &md)?;
    tracing::info!(pool = %pool, master = %md.sd, "storage pool created");
    Ok(pm)
}

/// Reads the pool metadata of master domain `master_root`, checking it is pool `pool`'s.
pub fn read_pool(master_root: &Path, pool: PoolUuid) -> Result<PoolMetadata, PoolError> {
    let md = read_domain_metadata(master_root)?;
    let pm = PoolMetadata::from_domain(&md)?;
    if pm.pool != pool {
        return Err(PoolError::WrongPool {
            sd: md.sd,
            expected: pool,
            found: pm.pool,
        });
    }
    Ok(pm)
}

/// Among domain roots, the master of `pool` with the largest `MASTER_VERSION`.
pub fn find_master(roots: &[PathBuf], pool: PoolUuid) -> Result<(PathBuf, PoolMetadata), PoolError> {
    roots
        .iter()
        .filter_map(|r| read_pool(r, pool).ok().map(|pm| (r.clone(), pm)))
        .max_by_key(|(_, pm)| pm.master_version)
        .ok_or(PoolError::NoMaster { pool })
}

/// Proof that we are the SPM, asked right before every write of pool metadata.
pub trait SpmFence: Send + Sync {
    /// Our host id and lver while our SDM lease is valid; why not otherwise.
    fn check(&self) -> Result<(u64, u64), String>;
}

/// Writes pool metadata as the SPM (see the module's invariant).
pub struct PoolWriter<'a> {
    pub master_root: &'a Path,
    pub pool: PoolUuid,
    pub fence: &'a dyn SpmFence,
}

impl PoolWriter<'_> {
    fn ours(&self) -> Result<(u64, u64), PoolError> {
        self.fence.check().map_err(|reason| PoolError::NotSpm {
            pool: self.pool,
            reason,
        })
    }

    /// Re-reads the pool metadata, lets `f` change it and writes it back with our SPM id and
    /// lver. `f` returning an error changes nothing.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut PoolMetadata) -> Result<T, PoolError>,
    ) -> Result<T, PoolError> {
        let (_, lver) = self.ours()?;
        let mut md = read_domain_metadata(self.master_root)?;
        let mut pm = PoolMetadata::from_domain(&md)?;
        if pm.pool != self.pool {
            return Err(PoolError::WrongPool {
                sd: md.sd,
                expected: self.pool,
                found: pm.pool,
            });
        }
        if pm.lver > lver as i64 {
            return Err(PoolError::StaleLver {
                pool: self.pool,
                stored: pm.lver,
                ours: lver,
            });
        }
        let out = f(&mut pm)?;
        // Last look before the write: the lease may have been lost while we read.
        let (host, lver) = self.ours()?;
        pm.spm_id = host as i64;
        pm.lver = lver as i64;
        pm.apply(&mut md);
        write_domain_metadata(self.master_root, &md)?;
        Ok(out)
    }

    /// Records that the SPM is gone (`spmStop`): POOL_SPM_ID = -1, the lver stays.
    pub fn clear_spm(&self) -> Result<(), PoolError> {
        let (_, lver) = self.ours()?;
        let mut md = read_domain_metadata(self.master_root)?;
        let mut pm = PoolMetadata::from_domain(&md)?;
        if pm.lver > lver as i64 {
            return Err(PoolError::StaleLver {
                pool: self.pool,
                stored: pm.lver,
                ours: lver,
            });
        }
        pm.spm_id = SPM_ID_FREE;
        pm.apply(&mut md);
        write_domain_metadata(self.master_root, &md)
    }

    /// Attaches domain `root` to the pool (status Attached). Idempotent.
    pub fn attach(&self, root: &Path) -> Result<(), PoolError> {
        let mut md = read_domain_metadata(root)?;
        let sd = md.sd;
        if let Some(p) = md.pools.first() {
            if *p != self.pool {
                return Err(PoolError::AlreadyInPool { sd, pool: *p });
            }
        }
        self.ours()?;
        if md.pools.is_empty() {
            md.pools = vec![self.pool];
            write_domain_metadata(root, &md)?;
        }
        self.update(|pm| {
            pm.domains.entry(sd).or_insert(DomainStatus::Attached);
            Ok(())
        })
    }

    /// Activates or deactivates an attached domain.
    pub fn set_status(&self, sd: SdUuid, status: DomainStatus) -> Result<(), PoolError> {
        self.update(|pm| {
            let cur = pm
                .status(sd)
                .ok_or(PoolError::NotAttached { sd, pool: pm.pool })?;
            if sd == pm.master && status != DomainStatus::Active {
                return Err(PoolError::IsMaster { sd, pool: pm.pool });
            }
            if cur != status {
                pm.domains.insert(sd, status);
            }
            Ok(())
        })
    }

    /// Detaches an attached (inactive) domain and clears its `POOL_UUID`.
    pub fn detach(&self, root: &Path) -> Result<(), PoolError> {
        let mut md = read_domain_metadata(root)?;
        let sd = md.sd;
        self.update(|pm| {
            if sd == pm.master {
                return Err(PoolError::IsMaster { sd, pool: pm.pool });
            }
            match pm.status(sd) {
                None => {}
                Some(DomainStatus::Attached) => {
                    pm.domains.remove(&sd);
                }
                Some(status) => {
                    return Err(PoolError::DomainState {
                        sd,
                        pool: pm.pool,
                        status,
                        verb: "detach",
                        needed: "Attached (deactivate it first)",
                    })
                }
            }
            Ok(())
        })?;
        if md.pools.contains(&self.pool) {
            md.pools.retain(|p| *p != self.pool);
            self.ours()?;
            write_domain_metadata(root, &md)?;
        }
        Ok(())
    }
}

/// Copies `src` into `dst` recursively (files rewritten atomically; existing files replaced).
fn copy_tree(src: &Path, dst: &Path) -> Result<(), PoolError> {
    make_dir(dst)?;
    let entries = match std::fs::read_dir(src) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("list", src)(e)),
    };
    for e in entries {
        let e = e.map_err(io_err("list", src))?;
        let (s, d) = (e.path(), dst.join(e.file_name()));
        if e.file_type().map_err(io_err("stat", &s))?.is_dir() {
            copy_tree(&s, &d)?;
        } else {
            let data = std::fs::read(&s).map_err(io_err("read", &s))?;
            fsio::atomic_write(&d, &data, 0o660).map_err(io_err("write", &d))?;
        }
    }
    Ok(())
}

/// Moves the master role of `pool` from `old_root` to `new_root` (an Active domain of the
/// pool), bumping `MASTER_VERSION` to `new_version`. `fence` must prove the SPM role on the
/// new master (its SDM lease), since that is where the pool metadata goes.
pub fn switch_master(
    old_root: &Path,
    new_root: &Path,
    pool: PoolUuid,
    new_version: u64,
    fence: &dyn SpmFence,
) -> Result<PoolMetadata, PoolError> {
    let old_md = read_domain_metadata(old_root)?;
    let mut pm = PoolMetadata::from_domain(&old_md)?;
    if pm.pool != pool {
        return Err(PoolError::WrongPool {
            sd: old_md.sd,
            expected: pool,
            found: pm.pool,
        });
    }
    let mut new_md = read_domain_metadata(new_root)?;
    let new_sd = new_md.sd;
    if new_sd == pm.master {
        return Ok(pm);
    }
    match pm.status(new_sd) {
        Some(DomainStatus::Active) => {}
        Some(status) => {
            return Err(PoolError::DomainState {
                sd: new_sd,
                pool,
                status,
                verb: "switch master",
                needed: "Active",
            })
        }
        None => return Err(PoolError::NotAttached { sd: new_sd, pool }),
    }
    if new_version <= pm.master_version {
        return Err(PoolError::Invalid {
            what: "master version",
            reason: format!(
                "{new_version} must be larger than the current {}",
                pm.master_version
            ),
        });
    }
    copy_tree(&master_dir(old_root), &master_dir(new_root))?;
    make_dir(&tasks_dir(new_root))?;
    let (host, lver) = fence
        .check()
        .map_err(|reason| PoolError::NotSpm { pool, reason })?;
    pm.master = new_sd;
    pm.master_version = new_version;
    pm.spm_id = host as i64;
    pm.lver = lver as i64;
    pm.apply(&mut new_md);
    write_domain_metadata(new_root, &new_md)?;
    let mut old = read_domain_metadata(old_root)?;
    demote(&mut old);
    write_domain_metadata(old_root, &old)?;
    tracing::info!(pool = %pool, from = %old.sd, to = %new_sd, version = new_version, "master role moved");
    Ok(pm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdmeta::DomainType;

    struct Token(u64, u64);
    impl SpmFence for Token {
        fn check(&self) -> Result<(u64, u64), String> {
            if self.1 == 0 {
                Err("lease lost".into())
            } else {
                Ok((self.0, self.1))
            }
        }
    }

    fn domain(dir: &Path) -> (SdUuid, PathBuf) {
        let sd = SdUuid::new_random();
        let md = DomainMetadata::new_v5(sd, DomainType::LocalFs, "d", "/x").unwrap();
        let root = dir.join(sd.to_string());
        std::fs::create_dir_all(root.join(DOMAIN_MD_DIR)).unwrap();
        write_domain_metadata(&root, &md).unwrap();
        (sd, root)
    }

    #[test]
    fn domain_list_codec_matches_vdsm() {
        let a: SdUuid = "11111111-1111-4111-8111-111111111111".parse().unwrap();
        let b: SdUuid = "22222222-2222-4222-8222-222222222222".parse().unwrap();
        let m = BTreeMap::from([(a, DomainStatus::Active), (b, DomainStatus::Attached)]);
        let s = encode_domains(&m);
        assert_eq!(s, format!("{a}:Active,{b}:Attached"));
        assert_eq!(decode_domains(&s).unwrap(), m);
        // VDSM's decoder strips quotes and capitalizes.
        assert_eq!(
            decode_domains(&format!("'{a}':'active'")).unwrap()[&a],
            DomainStatus::Active
        );
        assert!(decode_domains("x:Active").is_err());
        assert!(decode_domains(&format!("{a}:Bogus")).is_err());
        assert!(decode_domains("").unwrap().is_empty());
    }

    #[test]
    fn pool_metadata_round_trips_through_the_master_domain_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let (sd, root) = domain(dir.path());
        let pool = PoolUuid::new_random();
        let pm = create_pool(&root, pool, "dc1", 1).unwrap();
        let text = std::fs::read_to_string(root.join("dom_md/metadata")).unwrap();
        for line in [
            "ROLE=Master".to_string(),
            format!("POOL_UUID={pool}"),
            format!("POOL_DOMAINS={sd}:Active"),
            "POOL_SPM_ID=-1".into(),
            "POOL_SPM_LVER=-1".into(),
            "MASTER_VERSION=1".into(),
            "POOL_DESCRIPTION=dc1".into(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(text.lines().last().unwrap().starts_with("_SHA_CKSUM="));
        assert_eq!(read_pool(&root, pool).unwrap(), pm);
        assert!(root.join("master/tasks").is_dir() && root.join("master/vms").is_dir());
        // A domain already in a pool cannot start another.
        assert!(matches!(
            create_pool(&root, PoolUuid::new_random(), "x", 1),
            Err(PoolError::AlreadyInPool { .. })
        ));
        assert!(matches!(
            read_pool(&root, PoolUuid::new_random()),
            Err(PoolError::WrongPool { .. })
        ));
        assert!(create_pool(&domain(dir.path()).1, pool, &"x".repeat(51), 1).is_err());
    }

    #[test]
    fn writes_need_a_valid_lease_and_the_current_lver() {
        let dir = tempfile::tempdir().unwrap();
        let (_, root) = domain(dir.path());
        let (sd2, root2) = domain(dir.path());
        let pool = PoolUuid::new_random();
        create_pool(&root, pool, "dc", 1).unwrap();
        let w = PoolWriter {
            master_root: &root,
            pool,
            fence: &Token(2, 5),
        };
        w.attach(&root2).unwrap();
        assert_eq!(read_domain_metadata(&root2).unwrap().pools, vec![pool]);
        let pm = read_pool(&root, pool).unwrap();
        assert_eq!((pm.spm_id, pm.lver), (2, 5));
        assert_eq!(pm.status(sd2), Some(DomainStatus::Attached));
        w.set_status(sd2, DomainStatus::Active).unwrap();
        assert!(matches!(w.detach(&root2), Err(PoolError::DomainState { .. })));
        // An older SPM (lver 4) is refused and changes nothing.
        let before = std::fs::read(root.join("dom_md/metadata")).unwrap();
        let stale = PoolWriter {
            master_root: &root,
            pool,
            fence: &Token(1, 4),
        };
        assert!(matches!(
            stale.set_status(sd2, DomainStatus::Attached),
            Err(PoolError::StaleLver {
                stored: 5,
                ours: 4,
                ..
            })
        ));
        let lost = PoolWriter {
            master_root: &root,
            pool,
            fence: &Token(2, 0),
        };
        assert!(matches!(
            lost.set_status(sd2, DomainStatus::Attached),
            Err(PoolError::NotSpm { .. })
        ));
        assert_eq!(std::fs::read(root.join("dom_md/metadata")).unwrap(), before);
        // The master cannot be deactivated or detached.
        let master = read_pool(&root, pool).unwrap().master;
        assert!(matches!(
            w.set_status(master, DomainStatus::Attached),
            Err(PoolError::IsMaster { .. })
        ));
        w.set_status(sd2, DomainStatus::Attached).unwrap();
        w.detach(&root2).unwrap();
        assert!(read_domain_metadata(&root2).unwrap().pools.is_empty());
        assert_eq!(read_pool(&root, pool).unwrap().status(sd2), None);
        w.clear_spm().unwrap();
        assert_eq!(read_pool(&root, pool).unwrap().spm_id, SPM_ID_FREE);
    }

    #[test]
    fn switching_the_master_moves_keys_and_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let (sd1, root1) = domain(dir.path());
        let (sd2, root2) = domain(dir.path());
        let pool = PoolUuid::new_random();
        create_pool(&root1, pool, "dc", 3).unwrap();
        let w = PoolWriter {
            master_root: &root1,
            pool,
            fence: &Token(1, 2),
        };
        w.attach(&root2).unwrap();
        assert!(matches!(
            switch_master(&root1, &root2, pool, 4, &Token(1, 2)),
            Err(PoolError::DomainState { .. })
        ));
        w.set_status(sd2, DomainStatus::Active).unwrap();
        std::fs::create_dir_all(tasks_dir(&root1).join("t1")).unwrap();
        std::fs::write(tasks_dir(&root1).join("t1/t1.task"), b"{}").unwrap();
        assert!(
            switch_master(&root1, &root2, pool, 3, &Token(1, 1)).is_err(),
            "version must grow"
        );
        let pm = switch_master(&root1, &root2, pool, 4, &Token(1, 1)).unwrap();
        assert_eq!((pm.master, pm.master_version, pm.lver), (sd2, 4, 1));
        assert!(tasks_dir(&root2).join("t1/t1.task").is_file());
        assert!(matches!(
            read_pool(&root1, pool),
            Err(PoolError::NotMaster { .. })
        ));
        assert_eq!(read_domain_metadata(&root1).unwrap().pools, vec![pool]);
        let (found, pm2) = find_master(&[root1.clone(), root2.clone()], pool).unwrap();
        assert_eq!((found, pm2.master), (root2, sd2));
        assert_eq!(pm2.status(sd1), Some(DomainStatus::Active));
    }
}
