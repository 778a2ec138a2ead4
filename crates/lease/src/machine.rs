//! The sans-IO core: lease algorithms are state machines that ask for I/O and sleeps and are
//! resumed with the results. One blocking [`Driver`] runs them on real files and a real clock;
//! the simulator in [`crate::sim`] runs the very same machines against a simulated store, with
//! faults, many hosts and a seeded schedule.
//!
//! A machine is resumed with a [`Cx`] (the host's clock reading, how long its delta lease is
//! still valid, and its liveness view of other hosts) and an [`Input`]; it answers with a
//! [`Step`]. Machines never block and never read a clock themselves.
//!
//! Invariant: a machine that is about to write lease state checks `Cx::valid_until` first and
//! gives up once its host's delta lease has expired, so a host that was frozen past its fence
//! deadline does not write stale ballots or leaders when it wakes up.

use std::time::Duration;

use crate::clock::{Clock, Wake};
use crate::hosts::HostTable;
use crate::io::{IoError, SectorIo};

/// Which lease area an I/O addresses; offsets are relative to the area's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Area {
    /// The lockspace (delta leases, one sector per host id).
    Lockspace,
    /// The Paxos resource being acquired or released.
    Resource,
}

/// An I/O a machine asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoOp {
    Read { area: Area, offset: u64, len: usize },
    Write { area: Area, offset: u64, data: Vec<u8> },
}

impl IoOp {
    pub fn area(&self) -> Area {
        match self {
            IoOp::Read { area, .. } | IoOp::Write { area, .. } => *area,
        }
    }
}

/// What a machine is resumed with.
#[derive(Debug)]
pub enum Input {
    /// First resume.
    Start,
    /// Completion of the read it asked for.
    Read(Result<Vec<u8>, IoError>),
    /// Completion of the write it asked for.
    Wrote(Result<(), IoError>),
    /// The sleep it asked for is over.
    Woke,
}

/// What a machine wants next.
#[derive(Debug)]
pub enum Step<T> {
    Io(IoOp),
    /// Resume with [`Input::Woke`] at this time of the host's clock.
    SleepUntil(Duration),
    Done(T),
}

/// The host's context at one resume.
#[derive(Debug, Clone, Copy)]
pub struct Cx<'a> {
    /// The host's monotonic clock.
    pub now: Duration,
    /// The host's delta lease is valid (renewed within 8N) until this time; `None` when the
    /// machine runs outside a lockspace (initialisation, admin tools).
    pub valid_until: Option<Duration>,
    /// The host's liveness view of the lockspace, if it holds one.
    pub hosts: Option<&'a HostTable>,
}

impl Cx<'_> {
    /// True once the host's delta lease has expired.
    pub fn expired(&self) -> bool {
        matches!(self.valid_until, Some(v) if self.now >= v)
    }

    /// The clock in whole seconds, as written into timestamps (never 0, which means "free").
    pub fn now_secs(&self) -> u64 {
        self.now.as_secs().max(1)
    }
}

/// A lease algorithm as a resumable state machine.
pub trait Machine {
    type Output;
    fn resume(&mut self, cx: &Cx<'_>, input: Input) -> Step<Self::Output>;
}

/// Supplies the [`Cx`] for each resume (the lockspace locks its state around the call).
pub trait CxSource {
    fn with_cx(&self, now: Duration, f: &mut dyn FnMut(&Cx<'_>));
}

/// A context without a lockspace.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLockspace;

impl CxSource for NoLockspace {
    fn with_cx(&self, now: Duration, f: &mut dyn FnMut(&Cx<'_>)) {
        f(&Cx {
            now,
            valid_until: None,
            hosts: None,
        })
    }
}

/// The driver was stopped (its [`Wake`] signalled) while the machine slept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stopped while waiting")]
pub struct Stopped;

/// Runs machines with blocking I/O (each call bounded by the [`SectorIo`]'s own timeout) and
/// real sleeps on a [`Clock`].
pub struct Driver<'a> {
    pub clock: &'a dyn Clock,
    pub lockspace: Option<&'a dyn SectorIo>,
    pub resource: Option<&'a dyn SectorIo>,
    pub stop: &'a Wake,
}

impl Driver<'_> {
    pub fn run<M: Machine>(&self, m: &mut M, src: &dyn CxSource) -> Result<M::Output, Stopped> {
        let mut input = Some(Input::Start);
        loop {
            let now = self.clock.now();
            let mut step = None;
            src.with_cx(now, &mut |cx| {
                let inp = input.take().expect("one input per resume");
                step = Some(m.resume(cx, inp));
            });
            match step.expect("with_cx calls back") {
                Step::Done(out) => return Ok(out),
                Step::SleepUntil(t) => {
                    if self.clock.sleep_until(t, self.stop) {
                        return Err(Stopped);
                    }
                    input = Some(Input::Woke);
                }
                Step::Io(op) => {
                    let io = match op.area() {
                        Area::Lockspace => self.lockspace,
                        Area::Resource => self.resource,
                    };
                    input = Some(match (op, io) {
                        (IoOp::Read { offset, len, .. }, Some(io)) => Input::Read(io.read(offset, len)),
                        (IoOp::Write { offset, data, .. }, Some(io)) => Input::Wrote(io.write(offset, &data)),
                        (IoOp::Read { .. }, None) => Input::Read(Err(no_area())),
                        (IoOp::Write { .. }, None) => Input::Wrote(Err(no_area())),
                    });
                }
            }
        }
    }
}

fn no_area() -> IoError {
    IoError::Os(std::sync::Arc::new(std::io::Error::other(
        "no lockspace is attached to this operation",
    )))
}
