//! The qemu-img wrapper against the real `qemu-img` and `qemu-io`.

use std::path::Path;
use std::process::Command;

use oxvirt_qemu::img::{Comparison, ConvertRequest, CreateRequest, ImgError, MeasureRequest, QemuImg};
use oxvirt_qemu::ImageFormat::{Qcow2, Raw};

const MIB: u64 = 1 << 20;

fn qemu_io(path: &Path, fmt: &str, cmd: &str) {
    let io = oxvirt_testkit::require_tool("qemu-io");
    let out = Command::new(io)
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

fn create(img: &QemuImg, path: &Path, size: Option<u64>, backing: Option<&str>) {
    img.create(&CreateRequest {
        path,
        format: Qcow2,
        size,
        qcow2_compat: Some("1.1"),
        backing: backing.map(|b| (b, Qcow2)),
        preallocation: None,
        unsafe_backing: false,
    })
    .unwrap();
}

#[test]
fn chain_create_info_commit_rebase_convert_compare() {
    oxvirt_testkit::require_tool("qemu-img");
    let img = QemuImg::locate().unwrap();
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    let top = d.path().join("top");
    create(&img, &base, Some(64 * MIB), None);
    create(&img, &top, None, Some("base"));
    qemu_io(&base, "qcow2", "write -P 0x11 0 1M");
    qemu_io(&top, "qcow2", "write -P 0x22 1M 1M");

    let info = img.info(&top, Some(Qcow2)).unwrap();
    assert_eq!(info.virtual_size, 64 * MIB);
    assert_eq!(
        info.backing_filename.as_deref(),
        Some("base"),
        "backing is the bare name"
    );
    assert_eq!(info.qcow2_compat(), Some("1.1"));
    let chain = img.info_chain(&top, None).unwrap();
    assert_eq!(chain.len(), 2);
    assert!(chain[1].filename.ends_with("base"));

    let map = img.map(&top, Some(Qcow2)).unwrap();
    assert!(map.iter().any(|e| e.depth == 0 && e.data && e.start == MIB));
    assert!(map.iter().any(|e| e.depth == 1 && e.data && e.start == 0));

    // A flat copy of the whole chain is the reference for every later comparison.
    let flat = d.path().join("flat.raw");
    let mut seen = Vec::new();
    img.convert(
        &ConvertRequest {
            src: &top,
            src_format: Some(Qcow2),
            dst: &flat,
            dst_format: Raw,
            qcow2_compat: None,
            backing: None,
            preallocation: None,
        },
        &mut |p| seen.push(p),
    )
    .unwrap();
    assert_eq!(seen.last(), Some(&100.0));
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "progress is monotonic: {seen:?}"
    );
    assert_eq!(img.compare(&top, &flat, false).unwrap(), Comparison::Identical);

    let m = img
        .measure(&MeasureRequest {
            src: Some((&top, Some(Qcow2))),
            size: None,
            out_format: Qcow2,
        })
        .unwrap();
    assert!(m.required >= 2 * MIB && m.fully_allocated >= 64 * MIB, "{m:?}");

    let mut ticks = 0;
    img.commit(&top, Qcow2, Some(&base), true, &mut |_| ticks += 1)
        .unwrap();
    assert!(ticks >= 1);
    assert_eq!(img.compare(&base, &flat, false).unwrap(), Comparison::Identical);
    assert!(img.check(&base, Some(Qcow2)).unwrap().is_clean());

    // Rebase -u to nothing makes top standalone: its view loses the base's data.
    img.rebase(&top, Qcow2, None, true).unwrap();
    assert!(img.info(&top, None).unwrap().backing_filename.is_none());
    assert!(matches!(
        img.compare(&top, &flat, false).unwrap(),
        Comparison::Differ(_)
    ));
    img.rebase(&top, Qcow2, Some(("base", Qcow2)), true).unwrap();
    assert_eq!(img.compare(&top, &flat, false).unwrap(), Comparison::Identical);

    img.resize(&top, Qcow2, 128 * MIB).unwrap();
    assert_eq!(img.info(&top, None).unwrap().virtual_size, 128 * MIB);
}

#[test]
fn failures_carry_the_command_and_its_stderr() {
    let img = QemuImg::locate().unwrap();
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nope");
    match img.info(&missing, None) {
        Err(ImgError::Failed { command, stderr, .. }) => {
            assert!(command.contains("info") && command.contains("nope"), "{command}");
            assert!(stderr.contains("No such file"), "{stderr}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    let junk = d.path().join("junk");
    std::fs::write(&junk, b"not an image").unwrap();
    let err = img.check(&junk, Some(Qcow2)).unwrap_err();
    assert!(err.to_string().contains("check"), "{err}");
}
