//! VM lifecycle on real QEMU (TCG) with the test guest: start, stats, pause/resume, balloon,
//! hooks, graceful shutdown and its fallback, QEMU dying, self-fencing of the VMs holding leases
//! on a storage domain, live snapshot and live merge while the guest writes.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use oxvirt_node::vm::hooks::Hooks;
use oxvirt_node::vm::{DownKind, PauseReason, SnapshotDisk, VmDisk, VmManager, VmManagerConfig, VmStatus};
use oxvirt_qemu::{NicBackend, NicSpec};

const BOOT: Duration = Duration::from_secs(60);

async fn manager(run_dir: &Path, hooks: Option<&Path>) -> Arc<VmManager> {
    let mut cfg = VmManagerConfig::new(run_dir);
    cfg.hooks = Hooks::new(hooks.map(Path::to_path_buf), Duration::from_secs(10));
    VmManager::open(cfg).await.unwrap()
}

fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> tokio::task::JoinHandle<T> {
    tokio::task::spawn_blocking(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_stats_pause_resume_balloon_shutdown_destroy_with_hooks() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let _reaper = QemuReaper(vec![run.clone()]);
    let hooks = tmp.path().join("hooks");
    let hook_log = tmp.path().join("hooks.log");
    logging_hook(&hooks, "before_vm_start", &hook_log);
    logging_hook(&hooks, "after_vm_destroy", &hook_log);
    let mgr = manager(&run, Some(&hooks)).await;

    let img = tmp.path().join("disk.qcow2");
    create_qcow2(&img, 32, None);
    let mut req = guest_vm(
        "life",
        vec![VmDisk::new(vec![qcow2_layer(&img)])],
        &[&writer_arg()],
    );
    req.nics = vec![NicSpec::new("52:54:00:ab:cd:01", NicBackend::User)];
    req.vnc = true;
    let id = req.id;
    let info = mgr.create(req.clone()).await.unwrap();
    assert_eq!(info.status, VmStatus::Up);
    assert!(mgr.vm_dir(id).join("vnc.sock").exists(), "VNC on a local socket");
    assert!(info.pid > 0);
    // The same id twice is refused and changes nothing.
    assert!(mgr.create(req).await.is_err());
    assert_eq!(mgr.list().len(), 1);

    let log = mgr.console_log(id);
    let l = log.clone();
    blocking(move || wait_passes(&l, 0, 1, BOOT)).await.unwrap();

    let stats = mgr.stats(id).await.unwrap();
    assert!(stats.cpu_user_ms + stats.cpu_system_ms > 0, "{stats:?}");
    assert_eq!(stats.vcpu_ms.len(), 1);
    assert!(stats.rss_bytes > 0);
    assert!(
        stats.disks.iter().any(|d| d.wr_bytes >= MIB),
        "the guest's writes show in the disk stats: {stats:?}"
    );

    let info = mgr.pause(id).await.unwrap();
    assert_eq!(
        info.status,
        VmStatus::Paused {
            reason: PauseReason::User
        }
    );
    assert!(mgr.pause(id).await.is_err(), "already paused");
    let before = passes(&log);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(passes(&log), before, "a paused guest does not write");
    assert_eq!(mgr.resume(id).await.unwrap().status, VmStatus::Up);
    let l = log.clone();
    blocking(move || wait_passes(&l, before, 1, BOOT)).await.unwrap();

    // Balloon: the guest gives memory back down to the target.
    assert!(mgr.set_balloon(id, 4096).await.is_err(), "above the VM's memory");
    mgr.set_balloon(id, 200).await.unwrap();
    let mut actual = 0;
    for _ in 0..200 {
        actual = mgr.stats(id).await.unwrap().balloon_actual_bytes.unwrap_or(0);
        if actual == 200 * MIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(actual, 200 * MIB, "balloon did not reach its target");
    assert_eq!(mgr.stats(id).await.unwrap().balloon_target_mib, Some(200));

    // Graceful shutdown: the guest answers the ACPI power button.
    let reason = mgr.shutdown(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(reason.kind, DownKind::GuestShutdown, "{reason:?}");
    console_has(&log, "OXVIRT-GUEST powerdown", Duration::from_secs(5));
    assert!(mgr.pause(id).await.is_err(), "a down VM cannot be paused");
    let dir = mgr.vm_dir(id);
    assert!(dir.exists());
    let reason = mgr.destroy(id).await.unwrap();
    assert_eq!(reason.kind, DownKind::GuestShutdown);
    assert!(!dir.exists(), "destroy cleans the run directory");
    assert!(mgr.status(id).is_err());
    assert_eq!(
        std::fs::read_to_string(&hook_log).unwrap(),
        "before_vm_start life\nafter_vm_destroy life\n"
    );
    verify_writer_data(&img);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_falls_back_to_destroy_a_dead_qemu_is_reported_and_fencing_kills_lease_holders() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let _reaper = QemuReaper(vec![run.clone()]);
    let mgr = manager(&run, None).await;
    let img_a = tmp.path().join("a.qcow2");
    let img_b = tmp.path().join("b.qcow2");
    create_qcow2(&img_a, 16, None);
    create_qcow2(&img_b, 16, None);
    // This guest ignores the power button.
    let deaf = guest_vm(
        "deaf",
        vec![VmDisk::new(vec![qcow2_layer(&img_a)])],
        &[
            &oxvirt_testkit::TestGuest::run_arg("killall acpid"),
            "oxvirt.marker=deaf",
        ],
    );
    let victim = guest_vm("victim", vec![VmDisk::new(vec![qcow2_layer(&img_b)])], &[]);
    // This one holds a lease on a storage domain (no disk needed for that).
    let sd = oxvirt_types::SdUuid::new_random();
    let mut leased = guest_vm("leased", vec![], &["oxvirt.marker=leased"]);
    leased.lease_domains = vec![sd];
    let (a, b, c) = tokio::join!(
        mgr.create(deaf.clone()),
        mgr.create(victim.clone()),
        mgr.create(leased.clone())
    );
    a.unwrap();
    let b = b.unwrap();
    let c = c.unwrap();
    let l = mgr.console_log(deaf.id);
    blocking(move || console_has(&l, "OXVIRT-MARKER deaf", BOOT))
        .await
        .unwrap();

    // Reboot: the same QEMU, the guest boots again (and runs its script again).
    mgr.reboot(deaf.id).await.unwrap();
    let l = mgr.console_log(deaf.id);
    blocking(move || {
        let start = std::time::Instant::now();
        while std::fs::read_to_string(&l)
            .unwrap_or_default()
            .matches("OXVIRT-MARKER deaf")
            .count()
            < 2
        {
            assert!(start.elapsed() < BOOT, "the guest did not boot again");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    assert_eq!(mgr.status(deaf.id).unwrap().status, VmStatus::Up);

    let reason = mgr.shutdown(deaf.id, Duration::from_secs(3)).await.unwrap();
    assert_eq!(reason.kind, DownKind::Destroyed, "{reason:?}");
    assert!(reason.detail.contains("timed out"), "{reason:?}");

    // QEMU killed behind the node's back: Down with the reason.
    // SAFETY: kill(2) on the VM's QEMU pid as the manager reported it.
    unsafe { libc::kill(b.pid as i32, libc::SIGKILL) };
    let st = mgr
        .wait_for(victim.id, Duration::from_secs(20), VmStatus::is_down)
        .await
        .unwrap();
    match st {
        VmStatus::Down { reason } => {
            assert_eq!(reason.kind, DownKind::Died);
            assert!(reason.detail.contains("signal 9"), "{reason:?}");
        }
        other => panic!("{other:?}"),
    }

    // Self-fencing: a domain no VM uses kills nothing; the leased VM's domain kills it within
    // the bound, confirmed by the process's exit.
    let l = mgr.console_log(leased.id);
    blocking(move || console_has(&l, "OXVIRT-MARKER leased", BOOT))
        .await
        .unwrap();
    let rep = mgr
        .fence_storage_domain(oxvirt_types::SdUuid::new_random(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(rep.killed.is_empty(), "{rep:?}");
    assert_eq!(mgr.status(leased.id).unwrap().status, VmStatus::Up);
    let start = std::time::Instant::now();
    let rep = mgr
        .fence_storage_domain(sd, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(rep.killed, vec![leased.id]);
    assert!(
        !std::path::Path::new(&format!("/proc/{}", c.pid)).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", c.pid))
                .unwrap_or_default()
                .contains(") Z"),
        "QEMU survived fencing"
    );
    let st = mgr
        .wait_for(leased.id, Duration::from_secs(10), VmStatus::is_down)
        .await
        .unwrap();
    match st {
        VmStatus::Down { reason } => assert_eq!(reason.kind, DownKind::Fenced, "{reason:?}"),
        other => panic!("{other:?}"),
    }
    mgr.destroy(deaf.id).await.unwrap();
    mgr.destroy(victim.id).await.unwrap();
    mgr.destroy(leased.id).await.unwrap();
    assert!(mgr.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_snapshot_and_live_merge_while_the_guest_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let _reaper = QemuReaper(vec![run.clone()]);
    let mgr = manager(&run, None).await;
    let images = tmp.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let base = images.join("base");
    let s1 = images.join("snap1");
    let s2 = images.join("snap2");
    create_qcow2(&base, 32, None);
    let req = guest_vm(
        "snap",
        vec![VmDisk::new(vec![qcow2_layer(&base)])],
        &[&writer_arg()],
    );
    let id = req.id;
    mgr.create(req).await.unwrap();
    let log = mgr.console_log(id);
    let wait = |from: usize| {
        let l = log.clone();
        blocking(move || wait_passes(&l, from, 1, BOOT))
    };
    let mut p = wait(0).await.unwrap();

    // Live snapshot onto an overlay the SPM would have created, with freeze/thaw.
    create_qcow2(&s1, 32, Some(&base));
    let bad = mgr
        .snapshot(
            id,
            vec![SnapshotDisk {
                disk: 0,
                overlay: images.join("missing"),
            }],
            None,
        )
        .await;
    assert!(bad.is_err());
    assert_eq!(mgr.status(id).unwrap().chains[0], vec![base.clone()]);
    let rep = mgr
        .snapshot(
            id,
            vec![SnapshotDisk {
                disk: 0,
                overlay: s1.clone(),
            }],
            None,
        )
        .await
        .unwrap();
    assert!(rep.frozen, "{rep:?}");
    let text = console_has(&log, "OXVIRT-GUEST fsfreeze thawed", Duration::from_secs(10));
    assert!(text.contains("OXVIRT-GUEST fsfreeze frozen"));
    assert_eq!(mgr.status(id).unwrap().chains[0], vec![base.clone(), s1.clone()]);
    p = wait(p).await.unwrap();

    // With memory: a state that cannot be written (a full disk) fails the snapshot, the
    // chain stays and the guest runs on; then the state is saved, the disk switches, and the
    // guest runs on.
    create_qcow2(&s2, 32, Some(&s1));
    let s2_disk = || {
        vec![SnapshotDisk {
            disk: 0,
            overlay: s2.clone(),
        }]
    };
    let err = mgr
        .snapshot(id, s2_disk(), Some(Path::new("/dev/full")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/dev/full"), "{err}");
    assert_eq!(mgr.status(id).unwrap().status, VmStatus::Up);
    assert_eq!(mgr.status(id).unwrap().chains[0], vec![base.clone(), s1.clone()]);
    p = wait(p).await.unwrap();
    let memory = images.join("memory");
    std::fs::write(&memory, b"").unwrap();
    let rep = mgr.snapshot(id, s2_disk(), Some(&memory)).await.unwrap();
    let saved = rep.memory_bytes.expect("memory saved");
    eprintln!(
        "snapshot with memory: {saved} bytes, {} ms from the call to the guest running on, QEMU's stream {} ms",
        rep.elapsed_ms,
        rep.memory_stream_ms.unwrap_or(0)
    );
    assert!(saved > 1 << 20, "{rep:?}");
    assert_eq!(std::fs::metadata(&memory).unwrap().len(), saved);
    assert!(!rep.frozen, "the paused guest was frozen too: {rep:?}");
    assert_eq!(mgr.status(id).unwrap().status, VmStatus::Up);
    p = wait(p).await.unwrap();
    // A replay (the engine asking again) changes nothing.
    let again = mgr.snapshot(id, s2_disk(), Some(&memory)).await.unwrap();
    assert_eq!(again.memory_bytes, None);
    assert_eq!(std::fs::metadata(&memory).unwrap().len(), saved);
    // New writes land in the active overlay, not the base.
    let info = common_info(&s2);
    assert!(info.contains("backing file: snap1"), "{info}");

    // Internal merge: snap1 into base; snap2 now backs onto base by bare name.
    let m = mgr
        .merge(id, 0, &base, &s1, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(!m.active);
    assert_eq!(m.removed, vec![s1.clone()]);
    assert_eq!(mgr.status(id).unwrap().chains[0], vec![base.clone(), s2.clone()]);
    let info = common_info(&s2);
    assert!(info.contains("backing file: base"), "{info}");
    p = wait(p).await.unwrap();

    // Active merge with pivot: snap2 into base; the guest now writes to base.
    assert!(mgr
        .merge(id, 0, &s2, &base, Duration::from_secs(5))
        .await
        .is_err());
    let m = mgr
        .merge(id, 0, &base, &s2, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(m.active);
    assert_eq!(mgr.status(id).unwrap().chains[0], vec![base.clone()]);
    let st = mgr.stats(id).await.unwrap();
    assert_eq!(st.status, VmStatus::Up);
    p = wait(p).await.unwrap();
    // QEMU let go of the merged layers: their files are closed, and the base takes a new
    // snapshot (it is nobody's backing any more).
    let pid = mgr.status(id).unwrap().pid;
    let open: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect();
    for merged in [&s1, &s2] {
        assert!(!open.contains(merged), "QEMU keeps {} open", merged.display());
    }
    let s3 = images.join("snap3");
    create_qcow2(&s3, 32, Some(&base));
    mgr.snapshot(
        id,
        vec![SnapshotDisk {
            disk: 0,
            overlay: s3.clone(),
        }],
        None,
    )
    .await
    .unwrap();
    assert_eq!(mgr.status(id).unwrap().chains[0], vec![base.clone(), s3.clone()]);
    wait(p).await.unwrap();

    mgr.destroy(id).await.unwrap();
    // Everything the guest wrote through snapshots and merges is in the chain.
    verify_writer_data(&s3);
}

fn common_info(img: &Path) -> String {
    let out = std::process::Command::new(oxvirt_testkit::require_tool("qemu-img"))
        .args(["info", "-U"])
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
