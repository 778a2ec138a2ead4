//! Filters: hard constraints that remove hosts from consideration.
//!
//! Each filter looks at one (VM, host) pair in a working view of the snapshot and either passes
//! it or gives a [`Rejection`] that says why in words an administrator can act on. All filters
//! run for every host (no short-circuit), so "why can't this VM start" lists every reason for
//! every host.
//! Invariant: no decision of this crate puts a VM on a host that any filter rejects.

use std::fmt;

use oxvirt_types::SdUuid;
use serde::{Deserialize, Serialize};

use crate::model::{HostStatus, HostUuid, Polarity};
use crate::place::Purpose;
use crate::view::View;

/// The filters, in the order they run.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// Only `up` hosts run VMs.
    HostStatus,
    /// A migration or evacuation leaves the VM's current host.
    Migration,
    /// Enough memory under the overcommit limit, and enough physical memory (free plus swap) to
    /// start the VM now: memory is reclaimed from overcommitted VMs only once they run.
    Memory,
    /// No more vCPUs than the host has cores (threads, when the policy counts threads as cores).
    Cpu,
    /// The host reaches every storage domain the VM's disks are on.
    Storage,
    /// The host has every network the VM's NICs use.
    Network,
    /// A VM pinned to hosts runs only on them.
    Pinning,
    /// Enforcing VM↔VM affinity groups: with all running members (positive), with none (negative).
    VmAffinity,
    /// Enforcing VM↔host affinity groups: on the group's hosts (positive), or off them (negative).
    HostAffinity,
}

impl Filter {
    pub const ALL: [Filter; 9] = [
        Filter::HostStatus,
        Filter::Migration,
        Filter::Memory,
        Filter::Cpu,
        Filter::Storage,
        Filter::Network,
        Filter::Pinning,
        Filter::VmAffinity,
        Filter::HostAffinity,
    ];

