//! Placement: choosing a host for one VM, for several in order, and for every VM of a host that
//! goes into maintenance.
//!
//! A placement runs every [`filter`] on every host, scores the hosts that passed with the
//! policy's [`weight`]s, and takes the lowest cost. Plans of several placements
//! ([`place_many`], [`plan_evacuation`]) apply each choice to a working view before making the
//! next, so a later VM sees the memory, CPU, VM count and affinity of the earlier ones: a plan
//! never promises the same memory twice.

use std::collections::HashSet;
use std::fmt;

use oxvirt_types::VmId;
use serde::{Deserialize, Serialize};

use crate::filter::{self, HostVerdict};
use crate::model::{HostUuid, Snapshot, SnapshotError};
use crate::view::View;
use crate::weight::{self, HostScore};

/// Why the engine asks for a host; it decides which preconditions and filters apply.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Run a VM that is down.
    Start,
    /// Move a running, migratable VM to another host.
    Migrate,
    /// Restart a highly available VM whose host died or which crashed. The VM's recorded host is
    /// ignored for affinity (a live host may take it back if it passes the filters); its memory
    /// should no longer be in that host's `mem_committed_mib`.
    HaRestart,
    /// Move a VM off a host that goes into maintenance; like `Migrate`.
    Maintenance,
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Start => "start",
            Self::Migrate => "migrate",
            Self::HaRestart => "HA restart",
            Self::Maintenance => "maintenance",
        })
    }
}

/// A chosen host, with the evidence: every candidate's score and every other host's rejections.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Placement {
    pub vm: VmId,
    /// The host the VM runs on now, for migrations and evacuations.
    pub from: Option<HostUuid>,
    pub host: HostUuid,
    pub host_name: String,
    /// Candidates, best first; the first is `host`.
    pub scores: Vec<HostScore>,
    /// Hosts the filters removed, with why.
    pub rejected: Vec<HostVerdict>,
}

/// The result of placing one VM of a batch.
pub type Outcome = Result<Placement, PlacementError>;

/// Why no host was chosen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("VM {0} is not in the cluster snapshot")]
    UnknownVm(VmId),
    #[error("host {0} is not in the cluster snapshot")]
    UnknownHost(HostUuid),
    #[error("VM {0} is listed twice in one placement request")]
    DuplicateVm(VmId),
    #[error("VM '{name}' ({vm}) already runs on host {host}")]
    AlreadyRunning { vm: VmId, name: String, host: HostUuid },
    #[error("VM '{name}' ({vm}) is not running, so it cannot migrate")]
    NotRunning { vm: VmId, name: String },
    #[error("VM '{name}' ({vm}) is already migrating to host {host}")]
    AlreadyMigrating { vm: VmId, name: String, host: HostUuid },
    #[error("VM '{name}' ({vm}) is not migratable")]
    NotMigratable { vm: VmId, name: String },
    #[error("no host can run VM '{name}' ({vm}): {}", list_verdicts(.hosts))]
    NoHost {
        vm: VmId,
        name: String,
        /// Every host of the cluster with its rejections.
        hosts: Vec<HostVerdict>,
    },
}

