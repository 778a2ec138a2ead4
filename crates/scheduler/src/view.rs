//! A working copy of a snapshot's dynamic quantities, so that a plan of several decisions
//! (`place_many`, evacuation, one balancing round) sees the effect of its earlier choices.
//!
//! The snapshot itself is never changed. The view owns, per host, the memory committed to it
//! (including pending reservations), the physical memory still available, the projected VM count
//! and CPU load; per VM, where it is for the affinity rules. Invariant: every change goes
//! through [`View::assign`] or [`View::unlocate`], which keep host quantities and VM locations
//! in step.
//!
//! Accounting choices, all conservative:
//! - a migrating VM's memory stays committed on its source until the migration ends (the next
//!   snapshot shows it gone), while its CPU load and VM count move at once, because those are what
//!   the balancer reasons about;
//! - a migrating VM counts as present on both hosts for negative affinity, and on its destination
//!   for positive affinity.

use std::collections::{HashMap, HashSet};

use oxvirt_types::VmId;

use crate::model::{HostStatus, HostUuid, Snapshot};

/// Where a VM is, for affinity: `at` is where it runs or will run, `leaving` a host it is still on
/// while it migrates away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Loc {
    pub at: Option<usize>,
    pub leaving: Option<usize>,
}

#[derive(Clone, Debug)]
pub(crate) struct HostState {
    /// Committed to running VMs plus pending reservations.
    pub committed_mib: u64,
    /// Free memory and swap, minus pending reservations; may go negative on an overcommitted host.
    pub phys_avail_mib: i64,
    /// VMs on the host once the migrations and starts in progress finish.
    pub vm_count: i64,
    /// CPU load once the migrations in progress finish, in percent of the host.
    pub load_pct: f64,
    /// The host received a VM in this plan (the balancer does not take VMs from it then).
    pub received: bool,
    /// The host gave a VM away in this plan (the balancer does not send VMs to it then).
    pub gave: bool,
}

#[derive(Clone)]
pub(crate) struct View<'s> {
    pub snap: &'s Snapshot,
    pub host_pos: HashMap<HostUuid, usize>,
    pub vm_pos: HashMap<VmId, usize>,
    /// Per VM, the affinity groups it belongs to.
    pub vm_groups: Vec<Vec<usize>>,
    /// Per group, its members that the snapshot holds.
    pub group_vms: Vec<Vec<usize>>,
    /// Per group, its hosts that the snapshot holds.
    pub group_hosts: Vec<HashSet<usize>>,
    /// Per VM, the positions of the hosts it is pinned to; `None` when it may run anywhere.
    pub pinned: Vec<Option<HashSet<usize>>>,
    pub hosts: Vec<HostState>,
    pub locs: Vec<Loc>,
}

impl<'s> View<'s> {
    /// Builds the view of a snapshot that has passed [`Snapshot::validate`].
    pub fn new(snap: &'s Snapshot) -> Self {
        let host_pos: HashMap<HostUuid, usize> =
            snap.hosts.iter().enumerate().map(|(i, h)| (h.id, i)).collect();
        let vm_pos: HashMap<VmId, usize> = snap.vms.iter().enumerate().map(|(i, v)| (v.id, i)).collect();

        let mut vm_groups = vec![Vec::new(); snap.vms.len()];
        let mut group_vms = Vec::with_capacity(snap.affinity_groups.len());
        let mut group_hosts = Vec::with_capacity(snap.affinity_groups.len());
        for (g, group) in snap.affinity_groups.iter().enumerate() {
            let mut members: Vec<usize> = group.vms.iter().filter_map(|v| vm_pos.get(v).copied()).collect();
            members.sort_unstable();
            members.dedup();
            for &m in &members {
                vm_groups[m].push(g);
            }
            group_vms.push(members);
            group_hosts.push(
                group
                    .hosts
                    .iter()
                    .filter_map(|h| host_pos.get(h).copied())
                    .collect(),
            );
        }

        let pinned = snap
            .vms
            .iter()
            .map(|vm| {
                (!vm.pinned_hosts.is_empty()).then(|| {
                    vm.pinned_hosts
                        .iter()
                        .filter_map(|h| host_pos.get(h).copied())
                        .collect()
                })
            })
            .collect();

        let mut hosts: Vec<HostState> = snap
            .hosts
            .iter()
            .map(|h| HostState {
                committed_mib: h.mem_committed_mib.saturating_add(h.pending.mem_mib),
                phys_avail_mib: to_i64(h.mem_free_mib.saturating_add(h.swap_free_mib))
                    - to_i64(h.pending.mem_mib),
                vm_count: i64::from(h.vm_count) + i64::from(h.pending.vm_count),
                load_pct: h.cpu_load_pct,
                received: false,
                gave: false,
            })
            .collect();

        let mut locs = Vec::with_capacity(snap.vms.len());
        for (v, vm) in snap.vms.iter().enumerate() {
            let cur = vm.current_host.and_then(|h| host_pos.get(&h).copied());
            let dst = vm.migrating_to.and_then(|h| host_pos.get(&h).copied());
            match (cur, dst) {
                (Some(src), Some(dst)) => {
                    // The destination's count already includes the VM through `pending`.
                    hosts[src].vm_count -= 1;
                    let c_src = contribution(snap, v, src);
                    let c_dst = contribution(snap, v, dst);
                    hosts[src].load_pct = (hosts[src].load_pct - c_src).max(0.0);
                    hosts[dst].load_pct += c_dst;
                    locs.push(Loc {
                        at: Some(dst),
                        leaving: Some(src),
                    });
                }
                _ => locs.push(Loc {
                    at: cur,
                    leaving: None,
                }),
            }
        }
        for h in &mut hosts {
            h.vm_count = h.vm_count.max(0);
        }

        Self {
            snap,
            host_pos,
            vm_pos,
            vm_groups,
            group_vms,
            group_hosts,
            pinned,
            hosts,
            locs,
        }
    }

