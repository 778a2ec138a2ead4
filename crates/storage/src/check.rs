//! The domain checker: everything that must hold on a consistent file domain, reported as a
//! list of problems (like `vdsm-tool dump-volume-chains` plus `qemu-img check`).
//!
//! Checked: the metadata seal; the special files and their sizes; the xleases index; for each
//! image directory, that every volume has its data, `.meta` and `.lease`, that its metadata
//! parses and names this domain and image (or is a SHARED template hard-linked from its own
//! image), that the chain is well-formed with roles matching positions and every volume LEGAL;
//! no leftover temporary files, `_remove_me_` directories or pending journal entries; and, when
//! `deep`, `qemu-img info`/`check` per volume: format, qcow2 compat 1.1, backing file = the
//! bare parent volUUID, virtual size = CAP, no corruption or leak.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use oxvirt_types::{ImgUuid, VolUuid};
use serde::Serialize;

use crate::chain::build_chain;
use crate::domain::{FileStorageDomain, LEASE_EXT, MAILBOX_SIZE, META_EXT};
use crate::error::Result;
use crate::fsio::TEMP_SUFFIX;
use crate::ops::{self, QCOW2_COMPAT, REMOVED_IMAGE_PREFIX};
use crate::sdmeta::DomainMetadata;
use crate::volmeta::{VolFormat, VolRole, VolumeMetadata};
use crate::xleases;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Severity {
    /// Something is inconsistent or broken.
    Error,
    /// Consistent, but needs attention (garbage to collect, an ILLEGAL volume).
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub image: Option<ImgUuid>,
    pub volume: Option<VolUuid>,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub images: usize,
    pub volumes: usize,
    /// Volumes inspected with `qemu-img` (deep checks).
    pub qemu_checked: usize,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// No problem at all, warnings included.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| p.severity == Severity::Error)
    }
}

struct Report<'a>(&'a mut CheckReport);

impl Report<'_> {
    fn push(&mut self, severity: Severity, image: Option<ImgUuid>, volume: Option<VolUuid>, message: String) {
        self.0.problems.push(Problem {
            severity,
            image,
            volume,
            message,
        });
    }
    fn err(&mut self, image: Option<ImgUuid>, volume: Option<VolUuid>, message: String) {
        self.push(Severity::Error, image, volume, message)
    }
    fn warn(&mut self, image: Option<ImgUuid>, volume: Option<VolUuid>, message: String) {
        self.push(Severity::Warning, image, volume, message)
    }
}

