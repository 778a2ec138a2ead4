//! The portal's pages, rendered on the server.
//!
//! Each list page costs a fixed number of queries whatever the number of rows (names of related
//! objects come from one list each, joined in memory) and no node call; figures that need a
//! node (VM CPU, the console) come from the sampler's history or from the script's requests.
//! Row actions on big lists are buttons the script posts (`data-act`), so a thousand VMs do
//! not carry a thousand forms; detail pages use real forms that also work without script.

use std::collections::HashMap;

use http::StatusCode;
use oxvirt_rpc::{HttpRequest, Reply};

use crate::db::{
    DiskFilter, DiskSort, EventFilter, EventSort, JobFilter, JobSort, ListQuery, Ref, SortDir, TemplateSort,
    TextMatch, VmFilter, VmSort,
};
use crate::model::*;
use crate::saga::{SagaRecord, SagaState};

use super::html::{bytes, layout, time, FormCtx, Html};
use super::{html_reply, safe_back, Ctx, PortalError};

type R = Result<Reply, PortalError>;

/// Dispatches a GET.
pub async fn page(ctx: &Ctx, segs: &[&str], req: &HttpRequest) -> R {
    let back = match &req.query {
        Some(q) => format!("{}?{q}", req.path),
        None => req.path.clone(),
    };
    let f = FormCtx {
        csrf: ctx.session.csrf.clone(),
        back: safe_back(Some(&back)),
    };
    let (title, active, body) = match segs {
        [] => ("Dashboard", "dashboard", dashboard(ctx, &f).await?),
        ["datacenters"] => ("Data centers", "datacenters", datacenters(ctx).await?),
        ["datacenters", id] => ("Data center", "datacenters", datacenter(ctx, id).await?),
        ["clusters"] => ("Clusters", "clusters", clusters(ctx).await?),
        ["clusters", id] => ("Cluster", "clusters", cluster(ctx, id).await?),
        ["hosts"] => ("Hosts", "hosts", hosts(ctx, &f).await?),
        ["hosts", id] => ("Host", "hosts", host(ctx, &f, id).await?),
        ["storagedomains"] => (
            "Storage domains",
            "storagedomains",
            storage_domains(ctx, &f).await?,
        ),
        ["storagedomains", id] => (
            "Storage domain",
            "storagedomains",
            storage_domain(ctx, &f, id).await?,
        ),
        ["disks"] => ("Disks", "disks", disks(ctx, &f).await?),
        ["vms"] => ("Virtual machines", "vms", vms(ctx, &f).await?),
        ["vms", id] => ("Virtual machine", "vms", vm(ctx, &f, id).await?),
        ["snapshots"] => ("Snapshots", "snapshots", snapshots(ctx).await?),
        ["templates"] => ("Templates", "templates", templates(ctx, &f).await?),
        ["templates", id] => ("Template", "templates", template(ctx, id).await?),
        ["jobs"] => ("Jobs", "jobs", jobs(ctx).await?),
        ["jobs", id] => ("Job", "jobs", job(ctx, id).await?),
        ["events"] => ("Events", "events", events(ctx).await?),
        _ => return Err(PortalError::NotFound(format!("no such page {}", req.path))),
    };
    let user = ctx.session.user.principal();
    Ok(html_reply(
        StatusCode::OK,
        layout(title, active, Some(&user), Some(&ctx.session.csrf), &body),
    ))
}

pub fn login_page(query: Option<&str>, error: Option<&str>) -> Reply {
    let q = crate::rest::parse_query(query.unwrap_or(""));
    let next = q.iter().find(|(k, _)| k == "next").map(|(_, v)| v.as_str());
    let mut h = Html::new();
    h.raw("<div class=\"login\"><h1>Sign in to ox<b>virt</b></h1>");
    if let Some(e) = error {
        h.raw("<p class=\"error\" id=\"login-error\">")
            .text(e)
            .raw("</p>");
    }
    h.raw("<form method=\"post\" action=\"/portal/login\" id=\"login\">")
        .raw("<input type=\"hidden\" name=\"next\" value=\"")
        .text(safe_back(next))
        .raw("\">")
        .input(
            "User",
            "username",
            "text",
            "admin@internal",
            "autocomplete=\"username\" required",
        )
        .input(
            "Password",
            "password",
            "password",
            "",
            "autocomplete=\"current-password\" required autofocus",
        )
        .raw("<button type=\"submit\">Log in</button></form>")
        .raw("<p class=\"hint\">The engine's users, as for the REST API (admin@internal).</p></div>");
    let status = if error.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    html_reply(status, layout("Log in", "login", None, None, &h.finish()))
}

// ----------------------------------------------------------------------------- shared parts

/// The id in a detail page's path: a malformed one names no object (404).
fn page_id<T: std::str::FromStr>(kind: &str, id: &str) -> Result<T, PortalError> {
    id.parse().map_err(|_| missing(kind, id))
}

/// The 404 of a detail page whose object `kind` `id` does not exist.
fn missing(kind: &str, id: impl std::fmt::Display) -> PortalError {
    PortalError::NotFound(format!("{kind} {id} not found"))
}

/// Names of related objects, each from one query.
struct Names {
    hosts: HashMap<HostUuid, Host>,
    clusters: HashMap<ClusterId, Cluster>,
    dcs: HashMap<DcId, DataCenter>,
    templates: HashMap<TemplateId, Template>,
    sds: HashMap<SdUuid, StorageDomain>,
}

impl Names {
    async fn load(ctx: &Ctx) -> Result<Names, PortalError> {
        let db = ctx.db();
        Ok(Names {
            hosts: db
                .host_list(&ListQuery::new())
                .await?
                .into_iter()
                .map(|h| (h.id, h))
                .collect(),
            clusters: db
                .cluster_list(&ListQuery::new())
                .await?
                .into_iter()
                .map(|c| (c.id, c))
                .collect(),
            dcs: db
                .dc_list(&ListQuery::new())
                .await?
                .into_iter()
                .map(|d| (d.id, d))
                .collect(),
            templates: db
                .template_list(&ListQuery::new())
                .await?
                .into_iter()
                .map(|t| (t.id, t))
                .collect(),
            sds: db
                .sd_list(&ListQuery::new())
                .await?
                .into_iter()
                .map(|s| (s.id, s))
                .collect(),
        })
    }
    fn host(&self, id: Option<HostUuid>) -> String {
        id.and_then(|h| self.hosts.get(&h))
            .map(|h| h.name.clone())
            .unwrap_or_default()
    }
    fn cluster(&self, id: ClusterId) -> String {
        self.clusters
            .get(&id)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| id.to_string())
    }
    fn dc(&self, id: DcId) -> String {
        self.dcs
            .get(&id)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| id.to_string())
    }
    fn template(&self, id: TemplateId) -> String {
        self.templates
            .get(&id)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| id.to_string())
    }
    fn sd(&self, id: SdUuid) -> String {
        self.sds
            .get(&id)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| id.to_string())
    }
    fn sorted_hosts(&self) -> Vec<&Host> {
        let mut v: Vec<&Host> = self.hosts.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// Every data center's pool members, by storage domain.
async fn members(
    ctx: &Ctx,
    dcs: impl Iterator<Item = DcId>,
) -> Result<HashMap<SdUuid, PoolMember>, PortalError> {
    let mut out = HashMap::new();
    for dc in dcs {
        for m in ctx.db().pool_members(dc).await? {
            out.insert(m.storage_domain_id, m);
        }
    }
    Ok(out)
}

/// Steps done and the saga's step count, for a job driven by a saga.
pub async fn job_progress(ctx: &Ctx, j: &Job) -> Result<Option<JobProgress>, PortalError> {
    let Some(saga) = j.saga_id else { return Ok(None) };
    let Some(rec) = ctx.db().saga_get(saga).await? else {
        return Ok(None);
    };
    let Some(total) = ctx.cmds().sagas.step_count(&rec.name) else {
        return Ok(None);
    };
    let done = rec
        .steps
        .iter()
        .filter(|s| s.status == crate::db::SagaStepStatus::Done)
        .count();
    let running = j.status == JobStatus::Started;
    // A live migration's memory transfer is most of its time: show how far it is.
    let step_pct = if running && rec.name == <crate::commands::MigrateVmSaga as crate::saga::SagaDef>::NAME {
        serde_json::from_value::<VmId>(rec.params["vm"].clone())
            .ok()
            .and_then(|vm| ctx.cmds().app.migration_progress(vm))
    } else {
        None
    };
    Ok(Some(JobProgress {
        done: if j.status == JobStatus::Finished {
            total
        } else {
            done.min(total)
        },
        total,
        step_pct,
    }))
}

/// How far a job is: saga steps done of all, and the running step's own percent when it
/// reports one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobProgress {
    pub done: usize,
    pub total: usize,
    pub step_pct: Option<u8>,
}

impl JobProgress {
    /// For a `<progress>`: steps done plus the running step's share.
    pub fn value(&self) -> f64 {
        (self.done as f64 + self.step_pct.map_or(0.0, |p| f64::from(p) / 100.0)).min(self.total as f64)
    }

    /// "3/5", or "3/5 · 42 %" while the running step reports a percent.
    pub fn label(&self) -> String {
        match self.step_pct {
            Some(p) => format!("{}/{} · {p} %", self.done, self.total),
            None => format!("{}/{}", self.done, self.total),
        }
    }
}

pub fn vm_status_class(s: VmStatus) -> &'static str {
    match s {
        VmStatus::Down => "down",
        s if s.is_running() => "running",
        _ => "other",
    }
}

/// The row of row-action buttons the script posts (no form per row).
fn act_button(h: &mut Html, url: &str, label: &str, confirm: Option<&str>, when: &str, class: &str) {
    h.raw("<button type=\"button\" class=\"")
        .text(class)
        .raw("\" data-act=\"")
        .text(url)
        .raw("\" data-when=\"")
        .text(when)
        .raw("\"");
    if let Some(c) = confirm {
        h.raw(" data-confirm=\"").text(c).raw("\"");
    }
    h.raw(">").text(label).raw("</button>");
}

fn vm_row_actions(h: &mut Html, v: &Vm) {
    let id = v.id.to_string();
    h.raw("<td class=\"acts\" data-vm-acts=\"")
        .text(&id)
        .raw("\" data-state=\"")
        .raw(vm_status_class(v.runtime.status))
        .raw("\" data-status=\"")
        .text(v.runtime.status)
        .raw("\">");
    act_button(
        h,
        &format!("/portal/vms/{id}/start"),
        "Start",
        None,
        "down",
        "small",
    );
    act_button(
        h,
        &format!("/portal/vms/{id}/shutdown"),
        "Shut down",
        Some(&format!("Shut down VM {} (ACPI)?", v.name)),
        "running",
        "small secondary",
    );
    act_button(
        h,
        &format!("/portal/vms/{id}/stop"),
        "Power off",
        Some(&format!(
            "Power off VM {} now? Unsaved guest data is lost.",
            v.name
        )),
        "running",
        "small danger",
    );
    h.raw("</td>");
}

