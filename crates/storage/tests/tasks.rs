//! SPM tasks on a real domain: running, failing before and after the commit point, recovery by
//! a new SPM of tasks interrupted at each job, a stale (unreadable) record that must not block
//! recovery, and refusals once the SPM role is lost.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use common::{Fixture, MIB};
use oxvirt_storage::pool::{self, SpmFence};
use oxvirt_storage::tasks::{
    recover_tasks, run_task, DomainSource, Job, TaskContext, TaskPlan, TaskState, TaskStore,
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
