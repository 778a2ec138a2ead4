//! SPM tasks: every verb that changes the pool's storage runs as a task, journaled in the
//! master domain under `master/tasks/<taskUUID>/<taskUUID>.task`, so that a new SPM can finish
//! or roll back what a dead one left.
//!
//! A task is a list of **jobs**, each one domain verb (create a volume, prepare a merge, copy an
//! image…). A job is atomic on its own: it runs as one journaled [`crate::ops::Operation`] on
//! its domain, which [`crate::FileStorageDomain::recover`] completes or undoes after a crash.
//! The task journal adds what spans jobs: which jobs ran, each job's undo (a job, too), and the
//! commit point — jobs before `commit_at` are undone in reverse (LIFO, as VDSM's recovery does)
//! when the task fails or its SPM dies; from `commit_at` on the task only rolls forward.
//!
//! ```text
//!             record written                                        record rewritten
//!   plan ──► Running ── job i: `started = i`, run, `next_job = i+1` ──► Finished
//!              │ failure before commit_at: undo jobs < i in reverse ──► RolledBack
//!              │ failure at/after commit_at ──────────────────────────► Failed (recovery retries)
//!              ▼ SPM dies
//!   new SPM: domain recovery first (each job atomic again), then per task:
//!     the started job done (its postcondition holds)? count it;
//!     committed (a job ≥ commit_at started) → run the rest  ──► Finished
//!     otherwise                           → undo done jobs ──► RolledBack
//! ```
//!
//! A task that changes volumes a running VM could be using (delete, a cold merge, a move)
//! names them as its **guard**: it holds their volume leases from before its first job to its
//! end, on whichever SPM runs or recovers it, so it never changes an image another host writes.
//! A guard it cannot take ends the task before any job (RolledBack, the holder named), or, for a
//! task already under way, marks it Failed for the next SPM start to retry.
//!
//! Invariants: the record is rewritten atomically before and after every job, each write
//! preceded by a check that we are still the SPM (a fenced SPM stops at once and leaves the
//! task to its successor); recovery never fails as a whole — a task it cannot finish is marked
//! Failed with the reason and an unreadable record is reported and left aside, so **a stale
//! task never blocks `spmStart`** (vdsm issue #320); only finished, rolled-back or failed tasks
//! can be cleared.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use oxvirt_types::{ImgUuid, SdUuid, TaskId, VolUuid};
use serde::{Deserialize, Serialize};

use crate::domain::FileStorageDomain;
use crate::error::StorageError;
use crate::fsio;
use crate::image::{CopyMode, SyncType, VolumeSpec};
use crate::ops::REMOVED_IMAGE_PREFIX;
use crate::pool::{tasks_dir, SpmFence};
use crate::spm::VolumeLeaseError;
use crate::volmeta::{Allocation, Legality, VolFormat, VolRole};

/// Environment variable that parks a task before a job, for crash tests:
/// `<verb>:<job index>`. The task is recorded as having started that job, then waits forever.
pub const PAUSE_ENV: &str = "OXVIRT_TASK_PAUSE";

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("task {id} not found")]
    NotFound { id: TaskId },
    #[error("task {id} is {state:?}; {action} needs it {needed}")]
    State {
        id: TaskId,
        state: TaskState,
        action: &'static str,
        needed: &'static str,
    },
    #[error("cannot {action} task record {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("task record {} is unreadable", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("task {id}: no longer the SPM ({reason})")]
    Fenced { id: TaskId, reason: String },
    #[error("task {id} ({verb}) job {job} failed")]
    Job {
        id: TaskId,
        verb: String,
        job: usize,
        #[source]
        source: Box<StorageError>,
    },
    #[error("task {id} was stopped")]
    Stopped { id: TaskId },
}

/// A volume whose lease a task holds while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuardedVolume {
    pub sd: SdUuid,
    pub img: ImgUuid,
    pub vol: VolUuid,
}

/// Takes the leases of a task's guard; the node owns the lockspaces they are taken in.
pub trait VolumeLeases: Sync {
    /// Holds the leases of `vols` for task `task` until the returned value drops; taking none
    /// when one is refused, with the holder named.
    fn hold(&self, task: TaskId, vols: &[GuardedVolume]) -> Result<Box<dyn Send>, VolumeLeaseError>;
}

