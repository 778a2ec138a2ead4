//! Multi-step operations: explicit steps with undo, a journal on the domain, and recovery.
//!
//! Every verb that changes more than one file is planned as an [`Operation`]: a list of
//! [`Step`]s, each idempotent, and a `commit_at` index. Steps before `commit_at` each carry an
//! undo step; steps from `commit_at` on cannot be undone and are rolled *forward*.
//!
//! ```text
//!            journal written          journal rewritten            journal removed
//!   plan ──► [Pending] ── steps 0..commit_at ──► [Committed] ── steps commit_at.. ──► done
//!               │  failure: undo done steps            │  failure: keep, roll forward later
//!               ▼  in reverse, remove journal          ▼
//!           old state                               recovery redoes steps commit_at..
//! ```
//!
//! A crash leaves the journal entry behind; [`crate::FileStorageDomain::recover`] undoes a Pending
//! operation (every undo tolerates a step that never ran) or finishes a Committed one (every step
//! tolerates having run already). The journal lives in `<domain>/oxvirt/journal/<op>.json`,
//! outside VDSM's namespaces; the pool's task journal (`master/tasks`) can later wrap the same
//! operations, since they are plain serializable data.
//!
//! Failpoints ([`Failpoint`]) stop an operation before a chosen step, either as a plain error
//! (the runner rolls back), as a simulated crash (nothing rolled back, journal kept), or by
//! aborting the process; `OXVIRT_STORAGE_FAILPOINT=<verb>:<step>:<error|crash|abort>` sets one
//! from the environment (used to kill child processes in tests).

use std::path::{Path, PathBuf};

use oxvirt_qemu::img::{ConvertRequest, CreateRequest, Preallocation};
use oxvirt_types::{ImgUuid, SdUuid, VolUuid};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::FileStorageDomain;
use crate::error::{Result, StorageError};
use crate::fsio;
use crate::leases;
use crate::volmeta::{Allocation, VolFormat, VolumeMetadata};

/// The prefix VDSM gives an image directory being deleted.
pub const REMOVED_IMAGE_PREFIX: &str = "_remove_me_";

/// What a new volume's data file looks like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSpec {
    pub format: VolFormat,
    pub allocation: Allocation,
    pub capacity: u64,
    /// Parent volume (in the same image directory) and its format.
    pub backing: Option<(VolUuid, VolFormat)>,
}

/// One idempotent action on storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    MakeImageDir { img: ImgUuid },
    RemoveImageDirIfEmpty { img: ImgUuid },
    CreateData { img: ImgUuid, vol: VolUuid, spec: DataSpec },
    RemoveData { img: ImgUuid, vol: VolUuid },
    WriteMeta { img: ImgUuid, vol: VolUuid, meta: VolumeMetadata },
    RemoveMeta { img: ImgUuid, vol: VolUuid },
    InitLease { img: ImgUuid, vol: VolUuid },
    RemoveLease { img: ImgUuid, vol: VolUuid },
    /// Hard-links a template volume's data, `.meta` and `.lease` into another image directory.
    LinkShared { from: ImgUuid, to: ImgUuid, vol: VolUuid },
    /// Removes the links made by `LinkShared` (never the template's own files).
    UnlinkShared { img: ImgUuid, vol: VolUuid },
    /// `qemu-img commit -d -b base top`.
    Commit { img: ImgUuid, top: VolUuid, top_format: VolFormat, base: VolUuid },
    /// `qemu-img rebase -u`: rewrites only the backing reference in the header.
    Rebase { img: ImgUuid, vol: VolUuid, backing: Option<(VolUuid, VolFormat)> },
    /// Grows the data file to `capacity` (qcow2: `qemu-img resize`; raw: extend the file).
    Resize { img: ImgUuid, vol: VolUuid, format: VolFormat, allocation: Allocation, capacity: u64 },
    /// Shrinks a raw file back (the undo of a raw `Resize` before any data was written past it).
    TruncateRaw { img: ImgUuid, vol: VolUuid, size: u64 },
    /// Renames an image directory (`<img>` ↔ `_remove_me_<img>`).
    RenameImageDir { from: String, to: String },
    /// Removes every file of `images/_remove_me_<img>` and the directory.
    PurgeRemovedImage { img: ImgUuid },
    /// `qemu-img convert` of one volume (or a whole chain, `collapsed`) from another domain into
    /// this one. `progress` is the share of the operation's progress this step covers.
    CopyVolume {
        src_sd: SdUuid,
        src_img: ImgUuid,
        src_vol: VolUuid,
        src_format: VolFormat,
        img: ImgUuid,
        vol: VolUuid,
        spec: DataSpec,
        collapsed: bool,
        progress: (f64, f64),
    },
}

