//! Paxos resource leases: acquire (exclusive or shared) and release as sans-IO state machines,
//! following Disk Paxos (Gafni & Lamport) as sanlock implements it (`paxos_lease.c`,
//! `resource.c`), with one disk.
//!
//! A resource is a leader record (sector 0), a request record (sector 1) and one dblock per host
//! (sector 2 + host_id - 1). The leader caches the last committed ballot: `lver` (the fencing
//! token), the owner's host id and generation, and a timestamp (0 = free).
//!
//! Acquire (`PaxosAcquire`):
//!
//! ```text
//! ReadLease (leader + all dblocks)
//!   ├─ free / ours (this or an older generation) ──────────────────────────────► Ballot
//!   └─ owned by another host ─► OwnerDelta (read owner's delta lease)
//!         ├─ owner's host id free, or re-acquired by another generation ─────────► Ballot
//!         ├─ owner seen alive ─► (leader written by another host? OwnerDblock: released ─► Ballot)
//!         │                      └─ OwnedByOther
//!         ├─ unchanged for 8N(owner) + M since we last saw it change ────────────► Ballot
//!         └─ otherwise: NoWait ─► OwnedByOther;  wait ─► OwnerSleep ─► OwnerLeader
//!                (leader changed ─► ReadLease; unchanged ─► OwnerDelta)
//! Ballot (lver = leader.lver + 1, mbal above every mbal seen):
//!   BallotLeader ─► Phase1Write (mbal) ─► Phase1Read ─► Phase2Write (bal, inp) ─► Phase2Read ─► Commit
//!   A larger mbal or lver seen in a phase aborts: Backoff (random < 1 s) and retry with mbal + max_hosts.
//!   Someone committed our lver first: it is ours if it names us, else OwnedByOther.
//! Commit writes the leader. Then, shared: ShHostBlock (mode block SHARED, dblock RELEASED) and
//!   release the leader; exclusive: check every SHARED mode block seen in phase 1 — clear those of
//!   dead hosts, back out with SharedHeld if any holder is alive.
//! Any failure after phase 2 started retracts: our dblock is marked RELEASED and a leader naming
//!   us that we wrote is freed, so a ballot another host completes with our value cannot leave a
//!   lease owned by nobody who knows it.
//! ```
//!
//! Invariants: a ballot never proceeds past a dblock or leader whose checksum is bad (it is
//! unknown, not empty); every write first checks the host's delta lease is still valid.

use std::time::Duration;

use crate::error::LeaseError;
use crate::format::{
    ballot_read_len, dblock_offset, delta_offset, host_block_sector, Dblock, LeaderRecord, ModeBlock, Name,
    DBLOCK_FL_RELEASED, LFL_SHORT_HOLD, PAXOS_MAGIC, SECTOR_SIZE,
};
use crate::hosts::HostObservation;
use crate::machine::{Area, Cx, Input, IoOp, Machine, Step};
use crate::timeouts::Timeouts;

/// Exclusive (one holder) or shared (any number of holders, no exclusive one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseMode {
    Exclusive,
    Shared,
}

/// What to do when the resource's owner is not proven alive yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerWait {
    /// Answer `OwnedByOther` at once unless the owner is already known to be dead.
    NoWait,
    /// While the owner shows no sign of life, wait until it is dead (then take the lease);
    /// this can take up to 8N + M. An owner seen renewing still answers `OwnedByOther` at once,
    /// as in sanlock.
    UntilDead,
    /// Watch the owner for up to this long, reading its delta lease every N/4 (at most 1 s),
    /// and take the lease as soon as it is dead; `OwnedByOther` if it is still alive by then.
    /// Watching ourselves pins the owner's last renewal to within N/4 instead of the 2N of the
    /// renewal thread's view, so a takeover happens about 8N + M after the owner's death.
    Watch(Duration),
}

/// Who acquires which resource, how.
#[derive(Debug, Clone)]
pub struct PaxosParams {
    pub space: Name,
    pub resource: Name,
    pub host_id: u64,
    pub generation: u64,
    pub timeouts: Timeouts,
    pub mode: LeaseMode,
    pub wait: OwnerWait,
    /// Fail with `LverMismatch` unless the leader currently has this lver.
    pub acquire_lver: Option<u64>,
    /// Bytes to read for the leader and all dblocks (1 MiB for a sanlock-sized resource; less in
    /// simulations with few hosts). Grown automatically if the leader says more hosts exist.
    pub read_len: usize,
    /// Give up with `Contended` after this many aborted ballots.
    pub max_ballots: u32,
    /// Seed of the random back-off between aborted ballots.
    pub seed: u64,
    /// Our proposals use timestamps (`inp3`) of at least this, so that they differ from every
    /// proposal this host made in earlier acquires (see [`PaxosAcquire::max_proposed_timestamp`]).
    pub min_timestamp: u64,
}

/// A resource lease we hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaxosAcquired {
    pub mode: LeaseMode,
    /// The leader as committed (for a shared lease: as committed before it was freed again).
    pub leader: LeaderRecord,
    /// Our dblock as last written.
    pub dblock: Dblock,
}

impl PaxosAcquired {
    /// The fencing token.
    pub fn lver(&self) -> u64 {
        self.leader.lver
    }
}

fn leader_object(res: &Name) -> String {
    format!("the leader of resource {res}")
}

fn lease_object(res: &Name) -> String {
    format!("resource {res}")
}

fn dblock_object(res: &Name, host_id: u64) -> String {
    format!("the dblock of host {host_id} in resource {res}")
}

