//! Test support: snapshot builders, a seeded random cluster generator, an oracle for the hard
//! constraints written independently of the crate's filters, and a simple cluster model that
//! recomputes host statistics from where the VMs run.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use oxvirt_scheduler::*;
use oxvirt_types::{SdUuid, VmId};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

pub fn hid(n: u128) -> HostUuid {
    HostUuid::from_uuid(Uuid::from_u128(0x1000_0000 + n))
}

pub fn vid(n: u128) -> VmId {
    VmId::from_uuid(Uuid::from_u128(0x2000_0000 + n))
}

pub fn sd(n: u128) -> SdUuid {
    SdUuid::from_uuid(Uuid::from_u128(0x3000_0000 + n))
}

/// An up host with 8 cores (16 threads), 32 GiB, connected to `sd(1)` with network `ovirtmgmt`.
pub fn host(n: u128) -> Host {
    Host {
        id: hid(n),
        name: format!("h{n}"),
        status: HostStatus::Up,
        cpu_cores: 8,
        cpu_threads: 16,
        cpu_load_pct: 0.0,
        mem_total_mib: 32 * 1024,
        mem_free_mib: 30 * 1024,
        swap_free_mib: 0,
        mem_committed_mib: 0,
        max_scheduling_memory_mib: None,
        storage_domains: [sd(1)].into(),
        networks: ["ovirtmgmt".to_owned()].into(),
        spm: false,
        vm_count: 0,
        pending: Pending::default(),
    }
}

/// A down 1 GiB, 2-vCPU VM on `sd(1)` and `ovirtmgmt`, using 50% of its vCPUs when it runs.
pub fn vm(n: u128) -> Vm {
    Vm {
        id: vid(n),
        name: format!("vm{n}"),
        memory_mib: 1024,
        vcpus: 2,
        cpu_usage_pct: 50.0,
        current_host: None,
        migrating_to: None,
        pinned_hosts: BTreeSet::new(),
        storage_domains: [sd(1)].into(),
        networks: ["ovirtmgmt".to_owned()].into(),
        highly_available: false,
        ha_priority: 0,
        migratable: true,
        last_migrated_at: None,
    }
}

pub fn snapshot(hosts: Vec<Host>, vms: Vec<Vm>, kind: PolicyKind) -> Snapshot {
    Snapshot {
        hosts,
        vms,
        affinity_groups: Vec::new(),
        policy: ClusterPolicy::new(kind),
    }
}

pub fn group(
    name: &str,
    vms: &[u128],
    hosts: &[u128],
    vm_rule: Option<(Polarity, bool)>,
    host_rule: Option<(Polarity, bool)>,
) -> AffinityGroup {
    let rule =
        |r: Option<(Polarity, bool)>| r.map(|(polarity, enforcing)| AffinityRule { polarity, enforcing });
    AffinityGroup {
        name: name.to_owned(),
        vms: vms.iter().map(|&n| vid(n)).collect(),
        hosts: hosts.iter().map(|&n| hid(n)).collect(),
        vm_rule: rule(vm_rule),
        host_rule: rule(host_rule),
    }
}

/// The cluster model the tests use: a host's load is a base load plus its VMs' CPU shares
/// (capped at 100), its committed memory the sum of its VMs' memory, its free memory what is
/// left when VMs touch half their memory.
#[derive(Clone, Copy, Debug)]
pub struct Model {
    pub base_load_pct: f64,
    pub reserved_mib: u64,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            base_load_pct: 2.0,
            reserved_mib: 1024,
        }
    }
}

pub fn host_cpus(snap: &Snapshot, h: &Host) -> u32 {
    if snap.policy.count_threads_as_cores {
        h.cpu_threads.max(h.cpu_cores)
    } else {
        h.cpu_cores
    }
}

/// A VM's CPU share of a host in the model (same definition as the crate documents).
pub fn share(snap: &Snapshot, vm: &Vm, h: &Host) -> f64 {
    (vm.cpu_usage_pct * f64::from(vm.vcpus) / f64::from(host_cpus(snap, h).max(1))).min(100.0)
}

/// Unclamped load of every host: what the model says the host is asked for.
pub fn demand(snap: &Snapshot, model: &Model) -> HashMap<HostUuid, f64> {
    let mut out: HashMap<HostUuid, f64> = snap.hosts.iter().map(|h| (h.id, model.base_load_pct)).collect();
    for vm in &snap.vms {
        if let Some(at) = vm.current_host {
            let h = snap.hosts.iter().find(|h| h.id == at).unwrap();
            *out.get_mut(&at).unwrap() += share(snap, vm, h);
        }
    }
    out
}

