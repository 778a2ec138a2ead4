//! Filters, weights and placement purposes, one behaviour per test.

mod common;

use common::*;
use oxvirt_scheduler::*;

fn verdict_of(verdicts: &[HostVerdict], n: u128) -> &HostVerdict {
    verdicts.iter().find(|v| v.host == hid(n)).unwrap()
}

fn only_rejection(verdicts: &[HostVerdict], n: u128) -> &Rejection {
    let v = verdict_of(verdicts, n);
    assert_eq!(v.rejections.len(), 1, "{v}");
    &v.rejections[0]
}

// ---------------------------------------------------------------- filters

#[test]
fn host_status_filter_keeps_only_up_hosts() {
    let mut h1 = host(1);
    h1.status = HostStatus::Maintenance;
    let snap = snapshot(vec![h1, host(2)], vec![vm(1)], PolicyKind::None);
    let verdicts = filter_hosts(&snap, vid(1), Purpose::Start).unwrap();
    assert_eq!(
        only_rejection(&verdicts, 1),
        &Rejection::HostStatus {
            status: HostStatus::Maintenance
        }
    );
    assert_eq!(
        verdict_of(&verdicts, 1).to_string(),
        "host h1: status is maintenance, only up hosts run VMs"
    );
    assert!(verdict_of(&verdicts, 2).passed());
    assert_eq!(place(&snap, vid(1), Purpose::Start).unwrap().host, hid(2));
}

#[test]
fn memory_filter_applies_the_overcommit_percentage() {
    let mut h2 = host(2);
    h2.mem_total_mib = 4096;
    h2.mem_committed_mib = 3072;
    h2.mem_free_mib = 3000;
    let mut v = vm(1);
    v.memory_mib = 2048;
    let mut snap = snapshot(vec![h2], vec![v], PolicyKind::None);

    let verdicts = filter_hosts(&snap, vid(1), Purpose::Start).unwrap();
    assert_eq!(
        only_rejection(&verdicts, 2),
        &Rejection::Memory {
            needs_mib: 2048,
            schedulable_mib: 1024
        }
    );
    assert_eq!(
        verdict_of(&verdicts, 2).to_string(),
        "host h2: not enough memory (needs 2048 MiB, schedulable 1024 MiB)"
    );
    let err = place(&snap, vid(1), Purpose::Start).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "no host can run VM 'vm1' ({}): host h2: not enough memory (needs 2048 MiB, schedulable 1024 MiB)",
            vid(1)
        )
    );

    // 150% of 4096 is 6144: 3072 more may be promised.
    snap.policy.memory_overcommit_pct = 150;
    assert!(filter_hosts(&snap, vid(1), Purpose::Start).unwrap()[0].passed());

    // Pending starts count as committed.
    snap.hosts[0].pending.mem_mib = 2048;
    assert!(matches!(
        filter_hosts(&snap, vid(1), Purpose::Start).unwrap()[0].rejections[0],
        Rejection::Memory {
            schedulable_mib: 1024,
            ..
        }
    ));

    // An administrator's cap applies after overcommit.
    snap.hosts[0].pending.mem_mib = 0;
    snap.hosts[0].max_scheduling_memory_mib = Some(4096);
    assert!(matches!(
        filter_hosts(&snap, vid(1), Purpose::Start).unwrap()[0].rejections[0],
        Rejection::Memory {
            schedulable_mib: 1024,
            ..
        }
    ));
}

#[test]
fn memory_filter_wants_physical_memory_to_start() {
    let mut h = host(1);
    h.mem_free_mib = 1000;
    let mut v = vm(1);
    v.memory_mib = 2048;
    let mut snap = snapshot(vec![h], vec![v], PolicyKind::None);
    snap.policy.memory_overcommit_pct = 200;
    let verdicts = filter_hosts(&snap, vid(1), Purpose::Start).unwrap();
    assert_eq!(
        only_rejection(&verdicts, 1),
        &Rejection::PhysicalMemory {
            needs_mib: 2048,
            available_mib: 1000
        }
    );
    assert!(verdict_of(&verdicts, 1)
        .to_string()
        .contains("not enough free memory (needs 2048 MiB, free 1000 MiB including swap)"));
    snap.hosts[0].swap_free_mib = 2048;
    assert!(filter_hosts(&snap, vid(1), Purpose::Start).unwrap()[0].passed());
}

