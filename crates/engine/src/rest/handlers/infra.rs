//! Data centers, clusters and hosts.

use crate::commands::{resolve_policy, AddCluster, AddDataCenter, AddHost, UpdateCluster};
use crate::db::{ClusterFilter, ClusterSort, DcFilter, DcSort, HostFilter, HostSort, ListQuery, Ref};
use crate::model::*;

use super::super::fault::ApiError;
use super::super::input::Elem;
use super::super::search::translate;
use super::super::write::{self, collection, href, Embedded};
use super::super::{Req, Resp};
use super::{action_complete, check_follow, cluster_ref, dc_ref, required, run_action};

async fn dc(r: &Req, i: usize) -> Result<DataCenter, ApiError> {
    let id: DcId = r.id(i, "data center")?;
    r.db()
        .dc_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("data center {id} not found")))
}

async fn dc_embedded(r: &Req, dc: &DataCenter, follow: &[String]) -> Result<Option<Embedded>, ApiError> {
    if follow.is_empty() {
        return Ok(None);
    }
    let mut e = Embedded::default();
    if follow.iter().any(|f| f == "clusters") {
        e.clusters = Some(
            r.db()
                .cluster_list(&ListQuery::filtered(ClusterFilter {
                    data_center: Some(Ref::Id(dc.id)),
                    ..Default::default()
                }))
                .await?,
        );
    }
    if follow.iter().any(|f| f == "storage_domains") {
        let mut sds = Vec::new();
        for m in r.db().pool_members(dc.id).await? {
            if let Some(sd) = r.db().sd_get(m.storage_domain_id).await? {
                sds.push((sd, Some(m)));
            }
        }
        e.storage_domains = Some(sds);
    }
    Ok(Some(e))
}

const DC_FOLLOW: &[&str] = &["clusters", "storage_domains"];

pub async fn dc_list(r: &Req) -> Result<Resp, ApiError> {
    let follow = check_follow(r, DC_FOLLOW)?;
    let q = translate(
        &r.search()?,
        r.list_params()?,
        "data centers",
        |f: &mut DcFilter, c, x| {
            match c.field.as_str() {
                "name" => f.name = Some(x.text(c)?),
                "status" => f.status.push(x.value(c)?),
                "local" => f.local = Some(x.value(c)?),
                _ => return Ok(false),
            }
            Ok(true)
        },
        |k| match k {
            "name" => Some(DcSort::Name),
            "status" => Some(DcSort::Status),
            _ => None,
        },
    )?;
    let dcs = r.db().dc_list(&q).await?;
    let mut embs = Vec::with_capacity(dcs.len());
    for d in &dcs {
        embs.push(dc_embedded(r, d, &follow).await?);
    }
    let items: Vec<_> = dcs.iter().zip(embs.iter()).collect();
    let mut o = r.out();
    collection(&mut o, "data_centers", "data_center", &items, |o, (d, e)| {
        write::data_center(o, d, e.as_ref())
    });
    Ok(Resp::ok(o))
}

fn one_dc(r: &Req, d: &DataCenter, e: Option<&Embedded>) -> super::super::out::Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::data_center(o, d, e));
    o
}

/// Writes a single entity as the document root.
pub fn root_entity(o: &mut super::super::out::Out, f: impl FnOnce(&mut super::super::out::Out)) {
    o.begin_document();
    f(o);
}

pub async fn dc_get(r: &Req) -> Result<Resp, ApiError> {
    let follow = check_follow(r, DC_FOLLOW)?;
    let d = dc(r, 0).await?;
    let e = dc_embedded(r, &d, &follow).await?;
    Ok(Resp::ok(one_dc(r, &d, e.as_ref())))
}

pub async fn dc_add(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("data_center")?;
    let d = r
        .cmds()
        .add_data_center(AddDataCenter {
            name: required(&b, "name")?.to_string(),
            description: b.string("description").unwrap_or_default(),
            local: b.bool("local")?.unwrap_or(false),
        })
        .await?;
    Ok(Resp::created(one_dc(r, &d, None), href("datacenters", d.id)))
}

pub async fn dc_update(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("data_center")?;
    let mut d = dc(r, 0).await?;
    if let Some(n) = b.str("name") {
        d.name = n.to_string();
    }
    if let Some(n) = b.get("description") {
        d.description = n.text.trim().to_string();
    }
    let d = r.db().dc_update(&d).await?;
    Ok(Resp::ok(one_dc(r, &d, None)))
}

