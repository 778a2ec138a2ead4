//! The JSON endpoints the page script polls: `/portal/api/live`, `/portal/api/history`,
//! `/portal/api/console`.
//!
//! `live` answers, in one reply, what every page needs to stay current without a reload:
//! statuses of all VMs and hosts (badges update in place), the dashboard counts, the
//! membership of the collections the page shows (`sets=vms,snaps:<id>…`; when one differs from
//! the rows on the page, the script re-renders the page's regions), the progress of jobs, new
//! events and the outcome of the user's actions. It costs a fixed number of queries plus one
//! per job asked about, and no node call — except, while jobs run and the page shows storage
//! tasks (`tasks=1`), the SPMs' task lists with their progress (disk copies).
//!
//! A set's members are `id` or `id=version` strings, sorted, the version being the status the
//! row shows; the pages write the same (`data-id`, `data-v`) so the script compares strings.

use std::collections::HashMap;
use std::time::Duration;

use http::StatusCode;
use oxvirt_rpc::Reply;
use serde_json::{json, Map, Value};

use crate::db::{EventFilter, EventSort, JobFilter, JobSort, ListQuery, SortDir};
use crate::model::*;

use super::html::time;
use super::{json_reply, pages, Ctx, PortalError};

/// The most events one poll returns.
pub const EVENTS_PER_POLL: u32 = 20;
/// The most bytes of a serial console the page shows.
pub const CONSOLE_TAIL: u64 = 16 << 10;

type R = Result<Reply, PortalError>;

/// `GET /portal/api/live?sets=…&jobs=…&events_after=N&actions_after=N`.
pub async fn live(ctx: &Ctx) -> R {
    let db = ctx.db();
    let hosts = db.host_list(&ListQuery::new()).await?;
    let host_name: HashMap<HostUuid, &str> = hosts.iter().map(|h| (h.id, h.name.as_str())).collect();
    let vms = db.vm_list(&ListQuery::new()).await?;

    let mut vm_map = Map::new();
    let mut running = 0;
    for v in &vms {
        let st = v.runtime.status;
        if st.is_running() {
            running += 1;
        }
        let host = v
            .runtime
            .run_on_host
            .filter(|_| st.is_running())
            .and_then(|h| host_name.get(&h).copied())
            .unwrap_or("");
        vm_map.insert(
            v.id.to_string(),
            json!({ "status": st.to_string(), "state": pages::vm_status_class(st), "host": host }),
        );
    }
    let mut host_map = Map::new();
    for h in &hosts {
        let rt = ctx.cmds().app.host_rt(h.id);
        host_map.insert(
            h.id.to_string(),
            json!({
                "status": h.status.to_string(),
                "cpu": rt.cpu_load_pct,
                "mem_used": (rt.mem_total_mib.saturating_sub(rt.mem_free_mib)) << 20,
                "mem_total": rt.mem_total_mib << 20,
            }),
        );
    }

    let mut sets = Map::new();
    for name in ctx
        .q("sets")
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .take(8)
    {
        if let Some(members) = set_members(ctx, name, &vms, &hosts).await? {
            sets.insert(name.to_string(), json!(members));
        }
    }

    let running_jobs = db
        .job_list(
            &ListQuery::filtered(JobFilter {
                status: vec![JobStatus::Started],
                ..Default::default()
            })
            .sort_by(JobSort::StartedAt, SortDir::Desc)
            .limit(50),
        )
        .await?;
    let mut jobs = Map::new();
    let asked: Vec<JobId> = ctx
        .q("jobs")
        .unwrap_or("")
        .split(',')
        .filter_map(|s| s.parse().ok())
        .take(50)
        .collect();
    for j in &running_jobs {
        jobs.insert(j.id.to_string(), job_json(ctx, j).await?);
    }
    for id in asked {
        if jobs.contains_key(&id.to_string()) {
            continue;
        }
        if let Some(j) = db.job_get(id).await? {
            jobs.insert(id.to_string(), job_json(ctx, &j).await?);
        }
    }

    let events = match ctx.q("events_after").and_then(|s| s.parse::<i64>().ok()) {
        Some(after) => {
            let mut es = db
                .event_list(
                    &ListQuery::filtered(EventFilter {
                        after_id: Some(after),
                        ..Default::default()
                    })
                    .sort_by(EventSort::Id, SortDir::Desc)
                    .limit(EVENTS_PER_POLL),
                )
                .await?;
            es.reverse();
            es.iter()
                .map(|e| {
                    json!({ "id": e.id, "time": time(e.time), "severity": e.severity.to_string(),
                            "description": e.description })
                })
                .collect()
        }
        None => Vec::new(),
    };

    let user = ctx.session.user.id;
    let actions = match ctx.q("actions_after").and_then(|s| s.parse::<u64>().ok()) {
        Some(after) => {
            let mut a = ctx.portal.actions.of_user(user, after);
            for r in ctx.portal.actions.running_of_user(user) {
                if r.id <= after {
                    a.push(r);
                }
            }
            a
        }
        None => ctx.portal.actions.running_of_user(user),
    };
    let actions: Vec<Value> = actions
        .iter()
        .map(|a| {
            let job = running_jobs
                .iter()
                .find(|j| j.correlation_id.as_deref() == Some(a.correlation_id.as_str()))
                .map(|j| j.id.to_string());
            json!({ "id": a.id, "label": a.label, "state": a.state, "message": a.message,
                    "link": a.link, "job": job })
        })
        .collect();

    // Storage tasks on the SPMs (disk copies…), with their own progress: asked for by the pages
    // that show them, and fetched only while a job runs.
    let tasks = if ctx.q("tasks").is_some() && !running_jobs.is_empty() {
        spm_tasks(ctx).await
    } else {
        Vec::new()
    };

    let hosts_up = hosts.iter().filter(|h| h.status == HostStatus::Up).count();
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "now": db.now().as_millis(),
            "vms": vm_map,
            "hosts": host_map,
            "counts": {
                "hosts_up": format!("{hosts_up} / {}", hosts.len()),
                "vms_running": format!("{running} / {}", vms.len()),
                "jobs_running": running_jobs.len().to_string(),
            },
            "sets": sets,
            "jobs": jobs,
            "running_jobs": running_jobs.iter().map(|j| j.id.to_string()).collect::<Vec<_>>(),
            "events": events,
            "actions": actions,
            "tasks": tasks,
        }),
    ))
}