#[test]
fn cpu_filter_counts_cores_or_threads() {
    let mut v = vm(1);
    v.vcpus = 12;
    let mut snap = snapshot(vec![host(1)], vec![v], PolicyKind::None);
    let verdicts = filter_hosts(&snap, vid(1), Purpose::Start).unwrap();
    assert_eq!(
        verdict_of(&verdicts, 1).to_string(),
        "host h1: too few CPUs (VM has 12 vCPUs, host has 8 cores)"
    );
    snap.policy.count_threads_as_cores = true;
    assert!(filter_hosts(&snap, vid(1), Purpose::Start).unwrap()[0].passed());
    snap.vms[0].vcpus = 17;
    assert!(filter_hosts(&snap, vid(1), Purpose::Start).unwrap()[0]
        .to_string()
        .contains("host has 16 threads"));
}

#[test]
fn storage_filter_wants_every_domain_of_the_vm() {
    let mut v = vm(1);
    v.storage_domains = [sd(1), sd(2)].into();
    let mut h2 = host(2);
    h2.storage_domains = [sd(1), sd(2), sd(3)].into();
    let snap = snapshot(vec![host(1), h2], vec![v], PolicyKind::None);
    let verdicts = filter_hosts(&snap, vid(1), Purpose::Start).unwrap();
    assert_eq!(
        only_rejection(&verdicts, 1),
        &Rejection::Storage { missing: vec![sd(2)] }
    );
    assert_eq!(
        verdict_of(&verdicts, 1).to_string(),
        format!("host h1: not connected to storage domain {}", sd(2))
    );
    assert!(verdict_of(&verdicts, 2).passed());
}

#[test]
fn network_filter_wants_every_network_of_the_vm() {
    let mut v = vm(1);
    v.networks = ["ovirtmgmt".into(), "prod".into(), "san".into()].into();
    let mut h2 = host(2);
    h2.networks = ["ovirtmgmt".into(), "prod".into(), "san".into()].into();
    let snap = snapshot(vec![host(1), h2], vec![v], PolicyKind::None);
    let verdicts = filter_hosts(&snap, vid(1), Purpose::Start).unwrap();
    assert_eq!(
        verdict_of(&verdicts, 1).to_string(),
        "host h1: missing networks 'prod', 'san'"
    );
    assert!(verdict_of(&verdicts, 2).passed());
}

#[test]
fn pinning_filter_keeps_the_vm_on_its_hosts() {
    let mut v = vm(1);
    v.pinned_hosts = [hid(2)].into();
    let snap = snapshot(vec![host(1), host(2), host(3)], vec![v], PolicyKind::None);
    let verdicts = filter_hosts(&snap, vid(1), Purpose::Start).unwrap();
    assert_eq!(only_rejection(&verdicts, 1), &Rejection::Pinning);
    assert_eq!(only_rejection(&verdicts, 3), &Rejection::Pinning);
    assert_eq!(place(&snap, vid(1), Purpose::Start).unwrap().host, hid(2));
}

#[test]
fn hard_positive_vm_affinity_follows_the_running_members() {
    let mut v2 = vm(2);
    v2.current_host = Some(hid(2));
    let mut snap = snapshot(vec![host(1), host(2), host(3)], vec![vm(1), v2], PolicyKind::None);
    snap.affinity_groups = vec![group("web", &[1, 2], &[], Some((Polarity::Positive, true)), None)];
    let verdicts = filter_hosts(&snap, vid(1), Purpose::Start).unwrap();
    assert_eq!(
        verdict_of(&verdicts, 1).to_string(),
        "host h1: hard positive affinity group 'web' keeps VM 'vm2' on host h2"
    );
    assert!(verdict_of(&verdicts, 2).passed());
    assert!(!verdict_of(&verdicts, 3).passed());

    // Members split over two hosts: nowhere satisfies the rule.
    let mut v3 = vm(3);
    v3.current_host = Some(hid(3));
    snap.vms.push(v3);
    snap.affinity_groups[0].vms.push(vid(3));
    let err = place(&snap, vid(1), Purpose::Start).unwrap_err();
    assert!(matches!(err, PlacementError::NoHost { .. }), "{err}");

    // A soft rule never filters.
    snap.affinity_groups[0].vm_rule = Some(AffinityRule {
        polarity: Polarity::Positive,
        enforcing: false,
    });
    assert!(filter_hosts(&snap, vid(1), Purpose::Start)
        .unwrap()
        .iter()
        .all(HostVerdict::passed));
}