impl Step {
    fn describe(&self) -> String {
        match self {
            Step::MakeImageDir { img } => format!("create image directory {img}"),
            Step::RemoveImageDirIfEmpty { img } => format!("remove empty image directory {img}"),
            Step::CreateData { vol, spec, .. } => format!("create {} data of volume {vol}", spec.format),
            Step::RemoveData { vol, .. } => format!("remove data of volume {vol}"),
            Step::WriteMeta { vol, meta, .. } => {
                format!("write metadata of volume {vol} ({} {})", meta.role, meta.legality)
            }
            Step::RemoveMeta { vol, .. } => format!("remove metadata of volume {vol}"),
            Step::InitLease { vol, .. } => format!("initialize lease of volume {vol}"),
            Step::RemoveLease { vol, .. } => format!("remove lease of volume {vol}"),
            Step::LinkShared { from, to, vol } => format!("link template volume {vol} from image {from} into {to}"),
            Step::UnlinkShared { img, vol } => format!("unlink template volume {vol} from image {img}"),
            Step::Commit { top, base, .. } => format!("commit volume {top} into {base}"),
            Step::Rebase { vol, backing, .. } => format!("rebase volume {vol} onto {backing:?}"),
            Step::Resize { vol, capacity, .. } => format!("resize volume {vol} to {capacity} bytes"),
            Step::TruncateRaw { vol, size, .. } => format!("truncate volume {vol} to {size} bytes"),
            Step::RenameImageDir { from, to } => format!("rename image directory {from} to {to}"),
            Step::PurgeRemovedImage { img } => format!("purge removed image {img}"),
            Step::CopyVolume { src_sd, src_vol, vol, .. } => {
                format!("copy volume {src_vol} of domain {src_sd} to volume {vol}")
            }
        }
    }

