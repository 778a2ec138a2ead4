//! Storage failing under running VMs. The shared directory is a FUSE pass-through
//! ([`oxvirt_testkit::faultfs::FaultFs`]) that can be made to answer `EIO`, as a dead NFS
//! server would: QEMU, the leases and the domain monitor meet real errors from real system
//! calls. Guests stop instead of seeing the errors; afterwards each VM is resumed, left paused
//! or killed (and, being highly available, restarted) as its resume behaviour says.

use std::time::{Duration, Instant};

use crate::common;
use common::cluster::{attach_data_domain, cow_disk, guest_vm, start_cluster};
use oxvirt_engine::commands::{AddVm, VmStartOptions};
use oxvirt_engine::db::{EventFilter, ListQuery, Ref};
use oxvirt_engine::model::{HighAvailability, ResumeBehavior, SdUuid, Vm, VmStatus};
use oxvirt_testkit::faultfs::FaultFs;
use oxvirt_types::VmId;

const MIB: u64 = 1 << 20;

async fn add_writer_vm(
    e: &oxvirt_engine::daemon::Engine,
    name: &str,
    sd: SdUuid,
    behavior: Option<ResumeBehavior>,
    ha: bool,
) -> Vm {
    let req = AddVm {
        ha: ha.then_some(HighAvailability {
            enabled: true,
            priority: 1,
        }),
        resume_behavior: behavior,
        ..guest_vm(e, name, &["oxvirt.writer=4"]).await
    };
    let vm = e.cmds.add_vm(req, None).await.unwrap();
    e.cmds
        .add_disk(
            cow_disk(&format!("{name}_disk"), sd, 16 * MIB, Some((vm.id, true))),
            None,
        )
        .await
        .unwrap();
    e.cmds
        .start_vm(vm.id, VmStartOptions::default(), None)
        .await
        .unwrap();
    vm.entity
}

async fn vm_now(e: &oxvirt_engine::daemon::Engine, id: VmId) -> Vm {
    e.app().db.vm_get(id).await.unwrap().unwrap()
}

