//! Image and volume verbs on a file domain: create, snapshot, template and clone, delete, cold
//! merge, resize, measure, legality, copy and move.
//!
//! Every verb validates its input and the chain *before* touching storage (bad input changes
//! nothing), then runs as one journaled [`Operation`] whose steps keep LEGALITY right: a new
//! volume is written ILLEGAL and turned LEGAL by its last step; a merge base is ILLEGAL from
//! prepare until finalize; a volume being deleted is ILLEGAL before its files go.
//!
//! Invariant: the metadata of a SHARED (template) volume is never rewritten while the template
//! has clones, since rewriting by rename would split its hard links.

use std::path::PathBuf;

use oxvirt_qemu::img::{Measure, MeasureRequest};
use oxvirt_types::{ImgUuid, VolUuid};
use serde::{Deserialize, Serialize};

use crate::chain::Chain;
use crate::domain::FileStorageDomain;
use crate::error::{Result, StorageError};
use crate::fsio;
use crate::ops::{self, DataSpec, Operation, Step, REMOVED_IMAGE_PREFIX};
use crate::volmeta::{Allocation, Legality, VolFormat, VolRole, VolumeMetadata};

/// Capacities are rounded up to this (VDSM rounds to 4 KiB).
pub const CAPACITY_ALIGN: u64 = 4096;
/// Largest capacity accepted (1 PiB).
pub const MAX_CAPACITY: u64 = 1 << 50;

/// A new base volume (the first volume of a new image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub capacity: u64,
    pub format: VolFormat,
    pub allocation: Allocation,
    /// VDSM disk type; "DATA" for ordinary disks.
    pub disktype: String,
    pub description: String,
    /// A sparse qcow2 volume's allocation at creation, as an LV's initial size on a block
    /// domain (VDSM's `initialSize`): the file is made this long and no longer, so a node that
    /// caps the volume at its file's length (a thin disk on a loop device) lets the guest use
    /// this much before asking the SPM for more. `None`: the file is as long as `qemu-img`
    /// leaves it.
    pub initial_size: Option<u64>,
}

impl VolumeSpec {
    pub fn new(capacity: u64, format: VolFormat, allocation: Allocation) -> Self {
        Self {
            capacity,
            format,
            allocation,
            disktype: "DATA".into(),
            description: String::new(),
            initial_size: None,
        }
    }
}

/// Checks a volume's `initial_size` against its format and (rounded) capacity: only a sparse
/// qcow2 volume has one, sector aligned, at most the most a qcow2 file of that capacity grows
/// to (capacity × 1.1, VDSM's bound for extending a thin volume).
fn check_initial_size(spec: &VolumeSpec, capacity: u64) -> Result<()> {
    let Some(n) = spec.initial_size else {
        return Ok(());
    };
    let bad = |reason: String| Err(StorageError::invalid("initial size", reason));
    if spec.format != VolFormat::Cow || spec.allocation != Allocation::Sparse {
        return bad(format!(
            "only a SPARSE COW volume has one, not {} {}",
            spec.allocation, spec.format
        ));
    }
    let max = capacity + capacity / 10;
    if n == 0 || n > max || !n.is_multiple_of(512) {
        return bad(format!(
            "{n} bytes is not a multiple of 512 in 1..={max} (capacity {capacity} × 1.1)"
        ));
    }
    Ok(())
}

/// Which volumes [`FileStorageDomain::sync_image_data`] copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncType {
    /// Every volume but the leaf (VDSM's `INTERNAL`): a running VM mirrors the leaf itself.
    Internal,
    /// Every volume (VDSM's `ALL`).
    All,
}

impl SyncType {
    pub fn parse(s: &str) -> Option<SyncType> {
        match s.to_ascii_uppercase().as_str() {
            "INTERNAL" => Some(SyncType::Internal),
            "ALL" => Some(SyncType::All),
            _ => None,
        }
    }
}

/// How [`FileStorageDomain::copy_image`] lays out the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// Volume by volume, keeping ids, formats and the chain (a template base must already be
    /// on the destination, in its own image).
    Chain,
    /// VDSM's `cloneImageStructure`: the same volumes as [`CopyMode::Chain`] (ids, formats,
    /// sizes, parents), empty, and left ILLEGAL until their data is synced (the first step of
    /// a live storage migration).
    Structure,
    /// The chain's content into one base volume `vol`: the whole chain's, or with `top` what
    /// the image held when `top` was its leaf (a snapshot's volume: its descendants are left
    /// out, and may be written meanwhile).
    Collapsed {
        vol: VolUuid,
        format: VolFormat,
        allocation: Allocation,
        top: Option<VolUuid>,
    },
}

/// A volume with its sizes on storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeInfo {
    pub id: VolUuid,
    pub meta: VolumeMetadata,
    pub path: PathBuf,
    /// File size.
    pub apparent_size: u64,
    /// Allocated bytes.
    pub true_size: u64,
}

/// One image as `dump-chains` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageChainReport {
    pub image: ImgUuid,
    /// Volumes base first, or why the chain could not be built.
    pub chain: std::result::Result<Vec<VolumeInfo>, String>,
}

fn round_capacity(what: &'static str, cap: u64) -> Result<u64> {
    if cap == 0 || cap > MAX_CAPACITY {
        return Err(StorageError::invalid(
            what,
            format!("{cap} bytes is outside 1..={MAX_CAPACITY}"),
        ));
    }
    Ok(cap.div_ceil(CAPACITY_ALIGN) * CAPACITY_ALIGN)
}

fn check_meta(img: ImgUuid, vol: VolUuid, meta: &VolumeMetadata) -> Result<()> {
    meta.encode()
        .map(drop)
        .map_err(|source| StorageError::VolumeMetadata { img, vol, source })
}

fn state_err(
    img: ImgUuid,
    vol: VolUuid,
    verb: &'static str,
    state: String,
    needed: &'static str,
) -> StorageError {
    StorageError::WrongState {
        img,
        vol,
        verb,
        state,
        needed,
    }
}

