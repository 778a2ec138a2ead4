//! The VM manager: runs VMs as QEMU processes driven over QMP.
//!
//! [`VmManager`] owns every VM on this node. Each VM has a directory in the node's run
//! directory, `<run_dir>/vms/<vm id>/`, holding everything needed to find it again after the
//! node process dies: `vm.json` (the [`VmRecord`]: the create request with its current volume
//! chains, and the loop devices of thin disks), `qemu.pid`, `qmp.sock`, `qga.sock`,
//! `serial.log`, `vnc.sock` and `qemu.log` (QEMU's stderr). QEMU runs in its own session and
//! survives the node (see [`process`]); [`VmManager::open`] recovers every VM it finds there.
//!
//! Per VM, one task consumes QMP events and the process's exit and feeds the state machine in
//! [`state`] (the lifecycle diagram lives there). Commands check the state first, act through
//! QMP, and wait (bounded) until the events they cause have moved the state, so a command that
//! returns has taken effect.
//!
//! Storage verbs stay with the SPM: for a live snapshot the caller has already created the
//! overlay volume (qcow2, backing = the current top); for a live merge the SPM deletes the
//! merged volumes afterwards; for thin disks extends go through [`thin::ExtendRequester`].
//!
//! Architecture invariant: the run directory only caches what can be re-derived (the chain is
//! also in the volumes' metadata, the state in QEMU); QEMU processes are never children whose
//! lives depend on the node's.

pub mod cdrom;
pub mod cpus;
pub mod disks;
pub mod hooks;
pub mod io_errors;
pub mod ksm;
pub mod memory;
pub mod nics;
pub mod process;
pub mod replica;
pub mod saved;
pub mod state;
pub mod thin;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oxvirt_qemu::cmdline::{format_node_name, layer_blockdevs, protocol_node_name};
use oxvirt_qemu::qga::GuestAgent;
use oxvirt_qemu::qmp::{self, Event, Qmp, QmpError};
use oxvirt_qemu::{
    Accel, BlockProtocol, Boot, BootDevice, CdromSpec, CpuDevice, DiskBus, DiskSpec, ImageFormat, LayerSpec,
    NicSpec, QemuTool, VmSpec, WriteErrorPolicy,
};
use oxvirt_types::{ImgUuid, SdUuid, VmId};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use self::hooks::{HookError, HookPoint, Hooks};
use self::process::{Exit, Process};
pub use self::state::{DownKind, DownReason, Input, Op, PauseReason, VmStatus};
use self::thin::{ExtendRequest, ExtendRequester, ThinPolicy, VolumeRef};

/// What the caller asks for: VDSM's `VM.create` parameters, in oxvirt's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCreate {
    pub id: VmId,
    pub name: String,
    pub cpus: u16,
    pub memory_mib: u64,
    /// `Auto` is resolved by probing KVM.
    pub accel: Accel,
    pub boot: Boot,
    pub disks: Vec<VmDisk>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    pub balloon: bool,
    /// Add the guest agent channel (freeze/thaw around live snapshots).
    pub guest_agent: bool,
    /// A VNC display on `vnc.sock` in the VM's run directory.
    pub vnc: bool,
    /// Storage domains on which this VM holds leases (its volumes' leases, its VM lease):
    /// self-fencing of one of them kills this VM.
    #[serde(default)]
    pub lease_domains: Vec<SdUuid>,
    /// The domain whose xleases hold this VM's own lease (an HA VM's), if it has one; a
    /// restarted node takes it back for the running VM.
    #[serde(default)]
    pub vm_lease: Option<SdUuid>,
    /// The CD-ROM drive, if the VM has one.
    #[serde(default)]
    pub cdrom: Option<cdrom::VmCdrom>,
    /// The firmware's boot order (see [`oxvirt_qemu::VmSpec::boot_order`]).
    #[serde(default)]
    pub boot_order: Vec<BootDevice>,
    /// The most vCPUs the VM may have (room for hot plug; see [`cpus`]); `None`: `cpus`.
    #[serde(default)]
    pub max_cpus: Option<u16>,
    /// vCPUs hot plugged beyond `cpus` (see [`cpus`]).
    #[serde(default)]
    pub cpu_devices: Vec<CpuDevice>,
    /// A vCPU was unplugged from the running QEMU (see [`cpus`]: under TCG none is plugged
    /// after that). Never set in a request: a new QEMU starts clean.
    #[serde(default)]
    pub cpus_unplugged: bool,
    /// The most memory DIMMs may bring the VM to (see [`memory`]); `None`: `memory_mib`.
    #[serde(default)]
    pub max_memory_mib: Option<u64>,
    /// DIMMs hot plugged beyond `memory_mib` (see [`memory`]).
    #[serde(default)]
    pub dimms: Vec<oxvirt_qemu::Dimm>,
    /// What to do when storage fails under the VM (see [`io_errors`]).
    #[serde(default)]
    pub resume_behavior: io_errors::ResumeBehavior,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    /// Base first, active layer last.
    pub layers: Vec<LayerSpec>,
    pub serial: Option<String>,
    pub read_only: bool,
    pub direct_io: bool,
    #[serde(default)]
    pub write_error: WriteErrorPolicy,
    /// The active layer is a capped thin volume: its file is opened through a loop device and
    /// grown on demand.
    #[serde(default)]
    pub thin: Option<ThinDisk>,
    /// The storage image the chain lives in (volumes are files named by their UUIDs). A
    /// writable disk's leaf is the volume whose lease the VM holds while it runs.
    #[serde(default)]
    pub image: Option<ImageRef>,
    /// The disk's slot (its device, node names and root port; see [`disks::DISK_PORTS`]):
    /// given at start or hot plug, kept for life. A migration destination gets the source's.
    #[serde(default)]
    pub slot: Option<u8>,
    /// The controller the guest sees it on (oVirt's disk interface).
    #[serde(default)]
    pub bus: DiskBus,
    /// I/O limits (see [`disks::IoTune`]); `None`: unlimited.
    #[serde(default)]
    pub io_tune: Option<disks::IoTune>,
}

impl VmCreate {
    /// The volumes the guest writes to (their leases are held while it runs).
    pub fn written_volumes(&self) -> Vec<VolumeRef> {
        self.disks.iter().filter_map(VmDisk::leaf_volume).collect()
    }
}

impl VmDisk {
    /// A writable disk of `layers` (base first) on no storage image: no serial, no thin
    /// layer, the default write-error policy, a slot given at start.
    pub fn new(layers: Vec<LayerSpec>) -> VmDisk {
        VmDisk {
            layers,
            serial: None,
            read_only: false,
            direct_io: false,
            write_error: WriteErrorPolicy::default(),
            thin: None,
            image: None,
            slot: None,
            bus: DiskBus::default(),
            io_tune: None,
        }
    }

    /// The volume the guest writes to: the active layer of a writable disk on a storage image.
    pub fn leaf_volume(&self) -> Option<VolumeRef> {
        let image = self.image.filter(|_| !self.read_only)?;
        let vol = self.layers.last()?.path.file_name()?.to_str()?.parse().ok()?;
        Some(VolumeRef {
            sd: image.sd,
            img: image.img,
            vol,
        })
    }
}

/// A storage image: the domain and image a disk's volumes belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub sd: SdUuid,
    pub img: ImgUuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinDisk {
    pub volume: Option<VolumeRef>,
    pub policy: ThinPolicy,
}

/// What is persisted in `vm.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The create request, with the disks' chains kept current through snapshots and merges.
    pub create: VmCreate,
    /// Per disk, the loop device standing in for its thin layer (kept after a snapshot put an
    /// overlay above it, until destroy detaches it).
    pub loops: Vec<Option<LoopDevice>>,
    /// A migration destination that stays paused after the stream completes until the node
    /// holds the VM's leases (the source gives them up at completion); cleared once it runs.
    /// `resume` refuses such a VM: only [`VmManager::resume_incoming`] starts it.
    #[serde(default)]
    pub hold_incoming: bool,
    /// The last balloon target set (MiB), so that a restarted node still reports it.
    #[serde(default)]
    pub balloon_target_mib: Option<u64>,
    /// A memory snapshot paused the running guest to save its state: a node that restarts
    /// before it ran again resumes it (see [`VmManager::snapshot`]).
    #[serde(default)]
    pub saving_memory: bool,
    /// A live snapshot's overlays (disk index, overlay file), recorded before the switch and
    /// cleared once the chains are updated: a node that restarts in between asks QEMU whether
    /// the switch happened (see [`VmManager::snapshot`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_overlays: Vec<(usize, PathBuf)>,
    /// A live merge running in QEMU, recorded before its block job starts and cleared once
    /// the chain is updated: a node that restarts meanwhile lets the job end and reads the
    /// chain QEMU has (see [`VmManager::merge`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_merge: Option<PendingMerge>,
    /// A disk hot plug or unplug at this slot, recorded (with the disk, for a plug) before
    /// QEMU is asked and cleared once done: a node that restarts meanwhile asks QEMU whether
    /// the device is there, and the record follows (see [`disks`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_device: Option<PendingDevice>,
    /// A disk being copied to another domain (see [`replica`]): recorded before the mirror
    /// job starts, cleared once the finish settled the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_replica: Option<replica::PendingReplica>,
}

/// A disk device change in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingDevice {
    pub slot: u8,
    /// A plug (else an unplug).
    pub plug: bool,
}

/// A live merge of `top` into `base` on disk `disk`, as block job `job`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingMerge {
    pub disk: usize,
    pub base: PathBuf,
    pub top: PathBuf,
    pub job: String,
}

impl VmRecord {
    /// The volumes the guest writes to: its disks' leaves, and a replica's leaf, which the
    /// mirror writes with every guest write.
    pub fn written_volumes(&self) -> Vec<VolumeRef> {
        let mut out = self.create.written_volumes();
        if let Some(p) = &self.pending_replica {
            let vol = p
                .layers
                .last()
                .and_then(|l| l.path.file_name()?.to_str()?.parse().ok());
            if let Some(vol) = vol {
                out.push(VolumeRef {
                    sd: p.target.sd,
                    img: p.target.img,
                    vol,
                });
            }
        }
        out
    }

    /// Refuses `what` (which would change a disk's chain or device) while a replica runs.
    fn refuse_while_replicating(&self, vm: VmId, what: &str) -> Result<(), VmError> {
        match &self.pending_replica {
            None => Ok(()),
            Some(p) => Err(VmError::Invalid {
                vm,
                reason: format!(
                    "its disk at slot {} is being copied to domain {}: no {what} until the copy ends",
                    p.slot, p.target.sd
                ),
            }),
        }
    }

    /// Drops the layers above `base` up to `top` from disk `disk`'s chain (a merge ended);
    /// returns them. Nothing when `top` is no longer in the chain.
    fn drop_merged(&mut self, disk: usize, base: &Path, top: &Path) -> Vec<PathBuf> {
        let d = &mut self.create.disks[disk];
        let pos = |p: &Path| d.layers.iter().position(|l| l.path == p);
        let (Some(bi), Some(ti)) = (pos(base), pos(top)) else {
            return Vec::new();
        };
        if bi >= ti {
            return Vec::new();
        }
        if ti + 1 == d.layers.len() {
            // The base is the active layer now; a thin top left with the merged layer.
            d.thin = None;
        }
        d.layers.drain(bi + 1..=ti).map(|l| l.path).collect()
    }

    /// The chains after a live snapshot onto `overlays` switched.
    fn push_overlays(&mut self, overlays: &[(usize, PathBuf)]) {
        for (disk, overlay) in overlays {
            self.create.disks[*disk].layers.push(LayerSpec {
                path: overlay.clone(),
                format: ImageFormat::Qcow2,
                protocol: BlockProtocol::File,
            });
            // The overlay is a plain file: the thin device now only backs a read-only layer.
            self.create.disks[*disk].thin = None;
        }
    }
}

/// The leases a live VM on this node holds or waits for, from its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLeaseNeeds {
    pub id: VmId,
    /// The domain of the VM's own lease (an HA VM's).
    pub vm_lease: Option<SdUuid>,
    /// The leaves of its writable disks.
    pub volumes: Vec<VolumeRef>,
    /// A migration destination waiting for the leases before it may run.
    pub awaiting: bool,
}

/// A thin volume's file and the loop device QEMU opens it through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopDevice {
    pub file: PathBuf,
    pub device: PathBuf,
}

impl VmRecord {
    /// The slot of disk `disk` (the index in `create.disks`): what QEMU names it after.
    pub fn slot(&self, disk: usize) -> usize {
        self.create.disks[disk].slot.map_or(disk, usize::from)
    }

    /// Every disk's slot, by index.
    pub fn slots(&self) -> Vec<usize> {
        (0..self.create.disks.len()).map(|i| self.slot(i)).collect()
    }

    /// The index of the disk at `slot`.
    pub fn disk_at_slot(&self, slot: usize) -> Option<usize> {
        self.slots().iter().position(|&s| s == slot)
    }

    /// Disk `disk` as QEMU sees it: a thin layer opened on its loop device.
    pub fn disk_spec(&self, disk: usize) -> DiskSpec {
        let d = &self.create.disks[disk];
        let mut layers = d.layers.clone();
        if let Some(Some(lp)) = self.loops.get(disk) {
            for l in layers.iter_mut().filter(|l| l.path == lp.file) {
                l.path = lp.device.clone();
                l.protocol = BlockProtocol::HostDevice;
            }
        }
        DiskSpec {
            layers,
            serial: d.serial.clone(),
            read_only: d.read_only,
            direct_io: d.direct_io,
            write_error: d.write_error,
            slot: d.slot,
            bus: d.bus,
        }
    }
}

/// A VM stopped on a storage error (see [`VmManager::io_paused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoPaused {
    pub id: VmId,
    pub pause: io_errors::IoPause,
    pub behavior: io_errors::ResumeBehavior,
    /// The storage domains of its disks.
    pub domains: Vec<SdUuid>,
}

/// A VM as `list`/`status` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: VmId,
    pub name: String,
    pub status: VmStatus,
    pub pid: u32,
    /// Current volume chains, base first.
    pub chains: Vec<Vec<PathBuf>>,
    /// NICs with their slots and link states (a migration destination needs the same).
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Per disk (as `chains`), its image and slot (a migration destination needs the same).
    #[serde(default)]
    pub disks: Vec<DiskSlot>,
    /// The CD-ROM drive and the ISO in it (a migration destination needs the same).
    #[serde(default)]
    pub cdrom: Option<cdrom::CdromInfo>,
    /// The vCPUs: started with, at most, hot plugged (a migration destination needs the same).
    #[serde(default)]
    pub cpus: Option<cpus::CpusInfo>,
    /// The memory: started with, at most, hot plugged (a migration destination needs the same).
    #[serde(default)]
    pub memory: Option<memory::MemoryInfo>,
}

