//! File storage domains (NFS, POSIX, local directory) in VDSM's layout, version 5:
//!
//! ```text
//! <mount>/<sdUUID>/dom_md/metadata   sorted KEY=VALUE + _SHA_CKSUM
//!                        /ids        sanlock lockspace named <sdUUID>       (grows to 1 MiB)
//!                        /leases     sanlock resource "SDM" at 1 MiB         (grows to 2 MiB)
//!                        /xleases    VDSM external-lease index at 1 MiB
//!                        /inbox      16 MiB, /outbox 16 MiB (mailbox)
//!                 /images/<imgUUID>/<volUUID>{,.meta,.lease}
//!                 /oxvirt/journal/<op>.json   oxvirt's operation journal (see `ops`)
//! ```
//!
//! This module owns opening, creating and describing a domain and the paths inside it. The
//! image and volume verbs are in `image.rs`, the consistency checker in `check.rs`.
//!
//! Invariants: ids reach paths only as typed UUIDs; every metadata write is atomic
//! ([`crate::fsio::atomic_write`]); a domain is created in a hidden temporary directory and
//! renamed into place, so `<mount>/<sdUUID>` is either absent or complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oxvirt_qemu::img::QemuImg;
use oxvirt_types::{ImgUuid, SdUuid, VolUuid};
use serde::Serialize;

use crate::chain::{build_chain, Chain};
use crate::error::{Result, StorageError};
use crate::fsio;
use crate::leases;
use crate::ops::{self, Failpoint, REMOVED_IMAGE_PREFIX};
use crate::sdmeta::{DomainMetadata, DomainType};
use crate::volmeta::VolumeMetadata;
use crate::xleases;

pub const DOMAIN_MD_DIR: &str = "dom_md";
pub const IMAGES_DIR: &str = "images";
pub const MAILBOX_SIZE: u64 = 16 << 20;
pub const META_EXT: &str = ".meta";
pub const LEASE_EXT: &str = ".lease";
const MD_MODE: u32 = 0o660;

/// Seconds since the epoch; injectable so tests can pin CTIME and the xleases mtime.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    })
}

/// What to create.
#[derive(Debug, Clone)]
pub struct NewDomain {
    pub sd: SdUuid,
    pub description: String,
    pub domain_type: DomainType,
    /// `REMOTE_PATH` (e.g. `server:/export`); defaults to the mount directory.
    pub remote_path: Option<String>,
}

/// Capacity and usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DomainStats {
    pub disk_total: u64,
    pub disk_free: u64,
    pub images: usize,
    pub volumes: usize,
}

/// The domain monitor's view: can the metadata be read, and how long does it take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    pub valid: bool,
    pub read_delay: Duration,
    pub error: Option<String>,
}

/// An open file storage domain.
pub struct FileStorageDomain {
    root: PathBuf,
    md: DomainMetadata,
    qemu: QemuImg,
    clock: Clock,
    failpoint: Mutex<Option<Failpoint>>,
    /// Serializes this process's operations on the domain. Across hosts the SPM role provides
    /// exclusivity (issue 5).
    op_lock: Mutex<()>,
}

impl std::fmt::Debug for FileStorageDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStorageDomain")
            .field("sd", &self.md.sd)
            .field("root", &self.root)
            .finish()
    }
}

impl FileStorageDomain {
    /// Creates domain `req.sd` under `mount` (as `<mount>/<sdUUID>`).
    pub fn create(mount: &Path, req: &NewDomain) -> Result<Self> {
        Self::create_with(mount, req, system_clock())
    }

