//! Shared helpers for the storage integration tests: real domains in temporary directories,
//! real `qemu-io` writes, real `qemu-img compare`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use oxvirt_qemu::img::{Comparison, ConvertRequest, QemuImg};
use oxvirt_qemu::ImageFormat;
use oxvirt_storage::{DomainType, FileStorageDomain, NewDomain};
use oxvirt_types::{ImgUuid, SdUuid};

pub const MIB: u64 = 1 << 20;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub dom: FileStorageDomain,
}

impl Fixture {
    pub fn new() -> Self {
        oxvirt_testkit::require_tool("qemu-img");
        oxvirt_testkit::require_tool("qemu-io");
        let dir = tempfile::tempdir().expect("tempdir");
        let dom = new_domain(dir.path(), "test domain");
        Fixture { dir, dom }
    }

    pub fn mount(&self) -> &Path {
        self.dir.path()
    }

    /// A second domain on the same mount.
    pub fn second(&self) -> FileStorageDomain {
        new_domain(self.dir.path(), "second")
    }

    /// A scratch path outside the domains.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join("scratch");
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }
}

pub fn new_domain(mount: &Path, desc: &str) -> FileStorageDomain {
    FileStorageDomain::create(
        mount,
        &NewDomain {
            sd: SdUuid::new_random(),
            description: desc.into(),
            domain_type: DomainType::LocalFs,
            remote_path: None,
        },
    )
    .expect("create domain")
}

/// Writes `len_mib` MiB of byte `pattern` at `off_mib` into the image's leaf (through its chain).
pub fn write(dom: &FileStorageDomain, img: ImgUuid, pattern: u8, off_mib: u64, len_mib: u64) {
    let leaf = dom.chain_paths(img).unwrap().pop().unwrap();
    let fmt = dom.chain(img).unwrap().leaf().meta.format.image_format().driver();
    qemu_io(
        &leaf,
        fmt,
        &format!("write -P {pattern:#x} {off_mib}M {len_mib}M"),
    );
}

pub fn qemu_io(path: &Path, fmt: &str, cmd: &str) {
    let out = Command::new(oxvirt_testkit::require_tool("qemu-io"))
        .args(["-f", fmt, "-c", cmd])
        .arg(path)
        .current_dir(path.parent().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest-visible content of an image's chain, flattened to a raw file.
pub fn flatten(dom: &FileStorageDomain, img: ImgUuid, to: &Path) {
    let leaf = dom.chain_paths(img).unwrap().pop().unwrap();
    let fmt = dom.chain(img).unwrap().leaf().meta.format.image_format();
    flatten_file(&leaf, fmt, to);
}

/// What volume file `leaf` (of format `fmt`, with its backing chain) shows, into raw file `to`.
pub fn flatten_file(leaf: &Path, fmt: ImageFormat, to: &Path) {
    let _ = std::fs::remove_file(to);
    QemuImg::locate()
        .unwrap()
        .convert(
            &ConvertRequest {
                src: leaf,
                src_format: Some(fmt),
                dst: to,
                dst_format: ImageFormat::Raw,
                qcow2_compat: None,
                backing: None,
                preallocation: None,
            },
            &mut |_| {},
        )
        .unwrap();
}

/// Asserts the image's guest-visible content equals the flat reference.
pub fn assert_content(dom: &FileStorageDomain, img: ImgUuid, reference: &Path) {
    let leaf = dom.chain_paths(img).unwrap().pop().unwrap();
    let cmp = QemuImg::locate()
        .unwrap()
        .compare(&leaf, reference, false)
        .unwrap();
    assert_eq!(
        cmp,
        Comparison::Identical,
        "image {img} content differs from {}",
        reference.display()
    );
}

/// Asserts the domain passes the deep check (qemu-img info/check on every volume).
pub fn assert_clean(dom: &FileStorageDomain) {
    let report = dom.check(true).unwrap();
    assert!(
        report.is_clean(),
        "domain {} is not clean: {:#?}",
        dom.sd(),
        report.problems
    );
}

/// Every file under `root` with its size and, for small files, its content: a cheap way to
/// assert that "nothing changed".
pub fn tree(root: &Path) -> BTreeMap<PathBuf, (u64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let m = std::fs::metadata(&p).unwrap();
            if m.is_dir() {
                out.insert(p.clone(), (0, Vec::new()));
                stack.push(p);
            } else {
                let content = if m.len() <= 4096 {
                    std::fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                out.insert(p, (m.len(), content));
            }
        }
    }
    out
}
