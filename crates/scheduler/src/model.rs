//! The snapshot of a cluster that every scheduling decision is a function of.
//!
//! The engine builds a [`Snapshot`] from its database and the nodes' latest statistics; the
//! scheduler never sees anything else. Invariants that [`Snapshot::validate`] enforces (and that
//! every public entry point checks before deciding anything):
//! - host and VM ids are unique;
//! - a VM's `current_host` and `migrating_to` name hosts of the snapshot;
//! - loads and usages are finite percentages in `0..=100`, hosts that are up have CPUs;
//! - the cluster policy's properties are in range for its kind.
//!
//! Affinity groups and pinning lists may name VMs or hosts the snapshot does not hold (removed
//! hosts, VMs of another cluster): such members are treated as not running anywhere.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::ops::Add;
use std::str::FromStr;
use std::time::Duration;

use oxvirt_types::{SdUuid, VmId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The engine's id of a host (oVirt's `vds_id`), not its lockspace host id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostUuid(Uuid);

impl HostUuid {
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }
    pub const fn from_uuid(u: Uuid) -> Self {
        Self(u)
    }
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for HostUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for HostUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostUuid({})", self.0.hyphenated())
    }
}

impl FromStr for HostUuid {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, uuid::Error> {
        Uuid::try_parse(s).map(Self)
    }
}

/// A point in time, in milliseconds since the Unix epoch. The scheduler never reads a clock: the
/// engine passes `now` in, and tests pass a simulated one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const fn from_unix_millis(ms: u64) -> Self {
        Self(ms)
    }
    pub const fn unix_millis(self) -> u64 {
        self.0
    }
    /// Time from `earlier` to `self`; zero if `earlier` is later (clocks of different machines).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }
}

/// A host's status as the engine's monitoring sees it (oVirt's names). Only `Up` hosts run VMs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    Up,
    Installing,
    Maintenance,
    PreparingForMaintenance,
    NonResponsive,
    NonOperational,
    Down,
}

impl fmt::Display for HostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Up => "up",
            Self::Installing => "installing",
            Self::Maintenance => "maintenance",
            Self::PreparingForMaintenance => "preparing_for_maintenance",
            Self::NonResponsive => "non_responsive",
            Self::NonOperational => "non_operational",
            Self::Down => "down",
        })
    }
}

/// Resources promised to VMs that are being started on, or migrated to, a host and that its
/// statistics do not show yet (oVirt's pending resources). The engine adds a placed VM here when it
/// acts on a placement and removes it once the VM runs; without it, two placements made a second
/// apart would both see the same free memory.
#[derive(Clone, Copy, PartialEq, Debug, Default, Serialize, Deserialize)]
pub struct Pending {
    pub mem_mib: u64,
    pub vcpus: u32,
    pub vm_count: u32,
}

/// One host of the cluster.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Host {
    pub id: HostUuid,
    /// For messages only.
    pub name: String,
    pub status: HostStatus,
    pub cpu_cores: u32,
    /// Hardware threads; used instead of cores when the policy counts threads as cores.
    pub cpu_threads: u32,
    /// Share of all the host's CPUs busy, `0..=100`, as last sampled.
    pub cpu_load_pct: f64,
    pub mem_total_mib: u64,
    /// Memory the host can hand out right now, as it reports it.
    pub mem_free_mib: u64,
    pub swap_free_mib: u64,
    /// Sum of the configured memory of the VMs running on the host.
    pub mem_committed_mib: u64,
    /// An administrator's cap on `mem_committed_mib` for this host, applied after the cluster's
    /// overcommit percentage; `None` for no cap.
    pub max_scheduling_memory_mib: Option<u64>,
    /// Storage domains the host is connected to and reaches.
    pub storage_domains: BTreeSet<SdUuid>,
    /// Logical networks attached to the host.
    pub networks: BTreeSet<String>,
    /// Whether the host is the data center's SPM (it gets fewer VMs under `vm_evenly_distributed`).
    pub spm: bool,
    /// VMs running on the host, including ones migrating away.
    pub vm_count: u32,
    pub pending: Pending,
}

