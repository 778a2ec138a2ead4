//! The node API's shared vocabulary: error codes, host capabilities and statistics, events.
//!
//! Verb names follow VDSM's (`Host.getCapabilities`, `StoragePool.spmStart`, `VM.migrate`…).
//! Parameters are named (a JSON object), with VDSM's camelCase keys.

use serde::{Deserialize, Serialize};

/// Stable error codes of the node API. Where VDSM has a code for the same condition we use its
/// number (`vdsm/common/define.py`, `storage/exception.py`), so scripts written for VDSM keep
/// working; oxvirt-only conditions use 2000+.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    NoVm,
    VmExists,
    MissingParam,
    MigrationError,
    Unexpected,
    NotSpm,
    StorageDomainNotFound,
    VolumeNotFound,
    ImageNotFound,
    TaskNotFound,
    VolumeLocked,
    InvalidParameter,
    NotConnected,
    Busy,
    SpmBusy,
    LeaseError,
    StorageError,
    /// Invalid network configuration (VDSM's ERR_BAD_PARAMS).
    BadNetworkParams,
    /// A bond the kernel cannot make (VDSM's ERR_BAD_BONDING).
    BadBonding,
    /// A VLAN the kernel cannot make (VDSM's ERR_BAD_VLAN).
    BadVlan,
    /// A network or bridge missing from the host (VDSM's ERR_BAD_BRIDGE).
    BadBridge,
    /// A bridge VMs still use (VDSM's ERR_USED_BRIDGE).
    UsedBridge,
    /// A network change failed while applied (VDSM's ERR_FAILED_IFUP).
    NetworkSetupFailed,
    /// An image ticket or NBD server that is missing, busy or refused (VDSM's ImageTicketsError).
    ImageTransfer,
}

impl ErrorCode {
    pub const fn code(self) -> i64 {
        match self {
            Self::NoVm => 1,
            Self::VmExists => 4,
            Self::MissingParam => 11,
            Self::MigrationError => 12,
            Self::Unexpected => 16,
            Self::VolumeNotFound => 201,
            Self::ImageNotFound => 268,
            Self::StorageDomainNotFound => 358,
            Self::TaskNotFound => 401,
            Self::NotSpm => 654,
            Self::InvalidParameter => 1000,
            Self::NotConnected => 2001,
            Self::Busy => 2002,
            Self::SpmBusy => 2003,
            Self::VolumeLocked => 2004,
            Self::LeaseError => 2005,
            Self::StorageError => 2006,
            Self::BadNetworkParams => 21,
            Self::BadBonding => 25,
            Self::BadVlan => 26,
            Self::BadBridge => 27,
            Self::UsedBridge => 28,
            Self::NetworkSetupFailed => 29,
            Self::ImageTransfer => 482,
        }
    }
}

/// What `Host.getCapabilities` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostCapabilities {
    pub hostname: String,
    pub kernel_release: String,
    pub cpu_model: String,
    pub cpu_flags: Vec<String>,
    pub cpu_cores: u32,
    pub cpu_sockets: u32,
    pub mem_total_mib: u64,
    pub kvm_enabled: bool,
    /// Why KVM cannot be used, when it cannot.
    pub kvm_reason: Option<String>,
    pub qemu_version: Option<String>,
    pub qemu_img_version: Option<String>,
    pub oxvirt_version: String,
    /// Storage domains this node is connected to and whether it reaches them.
    pub storage: Vec<StorageConnectivity>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageConnectivity {
    pub sd_uuid: String,
    pub path: String,
    pub reachable: bool,
}

/// What `Host.getStats` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostStats {
    /// Share of all CPUs busy since the previous sample, 0..=100.
    pub cpu_used_pct: f64,
    pub cpu_user_pct: f64,
    pub cpu_sys_pct: f64,
    pub load_avg_1: f64,
    /// Over five minutes (0 from a node that did not report it).
    #[serde(default)]
    pub load_avg_5: f64,
    pub mem_total_mib: u64,
    pub mem_available_mib: u64,
    pub mem_used_pct: f64,
    pub swap_total_mib: u64,
    pub swap_free_mib: u64,
    pub ksm_running: bool,
    pub uptime_secs: u64,
    pub vm_count: u32,
    pub network: Vec<NicStats>,
    /// Seconds since the Unix epoch when sampled.
    pub sampled_at: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NicStats {
    pub name: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_bytes_per_sec: f64,
    pub tx_bytes_per_sec: f64,
    pub rx_errors: u64,
    pub tx_errors: u64,
}

/// An event on the node's stream. `seq` grows by one per event for the node process's life, so
/// a subscriber that sees a gap knows it missed events and polls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub seq: u64,
    /// Node process start time (Unix seconds): a new value means the node restarted.
    pub boot_id: String,
    /// VDSM-style topic, e.g. `|virt|VM_status|<vmId>`, `|storage|domain_monitor|<sdUUID>`.
    pub topic: String,
    pub body: serde_json::Value,
}

/// Path of the engine's enrollment endpoint.
pub const ENROLL_PATH: &str = "/ovirt-engine/services/host-enroll";
/// Path where the engine serves its CA certificate (as oVirt does).
pub const CA_PATH: &str = "/ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA";

/// A node asking the engine for a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    /// One-time token from the admin; without one the request waits for the admin's approval.
    pub token: Option<String>,
    /// PEM certificate signing request.
    pub csr: String,
    /// The host's name.
    pub name: String,
    /// Where the node's API listens (`ip:port`).
    pub address: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnrollStatus {
    Approved,
    Pending,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollReply {
    pub status: EnrollStatus,
    /// The signed certificate, once approved.
    pub certificate: Option<String>,
    /// The engine's CA certificate.
    pub ca: String,
}
