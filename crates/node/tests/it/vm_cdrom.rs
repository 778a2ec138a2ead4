//! The CD-ROM drive on real QEMU: a VM starts with an ISO in it, the ISO is changed and
//! ejected while the guest runs (the guest sees each change), a bad ISO is refused and changes
//! nothing, and the VM's record (what a restarted node recovers from) holds what is in the drive.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::*;
use oxvirt_node::vm::cdrom::{CdMedia, VmCdrom};
use oxvirt_node::vm::{ImageRef, VmDisk, VmManager, VmManagerConfig};
use oxvirt_qemu::{BootDevice, CdromBus};
use oxvirt_testkit::{make_iso, TestGuest};
use oxvirt_types::{ImgUuid, SdUuid};

/// Waits until what the guest last read from its CD-ROM (`none`: no medium) is `want`.
async fn wait_cd(log: &Path, want: &str) {
    wait_guest_report(log, "cd", |v| v == want, Duration::from_secs(60)).await;
}

fn media(path: &Path) -> CdMedia {
    CdMedia {
        image: ImageRef {
            sd: SdUuid::new_random(),
            img: ImgUuid::new_random(),
        },
        path: path.to_path_buf(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cd_is_changed_and_ejected_while_the_guest_runs_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let _reaper = QemuReaper(vec![run.clone()]);
    let mgr = VmManager::open(VmManagerConfig::new(&run)).await.unwrap();
    let (iso_a, iso_b) = (tmp.path().join("a.iso"), tmp.path().join("b.iso"));
    make_iso(&iso_a, &[("id", b"disc-a\n")], None);
    make_iso(&iso_b, &[("id", b"disc-b\n")], None);
    let img = tmp.path().join("disk.qcow2");
    create_qcow2(&img, 32, None);
    // The guest reads the drive every 200 ms and says when what it reads changes.
    let script = "mkdir -p /cd; ( last=; while true; do \
        if mount -t iso9660 -o ro /dev/sr0 /cd 2>/dev/null; then v=$(cat /cd/id); umount /cd; else v=none; fi; \
        [ \"$v\" != \"$last\" ] && echo \"OXVIRT-GUEST cd $v\"; last=$v; usleep 200000; done ) &";
    let mut req = guest_vm(
        "cdrom",
        vec![VmDisk::new(vec![qcow2_layer(&img)])],
        &[&TestGuest::run_arg(script)],
    );
    let a = media(&iso_a);
    req.cdrom = Some(VmCdrom {
        bus: CdromBus::Scsi,
        media: Some(a.clone()),
        generation: 0,
    });
    req.boot_order = vec![BootDevice::Cdrom, BootDevice::Hd];
    let id = req.id;
    let info = mgr.create(req).await.unwrap();
    assert_eq!(info.cdrom.as_ref().unwrap().image, Some(a.image));
    let log = mgr.console_log(id);
    wait_cd(&log, "disc-a").await;

    let b = media(&iso_b);
    let info = mgr.change_cd(id, Some(b.clone())).await.unwrap();
    assert_eq!(info.cdrom.unwrap().image, Some(b.image));
    wait_cd(&log, "disc-b").await;
    // The same ISO again changes nothing.
    mgr.change_cd(id, Some(b.clone())).await.unwrap();

    let info = mgr.change_cd(id, None).await.unwrap();
    assert_eq!(info.cdrom.unwrap().image, None);
    wait_cd(&log, "none").await;

    // An ISO that is not there is refused; the drive stays empty.
    let err = mgr
        .change_cd(id, Some(media(&tmp.path().join("missing.iso"))))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing.iso"), "{err}");
    assert_eq!(mgr.status(id).unwrap().cdrom.unwrap().image, None);

    let info = mgr.change_cd(id, Some(a.clone())).await.unwrap();
    assert_eq!(info.cdrom.unwrap().image, Some(a.image));
    wait_cd(&log, "disc-a").await;

    // The run directory's record, which a restarted node recovers the VM from, holds the ISO.
    let rec = vm_record(&mgr, id);
    assert_eq!(
        rec["create"]["cdrom"]["media"]["path"],
        iso_a.to_str().unwrap(),
        "{rec}"
    );
    mgr.destroy(id).await.unwrap();
}
