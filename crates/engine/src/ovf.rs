//! OVF: how a VM or template is described on storage, so that its data domain carries what
//! another engine needs to bring it back (oVirt's OVF stores, read when a domain is imported).
//!
//! This module owns the format and nothing else: [`write_vm`]/[`write_template`] turn model
//! values into oVirt's OVF XML, [`read`] turns an OVF (ours or one oVirt wrote) back into them,
//! and [`pack`]/[`unpack`] make and read the tar an OVF store volume holds. Where oVirt and
//! oxvirt model a thing alike the OVF has oVirt's elements and attributes, as its `OvfWriter`
//! writes them; what only oxvirt has (a snapshot's kept configuration) goes in elements of its
//! own that oVirt's reader skips.
//!
//! The store's tar, as oVirt writes it: `info.json`, one `<id>.ovf` per entity, then
//! `metadata.json`; flat ustar names, 512-byte records. Its length is kept in the store
//! volume's description (`"Size"`), since the volume is larger than the tar.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use quick_xml::escape::escape;

use crate::model::{
    BootDevice, ClusterId, CpuTopology, Disk, DiskContentType, DiskFormat, DiskId, DiskInterface, DiskStatus,
    HighAvailability, MacAddr, Nic, NicId, NicInterface, Placement, PlacementAffinity, SdUuid, Snapshot,
    SnapshotDisk, SnapshotId, SnapshotMemory, SnapshotStatus, SnapshotType, StateVolume, Template,
    TemplateId, TemplateNic, TemplateStatus, Vm, VmConfiguration, VmId, VmOs, VolType, VolUuid, Volume,
};
use crate::rest::input::Elem;
use crate::time::Timestamp;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum OvfError {
    #[error("OVF of {entity} is not valid XML: {reason}")]
    Xml { entity: String, reason: String },
    #[error("OVF of {entity}: {what}")]
    Invalid { entity: String, what: String },
    #[error("OVF store archive: {0}")]
    Archive(String),
}

/// One disk of a VM or template, as its OVF lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    pub disk: Disk,
    /// Base first; each with the snapshot it belongs to (the VM's active one for the leaf).
    pub volumes: Vec<(Volume, Option<SnapshotId>)>,
    pub interface: DiskInterface,
    pub bootable: bool,
    pub read_only: bool,
    /// Plugged (oVirt's `IsPlugged`).
    pub active: bool,
}

/// A VM as its OVF describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfVm {
    /// Run time reset: a VM read from storage is down.
    pub vm: Vm,
    pub cluster_name: String,
    pub template_name: String,
    pub disks: Vec<OvfDisk>,
    pub nics: Vec<Nic>,
    /// Regular snapshots and the active one, with the disks' volumes each holds.
    pub snapshots: Vec<Snapshot>,
    /// The memory the snapshots that kept one saved (oVirt's `<Memory>`).
    pub memory: BTreeMap<SnapshotId, SnapshotMemory>,
}

/// A template as its OVF describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfTemplate {
    pub template: Template,
    pub cluster_name: String,
    pub disks: Vec<OvfDisk>,
    pub nics: Vec<TemplateNic>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OvfEntity {
    Vm(Box<OvfVm>),
    Template(Box<OvfTemplate>),
}

