//! The SPM role (Storage Pool Manager) and volume leases.
//!
//! Exclusivity comes from the Disk Paxos resource "SDM" in the master domain's `dom_md/leases`
//! (at `SDM_LEASE_SLOT * alignment`, 1 MiB), held through our host id in the master domain's
//! lockspace. Its lease version (`lver`) grows at every acquisition and is the fencing token:
//! it is written to the pool metadata (`POOL_SPM_LVER`) at `spmStart` and every later write of
//! pool metadata checks it (see [`crate::pool`]).
//!
//! The role's state machine ([`SpmRole`]), transitions documented once:
//!
//! ```text
//!            spmStart                  SDM acquired
//!   Free ─────────────► Contending ─────────────────► Spm{lver}
//!    ▲  ▲                   │ acquire failed              │  │ spmStop (no task running)
//!    │  └───────────────────┘                             │  ▼
//!    │                                                     │ Stopping ── lease released ──► Free
//!    │                host id lost or renewal failing (8N) │
//!    └──── spmStart again ──── Fenced ◄────────────────────┘  (also from Contending)
//! ```
//!
//! Self-fencing: the lockspace fires its fence at 8N after the last successful renewal, and
//! other hosts may take the SDM lease only at 8N + M on their clocks. On the fence the role
//! turns Fenced at once: [`SpmRole::check`] fails, so no task starts a job and no pool
//! metadata is written. A job already running cannot be interrupted safely from inside, so the
//! node (which owns the process) aborts itself if jobs are running when the fence fires — as
//! VDSM's SPM watchdog panics the daemon.
//!
//! Volume leases: a host that changes a volume outside the SPM (copy, merge, a running VM's
//! disk) holds the volume's lease, the resource named by the volUUID at offset 0 of
//! `<vol>.lease`, through its host id in the domain's lockspace. A second host gets
//! [`VolumeLeaseError::Locked`]: "volume … is locked by host N".

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use oxvirt_lease::io::SectorIo;
use oxvirt_lease::lockspace::AcquireOptions;
use oxvirt_lease::{LeaseError, LeaseMode, Lockspace, OwnerWait, ResourceLease};
use oxvirt_types::{ImgUuid, SdUuid, VolUuid};
use serde::Serialize;

use crate::domain::{FileStorageDomain, DOMAIN_MD_DIR};
use crate::leases::{SDM_LEASE_NAME, SDM_LEASE_SLOT, VOLUME_LEASE_OFFSET};
use crate::pool::SpmFence;

#[derive(Debug, thiserror::Error)]
pub enum SpmError {
    #[error("host {host_id} is already the SPM (lver {lver})")]
    AlreadySpm { host_id: u64, lver: u64 },
    #[error("host {host_id} is already contending for the SPM role")]
    Contending { host_id: u64 },
    #[error("host {host_id} is not the SPM")]
    NotSpm { host_id: u64 },
    #[error("the SPM on host {host_id} has {running} task job(s) running; stop or wait for them")]
    Busy { host_id: u64, running: usize },
    #[error("SDM lease of storage domain {sd}")]
    Lease {
        sd: SdUuid,
        #[source]
        source: LeaseError,
    },
}

/// The role's state (see the module diagram).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SpmState {
    Free,
    Contending,
    Spm { lver: u64 },
    Stopping,
    Fenced { reason: String },
}

impl SpmState {
    /// VDSM's `spmStatus` string.
    pub fn vdsm(&self) -> &'static str {
        match self {
            SpmState::Spm { .. } | SpmState::Stopping => "SPM",
            SpmState::Contending => "Contend",
            SpmState::Free | SpmState::Fenced { .. } => "Free",
        }
    }
}

/// Told every state the role enters (called after the change, outside the role's locks).
pub type SpmObserver = Arc<dyn Fn(&SpmState) + Send + Sync>;

/// This host's SPM role in one pool.
pub struct SpmRole {
    host_id: u64,
    state: Mutex<SpmState>,
    lease: Mutex<Option<ResourceLease>>,
    running_jobs: AtomicUsize,
    observer: Mutex<Option<SpmObserver>>,
}