/// Finds the pool's domains by id.
pub trait DomainSource: Send + Sync {
    fn domain(&self, sd: SdUuid) -> Result<Arc<FileStorageDomain>, StorageError>;
}

/// A collapsed copy's single volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collapse {
    pub vol: VolUuid,
    pub format: VolFormat,
    pub allocation: Allocation,
    /// Copy what the image held when this volume was its leaf (see [`CopyMode::Collapsed`]).
    #[serde(default)]
    pub top: Option<VolUuid>,
}

/// One domain verb, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum Job {
    CreateVolume {
        sd: SdUuid,
        img: ImgUuid,
        vol: VolUuid,
        capacity: u64,
        format: VolFormat,
        allocation: Allocation,
        disktype: String,
        description: String,
        /// See [`VolumeSpec::initial_size`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initial_size: Option<u64>,
    },
    CreateSnapshot {
        sd: SdUuid,
        img: ImgUuid,
        vol: VolUuid,
        capacity: Option<u64>,
        description: String,
        /// The older volume whose content the new leaf shows (a preview), if not the leaf's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_of: Option<VolUuid>,
    },
    CloneFromTemplate {
        sd: SdUuid,
        tmpl_img: ImgUuid,
        tmpl_vol: VolUuid,
        img: ImgUuid,
        vol: VolUuid,
        description: String,
    },
    DeleteVolume {
        sd: SdUuid,
        img: ImgUuid,
        vol: VolUuid,
    },
    DeleteImage {
        sd: SdUuid,
        img: ImgUuid,
    },
    ResizeVolume {
        sd: SdUuid,
        img: ImgUuid,
        vol: VolUuid,
        capacity: u64,
    },
    SetLegality {
        sd: SdUuid,
        img: ImgUuid,
        vol: VolUuid,
        legality: Legality,
    },
    MakeTemplate {
        sd: SdUuid,
        img: ImgUuid,
        vol: VolUuid,
    },
    CopyImage {
        src_sd: SdUuid,
        img: ImgUuid,
        dst_sd: SdUuid,
        dst_img: ImgUuid,
        collapse: Option<Collapse>,
    },
    /// VDSM's `cloneImageStructure`: image `img`'s volumes made again, empty and ILLEGAL, in
    /// the same image of `dst_sd` (the data follows by a sync).
    CloneStructure {
        src_sd: SdUuid,
        img: ImgUuid,
        dst_sd: SdUuid,
    },
    /// VDSM's `syncImageData`: the data of image `img`'s volumes (all but the leaf for
    /// [`SyncType::Internal`]) copied into its structure on `dst_sd`, each turned LEGAL.
    SyncData {
        src_sd: SdUuid,
        img: ImgUuid,
        dst_sd: SdUuid,
        sync: SyncType,
    },
    PrepareMerge {
        sd: SdUuid,
        img: ImgUuid,
        base: VolUuid,
        top: VolUuid,
    },
    MergeCommit {
        sd: SdUuid,
        img: ImgUuid,
        base: VolUuid,
        top: VolUuid,
    },
    FinalizeMerge {
        sd: SdUuid,
        img: ImgUuid,
        base: VolUuid,
        top: VolUuid,
    },
}

