//! The engine's model: what the database stores, as typed Rust values.
//!
//! Enums carry oVirt's lowercase names (the REST API serves them as they are) and are stored as
//! that text. Every struct is one row (plus, for a few, rows of a child table that always
//! travel with it: a snapshot's disks, an affinity group's VMs).
//!
//! Two kinds of fields on the rows that commands race on (data centers, clusters, hosts,
//! storage domains, disks, templates, VMs):
//! - configuration, changed by `*_update` with optimistic concurrency on `revision` (a stale
//!   revision is a [`DbError::Conflict`](crate::db::DbError::Conflict), never a lost update);
//! - run-time state (status, where a VM runs), changed by compare-and-set on the expected status
//!   and never bumping `revision`, so that monitoring does not invalidate an admin's edit.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use oxvirt_types::{
    AffinityGroupId, ClusterId, DcId, DiskProfileId, HostId, HostUuid, ImgUuid, JobId, NicId, PoolUuid,
    QosId, SagaId, SdUuid, SnapshotId, StepId, TagId, TemplateId, TransferId, UserId, VmId, VolUuid,
};

use crate::time::Timestamp;

/// A disk's id is its image's id (`imgUUID`), as in oVirt.
pub type DiskId = ImgUuid;

/// The built-in Blank template's id.
pub const BLANK_TEMPLATE_ID: TemplateId = TemplateId::nil();

