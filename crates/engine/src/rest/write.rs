//! Entity representations: each model row as oVirt's element names have it (see
//! oVirt/ovirt-engine-api-model's types), with `id`/`href`, references to related objects and
//! `<link rel>` to the sub-collections this API serves. Writers are synchronous and never
//! query: whatever a representation embeds (`follow=`) is fetched before by the handler.

use std::fmt::Display;

use crate::model::*;

use super::out::Out;
use super::API;

pub fn href(coll: &str, id: impl Display) -> String {
    format!("{API}/{coll}/{id}")
}

fn reference(o: &mut Out, name: &str, coll: &str, id: impl Display) {
    let id = id.to_string();
    o.reference(name, &id, &href(coll, &id));
}

fn version(o: &mut Out, v: Version) {
    o.open("version", None, None);
    o.leaf("major", v.major);
    o.leaf("minor", v.minor);
    o.close("version");
}

fn time(t: crate::time::Timestamp) -> String {
    t.to_rfc3339()
}

/// A collection document: `<plural><singular/>…</plural>`.
pub fn collection<T>(
    o: &mut Out,
    plural: &str,
    singular: &str,
    items: &[T],
    mut each: impl FnMut(&mut Out, &T),
) {
    o.root(plural, None, None);
    o.array_open(singular);
    let max = o.max().unwrap_or(usize::MAX);
    for it in items.iter().take(max) {
        each(o, it);
    }
    o.array_close();
    o.close(plural);
}

/// Sub-objects embedded in a representation instead of their links.
#[derive(Debug, Default)]
pub struct Embedded {
    pub clusters: Option<Vec<Cluster>>,
    pub storage_domains: Option<Vec<(StorageDomain, Option<PoolMember>)>>,
    pub disk_attachments: Option<Vec<(DiskAttachment, Option<Disk>)>>,
    pub nics: Option<Vec<Nic>>,
    pub snapshots: Option<Vec<Snapshot>>,
    pub cluster: Option<Cluster>,
    pub template: Option<Template>,
    pub host: Option<Host>,
    pub data_center: Option<DataCenter>,
}

pub fn data_center(o: &mut Out, dc: &DataCenter, emb: Option<&Embedded>) {
    let h = href("datacenters", dc.id);
    o.open("data_center", Some(&dc.id.to_string()), Some(&h));
    o.leaf("name", &dc.name);
    o.leaf("description", &dc.description);
    o.leaf("local", dc.local);
    o.leaf("quota_mode", "disabled");
    o.leaf("status", dc.status);
    o.leaf("storage_format", "v5");
    o.open("supported_versions", None, None);
    o.array_open("version");
    version(o, Version::CURRENT);
    o.array_close();
    o.close("supported_versions");
    version(o, dc.compatibility_version);
    let mut rels = Vec::new();
    match emb.and_then(|e| e.clusters.as_ref()) {
        Some(cls) => {
            o.open("clusters", None, None);
            o.array_open("cluster");
            for c in cls {
                cluster(o, c, None);
            }
            o.array_close();
            o.close("clusters");
        }
        None => rels.push("clusters"),
    }
    match emb.and_then(|e| e.storage_domains.as_ref()) {
        Some(sds) => {
            o.open("storage_domains", None, None);
            o.array_open("storage_domain");
            for (sd, m) in sds {
                storage_domain(o, sd, m.as_ref(), None);
            }
            o.array_close();
            o.close("storage_domains");
        }
        None => rels.push("storagedomains"),
    }
    rels.push("qoss");
    o.links(&h, &rels);
    o.close("data_center");
}

