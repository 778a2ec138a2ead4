//! The engine's load balancer end to end: two real nodes, two guests started on one of them,
//! then the cluster switched to `vm_evenly_distributed` with its own properties (HighVmCount 2,
//! MigrationThreshold 2, no SPM grace, no duration). The balancer, run every second here,
//! live-migrates one guest to the empty host, and then leaves the cluster alone: rounds after
//! that move nothing (its hysteresis; the scheduler crate's property tests prove it in general).
//! Last, maintenance of a host whose guest is pinned to it stops that guest.

use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::cluster::{attach_data_domain, start_cluster_with};
use oxvirt_engine::commands::{AddVm, UpdateCluster, VmStartOptions};
use oxvirt_engine::model::{
    HostStatus, HostUuid, PlacementAffinity, SchedulingPolicy, VmId, VmStatus, BLANK_TEMPLATE_ID,
};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_balancer_spreads_vms_under_vm_evenly_distributed_and_then_keeps_still() {
    let mut settings = common::fast_engine_settings();
    settings.balance_interval = Duration::from_secs(1);
    let c = start_cluster_with(2, settings).await;
    let e = c.engine.clone();
    let (cmds, db) = (&e.cmds, &e.app().db);
    attach_data_domain(&c, "host1").await;
    let cluster = db.cluster_get_by_name("Default").await.unwrap().unwrap();
    let host1 = db.host_get_by_name("host1").await.unwrap().unwrap().id;

    // Two guests, both started on host1 while the policy balances nothing.
    let mut vms = Vec::new();
    for name in ["even1", "even2"] {
        let vm = cmds
            .add_vm(
                AddVm {
                    name: name.into(),
                    description: String::new(),
                    cluster: cluster.id,
                    template: BLANK_TEMPLATE_ID,
                    memory_bytes: Some(128 * MIB),
                    cpu: None,
                    os: common::cluster::guest_os(&[]),
                    ha: None,
                    resume_behavior: None,
                },
                None,
            )
            .await
            .unwrap();
        let opts = VmStartOptions {
            host: Some(host1),
            paused: false,
            run_once: None,
        };
        cmds.start_vm(vm.id, opts, None).await.unwrap();
        vms.push(vm.id);
    }
    for vm in &vms {
        oxvirt_testkit::wait_for_text(
            &c.console("host1", *vm),
            "OXVIRT-GUEST ready",
            Duration::from_secs(90),
        )
        .unwrap();
    }
    let placement = async || -> BTreeMap<VmId, (VmStatus, Option<HostUuid>)> {
        let mut m = BTreeMap::new();
        for vm in &vms {
            let v = db.vm_get(*vm).await.unwrap().unwrap();
            m.insert(*vm, (v.runtime.status, v.runtime.run_on_host));
        }
        m
    };
    // Several balancing rounds under the `none` policy move nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        placement()
            .await
            .values()
            .all(|p| *p == (VmStatus::Up, Some(host1))),
        "{:?}",
        placement().await
    );

    // The policy with the cluster's own properties: one guest moves to the empty host.
    let props: BTreeMap<String, String> = [
        ("HighVmCount", "2"),
        ("MigrationThreshold", "2"),
        ("SpmVmGrace", "0"),
        ("CpuOverCommitDurationMinutes", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let switched = Instant::now();
    cmds.update_cluster(
        cluster.id,
        UpdateCluster {
            scheduling_policy: Some(SchedulingPolicy::VmEvenlyDistributed),
            scheduling_properties: Some(props),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let spread = loop {
        let p = placement().await;
        let hosts: std::collections::BTreeSet<_> = p.values().map(|(_, h)| *h).collect();
        if hosts.len() == 2 && p.values().all(|(s, _)| *s == VmStatus::Up) {
            break p;
        }
        assert!(
            switched.elapsed() < Duration::from_secs(90),
            "the balancer did not spread the VMs: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "balanced: one VM migrated {:.1} s after the policy changed",
        switched.elapsed().as_secs_f64()
    );
    let (moved, _) = spread
        .iter()
        .find(|(_, (_, h))| *h != Some(host1))
        .expect("one VM moved");
    // The moved guest runs in a QEMU on host2; host1 no longer runs one for it.
    let pid = c.qemu_pid("host2", *moved);
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "no QEMU {pid} on host2"
    );
    let start = Instant::now();
    while c
        .qemu_pid_now("host1", *moved)
        .is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(start.elapsed() < Duration::from_secs(30), "the source QEMU stays");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Then it keeps still: five more rounds, nobody moves.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(placement().await, spread, "the balancer moved a balanced cluster");

    // Maintenance of host2, whose guest is pinned to it: it cannot migrate, so it is stopped
    // (as the admin asked for the host to be emptied); the guest on host1 is left alone.
    let mut pinned = db.vm_get(*moved).await.unwrap().unwrap();
    pinned.placement.affinity = PlacementAffinity::Pinned;
    cmds.update_vm(&pinned).await.unwrap();
    let host2 = db.host_get_by_name("host2").await.unwrap().unwrap().id;
    let h = cmds.host_maintenance(host2).await.unwrap();
    assert_eq!(h.status, HostStatus::Maintenance);
    let v = db.vm_get(*moved).await.unwrap().unwrap();
    assert_eq!(
        (v.runtime.status, v.runtime.run_on_host),
        (VmStatus::Down, None),
        "{:?}",
        v.runtime
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the pinned guest's QEMU still runs"
    );
    let other = vms.iter().find(|v| *v != moved).unwrap();
    assert_eq!(placement().await[other], (VmStatus::Up, Some(host1)));
    cmds.stop_vm(*other).await.unwrap();
}
