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
    /// An older volume of the same chain whose content the new volume shows instead of its
    /// parent's: it is created over this one, then safely rebased onto `backing`, so that it
    /// holds exactly the clusters that differ (a snapshot preview's leaf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_of: Option<(VolUuid, VolFormat)>,
    /// The file's length after creation (a capped thin volume's allocation; see
    /// [`crate::VolumeSpec::initial_size`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_size: Option<u64>,
}

/// One idempotent action on storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Creates the image directory; `sync` also makes its entry in `images/` durable.
    MakeImageDir {
        img: ImgUuid,
        #[serde(default = "yes")]
        sync: bool,
    },
    RemoveImageDirIfEmpty {
        img: ImgUuid,
    },
    CreateData {
        img: ImgUuid,
        vol: VolUuid,
        spec: DataSpec,
    },
    RemoveData {
        img: ImgUuid,
        vol: VolUuid,
    },
    WriteMeta {
        img: ImgUuid,
        vol: VolUuid,
        meta: VolumeMetadata,
    },
    RemoveMeta {
        img: ImgUuid,
        vol: VolUuid,
    },
    /// Writes volumes' next metadata as `<vol>.meta.new`, then fsyncs them all: the first half
    /// of atomic replacements, done early so that only the renames remain.
    StageMetas {
        img: ImgUuid,
        metas: Vec<(VolUuid, VolumeMetadata)>,
    },
    /// Removes staged `<vol>.meta.new` files.
    UnstageMetas {
        img: ImgUuid,
        vols: Vec<VolUuid>,
    },
    /// Renames each staged `<vol>.meta.new` over `<vol>.meta` in order, then fsyncs the
    /// directory once. Idempotent: a volume whose staged file is gone was renamed already.
    CommitMetas {
        img: ImgUuid,
        vols: Vec<VolUuid>,
    },
    /// Several steps in order (an undo that restores more than one file).
    All {
        steps: Vec<Step>,
    },
    InitLease {
        img: ImgUuid,
        vol: VolUuid,
    },
    RemoveLease {
        img: ImgUuid,
        vol: VolUuid,
    },
    /// Hard-links a template volume's data, `.meta` and `.lease` into another image directory.
    LinkShared {
        from: ImgUuid,
        to: ImgUuid,
        vol: VolUuid,
    },
    /// Removes the links made by `LinkShared` (never the template's own files).
    UnlinkShared {
        img: ImgUuid,
        vol: VolUuid,
    },
    /// `qemu-img commit -d -b base top`.
    Commit {
        img: ImgUuid,
        top: VolUuid,
        top_format: VolFormat,
        base: VolUuid,
    },
    /// `qemu-img rebase -u`: rewrites only the backing reference in the header.
    Rebase {
        img: ImgUuid,
        vol: VolUuid,
        backing: Option<(VolUuid, VolFormat)>,
    },
    /// Grows the data file to `capacity` (qcow2: `qemu-img resize`; raw: extend the file).
    Resize {
        img: ImgUuid,
        vol: VolUuid,
        format: VolFormat,
        allocation: Allocation,
        capacity: u64,
    },
    /// Shrinks a raw file back (the undo of a raw `Resize` before any data was written past it).
    TruncateRaw {
        img: ImgUuid,
        vol: VolUuid,
        size: u64,
    },
    /// Renames an image directory (`<img>` ↔ `_remove_me_<img>`).
    RenameImageDir {
        from: String,
        to: String,
    },
    /// Removes every file of `images/_remove_me_<img>` and the directory.
    PurgeRemovedImage {
        img: ImgUuid,
    },
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
            Step::MakeImageDir { img, .. } => format!("create image directory {img}"),
            Step::StageMetas { metas, .. } => {
                format!(
                    "stage metadata of volumes {:?}",
                    metas.iter().map(|(v, _)| v).collect::<Vec<_>>()
                )
            }
            Step::UnstageMetas { vols, .. } => format!("remove staged metadata of volumes {vols:?}"),
            Step::CommitMetas { vols, .. } => format!("commit metadata of volumes {vols:?}"),
            Step::All { steps } => steps.iter().map(Step::describe).collect::<Vec<_>>().join("; "),
            Step::RemoveImageDirIfEmpty { img } => format!("remove empty image directory {img}"),
            Step::CreateData { vol, spec, .. } => format!("create {} data of volume {vol}", spec.format),
            Step::RemoveData { vol, .. } => format!("remove data of volume {vol}"),
            Step::WriteMeta { vol, meta, .. } => {
                format!("write metadata of volume {vol} ({} {})", meta.role, meta.legality)
            }
            Step::RemoveMeta { vol, .. } => format!("remove metadata of volume {vol}"),
            Step::InitLease { vol, .. } => format!("initialize lease of volume {vol}"),
            Step::RemoveLease { vol, .. } => format!("remove lease of volume {vol}"),
            Step::LinkShared { from, to, vol } => {
                format!("link template volume {vol} from image {from} into {to}")
            }
            Step::UnlinkShared { img, vol } => format!("unlink template volume {vol} from image {img}"),
            Step::Commit { top, base, .. } => format!("commit volume {top} into {base}"),
            Step::Rebase { vol, backing, .. } => format!("rebase volume {vol} onto {backing:?}"),
            Step::Resize { vol, capacity, .. } => format!("resize volume {vol} to {capacity} bytes"),
            Step::TruncateRaw { vol, size, .. } => format!("truncate volume {vol} to {size} bytes"),
            Step::RenameImageDir { from, to } => format!("rename image directory {from} to {to}"),
            Step::PurgeRemovedImage { img } => format!("purge removed image {img}"),
            Step::CopyVolume {
                src_sd, src_vol, vol, ..
            } => {
                format!("copy volume {src_vol} of domain {src_sd} to volume {vol}")
            }
        }
    }

    /// Performs the step on `dom` (the operation's home domain).
    fn apply(
        &self,
        dom: &FileStorageDomain,
        others: &[&FileStorageDomain],
        progress: &mut dyn FnMut(f64),
    ) -> Result<()> {
        match self {
            Step::MakeImageDir { img, sync } => {
                let dir = dom.image_dir(*img);
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(StorageError::io("create", dir)(e)),
                }
                if *sync {
                    sync_dir(&dom.images_dir())?;
                }
                Ok(())
            }
            Step::StageMetas { img, metas } => {
                let mut files = Vec::with_capacity(metas.len());
                for (vol, meta) in metas {
                    let data = meta.encode().map_err(|source| StorageError::VolumeMetadata {
                        img: *img,
                        vol: *vol,
                        source,
                    })?;
                    let tmp = fsio::temp_path(&dom.meta_path(*img, *vol));
                    let f =
                        fsio::write_unsynced(&tmp, &data, 0o660).map_err(StorageError::io("write", &tmp))?;
                    files.push((f, tmp));
                }
                // One journal commit usually covers them all: sync after every write is done.
                for (f, tmp) in files {
                    f.sync_all().map_err(StorageError::io("sync", tmp))?;
                }
                Ok(())
            }
            Step::UnstageMetas { img, vols } => {
                for vol in vols {
                    remove(&fsio::temp_path(&dom.meta_path(*img, *vol)))?;
                }
                Ok(())
            }
            Step::CommitMetas { img, vols } => {
                for vol in vols {
                    let path = dom.meta_path(*img, *vol);
                    let tmp = fsio::temp_path(&path);
                    match std::fs::rename(&tmp, &path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.exists() => {}
                        Err(e) => return Err(StorageError::io("rename", tmp)(e)),
                    }
                }
                sync_dir(&dom.image_dir(*img))
            }
            Step::All { steps } => {
                for step in steps {
                    step.apply(dom, others, progress)?;
                }
                Ok(())
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
            Step::Commit {
                img,
                top,
                top_format,
                base,
            } => {
                let top_path = dom.volume_path(*img, *top);
                let base_path = dom.volume_path(*img, *base);
                if !top_path.exists() {
                    // Rolled forward after finalize already removed the merged top.
                    return Ok(());
                }
                dom.qemu()
                    .commit(
                        &top_path,
                        top_format.image_format(),
                        Some(&base_path),
                        true,
                        progress,
                    )
                    .map_err(|source| StorageError::Qemu {
                        subject: format!("commit of volume {top} into {base}"),
                        source,
                    })
            }
            Step::Rebase { img, vol, backing } => {
                let path = dom.volume_path(*img, *vol);
                let b = backing.map(|(v, f)| (v.to_string(), f.image_format()));
                dom.qemu()
                    .rebase(
                        &path,
                        oxvirt_qemu::ImageFormat::Qcow2,
                        b.as_ref().map(|(s, f)| (s.as_str(), *f)),
                        true,
                    )
                    .map_err(|source| StorageError::Qemu {
                        subject: format!("rebase of volume {vol}"),
                        source,
                    })
            }
            Step::Resize {
                img,
                vol,
                format,
                allocation,
                capacity,
            } => {
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
                                fallocate(&f, len, capacity - len)
                                    .map_err(StorageError::io("preallocate", &path))?;
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
                let backing = spec
                    .content_of
                    .or(spec.backing)
                    .map(|(v, f)| (v.to_string(), f.image_format()));
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
                    let len = std::fs::metadata(&dst_path)
                        .map_err(StorageError::io("stat", &dst_path))?
                        .len();
                    if len < spec.capacity {
                        let f = std::fs::OpenOptions::new()
                            .write(true)
                            .open(&dst_path)
                            .map_err(StorageError::io("open", &dst_path))?;
                        f.set_len(spec.capacity)
                            .map_err(StorageError::io("extend", &dst_path))?;
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
    let backing = spec
        .content_of
        .or(spec.backing)
        .map(|(v, f)| (v.to_string(), f.image_format()));
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
    if let (Some(_), Some((parent, fmt))) = (spec.content_of, spec.backing) {
        // Safe rebase: qemu-img copies into the new volume every cluster where the parent's
        // chain differs from the older volume's, so its content stays the older volume's.
        let parent = parent.to_string();
        dom.qemu()
            .rebase(
                &path,
                spec.format.image_format(),
                Some((parent.as_str(), fmt.image_format())),
                false,
            )
            .map_err(|source| StorageError::Qemu {
                subject: format!("rebase of volume {vol} onto {parent}"),
                source,
            })?;
    }
    if let Some(n) = spec.initial_size {
        // Only ever longer: qemu-img's metadata must stay inside the file. The extra length is
        // a hole; the file system allocates it as the guest writes.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(StorageError::io("open", &path))?;
        let len = f.metadata().map_err(StorageError::io("stat", &path))?.len();
        if len < n {
            f.set_len(n).map_err(StorageError::io("truncate", &path))?;
        }
    }
    set_mode(&path)
}

fn set_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(StorageError::io("chmod", path))
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
    fsio::remove_if_exists(path)
        .map(drop)
        .map_err(StorageError::io("remove", path))
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
    /// The side lane: steps that only create new files (harmless orphans if the operation is
    /// never journaled, collected by recovery), run in a second thread from the start, even
    /// before the journal entry is durable. All undoable.
    #[serde(default)]
    pub side: Vec<PlannedStep>,
    /// The main lane.
    pub steps: Vec<PlannedStep>,
    /// The side lane is complete before main step `join_at` runs.
    #[serde(default)]
    pub join_at: usize,
    pub commit_at: usize,
    pub state: OpState,
    /// The operation is complete iff this volume's `.meta` exists: its last step is the only
    /// one creating that file. Lets the runner drop the journal entry without a sync, and
    /// recovery tell a finished operation from an interrupted one.
    #[serde(default)]
    pub completed_if: Option<(ImgUuid, VolUuid)>,
    /// Recovery completes this operation by redoing every step (all idempotent) rather than
    /// undoing it, so the journal entry need not be rewritten at the commit point.
    #[serde(default)]
    pub roll_forward: bool,
}

impl Operation {
    pub fn new(verb: &str, sd: SdUuid) -> Self {
        Self {
            id: Uuid::new_v4(),
            verb: verb.to_string(),
            sd,
            side: Vec::new(),
            steps: Vec::new(),
            join_at: 0,
            commit_at: 0,
            state: OpState::Pending,
            completed_if: None,
            roll_forward: false,
        }
    }

    /// Adds a side-lane step (see [`Operation::side`]).
    pub fn side(&mut self, step: Step, undo: Step) -> &mut Self {
        self.side.push(PlannedStep {
            step,
            undo: Some(undo),
        });
        self
    }

    /// Main steps added from now on wait for the side lane.
    pub fn join(&mut self) -> &mut Self {
        self.join_at = self.steps.len();
        self
    }

    /// See [`Operation::roll_forward`].
    pub fn roll_forward(&mut self) -> &mut Self {
        self.roll_forward = true;
        self
    }

    pub fn completed_if(&mut self, img: ImgUuid, vol: VolUuid) -> &mut Self {
        self.completed_if = Some((img, vol));
        self
    }

    fn is_complete(&self, dom: &FileStorageDomain) -> bool {
        self.completed_if
            .is_some_and(|(img, vol)| dom.meta_path(img, vol).exists())
    }

    /// Adds an undoable step (must come before any [`Operation::forward`] step).
    pub fn undoable(&mut self, step: Step, undo: Step) -> &mut Self {
        debug_assert_eq!(
            self.commit_at,
            self.steps.len(),
            "undoable steps precede the commit point"
        );
        self.steps.push(PlannedStep {
            step,
            undo: Some(undo),
        });
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

/// Removes a journal entry; `durable` waits for the removal to reach storage (not needed when
/// recovery can tell the operation completed, see [`Operation::completed_if`]).
fn forget(root: &Path, id: Uuid, durable: bool) -> Result<()> {
    let path = journal_path(root, id);
    fsio::remove_if_exists(&path).map_err(StorageError::io("remove journal entry", &path))?;
    if durable {
        sync_dir(&journal_dir(root))?;
    }
    Ok(())
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
        let op: Operation =
            serde_json::from_slice(&data).map_err(|source| StorageError::Journal { path, source })?;
        out.push(op);
    }
    out.sort_by_key(|op| op.id);
    Ok(out)
}

fn yes() -> bool {
    true
}

/// Why a lane stopped.
enum Stop {
    /// A simulated crash: leave everything as it is.
    Crash(StorageError),
    /// A failure at global step index `at`.
    Fail { at: usize, err: StorageError },
}

/// Checks the failpoint before global step `index`.
fn failpoint_stop(fp: Option<&Failpoint>, op_id: Uuid, verb: &str, index: usize) -> Result<(), Stop> {
    let Some(fp) = fp.filter(|fp| fp.hits(verb, index)) else {
        return Ok(());
    };
    tracing::warn!(op = %op_id, verb, step = index, mode = ?fp.mode, "failpoint");
    let injected = StorageError::Injected {
        verb: verb.to_string(),
        step: index,
    };
    match fp.mode {
        FailMode::Abort => std::process::abort(),
        FailMode::Crash => Err(Stop::Crash(injected)),
        FailMode::Error => Err(Stop::Fail {
            at: index,
            err: injected,
        }),
    }
}

/// Runs `op` on its home domain `dom`, journaling it (see the module docs). Steps are
/// numbered side lane first, then main lane; failpoints use that numbering, and
/// `side.len() + steps.len()` means "after the last step".
pub fn run(
    dom: &FileStorageDomain,
    others: &[&FileStorageDomain],
    mut op: Operation,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    // Steps report their shares of 0..100 computed apart; rounding could step back by an ulp at a
    // boundary, and callers are promised a monotonic figure.
    let mut last = 0.0_f64;
    let progress = &mut |p: f64| {
        last = p.clamp(0.0, 100.0).max(last);
        progress(last)
    };
    let failpoint = dom.failpoint();
    let (s, n) = (op.side.len(), op.steps.len());
    tracing::info!(op = %op.id, verb = %op.verb, sd = %op.sd, steps = s + n, "operation started");
    if op.commit_at == 0 && op.side.is_empty() {
        op.state = OpState::Committed;
    }
    let side_steps = op.side.clone();
    let (id, verb) = (op.id, op.verb.clone());
    let outcome = std::thread::scope(|scope| {
        // Leading directory creations run first (they are what the other side steps need);
        // every other side step then runs in its own thread: they touch disjoint files.
        let lead = side_steps
            .iter()
            .take_while(|p| matches!(p.step, Step::MakeImageDir { .. }))
            .count();
        let mut early: Result<(), Stop> = Ok(());
        for (i, planned) in side_steps[..lead].iter().enumerate() {
            early = early.and_then(|()| {
                failpoint_stop(failpoint.as_ref(), id, &verb, i)?;
                planned
                    .step
                    .apply(dom, &[], &mut |_| {})
                    .map_err(|err| Stop::Fail { at: i, err })
            });
        }
        let handles: Vec<_> = if early.is_ok() {
            side_steps[lead..]
                .iter()
                .enumerate()
                .map(|(k, planned)| {
                    let (i, fp, verb) = (lead + k, failpoint.as_ref(), verb.as_str());
                    scope.spawn(move || -> Result<(), Stop> {
                        failpoint_stop(fp, id, verb, i)?;
                        planned
                            .step
                            .apply(dom, &[], &mut |_| {})
                            .map_err(|err| Stop::Fail { at: i, err })
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut side = Some((early, handles));
        let mut join = || -> Result<(), Stop> {
            let Some((early, handles)) = side.take() else {
                return Ok(());
            };
            // Join every thread before reporting the first failure.
            let results: Vec<Result<(), Stop>> = handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect();
            early?;
            results.into_iter().collect()
        };
        let main = (|| -> Result<(), Stop> {
            persist(dom.root(), &op).map_err(|err| Stop::Fail { at: s, err })?;
            for i in 0..=n {
                if i == op.join_at.min(n) {
                    join()?;
                }
                failpoint_stop(failpoint.as_ref(), id, &verb, s + i)?;
                if i == n {
                    break;
                }
                if i == op.commit_at && op.state == OpState::Pending {
                    op.state = OpState::Committed;
                    if !op.roll_forward {
                        persist(dom.root(), &op).map_err(|err| Stop::Fail { at: s + i, err })?;
                    }
                }
                let planned = &op.steps[i];
                tracing::debug!(op = %op.id, step = s + i, what = %planned.step.describe(), "step");
                planned
                    .step
                    .apply(dom, others, progress)
                    .map_err(|err| Stop::Fail { at: s + i, err })?;
            }
            Ok(())
        })();
        let joined = join();
        main.and(joined)
    });
    match outcome {
        Ok(()) => {
            forget(dom.root(), op.id, op.completed_if.is_none())?;
            tracing::info!(op = %op.id, verb = %op.verb, "operation done");
            Ok(())
        }
        Err(Stop::Crash(e)) => Err(e),
        Err(Stop::Fail { at, err }) => Err(fail(dom, others, &op, at, err)),
    }
}

fn step_at(op: &Operation, at: usize) -> Option<&PlannedStep> {
    if at < op.side.len() {
        op.side.get(at)
    } else {
        op.steps.get(at - op.side.len())
    }
}

/// Handles a failure at global step `at`: before the commit point, undo and drop the journal
/// entry; after it, keep the entry for recovery.
fn fail(
    dom: &FileStorageDomain,
    others: &[&FileStorageDomain],
    op: &Operation,
    at: usize,
    e: StorageError,
) -> StorageError {
    let err = StorageError::Step {
        op: op.id,
        verb: op.verb.clone(),
        step: at,
        desc: step_at(op, at).map_or_else(|| "completion".into(), |s| s.step.describe()),
        source: Box::new(e),
    };
    if op.state == OpState::Committed {
        tracing::error!(op = %op.id, verb = %op.verb, step = at, error = %err, "operation failed after its commit point; recovery will finish it");
        return err;
    }
    match undo(dom, others, op) {
        Ok(()) => {
            let _ = forget(dom.root(), op.id, true);
            tracing::warn!(op = %op.id, verb = %op.verb, step = at, error = %err, "operation failed and was rolled back");
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

/// Undoes every undoable step, main lane then side lane, in reverse. The journal does not
/// record how far an operation got, so undo runs for steps that may never have run; every undo
/// tolerates that.
fn undo(dom: &FileStorageDomain, others: &[&FileStorageDomain], op: &Operation) -> Result<()> {
    let main = &op.steps[..op.commit_at.min(op.steps.len())];
    for planned in main.iter().rev().chain(op.side.iter().rev()) {
        if let Some(u) = &planned.undo {
            apply_undo(dom, others, u)?;
        }
    }
    Ok(())
}

fn apply_undo(dom: &FileStorageDomain, others: &[&FileStorageDomain], u: &Step) -> Result<()> {
    match u {
        Step::All { steps } => steps.iter().try_for_each(|s| apply_undo(dom, others, s)),
        // Restoring metadata only makes sense where metadata exists (a volume's `.meta` exists
        // from its creation on, so this skips only new volumes never written).
        Step::WriteMeta { img, vol, .. } if !dom.meta_path(*img, *vol).exists() => Ok(()),
        _ => u.apply(dom, others, &mut |_| {}),
    }
}

/// What recovery did with one journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recovered {
    pub op: Uuid,
    pub verb: String,
    pub rolled_forward: bool,
}

/// Finishes or undoes one journaled operation.
pub fn recover_one(
    dom: &FileStorageDomain,
    others: &[&FileStorageDomain],
    op: &Operation,
) -> Result<Recovered> {
    let rolled_forward = op.state == OpState::Committed || op.roll_forward || op.is_complete(dom);
    tracing::info!(op = %op.id, verb = %op.verb, forward = rolled_forward, "recovering operation");
    if op.roll_forward {
        repair_interrupted_writers(dom, op)?;
        for planned in op.side.iter().chain(&op.steps) {
            planned.step.apply(dom, others, &mut |_| {})?;
        }
    } else if op.state == OpState::Committed {
        repair_interrupted_writers(dom, op)?;
        for planned in &op.steps[op.commit_at..] {
            planned.step.apply(dom, others, &mut |_| {})?;
        }
    } else if op.is_complete(dom) {
        // The publishing steps after the join are idempotent: finish any that did not land.
        for planned in &op.steps[op.join_at.min(op.steps.len())..] {
            planned.step.apply(dom, others, &mut |_| {})?;
        }
    } else {
        undo(dom, others, op)?;
    }
    forget(dom.root(), op.id, true)?;
    Ok(Recovered {
        op: op.id,
        verb: op.verb.clone(),
        rolled_forward,
    })
}

/// A qcow2 image whose writer (`qemu-img commit`, `resize`, `rebase`) was killed may hold
/// leaked clusters; free them before redoing the steps.
fn repair_interrupted_writers(dom: &FileStorageDomain, op: &Operation) -> Result<()> {
    for planned in &op.steps {
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
        op.undoable(
            Step::MakeImageDir { img, sync: true },
            Step::RemoveImageDirIfEmpty { img },
        )
        .forward(Step::RemoveData { img, vol });
        assert_eq!(op.commit_at, 1);
        let json = serde_json::to_string(&op).unwrap();
        assert!(json.contains("\"step\":\"make_image_dir\""));
        assert_eq!(serde_json::from_str::<Operation>(&json).unwrap(), op);
    }
}
