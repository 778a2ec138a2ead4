//! Crash safety: every multi-step verb is stopped before each of its steps — as a simulated
//! crash (nothing rolled back, journal kept) and as a step error (rolled back at once) — and by
//! killing a child process mid-operation. Afterwards the domain is reopened, recovered, and must
//! pass the deep check (`qemu-img check` included) with the guest-visible content intact and
//! the chain either as before or as after the operation.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use oxvirt_storage::{
    Allocation, CopyMode, FailMode, Failpoint, FileStorageDomain, Result, StorageError, VolFormat, VolumeSpec,
};
use oxvirt_types::{ImgUuid, VolUuid};

/// The state a scenario starts from.
struct Setup {
    f: Fixture,
    other: Option<FileStorageDomain>,
    img: ImgUuid,
    vols: Vec<VolUuid>,
    reference: PathBuf,
    alt_reference: Option<PathBuf>,
}

fn chain_of(f: Fixture, depth: usize, base_format: VolFormat) -> Setup {
    let img = ImgUuid::new_random();
    let mut vols = vec![VolUuid::new_random()];
    f.dom
        .create_volume(
            img,
            vols[0],
            &VolumeSpec::new(8 * MIB, base_format, Allocation::Sparse),
        )
        .unwrap();
    write(&f.dom, img, 0x10, 0, 2);
    for i in 1..depth {
        let v = VolUuid::new_random();
        f.dom.create_snapshot(img, v, None, "").unwrap();
        write(&f.dom, img, 0x10 + i as u8, i as u64, 2);
        vols.push(v);
    }
    let reference = f.scratch("reference");
    flatten(&f.dom, img, &reference);
    Setup {
        f,
        other: None,
        img,
        vols,
        reference,
        alt_reference: None,
    }
}

type Op = fn(&Setup) -> Result<()>;
/// Whether a chain (empty: the image does not exist) is an acceptable end state, and if so the
/// content it must show.
type Outcome = fn(&Setup, &[VolUuid]) -> Option<PathBuf>;

fn same(s: &Setup, ok: bool) -> Option<PathBuf> {
    ok.then(|| s.reference.clone())
}

/// Runs `op` with a failpoint before step 0, 1, ... until it completes without reaching the
/// failpoint. After each stop: reopen, recover, deep check, content check, and the chain must be
/// `before` or `after`.
fn every_step(name: &str, mode: FailMode, setup: fn() -> Setup, op: Op, outcome: Outcome) {
    let mut step = 0;
    loop {
        let s = setup();
        let before_tree = tree(s.f.dom.root());
        s.f.dom.set_failpoint(Some(Failpoint {
            verb: None,
            step,
            mode,
        }));
        if let Some(o) = &s.other {
            o.set_failpoint(Some(Failpoint {
                verb: None,
                step,
                mode,
            }));
        }
        let res = op(&s);
        s.f.dom.set_failpoint(None);
        let Err(err) = res else {
            assert!(step > 1, "{name}: the operation has steps");
            return; // the failpoint was past the last step
        };
        assert!(
            format!("{err:?}").contains("Injected"),
            "{name} step {step}: unexpected error {err:?}"
        );
        let home = s.other.as_ref().unwrap_or(&s.f.dom);
        if mode == FailMode::Error && oxvirt_storage::ops::pending(home.root()).unwrap().is_empty() {
            // Rolled back in-process: nothing may have changed.
            assert_eq!(
                tree(s.f.dom.root()),
                before_tree,
                "{name} step {step}: rollback left changes"
            );
        }
        // "Restart": fresh domain objects, then recovery.
        let dom = FileStorageDomain::open(s.f.dom.root()).unwrap();
        let other = s
            .other
            .as_ref()
            .map(|o| FileStorageDomain::open(o.root()).unwrap());
        let report = match &other {
            Some(o) => o.recover(&[&dom]).unwrap(),
            None => dom.recover(&[]).unwrap(),
        };
        let _ = report;
        assert_clean(&dom);
        if let Some(o) = &other {
            assert_clean(o);
        }
        let target = other.as_ref().unwrap_or(&dom);
        if target.image_exists(s.img) {
            let ids = target.chain(s.img).unwrap().ids();
            let Some(reference) = outcome(&s, &ids) else {
                panic!("{name} step {step}: unexpected chain {ids:?} (vols {:?})", s.vols);
            };
            assert_content(target, s.img, &reference);
        } else {
            assert!(
                outcome(&s, &[]).is_some(),
                "{name} step {step}: image unexpectedly gone"
            );
        }
        step += 1;
    }
}

