//! VMs with their disk attachments, NICs and snapshots; templates.

use crate::commands::{AddSnapshot, AddVm, AddVmDisk, MigrateOptions, VmStartOptions};
use crate::db::{TemplateFilter, TemplateSort, VmFilter, VmSort};
use crate::model::*;

use super::super::fault::ApiError;
use super::super::input::Elem;
use super::super::out::Out;
use super::super::search::translate;
use super::super::write::{self, collection, href, Embedded};
use super::super::{Req, Resp, API};
use super::infra::root_entity;
use super::storage::new_disk;
use super::{
    action_complete, check_follow, cluster_ref, host_ref, is_async, required, run_action, sd_ref,
    template_ref, vm_ref,
};

async fn vm(r: &Req, i: usize) -> Result<Vm, ApiError> {
    let id: VmId = r.id(i, "VM")?;
    r.db()
        .vm_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("VM {id} not found")))
}

const VM_FOLLOW: &[&str] = &[
    "disk_attachments",
    "disk_attachments.disk",
    "nics",
    "snapshots",
    "cluster",
    "template",
    "host",
];

async fn attachments_with_disks(
    r: &Req,
    atts: Vec<DiskAttachment>,
    with_disks: bool,
) -> Result<Vec<(DiskAttachment, Option<Disk>)>, ApiError> {
    let mut out = Vec::with_capacity(atts.len());
    for a in atts {
        let d = if with_disks {
            r.db().disk_get(a.disk_id).await?
        } else {
            None
        };
        out.push((a, d));
    }
    Ok(out)
}

async fn vm_embedded(r: &Req, v: &Vm, follow: &[String]) -> Result<Option<Embedded>, ApiError> {
    if follow.is_empty() {
        return Ok(None);
    }
    let has = |s: &str| follow.iter().any(|f| f == s);
    let mut e = Embedded::default();
    if has("disk_attachments") || has("disk_attachments.disk") {
        let atts = r.db().attachments_of_vm(v.id).await?;
        e.disk_attachments = Some(attachments_with_disks(r, atts, has("disk_attachments.disk")).await?);
    }
    if has("nics") {
        e.nics = Some(r.db().nics_of_vm(v.id).await?);
    }
    if has("snapshots") {
        e.snapshots = Some(r.db().snapshots_of_vm(v.id).await?);
    }
    if has("cluster") {
        e.cluster = r.db().cluster_get(v.cluster_id).await?;
    }
    if has("template") {
        e.template = r.db().template_get(v.template_id).await?;
    }
    if has("host") {
        if let Some(h) = v.runtime.run_on_host {
            e.host = r.db().host_get(h).await?;
        }
    }
    Ok(Some(e))
}

fn one_vm(r: &Req, v: &Vm, e: Option<&Embedded>) -> Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::vm(o, v, e));
    o
}

