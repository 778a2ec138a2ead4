//! Sagas on both backends: a real multi-step command (database rows plus a volume file on
//! disk, standing for the node's side effect), failed at each step, crashed at each point.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{Backend, TestDb};
use oxvirt_engine::db::{ListQuery, SagaState, SagaStepStatus};
use oxvirt_engine::model::*;
use oxvirt_engine::saga::testing::{
    crash_at_each_point, fail_at_each_step, unwind_at_each_step, Fault, FaultAt, FaultPoint, Faults,
};
use oxvirt_engine::saga::{
    ForwardRetry, SagaDef, SagaEventKind, SagaExecutor, SagaOutcome, StartOptions, Step, StepCtx, StepError,
};
use oxvirt_engine::time::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// The application context: where "storage" is.
struct App {
    storage: PathBuf,
    /// Lets a test hold a saga inside a step.
    release: tokio::sync::Notify,
    /// How many more times `DeleteDisk`'s delete fails ("the SPM is away").
    delete_failures: std::sync::atomic::AtomicU32,
}

/// Retries past the point of no return without the production waits.
fn fast_retry() -> ForwardRetry {
    ForwardRetry {
        attempts: 3,
        first_delay: std::time::Duration::from_millis(5),
        max_delay: std::time::Duration::from_millis(20),
    }
}

#[derive(Serialize, Deserialize)]
struct Params {
    vm_name: String,
    cluster: ClusterId,
    sd: SdUuid,
    size: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
struct Ids {
    vm: VmId,
    disk: DiskId,
    vol: VolUuid,
}

/// Creates a VM with a new disk: ids, disk row (locked), volume (file + row), VM row with the
/// attachment, unlock.
struct CreateVmWithDisk;

impl SagaDef for CreateVmWithDisk {
    type Ctx = App;
    type Params = Params;
    const NAME: &'static str = "test_create_vm_with_disk";

    fn description(p: &Params) -> String {
        format!("Creating VM {}", p.vm_name)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::without_undo("ids", |_c: StepCtx<Self>| async {
                Ok(Ids {
                    vm: VmId::new_random(),
                    disk: DiskId::new_random(),
                    vol: VolUuid::new_random(),
                })
            }),
            Step::new("disk_row", disk_row::<Self>, undo_disk_row::<Self>).describe("Recording the disk"),
            Step::new("volume", volume, undo_volume).describe("Creating the volume"),
            Step::new("vm_row", vm_row, undo_vm_row).describe("Recording the VM"),
            Step::new("unlock", unlock, undo_unlock).describe("Unlocking the disk"),
        ]
    }

    fn event(p: &Params, _what: &str, kind: SagaEventKind, detail: Option<&str>) -> NewEvent {
        let mut e = match kind {
            SagaEventKind::Done => NewEvent::new(Severity::Normal, 53, format!("VM {} created", p.vm_name)),
            _ => NewEvent::new(
                if kind == SagaEventKind::Started {
                    Severity::Normal
                } else {
                    Severity::Error
                },
                if kind == SagaEventKind::Started { 34 } else { 54 },
                format!("VM {} {kind:?}: {}", p.vm_name, detail.unwrap_or("")),
            ),
        };
        e.cluster_id = Some(p.cluster);
        e
    }
}

async fn disk_row<S: SagaDef<Params = Params, Ctx = App>>(c: StepCtx<S>) -> Result<(), StepError> {
    let ids: Ids = c.output("ids")?;
    if c.db().disk_get(ids.disk).await?.is_none() {
        let p = c.params();
        let mut d = Disk::new(&format!("{}_disk", p.vm_name), p.sd, DiskFormat::Cow, p.size);
        d.id = ids.disk;
        d.status = DiskStatus::Locked;
        c.db().disk_insert(&d).await?;
    }
    Ok(())
}

async fn undo_disk_row<S: SagaDef<Params = Params, Ctx = App>>(c: StepCtx<S>) -> Result<(), StepError> {
    let ids: Ids = c.output("ids")?;
    if c.db().disk_get(ids.disk).await?.is_some() {
        c.db().disk_delete(ids.disk).await?;
    }
    Ok(())
}

fn vol_path(c: &StepCtx<CreateVmWithDisk>, ids: &Ids) -> (PathBuf, PathBuf) {
    let dir = c.app().storage.join(ids.disk.to_string());
    let file = dir.join(ids.vol.to_string());
    (dir, file)
}