pub fn cluster(o: &mut Out, c: &Cluster, emb: Option<&Embedded>) {
    let h = href("clusters", c.id);
    o.open("cluster", Some(&c.id.to_string()), Some(&h));
    o.leaf("name", &c.name);
    o.leaf("description", &c.description);
    o.open("cpu", None, None);
    o.leaf("architecture", &c.cpu_architecture);
    o.leaf("type", &c.cpu_type);
    o.close("cpu");
    o.open("memory_policy", None, None);
    o.open("over_commit", None, None);
    o.leaf("percent", c.memory_overcommit_percent);
    o.close("over_commit");
    o.close("memory_policy");
    o.open("migration", None, None);
    o.open("bandwidth", None, None);
    match c.migration_bandwidth_mbps {
        Some(m) => {
            o.leaf("assignment_method", "custom");
            o.leaf("custom_value", m);
        }
        None => o.leaf("assignment_method", "auto"),
    }
    o.close("bandwidth");
    o.leaf("encrypted", c.migration_encrypted);
    o.close("migration");
    o.leaf("ballooning_enabled", false);
    o.leaf("threads_as_cores", false);
    // oVirt shows a reference; the name is added so that clients need no second request.
    let p = crate::commands::policy_info(c.scheduling_policy);
    let pid = p.id.to_string();
    o.open(
        "scheduling_policy",
        Some(&pid),
        Some(&href("schedulingpolicies", &pid)),
    );
    o.leaf("name", p.policy);
    o.close("scheduling_policy");
    if !c.scheduling_properties.is_empty() {
        o.open("custom_scheduling_policy_properties", None, None);
        o.array_open("property");
        for (name, value) in &c.scheduling_properties {
            o.open("property", None, None);
            o.leaf("name", name);
            o.leaf("value", value);
            o.close("property");
        }
        o.array_close();
        o.close("custom_scheduling_policy_properties");
    }
    version(o, c.compatibility_version);
    match emb.and_then(|e| e.data_center.as_ref()) {
        Some(dc) => data_center(o, dc, None),
        None => reference(o, "data_center", "datacenters", c.data_center_id),
    }
    // Each cluster has its own pool, identified as the cluster.
    reference(o, "mac_pool", "macpools", c.id);
    o.links(&h, &["affinitygroups", "networks"]);
    o.close("cluster");
}

/// A host; `power_management` is whether it has a fence agent (left out where unknown).
pub fn host(o: &mut Out, h: &Host, emb: Option<&Embedded>, power_management: Option<bool>) {
    let hr = href("hosts", h.id);
    o.open("host", Some(&h.id.to_string()), Some(&hr));
    o.leaf("name", &h.name);
    o.leaf("description", "");
    o.leaf("address", &h.address);
    o.leaf("port", h.port);
    o.leaf("status", h.status);
    o.opt_leaf("status_detail", h.status_detail.as_deref());
    o.leaf("type", "rhel");
    o.leaf("protocol", "stomp");
    o.open("spm", None, None);
    o.leaf("priority", h.spm_priority);
    o.leaf("status", h.spm_status);
    o.close("spm");
    o.opt_leaf("memory", h.memory_bytes);
    o.opt_leaf("max_scheduling_memory", h.free_memory_bytes);
    if let Some(c) = h.cpu_cores {
        o.open("cpu", None, None);
        o.open("topology", None, None);
        o.leaf("cores", c);
        o.leaf("sockets", 1);
        o.leaf("threads", 1);
        o.close("topology");
        o.close("cpu");
    }
    if let Some(fp) = &h.certificate_fingerprint {
        o.open("certificate", None, None);
        o.leaf("subject", format!("CN={}", h.name));
        o.leaf("organization", "oxvirt");
        o.leaf("content", fp);
        o.close("certificate");
    }
    if let Some(enabled) = power_management {
        o.open("power_management", None, None);
        o.leaf("enabled", enabled);
        o.leaf("automatic_pm_enabled", enabled);
        o.leaf("kdump_detection", false);
        o.close("power_management");
    }
    match emb.and_then(|e| e.cluster.as_ref()) {
        Some(c) => cluster(o, c, None),
        None => reference(o, "cluster", "clusters", h.cluster_id),
    }
    o.links(
        &hr,
        &["fenceagents", "nics", "networkattachments", "statistics", "tags"],
    );
    o.close("host");
}

