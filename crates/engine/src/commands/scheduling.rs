//! Cluster scheduling settings and affinity groups: what an administrator changes so that the
//! scheduler ([`crate::scheduling`]) places VMs differently.
//!
//! Scheduling policies are the four built-in ones of [`SchedulingPolicy`]; each has oVirt's own
//! well-known id (from oVirt's `cluster_policies` seed data), so that clients that remember a
//! policy by id keep working against oxvirt. They are read-only: there is no table of them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{AffinityGroup, AffinityGroupId, Cluster, ClusterId, SchedulingPolicy, VmId};

use super::{CommandError, Commands};

/// A built-in scheduling policy as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyInfo {
    pub policy: SchedulingPolicy,
    pub id: Uuid,
    pub description: &'static str,
    /// The policy a new cluster gets.
    pub default: bool,
}

/// oVirt's ids for its built-in policies (`packaging/dbscripts/data/00350_insert_cluster_policies.sql`).
pub const POLICIES: [PolicyInfo; 4] = [
    PolicyInfo {
        policy: SchedulingPolicy::None,
        id: Uuid::from_u128(0xb4ed2332_a7ac_4d5f_9596_99a439cb2812),
        description: "No load balancing; VMs start on the least loaded host that passes the filters",
        default: true,
    },
    PolicyInfo {
        policy: SchedulingPolicy::EvenlyDistributed,
        id: Uuid::from_u128(0x20d25257_b4bd_4589_92a6_c4c5c5d3fd1a),
        description: "Spreads CPU load evenly: VMs migrate away from hosts over the high utilization",
        default: false,
    },
    PolicyInfo {
        policy: SchedulingPolicy::PowerSaving,
        id: Uuid::from_u128(0x5a2b0939_7d46_4b73_a469_e9c2c7fc6a53),
        description: "Packs VMs onto few hosts: under-utilized hosts are emptied so they may be powered down",
        default: false,
    },
    PolicyInfo {
        policy: SchedulingPolicy::VmEvenlyDistributed,
        id: Uuid::from_u128(0x8d5d7bec_68de_4a67_b53e_0ac54686d579),
        description: "Spreads the number of VMs evenly across hosts",
        default: false,
    },
];

/// The lowest and highest memory overcommit a cluster accepts, in percent: below 100 would
/// refuse memory the hosts have, above 1000 promises ten times it (no guest survives that).
pub const OVERCOMMIT_RANGE: std::ops::RangeInclusive<u32> = 100..=1000;

pub fn policy_info(p: SchedulingPolicy) -> PolicyInfo {
    *POLICIES
        .iter()
        .find(|i| i.policy == p)
        .expect("every policy has an entry")
}

/// The policy a request names, by id or by name (case-insensitive; oVirt's mixed-case names
/// such as `Evenly_Distributed` too). An unknown one is refused, naming the known ones.
pub fn resolve_policy(id: Option<&str>, name: Option<&str>) -> Result<SchedulingPolicy, CommandError> {
    let known = || {
        POLICIES
            .iter()
            .map(|i| format!("{} ({})", i.policy, i.id))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(id) = id {
        let found = Uuid::parse_str(id)
            .ok()
            .and_then(|u| POLICIES.iter().find(|i| i.id == u));
        let by_id = found.ok_or_else(|| {
            CommandError::invalid(format!(
                "scheduling policy {id:?} does not exist; known: {}",
                known()
            ))
        })?;
        if let Some(n) = name {
            if !n.eq_ignore_ascii_case(by_id.policy.as_str()) {
                return Err(CommandError::invalid(format!(
                    "scheduling policy id {id} is {}, not {n:?}",
                    by_id.policy
                )));
            }
        }
        return Ok(by_id.policy);
    }
    let Some(n) = name else {
        return Err(CommandError::invalid("a scheduling policy needs an id or a name"));
    };
    n.to_ascii_lowercase().parse().map_err(|_| {
        CommandError::invalid(format!(
            "scheduling policy {n:?} does not exist; known: {}",
            known()
        ))
    })
}

pub(crate) fn check_overcommit(p: u32) -> Result<(), CommandError> {
    if OVERCOMMIT_RANGE.contains(&p) {
        return Ok(());
    }
    Err(CommandError::invalid(format!(
        "memory overcommit {p}% is outside {}..={} percent",
        OVERCOMMIT_RANGE.start(),
        OVERCOMMIT_RANGE.end()
    )))
}

/// A change to a cluster's configuration; `None` keeps the field.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateCluster {
    pub name: Option<String>,
    pub description: Option<String>,
    pub cpu_type: Option<String>,
    pub scheduling_policy: Option<SchedulingPolicy>,
    pub memory_overcommit_percent: Option<u32>,
    /// Replaces the cluster's own policy property values (see
    /// [`Cluster::scheduling_properties`]).
    pub scheduling_properties: Option<BTreeMap<String, String>>,
    /// `Some(None)`: no limit (`auto`); see [`Cluster::migration_bandwidth_mbps`].
    #[serde(default)]
    pub migration_bandwidth_mbps: Option<Option<u32>>,
    /// See [`Cluster::migration_encrypted`].
    #[serde(default)]
    pub migration_encrypted: Option<bool>,
}