impl OvfEntity {
    pub fn id(&self) -> uuid::Uuid {
        match self {
            OvfEntity::Vm(v) => *v.vm.id.as_uuid(),
            OvfEntity::Template(t) => *t.template.id.as_uuid(),
        }
    }
    pub fn name(&self) -> &str {
        match self {
            OvfEntity::Vm(v) => &v.vm.name,
            OvfEntity::Template(t) => &t.template.name,
        }
    }
    pub fn disks(&self) -> &[OvfDisk] {
        match self {
            OvfEntity::Vm(v) => &v.disks,
            OvfEntity::Template(t) => &t.disks,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Writing.

const ENVELOPE: &str = r#"<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1/" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" ovf:version="4.5.0.0">"#;

/// oVirt's `BootSequence` (C hard disk, D CD-ROM, N network) for a device order.
fn boot_sequence(devs: &[BootDevice]) -> u32 {
    match devs {
        [BootDevice::Cdrom, BootDevice::Hd, ..] => 1,
        [BootDevice::Cdrom] => 10,
        [BootDevice::Hd, BootDevice::Cdrom, ..] => 9,
        _ => 0,
    }
}

fn boot_devices(seq: u32) -> Vec<BootDevice> {
    match seq {
        1 | 5 | 6 => vec![BootDevice::Cdrom, BootDevice::Hd],
        10 | 12 => vec![BootDevice::Cdrom],
        9 | 3 | 4 => vec![BootDevice::Hd, BootDevice::Cdrom],
        _ => vec![BootDevice::Hd],
    }
}

fn disk_interface_ovirt(i: DiskInterface) -> &'static str {
    match i {
        DiskInterface::Virtio => "VirtIO",
        DiskInterface::VirtioScsi => "VirtIO_SCSI",
        DiskInterface::Ide => "IDE",
        DiskInterface::Sata => "SATA",
    }
}

fn disk_interface_from(s: &str) -> DiskInterface {
    match s.to_ascii_lowercase().as_str() {
        "virtio_scsi" => DiskInterface::VirtioScsi,
        "ide" => DiskInterface::Ide,
        "sata" => DiskInterface::Sata,
        _ => DiskInterface::Virtio,
    }
}

/// oVirt's `VmInterfaceType` numbers (`rasd:ResourceSubType`).
fn nic_type(i: NicInterface) -> u32 {
    match i {
        NicInterface::Rtl8139 => 1,
        NicInterface::E1000 => 2,
        NicInterface::Virtio => 3,
        NicInterface::E1000e => 7,
    }
}

fn nic_interface_from(n: &str) -> NicInterface {
    match n {
        "1" | "0" => NicInterface::Rtl8139,
        "2" => NicInterface::E1000,
        "7" => NicInterface::E1000e,
        _ => NicInterface::Virtio,
    }
}

fn placement_code(a: PlacementAffinity) -> u32 {
    match a {
        PlacementAffinity::Migratable => 0,
        PlacementAffinity::UserMigratable => 1,
        PlacementAffinity::Pinned => 2,
    }
}

fn tag(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let v = value.to_string();
    let _ = write!(out, "<{name}>{}</{name}>", escape(v.as_str()));
}

fn volume_format(f: DiskFormat) -> &'static str {
    match f {
        DiskFormat::Raw => "RAW",
        DiskFormat::Cow => "COW",
    }
}

fn gib_ceil(bytes: u64) -> u64 {
    bytes.div_ceil(GIB)
}

/// References, then the disk section: every volume of every disk.
fn write_disks(out: &mut String, disks: &[OvfDisk]) {
    out.push_str("<References>");
    for d in disks {
        for (v, _) in &d.volumes {
            let _ = write!(
                out,
                r#"<File ovf:href="{}/{}" ovf:id="{}" ovf:size="{}" ovf:description="{}" ovf:disk_storage_type="IMAGE" ovf:cinder_volume_type=""/>"#,
                d.disk.id,
                v.id,
                v.id,
                d.disk.provisioned_size,
                escape(d.disk.description.as_str())
            );
        }
    }
    out.push_str("</References>");
    out.push_str(r#"<Section xsi:type="ovf:DiskSection_Type"><Info>List of Virtual Disks</Info>"#);
    for d in disks {
        for (v, snap) in &d.volumes {
            let _ = write!(
                out,
                r#"<Disk ovf:diskId="{vol}" ovf:size="{size}" ovf:actual_size="{actual}" ovf:vm_snapshot_id="{snap}" ovf:parentRef="{parent}" ovf:fileRef="{img}/{vol}" ovf:format="http://www.vmware.com/specifications/vmdk.html#sparse" ovf:volume-format="{fmt}" ovf:volume-type="{alloc}" ovf:disk-interface="{iface}" ovf:read-only="{ro}" ovf:shareable="{share}" ovf:boot="{boot}" ovf:pass-discard="false" ovf:incremental-backup="false" ovf:disk-alias="{alias}" ovf:disk-description="{desc}" ovf:wipe-after-delete="{wipe}" ovf:disk-content-type="{content}" ovf:storage-domain-id="{sd}" ovf:provisioned-size="{prov}" ovf:volume-actual-size="{vactual}"/>"#,
                vol = v.id,
                size = gib_ceil(d.disk.provisioned_size),
                actual = gib_ceil(v.actual_size),
                snap = snap.map(|s| s.to_string()).unwrap_or_default(),
                parent = v
                    .parent_id
                    .map(|p| format!("{}/{p}", d.disk.id))
                    .unwrap_or_default(),
                img = d.disk.id,
                fmt = volume_format(v.format),
                alloc = if d.disk.sparse { "Sparse" } else { "Preallocated" },
                iface = disk_interface_ovirt(d.interface),
                ro = d.read_only,
                share = d.disk.shareable,
                boot = d.bootable,
                alias = escape(d.disk.name.as_str()),
                desc = escape(d.disk.description.as_str()),
                wipe = d.disk.wipe_after_delete,
                content = match d.disk.content_type {
                    DiskContentType::Data => "DATA",
                    DiskContentType::Iso => "ISO",
                },
                sd = v.storage_domain_id,
                prov = d.disk.provisioned_size,
                vactual = v.actual_size,
            );
        }
    }
    out.push_str("</Section>");
}

struct Hardware<'a> {
    cpu: CpuTopology,
    memory_bytes: u64,
    disks: &'a [OvfDisk],
    nics: Vec<NicItem>,
}

fn write_hardware(out: &mut String, id: &str, os_type: &str, h: &Hardware<'_>) {
    let vcpus = h.cpu.vcpus();
    let mem = h.memory_bytes / MIB;
    let _ = write!(
        out,
        r#"<Section ovf:id="{id}" ovf:required="false" xsi:type="ovf:OperatingSystemSection_Type"><Info>Guest Operating System</Info><Description>{}</Description></Section>"#,
        escape(os_type)
    );
    let _ = write!(
        out,
        r#"<Section xsi:type="ovf:VirtualHardwareSection_Type"><Info>{vcpus} CPU, {mem} Memory</Info><System><vssd:VirtualSystemType>ENGINE 4.5.0.0</vssd:VirtualSystemType></System>"#
    );
    let _ = write!(
        out,
        "<Item><rasd:Caption>{vcpus} virtual cpu</rasd:Caption><rasd:Description>Number of virtual CPU</rasd:Description><rasd:InstanceId>1</rasd:InstanceId><rasd:ResourceType>3</rasd:ResourceType><rasd:num_of_sockets>{}</rasd:num_of_sockets><rasd:cpu_per_socket>{}</rasd:cpu_per_socket><rasd:threads_per_cpu>{}</rasd:threads_per_cpu><rasd:VirtualQuantity>{vcpus}</rasd:VirtualQuantity></Item>",
        h.cpu.sockets, h.cpu.cores, h.cpu.threads
    );
    let _ = write!(
        out,
        "<Item><rasd:Caption>{mem} MB of memory</rasd:Caption><rasd:Description>Memory Size</rasd:Description><rasd:InstanceId>2</rasd:InstanceId><rasd:ResourceType>4</rasd:ResourceType><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:VirtualQuantity>{mem}</rasd:VirtualQuantity></Item>"
    );
    for (n, d) in h.disks.iter().enumerate() {
        let Some((leaf, _)) = d.volumes.last() else {
            continue;
        };
        let _ = write!(
            out,
            "<Item><rasd:Caption>{}</rasd:Caption><rasd:InstanceId>{}</rasd:InstanceId><rasd:ResourceType>17</rasd:ResourceType><rasd:HostResource>{}/{}</rasd:HostResource><rasd:StorageId>{}</rasd:StorageId><Type>disk</Type><Device>disk</Device><rasd:Address/><BootOrder>{}</BootOrder><IsPlugged>{}</IsPlugged><IsReadOnly>{}</IsReadOnly><Alias/></Item>",
            escape(d.disk.name.as_str()),
            leaf.id,
            d.disk.id,
            leaf.id,
            leaf.storage_domain_id,
            if d.bootable { n + 1 } else { 0 },
            d.active,
            d.read_only
        );
    }
    for n in &h.nics {
        let (id, name, iface, linked, plugged) = (n.id, n.name.as_str(), n.interface, n.linked, n.plugged);
        let net = n.network.as_deref().unwrap_or("");
        let _ = write!(
            out,
            "<Item><rasd:Caption>Ethernet adapter on {net}</rasd:Caption><rasd:InstanceId>{id}</rasd:InstanceId><rasd:ResourceType>10</rasd:ResourceType><rasd:OtherResourceType>{net}</rasd:OtherResourceType><rasd:ResourceSubType>{}</rasd:ResourceSubType><rasd:Connection>{net}</rasd:Connection><rasd:Linked>{linked}</rasd:Linked><rasd:Name>{name}</rasd:Name><rasd:ElementName>{name}</rasd:ElementName><rasd:MACAddress>{}</rasd:MACAddress><rasd:speed>10000</rasd:speed><Type>interface</Type><Device>bridge</Device><rasd:Address/><BootOrder>0</BootOrder><IsPlugged>{plugged}</IsPlugged><IsReadOnly>false</IsReadOnly><Alias/></Item>",
            nic_type(iface),
            n.mac.map(|m| m.to_string()).unwrap_or_default(),
            net = escape(net),
            name = escape(name),
        );
    }
    out.push_str("</Section>");
}

/// The OVF of VM `o.vm`.
pub fn write_vm(o: &OvfVm) -> String {
    let v = &o.vm;
    let mut out = String::with_capacity(8192);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    out.push_str(ENVELOPE);
    write_disks(&mut out, &o.disks);
    out.push_str(r#"<Content ovf:id="out" xsi:type="ovf:VirtualSystem_Type">"#);
    tag(&mut out, "Name", &v.name);
    tag(&mut out, "Description", &v.description);
    tag(&mut out, "CreationDate", v.created_at.to_ovf());
    tag(&mut out, "VmType", 1);
    tag(&mut out, "MinAllocatedMem", v.memory_guaranteed_bytes / MIB);
    tag(&mut out, "ClusterName", &o.cluster_name);
    tag(&mut out, "TemplateId", v.template_id);
    tag(&mut out, "TemplateName", &o.template_name);
    tag(&mut out, "Origin", 0);
    tag(&mut out, "DefaultBootSequence", boot_sequence(&v.os.boot_devices));
    tag(&mut out, "AutoStartup", v.ha.enabled);
    tag(&mut out, "Priority", v.ha.priority);
    tag(&mut out, "MigrationSupport", placement_code(v.placement.affinity));
    let hosts: Vec<String> = v.placement.hosts.iter().map(|h| h.to_string()).collect();
    tag(&mut out, "DedicatedVmForVds", hosts.join(","));
    if let Some(sd) = v.lease_storage_domain_id {
        tag(&mut out, "LeaseDomainId", sd);
    }
    // oVirt writes the Java enum's name.
    tag(
        &mut out,
        "ResumeBehavior",
        v.effective_resume_behavior().as_str().to_ascii_uppercase(),
    );
    tag(&mut out, "KernelUrl", v.os.kernel.as_deref().unwrap_or(""));
    tag(&mut out, "InitrdUrl", v.os.initrd.as_deref().unwrap_or(""));
    tag(&mut out, "KernelParams", v.os.cmdline.as_deref().unwrap_or(""));
    let hw = Hardware {
        cpu: v.cpu,
        memory_bytes: v.memory_bytes,
        disks: &o.disks,
        nics: o
            .nics
            .iter()
            .map(|n| NicItem {
                id: n.id,
                name: n.name.clone(),
                network: n.network.clone(),
                mac: Some(n.mac),
                interface: n.interface,
                linked: n.linked,
                plugged: n.plugged,
            })
            .collect(),
    };
    write_hardware(&mut out, &v.id.to_string(), &v.os.os_type, &hw);
    out.push_str(r#"<Section xsi:type="ovf:SnapshotsSection_Type">"#);
    for s in &o.snapshots {
        let _ = write!(out, r#"<Snapshot ovf:id="{}">"#, s.id);
        tag(&mut out, "Type", s.snapshot_type.as_str().to_ascii_uppercase());
        tag(&mut out, "Description", &s.description);
        tag(&mut out, "CreationDate", s.created_at.to_ovf());
        if let Some(c) = &s.configuration {
            // oxvirt's own: oVirt keeps a whole OVF here, oxvirt what a restore brings back.
            tag(
                &mut out,
                "OxvirtConfiguration",
                serde_json::to_string(c).unwrap_or_default(),
            );
        }
        if let Some(m) = o.memory.get(&s.id) {
            // oVirt's form (domain, pool, memory image and volume, metadata image and volume):
            // oxvirt's one state volume holds both; the size it restores into is its own.
            let v = m.state;
            tag(
                &mut out,
                "Memory",
                format!("{},{},{},{},{},{}", v.sd, VmId::nil(), v.img, v.vol, v.img, v.vol),
            );
            tag(
                &mut out,
                "OxvirtMemory",
                serde_json::json!({ "memory_bytes": m.memory_bytes, "cpus": m.cpus }),
            );
        }
        out.push_str("</Snapshot>");
    }
    out.push_str("</Section></Content></ovf:Envelope>");
    out
}

/// The OVF of template `o.template`.
pub fn write_template(o: &OvfTemplate) -> String {
    let t = &o.template;
    let mut out = String::with_capacity(4096);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    out.push_str(ENVELOPE);
    write_disks(&mut out, &o.disks);
    out.push_str(r#"<Content ovf:id="out" xsi:type="ovf:VirtualSystem_Type">"#);
    tag(&mut out, "Name", &t.name);
    tag(&mut out, "Description", &t.description);
    tag(&mut out, "CreationDate", t.created_at.to_ovf());
    tag(&mut out, "VmType", 1);
    tag(&mut out, "ClusterName", &o.cluster_name);
    tag(&mut out, "TemplateId", t.id);
    tag(&mut out, "TemplateType", "TEMPLATE");
    tag(&mut out, "BaseTemplateId", t.id);
    tag(&mut out, "TemplateVersionNumber", 1);
    tag(&mut out, "IsDisabled", false);
    tag(&mut out, "Origin", 0);
    let hw = Hardware {
        cpu: t.cpu,
        memory_bytes: t.memory_bytes,
        disks: &o.disks,
        nics: o
            .nics
            .iter()
            .map(|n| NicItem {
                id: n.id,
                name: n.name.clone(),
                network: n.network.clone(),
                mac: None,
                interface: n.interface,
                linked: n.linked,
                plugged: true,
            })
            .collect(),
    };
    write_hardware(&mut out, &t.id.to_string(), "other", &hw);
    out.push_str("</Content></ovf:Envelope>");
    out
}

// ------------------------------------------------------------------------------------------
// Reading.

fn invalid(entity: &str, what: impl Into<String>) -> OvfError {
    OvfError::Invalid {
        entity: entity.to_string(),
        what: what.into(),
    }
}

fn uuid_of<T: std::str::FromStr>(entity: &str, what: &str, s: &str) -> Result<T, OvfError> {
    s.trim()
        .parse()
        .map_err(|_| invalid(entity, format!("{what} {s:?} is not a UUID")))
}

fn flag(s: Option<&str>, default: bool) -> bool {
    s.map_or(default, |s| s.trim().eq_ignore_ascii_case("true"))
}

fn num<T: std::str::FromStr>(s: Option<&str>) -> Option<T> {
    s.and_then(|s| s.trim().parse().ok())
}

/// Sections by `xsi:type` (`ovf:DiskSection_Type` → `DiskSection_Type`).
fn section<'a>(e: &'a Elem, ty: &str) -> Option<&'a Elem> {
    e.children_named("Section")
        .find(|s| s.attr("type").is_some_and(|t| t.rsplit(':').next() == Some(ty)))
}

fn volumes_of(entity: &str, root: &Elem) -> Result<BTreeMap<DiskId, Vec<(Elem, VolUuid)>>, OvfError> {
    let mut out: BTreeMap<DiskId, Vec<(Elem, VolUuid)>> = BTreeMap::new();
    let Some(sec) = section(root, "DiskSection_Type").or_else(|| root.child("DiskSection")) else {
        return Ok(out);
    };
    for d in sec.children_named("Disk") {
        let file = d
            .attr("fileRef")
            .ok_or_else(|| invalid(entity, "a disk without fileRef"))?;
        let (img, vol) = file
            .split_once('/')
            .ok_or_else(|| invalid(entity, format!("fileRef {file:?} is not image/volume")))?;
        let img: DiskId = uuid_of(entity, "image", img)?;
        let vol: VolUuid = uuid_of(entity, "volume", vol)?;
        out.entry(img).or_default().push((d.clone(), vol));
    }
    Ok(out)
}

/// Disks: each image's volumes put in chain order by `parentRef`.
fn read_disks(
    entity: &str,
    root: &Elem,
    hw: Option<&Elem>,
    sd_hint: Option<SdUuid>,
) -> Result<Vec<OvfDisk>, OvfError> {
    // The hardware items give a disk's order and plugging.
    let mut items: Vec<(DiskId, &Elem)> = Vec::new();
    for it in hw.into_iter().flat_map(|h| h.children_named("Item")) {
        if it.str("ResourceType") == Some("17") {
            if let Some((img, _)) = it.str("HostResource").and_then(|h| h.split_once('/')) {
                if let Ok(img) = img.parse::<DiskId>() {
                    items.push((img, it));
                }
            }
        }
    }
    let by_image = volumes_of(entity, root)?;
    let mut order: Vec<DiskId> = items.iter().map(|(i, _)| *i).collect();
    for img in by_image.keys() {
        if !order.contains(img) {
            order.push(*img);
        }
    }
    let mut out = Vec::new();
    for img in order {
        let Some(vols) = by_image.get(&img) else {
            continue;
        };
        // Chain order: base (no parent in this image) first, then each child.
        let mut chain: Vec<&(Elem, VolUuid)> = Vec::new();
        let parent_of = |e: &Elem| -> Option<VolUuid> {
            e.attr("parentRef")
                .and_then(|p| p.rsplit('/').next())
                .and_then(|p| p.parse().ok())
        };
        let mut next = vols
            .iter()
            .find(|(e, _)| parent_of(e).is_none_or(|p| !vols.iter().any(|(_, v)| *v == p)));
        while let Some(v) = next {
            if chain.iter().any(|c| c.1 == v.1) {
                return Err(invalid(
                    entity,
                    format!("disk {img} has a loop in its volume chain"),
                ));
            }
            chain.push(v);
            next = vols.iter().find(|(e, _)| parent_of(e) == Some(v.1));
        }
        if chain.len() != vols.len() {
            return Err(invalid(
                entity,
                format!("disk {img}'s volumes do not form one chain"),
            ));
        }
        let (base, _) = chain[0];
        let (leaf, _) = chain[chain.len() - 1];
        let sd: SdUuid = match base.attr("storage-domain-id").filter(|s| !s.is_empty()) {
            Some(s) => uuid_of(entity, "storage domain", s)?,
            None => match items
                .iter()
                .find(|(i, _)| *i == img)
                .and_then(|(_, it)| it.str("StorageId"))
            {
                Some(s) => uuid_of(entity, "storage domain", s)?,
                None => {
                    sd_hint.ok_or_else(|| invalid(entity, format!("disk {img} names no storage domain")))?
                }
            },
        };
        let provisioned = num::<u64>(leaf.attr("provisioned-size"))
            .or_else(|| num::<u64>(leaf.attr("size")).map(|g| g * GIB))
            .unwrap_or(0);
        let fmt = |e: &Elem| {
            if e.attr("volume-format")
                .is_some_and(|f| f.eq_ignore_ascii_case("cow"))
            {
                DiskFormat::Cow
            } else {
                DiskFormat::Raw
            }
        };
        let alias = base
            .attr("disk-alias")
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| format!("disk-{}", &img.to_string()[..8]));
        let mut disk = Disk::new(&alias, sd, fmt(base), provisioned);
        disk.id = img;
        disk.description = base.attr("disk-description").unwrap_or_default().to_string();
        disk.sparse = !base
            .attr("volume-type")
            .is_some_and(|t| t.eq_ignore_ascii_case("preallocated"));
        disk.shareable = flag(base.attr("shareable"), false);
        disk.wipe_after_delete = flag(base.attr("wipe-after-delete"), false);
        disk.status = DiskStatus::Ok;
        if base.attr("disk-content-type") == Some("ISO") {
            disk.content_type = DiskContentType::Iso;
        }
        let n = chain.len();
        let volumes = chain
            .iter()
            .enumerate()
            .map(|(i, (e, id))| {
                let snap = e
                    .attr("vm_snapshot_id")
                    .and_then(|s| s.parse::<SnapshotId>().ok())
                    .filter(|s| !s.is_nil());
                let actual = num::<u64>(e.attr("volume-actual-size"))
                    .or_else(|| num::<u64>(e.attr("actual_size")).map(|g| g * GIB))
                    .unwrap_or(0);
                (
                    Volume {
                        id: *id,
                        disk_id: img,
                        storage_domain_id: sd,
                        parent_id: parent_of(e),
                        voltype: if i + 1 == n {
                            VolType::Leaf
                        } else {
                            VolType::Internal
                        },
                        format: fmt(e),
                        actual_size: actual,
                        created_at: Timestamp::from_millis(0),
                    },
                    snap,
                )
            })
            .collect::<Vec<_>>();
        disk.actual_size = volumes.iter().map(|(v, _)| v.actual_size).sum();
        let item = items.iter().find(|(i, _)| *i == img).map(|(_, it)| *it);
        out.push(OvfDisk {
            disk,
            volumes,
            interface: disk_interface_from(base.attr("disk-interface").unwrap_or("VirtIO")),
            bootable: flag(base.attr("boot"), false),
            read_only: flag(base.attr("read-only"), false)
                || item.is_some_and(|it| flag(it.str("IsReadOnly"), false)),
            active: item.is_none_or(|it| flag(it.str("IsPlugged"), true)),
        });
    }
    Ok(out)
}

struct NicItem {
    id: NicId,
    name: String,
    network: Option<String>,
    mac: Option<MacAddr>,
    interface: NicInterface,
    linked: bool,
    plugged: bool,
}

fn read_nics(entity: &str, hw: Option<&Elem>) -> Result<Vec<NicItem>, OvfError> {
    let mut out = Vec::new();
    for it in hw.into_iter().flat_map(|h| h.children_named("Item")) {
        if it.str("ResourceType") != Some("10") {
            continue;
        }
        let id = match it.str("InstanceId") {
            Some(s) => uuid_of(entity, "NIC", s)?,
            None => NicId::new_random(),
        };
        let name = it
            .str("Name")
            .or_else(|| it.str("ElementName"))
            .map(str::to_string)
            .unwrap_or_else(|| format!("nic{}", out.len() + 1));
        let network = it
            .str("Connection")
            .or_else(|| it.str("OtherResourceType"))
            .map(str::to_string);
        out.push(NicItem {
            id,
            name,
            network,
            mac: it.str("MACAddress").and_then(|m| m.parse().ok()),
            interface: nic_interface_from(it.str("ResourceSubType").unwrap_or("3")),
            linked: flag(it.str("Linked"), true),
            plugged: flag(it.str("IsPlugged"), true),
        });
    }
    Ok(out)
}

fn cpu_of(hw: Option<&Elem>) -> CpuTopology {
    let item = hw.and_then(|h| {
        h.children_named("Item")
            .find(|i| i.str("ResourceType") == Some("3"))
    });
    let Some(it) = item else {
        return CpuTopology::ONE;
    };
    let sockets = num(it.str("num_of_sockets"));
    let cores = num(it.str("cpu_per_socket"));
    let threads = num(it.str("threads_per_cpu")).unwrap_or(1);
    match (sockets, cores) {
        (Some(s), Some(c)) if s > 0 && c > 0 && threads > 0 => CpuTopology {
            sockets: s,
            cores: c,
            threads,
        },
        _ => CpuTopology {
            sockets: num(it.str("VirtualQuantity")).filter(|n| *n > 0).unwrap_or(1),
            cores: 1,
            threads: 1,
        },
    }
}

fn memory_of(hw: Option<&Elem>) -> u64 {
    hw.and_then(|h| {
        h.children_named("Item")
            .find(|i| i.str("ResourceType") == Some("4"))
    })
    .and_then(|it| num::<u64>(it.str("VirtualQuantity")))
    .filter(|m| *m > 0)
    .map_or(GIB, |m| m * MIB)
}

/// Reads the OVF of entity `id` (the store's file name without `.ovf`); `sd` is the domain
/// it came from, for disks whose OVF does not name theirs.
pub fn read(id: &str, xml: &[u8], sd: Option<SdUuid>) -> Result<OvfEntity, OvfError> {
    let root = crate::rest::input::parse_xml(xml).map_err(|e| OvfError::Xml {
        entity: id.to_string(),
        reason: e.detail,
    })?;
    let content = root.child("Content").ok_or_else(|| invalid(id, "no <Content>"))?;
    let name = content.string("Name").ok_or_else(|| invalid(id, "no <Name>"))?;
    let label = format!("{name} ({id})");
    let created = content
        .str("CreationDate")
        .and_then(Timestamp::from_ovf)
        .unwrap_or(Timestamp::from_millis(0));
    let hw = section(content, "VirtualHardwareSection_Type");
    let disks = read_disks(&label, &root, hw, sd)?;
    let nics = read_nics(&label, hw)?;
    let cluster_name = content.string("ClusterName").unwrap_or_default();
    let description = content.string("Description").unwrap_or_default();
    if content.child("TemplateType").is_some() {
        let tid: TemplateId = uuid_of(&label, "template", id)?;
        let template = Template {
            id: tid,
            name,
            description,
            cluster_id: None::<ClusterId>,
            memory_bytes: memory_of(hw),
            cpu: cpu_of(hw),
            status: TemplateStatus::Ok,
            created_at: created,
            revision: 0,
        };
        let nics = nics
            .into_iter()
            .map(|n| TemplateNic {
                id: n.id,
                template_id: tid,
                name: n.name,
                network: n.network.filter(|n| !n.is_empty()),
                interface: n.interface,
                linked: n.linked,
            })
            .collect();
        return Ok(OvfEntity::Template(Box::new(OvfTemplate {
            template,
            cluster_name,
            disks,
            nics,
        })));
    }
    let vid: VmId = uuid_of(&label, "VM", id)?;
    let os = section(content, "OperatingSystemSection_Type")
        .and_then(|s| s.string("Description"))
        .unwrap_or_else(|| "other".into());
    let memory_bytes = memory_of(hw);
    let mut vm = Vm::new(&name, ClusterId::nil());
    vm.id = vid;
    vm.description = description;
    vm.template_id = match content.str("TemplateId") {
        Some(t) => uuid_of(&label, "template", t)?,
        None => crate::model::BLANK_TEMPLATE_ID,
    };
    vm.memory_bytes = memory_bytes;
    vm.memory_guaranteed_bytes =
        num::<u64>(content.str("MinAllocatedMem")).map_or(memory_bytes, |m| (m * MIB).min(memory_bytes));
    vm.cpu = cpu_of(hw);
    vm.ha = HighAvailability {
        enabled: flag(content.str("AutoStartup"), false),
        priority: num(content.str("Priority")).unwrap_or(0),
    };
    vm.lease_storage_domain_id = content.str("LeaseDomainId").and_then(|s| s.parse().ok());
    vm.resume_behavior = content
        .str("ResumeBehavior")
        .and_then(|s| s.to_ascii_lowercase().parse().ok())
        .unwrap_or_default();
    vm.placement = Placement {
        affinity: match content.str("MigrationSupport") {
            Some("1") => PlacementAffinity::UserMigratable,
            Some("2") => PlacementAffinity::Pinned,
            _ => PlacementAffinity::Migratable,
        },
        hosts: content
            .str("DedicatedVmForVds")
            .unwrap_or("")
            .split(',')
            .filter_map(|h| h.trim().parse().ok())
            .collect(),
    };
    vm.os = VmOs {
        os_type: os,
        boot_devices: boot_devices(num(content.str("DefaultBootSequence")).unwrap_or(0)),
        kernel: content.string("KernelUrl"),
        initrd: content.string("InitrdUrl"),
        cmdline: content.string("KernelParams"),
    };
    vm.created_at = created;
    let mut nics_out = Vec::new();
    for n in nics {
        nics_out.push(Nic {
            id: n.id,
            vm_id: vid,
            name: n.name,
            network: n.network.filter(|n| !n.is_empty()),
            // A NIC without an address gets one from the pool when registered.
            mac: n.mac.unwrap_or(MacAddr([0; 6])),
            interface: n.interface,
            plugged: n.plugged,
            linked: n.linked,
        });
    }
    let mut snapshots = Vec::new();
    let mut memory = BTreeMap::new();
    for s in section(content, "SnapshotsSection_Type")
        .into_iter()
        .flat_map(|s| s.children_named("Snapshot"))
    {
        let sid: SnapshotId = uuid_of(&label, "snapshot", s.attr("id").unwrap_or(""))?;
        let snapshot_type = match s.str("Type").map(str::to_ascii_lowercase).as_deref() {
            Some("active") => SnapshotType::Active,
            Some("preview") => SnapshotType::Preview,
            _ => SnapshotType::Regular,
        };
        let disks = disks
            .iter()
            .flat_map(|d| {
                d.volumes
                    .iter()
                    .filter(|(_, snap)| *snap == Some(sid))
                    .map(|(v, _)| SnapshotDisk {
                        disk_id: d.disk.id,
                        volume_id: v.id,
                    })
            })
            .collect();
        if let Some(m) = s.str("Memory") {
            let parts: Vec<&str> = m.split(',').map(str::trim).collect();
            if let [sd, _pool, img, vol, ..] = parts.as_slice() {
                let sizes: serde_json::Value = s
                    .str("OxvirtMemory")
                    .and_then(|j| serde_json::from_str(j).ok())
                    .unwrap_or_default();
                memory.insert(
                    sid,
                    SnapshotMemory {
                        state: StateVolume {
                            sd: uuid_of(&label, "memory domain", sd)?,
                            img: uuid_of(&label, "memory image", img)?,
                            vol: uuid_of(&label, "memory volume", vol)?,
                        },
                        memory_bytes: sizes["memory_bytes"].as_u64().unwrap_or(memory_bytes),
                        cpus: sizes["cpus"]
                            .as_u64()
                            .and_then(|c| u32::try_from(c).ok())
                            .unwrap_or(vm.cpu.vcpus() as u32),
                    },
                );
            }
        }
        snapshots.push(Snapshot {
            id: sid,
            vm_id: vid,
            description: s.string("Description").unwrap_or_default(),
            snapshot_type,
            status: SnapshotStatus::Ok,
            persist_memory: memory.contains_key(&sid),
            configuration: s
                .str("OxvirtConfiguration")
                .and_then(|c| serde_json::from_str::<VmConfiguration>(c).ok()),
            disks,
            created_at: s
                .str("CreationDate")
                .and_then(Timestamp::from_ovf)
                .unwrap_or(created),
        });
    }
    Ok(OvfEntity::Vm(Box::new(OvfVm {
        vm,
        cluster_name,
        template_name: content.string("TemplateName").unwrap_or_default(),
        disks,
        nics: nics_out,
        snapshots,
        memory,
    })))
}

// ------------------------------------------------------------------------------------------
// The store's archive.

/// What an OVF store's tar holds: each entity's OVF by id, and the VMs' statuses oVirt keeps
/// in `metadata.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreContent {
    pub ovfs: BTreeMap<String, String>,
    /// oVirt's `VMStatus` numbers of VMs not down (Up = 1).
    pub vm_status: BTreeMap<String, i32>,
}

/// The tar of an OVF store for domain `sd`, written at `now`.
pub fn pack(content: &StoreContent, sd: SdUuid, now: Timestamp) -> Result<Vec<u8>, OvfError> {
    let arch = |e: std::io::Error| OvfError::Archive(e.to_string());
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| -> Result<(), OvfError> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(u64::try_from(now.as_millis() / 1000).unwrap_or(0));
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).map_err(arch)
    };
    let info = serde_json::json!({
        "Last Updated": now.to_java(),
        "Storage Domains": [{ "uuid": sd.to_string() }],
    });
    add(
        &mut b,
        "info.json",
        serde_json::to_string_pretty(&info).unwrap_or_default().as_bytes(),
    )?;
    for (id, ovf) in &content.ovfs {
        add(&mut b, &format!("{id}.ovf"), ovf.as_bytes())?;
    }
    let meta = serde_json::json!({ "VM Status": content.vm_status });
    add(
        &mut b,
        "metadata.json",
        serde_json::to_string(&meta).unwrap_or_default().as_bytes(),
    )?;
    b.into_inner().map_err(arch)
}