/// A storage domain; `member` is its attachment to a data center (status, master).
pub fn storage_domain(o: &mut Out, sd: &StorageDomain, member: Option<&PoolMember>, under_dc: Option<DcId>) {
    let hr = match under_dc {
        Some(dc) => format!("{API}/datacenters/{dc}/storagedomains/{}", sd.id),
        None => href("storagedomains", sd.id),
    };
    o.open("storage_domain", Some(&sd.id.to_string()), Some(&hr));
    o.leaf("name", &sd.name);
    o.leaf("description", &sd.description);
    o.leaf("type", sd.domain_type);
    o.leaf("status", member.map(|m| m.status).unwrap_or(SdStatus::Unattached));
    o.leaf("external_status", "ok");
    o.leaf("master", member.is_some_and(|m| m.master));
    o.leaf("storage_format", format!("v{}", sd.format_version));
    o.leaf("backup", false);
    o.leaf("block_size", 512);
    o.leaf("wipe_after_delete", false);
    o.leaf("discard_after_delete", false);
    o.leaf("supports_discard", false);
    o.leaf("warning_low_space_indicator", sd.warning_low_space_indicator);
    o.leaf("critical_space_action_blocker", sd.critical_space_action_blocker);
    if let (Some(cap), Some(free)) = (sd.capacity_bytes, sd.free_bytes) {
        o.leaf("available", free);
        o.leaf("used", cap.saturating_sub(free));
        o.leaf("committed", 0);
    }
    o.open("storage", None, None);
    o.leaf("type", sd.storage_type);
    o.opt_leaf("address", sd.address.as_deref());
    o.leaf("path", &sd.path);
    o.opt_leaf("mount_options", sd.mount_options.as_deref());
    o.opt_leaf("vfs_type", sd.vfs_type.as_deref());
    o.close("storage");
    if let Some(m) = member {
        reference(o, "data_center", "datacenters", m.data_center_id);
        o.open("data_centers", None, None);
        o.array_open("data_center");
        reference(o, "data_center", "datacenters", m.data_center_id);
        o.array_close();
        o.close("data_centers");
    }
    let base = href("storagedomains", sd.id);
    o.links(
        &base,
        &["diskprofiles", "disks", "disksnapshots", "templates", "vms"],
    );
    o.close("storage_domain");
}

/// A disk's `<storage_domains>`: the one its volumes are on.
fn storage_domains_of_disk(o: &mut Out, sd: SdUuid) {
    o.open("storage_domains", None, None);
    o.array_open("storage_domain");
    reference(o, "storage_domain", "storagedomains", sd);
    o.array_close();
    o.close("storage_domains");
}

pub fn disk(o: &mut Out, d: &Disk) {
    let hr = href("disks", d.id);
    o.open("disk", Some(&d.id.to_string()), Some(&hr));
    o.leaf("name", &d.name);
    o.leaf("alias", &d.name);
    o.leaf("description", &d.description);
    o.leaf("format", d.format);
    o.leaf("sparse", d.sparse);
    o.leaf("provisioned_size", d.provisioned_size);
    o.leaf("actual_size", d.actual_size);
    o.leaf("total_size", d.actual_size);
    o.leaf("status", d.status);
    o.leaf("shareable", d.shareable);
    o.leaf("wipe_after_delete", d.wipe_after_delete);
    o.leaf("propagate_errors", false);
    o.leaf("storage_type", "image");
    o.leaf("content_type", d.content_type);
    o.leaf("qcow_version", "qcow2_v3");
    reference(o, "storage_domain", "storagedomains", d.storage_domain_id);
    storage_domains_of_disk(o, d.storage_domain_id);
    if let Some(p) = d.disk_profile_id {
        reference(o, "disk_profile", "diskprofiles", p);
    }
    o.close("disk");
}

/// A disk as of a snapshot: `as_disk` writes it as `<disk>` under the VM's snapshot
/// (`/vms/{v}/snapshots/{s}/disks`), else as the storage domain's `<disk_snapshot>` (its id the
/// volume's, what an image transfer's `<snapshot id>` names).
pub fn disk_snapshot(o: &mut Out, d: &Disk, vol: &Volume, snap: &Snapshot, as_disk: bool) {
    let (tag, id, hr) = if as_disk {
        (
            "disk",
            d.id.to_string(),
            format!("{API}/vms/{}/snapshots/{}/disks/{}", snap.vm_id, snap.id, d.id),
        )
    } else {
        (
            "disk_snapshot",
            vol.id.to_string(),
            format!(
                "{}/disksnapshots/{}",
                href("storagedomains", vol.storage_domain_id),
                vol.id
            ),
        )
    };
    o.open(tag, Some(&id), Some(&hr));
    o.leaf("name", &d.name);
    o.leaf("alias", &d.name);
    o.leaf("description", &d.description);
    o.leaf("format", vol.format);
    o.leaf("sparse", d.sparse);
    o.leaf("provisioned_size", d.provisioned_size);
    o.leaf("actual_size", vol.actual_size);
    o.leaf("status", d.status);
    o.leaf("image_id", vol.id);
    o.leaf("content_type", d.content_type);
    storage_domains_of_disk(o, vol.storage_domain_id);
    if !as_disk {
        reference(o, "disk", "disks", d.id);
    }
    let snap_id = snap.id.to_string();
    o.reference(
        "snapshot",
        &snap_id,
        &format!("{API}/vms/{}/snapshots/{}", snap.vm_id, snap.id),
    );
    o.close(tag);
}

