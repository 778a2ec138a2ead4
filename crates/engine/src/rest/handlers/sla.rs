//! Scheduling and availability: the built-in scheduling policies, a cluster's affinity groups,
//! a host's fence agent and the host `fence` action.
//!
//! Fence agents follow oVirt's `<agent>` (`type`, `address`, `username`, `password`, `port`,
//! `options`) and map onto oxvirt's command-style agent as [`AgentParams`] describes: type
//! `script` runs the absolute path given as the option `command`; any other type T runs the
//! installed `fence_T`; address, username, password and port become `--ip=`, `--username=`,
//! `--password=` and `--ipport=`, every other option `--name=value` (`--name` when empty; the
//! bare value for an option named `arg`). A host has at most one agent, identified as the host
//! (`/hosts/{h}/fenceagents/{h}`): a second add is a 409. The password is never shown.

use crate::commands::{AddAffinityGroup, UpdateAffinityGroup, POLICIES};
use crate::fence::{AgentParams, FenceType, UpdateAgent};
use crate::model::*;

use super::super::fault::ApiError;
use super::super::input::Elem;
use super::super::out::Out;
use super::super::write::{self, collection};
use super::super::{Req, Resp, API};
use super::infra::root_entity;
use super::{action_complete, check_follow, required, run_action, vm_ref};

// ------------------------------------------------------------------- scheduling policies

pub async fn policy_list(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let mut o = r.out();
    collection(
        &mut o,
        "scheduling_policies",
        "scheduling_policy",
        &POLICIES,
        write::scheduling_policy,
    );
    Ok(Resp::ok(o))
}

pub async fn policy_get(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let id = r.param(0);
    let p = POLICIES
        .iter()
        .find(|p| p.id.to_string().eq_ignore_ascii_case(id))
        .ok_or_else(|| ApiError::not_found(format!("scheduling policy {id} not found")))?;
    let mut o = r.out();
    root_entity(&mut o, |o| write::scheduling_policy(o, p));
    Ok(Resp::ok(o))
}

// ----------------------------------------------------------------------- affinity groups

fn one_group(r: &Req, g: &AffinityGroup) -> Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::affinity_group(o, g));
    o
}

fn group_href(g: &AffinityGroup) -> String {
    format!("{API}/clusters/{}/affinitygroups/{}", g.cluster_id, g.id)
}

async fn cluster_id(r: &Req) -> Result<ClusterId, ApiError> {
    let id: ClusterId = r.id(0, "cluster")?;
    r.db()
        .cluster_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("cluster {id} not found")))?;
    Ok(id)
}

async fn group(r: &Req) -> Result<AffinityGroup, ApiError> {
    let cl = cluster_id(r).await?;
    let g: AffinityGroupId = r.id(1, "affinity group")?;
    Ok(r.cmds().affinity_group(cl, g).await?)
}

/// The VMs of a body's `<vms>`, each by id or name; `None` without `<vms>`.
async fn body_vms(r: &Req, b: &Elem) -> Result<Option<Vec<VmId>>, ApiError> {
    let Some(vms) = b.get("vms") else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for v in vms.children_named("vm") {
        out.push(vm_ref(r, v).await?);
    }
    Ok(Some(out))
}

/// `vms_rule` (oVirt 4.4) wins over the deprecated top-level `positive`/`enforcing`.
struct Rule {
    enabled: Option<bool>,
    positive: Option<bool>,
    enforcing: Option<bool>,
}

fn body_rule(b: &Elem) -> Result<Rule, ApiError> {
    Ok(Rule {
        enabled: b.bool("vms_rule/enabled")?,
        positive: b.bool("vms_rule/positive")?.or(b.bool("positive")?),
        enforcing: b.bool("vms_rule/enforcing")?.or(b.bool("enforcing")?),
    })
}

pub async fn group_list(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let cl = cluster_id(r).await?;
    let gs = r.db().affinity_groups_of_cluster(cl).await?;
    let mut o = r.out();
    collection(
        &mut o,
        "affinity_groups",
        "affinity_group",
        &gs,
        write::affinity_group,
    );
    Ok(Resp::ok(o))
}

