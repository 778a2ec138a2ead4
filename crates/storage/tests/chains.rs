//! Images and volume chains on real files: create, snapshot three deep with data in every
//! layer, cold merge (leaf and internal), templates and thin clones, delete, resize, measure,
//! legality, copy and move between domains — comparing guest-visible content with
//! `qemu-img compare` before and after every operation and checking the domain deeply.

mod common;

use common::*;
use oxvirt_qemu::img::Comparison;
use oxvirt_qemu::ImageFormat;
use oxvirt_storage::{
    Allocation, CopyMode, FailMode, Failpoint, FileStorageDomain, Legality, StorageError, SyncType,
    VolFormat, VolRole, VolumeSpec,
};
use oxvirt_types::{ImgUuid, VolUuid};

fn spec(format: VolFormat, allocation: Allocation) -> VolumeSpec {
    VolumeSpec::new(16 * MIB, format, allocation)
}

/// base ← s1 ← s2 ← s3 with distinct data in every layer; returns (img, [base, s1, s2, s3]).
fn three_deep(f: &Fixture, base_format: VolFormat) -> (ImgUuid, [VolUuid; 4]) {
    let img = ImgUuid::new_random();
    let ids = [
        VolUuid::new_random(),
        VolUuid::new_random(),
        VolUuid::new_random(),
        VolUuid::new_random(),
    ];
    f.dom
        .create_volume(img, ids[0], &spec(base_format, Allocation::Sparse))
        .unwrap();
    write(&f.dom, img, 0x11, 0, 4);
    for (i, v) in ids[1..].iter().enumerate() {
        let reference = f.scratch("before-snapshot");
        flatten(&f.dom, img, &reference);
        f.dom
            .create_snapshot(img, *v, None, &format!("snapshot {i}"))
            .unwrap();
        assert_content(&f.dom, img, &reference); // a snapshot changes nothing visible
        write(&f.dom, img, 0x21 + i as u8, 1 + i as u64, 2);
    }
    (img, ids)
}

#[test]
fn snapshot_chain_has_vdsm_metadata_and_backing_files() {
    let f = Fixture::new();
    let (img, ids) = three_deep(&f, VolFormat::Cow);
    let chain = f.dom.chain(img).unwrap();
    assert_eq!(chain.ids(), ids.to_vec());
    let roles: Vec<VolRole> = chain.volumes.iter().map(|v| v.meta.role).collect();
    assert_eq!(
        roles,
        [
            VolRole::Internal,
            VolRole::Internal,
            VolRole::Internal,
            VolRole::Leaf
        ]
    );
    for (i, v) in chain.volumes.iter().enumerate() {
        assert_eq!(v.meta.legality, Legality::Legal);
        assert_eq!(v.meta.sequence, i as u32 + 1);
        assert_eq!(v.meta.parent, if i == 0 { VolUuid::nil() } else { ids[i - 1] });
        let meta = std::fs::read(f.dom.meta_path(img, v.id)).unwrap();
        assert!(meta.len() <= 512 && meta.ends_with(b"EOF\n"));
        let info = f.dom.qemu().info(&f.dom.volume_path(img, v.id), None).unwrap();
        assert_eq!(
            info.backing_filename,
            v.meta.parent().map(|p| p.to_string()),
            "bare parent volUUID"
        );
        assert_eq!(info.qcow2_compat(), Some("1.1"));
        assert_eq!(std::fs::metadata(f.dom.lease_path(img, v.id)).unwrap().len(), MIB);
    }
    let paths = f.dom.chain_paths(img).unwrap();
    assert_eq!(paths.len(), 4);
    assert_eq!(paths[3], f.dom.volume_path(img, ids[3]));
    assert_clean(&f.dom);
    let dump = f.dom.dump_chains().unwrap();
    assert_eq!(dump.len(), 1);
    assert_eq!(dump[0].chain.as_ref().unwrap().len(), 4);
    assert_eq!(f.dom.stats().unwrap().volumes, 4);
}