/// Where a disk sits in the VM: its storage image, if it has one, its slot and its bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSlot {
    pub image: Option<ImageRef>,
    pub slot: u8,
    #[serde(default)]
    pub bus: DiskBus,
    /// Being plugged or unplugged: whether QEMU has it is not settled yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    pub status: VmStatus,
    /// CPU time of the whole QEMU process.
    pub cpu_user_ms: u64,
    pub cpu_system_ms: u64,
    /// CPU time of each vCPU thread.
    pub vcpu_ms: Vec<u64>,
    pub rss_bytes: u64,
    pub memory_mib: u64,
    /// The last balloon target set on this node (`None`: never set, the guest has it all).
    pub balloon_target_mib: Option<u64>,
    /// The balloon's view of guest memory, when the VM has one and the guest drives it.
    pub balloon_actual_bytes: Option<u64>,
    pub disks: Vec<DiskStats>,
    /// Thin volume extends done for this VM since the node started watching it.
    pub thin_extends: u64,
    /// Sum of the extends' round trips (trigger seen → request answered → device refreshed
    /// → threshold re-armed), for the average.
    pub thin_extend_total_ms: u64,
    /// Times the guest was paused on ENOSPC.
    pub enospc_pauses: u64,
    /// Why the guest is stopped on a storage error, while it is (VDSM's `pauseCode`).
    #[serde(default)]
    pub pause_code: Option<io_errors::PauseCode>,
    /// A guest that arrived by migration and waited paused for its leases: how long (ms)
    /// from the stream's end to running here.
    #[serde(default)]
    pub lease_wait_ms: Option<u64>,
    /// Percent done of the outgoing migration running now.
    #[serde(default)]
    pub migration_progress: Option<u8>,
    /// VDSM's `monitorResponse`: 0 when QEMU answered the stats queries, -1 when it did not
    /// within the time limit (its monitor is stuck; the other figures are then from procfs
    /// only).
    #[serde(default)]
    pub monitor_response: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    pub device: String,
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
}

/// One disk of a live snapshot: its new overlay, already created by the SPM with the disk's
/// current active layer as backing file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDisk {
    pub disk: usize,
    pub overlay: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// The guest's file systems were frozen around the snapshot.
    pub frozen: bool,
    /// Why they were not, when the VM has an agent channel.
    pub freeze_error: Option<String>,
    /// The bytes of memory and device state saved, for a snapshot with memory.
    pub memory_bytes: Option<u64>,
    /// QEMU's own time streaming them (the rest of `elapsed_ms` is ours and the disks').
    pub memory_stream_ms: Option<u64>,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeReport {
    /// The active layer was merged and the disk pivoted to the base.
    pub active: bool,
    /// Layers removed from the chain (the SPM deletes their volumes).
    pub removed: Vec<PathBuf>,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateParams {
    /// `tcp:host:port` as the destination's `prepare_incoming` returned it.
    pub uri: String,
    /// Longest tolerated pause at the switch-over.
    pub downtime_limit_ms: u64,
    /// Bytes per second.
    pub max_bandwidth: u64,
    /// Cancel when not done by then.
    pub timeout_ms: u64,
    /// Encrypt the stream with TLS (the destination must be prepared with it too): both ends
    /// present their node certificates, each checked against the engine's CA.
    pub encrypted: bool,
}

/// Where a VM's remote console listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleAddress {
    pub address: String,
    pub port: u16,
}

/// How far an outgoing migration is, sampled every [`MIGRATION_PROGRESS_INTERVAL`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub vm: VmId,
    /// Percent of guest RAM not left to send (VDSM's `migrationProgress`).
    pub progress: u8,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    pub mbps: f64,
    pub elapsed_ms: u64,
}