/// The SPMs' running storage tasks (disk copies…) with their progress; the script fills it
/// while jobs run and hides it when there are none.
fn tasks_panel(h: &mut Html) {
    h.raw("<div class=\"spm-tasks\" data-live-tasks=\"1\" hidden><h2>Storage tasks on the SPM</h2>")
        .raw("<table id=\"spm-tasks\"><thead><tr><th>Task</th><th>Verb</th><th>Host</th><th>Progress</th></tr></thead>")
        .raw("<tbody></tbody></table></div>");
}

async fn jobs_table(ctx: &Ctx, h: &mut Html, jobs: &[Job], region: &str) -> Result<(), PortalError> {
    h.raw("<div data-region=\"")
        .text(region)
        .raw("\" data-live-jobs=\"1\">");
    h.table_open(
        &format!("{region}-table"),
        &["Job", "Status", "Progress", "Started", "Ended"],
        None,
    );
    for j in jobs {
        let id = j.id.to_string();
        h.raw("<tr data-job=\"").text(&id).raw("\">");
        h.cell_link(&format!("/portal/jobs/{id}"), &j.description);
        h.raw("<td>")
            .badge(j.status, Some(&format!("job:{id}")))
            .raw("</td><td>");
        match job_progress(ctx, j).await? {
            Some(p) => {
                h.raw(&format!(
                    "<progress data-live-progress=\"{id}\" max=\"{}\" value=\"{}\"></progress> <span data-live-steps=\"{id}\">",
                    p.total,
                    p.value()
                ))
                .text(p.label())
                .raw("</span>");
            }
            None => {
                h.raw("<span class=\"muted\">—</span>");
            }
        }
        h.raw("</td>")
            .cell(time(j.started_at))
            .cell(j.ended_at.map(time).unwrap_or_default())
            .raw("</tr>");
    }
    h.table_close("No jobs.", 5, jobs.is_empty());
    h.raw("</div>");
    Ok(())
}

fn events_table(h: &mut Html, events: &[Event], live: bool) {
    h.raw(
        "<table class=\"events\"><thead><tr><th>Time</th><th>Severity</th><th>Event</th></tr></thead><tbody",
    );
    if live {
        let max = events.iter().map(|e| e.id).max().unwrap_or(0);
        h.raw(&format!(" data-live-events=\"{max}\""));
    }
    h.raw(">");
    for e in events {
        h.raw("<tr>")
            .cell(time(e.time))
            .raw("<td>")
            .badge(e.severity, None)
            .raw("</td>")
            .cell(&e.description)
            .raw("</tr>");
    }
    h.raw("</tbody></table>");
}

// ------------------------------------------------------------------------------- dashboard

async fn dashboard(ctx: &Ctx, f: &FormCtx) -> Result<String, PortalError> {
    let db = ctx.db();
    let names = Names::load(ctx).await?;
    let total_vms = db.vm_count(&VmFilter::default()).await?;
    let running_filter = VmFilter {
        status: VmStatus::ALL.iter().copied().filter(|s| s.is_running()).collect(),
        ..Default::default()
    };
    let running = db
        .vm_list(&ListQuery::filtered(running_filter.clone()).sort_by(VmSort::Name, SortDir::Asc))
        .await?;
    let up_hosts = names
        .hosts
        .values()
        .filter(|h| h.status == HostStatus::Up)
        .count();
    let mem = members(ctx, names.dcs.keys().copied()).await?;
    let (mut cap, mut free) = (0u64, 0u64);
    for sd in names.sds.values() {
        if let (Some(c), Some(fr)) = (sd.capacity_bytes, sd.free_bytes) {
            cap += c;
            free += fr;
        }
    }
    let running_jobs = db
        .job_list(
            &ListQuery::filtered(JobFilter {
                status: vec![JobStatus::Started],
                ..Default::default()
            })
            .sort_by(JobSort::StartedAt, SortDir::Desc)
            .limit(20),
        )
        .await?;
    let recent_jobs = db
        .job_list(
            &ListQuery::new()
                .sort_by(JobSort::StartedAt, SortDir::Desc)
                .limit(6),
        )
        .await?;
    let mut jobs = running_jobs;
    for j in recent_jobs {
        if !jobs.iter().any(|x| x.id == j.id) {
            jobs.push(j);
        }
    }
    let events = db
        .event_list(&ListQuery::new().sort_by(EventSort::Id, SortDir::Desc).limit(12))
        .await?;

    let mut h = Html::new();
    h.heading("Dashboard", Some(&format!("{} data center(s)", names.dcs.len())));
    h.raw("<div class=\"cards\">");
    card(
        &mut h,
        "Hosts up",
        &format!("{up_hosts} / {}", names.hosts.len()),
        "hosts_up",
        "/portal/hosts",
    );
    card(
        &mut h,
        "VMs running",
        &format!("{} / {total_vms}", running.len()),
        "vms_running",
        "/portal/vms",
    );
    h.raw("<a class=\"card\" href=\"/portal/storagedomains\"><span class=\"card-label\">Storage used</span><span class=\"card-value\">");
    h.text(if cap > 0 {
        format!("{:.0} %", (cap - free) as f64 * 100.0 / cap as f64)
    } else {
        "—".into()
    });
    h.raw("</span>");
    if cap > 0 {
        h.usage(cap - free, cap, None);
    }
    h.raw("</a>");
    card(
        &mut h,
        "Jobs running",
        &jobs
            .iter()
            .filter(|j| j.status == JobStatus::Started)
            .count()
            .to_string(),
        "jobs_running",
        "/portal/jobs",
    );
    h.raw("</div>");

    h.raw("<div class=\"grid2\"><section>");
    h.section("Hosts");
    hosts_table(ctx, &mut h, &names, f, false);
    h.raw("<div class=\"charts\">");
    for host in names.sorted_hosts().iter().take(4) {
        h.chart("host", &host.id.to_string(), &host.name);
    }
    h.raw("</div></section><section>");
    h.section("Running VMs");
    h.raw("<div data-region=\"running\">");
    h.table_open(
        "running-vms",
        &["Name", "Status", "Host", "Memory", "vCPUs"],
        Some("vms_running"),
    );
    for v in &running {
        let id = v.id.to_string();
        h.row_open(Some(&id))
            .cell_link(&format!("/portal/vms/{id}"), &v.name)
            .raw("<td>")
            .badge(v.runtime.status, Some(&format!("vm:{id}")))
            .raw("</td><td data-live-host=\"")
            .text(&id)
            .raw("\">")
            .text(names.host(v.runtime.run_on_host))
            .raw("</td>")
            .cell_num(bytes(v.memory_bytes))
            .cell_num(v.cpu.vcpus())
            .raw("</tr>");
    }
    h.table_close("No VM is running.", 5, running.is_empty());
    h.raw("</div>");
    h.section("Storage domains");
    sd_table(&mut h, &names, &mem, None);
    h.raw("</section></div>");

    h.raw("<div class=\"grid2\"><section>");
    tasks_panel(&mut h);
    h.section("Jobs");
    jobs_table(ctx, &mut h, &jobs, "dash-jobs").await?;
    h.raw("</section><section>");
    h.section("Recent events");
    events_table(&mut h, &events, true);
    h.raw("</section></div>");
    Ok(h.finish())
}

fn card(h: &mut Html, label: &str, value: &str, live: &str, href: &str) {
    h.raw("<a class=\"card\" href=\"")
        .text(href)
        .raw("\"><span class=\"card-label\">")
        .text(label)
        .raw("</span><span class=\"card-value\" data-live-count=\"")
        .text(live)
        .raw("\">")
        .text(value)
        .raw("</span></a>");
}

// ------------------------------------------------------------------------------------ infra

async fn datacenters(ctx: &Ctx) -> Result<String, PortalError> {
    let names = Names::load(ctx).await?;
    let mut dcs: Vec<&DataCenter> = names.dcs.values().collect();
    dcs.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Html::new();
    h.heading("Data centers", Some(&format!("{} data center(s)", dcs.len())));
    h.raw("<div data-region=\"datacenters\">");
    h.table_open(
        "datacenters",
        &[
            "Name",
            "Status",
            "Storage",
            "SPM",
            "Clusters",
            "Storage domains",
            "Version",
            "Description",
        ],
        Some("dcs"),
    );
    for dc in &dcs {
        let ms = ctx.db().pool_members(dc.id).await?;
        let clusters = names
            .clusters
            .values()
            .filter(|c| c.data_center_id == dc.id)
            .count();
        h.raw("<tr data-id=\"")
            .text(dc.id)
            .raw("\" data-v=\"")
            .text(dc_live_version(dc))
            .raw("\">")
            .cell_link(&format!("/portal/datacenters/{}", dc.id), &dc.name)
            .raw("<td>")
            .badge(dc.status, None)
            .raw("</td>")
            .cell(if dc.local { "local" } else { "shared" })
            .cell(match dc.spm_status {
                SpmStatus::Spm => names.host(dc.spm_host),
                s => s.to_string(),
            })
            .cell_num(clusters)
            .cell_num(ms.len())
            .cell(dc.compatibility_version)
            .cell(&dc.description)
            .raw("</tr>");
    }
    h.table_close("No data centers.", 8, dcs.is_empty());
    h.raw("</div>");
    Ok(h.finish())
}

/// What a data center row shows that changes (the live set's version, see `live`).
pub fn dc_live_version(dc: &DataCenter) -> String {
    let spm = match (dc.spm_status, dc.spm_host) {
        (SpmStatus::Spm, Some(h)) => h.to_string(),
        (s, _) => s.to_string(),
    };
    format!("{}:{spm}", dc.status)
}