/// A stored enum value this engine does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownValue {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! model_enum {
    ($(#[$m:meta])* $name:ident, $kind:literal { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vm])* $v),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($s => Ok($name::$v),)+
                    _ => Err(UnknownValue { kind: $kind, value: s.chars().take(64).collect() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

model_enum!(
    /// A data center's status (oVirt `data_center_status`).
    DcStatus, "data center status" {
        Uninitialized = "uninitialized",
        Up = "up",
        Maintenance = "maintenance",
        NotOperational = "not_operational",
        Problematic = "problematic",
        Contend = "contend",
    }
);

model_enum!(
    /// Where a data center stands in electing its SPM.
    SpmStatus, "SPM status" {
        None = "none",
        Contending = "contending",
        Spm = "spm",
    }
);

model_enum!(
    /// A cluster's scheduling policy (issue 10's scheduler implements them).
    SchedulingPolicy, "scheduling policy" {
        None = "none",
        EvenlyDistributed = "evenly_distributed",
        PowerSaving = "power_saving",
        VmEvenlyDistributed = "vm_evenly_distributed",
    }
);

model_enum!(
    /// A host's status (oVirt `host_status`).
    ///
    /// The engine moves a host through: `installing` (enrolling) → `initializing` → `up`;
    /// `up` ⇄ `preparing_for_maintenance` → `maintenance` → `up` (activate); `up` →
    /// `non_responsive` (monitoring lost it) → `up` (it answers again); `up` →
    /// `non_operational` (it answers but cannot serve the cluster: storage, CPU) → `up`.
    /// `status_detail` says why for the last two.
    HostStatus, "host status" {
        Connecting = "connecting",
        Down = "down",
        Error = "error",
        Initializing = "initializing",
        InstallFailed = "install_failed",
        Installing = "installing",
        Maintenance = "maintenance",
        NonOperational = "non_operational",
        NonResponsive = "non_responsive",
        PendingApproval = "pending_approval",
        PreparingForMaintenance = "preparing_for_maintenance",
        Reboot = "reboot",
        Unassigned = "unassigned",
        Up = "up",
    }
);

model_enum!(
    /// What a storage domain holds.
    SdType, "storage domain type" {
        Data = "data",
        Iso = "iso",
        Export = "export",
    }
);

model_enum!(
    /// How a file storage domain is reached.
    StorageType, "storage type" {
        Localfs = "localfs",
        Posixfs = "posixfs",
        Nfs = "nfs",
    }
);

model_enum!(
    /// A storage domain's status in a data center (oVirt `storage_domain_status`). A domain in
    /// no data center is `unattached`.
    ///
    /// attach: `unattached` → `locked` → `maintenance` (attached, inactive);
    /// activate: `maintenance`/`inactive` → `activating` → `active`;
    /// deactivate: `active` → `preparing_for_maintenance` → `maintenance`;
    /// detach: `maintenance` → `detaching` → `unattached`; monitoring: `active` ⇄ `inactive`.
    SdStatus, "storage domain status" {
        Activating = "activating",
        Active = "active",
        Detaching = "detaching",
        Inactive = "inactive",
        Locked = "locked",
        Maintenance = "maintenance",
        Mixed = "mixed",
        PreparingForMaintenance = "preparing_for_maintenance",
        Unattached = "unattached",
        Unknown = "unknown",
    }
);

model_enum!(
    /// A disk's or volume's format.
    DiskFormat, "disk format" {
        Raw = "raw",
        Cow = "cow",
    }
);

model_enum!(
    /// What a disk holds (oVirt's `DiskContentType`): guest data, or an ISO image that a VM's
    /// CD-ROM can hold (never attached as a disk).
    DiskContentType, "disk content type" {
        Data = "data",
        Iso = "iso",
    }
);

model_enum!(
    /// A device the firmware boots from (oVirt's `BootDevice`).
    BootDevice, "boot device" {
        Hd = "hd",
        Cdrom = "cdrom",
    }
);

model_enum!(
    /// A disk's status: `locked` while a command works on it, `illegal` when a command failed
    /// in a way that left its volumes unusable.
    DiskStatus, "disk status" {
        Ok = "ok",
        Locked = "locked",
        Illegal = "illegal",
    }
);

model_enum!(
    /// A volume's place in its chain (VDSM's VOLTYPE).
    VolType, "volume type" {
        Leaf = "leaf",
        Internal = "internal",
        Shared = "shared",
    }
);

model_enum!(
    /// A template's status.
    TemplateStatus, "template status" {
        Ok = "ok",
        Locked = "locked",
        Illegal = "illegal",
    }
);

model_enum!(
    /// A VM's status (oVirt `vm_status`).
    ///
    /// Commands move a VM: start `down` → `wait_for_launch` → `powering_up` → `up`; pause
    /// `up` (or `powering_up`, `reboot_in_progress`) → `paused` → (resume) `up`; shutdown `up` → `powering_down` → `down`; stop (any running) → `down`;
    /// migrate `up` → `migrating` → `up` (on the destination); suspend `up` → `saving_state` →
    /// `suspended` → (start) `restoring_state` → `up`; reboot `up` → `reboot_in_progress` →
    /// `up`; disk work on a down VM `down` → `image_locked` → `down`. Monitoring may report
    /// `not_responding` or `unknown` for any running VM (its host is silent).
    VmStatus, "VM status" {
        Down = "down",
        PoweringUp = "powering_up",
        Up = "up",
        Paused = "paused",
        Migrating = "migrating",
        PoweringDown = "powering_down",
        NotResponding = "not_responding",
        Unknown = "unknown",
        ImageLocked = "image_locked",
        Suspended = "suspended",
        SavingState = "saving_state",
        RestoringState = "restoring_state",
        WaitForLaunch = "wait_for_launch",
        RebootInProgress = "reboot_in_progress",
    }
);

impl VmStatus {
    /// Whether a QEMU process may exist for the VM (it has, or may have, a host).
    pub fn is_running(self) -> bool {
        !matches!(self, VmStatus::Down | VmStatus::ImageLocked | VmStatus::Suspended)
    }
}

model_enum!(
    /// What the node does with a VM that storage errors stopped (oVirt's
    /// `storage_error_resume_behaviour`; see the node's `vm::io_errors`).
    #[derive(Default)]
    ResumeBehavior, "resume behaviour" {
        #[default]
        AutoResume = "auto_resume",
        LeavePaused = "leave_paused",
        Kill = "kill",
    }
);

model_enum!(
    /// How a VM may move between hosts.
    PlacementAffinity, "placement affinity" {
        Migratable = "migratable",
        UserMigratable = "user_migratable",
        Pinned = "pinned",
    }
);

model_enum!(
    /// The bus a disk is attached on.
    DiskInterface, "disk interface" {
        Virtio = "virtio",
        VirtioScsi = "virtio_scsi",
        Ide = "ide",
        Sata = "sata",
    }
);

model_enum!(
    /// A NIC's device model.
    NicInterface, "NIC interface" {
        Virtio = "virtio",
        E1000 = "e1000",
        E1000e = "e1000e",
        Rtl8139 = "rtl8139",
    }
);

model_enum!(
    /// `active` is the VM's current state (exactly one per VM); `preview` is the temporary
    /// active state while previewing an older snapshot.
    SnapshotType, "snapshot type" {
        Regular = "regular",
        Active = "active",
        Preview = "preview",
    }
);

model_enum!(
    SnapshotStatus, "snapshot status" {
        Ok = "ok",
        Locked = "locked",
        InPreview = "in_preview",
    }
);

model_enum!(
    /// A job's or step's status.
    JobStatus, "job status" {
        Started = "started",
        Finished = "finished",
        Failed = "failed",
        Aborted = "aborted",
    }
);

model_enum!(
    /// A job step's kind (oVirt `step_enum`).
    StepType, "step type" {
        Validating = "validating",
        Executing = "executing",
        Finalizing = "finalizing",
        CleanUp = "clean_up",
        Unknown = "unknown",
    }
);

model_enum!(
    /// An event's severity, ordered: `severity>normal` in a search means warning and above.
    Severity, "severity" {
        Normal = "normal",
        Warning = "warning",
        Error = "error",
        Alert = "alert",
    }
);

/// A compatibility version (`4.7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

impl Version {
    pub const CURRENT: Version = Version { major: 4, minor: 7 };
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A VM's or template's virtual CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTopology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

impl CpuTopology {
    pub const ONE: CpuTopology = CpuTopology {
        sockets: 1,
        cores: 1,
        threads: 1,
    };
    pub fn vcpus(&self) -> u64 {
        u64::from(self.sockets) * u64::from(self.cores) * u64::from(self.threads)
    }
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCenter {
    pub id: DcId,
    pub name: String,
    pub description: String,
    /// The pool's `spUUID`; oVirt uses the data center's id, and so does [`DataCenter::new`].
    pub storage_pool_id: PoolUuid,
    pub compatibility_version: Version,
    pub local: bool,
    pub status: DcStatus,
    /// The pool metadata's MASTER_VERSION, bumped on every master domain change.
    pub master_version: i64,
    /// The host holding (or contending for) the SPM role, and the SPM lease's version (the
    /// fencing token) once it holds it.
    pub spm_host: Option<HostUuid>,
    pub spm_status: SpmStatus,
    pub spm_lver: Option<i64>,
    pub created_at: Timestamp,
    pub revision: i64,
}

impl DataCenter {
    pub fn new(name: &str) -> Self {
        let id = DcId::new_random();
        DataCenter {
            id,
            name: name.to_string(),
            description: String::new(),
            storage_pool_id: PoolUuid::from_uuid(*id.as_uuid()),
            compatibility_version: Version::CURRENT,
            local: false,
            status: DcStatus::Uninitialized,
            master_version: 0,
            spm_host: None,
            spm_status: SpmStatus::None,
            spm_lver: None,
            created_at: Timestamp::from_millis(0),
            revision: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub id: ClusterId,
    pub name: String,
    pub description: String,
    pub data_center_id: DcId,
    pub cpu_type: String,
    pub cpu_architecture: String,
    pub scheduling_policy: SchedulingPolicy,
    /// How much of a host's memory the scheduler may promise to VMs, in percent (100 = none).
    pub memory_overcommit_percent: u32,
    /// The cluster's own values of its policy's properties, by oVirt's names (validated when
    /// set); the rest keep the policy's defaults.
    pub scheduling_properties: std::collections::BTreeMap<String, String>,
    /// Live migrations of the cluster's VMs are limited to this many Mbps (oVirt's migration
    /// policy bandwidth, `custom`); `None`: no limit (`auto`).
    pub migration_bandwidth_mbps: Option<u32>,
    /// Live migrations of the cluster's VMs go over TLS between the nodes (oVirt's
    /// `migration.encrypted`); off by default.
    pub migration_encrypted: bool,
    pub compatibility_version: Version,
    pub created_at: Timestamp,
    pub revision: i64,
}

impl Cluster {
    pub fn new(name: &str, data_center_id: DcId) -> Self {
        Cluster {
            id: ClusterId::new_random(),
            name: name.to_string(),
            description: String::new(),
            data_center_id,
            cpu_type: "qemu64".into(),
            cpu_architecture: "x86_64".into(),
            scheduling_policy: SchedulingPolicy::None,
            memory_overcommit_percent: 100,
            migration_bandwidth_mbps: None,
            migration_encrypted: false,
            scheduling_properties: Default::default(),
            compatibility_version: Version::CURRENT,
            created_at: Timestamp::from_millis(0),
            revision: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub id: HostUuid,
    pub name: String,
    pub address: String,
    pub port: u16,
    pub cluster_id: ClusterId,
    pub status: HostStatus,
    /// Why the host is `non_operational`, `non_responsive`, `install_failed`…
    pub status_detail: Option<String>,
    /// Derived from its data center: `spm` or `contending` when it holds or seeks the role.
    pub spm_status: SpmStatus,
    /// -1 never SPM, 0..=10 preference (oVirt's default 5).
    pub spm_priority: i32,
    /// SHA-256 of its certificate (DER), hex, as the enrollment issued it.
    pub certificate_fingerprint: Option<String>,
    pub cpu_cores: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub free_memory_bytes: Option<u64>,
    pub last_seen_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub revision: i64,
}

impl Host {
    pub fn new(name: &str, address: &str, port: u16, cluster_id: ClusterId) -> Self {
        Host {
            id: HostUuid::new_random(),
            name: name.to_string(),
            address: address.to_string(),
            port,
            cluster_id,
            status: HostStatus::Installing,
            status_detail: None,
            spm_status: SpmStatus::None,
            spm_priority: 5,
            certificate_fingerprint: None,
            cpu_cores: None,
            memory_bytes: None,
            free_memory_bytes: None,
            last_seen_at: None,
            created_at: Timestamp::from_millis(0),
            revision: 0,
        }
    }
}

/// What monitoring learns about a host's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostStats {
    pub cpu_cores: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub free_memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageDomain {
    pub id: SdUuid,
    pub name: String,
    pub description: String,
    pub domain_type: SdType,
    pub storage_type: StorageType,
    /// The NFS server; `None` for local and POSIX paths.
    pub address: Option<String>,
    pub path: String,
    pub mount_options: Option<String>,
    pub vfs_type: Option<String>,
    /// VDSM domain format version (5).
    pub format_version: u32,
    pub capacity_bytes: Option<u64>,
    pub free_bytes: Option<u64>,
    /// Free space below this percent of the domain raises oVirt's low-space warning (0..=100).
    pub warning_low_space_indicator: u32,
    /// Free space below this many GiB raises oVirt's critical low-space event and refuses
    /// what would consume space there (new disks, snapshots, clones).
    pub critical_space_action_blocker: u32,
    pub created_at: Timestamp,
    pub revision: i64,
}

/// oVirt's defaults (`WarningLowSpaceIndicator`, `CriticalSpaceActionBlocker`).
pub const DEFAULT_WARNING_LOW_SPACE_PERCENT: u32 = 10;
pub const DEFAULT_CRITICAL_SPACE_GB: u32 = 5;

impl StorageDomain {
    pub fn new(name: &str, domain_type: SdType, storage_type: StorageType, path: &str) -> Self {
        StorageDomain {
            id: SdUuid::new_random(),
            name: name.to_string(),
            description: String::new(),
            domain_type,
            storage_type,
            address: None,
            path: path.to_string(),
            mount_options: None,
            vfs_type: None,
            format_version: 5,
            capacity_bytes: None,
            free_bytes: None,
            warning_low_space_indicator: DEFAULT_WARNING_LOW_SPACE_PERCENT,
            critical_space_action_blocker: DEFAULT_CRITICAL_SPACE_GB,
            created_at: Timestamp::from_millis(0),
            revision: 0,
        }
    }

    /// The low-space condition the last monitored space puts the domain in, as oVirt raises
    /// it: critical (fewer free GiB than `critical_space_action_blocker`) wins over the
    /// warning (less free than `warning_low_space_indicator` percent). `None` while the space
    /// is unknown or fine.
    pub fn low_space(&self) -> Option<LowSpace> {
        let (cap, free) = (self.capacity_bytes?, self.free_bytes?);
        if free < u64::from(self.critical_space_action_blocker) * GIB {
            Some(LowSpace::Critical)
        } else if cap > 0 && (free as u128) * 100 < u128::from(self.warning_low_space_indicator) * cap as u128
        {
            Some(LowSpace::Warning)
        } else {
            None
        }
    }
}

/// See [`StorageDomain::low_space`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowSpace {
    Warning,
    Critical,
}

/// A storage domain's membership in a data center's pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMember {
    pub data_center_id: DcId,
    pub storage_domain_id: SdUuid,
    pub status: SdStatus,
    pub master: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub id: DiskId,
    /// The alias users see; not unique.
    pub name: String,
    pub description: String,
    pub format: DiskFormat,
    pub sparse: bool,
    pub provisioned_size: u64,
    pub actual_size: u64,
    pub storage_domain_id: SdUuid,
    pub status: DiskStatus,
    /// Who holds it `locked` (a saga id); set only by `disk_lock`.
    pub locked_by: Option<SagaId>,
    pub shareable: bool,
    pub wipe_after_delete: bool,
    pub content_type: DiskContentType,
    /// The storage QoS it gets through its domain's profile; `None`: unlimited.
    pub disk_profile_id: Option<DiskProfileId>,
    pub created_at: Timestamp,
    pub revision: i64,
}

impl Disk {
    pub fn new(name: &str, storage_domain_id: SdUuid, format: DiskFormat, size: u64) -> Self {
        Disk {
            id: DiskId::new_random(),
            name: name.to_string(),
            description: String::new(),
            format,
            sparse: format == DiskFormat::Cow,
            provisioned_size: size,
            actual_size: 0,
            storage_domain_id,
            status: DiskStatus::Ok,
            locked_by: None,
            shareable: false,
            wipe_after_delete: false,
            content_type: DiskContentType::Data,
            disk_profile_id: None,
            created_at: Timestamp::from_millis(0),
            revision: 0,
        }
    }
}

/// One volume of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: VolUuid,
    pub disk_id: DiskId,
    pub storage_domain_id: SdUuid,
    /// `None` for a base volume.
    pub parent_id: Option<VolUuid>,
    pub voltype: VolType,
    pub format: DiskFormat,
    pub actual_size: u64,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub id: TemplateId,
    pub name: String,
    pub description: String,
    pub cluster_id: Option<ClusterId>,
    pub memory_bytes: u64,
    pub cpu: CpuTopology,
    pub status: TemplateStatus,
    pub created_at: Timestamp,
    pub revision: i64,
}

impl Template {
    pub fn new(name: &str, cluster_id: Option<ClusterId>) -> Self {
        Template {
            id: TemplateId::new_random(),
            name: name.to_string(),
            description: String::new(),
            cluster_id,
            memory_bytes: GIB,
            cpu: CpuTopology::ONE,
            status: TemplateStatus::Ok,
            created_at: Timestamp::from_millis(0),
            revision: 0,
        }
    }
}

/// High availability: restart the VM elsewhere when its host dies (issue 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HighAvailability {
    pub enabled: bool,
    /// Higher restarts first.
    pub priority: i32,
}

/// Where the scheduler may put a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub affinity: PlacementAffinity,
    /// Hosts the VM may run on (empty: any in its cluster). Ids of removed hosts are ignored.
    pub hosts: Vec<HostUuid>,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            affinity: PlacementAffinity::Migratable,
            hosts: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: VmId,
    pub name: String,
    pub description: String,
    pub cluster_id: ClusterId,
    pub template_id: TemplateId,
    pub memory_bytes: u64,
    pub memory_guaranteed_bytes: u64,
    pub cpu: CpuTopology,
    pub ha: HighAvailability,
    /// The domain holding the VM's lease (HA VMs).
    pub lease_storage_domain_id: Option<SdUuid>,
    /// As asked; what applies is [`Vm::effective_resume_behavior`].
    pub resume_behavior: ResumeBehavior,
    pub placement: Placement,
    /// Boot settings beyond the disks.
    pub os: VmOs,
    /// The ISO disk in the CD-ROM at the next start (oVirt's `<cdroms><cdrom><file id>`).
    pub cdrom: Option<DiskId>,
    /// The ISO disk in the running VM's CD-ROM; changed only with
    /// [`crate::db::Db::vm_set_run_cdrom`], never by status changes.
    pub run_cdrom: Option<DiskId>,
    pub runtime: VmRuntime,
    pub created_at: Timestamp,
    pub revision: i64,
}

impl Vm {
    pub fn new(name: &str, cluster_id: ClusterId) -> Self {
        Vm {
            id: VmId::new_random(),
            name: name.to_string(),
            description: String::new(),
            cluster_id,
            template_id: BLANK_TEMPLATE_ID,
            memory_bytes: GIB,
            memory_guaranteed_bytes: GIB,
            cpu: CpuTopology::ONE,
            ha: HighAvailability::default(),
            lease_storage_domain_id: None,
            resume_behavior: ResumeBehavior::AutoResume,
            placement: Placement::default(),
            os: VmOs::default(),
            cdrom: None,
            run_cdrom: None,
            runtime: VmRuntime::default(),
            created_at: Timestamp::from_millis(0),
            revision: 0,
        }
    }

    /// The resume behaviour that applies: `kill` for a highly available VM — it holds a VM
    /// lease, which a paused QEMU would keep from the restart elsewhere (oVirt allows only
    /// `kill` for HA VMs with a lease, and every oxvirt HA VM has one) — else the one asked.
    pub fn effective_resume_behavior(&self) -> ResumeBehavior {
        if self.ha.enabled {
            ResumeBehavior::Kill
        } else {
            self.resume_behavior
        }
    }
}

/// How the VM boots (oVirt's `<os>`). With a kernel (paths on the host, as oVirt's
/// `<kernel/><initrd/><cmdline/>`) it boots that directly; without, the firmware boots the
/// devices in `boot_devices` in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmOs {
    /// oVirt's OS type (`other`, `rhel_9x64`, `windows_2022`, …): a `windows` one gets its
    /// CD-ROM on SATA, which its installer can read without virtio drivers.
    pub os_type: String,
    pub boot_devices: Vec<BootDevice>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

impl Default for VmOs {
    fn default() -> Self {
        VmOs {
            os_type: "other".into(),
            boot_devices: vec![BootDevice::Hd],
            kernel: None,
            initrd: None,
            cmdline: None,
        }
    }
}

impl VmOs {
    pub fn is_windows(&self) -> bool {
        self.os_type.starts_with("windows")
    }
}

/// A VM's run-time state, changed by compare-and-set on `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRuntime {
    pub status: VmStatus,
    pub status_detail: Option<String>,
    pub run_on_host: Option<HostUuid>,
    /// The destination while `migrating`.
    pub migrating_to_host: Option<HostUuid>,
}

impl Default for VmRuntime {
    fn default() -> Self {
        VmRuntime {
            status: VmStatus::Down,
            status_detail: None,
            run_on_host: None,
            migrating_to_host: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAttachment {
    pub vm_id: VmId,
    pub disk_id: DiskId,
    pub interface: DiskInterface,
    pub bootable: bool,
    pub active: bool,
    pub read_only: bool,
}

/// A MAC address (`56:6f:1a:2b:3c:4d`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// oVirt's default MAC pool prefix.
    pub const POOL_PREFIX: [u8; 2] = [0x56, 0x6f];
}

impl FromStr for MacAddr {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, UnknownValue> {
        let err = || UnknownValue {
            kind: "MAC address",
            value: s.chars().take(64).collect(),
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = UnknownValue;
    fn try_from(s: String) -> Result<Self, UnknownValue> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub id: NicId,
    pub vm_id: VmId,
    pub name: String,
    /// The logical network's name; `None` is an empty profile (unplugged cable).
    pub network: Option<String>,
    pub mac: MacAddr,
    pub interface: NicInterface,
    pub plugged: bool,
    pub linked: bool,
}

/// A template's NIC: what every VM made from the template gets, with a MAC of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateNic {
    pub id: NicId,
    pub template_id: TemplateId,
    pub name: String,
    pub network: Option<String>,
    pub interface: NicInterface,
    pub linked: bool,
}

/// Which volume a disk had when a snapshot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDisk {
    pub disk_id: DiskId,
    pub volume_id: VolUuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub vm_id: VmId,
    pub description: String,
    pub snapshot_type: SnapshotType,
    pub status: SnapshotStatus,
    pub persist_memory: bool,
    /// The VM's configuration when taken, brought back by a restore or preview (`None` for
    /// snapshots taken before snapshots kept it, and for the active one).
    pub configuration: Option<VmConfiguration>,
    pub disks: Vec<SnapshotDisk>,
    pub created_at: Timestamp,
}

impl Snapshot {
    /// A snapshot being made of a VM whose configuration is `configuration`: locked, without
    /// memory; the database stamps its creation time.
    pub fn locked(
        id: SnapshotId,
        vm_id: VmId,
        description: impl Into<String>,
        snapshot_type: SnapshotType,
        disks: Vec<SnapshotDisk>,
        configuration: VmConfiguration,
    ) -> Snapshot {
        Snapshot {
            id,
            vm_id,
            description: description.into(),
            snapshot_type,
            status: SnapshotStatus::Locked,
            persist_memory: false,
            configuration: Some(configuration),
            disks,
            created_at: Timestamp::from_millis(0),
        }
    }
}

/// What a snapshot keeps of its VM's configuration and a restore or preview brings back, as
/// oVirt keeps a VM's OVF with each snapshot: the virtual hardware and how it boots. The VM's
/// identity, cluster, placement, high availability and NICs stay as they are; the disks come
/// back through the snapshot's volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfiguration {
    pub memory_bytes: u64,
    pub memory_guaranteed_bytes: u64,
    pub cpu: CpuTopology,
    pub os: VmOs,
    /// The ISO in the CD-ROM at the next start.
    #[serde(default)]
    pub cdrom: Option<DiskId>,
}

impl Vm {
    /// The part of this VM's configuration a snapshot keeps.
    pub fn configuration(&self) -> VmConfiguration {
        VmConfiguration {
            memory_bytes: self.memory_bytes,
            memory_guaranteed_bytes: self.memory_guaranteed_bytes,
            cpu: self.cpu,
            os: self.os.clone(),
            cdrom: self.cdrom,
        }
    }

    /// This VM with `c` as its configuration.
    pub fn with_configuration(mut self, c: &VmConfiguration) -> Vm {
        self.memory_bytes = c.memory_bytes;
        self.memory_guaranteed_bytes = c.memory_guaranteed_bytes;
        self.cpu = c.cpu;
        self.os = c.os.clone();
        self.cdrom = c.cdrom;
        self
    }
}

/// The volume holding a suspended VM's saved state (memory and devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateVolume {
    pub sd: SdUuid,
    pub img: ImgUuid,
    pub vol: VolUuid,
}

/// The state a snapshot saved of its running VM, and the VM's size then (a state restores
/// only into a VM of the same memory and CPUs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMemory {
    pub state: StateVolume,
    pub memory_bytes: u64,
    pub cpus: u32,
}

/// One of a data domain's OVF stores (oVirt's OVF_STORE disks): a raw volume holding a tar of
/// the OVFs of the VMs and templates with disks on the domain. Not a disk of the model: no VM
/// uses it and the disk lists do not show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OvfStore {
    pub disk_id: DiskId,
    pub storage_domain_id: SdUuid,
    pub volume_id: VolUuid,
    /// Made on storage (a store is recorded before it is created, so a crash between the two
    /// leaves a row to finish, never a volume nothing knows).
    pub ready: bool,
    /// The last complete write.
    pub updated_at: Option<Timestamp>,
    /// What was last written: a JSON map of entity id to the SHA-256 of its OVF. An unchanged
    /// domain is not rewritten, and detach checks the entities leaving with the domain here.
    pub entity_hashes: Option<String>,
}

model_enum!(
    /// What an OVF describes.
    OvfEntityType, "OVF entity type" {
        Vm = "vm",
        Template = "template",
    }
);

/// A VM or template an attached domain's OVF stores describe that the engine has no record of
/// (an imported domain's): offered for registration, and kept in the domain's stores until
/// registered or removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnregisteredOvf {
    pub entity_id: uuid::Uuid,
    pub storage_domain_id: SdUuid,
    pub entity_type: OvfEntityType,
    pub name: String,
    pub ovf: String,
    /// oVirt's `VMStatus` number from the store's `metadata.json` (VMs that were running).
    pub vm_status: Option<i32>,
}

/// A data center's storage QoS (oVirt's `<qos type="storage">`): limits in MB/s and IOPS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qos {
    pub id: QosId,
    pub data_center_id: DcId,
    pub name: String,
    pub description: String,
    pub limits: IoLimits,
}

