//! `VM.*` verbs.
//!
//! Drives are named by ids (`domainID`, `imageID`, optional `volumeID`); the node resolves them
//! to the image's chain on connected storage. Verbs that take long — migration, live merge,
//! graceful shutdown — return a job id at once; the job's end is published as an event and
//! can be polled with `Host.getJobs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use oxvirt_qemu::{Accel, Boot, BootDevice, CdromBus, DiskBus, ImageFormat, NicBackend, NicSpec};
use oxvirt_rpc::RpcError;
use oxvirt_types::api::ErrorCode;
use oxvirt_types::{ImgUuid, SdUuid, VmId, VolUuid};

use super::storage::error_chain;
use super::{params, ApiError};
use crate::service::Node;
use crate::storage::pool::{PoolServiceError, VolKey};
use crate::vm::cdrom::{CdMedia, VmCdrom};
use crate::vm::thin::{ThinPolicy, VolumeRef};
use crate::vm::{ImageRef, MigrateParams, SnapshotDisk, ThinDisk, VmCreate, VmDisk, VmError};

pub const VERBS: &[&str] = &[
    "VM.create",
    "VM.migrationCreate",
    "VM.destroy",
    "VM.shutdown",
    "VM.pause",
    "VM.cont",
    "VM.reset",
    "VM.getStats",
    "VM.getInfo",
    "VM.migrate",
    "VM.migrateCancel",
    "VM.setTicket",
    "VM.snapshot",
    "VM.merge",
    "VM.setBalloonTarget",
    "VM.acquireLease",
    "VM.getConsoleLog",
    "VM.hibernate",
    "VM.hotplugDisk",
    "VM.hotunplugDisk",
    "VM.diskSizeExtend",
    "VM.diskReplicateStart",
    "VM.diskReplicateFinish",
    "VM.changeCD",
    "VM.setNumberOfCpus",
    "VM.hotplugMemory",
    "VM.setIoTune",
    "VM.getIoTune",
];

/// The most of a serial console log one `VM.getConsoleLog` returns.
pub const CONSOLE_LOG_MAX: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DriveParams {
    #[serde(rename = "domainID")]
    pub domain: SdUuid,
    #[serde(rename = "imageID")]
    pub image: ImgUuid,
    /// The chain's top; the image's leaf when absent.
    #[serde(rename = "volumeID", default)]
    pub volume: Option<VolUuid>,
    #[serde(default)]
    pub readonly: bool,
    /// Grow the active layer on demand with this policy (capped thin volume).
    #[serde(default)]
    pub thin: Option<ThinPolicy>,
    /// The disk's slot (from the source's `VM.getInfo` on a migration destination).
    #[serde(default)]
    pub slot: Option<u8>,
    /// The controller the guest sees the disk on (VDSM's `iface`); virtio when absent.
    #[serde(default)]
    pub iface: DriveIface,
    /// I/O limits (the disk profile's storage QoS); none: unlimited.
    #[serde(default)]
    pub io_tune: Option<crate::vm::disks::IoTune>,
}

/// VDSM's drive `iface`. q35 has no IDE controller: `ide` is a SATA port, as oVirt makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriveIface {
    #[default]
    Virtio,
    Scsi,
    Sata,
    Ide,
}

impl DriveIface {
    pub fn bus(self) -> DiskBus {
        match self {
            DriveIface::Virtio => DiskBus::VirtioBlk,
            DriveIface::Scsi => DiskBus::VirtioScsi,
            DriveIface::Sata | DriveIface::Ide => DiskBus::Sata,
        }
    }
}

/// The VM's CD-ROM drive: its controller and the ISO in it, if any.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CdromParams {
    /// `scsi` (virtio-scsi) or `sata`.
    #[serde(default)]
    pub iface: CdromBus,
    #[serde(default)]
    pub drive: Option<CdDrive>,
}

/// An ISO on a storage domain: an image whose volume is one raw file.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdDrive {
    #[serde(rename = "domainID")]
    pub domain: SdUuid,
    #[serde(rename = "imageID")]
    pub image: ImgUuid,
    #[serde(rename = "volumeID", default)]
    pub volume: Option<VolUuid>,
}

/// `VM.changeCD`: the ISO to put into the running VM's drive (`null`: eject).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeCdParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub drive: Option<CdDrive>,
}

/// `VM.setNumberOfCpus` (VDSM's name): the running VM's vCPUs, hot plugged or unplugged.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetCpusParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub number_of_cpus: u16,
}

/// `VM.hotplugMemory` (VDSM's name): memory to add to the running VM, as one DIMM.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HotplugMemoryParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    #[serde(rename = "sizeMiB")]
    pub size_mib: u64,
}

/// `VM.hotplugDisk` / `VM.hotunplugDisk` (VDSM's names): the drive to plug, or the one whose
/// image to unplug.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskHotplugParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub drive: DriveParams,
    /// Unplug: how long the guest may take to release the disk (seconds).
    #[serde(default = "unplug_timeout")]
    pub timeout: u64,
}