/// A data center: its storage and SPM, and what it holds (clusters, storage domains, hosts).
async fn datacenter(ctx: &Ctx, id: &str) -> Result<String, PortalError> {
    let dc_id: DcId = page_id("data center", id)?;
    let names = Names::load(ctx).await?;
    let dc = names.dcs.get(&dc_id).ok_or_else(|| missing("data center", id))?;
    let members = ctx.db().pool_members(dc.id).await?;
    let master = members
        .iter()
        .find(|m| m.master)
        .map(|m| names.sd(m.storage_domain_id));
    let mut clusters: Vec<&Cluster> = names
        .clusters
        .values()
        .filter(|c| c.data_center_id == dc.id)
        .collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Html::new();
    h.head_open(format!("Data center {}", dc.name))
        .badge(dc.status, None)
        .raw("</div>");
    h.facts(&[
        ("Storage", (if dc.local { "local" } else { "shared" }).to_string()),
        (
            "SPM",
            match dc.spm_status {
                SpmStatus::Spm => names.host(dc.spm_host),
                s => s.to_string(),
            },
        ),
        ("Master domain", master.unwrap_or_else(|| "none yet".into())),
        ("Compatibility version", dc.compatibility_version.to_string()),
        ("Storage pool", dc.storage_pool_id.to_string()),
        ("Id", dc.id.to_string()),
        ("Description", dc.description.clone()),
    ]);
    h.section("Clusters");
    h.table_open("dc-clusters", &["Name", "CPU", "Scheduling", "Hosts"], None);
    for c in &clusters {
        let hosts = names.hosts.values().filter(|h| h.cluster_id == c.id).count();
        h.row_open(Some(&c.id.to_string()))
            .cell_link(&format!("/portal/clusters/{}", c.id), &c.name)
            .cell(format!("{} ({})", c.cpu_type, c.cpu_architecture))
            .cell(c.scheduling_policy)
            .cell_num(hosts)
            .raw("</tr>");
    }
    h.table_close("No clusters.", 4, clusters.is_empty());
    h.section("Storage domains");
    h.table_open("dc-sds", &["Name", "Status", "Role", "Type"], None);
    for m in &members {
        let sid = m.storage_domain_id.to_string();
        let sd = names.sds.get(&m.storage_domain_id);
        h.row_open(Some(&sid))
            .cell_link(
                &format!("/portal/storagedomains/{sid}"),
                names.sd(m.storage_domain_id),
            )
            .raw("<td>")
            .badge(m.status, None)
            .raw("</td>")
            .cell(if m.master { "master" } else { "" })
            .cell(
                sd.map(|s| format!("{} on {}", s.domain_type, s.storage_type))
                    .unwrap_or_default(),
            )
            .raw("</tr>");
    }
    h.table_close("No storage domain is attached.", 4, members.is_empty());
    h.section("Hosts");
    hosts_of(&mut h, &names, |host| {
        clusters.iter().any(|c| c.id == host.cluster_id)
    });
    Ok(h.finish())
}

/// The hosts `keep` chooses, as a table with their cluster and SPM role.
fn hosts_of(h: &mut Html, names: &Names, keep: impl Fn(&Host) -> bool) {
    let hosts: Vec<&Host> = names.sorted_hosts().into_iter().filter(|x| keep(x)).collect();
    h.table_open("hosts-of", &["Name", "Status", "Cluster", "SPM", "Address"], None);
    for x in &hosts {
        let id = x.id.to_string();
        h.row_open(Some(&id))
            .cell_link(&format!("/portal/hosts/{id}"), &x.name)
            .raw("<td>")
            .badge(x.status, Some(&format!("host:{id}")))
            .raw("</td>")
            .cell(names.cluster(x.cluster_id))
            .cell(x.spm_status)
            .cell(format!("{}:{}", x.address, x.port))
            .raw("</tr>");
    }
    h.table_close("No hosts.", 5, hosts.is_empty());
}

/// The most VMs a cluster's or template's page lists (the VMs page searches them all).
const DETAIL_VMS: u32 = 200;

/// The first [`DETAIL_VMS`] VMs `filter` picks, by name.
async fn first_vms(ctx: &Ctx, filter: VmFilter) -> Result<Vec<Vm>, PortalError> {
    let q = ListQuery::filtered(filter)
        .sort_by(VmSort::Name, SortDir::Asc)
        .limit(DETAIL_VMS);
    Ok(ctx.db().vm_list(&q).await?)
}

/// A table of VMs: name, status, host; a full one says where to see the rest.
fn vms_table(h: &mut Html, names: &Names, id: &str, vms: &[Vm], empty: &str) {
    h.table_open(id, &["Name", "Status", "Host", "Memory", "vCPUs"], None);
    for v in vms {
        let vid = v.id.to_string();
        h.row_open(Some(&vid))
            .cell_link(&format!("/portal/vms/{vid}"), &v.name)
            .raw("<td>")
            .badge(v.runtime.status, Some(&format!("vm:{vid}")))
            .raw("</td>")
            .cell(names.host(v.runtime.run_on_host))
            .cell_num(bytes(v.memory_bytes))
            .cell_num(v.cpu.vcpus())
            .raw("</tr>");
    }
    h.table_close(empty, 5, vms.is_empty());
    if vms.len() >= DETAIL_VMS as usize {
        h.raw("<p class=\"muted\">The first ")
            .text(DETAIL_VMS)
            .raw(" by name; the <a href=\"/portal/vms\">VMs page</a> lists them all.</p>");
    }
}

/// A cluster: its policies, hosts and VMs.
async fn cluster(ctx: &Ctx, id: &str) -> Result<String, PortalError> {
    let cl_id: ClusterId = page_id("cluster", id)?;
    let names = Names::load(ctx).await?;
    let c = names.clusters.get(&cl_id).ok_or_else(|| missing("cluster", id))?;
    let vms = first_vms(
        ctx,
        VmFilter {
            cluster: Some(Ref::Id(c.id)),
            ..Default::default()
        },
    )
    .await?;
    let mut h = Html::new();
    h.head_open(format!("Cluster {}", c.name)).raw("</div>");
    h.facts_linked(&[
        (
            "Data center",
            names.dc(c.data_center_id),
            Some(format!("/portal/datacenters/{}", c.data_center_id)),
        ),
        ("CPU", format!("{} ({})", c.cpu_type, c.cpu_architecture), None),
        ("Scheduling policy", c.scheduling_policy.to_string(), None),
        (
            "Memory overcommit",
            format!("{} %", c.memory_overcommit_percent),
            None,
        ),
        ("Compatibility version", c.compatibility_version.to_string(), None),
        ("Id", c.id.to_string(), None),
        ("Description", c.description.clone(), None),
    ]);
    h.section("Hosts");
    hosts_of(&mut h, &names, |x| x.cluster_id == c.id);
    h.section("Virtual machines");
    vms_table(&mut h, &names, "cluster-vms", &vms, "No VMs in this cluster.");
    Ok(h.finish())
}

async fn clusters(ctx: &Ctx) -> Result<String, PortalError> {
    let names = Names::load(ctx).await?;
    let mut cls: Vec<&Cluster> = names.clusters.values().collect();
    cls.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Html::new();
    h.heading("Clusters", None);
    h.table_open(
        "clusters",
        &[
            "Name",
            "Data center",
            "CPU",
            "Scheduling",
            "Memory overcommit",
            "Hosts",
            "VMs",
        ],
        None,
    );
    for c in &cls {
        let vms = ctx
            .db()
            .vm_count(&VmFilter {
                cluster: Some(Ref::Id(c.id)),
                ..Default::default()
            })
            .await?;
        let hosts = names.hosts.values().filter(|h| h.cluster_id == c.id).count();
        h.row_open(Some(&c.id.to_string()))
            .cell_link(&format!("/portal/clusters/{}", c.id), &c.name)
            .cell(names.dc(c.data_center_id))
            .cell(format!("{} ({})", c.cpu_type, c.cpu_architecture))
            .cell(c.scheduling_policy)
            .cell(format!("{} %", c.memory_overcommit_percent))
            .cell_num(hosts)
            .cell_num(vms)
            .raw("</tr>");
    }
    h.table_close("No clusters.", 7, cls.is_empty());
    Ok(h.finish())
}

fn hosts_table(ctx: &Ctx, h: &mut Html, names: &Names, f: &FormCtx, with_actions: bool) {
    let _ = f;
    let hosts = names.sorted_hosts();
    h.raw("<div data-region=\"hosts\">");
    let mut cols = vec!["Name", "Status", "Cluster", "SPM", "CPU", "Memory"];
    if with_actions {
        cols.push("Address");
        cols.push("Actions");
    }
    h.table_open("hosts", &cols, Some("hosts"));
    for host in &hosts {
        let id = host.id.to_string();
        let rt = ctx.engine.cmds.app.host_rt(host.id);
        h.row_open(Some(&id))
            .cell_link(&format!("/portal/hosts/{id}"), &host.name)
            .raw("<td>")
            .badge(host.status, Some(&format!("host:{id}")))
            .raw("</td>")
            .cell(names.cluster(host.cluster_id))
            .cell(match host.spm_status {
                SpmStatus::None => String::new(),
                s => s.to_string(),
            })
            .raw("<td class=\"num\" data-live-cpu=\"")
            .text(&id)
            .raw("\">")
            .text(format!("{:.0} %", rt.cpu_load_pct))
            .raw("</td><td>");
        let total = rt.mem_total_mib << 20;
        h.usage(
            total.saturating_sub(rt.mem_free_mib << 20),
            total,
            Some(&format!("hostmem:{id}")),
        );
        h.raw("</td>");
        if with_actions {
            h.cell(format!("{}:{}", host.address, host.port));
            h.raw("<td class=\"acts\">");
            act_button(
                h,
                &format!("/portal/hosts/{id}/maintenance"),
                "Maintenance",
                Some(&format!(
                    "Move host {} to maintenance? Its VMs migrate away (or stop when they cannot).",
                    host.name
                )),
                "",
                "small secondary",
            );
            act_button(
                h,
                &format!("/portal/hosts/{id}/activate"),
                "Activate",
                None,
                "",
                "small",
            );
            h.raw("</td>");
        }
        h.raw("</tr>");
    }
    h.table_close("No hosts.", cols.len(), hosts.is_empty());
    h.raw("</div>");
}

async fn hosts(ctx: &Ctx, f: &FormCtx) -> Result<String, PortalError> {
    let names = Names::load(ctx).await?;
    let mut h = Html::new();
    h.heading("Hosts", None);
    hosts_table(ctx, &mut h, &names, f, true);
    h.raw("<div class=\"charts\">");
    for host in names.sorted_hosts() {
        h.chart("host", &host.id.to_string(), &host.name);
    }
    h.raw("</div>");
    Ok(h.finish())
}

