//! The balancer under each policy, one behaviour per test.

mod common;

use std::time::Duration;

use common::*;
use oxvirt_scheduler::*;

const T0: Timestamp = Timestamp::from_unix_millis(1_700_000_000_000);

/// `count` VMs numbered from `first` on host `h`, each using `share`% of an 8-core host.
fn vms_on(h: u128, first: u128, count: u128, share: f64) -> Vec<Vm> {
    (first..first + count)
        .map(|n| {
            let mut v = vm(n);
            v.vcpus = 8; // as many as the default host's cores: usage = share of the host
            v.cpu_usage_pct = share;
            v.current_host = Some(hid(h));
            v
        })
        .collect()
}

fn cluster(hosts: Vec<Host>, vms: Vec<Vm>, kind: PolicyKind) -> Snapshot {
    let mut snap = snapshot(hosts, vms, kind);
    recompute(&mut snap, &Model::default());
    snap
}

fn params(max_parallel: u32) -> BalanceParams {
    BalanceParams {
        max_parallel_migrations: max_parallel,
        ..BalanceParams::default()
    }
}

#[test]
fn evenly_distributed_waits_for_the_duration_then_moves_one_vm() {
    // h1: 2 + 4 × 22.5 = 92%; h2: 2%.
    let snap = cluster(
        vec![host(1), host(2)],
        vms_on(1, 1, 4, 22.5),
        PolicyKind::EvenlyDistributed,
    );
    assert!((snap.hosts[0].cpu_load_pct - 92.0).abs() < 1e-9);
    let p = params(2);
    let (m, s1) = balance(&snap, &BalanceState::default(), T0, &p).unwrap();
    assert!(m.is_empty());
    assert_eq!(s1.cpu_over_since.get(&hid(1)), Some(&T0));
    let (m, s2) = balance(&snap, &s1, T0 + minutes(1), &p).unwrap();
    assert!(m.is_empty());
    assert_eq!(
        s2.cpu_over_since.get(&hid(1)),
        Some(&T0),
        "the mark keeps its start"
    );

    let (m, s3) = balance(&snap, &s2, T0 + minutes(2), &p).unwrap();
    // One move brings h1 to 69.5% < 80%: it is no longer a source, so the second slot is unused.
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!((m[0].from, m[0].to), (hid(1), hid(2)));
    match m[0].reason {
        BalanceReason::CpuOverUtilized {
            source_load_pct,
            high_utilization,
            source_load_after_pct,
            destination_load_after_pct,
        } => {
            assert!((source_load_pct - 92.0).abs() < 1e-9);
            assert_eq!(high_utilization, 80);
            assert!((source_load_after_pct - 69.5).abs() < 1e-9);
            assert!((destination_load_after_pct - 24.5).abs() < 1e-9);
        }
        other => panic!("{other:?}"),
    }
    assert!(m[0].to_string().starts_with("migrate VM 'vm"), "{}", m[0]);
    assert_eq!(s3.moves[&m[0].vm].len(), 1);

    // A dip below the threshold restarts the clock.
    let mut cooled = snap.clone();
    cooled.hosts[0].cpu_load_pct = 70.0;
    let (_, s4) = balance(&cooled, &s1, T0 + minutes(1), &p).unwrap();
    assert!(s4.cpu_over_since.is_empty());
    let (m, _) = balance(&snap, &s4, T0 + minutes(2), &p).unwrap();
    assert!(m.is_empty());
}

#[test]
fn evenly_distributed_demands_a_margin() {
    // h1: 2 + 8 × 10 = 82%; h2: 2 + 6 × 10 = 62%. Moving 10 points leaves 72 vs 72.
    let mut vms = vms_on(1, 1, 8, 10.0);
    vms.extend(vms_on(2, 100, 6, 10.0));
    let mut snap = cluster(vec![host(1), host(2)], vms, PolicyKind::EvenlyDistributed);
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(4)).unwrap();
    assert!(m.is_empty(), "{m:?}");

    // h2 at 52%: 62 after vs 72 after, a 10-point margin.
    snap.vms.retain(|v| v.id != vid(100));
    recompute(&mut snap, &Model::default());
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(4)).unwrap();
    assert_eq!(m.len(), 1, "{m:?}");
    let strict = BalanceParams {
        margin_pct: 15.0,
        ..params(4)
    };
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &strict).unwrap();
    assert!(m.is_empty(), "{m:?}");
}