/// Recomputes every host's statistics from where the VMs run.
pub fn recompute(snap: &mut Snapshot, model: &Model) {
    let loads = demand(snap, model);
    for i in 0..snap.hosts.len() {
        let id = snap.hosts[i].id;
        let on: Vec<&Vm> = snap.vms.iter().filter(|v| v.current_host == Some(id)).collect();
        let committed: u64 = on.iter().map(|v| v.memory_mib).sum();
        let h = &mut snap.hosts[i];
        h.mem_committed_mib = committed;
        h.vm_count = on.len() as u32;
        h.mem_free_mib = h
            .mem_total_mib
            .saturating_sub(model.reserved_mib)
            .saturating_sub(committed / 2);
        h.cpu_load_pct = loads[&id].min(100.0);
    }
}

pub fn memory_limit(snap: &Snapshot, h: &Host) -> u64 {
    let over = h.mem_total_mib * u64::from(snap.policy.memory_overcommit_pct) / 100;
    h.max_scheduling_memory_mib.map_or(over, |c| c.min(over))
}

/// Where VMs are for the oracle: `at` where each runs (or will run), `leaving` the host a
/// migrating VM still occupies.
#[derive(Clone, Debug, Default)]
pub struct Locs {
    pub at: HashMap<VmId, HostUuid>,
    pub leaving: HashMap<VmId, HostUuid>,
}

impl Locs {
    pub fn of(snap: &Snapshot) -> Self {
        let mut l = Locs::default();
        for vm in &snap.vms {
            match (vm.current_host, vm.migrating_to) {
                (Some(src), Some(dst)) => {
                    l.at.insert(vm.id, dst);
                    l.leaving.insert(vm.id, src);
                }
                (Some(h), None) => {
                    l.at.insert(vm.id, h);
                }
                _ => {}
            }
        }
        l
    }
}

/// Every hard constraint VM `vm` would break on `host`, given what earlier decisions of the same
/// plan already put there (`added_mib`) and where the other VMs are. Written from the issue's
/// words, independently of the crate's filter code.
pub fn violations(
    snap: &Snapshot,
    vm: &Vm,
    host: &Host,
    locs: &Locs,
    added_mib: u64,
    leaving_current: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    if host.status != HostStatus::Up {
        out.push("status".into());
    }
    if leaving_current && vm.current_host == Some(host.id) {
        out.push("current host".into());
    }
    let committed = host.mem_committed_mib + host.pending.mem_mib + added_mib;
    if committed + vm.memory_mib > memory_limit(snap, host) {
        out.push("memory".into());
    }
    let phys =
        (host.mem_free_mib + host.swap_free_mib) as i128 - host.pending.mem_mib as i128 - added_mib as i128;
    if (vm.memory_mib as i128) > phys {
        out.push("physical memory".into());
    }
    if vm.vcpus > host_cpus(snap, host) {
        out.push("cpu".into());
    }
    if !vm.storage_domains.is_subset(&host.storage_domains) {
        out.push("storage".into());
    }
    if !vm.networks.is_subset(&host.networks) {
        out.push("network".into());
    }
    if !vm.pinned_hosts.is_empty() && !vm.pinned_hosts.contains(&host.id) {
        out.push("pinning".into());
    }
    for g in &snap.affinity_groups {
        if !g.vms.contains(&vm.id) {
            continue;
        }
        if let Some(rule) = g.vm_rule.filter(|r| r.enforcing) {
            for other in g.vms.iter().filter(|&&o| o != vm.id) {
                let at = locs.at.get(other);
                let leaving = locs.leaving.get(other);
                match rule.polarity {
                    Polarity::Positive => {
                        if at.is_some_and(|&a| a != host.id) {
                            out.push(format!("positive affinity {}", g.name));
                        }
                    }
                    Polarity::Negative => {
                        if at == Some(&host.id) || leaving == Some(&host.id) {
                            out.push(format!("negative affinity {}", g.name));
                        }
                    }
                }
            }
        }
        if let Some(rule) = g.host_rule.filter(|r| r.enforcing) {
            let member = g.hosts.contains(&host.id);
            if member != (rule.polarity == Polarity::Positive) {
                out.push(format!("host affinity {}", g.name));
            }
        }
    }
    out
}