/// The running tasks of every data center's SPM, each with its overall progress. A node that
/// does not answer within two seconds is left out (the next poll asks again).
async fn spm_tasks(ctx: &Ctx) -> Vec<Value> {
    let app = &ctx.cmds().app;
    let Ok(dcs) = ctx.db().dc_list(&ListQuery::new()).await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for dc in dcs {
        let (SpmStatus::Spm, Some(h)) = (dc.spm_status, dc.spm_host) else {
            continue;
        };
        let Ok(node) = app.host(h).await.and_then(|h| app.client(&h)) else {
            continue;
        };
        let t = Duration::from_secs(2);
        let all = node.call(
            "StoragePool.getAllTasksStatuses",
            json!({ "spUUID": dc.storage_pool_id }),
        );
        let Ok(Ok(all)) = tokio::time::timeout(t, all).await else {
            continue;
        };
        let Some(all) = all["allTasksStatus"].as_object() else {
            continue;
        };
        for (id, st) in all.iter().filter(|(_, st)| st["taskState"] == "running").take(20) {
            let info = node.call("Task.getInfo", json!({ "taskID": id }));
            if let Ok(Ok(info)) = tokio::time::timeout(t, info).await {
                if let Some(pct) = task_percent(&info) {
                    out.push(
                        json!({ "id": id, "verb": st["verb"], "dc": dc.name, "host": node.name,
                                     "percent": pct }),
                    );
                }
            }
        }
    }
    out
}