/// How often a running outgoing migration reports its progress.
pub const MIGRATION_PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// What a hibernation wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveReport {
    /// Size of the saved state.
    pub bytes: u64,
    /// From the request to QEMU gone (pause, stream, fsync, quit).
    pub elapsed_ms: u64,
    /// QEMU's own time for the stream.
    pub stream_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub total_ms: u64,
    pub downtime_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingInfo {
    pub uri: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceReport {
    /// VMs killed and confirmed gone.
    pub killed: Vec<VmId>,
    pub elapsed_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no VM {0} on this node")]
    NotFound(VmId),
    #[error("VM {0} already exists on this node")]
    Exists(VmId),
    #[error("VM {vm}: invalid request: {reason}")]
    Invalid { vm: VmId, reason: String },
    #[error("VM {vm}: cannot {op:?} while {status}")]
    WrongState { vm: VmId, op: Op, status: &'static str },
    #[error("VM {vm}: {what}")]
    Spec {
        vm: VmId,
        what: &'static str,
        #[source]
        source: oxvirt_qemu::cmdline::SpecError,
    },
    #[error("VM {vm}: no QMP connection (QEMU is gone or exiting)")]
    NoQmp { vm: VmId },
    #[error("VM {vm}: QEMU did not start: {detail}")]
    StartFailed { vm: VmId, detail: String },
    #[error("VM {vm}: QMP")]
    Qmp {
        vm: VmId,
        #[source]
        source: QmpError,
    },
    #[error("VM {vm}: {what}")]
    Process {
        vm: VmId,
        what: &'static str,
        #[source]
        source: process::ProcessError,
    },
    #[error("VM {vm}: run directory {path}")]
    RunDir {
        vm: VmId,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {vm}: hook")]
    Hook {
        vm: VmId,
        #[source]
        source: HookError,
    },
    #[error("VM {vm}: thin disk at slot {disk}")]
    Loop {
        vm: VmId,
        disk: usize,
        #[source]
        source: thin::LoopError,
    },
    #[error("VM {vm}: {what} did not finish within {timeout:?}")]
    Timeout {
        vm: VmId,
        what: &'static str,
        timeout: Duration,
    },
    #[error("VM {vm}: block job {job} failed: {reason}")]
    BlockJob { vm: VmId, job: String, reason: String },
    #[error("VM {vm}: migration failed: {reason}")]
    Migration { vm: VmId, reason: String },
    #[error("VM {vm}: NIC {mac}: {reason}")]
    Nic { vm: VmId, mac: String, reason: String },
    #[error("cannot locate QEMU")]
    Tool(#[source] oxvirt_qemu::ToolError),
    #[error("run directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("self-fencing of domain {sd}: VMs {survivors:?} still run after {within:?}")]
    FenceIncomplete {
        sd: SdUuid,
        survivors: Vec<VmId>,
        within: Duration,
    },
}

/// How the manager is set up; the node daemon builds it from its configuration.
pub struct VmManagerConfig {
    pub run_dir: PathBuf,
    /// `None`: find `qemu-system-x86_64` (honouring `OXVIRT_QEMU_SYSTEM`).
    pub qemu_binary: Option<PathBuf>,
    pub hooks: Hooks,
    /// How thin volumes are grown: [`thin::LocalSpmExtender`] on the SPM, the mailbox elsewhere.
    pub extender: Arc<dyn ExtendRequester>,
    /// From spawn to QMP answering.
    pub start_timeout: Duration,
    /// Per guest agent call.
    pub agent_timeout: Duration,
    /// For one VM's stats queries together: a QEMU that does not answer within it is reported
    /// as not responding (VDSM's `monitorResponse` -1) instead of holding up the host's stats.
    pub stats_timeout: Duration,
    /// Address incoming migrations listen on.
    pub migration_host: String,
    /// Where NICs on logical networks get their taps, and the namespace QEMU runs in.
    pub networks: Arc<dyn nics::NicNetworks>,
    /// QEMU's TLS credentials directory for encrypted migrations (`ca-cert.pem`,
    /// `server-*.pem`, `client-*.pem`: this node's certificate); `None`: none offered.
    pub migration_tls: Option<PathBuf>,
}

impl VmManagerConfig {
    pub fn new(run_dir: &Path) -> VmManagerConfig {
        VmManagerConfig {
            run_dir: run_dir.to_path_buf(),
            qemu_binary: None,
            hooks: Hooks::new(None, Duration::from_secs(30)),
            extender: Arc::new(thin::LocalSpmExtender),
            start_timeout: Duration::from_secs(30),
            agent_timeout: Duration::from_secs(5),
            stats_timeout: Duration::from_secs(5),
            migration_host: "127.0.0.1".into(),
            networks: Arc::new(nics::NoNetworks),
            migration_tls: None,
        }
    }
}

/// The id of the TLS credentials object of an encrypted migration, on either end.
const MIGRATION_TLS_ID: &str = "oxvirt-migration-tls";

/// A `tls-creds-x509` object for one end of an encrypted migration; the peer must present a
/// certificate of the same CA (the destination verifies the source too).
fn tls_creds(dir: &Path, endpoint: &str) -> qmp::ObjectAddTlsCreds {
    qmp::ObjectAddTlsCreds {
        qom_type: "tls-creds-x509".into(),
        id: MIGRATION_TLS_ID.into(),
        dir: dir.display().to_string(),
        endpoint: endpoint.into(),
        verify_peer: true,
    }
}

/// Longest wait for QEMU to act on a command (stop, cont, quit) on a loaded host.
const COMMAND_SETTLE: Duration = Duration::from_secs(20);

struct Vm {
    id: VmId,
    dir: PathBuf,
    record: Mutex<VmRecord>,
    status: watch::Sender<VmStatus>,
    /// Every status change of every VM of the manager, in order (see [`VmManager::changes`]).
    changes: broadcast::Sender<(VmId, VmStatus)>,
    qmp: Mutex<Option<Arc<Qmp>>>,
    /// `None` for a VM recovered after its QEMU was already gone.
    process: Option<Arc<Process>>,
    events: broadcast::Sender<Event>,
    /// Why we are making QEMU exit, so its exit is reported as such rather than as a death.
    intent: Mutex<Option<(DownKind, String)>>,
    /// The last SHUTDOWN event's (guest, reason).
    shutdown: Mutex<Option<(bool, String)>>,
    /// One extend at a time per disk, by slot.
    extending: Vec<tokio::sync::Mutex<()>>,
    /// Held by whatever addresses disks by index across awaits (hot plug and unplug, live
    /// snapshot, live merge): an unplug moves the indices.
    devices: tokio::sync::Mutex<()>,
    thin_extends: AtomicU64,
    thin_extend_us: AtomicU64,
    enospc_pauses: AtomicU64,
    /// The code of the first `BLOCK_IO_ERROR` since the guest last ran (QEMU sends it just
    /// before stopping the guest).
    io_error: Mutex<Option<io_errors::PauseCode>>,
    /// Set while the guest is stopped on a storage error.
    io_pause: Mutex<Option<io_errors::IoPause>>,
    /// ms + 1; 0 = did not wait (see `VmStats::lease_wait_ms`).
    lease_wait: AtomicU64,
    /// Percent + 1 of the outgoing migration; 0 = none running.
    migration_progress: AtomicU64,
    /// A cancel asked for the outgoing migration: also honoured when it arrives between the
    /// VM turning `MigrationSource` and QEMU's `migrate` (which a QEMU-side cancel would miss).
    migration_cancel: std::sync::atomic::AtomicBool,
    job_seq: AtomicU64,
}

impl Vm {
    fn qmp(&self) -> Result<Arc<Qmp>, VmError> {
        self.qmp
            .lock()
            .unwrap()
            .clone()
            .ok_or(VmError::NoQmp { vm: self.id })
    }

    fn status(&self) -> VmStatus {
        self.status.borrow().clone()
    }

    fn check(&self, op: Op) -> Result<(), VmError> {
        let s = self.status();
        if s.allows(op) {
            Ok(())
        } else {
            Err(VmError::WrongState {
                vm: self.id,
                op,
                status: s.vdsm_name(),
            })
        }
    }

    fn feed(&self, input: Input) {
        self.status.send_if_modified(|s| match s.next(&input) {
            Ok(n) => {
                if n != *s {
                    tracing::info!(vm_id = %self.id, from = s.vdsm_name(), to = n.vdsm_name(), ?input, "VM state");
                    let _ = self.changes.send((self.id, n.clone()));
                    *s = n;
                    true
                } else {
                    false
                }
            }
            Err(e) => {
                tracing::debug!(vm_id = %self.id, error = %e, "ignored input");
                false
            }
        });
    }

    async fn wait_status(
        &self,
        what: &'static str,
        timeout: Duration,
        pred: impl Fn(&VmStatus) -> bool,
    ) -> Result<VmStatus, VmError> {
        let mut rx = self.status.subscribe();
        let res = tokio::time::timeout(timeout, rx.wait_for(|s| pred(s))).await;
        match res {
            Ok(Ok(s)) => Ok(s.clone()),
            _ => Err(VmError::Timeout {
                vm: self.id,
                what,
                timeout,
            }),
        }
    }

    fn persist(&self) -> Result<(), VmError> {
        let rec = self.record.lock().unwrap().clone();
        write_record(&self.dir, &rec).map_err(|source| VmError::RunDir {
            vm: self.id,
            path: self.dir.join("vm.json"),
            source,
        })
    }

    fn info(&self) -> VmInfo {
        let rec = self.record.lock().unwrap();
        VmInfo {
            id: self.id,
            name: rec.create.name.clone(),
            status: self.status(),
            pid: self.process.as_ref().map_or(0, |p| p.pid()),
            chains: rec
                .create
                .disks
                .iter()
                .map(|d| d.layers.iter().map(|l| l.path.clone()).collect())
                .collect(),
            nics: rec.create.nics.clone(),
            disks: rec
                .create
                .disks
                .iter()
                .zip(rec.slots())
                .map(|(d, slot)| DiskSlot {
                    image: d.image,
                    slot: slot as u8,
                    bus: d.bus,
                    pending: rec.pending_device.is_some_and(|p| usize::from(p.slot) == slot),
                })
                .collect(),
            cdrom: rec.create.cdrom.as_ref().map(cdrom::VmCdrom::info),
            cpus: Some(cpus::CpusInfo::of(&rec.create)),
            memory: Some(memory::MemoryInfo::of(&rec.create)),
        }
    }

    fn set_intent(&self, kind: DownKind, detail: impl Into<String>) {
        *self.intent.lock().unwrap() = Some((kind, detail.into()));
    }

    fn pause_code(&self) -> Option<io_errors::PauseCode> {
        self.io_pause.lock().unwrap().map(|p| p.code)
    }

    /// Notes that QEMU stopped the guest on a storage error (the code from the event just
    /// before, else from the devices' `io-status`).
    async fn note_io_pause(&self) {
        let seen = self.io_error.lock().unwrap().take();
        let code = match seen {
            Some(c) => c,
            None => match self.qmp() {
                Ok(q) => q
                    .execute(&qmp::QueryBlock {})
                    .await
                    .map(|b| {
                        io_errors::PauseCode::from_io_status(b.iter().filter_map(|d| d.io_status.as_deref()))
                    })
                    .unwrap_or(io_errors::PauseCode::Eother),
                Err(_) => io_errors::PauseCode::Eother,
            },
        };
        if code == io_errors::PauseCode::Enospc {
            self.enospc_pauses.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(vm_id = %self.id, code = code.vdsm_name(), "guest stopped on a storage error");
        *self.io_pause.lock().unwrap() = Some(io_errors::IoPause {
            code,
            since: Instant::now(),
        });
    }
}

/// The `query-block` entry of the disk device at `slot`, if QEMU has that device.
async fn disk_block_info(vm: &Vm, slot: usize) -> Result<Option<qmp::BlockInfo>, VmError> {
    let device = oxvirt_qemu::cmdline::disk_device_id(slot);
    let blocks = vm
        .qmp()?
        .execute(&qmp::QueryBlock {})
        .await
        .map_err(|source| VmError::Qmp { vm: vm.id, source })?;
    Ok(blocks.into_iter().find(|b| {
        b.qdev
            .as_deref()
            .is_some_and(|d| d == device || d.contains(&format!("/{device}/")))
    }))
}

/// The block node names of `layers` of the disk at `slot`, top down, each format node before
/// its protocol node: the order in which `blockdev-del` can close them.
fn layer_node_names(slot: usize, layers: &[LayerSpec]) -> Vec<String> {
    layers
        .iter()
        .rev()
        .flat_map(|l| [format_node_name(slot, &l.path), protocol_node_name(slot, &l.path)])
        .collect()
}

/// Closes block nodes this node opened, in the order given (`blockdev-del`: a node goes once
/// nothing refers to it); one that stays open is logged, `what` saying whose it is.
async fn delete_block_nodes(vm: &Vm, names: impl IntoIterator<Item = String>, what: &str) {
    let Ok(q) = vm.qmp() else { return };
    for node_name in names {
        if let Err(e) = q
            .execute(&qmp::BlockdevDel {
                node_name: node_name.clone(),
            })
            .await
        {
            tracing::warn!(vm_id = %vm.id, node = %node_name, what, error = %e, "a block node stays open");
        }
    }
}

/// Asks the guest to release device `device` (`device_del`) and waits until QEMU removed it
/// (`DEVICE_DELETED`); `what` is what a timeout waited for.
async fn unplug_device(vm: &Vm, device: &str, timeout: Duration, what: &'static str) -> Result<(), VmError> {
    let mut events = vm.events.subscribe();
    match vm
        .qmp()?
        .execute_raw("device_del", serde_json::json!({ "id": device }))
        .await
    {
        Ok(_) => {}
        // Released already: an earlier unplug timed out (a paused guest) and the guest let the
        // device go later.
        Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {
            tracing::info!(vm_id = %vm.id, device, "device already gone");
            return Ok(());
        }
        Err(source) => return Err(VmError::Qmp { vm: vm.id, source }),
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => {
                return Err(VmError::Timeout {
                    vm: vm.id,
                    what,
                    timeout,
                })
            }
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) => return Err(VmError::NoQmp { vm: vm.id }),
            Ok(Ok(Event::Other { name, data })) if name == "DEVICE_DELETED" && data["device"] == device => {
                return Ok(())
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// The VM manager. All methods are safe to call concurrently.
pub struct VmManager {
    cfg: VmManagerConfig,
    qemu: PathBuf,
    accel_probe: oxvirt_qemu::KvmProbe,
    vms: Mutex<HashMap<VmId, Arc<Vm>>>,
    changes: broadcast::Sender<(VmId, VmStatus)>,
    progress: broadcast::Sender<MigrationProgress>,
}

impl VmManager {
    /// Opens the run directory and recovers every VM found in it.
    pub async fn open(cfg: VmManagerConfig) -> Result<Arc<VmManager>, VmError> {
        let qemu = match &cfg.qemu_binary {
            Some(p) => p.clone(),
            None => QemuTool::SystemX86_64.locate().map_err(VmError::Tool)?,
        };
        let vms_dir = cfg.run_dir.join("vms");
        std::fs::create_dir_all(&vms_dir).map_err(|source| VmError::Io {
            path: vms_dir.clone(),
            source,
        })?;
        let mgr = Arc::new(VmManager {
            cfg,
            qemu,
            accel_probe: oxvirt_qemu::probe_kvm(),
            vms: Mutex::new(HashMap::new()),
            changes: broadcast::channel(1024).0,
            progress: broadcast::channel(256).0,
        });
        let entries = std::fs::read_dir(&vms_dir).map_err(|source| VmError::Io {
            path: vms_dir.clone(),
            source,
        })?;
        for e in entries.filter_map(Result::ok) {
            let dir = e.path();
            match mgr.recover_one(&dir).await {
                Ok(Some(id)) => tracing::info!(vm_id = %id, "VM recovered"),
                Ok(None) => {}
                Err(err) => {
                    tracing::error!(dir = %dir.display(), error = %err, "cannot recover VM")
                }
            }
        }
        Ok(mgr)
    }

    fn get(&self, id: VmId) -> Result<Arc<Vm>, VmError> {
        self.vms
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .ok_or(VmError::NotFound(id))
    }

    /// Every status change from now on, in order, even ones undone within microseconds (a
    /// pause and resume): the node's event stream must not miss a transition that sampling
    /// `list` would. A receiver that lags gets `Lagged` and should resynchronise from `list`.
    /// Progress samples of outgoing migrations.
    pub fn migration_progress(&self) -> broadcast::Receiver<MigrationProgress> {
        self.progress.subscribe()
    }

    pub fn changes(&self) -> broadcast::Receiver<(VmId, VmStatus)> {
        self.changes.subscribe()
    }

    /// The TLS credentials directory for an encrypted migration of `vm`.
    fn migration_tls(&self, vm: VmId) -> Result<PathBuf, VmError> {
        self.cfg.migration_tls.clone().ok_or_else(|| VmError::Migration {
            vm,
            reason: "this node has no certificate for encrypted migrations".into(),
        })
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let vms: Vec<Arc<Vm>> = self.vms.lock().unwrap().values().cloned().collect();
        vms.iter().map(|v| v.info()).collect()
    }

    pub fn status(&self, id: VmId) -> Result<VmInfo, VmError> {
        Ok(self.get(id)?.info())
    }

    /// Waits until the VM's state satisfies `pred` (for callers that follow a VM's life, such
    /// as a migration destination waiting for `Up`).
    pub async fn wait_for(
        &self,
        id: VmId,
        timeout: Duration,
        pred: impl Fn(&VmStatus) -> bool,
    ) -> Result<VmStatus, VmError> {
        self.get(id)?.wait_status("state change", timeout, pred).await
    }

    /// The VM's run directory (serial console log, sockets).
    pub fn vm_dir(&self, id: VmId) -> PathBuf {
        self.cfg.run_dir.join("vms").join(id.to_string())
    }

    /// The serial console log.
    pub fn console_log(&self, id: VmId) -> PathBuf {
        self.vm_dir(id).join("serial.log")
    }

    /// Creates and starts a VM; returns once QEMU answers QMP and the guest runs.
    pub async fn create(&self, req: VmCreate) -> Result<VmInfo, VmError> {
        let vm = self.launch(req, None, false, false).await?;
        Ok(vm.info())
    }

    /// Prepares this node as a migration destination: starts QEMU waiting for the incoming
    /// stream and returns the URI the source migrates to. The VM becomes `Up` when the stream
    /// completes, or with `hold` stays `MigrationDestination` (QEMU paused) until
    /// [`VmManager::resume_incoming`]; a failed or cancelled migration makes the destination
    /// QEMU exit (`Down`).
    pub async fn prepare_incoming(
        &self,
        req: VmCreate,
        hold: bool,
        encrypted: bool,
    ) -> Result<IncomingInfo, VmError> {
        if encrypted {
            self.migration_tls(req.id)?;
        }
        let vm = self.launch(req, Some("defer".into()), hold, false).await?;
        let port = match self.listen_incoming(&vm, encrypted).await {
            Ok(p) => p,
            Err(e) => {
                let _ = self.destroy(vm.id).await;
                return Err(e);
            }
        };
        // The after-hook runs once the guest is here.
        let hooks = self.cfg.hooks.clone();
        let vm2 = vm.clone();
        tokio::spawn(async move {
            let mut rx = vm2.status.subscribe();
            let arrived = rx
                .wait_for(|s| !matches!(s, VmStatus::MigrationDestination))
                .await
                .map(|s| *s == VmStatus::Up)
                .unwrap_or(false);
            {
                if arrived {
                    let name = vm2.record.lock().unwrap().create.name.clone();
                    let _ = hooks
                        .run(
                            HookPoint::AfterVmMigrateDestination,
                            vm2.id,
                            &name,
                            &vm2.dir.join("vm.json"),
                        )
                        .await;
                }
            }
        });
        Ok(IncomingInfo {
            uri: format!("tcp:{}:{port}", self.cfg.migration_host),
        })
    }

    fn build_spec(&self, dir: &Path, rec: &VmRecord, incoming: Option<String>) -> VmSpec {
        let c = &rec.create;
        VmSpec {
            name: c.name.clone(),
            uuid: c.id.to_string(),
            cpus: c.cpus,
            max_cpus: c.max_cpus,
            cpu_devices: c.cpu_devices.clone(),
            memory_mib: c.memory_mib,
            max_memory_mib: c.max_memory_mib,
            dimms: c.dimms.clone(),
            accel: c.accel.resolve(&self.accel_probe),
            boot: c.boot.clone(),
            disks: (0..c.disks.len()).map(|i| rec.disk_spec(i)).collect(),
            qmp_socket: dir.join("qmp.sock"),
            serial_log: Some(dir.join("serial.log")),
            vnc_socket: c.vnc.then(|| dir.join("vnc.sock")),
            vnc_remote: c.vnc.then(|| self.cfg.migration_host.clone()),
            balloon: c.balloon,
            pid_file: Some(dir.join("qemu.pid")),
            start_paused: rec.hold_incoming && incoming.is_some(),
            incoming,
            nics: c.nics.clone(),
            nic_ports: nics::NIC_PORTS,
            disk_ports: disks::DISK_PORTS,
            guest_agent_socket: c.guest_agent.then(|| dir.join("qga.sock")),
            cdrom: c.cdrom.as_ref().map(|cd| CdromSpec {
                bus: cd.bus,
                media: cd.media.as_ref().map(|m| m.path.clone()),
                generation: cd.generation,
            }),
            boot_order: c.boot_order.clone(),
        }
    }

    fn validate(&self, req: &VmCreate) -> Result<(), VmError> {
        let invalid = |reason: String| VmError::Invalid { vm: req.id, reason };
        for (i, d) in req.disks.iter().enumerate() {
            if let Some(t) = &d.thin {
                t.policy
                    .validate()
                    .map_err(|e| invalid(format!("disk {i}: {e}")))?;
                let top = d
                    .layers
                    .last()
                    .ok_or_else(|| invalid(format!("disk {i} has no layers")))?;
                if top.format != ImageFormat::Qcow2 || d.read_only {
                    return Err(invalid(format!(
                        "disk {i}: a thin active layer must be a writable qcow2"
                    )));
                }
            }
        }
        let sock = self.vm_dir(req.id).join("qmp.sock");
        // sun_path holds 108 bytes including the terminating NUL.
        if sock.as_os_str().len() > 107 {
            return Err(invalid(format!(
                "run directory too deep for a UNIX socket: {}",
                sock.display()
            )));
        }
        Ok(())
    }

    /// `restoring`: the incoming stream is a saved state, not a migration (its hooks differ).
    async fn launch(
        &self,
        mut req: VmCreate,
        incoming: Option<String>,
        hold: bool,
        restoring: bool,
    ) -> Result<Arc<Vm>, VmError> {
        let id = req.id;
        nics::assign_slots(id, &mut req.nics)?;
        disks::assign_slots(id, &mut req.disks)?;
        self.validate(&req)?;
        let dir = self.vm_dir(id);
        // Reserve the id before any side effect so concurrent creates cannot both proceed.
        if self.vms.lock().unwrap().contains_key(&id) || dir.exists() {
            return Err(VmError::Exists(id));
        }
        let mut rec = VmRecord {
            loops: vec![None; req.disks.len()],
            create: req,
            hold_incoming: hold && incoming.is_some(),
            balloon_target_mib: None,
            saving_memory: false,
            pending_overlays: Vec::new(),
            pending_merge: None,
            pending_device: None,
            pending_replica: None,
        };
        let spec = self.build_spec(&dir, &rec, incoming.clone());
        spec.to_args().map_err(|source| VmError::Spec {
            vm: id,
            what: "invalid VM spec",
            source,
        })?;
        let run_dir_err = |source| VmError::RunDir {
            vm: id,
            path: dir.clone(),
            source,
        };
        std::fs::create_dir(&dir).map_err(run_dir_err)?;
        let res = self.launch_in(&dir, &mut rec, incoming, restoring).await;
        if res.is_err() {
            // Undo: nothing of a VM that did not start stays behind.
            for lp in rec.loops.iter().flatten() {
                let _ = thin::loop_detach(&lp.device);
            }
            nics::unplug_all(self.cfg.networks.as_ref(), id, &rec.create.nics).await;
            let _ = std::fs::remove_dir_all(&dir);
        }
        res
    }

    async fn launch_in(
        &self,
        dir: &Path,
        rec: &mut VmRecord,
        incoming: Option<String>,
        restoring: bool,
    ) -> Result<Arc<Vm>, VmError> {
        let id = rec.create.id;
        let point = match (&incoming, restoring) {
            (_, true) => HookPoint::BeforeVmDehibernate,
            (Some(_), false) => HookPoint::BeforeVmMigrateDestination,
            (None, false) => HookPoint::BeforeVmStart,
        };
        write_record(dir, rec).map_err(|source| VmError::RunDir {
            vm: id,
            path: dir.join("vm.json"),
            source,
        })?;
        self.cfg
            .hooks
            .run(point, id, &rec.create.name, &dir.join("vm.json"))
            .await
            .map_err(|source| VmError::Hook { vm: id, source })?;
        for (i, d) in rec.create.disks.iter().enumerate() {
            if d.thin.is_some() {
                let file = &d.layers.last().expect("validated").path;
                let dev = thin::loop_attach(file).map_err(|source| VmError::Loop {
                    vm: id,
                    disk: d.slot.map_or(i, usize::from),
                    source,
                })?;
                rec.loops[i] = Some(LoopDevice {
                    file: file.clone(),
                    device: dev,
                });
            }
        }
        write_record(dir, rec).map_err(|source| VmError::RunDir {
            vm: id,
            path: dir.join("vm.json"),
            source,
        })?;
        let spec = self.build_spec(dir, rec, incoming);
        let args = spec.to_args().map_err(|source| VmError::Spec {
            vm: id,
            what: "invalid VM spec",
            source,
        })?;
        nics::plug_all(self.cfg.networks.as_ref(), id, &rec.create.nics).await?;
        tracing::info!(vm_id = %id, qemu = %self.qemu.display(), args = ?args, "starting QEMU");
        let log = dir.join("qemu.log");
        let process = Process::spawn_detached_in(&self.qemu, &args, &log, self.cfg.networks.netns_fd())
            .map_err(|source| VmError::Process {
                vm: id,
                what: "spawn QEMU",
                source,
            })?;
        let process = Arc::new(process);
        let connected = connect_qmp(&spec.qmp_socket, &process, self.cfg.start_timeout).await;
        let (q, ev) = match connected {
            Ok(c) => c,
            Err(detail) => {
                let _ = process.signal(libc::SIGKILL);
                let _ = tokio::time::timeout(COMMAND_SETTLE, process.wait()).await;
                let tail = process::log_tail(&log, 5);
                return Err(VmError::StartFailed {
                    vm: id,
                    detail: format!("{detail}; QEMU log: {tail}"),
                });
            }
        };
        let vm = self.register(dir, rec.clone(), process, q, ev).await?;
        Ok(vm)
    }

    /// Adds a VM whose QEMU answers on `q`, starts its event task, and derives its state.
    async fn register(
        &self,
        dir: &Path,
        rec: VmRecord,
        process: Arc<Process>,
        q: Qmp,
        ev: qmp::EventStream,
    ) -> Result<Arc<Vm>, VmError> {
        let id = rec.create.id;
        let ndisks = rec.create.disks.len();
        let q = Arc::new(q);
        let st = q
            .execute(&qmp::QueryStatus {})
            .await
            .map_err(|source| VmError::Qmp { vm: id, source })?;
        let (status, _) = watch::channel(VmStatus::WaitForLaunch);
        let vm = Arc::new(Vm {
            id,
            dir: dir.to_path_buf(),
            record: Mutex::new(rec),
            status,
            changes: self.changes.clone(),
            qmp: Mutex::new(Some(q)),
            process: Some(process),
            events: broadcast::channel(1024).0,
            intent: Mutex::new(None),
            shutdown: Mutex::new(None),
            extending: extend_locks(ndisks),
            devices: tokio::sync::Mutex::new(()),
            thin_extends: AtomicU64::new(0),
            thin_extend_us: AtomicU64::new(0),
            enospc_pauses: AtomicU64::new(0),
            io_error: Mutex::new(None),
            io_pause: Mutex::new(None),
            lease_wait: AtomicU64::new(0),
            migration_progress: AtomicU64::new(0),
            migration_cancel: Default::default(),
            job_seq: AtomicU64::new(0),
        });
        vm.feed(Input::QmpReady {
            running: st.running,
            status: st.status.clone(),
        });
        self.vms.lock().unwrap().insert(id, vm.clone());
        tokio::spawn(vm_task(vm.clone(), ev, self.cfg.extender.clone()));
        self.settle_pending_snapshot(&vm).await?;
        Self::settle_pending_merge(&vm);
        disks::settle_pending_device(&vm).await?;
        if vm.record.lock().unwrap().saving_memory {
            tracing::warn!(vm_id = %id, run_state = %st.status, "resuming a guest left paused by a memory snapshot");
            self.run_after_memory_save(&vm).await;
        }
        nics::apply_link_states(&vm).await;
        arm_thresholds(&vm).await;
        disks::apply_io_tunes(&vm).await;
        if st.status == "io-error" {
            vm.note_io_pause().await;
            // Recovered (or started) while stopped on ENOSPC: extend now.
            let slots = vm.record.lock().unwrap().slots();
            for slot in slots {
                spawn_extend(vm.clone(), slot, self.cfg.extender.clone());
            }
        }
        Ok(vm)
    }

    async fn recover_one(&self, dir: &Path) -> Result<Option<VmId>, VmError> {
        let Ok(text) = std::fs::read_to_string(dir.join("vm.json")) else {
            return Ok(None);
        };
        let rec: VmRecord = serde_json::from_str(&text).map_err(|e| VmError::Io {
            path: dir.join("vm.json"),
            source: std::io::Error::other(e),
        })?;
        let id = rec.create.id;
        let qmp_sock = dir.join("qmp.sock");
        let marker = qmp_sock.display().to_string();
        let attached = process::read_pid_file(&dir.join("qemu.pid"))
            .ok_or_else(|| "no pid file".to_string())
            .and_then(|pid| Process::attach(pid, &marker).map_err(|e| e.to_string()));
        let process = match attached {
            Ok(p) if !p.has_exited() => Arc::new(p),
            other => {
                let why = match other {
                    Err(e) => e,
                    Ok(_) => "exited".into(),
                };
                let tail = process::log_tail(&dir.join("qemu.log"), 3);
                self.register_down(
                    dir,
                    rec,
                    DownReason {
                        kind: DownKind::Died,
                        detail: format!("QEMU is gone ({why}) after a node restart; log: {tail}"),
                    },
                );
                return Ok(Some(id));
            }
        };
        let (q, ev) = connect_qmp(&qmp_sock, &process, self.cfg.start_timeout)
            .await
            .map_err(|detail| VmError::StartFailed { vm: id, detail })?;
        for (i, lp) in rec.loops.iter().enumerate() {
            if let Some(lp) = lp {
                if thin::loop_backing_file(&lp.device).as_ref() != Some(&lp.file) {
                    tracing::warn!(vm_id = %id, disk = i, device = %lp.device.display(),
                        "loop device no longer shows the thin volume");
                }
            }
        }
        self.register(dir, rec, process, q, ev).await?;
        Ok(Some(id))
    }

    /// Registers a VM whose QEMU is already gone, so the caller can see why and destroy it.
    fn register_down(&self, dir: &Path, rec: VmRecord, reason: DownReason) {
        let id = rec.create.id;
        let (status, _) = watch::channel(VmStatus::Down { reason });
        let ndisks = rec.create.disks.len();
        let vm = Arc::new(Vm {
            id,
            dir: dir.to_path_buf(),
            record: Mutex::new(rec),
            status,
            changes: self.changes.clone(),
            qmp: Mutex::new(None),
            process: None,
            events: broadcast::channel(16).0,
            intent: Mutex::new(None),
            shutdown: Mutex::new(None),
            extending: extend_locks(ndisks),
            devices: tokio::sync::Mutex::new(()),
            thin_extends: AtomicU64::new(0),
            thin_extend_us: AtomicU64::new(0),
            enospc_pauses: AtomicU64::new(0),
            io_error: Mutex::new(None),
            io_pause: Mutex::new(None),
            lease_wait: AtomicU64::new(0),
            migration_progress: AtomicU64::new(0),
            migration_cancel: Default::default(),
            job_seq: AtomicU64::new(0),
        });
        self.vms.lock().unwrap().insert(id, vm);
    }

    pub async fn pause(&self, id: VmId) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Pause)?;
        vm.qmp()?
            .execute(&qmp::Stop {})
            .await
            .map_err(|source| VmError::Qmp { vm: id, source })?;
        vm.wait_status("pause", COMMAND_SETTLE, |s| {
            matches!(s, VmStatus::Paused { .. } | VmStatus::Down { .. })
        })
        .await?;
        Ok(vm.info())
    }

    pub async fn resume(&self, id: VmId) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Resume)?;
        if vm.record.lock().unwrap().hold_incoming {
            return Err(VmError::Invalid {
                vm: id,
                reason: "the VM arrived by migration and waits for its leases".into(),
            });
        }
        self.cont(&vm).await
    }

    async fn cont(&self, vm: &Vm) -> Result<VmInfo, VmError> {
        let id = vm.id;
        vm.qmp()?
            .execute(&qmp::Cont {})
            .await
            .map_err(|source| VmError::Qmp { vm: id, source })?;
        vm.wait_status("resume", COMMAND_SETTLE, |s| {
            matches!(s, VmStatus::Up | VmStatus::Down { .. })
        })
        .await?;
        Ok(vm.info())
    }

    /// Waits until a held migration destination has the whole guest (QEMU left `inmigrate`).
    /// Fails when the incoming migration failed (the destination QEMU exits).
    pub async fn wait_incoming(&self, id: VmId) -> Result<(), VmError> {
        let vm = self.get(id)?;
        // Subscribed before looking, so the completion cannot slip between look and wait.
        let mut events = vm.events.subscribe();
        let mut status = vm.status.subscribe();
        loop {
            if let VmStatus::Down { reason } = vm.status() {
                return Err(VmError::Migration {
                    vm: id,
                    reason: format!("the incoming migration failed: {}", reason.detail),
                });
            }
            let st = match vm.qmp() {
                Ok(q) => q.execute(&qmp::QueryStatus {}).await.ok(),
                Err(_) => None,
            };
            if st.is_some_and(|st| st.status != "inmigrate") {
                return Ok(());
            }
            tokio::select! {
                _ = events.recv() => {}
                _ = status.changed() => {}
                // QMP may be reconnecting; look again.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Whether `id` is a migration destination held (started with `-S`) for its leases or
    /// its thin disks, not yet let run.
    pub fn held_incoming(&self, id: VmId) -> bool {
        self.get(id)
            .is_ok_and(|vm| !vm.status().is_down() && vm.record.lock().unwrap().hold_incoming)
    }

    /// Makes the loop devices of `id`'s thin disks take their volumes' sizes on storage now
    /// (another host grew them: the source of a migration) and re-arms their thresholds there.
    pub async fn refresh_thin_devices(&self, id: VmId) {
        let Ok(vm) = self.get(id) else { return };
        let slots = vm.record.lock().unwrap().slots();
        for slot in slots {
            let Some((dev, _, thin)) = thin_target(&vm, slot) else {
                continue;
            };
            match thin::loop_refresh(&dev) {
                Ok(size) => {
                    tracing::info!(vm_id = %id, slot, size, "thin device refreshed");
                    set_threshold(&vm, slot, &dev, thin.policy.threshold(size)).await;
                }
                Err(e) => tracing::error!(vm_id = %id, slot, error = %e, "cannot refresh a thin device"),
            }
        }
    }

    /// Starts a held migration destination once the node holds its leases; `waited` is how
    /// long it waited for them (reported in the stats).
    pub async fn resume_incoming(&self, id: VmId, waited: Duration) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        if !vm.record.lock().unwrap().hold_incoming {
            return Err(VmError::Invalid {
                vm: id,
                reason: "not a migration destination waiting for its leases".into(),
            });
        }
        if !matches!(
            vm.status(),
            VmStatus::MigrationDestination | VmStatus::Paused { .. }
        ) {
            return Err(VmError::WrongState {
                vm: id,
                op: Op::Resume,
                status: vm.status().vdsm_name(),
            });
        }
        let info = self.cont(&vm).await?;
        vm.lease_wait
            .store(waited.as_millis() as u64 + 1, Ordering::Relaxed);
        vm.record.lock().unwrap().hold_incoming = false;
        vm.persist()?;
        Ok(info)
    }

    /// Resets the guest (the VM stays the same QEMU process).
    pub async fn reboot(&self, id: VmId) -> Result<(), VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Reboot)?;
        vm.qmp()?
            .execute(&qmp::SystemReset {})
            .await
            .map_err(|source| VmError::Qmp { vm: id, source })
    }

    /// Graceful shutdown: ACPI power button, then destroy if the guest is not down within
    /// `timeout`. Returns why the VM ended up down.
    pub async fn shutdown(&self, id: VmId, timeout: Duration) -> Result<DownReason, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Shutdown)?;
        vm.feed(Input::PowerdownRequested);
        vm.qmp()?
            .execute(&qmp::SystemPowerdown {})
            .await
            .map_err(|source| VmError::Qmp { vm: id, source })?;
        match vm.wait_status("shutdown", timeout, VmStatus::is_down).await {
            Ok(VmStatus::Down { reason }) => Ok(reason),
            _ => {
                tracing::warn!(vm_id = %id, ?timeout, "guest ignored the power button; destroying");
                vm.set_intent(
                    DownKind::Destroyed,
                    format!("graceful shutdown timed out after {timeout:?}"),
                );
                kill_and_wait(&vm).await?;
                match vm.status() {
                    VmStatus::Down { reason } => Ok(reason),
                    _ => Err(VmError::Timeout {
                        vm: id,
                        what: "destroy after shutdown timeout",
                        timeout: COMMAND_SETTLE,
                    }),
                }
            }
        }
    }

    /// Kills QEMU if it runs, releases the VM's resources, runs `after_vm_destroy` and forgets
    /// the VM. Returns why it was down (`Destroyed` when it was running).
    pub async fn destroy(&self, id: VmId) -> Result<DownReason, VmError> {
        let vm = self.get(id)?;
        if !vm.status().is_down() {
            vm.set_intent(DownKind::Destroyed, "destroyed on request");
            kill_and_wait(&vm).await?;
        }
        let reason = match vm.status() {
            VmStatus::Down { reason } => reason,
            _ => unreachable!("kill_and_wait returns only once the VM is down"),
        };
        let (name, loops, vm_nics) = {
            let r = vm.record.lock().unwrap();
            (r.create.name.clone(), r.loops.clone(), r.create.nics.clone())
        };
        nics::unplug_all(self.cfg.networks.as_ref(), id, &vm_nics).await;
        for lp in loops.iter().flatten() {
            if let Err(e) = thin::loop_detach(&lp.device) {
                tracing::warn!(vm_id = %id, device = %lp.device.display(), error = %e, "loop detach failed");
            }
        }
        let _ = self
            .cfg
            .hooks
            .run(HookPoint::AfterVmDestroy, id, &name, &vm.dir.join("vm.json"))
            .await;
        self.vms.lock().unwrap().remove(&id);
        std::fs::remove_dir_all(&vm.dir).map_err(|source| VmError::RunDir {
            vm: id,
            path: vm.dir.clone(),
            source,
        })?;
        Ok(reason)
    }

    pub async fn stats(&self, id: VmId) -> Result<VmStats, VmError> {
        self.stats_within(id, None).await
    }

    /// [`VmManager::stats`] with QEMU given at most `limit` for its queries (never more than
    /// the configured `stats_timeout`).
    pub async fn stats_within(&self, id: VmId, limit: Option<Duration>) -> Result<VmStats, VmError> {
        let vm = self.get(id)?;
        let status = vm.status();
        let (memory_mib, balloon_target_mib) = {
            let rec = vm.record.lock().unwrap();
            (
                memory::MemoryInfo::of(&rec.create).total_mib(),
                rec.balloon_target_mib,
            )
        };
        let pid = vm.process.as_ref().map_or(0, |p| p.pid());
        let (cpu_user_ms, cpu_system_ms) = proc_cpu_ms(&format!("/proc/{pid}/stat"));
        let rss_bytes = proc_rss(pid);
        let mut vcpu_ms = Vec::new();
        let mut balloon_actual_bytes = None;
        let mut disks = Vec::new();
        let mut monitor_response = 0;
        if let (false, Ok(q)) = (status.is_down(), vm.qmp()) {
            // One budget for the VM's queries together: a slow QEMU costs the caller at most
            // the limit, not the limit per query.
            let deadline =
                Instant::now() + limit.map_or(self.cfg.stats_timeout, |l| l.min(self.cfg.stats_timeout));
            let left = || deadline.saturating_duration_since(Instant::now());
            let sampled = async {
                let mut vcpu_ms = Vec::new();
                for c in q.execute_within(&qmp::QueryCpusFast {}, left()).await? {
                    let (u, s) = proc_cpu_ms(&format!("/proc/{pid}/task/{}/stat", c.thread_id));
                    vcpu_ms.push(u + s);
                }
                let balloon = match q.execute_within(&qmp::QueryBalloon {}, left()).await {
                    Ok(b) => Some(b.actual),
                    Err(e) if e.is_timeout() => return Err(e),
                    Err(_) => None, // no balloon device, or a guest without the driver
                };
                let disks: Vec<DiskStats> = q
                    .execute_within(&qmp::QueryBlockstats {}, left())
                    .await?
                    .into_iter()
                    .map(|b| DiskStats {
                        device: b.qdev.unwrap_or_default(),
                        rd_bytes: b.stats.rd_bytes,
                        wr_bytes: b.stats.wr_bytes,
                        rd_operations: b.stats.rd_operations,
                        wr_operations: b.stats.wr_operations,
                        flush_operations: b.stats.flush_operations,
                    })
                    .collect();
                Ok((vcpu_ms, balloon, disks))
            };
            match sampled.await {
                Ok((v, b, d)) => (vcpu_ms, balloon_actual_bytes, disks) = (v, b, d),
                Err(e) if e.is_timeout() => {
                    tracing::warn!(vm_id = %id, error = %e, "QEMU is not responding");
                    monitor_response = -1;
                }
                Err(source) => return Err(VmError::Qmp { vm: id, source }),
            }
        }
        Ok(VmStats {
            status,
            cpu_user_ms,
            cpu_system_ms,
            vcpu_ms,
            rss_bytes,
            memory_mib,
            balloon_target_mib,
            balloon_actual_bytes,
            disks,
            thin_extends: vm.thin_extends.load(Ordering::Relaxed),
            thin_extend_total_ms: vm.thin_extend_us.load(Ordering::Relaxed) / 1000,
            enospc_pauses: vm.enospc_pauses.load(Ordering::Relaxed),
            pause_code: vm.pause_code(),
            lease_wait_ms: vm.lease_wait.load(Ordering::Relaxed).checked_sub(1),
            migration_progress: vm
                .migration_progress
                .load(Ordering::Relaxed)
                .checked_sub(1)
                .map(|p| p as u8),
            monitor_response,
        })
    }

    /// Sets the balloon target: the guest gives memory back until it has `target_mib`.
    pub async fn set_balloon(&self, id: VmId, target_mib: u64) -> Result<(), VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Balloon)?;
        let max = memory::MemoryInfo::of(&vm.record.lock().unwrap().create).total_mib();
        if target_mib == 0 || target_mib > max {
            return Err(VmError::Invalid {
                vm: id,
                reason: format!("balloon target {target_mib} MiB is outside 1..={max} MiB"),
            });
        }
        vm.qmp()?
            .execute(&qmp::Balloon {
                value: target_mib << 20,
            })
            .await
            .map_err(|source| VmError::Qmp { vm: id, source })?;
        vm.record.lock().unwrap().balloon_target_mib = Some(target_mib);
        vm.persist()
    }

    /// Grows disk `disk`'s guest-visible size to `size` bytes (VDSM's `diskSizeExtend`): QEMU
    /// resizes the active layer (`block_resize`), so the image and the guest agree at once;
    /// the SPM then records the capacity. Asking for the size it has is harmless; shrinking
    /// and capped thin disks (whose layer is a fixed-size device) are refused.
    pub async fn extend_disk(&self, id: VmId, disk: usize, size: u64) -> Result<u64, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Devices)?;
        let (node, thin) = {
            let rec = vm.record.lock().unwrap();
            rec.refuse_while_replicating(id, "disk size change")?;
            let spec = rec.disk_spec(disk);
            let top = spec.layers.last().expect("a disk has layers");
            (
                format_node_name(rec.slot(disk), &top.path),
                top.protocol == BlockProtocol::HostDevice,
            )
        };
        if thin {
            return Err(VmError::Invalid {
                vm: id,
                reason: format!("disk {disk} is a capped thin volume: its size grows with its extends"),
            });
        }
        let q = vm.qmp()?;
        let qe = |source| VmError::Qmp { vm: id, source };
        let nodes = q
            .execute(&qmp::QueryNamedBlockNodes { flat: true })
            .await
            .map_err(qe)?;
        let current = nodes
            .iter()
            .find(|n| n.node_name == node)
            .and_then(|n| n.image.as_ref().map(|i| i.virtual_size))
            .ok_or_else(|| VmError::Invalid {
                vm: id,
                reason: format!("QEMU has no block node {node} for disk {disk}"),
            })?;
        if size < current {
            return Err(VmError::Invalid {
                vm: id,
                reason: format!("{size} bytes would shrink disk {disk} ({current} bytes)"),
            });
        }
        if size > current {
            q.execute(&qmp::BlockResize {
                node_name: node,
                size,
            })
            .await
            .map_err(qe)?;
        }
        Ok(size)
    }

    /// Live snapshot: each disk's new overlay becomes its active layer, atomically across
    /// disks, with the guest's file systems frozen around it when it has an agent.
    ///
    /// With `memory` (a file: the volume the SPM made for it) the guest's memory and devices
    /// are saved too, as VDSM's `snapMemory`: the guest pauses, its state streams to the file,
    /// the disks switch while it is still paused — so the state and the snapshot volumes show
    /// the same moment, and no freeze is needed — and it runs on. Its block nodes are inactive
    /// after the stream; QEMU 7.2 takes the snapshot on them and `cont` reactivates them.
    /// Asked again for overlays that are already the disks' active layers (a replay), it
    /// reports success and changes nothing.
    pub async fn snapshot(
        &self,
        id: VmId,
        disks: Vec<SnapshotDisk>,
        memory: Option<&Path>,
    ) -> Result<SnapshotReport, VmError> {
        let start = Instant::now();
        let vm = self.get(id)?;
        vm.check(Op::Snapshot)?;
        let _devices = vm.devices.lock().await;
        let invalid = |reason: String| VmError::Invalid { vm: id, reason };
        let rec = vm.record.lock().unwrap().clone();
        rec.refuse_while_replicating(id, "snapshot")?;
        if disks.is_empty() {
            return Err(invalid("no disks to snapshot".into()));
        }
        let is_top = |d: &SnapshotDisk| {
            rec.create
                .disks
                .get(d.disk)
                .and_then(|x| x.layers.last())
                .is_some_and(|l| l.path == d.overlay)
        };
        if disks.iter().all(is_top) {
            return Ok(SnapshotReport {
                frozen: false,
                freeze_error: None,
                memory_bytes: None,
                memory_stream_ms: None,
                elapsed_ms: start.elapsed().as_millis() as u64,
            });
        }
        if memory.is_some() && vm.status() != VmStatus::Up {
            return Err(invalid(format!(
                "its memory is saved only while the guest runs (it is {})",
                vm.status().vdsm_name()
            )));
        }
        let mut seen = Vec::new();
        for d in &disks {
            let disk = rec
                .create
                .disks
                .get(d.disk)
                .ok_or_else(|| invalid(format!("no disk {}", d.disk)))?;
            if seen.contains(&d.disk) {
                return Err(invalid(format!("disk {} listed twice", d.disk)));
            }
            seen.push(d.disk);
            if disk.read_only {
                return Err(invalid(format!("disk {} is read-only", d.disk)));
            }
            if disk.layers.iter().any(|l| l.path == d.overlay) {
                return Err(invalid(format!(
                    "{} is already in disk {}'s chain",
                    d.overlay.display(),
                    d.disk
                )));
            }
            if !d.overlay.is_file() {
                return Err(invalid(format!("overlay {} does not exist", d.overlay.display())));
            }
        }
        let q = vm.qmp()?;
        let qe = |source| VmError::Qmp { vm: id, source };
        // Open every overlay with no backing; blockdev-snapshot attaches the current top.
        let mut added: Vec<String> = Vec::new();
        let mut actions = Vec::new();
        let mut add_res = Ok(());
        for d in &disks {
            let layer = LayerSpec {
                path: d.overlay.clone(),
                format: ImageFormat::Qcow2,
                protocol: BlockProtocol::File,
            };
            let spec = rec.disk_spec(d.disk);
            let slot = rec.slot(d.disk);
            let (file, fmt) = layer_blockdevs(slot, &spec, &layer, None, true);
            for node in [file, fmt] {
                let name = node["node-name"].as_str().unwrap_or_default().to_string();
                if let Err(e) = q.execute(&qmp::BlockdevAdd { options: node }).await {
                    add_res = Err(qe(e));
                    break;
                }
                added.push(name);
            }
            if add_res.is_err() {
                break;
            }
            let top = rec
                .disk_spec(d.disk)
                .layers
                .last()
                .expect("a disk has layers")
                .path
                .clone();
            actions.push(serde_json::json!({
                "type": "blockdev-snapshot",
                "data": {
                    "node": format_node_name(slot, &top),
                    "overlay": format_node_name(slot, &d.overlay),
                }
            }));
        }
        let (mut memory_bytes, mut memory_stream_ms) = (None, None);
        if let (Ok(()), Some(path)) = (&add_res, memory) {
            vm.record.lock().unwrap().saving_memory = true;
            let saved = match vm.persist() {
                Ok(()) => self.stream_to_file(&vm, path).await,
                Err(e) => Err(e),
            };
            match saved {
                Ok((n, info)) => {
                    vm.feed(Input::StateSaved);
                    memory_bytes = Some(n);
                    memory_stream_ms = info.total_time;
                }
                Err(e) => {
                    // The guest runs as before (the stream put it back).
                    vm.record.lock().unwrap().saving_memory = false;
                    let _ = vm.persist();
                    add_res = Err(e);
                }
            }
        }
        let mut frozen = false;
        let mut freeze_error = None;
        let mut agent = None;
        if add_res.is_ok() && memory.is_none() && rec.create.guest_agent {
            match self.freeze(&vm).await {
                Ok(ga) => {
                    frozen = true;
                    agent = Some(ga);
                }
                Err(e) => {
                    tracing::warn!(vm_id = %id, error = %e, "snapshot without freezing the guest");
                    freeze_error = Some(e.to_string());
                }
            }
        }
        let overlays: Vec<(usize, PathBuf)> = disks.iter().map(|d| (d.disk, d.overlay.clone())).collect();
        // Recorded before the switch: a node dying right after it must not take the old chain
        // for the truth (leases, merges and migrations would use the wrong leaf).
        if add_res.is_ok() {
            vm.record.lock().unwrap().pending_overlays = overlays.clone();
            add_res = vm.persist();
        }
        let snap = match add_res {
            Ok(()) => q.execute(&qmp::Transaction { actions }).await.map_err(qe),
            Err(e) => Err(e),
        };
        if snap.is_ok() {
            test_crash_point("snapshot-switched");
        }
        if let Some(mut ga) = agent {
            if let Err(e) = ga.fsfreeze_thaw().await {
                tracing::error!(vm_id = %id, error = %e, "guest file systems may still be frozen");
            }
        }
        if memory_bytes.is_some() {
            // Whether or not the disks switched, the guest runs on.
            self.run_after_memory_save(&vm).await;
        }
        if let Err(e) = snap {
            // Undo: close what we opened; the chain is unchanged.
            delete_block_nodes(&vm, added.into_iter().rev(), "a snapshot overlay").await;
            vm.record.lock().unwrap().pending_overlays.clear();
            let _ = vm.persist();
            return Err(e);
        }
        {
            let mut r = vm.record.lock().unwrap();
            r.push_overlays(&overlays);
            r.pending_overlays.clear();
        }
        vm.persist()?;
        Ok(SnapshotReport {
            frozen,
            freeze_error,
            memory_bytes,
            memory_stream_ms,
            elapsed_ms: start.elapsed().as_millis() as u64,
        })
    }

    /// On recovery, a live snapshot the node died in: QEMU tells whether its overlays became
    /// the disks' active layers (the switch is one transaction: all or none), and the record
    /// follows.
    async fn settle_pending_snapshot(&self, vm: &Arc<Vm>) -> Result<(), VmError> {
        let pending = vm.record.lock().unwrap().pending_overlays.clone();
        if pending.is_empty() {
            return Ok(());
        }
        let q = vm.qmp()?;
        let roots: Vec<String> = q
            .execute(&qmp::QueryBlockstats {})
            .await
            .map_err(|source| VmError::Qmp { vm: vm.id, source })?
            .into_iter()
            .filter_map(|b| b.node_name)
            .collect();
        let switched = {
            let r = vm.record.lock().unwrap();
            pending
                .iter()
                .all(|(disk, overlay)| roots.contains(&format_node_name(r.slot(*disk), overlay)))
        };
        {
            let mut r = vm.record.lock().unwrap();
            if switched {
                r.push_overlays(&pending);
            }
            r.pending_overlays.clear();
        }
        vm.persist()?;
        tracing::warn!(vm_id = %vm.id, switched, overlays = ?pending, "settled a live snapshot the node died in");
        Ok(())
    }

    /// Runs on a guest a memory snapshot paused, and forgets that it did (also on recovery,
    /// for a node that died in between).
    async fn run_after_memory_save(&self, vm: &Arc<Vm>) {
        if matches!(vm.status(), VmStatus::SavingState | VmStatus::MigrationSource) {
            vm.feed(Input::StateSaved);
        }
        if let Err(e) = self.cont(vm).await {
            tracing::error!(vm_id = %vm.id, error = %e, "cannot resume the guest after saving its memory");
        }
        vm.record.lock().unwrap().saving_memory = false;
        if let Err(e) = vm.persist() {
            tracing::error!(vm_id = %vm.id, error = %e, "cannot record the resumed guest");
        }
    }

    async fn freeze(&self, vm: &Vm) -> Result<GuestAgent, oxvirt_qemu::qga::QgaError> {
        let mut ga = GuestAgent::connect(&vm.dir.join("qga.sock"), self.cfg.agent_timeout).await?;
        ga.fsfreeze_freeze().await?;
        Ok(ga)
    }

    /// Live merge of `top` into `base` (both in the disk's chain, `base` below `top`); the
    /// layers above `base` up to `top` leave the chain. When `top` is the active layer, the
    /// disk pivots to `base` once the commit has converged.
    pub async fn merge(
        &self,
        id: VmId,
        disk: usize,
        base: &Path,
        top: &Path,
        timeout: Duration,
    ) -> Result<MergeReport, VmError> {
        let start = Instant::now();
        let vm = self.get(id)?;
        vm.check(Op::Merge)?;
        let _devices = vm.devices.lock().await;
        let invalid = |reason: String| VmError::Invalid { vm: id, reason };
        let rec = vm.record.lock().unwrap().clone();
        rec.refuse_while_replicating(id, "live merge")?;
        let d = rec
            .create
            .disks
            .get(disk)
            .ok_or_else(|| invalid(format!("no disk {disk}")))?;
        if let Some(pm) = &rec.pending_merge {
            // One merge at a time; after a restart the last one is still being settled.
            return Err(invalid(format!(
                "the live merge of {} into {} is still running",
                pm.top.display(),
                pm.base.display()
            )));
        }
        let pos = |p: &Path| d.layers.iter().position(|l| l.path == p);
        if pos(base).is_some() && pos(top).is_none() {
            // Asked again after it ended (the answer was lost with a node that restarted).
            tracing::info!(vm_id = %id, disk, top = %top.display(), "live merge already done");
            return Ok(MergeReport {
                active: pos(base) == Some(d.layers.len() - 1),
                removed: Vec::new(),
                elapsed_ms: start.elapsed().as_millis() as u64,
            });
        }
        let (Some(bi), Some(ti)) = (pos(base), pos(top)) else {
            return Err(invalid(format!(
                "{} and {} must both be in disk {disk}'s chain",
                base.display(),
                top.display()
            )));
        };
        if bi >= ti {
            return Err(invalid(format!(
                "base {} is not below top {}",
                base.display(),
                top.display()
            )));
        }
        let spec = rec.disk_spec(disk);
        let slot = rec.slot(disk);
        let active = ti + 1 == d.layers.len();
        let job = format!("merge-{disk}-{}", vm.job_seq.fetch_add(1, Ordering::Relaxed));
        // The layer above `top` will point at `base`: relative, VDSM-style, when they share
        // a directory.
        let backing_file = (!active).then(|| {
            let above = &d.layers[ti + 1].path;
            if above.parent() == base.parent() {
                base.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            } else {
                base.display().to_string()
            }
        });
        let mut events = vm.events.subscribe();
        vm.record.lock().unwrap().pending_merge = Some(PendingMerge {
            disk,
            base: base.to_path_buf(),
            top: top.to_path_buf(),
            job: job.clone(),
        });
        vm.persist()?;
        let res = self
            .run_merge_job(
                &vm,
                &mut events,
                slot,
                &spec,
                bi,
                ti,
                active,
                &job,
                backing_file,
                timeout,
            )
            .await;
        if let Err(e) = res {
            vm.record.lock().unwrap().pending_merge = None;
            let _ = vm.persist();
            return Err(e);
        }
        test_crash_point("merge-completed");
        let removed = Self::finish_merge(&vm, disk, &spec, base, top).await?;
        tracing::info!(vm_id = %id, disk, job = %job, ?removed, "live merge done");
        Ok(MergeReport {
            active,
            removed,
            elapsed_ms: start.elapsed().as_millis() as u64,
        })
    }

    /// Runs the block-commit job of a live merge to its end.
    #[allow(clippy::too_many_arguments)]
    async fn run_merge_job(
        &self,
        vm: &Arc<Vm>,
        events: &mut broadcast::Receiver<Event>,
        slot: usize,
        spec: &DiskSpec,
        bi: usize,
        ti: usize,
        active: bool,
        job: &str,
        backing_file: Option<String>,
        timeout: Duration,
    ) -> Result<(), VmError> {
        let id = vm.id;
        let node = |i: usize| format_node_name(slot, &spec.layers[i].path);
        let q = vm.qmp()?;
        let qe = |source| VmError::Qmp { vm: id, source };
        let job = job.to_string();
        q.execute(&qmp::BlockCommit {
            job_id: job.clone(),
            device: node(spec.layers.len() - 1),
            top_node: node(ti),
            base_node: node(bi),
            backing_file,
            auto_finalize: true,
            auto_dismiss: true,
        })
        .await
        .map_err(qe)?;
        tracing::info!(vm_id = %id, slot, job = %job, active, "live merge started");
        let deadline = tokio::time::Instant::now() + timeout;
        let fail = |reason: String| VmError::BlockJob {
            vm: id,
            job: job.clone(),
            reason,
        };
        loop {
            let ev = match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => {
                    let _ = q.execute(&qmp::JobCancel { id: job.clone() }).await;
                    return Err(VmError::Timeout {
                        vm: id,
                        what: "live merge",
                        timeout,
                    });
                }
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) => return Err(fail("QEMU went away".into())),
                Ok(Ok(ev)) => ev,
            };
            match ev {
                Event::BlockJobReady(i) if i.device == job => {
                    q.execute(&qmp::JobComplete { id: job.clone() })
                        .await
                        .map_err(qe)?;
                }
                Event::BlockJobCompleted(i) if i.device == job => {
                    if let Some(e) = i.error {
                        return Err(fail(e));
                    }
                    return Ok(());
                }
                Event::BlockJobCancelled(i) if i.device == job => return Err(fail("cancelled".into())),
                Event::BlockJobError {
                    device, operation, ..
                } if device == job => {
                    return Err(fail(format!("{operation} error")));
                }
                _ => {}
            }
        }
    }

    /// After a merge's job ended with `top` out of the chain: closes the merged layers and
    /// records the chain without them.
    async fn finish_merge(
        vm: &Arc<Vm>,
        disk: usize,
        spec: &DiskSpec,
        base: &Path,
        top: &Path,
    ) -> Result<Vec<PathBuf>, VmError> {
        // QEMU must be there to close the merged layers; else a restarted node settles it.
        vm.qmp()?;
        // Positions in the record's chain (files); `spec` names the nodes (a thin layer is
        // opened through its loop device).
        let (bi, ti, slot) = {
            let r = vm.record.lock().unwrap();
            let d = &r.create.disks[disk];
            let pos = |p: &Path| d.layers.iter().position(|l| l.path == p);
            (pos(base), pos(top), r.slot(disk))
        };
        // The merged layers' nodes were opened by us (command line or blockdev-add): QEMU keeps
        // them, with their files open and `base` as their backing, until deleted — and a later
        // snapshot of `base` would find it busy. Top down: each is then unreferenced.
        if let (Some(bi), Some(ti)) = (bi, ti) {
            let merged = layer_node_names(slot, &spec.layers[bi + 1..=ti]);
            delete_block_nodes(vm, merged, "a merged layer").await;
        }
        let removed = {
            let mut r = vm.record.lock().unwrap();
            r.pending_merge = None;
            r.drop_merged(disk, base, top)
        };
        vm.persist()?;
        Ok(removed)
    }

    /// On recovery, a live merge the node died in: once QEMU's job has ended (a ready active
    /// commit is completed), the chain QEMU has open (`query-block`) says whether `top` left
    /// it, and the record follows. Runs in the background: a merge may take long.
    fn settle_pending_merge(vm: &Arc<Vm>) {
        let Some(pm) = vm.record.lock().unwrap().pending_merge.clone() else {
            return;
        };
        let vm = vm.clone();
        tokio::spawn(async move {
            if let Err(e) = Self::settle_merge(&vm, &pm).await {
                tracing::error!(vm_id = %vm.id, error = %e, "cannot settle the live merge the node died in");
            }
        });
    }

    async fn settle_merge(vm: &Arc<Vm>, pm: &PendingMerge) -> Result<(), VmError> {
        let qe = |source| VmError::Qmp { vm: vm.id, source };
        loop {
            let q = vm.qmp()?;
            let jobs = q.execute(&qmp::QueryJobs {}).await.map_err(qe)?;
            match jobs.iter().find(|j| j.id == pm.job) {
                None => break,
                Some(j) if j.status == "ready" => {
                    q.execute(&qmp::JobComplete { id: pm.job.clone() })
                        .await
                        .map_err(qe)?;
                }
                Some(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let slot = vm.record.lock().unwrap().slot(pm.disk);
        let chain: Vec<String> = disk_block_info(vm, slot)
            .await?
            .and_then(|b| b.inserted)
            .map(|i| i.image.files())
            .unwrap_or_default();
        let top = pm.top.display().to_string();
        let merged = !chain.is_empty() && !chain.contains(&top);
        let spec = vm.record.lock().unwrap().disk_spec(pm.disk);
        if merged {
            let removed = Self::finish_merge(vm, pm.disk, &spec, &pm.base, &pm.top).await?;
            tracing::warn!(vm_id = %vm.id, disk = pm.disk, ?removed, "settled a live merge the node died in: merged");
        } else {
            vm.record.lock().unwrap().pending_merge = None;
            vm.persist()?;
            tracing::warn!(vm_id = %vm.id, disk = pm.disk, ?chain, "settled a live merge the node died in: the chain is unchanged");
        }
        Ok(())
    }

    /// Live migration to a destination prepared with [`VmManager::prepare_incoming`]. On
    /// failure or cancel the VM keeps running here; on success QEMU here exits (`Migrated`).
    pub async fn migrate(&self, id: VmId, params: MigrateParams) -> Result<MigrationReport, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Migrate)?;
        vm.record
            .lock()
            .unwrap()
            .refuse_while_replicating(id, "migration")?;
        let name = vm.record.lock().unwrap().create.name.clone();
        let record_path = vm.dir.join("vm.json");
        self.cfg
            .hooks
            .run(HookPoint::BeforeVmMigrateSource, id, &name, &record_path)
            .await
            .map_err(|source| VmError::Hook { vm: id, source })?;
        let info = self.stream_out(&vm, &params, false).await?;
        let report = MigrationReport {
            total_ms: info.total_time.unwrap_or(0),
            downtime_ms: info.downtime.unwrap_or(0),
        };
        tracing::info!(vm_id = %id, total_ms = report.total_ms, downtime_ms = report.downtime_ms, "migration completed");
        self.quit_after_stream(&vm, DownKind::Migrated, format!("migrated to {}", params.uri))
            .await?;
        let _ = self
            .cfg
            .hooks
            .run(HookPoint::AfterVmMigrateSource, id, &name, &record_path)
            .await;
        Ok(report)
    }

    /// The source side of a migration stream to `params.uri`: returns QEMU's final figures
    /// once it completed (the VM is then `MigrationSource`, or `SavingState` when the stream
    /// goes `to_file`, its guest stopped here), or the error with the VM running (or paused)
    /// here as before.
    async fn stream_out(
        &self,
        vm: &Arc<Vm>,
        params: &MigrateParams,
        to_file: bool,
    ) -> Result<qmp::MigrationInfo, VmError> {
        let id = vm.id;
        let q = vm.qmp()?;
        let qe = |source| VmError::Qmp { vm: id, source };
        migration_events(&q).await.map_err(qe)?;
        // Credentials made afresh for each stream (an earlier attempt's may linger); a plain
        // stream turns TLS off, whatever an earlier one used.
        let tls_creds = if params.encrypted {
            let dir = self.migration_tls(id)?;
            let _ = q
                .execute(&qmp::ObjectDel {
                    id: MIGRATION_TLS_ID.into(),
                })
                .await;
            q.execute(&tls_creds(&dir, "client")).await.map_err(qe)?;
            MIGRATION_TLS_ID.to_string()
        } else {
            String::new()
        };
        q.execute(&qmp::MigrateSetParameters {
            downtime_limit: Some(params.downtime_limit_ms),
            max_bandwidth: Some(params.max_bandwidth),
            tls_creds: Some(tls_creds),
            tls_hostname: None,
        })
        .await
        .map_err(qe)?;
        let mut events = vm.events.subscribe();
        vm.migration_cancel.store(false, Ordering::SeqCst);
        vm.feed(if to_file {
            Input::SavingStarted
        } else {
            Input::MigrationStarted
        });
        let started = q
            .execute(&qmp::Migrate {
                uri: params.uri.clone(),
            })
            .await;
        if started.is_ok() && vm.migration_cancel.load(Ordering::SeqCst) {
            // Cancelled before QEMU had a migration to cancel: cancel it now.
            let _ = q.execute(&qmp::MigrateCancel {}).await;
        }
        if let Err(e) = started {
            let running = q
                .execute(&qmp::QueryStatus {})
                .await
                .map(|s| s.running)
                .unwrap_or(true);
            vm.feed(Input::MigrationEnded { ok: false, running });
            return Err(qe(e));
        }
        let timeout = Duration::from_millis(params.timeout_ms);
        let started = Instant::now();
        let mut deadline = tokio::time::Instant::now() + timeout;
        let mut cancelled_on_timeout = false;
        let mut sample = tokio::time::interval(MIGRATION_PROGRESS_INTERVAL);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sample.tick().await; // the first tick is immediate; nothing has moved yet
        let outcome = loop {
            let next = tokio::select! {
                r = tokio::time::timeout_at(deadline, events.recv()) => r,
                _ = sample.tick() => {
                    if let Ok(m) = q.execute(&qmp::QueryMigrate {}).await {
                        if let (Some("active"), Some(ram)) = (m.status.as_deref(), &m.ram) {
                            let p = MigrationProgress {
                                vm: id,
                                progress: ram.progress(),
                                remaining_bytes: ram.remaining,
                                total_bytes: ram.total,
                                mbps: ram.mbps,
                                elapsed_ms: started.elapsed().as_millis() as u64,
                            };
                            vm.migration_progress.store(p.progress as u64 + 1, Ordering::Relaxed);
                            let _ = self.progress.send(p);
                        }
                    }
                    continue;
                }
            };
            let ev = match next {
                Err(_) if !cancelled_on_timeout => {
                    cancelled_on_timeout = true;
                    tracing::warn!(vm_id = %id, ?timeout, "migration too slow; cancelling");
                    let _ = q.execute(&qmp::MigrateCancel {}).await;
                    // Give the cancel its own time to be confirmed.
                    deadline = tokio::time::Instant::now() + COMMAND_SETTLE;
                    continue;
                }
                Err(_) => break "cancelled".to_string(),
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) => break "failed".to_string(),
                Ok(Ok(ev)) => ev,
            };
            if let Event::Migration { status } = ev {
                if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
                    break status;
                }
            }
        };
        vm.migration_progress.store(0, Ordering::Relaxed);
        let mut info = q.execute(&qmp::QueryMigrate {}).await.unwrap_or_default();
        // QEMU announces `completed` before its migration thread has stored the final times;
        // they read 0 for a moment.
        for _ in 0..200 {
            if outcome != "completed" || info.total_time.unwrap_or(0) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            info = q.execute(&qmp::QueryMigrate {}).await.unwrap_or_default();
        }
        if outcome != "completed" {
            let running = q
                .execute(&qmp::QueryStatus {})
                .await
                .map(|s| s.running)
                .unwrap_or(true);
            vm.feed(Input::MigrationEnded { ok: false, running });
            let reason = match (cancelled_on_timeout, info.error_desc) {
                (true, _) => format!("cancelled after the {timeout:?} timeout"),
                (false, Some(d)) => d,
                (false, None) => outcome,
            };
            return Err(VmError::Migration { vm: id, reason });
        }
        vm.feed(Input::MigrationEnded {
            ok: true,
            running: false,
        });
        Ok(info)
    }

    /// After a completed outgoing stream: QEMU here exits (asked, then killed), the VM `Down`
    /// with `kind`.
    async fn quit_after_stream(&self, vm: &Arc<Vm>, kind: DownKind, detail: String) -> Result<(), VmError> {
        vm.set_intent(kind, detail);
        if let Ok(q) = vm.qmp() {
            let _ = q.execute(&qmp::Quit {}).await;
        }
        if vm
            .wait_status("quit", COMMAND_SETTLE, VmStatus::is_down)
            .await
            .is_err()
        {
            kill_and_wait(vm).await?;
        }
        Ok(())
    }

    /// Hibernation (VDSM's `VM.hibernate`): the guest's whole state (memory and devices) is
    /// written to `path` — an existing file, the volume the SPM made for it — and QEMU exits:
    /// the VM is `Down` with `Saved`. On failure the guest runs on as before.
    pub async fn save_state(&self, id: VmId, path: &Path) -> Result<SaveReport, VmError> {
        let start = Instant::now();
        let vm = self.get(id)?;
        vm.check(Op::Migrate)?;
        vm.record
            .lock()
            .unwrap()
            .refuse_while_replicating(id, "hibernation")?;
        self.run_hook(&vm, HookPoint::BeforeVmHibernate).await?;
        let (bytes, info) = self.stream_to_file(&vm, path).await?;
        self.quit_after_stream(&vm, DownKind::Saved, format!("state saved to {}", path.display()))
            .await?;
        let _ = self.run_hook(&vm, HookPoint::AfterVmHibernate).await;
        let report = SaveReport {
            bytes,
            elapsed_ms: start.elapsed().as_millis() as u64,
            stream_ms: info.total_time.unwrap_or(0),
        };
        tracing::info!(vm_id = %id, bytes, elapsed_ms = report.elapsed_ms, "VM state saved");
        Ok(report)
    }

    /// Pauses the guest and streams its whole state into `path`, an existing file. QEMU may
    /// not write files itself (`-sandbox spawn=deny`, no `exec:`), so it migrates over
    /// loopback TCP to the node, which writes and fsyncs the stream. Returns the bytes written
    /// and QEMU's figures; the VM is then `SavingState` (QEMU's `postmigrate`), its block
    /// nodes inactive until a `cont`. On failure the guest is as before.
    async fn stream_to_file(&self, vm: &Arc<Vm>, path: &Path) -> Result<(u64, qmp::MigrationInfo), VmError> {
        let id = vm.id;
        let io = |source| VmError::Io {
            path: path.to_path_buf(),
            source,
        };
        let header = {
            let r = vm.record.lock().unwrap();
            saved::encode(&r.create.nics, &r.create.disks)
        }
        .map_err(|reason| VmError::Invalid { vm: id, reason })?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(io)?;
        std::io::Write::write_all(&mut file, &header).map_err(io)?;
        let listener = tokio::net::TcpListener::bind((self.cfg.migration_host.as_str(), 0))
            .await
            .map_err(|source| VmError::Io {
                path: PathBuf::from(format!("tcp:{}:0", self.cfg.migration_host)),
                source,
            })?;
        let port = listener.local_addr().map_err(io)?.port();
        let writer = tokio::spawn(async move {
            let (mut conn, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
                .await
                .map_err(|_| std::io::Error::other("QEMU did not connect to save its state"))??;
            let mut out = tokio::fs::File::from_std(file);
            let n = tokio::io::copy(&mut conn, &mut out).await?;
            out.sync_all().await?;
            Ok::<u64, std::io::Error>(n + saved::HEADER_LEN as u64)
        });
        // A paused guest dirties nothing: the stream is one pass, and the saved state is the
        // moment of the pause.
        let was_running = vm.status() == VmStatus::Up;
        if was_running {
            self.pause(id).await?;
        }
        let params = MigrateParams {
            uri: format!("tcp:{}:{port}", self.cfg.migration_host),
            downtime_limit_ms: 300,
            max_bandwidth: 0,
            timeout_ms: 600_000,
            encrypted: false,
        };
        let info = match self.stream_out(vm, &params, true).await {
            Ok(info) => info,
            Err(e) => {
                if was_running {
                    let _ = self.resume(id).await;
                }
                // A stream that broke because the file could not be written: say so. (A writer
                // still waiting for data is not the cause: stop it.)
                let abort = writer.abort_handle();
                match tokio::time::timeout(Duration::from_secs(1), writer).await {
                    Ok(Ok(Err(source))) => return Err(io(source)),
                    Ok(_) => {}
                    Err(_) => abort.abort(),
                }
                return Err(e);
            }
        };
        let written = match writer.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        let bytes = match written {
            Ok(n) => n,
            Err(source) => {
                // QEMU sent everything but the state did not reach storage: the guest is still
                // whole here (QEMU stopped it after the stream); it goes on as before.
                if was_running {
                    if let Ok(q) = vm.qmp() {
                        let _ = q.execute(&qmp::Cont {}).await;
                    }
                }
                vm.feed(Input::MigrationEnded {
                    ok: false,
                    running: was_running,
                });
                return Err(io(source));
            }
        };
        Ok((bytes, info))
    }

    /// Starts a VM from a state [`VmManager::save_state`] wrote to `path`: QEMU waits for an
    /// incoming stream, the node feeds it the file over loopback TCP, and the guest goes on
    /// where it was paused. A state that does not load leaves nothing running.
    pub async fn restore(&self, mut req: VmCreate, path: &Path) -> Result<VmInfo, VmError> {
        let id = req.id;
        let io = |source| VmError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut head = Vec::with_capacity(saved::HEADER_LEN);
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&mut file, saved::HEADER_LEN as u64),
            &mut head,
        )
        .map_err(io)?;
        match saved::decode(&head) {
            Some(h) => {
                let h = h.map_err(|reason| VmError::Invalid { vm: id, reason })?;
                saved::apply(&h, &mut req.nics, &mut req.disks)
                    .map_err(|reason| VmError::Invalid { vm: id, reason })?;
            }
            // A bare stream: from its start.
            None => {
                std::io::Seek::rewind(&mut file).map_err(io)?;
            }
        }
        let file = tokio::fs::File::from_std(file);
        let vm = self.launch(req, Some("defer".into()), false, true).await?;
        let res = async {
            let port = self.listen_incoming(&vm, false).await?;
            let feed = async {
                let mut conn =
                    tokio::net::TcpStream::connect((self.cfg.migration_host.as_str(), port)).await?;
                let mut file = file;
                tokio::io::copy(&mut file, &mut conn).await?;
                tokio::io::AsyncWriteExt::shutdown(&mut conn).await
            };
            feed.await.map_err(|source| VmError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            self.wait_incoming(id).await?;
            self.cont(&vm).await
        }
        .await;
        match &res {
            Ok(_) => {
                let _ = self.run_hook(&vm, HookPoint::AfterVmDehibernate).await;
            }
            Err(_) => {
                let _ = self.destroy(id).await;
            }
        }
        res
    }

    /// Has a QEMU started with `-incoming defer` listen on loopback for the stream (with
    /// MIGRATION events, which end [`VmManager::wait_incoming`] as soon as it is in); returns
    /// the port.
    async fn listen_incoming(&self, vm: &Vm, encrypted: bool) -> Result<u16, VmError> {
        let id = vm.id;
        let q = vm.qmp()?;
        let qmp_err = |source| VmError::Qmp { vm: id, source };
        migration_events(&q).await.map_err(qmp_err)?;
        if encrypted {
            let dir = self.migration_tls(id)?;
            q.execute(&tls_creds(&dir, "server")).await.map_err(qmp_err)?;
            q.execute(&qmp::MigrateSetParameters {
                downtime_limit: None,
                max_bandwidth: None,
                tls_creds: Some(MIGRATION_TLS_ID.into()),
                tls_hostname: None,
            })
            .await
            .map_err(qmp_err)?;
        }
        q.execute(&qmp::MigrateIncoming {
            uri: format!("tcp:{}:0", self.cfg.migration_host),
        })
        .await
        .map_err(qmp_err)?;
        let info = q.execute(&qmp::QueryMigrate {}).await.map_err(qmp_err)?;
        info.socket_address
            .iter()
            .find_map(|a| a.port.as_ref()?.parse().ok())
            .ok_or_else(|| VmError::Migration {
                vm: id,
                reason: "QEMU reports no port to receive the stream on".into(),
            })
    }

    /// Runs the admin's hooks at `point` for `vm`; a vetoing hook's failure is the error.
    async fn run_hook(&self, vm: &Vm, point: HookPoint) -> Result<(), VmError> {
        let name = vm.record.lock().unwrap().create.name.clone();
        self.cfg
            .hooks
            .run(point, vm.id, &name, &vm.dir.join("vm.json"))
            .await
            .map(drop)
            .map_err(|source| VmError::Hook { vm: vm.id, source })
    }

    /// Cancels an outgoing migration; [`VmManager::migrate`] then returns its error and the VM
    /// keeps running here.
    /// Opens the VM's remote console for `ttl`: its VNC server (`remote`) takes `password`
    /// until then (VDSM's `VM.setTicket`). Answers where the console listens.
    pub async fn set_ticket(
        &self,
        id: VmId,
        password: &str,
        ttl: Duration,
    ) -> Result<ConsoleAddress, VmError> {
        let vm = self.get(id)?;
        let q = vm.qmp()?;
        let qe = |source| VmError::Qmp { vm: id, source };
        let servers = q.execute(&qmp::QueryVncServers {}).await.map_err(qe)?;
        let listener = servers
            .iter()
            .find(|s| s.id.as_deref() == Some(oxvirt_qemu::cmdline::REMOTE_VNC))
            .and_then(|s| s.server.iter().find(|l| l.family.starts_with("ipv")))
            .ok_or_else(|| VmError::Invalid {
                vm: id,
                reason: "the VM has no remote console (started without VNC)".into(),
            })?;
        let port = listener.service.parse().map_err(|_| VmError::Invalid {
            vm: id,
            reason: format!("its VNC server reports port {:?}", listener.service),
        })?;
        q.execute(&qmp::SetPassword {
            protocol: "vnc".into(),
            password: password.into(),
            display: Some(oxvirt_qemu::cmdline::REMOTE_VNC.into()),
        })
        .await
        .map_err(qe)?;
        q.execute(&qmp::ExpirePassword {
            protocol: "vnc".into(),
            time: format!("+{}", ttl.as_secs().max(1)),
            display: Some(oxvirt_qemu::cmdline::REMOTE_VNC.into()),
        })
        .await
        .map_err(qe)?;
        Ok(ConsoleAddress {
            address: listener.host.clone(),
            port,
        })
    }

    pub async fn migrate_cancel(&self, id: VmId) -> Result<(), VmError> {
        let vm = self.get(id)?;
        if vm.status() != VmStatus::MigrationSource {
            return Err(VmError::WrongState {
                vm: id,
                op: Op::Migrate,
                status: vm.status().vdsm_name(),
            });
        }
        vm.migration_cancel.store(true, Ordering::SeqCst);
        vm.qmp()?
            .execute(&qmp::MigrateCancel {})
            .await
            .map_err(|source| VmError::Qmp { vm: id, source })
    }

    /// Whether a live VM holds leases on `sd` (its disks' or its own): then this node's host id
    /// there must be kept, not re-taken (see the pool's `HoldersProbe`).
    pub fn relies_on_domain(&self, sd: SdUuid) -> bool {
        !self.holders_on(sd).is_empty()
    }

    /// Why VM `id` is stopped on a storage error, while it is.
    pub fn pause_code(&self, id: VmId) -> Option<io_errors::PauseCode> {
        self.get(id).ok()?.pause_code()
    }

    /// The VMs stopped on a storage error now, with what [`io_errors::verdict`] needs.
    pub fn io_paused(&self) -> Vec<IoPaused> {
        let vms: Vec<Arc<Vm>> = self.vms.lock().unwrap().values().cloned().collect();
        vms.iter()
            .filter(|v| {
                matches!(
                    v.status(),
                    VmStatus::Paused {
                        reason: PauseReason::IoError
                    }
                )
            })
            .filter_map(|v| {
                let pause = (*v.io_pause.lock().unwrap())?;
                let rec = v.record.lock().unwrap();
                let mut domains: Vec<SdUuid> = rec
                    .create
                    .disks
                    .iter()
                    .filter_map(|d| Some(d.image?.sd))
                    .collect();
                domains.sort();
                domains.dedup();
                Some(IoPaused {
                    id: v.id,
                    pause,
                    behavior: rec.create.resume_behavior,
                    domains,
                })
            })
            .collect()
    }

    /// Continues a VM stopped on a storage error, once its storage is back (a VM resumed
    /// or stopped meanwhile is left as it is).
    pub async fn resume_after_io_error(&self, id: VmId) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        let code = vm.pause_code();
        if code.is_none() {
            return Ok(vm.info());
        }
        tracing::info!(vm_id = %id, code = ?code, "storage is back; resuming the guest");
        self.cont(&vm).await
    }

    /// Kills a VM stopped on a storage error for too long (resume behaviour `kill`): it goes
    /// down as [`DownKind::PausedTooLong`], confirmed by QEMU's exit.
    pub async fn kill_paused(&self, id: VmId, paused_for: Duration) -> Result<DownReason, VmError> {
        let vm = self.get(id)?;
        let code = vm.pause_code().map_or("EOTHER", io_errors::PauseCode::vdsm_name);
        vm.set_intent(
            DownKind::PausedTooLong,
            format!("down because paused on a storage error ({code}) for {paused_for:.1?}"),
        );
        tracing::error!(vm_id = %id, code, ?paused_for, "killing a VM paused on a storage error for too long");
        if let Some(p) = &vm.process {
            let _ = p.signal(libc::SIGKILL);
        }
        match vm.wait_status("kill", COMMAND_SETTLE, VmStatus::is_down).await? {
            VmStatus::Down { reason } => Ok(reason),
            _ => unreachable!("waited for down"),
        }
    }

    /// Live VMs holding leases on `sd`.
    fn holders_on(&self, sd: SdUuid) -> Vec<Arc<Vm>> {
        self.vms
            .lock()
            .unwrap()
            .values()
            .filter(|v| !v.status().is_down() && v.record.lock().unwrap().create.lease_domains.contains(&sd))
            .cloned()
            .collect()
    }

    /// The leases of every VM that holds or awaits them here: not down, and not a migration
    /// source past its switch-over (its guest runs elsewhere now, with the leases).
    pub fn lease_needs(&self) -> Vec<VmLeaseNeeds> {
        self.vms
            .lock()
            .unwrap()
            .values()
            .filter(|v| !matches!(v.status(), VmStatus::Down { .. } | VmStatus::MigrationSource))
            .map(|v| {
                let rec = v.record.lock().unwrap();
                VmLeaseNeeds {
                    id: v.id,
                    vm_lease: rec.create.vm_lease,
                    volumes: rec.written_volumes(),
                    awaiting: rec.hold_incoming,
                }
            })
            .filter(|n| n.vm_lease.is_some() || !n.volumes.is_empty())
            .collect()
    }

    /// The leaves of a VM's writable disks: the volumes whose leases it holds while it runs.
    pub fn leaf_volumes(&self, id: VmId) -> Result<Vec<VolumeRef>, VmError> {
        let vm = self.get(id)?;
        let rec = vm.record.lock().unwrap();
        Ok(rec.written_volumes())
    }

    /// Records that the VM now holds its lease on `sd` (taken after it started, as on a
    /// migration destination), so that a restarted node takes it back too.
    pub fn set_vm_lease(&self, id: VmId, sd: SdUuid) -> Result<(), VmError> {
        let vm = self.get(id)?;
        {
            let mut rec = vm.record.lock().unwrap();
            rec.create.vm_lease = Some(sd);
            if !rec.create.lease_domains.contains(&sd) {
                rec.create.lease_domains.push(sd);
            }
        }
        vm.persist()
    }

    /// Self-fencing: kills every VM holding a lease on `sd` and confirms each QEMU has exited
    /// (pidfd) within `within`.
    pub async fn fence_storage_domain(&self, sd: SdUuid, within: Duration) -> Result<FenceReport, VmError> {
        let start = Instant::now();
        let targets = self.holders_on(sd);
        for vm in &targets {
            vm.set_intent(DownKind::Fenced, format!("self-fencing of storage domain {sd}"));
            if let Some(Err(e)) = vm.process.as_ref().map(|p| p.signal(libc::SIGKILL)) {
                tracing::error!(vm_id = %vm.id, error = %e, "cannot kill VM while fencing");
            }
        }
        let waits = targets.iter().map(|vm| {
            let vm = vm.clone();
            async move {
                let ok = match &vm.process {
                    Some(p) => tokio::time::timeout(within, p.wait()).await.is_ok(),
                    None => true,
                };
                (vm.id, ok)
            }
        });
        let results = futures_join_all(waits).await;
        let survivors: Vec<VmId> = results.iter().filter(|(_, ok)| !ok).map(|(id, _)| *id).collect();
        if !survivors.is_empty() {
            return Err(VmError::FenceIncomplete {
                sd,
                survivors,
                within,
            });
        }
        let report = FenceReport {
            killed: results.into_iter().map(|(id, _)| id).collect(),
            elapsed_ms: start.elapsed().as_millis() as u64,
        };
        tracing::warn!(sd_id = %sd, killed = ?report.killed, elapsed_ms = report.elapsed_ms, "self-fenced");
        Ok(report)
    }
}