impl FileStorageDomain {
    fn ensure_new_volume(&self, vol: VolUuid) -> Result<()> {
        if self.images_containing(vol)?.is_empty() {
            Ok(())
        } else {
            Err(StorageError::VolumeExists { sd: self.sd(), vol })
        }
    }

    fn ensure_new_image(&self, img: ImgUuid) -> Result<()> {
        let removed = self.images_dir().join(format!("{REMOVED_IMAGE_PREFIX}{img}"));
        if self.image_exists(img) || removed.exists() {
            return Err(StorageError::ImageExists { sd: self.sd(), img });
        }
        Ok(())
    }

    /// Creates a new image with one base volume.
    pub fn create_volume(&self, img: ImgUuid, vol: VolUuid, spec: &VolumeSpec) -> Result<VolumeMetadata> {
        let _g = self.lock_ops();
        let capacity = round_capacity("capacity", spec.capacity)?;
        check_initial_size(spec, capacity)?;
        let meta = VolumeMetadata {
            domain: self.sd(),
            image: img,
            parent: VolUuid::nil(),
            capacity,
            format: spec.format,
            allocation: spec.allocation,
            role: VolRole::Leaf,
            disktype: spec.disktype.clone(),
            description: spec.description.clone(),
            legality: Legality::Legal,
            ctime: self.now(),
            generation: 0,
            sequence: 1,
        };
        check_meta(img, vol, &meta)?;
        self.ensure_new_image(img)?;
        self.ensure_new_volume(vol)?;
        let mut op = Operation::new("create_volume", self.sd());
        // Data and lease are made in the side lane while the main lane journals the operation
        // and marks the new volume ILLEGAL; it turns LEGAL once both lanes are done.
        op.side(
            Step::MakeImageDir { img, sync: false },
            Step::RemoveImageDirIfEmpty { img },
        )
        .side(
            Step::CreateData {
                img,
                vol,
                spec: DataSpec {
                    format: spec.format,
                    allocation: spec.allocation,
                    capacity,
                    backing: None,
                    content_of: None,
                    initial_size: spec.initial_size,
                },
            },
            Step::RemoveData { img, vol },
        )
        .side(Step::InitLease { img, vol }, Step::RemoveLease { img, vol });
        let mut illegal = meta.clone();
        illegal.legality = Legality::Illegal;
        op.undoable(
            Step::MakeImageDir { img, sync: true },
            Step::RemoveImageDirIfEmpty { img },
        )
        .undoable(
            Step::WriteMeta {
                img,
                vol,
                meta: illegal.clone(),
            },
            Step::RemoveMeta { img, vol },
        )
        .join()
        .undoable(
            Step::WriteMeta {
                img,
                vol,
                meta: meta.clone(),
            },
            Step::WriteMeta {
                img,
                vol,
                meta: illegal,
            },
        );
        ops::run(self, &[], op, &mut |_| {})?;
        Ok(meta)
    }

    /// Creates volume `new_vol` on top of the image's leaf: the leaf becomes INTERNAL, the new
    /// volume (qcow2, backing file = the bare parent volUUID) the LEAF. `capacity` defaults to
    /// the parent's. This is also the volume a live snapshot switches the running VM to.
    pub fn create_snapshot(
        &self,
        img: ImgUuid,
        new_vol: VolUuid,
        capacity: Option<u64>,
        description: &str,
    ) -> Result<VolumeMetadata> {
        self.create_snapshot_of(img, new_vol, capacity, None, description)
    }

    /// [`Self::create_snapshot`] whose new leaf shows the content of `content_of`, an older
    /// volume of the chain, instead of the current leaf's: the chain stays linear and every
    /// volume stays as it was, so deleting the new leaf returns to the present exactly (oVirt's
    /// snapshot preview, which VDSM does with a second leaf). `content_of` = the leaf, or
    /// `None`, is a plain snapshot.
    pub fn create_snapshot_of(
        &self,
        img: ImgUuid,
        new_vol: VolUuid,
        capacity: Option<u64>,
        content_of: Option<VolUuid>,
        description: &str,
    ) -> Result<VolumeMetadata> {
        let _g = self.lock_ops();
        let chain = self.chain(img)?;
        let leaf = chain.leaf();
        let content_of = match content_of.filter(|v| *v != leaf.id) {
            None => None,
            Some(v) => {
                let older = chain.get(v).ok_or(StorageError::NoVolume { img, vol: v })?;
                if older.meta.legality != Legality::Legal {
                    return Err(state_err(
                        img,
                        v,
                        "create_snapshot",
                        format!("is {}", older.meta.legality),
                        "LEGAL",
                    ));
                }
                Some((v, older.meta.format))
            }
        };
        if leaf.meta.role != VolRole::Leaf || leaf.meta.image != img {
            return Err(state_err(
                img,
                leaf.id,
                "create_snapshot",
                format!("is {}", leaf.meta.role),
                "a LEAF of this image",
            ));
        }
        if leaf.meta.legality != Legality::Legal {
            return Err(state_err(
                img,
                leaf.id,
                "create_snapshot",
                format!("is {}", leaf.meta.legality),
                "LEGAL",
            ));
        }
        let capacity = round_capacity("capacity", capacity.unwrap_or(leaf.meta.capacity))?;
        if capacity < leaf.meta.capacity {
            return Err(StorageError::invalid(
                "capacity",
                format!("{capacity} is smaller than the parent's {}", leaf.meta.capacity),
            ));
        }
        let meta = VolumeMetadata {
            domain: self.sd(),
            image: img,
            parent: leaf.id,
            capacity,
            format: VolFormat::Cow,
            allocation: Allocation::Sparse,
            role: VolRole::Leaf,
            disktype: leaf.meta.disktype.clone(),
            description: description.to_string(),
            legality: Legality::Legal,
            ctime: self.now(),
            generation: 0,
            sequence: chain.volumes.iter().map(|v| v.meta.sequence).max().unwrap_or(0) + 1,
        };
        check_meta(img, new_vol, &meta)?;
        self.ensure_new_volume(new_vol)?;
        let mut internal = leaf.meta.clone();
        internal.role = VolRole::Internal;
        let mut op = Operation::new("create_snapshot", self.sd());
        // Side lane: the new volume's data and lease. Main lane: journal, then the parent's
        // INTERNAL metadata and the new volume's staged (written and synced). After both, the
        // renames publish them (parent first) and one directory fsync makes them durable: the
        // new volume has no metadata at all until it is complete and LEGAL.
        op.side(
            Step::CreateData {
                img,
                vol: new_vol,
                spec: DataSpec {
                    format: VolFormat::Cow,
                    allocation: Allocation::Sparse,
                    capacity,
                    backing: Some((leaf.id, leaf.meta.format)),
                    content_of,
                    initial_size: None,
                },
            },
            Step::RemoveData { img, vol: new_vol },
        )
        .side(
            Step::InitLease { img, vol: new_vol },
            Step::RemoveLease { img, vol: new_vol },
        );
        op.undoable(
            Step::StageMetas {
                img,
                metas: vec![(leaf.id, internal), (new_vol, meta.clone())],
            },
            Step::UnstageMetas {
                img,
                vols: vec![leaf.id, new_vol],
            },
        )
        .join()
        .undoable(
            Step::CommitMetas {
                img,
                vols: vec![leaf.id, new_vol],
            },
            Step::All {
                steps: vec![
                    Step::RemoveMeta { img, vol: new_vol },
                    Step::WriteMeta {
                        img,
                        vol: leaf.id,
                        meta: leaf.meta.clone(),
                    },
                ],
            },
        )
        .completed_if(img, new_vol);
        ops::run(self, &[], op, &mut |_| {})?;
        Ok(meta)
    }