pub fn disk_attachment(o: &mut Out, owner: &str, a: &DiskAttachment, d: Option<&Disk>) {
    let hr = format!("{API}/{owner}/{}/diskattachments/{}", a.vm_id, a.disk_id);
    o.open("disk_attachment", Some(&a.disk_id.to_string()), Some(&hr));
    o.leaf("active", a.active);
    o.leaf("bootable", a.bootable);
    o.leaf("interface", a.interface);
    o.leaf("pass_discard", false);
    o.leaf("read_only", a.read_only);
    o.leaf("uses_scsi_reservation", false);
    match d {
        Some(d) => disk(o, d),
        None => reference(o, "disk", "disks", a.disk_id),
    }
    if owner == "templates" {
        reference(o, "template", "templates", a.vm_id);
    } else {
        reference(o, "vm", "vms", a.vm_id);
    }
    o.close("disk_attachment");
}

fn topology(o: &mut Out, cpu: &CpuTopology) {
    o.open("cpu", None, None);
    o.leaf("architecture", "x86_64");
    o.open("topology", None, None);
    o.leaf("cores", cpu.cores);
    o.leaf("sockets", cpu.sockets);
    o.leaf("threads", cpu.threads);
    o.close("topology");
    o.close("cpu");
}

/// The virtual hardware oxvirt gives every VM and template, in oVirt's elements (clients such
/// as Ansible's `ovirt_template` compare them): a q35 machine with SeaBIOS and no boot menu, no
/// single sign-on, USB, sound card or I/O threads.
fn fixed_hardware(o: &mut Out) {
    o.open("bios", None, None);
    o.open("boot_menu", None, None);
    o.leaf("enabled", false);
    o.close("boot_menu");
    o.leaf("type", "q35_sea_bios");
    o.close("bios");
    o.open("sso", None, None);
    o.open("methods", None, None);
    o.array_open("method");
    o.array_close();
    o.close("methods");
    o.close("sso");
    o.open("usb", None, None);
    o.leaf("enabled", false);
    o.close("usb");
    o.open("io", None, None);
    o.leaf("threads", 0);
    o.close("io");
    o.leaf("soundcard_enabled", false);
}

fn os(o: &mut Out, os: Option<&VmOs>) {
    let default = VmOs::default();
    let os_ = os.unwrap_or(&default);
    o.open("os", None, None);
    o.leaf("type", &os_.os_type);
    o.open("boot", None, None);
    o.open("devices", None, None);
    o.array_open("device");
    for d in &os_.boot_devices {
        o.leaf("device", d);
    }
    o.array_close();
    o.close("devices");
    o.close("boot");
    if let Some(os) = os {
        o.opt_leaf("kernel", os.kernel.as_deref());
        o.opt_leaf("initrd", os.initrd.as_deref());
        o.opt_leaf("cmdline", os.cmdline.as_deref());
    }
    o.close("os");
}

/// A VM's CD-ROM (oVirt's single cdrom device, id [`CDROM_ID`]) holding `file`.
pub fn cdrom(o: &mut Out, vm: VmId, file: Option<DiskId>) {
    let hr = format!("{}/cdroms/{CDROM_ID}", href("vms", vm));
    o.open("cdrom", Some(CDROM_ID), Some(&hr));
    if let Some(f) = file {
        o.open("file", Some(&f.to_string()), None);
        o.close("file");
    }
    reference(o, "vm", "vms", vm);
    o.close("cdrom");
}

