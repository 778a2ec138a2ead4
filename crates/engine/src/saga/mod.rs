//! Sagas: multi-step commands persisted step by step, each step with an undo.
//!
//! A saga type ([`SagaDef`]) is an ordered list of [`Step`]s over typed parameters. The
//! [`SagaExecutor`] runs an instance: it writes the saga and a job to the database, then for
//! each step records `started`, runs the action, and records `done` with the action's output
//! (JSON) — each record its own transaction. When an action fails, the saga turns to
//! `unwinding` and the executor runs the undo of every step that started, in reverse order,
//! recording `undo_started` and `undone` for each. After an engine crash, [`SagaExecutor::resume_all`]
//! reads the log and continues each unfinished saga where it stopped, forward or backward.
//!
//! ```text
//!            action ok                         all steps done
//!   running ──────────► next step … ─────────────────────────► done
//!      │ action failed
//!      ▼        undo ok for every started step
//!   unwinding ─────────────────────────────────► unwound
//!      │ an undo failed
//!      ▼
//!    stuck  (error recorded; an admin fixes the cause, then retry_stuck unwinds again)
//!
//!   unwinding, an undo answers StepError::forward (its effect is permanent):
//!      that step counts as done, the steps after it are re-run ──► running
//!
//!   running, at or past the point of no return:
//!      │ action failed ──► the step is retried with backoff (ForwardRetry) ──► next step …
//!      │ still failing after the last attempt
//!      ▼
//!   blocked (error recorded; an admin fixes the cause, then retry_stuck goes on forward)
//! ```
//!
//! A saga may mark one step as its **point of no return**
//! ([`Step::point_of_no_return`]): the step that destroys what an undo would need (deleting
//! an image, merging a volume into its parent, switching a migrated VM over). Once that step
//! has started the saga never unwinds: rolling back would put back records whose data is
//! gone (a disk row without its image). A failure there or later is retried, since such
//! steps are idempotent and their failures mostly transient (an SPM moving, a node
//! restarting); a saga that still cannot finish is `blocked` until an admin retries it.
//!
//! # The contract for step authors
//!
//! - **Actions are idempotent.** A crash between an action's effect and the record of its
//!   completion makes the executor run it again on resume. Running it twice must leave the same
//!   state as once: create with ids decided *before* the step (by an earlier step's output or
//!   the parameters), and treat "already exists with those ids" as success.
//! - **Undos are idempotent and total.** An undo may run after its action completed, after it
//!   failed half-way, after it never ran at all (a crash right after `started` was recorded),
//!   or twice. It must only remove what this saga created (identified by the saga's own ids)
//!   and succeed when there is nothing left to remove.
//! - **The failing step is undone too**: an action that fails may have done part of its work
//!   (a node call that timed out may still complete). So an undo never assumes its action
//!   succeeded: a lock step locks with the saga's id as owner (`Db::disk_lock(disk, saga_id)`)
//!   and its undo releases only that owner's lock, never a lock another command holds.
//! - **An undo that cannot undo because the world moved on** (a guest writes to the volume
//!   its step created) answers [`StepError::forward`] instead of failing: the saga keeps that
//!   step and the ones before it and runs the later ones again, forward to `done`.
//! - **Outputs are the only memory.** A step sees the parameters and the outputs of earlier
//!   steps ([`StepCtx::output`]); anything else it needs it must read from the database or the
//!   nodes. Nothing in memory survives a crash.
//! - Keep database transactions inside one step; never hold one across a call to a node.
//!
//! Each saga drives a job (one job step per saga step, plus a clean-up step while unwinding)
//! and emits events when it starts, finishes, unwinds or gets stuck, so users see what
//! happened; see [`SagaDef::event`] to give those events oVirt's codes and object references.
//!
//! # Example
//!
//! ```no_run
//! use oxvirt_engine::saga::{SagaDef, SagaExecutor, StartOptions, Step, StepCtx, StepError};
//! use oxvirt_engine::model::{Disk, DiskFormat, DiskId, SdUuid};
//! use serde::{Deserialize, Serialize};
//!
//! struct App; // what steps need besides the database: node clients, …
//!
//! #[derive(Serialize, Deserialize)]
//! struct Params { name: String, sd: SdUuid, size: u64 }
//!
//! struct AddDisk;
//! impl SagaDef for AddDisk {
//!     type Ctx = App;
//!     type Params = Params;
//!     const NAME: &'static str = "add_disk";
//!     fn description(p: &Params) -> String { format!("Adding disk {}", p.name) }
//!     fn steps() -> Vec<Step<Self>> {
//!         vec![
//!             // Decide the ids first, so later steps and undos agree on them after a crash.
//!             Step::new("ids", |_c: StepCtx<Self>| async { Ok(DiskId::new_random()) }, |_c| async { Ok(()) }),
//!             Step::new("row", insert_row, delete_row).describe("Recording the disk"),
//!         ]
//!     }
//! }
//!
//! async fn insert_row(c: StepCtx<AddDisk>) -> Result<(), StepError> {
//!     let id: DiskId = c.output("ids")?;
//!     if c.db().disk_get(id).await?.is_none() {
//!         let p = c.params();
//!         let mut d = Disk::new(&p.name, p.sd, DiskFormat::Cow, p.size);
//!         d.id = id;
//!         c.db().disk_insert(&d).await?;
//!     }
//!     Ok(())
//! }
//!
//! async fn delete_row(c: StepCtx<AddDisk>) -> Result<(), StepError> {
//!     let id: DiskId = c.output("ids")?;
//!     if c.db().disk_get(id).await?.is_some() {
//!         c.db().disk_delete(id).await?;
//!     }
//!     Ok(())
//! }
//!
//! # async fn demo(db: oxvirt_engine::Db, sd: SdUuid) -> Result<(), Box<dyn std::error::Error>> {
//! let exec = SagaExecutor::new(db, std::sync::Arc::new(App));
//! exec.register::<AddDisk>();
//! exec.resume_all().await?; // at engine start-up, before accepting commands
//! let outcome = exec
//!     .run::<AddDisk>(Params { name: "d1".into(), sd, size: 1 << 30 }, StartOptions::default())
//!     .await?;
//! assert!(outcome.is_done());
//! # Ok(()) }
//! ```