    /// Marks the single volume of `img` as a template (SHARED). The image must hold exactly
    /// one LEGAL volume with no parent, and no clones may exist yet.
    pub fn make_template(&self, img: ImgUuid, vol: VolUuid) -> Result<()> {
        let _g = self.lock_ops();
        let chain = self.chain(img)?;
        if chain.volumes.len() != 1 || chain.leaf().id != vol {
            return Err(StorageError::invalid(
                "template",
                format!(
                    "image {img} must hold exactly volume {vol}, it holds {:?}",
                    chain.ids()
                ),
            ));
        }
        let v = chain.leaf();
        if v.meta.legality != Legality::Legal {
            return Err(state_err(
                img,
                vol,
                "make_template",
                format!("is {}", v.meta.legality),
                "LEGAL",
            ));
        }
        if v.meta.role == VolRole::Shared {
            return Ok(());
        }
        let mut meta = v.meta.clone();
        meta.role = VolRole::Shared;
        self.write_meta(img, vol, &meta)
    }

    /// Creates image `img` as a thin clone of template volume `tmpl_vol` (of image `tmpl_img`):
    /// the template's files are hard-linked into the new image directory and a new qcow2 leaf
    /// `vol` is created on top of it.
    pub fn clone_from_template(
        &self,
        tmpl_img: ImgUuid,
        tmpl_vol: VolUuid,
        img: ImgUuid,
        vol: VolUuid,
        description: &str,
    ) -> Result<VolumeMetadata> {
        let _g = self.lock_ops();
        let t = self.read_meta(tmpl_img, tmpl_vol)?;
        if t.role != VolRole::Shared || t.image != tmpl_img {
            return Err(state_err(
                tmpl_img,
                tmpl_vol,
                "clone_from_template",
                format!("is {}", t.role),
                "a SHARED template volume of its own image",
            ));
        }
        if t.legality != Legality::Legal {
            return Err(state_err(
                tmpl_img,
                tmpl_vol,
                "clone_from_template",
                format!("is {}", t.legality),
                "LEGAL",
            ));
        }
        let meta = VolumeMetadata {
            domain: self.sd(),
            image: img,
            parent: tmpl_vol,
            capacity: t.capacity,
            format: VolFormat::Cow,
            allocation: Allocation::Sparse,
            role: VolRole::Leaf,
            disktype: t.disktype.clone(),
            description: description.to_string(),
            legality: Legality::Legal,
            ctime: self.now(),
            generation: 0,
            sequence: 1,
        };
        check_meta(img, vol, &meta)?;
        self.ensure_new_image(img)?;
        self.ensure_new_volume(vol)?;
        let mut op = Operation::new("clone_from_template", self.sd());
        // As for a snapshot: data and lease in the side lane, journal, template links and the
        // staged metadata in the main lane, then one rename publishes the clone.
        op.side(
            Step::MakeImageDir { img, sync: false },
            Step::RemoveImageDirIfEmpty { img },
        )
        .side(
            Step::CreateData {
                img,
                vol,
                spec: DataSpec {
                    format: VolFormat::Cow,
                    allocation: Allocation::Sparse,
                    capacity: t.capacity,
                    backing: Some((tmpl_vol, t.format)),
                    content_of: None,
                    initial_size: None,
                },
            },
            Step::RemoveData { img, vol },
        )
        .side(Step::InitLease { img, vol }, Step::RemoveLease { img, vol });
        op.undoable(
            Step::MakeImageDir { img, sync: true },
            Step::RemoveImageDirIfEmpty { img },
        )
        .undoable(
            Step::LinkShared {
                from: tmpl_img,
                to: img,
                vol: tmpl_vol,
            },
            Step::UnlinkShared { img, vol: tmpl_vol },
        )
        .undoable(
            Step::StageMetas {
                img,
                metas: vec![(vol, meta.clone())],
            },
            Step::UnstageMetas { img, vols: vec![vol] },
        )
        .join()
        .undoable(
            Step::CommitMetas { img, vols: vec![vol] },
            Step::RemoveMeta { img, vol },
        )
        .completed_if(img, vol);
        ops::run(self, &[], op, &mut |_| {})?;
        Ok(meta)
    }