/// Decodes and verifies a Paxos leader of resource `resource` in lockspace `space`.
pub fn decode_leader(sector: &[u8], space: &Name, resource: &Name) -> Result<LeaderRecord, LeaseError> {
    let obj = || leader_object(resource);
    let rec = LeaderRecord::decode_checked(sector, PAXOS_MAGIC).map_err(|p| LeaseError::bad(obj(), p))?;
    rec.check_space(space).map_err(|p| LeaseError::bad(obj(), p))?;
    rec.check_resource(resource)
        .map_err(|p| LeaseError::bad(obj(), p))?;
    Ok(rec)
}

/// Small deterministic PRNG (splitmix64) for ballot back-off.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abort {
    Mbal,
    Lver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AState {
    Init,
    ReadLease,
    OwnerDelta,
    OwnerSleep,
    OwnerLeader,
    OwnerDblock,
    BallotLeader,
    Backoff,
    Phase1Write,
    Phase1Read,
    Phase2Write,
    Phase2Read,
    Commit,
    ShHostBlock,
    ExSharedScan,
    ExSharedDelta,
    ExSharedClear,
    Release(RelStep),
    Retract(RelStep),
    Done,
}

/// Steps of freeing the leader (shared acquire, backing out, retracting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelStep {
    HostBlock,
    ReadLeader,
    WriteLeader,
}

/// Acquires a resource lease; see the module docs for the states.
#[derive(Debug)]
pub struct PaxosAcquire {
    p: PaxosParams,
    state: AState,
    rng: Rng,
    cur: LeaderRecord,
    max_mbal: u64,
    /// Largest lver in any dblock: a ballot for lver L means L - 1 was decided, so when a late
    /// leader write left the leader behind, ballots start at this lver, not below it.
    max_lver: u64,
    /// The last abort saw a larger lver: re-read the whole lease before the next ballot.
    restart: bool,
    next_lver: u64,
    our_mbal: u64,
    copy_cur: bool,
    ballots: u32,
    dblock: Dblock,
    phase2: bool,
    /// Owner wait: when the owner was last seen alive, the timestamp seen then, our snapshot of
    /// its host status.
    wait_start: Duration,
    /// When the current read of the owner's delta lease was issued: evidence that the owner
    /// did not renew holds only up to then.
    owner_read_at: Duration,
    last_ts: Option<u64>,
    owner_hs: Option<HostObservation>,
    /// When this acquire started (bounds `OwnerWait::Watch`).
    started_at: Duration,
    /// The owner's timestamp in the read that proved it alive.
    seen_ts: u64,
    /// SHARED mode blocks seen in phase 1: (host id, generation).
    shared_seen: Vec<(u64, u64)>,
    shared_idx: usize,
    shared_live: Vec<u64>,
    committed: Option<LeaderRecord>,
    /// (generation, timestamp) of the values we proposed in this acquire. A decided value naming
    /// us that is not among them is a holding of ours from an earlier acquire (possible when a
    /// late leader write made the leader go back a version); it must not be handed out again.
    proposals: Vec<(u64, u64)>,
    /// The result to return once a release/retract sequence finishes.
    pending: Option<Result<PaxosAcquired, LeaseError>>,
}

type AStep = Step<Result<PaxosAcquired, LeaseError>>;

impl PaxosAcquire {
    pub fn new(p: PaxosParams) -> PaxosAcquire {
        let rng = Rng::new(p.seed ^ p.host_id.rotate_left(17) ^ p.generation);
        PaxosAcquire {
            p,
            state: AState::Init,
            rng,
            cur: LeaderRecord::default(),
            max_mbal: 0,
            max_lver: 0,
            restart: false,
            next_lver: 0,
            our_mbal: 0,
            copy_cur: false,
            ballots: 0,
            dblock: Dblock::default(),
            phase2: false,
            wait_start: Duration::ZERO,
            owner_read_at: Duration::ZERO,
            last_ts: None,
            owner_hs: None,
            started_at: Duration::ZERO,
            seen_ts: 0,
            shared_seen: Vec::new(),
            shared_idx: 0,
            shared_live: Vec::new(),
            committed: None,
            proposals: Vec::new(),
            pending: None,
        }
    }

    /// The largest timestamp this acquire proposed; pass more than it as `min_timestamp` to
    /// the next acquire of this host.
    pub fn max_proposed_timestamp(&self) -> u64 {
        self.proposals.iter().map(|p| p.1).max().unwrap_or(0)
    }

    /// The owner was just seen alive: keep watching it (`OwnerWait::Watch`) or give up.
    fn owner_alive(&mut self, cx: &Cx<'_>) -> AStep {
        if let OwnerWait::Watch(limit) = self.p.wait {
            if cx.now < self.started_at + limit {
                // Its last renewal landed before we saw it, so counting from now is safe.
                self.last_ts = Some(self.seen_ts);
                self.wait_start = cx.now;
                self.owner_hs = None;
                self.state = AState::OwnerSleep;
                return Step::SleepUntil(cx.now + self.p.timeouts.watch_poll());
            }
        }
        let e = self.owned(&self.cur.clone());
        self.finish_err(cx, e)
    }

    fn is_fresh(&self, generation: u64, timestamp: u64) -> bool {
        self.proposals.contains(&(generation, timestamp))
    }

    /// The decided value of `leader.lver` names us but from an earlier acquire: move on to the
    /// next lver.
    fn skip_stale_own(&mut self, cx: &Cx<'_>, leader: LeaderRecord) -> AStep {
        tracing::info!(resource = %self.p.resource, lver = leader.lver, "lver was decided for an earlier holding of ours; using the next one");
        self.max_mbal = self.max_mbal.max(self.our_mbal);
        self.cur = leader;
        self.phase2 = false;
        self.start_ballots(cx)
    }