async fn host(ctx: &Ctx, f: &FormCtx, id: &str) -> Result<String, PortalError> {
    let id: HostUuid = page_id("host", id)?;
    let host = ctx.engine.cmds.app.host(id).await?;
    let names = Names::load(ctx).await?;
    let rt = ctx.engine.cmds.app.host_rt(id);
    let vms = ctx
        .db()
        .vm_list(&ListQuery::filtered(VmFilter {
            host: Some(Ref::Id(id)),
            ..Default::default()
        }))
        .await?;
    let sid = id.to_string();
    let mut h = Html::new();
    h.head_open(format!("Host {}", host.name))
        .badge(host.status, Some(&format!("host:{sid}")))
        .raw("</div>");
    h.raw("<div class=\"toolbar\">");
    h.action(
        f,
        &format!("/portal/hosts/{sid}/maintenance"),
        "Maintenance",
        Some(&format!(
            "Move host {} to maintenance? Its VMs migrate away (or stop when they cannot).",
            host.name
        )),
        "secondary",
    );
    h.action(f, &format!("/portal/hosts/{sid}/activate"), "Activate", None, "");
    h.raw("</div>");
    h.facts(&[
        ("Address", format!("{}:{}", host.address, host.port)),
        ("Cluster", names.cluster(host.cluster_id)),
        ("Status detail", host.status_detail.clone().unwrap_or_default()),
        (
            "SPM",
            format!("{} (priority {})", host.spm_status, host.spm_priority),
        ),
        (
            "CPU cores",
            host.cpu_cores.map(|c| c.to_string()).unwrap_or_default(),
        ),
        ("Memory", host.memory_bytes.map(bytes).unwrap_or_default()),
        ("CPU load", format!("{:.1} %", rt.cpu_load_pct)),
        (
            "Memory free",
            format!(
                "{} of {}",
                bytes(rt.mem_free_mib << 20),
                bytes(rt.mem_total_mib << 20)
            ),
        ),
        (
            "Certificate",
            host.certificate_fingerprint.clone().unwrap_or_default(),
        ),
        ("Last seen", host.last_seen_at.map(time).unwrap_or_default()),
    ]);
    h.raw("<div class=\"charts\">");
    h.chart("host", &sid, "CPU and memory");
    h.raw("</div>");
    h.section("VMs on this host");
    h.table_open("host-vms", &["Name", "Status", "Memory", "vCPUs"], None);
    for v in &vms {
        let vid = v.id.to_string();
        h.row_open(Some(&vid))
            .cell_link(&format!("/portal/vms/{vid}"), &v.name)
            .raw("<td>")
            .badge(v.runtime.status, Some(&format!("vm:{vid}")))
            .raw("</td>")
            .cell_num(bytes(v.memory_bytes))
            .cell_num(v.cpu.vcpus())
            .raw("</tr>");
    }
    h.table_close("No VM runs here.", 4, vms.is_empty());
    Ok(h.finish())
}

// ---------------------------------------------------------------------------------- storage

fn sd_table(h: &mut Html, names: &Names, mem: &HashMap<SdUuid, PoolMember>, actions: Option<&FormCtx>) {
    let mut sds: Vec<&StorageDomain> = names.sds.values().collect();
    sds.sort_by(|a, b| a.name.cmp(&b.name));
    h.raw("<div data-region=\"sds\">");
    let mut cols = vec!["Name", "Status", "Data center", "Type", "Storage", "Used"];
    if actions.is_some() {
        cols.push("Path");
        cols.push("Actions");
    }
    h.table_open("storagedomains", &cols, Some("sds"));
    for sd in &sds {
        let id = sd.id.to_string();
        let m = mem.get(&sd.id);
        let status = m.map(|m| m.status).unwrap_or(SdStatus::Unattached);
        h.raw("<tr data-id=\"")
            .text(&id)
            .raw("\" data-v=\"")
            .text(status)
            .raw("\">")
            .cell_link(&format!("/portal/storagedomains/{id}"), &sd.name)
            .raw("<td>")
            .badge(status, None)
            .raw("</td>")
            .cell(
                m.map(|m| {
                    format!(
                        "{}{}",
                        names.dc(m.data_center_id),
                        if m.master { " (master)" } else { "" }
                    )
                })
                .unwrap_or_default(),
            )
            .cell(sd.domain_type)
            .cell(sd.storage_type)
            .raw("<td>");
        match (sd.capacity_bytes, sd.free_bytes) {
            (Some(c), Some(fr)) => {
                h.usage(c.saturating_sub(fr), c, Some(&format!("sd:{id}")));
            }
            _ => {
                h.raw("<span class=\"muted\">unknown</span>");
            }
        }
        h.raw("</td>");
        if actions.is_some() {
            h.cell(match &sd.address {
                Some(a) => format!("{a}:{}", sd.path),
                None => sd.path.clone(),
            });
            h.raw("<td class=\"acts\">");
            match m {
                None => {
                    for dc in names.dcs.values() {
                        act_button(
                            h,
                            &format!("/portal/storagedomains/{id}/attach?dc={}", dc.id),
                            &format!("Attach to {}", dc.name),
                            None,
                            "",
                            "small",
                        );
                    }
                    act_button(
                        h,
                        &format!("/portal/storagedomains/{id}/remove"),
                        "Remove",
                        Some(&format!(
                            "Remove storage domain {} from the engine (its data stays on storage)?",
                            sd.name
                        )),
                        "",
                        "small danger",
                    );
                }
                Some(m) if m.status == SdStatus::Active => {
                    act_button(
                        h,
                        &format!("/portal/storagedomains/{id}/deactivate"),
                        "Maintenance",
                        Some(&format!("Move storage domain {} to maintenance?", sd.name)),
                        "",
                        "small secondary",
                    );
                }
                Some(m) if matches!(m.status, SdStatus::Maintenance | SdStatus::Inactive) => {
                    act_button(
                        h,
                        &format!("/portal/storagedomains/{id}/activate"),
                        "Activate",
                        None,
                        "",
                        "small",
                    );
                    if m.status == SdStatus::Maintenance {
                        act_button(
                            h,
                            &format!("/portal/storagedomains/{id}/detach"),
                            "Detach",
                            Some(&format!(
                                "Detach storage domain {} from its data center?",
                                sd.name
                            )),
                            "",
                            "small danger",
                        );
                    }
                }
                Some(_) => {}
            }
            h.raw("</td>");
        }
        h.raw("</tr>");
    }
    h.table_close("No storage domains.", cols.len(), sds.is_empty());
    h.raw("</div>");
}

async fn storage_domains(ctx: &Ctx, f: &FormCtx) -> Result<String, PortalError> {
    let names = Names::load(ctx).await?;
    let mem = members(ctx, names.dcs.keys().copied()).await?;
    let mut h = Html::new();
    h.heading("Storage domains", None);
    sd_table(&mut h, &names, &mem, Some(f));
    h.raw("<details class=\"panel\" id=\"add-sd\"><summary>Add a storage domain</summary>");
    h.form_open(f, "/portal/storagedomains", None, "grid-form");
    h.input("Name", "name", "text", "", "required");
    h.select(
        "Storage type",
        "storage_type",
        &[
            ("localfs".into(), "local directory".into()),
            ("posixfs".into(), "POSIX file system".into()),
            ("nfs".into(), "NFS".into()),
        ],
        Some("localfs"),
    );
    h.input(
        "NFS server",
        "address",
        "text",
        "",
        "placeholder=\"for NFS only\"",
    );
    h.input(
        "Path",
        "path",
        "text",
        "",
        "required placeholder=\"/srv/storage/data2\"",
    );
    let up: Vec<(String, String)> = names
        .sorted_hosts()
        .iter()
        .filter(|h| h.status == HostStatus::Up)
        .map(|h| (h.id.to_string(), h.name.clone()))
        .collect();
    h.select("Created by host", "host", &up, None);
    let mut dcs: Vec<(String, String)> = vec![(String::new(), "(stay unattached)".into())];
    dcs.extend(names.dcs.values().map(|d| (d.id.to_string(), d.name.clone())));
    h.select("Attach to", "dc", &dcs, None);
    h.raw("<button type=\"submit\">Add storage domain</button></form></details>");
    Ok(h.finish())
}

/// One storage domain: where it is, its use, and the disks on it (with the VMs using them).
async fn storage_domain(ctx: &Ctx, f: &FormCtx, id: &str) -> Result<String, PortalError> {
    let sd_id: SdUuid = page_id("storage domain", id)?;
    let sd = ctx
        .db()
        .sd_get(sd_id)
        .await?
        .ok_or_else(|| missing("storage domain", id))?;
    let names = Names::load(ctx).await?;
    let mem = members(ctx, names.dcs.keys().copied()).await?;
    let m = mem.get(&sd.id);
    let status = m.map(|m| m.status).unwrap_or(SdStatus::Unattached);
    let disks = ctx
        .db()
        .disk_list(
            &ListQuery::filtered(DiskFilter {
                storage_domain: Some(Ref::Id(sd.id)),
                ..Default::default()
            })
            .sort_by(DiskSort::Name, SortDir::Asc),
        )
        .await?;
    let mut h = Html::new();
    h.head_open(format!("Storage domain {}", sd.name))
        .badge(status, None)
        .raw("</div>");
    let used = match (sd.capacity_bytes, sd.free_bytes) {
        (Some(c), Some(f)) => format!(
            "{} of {} ({} free)",
            bytes(c.saturating_sub(f)),
            bytes(c),
            bytes(f)
        ),
        _ => "unknown".into(),
    };
    let provisioned: u64 = disks.iter().map(|d| d.provisioned_size).sum();
    h.facts(&[
        ("Type", format!("{} on {}", sd.domain_type, sd.storage_type)),
        (
            "Path",
            match &sd.address {
                Some(a) => format!("{a}:{}", sd.path),
                None => sd.path.clone(),
            },
        ),
        (
            "Data center",
            m.map(|m| {
                format!(
                    "{}{}",
                    names.dc(m.data_center_id),
                    if m.master { " (master)" } else { "" }
                )
            })
            .unwrap_or_else(|| "none (unattached)".into()),
        ),
        ("Used", used),
        (
            "Low space",
            format!(
                "{}warning under {} % free, critical (no new disks) under {} GB",
                match sd.low_space() {
                    Some(crate::model::LowSpace::Critical) => "CRITICAL now — ",
                    Some(crate::model::LowSpace::Warning) => "LOW now — ",
                    None => "",
                },
                sd.warning_low_space_indicator,
                sd.critical_space_action_blocker
            ),
        ),
        ("Provisioned to disks", bytes(provisioned)),
        ("Format", format!("V{}", sd.format_version)),
        ("Id", sd.id.to_string()),
        ("Description", sd.description.clone()),
    ]);
    h.section("Disks");
    h.table_open(
        "sd-disks",
        &["Alias", "Status", "Size", "Allocated", "Format", "Used by"],
        None,
    );
    for d in &disks {
        let mut users = Vec::new();
        for a in ctx.db().attachments_of_disk(d.id).await? {
            if let Some(v) = ctx.db().vm_get(a.vm_id).await? {
                users.push(v.name);
            }
        }
        h.raw("<tr data-id=\"").text(d.id).raw("\">");
        disk_cells(&mut h, d);
        h.cell(users.join(", ")).raw("</tr>");
    }
    h.table_close("No disks on this domain.", 6, disks.is_empty());
    if let Some(m) = m.filter(|m| m.status == SdStatus::Active && sd.domain_type == SdType::Data) {
        sd_import_sections(ctx, f, &mut h, &sd, m.data_center_id, &names).await?;
    }
    Ok(h.finish())
}

