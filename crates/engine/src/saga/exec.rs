//! The executor: runs sagas as tokio tasks, writing every transition to the saga log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::testing::{Fault, FaultInjector, FaultPoint};
use super::{SagaDef, SagaError, SagaEventKind, SagaOutcome, StartOptions, Step, StepCtx, StepError};
use crate::db::repo::sagas::{saga_insert, saga_set_state, saga_step_record};
use crate::db::{Db, SagaRecord, SagaState, SagaStepStatus};
use crate::model::{JobId, JobStatus, SagaId, StepId, StepType};

tokio::task_local! {
    /// Set around a command by a caller that answers as soon as the command's work is under
    /// way (REST's asynchronous requests): whatever the command checks before its saga and
    /// in the saga's first step is still the request's answer, a refusal included; what
    /// follows is the job's.
    pub static ON_SAGA_START: SagaStartSignal;
}

/// Fires once, with the job of the first saga started under it, when that saga's first step
/// is done.
pub struct SagaStartSignal(Mutex<Option<tokio::sync::oneshot::Sender<JobId>>>);

impl SagaStartSignal {
    pub fn new() -> (SagaStartSignal, tokio::sync::oneshot::Receiver<JobId>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (SagaStartSignal(Mutex::new(Some(tx))), rx)
    }

    fn take(&self) -> Option<tokio::sync::oneshot::Sender<JobId>> {
        self.0.lock().expect("saga start signal").take()
    }
}

/// Runs sagas of the registered types with a shared application context `C`.
pub struct SagaExecutor<C: Send + Sync + 'static> {
    inner: Arc<Inner<C>>,
}

impl<C: Send + Sync + 'static> Clone for SagaExecutor<C> {
    fn clone(&self) -> Self {
        SagaExecutor {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<C> {
    db: Db,
    app: Arc<C>,
    registry: Mutex<HashMap<&'static str, Arc<dyn Erased<C>>>>,
    running: Mutex<HashSet<SagaId>>,
    faults: Option<Arc<dyn FaultInjector>>,
    retry: ForwardRetry,
}

/// How a step at or past a saga's point of no return is retried before the saga is
/// `blocked`: `attempts` tries in all, waiting `first_delay` after the first failure and
/// twice as long after each next one, up to `max_delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardRetry {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for ForwardRetry {
    /// Six tries over about 31 s: long enough for an SPM to move or a node to restart.
    fn default() -> Self {
        ForwardRetry {
            attempts: 6,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(16),
        }
    }
}

impl ForwardRetry {
    /// The wait after failed attempt `n` (1-based), or `None` when that was the last one.
    pub fn delay_after(&self, n: u32) -> Option<Duration> {
        if n >= self.attempts {
            return None;
        }
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        Some(self.first_delay.saturating_mul(factor).min(self.max_delay))
    }
}

/// A running saga.
pub struct SagaHandle {
    pub id: SagaId,
    pub job_id: Option<JobId>,
    task: JoinHandle<Result<SagaOutcome, SagaError>>,
    /// How many of the saga's first steps are done (recorded), while it runs.
    progress: watch::Receiver<usize>,
}

impl SagaHandle {
    /// Waits until the saga's first `n` steps are done and recorded (true), or until it ends
    /// without them (false): what a caller that answers before the work is over waits for
    /// (the step that records the new object, say).
    pub async fn steps_done(&mut self, n: usize) -> bool {
        // The sender goes with the saga's run; the last value stays readable after it.
        self.progress.wait_for(|&done| done >= n).await.is_ok()
    }

    /// Whether the saga has ended (its outcome is ready for [`wait`](Self::wait)).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the saga to end.
    pub async fn wait(self) -> Result<SagaOutcome, SagaError> {
        let id = self.id;
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(SagaError::Task {
                id,
                detail: e.to_string(),
            }),
        }
    }
}

trait Erased<C>: Send + Sync {
    fn drive(
        &self,
        inner: Arc<Inner<C>>,
        rec: SagaRecord,
        progress: watch::Sender<usize>,
    ) -> BoxFuture<'static, Result<SagaOutcome, SagaError>>;
    fn step_count(&self) -> usize;
    fn point_of_no_return(&self) -> Option<usize>;
}

struct Typed<S>(PhantomData<fn() -> S>);

