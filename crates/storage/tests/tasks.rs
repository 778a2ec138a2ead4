//! SPM tasks on a real domain: running, failing before and after the commit point, recovery by
//! a new SPM of tasks interrupted at each job, a stale (unreadable) record that must not block
//! recovery, refusals once the SPM role is lost, and a task's guard of volume leases.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use common::{Fixture, MIB};
use oxvirt_storage::pool::{self, SpmFence};
use oxvirt_storage::spm::VolumeLeaseError;
use oxvirt_storage::tasks::{
    recover_tasks, run_task, DomainSource, GuardedVolume, Job, TaskContext, TaskPlan, TaskState, TaskStore,
    VolumeLeases,
};
use oxvirt_storage::{Allocation, FileStorageDomain, Legality, StorageError, VolFormat};
use oxvirt_types::{ImgUuid, PoolUuid, SdUuid, TaskId, VolUuid};

struct One(Arc<FileStorageDomain>);
impl DomainSource for One {
    fn domain(&self, sd: SdUuid) -> Result<Arc<FileStorageDomain>, StorageError> {
        if sd == self.0.sd() {
            Ok(self.0.clone())
        } else {
            Err(StorageError::DomainUnavailable(sd))
        }
    }
}

/// The SPM token: (host, lver), or lost.
struct Token(Mutex<Option<(u64, u64)>>);
impl SpmFence for Token {
    fn check(&self) -> Result<(u64, u64), String> {
        self.0.lock().unwrap().ok_or_else(|| "lease lost".to_string())
    }
}

/// Volume leases as a table: volumes another host holds refuse; the ones a task holds are
/// recorded while its guard lives.
#[derive(Default)]
struct Leases {
    elsewhere: Mutex<Vec<(VolUuid, u64)>>,
    held: Arc<Mutex<Vec<(TaskId, VolUuid)>>>,
}

struct Held(Arc<Mutex<Vec<(TaskId, VolUuid)>>>, TaskId);
impl Drop for Held {
    fn drop(&mut self) {
        self.0.lock().unwrap().retain(|(t, _)| *t != self.1);
    }
}

impl VolumeLeases for Leases {
    fn hold(&self, task: TaskId, vols: &[GuardedVolume]) -> Result<Box<dyn Send>, VolumeLeaseError> {
        for v in vols {
            if let Some(&(_, host)) = self.elsewhere.lock().unwrap().iter().find(|(x, _)| *x == v.vol) {
                return Err(VolumeLeaseError::Locked { vol: v.vol, host });
            }
        }
        let mut held = self.held.lock().unwrap();
        held.extend(vols.iter().map(|v| (task, v.vol)));
        Ok(Box::new(Held(self.held.clone(), task)))
    }
}

struct Env {
    _fx: tempfile::TempDir,
    dom: Arc<FileStorageDomain>,
    store: TaskStore,
    token: Token,
    stop: AtomicBool,
}

fn env() -> Env {
    let fx = Fixture::new();
    let root = fx.dom.root().to_path_buf();
    pool::create_pool(&root, PoolUuid::new_random(), "dc", 1).unwrap();
    let Fixture { dir, dom } = fx;
    Env {
        _fx: dir,
        dom: Arc::new(dom),
        store: TaskStore::new(&root),
        token: Token(Mutex::new(Some((1, 3)))),
        stop: AtomicBool::new(false),
    }
}

fn merge_plan(sd: SdUuid, img: ImgUuid, base: VolUuid, top: VolUuid) -> TaskPlan {
    TaskPlan::new("mergeSnapshots")
        .undoable(
            Job::PrepareMerge { sd, img, base, top },
            Job::SetLegality {
                sd,
                img,
                vol: base,
                legality: Legality::Legal,
            },
        )
        .forward(Job::MergeCommit { sd, img, base, top })
        .forward(Job::FinalizeMerge { sd, img, base, top })
}

fn chain(e: &Env) -> (ImgUuid, VolUuid, VolUuid) {
    let (img, base, top) = (
        ImgUuid::new_random(),
        VolUuid::new_random(),
        VolUuid::new_random(),
    );
    e.dom
        .create_volume(
            img,
            base,
            &oxvirt_storage::VolumeSpec::new(32 * MIB, VolFormat::Cow, Allocation::Sparse),
        )
        .unwrap();
    e.dom.create_snapshot(img, top, None, "top").unwrap();
    (img, base, top)
}