/// A random cluster: 3–20 hosts, up to `max_vms` VMs of which about 70% run, random affinity
/// groups, pinning, storage and networks. Host statistics follow [`Model`].
pub fn random_cluster(seed: u64, max_vms: usize) -> Snapshot {
    let mut rng = StdRng::seed_from_u64(seed);
    let kinds = [
        PolicyKind::None,
        PolicyKind::EvenlyDistributed,
        PolicyKind::PowerSaving,
        PolicyKind::VmEvenlyDistributed,
    ];
    let kind = *kinds.choose(&mut rng).unwrap();
    let mut policy = ClusterPolicy::new(kind);
    policy.memory_overcommit_pct = *[100, 150, 200].choose(&mut rng).unwrap();
    policy.count_threads_as_cores = rng.gen_bool(0.3);

    let n_hosts = rng.gen_range(3..=20usize);
    let statuses = [
        HostStatus::Maintenance,
        HostStatus::NonResponsive,
        HostStatus::NonOperational,
        HostStatus::Installing,
    ];
    let mut hosts = Vec::new();
    for i in 0..n_hosts {
        let mut h = host(i as u128);
        if rng.gen_bool(0.15) {
            h.status = *statuses.choose(&mut rng).unwrap();
        }
        h.cpu_cores = *[4, 8, 16, 32].choose(&mut rng).unwrap();
        h.cpu_threads = h.cpu_cores * 2;
        h.mem_total_mib = *[16, 32, 64, 128].choose(&mut rng).unwrap() * 1024;
        h.swap_free_mib = if rng.gen_bool(0.3) { 4096 } else { 0 };
        h.storage_domains = (1..=3).filter(|_| rng.gen_bool(0.8)).map(sd).collect();
        h.networks = ["ovirtmgmt", "prod", "backup"]
            .iter()
            .enumerate()
            .filter(|(i, _)| *i == 0 || rng.gen_bool(0.7))
            .map(|(_, n)| (*n).to_owned())
            .collect();
        if rng.gen_bool(0.2) {
            h.max_scheduling_memory_mib = Some(h.mem_total_mib / 2);
        }
        h.spm = i == 0;
        if rng.gen_bool(0.15) {
            h.pending = Pending {
                mem_mib: 2048,
                vcpus: 2,
                vm_count: 1,
            };
        }
        hosts.push(h);
    }

    let n_vms = rng.gen_range(0..=max_vms);
    let mut vms = Vec::new();
    for i in 0..n_vms {
        let mut v = vm(i as u128);
        v.memory_mib = *[512, 1024, 2048, 4096, 8192, 16384].choose(&mut rng).unwrap();
        v.vcpus = if rng.gen_bool(0.05) {
            48
        } else {
            rng.gen_range(1..=8)
        };
        v.cpu_usage_pct = if rng.gen_bool(0.2) {
            0.0
        } else {
            rng.gen_range(1.0..100.0)
        };
        v.storage_domains = [sd(rng.gen_range(1..=3))].into();
        if rng.gen_bool(0.2) {
            v.storage_domains.insert(sd(rng.gen_range(1..=3)));
        }
        if rng.gen_bool(0.3) {
            v.networks.insert("prod".into());
        }
        if rng.gen_bool(0.1) {
            v.networks.insert("backup".into());
        }
        if rng.gen_bool(0.1) {
            v.pinned_hosts = (0..rng.gen_range(1..=2))
                .map(|_| hid(rng.gen_range(0..n_hosts) as u128))
                .collect();
        }
        v.highly_available = rng.gen_bool(0.3);
        v.ha_priority = *[1, 50, 100].choose(&mut rng).unwrap();
        v.migratable = rng.gen_bool(0.9);
        vms.push(v);
    }

    // Run about 70% of the VMs on random hosts, within each host's memory limit.
    let mut committed: HashMap<HostUuid, u64> = HashMap::new();
    for v in &mut vms {
        if !rng.gen_bool(0.7) {
            continue;
        }
        let h = hosts.choose(&mut rng).unwrap();
        let c = committed.entry(h.id).or_default();
        let limit = h.mem_total_mib * u64::from(policy.memory_overcommit_pct) / 100;
        if *c + v.memory_mib <= limit {
            *c += v.memory_mib;
            v.current_host = Some(h.id);
        }
    }

    let mut groups = Vec::new();
    if n_vms >= 2 {
        for g in 0..rng.gen_range(0..=6) {
            let members: Vec<u128> = (0..rng.gen_range(2..=5))
                .map(|_| rng.gen_range(0..n_vms) as u128)
                .collect();
            let group_hosts: Vec<u128> = (0..rng.gen_range(0..=3))
                .map(|_| rng.gen_range(0..n_hosts) as u128)
                .collect();
            let mut rule = || {
                rng.gen_bool(0.7).then(|| {
                    (
                        if rng.gen_bool(0.5) {
                            Polarity::Positive
                        } else {
                            Polarity::Negative
                        },
                        rng.gen_bool(0.5),
                    )
                })
            };
            let vm_rule = rule();
            let host_rule = rule();
            groups.push(group(
                &format!("g{g}"),
                &members,
                &group_hosts,
                vm_rule,
                host_rule,
            ));
        }
    }

    let mut snap = Snapshot {
        hosts,
        vms,
        affinity_groups: groups,
        policy,
    };
    recompute(&mut snap, &Model::default());
    snap
}

