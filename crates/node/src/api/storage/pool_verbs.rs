//! Pool, SPM, task and volume-lease verbs, and the SPM's volume verbs (which return a task id
//! at once, as VDSM's do). Parameter names follow VDSM's (`spUUID`, `sdUUID`, `hostID`,
//! `msdUUID`, `masterVersion`, `prevID`, `prevLver`…); oxvirt's additions are named in camelCase
//! (`ioTimeout`, `fenceMargin` in seconds).

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use oxvirt_rpc::RpcError;
use oxvirt_storage::mailbox::MailboxConfig;
use oxvirt_storage::tasks::{Collapse, GuardedVolume, Job, TaskPlan, TaskRecord};
use oxvirt_storage::{Allocation, Legality, SyncType, VolFormat};
use oxvirt_types::api::ErrorCode;
use oxvirt_types::{ImgUuid, PoolUuid, SdUuid, TaskId, VmId, VolUuid};

use super::super::{params, ApiError};
use super::error_chain;
use crate::storage::pool::{DomainAction, PoolService, PoolServiceError, PoolTiming};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Create {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "poolName")]
    pub name: String,
    #[serde(rename = "masterDom")]
    pub master: SdUuid,
    #[serde(rename = "masterVersion")]
    pub master_version: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connect {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "hostID")]
    pub host_id: u64,
    #[serde(rename = "msdUUID")]
    pub master: SdUuid,
    #[serde(rename = "masterVersion")]
    pub master_version: u64,
    /// Seconds (default 10, oVirt's).
    #[serde(rename = "ioTimeout", default)]
    pub io_timeout: Option<f64>,
    /// Seconds (default 60, sanlock's watchdog; smaller only among oxvirt hosts).
    #[serde(rename = "fenceMargin", default)]
    pub fence_margin: Option<f64>,
    /// Hosts whose mailboxes the SPM reads (default 250).
    #[serde(rename = "maxHostID", default)]
    pub max_host_id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolOnly {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "hostID", default)]
    pub host_id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "msdUUID")]
    pub master: SdUuid,
    #[serde(rename = "masterVersion")]
    pub master_version: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpmStart {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "prevID", default = "minus_one")]
    pub prev_id: i64,
    #[serde(rename = "prevLver", alias = "prevLVER", default = "minus_one")]
    pub prev_lver: i64,
    #[serde(rename = "maxHostID", default)]
    pub max_host_id: Option<u64>,
    #[serde(rename = "domVersion", default)]
    pub dom_version: Option<u32>,
}

fn minus_one() -> i64 {
    -1
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainInPool {
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "msdUUID", default)]
    pub master: Option<SdUuid>,
    #[serde(rename = "masterVersion", default)]
    pub master_version: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchMaster {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "oldMasterUUID")]
    pub old_master: SdUuid,
    #[serde(rename = "newMasterUUID")]
    pub new_master: SdUuid,
    #[serde(rename = "masterVersion")]
    pub master_version: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendExtend {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    #[serde(rename = "volUUID")]
    pub vol: VolUuid,
    /// Bytes.
    #[serde(rename = "newSize")]
    pub new_size: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "imgUUID")]
    pub img: ImgUuid,
    /// Bytes.
    pub size: u64,
    #[serde(rename = "volFormat")]
    pub format: String,
    pub preallocate: String,
    #[serde(rename = "diskType", default)]
    pub disk_type: Option<String>,
    #[serde(rename = "volUUID")]
    pub vol: VolUuid,
    #[serde(default)]
    pub desc: String,
    #[serde(rename = "srcImgUUID", default)]
    pub src_img: Option<ImgUuid>,
    #[serde(rename = "srcVolUUID", default)]
    pub src_vol: Option<VolUuid>,
    /// Bytes allocated at creation for a sparse COW volume (VDSM's `initialSize`; on a file
    /// domain the file's length, which caps a thin disk until the SPM extends it).
    #[serde(rename = "initialSize", default)]
    pub initial_size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRef {
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    #[serde(rename = "spUUID", default)]
    pub pool: Option<PoolUuid>,
    #[serde(rename = "imgUUID")]
    pub img: ImgUuid,
    #[serde(rename = "volUUID")]
    pub vol: VolUuid,
    #[serde(rename = "newSize", default)]
    pub new_size: Option<u64>,
    #[serde(default)]
    pub legality: Option<String>,
}

