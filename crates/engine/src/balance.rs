//! Load balancing: the engine's periodic balancer over each cluster, under the cluster's
//! scheduling policy (the decisions are `oxvirt_scheduler::balance`; this module owns their
//! state between rounds, the VMs' CPU usage, and starting the migrations).
//!
//! Every `EngineSettings::balance_interval` (default [`BALANCE_INTERVAL`], oVirt's one minute)
//! the monitor calls [`round`]: per cluster, a
//! snapshot (hosts' live load, VMs' CPU usage measured here from the nodes' per-VM CPU time),
//! then [`Balancer::plan`], then one migration saga per decision. Limits and hysteresis:
//! - at most `max_parallel_migrations` migrations in flight per cluster, counting those the
//!   snapshot shows (`migrating_to`) and those this balancer started that have not finished;
//! - a host must stay over its threshold for the policy's duration before it gives VMs; a VM
//!   that moved waits `vm_cooldown`, and never returns to a host it left within `history_ttl`
//!   (see the scheduler crate's proof that rounds settle).
//!
//! State lives in memory: a restarted engine only waits one duration longer before balancing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oxvirt_scheduler as sched;
use oxvirt_scheduler::{BalanceParams, BalanceState, Migration};

use crate::commands::{CommandError, Commands, MigrateOptions};
use crate::db::ListQuery;
use crate::model::{ClusterId, VmId};
use crate::time::Timestamp;

/// How often the balancer runs by default.
pub const BALANCE_INTERVAL: Duration = Duration::from_secs(60);

fn sched_ts(t: Timestamp) -> sched::Timestamp {
    sched::Timestamp::from_unix_millis(t.as_millis().max(0) as u64)
}

/// Per-VM CPU usage from successive samples of the QEMU process's CPU time (and of its vCPU
/// threads', the guest's share of it), kept in [`crate::app::App::vm_cpu`]: the monitor
/// samples, the balancer and the statistics read.
#[derive(Debug, Default)]
pub struct VmCpu {
    /// When, the process's CPU time and its vCPUs' (ms).
    last: HashMap<VmId, (Timestamp, u64, Option<u64>)>,
    usage: HashMap<VmId, VmCpuUsage>,
}

/// A VM's CPU use between its last two samples, in percent of its vCPUs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VmCpuUsage {
    /// The whole QEMU process.
    pub total: f64,
    /// Its vCPU threads (the guest); `None` when the node did not say.
    pub guest: Option<f64>,
}

impl VmCpu {
    /// Records `cpu_ms` (user + system) of a VM with `vcpus` at `now`.
    pub fn sample(&mut self, vm: VmId, vcpus: u32, cpu_ms: u64, now: Timestamp) {
        self.sample_split(vm, vcpus, cpu_ms, None, now)
    }

    /// [`Self::sample`] with the vCPU threads' CPU time too.
    pub fn sample_split(&mut self, vm: VmId, vcpus: u32, cpu_ms: u64, vcpu_ms: Option<u64>, now: Timestamp) {
        if let Some((t, ms, vms)) = self.last.get(&vm) {
            let dt = now.as_millis() - t.as_millis();
            if dt > 0 && cpu_ms >= *ms {
                let per = dt as f64 * f64::from(vcpus.max(1));
                let pct = |d: u64| (d as f64 * 100.0 / per).clamp(0.0, 100.0);
                let guest = match (vcpu_ms, vms) {
                    (Some(now_v), Some(then_v)) if now_v >= *then_v => Some(pct(now_v - then_v)),
                    _ => None,
                };
                self.usage.insert(
                    vm,
                    VmCpuUsage {
                        total: pct(cpu_ms - ms),
                        guest,
                    },
                );
            }
        }
        self.last.insert(vm, (now, cpu_ms, vcpu_ms));
    }

    pub fn usage(&self, vm: VmId) -> Option<f64> {
        self.usage.get(&vm).map(|u| u.total)
    }

    pub fn usage_split(&self, vm: VmId) -> Option<VmCpuUsage> {
        self.usage.get(&vm).copied()
    }
}

/// The balancer's memory: the scheduler's state per cluster and the migrations it started.
#[derive(Debug, Default)]
pub struct Balancer {
    pub params: BalanceParams,
    states: HashMap<ClusterId, BalanceState>,
    /// Migrations started by us and not finished (the snapshot may not show them yet).
    in_flight: HashSet<VmId>,
    last_round: Option<Timestamp>,
}

impl Balancer {
    pub fn new(params: BalanceParams) -> Balancer {
        Balancer {
            params,
            ..Default::default()
        }
    }

    /// Whether a round is due at `now`.
    pub fn due(&self, now: Timestamp, interval: Duration) -> bool {
        self.last_round
            .is_none_or(|t| now.as_millis() - t.as_millis() >= interval.as_millis() as i64)
    }