impl Job {
    pub fn name(&self) -> &'static str {
        match self {
            Job::CreateVolume { .. } => "create_volume",
            Job::CreateSnapshot { .. } => "create_snapshot",
            Job::CloneFromTemplate { .. } => "clone_from_template",
            Job::DeleteVolume { .. } => "delete_volume",
            Job::DeleteImage { .. } => "delete_image",
            Job::ResizeVolume { .. } => "resize_volume",
            Job::SetLegality { .. } => "set_legality",
            Job::MakeTemplate { .. } => "make_template",
            Job::CopyImage { .. } => "copy_image",
            Job::CloneStructure { .. } => "clone_structure",
            Job::SyncData { .. } => "sync_data",
            Job::PrepareMerge { .. } => "prepare_merge",
            Job::MergeCommit { .. } => "merge_commit",
            Job::FinalizeMerge { .. } => "finalize_merge",
        }
    }

    pub fn run(&self, src: &dyn DomainSource, progress: &mut dyn FnMut(f64)) -> Result<(), StorageError> {
        match self {
            Job::CreateVolume {
                sd,
                img,
                vol,
                capacity,
                format,
                allocation,
                disktype,
                description,
                initial_size,
            } => {
                let spec = VolumeSpec {
                    capacity: *capacity,
                    format: *format,
                    allocation: *allocation,
                    disktype: disktype.clone(),
                    description: description.clone(),
                    initial_size: *initial_size,
                };
                src.domain(*sd)?.create_volume(*img, *vol, &spec).map(drop)
            }
            Job::CreateSnapshot {
                sd,
                img,
                vol,
                capacity,
                description,
                content_of,
            } => src
                .domain(*sd)?
                .create_snapshot_of(*img, *vol, *capacity, *content_of, description)
                .map(drop),
            Job::CloneFromTemplate {
                sd,
                tmpl_img,
                tmpl_vol,
                img,
                vol,
                description,
            } => src
                .domain(*sd)?
                .clone_from_template(*tmpl_img, *tmpl_vol, *img, *vol, description)
                .map(drop),
            Job::DeleteVolume { sd, img, vol } => src.domain(*sd)?.delete_volume(*img, *vol),
            Job::DeleteImage { sd, img } => src.domain(*sd)?.delete_image(*img),
            Job::ResizeVolume {
                sd,
                img,
                vol,
                capacity,
            } => src.domain(*sd)?.resize_volume(*img, *vol, *capacity).map(drop),
            Job::SetLegality {
                sd,
                img,
                vol,
                legality,
            } => src.domain(*sd)?.set_legality(*img, *vol, *legality),
            Job::MakeTemplate { sd, img, vol } => src.domain(*sd)?.make_template(*img, *vol),
            Job::CopyImage {
                src_sd,
                img,
                dst_sd,
                dst_img,
                collapse,
            } => {
                let s = src.domain(*src_sd)?;
                let d = if dst_sd == src_sd {
                    s.clone()
                } else {
                    src.domain(*dst_sd)?
                };
                let mode = match collapse {
                    None => CopyMode::Chain,
                    Some(c) => CopyMode::Collapsed {
                        vol: c.vol,
                        format: c.format,
                        allocation: c.allocation,
                        top: c.top,
                    },
                };
                s.copy_image(*img, &d, *dst_img, mode, progress)
            }
            Job::CloneStructure { src_sd, img, dst_sd } => {
                let d = src.domain(*dst_sd)?;
                src.domain(*src_sd)?
                    .copy_image(*img, &d, *img, CopyMode::Structure, progress)
            }
            Job::SyncData {
                src_sd,
                img,
                dst_sd,
                sync,
            } => {
                let d = src.domain(*dst_sd)?;
                src.domain(*src_sd)?.sync_image_data(*img, &d, *sync, progress)
            }
            Job::PrepareMerge { sd, img, base, top } => src.domain(*sd)?.prepare_merge(*img, *base, *top),
            Job::MergeCommit { sd, img, base, top } => {
                src.domain(*sd)?.merge_commit(*img, *base, *top, progress)
            }
            Job::FinalizeMerge { sd, img, base, top } => src.domain(*sd)?.finalize_merge(*img, *base, *top),
        }
    }

    /// Whether the job's effect is on storage (checked after domain recovery, when a job was
    /// interrupted). `MergeCommit` cannot be told from metadata and is always redone (it is
    /// idempotent).
    pub fn is_done(&self, src: &dyn DomainSource) -> Result<bool, StorageError> {
        let meta =
            |sd: SdUuid, img: ImgUuid, vol: VolUuid| -> Result<Option<crate::VolumeMetadata>, StorageError> {
                match src.domain(sd)?.read_meta(img, vol) {
                    Ok(m) => Ok(Some(m)),
                    Err(StorageError::NoVolume { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            };
        Ok(match self {
            Job::CreateVolume { sd, img, vol, .. }
            | Job::CloneFromTemplate { sd, img, vol, .. }
            | Job::CreateSnapshot { sd, img, vol, .. } => {
                meta(*sd, *img, *vol)?.is_some_and(|m| m.legality == Legality::Legal)
            }
            Job::DeleteVolume { sd, img, vol } => meta(*sd, *img, *vol)?.is_none(),
            Job::DeleteImage { sd, img } => {
                let d = src.domain(*sd)?;
                !d.image_exists(*img)
                    && !d
                        .images_dir()
                        .join(format!("{REMOVED_IMAGE_PREFIX}{img}"))
                        .exists()
            }
            Job::ResizeVolume {
                sd,
                img,
                vol,
                capacity,
            } => meta(*sd, *img, *vol)?.is_some_and(|m| m.capacity >= *capacity),
            Job::SetLegality {
                sd,
                img,
                vol,
                legality,
            } => meta(*sd, *img, *vol)?.is_some_and(|m| m.legality == *legality),
            Job::MakeTemplate { sd, img, vol } => {
                meta(*sd, *img, *vol)?.is_some_and(|m| m.role == VolRole::Shared)
            }
            Job::CopyImage { dst_sd, dst_img, .. } => {
                let d = src.domain(*dst_sd)?;
                d.image_exists(*dst_img)
                    && d.chain(*dst_img)
                        .map(|c| c.volumes.iter().all(|v| v.meta.legality == Legality::Legal))
                        .unwrap_or(false)
            }
            Job::CloneStructure { src_sd, img, dst_sd } => {
                let d = src.domain(*dst_sd)?;
                let own = |c: &crate::Chain| c.own_volumes().map(|v| v.id).collect::<Vec<_>>();
                d.image_exists(*img)
                    && match (src.domain(*src_sd)?.chain(*img), d.chain(*img)) {
                        (Ok(a), Ok(b)) => own(&a) == own(&b),
                        _ => false,
                    }
            }
            Job::SyncData {
                src_sd,
                img,
                dst_sd,
                sync,
            } => match (src.domain(*src_sd)?.chain(*img), src.domain(*dst_sd)?.chain(*img)) {
                (Ok(a), Ok(b)) => {
                    let leaf = a.leaf().id;
                    a.own_volumes()
                        .filter(|v| *sync == SyncType::All || v.id != leaf)
                        .all(|v| b.get(v.id).is_some_and(|c| c.meta.legality == Legality::Legal))
                }
                _ => false,
            },
            Job::PrepareMerge { sd, img, base, .. } => {
                meta(*sd, *img, *base)?.is_some_and(|m| m.legality == Legality::Illegal)
            }
            Job::MergeCommit { .. } => false,
            Job::FinalizeMerge { sd, img, base, top } => {
                meta(*sd, *img, *top)?.is_none()
                    && meta(*sd, *img, *base)?.is_some_and(|m| m.legality == Legality::Legal)
            }
        })
    }
}

/// A job and, before the commit point, what undoes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedJob {
    pub job: Job,
    pub undo: Option<Job>,
}

/// VDSM-style task states (see the module diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Running,
    Finished,
    RolledBack,
    Failed,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        self != TaskState::Running
    }

    /// VDSM's `taskState` and `taskResult`.
    pub fn vdsm(self) -> (&'static str, &'static str) {
        match self {
            TaskState::Running => ("running", ""),
            TaskState::Finished => ("finished", "success"),
            TaskState::RolledBack => ("finished", "cleanSuccess"),
            TaskState::Failed => ("finished", "failure"),
        }
    }
}

