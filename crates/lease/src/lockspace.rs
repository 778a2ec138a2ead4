//! The node's handle on one lockspace: our host id (a delta lease), its background renewal, our
//! view of other hosts' liveness, the fencing notification, and Paxos resource leases held in
//! this lockspace. Threads, not async: a renewal thread and a fence-timer thread per lockspace,
//! each lease file served by its own I/O thread (see [`crate::io`]).
//!
//! # Timeline (N = io_timeout, M = fence margin, all on each host's own monotonic clock)
//!
//! ```text
//! holder H                                         another host T
//! t0   last successful renewal (timestamp written)
//!      renewals fail from here on (storage lost)
//! t0+6N  warning logged                            T last saw H's timestamp change at
//! t0+8N  FENCE: the fence channel fires and every  tT >= t0 (a write is seen after it
//!        ResourceLease reports invalid; the node   is issued).
//!        kills its lease holders (QEMU) and must
//!        have confirmed they exited by t0+8N+M.
//!                                                  tT+8N     H is "Fail" for T.
//!                                                  tT+8N+M   H is "Dead": T may take H's
//!                                                            resources and, after its own
//!                                                            wait, its host id.
//! ```
//!
//! Since tT >= t0, T acts no earlier than t0 + 8N + M, by which time H's holders are gone —
//! provided H confirms their exit within M and both clocks run at the same rate (a small drift
//! must fit in M). With sanlock's M = 60 s a watchdog reset backs this up; oxvirt's smaller M
//! holds only among oxvirt hosts that honour it (see [`crate::timeouts`]). Renewal stops at the
//! fence: a fenced lockspace must be acquired again (a new generation).
//!
//! A renewal that finds our delta lease overwritten by another host or corrupt fences at once.
//!
//! Taking over from a dead owner: `OwnerWait::Watch` reads the owner's delta lease every N/4
//! and counts 8N + M from the last change it saw itself (or from when it started watching, if
//! the owner was already silent), so a watcher takes a resource about 8N + M after its owner's
//! death: 10 s with N = 1 s, M = 2 s (see BENCHMARKS.md).
//!
//! ```no_run
//! use std::{path::Path, sync::Arc, time::Duration};
//! use oxvirt_lease::lockspace::AcquireOptions;
//! use oxvirt_lease::{Lockspace, LockspaceConfig, OwnerWait, SystemClock};
//!
//! let mut cfg = LockspaceConfig::new("3f1c2a9e-5b1d-4c53-9e4a-0c1b2d3e4f50", 1, "node-a", Duration::from_secs(10));
//! cfg.fence_margin = Duration::from_secs(60);
//! let dom_md = Path::new("/rhev/data-center/mnt/server:_export/3f1c2a9e-5b1d-4c53-9e4a-0c1b2d3e4f50/dom_md");
//! let ls = Lockspace::acquire(&dom_md.join("ids"), 0, cfg, Arc::new(SystemClock))?;
//! ls.on_fence(|ev| eprintln!("kill every QEMU holding a lease of {}: {:?}", ev.space, ev.reason));
//! let opts = AcquireOptions { wait: OwnerWait::Watch(Duration::from_secs(300)), ..AcquireOptions::default() };
//! let spm = ls.acquire_resource(&dom_md.join("leases"), 1 << 20, "SDM", opts)?;
//! let fencing_token = spm.lver();
//! # let _ = fencing_token;
//! spm.release()?;
//! ls.release()?;
//! # Ok::<(), oxvirt_lease::LeaseError>(())
//! ```
//!
//! Invariants: every lease write made through this handle happens while our delta lease is
//! valid (checked at each step, see [`crate::machine`]); a resource is held at most once per
//! lockspace handle; the fence fires at most once.