/// Waits until the engine's record of `id` satisfies `pred`; the failure names what it saw.
async fn wait_vm(
    e: &oxvirt_engine::daemon::Engine,
    id: VmId,
    what: &str,
    limit: Duration,
    pred: impl Fn(&Vm) -> bool,
) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        let v = vm_now(e, id).await;
        if pred(&v) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            return Err(format!(
                "VM {} not {what} after {limit:?}: {} ({:?})",
                v.name, v.runtime.status, v.runtime.status_detail
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn paused_eio(v: &Vm) -> bool {
    v.runtime.status == VmStatus::Paused && v.runtime.status_detail.as_deref() == Some("eio")
}

/// The codes of the events recorded for `vm`.
async fn event_codes(e: &oxvirt_engine::daemon::Engine, vm: VmId) -> Vec<(i32, String)> {
    let q = ListQuery {
        filter: EventFilter {
            vm: Some(Ref::Id(vm)),
            ..Default::default()
        },
        ..Default::default()
    };
    let events = e.app().db.event_list(&q).await.unwrap();
    events.into_iter().map(|ev| (ev.code, ev.description)).collect()
}

fn console(c: &common::cluster::Cluster, vm: VmId) -> String {
    std::fs::read_to_string(c.console("host1", vm)).unwrap_or_default()
}

/// Waits for a writer pass the guest finished after byte `from` of its console.
fn wait_new_pass(c: &common::cluster::Cluster, vm: VmId, from: usize, limit: Duration) {
    let t = Instant::now();
    while !console(c, vm)
        .get(from..)
        .unwrap_or("")
        .contains("OXVIRT-GUEST pass")
    {
        assert!(
            t.elapsed() < limit,
            "the guest wrote no new pass in {limit:?}:\n{}",
            console(c, vm)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vms_ride_out_storage_outages_as_their_resume_behaviour_says() {
    let c = start_cluster(1).await;
    let e = c.engine.clone();
    // The shared directory becomes a mount whose I/O can fail (before any domain is on it).
    let backing = tempfile::tempdir().unwrap();
    let fs = FaultFs::mount(backing.path(), &c.storage);
    let (_, sd) = attach_data_domain(&c, "host1").await;

    let auto = add_writer_vm(&e, "auto", sd.id, None, false).await;
    let leave = add_writer_vm(&e, "leave", sd.id, Some(ResumeBehavior::LeavePaused), false).await;
    for v in [&auto, &leave] {
        oxvirt_testkit::wait_for_text(
            &c.console("host1", v.id),
            "OXVIRT-GUEST pass 0",
            Duration::from_secs(90),
        )
        .unwrap();
    }
    assert_eq!(
        vm_now(&e, auto.id).await.effective_resume_behavior(),
        ResumeBehavior::AutoResume
    );

    // 1. The whole storage fails for a moment (well under 8 × io_timeout, so no lease is at
    //    risk): both guests stop, the engine shows why.
    let out = Instant::now();
    fs.fail(true);
    let mut seen = Vec::new();
    for v in [&auto, &leave] {
        let r = wait_vm(&e, v.id, "paused on EIO", Duration::from_secs(5), paused_eio).await;
        seen.push(r);
    }
    let paused_after = out.elapsed();
    fs.fail(false);
    for r in seen {
        r.unwrap();
    }
    assert!(fs.failed_ops() > 0, "the outage failed nothing");
    let auto_console = console(&c, auto.id).len();
    let resumed = wait_vm(&e, auto.id, "up again", Duration::from_secs(20), |v| {
        v.runtime.status == VmStatus::Up
    })
    .await
    .unwrap();
    eprintln!("BENCH storage outage: guests paused (engine) {paused_after:?} after it began; auto_resume VM up {resumed:?} after storage came back");
    wait_new_pass(&c, auto.id, auto_console, Duration::from_secs(30));
    // leave_paused waits for the administrator.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        paused_eio(&vm_now(&e, leave.id).await),
        "leave_paused stays paused"
    );
    let leave_console = console(&c, leave.id).len();
    e.cmds.resume_vm(leave.id).await.unwrap();
    wait_vm(&e, leave.id, "up", Duration::from_secs(10), |v| {
        v.runtime.status == VmStatus::Up && v.runtime.status_detail.is_none()
    })
    .await
    .unwrap();
    wait_new_pass(&c, leave.id, leave_console, Duration::from_secs(30));
    // The guests never saw an error; the engine recorded oVirt's events.
    for v in [&auto, &leave] {
        let text = console(&c, v.id);
        assert!(
            !text.contains("write failed"),
            "{} saw an I/O error:\n{text}",
            v.name
        );
        let events = event_codes(&e, v.id).await;
        assert!(
            events
                .iter()
                .any(|(code, d)| *code == 145 && d.contains("storage I/O problem")),
            "{events:?}"
        );
    }
    let events = event_codes(&e, auto.id).await;
    assert!(
        events.iter().any(|(code, _)| *code == 196),
        "recovered: {events:?}"
    );
    e.cmds.stop_vm(leave.id).await.unwrap();

    // 2. The storage is full (every write to the images refused with ENOSPC, as an exhausted
    //    thin-provisioned export does): the guest stops on ENOSPC, which no storage check
    //    answers — even auto_resume waits for an administrator to free space and resume it.
    fs.full_under("images");
    if let Err(err) = wait_vm(&e, auto.id, "paused on ENOSPC", Duration::from_secs(5), |v| {
        v.runtime.status == VmStatus::Paused && v.runtime.status_detail.as_deref() == Some("enospc")
    })
    .await
    {
        fs.fail(false);
        panic!("{err}");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = vm_now(&e, auto.id).await;
    fs.fail(false);
    assert_eq!(
        (v.runtime.status, v.runtime.status_detail.as_deref()),
        (VmStatus::Paused, Some("enospc")),
        "a full storage is not resumed into"
    );
    let events = event_codes(&e, auto.id).await;
    assert!(
        events
            .iter()
            .any(|(code, d)| *code == 138 && d.contains("no Storage space")),
        "{events:?}"
    );
    let before = console(&c, auto.id).len();
    e.cmds.resume_vm(auto.id).await.unwrap();
    wait_new_pass(&c, auto.id, before, Duration::from_secs(30));
    assert!(
        !console(&c, auto.id).contains("write failed"),
        "the guest saw ENOSPC"
    );
    e.cmds.stop_vm(auto.id).await.unwrap();

    // 3. Only the images fail (the leases and metadata still work, so no self-fencing): a
    //    highly available VM — resume behaviour kill — is killed once paused 8 × io_timeout,
    //    and restarted when the storage is back; it never runs twice.
    let ha = add_writer_vm(&e, "havm", sd.id, Some(ResumeBehavior::AutoResume), true).await;
    assert_eq!(
        vm_now(&e, ha.id).await.resume_behavior,
        ResumeBehavior::Kill,
        "an HA VM is killed on long storage errors, whatever was asked"
    );
    oxvirt_testkit::wait_for_text(
        &c.console("host1", ha.id),
        "OXVIRT-GUEST pass 0",
        Duration::from_secs(90),
    )
    .unwrap();
    let qemu1 = c.qemu_pid("host1", ha.id);
    fs.fail_under("images");
    let paused = match wait_vm(&e, ha.id, "paused on EIO", Duration::from_secs(5), paused_eio).await {
        Ok(_) => Instant::now(),
        Err(err) => {
            fs.fail(false);
            panic!("{err}");
        }
    };
    let killed = loop {
        let events = event_codes(&e, ha.id).await;
        if events
            .iter()
            .any(|(code, d)| *code == 61 && d.contains("paused_too_long"))
        {
            break paused.elapsed();
        }
        if paused.elapsed() > Duration::from_secs(30) {
            fs.fail(false);
            panic!("the HA VM was not killed after 30 s paused: {events:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The kill waits 8 × io_timeout (1 s here) from the first pause — the resumes tried
    // meanwhile (the domain's metadata reads fine) stop the guest again at once and do not
    // restart that clock; the engine learns of the kill within a poll.
    assert!(
        (Duration::from_secs(7)..Duration::from_secs(14)).contains(&killed),
        "killed {killed:?} after the first pause"
    );
    let t = Instant::now();
    while oxvirt_testkit::process_alive(qemu1) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "QEMU {qemu1} outlived the kill"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    fs.fail(false);
    let restarted = wait_vm(&e, ha.id, "up again", Duration::from_secs(90), |v| {
        v.runtime.status == VmStatus::Up
    })
    .await
    .unwrap();
    eprintln!("BENCH images failing under an HA VM: killed {killed:?} after its pause; up again {restarted:?} after the storage came back");
    let qemu2 = c.qemu_pid("host1", ha.id);
    assert_ne!(qemu1, qemu2, "a new QEMU runs it");
    oxvirt_testkit::wait_for_text(
        &c.console("host1", ha.id),
        "OXVIRT-GUEST pass 0",
        Duration::from_secs(90),
    )
    .unwrap();
    e.cmds.stop_vm(ha.id).await.unwrap();
    common::check_domains(&c.storage);
    drop(fs);
}

/// The events for storage domain `sd` with `code`.
async fn sd_events(e: &oxvirt_engine::daemon::Engine, sd: SdUuid, code: i32) -> Vec<String> {
    let q = ListQuery {
        filter: EventFilter {
            storage_domain: Some(Ref::Id(sd)),
            code: Some(code),
            ..Default::default()
        },
        ..Default::default()
    };
    let events = e.app().db.event_list(&q).await.unwrap();
    events.into_iter().map(|ev| ev.description).collect()
}

async fn wait_sd_event(e: &oxvirt_engine::daemon::Engine, sd: SdUuid, code: i32) -> String {
    let t = Instant::now();
    loop {
        if let Some(d) = sd_events(e, sd, code).await.pop() {
            return d;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no event {code} for the domain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// oVirt's space thresholds on a real domain with the space its node reports: under the
/// critical one, new disks and snapshots are refused (nothing created) and an error event is
/// raised; under the warning one, a warning; a preallocated disk larger than the free space is
/// refused whatever the thresholds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn low_space_thresholds_warn_and_refuse() {
    let c = start_cluster(1).await;
    let e = c.engine.clone();
    let db = &e.app().db;
    let (_, sd) = attach_data_domain(&c, "host1").await;
    let vm = e
        .cmds
        .add_vm(guest_vm(&e, "lowvm", &[]).await, None)
        .await
        .unwrap();
    e.cmds
        .add_disk(cow_disk("lowvm_disk", sd.id, 16 * MIB, Some((vm.id, true))), None)
        .await
        .unwrap();
    // The monitor has the domain's space from its node.
    let t = Instant::now();
    let free = loop {
        if let Some(f) = db.sd_get(sd.id).await.unwrap().unwrap().free_bytes {
            break f;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no space reported for the domain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let disk_names = || async {
        let all = db.disk_list(&ListQuery::default()).await.unwrap();
        all.into_iter().map(|d| d.name).collect::<Vec<_>>()
    };
    let disks_before = disk_names().await;

    // Critical: more GB asked free than there are.
    let mut d = db.sd_get(sd.id).await.unwrap().unwrap();
    d.critical_space_action_blocker = u32::try_from((free >> 30) + 10).unwrap();
    db.sd_update(&d).await.unwrap();
    let text = wait_sd_event(&e, sd.id, 201).await;
    assert!(
        text.starts_with("Critical, Low disk space. data domain has"),
        "{text}"
    );
    let err = e
        .cmds
        .add_disk(cow_disk("refused", sd.id, 16 * MIB, None), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Cannot add disk refused. Low disk space on Storage Domain data")
            && err.contains("critical_space_action_blocker"),
        "{err}"
    );
    let err = e
        .cmds
        .add_snapshot(vm.id, oxvirt_engine::commands::AddSnapshot::default(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("Cannot snapshot VM lowvm. Low disk space"), "{err}");
    assert_eq!(disk_names().await, disks_before, "nothing created");
    assert_eq!(
        db.snapshots_of_vm(vm.id).await.unwrap().len(),
        1,
        "only the active VM"
    );

    // Warning: under 100 % free is always low; the disk is made.
    let mut d = db.sd_get(sd.id).await.unwrap().unwrap();
    d.critical_space_action_blocker = 0;
    d.warning_low_space_indicator = 100;
    db.sd_update(&d).await.unwrap();
    let text = wait_sd_event(&e, sd.id, 26).await;
    assert!(
        text.starts_with("Warning, Low disk space. data domain has"),
        "{text}"
    );
    e.cmds
        .add_disk(cow_disk("fits", sd.id, 16 * MIB, None), None)
        .await
        .unwrap();

    // A preallocated disk larger than the free space, thresholds or not.
    let mut big = cow_disk("too_big", sd.id, free + (1 << 30), None);
    big.format = oxvirt_engine::model::DiskFormat::Raw;
    big.sparse = false;
    let err = e.cmds.add_disk(big, None).await.unwrap_err().to_string();
    assert!(
        err.contains("Low disk space on Storage Domain data") && err.contains("MiB needed"),
        "{err}"
    );
    assert!(!disk_names().await.contains(&"too_big".to_string()));
}