/// Storage limits; `None` (or 0) is unlimited. A total excludes its read and write parts, as
/// in oVirt and QEMU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimits {
    /// MB/s (MiB/s, as oVirt counts them).
    pub max_throughput: Option<u64>,
    pub max_read_throughput: Option<u64>,
    pub max_write_throughput: Option<u64>,
    pub max_iops: Option<u64>,
    pub max_read_iops: Option<u64>,
    pub max_write_iops: Option<u64>,
}

impl IoLimits {
    /// Why these limits cannot be, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        let set = |v: Option<u64>| v.is_some_and(|v| v > 0);
        if set(self.max_throughput) && (set(self.max_read_throughput) || set(self.max_write_throughput)) {
            return Err("a total throughput excludes read and write throughputs".into());
        }
        if set(self.max_iops) && (set(self.max_read_iops) || set(self.max_write_iops)) {
            return Err("total IOPS exclude read and write IOPS".into());
        }
        let big = [
            self.max_throughput,
            self.max_read_throughput,
            self.max_write_throughput,
        ]
        .into_iter()
        .flatten()
        .any(|v| v > 1 << 20);
        if big {
            return Err("a throughput limit is at most 1048576 MB/s".into());
        }
        Ok(())
    }

    /// VDSM's `ioTune` (bytes and operations per second; 0: unlimited).
    pub fn io_tune(&self) -> serde_json::Value {
        let mb = |v: Option<u64>| v.unwrap_or(0) * MIB;
        let n = |v: Option<u64>| v.unwrap_or(0);
        serde_json::json!({
            "total_bytes_sec": mb(self.max_throughput),
            "read_bytes_sec": mb(self.max_read_throughput),
            "write_bytes_sec": mb(self.max_write_throughput),
            "total_iops_sec": n(self.max_iops),
            "read_iops_sec": n(self.max_read_iops),
            "write_iops_sec": n(self.max_write_iops),
        })
    }
}

