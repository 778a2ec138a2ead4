//! Load balancing: which running VMs to migrate, under the cluster's policy, so that applying the
//! decisions round after round settles instead of oscillating.
//!
//! [`balance`] is called periodically (oVirt: every minute) with the current snapshot, the state
//! returned by the previous call, and the time. It returns at most
//! `max_parallel_migrations − migrations in progress` migrations and the next state.
//!
//! Policies (HighUtilization etc. are the policy's properties):
//! - `none`: never migrates.
//! - `evenly_distributed`: a host whose CPU load has stayed at or above HighUtilization for
//!   CpuOverCommitDurationMinutes gives VMs to hosts that stay below HighUtilization.
//! - `power_saving`: as `evenly_distributed`, then a host whose load has stayed at or below
//!   LowUtilization for the duration gives its VMs to busier hosts that stay below
//!   HighUtilization, so that it empties and can be switched off.
//! - `vm_evenly_distributed`: a host with at least HighVmCount VMs (the SPM counting SpmVmGrace
//!   more) for the duration gives VMs to hosts with at least MigrationThreshold fewer.
//!
//! Why it never oscillates, with per-VM loads that do not change:
//! - a CPU move from source S to destination D requires `load(D) after ≤ load(S) after − margin`
//!   and a VM that uses CPU; then `Φ = Σ cpus(h) · load(h)²` falls by at least
//!   `2 · margin · (the VM's CPU)`, and since Φ ≥ 0 this can happen only finitely often. The
//!   destination stays below HighUtilization, so the total excess over it strictly falls too;
//! - a power-saving emptying move goes to a host at least `margin` busier than the source and
//!   keeps it below HighUtilization: Φ rises (or, for an idle VM, stays while the VM climbs a fixed
//!   order of hosts), never creating an over-utilized host, so no sequence of moves can return to
//!   an earlier state;
//! - a VM-count move requires a difference of at least `max(MigrationThreshold, 2)`, so
//!   `Σ slots(h)²` falls by at least 2 (a threshold of 1 would swap a VM between two hosts for
//!   ever, so it is raised to 2);
//! - in one round a host either gives or receives VMs, never both.
//!
//! And when loads do change, hysteresis damps the reaction: a host must stay over (or under) its
//! threshold for the whole duration before it gives anything, a VM that moved (for any reason)
//! waits `vm_cooldown` before the balancer moves it again, and a VM is never sent back to a host
//! the balancer moved it away from within `history_ttl`.

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use oxvirt_types::VmId;
use serde::{Deserialize, Serialize};

use crate::filter;
use crate::model::{HostUuid, PolicyKind, Snapshot, SnapshotError, Timestamp};
use crate::place::Purpose;
use crate::view::View;

/// The balancer's own knobs (the policy's live in the snapshot).
#[derive(Clone, Copy, PartialEq, Debug, Serialize, Deserialize)]
pub struct BalanceParams {
    /// Migrations in flight at once in the cluster, counting those already running.
    pub max_parallel_migrations: u32,
    /// Minimum CPU load difference (percentage points) a move must leave between source and
    /// destination; above 0.
    pub margin_pct: f64,
    /// A VM that migrated less than this long ago is not moved.
    pub vm_cooldown: Duration,
    /// How long the balancer remembers its moves (at least `vm_cooldown`).
    pub history_ttl: Duration,
}

impl Default for BalanceParams {
    fn default() -> Self {
        Self {
            max_parallel_migrations: 2,
            margin_pct: 5.0,
            vm_cooldown: Duration::from_secs(10 * 60),
            history_ttl: Duration::from_secs(60 * 60),
        }
    }
}

/// One migration the balancer decided on.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct MoveRecord {
    pub from: HostUuid,
    pub to: HostUuid,
    pub at: Timestamp,
}

