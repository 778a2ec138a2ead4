//! Memory hot plug on real QEMU under TCG: the guest sees the DIMMs come (it takes their
//! memory online, as udev would), the VM's record lists them (what a restarted node and a
//! migration destination build from), and a size that is no whole memory block, or past the
//! VM's maximum, is refused and changes nothing.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::*;
use oxvirt_node::vm::{VmDisk, VmManager, VmManagerConfig};
use oxvirt_testkit::TestGuest;

/// The guest's last reported MemTotal, MiB, once it is at least `at_least`.
async fn wait_mem(log: &Path, at_least: u64) -> u64 {
    let ok = |v: &str| v.parse::<u64>().is_ok_and(|m| m >= at_least);
    let v = wait_guest_report(log, "mem", ok, Duration::from_secs(90)).await;
    v.parse().unwrap()
}

fn recorded_dimms(mgr: &VmManager, id: oxvirt_types::VmId) -> Vec<(String, u64)> {
    let rec = vm_record(mgr, id);
    rec["create"]["dimms"]
        .as_array()
        .unwrap_or_else(|| panic!("{rec}"))
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_string(),
                d["size_mib"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_hot_plugged_under_the_running_guest() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let _reaper = QemuReaper(vec![run.clone()]);
    let mgr = VmManager::open(VmManagerConfig::new(&run)).await.unwrap();
    let img = tmp.path().join("disk.qcow2");
    create_qcow2(&img, 32, None);
    // The guest takes new memory online and says how much it has whenever that changes.
    let script = "( last=; while true; do \
        for m in /sys/devices/system/memory/memory*; do \
          [ \"$(cat $m/state)\" = offline ] && echo online > $m/state 2>/dev/null; done; \
        t=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo); \
        [ \"$t\" != \"$last\" ] && echo \"OXVIRT-GUEST mem $t\"; last=$t; usleep 200000; done ) &";
    let mut req = guest_vm(
        "memory",
        vec![VmDisk::new(vec![qcow2_layer(&img)])],
        &[&TestGuest::run_arg(script)],
    );
    req.max_memory_mib = Some(1024);
    let id = req.id;
    let info = mgr.create(req).await.unwrap();
    let mem = info.memory.unwrap();
    assert_eq!((mem.boot_mib, mem.max_mib, mem.total_mib()), (256, 1024, 256));
    let log = mgr.console_log(id);
    let before = wait_mem(&log, 1).await;

    let info = mgr.hotplug_memory(id, 256).await.unwrap();
    assert_eq!(info.memory.unwrap().total_mib(), 512);
    let after = wait_mem(&log, before + 250).await;
    assert!(after <= before + 256, "{before} MiB became {after} MiB");
    assert_eq!(recorded_dimms(&mgr, id), [("dimm-1".to_string(), 256)]);
    assert_eq!(mgr.stats(id).await.unwrap().memory_mib, 512);

    // No whole block, or past the maximum: refused, nothing changes.
    let err = mgr.hotplug_memory(id, 100).await.unwrap_err();
    assert!(err.to_string().contains("128 MiB"), "{err}");
    let err = mgr.hotplug_memory(id, 768).await.unwrap_err();
    assert!(err.to_string().contains("1024"), "{err}");
    assert_eq!(recorded_dimms(&mgr, id).len(), 1);

    mgr.hotplug_memory(id, 128).await.unwrap();
    wait_mem(&log, after + 120).await;
    assert_eq!(
        recorded_dimms(&mgr, id),
        [("dimm-1".to_string(), 256), ("dimm-2".to_string(), 128)]
    );
    mgr.destroy(id).await.unwrap();
}
