//! A simulated cluster for testing the lease machines: many hosts with drifting clocks share
//! one simulated sector store holding a lockspace and a resource, driven by a seeded
//! discrete-event schedule, with injected faults. Invariants are checked after every event.
//!
//! The hosts run the very machines the real [`crate::lockspace::Lockspace`] runs
//! ([`DeltaAcquire`], [`DeltaRenew`], [`DeltaRelease`], [`PaxosAcquire`], [`PaxosRelease`]);
//! only the I/O and the clock are simulated.
//!
//! Storage model (the real backend's guarantees, see [`crate::io`]): each host's requests to
//! one area run in order; a request takes a random time; its caller gives up after N (its own
//! clock) and a request that had not started by then is skipped. Faults per request:
//! - fail: an error, nothing written;
//! - slow: takes up to 6N; the caller times out and the write lands late;
//! - lost: the caller times out and the write never lands (the queue stays blocked a while);
//! - tear: a prefix of the write lands and the caller gets an error.
//!
//! A multi-sector read returns, for each sector, its content either at the start or at the end
//! of the read (reads are not atomic across sectors, writes are applied whole).
//!
//! Host faults: a pause freezes a whole host (its lease holders too) for up to 12N, so it may
//! wake up past its fence deadline; a crash kills a host at once (power loss), with its
//! in-flight writes still landing; it restarts later.
//!
//! A host "holds" its host id while its delta lease is acquired, not fenced, and its own clock
//! is before the fence deadline (last successful renewal + 8N): the fence fires exactly then
//! and kills its lease holders. Checked after every event:
//! 1. a host id is held by at most one host;
//! 2. at most one host holds the resource exclusively;
//! 3. shared and exclusive holders never coexist;
//! 4. fencing tokens only grow: an exclusive acquisition's lver is larger than every lver
//!    handed out before it, a shared one's larger than every exclusive one before it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

use crate::delta::{DeltaAcquire, DeltaAcquired, DeltaParams, DeltaRelease, DeltaRenew, RenewError};
use crate::error::LeaseError;
use crate::format::{ballot_read_len, LeaderRecord, Name, SECTOR_SIZE};
use crate::hosts::HostTable;
use crate::io::{IoError, MemDisk};
use crate::machine::{Area, Cx, Input, IoOp, Machine, Step};
use crate::paxos::{LeaseMode, OwnerWait, PaxosAcquire, PaxosAcquired, PaxosParams, PaxosRelease, Rng};
use crate::timeouts::Timeouts;

/// Probabilities of faults: per I/O request (`fail`, `slow`, `lost`, `tear`) and per host
/// decision (`pause`, `crash`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Faults {
    pub fail: f64,
    pub slow: f64,
    pub lost: f64,
    pub tear: f64,
    pub pause: f64,
    pub crash: f64,
}

/// One simulation run.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub seed: u64,
    /// Number of hosts (processes) contending.
    pub hosts: usize,
    /// Host ids in the lockspace (and hosts in the resource); hosts pick among them, so fewer
    /// ids than hosts means contention for host ids.
    pub host_ids: u64,
    pub io_timeout: Duration,
    pub fence_margin: Duration,
    /// Largest relative clock-rate difference from true time (e.g. 0.0005).
    pub drift: f64,
    pub faults: Faults,
    /// Simulated time to run.
    pub duration: Duration,
}

impl SimConfig {
    pub fn new(seed: u64, hosts: usize) -> SimConfig {
        SimConfig {
            seed,
            hosts,
            host_ids: hosts as u64,
            io_timeout: Duration::from_secs(1),
            fence_margin: Duration::from_secs(2),
            drift: 0.0005,
            faults: Faults::default(),
            duration: Duration::from_secs(300),
        }
    }
}

/// What happened in a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    pub events: u64,
    pub host_ids_acquired: u64,
    pub exclusive_acquired: u64,
    pub shared_acquired: u64,
    pub fences: u64,
    pub crashes: u64,
    pub pauses: u64,
    pub owned_by_other: u64,
    pub max_lver: u64,
}

