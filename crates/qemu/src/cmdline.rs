//! A VM description and the QEMU command line that runs it.
//!
//! [`VmSpec`] is what the node knows about a VM it runs; [`VmSpec::to_args`] is a pure function
//! from it to `qemu-system-x86_64` arguments, so the exact command line is unit-tested and shows
//! up verbatim in logs. Disks are given as volume chains and opened with `-blockdev`: one
//! protocol node and one format node per layer, each format node naming its backing node
//! explicitly, so QEMU never follows a backing-file string on its own.
//!
//! Node names are derived from the disk index and the layer's position so they are stable across
//! node restarts (recovery finds them again by name) and fit QEMU's 31-character limit.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::accel::Accel;

/// The id of the remote console's VNC server (see [`VmSpec::vnc_remote`]).
pub const REMOTE_VNC: &str = "remote";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    /// SMBIOS UUID the guest sees; the engine's VM id.
    pub uuid: String,
    /// The vCPUs the VM starts with (QEMU's `-smp cpus`).
    pub cpus: u16,
    /// How many vCPUs the VM may have (`-smp maxcpus`): room for hot plugged ones. `None`:
    /// `cpus`, none can be added.
    #[serde(default)]
    pub max_cpus: Option<u16>,
    /// vCPUs hot plugged into the running VM, added again on a migration destination or a
    /// restart from a saved state so the devices match.
    #[serde(default)]
    pub cpu_devices: Vec<CpuDevice>,
    /// The memory the VM starts with (`-m size`).
    pub memory_mib: u64,
    /// The most memory hot plugged DIMMs may bring it to (`-m maxmem`, with [`MEMORY_SLOTS`]
    /// slots); `None` (or no more than `memory_mib`): nothing can be added.
    #[serde(default)]
    pub max_memory_mib: Option<u64>,
    /// DIMMs hot plugged into the running VM, added again on a migration destination.
    #[serde(default)]
    pub dimms: Vec<Dimm>,
    /// Must be resolved (`Kvm` or `Tcg`) before building the command line.
    pub accel: Accel,
    pub boot: Boot,
    pub disks: Vec<DiskSpec>,
    /// QMP control socket.
    pub qmp_socket: PathBuf,
    /// Serial console written to this file.
    pub serial_log: Option<PathBuf>,
    /// VNC display on a local UNIX socket.
    pub vnc_socket: Option<PathBuf>,
    /// A second VNC server, `remote` ([`REMOTE_VNC`]), for remote consoles: on this address,
    /// the first free port from 5900, password required (none is set until a ticket is given
    /// with `set_password`, so nobody gets in before).
    pub vnc_remote: Option<String>,
    pub balloon: bool,
    /// QEMU writes its pid here; recovery uses it.
    pub pid_file: Option<PathBuf>,
    /// `-incoming` URI for a migration destination (e.g. `tcp:127.0.0.1:49152`, `defer`).
    pub incoming: Option<String>,
    /// `-S`: the guest does not run until `cont`. On a migration destination it stays paused
    /// after the stream completes (until the node holds the VM's leases).
    #[serde(default)]
    pub start_paused: bool,
    pub nics: Vec<NicSpec>,
    /// PCIe root ports reserved for NICs (`nicport<slot>`), so NICs can be hot plugged and
    /// unplugged and keep their PCI address across migration. 0: NICs sit on the root bus
    /// (no hotplug).
    #[serde(default)]
    pub nic_ports: u8,
    /// PCIe root ports reserved for disks (`diskport<slot>`), so disks can be hot plugged and
    /// unplugged and keep their PCI address across migration. 0: disks sit on the root bus
    /// (no hotplug).
    #[serde(default)]
    pub disk_ports: u8,
    /// The QEMU guest agent's virtio-serial channel (`org.qemu.guest_agent.0`), served on this
    /// UNIX socket to the node.
    pub guest_agent_socket: Option<PathBuf>,
    /// The CD-ROM drive, if the VM has one (empty or holding an ISO).
    #[serde(default)]
    pub cdrom: Option<CdromSpec>,
    /// The firmware's boot order with [`Boot::Disk`] (the first disk is `Hd`); empty: the
    /// first disk alone.
    #[serde(default)]
    pub boot_order: Vec<BootDevice>,
}

/// A hot plugged vCPU: QEMU's device of type `driver` (the CPU model's, e.g.
/// `qemu64-x86_64-cpu`) with id `id` in the slot `props` names (`socket-id`, `core-id`,
/// `thread-id`…, as `query-hotpluggable-cpus` lists them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuDevice {
    pub id: String,
    pub driver: String,
    pub props: std::collections::BTreeMap<String, i64>,
}

impl CpuDevice {
    /// The device as `device_add` and `-device` take it.
    pub fn device_json(&self) -> serde_json::Value {
        let mut d = serde_json::json!({ "driver": self.driver, "id": self.id });
        for (k, v) in &self.props {
            d[k.as_str()] = (*v).into();
        }
        d
    }
}

/// DIMM slots of a VM whose memory can grow (oVirt's 16).
pub const MEMORY_SLOTS: usize = 16;

/// A hot plugged DIMM: `pc-dimm` device `id` backed by RAM object `mem-<id>` of `size_mib`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dimm {
    pub id: String,
    pub size_mib: u64,
}

impl Dimm {
    /// The memory backend, as `object-add` and `-object` take it.
    pub fn backend_json(&self) -> serde_json::Value {
        serde_json::json!({
            "qom-type": "memory-backend-ram",
            "id": format!("mem-{}", self.id),
            "size": self.size_mib << 20,
        })
    }

    /// The device, as `device_add` and `-device` take it.
    pub fn device_json(&self) -> serde_json::Value {
        serde_json::json!({ "driver": "pc-dimm", "id": self.id, "memdev": format!("mem-{}", self.id) })
    }
}

/// A device the firmware may boot from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    /// The VM's first disk.
    Hd,
    Cdrom,
}

/// The CD-ROM drive: its controller and the ISO in it. Its media can be changed on a running
/// VM ([`cdrom_media_blockdev`], then `blockdev-insert-medium` on [`CDROM_DEVICE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdromSpec {
    pub bus: CdromBus,
    /// The ISO (a raw file, opened read-only); `None`: an empty drive.
    pub media: Option<PathBuf>,
    /// Numbers the media's block node (`cd-<generation>`): each change of media opens a node
    /// under a new name, as the old one may still be closing.
    #[serde(default)]
    pub generation: u32,
}

/// Where the CD-ROM sits: on the virtio-scsi controller (SCSI id [`CDROM_SCSI_ID`]; guests with
/// virtio drivers, which every current Linux installer has) or on SATA port [`CDROM_SATA_PORT`]
/// (what an OS without virtio drivers, such as a Windows installer, can read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CdromBus {
    #[default]
    Scsi,
    Sata,
}