/// One VM of the cluster, running or not.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Vm {
    pub id: VmId,
    /// For messages only.
    pub name: String,
    /// Memory to reserve for the VM (its configured memory, plus QEMU's overhead if the engine
    /// accounts for it).
    pub memory_mib: u64,
    pub vcpus: u32,
    /// Share of the VM's own vCPUs busy, `0..=100` (an estimate for a VM that is not running).
    pub cpu_usage_pct: f64,
    /// The host the VM runs on, or is being started on; `None` when it is down. A VM waiting
    /// for an HA restart may keep its dead host here (`place_many` with `HaRestart` ignores it).
    pub current_host: Option<HostUuid>,
    /// Destination of a migration in progress; the engine has already added the VM to that host's
    /// `pending`.
    pub migrating_to: Option<HostUuid>,
    /// Hosts the VM may run on (oVirt's "specific hosts"); empty means any host.
    pub pinned_hosts: BTreeSet<HostUuid>,
    pub storage_domains: BTreeSet<SdUuid>,
    pub networks: BTreeSet<String>,
    pub highly_available: bool,
    /// Restart order among HA VMs, higher first (oVirt uses 1 low, 50 medium, 100 high).
    pub ha_priority: u32,
    /// False for VMs that must not leave their host (oVirt's "pinned" migration mode).
    pub migratable: bool,
    /// When the VM last finished or started a migration, for the balancer's cooldown.
    pub last_migrated_at: Option<Timestamp>,
}

/// Positive (together) or negative (apart).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Polarity {
    Positive,
    Negative,
}

impl fmt::Display for Polarity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Positive => "positive",
            Self::Negative => "negative",
        })
    }
}

/// One rule of an affinity group. Enforcing (hard) rules are filters, the others (soft) weights.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct AffinityRule {
    pub polarity: Polarity,
    pub enforcing: bool,
}

/// An affinity group as oVirt has them: a set of VMs and hosts with a VM↔VM rule (the VMs run on
/// one host, or on different hosts) and a VM↔host rule (the VMs run on the group's hosts, or
/// not on them). A missing rule is disabled.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct AffinityGroup {
    pub name: String,
    pub vms: Vec<VmId>,
    pub hosts: Vec<HostUuid>,
    pub vm_rule: Option<AffinityRule>,
    pub host_rule: Option<AffinityRule>,
}

/// oVirt's built-in scheduling policies.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Place like `evenly_distributed`; never balance.
    None,
    /// Spread CPU load; move VMs off hosts above HighUtilization.
    EvenlyDistributed,
    /// Pack VMs onto few hosts below HighUtilization; empty hosts below LowUtilization.
    PowerSaving,
    /// Spread VM counts; move VMs off hosts with HighVmCount VMs or more.
    VmEvenlyDistributed,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::EvenlyDistributed => "evenly_distributed",
            Self::PowerSaving => "power_saving",
            Self::VmEvenlyDistributed => "vm_evenly_distributed",
        })
    }
}

impl FromStr for PolicyKind {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Ok(match s {
            "none" => Self::None,
            "evenly_distributed" => Self::EvenlyDistributed,
            "power_saving" => Self::PowerSaving,
            "vm_evenly_distributed" => Self::VmEvenlyDistributed,
            _ => return Err(PolicyError::UnknownPolicy(s.to_owned())),
        })
    }
}

