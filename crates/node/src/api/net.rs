//! Network verbs: `Host.setupNetworks`, `Host.setSafeNetworkConfig` (and VDSM's
//! `Host.confirmConnectivity`), `Host.getNetworkStats`, and the VM NIC verbs `VM.hotplugNic`,
//! `VM.hotunplugNic`, `VM.setLinkState`, `VM.updateDevice` (interfaces: link state).
//!
//! `setupNetworks` returns once the change is applied; with the connectivity check (default)
//! the engine must then call `Host.setSafeNetworkConfig` within `connectivityTimeout` seconds
//! or the node restores the previous configuration by itself and publishes `|net|rollback|`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use oxvirt_rpc::RpcError;
use oxvirt_types::api::ErrorCode;
use oxvirt_types::VmId;

use super::storage::error_chain;
use super::vm::NicParams;
use super::{no_params, params, ApiError};
use crate::net::model::SetupNetworks;
use crate::net::NetError;
use crate::service::Node;

pub const VERBS: &[&str] = &[
    "Host.setupNetworks",
    "Host.setSafeNetworkConfig",
    "Host.confirmConnectivity",
    "Host.getNetworkStats",
    "VM.hotplugNic",
    "VM.hotunplugNic",
    "VM.setLinkState",
    "VM.updateDevice",
];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HotplugNic {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub nic: NicParams,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HotunplugNic {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub mac: String,
    /// Seconds the guest has to release the device.
    #[serde(default = "unplug_timeout")]
    pub timeout: u64,
}

fn unplug_timeout() -> u64 {
    crate::vm::nics::UNPLUG_TIMEOUT.as_secs()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LinkState {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub mac: String,
    pub link_active: bool,
}

/// VDSM's `VM.updateDevice` for an interface: `{deviceType: "interface", macAddr, linkActive}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateDevice {
    #[serde(rename = "vmID")]
    pub id: VmId,
    pub params: UpdateDeviceParams,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateDeviceParams {
    pub device_type: String,
    pub mac_addr: String,
    pub link_active: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NetRequest {
    SetupNetworks(SetupNetworks),
    /// `setSafeNetworkConfig` and `confirmConnectivity`.
    Confirm,
    GetNetworkStats,
    HotplugNic(HotplugNic),
    HotunplugNic(HotunplugNic),
    SetLinkState(LinkState),
}

impl NetRequest {
    pub fn parse(method: &str, p: Map<String, Value>) -> Result<NetRequest, RpcError> {
        Ok(match method {
            "Host.setupNetworks" => NetRequest::SetupNetworks(params(method, p)?),
            "Host.setSafeNetworkConfig" | "Host.confirmConnectivity" => {
                no_params(method, &p)?;
                NetRequest::Confirm
            }
            "Host.getNetworkStats" => {
                no_params(method, &p)?;
                NetRequest::GetNetworkStats
            }
            "VM.hotplugNic" => NetRequest::HotplugNic(params(method, p)?),
            "VM.hotunplugNic" => NetRequest::HotunplugNic(params(method, p)?),
            "VM.setLinkState" => NetRequest::SetLinkState(params(method, p)?),
            "VM.updateDevice" => {
                let u: UpdateDevice = params(method, p)?;
                if u.params.device_type != "interface" {
                    return Err(RpcError::invalid_params(format!(
                        "VM.updateDevice: deviceType {:?}: only \"interface\" (link state) is updated here",
                        u.params.device_type
                    )));
                }
                NetRequest::SetLinkState(LinkState {
                    id: u.id,
                    mac: u.params.mac_addr,
                    link_active: u.params.link_active,
                })
            }
            other => return Err(RpcError::method_not_found(other)),
        })
    }
}

impl From<NetError> for ApiError {
    fn from(e: NetError) -> ApiError {
        let code = match &e {
            NetError::Invalid(_) => ErrorCode::BadNetworkParams,
            NetError::KernelFeature { feature, .. } => match feature {
                crate::net::model::KernelFeature::Vlan => ErrorCode::BadVlan,
                crate::net::model::KernelFeature::Bonding => ErrorCode::BadBonding,
            },
            NetError::Pending { .. } => ErrorCode::Busy,
            NetError::InUse { .. } => ErrorCode::UsedBridge,
            NetError::NoNetwork(_) | NetError::NotVmNetwork(_) | NetError::BridgeMissing { .. } => {
                ErrorCode::BadBridge
            }
            NetError::Apply { .. } | NetError::Rtnl(_) | NetError::Tap { .. } => {
                ErrorCode::NetworkSetupFailed
            }
            NetError::Namespace { .. } | NetError::State { .. } => ErrorCode::Unexpected,
        };
        ApiError::new(code, error_chain(&e))
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("API types serialize")
}

pub async fn execute(node: &Node, req: NetRequest) -> Result<Value, ApiError> {
    let net = &node.net;
    Ok(match req {
        NetRequest::SetupNetworks(r) => to_json(&net.setup_networks(r).await?),
        NetRequest::Confirm => json!({ "confirmed": net.confirm().await? }),
        NetRequest::GetNetworkStats => to_json(&net.stats().await?),
        NetRequest::HotplugNic(h) => {
            let spec = h.nic.to_spec()?;
            to_json(&node.vms.hotplug_nic(h.id, spec).await?)
        }
        NetRequest::HotunplugNic(h) => to_json(
            &node
                .vms
                .hotunplug_nic(h.id, &h.mac, Duration::from_secs(h.timeout))
                .await?,
        ),
        NetRequest::SetLinkState(l) => to_json(&node.vms.set_nic_link(l.id, &l.mac, l.link_active).await?),
    })
}
