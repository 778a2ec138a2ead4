//! Live storage migration through the engine, on a real node, QEMU and two file domains: a
//! running VM's disk moves to another domain while the guest writes to it (every write the
//! guest made is on the disk afterwards). Each step of the saga fails once before and once
//! after its action: before the switch the move unwinds — the disk stays where it was, the
//! copy and the automatic snapshot go, the guest runs on; from the switch on it completes.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{attach_data_domain, cow_disk, data_domain, start_cluster};
use oxvirt_engine::commands::{AddVm, Answer, Commands, VmStartOptions, LSM_SNAPSHOT};
use oxvirt_engine::model::{DiskId, DiskStatus, SdUuid, VmStatus, BLANK_TEMPLATE_ID};
use oxvirt_engine::saga::testing::{Fault, FaultAt, FaultInjector, FaultPoint};
use oxvirt_engine::saga::{ForwardRetry, SagaExecutor};
use oxvirt_storage::FileStorageDomain;
use oxvirt_testkit::TestGuest;

const MIB: u64 = 1 << 20;
/// Where the guest's numbered writes start (in 4 KiB blocks: 16 MiB).
const SEQ_BASE: u64 = 4096;
/// Data put on the disk before the VM starts (bytes 0x5a): what the move has to copy.
const FILLED: std::ops::Range<u64> = 64 * MIB..320 * MIB;

/// The guest writes 4 KiB block `SEQ_BASE + k` with "OXV-SEQ k" (O_DIRECT), k = 0, 1, …, and
/// prints "OXVIRT-GUEST seq k" once each write is done.
const SEQ_WRITER: &str = "k=0; while [ $k -lt 3000 ]; do \
    printf 'OXV-SEQ %06d' $k | dd of=/dev/vda bs=4096 seek=$((4096 + k)) conv=sync oflag=direct \
    2>/dev/null && echo OXVIRT-GUEST seq $k; k=$((k + 1)); usleep 20000; done";

/// Faults for one saga only (the command runs three).
struct InSaga(&'static str, Arc<FaultAt>);

impl FaultInjector for InSaga {
    fn fault(&self, saga: &str, step: usize, point: FaultPoint) -> Option<Fault> {
        (saga == self.0)
            .then(|| self.1.fault(saga, step, point))
            .flatten()
    }
}

/// The last "OXVIRT-GUEST seq k" the guest printed.
fn last_seq(console: &Path) -> Option<u64> {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("OXVIRT-GUEST seq ")?.trim().parse().ok())
        .next_back()
}