fn unplug_timeout() -> u64 {
    crate::vm::disks::UNPLUG_TIMEOUT.as_secs()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BootParams {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NicParams {
    pub mac: String,
    /// The name of an existing tap device; without it and `network`, QEMU's user-mode network.
    #[serde(default)]
    pub tap: Option<String>,
    /// Logical network (its bridge): the node creates the NIC's tap on it.
    #[serde(default)]
    pub network: Option<String>,
    /// The NIC's slot (from the source's `VM.getInfo` on a migration destination).
    #[serde(default)]
    pub slot: Option<u8>,
    /// VDSM's `linkActive`: the guest sees the cable plugged.
    #[serde(default = "yes")]
    pub link_active: bool,
}

impl NicParams {
    /// The NIC as the VM manager takes it; a network NIC's tap is named by the manager.
    pub fn to_spec(&self) -> Result<NicSpec, ApiError> {
        let backend = match (&self.network, &self.tap) {
            (Some(_), Some(_)) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!("NIC {}: give network or tap, not both", self.mac),
                ))
            }
            (Some(network), None) => NicBackend::Network {
                network: network.clone(),
                tap: String::new(),
            },
            (None, Some(ifname)) => NicBackend::Tap {
                ifname: ifname.clone(),
            },
            (None, None) => NicBackend::User,
        };
        Ok(NicSpec {
            mac: self.mac.clone(),
            backend,
            slot: self.slot,
            link_up: self.link_active,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub vm_name: String,
    #[serde(default = "one")]
    pub smp: u16,
    /// MiB.
    pub mem_size: u64,
    #[serde(default)]
    pub accel: Option<Accel>,
    #[serde(default)]
    pub boot: Option<BootParams>,
    #[serde(default)]
    pub drives: Vec<DriveParams>,
    #[serde(default)]
    pub nics: Vec<NicParams>,
    #[serde(default = "yes")]
    pub balloon: bool,
    #[serde(default)]
    pub guest_agent: bool,
    #[serde(default = "yes")]
    pub vnc: bool,
    /// The VM lease (high availability): taken before QEMU starts, released when it stops.
    #[serde(default)]
    pub lease: Option<VmLeaseParams>,
    /// Resume a hibernated VM from the state `VM.hibernate` saved in this volume.
    #[serde(default)]
    pub restore_state: Option<StateVolume>,
    /// `VM.migrationCreate` only: receive the stream over TLS (the source's `VM.migrate`
    /// asks for it too); refused elsewhere.
    #[serde(default)]
    pub encrypted: bool,
    /// The CD-ROM drive; none: the VM has no drive.
    #[serde(default)]
    pub cdrom: Option<CdromParams>,
    /// The firmware's boot order (`hd`, `cdrom`) when the VM boots through it.
    #[serde(default)]
    pub boot_order: Vec<BootDevice>,
    /// The most vCPUs hot plug may bring the VM to (VDSM's `maxVCpus`); `smp` when absent.
    #[serde(default, rename = "maxVCpus")]
    pub max_vcpus: Option<u16>,
    /// vCPUs hot plugged on the migration source, added as devices here.
    #[serde(default)]
    pub cpu_devices: Vec<oxvirt_qemu::CpuDevice>,
    /// The most memory hot plug may bring the VM to, MiB (VDSM's `maxMemSize`); `memSize`
    /// when absent.
    #[serde(default)]
    pub max_mem_size: Option<u64>,
    /// DIMMs hot plugged on the migration source, added as devices here.
    #[serde(default)]
    pub dimms: Vec<oxvirt_qemu::Dimm>,
    /// What to do when storage fails under the VM (VDSM's `resumeBehavior`).
    #[serde(default)]
    pub resume_behavior: crate::vm::io_errors::ResumeBehavior,
}

/// The volume a hibernated VM's state lives in (VDSM's `hibernationVolHandle`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateVolume {
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    #[serde(rename = "imgUUID")]
    pub img: ImgUuid,
    #[serde(rename = "volUUID")]
    pub vol: VolUuid,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HibernateParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub hibernation_volume: StateVolume,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmLeaseParams {
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AcquireLeaseParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
}

fn one() -> u16 {
    1
}
fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Id {
    #[serde(rename = "vmID")]
    id: VmId,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShutdownParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    /// Seconds to wait for the guest before destroying it.
    #[serde(default = "shutdown_timeout")]
    pub timeout: u64,
}

fn shutdown_timeout() -> u64 {
    120
}

/// VDSM's `VM.setTicket`: the remote console's password and how long it works.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetTicket {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub password: String,
    /// Seconds.
    pub ttl: u64,
    /// VDSM's `existingConnAction` (keep or disconnect): connected clients are kept.
    #[serde(default)]
    pub existing_conn_action: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrateRequest {
    #[serde(rename = "vmID")]
    pub id: VmId,
    /// The URI `VM.migrationCreate` returned on the destination.
    pub dst_uri: String,
    #[serde(default = "downtime")]
    pub max_downtime_ms: u64,
    /// MiB/s; 0 = unlimited.
    #[serde(default)]
    pub max_bandwidth: u64,
    #[serde(default = "migration_timeout")]
    pub timeout_secs: u64,
    /// Encrypt the stream (TLS with both nodes' certificates); the destination's
    /// `VM.migrationCreate` must have asked for it too.
    #[serde(default)]
    pub encrypted: bool,
}

fn downtime() -> u64 {
    500
}
fn migration_timeout() -> u64 {
    600
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapDrive {
    #[serde(rename = "domainID")]
    pub domain: SdUuid,
    #[serde(rename = "imageID")]
    pub image: ImgUuid,
    /// The new leaf the SPM created on top of the current one.
    #[serde(rename = "volumeID")]
    pub volume: VolUuid,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub snap_drives: Vec<SnapDrive>,
    /// Save the guest's memory and devices to this volume too (VDSM's `snapMemory`, which
    /// there is a string of ids; here the same handle as a hibernation's).
    #[serde(default)]
    pub snap_memory: Option<StateVolume>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MergeParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    #[serde(rename = "domainID")]
    pub domain: SdUuid,
    #[serde(rename = "imageID")]
    pub image: ImgUuid,
    #[serde(rename = "baseVolUUID")]
    pub base: VolUuid,
    #[serde(rename = "topVolUUID")]
    pub top: VolUuid,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BalloonParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    /// MiB.
    pub target: u64,
}

/// `VM.diskSizeExtend`: grow a running VM's disk (the image's active layer) to `newSize` bytes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskSizeExtendParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub drive_specs: DriveSpecs,
    /// Bytes; VDSM sends it as a string, so both are taken.
    #[serde(deserialize_with = "u64_or_string")]
    pub new_size: u64,
}

/// `VM.setIoTune`: a disk's new I/O limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetIoTuneParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub drive: DriveSpecs,
    pub io_tune: crate::vm::disks::IoTune,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DriveSpecs {
    #[serde(rename = "domainID")]
    pub domain: SdUuid,
    #[serde(rename = "imageID")]
    pub image: ImgUuid,
    #[serde(rename = "volumeID", default)]
    pub volume: Option<VolUuid>,
    #[serde(rename = "poolID", default)]
    pub pool: Option<serde_json::Value>,
}

fn u64_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| serde::de::Error::custom("newSize must be a byte count")),
        Value::String(s) => s
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("newSize {s:?} is not a byte count"))),
        other => Err(serde::de::Error::custom(format!(
            "newSize {other} is not a byte count"
        ))),
    }
}

