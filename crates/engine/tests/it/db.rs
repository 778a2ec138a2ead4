//! The database layer and the model's repositories, on SQLite and PostgreSQL.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{Backend, TestDb};
use oxvirt_engine::db::{
    ClusterFilter, DbError, DiskFilter, EventFilter, EventSort, HostFilter, JobFilter, ListQuery, Ref,
    SdFilter, SortDir, TemplateFilter, TextMatch, VmFilter, VmSort, SCHEMA_VERSION,
};
use oxvirt_engine::model::*;
use oxvirt_engine::time::{ManualClock, Timestamp};
use oxvirt_engine::Db;

/// A data center with a cluster, two hosts and an attached data domain.
struct World {
    dc: DataCenter,
    cluster: Cluster,
    hosts: Vec<Host>,
    sd: StorageDomain,
}

async fn world(db: &Db, tag: &str) -> World {
    let dc = db
        .dc_insert(&DataCenter::new(&format!("dc-{tag}")))
        .await
        .unwrap();
    let cluster = db
        .cluster_insert(&Cluster::new(&format!("cl-{tag}"), dc.id))
        .await
        .unwrap();
    let mut hosts = Vec::new();
    for i in 0..2 {
        let h = Host::new(
            &format!("host-{tag}-{i}"),
            "127.0.0.1",
            54321 + i as u16 + tag.len() as u16 * 10,
            cluster.id,
        );
        hosts.push(db.host_insert(&h).await.unwrap());
    }
    let sd = db
        .sd_insert(&StorageDomain::new(
            &format!("sd-{tag}"),
            SdType::Data,
            StorageType::Localfs,
            &format!("/srv/{tag}"),
        ))
        .await
        .unwrap();
    db.pool_attach(&PoolMember {
        data_center_id: dc.id,
        storage_domain_id: sd.id,
        status: SdStatus::Active,
        master: true,
    })
    .await
    .unwrap();
    World {
        dc,
        cluster,
        hosts,
        sd,
    }
}

