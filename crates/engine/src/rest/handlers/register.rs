//! A storage domain's VMs and templates (`/storagedomains/{sd}/vms`, `…/templates`): those
//! with disks on it, or with `unregistered=true` those its OVF stores describe that the engine
//! has no record of, which are registered (`…/register`) or removed with their disks; and
//! the domain's `updateovfstore` action.

use crate::commands::ovf::{unregistered_template, unregistered_vm, RegisterOptions};
use crate::db::{ListQuery, Ref, TemplateFilter, VmFilter};
use crate::model::*;
use crate::ovf::{OvfDisk, OvfEntity};

use super::super::fault::ApiError;
use super::super::input::Elem;
use super::super::write::{self, collection, Embedded};
use super::super::{Req, Resp};
use super::{action_complete, cluster_ref};

async fn sd(r: &Req) -> Result<StorageDomain, ApiError> {
    let id: SdUuid = r.id(0, "storage domain")?;
    r.db()
        .sd_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("storage domain {id} not found")))
}

fn kind_of(templates: bool) -> OvfEntityType {
    if templates {
        OvfEntityType::Template
    } else {
        OvfEntityType::Vm
    }
}

/// The disk attachments an unregistered entity would have.
fn attachments(id: VmId, disks: &[OvfDisk]) -> Vec<(DiskAttachment, Option<Disk>)> {
    disks
        .iter()
        .map(|d| {
            (
                DiskAttachment {
                    vm_id: id,
                    disk_id: d.disk.id,
                    interface: d.interface,
                    bootable: d.bootable,
                    active: d.active,
                    read_only: d.read_only,
                },
                Some(d.disk.clone()),
            )
        })
        .collect()
}

/// An unregistered VM as the API shows it: with its disks, NICs and snapshots inline (there
/// are no sub-collections to follow), in the cluster its OVF names when this engine has one.
async fn write_unregistered(r: &Req, o: &mut super::super::out::Out, e: &OvfEntity) -> Result<(), ApiError> {
    if let Some(v) = unregistered_vm(e) {
        let mut vm = v.vm.clone();
        if let Some(cl) = r.db().cluster_get_by_name(&v.cluster_name).await? {
            vm.cluster_id = cl.id;
        }
        let emb = Embedded {
            disk_attachments: Some(attachments(vm.id, &v.disks)),
            nics: Some(v.nics.clone()),
            snapshots: Some(v.snapshots.clone()),
            ..Default::default()
        };
        write::vm(o, &vm, Some(&emb));
    } else if let Some(t) = unregistered_template(e) {
        let mut tm = t.template.clone();
        tm.cluster_id = r.db().cluster_get_by_name(&t.cluster_name).await?.map(|c| c.id);
        let emb = Embedded {
            disk_attachments: Some(attachments(VmId::from_uuid(*tm.id.as_uuid()), &t.disks)),
            ..Default::default()
        };
        write::template(o, &tm, Some(&emb));
    }
    Ok(())
}