async fn volume(c: StepCtx<CreateVmWithDisk>) -> Result<u64, StepError> {
    let ids: Ids = c.output("ids")?;
    let (dir, file) = vol_path(&c, &ids);
    if !file.exists() {
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{}.tmp", ids.vol));
        std::fs::write(&tmp, vec![0u8; 4096])?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &file)?;
    }
    if c.db().volume_get(ids.vol).await?.is_none() {
        c.db()
            .volume_insert(&Volume {
                id: ids.vol,
                disk_id: ids.disk,
                storage_domain_id: c.params().sd,
                parent_id: None,
                voltype: VolType::Leaf,
                format: DiskFormat::Cow,
                actual_size: 4096,
                created_at: Timestamp::from_millis(0),
            })
            .await?;
    }
    Ok(std::fs::metadata(&file)?.len())
}

async fn undo_volume(c: StepCtx<CreateVmWithDisk>) -> Result<(), StepError> {
    let ids: Ids = c.output("ids")?;
    c.db().volume_delete(ids.vol).await?;
    let (dir, file) = vol_path(&c, &ids);
    for p in [file, dir.join(format!(".{}.tmp", ids.vol))] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    match std::fs::remove_dir(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn vm_row(c: StepCtx<CreateVmWithDisk>) -> Result<(), StepError> {
    let ids: Ids = c.output("ids")?;
    // The previous step's output is there for later steps.
    let size: u64 = c.output("volume")?;
    assert_eq!(size, 4096);
    let p = c.params();
    let mut tx = c.db().begin().await?;
    if tx.vm_get(ids.vm).await?.is_none() {
        let mut vm = Vm::new(&p.vm_name, p.cluster);
        vm.id = ids.vm;
        tx.vm_insert(&vm).await?;
        tx.attachment_add(&DiskAttachment {
            vm_id: ids.vm,
            disk_id: ids.disk,
            interface: DiskInterface::VirtioScsi,
            bootable: true,
            active: true,
            read_only: false,
        })
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn undo_vm_row(c: StepCtx<CreateVmWithDisk>) -> Result<(), StepError> {
    let ids: Ids = c.output("ids")?;
    if c.db().vm_get(ids.vm).await?.is_some() {
        c.db().vm_delete(ids.vm).await?;
    }
    Ok(())
}

async fn unlock(c: StepCtx<CreateVmWithDisk>) -> Result<(), StepError> {
    let ids: Ids = c.output("ids")?;
    c.db()
        .disk_set_status(ids.disk, &[DiskStatus::Locked, DiskStatus::Ok], DiskStatus::Ok)
        .await?;
    Ok(())
}

async fn undo_unlock(c: StepCtx<CreateVmWithDisk>) -> Result<(), StepError> {
    let ids: Ids = c.output("ids")?;
    if c.db().disk_get(ids.disk).await?.is_some() {
        c.db().disk_set_status(ids.disk, &[], DiskStatus::Locked).await?;
    }
    Ok(())
}

const STEPS: usize = 5;

/// A fresh database with a cluster and a storage domain, plus the storage directory.
struct Env {
    t: TestDb,
    app: Arc<App>,
    cluster: ClusterId,
    sd: SdUuid,
}

impl Env {
    async fn new(b: Backend) -> Env {
        let t = TestDb::new(b).await;
        let dc = t.db.dc_insert(&DataCenter::new("dc")).await.unwrap();
        let cl = t.db.cluster_insert(&Cluster::new("cl", dc.id)).await.unwrap();
        let storage = t.dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let sd =
            t.db.sd_insert(&StorageDomain::new(
                "sd",
                SdType::Data,
                StorageType::Localfs,
                storage.to_str().unwrap(),
            ))
            .await
            .unwrap();
        Env {
            app: Arc::new(App {
                storage,
                release: tokio::sync::Notify::new(),
                delete_failures: Default::default(),
            }),
            t,
            cluster: cl.id,
            sd: sd.id,
        }
    }

    fn params(&self, name: &str) -> Params {
        Params {
            vm_name: name.into(),
            cluster: self.cluster,
            sd: self.sd,
            size: 1 << 30,
        }
    }

    fn executor(
        &self,
        faults: Option<Arc<dyn oxvirt_engine::saga::testing::FaultInjector>>,
    ) -> SagaExecutor<App> {
        let e = match faults {
            Some(f) => SagaExecutor::with_faults(self.t.db.clone(), self.app.clone(), f, fast_retry()),
            None => SagaExecutor::new(self.t.db.clone(), self.app.clone()),
        };
        e.register::<CreateVmWithDisk>().unwrap();
        e.register::<DeleteDisk>().unwrap();
        e
    }

    /// A locked-for-nobody disk with its volume file, for `DeleteDisk`.
    async fn disk_with_file(&self) -> (Disk, PathBuf) {
        let d = self
            .t
            .db
            .disk_insert(&Disk::new("victim", self.sd, DiskFormat::Raw, 1 << 20))
            .await
            .unwrap();
        let f = self.app.storage.join(d.id.to_string());
        std::fs::write(&f, b"data").unwrap();
        (d, f)
    }

    fn storage_entries(&self) -> usize {
        std::fs::read_dir(&self.app.storage).unwrap().count()
    }

    /// As if the saga never ran: no VM, disk, volume or file; the job failed; the saga unwound.
    async fn assert_rolled_back(&self, what: &str) {
        let db = &self.t.db;
        assert!(
            db.vm_list(&ListQuery::new()).await.unwrap().is_empty(),
            "{what}: VM left behind"
        );
        assert!(
            db.disk_list(&ListQuery::new()).await.unwrap().is_empty(),
            "{what}: disk left behind"
        );
        assert_eq!(self.storage_entries(), 0, "{what}: volume files left behind");
        let sagas = db.saga_list(&[]).await.unwrap();
        assert_eq!(sagas.len(), 1, "{what}");
        let s = &sagas[0];
        assert_eq!(s.state, SagaState::Unwound, "{what}");
        assert!(s.error.is_some(), "{what}: the failure is recorded");
        for st in &s.steps {
            assert_eq!(
                st.status,
                SagaStepStatus::Undone,
                "{what}: step {} ({})",
                st.index,
                st.name
            );
        }
        let job = db.job_get(s.job_id.unwrap()).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Failed, "{what}");
        let steps = db.job_steps(job.id).await.unwrap();
        assert!(
            steps
                .iter()
                .any(|s| s.step_type == StepType::CleanUp && s.status == JobStatus::Finished),
            "{what}"
        );
        assert!(
            steps.iter().all(|s| s.status != JobStatus::Started),
            "{what}: a job step is left open"
        );
        let events = db.event_list(&ListQuery::new()).await.unwrap();
        assert!(
            events
                .iter()
                .any(|e| e.code == 54 && e.severity == Severity::Error),
            "{what}: no failure event"
        );
    }

    /// The command's result, complete and unlocked, once.
    async fn assert_created(&self, name: &str, what: &str) {
        let db = &self.t.db;
        let vms = db.vm_list(&ListQuery::new()).await.unwrap();
        assert_eq!(vms.len(), 1, "{what}");
        assert_eq!(vms[0].name, name);
        let atts = db.attachments_of_vm(vms[0].id).await.unwrap();
        assert_eq!(atts.len(), 1, "{what}");
        let disk = db.disk_get(atts[0].disk_id).await.unwrap().unwrap();
        assert_eq!(disk.status, DiskStatus::Ok, "{what}");
        let chain = db.volume_chain(disk.id).await.unwrap();
        assert_eq!(chain.len(), 1, "{what}");
        assert!(
            self.app
                .storage
                .join(disk.id.to_string())
                .join(chain[0].id.to_string())
                .is_file(),
            "{what}"
        );
        assert_eq!(self.storage_entries(), 1, "{what}: one image directory");
        assert_eq!(db.disk_list(&ListQuery::new()).await.unwrap().len(), 1, "{what}");
        let s = &db.saga_list(&[]).await.unwrap()[0];
        assert_eq!(s.state, SagaState::Done, "{what}");
        let job = db.job_get(s.job_id.unwrap()).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Finished, "{what}");
        let steps = db.job_steps(job.id).await.unwrap();
        assert!(
            steps.iter().all(|s| s.status == JobStatus::Finished),
            "{what}: {steps:?}"
        );
        let events = db.event_list(&ListQuery::new()).await.unwrap();
        assert!(
            events
                .iter()
                .any(|e| e.code == 53 && e.correlation_id.as_deref() == Some("corr-42")),
            "{what}"
        );
    }
}

fn opts() -> StartOptions {
    StartOptions {
        correlation_id: Some("corr-42".into()),
        ..Default::default()
    }
}

async fn saga_runs_to_completion(b: Backend) {
    let env = Env::new(b).await;
    let exec = env.executor(None);
    let out = exec
        .run::<CreateVmWithDisk>(env.params("vm1"), opts())
        .await
        .unwrap();
    assert!(out.is_done(), "{out:?}");
    assert_eq!(out.output::<u64>("volume"), Some(4096));
    env.assert_created("vm1", "happy path").await;
    let s = &env.t.db.saga_list(&[]).await.unwrap()[0];
    assert_eq!(s.steps.len(), STEPS);
    assert_eq!(s.correlation_id.as_deref(), Some("corr-42"));
    let job = env.t.db.job_get(s.job_id.unwrap()).await.unwrap().unwrap();
    assert_eq!(job.description, "Creating VM vm1");
    assert_eq!(job.saga_id, Some(s.id));
    assert_eq!(env.t.db.job_steps(job.id).await.unwrap().len(), STEPS);
    // Nothing to resume.
    assert!(exec.resume_all().await.unwrap().is_empty());
}

async fn saga_unwinds_at_each_step(b: Backend) {
    let cur: Arc<Mutex<Option<Env>>> = Arc::new(Mutex::new(None));
    unwind_at_each_step(
        STEPS,
        |fault| {
            let cur = cur.clone();
            async move {
                let env = Env::new(b).await;
                let out = env
                    .executor(Some(fault))
                    .run::<CreateVmWithDisk>(env.params("vm1"), opts())
                    .await
                    .unwrap();
                *cur.lock().await = Some(env);
                out
            }
        },
        |i| {
            let cur = cur.clone();
            async move {
                let env = cur.lock().await.take().unwrap();
                env.assert_rolled_back(&format!("failure at step {i}")).await;
            }
        },
    )
    .await;
}

async fn saga_survives_a_crash_at_each_point(b: Backend) {
    let cur: Arc<Mutex<Option<Env>>> = Arc::new(Mutex::new(None));
    crash_at_each_point(
        STEPS,
        None,
        |faults| {
            let cur = cur.clone();
            async move {
                let mut env = Env::new(b).await;
                let exec = env.executor(Some(Arc::new(Faults(faults))));
                let out = exec
                    .run::<CreateVmWithDisk>(env.params("vm1"), opts())
                    .await
                    .unwrap();
                assert_eq!(out, SagaOutcome::Interrupted);
                // The engine dies: drop everything in memory, reopen the database.
                drop(exec);
                env.t.reopen().await;
                let exec = env.executor(None);
                let handles = exec.resume_all().await.unwrap();
                assert_eq!(handles.len(), 1);
                let out = handles.into_iter().next().unwrap().wait().await.unwrap();
                *cur.lock().await = Some(env);
                out
            }
        },
        |i, point, out| {
            let cur = cur.clone();
            async move {
                let env = cur.lock().await.take().unwrap();
                let what = format!("crash at step {i} {point:?}");
                match point {
                    FaultPoint::BeforeAction | FaultPoint::AfterAction => {
                        assert!(out.is_done(), "{what}: {out:?}");
                        env.assert_created("vm1", &what).await;
                    }
                    FaultPoint::BeforeUndo | FaultPoint::AfterUndo => {
                        assert!(matches!(out, SagaOutcome::Unwound { .. }), "{what}: {out:?}");
                        env.assert_rolled_back(&what).await;
                    }
                }
            }
        },
    )
    .await;
}

async fn failed_undo_leaves_the_saga_stuck_until_retried(b: Backend) {
    let env = Env::new(b).await;
    // The last action fails; then undoing the volume fails.
    let faults = Faults(vec![
        FaultAt::new(STEPS - 1, FaultPoint::AfterAction, Fault::Fail),
        FaultAt::new(2, FaultPoint::BeforeUndo, Fault::Fail),
    ]);
    let exec = env.executor(Some(Arc::new(faults)));
    let out = exec
        .run::<CreateVmWithDisk>(env.params("vm1"), opts())
        .await
        .unwrap();
    let SagaOutcome::Stuck { error, undo_error } = out else {
        panic!("{out:?}")
    };
    assert!(error.contains("unlock"), "{error}");
    assert!(undo_error.contains("volume"), "{undo_error}");
    let db = &env.t.db;
    let s = &db.saga_list(&[SagaState::Stuck]).await.unwrap()[0];
    assert_eq!(s.undo_error.as_deref(), Some(undo_error.as_str()));
    assert_eq!(s.step(2).unwrap().status, SagaStepStatus::UndoFailed);
    assert_eq!(s.step(3).unwrap().status, SagaStepStatus::Undone);
    assert!(db
        .event_list(&ListQuery::new())
        .await
        .unwrap()
        .iter()
        .any(|e| e.severity == Severity::Alert || e.code == 54));
    // A stuck saga is not resumed on restart: it waits for an admin.
    assert!(exec.resume_all().await.unwrap().is_empty());
    assert_eq!(env.storage_entries(), 1, "the volume is still there");
    // The admin retries: the remaining undos run.
    let out = exec.retry_stuck(s.id).await.unwrap().wait().await.unwrap();
    assert!(matches!(out, SagaOutcome::Unwound { .. }), "{out:?}");
    assert_eq!(env.storage_entries(), 0);
    assert!(db.disk_list(&ListQuery::new()).await.unwrap().is_empty());
    assert!(matches!(
        exec.retry_stuck(s.id).await.err().unwrap(),
        oxvirt_engine::saga::SagaError::NotStuck { .. }
    ));
}

struct Panics;
impl SagaDef for Panics {
    type Ctx = App;
    type Params = Params;
    const NAME: &'static str = "test_panics";
    fn description(p: &Params) -> String {
        format!("Panicking for {}", p.vm_name)
    }
    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::without_undo("ids", |_c: StepCtx<Self>| async {
                Ok(Ids {
                    vm: VmId::new_random(),
                    disk: DiskId::new_random(),
                    vol: VolUuid::new_random(),
                })
            }),
            Step::new("disk_row", disk_row::<Self>, undo_disk_row::<Self>),
            Step::new(
                "boom",
                |c: StepCtx<Self>| async move {
                    if c.index == 2 {
                        panic!("bug in a step");
                    }
                    Ok(())
                },
                |_c| async { Ok(()) },
            ),
        ]
    }
}