    /// Performs the step on `dom` (the operation's home domain).
    fn apply(&self, dom: &FileStorageDomain, others: &[&FileStorageDomain], progress: &mut dyn FnMut(f64)) -> Result<()> {
        match self {
            Step::MakeImageDir { img } => {
                let dir = dom.image_dir(*img);
                match std::fs::create_dir(&dir) {
                    Ok(()) => fsio::fsync_dir(&dom.images_dir()).map_err(StorageError::io("sync", dom.images_dir())),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                    Err(e) => Err(StorageError::io("create", dir)(e)),
                }
            }
            Step::RemoveImageDirIfEmpty { img } => {
                let dir = dom.image_dir(*img);
                match std::fs::remove_dir(&dir) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(()),
                    Err(e) => Err(StorageError::io("remove", dir)(e)),
                }
            }
            Step::CreateData { img, vol, spec } => create_data(dom, *img, *vol, spec),
            Step::RemoveData { img, vol } => remove(&dom.volume_path(*img, *vol)),
            Step::WriteMeta { img, vol, meta } => dom.write_meta(*img, *vol, meta),
            Step::RemoveMeta { img, vol } => remove(&dom.meta_path(*img, *vol)),
            Step::InitLease { img, vol } => {
                let p = dom.lease_path(*img, *vol);
                // A half-written lease from an interrupted attempt is rewritten from scratch.
                fsio::remove_if_exists(&p).map_err(StorageError::io("remove", &p))?;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p)
                    .map_err(StorageError::io("create", &p))?;
                leases::init_resource(&p, leases::VOLUME_LEASE_OFFSET, dom.sd(), &vol.to_string())
            }
            Step::RemoveLease { img, vol } => remove(&dom.lease_path(*img, *vol)),
            Step::LinkShared { from, to, vol } => {
                for (src, dst) in [
                    (dom.volume_path(*from, *vol), dom.volume_path(*to, *vol)),
                    (dom.meta_path(*from, *vol), dom.meta_path(*to, *vol)),
                    (dom.lease_path(*from, *vol), dom.lease_path(*to, *vol)),
                ] {
                    fsio::force_link(&src, &dst).map_err(StorageError::io("hard-link", dst))?;
                }
                sync_dir(&dom.image_dir(*to))
            }
            Step::UnlinkShared { img, vol } => {
                remove(&dom.volume_path(*img, *vol))?;
                remove(&dom.meta_path(*img, *vol))?;
                remove(&dom.lease_path(*img, *vol))
            }
            Step::Commit { img, top, top_format, base } => {
                let top_path = dom.volume_path(*img, *top);
                let base_path = dom.volume_path(*img, *base);
                if !top_path.exists() {
                    // Rolled forward after finalize already removed the merged top.
                    return Ok(());
                }
                dom.qemu()
                    .commit(&top_path, top_format.image_format(), Some(&base_path), true, progress)
                    .map_err(|source| StorageError::Qemu {
                        subject: format!("commit of volume {top} into {base}"),
                        source,
                    })
            }
            Step::Rebase { img, vol, backing } => {
                let path = dom.volume_path(*img, *vol);
                let b = backing.map(|(v, f)| (v.to_string(), f.image_format()));
                dom.qemu()
                    .rebase(&path, oxvirt_qemu::ImageFormat::Qcow2, b.as_ref().map(|(s, f)| (s.as_str(), *f)), true)
                    .map_err(|source| StorageError::Qemu {
                        subject: format!("rebase of volume {vol}"),
                        source,
                    })
            }
            Step::Resize { img, vol, format, allocation, capacity } => {
                let path = dom.volume_path(*img, *vol);
                match format {
                    VolFormat::Cow => {
                        let cur = dom
                            .qemu()
                            .info(&path, Some(oxvirt_qemu::ImageFormat::Qcow2))
                            .map_err(|source| StorageError::Qemu {
                                subject: format!("volume {vol}"),
                                source,
                            })?;
                        if cur.virtual_size >= *capacity {
                            return Ok(());
                        }
                        dom.qemu()
                            .resize(&path, oxvirt_qemu::ImageFormat::Qcow2, *capacity)
                            .map_err(|source| StorageError::Qemu {
                                subject: format!("resize of volume {vol}"),
                                source,
                            })
                    }
                    VolFormat::Raw => {
                        let f = std::fs::OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(StorageError::io("open", &path))?;
                        let len = f.metadata().map_err(StorageError::io("stat", &path))?.len();
                        if len < *capacity {
                            if *allocation == Allocation::Preallocated {
                                fallocate(&f, len, capacity - len).map_err(StorageError::io("preallocate", &path))?;
                            } else {
                                f.set_len(*capacity).map_err(StorageError::io("extend", &path))?;
                            }
                        }
                        f.sync_all().map_err(StorageError::io("sync", &path))
                    }
                }
            }
            Step::TruncateRaw { img, vol, size } => {
                let path = dom.volume_path(*img, *vol);
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(StorageError::io("open", &path))?;
                f.set_len(*size).map_err(StorageError::io("truncate", &path))?;
                f.sync_all().map_err(StorageError::io("sync", &path))
            }
            Step::RenameImageDir { from, to } => {
                let (src, dst) = (dom.images_dir().join(from), dom.images_dir().join(to));
                if !src.exists() && dst.exists() {
                    return Ok(()); // already renamed
                }
                std::fs::rename(&src, &dst).map_err(StorageError::io("rename", &src))?;
                sync_dir(&dom.images_dir())
            }
            Step::PurgeRemovedImage { img } => {
                let dir = dom.images_dir().join(format!("{REMOVED_IMAGE_PREFIX}{img}"));
                purge_dir(&dir)?;
                sync_dir(&dom.images_dir())
            }
            Step::CopyVolume {
                src_sd,
                src_img,
                src_vol,
                src_format,
                img,
                vol,
                spec,
                collapsed,
                progress: (start, share),
            } => {
                let src = others
                    .iter()
                    .chain(std::iter::once(&dom))
                    .find(|d| d.sd() == *src_sd)
                    .ok_or(StorageError::DomainUnavailable(*src_sd))?;
                let src_path = src.volume_path(*src_img, *src_vol);
                let dst_path = dom.volume_path(*img, *vol);
                remove(&dst_path)?; // a partial copy from an interrupted attempt
                let backing = spec.backing.map(|(v, f)| (v.to_string(), f.image_format()));
                let prealloc = match (spec.allocation, spec.format) {
                    (Allocation::Preallocated, _) => Some(Preallocation::Falloc),
                    (Allocation::Sparse, _) => None,
                };
                let req = ConvertRequest {
                    src: &src_path,
                    src_format: Some(src_format.image_format()),
                    dst: &dst_path,
                    dst_format: spec.format.image_format(),
                    qcow2_compat: (spec.format == VolFormat::Cow).then_some(QCOW2_COMPAT),
                    backing: backing.as_ref().map(|(s, f)| (s.as_str(), *f)),
                    preallocation: prealloc,
                };
                let _ = collapsed; // the source path is the leaf: convert reads its whole chain
                dom.qemu()
                    .convert(&req, &mut |p| progress(start + share * p / 100.0))
                    .map_err(|source| StorageError::Qemu {
                        subject: format!("copy of volume {src_vol}"),
                        source,
                    })?;
                set_mode(&dst_path)?;
                if spec.format == VolFormat::Raw {
                    // qemu-img may round a raw file; the volume's size is its capacity.
                    let len = std::fs::metadata(&dst_path).map_err(StorageError::io("stat", &dst_path))?.len();
                    if len < spec.capacity {
                        let f = std::fs::OpenOptions::new()
                            .write(true)
                            .open(&dst_path)
                            .map_err(StorageError::io("open", &dst_path))?;
                        f.set_len(spec.capacity).map_err(StorageError::io("extend", &dst_path))?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// qcow2 compatibility level of new volumes (VDSM: "1.1" on domains of version ≥ 4).
pub const QCOW2_COMPAT: &str = "1.1";

fn create_data(dom: &FileStorageDomain, img: ImgUuid, vol: VolUuid, spec: &DataSpec) -> Result<()> {
    let path = dom.volume_path(img, vol);
    remove(&path)?; // a partial file from an interrupted attempt of this same step
    let backing = spec.backing.map(|(v, f)| (v.to_string(), f.image_format()));
    let prealloc = match spec.allocation {
        Allocation::Preallocated => Some(Preallocation::Falloc),
        Allocation::Sparse => None,
    };
    dom.qemu()
        .create(&CreateRequest {
            path: &path,
            format: spec.format.image_format(),
            size: Some(spec.capacity),
            qcow2_compat: (spec.format == VolFormat::Cow).then_some(QCOW2_COMPAT),
            backing: backing.as_ref().map(|(s, f)| (s.as_str(), *f)),
            preallocation: prealloc,
            // The parent is in the same directory and its size is known: VDSM does not open it.
            unsafe_backing: spec.backing.is_some(),
        })
        .map_err(|source| StorageError::Qemu {
            subject: format!("creation of volume {vol}"),
            source,
        })?;
    set_mode(&path)
}

fn set_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(StorageError::io("chmod", path))
}

fn fallocate(f: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), offset as libc::off_t, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(r))
    }
}

