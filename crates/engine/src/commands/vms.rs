//! VMs and templates: creation (from Blank or as thin clones of a template), start, stop,
//! shutdown, pause, migration, removal; templates made from a VM.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use oxvirt_scheduler::Purpose;

use crate::app::App;
use crate::db::{ListQuery, Ref, VmFilter};
use crate::model::{
    ClusterId, CpuTopology, DcId, Disk, DiskAttachment, DiskFormat, DiskId, DiskInterface, DiskStatus,
    HostStatus, HostUuid, TemplateId, TemplateStatus, VmId, VmOs, VmRuntime, VmStatus, VolType, VolUuid,
    Volume, BLANK_TEMPLATE_ID,
};
use crate::nodes::NodeClient;
use crate::saga::{SagaDef, Step, StepCtx, StepError};
use crate::scheduling::choose_host;

use super::step_err;
use super::storage::{create_volume, delete_image};
use super::{Added, CommandError, Commands};

const CODE_NO_VM: i64 = 1;
const CODE_VM_EXISTS: i64 = 4;
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddVm {
    pub name: String,
    pub description: String,
    pub cluster: ClusterId,
    /// Blank (`BLANK_TEMPLATE_ID`) or a template whose disks are thin-cloned.
    pub template: TemplateId,
    pub memory_bytes: Option<u64>,
    pub cpu: Option<CpuTopology>,
    pub os: VmOs,
    pub ha: Option<crate::model::HighAvailability>,
    /// What to do when storage fails under it (default `auto_resume`; always `kill` for a
    /// highly available VM, see [`crate::model::Vm::effective_resume_behavior`]).
    pub resume_behavior: Option<crate::model::ResumeBehavior>,
}

/// How a disk is attached to a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddVmDisk {
    pub vm: VmId,
    pub interface: DiskInterface,
    pub bootable: bool,
    pub active: bool,
}