pub async fn vm_list(r: &Req) -> Result<Resp, ApiError> {
    let follow = check_follow(r, VM_FOLLOW)?;
    let q = translate(
        &r.search()?,
        r.list_params()?,
        "VMs",
        |f: &mut VmFilter, c, x| {
            match c.field.as_str() {
                "name" => f.name = Some(x.text(c)?),
                "status" => f.status.push(x.value(c)?),
                "ha" | "high_availability" => f.ha = Some(x.value(c)?),
                _ => {
                    if let Some(v) = x.reference(c, "cluster")? {
                        f.cluster = Some(v);
                    } else if let Some(v) = x.reference(c, "datacenter")? {
                        f.data_center = Some(v);
                    } else if let Some(v) = x.reference(c, "host")? {
                        f.host = Some(v);
                    } else if let Some(v) = x.reference(c, "template")? {
                        f.template = Some(v);
                    } else if let Some(v) = x.reference(c, "storage")? {
                        f.storage_domain = Some(v);
                    } else if let Some(v) = x.reference(c, "tag")? {
                        f.tag = Some(v);
                    } else {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        },
        |k| match k {
            "name" => Some(VmSort::Name),
            "status" => Some(VmSort::Status),
            "memory" => Some(VmSort::Memory),
            "creation_time" | "creationdate" => Some(VmSort::CreatedAt),
            _ => None,
        },
    )?;
    let vms = r.db().vm_list(&q).await?;
    let mut o = Out::with_capacity(r.fmt, vms.len() * 1800);
    if follow.is_empty() {
        collection(&mut o, "vms", "vm", &vms, |o, v| write::vm(o, v, None));
    } else {
        let mut items = Vec::with_capacity(vms.len());
        for v in &vms {
            items.push((v, vm_embedded(r, v, &follow).await?));
        }
        collection(&mut o, "vms", "vm", &items, |o, (v, e)| {
            write::vm(o, v, e.as_ref())
        });
    }
    Ok(Resp::ok(o))
}

pub async fn vm_get(r: &Req) -> Result<Resp, ApiError> {
    let follow = check_follow(r, VM_FOLLOW)?;
    let v = vm(r, 0).await?;
    let e = vm_embedded(r, &v, &follow).await?;
    Ok(Resp::ok(one_vm(r, &v, e.as_ref())))
}

fn cpu_of(b: &Elem, default: CpuTopology) -> Result<Option<CpuTopology>, ApiError> {
    if b.get("cpu/topology").is_none() {
        return Ok(None);
    }
    Ok(Some(CpuTopology {
        sockets: b.u32("cpu/topology/sockets")?.unwrap_or(default.sockets),
        cores: b.u32("cpu/topology/cores")?.unwrap_or(default.cores),
        threads: b.u32("cpu/topology/threads")?.unwrap_or(default.threads),
    }))
}

/// `<os>` of `b` over `base`: what the element gives replaces what `base` has.
fn os_of(b: &Elem, base: &VmOs) -> Result<VmOs, ApiError> {
    let mut os = base.clone();
    if let Some(t) = b.string("os/type") {
        os.os_type = t;
    }
    if let Some(devs) = b.get("os/boot/devices") {
        os.boot_devices = boot_devices(devs)?;
    }
    for (path, field) in [
        ("os/kernel", &mut os.kernel),
        ("os/initrd", &mut os.initrd),
        ("os/cmdline", &mut os.cmdline),
    ] {
        if b.get(path).is_some() {
            *field = b.string(path);
        }
    }
    Ok(os)
}

/// `<devices><device>cdrom</device><device>hd</device></devices>`.
fn boot_devices(devs: &Elem) -> Result<Vec<BootDevice>, ApiError> {
    let list = devs
        .children_named("device")
        .map(|d| {
            d.text.trim().parse::<BootDevice>().map_err(|_| {
                ApiError::bad_request(format!("boot device {:?} is not one of hd, cdrom", d.text.trim()))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if list.is_empty() {
        return Err(ApiError::bad_request("<boot><devices> names no device"));
    }
    Ok(list)
}

fn ha_of(b: &Elem) -> Result<Option<HighAvailability>, ApiError> {
    if b.get("high_availability").is_none() {
        return Ok(None);
    }
    Ok(Some(HighAvailability {
        enabled: b.bool("high_availability/enabled")?.unwrap_or(false),
        priority: b.i32("high_availability/priority")?.unwrap_or(0),
    }))
}

pub async fn vm_add(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("vm")?;
    let cluster = match b.get("cluster") {
        Some(c) => cluster_ref(r, c).await?,
        None => return Err(ApiError::bad_request("<vm> needs <cluster>")),
    };
    if let Some(s) = b.get("snapshots") {
        return vm_add_from_snapshot(r, &b, s, cluster).await;
    }
    let template = match b.get("template") {
        Some(t) => template_ref(r, t).await?,
        None => BLANK_TEMPLATE_ID,
    };
    let req = AddVm {
        name: required(&b, "name")?.to_string(),
        description: b.string("description").unwrap_or_default(),
        cluster,
        template,
        memory_bytes: b.u64("memory")?,
        cpu: cpu_of(&b, CpuTopology::ONE)?,
        os: os_of(&b, &VmOs::default())?,
        ha: ha_of(&b)?,
        resume_behavior: b.parse("storage_error_resume_behaviour")?,
    };
    let v = r.adding().add_vm(req, r.correlation_id.clone()).await?;
    Ok(Resp::added(one_vm(r, &v, None), href("vms", v.id), v.pending))
}

/// `POST /vms` with `<snapshots><snapshot id="…"/></snapshots>`: a new VM from a snapshot of
/// another (oVirt's clone from snapshot), in that VM's cluster, with the snapshot's
/// configuration and its disks' data as they were then.
async fn vm_add_from_snapshot(
    r: &Req,
    b: &Elem,
    snapshots: &Elem,
    cluster: crate::model::ClusterId,
) -> Result<Resp, ApiError> {
    let mut ids = snapshots.children_named("snapshot");
    let (Some(s), None) = (ids.next(), ids.next()) else {
        return Err(ApiError::bad_request(
            "a VM is made from one snapshot: <snapshots><snapshot id=\"…\"/></snapshots>",
        ));
    };
    let sid = snapshot_id(s)?;
    let snap = r
        .db()
        .snapshot_get(sid)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("snapshot {sid} not found")))?;
    let src = r
        .db()
        .vm_get(snap.vm_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("the VM of snapshot {sid} is gone")))?;
    if src.cluster_id != cluster {
        return Err(ApiError::bad_request(format!(
            "snapshot {sid} is of VM {}, in another cluster: a VM made from it goes into that \
             VM's cluster",
            src.name
        )));
    }
    let name = required(b, "name")?.to_string();
    let v = r
        .adding()
        .clone_vm_from_snapshot(src.id, sid, &name, r.correlation_id.clone())
        .await?;
    Ok(Resp::added(one_vm(r, &v, None), href("vms", v.id), v.pending))
}

pub async fn vm_update(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("vm")?;
    let mut v = vm(r, 0).await?;
    if let Some(n) = b.str("name") {
        v.name = n.to_string();
    }
    if let Some(d) = b.get("description") {
        v.description = d.text.trim().to_string();
    }
    if let Some(m) = b.u64("memory")? {
        if v.memory_guaranteed_bytes == v.memory_bytes || v.memory_guaranteed_bytes > m {
            v.memory_guaranteed_bytes = m;
        }
        v.memory_bytes = m;
    }
    if let Some(g) = b.u64("memory_policy/guaranteed")? {
        v.memory_guaranteed_bytes = g;
    }
    if let Some(c) = cpu_of(&b, v.cpu)? {
        v.cpu = c;
    }
    if b.get("os").is_some() {
        v.os = os_of(&b, &v.os)?;
    }
    if let Some(ha) = ha_of(&b)? {
        v.ha = ha;
    }
    if let Some(l) = b.get("lease") {
        // `<lease/>`: back to the default (the first disk's domain).
        v.lease_storage_domain_id = match l.get("storage_domain") {
            Some(sd) => {
                let id = sd_ref(r, sd).await?;
                r.db()
                    .sd_get(id)
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("storage domain {id} not found")))?;
                Some(id)
            }
            None => None,
        };
    }
    if let Some(a) = b.parse("placement_policy/affinity")? {
        v.placement.affinity = a;
    }
    if let Some(rb) = b.parse("storage_error_resume_behaviour")? {
        v.resume_behavior = rb;
    }
    // oVirt's `next_run=true`: the running VM keeps what it has until its next start.
    let now = !r.q_bool("next_run")?.unwrap_or(false);
    let v = r.cmds().update_vm_with(&v, now).await?;
    Ok(Resp::ok(one_vm(r, &v, None)))
}

pub async fn vm_remove(r: &Req) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let detach_only = r.q_bool("detach_only")?.unwrap_or(false);
    if r.q_bool("force")?.unwrap_or(false) && v.runtime.status.is_running() {
        r.cmds().stop_vm(v.id).await?;
    }
    let id = v.id;
    let corr = r.correlation_id.clone();
    run_remove(r, "remove VM", move |e| async move {
        e.cmds.remove_vm(id, detach_only, corr).await?;
        Ok(())
    })
    .await
}

/// DELETE answers 200 with an `<action>` in every case (the SDK accepts nothing else); with
/// `async=true` the removal goes on after the answer once it passed its checks
/// ([`super::run_async`]: a refused removal is still the request's error).
pub async fn run_remove<F, Fut>(r: &Req, what: &'static str, f: F) -> Result<Resp, ApiError>
where
    F: FnOnce(std::sync::Arc<crate::daemon::Engine>) -> Fut,
    Fut: std::future::Future<Output = Result<(), ApiError>> + Send + 'static,
{
    if is_async(r, None)? {
        return super::run_async(r, what, f(r.engine.clone()), |r, _| action_complete(r)).await;
    }
    f(r.engine.clone()).await?;
    Ok(action_complete(r))
}

pub async fn vm_start(r: &Req) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let body = r.action_body()?;
    let host = match body
        .get("vm/placement_policy/hosts")
        .and_then(|h| h.child("host"))
        .or_else(|| body.get("host"))
    {
        Some(h) => Some(host_ref(r, h).await?),
        None => None,
    };
    let paused = body.bool("pause")?.unwrap_or(false);
    // A run once's kernel becomes the VM's (oxvirt keeps no separate run-once kernel); its
    // boot order holds for this run only (below).
    let os = match body.get("vm") {
        Some(e) if e.get("os/kernel").is_some() => {
            let mut os = os_of(e, &v.os)?;
            os.boot_devices = v.os.boot_devices.clone();
            Some(os)
        }
        _ => None,
    };
    // A run once's CD and boot order hold for this run only.
    let mut run_once = None;
    if let Some(e) = body.get("vm") {
        let mut ro = crate::commands::RunOnce::default();
        if let Some(f) = e.get("cdroms/cdrom/file") {
            ro.cdrom = Some(match f.id() {
                Some(id) => crate::commands::RunOnceCd::Iso(iso_ref(r, id).await?),
                None => crate::commands::RunOnceCd::Empty,
            });
        }
        if let Some(devs) = e.get("os/boot/devices") {
            ro.boot_devices = Some(boot_devices(devs)?);
        }
        if ro != Default::default() {
            run_once = Some(ro);
        }
    }
    let corr = r.correlation_id.clone();
    let id = v.id;
    let status = v.runtime.status;
    run_action(r, Some(&body), "start", move |e| async move {
        if let Some(os) = os {
            // Run-once boot parameters become the VM's (oxvirt keeps no separate run-once
            // configuration).
            let mut vm = e
                .cmds
                .app
                .db
                .vm_get(id)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("VM {id} not found")))?;
            vm.os = os;
            e.cmds.app.db.vm_update(&vm).await?;
        }
        if status == VmStatus::Paused {
            e.cmds.resume_vm(id).await?;
        } else {
            e.cmds
                .start_vm(
                    id,
                    VmStartOptions {
                        host,
                        paused,
                        run_once,
                    },
                    corr,
                )
                .await?;
        }
        Ok(())
    })
    .await
}