pub async fn group_add(r: &Req) -> Result<Resp, ApiError> {
    let cl = cluster_id(r).await?;
    let b = r.body("affinity_group")?;
    let rule = body_rule(&b)?;
    let g = r
        .cmds()
        .add_affinity_group(AddAffinityGroup {
            cluster: cl,
            name: required(&b, "name")?.to_string(),
            description: b.string("description").unwrap_or_default(),
            enabled: rule.enabled.unwrap_or(true),
            // oVirt's defaults: a positive, non-enforcing (soft) rule.
            positive: rule.positive.unwrap_or(true),
            enforcing: rule.enforcing.unwrap_or(false),
            vms: body_vms(r, &b).await?.unwrap_or_default(),
        })
        .await?;
    Ok(Resp::created(one_group(r, &g), group_href(&g)))
}

pub async fn group_get(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let g = group(r).await?;
    Ok(Resp::ok(one_group(r, &g)))
}

pub async fn group_update(r: &Req) -> Result<Resp, ApiError> {
    let cl = cluster_id(r).await?;
    let gid: AffinityGroupId = r.id(1, "affinity group")?;
    let b = r.body("affinity_group")?;
    let rule = body_rule(&b)?;
    let g = r
        .cmds()
        .update_affinity_group(
            cl,
            gid,
            UpdateAffinityGroup {
                name: b.string("name"),
                description: b.get("description").map(|d| d.text.trim().to_string()),
                enabled: rule.enabled,
                positive: rule.positive,
                enforcing: rule.enforcing,
                vms: body_vms(r, &b).await?,
            },
        )
        .await?;
    Ok(Resp::ok(one_group(r, &g)))
}

pub async fn group_remove(r: &Req) -> Result<Resp, ApiError> {
    let g = group(r).await?;
    r.cmds().remove_affinity_group(g.cluster_id, g.id).await?;
    Ok(action_complete(r))
}

/// The group's VMs, as full representations (oVirt's `AffinityGroupVmsService.list`).
pub async fn group_vm_list(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let g = group(r).await?;
    let mut vms = Vec::with_capacity(g.vm_ids.len());
    for id in &g.vm_ids {
        if let Some(v) = r.db().vm_get(*id).await? {
            vms.push(v);
        }
    }
    let mut o = r.out();
    collection(&mut o, "vms", "vm", &vms, |o, v| write::vm(o, v, None));
    Ok(Resp::ok(o))
}

pub async fn group_vm_add(r: &Req) -> Result<Resp, ApiError> {
    let g = group(r).await?;
    let b = r.body("vm")?;
    let vm = vm_ref(r, &b).await?;
    r.cmds().affinity_group_add_vm(g.cluster_id, g.id, vm).await?;
    let v = r
        .db()
        .vm_get(vm)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("VM {vm} not found")))?;
    let mut o = r.out();
    root_entity(&mut o, |o| write::vm(o, &v, None));
    Ok(Resp::created(o, format!("{}/vms/{vm}", group_href(&g))))
}

pub async fn group_vm_remove(r: &Req) -> Result<Resp, ApiError> {
    let g = group(r).await?;
    let vm: VmId = r.id(2, "VM")?;
    r.cmds().affinity_group_remove_vm(g.cluster_id, g.id, vm).await?;
    Ok(action_complete(r))
}

// -------------------------------------------------------------------------- fence agents

async fn host_id(r: &Req) -> Result<HostUuid, ApiError> {
    let id: HostUuid = r.id(0, "host")?;
    r.db()
        .host_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("host {id} not found")))?;
    Ok(id)
}

/// The host's agent addressed as `{agent}`: its id is the host's.
async fn agent(r: &Req) -> Result<(HostUuid, AgentParams), ApiError> {
    let h = host_id(r).await?;
    let a = r.param(1);
    let found = match r.cmds().fence_agent(h).await? {
        Some(p) if a.eq_ignore_ascii_case(&h.to_string()) => Some(p),
        _ => None,
    };
    found
        .map(|p| (h, p))
        .ok_or_else(|| ApiError::not_found(format!("fence agent {a} of host {h} not found")))
}