    fn done(&mut self, r: Result<PaxosAcquired, LeaseError>) -> AStep {
        self.state = AState::Done;
        Step::Done(r)
    }

    fn fenced(&self) -> LeaseError {
        LeaseError::Fenced {
            space: self.p.space.to_string(),
            host_id: self.p.host_id,
            reason: "its delta lease expired during the acquire".into(),
        }
    }

    fn owned(&self, l: &LeaderRecord) -> LeaseError {
        LeaseError::OwnedByOther {
            resource: self.p.resource.to_string(),
            host_id: l.owner_id,
            generation: l.owner_generation,
            lver: l.lver,
        }
    }

    fn read_lease(&mut self) -> AStep {
        self.state = AState::ReadLease;
        Step::Io(IoOp::Read {
            area: Area::Resource,
            offset: 0,
            len: self.p.read_len,
        })
    }

    fn read_leader(&mut self, next: AState) -> AStep {
        self.state = next;
        Step::Io(IoOp::Read {
            area: Area::Resource,
            offset: 0,
            len: SECTOR_SIZE,
        })
    }

    fn read_owner_delta(&mut self, cx: &Cx<'_>) -> AStep {
        self.owner_read_at = cx.now;
        self.state = AState::OwnerDelta;
        Step::Io(IoOp::Read {
            area: Area::Lockspace,
            offset: delta_offset(self.cur.owner_id),
            len: SECTOR_SIZE,
        })
    }

    fn write_host_block(&mut self, next: AState, dblock: Dblock, mode: ModeBlock) -> AStep {
        self.state = next;
        Step::Io(IoOp::Write {
            area: Area::Resource,
            offset: dblock_offset(self.p.host_id),
            data: host_block_sector(&dblock, &mode),
        })
    }

    /// Parses the whole-lease read: leader, max mbal. Returns None if a longer read is needed.
    fn parse_lease(&mut self, buf: &[u8]) -> Result<Option<LeaderRecord>, LeaseError> {
        let leader = decode_leader(&buf[..SECTOR_SIZE], &self.p.space, &self.p.resource)?;
        if leader.num_hosts < self.p.host_id {
            return Err(LeaseError::bad(
                leader_object(&self.p.resource),
                crate::format::RecordProblem::NumHosts {
                    num_hosts: leader.num_hosts,
                    host_id: self.p.host_id,
                },
            ));
        }
        let need = ballot_read_len(leader.num_hosts);
        if buf.len() < need {
            self.p.read_len = need;
            return Ok(None);
        }
        let mut max_mbal = 0;
        for q in 0..leader.num_hosts {
            let off = dblock_offset(q + 1) as usize;
            let bk = Dblock::decode_checked(&buf[off..off + SECTOR_SIZE])
                .map_err(|p| LeaseError::bad(dblock_object(&self.p.resource, q + 1), p))?;
            max_mbal = max_mbal.max(bk.mbal);
            self.max_lver = self.max_lver.max(bk.lver);
            if q + 1 == self.p.host_id {
                // Where our previous ballots left off (Disk Paxos: a restarted processor reads
                // its own block first).
                self.dblock = bk;
            }
        }
        self.max_mbal = max_mbal;
        Ok(Some(leader))
    }

    fn start_ballots(&mut self, cx: &Cx<'_>) -> AStep {
        self.next_lver = (self.cur.lver + 1).max(self.max_lver);
        let max_hosts = self.cur.max_hosts.max(1);
        self.our_mbal = if self.max_mbal == 0 {
            self.p.host_id
        } else {
            self.max_mbal - self.max_mbal % max_hosts + max_hosts + self.p.host_id
        };
        self.copy_cur = true;
        self.retry_ballot(cx)
    }

    fn retry_ballot(&mut self, cx: &Cx<'_>) -> AStep {
        if self.copy_cur {
            self.copy_cur = false;
            let tmp = self.cur.clone();
            self.check_leader_then_ballot(cx, tmp)
        } else {
            self.read_leader(AState::BallotLeader)
        }
    }

    fn check_leader_then_ballot(&mut self, cx: &Cx<'_>, tmp: LeaderRecord) -> AStep {
        if tmp.lver == self.next_lver {
            // Another host committed this lver, maybe with our value.
            if tmp.owner_id == self.p.host_id && tmp.owner_generation == self.p.generation {
                if !self.is_fresh(tmp.owner_generation, tmp.timestamp) {
                    return self.skip_stale_own(cx, tmp);
                }
                self.committed = Some(tmp);
                self.phase2 = false;
                return self.after_commit(cx);
            }
            let e = self.owned(&tmp);
            return self.finish_err(cx, e);
        }
        if tmp.lver > self.next_lver || tmp != self.cur {
            if tmp.lver > self.next_lver {
                // Our lver was decided (and superseded); our old value can no longer win.
                self.phase2 = false;
            }
            return self.read_lease();
        }
        if cx.expired() {
            let e = self.fenced();
            return self.finish_err(cx, e);
        }
        let prev = self.dblock;
        self.dblock = if prev.lver == self.next_lver && prev.inp != 0 && prev.bal != 0 {
            // A new ballot for the same lver keeps the value we last accepted for it (Disk
            // Paxos changes only mbal in phase 1): it may have been chosen already.
            Dblock {
                mbal: self.our_mbal,
                checksum: 0,
                flags: 0,
                ..prev
            }
        } else {
            Dblock {
                mbal: self.our_mbal,
                lver: self.next_lver,
                ..Dblock::default()
            }
        };
        let d = self.dblock;
        self.write_host_block(AState::Phase1Write, d, ModeBlock::default())
    }

