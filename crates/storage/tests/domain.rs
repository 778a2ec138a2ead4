//! File storage domains: layout, metadata, open/validate, info, stats, health, bad input.

mod common;

use common::*;
use oxvirt_storage::sdmeta;
use oxvirt_storage::xleases;
use oxvirt_storage::{DomainType, FileStorageDomain, NewDomain, StorageError};
use oxvirt_types::SdUuid;

#[test]
fn created_domain_has_vdsm_v5_layout() {
    let f = Fixture::new();
    let root = f.dom.root().to_path_buf();
    assert_eq!(root, f.mount().join(f.dom.sd().to_string()));
    let md = root.join("dom_md");
    let size = |n: &str| std::fs::metadata(md.join(n)).unwrap().len();
    assert_eq!(size("inbox"), 16 * MIB);
    assert_eq!(size("outbox"), 16 * MIB);
    assert!(size("ids") >= MIB, "ids holds the lockspace");
    assert!(size("leases") >= 2 * MIB, "leases holds SDM at 1 MiB");
    assert!(root.join("images").is_dir());

    let text = std::fs::read_to_string(md.join("metadata")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.last().unwrap().starts_with("_SHA_CKSUM="));
    let keys: Vec<&str> = lines.iter().map(|l| l.split('=').next().unwrap()).collect();
    let mut sorted = keys[..keys.len() - 1].to_vec();
    sorted.sort();
    assert_eq!(&keys[..keys.len() - 1], &sorted[..], "keys are sorted");
    for kv in [
        "VERSION=5",
        "CLASS=Data",
        "ROLE=Regular",
        "TYPE=LOCALFS",
        "BLOCK_SIZE=512",
        "ALIGNMENT=1048576",
        "POOL_UUID=",
    ] {
        assert!(lines.contains(&kv), "{kv} missing from\n{text}");
    }
    assert!(lines.contains(&format!("SDUUID={}", f.dom.sd()).as_str()));

    // The xleases index at 1 MiB, formatted for this lockspace.
    let xl = std::fs::read(md.join("xleases")).unwrap();
    assert_eq!(xl.len() as u64, MIB + xleases::INDEX_SIZE as u64);
    let (imd, records) = xleases::parse_index(&xl[MIB as usize..]).unwrap();
    assert_eq!(imd.lockspace, f.dom.sd().to_string());
    assert!(records.iter().all(|r| r.is_empty()));

    assert_clean(&f.dom);
}

#[test]
fn open_validates_the_checksum() {
    let f = Fixture::new();
    let root = f.dom.root().to_path_buf();
    let reopened = FileStorageDomain::open(&root).unwrap();
    assert_eq!(reopened.metadata(), f.dom.metadata());
    assert_eq!(
        FileStorageDomain::scan(f.mount()).unwrap(),
        vec![(f.dom.sd(), root.clone())]
    );

    let path = root.join("dom_md/metadata");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("DESCRIPTION=test domain", "DESCRIPTION=tampered"),
    )
    .unwrap();
    match FileStorageDomain::open(&root) {
        Err(StorageError::DomainMetadata {
            source: sdmeta::MetadataError::ChecksumMismatch { .. },
            ..
        }) => {}
        other => panic!("a broken seal must be an error, got {other:?}"),
    }
    assert!(!f.dom.health().valid, "the monitor sees the broken seal");
    assert!(!f.dom.check(false).unwrap().is_clean());
    std::fs::write(&path, text).unwrap();
    assert!(f.dom.health().valid);
}

#[test]
fn info_stats_and_health() {
    let f = Fixture::new();
    let md = f.dom.metadata();
    assert_eq!(md.description, "test domain");
    assert_eq!(md.domain_type, DomainType::LocalFs);
    assert_eq!(md.remote_path, f.mount().display().to_string());
    let s = f.dom.stats().unwrap();
    assert!(s.disk_total > 0 && s.disk_free <= s.disk_total);
    assert_eq!((s.images, s.volumes), (0, 0));
    let h = f.dom.health();
    assert!(h.valid, "{h:?}");
    assert!(h.read_delay < std::time::Duration::from_secs(5));
}

#[test]
fn bad_domain_input_is_rejected_and_changes_nothing() {
    let f = Fixture::new();
    let before = tree(f.mount());
    let req = |desc: &str, sd: SdUuid| NewDomain {
        sd,
        description: desc.into(),
        domain_type: DomainType::Nfs,
        remote_path: Some("server:/export".into()),
    };
    assert!(matches!(
        FileStorageDomain::create(f.mount(), &req("again", f.dom.sd())),
        Err(StorageError::DomainExists(_))
    ));
    assert!(FileStorageDomain::create(f.mount(), &req("line\nbreak", SdUuid::new_random())).is_err());
    assert!(FileStorageDomain::create(f.mount(), &req(&"x".repeat(51), SdUuid::new_random())).is_err());
    let mut block = req("block", SdUuid::new_random());
    block.domain_type = DomainType::Iscsi;
    assert!(FileStorageDomain::create(f.mount(), &block).is_err());
    assert!(FileStorageDomain::create(&f.mount().join("missing"), &req("x", SdUuid::new_random())).is_err());
    assert_eq!(tree(f.mount()), before, "failed creations leave nothing behind");
    assert!(matches!(
        FileStorageDomain::open(&f.mount().join("nothing")),
        Err(StorageError::NoDomain(_))
    ));
}

#[test]
fn leases_are_sanlock_areas_and_the_checker_verifies_them() {
    use oxvirt_storage::{Allocation, VolFormat, VolumeSpec};
    use oxvirt_types::{ImgUuid, VolUuid};
    let f = Fixture::new();
    let sd = f.dom.sd().to_string();
    let md = f.dom.root().join("dom_md");
    let ls = oxvirt_lease::direct::read_delta_leader(&md.join("ids"), 0, &sd, 1).unwrap();
    assert_eq!(ls.io_timeout, 10);
    oxvirt_lease::direct::read_paxos_leader(&md.join("leases"), MIB, &sd, "SDM").unwrap();
    let (img, vol) = (ImgUuid::new_random(), VolUuid::new_random());
    f.dom
        .create_volume(
            img,
            vol,
            &VolumeSpec::new(MIB, VolFormat::Raw, Allocation::Sparse),
        )
        .unwrap();
    let lease = f.dom.lease_path(img, vol);
    oxvirt_lease::direct::read_paxos_leader(&lease, 0, &sd, &vol.to_string()).unwrap();
    assert_clean(&f.dom);
    // A lease area written for another name is caught.
    oxvirt_lease::direct::init_resource(&lease, 0, &sd, "someone-else").unwrap();
    let report = f.dom.check(false).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].volume, Some(vol));
}
