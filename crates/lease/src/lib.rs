//! Leases on shared storage: delta leases for host ids and Disk Paxos leases for resources, in
//! sanlock's on-disk format.
//!
//! Architecture invariant: this crate knows nothing of storage domains, pools or async
//! runtimes; it works on a sector-I/O trait and a clock trait.
