//! Storage QoS on real QEMU: a disk profile's limits throttle what the guest writes, and
//! changing the QoS or the disk's profile changes the running VM's limits at once.

use std::time::{Duration, Instant};

use crate::common;
use common::cluster::{attach_data_domain, cow_disk, guest_vm, start_cluster, Cluster};
use oxvirt_engine::commands::{UpdateQos, VmStartOptions};
use oxvirt_engine::model::{DiskProfileId, IoLimits, SdUuid, VmStatus};
use oxvirt_types::VmId;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const WRITE_MIB: u64 = 6;

/// Starts a VM whose guest writes `WRITE_MIB` MiB to its disk (with `profile`) right after
/// boot; returns it and how long the write took, between the guest's two console lines.
async fn write_through(
    c: &Cluster,
    name: &str,
    sd: SdUuid,
    profile: Option<DiskProfileId>,
) -> (VmId, Duration) {
    let e = &c.engine;
    let args = format!("oxvirt.write_mib={WRITE_MIB}");
    let vm = e
        .cmds
        .add_vm(guest_vm(e, name, &[&args]).await, None)
        .await
        .unwrap();
    let mut disk = cow_disk(&format!("{name}_disk"), sd, 64 * MIB, Some((vm.id, true)));
    disk.disk_profile = profile;
    e.cmds.add_disk(disk, None).await.unwrap();
    e.cmds
        .start_vm(vm.id, VmStartOptions::default(), None)
        .await
        .unwrap();
    let console = c.console("host1", vm.id);
    let t = Instant::now();
    let mut ready = None;
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if ready.is_none() && text.contains("OXVIRT-GUEST ready") {
            ready = Some(Instant::now());
        }
        if text.contains(&format!("OXVIRT-GUEST wrote {WRITE_MIB} MiB")) {
            let took = ready.expect("ready comes first").elapsed();
            return (vm.id, took);
        }
        assert!(!text.contains("write failed"), "{text}");
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{name} never wrote:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The limits QEMU applies to the VM's disks, from its node (`VM.getIoTune`).
async fn io_tune(c: &Cluster, vm: VmId) -> Value {
    let e = &c.engine;
    let v = e.app().db.vm_get(vm).await.unwrap().unwrap();
    assert_eq!(v.runtime.status, VmStatus::Up);
    let node = e.app().host_client(v.runtime.run_on_host.unwrap()).await.unwrap();
    let tunes = node.call("VM.getIoTune", json!({ "vmID": vm })).await.unwrap();
    assert_eq!(tunes.as_array().map(Vec::len), Some(1), "{tunes}");
    tunes[0]["ioTune"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disk_profiles_qos_throttles_the_guest_and_changes_live() {
    let c = start_cluster(1).await;
    let e = c.engine.clone();
    let (dc, sd) = attach_data_domain(&c, "host1").await;
    let slow = IoLimits {
        max_write_throughput: Some(1),
        ..Default::default()
    };
    let qos = e.cmds.add_qos(dc.id, "slow", "", slow).await.unwrap();
    let profile = e
        .cmds
        .add_disk_profile(sd.id, "slow", "", Some(qos.id))
        .await
        .unwrap();

    // The same write, unlimited and at 1 MB/s.
    let (fast_vm, fast) = write_through(&c, "fast", sd.id, None).await;
    e.cmds.stop_vm(fast_vm).await.unwrap();
    let (vm, throttled) = write_through(&c, "slow", sd.id, Some(profile.id)).await;
    eprintln!("BENCH {WRITE_MIB} MiB written by the guest: {fast:?} unlimited, {throttled:?} at 1 MB/s");
    // QEMU lets about a second's worth through at once (its burst), then holds to the rate:
    // 5 s expected; 4 s leaves a second for the clock's and the console's slack.
    assert!(
        throttled >= Duration::from_secs(WRITE_MIB - 2),
        "{WRITE_MIB} MiB at 1 MB/s took only {throttled:?}"
    );
    assert!(
        fast * 2 < throttled,
        "unlimited {fast:?} vs throttled {throttled:?}"
    );
    let t = io_tune(&c, vm).await;
    assert_eq!(t["write_bytes_sec"], MIB, "{t}");
    assert_eq!(t["total_bytes_sec"], 0, "{t}");

    // The QoS changes: the running VM has the new limit at once.
    e.cmds
        .update_qos(
            qos.id,
            UpdateQos {
                limits: Some(IoLimits {
                    max_write_throughput: Some(50),
                    max_iops: Some(200),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let t = io_tune(&c, vm).await;
    assert_eq!(
        (t["write_bytes_sec"].as_u64(), t["total_iops_sec"].as_u64()),
        (Some(50 * MIB), Some(200)),
        "{t}"
    );
    // The disk leaves the profile: unlimited.
    let disk = e.app().db.attachments_of_vm(vm).await.unwrap()[0].disk_id;
    e.cmds.set_disk_profile(disk, None).await.unwrap();
    let t = io_tune(&c, vm).await;
    assert_eq!(t["write_bytes_sec"], 0, "{t}");
    assert_eq!(t["total_iops_sec"], 0, "{t}");
    // A profile in use stays; unused, it goes.
    e.cmds.set_disk_profile(disk, Some(profile.id)).await.unwrap();
    assert_eq!(io_tune(&c, vm).await["write_bytes_sec"], 50 * MIB);
    let err = e
        .cmds
        .remove_disk_profile(profile.id)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("used by disk slow_disk"), "{err}");
    e.cmds.stop_vm(vm).await.unwrap();
}