impl<S: SagaDef> Erased<S::Ctx> for Typed<S> {
    fn drive(
        &self,
        inner: Arc<Inner<S::Ctx>>,
        rec: SagaRecord,
        progress: watch::Sender<usize>,
    ) -> BoxFuture<'static, Result<SagaOutcome, SagaError>> {
        Box::pin(drive::<S>(inner, rec, progress))
    }
    fn step_count(&self) -> usize {
        S::steps().len()
    }
    fn point_of_no_return(&self) -> Option<usize> {
        S::steps().iter().position(|s| s.no_return)
    }
}

fn check_definition<S: SagaDef>() -> Result<(), SagaError> {
    let steps = S::steps();
    if steps.is_empty() {
        return Err(SagaError::Definition {
            name: S::NAME,
            detail: "no steps".into(),
        });
    }
    if steps.iter().filter(|s| s.no_return).count() > 1 {
        return Err(SagaError::Definition {
            name: S::NAME,
            detail: "more than one point of no return".into(),
        });
    }
    let mut seen = HashSet::new();
    for s in &steps {
        if !seen.insert(s.name) {
            return Err(SagaError::Definition {
                name: S::NAME,
                detail: format!("step name {:?} appears twice", s.name),
            });
        }
    }
    Ok(())
}

impl<C: Send + Sync + 'static> SagaExecutor<C> {
    pub fn new(db: Db, app: Arc<C>) -> Self {
        Self::build(db, app, None, ForwardRetry::default())
    }

    /// An executor that retries steps past a point of no return as `retry` says.
    pub fn with_retry(db: Db, app: Arc<C>, retry: ForwardRetry) -> Self {
        Self::build(db, app, None, retry)
    }

    /// An executor that consults `faults` at every step boundary and retries forward as
    /// `retry` says (for tests; see [`testing`](super::testing)).
    pub fn with_faults(db: Db, app: Arc<C>, faults: Arc<dyn FaultInjector>, retry: ForwardRetry) -> Self {
        Self::build(db, app, Some(faults), retry)
    }

    fn build(db: Db, app: Arc<C>, faults: Option<Arc<dyn FaultInjector>>, retry: ForwardRetry) -> Self {
        SagaExecutor {
            inner: Arc::new(Inner {
                db,
                app,
                registry: Mutex::new(HashMap::new()),
                running: Mutex::new(HashSet::new()),
                faults,
                retry,
            }),
        }
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn app(&self) -> &Arc<C> {
        &self.inner.app
    }

    /// How many steps a registered saga type has (progress: steps done of this many).
    pub fn step_count(&self, saga_name: &str) -> Option<usize> {
        let reg = self.inner.registry.lock().expect("registry lock");
        reg.get(saga_name).map(|s| s.step_count())
    }

    /// The index of a registered saga type's point of no return, if it has one.
    pub fn point_of_no_return(&self, saga_name: &str) -> Option<usize> {
        let reg = self.inner.registry.lock().expect("registry lock");
        reg.get(saga_name).and_then(|s| s.point_of_no_return())
    }

    /// Makes a saga type known, so that [`resume_all`](Self::resume_all) can continue it.
    pub fn register<S: SagaDef<Ctx = C>>(&self) -> Result<(), SagaError> {
        check_definition::<S>()?;
        let mut reg = self.inner.registry.lock().expect("registry lock");
        reg.entry(S::NAME)
            .or_insert_with(|| Arc::new(Typed::<S>(PhantomData)));
        Ok(())
    }

    /// Records a new saga with its job and starts running it.
    pub async fn start<S: SagaDef<Ctx = C>>(
        &self,
        params: S::Params,
        opts: StartOptions,
    ) -> Result<SagaHandle, SagaError> {
        self.register::<S>()?;
        let value = serde_json::to_value(&params).map_err(|source| SagaError::Params {
            name: S::NAME,
            source,
        })?;
        let id = SagaId::new_random();
        let corr = opts.correlation_id.as_deref();
        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        let what = opts
            .description
            .clone()
            .unwrap_or_else(|| S::description(&params));
        let job = tx.job_start(&what, corr, Some(id)).await?;
        saga_insert(&mut tx.ctx(), id, S::NAME, &value, job.id, corr).await?;
        let mut ev = S::event(&params, &what, SagaEventKind::Started, None);
        ev.correlation_id = ev.correlation_id.or_else(|| opts.correlation_id.clone());
        tx.event_add(&ev).await?;
        tx.commit().await?;
        tracing::info!(saga_id = %id, saga = S::NAME, job_id = %job.id, "saga started");
        let now = db.now();
        let rec = SagaRecord {
            id,
            name: S::NAME.to_string(),
            params: value,
            state: SagaState::Running,
            error: None,
            undo_error: None,
            job_id: Some(job.id),
            correlation_id: opts.correlation_id,
            created_at: now,
            updated_at: now,
            steps: Vec::new(),
        };
        let handle = self.spawn(Arc::new(Typed::<S>(PhantomData)), rec)?;
        // Whoever waits for the work to be under way learns it once the first step (a
        // saga's checks and locks) is done; a saga that fails before never tells.
        if let Ok(Some(tx)) = ON_SAGA_START.try_with(SagaStartSignal::take) {
            let mut progress = handle.progress.clone();
            let job = job.id;
            tokio::spawn(async move {
                if progress.wait_for(|&done| done >= 1).await.is_ok() {
                    let _ = tx.send(job);
                }
            });
        }
        Ok(handle)
    }

    /// Starts a saga and waits for it to end.
    pub async fn run<S: SagaDef<Ctx = C>>(
        &self,
        params: S::Params,
        opts: StartOptions,
    ) -> Result<SagaOutcome, SagaError> {
        self.start::<S>(params, opts).await?.wait().await
    }

    /// Continues every unfinished saga in the log (call once at start-up, after registering
    /// every saga type). Sagas of unknown types are left as they are, with an alert event.
    pub async fn resume_all(&self) -> Result<Vec<SagaHandle>, SagaError> {
        let db = &self.inner.db;
        let recs = db.saga_list(&[SagaState::Running, SagaState::Unwinding]).await?;
        let mut handles = Vec::new();
        for rec in recs {
            if self.inner.running.lock().expect("running lock").contains(&rec.id) {
                continue;
            }
            let def = self
                .inner
                .registry
                .lock()
                .expect("registry lock")
                .get(rec.name.as_str())
                .cloned();
            let Some(def) = def else {
                tracing::error!(saga_id = %rec.id, saga = %rec.name, "cannot resume saga: type not registered");
                db.event_add(&crate::model::NewEvent {
                    correlation_id: rec.correlation_id.clone(),
                    ..crate::model::NewEvent::new(
                        crate::model::Severity::Alert,
                        super::codes::SAGA_STUCK,
                        format!(
                            "Saga {} ({}) cannot be resumed: this engine does not know it",
                            rec.id, rec.name
                        ),
                    )
                })
                .await?;
                continue;
            };
            tracing::info!(saga_id = %rec.id, saga = %rec.name, state = %rec.state, "resuming saga");
            handles.push(self.spawn(def, rec)?);
        }
        Ok(handles)
    }

    /// Retries a saga that waits for an admin, once the cause is removed: a `stuck` one
    /// unwinds again, a `blocked` one goes on forward from its failed step.
    pub async fn retry_stuck(&self, id: SagaId) -> Result<SagaHandle, SagaError> {
        let db = &self.inner.db;
        let rec = db.saga_get(id).await?.ok_or(SagaError::NotFound(id))?;
        let next = match rec.state {
            SagaState::Stuck => SagaState::Unwinding,
            SagaState::Blocked => SagaState::Running,
            state => return Err(SagaError::NotStuck { id, state }),
        };
        let def = self
            .inner
            .registry
            .lock()
            .expect("registry lock")
            .get(rec.name.as_str())
            .cloned()
            .ok_or_else(|| SagaError::Unknown(rec.name.clone()))?;
        let mut tx = db.begin().await?;
        let error = (next == SagaState::Unwinding)
            .then_some(rec.error.as_deref())
            .flatten();
        saga_set_state(&mut tx.ctx(), id, next, error, None).await?;
        if next == SagaState::Running {
            if let Some(job) = rec.job_id {
                tx.job_reopen(job).await?;
            }
        }
        tx.commit().await?;
        let rec = db.saga_get(id).await?.ok_or(SagaError::NotFound(id))?;
        self.spawn(def, rec)
    }

    fn spawn(&self, def: Arc<dyn Erased<C>>, rec: SagaRecord) -> Result<SagaHandle, SagaError> {
        let id = rec.id;
        if !self.inner.running.lock().expect("running lock").insert(id) {
            return Err(SagaError::AlreadyRunning(id));
        }
        let job_id = rec.job_id;
        let inner = self.inner.clone();
        let (progress_tx, progress) = watch::channel(0);
        let task = tokio::spawn(async move {
            let _guard = RunningGuard {
                inner: inner.clone(),
                id,
            };
            def.drive(inner.clone(), rec, progress_tx).await
        });
        Ok(SagaHandle {
            id,
            job_id,
            task,
            progress,
        })
    }
}