#[derive(Debug, Clone, Copy)]
pub enum Power {
    Stop,
    Shutdown,
    Suspend,
    Reboot,
    CancelMigration,
}

pub async fn vm_power(r: &Req, p: Power) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let body = r.action_body()?;
    let id = v.id;
    let what = match p {
        Power::Stop => "stop",
        Power::Shutdown => "shutdown",
        Power::Suspend => "suspend",
        Power::Reboot => "reboot",
        Power::CancelMigration => "cancel migration",
    };
    let corr = r.correlation_id.clone();
    run_action(r, Some(&body), what, move |e| async move {
        match p {
            Power::Stop => {
                e.cmds.stop_vm(id).await?;
            }
            Power::Shutdown => {
                e.cmds.shutdown_vm(id).await?;
            }
            // As oVirt: memory and devices go to a volume, the VM is `suspended`; start resumes.
            Power::Suspend => {
                e.cmds.suspend_vm(id, corr).await?;
            }
            Power::Reboot => {
                e.cmds.reboot_vm(id).await?;
            }
            Power::CancelMigration => {
                e.cmds.cancel_migration(id).await?;
            }
        }
        Ok(())
    })
    .await
}

pub async fn vm_migrate(r: &Req) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let body = r.action_body()?;
    let host = match body.get("host") {
        Some(h) => Some(host_ref(r, h).await?),
        None => None,
    };
    let corr = r.correlation_id.clone();
    let id = v.id;
    run_action(r, Some(&body), "migrate", move |e| async move {
        e.cmds.migrate_vm(id, MigrateOptions { host }, corr).await?;
        Ok(())
    })
    .await
}

