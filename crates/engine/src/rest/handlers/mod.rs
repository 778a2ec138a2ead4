//! Request handlers: one function per route operation, grouped by the objects they serve.
//! Each reads its parameters, calls a command (or one repository function for reads), and
//! writes the representation.

mod infra;
mod networks;
mod ops;
mod qos;
mod register;
mod sla;
mod storage;
mod tags;
mod vms;

use std::future::Future;
use std::sync::Arc;

use crate::daemon::Engine;
use crate::model::*;

use super::fault::ApiError;
use super::input::Elem;
use super::routes::Op;
use super::{Req, Resp};

pub async fn dispatch(op: Op, r: &Req) -> Result<Resp, ApiError> {
    use Op::*;
    match op {
        Api => ops::api(r).await,
        OpenApi => ops::openapi(r),
        DcList => infra::dc_list(r).await,
        DcAdd => infra::dc_add(r).await,
        DcGet => infra::dc_get(r).await,
        DcUpdate => infra::dc_update(r).await,
        DcRemove => infra::dc_remove(r).await,
        DcClusters => infra::dc_clusters(r).await,
        DcSdList => storage::dc_sd_list(r).await,
        DcSdAttach => storage::dc_sd_attach(r).await,
        DcSdGet => storage::dc_sd_get(r).await,
        DcSdDetach => storage::dc_sd_detach(r).await,
        DcSdActivate => storage::dc_sd_activate(r, true).await,
        DcSdDeactivate => storage::dc_sd_activate(r, false).await,
        ClusterList => infra::cluster_list(r).await,
        ClusterAdd => infra::cluster_add(r).await,
        ClusterGet => infra::cluster_get(r).await,
        ClusterUpdate => infra::cluster_update(r).await,
        ClusterRemove => infra::cluster_remove(r).await,
        HostList => infra::host_list(r).await,
        HostAdd => infra::host_add(r).await,
        HostGet => infra::host_get(r).await,
        HostUpdate => infra::host_update(r).await,
        HostRemove => infra::host_remove(r).await,
        HostActivate => infra::host_activate(r, true).await,
        HostForceSelectSpm => infra::host_force_select_spm(r).await,
        HostDeactivate => infra::host_activate(r, false).await,
        HostFence => sla::host_fence(r).await,
        HostAgentList => sla::agent_list(r).await,
        HostAgentAdd => sla::agent_add(r).await,
        HostAgentGet => sla::agent_get(r).await,
        HostAgentUpdate => sla::agent_update(r).await,
        HostAgentRemove => sla::agent_remove(r).await,
        PolicyList => sla::policy_list(r).await,
        PolicyGet => sla::policy_get(r).await,
        GroupList => sla::group_list(r).await,
        GroupAdd => sla::group_add(r).await,
        GroupGet => sla::group_get(r).await,
        GroupUpdate => sla::group_update(r).await,
        GroupRemove => sla::group_remove(r).await,
        GroupVmList => sla::group_vm_list(r).await,
        GroupVmAdd => sla::group_vm_add(r).await,
        GroupVmRemove => sla::group_vm_remove(r).await,
        QosList => qos::qos_list(r).await,
        QosAdd => qos::qos_add(r).await,
        QosGet => qos::qos_get(r).await,
        QosUpdate => qos::qos_update(r).await,
        QosRemove => qos::qos_remove(r).await,
        ProfileList => qos::profile_list(r, false).await,
        ProfileAdd => qos::profile_add(r, false).await,
        ProfileGet => qos::profile_get(r).await,
        ProfileUpdate => qos::profile_update(r).await,
        ProfileRemove => qos::profile_remove(r).await,
        SdProfileList => qos::profile_list(r, true).await,
        SdProfileAdd => qos::profile_add(r, true).await,
        TagList => tags::tag_list(r).await,
        TagAdd => tags::tag_add(r).await,
        TagGet => tags::tag_get(r).await,
        TagUpdate => tags::tag_update(r).await,
        TagRemove => tags::tag_remove(r).await,
        VmTagList => tags::assigned_list(r, tags::Carrier::Vm).await,
        VmTagAdd => tags::assigned_add(r, tags::Carrier::Vm).await,
        VmTagGet => tags::assigned_get(r, tags::Carrier::Vm).await,
        VmTagRemove => tags::assigned_remove(r, tags::Carrier::Vm).await,
        HostTagList => tags::assigned_list(r, tags::Carrier::Host).await,
        HostTagAdd => tags::assigned_add(r, tags::Carrier::Host).await,
        HostTagGet => tags::assigned_get(r, tags::Carrier::Host).await,
        HostTagRemove => tags::assigned_remove(r, tags::Carrier::Host).await,
        TemplateTagList => tags::assigned_list(r, tags::Carrier::Template).await,
        TemplateTagAdd => tags::assigned_add(r, tags::Carrier::Template).await,
        TemplateTagGet => tags::assigned_get(r, tags::Carrier::Template).await,
        TemplateTagRemove => tags::assigned_remove(r, tags::Carrier::Template).await,
        SdList => storage::sd_list(r).await,
        SdAdd => storage::sd_add(r).await,
        SdGet => storage::sd_get(r).await,
        SdUpdate => storage::sd_update(r).await,
        SdRemove => storage::sd_remove(r).await,
        SdDisks => storage::sd_disks(r).await,
        SdDiskRegister => storage::sd_disk_register(r).await,
        SdVms => register::list(r, false).await,
        SdVmGet => register::get(r, false).await,
        SdVmRegister => register::register(r, false).await,
        SdVmRemove => register::remove(r, false).await,
        SdTemplates => register::list(r, true).await,
        SdTemplateGet => register::get(r, true).await,
        SdTemplateRegister => register::register(r, true).await,
        SdTemplateRemove => register::remove(r, true).await,
        SdUpdateOvfStore => register::update_ovf_store(r).await,
        SdDiskSnapshots => storage::sd_disk_snapshots(r).await,
        VmSnapDisks => vms::snap_disks(r).await,
        DiskList => storage::disk_list(r).await,
        DiskAdd => storage::disk_add(r).await,
        DiskGet => storage::disk_get(r).await,
        DiskUpdate => storage::disk_update(r).await,
        DiskRemove => storage::disk_remove(r).await,
        DiskMove => storage::disk_move(r).await,
        DiskCopy => storage::disk_copy(r).await,
        VmList => vms::vm_list(r).await,
        VmAdd => vms::vm_add(r).await,
        VmGet => vms::vm_get(r).await,
        VmUpdate => vms::vm_update(r).await,
        VmRemove => vms::vm_remove(r).await,
        VmStart => vms::vm_start(r).await,
        VmStop => vms::vm_power(r, vms::Power::Stop).await,
        VmShutdown => vms::vm_power(r, vms::Power::Shutdown).await,
        VmSuspend => vms::vm_power(r, vms::Power::Suspend).await,
        VmReboot => vms::vm_power(r, vms::Power::Reboot).await,
        VmCancelMigration => vms::vm_power(r, vms::Power::CancelMigration).await,
        VmMigrate => vms::vm_migrate(r).await,
        VmPreviewSnapshot => vms::vm_preview(r).await,
        VmCommitSnapshot => vms::vm_commit(r).await,
        VmUndoSnapshot => vms::vm_undo(r).await,
        VmAttList => vms::att_list(r, "vms").await,
        VmAttAdd => vms::att_add(r).await,
        VmAttGet => vms::att_get(r).await,
        VmAttUpdate => vms::att_update(r).await,
        VmAttRemove => vms::att_remove(r).await,
        VmNumaNodes => vms::numa_list(r).await,
        VmCdromList => vms::cdrom_list(r).await,
        VmClone => vms::vm_clone(r).await,
        VmStatList => vms::stat_list(r, false).await,
        VmStatGet => vms::stat_list(r, true).await,
        HostStatList => infra::host_stat_list(r, false).await,
        HostStatGet => infra::host_stat_list(r, true).await,
        VmCdromGet => vms::cdrom_get(r).await,
        VmCdromUpdate => vms::cdrom_update(r).await,
        VmConsoleList => vms::console_list(r).await,
        VmConsoleGet => vms::console_get(r).await,
        VmConsoleTicket => vms::console_ticket(r).await,
        VmConsoleFile => vms::console_file(r).await,
        VmNicList => networks::vm_nic_list(r).await,
        TemplateNicList => networks::template_nic_list(r).await,
        TemplateNicGet => networks::template_nic_get(r).await,
        VmNicAdd => networks::vm_nic_add(r).await,
        VmNicGet => networks::vm_nic_get(r).await,
        VmNicUpdate => networks::vm_nic_update(r).await,
        VmNicRemove => networks::vm_nic_remove(r).await,
        VmNicActivate => networks::vm_nic_plug(r, true).await,
        VmNicDeactivate => networks::vm_nic_plug(r, false).await,
        NetList => networks::net_list(r).await,
        NetAdd => networks::net_add(r).await,
        NetGet => networks::net_get(r, false).await,
        NetUpdate => networks::net_update(r, false).await,
        NetRemove => networks::net_remove(r, false).await,
        NetProfiles => networks::net_profiles(r).await,
        DcNetList => networks::dc_net_list(r).await,
        DcNetAdd => networks::dc_net_add(r).await,
        DcNetGet => networks::net_get(r, true).await,
        DcNetUpdate => networks::net_update(r, true).await,
        DcNetRemove => networks::net_remove(r, true).await,
        ClusterNetList => networks::cluster_net_list(r).await,
        ClusterNetAdd => networks::cluster_net_add(r).await,
        ClusterNetGet => networks::cluster_net_get(r).await,
        ClusterNetUpdate => networks::cluster_net_update(r).await,
        ClusterNetRemove => networks::cluster_net_remove(r).await,
        HostNicList => networks::host_nic_list(r).await,
        HostNicGet => networks::host_nic_get(r).await,
        HostAttList => networks::host_att_list(r).await,
        HostAttAdd => networks::host_att_add(r).await,
        HostAttGet => networks::host_att_get(r).await,
        HostAttUpdate => networks::host_att_update(r).await,
        HostAttRemove => networks::host_att_remove(r).await,
        HostSetupNetworks => networks::host_setup_networks(r).await,
        VnicProfileList => networks::profile_list(r).await,
        VnicProfileGet => networks::profile_get(r).await,
        MacPoolList => networks::mac_pool_list(r).await,
        MacPoolGet => networks::mac_pool_get(r).await,
        MacPoolUpdate => networks::mac_pool_update(r).await,
        VmSnapList => vms::snap_list(r).await,
        VmSnapAdd => vms::snap_add(r).await,
        VmSnapGet => vms::snap_get(r).await,
        VmSnapRemove => vms::snap_remove(r).await,
        VmSnapRestore => vms::snap_restore(r).await,
        TemplateList => vms::template_list(r).await,
        TemplateAdd => vms::template_add(r).await,
        TemplateGet => vms::template_get(r).await,
        TemplateUpdate => vms::template_update(r).await,
        TemplateRemove => vms::template_remove(r).await,
        TemplateAttList => vms::att_list(r, "templates").await,
        TransferList => storage::transfer_list(r).await,
        TransferAdd => storage::transfer_add(r).await,
        TransferGet => storage::transfer_get(r).await,
        TransferFinalize => storage::transfer_finalize(r).await,
        TransferCancel => storage::transfer_cancel(r).await,
        JobList => ops::job_list(r).await,
        JobGet => ops::job_get(r).await,
        JobSteps => ops::job_steps(r).await,
        JobRetry => ops::job_retry(r).await,
        EventAdd => ops::event_add(r).await,
        EventRemove => ops::event_remove(r).await,
        EventList => ops::event_list(r).await,
        EventGet => ops::event_get(r).await,
        UserList => ops::user_list(r).await,
        UserGet => ops::user_get(r).await,
    }
}