/// The journal record of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    pub verb: String,
    pub jobs: Vec<PlannedJob>,
    /// Jobs from here on are never undone.
    pub commit_at: usize,
    pub state: TaskState,
    /// Jobs before this one completed.
    pub next_job: usize,
    /// The job that was last started (it may not have completed).
    pub started: Option<usize>,
    pub error: Option<String>,
    /// The SPM that created the task, and its lver.
    pub spm_host: u64,
    pub lver: u64,
    pub created_at: u64,
    pub updated_at: u64,
    /// The SPM host that recovered it, if one did.
    pub recovered_by: Option<u64>,
    /// Progress of the running job, 0..=100 (not persisted at every change).
    #[serde(default)]
    pub progress: f64,
    /// Volumes whose leases the task holds while it runs (see the module docs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guard: Vec<GuardedVolume>,
}

/// The error and its sources, joined.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Builds a task: undoable jobs first, then forward jobs.
#[derive(Debug, Clone)]
pub struct TaskPlan {
    pub verb: String,
    jobs: Vec<PlannedJob>,
    commit_at: usize,
    guard: Vec<GuardedVolume>,
}

impl TaskPlan {
    pub fn new(verb: &str) -> TaskPlan {
        TaskPlan {
            verb: verb.to_string(),
            jobs: Vec::new(),
            commit_at: 0,
            guard: Vec::new(),
        }
    }