/// `POST /vms/{id}/clone` with `<action><vm><name>NEW</name></vm></action>`: the VM, down,
/// copied into a new one with disks of its own.
pub async fn vm_clone(r: &Req) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let body = r.action_body()?;
    let name = body
        .string("vm/name")
        .ok_or_else(|| ApiError::bad_request("the clone action needs <vm><name>NEW</name></vm>"))?;
    let corr = r.correlation_id.clone();
    let id = v.id;
    run_action(r, Some(&body), "clone", move |e| async move {
        e.cmds.clone_vm(id, &name, corr).await?;
        Ok(())
    })
    .await
}

/// The id of a `<snapshot id="…"/>` reference.
fn snapshot_id(s: &Elem) -> Result<SnapshotId, ApiError> {
    let id = s
        .id()
        .ok_or_else(|| ApiError::bad_request("<snapshot> needs an id"))?;
    id.parse()
        .map_err(|_| ApiError::bad_request(format!("snapshot id {id:?} is not a UUID")))
}

async fn snapshot_from_action(r: &Req, v: &Vm, body: &Elem) -> Result<SnapshotId, ApiError> {
    let s = body
        .get("snapshot")
        .ok_or_else(|| ApiError::bad_request("the action needs <snapshot id=\"…\"/>"))?;
    let sid = snapshot_id(s)?;
    r.db()
        .snapshot_get(sid)
        .await?
        .filter(|s| s.vm_id == v.id)
        .ok_or_else(|| ApiError::not_found(format!("snapshot {sid} of VM {} not found", v.name)))?;
    Ok(sid)
}

/// `previewsnapshot`: the VM (down) runs on the snapshot's data until commit or undo; the
/// present is kept aside (see `commands::snapshots`).
pub async fn vm_preview(r: &Req) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let body = r.action_body()?;
    let sid = snapshot_from_action(r, &v, &body).await?;
    let memory = body.bool("restore_memory")?.unwrap_or(false);
    let corr = r.correlation_id.clone();
    let id = v.id;
    run_action(r, Some(&body), "preview snapshot", move |e| async move {
        e.cmds.preview_snapshot(id, sid, memory, corr).await?;
        Ok(())
    })
    .await
}

/// `commitsnapshot`: the previewed data becomes the present.
pub async fn vm_commit(r: &Req) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let body = r.action_body()?;
    let corr = r.correlation_id.clone();
    let id = v.id;
    run_action(r, Some(&body), "commit snapshot", move |e| async move {
        e.cmds.commit_snapshot(id, corr).await?;
        Ok(())
    })
    .await
}

/// `undosnapshot`: back to the data kept aside when the preview began.
pub async fn vm_undo(r: &Req) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let body = r.action_body()?;
    let corr = r.correlation_id.clone();
    let id = v.id;
    run_action(r, Some(&body), "undo snapshot", move |e| async move {
        e.cmds.undo_snapshot(id, corr).await?;
        Ok(())
    })
    .await
}

// ----------------------------------------------------------------------- disk attachments

/// The owner of an attachment list: a VM, or a template (`templates/{id}/diskattachments`).
pub async fn att_list(r: &Req, owner: &str) -> Result<Resp, ApiError> {
    let follow = check_follow(r, &["disk"])?;
    let atts = if owner == "templates" {
        let id: TemplateId = r.id(0, "template")?;
        r.db()
            .template_get(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("template {id} not found")))?;
        r.db()
            .template_disks(id)
            .await?
            .into_iter()
            .map(|d| {
                (
                    DiskAttachment {
                        vm_id: VmId::from_uuid(*id.as_uuid()),
                        disk_id: d.id,
                        interface: DiskInterface::VirtioScsi,
                        bootable: false,
                        active: true,
                        read_only: false,
                    },
                    Some(d),
                )
            })
            .collect::<Vec<_>>()
    } else {
        let v = vm(r, 0).await?;
        let atts = r.db().attachments_of_vm(v.id).await?;
        attachments_with_disks(r, atts, !follow.is_empty()).await?
    };
    let with_disks = !follow.is_empty();
    let mut o = r.out();
    collection(
        &mut o,
        "disk_attachments",
        "disk_attachment",
        &atts,
        |o, (a, d)| write::disk_attachment(o, owner, a, if with_disks { d.as_ref() } else { None }),
    );
    Ok(Resp::ok(o))
}