/// Waits until the guest has printed a write numbered above `after`.
async fn wait_seq_past(console: &Path, after: u64, within: Duration) -> u64 {
    let start = Instant::now();
    loop {
        if let Some(k) = last_seq(console).filter(|k| *k > after) {
            return k;
        }
        assert!(
            start.elapsed() < within,
            "the guest wrote nothing past {after} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn image_exists(root: &Path, sd: SdUuid, disk: DiskId) -> bool {
    FileStorageDomain::find(root, sd).unwrap().image_exists(disk)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_vms_disk_moves_to_another_domain_under_the_writing_guest() {
    let c = start_cluster(1).await;
    let e = c.engine.clone();
    let (cmds, db) = (&e.cmds, &e.app().db);
    let (dc, sd) = attach_data_domain(&c, "host1").await;
    let host = db.host_get_by_name("host1").await.unwrap().unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut req = data_domain(&dir2.path().display().to_string(), host.id);
    req.name = "data2".into();
    let sd2 = cmds.add_storage_domain(req, None).await.unwrap();
    cmds.attach_storage_domain(dc.id, sd2.id, None).await.unwrap();
    cmds.wait_domain_active(dc.id, sd2.id, Duration::from_secs(90))
        .await
        .unwrap();
    let cluster = db.cluster_get_by_name("Default").await.unwrap().unwrap();
    let vm = cmds
        .add_vm(
            AddVm {
                name: "mover".into(),
                description: String::new(),
                cluster: cluster.id,
                template: BLANK_TEMPLATE_ID,
                memory_bytes: Some(256 * MIB),
                cpu: None,
                os: common::cluster::guest_os(&[&TestGuest::run_arg(SEQ_WRITER)]),
                ha: None,
                resume_behavior: None,
            },
            None,
        )
        .await
        .unwrap();
    let disk = cmds
        .add_disk(
            cow_disk("mover_disk", sd.id, 384 * MIB, Some((vm.id, true))),
            None,
        )
        .await
        .unwrap()
        .id;
    let vol0 = FileStorageDomain::find(&c.storage, sd.id)
        .unwrap()
        .chain_paths(disk)
        .unwrap()
        .pop()
        .unwrap();
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!(
            "write -P 0x5a {} {}",
            FILLED.start,
            FILLED.end - FILLED.start
        ))
        .arg(&vol0)
        .output()
        .expect("qemu-io (qemu-utils) runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let leaf0 = db.volume_chain(disk).await.unwrap()[0].id;
    cmds.start_vm(vm.id, VmStartOptions::default(), None)
        .await
        .unwrap();
    cmds.wait_vm_status(vm.id, VmStatus::Up, Duration::from_secs(30))
        .await
        .unwrap();
    let console = c.console("host1", vm.id);
    let seen = wait_seq_past(&console, 5, Duration::from_secs(90)).await;

    // Moved to a domain that is not there: refused, nothing changes.
    let err = cmds
        .move_disk(disk, SdUuid::new_random(), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");

    // Each step of the saga fails once, before and after its action, the disk moving back and
    // forth: before the switch the move unwinds — the mirror dropped, the copy deleted, the
    // disk where it was; a switch that happened counts (the saga goes forward); past it, the
    // failure is retried to the end. Every time the automatic snapshot is merged away again,
    // the records match storage, the VM holds the lease of the leaf it writes and nothing on
    // the other domain, and the guest writes on.
    let owner = |root: &Path, sd: SdUuid, vol| {
        let dom = FileStorageDomain::find(root, sd).unwrap();
        oxvirt_storage::spm::volume_lease_owner(&dom, disk, vol).unwrap()
    };
    let mut here = (sd.id, c.storage.clone());
    let mut there = (sd2.id, dir2.path().to_path_buf());
    let mut seen = seen;
    let retry = ForwardRetry {
        attempts: 3,
        first_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
    };
    for step in 1..=6 {
        for point in [FaultPoint::BeforeAction, FaultPoint::AfterAction] {
            let what = format!("step {step} failing {point:?}");
            let app = e.app().clone();
            let fault = FaultAt::new(step, point, Fault::Fail);
            let sagas = SagaExecutor::with_faults(
                app.db.clone(),
                app.clone(),
                Arc::new(InSaga("live_move_disk", fault.clone())),
                retry,
            );
            Commands::register_all(&sagas).unwrap();
            let faulty = Commands {
                app,
                sagas,
                answer: Answer::WhenDone,
            };
            let r = faulty.move_disk(disk, there.0, None).await;
            assert!(fault.fired(), "{what}: the fault was not reached: {r:?}");
            // The switch (step 4) made before its answer was lost, or anything later: moved.
            let moved = step > 4 || (step == 4 && point == FaultPoint::AfterAction);
            match &r {
                Ok(_) => assert!(moved, "{what}: moved"),
                Err(e) => assert!(!moved && e.to_string().contains("rolled back"), "{what}: {e}"),
            }
            if moved {
                std::mem::swap(&mut here, &mut there);
            }
            let d = db.disk_get(disk).await.unwrap().unwrap();
            assert_eq!(
                (d.storage_domain_id, d.status),
                (here.0, DiskStatus::Ok),
                "{what}"
            );
            let chain = db.volume_chain(disk).await.unwrap();
            assert_eq!(
                chain.iter().map(|v| v.id).collect::<Vec<_>>(),
                vec![leaf0],
                "{what}: {chain:?}"
            );
            assert!(
                chain.iter().all(|v| v.storage_domain_id == here.0),
                "{what}: {chain:?}"
            );
            let dom = FileStorageDomain::find(&here.1, here.0).unwrap();
            assert_eq!(dom.chain(disk).unwrap().ids(), vec![leaf0], "{what}");
            assert!(
                !image_exists(&there.1, there.0, disk),
                "{what}: the other copy stays"
            );
            assert!(
                db.snapshots_of_vm(vm.id)
                    .await
                    .unwrap()
                    .iter()
                    .all(|s| s.description != LSM_SNAPSHOT),
                "{what}: the automatic snapshot stays"
            );
            assert!(
                owner(&here.1, here.0, leaf0).is_some(),
                "{what}: the VM gave up its leaf's lease"
            );
            seen = wait_seq_past(&console, seen, Duration::from_secs(30)).await;
        }
    }

    // The bare tool for comparison: copying the same image with qemu-img as the storage layer
    // copies (direct I/O both ways, so the data is on disk and not in the page cache; sharing
    // the image with the running QEMU): what a cold move costs in data alone.
    let src_leaf = FileStorageDomain::find(&here.1, here.0)
        .unwrap()
        .chain_paths(disk)
        .unwrap()
        .pop()
        .unwrap();
    let t = Instant::now();
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-t", "none", "-T", "none", "-O", "qcow2"])
        .arg(&src_leaf)
        .arg(scratch.path().join("bare.qcow2"))
        .status()
        .expect("qemu-img (qemu-utils) runs");
    let bare = t.elapsed();
    assert!(status.success());

    // The real move, timed from the command to its answer.
    let t = Instant::now();
    let moved = cmds.move_disk(disk, there.0, None).await.unwrap();
    let took = t.elapsed();
    println!(
        "live storage migration of a disk holding 256 MiB under a writing guest: {took:?}; qemu-img convert of it: {bare:?} (ratio {:.1})",
        took.as_secs_f64() / bare.as_secs_f64()
    );
    // Where the time went: the command's three jobs (snapshot, move, snapshot removal), step
    // by step, from the engine's job records.
    let mut jobs = db.job_list(&Default::default()).await.unwrap();
    jobs.sort_by_key(|j| j.started_at.as_millis());
    for j in &jobs[jobs.len() - 3..] {
        println!("  {}", j.description);
        for st in db.job_steps(j.id).await.unwrap() {
            let ms = st.ended_at.map(|e| e.as_millis() - st.started_at.as_millis());
            println!("    {:>5} ms  {}", ms.unwrap_or(-1), st.description);
        }
    }
    std::mem::swap(&mut here, &mut there);
    assert_eq!((moved.storage_domain_id, moved.status), (here.0, DiskStatus::Ok));
    let chain = db.volume_chain(disk).await.unwrap();
    assert_eq!(
        chain.len(),
        1,
        "the automatic snapshot was merged away: {chain:?}"
    );
    assert!(chain.iter().all(|v| v.storage_domain_id == here.0), "{chain:?}");
    assert!(!image_exists(&there.1, there.0, disk), "the source stays");
    let dom = FileStorageDomain::find(&here.1, here.0).unwrap();
    let on = dom.chain(disk).unwrap();
    assert_eq!(on.ids(), vec![chain[0].id]);
    assert_eq!(on.leaf().meta.legality, oxvirt_storage::Legality::Legal);
    for root in [&here, &there] {
        let report = FileStorageDomain::find(&root.1, root.0)
            .unwrap()
            .check(true)
            .unwrap();
        assert!(report.is_clean(), "{:#?}", report.problems);
    }
    assert!(
        owner(&here.1, here.0, chain[0].id).is_some(),
        "the VM holds its new leaf's lease"
    );
    assert_eq!(
        db.vm_get(vm.id).await.unwrap().unwrap().runtime.status,
        VmStatus::Up
    );
    let last = wait_seq_past(&console, seen + 10, Duration::from_secs(30)).await;

    // Stopped, the disk holds every write the guest made, before, during and after the moves.
    cmds.stop_vm(vm.id).await.unwrap();
    let last = last_seq(&console).unwrap_or(last);
    let flat = scratch.path().join("flat.raw");
    let leaf = dom.chain_paths(disk).unwrap().pop().unwrap();
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&leaf)
        .arg(&flat)
        .status()
        .expect("qemu-img (qemu-utils) runs");
    assert!(status.success());
    let data = std::fs::read(&flat).unwrap();
    for k in 0..=last {
        let off = ((SEQ_BASE + k) * 4096) as usize;
        let want = format!("OXV-SEQ {k:06}");
        assert_eq!(
            &data[off..off + want.len()],
            want.as_bytes(),
            "write {k} of {last} is not on the moved disk"
        );
    }
    let filled = &data[FILLED.start as usize..FILLED.end as usize];
    assert!(
        filled.iter().all(|b| *b == 0x5a),
        "the data written before the start changed"
    );
}