impl AddVmDisk {
    pub fn attachment(&self, disk: DiskId) -> DiskAttachment {
        DiskAttachment {
            vm_id: self.vm,
            disk_id: disk,
            interface: self.interface,
            bootable: self.bootable,
            active: self.active,
            read_only: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StartOptions {
    /// Run on this host (else the scheduler chooses).
    pub host: Option<HostUuid>,
    pub paused: bool,
    /// Run once with this CD and boot order.
    pub run_once: Option<RunOnce>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrateOptions {
    pub host: Option<HostUuid>,
}

/// How many vCPUs a VM may be given while it runs: oVirt's default of 16 sockets, or what
/// it has when that is more (QEMU's q35 takes up to 288).
pub(crate) fn max_vcpus(vcpus: u64) -> u64 {
    vcpus.clamp(16, 288)
}

/// A node's answer to a hot plug: what the running VM cannot take (past its maximum, an
/// unplug QEMU refuses) is the request's fault, not the engine's.
fn refused_by_vm(e: crate::nodes::NodeError) -> CommandError {
    match e.code() {
        Some(c) if c == oxvirt_types::api::ErrorCode::InvalidParameter.code() => {
            CommandError::Conflict(e.to_string())
        }
        _ => e.into(),
    }
}

/// How much memory, MiB, a VM may be given while it runs: oVirt's default of four times what
/// it starts with. A VM under [`MEMORY_HOTPLUG_MIN_MIB`] gets no room: a guest kernel pays a
/// few MiB at boot for memory hot plug, and the 128 MiB test guest runs out with it.
pub(crate) fn max_memory_mib(mib: u64) -> Option<u64> {
    (mib >= MEMORY_HOTPLUG_MIN_MIB).then_some(mib * 4)
}

/// The least memory, MiB, a VM starts with to take more while it runs.
pub const MEMORY_HOTPLUG_MIN_MIB: u64 = 256;

/// The step a running VM's memory grows in (oVirt's `HotPlugMemoryMultiplicationSizeMb`).
pub const MEMORY_HOTPLUG_STEP: u64 = 256 * MIB;

/// The `VM.create` parameters the node needs (drives by ids, bootable first).
pub(crate) async fn vm_params(app: &App, vm: VmId) -> Result<Value, CommandError> {
    let v = app
        .db
        .vm_get(vm)
        .await?
        .ok_or_else(|| CommandError::not_found("VM", vm))?;
    let mut atts = app.db.attachments_of_vm(vm).await?;
    atts.retain(|a| a.active);
    atts.sort_by_key(|a| !a.bootable);
    let mut drives = Vec::new();
    for a in atts {
        let d = app
            .db
            .disk_get(a.disk_id)
            .await?
            .ok_or_else(|| CommandError::not_found("disk", a.disk_id))?;
        let mut drive = super::attachments::drive_params(&d, &a);
        drive["ioTune"] = super::qos::disk_io_tune(app, &d).await?;
        drives.push(drive);
    }
    let nics: Vec<Value> = app
        .db
        .nics_of_vm(vm)
        .await?
        .iter()
        .filter(|n| n.plugged)
        .map(crate::network::node_nic)
        .collect();
    let mut p = json!({
        "vmID": v.id,
        "vmName": v.name,
        "smp": v.cpu.vcpus(),
        "maxVCpus": max_vcpus(v.cpu.vcpus()),
        "memSize": (v.memory_bytes / MIB).max(1),
        "drives": drives,
        "nics": nics,
        "balloon": true,
        "vnc": true,
        "resumeBehavior": v.effective_resume_behavior(),
    });
    if let Some(max) = max_memory_mib(v.memory_bytes / MIB) {
        p["maxMemSize"] = json!(max);
    }
    if let Some(a) = &app.settings.accel {
        p["accel"] = json!(a);
    }
    if let Some(k) = &v.os.kernel {
        p["boot"] = json!({ "kernel": k, "initrd": v.os.initrd, "cmdline": v.os.cmdline.clone().unwrap_or_default() });
    } else {
        p["bootOrder"] = json!(v.os.boot_devices);
    }
    p["cdrom"] = super::cdroms::cdrom_params(app, &v, v.cdrom).await?;
    if let Some(sd) = lease_domain(app, &v).await? {
        p["lease"] = json!({ "sdUUID": sd });
    }
    Ok(p)
}

/// Where a highly available VM keeps its lease: the domain chosen for it, else its first
/// disk's, else the pool's master. `None` for VMs that are not highly available.
pub(crate) async fn lease_domain(
    app: &App,
    v: &crate::model::Vm,
) -> Result<Option<crate::model::SdUuid>, CommandError> {
    if !v.ha.enabled {
        return Ok(None);
    }
    if let Some(sd) = v.lease_storage_domain_id {
        return Ok(Some(sd));
    }
    for a in app.db.attachments_of_vm(v.id).await? {
        if let Some(d) = app.db.disk_get(a.disk_id).await? {
            return Ok(Some(d.storage_domain_id));
        }
    }
    let cl = app.cluster(v.cluster_id).await?;
    let master = app.db.pool_master(cl.data_center_id).await?;
    master.map(Some).ok_or_else(|| {
        CommandError::Conflict(format!(
            "VM {} is highly available but its data center has no storage for its lease",
            v.name
        ))
    })
}

/// Makes sure a highly available VM's lease exists in `xleases` (SPM `Lease.create`, which is
/// idempotent). Without an SPM (it may be the host that just died) the lease made at the VM's
/// first start is used; `VM.create` names the problem if there is none.
pub(crate) async fn ensure_vm_lease(app: &App, vm: VmId, dc: DcId) -> Result<(), CommandError> {
    let v = app
        .db
        .vm_get(vm)
        .await?
        .ok_or_else(|| CommandError::not_found("VM", vm))?;
    let Some(sd) = lease_domain(app, &v).await? else {
        return Ok(());
    };
    match app.spm(&app.dc(dc).await?).await {
        Ok((_, spm)) => {
            spm.call("Lease.create", json!({ "sdUUID": sd, "leaseID": vm }))
                .await?;
        }
        Err(e) => {
            tracing::info!(vm = %v.name, error = %e, "no SPM to create the VM lease; using the existing one")
        }
    }
    Ok(())
}

/// Waits until the migration destination runs the guest: it does once it holds the VM's
/// leases, which the source gives up when its migration completes.
async fn wait_running_on(node: &NodeClient, vm: VmId, limit: Duration) -> Result<(), CommandError> {
    let start = std::time::Instant::now();
    loop {
        let info = node.call("VM.getInfo", json!({ "vmID": vm })).await?;
        match info["status"]["state"].as_str() {
            Some("up") => return Ok(()),
            Some("down") => {
                return Err(CommandError::Conflict(format!(
                    "VM {vm} went down on the migration destination: {}",
                    info["status"]["reason"]
                )))
            }
            state if start.elapsed() >= limit => {
                return Err(CommandError::Conflict(format!(
                    "VM {vm} does not run on the migration destination after {limit:?} (still {})",
                    state.unwrap_or("unknown")
                )))
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn client_of(app: &App, host: HostUuid) -> Result<NodeClient, StepError> {
    app.host_client(host).await.map_err(step_err)
}

/// `VM.destroy`, tolerating a VM the node no longer has.
pub(crate) async fn destroy_on(node: &NodeClient, vm: VmId) -> Result<(), crate::nodes::NodeError> {
    match node.call("VM.destroy", json!({ "vmID": vm })).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(CODE_NO_VM) => Ok(()),
        Err(e) => Err(e),
    }
}

// ------------------------------------------------------------------------------------------
// Add a VM.

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneDisk {
    pub template_disk: DiskId,
    pub template_volume: VolUuid,
    pub disk: DiskId,
    pub volume: VolUuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddVmParams {
    pub vm: crate::model::Vm,
    pub dc: DcId,
    pub clones: Vec<CloneDisk>,
}

pub struct AddVmSaga;

impl SagaDef for AddVmSaga {
    type Ctx = App;
    type Params = AddVmParams;
    const NAME: &'static str = "add_vm";

    fn description(p: &Self::Params) -> String {
        format!("Adding VM {}", p.vm.name)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "record",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let db = c.db();
                    if db.vm_get(p.vm.id).await?.is_none() {
                        db.vm_insert(&p.vm).await?;
                    }
                    // The VM and its disks-to-be are recorded at once, locked while the disks
                    // are cloned (an add answered early shows them so).
                    for cl in &p.clones {
                        let tdisk = db.disk_get(cl.template_disk).await?.ok_or_else(|| step_err("template disk is gone"))?;
                        if db.disk_get(cl.disk).await?.is_none() {
                            let mut d = Disk::new(&format!("{}_{}", p.vm.name, tdisk.name), tdisk.storage_domain_id, DiskFormat::Cow, tdisk.provisioned_size);
                            d.id = cl.disk;
                            d.sparse = true;
                            db.disk_insert(&d).await?;
                            db.volume_insert(&Volume {
                                id: cl.volume,
                                disk_id: cl.disk,
                                storage_domain_id: tdisk.storage_domain_id,
                                parent_id: Some(cl.template_volume),
                                voltype: VolType::Leaf,
                                format: DiskFormat::Cow,
                                actual_size: 0,
                                created_at: crate::time::Timestamp::from_millis(0),
                            })
                            .await?;
                        }
                        if db.attachment_get(p.vm.id, cl.disk).await?.is_none() {
                            let att = db.attachments_of_disk(cl.template_disk).await?;
                            let bootable = att.first().map(|a| a.bootable).unwrap_or(true);
                            db.attachment_add(&DiskAttachment {
                                vm_id: p.vm.id,
                                disk_id: cl.disk,
                                interface: DiskInterface::Virtio,
                                bootable,
                                active: true,
                                read_only: false,
                            })
                            .await?;
                        }
                        db.disk_lock(cl.disk, c.saga_id).await?;
                    }
                    if !p.clones.is_empty() {
                        let rt = VmRuntime { status: VmStatus::ImageLocked, ..Default::default() };
                        db.vm_set_runtime(p.vm.id, &[VmStatus::Down, VmStatus::ImageLocked], &rt).await?;
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let db = c.db();
                    for cl in &p.clones {
                        if db.disk_get(cl.disk).await?.is_some() {
                            db.attachment_remove(p.vm.id, cl.disk).await?;
                            db.volume_delete(cl.volume).await?;
                            db.disk_delete(cl.disk).await?;
                        }
                    }
                    if db.vm_get(p.vm.id).await?.is_some() {
                        db.vm_delete(p.vm.id).await?;
                    }
                    Ok(())
                },
            )
            .describe("Recording the VM"),
            Step::new(
                "clone",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let app = c.app();
                    if p.clones.is_empty() {
                        return Ok(());
                    }
                    let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                    for cl in &p.clones {
                        let tdisk = c.db().disk_get(cl.template_disk).await?.ok_or_else(|| step_err("template disk is gone"))?;
                        let args = json!({
                            "sdUUID": tdisk.storage_domain_id, "spUUID": dc.storage_pool_id, "imgUUID": cl.disk,
                            "size": tdisk.provisioned_size, "volFormat": "COW", "preallocate": "SPARSE",
                            "volUUID": cl.volume, "desc": format!("{} disk", p.vm.name),
                            "srcImgUUID": cl.template_disk, "srcVolUUID": cl.template_volume,
                        });
                        create_volume(&spm, args, tdisk.storage_domain_id, cl.disk, cl.volume, app.settings.task_timeout).await?;
                        c.db().disk_unlock(cl.disk, c.saga_id, DiskStatus::Ok).await?;
                    }
                    c.db().vm_set_runtime(p.vm.id, &[VmStatus::ImageLocked], &VmRuntime::default()).await?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    for cl in &p.clones {
                        if let Some(d) = c.db().disk_get(cl.disk).await? {
                            delete_image(c.app(), p.dc, d.storage_domain_id, cl.disk).await?;
                        }
                    }
                    Ok(())
                },
            )
            .describe("Cloning the template's disks"),
        ]
    }
}

// ------------------------------------------------------------------------------------------
// Start.

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartVmParams {
    pub vm: VmId,
    pub host: HostUuid,
    pub dc: DcId,
    /// Statuses the start may begin from: `down`, and for an HA restart also `unknown`.
    #[serde(default)]
    pub from: Vec<VmStatus>,
    /// A run once: this start's CD and boot order instead of the configuration's.
    #[serde(default)]
    pub run_once: Option<RunOnce>,
}

/// What a run once (oVirt's start with a `<vm>`) changes for one run: the CD in the drive and
/// the boot order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunOnce {
    #[serde(default)]
    pub cdrom: Option<RunOnceCd>,
    #[serde(default)]
    pub boot_devices: Option<Vec<crate::model::BootDevice>>,
}

/// A run once's CD: an empty drive, or an ISO disk. (An enum, not `Option<Option<_>>`, which
/// JSON would not keep apart from no change in the saga's log.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOnceCd {
    Empty,
    Iso(DiskId),
}

impl RunOnceCd {
    pub fn disk(self) -> Option<DiskId> {
        match self {
            RunOnceCd::Empty => None,
            RunOnceCd::Iso(d) => Some(d),
        }
    }
}

pub struct StartVmSaga;

impl SagaDef for StartVmSaga {
    type Ctx = App;
    type Params = StartVmParams;
    const NAME: &'static str = "start_vm";

    fn description(p: &Self::Params) -> String {
        format!("Starting VM {}", p.vm)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "claim",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let rt = VmRuntime {
                        status: VmStatus::WaitForLaunch,
                        run_on_host: Some(p.host),
                        ..Default::default()
                    };
                    let mut from = vec![VmStatus::Down, VmStatus::WaitForLaunch, VmStatus::Suspended];
                    from.extend(p.from.iter().copied());
                    let before = c.db().vm_set_runtime(p.vm, &from, &rt).await?;
                    if before.runtime.status == VmStatus::WaitForLaunch
                        && before.runtime.run_on_host != Some(p.host)
                    {
                        return Err(step_err("the VM is being started elsewhere"));
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    // A failed HA restart stays marked for the HA loop to try again; a
                    // suspended VM stays suspended with its state.
                    let suspended = c.db().vm_hibernation_get(p.vm).await?.is_some();
                    let rt = VmRuntime {
                        status: if suspended {
                            VmStatus::Suspended
                        } else {
                            VmStatus::Down
                        },
                        status_detail: (!p.from.is_empty()).then(|| crate::ha::RESTART_PENDING.to_string()),
                        ..Default::default()
                    };
                    let _ = c.db().vm_set_runtime(p.vm, &[VmStatus::WaitForLaunch], &rt).await;
                    Ok(())
                },
            )
            .describe("Reserving the VM for its host"),
            Step::without_undo("storage", |c: StepCtx<Self>| async move {
                let p = c.params();
                crate::monitor::ensure_pool_connected(c.app(), p.host, p.dc)
                    .await
                    .map_err(step_err)
            })
            .describe("Connecting the host to the storage pool"),
            Step::without_undo("lease", |c: StepCtx<Self>| async move {
                ensure_vm_lease(c.app(), c.params().vm, c.params().dc)
                    .await
                    .map_err(step_err)
            })
            .describe("Creating the VM lease"),
            Step::new(
                "create",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let node = client_of(c.app(), p.host).await?;
                    let mut params = vm_params(c.app(), p.vm).await.map_err(step_err)?;
                    let vm = c
                        .db()
                        .vm_get(p.vm)
                        .await?
                        .ok_or_else(|| step_err("the VM is gone"))?;
                    let mut cdrom = vm.cdrom;
                    if let Some(ro) = &p.run_once {
                        if let Some(cd) = ro.cdrom.map(RunOnceCd::disk) {
                            cdrom = cd;
                            params["cdrom"] = super::cdroms::cdrom_params(c.app(), &vm, cd)
                                .await
                                .map_err(step_err)?;
                        }
                        if let (Some(b), None) = (&ro.boot_devices, &vm.os.kernel) {
                            params["bootOrder"] = json!(b);
                        }
                    }
                    // A suspended VM resumes from its saved state.
                    if let Some(st) = c.db().vm_hibernation_get(p.vm).await? {
                        params["restoreState"] =
                            json!({ "sdUUID": st.sd, "imgUUID": st.img, "volUUID": st.vol });
                    }
                    match node.call("VM.create", params).await {
                        Ok(_) => {}
                        Err(e) if e.code() == Some(CODE_VM_EXISTS) => {}
                        Err(e) => return Err(step_err(e)),
                    }
                    c.db().vm_set_run_cdrom(p.vm, cdrom).await?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let node = client_of(c.app(), c.params().host).await?;
                    destroy_on(&node, c.params().vm).await.map_err(step_err)
                },
            )
            .describe("Starting QEMU"),
            Step::without_undo("up", |c: StepCtx<Self>| async move {
                let p = c.params();
                let rt = VmRuntime {
                    status: VmStatus::Up,
                    run_on_host: Some(p.host),
                    ..Default::default()
                };
                match c
                    .db()
                    .vm_set_runtime(p.vm, &[VmStatus::WaitForLaunch, VmStatus::PoweringUp], &rt)
                    .await
                {
                    Ok(_) => {}
                    // The monitor may record the node's word first (the node's event about the
                    // new VM kicks a round): running on our host, the start succeeded.
                    Err(e) => match c.db().vm_get(p.vm).await? {
                        Some(v)
                            if v.runtime.run_on_host == Some(p.host)
                                && matches!(v.runtime.status, VmStatus::Up | VmStatus::Paused) => {}
                        _ => return Err(e.into()),
                    },
                }
                // Resumed from a saved state: the state is spent (a snapshot's stays with it).
                if let Some(st) = c.db().vm_hibernation_get(p.vm).await? {
                    c.db().vm_hibernation_clear(p.vm).await?;
                    if c.db().snapshot_memory_in_use(st.img).await? {
                        return Ok(());
                    }
                    if let Err(e) = super::storage::delete_image(c.app(), p.dc, st.sd, st.img).await {
                        tracing::warn!(vm = %p.vm, error = %e, "cannot delete a restored VM's state volume");
                    }
                }
                Ok(())
            }),
        ]
    }
}