    /// Deletes the leaf volume `vol` of `img` (its parent becomes the LEAF). Deleting the only
    /// own volume of an image is [`FileStorageDomain::delete_image`]'s job.
    pub fn delete_volume(&self, img: ImgUuid, vol: VolUuid) -> Result<()> {
        let _g = self.lock_ops();
        let chain = self.chain(img)?;
        let v = chain.get(vol).ok_or(StorageError::NoVolume { img, vol })?;
        if chain.leaf().id != vol || v.meta.role == VolRole::Shared {
            return Err(state_err(
                img,
                vol,
                "delete_volume",
                format!("is {} at position {:?}", v.meta.role, chain.position(vol)),
                "the LEAF of the chain",
            ));
        }
        let parent = v
            .meta
            .parent()
            .and_then(|p| chain.get(p))
            .filter(|p| p.meta.image == img)
            .ok_or_else(|| {
                state_err(
                    img,
                    vol,
                    "delete_volume",
                    "is the image's only own volume".into(),
                    "a parent in the same image (delete the image instead)",
                )
            })?;
        let mut illegal = v.meta.clone();
        illegal.legality = Legality::Illegal;
        let mut new_leaf = parent.meta.clone();
        new_leaf.role = VolRole::Leaf;
        let mut op = Operation::new("delete_volume", self.sd());
        op.undoable(
            Step::WriteMeta {
                img,
                vol,
                meta: illegal,
            },
            Step::WriteMeta {
                img,
                vol,
                meta: v.meta.clone(),
            },
        )
        .forward(Step::RemoveData { img, vol })
        .forward(Step::RemoveLease { img, vol })
        .forward(Step::RemoveMeta { img, vol })
        .forward(Step::WriteMeta {
            img,
            vol: parent.id,
            meta: new_leaf,
        });
        ops::run(self, &[], op, &mut |_| {})
    }

    /// Deletes a whole image: renamed to `_remove_me_<img>` (the commit point), then purged.
    /// A template image cannot be deleted while clones use it.
    pub fn delete_image(&self, img: ImgUuid) -> Result<()> {
        let _g = self.lock_ops();
        if !self.image_exists(img) {
            return Err(StorageError::NoImage { sd: self.sd(), img });
        }
        for vol in self.volume_ids(img)? {
            let m = self.read_meta(img, vol);
            if matches!(&m, Ok(m) if m.role == VolRole::Shared && m.image == img) {
                self.ensure_template_unused(img, vol)?;
            }
        }
        let removed = format!("{REMOVED_IMAGE_PREFIX}{img}");
        if self.images_dir().join(&removed).exists() {
            return Err(StorageError::invalid(
                "image",
                format!("{removed} exists: run recovery first"),
            ));
        }
        let mut op = Operation::new("delete_image", self.sd());
        op.undoable(
            Step::RenameImageDir {
                from: img.to_string(),
                to: removed.clone(),
            },
            Step::RenameImageDir {
                from: removed,
                to: img.to_string(),
            },
        )
        .forward(Step::PurgeRemovedImage { img });
        ops::run(self, &[], op, &mut |_| {})
    }

    /// Checks a merge of `top` into its parent `base` is possible; returns the chain.
    fn merge_chain(&self, img: ImgUuid, base: VolUuid, top: VolUuid, verb: &'static str) -> Result<Chain> {
        let chain = self.chain(img)?;
        let t = chain.get(top).ok_or(StorageError::NoVolume { img, vol: top })?;
        let b = chain.get(base).ok_or(StorageError::NoVolume { img, vol: base })?;
        if t.meta.parent != base {
            return Err(StorageError::invalid(
                "merge",
                format!("volume {top} is not a child of {base}"),
            ));
        }
        for v in [t, b] {
            if v.meta.role == VolRole::Shared || v.meta.image != img {
                return Err(state_err(
                    img,
                    v.id,
                    verb,
                    format!("is {}", v.meta.role),
                    "a volume of this image that is not a template",
                ));
            }
        }
        if t.meta.legality != Legality::Legal {
            return Err(state_err(
                img,
                top,
                verb,
                format!("is {}", t.meta.legality),
                "LEGAL",
            ));
        }
        Ok(chain)
    }

    fn prepare_steps(op: &mut Operation, img: ImgUuid, chain: &Chain, base: VolUuid, top: VolUuid) {
        let b = chain.get(base).expect("validated");
        let t = chain.get(top).expect("validated");
        let capacity = b.meta.capacity.max(t.meta.capacity);
        let mut prepared = b.meta.clone();
        prepared.legality = Legality::Illegal;
        prepared.capacity = capacity;
        op.undoable(
            Step::WriteMeta {
                img,
                vol: base,
                meta: prepared,
            },
            Step::WriteMeta {
                img,
                vol: base,
                meta: b.meta.clone(),
            },
        );
        if capacity > b.meta.capacity {
            op.forward(Step::Resize {
                img,
                vol: base,
                format: b.meta.format,
                allocation: b.meta.allocation,
                capacity,
            });
        }
    }

    fn commit_step(op: &mut Operation, img: ImgUuid, chain: &Chain, base: VolUuid, top: VolUuid) {
        let t = chain.get(top).expect("validated");
        op.forward(Step::Commit {
            img,
            top,
            top_format: t.meta.format,
            base,
        });
    }