/// What the balancer carries from one round to the next; the engine may persist it (it is
/// serializable) or start from the default after a restart, which only delays balancing by one
/// duration.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct BalanceState {
    /// Since when each host has been at or above HighUtilization, without interruption.
    pub cpu_over_since: BTreeMap<HostUuid, Timestamp>,
    /// Since when each host with VMs has been at or below LowUtilization (`power_saving`).
    pub cpu_under_since: BTreeMap<HostUuid, Timestamp>,
    /// Since when each host has had at least HighVmCount VMs (`vm_evenly_distributed`).
    pub vm_count_over_since: BTreeMap<HostUuid, Timestamp>,
    /// The balancer's recent moves per VM, oldest first.
    pub moves: BTreeMap<VmId, Vec<MoveRecord>>,
}

/// Why a VM is moved, with the figures the decision used.
#[derive(Clone, Copy, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum BalanceReason {
    CpuOverUtilized {
        source_load_pct: f64,
        high_utilization: u32,
        source_load_after_pct: f64,
        destination_load_after_pct: f64,
    },
    CpuUnderUtilized {
        source_load_pct: f64,
        low_utilization: u32,
        destination_load_after_pct: f64,
    },
    VmCountOverUtilized {
        source_slots: i64,
        high_vm_count: u32,
        destination_slots: i64,
    },
}

impl fmt::Display for BalanceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CpuOverUtilized {
                source_load_pct,
                high_utilization,
                source_load_after_pct,
                destination_load_after_pct,
            } => write!(
                f,
                "source CPU {source_load_pct:.0}% ≥ HighUtilization {high_utilization}%; \
                 after the move source {source_load_after_pct:.0}%, destination {destination_load_after_pct:.0}%"
            ),
            Self::CpuUnderUtilized {
                source_load_pct,
                low_utilization,
                destination_load_after_pct,
            } => write!(
                f,
                "source CPU {source_load_pct:.0}% ≤ LowUtilization {low_utilization}%, emptying it; \
                 destination {destination_load_after_pct:.0}% after the move"
            ),
            Self::VmCountOverUtilized {
                source_slots,
                high_vm_count,
                destination_slots,
            } => write!(
                f,
                "source has {source_slots} VM slots ≥ HighVmCount {high_vm_count}; destination {destination_slots}"
            ),
        }
    }
}

/// A migration to start.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Migration {
    pub vm: VmId,
    pub vm_name: String,
    pub from: HostUuid,
    pub from_name: String,
    pub to: HostUuid,
    pub to_name: String,
    pub reason: BalanceReason,
}

impl fmt::Display for Migration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "migrate VM '{}' from host {} to host {}: {}",
            self.vm_name, self.from_name, self.to_name, self.reason
        )
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BalanceError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("balance margin {0} is not a percentage above 0")]
    BadMargin(f64),
    #[error("balance history TTL {ttl:?} is shorter than the VM cooldown {cooldown:?}")]
    HistoryShorterThanCooldown { ttl: Duration, cooldown: Duration },
}