    /// The migrations to start in `cluster` now (pure: a snapshot and a time in, decisions and
    /// the next state kept here). Migrations this balancer started and that have not finished
    /// count against the parallel limit even when the snapshot does not show them.
    pub fn plan(
        &mut self,
        cluster: ClusterId,
        snapshot: &sched::Snapshot,
        now: Timestamp,
    ) -> Result<Vec<Migration>, sched::BalanceError> {
        self.last_round = Some(now);
        let unseen = self
            .in_flight
            .iter()
            .filter(|vm| {
                snapshot
                    .vms
                    .iter()
                    .any(|v| v.id == **vm && v.migrating_to.is_none())
            })
            .count() as u32;
        let mut params = self.params;
        params.max_parallel_migrations = params.max_parallel_migrations.saturating_sub(unseen);
        let state = self.states.remove(&cluster).unwrap_or_default();
        let (moves, next) = sched::balance(snapshot, &state, sched_ts(now), &params)?;
        self.states.insert(cluster, next);
        let moves: Vec<Migration> = moves
            .into_iter()
            .filter(|m| !self.in_flight.contains(&m.vm))
            .collect();
        self.in_flight.extend(moves.iter().map(|m| m.vm));
        Ok(moves)
    }

    /// A migration the balancer started has ended (either way).
    pub fn finished(&mut self, vm: VmId) {
        self.in_flight.remove(&vm);
    }
}