/// A leaf showing an older volume's content (oVirt's snapshot preview): the chain stays linear,
/// the new leaf reads as the older state and takes writes, and deleting it returns to the
/// present exactly.
#[test]
fn snapshot_of_an_older_volume_shows_its_content_until_deleted() {
    let f = Fixture::new();
    let img = ImgUuid::new_random();
    let [base, s1, s2, p] = [(); 4].map(|_| VolUuid::new_random());
    f.dom
        .create_volume(img, base, &spec(VolFormat::Raw, Allocation::Sparse))
        .unwrap();
    write(&f.dom, img, 0x11, 0, 4);
    f.dom.create_snapshot(img, s1, None, "s1").unwrap();
    write(&f.dom, img, 0x22, 2, 4); // overwrites part of the base's data, adds more
    let at_s1 = f.scratch("at-s1");
    flatten(&f.dom, img, &at_s1);
    f.dom.create_snapshot(img, s2, None, "s2").unwrap();
    write(&f.dom, img, 0x33, 1, 8);
    let present = f.scratch("present");
    flatten(&f.dom, img, &present);
    let at_base = f.scratch("at-base");
    {
        // The base's content alone (raw: the file itself).
        std::fs::copy(f.dom.volume_path(img, base), &at_base).unwrap();
    }

    // Bad input changes nothing.
    assert!(f
        .dom
        .create_snapshot_of(img, p, None, Some(VolUuid::new_random()), "preview")
        .is_err());
    assert_eq!(f.dom.chain(img).unwrap().ids(), vec![base, s1, s2]);

    for (older, reference) in [(base, &at_base), (s1, &at_s1)] {
        f.dom
            .create_snapshot_of(img, p, None, Some(older), "preview")
            .unwrap();
        assert_eq!(f.dom.chain(img).unwrap().ids(), vec![base, s1, s2, p]);
        assert_content(&f.dom, img, reference);
        assert_clean(&f.dom);
        write(&f.dom, img, 0x44, 12, 1); // the preview takes writes
        f.dom.delete_volume(img, p).unwrap();
        assert_eq!(f.dom.chain(img).unwrap().ids(), vec![base, s1, s2]);
        assert_content(&f.dom, img, &present);
    }
    // The leaf itself is a plain snapshot.
    f.dom.create_snapshot_of(img, p, None, Some(s2), "").unwrap();
    assert_content(&f.dom, img, &present);
    assert_clean(&f.dom);
}

#[test]
fn cold_merge_of_internal_and_leaf_volumes_keeps_content() {
    let f = Fixture::new();
    let (img, [base, s1, s2, s3]) = three_deep(&f, VolFormat::Raw);
    let reference = f.scratch("ref");
    flatten(&f.dom, img, &reference);

    // Internal: s2 into s1, the three phases one by one; s3 is rebased onto s1.
    let mut ticks = 0;
    f.dom.prepare_merge(img, s1, s2).unwrap();
    assert_eq!(
        f.dom.read_meta(img, s1).unwrap().legality,
        Legality::Illegal,
        "base ILLEGAL while merging"
    );
    f.dom.merge_commit(img, s1, s2, &mut |_| ticks += 1).unwrap();
    assert!(ticks > 0);
    f.dom.finalize_merge(img, s1, s2).unwrap();
    assert_eq!(f.dom.chain(img).unwrap().ids(), vec![base, s1, s3]);
    assert_eq!(f.dom.read_meta(img, s3).unwrap().parent, s1);
    assert_eq!(f.dom.read_meta(img, s1).unwrap().legality, Legality::Legal);
    assert_eq!(f.dom.read_meta(img, s1).unwrap().generation, 1);
    assert!(!f.dom.volume_path(img, s2).exists() && !f.dom.meta_path(img, s2).exists());
    assert_content(&f.dom, img, &reference);
    assert_clean(&f.dom);

    // Leaf: s3 into s1 (one operation); s1 becomes the leaf.
    f.dom.cold_merge(img, s1, s3, &mut |_| {}).unwrap();
    let chain = f.dom.chain(img).unwrap();
    assert_eq!(chain.ids(), vec![base, s1]);
    assert_eq!(chain.leaf().meta.role, VolRole::Leaf);
    assert_content(&f.dom, img, &reference);
    assert_clean(&f.dom);

    // Into a raw base.
    f.dom.cold_merge(img, base, s1, &mut |_| {}).unwrap();
    assert_eq!(f.dom.chain(img).unwrap().ids(), vec![base]);
    assert_content(&f.dom, img, &reference);
    assert_clean(&f.dom);
    // The merged image still takes snapshots.
    f.dom
        .create_snapshot(img, VolUuid::new_random(), None, "after merge")
        .unwrap();
    assert_content(&f.dom, img, &reference);
    assert_clean(&f.dom);
}