// ------------------------------------------------------------------------------------------
// Suspend (hibernate).

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuspendVmParams {
    pub vm: VmId,
    pub host: HostUuid,
    pub dc: DcId,
    /// Where the state goes: a new raw image on the VM's first disk's domain.
    pub state: crate::model::StateVolume,
    pub size: u64,
}

/// Creates the raw volume (a new image) a VM's memory and device state is saved to.
pub(super) async fn create_state_volume(
    app: &App,
    dc: DcId,
    state: &crate::model::StateVolume,
    size: u64,
    desc: &str,
) -> Result<(), StepError> {
    let (dc, spm) = app.dc_spm(dc).await.map_err(step_err)?;
    let args = json!({
        "sdUUID": state.sd, "spUUID": dc.storage_pool_id, "imgUUID": state.img,
        "size": size, "volFormat": "RAW", "preallocate": "SPARSE",
        "volUUID": state.vol, "desc": desc, "diskType": "MEMD",
    });
    create_volume(
        &spm,
        args,
        state.sd,
        state.img,
        state.vol,
        app.settings.task_timeout,
    )
    .await
}

/// Saves a running VM's state to a new volume and ends its QEMU; its next start resumes it.
pub struct SuspendVmSaga;

impl SagaDef for SuspendVmSaga {
    type Ctx = App;
    type Params = SuspendVmParams;
    const NAME: &'static str = "suspend_vm";

    fn description(p: &Self::Params) -> String {
        format!("Suspending VM {}", p.vm)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "claim",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let rt = VmRuntime {
                        status: VmStatus::SavingState,
                        run_on_host: Some(p.host),
                        ..Default::default()
                    };
                    c.db()
                        .vm_set_runtime(
                            p.vm,
                            &[VmStatus::Up, VmStatus::Paused, VmStatus::SavingState],
                            &rt,
                        )
                        .await?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let rt = VmRuntime {
                        status: VmStatus::Up,
                        run_on_host: Some(p.host),
                        ..Default::default()
                    };
                    let _ = c.db().vm_set_runtime(p.vm, &[VmStatus::SavingState], &rt).await;
                    Ok(())
                },
            )
            .describe("Marking the VM saving its state"),
            Step::new(
                "volume",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let desc = format!("memory state of VM {}", p.vm);
                    create_state_volume(c.app(), p.dc, &p.state, p.size, &desc).await
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    delete_image(c.app(), p.dc, p.state.sd, p.state.img).await
                },
            )
            .describe("Creating the volume for the VM's state"),
            Step::without_undo("save", |c: StepCtx<Self>| async move {
                let p = c.params();
                let node = client_of(c.app(), p.host).await?;
                let handle = json!({ "sdUUID": p.state.sd, "imgUUID": p.state.img, "volUUID": p.state.vol });
                node.run_job(
                    "VM.hibernate",
                    json!({ "vmID": p.vm, "hibernationVolume": handle }),
                    c.app().settings.migration_timeout,
                )
                .await
                .map_err(step_err)?;
                Ok(())
            })
            .describe("Saving the VM's memory and devices"),
            Step::without_undo("record", |c: StepCtx<Self>| async move {
                let p = c.params();
                c.db().vm_hibernation_set(p.vm, &p.state).await?;
                let rt = VmRuntime {
                    status: VmStatus::Suspended,
                    ..Default::default()
                };
                c.db()
                    .vm_set_runtime(
                        p.vm,
                        &[VmStatus::SavingState, VmStatus::Down, VmStatus::Suspended],
                        &rt,
                    )
                    .await?;
                let node = client_of(c.app(), p.host).await?;
                destroy_on(&node, p.vm).await.map_err(step_err)
            })
            .describe("Recording the VM suspended")
            .point_of_no_return(),
        ]
    }
}

// ------------------------------------------------------------------------------------------
// Migrate.

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateVmParams {
    pub vm: VmId,
    pub src: HostUuid,
    pub dst: HostUuid,
    pub dc: DcId,
    /// Over TLS (the cluster's `migration_encrypted` when the command started: both ends
    /// are told the same).
    #[serde(default)]
    pub encrypted: bool,
}

pub struct MigrateVmSaga;

impl SagaDef for MigrateVmSaga {
    type Ctx = App;
    type Params = MigrateVmParams;
    const NAME: &'static str = "migrate_vm";

    fn description(p: &Self::Params) -> String {
        format!("Migrating VM {} to host {}", p.vm, p.dst)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "claim",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let rt = VmRuntime {
                        status: VmStatus::Migrating,
                        run_on_host: Some(p.src),
                        migrating_to_host: Some(p.dst),
                        status_detail: None,
                    };
                    c.db()
                        .vm_set_runtime(p.vm, &[VmStatus::Up, VmStatus::Migrating], &rt)
                        .await?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let rt = VmRuntime {
                        status: VmStatus::Up,
                        run_on_host: Some(p.src),
                        ..Default::default()
                    };
                    let _ = c.db().vm_set_runtime(p.vm, &[VmStatus::Migrating], &rt).await;
                    Ok(())
                },
            )
            .describe("Marking the VM migrating"),
            Step::without_undo("storage", |c: StepCtx<Self>| async move {
                let p = c.params();
                crate::monitor::ensure_pool_connected(c.app(), p.dst, p.dc)
                    .await
                    .map_err(step_err)
            })
            .describe("Connecting the destination to the storage pool"),
            Step::new(
                "prepare",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let node = client_of(c.app(), p.dst).await?;
                    let params = vm_params(c.app(), p.vm).await.map_err(step_err)?;
                    let mut params = super::with_source_slots(c.app(), p.src, p.vm, params)
                        .await
                        .map_err(step_err)?;
                    if p.encrypted {
                        params["encrypted"] = json!(true);
                    }
                    let r = node.call("VM.migrationCreate", params).await.map_err(step_err)?;
                    r["uri"]
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| step_err("destination returned no migration URI"))
                },
                |c: StepCtx<Self>| async move {
                    let node = client_of(c.app(), c.params().dst).await?;
                    destroy_on(&node, c.params().vm).await.map_err(step_err)
                },
            )
            .describe("Preparing the destination"),
            Step::without_undo("migrate", |c: StepCtx<Self>| async move {
                let p = c.params();
                let uri: String = c.output("prepare")?;
                let node = client_of(c.app(), p.src).await?;
                let mut args = json!({ "vmID": p.vm, "dstUri": uri, "encrypted": p.encrypted });
                // The cluster's limit, Mbps, as the node's MiB/s (at least 1).
                if let Some(vm) = c.db().vm_get(p.vm).await? {
                    if let Some(mbps) = c
                        .app()
                        .cluster(vm.cluster_id)
                        .await
                        .map_err(step_err)?
                        .migration_bandwidth_mbps
                    {
                        args["maxBandwidth"] = json!((u64::from(mbps) * 1_000_000 / 8 / (1 << 20)).max(1));
                    }
                }
                let report = node
                    .run_job("VM.migrate", args, c.app().settings.migration_timeout)
                    .await;
                c.app()
                    .migration_progress
                    .lock()
                    .expect("migration progress")
                    .remove(&p.vm);
                report.map_err(step_err)
            })
            .describe("Migrating memory and state"),
            Step::without_undo("switch", |c: StepCtx<Self>| async move {
                let p = c.params();
                let dst = client_of(c.app(), p.dst).await?;
                wait_running_on(&dst, p.vm, c.app().settings.migration_timeout)
                    .await
                    .map_err(step_err)?;
                let rt = VmRuntime {
                    status: VmStatus::Up,
                    run_on_host: Some(p.dst),
                    ..Default::default()
                };
                c.db()
                    .vm_set_runtime(p.vm, &[VmStatus::Migrating, VmStatus::Up], &rt)
                    .await?;
                let src = client_of(c.app(), p.src).await?;
                destroy_on(&src, p.vm).await.map_err(step_err)?;
                Ok(())
            })
            .describe("Switching over to the destination")
            .point_of_no_return(),
        ]
    }
}