#[test]
fn hard_negative_vm_affinity_avoids_members_even_while_they_migrate() {
    let mut v2 = vm(2);
    v2.current_host = Some(hid(1));
    v2.migrating_to = Some(hid(2));
    let mut h2 = host(2);
    h2.pending = Pending {
        mem_mib: 1024,
        vcpus: 2,
        vm_count: 1,
    };
    let mut snap = snapshot(vec![host(1), h2, host(3)], vec![vm(1), v2], PolicyKind::None);
    snap.affinity_groups = vec![group("db", &[1, 2], &[], Some((Polarity::Negative, true)), None)];
    let verdicts = filter_hosts(&snap, vid(1), Purpose::Start).unwrap();
    for n in [1, 2] {
        assert_eq!(
            verdict_of(&verdicts, n).to_string(),
            format!("host h{n}: hard negative affinity group 'db' has VM 'vm2' on this host")
        );
    }
    assert!(verdict_of(&verdicts, 3).passed());
    assert_eq!(place(&snap, vid(1), Purpose::Start).unwrap().host, hid(3));
}

#[test]
fn hard_host_affinity_keeps_vms_on_or_off_the_group_hosts() {
    let mut snap = snapshot(vec![host(1), host(2), host(3)], vec![vm(1)], PolicyKind::None);
    snap.affinity_groups = vec![group(
        "rack-a",
        &[1],
        &[2],
        None,
        Some((Polarity::Positive, true)),
    )];
    let verdicts = filter_hosts(&snap, vid(1), Purpose::Start).unwrap();
    assert_eq!(
        verdict_of(&verdicts, 1).to_string(),
        "host h1: not a host of hard positive host affinity group 'rack-a'"
    );
    assert!(verdict_of(&verdicts, 2).passed());

    snap.affinity_groups[0].host_rule = Some(AffinityRule {
        polarity: Polarity::Negative,
        enforcing: true,
    });
    let verdicts = filter_hosts(&snap, vid(1), Purpose::Start).unwrap();
    assert_eq!(
        verdict_of(&verdicts, 2).to_string(),
        "host h2: excluded by hard negative host affinity group 'rack-a'"
    );
    assert!(verdict_of(&verdicts, 1).passed());
}

#[test]
fn every_failing_filter_is_reported() {
    let mut h1 = host(1);
    h1.status = HostStatus::NonOperational;
    h1.networks.clear();
    h1.mem_total_mib = 512;
    let snap = snapshot(vec![h1], vec![vm(1)], PolicyKind::None);
    let verdicts = filter_hosts(&snap, vid(1), Purpose::Start).unwrap();
    let filters: Vec<Filter> = verdicts[0].rejections.iter().map(Rejection::filter).collect();
    assert_eq!(filters, vec![Filter::HostStatus, Filter::Memory, Filter::Network]);
}

// ---------------------------------------------------------------- purposes

#[test]
fn migration_leaves_the_current_host() {
    let mut v = vm(1);
    v.current_host = Some(hid(1));
    let mut h1 = host(1);
    h1.cpu_load_pct = 0.0; // the best host by weight, were it allowed
    let mut h2 = host(2);
    h2.cpu_load_pct = 50.0;
    let snap = snapshot(vec![h1, h2], vec![v], PolicyKind::EvenlyDistributed);
    let verdicts = filter_hosts(&snap, vid(1), Purpose::Migrate).unwrap();
    assert_eq!(only_rejection(&verdicts, 1), &Rejection::CurrentHost);
    let p = place(&snap, vid(1), Purpose::Migrate).unwrap();
    assert_eq!((p.from, p.host), (Some(hid(1)), hid(2)));
    assert_eq!(p.rejected.len(), 1);
}

