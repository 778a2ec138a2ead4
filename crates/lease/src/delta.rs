//! Delta leases (host ids): acquire, renew and release as sans-IO state machines, following
//! Chockler & Malkhi's light-weight leases as sanlock implements them (`delta_lease.c`).
//!
//! Acquire (`DeltaAcquire`):
//!
//! ```text
//! ReadFirst ──free, or our own name with fast reacquire──────────────► Write
//!     │ ──our own unexpired record, with resume ─────────────────────────► Write (same generation)
//!     │ held by another host name
//!     ▼
//! WaitLarge (max(8N+M, 8N) of the other's N) ─► ReadSecond ─ unchanged or free ─► Write
//!                                                   └─ changed: HostIdBusy
//! Write (generation+1, timestamp, our name) ─► WaitShort (2N) ─► ReadThird
//!     ReadThird: still exactly what we wrote ─► acquired;  otherwise ─► HostIdBusy
//! ```
//!
//! Resume continues an earlier incarnation of this very process's host id (same host id and
//! name, and a record that has not expired by the machine's `CLOCK_BOOTTIME`, which both
//! incarnations share): the write is a renewal that keeps the generation, so the resources the
//! earlier incarnation took on behalf of processes that outlived it (a restarted node's running
//! VMs) stay held. A new generation would tell every other host that those resources' owner is
//! gone, and they could take them while the processes still write. A record too close to its
//! expiry to be renewed in time is not resumed; without fast reacquire the acquire then waits
//! it out like any other host's (by which time a fence watchdog has killed those processes).
//!
//! The long wait makes taking a host id that another host wrote safe: that host either renews
//! (we see a change and back off) or has been dead for longer than its fence deadline. The
//! short wait lets any concurrent acquirer's write land before we re-read.
//!
//! Renew (`DeltaRenew`) reads the whole lockspace (our record and everyone's liveness), checks
//! our record is still ours, and writes a new timestamp. A record that is no longer ours, or
//! corrupt, is fatal: the holder must fence at once. Timestamps strictly increase, so a change
//! is visible even when N is below a second.
//!
//! Release (`DeltaRelease`) re-reads our record and writes timestamp 0 only if it is still ours.

use std::time::Duration;

use crate::error::LeaseError;
use crate::format::{delta_offset, LeaderRecord, Name, DELTA_MAGIC, SECTOR_SIZE};
use crate::machine::{Area, Cx, Input, IoOp, Machine, Step};
use crate::timeouts::Timeouts;

/// Who is acquiring which host id.
#[derive(Debug, Clone)]
pub struct DeltaParams {
    pub space: Name,
    pub host_id: u64,
    pub host_name: Name,
    pub timeouts: Timeouts,
    /// Take the host id at once when the record carries our own host name (sanlock's fast
    /// reacquire). Only safe when no earlier incarnation of this host can still be writing.
    pub fast_reacquire: bool,
    /// Continue our own record with its generation while it is valid (see the module docs).
    pub resume: bool,
}

fn object(space: &Name, host_id: u64) -> String {
    format!("the delta lease of host {host_id} in lockspace {space}")
}

/// Decodes and verifies one delta lease sector of lockspace `space`.
pub fn decode_delta(sector: &[u8], space: &Name, host_id: u64) -> Result<LeaderRecord, LeaseError> {
    let rec = LeaderRecord::decode_checked(sector, DELTA_MAGIC)
        .map_err(|p| LeaseError::bad(object(space, host_id), p))?;
    rec.check_space(space)
        .map_err(|p| LeaseError::bad(object(space, host_id), p))?;
    Ok(rec)
}

fn read_own(host_id: u64) -> Step<Result<DeltaAcquired, LeaseError>> {
    Step::Io(IoOp::Read {
        area: Area::Lockspace,
        offset: delta_offset(host_id),
        len: SECTOR_SIZE,
    })
}

/// A host id we now hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaAcquired {
    /// The record as written (checksum set).
    pub record: LeaderRecord,
    /// Our clock when the timestamp was taken: the lease is valid until this + 8N.
    pub written_at: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcqState {
    Init,
    ReadFirst,
    WaitLarge,
    ReadSecond,
    Write,
    WaitShort,
    ReadThird,
    Done,
}

/// Acquires a host id; see the module docs for the states.
#[derive(Debug)]
pub struct DeltaAcquire {
    p: DeltaParams,
    state: AcqState,
    first: Option<LeaderRecord>,
    other_io_timeout: u16,
    written: Option<DeltaAcquired>,
    /// When the last read was issued (a result delivered more than N later is stale).
    issued: Duration,
    /// A write of ours may have reached the disk (it succeeded, failed or timed out).
    pub wrote: bool,
}