/// Reads a store's tar; files other than `*.ovf` and `metadata.json` are skipped.
pub fn unpack(data: &[u8]) -> Result<StoreContent, OvfError> {
    use std::io::Read;
    let arch = |e: std::io::Error| OvfError::Archive(e.to_string());
    let mut out = StoreContent::default();
    let mut a = tar::Archive::new(data);
    for entry in a.entries().map_err(arch)? {
        let mut entry = entry.map_err(arch)?;
        let name = entry.path().map_err(arch)?.to_string_lossy().into_owned();
        let mut text = String::new();
        entry.read_to_string(&mut text).map_err(arch)?;
        if name == "metadata.json" {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| OvfError::Archive(format!("metadata.json: {e}")))?;
            if let Some(m) = v["VM Status"].as_object() {
                for (k, s) in m {
                    if let Some(s) = s.as_i64().and_then(|s| i32::try_from(s).ok()) {
                        out.vm_status.insert(k.clone(), s);
                    }
                }
            }
        } else if let Some(id) = name.strip_suffix(".ovf") {
            out.ovfs.insert(id.to_string(), text);
        }
    }
    Ok(out)
}

/// The JSON an OVF store volume's DESCRIPTION carries (oVirt's keys). `size` and `updated`
/// are absent while the store is being written.
pub fn store_description(sd: SdUuid, size: Option<u64>, last_updated: Option<Timestamp>) -> String {
    let mut m = serde_json::Map::new();
    m.insert("Updated".into(), size.is_some().into());
    if let Some(s) = size {
        m.insert("Size".into(), s.into());
    }
    m.insert(
        "Last Updated".into(),
        last_updated.map_or(serde_json::Value::Null, |t| t.to_java().into()),
    );
    m.insert(
        "Storage Domains".into(),
        serde_json::json!([{ "uuid": sd.to_string() }]),
    );
    m.insert("Disk Description".into(), "OVF_STORE".into());
    serde_json::Value::Object(m).to_string()
}