fn setup2() -> Setup {
    chain_of(Fixture::new(), 2, VolFormat::Cow)
}
fn setup3() -> Setup {
    chain_of(Fixture::new(), 3, VolFormat::Raw)
}
fn setup_template() -> Setup {
    let s = chain_of(Fixture::new(), 1, VolFormat::Cow);
    s.f.dom.make_template(s.img, s.vols[0]).unwrap();
    s
}
fn setup_copy() -> Setup {
    let mut s = chain_of(Fixture::new(), 3, VolFormat::Cow);
    s.other = Some(s.f.second());
    s
}

fn snapshot(s: &Setup) -> Result<()> {
    s.f.dom
        .create_snapshot(s.img, VolUuid::new_random(), None, "")
        .map(drop)
}
fn snapshot_outcome(s: &Setup, ids: &[VolUuid]) -> Option<PathBuf> {
    same(
        s,
        ids == s.vols.as_slice() || (ids.len() == s.vols.len() + 1 && ids[..s.vols.len()] == s.vols[..]),
    )
}

#[test]
fn snapshot_crash_at_every_step() {
    every_step("snapshot", FailMode::Crash, setup2, snapshot, snapshot_outcome);
}

#[test]
fn snapshot_error_at_every_step_rolls_back() {
    every_step("snapshot", FailMode::Error, setup2, snapshot, snapshot_outcome);
}

#[test]
fn create_and_clone_crash_at_every_step() {
    // A new image: afterwards it either does not exist or is complete (checked by assert_clean).
    let create: Op = |s| {
        s.f.dom
            .create_volume(
                ImgUuid::new_random(),
                VolUuid::new_random(),
                &VolumeSpec::new(MIB, VolFormat::Cow, Allocation::Preallocated),
            )
            .map(drop)
    };
    every_step("create_volume", FailMode::Crash, setup2, create, |s, ids| {
        same(s, ids == s.vols.as_slice())
    });
    let clone: Op = |s| {
        s.f.dom
            .clone_from_template(s.img, s.vols[0], ImgUuid::new_random(), VolUuid::new_random(), "")
            .map(drop)
    };
    every_step("clone", FailMode::Crash, setup_template, clone, |s, ids| {
        same(s, ids == s.vols.as_slice())
    });
    every_step("clone", FailMode::Error, setup_template, clone, |s, ids| {
        same(s, ids == s.vols.as_slice())
    });
}

fn merge_internal(s: &Setup) -> Result<()> {
    s.f.dom.cold_merge(s.img, s.vols[0], s.vols[1], &mut |_| {})
}
fn merge_leaf(s: &Setup) -> Result<()> {
    s.f.dom.cold_merge(s.img, s.vols[1], s.vols[2], &mut |_| {})
}

#[test]
fn cold_merge_internal_crash_at_every_step() {
    every_step(
        "merge internal",
        FailMode::Crash,
        setup3,
        merge_internal,
        |s, ids| same(s, ids == s.vols.as_slice() || ids == [s.vols[0], s.vols[2]]),
    );
}

#[test]
fn cold_merge_leaf_crash_and_error_at_every_step() {
    let outcome: Outcome = |s, ids| same(s, ids == s.vols.as_slice() || ids == &s.vols[..2]);
    every_step("merge leaf", FailMode::Crash, setup3, merge_leaf, outcome);
    every_step("merge leaf", FailMode::Error, setup3, merge_leaf, outcome);
}

