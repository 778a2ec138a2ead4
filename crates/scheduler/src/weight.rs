//! Weights: soft preferences among the hosts that passed the filters.
//!
//! Every weight gives each candidate host a cost in `0..=100`, **lower is better** (as in oVirt,
//! where the selected host is the one with the lowest weighted sum). A policy multiplies each
//! weight by a factor and adds them up; ties go to the host with more schedulable memory, then to
//! the lower host id, so that a decision never depends on the order of the snapshot's lists.
//!
//! | weight | cost | policies (factor) |
//! |---|---|---|
//! | `CpuLoad` | the host's CPU load after placing the VM | none, evenly_distributed (1) |
//! | `Memory` | the share of schedulable memory used after placing the VM | none, evenly_distributed (1) |
//! | `PowerSaving` | low for the busiest host that stays below HighUtilization, 100 at or above it | power_saving (1) |
//! | `VmCount` | VMs on the host after placing, relative to the busiest candidate | vm_evenly_distributed (1) |
//! | `SpmGrace` | SpmVmGrace VMs' worth on the SPM, same scale as `VmCount` | vm_evenly_distributed (1) |
//! | `SoftAffinity` | share of the VM's soft affinity rules the host would break | all (10) |
//!
//! Soft affinity carries a large factor so that it outweighs load differences, as oVirt's
//! affinity weights do.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::model::{HostUuid, Polarity, PolicyKind};
use crate::view::View;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weight {
    CpuLoad,
    Memory,
    VmCount,
    PowerSaving,
    SoftAffinity,
    SpmGrace,
}

impl PolicyKind {
    /// The weights a policy uses for placement, with their factors.
    pub fn weights(self) -> &'static [(Weight, u32)] {
        match self {
            PolicyKind::None | PolicyKind::EvenlyDistributed => &[
                (Weight::CpuLoad, 1),
                (Weight::Memory, 1),
                (Weight::SoftAffinity, 10),
            ],
            PolicyKind::PowerSaving => &[(Weight::PowerSaving, 1), (Weight::SoftAffinity, 10)],
            PolicyKind::VmEvenlyDistributed => &[
                (Weight::VmCount, 1),
                (Weight::SpmGrace, 1),
                (Weight::SoftAffinity, 10),
            ],
        }
    }
}

/// A candidate host's weighted cost and its parts (unweighted costs).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct HostScore {
    pub host: HostUuid,
    pub host_name: String,
    /// Sum of factor × cost; lower is better.
    pub total: f64,
    pub parts: Vec<(Weight, f64)>,
}

/// Costs of one weight for VM `v` on each candidate host.
pub(crate) fn costs(weight: Weight, view: &View<'_>, v: usize, candidates: &[usize]) -> Vec<f64> {
    let snap = view.snap;
    let vm = &snap.vms[v];
    match weight {
        Weight::CpuLoad => candidates
            .iter()
            .map(|&h| (view.hosts[h].load_pct + view.contribution(v, h)).clamp(0.0, 100.0))
            .collect(),
        Weight::Memory => candidates
            .iter()
            .map(|&h| {
                let limit = view.memory_limit_mib(h);
                if limit == 0 {
                    return 100.0;
                }
                let used = view.hosts[h].committed_mib.saturating_add(vm.memory_mib);
                (100.0 * used as f64 / limit as f64).min(100.0)
            })
            .collect(),
        Weight::PowerSaving => {
            let high = f64::from(snap.policy.properties.high_utilization);
            candidates
                .iter()
                .map(|&h| {
                    let after = view.hosts[h].load_pct + view.contribution(v, h);
                    if after >= high {
                        100.0
                    } else {
                        99.0 * (1.0 - after / high)
                    }
                })
                .collect()
        }
        Weight::VmCount | Weight::SpmGrace => {
            let grace = i64::from(snap.policy.properties.spm_vm_grace);
            let denominator = candidates
                .iter()
                .map(|&h| view.slots(h) + 1)
                .max()
                .unwrap_or(1)
                .max(1) as f64;
            candidates
                .iter()
                .map(|&h| {
                    let n = if weight == Weight::VmCount {
                        view.hosts[h].vm_count + 1
                    } else if snap.hosts[h].spm {
                        grace
                    } else {
                        0
                    };
                    100.0 * n as f64 / denominator
                })
                .collect()
        }
        Weight::SoftAffinity => candidates
            .iter()
            .map(|&h| soft_affinity_cost(view, v, h))
            .collect(),
    }
}

/// Share (0..=100) of VM `v`'s soft affinity relations that running it on `h` would break.
fn soft_affinity_cost(view: &View<'_>, v: usize, h: usize) -> f64 {
    let snap = view.snap;
    let mut total = 0u32;
    let mut broken = 0u32;
    for &g in &view.vm_groups[v] {
        let group = &snap.affinity_groups[g];
        if let Some(rule) = group.vm_rule.filter(|r| !r.enforcing) {
            for &u in &view.group_vms[g] {
                let loc = view.locs[u];
                if u == v || loc.at.is_none() {
                    continue;
                }
                total += 1;
                let here = loc.at == Some(h) || loc.leaving == Some(h);
                let bad = match rule.polarity {
                    Polarity::Positive => loc.at != Some(h),
                    Polarity::Negative => here,
                };
                broken += u32::from(bad);
            }
        }
        if let Some(rule) = group.host_rule.filter(|r| !r.enforcing) {
            total += 1;
            let member = view.group_hosts[g].contains(&h);
            broken += u32::from(member != (rule.polarity == Polarity::Positive));
        }
    }
    if total == 0 {
        0.0
    } else {
        100.0 * f64::from(broken) / f64::from(total)
    }
}

/// Scores every candidate host under the snapshot's policy, best (lowest) first.
pub(crate) fn score(view: &View<'_>, v: usize, candidates: &[usize]) -> Vec<(usize, HostScore)> {
    let weights = view.snap.policy.kind.weights();
    let columns: Vec<Vec<f64>> = weights
        .iter()
        .map(|&(w, _)| costs(w, view, v, candidates))
        .collect();
    let mut out: Vec<(usize, HostScore)> = candidates
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            let parts: Vec<(Weight, f64)> = weights
                .iter()
                .zip(&columns)
                .map(|(&(w, _), col)| (w, col[i]))
                .collect();
            let total = weights
                .iter()
                .zip(&parts)
                .map(|(&(_, factor), &(_, cost))| f64::from(factor) * cost)
                .sum();
            let host = &view.snap.hosts[h];
            (
                h,
                HostScore {
                    host: host.id,
                    host_name: host.name.clone(),
                    total,
                    parts,
                },
            )
        })
        .collect();
    out.sort_by(|(ha, a), (hb, b)| better(view, *ha, a.total, *hb, b.total));
    out
}

/// Order of two hosts by cost, then by schedulable memory (more first), then by id.
pub(crate) fn better(view: &View<'_>, ha: usize, a: f64, hb: usize, b: f64) -> Ordering {
    a.total_cmp(&b)
        .then_with(|| view.schedulable_mib(hb).cmp(&view.schedulable_mib(ha)))
        .then_with(|| view.snap.hosts[ha].id.cmp(&view.snap.hosts[hb].id))
}