pub async fn dc_remove(r: &Req) -> Result<Resp, ApiError> {
    let d = dc(r, 0).await?;
    r.cmds().remove_data_center(d.id).await?;
    Ok(action_complete(r))
}

pub async fn dc_clusters(r: &Req) -> Result<Resp, ApiError> {
    let d = dc(r, 0).await?;
    let cls = r
        .db()
        .cluster_list(&ListQuery::filtered(ClusterFilter {
            data_center: Some(Ref::Id(d.id)),
            ..Default::default()
        }))
        .await?;
    let mut o = r.out();
    collection(&mut o, "clusters", "cluster", &cls, |o, c| {
        write::cluster(o, c, None)
    });
    Ok(Resp::ok(o))
}

// ------------------------------------------------------------------------------- clusters

async fn cluster(r: &Req, i: usize) -> Result<Cluster, ApiError> {
    let id: ClusterId = r.id(i, "cluster")?;
    r.db()
        .cluster_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("cluster {id} not found")))
}

fn one_cluster(r: &Req, c: &Cluster, e: Option<&Embedded>) -> super::super::out::Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::cluster(o, c, e));
    o
}

async fn cluster_embedded(r: &Req, c: &Cluster, follow: &[String]) -> Result<Option<Embedded>, ApiError> {
    if !follow.iter().any(|f| f == "data_center") {
        return Ok(None);
    }
    Ok(Some(Embedded {
        data_center: r.db().dc_get(c.data_center_id).await?,
        ..Default::default()
    }))
}

pub async fn cluster_list(r: &Req) -> Result<Resp, ApiError> {
    let follow = check_follow(r, &["data_center"])?;
    let q = translate(
        &r.search()?,
        r.list_params()?,
        "clusters",
        |f: &mut ClusterFilter, c, x| {
            if c.field == "name" {
                f.name = Some(x.text(c)?);
            } else if let Some(d) = x.reference(c, "datacenter")? {
                f.data_center = Some(d);
            } else if let Some(d) = x.reference(c, "data_center")? {
                f.data_center = Some(d);
            } else {
                return Ok(false);
            }
            Ok(true)
        },
        |k| match k {
            "name" => Some(ClusterSort::Name),
            _ => None,
        },
    )?;
    let cls = r.db().cluster_list(&q).await?;
    let mut items = Vec::with_capacity(cls.len());
    for c in &cls {
        items.push((c, cluster_embedded(r, c, &follow).await?));
    }
    let mut o = r.out();
    collection(&mut o, "clusters", "cluster", &items, |o, (c, e)| {
        write::cluster(o, c, e.as_ref())
    });
    Ok(Resp::ok(o))
}

pub async fn cluster_get(r: &Req) -> Result<Resp, ApiError> {
    let follow = check_follow(r, &["data_center"])?;
    let c = cluster(r, 0).await?;
    let e = cluster_embedded(r, &c, &follow).await?;
    Ok(Resp::ok(one_cluster(r, &c, e.as_ref())))
}

pub async fn cluster_add(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("cluster")?;
    let dce = b
        .get("data_center")
        .ok_or_else(|| ApiError::bad_request("<cluster> needs <data_center>"))?;
    let data_center = dc_ref(r, dce).await?;
    let c = r
        .cmds()
        .add_cluster(AddCluster {
            name: required(&b, "name")?.to_string(),
            description: b.string("description").unwrap_or_default(),
            data_center,
            cpu_type: b.string("cpu/type"),
            scheduling_policy: policy_ref(&b)?,
            memory_overcommit_percent: b.u32("memory_policy/over_commit/percent")?,
            scheduling_properties: custom_properties(&b)?.unwrap_or_default(),
            migration_bandwidth_mbps: migration_bandwidth(&b)?.flatten(),
            migration_encrypted: migration_encrypted(&b)?.unwrap_or(false),
        })
        .await?;
    Ok(Resp::created(one_cluster(r, &c, None), href("clusters", c.id)))
}

/// `<custom_scheduling_policy_properties><property><name>HighVmCount</name><value>2</value>
/// </property>…</custom_scheduling_policy_properties>`: the cluster's own values, replacing
/// those it had (an empty element clears them).
fn custom_properties(b: &Elem) -> Result<Option<std::collections::BTreeMap<String, String>>, ApiError> {
    let Some(e) = b.get("custom_scheduling_policy_properties") else {
        return Ok(None);
    };
    let mut out = std::collections::BTreeMap::new();
    for p in e.children_named("property") {
        let name = p
            .str("name")
            .ok_or_else(|| ApiError::bad_request("a scheduling policy <property> needs a <name>"))?;
        let value = p.str("value").ok_or_else(|| {
            ApiError::bad_request(format!("scheduling policy property {name} needs a <value>"))
        })?;
        out.insert(name.trim().to_string(), value.trim().to_string());
    }
    Ok(Some(out))
}