/// oVirt's "VM Import" and "Template Import" tabs of an active data domain: what its OVF
/// stores describe that the engine has no record of, each with a form to register it into a
/// cluster of the domain's data center; and the action that writes the stores now.
async fn sd_import_sections(
    ctx: &Ctx,
    f: &FormCtx,
    h: &mut Html,
    sd: &StorageDomain,
    dc: DcId,
    names: &Names,
) -> Result<(), PortalError> {
    let mut clusters: Vec<(String, String)> = names
        .clusters
        .values()
        .filter(|c| c.data_center_id == dc)
        .map(|c| (c.id.to_string(), c.name.clone()))
        .collect();
    clusters.sort_by(|a, b| a.1.cmp(&b.1));
    for (kind, title, path) in [
        (OvfEntityType::Vm, "VM import", "vms"),
        (OvfEntityType::Template, "Template import", "templates"),
    ] {
        h.section(title);
        let found = match ctx.cmds().unregistered_entities(sd.id, kind).await {
            Ok(f) => f,
            Err(e) => {
                h.raw("<p class=\"muted\">The domain's OVF stores cannot be read now: ")
                    .text(e)
                    .raw("</p>");
                continue;
            }
        };
        h.table_open(
            &format!("sd-import-{path}"),
            &["Name", "Memory", "CPUs", "Disks", "Register"],
            None,
        );
        for e in &found {
            let (mem, cpus) = match e {
                crate::ovf::OvfEntity::Vm(v) => (v.vm.memory_bytes, v.vm.cpu.vcpus()),
                crate::ovf::OvfEntity::Template(t) => (t.template.memory_bytes, t.template.cpu.vcpus()),
            };
            h.raw("<tr data-id=\"").text(e.id()).raw("\">");
            h.cell(e.name())
                .cell_num(bytes(mem))
                .cell_num(cpus)
                .cell_num(e.disks().len());
            h.raw("<td>");
            h.form_open(
                f,
                &format!("/portal/storagedomains/{}/{path}/{}/register", sd.id, e.id()),
                None,
                "inline",
            );
            h.select("Cluster", "cluster", &clusters, None).input(
                "Name",
                "name",
                "text",
                "",
                "placeholder=\"as on storage\"",
            );
            if kind == OvfEntityType::Vm {
                h.raw("<label><input type=\"checkbox\" name=\"reassign_macs\" value=\"1\"> new MACs if taken</label>");
            }
            h.raw("<label><input type=\"checkbox\" name=\"allow_partial\" value=\"1\"> without missing disks</label>")
                .raw("<button type=\"submit\" class=\"small\">Register</button></form></td></tr>");
        }
        h.table_close(
            "Nothing to register: the engine knows all its OVF stores describe.",
            5,
            found.is_empty(),
        );
    }
    h.action(
        f,
        &format!("/portal/storagedomains/{}/update-ovf", sd.id),
        "Update OVF stores",
        None,
        "small secondary",
    );
    Ok(())
}

/// The controller a disk goes on (SATA and IDE disks change only while the VM is down).
fn interface_field(h: &mut Html) {
    let opts: Vec<(String, String)> = [
        ("virtio", "VirtIO"),
        ("virtio_scsi", "VirtIO-SCSI"),
        ("sata", "SATA"),
        ("ide", "IDE"),
    ]
    .iter()
    .map(|(v, l)| (v.to_string(), l.to_string()))
    .collect();
    h.select("Interface", "interface", &opts, Some("virtio"));
}

/// A new disk's storage domain and format (the size field is the caller's).
fn new_disk_fields(h: &mut Html, names: &Names) {
    let mut sds: Vec<(String, String)> = names
        .sds
        .values()
        .filter(|s| s.domain_type == SdType::Data)
        .map(|s| (s.id.to_string(), s.name.clone()))
        .collect();
    sds.sort_by(|a, b| a.1.cmp(&b.1));
    h.select("Storage domain", "sd", &sds, None);
    h.select(
        "Format",
        "disk_format",
        &[
            ("cow".into(), "qcow2 (thin)".into()),
            ("raw".into(), "raw".into()),
        ],
        Some("cow"),
    );
}

/// A disk's alias, status, size, allocation and format cells.
fn disk_cells(h: &mut Html, d: &crate::model::Disk) {
    h.cell(&d.name)
        .raw("<td>")
        .badge(d.status, None)
        .raw("</td>")
        .cell_num(bytes(d.provisioned_size))
        .cell_num(bytes(d.actual_size))
        .cell(format!("{}{}", d.format, if d.sparse { ", thin" } else { "" }));
}

/// Disks no VM or template has, as (id, name) choices.
async fn floating_disks(ctx: &Ctx) -> Result<Vec<(String, String)>, PortalError> {
    let q = ListQuery::filtered(DiskFilter {
        floating: Some(true),
        ..Default::default()
    })
    .sort_by(DiskSort::Name, SortDir::Asc);
    Ok(ctx
        .db()
        .disk_list(&q)
        .await?
        .into_iter()
        .map(|d| (d.id.to_string(), d.name))
        .collect())
}

async fn disks(ctx: &Ctx, f: &FormCtx) -> Result<String, PortalError> {
    let names = Names::load(ctx).await?;
    let q = ListQuery::filtered(DiskFilter {
        name: ctx.q("name").map(|n| TextMatch::new(n).case_insensitive()),
        ..Default::default()
    })
    .sort_by(DiskSort::Name, SortDir::Asc);
    let disks = ctx.db().disk_list(&q).await?;
    let mut h = Html::new();
    h.heading("Disks", Some(&format!("{} disk(s)", disks.len())));
    search_form(&mut h, "/portal/disks", ctx.q("name"));
    // Copy (the command checks that the disk's VMs are down and the domain active), move (also
    // under a running VM: a live storage migration) and extend (also under a running VM);
    // their progress shows with the running jobs.
    let movable: Vec<(String, String)> = disks
        .iter()
        .filter(|d| d.status == DiskStatus::Ok)
        .map(|d| (d.id.to_string(), d.name.clone()))
        .collect();
    let mut domains: Vec<(String, String)> = names
        .sds
        .values()
        .filter(|s| s.domain_type == SdType::Data)
        .map(|s| (s.id.to_string(), s.name.clone()))
        .collect();
    domains.sort_by(|a, b| a.1.cmp(&b.1));
    // A region: the disks the forms offer follow the live list.
    h.raw("<div data-region=\"disk-forms\">");
    if !movable.is_empty() && !domains.is_empty() {
        h.raw("<div class=\"forms\">");
        h.form_open(f, "/portal/disks/copy", None, "inline-form");
        h.select("Copy disk", "disk", &movable, None);
        h.select("to", "sd", &domains, None);
        h.input(
            "as",
            "name",
            "text",
            "",
            "placeholder=\"name (default: NAME_Copy)\" pattern=\"[A-Za-z0-9._\\-]+\"",
        );
        h.raw("<button type=\"submit\" class=\"secondary\">Copy</button></form>");
        h.form_open(f, "/portal/disks/move", None, "inline-form");
        h.select("Move disk", "disk", &movable, None);
        h.select("to", "sd", &domains, None);
        h.raw("<button type=\"submit\" class=\"secondary\">Move</button></form>");
        h.form_open(f, "/portal/disks/extend", None, "inline-form");
        h.select("Extend disk", "disk", &movable, None);
        h.input(
            "to (MiB)",
            "size_mib",
            "number",
            "",
            "min=\"1\" placeholder=\"MiB\" required",
        );
        h.raw("<button type=\"submit\" class=\"secondary\">Extend</button></form></div>");
    }
    h.raw("</div>");
    h.raw("<div data-region=\"disks\">");
    let set = ctx.q("name").is_none().then_some("disks");
    h.table_open(
        "disks",
        &[
            "Alias",
            "Status",
            "Size",
            "Allocated",
            "Format",
            "Storage domain",
            "Id",
            "",
        ],
        set,
    );
    for d in &disks {
        let id = d.id.to_string();
        h.raw("<tr data-id=\"")
            .text(&id)
            .raw("\" data-v=\"")
            .text(format!("{}:{}", d.status, d.provisioned_size))
            .raw("\">");
        disk_cells(&mut h, d);
        h.cell(names.sd(d.storage_domain_id))
            .raw("<td class=\"mono\">")
            .text(&id)
            .raw("</td><td class=\"acts\">");
        act_button(
            &mut h,
            &format!("/portal/disks/{id}/remove"),
            "Remove",
            Some(&format!("Remove disk {} and its data?", d.name)),
            "",
            "small danger",
        );
        h.raw("</td></tr>");
    }
    h.table_close("No disks.", 8, disks.is_empty());
    h.raw("</div>");
    Ok(h.finish())
}

fn search_form(h: &mut Html, action: &str, value: Option<&str>) {
    h.raw("<form method=\"get\" class=\"search\" action=\"")
        .text(action)
        .raw("\"><input type=\"search\" name=\"name\" placeholder=\"name (web*)\" value=\"")
        .text(value.unwrap_or(""))
        .raw("\"><button type=\"submit\" class=\"secondary\">Filter</button></form>");
}

// -------------------------------------------------------------------------------------- VMs

async fn vms(ctx: &Ctx, f: &FormCtx) -> Result<String, PortalError> {
    let names = Names::load(ctx).await?;
    let filter = VmFilter {
        name: ctx.q("name").map(|n| TextMatch::new(n).case_insensitive()),
        ..Default::default()
    };
    let vms = ctx
        .db()
        .vm_list(&ListQuery::filtered(filter).sort_by(VmSort::Name, SortDir::Asc))
        .await?;
    let latest = ctx.portal.history.vm_latest();
    let mut h = Html::new();
    h.heading("Virtual machines", Some(&format!("{} VM(s)", vms.len())));
    search_form(&mut h, "/portal/vms", ctx.q("name"));
    h.raw("<div data-region=\"vms\">");
    let set = ctx.q("name").is_none().then_some("vms");
    h.table_open(
        "vms",
        &[
            "Name", "Status", "Host", "CPU", "Memory", "vCPUs", "Template", "Cluster", "Actions",
        ],
        set,
    );
    for v in &vms {
        let id = v.id.to_string();
        h.row_open(Some(&id))
            .cell_link(&format!("/portal/vms/{id}"), &v.name)
            .raw("<td>")
            .badge(v.runtime.status, Some(&format!("vm:{id}")))
            .raw("</td><td data-live-host=\"")
            .text(&id)
            .raw("\">")
            .text(names.host(v.runtime.run_on_host.filter(|_| v.runtime.status.is_running())))
            .raw("</td>")
            .cell_num(match latest.get(&v.id) {
                Some(p) if v.runtime.status.is_running() => format!("{:.0} %", p.cpu),
                _ => String::new(),
            })
            .cell_num(bytes(v.memory_bytes))
            .cell_num(v.cpu.vcpus())
            .cell(names.template(v.template_id))
            .cell(names.cluster(v.cluster_id));
        vm_row_actions(&mut h, v);
        h.raw("</tr>");
    }
    h.table_close("No VMs.", 9, vms.is_empty());
    h.raw("</div>");
    new_vm_form(&mut h, f, &names, None, ctx.q("template").is_some());
    Ok(h.finish())
}