impl DeltaAcquire {
    pub fn new(p: DeltaParams) -> DeltaAcquire {
        DeltaAcquire {
            p,
            state: AcqState::Init,
            first: None,
            other_io_timeout: 0,
            written: None,
            issued: Duration::ZERO,
            wrote: false,
        }
    }

    fn read(&mut self, cx: &Cx<'_>, next: AcqState) -> Step<Result<DeltaAcquired, LeaseError>> {
        self.issued = cx.now;
        self.state = next;
        read_own(self.p.host_id)
    }

    /// A read that reaches us more than N after it was issued means this process stalled; what
    /// it says may be out of date, so it must not lead to a write.
    fn fresh(&self, cx: &Cx<'_>) -> Result<(), LeaseError> {
        let age = cx.now.saturating_sub(self.issued);
        if age > self.p.timeouts.io_timeout {
            return Err(LeaseError::io_read(
                object(&self.p.space, self.p.host_id),
                crate::io::IoError::Timeout(age),
            ));
        }
        Ok(())
    }

    fn fail(&mut self, e: LeaseError) -> Step<Result<DeltaAcquired, LeaseError>> {
        self.state = AcqState::Done;
        Step::Done(Err(e))
    }

    /// Whether `rec` is our own record, written on this machine's clock with our N, that stays
    /// valid through the acquisition's short wait and one more I/O. Its expiry is estimated from
    /// the whole-second timestamp, one second early: timestamps are floored, and may run up to
    /// a second ahead of the clock when renewals come faster than once a second.
    fn resumable(&self, cx: &Cx<'_>, rec: &LeaderRecord) -> bool {
        if !self.p.resume
            || rec.is_free()
            || rec.resource_name != self.p.host_name
            || rec.owner_id != self.p.host_id
            || rec.io_timeout != self.p.timeouts.disk_io_timeout()
            || cx.now_secs() < rec.timestamp
        {
            return false;
        }
        let t = &self.p.timeouts;
        let expires = Duration::from_secs(rec.timestamp) + t.other_renewal_fail(rec.io_timeout);
        let needed = cx.now + t.delta_short_delay(rec.io_timeout) + t.io_timeout + Duration::from_secs(1);
        needed < expires
    }

    fn write_new(&mut self, cx: &Cx<'_>, base: &LeaderRecord) -> Step<Result<DeltaAcquired, LeaseError>> {
        self.write(cx, base, base.owner_generation + 1)
    }

    fn write(
        &mut self,
        cx: &Cx<'_>,
        base: &LeaderRecord,
        generation: u64,
    ) -> Step<Result<DeltaAcquired, LeaseError>> {
        let mut rec = base.clone();
        rec.timestamp = cx.now_secs().max(base.timestamp + 1);
        rec.io_timeout = self.p.timeouts.disk_io_timeout();
        rec.owner_id = self.p.host_id;
        rec.owner_generation = generation;
        rec.resource_name = self.p.host_name;
        let sealed = rec.sealed();
        self.written = Some(DeltaAcquired {
            record: sealed.clone(),
            written_at: cx.now,
        });
        self.state = AcqState::Write;
        self.wrote = true;
        Step::Io(IoOp::Write {
            area: Area::Lockspace,
            offset: delta_offset(self.p.host_id),
            data: sealed.to_sector(),
        })
    }

    fn busy(&self, rec: &LeaderRecord) -> LeaseError {
        LeaseError::HostIdBusy {
            space: self.p.space.to_string(),
            host_id: self.p.host_id,
            owner_name: rec.resource_name.to_string(),
            generation: rec.owner_generation,
        }
    }

    fn decode(&self, r: Result<Vec<u8>, crate::io::IoError>) -> Result<LeaderRecord, LeaseError> {
        let buf = r.map_err(|e| LeaseError::io_read(object(&self.p.space, self.p.host_id), e))?;
        decode_delta(&buf, &self.p.space, self.p.host_id)
    }
}

impl Machine for DeltaAcquire {
    type Output = Result<DeltaAcquired, LeaseError>;