#[test]
fn evenly_distributed_never_fills_a_destination_to_high_utilization() {
    // One VM of 60 points on h1 (62%), h2 at 22%: 82% after the move would be over 80.
    let mut vms = vms_on(1, 1, 1, 60.0);
    vms.extend(vms_on(1, 2, 1, 20.0));
    vms.extend(vms_on(2, 3, 1, 20.0));
    let mut snap = cluster(vec![host(1), host(2)], vms, PolicyKind::EvenlyDistributed);
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(2)).unwrap();
    // Only the 20-point VM may go (42% after vs 62%).
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].vm, vid(2));
}

#[test]
fn parallel_migrations_are_limited_including_those_in_flight() {
    let mut vms = vms_on(1, 1, 10, 9.8); // 100%
    let mut h2 = host(2);
    vms[0].migrating_to = Some(hid(2));
    h2.pending = Pending {
        mem_mib: 1024,
        vcpus: 4,
        vm_count: 1,
    };
    let mut snap = cluster(
        vec![host(1), h2, host(3), host(4)],
        vms,
        PolicyKind::EvenlyDistributed,
    );
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    snap.hosts[1].pending = Pending {
        mem_mib: 1024,
        vcpus: 4,
        vm_count: 1,
    };
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(3)).unwrap();
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m.iter().all(|x| x.vm != vid(1)), "a migrating VM is not moved");
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(1)).unwrap();
    assert!(m.is_empty());
}

#[test]
fn a_recently_migrated_vm_waits_for_its_cooldown() {
    // h1: 2 + 30 (vm1, just migrated) + 2 × 25 (not migratable) = 82%.
    let mut vms = vms_on(1, 1, 1, 30.0);
    vms[0].last_migrated_at = Some(T0);
    vms.extend(vms_on(1, 2, 2, 25.0));
    vms[1].migratable = false;
    vms[2].migratable = false;
    let mut snap = cluster(vec![host(1), host(2)], vms, PolicyKind::EvenlyDistributed);
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    let p = params(2);
    let (m, _) = balance(&snap, &BalanceState::default(), T0 + minutes(5), &p).unwrap();
    assert!(m.is_empty(), "{m:?}");
    let (m, _) = balance(&snap, &BalanceState::default(), T0 + minutes(10), &p).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].vm, vid(1));
}

#[test]
fn a_vm_is_not_sent_back_to_a_host_it_was_moved_from() {
    let mut vms = vms_on(1, 1, 4, 22.5); // 92%
    vms.truncate(4);
    let mut snap = cluster(vec![host(1), host(2)], vms, PolicyKind::EvenlyDistributed);
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    let mut state = BalanceState::default();
    for n in 1..=4 {
        state.moves.insert(
            vid(n),
            vec![MoveRecord {
                from: hid(2),
                to: hid(1),
                at: T0,
            }],
        );
    }
    let p = params(2);
    let now = T0 + minutes(30);
    let (m, next) = balance(&snap, &state, now, &p).unwrap();
    assert!(m.is_empty(), "{m:?}");
    assert_eq!(next.moves.len(), 4);
    // Once the history expires, they may go.
    let (m, next) = balance(&snap, &state, T0 + minutes(61), &p).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(next.moves.len(), 1);
}

#[test]
fn power_saving_empties_an_under_utilized_host_onto_a_busier_one() {
    // h1 50% busy, h2 8% with two VMs, h3 empty.
    let mut vms = vms_on(1, 1, 4, 12.0);
    vms.extend(vms_on(2, 10, 2, 3.0));
    let snap = cluster(vec![host(1), host(2), host(3)], vms, PolicyKind::PowerSaving);
    let p = params(2);
    let (m, s) = balance(&snap, &BalanceState::default(), T0, &p).unwrap();
    assert!(m.is_empty());
    assert!(s.cpu_under_since.contains_key(&hid(2)));
    assert!(
        !s.cpu_under_since.contains_key(&hid(3)),
        "an empty host has nothing to give"
    );
    let (m, _) = balance(&snap, &s, T0 + minutes(2), &p).unwrap();
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m.iter().all(|x| x.from == hid(2) && x.to == hid(1)));
    assert!(matches!(m[0].reason, BalanceReason::CpuUnderUtilized { .. }));
}