impl SagaDef for Duplicate {
    type Ctx = App;
    type Params = Params;
    const NAME: &'static str = "test_duplicate";
    fn description(_: &Params) -> String {
        String::new()
    }
    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::without_undo("a", |_c: StepCtx<Self>| async { Ok(()) }),
            Step::without_undo("a", |_c: StepCtx<Self>| async { Ok(()) }),
        ]
    }
}
struct Duplicate;

async fn panics_unwind_and_bad_definitions_are_refused(b: Backend) {
    let env = Env::new(b).await;
    let exec = env.executor(None);
    let out = exec
        .run::<Panics>(env.params("p"), StartOptions::default())
        .await
        .unwrap();
    let SagaOutcome::Unwound { error } = out else {
        panic!("{out:?}")
    };
    assert!(error.contains("bug in a step"), "{error}");
    assert!(env.t.db.disk_list(&ListQuery::new()).await.unwrap().is_empty());
    assert!(matches!(
        exec.register::<Duplicate>().unwrap_err(),
        oxvirt_engine::saga::SagaError::Definition { .. }
    ));
}

async fn unknown_sagas_are_left_for_an_engine_that_knows_them(b: Backend) {
    let mut env = Env::new(b).await;
    let exec = env.executor(Some(FaultAt::new(1, FaultPoint::AfterAction, Fault::Crash)));
    assert_eq!(
        exec.run::<CreateVmWithDisk>(env.params("vm1"), opts())
            .await
            .unwrap(),
        SagaOutcome::Interrupted
    );
    drop(exec);
    env.t.reopen().await;
    // An engine without that saga type: it stays running, with an alert.
    let bare: SagaExecutor<App> = SagaExecutor::new(env.t.db.clone(), env.app.clone());
    assert!(bare.resume_all().await.unwrap().is_empty());
    assert_eq!(env.t.db.saga_list(&[SagaState::Running]).await.unwrap().len(), 1);
    assert!(env
        .t
        .db
        .event_list(&ListQuery::new())
        .await
        .unwrap()
        .iter()
        .any(|e| e.severity == Severity::Alert));
    // One that knows it finishes it.
    let exec = env.executor(None);
    let h = exec.resume_all().await.unwrap();
    assert!(h.into_iter().next().unwrap().wait().await.unwrap().is_done());
    env.assert_created("vm1", "resumed by a later engine").await;
}