    pub(crate) fn check(
        self,
        view: &View<'_>,
        v: usize,
        h: usize,
        purpose: Purpose,
    ) -> Result<(), Rejection> {
        let snap = view.snap;
        let vm = &snap.vms[v];
        let host = &snap.hosts[h];
        match self {
            Filter::HostStatus => {
                if host.status != HostStatus::Up {
                    return Err(Rejection::HostStatus { status: host.status });
                }
            }
            Filter::Migration => {
                if matches!(purpose, Purpose::Migrate | Purpose::Maintenance)
                    && vm.current_host == Some(host.id)
                {
                    return Err(Rejection::CurrentHost);
                }
            }
            Filter::Memory => {
                let schedulable = view.schedulable_mib(h);
                if vm.memory_mib > schedulable {
                    return Err(Rejection::Memory {
                        needs_mib: vm.memory_mib,
                        schedulable_mib: schedulable,
                    });
                }
                let available = view.hosts[h].phys_avail_mib;
                if i128::from(vm.memory_mib) > i128::from(available) {
                    return Err(Rejection::PhysicalMemory {
                        needs_mib: vm.memory_mib,
                        available_mib: available,
                    });
                }
            }
            Filter::Cpu => {
                let cpus = view.host_cpus(h);
                if vm.vcpus > cpus {
                    return Err(Rejection::Cpu {
                        vcpus: vm.vcpus,
                        host_cpus: cpus,
                        threads: snap.policy.count_threads_as_cores,
                    });
                }
            }
            Filter::Storage => {
                let missing: Vec<SdUuid> = vm
                    .storage_domains
                    .difference(&host.storage_domains)
                    .copied()
                    .collect();
                if !missing.is_empty() {
                    return Err(Rejection::Storage { missing });
                }
            }
            Filter::Network => {
                let missing: Vec<String> = vm.networks.difference(&host.networks).cloned().collect();
                if !missing.is_empty() {
                    return Err(Rejection::Network { missing });
                }
            }
            Filter::Pinning => {
                if let Some(allowed) = &view.pinned[v] {
                    if !allowed.contains(&h) {
                        return Err(Rejection::Pinning);
                    }
                }
            }
            Filter::VmAffinity => {
                for &g in &view.vm_groups[v] {
                    let group = &snap.affinity_groups[g];
                    let Some(rule) = group.vm_rule.filter(|r| r.enforcing) else {
                        continue;
                    };
                    for &u in &view.group_vms[g] {
                        if u == v {
                            continue;
                        }
                        let loc = view.locs[u];
                        let offending = match rule.polarity {
                            Polarity::Positive => loc.at.filter(|&x| x != h),
                            Polarity::Negative => (loc.at == Some(h) || loc.leaving == Some(h)).then_some(h),
                        };
                        if let Some(x) = offending {
                            return Err(Rejection::VmAffinity {
                                group: group.name.clone(),
                                polarity: rule.polarity,
                                other_vm: snap.vms[u].name.clone(),
                                other_host: snap.hosts[x].name.clone(),
                            });
                        }
                    }
                }
            }
            Filter::HostAffinity => {
                for &g in &view.vm_groups[v] {
                    let group = &snap.affinity_groups[g];
                    let Some(rule) = group.host_rule.filter(|r| r.enforcing) else {
                        continue;
                    };
                    let member = view.group_hosts[g].contains(&h);
                    if member != (rule.polarity == Polarity::Positive) {
                        return Err(Rejection::HostAffinity {
                            group: group.name.clone(),
                            polarity: rule.polarity,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why a filter removed a host.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Rejection {
    HostStatus {
        status: HostStatus,
    },
    CurrentHost,
    Memory {
        needs_mib: u64,
        schedulable_mib: u64,
    },
    PhysicalMemory {
        needs_mib: u64,
        available_mib: i64,
    },
    Cpu {
        vcpus: u32,
        host_cpus: u32,
        threads: bool,
    },
    Storage {
        missing: Vec<SdUuid>,
    },
    Network {
        missing: Vec<String>,
    },
    Pinning,
    VmAffinity {
        group: String,
        polarity: Polarity,
        other_vm: String,
        /// Where the other VM runs.
        other_host: String,
    },
    HostAffinity {
        group: String,
        polarity: Polarity,
    },
}

impl Rejection {
    /// The filter that gave this rejection.
    pub fn filter(&self) -> Filter {
        match self {
            Self::HostStatus { .. } => Filter::HostStatus,
            Self::CurrentHost => Filter::Migration,
            Self::Memory { .. } | Self::PhysicalMemory { .. } => Filter::Memory,
            Self::Cpu { .. } => Filter::Cpu,
            Self::Storage { .. } => Filter::Storage,
            Self::Network { .. } => Filter::Network,
            Self::Pinning => Filter::Pinning,
            Self::VmAffinity { .. } => Filter::VmAffinity,
            Self::HostAffinity { .. } => Filter::HostAffinity,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HostStatus { status } => write!(f, "status is {status}, only up hosts run VMs"),
            Self::CurrentHost => f.write_str("the VM already runs there"),
            Self::Memory {
                needs_mib,
                schedulable_mib,
            } => write!(
                f,
                "not enough memory (needs {needs_mib} MiB, schedulable {schedulable_mib} MiB)"
            ),
            Self::PhysicalMemory {
                needs_mib,
                available_mib,
            } => write!(
                f,
                "not enough free memory (needs {needs_mib} MiB, free {available_mib} MiB including swap)"
            ),
            Self::Cpu {
                vcpus,
                host_cpus,
                threads,
            } => write!(
                f,
                "too few CPUs (VM has {vcpus} vCPUs, host has {host_cpus} {})",
                if *threads { "threads" } else { "cores" }
            ),
            Self::Storage { missing } => {
                f.write_str("not connected to storage domain")?;
                if missing.len() > 1 {
                    f.write_str("s")?;
                }
                for (i, sd) in missing.iter().enumerate() {
                    write!(f, "{}{sd}", if i == 0 { " " } else { ", " })?;
                }
                Ok(())
            }
            Self::Network { missing } => {
                f.write_str("missing network")?;
                if missing.len() > 1 {
                    f.write_str("s")?;
                }
                for (i, n) in missing.iter().enumerate() {
                    write!(f, "{}'{n}'", if i == 0 { " " } else { ", " })?;
                }
                Ok(())
            }
            Self::Pinning => f.write_str("the VM is pinned to other hosts"),
            Self::VmAffinity {
                group,
                polarity: Polarity::Positive,
                other_vm,
                other_host,
            } => write!(
                f,
                "hard positive affinity group '{group}' keeps VM '{other_vm}' on host {other_host}"
            ),
            Self::VmAffinity {
                group,
                polarity: Polarity::Negative,
                other_vm,
                ..
            } => write!(
                f,
                "hard negative affinity group '{group}' has VM '{other_vm}' on this host"
            ),
            Self::HostAffinity {
                group,
                polarity: Polarity::Positive,
            } => write!(f, "not a host of hard positive host affinity group '{group}'"),
            Self::HostAffinity {
                group,
                polarity: Polarity::Negative,
            } => write!(f, "excluded by hard negative host affinity group '{group}'"),
        }
    }
}

/// The outcome of all filters for one host: it passes when `rejections` is empty.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct HostVerdict {
    pub host: HostUuid,
    pub host_name: String,
    pub rejections: Vec<Rejection>,
}

impl HostVerdict {
    pub fn passed(&self) -> bool {
        self.rejections.is_empty()
    }
}

impl fmt::Display for HostVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host {}: ", self.host_name)?;
        if self.rejections.is_empty() {
            return f.write_str("passes all filters");
        }
        for (i, r) in self.rejections.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// Runs every filter for one (VM, host) pair.
pub(crate) fn rejections(view: &View<'_>, v: usize, h: usize, purpose: Purpose) -> Vec<Rejection> {
    Filter::ALL
        .iter()
        .filter_map(|f| f.check(view, v, h, purpose).err())
        .collect()
}

/// Whether every filter passes, stopping at the first failure (for the balancer's inner loop).
pub(crate) fn passes(view: &View<'_>, v: usize, h: usize, purpose: Purpose) -> bool {
    Filter::ALL.iter().all(|f| f.check(view, v, h, purpose).is_ok())
}

pub(crate) fn verdict(view: &View<'_>, v: usize, h: usize, purpose: Purpose) -> HostVerdict {
    let host = &view.snap.hosts[h];
    HostVerdict {
        host: host.id,
        host_name: host.name.clone(),
        rejections: rejections(view, v, h, purpose),
    }
}