async fn migrations_are_idempotent_and_checked(b: Backend) {
    let mut t = TestDb::new(b).await;
    assert_eq!(t.db.schema_version().await.unwrap(), SCHEMA_VERSION);
    let blank =
        t.db.template_get(BLANK_TEMPLATE_ID)
            .await
            .unwrap()
            .expect("Blank template");
    assert_eq!(blank.name, "Blank");
    // Reopening applies nothing twice and keeps the data.
    t.db.dc_insert(&DataCenter::new("kept")).await.unwrap();
    t.reopen().await;
    assert_eq!(t.db.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert!(t.db.dc_get_by_name("kept").await.unwrap().is_some());
    assert_eq!(
        t.db.template_list(&ListQuery::filtered(TemplateFilter {
            name: Some("Blank".into()),
            ..Default::default()
        }))
        .await
        .unwrap()
        .len(),
        1
    );

    // An applied migration edited afterwards is refused.
    sqlx_exec_url(
        &t.url,
        "UPDATE oxvirt_schema_migrations SET checksum = 'x' WHERE version = 1",
    )
    .await;
    t.db.close().await;
    let err = Db::connect(&t.url).await.unwrap_err();
    assert!(
        matches!(err, DbError::MigrationChanged { version: 1, .. }),
        "{err}"
    );
    sqlx_exec_url(
        &t.url,
        &format!(
            "UPDATE oxvirt_schema_migrations SET checksum = '{}' WHERE version = 1",
            sha256_hex(oxvirt_engine::db::MIGRATIONS[0].sql)
        ),
    )
    .await;
    // A database from a newer engine is refused.
    sqlx_exec_url(&t.url, "INSERT INTO oxvirt_schema_migrations (version, name, checksum, applied_at) VALUES (999, 'future', 'x', 0)").await;
    let err = Db::connect(&t.url).await.unwrap_err();
    assert!(matches!(err, DbError::SchemaTooNew { found: 999, .. }), "{err}");
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn sqlx_exec_url(url: &str, sql: &str) {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(url).await.unwrap();
    sqlx::query(sql).execute(&mut c).await.unwrap();
    c.close().await.unwrap();
}

async fn sqlite_file_is_wal_with_foreign_keys(b: Backend) {
    let t = TestDb::new(b).await;
    if b == Backend::Sqlite {
        use sqlx::Connection;
        let mut c = sqlx::AnyConnection::connect(&t.url).await.unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        assert!(t.dir.path().join("engine.db").is_file());
    }
    // Foreign keys hold on both backends.
    let err =
        t.db.cluster_insert(&Cluster::new("orphan", DcId::new_random()))
            .await
            .unwrap_err();
    assert!(matches!(err, DbError::MissingReference { .. }), "{err}");
    // Bad input changes nothing.
    let err = t.db.dc_insert(&DataCenter::new("bad/name")).await.unwrap_err();
    assert!(matches!(err, DbError::Invalid { .. }), "{err}");
    assert!(t.db.dc_list(&ListQuery::new()).await.unwrap().is_empty());
}

async fn infrastructure_crud(b: Backend) {
    let t = TestDb::new(b).await;
    let db = &t.db;
    let w = world(db, "a").await;
    // Names are unique.
    let err = db.dc_insert(&DataCenter::new("dc-a")).await.unwrap_err();
    assert!(err.is_already_exists(), "{err}");
    // Optimistic concurrency on configuration.
    let mut dc1 = db.dc_get(w.dc.id).await.unwrap().unwrap();
    let mut dc2 = dc1.clone();
    dc1.description = "first".into();
    let dc1 = db.dc_update(&dc1).await.unwrap();
    assert_eq!(dc1.revision, w.dc.revision + 1);
    dc2.description = "second".into();
    let err = db.dc_update(&dc2).await.unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err}");
    assert_eq!(db.dc_get(w.dc.id).await.unwrap().unwrap().description, "first");
    // Run-time status does not bump the revision.
    db.dc_set_status(w.dc.id, DcStatus::Up).await.unwrap();
    let now = db.dc_get(w.dc.id).await.unwrap().unwrap();
    assert_eq!((now.status, now.revision), (DcStatus::Up, dc1.revision));

    // Cluster filters.
    let cl = db
        .cluster_list(&ListQuery::filtered(ClusterFilter {
            data_center: Some(Ref::name("dc-a")),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(cl.iter().map(|c| c.id).collect::<Vec<_>>(), vec![w.cluster.id]);
    let mut c2 = cl[0].clone();
    c2.memory_overcommit_percent = 150;
    c2.scheduling_policy = SchedulingPolicy::EvenlyDistributed;
    c2.scheduling_properties = [("HighUtilization".to_string(), "60".to_string())].into();
    let c2 = db.cluster_update(&c2).await.unwrap();
    assert_eq!(c2.memory_overcommit_percent, 150);
    let again = db.cluster_get(c2.id).await.unwrap().unwrap();
    assert_eq!(again.scheduling_properties["HighUtilization"], "60");

    // Host status compare-and-set with a reason.
    let h = &w.hosts[0];
    assert_eq!(
        db.host_set_status(h.id, &[HostStatus::Installing], HostStatus::Up, None)
            .await
            .unwrap(),
        HostStatus::Installing
    );
    let err = db
        .host_set_status(h.id, &[HostStatus::Installing], HostStatus::Up, None)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err}");
    db.host_set_status(
        h.id,
        &[],
        HostStatus::NonOperational,
        Some("storage domain sd-a unreachable"),
    )
    .await
    .unwrap();
    let h1 = db.host_get(h.id).await.unwrap().unwrap();
    assert_eq!(h1.status, HostStatus::NonOperational);
    assert_eq!(
        h1.status_detail.as_deref(),
        Some("storage domain sd-a unreachable")
    );
    db.host_update_stats(
        h.id,
        &HostStats {
            cpu_cores: Some(4),
            memory_bytes: Some(8 << 30),
            free_memory_bytes: Some(6 << 30),
        },
    )
    .await
    .unwrap();
    let h1 = db.host_get(h.id).await.unwrap().unwrap();
    assert_eq!(h1.free_memory_bytes, Some(6 << 30));
    assert!(h1.last_seen_at.is_some());
    let found = db
        .host_list(&ListQuery::filtered(HostFilter {
            status: vec![HostStatus::NonOperational],
            data_center: Some(Ref::Id(w.dc.id)),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(db.host_count(&HostFilter::default()).await.unwrap(), 2);

    // The SPM role: one holder per data center, shown on the host.
    db.dc_spm_contend(w.dc.id, w.hosts[0].id).await.unwrap();
    let err = db.dc_spm_contend(w.dc.id, w.hosts[1].id).await.unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err}");
    db.dc_spm_won(w.dc.id, w.hosts[0].id, 7).await.unwrap();
    assert_eq!(
        db.host_get(w.hosts[0].id).await.unwrap().unwrap().spm_status,
        SpmStatus::Spm
    );
    assert_eq!(
        db.host_get(w.hosts[1].id).await.unwrap().unwrap().spm_status,
        SpmStatus::None
    );
    let err = db.host_delete(w.hosts[0].id).await.unwrap_err();
    assert!(matches!(err, DbError::InUse { .. }), "{err}");
    assert!(db.dc_spm_clear(w.dc.id, w.hosts[0].id).await.unwrap());
    assert!(!db.dc_spm_clear(w.dc.id, w.hosts[0].id).await.unwrap());
    assert_eq!(db.dc_get(w.dc.id).await.unwrap().unwrap().spm_lver, None);

    // Master version compare-and-set.
    db.dc_set_master_version(w.dc.id, 0, 1).await.unwrap();
    assert!(matches!(
        db.dc_set_master_version(w.dc.id, 0, 2).await.unwrap_err(),
        DbError::Conflict { .. }
    ));

    // Deleting what others refer to is refused.
    let err = db.dc_delete(w.dc.id).await.unwrap_err();
    assert!(matches!(err, DbError::InUse { .. }), "{err}");
    let err = db.cluster_delete(w.cluster.id).await.unwrap_err();
    assert!(matches!(err, DbError::InUse { .. }), "{err}");
}

async fn storage_pool_membership(b: Backend) {
    let t = TestDb::new(b).await;
    let db = &t.db;
    let w = world(db, "s").await;
    let dc2 = db.dc_insert(&DataCenter::new("dc-other")).await.unwrap();
    // A data domain belongs to one pool.
    let err = db
        .pool_attach(&PoolMember {
            data_center_id: dc2.id,
            storage_domain_id: w.sd.id,
            status: SdStatus::Maintenance,
            master: false,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::InUse { .. }), "{err}");
    // One master per pool, moved atomically.
    let sd2 = db
        .sd_insert(&StorageDomain::new(
            "sd-two",
            SdType::Data,
            StorageType::Posixfs,
            "/srv/two",
        ))
        .await
        .unwrap();
    let err = db
        .pool_attach(&PoolMember {
            data_center_id: w.dc.id,
            storage_domain_id: sd2.id,
            status: SdStatus::Maintenance,
            master: true,
        })
        .await
        .unwrap_err();
    assert!(err.is_already_exists(), "second master: {err}");
    db.pool_attach(&PoolMember {
        data_center_id: w.dc.id,
        storage_domain_id: sd2.id,
        status: SdStatus::Maintenance,
        master: false,
    })
    .await
    .unwrap();
    db.pool_set_master(w.dc.id, sd2.id).await.unwrap();
    assert_eq!(db.pool_master(w.dc.id).await.unwrap(), Some(sd2.id));
    let members = db.pool_members(w.dc.id).await.unwrap();
    assert_eq!(members.len(), 2);
    assert!(members[0].master && members[0].storage_domain_id == sd2.id);
    // Status compare-and-set in the pool.
    db.pool_set_status(w.dc.id, sd2.id, &[SdStatus::Maintenance], SdStatus::Activating)
        .await
        .unwrap();
    assert!(matches!(
        db.pool_set_status(w.dc.id, sd2.id, &[SdStatus::Maintenance], SdStatus::Active)
            .await
            .unwrap_err(),
        DbError::Conflict { .. }
    ));
    // Filters by data center and status, unattached included.
    let nfs = {
        let mut s = StorageDomain::new("sd-nfs", SdType::Iso, StorageType::Nfs, "/export/iso");
        s.address = Some("nfs.example".into());
        db.sd_insert(&s).await.unwrap()
    };
    let mut bad = StorageDomain::new("sd-nfs-bad", SdType::Data, StorageType::Nfs, "/x");
    bad.address = None;
    assert!(matches!(
        db.sd_insert(&bad).await.unwrap_err(),
        DbError::Invalid { .. }
    ));
    let unattached = db
        .sd_list(&ListQuery::filtered(SdFilter {
            status: vec![SdStatus::Unattached],
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(unattached.iter().map(|s| s.id).collect::<Vec<_>>(), vec![nfs.id]);
    let in_dc = db
        .sd_list(
            &ListQuery::filtered(SdFilter {
                data_center: Some(Ref::name("dc-s")),
                ..Default::default()
            })
            .sort_by(oxvirt_engine::db::SdSort::Name, SortDir::Asc),
        )
        .await
        .unwrap();
    assert_eq!(
        in_dc.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        vec!["sd-s", "sd-two"]
    );
    let active_or_unattached = db
        .sd_count(&SdFilter {
            status: vec![SdStatus::Active, SdStatus::Unattached],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(active_or_unattached, 2);
    db.sd_set_space(w.sd.id, 100 << 30, 40 << 30).await.unwrap();
    assert_eq!(
        db.sd_get(w.sd.id).await.unwrap().unwrap().free_bytes,
        Some(40 << 30)
    );
    assert!(db.pool_detach(dc2.id, w.sd.id).await.is_ok_and(|x| !x));
    let err = db.sd_delete(w.sd.id).await.unwrap_err();
    assert!(matches!(err, DbError::InUse { .. }), "{err}");
}

async fn disks_volumes_and_locking(b: Backend) {
    let t = TestDb::new(b).await;
    let db = &t.db;
    let w = world(db, "d").await;
    let err = db
        .disk_insert(&{
            let mut d = Disk::new("prealloc-cow", w.sd.id, DiskFormat::Cow, 1 << 30);
            d.sparse = false;
            d
        })
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Invalid { .. }), "{err}");
    let disk = db
        .disk_insert(&Disk::new("d1", w.sd.id, DiskFormat::Cow, 1 << 30))
        .await
        .unwrap();
    let base = Volume {
        id: VolUuid::new_random(),
        disk_id: disk.id,
        storage_domain_id: w.sd.id,
        parent_id: None,
        voltype: VolType::Internal,
        format: DiskFormat::Cow,
        actual_size: 0,
        created_at: Timestamp::from_millis(0),
    };
    db.volume_insert(&base).await.unwrap();
    let leaf = Volume {
        id: VolUuid::new_random(),
        parent_id: Some(base.id),
        voltype: VolType::Leaf,
        ..base.clone()
    };
    db.volume_insert(&leaf).await.unwrap();
    let chain = db.volume_chain(disk.id).await.unwrap();
    assert_eq!(
        chain.iter().map(|v| v.id).collect::<Vec<_>>(),
        vec![base.id, leaf.id]
    );
    // A parent cannot go while a child needs it.
    let err = db.volume_delete(base.id).await.unwrap_err();
    assert!(matches!(err, DbError::InUse { .. }), "{err}");

    // Exactly one of many concurrent lockers wins.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let db = db.clone();
        let (id, owner) = (disk.id, SagaId::new_random());
        tasks.push(tokio::spawn(async move {
            db.disk_lock(id, owner).await.map(|()| owner)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(owner) => winners.push(owner),
            Err(DbError::Conflict { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(winners.len(), 1);
    let owner = winners[0];
    let d = db.disk_get(disk.id).await.unwrap().unwrap();
    assert_eq!((d.status, d.locked_by), (DiskStatus::Locked, Some(owner)));
    // The owner may lock again (a retried step); nobody else may unlock.
    db.disk_lock(disk.id, owner).await.unwrap();
    let other = SagaId::new_random();
    assert!(!db.disk_unlock(disk.id, other, DiskStatus::Ok).await.unwrap());
    assert_eq!(
        db.disk_get(disk.id).await.unwrap().unwrap().locked_by,
        Some(owner)
    );
    assert!(db.disk_unlock(disk.id, owner, DiskStatus::Ok).await.unwrap());
    assert!(!db.disk_unlock(disk.id, owner, DiskStatus::Ok).await.unwrap());
    let d = db.disk_get(disk.id).await.unwrap().unwrap();
    assert_eq!((d.status, d.locked_by), (DiskStatus::Ok, None));

    // Deleting the disk takes its volumes.
    db.disk_delete(disk.id).await.unwrap();
    assert!(db.volume_get(leaf.id).await.unwrap().is_none());
    assert!(matches!(
        db.disk_delete(disk.id).await.unwrap_err(),
        DbError::NotFound { .. }
    ));
}

async fn vms_attachments_nics_snapshots(b: Backend) {
    let t = TestDb::new(b).await;
    let db = &t.db;
    let w = world(db, "v").await;
    let mut vm = Vm::new("web1", w.cluster.id);
    vm.ha = HighAvailability {
        enabled: true,
        priority: 50,
    };
    vm.placement = Placement {
        affinity: PlacementAffinity::Pinned,
        hosts: vec![w.hosts[0].id],
    };
    let vm = db.vm_insert(&vm).await.unwrap();
    assert_eq!(vm.template_id, BLANK_TEMPLATE_ID);
    assert_eq!(vm.placement.hosts, vec![w.hosts[0].id]);
    assert!(vm.ha.enabled);
    // Every VM has its active snapshot.
    let active = db.snapshot_active(vm.id).await.unwrap().expect("active snapshot");
    assert_eq!(active.snapshot_type, SnapshotType::Active);
    // The guaranteed memory cannot exceed the memory.
    let mut big = Vm::new("big", w.cluster.id);
    big.memory_guaranteed_bytes = big.memory_bytes + 1;
    assert!(matches!(
        db.vm_insert(&big).await.unwrap_err(),
        DbError::Invalid { .. }
    ));

    let disk = db
        .disk_insert(&Disk::new("web1_disk", w.sd.id, DiskFormat::Raw, 1 << 30))
        .await
        .unwrap();
    let att = DiskAttachment {
        vm_id: vm.id,
        disk_id: disk.id,
        interface: DiskInterface::VirtioScsi,
        bootable: true,
        active: true,
        read_only: false,
    };
    db.attachment_add(&att).await.unwrap();
    assert_eq!(db.attachments_of_vm(vm.id).await.unwrap(), vec![att.clone()]);
    // A disk that is not shareable attaches to one VM only.
    let vm2 = db.vm_insert(&Vm::new("web2", w.cluster.id)).await.unwrap();
    let err = db
        .attachment_add(&DiskAttachment {
            vm_id: vm2.id,
            ..att.clone()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::InUse { .. }), "{err}");

    let nic = Nic {
        id: NicId::new_random(),
        vm_id: vm.id,
        name: "nic1".into(),
        network: Some("ovirtmgmt".into()),
        mac: MacAddr([0; 6]),
        interface: NicInterface::Virtio,
        plugged: true,
        linked: true,
    };
    let n1 = db.nic_add(&nic, None).await.unwrap();
    assert_eq!(n1.mac.0[..2], MacAddr::POOL_PREFIX);
    let dup = Nic {
        id: NicId::new_random(),
        vm_id: vm2.id,
        name: "nic1".into(),
        ..nic.clone()
    };
    let err = db.nic_add(&dup, Some(n1.mac)).await.unwrap_err();
    assert!(err.is_already_exists(), "duplicate MAC: {err}");
    assert_eq!(db.nics_of_vm(vm.id).await.unwrap().len(), 1);

    // A snapshot records which volume each disk had.
    let vol = Volume {
        id: VolUuid::new_random(),
        disk_id: disk.id,
        storage_domain_id: w.sd.id,
        parent_id: None,
        voltype: VolType::Leaf,
        format: DiskFormat::Raw,
        actual_size: 0,
        created_at: Timestamp::from_millis(0),
    };
    db.volume_insert(&vol).await.unwrap();
    let snap = Snapshot {
        id: SnapshotId::new_random(),
        vm_id: vm.id,
        description: "before upgrade".into(),
        snapshot_type: SnapshotType::Regular,
        status: SnapshotStatus::Locked,
        persist_memory: false,
        configuration: Some(vm.configuration()),
        disks: vec![SnapshotDisk {
            disk_id: disk.id,
            volume_id: vol.id,
        }],
        created_at: Timestamp::from_millis(0),
    };
    db.snapshot_insert(&snap).await.unwrap();
    db.snapshot_set_status(snap.id, &[SnapshotStatus::Locked], SnapshotStatus::Ok)
        .await
        .unwrap();
    let snaps = db.snapshots_of_vm(vm.id).await.unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[0].id, snap.id);
    assert_eq!(snaps[0].disks, snap.disks);
    assert_eq!(snaps[0].configuration, Some(vm.configuration()));
    assert_eq!(snaps[1].configuration, None);
    assert_eq!(snaps[1].snapshot_type, SnapshotType::Active);
    // A second active snapshot is refused.
    let err = db
        .snapshot_insert(&Snapshot {
            id: SnapshotId::new_random(),
            snapshot_type: SnapshotType::Active,
            disks: vec![],
            ..snap.clone()
        })
        .await
        .unwrap_err();
    assert!(err.is_already_exists(), "{err}");
    // The volume a snapshot needs cannot go.
    assert!(matches!(
        db.volume_delete(vol.id).await.unwrap_err(),
        DbError::InUse { .. }
    ));

    // Run-time state: compare-and-set, revision untouched.
    let rt = VmRuntime {
        status: VmStatus::WaitForLaunch,
        run_on_host: Some(w.hosts[0].id),
        ..Default::default()
    };
    db.vm_set_runtime(vm.id, &[VmStatus::Down], &rt).await.unwrap();
    let err = db
        .vm_set_runtime(vm.id, &[VmStatus::Down], &rt)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err}");
    let now = db.vm_get(vm.id).await.unwrap().unwrap();
    assert_eq!(now.runtime, rt);
    assert_eq!(now.revision, vm.revision);
    // A running VM cannot be removed, nor can its host.
    assert!(matches!(
        db.vm_delete(vm.id).await.unwrap_err(),
        DbError::InUse { .. }
    ));
    assert!(matches!(
        db.host_delete(w.hosts[0].id).await.unwrap_err(),
        DbError::InUse { .. }
    ));
    // Concurrent starts: one wins.
    let mut tasks = Vec::new();
    for h in &w.hosts {
        let db = db.clone();
        let rt = VmRuntime {
            status: VmStatus::WaitForLaunch,
            run_on_host: Some(h.id),
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move {
            db.vm_set_runtime(vm2.id, &[VmStatus::Down], &rt).await
        }));
    }
    let ok = futures_count(tasks).await;
    assert_eq!(ok, 1);

    // Removing a down VM takes attachments, NICs and snapshots, not disks.
    db.vm_set_runtime(vm.id, &[], &VmRuntime::default())
        .await
        .unwrap();
    db.vm_delete(vm.id).await.unwrap();
    assert!(db.snapshot_get(snap.id).await.unwrap().is_none());
    assert!(db.nic_get(n1.id).await.unwrap().is_none());
    assert!(db.disk_get(disk.id).await.unwrap().is_some());
    assert!(db.attachments_of_disk(disk.id).await.unwrap().is_empty());

    // Deleting a disk takes its volumes even while a snapshot names one (VM removal relies on
    // it): the snapshot stays, without that disk.
    let snap2 = Snapshot {
        id: SnapshotId::new_random(),
        vm_id: vm2.id,
        ..snap.clone()
    };
    db.snapshot_insert(&snap2).await.unwrap();
    db.disk_delete(disk.id).await.unwrap();
    assert!(db.volume_get(vol.id).await.unwrap().is_none());
    let left = db.snapshot_get(snap2.id).await.unwrap().unwrap();
    assert!(left.disks.is_empty(), "{:?}", left.disks);
}

async fn futures_count(tasks: Vec<tokio::task::JoinHandle<Result<Vm, DbError>>>) -> usize {
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(DbError::Conflict { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    ok
}

async fn templates_and_thin_clones(b: Backend) {
    let t = TestDb::new(b).await;
    let db = &t.db;
    let w = world(db, "t").await;
    let err = db.template_delete(BLANK_TEMPLATE_ID).await.unwrap_err();
    assert!(matches!(err, DbError::Invalid { .. }), "{err}");
    let tpl = db
        .template_insert(&Template::new("rhel9", Some(w.cluster.id)))
        .await
        .unwrap();
    let tdisk = db
        .disk_insert(&Disk::new("rhel9_disk", w.sd.id, DiskFormat::Cow, 10 << 30))
        .await
        .unwrap();
    db.template_disk_add(tpl.id, tdisk.id).await.unwrap();
    let tvol = Volume {
        id: VolUuid::new_random(),
        disk_id: tdisk.id,
        storage_domain_id: w.sd.id,
        parent_id: None,
        voltype: VolType::Shared,
        format: DiskFormat::Cow,
        actual_size: 0,
        created_at: Timestamp::from_millis(0),
    };
    db.volume_insert(&tvol).await.unwrap();
    let mut vm = Vm::new("clone1", w.cluster.id);
    vm.template_id = tpl.id;
    let vm = db.vm_insert(&vm).await.unwrap();
    let vdisk = db
        .disk_insert(&Disk::new("clone1_disk", w.sd.id, DiskFormat::Cow, 10 << 30))
        .await
        .unwrap();
    let vvol = Volume {
        id: VolUuid::new_random(),
        disk_id: vdisk.id,
        parent_id: Some(tvol.id),
        voltype: VolType::Leaf,
        ..tvol.clone()
    };
    db.volume_insert(&vvol).await.unwrap();
    // The clone's chain is its own volume; its parent lives in the template's disk.
    let chain = db.volume_chain(vdisk.id).await.unwrap();
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0].parent_id, Some(tvol.id));
    // The template cannot go while a VM or a thin clone depends on it.
    assert!(matches!(
        db.template_delete(tpl.id).await.unwrap_err(),
        DbError::InUse { .. }
    ));
    assert!(matches!(
        db.disk_delete(tdisk.id).await.unwrap_err(),
        DbError::InUse { .. }
    ));
    assert_eq!(db.template_disks(tpl.id).await.unwrap().len(), 1);
    let floating = db
        .disk_list(&ListQuery::filtered(DiskFilter {
            floating: Some(true),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(floating.iter().map(|d| d.id).collect::<Vec<_>>(), vec![vdisk.id]);
    let vms = db
        .vm_list(&ListQuery::filtered(VmFilter {
            template: Some(Ref::name("rhel9")),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(vms.iter().map(|v| v.id).collect::<Vec<_>>(), vec![vm.id]);
}

/// The search forms of issue 9 as list queries.
async fn vm_search_filters_sort_and_pages(b: Backend) {
    let t = TestDb::new(b).await;
    let db = &t.db;
    let a = world(db, "a").await;
    let z = world(db, "zz").await;
    let mut ids = Vec::new();
    for (i, name) in ["web-1", "web-2", "Web-3", "db_1", "dbx2", "cache"]
        .iter()
        .enumerate()
    {
        let cl = if i < 4 { a.cluster.id } else { z.cluster.id };
        let mut vm = Vm::new(name, cl);
        vm.memory_bytes = (i as u64 + 1) << 30;
        vm.memory_guaranteed_bytes = 1 << 30;
        ids.push(db.vm_insert(&vm).await.unwrap().id);
    }
    db.vm_set_runtime(
        ids[0],
        &[],
        &VmRuntime {
            status: VmStatus::Up,
            run_on_host: Some(a.hosts[0].id),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    db.vm_set_runtime(
        ids[5],
        &[],
        &VmRuntime {
            status: VmStatus::Up,
            run_on_host: Some(z.hosts[1].id),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let d = db
        .disk_insert(&Disk::new("x", z.sd.id, DiskFormat::Raw, 1 << 20))
        .await
        .unwrap();
    db.attachment_add(&DiskAttachment {
        vm_id: ids[3],
        disk_id: d.id,
        interface: DiskInterface::Virtio,
        bootable: true,
        active: true,
        read_only: false,
    })
    .await
    .unwrap();

    let names = |vms: Vec<Vm>| vms.into_iter().map(|v| v.name).collect::<Vec<_>>();
    let q = |f: VmFilter| ListQuery::filtered(f).sort_by(VmSort::Name, SortDir::Asc);
    // name=web-1
    assert_eq!(
        names(
            db.vm_list(&q(VmFilter {
                name: Some("web-1".into()),
                ..Default::default()
            }))
            .await
            .unwrap()
        ),
        ["web-1"]
    );
    // name=web* (case-sensitive) and case-insensitive
    assert_eq!(
        names(
            db.vm_list(&q(VmFilter {
                name: Some("web*".into()),
                ..Default::default()
            }))
            .await
            .unwrap()
        ),
        ["web-1", "web-2"]
    );
    assert_eq!(
        names(
            db.vm_list(&q(VmFilter {
                name: Some(TextMatch::new("WEB*").case_insensitive()),
                ..Default::default()
            }))
            .await
            .unwrap()
        ),
        // Byte order: the test PostgreSQL is initialised without a locale, like SQLite's BINARY.
        ["Web-3", "web-1", "web-2"]
    );
    // SQL wildcards in a pattern are literal.
    assert_eq!(
        names(
            db.vm_list(&q(VmFilter {
                name: Some("db*".into()),
                ..Default::default()
            }))
            .await
            .unwrap()
        ),
        ["db_1", "dbx2"]
    );
    assert_eq!(
        names(
            db.vm_list(&q(VmFilter {
                name: Some("db_*".into()),
                ..Default::default()
            }))
            .await
            .unwrap()
        ),
        ["db_1"]
    );
    // status=up and datacenter=dc-a
    assert_eq!(
        names(
            db.vm_list(&q(VmFilter {
                status: vec![VmStatus::Up],
                data_center: Some(Ref::name("dc-a")),
                ..Default::default()
            }))
            .await
            .unwrap()
        ),
        ["web-1"]
    );
    // storage.name=sd-zz
    assert_eq!(
        names(
            db.vm_list(&q(VmFilter {
                storage_domain: Some(Ref::name("sd-zz")),
                ..Default::default()
            }))
            .await
            .unwrap()
        ),
        ["db_1"]
    );
    // host by name, cluster by id
    assert_eq!(
        names(
            db.vm_list(&q(VmFilter {
                host: Some(Ref::name("host-zz-1")),
                ..Default::default()
            }))
            .await
            .unwrap()
        ),
        ["cache"]
    );
    assert_eq!(
        db.vm_count(&VmFilter {
            cluster: Some(Ref::Id(z.cluster.id)),
            ..Default::default()
        })
        .await
        .unwrap(),
        2
    );
    // sortby memory desc page 2 (max=2)
    let page = db
        .vm_list(
            &ListQuery::filtered(VmFilter::default())
                .sort_by(VmSort::Memory, SortDir::Desc)
                .limit(2)
                .page(2),
        )
        .await
        .unwrap();
    assert_eq!(names(page), ["db_1", "Web-3"]);
    // Pages cover everything exactly once.
    let mut all = Vec::new();
    for p in 1..=4 {
        all.extend(names(
            db.vm_list(
                &ListQuery::filtered(VmFilter::default())
                    .sort_by(VmSort::Status, SortDir::Asc)
                    .limit(2)
                    .page(p),
            )
            .await
            .unwrap(),
        ));
    }
    all.sort();
    let mut expect = names(db.vm_list(&ListQuery::new()).await.unwrap());
    expect.sort();
    assert_eq!(all, expect);
    assert_eq!(all.len(), 6);
}

async fn spm_ids_are_unique_under_concurrency(b: Backend) {
    let t = TestDb::new(b).await;
    let db = &t.db;
    let w = world(db, "h").await;
    let mut hosts = w.hosts.clone();
    for i in 2..10 {
        hosts.push(
            db.host_insert(&Host::new(
                &format!("extra{i}"),
                "10.0.0.1",
                1000 + i,
                w.cluster.id,
            ))
            .await
            .unwrap(),
        );
    }
    let mut tasks = Vec::new();
    for h in &hosts {
        let db = db.clone();
        let (dc, id) = (w.dc.id, h.id);
        tasks.push(tokio::spawn(async move {
            // A lost race on the unique slot is retried, as commands do.
            loop {
                match db.host_spm_id_allocate(dc, id).await {
                    Ok(x) => return x,
                    Err(e) if e.is_already_exists() => continue,
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap().get());
    }
    got.sort();
    assert_eq!(got, (1..=10).collect::<Vec<u16>>());
    // Stable per host, reused after release.
    let again = db.host_spm_id_allocate(w.dc.id, hosts[3].id).await.unwrap();
    assert_eq!(Some(again), db.host_spm_id(w.dc.id, hosts[3].id).await.unwrap());
    assert!(db.host_spm_id_release(w.dc.id, hosts[3].id).await.unwrap());
    let h = db
        .host_insert(&Host::new("late", "10.0.0.2", 1, w.cluster.id))
        .await
        .unwrap();
    assert_eq!(db.host_spm_id_allocate(w.dc.id, h.id).await.unwrap(), again);
}

async fn jobs_and_events(b: Backend) {
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_700_000_000_000)));
    let t = TestDb::with_clock(b, clock.clone()).await;
    let db = &t.db;
    let job = db
        .job_start("Adding disk d1", Some("corr-1"), None)
        .await
        .unwrap();
    let s1 = db
        .job_step_start(job.id, None, StepType::Validating, "Validating")
        .await
        .unwrap();
    clock.advance(Duration::from_secs(1));
    let s2 = db
        .job_step_start(job.id, None, StepType::Executing, "Creating volume")
        .await
        .unwrap();
    assert_eq!((s1.number, s2.number), (1, 2));
    db.job_step_set_status(s1.id, JobStatus::Finished).await.unwrap();
    db.job_step_set_status(s2.id, JobStatus::Finished).await.unwrap();
    db.job_end(job.id, JobStatus::Finished).await.unwrap();
    db.job_end(job.id, JobStatus::Finished).await.unwrap();
    assert!(matches!(
        db.job_end(job.id, JobStatus::Failed).await.unwrap_err(),
        DbError::Conflict { .. }
    ));
    let j = db.job_get(job.id).await.unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Finished);
    assert_eq!(j.ended_at, Some(Timestamp::from_millis(1_700_000_001_000)));
    assert_eq!(db.job_steps(job.id).await.unwrap().len(), 2);
    let by_corr = db
        .job_list(&ListQuery::filtered(JobFilter {
            correlation_id: Some("corr-1".into()),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(by_corr.len(), 1);
    // Auto-clearing ended jobs.
    clock.advance(Duration::from_secs(3600));
    assert_eq!(db.jobs_clear_ended(clock_now(db)).await.unwrap(), 1);
    assert!(db.job_get(job.id).await.unwrap().is_none());

    // Events: increasing ids, `from=`, severity and references.
    let vm = VmId::new_random();
    let mut last = 0;
    for (i, sev) in [
        Severity::Normal,
        Severity::Warning,
        Severity::Error,
        Severity::Alert,
    ]
    .into_iter()
    .enumerate()
    {
        let mut e = NewEvent::new(sev, 30 + i as i32, format!("event {i}"));
        e.vm_id = (i % 2 == 0).then_some(vm);
        let ev = db.event_add(&e).await.unwrap();
        assert!(ev.id > last, "ids increase");
        last = ev.id;
    }
    let all = db.event_list(&ListQuery::new()).await.unwrap();
    assert_eq!(all.len(), 4);
    let from = db
        .event_list(&ListQuery::filtered(EventFilter {
            after_id: Some(all[1].id),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(from.iter().map(|e| e.code).collect::<Vec<_>>(), vec![32, 33]);
    let serious = db
        .event_list(
            &ListQuery::filtered(EventFilter {
                min_severity: Some(Severity::Warning),
                ..Default::default()
            })
            .sort_by(EventSort::Id, SortDir::Desc),
        )
        .await
        .unwrap();
    assert_eq!(
        serious.iter().map(|e| e.code).collect::<Vec<_>>(),
        vec![33, 32, 31]
    );
    let of_vm = db
        .event_list(&ListQuery::filtered(EventFilter {
            vm: Some(Ref::Id(vm)),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(of_vm.len(), 2);
    assert_eq!(of_vm[0].time, clock_now(db));
}

fn clock_now(db: &Db) -> Timestamp {
    db.now()
}

async fn users_passwords_and_tokens(b: Backend) {
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_700_000_000_000)));
    let t = TestDb::with_clock(b, clock.clone()).await;
    let db = &t.db;
    let boot = db.ensure_admin(None).await.unwrap();
    assert!(boot.created);
    let pw = boot.generated_password.clone().expect("a generated password");
    assert!(pw.len() >= 20);
    assert_eq!(boot.user.principal(), "admin@internal");
    assert!(boot.user.admin);
    let again = db.ensure_admin(None).await.unwrap();
    assert!(!again.created && again.generated_password.is_none());
    assert_eq!(again.user.id, boot.user.id);

    assert_eq!(
        db.user_verify_password("admin@internal", &pw)
            .await
            .unwrap()
            .map(|u| u.id),
        Some(boot.user.id)
    );
    assert!(db
        .user_verify_password("admin@internal", "wrong")
        .await
        .unwrap()
        .is_none());
    assert!(db
        .user_verify_password("nobody@internal", &pw)
        .await
        .unwrap()
        .is_none());
    // OXVIRT_ADMIN_PASSWORD semantics: a given password replaces the stored one.
    db.ensure_admin(Some("s3cret")).await.unwrap();
    assert!(db
        .user_verify_password("admin@internal", &pw)
        .await
        .unwrap()
        .is_none());
    assert!(db
        .user_verify_password("admin", "s3cret")
        .await
        .unwrap()
        .is_some());
    assert!(matches!(
        db.user_create("x", "internal", Some(""), false)
            .await
            .unwrap_err(),
        DbError::Invalid { .. }
    ));

    let tok = db
        .token_issue(boot.user.id, Duration::from_secs(600))
        .await
        .unwrap();
    let info = db.token_validate(&tok.token).await.unwrap().expect("valid token");
    assert_eq!(info.user.id, boot.user.id);
    assert!(db.token_validate("forged").await.unwrap().is_none());
    clock.advance(Duration::from_secs(601));
    assert!(db.token_validate(&tok.token).await.unwrap().is_none(), "expired");
    assert_eq!(db.tokens_purge_expired().await.unwrap(), 1);
    let tok2 = db
        .token_issue(boot.user.id, Duration::from_secs(600))
        .await
        .unwrap();
    assert!(db.token_revoke(&tok2.token).await.unwrap());
    assert!(db.token_validate(&tok2.token).await.unwrap().is_none());
    assert!(!db.token_revoke(&tok2.token).await.unwrap());
}

async fn transactions_commit_or_roll_back_together(b: Backend) {
    let t = TestDb::new(b).await;
    let db = &t.db;
    let dc = db.dc_insert(&DataCenter::new("tx-dc")).await.unwrap();
    {
        let mut tx = db.begin().await.unwrap();
        tx.cluster_insert(&Cluster::new("c1", dc.id)).await.unwrap();
        // Reads in the transaction see its writes.
        assert!(tx.cluster_get_by_name("c1").await.unwrap().is_some());
        // Dropped without commit: rolled back.
    }
    assert!(db.cluster_get_by_name("c1").await.unwrap().is_none());
    let name = db
        .transaction(|tx| {
            Box::pin(async move {
                let c = tx.cluster_insert(&Cluster::new("c2", dc.id)).await?;
                tx.event_add(&NewEvent::new(Severity::Normal, 1, "cluster added"))
                    .await?;
                Ok(c.name)
            })
        })
        .await
        .unwrap();
    assert_eq!(name, "c2");
    assert!(db.cluster_get_by_name("c2").await.unwrap().is_some());
}

/// An image transfer's phase moves only by compare-and-set: the REST actions ask, the saga
/// answers, neither overwrites the other; progress and the URL are recorded.
async fn image_transfer_phases_move_by_compare_and_set(b: Backend) {
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_700_000_000_000)));
    let t = TestDb::with_clock(b, clock.clone()).await;
    let db = &t.db;
    let now = db.now();
    let tr = ImageTransfer {
        id: TransferId::new_random(),
        disk_id: DiskId::new_random(),
        host_id: HostUuid::new_random(),
        direction: TransferDirection::Upload,
        format: DiskFormat::Raw,
        phase: TransferPhase::Initializing,
        transfer_url: None,
        inactivity_timeout: 60,
        transferred: 0,
        active: false,
        message: None,
        saga_id: Some(SagaId::new_random()),
        created_at: now,
        updated_at: now,
    };
    db.transfer_insert(&tr).await.unwrap();
    assert_eq!(db.transfer_get(tr.id).await.unwrap().unwrap(), tr);
    assert!(
        db.transfer_insert(&tr).await.is_err(),
        "a second insert of the same id"
    );
    // Finalize before it serves: refused by state.
    assert!(!db
        .transfer_set_phase(
            tr.id,
            &[TransferPhase::Transferring],
            TransferPhase::FinalizingSuccess,
            None
        )
        .await
        .unwrap());
    clock.advance(Duration::from_secs(2));
    assert!(db.transfer_serving(tr.id, "https://h:1/images/x").await.unwrap());
    assert!(
        !db.transfer_serving(tr.id, "https://h:2/images/x").await.unwrap(),
        "serving twice"
    );
    db.transfer_progress(tr.id, 12345, true).await.unwrap();
    let got = db.transfer_get(tr.id).await.unwrap().unwrap();
    assert_eq!(got.phase, TransferPhase::Transferring);
    assert_eq!(got.transfer_url.as_deref(), Some("https://h:1/images/x"));
    assert_eq!((got.transferred, got.active), (12345, true));
    assert!(got.updated_at > got.created_at);
    // A cancel wins over a later finalize; asking again for the same phase is fine.
    let from = [TransferPhase::Initializing, TransferPhase::Transferring];
    assert!(db
        .transfer_set_phase(
            tr.id,
            &from,
            TransferPhase::CancelledUser,
            Some("cancelled by the user")
        )
        .await
        .unwrap());
    assert!(db
        .transfer_set_phase(tr.id, &from, TransferPhase::CancelledUser, None)
        .await
        .unwrap());
    assert!(!db
        .transfer_set_phase(
            tr.id,
            &[TransferPhase::Transferring],
            TransferPhase::FinalizingSuccess,
            None
        )
        .await
        .unwrap());
    let got = db.transfer_get(tr.id).await.unwrap().unwrap();
    assert_eq!(got.phase, TransferPhase::CancelledUser);
    assert_eq!(got.message.as_deref(), Some("cancelled by the user"));
    assert_eq!(db.transfer_list().await.unwrap().len(), 1);
    let e = db
        .transfer_set_phase(
            TransferId::new_random(),
            &from,
            TransferPhase::CancelledUser,
            None,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
}

both_backends!(
    migrations_are_idempotent_and_checked,
    sqlite_file_is_wal_with_foreign_keys,
    infrastructure_crud,
    storage_pool_membership,
    disks_volumes_and_locking,
    vms_attachments_nics_snapshots,
    templates_and_thin_clones,
    vm_search_filters_sort_and_pages,
    spm_ids_are_unique_under_concurrency,
    jobs_and_events,
    users_passwords_and_tokens,
    transactions_commit_or_roll_back_together,
    image_transfer_phases_move_by_compare_and_set,
);

/// Two engines starting at once on a new database: each migration is applied once.
async fn concurrent_opens_migrate_once(b: Backend) {
    let t = TestDb::new(b).await;
    let url = match b {
        Backend::Sqlite => format!("sqlite://{}?mode=rwc", t.dir.path().join("race.db").display()),
        Backend::Postgres => {
            let base = common::pg_base_url();
            let schema = format!("race_{}", uuid::Uuid::new_v4().simple());
            sqlx_exec_url(&base, &format!("CREATE SCHEMA {schema}")).await;
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}options[search_path]={schema}")
        }
    };
    let (a, b2) = tokio::join!(Db::connect(&url), Db::connect(&url));
    let (a, b2) = (a.expect("first engine opens"), b2.expect("second engine opens"));
    assert_eq!(a.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(b2.schema_version().await.unwrap(), SCHEMA_VERSION);
    // Both write through their own writer to the same database.
    let (dca, dcb) = (DataCenter::new("from-a"), DataCenter::new("from-b"));
    let (x, y) = tokio::join!(a.dc_insert(&dca), b2.dc_insert(&dcb));
    x.unwrap();
    y.unwrap();
    assert_eq!(a.dc_list(&ListQuery::new()).await.unwrap().len(), 2);
    assert_eq!(
        b2.template_list(&ListQuery::new()).await.unwrap().len(),
        1,
        "one Blank template"
    );
}

both_backends!(concurrent_opens_migrate_once);

/// The engine's default: `<data dir>/engine.db`, created with its directory.
#[tokio::test]
async fn open_in_a_data_directory_creates_the_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data dir #1");
    let db = Db::open_in(&data, None).await.unwrap();
    assert_eq!(db.backend(), oxvirt_engine::db::Backend::Sqlite);
    db.dc_insert(&DataCenter::new("Default")).await.unwrap();
    db.close().await;
    assert!(data.join(oxvirt_engine::db::SQLITE_FILE).is_file());
    let db = Db::open_in(&data, None).await.unwrap();
    assert!(db.dc_get_by_name("Default").await.unwrap().is_some());
    let err = Db::connect("mysql://x").await.unwrap_err();
    assert!(matches!(err, DbError::BadUrl(_)), "{err}");
}