#[test]
fn tasks_run_recover_and_roll_back_by_their_commit_point() {
    let e = env();
    let src = One(e.dom.clone());
    let ctx = TaskContext {
        domains: &src,
        store: &e.store,
        fence: &e.token,
        stop: &e.stop,
        progress: &|_| {},
        leases: &Leases::default(),
    };
    let sd = e.dom.sd();

    // A whole merge runs to the end and is journaled as finished.
    let (img, base, top) = chain(&e);
    let mut rec = merge_plan(sd, img, base, top).into_record(TaskId::new_random(), 1, 3);
    run_task(&ctx, &mut rec).unwrap();
    assert_eq!(rec.state, TaskState::Finished);
    assert_eq!(e.store.load(rec.id).unwrap(), rec);
    assert_eq!(e.dom.chain(img).unwrap().ids(), vec![base]);

    // A merge whose SPM died after starting job 1 (committed): rolled forward.
    let (img1, base1, top1) = chain(&e);
    e.dom.prepare_merge(img1, base1, top1).unwrap();
    let mut forward = merge_plan(sd, img1, base1, top1).into_record(TaskId::new_random(), 1, 3);
    forward.next_job = 1;
    forward.started = Some(1);
    e.store.save(&forward).unwrap();
    // A merge whose SPM died in job 0 after it completed (not committed): rolled back.
    let (img2, base2, top2) = chain(&e);
    e.dom.prepare_merge(img2, base2, top2).unwrap();
    let mut back = merge_plan(sd, img2, base2, top2).into_record(TaskId::new_random(), 1, 3);
    back.started = Some(0);
    e.store.save(&back).unwrap();
    // A stale record nobody can read.
    let junk = e.store.dir().join(TaskId::new_random().to_string());
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(
        junk.join(format!("{}.task", junk.file_name().unwrap().to_string_lossy())),
        b"garbage",
    )
    .unwrap();

    // The new SPM (host 2, lver 4) recovers.
    *e.token.0.lock().unwrap() = Some((2, 4));
    e.dom.recover(&[]).unwrap();
    let report = recover_tasks(&ctx, 2);
    assert_eq!(report.finished, vec![forward.id]);
    assert_eq!(report.rolled_back, vec![back.id]);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.unreadable.len(), 1);
    assert_eq!(e.dom.chain(img1).unwrap().ids(), vec![base1]);
    assert_eq!(e.dom.read_meta(img1, base1).unwrap().legality, Legality::Legal);
    assert_eq!(
        e.dom.chain(img2).unwrap().ids(),
        vec![base2, top2],
        "rolled back: nothing merged"
    );
    assert_eq!(e.dom.read_meta(img2, base2).unwrap().legality, Legality::Legal);
    let f = e.store.load(forward.id).unwrap();
    assert_eq!((f.state, f.recovered_by), (TaskState::Finished, Some(2)));
    assert_eq!(e.store.load(back.id).unwrap().state, TaskState::RolledBack);
    // Recovery again finds nothing to do.
    let again = recover_tasks(&ctx, 2);
    assert!(again.finished.is_empty() && again.rolled_back.is_empty());
    std::fs::remove_dir_all(&junk).unwrap();
    let report = e.dom.check(true).unwrap();
    assert!(report.is_clean(), "{report:?}");

    // Clearing: finished tasks go, running ones stay.
    e.store.clear(forward.id).unwrap();
    assert!(e.store.load(forward.id).is_err());
    let running = TaskPlan::new("x").into_record(TaskId::new_random(), 2, 4);
    e.store.save(&running).unwrap();
    assert!(e.store.clear(running.id).is_err());
}

#[test]
fn a_failing_job_rolls_back_before_the_commit_point_and_a_fenced_spm_stops() {
    let e = env();
    let src = One(e.dom.clone());
    let ctx = TaskContext {
        domains: &src,
        store: &e.store,
        fence: &e.token,
        stop: &e.stop,
        progress: &|_| {},
        leases: &Leases::default(),
    };
    let sd = e.dom.sd();
    let (img, base, top) = chain(&e);
    // Job 1 fails (no such image): job 0 (create another image) is undone.
    let (img_new, vol_new) = (ImgUuid::new_random(), VolUuid::new_random());
    let plan = TaskPlan::new("two")
        .undoable(
            Job::CreateVolume {
                sd,
                img: img_new,
                vol: vol_new,
                capacity: 8 * MIB,
                format: VolFormat::Raw,
                allocation: Allocation::Sparse,
                disktype: "DATA".into(),
                description: String::new(),
                initial_size: None,
            },
            Job::DeleteImage { sd, img: img_new },
        )
        .atomic(Job::DeleteImage {
            sd,
            img: ImgUuid::new_random(),
        });
    let mut rec = plan.into_record(TaskId::new_random(), 1, 3);
    run_task(&ctx, &mut rec).unwrap();
    assert_eq!(rec.state, TaskState::RolledBack, "{rec:?}");
    assert!(
        rec.error.as_deref().unwrap().contains("does not exist"),
        "{:?}",
        rec.error
    );
    assert!(!e.dom.image_exists(img_new));

    // The SPM loses its lease: the task stops before its next job and leaves the record as it
    // was for the next SPM.
    *e.token.0.lock().unwrap() = None;
    let mut rec = merge_plan(sd, img, base, top).into_record(TaskId::new_random(), 1, 3);
    assert!(run_task(&ctx, &mut rec).is_err());
    assert_eq!(
        e.dom.read_meta(img, base).unwrap().legality,
        Legality::Legal,
        "nothing ran"
    );
    assert!(e.store.load(rec.id).is_err(), "a fenced SPM writes no record");
}