/// A cluster for balancing: all hosts up and alike in storage and networks, VMs running on a few
/// hosts so that the cluster starts unbalanced, no hard affinity that pins VMs together.
pub fn unbalanced_cluster(seed: u64, kind: PolicyKind, max_vms: usize) -> Snapshot {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut policy = ClusterPolicy::new(kind);
    policy.memory_overcommit_pct = *[100, 150, 200].choose(&mut rng).unwrap();
    policy.count_threads_as_cores = rng.gen_bool(0.3);
    policy.properties.high_vm_count = rng.gen_range(3..=12);
    policy.properties.migration_threshold = rng.gen_range(1..=5);
    policy.properties.spm_vm_grace = rng.gen_range(0..=5);
    let n_hosts = rng.gen_range(3..=20usize);
    let mut hosts = Vec::new();
    for i in 0..n_hosts {
        let mut h = host(i as u128);
        h.cpu_cores = *[4, 8, 16, 32].choose(&mut rng).unwrap();
        h.cpu_threads = h.cpu_cores * 2;
        h.mem_total_mib = *[32, 64, 128].choose(&mut rng).unwrap() * 1024;
        h.spm = i == 0;
        hosts.push(h);
    }
    let n_vms = rng.gen_range(1..=max_vms);
    // Most VMs start on the first few hosts.
    let crowded = rng.gen_range(1..=n_hosts.min(3));
    let mut committed = vec![0u64; n_hosts];
    let mut vms = Vec::new();
    for i in 0..n_vms {
        let mut v = vm(i as u128);
        v.memory_mib = *[512, 1024, 2048, 4096].choose(&mut rng).unwrap();
        v.vcpus = rng.gen_range(1..=4);
        v.cpu_usage_pct = if rng.gen_bool(0.2) {
            0.0
        } else {
            rng.gen_range(1.0..100.0)
        };
        v.migratable = rng.gen_bool(0.95);
        let h = if rng.gen_bool(0.8) {
            rng.gen_range(0..crowded)
        } else {
            rng.gen_range(0..n_hosts)
        };
        let limit = hosts[h].mem_total_mib * u64::from(policy.memory_overcommit_pct) / 100;
        if committed[h] + v.memory_mib <= limit {
            committed[h] += v.memory_mib;
            v.current_host = Some(hosts[h].id);
            vms.push(v);
        }
    }
    let mut groups = Vec::new();
    if vms.len() >= 4 {
        // Negative hard and soft groups only: they restrict moves without freezing VMs.
        for g in 0..rng.gen_range(0..=3) {
            let members: Vec<VmId> = (0..rng.gen_range(2..=4))
                .map(|_| vms[rng.gen_range(0..vms.len())].id)
                .collect();
            groups.push(AffinityGroup {
                name: format!("apart{g}"),
                vms: members,
                hosts: Vec::new(),
                vm_rule: Some(AffinityRule {
                    polarity: Polarity::Negative,
                    enforcing: rng.gen_bool(0.5),
                }),
                host_rule: None,
            });
        }
    }
    let mut snap = Snapshot {
        hosts,
        vms,
        affinity_groups: groups,
        policy,
    };
    recompute(&mut snap, &Model::default());
    snap
}

pub fn minutes(n: u64) -> Duration {
    Duration::from_secs(n * 60)
}