/// The CD-ROM's QEMU device id (what the tray and medium commands name).
pub const CDROM_DEVICE: &str = "cdrom0";
/// The CD-ROM's SCSI id: past every disk slot's.
pub const CDROM_SCSI_ID: usize = 16;
/// The CD-ROM's SATA port: the last, as SATA disks take the lowest.
pub const CDROM_SATA_PORT: usize = SATA_PORTS - 1;
/// Prefix of the CD-ROM media's block node names.
pub const CDROM_NODE_PREFIX: &str = "cd-";

/// The block node of a CD-ROM's media: a raw read-only format node over its file, as one
/// `blockdev-add` (deleting the format node closes the file too).
pub fn cdrom_media_blockdev(path: &Path, generation: u32) -> serde_json::Value {
    serde_json::json!({
        "driver": "raw",
        "node-name": format!("{CDROM_NODE_PREFIX}{generation}"),
        "read-only": true,
        "file": { "driver": "file", "filename": path, "read-only": true },
    })
}

/// The CD-ROM device on `drive` (none: empty).
pub fn cdrom_device_json(cd: &CdromSpec, drive: Option<&str>) -> serde_json::Value {
    let mut dev = serde_json::json!({ "id": CDROM_DEVICE });
    match cd.bus {
        CdromBus::Scsi => {
            dev["driver"] = "scsi-cd".into();
            dev["bus"] = format!("{SCSI_CONTROLLER}.0").into();
            dev["channel"] = 0.into();
            dev["scsi-id"] = CDROM_SCSI_ID.into();
            dev["lun"] = 0.into();
        }
        CdromBus::Sata => {
            dev["driver"] = "ide-cd".into();
            dev["bus"] = format!("ide.{CDROM_SATA_PORT}").into();
        }
    }
    if let Some(d) = drive {
        dev["drive"] = d.into();
    }
    dev
}

/// A virtio network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// `52:54:00:xx:xx:xx`; must stay the same across migration.
    pub mac: String,
    pub backend: NicBackend,
    /// Stable position: ids `nic<slot>`/`net<slot>` and, with [`VmSpec::nic_ports`], the root
    /// port `nicport<slot>`. `None`: the NIC's index. Kept across hot unplugs of other NICs, so
    /// the destination of a migration builds the same devices.
    #[serde(default)]
    pub slot: Option<u8>,
    /// Link state the guest sees. Not a command-line property: applied over QMP (`set_link`)
    /// right after start; migration carries it in virtio-net's state.
    #[serde(default = "link_up")]
    pub link_up: bool,
}

fn link_up() -> bool {
    true
}

impl NicSpec {
    /// A NIC at `slot` with its link up.
    pub fn new(mac: &str, backend: NicBackend) -> NicSpec {
        NicSpec {
            mac: mac.to_string(),
            backend,
            slot: None,
            link_up: true,
        }
    }

    /// The tap QEMU opens, for tap-backed NICs.
    pub fn tap(&self) -> Option<&str> {
        match &self.backend {
            NicBackend::User => None,
            NicBackend::Tap { ifname } => Some(ifname),
            NicBackend::Network { tap, .. } => Some(tap),
        }
    }

    /// `-netdev`'s value (also `netdev_add`'s arguments, see [`nic_netdev_json`]).
    fn netdev_arg(&self, slot: u8) -> String {
        match self.tap() {
            None => format!("user,id={}", nic_netdev_id(slot)),
            Some(ifname) => format!(
                "tap,id={},ifname={ifname},script=no,downscript=no",
                nic_netdev_id(slot)
            ),
        }
    }
}

/// QMP `netdev_add` arguments for NIC `nic` at `slot` (hot plug).
pub fn nic_netdev_json(slot: u8, nic: &NicSpec) -> serde_json::Value {
    match nic.tap() {
        None => serde_json::json!({ "type": "user", "id": nic_netdev_id(slot) }),
        Some(ifname) => serde_json::json!({
            "type": "tap", "id": nic_netdev_id(slot), "ifname": ifname,
            "script": "no", "downscript": "no",
        }),
    }
}

/// QMP `device_add` arguments for NIC `nic` at `slot` on its root port (hot plug).
pub fn nic_device_json(slot: u8, nic: &NicSpec) -> serde_json::Value {
    serde_json::json!({
        "driver": "virtio-net-pci", "id": nic_device_id_of_slot(slot), "netdev": nic_netdev_id(slot),
        "mac": nic.mac, "bus": nic_port_id(slot), "romfile": "",
    })
}

/// The root port a NIC slot plugs into.
pub fn nic_port_id(slot: u8) -> String {
    format!("nicport{slot}")
}

/// QEMU netdev id of a NIC slot.
pub fn nic_netdev_id(slot: u8) -> String {
    format!("net{slot}")
}

/// QEMU device id of a NIC slot (what `set_link` and `device_del` name).
pub fn nic_device_id_of_slot(slot: u8) -> String {
    format!("nic{slot}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NicBackend {
    /// QEMU's user-mode network (no host setup, no privileges).
    User,
    /// An existing tap device the node created and plugged into a bridge beforehand (QEMU runs
    /// no scripts: the sandbox denies it spawning helpers).
    Tap { ifname: String },
    /// A tap on logical network `network`'s bridge, which the node creates as `tap` before
    /// QEMU starts (and deletes after it ends). On the command line, the same as `Tap`.
    Network { network: String, tap: String },
}

/// What the virtual disk does when the host cannot complete a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WriteErrorPolicy {
    /// Pass the error to the guest.
    Report,
    /// Pause the VM (run state `io-error`) on ENOSPC so a thin volume can be extended and the
    /// write retried on `cont`; report any other error. The guest never sees ENOSPC.
    #[default]
    StopOnEnospc,
    /// Pause the VM on any read or write error (VDSM's `error_policy='stop'`).
    Stop,
}

impl WriteErrorPolicy {
    fn qemu_name(self) -> &'static str {
        match self {
            Self::Report => "report",
            Self::StopOnEnospc => "enospc",
            Self::Stop => "stop",
        }
    }

    /// Reads fail the same way as writes under `Stop`; otherwise the guest sees them.
    fn read_error_name(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Report | Self::StopOnEnospc => "report",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Boot {
    /// Boot from the first disk through the firmware.
    Disk,
    /// Direct kernel boot (the test guest, appliance images).
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        append: String,
    },
}

/// One virtual disk: the chain of layers, base first, the active (writable) layer last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    pub layers: Vec<LayerSpec>,
    /// Guest-visible serial (oVirt uses the image id's first 20 characters).
    pub serial: Option<String>,
    pub read_only: bool,
    /// Open with O_DIRECT (cache=none). Callers set it from a probe of the file system.
    pub direct_io: bool,
    #[serde(default)]
    pub write_error: WriteErrorPolicy,
    /// Stable position: device id `disk<slot>`, node names `d<slot>-…` and, with
    /// [`VmSpec::disk_ports`], the root port `diskport<slot>`. `None`: the disk's index. Kept
    /// across hot unplugs of other disks, so a migration destination builds the same devices.
    #[serde(default)]
    pub slot: Option<u8>,
    /// The controller the guest sees the disk on.
    #[serde(default)]
    pub bus: DiskBus,
}