/// `<action><status>complete</status></action>` (actions and DELETE).
pub fn action_complete(r: &Req) -> Resp {
    let mut o = r.out();
    o.root("action", None, None);
    o.leaf("status", "complete");
    o.close("action");
    Resp::ok(o)
}

/// Whether the client asked for the answer before the work is done.
pub fn is_async(r: &Req, body: Option<&Elem>) -> Result<bool, ApiError> {
    if let Some(b) = body {
        if let Some(v) = b.bool("async")? {
            return Ok(v);
        }
    }
    Ok(r.q_bool("async")?.unwrap_or(false))
}

/// Runs an action: 200 `complete` when it is done, or 202 `pending` when the client asked for
/// `async` (see [`run_async`]).
pub async fn run_action<F, Fut>(
    r: &Req,
    body: Option<&Elem>,
    what: &'static str,
    f: F,
) -> Result<Resp, ApiError>
where
    F: FnOnce(Arc<Engine>) -> Fut,
    Fut: Future<Output = Result<(), ApiError>> + Send + 'static,
{
    if is_async(r, body)? {
        return run_async(r, what, f(r.engine.clone()), |r, job| {
            let mut o = r.out();
            o.root("action", None, None);
            o.leaf("async", true);
            if let Some(job) = job {
                o.reference("job", &job.to_string(), &crate::rest::write::href("jobs", job));
            }
            o.leaf("status", "pending");
            o.close("action");
            Resp::accepted(o)
        })
        .await;
    }
    f(r.engine.clone()).await?;
    Ok(action_complete(r))
}

