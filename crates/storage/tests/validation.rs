//! Bad input gets a clear error and changes nothing on disk.

mod common;

use common::*;
use oxvirt_storage::{Allocation, CopyMode, StorageError, VolFormat, VolumeSpec, MAX_CAPACITY};
use oxvirt_types::{ImgUuid, VolUuid};

#[test]
fn rejected_requests_leave_the_domain_untouched() {
    let f = Fixture::new();
    let (img, base, top) = (
        ImgUuid::new_random(),
        VolUuid::new_random(),
        VolUuid::new_random(),
    );
    f.dom
        .create_volume(
            img,
            base,
            &VolumeSpec::new(8 * MIB, VolFormat::Cow, Allocation::Sparse),
        )
        .unwrap();
    f.dom.create_snapshot(img, top, None, "").unwrap();
    let before = tree(f.dom.root());
    let d = &f.dom;
    let spec = |cap: u64| VolumeSpec::new(cap, VolFormat::Raw, Allocation::Sparse);
    let mut long = spec(MIB);
    long.description = "d".repeat(211);
    let mut injected = spec(MIB);
    injected.description = "x\nLEGALITY=LEGAL".into();
    let mut disktype = spec(MIB);
    disktype.disktype = "../../etc".into();

    let cases: Vec<(&str, StorageError)> = vec![
        (
            "zero capacity",
            d.create_volume(ImgUuid::new_random(), VolUuid::new_random(), &spec(0))
                .unwrap_err(),
        ),
        (
            "huge capacity",
            d.create_volume(
                ImgUuid::new_random(),
                VolUuid::new_random(),
                &spec(MAX_CAPACITY + 1),
            )
            .unwrap_err(),
        ),
        (
            "long description",
            d.create_volume(ImgUuid::new_random(), VolUuid::new_random(), &long)
                .unwrap_err(),
        ),
        (
            "newline in description",
            d.create_volume(ImgUuid::new_random(), VolUuid::new_random(), &injected)
                .unwrap_err(),
        ),
        (
            "bad disk type",
            d.create_volume(ImgUuid::new_random(), VolUuid::new_random(), &disktype)
                .unwrap_err(),
        ),
        (
            "existing image",
            d.create_volume(img, VolUuid::new_random(), &spec(MIB))
                .unwrap_err(),
        ),
        (
            "existing volume id",
            d.create_volume(ImgUuid::new_random(), base, &spec(MIB))
                .unwrap_err(),
        ),
        (
            "snapshot of a missing image",
            d.create_snapshot(ImgUuid::new_random(), VolUuid::new_random(), None, "")
                .unwrap_err(),
        ),
        (
            "snapshot smaller than parent",
            d.create_snapshot(img, VolUuid::new_random(), Some(MIB), "")
                .unwrap_err(),
        ),
        (
            "snapshot reusing an id",
            d.create_snapshot(img, base, None, "").unwrap_err(),
        ),
        (
            "delete an internal volume",
            d.delete_volume(img, base).unwrap_err(),
        ),
        (
            "delete a missing volume",
            d.delete_volume(img, VolUuid::new_random()).unwrap_err(),
        ),
        (
            "merge a non-child",
            d.cold_merge(img, top, base, &mut |_| {}).unwrap_err(),
        ),
        (
            "finalize an unprepared merge",
            d.finalize_merge(img, base, top).unwrap_err(),
        ),
        (
            "commit an unprepared merge",
            d.merge_commit(img, base, top, &mut |_| {}).unwrap_err(),
        ),
        ("shrink", d.resize_volume(img, top, MIB).unwrap_err()),
        (
            "resize an internal volume",
            d.resize_volume(img, base, 64 * MIB).unwrap_err(),
        ),
        ("template of a chain", d.make_template(img, top).unwrap_err()),
        (
            "clone of a non-template",
            d.clone_from_template(img, base, ImgUuid::new_random(), VolUuid::new_random(), "")
                .unwrap_err(),
        ),
        (
            "delete a missing image",
            d.delete_image(ImgUuid::new_random()).unwrap_err(),
        ),
        (
            "copy onto itself",
            d.copy_image(img, d, img, CopyMode::Chain, &mut |_| {})
                .unwrap_err(),
        ),
        ("move onto itself", d.move_image(img, d, &mut |_| {}).unwrap_err()),
    ];
    for (what, err) in &cases {
        let msg = err.to_string();
        assert!(!msg.is_empty() && !msg.contains("Injected"), "{what}: {msg}");
    }
    assert!(matches!(cases[5].1, StorageError::ImageExists { .. }));
    assert!(matches!(cases[6].1, StorageError::VolumeExists { .. }));
    assert!(matches!(cases[7].1, StorageError::NoImage { .. }));
    assert_eq!(
        tree(f.dom.root()),
        before,
        "a rejected request changed the domain"
    );
    assert_clean(&f.dom);
}

#[test]
fn ids_are_uuids_never_paths() {
    for bad in [
        "../x",
        "/etc/passwd",
        "",
        "00000000-0000-0000-0000-00000000000/",
        "a/b",
    ] {
        assert!(bad.parse::<ImgUuid>().is_err(), "{bad}");
        assert!(bad.parse::<VolUuid>().is_err(), "{bad}");
    }
}