fn one_agent(r: &Req, h: HostUuid, a: &AgentParams) -> Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::fence_agent(o, h, a));
    o
}

fn body_options(b: &Elem) -> Result<Option<Vec<(String, String)>>, ApiError> {
    let Some(opts) = b.get("options") else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for opt in opts.children_named("option") {
        let name = required(opt, "name")?.to_string();
        out.push((
            name,
            opt.get("value")
                .map(|v| v.text.trim().to_string())
                .unwrap_or_default(),
        ));
    }
    Ok(Some(out))
}

fn body_port(b: &Elem) -> Result<Option<u16>, ApiError> {
    match b.u32("port")? {
        None => Ok(None),
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("<port> {p} is not a TCP port"))),
    }
}

pub async fn agent_list(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let h = host_id(r).await?;
    let agents: Vec<AgentParams> = r.cmds().fence_agent(h).await?.into_iter().collect();
    let mut o = r.out();
    collection(&mut o, "agents", "agent", &agents, |o, a| {
        write::fence_agent(o, h, a)
    });
    Ok(Resp::ok(o))
}

pub async fn agent_add(r: &Req) -> Result<Resp, ApiError> {
    let h = host_id(r).await?;
    let b = r.body("agent")?;
    let params = AgentParams {
        agent_type: required(&b, "type")?.to_string(),
        address: b.string("address"),
        username: b.string("username"),
        password: b.string("password"),
        port: body_port(&b)?,
        options: body_options(&b)?.unwrap_or_default(),
    };
    let a = r.cmds().add_fence_agent(h, &params).await?;
    Ok(Resp::created(
        one_agent(r, h, &a),
        format!("{API}/hosts/{h}/fenceagents/{h}"),
    ))
}

pub async fn agent_get(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let (h, a) = agent(r).await?;
    Ok(Resp::ok(one_agent(r, h, &a)))
}

pub async fn agent_update(r: &Req) -> Result<Resp, ApiError> {
    let (h, _) = agent(r).await?;
    let b = r.body("agent")?;
    let a = r
        .cmds()
        .update_fence_agent(
            h,
            UpdateAgent {
                agent_type: b.string("type"),
                address: b.get("address").map(|e| e.text.trim().to_string()),
                username: b.get("username").map(|e| e.text.trim().to_string()),
                password: b.get("password").map(|e| e.text.trim().to_string()),
                port: body_port(&b)?,
                options: body_options(&b)?,
            },
        )
        .await?;
    Ok(Resp::ok(one_agent(r, h, &a)))
}

pub async fn agent_remove(r: &Req) -> Result<Resp, ApiError> {
    let (h, _) = agent(r).await?;
    r.cmds().remove_fence_agent(h).await?;
    Ok(action_complete(r))
}

/// `POST /hosts/{host}/fence` with `<fence_type>`: `status` answers
/// `<power_management><status>on|off</status></power_management>` as oVirt does; `stop`,
/// `start` and `restart` run the agent; `manual` confirms that the host was rebooted.
pub async fn host_fence(r: &Req) -> Result<Resp, ApiError> {
    let h = host_id(r).await?;
    let body = r.action_body()?;
    let t: FenceType = body
        .str("fence_type")
        .ok_or_else(|| {
            ApiError::bad_request("<action> needs <fence_type> (status, stop, start, restart or manual)")
        })?
        .parse()?;
    if t == FenceType::Status {
        let st = r.cmds().fence_action(h, t).await?;
        let mut o = r.out();
        o.root("action", None, None);
        o.open("power_management", None, None);
        o.opt_leaf("status", st.map(|s| s.as_str()));
        o.close("power_management");
        o.leaf("status", "complete");
        o.close("action");
        return Ok(Resp::ok(o));
    }
    run_action(r, Some(&body), "fence", move |e| async move {
        e.cmds.fence_action(h, t).await?;
        e.cmds.app.kick.notify_one();
        Ok(())
    })
    .await
}