#[test]
fn delete_and_resize_crash_at_every_step() {
    // Deleting the leaf changes the content: the parent alone is the "after" reference.
    let setup_del: fn() -> Setup = || {
        let mut s = setup2();
        let parent_only = s.f.scratch("without-leaf");
        s.f.dom
            .qemu()
            .convert(
                &oxvirt_qemu::img::ConvertRequest {
                    src: &s.f.dom.volume_path(s.img, s.vols[0]),
                    src_format: None,
                    dst: &parent_only,
                    dst_format: oxvirt_qemu::ImageFormat::Raw,
                    qcow2_compat: None,
                    backing: None,
                    preallocation: None,
                },
                &mut |_| {},
            )
            .unwrap();
        s.alt_reference = Some(parent_only);
        s
    };
    let del: Op = |s| s.f.dom.delete_volume(s.img, s.vols[1]);
    every_step("delete_volume", FailMode::Crash, setup_del, del, |s, ids| {
        if ids == s.vols.as_slice() {
            Some(s.reference.clone())
        } else if ids == &s.vols[..1] {
            s.alt_reference.clone()
        } else {
            None
        }
    });

    let del_img: Op = |s| s.f.dom.delete_image(s.img);
    every_step("delete_image", FailMode::Crash, setup2, del_img, |s, ids| {
        same(s, ids.is_empty() || ids == s.vols.as_slice())
    });

    let resize: Op = |s| s.f.dom.resize_volume(s.img, s.vols[1], 24 * MIB).map(drop);
    every_step("resize", FailMode::Crash, setup2, resize, |s, ids| {
        same(s, ids == s.vols.as_slice())
    });
}

#[test]
fn copy_crash_at_every_step() {
    let copy: Op = |s| {
        let dst = s.other.as_ref().unwrap();
        s.f.dom
            .copy_image(s.img, dst, s.img, CopyMode::Chain, &mut |_| {})
    };
    every_step("copy chain", FailMode::Crash, setup_copy, copy, |s, ids| {
        same(s, ids.is_empty() || ids == s.vols.as_slice())
    });
    let collapsed: Op = |s| {
        let dst = s.other.as_ref().unwrap();
        let mode = CopyMode::Collapsed {
            vol: s.vols[2],
            format: VolFormat::Raw,
            allocation: Allocation::Preallocated,
            top: None,
        };
        s.f.dom.copy_image(s.img, dst, s.img, mode, &mut |_| {})
    };
    every_step(
        "copy collapsed",
        FailMode::Error,
        setup_copy,
        collapsed,
        |s, ids| same(s, ids.is_empty() || ids == [s.vols[2]]),
    );
}

#[test]
fn move_crash_at_every_step() {
    // A move is a copy then the source's deletion: at every stop the image is whole somewhere
    // (the source until the copy is complete, which the destination then shows).
    let mv: Op = |s| {
        let dst = s.other.as_ref().unwrap();
        s.f.dom.move_image(s.img, dst, &mut |_| {})
    };
    every_step("move", FailMode::Crash, setup_copy, mv, |s, ids| {
        let source = FileStorageDomain::open(s.f.dom.root()).unwrap();
        if ids.is_empty() {
            // Not copied: the source is as it was.
            assert_eq!(source.chain(s.img).unwrap().ids(), s.vols, "move: the source");
            assert_content(&source, s.img, &s.reference);
        }
        same(s, ids.is_empty() || ids == s.vols.as_slice())
    });
    // (Making a template is one atomic rewrite of the volume's `.meta`: no step to stop at.)
}

const CHILD_ENV: &str = "OXVIRT_STORAGE_TEST_CHILD";

/// Child role: run one cold merge (or, when the fifth word is "snapshot", a snapshot) on the
/// domain named in the environment.
fn child_role() -> ! {
    let spec = std::env::var(CHILD_ENV).unwrap();
    let parts: Vec<&str> = spec.split(' ').collect();
    let dom = FileStorageDomain::open(Path::new(parts[0])).unwrap();
    let (img, base, top) = (
        parts[1].parse().unwrap(),
        parts[2].parse().unwrap(),
        parts[3].parse().unwrap(),
    );
    if parts.get(4) == Some(&"snapshot") {
        dom.create_snapshot(img, VolUuid::new_random(), None, "").unwrap();
    } else {
        dom.cold_merge(img, base, top, &mut |_| {}).unwrap();
    }
    std::process::exit(0);
}

fn spawn_child(s: &Setup, failpoint: Option<&str>, role: &str) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "killed_children_leave_recoverable_domains",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(
        CHILD_ENV,
        format!(
            "{} {} {} {} {role}",
            s.f.dom.root().display(),
            s.img,
            s.vols[1],
            s.vols[2]
        ),
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    match failpoint {
        Some(fp) => cmd.env(Failpoint::ENV, fp),
        None => cmd.env_remove(Failpoint::ENV),
    };
    cmd.spawn().unwrap()
}

