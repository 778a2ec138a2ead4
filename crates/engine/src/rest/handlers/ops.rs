//! The API root, the OpenAPI description, jobs, events and users.

use crate::db::{
    EventFilter, EventSort, HostFilter, JobFilter, JobSort, SdFilter, SortDir, UserFilter, UserSort, VmFilter,
};
use crate::model::*;

use super::super::fault::ApiError;
use super::super::search::{translate, Op as SOp};
use super::super::write::{self, collection, href};
use super::super::{Req, Resp, API};
use super::infra::root_entity;

/// The version the API reports: oVirt 4.5 (whose cluster level is 4.7).
pub const PRODUCT_VERSION: (u32, u32, u32) = (4, 5, 0);

pub async fn api(r: &Req) -> Result<Resp, ApiError> {
    let db = r.db();
    let vms_total = db.vm_count(&VmFilter::default()).await?;
    let vms_up = db
        .vm_count(&VmFilter {
            status: vec![VmStatus::Up],
            ..Default::default()
        })
        .await?;
    let hosts_total = db.host_count(&HostFilter::default()).await?;
    let hosts_up = db
        .host_count(&HostFilter {
            status: vec![HostStatus::Up],
            ..Default::default()
        })
        .await?;
    let sds_total = db.sd_count(&SdFilter::default()).await?;
    let sds_up = db
        .sd_count(&SdFilter {
            status: vec![SdStatus::Active],
            ..Default::default()
        })
        .await?;
    let users = db.user_list(&Default::default()).await?.len();
    let mut o = r.out();
    o.root("api", None, Some(API));
    let rels = [
        "clusters",
        "datacenters",
        "disks",
        "events",
        "hosts",
        "imagetransfers",
        "jobs",
        "storagedomains",
        "tags",
        "templates",
        "users",
        "vms",
    ];
    o.links(API, &rels);
    o.open("product_info", None, None);
    o.leaf("instance_id", r.engine.ca_fingerprint().get(..36).unwrap_or(""));
    o.leaf("name", "oxvirt Engine");
    o.leaf("vendor", "oxvirt");
    let (ma, mi, re) = PRODUCT_VERSION;
    o.open("version", None, None);
    o.leaf("build", 0);
    o.leaf(
        "full_version",
        format!("{ma}.{mi}.{re}-oxvirt{}", env!("CARGO_PKG_VERSION")),
    );
    o.leaf("major", ma);
    o.leaf("minor", mi);
    o.leaf("revision", re);
    o.close("version");
    o.close("product_info");
    o.open("special_objects", None, None);
    let blank = BLANK_TEMPLATE_ID.to_string();
    o.reference("blank_template", &blank, &href("templates", &blank));
    let root = ROOT_TAG_ID.to_string();
    o.reference("root_tag", &root, &href("tags", &root));
    o.close("special_objects");
    o.open("summary", None, None);
    for (name, active, total) in [
        ("hosts", hosts_up, hosts_total),
        ("storage_domains", sds_up, sds_total),
        ("users", users as u64, users as u64),
        ("vms", vms_up, vms_total),
    ] {
        o.open(name, None, None);
        o.leaf("active", active);
        o.leaf("total", total);
        o.close(name);
    }
    o.close("summary");
    o.leaf("time", db.now().to_rfc3339());
    let uid = r.user.id.to_string();
    o.reference("authenticated_user", &uid, &href("users", &uid));
    o.reference("effective_user", &uid, &href("users", &uid));
    o.close("api");
    Ok(Resp::ok(o))
}

pub fn openapi(r: &Req) -> Result<Resp, ApiError> {
    // JSON whatever the Accept header says: OpenAPI tools expect JSON here.
    let _ = r;
    Ok(Resp::Json(super::super::openapi::document()))
}

// ------------------------------------------------------------------------------------ jobs