    fn resume(&mut self, cx: &Cx<'_>, input: Input) -> Step<Self::Output> {
        match (self.state, input) {
            (AcqState::Init, Input::Start) => {
                if self.p.host_id == 0 {
                    return self.fail(LeaseError::InvalidArgument("host id 0 does not exist".into()));
                }
                self.read(cx, AcqState::ReadFirst)
            }
            (AcqState::ReadFirst, Input::Read(r)) => {
                let rec = match self.decode(r).and_then(|rec| self.fresh(cx).map(|_| rec)) {
                    Ok(rec) => rec,
                    Err(e) => return self.fail(e),
                };
                // A free record's io_timeout is only its last writer's; nobody holds it, so our own N
                // bounds the short delay. (Waiting with a larger foreign N would outlast our own
                // lease's 8N validity, which counts from our write.)
                self.other_io_timeout = if rec.is_free() {
                    self.p.timeouts.disk_io_timeout()
                } else {
                    rec.io_timeout
                };
                if self.resumable(cx, &rec) {
                    tracing::info!(space = %self.p.space, host_id = self.p.host_id,
                        generation = rec.owner_generation, "resuming our own unexpired host id");
                    self.other_io_timeout = rec.io_timeout;
                    return self.write(cx, &rec, rec.owner_generation);
                }
                if rec.is_free() || (self.p.fast_reacquire && rec.resource_name == self.p.host_name) {
                    return self.write_new(cx, &rec);
                }
                let delay = self.p.timeouts.delta_large_delay(rec.io_timeout);
                tracing::info!(space = %self.p.space, host_id = self.p.host_id, owner = %rec.resource_name,
                    generation = rec.owner_generation, wait_s = delay.as_secs_f64(),
                    "host id was held by another host; waiting to see whether it is alive");
                self.first = Some(rec);
                self.state = AcqState::WaitLarge;
                Step::SleepUntil(cx.now + delay)
            }
            (AcqState::WaitLarge, Input::Woke) => self.read(cx, AcqState::ReadSecond),
            (AcqState::ReadSecond, Input::Read(r)) => {
                let rec = match self.decode(r).and_then(|rec| self.fresh(cx).map(|_| rec)) {
                    Ok(rec) => rec,
                    Err(e) => return self.fail(e),
                };
                if Some(&rec) == self.first.as_ref() || rec.is_free() {
                    return self.write_new(cx, &rec);
                }
                let e = self.busy(&rec);
                self.fail(e)
            }
            (AcqState::Write, Input::Wrote(r)) => {
                if let Err(e) = r {
                    let e = LeaseError::io_write(object(&self.p.space, self.p.host_id), e);
                    return self.fail(e);
                }
                self.state = AcqState::WaitShort;
                Step::SleepUntil(cx.now + self.p.timeouts.delta_short_delay(self.other_io_timeout))
            }
            (AcqState::WaitShort, Input::Woke) => self.read(cx, AcqState::ReadThird),
            (AcqState::ReadThird, Input::Read(r)) => {
                let rec = match self.decode(r) {
                    Ok(rec) => rec,
                    Err(e) => return self.fail(e),
                };
                let written = self.written.clone().expect("written before ReadThird");
                if rec != written.record {
                    let e = self.busy(&rec);
                    return self.fail(e);
                }
                self.state = AcqState::Done;
                Step::Done(Ok(written))
            }
            (s, i) => panic!("DeltaAcquire: input {i:?} in state {s:?}"),
        }
    }
}

/// Why a renewal failed.
#[derive(Debug)]
pub enum RenewError {
    /// The storage did not answer or failed; retry until 8N.
    Io(LeaseError),
    /// Our record is no longer ours or no longer valid: stop using the lease now.
    Lost(LeaseError),
    /// Our lease expired (8N without renewal) before we could write.
    Expired,
}

/// The result of one renewal.
#[derive(Debug)]
pub struct RenewOutcome {
    /// The whole lockspace as read, and when; feeds the liveness table.
    pub observed: Option<(Duration, Vec<u8>)>,
    pub result: Result<DeltaAcquired, RenewError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RenewState {
    Init,
    Read,
    Write,
    Done,
}

/// One renewal of our delta lease.
#[derive(Debug)]
pub struct DeltaRenew {
    space: Name,
    host_id: u64,
    last: LeaderRecord,
    prev_ok: bool,
    lockspace_len: usize,
    timeouts: Timeouts,
    state: RenewState,
    observed: Option<(Duration, Vec<u8>)>,
    new: Option<DeltaAcquired>,
}

impl DeltaRenew {
    /// `last` is the record we last wrote; `prev_ok` whether that write is known to have
    /// succeeded (then the disk must hold exactly it).
    pub fn new(
        space: Name,
        last: LeaderRecord,
        prev_ok: bool,
        max_hosts: u64,
        timeouts: Timeouts,
    ) -> DeltaRenew {
        DeltaRenew {
            space,
            host_id: last.owner_id,
            last,
            prev_ok,
            lockspace_len: max_hosts as usize * SECTOR_SIZE,
            timeouts,
            state: RenewState::Init,
            observed: None,
            new: None,
        }
    }

    fn done(&mut self, result: Result<DeltaAcquired, RenewError>) -> Step<RenewOutcome> {
        self.state = RenewState::Done;
        Step::Done(RenewOutcome {
            observed: self.observed.take(),
            result,
        })
    }
}

impl Machine for DeltaRenew {
    type Output = RenewOutcome;

