//! Networks in the database, on SQLite and PostgreSQL: logical networks and their constraints,
//! cluster networks with one management network, host attachments, reported networks for the
//! scheduler, and the cluster MAC pool (allocation persisted with the NIC, no duplicates, a
//! removed NIC's address free again, the cursor surviving a restart).

use crate::common;

use std::collections::BTreeSet;

use common::{Backend, TestDb};
use oxvirt_engine::db::DbError;
use oxvirt_engine::model::*;
use oxvirt_engine::network::{
    HostAttachment, HostIp, LogicalNetwork, MacRange, NetworkAttachment, NetworkAttachmentId,
};

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn nic(vm: VmId, name: &str, network: Option<&str>) -> Nic {
    Nic {
        id: NicId::new_random(),
        vm_id: vm,
        name: name.into(),
        network: network.map(Into::into),
        mac: MacAddr([0; 6]),
        interface: NicInterface::Virtio,
        plugged: true,
        linked: true,
    }
}

async fn networks_clusters_and_hosts(b: Backend) {
    let t = TestDb::new(b).await;
    let db = &t.db;
    let dc = db.dc_insert(&DataCenter::new("dcn")).await.unwrap();
    let cl = db.cluster_insert(&Cluster::new("cln", dc.id)).await.unwrap();
    let h = db
        .host_insert(&Host::new("hn", "127.0.0.1", 54400, cl.id))
        .await
        .unwrap();

    let mut n = LogicalNetwork::new("vmnet", dc.id);
    n.mtu = Some(9000);
    n.vlan = Some(10);
    let n = db.network_insert(&n).await.unwrap();
    assert_eq!(
        (n.mtu, n.vlan, n.vm_network, n.revision),
        (Some(9000), Some(10), true, 1)
    );
    assert!(db
        .network_insert(&LogicalNetwork::new("vmnet", dc.id))
        .await
        .unwrap_err()
        .is_already_exists());
    let mgmt = db
        .network_insert(&LogicalNetwork::new("ovirtmgmt", dc.id))
        .await
        .unwrap();
    assert_eq!(
        db.network_list(Some(dc.id))
            .await
            .unwrap()
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>(),
        ["ovirtmgmt", "vmnet"]
    );

    // Updates are compare-and-set on the revision.
    let mut upd = n.clone();
    upd.description = "guests".into();
    let upd = db.network_update(&upd).await.unwrap();
    assert_eq!(upd.revision, 2);
    assert!(matches!(
        db.network_update(&n).await.unwrap_err(),
        DbError::Conflict { .. }
    ));

    // One management network per cluster; a new one takes the role.
    db.cluster_network_set(cl.id, mgmt.id, true, true).await.unwrap();
    db.cluster_network_set(cl.id, n.id, false, false).await.unwrap();
    let cns = db.cluster_networks(cl.id).await.unwrap();
    assert_eq!(cns.len(), 2);
    assert!(cns
        .iter()
        .any(|c| c.name == "ovirtmgmt" && c.management && c.required));
    assert!(cns
        .iter()
        .any(|c| c.name == "vmnet" && !c.management && !c.required));
    db.cluster_network_set(cl.id, n.id, true, true).await.unwrap();
    let mgmts: Vec<_> = db
        .cluster_networks(cl.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.management)
        .collect();
    assert_eq!(mgmts.len(), 1);
    assert_eq!(mgmts[0].name, "vmnet");
    assert_eq!(db.network_clusters(n.id).await.unwrap().len(), 1);

    // Host attachments: written and replaced together; a network in use is not deleted.
    let att = NetworkAttachment {
        id: NetworkAttachmentId::new_random(),
        host_id: h.id,
        network_id: n.id,
        network: "vmnet".into(),
        attachment: HostAttachment {
            nic: "eth1".into(),
            ip: HostIp::Static {
                address: "10.0.0.5".parse().unwrap(),
                prefix: 24,
                gateway: Some("10.0.0.1".parse().unwrap()),
            },
            default_route: true,
        },
    };
    db.host_attachments_apply(h.id, std::slice::from_ref(&att), &[])
        .await
        .unwrap();
    let mut dhcp = att.clone();
    assert_eq!(db.host_attachments(h.id).await.unwrap(), [att]);
    dhcp.attachment.ip = HostIp::Dhcp;
    dhcp.attachment.nic = "eth2".into();
    db.host_attachments_apply(h.id, &[dhcp.clone()], &[])
        .await
        .unwrap();
    assert_eq!(db.host_attachments(h.id).await.unwrap(), [dhcp]);
    assert_eq!(db.network_attachment_count(n.id).await.unwrap(), 1);
    db.cluster_network_remove(cl.id, n.id).await.unwrap();
    assert!(matches!(
        db.network_delete(n.id).await.unwrap_err(),
        DbError::InUse { .. }
    ));
    db.host_attachments_apply(h.id, &[], &[n.id]).await.unwrap();
    assert!(db.host_attachments(h.id).await.unwrap().is_empty());

    // What hosts report, for the scheduler, and what VMs need.
    let names = BTreeSet::from(["vmnet".to_string()]);
    assert!(db.host_reported_networks_set(h.id, &names).await.unwrap());
    assert!(
        !db.host_reported_networks_set(h.id, &names).await.unwrap(),
        "unchanged"
    );
    assert_eq!(db.cluster_reported_networks(cl.id).await.unwrap()[&h.id], names);
    let vm = db.vm_insert(&Vm::new("vmn", cl.id)).await.unwrap();
    db.nic_insert_pooled(&nic(vm.id, "a", Some("vmnet")), cl.id, None)
        .await
        .unwrap();
    let mut off = nic(vm.id, "b", Some("backup"));
    off.plugged = false;
    db.nic_insert_pooled(&off, cl.id, None).await.unwrap();
    assert_eq!(db.cluster_vm_networks(cl.id).await.unwrap()[&vm.id], names);
    assert_eq!(db.network_nic_count(&upd).await.unwrap(), 1);

    db.network_delete(n.id).await.unwrap();
    assert!(db.network_get(n.id).await.unwrap().is_none());
}