/// A storage domain's disk profile: the QoS its disks get (oVirt's `<disk_profile>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskProfile {
    pub id: DiskProfileId,
    pub name: String,
    pub description: String,
    pub storage_domain_id: SdUuid,
    pub qos_id: Option<QosId>,
}

/// A tag: a label in a tree under oVirt's root tag, put on VMs, hosts and templates (and
/// searched for with `tag=`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    pub id: TagId,
    pub name: String,
    pub description: String,
    /// `None`: directly under the root tag.
    pub parent: Option<TagId>,
    pub created_at: Timestamp,
}

/// oVirt's root tag: every tag descends from it; it is never stored, changed or removed.
pub const ROOT_TAG_ID: TagId = TagId::nil();
pub const ROOT_TAG_NAME: &str = "root";

/// What a tag is put on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TagTarget {
    Vm(VmId),
    Host(HostUuid),
    Template(TemplateId),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityGroup {
    pub id: AffinityGroupId,
    pub cluster_id: ClusterId,
    pub name: String,
    pub description: String,
    /// Whether the VM rule applies (oVirt's `vms_rule.enabled`): a disabled group keeps its
    /// members but the scheduler ignores it.
    pub enabled: bool,
    /// `true`: keep the VMs together; `false`: keep them apart.
    pub positive: bool,
    /// `true`: a hard rule (filter); `false`: a preference (weight).
    pub enforcing: bool,
    pub vm_ids: Vec<VmId>,
    pub created_at: Timestamp,
}

