//! Maintenance of the SPM's host while an SPM task runs: the engine refuses it, as oVirt does,
//! and changes nothing — the host stays up and SPM. (Giving the role up would have the node
//! refuse `spmStop` anyway; recording the role as released while the host still held the SDM
//! lease would leave the data center with an SPM nobody could elect past.) The task is held
//! in the middle by the node's `OXVIRT_TASK_PAUSE` hook, a real node process running it.

use crate::common;

use std::time::{Duration, Instant};

use common::cluster::{attach_data_domain, cow_disk, start_cluster_via};
use oxvirt_engine::commands::CommandError;
use oxvirt_engine::model::{HostStatus, SpmStatus};
use serde_json::json;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spm_host_with_a_task_running_is_not_put_in_maintenance() {
    let c = start_cluster_via(
        1,
        common::fast_engine_settings(),
        &["env", "OXVIRT_TASK_PAUSE=createVolume:0"],
    )
    .await;
    let e = c.engine.clone();
    let db = &e.app().db;
    let (dc, sd) = attach_data_domain(&c, "host1").await;
    let host = db.host_get_by_name("host1").await.unwrap().unwrap();
    // A new disk's volume: the SPM's task parks before its job and never ends.
    let cmds = e.cmds.clone();
    let add = tokio::spawn(async move { cmds.add_disk(cow_disk("held", sd.id, 16 * MIB, None), None).await });
    let node = e.app().client(&host).unwrap();
    let start = Instant::now();
    loop {
        let all = node
            .call(
                "StoragePool.getAllTasksStatuses",
                json!({ "spUUID": dc.storage_pool_id }),
            )
            .await
            .unwrap();
        if all["allTasksStatus"].as_object().is_some_and(|m| !m.is_empty()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the disk's task never started: {all}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let e2 = e.cmds.host_maintenance(host.id).await.unwrap_err();
    assert!(
        matches!(&e2, CommandError::Conflict(m) if m.contains("storage tasks running")),
        "{e2}"
    );
    let h = db.host_get(host.id).await.unwrap().unwrap();
    assert_eq!(h.status, HostStatus::Up, "{:?}", h.status_detail);
    let d = db.dc_get(dc.id).await.unwrap().unwrap();
    assert_eq!((d.spm_status, d.spm_host), (SpmStatus::Spm, Some(host.id)));
    let st = node
        .call(
            "StoragePool.getSpmStatus",
            json!({ "spUUID": dc.storage_pool_id }),
        )
        .await
        .unwrap();
    assert_eq!(st["spm_st"]["spmStatus"], "SPM", "{st}");
    add.abort();
}