    fn finalize_steps(op: &mut Operation, img: ImgUuid, chain: &Chain, base: VolUuid, top: VolUuid) {
        let b = chain.get(base).expect("validated");
        let t = chain.get(top).expect("validated");
        let mut new_base = b.meta.clone();
        new_base.capacity = b.meta.capacity.max(t.meta.capacity);
        new_base.legality = Legality::Legal;
        new_base.generation = b.meta.next_generation();
        match chain.child_of(top) {
            None => new_base.role = VolRole::Leaf,
            Some(child) => {
                op.forward(Step::Rebase {
                    img,
                    vol: child.id,
                    backing: Some((base, b.meta.format)),
                });
                let mut relinked = child.meta.clone();
                relinked.parent = base;
                op.forward(Step::WriteMeta {
                    img,
                    vol: child.id,
                    meta: relinked,
                });
            }
        }
        // The top leaves the chain: its `.meta` goes first (one atomic unlink, after which it
        // is no volume at all), then its data and lease; the next metadata write makes the
        // directory durable.
        op.forward(Step::RemoveMeta { img, vol: top })
            .forward(Step::RemoveData { img, vol: top })
            .forward(Step::RemoveLease { img, vol: top })
            .forward(Step::WriteMeta {
                img,
                vol: base,
                meta: new_base,
            });
    }

    /// Cold merge, phase 1 (SPM): marks `base` ILLEGAL and grows it to `top`'s capacity.
    pub fn prepare_merge(&self, img: ImgUuid, base: VolUuid, top: VolUuid) -> Result<()> {
        let _g = self.lock_ops();
        let chain = self.merge_chain(img, base, top, "prepare_merge")?;
        let b = chain.get(base).expect("validated");
        if b.meta.legality != Legality::Legal {
            return Err(state_err(
                img,
                base,
                "prepare_merge",
                format!("is {}", b.meta.legality),
                "LEGAL",
            ));
        }
        let mut op = Operation::new("prepare_merge", self.sd());
        Self::prepare_steps(&mut op, img, &chain, base, top);
        ops::run(self, &[], op, &mut |_| {})
    }

    /// Cold merge, phase 2 (any host): `qemu-img commit` of `top` into the prepared `base`.
    pub fn merge_commit(
        &self,
        img: ImgUuid,
        base: VolUuid,
        top: VolUuid,
        progress: &mut dyn FnMut(f64),
    ) -> Result<()> {
        let _g = self.lock_ops();
        let chain = self.merge_chain(img, base, top, "merge_commit")?;
        self.require_prepared(&chain, img, base, "merge_commit")?;
        let mut op = Operation::new("merge_commit", self.sd());
        Self::commit_step(&mut op, img, &chain, base, top);
        ops::run(self, &[], op, progress)
    }

    /// Cold merge, phase 3 (SPM): re-links the chain around `top` (`qemu-img rebase -u` of its
    /// child, or `base` becomes the LEAF), deletes `top` and marks `base` LEGAL.
    pub fn finalize_merge(&self, img: ImgUuid, base: VolUuid, top: VolUuid) -> Result<()> {
        let _g = self.lock_ops();
        let chain = self.merge_chain(img, base, top, "finalize_merge")?;
        self.require_prepared(&chain, img, base, "finalize_merge")?;
        let mut op = Operation::new("finalize_merge", self.sd());
        Self::finalize_steps(&mut op, img, &chain, base, top);
        ops::run(self, &[], op, &mut |_| {})
    }

    fn require_prepared(&self, chain: &Chain, img: ImgUuid, base: VolUuid, verb: &'static str) -> Result<()> {
        let b = chain.get(base).expect("validated");
        if b.meta.legality != Legality::Illegal {
            return Err(state_err(
                img,
                base,
                verb,
                "is LEGAL (not prepared)".into(),
                "a base prepared by prepare_merge",
            ));
        }
        Ok(())
    }

    /// All three cold-merge phases as one journaled operation: merges `top` into its parent
    /// `base` and removes `top`, for a leaf or an internal `top`.
    pub fn cold_merge(
        &self,
        img: ImgUuid,
        base: VolUuid,
        top: VolUuid,
        progress: &mut dyn FnMut(f64),
    ) -> Result<()> {
        let _g = self.lock_ops();
        let chain = self.merge_chain(img, base, top, "cold_merge")?;
        let b = chain.get(base).expect("validated");
        if b.meta.legality != Legality::Legal {
            return Err(state_err(
                img,
                base,
                "cold_merge",
                format!("is {}", b.meta.legality),
                "LEGAL",
            ));
        }
        let mut op = Operation::new("cold_merge", self.sd());
        op.roll_forward();
        Self::prepare_steps(&mut op, img, &chain, base, top);
        Self::commit_step(&mut op, img, &chain, base, top);
        Self::finalize_steps(&mut op, img, &chain, base, top);
        ops::run(self, &[], op, progress)
    }

    /// Extends the capacity of the image's leaf `vol`; returns the new capacity.
    pub fn resize_volume(&self, img: ImgUuid, vol: VolUuid, capacity: u64) -> Result<u64> {
        let _g = self.lock_ops();
        let capacity = round_capacity("capacity", capacity)?;
        let chain = self.chain(img)?;
        let v = chain.get(vol).ok_or(StorageError::NoVolume { img, vol })?;
        if chain.leaf().id != vol || v.meta.role != VolRole::Leaf {
            return Err(state_err(
                img,
                vol,
                "resize_volume",
                format!("is {}", v.meta.role),
                "the LEAF",
            ));
        }
        if v.meta.legality != Legality::Legal {
            return Err(state_err(
                img,
                vol,
                "resize_volume",
                format!("is {}", v.meta.legality),
                "LEGAL",
            ));
        }
        if capacity < v.meta.capacity {
            return Err(StorageError::invalid(
                "capacity",
                format!("{capacity} would shrink volume {vol} ({} bytes)", v.meta.capacity),
            ));
        }
        if capacity == v.meta.capacity {
            return Ok(capacity);
        }
        let mut meta = v.meta.clone();
        meta.capacity = capacity;
        meta.generation = v.meta.next_generation();
        let mut op = Operation::new("resize_volume", self.sd());
        op.forward(Step::Resize {
            img,
            vol,
            format: v.meta.format,
            allocation: v.meta.allocation,
            capacity,
        })
        .forward(Step::WriteMeta { img, vol, meta });
        ops::run(self, &[], op, &mut |_| {})?;
        Ok(capacity)
    }