// ------------------------------------------------------------------------------------------
// Remove.

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveVmParams {
    pub vm: VmId,
    pub disks: Vec<DiskId>,
    pub dc: Option<DcId>,
    /// The volumes of the memory its snapshots saved: they go with the VM.
    #[serde(default)]
    pub states: Vec<crate::model::StateVolume>,
    /// A highly available VM's lease (its domain and data center): its `xleases` slot is
    /// given back.
    #[serde(default)]
    pub lease: Option<(crate::model::SdUuid, DcId)>,
}

pub struct RemoveVmSaga;

impl SagaDef for RemoveVmSaga {
    type Ctx = App;
    type Params = RemoveVmParams;
    const NAME: &'static str = "remove_vm";

    fn description(p: &Self::Params) -> String {
        format!("Removing VM {}", p.vm)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "lock",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let rt = VmRuntime {
                        status: VmStatus::ImageLocked,
                        ..Default::default()
                    };
                    c.db()
                        .vm_set_runtime(p.vm, &[VmStatus::Down, VmStatus::ImageLocked], &rt)
                        .await?;
                    for d in &p.disks {
                        c.db().disk_lock(*d, c.saga_id).await?;
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    for d in &p.disks {
                        let _ = c.db().disk_unlock(*d, c.saga_id, DiskStatus::Ok).await;
                    }
                    let _ = c
                        .db()
                        .vm_set_runtime(p.vm, &[VmStatus::ImageLocked], &VmRuntime::default())
                        .await;
                    Ok(())
                },
            ),
            Step::without_undo("disks", |c: StepCtx<Self>| async move {
                let p = c.params();
                for d in &p.disks {
                    if let Some(disk) = c.db().disk_get(*d).await? {
                        let dc =
                            p.dc.ok_or_else(|| step_err("the VM's disks are in no data center"))?;
                        delete_image(c.app(), dc, disk.storage_domain_id, *d).await?;
                    }
                }
                for st in &p.states {
                    let dc =
                        p.dc.ok_or_else(|| step_err("the VM's snapshots are in no data center"))?;
                    delete_image(c.app(), dc, st.sd, st.img).await?;
                }
                Ok(())
            })
            .describe("Deleting the disks")
            .point_of_no_return(),
            // Best effort: a slot left behind (no SPM now) only takes room in `xleases`, and a
            // VM removal is not blocked on it.
            Step::without_undo("lease", |c: StepCtx<Self>| async move {
                let p = c.params();
                let Some((sd, dc)) = p.lease else { return Ok(()) };
                let r = async {
                    let (_, spm) = c.app().spm(&c.app().dc(dc).await?).await?;
                    spm.call("Lease.delete", json!({ "sdUUID": sd, "leaseID": p.vm }))
                        .await?;
                    Ok::<_, CommandError>(())
                }
                .await;
                if let Err(e) = r {
                    tracing::warn!(vm = %p.vm, sd = %sd, error = %e, "the VM's lease slot was not given back");
                }
                Ok(())
            })
            .describe("Giving back the VM lease"),
            Step::without_undo("record", |c: StepCtx<Self>| async move {
                let p = c.params();
                for d in &p.disks {
                    // Deleting the disk row takes all its volumes (the active chain, snapshot
                    // branches) and their snapshot records with it in one statement: one by
                    // one, a volume still named by a snapshot or a child could not go first.
                    c.db().attachment_remove(p.vm, *d).await?;
                    if c.db().disk_get(*d).await?.is_some() {
                        c.db().disk_delete(*d).await?;
                    }
                }
                if c.db().vm_get(p.vm).await?.is_some() {
                    c.db().vm_delete(p.vm).await?;
                }
                Ok(())
            }),
        ]
    }
}

// ------------------------------------------------------------------------------------------
// Templates.

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateDisk {
    pub vm_disk: DiskId,
    pub disk: DiskId,
    pub volume: VolUuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddTemplateParams {
    pub template: crate::model::Template,
    pub vm: VmId,
    pub dc: DcId,
    pub disks: Vec<TemplateDisk>,
    /// The VM's NICs as the template keeps them (read when the command started).
    #[serde(default)]
    pub nics: Vec<crate::model::TemplateNic>,
}

pub struct AddTemplateSaga;

impl SagaDef for AddTemplateSaga {
    type Ctx = App;
    type Params = AddTemplateParams;
    const NAME: &'static str = "add_template";

    fn description(p: &Self::Params) -> String {
        format!("Creating template {} from VM {}", p.template.name, p.vm)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "record",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    if c.db().template_get(p.template.id).await?.is_none() {
                        let mut t = p.template.clone();
                        t.status = TemplateStatus::Locked;
                        let mut tx = c.db().begin().await?;
                        tx.template_insert(&t).await?;
                        for n in &p.nics {
                            tx.template_nic_insert(n).await?;
                        }
                        tx.commit().await?;
                    }
                    let rt = VmRuntime { status: VmStatus::ImageLocked, ..Default::default() };
                    c.db().vm_set_runtime(p.vm, &[VmStatus::Down, VmStatus::ImageLocked], &rt).await?;
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let _ = c.db().vm_set_runtime(p.vm, &[VmStatus::ImageLocked], &VmRuntime::default()).await;
                    if c.db().template_get(p.template.id).await?.is_some() {
                        c.db().template_delete(p.template.id).await?;
                    }
                    Ok(())
                },
            )
            .describe("Recording the template"),
            Step::new(
                "copy",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    if p.disks.is_empty() {
                        return Ok(()); // a diskless VM's template: nothing on storage
                    }
                    let app = c.app();
                    let (dc, spm) = app.dc_spm(p.dc).await.map_err(step_err)?;
                    for td in &p.disks {
                        let src = c.db().disk_get(td.vm_disk).await?.ok_or_else(|| step_err("the VM's disk is gone"))?;
                        if c.db().disk_get(td.disk).await?.is_none() {
                            let mut d = Disk::new(&src.name, src.storage_domain_id, DiskFormat::Cow, src.provisioned_size);
                            d.id = td.disk;
                            c.db().disk_insert(&d).await?;
                            c.db()
                                .volume_insert(&Volume {
                                    id: td.volume,
                                    disk_id: td.disk,
                                    storage_domain_id: src.storage_domain_id,
                                    parent_id: None,
                                    voltype: VolType::Shared,
                                    format: DiskFormat::Cow,
                                    actual_size: 0,
                                    created_at: crate::time::Timestamp::from_millis(0),
                                })
                                .await?;
                        }
                        c.db().disk_lock(td.disk, c.saga_id).await?;
                        let args = json!({
                            "spUUID": dc.storage_pool_id, "sdUUID": src.storage_domain_id,
                            "srcImgUUID": td.vm_disk, "dstImgUUID": td.disk, "dstVolUUID": td.volume,
                            "volType": "SHARED", "volFormat": "COW",
                        });
                        let r = spm.run_task("Image.copy", args, app.settings.task_timeout).await;
                        if let Err(e) = r {
                            let info = spm
                                .call("Volume.getInfo", json!({ "sdUUID": src.storage_domain_id, "imgUUID": td.disk, "volUUID": td.volume }))
                                .await;
                            if !info.is_ok_and(|i| i["meta"]["role"] == "Shared" || i["meta"]["role"] == "SHARED") {
                                return Err(step_err(e));
                            }
                        }
                        c.db().template_disk_add(p.template.id, td.disk).await?;
                        c.db().disk_unlock(td.disk, c.saga_id, DiskStatus::Ok).await?;
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    for td in &p.disks {
                        if let Some(d) = c.db().disk_get(td.disk).await? {
                            delete_image(c.app(), p.dc, d.storage_domain_id, td.disk).await?;
                            c.db().template_disk_remove(p.template.id, td.disk).await?;
                            c.db().volume_delete(td.volume).await?;
                            c.db().disk_delete(td.disk).await?;
                        }
                    }
                    Ok(())
                },
            )
            .describe("Copying the disks into the template"),
            Step::without_undo("unlock", |c: StepCtx<Self>| async move {
                let p = c.params();
                c.db().template_set_status(p.template.id, &[], TemplateStatus::Ok).await?;
                let _ = c.db().vm_set_runtime(p.vm, &[VmStatus::ImageLocked], &VmRuntime::default()).await;
                Ok(())
            }),
        ]
    }
}