/// The "new VM" form: from Blank with a disk and direct kernel boot, or from a template.
fn new_vm_form(h: &mut Html, f: &FormCtx, names: &Names, template: Option<&Template>, open: bool) {
    h.raw("<details class=\"panel\" id=\"new-vm\"");
    if open || template.is_some() {
        h.raw(" open");
    }
    h.raw("><summary>");
    match template {
        Some(t) => h.raw("New VM from template ").text(&t.name),
        None => h.raw("New VM"),
    };
    h.raw("</summary>");
    h.form_open(f, "/portal/vms", None, "grid-form");
    h.input(
        "Name",
        "name",
        "text",
        "",
        "required pattern=\"[A-Za-z0-9._\\-]+\"",
    );
    let mut cls: Vec<(String, String)> = names
        .clusters
        .values()
        .map(|c| (c.id.to_string(), c.name.clone()))
        .collect();
    cls.sort_by(|a, b| a.1.cmp(&b.1));
    h.select("Cluster", "cluster", &cls, None);
    match template {
        Some(t) => {
            h.raw("<input type=\"hidden\" name=\"template\" value=\"")
                .text(t.id)
                .raw("\">");
        }
        None => {
            let mut ts: Vec<(String, String)> = names
                .templates
                .values()
                .filter(|t| t.status == TemplateStatus::Ok)
                .map(|t| (t.id.to_string(), t.name.clone()))
                .collect();
            ts.sort_by(|a, b| (a.1 != "Blank", &a.1).cmp(&(b.1 != "Blank", &b.1)));
            h.select("Template", "template", &ts, Some(&BLANK_TEMPLATE_ID.to_string()));
        }
    }
    h.input(
        "Memory (MiB)",
        "memory_mib",
        "number",
        "",
        "min=\"16\" placeholder=\"template's\"",
    );
    h.input(
        "vCPUs",
        "cpus",
        "number",
        "",
        "min=\"1\" max=\"64\" placeholder=\"template's\"",
    );
    // Restarted by the engine when its host dies (it then holds a VM lease).
    h.input("Highly available", "ha", "checkbox", "on", "");
    h.input(
        "HA priority",
        "ha_priority",
        "number",
        "1",
        "min=\"0\" max=\"100\"",
    );
    // What the node does when storage errors pause it (a highly available VM: always kill).
    let behaviors: Vec<(String, String)> = crate::model::ResumeBehavior::ALL
        .iter()
        .map(|b| (b.as_str().to_string(), b.as_str().replace('_', " ")))
        .collect();
    h.select(
        "On storage errors",
        "resume_behavior",
        &behaviors,
        Some("auto_resume"),
    );
    if template.is_none() {
        h.raw("<fieldset><legend>New disk (VMs from Blank)</legend>");
        h.input("Size (MiB, 0: none)", "disk_mib", "number", "0", "min=\"0\"");
        new_disk_fields(h, names);
        h.raw("</fieldset>");
    }
    // Templates carry no boot configuration: a VM from one names its kernel here too.
    h.raw("<fieldset><legend>Direct kernel boot (optional)</legend>");
    h.input(
        "Kernel",
        "kernel",
        "text",
        "",
        "placeholder=\"/path/on/the/hosts/vmlinuz\"",
    );
    h.input("Initrd", "initrd", "text", "", "");
    h.input("Command line", "cmdline", "text", "", "");
    h.raw("</fieldset>");
    h.raw("<button type=\"submit\">Create VM</button></form></details>");
}