/// `StoragePool.forcedDetachStorageDomain` (VDSM's verb): domain `sdUUID` taken out of the
/// pool its metadata names, watched under host id `hostID`; runs as a job.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForcedDetach {
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    /// VDSM's: the pool to leave; oxvirt leaves whichever the metadata names.
    #[serde(rename = "spUUID", default)]
    pub pool: Option<PoolUuid>,
    #[serde(rename = "hostID")]
    pub host_id: u64,
    #[serde(rename = "ioTimeout", default)]
    pub io_timeout: Option<f64>,
    #[serde(rename = "fenceMargin", default)]
    pub fence_margin: Option<f64>,
}

impl ForcedDetach {
    pub fn timing(&self) -> Result<PoolTiming, ApiError> {
        Ok(PoolTiming {
            io_timeout: secs(
                self.io_timeout,
                oxvirt_lease::timeouts::DEFAULT_IO_TIMEOUT,
                "ioTimeout",
            )?,
            fence_margin: secs(
                self.fence_margin,
                oxvirt_lease::timeouts::SANLOCK_FENCE_MARGIN,
                "fenceMargin",
            )?,
            mailbox: MailboxConfig::default(),
        })
    }
}

/// `Volume.setDescription` (VDSM's verb).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeDescription {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    #[serde(rename = "imgUUID")]
    pub img: ImgUuid,
    #[serde(rename = "volUUID")]
    pub vol: VolUuid,
    pub description: String,
}

/// The most a `Volume.writeData` chunk may carry, before base64: requests stay well under
/// the API's body limit.
pub const DATA_CHUNK: usize = 512 * 1024;