use std::collections::HashSet;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::clock::{Clock, Wake};
use crate::delta::{DeltaAcquire, DeltaParams, DeltaRelease, DeltaRenew, RenewError};
use crate::error::LeaseError;
use crate::format::{LeaderRecord, Name, ALIGN_SIZE, MAX_HOSTS, SECTOR_SIZE};
use crate::hosts::{HostObservation, HostStatus, HostTable};
use crate::io::{DirectFile, Region, SectorIo};
use crate::machine::{Cx, CxSource, Driver, NoLockspace};
use crate::paxos::{LeaseMode, OwnerWait, PaxosAcquire, PaxosAcquired, PaxosParams, PaxosRelease};
use crate::timeouts::Timeouts;

/// How to hold a host id in a lockspace.
#[derive(Debug, Clone)]
pub struct LockspaceConfig {
    /// The lockspace name (oVirt: the storage domain UUID).
    pub space_name: String,
    /// Our host id, 1..=max_hosts.
    pub host_id: u64,
    /// A name unique to this host (written into the delta lease; at most 48 bytes).
    pub host_name: String,
    /// N; all timeouts derive from it. Written to disk rounded up to whole seconds.
    pub io_timeout: Duration,
    /// M; see [`crate::timeouts`]. 60 s is sanlock's and the safe default.
    pub fence_margin: Duration,
    /// Host ids the lockspace holds (2000 in a sanlock-sized 1 MiB lockspace).
    pub max_hosts: u64,
    /// Take the host id at once if its record already carries our host name; safe only when
    /// no earlier incarnation of this host can still be writing.
    pub fast_reacquire: bool,
    /// Continue our own unexpired record with its generation, keeping the resources an earlier
    /// incarnation of this process took (see [`crate::delta`]). For a process whose children
    /// hold leases across its restarts.
    pub resume: bool,
}

impl LockspaceConfig {
    pub fn new(space_name: &str, host_id: u64, host_name: &str, io_timeout: Duration) -> LockspaceConfig {
        LockspaceConfig {
            space_name: space_name.to_string(),
            host_id,
            host_name: host_name.to_string(),
            io_timeout,
            fence_margin: crate::timeouts::SANLOCK_FENCE_MARGIN,
            max_hosts: MAX_HOSTS,
            fast_reacquire: false,
            resume: false,
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        Timeouts::new(self.io_timeout, self.fence_margin)
    }
}

/// Why our leases must no longer be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceReason {
    /// No successful renewal for 8N.
    RenewalFailed { since_last_success: Duration },
    /// Our delta lease was overwritten or became unreadable garbage.
    LeaseLost(String),
    /// The handle was dropped while resource leases were still held.
    Dropped,
}

/// Sent once when a lockspace's leases become invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceEvent {
    pub space: String,
    pub host_id: u64,
    pub generation: u64,
    pub reason: FenceReason,
    /// Our clock when the fence fired.
    pub at: Duration,
    /// Others may take our leases after this + M on their clocks (the 8N deadline).
    pub expired_at: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Held,
    Fenced,
    Released,
}

struct State {
    phase: Phase,
    record: LeaderRecord,
    last_success: Duration,
    prev_ok: bool,
    hosts: HostTable,
    fence: Option<FenceEvent>,
}

type FenceCallback = Box<dyn Fn(&FenceEvent) + Send + Sync>;

struct Inner {
    cfg: LockspaceConfig,
    space: Name,
    timeouts: Timeouts,
    io: Arc<dyn SectorIo>,
    clock: Arc<dyn Clock>,
    stop: Wake,
    state: Mutex<State>,
    fence_tx: Mutex<Vec<Sender<FenceEvent>>>,
    fence_cbs: Mutex<Vec<FenceCallback>>,
    held: Mutex<HashSet<String>>,
    /// Largest Paxos proposal timestamp used through this lockspace.
    last_proposal: std::sync::atomic::AtomicU64,
}