async fn attachment(r: &Req) -> Result<(Vm, DiskAttachment), ApiError> {
    let v = vm(r, 0).await?;
    let d: DiskId = r.id(1, "disk attachment")?;
    let a = r
        .db()
        .attachment_get(v.id, d)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("disk attachment {d} of VM {} not found", v.name)))?;
    Ok((v, a))
}

fn one_att(r: &Req, a: &DiskAttachment, d: Option<&Disk>) -> Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::disk_attachment(o, "vms", a, d));
    o
}

pub async fn att_get(r: &Req) -> Result<Resp, ApiError> {
    let follow = check_follow(r, &["disk"])?;
    let (_, a) = attachment(r).await?;
    let d = if follow.is_empty() {
        None
    } else {
        r.db().disk_get(a.disk_id).await?
    };
    Ok(Resp::ok(one_att(r, &a, d.as_ref())))
}

pub async fn att_add(r: &Req) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let b = r.body("disk_attachment")?;
    let how = AddVmDisk {
        vm: v.id,
        interface: b.parse("interface")?.unwrap_or(DiskInterface::VirtioScsi),
        bootable: b.bool("bootable")?.unwrap_or(false),
        active: b.bool("active")?.unwrap_or(true),
    };
    let de = b
        .get("disk")
        .ok_or_else(|| ApiError::bad_request("<disk_attachment> needs <disk>"))?;
    let mut pending = false;
    let a = match de.id() {
        Some(id) => {
            let disk: DiskId = id
                .parse()
                .map_err(|_| ApiError::bad_request(format!("disk id {id:?} is not a UUID")))?;
            r.cmds().attach_disk(v.id, disk, how).await?
        }
        None => {
            let mut req = new_disk(r, de).await?;
            req.attach_to = Some(how.clone());
            let d = r.adding().add_disk(req, r.correlation_id.clone()).await?;
            pending = d.pending;
            r.db()
                .attachment_get(v.id, d.id)
                .await?
                .unwrap_or_else(|| how.attachment(d.id))
        }
    };
    let d = r.db().disk_get(a.disk_id).await?;
    Ok(Resp::added(
        one_att(r, &a, d.as_ref()),
        format!("{API}/vms/{}/diskattachments/{}", v.id, a.disk_id),
        pending,
    ))
}

pub async fn att_update(r: &Req) -> Result<Resp, ApiError> {
    let (_, mut a) = attachment(r).await?;
    let b = r.body("disk_attachment")?;
    // Everything parsed before anything changes.
    let (active, bootable, read_only) = (b.bool("active")?, b.bool("bootable")?, b.bool("read_only")?);
    let interface = b.parse("interface")?;
    let size = b
        .get("disk")
        .map(|d| d.u64("provisioned_size"))
        .transpose()?
        .flatten();
    // `<disk><provisioned_size>` extends the disk, also under the running VM (oVirt's way).
    if let Some(size) = size {
        r.cmds()
            .extend_disk(a.disk_id, size, r.correlation_id.clone())
            .await?;
    }
    if let Some(x) = active {
        a.active = x;
    }
    if let Some(x) = bootable {
        a.bootable = x;
    }
    if let Some(x) = interface {
        a.interface = x;
    }
    if let Some(x) = read_only {
        a.read_only = x;
    }
    let a = r.cmds().update_disk_attachment(a).await?;
    Ok(Resp::ok(one_att(r, &a, None)))
}

pub async fn att_remove(r: &Req) -> Result<Resp, ApiError> {
    let (v, a) = attachment(r).await?;
    let detach_only = r.q_bool("detach_only")?.unwrap_or(true);
    r.cmds().detach_disk(v.id, a.disk_id).await?;
    if !detach_only {
        r.cmds().remove_disk(a.disk_id, r.correlation_id.clone()).await?;
    }
    Ok(action_complete(r))
}

/// `vms/{id}/numanodes`: oxvirt gives VMs no virtual NUMA topology, so the list is empty (as
/// oVirt's is for a VM without pinned NUMA nodes); clients such as the Ansible VM module read
/// it on every run.
pub async fn numa_list(r: &Req) -> Result<Resp, ApiError> {
    vm(r, 0).await?;
    let mut o = r.out();
    collection(&mut o, "vm_numa_nodes", "vm_numa_node", &[] as &[()], |_, _| {});
    Ok(Resp::ok(o))
}

// -------------------------------------------------------------------------------- statistics

/// `statistics` (`one`: `statistics/{id}`, 404 for an id that is none of them) of the object
/// `owner` (`vm`, `host`) `id` of collection `coll`.
pub fn statistics_reply(
    r: &Req,
    stats: &[crate::commands::stats::Statistic],
    one: bool,
    owner: &str,
    coll: &str,
    id: &str,
) -> Result<Resp, ApiError> {
    let mut o = r.out();
    if one {
        let want = r.params.get(1).map(String::as_str).unwrap_or("");
        let s = stats
            .iter()
            .find(|s| s.id().to_string() == want)
            .ok_or_else(|| ApiError::not_found(format!("{owner} {id} has no statistic {want}")))?;
        root_entity(&mut o, |o| crate::rest::write::statistic(o, s, owner, coll, id));
    } else {
        collection(&mut o, "statistics", "statistic", stats, |o, s| {
            crate::rest::write::statistic(o, s, owner, coll, id)
        });
    }
    Ok(Resp::ok(o))
}