/// A statistic of the `owner` (`vm` or `host`) `id` in collection `coll`.
pub fn statistic(
    o: &mut Out,
    s: &crate::commands::stats::Statistic,
    owner: &str,
    coll: &str,
    id: impl Display,
) {
    let sid = s.id().to_string();
    let owner_href = href(coll, &id);
    let hr = format!("{owner_href}/statistics/{sid}");
    o.open("statistic", Some(&sid), Some(&hr));
    o.leaf("name", s.name);
    o.leaf("description", s.description);
    o.leaf("kind", s.kind.as_str());
    o.leaf("type", s.value.type_name());
    o.leaf("unit", s.unit.as_str());
    o.open("values", None, None);
    o.array_open("value");
    o.open("value", None, None);
    o.leaf("datum", s.value);
    o.close("value");
    o.array_close();
    o.close("values");
    o.reference(owner, &id.to_string(), &owner_href);
    o.close("statistic");
}

/// The id of every VM's CD-ROM device, as oVirt gives it.
pub const CDROM_ID: &str = "00000000-0000-0000-0000-000000000000";

pub fn vm(o: &mut Out, v: &Vm, emb: Option<&Embedded>) {
    let id = v.id.to_string();
    let hr = href("vms", &id);
    o.open("vm", Some(&id), Some(&hr));
    o.leaf("name", &v.name);
    o.leaf("description", &v.description);
    o.leaf("status", v.runtime.status);
    o.opt_leaf("status_detail", v.runtime.status_detail.as_deref());
    o.leaf("memory", v.memory_bytes);
    o.open("memory_policy", None, None);
    o.leaf("guaranteed", v.memory_guaranteed_bytes);
    o.leaf("max", v.memory_bytes.saturating_mul(4));
    o.leaf("ballooning", false);
    o.close("memory_policy");
    topology(o, &v.cpu);
    os(o, Some(&v.os));
    fixed_hardware(o);
    o.open("high_availability", None, None);
    o.leaf("enabled", v.ha.enabled);
    o.leaf("priority", v.ha.priority);
    o.close("high_availability");
    o.leaf("storage_error_resume_behaviour", v.effective_resume_behavior());
    // Where a highly available VM's lease lives (oVirt 4.1+); absent: its first disk's domain.
    if let Some(sd) = v.lease_storage_domain_id {
        o.open("lease", None, None);
        reference(o, "storage_domain", "storagedomains", sd);
        o.close("lease");
    }
    o.open("placement_policy", None, None);
    o.leaf("affinity", v.placement.affinity);
    if !v.placement.hosts.is_empty() {
        o.open("hosts", None, None);
        o.array_open("host");
        for h in &v.placement.hosts {
            reference(o, "host", "hosts", h);
        }
        o.array_close();
        o.close("hosts");
    }
    o.close("placement_policy");
    o.leaf("creation_time", time(v.created_at));
    o.leaf("type", "server");
    o.leaf("origin", "ovirt");
    o.leaf("stateless", false);
    o.leaf("delete_protected", false);
    o.leaf("start_paused", false);
    if let Some(sd) = v.lease_storage_domain_id {
        o.open("lease", None, None);
        reference(o, "storage_domain", "storagedomains", sd);
        o.close("lease");
    }
    match emb.and_then(|e| e.cluster.as_ref()) {
        Some(c) => cluster(o, c, None),
        None => reference(o, "cluster", "clusters", v.cluster_id),
    }
    match emb.and_then(|e| e.template.as_ref()) {
        Some(t) => template(o, t, None),
        None => reference(o, "template", "templates", v.template_id),
    }
    reference(o, "original_template", "templates", v.template_id);
    if let Some(h) = v.runtime.run_on_host.filter(|_| v.runtime.status.is_running()) {
        match emb.and_then(|e| e.host.as_ref()) {
            Some(hh) => host(o, hh, None, None),
            None => reference(o, "host", "hosts", h),
        }
    }
    let mut rels = Vec::with_capacity(3);
    match emb.and_then(|e| e.disk_attachments.as_ref()) {
        Some(atts) => {
            o.open("disk_attachments", None, None);
            o.array_open("disk_attachment");
            for (a, d) in atts {
                disk_attachment(o, "vms", a, d.as_ref());
            }
            o.array_close();
            o.close("disk_attachments");
        }
        None => rels.push("diskattachments"),
    }
    match emb.and_then(|e| e.nics.as_ref()) {
        Some(ns) => {
            o.open("nics", None, None);
            o.array_open("nic");
            for n in ns {
                nic(o, n);
            }
            o.array_close();
            o.close("nics");
        }
        None => rels.push("nics"),
    }
    match emb.and_then(|e| e.snapshots.as_ref()) {
        Some(ss) => {
            o.open("snapshots", None, None);
            o.array_open("snapshot");
            for s in ss {
                snapshot(o, s);
            }
            o.array_close();
            o.close("snapshots");
        }
        None => rels.push("snapshots"),
    }
    rels.extend(["cdroms", "statistics", "tags"]);
    o.links(&hr, &rels);
    o.close("vm");
}