/// How long an asynchronous request waits for its command's saga to be under way (or for
/// the command to end) before answering anyway: a command that does long work before any saga (evacuating a
/// host for maintenance) is not held to its end.
const ASYNC_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `fut` for an asynchronous request: as oVirt validates before it answers, the request
/// waits until the command's saga is under way (its first step done: `pending` answers,
/// naming the job), the command ended (its refusal is the request's error; a success answers
/// `complete`), or [`ASYNC_ANSWER_WAIT`] passed. Work that goes on after the answer reports
/// through its job and events, and here through the log.
pub async fn run_async<Fut>(
    r: &Req,
    what: &'static str,
    fut: Fut,
    pending: impl FnOnce(&Req, Option<crate::model::JobId>) -> Resp,
) -> Result<Resp, ApiError>
where
    Fut: Future<Output = Result<(), ApiError>> + Send + 'static,
{
    let (signal, started) = crate::saga::SagaStartSignal::new();
    let mut task = tokio::spawn(crate::saga::ON_SAGA_START.scope(signal, fut));
    let finished = |done: Result<Result<(), ApiError>, tokio::task::JoinError>| match done {
        Ok(Ok(())) => Ok(action_complete(r)),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(ApiError::internal(format!("{what} failed: {e}"))),
    };
    let deadline = tokio::time::Instant::now() + ASYNC_ANSWER_WAIT;
    let job = tokio::select! {
        biased;
        done = &mut task => return finished(done),
        job = started => match job {
            Ok(job) => Some(job),
            // No saga will say it is under way: the command is ending (its signal went
            // with it) or its saga failed in its first step. Its end is the answer.
            Err(_) => match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(done) => return finished(done),
                Err(_) => None,
            },
        },
        _ = tokio::time::sleep_until(deadline) => None,
    };
    tokio::spawn(async move {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(action = what, reason = e.reason, detail = %e.detail, "asynchronous request failed")
            }
            Err(e) => tracing::error!(action = what, error = %e, "asynchronous request panicked"),
        }
    });
    Ok(pending(r, job))
}