/// A task's overall progress in percent: its jobs done plus the running job's share.
pub fn task_percent(info: &Value) -> Option<f64> {
    let n = info["jobs"].as_array()?.len();
    if n == 0 {
        return Some(0.0);
    }
    let done = info["next_job"].as_u64()? as f64;
    let running = info["progress"].as_f64().unwrap_or(0.0).clamp(0.0, 100.0) / 100.0;
    Some(((done + running) * 100.0 / n as f64).clamp(0.0, 100.0))
}

async fn job_json(ctx: &Ctx, j: &Job) -> Result<Value, PortalError> {
    let p = pages::job_progress(ctx, j).await?;
    Ok(json!({
        "status": j.status.to_string(),
        "done": p.map_or(0.0, |p| p.value()),
        "total": p.map_or(0, |p| p.total),
        "steps": p.map(|p| p.label()),
        "description": j.description,
    }))
}

/// The members of one named collection, as the page renders them.
async fn set_members(
    ctx: &Ctx,
    name: &str,
    vms: &[Vm],
    hosts: &[Host],
) -> Result<Option<Vec<String>>, PortalError> {
    let db = ctx.db();
    let mut m: Vec<String> = match name.split_once(':') {
        None => match name {
            "vms" => vms.iter().map(|v| v.id.to_string()).collect(),
            "vms_running" => vms
                .iter()
                .filter(|v| v.runtime.status.is_running())
                .map(|v| v.id.to_string())
                .collect(),
            "hosts" => hosts.iter().map(|h| h.id.to_string()).collect(),
            "sds" => {
                let mut status: HashMap<SdUuid, SdStatus> = HashMap::new();
                for dc in db.dc_list(&ListQuery::new()).await? {
                    for m in db.pool_members(dc.id).await? {
                        status.insert(m.storage_domain_id, m.status);
                    }
                }
                db.sd_list(&ListQuery::new())
                    .await?
                    .iter()
                    .map(|s| {
                        format!(
                            "{}={}",
                            s.id,
                            status.get(&s.id).copied().unwrap_or(SdStatus::Unattached)
                        )
                    })
                    .collect()
            }
            "disks" => db
                .disk_list(&ListQuery::new())
                .await?
                .iter()
                // The size too: an extend changes it with the status back where it was.
                .map(|d| format!("{}={}:{}", d.id, d.status, d.provisioned_size))
                .collect(),
            "templates" => db
                .template_list(&ListQuery::new())
                .await?
                .iter()
                .map(|t| format!("{}={}", t.id, t.status))
                .collect(),
            "dcs" => db
                .dc_list(&ListQuery::new())
                .await?
                .iter()
                .map(|d| format!("{}={}", d.id, pages::dc_live_version(d)))
                .collect(),
            _ => return Ok(None),
        },
        Some(("snappage", page)) => {
            let Ok(page) = page.parse::<u32>() else {
                return Ok(None);
            };
            pages::snapshot_page_members(ctx, page.max(1)).await?
        }
        Some((kind, id)) => {
            let Ok(vm) = id.parse::<VmId>() else {
                return Ok(None);
            };
            match kind {
                "snaps" => db
                    .snapshots_of_vm(vm)
                    .await?
                    .iter()
                    .map(|s| format!("{}={}", s.id, s.status))
                    .collect(),
                "vmdisks" => {
                    let mut out = Vec::new();
                    for a in db.attachments_of_vm(vm).await? {
                        if let Some(d) = db.disk_get(a.disk_id).await? {
                            out.push(format!("{}={}", d.id, d.status));
                        }
                    }
                    out
                }
                _ => return Ok(None),
            }
        }
    };
    m.sort();
    Ok(Some(m))
}

/// `GET /portal/api/history?host=<id>` or `?vm=<id>`: the chart's points.
pub async fn history(ctx: &Ctx) -> R {
    let h = &ctx.portal.history;
    let points = if let Some(id) = ctx.q("host") {
        let id: HostUuid = id
            .parse()
            .map_err(|_| PortalError::Bad(format!("host id {id:?} is not a UUID")))?;
        h.host(id)
    } else if let Some(id) = ctx.q("vm") {
        let id: VmId = id
            .parse()
            .map_err(|_| PortalError::Bad(format!("VM id {id:?} is not a UUID")))?;
        h.vm(id)
    } else {
        return Err(PortalError::Bad("name a host= or a vm=".into()));
    };
    Ok(json_reply(StatusCode::OK, &json!({ "points": points })))
}

