//! Jobs with their steps, and the event (audit) log.

use sqlx::any::AnyRow;

use crate::db::list::{order_and_page, ListQuery, Ref, Where};
use crate::db::sql::{Arg, RowExt, Sql};
use crate::db::{Conn, DbError};
use crate::model::*;
use crate::time::Timestamp;

// ---------------------------------------------------------------- jobs

const JOB_COLS: &str = "id, description, status, correlation_id, saga_id, auto_cleared, \
    started_at, ended_at, last_updated";

fn job_from_row(r: &AnyRow) -> Result<Job, DbError> {
    Ok(Job {
        id: r.parse("id")?,
        description: r.text("description")?,
        status: r.parse("status")?,
        correlation_id: r.opt_text("correlation_id")?,
        saga_id: r.opt_parse("saga_id")?,
        auto_cleared: r.flag("auto_cleared")?,
        started_at: r.ts("started_at")?,
        ended_at: r.opt_ts("ended_at")?,
        last_updated: r.ts("last_updated")?,
    })
}

const STEP_COLS: &str = "id, job_id, parent_id, number, step_type, description, status, started_at, ended_at";

fn step_from_row(r: &AnyRow) -> Result<JobStep, DbError> {
    Ok(JobStep {
        id: r.parse("id")?,
        job_id: r.parse("job_id")?,
        parent_id: r.opt_parse("parent_id")?,
        number: r.u32("number")?,
        step_type: r.parse("step_type")?,
        description: r.text("description")?,
        status: r.parse("status")?,
        started_at: r.ts("started_at")?,
        ended_at: r.opt_ts("ended_at")?,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub status: Vec<JobStatus>,
    pub correlation_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobSort {
    StartedAt,
    Status,
}

/// Starts a job (`started`) and returns it.
async fn job_start(
    c: &mut Conn<'_>,
    description: &str,
    correlation_id: Option<&str>,
    saga_id: Option<SagaId>,
) -> Result<Job, DbError> {
    let id = JobId::new_random();
    let mut q = Sql::new(&format!("INSERT INTO jobs ({JOB_COLS}) VALUES ("));
    q.arg(id.to_string())
        .push(", ")
        .arg(description)
        .push(", 'started', ")
        .arg(Arg::Text(correlation_id.map(str::to_string)))
        .push(", ")
        .arg(Arg::Text(saga_id.map(|s| s.to_string())))
        .push(", 1, ")
        .arg(c.now.as_millis())
        .push(", NULL, ")
        .arg(c.now.as_millis())
        .push(")");
    c.exec_as(&q, "job", id).await?;
    job_get(c, id).await?.ok_or_else(|| DbError::not_found("job", id))
}

async fn job_get(c: &mut Conn<'_>, id: JobId) -> Result<Option<Job>, DbError> {
    let mut q = Sql::new(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(job_from_row).transpose()
}

async fn job_list(c: &mut Conn<'_>, lq: &ListQuery<JobFilter, JobSort>) -> Result<Vec<Job>, DbError> {
    let mut q = Sql::new(&format!("SELECT {JOB_COLS} FROM jobs"));
    Where::new(&mut q, c.backend).each(lq, |w, f| {
        w.any_of("status", &f.status);
        w.eq("correlation_id", &f.correlation_id);
    });
    order_and_page(
        &mut q,
        lq,
        |k| match k {
            JobSort::StartedAt => "started_at",
            JobSort::Status => "status",
        },
        "id",
    );
    c.all(&q).await?.iter().map(job_from_row).collect()
}

/// Ends a started job; ending an ended job again with the same status is a no-op (undo and
/// resume paths may repeat it), with another status a `Conflict`.
async fn job_end(c: &mut Conn<'_>, id: JobId, status: JobStatus) -> Result<(), DbError> {
    if status == JobStatus::Started {
        return Err(DbError::Invalid {
            what: "job status",
            detail: "a job ends finished, failed or aborted".into(),
        });
    }
    let mut q = Sql::new("UPDATE jobs SET status = ");
    q.arg(status.as_str())
        .push(", ended_at = ")
        .arg(c.now.as_millis())
        .push(", last_updated = ")
        .arg(c.now.as_millis())
        .push(" WHERE id = ")
        .arg(id.to_string())
        .push(" AND status = 'started'");
    if c.exec(&q).await? == 0 {
        let job = job_get(c, id)
            .await?
            .ok_or_else(|| DbError::not_found("job", id))?;
        if job.status != status {
            return Err(DbError::Conflict {
                kind: "job",
                id: id.to_string(),
                detail: format!("already {}", job.status),
            });
        }
    }
    Ok(())
}

/// Makes an ended job `started` again (a blocked saga an admin retries goes on under it).
async fn job_reopen(c: &mut Conn<'_>, id: JobId) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE jobs SET status = 'started', ended_at = NULL, last_updated = ");
    q.arg(c.now.as_millis()).push(" WHERE id = ").arg(id.to_string());
    if c.exec(&q).await? == 0 {
        return Err(DbError::not_found("job", id));
    }
    Ok(())
}

/// Adds a `started` step (numbered after the job's last) and returns it.
async fn job_step_start(
    c: &mut Conn<'_>,
    job: JobId,
    parent: Option<StepId>,
    step_type: StepType,
    description: &str,
) -> Result<JobStep, DbError> {
    let mut q = Sql::new("SELECT COALESCE(MAX(number), 0) AS n FROM job_steps WHERE job_id = ");
    q.arg(job.to_string());
    let number = c.count(&q).await? as i64 + 1;
    let id = StepId::new_random();
    let mut q = Sql::new(&format!("INSERT INTO job_steps ({STEP_COLS}) VALUES ("));
    q.arg(id.to_string())
        .push(", ")
        .arg(job.to_string())
        .push(", ")
        .arg(Arg::Text(parent.map(|p| p.to_string())))
        .push(", ")
        .arg(number)
        .push(", ")
        .arg(step_type.as_str())
        .push(", ")
        .arg(description)
        .push(", 'started', ")
        .arg(c.now.as_millis())
        .push(", NULL)");
    c.exec_as(&q, "job step", format!("{description} of job {job}"))
        .await?;
    touch_job(c, job).await?;
    job_step_get(c, id)
        .await?
        .ok_or_else(|| DbError::not_found("job step", id))
}

async fn touch_job(c: &mut Conn<'_>, job: JobId) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE jobs SET last_updated = ");
    q.arg(c.now.as_millis()).push(" WHERE id = ").arg(job.to_string());
    c.exec(&q).await?;
    Ok(())
}

async fn job_step_get(c: &mut Conn<'_>, id: StepId) -> Result<Option<JobStep>, DbError> {
    let mut q = Sql::new(&format!("SELECT {STEP_COLS} FROM job_steps WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(step_from_row).transpose()
}

/// Sets a step's status (ending it unless `started`).
async fn job_step_set_status(c: &mut Conn<'_>, id: StepId, status: JobStatus) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE job_steps SET status = ");
    q.arg(status.as_str()).push(", ended_at = ");
    if status == JobStatus::Started {
        q.push("NULL");
    } else {
        q.arg(c.now.as_millis());
    }
    q.push(" WHERE id = ").arg(id.to_string());
    if c.exec(&q).await? == 0 {
        return Err(DbError::not_found("job step", id));
    }
    if let Some(s) = job_step_get(c, id).await? {
        touch_job(c, s.job_id).await?;
    }
    Ok(())
}

async fn job_steps(c: &mut Conn<'_>, job: JobId) -> Result<Vec<JobStep>, DbError> {
    let mut q = Sql::new(&format!("SELECT {STEP_COLS} FROM job_steps WHERE job_id = "));
    q.arg(job.to_string()).push(" ORDER BY number, id");
    c.all(&q).await?.iter().map(step_from_row).collect()
}

/// Deletes ended, auto-cleared jobs that ended before `before`. Returns how many.
async fn jobs_clear_ended(c: &mut Conn<'_>, before: Timestamp) -> Result<u64, DbError> {
    let mut q = Sql::new("DELETE FROM jobs WHERE status <> 'started' AND auto_cleared = 1 AND ended_at < ");
    q.arg(before.as_millis());
    c.exec(&q).await
}

// ---------------------------------------------------------------- events

const EVENT_COLS: &str = "id, severity, code, description, correlation_id, vm_id, host_id, \
    storage_domain_id, data_center_id, cluster_id, template_id, origin, custom_id, time";

fn event_from_row(r: &AnyRow) -> Result<Event, DbError> {
    Ok(Event {
        id: r.int("id")?,
        severity: r.parse("severity")?,
        code: r.int("code")? as i32,
        description: r.text("description")?,
        correlation_id: r.opt_text("correlation_id")?,
        vm_id: r.opt_parse("vm_id")?,
        host_id: r.opt_parse("host_id")?,
        storage_domain_id: r.opt_parse("storage_domain_id")?,
        data_center_id: r.opt_parse("data_center_id")?,
        cluster_id: r.opt_parse("cluster_id")?,
        template_id: r.opt_parse("template_id")?,
        origin: r.opt_text("origin")?,
        custom_id: r.opt_int("custom_id")?,
        time: r.ts("time")?,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only events with an id greater than this (`from=`).
    pub after_id: Option<i64>,
    /// This severity and above (`severity>=`).
    pub min_severity: Option<Severity>,
    pub code: Option<i32>,
    pub correlation_id: Option<String>,
    pub vm: Option<Ref<VmId>>,
    pub host: Option<Ref<HostUuid>>,
    pub storage_domain: Option<Ref<SdUuid>>,
    pub data_center: Option<Ref<DcId>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSort {
    Id,
    Time,
    Severity,
}

async fn event_add(c: &mut Conn<'_>, e: &NewEvent) -> Result<Event, DbError> {
    let mut q = Sql::new(
        "INSERT INTO events (severity, code, description, correlation_id, vm_id, host_id, storage_domain_id, data_center_id, cluster_id, template_id, origin, custom_id, time) VALUES (",
    );
    q.arg(e.severity.unwrap_or(Severity::Normal).as_str())
        .push(", ")
        .arg(i64::from(e.code))
        .push(", ")
        .arg(e.description.as_str())
        .push(", ")
        .arg(Arg::Text(e.correlation_id.clone()))
        .push(", ")
        .arg(Arg::Text(e.vm_id.map(|v| v.to_string())))
        .push(", ")
        .arg(Arg::Text(e.host_id.map(|v| v.to_string())))
        .push(", ")
        .arg(Arg::Text(e.storage_domain_id.map(|v| v.to_string())))
        .push(", ")
        .arg(Arg::Text(e.data_center_id.map(|v| v.to_string())))
        .push(", ")
        .arg(Arg::Text(e.cluster_id.map(|v| v.to_string())))
        .push(", ")
        .arg(Arg::Text(e.template_id.map(|v| v.to_string())))
        .push(", ")
        .arg(Arg::Text(e.origin.clone()))
        .push(", ")
        .arg(Arg::Int(e.custom_id))
        .push(", ")
        .arg(c.now.as_millis())
        .push(&format!(") RETURNING {EVENT_COLS}"));
    let key = match (&e.origin, e.custom_id) {
        (Some(o), Some(id)) => format!("{o} {id}"),
        _ => "(internal)".into(),
    };
    let row = q
        .query()
        .fetch_one(&mut *c.c)
        .await
        .map_err(DbError::on_write("event", key))?;
    let ev = event_from_row(&row)?;
    tracing::debug!(event_id = ev.id, code = ev.code, severity = %ev.severity, "{}", ev.description);
    Ok(ev)
}

/// Removes event `id` from the log; whether it was there.
async fn event_delete(c: &mut Conn<'_>, id: i64) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM events WHERE id = ");
    q.arg(id);
    Ok(c.exec(&q).await? > 0)
}

async fn event_get(c: &mut Conn<'_>, id: i64) -> Result<Option<Event>, DbError> {
    let mut q = Sql::new(&format!("SELECT {EVENT_COLS} FROM events WHERE id = "));
    q.arg(id);
    c.opt(&q).await?.as_ref().map(event_from_row).transpose()
}

async fn event_list(c: &mut Conn<'_>, lq: &ListQuery<EventFilter, EventSort>) -> Result<Vec<Event>, DbError> {
    let mut q = Sql::new(&format!("SELECT {EVENT_COLS} FROM events"));
    Where::new(&mut q, c.backend).each(lq, |w, f| {
        if let Some(a) = f.after_id {
            w.and().push("id > ").arg(a);
        }
        if let Some(min) = f.min_severity {
            let at_least: Vec<&str> = Severity::ALL
                .iter()
                .filter(|s| **s >= min)
                .map(|s| s.as_str())
                .collect();
            w.any_of("severity", &at_least);
        }
        w.eq_int("code", f.code.map(i64::from));
        w.eq("correlation_id", &f.correlation_id);
        w.reference("vm_id", "vms", &f.vm);
        w.reference("host_id", "hosts", &f.host);
        w.reference("storage_domain_id", "storage_domains", &f.storage_domain);
        w.reference("data_center_id", "data_centers", &f.data_center);
    });
    order_and_page(
        &mut q,
        lq,
        |k| match k {
            EventSort::Id => "id",
            EventSort::Time => "time",
            EventSort::Severity => {
                "CASE severity WHEN 'normal' THEN 0 WHEN 'warning' THEN 1 WHEN 'error' THEN 2 ELSE 3 END"
            }
        },
        "id",
    );
    c.all(&q).await?.iter().map(event_from_row).collect()
}

/// Deletes events older than `before`. Returns how many.
async fn events_purge(c: &mut Conn<'_>, before: Timestamp) -> Result<u64, DbError> {
    let mut q = Sql::new("DELETE FROM events WHERE time < ");
    q.arg(before.as_millis());
    c.exec(&q).await
}

repo! {
    /// Starts a `started` job.
    write job_start(description: &str, correlation_id: Option<&str>, saga_id: Option<SagaId>) -> Job = job_start;
    read job_get(id: JobId) -> Option<Job> = job_get;
    read job_list(q: &ListQuery<JobFilter, JobSort>) -> Vec<Job> = job_list;
    /// Ends a started job (idempotent for the same status).
    write job_end(id: JobId, status: JobStatus) -> () = job_end;
    write job_reopen(id: JobId) -> () = job_reopen;
    write job_step_start(job: JobId, parent: Option<StepId>, step_type: StepType, description: &str) -> JobStep = job_step_start;
    read job_step_get(id: StepId) -> Option<JobStep> = job_step_get;
    write job_step_set_status(id: StepId, status: JobStatus) -> () = job_step_set_status;
    read job_steps(job: JobId) -> Vec<JobStep> = job_steps;
    write jobs_clear_ended(before: Timestamp) -> u64 = jobs_clear_ended;

    /// Records an event; the database assigns the next id and the time.
    write event_add(e: &NewEvent) -> Event = event_add;
    read event_get(id: i64) -> Option<Event> = event_get;
    /// Removes an event from the log (oVirt's `EventService.remove`); whether it was there.
    write event_delete(id: i64) -> bool = event_delete;
    read event_list(q: &ListQuery<EventFilter, EventSort>) -> Vec<Event> = event_list;
    write events_purge(before: Timestamp) -> u64 = events_purge;
}