fn remove(path: &Path) -> Result<()> {
    fsio::remove_if_exists(path).map(drop).map_err(StorageError::io("remove", path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    fsio::fsync_dir(dir).map_err(StorageError::io("sync", dir))
}

fn purge_dir(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StorageError::io("list", dir)(e)),
    };
    for e in entries {
        let e = e.map_err(StorageError::io("list", dir))?;
        remove(&e.path())?;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io("remove", dir)(e)),
    }
}

/// A step and, for steps before the commit point, its undo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub step: Step,
    pub undo: Option<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpState {
    /// Steps before `commit_at` may have run; recovery undoes them.
    Pending,
    /// The commit point was passed; recovery redoes the steps from `commit_at`.
    Committed,
}

/// A planned multi-step verb, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub id: Uuid,
    pub verb: String,
    pub sd: SdUuid,
    pub steps: Vec<PlannedStep>,
    pub commit_at: usize,
    pub state: OpState,
}

impl Operation {
    pub fn new(verb: &str, sd: SdUuid) -> Self {
        Self {
            id: Uuid::new_v4(),
            verb: verb.to_string(),
            sd,
            steps: Vec::new(),
            commit_at: 0,
            state: OpState::Pending,
        }
    }

    /// Adds an undoable step (must come before any [`Operation::forward`] step).
    pub fn undoable(&mut self, step: Step, undo: Step) -> &mut Self {
        debug_assert_eq!(self.commit_at, self.steps.len(), "undoable steps precede the commit point");
        self.steps.push(PlannedStep { step, undo: Some(undo) });
        self.commit_at = self.steps.len();
        self
    }