pub async fn stat_list(r: &Req, one: bool) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let stats = r.cmds().vm_statistics(v.id).await?;
    statistics_reply(r, &stats, one, "vm", "vms", &v.id.to_string())
}

// -------------------------------------------------------------------------------- CD-ROM

/// The ISO disk `id` names (a disk id; oVirt's ISO-domain file names do not exist here).
async fn iso_ref(r: &Req, id: &str) -> Result<DiskId, ApiError> {
    let disk: DiskId = id.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "CD file {id:?} is not an ISO disk's id (oxvirt keeps ISOs as disks of content type iso)"
        ))
    })?;
    r.db()
        .disk_get(disk)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("ISO disk {disk} not found")))?;
    Ok(disk)
}

/// The VM and what its CD-ROM holds: with `current=true` and the VM running, the running VM's
/// drive; else the configuration's (404 for another cdrom id).
async fn cdrom(r: &Req, by_id: bool) -> Result<(Vm, Option<DiskId>), ApiError> {
    let v = vm(r, 0).await?;
    if by_id {
        match r.params.get(1).map(String::as_str) {
            Some(crate::rest::write::CDROM_ID) => {}
            other => {
                return Err(ApiError::not_found(format!(
                    "VM {} has no CD-ROM {} (its one CD-ROM is {})",
                    v.name,
                    other.unwrap_or(""),
                    crate::rest::write::CDROM_ID
                )))
            }
        }
    }
    let current = r.q_bool("current")?.unwrap_or(false);
    let file = if current && v.runtime.status.is_running() {
        v.run_cdrom
    } else {
        v.cdrom
    };
    Ok((v, file))
}

pub async fn cdrom_list(r: &Req) -> Result<Resp, ApiError> {
    let (v, file) = cdrom(r, false).await?;
    let mut o = r.out();
    collection(&mut o, "cdroms", "cdrom", &[file], |o, f| {
        crate::rest::write::cdrom(o, v.id, *f)
    });
    Ok(Resp::ok(o))
}

pub async fn cdrom_get(r: &Req) -> Result<Resp, ApiError> {
    let (v, file) = cdrom(r, true).await?;
    let mut o = r.out();
    root_entity(&mut o, |o| crate::rest::write::cdrom(o, v.id, file));
    Ok(Resp::ok(o))
}

/// `<cdrom><file id="ISO disk"/></cdrom>`; `<file id=""/>` or `<file/>` ejects.
pub async fn cdrom_update(r: &Req) -> Result<Resp, ApiError> {
    let (v, _) = cdrom(r, true).await?;
    let b = r.body("cdrom")?;
    let f = b.get("file").ok_or_else(|| {
        ApiError::bad_request("<cdrom> needs <file id=\"ISO disk id\"/> (an empty id ejects)")
    })?;
    let disk = match f.id() {
        Some(id) => Some(iso_ref(r, id).await?),
        None => None,
    };
    let current = r.q_bool("current")?.unwrap_or(false);
    let v = r.cmds().set_vm_cdrom(v.id, disk, current).await?;
    let file = if current { v.run_cdrom } else { v.cdrom };
    let mut o = r.out();
    root_entity(&mut o, |o| crate::rest::write::cdrom(o, v.id, file));
    Ok(Resp::ok(o))
}

// -------------------------------------------------------------------------------- consoles

/// oVirt names a VM's graphics consoles by their protocol in hex: "vnc".
const VNC_CONSOLE: &str = "766e63";

fn write_console(o: &mut Out, v: &Vm) {
    let hr = format!("{API}/vms/{}/graphicsconsoles/{VNC_CONSOLE}", v.id);
    o.open("graphics_console", Some(VNC_CONSOLE), Some(&hr));
    o.open("actions", None, None);
    o.links(&hr, &["remoteviewerconnectionfile", "ticket"]);
    o.close("actions");
    o.leaf("protocol", "vnc");
    let vid = v.id.to_string();
    o.reference("vm", &vid, &href("vms", v.id));
    o.close("graphics_console");
}

/// The VM and its console (404 for another console id).
async fn console(r: &Req) -> Result<Vm, ApiError> {
    let v = vm(r, 0).await?;
    match r.params.get(1).map(String::as_str) {
        Some(VNC_CONSOLE) => Ok(v),
        Some(other) => Err(ApiError::not_found(format!(
            "VM {} has no graphics console {other} (only VNC, {VNC_CONSOLE})",
            v.name
        ))),
        None => Err(ApiError::not_found("no graphics console id")),
    }
}

pub async fn console_list(r: &Req) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let mut o = r.out();
    collection(
        &mut o,
        "graphics_consoles",
        "graphics_console",
        &[v],
        write_console,
    );
    Ok(Resp::ok(o))
}

