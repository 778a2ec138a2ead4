//! The node's connection to its data center's storage pool: host ids in every active domain's
//! lockspace, the HSM mailbox, the SPM role with its SDM lease, the SPM's tasks and mailbox
//! server, volume leases (held for the API, for the VMs running here, which keep the leases
//! of the volumes they write, or for SPM tasks, which hold those they change — their guard),
//! and the mailbox-backed thin-disk extender.
//!
//! One pool per node (as VDSM). `connect` acquires our host id in each active domain's
//! lockspace (at least 2N each, in parallel) and starts the HSM mailbox on the master domain.
//! `spmStart` runs in the background as a (non-persistent) task: contend for the SDM lease,
//! write our id and lver into the pool metadata, serve the mailbox (extends only grow files,
//! so they need not wait), then recover the domains' operation journals and the dead SPM's
//! tasks. Every later SPM verb is a persistent task in `master/tasks` (see
//! `oxvirt_storage::tasks`).
//!
//! Self-fencing: the master lockspace's fence (renewal failing for 8N) turns the SPM role
//! Fenced at once (no task starts a job, no metadata is written, the mailbox server stops) and,
//! if task jobs are running — they cannot be interrupted safely — aborts the process, as
//! VDSM's SPM watchdog does; QEMU processes are not our children and keep running. Our leases
//! can be taken by another host only at 8N + M.
//!
//! Invariant: every write this module makes to pool metadata, the outbox or volumes as SPM is
//! preceded by [`SpmRole`]'s check of the SDM lease.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use oxvirt_lease::{Clock, Lockspace, LockspaceConfig, ResourceLease, SystemClock};
use oxvirt_storage::mailbox::{ExtendHandler, ExtendMessage, HsmMailbox, MailboxConfig, Request, SpmMailbox};
use oxvirt_storage::pool::{self, DomainStatus, PoolMetadata, PoolWriter, SpmFence};
use oxvirt_storage::spm::{self, SpmRole, SpmState};
use oxvirt_storage::tasks::{self, DomainSource, TaskContext, TaskPlan, TaskRecord, TaskState, TaskStore};
use oxvirt_storage::{FileStorageDomain, StorageError};
use oxvirt_types::{ImgUuid, PoolUuid, SdUuid, TaskId, VmId, VolUuid};

use super::StorageService;
use crate::vm::thin::{ExtendError, ExtendFuture, ExtendRequest, ExtendRequester, LocalSpmExtender};

/// Lease and mailbox timing of a pool connection.
#[derive(Debug, Clone, Copy)]
pub struct PoolTiming {
    pub io_timeout: Duration,
    pub fence_margin: Duration,
    pub mailbox: MailboxConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolServiceError {
    #[error("not connected to storage pool {0}")]
    NotConnected(PoolUuid),
    #[error("not connected to any storage pool")]
    NoPool,
    #[error("already connected to storage pool {0}")]
    OtherPool(PoolUuid),
    #[error("storage pool {pool}: this host (id {host_id}) is not the SPM")]
    NotSpm { pool: PoolUuid, host_id: u64 },
    #[error("VM lease {id}")]
    VmLease {
        id: String,
        #[source]
        source: oxvirt_lease::LeaseError,
    },
    #[error("storage domain {0} is not active in the pool on this host (no host id)")]
    NoHostId(SdUuid),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Pool(#[from] pool::PoolError),
    #[error(transparent)]
    Spm(#[from] spm::SpmError),
    #[error(transparent)]
    Task(#[from] tasks::TaskError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Lease(#[from] spm::VolumeLeaseError),
    #[error("host id {host_id} in lockspace {sd}")]
    HostId {
        sd: SdUuid,
        host_id: u64,
        #[source]
        source: oxvirt_lease::LeaseError,
    },
    #[error(transparent)]
    Mailbox(#[from] oxvirt_storage::mailbox::MailboxError),
    #[error(transparent)]
    Service(#[from] super::StorageServiceError),
    #[error(
        "volume {vol} is in use: its lease is held by host {host} ({status:?} here), so it is not {action}"
    )]
    VolumeInUse {
        vol: VolUuid,
        host: u64,
        status: oxvirt_lease::HostStatus,
        action: &'static str,
    },
    #[error(
        "storage domain {sd} is in use: host id(s) {hosts:?} renew their leases on it (a pool that \
         runs elsewhere), so it is not taken over"
    )]
    DomainInUse { sd: SdUuid, hosts: Vec<u64> },
}

type Result<T, E = PoolServiceError> = std::result::Result<T, E>;

impl PoolServiceError {
    /// The host holding a lease this host was refused.
    pub fn lease_owner(&self) -> Option<u64> {
        match self {
            PoolServiceError::Lease(
                spm::VolumeLeaseError::Locked { host, .. } | spm::VolumeLeaseError::LockedHere { host, .. },
            ) => Some(*host),
            PoolServiceError::VmLease {
                source: oxvirt_lease::LeaseError::OwnedByOther { host_id, .. },
                ..
            } => Some(*host_id),
            _ => None,
        }
    }
}

fn release_volume(vol: VolUuid, lease: ResourceLease) -> Result<()> {
    lease.release().map_err(|source| {
        PoolServiceError::Lease(spm::VolumeLeaseError::Lease {
            img: ImgUuid::nil(),
            vol,
            source,
        })
    })
}

/// A task this node runs or ran (persistent SPM tasks also live in `master/tasks`).
struct RunningTask {
    record: Mutex<TaskRecord>,
    stop: AtomicBool,
    persistent: bool,
}

/// Opened domains of the pool, shared so that operations on one domain serialize.
struct Domains {
    svc: Arc<StorageService>,
    open: Mutex<HashMap<SdUuid, Arc<FileStorageDomain>>>,
}

impl DomainSource for Domains {
    fn domain(&self, sd: SdUuid) -> Result<Arc<FileStorageDomain>, StorageError> {
        if let Some(d) = self.open.lock().expect("domains").get(&sd) {
            return Ok(d.clone());
        }
        let d = Arc::new(self.svc.domain(sd).map_err(|e| match e {
            super::StorageServiceError::Storage(s) => s,
            other => StorageError::InvalidArgument {
                what: "storage domain",
                reason: other.to_string(),
            },
        })?);
        Ok(self.open.lock().expect("domains").entry(sd).or_insert(d).clone())
    }
}

/// A volume lease this host holds, and for whom.
struct HeldVolumeLease {
    lease: ResourceLease,
    holder: LeaseHolder,
}

/// Who on this host a volume lease is held for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseHolder {
    /// Taken through `Volume.acquireLease`.
    Api,
    /// A VM running here writes the volume.
    Vm(VmId),
    /// An SPM task changes the volume (its guard).
    Task(TaskId),
}

impl std::fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseHolder::Api => f.write_str("taken through the API"),
            LeaseHolder::Vm(vm) => write!(f, "VM {vm} running there"),
            LeaseHolder::Task(t) => write!(f, "SPM task {t}"),
        }
    }
}

/// The volume leases this host holds, by domain and volume (a live storage migration has the
/// same volume on two domains, each with its own lease). Taking one happens under the map's
/// lock, so two takers on this host (whose host id storage cannot tell apart) never both
/// believe they hold it.
type VolumeLeaseMap = Arc<Mutex<HashMap<VolKey, HeldVolumeLease>>>;

/// A volume lease's key: the domain and the volume.
pub type VolKey = (SdUuid, VolUuid);

/// A task's guard: its volume leases, given back when it drops.
struct TaskGuard {
    map: VolumeLeaseMap,
    task: TaskId,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let mine: Vec<(VolKey, HeldVolumeLease)> = {
            let mut held = self.map.lock().expect("volume leases");
            let vols: Vec<VolKey> = held
                .iter()
                .filter(|(_, h)| h.holder == LeaseHolder::Task(self.task))
                .map(|(v, _)| *v)
                .collect();
            vols.into_iter()
                .map(|v| (v, held.remove(&v).expect("listed")))
                .collect()
        };
        for ((_, vol), h) in mine {
            if let Err(e) = release_volume(vol, h.lease) {
                tracing::warn!(task_id = %self.task, vol = %vol, error = %chain(&e), "releasing a task's volume lease failed");
            }
        }
    }
}