/// One balancing round: the migrations to start now, and the state for the next round.
pub fn balance(
    snapshot: &Snapshot,
    state: &BalanceState,
    now: Timestamp,
    params: &BalanceParams,
) -> Result<(Vec<Migration>, BalanceState), BalanceError> {
    snapshot.validate()?;
    if !(params.margin_pct.is_finite() && params.margin_pct > 0.0 && params.margin_pct <= 100.0) {
        return Err(BalanceError::BadMargin(params.margin_pct));
    }
    if params.history_ttl < params.vm_cooldown {
        return Err(BalanceError::HistoryShorterThanCooldown {
            ttl: params.history_ttl,
            cooldown: params.vm_cooldown,
        });
    }

    let mut view = View::new(snapshot);
    let mut next = state.clone();
    next.moves.retain(|_, records| {
        records.retain(|r| now.since(r.at) < params.history_ttl);
        !records.is_empty()
    });
    update_trackers(&view, &mut next, now);

    let kind = snapshot.policy.kind;
    let up = (0..snapshot.hosts.len()).filter(|&h| view.is_up(h)).count();
    let in_flight = snapshot.vms.iter().filter(|vm| vm.migrating_to.is_some()).count();
    let mut budget = usize::try_from(params.max_parallel_migrations)
        .unwrap_or(usize::MAX)
        .saturating_sub(in_flight);
    if kind == PolicyKind::None || up < 2 {
        budget = 0;
    }

    let mut round = Round {
        now,
        params,
        state: &next,
        vms_on: vec![Vec::new(); snapshot.hosts.len()],
        left: HashMap::new(),
    };
    for (v, vm) in snapshot.vms.iter().enumerate() {
        if let (Some(h), None) = (vm.current_host, vm.migrating_to) {
            round.vms_on[view.host_pos[&h]].push(v);
        }
    }
    for (vm, records) in &next.moves {
        round.left.insert(*vm, records.iter().map(|r| r.from).collect());
    }

    let mut migrations = Vec::new();
    while budget > 0 {
        let found = match kind {
            PolicyKind::None => None,
            PolicyKind::EvenlyDistributed => round.cpu_over_move(&view, false),
            PolicyKind::PowerSaving => round
                .cpu_over_move(&view, true)
                .or_else(|| round.cpu_under_move(&view)),
            PolicyKind::VmEvenlyDistributed => round.vm_count_move(&view),
        };
        let Some(Move { v, from, to, reason }) = found else {
            break;
        };
        view.assign(v, to);
        let vm = &snapshot.vms[v];
        let (src, dst) = (&snapshot.hosts[from], &snapshot.hosts[to]);
        migrations.push(Migration {
            vm: vm.id,
            vm_name: vm.name.clone(),
            from: src.id,
            from_name: src.name.clone(),
            to: dst.id,
            to_name: dst.name.clone(),
            reason,
        });
        budget -= 1;
    }
    for m in &migrations {
        next.moves.entry(m.vm).or_default().push(MoveRecord {
            from: m.from,
            to: m.to,
            at: now,
        });
    }
    Ok((migrations, next))
}

/// Starts, keeps or drops each host's "over/under the threshold since" mark from the round's
/// starting view. Only `up` hosts are tracked, and only for the policy in force.
fn update_trackers(view: &View<'_>, state: &mut BalanceState, now: Timestamp) {
    let snap = view.snap;
    let props = &snap.policy.properties;
    let kind = snap.policy.kind;
    let high = f64::from(props.high_utilization);
    let low = f64::from(props.low_utilization);
    let track = |map: &mut BTreeMap<HostUuid, Timestamp>, enabled: bool, cond: &dyn Fn(usize) -> bool| {
        let mut kept = BTreeMap::new();
        if enabled {
            for h in 0..snap.hosts.len() {
                if view.is_up(h) && cond(h) {
                    let id = snap.hosts[h].id;
                    kept.insert(id, map.get(&id).copied().unwrap_or(now));
                }
            }
        }
        *map = kept;
    };
    let cpu = matches!(kind, PolicyKind::EvenlyDistributed | PolicyKind::PowerSaving);
    track(&mut state.cpu_over_since, cpu, &|h| {
        view.hosts[h].load_pct >= high
    });
    track(
        &mut state.cpu_under_since,
        kind == PolicyKind::PowerSaving,
        &|h| view.hosts[h].load_pct <= low && view.hosts[h].vm_count > 0,
    );
    track(
        &mut state.vm_count_over_since,
        kind == PolicyKind::VmEvenlyDistributed,
        &|h| view.slots(h) >= i64::from(props.high_vm_count),
    );
}

struct Move {
    v: usize,
    from: usize,
    to: usize,
    reason: BalanceReason,
}

struct Round<'a> {
    now: Timestamp,
    params: &'a BalanceParams,
    state: &'a BalanceState,
    /// VMs running on each host at the start of the round and not migrating.
    vms_on: Vec<Vec<usize>>,
    /// Hosts the balancer moved each VM away from, within the history TTL.
    left: HashMap<VmId, HashSet<HostUuid>>,
}