pub async fn console_get(r: &Req) -> Result<Resp, ApiError> {
    let v = console(r).await?;
    let mut o = r.out();
    root_entity(&mut o, |o| write_console(o, &v));
    Ok(Resp::ok(o))
}

/// `<action><ticket><value>…</value><expiry>SECS</expiry></ticket></action>`, both optional;
/// the reply carries the ticket given.
pub async fn console_ticket(r: &Req) -> Result<Resp, ApiError> {
    let v = console(r).await?;
    let body = r.action_body()?;
    let t = r
        .cmds()
        .console_ticket(v.id, body.string("ticket/value"), body.u64("ticket/expiry")?)
        .await?;
    let mut o = r.out();
    o.root("action", None, None);
    o.open("ticket", None, None);
    o.leaf("expiry", t.expiry);
    o.leaf("value", &t.password);
    o.close("ticket");
    o.leaf("status", "complete");
    o.close("action");
    Ok(Resp::ok(o))
}

/// The `.vv` file for `remote-viewer`, with a fresh ticket of the default lifetime.
pub async fn console_file(r: &Req) -> Result<Resp, ApiError> {
    let v = console(r).await?;
    let _ = r.action_body()?;
    let t = r.cmds().console_ticket(v.id, None, None).await?;
    let mut o = r.out();
    o.root("action", None, None);
    o.leaf("remote_viewer_connection_file", t.connection_file(&v.name));
    o.leaf("status", "complete");
    o.close("action");
    Ok(Resp::ok(o))
}

// ------------------------------------------------------------------------------- snapshots

async fn snap(r: &Req) -> Result<(Vm, Snapshot), ApiError> {
    let v = vm(r, 0).await?;
    let id: SnapshotId = r.id(1, "snapshot")?;
    let s = r
        .db()
        .snapshot_get(id)
        .await?
        .filter(|s| s.vm_id == v.id)
        .ok_or_else(|| ApiError::not_found(format!("snapshot {id} of VM {} not found", v.name)))?;
    Ok((v, s))
}

pub async fn snap_list(r: &Req) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let ss = r.db().snapshots_of_vm(v.id).await?;
    let mut o = r.out();
    collection(&mut o, "snapshots", "snapshot", &ss, write::snapshot);
    Ok(Resp::ok(o))
}

pub async fn snap_get(r: &Req) -> Result<Resp, ApiError> {
    let (_, s) = snap(r).await?;
    let mut o = r.out();
    root_entity(&mut o, |o| write::snapshot(o, &s));
    Ok(Resp::ok(o))
}

/// The disks of a snapshot with the volumes holding their data as of it (an active snapshot's
/// are the disks' present).
pub async fn snap_disks(r: &Req) -> Result<Resp, ApiError> {
    let (_, s) = snap(r).await?;
    let mut items = Vec::new();
    for sd in &s.disks {
        if let (Some(d), Some(v)) = (
            r.db().disk_get(sd.disk_id).await?,
            r.db().volume_get(sd.volume_id).await?,
        ) {
            items.push((d, v));
        }
    }
    let mut o = r.out();
    collection(&mut o, "disks", "disk", &items, |o, (d, v)| {
        write::disk_snapshot(o, d, v, &s, true)
    });
    Ok(Resp::ok(o))
}

pub async fn snap_add(r: &Req) -> Result<Resp, ApiError> {
    let v = vm(r, 0).await?;
    let b = r.body("snapshot")?;
    let s = r
        .adding()
        .add_snapshot(
            v.id,
            AddSnapshot {
                description: b.string("description").unwrap_or_default(),
                persist_memory: b.bool("persist_memorystate")?.unwrap_or(false),
                disks: snapshot_disks(&b)?,
            },
            r.correlation_id.clone(),
        )
        .await?;
    let mut o = r.out();
    root_entity(&mut o, |o| write::snapshot(o, &s));
    Ok(Resp::added(
        o,
        format!("{API}/vms/{}/snapshots/{}", v.id, s.id),
        s.pending,
    ))
}