impl std::fmt::Debug for SpmRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpmRole")
            .field("host_id", &self.host_id)
            .field("state", &self.state())
            .finish()
    }
}

/// Counts a running task job; dropping it ends the count.
pub struct JobGuard<'a>(&'a SpmRole);

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        self.0.running_jobs.fetch_sub(1, Ordering::SeqCst);
    }
}

impl SpmRole {
    pub fn new(host_id: u64) -> SpmRole {
        SpmRole {
            host_id,
            state: Mutex::new(SpmState::Free),
            lease: Mutex::new(None),
            running_jobs: AtomicUsize::new(0),
            observer: Mutex::new(None),
        }
    }

    /// Sets who hears of each state change (the node publishes them as events).
    pub fn set_observer(&self, observer: SpmObserver) {
        *self.observer.lock().expect("spm observer") = Some(observer);
    }

    fn notify(&self) {
        let observer = self.observer.lock().expect("spm observer").clone();
        if let Some(o) = observer {
            o(&self.state());
        }
    }

    pub fn host_id(&self) -> u64 {
        self.host_id
    }

    pub fn state(&self) -> SpmState {
        self.state.lock().expect("spm state").clone()
    }

    pub fn running_jobs(&self) -> usize {
        self.running_jobs.load(Ordering::SeqCst)
    }

    /// Free or Fenced → Contending.
    pub fn begin_contend(&self) -> Result<(), SpmError> {
        let mut st = self.state.lock().expect("spm state");
        match &*st {
            SpmState::Free | SpmState::Fenced { .. } => {
                *st = SpmState::Contending;
                drop(st);
                self.notify();
                Ok(())
            }
            SpmState::Contending => Err(SpmError::Contending {
                host_id: self.host_id,
            }),
            SpmState::Spm { lver } => Err(SpmError::AlreadySpm {
                host_id: self.host_id,
                lver: *lver,
            }),
            SpmState::Stopping => Err(SpmError::Contending {
                host_id: self.host_id,
            }),
        }
    }

    /// Contending → Spm with the lease; if we were fenced meanwhile the lease is dropped and
    /// the role stays Fenced.
    pub fn acquired(&self, lease: ResourceLease) -> Result<u64, SpmError> {
        let lver = lease.lver();
        let mut st = self.state.lock().expect("spm state");
        if *st != SpmState::Contending || !lease.is_valid() {
            drop(lease);
            return Err(SpmError::NotSpm {
                host_id: self.host_id,
            });
        }
        *self.lease.lock().expect("spm lease") = Some(lease);
        *st = SpmState::Spm { lver };
        drop(st);
        tracing::info!(host_id = self.host_id, lver, "this host is the SPM");
        self.notify();
        Ok(lver)
    }

    /// Contending → Free (or stays Fenced).
    pub fn contend_failed(&self) {
        let mut st = self.state.lock().expect("spm state");
        if *st == SpmState::Contending {
            *st = SpmState::Free;
            drop(st);
            self.notify();
        }
    }

    /// Any state → Fenced: the SPM must stop acting at once. Returns how many jobs are still
    /// running (the caller must make sure they die before our lease can be taken).
    pub fn fence(&self, reason: &str) -> usize {
        let mut st = self.state.lock().expect("spm state");
        let changed = matches!(
            *st,
            SpmState::Spm { .. } | SpmState::Contending | SpmState::Stopping
        );
        if changed {
            tracing::error!(
                host_id = self.host_id,
                reason,
                "SPM role fenced: no more pool metadata writes"
            );
            *st = SpmState::Fenced {
                reason: reason.to_string(),
            };
        }
        drop(st);
        // The lease is useless now; its release fails without writing (our host id is no
        // longer valid) but frees the handle.
        drop(self.lease.lock().expect("spm lease").take());
        if changed {
            self.notify();
        }
        self.running_jobs()
    }

    /// Spm → Stopping; returns the lease to release. Refused while jobs run.
    pub fn begin_stop(&self) -> Result<Option<ResourceLease>, SpmError> {
        let mut st = self.state.lock().expect("spm state");
        match &*st {
            SpmState::Spm { .. } => {
                let running = self.running_jobs();
                if running > 0 {
                    return Err(SpmError::Busy {
                        host_id: self.host_id,
                        running,
                    });
                }
                *st = SpmState::Stopping;
                let lease = self.lease.lock().expect("spm lease").take();
                drop(st);
                self.notify();
                Ok(lease)
            }
            _ => Err(SpmError::NotSpm {
                host_id: self.host_id,
            }),
        }
    }