pub fn template(o: &mut Out, t: &Template, emb: Option<&Embedded>) {
    let id = t.id.to_string();
    let hr = href("templates", &id);
    o.open("template", Some(&id), Some(&hr));
    o.leaf("name", &t.name);
    o.leaf("description", &t.description);
    o.leaf("status", t.status);
    o.leaf("memory", t.memory_bytes);
    o.open("memory_policy", None, None);
    o.leaf("guaranteed", t.memory_bytes);
    o.leaf("max", t.memory_bytes.saturating_mul(4));
    o.leaf("ballooning", false);
    o.close("memory_policy");
    topology(o, &t.cpu);
    os(o, None);
    fixed_hardware(o);
    o.leaf("creation_time", time(t.created_at));
    o.leaf("type", "server");
    o.leaf("origin", "ovirt");
    o.leaf("stateless", false);
    o.leaf("delete_protected", false);
    o.open("version", None, None);
    o.leaf("version_number", 1);
    reference(o, "base_template", "templates", &id);
    o.close("version");
    if let Some(c) = t.cluster_id {
        match emb.and_then(|e| e.cluster.as_ref()) {
            Some(cl) => cluster(o, cl, None),
            None => reference(o, "cluster", "clusters", c),
        }
    }
    match emb.and_then(|e| e.disk_attachments.as_ref()) {
        Some(atts) => {
            o.open("disk_attachments", None, None);
            o.array_open("disk_attachment");
            for (a, d) in atts {
                disk_attachment(o, "templates", a, d.as_ref());
            }
            o.array_close();
            o.close("disk_attachments");
            o.links(&hr, &["nics", "tags"]);
        }
        None => o.links(&hr, &["diskattachments", "nics", "tags"]),
    }
    o.close("template");
}

pub fn nic(o: &mut Out, n: &Nic) {
    let hr = format!("{API}/vms/{}/nics/{}", n.vm_id, n.id);
    o.open("nic", Some(&n.id.to_string()), Some(&hr));
    o.leaf("name", &n.name);
    o.leaf("interface", n.interface);
    o.leaf("linked", n.linked);
    o.leaf("plugged", n.plugged);
    o.open("mac", None, None);
    o.leaf("address", n.mac);
    o.close("mac");
    if let Some(net) = &n.network {
        o.open("network", None, None);
        o.leaf("name", net);
        o.close("network");
    }
    reference(o, "vm", "vms", n.vm_id);
    o.close("nic");
}

pub fn snapshot(o: &mut Out, s: &Snapshot) {
    let hr = format!("{API}/vms/{}/snapshots/{}", s.vm_id, s.id);
    o.open("snapshot", Some(&s.id.to_string()), Some(&hr));
    o.leaf("description", &s.description);
    o.leaf("date", time(s.created_at));
    o.leaf("persist_memorystate", s.persist_memory);
    o.leaf("snapshot_status", s.status);
    o.leaf("snapshot_type", s.snapshot_type);
    reference(o, "vm", "vms", s.vm_id);
    o.close("snapshot");
}

pub fn image_transfer(o: &mut Out, t: &ImageTransfer) {
    let hr = href("imagetransfers", t.id);
    o.open("image_transfer", Some(&t.id.to_string()), Some(&hr));
    o.open("actions", None, None);
    o.links(&hr, &["cancel", "finalize"]);
    o.close("actions");
    o.leaf("active", t.active);
    o.leaf("direction", t.direction);
    o.leaf("format", t.format);
    o.leaf("inactivity_timeout", t.inactivity_timeout);
    o.leaf("phase", t.phase);
    o.leaf("shallow", false);
    o.leaf("timeout_policy", "legacy");
    o.opt_leaf("transfer_url", t.transfer_url.as_deref());
    // No engine proxy: the client reaches the host directly (ovirt-imageio tries
    // transfer_url first; proxy_url is only its fallback).
    o.opt_leaf("proxy_url", t.transfer_url.as_deref());
    o.leaf("transferred", t.transferred);
    o.opt_leaf("message", t.message.as_deref());
    o.leaf("creation_time", time(t.created_at));
    reference(o, "host", "hosts", t.host_id);
    reference(o, "disk", "disks", t.disk_id);
    reference(o, "image", "disks", t.disk_id);
    o.close("image_transfer");
}