/// One balancing pass over every cluster, if due.
pub async fn round(cmds: &Commands, balancer: &Arc<Mutex<Balancer>>) -> Result<(), CommandError> {
    let app = &cmds.app;
    let now = app.db.now();
    if !balancer
        .lock()
        .expect("balancer")
        .due(now, app.settings.balance_interval)
    {
        return Ok(());
    }
    for cl in app.db.cluster_list(&ListQuery::default()).await? {
        let mut snap = crate::scheduling::snapshot(app, cl.id).await?;
        {
            let cpu = app.vm_cpu.lock().expect("vm cpu");
            for v in &mut snap.vms {
                if let Some(u) = cpu.usage(v.id) {
                    v.cpu_usage_pct = u;
                }
            }
        }
        let moves = match balancer.lock().expect("balancer").plan(cl.id, &snap, now) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(cluster = %cl.name, error = %e, "balancing skipped");
                continue;
            }
        };
        for m in moves {
            tracing::info!(cluster = %cl.name, "{m}");
            let (cmds, balancer) = (cmds.clone(), balancer.clone());
            tokio::spawn(async move {
                let opts = MigrateOptions {
                    host: Some(crate::scheduling::engine_host_id(m.to)),
                };
                if let Err(e) = cmds.migrate_vm(m.vm, opts, None).await {
                    tracing::warn!(vm = %m.vm_name, error = %e, "balancing migration failed");
                }
                balancer.lock().expect("balancer").finished(m.vm);
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn hid(n: u128) -> sched::HostUuid {
        sched::HostUuid::from_uuid(uuid::Uuid::from_u128(n))
    }

    fn vid(n: u128) -> VmId {
        VmId::from_uuid(uuid::Uuid::from_u128(1000 + n))
    }

    /// A simulated cluster: 4 hosts of 8 cores, VMs with fixed CPU usage, migrations that take
    /// `migration_rounds` rounds to complete.
    struct Sim {
        hosts: Vec<sched::HostUuid>,
        /// VM → (host, usage % of its 4 vCPUs), plus the destination while migrating and the
        /// rounds left.
        vms: BTreeMap<VmId, SimVm>,
    }

    /// (host, usage %, migrating to and rounds left).
    type SimVm = (sched::HostUuid, f64, Option<(sched::HostUuid, u32)>);

    impl Sim {
        fn snapshot(&self) -> sched::Snapshot {
            let hosts = self
                .hosts
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let mine: Vec<_> = self.vms.values().filter(|v| v.0 == *h).collect();
                    let load: f64 = mine.iter().map(|v| v.1 * 4.0 / 8.0).sum();
                    sched::Host {
                        id: *h,
                        name: format!("h{i}"),
                        status: sched::HostStatus::Up,
                        cpu_cores: 8,
                        cpu_threads: 8,
                        cpu_load_pct: load.min(100.0),
                        mem_total_mib: 64 << 10,
                        mem_free_mib: 60 << 10,
                        swap_free_mib: 0,
                        mem_committed_mib: mine.len() as u64 * 1024,
                        max_scheduling_memory_mib: None,
                        storage_domains: BTreeSet::new(),
                        networks: BTreeSet::new(),
                        spm: i == 0,
                        vm_count: mine.len() as u32,
                        pending: sched::Pending::default(),
                    }
                })
                .collect();
            let vms = self
                .vms
                .iter()
                .map(|(id, (h, u, mig))| sched::Vm {
                    id: *id,
                    name: format!("vm{id}"),
                    memory_mib: 1024,
                    vcpus: 4,
                    cpu_usage_pct: *u,
                    current_host: Some(*h),
                    migrating_to: mig.map(|m| m.0),
                    pinned_hosts: Default::default(),
                    storage_domains: BTreeSet::new(),
                    networks: BTreeSet::new(),
                    highly_available: false,
                    ha_priority: 0,
                    migratable: true,
                    last_migrated_at: None,
                })
                .collect();
            sched::Snapshot {
                hosts,
                vms,
                affinity_groups: vec![],
                policy: sched::ClusterPolicy::new(sched::PolicyKind::EvenlyDistributed),
            }
        }
    }

    #[test]
    fn balancing_a_simulated_cluster_converges_within_limits_and_never_oscillates() {
        let hosts: Vec<_> = (1..=4).map(hid).collect();
        // Host 0 carries 9 VMs of 4 vCPUs at 20% (9 × 4 × 20% / 8 cores = 90%: over 80%); the
        // others are idle.
        let mut sim = Sim {
            hosts: hosts.clone(),
            vms: (0..9).map(|n| (vid(n), (hosts[0], 20.0, None))).collect(),
        };
        let clock = crate::time::ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
        use crate::time::Clock;
        let mut b = Balancer::new(BalanceParams {
            max_parallel_migrations: 2,
            ..BalanceParams::default()
        });
        let cluster = ClusterId::from_uuid(uuid::Uuid::from_u128(77));
        let mut left: HashMap<VmId, HashSet<sched::HostUuid>> = HashMap::new();
        let mut total = 0;
        let mut last_move_round = 0;
        for round in 0..200 {
            clock.advance(BALANCE_INTERVAL);
            // Migrations in flight progress; finished ones land and are reported.
            for (id, v) in sim.vms.iter_mut() {
                if let Some((to, n)) = v.2 {
                    if n <= 1 {
                        v.0 = to;
                        v.2 = None;
                        b.finished(*id);
                    } else {
                        v.2 = Some((to, n - 1));
                    }
                }
            }
            let snap = sim.snapshot();
            let moves = b.plan(cluster, &snap, clock.now()).unwrap();
            let flying = sim.vms.values().filter(|v| v.2.is_some()).count();
            assert!(
                flying + moves.len() <= 2,
                "round {round}: over the parallel limit"
            );
            for m in moves {
                let v = sim.vms.get_mut(&m.vm).unwrap();
                assert_eq!(v.0, m.from);
                assert!(v.2.is_none(), "a VM in flight is not moved again");
                assert!(
                    !left.get(&m.vm).is_some_and(|s| s.contains(&m.to)),
                    "round {round}: VM sent back to a host it left"
                );
                left.entry(m.vm).or_default().insert(m.from);
                v.2 = Some((m.to, 2));
                total += 1;
                last_move_round = round;
            }
        }
        assert!(total > 0, "the overloaded host gave VMs away");
        assert!(
            last_move_round < 100,
            "balancing settled (last move in round {last_move_round})"
        );
        // Settled: no host is over HighUtilization any more (80%).
        let snap = sim.snapshot();
        for h in &snap.hosts {
            assert!(h.cpu_load_pct < 80.0, "{} still at {}%", h.name, h.cpu_load_pct);
        }
    }

    #[test]
    fn cpu_usage_from_cpu_time_samples() {
        let mut c = VmCpu::default();
        let vm = vid(1);
        c.sample(vm, 2, 1_000, Timestamp::from_millis(10_000));
        assert_eq!(c.usage(vm), None);
        // 1 s of CPU over 1 s on 2 vCPUs: 50%.
        c.sample(vm, 2, 2_000, Timestamp::from_millis(11_000));
        assert_eq!(c.usage(vm), Some(50.0));
        // A restarted QEMU (counter went back) is not a negative load.
        c.sample(vm, 2, 10, Timestamp::from_millis(12_000));
        assert_eq!(c.usage(vm), Some(50.0));
    }

    #[test]
    fn due_once_per_interval() {
        let mut b = Balancer::default();
        let t0 = Timestamp::from_millis(1_000_000);
        assert!(b.due(t0, BALANCE_INTERVAL));
        b.last_round = Some(t0);
        assert!(!b.due(t0.saturating_add(Duration::from_secs(59)), BALANCE_INTERVAL));
        assert!(b.due(t0.saturating_add(BALANCE_INTERVAL), BALANCE_INTERVAL));
    }
}