#[test]
fn requests_that_make_no_sense_are_refused() {
    let mut running = vm(1);
    running.current_host = Some(hid(1));
    let mut pinned = vm(3);
    pinned.current_host = Some(hid(1));
    pinned.migratable = false;
    let mut moving = vm(4);
    moving.current_host = Some(hid(1));
    moving.migrating_to = Some(hid(2));
    let snap = snapshot(
        vec![host(1), host(2)],
        vec![running, vm(2), pinned, moving],
        PolicyKind::None,
    );
    assert!(matches!(
        place(&snap, vid(1), Purpose::Start),
        Err(PlacementError::AlreadyRunning { .. })
    ));
    assert!(matches!(
        place(&snap, vid(2), Purpose::Migrate),
        Err(PlacementError::NotRunning { .. })
    ));
    assert_eq!(
        place(&snap, vid(3), Purpose::Maintenance)
            .unwrap_err()
            .to_string(),
        format!("VM 'vm3' ({}) is not migratable", vid(3))
    );
    assert!(matches!(
        place(&snap, vid(4), Purpose::Migrate),
        Err(PlacementError::AlreadyMigrating { .. })
    ));
    assert_eq!(
        place(&snap, vid(9), Purpose::Start),
        Err(PlacementError::UnknownVm(vid(9)))
    );
    assert!(matches!(
        place_many(&snap, &[vid(2), vid(2)], Purpose::Start),
        Err(PlacementError::DuplicateVm(_))
    ));

    let mut bad = snap.clone();
    bad.hosts.push(host(1));
    assert_eq!(
        place(&bad, vid(2), Purpose::Start),
        Err(PlacementError::Snapshot(SnapshotError::DuplicateHost(hid(1))))
    );
    let mut bad = snap.clone();
    bad.hosts[0].cpu_load_pct = f64::NAN;
    assert!(matches!(
        place(&bad, vid(2), Purpose::Start),
        Err(PlacementError::Snapshot(SnapshotError::BadHostLoad { .. }))
    ));
    let mut bad = snap;
    bad.vms[1].current_host = Some(hid(7));
    assert!(matches!(
        place(&bad, vid(1), Purpose::Start),
        Err(PlacementError::Snapshot(SnapshotError::UnknownHost { .. }))
    ));
}

#[test]
fn ha_restart_places_by_priority_and_accounts_for_earlier_choices() {
    let mut dead = host(1);
    dead.status = HostStatus::NonResponsive;
    let mut h2 = host(2);
    h2.mem_total_mib = 5 * 1024;
    h2.mem_free_mib = 5 * 1024;
    let mut vms = Vec::new();
    for (n, prio) in [(1, 1), (2, 100), (3, 50)] {
        let mut v = vm(n);
        v.memory_mib = 2048;
        v.current_host = Some(hid(1));
        v.highly_available = true;
        v.ha_priority = prio;
        vms.push(v);
    }
    let mut snap = snapshot(vec![dead, h2], vms, PolicyKind::EvenlyDistributed);
    recompute_host(&mut snap, 1);
    let results = place_many(&snap, &[vid(1), vid(2), vid(3)], Purpose::HaRestart).unwrap();
    let order: Vec<VmId> = results.iter().map(|(id, _)| *id).collect();
    assert_eq!(order, vec![vid(2), vid(3), vid(1)]);
    assert_eq!(results[0].1.as_ref().unwrap().host, hid(2));
    assert_eq!(results[1].1.as_ref().unwrap().host, hid(2));
    // 5 GiB hold two 2 GiB VMs; the third, lowest priority, finds no room.
    let err = results[2].1.as_ref().unwrap_err();
    assert!(
        err.to_string()
            .contains("host h2: not enough memory (needs 2048 MiB, schedulable 1024 MiB)"),
        "{err}"
    );
    assert!(
        err.to_string().contains("host h1: status is non_responsive"),
        "{err}"
    );
}

use oxvirt_types::VmId;

/// Host `n`'s committed memory and count from the VMs on it (the dead host of the HA test).
fn recompute_host(snap: &mut Snapshot, n: u128) {
    let on: Vec<u64> = snap
        .vms
        .iter()
        .filter(|v| v.current_host == Some(hid(n)))
        .map(|v| v.memory_mib)
        .collect();
    let h = snap.hosts.iter_mut().find(|h| h.id == hid(n)).unwrap();
    h.mem_committed_mib = on.iter().sum();
    h.vm_count = on.len() as u32;
}