pub fn job(o: &mut Out, j: &Job) {
    let hr = href("jobs", j.id);
    o.open("job", Some(&j.id.to_string()), Some(&hr));
    o.leaf("description", &j.description);
    o.leaf("status", j.status);
    o.leaf("auto_cleared", j.auto_cleared);
    o.leaf("external", false);
    o.leaf("start_time", time(j.started_at));
    o.opt_leaf("end_time", j.ended_at.map(time));
    o.leaf("last_updated", time(j.last_updated));
    o.opt_leaf("correlation_id", j.correlation_id.as_deref());
    o.links(&hr, &["steps"]);
    o.close("job");
}

pub fn step(o: &mut Out, s: &JobStep) {
    let hr = format!("{API}/jobs/{}/steps/{}", s.job_id, s.id);
    o.open("step", Some(&s.id.to_string()), Some(&hr));
    o.leaf("description", &s.description);
    o.leaf("type", s.step_type);
    o.leaf("number", s.number);
    o.leaf("status", s.status);
    o.leaf("external", false);
    o.leaf("start_time", time(s.started_at));
    o.opt_leaf("end_time", s.ended_at.map(time));
    reference(o, "job", "jobs", s.job_id);
    if let Some(p) = s.parent_id {
        o.reference(
            "parent_step",
            &p.to_string(),
            &format!("{API}/jobs/{}/steps/{p}", s.job_id),
        );
    }
    o.close("step");
}

pub fn event(o: &mut Out, e: &Event) {
    let hr = href("events", e.id);
    o.open("event", Some(&e.id.to_string()), Some(&hr));
    o.leaf("description", &e.description);
    o.leaf("code", e.code);
    o.leaf("severity", e.severity);
    o.leaf("time", time(e.time));
    o.leaf("index", e.id);
    o.leaf("origin", e.origin.as_deref().unwrap_or("oVirt"));
    o.leaf("custom_id", e.custom_id.unwrap_or(-1));
    o.leaf("flood_rate", 30);
    o.leaf("log_on_host", false);
    o.opt_leaf("correlation_id", e.correlation_id.as_deref());
    if let Some(v) = e.vm_id {
        reference(o, "vm", "vms", v);
    }
    if let Some(h) = e.host_id {
        reference(o, "host", "hosts", h);
    }
    if let Some(s) = e.storage_domain_id {
        reference(o, "storage_domain", "storagedomains", s);
    }
    if let Some(d) = e.data_center_id {
        reference(o, "data_center", "datacenters", d);
    }
    if let Some(c) = e.cluster_id {
        reference(o, "cluster", "clusters", c);
    }
    if let Some(t) = e.template_id {
        reference(o, "template", "templates", t);
    }
    o.close("event");
}

pub fn user(o: &mut Out, u: &User) {
    let hr = href("users", u.id);
    o.open("user", Some(&u.id.to_string()), Some(&hr));
    o.leaf("name", &u.name);
    o.leaf("user_name", u.principal());
    o.leaf("principal", &u.name);
    o.leaf("namespace", "*");
    o.leaf("department", "");
    o.opt_leaf("email", u.email.as_deref());
    o.open("domain", None, None);
    o.leaf("name", &u.domain);
    o.close("domain");
    o.close("user");
}

/// A built-in scheduling policy (read-only; see [`crate::commands::POLICIES`]).
pub fn scheduling_policy(o: &mut Out, p: &crate::commands::PolicyInfo) {
    let id = p.id.to_string();
    o.open(
        "scheduling_policy",
        Some(&id),
        Some(&href("schedulingpolicies", &id)),
    );
    o.leaf("name", p.policy);
    o.leaf("description", p.description);
    o.leaf("default_policy", p.default);
    o.leaf("locked", true);
    o.close("scheduling_policy");
}

fn affinity_rule(o: &mut Out, name: &str, enabled: bool, positive: bool, enforcing: bool) {
    o.open(name, None, None);
    o.leaf("enabled", enabled);
    o.leaf("positive", positive);
    o.leaf("enforcing", enforcing);
    o.close(name);
}

