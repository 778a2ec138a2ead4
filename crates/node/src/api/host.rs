//! `Host.*` verbs.

use serde_json::{Map, Value};

use oxvirt_rpc::RpcError;

use super::no_params;

#[derive(Debug, Clone, PartialEq)]
pub enum HostRequest {
    Ping,
    GetCapabilities,
    GetStats,
    GetAllVmStats,
    GetJobs,
}

pub const VERBS: &[&str] = &[
    "Host.ping",
    "Host.getCapabilities",
    "Host.getStats",
    "Host.getAllVmStats",
    "Host.getJobs",
];

impl HostRequest {
    pub fn parse(method: &str, p: Map<String, Value>) -> Result<HostRequest, RpcError> {
        let req = match method {
            "Host.ping" => HostRequest::Ping,
            "Host.getCapabilities" => HostRequest::GetCapabilities,
            "Host.getStats" => HostRequest::GetStats,
            "Host.getAllVmStats" => HostRequest::GetAllVmStats,
            "Host.getJobs" => HostRequest::GetJobs,
            other => return Err(RpcError::method_not_found(other)),
        };
        no_params(method, &p)?;
        Ok(req)
    }
}