    /// Spm → Spm with another SDM lease (the master moved); returns the old lease to release.
    pub fn replace_lease(&self, lease: ResourceLease) -> Option<ResourceLease> {
        let mut st = self.state.lock().expect("spm state");
        if !matches!(*st, SpmState::Spm { .. }) {
            return Some(lease);
        }
        *st = SpmState::Spm { lver: lease.lver() };
        let old = self.lease.lock().expect("spm lease").replace(lease);
        drop(st);
        self.notify();
        old
    }

    /// Stopping → Free.
    pub fn stopped(&self) {
        let mut st = self.state.lock().expect("spm state");
        if *st == SpmState::Stopping {
            *st = SpmState::Free;
            drop(st);
            self.notify();
        }
    }

    /// Starts counting a task job; fails unless we are the SPM with a valid lease.
    pub fn job(&self) -> Result<JobGuard<'_>, SpmError> {
        self.running_jobs.fetch_add(1, Ordering::SeqCst);
        let guard = JobGuard(self);
        self.check().map_err(|_| SpmError::NotSpm {
            host_id: self.host_id,
        })?;
        Ok(guard)
    }

    pub fn lver(&self) -> Option<u64> {
        match self.state() {
            SpmState::Spm { lver } => Some(lver),
            _ => None,
        }
    }
}

impl SpmFence for SpmRole {
    fn check(&self) -> Result<(u64, u64), String> {
        let st = self.state.lock().expect("spm state");
        let SpmState::Spm { lver } = &*st else {
            return Err(format!("SPM role is {}", st.vdsm()));
        };
        match &*self.lease.lock().expect("spm lease") {
            Some(l) if l.is_valid() => Ok((self.host_id, *lver)),
            _ => Err("the SDM lease is no longer valid".into()),
        }
    }
}

/// The SDM lease file of a domain.
pub fn leases_path(root: &Path) -> PathBuf {
    root.join(DOMAIN_MD_DIR).join("leases")
}

/// Offset of the SDM resource for a domain with `alignment`.
pub fn sdm_offset(alignment: u64) -> u64 {
    SDM_LEASE_SLOT * alignment
}

fn sdm_options(wait: bool, expect_lver: Option<u64>) -> AcquireOptions {
    AcquireOptions {
        mode: LeaseMode::Exclusive,
        wait: if wait {
            OwnerWait::UntilDead
        } else {
            OwnerWait::NoWait
        },
        acquire_lver: expect_lver,
    }
}

/// Acquires the SDM lease of master domain `master`. With `wait`, a dead owner's lease is
/// taken once its host id has been dead for 8N + M; a live owner fails at once. With
/// `expect_lver`, only if the lease's current lver is that one (the engine's `prevLVER`).
pub fn acquire_sdm(
    ls: &Lockspace,
    master: &FileStorageDomain,
    wait: bool,
    expect_lver: Option<u64>,
) -> Result<ResourceLease, SpmError> {
    ls.acquire_resource(
        &leases_path(master.root()),
        sdm_offset(master.metadata().alignment),
        SDM_LEASE_NAME,
        sdm_options(wait, expect_lver),
    )
    .map_err(|source| SpmError::Lease {
        sd: master.sd(),
        source,
    })
}

/// As [`acquire_sdm`] on any sector store holding the resource at offset 0 (tests).
pub fn acquire_sdm_with_io(
    ls: &Lockspace,
    sd: SdUuid,
    io: Arc<dyn SectorIo>,
    wait: bool,
) -> Result<ResourceLease, SpmError> {
    ls.acquire_resource_with_io(io, SDM_LEASE_NAME, sdm_options(wait, None))
        .map_err(|source| SpmError::Lease { sd, source })
}

/// Who holds the SDM lease, as storage says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SpmStatus {
    /// The holder's host id, `None` when free.
    pub owner: Option<u64>,
    pub lver: u64,
}

