//! Importing a data domain that exists on storage, and registering its disks, with real
//! processes: an in-process engine and an `oxvirt node`. The domain is made beforehand as
//! another setup would have left it (detached: no pool), holding a disk of two volumes named
//! the way oVirt names disks, a memory volume and a thin clone of a template image. The import
//! finds it under the path and keeps storage's name; attached and active, it offers the one
//! disk that can be registered (not the memory volume, not the template or its clone);
//! registered, the disk reads back the data of both its volumes. Refused, and nothing changed:
//! importing it twice, registering twice, a disk that is not there, a path with no domain.

use crate::common;
use crate::transfers::{engine_cfg, login_with_dc1_and_cl1, oxvirt};

use common::free_port;
use oxvirt_engine::daemon::Engine;
use oxvirt_storage::{Allocation, DomainType, FileStorageDomain, NewDomain, VolFormat, VolumeSpec};
use oxvirt_types::{ImgUuid, SdUuid, VolUuid};

const MIB: u64 = 1 << 20;

fn qemu_io_write(path: &std::path::Path, fmt: &str, pattern: u8, off_mib: u64) {
    let out = std::process::Command::new(oxvirt_testkit::require_tool("qemu-io"))
        .args(["-f", fmt, "-c", &format!("write -P {pattern:#x} {off_mib}M 1M")])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_domain_is_imported_and_its_disks_registered() {
    let engine_dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let storage = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let node = tempfile::tempdir().unwrap();
    let w = work.path();

    // The domain another setup left: a disk (base with 'A' at 0, a snapshot layer with 'B' at
    // 1 MiB), a memory volume, a template image and its thin clone.
    let sd = SdUuid::new_random();
    let dom = FileStorageDomain::create(
        storage.path(),
        &NewDomain {
            sd,
            description: "from-ovirt-data".into(),
            domain_type: DomainType::LocalFs,
            remote_path: None,
        },
    )
    .unwrap();
    let (disk, base, top) = (
        ImgUuid::new_random(),
        VolUuid::new_random(),
        VolUuid::new_random(),
    );
    let mut spec = VolumeSpec::new(16 * MIB, VolFormat::Cow, Allocation::Sparse);
    spec.description = r#"{"DiskAlias":"web1_Disk1","DiskDescription":"root"}"#.into();
    dom.create_volume(disk, base, &spec).unwrap();
    qemu_io_write(&dom.volume_path(disk, base), "qcow2", 0x41, 0);
    dom.create_snapshot(disk, top, None, "snap").unwrap();
    qemu_io_write(&dom.volume_path(disk, top), "qcow2", 0x42, 1);
    let mut mem = VolumeSpec::new(8 * MIB, VolFormat::Raw, Allocation::Sparse);
    mem.disktype = "MEMD".into();
    dom.create_volume(ImgUuid::new_random(), VolUuid::new_random(), &mem)
        .unwrap();
    let (timg, tvol) = (ImgUuid::new_random(), VolUuid::new_random());
    dom.create_volume(
        timg,
        tvol,
        &VolumeSpec::new(8 * MIB, VolFormat::Cow, Allocation::Sparse),
    )
    .unwrap();
    dom.make_template(timg, tvol).unwrap();
    let clone = ImgUuid::new_random();
    dom.clone_from_template(timg, tvol, clone, VolUuid::new_random(), "")
        .unwrap();
    drop(dom);

    let engine = Engine::start(engine_cfg(engine_dir.path()), Some(oxvirt_engine::rest::routes()))
        .await
        .unwrap();
    let addr = free_port();
    let _node = common::spawn_node(
        "node1",
        node.path(),
        addr,
        &[
            "--engine",
            &engine.addr.to_string(),
            "--ca-fingerprint",
            &engine.ca_fingerprint(),
        ],
    );
    let _reaper = common::QemuReaper(vec![node.path().join("run")]);
    login_with_dc1_and_cl1(w, engine_dir.path(), &engine).await;
    oxvirt(
        w,
        &[
            "host",
            "create",
            "node1",
            "--address",
            &addr.to_string(),
            "--cluster",
            "cl1",
        ],
        true,
    )
    .await;

    // No domain there: a clear error, nothing recorded.
    let ep = empty.path().to_str().unwrap();
    let (o, e) = oxvirt(w, &["sd", "import", "--host", "node1", "--path", ep], false).await;
    assert!(format!("{o}{e}").contains("no storage domain under"), "{o}{e}");
    let sp = storage.path().to_str().unwrap();
    let (out, _) = oxvirt(
        w,
        &[
            "sd", "import", "--host", "node1", "--path", sp, "--dc", "dc1", "-o", "json",
        ],
        true,
    )
    .await;
    let imported: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(imported["id"], sd.to_string());
    assert_eq!(imported["name"], "from-ovirt-data", "storage's name is kept");
    // Twice: refused.
    let (o, e) = oxvirt(w, &["sd", "import", "--host", "node1", "--path", sp], false).await;
    assert!(format!("{o}{e}").contains("known already"), "{o}{e}");

    let (out, _) = oxvirt(w, &["sd", "unregistered", "from-ovirt-data", "-o", "json"], true).await;
    let found: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let found = found.as_array().unwrap_or_else(|| panic!("{out}"));
    let ids: Vec<&str> = found.iter().filter_map(|d| d["id"].as_str()).collect();
    assert_eq!(ids, [disk.to_string()], "only the disk: {out}");
    assert_eq!(found[0]["name"], "web1_Disk1");
    assert_eq!(found[0]["provisioned_size"], (16 * MIB).to_string(), "{out}");

    let (out, _) = oxvirt(
        w,
        &[
            "sd",
            "register",
            "from-ovirt-data",
            &disk.to_string(),
            "-o",
            "json",
        ],
        true,
    )
    .await;
    let reg: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        (reg["name"].as_str(), reg["status"].as_str()),
        (Some("web1_Disk1"), Some("ok"))
    );
    let chain = engine
        .cmds
        .app
        .db
        .volume_chain(disk.to_string().parse().unwrap())
        .await
        .unwrap();
    let vols: Vec<String> = chain.iter().map(|v| v.id.to_string()).collect();
    assert_eq!(vols, [base.to_string(), top.to_string()]);
    // Again, or one that is not there: refused.
    let (o, e) = oxvirt(
        w,
        &["sd", "register", "from-ovirt-data", &disk.to_string()],
        false,
    )
    .await;
    assert!(format!("{o}{e}").contains("registered already"), "{o}{e}");
    let stray = ImgUuid::new_random().to_string();
    let (o, e) = oxvirt(w, &["sd", "register", "from-ovirt-data", &stray], false).await;
    assert!(format!("{o}{e}").contains("not found"), "{o}{e}");
    let (out, _) = oxvirt(w, &["sd", "unregistered", "from-ovirt-data", "-o", "json"], true).await;
    assert_eq!(out.trim(), "[]", "nothing left to register");

    // The registered disk reads back both layers.
    let raw = w.join("web1.raw");
    oxvirt(
        w,
        &[
            "disk",
            "download",
            "web1_Disk1",
            raw.to_str().unwrap(),
            "--format",
            "raw",
        ],
        true,
    )
    .await;
    let data = std::fs::read(&raw).unwrap();
    assert_eq!(data.len() as u64, 16 * MIB);
    assert!(data[..MIB as usize].iter().all(|b| *b == 0x41), "the base's data");
    assert!(
        data[MIB as usize..2 * MIB as usize].iter().all(|b| *b == 0x42),
        "the snapshot layer's data"
    );
    assert!(data[2 * MIB as usize..].iter().all(|b| *b == 0));
    engine.shutdown().await;
}
