//! The domain monitor (VDSM's `DomainMonitor`): each interval, for every domain of the connected
//! pool, the metadata is read bypassing the page cache and timed, and whether this host holds its
//! host id there is noted. The last result per domain is `Host.getStorageRepoStats`; a domain
//! turning valid or invalid, or its host id being acquired or lost, is published as the event
//! `|storage|domain_monitor|<sdUUID>`, so the engine learns within one interval that a host lost
//! (or regained) a domain.
//!
//! A check that hangs (a dead NFS server) must not hold up the others: each check runs on its
//! own blocking thread, a domain whose check still runs is not checked again, and a check
//! running longer than [`STUCK_AFTER`] intervals reports the domain invalid at once.
//!
//! Invariant: the monitor only reads; it never changes a domain or a lease.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oxvirt_types::SdUuid;
use serde_json::{json, Value};

/// Intervals after which a check that has not returned makes its domain invalid.
pub const STUCK_AFTER: u32 = 2;

/// One check's outcome for one domain.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainCheck {
    pub valid: bool,
    /// How long the uncached metadata read took.
    pub delay: Duration,
    pub error: Option<String>,
    /// This host holds a valid host id in the domain's lockspace.
    pub acquired: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    check: DomainCheck,
    /// When the check started (a stall: when the stalled check started).
    from: Instant,
    at: Instant,
}

/// The latest check of every monitored domain, and the checks in flight.
#[derive(Default)]
pub struct DomainMonitor {
    last: Mutex<BTreeMap<SdUuid, Entry>>,
    running: Mutex<HashSet<SdUuid>>,
    /// When each running check started.
    started: Mutex<BTreeMap<SdUuid, Instant>>,
}

impl DomainMonitor {
    /// Claims `sd` for a new check; `false` while its previous one still runs.
    pub fn begin(&self, sd: SdUuid, now: Instant) -> bool {
        let fresh = self.running.lock().expect("monitor").insert(sd);
        if fresh {
            self.started.lock().expect("monitor").insert(sd, now);
        }
        fresh
    }

    /// Stores a finished check; returns it when it changes what the engine acts on (validity
    /// or the host id), or is the domain's first.
    pub fn finish(&self, sd: SdUuid, check: DomainCheck, now: Instant) -> Option<DomainCheck> {
        self.running.lock().expect("monitor").remove(&sd);
        let from = self.started.lock().expect("monitor").remove(&sd).unwrap_or(now);
        self.record(sd, check, from, now)
    }

    /// Domains whose check has run for longer than `STUCK_AFTER` intervals: each is recorded
    /// invalid (once per stall) and returned with its new state.
    pub fn stuck(&self, interval: Duration, now: Instant) -> Vec<(SdUuid, DomainCheck)> {
        let stalled: Vec<(SdUuid, Instant, Duration)> = self
            .started
            .lock()
            .expect("monitor")
            .iter()
            .map(|(sd, t)| (*sd, *t, now.saturating_duration_since(*t)))
            .filter(|(_, _, running)| *running > interval * STUCK_AFTER)
            .collect();
        let mut out = Vec::new();
        for (sd, from, running) in stalled {
            let acquired = self
                .last
                .lock()
                .expect("monitor")
                .get(&sd)
                .is_some_and(|e| e.check.acquired);
            let check = DomainCheck {
                valid: false,
                delay: running,
                error: Some(format!("the metadata read has not returned for {running:?}")),
                acquired,
            };
            if let Some(c) = self.record(sd, check, from, now) {
                out.push((sd, c));
            }
        }
        out
    }

    fn record(&self, sd: SdUuid, check: DomainCheck, from: Instant, now: Instant) -> Option<DomainCheck> {
        let mut last = self.last.lock().expect("monitor");
        let changed = last
            .get(&sd)
            .is_none_or(|e| e.check.valid != check.valid || e.check.acquired != check.acquired);
        last.insert(
            sd,
            Entry {
                check: check.clone(),
                from,
                at: now,
            },
        );
        changed.then_some(check)
    }

    /// The last finished check of `sd`: valid or not, and when it started (what the resume
    /// of VMs stopped on storage errors goes by: see [`crate::vm::io_errors`]).
    pub fn seen(&self, sd: SdUuid) -> Option<crate::vm::io_errors::DomainSeen> {
        self.last
            .lock()
            .expect("monitor")
            .get(&sd)
            .map(|e| crate::vm::io_errors::DomainSeen {
                valid: e.check.valid,
                checked_from: e.from,
            })
    }