    /// Volumes whose leases the task holds from before its first job to its end.
    pub fn guard(mut self, vols: impl IntoIterator<Item = GuardedVolume>) -> TaskPlan {
        for v in vols {
            if !self.guard.contains(&v) {
                self.guard.push(v);
            }
        }
        self
    }

    pub fn undoable(mut self, job: Job, undo: Job) -> TaskPlan {
        assert_eq!(
            self.commit_at,
            self.jobs.len(),
            "undoable jobs precede forward ones"
        );
        self.jobs.push(PlannedJob {
            job,
            undo: Some(undo),
        });
        self.commit_at = self.jobs.len();
        self
    }

    /// A job with nothing to undo that may still come before the commit point (a single
    /// atomic job, or one whose failure leaves nothing behind).
    pub fn atomic(mut self, job: Job) -> TaskPlan {
        assert_eq!(
            self.commit_at,
            self.jobs.len(),
            "undoable jobs precede forward ones"
        );
        self.jobs.push(PlannedJob { job, undo: None });
        self.commit_at = self.jobs.len();
        self
    }

    pub fn forward(mut self, job: Job) -> TaskPlan {
        self.jobs.push(PlannedJob { job, undo: None });
        self
    }

    pub fn into_record(self, id: TaskId, spm_host: u64, lver: u64) -> TaskRecord {
        let now = now_secs();
        TaskRecord {
            id,
            verb: self.verb,
            commit_at: self.commit_at,
            jobs: self.jobs,
            state: TaskState::Running,
            next_job: 0,
            started: None,
            error: None,
            spm_host,
            lver,
            created_at: now,
            updated_at: now,
            recovered_by: None,
            progress: 0.0,
            guard: self.guard,
        }
    }
}

/// The task journal in `master/tasks`.
#[derive(Debug, Clone)]
pub struct TaskStore {
    dir: PathBuf,
}

impl TaskStore {
    /// The store of the master domain at `master_root`.
    pub fn new(master_root: &Path) -> TaskStore {
        TaskStore {
            dir: tasks_dir(master_root),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn task_dir(&self, id: TaskId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    pub fn record_path(&self, id: TaskId) -> PathBuf {
        self.task_dir(id).join(format!("{id}.task"))
    }

    /// Writes the record atomically (the task directory is made durable on first write).
    pub fn save(&self, rec: &TaskRecord) -> Result<(), TaskError> {
        let dir = self.task_dir(rec.id);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(|source| TaskError::Io {
                action: "create",
                path: dir.clone(),
                source,
            })?;
            fsio::fsync_dir(&self.dir).map_err(|source| TaskError::Io {
                action: "sync",
                path: self.dir.clone(),
                source,
            })?;
        }
        let path = self.record_path(rec.id);
        let data = serde_json::to_vec_pretty(rec).expect("task records serialize");
        fsio::atomic_write(&path, &data, 0o660).map_err(|source| TaskError::Io {
            action: "write",
            path,
            source,
        })
    }

    pub fn load(&self, id: TaskId) -> Result<TaskRecord, TaskError> {
        let path = self.record_path(id);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(TaskError::NotFound { id }),
            Err(source) => {
                return Err(TaskError::Io {
                    action: "read",
                    path,
                    source,
                })
            }
        };
        serde_json::from_slice(&data).map_err(|source| TaskError::Corrupt { path, source })
    }

    /// Every task, and the task directories whose record cannot be read.
    pub fn load_all(&self) -> (Vec<TaskRecord>, Vec<(String, String)>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return (ok, bad);
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(id) = name.parse::<TaskId>() else {
                if !name.ends_with(".new") {
                    bad.push((name, "not a task id".into()));
                }
                continue;
            };
            match self.load(id) {
                Ok(r) => ok.push(r),
                Err(e) => bad.push((name, error_chain(&e))),
            }
        }
        ok.sort_by_key(|r| (r.created_at, r.id));
        (ok, bad)
    }

    /// Removes a terminal task's directory.
    pub fn clear(&self, id: TaskId) -> Result<(), TaskError> {
        let rec = self.load(id)?;
        if !rec.state.is_terminal() {
            return Err(TaskError::State {
                id,
                state: rec.state,
                action: "clear",
                needed: "finished, rolled back or failed",
            });
        }
        let dir = self.task_dir(id);
        std::fs::remove_dir_all(&dir).map_err(|source| TaskError::Io {
            action: "remove",
            path: dir,
            source,
        })?;
        fsio::fsync_dir(&self.dir).map_err(|source| TaskError::Io {
            action: "sync",
            path: self.dir.clone(),
            source,
        })
    }
}