struct RunningGuard<C> {
    inner: Arc<Inner<C>>,
    id: SagaId,
}

impl<C> Drop for RunningGuard<C> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.inner.running.lock() {
            r.remove(&self.id);
        }
    }
}

/// The in-memory mirror of one step's log row.
#[derive(Clone)]
struct StepState {
    status: Option<SagaStepStatus>,
    job_step: Option<StepId>,
    error: Option<String>,
}

struct Run<S: SagaDef> {
    inner: Arc<Inner<S::Ctx>>,
    id: SagaId,
    job_id: Option<JobId>,
    correlation_id: Option<String>,
    params: Arc<S::Params>,
    /// What the saga's job says it does (its events say it too).
    description: String,
    steps: Vec<Step<S>>,
    state: Vec<StepState>,
    outputs: BTreeMap<String, Value>,
    no_return: Option<usize>,
    /// Steps done from the first, for the handle's [`SagaHandle::steps_done`].
    progress: watch::Sender<usize>,
}

enum Next {
    Continue,
    Unwind(String),
    /// A step at or past the point of no return failed: try it again.
    Retry(String),
    Interrupted,
}

async fn drive<S: SagaDef>(
    inner: Arc<Inner<S::Ctx>>,
    rec: SagaRecord,
    progress: watch::Sender<usize>,
) -> Result<SagaOutcome, SagaError> {
    let steps = S::steps();
    let params: Arc<S::Params> = serde_json::from_value(rec.params.clone())
        .map(Arc::new)
        .map_err(|e| SagaError::Definition {
            name: S::NAME,
            detail: format!("saga {} parameters do not decode: {e}", rec.id),
        })?;
    // The job keeps the description the command gave; a saga without one describes itself.
    let description = match rec.job_id {
        Some(job) => inner.db.job_get(job).await?.map(|j| j.description),
        None => None,
    }
    .unwrap_or_else(|| S::description(&params));
    let mut run = Run::<S> {
        inner: inner.clone(),
        id: rec.id,
        job_id: rec.job_id,
        correlation_id: rec.correlation_id.clone(),
        params,
        description,
        state: vec![
            StepState {
                status: None,
                job_step: None,
                error: None,
            };
            steps.len()
        ],
        no_return: steps.iter().position(|s| s.no_return),
        steps,
        outputs: BTreeMap::new(),
        progress,
    };
    for s in &rec.steps {
        match run.steps.get(s.index) {
            Some(def) if def.name == s.name => {}
            _ => {
                return run
                    .stuck(
                        rec.error.clone().unwrap_or_default(),
                        format!(
                            "the log's step {} ({}) does not match saga {}'s definition",
                            s.index,
                            s.name,
                            S::NAME
                        ),
                    )
                    .await;
            }
        }
        run.state[s.index] = StepState {
            status: Some(s.status),
            job_step: s.job_step_id,
            error: s.error.clone(),
        };
        if let Some(o) = &s.output {
            run.outputs.insert(s.name.clone(), o.clone());
        }
    }
    run.report_progress();

    let mut error = match rec.state {
        SagaState::Done | SagaState::Unwound | SagaState::Stuck | SagaState::Blocked => {
            return Err(SagaError::Definition {
                name: S::NAME,
                detail: format!("saga {} is already {}", rec.id, rec.state),
            })
        }
        SagaState::Unwinding => Some(rec.error.clone().unwrap_or_default()),
        SagaState::Running => None,
    };
    loop {
        let e = match error.take() {
            Some(e) => e,
            None => match run_forward(&mut run, &inner).await? {
                Ok(outcome) => return Ok(outcome),
                Err(e) => e,
            },
        };
        match run.unwind(e).await? {
            Some(outcome) => return Ok(outcome),
            // An undo turned the saga forward again.
            None => continue,
        }
    }
}