/// Locks the saga's disk with the saga as owner. The undo runs even when the lock step
/// failed: it only releases this saga's own lock.
fn lock_disk_step<S: SagaDef<Ctx = App, Params = DiskId>>() -> Step<S> {
    Step::new(
        "lock",
        |c: StepCtx<S>| async move {
            c.db().disk_lock(*c.params(), c.saga_id).await?;
            Ok(())
        },
        |c: StepCtx<S>| async move {
            c.db().disk_unlock(*c.params(), c.saga_id, DiskStatus::Ok).await?;
            Ok(())
        },
    )
}

/// Locks a disk, works (until the test releases it), unlocks.
struct LockDisk;

impl SagaDef for LockDisk {
    type Ctx = App;
    type Params = DiskId;
    const NAME: &'static str = "test_lock_disk";
    fn description(d: &DiskId) -> String {
        format!("Working on disk {d}")
    }
    fn steps() -> Vec<Step<Self>> {
        vec![
            lock_disk_step(),
            Step::without_undo("work", |c: StepCtx<Self>| async move {
                c.app().release.notified().await;
                Ok(())
            }),
            Step::without_undo("unlock", |c: StepCtx<Self>| async move {
                c.db().disk_unlock(*c.params(), c.saga_id, DiskStatus::Ok).await?;
                Ok(())
            }),
        ]
    }
}

