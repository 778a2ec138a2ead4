//! The engine's commands: what the REST API, the web UI and the CLI call.
//!
//! A command validates its input against the database, then either changes rows directly
//! (single-step commands) or runs a saga ([`crate::saga`]) whose steps call nodes and record
//! their effects, each with an undo. Commands never hold a database transaction across a call to
//! a node.
//!
//! Architecture invariant: every change to storage or to a VM goes through a command here; the
//! transports above are translations only.

mod attachments;
mod cdroms;
mod clone;
mod consoles;
mod events;
mod infra;
mod live_move;
mod networks;
pub mod ovf;
mod qos;
mod register;
mod scheduling;
mod snapshots;
pub mod stats;
mod storage;
mod tags;
mod transfers;
mod vms;

use std::future::Future;
use std::sync::Arc;

use oxvirt_types::JobId;

use crate::app::App;
use crate::db::{DbError, SagaState};
use crate::nodes::NodeError;
use crate::saga::{SagaDef, SagaError, SagaExecutor, SagaHandle, SagaOutcome, StartOptions};

pub use consoles::ConsoleTicket;
pub use infra::{AddCluster, AddDataCenter, AddHost};
pub use live_move::LSM_SNAPSHOT;
pub(crate) use networks::{host_network_problem, scheduling_networks, with_source_slots};
pub use networks::{AddNetwork, AddNic, SetupHostNetworks, UpdateNetwork, UpdateNic};
pub use qos::{UpdateDiskProfile, UpdateQos};
pub use register::UnregisteredDisk;
pub use scheduling::{
    policy_info, resolve_policy, AddAffinityGroup, PolicyInfo, UpdateAffinityGroup, UpdateCluster,
    OVERCOMMIT_RANGE, POLICIES,
};
pub use snapshots::{AddSnapshot, AddSnapshotParams, AddSnapshotSaga, SnapDisk};
pub(crate) use storage::connect_storage as connect_storage_servers;
pub use storage::{AddDisk, AddStorageDomain};
pub use tags::{root_tag, UpdateTag};
pub use transfers::AddImageTransfer;
pub(crate) use vms::destroy_on as destroy_on_node;
pub use vms::{
    AddVm, AddVmDisk, MigrateOptions, MigrateVmSaga, RunOnce, RunOnceCd, StartOptions as VmStartOptions,
};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("database")]
    Db(#[from] DbError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("{description} failed and was rolled back: {error}")]
    Failed {
        description: String,
        error: String,
        job: Option<JobId>,
    },
    #[error("{description} failed and could not be rolled back (needs an administrator): {error}; undo: {undo_error}")]
    Stuck {
        description: String,
        error: String,
        undo_error: String,
    },
    #[error("{description} could not be completed and is past rolling back (an administrator must retry its job once the cause is fixed): {error}")]
    Blocked {
        description: String,
        error: String,
        job: Option<JobId>,
    },
    #[error("saga")]
    Saga(#[from] SagaError),
}

impl CommandError {
    pub fn not_found(kind: &'static str, id: impl std::fmt::Display) -> Self {
        CommandError::NotFound {
            kind,
            id: id.to_string(),
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        CommandError::Invalid(msg.into())
    }
}

/// When a command that makes a new object (disk, VM, template, snapshot) answers its caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Answer {
    /// Once all its work is done: the portal, the CLI, REST with `Expect: 201-created`.
    #[default]
    WhenDone,
    /// As soon as the new object is recorded (locked) while its storage work goes on — a
    /// REST add without `Expect: 201-created`, answered 202 as oVirt does. The rest of the
    /// work reports through its job and events; the object unlocks, or goes, when it ends.
    WhenRecorded,
}

/// What a command that makes a new object answers: the object as recorded, and whether its
/// storage work was still going on when it answered ([`Answer::WhenRecorded`] with work to
/// do; REST's 202). As in oVirt, that follows from the kind of request, never from a race with
/// the work: a client sees one answer for one kind of request.
#[derive(Clone, Debug)]
pub struct Added<T> {
    pub entity: T,
    pub pending: bool,
}

impl<T> std::ops::Deref for Added<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.entity
    }
}