    pub fn create_with(mount: &Path, req: &NewDomain, clock: Clock) -> Result<Self> {
        let remote = req
            .remote_path
            .clone()
            .unwrap_or_else(|| mount.display().to_string());
        let md = DomainMetadata::new_v5(req.sd, req.domain_type, &req.description, &remote)
            .map_err(|e| StorageError::invalid("domain parameters", e.to_string()))?;
        if !req.domain_type.is_file() {
            return Err(StorageError::invalid(
                "domain type",
                format!("{} is not a file domain type", req.domain_type.as_str()),
            ));
        }
        let mount_md = std::fs::metadata(mount).map_err(StorageError::io("open mount directory", mount))?;
        if !mount_md.is_dir() {
            return Err(StorageError::invalid(
                "mount",
                format!("{} is not a directory", mount.display()),
            ));
        }
        let root = mount.join(req.sd.to_string());
        if root.exists() {
            return Err(StorageError::DomainExists(root));
        }
        let staging = mount.join(format!(".{}.creating", req.sd));
        if staging.exists() {
            ops_purge_tree(&staging)?;
        }
        let result = build_domain(&staging, &md, clock());
        if let Err(e) = result {
            let _ = ops_purge_tree(&staging);
            return Err(e);
        }
        std::fs::rename(&staging, &root).map_err(StorageError::io("rename into place", &staging))?;
        fsio::fsync_dir(mount).map_err(StorageError::io("sync", mount))?;
        tracing::info!(sd = %req.sd, path = %root.display(), "storage domain created");
        Self::open_with(&root, clock)
    }