/// A scheduling policy's properties, under the names oVirt gives them (serialized as such).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PolicyProperties {
    /// CPU load (%) above which a host is over-utilized.
    pub high_utilization: u32,
    /// CPU load (%) below which a host is under-utilized (`power_saving`).
    pub low_utilization: u32,
    /// How long a host must stay over (or under) a threshold before the balancer acts.
    pub cpu_over_commit_duration_minutes: u32,
    /// VM count from which a host is over-utilized (`vm_evenly_distributed`).
    pub high_vm_count: u32,
    /// Minimum difference in VM count between source and destination (`vm_evenly_distributed`).
    pub migration_threshold: u32,
    /// VMs' worth of handicap the SPM host carries (`vm_evenly_distributed`).
    pub spm_vm_grace: u32,
}

impl PolicyProperties {
    /// oVirt's defaults for a policy.
    pub fn defaults_for(kind: PolicyKind) -> Self {
        Self {
            high_utilization: 80,
            low_utilization: if kind == PolicyKind::PowerSaving { 20 } else { 0 },
            cpu_over_commit_duration_minutes: 2,
            high_vm_count: 10,
            migration_threshold: 5,
            spm_vm_grace: 5,
        }
    }

    /// The names oVirt uses for the properties, in the order of [`Self::to_ovirt`].
    pub const NAMES: [&'static str; 6] = [
        "HighUtilization",
        "LowUtilization",
        "CpuOverCommitDurationMinutes",
        "HighVmCount",
        "MigrationThreshold",
        "SpmVmGrace",
    ];

    /// Reads oVirt-named properties (as the REST API's `properties` carry them) over `base`.
    /// Unknown names and non-numeric values are errors; missing names keep `base`'s value.
    pub fn from_ovirt(base: Self, props: &BTreeMap<String, String>) -> Result<Self, PolicyError> {
        let mut out = base;
        for (name, value) in props {
            let v: u32 = value.trim().parse().map_err(|_| PolicyError::BadValue {
                name: name.clone(),
                value: value.clone(),
            })?;
            match name.as_str() {
                "HighUtilization" => out.high_utilization = v,
                "LowUtilization" => out.low_utilization = v,
                "CpuOverCommitDurationMinutes" => out.cpu_over_commit_duration_minutes = v,
                "HighVmCount" => out.high_vm_count = v,
                "MigrationThreshold" => out.migration_threshold = v,
                "SpmVmGrace" => out.spm_vm_grace = v,
                _ => return Err(PolicyError::UnknownProperty(name.clone())),
            }
        }
        Ok(out)
    }

    pub fn to_ovirt(&self) -> BTreeMap<String, String> {
        let values = [
            self.high_utilization,
            self.low_utilization,
            self.cpu_over_commit_duration_minutes,
            self.high_vm_count,
            self.migration_threshold,
            self.spm_vm_grace,
        ];
        Self::NAMES
            .iter()
            .zip(values)
            .map(|(n, v)| ((*n).to_owned(), v.to_string()))
            .collect()
    }

    pub fn over_commit_duration(&self) -> Duration {
        Duration::from_secs(u64::from(self.cpu_over_commit_duration_minutes) * 60)
    }
}

/// The cluster's scheduling policy and memory/CPU settings.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ClusterPolicy {
    pub kind: PolicyKind,
    pub properties: PolicyProperties,
    /// Memory a host may promise to VMs, in percent of its physical memory (oVirt offers 100,
    /// 150 and 200).
    pub memory_overcommit_pct: u32,
    /// Count hardware threads as cores, both for the CPU filter (a VM may then have as many vCPUs
    /// as the host has threads) and for load shares.
    pub count_threads_as_cores: bool,
}

impl ClusterPolicy {
    /// A policy with oVirt's default properties, no memory overcommit, cores counted as cores.
    pub fn new(kind: PolicyKind) -> Self {
        Self {
            kind,
            properties: PolicyProperties::defaults_for(kind),
            memory_overcommit_pct: 100,
            count_threads_as_cores: false,
        }
    }