#[test]
fn ha_restart_keeps_hard_positive_groups_together() {
    let mut dead = host(1);
    dead.status = HostStatus::Down;
    let mut h2 = host(2);
    h2.cpu_load_pct = 5.0;
    let mut h3 = host(3);
    h3.cpu_load_pct = 90.0;
    let mut vms = Vec::new();
    for n in 1..=3 {
        let mut v = vm(n);
        v.current_host = Some(hid(1));
        v.highly_available = true;
        v.ha_priority = 50;
        vms.push(v);
    }
    // vm3 must be apart from the others; the others together.
    let mut snap = snapshot(vec![dead, h2, h3], vms, PolicyKind::EvenlyDistributed);
    snap.affinity_groups = vec![
        group("pair", &[1, 2], &[], Some((Polarity::Positive, true)), None),
        group("apart", &[1, 3], &[], Some((Polarity::Negative, true)), None),
    ];
    let results = place_many(&snap, &[vid(1), vid(2), vid(3)], Purpose::HaRestart).unwrap();
    let host_of = |n: u128| {
        results
            .iter()
            .find(|(id, _)| *id == vid(n))
            .unwrap()
            .1
            .as_ref()
            .unwrap()
            .host
    };
    assert_eq!(host_of(1), host_of(2));
    assert_ne!(host_of(1), host_of(3));
}

#[test]
fn evacuation_plans_every_vm_within_capacity() {
    let mut leaving = host(1);
    leaving.status = HostStatus::PreparingForMaintenance;
    let mut h2 = host(2);
    h2.mem_total_mib = 6 * 1024;
    h2.mem_free_mib = 6 * 1024;
    let mut h3 = host(3);
    h3.mem_total_mib = 4 * 1024;
    h3.mem_free_mib = 4 * 1024;
    let mut vms = Vec::new();
    for (n, mem) in [(1, 4096), (2, 2048), (3, 2048), (4, 2048), (5, 512)] {
        let mut v = vm(n);
        v.memory_mib = mem;
        v.current_host = Some(hid(1));
        vms.push(v);
    }
    vms[4].migratable = false;
    let mut incoming = vm(6);
    incoming.current_host = Some(hid(2));
    incoming.migrating_to = Some(hid(1));
    incoming.memory_mib = 256;
    vms.push(incoming);
    let mut snap = snapshot(vec![leaving, h2, h3], vms, PolicyKind::EvenlyDistributed);
    // vm2 and vm3 must not share a host.
    snap.affinity_groups = vec![group(
        "ha-pair",
        &[2, 3],
        &[],
        Some((Polarity::Negative, true)),
        None,
    )];
    recompute_host(&mut snap, 1);
    snap.hosts[0].pending = Pending {
        mem_mib: 256,
        vcpus: 2,
        vm_count: 1,
    };
    recompute_host(&mut snap, 2);

    let plan = plan_evacuation(&snap, hid(1)).unwrap();
    assert_eq!(plan.incoming, vec![vid(6)]);
    // Largest first: vm1 (4 GiB) then the 2 GiB ones; 10 GiB of room minus vm6's 256 MiB on h2
    // fits vm1 + two of the 2 GiB VMs, not three.
    let mut used = std::collections::HashMap::new();
    for p in &plan.moves {
        assert_eq!(p.from, Some(hid(1)));
        *used.entry(p.host).or_insert(0u64) += snap.vm(p.vm).unwrap().memory_mib;
    }
    assert!(used.get(&hid(2)).copied().unwrap_or(0) <= 6 * 1024 - 256);
    assert!(used.get(&hid(3)).copied().unwrap_or(0) <= 4 * 1024);
    assert_eq!(plan.moves.len(), 3, "{plan:?}");
    assert_eq!(plan.moves[0].vm, vid(1));
    let host_of = |n: u128| plan.moves.iter().find(|p| p.vm == vid(n)).map(|p| p.host);
    if let (Some(a), Some(b)) = (host_of(2), host_of(3)) {
        assert_ne!(a, b);
    }
    assert_eq!(plan.unplaced.len(), 2);
    assert!(plan
        .unplaced
        .iter()
        .any(|(id, e)| *id == vid(5) && matches!(e, PlacementError::NotMigratable { .. })));
    assert!(plan
        .unplaced
        .iter()
        .any(|(_, e)| matches!(e, PlacementError::NoHost { .. })));
    assert_eq!(
        plan_evacuation(&snap, hid(9)).unwrap_err(),
        PlacementError::UnknownHost(hid(9))
    );
}

// ---------------------------------------------------------------- weights