    fn read_all(&mut self, next: AState) -> AStep {
        self.state = next;
        Step::Io(IoOp::Read {
            area: Area::Resource,
            offset: 0,
            len: ballot_read_len(self.cur.num_hosts),
        })
    }

    /// Checks every dblock against our ballot; returns the block with the largest bal and an
    /// input, or an abort.
    fn scan(&mut self, buf: &[u8]) -> Result<Result<Dblock, Abort>, LeaseError> {
        let mut bk_max = Dblock::default();
        for q in 0..self.cur.num_hosts {
            let off = dblock_offset(q + 1) as usize;
            let sector = &buf[off..off + SECTOR_SIZE];
            let bk = Dblock::decode_checked(sector)
                .map_err(|p| LeaseError::bad(dblock_object(&self.p.resource, q + 1), p))?;
            if bk.lver < self.dblock.lver {
                continue;
            }
            if bk.lver > self.dblock.lver {
                return Ok(Err(Abort::Lver));
            }
            self.max_mbal = self.max_mbal.max(bk.mbal);
            self.max_lver = self.max_lver.max(bk.lver);
            if bk.mbal > self.dblock.mbal {
                return Ok(Err(Abort::Mbal));
            }
            if bk.inp == 0 || bk.bal == 0 {
                continue;
            }
            if bk.bal > bk_max.bal {
                bk_max = bk;
            }
        }
        Ok(Ok(bk_max))
    }

    fn abort(&mut self, cx: &Cx<'_>, why: Abort) -> AStep {
        self.ballots += 1;
        self.restart = why == Abort::Lver;
        tracing::debug!(resource = %self.p.resource, lver = self.next_lver, mbal = self.our_mbal, ?why, "ballot aborted");
        if self.ballots >= self.p.max_ballots {
            let e = LeaseError::Contended {
                resource: self.p.resource.to_string(),
                lver: self.next_lver,
            };
            return self.finish_err(cx, e);
        }
        let ceiling = self.p.timeouts.owner_poll().as_micros() as u64;
        let delay = Duration::from_micros(self.rng.below(ceiling.max(1)));
        self.state = AState::Backoff;
        Step::SleepUntil(cx.now + delay)
    }

    /// Ends with an error, retracting first if our value may have been chosen.
    fn finish_err(&mut self, cx: &Cx<'_>, e: LeaseError) -> AStep {
        if self.phase2 || self.committed.is_some() {
            self.retract(cx, e)
        } else {
            self.done(Err(e))
        }
    }

    fn retract(&mut self, cx: &Cx<'_>, e: LeaseError) -> AStep {
        tracing::debug!(resource = %self.p.resource, error = %e, "retracting our ballot");
        self.pending = Some(Err(e));
        self.phase2 = false;
        if cx.expired() {
            // A fenced host must not touch the lease; others will treat us as dead.
            let r = self.pending.take().expect("pending");
            return self.done(r);
        }
        let mut d = self.dblock;
        d.flags |= DBLOCK_FL_RELEASED;
        self.write_host_block(AState::Retract(RelStep::HostBlock), d, ModeBlock::default())
    }

    fn after_commit(&mut self, cx: &Cx<'_>) -> AStep {
        match self.p.mode {
            LeaseMode::Shared => {
                if cx.expired() {
                    let e = self.fenced();
                    return self.retract(cx, e);
                }
                let mut d = self.dblock;
                d.flags |= DBLOCK_FL_RELEASED;
                self.dblock = d;
                self.write_host_block(AState::ShHostBlock, d, ModeBlock::shared(self.p.generation))
            }
            LeaseMode::Exclusive => {
                // Shared holders are found after the commit, not during the ballot: the ballot's
                // scan may have stopped early, or another host may have committed our value. Once
                // the leader names us, no new shared holder can appear, so one read suffices.
                self.read_all(AState::ExSharedScan)
            }
        }
    }

    /// Exclusive acquire: checks the next holder of a SHARED mode block.
    fn next_shared(&mut self, cx: &Cx<'_>) -> AStep {
        if self.shared_idx >= self.shared_seen.len() {
            if !self.shared_live.is_empty() {
                let e = LeaseError::SharedHeld {
                    resource: self.p.resource.to_string(),
                    hosts: self.shared_live.clone(),
                };
                return self.retract(cx, e);
            }
            let acquired = PaxosAcquired {
                mode: LeaseMode::Exclusive,
                leader: self.committed.clone().expect("committed"),
                dblock: self.dblock,
            };
            return self.done(Ok(acquired));
        }
        let (host, _) = self.shared_seen[self.shared_idx];
        if cx.hosts.is_none() {
            // No liveness view (outside a lockspace): every holder counts as alive.
            self.shared_live.push(host);
            self.shared_idx += 1;
            return self.next_shared(cx);
        }
        // Look at the holder's delta lease now rather than trusting a possibly stale view.
        self.owner_read_at = cx.now;
        self.state = AState::ExSharedDelta;
        Step::Io(IoOp::Read {
            area: Area::Lockspace,
            offset: delta_offset(host),
            len: SECTOR_SIZE,
        })
    }

    /// Decides whether shared holder `host` (mode block generation `generation`) is gone, from
    /// its delta lease as just read and our observations of it.
    fn shared_holder_dead(&self, cx: &Cx<'_>, host: u64, generation: u64, rec: &LeaderRecord) -> bool {
        if rec.is_free() || rec.owner_generation > generation {
            // It released its host id (after its leases) or another incarnation took it over.
            return true;
        }
        let Some(h) = cx.hosts.and_then(|t| t.get(host)) else {
            return false;
        };
        !h.lease_bad
            && h.owner_generation == rec.owner_generation
            && h.timestamp == rec.timestamp
            && self.owner_read_at.saturating_sub(h.last_live)
                > self.p.timeouts.other_host_dead(rec.io_timeout)
    }