/// The most a cluster's migration bandwidth limit may be: 100 Gbps.
pub const MAX_MIGRATION_BANDWIDTH_MBPS: u32 = 100_000;

/// Checks a migration bandwidth limit (Mbps): at least 1, at most
/// [`MAX_MIGRATION_BANDWIDTH_MBPS`].
pub fn check_migration_bandwidth(mbps: Option<u32>) -> Result<Option<u32>, CommandError> {
    match mbps {
        Some(m) if m == 0 || m > MAX_MIGRATION_BANDWIDTH_MBPS => Err(CommandError::invalid(format!(
            "migration bandwidth {m} Mbps must be 1 to {MAX_MIGRATION_BANDWIDTH_MBPS}"
        ))),
        m => Ok(m),
    }
}

/// Checks a cluster's own policy property values: oVirt's names, whole numbers, percentages at
/// most 100, a duration of at most a day. Answers them trimmed.
pub fn check_scheduling_properties(
    props: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, CommandError> {
    use oxvirt_scheduler::{PolicyKind, PolicyProperties};
    let base = PolicyProperties::defaults_for(PolicyKind::None);
    PolicyProperties::from_ovirt(base, props).map_err(|e| {
        CommandError::invalid(format!(
            "{e}; the properties are {}",
            PolicyProperties::NAMES.join(", ")
        ))
    })?;
    let mut out = BTreeMap::new();
    for (name, value) in props {
        let v: u32 = value.trim().parse().expect("checked by from_ovirt");
        let max = match name.as_str() {
            "HighUtilization" | "LowUtilization" => 100,
            "CpuOverCommitDurationMinutes" => 24 * 60,
            _ => 10_000,
        };
        if v > max {
            return Err(CommandError::invalid(format!(
                "scheduling property {name} is {v}, more than {max}"
            )));
        }
        out.insert(name.clone(), v.to_string());
    }
    Ok(out)
}

/// A new affinity group (oVirt's `AffinityGroup` with its `vms_rule`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddAffinityGroup {
    pub cluster: ClusterId,
    pub name: String,
    pub description: String,
    pub enabled: bool,
    pub positive: bool,
    pub enforcing: bool,
    pub vms: Vec<VmId>,
}

/// A change to an affinity group; `None` keeps the field, `vms: Some` replaces the members.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateAffinityGroup {
    pub name: Option<String>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
    pub positive: Option<bool>,
    pub enforcing: Option<bool>,
    pub vms: Option<Vec<VmId>>,
}