async fn racing_sagas_never_release_each_others_locks(b: Backend) {
    let env = Env::new(b).await;
    let disk = env
        .t
        .db
        .disk_insert(&Disk::new("shared", env.sd, DiskFormat::Raw, 1 << 20))
        .await
        .unwrap();
    let exec = env.executor(None);
    let mut a = exec
        .start::<LockDisk>(disk.id, StartOptions::default())
        .await
        .unwrap();
    // The handle says when the lock step is recorded, while the saga works on (what a
    // command that answers early waits for).
    assert!(a.steps_done(1).await, "saga A never took the lock");
    assert!(!a.is_finished());
    let d = env.t.db.disk_get(disk.id).await.unwrap().unwrap();
    assert_eq!(d.locked_by, Some(a.id));
    // B loses the race: its lock step fails, it unwinds, and A's lock stands.
    let mut b = exec
        .start::<LockDisk>(disk.id, StartOptions::default())
        .await
        .unwrap();
    assert!(!b.steps_done(1).await, "B's lock step cannot be done");
    let out = b.wait().await.unwrap();
    let SagaOutcome::Unwound { error } = out else {
        panic!("{out:?}")
    };
    assert!(error.contains(&format!("locked by {}", a.id)), "{error}");
    let d = env.t.db.disk_get(disk.id).await.unwrap().unwrap();
    assert_eq!((d.status, d.locked_by), (DiskStatus::Locked, Some(a.id)));
    env.app.release.notify_one();
    assert!(a.wait().await.unwrap().is_done());
    let d = env.t.db.disk_get(disk.id).await.unwrap().unwrap();
    assert_eq!((d.status, d.locked_by), (DiskStatus::Ok, None));
}

