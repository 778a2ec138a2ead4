//! Leases on shared storage in sanlock 3.8's on-disk format: delta leases for host ids
//! (Chockler & Malkhi) and Disk Paxos leases for resources (Gafni & Lamport), embedded in the
//! node instead of a sanlock daemon, with self-fencing in userspace.
//!
//! - [`format`]: the on-disk records and checksums, byte-compatible with sanlock.
//! - [`delta`], [`paxos`]: the algorithms as sans-IO state machines ([`machine`]).
//! - [`lockspace`]: the threaded handle the node uses — host id, renewal, liveness of other
//!   hosts, fencing notification, resource leases.
//! - [`direct`]: initialise, dump and read lease areas, like `sanlock direct`.
//! - [`io`], [`clock`]: O_DIRECT file I/O bounded by `io_timeout`, and clocks.
//! - [`sim`]: a simulated sector store and cluster for property tests of the same machines.
//!
//! Architecture invariant: this crate knows nothing of storage domains, pools or async
//! runtimes; it works on a sector-I/O trait and a clock trait.

pub mod clock;
pub mod delta;
pub mod direct;
mod error;
pub mod format;
pub mod hosts;
pub mod io;
pub mod lockspace;
pub mod machine;
pub mod paxos;
pub mod sim;
pub mod timeouts;

pub use clock::{Clock, SimClock, SystemClock};
pub use error::LeaseError;
pub use hosts::HostStatus;
pub use lockspace::{AcquireOptions, FenceEvent, FenceReason, Lockspace, LockspaceConfig, ResourceLease};
pub use paxos::{LeaseMode, OwnerWait};
pub use timeouts::Timeouts;

#[cfg(test)]
mod tests {
    fn shareable<T: Send + Sync>() {}

    #[test]
    fn handles_can_be_shared_between_threads() {
        shareable::<crate::Lockspace>();
        shareable::<crate::ResourceLease>();
        shareable::<crate::io::DirectFile>();
    }
}