impl DriveSpecs {
    fn image_ref(&self) -> ImageRef {
        ImageRef {
            sd: self.domain,
            img: self.image,
        }
    }
}

/// `VM.diskReplicateStart` and `VM.diskReplicateFinish` (a live storage migration's mirror):
/// finishing with `dstDisk` equal to `srcDisk` drops the copy, as in VDSM.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicateParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    /// The disk's image on its domain (VDSM's `srcDisk`).
    pub src_disk: DriveSpecs,
    /// The same image on the domain it is copied to (VDSM's `dstDisk`), `volumeID` its leaf.
    pub dst_disk: DriveSpecs,
}

/// `VM.getConsoleLog`: the last `tailBytes` of the VM's serial console log (read-only).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsoleLogParams {
    #[serde(rename = "vmID")]
    pub id: VmId,
    /// At most [`CONSOLE_LOG_MAX`]; 64 KiB when absent.
    #[serde(default = "console_tail")]
    pub tail_bytes: u64,
}

fn console_tail() -> u64 {
    64 << 10
}

#[derive(Debug, Clone, PartialEq)]
pub enum VmRequest {
    Create(VmParams),
    MigrationCreate(VmParams),
    Destroy(VmId),
    Shutdown(ShutdownParams),
    Pause(VmId),
    Cont(VmId),
    Reset(VmId),
    GetStats(VmId),
    GetInfo(VmId),
    Migrate(MigrateRequest),
    MigrateCancel(VmId),
    SetTicket(SetTicket),
    Snapshot(SnapshotParams),
    Merge(MergeParams),
    SetBalloonTarget(BalloonParams),
    AcquireLease(AcquireLeaseParams),
    GetConsoleLog(ConsoleLogParams),
    Hibernate(HibernateParams),
    HotplugDisk(DiskHotplugParams),
    HotunplugDisk(DiskHotplugParams),
    DiskSizeExtend(DiskSizeExtendParams),
    ReplicateStart(ReplicateParams),
    ReplicateFinish(ReplicateParams),
    ChangeCd(ChangeCdParams),
    SetCpus(SetCpusParams),
    HotplugMemory(HotplugMemoryParams),
    SetIoTune(SetIoTuneParams),
    GetIoTune(VmId),
}

impl VmRequest {
    pub fn parse(method: &str, p: Map<String, Value>) -> Result<VmRequest, RpcError> {
        let id = |p| params::<Id>(method, p).map(|i| i.id);
        Ok(match method {
            "VM.create" => {
                let v: VmParams = params(method, p)?;
                if v.encrypted {
                    return Err(RpcError::invalid_params(
                        "VM.create: encrypted is for VM.migrationCreate (an incoming migration)",
                    ));
                }
                VmRequest::Create(v)
            }
            "VM.migrationCreate" => VmRequest::MigrationCreate(params(method, p)?),
            "VM.destroy" => VmRequest::Destroy(id(p)?),
            "VM.shutdown" => VmRequest::Shutdown(params(method, p)?),
            "VM.pause" => VmRequest::Pause(id(p)?),
            "VM.cont" => VmRequest::Cont(id(p)?),
            "VM.reset" => VmRequest::Reset(id(p)?),
            "VM.getStats" => VmRequest::GetStats(id(p)?),
            "VM.getInfo" => VmRequest::GetInfo(id(p)?),
            "VM.migrate" => VmRequest::Migrate(params(method, p)?),
            "VM.migrateCancel" => VmRequest::MigrateCancel(id(p)?),
            "VM.setTicket" => {
                let t: SetTicket = params(method, p)?;
                if t.password.is_empty() || t.password.len() > 256 {
                    return Err(RpcError::invalid_params(
                        "VM.setTicket: the password must be 1 to 256 characters",
                    ));
                }
                if !(1..=86_400).contains(&t.ttl) {
                    return Err(RpcError::invalid_params(format!(
                        "VM.setTicket: ttl must be 1 to 86400 seconds, not {}",
                        t.ttl
                    )));
                }
                VmRequest::SetTicket(t)
            }
            "VM.snapshot" => VmRequest::Snapshot(params(method, p)?),
            "VM.merge" => VmRequest::Merge(params(method, p)?),
            "VM.diskReplicateStart" => VmRequest::ReplicateStart(params(method, p)?),
            "VM.diskReplicateFinish" => VmRequest::ReplicateFinish(params(method, p)?),
            "VM.setBalloonTarget" => VmRequest::SetBalloonTarget(params(method, p)?),
            "VM.acquireLease" => VmRequest::AcquireLease(params(method, p)?),
            "VM.getConsoleLog" => VmRequest::GetConsoleLog(params(method, p)?),
            "VM.hibernate" => VmRequest::Hibernate(params(method, p)?),
            "VM.hotplugDisk" => VmRequest::HotplugDisk(params(method, p)?),
            "VM.changeCD" => VmRequest::ChangeCd(params(method, p)?),
            "VM.setNumberOfCpus" => VmRequest::SetCpus(params(method, p)?),
            "VM.hotplugMemory" => VmRequest::HotplugMemory(params(method, p)?),
            "VM.hotunplugDisk" => VmRequest::HotunplugDisk(params(method, p)?),
            "VM.diskSizeExtend" => VmRequest::DiskSizeExtend(params(method, p)?),
            "VM.setIoTune" => {
                let t: SetIoTuneParams = params(method, p)?;
                t.io_tune
                    .check()
                    .map_err(|e| RpcError::invalid_params(format!("VM.setIoTune: {e}")))?;
                VmRequest::SetIoTune(t)
            }
            "VM.getIoTune" => VmRequest::GetIoTune(id(p)?),
            other => return Err(RpcError::method_not_found(other)),
        })
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> ApiError {
        let code = match &e {
            VmError::NotFound(_) => ErrorCode::NoVm,
            VmError::Exists(_) => ErrorCode::VmExists,
            VmError::Invalid { .. } | VmError::Spec { .. } => ErrorCode::InvalidParameter,
            VmError::WrongState { .. } => ErrorCode::Busy,
            VmError::Migration { .. } => ErrorCode::MigrationError,
            VmError::Nic { .. } => ErrorCode::BadBridge,
            _ => ErrorCode::Unexpected,
        };
        ApiError::new(code, error_chain(&e))
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("API types serialize")
}

/// Probes whether the file system holding `path` takes O_DIRECT (tmpfs does not), so disks
/// use cache=none wherever they can.
pub(crate) fn direct_io_supported(path: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}

/// The last `tail` bytes of a file (from a line start when it was cut) and the file's size.
/// Invalid UTF-8 (a guest writes raw bytes) is replaced, never an error.
fn read_tail(path: &std::path::Path, tail: u64) -> std::io::Result<(String, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let start = size.saturating_sub(tail);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((size - start) as usize);
    f.take(tail).read_to_end(&mut buf)?;
    let mut text = &buf[..];
    if start > 0 {
        if let Some(nl) = text.iter().position(|b| *b == b'\n') {
            text = &text[nl + 1..];
        }
    }
    Ok((String::from_utf8_lossy(text).into_owned(), size))
}

impl Node {
    /// Takes the VM's lease on `sd` (the VM id names it in the domain's xleases).
    pub(crate) async fn acquire_vm_lease(&self, vm: VmId, sd: SdUuid) -> Result<u64, ApiError> {
        let pools = self.pools.clone();
        tokio::task::spawn_blocking(move || {
            let cp = pools
                .current()
                .ok_or_else(|| ApiError::new(ErrorCode::NotConnected, "not connected to a storage pool"))?;
            cp.acquire_vm_lease(sd, &vm.to_string()).map_err(ApiError::from)
        })
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unexpected, format!("lease worker failed: {e}")))?
    }

