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