    /// `qemu-img measure` of the chain up to `vol` (default: the leaf) as one `format` volume:
    /// the space a collapsed copy needs.
    pub fn measure(&self, img: ImgUuid, vol: Option<VolUuid>, format: VolFormat) -> Result<Measure> {
        let chain = self.chain(img)?;
        let v = match vol {
            Some(id) => chain.get(id).ok_or(StorageError::NoVolume { img, vol: id })?,
            None => chain.leaf(),
        };
        let path = self.volume_path(img, v.id);
        self.qemu()
            .measure(&MeasureRequest {
                src: Some((&path, Some(v.meta.format.image_format()))),
                size: None,
                out_format: format.image_format(),
            })
            .map_err(|source| StorageError::Qemu {
                subject: format!("measure of volume {}", v.id),
                source,
            })
    }

    /// Sets a volume's LEGALITY (an administrator's repair after inspecting a chain).
    pub fn set_legality(&self, img: ImgUuid, vol: VolUuid, legality: Legality) -> Result<()> {
        self.edit_meta(img, vol, "set_legality", |m| {
            std::mem::replace(&mut m.legality, legality) != legality
        })
    }

    /// Replaces a volume's DESCRIPTION (VDSM's `setVolumeDescription`: the engine keeps disk
    /// aliases and OVF store state there). Bounded as VDSM bounds it.
    pub fn set_description(&self, img: ImgUuid, vol: VolUuid, description: &str) -> Result<()> {
        crate::volmeta::validate_description(description).map_err(|e| StorageError::InvalidArgument {
            what: "description",
            reason: e.to_string(),
        })?;
        self.edit_meta(img, vol, "set_description", |m| {
            std::mem::replace(&mut m.description, description.to_string()) != description
        })
    }

    /// Changes one of image `img`'s own volumes' `.meta` with `edit` (which answers whether it
    /// changed anything). A template's `.meta` is hard-linked into every clone's image;
    /// replacing it (write by rename) would leave the clones with the old record, so a template
    /// in use is not changed.
    fn edit_meta(
        &self,
        img: ImgUuid,
        vol: VolUuid,
        verb: &'static str,
        edit: impl FnOnce(&mut VolumeMetadata) -> bool,
    ) -> Result<()> {
        let _g = self.lock_ops();
        let mut meta = self.read_meta(img, vol)?;
        if meta.image != img {
            return Err(state_err(
                img,
                vol,
                verb,
                "belongs to another image (template)".into(),
                "a volume of this image",
            ));
        }
        let role = meta.role;
        if !edit(&mut meta) {
            return Ok(());
        }
        if role == VolRole::Shared {
            self.ensure_template_unused(img, vol)?;
        }
        self.write_meta(img, vol, &meta)
    }

    /// The raw volume `vol` of image `img`, checked to hold `len` bytes at `offset`: the
    /// streams below carry data in a volume's own layout, which only raw volumes share with the
    /// bytes (an OVF store's tar).
    fn raw_range(
        &self,
        img: ImgUuid,
        vol: VolUuid,
        offset: u64,
        len: u64,
        verb: &'static str,
    ) -> Result<PathBuf> {
        let meta = self.read_meta(img, vol)?;
        if meta.format != VolFormat::Raw || meta.image != img {
            return Err(state_err(
                img,
                vol,
                verb,
                format!("{} volume of image {}", meta.format, meta.image),
                "a raw volume of this image",
            ));
        }
        if offset.checked_add(len).is_none_or(|end| end > meta.capacity) {
            return Err(StorageError::InvalidArgument {
                what: "range",
                reason: format!(
                    "{len} bytes at offset {offset} do not fit volume {vol} of {} bytes",
                    meta.capacity
                ),
            });
        }
        Ok(self.volume_path(img, vol))
    }