/// Deletes a disk: lock (undo: unlock), delete the file (the point of no return; fails while
/// `App::delete_failures` says so), forget the row.
struct DeleteDisk;

const DELETE_STEPS: usize = 3;
const DELETE_NO_RETURN: usize = 1;

impl SagaDef for DeleteDisk {
    type Ctx = App;
    type Params = DiskId;
    const NAME: &'static str = "test_delete_disk";
    fn description(d: &DiskId) -> String {
        format!("Deleting disk {d}")
    }
    fn steps() -> Vec<Step<Self>> {
        vec![
            lock_disk_step(),
            Step::without_undo("delete", |c: StepCtx<Self>| async move {
                use std::sync::atomic::Ordering;
                let left = &c.app().delete_failures;
                if left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(StepError::msg("the SPM is away"));
                }
                match std::fs::remove_file(c.app().storage.join(c.params().to_string())) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                    _ => Ok(()),
                }
            })
            .point_of_no_return(),
            Step::without_undo("record", |c: StepCtx<Self>| async move {
                if c.db().disk_get(*c.params()).await?.is_some() {
                    c.db().disk_delete(*c.params()).await?;
                }
                Ok(())
            }),
        ]
    }
}

impl Env {
    /// After `DeleteDisk` on `disk`: either nothing happened (the disk is back to `ok`, its file
    /// there) or all of it did (no row, no file); never a row without its file.
    async fn assert_deleted(&self, disk: DiskId, file: &std::path::Path, deleted: bool, what: &str) {
        let row = self.t.db.disk_get(disk).await.unwrap();
        if deleted {
            assert!(row.is_none(), "{what}: the disk row is left");
            assert!(!file.exists(), "{what}: the volume file is left");
        } else {
            let row = row.unwrap_or_else(|| panic!("{what}: the disk row is gone"));
            assert_eq!((row.status, row.locked_by), (DiskStatus::Ok, None), "{what}");
            assert!(file.exists(), "{what}: the file went with the row kept");
        }
    }
}