/// A saga step's error from anything that displays (a command's, a node's, a message).
pub(crate) fn step_err(e: impl std::fmt::Display) -> crate::saga::StepError {
    crate::saga::StepError::msg(e)
}

/// The command layer: the application context and the saga executor with every saga
/// registered.
#[derive(Clone)]
pub struct Commands {
    pub app: Arc<App>,
    pub sagas: SagaExecutor<App>,
    pub answer: Answer,
}

impl Commands {
    pub fn new(app: Arc<App>) -> Result<Self, CommandError> {
        let sagas = SagaExecutor::with_retry(app.db.clone(), app.clone(), app.settings.forward_retry);
        Self::register_all(&sagas)?;
        Ok(Commands {
            app,
            sagas,
            answer: Answer::WhenDone,
        })
    }

    /// These commands, answering as `answer` says.
    pub fn answering(&self, answer: Answer) -> Commands {
        Commands {
            answer,
            ..self.clone()
        }
    }

    /// Registers every saga type (also used by tests that build their own executor).
    pub fn register_all(sagas: &SagaExecutor<App>) -> Result<(), SagaError> {
        sagas.register::<storage::AddStorageDomainSaga>()?;
        sagas.register::<storage::AttachStorageDomainSaga>()?;
        sagas.register::<storage::DeactivateStorageDomainSaga>()?;
        sagas.register::<storage::DetachStorageDomainSaga>()?;
        sagas.register::<storage::RemoveStorageDomainSaga>()?;
        sagas.register::<storage::AddDiskSaga>()?;
        sagas.register::<storage::RemoveDiskSaga>()?;
        sagas.register::<storage::MoveDiskSaga>()?;
        sagas.register::<storage::CopyDiskSaga>()?;
        sagas.register::<live_move::LiveMoveDiskSaga>()?;
        sagas.register::<storage::ExtendDiskSaga>()?;
        sagas.register::<vms::AddVmSaga>()?;
        sagas.register::<vms::StartVmSaga>()?;
        sagas.register::<vms::MigrateVmSaga>()?;
        sagas.register::<vms::SuspendVmSaga>()?;
        sagas.register::<vms::RemoveVmSaga>()?;
        sagas.register::<vms::AddTemplateSaga>()?;
        sagas.register::<clone::CloneVmSaga>()?;
        sagas.register::<vms::RemoveTemplateSaga>()?;
        sagas.register::<snapshots::AddSnapshotSaga>()?;
        sagas.register::<snapshots::RemoveSnapshotSaga>()?;
        sagas.register::<snapshots::RestoreSnapshotSaga>()?;
        sagas.register::<snapshots::PreviewSnapshotSaga>()?;
        sagas.register::<snapshots::EndPreviewSaga>()?;
        sagas.register::<networks::SetupNetworksSaga>()?;
        sagas.register::<transfers::ImageTransferSaga>()?;
        Ok(())
    }

    /// Runs a saga to its end and turns its outcome into a result.
    pub async fn run<S: SagaDef<Ctx = App>>(
        &self,
        params: S::Params,
        correlation_id: Option<String>,
    ) -> Result<SagaOutcome, CommandError> {
        self.run_as::<S>(params, None, correlation_id).await
    }

    /// As [`Self::run`], its job described as `what` (names rather than the parameters' ids:
    /// "Starting VM web1"); `None`: the saga's own description.
    pub async fn run_as<S: SagaDef<Ctx = App>>(
        &self,
        params: S::Params,
        what: Option<String>,
        correlation_id: Option<String>,
    ) -> Result<SagaOutcome, CommandError> {
        let description = what.clone().unwrap_or_else(|| S::description(&params));
        let opts = StartOptions {
            correlation_id,
            description: what,
        };
        let handle = self.sagas.start::<S>(params, opts).await?;
        outcome(description, handle).await
    }