/// A connected pool.
pub struct ConnectedPool {
    pub pool: PoolUuid,
    pub host_id: u64,
    master: RwLock<(SdUuid, PathBuf)>,
    timing: PoolTiming,
    clock: Arc<dyn Clock>,
    host_name: String,
    domains: Arc<Domains>,
    lockspaces: Mutex<BTreeMap<SdUuid, Arc<Lockspace>>>,
    role: Arc<SpmRole>,
    hsm: Mutex<Option<Arc<HsmMailbox>>>,
    spm_mailbox: Mutex<Option<SpmMailbox>>,
    tasks: Mutex<HashMap<TaskId, Arc<RunningTask>>>,
    volume_leases: VolumeLeaseMap,
    /// VM leases (in a domain's xleases) this host holds, by lease id (the VM id).
    vm_leases: Mutex<HashMap<String, ResourceLease>>,
    /// Called when a domain's lockspace fences us: the node kills what holds leases there.
    fence_hook: Option<FenceHook>,
    holders: Option<HoldersProbe>,
    last_recovery: Mutex<Option<Value>>,
}

/// What the node runs when its host id on a domain can no longer be renewed.
pub type FenceHook = Arc<dyn Fn(SdUuid) + Send + Sync>;

/// Whether a live process of this node (a VM, possibly started by an earlier incarnation of the
/// node) relies on its host id on a domain: then the host id is resumed, never re-taken with a
/// new generation, which would free that process's leases for other hosts.
pub type HoldersProbe = Arc<dyn Fn(SdUuid) -> bool + Send + Sync>;

