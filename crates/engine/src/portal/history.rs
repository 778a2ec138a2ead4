//! Recent CPU and memory figures of hosts and VMs, for the portal's charts.
//!
//! A small sampler task records, every `interval`, each up host's figures from monitoring
//! ([`App::host_rt`], no node call) and each VM's from one `Host.getAllVmStats` per up host (so a
//! thousand VMs cost as many node calls as there are hosts). VM CPU is derived from the QEMU
//! process's CPU time between two samples, as a share of the VM's vCPUs.
//!
//! Invariants: memory is bounded — at most [`POINTS`] samples per object, and objects not
//! sampled for [`FORGET_AFTER_MS`] are dropped; times come from the database's injected clock,
//! so the arithmetic is tested with simulated times. This is a view, not state: a restarted
//! engine starts with empty charts.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::app::App;
use crate::daemon::Engine;
use crate::db::{HostFilter, ListQuery};
use crate::model::{HostStatus, HostUuid, VmId};

/// Samples kept per host or VM (six minutes at the default two-second interval).
pub const POINTS: usize = 180;
/// A host or VM not sampled for this long is forgotten.
pub const FORGET_AFTER_MS: i64 = 10 * 60 * 1000;

/// One sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Milliseconds since the epoch (the database clock).
    pub t: i64,
    /// CPU use in percent of the object's CPUs (0–100).
    pub cpu: f32,
    /// Memory in use, MiB.
    pub mem: f32,
    /// Memory the object has, MiB (host RAM, VM memory size).
    pub mem_total: f32,
}

#[derive(Debug, Default)]
struct Series {
    points: VecDeque<Point>,
}

impl Series {
    fn push(&mut self, p: Point) {
        if self.points.back().is_some_and(|l| l.t >= p.t) {
            return; // never out of order (a clock step backwards drops the sample)
        }
        if self.points.len() == POINTS {
            self.points.pop_front();
        }
        self.points.push_back(p);
    }
    fn last_t(&self) -> i64 {
        self.points.back().map_or(i64::MIN, |p| p.t)
    }
}

#[derive(Debug, Default)]
struct VmSeries {
    series: Series,
    /// The QEMU process's CPU time (ms) and when it was read, for the next delta.
    last_cpu: Option<(i64, u64)>,
}

/// What one VM's stats say (from `Host.getAllVmStats`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VmSample {
    pub cpu_ms: u64,
    pub vcpus: u32,
    pub rss_bytes: u64,
    pub memory_mib: u64,
}

impl VmSample {
    /// Reads one entry of `Host.getAllVmStats`; `None` when it carries no stats.
    pub fn from_node(entry: &Value) -> Option<(VmId, VmSample)> {
        let id = entry["vmID"].as_str()?.parse().ok()?;
        let s = entry.get("stats").filter(|s| s.is_object())?;
        let vcpus = s["vcpu_ms"].as_array().map_or(1, |a| a.len().max(1)) as u32;
        Some((
            id,
            VmSample {
                cpu_ms: s["cpu_user_ms"].as_u64()? + s["cpu_system_ms"].as_u64().unwrap_or(0),
                vcpus,
                rss_bytes: s["rss_bytes"].as_u64().unwrap_or(0),
                memory_mib: s["memory_mib"].as_u64().unwrap_or(0),
            },
        ))
    }
}

/// The bounded history of every host and VM.
#[derive(Debug, Default)]
pub struct History {
    hosts: Mutex<HashMap<HostUuid, Series>>,
    vms: Mutex<HashMap<VmId, VmSeries>>,
}