    pub fn validate(&self) -> Result<(), PolicyError> {
        let p = &self.properties;
        if !(1..=1000).contains(&self.memory_overcommit_pct) {
            return Err(PolicyError::OutOfRange {
                name: "memory overcommit percentage",
                value: self.memory_overcommit_pct,
                range: "1..=1000",
            });
        }
        if !(1..=100).contains(&p.high_utilization) {
            return Err(PolicyError::OutOfRange {
                name: "HighUtilization",
                value: p.high_utilization,
                range: "1..=100",
            });
        }
        if self.kind == PolicyKind::PowerSaving && p.low_utilization >= p.high_utilization {
            return Err(PolicyError::LowNotBelowHigh {
                low: p.low_utilization,
                high: p.high_utilization,
            });
        }
        if p.low_utilization > 100 {
            return Err(PolicyError::OutOfRange {
                name: "LowUtilization",
                value: p.low_utilization,
                range: "0..=100",
            });
        }
        if p.cpu_over_commit_duration_minutes > 24 * 60 {
            return Err(PolicyError::OutOfRange {
                name: "CpuOverCommitDurationMinutes",
                value: p.cpu_over_commit_duration_minutes,
                range: "0..=1440",
            });
        }
        if p.migration_threshold == 0 {
            return Err(PolicyError::OutOfRange {
                name: "MigrationThreshold",
                value: 0,
                range: "1..",
            });
        }
        Ok(())
    }
}

/// A policy that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown scheduling policy {0:?} (expected none, evenly_distributed, power_saving or vm_evenly_distributed)")]
    UnknownPolicy(String),
    #[error("unknown scheduling policy property {0:?}")]
    UnknownProperty(String),
    #[error("scheduling policy property {name} has value {value:?}, expected a non-negative integer")]
    BadValue { name: String, value: String },
    #[error("{name} is {value}, expected {range}")]
    OutOfRange {
        name: &'static str,
        value: u32,
        range: &'static str,
    },
    #[error("LowUtilization ({low}) must be below HighUtilization ({high})")]
    LowNotBelowHigh { low: u32, high: u32 },
}

/// Everything a decision depends on.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
    pub affinity_groups: Vec<AffinityGroup>,
    pub policy: ClusterPolicy,
}

/// A snapshot that breaks one of the invariants in the module documentation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SnapshotError {
    #[error("host {0} appears twice in the snapshot")]
    DuplicateHost(HostUuid),
    #[error("VM {0} appears twice in the snapshot")]
    DuplicateVm(VmId),
    #[error("VM {vm} names unknown host {host} as its {field}")]
    UnknownHost {
        vm: VmId,
        host: HostUuid,
        field: &'static str,
    },
    #[error("VM {vm} migrates to the host it runs on ({host})")]
    MigratesToItself { vm: VmId, host: HostUuid },
    #[error("VM {vm} migrates but runs nowhere")]
    MigratesFromNowhere { vm: VmId },
    #[error("host {host} reports a CPU load of {value}, expected a percentage")]
    BadHostLoad { host: HostUuid, value: f64 },
    #[error("VM {vm} has a CPU usage of {value}, expected a percentage")]
    BadVmUsage { vm: VmId, value: f64 },
    #[error("host {host} is up but has no CPUs")]
    NoCpus { host: HostUuid },
    #[error("invalid cluster policy")]
    Policy(#[source] PolicyError),
}

fn is_pct(v: f64) -> bool {
    v.is_finite() && (0.0..=100.0).contains(&v)
}