/// An invariant broke; `trace` holds the last events before it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub at: Duration,
    pub what: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "invariant violated at {:?}: {}", self.at, self.what)?;
        for l in &self.trace {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

const SPACE: &str = "sim-space";
/// Events kept for a violation report.
const TRACE_LEN: usize = 400;
const RESOURCE: &str = "SDM";

type Time = u64; // global nanoseconds

fn ns(d: Duration) -> Time {
    d.as_nanos() as Time
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Slot {
    Ls,
    Renew,
    Res,
}

#[derive(Debug)]
enum Mach {
    DAcq(Box<DeltaAcquire>),
    DRenew(Box<DeltaRenew>),
    DRel(Box<DeltaRelease>),
    PAcq(Box<PaxosAcquire>),
    PRel(Box<PaxosRelease>),
}

#[derive(Debug)]
enum Out {
    DAcq(Result<DeltaAcquired, LeaseError>),
    DRenew(crate::delta::RenewOutcome),
    DRel(Result<bool, LeaseError>),
    PAcq(Result<PaxosAcquired, LeaseError>),
    PRel(Result<(), LeaseError>),
}

fn resume(m: &mut Mach, cx: &Cx<'_>, input: Input) -> Step<Out> {
    fn map<T>(s: Step<T>, f: impl FnOnce(T) -> Out) -> Step<Out> {
        match s {
            Step::Io(op) => Step::Io(op),
            Step::SleepUntil(t) => Step::SleepUntil(t),
            Step::Done(v) => Step::Done(f(v)),
        }
    }
    match m {
        Mach::DAcq(m) => map(m.resume(cx, input), Out::DAcq),
        Mach::DRenew(m) => map(m.resume(cx, input), Out::DRenew),
        Mach::DRel(m) => map(m.resume(cx, input), Out::DRel),
        Mach::PAcq(m) => map(m.resume(cx, input), Out::PAcq),
        Mach::PRel(m) => map(m.resume(cx, input), Out::PRel),
    }
}

#[derive(Debug)]
struct Task {
    mach: Mach,
    /// Bumped at every resume; events for older epochs are stale.
    epoch: u64,
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per simulated host
enum Ls {
    Idle,
    Acquiring,
    Held {
        host_id: u64,
        record: LeaderRecord,
        last_success: Duration,
        prev_ok: bool,
        hosts: HostTable,
        releasing: bool,
    },
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per simulated host
enum Res {
    None,
    Acquiring,
    Held { acq: PaxosAcquired, release_at: Time },
    Releasing,
}

#[derive(Debug)]
struct Host {
    rate: f64,
    offset: Time,
    inc: u64,
    dead_until: Option<Time>,
    paused_until: Time,
    name: Name,
    ls: Ls,
    res: Res,
    tasks: HashMap<Slot, Task>,
    busy_until: HashMap<Area, Time>,
    /// Largest Paxos proposal timestamp this host used.
    last_proposal: u64,
}

impl Host {
    fn local(&self, t: Time) -> Duration {
        Duration::from_nanos(self.offset + (t as f64 * self.rate) as u64)
    }

    fn global(&self, local: Duration) -> Time {
        let l = ns(local).saturating_sub(self.offset);
        (l as f64 / self.rate).ceil() as Time
    }

    fn valid_until(&self) -> Option<Duration> {
        match &self.ls {
            Ls::Held { last_success, .. } => Some(*last_success),
            _ => None,
        }
    }
}

#[derive(Debug)]
enum OpKind {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpFault {
    None,
    Fail,
    Slow,
    Lost,
    Tear,
}

#[derive(Debug)]
struct Op {
    host: usize,
    inc: u64,
    slot: Slot,
    epoch: u64,
    area: Area,
    kind: OpKind,
    fault: OpFault,
    before: Option<Vec<u8>>,
    /// The caller already got an answer (result or timeout).
    answered: bool,
    /// The request was executed (not skipped) and its end is scheduled.
    scheduled: bool,
    started: bool,
}

#[derive(Debug)]
enum Ev {
    IoBegin(u64),
    IoEnd(u64),
    IoTimeout(u64),
    Deliver {
        host: usize,
        inc: u64,
        slot: Slot,
        epoch: u64,
        input: DeliverInput,
    },
    Wake {
        host: usize,
        inc: u64,
        slot: Slot,
        epoch: u64,
    },
    Act {
        host: usize,
        inc: u64,
    },
    Renew {
        host: usize,
        inc: u64,
        due: Duration,
    },
    Fence {
        host: usize,
        inc: u64,
    },
}

#[derive(Debug)]
enum DeliverInput {
    Read(Result<Vec<u8>, IoError>),
    Wrote(Result<(), IoError>),
}

struct Sim {
    cfg: SimConfig,
    t: Timeouts,
    rng: Rng,
    now: Time,
    seq: u64,
    queue: BinaryHeap<Reverse<(Time, u64)>>,
    events: HashMap<u64, Ev>,
    ops: HashMap<u64, Op>,
    next_op: u64,
    store: HashMap<Area, Vec<u8>>,
    hosts: Vec<Host>,
    space: Name,
    resource: Name,
    report: SimReport,
    max_lver_handed: u64,
    max_ex_lver_handed: u64,
    trace: VecDeque<String>,
}

impl Sim {
    fn new(cfg: &SimConfig) -> Sim {
        let space = Name::new(SPACE).expect("name");
        let resource = Name::new(RESOURCE).expect("name");
        let t = Timeouts::new(cfg.io_timeout, cfg.fence_margin);
        let ls = MemDisk::new(0);
        crate::direct::init_lockspace_with(&ls, SPACE, t.disk_io_timeout(), cfg.host_ids)
            .expect("init lockspace");
        let res = MemDisk::new(0);
        crate::direct::init_resource_with(&res, SPACE, RESOURCE, cfg.host_ids).expect("init resource");
        let mut store = HashMap::new();
        let ls_len = cfg.host_ids as usize * SECTOR_SIZE;
        let mut lsb = ls.snapshot();
        lsb.resize(ls_len.max(lsb.len()), 0);
        store.insert(Area::Lockspace, lsb);
        let mut rb = res.snapshot();
        rb.resize(ballot_read_len(cfg.host_ids).max(rb.len()), 0);
        store.insert(Area::Resource, rb);
        let mut rng = Rng::new(cfg.seed);
        let hosts = (0..cfg.hosts)
            .map(|i| {
                let r = (rng.below(2_000_001) as f64 / 1_000_000.0) - 1.0;
                Host {
                    rate: 1.0 + r * cfg.drift,
                    offset: ns(Duration::from_secs(1000)) + rng.below(ns(Duration::from_secs(1000))),
                    inc: 0,
                    dead_until: None,
                    paused_until: 0,
                    name: Name::new(&format!("host-{i}")).expect("name"),
                    ls: Ls::Idle,
                    res: Res::None,
                    tasks: HashMap::new(),
                    busy_until: HashMap::new(),
                    last_proposal: 0,
                }
            })
            .collect();
        Sim {
            cfg: cfg.clone(),
            t,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            ops: HashMap::new(),
            next_op: 0,
            store,
            hosts,
            space,
            resource,
            report: SimReport::default(),
            max_lver_handed: 0,
            max_ex_lver_handed: 0,
            trace: VecDeque::new(),
        }
    }

    fn push(&mut self, at: Time, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn log(&mut self, s: String) {
        if self.trace.len() >= TRACE_LEN {
            self.trace.pop_front();
        }
        let t = Duration::from_nanos(self.now);
        self.trace.push_back(format!("{:>12.6}s {s}", t.as_secs_f64()));
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.below(1_000_000) as f64) < p * 1_000_000.0
    }

    fn between(&mut self, lo: Duration, hi: Duration) -> Time {
        let (lo, hi) = (ns(lo), ns(hi));
        lo + self.rng.below(hi.saturating_sub(lo).max(1))
    }

    fn n(&self) -> Duration {
        self.cfg.io_timeout
    }

    /// Runs the machine in `slot` of `host` with `input` until it asks for I/O or a sleep.
    fn step(&mut self, host: usize, slot: Slot, input: Input) -> Result<(), Violation> {
        let now_local = self.hosts[host].local(self.now);
        let mut task = match self.hosts[host].tasks.remove(&slot) {
            Some(t) => t,
            None => return Ok(()),
        };
        task.epoch += 1;
        let valid_until = match slot {
            Slot::Ls if matches!(self.hosts[host].ls, Ls::Acquiring) => None,
            _ => Some(
                self.hosts[host]
                    .valid_until()
                    .map(|s| s + self.t.renewal_fail())
                    .unwrap_or(Duration::ZERO),
            ),
        };
        let step = {
            let h = &self.hosts[host];
            let hosts = match &h.ls {
                Ls::Held { hosts, .. } => Some(hosts),
                _ => None,
            };
            let cx = Cx {
                now: now_local,
                valid_until,
                hosts,
            };
            resume(&mut task.mach, &cx, input)
        };
        if let Mach::PAcq(m) = &task.mach {
            let p = m.max_proposed_timestamp();
            let h = &mut self.hosts[host];
            h.last_proposal = h.last_proposal.max(p);
        }
        let epoch = task.epoch;
        let inc = self.hosts[host].inc;
        match step {
            Step::Io(op) => {
                self.hosts[host].tasks.insert(slot, task);
                self.issue(host, slot, epoch, op);
            }
            Step::SleepUntil(l) => {
                self.hosts[host].tasks.insert(slot, task);
                let at = self.hosts[host].global(l).max(self.now);
                self.push(
                    at,
                    Ev::Wake {
                        host,
                        inc,
                        slot,
                        epoch,
                    },
                );
            }
            Step::Done(out) => self.finish(host, out)?,
        }
        Ok(())
    }

    fn issue(&mut self, host: usize, slot: Slot, epoch: u64, op: IoOp) {
        let area = op.area();
        let kind = match op {
            IoOp::Read { offset, len, .. } => OpKind::Read { offset, len },
            IoOp::Write { offset, data, .. } => OpKind::Write { offset, data },
        };
        let is_write = matches!(kind, OpKind::Write { .. });
        let f = self.cfg.faults;
        let fault = if self.chance(f.fail) {
            OpFault::Fail
        } else if self.chance(f.slow) {
            OpFault::Slow
        } else if self.chance(f.lost) {
            OpFault::Lost
        } else if is_write && self.chance(f.tear) {
            OpFault::Tear
        } else {
            OpFault::None
        };
        let n = self.n();
        let h = &self.hosts[host];
        let timeout_at = self.now + (ns(n) as f64 / h.rate) as Time;
        let busy = *h.busy_until.get(&area).unwrap_or(&0);
        let start = self.now.max(busy);
        let inc = h.inc;
        let id = self.next_op;
        self.next_op += 1;
        let what = match &kind {
            OpKind::Read { offset, len } => format!("@{offset}+{len}"),
            OpKind::Write { offset, data } if area == Area::Resource && *offset == 0 => {
                let l = LeaderRecord::decode(data);
                format!(
                    "@0 leader lver {} owner {}/{} ts {} writer {}",
                    l.lver, l.owner_id, l.owner_generation, l.timestamp, l.write_id
                )
            }
            OpKind::Write { offset, data } if area == Area::Resource => {
                let d = crate::format::Dblock::decode(data);
                let m = crate::format::ModeBlock::decode(data);
                format!(
                    "@{offset} dblock mbal {} bal {} inp {}/{}/{} lver {} flags {} mode {}/{}",
                    d.mbal, d.bal, d.inp, d.inp2, d.inp3, d.lver, d.flags, m.flags, m.generation
                )
            }
            OpKind::Write { offset, data } => format!("@{offset}+{}", data.len()),
        };
        let desc = format!(
            "host {host} {slot:?} {} {:?} {what} fault {fault:?}",
            if is_write { "write" } else { "read" },
            area,
        );
        self.log(desc);
        self.ops.insert(
            id,
            Op {
                host,
                inc,
                slot,
                epoch,
                area,
                kind,
                fault,
                before: None,
                answered: false,
                scheduled: false,
                started: false,
            },
        );
        self.push(timeout_at, Ev::IoTimeout(id));
        if start >= timeout_at {
            // Queued behind a stuck request past the caller's timeout: never executed.
            return;
        }
        let d = match fault {
            OpFault::None | OpFault::Tear => self.between(Duration::from_micros(50), n / 2),
            OpFault::Fail => self.between(Duration::from_micros(10), n / 4),
            OpFault::Slow | OpFault::Lost => self.between(n, n * 6),
        };
        let end = start + d;
        self.ops.get_mut(&id).expect("op").scheduled = true;
        self.hosts[host].busy_until.insert(area, end);
        self.push(start, Ev::IoBegin(id));
        self.push(end, Ev::IoEnd(id));
    }

    fn io_begin(&mut self, id: u64) {
        let Some(op) = self.ops.get_mut(&id) else { return };
        op.started = true;
        if let OpKind::Read { offset, len } = op.kind {
            let area = &self.store[&op.area];
            let snap = read_area(area, offset, len);
            self.ops.get_mut(&id).expect("op").before = Some(snap);
        }
    }

    fn io_end(&mut self, id: u64) {
        let Some(mut op) = self.ops.remove(&id) else {
            return;
        };
        let result: DeliverInput = match (&op.kind, op.fault) {
            (_, OpFault::Lost) => return,
            (OpKind::Read { .. }, OpFault::Fail) => DeliverInput::Read(Err(IoError::Injected)),
            (OpKind::Write { .. }, OpFault::Fail) => DeliverInput::Wrote(Err(IoError::Injected)),
            (OpKind::Read { offset, len }, _) => {
                let after = read_area(&self.store[&op.area], *offset, *len);
                let before = op.before.take().unwrap_or_else(|| after.clone());
                let mut out = after;
                for s in 0..out.len() / SECTOR_SIZE {
                    if self.rng.below(2) == 0 {
                        let r = s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE;
                        out[r.clone()].copy_from_slice(&before[r]);
                    }
                }
                DeliverInput::Read(Ok(out))
            }
            (OpKind::Write { .. }, fault) => {
                let torn = fault == OpFault::Tear;
                self.apply_write(&op, torn);
                DeliverInput::Wrote(if torn { Err(IoError::Injected) } else { Ok(()) })
            }
        };
        if !op.answered {
            self.deliver(op.host, op.inc, op.slot, op.epoch, result);
        }
    }

    fn apply_write(&mut self, op: &Op, torn: bool) {
        let OpKind::Write { offset, data } = &op.kind else {
            return;
        };
        let len = if torn {
            1 + self.rng.below(data.len() as u64 - 1) as usize
        } else {
            data.len()
        };
        let area = self.store.get_mut(&op.area).expect("area");
        let end = *offset as usize + len;
        if area.len() < end {
            area.resize(end, 0);
        }
        area[*offset as usize..end].copy_from_slice(&data[..len]);
        self.log(format!(
            "  host {} write {:?}@{offset} landed{}",
            op.host,
            op.area,
            if torn { " TORN" } else { "" }
        ));
    }

    fn io_timeout(&mut self, id: u64) {
        let Some(op) = self.ops.get_mut(&id) else { return };
        if op.answered {
            return;
        }
        op.answered = true;
        let (host, inc, slot, epoch, is_write, scheduled) = (
            op.host,
            op.inc,
            op.slot,
            op.epoch,
            matches!(op.kind, OpKind::Write { .. }),
            op.scheduled,
        );
        if !scheduled {
            self.ops.remove(&id);
        }
        let n = self.n();
        let input = if is_write {
            DeliverInput::Wrote(Err(IoError::Timeout(n)))
        } else {
            DeliverInput::Read(Err(IoError::Timeout(n)))
        };
        self.deliver(host, inc, slot, epoch, input);
    }

    /// A host lost power: each of its started writes lands now or never, nothing lands later.
    fn crash_io(&mut self, host: usize) {
        let ids: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, o)| o.host == host)
            .map(|(i, _)| *i)
            .collect();
        for id in ids {
            let op = self.ops.remove(&id).expect("op");
            if op.started
                && matches!(op.kind, OpKind::Write { .. })
                && op.fault != OpFault::Lost
                && self.rng.below(2) == 0
            {
                self.apply_write(&op, false);
            }
        }
    }

    fn deliver(&mut self, host: usize, inc: u64, slot: Slot, epoch: u64, input: DeliverInput) {
        let at = self.now.max(self.hosts[host].paused_until);
        self.push(
            at,
            Ev::Deliver {
                host,
                inc,
                slot,
                epoch,
                input,
            },
        );
    }

    fn live(&self, host: usize, inc: u64) -> bool {
        let h = &self.hosts[host];
        h.inc == inc && h.dead_until.is_none()
    }

    fn task_waiting(&self, host: usize, slot: Slot, epoch: u64) -> bool {
        self.hosts[host]
            .tasks
            .get(&slot)
            .is_some_and(|t| t.epoch == epoch)
    }

    fn start_task(&mut self, host: usize, slot: Slot, mach: Mach) -> Result<(), Violation> {
        self.hosts[host].tasks.insert(slot, Task { mach, epoch: 0 });
        self.step(host, slot, Input::Start)
    }

    fn schedule_act(&mut self, host: usize, lo: Duration, hi: Duration) {
        let at = self.now + self.between(lo, hi);
        let inc = self.hosts[host].inc;
        self.push(at, Ev::Act { host, inc });
    }

    fn schedule_renew(&mut self, host: usize, due: Duration) {
        let at = self.hosts[host].global(due).max(self.now);
        let inc = self.hosts[host].inc;
        self.push(at, Ev::Renew { host, inc, due });
    }

    fn schedule_fence(&mut self, host: usize) {
        if let Some(ls) = self.hosts[host].valid_until() {
            let at = self.hosts[host].global(ls + self.t.renewal_fail()).max(self.now);
            let inc = self.hosts[host].inc;
            self.push(at, Ev::Fence { host, inc });
        }
    }

    /// A host's decision point: what to do next, given its state.
    fn act(&mut self, host: usize) -> Result<(), Violation> {
        let n = self.n();
        let f = self.cfg.faults;
        if self.chance(f.crash) {
            self.report.crashes += 1;
            self.crash_io(host);
            let h = &mut self.hosts[host];
            h.inc += 1;
            h.tasks.clear();
            h.ls = Ls::Idle;
            h.res = Res::None;
            let until = self.now + self.between(n, n * 20);
            self.hosts[host].dead_until = Some(until);
            self.log(format!("host {host} CRASHED"));
            let inc = self.hosts[host].inc;
            self.push(until, Ev::Act { host, inc });
            return Ok(());
        }
        if self.chance(f.pause) {
            self.report.pauses += 1;
            let until = self.now + self.between(n, n * 12);
            self.hosts[host].paused_until = until;
            self.log(format!(
                "host {host} PAUSED for {:?}",
                Duration::from_nanos(until - self.now)
            ));
            let inc = self.hosts[host].inc;
            self.push(until, Ev::Act { host, inc });
            return Ok(());
        }
        let now_local = self.hosts[host].local(self.now);
        match &self.hosts[host].ls {
            Ls::Idle => {
                let host_id = 1 + self.rng.below(self.cfg.host_ids);
                self.hosts[host].ls = Ls::Acquiring;
                let p = DeltaParams {
                    space: self.space,
                    host_id,
                    host_name: self.hosts[host].name,
                    timeouts: self.t,
                    fast_reacquire: false,
                    resume: false,
                };
                self.log(format!("host {host} acquires host id {host_id}"));
                self.start_task(host, Slot::Ls, Mach::DAcq(Box::new(DeltaAcquire::new(p))))?;
            }
            Ls::Acquiring => {}
            Ls::Held { releasing: true, .. } => {}
            Ls::Held {
                host_id,
                record,
                last_success,
                ..
            } => {
                let (host_id, record, last_success) = (*host_id, record.clone(), *last_success);
                if now_local >= last_success + self.t.renewal_fail() {
                    // The fence event will clean up.
                } else {
                    match &self.hosts[host].res {
                        Res::None if !self.hosts[host].tasks.contains_key(&Slot::Res) => {
                            if self.chance(0.1) {
                                if let Ls::Held { releasing, .. } = &mut self.hosts[host].ls {
                                    *releasing = true;
                                }
                                self.log(format!("host {host} releases host id {host_id}"));
                                self.start_task(
                                    host,
                                    Slot::Ls,
                                    Mach::DRel(Box::new(DeltaRelease::new(self.space, record))),
                                )?;
                            } else {
                                let mode = if self.chance(0.3) {
                                    LeaseMode::Shared
                                } else {
                                    LeaseMode::Exclusive
                                };
                                let wait = match self.rng.below(3) {
                                    0 => OwnerWait::NoWait,
                                    1 => OwnerWait::UntilDead,
                                    _ => OwnerWait::Watch(Duration::from_nanos(self.between(n, n * 20))),
                                };
                                let p = PaxosParams {
                                    space: self.space,
                                    resource: self.resource,
                                    host_id,
                                    generation: record.owner_generation,
                                    timeouts: self.t,
                                    mode,
                                    wait,
                                    acquire_lver: None,
                                    read_len: ballot_read_len(self.cfg.host_ids),
                                    max_ballots: 20,
                                    seed: self.rng.next_u64(),
                                    min_timestamp: self.hosts[host].last_proposal + 1,
                                };
                                self.hosts[host].res = Res::Acquiring;
                                self.log(format!("host {host} acquires resource {mode:?} {wait:?}"));
                                self.start_task(host, Slot::Res, Mach::PAcq(Box::new(PaxosAcquire::new(p))))?;
                            }
                        }
                        Res::Held { acq, release_at } if *release_at <= self.now => {
                            let acq = acq.clone();
                            self.hosts[host].res = Res::Releasing;
                            self.log(format!("host {host} releases resource lver {}", acq.lver()));
                            let m = PaxosRelease::new(
                                self.space,
                                self.resource,
                                host_id,
                                record.owner_generation,
                                acq,
                            );
                            self.start_task(host, Slot::Res, Mach::PRel(Box::new(m)))?;
                        }
                        _ => {}
                    }
                }
            }
        }
        self.schedule_act(host, n / 5, n * 3);
        Ok(())
    }

    fn finish(&mut self, host: usize, out: Out) -> Result<(), Violation> {
        let now_local = self.hosts[host].local(self.now);
        match out {
            Out::DAcq(r) => match r {
                Ok(acq) => {
                    self.report.host_ids_acquired += 1;
                    self.log(format!(
                        "host {host} HOLDS host id {} gen {}",
                        acq.record.owner_id, acq.record.owner_generation
                    ));
                    self.hosts[host].ls = Ls::Held {
                        host_id: acq.record.owner_id,
                        record: acq.record,
                        last_success: acq.written_at,
                        prev_ok: true,
                        hosts: HostTable::new(self.space, self.cfg.host_ids),
                        releasing: false,
                    };
                    self.schedule_renew(host, acq.written_at + self.t.renewal());
                    self.schedule_fence(host);
                }
                Err(e) => {
                    self.log(format!("host {host} host id acquire failed: {e}"));
                    self.hosts[host].ls = Ls::Idle;
                }
            },
            Out::DRel(r) => {
                self.log(format!("host {host} released host id: {r:?}"));
                self.hosts[host].ls = Ls::Idle;
                self.hosts[host].tasks.remove(&Slot::Renew);
            }
            Out::DRenew(o) => {
                let mut fence = false;
                let mut next = None;
                if let Ls::Held {
                    hosts,
                    record,
                    last_success,
                    prev_ok,
                    ..
                } = &mut self.hosts[host].ls
                {
                    if let Some((t, buf)) = &o.observed {
                        hosts.observe(*t, buf);
                    }
                    match o.result {
                        Ok(acq) => {
                            *record = acq.record;
                            *last_success = acq.written_at;
                            *prev_ok = true;
                            next = Some(acq.written_at + self.t.renewal());
                        }
                        Err(RenewError::Io(_)) => {
                            *prev_ok = false;
                            next = Some(now_local + self.t.owner_poll());
                        }
                        Err(RenewError::Lost(_)) | Err(RenewError::Expired) => fence = true,
                    }
                }
                if let Some(d) = next {
                    self.schedule_renew(host, d);
                    self.schedule_fence(host);
                }
                if fence {
                    self.fence(host, "renewal found the lease lost or expired");
                }
            }
            Out::PAcq(r) => {
                let holds_ls = self.holds_host_id(host).is_some();
                match r {
                    Ok(acq) if holds_ls => {
                        let lver = acq.lver();
                        match acq.mode {
                            LeaseMode::Exclusive => {
                                if lver <= self.max_lver_handed {
                                    return Err(self.violation(format!(
                                        "host {host} acquired exclusively with lver {lver}, but lver {} was handed out before",
                                        self.max_lver_handed
                                    )));
                                }
                                self.report.exclusive_acquired += 1;
                                self.max_ex_lver_handed = lver;
                            }
                            LeaseMode::Shared => {
                                if lver <= self.max_ex_lver_handed {
                                    return Err(self.violation(format!(
                                        "host {host} acquired shared with lver {lver} <= exclusive lver {}",
                                        self.max_ex_lver_handed
                                    )));
                                }
                                self.report.shared_acquired += 1;
                            }
                        }
                        self.max_lver_handed = self.max_lver_handed.max(lver);
                        self.report.max_lver = self.max_lver_handed;
                        let n = self.n();
                        let release_at = self.now + self.between(n / 10, n * 6);
                        self.log(format!("host {host} HOLDS resource {:?} lver {lver}", acq.mode));
                        self.hosts[host].res = Res::Held { acq, release_at };
                    }
                    Ok(acq) => {
                        self.log(format!(
                            "host {host} acquired lver {} after its fence; dropped",
                            acq.lver()
                        ));
                        self.hosts[host].res = Res::None;
                    }
                    Err(e) => {
                        if matches!(e, LeaseError::OwnedByOther { .. }) {
                            self.report.owned_by_other += 1;
                        }
                        self.log(format!("host {host} resource acquire failed: {e}"));
                        self.hosts[host].res = Res::None;
                    }
                }
            }
            Out::PRel(r) => {
                self.log(format!("host {host} released resource: {r:?}"));
                self.hosts[host].res = Res::None;
            }
        }
        self.check()
    }

    fn fence(&mut self, host: usize, why: &str) {
        if !matches!(self.hosts[host].ls, Ls::Held { .. }) {
            return;
        }
        self.report.fences += 1;
        self.log(format!("host {host} FENCED: {why}"));
        let h = &mut self.hosts[host];
        h.tasks.clear();
        h.ls = Ls::Idle;
        h.res = Res::None;
    }

    /// The host id this host holds right now (delta lease acquired, not fenced, before its
    /// fence deadline on its own clock).
    fn holds_host_id(&self, host: usize) -> Option<u64> {
        let h = &self.hosts[host];
        if h.dead_until.is_some() {
            return None;
        }
        match &h.ls {
            Ls::Held {
                host_id,
                last_success,
                releasing: false,
                ..
            } if h.local(self.now) < *last_success + self.t.renewal_fail() => Some(*host_id),
            _ => None,
        }
    }

    fn violation(&self, what: String) -> Violation {
        Violation {
            at: Duration::from_nanos(self.now),
            what,
            trace: self.trace.iter().cloned().collect(),
        }
    }

    fn check(&self) -> Result<(), Violation> {
        let mut by_id: HashMap<u64, usize> = HashMap::new();
        let mut ex = Vec::new();
        let mut sh = Vec::new();
        for i in 0..self.hosts.len() {
            let Some(id) = self.holds_host_id(i) else { continue };
            if let Some(other) = by_id.insert(id, i) {
                return Err(self.violation(format!("host id {id} held by hosts {other} and {i}")));
            }
            if let Res::Held { acq, .. } = &self.hosts[i].res {
                match acq.mode {
                    LeaseMode::Exclusive => ex.push((i, acq.lver())),
                    LeaseMode::Shared => sh.push((i, acq.lver())),
                }
            }
        }
        if ex.len() > 1 {
            return Err(self.violation(format!("exclusive holders at once: {ex:?}")));
        }
        if !ex.is_empty() && !sh.is_empty() {
            return Err(self.violation(format!("exclusive {ex:?} and shared {sh:?} holders at once")));
        }
        Ok(())
    }

    fn run(mut self) -> Result<SimReport, Violation> {
        for h in 0..self.hosts.len() {
            let n = self.n();
            self.schedule_act(h, Duration::ZERO, n * 2);
        }
        let end = ns(self.cfg.duration);
        while let Some(Reverse((at, seq))) = self.queue.pop() {
            if at > end {
                break;
            }
            self.now = at;
            let ev = self.events.remove(&seq).expect("event");
            self.report.events += 1;
            match ev {
                Ev::IoBegin(id) => self.io_begin(id),
                Ev::IoEnd(id) => self.io_end(id),
                Ev::IoTimeout(id) => self.io_timeout(id),
                Ev::Deliver {
                    host,
                    inc,
                    slot,
                    epoch,
                    input,
                } => {
                    if !self.live(host, inc) || !self.task_waiting(host, slot, epoch) {
                        continue;
                    }
                    if self.hosts[host].paused_until > self.now {
                        let at = self.hosts[host].paused_until;
                        self.push(
                            at,
                            Ev::Deliver {
                                host,
                                inc,
                                slot,
                                epoch,
                                input,
                            },
                        );
                        continue;
                    }
                    let input = match input {
                        DeliverInput::Read(r) => Input::Read(r),
                        DeliverInput::Wrote(r) => Input::Wrote(r),
                    };
                    self.step(host, slot, input)?;
                }
                Ev::Wake {
                    host,
                    inc,
                    slot,
                    epoch,
                } => {
                    if !self.live(host, inc) || !self.task_waiting(host, slot, epoch) {
                        continue;
                    }
                    if self.hosts[host].paused_until > self.now {
                        let at = self.hosts[host].paused_until;
                        self.push(
                            at,
                            Ev::Wake {
                                host,
                                inc,
                                slot,
                                epoch,
                            },
                        );
                        continue;
                    }
                    self.step(host, slot, Input::Woke)?;
                }
                Ev::Act { host, inc } => {
                    if self.hosts[host].inc != inc {
                        continue;
                    }
                    if let Some(until) = self.hosts[host].dead_until {
                        if until > self.now {
                            continue;
                        }
                        self.hosts[host].dead_until = None;
                        self.hosts[host].busy_until.clear();
                        self.log(format!("host {host} restarted"));
                    }
                    if self.hosts[host].paused_until > self.now {
                        let at = self.hosts[host].paused_until;
                        self.push(at, Ev::Act { host, inc });
                        continue;
                    }
                    self.act(host)?;
                }
                Ev::Renew { host, inc, due } => {
                    if !self.live(host, inc) || self.hosts[host].tasks.contains_key(&Slot::Renew) {
                        continue;
                    }
                    if self.hosts[host].paused_until > self.now {
                        let at = self.hosts[host].paused_until;
                        self.push(at, Ev::Renew { host, inc, due });
                        continue;
                    }
                    let (record, prev_ok, last_success) = match &self.hosts[host].ls {
                        Ls::Held {
                            record,
                            prev_ok,
                            last_success,
                            releasing: false,
                            ..
                        } => (record.clone(), *prev_ok, *last_success),
                        _ => continue,
                    };
                    let expected = if prev_ok {
                        last_success + self.t.renewal()
                    } else {
                        due
                    };
                    if due != expected {
                        continue;
                    }
                    let m = DeltaRenew::new(self.space, record, prev_ok, self.cfg.host_ids, self.t);
                    self.start_task(host, Slot::Renew, Mach::DRenew(Box::new(m)))?;
                }
                Ev::Fence { host, inc } => {
                    if !self.live(host, inc) {
                        continue;
                    }
                    if self.hosts[host].paused_until > self.now {
                        let at = self.hosts[host].paused_until;
                        self.push(at, Ev::Fence { host, inc });
                        continue;
                    }
                    let now_local = self.hosts[host].local(self.now);
                    if let Some(ls) = self.hosts[host].valid_until() {
                        if now_local >= ls + self.t.renewal_fail() {
                            self.fence(host, "no renewal for 8N");
                        }
                    }
                }
            }
            self.check()?;
        }
        Ok(self.report)
    }
}

fn read_area(area: &[u8], offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let start = offset as usize;
    if start < area.len() {
        let end = (start + len).min(area.len());
        out[..end - start].copy_from_slice(&area[start..end]);
    }
    out
}

/// Runs one simulation; `Err` describes the first invariant violation with a trace.
pub fn run(cfg: &SimConfig) -> Result<SimReport, Violation> {
    assert!(cfg.hosts >= 1 && cfg.host_ids >= 1 && cfg.host_ids <= crate::format::MAX_HOSTS);
    Sim::new(cfg).run()
}