/// An affinity group as oVirt 4.4 has it: the VM rule (and the deprecated top-level
/// `positive`/`enforcing` that mirror it), the member VMs as references, and an empty,
/// disabled host rule (oxvirt's groups hold VMs only).
pub fn qos(o: &mut Out, q: &Qos) {
    let hr = format!("{API}/datacenters/{}/qoss/{}", q.data_center_id, q.id);
    o.open("qos", Some(&q.id.to_string()), Some(&hr));
    o.leaf("name", &q.name);
    o.leaf("description", &q.description);
    o.leaf("type", "storage");
    let l = &q.limits;
    for (name, v) in [
        ("max_throughput", l.max_throughput),
        ("max_read_throughput", l.max_read_throughput),
        ("max_write_throughput", l.max_write_throughput),
        ("max_iops", l.max_iops),
        ("max_read_iops", l.max_read_iops),
        ("max_write_iops", l.max_write_iops),
    ] {
        o.opt_leaf(name, v);
    }
    reference(o, "data_center", "datacenters", q.data_center_id);
    o.close("qos");
}

pub fn disk_profile(o: &mut Out, p: &DiskProfile) {
    let hr = href("diskprofiles", p.id);
    o.open("disk_profile", Some(&p.id.to_string()), Some(&hr));
    o.leaf("name", &p.name);
    o.leaf("description", &p.description);
    if let Some(q) = p.qos_id {
        reference(o, "qos", "qoss", q);
    }
    reference(o, "storage_domain", "storagedomains", p.storage_domain_id);
    o.close("disk_profile");
}

/// A tag; `on` is where it was listed from (`vms/{id}`, …) for an assigned tag's own href.
pub fn tag(o: &mut Out, t: &Tag, on: Option<&str>) {
    let hr = match on {
        Some(base) => format!("{API}/{base}/tags/{}", t.id),
        None => href("tags", t.id),
    };
    o.open("tag", Some(&t.id.to_string()), Some(&hr));
    o.leaf("name", &t.name);
    o.leaf("description", &t.description);
    if t.id != ROOT_TAG_ID {
        reference(o, "parent", "tags", t.parent.unwrap_or(ROOT_TAG_ID));
    }
    o.close("tag");
}

pub fn affinity_group(o: &mut Out, g: &AffinityGroup) {
    let hr = format!("{API}/clusters/{}/affinitygroups/{}", g.cluster_id, g.id);
    o.open("affinity_group", Some(&g.id.to_string()), Some(&hr));
    o.leaf("name", &g.name);
    o.leaf("description", &g.description);
    o.leaf("positive", g.positive);
    o.leaf("enforcing", g.enforcing);
    o.leaf("priority", 1);
    o.leaf("broken", false);
    affinity_rule(o, "vms_rule", g.enabled, g.positive, g.enforcing);
    affinity_rule(o, "hosts_rule", false, true, false);
    reference(o, "cluster", "clusters", g.cluster_id);
    o.open("vms", None, None);
    o.array_open("vm");
    for v in &g.vm_ids {
        reference(o, "vm", "vms", v);
    }
    o.array_close();
    o.close("vms");
    o.links(&hr, &["vms"]);
    o.close("affinity_group");
}

/// A host's fence agent (oxvirt keeps one per host, identified as the host); the password is
/// never shown.
pub fn fence_agent(o: &mut Out, host: HostUuid, a: &crate::fence::AgentParams) {
    let id = host.to_string();
    let hr = format!("{API}/hosts/{id}/fenceagents/{id}");
    o.open("agent", Some(&id), Some(&hr));
    o.leaf("type", &a.agent_type);
    o.opt_leaf("address", a.address.as_deref());
    o.opt_leaf("username", a.username.as_deref());
    o.opt_leaf("port", a.port);
    o.leaf("order", 1);
    o.leaf("concurrent", false);
    o.leaf("encrypt_options", false);
    if !a.options.is_empty() {
        o.open("options", None, None);
        o.array_open("option");
        for (n, v) in &a.options {
            o.open("option", None, None);
            o.leaf("name", n);
            o.leaf("value", v);
            o.close("option");
        }
        o.array_close();
        o.close("options");
    }
    reference(o, "host", "hosts", &id);
    o.close("agent");
}