/// One disk of a template being removed, with where its image lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateDiskPlace {
    pub disk: DiskId,
    pub sd: crate::model::SdUuid,
    pub dc: DcId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveTemplateParams {
    pub template: TemplateId,
    pub disks: Vec<TemplateDiskPlace>,
}

/// Removes a template no VM uses: locked first (so no VM is made from it meanwhile), then its
/// images (the point of no return), then its records.
pub struct RemoveTemplateSaga;

impl SagaDef for RemoveTemplateSaga {
    type Ctx = App;
    type Params = RemoveTemplateParams;
    const NAME: &'static str = "remove_template";

    fn description(p: &Self::Params) -> String {
        format!("Removing template {}", p.template)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::new(
                "lock",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    c.db()
                        .template_set_status(
                            p.template,
                            &[TemplateStatus::Ok, TemplateStatus::Locked],
                            TemplateStatus::Locked,
                        )
                        .await?;
                    // Counted under the lock: a VM made from it before the lock shows here.
                    let filter = VmFilter {
                        template: Some(Ref::Id(p.template)),
                        ..Default::default()
                    };
                    let users = c.db().vm_count(&filter).await?;
                    if users > 0 {
                        return Err(step_err(format!(
                            "template {} is used by {users} VMs",
                            p.template
                        )));
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let _ = c
                        .db()
                        .template_set_status(p.template, &[TemplateStatus::Locked], TemplateStatus::Ok)
                        .await;
                    Ok(())
                },
            )
            .describe("Locking the template"),
            Step::without_undo("delete", |c: StepCtx<Self>| async move {
                for d in &c.params().disks {
                    delete_image(c.app(), d.dc, d.sd, d.disk).await?;
                }
                Ok(())
            })
            .describe("Deleting the template's disks")
            .point_of_no_return(),
            Step::without_undo("record", |c: StepCtx<Self>| async move {
                let p = c.params();
                let db = c.db();
                for d in &p.disks {
                    db.template_disk_remove(p.template, d.disk).await?;
                    if db.disk_get(d.disk).await?.is_some() {
                        // The disk's volumes go with its row.
                        db.disk_delete(d.disk).await?;
                    }
                }
                if db.template_get(p.template).await?.is_some() {
                    db.template_delete(p.template).await?;
                }
                Ok(())
            }),
        ]
    }
}

// ------------------------------------------------------------------------------------------
// Commands.