/// Joins futures without pulling in the `futures` crate.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("fence waiter panicked"));
    }
    out
}

/// SIGTERM (QEMU exits cleanly), then SIGKILL; returns once the VM is `Down`.
async fn kill_and_wait(vm: &Vm) -> Result<(), VmError> {
    if let Some(p) = &vm.process {
        let _ = p.signal(libc::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(5), p.wait())
            .await
            .is_err()
        {
            let _ = p.signal(libc::SIGKILL);
        }
    }
    vm.wait_status("destroy", COMMAND_SETTLE, VmStatus::is_down)
        .await
        .map(drop)
}

/// Turns on QEMU's MIGRATION events, by which both ends of a stream follow it.
async fn migration_events(q: &Qmp) -> Result<(), QmpError> {
    q.execute(&qmp::MigrateSetCapabilities {
        capabilities: vec![qmp::MigrationCapability {
            capability: "events".into(),
            state: true,
        }],
    })
    .await
    .map(drop)
}

async fn connect_qmp(
    sock: &Path,
    process: &Process,
    timeout: Duration,
) -> Result<(Qmp, qmp::EventStream), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if process.has_exited() {
            return Err("QEMU exited before answering QMP".into());
        }
        // Bounded: QEMU serves one client at a time, so while another process still holds the
        // socket our connection is accepted but never greeted.
        match tokio::time::timeout_at(deadline, Qmp::connect(sock)).await {
            Ok(Ok(c)) => return Ok(c),
            Err(_) => {
                return Err(format!(
                    "QMP did not answer within {timeout:?} (is another node process attached?)"
                ))
            }
            Ok(Err(e)) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("QMP did not answer within {timeout:?}: {e}"))
            }
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// The per-VM task: QMP events and the process's exit drive the state machine.
async fn vm_task(vm: Arc<Vm>, mut ev: qmp::EventStream, extender: Arc<dyn ExtendRequester>) {
    let process = vm.process.clone().expect("a running VM has a process");
    let exit = loop {
        tokio::select! {
            e = ev.recv() => match e {
                Some(e) => handle_event(&vm, e, &extender).await,
                None => {
                    // QMP closed: normally QEMU is exiting. If it is still there after a
                    // moment, the connection alone was lost: connect again.
                    *vm.qmp.lock().unwrap() = None;
                    let settle = tokio::time::timeout(Duration::from_secs(2), process.wait());
                    if let Ok(exit) = settle.await {
                        break exit;
                    }
                    let sock = vm.dir.join("qmp.sock");
                    match connect_qmp(&sock, &process, COMMAND_SETTLE).await {
                        Ok((q, stream)) => {
                            tracing::warn!(vm_id = %vm.id, "QMP connection lost; reconnected");
                            *vm.qmp.lock().unwrap() = Some(Arc::new(q));
                            ev = stream;
                        }
                        Err(e) => {
                            tracing::error!(vm_id = %vm.id, error = %e, "QMP lost for good");
                            break process.wait().await;
                        }
                    }
                }
            },
            exit = process.wait() => {
                // The exit can be seen before the events QEMU sent just before it (SHUTDOWN
                // says whether the guest powered off): read what is left of the stream, which
                // ends once the socket's last bytes are in.
                let drain = async {
                    while let Some(e) = ev.recv().await {
                        if let Event::Shutdown { guest, reason } = e {
                            *vm.shutdown.lock().unwrap() = Some((guest, reason));
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                break exit;
            }
        }
    };
    *vm.qmp.lock().unwrap() = None;
    let intent = vm.intent.lock().unwrap().take();
    let shutdown = vm.shutdown.lock().unwrap().take();
    let status = match &exit {
        Exit::Status(s) => s.clone(),
        Exit::Unknown => "exit status unknown (not our child)".into(),
    };
    let reason = match (intent, shutdown) {
        (Some((kind, detail)), _) => DownReason { kind, detail },
        (None, Some((true, r))) => DownReason {
            kind: DownKind::GuestShutdown,
            detail: format!("guest shut down ({r})"),
        },
        (None, Some((false, r))) => DownReason {
            kind: DownKind::Died,
            detail: format!("QEMU shut down by the host ({r}), {status}"),
        },
        (None, None) => DownReason {
            kind: DownKind::Died,
            detail: format!(
                "QEMU exited unexpectedly, {status}; log: {}",
                process::log_tail(&vm.dir.join("qemu.log"), 5)
            ),
        },
    };
    tracing::info!(vm_id = %vm.id, kind = ?reason.kind, detail = %reason.detail, "VM down");
    vm.feed(Input::Exited(reason));
}

async fn handle_event(vm: &Arc<Vm>, e: Event, extender: &Arc<dyn ExtendRequester>) {
    tracing::debug!(vm_id = %vm.id, event = ?e, "QMP event");
    match &e {
        Event::Stop => {
            let st = match vm.qmp() {
                Ok(q) => q.execute(&qmp::QueryStatus {}).await.ok(),
                Err(_) => None,
            };
            let status = st.map(|s| s.status).unwrap_or_else(|| "paused".into());
            if status == "io-error" {
                vm.note_io_pause().await;
            }
            vm.feed(Input::Stopped { status });
        }
        Event::Resume => {
            *vm.io_pause.lock().unwrap() = None;
            *vm.io_error.lock().unwrap() = None;
            vm.feed(Input::Resumed)
        }
        Event::Shutdown { guest, reason } => {
            *vm.shutdown.lock().unwrap() = Some((*guest, reason.clone()));
        }
        Event::BlockWriteThreshold { node_name, .. } => {
            if let Some(disk) = thin_disk_of_node(vm, node_name) {
                spawn_extend(vm.clone(), disk, extender.clone());
            }
        }
        Event::BlockIoError {
            node_name,
            nospace,
            reason,
            ..
        } => {
            vm.io_error
                .lock()
                .unwrap()
                .get_or_insert(io_errors::PauseCode::from_event(*nospace, reason));
            if let (Some(node_name), true) = (node_name, nospace) {
                if let Some(disk) = thin_disk_of_node(vm, node_name) {
                    spawn_extend(vm.clone(), disk, extender.clone());
                }
            }
        }
        _ => {}
    }
    let _ = vm.events.send(e);
}

/// One extend lock per disk slot (a hot plugged disk gets a free one).
fn extend_locks(ndisks: usize) -> Vec<tokio::sync::Mutex<()>> {
    (0..ndisks.max(usize::from(disks::DISK_PORTS)))
        .map(|_| tokio::sync::Mutex::new(()))
        .collect()
}

/// The slot of the thin disk whose active layer `node` (format or protocol node) belongs to.
/// Thin disks are named by slot from here on: a hot unplug moves the others' indices.
fn thin_disk_of_node(vm: &Vm, node: &str) -> Option<usize> {
    let rec = vm.record.lock().unwrap();
    rec.loops.iter().enumerate().find_map(|(i, lp)| {
        let dev = &lp.as_ref()?.device;
        rec.create.disks[i].thin.as_ref()?;
        let slot = rec.slot(i);
        (format_node_name(slot, dev) == node || protocol_node_name(slot, dev) == node).then_some(slot)
    })
}

fn thin_target(vm: &Vm, slot: usize) -> Option<(PathBuf, PathBuf, ThinDisk)> {
    let rec = vm.record.lock().unwrap();
    let disk = rec.disk_at_slot(slot)?;
    let d = rec.create.disks.get(disk)?;
    let thin = d.thin.clone()?;
    let lp = rec.loops.get(disk)?.clone()?;
    Some((lp.device, lp.file, thin))
}

/// Arms the write threshold of every thin disk at its current size.
async fn arm_thresholds(vm: &Vm) {
    let slots = vm.record.lock().unwrap().slots();
    for slot in slots {
        let Some((dev, _, thin)) = thin_target(vm, slot) else {
            continue;
        };
        match thin::device_size(&dev) {
            Ok(size) => set_threshold(vm, slot, &dev, thin.policy.threshold(size)).await,
            Err(e) => tracing::error!(vm_id = %vm.id, slot, error = %e, "cannot size thin volume"),
        }
    }
}

async fn set_threshold(vm: &Vm, slot: usize, dev: &Path, threshold: Option<u64>) {
    let Ok(q) = vm.qmp() else { return };
    let res = q
        .execute(&qmp::BlockSetWriteThreshold {
            node_name: protocol_node_name(slot, dev),
            write_threshold: threshold.unwrap_or(0),
        })
        .await;
    if let Err(e) = res {
        tracing::error!(vm_id = %vm.id, slot, error = %e, "cannot set write threshold");
    }
}

/// Runs an extend cycle, retrying with backoff (1 s doubling to 30 s) while it fails and the VM
/// lives: a guest paused on ENOSPC raises no new event, so without a retry a transient failure
/// (SPM moving, pool not yet reconnected after a node restart) would leave it paused for good.
fn spawn_extend(vm: Arc<Vm>, slot: usize, extender: Arc<dyn ExtendRequester>) {
    tokio::spawn(async move {
        let mut delay = Duration::from_secs(1);
        loop {
            let Err(e) = extend_disk(&vm, slot, extender.as_ref()).await else {
                return;
            };
            if vm.status().is_down() {
                return;
            }
            tracing::error!(vm_id = %vm.id, slot, error = %e, retry_in_s = delay.as_secs(),
                "thin extend failed");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    });
}

/// One extend cycle: request, refresh, re-arm, resume. Serialized per disk; a cycle that finds
/// the volume already grown past the need (a duplicate trigger) does nothing.
async fn extend_disk(vm: &Vm, slot: usize, extender: &dyn ExtendRequester) -> Result<(), VmError> {
    let start = Instant::now();
    let Some(lock) = vm.extending.get(slot) else {
        return Ok(());
    };
    let _guard = lock.lock().await;
    let Some((dev, file, thin)) = thin_target(vm, slot) else {
        return Ok(());
    };
    let loop_err = |source| VmError::Loop {
        vm: vm.id,
        disk: slot,
        source,
    };
    let q = vm.qmp()?;
    let paused_enospc = matches!(
        vm.status(),
        VmStatus::Paused {
            reason: PauseReason::IoError
        }
    );
    // Still needed? The threshold reads 0 once it fired; an armed one means a previous
    // cycle already answered this trigger.
    let armed = q
        .execute(&qmp::QueryNamedBlockNodes { flat: true })
        .await
        .ok()
        .and_then(|nodes| {
            let name = protocol_node_name(slot, &dev);
            nodes.into_iter().find(|n| n.node_name == name)
        })
        .map(|n| n.write_threshold > 0)
        .unwrap_or(false);
    if armed && !paused_enospc {
        return Ok(());
    }
    let size = thin::device_size(&dev).map_err(loop_err)?;
    let Some(new_size) = thin.policy.next_size(size) else {
        tracing::error!(vm_id = %vm.id, slot, size, "thin volume at its maximum size; cannot extend");
        return Ok(());
    };
    let req = ExtendRequest {
        vm: vm.id,
        disk: slot,
        volume: thin.volume,
        backing_file: file,
        current_size: size,
        new_size,
    };
    extender.extend(&req).await.map_err(|e| VmError::Invalid {
        vm: vm.id,
        reason: format!("extend request for the disk at slot {slot} failed: {e}"),
    })?;
    let now = thin::loop_refresh(&dev).map_err(loop_err)?;
    set_threshold(vm, slot, &dev, thin.policy.threshold(now)).await;
    vm.thin_extends.fetch_add(1, Ordering::Relaxed);
    vm.thin_extend_us
        .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
    tracing::info!(vm_id = %vm.id, slot, from = size, to = now,
        elapsed_ms = start.elapsed().as_millis() as u64, "thin volume extended");
    if matches!(
        vm.status(),
        VmStatus::Paused {
            reason: PauseReason::IoError
        }
    ) {
        q.execute(&qmp::Cont {})
            .await
            .map_err(|source| VmError::Qmp { vm: vm.id, source })?;
    }
    Ok(())
}

/// Writes `vm.json` atomically: temp file, fsync, rename, fsync the directory.
fn write_record(dir: &Path, rec: &VmRecord) -> std::io::Result<()> {
    let tmp = dir.join("vm.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join("vm.json"))?;
    std::fs::File::open(dir)?.sync_all()
}

/// utime and stime of a `/proc/.../stat` file, in milliseconds.
fn proc_cpu_ms(path: &str) -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string(path) else {
        return (0, 0);
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return (0, 0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) * 1000 / hz, ticks(12) * 1000 / hz)
}

fn proc_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The node's crash test hook: with `OXVIRT_TEST_NODE_CRASH_AT=<point>` in the environment,
/// the node process kills itself (SIGKILL) at that point — for the tests that restart a node
/// at an exact place. Read once; unset in production.
fn test_crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("OXVIRT_TEST_NODE_CRASH_AT").ok());
    if at.as_deref() == Some(point) {
        tracing::warn!(point, "OXVIRT_TEST_NODE_CRASH_AT: killing the node process");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
