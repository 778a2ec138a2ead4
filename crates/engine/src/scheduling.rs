//! The scheduler's input, built from the database and monitoring: a snapshot of one cluster.

use std::collections::BTreeSet;

use oxvirt_scheduler as sched;

use crate::app::App;
use crate::commands::CommandError;
use crate::db::{HostFilter, ListQuery, Ref, VmFilter};
use crate::model::{ClusterId, HostStatus, HostUuid, SchedulingPolicy, VmId, VmStatus};

pub fn sched_host_id(h: HostUuid) -> sched::HostUuid {
    sched::HostUuid::from_uuid(*h.as_uuid())
}

pub fn engine_host_id(h: sched::HostUuid) -> HostUuid {
    HostUuid::from_uuid(*h.as_uuid())
}

fn status(s: HostStatus) -> sched::HostStatus {
    match s {
        HostStatus::Up => sched::HostStatus::Up,
        HostStatus::Maintenance => sched::HostStatus::Maintenance,
        HostStatus::PreparingForMaintenance => sched::HostStatus::PreparingForMaintenance,
        HostStatus::NonResponsive => sched::HostStatus::NonResponsive,
        HostStatus::NonOperational => sched::HostStatus::NonOperational,
        HostStatus::Installing | HostStatus::Initializing | HostStatus::Connecting => {
            sched::HostStatus::Installing
        }
        _ => sched::HostStatus::Down,
    }
}

const MIB: u64 = 1 << 20;

/// A snapshot of `cluster`: its hosts with live figures, its VMs with their disks' domains.
pub async fn snapshot(app: &App, cluster: ClusterId) -> Result<sched::Snapshot, CommandError> {
    let db = &app.db;
    let cl = db
        .cluster_get(cluster)
        .await?
        .ok_or_else(|| CommandError::not_found("cluster", cluster))?;
    let dc = app.dc(cl.data_center_id).await?;
    let hosts = db
        .host_list(&ListQuery {
            filter: HostFilter {
                cluster: Some(Ref::Id(cluster)),
                ..Default::default()
            },
            ..Default::default()
        })
        .await?;
    let vms = db
        .vm_list(&ListQuery {
            filter: VmFilter {
                cluster: Some(Ref::Id(cluster)),
                ..Default::default()
            },
            ..Default::default()
        })
        .await?;
    let (host_networks, vm_networks) = crate::commands::scheduling_networks(app, cluster).await?;
    let mut s_vms = Vec::new();
    for v in &vms {
        let mut domains = BTreeSet::new();
        let mut locked = false;
        for a in db.attachments_of_vm(v.id).await? {
            if let Some(d) = db.disk_get(a.disk_id).await? {
                domains.insert(d.storage_domain_id);
                locked |= d.status == crate::model::DiskStatus::Locked;
            }
        }
        let running = v.runtime.status.is_running();
        s_vms.push(sched::Vm {
            id: v.id,
            name: v.name.clone(),
            memory_mib: v.memory_bytes / MIB,
            vcpus: v.cpu.vcpus() as u32,
            cpu_usage_pct: 0.0,
            current_host: if running {
                v.runtime.run_on_host.map(sched_host_id)
            } else {
                None
            },
            migrating_to: v.runtime.migrating_to_host.map(sched_host_id),
            pinned_hosts: v.placement.hosts.iter().copied().map(sched_host_id).collect(),
            storage_domains: domains,
            networks: vm_networks.get(&v.id).cloned().unwrap_or_default(),
            highly_available: v.ha.enabled,
            ha_priority: v.ha.priority.max(0) as u32,
            // A VM with a disk a job holds (a live move mirrors it on this host) stays put
            // until the job ends: migrate_vm would refuse it.
            migratable: v.placement.affinity == crate::model::PlacementAffinity::Migratable && !locked,
            last_migrated_at: None,
        });
    }
    let s_hosts = hosts
        .iter()
        .map(|h| {
            let rt = app.host_rt(h.id);
            let mine: Vec<_> = vms
                .iter()
                .filter(|v| v.runtime.status.is_running() && v.runtime.run_on_host == Some(h.id))
                .collect();
            let total = if rt.mem_total_mib > 0 {
                rt.mem_total_mib
            } else {
                h.memory_bytes.unwrap_or(0) / MIB
            };
            let free = if rt.mem_total_mib > 0 {
                rt.mem_free_mib
            } else {
                h.free_memory_bytes.unwrap_or(0) / MIB
            };
            let cores = h.cpu_cores.unwrap_or(1).max(1);
            sched::Host {
                id: sched_host_id(h.id),
                name: h.name.clone(),
                status: status(h.status),
                cpu_cores: cores,
                cpu_threads: cores,
                cpu_load_pct: rt.cpu_load_pct,
                mem_total_mib: total,
                mem_free_mib: free,
                swap_free_mib: rt.swap_free_mib,
                mem_committed_mib: mine.iter().map(|v| v.memory_bytes / MIB).sum(),
                max_scheduling_memory_mib: None,
                storage_domains: rt.domains.clone(),
                networks: host_networks.get(&h.id).cloned().unwrap_or_default(),
                spm: dc.spm_host == Some(h.id),
                vm_count: mine.len() as u32,
                pending: sched::Pending::default(),
            }
        })
        .collect();
    let kind = match cl.scheduling_policy {
        SchedulingPolicy::None => sched::PolicyKind::None,
        SchedulingPolicy::EvenlyDistributed => sched::PolicyKind::EvenlyDistributed,
        SchedulingPolicy::PowerSaving => sched::PolicyKind::PowerSaving,
        SchedulingPolicy::VmEvenlyDistributed => sched::PolicyKind::VmEvenlyDistributed,
    };
    let mut policy = sched::ClusterPolicy::new(kind);
    policy.memory_overcommit_pct = cl.memory_overcommit_percent;
    // Checked when set; a row that somehow holds a bad one keeps the defaults.
    match sched::PolicyProperties::from_ovirt(policy.properties, &cl.scheduling_properties) {
        Ok(p) => policy.properties = p,
        Err(e) => tracing::warn!(cluster = %cl.name, error = %e, "scheduling properties ignored"),
    }
    let groups = db
        .affinity_groups_of_cluster(cluster)
        .await?
        .into_iter()
        .map(|g| sched::AffinityGroup {
            name: g.name,
            vms: g.vm_ids,
            hosts: Vec::new(),
            // A disabled rule keeps the group but places nothing.
            vm_rule: g.enabled.then_some(sched::AffinityRule {
                polarity: if g.positive {
                    sched::Polarity::Positive
                } else {
                    sched::Polarity::Negative
                },
                enforcing: g.enforcing,
            }),
            host_rule: None,
        })
        .collect();
    Ok(sched::Snapshot {
        hosts: s_hosts,
        vms: s_vms,
        affinity_groups: groups,
        policy,
    })
}

/// Chooses a host for `vm` (start, migration, HA restart), explaining a refusal host by host.
pub async fn choose_host(
    app: &App,
    cluster: ClusterId,
    vm: VmId,
    purpose: sched::Purpose,
) -> Result<HostUuid, CommandError> {
    let snap = snapshot(app, cluster).await?;
    match sched::place(&snap, vm, purpose) {
        Ok(p) => Ok(engine_host_id(p.host)),
        Err(e) => Err(CommandError::Conflict(format!("cannot place the VM: {e}"))),
    }
}

/// Whether a VM status counts as running somewhere.
pub fn occupies_host(s: VmStatus) -> bool {
    s.is_running()
}