impl CxSource for Inner {
    fn with_cx(&self, now: Duration, f: &mut dyn FnMut(&Cx<'_>)) {
        let st = self.state.lock().expect("lockspace state");
        let valid_until = match st.phase {
            Phase::Held => st.last_success + self.timeouts.renewal_fail(),
            Phase::Fenced | Phase::Released => Duration::ZERO,
        };
        f(&Cx {
            now,
            valid_until: Some(valid_until),
            hosts: Some(&st.hosts),
        })
    }
}

impl Inner {
    fn driver<'a>(&'a self, resource: Option<&'a dyn SectorIo>, stop: &'a Wake) -> Driver<'a> {
        Driver {
            clock: &*self.clock,
            lockspace: Some(&*self.io),
            resource,
            stop,
        }
    }

    fn fence(&self, reason: FenceReason) {
        let now = self.clock.now();
        let ev = {
            let mut st = self.state.lock().expect("lockspace state");
            if st.phase != Phase::Held {
                return;
            }
            st.phase = Phase::Fenced;
            let ev = FenceEvent {
                space: self.cfg.space_name.clone(),
                host_id: self.cfg.host_id,
                generation: st.record.owner_generation,
                reason,
                at: now,
                expired_at: st.last_success + self.timeouts.renewal_fail(),
            };
            st.fence = Some(ev.clone());
            ev
        };
        tracing::error!(space = %ev.space, host_id = ev.host_id, generation = ev.generation, reason = ?ev.reason,
            "lockspace fenced: leases must no longer be used");
        for tx in self.fence_tx.lock().expect("fence senders").iter() {
            let _ = tx.send(ev.clone());
        }
        for cb in self.fence_cbs.lock().expect("fence callbacks").iter() {
            cb(&ev);
        }
    }

    fn renewal_loop(&self) {
        let retry = self.timeouts.owner_poll();
        let mut last_attempt = self.clock.now();
        loop {
            let next = {
                let st = self.state.lock().expect("lockspace state");
                if st.phase != Phase::Held {
                    return;
                }
                if st.prev_ok {
                    st.last_success + self.timeouts.renewal()
                } else {
                    last_attempt + retry
                }
            };
            if self.clock.sleep_until(next, &self.stop) {
                return;
            }
            last_attempt = self.clock.now();
            let (record, prev_ok) = {
                let st = self.state.lock().expect("lockspace state");
                (st.record.clone(), st.prev_ok)
            };
            let mut m = DeltaRenew::new(self.space, record, prev_ok, self.cfg.max_hosts, self.timeouts);
            let Ok(out) = self.driver(None, &self.stop).run(&mut m, self) else {
                return;
            };
            let mut fence = None;
            {
                let mut st = self.state.lock().expect("lockspace state");
                if let Some((t, buf)) = &out.observed {
                    st.hosts.observe(*t, buf);
                }
                match out.result {
                    Ok(acq) => {
                        st.record = acq.record;
                        st.last_success = acq.written_at;
                        st.prev_ok = true;
                    }
                    Err(RenewError::Io(e)) => {
                        st.prev_ok = false;
                        let late = self.clock.now().saturating_sub(st.last_success);
                        if late >= self.timeouts.renewal_warn() {
                            tracing::error!(space = %self.space, host_id = self.cfg.host_id, late_s = late.as_secs_f64(), error = %e,
                                "delta lease renewal failing; fencing at 8N");
                        } else {
                            tracing::warn!(space = %self.space, host_id = self.cfg.host_id, error = %e, "delta lease renewal failed");
                        }
                    }
                    Err(RenewError::Lost(e)) => fence = Some(FenceReason::LeaseLost(e.to_string())),
                    Err(RenewError::Expired) => {
                        fence = Some(FenceReason::RenewalFailed {
                            since_last_success: self.clock.now().saturating_sub(st.last_success),
                        })
                    }
                }
            }
            if let Some(r) = fence {
                self.fence(r);
                return;
            }
        }
    }

    fn fence_timer(&self) {
        loop {
            let deadline = {
                let st = self.state.lock().expect("lockspace state");
                if st.phase != Phase::Held {
                    return;
                }
                st.last_success + self.timeouts.renewal_fail()
            };
            if self.clock.sleep_until(deadline, &self.stop) {
                return;
            }
            let now = self.clock.now();
            let since = {
                let st = self.state.lock().expect("lockspace state");
                if st.phase != Phase::Held {
                    return;
                }
                let d = st.last_success + self.timeouts.renewal_fail();
                if now < d {
                    continue;
                }
                now - st.last_success
            };
            self.fence(FenceReason::RenewalFailed {
                since_last_success: since,
            });
            return;
        }
    }
}