fn list_verdicts(hosts: &[HostVerdict]) -> String {
    if hosts.is_empty() {
        return "the cluster has no hosts".to_owned();
    }
    hosts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Chooses a host for `vm`.
pub fn place(snapshot: &Snapshot, vm: VmId, purpose: Purpose) -> Result<Placement, PlacementError> {
    snapshot.validate()?;
    let mut view = View::new(snapshot);
    let v = vm_index(&view, vm)?;
    if purpose == Purpose::HaRestart {
        view.unlocate(v);
    }
    place_in(&view, v, purpose).map(|(_, p)| p)
}

/// Every host's filter verdict for `vm`: the answer to "why can't this VM run there".
pub fn filter_hosts(
    snapshot: &Snapshot,
    vm: VmId,
    purpose: Purpose,
) -> Result<Vec<HostVerdict>, PlacementError> {
    snapshot.validate()?;
    let mut view = View::new(snapshot);
    let v = vm_index(&view, vm)?;
    if purpose == Purpose::HaRestart {
        view.unlocate(v);
    }
    Ok((0..snapshot.hosts.len())
        .map(|h| filter::verdict(&view, v, h, purpose))
        .collect())
}

/// Places several VMs in turn, each seeing the earlier ones' resources and affinity. For
/// `HaRestart` the VMs go in order of HA priority (highest first, then larger memory first so
/// that big VMs are not starved by small ones); for other purposes in the order given. The outer
/// error is for a request that cannot be planned at all; per-VM failures are in the list, in the
/// order the VMs were placed.
pub fn place_many(
    snapshot: &Snapshot,
    vms: &[VmId],
    purpose: Purpose,
) -> Result<Vec<(VmId, Outcome)>, PlacementError> {
    snapshot.validate()?;
    let mut view = View::new(snapshot);
    let mut order = Vec::with_capacity(vms.len());
    let mut seen = HashSet::with_capacity(vms.len());
    for &id in vms {
        if !seen.insert(id) {
            return Err(PlacementError::DuplicateVm(id));
        }
        order.push(vm_index(&view, id)?);
    }
    if purpose == Purpose::HaRestart {
        sort_for_restart(snapshot, &mut order);
        // None of them runs: each must be free to land where its affinity peers from the same
        // batch land.
        for &v in &order {
            view.unlocate(v);
        }
    }
    Ok(run_plan(&mut view, &order, purpose))
}

/// Where each VM of a host going into maintenance should go.
#[derive(Clone, PartialEq, Debug)]
pub struct EvacuationPlan {
    pub host: HostUuid,
    /// Migrations to start, in the order they were planned.
    pub moves: Vec<Placement>,
    /// VMs that cannot leave, with why (not migratable, or no host fits); the host cannot enter
    /// maintenance until the engine stops them or something changes.
    pub unplaced: Vec<(VmId, PlacementError)>,
    /// VMs migrating to this host right now; the engine should cancel those migrations.
    pub incoming: Vec<VmId>,
}

/// Plans a destination for every VM running on `host` (VMs already migrating away are on their
/// way and not replanned). HA VMs go first by priority, then larger VMs first, which packs better
/// when memory is tight.
pub fn plan_evacuation(snapshot: &Snapshot, host: HostUuid) -> Result<EvacuationPlan, PlacementError> {
    snapshot.validate()?;
    let mut view = View::new(snapshot);
    if !view.host_pos.contains_key(&host) {
        return Err(PlacementError::UnknownHost(host));
    }
    let mut order: Vec<usize> = snapshot
        .vms
        .iter()
        .enumerate()
        .filter(|(_, vm)| vm.current_host == Some(host) && vm.migrating_to.is_none())
        .map(|(v, _)| v)
        .collect();
    let incoming = snapshot
        .vms
        .iter()
        .filter(|vm| vm.migrating_to == Some(host))
        .map(|vm| vm.id)
        .collect();
    sort_for_restart(snapshot, &mut order);
    // The VMs all leave; until each is planned it constrains nobody's affinity.
    for &v in &order {
        view.unlocate(v);
    }
    let mut plan = EvacuationPlan {
        host,
        moves: Vec::new(),
        unplaced: Vec::new(),
        incoming,
    };
    for (id, result) in run_plan(&mut view, &order, Purpose::Maintenance) {
        match result {
            Ok(p) => plan.moves.push(p),
            Err(e) => plan.unplaced.push((id, e)),
        }
    }
    Ok(plan)
}

fn sort_for_restart(snapshot: &Snapshot, order: &mut [usize]) {
    order.sort_by(|&a, &b| {
        let (a, b) = (&snapshot.vms[a], &snapshot.vms[b]);
        b.highly_available
            .cmp(&a.highly_available)
            .then(b.ha_priority.cmp(&a.ha_priority))
            .then(b.memory_mib.cmp(&a.memory_mib))
            .then(a.id.cmp(&b.id))
    });
}

fn run_plan(view: &mut View<'_>, order: &[usize], purpose: Purpose) -> Vec<(VmId, Outcome)> {
    let mut out = Vec::with_capacity(order.len());
    for &v in order {
        let result = place_in(view, v, purpose).map(|(h, p)| {
            view.assign(v, h);
            p
        });
        out.push((view.snap.vms[v].id, result));
    }
    out
}

fn vm_index(view: &View<'_>, vm: VmId) -> Result<usize, PlacementError> {
    view.vm_pos.get(&vm).copied().ok_or(PlacementError::UnknownVm(vm))
}

/// The checks of a request itself, before any host is looked at.
pub(crate) fn check_purpose(view: &View<'_>, v: usize, purpose: Purpose) -> Result<(), PlacementError> {
    let vm = &view.snap.vms[v];
    match purpose {
        Purpose::Start => {
            if let Some(host) = vm.current_host {
                return Err(PlacementError::AlreadyRunning {
                    vm: vm.id,
                    name: vm.name.clone(),
                    host,
                });
            }
        }
        Purpose::Migrate | Purpose::Maintenance => {
            if vm.current_host.is_none() {
                return Err(PlacementError::NotRunning {
                    vm: vm.id,
                    name: vm.name.clone(),
                });
            }
            if let Some(host) = vm.migrating_to {
                return Err(PlacementError::AlreadyMigrating {
                    vm: vm.id,
                    name: vm.name.clone(),
                    host,
                });
            }
            if !vm.migratable {
                return Err(PlacementError::NotMigratable {
                    vm: vm.id,
                    name: vm.name.clone(),
                });
            }
        }
        Purpose::HaRestart => {}
    }
    Ok(())
}

/// Places VM `v` in `view` without changing it; returns the host's position and the placement.
fn place_in(view: &View<'_>, v: usize, purpose: Purpose) -> Result<(usize, Placement), PlacementError> {
    check_purpose(view, v, purpose)?;
    let vm = &view.snap.vms[v];
    let mut candidates = Vec::new();
    let mut rejected = Vec::new();
    for h in 0..view.snap.hosts.len() {
        let verdict = filter::verdict(view, v, h, purpose);
        if verdict.passed() {
            candidates.push(h);
        } else {
            rejected.push(verdict);
        }
    }
    if candidates.is_empty() {
        return Err(PlacementError::NoHost {
            vm: vm.id,
            name: vm.name.clone(),
            hosts: rejected,
        });
    }
    let scored = weight::score(view, v, &candidates);
    let best = scored[0].0;
    let host = &view.snap.hosts[best];
    Ok((
        best,
        Placement {
            vm: vm.id,
            from: match purpose {
                Purpose::Migrate | Purpose::Maintenance => vm.current_host,
                Purpose::Start | Purpose::HaRestart => None,
            },
            host: host.id,
            host_name: host.name.clone(),
            scores: scored.into_iter().map(|(_, s)| s).collect(),
            rejected,
        },
    ))
}
