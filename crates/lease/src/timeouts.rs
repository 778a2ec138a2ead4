//! Every timeout derives from one `io_timeout` N (sanlock's `timeouts.c`) plus the fence margin.
//!
//! | name | formula | meaning |
//! |---|---|---|
//! | renewal | 2N | a delta lease is renewed this often |
//! | renewal warn | 6N | renewal is late; logged |
//! | renewal fail | 8N | the holder stops using its leases (self-fencing starts) |
//! | host dead | 8N + max(M, N) | others may take the host's leases (M: fence margin) |
//! | delta short delay | 2N | wait after writing a delta lease before re-reading it |
//! | delta large delay | max(8N + M, 2N + 6N) | wait before taking a host id another host wrote |
//!
//! Why the margin is at least N: a holder counts a renewal as successful from the moment it
//! issued the write, but the write may land up to N later. An observer that saw no change up to
//! its read is therefore only sure the holder issued no successful renewal before that read
//! minus N; the holder's lease may outlive the observer's last look by up to N.
//! (With sanlock's M = 60 s and N ≤ 60 s this changes nothing.)
//!
//! In sanlock M is the watchdog's fire timeout, a constant 60 s: a host that stops renewing is
//! reset by the watchdog at most 60 s after its leases expire. oxvirt fences in userspace (kills
//! the lease holders and confirms their exit), so M may be smaller, but only if every host in
//! the lockspace is an oxvirt host with that margin: a host that cannot confirm its lease holders
//! are gone within M after 8N must not share the lockspace. A foreign sanlock host needs M = 60 s.
//! The N used for another host's deadlines is the one it wrote in its delta lease, never ours.
//!
//! So M must cover, all at once: the time our fence needs to kill the lease holders (QEMU) and
//! confirm they exited; the clocks' rate difference over 8N (monotonic clocks of healthy
//! machines differ by far less than 0.1%, i.e. < 10 ms over 8 s); and nothing else, because the
//! observer counts from when it saw the change, never from the writer's timestamp. A host whose
//! whole machine freezes (suspend, a paused VM) freezes its lease holders too and fences the
//! moment it resumes, since deadlines are measured on `CLOCK_BOOTTIME` and every lease write
//! first checks them; what no userspace fence covers is the node process alone being stopped
//! while QEMU runs on, which needs a hardware or kernel watchdog as in sanlock.

use std::time::Duration;

/// sanlock's watchdog fire timeout, the fence margin compatible with sanlock hosts.
pub const SANLOCK_FENCE_MARGIN: Duration = Duration::from_secs(60);
/// oVirt's default io_timeout.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The timeouts of one lockspace, from its `io_timeout` and fence margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub io_timeout: Duration,
    pub fence_margin: Duration,
}

impl Timeouts {
    pub fn new(io_timeout: Duration, fence_margin: Duration) -> Timeouts {
        Timeouts {
            io_timeout,
            fence_margin,
        }
    }

    /// sanlock's timeouts: margin 60 s.
    pub fn sanlock(io_timeout: Duration) -> Timeouts {
        Timeouts::new(io_timeout, SANLOCK_FENCE_MARGIN)
    }

    /// N as written on disk: whole seconds, rounded up, at least 1 (others then wait longer,
    /// never shorter, than we need).
    pub fn disk_io_timeout(&self) -> u16 {
        let ms = self.io_timeout.as_millis().max(1);
        ms.div_ceil(1000).min(u16::MAX as u128) as u16
    }

    pub fn renewal(&self) -> Duration {
        self.io_timeout * 2
    }

    pub fn renewal_warn(&self) -> Duration {
        self.io_timeout * 6
    }

    pub fn renewal_fail(&self) -> Duration {
        self.io_timeout * 8
    }

    /// The margin actually added to 8N: at least N, because a renewal issued just before an
    /// observer's read may land up to N later (see the module docs).
    fn margin_for(&self, n: Duration) -> Duration {
        self.fence_margin.max(n)
    }

    /// Our own host-dead time.
    pub fn host_dead(&self) -> Duration {
        self.renewal_fail() + self.margin_for(self.io_timeout)
    }

    /// The N of another host from the io_timeout in its record (0: use ours).
    pub fn other_io_timeout(&self, other_secs: u16) -> Duration {
        if other_secs == 0 {
            self.io_timeout
        } else {
            Duration::from_secs(u64::from(other_secs))
        }
    }

    pub fn other_renewal_fail(&self, other_secs: u16) -> Duration {
        self.other_io_timeout(other_secs) * 8
    }

    /// When another host whose record says `other_secs` is dead: 8N(other) + M.
    pub fn other_host_dead(&self, other_secs: u16) -> Duration {
        self.other_renewal_fail(other_secs) + self.margin_for(self.other_io_timeout(other_secs))
    }

    /// 2N, with N the larger of ours and the other host's.
    pub fn delta_short_delay(&self, other_secs: u16) -> Duration {
        self.other_io_timeout(other_secs).max(self.io_timeout) * 2
    }

    pub fn delta_large_delay(&self, other_secs: u16) -> Duration {
        let n = self.other_io_timeout(other_secs);
        self.other_host_dead(other_secs).max(n * 2 + n * 6)
    }

    /// Retry interval of a failed renewal, and the ceiling of the random back-off between
    /// aborted ballots (sanlock: 1 s).
    pub fn owner_poll(&self) -> Duration {
        self.io_timeout.min(Duration::from_secs(1))
    }

    /// How often a Paxos acquire re-reads the owner's delta lease while waiting for it to die:
    /// the sooner it sees the owner's last renewal, the sooner it may take over.
    pub fn watch_poll(&self) -> Duration {
        (self.io_timeout / 4).min(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_match_sanlock_for_n_10() {
        let t = Timeouts::sanlock(Duration::from_secs(10));
        assert_eq!(t.renewal(), Duration::from_secs(20));
        assert_eq!(t.renewal_warn(), Duration::from_secs(60));
        assert_eq!(t.renewal_fail(), Duration::from_secs(80));
        assert_eq!(t.host_dead(), Duration::from_secs(140));
        assert_eq!(t.delta_large_delay(10), Duration::from_secs(140));
        assert_eq!(t.delta_short_delay(0), Duration::from_secs(20));
    }

    #[test]
    fn other_hosts_n_comes_from_their_record() {
        let t = Timeouts::new(Duration::from_secs(1), Duration::from_secs(2));
        assert_eq!(t.other_host_dead(10), Duration::from_secs(90));
        assert_eq!(t.other_host_dead(0), Duration::from_secs(10));
        assert_eq!(t.other_host_dead(1), Duration::from_secs(10));
        let t = Timeouts::new(Duration::from_secs(1), Duration::ZERO);
        assert_eq!(t.host_dead(), Duration::from_secs(9));
    }

    #[test]
    fn disk_io_timeout_rounds_up() {
        let t = Timeouts::new(Duration::from_millis(300), Duration::ZERO);
        assert_eq!(t.disk_io_timeout(), 1);
        let t = Timeouts::new(Duration::from_millis(1500), Duration::ZERO);
        assert_eq!(t.disk_io_timeout(), 2);
    }
}