/// Runs the steps forward from the first not done: the saga's outcome, or the error to unwind
/// with.
async fn run_forward<S: SagaDef>(
    run: &mut Run<S>,
    inner: &Inner<S::Ctx>,
) -> Result<Result<SagaOutcome, String>, SagaError> {
    for i in 0..run.steps.len() {
        let mut attempt = 1;
        loop {
            match run.forward(i).await? {
                Next::Continue => break,
                Next::Interrupted => return Ok(Ok(SagaOutcome::Interrupted)),
                Next::Unwind(e) => return Ok(Err(e)),
                Next::Retry(e) => match inner.retry.delay_after(attempt) {
                    Some(d) => {
                        tracing::warn!(saga_id = %run.id, step = run.steps[i].name, attempt, error = %e, "retrying a step past the point of no return");
                        tokio::time::sleep(d).await;
                        attempt += 1;
                    }
                    None => return Ok(Ok(run.blocked(e).await?)),
                },
            }
        }
    }
    Ok(Ok(run.finish().await?))
}

impl<S: SagaDef> Run<S> {
    fn db(&self) -> &Db {
        &self.inner.db
    }

    fn report_progress(&self) {
        let done = self
            .state
            .iter()
            .take_while(|s| s.status == Some(SagaStepStatus::Done))
            .count();
        self.progress.send_replace(done);
    }