#[test]
fn evenly_distributed_prefers_the_least_loaded_host() {
    let mut h1 = host(1);
    h1.cpu_load_pct = 70.0;
    let mut h2 = host(2);
    h2.cpu_load_pct = 10.0;
    let snap = snapshot(vec![h1, h2], vec![vm(1)], PolicyKind::EvenlyDistributed);
    let p = place(&snap, vid(1), Purpose::Start).unwrap();
    assert_eq!(p.host, hid(2));
    assert_eq!(p.scores.len(), 2);
    assert!(p.scores[0].total < p.scores[1].total);
    // vm1 adds 50% of 2 vCPUs on 8 cores = 12.5 points.
    let cpu = p.scores[0]
        .parts
        .iter()
        .find(|(w, _)| *w == Weight::CpuLoad)
        .unwrap()
        .1;
    assert!((cpu - 22.5).abs() < 1e-9, "{cpu}");
}

#[test]
fn memory_weight_prefers_more_schedulable_memory() {
    let mut h1 = host(1);
    h1.mem_committed_mib = 20 * 1024;
    let snap = snapshot(vec![h1, host(2)], vec![vm(1)], PolicyKind::None);
    assert_eq!(place(&snap, vid(1), Purpose::Start).unwrap().host, hid(2));
}

#[test]
fn power_saving_packs_below_high_utilization() {
    let mut h1 = host(1);
    h1.cpu_load_pct = 60.0;
    let mut h2 = host(2);
    h2.cpu_load_pct = 10.0;
    let mut snap = snapshot(vec![h1, h2], vec![vm(1)], PolicyKind::PowerSaving);
    assert_eq!(place(&snap, vid(1), Purpose::Start).unwrap().host, hid(1));
    // 75 + 12.5 would cross HighUtilization (80).
    snap.hosts[0].cpu_load_pct = 75.0;
    assert_eq!(place(&snap, vid(1), Purpose::Start).unwrap().host, hid(2));
}

#[test]
fn vm_evenly_distributed_counts_vms_and_handicaps_the_spm() {
    let mut h1 = host(1);
    h1.vm_count = 5;
    let mut h2 = host(2);
    h2.vm_count = 3;
    let mut snap = snapshot(vec![h1, h2], vec![vm(1)], PolicyKind::VmEvenlyDistributed);
    assert_eq!(place(&snap, vid(1), Purpose::Start).unwrap().host, hid(2));
    snap.hosts[1].spm = true; // 3 + SpmVmGrace 5 = 8 slots
    let p = place(&snap, vid(1), Purpose::Start).unwrap();
    assert_eq!(p.host, hid(1));
    let spm = p.scores[1]
        .parts
        .iter()
        .find(|(w, _)| *w == Weight::SpmGrace)
        .unwrap()
        .1;
    assert!(spm > 0.0);
}

#[test]
fn soft_affinity_outweighs_load() {
    let mut h1 = host(1);
    h1.cpu_load_pct = 60.0;
    let mut v2 = vm(2);
    v2.current_host = Some(hid(1));
    let mut snap = snapshot(vec![h1, host(2)], vec![vm(1), v2], PolicyKind::EvenlyDistributed);
    snap.affinity_groups = vec![group(
        "near",
        &[1, 2],
        &[],
        Some((Polarity::Positive, false)),
        None,
    )];
    assert_eq!(place(&snap, vid(1), Purpose::Start).unwrap().host, hid(1));
    snap.affinity_groups[0].vm_rule = Some(AffinityRule {
        polarity: Polarity::Negative,
        enforcing: false,
    });
    snap.hosts[0].cpu_load_pct = 0.0;
    snap.hosts[1].cpu_load_pct = 60.0;
    assert_eq!(place(&snap, vid(1), Purpose::Start).unwrap().host, hid(2));
    // Soft host affinity too.
    snap.affinity_groups[0] = group("rack", &[1], &[2], None, Some((Polarity::Positive, false)));
    assert_eq!(place(&snap, vid(1), Purpose::Start).unwrap().host, hid(2));
}

#[test]
fn ties_do_not_depend_on_list_order() {
    let hosts = vec![host(3), host(1), host(2)];
    let snap = snapshot(hosts.clone(), vec![vm(1)], PolicyKind::EvenlyDistributed);
    let mut reversed = hosts;
    reversed.reverse();
    let snap2 = snapshot(reversed, vec![vm(1)], PolicyKind::EvenlyDistributed);
    let a = place(&snap, vid(1), Purpose::Start).unwrap().host;
    let b = place(&snap2, vid(1), Purpose::Start).unwrap().host;
    assert_eq!(a, b);
    assert_eq!(a, hid(1));
}