pub async fn job_list(r: &Req) -> Result<Resp, ApiError> {
    let q = translate(
        &r.search()?,
        r.list_params()?,
        "jobs",
        |f: &mut JobFilter, c, x| {
            match c.field.as_str() {
                "status" => f.status.push(x.value(c)?),
                "correlation_id" => {
                    x.eq(c)?;
                    f.correlation_id = Some(c.value.clone())
                }
                _ => return Ok(false),
            }
            Ok(true)
        },
        |k| match k {
            "start_time" | "starttime" | "time" => Some(JobSort::StartedAt),
            "status" => Some(JobSort::Status),
            _ => None,
        },
    )?;
    let js = r.db().job_list(&q).await?;
    let mut o = r.out();
    collection(&mut o, "jobs", "job", &js, write::job);
    Ok(Resp::ok(o))
}

async fn job(r: &Req) -> Result<Job, ApiError> {
    let id: JobId = r.id(0, "job")?;
    r.db()
        .job_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))
}

pub async fn job_get(r: &Req) -> Result<Resp, ApiError> {
    let j = job(r).await?;
    let mut o = r.out();
    root_entity(&mut o, |o| write::job(o, &j));
    Ok(Resp::ok(o))
}

pub async fn job_steps(r: &Req) -> Result<Resp, ApiError> {
    let j = job(r).await?;
    let ss = r.db().job_steps(j.id).await?;
    let mut o = r.out();
    collection(&mut o, "steps", "step", &ss, write::step);
    Ok(Resp::ok(o))
}

