//! VMs across node processes: live migration between two nodes on one machine (and back,
//! with a failed and a cancelled attempt in between), and a node killed with SIGKILL whose VMs
//! keep running and are found again by the next node process; then self-fencing.
//!
//! The nodes are `oxvirt-vm-node` processes (the VM manager behind a line protocol) standing in
//! for `oxvirt node` until the daemon exists; the calls map one to one onto its VM verbs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use oxvirt_types::SdUuid;
use serde_json::{json, Value};

/// Whether `pid` runs: exists and is not a zombie (a QEMU orphaned by the killed node is
/// reaped by init, not by us, so it may linger as a zombie after it exits).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

const BOOT: Duration = Duration::from_secs(60);
const CALL: Duration = Duration::from_secs(120);

fn status_name(v: &Value) -> String {
    v["status"]["state"].as_str().unwrap_or_default().to_string()
}

fn migrate_params(uri: &str, bandwidth: u64) -> Value {
    json!({
        "uri": uri,
        "downtime_limit_ms": 300,
        "max_bandwidth": bandwidth,
        "timeout_ms": 90_000,
    })
}

#[test]
fn live_migration_there_and_back_with_failure_and_cancel() {
    let tmp = tempfile::tempdir().unwrap();
    let (run_a, run_b) = (tmp.path().join("a"), tmp.path().join("b"));
    let _reaper = QemuReaper(vec![run_a.clone(), run_b.clone()]);
    let hooks = tmp.path().join("hooks");
    let hook_log = tmp.path().join("hooks.log");
    for point in [
        "before_vm_migrate_source",
        "after_vm_migrate_source",
        "before_vm_migrate_destination",
        "after_vm_migrate_destination",
    ] {
        logging_hook(&hooks, point, &hook_log);
    }
    let a = Node::start_with_hooks(&run_a, Some(&hooks));
    let b = Node::start_with_hooks(&run_b, Some(&hooks));
    // Shared storage: both nodes open the same volume file.
    let img = tmp.path().join("shared.qcow2");
    create_qcow2(&img, 32, None);
    let vm = guest_vm("mig", vec![disk(vec![qcow2_layer(&img)])], &[&writer_arg()]);
    let id = vm.id;
    let vm_json = serde_json::to_value(&vm).unwrap();
    let info = a.call("create", json!({ "vm": vm_json }), CALL).unwrap();
    assert_eq!(status_name(&info), "up");
    let p = wait_passes(&a.console_log(id), 0, 1, BOOT);

    // 1. A destination that is not there: the migration fails, the VM runs on.
    let err = a
        .call(
            "migrate",
            json!({"id": id, "params": migrate_params("tcp:127.0.0.1:1", 1 << 30)}),
            CALL,
        )
        .unwrap_err();
    assert!(err.contains("migration failed"), "{err}");
    let st = a.call("status", json!({"id": id}), CALL).unwrap();
    assert_eq!(status_name(&st), "up", "{st}");
    let p = wait_passes(&a.console_log(id), p, 1, BOOT);

    // 2. Cancelled half-way (slowed to 2 MiB/s so there is a half-way).
    let inc = b
        .call("prepare_incoming", json!({ "vm": vm_json }), CALL)
        .unwrap();
    let uri = inc["uri"].as_str().unwrap().to_string();
    assert!(uri.starts_with("tcp:127.0.0.1:"), "{uri}");
    let pending = a.send(
        "migrate",
        json!({"id": id, "params": migrate_params(&uri, 2 << 20)}),
    );
    let start = Instant::now();
    loop {
        let st = a.call("status", json!({"id": id}), CALL).unwrap();
        if status_name(&st) == "migration_source" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never migrating: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    a.call("migrate_cancel", json!({"id": id}), CALL).unwrap();
    let err = Node::wait_reply(pending, CALL).unwrap_err();
    assert!(err.contains("migration failed"), "{err}");
    let st = a.call("status", json!({"id": id}), CALL).unwrap();
    assert_eq!(status_name(&st), "up", "cancel leaves the VM on the source: {st}");
    // The destination's QEMU gave up and is reported down; removing it is the caller's job.
    b.call(
        "wait_for",
        json!({"id": id, "state": "Down", "timeout_ms": 30_000}),
        CALL,
    )
    .unwrap();
    b.call("destroy", json!({"id": id}), CALL).unwrap();
    let p = wait_passes(&a.console_log(id), p, 1, BOOT);

    // 3. A → B for real.
    let inc = b
        .call("prepare_incoming", json!({ "vm": vm_json }), CALL)
        .unwrap();
    let rep = a
        .call(
            "migrate",
            json!({"id": id, "params": migrate_params(inc["uri"].as_str().unwrap(), 1 << 30)}),
            CALL,
        )
        .unwrap();
    let (total, downtime) = (
        rep["total_ms"].as_u64().unwrap(),
        rep["downtime_ms"].as_u64().unwrap(),
    );
    eprintln!("migration A→B: total {total} ms, downtime {downtime} ms");
    assert!(total > 0 && downtime <= total, "{rep}");
    let st = a.call("status", json!({"id": id}), CALL).unwrap();
    assert_eq!(status_name(&st), "down");
    assert_eq!(st["status"]["reason"]["kind"], "migrated", "{st}");
    b.call(
        "wait_for",
        json!({"id": id, "state": "Up", "timeout_ms": 30_000}),
        CALL,
    )
    .unwrap();
    a.call("destroy", json!({"id": id}), CALL).unwrap();
    // The guest goes on writing on B (its console is B's now).
    let pb = wait_passes(&b.console_log(id), 0, 1, BOOT);
    let _ = p;

    // 4. And back B → A.
    let inc = a
        .call("prepare_incoming", json!({ "vm": vm_json }), CALL)
        .unwrap();
    let rep = b
        .call(
            "migrate",
            json!({"id": id, "params": migrate_params(inc["uri"].as_str().unwrap(), 1 << 30)}),
            CALL,
        )
        .unwrap();
    eprintln!(
        "migration B→A: total {} ms, downtime {} ms",
        rep["total_ms"], rep["downtime_ms"]
    );
    a.call(
        "wait_for",
        json!({"id": id, "state": "Up", "timeout_ms": 30_000}),
        CALL,
    )
    .unwrap();
    b.call("destroy", json!({"id": id}), CALL).unwrap();
    let _ = pb;
    wait_passes(&a.console_log(id), 0, 1, BOOT);
    a.call("destroy", json!({"id": id}), CALL).unwrap();
    verify_writer_data(&img);
    // Hooks ran at each migration point: 4 attempts left the source (the first failed at
    // once, one was cancelled), 3 destinations were prepared, 2 received the guest.
    let hooks_ran = std::fs::read_to_string(&hook_log).unwrap();
    let count = |p: &str| hooks_ran.matches(&format!("{p} mig")).count();
    assert_eq!(count("before_vm_migrate_source"), 4, "{hooks_ran}");
    assert_eq!(count("after_vm_migrate_source"), 2, "{hooks_ran}");
    assert_eq!(count("before_vm_migrate_destination"), 3, "{hooks_ran}");
    assert_eq!(count("after_vm_migrate_destination"), 2, "{hooks_ran}");
}

#[test]
fn a_killed_node_leaves_vms_running_and_the_next_one_recovers_and_fences_them() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let _reaper = QemuReaper(vec![run.clone()]);
    let node = Node::start(&run);
    let img = tmp.path().join("disk.qcow2");
    create_qcow2(&img, 32, None);
    let sd = SdUuid::new_random();
    let mut vm = guest_vm("phoenix", vec![disk(vec![qcow2_layer(&img)])], &[&writer_arg()]);
    vm.lease_domains = vec![sd];
    let id = vm.id;
    let info = node
        .call(
            "create",
            json!({ "vm": serde_json::to_value(&vm).unwrap() }),
            CALL,
        )
        .unwrap();
    let qemu_pid = info["pid"].as_u64().unwrap() as i32;
    let log = node.console_log(id);
    let p = wait_passes(&log, 0, 1, BOOT);

    node.kill9();
    // QEMU is in its own session: the node's death does not touch it.
    assert!(running(qemu_pid), "QEMU died with the node");
    let p = wait_passes(&log, p, 1, BOOT);

    let node = Node::start(&run);
    let list = node.call("list", json!({}), CALL).unwrap();
    let vms = list.as_array().unwrap();
    assert_eq!(vms.len(), 1, "{list}");
    assert_eq!(status_name(&vms[0]), "up", "{list}");
    assert_eq!(vms[0]["pid"].as_i64().unwrap() as i32, qemu_pid);
    // The recovered VM is fully controllable: QMP reconnected, events flow.
    let st = node.call("pause", json!({"id": id}), CALL).unwrap();
    assert_eq!(status_name(&st), "paused");
    let st = node.call("resume", json!({"id": id}), CALL).unwrap();
    assert_eq!(status_name(&st), "up");
    wait_passes(&log, p, 1, BOOT);

    // Self-fencing of an unrelated domain touches nothing; of the VM's domain kills it.
    let rep = node
        .call(
            "fence",
            json!({"sd": SdUuid::new_random(), "within_ms": 5_000}),
            CALL,
        )
        .unwrap();
    assert_eq!(rep["killed"], json!([]));
    let start = Instant::now();
    let rep = node
        .call("fence", json!({"sd": sd, "within_ms": 5_000}), CALL)
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(rep["killed"], json!([id]));
    assert!(!running(qemu_pid), "QEMU survived fencing");
    let st = node
        .call(
            "wait_for",
            json!({"id": id, "state": "Down", "timeout_ms": 10_000}),
            CALL,
        )
        .unwrap();
    assert_eq!(st["reason"]["kind"], "fenced", "{st}");
    node.call("destroy", json!({"id": id}), CALL).unwrap();
    verify_writer_data(&img);
}