/// `GET /storagedomains/{sd}/vms` (`templates` with `templates`).
pub async fn list(r: &Req, templates: bool) -> Result<Resp, ApiError> {
    let s = sd(r).await?;
    let mut o = r.out();
    let (root, item) = if templates {
        ("templates", "template")
    } else {
        ("vms", "vm")
    };
    if r.q_bool("unregistered")?.unwrap_or(false) {
        let found = r.cmds().unregistered_entities(s.id, kind_of(templates)).await?;
        o.root(root, None, None);
        o.array_open(item);
        for e in &found {
            write_unregistered(r, &mut o, e).await?;
        }
        o.array_close();
        o.close(root);
        return Ok(Resp::ok(o));
    }
    if templates {
        let mut ts = Vec::new();
        let all = r
            .db()
            .template_list(&ListQuery {
                filter: TemplateFilter::default(),
                ..Default::default()
            })
            .await?;
        for t in all {
            if r.db()
                .template_disks(t.id)
                .await?
                .iter()
                .any(|d| d.storage_domain_id == s.id)
            {
                ts.push(t);
            }
        }
        collection(&mut o, root, item, &ts, |o, t| write::template(o, t, None));
    } else {
        let vms = r
            .db()
            .vm_list(&ListQuery {
                filter: VmFilter {
                    storage_domain: Some(Ref::Id(s.id)),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await?;
        collection(&mut o, root, item, &vms, |o, v| write::vm(o, v, None));
    }
    Ok(Resp::ok(o))
}

/// `GET /storagedomains/{sd}/vms/{id}`: a VM with disks on the domain, or an unregistered one.
pub async fn get(r: &Req, templates: bool) -> Result<Resp, ApiError> {
    let s = sd(r).await?;
    let id: uuid::Uuid = r.id(1, if templates { "template" } else { "VM" })?;
    let mut o = r.out();
    if templates {
        if let Some(t) = r.db().template_get(TemplateId::from_uuid(id)).await? {
            write::template(&mut o, &t, None);
            return Ok(Resp::ok(o));
        }
    } else if let Some(v) = r.db().vm_get(VmId::from_uuid(id)).await? {
        write::vm(&mut o, &v, None);
        return Ok(Resp::ok(o));
    }
    let found = r.cmds().unregistered_entities(s.id, kind_of(templates)).await?;
    let e = found.iter().find(|e| e.id() == id).ok_or_else(|| {
        ApiError::not_found(format!(
            "{} {id} not found on storage domain {}",
            if templates { "template" } else { "VM" },
            s.name
        ))
    })?;
    write_unregistered(r, &mut o, e).await?;
    Ok(Resp::ok(o))
}

/// `POST /storagedomains/{sd}/vms/{id}/register` (`templates/{id}/register`): `<cluster>`,
/// `<vm><name>` (`<template><name>`), `<allow_partial_import>`, `<reassign_bad_macs>`.
pub async fn register(r: &Req, templates: bool) -> Result<Resp, ApiError> {
    let s = sd(r).await?;
    let id: uuid::Uuid = r.id(1, if templates { "template" } else { "VM" })?;
    let b = r.action_body()?;
    let cluster = match b.child("cluster") {
        Some(c) => Some(cluster_ref(r, c).await?),
        None => None,
    };
    let name = b
        .get(if templates { "template/name" } else { "vm/name" })
        .map(|e: &Elem| e.text.trim().to_string())
        .filter(|n| !n.is_empty());
    let mut cluster_mappings = Vec::new();
    let mut network_mappings = Vec::new();
    if let Some(rc) = b.child("registration_configuration") {
        for m in rc
            .get("cluster_mappings")
            .into_iter()
            .flat_map(|c| c.children_named("registration_cluster_mapping"))
        {
            let from = m
                .str("from/name")
                .ok_or_else(|| ApiError::bad_request("a cluster mapping needs <from><name>"))?;
            let to = m
                .child("to")
                .ok_or_else(|| ApiError::bad_request("a cluster mapping needs <to>"))?;
            cluster_mappings.push((from.to_string(), cluster_ref(r, to).await?));
        }
        for m in rc
            .get("vnic_profile_mappings")
            .into_iter()
            .flat_map(|c| c.children_named("registration_vnic_profile_mapping"))
        {
            let from = m.string("from/network/name").or_else(|| m.string("from/name"));
            let to = match m.child("to") {
                None => None,
                Some(t) => profile_network(r, t).await?,
            };
            network_mappings.push((from, to));
        }
    }
    // oVirt 4.1's form, still sent by Ansible's `vnic_profile_mappings`.
    for m in b
        .get("vnic_profile_mappings")
        .into_iter()
        .flat_map(|c| c.children_named("vnic_profile_mapping"))
    {
        let from = m.string("source_network_name");
        let to = match m.child("target_vnic_profile") {
            None => None,
            Some(t) => profile_network(r, t).await?,
        };
        network_mappings.push((from, to));
    }
    let opts = RegisterOptions {
        cluster,
        name,
        allow_partial_import: b.bool("allow_partial_import")?.unwrap_or(false),
        reassign_bad_macs: b.bool("reassign_bad_macs")?.unwrap_or(false),
        cluster_mappings,
        network_mappings,
    };
    if templates {
        r.cmds()
            .register_template(s.id, TemplateId::from_uuid(id), opts)
            .await?;
    } else {
        r.cmds().register_vm(s.id, VmId::from_uuid(id), opts).await?;
    }
    Ok(action_complete(r))
}

/// The network a mapping's target vNIC profile is (`<to id>`, or `<to><name>` with
/// `<network><name>`; empty: none). Each network here has one profile, its namesake.
async fn profile_network(r: &Req, t: &Elem) -> Result<Option<String>, ApiError> {
    if let Some(id) = t.id() {
        let p: oxvirt_types::VnicProfileId = id
            .parse()
            .map_err(|_| ApiError::bad_request(format!("vNIC profile id {id:?} is not a UUID")))?;
        let n = r
            .db()
            .network_get(crate::network::network_of_profile(p))
            .await?
            .ok_or_else(|| ApiError::not_found(format!("vNIC profile {id} not found")))?;
        return Ok(Some(n.name));
    }
    Ok(t.string("network/name").or_else(|| t.string("name")))
}

/// `DELETE /storagedomains/{sd}/vms/{id}`: an unregistered VM (or template) and its disks go.
pub async fn remove(r: &Req, templates: bool) -> Result<Resp, ApiError> {
    let s = sd(r).await?;
    let id: uuid::Uuid = r.id(1, if templates { "template" } else { "VM" })?;
    let registered = if templates {
        r.db().template_get(TemplateId::from_uuid(id)).await?.is_some()
    } else {
        r.db().vm_get(VmId::from_uuid(id)).await?.is_some()
    };
    if registered {
        return Err(ApiError::conflict(format!(
            "{id} is registered: remove it under /{}",
            if templates { "templates" } else { "vms" }
        )));
    }
    r.cmds().remove_unregistered(s.id, kind_of(templates), id).await?;
    Ok(action_complete(r))
}

/// `POST /storagedomains/{sd}/updateovfstore`: the domain's OVF stores written now.
pub async fn update_ovf_store(r: &Req) -> Result<Resp, ApiError> {
    let s = sd(r).await?;
    r.cmds().update_ovf_store(s.id, true).await?;
    Ok(action_complete(r))
}