impl tasks::VolumeLeases for ConnectedPool {
    fn hold(
        &self,
        task: TaskId,
        vols: &[tasks::GuardedVolume],
    ) -> std::result::Result<Box<dyn Send>, spm::VolumeLeaseError> {
        // Dropped on a refusal, after the map's lock: gives back what was taken.
        let guard = TaskGuard {
            map: self.volume_leases.clone(),
            task,
        };
        {
            let mut held = self.volume_leases.lock().expect("volume leases");
            for v in vols {
                let unavailable = |e: PoolServiceError| spm::VolumeLeaseError::Unavailable {
                    vol: v.vol,
                    reason: chain(&e),
                };
                let ls = self.lockspace(v.sd).map_err(unavailable)?;
                let dom = self.domains.domain(v.sd).map_err(|e| unavailable(e.into()))?;
                match self.take_volume_lease(&mut held, &ls, &dom, v.img, v.vol, LeaseHolder::Task(task)) {
                    // Gone already (a recovered merge's removed top): nobody writes it.
                    Ok(_) | Err(spm::VolumeLeaseError::NoVolume { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        tracing::info!(task_id = %task, volumes = vols.len(), "task holds its volume leases");
        Ok(Box::new(guard))
    }
}

/// The node's pool service.
pub struct PoolService {
    storage: Arc<StorageService>,
    host_name: String,
    clock: Arc<dyn Clock>,
    pool: RwLock<Option<Arc<ConnectedPool>>>,
    /// Held by connect and disconnect: two connects at once (the engine's and a restarted
    /// node's own, see `resume`) must not both take the host ids.
    connecting: Mutex<()>,
    fence_hook: RwLock<Option<FenceHook>>,
    holders: RwLock<Option<HoldersProbe>>,
    spm_observer: RwLock<Option<PoolSpmObserver>>,
}

/// Told each SPM role change of this host in a pool (pool, our host id, new state).
pub type PoolSpmObserver = Arc<dyn Fn(PoolUuid, u64, &SpmState) + Send + Sync>;

fn chain(e: &dyn std::error::Error) -> String {
    tasks::error_chain(e)
}

impl PoolService {
    pub fn new(storage: Arc<StorageService>, host_name: &str) -> PoolService {
        PoolService {
            storage,
            host_name: host_name.to_string(),
            clock: Arc::new(SystemClock),
            pool: RwLock::new(None),
            connecting: Mutex::new(()),
            fence_hook: RwLock::new(None),
            holders: RwLock::new(None),
            spm_observer: RwLock::new(None),
        }
    }

    /// Sets who hears of this host's SPM role changes (pools connected later).
    pub fn set_spm_observer(&self, observer: PoolSpmObserver) {
        *self.spm_observer.write().expect("spm observer") = Some(observer);
    }

    /// Sets how the pool learns which domains live processes rely on (pools connected later).
    pub fn set_holders_probe(&self, probe: HoldersProbe) {
        *self.holders.write().expect("holders probe") = Some(probe);
    }

    /// Sets what runs when a domain's lockspace fences this host (pools connected later).
    pub fn set_fence_hook(&self, hook: FenceHook) {
        *self.fence_hook.write().expect("fence hook") = Some(hook);
    }

    pub fn storage(&self) -> &Arc<StorageService> {
        &self.storage
    }

    /// The connected pool, checking it is `pool`.
    pub fn get(&self, pool: PoolUuid) -> Result<Arc<ConnectedPool>> {
        match &*self.pool.read().expect("pool") {
            Some(p) if p.pool == pool => Ok(p.clone()),
            _ => Err(PoolServiceError::NotConnected(pool)),
        }
    }

    pub fn current(&self) -> Option<Arc<ConnectedPool>> {
        self.pool.read().expect("pool").clone()
    }

    fn domain_root(&self, sd: SdUuid) -> Result<PathBuf> {
        Ok(self.storage.domain(sd)?.root().to_path_buf())
    }

    /// `StoragePool.forcedDetachStorageDomain`: takes domain `sd` out of the pool its metadata
    /// names although that pool's hosts never detached it (they are gone: a disaster
    /// recovery). Safe only when nobody writes the domain any more, which storage tells: this
    /// host joins the domain's lockspace as `host_id` and watches the other host ids for as
    /// long as the slowest of them takes to renew (twice its io_timeout, plus ours); any that
    /// renews means a live pool, and the domain is refused. Then it takes the domain's SDM
    /// lease, which waits until a dead SPM's host id has been dead for 8N + M and fails while
    /// a live one holds it, rewrites the metadata ([`pool::force_detach`]) and lets go.
    /// Answers the pools the domain was in.
    pub fn forced_detach(&self, sd: SdUuid, host_id: u64, timing: PoolTiming) -> Result<Vec<PoolUuid>> {
        if let Some(cp) = self.current() {
            if cp.has_lockspace(sd) || cp.metadata().is_ok_and(|pm| pm.status(sd).is_some()) {
                return Err(PoolServiceError::Invalid(format!(
                    "storage domain {sd} is in this host's pool {}: detach it there",
                    cp.pool
                )));
            }
        }
        let dom = self.storage.domain(sd)?;
        let mut cfg = LockspaceConfig::new(&sd.to_string(), host_id, &self.host_name, timing.io_timeout);
        cfg.fence_margin = timing.fence_margin;
        let ids = dom.md_dir().join("ids");
        let acquire = |cfg: LockspaceConfig| {
            Lockspace::acquire(&ids, 0, cfg, self.clock.clone()).map_err(|source| match source {
                // Our host id is another pool's live host's there.
                oxvirt_lease::LeaseError::HostIdBusy { .. } => PoolServiceError::DomainInUse {
                    sd,
                    hosts: vec![host_id],
                },
                source => PoolServiceError::HostId { sd, host_id, source },
            })
        };
        let mut ls = acquire(cfg.clone())?;
        if ls.valid_until() < self.clock.now() + timing.io_timeout * 4 {
            // As in `ConnectedPool::acquire_host_id`: the wait used the N the record had, the
            // validity ours; the record is ours now, taken back at once.
            drop(ls);
            ls = acquire(cfg)?;
        }
        let others = || {
            ls.hosts()
                .into_iter()
                .filter(|(h, _)| *h != host_id)
                .collect::<Vec<_>>()
        };
        let slowest = others()
            .iter()
            .filter_map(|(h, _)| ls.host_observation(*h))
            .map(|o| Duration::from_secs(u64::from(o.io_timeout)))
            .max()
            .unwrap_or_default()
            .max(timing.io_timeout);
        let until = Instant::now() + slowest * 2 + timing.io_timeout;
        loop {
            let live: Vec<u64> = others()
                .into_iter()
                .filter(|(_, st)| *st == oxvirt_lease::HostStatus::Live)
                .map(|(h, _)| h)
                .collect();
            if !live.is_empty() {
                let _ = ls.release();
                return Err(PoolServiceError::DomainInUse { sd, hosts: live });
            }
            if Instant::now() >= until {
                break;
            }
            std::thread::sleep((timing.io_timeout / 2).max(Duration::from_millis(100)));
        }
        let lease = match spm::acquire_sdm(&ls, &dom, true, None) {
            Ok(l) => l,
            Err(e) => {
                let _ = ls.release();
                return Err(match e {
                    spm::SpmError::Lease {
                        source: oxvirt_lease::LeaseError::OwnedByOther { host_id, .. },
                        ..
                    } => PoolServiceError::DomainInUse {
                        sd,
                        hosts: vec![host_id],
                    },
                    e => e.into(),
                });
            }
        };
        let detached = pool::force_detach(dom.root());
        let _ = lease.release();
        let _ = ls.release();
        let detached = detached?;
        tracing::warn!(sd = %sd, pools = ?detached, "storage domain taken over from the pools it was in");
        Ok(detached)
    }

    /// `StoragePool.create`: makes `master` the master domain of new pool `pool`.
    pub fn create(
        &self,
        pool: PoolUuid,
        name: &str,
        master: SdUuid,
        master_version: u64,
    ) -> Result<PoolMetadata> {
        let root = self.domain_root(master)?;
        Ok(pool::create_pool(&root, pool, name, master_version)?)
    }

    /// `StoragePool.connect`: host ids in every active domain, HSM mailbox on the master.
    pub fn connect(
        &self,
        pool: PoolUuid,
        host_id: u64,
        master: SdUuid,
        master_version: u64,
        timing: PoolTiming,
    ) -> Result<Value> {
        if host_id == 0 || host_id > oxvirt_storage::mailbox::MAX_HOST_ID {
            return Err(PoolServiceError::Invalid(format!(
                "host id {host_id} is outside 1..=250"
            )));
        }
        let _connecting = self.connecting.lock().expect("connecting");
        if let Some(p) = self.current() {
            if p.pool != pool {
                return Err(PoolServiceError::OtherPool(p.pool));
            }
            if p.host_id != host_id {
                return Err(PoolServiceError::Invalid(format!(
                    "already connected to pool {pool} as host id {}",
                    p.host_id
                )));
            }
            p.refresh(master, master_version)?;
            return p.info();
        }
        let root = self.domain_root(master)?;
        let pm = pool::read_pool(&root, pool)?;
        if pm.master_version != master_version {
            return Err(pool::PoolError::MasterVersion {
                pool,
                expected: master_version,
                found: pm.master_version,
            }
            .into());
        }
        let cp = Arc::new(ConnectedPool {
            pool,
            host_id,
            master: RwLock::new((master, root.clone())),
            timing,
            clock: self.clock.clone(),
            host_name: self.host_name.clone(),
            domains: Arc::new(Domains {
                svc: self.storage.clone(),
                open: Mutex::new(HashMap::new()),
            }),
            lockspaces: Mutex::new(BTreeMap::new()),
            role: Arc::new(SpmRole::new(host_id)),
            hsm: Mutex::new(None),
            spm_mailbox: Mutex::new(None),
            tasks: Mutex::new(HashMap::new()),
            volume_leases: Arc::new(Mutex::new(HashMap::new())),
            vm_leases: Mutex::new(HashMap::new()),
            fence_hook: self.fence_hook.read().expect("fence hook").clone(),
            holders: self.holders.read().expect("holders probe").clone(),
            last_recovery: Mutex::new(None),
        });
        if let Some(o) = self.spm_observer.read().expect("spm observer").clone() {
            cp.role.set_observer(Arc::new(move |st| o(pool, host_id, st)));
        }
        cp.sync_lockspaces(&pm)?;
        cp.start_hsm_mailbox()?;
        *self.pool.write().expect("pool") = Some(cp.clone());
        tracing::info!(pool = %pool, host_id, master = %master, "connected to storage pool");
        cp.info()
    }

    /// `StoragePool.disconnect`: refused while SPM.
    pub fn disconnect(&self, pool: PoolUuid) -> Result<()> {
        let _connecting = self.connecting.lock().expect("connecting");
        let cp = self.get(pool)?;
        if cp.role.lver().is_some() || cp.role.state() == SpmState::Contending {
            return Err(PoolServiceError::Invalid(format!(
                "host {} is the SPM of pool {pool}: stop the SPM first",
                cp.host_id
            )));
        }
        if let Some(h) = cp.hsm.lock().expect("hsm").take() {
            h.stop();
        }
        cp.volume_leases.lock().expect("volume leases").clear();
        let spaces: Vec<_> = std::mem::take(&mut *cp.lockspaces.lock().expect("lockspaces"))
            .into_values()
            .collect();
        for ls in spaces {
            if let Err(e) = ls.release() {
                tracing::warn!(error = %e, "releasing a host id failed");
            }
        }
        *self.pool.write().expect("pool") = None;
        tracing::info!(pool = %pool, "disconnected from storage pool");
        Ok(())
    }
}

impl ConnectedPool {
    pub fn role(&self) -> &Arc<SpmRole> {
        &self.role
    }

    /// Per lockspace held, when our host id there expires unless renewed (`CLOCK_BOOTTIME`);
    /// what the fence watchdog is petted with.
    /// The domains the domain monitor checks: the pool's active ones (those where we hold a
    /// host id if the pool metadata cannot be read).
    pub fn monitored_domains(&self) -> Vec<SdUuid> {
        match self.metadata() {
            Ok(pm) => pm.active_domains(),
            Err(_) => self
                .lockspaces
                .lock()
                .expect("lockspaces")
                .keys()
                .copied()
                .collect(),
        }
    }

    /// One domain monitor check (blocking: an uncached read of the domain's metadata).
    pub fn check_domain(&self, sd: SdUuid) -> super::monitor::DomainCheck {
        let acquired = self.lockspace(sd).is_ok_and(|ls| ls.is_valid());
        match self.domains.domain(sd) {
            Ok(dom) => {
                let h = dom.health();
                super::monitor::DomainCheck {
                    valid: h.valid,
                    delay: h.read_delay,
                    error: h.error,
                    acquired,
                }
            }
            Err(e) => super::monitor::DomainCheck {
                valid: false,
                delay: Duration::ZERO,
                error: Some(chain(&e)),
                acquired,
            },
        }
    }

    /// How often the domain monitor checks (VDSM: 10 s with its default io_timeout of 10 s).
    pub fn io_timeout(&self) -> Duration {
        self.timing.io_timeout
    }

    pub fn monitor_interval(&self) -> Duration {
        self.timing.io_timeout.max(Duration::from_millis(500))
    }

    pub fn lockspace_deadlines(&self) -> Vec<(SdUuid, Duration)> {
        self.lockspaces
            .lock()
            .expect("lockspaces")
            .iter()
            .map(|(sd, ls)| (*sd, ls.valid_until()))
            .collect()
    }

    pub fn master(&self) -> (SdUuid, PathBuf) {
        self.master.read().expect("master").clone()
    }

    fn store(&self) -> TaskStore {
        TaskStore::new(&self.master().1)
    }

    pub fn metadata(&self) -> Result<PoolMetadata> {
        Ok(pool::read_pool(&self.master().1, self.pool)?)
    }

    fn lockspace(&self, sd: SdUuid) -> Result<Arc<Lockspace>> {
        self.lockspaces
            .lock()
            .expect("lockspaces")
            .get(&sd)
            .cloned()
            .ok_or(PoolServiceError::NoHostId(sd))
    }

    /// Acquires host ids in active domains we lack, releases those of domains no longer
    /// active. Acquisitions run in parallel (each takes at least 2N).
    fn sync_lockspaces(self: &Arc<Self>, pm: &PoolMetadata) -> Result<()> {
        let want = pm.active_domains();
        let have: Vec<SdUuid> = self
            .lockspaces
            .lock()
            .expect("lockspaces")
            .keys()
            .copied()
            .collect();
        for sd in have.iter().filter(|sd| !want.contains(sd)) {
            if let Some(ls) = self.lockspaces.lock().expect("lockspaces").remove(sd) {
                if let Err(e) = ls.release() {
                    tracing::warn!(sd = %sd, error = %e, "releasing the host id of an inactive domain failed");
                }
            }
        }
        let missing: Vec<SdUuid> = want.into_iter().filter(|sd| !have.contains(sd)).collect();
        let results: Vec<(SdUuid, Result<Lockspace>)> = std::thread::scope(|s| {
            let hs: Vec<_> = missing
                .iter()
                .map(|sd| {
                    let sd = *sd;
                    s.spawn(move || (sd, self.acquire_host_id(sd)))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("host id thread"))
                .collect()
        });
        let mut first_err = None;
        for (sd, r) in results {
            match r {
                Ok(ls) => {
                    let ls = Arc::new(ls);
                    if sd == self.master().0 {
                        self.watch_master_fence(&ls);
                    }
                    if let Some(hook) = self.fence_hook.clone() {
                        ls.on_fence(move |ev| {
                            tracing::error!(sd = %sd, reason = ?ev.reason, "host id lost: fencing what holds leases on the domain");
                            hook(sd)
                        });
                    }
                    self.lockspaces.lock().expect("lockspaces").insert(sd, ls);
                }
                Err(e) => {
                    tracing::error!(sd = %sd, error = %chain(&e), "cannot acquire our host id");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e)
                if !self
                    .lockspaces
                    .lock()
                    .expect("lockspaces")
                    .contains_key(&self.master().0) =>
            {
                Err(e)
            }
            _ => Ok(()),
        }
    }

    fn acquire_host_id(&self, sd: SdUuid) -> Result<Lockspace> {
        let dom = self.domains.domain(sd)?;
        let mut cfg = LockspaceConfig::new(
            &sd.to_string(),
            self.host_id,
            &self.host_name,
            self.timing.io_timeout,
        );
        cfg.fence_margin = self.timing.fence_margin;
        // The same host name means an earlier incarnation of this node. If no process of ours
        // relies on the host id (no VM outlived that incarnation), nothing can still write
        // under it and it is taken back at once with a new generation. If VMs did outlive it,
        // their leases are owned by its generation: resume that generation while its record is
        // valid; past that, wait it out (the fence watchdog has killed those VMs by then).
        let held = self.holders.as_ref().is_some_and(|probe| probe(sd));
        cfg.fast_reacquire = !held;
        cfg.resume = held;
        let t0 = Instant::now();
        let ids = dom.md_dir().join("ids");
        let acquire = |cfg: LockspaceConfig| {
            Lockspace::acquire(&ids, 0, cfg, self.clock.clone()).map_err(|source| PoolServiceError::HostId {
                sd,
                host_id: self.host_id,
                source,
            })
        };
        let mut ls = acquire(cfg.clone())?;
        if ls.valid_until() < self.clock.now() + self.timing.io_timeout * 4 {
            // Work around the lease crate: acquiring waits 2N with the N written in the free
            // record (the domain's IOOPTIMEOUTSEC, 10 s) but counts validity from the write
            // with our N, so a smaller N comes back (nearly) expired. The record is ours now,
            // written with our N: taking it back is quick and valid.
            tracing::warn!(sd = %sd, host_id = self.host_id, "host id expired while being acquired; acquiring it again");
            drop(ls);
            ls = acquire(cfg)?;
        }
        tracing::info!(sd = %sd, host_id = self.host_id, took_s = t0.elapsed().as_secs_f64(), "host id acquired");
        Ok(ls)
    }

    /// Self-fencing of the SPM role when the master lockspace fences.
    fn watch_master_fence(self: &Arc<Self>, ls: &Lockspace) {
        let role = self.role.clone();
        ls.on_fence(move |ev| {
            let running = role.fence(&format!("{:?}", ev.reason));
            if running > 0 {
                tracing::error!(
                    running,
                    "SPM fenced while task jobs run: aborting so they cannot outlive our lease"
                );
                std::process::abort();
            }
        });
    }

    fn start_hsm_mailbox(&self) -> Result<()> {
        let (_, root) = self.master();
        let mut cfg = self.timing.mailbox;
        cfg.io_timeout = self.timing.io_timeout;
        let h = HsmMailbox::start(&root.join("dom_md"), self.host_id, cfg, self.clock.clone())?;
        if let Some(old) = self.hsm.lock().expect("hsm").replace(Arc::new(h)) {
            old.stop();
        }
        Ok(())
    }

    /// `StoragePool.refresh`: follow a new master and the active domain list.
    pub fn refresh(self: &Arc<Self>, master: SdUuid, master_version: u64) -> Result<()> {
        let root = self.domains.domain(master)?.root().to_path_buf();
        let pm = pool::read_pool(&root, self.pool)?;
        if pm.master_version != master_version {
            return Err(pool::PoolError::MasterVersion {
                pool: self.pool,
                expected: master_version,
                found: pm.master_version,
            }
            .into());
        }
        let moved = self.master().0 != master;
        *self.master.write().expect("master") = (master, root);
        self.sync_lockspaces(&pm)?;
        if moved {
            if let Ok(ls) = self.lockspace(master) {
                self.watch_master_fence(&ls);
            }
            self.start_hsm_mailbox()?;
        }
        Ok(())
    }

    pub fn info(&self) -> Result<Value> {
        let pm = self.metadata()?;
        let hosts: BTreeMap<String, Value> = self
            .lockspaces
            .lock()
            .expect("lockspaces")
            .iter()
            .map(|(sd, ls)| {
                (
                    sd.to_string(),
                    json!({ "hostId": ls.host_id(), "generation": ls.generation(), "valid": ls.is_valid() }),
                )
            })
            .collect();
        let domains: BTreeMap<String, &str> = pm
            .domains
            .iter()
            .map(|(sd, st)| (sd.to_string(), st.as_str()))
            .collect();
        Ok(json!({
            "info": {
                "spm_id": pm.spm_id, "lver": pm.lver, "master_uuid": pm.master, "master_ver": pm.master_version,
                "name": pm.description, "pool_status": "connected", "domains": pool::encode_domains(&pm.domains),
            },
            "dominfo": domains,
            "hostId": self.host_id,
            "hostIds": hosts,
            "spm": self.role.state(),
            "lastRecovery": self.last_recovery.lock().expect("recovery").clone(),
        }))
    }

    /// `StoragePool.getSpmStatus`: the SDM lease as storage shows it, and our role.
    pub fn spm_status(&self) -> Result<Value> {
        let (sd, root) = self.master();
        let dom = self.domains.domain(sd)?;
        let st = spm::read_spm_status(&root, sd, dom.metadata().alignment)?;
        let pm = self.metadata()?;
        let ours = self.role.state();
        let status = match (&ours, st.owner) {
            (SpmState::Spm { .. }, Some(o)) if o == self.host_id => "SPM",
            (SpmState::Contending, _) => "Contend",
            (SpmState::Stopping, _) => "SPM",
            _ => "Free",
        };
        Ok(json!({
            "spm_st": {
                "spmStatus": status,
                "spmId": st.owner.map_or(-1, |o| o as i64),
                "spmLver": st.lver as i64,
            },
            "role": ours,
            "metadata": { "spmId": pm.spm_id, "lver": pm.lver },
        }))
    }

    // -----------------------------------------------------------------------------------------
    // The SPM role.

    /// `StoragePool.spmStart`: runs in the background; returns the task id at once.
    pub fn spm_start(self: &Arc<Self>, prev_id: i64, prev_lver: i64) -> Result<TaskId> {
        self.role.begin_contend()?;
        let id = TaskId::new_random();
        let rec = TaskPlan::new("spmStart").into_record(id, self.host_id, 0);
        let task = Arc::new(RunningTask {
            record: Mutex::new(rec),
            stop: AtomicBool::new(false),
            persistent: false,
        });
        self.tasks.lock().expect("tasks").insert(id, task.clone());
        let me = self.clone();
        std::thread::Builder::new()
            .name("spm-start".into())
            .spawn(move || {
                let t0 = Instant::now();
                let r = me.become_spm(prev_id, prev_lver);
                let mut rec = task.record.lock().expect("task");
                match r {
                    Ok(lver) => {
                        rec.state = TaskState::Finished;
                        rec.lver = lver;
                        tracing::info!(pool = %me.pool, lver, took_s = t0.elapsed().as_secs_f64(), "SPM started");
                    }
                    Err(e) => {
                        me.role.contend_failed();
                        rec.state = TaskState::Failed;
                        rec.error = Some(chain(&e));
                        tracing::warn!(pool = %me.pool, error = %chain(&e), "spmStart failed");
                    }
                }
            })
            .map_err(|e| PoolServiceError::Invalid(format!("cannot start the spmStart thread: {e}")))?;
        Ok(id)
    }

    fn become_spm(self: &Arc<Self>, prev_id: i64, prev_lver: i64) -> Result<u64> {
        let (sd, root) = self.master();
        let ls = self.lockspace(sd)?;
        let dom = self.domains.domain(sd)?;
        let expect = (prev_lver >= 0 && prev_id >= 0).then_some(prev_lver as u64);
        let lease = spm::acquire_sdm(&ls, &dom, true, expect)?;
        let lver = self.role.acquired(lease)?;
        let writer = PoolWriter {
            master_root: &root,
            pool: self.pool,
            fence: &*self.role,
        };
        if let Err(e) = writer.update(|_| Ok(())) {
            self.abandon_spm();
            return Err(e.into());
        }
        // Serve HSM extends first: a guest waiting for space must not wait for the recovery
        // below, which may finish long jobs. An extend only grows a file, which no recovery
        // step conflicts with.
        let mut cfg = self.timing.mailbox;
        cfg.io_timeout = self.timing.io_timeout;
        let handler = Arc::new(SpmExtendHandler {
            role: self.role.clone(),
            domains: self.domains.clone(),
        });
        match SpmMailbox::start(&root.join("dom_md"), cfg, self.clock.clone(), handler) {
            Ok(m) => *self.spm_mailbox.lock().expect("spm mailbox") = Some(m),
            Err(e) => tracing::error!(error = %e, "cannot start the SPM mailbox; HSM extends will time out"),
        }
        // Finish or undo what the previous SPM left: domain journals first (each job atomic
        // again), then the tasks. Failures are recorded, never fatal.
        let pm = self.metadata()?;
        let mut domain_reports = BTreeMap::new();
        let opened: Vec<Arc<FileStorageDomain>> = pm
            .active_domains()
            .iter()
            .filter_map(|sd| self.domains.domain(*sd).ok())
            .collect();
        for d in &opened {
            let others: Vec<&FileStorageDomain> =
                opened.iter().filter(|o| o.sd() != d.sd()).map(|o| &**o).collect();
            let r = match d.recover(&others) {
                Ok(rep) => json!(rep),
                Err(e) => {
                    tracing::error!(sd = %d.sd(), error = %chain(&e), "domain recovery failed");
                    json!({ "error": chain(&e) })
                }
            };
            domain_reports.insert(d.sd().to_string(), r);
        }
        let store = self.store();
        let stop = AtomicBool::new(false);
        let ctx = TaskContext {
            domains: &*self.domains,
            store: &store,
            fence: &*self.role,
            stop: &stop,
            progress: &|_| {},
            leases: &**self,
        };
        let task_report = {
            let _g = self.role.job()?;
            tasks::recover_tasks(&ctx, self.host_id)
        };
        tracing::info!(pool = %self.pool, ?task_report, "tasks recovered");
        *self.last_recovery.lock().expect("recovery") =
            Some(json!({ "domains": domain_reports, "tasks": task_report }));
        Ok(lver)
    }

    fn abandon_spm(&self) {
        if let Ok(Some(lease)) = self.role.begin_stop() {
            let _ = lease.release();
        }
        self.role.stopped();
    }

    /// `StoragePool.spmStop`.
    fn refuse_if_tasks_run(&self) -> Result<()> {
        match self.role.running_jobs() {
            0 => Ok(()),
            running => Err(spm::SpmError::Busy {
                host_id: self.host_id,
                running,
            }
            .into()),
        }
    }

    pub fn spm_stop(&self) -> Result<()> {
        if self.role.lver().is_none() {
            return Err(spm::SpmError::NotSpm {
                host_id: self.host_id,
            }
            .into());
        }
        // Refused before anything changes: a stop refused only by `begin_stop` below would
        // leave an SPM without its mailbox and without its id in the pool metadata.
        self.refuse_if_tasks_run()?;
        if let Some(m) = self.spm_mailbox.lock().expect("spm mailbox").take() {
            m.stop();
        }
        let (_, root) = self.master();
        if let Err(e) = (PoolWriter {
            master_root: &root,
            pool: self.pool,
            fence: &*self.role,
        })
        .clear_spm()
        {
            tracing::warn!(error = %chain(&e), "cannot clear the SPM id in the pool metadata");
        }
        let lease = self.role.begin_stop()?;
        if let Some(l) = lease {
            if let Err(e) = l.release() {
                tracing::warn!(error = %e, "releasing the SDM lease failed");
            }
        }
        self.role.stopped();
        tracing::info!(pool = %self.pool, "SPM stopped");
        Ok(())
    }

    fn require_spm(&self) -> Result<(u64, u64)> {
        self.role.check().map_err(|_| PoolServiceError::NotSpm {
            pool: self.pool,
            host_id: self.host_id,
        })
    }

    fn writer_root(&self) -> PathBuf {
        self.master().1
    }

    /// Attach/activate/deactivate/detach a domain (SPM, synchronous as in VDSM).
    pub fn set_domain(self: &Arc<Self>, sd: SdUuid, action: DomainAction) -> Result<()> {
        self.require_spm()?;
        let root = self.writer_root();
        let w = PoolWriter {
            master_root: &root,
            pool: self.pool,
            fence: &*self.role,
        };
        match action {
            DomainAction::Attach => w.attach(self.domains.domain(sd)?.root())?,
            DomainAction::Activate => w.set_status(sd, DomainStatus::Active)?,
            DomainAction::Deactivate => w.set_status(sd, DomainStatus::Attached)?,
            DomainAction::Detach => w.detach(self.domains.domain(sd)?.root())?,
        }
        let pm = self.metadata()?;
        self.sync_lockspaces(&pm)
    }

    /// `StoragePool.switchMaster`: the master role (and the SDM lease) move to `new_master`.
    pub fn switch_master(self: &Arc<Self>, new_master: SdUuid, new_version: u64) -> Result<()> {
        self.require_spm()?;
        // A running task journals on the master it started on: moving the master under it
        // would leave its record behind, and a later SPM could redo or undo finished work.
        self.refuse_if_tasks_run()?;
        let (old_sd, old_root) = self.master();
        let new_dom = self.domains.domain(new_master)?;
        let ls = self.lockspace(new_master)?;
        let new_lease = spm::acquire_sdm(&ls, &new_dom, false, None)?;
        struct NewLease<'a>(&'a ResourceLease, u64, &'a SpmRole);
        impl SpmFence for NewLease<'_> {
            fn check(&self) -> std::result::Result<(u64, u64), String> {
                self.2.check()?;
                if self.0.is_valid() {
                    Ok((self.1, self.0.lver()))
                } else {
                    Err("the new master's SDM lease is no longer valid".into())
                }
            }
        }
        pool::switch_master(
            &old_root,
            new_dom.root(),
            self.pool,
            new_version,
            &NewLease(&new_lease, self.host_id, &self.role),
        )?;
        if let Some(m) = self.spm_mailbox.lock().expect("spm mailbox").take() {
            m.stop();
        }
        *self.master.write().expect("master") = (new_master, new_dom.root().to_path_buf());
        if let Some(old) = self.role.replace_lease(new_lease) {
            let _ = old.release();
        }
        self.watch_master_fence(&ls);
        let mut cfg = self.timing.mailbox;
        cfg.io_timeout = self.timing.io_timeout;
        let handler = Arc::new(SpmExtendHandler {
            role: self.role.clone(),
            domains: self.domains.clone(),
        });
        *self.spm_mailbox.lock().expect("spm mailbox") = Some(SpmMailbox::start(
            &new_dom.md_dir(),
            cfg,
            self.clock.clone(),
            handler,
        )?);
        self.start_hsm_mailbox()?;
        tracing::info!(pool = %self.pool, from = %old_sd, to = %new_master, "master switched");
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Tasks.

    /// Starts an SPM task: journaled first, then run in the background. Returns its id.
    pub fn start_task(self: &Arc<Self>, plan: TaskPlan) -> Result<TaskId> {
        let (host, lver) = self.require_spm()?;
        let id = TaskId::new_random();
        let rec = plan.into_record(id, host, lver);
        let store = self.store();
        if self.role.check().is_err() {
            return Err(PoolServiceError::NotSpm {
                pool: self.pool,
                host_id: self.host_id,
            });
        }
        store.save(&rec)?;
        let task = Arc::new(RunningTask {
            record: Mutex::new(rec.clone()),
            stop: AtomicBool::new(false),
            persistent: true,
        });
        self.tasks.lock().expect("tasks").insert(id, task.clone());
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("task-{id}"))
            .spawn(move || {
                let mut rec = rec;
                let guard = me.role.job();
                let t = task.clone();
                let progress = move |p: f64| t.record.lock().expect("task").progress = p;
                let ctx = TaskContext {
                    domains: &*me.domains,
                    store: &store,
                    fence: &*me.role,
                    stop: &task.stop,
                    progress: &progress,
                    leases: &*me,
                };
                let r = match guard {
                    Ok(_g) => tasks::run_task(&ctx, &mut rec),
                    Err(e) => Err(tasks::TaskError::Fenced { id, reason: e.to_string() }),
                };
                if let Err(e) = r {
                    tracing::error!(task_id = %id, error = %chain(&e), "task stopped; the next SPM will recover it");
                    rec.error = Some(chain(&e));
                }
                let p = task.record.lock().expect("task").progress;
                rec.progress = p;
                *task.record.lock().expect("task") = rec;
            })
            .map_err(|e| PoolServiceError::Invalid(format!("cannot start the task thread: {e}")))?;
        Ok(id)
    }

    /// A task's record: in memory if this node runs it, else from the journal.
    pub fn task(&self, id: TaskId) -> Result<TaskRecord> {
        let mem = self.tasks.lock().expect("tasks").get(&id).cloned();
        match mem {
            // A running persistent task's journal is more current than our copy, but the task
            // runs until this node's thread is done with it (its guard's leases given back, the
            // copy updated): only then is it reported ended, and can it be cleared.
            Some(t) if t.persistent => {
                let mem = t.record.lock().expect("task").clone();
                match self.store().load(id) {
                    Ok(mut r) => {
                        r.progress = mem.progress;
                        if !mem.state.is_terminal() && r.state.is_terminal() {
                            r.state = TaskState::Running;
                            r.error = None;
                        }
                        Ok(r)
                    }
                    Err(_) => Ok(mem),
                }
            }
            Some(t) => Ok(t.record.lock().expect("task").clone()),
            None => Ok(self.store().load(id)?),
        }
    }

    pub fn all_tasks(&self) -> Vec<TaskRecord> {
        let mut out: BTreeMap<TaskId, TaskRecord> =
            self.store().load_all().0.into_iter().map(|r| (r.id, r)).collect();
        for (id, t) in self.tasks.lock().expect("tasks").iter() {
            out.insert(*id, t.record.lock().expect("task").clone());
        }
        out.into_values().collect()
    }

    /// `Task.clear`: forgets a finished task (removing its journal entry, on the SPM).
    pub fn clear_task(&self, id: TaskId) -> Result<()> {
        let mem = self.tasks.lock().expect("tasks").get(&id).cloned();
        if let Some(t) = &mem {
            let st = t.record.lock().expect("task").state;
            if !st.is_terminal() {
                return Err(tasks::TaskError::State {
                    id,
                    state: st,
                    action: "clear",
                    needed: "finished, rolled back or failed",
                }
                .into());
            }
        }
        if mem.as_ref().is_none_or(|t| t.persistent) {
            self.require_spm()?;
            self.store().clear(id)?;
        }
        self.tasks.lock().expect("tasks").remove(&id);
        Ok(())
    }

    /// `Task.stop`: an uncommitted task rolls back before its next job.
    pub fn stop_task(&self, id: TaskId) -> Result<()> {
        let t = self
            .tasks
            .lock()
            .expect("tasks")
            .get(&id)
            .cloned()
            .ok_or(tasks::TaskError::NotFound { id })?;
        t.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Volume leases and the mailbox.

    /// Takes a volume's lease for the API caller (`vm: None`) or for a VM running here. A VM
    /// asking again for a lease it holds gets its lver back; any other second taker is refused.
    pub fn acquire_volume_lease(
        &self,
        sd: SdUuid,
        img: ImgUuid,
        vol: VolUuid,
        vm: Option<VmId>,
    ) -> Result<u64> {
        let holder = vm.map_or(LeaseHolder::Api, LeaseHolder::Vm);
        let ls = self.lockspace(sd)?;
        let dom = self.domains.domain(sd)?;
        let mut held = self.volume_leases.lock().expect("volume leases");
        Ok(self.take_volume_lease(&mut held, &ls, &dom, img, vol, holder)?)
    }

    /// Takes `vol`'s lease (in `dom`, through our host id in `ls`) for `holder` into `held`
    /// (the locked map); a VM's second ask for its own lease answers its lver.
    fn take_volume_lease(
        &self,
        held: &mut HashMap<VolKey, HeldVolumeLease>,
        ls: &Lockspace,
        dom: &FileStorageDomain,
        img: ImgUuid,
        vol: VolUuid,
        holder: LeaseHolder,
    ) -> std::result::Result<u64, spm::VolumeLeaseError> {
        let key = (dom.sd(), vol);
        if let Some(h) = held.get(&key) {
            return match (h.holder, holder) {
                (LeaseHolder::Vm(a), LeaseHolder::Vm(b)) if a == b => Ok(h.lease.lver()),
                (here, _) => Err(spm::VolumeLeaseError::LockedHere {
                    vol,
                    host: self.host_id,
                    holder: here.to_string(),
                }),
            };
        }
        let lease = spm::acquire_volume_lease(ls, dom, img, vol)?;
        let lver = lease.lver();
        held.insert(key, HeldVolumeLease { lease, holder });
        Ok(lver)
    }

    /// Releases a lease taken through the API; a running VM's leases are not the API's to drop.
    pub fn release_volume_lease(&self, sd: SdUuid, vol: VolUuid) -> Result<()> {
        let mut held = self.volume_leases.lock().expect("volume leases");
        match held.get(&(sd, vol)) {
            None => Err(PoolServiceError::Invalid(format!(
                "this host holds no lease of volume {vol}"
            ))),
            Some(HeldVolumeLease {
                holder: holder @ (LeaseHolder::Vm(_) | LeaseHolder::Task(_)),
                ..
            }) => Err(PoolServiceError::Invalid(format!(
                "the lease of volume {vol} belongs to {holder}, not to the API"
            ))),
            Some(_) => {
                let l = held.remove(&(sd, vol)).expect("looked up");
                drop(held);
                release_volume(vol, l.lease)
            }
        }
    }

    /// Whether `sd` is a domain of this pool where we hold a host id (leases can be taken).
    pub fn has_lockspace(&self, sd: SdUuid) -> bool {
        self.lockspace(sd).is_ok()
    }

    /// The volumes whose leases this host holds for `vm`.
    pub fn vm_volume_leases(&self, vm: VmId) -> Vec<VolKey> {
        self.volume_leases
            .lock()
            .expect("volume leases")
            .iter()
            .filter(|(_, h)| h.holder == LeaseHolder::Vm(vm))
            .map(|(v, _)| *v)
            .collect()
    }

    /// Releases `vm`'s leases on `vols` (all of them with `None`); returns the volumes released.
    pub fn release_vm_volume_leases(&self, vm: VmId, vols: Option<&[VolKey]>) -> Result<Vec<VolKey>> {
        let taken: Vec<(VolKey, HeldVolumeLease)> = {
            let mut held = self.volume_leases.lock().expect("volume leases");
            let ours: Vec<VolKey> = held
                .iter()
                .filter(|(v, h)| h.holder == LeaseHolder::Vm(vm) && vols.is_none_or(|only| only.contains(v)))
                .map(|(v, _)| *v)
                .collect();
            ours.into_iter()
                .map(|v| (v, held.remove(&v).expect("listed")))
                .collect()
        };
        let mut released = Vec::new();
        let mut first_err = None;
        for (key, h) in taken {
            match release_volume(key.1, h.lease) {
                Ok(()) => released.push(key),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(released),
        }
    }

    /// Adds VM lease `id` to domain `sd`'s xleases (SPM only).
    pub fn create_xlease(&self, sd: SdUuid, id: &str) -> Result<oxvirt_storage::xlease_ops::XleaseInfo> {
        self.require_spm()?;
        Ok(self.domains.domain(sd)?.create_xlease(id)?)
    }

    /// Removes VM lease `id` from domain `sd` (SPM only).
    pub fn remove_xlease(&self, sd: SdUuid, id: &str) -> Result<bool> {
        self.require_spm()?;
        Ok(self.domains.domain(sd)?.remove_xlease(id)?)
    }

    /// Takes VM lease `id` on domain `sd` for this host; fails with the owner's host id while
    /// another host holds it. Returns the lease version.
    pub fn acquire_vm_lease(&self, sd: SdUuid, id: &str) -> Result<u64> {
        if let Some(l) = self.vm_leases.lock().expect("vm leases").get(id) {
            return Ok(l.lver());
        }
        let ls = self.lockspace(sd)?;
        let dom = self.domains.domain(sd)?;
        let info = dom.lookup_xlease(id)?.ok_or_else(|| {
            PoolServiceError::Invalid(format!(
                "VM lease {id} does not exist on domain {sd}: the SPM creates it (Lease.create)"
            ))
        })?;
        let l = ls
            .acquire_resource(
                &info.path,
                info.offset,
                id,
                oxvirt_lease::lockspace::AcquireOptions::default(),
            )
            .map_err(|source| PoolServiceError::VmLease {
                id: id.to_string(),
                source,
            })?;
        let lver = l.lver();
        self.vm_leases
            .lock()
            .expect("vm leases")
            .insert(id.to_string(), l);
        tracing::info!(lease = id, sd = %sd, lver, "VM lease acquired");
        Ok(lver)
    }

    pub fn holds_vm_lease(&self, id: &str) -> bool {
        self.vm_leases.lock().expect("vm leases").contains_key(id)
    }

    /// Releases VM lease `id` if this host holds it.
    pub fn release_vm_lease(&self, id: &str) -> Result<bool> {
        let Some(l) = self.vm_leases.lock().expect("vm leases").remove(id) else {
            return Ok(false);
        };
        l.release().map_err(|source| PoolServiceError::VmLease {
            id: id.to_string(),
            source,
        })?;
        tracing::info!(lease = id, "VM lease released");
        Ok(true)
    }

    /// The owner of VM lease `id` as storage shows it.
    pub fn vm_lease_owner(&self, sd: SdUuid, id: &str) -> Result<Option<u64>> {
        let dom = self.domains.domain(sd)?;
        let Some(info) = dom.lookup_xlease(id)? else {
            return Ok(None);
        };
        let r = oxvirt_lease::direct::read_resource(&info.path, info.offset).map_err(|source| {
            PoolServiceError::VmLease {
                id: id.to_string(),
                source,
            }
        })?;
        Ok((r.leader.timestamp != 0).then_some(r.leader.owner_id))
    }

    /// The owner of VM lease `id` (its host id) with that host's liveness in our view of the
    /// domain's lockspace (`None`: we hold no host id there).
    pub fn vm_lease_owner_status(
        &self,
        sd: SdUuid,
        id: &str,
    ) -> Result<Option<(u64, Option<oxvirt_lease::HostStatus>)>> {
        let Some(owner) = self.vm_lease_owner(sd, id)? else {
            return Ok(None);
        };
        let status = self.lockspace(sd).ok().map(|ls| {
            if ls.host_id() == owner {
                oxvirt_lease::HostStatus::Live
            } else {
                ls.host_status(owner)
            }
        });
        Ok(Some((owner, status)))
    }

    /// The guard of a task that changes or removes every volume of image `img` (none when the
    /// image is not there: the task's job says so).
    pub fn image_guard(&self, sd: SdUuid, img: ImgUuid) -> Vec<tasks::GuardedVolume> {
        let vols = self
            .domains
            .domain(sd)
            .and_then(|d| d.volumes(img))
            .map(|m| m.into_keys().collect::<Vec<_>>())
            .unwrap_or_default();
        vols.into_iter()
            .map(|vol| tasks::GuardedVolume { sd, img, vol })
            .collect()
    }

    /// The volumes of image `img` below its leaf (a template's base, in another image, left
    /// out): what a running VM only reads.
    pub fn internal_volumes(&self, sd: SdUuid, img: ImgUuid) -> Result<Vec<VolUuid>> {
        let chain = self.domains.domain(sd)?.chain(img)?;
        let leaf = chain.leaf().id;
        Ok(chain.own_volumes().map(|v| v.id).filter(|v| *v != leaf).collect())
    }

    /// The image's own volumes from its base up to `top`, which must be in its chain.
    pub fn volumes_up_to(&self, sd: SdUuid, img: ImgUuid, top: VolUuid) -> Result<Vec<VolUuid>> {
        let chain = self.domains.domain(sd)?.chain(img)?;
        let at = chain
            .position(top)
            .ok_or(oxvirt_storage::StorageError::NoVolume { img, vol: top })?;
        Ok(chain.volumes[..=at]
            .iter()
            .filter(|v| v.meta.image == img)
            .map(|v| v.id)
            .collect())
    }

    /// Sets a volume's DESCRIPTION (SPM, synchronous as VDSM's `setVolumeDescription`).
    pub fn set_volume_description(
        &self,
        sd: SdUuid,
        img: ImgUuid,
        vol: VolUuid,
        description: &str,
    ) -> Result<()> {
        self.require_spm()?;
        Ok(self.domains.domain(sd)?.set_description(img, vol, description)?)
    }

    /// Writes bytes into an OVF store volume (raw, `DISKTYPE=OVFS`) on the SPM's behalf: the SPM
    /// is the one writer of a pool's OVF stores, so two engines' updates never interleave.
    pub fn write_volume_data(
        &self,
        sd: SdUuid,
        img: ImgUuid,
        vol: VolUuid,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<()> {
        self.require_spm()?;
        let dom = self.domains.domain(sd)?;
        // The verb exists for OVF stores: a guest's raw disk is never written through it.
        let disktype = dom.read_meta(img, vol)?.disktype;
        if !disktype.eq_ignore_ascii_case("OVFS") {
            return Err(PoolServiceError::Invalid(format!(
                "volume {vol} is of disk type {disktype}: only OVF store volumes (OVFS) are written this way"
            )));
        }
        Ok(dom.write_volume_data(img, vol, offset, data, sync)?)
    }

    /// The guard of a cold merge of `top` into `base`: both, and `top`'s child, whose backing
    /// file the merge rewrites.
    pub fn merge_guard(
        &self,
        sd: SdUuid,
        img: ImgUuid,
        base: VolUuid,
        top: VolUuid,
    ) -> Vec<tasks::GuardedVolume> {
        let child = self
            .domains
            .domain(sd)
            .and_then(|d| d.chain(img))
            .ok()
            .and_then(|c| {
                let ids = c.ids();
                let at = ids.iter().position(|v| *v == top)?;
                ids.get(at + 1).copied()
            });
        [Some(base), Some(top), child]
            .into_iter()
            .flatten()
            .map(|vol| tasks::GuardedVolume { sd, img, vol })
            .collect()
    }

    pub fn volume_lease_owner(&self, sd: SdUuid, img: ImgUuid, vol: VolUuid) -> Result<Option<u64>> {
        Ok(spm::volume_lease_owner(&*self.domains.domain(sd)?, img, vol)?)
    }

    /// Refuses to act on volumes `vols` of image `img` (all of its volumes when `None`; the
    /// verb's past participle in `action`) while one's lease is held by a host that may still
    /// write it: this host, or one not seen dead in our view of the domain's lockspace, with
    /// the host id's generation the lease was taken under (a host that restarted since holds
    /// nothing). The engine never deletes or copies a volume a running VM writes; this answers
    /// a mistake at once, before a task starts — the task's guard (see
    /// [`tasks::VolumeLeases`]) is what holds it off while the task runs. What does not exist
    /// is left for the verb itself to report.
    pub fn refuse_if_held(
        &self,
        sd: SdUuid,
        img: ImgUuid,
        vols: Option<&[VolUuid]>,
        action: &'static str,
    ) -> Result<()> {
        use oxvirt_lease::HostStatus;
        let Ok(dom) = self.domains.domain(sd) else {
            return Ok(());
        };
        let vols: Vec<VolUuid> = match vols {
            Some(v) => v.to_vec(),
            None => dom
                .volumes(img)
                .map(|m| m.into_keys().collect())
                .unwrap_or_default(),
        };
        for vol in vols {
            if !dom.lease_path(img, vol).exists() {
                continue;
            }
            let Some((host, taken_under)) = spm::volume_lease_holder(&dom, img, vol)? else {
                continue;
            };
            let (status, generation) = match self.lockspace(sd) {
                Ok(ls) if ls.host_id() == host => (HostStatus::Live, Some(ls.generation())),
                Ok(ls) => (
                    ls.host_status(host),
                    ls.host_observation(host).map(|o| o.owner_generation),
                ),
                Err(_) => (HostStatus::Unknown, None),
            };
            if may_still_write(taken_under, &status, generation) {
                return Err(PoolServiceError::VolumeInUse {
                    vol,
                    host,
                    status,
                    action,
                });
            }
        }
        Ok(())
    }

    /// Sends an extend request (HSM) or extends locally (SPM); returns the size (MiB) and the
    /// request→reply time.
    pub fn extend_volume(
        &self,
        sd: SdUuid,
        vol: VolUuid,
        size_mib: u64,
        timeout: Duration,
    ) -> Result<(u64, Duration)> {
        let msg = ExtendMessage::new(sd, vol, size_mib)?;
        let t0 = Instant::now();
        if self.role.check().is_ok() {
            let h = SpmExtendHandler {
                role: self.role.clone(),
                domains: self.domains.clone(),
            };
            let size = h
                .extend(&Request {
                    host_id: self.host_id,
                    slot: 0,
                    msg,
                })
                .map_err(PoolServiceError::Invalid)?;
            return Ok((size, t0.elapsed()));
        }
        let hsm = self
            .hsm
            .lock()
            .expect("hsm")
            .clone()
            .ok_or(PoolServiceError::NotConnected(self.pool))?;
        let reply = hsm.extend(msg, timeout)?;
        if reply.size_mib == 0 {
            return Err(PoolServiceError::Invalid(format!(
                "the SPM refused to extend volume {vol} of domain {sd} to {size_mib} MiB"
            )));
        }
        Ok((reply.size_mib, t0.elapsed()))
    }

    pub fn spm_mailbox_stats(&self) -> Option<oxvirt_storage::mailbox::SpmMailboxStats> {
        self.spm_mailbox
            .lock()
            .expect("spm mailbox")
            .as_ref()
            .map(|m| m.stats())
    }
}

/// Membership changes of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DomainAction {
    Attach,
    Activate,
    Deactivate,
    Detach,
}

/// The SPM's answer to `xtnd`: grow the volume's file (never shrink), if still SPM.
struct SpmExtendHandler {
    role: Arc<SpmRole>,
    domains: Arc<Domains>,
}

impl ExtendHandler for SpmExtendHandler {
    fn extend(&self, req: &Request) -> std::result::Result<u64, String> {
        self.role.check()?;
        let dom = self.domains.domain(req.msg.sd).map_err(|e| chain(&e))?;
        let img = dom
            .images()
            .map_err(|e| chain(&e))?
            .into_iter()
            .find(|img| dom.meta_path(*img, req.msg.vol).exists())
            .ok_or_else(|| format!("volume {} not found in domain {}", req.msg.vol, req.msg.sd))?;
        let path = dom.volume_path(img, req.msg.vol);
        let want = req.msg.size_mib << 20;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let len = f
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if len < want {
            self.role.check()?;
            f.set_len(want).map_err(|e| format!("{}: {e}", path.display()))?;
            f.sync_all().map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(len.max(want) >> 20)
    }

    fn serving(&self) -> bool {
        self.role.check().is_ok()
    }
}

/// The thin-disk extender of this node: through the pool's mailbox when connected to a pool
/// and not the SPM; locally when SPM (after the SPM check). A disk that names no pool volume
/// (a bare file, tests) grows locally. A pool volume while no pool is connected (a restarted
/// node before the engine reconnects it) is refused, never grown here: only the SPM may.
pub struct PoolExtender {
    pub pools: Arc<PoolService>,
    /// How long to wait for the SPM's reply (retries happen inside).
    pub timeout: Duration,
}

impl ExtendRequester for PoolExtender {
    fn extend<'a>(&'a self, req: &'a ExtendRequest) -> ExtendFuture<'a> {
        Box::pin(async move {
            let Some(v) = req.volume else {
                return LocalSpmExtender.extend(req).await;
            };
            let Some(cp) = self.pools.current() else {
                return Err(ExtendError::Refused {
                    reason: format!(
                        "volume {} of domain {} belongs to a storage pool this node is not connected to",
                        v.vol, v.sd
                    ),
                });
            };
            let size_mib = ExtendMessage::mib_for(req.new_size);
            let timeout = self.timeout;
            let r = tokio::task::spawn_blocking(move || cp.extend_volume(v.sd, v.vol, size_mib, timeout))
                .await
                .map_err(|e| ExtendError::Io {
                    path: req.backing_file.clone(),
                    source: std::io::Error::other(e),
                })?;
            match r {
                Ok(_) => {
                    let len = std::fs::metadata(&req.backing_file)
                        .map_err(|source| ExtendError::Io {
                            path: req.backing_file.clone(),
                            source,
                        })?
                        .len();
                    if len < req.new_size {
                        return Err(ExtendError::Refused {
                            reason: format!(
                                "the volume is {len} bytes after the extend, {} were asked",
                                req.new_size
                            ),
                        });
                    }
                    Ok(())
                }
                Err(PoolServiceError::Mailbox(oxvirt_storage::mailbox::MailboxError::Timeout(_))) => {
                    Err(ExtendError::Timeout {
                        path: req.backing_file.clone(),
                    })
                }
                Err(e) => Err(ExtendError::Refused { reason: chain(&e) }),
            }
        })
    }
}

/// Whether the holder of a lease taken under generation `taken_under` of its host id may
/// still write what the lease guards: its host id is `status` in our view and now has
/// `generation` (when we know it). A host id re-acquired since (a newer generation) means its
/// host restarted and holds nothing of before; a dead or free one holds nothing either.
fn may_still_write(taken_under: u64, status: &oxvirt_lease::HostStatus, generation: Option<u64>) -> bool {
    use oxvirt_lease::HostStatus;
    if generation.is_some_and(|g| g > taken_under) {
        return false;
    }
    !matches!(status, HostStatus::Dead | HostStatus::Free)
}

#[cfg(test)]
mod lease_holder_tests {
    use super::may_still_write;
    use oxvirt_lease::HostStatus::*;

    #[test]
    fn a_lease_is_held_while_its_host_may_still_write() {
        // Live, failing (fencing itself, not yet safe) or not known yet: held.
        for s in [Live, Fail, Unknown] {
            assert!(may_still_write(3, &s, Some(3)), "{s:?}");
            assert!(may_still_write(3, &s, None), "{s:?}");
        }
        // Dead or free: its leases are anyone's.
        for s in [Dead, Free] {
            assert!(!may_still_write(3, &s, Some(3)), "{s:?}");
        }
        // The host restarted since it took the lease: whatever it does now, not with it.
        assert!(!may_still_write(3, &Live, Some(4)));
    }
}