#[test]
fn merge_of_a_resized_top_grows_the_base() {
    let f = Fixture::new();
    let img = ImgUuid::new_random();
    let (base, top) = (VolUuid::new_random(), VolUuid::new_random());
    f.dom
        .create_volume(img, base, &spec(VolFormat::Cow, Allocation::Sparse))
        .unwrap();
    write(&f.dom, img, 0x11, 0, 1);
    f.dom.create_snapshot(img, top, None, "").unwrap();
    assert_eq!(
        f.dom.resize_volume(img, top, 32 * MIB + 1).unwrap(),
        32 * MIB + 4096
    );
    write(&f.dom, img, 0x22, 20, 2);
    let reference = f.scratch("ref");
    flatten(&f.dom, img, &reference);
    let m = f.dom.measure(img, None, VolFormat::Cow).unwrap();
    assert!(m.required >= 3 * MIB && m.fully_allocated >= 32 * MIB, "{m:?}");
    f.dom.cold_merge(img, base, top, &mut |_| {}).unwrap();
    assert_eq!(f.dom.read_meta(img, base).unwrap().capacity, 32 * MIB + 4096);
    assert_content(&f.dom, img, &reference);
    assert_clean(&f.dom);
    assert!(matches!(
        f.dom.resize_volume(img, base, MIB),
        Err(StorageError::InvalidArgument { .. })
    ));
}

#[test]
fn templates_clone_thin_and_are_protected() {
    let f = Fixture::new();
    let (timg, tvol) = (ImgUuid::new_random(), VolUuid::new_random());
    f.dom
        .create_volume(timg, tvol, &spec(VolFormat::Raw, Allocation::Preallocated))
        .unwrap();
    write(&f.dom, timg, 0x7e, 0, 3);
    let tref = f.scratch("template");
    flatten(&f.dom, timg, &tref);
    f.dom.make_template(timg, tvol).unwrap();
    assert_eq!(f.dom.read_meta(timg, tvol).unwrap().role, VolRole::Shared);

    let (c1, c1v, c2, c2v) = (
        ImgUuid::new_random(),
        VolUuid::new_random(),
        ImgUuid::new_random(),
        VolUuid::new_random(),
    );
    f.dom
        .clone_from_template(timg, tvol, c1, c1v, "vm1 disk")
        .unwrap();
    f.dom
        .clone_from_template(timg, tvol, c2, c2v, "vm2 disk")
        .unwrap();
    assert_content(&f.dom, c1, &tref);
    // Hard links, as VDSM makes them: same inode for data, .meta and .lease.
    use std::os::unix::fs::MetadataExt;
    for p in [
        f.dom.volume_path(timg, tvol),
        f.dom.meta_path(timg, tvol),
        f.dom.lease_path(timg, tvol),
    ] {
        assert_eq!(std::fs::metadata(&p).unwrap().nlink(), 3, "{}", p.display());
    }
    let chain = f.dom.chain(c1).unwrap();
    assert_eq!(chain.template().unwrap().id, tvol);
    assert_eq!(chain.ids(), vec![tvol, c1v]);

    write(&f.dom, c1, 0x33, 1, 1);
    assert_content(&f.dom, c2, &tref); // clones are independent
    f.dom
        .create_snapshot(c1, VolUuid::new_random(), None, "")
        .unwrap();
    assert_clean(&f.dom);

    match f.dom.delete_image(timg) {
        Err(StorageError::TemplateInUse { clones, .. }) => assert_eq!(clones.len(), 2),
        other => panic!("deleting a used template must fail, got {other:?}"),
    }
    // Its metadata is shared with the clones (hard links): a template in use is not changed.
    match f.dom.set_legality(timg, tvol, Legality::Illegal) {
        Err(StorageError::TemplateInUse { clones, .. }) => assert_eq!(clones.len(), 2),
        other => panic!("changing a used template must fail, got {other:?}"),
    }
    assert_eq!(f.dom.read_meta(timg, tvol).unwrap().legality, Legality::Legal);
    assert_clean(&f.dom);
    // A clone whose copy of the template's metadata drifted is reported by the checker.
    let linked = f.dom.meta_path(c1, tvol);
    let copy = std::fs::read(&linked).unwrap();
    std::fs::remove_file(&linked).unwrap();
    std::fs::write(&linked, &copy).unwrap();
    let report = f.dom.check(false).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.message.contains("metadata is not a hard link")),
        "{report:?}"
    );
    std::fs::remove_file(&linked).unwrap();
    std::fs::hard_link(f.dom.meta_path(timg, tvol), &linked).unwrap();
    assert_clean(&f.dom);
    assert!(
        f.dom.delete_volume(c2, c2v).is_err(),
        "the only own volume goes with its image"
    );
    f.dom.delete_image(c2).unwrap();
    f.dom.delete_image(c1).unwrap();
    assert!(!f.dom.images_dir().join(format!("_remove_me_{c1}")).exists());
    f.dom.delete_image(timg).unwrap();
    assert!(f.dom.images().unwrap().is_empty());
    assert_clean(&f.dom);
}

