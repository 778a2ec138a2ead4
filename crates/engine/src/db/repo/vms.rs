//! Templates, VMs, their disk attachments, NICs, snapshots and affinity groups.

use std::collections::BTreeMap;

use rand::Rng;
use sqlx::any::AnyRow;

use super::infra::check_name as validate_name;
use super::missing_or_conflict;
use super::storage::disk_from_row;
use crate::db::list::{order_and_page, ListQuery, Ref, TextMatch, Where};
use crate::db::sql::{b2i, u2i, Arg, RowExt, Sql};
use crate::db::{Conn, DbError};
use crate::model::*;

fn check_cpu_mem(what: &'static str, cpu: &CpuTopology, mem: u64) -> Result<(), DbError> {
    if cpu.sockets == 0 || cpu.cores == 0 || cpu.threads == 0 || mem == 0 {
        return Err(DbError::Invalid {
            what,
            detail: format!("{} vCPUs and {mem} bytes of memory", cpu.vcpus()),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------- templates

const TEMPLATE_COLS: &str = "id, name, description, cluster_id, memory_bytes, cpu_sockets, \
    cpu_cores, cpu_threads, status, created_at, revision";

fn template_from_row(r: &AnyRow) -> Result<Template, DbError> {
    Ok(Template {
        id: r.parse("id")?,
        name: r.text("name")?,
        description: r.text("description")?,
        cluster_id: r.opt_parse("cluster_id")?,
        memory_bytes: r.uint("memory_bytes")?,
        cpu: CpuTopology {
            sockets: r.u32("cpu_sockets")?,
            cores: r.u32("cpu_cores")?,
            threads: r.u32("cpu_threads")?,
        },
        status: r.parse("status")?,
        created_at: r.ts("created_at")?,
        revision: r.int("revision")?,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateFilter {
    pub name: Option<TextMatch>,
    pub status: Vec<TemplateStatus>,
    pub cluster: Option<Ref<ClusterId>>,
    /// Templates of the data center's clusters, and those of no cluster (Blank), which every
    /// data center has.
    pub data_center: Option<Ref<DcId>>,
    /// The template a VM was made from.
    pub vm: Option<Ref<VmId>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateSort {
    Name,
    CreatedAt,
}

fn template_args(q: &mut Sql, t: &Template) -> Result<(), DbError> {
    q.arg(t.name.as_str())
        .push(", ")
        .arg(t.description.as_str())
        .push(", ")
        .arg(Arg::Text(t.cluster_id.map(|c| c.to_string())))
        .push(", ")
        .arg(u2i("memory", t.memory_bytes)?)
        .push(", ")
        .arg(i64::from(t.cpu.sockets))
        .push(", ")
        .arg(i64::from(t.cpu.cores))
        .push(", ")
        .arg(i64::from(t.cpu.threads));
    Ok(())
}

async fn template_insert(c: &mut Conn<'_>, t: &Template) -> Result<Template, DbError> {
    validate_name("template name", &t.name)?;
    check_cpu_mem("template size", &t.cpu, t.memory_bytes)?;
    let mut q = Sql::new(&format!("INSERT INTO templates ({TEMPLATE_COLS}) VALUES ("));
    q.arg(t.id.to_string()).push(", ");
    template_args(&mut q, t)?;
    q.push(", ")
        .arg(t.status.as_str())
        .push(", ")
        .arg(c.now.as_millis())
        .push(", 1)");
    c.exec_as(&q, "template", &t.name).await?;
    template_get(c, t.id)
        .await?
        .ok_or_else(|| DbError::not_found("template", t.id))
}

async fn template_get(c: &mut Conn<'_>, id: TemplateId) -> Result<Option<Template>, DbError> {
    let mut q = Sql::new(&format!("SELECT {TEMPLATE_COLS} FROM templates WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(template_from_row).transpose()
}

async fn template_get_by_name(c: &mut Conn<'_>, name: &str) -> Result<Option<Template>, DbError> {
    let mut q = Sql::new(&format!("SELECT {TEMPLATE_COLS} FROM templates WHERE name = "));
    q.arg(name);
    c.opt(&q).await?.as_ref().map(template_from_row).transpose()
}

async fn template_list(
    c: &mut Conn<'_>,
    lq: &ListQuery<TemplateFilter, TemplateSort>,
) -> Result<Vec<Template>, DbError> {
    let mut q = Sql::new(&format!("SELECT {TEMPLATE_COLS} FROM templates"));
    Where::new(&mut q, c.backend).each(lq, |w, f| {
        w.text("name", &f.name);
        w.any_of("status", &f.status);
        w.reference("cluster_id", "clusters", &f.cluster);
        w.reference_in(
            "(cluster_id IS NULL OR cluster_id IN (SELECT id FROM clusters WHERE data_center_id IN {ids}))",
            "data_centers",
            &f.data_center,
        );
        w.reference_in(
            "id IN (SELECT template_id FROM vms WHERE id IN {ids})",
            "vms",
            &f.vm,
        );
    });
    order_and_page(
        &mut q,
        lq,
        |k| match k {
            TemplateSort::Name => "name",
            TemplateSort::CreatedAt => "created_at",
        },
        "id",
    );
    c.all(&q).await?.iter().map(template_from_row).collect()
}

fn refuse_blank(id: TemplateId) -> Result<(), DbError> {
    if id == BLANK_TEMPLATE_ID {
        return Err(DbError::Invalid {
            what: "template",
            detail: "the Blank template is built in and cannot be changed or removed".into(),
        });
    }
    Ok(())
}

async fn template_update(c: &mut Conn<'_>, t: &Template) -> Result<Template, DbError> {
    refuse_blank(t.id)?;
    validate_name("template name", &t.name)?;
    check_cpu_mem("template size", &t.cpu, t.memory_bytes)?;
    let mut q = Sql::new("UPDATE templates SET (name, description, cluster_id, memory_bytes, cpu_sockets, cpu_cores, cpu_threads) = (");
    template_args(&mut q, t)?;
    q.push("), revision = revision + 1 WHERE id = ")
        .arg(t.id.to_string())
        .push(" AND revision = ")
        .arg(t.revision);
    if c.exec_as(&q, "template", &t.name).await? == 0 {
        let rev = t.revision;
        return Err(
            missing_or_conflict(c, "templates", "template", &t.id.to_string(), || {
                format!("revision {rev} is stale")
            })
            .await,
        );
    }
    template_get(c, t.id)
        .await?
        .ok_or_else(|| DbError::not_found("template", t.id))
}

async fn template_set_status(
    c: &mut Conn<'_>,
    id: TemplateId,
    expected: &[TemplateStatus],
    to: TemplateStatus,
) -> Result<(), DbError> {
    refuse_blank(id)?;
    let mut q = Sql::new("UPDATE templates SET status = ");
    q.arg(to.as_str()).push(" WHERE id = ").arg(id.to_string());
    if !expected.is_empty() {
        q.push(" AND status IN (");
        for (i, s) in expected.iter().enumerate() {
            if i > 0 {
                q.push(", ");
            }
            q.arg(s.as_str());
        }
        q.push(")");
    }
    if c.exec(&q).await? == 0 {
        return Err(
            missing_or_conflict(c, "templates", "template", &id.to_string(), || {
                format!("status is not one of {expected:?}")
            })
            .await,
        );
    }
    Ok(())
}

/// `InUse` while VMs are based on it; the Blank template is never removed.
async fn template_delete(c: &mut Conn<'_>, id: TemplateId) -> Result<(), DbError> {
    refuse_blank(id)?;
    let mut q = Sql::new("DELETE FROM templates WHERE id = ");
    q.arg(id.to_string());
    if c.delete_as(&q, "template", id).await? == 0 {
        return Err(DbError::not_found("template", id));
    }
    Ok(())
}

async fn template_disk_add(c: &mut Conn<'_>, t: TemplateId, disk: DiskId) -> Result<(), DbError> {
    refuse_blank(t)?;
    let mut q = Sql::new("INSERT INTO template_disks (template_id, disk_id) VALUES (");
    q.arg(t.to_string()).push(", ").arg(disk.to_string()).push(")");
    c.exec_as(&q, "template disk", disk).await?;
    Ok(())
}

async fn template_disk_remove(c: &mut Conn<'_>, t: TemplateId, disk: DiskId) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM template_disks WHERE template_id = ");
    q.arg(t.to_string()).push(" AND disk_id = ").arg(disk.to_string());
    Ok(c.exec(&q).await? == 1)
}

async fn template_disks(c: &mut Conn<'_>, t: TemplateId) -> Result<Vec<Disk>, DbError> {
    let mut q = Sql::new(
        "SELECT d.id, d.name, d.description, d.format, d.sparse, d.provisioned_size, d.actual_size, \
         d.storage_domain_id, d.status, d.locked_by, d.shareable, d.wipe_after_delete, d.content_type, \
         d.disk_profile_id, d.created_at, d.revision FROM disks d JOIN template_disks t ON t.disk_id = d.id WHERE t.template_id = ",
    );
    q.arg(t.to_string()).push(" ORDER BY d.name, d.id");
    c.all(&q).await?.iter().map(disk_from_row).collect()
}

// ---------------------------------------------------------------- VMs

const VM_COLS: &str = "v.id, v.name, v.description, v.cluster_id, v.template_id, v.memory_bytes, \
    v.memory_guaranteed_bytes, v.cpu_sockets, v.cpu_cores, v.cpu_threads, v.status, \
    v.status_detail, v.run_on_host, v.migrating_to_host, v.ha_enabled, v.ha_priority, \
    v.lease_storage_domain_id, v.resume_behavior, v.placement_affinity, v.placement_hosts, v.os_kernel, v.os_initrd, \
    v.os_cmdline, v.os_type, v.os_boot_devices, v.cdrom_disk_id, v.run_cdrom_disk_id, v.created_at, \
    v.revision";

fn vm_from_row(r: &AnyRow) -> Result<Vm, DbError> {
    let hosts = r.str_ref("placement_hosts")?;
    let hosts: Vec<HostUuid> = if hosts == "[]" {
        Vec::new()
    } else {
        serde_json::from_str(hosts).map_err(|e| DbError::Corrupt {
            column: "placement_hosts".into(),
            detail: e.to_string(),
        })?
    };
    Ok(Vm {
        id: r.parse("id")?,
        name: r.text("name")?,
        description: r.text("description")?,
        cluster_id: r.parse("cluster_id")?,
        template_id: r.parse("template_id")?,
        memory_bytes: r.uint("memory_bytes")?,
        memory_guaranteed_bytes: r.uint("memory_guaranteed_bytes")?,
        cpu: CpuTopology {
            sockets: r.u32("cpu_sockets")?,
            cores: r.u32("cpu_cores")?,
            threads: r.u32("cpu_threads")?,
        },
        ha: HighAvailability {
            enabled: r.flag("ha_enabled")?,
            priority: r.int("ha_priority")? as i32,
        },
        lease_storage_domain_id: r.opt_parse("lease_storage_domain_id")?,
        resume_behavior: r.parse("resume_behavior")?,
        placement: Placement {
            affinity: r.parse("placement_affinity")?,
            hosts,
        },
        os: VmOs {
            os_type: r.text("os_type")?,
            boot_devices: r
                .str_ref("os_boot_devices")?
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| {
                    d.parse()
                        .map_err(|e: crate::model::UnknownValue| DbError::Corrupt {
                            column: "os_boot_devices".into(),
                            detail: e.to_string(),
                        })
                })
                .collect::<Result<_, _>>()?,
            kernel: r.opt_text("os_kernel")?,
            initrd: r.opt_text("os_initrd")?,
            cmdline: r.opt_text("os_cmdline")?,
        },
        cdrom: r.opt_parse("cdrom_disk_id")?,
        run_cdrom: r.opt_parse("run_cdrom_disk_id")?,
        runtime: VmRuntime {
            status: r.parse("status")?,
            status_detail: r.opt_text("status_detail")?,
            run_on_host: r.opt_parse("run_on_host")?,
            migrating_to_host: r.opt_parse("migrating_to_host")?,
        },
        created_at: r.ts("created_at")?,
        revision: r.int("revision")?,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmFilter {
    pub name: Option<TextMatch>,
    pub status: Vec<VmStatus>,
    pub cluster: Option<Ref<ClusterId>>,
    pub data_center: Option<Ref<DcId>>,
    /// Running on this host.
    pub host: Option<Ref<HostUuid>>,
    pub template: Option<Ref<TemplateId>>,
    /// With a disk on this storage domain (`storage.name=`).
    pub storage_domain: Option<Ref<SdUuid>>,
    pub ha: Option<bool>,
    /// With this tag on it (`tag=`).
    pub tag: Option<Ref<TagId>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmSort {
    Name,
    Status,
    Memory,
    CreatedAt,
}

fn check_vm(vm: &Vm) -> Result<(), DbError> {
    validate_name("VM name", &vm.name)?;
    check_cpu_mem("VM size", &vm.cpu, vm.memory_bytes)?;
    if vm.memory_guaranteed_bytes > vm.memory_bytes {
        return Err(DbError::Invalid {
            what: "VM memory",
            detail: format!(
                "VM {}: guaranteed memory {} exceeds memory {}",
                vm.name, vm.memory_guaranteed_bytes, vm.memory_bytes
            ),
        });
    }
    Ok(())
}

fn vm_config_args(q: &mut Sql, vm: &Vm) -> Result<(), DbError> {
    let hosts = serde_json::to_string(&vm.placement.hosts).expect("ids serialize");
    q.arg(vm.name.as_str())
        .push(", ")
        .arg(vm.description.as_str())
        .push(", ")
        .arg(vm.cluster_id.to_string())
        .push(", ")
        .arg(vm.template_id.to_string())
        .push(", ")
        .arg(u2i("memory", vm.memory_bytes)?)
        .push(", ")
        .arg(u2i("guaranteed memory", vm.memory_guaranteed_bytes)?)
        .push(", ")
        .arg(i64::from(vm.cpu.sockets))
        .push(", ")
        .arg(i64::from(vm.cpu.cores))
        .push(", ")
        .arg(i64::from(vm.cpu.threads))
        .push(", ")
        .arg(b2i(vm.ha.enabled))
        .push(", ")
        .arg(i64::from(vm.ha.priority))
        .push(", ")
        .arg(Arg::Text(vm.lease_storage_domain_id.map(|s| s.to_string())))
        .push(", ")
        .arg(vm.effective_resume_behavior().as_str())
        .push(", ")
        .arg(vm.placement.affinity.as_str())
        .push(", ")
        .arg(hosts)
        .push(", ")
        .arg(Arg::Text(vm.os.kernel.clone()))
        .push(", ")
        .arg(Arg::Text(vm.os.initrd.clone()))
        .push(", ")
        .arg(Arg::Text(vm.os.cmdline.clone()))
        .push(", ")
        .arg(vm.os.os_type.as_str())
        .push(", ")
        .arg(
            vm.os
                .boot_devices
                .iter()
                .map(|d| d.as_str())
                .collect::<Vec<_>>()
                .join(","),
        )
        .push(", ")
        .arg(Arg::Text(vm.cdrom.map(|d| d.to_string())));
    Ok(())
}

const VM_CONFIG_COLS: &str = "name, description, cluster_id, template_id, memory_bytes, \
    memory_guaranteed_bytes, cpu_sockets, cpu_cores, cpu_threads, ha_enabled, ha_priority, \
    lease_storage_domain_id, resume_behavior, placement_affinity, placement_hosts, os_kernel, os_initrd, os_cmdline, \
    os_type, os_boot_devices, cdrom_disk_id";

/// Inserts the VM and its "Active VM" snapshot.
async fn vm_insert(c: &mut Conn<'_>, vm: &Vm) -> Result<Vm, DbError> {
    check_vm(vm)?;
    let mut q = Sql::new(&format!(
        "INSERT INTO vms (id, {VM_CONFIG_COLS}, status, status_detail, run_on_host, migrating_to_host, created_at, revision) VALUES ("
    ));
    q.arg(vm.id.to_string()).push(", ");
    vm_config_args(&mut q, vm)?;
    let rt = &vm.runtime;
    q.push(", ")
        .arg(rt.status.as_str())
        .push(", ")
        .arg(Arg::Text(rt.status_detail.clone()))
        .push(", ")
        .arg(Arg::Text(rt.run_on_host.map(|h| h.to_string())))
        .push(", ")
        .arg(Arg::Text(rt.migrating_to_host.map(|h| h.to_string())))
        .push(", ")
        .arg(c.now.as_millis())
        .push(", 1)");
    c.exec_as(&q, "VM", &vm.name).await?;
    let active = Snapshot {
        id: SnapshotId::new_random(),
        vm_id: vm.id,
        description: "Active VM".into(),
        snapshot_type: SnapshotType::Active,
        status: SnapshotStatus::Ok,
        persist_memory: false,
        configuration: None,
        disks: Vec::new(),
        created_at: c.now,
    };
    snapshot_insert(c, &active).await?;
    vm_get(c, vm.id)
        .await?
        .ok_or_else(|| DbError::not_found("VM", vm.id))
}

async fn vm_get(c: &mut Conn<'_>, id: VmId) -> Result<Option<Vm>, DbError> {
    let mut q = Sql::new(&format!("SELECT {VM_COLS} FROM vms v WHERE v.id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(vm_from_row).transpose()
}

async fn vm_get_by_name(c: &mut Conn<'_>, name: &str) -> Result<Option<Vm>, DbError> {
    let mut q = Sql::new(&format!("SELECT {VM_COLS} FROM vms v WHERE v.name = "));
    q.arg(name);
    c.opt(&q).await?.as_ref().map(vm_from_row).transpose()
}

fn vm_where(w: &mut Where<'_>, f: &VmFilter) {
    w.text("v.name", &f.name);
    w.any_of("v.status", &f.status);
    w.reference("v.cluster_id", "clusters", &f.cluster);
    w.reference_in(
        "v.cluster_id IN (SELECT id FROM clusters WHERE data_center_id IN {ids})",
        "data_centers",
        &f.data_center,
    );
    w.reference("v.run_on_host", "hosts", &f.host);
    w.reference("v.template_id", "templates", &f.template);
    w.reference_in(
        "EXISTS (SELECT 1 FROM disk_attachments da JOIN disks dk ON dk.id = da.disk_id \
         WHERE da.vm_id = v.id AND dk.storage_domain_id IN {ids})",
        "storage_domains",
        &f.storage_domain,
    );
    w.eq_int("v.ha_enabled", f.ha.map(b2i));
    w.reference_in(
        "EXISTS (SELECT 1 FROM tag_vms tv WHERE tv.vm_id = v.id AND tv.tag_id IN {ids})",
        "tags",
        &f.tag,
    );
}

async fn vm_list(c: &mut Conn<'_>, lq: &ListQuery<VmFilter, VmSort>) -> Result<Vec<Vm>, DbError> {
    let mut q = Sql::new(&format!("SELECT {VM_COLS} FROM vms v"));
    Where::new(&mut q, c.backend).each(lq, vm_where);
    order_and_page(
        &mut q,
        lq,
        |k| match k {
            VmSort::Name => "v.name",
            VmSort::Status => "v.status",
            VmSort::Memory => "v.memory_bytes",
            VmSort::CreatedAt => "v.created_at",
        },
        "v.id",
    );
    c.all(&q).await?.iter().map(vm_from_row).collect()
}

async fn vm_count(c: &mut Conn<'_>, f: &VmFilter) -> Result<u64, DbError> {
    let mut q = Sql::new("SELECT COUNT(*) AS n FROM vms v");
    vm_where(&mut Where::new(&mut q, c.backend), f);
    c.count(&q).await
}

/// Writes the configuration if `vm.revision` is current; run-time state is untouched.
async fn vm_update(c: &mut Conn<'_>, vm: &Vm) -> Result<Vm, DbError> {
    check_vm(vm)?;
    let mut q = Sql::new(&format!("UPDATE vms SET ({VM_CONFIG_COLS}) = ("));
    vm_config_args(&mut q, vm)?;
    q.push("), revision = revision + 1 WHERE id = ")
        .arg(vm.id.to_string())
        .push(" AND revision = ")
        .arg(vm.revision);
    if c.exec_as(&q, "VM", &vm.name).await? == 0 {
        let rev = vm.revision;
        return Err(missing_or_conflict(c, "vms", "VM", &vm.id.to_string(), || {
            format!("revision {rev} is stale")
        })
        .await);
    }
    vm_get(c, vm.id)
        .await?
        .ok_or_else(|| DbError::not_found("VM", vm.id))
}

/// Replaces the VM's run-time state if its status is one of `expected` (any when empty).
/// Returns the VM as it was before.
async fn vm_set_runtime(
    c: &mut Conn<'_>,
    id: VmId,
    expected: &[VmStatus],
    rt: &VmRuntime,
) -> Result<Vm, DbError> {
    let before = vm_get(c, id).await?.ok_or_else(|| DbError::not_found("VM", id))?;
    let ok = expected.is_empty() || expected.contains(&before.runtime.status);
    let mut q = Sql::new("UPDATE vms SET status = ");
    q.arg(rt.status.as_str())
        .push(", status_detail = ")
        .arg(Arg::Text(rt.status_detail.clone()))
        .push(", run_on_host = ")
        .arg(Arg::Text(rt.run_on_host.map(|h| h.to_string())))
        .push(", migrating_to_host = ")
        .arg(Arg::Text(rt.migrating_to_host.map(|h| h.to_string())))
        .push(" WHERE id = ")
        .arg(id.to_string())
        .push(" AND status = ")
        .arg(before.runtime.status.as_str());
    if !ok || c.exec_as(&q, "VM", id).await? == 0 {
        let now = vm_get(c, id).await?.map(|v| v.runtime.status);
        return Err(DbError::Conflict {
            kind: "VM",
            id: id.to_string(),
            detail: format!(
                "status is {}, expected one of {expected:?}",
                now.map_or("gone", |s| s.as_str())
            ),
        });
    }
    Ok(before)
}

/// Records the ISO disk in the running VM's CD-ROM.
async fn vm_set_run_cdrom(c: &mut Conn<'_>, id: VmId, disk: Option<DiskId>) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE vms SET run_cdrom_disk_id = ");
    q.arg(Arg::Text(disk.map(|d| d.to_string())))
        .push(" WHERE id = ")
        .arg(id.to_string());
    if c.exec_as(&q, "VM", id).await? == 0 {
        return Err(DbError::not_found("VM", id));
    }
    Ok(())
}

/// The VMs whose CD-ROM holds `disk`: configured, or in the drive of a VM not down.
async fn vms_with_cdrom(c: &mut Conn<'_>, disk: DiskId) -> Result<Vec<Vm>, DbError> {
    let mut q = Sql::new(&format!("SELECT {VM_COLS} FROM vms v WHERE v.cdrom_disk_id = "));
    q.arg(disk.to_string())
        .push(" OR (v.status <> 'down' AND v.run_cdrom_disk_id = ")
        .arg(disk.to_string())
        .push(") ORDER BY v.name");
    c.all(&q).await?.iter().map(vm_from_row).collect()
}

/// Deletes the VM with its attachments, NICs and snapshots (not its disks). `InUse` unless
/// it is down.
async fn vm_delete(c: &mut Conn<'_>, id: VmId) -> Result<(), DbError> {
    let mut q = Sql::new("DELETE FROM vms WHERE id = ");
    q.arg(id.to_string())
        .push(" AND status IN ('down', 'image_locked')");
    if c.delete_as(&q, "VM", id).await? == 0 {
        return Err(match vm_get(c, id).await? {
            None => DbError::not_found("VM", id),
            Some(v) => DbError::InUse {
                kind: "VM",
                id: id.to_string(),
                detail: format!("it is {}", v.runtime.status),
            },
        });
    }
    Ok(())
}

// ---------------------------------------------------------------- disk attachments

const ATT_COLS: &str = "vm_id, disk_id, interface, bootable, active, read_only";

fn att_from_row(r: &AnyRow) -> Result<DiskAttachment, DbError> {
    Ok(DiskAttachment {
        vm_id: r.parse("vm_id")?,
        disk_id: r.parse("disk_id")?,
        interface: r.parse("interface")?,
        bootable: r.flag("bootable")?,
        active: r.flag("active")?,
        read_only: r.flag("read_only")?,
    })
}

/// Attaches a disk; a disk that is not shareable attaches to one VM only.
async fn attachment_add(c: &mut Conn<'_>, a: &DiskAttachment) -> Result<(), DbError> {
    let mut q = Sql::new("SELECT d.shareable AS shareable, (SELECT COUNT(*) FROM disk_attachments x WHERE x.disk_id = d.id AND x.vm_id <> ");
    q.arg(a.vm_id.to_string())
        .push(") AS n FROM disks d WHERE d.id = ")
        .arg(a.disk_id.to_string());
    let row = c
        .opt(&q)
        .await?
        .ok_or_else(|| DbError::not_found("disk", a.disk_id))?;
    if !row.flag("shareable")? && row.uint("n")? > 0 {
        return Err(DbError::InUse {
            kind: "disk",
            id: a.disk_id.to_string(),
            detail: "it is attached to another VM and not shareable".into(),
        });
    }
    let mut q = Sql::new(&format!("INSERT INTO disk_attachments ({ATT_COLS}) VALUES ("));
    q.arg(a.vm_id.to_string())
        .push(", ")
        .arg(a.disk_id.to_string())
        .push(", ")
        .arg(a.interface.as_str())
        .push(", ")
        .arg(b2i(a.bootable))
        .push(", ")
        .arg(b2i(a.active))
        .push(", ")
        .arg(b2i(a.read_only))
        .push(")");
    c.exec_as(&q, "disk attachment", format!("{} on VM {}", a.disk_id, a.vm_id))
        .await?;
    Ok(())
}

async fn attachment_get(c: &mut Conn<'_>, vm: VmId, disk: DiskId) -> Result<Option<DiskAttachment>, DbError> {
    let mut q = Sql::new(&format!("SELECT {ATT_COLS} FROM disk_attachments WHERE vm_id = "));
    q.arg(vm.to_string())
        .push(" AND disk_id = ")
        .arg(disk.to_string());
    c.opt(&q).await?.as_ref().map(att_from_row).transpose()
}

async fn attachments_of_vm(c: &mut Conn<'_>, vm: VmId) -> Result<Vec<DiskAttachment>, DbError> {
    let mut q = Sql::new(&format!("SELECT {ATT_COLS} FROM disk_attachments WHERE vm_id = "));
    q.arg(vm.to_string()).push(" ORDER BY bootable DESC, disk_id");
    c.all(&q).await?.iter().map(att_from_row).collect()
}

async fn attachments_of_disk(c: &mut Conn<'_>, disk: DiskId) -> Result<Vec<DiskAttachment>, DbError> {
    let mut q = Sql::new(&format!(
        "SELECT {ATT_COLS} FROM disk_attachments WHERE disk_id = "
    ));
    q.arg(disk.to_string()).push(" ORDER BY vm_id");
    c.all(&q).await?.iter().map(att_from_row).collect()
}

/// The attachments of the VMs placed on `host`.
async fn attachments_on_host(c: &mut Conn<'_>, host: HostUuid) -> Result<Vec<DiskAttachment>, DbError> {
    let mut q = Sql::new(&format!(
        "SELECT {ATT_COLS} FROM disk_attachments WHERE vm_id IN (SELECT id FROM vms WHERE run_on_host = "
    ));
    q.arg(host.to_string()).push(") ORDER BY vm_id, disk_id");
    c.all(&q).await?.iter().map(att_from_row).collect()
}

/// Sets an attachment's `active` to `to` if it is still `from`; whether it changed.
async fn attachment_set_active(
    c: &mut Conn<'_>,
    vm: VmId,
    disk: DiskId,
    from: bool,
    to: bool,
) -> Result<bool, DbError> {
    let mut q = Sql::new("UPDATE disk_attachments SET active = ");
    q.arg(b2i(to))
        .push(" WHERE vm_id = ")
        .arg(vm.to_string())
        .push(" AND disk_id = ")
        .arg(disk.to_string())
        .push(" AND active = ")
        .arg(b2i(from));
    Ok(c.exec(&q).await? > 0)
}

async fn attachment_update(c: &mut Conn<'_>, a: &DiskAttachment) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE disk_attachments SET interface = ");
    q.arg(a.interface.as_str())
        .push(", bootable = ")
        .arg(b2i(a.bootable))
        .push(", active = ")
        .arg(b2i(a.active))
        .push(", read_only = ")
        .arg(b2i(a.read_only))
        .push(" WHERE vm_id = ")
        .arg(a.vm_id.to_string())
        .push(" AND disk_id = ")
        .arg(a.disk_id.to_string());
    if c.exec(&q).await? == 0 {
        return Err(DbError::NotFound {
            kind: "disk attachment",
            id: format!("{} on VM {}", a.disk_id, a.vm_id),
        });
    }
    Ok(())
}

async fn attachment_remove(c: &mut Conn<'_>, vm: VmId, disk: DiskId) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM disk_attachments WHERE vm_id = ");
    q.arg(vm.to_string())
        .push(" AND disk_id = ")
        .arg(disk.to_string());
    Ok(c.exec(&q).await? == 1)
}

// ---------------------------------------------------------------- NICs

const NIC_COLS: &str = "id, vm_id, name, network, mac, interface, plugged, linked";

fn nic_from_row(r: &AnyRow) -> Result<Nic, DbError> {
    Ok(Nic {
        id: r.parse("id")?,
        vm_id: r.parse("vm_id")?,
        name: r.text("name")?,
        network: r.opt_text("network")?,
        mac: r.parse("mac")?,
        interface: r.parse("interface")?,
        plugged: r.flag("plugged")?,
        linked: r.flag("linked")?,
    })
}

async fn nic_insert_row(c: &mut Conn<'_>, n: &Nic) -> Result<(), DbError> {
    let mut q = Sql::new(&format!("INSERT INTO nics ({NIC_COLS}) VALUES ("));
    q.arg(n.id.to_string())
        .push(", ")
        .arg(n.vm_id.to_string())
        .push(", ")
        .arg(n.name.as_str())
        .push(", ")
        .arg(Arg::Text(n.network.clone()))
        .push(", ")
        .arg(n.mac.to_string())
        .push(", ")
        .arg(n.interface.as_str())
        .push(", ")
        .arg(b2i(n.plugged))
        .push(", ")
        .arg(b2i(n.linked))
        .push(")");
    c.exec_as(&q, "NIC", format!("{} (MAC {}) on VM {}", n.name, n.mac, n.vm_id))
        .await?;
    Ok(())
}

/// Adds a NIC. With `mac: None` the next free address of the pool (`56:6f:…`) is chosen.
async fn nic_add(c: &mut Conn<'_>, n: &Nic, mac: Option<MacAddr>) -> Result<Nic, DbError> {
    if n.name.is_empty() {
        return Err(DbError::Invalid {
            what: "NIC name",
            detail: "must not be empty".into(),
        });
    }
    let mut nic = n.clone();
    match mac {
        Some(m) => {
            nic.mac = m;
            nic_insert_row(c, &nic).await?;
        }
        None => {
            // Random picks in a 2^32 space collide rarely; a few tries rule out a full pool.
            let mut tries = 0;
            loop {
                let r: u32 = rand::thread_rng().gen();
                let b = r.to_be_bytes();
                nic.mac = MacAddr([
                    MacAddr::POOL_PREFIX[0],
                    MacAddr::POOL_PREFIX[1],
                    b[0],
                    b[1],
                    b[2],
                    b[3],
                ]);
                let mut q = Sql::new("SELECT COUNT(*) AS n FROM nics WHERE mac = ");
                q.arg(nic.mac.to_string());
                if c.count(&q).await? == 0 {
                    nic_insert_row(c, &nic).await?;
                    break;
                }
                tries += 1;
                if tries > 16 {
                    return Err(DbError::Exhausted {
                        what: "MAC address in the pool",
                    });
                }
            }
        }
    }
    nic_get(c, nic.id)
        .await?
        .ok_or_else(|| DbError::not_found("NIC", nic.id))
}

async fn nic_mac_in_use(c: &mut Conn<'_>, mac: MacAddr) -> Result<bool, DbError> {
    let mut q = Sql::new("SELECT COUNT(*) AS n FROM nics WHERE mac = ");
    q.arg(mac.to_string());
    Ok(c.count(&q).await? > 0)
}

async fn nic_get(c: &mut Conn<'_>, id: NicId) -> Result<Option<Nic>, DbError> {
    let mut q = Sql::new(&format!("SELECT {NIC_COLS} FROM nics WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(nic_from_row).transpose()
}

const TEMPLATE_NIC_COLS: &str = "id, template_id, name, network, interface, linked";

async fn template_nic_insert(c: &mut Conn<'_>, n: &TemplateNic) -> Result<(), DbError> {
    let mut q = Sql::new(&format!(
        "INSERT INTO template_nics ({TEMPLATE_NIC_COLS}) VALUES ("
    ));
    q.arg(n.id.to_string())
        .push(", ")
        .arg(n.template_id.to_string())
        .push(", ")
        .arg(n.name.as_str())
        .push(", ")
        .arg(Arg::Text(n.network.clone()))
        .push(", ")
        .arg(n.interface.as_str())
        .push(", ")
        .arg(b2i(n.linked))
        .push(")");
    c.exec_as(&q, "NIC", format!("{} of template {}", n.name, n.template_id))
        .await?;
    Ok(())
}

async fn nics_of_template(c: &mut Conn<'_>, t: TemplateId) -> Result<Vec<TemplateNic>, DbError> {
    let mut q = Sql::new(&format!(
        "SELECT {TEMPLATE_NIC_COLS} FROM template_nics WHERE template_id = "
    ));
    q.arg(t.to_string()).push(" ORDER BY name, id");
    c.all(&q)
        .await?
        .iter()
        .map(|r| {
            Ok(TemplateNic {
                id: r.parse("id")?,
                template_id: r.parse("template_id")?,
                name: r.text("name")?,
                network: r.opt_text("network")?,
                interface: r.parse("interface")?,
                linked: r.flag("linked")?,
            })
        })
        .collect()
}

async fn nics_of_vm(c: &mut Conn<'_>, vm: VmId) -> Result<Vec<Nic>, DbError> {
    let mut q = Sql::new(&format!("SELECT {NIC_COLS} FROM nics WHERE vm_id = "));
    q.arg(vm.to_string()).push(" ORDER BY name, id");
    c.all(&q).await?.iter().map(nic_from_row).collect()
}

async fn nic_update(c: &mut Conn<'_>, n: &Nic) -> Result<Nic, DbError> {
    let mut q = Sql::new("UPDATE nics SET name = ");
    q.arg(n.name.as_str())
        .push(", network = ")
        .arg(Arg::Text(n.network.clone()))
        .push(", mac = ")
        .arg(n.mac.to_string())
        .push(", interface = ")
        .arg(n.interface.as_str())
        .push(", plugged = ")
        .arg(b2i(n.plugged))
        .push(", linked = ")
        .arg(b2i(n.linked))
        .push(" WHERE id = ")
        .arg(n.id.to_string());
    if c.exec_as(&q, "NIC", format!("{} (MAC {})", n.name, n.mac))
        .await?
        == 0
    {
        return Err(DbError::not_found("NIC", n.id));
    }
    nic_get(c, n.id)
        .await?
        .ok_or_else(|| DbError::not_found("NIC", n.id))
}

async fn nic_remove(c: &mut Conn<'_>, id: NicId) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM nics WHERE id = ");
    q.arg(id.to_string());
    Ok(c.exec(&q).await? == 1)
}

// ---------------------------------------------------------------- snapshots

const SNAP_COLS: &str = "id, vm_id, description, snapshot_type, status, persist_memory, \
    vm_configuration, created_at";

fn snapshot_from_row(r: &AnyRow) -> Result<Snapshot, DbError> {
    Ok(Snapshot {
        id: r.parse("id")?,
        vm_id: r.parse("vm_id")?,
        description: r.text("description")?,
        snapshot_type: r.parse("snapshot_type")?,
        status: r.parse("status")?,
        persist_memory: r.flag("persist_memory")?,
        configuration: r
            .opt_text("vm_configuration")?
            .map(|t| {
                serde_json::from_str(&t).map_err(|e| DbError::Corrupt {
                    column: "vm_configuration".into(),
                    detail: e.to_string(),
                })
            })
            .transpose()?,
        disks: Vec::new(),
        created_at: r.ts("created_at")?,
    })
}

async fn snapshot_rows(c: &mut Conn<'_>, q: &Sql) -> Result<Vec<Snapshot>, DbError> {
    let rows = c.all(q).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(snapshot_from_row(r)?);
    }
    for s in &mut out {
        let mut q = Sql::new("SELECT disk_id, volume_id FROM snapshot_disks WHERE snapshot_id = ");
        q.arg(s.id.to_string()).push(" ORDER BY disk_id");
        for r in c.all(&q).await? {
            s.disks.push(SnapshotDisk {
                disk_id: r.parse("disk_id")?,
                volume_id: r.parse("volume_id")?,
            });
        }
    }
    Ok(out)
}

/// The attachments, NICs and snapshots of every VM of a data center, each VM's in the order
/// the per-VM reads give: a few queries for all (the OVF stores' bulk read).
#[derive(Debug, Default)]
pub struct VmParts {
    pub attachments: BTreeMap<VmId, Vec<DiskAttachment>>,
    pub nics: BTreeMap<VmId, Vec<Nic>>,
    pub snapshots: BTreeMap<VmId, Vec<Snapshot>>,
}

async fn vm_parts_in_dc(c: &mut Conn<'_>, dc: DcId) -> Result<VmParts, DbError> {
    let in_dc = |cols: &str, table: &str| {
        let mut q = Sql::new(&format!(
            "SELECT {cols} FROM {table} WHERE vm_id IN (SELECT v.id FROM vms v JOIN clusters cl \
             ON cl.id = v.cluster_id WHERE cl.data_center_id = "
        ));
        q.arg(dc.to_string()).push(")");
        q
    };
    let mut out = VmParts::default();
    let mut q = in_dc(ATT_COLS, "disk_attachments");
    q.push(" ORDER BY bootable DESC, disk_id");
    for r in c.all(&q).await? {
        let a = att_from_row(&r)?;
        out.attachments.entry(a.vm_id).or_default().push(a);
    }
    let mut q = in_dc(NIC_COLS, "nics");
    q.push(" ORDER BY name, id");
    for r in c.all(&q).await? {
        let n = nic_from_row(&r)?;
        out.nics.entry(n.vm_id).or_default().push(n);
    }
    let mut q = in_dc(SNAP_COLS, "snapshots");
    q.push(" ORDER BY CASE snapshot_type WHEN 'active' THEN 1 ELSE 0 END, created_at, id");
    let mut by_id: BTreeMap<SnapshotId, Snapshot> = BTreeMap::new();
    let mut order = Vec::new();
    for r in c.all(&q).await? {
        let s = snapshot_from_row(&r)?;
        order.push(s.id);
        by_id.insert(s.id, s);
    }
    let mut q = Sql::new(
        "SELECT snapshot_id, disk_id, volume_id FROM snapshot_disks WHERE snapshot_id IN \
         (SELECT s.id FROM snapshots s JOIN vms v ON v.id = s.vm_id JOIN clusters cl \
         ON cl.id = v.cluster_id WHERE cl.data_center_id = ",
    );
    q.arg(dc.to_string()).push(") ORDER BY disk_id");
    for r in c.all(&q).await? {
        let id: SnapshotId = r.parse("snapshot_id")?;
        if let Some(s) = by_id.get_mut(&id) {
            s.disks.push(SnapshotDisk {
                disk_id: r.parse("disk_id")?,
                volume_id: r.parse("volume_id")?,
            });
        }
    }
    for id in order {
        if let Some(s) = by_id.remove(&id) {
            out.snapshots.entry(s.vm_id).or_default().push(s);
        }
    }
    Ok(out)
}

async fn snapshot_insert(c: &mut Conn<'_>, s: &Snapshot) -> Result<Snapshot, DbError> {
    let mut q = Sql::new(&format!("INSERT INTO snapshots ({SNAP_COLS}) VALUES ("));
    q.arg(s.id.to_string())
        .push(", ")
        .arg(s.vm_id.to_string())
        .push(", ")
        .arg(s.description.as_str())
        .push(", ")
        .arg(s.snapshot_type.as_str())
        .push(", ")
        .arg(s.status.as_str())
        .push(", ")
        .arg(b2i(s.persist_memory))
        .push(", ")
        .arg(Arg::Text(s.configuration.as_ref().map(|c| {
            serde_json::to_string(c).expect("a configuration serializes")
        })))
        .push(", ")
        .arg(c.now.as_millis())
        .push(")");
    c.exec_as(&q, "snapshot", s.id).await?;
    for d in &s.disks {
        snapshot_set_disk_volume(c, s.id, d.disk_id, d.volume_id).await?;
    }
    snapshot_get(c, s.id)
        .await?
        .ok_or_else(|| DbError::not_found("snapshot", s.id))
}

async fn snapshot_get(c: &mut Conn<'_>, id: SnapshotId) -> Result<Option<Snapshot>, DbError> {
    let mut q = Sql::new(&format!("SELECT {SNAP_COLS} FROM snapshots WHERE id = "));
    q.arg(id.to_string());
    Ok(snapshot_rows(c, &q).await?.pop())
}

/// The VM's snapshots, oldest first (the active one last among equals).
async fn snapshots_of_vm(c: &mut Conn<'_>, vm: VmId) -> Result<Vec<Snapshot>, DbError> {
    let mut q = Sql::new(&format!("SELECT {SNAP_COLS} FROM snapshots WHERE vm_id = "));
    q.arg(vm.to_string())
        .push(" ORDER BY CASE snapshot_type WHEN 'active' THEN 1 ELSE 0 END, created_at, id");
    snapshot_rows(c, &q).await
}

async fn snapshot_active(c: &mut Conn<'_>, vm: VmId) -> Result<Option<Snapshot>, DbError> {
    let mut q = Sql::new(&format!(
        "SELECT {SNAP_COLS} FROM snapshots WHERE snapshot_type = 'active' AND vm_id = "
    ));
    q.arg(vm.to_string());
    Ok(snapshot_rows(c, &q).await?.pop())
}

async fn snapshot_set_status(
    c: &mut Conn<'_>,
    id: SnapshotId,
    expected: &[SnapshotStatus],
    to: SnapshotStatus,
) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE snapshots SET status = ");
    q.arg(to.as_str()).push(" WHERE id = ").arg(id.to_string());
    if !expected.is_empty() {
        q.push(" AND status IN (");
        for (i, s) in expected.iter().enumerate() {
            if i > 0 {
                q.push(", ");
            }
            q.arg(s.as_str());
        }
        q.push(")");
    }
    if c.exec(&q).await? == 0 {
        return Err(
            missing_or_conflict(c, "snapshots", "snapshot", &id.to_string(), || {
                format!("status is not one of {expected:?}")
            })
            .await,
        );
    }
    Ok(())
}

async fn snapshot_set_type(c: &mut Conn<'_>, id: SnapshotId, t: SnapshotType) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE snapshots SET snapshot_type = ");
    q.arg(t.as_str()).push(" WHERE id = ").arg(id.to_string());
    if c.exec_as(&q, "snapshot", id).await? == 0 {
        return Err(DbError::not_found("snapshot", id));
    }
    Ok(())
}

/// Records (or replaces) which volume the disk has in the snapshot.
async fn snapshot_set_disk_volume(
    c: &mut Conn<'_>,
    snap: SnapshotId,
    disk: DiskId,
    vol: VolUuid,
) -> Result<(), DbError> {
    let mut q = Sql::new("DELETE FROM snapshot_disks WHERE snapshot_id = ");
    q.arg(snap.to_string())
        .push(" AND disk_id = ")
        .arg(disk.to_string());
    c.exec(&q).await?;
    let mut q = Sql::new("INSERT INTO snapshot_disks (snapshot_id, disk_id, volume_id) VALUES (");
    q.arg(snap.to_string())
        .push(", ")
        .arg(disk.to_string())
        .push(", ")
        .arg(vol.to_string())
        .push(")");
    c.exec_as(&q, "snapshot disk", format!("{disk} in snapshot {snap}"))
        .await?;
    Ok(())
}

async fn snapshot_remove_disk(c: &mut Conn<'_>, snap: SnapshotId, disk: DiskId) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM snapshot_disks WHERE snapshot_id = ");
    q.arg(snap.to_string())
        .push(" AND disk_id = ")
        .arg(disk.to_string());
    Ok(c.exec(&q).await? == 1)
}

/// Returns whether it existed. The active snapshot is never deleted (only with its VM).
async fn snapshot_delete(c: &mut Conn<'_>, id: SnapshotId) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM snapshots WHERE snapshot_type <> 'active' AND id = ");
    q.arg(id.to_string());
    Ok(c.exec(&q).await? == 1)
}

// ---------------------------------------------------------------- affinity groups

async fn affinity_group_insert(c: &mut Conn<'_>, g: &AffinityGroup) -> Result<AffinityGroup, DbError> {
    validate_name("affinity group name", &g.name)?;
    let mut q = Sql::new(
        "INSERT INTO affinity_groups (id, cluster_id, name, description, vms_rule_enabled, positive, enforcing, created_at) VALUES (",
    );
    q.arg(g.id.to_string())
        .push(", ")
        .arg(g.cluster_id.to_string())
        .push(", ")
        .arg(g.name.as_str())
        .push(", ")
        .arg(g.description.as_str())
        .push(", ")
        .arg(b2i(g.enabled))
        .push(", ")
        .arg(b2i(g.positive))
        .push(", ")
        .arg(b2i(g.enforcing))
        .push(", ")
        .arg(c.now.as_millis())
        .push(")");
    c.exec_as(&q, "affinity group", &g.name).await?;
    for vm in &g.vm_ids {
        affinity_group_add_vm(c, g.id, *vm).await?;
    }
    affinity_group_get(c, g.id)
        .await?
        .ok_or_else(|| DbError::not_found("affinity group", g.id))
}

/// Writes a group's name, description and rule (not its members, not its cluster).
async fn affinity_group_update(c: &mut Conn<'_>, g: &AffinityGroup) -> Result<AffinityGroup, DbError> {
    validate_name("affinity group name", &g.name)?;
    let mut q = Sql::new("UPDATE affinity_groups SET name = ");
    q.arg(g.name.as_str())
        .push(", description = ")
        .arg(g.description.as_str())
        .push(", vms_rule_enabled = ")
        .arg(b2i(g.enabled))
        .push(", positive = ")
        .arg(b2i(g.positive))
        .push(", enforcing = ")
        .arg(b2i(g.enforcing))
        .push(" WHERE id = ")
        .arg(g.id.to_string());
    if c.exec_as(&q, "affinity group", &g.name).await? == 0 {
        return Err(DbError::not_found("affinity group", g.id));
    }
    affinity_group_get(c, g.id)
        .await?
        .ok_or_else(|| DbError::not_found("affinity group", g.id))
}

async fn affinity_groups_where(
    c: &mut Conn<'_>,
    cond: &str,
    id: String,
) -> Result<Vec<AffinityGroup>, DbError> {
    let mut q =
        Sql::new("SELECT id, cluster_id, name, description, vms_rule_enabled, positive, enforcing, created_at FROM affinity_groups WHERE ");
    q.push(cond).push(" = ").arg(id).push(" ORDER BY name, id");
    let rows = c.all(&q).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(AffinityGroup {
            id: r.parse("id")?,
            cluster_id: r.parse("cluster_id")?,
            name: r.text("name")?,
            description: r.text("description")?,
            enabled: r.flag("vms_rule_enabled")?,
            positive: r.flag("positive")?,
            enforcing: r.flag("enforcing")?,
            vm_ids: Vec::new(),
            created_at: r.ts("created_at")?,
        });
    }
    for g in &mut out {
        let mut q = Sql::new("SELECT vm_id FROM affinity_group_vms WHERE group_id = ");
        q.arg(g.id.to_string()).push(" ORDER BY vm_id");
        for r in c.all(&q).await? {
            g.vm_ids.push(r.parse("vm_id")?);
        }
    }
    Ok(out)
}

async fn affinity_group_get(c: &mut Conn<'_>, id: AffinityGroupId) -> Result<Option<AffinityGroup>, DbError> {
    Ok(affinity_groups_where(c, "id", id.to_string()).await?.pop())
}

async fn affinity_groups_of_cluster(c: &mut Conn<'_>, cl: ClusterId) -> Result<Vec<AffinityGroup>, DbError> {
    affinity_groups_where(c, "cluster_id", cl.to_string()).await
}

async fn affinity_group_add_vm(c: &mut Conn<'_>, g: AffinityGroupId, vm: VmId) -> Result<(), DbError> {
    let mut q = Sql::new("INSERT INTO affinity_group_vms (group_id, vm_id) VALUES (");
    q.arg(g.to_string()).push(", ").arg(vm.to_string()).push(")");
    c.exec_as(&q, "affinity group member", format!("VM {vm} in group {g}"))
        .await?;
    Ok(())
}

async fn affinity_group_remove_vm(c: &mut Conn<'_>, g: AffinityGroupId, vm: VmId) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM affinity_group_vms WHERE group_id = ");
    q.arg(g.to_string()).push(" AND vm_id = ").arg(vm.to_string());
    Ok(c.exec(&q).await? == 1)
}

/// Whether image `img` holds a VM state the engine knows (a suspended VM's or a snapshot's).
async fn state_volume_image_known(c: &mut Conn<'_>, img: DiskId) -> Result<bool, DbError> {
    let mut q = Sql::new("SELECT vm_id AS x FROM vm_hibernation WHERE image_id = ");
    q.arg(img.to_string())
        .push(" UNION ALL SELECT snapshot_id AS x FROM snapshot_memory WHERE image_id = ")
        .arg(img.to_string());
    Ok(c.opt(&q).await?.is_some())
}

async fn vm_hibernation_get(c: &mut Conn<'_>, vm: VmId) -> Result<Option<StateVolume>, DbError> {
    let mut q = Sql::new("SELECT storage_domain_id, image_id, volume_id FROM vm_hibernation WHERE vm_id = ");
    q.arg(vm.to_string());
    c.opt(&q)
        .await?
        .map(|r| {
            Ok(StateVolume {
                sd: r.parse("storage_domain_id")?,
                img: r.parse("image_id")?,
                vol: r.parse("volume_id")?,
            })
        })
        .transpose()
}

async fn vm_hibernation_set(c: &mut Conn<'_>, vm: VmId, v: &StateVolume) -> Result<(), DbError> {
    let mut q = Sql::new("DELETE FROM vm_hibernation WHERE vm_id = ");
    q.arg(vm.to_string());
    c.exec(&q).await?;
    let mut q =
        Sql::new("INSERT INTO vm_hibernation (vm_id, storage_domain_id, image_id, volume_id) VALUES (");
    q.arg(vm.to_string())
        .push(", ")
        .arg(v.sd.to_string())
        .push(", ")
        .arg(v.img.to_string())
        .push(", ")
        .arg(v.vol.to_string())
        .push(")");
    c.exec(&q).await?;
    Ok(())
}

async fn vm_hibernation_clear(c: &mut Conn<'_>, vm: VmId) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM vm_hibernation WHERE vm_id = ");
    q.arg(vm.to_string());
    Ok(c.exec(&q).await? > 0)
}

async fn snapshot_memory_get(c: &mut Conn<'_>, snap: SnapshotId) -> Result<Option<SnapshotMemory>, DbError> {
    let mut q = Sql::new(
        "SELECT storage_domain_id, image_id, volume_id, memory_bytes, cpus FROM snapshot_memory WHERE snapshot_id = ",
    );
    q.arg(snap.to_string());
    c.opt(&q)
        .await?
        .map(|r| {
            Ok(SnapshotMemory {
                state: StateVolume {
                    sd: r.parse("storage_domain_id")?,
                    img: r.parse("image_id")?,
                    vol: r.parse("volume_id")?,
                },
                memory_bytes: r.uint("memory_bytes")?,
                cpus: r.u32("cpus")?,
            })
        })
        .transpose()
}

async fn snapshot_memory_set(c: &mut Conn<'_>, snap: SnapshotId, m: &SnapshotMemory) -> Result<(), DbError> {
    let mut q = Sql::new("DELETE FROM snapshot_memory WHERE snapshot_id = ");
    q.arg(snap.to_string());
    c.exec(&q).await?;
    let mut q = Sql::new(
        "INSERT INTO snapshot_memory (snapshot_id, storage_domain_id, image_id, volume_id, memory_bytes, cpus) VALUES (",
    );
    q.arg(snap.to_string())
        .push(", ")
        .arg(m.state.sd.to_string())
        .push(", ")
        .arg(m.state.img.to_string())
        .push(", ")
        .arg(m.state.vol.to_string())
        .push(", ")
        .arg(u2i("memory size", m.memory_bytes)?)
        .push(", ")
        .arg(i64::from(m.cpus))
        .push(")");
    c.exec(&q).await?;
    let mut q = Sql::new("UPDATE snapshots SET persist_memory = 1 WHERE id = ");
    q.arg(snap.to_string());
    if c.exec(&q).await? != 1 {
        return Err(DbError::not_found("snapshot", snap));
    }
    Ok(())
}

async fn snapshot_memory_in_use(c: &mut Conn<'_>, img: ImgUuid) -> Result<bool, DbError> {
    let mut q = Sql::new("SELECT snapshot_id FROM snapshot_memory WHERE image_id = ");
    q.arg(img.to_string());
    Ok(c.opt(&q).await?.is_some())
}

async fn affinity_group_delete(c: &mut Conn<'_>, g: AffinityGroupId) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM affinity_groups WHERE id = ");
    q.arg(g.to_string());
    Ok(c.exec(&q).await? == 1)
}

repo! {
    write template_insert(t: &Template) -> Template = template_insert;
    read template_get(id: TemplateId) -> Option<Template> = template_get;
    read template_get_by_name(name: &str) -> Option<Template> = template_get_by_name;
    read template_list(q: &ListQuery<TemplateFilter, TemplateSort>) -> Vec<Template> = template_list;
    /// Refuses the Blank template.
    write template_update(t: &Template) -> Template = template_update;
    write template_set_status(id: TemplateId, expected: &[TemplateStatus], to: TemplateStatus) -> () = template_set_status;
    /// `InUse` while VMs are based on it; refuses the Blank template.
    write template_delete(id: TemplateId) -> () = template_delete;
    write template_disk_add(t: TemplateId, disk: DiskId) -> () = template_disk_add;
    write template_disk_remove(t: TemplateId, disk: DiskId) -> bool = template_disk_remove;
    read template_disks(t: TemplateId) -> Vec<Disk> = template_disks;

    /// Inserts the VM and its "Active VM" snapshot.
    write vm_insert(vm: &Vm) -> Vm = vm_insert;
    read vm_get(id: VmId) -> Option<Vm> = vm_get;
    read vm_get_by_name(name: &str) -> Option<Vm> = vm_get_by_name;
    read vm_list(q: &ListQuery<VmFilter, VmSort>) -> Vec<Vm> = vm_list;
    read vm_count(f: &VmFilter) -> u64 = vm_count;
    /// Writes the configuration if `revision` is current (run-time state untouched).
    write vm_update(vm: &Vm) -> Vm = vm_update;
    /// Compare-and-set of the run-time state on the expected statuses; returns the VM before.
    write vm_set_runtime(id: VmId, expected: &[VmStatus], rt: &VmRuntime) -> Vm = vm_set_runtime;
    /// Records the ISO disk in the running VM's CD-ROM.
    write vm_set_run_cdrom(id: VmId, disk: Option<DiskId>) -> () = vm_set_run_cdrom;
    /// The VMs whose CD-ROM holds `disk` (configured, or in the running VM's drive).
    read vms_with_cdrom(disk: DiskId) -> Vec<Vm> = vms_with_cdrom;
    /// Removes a down VM with its attachments, NICs and snapshots (not its disks).
    write vm_delete(id: VmId) -> () = vm_delete;

    write attachment_add(a: &DiskAttachment) -> () = attachment_add;
    read attachment_get(vm: VmId, disk: DiskId) -> Option<DiskAttachment> = attachment_get;
    read attachments_of_vm(vm: VmId) -> Vec<DiskAttachment> = attachments_of_vm;
    read attachments_of_disk(disk: DiskId) -> Vec<DiskAttachment> = attachments_of_disk;
    write attachment_update(a: &DiskAttachment) -> () = attachment_update;
    read attachments_on_host(host: HostUuid) -> Vec<DiskAttachment> = attachments_on_host;
    /// Compare-and-set of an attachment's `active`: whether it was `from` and is now `to`.
    write attachment_set_active(vm: VmId, disk: DiskId, from: bool, to: bool) -> bool = attachment_set_active;
    write attachment_remove(vm: VmId, disk: DiskId) -> bool = attachment_remove;

    /// Adds a NIC with `mac`, or the next free pool address when `None`.
    write nic_add(n: &Nic, mac: Option<MacAddr>) -> Nic = nic_add;
    read nic_get(id: NicId) -> Option<Nic> = nic_get;
    read nic_mac_in_use(mac: MacAddr) -> bool = nic_mac_in_use;
    read nics_of_vm(vm: VmId) -> Vec<Nic> = nics_of_vm;
    write template_nic_insert(n: &TemplateNic) -> () = template_nic_insert;
    read nics_of_template(t: TemplateId) -> Vec<TemplateNic> = nics_of_template;
    write nic_update(n: &Nic) -> Nic = nic_update;
    write nic_remove(id: NicId) -> bool = nic_remove;

    write snapshot_insert(s: &Snapshot) -> Snapshot = snapshot_insert;
    read snapshot_get(id: SnapshotId) -> Option<Snapshot> = snapshot_get;
    read snapshots_of_vm(vm: VmId) -> Vec<Snapshot> = snapshots_of_vm;
    read vm_parts_in_dc(dc: DcId) -> VmParts = vm_parts_in_dc;
    read snapshot_active(vm: VmId) -> Option<Snapshot> = snapshot_active;
    write snapshot_set_status(id: SnapshotId, expected: &[SnapshotStatus], to: SnapshotStatus) -> () = snapshot_set_status;
    write snapshot_set_type(id: SnapshotId, t: SnapshotType) -> () = snapshot_set_type;
    write snapshot_set_disk_volume(snap: SnapshotId, disk: DiskId, vol: VolUuid) -> () = snapshot_set_disk_volume;
    write snapshot_remove_disk(snap: SnapshotId, disk: DiskId) -> bool = snapshot_remove_disk;
    write snapshot_delete(id: SnapshotId) -> bool = snapshot_delete;

    write affinity_group_insert(g: &AffinityGroup) -> AffinityGroup = affinity_group_insert;
    /// Name, description and rule; `AlreadyExists` for a name taken in the cluster.
    write affinity_group_update(g: &AffinityGroup) -> AffinityGroup = affinity_group_update;
    read affinity_group_get(id: AffinityGroupId) -> Option<AffinityGroup> = affinity_group_get;
    read affinity_groups_of_cluster(cl: ClusterId) -> Vec<AffinityGroup> = affinity_groups_of_cluster;
    write affinity_group_add_vm(g: AffinityGroupId, vm: VmId) -> () = affinity_group_add_vm;
    write affinity_group_remove_vm(g: AffinityGroupId, vm: VmId) -> bool = affinity_group_remove_vm;
    write affinity_group_delete(g: AffinityGroupId) -> bool = affinity_group_delete;

    /// Where a suspended VM's state is saved.
    read vm_hibernation_get(vm: VmId) -> Option<StateVolume> = vm_hibernation_get;
    /// Whether an image holds a VM state the engine knows.
    read state_volume_image_known(img: DiskId) -> bool = state_volume_image_known;
    write vm_hibernation_set(vm: VmId, v: &StateVolume) -> () = vm_hibernation_set;
    write vm_hibernation_clear(vm: VmId) -> bool = vm_hibernation_clear;

    /// The state a snapshot saved of its running VM.
    read snapshot_memory_get(snap: SnapshotId) -> Option<SnapshotMemory> = snapshot_memory_get;
    /// Records the snapshot's saved state; the snapshot then shows `persist_memory`.
    write snapshot_memory_set(snap: SnapshotId, m: &SnapshotMemory) -> () = snapshot_memory_set;
    /// Whether the image holds a snapshot's saved state (then it is not a spent hibernation's).
    read snapshot_memory_in_use(img: ImgUuid) -> bool = snapshot_memory_in_use;
}