/// The disks a new snapshot covers, from `<disk_attachments><disk_attachment><disk id=…>`
/// (the attachment's own id is the disk's too); `None`: every disk of the VM.
fn snapshot_disks(b: &crate::rest::input::Elem) -> Result<Option<Vec<DiskId>>, ApiError> {
    let Some(list) = b.get("disk_attachments") else {
        return Ok(None);
    };
    list.children_named("disk_attachment")
        .map(|a| {
            let id = a
                .get("disk")
                .and_then(|d| d.id())
                .or_else(|| a.id())
                .ok_or_else(|| ApiError::bad_request("a snapshot's <disk_attachment> needs a <disk id=…>"))?;
            id.parse()
                .map_err(|_| ApiError::bad_request(format!("disk id {id:?} is not a UUID")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

pub async fn snap_remove(r: &Req) -> Result<Resp, ApiError> {
    let (v, s) = snap(r).await?;
    let corr = r.correlation_id.clone();
    let (vid, sid) = (v.id, s.id);
    run_remove(r, "remove snapshot", move |e| async move {
        e.cmds.remove_snapshot(vid, sid, corr).await?;
        Ok(())
    })
    .await
}

pub async fn snap_restore(r: &Req) -> Result<Resp, ApiError> {
    let (v, s) = snap(r).await?;
    let body = r.action_body()?;
    let memory = body.bool("restore_memory")?.unwrap_or(false);
    let corr = r.correlation_id.clone();
    let (vid, sid) = (v.id, s.id);
    run_action(r, Some(&body), "restore snapshot", move |e| async move {
        e.cmds.restore_snapshot(vid, sid, memory, corr).await?;
        Ok(())
    })
    .await
}

// ------------------------------------------------------------------------------- templates

async fn template(r: &Req, i: usize) -> Result<Template, ApiError> {
    let id: TemplateId = r.id(i, "template")?;
    r.db()
        .template_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("template {id} not found")))
}

fn one_template(r: &Req, t: &Template) -> Out {
    let mut o = r.out();
    root_entity(&mut o, |o| write::template(o, t, None));
    o
}

pub async fn template_list(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let q = translate(
        &r.search()?,
        r.list_params()?,
        "templates",
        |f: &mut TemplateFilter, c, x| {
            match c.field.as_str() {
                "name" => f.name = Some(x.text(c)?),
                "status" => f.status.push(x.value(c)?),
                _ => {
                    if let Some(v) = x.reference(c, "cluster")? {
                        f.cluster = Some(v);
                    } else if let Some(v) = x.reference(c, "datacenter")? {
                        f.data_center = Some(v);
                    } else if let Some(v) = x.reference(c, "vm")? {
                        f.vm = Some(v);
                    } else {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        },
        |k| match k {
            "name" => Some(TemplateSort::Name),
            "creation_time" | "creationdate" => Some(TemplateSort::CreatedAt),
            _ => None,
        },
    )?;
    let ts = r.db().template_list(&q).await?;
    let mut o = r.out();
    collection(&mut o, "templates", "template", &ts, |o, t| {
        write::template(o, t, None)
    });
    Ok(Resp::ok(o))
}

pub async fn template_get(r: &Req) -> Result<Resp, ApiError> {
    check_follow(r, &[])?;
    let t = template(r, 0).await?;
    Ok(Resp::ok(one_template(r, &t)))
}

pub async fn template_add(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("template")?;
    let ve = b
        .get("vm")
        .ok_or_else(|| ApiError::bad_request("<template> needs the <vm> it is made from"))?;
    let vm = vm_ref(r, ve).await?;
    let t = r
        .adding()
        .add_template(
            vm,
            required(&b, "name")?,
            b.str("description").unwrap_or_default(),
            r.correlation_id.clone(),
        )
        .await?;
    Ok(Resp::added(
        one_template(r, &t),
        href("templates", t.id),
        t.pending,
    ))
}

pub async fn template_update(r: &Req) -> Result<Resp, ApiError> {
    let b = r.body("template")?;
    let mut t = template(r, 0).await?;
    if let Some(n) = b.str("name") {
        t.name = n.to_string();
    }
    if let Some(d) = b.get("description") {
        t.description = d.text.trim().to_string();
    }
    if let Some(m) = b.u64("memory")? {
        t.memory_bytes = m;
    }
    if let Some(c) = cpu_of(&b, t.cpu)? {
        t.cpu = c;
    }
    let t = r.db().template_update(&t).await?;
    Ok(Resp::ok(one_template(r, &t)))
}

pub async fn template_remove(r: &Req) -> Result<Resp, ApiError> {
    let t = template(r, 0).await?;
    let id = t.id;
    run_remove(r, "remove template", move |e| async move {
        e.cmds.remove_template(id).await?;
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rest::input::parse_body;

    #[test]
    fn a_snapshot_names_its_disks_in_xml_or_json() {
        let (a, b) = (DiskId::new_random(), DiskId::new_random());
        let xml = format!(
            "<snapshot><description>s</description><disk_attachments>\
             <disk_attachment><disk id=\"{a}\"/></disk_attachment>\
             <disk_attachment id=\"{b}\"/></disk_attachments></snapshot>"
        );
        let e = parse_body(xml.as_bytes(), false, "snapshot").unwrap();
        assert_eq!(snapshot_disks(&e).unwrap(), Some(vec![a, b]));
        let json = format!(r#"{{"disk_attachments": {{"disk_attachment": [{{"disk": {{"id": "{a}"}}}}]}}}}"#);
        let e = parse_body(json.as_bytes(), true, "snapshot").unwrap();
        assert_eq!(snapshot_disks(&e).unwrap(), Some(vec![a]));
        let e = parse_body(
            b"<snapshot><description>all</description></snapshot>",
            false,
            "snapshot",
        )
        .unwrap();
        assert_eq!(snapshot_disks(&e).unwrap(), None, "no list: every disk");
        let bad = "<snapshot><disk_attachments><disk_attachment><disk id=\"nope\"/></disk_attachment></disk_attachments></snapshot>";
        let e = parse_body(bad.as_bytes(), false, "snapshot").unwrap();
        assert!(snapshot_disks(&e).unwrap_err().detail.contains("nope"));
        let e = parse_body(
            b"<snapshot><disk_attachments><disk_attachment/></disk_attachments></snapshot>",
            false,
            "snapshot",
        )
        .unwrap();
        assert!(snapshot_disks(&e).is_err());
    }
}