    /// Whether step `i` is at or after the point of no return (and so must go forward).
    fn past_no_return(&self, i: usize) -> bool {
        self.no_return.is_some_and(|p| i >= p)
    }

    fn fault(&self, i: usize, p: FaultPoint) -> Option<Fault> {
        process_crash_point(S::NAME, self.steps[i].name, p);
        self.inner.faults.as_ref().and_then(|f| f.fault(S::NAME, i, p))
    }

    fn ctx(&self, i: usize) -> StepCtx<S> {
        StepCtx {
            saga_id: self.id,
            job_id: self.job_id.unwrap_or_else(JobId::nil),
            index: i,
            correlation_id: self.correlation_id.clone(),
            db: self.inner.db.clone(),
            app: self.inner.app.clone(),
            params: self.params.clone(),
            outputs: Arc::new(self.outputs.clone()),
            own: self.steps[i].name,
            _s: PhantomData,
        }
    }

    fn event(&self, kind: SagaEventKind, detail: Option<&str>) -> crate::model::NewEvent {
        let mut e = S::event(&self.params, &self.description, kind, detail);
        if e.correlation_id.is_none() {
            e.correlation_id = self.correlation_id.clone();
        }
        e
    }

    async fn forward(&mut self, i: usize) -> Result<Next, SagaError> {
        let name = self.steps[i].name;
        match self.state[i].status {
            Some(SagaStepStatus::Done) => return Ok(Next::Continue),
            Some(SagaStepStatus::Started) => {
                tracing::info!(saga_id = %self.id, step = name, "re-running a step whose completion was not recorded");
            }
            None => {
                let mut tx = self.db().begin().await?;
                let js = match self.job_id {
                    Some(job) => {
                        let d = self.steps[i]
                            .description
                            .clone()
                            .unwrap_or_else(|| name.to_string());
                        Some(tx.job_step_start(job, None, StepType::Executing, &d).await?.id)
                    }
                    None => None,
                };
                saga_step_record(
                    &mut tx.ctx(),
                    self.id,
                    i,
                    name,
                    SagaStepStatus::Started,
                    None,
                    None,
                    js,
                )
                .await?;
                tx.commit().await?;
                self.state[i].status = Some(SagaStepStatus::Started);
                self.state[i].job_step = js;
            }
            Some(SagaStepStatus::Failed) if self.past_no_return(i) => {
                tracing::info!(saga_id = %self.id, step = name, "retrying a failed step past the point of no return");
            }
            // The failure (or a later undo) was recorded but the saga's state was not: unwind.
            Some(_) => {
                return Ok(Next::Unwind(
                    self.state[i]
                        .error
                        .clone()
                        .unwrap_or_else(|| format!("step {name} failed")),
                ))
            }
        }

        let result = match self.fault(i, FaultPoint::BeforeAction) {
            Some(Fault::Crash) => return Ok(Next::Interrupted),
            Some(Fault::Fail) => Err(format!("injected failure before step {name}")),
            None => {
                let fut = (self.steps[i].action)(self.ctx(i));
                let r = match AssertUnwindSafe(fut).catch_unwind().await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(p) => Err(format!("step {name} panicked: {}", panic_text(&p))),
                };
                match (r, self.fault(i, FaultPoint::AfterAction)) {
                    (_, Some(Fault::Crash)) => return Ok(Next::Interrupted),
                    (Ok(_), Some(Fault::Fail)) => Err(format!("injected failure after step {name}")),
                    (r, _) => r,
                }
            }
        };