async fn failures_past_the_point_of_no_return_go_forward(b: Backend) {
    let exec_of = |env: &Env, f| env.executor(Some(f));
    let cur: Arc<Mutex<Option<(Env, DiskId, PathBuf)>>> = Arc::new(Mutex::new(None));
    fail_at_each_step(
        DELETE_STEPS,
        Some(DELETE_NO_RETURN),
        |fault| {
            let cur = cur.clone();
            async move {
                let env = Env::new(b).await;
                let (d, f) = env.disk_with_file().await;
                let out = exec_of(&env, fault)
                    .run::<DeleteDisk>(d.id, opts())
                    .await
                    .unwrap();
                *cur.lock().await = Some((env, d.id, f));
                out
            }
        },
        |i, point, out| {
            let cur = cur.clone();
            async move {
                let (env, d, f) = cur.lock().await.take().unwrap();
                let what = format!("failure at step {i} {point:?}");
                env.assert_deleted(d, &f, out.is_done(), &what).await;
            }
        },
    )
    .await;
    // Crashes: resumed forward past the point of no return, unwound before it.
    crash_at_each_point(
        DELETE_STEPS,
        Some(DELETE_NO_RETURN),
        |faults| {
            let cur = cur.clone();
            async move {
                let mut env = Env::new(b).await;
                let (d, f) = env.disk_with_file().await;
                let exec = exec_of(&env, Arc::new(Faults(faults)));
                assert_eq!(
                    exec.run::<DeleteDisk>(d.id, opts()).await.unwrap(),
                    SagaOutcome::Interrupted
                );
                drop(exec);
                env.t.reopen().await;
                let h = env.executor(None).resume_all().await.unwrap();
                let out = h.into_iter().next().unwrap().wait().await.unwrap();
                *cur.lock().await = Some((env, d.id, f));
                out
            }
        },
        |i, point, out| {
            let cur = cur.clone();
            async move {
                let (env, d, f) = cur.lock().await.take().unwrap();
                let what = format!("crash at step {i} {point:?}");
                // Undo points are crashed while unwinding a failure before the point of no return.
                let forward = matches!(point, FaultPoint::BeforeAction | FaultPoint::AfterAction);
                assert_eq!(out.is_done(), forward, "{what}: {out:?}");
                env.assert_deleted(d, &f, forward, &what).await;
            }
        },
    )
    .await;
}

async fn a_saga_that_cannot_finish_is_blocked_until_retried(b: Backend) {
    use std::sync::atomic::Ordering;
    let env = Env::new(b).await;
    let (d, f) = env.disk_with_file().await;
    // Failures for two rounds of attempts: blocked, the disk locked (its data may be half gone).
    let attempts = fast_retry().attempts;
    env.app.delete_failures.store(2 * attempts, Ordering::SeqCst);
    let exec = env.executor(Some(Arc::new(Faults(vec![]))));
    let out = exec.run::<DeleteDisk>(d.id, opts()).await.unwrap();
    let SagaOutcome::Blocked { error } = out else {
        panic!("{out:?}")
    };
    assert!(error.contains("the SPM is away"), "{error}");
    assert_eq!(
        env.app.delete_failures.load(Ordering::SeqCst),
        attempts,
        "every attempt was made"
    );
    let db = &env.t.db;
    let s = &db.saga_list(&[SagaState::Blocked]).await.unwrap()[0];
    let row = db.disk_get(d.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.locked_by), (DiskStatus::Locked, Some(s.id)));
    assert!(f.exists());
    let job = db.job_get(s.job_id.unwrap()).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    let events = db.event_list(&ListQuery::new()).await.unwrap();
    assert!(events
        .iter()
        .any(|e| e.code == oxvirt_engine::saga::codes::SAGA_BLOCKED
            && e.severity == Severity::Alert
            && e.description.contains("the SPM is away")));
    // Not resumed by a restart: it waits for an admin.
    assert!(exec.resume_all().await.unwrap().is_empty());
    // Still failing: blocked again, nothing undone.
    let out = exec.retry_stuck(s.id).await.unwrap().wait().await.unwrap();
    assert!(matches!(out, SagaOutcome::Blocked { .. }), "{out:?}");
    assert_eq!(env.app.delete_failures.load(Ordering::SeqCst), 0);
    // The cause gone, a retry finishes it under the same job.
    let out = exec.retry_stuck(s.id).await.unwrap().wait().await.unwrap();
    assert!(out.is_done(), "{out:?}");
    env.assert_deleted(d.id, &f, true, "retried").await;
    let job = db.job_get(s.job_id.unwrap()).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Finished);
    assert!(matches!(
        exec.retry_stuck(s.id).await.err().unwrap(),
        oxvirt_engine::saga::SagaError::NotStuck { .. }
    ));
}

/// Publishes a file: writes it, lets the world take it (a reader starts using it, marked by
/// `<name>.live`), records it done. The file's undo finds it in use once published: deleting
/// it would hurt the reader, so it turns the saga forward again.
struct Publish;

impl SagaDef for Publish {
    type Ctx = App;
    type Params = String;
    const NAME: &'static str = "publish";

    fn description(name: &String) -> String {
        format!("Publishing {name}")
    }

    fn steps() -> Vec<Step<Self>> {
        let path = |c: &StepCtx<Self>, ext: &str| c.app().storage.join(format!("{}{ext}", c.params()));
        vec![
            Step::new(
                "file",
                move |c: StepCtx<Self>| async move { Ok(std::fs::write(path(&c, ""), b"data")?) },
                move |c: StepCtx<Self>| async move {
                    if path(&c, ".live").exists() {
                        return Err(StepError::forward("a reader uses the file"));
                    }
                    let _ = std::fs::remove_file(path(&c, ""));
                    Ok(())
                },
            ),
            Step::without_undo("publish", move |c: StepCtx<Self>| async move {
                Ok(std::fs::write(path(&c, ".live"), b"")?)
            }),
            Step::new(
                "done",
                move |c: StepCtx<Self>| async move { Ok(std::fs::write(path(&c, ".done"), b"")?) },
                move |c: StepCtx<Self>| async move {
                    let _ = std::fs::remove_file(path(&c, ".done"));
                    Ok(())
                },
            ),
        ]
    }
}

