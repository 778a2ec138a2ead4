//! vCPU hot plug and unplug on real QEMU under TCG: the guest sees vCPUs come (it takes them
//! online, as udev would) and go (its kernel releases them on QEMU's ACPI eject), the VM's
//! record (what a restarted node and a migration destination build from) lists the hot plugged
//! devices, and asking for more than the maximum or fewer than the VM started with is refused
//! and changes nothing. Under TCG, a plug after an unplug is refused (QEMU 7.2 would abort).

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::*;
use oxvirt_node::vm::{VmDisk, VmManager, VmManagerConfig};
use oxvirt_testkit::TestGuest;

/// Waits until the guest last reported `want` vCPUs online.
async fn wait_cpus(log: &Path, want: usize) {
    let want = want.to_string();
    wait_guest_report(log, "cpus", |v| v == want, Duration::from_secs(90)).await;
}

fn recorded_devices(mgr: &VmManager, id: oxvirt_types::VmId) -> Vec<String> {
    let rec = vm_record(mgr, id);
    rec["create"]["cpu_devices"]
        .as_array()
        .unwrap_or_else(|| panic!("{rec}"))
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcpus_are_hot_plugged_and_unplugged_under_the_running_guest() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let _reaper = QemuReaper(vec![run.clone()]);
    let mgr = VmManager::open(VmManagerConfig::new(&run)).await.unwrap();
    let img = tmp.path().join("disk.qcow2");
    create_qcow2(&img, 32, None);
    // The guest takes new vCPUs online and says how many it has whenever that changes.
    let script = "( last=; while true; do \
        for c in /sys/devices/system/cpu/cpu[0-9]*; do \
          [ -f $c/online ] && [ \"$(cat $c/online)\" = 0 ] && echo 1 > $c/online 2>/dev/null; done; \
        n=$(grep -c ^processor /proc/cpuinfo); \
        [ \"$n\" != \"$last\" ] && echo \"OXVIRT-GUEST cpus $n\"; last=$n; usleep 200000; done ) &";
    let mut req = guest_vm(
        "cpus",
        vec![VmDisk::new(vec![qcow2_layer(&img)])],
        &[&TestGuest::run_arg(script)],
    );
    req.max_cpus = Some(3);
    let id = req.id;
    let info = mgr.create(req).await.unwrap();
    let cpus = info.cpus.unwrap();
    assert_eq!((cpus.boot, cpus.max, cpus.count()), (1, 3, 1));
    let log = mgr.console_log(id);
    wait_cpus(&log, 1).await;

    let info = mgr.set_cpus(id, 3).await.unwrap();
    assert_eq!(info.cpus.unwrap().count(), 3);
    wait_cpus(&log, 3).await;
    assert_eq!(recorded_devices(&mgr, id), ["cpu-hot-1", "cpu-hot-2"]);

    // Past the maximum, or below what it started with: refused, nothing changes.
    let err = mgr.set_cpus(id, 4).await.unwrap_err();
    assert!(err.to_string().contains("3"), "{err}");
    let err = mgr.set_cpus(id, 0).await.unwrap_err();
    assert!(err.to_string().contains("started with 1"), "{err}");
    assert_eq!(mgr.status(id).unwrap().cpus.unwrap().count(), 3);
    assert_eq!(recorded_devices(&mgr, id).len(), 2);

    // The newest goes first, once the guest let it go.
    let info = match mgr.set_cpus(id, 2).await {
        Ok(i) => i,
        Err(e) => panic!(
            "{e}; console:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    };
    assert_eq!(info.cpus.unwrap().count(), 2);
    wait_cpus(&log, 2).await;
    assert_eq!(recorded_devices(&mgr, id), ["cpu-hot-1"]);
    // QEMU under TCG aborts on a plug after an unplug: refused until the VM restarts, and the
    // guest runs on.
    let err = mgr.set_cpus(id, 3).await.unwrap_err();
    assert!(err.to_string().contains("TCG"), "{err}");
    assert_eq!(mgr.status(id).unwrap().cpus.unwrap().count(), 2);
    assert_eq!(mgr.status(id).unwrap().status, oxvirt_node::vm::VmStatus::Up);
    mgr.destroy(id).await.unwrap();
}
