//! Seeding shared by the engine's benchmarks: VMs as an admin makes them, each with a disk,
//! its attachment and a NIC, written through the database layer 500 to a transaction.

use oxvirt_engine::model::*;
use oxvirt_engine::Db;

/// VMs `vm-<from>` … `vm-<to - 1>` in `cluster`, their disks on `sd`.
pub async fn seed(db: &Db, from: usize, to: usize, cluster: ClusterId, sd: SdUuid) {
    let mut i = from;
    while i < to {
        let end = (i + 500).min(to);
        let mut tx = db.begin().await.unwrap();
        for n in i..end {
            let mut vm = Vm::new(&format!("vm-{n:05}"), cluster);
            vm.description = format!("benchmark VM number {n}");
            let vm = tx.vm_insert(&vm).await.unwrap();
            let disk = tx
                .disk_insert(&Disk::new(
                    &format!("vm-{n:05}_disk1"),
                    sd,
                    DiskFormat::Cow,
                    10 << 30,
                ))
                .await
                .unwrap();
            tx.attachment_add(&DiskAttachment {
                vm_id: vm.id,
                disk_id: disk.id,
                interface: DiskInterface::VirtioScsi,
                bootable: true,
                active: true,
                read_only: false,
            })
            .await
            .unwrap();
            let nic = Nic {
                id: NicId::new_random(),
                vm_id: vm.id,
                name: "nic1".into(),
                network: Some("ovirtmgmt".into()),
                mac: MacAddr([0; 6]),
                interface: NicInterface::Virtio,
                plugged: true,
                linked: true,
            };
            tx.nic_add(&nic, None).await.unwrap();
        }
        tx.commit().await.unwrap();
        i = end;
    }
}