impl Commands {
    pub(super) async fn vm(&self, id: VmId) -> Result<crate::model::Vm, CommandError> {
        self.app
            .db
            .vm_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("VM", id))
    }

    async fn cluster_dc(&self, cluster: ClusterId) -> Result<DcId, CommandError> {
        let cl = self.app.cluster(cluster).await?;
        Ok(cl.data_center_id)
    }

    pub async fn add_vm(
        &self,
        req: AddVm,
        correlation_id: Option<String>,
    ) -> Result<Added<crate::model::Vm>, CommandError> {
        let dc = self.cluster_dc(req.cluster).await?;
        if self.app.db.vm_get_by_name(&req.name).await?.is_some() {
            return Err(CommandError::Conflict(format!("a VM named {} exists", req.name)));
        }
        let tmpl = self
            .app
            .db
            .template_get(req.template)
            .await?
            .ok_or_else(|| CommandError::not_found("template", req.template))?;
        if tmpl.status != TemplateStatus::Ok {
            return Err(CommandError::Conflict(format!(
                "template {} is {}",
                tmpl.name, tmpl.status
            )));
        }
        let mut vm = crate::model::Vm::new(&req.name, req.cluster);
        vm.description = req.description;
        vm.template_id = req.template;
        vm.memory_bytes = req.memory_bytes.unwrap_or(if req.template == BLANK_TEMPLATE_ID {
            vm.memory_bytes
        } else {
            tmpl.memory_bytes
        });
        vm.memory_guaranteed_bytes = vm.memory_bytes;
        vm.cpu = req.cpu.unwrap_or(if req.template == BLANK_TEMPLATE_ID {
            vm.cpu
        } else {
            tmpl.cpu
        });
        vm.os = req.os;
        if let Some(ha) = req.ha {
            vm.ha = ha;
        }
        vm.resume_behavior = req.resume_behavior.unwrap_or_default();
        if vm.memory_bytes < 16 * MIB {
            return Err(CommandError::invalid("a VM needs at least 16 MiB of memory"));
        }
        let mut clones = Vec::new();
        for d in self.app.db.template_disks(req.template).await? {
            // A thin clone: a qcow2 header over the template's volume.
            super::storage::check_space(
                &self.app,
                d.storage_domain_id,
                1 << 20,
                &format!("add VM {}", req.name),
            )
            .await?;
            let leaf = self
                .app
                .db
                .volume_chain(d.id)
                .await?
                .last()
                .map(|v| v.id)
                .ok_or_else(|| CommandError::Conflict(format!("template disk {} has no volume", d.name)))?;
            clones.push(CloneDisk {
                template_disk: d.id,
                template_volume: leaf,
                disk: DiskId::new_random(),
                volume: VolUuid::new_random(),
            });
        }
        // The template's NICs come with it (each with a MAC of its own), as in oVirt; their
        // networks must be this data center's.
        let nics = self.app.db.nics_of_template(req.template).await?;
        for n in &nics {
            self.nic_network_check(dc, &n.network)
                .await
                .map_err(|e| CommandError::Conflict(format!("template {} NIC {}: {e}", tmpl.name, n.name)))?;
        }
        if !clones.is_empty() {
            let dcr = self.app.dc(dc).await?;
            self.app.spm(&dcr).await?;
        }
        let id = vm.id;
        let storage_work = !clones.is_empty();
        let pending = self
            .run_adding::<AddVmSaga, _, _>(
                AddVmParams { vm, dc, clones },
                None,
                correlation_id,
                storage_work,
                move |cmds| async move {
                    for n in nics {
                        let req = crate::commands::networks::AddNic {
                            name: n.name,
                            network: n.network,
                            mac: None,
                            interface: n.interface,
                            plugged: true,
                            linked: n.linked,
                        };
                        cmds.add_nic(id, req).await?;
                    }
                    Ok(())
                },
            )
            .await?;
        let entity = self.vm(id).await?;
        Ok(Added { entity, pending })
    }

    pub async fn start_vm(
        &self,
        id: VmId,
        opts: StartOptions,
        correlation_id: Option<String>,
    ) -> Result<crate::model::Vm, CommandError> {
        let vm = self.vm(id).await?;
        if !matches!(vm.runtime.status, VmStatus::Down | VmStatus::Suspended) {
            return Err(CommandError::Conflict(format!(
                "VM {} is {}",
                vm.name, vm.runtime.status
            )));
        }
        self.refuse_locked_disks(&vm, "start the VM").await?;
        if let Some(RunOnceCd::Iso(iso)) = opts.run_once.as_ref().and_then(|r| r.cdrom) {
            super::cdroms::iso_disk(self, iso).await?;
        }
        let dc = self.cluster_dc(vm.cluster_id).await?;
        let host = match opts.host {
            Some(h) => {
                let hr = self.app.host(h).await?;
                if hr.cluster_id != vm.cluster_id {
                    return Err(CommandError::invalid(format!(
                        "host {} is not in the VM's cluster",
                        hr.name
                    )));
                }
                h
            }
            None => choose_host(&self.app, vm.cluster_id, id, Purpose::Start).await?,
        };
        self.run_as::<StartVmSaga>(
            StartVmParams {
                vm: id,
                host,
                dc,
                from: Vec::new(),
                run_once: opts.run_once.clone(),
            },
            Some(format!(
                "Starting VM {} on host {}",
                vm.name,
                self.host_label(host).await
            )),
            correlation_id,
        )
        .await?;
        if opts.paused {
            self.pause_vm(id).await?;
        }
        self.vm(id).await
    }

    /// Restarts a highly available VM whose host died or whose QEMU crashed: on `in_place`
    /// when given and up, else where the scheduler puts it. The VM lease makes this safe: the
    /// node refuses to start the VM while the old holder's lease lives (see [`crate::ha`] for
    /// when the monitor asks).
    pub async fn ha_restart(
        &self,
        id: VmId,
        in_place: Option<HostUuid>,
    ) -> Result<crate::model::Vm, CommandError> {
        let vm = self.vm(id).await?;
        if !vm.ha.enabled {
            return Err(CommandError::invalid(format!(
                "VM {} is not highly available",
                vm.name
            )));
        }
        let dc = self.cluster_dc(vm.cluster_id).await?;
        let same_host_up = match in_place {
            Some(h) => self
                .app
                .host(h)
                .await
                .map(|h| h.status == crate::model::HostStatus::Up && h.cluster_id == vm.cluster_id)
                .unwrap_or(false),
            None => false,
        };
        let host = match (same_host_up, in_place) {
            (true, Some(h)) => h,
            _ => choose_host(&self.app, vm.cluster_id, id, Purpose::HaRestart).await?,
        };
        let from = vec![VmStatus::Unknown, VmStatus::NotResponding];
        self.run_as::<StartVmSaga>(
            StartVmParams {
                vm: id,
                host,
                dc,
                from,
                run_once: None,
            },
            Some(format!(
                "Restarting highly available VM {} on host {}",
                vm.name,
                self.host_label(host).await
            )),
            None,
        )
        .await?;
        self.vm(id).await
    }

    /// Where a highly available VM keeps its lease (`None`: not highly available).
    pub async fn vm_lease_domain(
        &self,
        vm: &crate::model::Vm,
    ) -> Result<Option<crate::model::SdUuid>, CommandError> {
        lease_domain(&self.app, vm).await
    }

    /// Power off at once (`stop`).
    pub async fn stop_vm(&self, id: VmId) -> Result<crate::model::Vm, CommandError> {
        let vm = self.vm(id).await?;
        if vm.runtime.status == VmStatus::Suspended {
            self.discard_state(&vm).await?;
        }
        if let Some(h) = vm.runtime.run_on_host {
            let node = self.app.client(&self.app.host(h).await?)?;
            destroy_on(&node, id).await?;
        }
        if let Some(h) = vm.runtime.migrating_to_host {
            if let Ok(node) = self.app.host(h).await.and_then(|h| self.app.client(&h)) {
                let _ = destroy_on(&node, id).await;
            }
        }
        self.app.db.vm_set_runtime(id, &[], &VmRuntime::default()).await?;
        self.vm(id).await
    }

    /// ACPI shutdown; the VM goes down when the guest powers off (or is destroyed after the
    /// node's timeout).
    pub async fn shutdown_vm(&self, id: VmId) -> Result<crate::model::Vm, CommandError> {
        let vm = self.vm(id).await?;
        let h = vm
            .runtime
            .run_on_host
            .filter(|_| vm.runtime.status.is_running())
            .ok_or_else(|| CommandError::Conflict(format!("VM {} is {}", vm.name, vm.runtime.status)))?;
        let node = self.app.client(&self.app.host(h).await?)?;
        node.call("VM.shutdown", json!({ "vmID": id })).await?;
        let rt = VmRuntime {
            status: VmStatus::PoweringDown,
            run_on_host: Some(h),
            ..Default::default()
        };
        self.app
            .db
            .vm_set_runtime(id, &[VmStatus::Up, VmStatus::Paused, VmStatus::PoweringUp], &rt)
            .await?;
        self.vm(id).await
    }

    /// Suspends (hibernates) a running VM: its memory and device state go to a new volume on
    /// the domain of its first disk, QEMU ends, the VM is `suspended`; `start_vm` resumes it
    /// from there, `stop_vm` discards the state.
    pub async fn suspend_vm(
        &self,
        id: VmId,
        correlation_id: Option<String>,
    ) -> Result<crate::model::Vm, CommandError> {
        let vm = self.vm(id).await?;
        let (host, _) = self.running_on(id).await?;
        if !matches!(vm.runtime.status, VmStatus::Up | VmStatus::Paused) {
            return Err(CommandError::Conflict(format!(
                "VM {} is {}",
                vm.name, vm.runtime.status
            )));
        }
        self.refuse_hot_plugged(&vm, host, "suspended").await?;
        let (state, size) = self.new_state_volume(&vm).await?;
        let dc = self.cluster_dc(vm.cluster_id).await?;
        self.run_as::<SuspendVmSaga>(
            SuspendVmParams {
                vm: id,
                host,
                dc,
                state,
                size,
            },
            Some(format!("Suspending VM {}", vm.name)),
            correlation_id,
        )
        .await?;
        self.vm(id).await
    }

    /// Refuses to save the state of VM `v`, running on `host`, while it has hot plugged vCPUs
    /// or memory: the state would load only into a QEMU with the same devices, and a resume
    /// starts one from the configuration, where they are boot vCPUs and memory.
    pub(crate) async fn refuse_hot_plugged(
        &self,
        v: &crate::model::Vm,
        host: HostUuid,
        what: &str,
    ) -> Result<(), CommandError> {
        let info = self
            .app
            .host_client(host)
            .await?
            .call("VM.getInfo", json!({ "vmID": v.id }))
            .await?;
        let cpus = info["cpus"]["devices"].as_array().map_or(0, Vec::len);
        let dimms = info["memory"]["dimms"].as_array().map_or(0, Vec::len);
        if cpus + dimms > 0 {
            return Err(CommandError::Conflict(format!(
                "VM {} has {cpus} hot plugged vCPU(s) and {dimms} DIMM(s) since it started: its \
                 state cannot be {what} until it restarts (its configuration has them)",
                v.name
            )));
        }
        Ok(())
    }

    /// Where a running VM's memory and device state will go (a hibernation's or a snapshot's):
    /// a new raw image on the domain of its first disk (else of its lease), and its size.
    pub(super) async fn new_state_volume(
        &self,
        vm: &crate::model::Vm,
    ) -> Result<(crate::model::StateVolume, u64), CommandError> {
        let mut sd = None;
        for a in self.app.db.attachments_of_vm(vm.id).await? {
            if let Some(d) = self.app.db.disk_get(a.disk_id).await? {
                sd = Some(d.storage_domain_id);
                break;
            }
        }
        let sd = sd.or(vm.lease_storage_domain_id).ok_or_else(|| {
            CommandError::Conflict(format!("VM {} has no storage to save its state on", vm.name))
        })?;
        // The stream holds the guest's used memory (zero pages take a few bytes) plus device
        // state: its RAM plus a margin always fits.
        let size = (vm.memory_bytes + (64 << 20)).div_ceil(1 << 20) << 20;
        let state = crate::model::StateVolume {
            sd,
            img: DiskId::new_random(),
            vol: VolUuid::new_random(),
        };
        Ok((state, size))
    }

    /// Forgets a suspended VM's saved state (its volume is deleted unless a snapshot keeps
    /// it): the VM is `down`.
    async fn discard_state(&self, vm: &crate::model::Vm) -> Result<(), CommandError> {
        if let Some(st) = self.app.db.vm_hibernation_get(vm.id).await? {
            if !self.app.db.snapshot_memory_in_use(st.img).await? {
                let dc = self.cluster_dc(vm.cluster_id).await?;
                delete_image(&self.app, dc, st.sd, st.img).await.map_err(|e| {
                    CommandError::Conflict(format!("cannot delete VM {}'s saved state: {}", vm.name, e))
                })?;
            }
            self.app.db.vm_hibernation_clear(vm.id).await?;
        }
        Ok(())
    }

    /// Writes a VM's configuration. A suspended VM keeps its memory size and CPUs: its saved
    /// state (a hibernation's, or a snapshot's memory after a restore) loads only into those.
    pub async fn update_vm(&self, v: &crate::model::Vm) -> Result<crate::model::Vm, CommandError> {
        self.update_vm_with(v, true).await
    }

    /// [`Self::update_vm`]; with `now`, a running VM also gets its new vCPU count (hot plug or
    /// unplug) and more memory (a DIMM, in steps of [`MEMORY_HOTPLUG_STEP`]) at once, oVirt's
    /// default; else, and for less memory, only at its next start (oVirt's `next_run`). A
    /// change the running VM refuses changes nothing.
    pub async fn update_vm_with(
        &self,
        v: &crate::model::Vm,
        now: bool,
    ) -> Result<crate::model::Vm, CommandError> {
        let cur = self.vm(v.id).await?;
        let running = now && cur.runtime.status == VmStatus::Up;
        // Memory grows in the running VM by whole steps; less memory waits for the next start.
        let more_memory = v.memory_bytes.saturating_sub(cur.memory_bytes);
        if running && more_memory % MEMORY_HOTPLUG_STEP != 0 {
            return Err(CommandError::Conflict(format!(
                "VM {} runs: its memory grows by multiples of {} MiB ({} MiB asked); change it \
                 for the next start with next_run=true",
                cur.name,
                MEMORY_HOTPLUG_STEP / MIB,
                more_memory / MIB
            )));
        }
        let host = || {
            cur.runtime
                .run_on_host
                .ok_or_else(|| CommandError::Conflict(format!("VM {} is up on no known host", cur.name)))
        };
        if running && more_memory > 0 {
            self.app
                .host_client(host()?)
                .await?
                .call(
                    "VM.hotplugMemory",
                    json!({ "vmID": v.id, "sizeMiB": more_memory / MIB }),
                )
                .await
                .map_err(refused_by_vm)?;
            tracing::info!(vm = %cur.name, mib = more_memory / MIB, "memory hot plugged into the running VM");
        }
        if running && cur.cpu.vcpus() != v.cpu.vcpus() {
            let n = v.cpu.vcpus();
            self.app
                .host_client(host()?)
                .await?
                .call("VM.setNumberOfCpus", json!({ "vmID": v.id, "numberOfCpus": n }))
                .await
                .map_err(refused_by_vm)?;
            tracing::info!(vm = %cur.name, vcpus = n, "vCPUs changed in the running VM");
        }
        if cur.runtime.status == VmStatus::Suspended
            && (cur.memory_bytes != v.memory_bytes || cur.cpu.vcpus() != v.cpu.vcpus())
        {
            return Err(CommandError::Conflict(format!(
                "VM {} is suspended: its saved state needs {} MiB and {} CPUs; stop it (the state \
                 is discarded) before changing them",
                cur.name,
                cur.memory_bytes >> 20,
                cur.cpu.vcpus()
            )));
        }
        Ok(self.app.db.vm_update(v).await?)
    }

    /// Pauses a running guest (QEMU stops its CPUs). An `up` VM pauses, and one still powering
    /// up or rebooting; the record moves from the status it was read in, so a migration or
    /// shutdown begun meanwhile wins.
    pub async fn pause_vm(&self, id: VmId) -> Result<crate::model::Vm, CommandError> {
        // oVirt's "running" states; a start-paused whose VM is not yet up needs them.
        self.pause_or_resume(
            id,
            &[VmStatus::Up, VmStatus::PoweringUp, VmStatus::RebootInProgress],
            "VM.pause",
            VmStatus::Paused,
        )
        .await
    }

    /// Reboots a running guest (QEMU's system reset, as oVirt's reboot of a guest without an
    /// agent): the VM stays on its host, `reboot_in_progress` until its node reports it up.
    pub async fn reboot_vm(&self, id: VmId) -> Result<crate::model::Vm, CommandError> {
        let vm = self.vm(id).await?;
        if vm.runtime.status != VmStatus::Up {
            return Err(CommandError::Conflict(format!(
                "VM {} is {}: only a VM that is up reboots",
                vm.name, vm.runtime.status
            )));
        }
        let (_, node) = self.running_on(id).await?;
        node.call("VM.reset", json!({ "vmID": id })).await?;
        let rt = VmRuntime {
            status: VmStatus::RebootInProgress,
            ..vm.runtime.clone()
        };
        // The node's word may have come first; it is the truth then.
        let _ = self.app.db.vm_set_runtime(id, &[VmStatus::Up], &rt).await;
        self.app.kick.notify_one();
        self.vm(id).await
    }

    /// Cancels the migration of a VM: its source host stops sending it, the migration fails
    /// and the VM runs on where it was (the migration command undoes its own steps).
    pub async fn cancel_migration(&self, id: VmId) -> Result<crate::model::Vm, CommandError> {
        let vm = self.vm(id).await?;
        if vm.runtime.status != VmStatus::Migrating {
            return Err(CommandError::Conflict(format!(
                "VM {} is {}, not migrating",
                vm.name, vm.runtime.status
            )));
        }
        let (_, node) = self.running_on(id).await?;
        node.call("VM.migrateCancel", json!({ "vmID": id })).await?;
        self.vm(id).await
    }

    /// Resumes a paused guest.
    pub async fn resume_vm(&self, id: VmId) -> Result<crate::model::Vm, CommandError> {
        self.pause_or_resume(id, &[VmStatus::Paused], "VM.cont", VmStatus::Up)
            .await
    }

    async fn pause_or_resume(
        &self,
        id: VmId,
        from: &[VmStatus],
        verb: &str,
        to: VmStatus,
    ) -> Result<crate::model::Vm, CommandError> {
        let vm = self.vm(id).await?;
        if !from.contains(&vm.runtime.status) {
            let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
            return Err(CommandError::Conflict(format!(
                "VM {} is {}, not {}",
                vm.name,
                vm.runtime.status,
                from.join(" or ")
            )));
        }
        let (_, node) = self.running_on(id).await?;
        node.call(verb, json!({ "vmID": id })).await?;
        // A resume answers a storage pause too: its pause code goes with it.
        let rt = VmRuntime {
            status: to,
            status_detail: None,
            ..vm.runtime.clone()
        };
        self.app.db.vm_set_runtime(id, from, &rt).await?;
        self.vm(id).await
    }

    /// A host's name for a job's description (its id if it is gone).
    async fn host_label(&self, h: HostUuid) -> String {
        match self.app.host(h).await {
            Ok(h) => h.name,
            Err(_) => h.to_string(),
        }
    }

    async fn running_on(&self, id: VmId) -> Result<(HostUuid, NodeClient), CommandError> {
        let vm = self.vm(id).await?;
        let h = vm
            .runtime
            .run_on_host
            .filter(|_| vm.runtime.status.is_running())
            .ok_or_else(|| CommandError::Conflict(format!("VM {} is {}", vm.name, vm.runtime.status)))?;
        Ok((h, self.app.client(&self.app.host(h).await?)?))
    }

    /// A VM recorded `paused` whose node says it runs again, recorded `up` (the record lags
    /// the node's events: a snapshot with memory pauses the guest for its save and resumes
    /// it before it answers). Any other VM as it is.
    pub(super) async fn unpaused(&self, vm: crate::model::Vm) -> Result<crate::model::Vm, CommandError> {
        let Some(h) = vm
            .runtime
            .run_on_host
            .filter(|_| vm.runtime.status == VmStatus::Paused)
        else {
            return Ok(vm);
        };
        let info = self
            .app
            .client(&self.app.host(h).await?)?
            .call("VM.getInfo", json!({ "vmID": vm.id }))
            .await?;
        if info["status"]["state"] != "up" {
            return Ok(vm);
        }
        let rt = crate::model::VmRuntime {
            status: VmStatus::Up,
            ..vm.runtime.clone()
        };
        self.app
            .db
            .vm_set_runtime(vm.id, &[VmStatus::Paused], &rt)
            .await?;
        self.vm(vm.id).await
    }

    pub async fn migrate_vm(
        &self,
        id: VmId,
        opts: MigrateOptions,
        correlation_id: Option<String>,
    ) -> Result<crate::model::Vm, CommandError> {
        let vm = self.unpaused(self.vm(id).await?).await?;
        if vm.runtime.status != VmStatus::Up {
            return Err(CommandError::Conflict(format!(
                "VM {} is {}, not up",
                vm.name, vm.runtime.status
            )));
        }
        // A disk being moved live is mirrored by this host's QEMU until the move ends.
        self.refuse_locked_disks(&vm, "migrate the VM").await?;
        let src = vm
            .runtime
            .run_on_host
            .ok_or_else(|| CommandError::Conflict(format!("VM {} runs nowhere", vm.name)))?;
        let dst = match opts.host {
            Some(h) if h == src => return Err(CommandError::invalid("the VM already runs on that host")),
            Some(h) => h,
            None => choose_host(&self.app, vm.cluster_id, id, Purpose::Migrate).await?,
        };
        let dc = self.cluster_dc(vm.cluster_id).await?;
        let encrypted = self.app.cluster(vm.cluster_id).await?.migration_encrypted;
        self.run_as::<MigrateVmSaga>(
            MigrateVmParams {
                vm: id,
                src,
                dst,
                dc,
                encrypted,
            },
            Some(format!(
                "Migrating VM {} from host {} to host {}",
                vm.name,
                self.host_label(src).await,
                self.host_label(dst).await
            )),
            correlation_id,
        )
        .await?;
        self.vm(id).await
    }

    /// Moves every VM off a host going into maintenance. The host is
    /// `preparing_for_maintenance` meanwhile (the scheduler places nothing there); the
    /// scheduler plans all destinations at once (HA VMs first, then the largest, each move
    /// counted against the next), and each VM migrates to its planned host. A VM with no place
    /// or whose migration fails is stopped, as the admin asked for the host to be emptied. On
    /// error the host gets its status back.
    pub async fn evacuate_host(&self, host: HostUuid) -> Result<(), CommandError> {
        let h = self.app.host(host).await?;
        let before = h.status;
        if before != HostStatus::PreparingForMaintenance {
            self.app
                .db
                .host_set_status(
                    host,
                    &[before],
                    HostStatus::PreparingForMaintenance,
                    Some("moving its VMs to other hosts"),
                )
                .await?;
        }
        let r = self.evacuate(&h).await;
        if r.is_err() && before != HostStatus::PreparingForMaintenance {
            let _ = self
                .app
                .db
                .host_set_status(
                    host,
                    &[HostStatus::PreparingForMaintenance],
                    before,
                    h.status_detail.as_deref(),
                )
                .await;
        }
        r
    }

    async fn evacuate(&self, h: &crate::model::Host) -> Result<(), CommandError> {
        let snap = crate::scheduling::snapshot(&self.app, h.cluster_id).await?;
        let plan = oxvirt_scheduler::plan_evacuation(&snap, crate::scheduling::sched_host_id(h.id)).map_err(
            |e| CommandError::Conflict(format!("cannot plan the evacuation of host {}: {e}", h.name)),
        )?;
        let mut stop = Vec::new();
        for p in plan.moves {
            let opts = MigrateOptions {
                host: Some(crate::scheduling::engine_host_id(p.host)),
            };
            if let Err(e) = self.migrate_vm(p.vm, opts, None).await {
                tracing::warn!(vm = %p.vm, to = %p.host_name, error = %e,
                    "cannot migrate for maintenance; stopping the VM");
                stop.push(p.vm);
            }
        }
        for (vm, why) in plan.unplaced {
            tracing::warn!(vm = %vm, host = %h.name, reason = %why, "no host for the VM; stopping it for maintenance");
            stop.push(vm);
        }
        // Whatever the plan did not cover (a VM the snapshot left out) is stopped too.
        let left = self
            .app
            .db
            .vm_list(&ListQuery {
                filter: VmFilter {
                    host: Some(Ref::Id(h.id)),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await?;
        stop.extend(
            left.iter()
                .filter(|v| v.runtime.status.is_running() && v.runtime.run_on_host == Some(h.id))
                .map(|v| v.id),
        );
        stop.dedup();
        for vm in stop {
            let v = self.vm(vm).await?;
            if v.runtime.status.is_running() && v.runtime.run_on_host == Some(h.id) {
                self.stop_vm(vm).await?;
            }
        }
        Ok(())
    }

    /// Removes a VM that is down, with its disks unless `detach_only`.
    pub async fn remove_vm(
        &self,
        id: VmId,
        detach_only: bool,
        correlation_id: Option<String>,
    ) -> Result<(), CommandError> {
        let vm = self.vm(id).await?;
        if vm.runtime.status != VmStatus::Down {
            return Err(CommandError::Conflict(format!(
                "VM {} is {}: stop it first",
                vm.name, vm.runtime.status
            )));
        }
        let mut disks = Vec::new();
        if !detach_only {
            for a in self.app.db.attachments_of_vm(id).await? {
                if self.app.db.attachments_of_disk(a.disk_id).await?.len() == 1 {
                    disks.push(a.disk_id);
                }
            }
        }
        let mut states = Vec::new();
        for s in self.app.db.snapshots_of_vm(id).await? {
            if let Some(m) = self.app.db.snapshot_memory_get(s.id).await? {
                states.push(m.state);
            }
        }
        let dc = if disks.is_empty() && states.is_empty() {
            None
        } else {
            Some(self.cluster_dc(vm.cluster_id).await?)
        };
        // Read before detach_only drops the attachments (the lease may be on a disk's domain).
        let lease = match lease_domain(&self.app, &vm).await {
            Ok(Some(sd)) => Some((sd, self.cluster_dc(vm.cluster_id).await?)),
            _ => None,
        };
        if detach_only {
            for a in self.app.db.attachments_of_vm(id).await? {
                self.app.db.attachment_remove(id, a.disk_id).await?;
            }
        }
        self.run_as::<RemoveVmSaga>(
            RemoveVmParams {
                vm: id,
                disks,
                dc,
                states,
                lease,
            },
            Some(format!("Removing VM {}", vm.name)),
            correlation_id,
        )
        .await?;
        Ok(())
    }

    pub async fn add_template(
        &self,
        vm: VmId,
        name: &str,
        description: &str,
        correlation_id: Option<String>,
    ) -> Result<Added<crate::model::Template>, CommandError> {
        let v = self.vm(vm).await?;
        if v.runtime.status != VmStatus::Down {
            return Err(CommandError::Conflict(format!(
                "VM {} is {}: a template is made from a VM that is down",
                v.name, v.runtime.status
            )));
        }
        if self.app.db.template_get_by_name(name).await?.is_some() {
            return Err(CommandError::Conflict(format!("a template named {name} exists")));
        }
        self.refuse_locked_disks(&v, "make a template of the VM").await?;
        let dc = self.cluster_dc(v.cluster_id).await?;
        let mut t = crate::model::Template::new(name, Some(v.cluster_id));
        t.description = description.to_string();
        t.memory_bytes = v.memory_bytes;
        t.cpu = v.cpu;
        for a in self.app.db.attachments_of_vm(vm).await? {
            if let Some(d) = self.app.db.disk_get(a.disk_id).await? {
                let actual: u64 = self
                    .app
                    .db
                    .volume_chain(d.id)
                    .await?
                    .iter()
                    .map(|v| v.actual_size)
                    .sum();
                super::storage::check_space(
                    &self.app,
                    d.storage_domain_id,
                    actual,
                    &format!("add template {name}"),
                )
                .await?;
            }
        }
        let disks: Vec<TemplateDisk> = self
            .app
            .db
            .attachments_of_vm(vm)
            .await?
            .iter()
            .map(|a| TemplateDisk {
                vm_disk: a.disk_id,
                disk: DiskId::new_random(),
                volume: VolUuid::new_random(),
            })
            .collect();
        if !disks.is_empty() {
            self.app.spm(&self.app.dc(dc).await?).await?;
        }
        let nics = self
            .app
            .db
            .nics_of_vm(vm)
            .await?
            .into_iter()
            .map(|n| crate::model::TemplateNic {
                id: crate::model::NicId::new_random(),
                template_id: t.id,
                name: n.name,
                network: n.network,
                interface: n.interface,
                linked: n.linked,
            })
            .collect();
        let id = t.id;
        let storage_work = !disks.is_empty();
        let what = format!("Creating template {} from VM {}", t.name, v.name);
        let pending = self
            .run_adding::<AddTemplateSaga, _, _>(
                AddTemplateParams {
                    template: t,
                    vm,
                    dc,
                    disks,
                    nics,
                },
                Some(what),
                correlation_id,
                storage_work,
                |_| async { Ok(()) },
            )
            .await?;
        let entity = self
            .app
            .db
            .template_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("template", id))?;
        Ok(Added { entity, pending })
    }

    pub async fn remove_template(&self, id: TemplateId) -> Result<(), CommandError> {
        if id == BLANK_TEMPLATE_ID {
            return Err(CommandError::Conflict(
                "the Blank template cannot be removed".into(),
            ));
        }
        let t = self
            .app
            .db
            .template_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("template", id))?;
        let users = self
            .app
            .db
            .vm_count(&VmFilter {
                template: Some(Ref::Id(id)),
                ..Default::default()
            })
            .await?;
        if users > 0 {
            return Err(CommandError::Conflict(format!(
                "template {} is used by {users} VMs",
                t.name
            )));
        }
        let mut disks = Vec::new();
        for d in self.app.db.template_disks(id).await? {
            let dc = self.domain_dc(d.storage_domain_id).await?;
            disks.push(TemplateDiskPlace {
                disk: d.id,
                sd: d.storage_domain_id,
                dc: dc.id,
            });
        }
        self.run_as::<RemoveTemplateSaga>(
            RemoveTemplateParams { template: id, disks },
            Some(format!("Removing template {}", t.name)),
            None,
        )
        .await?;
        Ok(())
    }

    /// Waits for a VM status (tests, `oxvirt up`, async REST clients poll instead).
    pub async fn wait_vm_status(
        &self,
        id: VmId,
        want: VmStatus,
        timeout: Duration,
    ) -> Result<crate::model::Vm, CommandError> {
        let start = std::time::Instant::now();
        loop {
            let vm = self.vm(id).await?;
            if vm.runtime.status == want {
                return Ok(vm);
            }
            if start.elapsed() > timeout {
                return Err(CommandError::Conflict(format!(
                    "VM {} is {} after {timeout:?}, not {want}",
                    vm.name, vm.runtime.status
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
