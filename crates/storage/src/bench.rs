//! The storage benchmark: snapshot creation, thin clone, cold merge and collapsed copy through
//! this crate's API against the bare `qemu-img` commands they run, in the same run, reported as
//! ratios.
//!
//! Each iteration times "ours" and "bare" back to back on identical inputs in the same
//! directory tree, so both see the same disk and the same load; medians over the iterations
//! absorb the noise of a shared machine. Setup (writing data, creating parents) is not timed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oxvirt_qemu::img::{ConvertRequest, CreateRequest, QemuImg};
use oxvirt_qemu::ImageFormat;
use oxvirt_types::{ImgUuid, SdUuid, VolUuid};
use serde::Serialize;

use crate::domain::{FileStorageDomain, NewDomain};
use crate::error::{Result, StorageError};
use crate::image::CopyMode;
use crate::sdmeta::DomainType;
use crate::volmeta::{Allocation, VolFormat};
use crate::VolumeSpec;

const CAPACITY: u64 = 1 << 30;

/// Median timings of one verb.
#[derive(Debug, Clone, Serialize)]
pub struct BenchFigure {
    pub verb: &'static str,
    /// What the bare side ran.
    pub bare_commands: &'static str,
    pub ours: Duration,
    pub bare: Duration,
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub iterations: usize,
    pub figures: Vec<BenchFigure>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn qemu_err(subject: &str) -> impl FnOnce(oxvirt_qemu::img::ImgError) -> StorageError + '_ {
    move |source| StorageError::Qemu {
        subject: subject.to_string(),
        source,
    }
}