impl Commands {
    /// Changes a cluster's configuration; validated whole before anything is written, so a
    /// refused change leaves the cluster as it was.
    pub async fn update_cluster(&self, id: ClusterId, req: UpdateCluster) -> Result<Cluster, CommandError> {
        let mut cl = self.app.cluster(id).await?;
        if let Some(p) = req.memory_overcommit_percent {
            check_overcommit(p)?;
            cl.memory_overcommit_percent = p;
        }
        if let Some(b) = req.migration_bandwidth_mbps {
            cl.migration_bandwidth_mbps = check_migration_bandwidth(b)?;
        }
        if let Some(e) = req.migration_encrypted {
            cl.migration_encrypted = e;
        }
        if let Some(n) = req.name {
            cl.name = n;
        }
        if let Some(d) = req.description {
            cl.description = d;
        }
        if let Some(t) = req.cpu_type {
            cl.cpu_type = t;
        }
        let old_policy = cl.scheduling_policy;
        if let Some(p) = req.scheduling_policy {
            cl.scheduling_policy = p;
        }
        if let Some(props) = &req.scheduling_properties {
            cl.scheduling_properties = check_scheduling_properties(props)?;
        }
        let cl = self.app.db.cluster_update(&cl).await?;
        if cl.scheduling_policy != old_policy {
            tracing::info!(cluster = %cl.name, from = %old_policy, to = %cl.scheduling_policy, "scheduling policy changed");
        }
        Ok(cl)
    }

    async fn cluster_of_group(
        &self,
        cluster: ClusterId,
        group: AffinityGroupId,
    ) -> Result<AffinityGroup, CommandError> {
        let g = self
            .app
            .db
            .affinity_group_get(group)
            .await?
            .ok_or_else(|| CommandError::not_found("affinity group", group))?;
        // A group is addressed under its cluster: another cluster's group is not found there.
        if g.cluster_id != cluster {
            return Err(CommandError::not_found("affinity group", group));
        }
        Ok(g)
    }

    /// An affinity group of `cluster`.
    pub async fn affinity_group(
        &self,
        cluster: ClusterId,
        group: AffinityGroupId,
    ) -> Result<AffinityGroup, CommandError> {
        self.cluster_of_group(cluster, group).await
    }

    /// Checks that every VM exists and runs in `cluster` (the scheduler places a group's VMs
    /// among the cluster's hosts only).
    async fn check_members(&self, cluster: &Cluster, group: &str, vms: &[VmId]) -> Result<(), CommandError> {
        for (i, vm) in vms.iter().enumerate() {
            if vms[..i].contains(vm) {
                return Err(CommandError::invalid(format!(
                    "VM {vm} is listed twice for affinity group {group}"
                )));
            }
            let v = self
                .app
                .db
                .vm_get(*vm)
                .await?
                .ok_or_else(|| CommandError::invalid(format!("VM {vm} does not exist")))?;
            if v.cluster_id != cluster.id {
                let other = match self.app.db.cluster_get(v.cluster_id).await? {
                    Some(c) => c.name,
                    None => v.cluster_id.to_string(),
                };
                return Err(CommandError::invalid(format!(
                    "VM {} is in cluster {other}, not in affinity group {group}'s cluster {}",
                    v.name, cluster.name
                )));
            }
        }
        Ok(())
    }

    async fn check_group_name_free(
        &self,
        cluster: &Cluster,
        name: &str,
        except: Option<AffinityGroupId>,
    ) -> Result<(), CommandError> {
        let taken = self
            .app
            .db
            .affinity_groups_of_cluster(cluster.id)
            .await?
            .into_iter()
            .any(|g| g.name == name && Some(g.id) != except);
        if taken {
            return Err(CommandError::Conflict(format!(
                "cluster {} already has an affinity group named {name}",
                cluster.name
            )));
        }
        Ok(())
    }

    pub async fn add_affinity_group(&self, req: AddAffinityGroup) -> Result<AffinityGroup, CommandError> {
        let cl = self.app.cluster(req.cluster).await?;
        self.check_group_name_free(&cl, &req.name, None).await?;
        self.check_members(&cl, &req.name, &req.vms).await?;
        let g = AffinityGroup {
            id: AffinityGroupId::new_random(),
            cluster_id: cl.id,
            name: req.name,
            description: req.description,
            enabled: req.enabled,
            positive: req.positive,
            enforcing: req.enforcing,
            vm_ids: req.vms,
            created_at: self.app.db.now(),
        };
        // One transaction: the group and its members appear together (the unique name is
        // checked again by the database should two adds race).
        Ok(self.app.db.affinity_group_insert(&g).await?)
    }