impl FileStorageDomain {
    /// Checks the whole domain. `deep` adds `qemu-img info` and `check` on every volume.
    pub fn check(&self, deep: bool) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        let mut r = Report(&mut report);
        self.check_dom_md(&mut r);
        match ops::pending(self.root()) {
            Ok(p) => {
                for op in p {
                    r.err(
                        None,
                        None,
                        format!(
                            "operation {} ({}) is pending in the journal: run recovery",
                            op.id, op.verb
                        ),
                    );
                }
            }
            Err(e) => r.err(None, None, e.to_string()),
        }
        let dir = self.images_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                r.err(None, None, format!("cannot list {}: {e}", dir.display()));
                return Ok(report);
            }
        };
        let mut images = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            match name.parse::<ImgUuid>() {
                Ok(img) if e.path().is_dir() => images.push(img),
                _ if name.starts_with(REMOVED_IMAGE_PREFIX) => r.warn(
                    None,
                    None,
                    format!("{name} is a deleted image awaiting garbage collection"),
                ),
                _ => r.warn(None, None, format!("unexpected entry images/{name}")),
            }
        }
        images.sort();
        r.0.images = images.len();
        for img in images {
            self.check_image(img, deep, &mut r);
        }
        Ok(report)
    }

    fn check_dom_md(&self, r: &mut Report<'_>) {
        let md_dir = self.md_dir();
        match std::fs::read(md_dir.join("metadata"))
            .map_err(|e| e.to_string())
            .and_then(|b| DomainMetadata::decode(&b).map_err(|e| e.to_string()))
        {
            Ok(md) if md.sd == self.sd() => {}
            Ok(md) => r.err(None, None, format!("metadata names domain {}", md.sd)),
            Err(e) => r.err(None, None, format!("dom_md/metadata: {e}")),
        }
        let size = |name: &str| std::fs::metadata(md_dir.join(name)).map(|m| m.len());
        for (name, min) in [
            ("inbox", MAILBOX_SIZE),
            ("outbox", MAILBOX_SIZE),
            ("ids", crate::leases::LEASE_AREA),
            ("leases", 2 * crate::leases::LEASE_AREA),
        ] {
            match size(name) {
                Ok(s) if s >= min => {}
                Ok(s) => r.err(
                    None,
                    None,
                    format!("dom_md/{name} is {s} bytes, expected at least {min}"),
                ),
                Err(e) => r.err(None, None, format!("dom_md/{name}: {e}")),
            }
        }
        if let Err(e) = crate::leases::verify_lockspace(&md_dir.join("ids"), self.sd()) {
            r.err(None, None, format!("dom_md/ids: {e}"));
        }
        let sdm_offset = crate::leases::SDM_LEASE_SLOT * self.metadata().alignment;
        if let Err(e) = crate::leases::verify_resource(
            &md_dir.join("leases"),
            sdm_offset,
            self.sd(),
            crate::leases::SDM_LEASE_NAME,
        ) {
            r.err(None, None, format!("dom_md/leases: {e}"));
        }
        let xl = md_dir.join("xleases");
        let alignment = self.metadata().alignment;
        let read = std::fs::File::open(&xl).and_then(|f| {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; xleases::INDEX_SIZE];
            f.read_exact_at(&mut buf, xleases::index_offset(alignment))?;
            Ok(buf)
        });
        match read
            .map_err(|e| e.to_string())
            .and_then(|b| xleases::parse_index(&b).map_err(|e| e.to_string()))
        {
            Ok((md, _)) if md.lockspace == self.sd().to_string() && !md.updating => {}
            Ok((md, _)) => r.err(
                None,
                None,
                format!(
                    "xleases index is for lockspace {:?} (updating: {})",
                    md.lockspace, md.updating
                ),
            ),
            Err(e) => r.err(None, None, format!("dom_md/xleases: {e}")),
        }
    }

    fn check_image(&self, img: ImgUuid, deep: bool, r: &mut Report<'_>) {
        let dir = self.image_dir(img);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            r.err(Some(img), None, format!("cannot list {}", dir.display()));
            return;
        };
        let mut data = Vec::new();
        let mut metas = Vec::new();
        let mut leases = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(v) = name
                .strip_suffix(META_EXT)
                .and_then(|s| s.parse::<VolUuid>().ok())
            {
                metas.push(v);
            } else if let Some(v) = name
                .strip_suffix(LEASE_EXT)
                .and_then(|s| s.parse::<VolUuid>().ok())
            {
                leases.push(v);
            } else if let Ok(v) = name.parse::<VolUuid>() {
                data.push(v);
            } else if name.ends_with(TEMP_SUFFIX) {
                r.warn(Some(img), None, format!("stale temporary file {name}"));
            } else {
                r.warn(Some(img), None, format!("unexpected file {name}"));
            }
        }
        for v in &data {
            if !metas.contains(v) {
                r.err(
                    Some(img),
                    Some(*v),
                    "data file without metadata (a half-made volume)".into(),
                );
            }
        }
        for v in &leases {
            if !metas.contains(v) {
                r.err(Some(img), Some(*v), "lease file without metadata".into());
            }
        }
        let mut vols: BTreeMap<VolUuid, VolumeMetadata> = BTreeMap::new();
        for v in metas {
            r.0.volumes += 1;
            if !data.contains(&v) {
                r.err(Some(img), Some(v), "metadata without a data file".into());
            }
            match std::fs::metadata(self.lease_path(img, v)) {
                Ok(m) if m.len() >= crate::leases::LEASE_AREA => {
                    if let Err(e) =
                        crate::leases::verify_resource(&self.lease_path(img, v), 0, self.sd(), &v.to_string())
                    {
                        r.err(Some(img), Some(v), format!("lease: {e}"));
                    }
                }
                Ok(m) => r.err(
                    Some(img),
                    Some(v),
                    format!("lease file is {} bytes, expected 1 MiB", m.len()),
                ),
                Err(_) => r.err(Some(img), Some(v), "lease file is missing".into()),
            }
            match self.read_meta(img, v) {
                Ok(m) => {
                    if m.domain != self.sd() {
                        r.err(Some(img), Some(v), format!("metadata names domain {}", m.domain));
                    }
                    if m.image != img {
                        self.check_template_link(img, v, &m, r);
                    }
                    vols.insert(v, m);
                }
                Err(e) => r.err(
                    Some(img),
                    Some(v),
                    format!(
                        "{e}: {}",
                        std::error::Error::source(&e)
                            .map(|s| s.to_string())
                            .unwrap_or_default()
                    ),
                ),
            }
        }
        if vols.is_empty() {
            r.err(Some(img), None, "image directory holds no volume".into());
            return;
        }
        let chain = match build_chain(img, &vols) {
            Ok(c) => c,
            Err(e) => {
                r.err(Some(img), None, e.to_string());
                return;
            }
        };
        for p in chain.problems() {
            match p {
                crate::chain::RoleProblem::Illegal { vol } => {
                    r.warn(Some(img), Some(vol), "volume is ILLEGAL".into())
                }
                crate::chain::RoleProblem::Role { vol, found, expected } => r.err(
                    Some(img),
                    Some(vol),
                    format!("VOLTYPE is {found}, its position needs {expected}"),
                ),
                crate::chain::RoleProblem::ForeignVolume { vol, image } => r.err(
                    Some(img),
                    Some(vol),
                    format!("volume of image {image} is not a SHARED base"),
                ),
            }
        }
        if deep {
            for v in &chain.volumes {
                self.check_qemu(img, v.id, &v.meta, r);
            }
        }
    }

    fn check_template_link(&self, img: ImgUuid, v: VolUuid, m: &VolumeMetadata, r: &mut Report<'_>) {
        if m.role != VolRole::Shared {
            r.err(
                Some(img),
                Some(v),
                format!("metadata names image {} but the volume is not SHARED", m.image),
            );
            return;
        }
        // The data, its metadata and its lease are all the template's own files, hard-linked:
        // a copy would drift from the template (a metadata rewrite, a lease taken in one).
        for (what, own, here) in [
            ("volume", self.volume_path(m.image, v), self.volume_path(img, v)),
            ("metadata", self.meta_path(m.image, v), self.meta_path(img, v)),
            ("lease", self.lease_path(m.image, v), self.lease_path(img, v)),
        ] {
            match (std::fs::metadata(own), std::fs::metadata(here)) {
                (Ok(a), Ok(b)) if a.ino() == b.ino() && a.dev() == b.dev() => {}
                (Err(_), _) => {
                    r.err(
                        Some(img),
                        Some(v),
                        format!("template image {} does not hold this volume's {what}", m.image),
                    );
                    return;
                }
                _ => r.err(
                    Some(img),
                    Some(v),
                    format!("template {what} is not a hard link of image {}'s", m.image),
                ),
            }
        }
    }

    fn check_qemu(&self, img: ImgUuid, v: VolUuid, m: &VolumeMetadata, r: &mut Report<'_>) {
        let path = self.volume_path(img, v);
        r.0.qemu_checked += 1;
        let info = match self.qemu().info(&path, None) {
            Ok(i) => i,
            Err(e) => {
                r.err(Some(img), Some(v), format!("qemu-img info: {e}"));
                return;
            }
        };
        let expected_format = m.format.image_format().driver();
        if info.format != expected_format {
            r.err(
                Some(img),
                Some(v),
                format!("image format is {}, metadata says {}", info.format, m.format),
            );
            return;
        }
        match m.format {
            VolFormat::Cow => {
                if info.qcow2_compat() != Some(QCOW2_COMPAT) {
                    r.err(
                        Some(img),
                        Some(v),
                        format!(
                            "qcow2 compat is {:?}, expected {QCOW2_COMPAT}",
                            info.qcow2_compat()
                        ),
                    );
                }
                if info.virtual_size != m.capacity {
                    r.err(
                        Some(img),
                        Some(v),
                        format!(
                            "virtual size {} differs from CAP {}",
                            info.virtual_size, m.capacity
                        ),
                    );
                }
                let expected_backing = m.parent().map(|p| p.to_string());
                if info.backing_filename != expected_backing {
                    r.err(
                        Some(img),
                        Some(v),
                        format!(
                            "backing file is {:?}, expected {:?}",
                            info.backing_filename, expected_backing
                        ),
                    );
                }
                match self.qemu().check(&path, Some(m.format.image_format())) {
                    Ok(c) if c.is_clean() => {}
                    Ok(c) if c.check_errors == 0 && c.corruptions == 0 => r.warn(
                        Some(img),
                        Some(v),
                        format!(
                            "qemu-img check: {} leaked clusters (harmless; recovery frees them)",
                            c.leaks
                        ),
                    ),
                    Ok(c) => r.err(
                        Some(img),
                        Some(v),
                        format!(
                            "qemu-img check: {} errors, {} corruptions, {} leaks",
                            c.check_errors, c.corruptions, c.leaks
                        ),
                    ),
                    Err(e) => r.err(Some(img), Some(v), format!("qemu-img check: {e}")),
                }
            }
            VolFormat::Raw => {
                if m.parent().is_some() {
                    r.err(Some(img), Some(v), "a RAW volume cannot have a parent".into());
                }
                if info.virtual_size < m.capacity {
                    r.err(
                        Some(img),
                        Some(v),
                        format!(
                            "raw file is {} bytes, smaller than CAP {}",
                            info.virtual_size, m.capacity
                        ),
                    );
                }
            }
        }
    }
}