#[test]
fn power_saving_never_packs_above_high_utilization() {
    // h1 at 77%, h2 at 12% with one 10-point VM: 87% would cross 80%.
    let mut vms = vms_on(1, 1, 5, 15.0);
    vms.extend(vms_on(2, 10, 1, 10.0));
    let mut snap = cluster(vec![host(1), host(2)], vms, PolicyKind::PowerSaving);
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(2)).unwrap();
    assert!(m.is_empty(), "{m:?}");
}

#[test]
fn power_saving_relieves_over_utilized_hosts_first() {
    // h1 92%, h2 30%, h3 8%: h1 gives to h2 (busier, above LowUtilization) rather than h3.
    let mut vms = vms_on(1, 1, 4, 22.5);
    vms.extend(vms_on(2, 10, 4, 7.0));
    vms.extend(vms_on(3, 20, 2, 3.0));
    let mut snap = cluster(vec![host(1), host(2), host(3)], vms, PolicyKind::PowerSaving);
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(1)).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].from, m[0].to), (hid(1), hid(2)));
    assert!(matches!(m[0].reason, BalanceReason::CpuOverUtilized { .. }));
}

#[test]
fn vm_evenly_distributed_moves_small_vms_to_the_emptiest_host() {
    let mut vms = vms_on(1, 1, 12, 1.0);
    for (i, v) in vms.iter_mut().enumerate() {
        v.memory_mib = 512 * (i as u64 + 1);
    }
    vms.extend(vms_on(2, 100, 2, 1.0));
    vms.extend(vms_on(3, 200, 4, 1.0));
    let mut h3 = host(3);
    h3.spm = true; // 4 + SpmVmGrace 5 = 9 slots
    h3.mem_total_mib = 64 * 1024;
    let mut h1 = host(1);
    h1.mem_total_mib = 64 * 1024;
    let mut snap = cluster(vec![h1, host(2), h3], vms, PolicyKind::VmEvenlyDistributed);
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(3)).unwrap();
    // 12→11 vs 2→3, 11→10 vs 3→4, 10→9 vs 4→5: each leaves a gap ≥ MigrationThreshold (5).
    assert_eq!(m.len(), 3, "{m:?}");
    assert!(m.iter().all(|x| x.from == hid(1) && x.to == hid(2)));
    let moved: Vec<_> = m.iter().map(|x| x.vm).collect();
    assert_eq!(moved, vec![vid(1), vid(2), vid(3)], "smallest memory first");
    assert!(
        m[0].to_string().contains("12 VM slots ≥ HighVmCount 10"),
        "{}",
        m[0]
    );
}

#[test]
fn vm_evenly_distributed_needs_a_gap_of_two_even_with_threshold_one() {
    let mut vms = vms_on(1, 1, 10, 1.0);
    vms.extend(vms_on(2, 100, 9, 1.0));
    let mut snap = cluster(vec![host(1), host(2)], vms, PolicyKind::VmEvenlyDistributed);
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    snap.policy.properties.migration_threshold = 1;
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(2)).unwrap();
    assert!(m.is_empty(), "a 10/9 split would swap one VM for ever: {m:?}");
    snap.vms.retain(|v| v.id != vid(100));
    recompute(&mut snap, &Model::default());
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(2)).unwrap();
    assert_eq!(m.len(), 1, "10/8 → 9/9");
}

#[test]
fn policy_none_never_migrates_and_keeps_no_marks() {
    let snap = cluster(vec![host(1), host(2)], vms_on(1, 1, 4, 25.0), PolicyKind::None);
    let mut state = BalanceState::default();
    state.cpu_over_since.insert(hid(1), T0);
    let (m, next) = balance(&snap, &state, T0 + minutes(60), &params(4)).unwrap();
    assert!(m.is_empty());
    assert!(next.cpu_over_since.is_empty());
}

#[test]
fn hosts_that_are_not_up_neither_give_nor_receive() {
    let mut h2 = host(2);
    h2.status = HostStatus::Maintenance;
    let mut snap = cluster(
        vec![host(1), h2, host(3)],
        vms_on(1, 1, 4, 22.5),
        PolicyKind::EvenlyDistributed,
    );
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(2)).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].to, hid(3));
    snap.hosts[0].status = HostStatus::NonResponsive;
    let (m, next) = balance(&snap, &BalanceState::default(), T0, &params(2)).unwrap();
    assert!(m.is_empty());
    assert!(next.cpu_over_since.is_empty());
}