/// The controller a disk is on, as oVirt's disk interfaces: `virtio` (virtio-blk, `/dev/vdX`),
/// `virtio_scsi` (a LUN on the VM's virtio-scsi controller, `/dev/sdX`), `sata` (a port of the
/// q35 chipset's AHCI controller; not hot pluggable, as in oVirt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DiskBus {
    #[default]
    VirtioBlk,
    VirtioScsi,
    Sata,
}

impl DiskBus {
    /// Whether a disk on this bus can be plugged into, or unplugged from, a running VM.
    pub fn hot_pluggable(self) -> bool {
        !matches!(self, DiskBus::Sata)
    }
}

/// The id of the virtio-scsi controller (bus `scsi0.0`).
pub const SCSI_CONTROLLER: &str = "scsi0";
/// How many SATA ports q35's AHCI controller has (buses `ide.0` … `ide.5`): a SATA disk's slot
/// is its port.
pub const SATA_PORTS: usize = 6;

/// A disk's slot: its own, or its index.
pub fn disk_slot(index: usize, disk: &DiskSpec) -> usize {
    disk.slot.map_or(index, usize::from)
}

/// The root port a disk slot plugs into.
pub fn disk_port_id(slot: usize) -> String {
    format!("diskport{slot}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSpec {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub protocol: BlockProtocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    pub fn driver(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// How QEMU reaches a layer's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockProtocol {
    /// A regular file.
    File,
    /// A block device (a logical volume, or a loop device standing in for one).
    HostDevice,
}

impl BlockProtocol {
    pub fn driver(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::HostDevice => "host_device",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("VM {vm:?}: accelerator must be resolved to kvm or tcg before building a command line")]
    UnresolvedAccel { vm: String },
    #[error("VM {vm:?}: disk {disk} has no layers")]
    EmptyDisk { vm: String, disk: usize },
    #[error("VM {vm:?}: a raw layer can only be the base of disk {disk}")]
    RawOverlay { vm: String, disk: usize },
    #[error("VM {vm:?}: {what} must be at least 1")]
    Zero { vm: String, what: &'static str },
    #[error("VM {vm:?}: name may contain only letters, digits, '-', '_' and '.'")]
    BadName { vm: String },
    #[error("VM {vm:?}: disk {disk} lists the same file twice in its chain")]
    RepeatedLayer { vm: String, disk: usize },
    #[error("VM {vm:?}: NIC {nic} has an invalid MAC address {mac:?}")]
    BadMac { vm: String, nic: usize, mac: String },
    #[error("VM {vm:?}: NIC {nic} has an invalid tap name {ifname:?}")]
    BadTap { vm: String, nic: usize, ifname: String },
    #[error("VM {vm:?}: NIC {nic}'s slot {slot} is taken or outside the VM's {ports} NIC ports")]
    BadNicSlot {
        vm: String,
        nic: usize,
        slot: u8,
        ports: u8,
    },
    #[error("VM {vm:?}: disk {disk}'s slot {slot} is taken or outside the VM's {ports} disk ports")]
    BadDiskSlot {
        vm: String,
        disk: usize,
        slot: usize,
        ports: u8,
    },
    #[error("VM {vm:?}: path {path:?} contains a ',' which QEMU's option syntax cannot carry")]
    CommaInPath { vm: String, path: PathBuf },
    #[error("VM {vm:?}: SATA disk {disk}'s slot {slot} is past the {SATA_PORTS} SATA ports")]
    BadSataSlot { vm: String, disk: usize, slot: usize },
    #[error("VM {vm:?}: SATA disk {disk} is on port {CDROM_SATA_PORT}, the SATA CD-ROM's")]
    SataPortOfCdrom { vm: String, disk: usize },
    #[error("VM {vm:?}: {cpus} vCPUs, more than its maximum {max}")]
    TooManyCpus { vm: String, cpus: usize, max: u16 },
    #[error("VM {vm:?}: {mib} MiB in {dimms} DIMMs, past its maximum {max} MiB or {MEMORY_SLOTS} slots")]
    TooMuchMemory {
        vm: String,
        mib: u64,
        dimms: usize,
        max: u64,
    },
}

/// QEMU device id of a NIC.
pub fn nic_device_id(nic: usize) -> String {
    format!("nic{nic}")
}

/// A NIC's slot: its own, or its index.
pub fn nic_slot(index: usize, nic: &NicSpec) -> u8 {
    nic.slot.unwrap_or(index as u8)
}

/// The guest agent's virtio-serial port name, which the agent in the guest looks for.
pub const GUEST_AGENT_PORT: &str = "org.qemu.guest_agent.0";

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        // The multicast bit must be clear for a unicast NIC address.
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// QEMU node name of a layer's format node: `d<slot>-<hash of the layer's path>`, `disk` being
/// the disk's slot ([`disk_slot`]).
///
/// Derived from the path, not the layer's position, so a name stays valid while live snapshots
/// add layers and live merges remove them, and a restarted node finds every node again from the
/// chain alone. A layer's path is unique within a VM, and the name fits QEMU's 31 characters.
pub fn format_node_name(disk: usize, path: &Path) -> String {
    format!("d{disk}-{:016x}", fnv1a(path.as_os_str().as_encoded_bytes()))
}

/// QEMU node name of a layer's protocol node.
pub fn protocol_node_name(disk: usize, path: &Path) -> String {
    format!("{}-file", format_node_name(disk, path))
}

/// FNV-1a: stable across builds and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// The protocol and format nodes of one layer, as `-blockdev` and `blockdev-add` take them.
///
/// `backing` is the format node name of the layer below (`None` for a base, which then opens
/// with no backing at all; the image's own backing-file string is never followed). Layers below
/// the top are read-only, but their files open with `auto-read-only` so that a live merge can
/// reopen its base for writing.
pub fn layer_blockdevs(
    slot: usize,
    disk: &DiskSpec,
    layer: &LayerSpec,
    backing: Option<&str>,
    top: bool,
) -> (serde_json::Value, serde_json::Value) {
    let cache = serde_json::json!({ "direct": disk.direct_io, "no-flush": false });
    let file = serde_json::json!({
        "driver": layer.protocol.driver(),
        "node-name": protocol_node_name(slot, &layer.path),
        "filename": layer.path,
        "read-only": disk.read_only,
        "auto-read-only": !disk.read_only && !top,
        "cache": cache,
        "discard": "unmap",
    });
    let mut fmt = serde_json::json!({
        "driver": layer.format.driver(),
        "node-name": format_node_name(slot, &layer.path),
        "file": protocol_node_name(slot, &layer.path),
        "read-only": disk.read_only || !top,
        "cache": cache,
        "discard": "unmap",
    });
    if layer.format == ImageFormat::Qcow2 {
        fmt["backing"] = backing.map_or(serde_json::Value::Null, Into::into);
    }
    (file, fmt)
}

/// Every block node of `disk` at `slot` in the order they open (base first, each layer's
/// protocol node before its format node), and the top format node's name, which the device
/// uses: what `-blockdev` and `blockdev-add` take.
pub fn disk_blockdevs(slot: usize, disk: &DiskSpec) -> (Vec<serde_json::Value>, String) {
    let mut nodes = Vec::with_capacity(2 * disk.layers.len());
    let mut below: Option<String> = None;
    for (i, layer) in disk.layers.iter().enumerate() {
        let top = i + 1 == disk.layers.len();
        let (file, fmt) = layer_blockdevs(slot, disk, layer, below.as_deref(), top);
        nodes.extend([file, fmt]);
        below = Some(format_node_name(slot, &layer.path));
    }
    (nodes, below.unwrap_or_default())
}

/// QEMU device id of a disk slot.
pub fn disk_device_id(slot: usize) -> String {
    format!("disk{slot}")
}

/// The device of disk `disk` at `slot` on the format node `drive`, as QMP's `device_add`
/// takes it: a `virtio-blk-pci` (`port`: on its root port, else the root bus), a `scsi-hd`
/// with the slot as its SCSI id on the virtio-scsi controller, or an `ide-hd` on SATA port
/// `slot`. The command line passes the same properties.
pub fn disk_device_json(slot: usize, disk: &DiskSpec, drive: &str, port: bool) -> serde_json::Value {
    let mut dev = serde_json::json!({
        "drive": drive, "id": disk_device_id(slot),
        "werror": disk.write_error.qemu_name(), "rerror": disk.write_error.read_error_name(),
    });
    match disk.bus {
        DiskBus::VirtioBlk => {
            dev["driver"] = "virtio-blk-pci".into();
            if port {
                dev["bus"] = disk_port_id(slot).into();
            }
        }
        DiskBus::VirtioScsi => {
            dev["driver"] = "scsi-hd".into();
            dev["bus"] = format!("{SCSI_CONTROLLER}.0").into();
            dev["channel"] = 0.into();
            dev["scsi-id"] = slot.into();
            dev["lun"] = 0.into();
        }
        DiskBus::Sata => {
            dev["driver"] = "ide-hd".into();
            dev["bus"] = format!("ide.{slot}").into();
        }
    }
    if let Some(s) = &disk.serial {
        dev["serial"] = s.as_str().into();
    }
    dev
}

impl VmSpec {
    /// Whether the VM gets the virtio-scsi controller: when a disk is on it, or when disks can
    /// be hot plugged (one may be a SCSI disk; the controller itself cannot be added later).
    pub fn scsi_controller(&self) -> bool {
        self.disk_ports > 0
            || self.disks.iter().any(|d| d.bus == DiskBus::VirtioScsi)
            || self.cdrom.as_ref().is_some_and(|c| c.bus == CdromBus::Scsi)
    }

    /// The `bootindex` of `dev` under [`Boot::Disk`] (none under a kernel boot, or when the
    /// order leaves the device out).
    fn boot_index(&self, dev: BootDevice) -> Option<usize> {
        if self.boot != Boot::Disk {
            return None;
        }
        if self.boot_order.is_empty() {
            return (dev == BootDevice::Hd).then_some(1);
        }
        self.boot_order.iter().position(|d| *d == dev).map(|i| i + 1)
    }
}

impl VmSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let vm = || self.name.clone();
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(SpecError::BadName { vm: vm() });
        }
        if self.accel == Accel::Auto {
            return Err(SpecError::UnresolvedAccel { vm: vm() });
        }
        if self.cpus == 0 {
            return Err(SpecError::Zero {
                vm: vm(),
                what: "cpus",
            });
        }
        let max = self.max_cpus.unwrap_or(self.cpus);
        if usize::from(self.cpus) + self.cpu_devices.len() > usize::from(max) {
            return Err(SpecError::TooManyCpus {
                vm: vm(),
                cpus: usize::from(self.cpus) + self.cpu_devices.len(),
                max,
            });
        }
        if self.memory_mib == 0 {
            return Err(SpecError::Zero {
                vm: vm(),
                what: "memory",
            });
        }
        let total = self.memory_mib + self.dimms.iter().map(|d| d.size_mib).sum::<u64>();
        let max = self.max_memory_mib.unwrap_or(self.memory_mib);
        if total > max
            || self.dimms.len() > MEMORY_SLOTS
            || (!self.dimms.is_empty() && self.max_memory_mib.is_none())
        {
            return Err(SpecError::TooMuchMemory {
                vm: vm(),
                mib: total,
                dimms: self.dimms.len(),
                max,
            });
        }
        for (i, n) in self.nics.iter().enumerate() {
            if !valid_mac(&n.mac) {
                return Err(SpecError::BadMac {
                    vm: vm(),
                    nic: i,
                    mac: n.mac.clone(),
                });
            }
            if let Some(ifname) = n.tap() {
                if ifname.is_empty()
                    || ifname.len() > 15
                    || !ifname
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    return Err(SpecError::BadTap {
                        vm: vm(),
                        nic: i,
                        ifname: ifname.to_string(),
                    });
                }
            }
        }
        let mut slots: Vec<u8> = Vec::new();
        for (i, n) in self.nics.iter().enumerate() {
            let slot = nic_slot(i, n);
            if slots.contains(&slot) || (self.nic_ports > 0 && slot >= self.nic_ports) {
                return Err(SpecError::BadNicSlot {
                    vm: vm(),
                    nic: i,
                    slot,
                    ports: self.nic_ports,
                });
            }
            slots.push(slot);
        }
        let mut slots: Vec<usize> = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let slot = disk_slot(i, d);
            if slots.contains(&slot) || (self.disk_ports > 0 && slot >= usize::from(self.disk_ports)) {
                return Err(SpecError::BadDiskSlot {
                    vm: vm(),
                    disk: i,
                    slot,
                    ports: self.disk_ports,
                });
            }
            if d.bus == DiskBus::Sata && slot >= SATA_PORTS {
                return Err(SpecError::BadSataSlot {
                    vm: vm(),
                    disk: i,
                    slot,
                });
            }
            if d.bus == DiskBus::Sata
                && slot == CDROM_SATA_PORT
                && self.cdrom.as_ref().is_some_and(|c| c.bus == CdromBus::Sata)
            {
                return Err(SpecError::SataPortOfCdrom { vm: vm(), disk: i });
            }
            slots.push(slot);
        }
        // Paths inside `key=value,...` options cannot contain commas (the -blockdev JSON can).
        let option_paths = [
            Some(&self.qmp_socket),
            self.serial_log.as_ref(),
            self.vnc_socket.as_ref(),
            self.pid_file.as_ref(),
            self.guest_agent_socket.as_ref(),
        ];
        for p in option_paths.into_iter().flatten() {
            if p.to_string_lossy().contains(',') {
                return Err(SpecError::CommaInPath {
                    vm: vm(),
                    path: p.clone(),
                });
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            if d.layers.is_empty() {
                return Err(SpecError::EmptyDisk { vm: vm(), disk: i });
            }
            if d.layers.iter().skip(1).any(|l| l.format == ImageFormat::Raw) {
                return Err(SpecError::RawOverlay { vm: vm(), disk: i });
            }
            let mut paths: Vec<&Path> = d.layers.iter().map(|l| l.path.as_path()).collect();
            paths.sort();
            if paths.windows(2).any(|w| w[0] == w[1]) {
                return Err(SpecError::RepeatedLayer { vm: vm(), disk: i });
            }
        }
        Ok(())
    }

    /// The arguments after the binary name.
    pub fn to_args(&self) -> Result<Vec<String>, SpecError> {
        self.validate()?;
        let mut a: Vec<String> = vec!["-nodefaults".into(), "-no-user-config".into()];
        let mut push = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        push("-name", format!("{},debug-threads=on", self.name));
        push("-uuid", self.uuid.clone());
        push("-machine", "q35".into());
        push("-accel", self.accel.qemu_name().into());
        if self.accel == Accel::Kvm {
            push("-cpu", "host".into());
        }
        push(
            "-smp",
            match self.max_cpus {
                Some(m) => format!("cpus={},maxcpus={m}", self.cpus),
                None => self.cpus.to_string(),
            },
        );
        for c in &self.cpu_devices {
            push("-device", c.device_json().to_string());
        }
        // QEMU wants maxmem above the size; a maximum that leaves no room is none.
        match self.max_memory_mib.filter(|m| *m > self.memory_mib) {
            Some(max) => push(
                "-m",
                format!("size={}M,slots={MEMORY_SLOTS},maxmem={max}M", self.memory_mib),
            ),
            None => push("-m", format!("{}M", self.memory_mib)),
        }
        for d in &self.dimms {
            push("-object", d.backend_json().to_string());
            push("-device", d.device_json().to_string());
        }
        // Deny what a guest-facing process never needs; `spawn=deny` also stops QEMU from running
        // helpers, so networking helpers must be set up by the node beforehand.
        push(
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        );
        push("-display", "none".into());
        push(
            "-chardev",
            format!(
                "socket,id=qmp,path={},server=on,wait=off",
                self.qmp_socket.display()
            ),
        );
        push("-mon", "chardev=qmp,mode=control".into());
        match &self.serial_log {
            Some(p) => push("-serial", format!("file:{}", p.display())),
            None => push("-serial", "none".into()),
        }
        if let Some(p) = &self.vnc_socket {
            push("-vnc", format!("unix:{}", p.display()));
        }
        if let Some(host) = &self.vnc_remote {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            push("-vnc", format!("{host}:0,to=99,password=on,id={REMOTE_VNC}"));
        }
        if let Some(p) = &self.pid_file {
            push("-pidfile", p.display().to_string());
        }
        match &self.boot {
            Boot::Disk => {}
            Boot::Kernel {
                kernel,
                initrd,
                append,
            } => {
                push("-kernel", kernel.display().to_string());
                if let Some(i) = initrd {
                    push("-initrd", i.display().to_string());
                }
                push("-append", append.clone());
            }
        }
        // Root ports first, in a fixed order, so their PCI addresses depend on the counts only.
        // Disk ports reserve no I/O space: virtio devices behind a PCIe port are modern-only
        // (memory BARs), and two dozen ports would exhaust the 64 KiB I/O window.
        for p in 0..self.nic_ports {
            push(
                "-device",
                format!(
                    "pcie-root-port,id={},bus=pcie.0,chassis={}",
                    nic_port_id(p),
                    u32::from(p) + 1
                ),
            );
        }
        for p in 0..usize::from(self.disk_ports) {
            push(
                "-device",
                format!(
                    "pcie-root-port,id={},bus=pcie.0,chassis={},io-reserve=0",
                    disk_port_id(p),
                    usize::from(self.nic_ports) + p + 1
                ),
            );
        }
        if self.scsi_controller() {
            push("-device", format!("virtio-scsi-pci,id={SCSI_CONTROLLER}"));
        }
        for (di, disk) in self.disks.iter().enumerate() {
            let slot = disk_slot(di, disk);
            let (nodes, top) = disk_blockdevs(slot, disk);
            for node in nodes {
                push("-blockdev", node.to_string());
            }
            let mut dev = disk_device_json(slot, disk, &top, self.disk_ports > 0);
            if di == 0 {
                if let Some(i) = self.boot_index(BootDevice::Hd) {
                    dev["bootindex"] = i.into();
                }
            }
            // The same properties as hot plug's, in JSON form: no escaping of serials.
            push("-device", dev.to_string());
        }
        if let Some(cd) = &self.cdrom {
            let node = cd.media.as_ref().map(|m| {
                let n = cdrom_media_blockdev(m, cd.generation);
                let name = n["node-name"].as_str().unwrap_or_default().to_string();
                push("-blockdev", n.to_string());
                name
            });
            let mut dev = cdrom_device_json(cd, node.as_deref());
            if let Some(i) = self.boot_index(BootDevice::Cdrom) {
                dev["bootindex"] = i.into();
            }
            push("-device", dev.to_string());
        }
        for (i, nic) in self.nics.iter().enumerate() {
            let slot = nic_slot(i, nic);
            push("-netdev", nic.netdev_arg(slot));
            let bus = if self.nic_ports > 0 {
                format!(",bus={}", nic_port_id(slot))
            } else {
                String::new()
            };
            // No option ROM: guests boot from disk or a kernel, never by PXE.
            push(
                "-device",
                format!(
                    "virtio-net-pci,netdev={},id={},mac={}{bus},romfile=",
                    nic_netdev_id(slot),
                    nic_device_id_of_slot(slot),
                    nic.mac
                ),
            );
        }
        if self.balloon {
            push("-device", "virtio-balloon-pci,id=balloon0".into());
        }
        if let Some(p) = &self.guest_agent_socket {
            push("-device", "virtio-serial-pci,id=vser0".into());
            push(
                "-chardev",
                format!("socket,id=qga0,path={},server=on,wait=off", p.display()),
            );
            push(
                "-device",
                format!("virtserialport,bus=vser0.0,chardev=qga0,name={GUEST_AGENT_PORT}"),
            );
        }
        if let Some(uri) = &self.incoming {
            push("-incoming", uri.clone());
        }
        if self.start_paused {
            a.push("-S".into());
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "vm1".into(),
            uuid: "4f1c9a0e-2b3d-4c5e-8f70-0123456789ab".into(),
            cpus: 2,
            max_cpus: None,
            cpu_devices: Vec::new(),
            memory_mib: 256,
            max_memory_mib: None,
            dimms: Vec::new(),
            accel: Accel::Tcg,
            boot: Boot::Disk,
            disks: vec![DiskSpec {
                layers: vec![
                    LayerSpec {
                        path: "/sd/img/base".into(),
                        format: ImageFormat::Raw,
                        protocol: BlockProtocol::File,
                    },
                    LayerSpec {
                        path: "/sd/img/top".into(),
                        format: ImageFormat::Qcow2,
                        protocol: BlockProtocol::File,
                    },
                ],
                serial: Some("abc".into()),
                read_only: false,
                direct_io: true,
                write_error: WriteErrorPolicy::StopOnEnospc,
                slot: None,
                bus: DiskBus::VirtioBlk,
            }],
            qmp_socket: "/run/vm1.qmp".into(),
            serial_log: Some("/run/vm1.log".into()),
            vnc_socket: Some("/run/vm1.vnc".into()),
            vnc_remote: Some("192.0.2.7".into()),
            balloon: true,
            pid_file: None,
            incoming: None,
            start_paused: false,
            nics: vec![NicSpec::new("52:54:00:12:34:56", NicBackend::User)],
            nic_ports: 0,
            disk_ports: 0,
            guest_agent_socket: Some("/run/vm1.qga".into()),
            cdrom: None,
            boot_order: Vec::new(),
        }
    }

    fn arg_after<'a>(args: &'a [String], key: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == key)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn chain_is_opened_with_explicit_backing_nodes() {
        let args = spec().to_args().unwrap();
        let bd: Vec<serde_json::Value> = arg_after(&args, "-blockdev")
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        assert_eq!(bd.len(), 4);
        assert_eq!(bd[0]["driver"], "file");
        let base = format_node_name(0, Path::new("/sd/img/base"));
        let top = format_node_name(0, Path::new("/sd/img/top"));
        assert_eq!(bd[0]["read-only"], false);
        assert_eq!(bd[0]["auto-read-only"], true, "a merge may reopen the base");
        assert_eq!(bd[1]["driver"], "raw");
        assert_eq!(bd[1]["read-only"], true, "base layer is read-only");
        assert_eq!(bd[1]["node-name"], base.as_str());
        assert_eq!(bd[3]["driver"], "qcow2");
        assert_eq!(bd[3]["backing"], base.as_str());
        assert_eq!(bd[3]["read-only"], false, "active layer is writable");
        assert_eq!(bd[2]["auto-read-only"], false);
        assert_eq!(bd[2]["cache"]["direct"], true);
        let disk: serde_json::Value = serde_json::from_str(arg_after(&args, "-device")[0]).unwrap();
        assert_eq!(
            disk,
            serde_json::json!({
                "driver": "virtio-blk-pci", "drive": top, "id": "disk0", "werror": "enospc",
                "rerror": "report", "serial": "abc", "bootindex": 1,
            })
        );
        assert!(arg_after(&args, "-device").contains(&"virtio-balloon-pci,id=balloon0"));
        assert_eq!(arg_after(&args, "-accel"), ["tcg"]);
        assert_eq!(
            arg_after(&args, "-vnc"),
            ["unix:/run/vm1.vnc", "192.0.2.7:0,to=99,password=on,id=remote"]
        );
        assert!(arg_after(&args, "-sandbox")[0].starts_with("on,"));
    }

    #[test]
    fn hot_plugged_cpus_come_back_as_devices_within_the_maximum() {
        let mut s = spec();
        assert_eq!(arg_after(&s.to_args().unwrap(), "-smp"), ["2"]);
        s.max_cpus = Some(4);
        s.cpu_devices = vec![CpuDevice {
            id: "cpu-hot-1".into(),
            driver: "qemu64-x86_64-cpu".into(),
            props: [("socket-id".to_string(), 2), ("core-id".to_string(), 0)].into(),
        }];
        let args = s.to_args().unwrap();
        assert_eq!(arg_after(&args, "-smp"), ["cpus=2,maxcpus=4"]);
        let cpu: serde_json::Value = serde_json::from_str(arg_after(&args, "-device")[0]).unwrap();
        assert_eq!(
            cpu,
            serde_json::json!({
                "driver": "qemu64-x86_64-cpu", "id": "cpu-hot-1", "socket-id": 2, "core-id": 0,
            })
        );
        s.max_cpus = Some(2);
        assert!(matches!(
            s.to_args(),
            Err(SpecError::TooManyCpus { cpus: 3, max: 2, .. })
        ));
    }

    #[test]
    fn hot_plugged_dimms_come_back_with_their_backends_within_the_maximum() {
        let mut s = spec();
        assert_eq!(arg_after(&s.to_args().unwrap(), "-m"), ["256M"]);
        s.max_memory_mib = Some(1024);
        s.dimms = vec![Dimm {
            id: "dimm-1".into(),
            size_mib: 256,
        }];
        let args = s.to_args().unwrap();
        assert_eq!(arg_after(&args, "-m"), ["size=256M,slots=16,maxmem=1024M"]);
        let backend: serde_json::Value = serde_json::from_str(arg_after(&args, "-object")[0]).unwrap();
        assert_eq!(
            backend,
            serde_json::json!({ "qom-type": "memory-backend-ram", "id": "mem-dimm-1", "size": 256u64 << 20 })
        );
        assert!(arg_after(&args, "-device")
            .contains(&r#"{"driver":"pc-dimm","id":"dimm-1","memdev":"mem-dimm-1"}"#));
        s.max_memory_mib = Some(384);
        assert!(matches!(
            s.to_args(),
            Err(SpecError::TooMuchMemory {
                mib: 512,
                max: 384,
                ..
            })
        ));
        // A maximum that leaves no room is the plain form QEMU accepts (a migration source
        // started without one reports its size as its maximum).
        s.dimms.clear();
        s.max_memory_mib = Some(256);
        assert_eq!(arg_after(&s.to_args().unwrap(), "-m"), ["256M"]);
    }

    #[test]
    fn single_qcow2_layer_has_null_backing() {
        let mut s = spec();
        s.disks[0].layers.remove(0);
        let args = s.to_args().unwrap();
        let fmt: serde_json::Value = serde_json::from_str(arg_after(&args, "-blockdev")[1]).unwrap();
        assert!(
            fmt["backing"].is_null(),
            "QEMU must not open a backing file on its own"
        );
    }

    #[test]
    fn invalid_specs_are_refused() {
        let mut s = spec();
        s.accel = Accel::Auto;
        assert!(matches!(s.to_args(), Err(SpecError::UnresolvedAccel { .. })));
        let mut s = spec();
        s.disks[0].layers[1].format = ImageFormat::Raw;
        assert!(matches!(s.to_args(), Err(SpecError::RawOverlay { disk: 0, .. })));
        let mut s = spec();
        s.name = "a,b".into();
        assert!(matches!(s.to_args(), Err(SpecError::BadName { .. })));
        let mut s = spec();
        s.disks[0].layers.clear();
        assert!(matches!(s.to_args(), Err(SpecError::EmptyDisk { disk: 0, .. })));
        let mut s = spec();
        s.disks[0].layers[1].path = "/sd/img/base".into();
        assert!(matches!(
            s.to_args(),
            Err(SpecError::RepeatedLayer { disk: 0, .. })
        ));
        let mut s = spec();
        s.cpus = 0;
        assert!(matches!(s.to_args(), Err(SpecError::Zero { what: "cpus", .. })));
    }

    #[test]
    fn nics_agent_channel_and_error_policy_are_on_the_command_line() {
        let mut s = spec();
        s.nics.push(NicSpec::new(
            "52:54:00:00:00:02",
            NicBackend::Tap {
                ifname: "oxtap0".into(),
            },
        ));
        let args = s.to_args().unwrap();
        assert_eq!(
            arg_after(&args, "-netdev"),
            [
                "user,id=net0",
                "tap,id=net1,ifname=oxtap0,script=no,downscript=no"
            ]
        );
        let devs = arg_after(&args, "-device");
        assert!(devs.contains(&"virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:12:34:56,romfile="));
        assert!(devs.contains(&"virtio-net-pci,netdev=net1,id=nic1,mac=52:54:00:00:00:02,romfile="));
        assert!(devs.contains(&"virtio-serial-pci,id=vser0"));
        assert!(devs.contains(&"virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"));
        assert!(arg_after(&args, "-chardev").contains(&"socket,id=qga0,path=/run/vm1.qga,server=on,wait=off"));
        assert!(devs.iter().any(|d| d.contains(r#""werror":"enospc""#)));
        s.disks[0].write_error = WriteErrorPolicy::Report;
        s.guest_agent_socket = None;
        let args = s.to_args().unwrap();
        assert!(arg_after(&args, "-device")
            .iter()
            .any(|d| d.contains(r#""werror":"report""#)));
        assert!(!args.iter().any(|a| a.contains("virtserialport")));
        s.disks[0].write_error = WriteErrorPolicy::Stop;
        let args = s.to_args().unwrap();
        assert!(
            arg_after(&args, "-device")
                .iter()
                .any(|d| d.contains(r#""werror":"stop""#) && d.contains(r#""rerror":"stop""#)),
            "a stopping disk stops on reads too: {args:?}"
        );
    }

    #[test]
    fn cdrom_on_scsi_or_sata_and_boot_order() {
        let mut s = spec();
        s.boot = Boot::Disk;
        s.cdrom = Some(CdromSpec {
            bus: CdromBus::Scsi,
            media: Some("/sd/images/iso/vol".into()),
            generation: 3,
        });
        s.boot_order = vec![BootDevice::Cdrom, BootDevice::Hd];
        let args = s.to_args().unwrap();
        let nodes = arg_after(&args, "-blockdev");
        let media: serde_json::Value = serde_json::from_str(nodes.last().unwrap()).unwrap();
        assert_eq!(media["node-name"], "cd-3");
        assert_eq!(media["read-only"], true);
        assert_eq!(media["file"]["filename"], "/sd/images/iso/vol");
        let devs = arg_after(&args, "-device");
        let cd: serde_json::Value = serde_json::from_str(
            devs.iter()
                .find(|d| d.contains("scsi-cd"))
                .expect("a scsi-cd device"),
        )
        .unwrap();
        assert_eq!(cd["drive"], "cd-3");
        assert_eq!(cd["id"], CDROM_DEVICE);
        assert_eq!(cd["scsi-id"], CDROM_SCSI_ID);
        assert_eq!(cd["bootindex"], 1);
        let disk: serde_json::Value =
            serde_json::from_str(devs.iter().find(|d| d.contains(r#""id":"disk0""#)).unwrap()).unwrap();
        assert_eq!(disk["bootindex"], 2);

        // An empty SATA drive, not in the boot order; a SATA disk may not take its port.
        s.cdrom = Some(CdromSpec {
            bus: CdromBus::Sata,
            media: None,
            generation: 0,
        });
        s.boot_order = vec![BootDevice::Hd];
        let args = s.to_args().unwrap();
        let devs = arg_after(&args, "-device");
        let cd: serde_json::Value =
            serde_json::from_str(devs.iter().find(|d| d.contains("ide-cd")).unwrap()).unwrap();
        assert_eq!(cd["bus"], format!("ide.{CDROM_SATA_PORT}"));
        assert!(cd.get("drive").is_none() && cd.get("bootindex").is_none());
        assert!(!arg_after(&args, "-blockdev").iter().any(|n| n.contains("cd-")));
        s.disks[0].bus = DiskBus::Sata;
        s.disks[0].slot = Some(CDROM_SATA_PORT as u8);
        assert!(matches!(
            s.to_args(),
            Err(SpecError::SataPortOfCdrom { disk: 0, .. })
        ));
    }

    #[test]
    fn bad_nics_and_option_paths_are_refused() {
        let mut s = spec();
        s.nics[0].mac = "53:54:00:12:34:56".into(); // multicast
        assert!(matches!(s.to_args(), Err(SpecError::BadMac { nic: 0, .. })));
        let mut s = spec();
        s.nics[0].mac = "52:54:00:12:34".into();
        assert!(matches!(s.to_args(), Err(SpecError::BadMac { .. })));
        let mut s = spec();
        s.nics[0].backend = NicBackend::Tap {
            ifname: "tap0,script=/bin/evil".into(),
        };
        assert!(matches!(s.to_args(), Err(SpecError::BadTap { .. })));
        let mut s = spec();
        s.qmp_socket = "/run/a,server=off".into();
        assert!(matches!(s.to_args(), Err(SpecError::CommaInPath { .. })));
    }

    #[test]
    fn nic_ports_give_hotpluggable_slots_that_survive_unplugs() {
        let mut s = spec();
        s.nic_ports = 4;
        s.nics = vec![
            NicSpec::new("52:54:00:00:00:01", NicBackend::User),
            NicSpec {
                slot: Some(3),
                ..NicSpec::new(
                    "52:54:00:00:00:03",
                    NicBackend::Network {
                        network: "vmnet".into(),
                        tap: "oxabc3".into(),
                    },
                )
            },
        ];
        let args = s.to_args().unwrap();
        let devs = arg_after(&args, "-device");
        assert_eq!(
            &devs[0..4],
            [
                "pcie-root-port,id=nicport0,bus=pcie.0,chassis=1",
                "pcie-root-port,id=nicport1,bus=pcie.0,chassis=2",
                "pcie-root-port,id=nicport2,bus=pcie.0,chassis=3",
                "pcie-root-port,id=nicport3,bus=pcie.0,chassis=4",
            ]
        );
        assert!(
            devs.contains(&"virtio-net-pci,netdev=net3,id=nic3,mac=52:54:00:00:00:03,bus=nicport3,romfile=")
        );
        assert!(arg_after(&args, "-netdev").contains(&"tap,id=net3,ifname=oxabc3,script=no,downscript=no"));
        let hot = nic_device_json(2, &s.nics[0]);
        assert_eq!(hot["bus"], "nicport2");
        assert_eq!(hot["id"], "nic2");
        assert_eq!(nic_netdev_json(3, &s.nics[1])["ifname"], "oxabc3");
        // A slot taken twice, or beyond the ports, is refused.
        s.nics[1].slot = Some(0);
        assert!(matches!(
            s.to_args(),
            Err(SpecError::BadNicSlot { nic: 1, slot: 0, .. })
        ));
        s.nics[1].slot = Some(4);
        assert!(matches!(s.to_args(), Err(SpecError::BadNicSlot { slot: 4, .. })));
    }

    #[test]
    fn disks_sit_on_virtio_blk_virtio_scsi_or_sata() {
        let mut s = spec();
        let mut scsi = s.disks[0].clone();
        scsi.layers.truncate(1);
        scsi.layers[0].path = "/sd/img2/base".into();
        scsi.bus = DiskBus::VirtioScsi;
        scsi.slot = Some(3);
        let mut sata = scsi.clone();
        sata.layers[0].path = "/sd/img3/base".into();
        sata.bus = DiskBus::Sata;
        sata.slot = Some(5);
        s.disks.extend([scsi, sata]);
        let args = s.to_args().unwrap();
        let devs = arg_after(&args, "-device");
        let json = |d: &str| serde_json::from_str::<serde_json::Value>(d).ok();
        let disks: Vec<serde_json::Value> = devs
            .iter()
            .filter_map(|d| json(d))
            .filter(|d| d["id"].as_str().is_some_and(|i| i.starts_with("disk")))
            .collect();
        assert_eq!(disks.len(), 3);
        assert_eq!(disks[0]["driver"], "virtio-blk-pci");
        let want_scsi = serde_json::json!({
            "driver": "scsi-hd", "bus": "scsi0.0", "channel": 0, "scsi-id": 3, "lun": 0,
            "drive": format_node_name(3, Path::new("/sd/img2/base")), "id": "disk3",
            "werror": "enospc", "rerror": "report", "serial": "abc",
        });
        assert_eq!(disks[1], want_scsi);
        assert_eq!(
            (&disks[2]["driver"], &disks[2]["bus"], &disks[2]["id"]),
            (&"ide-hd".into(), &"ide.5".into(), &"disk5".into())
        );
        // The controller comes before the disks that sit on it.
        let controller = devs
            .iter()
            .position(|d| *d == "virtio-scsi-pci,id=scsi0")
            .unwrap();
        let first_disk = devs.iter().position(|d| d.contains("\"disk")).unwrap();
        assert!(controller < first_disk, "{devs:?}");
        // Without SCSI disks or hot plug ports, no controller.
        s.disks.truncate(1);
        assert!(!s.to_args().unwrap().iter().any(|a| a.contains("virtio-scsi")));
        // A SATA disk's slot is one of the chipset's six ports.
        let mut far = s.disks[0].clone();
        far.layers.truncate(1);
        far.layers[0].path = "/sd/img4/base".into();
        far.bus = DiskBus::Sata;
        far.slot = Some(6);
        s.disks.push(far);
        assert!(matches!(
            s.to_args(),
            Err(SpecError::BadSataSlot { disk: 1, slot: 6, .. })
        ));
        assert!(DiskBus::VirtioScsi.hot_pluggable() && !DiskBus::Sata.hot_pluggable());
    }

    #[test]
    fn disk_ports_give_hotpluggable_slots_after_the_nic_ports() {
        let mut s = spec();
        s.nic_ports = 2;
        s.disk_ports = 3;
        s.disks[0].slot = Some(2);
        let mut second = s.disks[0].clone();
        second.layers.truncate(1);
        second.layers[0].path = "/sd/img2/base".into();
        second.slot = None; // its index: 1
        s.disks.push(second);
        let args = s.to_args().unwrap();
        let devs = arg_after(&args, "-device");
        assert_eq!(
            &devs[2..6],
            [
                "pcie-root-port,id=diskport0,bus=pcie.0,chassis=3,io-reserve=0",
                "pcie-root-port,id=diskport1,bus=pcie.0,chassis=4,io-reserve=0",
                "pcie-root-port,id=diskport2,bus=pcie.0,chassis=5,io-reserve=0",
                // Any disk hot plugged later may be a SCSI one.
                "virtio-scsi-pci,id=scsi0",
            ]
        );
        let devs = &devs[1..];
        let disk: serde_json::Value = serde_json::from_str(devs[5]).unwrap();
        assert_eq!(
            (&disk["id"], &disk["bus"]),
            (&"disk2".into(), &"diskport2".into())
        );
        let top = format_node_name(2, Path::new("/sd/img/top"));
        assert_eq!(disk["drive"], top.as_str(), "node names follow the slot");
        let base2 = format_node_name(1, Path::new("/sd/img2/base"));
        let hot = disk_device_json(1, &s.disks[1], &base2, true);
        assert_eq!(serde_json::from_str::<serde_json::Value>(devs[6]).unwrap(), hot);
        // A slot taken twice, or beyond the ports, is refused.
        s.disks[1].slot = Some(2);
        assert!(matches!(
            s.to_args(),
            Err(SpecError::BadDiskSlot { disk: 1, slot: 2, .. })
        ));
        s.disks[1].slot = Some(3);
        assert!(matches!(s.to_args(), Err(SpecError::BadDiskSlot { slot: 3, .. })));
    }

    #[test]
    fn node_names_follow_the_path_and_fit_qemu() {
        let a = format_node_name(3, Path::new("/rhev/data-center/mnt/sd/images/i/v1"));
        assert_eq!(
            a,
            format_node_name(3, Path::new("/rhev/data-center/mnt/sd/images/i/v1"))
        );
        assert_ne!(
            a,
            format_node_name(3, Path::new("/rhev/data-center/mnt/sd/images/i/v2"))
        );
        assert_ne!(
            a,
            format_node_name(2, Path::new("/rhev/data-center/mnt/sd/images/i/v1"))
        );
        let p = protocol_node_name(99, Path::new("/x"));
        assert!(p.len() <= 31, "{p}");
        // Pinned: a restarted node must derive the names the running QEMU was given.
        assert_eq!(format_node_name(0, Path::new("/x")), "d0-07d64e07b49caeb2");
    }
}