    /// Forgets domains no longer monitored (left the pool, or the pool was disconnected).
    pub fn retain(&self, keep: &[SdUuid]) {
        self.last
            .lock()
            .expect("monitor")
            .retain(|sd, _| keep.contains(sd));
    }

    /// `Host.getStorageRepoStats`, in VDSM's shape (times in seconds, as strings).
    pub fn repo_stats(&self, now: Instant) -> Value {
        let last = self.last.lock().expect("monitor");
        let mut out = serde_json::Map::new();
        for (sd, e) in last.iter() {
            out.insert(
                sd.to_string(),
                stat_json(&e.check, now.saturating_duration_since(e.at)),
            );
        }
        Value::Object(out)
    }
}

/// One domain's entry as VDSM reports it (`code` 0 when valid, 200 — VDSM's "domain monitor
/// failure" class — otherwise).
pub fn stat_json(c: &DomainCheck, age: Duration) -> Value {
    json!({
        "code": if c.valid { 0 } else { 200 },
        "valid": c.valid,
        "delay": format!("{:.6}", c.delay.as_secs_f64()),
        "lastCheck": format!("{:.1}", age.as_secs_f64()),
        "acquired": c.acquired,
        "actual": true,
        "version": 5,
        "error": c.error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(acquired: bool) -> DomainCheck {
        DomainCheck {
            valid: true,
            delay: Duration::from_micros(300),
            error: None,
            acquired,
        }
    }

    #[test]
    fn only_changes_that_matter_are_reported() {
        let m = DomainMonitor::default();
        let sd = SdUuid::new_random();
        let t0 = Instant::now();
        assert!(m.begin(sd, t0));
        assert!(!m.begin(sd, t0), "a running check is not started twice");
        assert_eq!(
            m.finish(sd, ok(true), t0),
            Some(ok(true)),
            "the first result is news"
        );
        assert!(m.begin(sd, t0));
        assert_eq!(
            m.finish(sd, ok(true), t0),
            None,
            "same state, other delay: no news"
        );
        let bad = DomainCheck {
            valid: false,
            delay: Duration::ZERO,
            error: Some("bad checksum".into()),
            acquired: true,
        };
        assert!(m.begin(sd, t0));
        assert_eq!(m.finish(sd, bad.clone(), t0), Some(bad));
        assert!(m.begin(sd, t0));
        assert!(m.finish(sd, ok(false), t0).is_some(), "host id lost is news");
        let t1 = t0 + Duration::from_millis(200);
        assert!(m.begin(sd, t1));
        m.finish(sd, ok(false), t1 + Duration::from_millis(300));
        let seen = m.seen(sd).unwrap();
        assert!(seen.valid);
        assert_eq!(seen.checked_from, t1, "a check counts from when it started");
        let st = m.repo_stats(t0 + Duration::from_millis(1500));
        let e = &st[sd.to_string()];
        assert_eq!(
            (e["valid"].as_bool(), e["acquired"].as_bool()),
            (Some(true), Some(false))
        );
        assert_eq!(e["lastCheck"], "1.0");
        assert_eq!(e["code"], 0);
        m.retain(&[]);
        assert_eq!(m.repo_stats(t0), json!({}));
    }

    #[test]
    fn a_check_that_hangs_makes_its_domain_invalid_once() {
        let m = DomainMonitor::default();
        let sd = SdUuid::new_random();
        let t0 = Instant::now();
        let interval = Duration::from_secs(1);
        assert!(m.begin(sd, t0));
        m.finish(sd, ok(true), t0);
        assert!(m.begin(sd, t0));
        assert!(m.stuck(interval, t0 + Duration::from_millis(1900)).is_empty());
        let stuck = m.stuck(interval, t0 + Duration::from_secs(3));
        assert_eq!(stuck.len(), 1);
        assert!(!stuck[0].1.valid && stuck[0].1.acquired, "{stuck:?}");
        assert!(
            m.stuck(interval, t0 + Duration::from_secs(4)).is_empty(),
            "reported once"
        );
        // When the read finally returns, the result counts again.
        assert_eq!(
            m.finish(sd, ok(true), t0 + Duration::from_secs(5)),
            Some(ok(true))
        );
    }
}