#[test]
fn balancing_respects_hard_filters() {
    // The only cool host lacks the VMs' network.
    let mut h2 = host(2);
    h2.networks.clear();
    let mut snap = cluster(
        vec![host(1), h2],
        vms_on(1, 1, 4, 22.5),
        PolicyKind::EvenlyDistributed,
    );
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(2)).unwrap();
    assert!(m.is_empty(), "{m:?}");
}

#[test]
fn bad_parameters_are_refused() {
    let snap = cluster(vec![host(1)], vec![], PolicyKind::EvenlyDistributed);
    let bad = BalanceParams {
        margin_pct: 0.0,
        ..BalanceParams::default()
    };
    assert_eq!(
        balance(&snap, &BalanceState::default(), T0, &bad).unwrap_err(),
        BalanceError::BadMargin(0.0)
    );
    let bad = BalanceParams {
        history_ttl: Duration::from_secs(60),
        ..BalanceParams::default()
    };
    assert!(matches!(
        balance(&snap, &BalanceState::default(), T0, &bad),
        Err(BalanceError::HistoryShorterThanCooldown { .. })
    ));
    let mut snap = snap;
    snap.policy.properties.high_utilization = 0;
    assert!(matches!(
        balance(&snap, &BalanceState::default(), T0, &BalanceParams::default()),
        Err(BalanceError::Snapshot(SnapshotError::Policy(_)))
    ));
}

#[test]
fn state_survives_serialization() {
    let snap = cluster(
        vec![host(1), host(2)],
        vms_on(1, 1, 4, 22.5),
        PolicyKind::EvenlyDistributed,
    );
    let (_, s) = balance(&snap, &BalanceState::default(), T0, &params(2)).unwrap();
    let json = serde_json::to_string(&s).unwrap();
    let back: BalanceState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    let (m, _) = balance(&snap, &back, T0 + minutes(2), &params(2)).unwrap();
    assert_eq!(m.len(), 1);
}

#[test]
fn in_one_round_a_host_either_gives_or_receives() {
    // h1 95% (gives its 40-point VM to h3 and drops to 55%), h2 92% with VMs that only h1 can
    // take (h3 lacks their network): h1 must not take them in the round it gave.
    let mut vms = vms_on(1, 1, 2, 40.0);
    vms.extend(vms_on(1, 3, 1, 13.0));
    let mut on_h2 = vms_on(2, 10, 9, 10.0);
    for v in &mut on_h2 {
        v.networks.insert("prod".into());
    }
    vms.extend(on_h2);
    let mut h1 = host(1);
    h1.networks.insert("prod".into());
    let mut h2 = host(2);
    h2.networks.insert("prod".into());
    let mut snap = cluster(vec![h1, h2, host(3)], vms, PolicyKind::EvenlyDistributed);
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    let (m, state) = balance(&snap, &BalanceState::default(), T0, &params(3)).unwrap();
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!((m[0].from, m[0].to), (hid(1), hid(3)));

    // Next round, with the move done, h1 may receive.
    let v = snap.vms.iter_mut().find(|v| v.id == m[0].vm).unwrap();
    v.current_host = Some(hid(3));
    recompute(&mut snap, &Model::default());
    let (m, _) = balance(&snap, &state, T0 + minutes(1), &params(3)).unwrap();
    assert!(!m.is_empty());
    assert!(m.iter().all(|x| x.from == hid(2) && x.to == hid(1)), "{m:?}");
}

#[test]
fn power_saving_consolidates_only_onto_clearly_busier_hosts() {
    // Both under LowUtilization: 15% and 18% differ by less than the 5-point margin.
    let mut vms = vms_on(1, 1, 1, 13.0);
    vms.extend(vms_on(2, 2, 1, 16.0));
    let mut snap = cluster(vec![host(1), host(2)], vms, PolicyKind::PowerSaving);
    snap.policy.properties.cpu_over_commit_duration_minutes = 0;
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(2)).unwrap();
    assert!(m.is_empty(), "{m:?}");
    // 15% vs 22%: h1 empties onto h2.
    snap.vms[1].cpu_usage_pct = 20.0;
    recompute(&mut snap, &Model::default());
    let (m, _) = balance(&snap, &BalanceState::default(), T0, &params(2)).unwrap();
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!((m[0].vm, m[0].from, m[0].to), (vid(1), hid(1), hid(2)));
}