    pub async fn update_affinity_group(
        &self,
        cluster: ClusterId,
        group: AffinityGroupId,
        req: UpdateAffinityGroup,
    ) -> Result<AffinityGroup, CommandError> {
        let mut g = self.cluster_of_group(cluster, group).await?;
        let cl = self.app.cluster(cluster).await?;
        if let Some(n) = req.name {
            self.check_group_name_free(&cl, &n, Some(g.id)).await?;
            g.name = n;
        }
        if let Some(d) = req.description {
            g.description = d;
        }
        if let Some(e) = req.enabled {
            g.enabled = e;
        }
        if let Some(p) = req.positive {
            g.positive = p;
        }
        if let Some(e) = req.enforcing {
            g.enforcing = e;
        }
        if let Some(vms) = &req.vms {
            self.check_members(&cl, &g.name, vms).await?;
        }
        let mut tx = self.app.db.begin().await?;
        let mut out = tx.affinity_group_update(&g).await?;
        if let Some(vms) = req.vms {
            for old in out.vm_ids.iter().filter(|v| !vms.contains(v)) {
                tx.affinity_group_remove_vm(g.id, *old).await?;
            }
            for new in vms.iter().filter(|v| !out.vm_ids.contains(v)) {
                tx.affinity_group_add_vm(g.id, *new).await?;
            }
            out = tx
                .affinity_group_get(g.id)
                .await?
                .ok_or_else(|| CommandError::not_found("affinity group", g.id))?;
        }
        tx.commit().await?;
        Ok(out)
    }

    pub async fn remove_affinity_group(
        &self,
        cluster: ClusterId,
        group: AffinityGroupId,
    ) -> Result<(), CommandError> {
        let g = self.cluster_of_group(cluster, group).await?;
        if !self.app.db.affinity_group_delete(g.id).await? {
            return Err(CommandError::not_found("affinity group", group));
        }
        Ok(())
    }

    /// Adds a VM of the group's cluster to the group.
    pub async fn affinity_group_add_vm(
        &self,
        cluster: ClusterId,
        group: AffinityGroupId,
        vm: VmId,
    ) -> Result<AffinityGroup, CommandError> {
        let g = self.cluster_of_group(cluster, group).await?;
        let cl = self.app.cluster(cluster).await?;
        self.check_members(&cl, &g.name, &[vm]).await?;
        if g.vm_ids.contains(&vm) {
            return Err(CommandError::Conflict(format!(
                "VM {vm} is already in affinity group {}",
                g.name
            )));
        }
        self.app.db.affinity_group_add_vm(g.id, vm).await?;
        self.cluster_of_group(cluster, group).await
    }

    pub async fn affinity_group_remove_vm(
        &self,
        cluster: ClusterId,
        group: AffinityGroupId,
        vm: VmId,
    ) -> Result<(), CommandError> {
        let g = self.cluster_of_group(cluster, group).await?;
        if !self.app.db.affinity_group_remove_vm(g.id, vm).await? {
            return Err(CommandError::NotFound {
                kind: "VM",
                id: format!("{vm} in affinity group {}", g.name),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_resolve_by_id_and_name() {
        assert_eq!(
            resolve_policy(Some("b4ed2332-a7ac-4d5f-9596-99a439cb2812"), None).unwrap(),
            SchedulingPolicy::None
        );
        assert_eq!(
            resolve_policy(None, Some("Evenly_Distributed")).unwrap(),
            SchedulingPolicy::EvenlyDistributed
        );
        assert_eq!(
            resolve_policy(
                Some("8d5d7bec-68de-4a67-b53e-0ac54686d579"),
                Some("vm_evenly_distributed")
            )
            .unwrap(),
            SchedulingPolicy::VmEvenlyDistributed
        );
        let e = resolve_policy(None, Some("fastest")).unwrap_err().to_string();
        assert!(e.contains("\"fastest\"") && e.contains("power_saving"), "{e}");
        assert!(resolve_policy(Some("not-a-uuid"), None).is_err());
        assert!(resolve_policy(Some("b4ed2332-a7ac-4d5f-9596-99a439cb2812"), Some("power_saving")).is_err());
        assert!(resolve_policy(None, None).is_err());
        for p in SchedulingPolicy::ALL {
            assert_eq!(policy_info(*p).policy, *p);
        }
    }
}