    /// Frees the leader if we wrote it naming us (sanlock's `paxos_lease_release`), then ends
    /// with the pending result. `last` is the leader we expect on disk, if known.
    fn release_leader_read(&mut self, retract: bool) -> AStep {
        let s = if retract {
            AState::Retract(RelStep::ReadLeader)
        } else {
            AState::Release(RelStep::ReadLeader)
        };
        self.read_leader(s)
    }

    fn release_leader_decide(
        &mut self,
        cx: &Cx<'_>,
        buf: Result<Vec<u8>, crate::io::IoError>,
        retract: bool,
    ) -> AStep {
        let leader = match buf
            .map_err(|e| LeaseError::io_read(leader_object(&self.p.resource), e))
            .and_then(|b| decode_leader(&b, &self.p.space, &self.p.resource))
        {
            Ok(l) => l,
            Err(e) => return self.end_release(Some(e)),
        };
        match leader_release_plan(
            &leader,
            self.committed.as_ref(),
            self.p.host_id,
            self.p.generation,
        ) {
            ReleasePlan::Skip => self.end_release(None),
            ReleasePlan::Mismatch(reason) => {
                let e = LeaseError::ReleaseMismatch {
                    resource: self.p.resource.to_string(),
                    reason,
                };
                self.end_release(Some(e))
            }
            ReleasePlan::Write(free) => {
                if cx.expired() {
                    let e = self.fenced();
                    return self.end_release(Some(e));
                }
                let mut free = free;
                free.write_id = self.p.host_id;
                free.write_generation = self.p.generation;
                free.write_timestamp = cx.now_secs();
                self.state = if retract {
                    AState::Retract(RelStep::WriteLeader)
                } else {
                    AState::Release(RelStep::WriteLeader)
                };
                Step::Io(IoOp::Write {
                    area: Area::Resource,
                    offset: 0,
                    data: free.to_sector(),
                })
            }
        }
    }

    /// Finishes a release sequence. For a shared acquire, a failed release of the leader turns
    /// the success into an error after undoing our shared mode block.
    fn end_release(&mut self, err: Option<LeaseError>) -> AStep {
        let pending = self.pending.take().expect("pending result");
        match (pending, err) {
            (Ok(acq), Some(e)) => {
                // Shared acquire could not free the leader: back out entirely.
                self.committed = Some(acq.leader.clone());
                self.pending = Some(Err(e));
                let mut d = self.dblock;
                d.flags |= DBLOCK_FL_RELEASED;
                self.write_host_block(AState::Retract(RelStep::HostBlock), d, ModeBlock::default())
            }
            (r, e) => {
                if let Some(e) = e {
                    tracing::warn!(resource = %self.p.resource, error = %e, "could not free the leader while backing out");
                }
                self.done(r)
            }
        }
    }
}

/// What releasing the leader should do, given the leader on disk and the one we committed.
#[derive(Debug)]
pub(crate) enum ReleasePlan {
    /// Another host wrote the leader last: leave it (our RELEASED dblock tells them).
    Skip,
    /// The leader is not the one we hold; explain.
    Mismatch(String),
    /// Write this (timestamp 0) record.
    Write(LeaderRecord),
}

pub(crate) fn leader_release_plan(
    disk: &LeaderRecord,
    last: Option<&LeaderRecord>,
    host_id: u64,
    generation: u64,
) -> ReleasePlan {
    if disk.write_id != host_id {
        return ReleasePlan::Skip;
    }
    let last = last.unwrap_or(disk);
    if disk.lver != last.lver {
        return ReleasePlan::Mismatch(format!("lver is {} on disk, we hold {}", disk.lver, last.lver));
    }
    if disk.is_free() {
        return ReleasePlan::Skip;
    }
    if disk.owner_id != host_id || disk.owner_generation != generation {
        return ReleasePlan::Mismatch(format!(
            "owned by host {} generation {} on disk",
            disk.owner_id, disk.owner_generation
        ));
    }
    if disk != &last.sealed() && disk != last {
        return ReleasePlan::Mismatch("the leader changed since we acquired it".into());
    }
    let mut free = disk.clone();
    free.timestamp = 0;
    free.flags &= !LFL_SHORT_HOLD;
    ReleasePlan::Write(free)
}

impl Machine for PaxosAcquire {
    type Output = Result<PaxosAcquired, LeaseError>;