const MIB: f32 = (1u64 << 20) as f32;

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record_host(&self, id: HostUuid, t: i64, cpu_pct: f64, mem_total_mib: u64, mem_free_mib: u64) {
        let p = Point {
            t,
            cpu: cpu_pct.clamp(0.0, 100.0) as f32,
            mem: mem_total_mib.saturating_sub(mem_free_mib) as f32,
            mem_total: mem_total_mib as f32,
        };
        self.hosts.lock().expect("history").entry(id).or_default().push(p);
    }

    /// Records a VM sample; the first one of a VM gives no CPU figure yet (it needs a delta).
    pub fn record_vm(&self, id: VmId, t: i64, s: VmSample) {
        let mut vms = self.vms.lock().expect("history");
        let e = vms.entry(id).or_default();
        let cpu = match e.last_cpu {
            // A lower CPU time means a new QEMU process (restart, migration): start over.
            Some((t0, c0)) if t > t0 && s.cpu_ms >= c0 => {
                let wall = (t - t0) as f64 * f64::from(s.vcpus);
                Some(((s.cpu_ms - c0) as f64 * 100.0 / wall).clamp(0.0, 100.0) as f32)
            }
            _ => None,
        };
        e.last_cpu = Some((t, s.cpu_ms));
        if let Some(cpu) = cpu {
            e.series.push(Point {
                t,
                cpu,
                mem: s.rss_bytes as f32 / MIB,
                mem_total: s.memory_mib as f32,
            });
        }
    }

    /// Drops objects not sampled since `now - FORGET_AFTER_MS`.
    pub fn forget_stale(&self, now: i64) {
        let horizon = now - FORGET_AFTER_MS;
        self.hosts
            .lock()
            .expect("history")
            .retain(|_, s| s.last_t() >= horizon);
        self.vms
            .lock()
            .expect("history")
            .retain(|_, s| s.series.last_t() >= horizon || s.last_cpu.is_some_and(|(t, _)| t >= horizon));
    }

    pub fn host(&self, id: HostUuid) -> Vec<Point> {
        self.hosts
            .lock()
            .expect("history")
            .get(&id)
            .map(|s| s.points.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn vm(&self, id: VmId) -> Vec<Point> {
        self.vms
            .lock()
            .expect("history")
            .get(&id)
            .map(|s| s.series.points.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The latest point of each VM (list pages show current figures without node calls).
    pub fn vm_latest(&self) -> HashMap<VmId, Point> {
        self.vms
            .lock()
            .expect("history")
            .iter()
            .filter_map(|(id, s)| s.series.points.back().map(|p| (*id, *p)))
            .collect()
    }

    /// How many objects and points are kept (for tests and the RSS budget).
    pub fn size(&self) -> (usize, usize) {
        let h = self.hosts.lock().expect("history");
        let v = self.vms.lock().expect("history");
        (
            h.len() + v.len(),
            h.values().map(|s| s.points.len()).sum::<usize>()
                + v.values().map(|s| s.series.points.len()).sum::<usize>(),
        )
    }

    /// One sampling round: hosts from monitoring, VMs from their hosts (concurrently, each
    /// call bounded by `timeout`).
    pub async fn sample(&self, app: &App, timeout: Duration) {
        let q = ListQuery::filtered(HostFilter {
            status: vec![HostStatus::Up],
            ..Default::default()
        });
        let hosts = match app.db.host_list(&q).await {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = %e, "portal sampler: cannot list hosts");
                return;
            }
        };
        let now = app.db.now().as_millis();
        for h in &hosts {
            let rt = app.host_rt(h.id);
            if rt.mem_total_mib > 0 {
                self.record_host(h.id, now, rt.cpu_load_pct, rt.mem_total_mib, rt.mem_free_mib);
            }
        }
        let calls = hosts
            .iter()
            .filter_map(|h| app.client(h).ok())
            .map(|c| async move {
                match tokio::time::timeout(timeout, c.call("Host.getAllVmStats", json!({}))).await {
                    Ok(Ok(v)) => Some(v),
                    Ok(Err(e)) => {
                        tracing::debug!(host = %c.name, error = %e, "portal sampler: no VM stats");
                        None
                    }
                    Err(_) => None,
                }
            });
        let replies = futures_util::future::join_all(calls).await;
        let now = app.db.now().as_millis();
        for v in replies.into_iter().flatten() {
            for e in v.as_array().into_iter().flatten() {
                if let Some((id, s)) = VmSample::from_node(e) {
                    self.record_vm(id, now, s);
                }
            }
        }
        self.forget_stale(now);
    }
}

/// Samples every `interval` until the engine is gone.
pub(crate) async fn run_sampler(engine: Weak<Engine>, history: Arc<History>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(e) = engine.upgrade() else { return };
        let app = e.app().clone();
        drop(e);
        history.sample(&app, interval.max(Duration::from_secs(1))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cpu_ms: u64) -> VmSample {
        VmSample {
            cpu_ms,
            vcpus: 2,
            rss_bytes: 64 << 20,
            memory_mib: 128,
        }
    }

    #[test]
    fn vm_cpu_is_the_share_of_its_vcpus_between_samples() {
        let h = History::new();
        let vm = VmId::new_random();
        h.record_vm(vm, 1_000, sample(500));
        assert!(h.vm(vm).is_empty(), "one sample gives no rate");
        // 1000 ms of CPU in 1000 ms of wall time on 2 vCPUs: 50 %.
        h.record_vm(vm, 2_000, sample(1_500));
        let p = h.vm(vm);
        assert_eq!(p.len(), 1);
        assert!((p[0].cpu - 50.0).abs() < 0.01, "{p:?}");
        assert_eq!((p[0].mem, p[0].mem_total), (64.0, 128.0));
        // A new QEMU process (CPU time went down) restarts the delta instead of going negative.
        h.record_vm(vm, 3_000, sample(10));
        assert_eq!(h.vm(vm).len(), 1);
        h.record_vm(vm, 4_000, sample(10));
        assert_eq!(h.vm(vm)[1].cpu, 0.0);
    }

    #[test]
    fn history_is_bounded_ordered_and_forgets() {
        let h = History::new();
        let host = HostUuid::new_random();
        for i in 0..(POINTS as i64 + 50) {
            h.record_host(host, i * 2_000, 150.0, 1024, 256);
        }
        let p = h.host(host);
        assert_eq!(p.len(), POINTS);
        assert_eq!(p[0].t, 50 * 2_000, "the oldest samples went first");
        assert_eq!((p[0].cpu, p[0].mem), (100.0, 768.0), "CPU clamps to 100 %");
        h.record_host(host, 0, 1.0, 1024, 256);
        assert_eq!(h.host(host).len(), POINTS, "an out-of-order sample is dropped");
        let last = p.last().unwrap().t;
        h.forget_stale(last + FORGET_AFTER_MS);
        assert_eq!(h.size().0, 1);
        h.forget_stale(last + FORGET_AFTER_MS + 1);
        assert_eq!(h.size(), (0, 0));
    }

    #[test]
    fn node_stats_entries_parse() {
        let id = VmId::new_random();
        let e = json!({"vmID": id.to_string(), "status": {"state": "up"},
            "stats": {"cpu_user_ms": 70, "cpu_system_ms": 30, "vcpu_ms": [1, 2, 3], "rss_bytes": 5, "memory_mib": 256}});
        let (got, s) = VmSample::from_node(&e).unwrap();
        assert_eq!(got, id);
        assert_eq!(
            s,
            VmSample {
                cpu_ms: 100,
                vcpus: 3,
                rss_bytes: 5,
                memory_mib: 256
            }
        );
        assert!(VmSample::from_node(&json!({"vmID": id.to_string(), "stats": null})).is_none());
        assert!(VmSample::from_node(&json!({"vmID": "nope", "stats": {}})).is_none());
    }
}