/// Waits until no process has the domain's files on its command line (qemu-img children of a
/// killed process die with it, a moment later).
fn wait_for_orphans(root: &Path) {
    let needle = root.display().to_string();
    let start = Instant::now();
    loop {
        let busy = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        });
        if !busy {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "processes still use {needle}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn recover_and_check(s: &Setup) {
    wait_for_orphans(s.f.dom.root());
    let dom = FileStorageDomain::open(s.f.dom.root()).unwrap();
    dom.recover(&[]).unwrap();
    assert_clean(&dom);
    let ids = dom.chain(s.img).unwrap().ids();
    let snapshotted = ids.len() == 4 && ids[..3] == s.vols[..];
    assert!(
        ids == s.vols || ids == s.vols[..2] || snapshotted,
        "unexpected chain {ids:?}"
    );
    assert_content(&dom, s.img, &s.reference);
}

#[test]
fn killed_children_leave_recoverable_domains() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child_role();
    }
    // The process aborts before each step of a leaf merge, and of a snapshot (whose side-lane
    // threads are then cut off wherever they are).
    let aborts = [
        ("cold_merge", 0),
        ("cold_merge", 2),
        ("cold_merge", 4),
        ("cold_merge", 6),
        ("create_snapshot", 1),
        ("create_snapshot", 3),
        ("create_snapshot", 4),
    ];
    for (verb, step) in aborts {
        let s = setup3();
        let role = if verb == "cold_merge" { "merge" } else { "snapshot" };
        let status = spawn_child(&s, Some(&format!("{verb}:{step}:abort")), role)
            .wait()
            .unwrap();
        assert!(!status.success(), "the child must die at step {step} of {verb}");
        recover_and_check(&s);
    }
    // SIGKILL at arbitrary moments once the operation is under way.
    for delay_ms in [0u64, 15, 40] {
        let s = setup3();
        let journal = oxvirt_storage::ops::journal_dir(s.f.dom.root());
        let mut child = spawn_child(&s, None, "merge");
        let start = Instant::now();
        while std::fs::read_dir(&journal).unwrap().next().is_none()
            && start.elapsed() < Duration::from_secs(30)
        {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        recover_and_check(&s);
    }
}

#[test]
fn recovery_needs_the_source_domain_only_when_given() {
    // A crashed copy is undone from the destination alone.
    let s = setup_copy();
    let dst = s.other.as_ref().unwrap();
    dst.set_failpoint(Some(Failpoint {
        verb: Some("copy_image".into()),
        step: 3,
        mode: FailMode::Crash,
    }));
    let err =
        s.f.dom
            .copy_image(s.img, dst, s.img, CopyMode::Chain, &mut |_| {})
            .unwrap_err();
    assert!(matches!(err, StorageError::Injected { .. }), "{err:?}");
    let report = FileStorageDomain::open(dst.root()).unwrap().recover(&[]).unwrap();
    assert_eq!(report.operations.len(), 1);
    assert!(!report.operations[0].rolled_forward);
    assert!(!dst.image_exists(s.img));
    assert_clean(dst);
}

#[test]
fn recovery_collects_what_an_unjournaled_creation_left() {
    // A crash before the journal entry reached storage can leave new files with no metadata:
    // the side lane creates data and lease files while the main lane journals.
    let s = setup2();
    let (img, vol) = (ImgUuid::new_random(), VolUuid::new_random());
    std::fs::create_dir(s.f.dom.image_dir(img)).unwrap();
    std::fs::write(s.f.dom.volume_path(img, vol), b"partial qcow2").unwrap();
    std::fs::write(s.f.dom.lease_path(img, vol), b"").unwrap();
    let stray = VolUuid::new_random();
    std::fs::write(s.f.dom.volume_path(s.img, stray), b"x").unwrap();
    std::fs::write(
        s.f.dom.image_dir(s.img).join(format!("{}.meta.new", s.vols[0])),
        b"half",
    )
    .unwrap();
    assert!(s.f.dom.check(false).unwrap().errors().count() >= 2);
    let report = s.f.dom.recover(&[]).unwrap();
    assert_eq!(report.removed_orphans.len(), 3, "{report:?}");
    assert_eq!(report.removed_temp_files.len(), 1);
    assert_eq!(report.removed_empty_images, vec![img]);
    assert_clean(&s.f.dom);
    assert_eq!(s.f.dom.chain(s.img).unwrap().ids(), s.vols);
}