/// `Volume.writeData`: oxvirt's JSON-RPC form of VDSM's image stream upload (`PUT /` with
/// `Storage-Pool-Id`…), in chunks of at most [`DATA_CHUNK`] bytes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeWriteData {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    #[serde(rename = "imgUUID")]
    pub img: ImgUuid,
    #[serde(rename = "volUUID")]
    pub vol: VolUuid,
    pub offset: u64,
    /// Base64.
    pub data: String,
    /// fsync before answering (the last chunk).
    #[serde(default)]
    pub sync: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "imgUUID")]
    pub img: ImgUuid,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageMove {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "srcDomUUID")]
    pub src: SdUuid,
    #[serde(rename = "dstDomUUID")]
    pub dst: SdUuid,
    #[serde(rename = "imgUUID")]
    pub img: ImgUuid,
    /// "copy" or "move".
    pub op: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageCopy {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    #[serde(rename = "srcImgUUID")]
    pub src_img: ImgUuid,
    /// Copy the image as it was when this volume was its leaf (a snapshot's volume), which a
    /// running VM does not write: the VM may run meanwhile. The whole chain when absent.
    #[serde(rename = "srcVolUUID", default)]
    pub src_vol: Option<VolUuid>,
    #[serde(rename = "dstImgUUID")]
    pub dst_img: ImgUuid,
    #[serde(rename = "dstVolUUID")]
    pub dst_vol: VolUuid,
    #[serde(rename = "dstSdUUID", default)]
    pub dst_sd: Option<SdUuid>,
    /// "SHARED" makes the copy a template.
    #[serde(rename = "volType", default)]
    pub vol_type: Option<String>,
    #[serde(rename = "volFormat", default)]
    pub format: Option<String>,
    #[serde(default)]
    pub preallocate: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneStructure {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    #[serde(rename = "imgUUID")]
    pub img: ImgUuid,
    #[serde(rename = "dstSdUUID")]
    pub dst: SdUuid,
}

/// `Image.syncData`: the data of an image whose structure was cloned to `dstSdUUID`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncData {
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    #[serde(rename = "imgUUID")]
    pub img: ImgUuid,
    #[serde(rename = "dstSdUUID")]
    pub dst: SdUuid,
    /// `INTERNAL` (every volume but the leaf) or `ALL`.
    #[serde(rename = "syncType")]
    pub sync_type: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Merge {
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    #[serde(rename = "spUUID")]
    pub pool: PoolUuid,
    #[serde(rename = "imgUUID")]
    pub img: ImgUuid,
    #[serde(rename = "ancestor")]
    pub base: VolUuid,
    #[serde(rename = "successor")]
    pub top: VolUuid,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRef {
    #[serde(rename = "spUUID", default)]
    pub pool: Option<PoolUuid>,
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    /// The VM's id.
    #[serde(rename = "leaseID")]
    pub lease: VmId,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRef {
    #[serde(rename = "taskID")]
    pub task: TaskId,
}

/// The verbs of this module.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolRequest {
    Create(Create),
    Connect(Connect),
    Disconnect(PoolOnly),
    Refresh(Refresh),
    SpmStart(SpmStart),
    SpmStop(PoolOnly),
    GetSpmStatus(PoolOnly),
    GetInfo(PoolOnly),
    Domain(DomainInPool, DomainAction),
    SwitchMaster(SwitchMaster),
    SendExtend(SendExtend),
    AllTasks(PoolOnly),
    VolumeCreate(VolumeCreate),
    VolumeDelete(VolumeRef),
    VolumeExtendSize(VolumeRef),
    VolumeSetLegality(VolumeRef),
    VolumeSetDescription(VolumeDescription),
    /// Started as a job by the node's dispatcher (it waits for leases); never executed here.
    ForcedDetach(ForcedDetach),
    VolumeWriteData(VolumeWriteData),
    VolumeAcquireLease(VolumeRef),
    VolumeReleaseLease(VolumeRef),
    VolumeLeaseStatus(VolumeRef),
    ImageDelete(ImageRef),
    ImageMove(ImageMove),
    ImageCopy(ImageCopy),
    ImageCloneStructure(CloneStructure),
    ImageSyncData(SyncData),
    ImageMerge(Merge),
    /// Live merge, before the VM's block commit: base ILLEGAL (and extended if needed).
    ImagePrepareMerge(Merge),
    /// Live merge, after the VM's block commit: re-link the chain, delete top, base LEGAL.
    ImageFinalizeMerge(Merge),
    LeaseCreate(LeaseRef),
    LeaseDelete(LeaseRef),
    LeaseInfo(LeaseRef),
    TaskStatus(TaskRef),
    TaskInfo(TaskRef),
    TaskClear(TaskRef),
    TaskStop(TaskRef),
}

impl PoolRequest {
    pub fn parse(method: &str, p: Map<String, Value>) -> Result<PoolRequest, RpcError> {
        Ok(match method {
            "StoragePool.create" => PoolRequest::Create(params(method, p)?),
            "StoragePool.connect" => PoolRequest::Connect(params(method, p)?),
            "StoragePool.disconnect" => PoolRequest::Disconnect(params(method, p)?),
            "StoragePool.refresh" => PoolRequest::Refresh(params(method, p)?),
            "StoragePool.spmStart" => PoolRequest::SpmStart(params(method, p)?),
            "StoragePool.spmStop" => PoolRequest::SpmStop(params(method, p)?),
            "StoragePool.getSpmStatus" => PoolRequest::GetSpmStatus(params(method, p)?),
            "StoragePool.getInfo" => PoolRequest::GetInfo(params(method, p)?),
            "StoragePool.attachStorageDomain" | "StorageDomain.attach" => {
                PoolRequest::Domain(params(method, p)?, DomainAction::Attach)
            }
            "StoragePool.activateStorageDomain" | "StorageDomain.activate" => {
                PoolRequest::Domain(params(method, p)?, DomainAction::Activate)
            }
            "StoragePool.deactivateStorageDomain" | "StorageDomain.deactivate" => {
                PoolRequest::Domain(params(method, p)?, DomainAction::Deactivate)
            }
            "StoragePool.detachStorageDomain" | "StorageDomain.detach" => {
                PoolRequest::Domain(params(method, p)?, DomainAction::Detach)
            }
            "StoragePool.switchMaster" => PoolRequest::SwitchMaster(params(method, p)?),
            "StoragePool.sendExtendMsg" => PoolRequest::SendExtend(params(method, p)?),
            "StoragePool.getAllTasksStatuses" => PoolRequest::AllTasks(params(method, p)?),
            "Volume.create" => PoolRequest::VolumeCreate(params(method, p)?),
            "Volume.delete" => PoolRequest::VolumeDelete(params(method, p)?),
            "Volume.extendSize" => PoolRequest::VolumeExtendSize(params(method, p)?),
            "Volume.setLegality" => PoolRequest::VolumeSetLegality(params(method, p)?),
            "Volume.setDescription" => PoolRequest::VolumeSetDescription(params(method, p)?),
            "StoragePool.forcedDetachStorageDomain" => PoolRequest::ForcedDetach(params(method, p)?),
            "Volume.writeData" => PoolRequest::VolumeWriteData(params(method, p)?),
            "Volume.acquireLease" => PoolRequest::VolumeAcquireLease(params(method, p)?),
            "Volume.releaseLease" => PoolRequest::VolumeReleaseLease(params(method, p)?),
            "Volume.getLeaseStatus" => PoolRequest::VolumeLeaseStatus(params(method, p)?),
            "Image.delete" => PoolRequest::ImageDelete(params(method, p)?),
            "Image.move" => PoolRequest::ImageMove(params(method, p)?),
            "Image.copy" => PoolRequest::ImageCopy(params(method, p)?),
            "Image.cloneStructure" => PoolRequest::ImageCloneStructure(params(method, p)?),
            "Image.syncData" => PoolRequest::ImageSyncData(params(method, p)?),
            "Image.mergeSnapshots" => PoolRequest::ImageMerge(params(method, p)?),
            "Image.prepareMerge" => PoolRequest::ImagePrepareMerge(params(method, p)?),
            "Image.finalizeMerge" => PoolRequest::ImageFinalizeMerge(params(method, p)?),
            "Lease.create" => PoolRequest::LeaseCreate(params(method, p)?),
            "Lease.delete" => PoolRequest::LeaseDelete(params(method, p)?),
            "Lease.info" => PoolRequest::LeaseInfo(params(method, p)?),
            "Task.getStatus" => PoolRequest::TaskStatus(params(method, p)?),
            "Task.getInfo" => PoolRequest::TaskInfo(params(method, p)?),
            "Task.clear" => PoolRequest::TaskClear(params(method, p)?),
            "Task.stop" => PoolRequest::TaskStop(params(method, p)?),
            other => return Err(RpcError::method_not_found(other)),
        })
    }
}

impl From<PoolServiceError> for ApiError {
    fn from(e: PoolServiceError) -> ApiError {
        use oxvirt_storage::spm::{SpmError, VolumeLeaseError};
        use PoolServiceError as E;
        let code = match &e {
            E::NotSpm { .. } | E::Spm(SpmError::NotSpm { .. }) => ErrorCode::NotSpm,
            E::Spm(SpmError::Busy { .. } | SpmError::Contending { .. } | SpmError::AlreadySpm { .. }) => {
                ErrorCode::SpmBusy
            }
            E::Spm(SpmError::Lease { .. }) | E::HostId { .. } => ErrorCode::LeaseError,
            E::Lease(VolumeLeaseError::Locked { .. } | VolumeLeaseError::LockedHere { .. })
            | E::VolumeInUse { .. } => ErrorCode::VolumeLocked,
            E::VmLease {
                source: oxvirt_lease::LeaseError::OwnedByOther { .. },
                ..
            } => ErrorCode::VolumeLocked,
            E::VmLease { .. } => ErrorCode::LeaseError,
            E::Lease(VolumeLeaseError::NoVolume { .. }) => ErrorCode::VolumeNotFound,
            E::Lease(_) => ErrorCode::LeaseError,
            E::Task(oxvirt_storage::tasks::TaskError::NotFound { .. }) => ErrorCode::TaskNotFound,
            E::NotConnected(_) | E::NoPool => ErrorCode::NotConnected,
            E::OtherPool(_) | E::DomainInUse { .. } => ErrorCode::Busy,
            E::Invalid(_) | E::Pool(oxvirt_storage::pool::PoolError::Invalid { .. }) => {
                ErrorCode::InvalidParameter
            }
            E::Storage(s) => super::storage_code(s),
            E::Service(crate::storage::StorageServiceError::DomainNotFound(_)) => {
                ErrorCode::StorageDomainNotFound
            }
            _ => ErrorCode::StorageError,
        };
        ApiError::new(code, error_chain(&e))
    }
}

fn format_of(s: &str) -> Result<VolFormat, ApiError> {
    match s.to_ascii_uppercase().as_str() {
        "COW" | "4" => Ok(VolFormat::Cow),
        "RAW" | "5" => Ok(VolFormat::Raw),
        _ => Err(ApiError::new(
            ErrorCode::InvalidParameter,
            format!("volFormat {s:?} is neither COW nor RAW"),
        )),
    }
}

fn allocation_of(s: &str) -> Result<Allocation, ApiError> {
    match s.to_ascii_uppercase().as_str() {
        "SPARSE" | "2" => Ok(Allocation::Sparse),
        "PREALLOCATED" | "1" => Ok(Allocation::Preallocated),
        _ => Err(ApiError::new(
            ErrorCode::InvalidParameter,
            format!("preallocate {s:?} is neither SPARSE nor PREALLOCATED"),
        )),
    }
}

fn secs(v: Option<f64>, default: Duration, what: &str) -> Result<Duration, ApiError> {
    match v {
        None => Ok(default),
        Some(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err(ApiError::new(
            ErrorCode::InvalidParameter,
            format!("{what} {s} must be in (0, 3600] seconds"),
        )),
    }
}

/// VDSM's `Task.getStatus` shape.
pub fn task_status(r: &TaskRecord) -> Value {
    let (state, result) = r.state.vdsm();
    json!({
        "taskID": r.id,
        "taskState": state,
        "taskResult": result,
        "code": if r.error.is_some() { 100 } else { 0 },
        "message": r.error.clone().unwrap_or_else(|| "OK".into()),
        "verb": r.verb,
    })
}

fn task_info(r: &TaskRecord) -> Value {
    let mut v = serde_json::to_value(r).expect("task records serialize");
    v["status"] = task_status(r);
    v
}

fn ensure_pool(
    pools: &PoolService,
    pool: PoolUuid,
) -> Result<std::sync::Arc<crate::storage::pool::ConnectedPool>, ApiError> {
    pools.get(pool).map_err(ApiError::from)
}

pub fn execute_pool(pools: &PoolService, req: PoolRequest) -> Result<Value, ApiError> {
    let task = |pool: PoolUuid, plan: TaskPlan| -> Result<Value, ApiError> {
        let cp = ensure_pool(pools, pool)?;
        Ok(json!(cp.start_task(plan)?))
    };
    match req {
        PoolRequest::Create(c) => {
            let pm = pools.create(c.pool, &c.name, c.master, c.master_version)?;
            Ok(serde_json::to_value(pm).expect("pool metadata"))
        }
        PoolRequest::Connect(c) => {
            let io_timeout = secs(
                c.io_timeout,
                oxvirt_lease::timeouts::DEFAULT_IO_TIMEOUT,
                "ioTimeout",
            )?;
            let fence_margin = secs(
                c.fence_margin,
                oxvirt_lease::timeouts::SANLOCK_FENCE_MARGIN,
                "fenceMargin",
            )?;
            let max_host_id = c.max_host_id.unwrap_or(oxvirt_storage::mailbox::MAX_HOST_ID);
            if max_host_id == 0
                || max_host_id > oxvirt_storage::mailbox::MAX_HOST_ID
                || c.host_id > max_host_id
            {
                return Err(ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!(
                        "maxHostID {max_host_id} must be in 1..=250 and at least hostID {}",
                        c.host_id
                    ),
                ));
            }
            let timing = PoolTiming {
                io_timeout,
                fence_margin,
                mailbox: MailboxConfig {
                    max_host_id,
                    ..MailboxConfig::default()
                },
            };
            Ok(pools.connect(c.pool, c.host_id, c.master, c.master_version, timing)?)
        }
        PoolRequest::Disconnect(p) => {
            pools.disconnect(p.pool)?;
            Ok(json!(true))
        }
        PoolRequest::Refresh(r) => {
            ensure_pool(pools, r.pool)?.refresh(r.master, r.master_version)?;
            Ok(json!(true))
        }
        PoolRequest::SpmStart(s) => {
            let cp = ensure_pool(pools, s.pool)?;
            Ok(json!(cp.spm_start(s.prev_id, s.prev_lver)?))
        }
        PoolRequest::SpmStop(p) => {
            ensure_pool(pools, p.pool)?.spm_stop()?;
            Ok(json!(true))
        }
        PoolRequest::GetSpmStatus(p) => Ok(ensure_pool(pools, p.pool)?.spm_status()?),
        PoolRequest::GetInfo(p) => {
            let cp = ensure_pool(pools, p.pool)?;
            let mut info = cp.info()?;
            info["mailbox"] = json!(cp.spm_mailbox_stats());
            Ok(info)
        }
        PoolRequest::Domain(d, action) => {
            let cp = ensure_pool(pools, d.pool)?;
            cp.set_domain(d.sd, action)?;
            Ok(json!(true))
        }
        PoolRequest::SwitchMaster(s) => {
            let cp = ensure_pool(pools, s.pool)?;
            if cp.master().0 != s.old_master {
                return Err(ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!(
                        "the master of pool {} is {}, not {}",
                        s.pool,
                        cp.master().0,
                        s.old_master
                    ),
                ));
            }
            cp.switch_master(s.new_master, s.master_version)?;
            Ok(json!(true))
        }
        PoolRequest::SendExtend(e) => {
            let cp = ensure_pool(pools, e.pool)?;
            let mib = oxvirt_storage::mailbox::ExtendMessage::mib_for(e.new_size);
            let (size, took) = cp.extend_volume(e.sd, e.vol, mib, Duration::from_secs(60))?;
            Ok(json!({ "sizeMib": size, "latencyMs": took.as_secs_f64() * 1e3 }))
        }
        PoolRequest::AllTasks(p) => {
            let cp = ensure_pool(pools, p.pool)?;
            let all: serde_json::Map<String, Value> = cp
                .all_tasks()
                .iter()
                .map(|r| (r.id.to_string(), task_status(r)))
                .collect();
            Ok(json!({ "allTasksStatus": all }))
        }
        PoolRequest::VolumeCreate(v) => {
            if v.initial_size.is_some() && v.src_vol.is_some_and(|s| !s.is_nil()) {
                return Err(ApiError::new(
                    ErrorCode::InvalidParameter,
                    "initialSize applies to a new base volume, not to a snapshot or a clone",
                ));
            }
            let format = format_of(&v.format)?;
            let allocation = allocation_of(&v.preallocate)?;
            let src_vol = v.src_vol.filter(|s| !s.is_nil());
            let job = match (src_vol, v.src_img) {
                (None, _) => Job::CreateVolume {
                    sd: v.sd,
                    img: v.img,
                    vol: v.vol,
                    capacity: v.size,
                    format,
                    allocation,
                    disktype: v.disk_type.clone().unwrap_or_else(|| "DATA".into()),
                    description: v.desc.clone(),
                    initial_size: v.initial_size,
                },
                // A source volume below the leaf is a preview: the new leaf shows its content.
                (Some(src), Some(src_img)) if src_img == v.img => Job::CreateSnapshot {
                    sd: v.sd,
                    img: v.img,
                    vol: v.vol,
                    capacity: Some(v.size).filter(|s| *s > 0),
                    description: v.desc.clone(),
                    content_of: Some(src),
                },
                (Some(tmpl_vol), Some(tmpl_img)) => Job::CloneFromTemplate {
                    sd: v.sd,
                    tmpl_img,
                    tmpl_vol,
                    img: v.img,
                    vol: v.vol,
                    description: v.desc.clone(),
                },
                (Some(_), None) => {
                    return Err(ApiError::new(
                        ErrorCode::InvalidParameter,
                        "srcVolUUID needs srcImgUUID",
                    ));
                }
            };
            // One atomic job: a failure leaves nothing behind.
            task(v.pool, TaskPlan::new("createVolume").atomic(job))
        }
        PoolRequest::VolumeDelete(v) => {
            let pool = need_pool(&v)?;
            let cp = ensure_pool(pools, pool)?;
            cp.refuse_if_held(v.sd, v.img, Some(&[v.vol]), "deleted")?;
            let guard = GuardedVolume {
                sd: v.sd,
                img: v.img,
                vol: v.vol,
            };
            task(
                pool,
                TaskPlan::new("deleteVolume")
                    .guard([guard])
                    .forward(Job::DeleteVolume {
                        sd: v.sd,
                        img: v.img,
                        vol: v.vol,
                    }),
            )
        }
        PoolRequest::VolumeExtendSize(v) => {
            let pool = need_pool(&v)?;
            let capacity = v
                .new_size
                .ok_or_else(|| ApiError::new(ErrorCode::MissingParam, "Volume.extendSize needs newSize"))?;
            task(
                pool,
                TaskPlan::new("extendVolumeSize").forward(Job::ResizeVolume {
                    sd: v.sd,
                    img: v.img,
                    vol: v.vol,
                    capacity,
                }),
            )
        }
        PoolRequest::VolumeSetLegality(v) => {
            let pool = need_pool(&v)?;
            let l = v
                .legality
                .as_deref()
                .and_then(|s| Legality::parse(&s.to_ascii_uppercase()))
                .ok_or_else(|| {
                    ApiError::new(ErrorCode::InvalidParameter, "legality must be LEGAL or ILLEGAL")
                })?;
            task(
                pool,
                TaskPlan::new("setVolumeLegality").atomic(Job::SetLegality {
                    sd: v.sd,
                    img: v.img,
                    vol: v.vol,
                    legality: l,
                }),
            )
        }
        PoolRequest::ForcedDetach(f) => {
            let pools_left = pools.forced_detach(f.sd, f.host_id, f.timing()?)?;
            Ok(json!({ "pools": pools_left }))
        }
        PoolRequest::VolumeSetDescription(v) => {
            let cp = ensure_pool(pools, v.pool)?;
            cp.set_volume_description(v.sd, v.img, v.vol, &v.description)?;
            Ok(json!(true))
        }
        PoolRequest::VolumeWriteData(v) => {
            use base64::Engine as _;
            let data = base64::engine::general_purpose::STANDARD
                .decode(v.data.as_bytes())
                .map_err(|e| {
                    ApiError::new(ErrorCode::InvalidParameter, format!("data is not base64: {e}"))
                })?;
            if data.len() > DATA_CHUNK {
                return Err(ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!("a chunk carries at most {DATA_CHUNK} bytes, not {}", data.len()),
                ));
            }
            let cp = ensure_pool(pools, v.pool)?;
            cp.write_volume_data(v.sd, v.img, v.vol, v.offset, &data, v.sync)?;
            Ok(json!(data.len()))
        }
        PoolRequest::VolumeAcquireLease(v) => {
            let cp = pools.current().ok_or(PoolServiceError::NoPool)?;
            let lver = cp.acquire_volume_lease(v.sd, v.img, v.vol, None)?;
            Ok(json!({ "lver": lver, "hostId": cp.host_id }))
        }
        PoolRequest::VolumeReleaseLease(v) => {
            let cp = pools.current().ok_or(PoolServiceError::NoPool)?;
            cp.release_volume_lease(v.sd, v.vol)?;
            Ok(json!(true))
        }
        PoolRequest::VolumeLeaseStatus(v) => {
            let cp = pools.current().ok_or(PoolServiceError::NoPool)?;
            let owner = cp.volume_lease_owner(v.sd, v.img, v.vol)?;
            Ok(json!({ "owner": owner }))
        }
        PoolRequest::ImageDelete(i) => {
            let cp = ensure_pool(pools, i.pool)?;
            cp.refuse_if_held(i.sd, i.img, None, "deleted")?;
            task(
                i.pool,
                TaskPlan::new("deleteImage")
                    .guard(cp.image_guard(i.sd, i.img))
                    .forward(Job::DeleteImage { sd: i.sd, img: i.img }),
            )
        }
        PoolRequest::ImageMove(m) => {
            let cp = ensure_pool(pools, m.pool)?;
            let copy = Job::CopyImage {
                src_sd: m.src,
                img: m.img,
                dst_sd: m.dst,
                dst_img: m.img,
                collapse: None,
            };
            let undo = Job::DeleteImage {
                sd: m.dst,
                img: m.img,
            };
            match m.op.to_ascii_lowercase().as_str() {
                "copy" => {
                    cp.refuse_if_held(m.src, m.img, None, "copied")?;
                    task(m.pool, TaskPlan::new("copyImage").undoable(copy, undo))
                }
                "move" => task(m.pool, {
                    cp.refuse_if_held(m.src, m.img, None, "moved")?;
                    // The source goes at the end: nobody may write it meanwhile.
                    TaskPlan::new("moveImage")
                        .guard(cp.image_guard(m.src, m.img))
                        .undoable(copy, undo)
                        .forward(Job::DeleteImage {
                            sd: m.src,
                            img: m.img,
                        })
                }),
                other => Err(ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!("op {other:?} is neither copy nor move"),
                )),
            }
        }
        PoolRequest::ImageCopy(c) => {
            let dst = c.dst_sd.unwrap_or(c.sd);
            let format = c
                .format
                .as_deref()
                .map(format_of)
                .transpose()?
                .unwrap_or(VolFormat::Cow);
            let allocation = c
                .preallocate
                .as_deref()
                .map(allocation_of)
                .transpose()?
                .unwrap_or(Allocation::Sparse);
            let shared = match c.vol_type.as_deref().map(str::to_ascii_uppercase).as_deref() {
                None | Some("LEAF") => false,
                Some("SHARED") => true,
                Some(o) => {
                    return Err(ApiError::new(
                        ErrorCode::InvalidParameter,
                        format!("volType {o:?} is neither LEAF nor SHARED"),
                    ))
                }
            };
            let cp = ensure_pool(pools, c.pool)?;
            let read = c
                .src_vol
                .map(|top| cp.volumes_up_to(c.sd, c.src_img, top))
                .transpose()?;
            cp.refuse_if_held(c.sd, c.src_img, read.as_deref(), "copied")?;
            let mut plan = TaskPlan::new("copyImage").undoable(
                Job::CopyImage {
                    src_sd: c.sd,
                    img: c.src_img,
                    dst_sd: dst,
                    dst_img: c.dst_img,
                    collapse: Some(Collapse {
                        vol: c.dst_vol,
                        format,
                        allocation,
                        top: c.src_vol,
                    }),
                },
                Job::DeleteImage {
                    sd: dst,
                    img: c.dst_img,
                },
            );
            if shared {
                plan = plan.forward(Job::MakeTemplate {
                    sd: dst,
                    img: c.dst_img,
                    vol: c.dst_vol,
                });
            }
            task(c.pool, plan)
        }
        // Only the source's metadata is read: a VM may run on it (a live storage migration).
        PoolRequest::ImageCloneStructure(c) => task(c.pool, {
            ensure_pool(pools, c.pool)?;
            TaskPlan::new("cloneImageStructure").undoable(
                Job::CloneStructure {
                    src_sd: c.sd,
                    img: c.img,
                    dst_sd: c.dst,
                },
                Job::DeleteImage {
                    sd: c.dst,
                    img: c.img,
                },
            )
        }),
        // The volumes read are below the leaf, which a running VM reads but never writes —
        // unless a live merge commits into one: then its lease is held and the sync waits.
        PoolRequest::ImageSyncData(c) => task(c.pool, {
            let cp = ensure_pool(pools, c.pool)?;
            let sync = SyncType::parse(&c.sync_type).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!("syncType {:?} is not INTERNAL or ALL", c.sync_type),
                )
            })?;
            let vols = match sync {
                SyncType::All => None,
                SyncType::Internal => Some(cp.internal_volumes(c.sd, c.img)?),
            };
            cp.refuse_if_held(c.sd, c.img, vols.as_deref(), "synced")?;
            TaskPlan::new("syncImageData").forward(Job::SyncData {
                src_sd: c.sd,
                img: c.img,
                dst_sd: c.dst,
                sync,
            })
        }),
        // A cold merge holds the leases of the volumes it changes; the live one (prepare and
        // finalize around the VM's own block commit) leaves them to the VM that writes them.
        PoolRequest::ImageMerge(m) => task(m.pool, {
            let cp = ensure_pool(pools, m.pool)?;
            TaskPlan::new("mergeSnapshots")
                .guard(cp.merge_guard(m.sd, m.img, m.base, m.top))
                .undoable(
                    Job::PrepareMerge {
                        sd: m.sd,
                        img: m.img,
                        base: m.base,
                        top: m.top,
                    },
                    Job::SetLegality {
                        sd: m.sd,
                        img: m.img,
                        vol: m.base,
                        legality: Legality::Legal,
                    },
                )
                .forward(Job::MergeCommit {
                    sd: m.sd,
                    img: m.img,
                    base: m.base,
                    top: m.top,
                })
                .forward(Job::FinalizeMerge {
                    sd: m.sd,
                    img: m.img,
                    base: m.base,
                    top: m.top,
                })
        }),
        PoolRequest::ImagePrepareMerge(m) => task(
            m.pool,
            TaskPlan::new("prepareMerge").undoable(
                Job::PrepareMerge {
                    sd: m.sd,
                    img: m.img,
                    base: m.base,
                    top: m.top,
                },
                Job::SetLegality {
                    sd: m.sd,
                    img: m.img,
                    vol: m.base,
                    legality: Legality::Legal,
                },
            ),
        ),
        PoolRequest::ImageFinalizeMerge(m) => task(
            m.pool,
            TaskPlan::new("finalizeMerge").forward(Job::FinalizeMerge {
                sd: m.sd,
                img: m.img,
                base: m.base,
                top: m.top,
            }),
        ),
        PoolRequest::LeaseCreate(l) => {
            let cp = pools.current().ok_or(PoolServiceError::NoPool)?;
            let info = cp.create_xlease(l.sd, &l.lease.to_string())?;
            Ok(json!({ "leaseID": l.lease, "sdUUID": l.sd, "offset": info.offset, "path": info.path }))
        }
        PoolRequest::LeaseDelete(l) => {
            let cp = pools.current().ok_or(PoolServiceError::NoPool)?;
            Ok(json!(cp.remove_xlease(l.sd, &l.lease.to_string())?))
        }
        PoolRequest::LeaseInfo(l) => {
            let cp = pools.current().ok_or(PoolServiceError::NoPool)?;
            // ownerStatus: the owner's liveness as this host sees it (free, unknown, live, fail,
            // dead); "dead" or no owner means the lease may be taken.
            let (owner, status) = match cp.vm_lease_owner_status(l.sd, &l.lease.to_string())? {
                None => (None, Some("free".to_string())),
                Some((o, st)) => (Some(o), st.map(|s| format!("{s:?}").to_lowercase())),
            };
            Ok(json!({ "leaseID": l.lease, "sdUUID": l.sd, "owner": owner, "ownerStatus": status }))
        }
        PoolRequest::TaskStatus(t) => {
            let cp = pools.current().ok_or(PoolServiceError::NoPool)?;
            Ok(json!({ "taskStatus": task_status(&cp.task(t.task)?) }))
        }
        PoolRequest::TaskInfo(t) => {
            let cp = pools.current().ok_or(PoolServiceError::NoPool)?;
            Ok(task_info(&cp.task(t.task)?))
        }
        PoolRequest::TaskClear(t) => {
            let cp = pools.current().ok_or(PoolServiceError::NoPool)?;
            cp.clear_task(t.task)?;
            Ok(json!(true))
        }
        PoolRequest::TaskStop(t) => {
            let cp = pools.current().ok_or(PoolServiceError::NoPool)?;
            cp.stop_task(t.task)?;
            Ok(json!(true))
        }
    }
}

fn need_pool(v: &VolumeRef) -> Result<PoolUuid, ApiError> {
    v.pool
        .ok_or_else(|| ApiError::new(ErrorCode::MissingParam, "spUUID is required"))
}