        let mut tx = self.db().begin().await?;
        match result {
            Ok(out) => {
                saga_step_record(
                    &mut tx.ctx(),
                    self.id,
                    i,
                    name,
                    SagaStepStatus::Done,
                    Some(&out),
                    None,
                    None,
                )
                .await?;
                if let Some(js) = self.state[i].job_step {
                    tx.job_step_set_status(js, JobStatus::Finished).await?;
                }
                tx.commit().await?;
                tracing::debug!(saga_id = %self.id, step = name, "saga step done");
                self.state[i].status = Some(SagaStepStatus::Done);
                self.outputs.insert(name.to_string(), out);
                self.report_progress();
                Ok(Next::Continue)
            }
            Err(e) => {
                let msg = format!("step {name}: {e}");
                saga_step_record(
                    &mut tx.ctx(),
                    self.id,
                    i,
                    name,
                    SagaStepStatus::Failed,
                    None,
                    Some(&msg),
                    None,
                )
                .await?;
                self.state[i].status = Some(SagaStepStatus::Failed);
                if self.past_no_return(i) {
                    // The saga stays running: the step is retried, its job step stays open.
                    tx.commit().await?;
                    return Ok(Next::Retry(msg));
                }
                if let Some(js) = self.state[i].job_step {
                    tx.job_step_set_status(js, JobStatus::Failed).await?;
                }
                saga_set_state(&mut tx.ctx(), self.id, SagaState::Unwinding, Some(&msg), None).await?;
                tx.commit().await?;
                tracing::warn!(saga_id = %self.id, step = name, error = %e, "saga step failed; unwinding");
                Ok(Next::Unwind(msg))
            }
        }
    }

    async fn finish(&mut self) -> Result<SagaOutcome, SagaError> {
        let mut tx = self.db().begin().await?;
        saga_set_state(&mut tx.ctx(), self.id, SagaState::Done, None, None).await?;
        if let Some(job) = self.job_id {
            tx.job_end(job, JobStatus::Finished).await?;
        }
        tx.event_add(&self.event(SagaEventKind::Done, None)).await?;
        tx.commit().await?;
        tracing::info!(saga_id = %self.id, saga = S::NAME, "saga done");
        Ok(SagaOutcome::Done {
            outputs: self.outputs.clone(),
        })
    }

    /// The open clean-up job step, or a new one.
    async fn cleanup_step(&self) -> Result<Option<StepId>, SagaError> {
        let Some(job) = self.job_id else {
            return Ok(None);
        };
        let existing = self
            .db()
            .job_steps(job)
            .await?
            .into_iter()
            .find(|s| s.step_type == StepType::CleanUp && s.status == JobStatus::Started);
        if let Some(s) = existing {
            return Ok(Some(s.id));
        }
        let s = self
            .db()
            .job_step_start(job, None, StepType::CleanUp, "Rolling back")
            .await?;
        Ok(Some(s.id))
    }

    /// Runs the undos; `None` when an undo turned the saga forward again (see
    /// [`StepError::forward`]).
    async fn unwind(&mut self, error: String) -> Result<Option<SagaOutcome>, SagaError> {
        let cleanup = self.cleanup_step().await?;
        for i in (0..self.steps.len()).rev() {
            let name = self.steps[i].name;
            match self.state[i].status {
                None | Some(SagaStepStatus::Undone) => continue,
                Some(SagaStepStatus::UndoStarted) => {
                    tracing::info!(saga_id = %self.id, step = name, "re-running an undo whose completion was not recorded");
                }
                Some(_) => {
                    let mut tx = self.db().begin().await?;
                    saga_step_record(
                        &mut tx.ctx(),
                        self.id,
                        i,
                        name,
                        SagaStepStatus::UndoStarted,
                        None,
                        None,
                        None,
                    )
                    .await?;
                    tx.commit().await?;
                    self.state[i].status = Some(SagaStepStatus::UndoStarted);
                }
            }
            let result = match self.fault(i, FaultPoint::BeforeUndo) {
                Some(Fault::Crash) => return Ok(Some(SagaOutcome::Interrupted)),
                Some(Fault::Fail) => Err(format!("injected failure before undoing step {name}")),
                None => {
                    let fut = (self.steps[i].undo)(self.ctx(i));
                    let r = match AssertUnwindSafe(fut).catch_unwind().await {
                        Ok(Err(e)) if e.goes_forward() => {
                            self.turn_forward(i, &e.to_string(), cleanup).await?;
                            return Ok(None);
                        }
                        Ok(r) => r.map_err(|e: StepError| e.to_string()),
                        Err(p) => Err(format!("undo of step {name} panicked: {}", panic_text(&p))),
                    };
                    match (r, self.fault(i, FaultPoint::AfterUndo)) {
                        (_, Some(Fault::Crash)) => return Ok(Some(SagaOutcome::Interrupted)),
                        (Ok(()), Some(Fault::Fail)) => {
                            Err(format!("injected failure after undoing step {name}"))
                        }
                        (r, _) => r,
                    }
                }
            };
            match result {
                Ok(()) => {
                    let mut tx = self.db().begin().await?;
                    saga_step_record(
                        &mut tx.ctx(),
                        self.id,
                        i,
                        name,
                        SagaStepStatus::Undone,
                        None,
                        None,
                        None,
                    )
                    .await?;
                    if let Some(js) = self.state[i].job_step {
                        tx.job_step_set_status(js, JobStatus::Aborted).await?;
                    }
                    tx.commit().await?;
                    self.state[i].status = Some(SagaStepStatus::Undone);
                }
                Err(e) => {
                    let msg = format!("undo of step {name}: {e}");
                    let mut tx = self.db().begin().await?;
                    saga_step_record(
                        &mut tx.ctx(),
                        self.id,
                        i,
                        name,
                        SagaStepStatus::UndoFailed,
                        None,
                        Some(&msg),
                        None,
                    )
                    .await?;
                    tx.commit().await?;
                    self.state[i].status = Some(SagaStepStatus::UndoFailed);
                    return self.stuck_with(error, msg, cleanup).await.map(Some);
                }
            }
        }
        let mut tx = self.db().begin().await?;
        saga_set_state(&mut tx.ctx(), self.id, SagaState::Unwound, Some(&error), None).await?;
        if let Some(c) = cleanup {
            tx.job_step_set_status(c, JobStatus::Finished).await?;
        }
        if let Some(job) = self.job_id {
            tx.job_end(job, JobStatus::Failed).await?;
        }
        tx.event_add(&self.event(SagaEventKind::Unwound, Some(&error)))
            .await?;
        tx.commit().await?;
        tracing::warn!(saga_id = %self.id, saga = S::NAME, error = %error, "saga unwound");
        Ok(Some(SagaOutcome::Unwound { error }))
    }

    /// Step `i`'s undo found its effect permanent: the step counts as done, the steps after it
    /// are to run again (recorded `started`, so a crash now re-runs them too), and the saga is
    /// running. One transaction: a crash before it leaves the saga unwinding, and the same
    /// undo turns it forward again.
    async fn turn_forward(&mut self, i: usize, why: &str, cleanup: Option<StepId>) -> Result<(), SagaError> {
        let mut tx = self.db().begin().await?;
        for j in i..self.steps.len() {
            if self.state[j].status.is_none() {
                continue;
            }
            let now = if j == i {
                SagaStepStatus::Done
            } else {
                SagaStepStatus::Started
            };
            saga_step_record(
                &mut tx.ctx(),
                self.id,
                j,
                self.steps[j].name,
                now,
                None,
                None,
                None,
            )
            .await?;
            if let Some(js) = self.state[j].job_step {
                let st = if j == i {
                    JobStatus::Finished
                } else {
                    JobStatus::Started
                };
                tx.job_step_set_status(js, st).await?;
            }
            self.state[j].status = Some(now);
        }
        saga_set_state(&mut tx.ctx(), self.id, SagaState::Running, None, None).await?;
        if let Some(c) = cleanup {
            tx.job_step_set_status(c, JobStatus::Aborted).await?;
        }
        tx.commit().await?;
        tracing::warn!(saga_id = %self.id, saga = S::NAME, step = self.steps[i].name, reason = %why,
            "an undo found its step's effect permanent: the saga goes forward again");
        Ok(())
    }

    /// Ends a run whose step past the point of no return failed on every attempt.
    async fn blocked(&mut self, error: String) -> Result<SagaOutcome, SagaError> {
        let mut tx = self.db().begin().await?;
        saga_set_state(&mut tx.ctx(), self.id, SagaState::Blocked, Some(&error), None).await?;
        if let Some(job) = self.job_id {
            tx.job_end(job, JobStatus::Failed).await?;
        }
        tx.event_add(&self.event(SagaEventKind::Blocked, Some(&error)))
            .await?;
        tx.commit().await?;
        tracing::error!(saga_id = %self.id, saga = S::NAME, error = %error, "saga blocked past its point of no return");
        Ok(SagaOutcome::Blocked { error })
    }

    async fn stuck(&mut self, error: String, undo_error: String) -> Result<SagaOutcome, SagaError> {
        self.stuck_with(error, undo_error, None).await
    }

    async fn stuck_with(
        &mut self,
        error: String,
        undo_error: String,
        cleanup: Option<StepId>,
    ) -> Result<SagaOutcome, SagaError> {
        let mut tx = self.db().begin().await?;
        saga_set_state(
            &mut tx.ctx(),
            self.id,
            SagaState::Stuck,
            Some(&error),
            Some(&undo_error),
        )
        .await?;
        if let Some(c) = cleanup {
            tx.job_step_set_status(c, JobStatus::Failed).await?;
        }
        if let Some(job) = self.job_id {
            if tx
                .job_get(job)
                .await?
                .is_some_and(|j| j.status == JobStatus::Started)
            {
                tx.job_end(job, JobStatus::Failed).await?;
            }
        }
        tx.event_add(&self.event(SagaEventKind::Stuck, Some(&undo_error)))
            .await?;
        tx.commit().await?;
        tracing::error!(saga_id = %self.id, saga = S::NAME, error = %error, undo_error = %undo_error, "saga stuck");
        Ok(SagaOutcome::Stuck { error, undo_error })
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-text panic".into()
    }
}