    fn resume(&mut self, cx: &Cx<'_>, input: Input) -> AStep {
        match (self.state, input) {
            (AState::Init, Input::Start) => {
                self.started_at = cx.now;
                if self.p.host_id == 0 || self.p.generation == 0 {
                    return self.done(Err(LeaseError::InvalidArgument(
                        "a resource is acquired by a host id with a generation".into(),
                    )));
                }
                if cx.expired() {
                    let e = self.fenced();
                    return self.done(Err(e));
                }
                self.read_lease()
            }
            (AState::ReadLease, Input::Read(r)) => {
                let buf = match r {
                    Ok(b) => b,
                    Err(e) => {
                        return self.finish_err(cx, LeaseError::io_read(lease_object(&self.p.resource), e))
                    }
                };
                let leader = match self.parse_lease(&buf) {
                    Ok(Some(l)) => l,
                    Ok(None) => return self.read_lease(),
                    Err(e) => return self.finish_err(cx, e),
                };
                self.cur = leader.clone();
                if let Some(want) = self.p.acquire_lver {
                    if leader.lver != want {
                        let e = LeaseError::LverMismatch {
                            resource: self.p.resource.to_string(),
                            expected: want,
                            found: leader.lver,
                        };
                        return self.finish_err(cx, e);
                    }
                }
                if leader.is_free()
                    || (leader.owner_id == self.p.host_id && leader.owner_generation <= self.p.generation)
                {
                    return self.start_ballots(cx);
                }
                // Owned by another host: is it alive?
                let hs = cx.hosts.and_then(|t| t.get(leader.owner_id)).cloned();
                match &hs {
                    Some(h)
                        if h.owner_id == leader.owner_id && h.owner_generation == leader.owner_generation =>
                    {
                        self.wait_start = h.last_live;
                        self.last_ts = Some(h.timestamp);
                    }
                    _ => {
                        self.wait_start = cx.now;
                        self.last_ts = None;
                    }
                }
                self.owner_hs = hs;
                self.read_owner_delta(cx)
            }
            (AState::OwnerDelta, Input::Read(r)) => {
                let owner = self.cur.owner_id;
                let obj = format!("the delta lease of host {owner} in lockspace {}", self.p.space);
                let rec = match r
                    .map_err(|e| LeaseError::io_read(obj, e))
                    .and_then(|b| crate::delta::decode_delta(&b, &self.p.space, owner))
                {
                    Ok(rec) => rec,
                    Err(e) => return self.finish_err(cx, e),
                };
                if rec.is_free() {
                    tracing::info!(resource = %self.p.resource, owner, "owner's host id is free");
                    return self.start_ballots(cx);
                }
                if rec.owner_id != self.cur.owner_id || rec.owner_generation > self.cur.owner_generation {
                    tracing::info!(resource = %self.p.resource, owner, "owner's host id now has another generation");
                    return self.start_ballots(cx);
                }
                let Some(last_ts) = self.last_ts else {
                    self.last_ts = Some(rec.timestamp);
                    self.state = AState::OwnerSleep;
                    return Step::SleepUntil(cx.now + self.p.timeouts.watch_poll());
                };
                let seen_alive_last_check = self
                    .owner_hs
                    .as_ref()
                    .is_some_and(|h| h.last_check == h.last_live);
                if rec.timestamp != last_ts || seen_alive_last_check {
                    self.seen_ts = rec.timestamp;
                    if self.cur.write_id != self.cur.owner_id {
                        self.state = AState::OwnerDblock;
                        return Step::Io(IoOp::Read {
                            area: Area::Resource,
                            offset: dblock_offset(owner),
                            len: SECTOR_SIZE,
                        });
                    }
                    return self.owner_alive(cx);
                }
                let dead_after = self.p.timeouts.other_host_dead(rec.io_timeout);
                if self.owner_read_at.saturating_sub(self.wait_start) > dead_after {
                    tracing::info!(resource = %self.p.resource, owner, generation = self.cur.owner_generation,
                        "owner is dead; taking the lease");
                    return self.start_ballots(cx);
                }
                let give_up = match self.p.wait {
                    OwnerWait::NoWait => true,
                    OwnerWait::UntilDead => false,
                    OwnerWait::Watch(limit) => cx.now >= self.started_at + limit,
                };
                if give_up {
                    let e = self.owned(&self.cur.clone());
                    return self.finish_err(cx, e);
                }
                self.state = AState::OwnerSleep;
                Step::SleepUntil(cx.now + self.p.timeouts.watch_poll())
            }
            (AState::OwnerSleep, Input::Woke) => {
                if cx.expired() {
                    let e = self.fenced();
                    return self.finish_err(cx, e);
                }
                self.read_leader(AState::OwnerLeader)
            }
            (AState::OwnerLeader, Input::Read(r)) => {
                let leader = match r
                    .map_err(|e| LeaseError::io_read(leader_object(&self.p.resource), e))
                    .and_then(|b| decode_leader(&b, &self.p.space, &self.p.resource))
                {
                    Ok(l) => l,
                    Err(e) => return self.finish_err(cx, e),
                };
                if leader != self.cur {
                    return self.read_lease();
                }
                self.read_owner_delta(cx)
            }
            (AState::OwnerDblock, Input::Read(r)) => {
                let released = r.map(|b| Dblock::decode(&b).released()).unwrap_or(false);
                if released {
                    tracing::info!(resource = %self.p.resource, owner = self.cur.owner_id, "owner released; leader was written by another host");
                    return self.start_ballots(cx);
                }
                self.owner_alive(cx)
            }
            (AState::BallotLeader, Input::Read(r)) => {
                let tmp = match r
                    .map_err(|e| LeaseError::io_read(leader_object(&self.p.resource), e))
                    .and_then(|b| decode_leader(&b, &self.p.space, &self.p.resource))
                {
                    Ok(l) => l,
                    Err(e) => return self.finish_err(cx, e),
                };
                self.check_leader_then_ballot(cx, tmp)
            }
            (AState::Backoff, Input::Woke) => {
                let mh = self.cur.max_hosts.max(1);
                let above = self.max_mbal - self.max_mbal % mh + mh + self.p.host_id;
                self.our_mbal = (self.our_mbal + mh).max(above);
                if self.restart {
                    self.restart = false;
                    return self.read_lease();
                }
                self.retry_ballot(cx)
            }
            (AState::Phase1Write, Input::Wrote(r)) => {
                if let Err(e) = r {
                    let e = LeaseError::io_write(dblock_object(&self.p.resource, self.p.host_id), e);
                    return self.finish_err(cx, e);
                }
                self.read_all(AState::Phase1Read)
            }
            (AState::Phase1Read, Input::Read(r)) => {
                let buf = match r {
                    Ok(b) => b,
                    Err(e) => {
                        let e = LeaseError::io_read(lease_object(&self.p.resource), e);
                        return self.finish_err(cx, e);
                    }
                };
                let bk_max = match self.scan(&buf) {
                    Ok(Ok(b)) => b,
                    Ok(Err(a)) => return self.abort(cx, a),
                    Err(e) => return self.finish_err(cx, e),
                };
                if bk_max.inp != 0 {
                    self.dblock.inp = bk_max.inp;
                    self.dblock.inp2 = bk_max.inp2;
                    self.dblock.inp3 = bk_max.inp3;
                } else {
                    self.dblock.inp = self.p.host_id;
                    self.dblock.inp2 = self.p.generation;
                    let last = self.proposals.iter().map(|p| p.1).max().unwrap_or(0);
                    self.dblock.inp3 = cx.now_secs().max(self.p.min_timestamp).max(last + 1);
                    self.proposals.push((self.p.generation, self.dblock.inp3));
                }
                self.dblock.bal = self.dblock.mbal;
                if cx.expired() {
                    let e = self.fenced();
                    return self.finish_err(cx, e);
                }
                self.phase2 = true;
                let d = self.dblock;
                self.write_host_block(AState::Phase2Write, d, ModeBlock::default())
            }
            (AState::Phase2Write, Input::Wrote(r)) => {
                if let Err(e) = r {
                    let e = LeaseError::io_write(dblock_object(&self.p.resource, self.p.host_id), e);
                    return self.retract(cx, e);
                }
                self.read_all(AState::Phase2Read)
            }
            (AState::Phase2Read, Input::Read(r)) => {
                let buf = match r {
                    Ok(b) => b,
                    Err(e) => {
                        let e = LeaseError::io_read(lease_object(&self.p.resource), e);
                        return self.retract(cx, e);
                    }
                };
                match self.scan(&buf) {
                    Ok(Ok(_)) => {}
                    Ok(Err(a)) => return self.abort(cx, a),
                    Err(e) => return self.retract(cx, e),
                }
                // The ballot succeeded: commit its value.
                let mut nl = self.cur.clone();
                nl.lver = self.dblock.lver;
                nl.owner_id = self.dblock.inp;
                nl.owner_generation = self.dblock.inp2;
                nl.timestamp = self.dblock.inp3;
                nl.write_id = self.p.host_id;
                nl.write_generation = self.p.generation;
                nl.write_timestamp = cx.now_secs();
                if nl.owner_id == self.p.host_id {
                    if self.p.mode == LeaseMode::Shared {
                        nl.flags |= LFL_SHORT_HOLD;
                    } else {
                        nl.flags &= !LFL_SHORT_HOLD;
                    }
                }
                let nl = nl.sealed();
                if cx.expired() {
                    let e = self.fenced();
                    return self.retract(cx, e);
                }
                self.committed = Some(nl.clone());
                self.state = AState::Commit;
                Step::Io(IoOp::Write {
                    area: Area::Resource,
                    offset: 0,
                    data: nl.to_sector(),
                })
            }
            (AState::Commit, Input::Wrote(r)) => {
                if let Err(e) = r {
                    let e = LeaseError::io_write(leader_object(&self.p.resource), e);
                    return self.retract(cx, e);
                }
                self.phase2 = false;
                let nl = self.committed.clone().expect("committed");
                if nl.owner_id != self.p.host_id || nl.owner_generation != self.p.generation {
                    // We completed another host's ballot; the lease is theirs.
                    self.committed = None;
                    let e = self.owned(&nl);
                    return self.done(Err(e));
                }
                if !self.is_fresh(nl.owner_generation, nl.timestamp) {
                    // The leader now names us for an old holding; `committed` stays set so a
                    // failure from here on frees it again.
                    return self.skip_stale_own(cx, nl);
                }
                self.after_commit(cx)
            }
            (AState::ShHostBlock, Input::Wrote(r)) => {
                if let Err(e) = r {
                    let e = LeaseError::io_write(dblock_object(&self.p.resource, self.p.host_id), e);
                    return self.retract(cx, e);
                }
                self.pending = Some(Ok(PaxosAcquired {
                    mode: LeaseMode::Shared,
                    leader: self.committed.clone().expect("committed"),
                    dblock: self.dblock,
                }));
                self.release_leader_read(false)
            }
            (AState::ExSharedScan, Input::Read(r)) => {
                let buf = match r {
                    Ok(b) => b,
                    Err(e) => {
                        let e = LeaseError::io_read(lease_object(&self.p.resource), e);
                        return self.retract(cx, e);
                    }
                };
                self.shared_seen.clear();
                self.shared_live.clear();
                self.shared_idx = 0;
                for h in 1..=self.cur.num_hosts {
                    if h == self.p.host_id {
                        continue;
                    }
                    let off = dblock_offset(h) as usize;
                    let mb = ModeBlock::decode(&buf[off..off + SECTOR_SIZE]);
                    if mb.is_shared() && mb.generation != 0 {
                        self.shared_seen.push((h, mb.generation));
                    }
                }
                self.next_shared(cx)
            }
            (AState::ExSharedDelta, Input::Read(r)) => {
                let (host, generation) = self.shared_seen[self.shared_idx];
                let rec = r
                    .map_err(|e| LeaseError::io_read("", e))
                    .and_then(|b| crate::delta::decode_delta(&b, &self.p.space, host));
                let dead = match &rec {
                    Ok(rec) => self.shared_holder_dead(cx, host, generation, rec),
                    Err(_) => false,
                };
                if !dead {
                    self.shared_live.push(host);
                    self.shared_idx += 1;
                    return self.next_shared(cx);
                }
                if cx.expired() {
                    let e = self.fenced();
                    return self.retract(cx, e);
                }
                tracing::warn!(resource = %self.p.resource, host, generation, "clearing the shared lease of a dead host");
                self.state = AState::ExSharedClear;
                Step::Io(IoOp::Write {
                    area: Area::Resource,
                    offset: dblock_offset(host),
                    data: vec![0u8; SECTOR_SIZE],
                })
            }
            (AState::ExSharedClear, Input::Wrote(r)) => {
                if let Err(e) = r {
                    let (host, _) = self.shared_seen[self.shared_idx];
                    let e = LeaseError::io_write(dblock_object(&self.p.resource, host), e);
                    return self.retract(cx, e);
                }
                self.shared_idx += 1;
                self.next_shared(cx)
            }
            (AState::Release(RelStep::ReadLeader), Input::Read(r)) => {
                self.release_leader_decide(cx, r, false)
            }
            (AState::Release(RelStep::WriteLeader), Input::Wrote(r)) => {
                let e = r
                    .err()
                    .map(|e| LeaseError::io_write(leader_object(&self.p.resource), e));
                self.end_release(e)
            }
            (AState::Retract(RelStep::HostBlock), Input::Wrote(r)) => {
                if let Err(e) = r {
                    tracing::warn!(resource = %self.p.resource, error = %e, "could not mark our dblock released");
                }
                self.release_leader_read(true)
            }
            (AState::Retract(RelStep::ReadLeader), Input::Read(r)) => self.release_leader_decide(cx, r, true),
            (AState::Retract(RelStep::WriteLeader), Input::Wrote(r)) => {
                let e = r
                    .err()
                    .map(|e| LeaseError::io_write(leader_object(&self.p.resource), e));
                self.end_release(e)
            }
            (s, i) => panic!("PaxosAcquire: input {i:?} in state {s:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RState {
    Init,
    HostBlock,
    ReadLeader,
    WriteLeader,
    Done,
}

/// Releases a resource lease we hold: marks our dblock RELEASED (clearing a shared mode
/// block), then for an exclusive lease frees the leader if we wrote it.
#[derive(Debug)]
pub struct PaxosRelease {
    space: Name,
    resource: Name,
    host_id: u64,
    generation: u64,
    held: PaxosAcquired,
    state: RState,
}

impl PaxosRelease {
    pub fn new(
        space: Name,
        resource: Name,
        host_id: u64,
        generation: u64,
        held: PaxosAcquired,
    ) -> PaxosRelease {
        PaxosRelease {
            space,
            resource,
            host_id,
            generation,
            held,
            state: RState::Init,
        }
    }
}

impl Machine for PaxosRelease {
    type Output = Result<(), LeaseError>;

    fn resume(&mut self, cx: &Cx<'_>, input: Input) -> Step<Self::Output> {
        match (self.state, input) {
            (RState::Init, Input::Start) => {
                if cx.expired() {
                    self.state = RState::Done;
                    return Step::Done(Err(LeaseError::Fenced {
                        space: self.space.to_string(),
                        host_id: self.host_id,
                        reason: "its delta lease expired; the lease is left to expire".into(),
                    }));
                }
                let mut d = self.held.dblock;
                d.flags |= DBLOCK_FL_RELEASED;
                self.state = RState::HostBlock;
                Step::Io(IoOp::Write {
                    area: Area::Resource,
                    offset: dblock_offset(self.host_id),
                    data: host_block_sector(&d, &ModeBlock::default()),
                })
            }
            (RState::HostBlock, Input::Wrote(r)) => {
                if self.held.mode == LeaseMode::Shared {
                    self.state = RState::Done;
                    return Step::Done(
                        r.map_err(|e| LeaseError::io_write(dblock_object(&self.resource, self.host_id), e)),
                    );
                }
                if let Err(e) = r {
                    // Not fatal: freeing the leader below is what matters most.
                    tracing::warn!(resource = %self.resource, error = %e, "could not mark our dblock released");
                }
                self.state = RState::ReadLeader;
                Step::Io(IoOp::Read {
                    area: Area::Resource,
                    offset: 0,
                    len: SECTOR_SIZE,
                })
            }
            (RState::ReadLeader, Input::Read(r)) => {
                self.state = RState::Done;
                let leader = match r
                    .map_err(|e| LeaseError::io_read(leader_object(&self.resource), e))
                    .and_then(|b| decode_leader(&b, &self.space, &self.resource))
                {
                    Ok(l) => l,
                    Err(e) => return Step::Done(Err(e)),
                };
                match leader_release_plan(&leader, Some(&self.held.leader), self.host_id, self.generation) {
                    ReleasePlan::Skip => Step::Done(Ok(())),
                    ReleasePlan::Mismatch(reason) => Step::Done(Err(LeaseError::ReleaseMismatch {
                        resource: self.resource.to_string(),
                        reason,
                    })),
                    ReleasePlan::Write(mut free) => {
                        if cx.expired() {
                            return Step::Done(Err(LeaseError::Fenced {
                                space: self.space.to_string(),
                                host_id: self.host_id,
                                reason: "its delta lease expired during the release".into(),
                            }));
                        }
                        free.write_id = self.host_id;
                        free.write_generation = self.generation;
                        free.write_timestamp = cx.now_secs();
                        self.state = RState::WriteLeader;
                        Step::Io(IoOp::Write {
                            area: Area::Resource,
                            offset: 0,
                            data: free.to_sector(),
                        })
                    }
                }
            }
            (RState::WriteLeader, Input::Wrote(r)) => {
                self.state = RState::Done;
                Step::Done(r.map_err(|e| LeaseError::io_write(leader_object(&self.resource), e)))
            }
            (s, i) => panic!("PaxosRelease: input {i:?} in state {s:?}"),
        }
    }
}
