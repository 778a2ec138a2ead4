//! Node-side jobs: long verbs (migration, live merge, graceful shutdown) run in the background
//! and are tracked here, in memory — a job's effect is visible in QEMU and on storage, so a
//! restarted node that lost its job list loses no state, only the report.
//!
//! Each job publishes `|jobs|status|<jobID>` when it ends.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

use oxvirt_types::{JobId, VmId};

use crate::api::ApiError;
use crate::events::EventBus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Running,
    Done,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRecord {
    pub id: JobId,
    pub kind: &'static str,
    pub vm_id: Option<VmId>,
    pub status: JobStatus,
    pub result: Option<Value>,
    pub error: Option<Value>,
    pub started_at: f64,
    pub ended_at: Option<f64>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// At most this many finished jobs are remembered; the oldest are forgotten first.
const KEEP_FINISHED: usize = 256;

pub struct Jobs {
    jobs: Arc<Mutex<BTreeMap<JobId, JobRecord>>>,
    events: Arc<EventBus>,
}

impl Jobs {
    pub fn new(events: Arc<EventBus>) -> Self {
        Self {
            jobs: Arc::new(Mutex::new(BTreeMap::new())),
            events,
        }
    }

    /// Runs `work` in the background as a job; returns its id at once.
    pub fn start<F>(&self, kind: &'static str, vm_id: Option<VmId>, work: F) -> JobId
    where
        F: Future<Output = Result<Value, ApiError>> + Send + 'static,
    {
        let id = JobId::new_random();
        let rec = JobRecord {
            id,
            kind,
            vm_id,
            status: JobStatus::Running,
            result: None,
            error: None,
            started_at: now(),
            ended_at: None,
        };
        self.jobs.lock().expect("jobs").insert(id, rec);
        let (jobs, events) = (self.jobs.clone(), self.events.clone());
        tokio::spawn(async move {
            let outcome = work.await;
            let snapshot = {
                let mut jobs = jobs.lock().expect("jobs");
                let Some(rec) = jobs.get_mut(&id) else { return };
                rec.ended_at = Some(now());
                match outcome {
                    Ok(v) => {
                        rec.status = JobStatus::Done;
                        rec.result = Some(v);
                    }
                    Err(e) => {
                        tracing::warn!(job_id = %id, kind, error = %e, "job failed");
                        rec.status = JobStatus::Failed;
                        rec.error = Some(json!({ "code": e.code.code(), "message": e.message }));
                    }
                }
                let snapshot = rec.clone();
                let finished: Vec<JobId> = jobs
                    .values()
                    .filter(|r| r.status != JobStatus::Running)
                    .map(|r| r.id)
                    .collect();
                if finished.len() > KEEP_FINISHED {
                    let mut by_end: Vec<(f64, JobId)> = finished
                        .iter()
                        .map(|j| (jobs[j].ended_at.unwrap_or(0.0), *j))
                        .collect();
                    by_end.sort_by(|a, b| a.0.total_cmp(&b.0));
                    for (_, old) in by_end.iter().take(finished.len() - KEEP_FINISHED) {
                        jobs.remove(old);
                    }
                }
                snapshot
            };
            events.publish(
                format!("|jobs|status|{id}"),
                serde_json::to_value(&snapshot).expect("job"),
            );
        });
        id
    }

    pub fn list(&self) -> Vec<JobRecord> {
        self.jobs.lock().expect("jobs").values().cloned().collect()
    }

    pub fn get(&self, id: JobId) -> Option<JobRecord> {
        self.jobs.lock().expect("jobs").get(&id).cloned()
    }
}