/// Reads the SDM leader of the domain at `root`.
pub fn read_spm_status(root: &Path, sd: SdUuid, alignment: u64) -> Result<SpmStatus, SpmError> {
    let leader = oxvirt_lease::direct::read_paxos_leader(
        &leases_path(root),
        sdm_offset(alignment),
        &sd.to_string(),
        SDM_LEASE_NAME,
    )
    .map_err(|source| SpmError::Lease { sd, source })?;
    Ok(SpmStatus {
        owner: (leader.timestamp != 0 && leader.owner_id != 0).then_some(leader.owner_id),
        lver: leader.lver,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeLeaseError {
    #[error("volume {vol} is locked by host {host}")]
    Locked { vol: VolUuid, host: u64 },
    #[error("lease of volume {vol} in image {img}")]
    Lease {
        img: ImgUuid,
        vol: VolUuid,
        #[source]
        source: LeaseError,
    },
    #[error("volume {vol} does not exist in image {img}")]
    NoVolume { img: ImgUuid, vol: VolUuid },
    /// Held by this very host, for another purpose.
    #[error("volume {vol} is locked by host {host} ({holder})")]
    LockedHere { vol: VolUuid, host: u64, holder: String },
    #[error("the lease of volume {vol} cannot be taken here: {reason}")]
    Unavailable { vol: VolUuid, reason: String },
}

/// Takes the exclusive lease of a volume through our host id in its domain's lockspace.
pub fn acquire_volume_lease(
    ls: &Lockspace,
    dom: &FileStorageDomain,
    img: ImgUuid,
    vol: VolUuid,
) -> Result<ResourceLease, VolumeLeaseError> {
    let path = dom.lease_path(img, vol);
    if !path.exists() {
        return Err(VolumeLeaseError::NoVolume { img, vol });
    }
    ls.acquire_resource(
        &path,
        VOLUME_LEASE_OFFSET,
        &vol.to_string(),
        AcquireOptions {
            mode: LeaseMode::Exclusive,
            wait: OwnerWait::NoWait,
            acquire_lver: None,
        },
    )
    .map_err(|source| match source {
        LeaseError::OwnedByOther { host_id, .. } => VolumeLeaseError::Locked { vol, host: host_id },
        source => VolumeLeaseError::Lease { img, vol, source },
    })
}

/// Who holds a volume's lease, as storage says (`None`: free).
pub fn volume_lease_owner(
    dom: &FileStorageDomain,
    img: ImgUuid,
    vol: VolUuid,
) -> Result<Option<u64>, VolumeLeaseError> {
    Ok(volume_lease_holder(dom, img, vol)?.map(|(host, _)| host))
}

/// Who holds a volume's lease — host id and the generation of its host id then — as storage
/// says (`None`: free). A holder whose host id has a newer generation now restarted since:
/// the lease is stale.
pub fn volume_lease_holder(
    dom: &FileStorageDomain,
    img: ImgUuid,
    vol: VolUuid,
) -> Result<Option<(u64, u64)>, VolumeLeaseError> {
    let leader = oxvirt_lease::direct::read_paxos_leader(
        &dom.lease_path(img, vol),
        VOLUME_LEASE_OFFSET,
        &dom.sd().to_string(),
        &vol.to_string(),
    )
    .map_err(|source| VolumeLeaseError::Lease { img, vol, source })?;
    Ok((leader.timestamp != 0 && leader.owner_id != 0).then_some((leader.owner_id, leader.owner_generation)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_change_reaches_the_observer_once() {
        let role = SpmRole::new(3);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        role.set_observer(Arc::new(move |st: &SpmState| {
            log.lock().unwrap().push(st.clone())
        }));
        role.begin_contend().unwrap();
        // Refused transitions change nothing and say nothing.
        assert!(role.begin_contend().is_err());
        assert!(role.begin_stop().is_err());
        role.contend_failed();
        role.contend_failed();
        role.begin_contend().unwrap();
        assert_eq!(role.fence("renewal failed"), 0);
        role.fence("again");
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                SpmState::Contending,
                SpmState::Free,
                SpmState::Contending,
                SpmState::Fenced {
                    reason: "renewal failed".into()
                },
            ]
        );
    }
}