#[test]
fn delete_leaf_and_legality() {
    let f = Fixture::new();
    let (img, [_, s1, s2, s3]) = three_deep(&f, VolFormat::Cow);
    assert!(
        f.dom.delete_volume(img, s2).is_err(),
        "only the leaf can be deleted"
    );
    // What the chain up to s2 shows (s3's write excluded), flattened from s2's own file; and
    // what the whole chain shows now, which must differ (s3 wrote on top).
    let up_to_s2 = f.scratch("s2");
    flatten_file(&f.dom.volume_path(img, s2), ImageFormat::Qcow2, &up_to_s2);
    let with_s3 = f.scratch("s3");
    flatten(&f.dom, img, &with_s3);
    assert_ne!(
        std::fs::read(&up_to_s2).unwrap(),
        std::fs::read(&with_s3).unwrap(),
        "s3 holds a write of its own"
    );
    // Deleting the leaf leaves exactly what s2 showed.
    f.dom.delete_volume(img, s3).unwrap();
    assert_eq!(f.dom.chain(img).unwrap().leaf().id, s2);
    assert_eq!(f.dom.read_meta(img, s2).unwrap().role, VolRole::Leaf);
    assert_content(&f.dom, img, &up_to_s2);
    assert_clean(&f.dom);

    f.dom.set_legality(img, s2, Legality::Illegal).unwrap();
    assert!(matches!(
        f.dom.create_snapshot(img, VolUuid::new_random(), None, ""),
        Err(StorageError::WrongState { .. })
    ));
    let report = f.dom.check(false).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    f.dom.set_legality(img, s2, Legality::Legal).unwrap();
    f.dom.delete_volume(img, s2).unwrap();
    assert_eq!(f.dom.chain(img).unwrap().leaf().id, s1);
    assert_clean(&f.dom);
}