    /// Runs a saga whose first step records a new object, then `then` (work that needs the
    /// saga done, such as plugging a new disk into its running VM). With
    /// [`Answer::WhenRecorded`] and `storage_work` to do, returns as soon as that first step
    /// is recorded and leaves the rest running; a failure after that is the saga's (its job
    /// and events) or, for `then`, an error event with the request's correlation id. Answers
    /// whether the work may still be going on (see [`Added`]).
    pub(crate) async fn run_adding<S, F, Fut>(
        &self,
        params: S::Params,
        what: Option<String>,
        correlation_id: Option<String>,
        storage_work: bool,
        then: F,
    ) -> Result<bool, CommandError>
    where
        S: SagaDef<Ctx = App>,
        F: FnOnce(Commands) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), CommandError>> + Send + 'static,
    {
        let description = what.clone().unwrap_or_else(|| S::description(&params));
        let corr = correlation_id.clone();
        let opts = StartOptions {
            correlation_id,
            description: what,
        };
        let mut handle = self.sagas.start::<S>(params, opts).await?;
        let cmds = self.answering(Answer::WhenDone);
        let early = self.answer == Answer::WhenRecorded && storage_work;
        // A saga already over (it failed, say) answers with its outcome.
        if early && handle.steps_done(1).await && !handle.is_finished() {
            tokio::spawn(async move {
                let saga = handle.id;
                let db = cmds.app.db.clone();
                match outcome(description.clone(), handle).await {
                    // The saga's own events tell of its failure.
                    Err(e) => tracing::warn!(saga_id = %saga, error = %e, "an add answered early failed"),
                    Ok(_) => {
                        if let Err(e) = then(cmds).await {
                            tracing::warn!(saga_id = %saga, error = %e, "an add answered early did not complete");
                            let ev = crate::model::NewEvent {
                                correlation_id: corr,
                                ..crate::model::NewEvent::new(
                                    crate::model::Severity::Error,
                                    crate::saga::codes::FOLLOW_UP_FAILED,
                                    format!("{description} is done, but what follows it failed: {e}"),
                                )
                            };
                            let _ = db.event_add(&ev).await;
                        }
                    }
                }
            });
            return Ok(true);
        }
        outcome(description, handle).await?;
        then(cmds).await?;
        Ok(early)
    }

    /// Retries the command behind job `job` once an admin removed what stopped it: a stuck
    /// one (an undo failed) unwinds again, a blocked one (past its point of no return) goes on
    /// forward. Waits for the saga to end; an error when it is stuck or blocked again.
    pub async fn retry_job(&self, job: JobId) -> Result<(), CommandError> {
        let j = self
            .app
            .db
            .job_get(job)
            .await?
            .ok_or_else(|| CommandError::not_found("job", job))?;
        let saga = j.saga_id.ok_or_else(|| {
            CommandError::Conflict(format!("job {job} ({}) has no command to retry", j.description))
        })?;
        let rec = self
            .app
            .db
            .saga_get(saga)
            .await?
            .ok_or_else(|| CommandError::not_found("saga", saga))?;
        if !matches!(rec.state, SagaState::Stuck | SagaState::Blocked) {
            return Err(CommandError::Conflict(format!(
                "job {job} ({}) is not waiting for an administrator: its command is {}",
                j.description, rec.state
            )));
        }
        tracing::info!(job_id = %job, saga_id = %saga, state = %rec.state, "retrying a command for an administrator");
        let description = j.description;
        // A stuck command that unwinds, or a blocked one that finishes, is what was asked.
        let outcome = self.sagas.retry_stuck(saga).await?.wait().await?;
        waiting_for_admin(description, Some(job), outcome).map(drop)
    }

    /// Starts a saga and returns its job at once (REST `async=true`).
    pub async fn start<S: SagaDef<Ctx = App>>(
        &self,
        params: S::Params,
        correlation_id: Option<String>,
    ) -> Result<Option<JobId>, CommandError> {
        let opts = StartOptions {
            correlation_id,
            description: None,
        };
        let handle = self.sagas.start::<S>(params, opts).await?;
        let job = handle.job_id;
        tokio::spawn(async move {
            let _ = handle.wait().await;
        });
        Ok(job)
    }
}

/// Waits for a command's saga and turns its outcome into the command's result.
async fn outcome(description: String, handle: SagaHandle) -> Result<SagaOutcome, CommandError> {
    let job = handle.job_id;
    match handle.wait().await? {
        SagaOutcome::Unwound { error } => Err(CommandError::Failed {
            description,
            error,
            job,
        }),
        other => waiting_for_admin(description, job, other),
    }
}