/// The VM the query's `vm=<id>` names.
async fn queried_vm(ctx: &Ctx) -> Result<crate::model::Vm, PortalError> {
    let id = ctx.q("vm").ok_or_else(|| PortalError::Bad("name a vm=".into()))?;
    let id: VmId = id
        .parse()
        .map_err(|_| PortalError::Bad(format!("VM id {id:?} is not a UUID")))?;
    ctx.db()
        .vm_get(id)
        .await?
        .ok_or_else(|| PortalError::NotFound(format!("VM {id} not found")))
}

/// `GET /portal/api/console?vm=<id>`: the tail of a running VM's serial console, from its
/// node (`VM.getConsoleLog`, read-only).
pub async fn console(ctx: &Ctx) -> R {
    let vm = queried_vm(ctx).await?;
    let id = vm.id;
    let Some(host) = vm.runtime.run_on_host.filter(|_| vm.runtime.status.is_running()) else {
        return Ok(json_reply(
            StatusCode::OK,
            &json!({ "running": false, "status": vm.runtime.status.to_string(), "log": "" }),
        ));
    };
    let app = &ctx.cmds().app;
    let node = app.client(&app.host(host).await?)?;
    let call = node.call(
        "VM.getConsoleLog",
        json!({ "vmID": id, "tailBytes": CONSOLE_TAIL }),
    );
    let v = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .map_err(|_| {
            PortalError::Internal(format!(
                "host {} did not answer VM.getConsoleLog in 5 s",
                node.name
            ))
        })?
        .map_err(|e| PortalError::Internal(super::error_chain(&e)))?;
    let log = v["log"].as_str().unwrap_or("");
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "running": true,
            "status": vm.runtime.status.to_string(),
            "log": strip_control(log),
            "size": v["size"],
            "truncated": v["truncated"],
        }),
    ))
}

/// `GET /portal/api/console.vv?vm=<id>`: a running VM's VNC console as a remote-viewer file
/// with a fresh ticket (the session cookie is `SameSite=Strict`: no other site can make a
/// browser fetch it).
pub async fn console_file(ctx: &Ctx) -> R {
    let vm = queried_vm(ctx).await?;
    let t = ctx.cmds().console_ticket(vm.id, None, None).await?;
    Ok(super::file_reply(
        "application/x-virt-viewer",
        &format!("{}.vv", vm.name),
        t.connection_file(&vm.name),
    ))
}

/// Drops terminal escape sequences and control characters other than newlines and tabs
/// (a guest's console is full of them; the page shows plain text).
pub fn strip_control(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ params final-byte; other escapes: ESC + one char.
                if it.peek() == Some(&'[') {
                    it.next();
                    for d in it.by_ref() {
                        if ('@'..='~').contains(&d) {
                            break;
                        }
                    }
                } else {
                    it.next();
                }
            }
            '\n' | '\t' => o.push(c),
            '\r' => {}
            c if c.is_control() => {}
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_progress_counts_done_jobs_and_the_running_share() {
        let info = json!({ "jobs": [{}, {}, {}, {}], "next_job": 1, "progress": 50.0 });
        assert_eq!(task_percent(&info), Some(37.5));
        let info = json!({ "jobs": [{}], "next_job": 0, "progress": 250.0 });
        assert_eq!(task_percent(&info), Some(100.0), "a wild progress clamps");
        assert_eq!(task_percent(&json!({ "jobs": [], "next_job": 0 })), Some(0.0));
        assert_eq!(task_percent(&json!({ "verb": "x" })), None);
    }

    #[test]
    fn console_text_loses_escapes_but_keeps_lines() {
        assert_eq!(
            strip_control("\u{1b}[2J\u{1b}[0;32mOK\u{1b}[0m boot\r\nline2\u{7}\tx"),
            "OK boot\nline2\tx"
        );
        assert_eq!(strip_control("é ünïcode"), "é ünïcode");
    }
}