/// What a task runs with.
pub struct TaskContext<'a> {
    pub domains: &'a dyn DomainSource,
    pub store: &'a TaskStore,
    pub fence: &'a dyn SpmFence,
    /// Set by `Task.stop`: the task rolls back before its next job (if not committed).
    pub stop: &'a AtomicBool,
    /// Called with the running job's progress (0..=100).
    pub progress: &'a (dyn Fn(f64) + Sync),
    pub leases: &'a dyn VolumeLeases,
}

impl TaskContext<'_> {
    fn fence(&self, id: TaskId) -> Result<(), TaskError> {
        self.fence
            .check()
            .map(drop)
            .map_err(|reason| TaskError::Fenced { id, reason })
    }

    /// Takes the task's guard. `Ok(None)`: refused, and the record says so (RolledBack when no
    /// job has started, else Failed for the next SPM start to retry).
    fn hold_guard(&self, rec: &mut TaskRecord) -> Result<Option<Box<dyn Send>>, TaskError> {
        if rec.guard.is_empty() {
            return Ok(Some(Box::new(())));
        }
        match self.leases.hold(rec.id, &rec.guard) {
            Ok(held) => Ok(Some(held)),
            Err(e) => {
                let untouched = rec.next_job == 0 && rec.started.is_none();
                rec.state = if untouched {
                    TaskState::RolledBack
                } else {
                    TaskState::Failed
                };
                rec.error = Some(error_chain(&e));
                tracing::warn!(task_id = %rec.id, verb = %rec.verb, error = %error_chain(&e), "the task's volume leases are held elsewhere");
                self.save(rec)?;
                Ok(None)
            }
        }
    }

    /// Saves the record if we are still the SPM.
    fn save(&self, rec: &mut TaskRecord) -> Result<(), TaskError> {
        self.fence(rec.id)?;
        rec.updated_at = now_secs();
        self.store.save(rec)
    }
}

fn pause_requested(verb: &str, job: usize) -> bool {
    std::env::var(PAUSE_ENV)
        .ok()
        .and_then(|s| {
            s.rsplit_once(':')
                .map(|(v, j)| (v.to_string(), j.parse::<usize>().ok()))
        })
        .is_some_and(|(v, j)| v == verb && j == Some(job))
}

/// Runs (or continues) a task from `rec.next_job`. Persists every transition; the record's
/// final state says how it ended. Errors are returned only when the record could not be
/// written (fenced or storage gone): the task is then left to the next SPM's recovery.
pub fn run_task(ctx: &TaskContext<'_>, rec: &mut TaskRecord) -> Result<(), TaskError> {
    let Some(_held) = ctx.hold_guard(rec)? else {
        return Ok(());
    };
    ctx.save(rec)?;
    tracing::info!(task_id = %rec.id, verb = %rec.verb, jobs = rec.jobs.len(), from = rec.next_job, "task running");
    while rec.next_job < rec.jobs.len() {
        let i = rec.next_job;
        let committed = i >= rec.commit_at;
        if ctx.stop.load(Ordering::SeqCst) && !committed {
            return roll_back(ctx, rec, "stopped by request".into());
        }
        rec.started = Some(i);
        rec.progress = 0.0;
        ctx.save(rec)?;
        if pause_requested(&rec.verb, i) {
            tracing::warn!(task_id = %rec.id, job = i, "task paused by {PAUSE_ENV}");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        let job = rec.jobs[i].job.clone();
        // A job must not start without the SPM role; it cannot be interrupted once started
        // (the node aborts itself if fenced while jobs run, see the node's SPM module).
        ctx.fence(rec.id)?;
        let result = job.run(ctx.domains, &mut |p| (ctx.progress)(p));
        match result {
            Ok(()) => {
                rec.next_job = i + 1;
                rec.progress = 100.0;
                ctx.save(rec)?;
            }
            Err(e) => {
                let err = TaskError::Job {
                    id: rec.id,
                    verb: rec.verb.clone(),
                    job: i,
                    source: Box::new(e),
                };
                let msg = error_chain(&err);
                if committed {
                    rec.state = TaskState::Failed;
                    rec.error = Some(msg);
                    tracing::error!(task_id = %rec.id, job = i, error = %err, "task failed after its commit point; the next SPM start retries it");
                    return ctx.save(rec);
                }
                return roll_back(ctx, rec, msg);
            }
        }
    }
    rec.state = TaskState::Finished;
    rec.started = None;
    ctx.save(rec)?;
    tracing::info!(task_id = %rec.id, verb = %rec.verb, "task finished");
    Ok(())
}

/// Undoes the completed jobs of an uncommitted task in reverse.
fn roll_back(ctx: &TaskContext<'_>, rec: &mut TaskRecord, why: String) -> Result<(), TaskError> {
    tracing::warn!(task_id = %rec.id, verb = %rec.verb, reason = %why, "rolling the task back");
    for i in (0..rec.next_job.min(rec.commit_at)).rev() {
        let Some(undo) = rec.jobs[i].undo.clone() else {
            continue;
        };
        ctx.fence(rec.id)?;
        if let Err(e) = undo.run(ctx.domains, &mut |_| {}) {
            rec.state = TaskState::Failed;
            rec.error = Some(format!(
                "{why}; undoing job {i} ({}) failed: {}",
                undo.name(),
                error_chain(&e)
            ));
            return ctx.save(rec);
        }
        rec.next_job = i;
        ctx.save(rec)?;
    }
    rec.state = TaskState::RolledBack;
    rec.started = None;
    rec.error = Some(why);
    ctx.save(rec)
}

/// What recovery did with each task.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TaskRecovery {
    pub finished: Vec<TaskId>,
    pub rolled_back: Vec<TaskId>,
    pub failed: Vec<(TaskId, String)>,
    /// Task directories that could not be read (left in place, reported).
    pub unreadable: Vec<(String, String)>,
}