impl Snapshot {
    pub fn validate(&self) -> Result<(), SnapshotError> {
        self.policy.validate().map_err(SnapshotError::Policy)?;
        let mut hosts = HashSet::with_capacity(self.hosts.len());
        for h in &self.hosts {
            if !hosts.insert(h.id) {
                return Err(SnapshotError::DuplicateHost(h.id));
            }
            if !is_pct(h.cpu_load_pct) {
                return Err(SnapshotError::BadHostLoad {
                    host: h.id,
                    value: h.cpu_load_pct,
                });
            }
            if h.status == HostStatus::Up && h.cpu_cores == 0 {
                return Err(SnapshotError::NoCpus { host: h.id });
            }
        }
        let mut vms = HashSet::with_capacity(self.vms.len());
        for vm in &self.vms {
            if !vms.insert(vm.id) {
                return Err(SnapshotError::DuplicateVm(vm.id));
            }
            if !is_pct(vm.cpu_usage_pct) {
                return Err(SnapshotError::BadVmUsage {
                    vm: vm.id,
                    value: vm.cpu_usage_pct,
                });
            }
            for (field, host) in [
                ("current host", vm.current_host),
                ("migration destination", vm.migrating_to),
            ] {
                if let Some(host) = host {
                    if !hosts.contains(&host) {
                        return Err(SnapshotError::UnknownHost {
                            vm: vm.id,
                            host,
                            field,
                        });
                    }
                }
            }
            match (vm.current_host, vm.migrating_to) {
                (Some(a), Some(b)) if a == b => {
                    return Err(SnapshotError::MigratesToItself { vm: vm.id, host: a })
                }
                (None, Some(_)) => return Err(SnapshotError::MigratesFromNowhere { vm: vm.id }),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn host(&self, id: HostUuid) -> Option<&Host> {
        self.hosts.iter().find(|h| h.id == id)
    }

    pub fn vm(&self, id: VmId) -> Option<&Vm> {
        self.vms.iter().find(|v| v.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip_through_ovirt_names() {
        let p = PolicyProperties::defaults_for(PolicyKind::PowerSaving);
        let map = p.to_ovirt();
        assert_eq!(map["LowUtilization"], "20");
        assert_eq!(map["SpmVmGrace"], "5");
        assert_eq!(
            PolicyProperties::from_ovirt(PolicyProperties::defaults_for(PolicyKind::None), &map).unwrap(),
            p
        );
        let json = serde_json::to_value(p).unwrap();
        assert_eq!(json["CpuOverCommitDurationMinutes"], 2);
        assert_eq!(json["HighVmCount"], 10);
    }

    #[test]
    fn bad_properties_are_rejected_by_name() {
        let base = PolicyProperties::defaults_for(PolicyKind::EvenlyDistributed);
        let mut m = BTreeMap::new();
        m.insert("HighUtilisation".to_owned(), "70".to_owned());
        assert_eq!(
            PolicyProperties::from_ovirt(base, &m),
            Err(PolicyError::UnknownProperty("HighUtilisation".into()))
        );
        let mut m = BTreeMap::new();
        m.insert("HighVmCount".to_owned(), "-1".to_owned());
        assert!(matches!(
            PolicyProperties::from_ovirt(base, &m),
            Err(PolicyError::BadValue { .. })
        ));
        assert_eq!(
            "power-saving".parse::<PolicyKind>(),
            Err(PolicyError::UnknownPolicy("power-saving".into()))
        );
        assert_eq!(
            "vm_evenly_distributed".parse::<PolicyKind>(),
            Ok(PolicyKind::VmEvenlyDistributed)
        );
    }

    #[test]
    fn power_saving_needs_low_below_high() {
        let mut p = ClusterPolicy::new(PolicyKind::PowerSaving);
        p.properties.low_utilization = 80;
        assert_eq!(
            p.validate(),
            Err(PolicyError::LowNotBelowHigh { low: 80, high: 80 })
        );
        p.properties.low_utilization = 79;
        assert_eq!(p.validate(), Ok(()));
        p.memory_overcommit_pct = 0;
        assert!(p.validate().is_err());
    }

    #[test]
    fn timestamps_saturate() {
        let t = Timestamp::from_unix_millis(1_000);
        assert_eq!((t + Duration::from_secs(2)).since(t), Duration::from_secs(2));
        assert_eq!(t.since(t + Duration::from_secs(2)), Duration::ZERO);
    }
}