impl Round<'_> {
    fn sustained(&self, map: &BTreeMap<HostUuid, Timestamp>, view: &View<'_>, h: usize) -> bool {
        let duration = view.snap.policy.properties.over_commit_duration();
        map.get(&view.snap.hosts[h].id)
            .is_some_and(|since| self.now.since(*since) >= duration)
    }

    /// VMs on `s` the balancer may move now: still there, migratable, out of cooldown.
    fn movable<'v>(&'v self, view: &'v View<'_>, s: usize) -> impl Iterator<Item = usize> + 'v {
        self.vms_on[s].iter().copied().filter(move |&v| {
            let vm = &view.snap.vms[v];
            if view.locs[v].at != Some(s) || !vm.migratable {
                return false;
            }
            let last_balanced = self.state.moves.get(&vm.id).and_then(|r| r.last()).map(|r| r.at);
            let last = vm.last_migrated_at.max(last_balanced);
            last.is_none_or(|t| self.now.since(t) >= self.params.vm_cooldown)
        })
    }

    /// Hosts the balancer moved VM `v` away from.
    fn left_by(&self, view: &View<'_>, v: usize) -> Option<&HashSet<HostUuid>> {
        self.left.get(&view.snap.vms[v].id)
    }

    /// A destination the balancer may use for a VM from `s` that it moved away from the hosts
    /// `left`, apart from the policy's test and the filters.
    fn open_destination(view: &View<'_>, left: Option<&HashSet<HostUuid>>, s: usize, d: usize) -> bool {
        d != s
            && view.is_up(d)
            && !view.hosts[d].gave
            && !left.is_some_and(|hosts| hosts.contains(&view.snap.hosts[d].id))
    }

    /// Moves a VM off the most loaded host that has been over HighUtilization for the duration.
    /// With `prefer_busy` (power saving), destinations above LowUtilization come first so that
    /// the hosts being emptied are not refilled.
    fn cpu_over_move(&self, view: &View<'_>, prefer_busy: bool) -> Option<Move> {
        let snap = view.snap;
        let props = &snap.policy.properties;
        let high = f64::from(props.high_utilization);
        let low = f64::from(props.low_utilization);
        let margin = self.params.margin_pct;
        let mut sources: Vec<usize> = (0..snap.hosts.len())
            .filter(|&h| {
                view.is_up(h)
                    && !view.hosts[h].received
                    && view.hosts[h].load_pct >= high
                    && self.sustained(&self.state.cpu_over_since, view, h)
            })
            .collect();
        sort_desc_by_load(view, &mut sources);

        for s in sources {
            let load_s = view.hosts[s].load_pct;
            let k_s = f64::from(view.host_cpus(s));
            let mut candidates: Vec<(OverKey, Move)> = Vec::new();
            for v in self.movable(view, s) {
                let c_s = view.contribution(v, s);
                if c_s <= 0.0 {
                    continue;
                }
                let a = (load_s - c_s).max(0.0);
                let left = self.left_by(view, v);
                for d in 0..snap.hosts.len() {
                    if !Self::open_destination(view, left, s, d) {
                        continue;
                    }
                    let load_d = view.hosts[d].load_pct;
                    let b = load_d + view.contribution(v, d);
                    if b >= high || b > a - margin {
                        continue;
                    }
                    let k_d = f64::from(view.host_cpus(d));
                    let gain = k_s * (load_s * load_s - a * a) + k_d * (load_d * load_d - b * b);
                    let vm = &snap.vms[v];
                    let key = (
                        prefer_busy && load_d <= low,
                        -gain,
                        vm.memory_mib,
                        vm.id,
                        snap.hosts[d].id,
                    );
                    candidates.push((
                        key,
                        Move {
                            v,
                            from: s,
                            to: d,
                            reason: BalanceReason::CpuOverUtilized {
                                source_load_pct: load_s,
                                high_utilization: props.high_utilization,
                                source_load_after_pct: a,
                                destination_load_after_pct: b,
                            },
                        },
                    ));
                }
            }
            if let Some(m) = first_passing(view, candidates) {
                return Some(m);
            }
        }
        None
    }

    /// Power saving: moves a VM off the host that is easiest to empty (fewest VMs, least load)
    /// among those under LowUtilization for the duration, onto the busiest host that stays below
    /// HighUtilization and is at least `margin` busier than the source.
    fn cpu_under_move(&self, view: &View<'_>) -> Option<Move> {
        let snap = view.snap;
        let props = &snap.policy.properties;
        let high = f64::from(props.high_utilization);
        let low = f64::from(props.low_utilization);
        let margin = self.params.margin_pct;
        let mut sources: Vec<usize> = (0..snap.hosts.len())
            .filter(|&h| {
                view.is_up(h)
                    && !view.hosts[h].received
                    && view.hosts[h].vm_count > 0
                    && view.hosts[h].load_pct <= low
                    && self.sustained(&self.state.cpu_under_since, view, h)
            })
            .collect();
        sources.sort_by(|&a, &b| {
            view.hosts[a]
                .vm_count
                .cmp(&view.hosts[b].vm_count)
                .then(view.hosts[a].load_pct.total_cmp(&view.hosts[b].load_pct))
                .then(snap.hosts[a].id.cmp(&snap.hosts[b].id))
        });

        for s in sources {
            let load_s = view.hosts[s].load_pct;
            let k_s = f64::from(view.host_cpus(s));
            let mut candidates: Vec<(UnderKey, Move)> = Vec::new();
            for v in self.movable(view, s) {
                let c_s = view.contribution(v, s);
                let a = (load_s - c_s).max(0.0);
                let left = self.left_by(view, v);
                for d in 0..snap.hosts.len() {
                    if !Self::open_destination(view, left, s, d) {
                        continue;
                    }
                    let load_d = view.hosts[d].load_pct;
                    let b = load_d + view.contribution(v, d);
                    if load_d < load_s + margin || b >= high {
                        continue;
                    }
                    let k_d = f64::from(view.host_cpus(d));
                    let gain = k_d * (b * b - load_d * load_d) - k_s * (load_s * load_s - a * a);
                    let vm = &snap.vms[v];
                    let key = (-gain, -load_d, vm.memory_mib, vm.id, snap.hosts[d].id);
                    candidates.push((
                        key,
                        Move {
                            v,
                            from: s,
                            to: d,
                            reason: BalanceReason::CpuUnderUtilized {
                                source_load_pct: load_s,
                                low_utilization: props.low_utilization,
                                destination_load_after_pct: b,
                            },
                        },
                    ));
                }
            }
            if let Some(m) = first_passing(view, candidates) {
                return Some(m);
            }
        }
        None
    }

    /// Moves the smallest movable VM off the host with the most VM slots (HighVmCount or more
    /// for the duration) to the host with the fewest, if they differ by the threshold.
    fn vm_count_move(&self, view: &View<'_>) -> Option<Move> {
        let snap = view.snap;
        let props = &snap.policy.properties;
        let threshold = i64::from(props.migration_threshold.max(2));
        let mut sources: Vec<usize> = (0..snap.hosts.len())
            .filter(|&h| {
                view.is_up(h)
                    && !view.hosts[h].received
                    && view.slots(h) >= i64::from(props.high_vm_count)
                    && self.sustained(&self.state.vm_count_over_since, view, h)
            })
            .collect();
        sources.sort_by(|&a, &b| {
            view.slots(b)
                .cmp(&view.slots(a))
                .then(snap.hosts[a].id.cmp(&snap.hosts[b].id))
        });

        for s in sources {
            let slots_s = view.slots(s);
            let mut dests: Vec<usize> = (0..snap.hosts.len())
                .filter(|&d| d != s && view.is_up(d) && slots_s - view.slots(d) >= threshold)
                .collect();
            dests.sort_by(|&a, &b| {
                view.slots(a)
                    .cmp(&view.slots(b))
                    .then(snap.hosts[a].id.cmp(&snap.hosts[b].id))
            });
            let mut vms: Vec<usize> = self.movable(view, s).collect();
            vms.sort_by(|&a, &b| {
                let (a, b) = (&snap.vms[a], &snap.vms[b]);
                a.memory_mib.cmp(&b.memory_mib).then(a.id.cmp(&b.id))
            });
            let lefts: Vec<_> = vms.iter().map(|&v| self.left_by(view, v)).collect();
            for &d in &dests {
                for (&v, &left) in vms.iter().zip(&lefts) {
                    if Self::open_destination(view, left, s, d)
                        && filter::passes(view, v, d, Purpose::Migrate)
                    {
                        return Some(Move {
                            v,
                            from: s,
                            to: d,
                            reason: BalanceReason::VmCountOverUtilized {
                                source_slots: slots_s,
                                high_vm_count: props.high_vm_count,
                                destination_slots: view.slots(d),
                            },
                        });
                    }
                }
            }
        }
        None
    }
}