/// A saga that ended waiting for an administrator (stuck or blocked) as the command's error;
/// any other outcome as it is.
fn waiting_for_admin(
    description: String,
    job: Option<JobId>,
    outcome: SagaOutcome,
) -> Result<SagaOutcome, CommandError> {
    match outcome {
        SagaOutcome::Stuck { error, undo_error } => Err(CommandError::Stuck {
            description,
            error,
            undo_error,
        }),
        SagaOutcome::Blocked { error } => Err(CommandError::Blocked {
            description,
            error,
            job,
        }),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::db::{Db, ListQuery};
    use crate::saga::{Step, StepCtx};

    /// A saga whose first step records and whose second works until the test lets it go on
    /// (one permit per run).
    struct Slow;

    fn go() -> &'static tokio::sync::Semaphore {
        static GO: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
        GO.get_or_init(|| tokio::sync::Semaphore::new(0))
    }

    impl SagaDef for Slow {
        type Ctx = App;
        type Params = ();
        const NAME: &'static str = "test_slow_add";
        fn description(_: &()) -> String {
            "Adding a test object".into()
        }
        fn steps() -> Vec<Step<Self>> {
            vec![
                Step::without_undo("record", |_c: StepCtx<Self>| async { Ok(()) }),
                Step::without_undo("work", |_c: StepCtx<Self>| async {
                    go().acquire().await.expect("semaphore").forget();
                    Ok(())
                }),
            ]
        }
    }

    async fn commands(dir: &std::path::Path) -> Commands {
        let db = Db::open_in(dir, None).await.unwrap();
        let ca = oxvirt_pki::CertAuthority::generate("test CA").unwrap();
        let identity = ca.issue(oxvirt_pki::Role::Engine, "engine", &[]).unwrap();
        let app = App::new(
            db,
            crate::nodes::NodeClients::new(identity, Duration::from_secs(5)),
            Default::default(),
        );
        let cmds = Commands::new(app).unwrap();
        cmds.sagas.register::<Slow>().unwrap();
        cmds
    }

    async fn follow_up_failures(cmds: &Commands) -> Vec<crate::model::Event> {
        let all = cmds.app.db.event_list(&ListQuery::default()).await.unwrap();
        all.into_iter()
            .filter(|e| e.code == crate::saga::codes::FOLLOW_UP_FAILED)
            .collect()
    }

    /// Answered early, an add says it is pending; what follows its saga runs after the answer,
    /// and its failure is an error event with the request's correlation id. Answered when
    /// done, the same failure is the caller's error, and an add without storage work is never
    /// pending.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_add_answered_early_reports_what_fails_after_it_as_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let cmds = commands(dir.path()).await;
        let early = cmds.answering(Answer::WhenRecorded);
        let failing = |_: Commands| async { Err::<(), _>(CommandError::Conflict("the plug failed".into())) };

        let pending = early
            .run_adding::<Slow, _, _>((), None, Some("corr-1".into()), true, failing)
            .await
            .unwrap();
        assert!(pending, "answered before its work ended, the add is pending");
        assert!(
            follow_up_failures(&cmds).await.is_empty(),
            "the follow-up ran before the answer"
        );
        go().add_permits(1);
        let start = std::time::Instant::now();
        let ev = loop {
            if let Some(ev) = follow_up_failures(&cmds).await.pop() {
                break ev;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no follow-up failure event"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(ev.severity, crate::model::Severity::Error);
        assert_eq!(ev.correlation_id.as_deref(), Some("corr-1"));
        assert!(ev.description.contains("the plug failed"), "{}", ev.description);

        go().add_permits(1);
        let err = cmds
            .run_adding::<Slow, _, _>((), None, None, true, failing)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("the plug failed"), "{err}");
        assert_eq!(
            follow_up_failures(&cmds).await.len(),
            1,
            "a waited-for failure is no event"
        );

        go().add_permits(1);
        let pending = early
            .run_adding::<Slow, _, _>((), None, None, false, |_| async { Ok(()) })
            .await
            .unwrap();
        assert!(!pending, "an add without storage work is answered when done");
    }
}