    /// Takes every lease a VM runs under here: its VM lease (an HA VM's) and the leases of
    /// `volumes` that live on domains of the connected pool (a VM on storage outside a pool
    /// has no lockspace to take them in). Leases the VM already holds are kept; on failure
    /// the ones this call took are given back and the error names the holder.
    pub(crate) async fn take_vm_leases(
        &self,
        vm: VmId,
        vm_lease: Option<SdUuid>,
        volumes: Vec<VolumeRef>,
    ) -> Result<(), PoolServiceError> {
        let pools = self.pools.clone();
        tokio::task::spawn_blocking(move || {
            let Some(cp) = pools.current() else {
                return match vm_lease {
                    Some(_) => Err(PoolServiceError::NoPool),
                    None => Ok(()),
                };
            };
            let held_before = cp.vm_volume_leases(vm);
            let lease_id = vm.to_string();
            let had_vm_lease = cp.holds_vm_lease(&lease_id);
            let res = (|| {
                if let Some(sd) = vm_lease {
                    cp.acquire_vm_lease(sd, &lease_id)?;
                }
                for v in volumes.iter().filter(|v| cp.has_lockspace(v.sd)) {
                    cp.acquire_volume_lease(v.sd, v.img, v.vol, Some(vm))?;
                }
                Ok(())
            })();
            if res.is_err() {
                let taken: Vec<VolKey> = cp
                    .vm_volume_leases(vm)
                    .into_iter()
                    .filter(|v| !held_before.contains(v))
                    .collect();
                let _ = cp.release_vm_volume_leases(vm, Some(&taken));
                if !had_vm_lease {
                    let _ = cp.release_vm_lease(&lease_id);
                }
            }
            res
        })
        .await
        .unwrap_or_else(|e| Err(PoolServiceError::Invalid(format!("lease worker failed: {e}"))))
    }