fn missing(what: &str, e: &Elem) -> ApiError {
    ApiError::bad_request(format!("<{}> needs an id or a <name> naming the {what}", e.name))
}

fn parse_id<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("{what} id {s:?} is not a UUID")))
}

/// A reference in a body (`<cluster id="…"/>` or `<cluster><name>…</name></cluster>`).
pub async fn cluster_ref(r: &Req, e: &Elem) -> Result<ClusterId, ApiError> {
    if let Some(id) = e.id() {
        return parse_id(id, "cluster");
    }
    let n = e.str("name").ok_or_else(|| missing("cluster", e))?;
    Ok(r.db()
        .cluster_get_by_name(n)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("cluster {n} not found")))?
        .id)
}

pub async fn dc_ref(r: &Req, e: &Elem) -> Result<DcId, ApiError> {
    if let Some(id) = e.id() {
        return parse_id(id, "data center");
    }
    let n = e.str("name").ok_or_else(|| missing("data center", e))?;
    Ok(r.db()
        .dc_get_by_name(n)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("data center {n} not found")))?
        .id)
}

pub async fn host_ref(r: &Req, e: &Elem) -> Result<HostUuid, ApiError> {
    if let Some(id) = e.id() {
        return parse_id(id, "host");
    }
    let n = e.str("name").ok_or_else(|| missing("host", e))?;
    Ok(r.db()
        .host_get_by_name(n)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("host {n} not found")))?
        .id)
}

pub async fn sd_ref(r: &Req, e: &Elem) -> Result<SdUuid, ApiError> {
    if let Some(id) = e.id() {
        return parse_id(id, "storage domain");
    }
    let n = e.str("name").ok_or_else(|| missing("storage domain", e))?;
    Ok(r.db()
        .sd_get_by_name(n)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("storage domain {n} not found")))?
        .id)
}

pub async fn template_ref(r: &Req, e: &Elem) -> Result<TemplateId, ApiError> {
    if let Some(id) = e.id() {
        return parse_id(id, "template");
    }
    let n = e.str("name").ok_or_else(|| missing("template", e))?;
    Ok(r.db()
        .template_get_by_name(n)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("template {n} not found")))?
        .id)
}

pub async fn vm_ref(r: &Req, e: &Elem) -> Result<VmId, ApiError> {
    if let Some(id) = e.id() {
        return parse_id(id, "VM");
    }
    let n = e.str("name").ok_or_else(|| missing("VM", e))?;
    Ok(r.db()
        .vm_get_by_name(n)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("VM {n} not found")))?
        .id)
}

/// Refuses `follow=` values a collection cannot embed.
pub fn check_follow(r: &Req, allowed: &[&str]) -> Result<Vec<String>, ApiError> {
    let f = r.follow();
    for x in &f {
        if !allowed.contains(&x.as_str()) {
            return Err(ApiError::bad_request(format!(
                "follow={x} is not supported here; supported: {}",
                if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                }
            )));
        }
    }
    Ok(f)
}

pub fn required<'a>(e: &'a Elem, path: &str) -> Result<&'a str, ApiError> {
    e.str(path)
        .ok_or_else(|| ApiError::bad_request(format!("<{}> needs <{path}>", e.name)))
}