    /// Adds a step after the commit point: rolled forward, never undone.
    pub fn forward(&mut self, step: Step) -> &mut Self {
        self.steps.push(PlannedStep { step, undo: None });
        self
    }
}

/// Where and how to stop an operation in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failpoint {
    /// Only this verb (any verb if `None`).
    pub verb: Option<String>,
    /// Stop before this step; `steps.len()` stops after the last step, before the journal is
    /// removed.
    pub step: usize,
    pub mode: FailMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Fail like a step error: the runner rolls back as it would for a real failure.
    Error,
    /// Stop dead, as if the process died: nothing is rolled back, the journal stays.
    Crash,
    /// `std::process::abort()`.
    Abort,
}

impl Failpoint {
    pub const ENV: &'static str = "OXVIRT_STORAGE_FAILPOINT";

    /// `<verb|*>:<step>:<error|crash|abort>`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split(':');
        let verb = it.next()?;
        let step = it.next()?.parse().ok()?;
        let mode = match it.next()? {
            "error" => FailMode::Error,
            "crash" => FailMode::Crash,
            "abort" => FailMode::Abort,
            _ => return None,
        };
        Some(Self {
            verb: (verb != "*").then(|| verb.to_string()),
            step,
            mode,
        })
    }

    fn hits(&self, verb: &str, step: usize) -> bool {
        self.step == step && self.verb.as_deref().is_none_or(|v| v == verb)
    }
}

/// The journal directory of a domain.
pub fn journal_dir(root: &Path) -> PathBuf {
    root.join("oxvirt").join("journal")
}

fn journal_path(root: &Path, id: Uuid) -> PathBuf {
    journal_dir(root).join(format!("{id}.json"))
}

fn persist(root: &Path, op: &Operation) -> Result<()> {
    let path = journal_path(root, op.id);
    let data = serde_json::to_vec_pretty(op).expect("operations serialize");
    fsio::atomic_write(&path, &data, 0o660).map_err(StorageError::io("write journal entry", path))
}