/// `POST /jobs/{id}/retry`.
pub async fn job_retry(r: &Req) -> Result<Resp, ApiError> {
    let j = job(r).await?;
    let body = r.action_body()?;
    let id = j.id;
    super::run_action(r, Some(&body), "retry", move |e| async move {
        e.cmds.retry_job(id).await?;
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------- events

pub async fn event_list(r: &Req) -> Result<Resp, ApiError> {
    let s = r.search()?;
    let mut q = translate(
        &s,
        r.list_params()?,
        "events",
        |f: &mut EventFilter, c, x| {
            match c.field.as_str() {
                "type" | "code" => {
                    x.eq(c)?;
                    f.code = Some(c.value.parse().map_err(|_| {
                        ApiError::bad_request(format!("search: {} must be a number", c.field))
                    })?);
                }
                "severity" => {
                    let sev: Severity =
                        c.value.to_ascii_lowercase().parse().map_err(|_| {
                            ApiError::bad_request(format!("search: no severity {:?}", c.value))
                        })?;
                    let min = match c.op {
                        SOp::Ge | SOp::Eq => sev,
                        SOp::Gt => match Severity::ALL.iter().position(|s| *s == sev) {
                            Some(i) if i + 1 < Severity::ALL.len() => Severity::ALL[i + 1],
                            _ => {
                                return Err(ApiError::bad_request(format!(
                                    "search: no severity is above {sev}"
                                )))
                            }
                        },
                        _ => return Err(ApiError::bad_request("search: severity supports =, > and >=")),
                    };
                    if c.op == SOp::Eq {
                        return Err(ApiError::bad_request(
                            "search: severity= is not supported; use severity>= (at least) or severity>",
                        ));
                    }
                    f.min_severity = Some(min);
                }
                "correlation_id" => {
                    x.eq(c)?;
                    f.correlation_id = Some(c.value.clone());
                }
                _ => {
                    if let Some(v) = x.reference(c, "vm")? {
                        f.vm = Some(v);
                    } else if let Some(v) = x.reference(c, "host")? {
                        f.host = Some(v);
                    } else if let Some(v) = x.reference(c, "storage")? {
                        f.storage_domain = Some(v);
                    } else if let Some(v) = x.reference(c, "datacenter")? {
                        f.data_center = Some(v);
                    } else {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        },
        |k| match k {
            "time" | "date" => Some(EventSort::Time),
            "severity" => Some(EventSort::Severity),
            "id" | "index" => Some(EventSort::Id),
            _ => None,
        },
    )?;
    if let Some(from) = r.q("from").filter(|s| !s.is_empty()) {
        let after: i64 = from
            .parse()
            .map_err(|_| ApiError::bad_request(format!("from must be an event id, not {from:?}")))?;
        q.filters_mut().for_each(|f| f.after_id = Some(after));
    }
    // Newest first, as oVirt lists events; `from=` reads forward from a known event.
    if q.sort.is_empty() && q.filter.after_id.is_none() {
        q.sort.push((EventSort::Id, SortDir::Desc));
    }
    let es = r.db().event_list(&q).await?;
    let mut o = r.out();
    collection(&mut o, "events", "event", &es, write::event);
    Ok(Resp::ok(o))
}

/// `POST /events`: an external event (see [`crate::commands::Commands::add_external_event`]).
pub async fn event_add(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("event")?;
    let mut ev = NewEvent {
        severity: b.parse("severity")?,
        description: b.string("description").unwrap_or_default(),
        origin: b.string("origin"),
        custom_id: b.parse("custom_id")?,
        correlation_id: r.correlation_id.clone(),
        ..Default::default()
    };
    if let Some(e) = b.get("vm") {
        ev.vm_id = Some(super::vm_ref(r, e).await?);
    }
    if let Some(e) = b.get("host") {
        ev.host_id = Some(super::host_ref(r, e).await?);
    }
    if let Some(e) = b.get("storage_domain") {
        ev.storage_domain_id = Some(super::sd_ref(r, e).await?);
    }
    if let Some(e) = b.get("data_center") {
        ev.data_center_id = Some(super::dc_ref(r, e).await?);
    }
    if let Some(e) = b.get("cluster") {
        ev.cluster_id = Some(super::cluster_ref(r, e).await?);
    }
    if let Some(e) = b.get("template") {
        ev.template_id = Some(super::template_ref(r, e).await?);
    }
    let e = r.cmds().add_external_event(ev).await?;
    let mut o = r.out();
    root_entity(&mut o, |o| write::event(o, &e));
    Ok(Resp::added(o, href("events", e.id), false))
}

pub async fn event_remove(r: &Req) -> Result<Resp, ApiError> {
    let id: i64 = r.id(0, "event")?;
    if !r.db().event_delete(id).await? {
        return Err(ApiError::not_found(format!("event {id} not found")));
    }
    Ok(super::action_complete(r))
}

pub async fn event_get(r: &Req) -> Result<Resp, ApiError> {
    let id: i64 = r.id(0, "event")?;
    let e = r
        .db()
        .event_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("event {id} not found")))?;
    let mut o = r.out();
    root_entity(&mut o, |o| write::event(o, &e));
    Ok(Resp::ok(o))
}

// ----------------------------------------------------------------------------------- users

pub async fn user_list(r: &Req) -> Result<Resp, ApiError> {
    let q = translate(
        &r.search()?,
        r.list_params()?,
        "users",
        |f: &mut UserFilter, c, x| {
            match c.field.as_str() {
                "name" | "usrname" | "user_name" => {
                    let mut m = x.text(c)?;
                    // `admin@internal` searches by name within the domain.
                    if let Some((n, d)) = m.pattern.clone().rsplit_once('@') {
                        m.pattern = n.to_string();
                        f.domain = Some(d.to_string());
                    }
                    f.name = Some(m);
                }
                "domain" => {
                    x.eq(c)?;
                    f.domain = Some(c.value.clone())
                }
                _ => return Ok(false),
            }
            Ok(true)
        },
        |k| match k {
            "name" => Some(UserSort::Name),
            _ => None,
        },
    )?;
    let us = r.db().user_list(&q).await?;
    let mut o = r.out();
    collection(&mut o, "users", "user", &us, write::user);
    Ok(Resp::ok(o))
}

pub async fn user_get(r: &Req) -> Result<Resp, ApiError> {
    let id: UserId = r.id(0, "user")?;
    let u = r
        .db()
        .user_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user {id} not found")))?;
    let mut o = r.out();
    root_entity(&mut o, |o| write::user(o, &u));
    Ok(Resp::ok(o))
}