/// `<migration><bandwidth><assignment_method>custom</assignment_method><custom_value>N
/// </custom_value></bandwidth></migration>` (Mbps), or `auto` / `hypervisor_default` (no limit
/// of ours). `None`: the body does not say.
fn migration_bandwidth(b: &Elem) -> Result<Option<Option<u32>>, ApiError> {
    let Some(bw) = b.get("migration/bandwidth") else {
        return Ok(None);
    };
    match bw.str("assignment_method").map(str::trim) {
        Some("custom") => match bw.u32("custom_value")? {
            Some(v) => Ok(Some(Some(v))),
            None => Err(ApiError::bad_request(
                "migration bandwidth assignment_method custom needs a <custom_value> (Mbps)",
            )),
        },
        Some("auto" | "hypervisor_default") => Ok(Some(None)),
        Some(other) => Err(ApiError::bad_request(format!(
            "migration bandwidth assignment_method {other:?}: expected auto, hypervisor_default or custom"
        ))),
        None => Err(ApiError::bad_request(
            "<migration><bandwidth> needs an <assignment_method>",
        )),
    }
}

/// `<migration><encrypted>true|false|inherit</encrypted></migration>` (oVirt's inheritable
/// boolean; `inherit` is the engine's default, off). `None`: the body does not say.
fn migration_encrypted(b: &Elem) -> Result<Option<bool>, ApiError> {
    match b.str("migration/encrypted").map(str::trim) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false" | "inherit") => Ok(Some(false)),
        Some(other) => Err(ApiError::bad_request(format!(
            "migration encrypted {other:?}: expected true, false or inherit"
        ))),
    }
}

/// `<scheduling_policy id="…"/>` or `<scheduling_policy><name>…</name></scheduling_policy>`.
fn policy_ref(b: &Elem) -> Result<Option<crate::model::SchedulingPolicy>, ApiError> {
    match b.get("scheduling_policy") {
        None => Ok(None),
        Some(e) => Ok(Some(resolve_policy(e.id(), e.str("name"))?)),
    }
}

pub async fn cluster_update(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("cluster")?;
    let id: ClusterId = r.id(0, "cluster")?;
    let c = r
        .cmds()
        .update_cluster(
            id,
            UpdateCluster {
                name: b.string("name"),
                description: b.get("description").map(|d| d.text.trim().to_string()),
                cpu_type: b.string("cpu/type"),
                scheduling_policy: policy_ref(&b)?,
                memory_overcommit_percent: b.u32("memory_policy/over_commit/percent")?,
                scheduling_properties: custom_properties(&b)?,
                migration_bandwidth_mbps: migration_bandwidth(&b)?,
                migration_encrypted: migration_encrypted(&b)?,
            },
        )
        .await?;
    Ok(Resp::ok(one_cluster(r, &c, None)))
}

pub async fn cluster_remove(r: &Req) -> Result<Resp, ApiError> {
    let c = cluster(r, 0).await?;
    r.cmds().remove_cluster(c.id).await?;
    Ok(action_complete(r))
}

// ---------------------------------------------------------------------------------- hosts

pub async fn host_stat_list(r: &Req, one: bool) -> Result<Resp, ApiError> {
    let h = host(r, 0).await?;
    let stats = r.cmds().host_statistics(h.id).await?;
    super::vms::statistics_reply(r, &stats, one, "host", "hosts", &h.id.to_string())
}

async fn host(r: &Req, i: usize) -> Result<Host, ApiError> {
    let id: HostUuid = r.id(i, "host")?;
    r.db()
        .host_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("host {id} not found")))
}

async fn one_host(r: &Req, h: &Host, e: Option<&Embedded>) -> Result<super::super::out::Out, ApiError> {
    let pm = power_management(r, h).await?;
    let mut o = r.out();
    root_entity(&mut o, |o| write::host(o, h, e, Some(pm)));
    Ok(o)
}

/// Whether the host has a fence agent (`power_management.enabled`).
async fn power_management(r: &Req, h: &Host) -> Result<bool, ApiError> {
    Ok(r.cmds().fence_agent(h.id).await?.is_some())
}