fn forget(root: &Path, id: Uuid) -> Result<()> {
    let path = journal_path(root, id);
    fsio::remove_if_exists(&path).map_err(StorageError::io("remove journal entry", &path))?;
    sync_dir(&journal_dir(root))
}

/// Pending journal entries of a domain.
pub fn pending(root: &Path) -> Result<Vec<Operation>> {
    let dir = journal_dir(root);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StorageError::io("list", dir)(e)),
    };
    for e in entries {
        let path = e.map_err(StorageError::io("list", &dir))?.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let data = std::fs::read(&path).map_err(StorageError::io("read", &path))?;
        let op: Operation = serde_json::from_slice(&data).map_err(|source| StorageError::Journal { path, source })?;
        out.push(op);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Runs `op` on its home domain `dom`, journaling it (see the module docs).
pub fn run(
    dom: &FileStorageDomain,
    others: &[&FileStorageDomain],
    mut op: Operation,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    let root = dom.root();
    let failpoint = dom.failpoint();
    let n = op.steps.len();
    tracing::info!(op = %op.id, verb = %op.verb, sd = %op.sd, steps = n, "operation started");
    if op.commit_at == 0 {
        op.state = OpState::Committed;
    }
    persist(root, &op)?;
    for i in 0..=n {
        if let Some(fp) = failpoint.as_ref().filter(|fp| fp.hits(&op.verb, i)) {
            tracing::warn!(op = %op.id, verb = %op.verb, step = i, mode = ?fp.mode, "failpoint");
            let injected = StorageError::Injected {
                verb: op.verb.clone(),
                step: i,
            };
            match fp.mode {
                FailMode::Abort => std::process::abort(),
                FailMode::Crash => return Err(injected),
                FailMode::Error => return Err(fail(dom, others, &op, i, injected)),
            }
        }
        if i == n {
            break;
        }
        if i == op.commit_at && op.state == OpState::Pending {
            op.state = OpState::Committed;
            persist(root, &op)?;
        }
        let planned = &op.steps[i];
        tracing::debug!(op = %op.id, step = i, what = %planned.step.describe(), "step");
        if let Err(e) = planned.step.apply(dom, others, progress) {
            return Err(fail(dom, others, &op, i, e));
        }
    }
    forget(root, op.id)?;
    tracing::info!(op = %op.id, verb = %op.verb, "operation done");
    Ok(())
}

/// Handles a failure at step `i`: before the commit point, undo steps `i..=0` and drop the
/// journal entry; after it, keep the entry for recovery.
fn fail(dom: &FileStorageDomain, others: &[&FileStorageDomain], op: &Operation, i: usize, e: StorageError) -> StorageError {
    let err = StorageError::Step {
        op: op.id,
        verb: op.verb.clone(),
        step: i,
        desc: op.steps.get(i).map_or_else(|| "completion".into(), |s| s.step.describe()),
        source: Box::new(e),
    };
    if op.state == OpState::Committed {
        tracing::error!(op = %op.id, verb = %op.verb, step = i, error = %err, "operation failed after its commit point; recovery will finish it");
        return err;
    }
    match undo(dom, others, op, i.min(op.commit_at.saturating_sub(1))) {
        Ok(()) => {
            let _ = forget(dom.root(), op.id);
            tracing::warn!(op = %op.id, verb = %op.verb, step = i, error = %err, "operation failed and was rolled back");
            err
        }
        Err(undo_err) => {
            tracing::error!(op = %op.id, error = %undo_err, "rollback failed");
            StorageError::RollbackFailed {
                op: op.id,
                verb: op.verb.clone(),
                source: Box::new(err),
            }
        }
    }
}

/// Undoes steps `last..=0` in reverse.
fn undo(dom: &FileStorageDomain, others: &[&FileStorageDomain], op: &Operation, last: usize) -> Result<()> {
    if op.commit_at == 0 {
        return Ok(());
    }
    for planned in op.steps[..=last].iter().rev() {
        if let Some(u) = &planned.undo {
            // The journal does not record how far an operation got, so undo runs for steps that
            // may never have run: restoring metadata only makes sense where metadata exists
            // (a volume's `.meta` exists from its creation on, so this skips only new volumes
            // whose metadata was never written).
            if let Step::WriteMeta { img, vol, .. } = u {
                if !dom.meta_path(*img, *vol).exists() {
                    continue;
                }
            }
            u.apply(dom, others, &mut |_| {})?;
        }
    }
    Ok(())
}

/// What recovery did with one journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recovered {
    pub op: Uuid,
    pub verb: String,
    pub rolled_forward: bool,
}