/// Options of [`Lockspace::acquire_resource`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcquireOptions {
    pub mode: LeaseMode,
    pub wait: OwnerWait,
    /// Succeed only if the resource's current lver is this one.
    pub acquire_lver: Option<u64>,
}

impl Default for AcquireOptions {
    fn default() -> Self {
        AcquireOptions {
            mode: LeaseMode::Exclusive,
            wait: OwnerWait::NoWait,
            acquire_lver: None,
        }
    }
}

/// A host id held in a lockspace, renewed in the background until released or fenced.
pub struct Lockspace {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Lockspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lockspace")
            .field("space", &self.inner.cfg.space_name)
            .field("host_id", &self.inner.cfg.host_id)
            .finish()
    }
}

fn name(what: &'static str, s: &str) -> Result<Name, LeaseError> {
    Name::new(s).map_err(|source| LeaseError::Name {
        what,
        name: s.to_string(),
        source,
    })
}

impl Lockspace {
    /// Acquires host id `cfg.host_id` in the lockspace at `offset` of `path` and starts
    /// renewing it. Takes at least 2N when the host id is free and 8N + M or more when another
    /// host held it.
    pub fn acquire(
        path: &Path,
        offset: u64,
        cfg: LockspaceConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Lockspace, LeaseError> {
        let file = DirectFile::open(path, cfg.io_timeout).map_err(|source| LeaseError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Lockspace::acquire_with_io(Arc::new(Region::new(Arc::new(file), offset)), cfg, clock)
    }

    /// As [`Lockspace::acquire`], on any sector store holding the lockspace at offset 0.
    pub fn acquire_with_io(
        io: Arc<dyn SectorIo>,
        cfg: LockspaceConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Lockspace, LeaseError> {
        let space = name("lockspace", &cfg.space_name)?;
        let host_name = name("host", &cfg.host_name)?;
        if cfg.host_id == 0 || cfg.host_id > cfg.max_hosts || cfg.max_hosts > MAX_HOSTS {
            return Err(LeaseError::InvalidArgument(format!(
                "host id {} is outside 1..={} (max_hosts at most {MAX_HOSTS})",
                cfg.host_id, cfg.max_hosts
            )));
        }
        if cfg.io_timeout.is_zero() {
            return Err(LeaseError::InvalidArgument("io_timeout must be positive".into()));
        }
        let timeouts = cfg.timeouts();
        let stop = Wake::new();
        let driver = Driver {
            clock: &*clock,
            lockspace: Some(&*io),
            resource: None,
            stop: &stop,
        };
        let mut m = DeltaAcquire::new(DeltaParams {
            space,
            host_id: cfg.host_id,
            host_name,
            timeouts,
            fast_reacquire: cfg.fast_reacquire,
            resume: cfg.resume,
        });
        let acquired = driver
            .run(&mut m, &NoLockspace)
            .map_err(|_| LeaseError::Stopped {
                space: cfg.space_name.clone(),
                host_id: cfg.host_id,
            })??;
        tracing::info!(space = %space, host_id = cfg.host_id, generation = acquired.record.owner_generation, "host id acquired");
        let mut hosts = HostTable::new(space, cfg.max_hosts);
        match io.read(0, cfg.max_hosts as usize * SECTOR_SIZE) {
            Ok(buf) => hosts.observe(clock.now(), &buf),
            Err(e) => tracing::warn!(space = %space, error = %e, "first read of the lockspace failed"),
        }
        let inner = Arc::new(Inner {
            space,
            timeouts,
            io,
            clock,
            stop,
            state: Mutex::new(State {
                phase: Phase::Held,
                record: acquired.record,
                last_success: acquired.written_at,
                prev_ok: true,
                hosts,
                fence: None,
            }),
            fence_tx: Mutex::new(Vec::new()),
            fence_cbs: Mutex::new(Vec::new()),
            held: Mutex::new(HashSet::new()),
            last_proposal: std::sync::atomic::AtomicU64::new(0),
            cfg,
        });
        let mut threads = Vec::new();
        for (what, f) in [
            ("renew", Inner::renewal_loop as fn(&Inner)),
            ("fence", Inner::fence_timer),
        ] {
            let i = inner.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("lease-{what}:{}", inner.cfg.host_id))
                .spawn(move || f(&i));
            match spawned {
                Ok(t) => threads.push(t),
                Err(source) => {
                    // Without both threads the lease is unsafe to hold: stop and leave it to expire.
                    inner.stop.signal();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(LeaseError::Spawn {
                        what,
                        space: inner.cfg.space_name.clone(),
                        source,
                    });
                }
            }
        }
        Ok(Lockspace {
            inner,
            threads: Mutex::new(threads),
        })
    }

    pub fn space_name(&self) -> &str {
        &self.inner.cfg.space_name
    }

    pub fn host_id(&self) -> u64 {
        self.inner.cfg.host_id
    }

    /// The generation of our host id (incremented at every acquire).
    pub fn generation(&self) -> u64 {
        self.inner
            .state
            .lock()
            .expect("lockspace state")
            .record
            .owner_generation
    }

    pub fn timeouts(&self) -> Timeouts {
        self.inner.timeouts
    }

    /// True while our delta lease is renewed and not fenced.
    pub fn is_valid(&self) -> bool {
        let now = self.inner.clock.now();
        let st = self.inner.state.lock().expect("lockspace state");
        st.phase == Phase::Held && now < st.last_success + self.inner.timeouts.renewal_fail()
    }

    /// Our clock when our delta lease expires unless renewed (last success + 8N).
    pub fn valid_until(&self) -> Duration {
        let st = self.inner.state.lock().expect("lockspace state");
        st.last_success + self.inner.timeouts.renewal_fail()
    }

    /// The fence event, if the lockspace was fenced.
    pub fn fenced(&self) -> Option<FenceEvent> {
        self.inner.state.lock().expect("lockspace state").fence.clone()
    }

    /// The status of another host id, from our own observations at each renewal.
    pub fn host_status(&self, host_id: u64) -> HostStatus {
        let now = self.inner.clock.now();
        let st = self.inner.state.lock().expect("lockspace state");
        st.hosts
            .status(host_id, now, self.inner.cfg.host_id, &self.inner.timeouts)
    }

    /// What we observed of a host id (owner, generation, host name, timestamps).
    pub fn host_observation(&self, host_id: u64) -> Option<HostObservation> {
        self.inner
            .state
            .lock()
            .expect("lockspace state")
            .hosts
            .get(host_id)
            .cloned()
    }

    /// Host ids whose delta lease is or was in use, with their status.
    pub fn hosts(&self) -> Vec<(u64, HostStatus)> {
        let now = self.inner.clock.now();
        let st = self.inner.state.lock().expect("lockspace state");
        (1..=self.inner.cfg.max_hosts)
            .filter(|&h| st.hosts.get(h).is_some_and(|o| o.owner_generation > 0))
            .map(|h| {
                (
                    h,
                    st.hosts
                        .status(h, now, self.inner.cfg.host_id, &self.inner.timeouts),
                )
            })
            .collect()
    }

    /// A channel that receives the fence event (at once if already fenced).
    pub fn fence_channel(&self) -> Receiver<FenceEvent> {
        let (tx, rx) = mpsc::channel();
        let mut txs = self.inner.fence_tx.lock().expect("fence senders");
        if let Some(ev) = self.fenced() {
            let _ = tx.send(ev);
        }
        txs.push(tx);
        rx
    }

    /// Calls `f` from the fencing thread when the lockspace is fenced (at once if it already
    /// is). `f` should start killing lease holders and return quickly.
    pub fn on_fence(&self, f: impl Fn(&FenceEvent) + Send + Sync + 'static) {
        let mut cbs = self.inner.fence_cbs.lock().expect("fence callbacks");
        if let Some(ev) = self.fenced() {
            f(&ev);
        }
        cbs.push(Box::new(f));
    }

    /// Acquires the resource `resource_name` at `offset` of `path` (a 1 MiB sanlock resource
    /// area initialised by [`crate::direct::init_resource`]).
    pub fn acquire_resource(
        &self,
        path: &Path,
        offset: u64,
        resource_name: &str,
        opts: AcquireOptions,
    ) -> Result<ResourceLease, LeaseError> {
        let file = DirectFile::open(path, self.inner.cfg.io_timeout).map_err(|source| LeaseError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let io: Arc<dyn SectorIo> = Arc::new(Region::new(Arc::new(file), offset));
        self.acquire_resource_with_io(io, resource_name, opts)
    }

    /// As [`Lockspace::acquire_resource`], on any sector store holding the resource at offset 0.
    pub fn acquire_resource_with_io(
        &self,
        io: Arc<dyn SectorIo>,
        resource_name: &str,
        opts: AcquireOptions,
    ) -> Result<ResourceLease, LeaseError> {
        let resource = name("resource", resource_name)?;
        let key = format!("{}:{}", io.describe(), resource_name);
        if !self.inner.held.lock().expect("held").insert(key.clone()) {
            return Err(LeaseError::AlreadyHeld {
                resource: resource_name.to_string(),
            });
        }
        let result = self.run_acquire(&io, resource, opts);
        match result {
            Ok(acq) => {
                tracing::info!(space = %self.inner.space, resource = %resource, lver = acq.lver(), mode = ?acq.mode, "resource lease acquired");
                Ok(ResourceLease {
                    inner: self.inner.clone(),
                    io,
                    key,
                    resource,
                    held: acq,
                    released: false,
                })
            }
            Err(e) => {
                self.inner.held.lock().expect("held").remove(&key);
                Err(e)
            }
        }
    }

    fn run_acquire(
        &self,
        io: &Arc<dyn SectorIo>,
        resource: Name,
        opts: AcquireOptions,
    ) -> Result<PaxosAcquired, LeaseError> {
        let generation = {
            let st = self.inner.state.lock().expect("lockspace state");
            if st.phase != Phase::Held {
                return Err(LeaseError::Fenced {
                    space: self.inner.cfg.space_name.clone(),
                    host_id: self.inner.cfg.host_id,
                    reason: "the lockspace is no longer held".into(),
                });
            }
            st.record.owner_generation
        };
        let seed = self.inner.clock.now().as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32);
        let mut m = PaxosAcquire::new(PaxosParams {
            space: self.inner.space,
            resource,
            host_id: self.inner.cfg.host_id,
            generation,
            timeouts: self.inner.timeouts,
            mode: opts.mode,
            wait: opts.wait,
            acquire_lver: opts.acquire_lver,
            read_len: ALIGN_SIZE,
            max_ballots: 64,
            seed,
            min_timestamp: self.inner.last_proposal.load(std::sync::atomic::Ordering::SeqCst) + 1,
        });
        let r = self
            .inner
            .driver(Some(&**io), &self.inner.stop)
            .run(&mut m, &*self.inner);
        self.inner
            .last_proposal
            .fetch_max(m.max_proposed_timestamp(), std::sync::atomic::Ordering::SeqCst);
        r.map_err(|_| LeaseError::Stopped {
            space: self.inner.cfg.space_name.clone(),
            host_id: self.inner.cfg.host_id,
        })?
    }

    /// Number of resource leases held through this handle.
    pub fn held_resources(&self) -> usize {
        self.inner.held.lock().expect("held").len()
    }

    /// Stops renewing and frees our host id. Fails, changing nothing, while resource leases are
    /// held. After a fence there is nothing to free and this only stops the threads.
    pub fn release(&self) -> Result<(), LeaseError> {
        let count = self.held_resources();
        if count > 0 {
            return Err(LeaseError::ResourcesHeld {
                space: self.inner.cfg.space_name.clone(),
                count,
            });
        }
        self.stop_threads();
        let (phase, record) = {
            let mut st = self.inner.state.lock().expect("lockspace state");
            let phase = st.phase;
            if phase == Phase::Held {
                st.phase = Phase::Released;
            }
            (phase, st.record.clone())
        };
        if phase != Phase::Held {
            return Ok(());
        }
        let wake = Wake::new();
        let mut m = DeltaRelease::new(self.inner.space, record);
        let driver = Driver {
            clock: &*self.inner.clock,
            lockspace: Some(&*self.inner.io),
            resource: None,
            stop: &wake,
        };
        let freed = driver.run(&mut m, &NoLockspace).expect("release never sleeps")?;
        if !freed {
            tracing::warn!(space = %self.inner.space, host_id = self.inner.cfg.host_id, "host id was no longer ours at release");
        }
        tracing::info!(space = %self.inner.space, host_id = self.inner.cfg.host_id, "host id released");
        Ok(())
    }

    fn stop_threads(&self) {
        self.inner.stop.signal();
        for t in self.threads.lock().expect("threads").drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Lockspace {
    fn drop(&mut self) {
        let held = self.held_resources();
        if held > 0 {
            // Our holders would keep running without renewal: tell them to stop now.
            self.inner.fence(FenceReason::Dropped);
            self.stop_threads();
            return;
        }
        if let Err(e) = self.release() {
            tracing::warn!(space = %self.inner.space, error = %e, "releasing the host id on drop failed");
        }
    }
}

/// A Paxos resource lease held through a [`Lockspace`].
pub struct ResourceLease {
    inner: Arc<Inner>,
    io: Arc<dyn SectorIo>,
    key: String,
    resource: Name,
    held: PaxosAcquired,
    released: bool,
}

impl std::fmt::Debug for ResourceLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceLease")
            .field("resource", &self.resource)
            .field("mode", &self.held.mode)
            .field("lver", &self.held.lver())
            .finish()
    }
}

impl ResourceLease {
    /// The lease version: the fencing token, larger at every exclusive acquisition.
    pub fn lver(&self) -> u64 {
        self.held.lver()
    }

    pub fn mode(&self) -> LeaseMode {
        self.held.mode
    }

    pub fn resource_name(&self) -> String {
        self.resource.to_string()
    }

    /// The leader record as we committed it.
    pub fn leader(&self) -> &LeaderRecord {
        &self.held.leader
    }

    /// True while the lockspace is valid; once false the lease must not be used.
    pub fn is_valid(&self) -> bool {
        let now = self.inner.clock.now();
        let st = self.inner.state.lock().expect("lockspace state");
        st.phase == Phase::Held && now < st.last_success + self.inner.timeouts.renewal_fail()
    }

    /// Releases the lease on disk. The handle forgets it whatever happens; an error means the
    /// disk may still name us (another host then waits for our host id to die, or a later
    /// acquire by us takes it back).
    pub fn release(mut self) -> Result<(), LeaseError> {
        self.released = true;
        self.do_release()
    }

    fn do_release(&self) -> Result<(), LeaseError> {
        let generation = self
            .inner
            .state
            .lock()
            .expect("lockspace state")
            .record
            .owner_generation;
        let mut m = PaxosRelease::new(
            self.inner.space,
            self.resource,
            self.inner.cfg.host_id,
            generation,
            self.held.clone(),
        );
        let wake = Wake::new();
        let r = self
            .inner
            .driver(Some(&*self.io), &wake)
            .run(&mut m, &*self.inner)
            .expect("release never sleeps");
        self.inner.held.lock().expect("held").remove(&self.key);
        if r.is_ok() {
            tracing::info!(space = %self.inner.space, resource = %self.resource, lver = self.held.lver(), "resource lease released");
        }
        r
    }
}

impl Drop for ResourceLease {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.do_release() {
                tracing::warn!(resource = %self.resource, error = %e, "releasing the resource lease on drop failed");
            }
        }
    }
}