mod exec;
pub mod testing;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::db::{Db, DbError};
use crate::model::{JobId, NewEvent, SagaId, Severity};

pub use crate::db::{SagaRecord, SagaState, SagaStepRecord, SagaStepStatus};
pub use exec::{ForwardRetry, SagaExecutor, SagaHandle, SagaStartSignal, ON_SAGA_START};

/// Event codes for sagas whose definition does not choose oVirt's (see [`SagaDef::event`]).
pub mod codes {
    pub const SAGA_STARTED: i32 = 20_001;
    pub const SAGA_DONE: i32 = 20_002;
    pub const SAGA_UNWOUND: i32 = 20_003;
    pub const SAGA_STUCK: i32 = 20_004;
    pub const SAGA_BLOCKED: i32 = 20_005;
    /// A command answered before its saga ended, whose work after the saga failed (a new
    /// disk's hot plug, say).
    pub const FOLLOW_UP_FAILED: i32 = 20_006;
}

/// What the saga is telling users about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaEventKind {
    Started,
    Done,
    /// A step failed and every completed step was undone.
    Unwound,
    /// An undo failed: the system may be inconsistent until an admin acts.
    Stuck,
    /// A step past the point of no return keeps failing: the command is half done until an
    /// admin removes the cause and retries it.
    Blocked,
}

/// A saga type: its parameters, its steps, and how it shows up in jobs and events.
pub trait SagaDef: Sized + Send + Sync + 'static {
    /// What steps need besides the database (node clients, configuration…), shared by all.
    type Ctx: Send + Sync + 'static;
    /// The command's input, persisted as JSON with the saga.
    type Params: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Unique among the executor's sagas; persisted, so never rename a saga that shipped.
    const NAME: &'static str;

    /// The job's description ("Creating VM web1") when the command gives none (see
    /// [`StartOptions::description`]).
    fn description(params: &Self::Params) -> String;

    /// The steps in order. Names are unique and persisted: append new steps, never reorder.
    fn steps() -> Vec<Step<Self>>;

    /// The event for a saga milestone of the job described as `what` (see
    /// [`StartOptions::description`]); the default is [`milestone_event`]: generic codes, no
    /// references. `detail` is the error for `Unwound`, `Stuck` and `Blocked`.
    fn event(_params: &Self::Params, what: &str, kind: SagaEventKind, detail: Option<&str>) -> NewEvent {
        milestone_event(what, kind, detail)
    }
}

