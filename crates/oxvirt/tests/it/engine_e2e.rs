//! The engine end to end: an in-process engine (real database, real HTTPS, real enrollment) and
//! three real `oxvirt node` processes on loopback sharing one directory as storage. Everything
//! goes through the engine's commands: storage domain, template, thin-cloned VM, start, live
//! snapshot, migration, live merge, stop, removal; then the SPM node is killed and the role
//! moves.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{
    attach_data_domain, cow_disk, data_domain, start_cluster, start_cluster_via, start_cluster_with,
};
use oxvirt_engine::commands::{AddVm, CommandError, MigrateOptions, VmStartOptions};
use oxvirt_engine::daemon::Engine;
use oxvirt_engine::model::{HostStatus, VmStatus, BLANK_TEMPLATE_ID};
use oxvirt_testkit::TestGuest;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// The guest fills the first MiB of its second disk once it is plugged, then reports its
/// unplug.
const HOT_DISK_SCRIPT: &str = "while [ ! -b /dev/vdb ]; do usleep 100000; done; \
    tr '\\000' H < /dev/zero | dd of=/dev/vdb bs=1M count=1 iflag=fullblock oflag=direct \
    2>/dev/null && echo OXVIRT-GUEST vdb written; \
    while [ -b /dev/vdb ]; do usleep 100000; done; echo OXVIRT-GUEST vdb unplugged";

async fn host_name(e: &Engine, id: oxvirt_engine::model::HostUuid) -> String {
    e.app().db.host_get(id).await.unwrap().unwrap().name
}

/// Who holds a volume's lease, read from storage (a host id; `None`: free).
fn vol_owner(
    storage: &Path,
    sd: oxvirt_engine::model::SdUuid,
    img: oxvirt_engine::model::ImgUuid,
    vol: oxvirt_types::VolUuid,
) -> Option<u64> {
    let dom = oxvirt_storage::FileStorageDomain::find(storage, sd).unwrap();
    oxvirt_storage::spm::volume_lease_owner(&dom, img, vol).unwrap()
}