/// Recovers every task a dead SPM left running (run after domain recovery). Never fails as a
/// whole; see the module invariants.
pub fn recover_tasks(ctx: &TaskContext<'_>, our_host: u64) -> TaskRecovery {
    let (tasks, unreadable) = ctx.store.load_all();
    let mut out = TaskRecovery {
        unreadable,
        ..TaskRecovery::default()
    };
    for (name, why) in &out.unreadable {
        tracing::error!(task = %name, reason = %why, "unreadable task record left aside");
    }
    for mut rec in tasks {
        // Failed committed tasks are retried too: their jobs roll forward idempotently.
        let retry_failed =
            rec.state == TaskState::Failed && rec.next_job >= rec.commit_at && rec.next_job < rec.jobs.len();
        if rec.state != TaskState::Running && !retry_failed {
            continue;
        }
        rec.recovered_by = Some(our_host);
        let id = rec.id;
        match recover_one(ctx, &mut rec) {
            Ok(()) => match rec.state {
                TaskState::Finished => out.finished.push(id),
                TaskState::RolledBack => out.rolled_back.push(id),
                _ => out.failed.push((id, rec.error.clone().unwrap_or_default())),
            },
            Err(e) => {
                let msg = error_chain(&e);
                tracing::error!(task_id = %id, error = %msg, "task recovery failed; marked failed");
                rec.state = TaskState::Failed;
                rec.error = Some(msg.clone());
                let _ = ctx.save(&mut rec);
                out.failed.push((id, msg));
            }
        }
    }
    out
}

fn recover_one(ctx: &TaskContext<'_>, rec: &mut TaskRecord) -> Result<(), TaskError> {
    if let Some(i) = rec.started {
        if i >= rec.next_job && i < rec.jobs.len() {
            let done = rec.jobs[i]
                .job
                .is_done(ctx.domains)
                .map_err(|source| TaskError::Job {
                    id: rec.id,
                    verb: rec.verb.clone(),
                    job: i,
                    source: Box::new(source),
                })?;
            if done {
                rec.next_job = i + 1;
            }
        }
    }
    let committed = rec.started.is_some_and(|i| i >= rec.commit_at) || rec.next_job > rec.commit_at;
    tracing::info!(task_id = %rec.id, verb = %rec.verb, next_job = rec.next_job, committed, "recovering task");
    if committed || rec.next_job >= rec.jobs.len() {
        rec.state = TaskState::Running;
        rec.error = None;
        run_task(ctx, rec)
    } else {
        let Some(_held) = ctx.hold_guard(rec)? else {
            return Ok(());
        };
        roll_back(
            ctx,
            rec,
            "the SPM running the task died; rolled back by the new SPM".into(),
        )
    }
}