    fn resume(&mut self, cx: &Cx<'_>, input: Input) -> Step<RenewOutcome> {
        let obj = || object(&self.space, self.host_id);
        match (self.state, input) {
            (RenewState::Init, Input::Start) => {
                if cx.expired() {
                    return self.done(Err(RenewError::Expired));
                }
                self.state = RenewState::Read;
                Step::Io(IoOp::Read {
                    area: Area::Lockspace,
                    offset: 0,
                    len: self.lockspace_len,
                })
            }
            (RenewState::Read, Input::Read(r)) => {
                let buf = match r {
                    Ok(b) => b,
                    Err(e) => return self.done(Err(RenewError::Io(LeaseError::io_read(obj(), e)))),
                };
                let off = delta_offset(self.host_id) as usize;
                let rec = decode_delta(&buf[off..off + SECTOR_SIZE], &self.space, self.host_id);
                self.observed = Some((cx.now, buf));
                let rec = match rec {
                    Ok(r) => r,
                    Err(e) => return self.done(Err(RenewError::Lost(e))),
                };
                if rec.owner_id != self.last.owner_id
                    || rec.owner_generation != self.last.owner_generation
                    || rec.resource_name != self.last.resource_name
                {
                    return self.done(Err(RenewError::Lost(LeaseError::Fenced {
                        space: self.space.to_string(),
                        host_id: self.host_id,
                        reason: format!(
                            "the host id was taken over by {:?} generation {}",
                            rec.resource_name.to_string(),
                            rec.owner_generation
                        ),
                    })));
                }
                if self.prev_ok && rec != self.last {
                    return self.done(Err(RenewError::Lost(LeaseError::Fenced {
                        space: self.space.to_string(),
                        host_id: self.host_id,
                        reason: "the delta lease changed under us".into(),
                    })));
                }
                if cx.expired() {
                    return self.done(Err(RenewError::Expired));
                }
                let mut new = rec.clone();
                new.timestamp = cx.now_secs().max(rec.timestamp.max(self.last.timestamp) + 1);
                new.io_timeout = self.timeouts.disk_io_timeout();
                let sealed = new.sealed();
                self.new = Some(DeltaAcquired {
                    record: sealed.clone(),
                    written_at: cx.now,
                });
                self.state = RenewState::Write;
                Step::Io(IoOp::Write {
                    area: Area::Lockspace,
                    offset: delta_offset(self.host_id),
                    data: sealed.to_sector(),
                })
            }
            (RenewState::Write, Input::Wrote(r)) => match r {
                Ok(()) => {
                    let new = self.new.take().expect("new record");
                    self.done(Ok(new))
                }
                Err(e) => self.done(Err(RenewError::Io(LeaseError::io_write(obj(), e)))),
            },
            (s, i) => panic!("DeltaRenew: input {i:?} in state {s:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelState {
    Init,
    Read,
    Write,
    Done,
}

/// Frees our host id if it is still ours. Output: `Ok(true)` released, `Ok(false)` it was no
/// longer ours and was left alone.
#[derive(Debug)]
pub struct DeltaRelease {
    space: Name,
    last: LeaderRecord,
    state: RelState,
}

impl DeltaRelease {
    pub fn new(space: Name, last: LeaderRecord) -> DeltaRelease {
        DeltaRelease {
            space,
            last,
            state: RelState::Init,
        }
    }
}

impl Machine for DeltaRelease {
    type Output = Result<bool, LeaseError>;

    fn resume(&mut self, cx: &Cx<'_>, input: Input) -> Step<Self::Output> {
        let host_id = self.last.owner_id;
        let obj = object(&self.space, host_id);
        match (self.state, input) {
            (RelState::Init, Input::Start) => {
                self.state = RelState::Read;
                Step::Io(IoOp::Read {
                    area: Area::Lockspace,
                    offset: delta_offset(host_id),
                    len: SECTOR_SIZE,
                })
            }
            (RelState::Read, Input::Read(r)) => {
                self.state = RelState::Done;
                let rec = match r {
                    Ok(b) => match decode_delta(&b, &self.space, host_id) {
                        Ok(rec) => rec,
                        Err(e) => return Step::Done(Err(e)),
                    },
                    Err(e) => return Step::Done(Err(LeaseError::io_read(obj, e))),
                };
                if rec.owner_id != self.last.owner_id
                    || rec.owner_generation != self.last.owner_generation
                    || rec.resource_name != self.last.resource_name
                    || rec.is_free()
                {
                    return Step::Done(Ok(false));
                }
                let mut free = rec;
                free.timestamp = 0;
                let _ = cx;
                self.state = RelState::Write;
                Step::Io(IoOp::Write {
                    area: Area::Lockspace,
                    offset: delta_offset(host_id),
                    data: free.to_sector(),
                })
            }
            (RelState::Write, Input::Wrote(r)) => {
                self.state = RelState::Done;
                Step::Done(r.map(|_| true).map_err(|e| LeaseError::io_write(obj, e)))
            }
            (s, i) => panic!("DeltaRelease: input {i:?} in state {s:?}"),
        }
    }
}