fn image_dirs(storage: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sd in std::fs::read_dir(storage).unwrap().flatten() {
        if let Ok(imgs) = std::fs::read_dir(sd.path().join("images")) {
            out.extend(
                imgs.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn engine_drives_three_nodes_through_a_vm_life_and_moves_the_spm() {
    let mut c = start_cluster(3).await;
    let e = c.engine.clone();
    let cmds = &e.cmds;
    let db = &e.app().db;
    let dc = db.dc_get_by_name("Default").await.unwrap().unwrap();
    let cluster = db.cluster_get_by_name("Default").await.unwrap().unwrap();

    // Storage: a bad path is refused and leaves nothing; the real one becomes active.
    let host1 = db.host_get_by_name("host1").await.unwrap().unwrap();
    let sd_req = |path: &str| data_domain(path, host1.id);
    let err = cmds
        .add_storage_domain(sd_req("/nonexistent/storage"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("connect"), "{err}");
    assert!(db.sd_get_by_name("data").await.unwrap().is_none());
    let sd = cmds
        .add_storage_domain(sd_req(&c.storage.display().to_string()), None)
        .await
        .unwrap();
    cmds.attach_storage_domain(dc.id, sd.id, None).await.unwrap();
    cmds.wait_domain_active(dc.id, sd.id, Duration::from_secs(90))
        .await
        .unwrap();
    let dc_now = db.dc_get(dc.id).await.unwrap().unwrap();
    let spm_host = dc_now.spm_host.expect("an SPM was elected");

    // The engine loses track of the SPM (as after a network cut that healed before the lease
    // expired) while another host is now the preferred candidate: the monitor finds the live
    // SPM on storage and records it again, instead of asking the candidate to wait for a lease
    // that the SPM keeps renewing.
    let other = db
        .host_list(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .find(|h| h.id != spm_host)
        .unwrap()
        .id;
    // The monitor updates host rows too: retry on a stale revision.
    let set_priority = async |p: i32| {
        for _ in 0..20 {
            let mut h = db.host_get(other).await.unwrap().unwrap();
            h.spm_priority = p;
            match db.host_update(&h).await {
                Ok(_) => return,
                Err(oxvirt_engine::db::DbError::Conflict { .. }) => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("host {other} kept changing under the update");
    };
    set_priority(10).await;
    assert!(db.dc_spm_clear(dc.id, spm_host).await.unwrap());
    let lost = Instant::now();
    loop {
        let d = db.dc_get(dc.id).await.unwrap().unwrap();
        if d.spm_status == oxvirt_engine::model::SpmStatus::Spm {
            assert_eq!(d.spm_host, Some(spm_host), "the SPM role moved off a live SPM");
            break;
        }
        assert!(
            lost.elapsed() < Duration::from_secs(10),
            "the live SPM was not found again: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    set_priority(5).await;

    // A template from a VM with one disk.
    let os = |args: &[&str]| common::cluster::guest_os(args);
    let base = cmds
        .add_vm(
            AddVm {
                name: "base".into(),
                description: String::new(),
                cluster: cluster.id,
                template: BLANK_TEMPLATE_ID,
                memory_bytes: Some(256 * MIB),
                cpu: None,
                os: os(&["oxvirt.writer=8"]),
                ha: None,
                resume_behavior: None,
            },
            None,
        )
        .await
        .unwrap();
    let disk = cmds
        .add_disk(
            cow_disk("base_disk", sd.id, 64 * MIB, Some((base.id, true))),
            None,
        )
        .await
        .unwrap();
    assert_eq!(db.attachments_of_vm(base.id).await.unwrap().len(), 1);
    let tmpl = cmds
        .add_template(base.id, "tmpl", "from base", None)
        .await
        .unwrap();
    let tdisks = db.template_disks(tmpl.id).await.unwrap();
    assert_eq!(tdisks.len(), 1);
    assert_ne!(tdisks[0].id, disk.id);

    // A VM from the template: its disk is a thin clone (template volume + its own leaf).
    let vm = cmds
        .add_vm(
            AddVm {
                name: "vm1".into(),
                description: String::new(),
                cluster: cluster.id,
                template: tmpl.id,
                memory_bytes: Some(256 * MIB),
                cpu: None,
                os: os(&["oxvirt.writer=8", &TestGuest::run_arg(HOT_DISK_SCRIPT)]),
                ha: None,
                resume_behavior: None,
            },
            None,
        )
        .await
        .unwrap();
    let atts = db.attachments_of_vm(vm.id).await.unwrap();
    assert_eq!(atts.len(), 1);
    let vdisk = atts[0].disk_id;
    let chain = db.volume_chain(vdisk).await.unwrap();
    let tvol = db.volume_chain(tdisks[0].id).await.unwrap()[0].id;
    assert_eq!(chain.len(), 1, "the clone's own leaf: {chain:?}");
    assert_eq!(
        chain[0].parent_id,
        Some(tvol),
        "the clone's leaf sits on the template's volume"
    );

    // Start: the scheduler picks a host; the guest runs and writes.
    let vm_up = cmds
        .start_vm(vm.id, VmStartOptions::default(), None)
        .await
        .unwrap();
    let h = vm_up.runtime.run_on_host.unwrap();
    let hname = host_name(&e, h).await;
    let vm_up = cmds
        .wait_vm_status(vm.id, VmStatus::Up, Duration::from_secs(30))
        .await
        .unwrap();
    oxvirt_testkit::wait_for_text(
        &c.console(&hname, vm.id),
        "OXVIRT-GUEST pass 0",
        Duration::from_secs(90),
    )
    .unwrap();
    assert_eq!(vm_up.runtime.run_on_host, Some(h));
    // A second start is refused.
    assert!(cmds
        .start_vm(vm.id, VmStartOptions::default(), None)
        .await
        .is_err());

    // Live snapshot: a new leaf; the old one is internal.
    let snap = cmds
        .add_snapshot(
            vm.id,
            oxvirt_engine::commands::AddSnapshot {
                description: "s1".into(),
                persist_memory: false,
                disks: None,
            },
            None,
        )
        .await
        .unwrap();
    let chain = db.volume_chain(vdisk).await.unwrap();
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(chain[1].parent_id, Some(chain[0].id));
    // The running VM holds the lease of the volume it writes, and only that one.
    let owner = |vol| vol_owner(&c.storage, sd.id, vdisk, vol);
    let runner_id = owner(chain[1].id).expect("the new leaf's lease is held");
    assert_eq!(owner(chain[0].id), None, "the old leaf's lease was kept");

    // A disk added to the running VM is hot plugged: the guest writes to it, and the VM
    // holds its leaf's lease too. It moves with the VM.
    let hot = cmds
        .add_disk(cow_disk("hot_disk", sd.id, 16 * MIB, Some((vm.id, false))), None)
        .await
        .unwrap();
    assert!(db.attachment_get(vm.id, hot.id).await.unwrap().unwrap().active);
    oxvirt_testkit::wait_for_text(
        &c.console(&hname, vm.id),
        "OXVIRT-GUEST vdb written",
        Duration::from_secs(30),
    )
    .unwrap();
    let hot_leaf = db.volume_chain(hot.id).await.unwrap()[0].id;
    assert_eq!(
        vol_owner(&c.storage, sd.id, hot.id, hot_leaf),
        Some(runner_id),
        "the plugged disk's lease"
    );

    // With the cluster's migrations limited to 16 Mbps (2 MiB/s) there is a half-way: a
    // migration cancelled there leaves the VM up where it was, its leases with it.
    let limited = cmds
        .update_cluster(
            cluster.id,
            oxvirt_engine::commands::UpdateCluster {
                migration_bandwidth_mbps: Some(Some(16)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(limited.migration_bandwidth_mbps, Some(16));
    let slow = tokio::spawn({
        let (e, id) = (e.clone(), vm.id);
        async move { e.cmds.migrate_vm(id, MigrateOptions::default(), None).await }
    });
    let started = Instant::now();
    let mut cancelled = false;
    while started.elapsed() < Duration::from_secs(30) {
        match cmds.cancel_migration(vm.id).await {
            Ok(_) => {
                cancelled = true;
                break;
            }
            Err(CommandError::Conflict(m)) if m.contains("not migrating") => {}
            // The VM is migrating but its node has no outgoing migration yet.
            Err(CommandError::Node(_)) => {}
            Err(other) => panic!("cancel_migration: {other}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cancelled, "the VM never was migrating");
    let r = slow.await.unwrap();
    assert!(r.is_err(), "a cancelled migration succeeded: {r:?}");
    let v = db.vm_get(vm.id).await.unwrap().unwrap();
    assert_eq!(
        (v.runtime.status, v.runtime.run_on_host),
        (VmStatus::Up, Some(h)),
        "the cancelled migration moved the VM"
    );
    assert_eq!(owner(chain[1].id), Some(runner_id), "the leaf's lease moved");
    cmds.update_cluster(
        cluster.id,
        oxvirt_engine::commands::UpdateCluster {
            migration_bandwidth_mbps: Some(None),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    // Live migration to another host: the guest keeps writing there.
    let moved = cmds
        .migrate_vm(vm.id, MigrateOptions::default(), None)
        .await
        .unwrap();
    let h2 = moved.runtime.run_on_host.unwrap();
    assert_ne!(h2, h);
    assert_eq!(moved.runtime.status, VmStatus::Up);
    let mig_dst_id = owner(chain[1].id).expect("the destination holds the leaf's lease");
    assert_ne!(mig_dst_id, runner_id, "the lease stayed with the source");
    let h2name = host_name(&e, h2).await;
    let log2 = c.console(&h2name, vm.id);
    let before = std::fs::read_to_string(&log2)
        .unwrap_or_default()
        .matches("OXVIRT-GUEST pass")
        .count();
    let start = Instant::now();
    loop {
        let now = std::fs::read_to_string(&log2)
            .unwrap_or_default()
            .matches("OXVIRT-GUEST pass")
            .count();
        if now > before {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "guest made no progress after migration"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Maintenance empties the host: the scheduler plans the VM's new host and it migrates
    // there (taking its leases); the host is in maintenance, then comes back up.
    let h3 = cmds.host_maintenance(h2).await.unwrap();
    assert_eq!(h3.status, HostStatus::Maintenance);
    let v = db.vm_get(vm.id).await.unwrap().unwrap();
    assert_eq!(v.runtime.status, VmStatus::Up, "{:?}", v.runtime);
    let h_now = v.runtime.run_on_host.unwrap();
    assert_ne!(h_now, h2, "the VM stayed on the host in maintenance");
    let moved_id = owner(chain[1].id).expect("the leaf's lease moved with the VM");
    assert_ne!(moved_id, mig_dst_id);
    cmds.host_activate(h2).await.unwrap();
    let start = Instant::now();
    while db.host_get(h2).await.unwrap().unwrap().status != HostStatus::Up {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the host did not come back up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Deactivated, the disk leaves the running guest (unplugged once the guest let it go) and
    // its lease is given back; detached, it can go.
    let mut a = db.attachment_get(vm.id, hot.id).await.unwrap().unwrap();
    a.active = false;
    cmds.update_disk_attachment(a).await.unwrap();
    oxvirt_testkit::wait_for_text(
        &c.console(&host_name(&e, h_now).await, vm.id),
        "OXVIRT-GUEST vdb unplugged",
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(vol_owner(&c.storage, sd.id, hot.id, hot_leaf), None);
    cmds.detach_disk(vm.id, hot.id).await.unwrap();
    cmds.remove_disk(hot.id, None).await.unwrap();

    // Suspend: the guest's state goes to a volume, QEMU ends, nothing holds the disk; start
    // resumes the same guest (its writer goes on), and the state volume is gone.
    let log_of = |h: &str| c.console(h, vm.id);
    let v = cmds.suspend_vm(vm.id, None).await.unwrap();
    assert_eq!(v.runtime.status, VmStatus::Suspended);
    assert_eq!(v.runtime.run_on_host, None);
    let st = db
        .vm_hibernation_get(vm.id)
        .await
        .unwrap()
        .expect("the state is recorded");
    assert!(image_dirs(&c.storage).contains(&st.img.to_string()));
    assert_eq!(owner(chain[1].id), None, "a suspended VM holds no lease");
    let resumed = cmds
        .start_vm(vm.id, VmStartOptions::default(), None)
        .await
        .unwrap();
    assert_eq!(resumed.runtime.status, VmStatus::Up);
    let rh = host_name(&e, resumed.runtime.run_on_host.unwrap()).await;
    oxvirt_testkit::wait_for_text(&log_of(&rh), "OXVIRT-GUEST pass", Duration::from_secs(60)).unwrap();
    let text = std::fs::read_to_string(log_of(&rh)).unwrap();
    assert!(
        !text.contains("OXVIRT-GUEST ready"),
        "the guest booted instead of resuming:\n{text}"
    );
    assert!(db.vm_hibernation_get(vm.id).await.unwrap().is_none());
    assert!(
        !image_dirs(&c.storage).contains(&st.img.to_string()),
        "the spent state volume stays"
    );
    let dst_id = owner(chain[1].id).expect("the resumed VM holds its leaf's lease");

    // Deleting the snapshot merges live: the chain is two volumes again. An earlier attempt
    // (an engine that died, an answer lost) already prepared the merge on storage: the retry
    // takes the ILLEGAL base as prepared and goes on.
    {
        let dc = db.dc_get(dc.id).await.unwrap().unwrap();
        let (_, spm) = e.app().spm(&dc).await.unwrap();
        let args = json!({ "sdUUID": sd.id, "spUUID": dc.storage_pool_id, "imgUUID": vdisk,
                           "ancestor": chain[0].id, "successor": chain[1].id });
        spm.run_task("Image.prepareMerge", args, Duration::from_secs(60))
            .await
            .unwrap();
    }
    cmds.remove_snapshot(vm.id, snap.id, None).await.unwrap();
    let chain = db.volume_chain(vdisk).await.unwrap();
    assert_eq!(chain.len(), 1, "{chain:?}");
    assert_eq!(chain[0].parent_id, Some(tvol));
    assert!(db.snapshot_get(snap.id).await.unwrap().is_none());
    assert_eq!(owner(chain[0].id), Some(dst_id), "the merged leaf's lease");

    // A snapshot with memory: the guest pauses for the save and runs on. Previewed with its
    // memory and committed, the VM is suspended at the snapshot's moment; started, the guest
    // resumes there — its writer goes back to the pass it was at, nothing boots — and the
    // snapshot keeps its memory volume.
    let passes_in = |text: &str| -> Vec<usize> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("OXVIRT-GUEST pass ")?.trim().parse().ok())
            .collect()
    };
    let last_pass = |h: &str| {
        passes_in(&std::fs::read_to_string(log_of(h)).unwrap_or_default())
            .into_iter()
            .max()
    };
    // Waits until the guest on `h` has printed pass `n`.
    let wait_pass = async |h: &str, n: usize, what: &str| {
        let start = Instant::now();
        while last_pass(h).unwrap_or(0) < n {
            assert!(start.elapsed() < Duration::from_secs(90), "{what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    // The resumed guest writes on (its console log on this host may be a new one, without a
    // pass yet right after the restore).
    wait_pass(&rh, 1, "the resumed guest prints no pass").await;
    let msnap = cmds
        .add_snapshot(
            vm.id,
            oxvirt_engine::commands::AddSnapshot {
                description: "with memory".into(),
                persist_memory: true,
                disks: None,
            },
            None,
        )
        .await
        .unwrap();
    let at_snapshot = last_pass(&rh).unwrap();
    assert!(msnap.persist_memory, "{msnap:?}");
    let mem = db
        .snapshot_memory_get(msnap.id)
        .await
        .unwrap()
        .expect("the memory is recorded");
    assert!(image_dirs(&c.storage).contains(&mem.state.img.to_string()));
    wait_pass(
        &rh,
        at_snapshot + 2,
        "the guest stopped after a snapshot with memory",
    )
    .await;
    // The engine saw no migration in the save: the VM is up and takes commands.
    let status = async || db.vm_get(vm.id).await.unwrap().unwrap().runtime.status;
    assert_eq!(status().await, VmStatus::Up);

    // Paused, the guest makes no progress and stays paused through monitor rounds; pausing
    // again is refused; resumed, it goes on.
    let v = cmds.pause_vm(vm.id).await.unwrap();
    assert_eq!(v.runtime.status, VmStatus::Paused);
    assert_eq!(
        v.runtime.run_on_host, resumed.runtime.run_on_host,
        "paused where it runs"
    );
    let paused_at = last_pass(&rh).unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        last_pass(&rh).unwrap() <= paused_at + 1,
        "a paused guest went on writing"
    );
    assert_eq!(status().await, VmStatus::Paused, "the monitor unpaused it");
    assert!(matches!(
        cmds.pause_vm(vm.id).await,
        Err(CommandError::Conflict(_))
    ));
    assert_eq!(cmds.resume_vm(vm.id).await.unwrap().runtime.status, VmStatus::Up);
    wait_pass(&rh, paused_at + 2, "the resumed guest made no progress").await;
    assert_eq!(status().await, VmStatus::Up);

    // A QEMU that stops answering its monitor (SIGSTOP) is not_responding while its host
    // stays up and answers polls; once it answers again the VM is up.
    let here = resumed.runtime.run_on_host.unwrap();
    let node = e
        .app()
        .client(&db.host_get(here).await.unwrap().unwrap())
        .unwrap();
    let pid = node.call("VM.getInfo", json!({ "vmID": vm.id })).await.unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    let seen = cmds
        .wait_vm_status(vm.id, VmStatus::NotResponding, Duration::from_secs(20))
        .await;
    let host_status = db.host_get(here).await.unwrap().unwrap().status;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    seen.unwrap();
    eprintln!(
        "a stuck QEMU was reported not responding after {:?}",
        stopped.elapsed()
    );
    assert_eq!(host_status, HostStatus::Up, "one stuck QEMU took its host down");
    let noted = db
        .event_list(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .any(|ev| ev.code == 126 && ev.description.contains("not responding"));
    assert!(noted, "no event says the VM is not responding");
    cmds.wait_vm_status(vm.id, VmStatus::Up, Duration::from_secs(20))
        .await
        .unwrap();

    // A graceful shutdown: ACPI's power button, the guest powers off, the VM is down.
    let v = cmds.shutdown_vm(vm.id).await.unwrap();
    assert!(
        matches!(v.runtime.status, VmStatus::PoweringDown | VmStatus::Down),
        "{:?}",
        v.runtime
    );
    cmds.wait_vm_status(vm.id, VmStatus::Down, Duration::from_secs(60))
        .await
        .unwrap();
    let detail = db.vm_get(vm.id).await.unwrap().unwrap().runtime.status_detail;
    assert!(
        detail.as_deref().is_some_and(|d| d.contains("guest_shutdown")),
        "not powered off by the guest: {detail:?}"
    );
    cmds.preview_snapshot(vm.id, msnap.id, true, None).await.unwrap();
    assert_eq!(status().await, VmStatus::Suspended);
    cmds.commit_snapshot(vm.id, None).await.unwrap();
    assert_eq!(status().await, VmStatus::Suspended);
    let back = cmds
        .start_vm(vm.id, VmStartOptions::default(), None)
        .await
        .unwrap();
    let bh = host_name(&e, back.runtime.run_on_host.unwrap()).await;
    oxvirt_testkit::wait_for_text(&log_of(&bh), "OXVIRT-GUEST pass", Duration::from_secs(60)).unwrap();
    let text = std::fs::read_to_string(log_of(&bh)).unwrap();
    assert!(!text.contains("OXVIRT-GUEST ready"), "the guest booted:\n{text}");
    let first = passes_in(&text)[0];
    assert!(
        first <= at_snapshot + 1,
        "the guest went on from pass {first}, not from the snapshot's {at_snapshot}:\n{text}"
    );
    assert!(db.vm_hibernation_get(vm.id).await.unwrap().is_none());
    assert!(
        image_dirs(&c.storage).contains(&mem.state.img.to_string()),
        "the snapshot's memory went with the start"
    );
    let chain = db.volume_chain(vdisk).await.unwrap();

    // The snapshot's switch happens but the engine does not hear of it (the saga's "live"
    // step fails after its action ran): the undo finds the guest writing to the new volume,
    // so the saga turns forward and records the snapshot; the guest runs on.
    {
        use oxvirt_engine::commands::{AddSnapshotParams, AddSnapshotSaga, SnapDisk};
        use oxvirt_engine::saga::testing::{Fault, FaultAt, FaultPoint};
        let leaf = chain.last().unwrap().id;
        let new_leaf = oxvirt_engine::model::VolUuid::new_random();
        let lost = FaultAt::new(3, FaultPoint::AfterAction, Fault::Fail);
        let faulty = oxvirt_engine::saga::SagaExecutor::with_faults(
            db.clone(),
            e.app().clone(),
            lost.clone(),
            Default::default(),
        );
        let params_snapshot = oxvirt_engine::model::SnapshotId::new_random();
        let params = AddSnapshotParams {
            snapshot: params_snapshot,
            vm: vm.id,
            dc: dc.id,
            description: "unheard".into(),
            disks: vec![SnapDisk {
                disk: vdisk,
                sd: sd.id,
                capacity: 64 * MIB,
                old_leaf: leaf,
                new_leaf,
            }],
            live_on: back.runtime.run_on_host,
            memory: None,
            memory_volume_size: 0,
        };
        let outcome = faulty
            .start::<AddSnapshotSaga>(params, Default::default())
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert!(lost.fired());
        assert!(outcome.is_done(), "{outcome:?}");
        let taken = db.snapshot_get(params_snapshot).await.unwrap().unwrap();
        assert_eq!(taken.status, oxvirt_engine::model::SnapshotStatus::Ok);
        let now = db.volume_chain(vdisk).await.unwrap();
        assert_eq!(now.last().unwrap().id, new_leaf, "{now:?}");
        assert!(owner(new_leaf).is_some(), "the guest's new leaf lost its lease");
        let before = last_pass(&bh).unwrap();
        wait_pass(&bh, before + 1, "the guest stopped").await;
    }
    let chain = db.volume_chain(vdisk).await.unwrap();

    // Stop and remove: its disk leaves storage; the template's stays.
    cmds.stop_vm(vm.id).await.unwrap();
    cmds.wait_vm_status(vm.id, VmStatus::Down, Duration::from_secs(30))
        .await
        .unwrap();
    let start = Instant::now();
    while owner(chain.last().unwrap().id).is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a stopped VM kept its disk's lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cmds.remove_template(tmpl.id).await.is_err(),
        "a template in use cannot be removed"
    );
    cmds.remove_vm(vm.id, false, None).await.unwrap();
    assert!(db.vm_get(vm.id).await.unwrap().is_none());
    let imgs = image_dirs(&c.storage);
    assert!(!imgs.contains(&vdisk.to_string()), "{imgs:?}");
    assert!(imgs.contains(&tdisks[0].id.to_string()), "{imgs:?}");
    assert!(
        !imgs.contains(&mem.state.img.to_string()),
        "the memory of the removed VM's snapshot stays: {imgs:?}"
    );

    // The SPM node dies: the role moves to another host once its lease allows. (Maintenance
    // may have moved the role.)
    let spm_host = db.dc_get(dc.id).await.unwrap().unwrap().spm_host.unwrap();
    let spm_name = host_name(&e, spm_host).await;
    let idx = c.nodes.iter().position(|(n, _, _)| *n == spm_name).unwrap();
    let killed = Instant::now();
    c.nodes[idx].2.child.kill().unwrap();
    let _ = c.nodes[idx].2.child.wait();
    let new_spm = loop {
        let d = db.dc_get(dc.id).await.unwrap().unwrap();
        if let (oxvirt_engine::model::SpmStatus::Spm, Some(s)) = (d.spm_status, d.spm_host) {
            if s != spm_host {
                break s;
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the SPM role did not move"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let took = killed.elapsed();
    eprintln!(
        "SPM moved from {spm_name} to {} in {took:?}",
        host_name(&e, new_spm).await
    );
    // Never before the dead SPM's lease allowed: its last renewal was at most 2N before the
    // kill, and its host id is dead 8N + M after that (N = 1 s, M = 2 s).
    assert!(
        took >= Duration::from_secs(8),
        "the SPM role moved after {took:?}, before the lease could be free"
    );
    assert_eq!(
        db.host_get(spm_host).await.unwrap().unwrap().status,
        HostStatus::NonResponsive
    );
    // The new SPM serves storage verbs.
    let d2 = cmds
        .add_disk(cow_disk("after_failover", sd.id, 8 * MIB, None), None)
        .await
        .unwrap();
    assert!(image_dirs(&c.storage).contains(&d2.id.to_string()));
    e.shutdown().await;
}

/// With polls 20 s apart, the engine still records a VM's pause, resume and destruction done
/// behind its back at once (~0.1 s on an idle machine): the node's event stream kicks a
/// monitoring round. The bound, 5 s, holds on a loaded machine; without events a change waits
/// for the next poll, so five changes all recorded within it by chance are 0.25^5 unlikely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_events_bring_vm_changes_to_the_engine_between_polls() {
    let settings = oxvirt_engine::app::EngineSettings {
        monitor_interval: Duration::from_secs(20),
        ..common::fast_engine_settings()
    };
    let c = start_cluster_with(1, settings).await;
    let e = c.engine.clone();
    let (cmds, db) = (&e.cmds, &e.app().db);
    let cluster = db.cluster_get_by_name("Default").await.unwrap().unwrap();
    attach_data_domain(&c, "host1").await;
    let host = db.host_get_by_name("host1").await.unwrap().unwrap();
    let vm = cmds
        .add_vm(
            AddVm {
                name: "watched".into(),
                description: String::new(),
                cluster: cluster.id,
                template: BLANK_TEMPLATE_ID,
                memory_bytes: Some(256 * MIB),
                cpu: None,
                os: common::cluster::guest_os(&["oxvirt.writer=4"]),
                ha: None,
                resume_behavior: None,
            },
            None,
        )
        .await
        .unwrap();
    cmds.start_vm(vm.id, VmStartOptions::default(), None)
        .await
        .unwrap();
    cmds.wait_vm_status(vm.id, VmStatus::Up, Duration::from_secs(30))
        .await
        .unwrap();
    let node = e.app().client(&host).unwrap();
    let recorded = async |want: VmStatus, what: &str| {
        let start = Instant::now();
        loop {
            let v = db.vm_get(vm.id).await.unwrap().unwrap();
            if v.runtime.status == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{what}: the engine still records {:?} after {:?} (polls are 20 s apart)",
                v.runtime.status,
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    for round in 0..2 {
        node.call("VM.pause", json!({ "vmID": vm.id })).await.unwrap();
        let t = recorded(VmStatus::Paused, "pause").await;
        eprintln!("round {round}: pause recorded after {t:?}");
        node.call("VM.cont", json!({ "vmID": vm.id })).await.unwrap();
        let t = recorded(VmStatus::Up, "resume").await;
        eprintln!("round {round}: resume recorded after {t:?}");
    }
    node.call("VM.destroy", json!({ "vmID": vm.id })).await.unwrap();
    let t = recorded(VmStatus::Down, "destroy").await;
    eprintln!("destroy recorded after {t:?}");
}

/// Runs `args` in the mount namespace of process `pid` (`nsenter`), failing with its output.
fn in_mount_ns(pid: u32, args: &[&str]) {
    let out = std::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "--"])
        .args(args)
        .output()
        .expect("nsenter (util-linux) is needed for this test");
    assert!(
        out.status.success(),
        "nsenter {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One host loses the storage the others still use (in its own mount namespace a tmpfs hides
/// the shared directory): its domain monitor reports the domain bad, and after the grace the
/// engine makes the host non_operational, naming the domain; once it sees the storage again
/// it is up. The domain itself stays active: the other host and the SPM still use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_that_loses_a_domain_the_others_use_is_non_operational_until_it_sees_it_again() {
    let settings = oxvirt_engine::app::EngineSettings {
        storage_problem_grace: Duration::from_secs(2),
        ..common::fast_engine_settings()
    };
    let c = start_cluster_via(2, settings, &["unshare", "--mount", "--propagation", "private"]).await;
    let e = c.engine.clone();
    let db = &e.app().db;
    let (dc, sd) = attach_data_domain(&c, "host1").await;
    let spm = db.dc_get(dc.id).await.unwrap().unwrap().spm_host.unwrap();
    let victim = db
        .host_list(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .find(|h| h.id != spm)
        .unwrap();
    let pid = c
        .nodes
        .iter()
        .find(|(n, _, _)| *n == victim.name)
        .unwrap()
        .2
        .child
        .id();
    let storage = c.storage.display().to_string();

    let cut = Instant::now();
    in_mount_ns(
        pid,
        &["mount", "-t", "tmpfs", "oxvirt-test-hides-storage", &storage],
    );
    let detail = loop {
        let h = db.host_get(victim.id).await.unwrap().unwrap();
        if h.status == HostStatus::NonOperational {
            break h.status_detail.unwrap_or_default();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "host {} still {} after losing the storage",
            h.name,
            h.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = cut.elapsed();
    eprintln!("a host that lost a domain was non_operational after {took:?} (grace 2 s)");
    assert!(
        took >= Duration::from_secs(2),
        "blamed before the grace: {took:?}"
    );
    assert!(detail.contains(&sd.id.to_string()), "{detail}");
    let d = db.dc_get(dc.id).await.unwrap().unwrap();
    assert_eq!(d.spm_host, Some(spm), "the SPM did not move");
    let member = db
        .pool_members(dc.id)
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.storage_domain_id == sd.id)
        .unwrap();
    assert_eq!(member.status, oxvirt_engine::model::SdStatus::Active);
    assert_eq!(
        db.host_get(spm).await.unwrap().unwrap().status,
        HostStatus::Up,
        "the host that sees the domain is not blamed"
    );

    in_mount_ns(pid, &["umount", &storage]);
    let back = Instant::now();
    loop {
        let h = db.host_get(victim.id).await.unwrap().unwrap();
        if h.status == HostStatus::Up {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "host {} still {} with the storage back: {:?}",
            h.name,
            h.status,
            h.status_detail
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