/// The event for a milestone of the saga whose job is `what`: generic codes, no references.
/// `detail` is the error for `Unwound`, `Stuck` and `Blocked`.
pub fn milestone_event(what: &str, kind: SagaEventKind, detail: Option<&str>) -> NewEvent {
    match kind {
            SagaEventKind::Started => {
                NewEvent::new(Severity::Normal, codes::SAGA_STARTED, format!("{what}: started"))
            }
            SagaEventKind::Done => {
                NewEvent::new(Severity::Normal, codes::SAGA_DONE, format!("{what}: completed"))
            }
            SagaEventKind::Unwound => NewEvent::new(
                Severity::Error,
                codes::SAGA_UNWOUND,
                format!("{what}: failed and was rolled back: {}", detail.unwrap_or("")),
            ),
            SagaEventKind::Stuck => NewEvent::new(
                Severity::Alert,
                codes::SAGA_STUCK,
                format!(
                    "{what}: failed and could not be rolled back, needs an administrator: {}",
                    detail.unwrap_or("")
                ),
            ),
            SagaEventKind::Blocked => NewEvent::new(
                Severity::Alert,
                codes::SAGA_BLOCKED,
                format!(
                    "{what}: cannot be completed and is past rolling back, needs an administrator to retry it: {}",
                    detail.unwrap_or("")
                ),
            ),
    }
}

/// A step's failure: any error converts into it with `?`.
pub struct StepError(Box<dyn std::error::Error + Send + Sync + 'static>, bool);

impl StepError {
    pub fn msg(m: impl fmt::Display) -> Self {
        StepError(m.to_string().into(), false)
    }

    /// For an undo that finds its step's effect already permanent — the world went on past it
    /// (a guest writes to the volume the step created, unheard by the engine): the saga cannot
    /// unwind past this step, so it turns forward again, keeping this step and those before
    /// it and re-running the ones after it (their actions are idempotent).
    pub fn forward(m: impl fmt::Display) -> Self {
        StepError(m.to_string().into(), true)
    }

    /// Whether an undo asked the saga to go forward instead ([`StepError::forward`]).
    pub fn goes_forward(&self) -> bool {
        self.1
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for StepError {
    fn from(e: E) -> Self {
        StepError(Box::new(e), false)
    }
}

impl fmt::Display for StepError {
    /// The error with its sources, `: `-separated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut src = self.0.source();
        while let Some(s) = src {
            write!(f, ": {s}")?;
            src = s.source();
        }
        Ok(())
    }
}

impl fmt::Debug for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StepError({self})")
    }
}

/// What the executor could not do (the saga itself failing is a [`SagaOutcome`]).
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    #[error("saga log")]
    Db(#[from] DbError),
    #[error("saga {0:?} is not registered with this executor")]
    Unknown(String),
    #[error("saga {name} is badly defined: {detail}")]
    Definition { name: &'static str, detail: String },
    #[error("parameters of saga {name} do not serialize")]
    Params {
        name: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("saga {0} not found")]
    NotFound(SagaId),
    #[error("saga {id} is {state}, neither stuck nor blocked")]
    NotStuck { id: SagaId, state: SagaState },
    #[error("saga {0} is already running in this engine")]
    AlreadyRunning(SagaId),
    #[error("saga {id} task ended abnormally: {detail}")]
    Task { id: SagaId, detail: String },
}

/// How a saga ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SagaOutcome {
    /// Every step done; the outputs by step name.
    Done { outputs: BTreeMap<String, Value> },
    /// A step failed (`error`) and every started step was undone.
    Unwound { error: String },
    /// A step failed and then an undo failed too; the saga waits for an admin.
    Stuck { error: String, undo_error: String },
    /// A step at or past the point of no return failed on every attempt; the saga waits for
    /// an admin to retry it forward.
    Blocked { error: String },
    /// Fault injection stopped the executor mid-saga, as a crash would (tests only).
    Interrupted,
}

impl SagaOutcome {
    pub fn is_done(&self) -> bool {
        matches!(self, SagaOutcome::Done { .. })
    }
    /// The output of a done saga's step.
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Option<T> {
        match self {
            SagaOutcome::Done { outputs } => outputs
                .get(step)
                .and_then(|v| serde_json::from_value(v.clone()).ok()),
            _ => None,
        }
    }
}