model_enum!(
    /// Which way an image transfer moves a disk's data.
    TransferDirection, "image transfer direction" {
        Upload = "upload",
        Download = "download",
    }
);

model_enum!(
    /// An image transfer's phase, with oVirt's names:
    ///
    /// ```text
    ///  initializing ─► transferring ─(finalize)─► finalizing_success ─► finished_success
    ///       │               │  (cancel) cancelled_user ─┐
    ///       │               │  (idle)  cancelled_system ┤
    ///       └───────────────┴── (failure) ──────────────┴► finalizing_failure ─► finished_failure
    /// ```
    ///
    /// The transfer's saga moves it; the finalize and cancel actions only ask (a
    /// compare-and-set from `transferring`), and the saga answers.
    TransferPhase, "image transfer phase" {
        Initializing = "initializing",
        Transferring = "transferring",
        FinalizingSuccess = "finalizing_success",
        FinalizingFailure = "finalizing_failure",
        FinishedSuccess = "finished_success",
        FinishedFailure = "finished_failure",
        CancelledUser = "cancelled_user",
        CancelledSystem = "cancelled_system",
    }
);

impl TransferPhase {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TransferPhase::FinishedSuccess | TransferPhase::FinishedFailure
        )
    }
}

/// An upload or download of a disk's guest data through a host (oVirt's image transfer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageTransfer {
    /// Also the ticket's id on the host and the last segment of `transfer_url`.
    pub id: TransferId,
    pub disk_id: DiskId,
    pub host_id: HostUuid,
    pub direction: TransferDirection,
    /// `raw`: guest data, whatever the disk's format (the only kind served).
    pub format: DiskFormat,
    pub phase: TransferPhase,
    /// `https://<host>:<port>/images/<id>`, once the host serves it.
    pub transfer_url: Option<String>,
    /// Seconds without a request after which the transfer is cancelled.
    pub inactivity_timeout: u64,
    /// Bytes read, written or zeroed so far, as the host counts them.
    pub transferred: u64,
    /// Whether a request was in flight at the last look.
    pub active: bool,
    pub message: Option<String>,
    pub saga_id: Option<SagaId>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub description: String,
    pub status: JobStatus,
    pub correlation_id: Option<String>,
    /// The saga that drives the job, if any.
    pub saga_id: Option<SagaId>,
    pub auto_cleared: bool,
    pub started_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    pub last_updated: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStep {
    pub id: StepId,
    pub job_id: JobId,
    pub parent_id: Option<StepId>,
    /// 1-based order within the job.
    pub number: u32,
    pub step_type: StepType,
    pub description: String,
    pub status: JobStatus,
    pub started_at: Timestamp,
    pub ended_at: Option<Timestamp>,
}