    pub fn is_up(&self, h: usize) -> bool {
        self.snap.hosts[h].status == HostStatus::Up
    }

    /// CPUs the policy counts on a host.
    pub fn host_cpus(&self, h: usize) -> u32 {
        host_cpus(self.snap, h)
    }

    /// Memory the host may still promise: its overcommitted size, capped by the administrator's
    /// limit, minus what is committed and pending.
    pub fn schedulable_mib(&self, h: usize) -> u64 {
        self.memory_limit_mib(h)
            .saturating_sub(self.hosts[h].committed_mib)
    }

    pub fn memory_limit_mib(&self, h: usize) -> u64 {
        memory_limit_mib(self.snap, h)
    }

    /// The share of host `h` (percent) that VM `v`'s CPU usage takes.
    pub fn contribution(&self, v: usize, h: usize) -> f64 {
        contribution(self.snap, v, h)
    }

    /// The VM count the SPM grace applies to (`vm_evenly_distributed`'s "occupied slots").
    pub fn slots(&self, h: usize) -> i64 {
        let grace = if self.snap.hosts[h].spm {
            i64::from(self.snap.policy.properties.spm_vm_grace)
        } else {
            0
        };
        self.hosts[h].vm_count + grace
    }

    /// Forgets where a VM is (it is about to be placed afresh: restarted after its host died, or
    /// evacuated), without changing any host's quantities.
    pub fn unlocate(&mut self, v: usize) {
        self.locs[v] = Loc::default();
    }

    /// Records a decision to run VM `v` on host `to`: the destination takes its memory, CPU and
    /// count; a source (the VM's current location) gives up its CPU and count and becomes a host
    /// the VM is leaving.
    pub fn assign(&mut self, v: usize, to: usize) {
        let vm = &self.snap.vms[v];
        let from = self.locs[v].at;
        if let Some(src) = from {
            let c = self.contribution(v, src);
            let s = &mut self.hosts[src];
            s.vm_count = (s.vm_count - 1).max(0);
            s.load_pct = (s.load_pct - c).max(0.0);
            s.gave = true;
        }
        let c = self.contribution(v, to);
        let d = &mut self.hosts[to];
        d.committed_mib = d.committed_mib.saturating_add(vm.memory_mib);
        d.phys_avail_mib -= to_i64(vm.memory_mib);
        d.vm_count += 1;
        d.load_pct += c;
        d.received = true;
        self.locs[v] = Loc {
            at: Some(to),
            leaving: from.filter(|&f| f != to),
        };
    }
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn host_cpus(snap: &Snapshot, h: usize) -> u32 {
    let host = &snap.hosts[h];
    if snap.policy.count_threads_as_cores {
        host.cpu_threads.max(host.cpu_cores)
    } else {
        host.cpu_cores
    }
}

pub(crate) fn memory_limit_mib(snap: &Snapshot, h: usize) -> u64 {
    let host = &snap.hosts[h];
    let over = u128::from(host.mem_total_mib) * u128::from(snap.policy.memory_overcommit_pct) / 100;
    let over = u64::try_from(over).unwrap_or(u64::MAX);
    host.max_scheduling_memory_mib.map_or(over, |cap| cap.min(over))
}

/// A VM's CPU usage as a share of a host: its busy vCPUs over the host's CPUs, at most the whole
/// host.
pub(crate) fn contribution(snap: &Snapshot, v: usize, h: usize) -> f64 {
    let vm = &snap.vms[v];
    let cpus = host_cpus(snap, h).max(1);
    (vm.cpu_usage_pct * f64::from(vm.vcpus) / f64::from(cpus)).min(100.0)
}