/// Finishes or undoes one journaled operation.
pub fn recover_one(dom: &FileStorageDomain, others: &[&FileStorageDomain], op: &Operation) -> Result<Recovered> {
    let rolled_forward = op.state == OpState::Committed;
    tracing::info!(op = %op.id, verb = %op.verb, forward = rolled_forward, "recovering operation");
    if rolled_forward {
        repair_interrupted_writers(dom, op)?;
        for planned in &op.steps[op.commit_at..] {
            planned.step.apply(dom, others, &mut |_| {})?;
        }
    } else if !op.steps.is_empty() {
        undo(dom, others, op, op.commit_at.saturating_sub(1).min(op.steps.len() - 1))?;
    }
    forget(dom.root(), op.id)?;
    Ok(Recovered {
        op: op.id,
        verb: op.verb.clone(),
        rolled_forward,
    })
}

/// A qcow2 image whose writer (`qemu-img commit`, `resize`, `rebase`) was killed may hold
/// leaked clusters; free them before redoing the steps.
fn repair_interrupted_writers(dom: &FileStorageDomain, op: &Operation) -> Result<()> {
    for planned in &op.steps[op.commit_at..] {
        let (img, vol) = match &planned.step {
            Step::Commit { img, base, .. } => (*img, *base),
            Step::Rebase { img, vol, .. } => (*img, *vol),
            Step::Resize {
                img,
                vol,
                format: VolFormat::Cow,
                ..
            } => (*img, *vol),
            _ => continue,
        };
        let path = dom.volume_path(img, vol);
        if !path.exists() || !matches!(dom.read_meta(img, vol), Ok(m) if m.format == VolFormat::Cow) {
            continue;
        }
        let report = dom
            .qemu()
            .repair_leaks(&path, oxvirt_qemu::ImageFormat::Qcow2)
            .map_err(|source| StorageError::Qemu {
                subject: format!("leak repair of volume {vol}"),
                source,
            })?;
        if report.leaks_fixed > 0 {
            tracing::warn!(%vol, leaks = report.leaks_fixed, "freed clusters leaked by an interrupted writer");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failpoint_parsing() {
        assert_eq!(
            Failpoint::parse("snapshot:3:crash"),
            Some(Failpoint {
                verb: Some("snapshot".into()),
                step: 3,
                mode: FailMode::Crash
            })
        );
        let any = Failpoint::parse("*:0:abort").unwrap();
        assert!(any.hits("whatever", 0) && !any.hits("whatever", 1));
        assert!(Failpoint::parse("x:y:crash").is_none());
        assert!(Failpoint::parse("x:1:explode").is_none());
    }

    #[test]
    fn operations_round_trip_through_json() {
        let (img, vol) = (ImgUuid::new_random(), VolUuid::new_random());
        let mut op = Operation::new("create_volume", SdUuid::new_random());
        op.undoable(Step::MakeImageDir { img }, Step::RemoveImageDirIfEmpty { img })
            .forward(Step::RemoveData { img, vol });
        assert_eq!(op.commit_at, 1);
        let json = serde_json::to_string(&op).unwrap();
        assert!(json.contains("\"step\":\"make_image_dir\""));
        assert_eq!(serde_json::from_str::<Operation>(&json).unwrap(), op);
    }
}