fn sort_desc_by_load(view: &View<'_>, hosts: &mut [usize]) {
    hosts.sort_by(|&a, &b| {
        view.hosts[b]
            .load_pct
            .total_cmp(&view.hosts[a].load_pct)
            .then(view.snap.hosts[a].id.cmp(&view.snap.hosts[b].id))
    });
}

/// The most preferred candidate move that passes the hard filters. The filters run last and
/// lazily, in order of preference, because most candidate pairs never need them.
fn first_passing<K: TotalKey>(view: &View<'_>, mut candidates: Vec<(K, Move)>) -> Option<Move> {
    let mut heap: BinaryHeap<Ranked<'_, K>> = candidates
        .iter()
        .enumerate()
        .map(|(i, (k, _))| Ranked(k, i))
        .collect();
    let mut chosen = None;
    while let Some(Ranked(_, i)) = heap.pop() {
        let m = &candidates[i].1;
        if filter::passes(view, m.v, m.to, Purpose::Migrate) {
            chosen = Some(i);
            break;
        }
    }
    drop(heap);
    chosen.map(|i| candidates.swap_remove(i).1)
}

/// A candidate's key and position, ordered so that a max-heap pops the smallest key first.
struct Ranked<'a, K>(&'a K, usize);

impl<K: TotalKey> PartialEq for Ranked<'_, K> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl<K: TotalKey> Eq for Ranked<'_, K> {}