/// An audit log entry. `id` increases with every event (the REST `from=` cursor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: i64,
    pub severity: Severity,
    /// oVirt's AuditLogType code where one exists.
    pub code: i32,
    pub description: String,
    pub correlation_id: Option<String>,
    pub vm_id: Option<VmId>,
    pub host_id: Option<HostUuid>,
    pub storage_domain_id: Option<SdUuid>,
    pub data_center_id: Option<DcId>,
    pub cluster_id: Option<ClusterId>,
    pub template_id: Option<TemplateId>,
    /// An external event's sender and its id there (oVirt's `origin`, `custom_id`).
    pub origin: Option<String>,
    pub custom_id: Option<i64>,
    pub time: Timestamp,
}

/// An event to record; the database assigns its id and time.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NewEvent {
    pub severity: Option<Severity>,
    pub code: i32,
    pub description: String,
    pub correlation_id: Option<String>,
    pub vm_id: Option<VmId>,
    pub host_id: Option<HostUuid>,
    pub storage_domain_id: Option<SdUuid>,
    pub data_center_id: Option<DcId>,
    pub cluster_id: Option<ClusterId>,
    pub template_id: Option<TemplateId>,
    /// An external event's sender and its id there; unique together.
    pub origin: Option<String>,
    pub custom_id: Option<i64>,
}