/// A store volume's state read from its description: `Some((size, last updated))` when
/// complete and naming domain `sd`.
pub fn store_state(description: &str, sd: SdUuid) -> Option<(u64, Timestamp)> {
    let v: serde_json::Value = serde_json::from_str(description).ok()?;
    if v["Updated"].as_bool() != Some(true) {
        return None;
    }
    let domains = v["Storage Domains"].to_string();
    if !domains.contains(&sd.to_string()) {
        return None;
    }
    let size = v["Size"].as_u64()?;
    let at = Timestamp::from_java(v["Last Updated"].as_str()?)?;
    Some((size, at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HostUuid;

    fn disk(sd: SdUuid, name: &str, vols: usize, snaps: &[SnapshotId]) -> OvfDisk {
        let mut d = Disk::new(name, sd, DiskFormat::Cow, 3 * GIB);
        d.description = "root <disk> & more".into();
        let mut volumes = Vec::new();
        let mut parent = None;
        for i in 0..vols {
            let id = VolUuid::new_random();
            volumes.push((
                Volume {
                    id,
                    disk_id: d.id,
                    storage_domain_id: sd,
                    parent_id: parent,
                    voltype: if i + 1 == vols {
                        VolType::Leaf
                    } else {
                        VolType::Internal
                    },
                    format: DiskFormat::Cow,
                    actual_size: 5 * MIB * (i as u64 + 1),
                    created_at: Timestamp::from_millis(0),
                },
                snaps.get(i).copied(),
            ));
            parent = Some(id);
        }
        d.actual_size = volumes.iter().map(|(v, _)| v.actual_size).sum();
        OvfDisk {
            disk: d,
            volumes,
            interface: DiskInterface::VirtioScsi,
            bootable: true,
            read_only: false,
            active: true,
        }
    }

    fn sample_vm() -> OvfVm {
        let sd = SdUuid::new_random();
        let mut vm = Vm::new("web 1 <prod>", ClusterId::nil());
        vm.description = "front & back".into();
        vm.template_id = TemplateId::new_random();
        vm.memory_bytes = 2 * GIB;
        vm.memory_guaranteed_bytes = GIB;
        vm.cpu = CpuTopology {
            sockets: 2,
            cores: 2,
            threads: 1,
        };
        vm.ha = HighAvailability {
            enabled: true,
            priority: 50,
        };
        vm.lease_storage_domain_id = Some(sd);
        vm.resume_behavior = crate::model::ResumeBehavior::Kill;
        vm.placement = Placement {
            affinity: PlacementAffinity::Pinned,
            hosts: vec![HostUuid::new_random()],
        };
        vm.os = VmOs {
            os_type: "rhel_9x64".into(),
            boot_devices: vec![BootDevice::Cdrom, BootDevice::Hd],
            kernel: Some("/boot/vmlinuz".into()),
            initrd: None,
            cmdline: Some("console=ttyS0 quiet".into()),
        };
        vm.created_at = Timestamp::from_millis(1_700_000_000_000);
        let (s1, active) = (SnapshotId::new_random(), SnapshotId::new_random());
        let disks = vec![
            disk(sd, "web1_Disk1", 2, &[s1, active]),
            disk(sd, "web1_Disk2", 1, &[active]),
        ];
        let snapshots = vec![
            Snapshot {
                id: s1,
                vm_id: vm.id,
                description: "before upgrade".into(),
                snapshot_type: SnapshotType::Regular,
                status: SnapshotStatus::Ok,
                persist_memory: true,
                configuration: Some(vm.configuration()),
                disks: vec![SnapshotDisk {
                    disk_id: disks[0].disk.id,
                    volume_id: disks[0].volumes[0].0.id,
                }],
                created_at: Timestamp::from_millis(1_700_000_100_000),
            },
            Snapshot {
                id: active,
                vm_id: vm.id,
                description: "Active VM".into(),
                snapshot_type: SnapshotType::Active,
                status: SnapshotStatus::Ok,
                persist_memory: false,
                configuration: None,
                disks: vec![
                    SnapshotDisk {
                        disk_id: disks[0].disk.id,
                        volume_id: disks[0].volumes[1].0.id,
                    },
                    SnapshotDisk {
                        disk_id: disks[1].disk.id,
                        volume_id: disks[1].volumes[0].0.id,
                    },
                ],
                created_at: Timestamp::from_millis(1_700_000_000_000),
            },
        ];
        let nics = vec![Nic {
            id: NicId::new_random(),
            vm_id: vm.id,
            name: "nic1".into(),
            network: Some("ovirtmgmt".into()),
            mac: "56:6f:00:00:00:07".parse().unwrap(),
            interface: NicInterface::E1000,
            plugged: true,
            linked: false,
        }];
        let memory = BTreeMap::from([(
            s1,
            SnapshotMemory {
                state: StateVolume {
                    sd,
                    img: crate::model::ImgUuid::new_random(),
                    vol: VolUuid::new_random(),
                },
                memory_bytes: 2 * GIB,
                cpus: 4,
            },
        )]);
        OvfVm {
            vm,
            cluster_name: "Default".into(),
            template_name: "centos".into(),
            disks,
            nics,
            snapshots,
            memory,
        }
    }

    #[test]
    fn a_vm_reads_back_as_written() {
        let o = sample_vm();
        let xml = write_vm(&o);
        assert!(xml.contains("<ResumeBehavior>KILL</ResumeBehavior>"), "{xml}");
        let back = read(&o.vm.id.to_string(), xml.as_bytes(), None).unwrap();
        let OvfEntity::Vm(back) = back else {
            panic!("a VM reads back as a template");
        };
        assert_eq!(*back, o, "{xml}");
    }

    #[test]
    fn a_template_reads_back_as_written() {
        let sd = SdUuid::new_random();
        let mut t = Template::new("centos9", None);
        t.memory_bytes = 512 * MIB;
        t.created_at = Timestamp::from_millis(1_600_000_000_000);
        let mut d = disk(sd, "centos9_Disk1", 1, &[]);
        d.volumes[0].0.voltype = VolType::Leaf;
        let o = OvfTemplate {
            nics: vec![TemplateNic {
                id: NicId::new_random(),
                template_id: t.id,
                name: "nic1".into(),
                network: None,
                interface: NicInterface::Virtio,
                linked: true,
            }],
            template: t,
            cluster_name: "cl1".into(),
            disks: vec![d],
        };
        let xml = write_template(&o);
        let OvfEntity::Template(back) = read(&o.template.id.to_string(), xml.as_bytes(), None).unwrap()
        else {
            panic!("a template reads back as a VM");
        };
        assert_eq!(*back, o);
    }

    /// An OVF shaped as oVirt's engine writes it (its test resource `vmOvfData.xml`,
    /// abridged): sizes in GiB only, the domain from the hardware item, a NIC by number.
    #[test]
    fn an_ovf_written_by_ovirt_is_read() {
        let (vm, img, vol, sd, nic) = (
            "7f4ae4b0-6f2d-4b4f-9ae1-0f1c1ed4a111",
            "b1c5e2a9-1d6e-4b8a-8c7e-2c9e4a6f0d22",
            "c0ffee00-1d6e-4b8a-8c7e-2c9e4a6f0d33",
            "a0a0a0a0-1d6e-4b8a-8c7e-2c9e4a6f0d44",
            "d0d0d0d0-1d6e-4b8a-8c7e-2c9e4a6f0d55",
        );
        let xml = format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1/" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" ovf:version="4.4.0.0">
<References><File ovf:href="{img}/{vol}" ovf:id="{vol}" ovf:size="10737418240" ovf:description="Active VM" ovf:disk_storage_type="IMAGE" ovf:cinder_volume_type=""></File></References>
<Section xsi:type="ovf:NetworkSection_Type"><Info>The list of logical networks</Info><Network ovf:name="ovirtmgmt"></Network></Section>
<Section xsi:type="ovf:DiskSection_Type"><Info>List of Virtual Disks</Info><Disk ovf:diskId="{vol}" ovf:size="10" ovf:actual_size="1" ovf:vm_snapshot_id="00000000-0000-0000-0000-000000000000" ovf:parentRef="" ovf:fileRef="{img}/{vol}" ovf:format="http://www.vmware.com/specifications/vmdk.html#sparse" ovf:volume-format="COW" ovf:volume-type="Sparse" ovf:disk-interface="VirtIO" ovf:boot="true" ovf:disk-alias="rhel8_Disk1" ovf:disk-description="" ovf:wipe-after-delete="false"></Disk></Section>
<Content ovf:id="out" xsi:type="ovf:VirtualSystem_Type"><Name>rhel8</Name><TemplateId>00000000-0000-0000-0000-000000000000</TemplateId><TemplateName>Blank</TemplateName><Description></Description><CreationDate>2021/03/04 10:11:12</CreationDate><IsAutoSuspend>false</IsAutoSuspend><MinAllocatedMem>2048</MinAllocatedMem><ClusterName>Default</ClusterName><AutoStartup>false</AutoStartup><MigrationSupport>0</MigrationSupport>
<Section ovf:id="{vm}" ovf:required="false" xsi:type="ovf:OperatingSystemSection_Type"><Info>Guest Operating System</Info><Description>rhel_8x64</Description></Section>
<Section xsi:type="ovf:VirtualHardwareSection_Type"><Info>2 CPU, 4096 Memory</Info><System><vssd:VirtualSystemType>ENGINE 4.4.0.0</vssd:VirtualSystemType></System>
<Item><rasd:Caption>2 virtual cpu</rasd:Caption><rasd:InstanceId>1</rasd:InstanceId><rasd:ResourceType>3</rasd:ResourceType><rasd:num_of_sockets>2</rasd:num_of_sockets><rasd:cpu_per_socket>1</rasd:cpu_per_socket><rasd:threads_per_cpu>1</rasd:threads_per_cpu><rasd:max_num_of_vcpus>16</rasd:max_num_of_vcpus><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
<Item><rasd:Caption>4096 MB of memory</rasd:Caption><rasd:InstanceId>2</rasd:InstanceId><rasd:ResourceType>4</rasd:ResourceType><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:VirtualQuantity>4096</rasd:VirtualQuantity></Item>
<Item><rasd:Caption>rhel8_Disk1</rasd:Caption><rasd:InstanceId>{vol}</rasd:InstanceId><rasd:ResourceType>17</rasd:ResourceType><rasd:HostResource>{img}/{vol}</rasd:HostResource><rasd:Parent>00000000-0000-0000-0000-000000000000</rasd:Parent><rasd:StorageId>{sd}</rasd:StorageId><Type>disk</Type><Device>disk</Device><BootOrder>1</BootOrder><IsPlugged>true</IsPlugged><IsReadOnly>false</IsReadOnly></Item>
<Item><rasd:Caption>Ethernet adapter on ovirtmgmt</rasd:Caption><rasd:InstanceId>{nic}</rasd:InstanceId><rasd:ResourceType>10</rasd:ResourceType><rasd:ResourceSubType>3</rasd:ResourceSubType><rasd:Connection>ovirtmgmt</rasd:Connection><rasd:Linked>true</rasd:Linked><rasd:Name>nic1</rasd:Name><rasd:MACAddress>56:6f:1a:2b:3c:4d</rasd:MACAddress><IsPlugged>true</IsPlugged></Item>
</Section><Section xsi:type="ovf:SnapshotsSection_Type"><Snapshot ovf:id="e0e0e0e0-1d6e-4b8a-8c7e-2c9e4a6f0d66"><Type>ACTIVE</Type><Description>Active VM</Description><CreationDate>2021/03/04 10:11:12</CreationDate></Snapshot></Section></Content></ovf:Envelope>"#
        );
        let OvfEntity::Vm(o) = read(vm, xml.as_bytes(), None).unwrap() else {
            panic!("not a VM");
        };
        assert_eq!(o.vm.name, "rhel8");
        assert_eq!(o.vm.memory_bytes, 4096 * MIB);
        assert_eq!(o.vm.memory_guaranteed_bytes, 2048 * MIB);
        assert_eq!(o.vm.cpu.vcpus(), 2);
        assert_eq!(o.vm.os.os_type, "rhel_8x64");
        assert_eq!(o.cluster_name, "Default");
        assert_eq!(o.disks.len(), 1);
        let d = &o.disks[0];
        assert_eq!(
            (
                d.disk.name.as_str(),
                d.disk.provisioned_size,
                d.disk.storage_domain_id.to_string()
            ),
            ("rhel8_Disk1", 10 * GIB, sd.to_string())
        );
        assert_eq!(d.volumes.len(), 1);
        assert_eq!(d.volumes[0].0.id.to_string(), vol);
        assert_eq!(o.nics.len(), 1);
        assert_eq!(o.nics[0].mac.to_string(), "56:6f:1a:2b:3c:4d");
        assert_eq!(o.nics[0].network.as_deref(), Some("ovirtmgmt"));
        assert_eq!(o.snapshots.len(), 1);
        assert_eq!(o.snapshots[0].snapshot_type, SnapshotType::Active);
    }

    #[test]
    fn broken_ovfs_are_errors_naming_the_entity() {
        let id = VmId::new_random().to_string();
        let e = read(&id, b"<ovf:Envelope><Content>", None).unwrap_err();
        assert!(e.to_string().contains(&id), "{e}");
        let e = read(
            &id,
            b"<Envelope><Content><Description/></Content></Envelope>",
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no <Name>"), "{e}");
        let e = read(
            "not-a-uuid",
            b"<Envelope><Content><Name>x</Name></Content></Envelope>",
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a UUID"), "{e}");
    }

    #[test]
    fn the_store_archive_round_trips_and_describes_itself() {
        let sd = SdUuid::new_random();
        let mut c = StoreContent::default();
        let o = sample_vm();
        c.ovfs.insert(o.vm.id.to_string(), write_vm(&o));
        c.vm_status.insert(o.vm.id.to_string(), 1);
        let now = Timestamp::from_millis(1_796_676_103_000);
        let tar = pack(&c, sd, now).unwrap();
        assert_eq!(tar.len() % 512, 0, "whole records");
        assert_eq!(unpack(&tar).unwrap(), c);
        // Zeros after the archive (the rest of the store volume) are not read as entries.
        let mut padded = tar.clone();
        padded.resize(tar.len() + 8192, 0);
        assert_eq!(unpack(&padded).unwrap(), c);

        let d = store_description(sd, Some(tar.len() as u64), Some(now));
        assert!(d.len() <= 210, "{d}");
        assert_eq!(store_state(&d, sd), Some((tar.len() as u64, now)));
        assert_eq!(
            store_state(&store_description(sd, None, Some(now)), sd),
            None,
            "being written"
        );
        assert_eq!(store_state(&d, SdUuid::new_random()), None, "another domain's");
        // oVirt's own wording parses too.
        let ovirt = format!(
            r#"{{"Updated":true,"Size":10240,"Last Updated":"Thu Feb 18 00:23:07 IST 2016","Storage Domains":[{{"uuid":"{sd}"}}],"Disk Description":"OVF_STORE"}}"#
        );
        assert_eq!(store_state(&ovirt, sd).map(|s| s.0), Some(10240));
    }
}