async fn host_embedded(r: &Req, h: &Host, follow: &[String]) -> Result<Option<Embedded>, ApiError> {
    if !follow.iter().any(|f| f == "cluster") {
        return Ok(None);
    }
    Ok(Some(Embedded {
        cluster: r.db().cluster_get(h.cluster_id).await?,
        ..Default::default()
    }))
}

pub async fn host_list(r: &Req) -> Result<Resp, ApiError> {
    let follow = check_follow(r, &["cluster"])?;
    let q = translate(
        &r.search()?,
        r.list_params()?,
        "hosts",
        |f: &mut HostFilter, c, x| {
            match c.field.as_str() {
                "name" => f.name = Some(x.text(c)?),
                "status" => f.status.push(x.value(c)?),
                "address" => {
                    x.eq(c)?;
                    f.address = Some(c.value.clone())
                }
                _ => {
                    if let Some(d) = x.reference(c, "datacenter")? {
                        f.data_center = Some(d);
                    } else if let Some(cl) = x.reference(c, "cluster")? {
                        f.cluster = Some(cl);
                    } else if let Some(t) = x.reference(c, "tag")? {
                        f.tag = Some(t);
                    } else {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        },
        |k| match k {
            "name" => Some(HostSort::Name),
            "status" => Some(HostSort::Status),
            "address" => Some(HostSort::Address),
            _ => None,
        },
    )?;
    let hs = r.db().host_list(&q).await?;
    let mut items = Vec::with_capacity(hs.len());
    for h in &hs {
        items.push((
            h,
            host_embedded(r, h, &follow).await?,
            power_management(r, h).await?,
        ));
    }
    let mut o = r.out();
    collection(&mut o, "hosts", "host", &items, |o, (h, e, pm)| {
        write::host(o, h, e.as_ref(), Some(*pm))
    });
    Ok(Resp::ok(o))
}

pub async fn host_get(r: &Req) -> Result<Resp, ApiError> {
    let follow = check_follow(r, &["cluster"])?;
    let h = host(r, 0).await?;
    let e = host_embedded(r, &h, &follow).await?;
    Ok(Resp::ok(one_host(r, &h, e.as_ref()).await?))
}

pub async fn host_add(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("host")?;
    let name = required(&b, "name")?.to_string();
    let mut address = b.string("address").unwrap_or_else(|| name.clone());
    if let Some(p) = b.u32("port")? {
        if !address.contains(':') {
            address = format!("{address}:{p}");
        }
    }
    let cluster = match b.get("cluster") {
        Some(c) => cluster_ref(r, c).await?,
        None => {
            r.db()
                .cluster_get_by_name("Default")
                .await?
                .ok_or_else(|| {
                    ApiError::bad_request("<host> needs <cluster> (there is no cluster named Default)")
                })?
                .id
        }
    };
    let h = r
        .engine
        .add_host(AddHost {
            name,
            address,
            cluster,
            spm_priority: b.i32("spm/priority")?,
        })
        .await?;
    Ok(Resp::created(one_host(r, &h, None).await?, href("hosts", h.id)))
}

pub async fn host_update(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("host")?;
    let mut h = host(r, 0).await?;
    if let Some(n) = b.str("name") {
        h.name = n.to_string();
    }
    if let Some(p) = b.i32("spm/priority")? {
        h.spm_priority = p;
    }
    let h = r.db().host_update(&h).await?;
    Ok(Resp::ok(one_host(r, &h, None).await?))
}

pub async fn host_remove(r: &Req) -> Result<Resp, ApiError> {
    let h = host(r, 0).await?;
    r.cmds().remove_host(h.id).await?;
    Ok(action_complete(r))
}

pub async fn host_activate(r: &Req, up: bool) -> Result<Resp, ApiError> {
    let h = host(r, 0).await?;
    let body = r.action_body()?;
    let id = h.id;
    run_action(
        r,
        Some(&body),
        if up { "activate" } else { "deactivate" },
        move |e| async move {
            if up {
                e.cmds.host_activate(id).await?;
            } else {
                e.cmds.host_maintenance(id).await?;
            }
            e.cmds.app.kick.notify_one();
            Ok(())
        },
    )
    .await
}

/// `POST /hosts/{id}/forceselectspm`.
pub async fn host_force_select_spm(r: &Req) -> Result<Resp, ApiError> {
    let h = host(r, 0).await?;
    let body = r.action_body()?;
    let id = h.id;
    run_action(r, Some(&body), "forceselectspm", move |e| async move {
        e.cmds.force_select_spm(id).await?;
        Ok(())
    })
    .await
}