async fn mac_pool_allocates_once_and_releases(b: Backend) {
    let mut t = TestDb::new(b).await;
    let dc = t.db.dc_insert(&DataCenter::new("dcm")).await.unwrap();
    let cl = t.db.cluster_insert(&Cluster::new("clm", dc.id)).await.unwrap();
    let vm = t.db.vm_insert(&Vm::new("vmm", cl.id)).await.unwrap();

    // The default pool: oVirt's prefix, no duplicates.
    let a =
        t.db.nic_insert_pooled(&nic(vm.id, "a", None), cl.id, None)
            .await
            .unwrap();
    let b2 =
        t.db.nic_insert_pooled(&nic(vm.id, "b", None), cl.id, None)
            .await
            .unwrap();
    assert_eq!(a.mac.0[..2], [0x56, 0x6f]);
    assert_ne!(a.mac, b2.mac);
    let err =
        t.db.nic_insert_pooled(&nic(vm.id, "c", None), cl.id, Some(a.mac))
            .await
            .unwrap_err();
    assert!(err.is_already_exists(), "{err}");
    assert!(matches!(
        t.db.nic_insert_pooled(&nic(vm.id, "c", None), cl.id, Some(mac("01:00:5e:00:00:01")))
            .await
            .unwrap_err(),
        DbError::Invalid { .. }
    ));

    // A pool of three: exhausted, a removal frees an address, the cursor survives a restart.
    t.db.mac_pool_set_ranges(
        cl.id,
        &[MacRange::new(mac("02:00:00:00:00:01"), mac("02:00:00:00:00:03"))],
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    for i in 0..3 {
        got.push(
            t.db.nic_insert_pooled(&nic(vm.id, &format!("p{i}"), None), cl.id, None)
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        got.iter().map(|n| n.mac.to_string()).collect::<Vec<_>>(),
        ["02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"]
    );
    assert!(matches!(
        t.db.nic_insert_pooled(&nic(vm.id, "p3", None), cl.id, None)
            .await
            .unwrap_err(),
        DbError::Exhausted { .. }
    ));
    assert!(t.db.nic_remove(got[1].id).await.unwrap());
    t.reopen().await;
    let pool = t.db.mac_pool_of(cl.id).await.unwrap();
    assert_eq!(pool.free(), 1);
    assert_eq!(pool.state().cursor, Some(mac("02:00:00:00:00:03")));
    let again =
        t.db.nic_insert_pooled(&nic(vm.id, "p4", None), cl.id, None)
            .await
            .unwrap();
    assert_eq!(again.mac, got[1].mac, "the removed NIC's address is free again");
    assert!(t
        .db
        .mac_pool_set_ranges(
            cl.id,
            &[MacRange::new(mac("02:00:00:00:00:09"), mac("02:00:00:00:00:01"))]
        )
        .await
        .is_err());
}

both_backends!(networks_clusters_and_hosts, mac_pool_allocates_once_and_releases);