/// A source the guard is checked against while jobs run.
struct Watched<'a>(&'a One, &'a Leases, Vec<VolUuid>);
impl DomainSource for Watched<'_> {
    fn domain(&self, sd: SdUuid) -> Result<Arc<FileStorageDomain>, StorageError> {
        let held: Vec<VolUuid> = self.1.held.lock().unwrap().iter().map(|(_, v)| *v).collect();
        assert!(
            self.2.iter().all(|v| held.contains(v)),
            "a job ran without its guard: held {held:?}"
        );
        self.0.domain(sd)
    }
}

#[test]
fn a_task_holds_its_guard_while_it_runs_and_a_guard_held_elsewhere_stops_it_before_any_job() {
    let e = env();
    let src = One(e.dom.clone());
    let leases = Leases::default();
    let sd = e.dom.sd();
    let (img, base, top) = chain(&e);
    let guard = [base, top].map(|vol| GuardedVolume { sd, img, vol });
    let watched = Watched(&src, &leases, vec![base, top]);
    let ctx = TaskContext {
        domains: &watched,
        store: &e.store,
        fence: &e.token,
        stop: &e.stop,
        progress: &|_| {},
        leases: &leases,
    };

    // Host 4 holds the top volume (its VM writes it): the merge stops before its first job.
    leases.elsewhere.lock().unwrap().push((top, 4));
    let mut rec = merge_plan(sd, img, base, top)
        .guard(guard)
        .into_record(TaskId::new_random(), 1, 3);
    run_task(&ctx, &mut rec).unwrap();
    assert_eq!(rec.state, TaskState::RolledBack, "{rec:?}");
    let why = rec.error.clone().unwrap();
    assert!(
        why.contains(&format!("volume {top} is locked by host 4")),
        "{why}"
    );
    assert_eq!(e.store.load(rec.id).unwrap(), rec, "the refusal is journaled");
    assert_eq!(e.dom.chain(img).unwrap().ids(), vec![base, top], "nothing ran");
    assert_eq!(e.dom.read_meta(img, base).unwrap().legality, Legality::Legal);
    assert!(leases.held.lock().unwrap().is_empty(), "nothing half taken");

    // Released there: the merge runs holding both leases (the source asserts it at every
    // job) and gives them back at the end.
    leases.elsewhere.lock().unwrap().clear();
    let mut rec = merge_plan(sd, img, base, top)
        .guard(guard)
        .into_record(TaskId::new_random(), 1, 3);
    run_task(&ctx, &mut rec).unwrap();
    assert_eq!(rec.state, TaskState::Finished, "{rec:?}");
    assert_eq!(
        e.store.load(rec.id).unwrap().guard,
        guard.to_vec(),
        "the guard is journaled"
    );
    assert_eq!(e.dom.chain(img).unwrap().ids(), vec![base]);
    assert!(leases.held.lock().unwrap().is_empty(), "released at the end");

    // A task under way whose guard is taken meanwhile (its SPM died; another host now writes
    // the volume) is not touched by the new SPM: Failed, left for the next start to retry.
    let (img, base, top) = chain(&e);
    let guard = [base, top].map(|vol| GuardedVolume { sd, img, vol });
    let mut rec = merge_plan(sd, img, base, top)
        .guard(guard)
        .into_record(TaskId::new_random(), 1, 3);
    rec.started = Some(0);
    e.store.save(&rec).unwrap();
    leases.elsewhere.lock().unwrap().push((base, 2));
    let plain = TaskContext { domains: &src, ..ctx };
    let report = recover_tasks(&plain, 2);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert!(report.failed[0].1.contains("is locked by host 2"), "{report:?}");
    assert_eq!(e.store.load(rec.id).unwrap().state, TaskState::Failed);
    assert_eq!(e.dom.chain(img).unwrap().ids(), vec![base, top]);
}