/// Per-run options.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The caller's correlation id (REST `Correlation-Id`), on the job and every event.
    pub correlation_id: Option<String>,
    /// The job's description, naming objects as the administrator knows them ("Starting VM
    /// web1"); `None`: [`SagaDef::description`] of the parameters. Kept with the job, and the
    /// saga's events say it too, also after a resume.
    pub description: Option<String>,
}

type ActionFn<S> = Arc<dyn Fn(StepCtx<S>) -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync>;
type UndoFn<S> = Arc<dyn Fn(StepCtx<S>) -> BoxFuture<'static, Result<(), StepError>> + Send + Sync>;

/// One step: a name, an action and its undo.
pub struct Step<S: SagaDef> {
    pub(crate) name: &'static str,
    pub(crate) description: Option<String>,
    pub(crate) action: ActionFn<S>,
    pub(crate) undo: UndoFn<S>,
    pub(crate) no_return: bool,
}

impl<S: SagaDef> Step<S> {
    /// A step whose action returns `O` (persisted as its output) and whose undo reverses it.
    pub fn new<A, AF, O, U, UF>(name: &'static str, action: A, undo: U) -> Self
    where
        A: Fn(StepCtx<S>) -> AF + Send + Sync + 'static,
        AF: Future<Output = Result<O, StepError>> + Send + 'static,
        O: Serialize + 'static,
        U: Fn(StepCtx<S>) -> UF + Send + Sync + 'static,
        UF: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        let action: ActionFn<S> = Arc::new(move |c| {
            let fut = action(c);
            Box::pin(async move {
                let out = fut.await?;
                serde_json::to_value(out).map_err(StepError::from)
            })
        });
        let undo: UndoFn<S> = Arc::new(move |c| Box::pin(undo(c)));
        Step {
            name,
            description: None,
            action,
            undo,
            no_return: false,
        }
    }

    /// A step with nothing to undo (it only reads, or only decides ids).
    pub fn without_undo<A, AF, O>(name: &'static str, action: A) -> Self
    where
        A: Fn(StepCtx<S>) -> AF + Send + Sync + 'static,
        AF: Future<Output = Result<O, StepError>> + Send + 'static,
        O: Serialize + 'static,
    {
        Step::new(name, action, |_c| async { Ok(()) })
    }

    /// Makes this step the saga's point of no return (at most one per saga): once its action
    /// has started, failures here and after are retried forward, never unwound. Its undo and
    /// those of later steps never run.
    pub fn point_of_no_return(mut self) -> Self {
        self.no_return = true;
        self
    }

    /// The job step's description (default: the step's name).
    pub fn describe(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// What a step's action and undo see.
pub struct StepCtx<S: SagaDef> {
    pub saga_id: SagaId,
    pub job_id: JobId,
    /// The step's position in the saga.
    pub index: usize,
    pub correlation_id: Option<String>,
    db: Db,
    app: Arc<S::Ctx>,
    params: Arc<S::Params>,
    outputs: Arc<BTreeMap<String, Value>>,
    own: &'static str,
    _s: PhantomData<fn() -> S>,
}

impl<S: SagaDef> StepCtx<S> {
    pub fn db(&self) -> &Db {
        &self.db
    }
    pub fn app(&self) -> &S::Ctx {
        &self.app
    }
    pub fn app_arc(&self) -> Arc<S::Ctx> {
        self.app.clone()
    }
    pub fn params(&self) -> &S::Params {
        &self.params
    }

    /// The output of an earlier, completed step.
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<T, StepError> {
        let v = self.outputs.get(step).ok_or_else(|| {
            StepError::msg(format!(
                "saga {} step {}: no output from step {step:?}",
                S::NAME,
                self.own
            ))
        })?;
        serde_json::from_value(v.clone()).map_err(StepError::from)
    }

    /// In an undo: this step's own output, if its action completed.
    pub fn own_output<T: DeserializeOwned>(&self) -> Option<T> {
        self.outputs
            .get(self.own)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// Records an event carrying the saga's correlation id.
    pub async fn event(&self, mut e: NewEvent) -> Result<(), StepError> {
        if e.correlation_id.is_none() {
            e.correlation_id = self.correlation_id.clone();
        }
        self.db.event_add(&e).await?;
        Ok(())
    }
}