/// `cloneImageStructure`: the same chain on another domain, empty and ILLEGAL until its data
/// is synced; its metadata matches the source's but for the domain and legality.
#[test]
fn clone_structure_makes_the_chain_empty_and_illegal() {
    let f = Fixture::new();
    let dst = f.second();
    let (img, ids) = three_deep(&f, VolFormat::Cow);
    f.dom
        .copy_image(img, &dst, img, CopyMode::Structure, &mut |_| {})
        .unwrap();
    let (src_chain, dst_chain) = (f.dom.chain(img).unwrap(), dst.chain(img).unwrap());
    assert_eq!(dst_chain.ids(), ids.to_vec());
    for (s, d) in src_chain.volumes.iter().zip(&dst_chain.volumes) {
        assert_eq!(d.meta.legality, Legality::Illegal, "volume {}", d.id);
        assert_eq!(d.meta.domain, dst.sd());
        assert_eq!(
            (
                d.meta.parent,
                d.meta.capacity,
                d.meta.format,
                d.meta.role,
                d.meta.allocation
            ),
            (
                s.meta.parent,
                s.meta.capacity,
                s.meta.format,
                s.meta.role,
                s.meta.allocation
            )
        );
        let path = dst.volume_path(img, d.id);
        let info = dst.qemu().info(&path, None).unwrap();
        assert_eq!(info.virtual_size, s.meta.capacity);
        assert_eq!(
            info.backing_filename.as_deref(),
            s.meta.parent().map(|p| p.to_string()).as_deref(),
            "backing of {}",
            d.id
        );
        let data: u64 = dst
            .qemu()
            .map(&path, None)
            .unwrap()
            .iter()
            .filter(|e| e.depth == 0 && e.data)
            .map(|e| e.length)
            .sum();
        assert_eq!(data, 0, "volume {} holds data", d.id);
    }
    // Made legal (as a data sync does at its end), it is a clean chain.
    for v in &ids {
        dst.set_legality(img, *v, Legality::Legal).unwrap();
    }
    assert_clean(&dst);
    // Twice: refused, nothing changed.
    let before = tree(dst.root());
    assert!(matches!(
        f.dom.copy_image(img, &dst, img, CopyMode::Structure, &mut |_| {}),
        Err(StorageError::ImageExists { .. })
    ));
    assert_eq!(tree(dst.root()), before);
}

/// The bytes of data volume `vol` holds itself (not from its backing).
fn own_data(dom: &FileStorageDomain, img: ImgUuid, vol: VolUuid) -> u64 {
    dom.qemu()
        .map(&dom.volume_path(img, vol), None)
        .unwrap()
        .iter()
        .filter(|e| e.depth == 0 && e.data)
        .map(|e| e.length)
        .sum()
}

/// `syncImageData` after `cloneImageStructure`: INTERNAL fills every volume but the leaf (a
/// running VM mirrors that one) and makes them LEGAL; ALL does the rest, after which the copy
/// shows what the source shows. A sync that fails leaves its volumes empty and ILLEGAL; one
/// with no structure to fill is refused and changes nothing.
#[test]
fn sync_data_fills_a_cloned_structure() {
    let f = Fixture::new();
    let dst = f.second();
    let (img, ids) = three_deep(&f, VolFormat::Cow);
    let reference = f.scratch("ref");
    flatten(&f.dom, img, &reference);
    let before = tree(dst.root());
    assert!(matches!(
        f.dom.sync_image_data(img, &dst, SyncType::Internal, &mut |_| {}),
        Err(StorageError::NoImage { .. })
    ));
    assert_eq!(tree(dst.root()), before, "a refused sync changes nothing");
    f.dom
        .copy_image(img, &dst, img, CopyMode::Structure, &mut |_| {})
        .unwrap();

    // The second volume's copy fails: the first one's is undone.
    dst.set_failpoint(Some(Failpoint {
        verb: None,
        step: 1,
        mode: FailMode::Error,
    }));
    let err = f
        .dom
        .sync_image_data(img, &dst, SyncType::Internal, &mut |_| {})
        .unwrap_err();
    assert!(format!("{err:?}").contains("Injected"), "{err:?}");
    dst.set_failpoint(None);
    for v in &ids {
        assert_eq!(dst.read_meta(img, *v).unwrap().legality, Legality::Illegal);
        assert_eq!(
            own_data(&dst, img, *v),
            0,
            "volume {v} holds data after a rollback"
        );
    }

    let mut seen = Vec::new();
    f.dom
        .sync_image_data(img, &dst, SyncType::Internal, &mut |p| seen.push(p))
        .unwrap();
    assert!(seen.last().is_some_and(|p| *p > 99.0), "progress {seen:?}");
    let leaf = ids[3];
    for v in &ids[..3] {
        assert_eq!(dst.read_meta(img, *v).unwrap().legality, Legality::Legal);
        // Each synced volume shows what its source shows, with its own data on its own.
        let (a, b) = (f.scratch("a"), f.scratch("b"));
        flatten_file(&f.dom.volume_path(img, *v), ImageFormat::Qcow2, &a);
        flatten_file(&dst.volume_path(img, *v), ImageFormat::Qcow2, &b);
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "volume {v}"
        );
        assert_eq!(own_data(&dst, img, *v), own_data(&f.dom, img, *v), "volume {v}");
    }
    assert_eq!(dst.read_meta(img, leaf).unwrap().legality, Legality::Illegal);
    assert_eq!(
        own_data(&dst, img, leaf),
        0,
        "the leaf is left to the VM's mirror"
    );
    // Again: nothing left to do.
    let synced = tree(dst.root());
    f.dom
        .sync_image_data(img, &dst, SyncType::Internal, &mut |_| {})
        .unwrap();
    assert_eq!(tree(dst.root()), synced);

    f.dom
        .sync_image_data(img, &dst, SyncType::All, &mut |_| {})
        .unwrap();
    assert_eq!(dst.read_meta(img, leaf).unwrap().legality, Legality::Legal);
    assert_content(&dst, img, &reference);
    assert_clean(&dst);
    assert_clean(&f.dom);
}