/// The process-level crash test hook: with `OXVIRT_TEST_CRASH_AT=<saga>:<step>:<point>` in the
/// environment (point = `before` or `after` the step's action), the engine process kills itself
/// with SIGKILL at that point — a real `kill -9` at an exact place, for the tests that restart
/// the engine binary mid-command. Read once; unset in production.
fn process_crash_point(saga: &str, step: &str, p: FaultPoint) {
    static AT: std::sync::OnceLock<Option<(String, String, String)>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        let v = std::env::var("OXVIRT_TEST_CRASH_AT").ok()?;
        let mut it = v.splitn(3, ':').map(str::to_string);
        Some((it.next()?, it.next()?, it.next()?))
    });
    let Some((s, st, pt)) = at else { return };
    let point = match p {
        FaultPoint::BeforeAction => "before",
        FaultPoint::AfterAction => "after",
        _ => return,
    };
    if s == saga && st == step && pt == point {
        tracing::warn!(
            saga,
            step,
            point,
            "OXVIRT_TEST_CRASH_AT: killing the engine process"
        );
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_retries_back_off_and_stop_after_the_last_attempt() {
        let r = ForwardRetry::default();
        let waits: Vec<_> = (1..=r.attempts).map(|n| r.delay_after(n)).collect();
        let s = Duration::from_secs;
        assert_eq!(
            waits,
            vec![Some(s(1)), Some(s(2)), Some(s(4)), Some(s(8)), Some(s(16)), None]
        );
        let capped = ForwardRetry {
            attempts: 40,
            first_delay: s(1),
            max_delay: s(5),
        };
        assert_eq!(capped.delay_after(39), Some(s(5)), "no overflow, capped");
        let once = ForwardRetry { attempts: 1, ..r };
        assert_eq!(once.delay_after(1), None);
    }
}
