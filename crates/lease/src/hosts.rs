//! The liveness view of other hosts, derived only from watching their delta-lease timestamps
//! change on our own monotonic clock (sanlock's `check_other_leases` and `get_host_flag`).
//!
//! Clocks are never compared across hosts: a timestamp is just a value that changes when its
//! owner renews. For each host id we remember when we first looked (`first_check`), when we
//! last looked (`last_check`) and when we last saw the record change (`last_live`).
//!
//! ```text
//!            first look         change seen                     no change for ...
//! Unknown ──────────────► (no change yet: Unknown) ──► Live ──► 8N: Fail ──► 8N+M: Dead
//! timestamp 0 at any time: Free
//! ```
//!
//! Invariant: a record that fails its checksum or names another lockspace never updates the
//! owner fields; it only counts as activity (it may be a write in progress), so a corrupt
//! record can delay "dead" but never make a host look free.

use std::time::Duration;

use crate::format::{LeaderRecord, Name, DELTA_MAGIC, LEADER_CHECKSUM_LEN, SECTOR_SIZE};
use crate::timeouts::Timeouts;

/// What we know of another host, from our own observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostStatus {
    /// Never observed, or no change seen yet and not long enough to call it failed.
    Unknown,
    /// Its timestamp changed within its renewal-fail time (8N).
    Live,
    /// No change for more than 8N: it is (or should be) fencing itself.
    Fail,
    /// No change for more than 8N + M: its leases may be taken.
    Dead,
    /// Its delta lease is free (timestamp 0).
    Free,
}

/// One host id's row in the table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostObservation {
    pub owner_id: u64,
    pub owner_generation: u64,
    pub owner_name: Name,
    pub timestamp: u64,
    /// The io_timeout the owner wrote (seconds).
    pub io_timeout: u16,
    pub first_check: Duration,
    pub last_check: Duration,
    /// When we last saw the record change (equal to `first_check` until a change is seen).
    pub last_live: Duration,
    /// The last record read was not a valid delta lease of this lockspace.
    pub lease_bad: bool,
}

impl HostObservation {
    /// True while no change has been seen since the first look.
    pub fn unchanged_since_first_look(&self) -> bool {
        self.first_check == self.last_live
    }
}

/// Liveness of every host id in one lockspace.
#[derive(Debug, Clone)]
pub struct HostTable {
    space: Name,
    hosts: Vec<Option<HostObservation>>,
}

impl HostTable {
    pub fn new(space: Name, max_hosts: u64) -> HostTable {
        HostTable {
            space,
            hosts: vec![None; max_hosts as usize],
        }
    }

    pub fn max_hosts(&self) -> u64 {
        self.hosts.len() as u64
    }

    /// Takes in a read of the whole lockspace made at `now`.
    pub fn observe(&mut self, now: Duration, lockspace: &[u8]) {
        for (i, slot) in self.hosts.iter_mut().enumerate() {
            let start = i * SECTOR_SIZE;
            if start + SECTOR_SIZE > lockspace.len() {
                break;
            }
            let sector = &lockspace[start..start + SECTOR_SIZE];
            let rec = LeaderRecord::decode(sector);
            let bad = rec.magic != DELTA_MAGIC
                || rec.space_name != self.space
                || crate::format::checksum(&sector[..LEADER_CHECKSUM_LEN]) != rec.checksum;
            let first = slot.is_none();
            let obs = slot.get_or_insert_with(|| HostObservation {
                first_check: now,
                ..HostObservation::default()
            });
            obs.last_check = now;
            obs.lease_bad = bad;
            let changed = obs.owner_id != rec.owner_id
                || obs.owner_generation != rec.owner_generation
                || obs.timestamp != rec.timestamp;
            if !changed && !first {
                continue;
            }
            if !bad {
                obs.owner_id = rec.owner_id;
                obs.owner_generation = rec.owner_generation;
                obs.owner_name = rec.resource_name;
                obs.io_timeout = rec.io_timeout;
            }
            obs.timestamp = rec.timestamp;
            obs.last_live = now;
        }
    }

    pub fn get(&self, host_id: u64) -> Option<&HostObservation> {
        if host_id == 0 {
            return None;
        }
        self.hosts.get(host_id as usize - 1).and_then(|h| h.as_ref())
    }

    /// The status of `host_id` at `now`, as seen by host `our_host_id`.
    pub fn status(&self, host_id: u64, now: Duration, our_host_id: u64, t: &Timeouts) -> HostStatus {
        let Some(h) = self.get(host_id) else {
            return HostStatus::Unknown;
        };
        if h.timestamp == 0 && !h.lease_bad {
            return HostStatus::Free;
        }
        if host_id == our_host_id {
            return HostStatus::Live;
        }
        let since = now.saturating_sub(h.last_live);
        let fail = t.other_renewal_fail(h.io_timeout);
        let dead = t.other_host_dead(h.io_timeout);
        if since <= fail && h.unchanged_since_first_look() {
            HostStatus::Unknown
        } else if since <= fail {
            HostStatus::Live
        } else if since > dead {
            HostStatus::Dead
        } else {
            HostStatus::Fail
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::initial_delta_record;

    fn lockspace(space: &Name, ts: &[(u64, u64)]) -> Vec<u8> {
        let mut buf = vec![0u8; 4 * SECTOR_SIZE];
        for i in 0..4u64 {
            let mut r = initial_delta_record(space, 1);
            if let Some(&(_, t)) = ts.iter().find(|(h, _)| *h == i + 1) {
                r.owner_id = i + 1;
                r.owner_generation = 1;
                r.timestamp = t;
            }
            r.encode_into(&mut buf[i as usize * SECTOR_SIZE..]);
        }
        buf
    }

    #[test]
    fn statuses_follow_observed_changes() {
        let space = Name::new("ls").unwrap();
        let t = Timeouts::new(Duration::from_secs(1), Duration::from_secs(2));
        let mut table = HostTable::new(space, 4);
        let s = Duration::from_secs;
        table.observe(s(100), &lockspace(&space, &[(2, 50), (3, 60)]));
        assert_eq!(table.status(2, s(100), 1, &t), HostStatus::Unknown);
        assert_eq!(table.status(4, s(100), 1, &t), HostStatus::Free);
        table.observe(s(102), &lockspace(&space, &[(2, 52), (3, 60)]));
        assert_eq!(table.status(2, s(102), 1, &t), HostStatus::Live);
        assert_eq!(table.status(3, s(102), 1, &t), HostStatus::Unknown);
        // Host 3 never changes: unknown until 8N, fail until 8N+M, then dead.
        table.observe(s(109), &lockspace(&space, &[(2, 59), (3, 60)]));
        assert_eq!(table.status(3, s(109), 1, &t), HostStatus::Fail);
        assert_eq!(table.status(3, s(111), 1, &t), HostStatus::Dead);
    }

    #[test]
    fn corrupt_record_is_never_free() {
        let space = Name::new("ls").unwrap();
        let t = Timeouts::new(Duration::from_secs(1), Duration::ZERO);
        let mut table = HostTable::new(space, 4);
        let mut buf = lockspace(&space, &[(2, 50)]);
        // Zero the timestamp without fixing the checksum: a torn write, not a release.
        buf[SECTOR_SIZE + 152..SECTOR_SIZE + 160].fill(0);
        table.observe(Duration::from_secs(10), &buf);
        assert_ne!(table.status(2, Duration::from_secs(10), 1, &t), HostStatus::Free);
        assert!(table.get(2).unwrap().lease_bad);
    }
}