/// A step that fails after its effect happened: unwinding reaches an undo that finds the
/// effect permanent, and the saga goes forward again, re-running the failed step, to done.
/// Failed before the effect, the same saga unwinds as usual.
async fn an_undo_that_finds_its_effect_permanent_turns_the_saga_forward(b: Backend) {
    let env = Env::new(b).await;
    let exec_with = |fault: Arc<FaultAt>| {
        let e = SagaExecutor::with_faults(env.t.db.clone(), env.app.clone(), fault, fast_retry());
        e.register::<Publish>().unwrap();
        e
    };
    let lost = FaultAt::new(1, FaultPoint::AfterAction, Fault::Fail);
    let out = exec_with(lost.clone())
        .run::<Publish>("a".into(), opts())
        .await
        .unwrap();
    assert!(lost.fired());
    assert!(out.is_done(), "{out:?}");
    for f in ["a", "a.live", "a.done"] {
        assert!(env.app.storage.join(f).exists(), "{f} is missing");
    }
    let db = &env.t.db;
    let s = &db.saga_list(&[SagaState::Done]).await.unwrap()[0];
    let steps = db.saga_get(s.id).await.unwrap().unwrap().steps;
    assert!(
        steps.iter().all(|st| st.status == SagaStepStatus::Done),
        "{steps:?}"
    );
    let job = db.job_get(s.job_id.unwrap()).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Finished);

    let early = FaultAt::new(1, FaultPoint::BeforeAction, Fault::Fail);
    let out = exec_with(early).run::<Publish>("b".into(), opts()).await.unwrap();
    assert!(matches!(out, SagaOutcome::Unwound { .. }), "{out:?}");
    assert!(!env.app.storage.join("b").exists());
}

/// A command's own description (names, not ids) is the job's, its events', and still theirs
/// after the engine died mid-saga and a new one resumed it.
async fn a_described_saga_keeps_its_description_across_a_resume(b: Backend) {
    let mut env = Env::new(b).await;
    let disk = env
        .t
        .db
        .disk_insert(&Disk::new("data1", env.sd, DiskFormat::Raw, 1 << 20))
        .await
        .unwrap();
    let what = "Deleting disk data1".to_string();
    let crash = FaultAt::new(1, FaultPoint::BeforeAction, Fault::Crash);
    let exec = env.executor(Some(crash));
    let opts = StartOptions {
        description: Some(what.clone()),
        ..Default::default()
    };
    let out = exec.run::<DeleteDisk>(disk.id, opts).await.unwrap();
    assert_eq!(out, SagaOutcome::Interrupted);
    drop(exec);
    env.t.reopen().await;
    let handles = env.executor(None).resume_all().await.unwrap();
    assert_eq!(handles.len(), 1);
    assert!(handles
        .into_iter()
        .next()
        .unwrap()
        .wait()
        .await
        .unwrap()
        .is_done());
    let s = &env.t.db.saga_list(&[]).await.unwrap()[0];
    let job = env.t.db.job_get(s.job_id.unwrap()).await.unwrap().unwrap();
    assert_eq!(job.description, what);
    let texts: Vec<String> = env
        .t
        .db
        .event_list(&ListQuery::new())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.description)
        .collect();
    for t in [format!("{what}: started"), format!("{what}: completed")] {
        assert!(texts.contains(&t), "no event {t:?} in {texts:?}");
    }
    assert!(
        !texts.iter().any(|t| t.contains(&disk.id.to_string())),
        "an event fell back to the saga's own description: {texts:?}"
    );
}

both_backends!(
    a_described_saga_keeps_its_description_across_a_resume,
    an_undo_that_finds_its_effect_permanent_turns_the_saga_forward,
    saga_runs_to_completion,
    saga_unwinds_at_each_step,
    saga_survives_a_crash_at_each_point,
    failed_undo_leaves_the_saga_stuck_until_retried,
    panics_unwind_and_bad_definitions_are_refused,
    unknown_sagas_are_left_for_an_engine_that_knows_them,
    racing_sagas_never_release_each_others_locks,
    failures_past_the_point_of_no_return_go_forward,
    a_saga_that_cannot_finish_is_blocked_until_retried,
);