    /// Writes `data` at `offset` into raw volume `vol` (VDSM's image stream upload, used for
    /// OVF stores); with `sync` the data is on storage when this returns.
    pub fn write_volume_data(
        &self,
        img: ImgUuid,
        vol: VolUuid,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let path = self.raw_range(img, vol, offset, data.len() as u64, "write_data")?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(StorageError::io("open", &path))?;
        f.write_all_at(data, offset)
            .map_err(StorageError::io("write", &path))?;
        if sync {
            f.sync_data().map_err(StorageError::io("fsync", &path))?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` from raw volume `vol` (VDSM's image stream download).
    pub fn read_volume_data(&self, img: ImgUuid, vol: VolUuid, offset: u64, len: u64) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let path = self.raw_range(img, vol, offset, len, "read_data")?;
        let f = std::fs::File::open(&path).map_err(StorageError::io("open", &path))?;
        let mut buf = vec![0u8; len as usize];
        // A sparse file shorter than its capacity reads as zeros past its end.
        let mut done = 0;
        while done < buf.len() {
            let n = f
                .read_at(&mut buf[done..], offset + done as u64)
                .map_err(StorageError::io("read", &path))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(buf)
    }

    /// Fails with the clones when template volume `vol` of image `img` is linked into others.
    fn ensure_template_unused(&self, img: ImgUuid, vol: VolUuid) -> Result<()> {
        let clones: Vec<ImgUuid> = self
            .images_containing(vol)?
            .into_iter()
            .filter(|i| *i != img)
            .collect();
        if clones.is_empty() {
            Ok(())
        } else {
            Err(StorageError::TemplateInUse { img, vol, clones })
        }
    }

    pub fn volume_info(&self, img: ImgUuid, vol: VolUuid) -> Result<VolumeInfo> {
        let meta = self.read_meta(img, vol)?;
        let path = self.volume_path(img, vol);
        let st = std::fs::metadata(&path).map_err(StorageError::io("stat", &path))?;
        Ok(VolumeInfo {
            id: vol,
            meta,
            apparent_size: st.len(),
            true_size: fsio::allocated(&path).unwrap_or(0),
            path,
        })
    }

    /// Every image's chain with sizes (`vdsm-tool dump-volume-chains`).
    pub fn dump_chains(&self) -> Result<Vec<ImageChainReport>> {
        let mut out = Vec::new();
        for img in self.images()? {
            let chain = self.chain(img).map_err(|e| e.to_string()).and_then(|c| {
                c.ids()
                    .into_iter()
                    .map(|v| self.volume_info(img, v).map_err(|e| e.to_string()))
                    .collect::<std::result::Result<Vec<_>, _>>()
            });
            out.push(ImageChainReport { image: img, chain });
        }
        Ok(out)
    }

    /// Copies image `img` of this domain to `dst` as image `dst_img`, reporting progress
    /// (0..=100). The copy is built ILLEGAL and turned LEGAL at the end; a failure removes it.
    pub fn copy_image(
        &self,
        img: ImgUuid,
        dst: &FileStorageDomain,
        dst_img: ImgUuid,
        mode: CopyMode,
        progress: &mut dyn FnMut(f64),
    ) -> Result<()> {
        let _g = if std::ptr::eq(self, dst) {
            None
        } else {
            Some(self.lock_ops())
        };
        let _gd = dst.lock_ops();
        let chain = self.chain(img)?;
        // The volumes read: all, or those up to a collapsed copy's top.
        let read = match mode {
            CopyMode::Collapsed { top: Some(t), .. } => chain
                .position(t)
                .map(|i| &chain.volumes[..=i])
                .ok_or(StorageError::NoVolume { img, vol: t })?,
            _ => &chain.volumes[..],
        };
        if let Some(p) = read.iter().find(|v| v.meta.legality != Legality::Legal) {
            return Err(state_err(
                img,
                p.id,
                "copy_image",
                format!("is {}", p.meta.legality),
                "LEGAL",
            ));
        }
        dst.ensure_new_image(dst_img)?;
        let mut op = Operation::new("copy_image", dst.sd());
        op.undoable(
            Step::MakeImageDir {
                img: dst_img,
                sync: true,
            },
            Step::RemoveImageDirIfEmpty { img: dst_img },
        );
        let mut finals = Vec::new();
        let structure_only = mode == CopyMode::Structure;
        match mode {
            CopyMode::Chain | CopyMode::Structure => {
                if let Some(t) = chain.template() {
                    let on_dst = dst.read_meta(t.meta.image, t.id).map_err(|_| {
                        StorageError::invalid(
                            "copy",
                            format!(
                                "template volume {} (image {}) must be copied to domain {} first",
                                t.id,
                                t.meta.image,
                                dst.sd()
                            ),
                        )
                    })?;
                    if on_dst.role != VolRole::Shared {
                        return Err(state_err(
                            t.meta.image,
                            t.id,
                            "copy_image",
                            format!("is {} on the destination", on_dst.role),
                            "SHARED",
                        ));
                    }
                    op.undoable(
                        Step::LinkShared {
                            from: t.meta.image,
                            to: dst_img,
                            vol: t.id,
                        },
                        Step::UnlinkShared {
                            img: dst_img,
                            vol: t.id,
                        },
                    );
                }
                let own: Vec<_> = chain.own_volumes().collect();
                for v in &own {
                    dst.ensure_new_volume(v.id)?;
                }
                let shares = self.progress_shares(img, own.iter().map(|v| v.id));
                for (v, &(start, share)) in own.iter().zip(&shares) {
                    let backing = v
                        .meta
                        .parent()
                        .map(|p| (p, chain.get(p).expect("chain member").meta.format));
                    let mut meta = v.meta.clone();
                    meta.domain = dst.sd();
                    meta.image = dst_img;
                    check_meta(dst_img, v.id, &meta)?;
                    finals.push((v.id, meta));
                    let spec = DataSpec {
                        format: v.meta.format,
                        allocation: v.meta.allocation,
                        capacity: v.meta.capacity,
                        backing,
                        content_of: None,
                        initial_size: None,
                    };
                    // A bare structure: empty volumes of the same shape, no data copied.
                    let make = if structure_only {
                        Step::CreateData {
                            img: dst_img,
                            vol: v.id,
                            spec,
                        }
                    } else {
                        Step::CopyVolume {
                            src_sd: self.sd(),
                            src_img: img,
                            src_vol: v.id,
                            src_format: v.meta.format,
                            img: dst_img,
                            vol: v.id,
                            spec,
                            collapsed: false,
                            progress: (start, share),
                        }
                    };
                    op.undoable(
                        make,
                        Step::RemoveData {
                            img: dst_img,
                            vol: v.id,
                        },
                    );
                }
            }
            CopyMode::Collapsed {
                vol,
                format,
                allocation,
                top: _,
            } => {
                dst.ensure_new_volume(vol)?;
                let leaf = read.last().expect("a chain is never empty");
                op.undoable(
                    Step::CopyVolume {
                        src_sd: self.sd(),
                        src_img: img,
                        src_vol: leaf.id,
                        src_format: leaf.meta.format,
                        img: dst_img,
                        vol,
                        spec: DataSpec {
                            format,
                            allocation,
                            capacity: leaf.meta.capacity,
                            backing: None,
                            content_of: None,
                            initial_size: None,
                        },
                        collapsed: true,
                        progress: (0.0, 100.0),
                    },
                    Step::RemoveData { img: dst_img, vol },
                );
                let meta = VolumeMetadata {
                    domain: dst.sd(),
                    image: dst_img,
                    parent: VolUuid::nil(),
                    capacity: leaf.meta.capacity,
                    format,
                    allocation,
                    role: VolRole::Leaf,
                    disktype: leaf.meta.disktype.clone(),
                    description: leaf.meta.description.clone(),
                    legality: Legality::Legal,
                    ctime: dst.now(),
                    generation: 0,
                    sequence: 1,
                };
                check_meta(dst_img, vol, &meta)?;
                finals.push((vol, meta));
            }
        }
        // ILLEGAL metadata and leases for every copied volume, then all LEGAL together.
        for (vol, meta) in &finals {
            let mut illegal = meta.clone();
            illegal.legality = Legality::Illegal;
            op.undoable(
                Step::WriteMeta {
                    img: dst_img,
                    vol: *vol,
                    meta: illegal,
                },
                Step::RemoveMeta {
                    img: dst_img,
                    vol: *vol,
                },
            )
            .undoable(
                Step::InitLease {
                    img: dst_img,
                    vol: *vol,
                },
                Step::RemoveLease {
                    img: dst_img,
                    vol: *vol,
                },
            );
        }
        // A bare structure stays ILLEGAL: its volumes hold no data yet.
        for (vol, meta) in finals.iter().filter(|_| !structure_only) {
            let mut illegal = meta.clone();
            illegal.legality = Legality::Illegal;
            op.undoable(
                Step::WriteMeta {
                    img: dst_img,
                    vol: *vol,
                    meta: meta.clone(),
                },
                Step::WriteMeta {
                    img: dst_img,
                    vol: *vol,
                    meta: illegal,
                },
            );
        }
        ops::run(dst, &[self], op, progress)
    }

    /// Where each volume's copy starts in a 0..=100 progress and how much of it it takes: in
    /// proportion to the data it holds (at least 1 MiB, so empty volumes still move it).
    fn progress_shares(&self, img: ImgUuid, vols: impl Iterator<Item = VolUuid>) -> Vec<(f64, f64)> {
        let weights: Vec<f64> = vols
            .map(|v| {
                fsio::allocated(&self.volume_path(img, v))
                    .unwrap_or(0)
                    .max(1 << 20) as f64
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let mut start = 0.0;
        weights
            .iter()
            .map(|w| {
                let share = 100.0 * w / total;
                start += share;
                (start - share, share)
            })
            .collect()
    }

    /// VDSM's `syncImageData`: copies the data of image `img`'s own volumes into the empty
    /// structure that [`CopyMode::Structure`] made of it on `dst` (same image and volume ids),
    /// each volume on its own over its parent, and turns each synced volume LEGAL.
    /// [`SyncType::Internal`] leaves the leaf out: during a live storage migration the running
    /// VM writes it and its mirror fills the copy. A volume already LEGAL on `dst` was synced
    /// by an earlier attempt and is skipped. A failure leaves the unsynced volumes empty and
    /// ILLEGAL again.
    pub fn sync_image_data(
        &self,
        img: ImgUuid,
        dst: &FileStorageDomain,
        sync: SyncType,
        progress: &mut dyn FnMut(f64),
    ) -> Result<()> {
        if self.sd() == dst.sd() {
            return Err(StorageError::invalid(
                "sync",
                format!("source and destination are both domain {}", self.sd()),
            ));
        }
        let _g = self.lock_ops();
        let _gd = dst.lock_ops();
        let chain = self.chain(img)?;
        let copy = dst.chain(img)?;
        let own: Vec<_> = chain.own_volumes().collect();
        let ids = |c: &Chain| c.own_volumes().map(|v| v.id).collect::<Vec<_>>();
        if ids(&chain) != ids(&copy) {
            return Err(StorageError::invalid(
                "sync",
                format!(
                    "image {img} on domain {} has volumes {:?}, not the source's {:?}: clone its structure first",
                    dst.sd(),
                    ids(&copy),
                    ids(&chain)
                ),
            ));
        }
        let leaf = chain.leaf().id;
        let todo: Vec<_> = own
            .iter()
            .filter(|v| sync == SyncType::All || v.id != leaf)
            .filter(|v| copy.get(v.id).is_some_and(|c| c.meta.legality != Legality::Legal))
            .collect();
        if let Some(v) = todo.iter().find(|v| v.meta.legality != Legality::Legal) {
            return Err(state_err(
                img,
                v.id,
                "sync_image_data",
                format!("is {}", v.meta.legality),
                "LEGAL",
            ));
        }
        let mut op = Operation::new("sync_image_data", dst.sd());
        let shares = self.progress_shares(img, todo.iter().map(|v| v.id));
        for (v, &(start, share)) in todo.iter().zip(&shares) {
            let dst_meta = &copy.get(v.id).expect("checked above").meta;
            let spec = DataSpec {
                format: dst_meta.format,
                allocation: dst_meta.allocation,
                capacity: dst_meta.capacity,
                backing: dst_meta
                    .parent()
                    .map(|p| (p, copy.get(p).expect("chain member").meta.format)),
                content_of: None,
                initial_size: None,
            };
            op.undoable(
                Step::CopyVolume {
                    src_sd: self.sd(),
                    src_img: img,
                    src_vol: v.id,
                    src_format: v.meta.format,
                    img,
                    vol: v.id,
                    spec: spec.clone(),
                    collapsed: false,
                    progress: (start, share),
                },
                // Back to the empty volume the structure had.
                Step::All {
                    steps: vec![
                        Step::RemoveData { img, vol: v.id },
                        Step::CreateData { img, vol: v.id, spec },
                    ],
                },
            );
        }
        for v in &todo {
            let illegal = copy.get(v.id).expect("checked above").meta.clone();
            let mut legal = illegal.clone();
            legal.legality = Legality::Legal;
            op.undoable(
                Step::WriteMeta {
                    img,
                    vol: v.id,
                    meta: legal,
                },
                Step::WriteMeta {
                    img,
                    vol: v.id,
                    meta: illegal,
                },
            );
        }
        ops::run(dst, &[self], op, progress)
    }

    /// Moves an image to another domain: a chain copy, then deletion of the source.
    pub fn move_image(
        &self,
        img: ImgUuid,
        dst: &FileStorageDomain,
        progress: &mut dyn FnMut(f64),
    ) -> Result<()> {
        if self.sd() == dst.sd() {
            return Err(StorageError::invalid(
                "move",
                format!("source and destination are both domain {}", self.sd()),
            ));
        }
        self.copy_image(img, dst, img, CopyMode::Chain, progress)?;
        self.delete_image(img)
    }
}