async fn vm(ctx: &Ctx, f: &FormCtx, id: &str) -> Result<String, PortalError> {
    let id: VmId = page_id("VM", id)?;
    let db = ctx.db();
    let v = db.vm_get(id).await?.ok_or_else(|| missing("VM", id))?;
    let names = Names::load(ctx).await?;
    let atts = db.attachments_of_vm(id).await?;
    let mut disks = Vec::with_capacity(atts.len());
    for a in &atts {
        if let Some(d) = db.disk_get(a.disk_id).await? {
            disks.push((a.clone(), d));
        }
    }
    let snaps = db.snapshots_of_vm(id).await?;
    let nics = db.nics_of_vm(id).await?;
    let sid = id.to_string();
    let st = v.runtime.status;
    let mut h = Html::new();
    h.head_open(format!("VM {}", v.name))
        .badge(st, Some(&format!("vm:{sid}")))
        .raw("<span class=\"sub\">on <span data-live-host=\"")
        .text(&sid)
        .raw("\">")
        .text(names.host(v.runtime.run_on_host.filter(|_| st.is_running())))
        .raw("</span></span></div>");

    // Actions: all are rendered; the script shows those that fit the live status.
    h.raw("<div class=\"toolbar\" data-vm-acts=\"")
        .text(&sid)
        .raw("\" data-state=\"")
        .raw(vm_status_class(st))
        .raw("\" data-status=\"")
        .text(st)
        .raw("\">");
    let act = |h: &mut Html, verb: &str, label: &str, confirm: Option<String>, when: &str, class: &str| {
        h.raw("<span class=\"when\" data-when=\"").text(when).raw("\">");
        h.action(
            f,
            &format!("/portal/vms/{sid}/{verb}"),
            label,
            confirm.as_deref(),
            class,
        );
        h.raw("</span>");
    };
    act(&mut h, "start", "Start", None, "down", "");
    act(
        &mut h,
        "shutdown",
        "Shut down",
        Some(format!("Shut down VM {} (ACPI)?", v.name)),
        "running",
        "secondary",
    );
    act(
        &mut h,
        "stop",
        "Power off",
        Some(format!(
            "Power off VM {} now? Unsaved guest data is lost.",
            v.name
        )),
        "running",
        "danger",
    );
    act(
        &mut h,
        "reboot",
        "Reboot",
        Some(format!(
            "Reboot VM {} now (a reset)? Unsaved guest data is lost.",
            v.name
        )),
        "up",
        "secondary",
    );
    act(&mut h, "pause", "Pause", None, "up", "secondary");
    act(&mut h, "resume", "Resume", None, "paused", "secondary");
    act(
        &mut h,
        "remove",
        "Remove",
        Some(format!(
            "Remove VM {} and its disks? This cannot be undone.",
            v.name
        )),
        "down",
        "danger",
    );
    h.raw("</div>");

    // ISO disks, for the CD-ROM's facts and form.
    let mut isos = vec![(String::new(), "(empty)".to_string())];
    isos.extend(
        db.disk_list(&ListQuery::new().sort_by(DiskSort::Name, SortDir::Asc))
            .await?
            .into_iter()
            .filter(|d| d.content_type == DiskContentType::Iso && d.status == DiskStatus::Ok)
            .map(|d| (d.id.to_string(), d.name)),
    );
    let cd_name = |d: Option<DiskId>| match d {
        None => "(empty)".to_string(),
        Some(d) => isos
            .iter()
            .find(|(id, _)| *id == d.to_string())
            .map_or_else(|| d.to_string(), |(_, n)| n.clone()),
    };
    h.raw("<div class=\"grid2\"><section>");
    let tag_names = db
        .tags_of(crate::model::TagTarget::Vm(v.id))
        .await?
        .into_iter()
        .map(|t| t.name)
        .collect::<Vec<_>>()
        .join(", ");
    h.facts(&[
        ("Id", sid.clone()),
        ("Cluster", names.cluster(v.cluster_id)),
        ("Template", names.template(v.template_id)),
        ("Memory", bytes(v.memory_bytes)),
        (
            "vCPUs",
            format!(
                "{} ({} socket × {} core × {} thread)",
                v.cpu.vcpus(),
                v.cpu.sockets,
                v.cpu.cores,
                v.cpu.threads
            ),
        ),
        (
            "High availability",
            if v.ha.enabled {
                format!("on (priority {})", v.ha.priority)
            } else {
                "off".into()
            },
        ),
        (
            "On storage errors",
            v.effective_resume_behavior().as_str().replace('_', " "),
        ),
        ("Kernel", v.os.kernel.clone().unwrap_or_default()),
        ("Command line", v.os.cmdline.clone().unwrap_or_default()),
        (
            "Boot order",
            v.os.boot_devices
                .iter()
                .map(|d| d.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("CD-ROM", cd_name(v.cdrom)),
        (
            "CD-ROM now",
            if st.is_running() {
                cd_name(v.run_cdrom)
            } else {
                String::new()
            },
        ),
        (
            "Status detail",
            vm_status_detail(v.runtime.status_detail.as_deref()),
        ),
        ("Tags", tag_names),
        ("Created", time(v.created_at)),
    ]);
    h.raw("</section><section>");
    h.raw("<div class=\"charts\">");
    h.chart("vm", &sid, "CPU and memory");
    h.raw("</div>");
    // Forms that take input.
    h.raw("<div class=\"forms\" data-vm-acts=\"")
        .text(&sid)
        .raw("\" data-state=\"")
        .raw(vm_status_class(st))
        .raw("\" data-status=\"")
        .text(st)
        .raw("\">");
    h.raw("<div data-when=\"up\">");
    h.form_open(f, &format!("/portal/vms/{sid}/migrate"), None, "inline-form");
    h.raw("");
    let mut targets = vec![(String::new(), "(scheduler chooses)".to_string())];
    targets.extend(
        names
            .sorted_hosts()
            .iter()
            .filter(|x| x.cluster_id == v.cluster_id && x.status == HostStatus::Up)
            .map(|x| (x.id.to_string(), x.name.clone())),
    );
    h.select("Migrate to", "host", &targets, None);
    h.raw("<button type=\"submit\" class=\"secondary\">Migrate</button></form></div>");
    h.form_open(f, &format!("/portal/vms/{sid}/snapshot"), None, "inline-form");
    h.input(
        "Snapshot",
        "description",
        "text",
        "",
        "placeholder=\"description\" required",
    );
    // Checked, as in oVirt's dialog; a VM that is down has no memory to save.
    h.input("Save memory", "memory", "checkbox", "on", "checked");
    h.raw("<button type=\"submit\" class=\"secondary\">Take snapshot</button></form>");
    // The CD-ROM: an ISO disk for the next start, or (checked) the running VM's drive now.
    h.form_open(f, &format!("/portal/vms/{sid}/cdrom"), None, "inline-form");
    let shown = if st.is_running() { v.run_cdrom } else { v.cdrom };
    h.select("CD-ROM", "iso", &isos, shown.map(|d| d.to_string()).as_deref());
    h.raw("<span data-when=\"running\">");
    h.input("in the running VM now", "current", "checkbox", "on", "checked");
    h.raw("</span><button type=\"submit\" class=\"secondary\">Change CD</button></form>");
    h.raw("<div data-when=\"down\">");
    h.form_open(f, &format!("/portal/vms/{sid}/template"), None, "inline-form");
    h.input(
        "Template",
        "name",
        "text",
        "",
        "placeholder=\"template name\" required pattern=\"[A-Za-z0-9._\\-]+\"",
    );
    h.raw("<button type=\"submit\" class=\"secondary\">Make template</button></form>");
    h.form_open(f, &format!("/portal/vms/{sid}/clone"), None, "inline-form");
    h.input(
        "Clone",
        "name",
        "text",
        "",
        "placeholder=\"new VM name\" required pattern=\"[A-Za-z0-9._\\-]+\"",
    );
    h.raw("<button type=\"submit\" class=\"secondary\">Clone VM</button></form></div>");
    h.raw("</div></section></div>");

    h.section("Disks");
    h.raw("<div data-region=\"vm-disks\">");
    h.table_open(
        "vm-disks",
        &[
            "Alias",
            "Status",
            "Size",
            "Allocated",
            "Format",
            "Storage domain",
            "Interface",
            "Boot",
            "Active",
            "Actions",
        ],
        Some(&format!("vmdisks:{sid}")),
    );
    for (a, d) in &disks {
        let did = d.id.to_string();
        h.raw("<tr data-id=\"")
            .text(d.id)
            .raw("\" data-v=\"")
            .text(d.status)
            .raw("\">")
            .cell(&d.name)
            .raw("<td>")
            .badge(d.status, None)
            .raw("</td>")
            .cell_num(bytes(d.provisioned_size))
            .cell_num(bytes(d.actual_size))
            .cell(d.format)
            .cell(names.sd(d.storage_domain_id))
            .cell(a.interface)
            .cell(if a.bootable { "yes" } else { "" })
            .cell(if a.active { "yes" } else { "no" })
            .raw("<td class=\"acts\">");
        // A running VM's disks are hot plugged and unplugged.
        if a.active {
            act_button(
                &mut h,
                &format!("/portal/vms/{sid}/disks/{did}/deactivate"),
                "Deactivate",
                Some(&format!(
                    "Deactivate disk {} of VM {}? A running guest loses it.",
                    d.name, v.name
                )),
                "",
                "small secondary",
            );
        } else {
            act_button(
                &mut h,
                &format!("/portal/vms/{sid}/disks/{did}/activate"),
                "Activate",
                None,
                "",
                "small secondary",
            );
        }
        act_button(
            &mut h,
            &format!("/portal/vms/{sid}/disks/{did}/detach"),
            "Detach",
            Some(&format!(
                "Detach disk {} from VM {}? A running guest loses it; the disk stays.",
                d.name, v.name
            )),
            "",
            "small danger",
        );
        h.raw("</td></tr>");
    }
    h.table_close("No disks.", 10, disks.is_empty());
    h.raw("</div>");
    // Disks for this VM: a floating one attached, or a new one (plugged into a running VM).
    let floating = floating_disks(ctx).await?;
    h.raw("<div class=\"forms\">");
    if !floating.is_empty() {
        h.form_open(f, &format!("/portal/vms/{sid}/attach-disk"), None, "inline-form");
        h.select("Attach disk", "disk", &floating, None);
        interface_field(&mut h);
        h.raw("<button type=\"submit\" class=\"secondary\">Attach</button></form>");
    }
    h.form_open(f, &format!("/portal/vms/{sid}/add-disk"), None, "inline-form");
    h.input("New disk (MiB)", "disk_mib", "number", "", "min=\"1\" required");
    new_disk_fields(&mut h, &names);
    interface_field(&mut h);
    h.raw("<button type=\"submit\" class=\"secondary\">Add disk</button></form>");
    h.raw("</div>");

    h.section("Snapshots");
    h.raw("<div data-region=\"vm-snapshots\">");
    // While a snapshot is previewed the VM runs on its data; the present is kept aside until
    // the preview is committed or undone.
    let previewing = snaps.iter().find(|s| s.status == SnapshotStatus::InPreview);
    if let Some(p) = previewing {
        h.raw("<p class=\"warn\" data-preview=\"")
            .text(p.id)
            .raw("\">Previewing snapshot \"")
            .text(&p.description)
            .raw("\". ");
        act_button(
            &mut h,
            &format!("/portal/vms/{sid}/commit-preview"),
            "Commit",
            Some(&format!(
                "Commit the preview of VM {}? The state kept aside is discarded.",
                v.name
            )),
            "down",
            "small",
        );
        act_button(
            &mut h,
            &format!("/portal/vms/{sid}/undo-preview"),
            "Undo",
            Some(&format!(
                "Undo the preview of VM {}? What changed while previewing is discarded.",
                v.name
            )),
            "down",
            "small secondary",
        );
        h.raw("</p>");
    }
    h.table_open(
        "vm-snapshots",
        &["Description", "Status", "Type", "Date", "Actions"],
        Some(&format!("snaps:{sid}")),
    );
    for s in &snaps {
        let ssid = s.id.to_string();
        h.raw("<tr data-id=\"")
            .text(&ssid)
            .raw("\" data-v=\"")
            .text(s.status)
            .raw("\">")
            .cell(if s.snapshot_type == SnapshotType::Active {
                "Current"
            } else {
                &s.description
            })
            .raw("<td>")
            .badge(s.status, None)
            .raw("</td>")
            .cell(if s.persist_memory {
                format!("{} with memory", s.snapshot_type)
            } else {
                s.snapshot_type.to_string()
            })
            .cell(time(s.created_at))
            .raw("<td class=\"acts\">");
        if s.snapshot_type == SnapshotType::Regular && previewing.is_none() {
            act_button(
                &mut h,
                &format!("/portal/vms/{sid}/snapshots/{ssid}/preview"),
                "Preview",
                None,
                "down",
                "small secondary",
            );
            if s.persist_memory {
                act_button(
                    &mut h,
                    &format!("/portal/vms/{sid}/snapshots/{ssid}/preview-memory"),
                    "Preview with memory",
                    None,
                    "down",
                    "small secondary",
                );
            }
        }
        if s.snapshot_type == SnapshotType::Regular && s.persist_memory {
            act_button(
                &mut h,
                &format!("/portal/vms/{sid}/snapshots/{ssid}/restore-memory"),
                "Restore with memory",
                Some(&format!(
                    "Restore VM {} to snapshot \"{}\" with its memory? Newer data is discarded; \
                     the VM resumes from the snapshot's moment at its next start.",
                    v.name, s.description
                )),
                "down",
                "small secondary",
            );
        }
        if s.snapshot_type == SnapshotType::Regular {
            act_button(
                &mut h,
                &format!("/portal/vms/{sid}/snapshots/{ssid}/restore"),
                "Restore",
                Some(&format!(
                    "Restore VM {} to snapshot \"{}\"? Newer data is discarded.",
                    v.name, s.description
                )),
                "down",
                "small secondary",
            );
            act_button(
                &mut h,
                &format!("/portal/vms/{sid}/snapshots/{ssid}/remove"),
                "Remove",
                Some(&format!(
                    "Remove snapshot \"{}\" (its data is merged)?",
                    s.description
                )),
                "",
                "small danger",
            );
            // A new VM as the snapshot was, whether this one runs or not.
            if s.status == SnapshotStatus::Ok {
                h.form_open(
                    f,
                    &format!("/portal/vms/{sid}/snapshots/{ssid}/clone"),
                    None,
                    "inline-form",
                );
                h.input(
                    "Clone",
                    "name",
                    "text",
                    "",
                    "placeholder=\"new VM name\" required pattern=\"[A-Za-z0-9._\\-]+\"",
                );
                h.raw("<button type=\"submit\" class=\"small secondary\">Clone</button></form>");
            }
        }
        h.raw("</td></tr>");
    }
    h.table_close("No snapshots.", 5, snaps.is_empty());
    h.raw("</div>");

    if !nics.is_empty() {
        h.section("Network interfaces");
        h.table_open("vm-nics", &["Name", "MAC", "Network", "Model", "Link"], None);
        for n in &nics {
            h.row_open(None)
                .cell(&n.name)
                .cell(n.mac)
                .cell(n.network.clone().unwrap_or_else(|| "(empty)".into()))
                .cell(n.interface)
                .cell(if n.linked { "up" } else { "down" })
                .raw("</tr>");
        }
        h.table_close("", 5, false);
    }

    if st.is_running() {
        h.raw("<p><a class=\"button\" download href=\"/portal/api/console.vv?vm=")
            .text(&sid)
            .raw("\">VNC console (remote-viewer file)</a></p>");
    }
    h.section("Serial console");
    h.raw("<pre class=\"console\" id=\"console\" data-console=\"")
        .text(&sid)
        .raw("\">")
        .raw(if st.is_running() {
            "loading…"
        } else {
            "(the VM is not running)"
        })
        .raw("</pre>");
    Ok(h.finish())
}

/// VMs per page of the snapshots page.
const SNAPSHOT_PAGE: u32 = 100;

/// The VMs whose snapshots page `page` lists.
async fn snapshot_page_vms(ctx: &Ctx, page: u32) -> Result<Vec<Vm>, PortalError> {
    Ok(ctx
        .db()
        .vm_list(
            &ListQuery::new()
                .sort_by(VmSort::Name, SortDir::Asc)
                .limit(SNAPSHOT_PAGE)
                .page(page),
        )
        .await?)
}

/// The live set of snapshots page `page`: its rows as `id=status`.
pub async fn snapshot_page_members(ctx: &Ctx, page: u32) -> Result<Vec<String>, PortalError> {
    let mut out = Vec::new();
    for v in snapshot_page_vms(ctx, page).await? {
        for s in ctx.db().snapshots_of_vm(v.id).await? {
            if s.snapshot_type != SnapshotType::Active {
                out.push(format!("{}={}", s.id, s.status));
            }
        }
    }
    Ok(out)
}

async fn snapshots(ctx: &Ctx) -> Result<String, PortalError> {
    const PAGE: u32 = SNAPSHOT_PAGE;
    let page: u32 = ctx.q("page").and_then(|p| p.parse().ok()).unwrap_or(1).max(1);
    let vms = snapshot_page_vms(ctx, page).await?;
    let mut h = Html::new();
    h.heading(
        "Snapshots",
        Some(&format!(
            "VMs {}–{}",
            (page - 1) * PAGE + 1,
            (page - 1) * PAGE + vms.len() as u32
        )),
    );
    h.raw("<div data-region=\"snapshots\">");
    let set = format!("snappage:{page}");
    h.table_open(
        "snapshots",
        &["VM", "Description", "Status", "Date", "Disks"],
        Some(&set),
    );
    let mut any = false;
    for v in &vms {
        for s in ctx.db().snapshots_of_vm(v.id).await? {
            if s.snapshot_type == SnapshotType::Active {
                continue;
            }
            any = true;
            h.raw("<tr data-id=\"")
                .text(s.id)
                .raw("\" data-v=\"")
                .text(s.status)
                .raw("\">")
                .cell_link(&format!("/portal/vms/{}", v.id), &v.name)
                .cell(&s.description)
                .raw("<td>")
                .badge(s.status, None)
                .raw("</td>")
                .cell(time(s.created_at))
                .cell_num(s.disks.len())
                .raw("</tr>");
        }
    }
    h.table_close("No snapshots on these VMs.", 5, !any);
    h.raw("</div>");
    h.raw("<p class=\"pager\">");
    if page > 1 {
        h.raw(&format!(
            "<a href=\"/portal/snapshots?page={}\">← previous VMs</a> ",
            page - 1
        ));
    }
    if vms.len() as u32 == PAGE {
        h.raw(&format!(
            "<a href=\"/portal/snapshots?page={}\">next VMs →</a>",
            page + 1
        ));
    }
    h.raw("</p>");
    Ok(h.finish())
}

async fn templates(ctx: &Ctx, f: &FormCtx) -> Result<String, PortalError> {
    let names = Names::load(ctx).await?;
    let ts = ctx
        .db()
        .template_list(&ListQuery::new().sort_by(TemplateSort::Name, SortDir::Asc))
        .await?;
    let mut h = Html::new();
    h.heading("Templates", None);
    h.raw("<div data-region=\"templates\">");
    h.table_open(
        "templates",
        &[
            "Name", "Status", "Memory", "vCPUs", "Cluster", "Disks", "Created", "Actions",
        ],
        Some("templates"),
    );
    for t in &ts {
        let id = t.id.to_string();
        let ndisks = if t.id == BLANK_TEMPLATE_ID {
            0
        } else {
            ctx.db().template_disks(t.id).await?.len()
        };
        h.raw("<tr data-id=\"")
            .text(&id)
            .raw("\" data-v=\"")
            .text(t.status)
            .raw("\">")
            .cell_link(&format!("/portal/templates/{id}"), &t.name)
            .raw("<td>")
            .badge(t.status, None)
            .raw("</td>")
            .cell_num(bytes(t.memory_bytes))
            .cell_num(t.cpu.vcpus())
            .cell(t.cluster_id.map(|c| names.cluster(c)).unwrap_or_default())
            .cell_num(ndisks)
            .cell(time(t.created_at))
            .raw("<td class=\"acts\">");
        if t.status == TemplateStatus::Ok {
            h.raw("<a class=\"button small\" href=\"/portal/templates?template=")
                .text(&id)
                .raw("#new-vm\">New VM</a>");
        }
        if t.id != BLANK_TEMPLATE_ID {
            act_button(
                &mut h,
                &format!("/portal/templates/{id}/remove"),
                "Remove",
                Some(&format!("Remove template {} and its disks?", t.name)),
                "",
                "small danger",
            );
        }
        h.raw("</td></tr>");
    }
    h.table_close("No templates.", 8, ts.is_empty());
    h.raw("</div>");
    let chosen = ctx
        .q("template")
        .and_then(|t| t.parse::<TemplateId>().ok())
        .and_then(|t| ts.iter().find(|x| x.id == t));
    match chosen {
        Some(t) => new_vm_form(&mut h, f, &names, Some(t), true),
        None => new_vm_form(&mut h, f, &names, None, false),
    }
    Ok(h.finish())
}

/// A template: what VMs made from it get (memory, CPUs, disks) and the VMs made from it.
async fn template(ctx: &Ctx, id: &str) -> Result<String, PortalError> {
    let t_id: TemplateId = page_id("template", id)?;
    let t = ctx
        .db()
        .template_get(t_id)
        .await?
        .ok_or_else(|| missing("template", id))?;
    let names = Names::load(ctx).await?;
    let disks = if t.id == BLANK_TEMPLATE_ID {
        Vec::new()
    } else {
        ctx.db().template_disks(t.id).await?
    };
    let vms = first_vms(
        ctx,
        VmFilter {
            template: Some(Ref::Id(t.id)),
            ..Default::default()
        },
    )
    .await?;
    let mut h = Html::new();
    h.head_open(format!("Template {}", t.name))
        .badge(t.status, None)
        .raw("</div>");
    if t.status == TemplateStatus::Ok {
        h.raw("<div class=\"toolbar\"><a class=\"button\" href=\"/portal/templates?template=")
            .text(t.id)
            .raw("#new-vm\">New VM from it</a></div>");
    }
    h.facts(&[
        ("Memory", bytes(t.memory_bytes)),
        ("vCPUs", t.cpu.vcpus().to_string()),
        (
            "Cluster",
            t.cluster_id.map(|c| names.cluster(c)).unwrap_or_default(),
        ),
        ("Created", time(t.created_at)),
        ("Id", t.id.to_string()),
        ("Description", t.description.clone()),
    ]);
    h.section("Disks");
    h.table_open(
        "template-disks",
        &["Alias", "Status", "Size", "Allocated", "Format", "Storage domain"],
        None,
    );
    for d in &disks {
        h.raw("<tr data-id=\"").text(d.id).raw("\">");
        disk_cells(&mut h, d);
        h.cell(names.sd(d.storage_domain_id)).raw("</tr>");
    }
    h.table_close("No disks.", 6, disks.is_empty());
    h.section("VMs made from it");
    vms_table(&mut h, &names, "template-vms", &vms, "No VM was made from it.");
    Ok(h.finish())
}

// ------------------------------------------------------------------------------ operations

async fn jobs(ctx: &Ctx) -> Result<String, PortalError> {
    let status: Vec<JobStatus> = ctx.q("status").and_then(|s| s.parse().ok()).into_iter().collect();
    let js = ctx
        .db()
        .job_list(
            &ListQuery::filtered(JobFilter {
                status,
                ..Default::default()
            })
            .sort_by(JobSort::StartedAt, SortDir::Desc)
            .limit(100),
        )
        .await?;
    let mut h = Html::new();
    h.heading("Jobs", Some("the latest 100"));
    tasks_panel(&mut h);
    jobs_table(ctx, &mut h, &js, "jobs").await?;
    Ok(h.finish())
}

async fn job(ctx: &Ctx, id: &str) -> Result<String, PortalError> {
    let id: JobId = page_id("job", id)?;
    let j = ctx.db().job_get(id).await?.ok_or_else(|| missing("job", id))?;
    let steps = ctx.db().job_steps(id).await?;
    let mut h = Html::new();
    h.head_open(&j.description)
        .badge(j.status, Some(&format!("job:{id}")))
        .raw("</div>");
    h.raw("<div data-region=\"job\" data-live-jobs=\"1\">");
    if let Some(p) = job_progress(ctx, &j).await? {
        h.raw(&format!(
            "<p><progress class=\"wide\" data-live-progress=\"{id}\" max=\"{}\" value=\"{}\"></progress> <span data-live-steps=\"{id}\">",
            p.total,
            p.value()
        ))
        .text(p.label())
        .raw("</span> steps</p>");
    }
    h.facts(&[
        ("Started", time(j.started_at)),
        ("Ended", j.ended_at.map(time).unwrap_or_default()),
        ("Correlation id", j.correlation_id.clone().unwrap_or_default()),
    ]);
    if let Some(saga) = waiting_saga(ctx, &j).await? {
        let why = match saga.state {
            SagaState::Blocked => "failed past the point where it could be rolled back",
            _ => "failed and its roll-back failed too",
        };
        h.raw("<p class=\"warn\" data-saga-state=\"")
            .text(saga.state)
            .raw("\">This command ")
            .text(why)
            .raw(": ")
            .text(saga.undo_error.as_deref().or(saga.error.as_deref()).unwrap_or(""))
            .raw(". Fix the cause, then retry it. </p>");
        act_button(
            &mut h,
            &format!("/portal/jobs/{id}/retry"),
            "Retry",
            Some(&format!(
                "Retry {}? Do it once what made it fail is fixed.",
                j.description
            )),
            "",
            "danger",
        );
    }
    h.table_open(
        "steps",
        &["#", "Step", "Type", "Status", "Started", "Ended"],
        None,
    );
    for s in &steps {
        h.row_open(None)
            .cell_num(s.number)
            .cell(&s.description)
            .cell(s.step_type)
            .raw("<td>")
            .badge(s.status, None)
            .raw("</td>")
            .cell(time(s.started_at))
            .cell(s.ended_at.map(time).unwrap_or_default())
            .raw("</tr>");
    }
    h.table_close("No steps yet.", 6, steps.is_empty());
    h.raw("</div>");
    Ok(h.finish())
}

/// The saga behind job `j` when it waits for an administrator (stuck or blocked).
async fn waiting_saga(ctx: &Ctx, j: &Job) -> Result<Option<SagaRecord>, PortalError> {
    let Some(id) = j.saga_id else { return Ok(None) };
    Ok(ctx
        .db()
        .saga_get(id)
        .await?
        .filter(|s| matches!(s.state, SagaState::Stuck | SagaState::Blocked)))
}

async fn events(ctx: &Ctx) -> Result<String, PortalError> {
    let min: Option<Severity> = ctx.q("severity").and_then(|s| s.parse().ok());
    let es = ctx
        .db()
        .event_list(
            &ListQuery::filtered(EventFilter {
                min_severity: min,
                ..Default::default()
            })
            .sort_by(EventSort::Id, SortDir::Desc)
            .limit(200),
        )
        .await?;
    let mut h = Html::new();
    h.heading("Events", Some("the latest 200"));
    h.raw("<form method=\"get\" class=\"search\" action=\"/portal/events\">");
    h.select(
        "At least",
        "severity",
        &Severity::ALL
            .iter()
            .map(|s| (s.to_string(), s.to_string()))
            .collect::<Vec<_>>(),
        min.map(|m| m.as_str()),
    );
    h.raw("<button type=\"submit\" class=\"secondary\">Filter</button></form>");
    events_table(&mut h, &es, min.is_none());
    Ok(h.finish())
}

/// A VM's status detail for people: a storage pause code in words.
fn vm_status_detail(detail: Option<&str>) -> String {
    match detail {
        Some("eio") => "paused: storage I/O error (eio)".into(),
        Some("enospc") => "paused: no space left on the storage (enospc)".into(),
        Some("eperm") => "paused: storage permission error (eperm)".into(),
        Some("eother") => "paused: storage error (eother)".into(),
        other => other.unwrap_or_default().to_string(),
    }
}