impl NewEvent {
    pub fn new(severity: Severity, code: i32, description: impl Into<String>) -> Self {
        NewEvent {
            severity: Some(severity),
            code,
            description: description.into(),
            ..Default::default()
        }
    }
}

/// An engine user. The password hash never leaves the database layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    pub name: String,
    /// `internal` for the engine's own users.
    pub domain: String,
    pub email: Option<String>,
    pub admin: bool,
    pub created_at: Timestamp,
}

impl User {
    /// `name@domain`, as users log in.
    pub fn principal(&self) -> String {
        format!("{}@{}", self.name, self.domain)
    }
}

/// A size for people: `1.5 GiB`, `48 MiB`, `512 B`.
pub fn bytes(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else if v >= 100.0 || v.fract() < 0.05 {
        format!("{v:.0} {}", U[i])
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_their_names() {
        for s in VmStatus::ALL {
            assert_eq!(s.as_str().parse::<VmStatus>().unwrap(), *s);
        }
        assert_eq!(VmStatus::ALL.len(), 14);
        assert_eq!(
            serde_json::to_string(&HostStatus::NonResponsive).unwrap(),
            "\"non_responsive\""
        );
        let e = "Up".parse::<VmStatus>().unwrap_err();
        assert_eq!(e.kind, "VM status");
        assert!(Severity::Warning > Severity::Normal && Severity::Alert > Severity::Error);
    }

    #[test]
    fn mac_addresses_parse_strictly() {
        let m: MacAddr = "56:6F:00:0a:ff:01".parse().unwrap();
        assert_eq!(m.to_string(), "56:6f:00:0a:ff:01");
        for bad in [
            "",
            "56:6f:00:0a:ff",
            "56:6f:00:0a:ff:01:02",
            "566f000aff01",
            "5:6f:00:0a:ff:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