    /// Makes the VM's volume leases match its writable leaves now (after a snapshot moved the
    /// leaf up, or a merge ended): takes what is missing, gives back what it no longer writes.
    pub(crate) async fn sync_volume_leases(&self, vm: VmId) {
        let Ok(want) = self.vms.leaf_volumes(vm) else {
            // Destroyed meanwhile: nothing of it may keep a lease.
            self.release_vm_leases(vm).await;
            return;
        };
        let pools = self.pools.clone();
        let want_vols: Vec<VolKey> = want.iter().map(|v| (v.sd, v.vol)).collect();
        let r = tokio::task::spawn_blocking(move || {
            let Some(cp) = pools.current() else {
                return Ok(Vec::new());
            };
            let stale: Vec<VolKey> = cp
                .vm_volume_leases(vm)
                .into_iter()
                .filter(|v| !want_vols.contains(v))
                .collect();
            cp.release_vm_volume_leases(vm, Some(&stale))
        })
        .await;
        match r {
            Ok(Ok(released)) if !released.is_empty() => {
                tracing::info!(vm_id = %vm, ?released, "volume leases the VM no longer writes released")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(vm_id = %vm, error = %e, "cannot release stale volume leases"),
            Err(e) => tracing::warn!(vm_id = %vm, error = %e, "lease worker failed"),
        }
        if let Err(e) = self.take_vm_leases(vm, None, want).await {
            tracing::error!(vm_id = %vm, error = %e, "cannot take the lease of a volume the VM writes");
        }
    }

    /// After a pool connect: takes back the leases of VMs that outlived an earlier incarnation
    /// of this node (their host id was resumed with its generation, so the leases are still
    /// ours on storage; this gives the new process their handles). A lease another host owns
    /// means the VM may run there: this copy is killed, never left running twice. A migration
    /// destination still waiting for its leases gets its waiter back.
    pub(crate) async fn readopt_vm_leases(self: &Arc<Self>) {
        for needs in self.vms.lease_needs() {
            let vm = needs.id;
            if needs.awaiting {
                self.spawn_incoming_lease_waiter(vm);
                continue;
            }
            // One taker at a time per VM: a restarted node's own reconnect and the engine's
            // may both get here, and two ballots of ours on one lease must not look like
            // another host's.
            let _g = self.lock_vm_leases(vm).await;
            match self.take_vm_leases(vm, needs.vm_lease, needs.volumes).await {
                Ok(()) => tracing::info!(vm_id = %vm, "VM leases taken back"),
                Err(e) => match e.lease_owner() {
                    Some(owner) => {
                        tracing::error!(vm_id = %vm, owner, error = %e,
                            "a lease of this VM is owned by another host: killing this copy");
                        if let Err(e) = self.vms.destroy(vm).await {
                            tracing::error!(vm_id = %vm, error = %e, "cannot kill a VM that lost its lease");
                        }
                    }
                    None => tracing::error!(vm_id = %vm, error = %e, "cannot take the VM's leases back"),
                },
            }
        }
    }

    /// Gives back every lease this host holds for the VM (it stopped, or its guest moved to
    /// a migration destination).
    pub(crate) async fn release_vm_leases(&self, vm: VmId) {
        let pools = self.pools.clone();
        let r = tokio::task::spawn_blocking(move || match pools.current() {
            Some(cp) => {
                let own = cp.release_vm_lease(&vm.to_string());
                let vols = cp.release_vm_volume_leases(vm, None);
                Ok((own?, vols?))
            }
            None => Ok((false, Vec::new())),
        })
        .await;
        match r {
            Ok(Ok((own, vols))) if own || !vols.is_empty() => {
                tracing::info!(vm_id = %vm, vm_lease = own, volumes = ?vols, "VM leases released")
            }
            Ok(Ok(_)) => {}
            Ok(Err::<_, PoolServiceError>(e)) => {
                tracing::warn!(vm_id = %vm, error = %e, "cannot release the VM's leases")
            }
            Err(e) => tracing::warn!(vm_id = %vm, error = %e, "lease worker failed"),
        }
    }

    /// Whether a VM created from `create` runs under leases on this node: then a migration
    /// destination must not run it before holding them.
    fn needs_leases(&self, create: &VmCreate) -> bool {
        create.vm_lease.is_some()
            || self
                .pools
                .current()
                .is_some_and(|cp| create.written_volumes().iter().any(|v| cp.has_lockspace(v.sd)))
    }

    /// A held migration destination: once the guest has arrived, takes the VM's leases (the
    /// source gives them up when its migration completes; until then, or while a dead
    /// source's host id has not expired, the attempt is refused and repeated) and then lets
    /// the guest run. Never runs the guest without them: if they never come, the VM stays
    /// paused until the engine destroys it.
    pub(crate) fn spawn_incoming_lease_waiter(self: &Arc<Self>, vm: VmId) {
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            let Some(n) = node.upgrade() else { return };
            if let Err(e) = n.vms.wait_incoming(vm).await {
                tracing::info!(vm_id = %vm, error = %e, "incoming migration ended without the guest");
                return;
            }
            let arrived = std::time::Instant::now();
            // The stream has ended: the source, stopped, grows nothing any more. Thin volumes
            // it grew meanwhile are larger on storage than the devices prepared here.
            n.vms.refresh_thin_devices(vm).await;
            drop(n);
            let mut attempts = 0u32;
            let mut warned = arrived;
            loop {
                let Some(n) = node.upgrade() else { return };
                let Some(needs) = n.vms.lease_needs().into_iter().find(|l| l.id == vm && l.awaiting) else {
                    if n.vms.held_incoming(vm) {
                        break; // held for its thin disks only: no lease to wait for
                    }
                    return; // destroyed, or resumed by another waiter
                };
                match n.take_vm_leases(vm, needs.vm_lease, needs.volumes).await {
                    Ok(()) => break,
                    Err(e) => {
                        if warned.elapsed() > Duration::from_secs(10) {
                            tracing::warn!(vm_id = %vm, error = %e, "migrated VM still waits for its leases");
                            warned = std::time::Instant::now();
                        } else {
                            tracing::debug!(vm_id = %vm, error = %e, "leases not free yet");
                        }
                    }
                }
                drop(n);
                // The source gives the leases up right after the stream ends: look often for
                // a second, then, as for a source whose host id must expire first, calmly.
                attempts += 1;
                let pause = if attempts < 40 { 25 } else { 500 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            let Some(n) = node.upgrade() else { return };
            match n.vms.resume_incoming(vm, arrived.elapsed()).await {
                Ok(_) => tracing::info!(vm_id = %vm, waited_ms = arrived.elapsed().as_millis() as u64,
                    "migrated VM runs under its leases"),
                Err(e) => tracing::warn!(vm_id = %vm, error = %e, "cannot start the migrated VM"),
            }
        });
    }

    /// The disks `drives` name, their chains read from storage.
    async fn resolve_drives(&self, drives: Vec<DriveParams>) -> Result<Vec<VmDisk>, ApiError> {
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<VmDisk>, ApiError> {
            let mut disks = Vec::new();
            for d in drives {
                if let Some(Err(e)) = d.io_tune.map(|t| t.check()) {
                    return Err(ApiError::new(
                        ErrorCode::InvalidParameter,
                        format!("drive of image {}: ioTune: {e}", d.image),
                    ));
                }
                let layers = storage.layers(d.domain, d.image, d.volume)?;
                let top = layers.last().expect("a chain has a volume").path.clone();
                let leaf = d.volume.or_else(|| {
                    top.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.parse().ok())
                });
                disks.push(VmDisk {
                    direct_io: direct_io_supported(&top),
                    layers,
                    serial: Some(d.image.to_string().chars().take(20).collect()),
                    read_only: d.readonly,
                    // Storage errors stop the guest; `io_errors` decides what then.
                    write_error: oxvirt_qemu::WriteErrorPolicy::Stop,
                    image: Some(ImageRef {
                        sd: d.domain,
                        img: d.image,
                    }),
                    thin: d.thin.map(|policy| ThinDisk {
                        volume: leaf.map(|vol| VolumeRef {
                            sd: d.domain,
                            img: d.image,
                            vol,
                        }),
                        policy,
                    }),
                    slot: d.slot,
                    bus: d.iface.bus(),
                    io_tune: d.io_tune.filter(|t| !t.is_unlimited()),
                });
            }
            Ok(disks)
        })
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unexpected, format!("drive resolution failed: {e}")))?
    }

    /// The ISO file of `d`: its image must be one raw volume (an ISO is never a chain).
    async fn resolve_cd(&self, d: CdDrive) -> Result<CdMedia, ApiError> {
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || -> Result<CdMedia, ApiError> {
            let layers = storage.layers(d.domain, d.image, d.volume)?;
            match layers.as_slice() {
                [one] if one.format == ImageFormat::Raw => Ok(CdMedia {
                    image: ImageRef {
                        sd: d.domain,
                        img: d.image,
                    },
                    path: one.path.clone(),
                }),
                _ => Err(ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!(
                        "image {} on domain {} is not an ISO: a CD-ROM takes one raw volume, it has {} volume(s)",
                        d.image,
                        d.domain,
                        layers.len()
                    ),
                )),
            }
        })
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unexpected, format!("ISO resolution failed: {e}")))?
    }

    /// Turns API parameters into the VM manager's request, resolving drives to chains.
    async fn vm_create_request(&self, p: VmParams) -> Result<VmCreate, ApiError> {
        let disks = self.resolve_drives(p.drives.clone()).await?;
        let boot = match p.boot {
            Some(b) => Boot::Kernel {
                kernel: b.kernel,
                initrd: b.initrd,
                append: b.cmdline,
            },
            None => Boot::Disk,
        };
        let nics = p
            .nics
            .iter()
            .map(NicParams::to_spec)
            .collect::<Result<Vec<_>, _>>()?;
        let cdrom = match &p.cdrom {
            Some(c) => Some(VmCdrom {
                bus: c.iface,
                media: match c.drive {
                    Some(d) => Some(self.resolve_cd(d).await?),
                    None => None,
                },
                generation: 0,
            }),
            None => None,
        };
        Ok(VmCreate {
            id: p.id,
            name: p.vm_name,
            cpus: p.smp,
            max_cpus: p.max_vcpus,
            cpu_devices: p.cpu_devices,
            cpus_unplugged: false,
            max_memory_mib: p.max_mem_size,
            dimms: p.dimms,
            memory_mib: p.mem_size,
            accel: p.accel.unwrap_or(self.config.accel),
            boot,
            disks,
            nics,
            balloon: p.balloon,
            guest_agent: p.guest_agent,
            vnc: p.vnc,
            lease_domains: p
                .drives
                .iter()
                .map(|d| d.domain)
                .chain(p.lease.as_ref().map(|l| l.sd))
                .collect(),
            vm_lease: p.lease.as_ref().map(|l| l.sd),
            cdrom,
            boot_order: p.boot_order.clone(),
            resume_behavior: p.resume_behavior,
        })
    }

    /// Index of the disk whose chain lives in image `img` of domain `sd`.
    fn disk_index(&self, id: VmId, sd: SdUuid, img: ImgUuid) -> Result<usize, ApiError> {
        let info = self.vms.status(id)?;
        let dir = self.storage.domain(sd)?.image_dir(img);
        info.chains
            .iter()
            .position(|chain| chain.last().is_some_and(|p| p.starts_with(&dir)))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::ImageNotFound,
                    format!("VM {id} has no disk from image {img} on domain {sd}"),
                )
            })
    }

    pub(crate) async fn execute_vm(self: &Arc<Self>, req: VmRequest) -> Result<Value, ApiError> {
        let vms = self.vms.clone();
        match req {
            VmRequest::Create(p) => {
                let state = match p.restore_state {
                    Some(v) => Some(self.storage.domain(v.sd)?.volume_path(v.img, v.vol)),
                    None => None,
                };
                let create = self.vm_create_request(p).await?;
                let volumes = create.written_volumes();
                // Held until the instance is registered: a late release for an earlier
                // instance waits, then sees this one running.
                let _leases = self.lock_vm_leases(create.id).await;
                self.take_vm_leases(create.id, create.vm_lease, volumes).await?;
                let started = match &state {
                    Some(path) => vms.restore(create.clone(), path).await,
                    None => vms.create(create.clone()).await,
                };
                match started {
                    Ok(info) => Ok(to_json(&info)),
                    // The VM running here already holds them.
                    Err(e @ VmError::Exists(_)) => Err(e.into()),
                    Err(e) => {
                        self.release_vm_leases(create.id).await;
                        Err(e.into())
                    }
                }
            }
            VmRequest::AcquireLease(a) => {
                vms.status(a.id)?;
                let lver = self.acquire_vm_lease(a.id, a.sd).await?;
                vms.set_vm_lease(a.id, a.sd)?;
                Ok(json!({ "lver": lver }))
            }
            VmRequest::MigrationCreate(p) => {
                let encrypted = p.encrypted;
                let create = self.vm_create_request(p).await?;
                // Held too for thin disks: the source may grow their volumes while the
                // stream runs, and the devices here keep the sizes they had now until
                // refreshed, which the waiter does before the guest runs here.
                let thin = create.disks.iter().any(|d| d.thin.is_some());
                let (id, hold) = (create.id, self.needs_leases(&create) || thin);
                let info = vms.prepare_incoming(create, hold, encrypted).await?;
                if hold {
                    self.spawn_incoming_lease_waiter(id);
                }
                Ok(to_json(&info))
            }
            VmRequest::Destroy(id) => {
                let reason = vms.destroy(id).await?;
                // Given back before the answer: the caller may start it elsewhere at once.
                self.release_leases_if_down(id).await;
                Ok(json!({ "reason": to_json(&reason) }))
            }
            VmRequest::Shutdown(p) => {
                vms.status(p.id)?;
                let job = self.jobs.start("shutdown", Some(p.id), async move {
                    vms.shutdown(p.id, Duration::from_secs(p.timeout))
                        .await
                        .map(|r| to_json(&r))
                        .map_err(ApiError::from)
                });
                Ok(json!({ "jobID": job }))
            }
            VmRequest::Pause(id) => Ok(to_json(&vms.pause(id).await?)),
            VmRequest::Cont(id) => Ok(to_json(&vms.resume(id).await?)),
            VmRequest::Reset(id) => {
                vms.reboot(id).await?;
                Ok(json!({}))
            }
            VmRequest::GetStats(id) => Ok(to_json(&vms.stats(id).await?)),
            VmRequest::GetInfo(id) => Ok(to_json(&vms.status(id)?)),
            VmRequest::Migrate(m) => {
                vms.status(m.id)?;
                let params = MigrateParams {
                    uri: m.dst_uri,
                    downtime_limit_ms: m.max_downtime_ms,
                    max_bandwidth: m.max_bandwidth.saturating_mul(1 << 20),
                    timeout_ms: m.timeout_secs.saturating_mul(1000),
                    encrypted: m.encrypted,
                };
                let node = self.clone();
                let job = self.jobs.start("migrate", Some(m.id), async move {
                    let report = vms.migrate(m.id, params).await?;
                    // The guest is the destination's now; it starts once it holds these.
                    node.release_vm_leases(m.id).await;
                    Ok(to_json(&report))
                });
                Ok(json!({ "jobID": job }))
            }
            VmRequest::Hibernate(h) => {
                vms.status(h.id)?;
                let v = h.hibernation_volume;
                let path = self.storage.domain(v.sd)?.volume_path(v.img, v.vol);
                let node = self.clone();
                let job = self.jobs.start("hibernate", Some(h.id), async move {
                    let saved = vms.save_state(h.id, &path).await?;
                    // Given back before the job ends: the VM may resume anywhere right after.
                    node.release_leases_if_down(h.id).await;
                    Ok(to_json(&saved))
                });
                Ok(json!({ "jobID": job }))
            }
            VmRequest::MigrateCancel(id) => {
                vms.migrate_cancel(id).await?;
                Ok(json!({}))
            }
            VmRequest::SetTicket(t) => {
                let at = vms
                    .set_ticket(t.id, &t.password, Duration::from_secs(t.ttl))
                    .await?;
                Ok(to_json(&at))
            }
            VmRequest::Snapshot(p) => {
                let mut disks = Vec::new();
                let mut overlays = Vec::new();
                for d in &p.snap_drives {
                    let disk = self.disk_index(p.id, d.domain, d.image)?;
                    let overlay = self.storage.domain(d.domain)?.volume_path(d.image, d.volume);
                    disks.push(SnapshotDisk { disk, overlay });
                    overlays.push(VolumeRef {
                        sd: d.domain,
                        img: d.image,
                        vol: d.volume,
                    });
                }
                let memory = match p.snap_memory {
                    Some(v) => Some(self.storage.domain(v.sd)?.volume_path(v.img, v.vol)),
                    None => None,
                };
                vms.status(p.id)?;
                // A job, as VDSM's: saving the memory takes as long as a hibernation.
                let node = self.clone();
                let job = self.jobs.start("snapshot", Some(p.id), async move {
                    // The guest writes to the overlays from the switch on: hold them first.
                    node.take_vm_leases(p.id, None, overlays).await?;
                    let r = vms.snapshot(p.id, disks, memory.as_deref()).await;
                    node.sync_volume_leases(p.id).await;
                    Ok(to_json(&r?))
                });
                Ok(json!({ "jobID": job }))
            }
            VmRequest::Merge(p) => {
                let disk = self.disk_index(p.id, p.domain, p.image)?;
                let dom = self.storage.domain(p.domain)?;
                let (base, top) = (dom.volume_path(p.image, p.base), dom.volume_path(p.image, p.top));
                // block-commit writes into the base: it is held while the merge runs.
                let base_ref = VolumeRef {
                    sd: p.domain,
                    img: p.image,
                    vol: p.base,
                };
                self.take_vm_leases(p.id, None, vec![base_ref]).await?;
                let node = self.clone();
                let job = self.jobs.start("merge", Some(p.id), async move {
                    let r = vms
                        .merge(p.id, disk, &base, &top, Duration::from_secs(3600))
                        .await;
                    node.sync_volume_leases(p.id).await;
                    Ok(to_json(&r?))
                });
                Ok(json!({ "jobID": job }))
            }
            VmRequest::ReplicateStart(p) => {
                let (src, dst) = (p.src_disk.image_ref(), p.dst_disk.image_ref());
                vms.status(p.id)?;
                let storage = self.storage.clone();
                // The copy's chain up to the volume named (the disk's leaf), else all of it.
                let top = p.dst_disk.volume;
                let layers = tokio::task::spawn_blocking(move || storage.layers(dst.sd, dst.img, top))
                    .await
                    .map_err(|e| {
                        ApiError::new(ErrorCode::Unexpected, format!("chain lookup failed: {e}"))
                    })??;
                let leaf = layers
                    .last()
                    .and_then(|l| l.path.file_name()?.to_str()?.parse().ok())
                    .map(|vol| VolumeRef {
                        sd: dst.sd,
                        img: dst.img,
                        vol,
                    });
                // The mirror writes the copy's leaf with every guest write: hold it first.
                self.take_vm_leases(p.id, None, leaf.into_iter().collect())
                    .await?;
                match vms.replicate_start(p.id, src, dst, layers).await {
                    Ok(()) => Ok(json!({})),
                    Err(e) => {
                        self.sync_volume_leases(p.id).await;
                        Err(e.into())
                    }
                }
            }
            VmRequest::ReplicateFinish(p) => {
                let (src, dst) = (p.src_disk.image_ref(), p.dst_disk.image_ref());
                vms.status(p.id)?;
                let node = self.clone();
                let job = self.jobs.start("replicate", Some(p.id), async move {
                    let r = vms
                        .replicate_finish(p.id, src, dst, Duration::from_secs(3600))
                        .await;
                    // The source's leaf (switched) or the copy's (dropped) is no longer written.
                    node.sync_volume_leases(p.id).await;
                    Ok(to_json(&r?))
                });
                Ok(json!({ "jobID": job }))
            }
            VmRequest::ChangeCd(c) => {
                vms.status(c.id)?;
                let media = match c.drive {
                    Some(d) => Some(self.resolve_cd(d).await?),
                    None => None,
                };
                Ok(to_json(&vms.change_cd(c.id, media).await?))
            }
            VmRequest::SetCpus(c) => Ok(to_json(&vms.set_cpus(c.id, c.number_of_cpus).await?)),
            VmRequest::HotplugMemory(m) => Ok(to_json(&vms.hotplug_memory(m.id, m.size_mib).await?)),
            VmRequest::SetIoTune(t) => {
                let image = ImageRef {
                    sd: t.drive.domain,
                    img: t.drive.image,
                };
                vms.set_io_tune(t.id, image, t.io_tune).await?;
                Ok(json!({}))
            }
            VmRequest::GetIoTune(id) => {
                let tunes = vms.io_tunes(id).await?;
                Ok(Value::Array(
                    tunes
                        .into_iter()
                        .map(|(i, t)| json!({ "domainID": i.sd, "imageID": i.img, "ioTune": t }))
                        .collect(),
                ))
            }
            VmRequest::HotplugDisk(h) => {
                vms.status(h.id)?;
                let disk = self
                    .resolve_drives(vec![h.drive])
                    .await?
                    .pop()
                    .expect("one drive resolves to one disk");
                // The guest writes to it from the plug on: hold its leaf first.
                self.take_vm_leases(h.id, None, disk.leaf_volume().into_iter().collect())
                    .await?;
                match vms.hotplug_disk(h.id, disk).await {
                    Ok(info) => Ok(to_json(&info)),
                    Err(e) => {
                        self.sync_volume_leases(h.id).await;
                        Err(e.into())
                    }
                }
            }
            VmRequest::HotunplugDisk(h) => {
                self.disk_index(h.id, h.drive.domain, h.drive.image)?;
                let image = ImageRef {
                    sd: h.drive.domain,
                    img: h.drive.image,
                };
                let info = vms
                    .hotunplug_disk(h.id, image, Duration::from_secs(h.timeout))
                    .await?;
                // No longer written here: its leaf's lease goes back.
                self.sync_volume_leases(h.id).await;
                Ok(to_json(&info))
            }
            VmRequest::DiskSizeExtend(p) => {
                let disk = self.disk_index(p.id, p.drive_specs.domain, p.drive_specs.image)?;
                let size = vms.extend_disk(p.id, disk, p.new_size).await?;
                Ok(json!({ "size": size.to_string() }))
            }
            VmRequest::SetBalloonTarget(b) => {
                vms.set_balloon(b.id, b.target).await?;
                Ok(json!({}))
            }
            VmRequest::GetConsoleLog(p) => {
                let path = vms.console_log(p.id);
                let known = vms.status(p.id).is_ok();
                let tail = p.tail_bytes.min(CONSOLE_LOG_MAX);
                let read = tokio::task::spawn_blocking(move || read_tail(&path, tail))
                    .await
                    .map_err(|e| {
                        ApiError::new(ErrorCode::Unexpected, format!("console log read failed: {e}"))
                    })?;
                match read {
                    Ok((text, size)) => Ok(json!({ "log": text, "size": size, "truncated": size > tail })),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && !known => Err(ApiError::new(
                        ErrorCode::NoVm,
                        format!("VM {} has no console log on this node", p.id),
                    )),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Ok(json!({ "log": "", "size": 0, "truncated": false }))
                    }
                    Err(e) => Err(ApiError::new(
                        ErrorCode::Unexpected,
                        format!("cannot read the console log of VM {}: {e}", p.id),
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tail_starts_at_a_line_and_reports_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial.log");
        std::fs::write(&p, b"first line\nsecond line\nthird\xff line\n").unwrap();
        let (all, size) = read_tail(&p, 1 << 20).unwrap();
        assert_eq!(size, 35);
        assert!(all.starts_with("first line\n"));
        let (t, _) = read_tail(&p, 20).unwrap();
        assert_eq!(
            t, "third\u{fffd} line\n",
            "cut mid-line, the partial line is dropped"
        );
        assert!(read_tail(&dir.path().join("none"), 10).is_err());
        let req = VmRequest::parse(
            "VM.getConsoleLog",
            serde_json::from_str(r#"{"vmID":"6f2a3c51-93c4-4a2e-9d43-2b1a7c9e0f11"}"#).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            req,
            VmRequest::GetConsoleLog(ConsoleLogParams {
                tail_bytes: 65536,
                ..
            })
        ));
        assert!(VmRequest::parse(
            "VM.getConsoleLog",
            serde_json::from_str(r#"{"vmID":"6f2a3c51-93c4-4a2e-9d43-2b1a7c9e0f11","path":"/etc"}"#).unwrap()
        )
        .is_err());
    }
}