    /// Opens the domain at `root` (`<mount>/<sdUUID>`), verifying its metadata checksum.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with(root, system_clock())
    }

    pub fn open_with(root: &Path, clock: Clock) -> Result<Self> {
        let md_path = root.join(DOMAIN_MD_DIR).join("metadata");
        let bytes = match std::fs::read(&md_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NoDomain(root.into()))
            }
            Err(e) => return Err(StorageError::io("read", md_path)(e)),
        };
        let md = DomainMetadata::decode(&bytes).map_err(|source| StorageError::DomainMetadata {
            path: md_path.clone(),
            source,
        })?;
        let dir_name = root.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if dir_name != md.sd.to_string() {
            return Err(StorageError::DomainMetadata {
                path: md_path,
                source: crate::sdmeta::MetadataError::Invalid {
                    key: crate::sdmeta::KEY_SDUUID,
                    value: format!("{} (directory is {dir_name})", md.sd),
                },
            });
        }
        if md.version != 5 {
            return Err(StorageError::UnsupportedVersion {
                path: root.into(),
                version: md.version,
            });
        }
        let qemu = QemuImg::locate().map_err(|source| StorageError::Qemu {
            subject: "locating qemu-img".into(),
            source,
        })?;
        let failpoint = std::env::var(Failpoint::ENV)
            .ok()
            .and_then(|s| Failpoint::parse(&s));
        Ok(Self {
            root: root.to_path_buf(),
            md,
            qemu,
            clock,
            failpoint: Mutex::new(failpoint),
            op_lock: Mutex::new(()),
        })
    }

    /// Opens domain `sd` mounted under `mount`.
    pub fn find(mount: &Path, sd: SdUuid) -> Result<Self> {
        Self::open(&mount.join(sd.to_string()))
    }

    /// Domains under `mount` (directories named by a UUID holding `dom_md/metadata`).
    pub fn scan(mount: &Path) -> Result<Vec<(SdUuid, PathBuf)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(mount).map_err(StorageError::io("list", mount))? {
            let e = e.map_err(StorageError::io("list", mount))?;
            let Some(sd) = e.file_name().to_str().and_then(|n| n.parse::<SdUuid>().ok()) else {
                continue;
            };
            if e.path().join(DOMAIN_MD_DIR).join("metadata").is_file() {
                out.push((sd, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn sd(&self) -> SdUuid {
        self.md.sd
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn metadata(&self) -> &DomainMetadata {
        &self.md
    }
    pub fn qemu(&self) -> &QemuImg {
        &self.qemu
    }
    pub(crate) fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Arms (or clears) a failpoint for this domain's operations (tests).
    pub fn set_failpoint(&self, fp: Option<Failpoint>) {
        *self.failpoint.lock().unwrap_or_else(|p| p.into_inner()) = fp;
    }
    pub(crate) fn failpoint(&self) -> Option<Failpoint> {
        self.failpoint.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub(crate) fn lock_ops(&self) -> MutexGuard<'_, ()> {
        self.op_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn md_dir(&self) -> PathBuf {
        self.root.join(DOMAIN_MD_DIR)
    }
    pub fn images_dir(&self) -> PathBuf {
        self.root.join(IMAGES_DIR)
    }
    pub fn image_dir(&self, img: ImgUuid) -> PathBuf {
        self.images_dir().join(img.to_string())
    }
    pub fn volume_path(&self, img: ImgUuid, vol: VolUuid) -> PathBuf {
        self.image_dir(img).join(vol.to_string())
    }
    pub fn meta_path(&self, img: ImgUuid, vol: VolUuid) -> PathBuf {
        self.image_dir(img).join(format!("{vol}{META_EXT}"))
    }
    pub fn lease_path(&self, img: ImgUuid, vol: VolUuid) -> PathBuf {
        self.image_dir(img).join(format!("{vol}{LEASE_EXT}"))
    }

    /// Capacity of the file system and what the domain holds.
    pub fn stats(&self) -> Result<DomainStats> {
        let (disk_total, disk_free) =
            fsio::statvfs(&self.root).map_err(StorageError::io("statvfs", &self.root))?;
        let images = self.images()?;
        let mut vols = std::collections::BTreeSet::new();
        for img in &images {
            vols.extend(self.volume_ids(*img)?);
        }
        Ok(DomainStats {
            disk_total,
            disk_free,
            images: images.len(),
            volumes: vols.len(),
        })
    }

    /// Reads the metadata file bypassing the cache and times it (VDSM's domain monitor check).
    pub fn health(&self) -> Health {
        let path = self.md_dir().join("metadata");
        match fsio::read_direct(&path, 4096) {
            Ok((bytes, read_delay)) => match DomainMetadata::decode(&bytes) {
                Ok(md) if md.sd == self.md.sd => Health {
                    valid: true,
                    read_delay,
                    error: None,
                },
                Ok(md) => Health {
                    valid: false,
                    read_delay,
                    error: Some(format!("metadata names domain {}", md.sd)),
                },
                Err(e) => Health {
                    valid: false,
                    read_delay,
                    error: Some(e.to_string()),
                },
            },
            Err(e) => Health {
                valid: false,
                read_delay: Duration::ZERO,
                error: Some(format!("cannot read {}: {e}", path.display())),
            },
        }
    }

    /// Images of the domain (directories named by a UUID; `_remove_me_*` excluded).
    pub fn images(&self) -> Result<Vec<ImgUuid>> {
        let dir = self.images_dir();
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(StorageError::io("list", &dir))? {
            let e = e.map_err(StorageError::io("list", &dir))?;
            if let Some(img) = e.file_name().to_str().and_then(|n| n.parse::<ImgUuid>().ok()) {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.push(img);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn image_exists(&self, img: ImgUuid) -> bool {
        self.image_dir(img).is_dir()
    }

    /// Volume ids in an image directory (those with a `.meta`).
    pub fn volume_ids(&self, img: ImgUuid) -> Result<Vec<VolUuid>> {
        let dir = self.image_dir(img);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NoImage { sd: self.sd(), img })
            }
            Err(e) => return Err(StorageError::io("list", dir)(e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(StorageError::io("list", &dir))?;
            let name = e.file_name();
            if let Some(vol) = name
                .to_str()
                .and_then(|n| n.strip_suffix(META_EXT))
                .and_then(|n| n.parse::<VolUuid>().ok())
            {
                out.push(vol);
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn read_meta(&self, img: ImgUuid, vol: VolUuid) -> Result<VolumeMetadata> {
        let path = self.meta_path(img, vol);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NoVolume { img, vol })
            }
            Err(e) => return Err(StorageError::io("read", path)(e)),
        };
        VolumeMetadata::decode(&bytes).map_err(|source| StorageError::VolumeMetadata { img, vol, source })
    }

    /// Atomically replaces a volume's `.meta`.
    pub(crate) fn write_meta(&self, img: ImgUuid, vol: VolUuid, meta: &VolumeMetadata) -> Result<()> {
        let data = meta
            .encode()
            .map_err(|source| StorageError::VolumeMetadata { img, vol, source })?;
        let path = self.meta_path(img, vol);
        fsio::atomic_write(&path, &data, MD_MODE).map_err(StorageError::io("write", path))
    }

    /// All volumes' metadata in an image directory.
    pub fn volumes(&self, img: ImgUuid) -> Result<BTreeMap<VolUuid, VolumeMetadata>> {
        self.volume_ids(img)?
            .into_iter()
            .map(|v| Ok((v, self.read_meta(img, v)?)))
            .collect()
    }

    /// The image's chain, base first (a template volume, if any, is its base).
    pub fn chain(&self, img: ImgUuid) -> Result<Chain> {
        Ok(build_chain(img, &self.volumes(img)?)?)
    }

    /// Paths of the chain's layers, base first: what a VM opens as its disk's backing chain
    /// (every layer lives in the image directory, templates as hard links).
    pub fn chain_paths(&self, img: ImgUuid) -> Result<Vec<PathBuf>> {
        Ok(self
            .chain(img)?
            .ids()
            .into_iter()
            .map(|v| self.volume_path(img, v))
            .collect())
    }

    /// Images holding volume `vol` (a template volume is in its own image and each clone's).
    pub(crate) fn images_containing(&self, vol: VolUuid) -> Result<Vec<ImgUuid>> {
        let mut out = Vec::new();
        for img in self.images()? {
            if self.meta_path(img, vol).exists() {
                out.push(img);
            }
        }
        Ok(out)
    }

    /// Finishes or undoes journaled operations left by a crash, then collects garbage:
    /// `_remove_me_*` image directories (VDSM's image garbage collector) and stale `*.new`
    /// temporary files. `others` are the domains cross-domain operations may need.
    pub fn recover(&self, others: &[&FileStorageDomain]) -> Result<RecoveryReport> {
        let _guard = self.lock_ops();
        let mut report = RecoveryReport::default();
        for op in ops::pending(&self.root)? {
            report.operations.push(ops::recover_one(self, others, &op)?);
        }
        let dir = self.images_dir();
        for e in std::fs::read_dir(&dir).map_err(StorageError::io("list", &dir))? {
            let e = e.map_err(StorageError::io("list", &dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(img) = name
                .strip_prefix(REMOVED_IMAGE_PREFIX)
                .and_then(|s| s.parse::<ImgUuid>().ok())
            {
                let mut op = ops::Operation::new("purge_removed_image", self.sd());
                op.forward(ops::Step::PurgeRemovedImage { img });
                ops::run(self, others, op, &mut |_| {})?;
                report.purged_images.push(img);
            } else if let (true, Ok(img)) = (
                e.file_type().map(|t| t.is_dir()).unwrap_or(false),
                name.parse::<ImgUuid>(),
            ) {
                self.collect_image_garbage(img, &mut report)?;
            }
        }
        Ok(report)
    }
}

impl FileStorageDomain {
    /// Removes what an operation that never reached its journal can leave in an image
    /// directory: temporary `*.new` files, data or lease files without a `.meta` (VDSM's
    /// "half-baked volume" rule), and the directory itself once empty.
    fn collect_image_garbage(&self, img: ImgUuid, report: &mut RecoveryReport) -> Result<()> {
        let dir = self.image_dir(img);
        let mut names = Vec::new();
        for f in std::fs::read_dir(&dir).map_err(StorageError::io("list", &dir))? {
            names.push(
                f.map_err(StorageError::io("list", &dir))?
                    .file_name()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        let has_meta = |vol: &str| names.iter().any(|n| n.strip_suffix(META_EXT) == Some(vol));
        for name in &names {
            let path = dir.join(name);
            let orphan = if name.ends_with(fsio::TEMP_SUFFIX) {
                report.removed_temp_files.push(path.clone());
                true
            } else {
                let vol = name.strip_suffix(LEASE_EXT).unwrap_or(name);
                let is_volume_file = !name.ends_with(META_EXT) && vol.parse::<VolUuid>().is_ok();
                if is_volume_file && !has_meta(vol) {
                    report.removed_orphans.push(path.clone());
                    true
                } else {
                    false
                }
            };
            if orphan {
                fsio::remove_if_exists(&path).map_err(StorageError::io("remove", &path))?;
            }
        }
        if std::fs::read_dir(&dir)
            .map_err(StorageError::io("list", &dir))?
            .next()
            .is_none()
        {
            std::fs::remove_dir(&dir).map_err(StorageError::io("remove", &dir))?;
            report.removed_empty_images.push(img);
        }
        if !report.removed_orphans.is_empty() || !report.removed_temp_files.is_empty() {
            fsio::fsync_dir(&self.images_dir()).map_err(StorageError::io("sync", self.images_dir()))?;
        }
        Ok(())
    }
}

/// What [`FileStorageDomain::recover`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    pub operations: Vec<ops::Recovered>,
    pub purged_images: Vec<ImgUuid>,
    pub removed_temp_files: Vec<PathBuf>,
    /// Data and lease files without metadata (volumes whose creation never got journaled).
    pub removed_orphans: Vec<PathBuf>,
    pub removed_empty_images: Vec<ImgUuid>,
}

fn build_domain(dir: &Path, md: &DomainMetadata, now: u64) -> Result<()> {
    let md_dir = dir.join(DOMAIN_MD_DIR);
    std::fs::create_dir_all(&md_dir).map_err(StorageError::io("create", &md_dir))?;
    let file = |name: &str| md_dir.join(name);
    // VDSM truncates ids/leases/xleases to 0 and lets sanlock grow them; mailboxes are 16 MiB.
    for name in ["ids", "leases", "xleases"] {
        fsio::create_sized(&file(name), 0, MD_MODE).map_err(StorageError::io("create", file(name)))?;
    }
    for name in ["inbox", "outbox"] {
        fsio::create_sized(&file(name), MAILBOX_SIZE, MD_MODE)
            .map_err(StorageError::io("create", file(name)))?;
    }
    let io_timeout = u16::try_from(md.io_op_timeout_sec).unwrap_or(10);
    leases::init_lockspace(&file("ids"), md.sd, io_timeout)?;
    leases::init_resource(
        &file("leases"),
        leases::SDM_LEASE_SLOT * md.alignment,
        md.sd,
        leases::SDM_LEASE_NAME,
    )?;
    let index = xleases::format_index(&md.sd.to_string(), now)
        .map_err(|e| StorageError::invalid("xleases lockspace", e.to_string()))?;
    fsio::write_at(&file("xleases"), xleases::index_offset(md.alignment), &index)
        .map_err(StorageError::io("write", file("xleases")))?;
    let text = md
        .encode()
        .map_err(|e| StorageError::invalid("domain metadata", e.to_string()))?;
    fsio::atomic_write(&file("metadata"), text.as_bytes(), MD_MODE)
        .map_err(StorageError::io("write", file("metadata")))?;
    let images = dir.join(IMAGES_DIR);
    std::fs::create_dir_all(&images).map_err(StorageError::io("create", &images))?;
    let journal = ops::journal_dir(dir);
    std::fs::create_dir_all(&journal).map_err(StorageError::io("create", &journal))?;
    fsio::fsync_dir(&md_dir).map_err(StorageError::io("sync", &md_dir))?;
    fsio::fsync_dir(dir).map_err(StorageError::io("sync", dir))
}

fn ops_purge_tree(dir: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir).map_err(StorageError::io("remove", dir))
}