impl<K: TotalKey> PartialOrd for Ranked<'_, K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<K: TotalKey> Ord for Ranked<'_, K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.0.total_cmp(self.0).then(other.1.cmp(&self.1))
    }
}

/// Preference among moves off an over-utilized host, smallest first: (refills an under-utilized
/// host, −gain, memory, VM id, destination id).
type OverKey = (bool, f64, u64, VmId, HostUuid);
/// Preference among moves off an under-utilized host, smallest first: (−gain, −destination
/// load, memory, VM id, destination id).
type UnderKey = (f64, f64, u64, VmId, HostUuid);

trait TotalKey {
    fn total_cmp(&self, other: &Self) -> std::cmp::Ordering;
}

impl TotalKey for OverKey {
    fn total_cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0
            .cmp(&o.0)
            .then(self.1.total_cmp(&o.1))
            .then(self.2.cmp(&o.2))
            .then(self.3.cmp(&o.3))
            .then(self.4.cmp(&o.4))
    }
}

impl TotalKey for UnderKey {
    fn total_cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0
            .total_cmp(&o.0)
            .then(self.1.total_cmp(&o.1))
            .then(self.2.cmp(&o.2))
            .then(self.3.cmp(&o.3))
            .then(self.4.cmp(&o.4))
    }
}
