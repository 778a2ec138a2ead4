//! Thin disks for real: a qcow2 volume capped by a loop device, a guest writing faster than the
//! SPM extends it, write-threshold events, extends through the requester, `io-error` pauses
//! resumed after the extend — and not one I/O error seen by the guest.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use oxvirt_node::vm::thin::{ExtendFuture, ExtendRequest, ExtendRequester, LocalSpmExtender, ThinPolicy};
use oxvirt_node::vm::{SnapshotDisk, ThinDisk, VmDisk, VmManager, VmManagerConfig, VmStatus};

/// The SPM answering slowly (as through the mailbox, which polls every few seconds): the real
/// local extend, after a delay.
struct SlowSpm {
    delay: Duration,
    requests: AtomicU64,
}

impl ExtendRequester for SlowSpm {
    fn extend<'a>(&'a self, req: &'a ExtendRequest) -> ExtendFuture<'a> {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.delay).await;
            LocalSpmExtender.extend(req).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_outrunning_the_extends_is_paused_on_enospc_resumed_and_never_sees_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let _reaper = QemuReaper(vec![run.clone()]);
    let spm = Arc::new(SlowSpm {
        delay: Duration::from_secs(2),
        requests: AtomicU64::new(0),
    });
    let mut cfg = VmManagerConfig::new(&run);
    cfg.extender = spm.clone();
    let mgr = VmManager::open(cfg).await.unwrap();

    // The volume: a 64 MiB qcow2 in a file capped at 8 MiB, as in a fresh 8 MiB LV.
    let vol = tmp.path().join("thin-vol");
    create_qcow2(&vol, 64, None);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&vol)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let mut d = VmDisk::new(vec![qcow2_layer(&vol)]);
    d.thin = Some(ThinDisk {
        volume: None,
        policy: ThinPolicy {
            chunk_bytes: 16 * MIB,
            free_margin_bytes: 6 * MIB,
            max_bytes: 80 * MIB,
        },
    });
    let req = guest_vm("thin", vec![d], &["oxvirt.write_mib=40", "oxvirt.marker=done"]);
    let id = req.id;
    mgr.create(req).await.unwrap();
    let log = mgr.console_log(id);
    let l = log.clone();
    let text =
        tokio::task::spawn_blocking(move || console_has(&l, "OXVIRT-MARKER done", Duration::from_secs(180)))
            .await
            .unwrap();
    assert!(text.contains("OXVIRT-GUEST wrote 40 MiB"), "console:\n{text}");
    assert!(!text.contains("write failed"), "console:\n{text}");

    let st = mgr.stats(id).await.unwrap();
    assert_eq!(st.status, VmStatus::Up, "{st:?}");
    assert!(st.thin_extends >= 2, "{st:?}");
    assert!(
        st.enospc_pauses >= 1,
        "the guest should have outrun a 2 s extend: {st:?}"
    );
    // Every extend went through the requester (one more may still be on its way).
    assert!(spm.requests.load(Ordering::Relaxed) >= st.thin_extends);
    let size = std::fs::metadata(&vol).unwrap().len();
    assert!((40 * MIB..=80 * MIB).contains(&size), "volume size {size}");

    // A live snapshot on top of the thin layer: it stays open through its loop device.
    let overlay = tmp.path().join("overlay");
    create_qcow2(&overlay, 64, Some(&vol));
    mgr.snapshot(
        id,
        vec![SnapshotDisk {
            disk: 0,
            overlay: overlay.clone(),
        }],
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        mgr.status(id).unwrap().chains[0],
        vec![vol.clone(), overlay.clone()]
    );
    assert_eq!(mgr.stats(id).await.unwrap().status, VmStatus::Up);

    let loop_dev = std::fs::read_to_string(mgr.vm_dir(id).join("vm.json")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(&loop_dev).unwrap();
    let dev = rec["loops"][0]["device"].as_str().unwrap().to_string();
    mgr.destroy(id).await.unwrap();
    assert_ne!(
        oxvirt_node::vm::thin::loop_backing_file(Path::new(&dev)).as_deref(),
        Some(vol.as_path()),
        "destroy detaches the loop device"
    );
    // Every byte the guest wrote is there, read through the overlay's chain.
    let out = std::process::Command::new(oxvirt_testkit::require_tool("qemu-io"))
        .args(["-r", "-f", "qcow2", "-c", "read -P 0x5a 0 40M"])
        .arg(&overlay)
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !t.contains("Pattern verification failed"),
        "{t}"
    );
}
