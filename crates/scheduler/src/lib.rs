//! VM placement and load balancing for oxvirt, as pure functions of a [`Snapshot`] of a cluster.
//!
//! The engine builds the snapshot from its database (hosts with their latest statistics, VMs,
//! affinity groups, the cluster's scheduling policy), calls one of the entry points, and carries
//! out the decision. This crate does no I/O and reads no clock: time is an argument, so every
//! decision can be replayed and tested with a simulated cluster.
//!
//! - [`place()`] chooses a host for one VM ([`Purpose`]: start, migrate, HA restart,
//!   maintenance); [`place_many`] places several in turn (HA restarts by priority);
//!   [`plan_evacuation`] plans every VM off a host going into maintenance; [`filter_hosts`]
//!   explains, host by host, why a VM cannot run there.
//! - [`balance()`] is one periodic round of load balancing under the cluster's policy.
//!
//! How a placement is made: [`filter`] (hard constraints, each rejection with a reason), then
//! [`weight`] (soft preferences, lower cost wins). Invariants, tested by property tests on
//! random clusters: no decision puts a VM on a host any filter rejects; a plan never promises a
//! host more memory than its limit; repeated balancing rounds settle (see [`mod@balance`]'s module
//! documentation for why).
//!
//! ```
//! use std::collections::BTreeSet;
//! use oxvirt_scheduler::*;
//! use oxvirt_types::{SdUuid, VmId};
//!
//! let sd = SdUuid::new_random();
//! let host = |name: &str, load: f64| Host {
//!     id: HostUuid::new_random(),
//!     name: name.into(),
//!     status: HostStatus::Up,
//!     cpu_cores: 8,
//!     cpu_threads: 16,
//!     cpu_load_pct: load,
//!     mem_total_mib: 32768,
//!     mem_free_mib: 30000,
//!     swap_free_mib: 0,
//!     mem_committed_mib: 0,
//!     max_scheduling_memory_mib: None,
//!     storage_domains: [sd].into(),
//!     networks: ["ovirtmgmt".to_owned()].into(),
//!     spm: false,
//!     vm_count: 0,
//!     pending: Pending::default(),
//! };
//! let vm = Vm {
//!     id: VmId::new_random(),
//!     name: "web1".into(),
//!     memory_mib: 2048,
//!     vcpus: 2,
//!     cpu_usage_pct: 20.0,
//!     current_host: None,
//!     migrating_to: None,
//!     pinned_hosts: BTreeSet::new(),
//!     storage_domains: [sd].into(),
//!     networks: ["ovirtmgmt".to_owned()].into(),
//!     highly_available: true,
//!     ha_priority: 50,
//!     migratable: true,
//!     last_migrated_at: None,
//! };
//! let snapshot = Snapshot {
//!     hosts: vec![host("h1", 70.0), host("h2", 10.0)],
//!     vms: vec![vm.clone()],
//!     affinity_groups: vec![],
//!     policy: ClusterPolicy::new(PolicyKind::EvenlyDistributed),
//! };
//!
//! let placement = place(&snapshot, vm.id, Purpose::Start).unwrap();
//! assert_eq!(placement.host_name, "h2"); // the less loaded host
//!
//! let now = Timestamp::from_unix_millis(1_700_000_000_000);
//! let (migrations, state) =
//!     balance(&snapshot, &BalanceState::default(), now, &BalanceParams::default()).unwrap();
//! assert!(migrations.is_empty()); // nothing runs yet; keep `state` for the next round
//! # let _ = state;
//! ```

pub mod balance;
pub mod filter;
pub mod model;
pub mod place;
mod view;
pub mod weight;

pub use balance::{balance, BalanceError, BalanceParams, BalanceReason, BalanceState, Migration, MoveRecord};
pub use filter::{Filter, HostVerdict, Rejection};
pub use model::{
    AffinityGroup, AffinityRule, ClusterPolicy, Host, HostStatus, HostUuid, Pending, Polarity, PolicyError,
    PolicyKind, PolicyProperties, Snapshot, SnapshotError, Timestamp, Vm,
};
pub use place::{
    filter_hosts, place, place_many, plan_evacuation, EvacuationPlan, Outcome, Placement, PlacementError,
    Purpose,
};
pub use weight::{HostScore, Weight};