#[test]
fn copy_chain_and_collapsed_between_domains_then_move() {
    let f = Fixture::new();
    let dst = f.second();
    let (img, ids) = three_deep(&f, VolFormat::Cow);
    let reference = f.scratch("ref");
    flatten(&f.dom, img, &reference);

    let mut seen = Vec::new();
    f.dom
        .copy_image(img, &dst, img, CopyMode::Chain, &mut |p| seen.push(p))
        .unwrap();
    assert_eq!(dst.chain(img).unwrap().ids(), ids.to_vec());
    assert!(seen.last().copied().unwrap_or(0.0) > 99.0, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress is monotonic: {seen:?}"
    );
    assert_content(&dst, img, &reference);
    for v in dst.chain(img).unwrap().volumes {
        assert_eq!(v.meta.domain, dst.sd());
        // Layer by layer: only the top layer's clusters are copied into each volume.
        let map = dst.qemu().map(&dst.volume_path(img, v.id), None).unwrap();
        let own: u64 = map
            .iter()
            .filter(|e| e.depth == 0 && e.data)
            .map(|e| e.length)
            .sum();
        assert!(own <= 4 * MIB, "volume {} holds {own} bytes of its own", v.id);
    }
    assert_clean(&dst);

    let (cimg, cvol) = (ImgUuid::new_random(), VolUuid::new_random());
    f.dom
        .copy_image(
            img,
            &dst,
            cimg,
            CopyMode::Collapsed {
                vol: cvol,
                format: VolFormat::Raw,
                allocation: Allocation::Sparse,
                top: None,
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(dst.chain(cimg).unwrap().ids(), vec![cvol]);
    assert_content(&dst, cimg, &reference);
    assert_clean(&dst);

    // Collapsed up to a snapshot's volume: what the image held when it was the leaf, without
    // the layers written since (a clone from a snapshot).
    let at_snapshot = f.scratch("at-snapshot");
    flatten_file(&f.dom.volume_path(img, ids[1]), ImageFormat::Qcow2, &at_snapshot);
    let differs = oxvirt_qemu::img::QemuImg::locate()
        .unwrap()
        .compare(&at_snapshot, &reference, false)
        .unwrap();
    assert_ne!(
        differs,
        Comparison::Identical,
        "the layers above hold data of their own"
    );
    let (simg, svol) = (ImgUuid::new_random(), VolUuid::new_random());
    let upto = |top| CopyMode::Collapsed {
        vol: svol,
        format: VolFormat::Cow,
        allocation: Allocation::Sparse,
        top: Some(top),
    };
    f.dom
        .copy_image(img, &dst, simg, upto(ids[1]), &mut |_| {})
        .unwrap();
    assert_eq!(dst.chain(simg).unwrap().ids(), vec![svol]);
    assert_content(&dst, simg, &at_snapshot);
    assert_clean(&dst);
    // A top outside the image: refused, nothing made.
    let before = tree(dst.root());
    let stray = VolUuid::new_random();
    assert!(matches!(
        f.dom.copy_image(img, &dst, ImgUuid::new_random(), upto(stray), &mut |_| {}),
        Err(StorageError::NoVolume { vol, .. }) if vol == stray
    ));
    assert_eq!(tree(dst.root()), before);

    // Same id again: refused, nothing changed.
    let before = tree(dst.root());
    assert!(matches!(
        f.dom.copy_image(img, &dst, img, CopyMode::Chain, &mut |_| {}),
        Err(StorageError::ImageExists { .. })
    ));
    assert_eq!(tree(dst.root()), before);

    // Move to a third domain: the source image is gone afterwards.
    let third = f.second();
    f.dom.move_image(img, &third, &mut |_| {}).unwrap();
    assert!(!f.dom.image_exists(img));
    assert_content(&third, img, &reference);
    assert_clean(&f.dom);
    assert_clean(&third);
}

#[test]
fn template_clones_copy_after_their_template() {
    let f = Fixture::new();
    let dst = f.second();
    let (timg, tvol, img, vol) = (
        ImgUuid::new_random(),
        VolUuid::new_random(),
        ImgUuid::new_random(),
        VolUuid::new_random(),
    );
    f.dom
        .create_volume(timg, tvol, &spec(VolFormat::Cow, Allocation::Sparse))
        .unwrap();
    write(&f.dom, timg, 0x44, 0, 2);
    f.dom.make_template(timg, tvol).unwrap();
    f.dom.clone_from_template(timg, tvol, img, vol, "").unwrap();
    write(&f.dom, img, 0x55, 1, 2);
    let reference = f.scratch("ref");
    flatten(&f.dom, img, &reference);

    assert!(
        f.dom
            .copy_image(img, &dst, img, CopyMode::Chain, &mut |_| {})
            .is_err(),
        "template first"
    );
    assert!(!dst.image_exists(img));
    f.dom
        .copy_image(timg, &dst, timg, CopyMode::Chain, &mut |_| {})
        .unwrap();
    f.dom
        .copy_image(img, &dst, img, CopyMode::Chain, &mut |_| {})
        .unwrap();
    assert_eq!(dst.chain(img).unwrap().template().unwrap().id, tvol);
    assert_content(&dst, img, &reference);
    assert_clean(&dst);
    let leaf = dst.chain_paths(img).unwrap().pop().unwrap();
    assert!(matches!(
        dst.qemu().compare(&leaf, &reference, false).unwrap(),
        Comparison::Identical
    ));
}

#[test]
fn preallocated_volumes_are_allocated() {
    let f = Fixture::new();
    for format in [VolFormat::Raw, VolFormat::Cow] {
        let (img, vol) = (ImgUuid::new_random(), VolUuid::new_random());
        f.dom
            .create_volume(img, vol, &spec(format, Allocation::Preallocated))
            .unwrap();
        let info = f.dom.volume_info(img, vol).unwrap();
        assert!(
            info.true_size >= 16 * MIB,
            "{format}: {} allocated",
            info.true_size
        );
        let sparse = ImgUuid::new_random();
        f.dom
            .create_volume(sparse, VolUuid::new_random(), &spec(format, Allocation::Sparse))
            .unwrap();
        let s = f
            .dom
            .volume_info(sparse, f.dom.chain(sparse).unwrap().leaf().id)
            .unwrap();
        assert!(
            s.true_size < 4 * MIB,
            "{format}: sparse has {} allocated",
            s.true_size
        );
    }
    assert_clean(&f.dom);
}

#[test]
fn a_thin_volume_gets_its_initial_size_and_bad_ones_change_nothing() {
    let f = Fixture::new();
    let (img, vol) = (ImgUuid::new_random(), VolUuid::new_random());
    let mut s = spec(VolFormat::Cow, Allocation::Sparse);
    s.initial_size = Some(4 * MIB);
    f.dom.create_volume(img, vol, &s).unwrap();
    let path = f.dom.volume_path(img, vol);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * MIB);
    let info = f.dom.volume_info(img, vol).unwrap();
    assert!(
        info.true_size < MIB,
        "the cap is a hole: {} allocated",
        info.true_size
    );
    // The guest can use it (the qcow2 metadata sits at its start).
    write(&f.dom, img, 0x5a, 0, 2);
    assert_clean(&f.dom);

    let before = tree(f.mount());
    let bad = [
        (VolFormat::Raw, Allocation::Sparse, Some(4 * MIB), "SPARSE COW"),
        (
            VolFormat::Cow,
            Allocation::Preallocated,
            Some(4 * MIB),
            "SPARSE COW",
        ),
        (
            VolFormat::Cow,
            Allocation::Sparse,
            Some(4 * MIB + 1),
            "multiple of 512",
        ),
        (VolFormat::Cow, Allocation::Sparse, Some(18 * MIB), "1.1"),
        (VolFormat::Cow, Allocation::Sparse, Some(0), "multiple of 512"),
    ];
    for (format, allocation, initial, want) in bad {
        let mut s = spec(format, allocation);
        s.initial_size = initial;
        let e = f
            .dom
            .create_volume(ImgUuid::new_random(), VolUuid::new_random(), &s)
            .unwrap_err();
        assert!(matches!(e, StorageError::InvalidArgument { .. }), "{e:?}");
        assert!(
            e.to_string().contains(want),
            "{format} {allocation:?} {initial:?}: {e}"
        );
    }
    assert_eq!(tree(f.mount()), before, "a refused create changed the domain");
}

#[test]
fn raw_volume_data_and_descriptions_as_an_ovf_store_uses_them() {
    let f = Fixture::new();
    let (img, vol) = (ImgUuid::new_random(), VolUuid::new_random());
    let mut s = spec(VolFormat::Raw, Allocation::Sparse);
    s.disktype = "OVFS".into();
    f.dom.create_volume(img, vol, &s).unwrap();
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    f.dom
        .write_volume_data(img, vol, 0, &data[..1000], false)
        .unwrap();
    f.dom
        .write_volume_data(img, vol, 1000, &data[1000..], true)
        .unwrap();
    assert_eq!(f.dom.read_volume_data(img, vol, 0, 3000).unwrap(), data);
    // Past what was written, a sparse volume reads zeros; past its capacity, nothing is read.
    assert_eq!(f.dom.read_volume_data(img, vol, 3000, 16).unwrap(), vec![0; 16]);
    let e = f.dom.read_volume_data(img, vol, 16 * MIB - 8, 16).unwrap_err();
    assert!(e.to_string().contains("do not fit"), "{e}");
    let e = f
        .dom
        .write_volume_data(img, vol, 16 * MIB, b"x", true)
        .unwrap_err();
    assert!(e.to_string().contains("do not fit"), "{e}");

    f.dom
        .set_description(img, vol, r#"{"Updated":true,"Size":3000}"#)
        .unwrap();
    assert_eq!(
        f.dom.read_meta(img, vol).unwrap().description,
        r#"{"Updated":true,"Size":3000}"#
    );
    let e = f.dom.set_description(img, vol, &"x".repeat(211)).unwrap_err();
    assert!(matches!(e, StorageError::InvalidArgument { .. }), "{e}");
    let e = f
        .dom
        .set_description(img, vol, "a\nLEGALITY=ILLEGAL")
        .unwrap_err();
    assert!(matches!(e, StorageError::InvalidArgument { .. }), "{e}");
    assert_eq!(
        f.dom.read_meta(img, vol).unwrap().legality,
        Legality::Legal,
        "nothing injected"
    );

    // A qcow2 volume's bytes are not its guest's: refused.
    let (cimg, cvol) = (ImgUuid::new_random(), VolUuid::new_random());
    f.dom
        .create_volume(cimg, cvol, &spec(VolFormat::Cow, Allocation::Sparse))
        .unwrap();
    let e = f.dom.write_volume_data(cimg, cvol, 0, b"x", true).unwrap_err();
    assert!(matches!(e, StorageError::WrongState { .. }), "{e}");
    let report = f.dom.check(true).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}
