//! Fault injection for saga tests: fail or "crash" at any step boundary.
//!
//! Used with [`SagaExecutor::with_faults`](super::SagaExecutor::with_faults). The harnesses
//! [`unwind_at_each_step`] and [`crash_at_each_point`] implement the omicron pattern for any
//! saga: for every step in turn, inject a failure (or a crash), and let the caller check that
//! the system ends consistent.

use std::future::Future;
use std::sync::{Arc, Mutex};

use super::SagaOutcome;

/// Where, around a step's action or undo, a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// After `started` is recorded, before the action runs.
    BeforeAction,
    /// After the action ran, before its result is recorded.
    AfterAction,
    /// After `undo_started` is recorded, before the undo runs.
    BeforeUndo,
    /// After the undo ran, before `undone` is recorded.
    AfterUndo,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 4] = [
        FaultPoint::BeforeAction,
        FaultPoint::AfterAction,
        FaultPoint::BeforeUndo,
        FaultPoint::AfterUndo,
    ];
}

/// What happens there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The action (or undo) counts as failed: before it ran, or after it succeeded.
    Fail,
    /// The executor stops on the spot and records nothing more, as if the engine died.
    Crash,
}

/// Decides the fault, if any, at each boundary.
pub trait FaultInjector: Send + Sync + 'static {
    fn fault(&self, saga: &str, step: usize, point: FaultPoint) -> Option<Fault>;
}

/// One fault at one place, fired at most once.
#[derive(Debug)]
pub struct FaultAt {
    pub step: usize,
    pub point: FaultPoint,
    pub fault: Fault,
    fired: Mutex<bool>,
}

impl FaultAt {
    pub fn new(step: usize, point: FaultPoint, fault: Fault) -> Arc<Self> {
        Arc::new(FaultAt {
            step,
            point,
            fault,
            fired: Mutex::new(false),
        })
    }
    pub fn fired(&self) -> bool {
        *self.fired.lock().expect("fault lock")
    }
}

impl FaultInjector for FaultAt {
    fn fault(&self, _saga: &str, step: usize, point: FaultPoint) -> Option<Fault> {
        let mut fired = self.fired.lock().expect("fault lock");
        if !*fired && step == self.step && point == self.point {
            *fired = true;
            Some(self.fault)
        } else {
            None
        }
    }
}

/// Several faults, each fired once.
pub struct Faults(pub Vec<Arc<FaultAt>>);

impl FaultInjector for Faults {
    fn fault(&self, saga: &str, step: usize, point: FaultPoint) -> Option<Fault> {
        self.0.iter().find_map(|f| f.fault(saga, step, point))
    }
}

/// The omicron "unwind at each step" test: for each step `i` of a saga with `steps` steps and
/// for both failure points (before the action, after it succeeded), `run(fault)` must run the
/// saga from a fresh state with that fault and return its outcome, then `check(i)` asserts
/// that the system is as if the saga never ran. Panics naming the step on any deviation.
/// For a saga without a point of no return; see [`fail_at_each_step`] for one with.
pub async fn unwind_at_each_step<R, RF, K, KF>(steps: usize, run: R, mut check: K)
where
    R: FnMut(Arc<FaultAt>) -> RF,
    RF: Future<Output = SagaOutcome>,
    K: FnMut(usize) -> KF,
    KF: Future<Output = ()>,
{
    fail_at_each_step(steps, None, run, |i, _, _| check(i)).await
}

/// [`unwind_at_each_step`] for any saga: a failure before the point of no return `no_return`
/// must unwind it, one at or after it must be retried to the end (the executor must retry at
/// least once). `check(i, point, outcome)` then asserts the system is as if the saga never
/// ran, or as if it ran without a hitch.
pub async fn fail_at_each_step<R, RF, K, KF>(steps: usize, no_return: Option<usize>, mut run: R, mut check: K)
where
    R: FnMut(Arc<FaultAt>) -> RF,
    RF: Future<Output = SagaOutcome>,
    K: FnMut(usize, FaultPoint, SagaOutcome) -> KF,
    KF: Future<Output = ()>,
{
    for i in 0..steps {
        for point in [FaultPoint::BeforeAction, FaultPoint::AfterAction] {
            let fault = FaultAt::new(i, point, Fault::Fail);
            let outcome = run(fault.clone()).await;
            assert!(fault.fired(), "step {i}: the {point:?} fault never fired");
            let forward = no_return.is_some_and(|p| i >= p);
            match (&outcome, forward) {
                (SagaOutcome::Unwound { .. }, false) | (SagaOutcome::Done { .. }, true) => {}
                (other, _) => panic!(
                    "step {i} {point:?}: expected the saga to {}, got {other:?}",
                    if forward { "finish" } else { "unwind" }
                ),
            }
            check(i, point, outcome).await;
        }
    }
}

/// The crash test: for each step `i` and each [`FaultPoint`], `run(crash)` runs the saga (from
/// a fresh state) until the crash, then "restarts the engine" (drops the executor, reopens the
/// database, resumes) and returns the outcome after resuming; `check(i, point, outcome)`
/// asserts consistency. Undo points crash while unwinding a failure injected at the last step
/// before the point of no return `no_return` (or the last step), so every undo that can run is
/// crashed once. Panics naming the step on any deviation.
pub async fn crash_at_each_point<R, RF, K, KF>(
    steps: usize,
    no_return: Option<usize>,
    mut run: R,
    mut check: K,
) where
    R: FnMut(Vec<Arc<FaultAt>>) -> RF,
    RF: Future<Output = SagaOutcome>,
    K: FnMut(usize, FaultPoint, SagaOutcome) -> KF,
    KF: Future<Output = ()>,
{
    let undoable = no_return.unwrap_or(steps).min(steps);
    for i in 0..steps {
        for point in FaultPoint::ALL {
            let undo = matches!(point, FaultPoint::BeforeUndo | FaultPoint::AfterUndo);
            if undo && i >= undoable {
                continue;
            }
            let crash = FaultAt::new(i, point, Fault::Crash);
            let mut faults = vec![crash.clone()];
            if undo {
                faults.push(FaultAt::new(undoable - 1, FaultPoint::AfterAction, Fault::Fail));
            }
            let outcome = run(faults).await;
            assert!(crash.fired(), "step {i}: the {point:?} crash never fired");
            assert!(
                !matches!(outcome, SagaOutcome::Interrupted),
                "step {i} {point:?}: the resumed saga did not finish"
            );
            check(i, point, outcome).await;
        }
    }
}