/// Writes `mib` MiB of `pattern` at `off_mib` into `path` with `qemu-io` (setup only).
fn fill(path: &Path, pattern: u8, off_mib: u64, mib: u64) -> Result<()> {
    let io = oxvirt_qemu::QemuTool::Io
        .locate()
        .map_err(|e| StorageError::invalid("qemu-io", e.to_string()))?;
    let out = std::process::Command::new(io)
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern:#x} {off_mib}M {mib}M"),
        ])
        .arg(path)
        .current_dir(path.parent().unwrap_or(Path::new(".")))
        .output()
        .map_err(StorageError::io("run qemu-io on", path))?;
    if !out.status.success() {
        return Err(StorageError::invalid(
            "qemu-io",
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(())
}

fn bare_create(q: &QemuImg, path: &Path, backing: &str) -> Result<()> {
    q.create(&CreateRequest {
        path,
        format: ImageFormat::Qcow2,
        size: Some(CAPACITY),
        qcow2_compat: Some("1.1"),
        backing: Some((backing, ImageFormat::Qcow2)),
        preallocation: None,
        unsafe_backing: true,
    })
    .map_err(qemu_err("bare qemu-img create"))
}

/// Runs the benchmark in a fresh directory under `dir`.
pub fn run(dir: &Path, iterations: usize) -> Result<BenchReport> {
    let iterations = iterations.max(3);
    let work = dir.join(format!("oxvirt-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&work).map_err(StorageError::io("create", &work))?;
    let result = run_in(&work, iterations);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run_in(work: &Path, iterations: usize) -> Result<BenchReport> {
    let dom = FileStorageDomain::create(
        work,
        &NewDomain {
            sd: SdUuid::new_random(),
            description: "bench".into(),
            domain_type: DomainType::LocalFs,
            remote_path: None,
        },
    )?;
    let q = dom.qemu().clone();
    let bare_dir: PathBuf = work.join("bare");
    std::fs::create_dir_all(&bare_dir).map_err(StorageError::io("create", &bare_dir))?;
    let spec = VolumeSpec::new(CAPACITY, VolFormat::Cow, Allocation::Sparse);

    // Snapshot: a chain grows by one volume per iteration on both sides.
    let img = ImgUuid::new_random();
    let base = VolUuid::new_random();
    dom.create_volume(img, base, &spec)?;
    let bare_base = bare_dir.join("snap-base");
    q.create(&CreateRequest {
        path: &bare_base,
        format: ImageFormat::Qcow2,
        size: Some(CAPACITY),
        qcow2_compat: Some("1.1"),
        backing: None,
        preallocation: None,
        unsafe_backing: false,
    })
    .map_err(qemu_err("bare base"))?;
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    let mut bare_parent = "snap-base".to_string();
    for i in 0..iterations {
        let name = format!("snap-{i}");
        // Alternate which side goes first, so that neither always runs on a warmer cache.
        if i % 2 == 1 {
            let t = Instant::now();
            bare_create(&q, &bare_dir.join(&name), &bare_parent)?;
            bare.push(t.elapsed());
        }
        let t = Instant::now();
        dom.create_snapshot(img, VolUuid::new_random(), None, "")?;
        ours.push(t.elapsed());
        if i % 2 == 0 {
            let t = Instant::now();
            bare_create(&q, &bare_dir.join(&name), &bare_parent)?;
            bare.push(t.elapsed());
        }
        bare_parent = name;
    }
    let mut figures = vec![figure(
        "snapshot create",
        "qemu-img create -f qcow2 -b <parent> -u",
        ours,
        bare,
    )];

    // Thin clone of a template.
    let (timg, tvol) = (ImgUuid::new_random(), VolUuid::new_random());
    dom.create_volume(timg, tvol, &spec)?;
    fill(&dom.volume_path(timg, tvol), 0x5a, 0, 4)?;
    dom.make_template(timg, tvol)?;
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for i in 0..iterations {
        let bare_clone = bare_dir.join(format!("clone-{i}"));
        if i % 2 == 1 {
            let t = Instant::now();
            bare_create(&q, &bare_clone, "snap-base")?;
            bare.push(t.elapsed());
        }
        let t = Instant::now();
        dom.clone_from_template(timg, tvol, ImgUuid::new_random(), VolUuid::new_random(), "")?;
        ours.push(t.elapsed());
        if i % 2 == 0 {
            let t = Instant::now();
            bare_create(&q, &bare_clone, "snap-base")?;
            bare.push(t.elapsed());
        }
    }
    figures.push(figure(
        "thin clone",
        "qemu-img create -f qcow2 -b <template> -u",
        ours,
        bare,
    ));

    // Cold merge of a leaf holding 16 MiB into its parent.
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for i in 0..iterations {
        let (mimg, mbase, mtop) = (
            ImgUuid::new_random(),
            VolUuid::new_random(),
            VolUuid::new_random(),
        );
        dom.create_volume(mimg, mbase, &spec)?;
        fill(&dom.volume_path(mimg, mbase), 0x11, 0, 4)?;
        dom.create_snapshot(mimg, mtop, None, "")?;
        fill(&dom.volume_path(mimg, mtop), 0x22, 2, 16)?;
        let bb = bare_dir.join(format!("merge-base-{i}"));
        let bt = bare_dir.join(format!("merge-top-{i}"));
        q.create(&CreateRequest {
            path: &bb,
            format: ImageFormat::Qcow2,
            size: Some(CAPACITY),
            qcow2_compat: Some("1.1"),
            backing: None,
            preallocation: None,
            unsafe_backing: false,
        })
        .map_err(qemu_err("bare merge base"))?;
        fill(&bb, 0x11, 0, 4)?;
        bare_create(&q, &bt, &format!("merge-base-{i}"))?;
        fill(&bt, 0x22, 2, 16)?;

        let bare_merge = |bare: &mut Vec<Duration>| -> Result<()> {
            let t = Instant::now();
            q.commit(&bt, ImageFormat::Qcow2, Some(&bb), true, &mut |_| {})
                .map_err(qemu_err("bare qemu-img commit"))?;
            std::fs::remove_file(&bt).map_err(StorageError::io("remove", &bt))?;
            bare.push(t.elapsed());
            Ok(())
        };
        if i % 2 == 1 {
            bare_merge(&mut bare)?;
        }
        let t = Instant::now();
        dom.cold_merge(mimg, mbase, mtop, &mut |_| {})?;
        ours.push(t.elapsed());
        if i % 2 == 0 {
            bare_merge(&mut bare)?;
        }
    }
    figures.push(figure(
        "cold merge (leaf, 16 MiB)",
        "qemu-img commit -d -b <base> <top>; rm <top>",
        ours,
        bare,
    ));

    // Copy of a two-volume chain (4 MiB + 16 MiB written) collapsed into one new image, as
    // "Copy disk" and template creation do.
    let (cimg, cbase, ctop) = (
        ImgUuid::new_random(),
        VolUuid::new_random(),
        VolUuid::new_random(),
    );
    dom.create_volume(cimg, cbase, &spec)?;
    fill(&dom.volume_path(cimg, cbase), 0x11, 0, 4)?;
    dom.create_snapshot(cimg, ctop, None, "")?;
    fill(&dom.volume_path(cimg, ctop), 0x22, 2, 16)?;
    let top_path = dom.volume_path(cimg, ctop);
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for i in 0..iterations {
        let dst = bare_dir.join(format!("copy-{i}"));
        let bare_copy = |bare: &mut Vec<Duration>| -> Result<()> {
            let t = Instant::now();
            q.convert(
                &ConvertRequest {
                    src: &top_path,
                    src_format: Some(ImageFormat::Qcow2),
                    dst: &dst,
                    dst_format: ImageFormat::Qcow2,
                    qcow2_compat: Some("1.1"),
                    backing: None,
                    preallocation: None,
                },
                &mut |_| {},
            )
            .map_err(qemu_err("bare qemu-img convert"))?;
            bare.push(t.elapsed());
            Ok(())
        };
        if i % 2 == 1 {
            bare_copy(&mut bare)?;
        }
        let (img, vol) = (ImgUuid::new_random(), VolUuid::new_random());
        let t = Instant::now();
        dom.copy_image(
            cimg,
            &dom,
            img,
            CopyMode::Collapsed {
                vol,
                format: VolFormat::Cow,
                allocation: Allocation::Sparse,
                top: None,
            },
            &mut |_| {},
        )?;
        ours.push(t.elapsed());
        if i % 2 == 0 {
            bare_copy(&mut bare)?;
        }
    }
    figures.push(figure(
        "copy collapsing a chain (20 MiB)",
        "qemu-img convert -O qcow2 <top> <new>",
        ours,
        bare,
    ));
    Ok(BenchReport { iterations, figures })
}

fn figure(
    verb: &'static str,
    bare_commands: &'static str,
    ours: Vec<Duration>,
    bare: Vec<Duration>,
) -> BenchFigure {
    let (o, b) = (median(ours), median(bare));
    BenchFigure {
        verb,
        bare_commands,
        ours: o,
        bare: b,
        ratio: o.as_secs_f64() / b.as_secs_f64().max(1e-9),
    }
}
