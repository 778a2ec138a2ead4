//! Property tests on seeded random clusters (3–20 hosts, up to 200 VMs): decisions never break a
//! hard constraint (checked by an oracle written apart from the filters), plans never overcommit
//! memory, and balancing converges without sending a VM back where it came from.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use oxvirt_scheduler::*;
use oxvirt_types::VmId;
use proptest::prelude::*;

const T0: Timestamp = Timestamp::from_unix_millis(1_700_000_000_000);

fn host_by_id(snap: &Snapshot, id: HostUuid) -> &Host {
    snap.hosts.iter().find(|h| h.id == id).unwrap()
}

/// Checks a placement against the oracle: a chosen host breaks nothing; a refusal means every
/// host breaks something.
fn check_outcome(
    snap: &Snapshot,
    vm: &Vm,
    outcome: &Result<Placement, PlacementError>,
    locs: &Locs,
    added: &HashMap<HostUuid, u64>,
    leaving_current: bool,
) -> Result<(), TestCaseError> {
    let broken = |h: &Host| {
        violations(
            snap,
            vm,
            h,
            locs,
            added.get(&h.id).copied().unwrap_or(0),
            leaving_current,
        )
    };
    match outcome {
        Ok(p) => {
            let v = broken(host_by_id(snap, p.host));
            prop_assert!(v.is_empty(), "{} on {}: {:?}", vm.name, p.host_name, v);
        }
        Err(PlacementError::NoHost { hosts, .. }) => {
            prop_assert_eq!(hosts.len(), snap.hosts.len());
            for h in &snap.hosts {
                prop_assert!(
                    !broken(h).is_empty(),
                    "{} refused although {} fits: {}",
                    vm.name,
                    h.name,
                    outcome.as_ref().unwrap_err()
                );
            }
        }
        Err(PlacementError::NotMigratable { .. }) => prop_assert!(!vm.migratable),
        Err(e) => prop_assert!(false, "unexpected error for {}: {e}", vm.name),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn placement_never_violates_a_hard_filter(seed in any::<u64>()) {
        let snap = random_cluster(seed, 200);
        let locs = Locs::of(&snap);
        let none = HashMap::new();
        for vm in snap.vms.iter().take(40) {
            let purpose = if vm.current_host.is_none() { Purpose::Start } else { Purpose::Migrate };
            let migrating = purpose == Purpose::Migrate;
            // Every host's verdict agrees with the oracle.
            let verdicts = filter_hosts(&snap, vm.id, purpose).unwrap();
            for (h, verdict) in snap.hosts.iter().zip(&verdicts) {
                prop_assert_eq!(verdict.host, h.id);
                let v = violations(&snap, vm, h, &locs, 0, migrating);
                prop_assert_eq!(verdict.passed(), v.is_empty(), "{}: {} vs {:?}", vm.name, verdict, v);
                for r in &verdict.rejections {
                    prop_assert!(!r.to_string().is_empty());
                }
            }
            let outcome = place(&snap, vm.id, purpose);
            check_outcome(&snap, vm, &outcome, &locs, &none, migrating)?;
        }
    }

    #[test]
    fn ha_restarts_respect_filters_and_priority(seed in any::<u64>()) {
        let mut snap = random_cluster(seed, 200);
        let dead = (seed % snap.hosts.len() as u64) as usize;
        snap.hosts[dead].status = HostStatus::NonResponsive;
        let dead_id = snap.hosts[dead].id;
        let batch: Vec<VmId> = snap
            .vms
            .iter()
            .filter(|v| v.current_host == Some(dead_id) && v.highly_available)
            .map(|v| v.id)
            .collect();
        let results = place_many(&snap, &batch, Purpose::HaRestart).unwrap();
        prop_assert_eq!(results.len(), batch.len());

        let mut locs = Locs::of(&snap);
        for id in &batch {
            locs.at.remove(id);
        }
        let mut added: HashMap<HostUuid, u64> = HashMap::new();
        let mut last_priority = u32::MAX;
        for (id, outcome) in &results {
            let vm = snap.vm(*id).unwrap();
            prop_assert!(vm.ha_priority <= last_priority, "restart order follows priority");
            last_priority = vm.ha_priority;
            check_outcome(&snap, vm, outcome, &locs, &added, false)?;
            if let Ok(p) = outcome {
                locs.at.insert(*id, p.host);
                *added.entry(p.host).or_default() += vm.memory_mib;
            }
        }
    }

    #[test]
    fn evacuation_never_overcommits_a_host(seed in any::<u64>()) {
        let mut snap = random_cluster(seed, 200);
        let leaving = (seed % snap.hosts.len() as u64) as usize;
        snap.hosts[leaving].status = HostStatus::PreparingForMaintenance;
        let host_id = snap.hosts[leaving].id;
        let plan = plan_evacuation(&snap, host_id).unwrap();

        // Replay the plan in its documented order: HA first by priority, then larger first.
        let mut order: Vec<&Vm> = snap.vms.iter().filter(|v| v.current_host == Some(host_id)).collect();
        order.sort_by(|a, b| {
            b.highly_available.cmp(&a.highly_available)
                .then(b.ha_priority.cmp(&a.ha_priority))
                .then(b.memory_mib.cmp(&a.memory_mib))
                .then(a.id.cmp(&b.id))
        });
        prop_assert_eq!(plan.moves.len() + plan.unplaced.len(), order.len());
        let moves: HashMap<VmId, &Placement> = plan.moves.iter().map(|p| (p.vm, p)).collect();
        let unplaced: HashMap<VmId, &PlacementError> = plan.unplaced.iter().map(|(v, e)| (*v, e)).collect();
        let planned: Vec<VmId> = order.iter().filter(|v| moves.contains_key(&v.id)).map(|v| v.id).collect();
        let listed: Vec<VmId> = plan.moves.iter().map(|p| p.vm).collect();
        prop_assert_eq!(planned, listed);

        let mut locs = Locs::of(&snap);
        for vm in &order {
            locs.at.remove(&vm.id);
        }
        let mut added: HashMap<HostUuid, u64> = HashMap::new();
        for vm in order {
            let outcome = match (moves.get(&vm.id), unplaced.get(&vm.id)) {
                (Some(p), None) => Ok((*p).clone()),
                (None, Some(e)) => Err((*e).clone()),
                _ => return Err(TestCaseError::fail(format!("{} planned twice or never", vm.name))),
            };
            check_outcome(&snap, vm, &outcome, &locs, &added, true)?;
            if let Ok(p) = outcome {
                prop_assert_eq!(p.from, Some(host_id));
                locs.at.insert(vm.id, p.host);
                *added.entry(p.host).or_default() += vm.memory_mib;
            }
        }
        for h in &snap.hosts {
            let add = added.get(&h.id).copied().unwrap_or(0);
            if add > 0 {
                prop_assert!(h.mem_committed_mib + h.pending.mem_mib + add <= memory_limit(&snap, h),
                    "{} overcommitted", h.name);
                prop_assert!((h.mem_free_mib + h.swap_free_mib) as i128 - (h.pending.mem_mib + add) as i128 >= 0,
                    "{} out of physical memory", h.name);
            }
        }
    }
}

/// What a simulated run of the balancer did.
struct Run {
    rounds: usize,
    migrations: usize,
    initial_max_load: f64,
    final_max_load: f64,
}

const MAX_ROUNDS: usize = 600;

/// Runs the balancer on `snap` round after round (one minute apart), applying its migrations
/// at once and recomputing host statistics with the test model, until it has proposed nothing for
/// long enough that no hysteresis timer or cooldown can still fire. Checks on the way that every
/// migration passes the oracle, respects the parallel limit, never returns a VM to a host it left,
/// and moves the policy's potential the right way.
fn simulate(mut snap: Snapshot, max_parallel: u32) -> Result<Run, TestCaseError> {
    let model = Model::default();
    let params = BalanceParams {
        max_parallel_migrations: max_parallel,
        history_ttl: minutes(24 * 60),
        ..BalanceParams::default()
    };
    let props = snap.policy.properties;
    let quiet_needed = (props.over_commit_duration() + params.vm_cooldown).as_secs() as usize / 60 + 2;
    let mut state = BalanceState::default();
    let mut now = T0;
    let mut quiet = 0;
    let mut left: HashMap<VmId, HashSet<HostUuid>> = HashMap::new();
    let mut migrations = 0;
    let max_load = |s: &Snapshot| s.hosts.iter().map(|h| h.cpu_load_pct).fold(0.0, f64::max);
    let initial_max_load = max_load(&snap);

    for round in 0..MAX_ROUNDS {
        let (migs, next) = balance(&snap, &state, now, &params).unwrap();
        prop_assert!(migs.len() <= max_parallel as usize);
        let before = potentials(&snap, &model);

        let mut locs = Locs::of(&snap);
        let mut added: HashMap<HostUuid, u64> = HashMap::new();
        for m in &migs {
            let vm = snap.vm(m.vm).unwrap();
            prop_assert_eq!(vm.current_host, Some(m.from));
            let dest = host_by_id(&snap, m.to);
            let v = violations(
                &snap,
                vm,
                dest,
                &locs,
                added.get(&m.to).copied().unwrap_or(0),
                true,
            );
            prop_assert!(v.is_empty(), "round {round}: {m} breaks {v:?}");
            prop_assert!(
                !left.get(&m.vm).is_some_and(|l| l.contains(&m.to)),
                "round {round}: {m} sends the VM back to a host it left"
            );
            left.entry(m.vm).or_default().insert(m.from);
            locs.at.insert(m.vm, m.to);
            locs.leaving.insert(m.vm, m.from);
            *added.entry(m.to).or_default() += vm.memory_mib;
        }
        for m in &migs {
            let vm = snap.vms.iter_mut().find(|v| v.id == m.vm).unwrap();
            vm.current_host = Some(m.to);
            vm.last_migrated_at = Some(now);
        }
        recompute(&mut snap, &model);
        migrations += migs.len();

        if !migs.is_empty() {
            let after = potentials(&snap, &model);
            check_potentials(snap.policy.kind, &before, &after, round)?;
            quiet = 0;
        } else {
            quiet += 1;
            if quiet >= quiet_needed {
                return Ok(Run {
                    rounds: round + 1,
                    migrations,
                    initial_max_load,
                    final_max_load: max_load(&snap),
                });
            }
        }
        state = next;
        now = now + minutes(1);
    }
    Err(TestCaseError::fail(format!(
        "no convergence after {MAX_ROUNDS} rounds ({migrations} migrations)"
    )))
}

struct Potentials {
    /// Σ cpus · demand², demand unclamped.
    squares: f64,
    /// Σ cpus · max(0, demand − HighUtilization).
    excess: f64,
    /// Σ slots², slots = VM count + SPM grace.
    slots: i64,
}

fn potentials(snap: &Snapshot, model: &Model) -> Potentials {
    let demand = demand(snap, model);
    let high = f64::from(snap.policy.properties.high_utilization);
    let mut p = Potentials {
        squares: 0.0,
        excess: 0.0,
        slots: 0,
    };
    for h in &snap.hosts {
        let k = f64::from(host_cpus(snap, h));
        let d = demand[&h.id];
        p.squares += k * d * d;
        p.excess += k * (d - high).max(0.0);
        let grace = if h.spm {
            i64::from(snap.policy.properties.spm_vm_grace)
        } else {
            0
        };
        let s = i64::from(h.vm_count) + grace;
        p.slots += s * s;
    }
    p
}

fn check_potentials(
    kind: PolicyKind,
    before: &Potentials,
    after: &Potentials,
    round: usize,
) -> Result<(), TestCaseError> {
    const EPS: f64 = 1e-6;
    match kind {
        PolicyKind::EvenlyDistributed => prop_assert!(
            after.squares < before.squares - EPS,
            "round {round}: Σ cpus·load² went from {} to {}",
            before.squares,
            after.squares
        ),
        PolicyKind::PowerSaving => {
            prop_assert!(
                after.excess <= before.excess + EPS,
                "round {round}: excess went from {} to {}",
                before.excess,
                after.excess
            );
            if after.excess >= before.excess - EPS {
                prop_assert!(
                    after.squares >= before.squares - EPS,
                    "round {round}: consolidation lowered Σ cpus·load² from {} to {}",
                    before.squares,
                    after.squares
                );
            }
        }
        PolicyKind::VmEvenlyDistributed => prop_assert!(
            after.slots < before.slots,
            "round {round}: Σ slots² went from {} to {}",
            before.slots,
            after.slots
        ),
        PolicyKind::None => prop_assert!(false, "policy none migrated"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn balancing_converges_without_back_and_forth(
        seed in any::<u64>(),
        policy in 0..3usize,
        max_parallel in 1..=4u32,
    ) {
        let kind = [
            PolicyKind::EvenlyDistributed,
            PolicyKind::PowerSaving,
            PolicyKind::VmEvenlyDistributed,
        ][policy];
        let snap = unbalanced_cluster(seed, kind, 200);
        simulate(snap, max_parallel)?;
    }
}

/// The simulation is not vacuous: on fixed seeds the balancer does move VMs, and under
/// `evenly_distributed` it lowers the peak load.
#[test]
fn balancing_does_real_work() {
    let mut total = 0;
    for seed in 0..6 {
        for kind in [
            PolicyKind::EvenlyDistributed,
            PolicyKind::PowerSaving,
            PolicyKind::VmEvenlyDistributed,
        ] {
            let run = simulate(unbalanced_cluster(seed, kind, 200), 2).unwrap();
            total += run.migrations;
            eprintln!(
                "seed {seed} {kind}: {} rounds, {} migrations, peak {:.0} → {:.0}",
                run.rounds, run.migrations, run.initial_max_load, run.final_max_load
            );
            assert!(run.rounds <= MAX_ROUNDS);
            if kind == PolicyKind::EvenlyDistributed {
                assert!(
                    run.final_max_load <= run.initial_max_load,
                    "seed {seed}: peak {} → {}",
                    run.initial_max_load,
                    run.final_max_load
                );
            }
        }
    }
    assert!(total > 50, "only {total} migrations over 18 runs");
}
