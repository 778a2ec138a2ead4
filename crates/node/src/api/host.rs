//! `Host.*` verbs.

use serde::Deserialize;
use serde_json::{Map, Value};

use oxvirt_rpc::RpcError;
use oxvirt_types::api::ErrorCode;

use super::{no_params, params, ApiError};
use crate::vm::ksm::{KsmError, KsmRun, KsmTune};

#[derive(Debug, Clone, PartialEq)]
pub enum HostRequest {
    Ping,
    GetCapabilities,
    GetStats,
    /// `monitorTimeout` (seconds, optional): how long each VM's QEMU may take to answer
    /// before it is reported not responding; the engine asks for less than its own poll limit.
    GetAllVmStats {
        monitor_timeout: Option<std::time::Duration>,
    },
    GetJobs,
    /// The domain monitor's last check of each pool domain (VDSM's `repoStats`).
    GetStorageRepoStats,
    /// MoM's KSM control, VDSM's `setKsmTune`: run/stop/unmerge and the scan rate.
    SetKsmTune(KsmTune),
}

pub const VERBS: &[&str] = &[
    "Host.ping",
    "Host.getCapabilities",
    "Host.getStats",
    "Host.getAllVmStats",
    "Host.getJobs",
    "Host.getStorageRepoStats",
    "Host.setKsmTune",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AllVmStatsParams {
    #[serde(default)]
    monitor_timeout: Option<f64>,
}

/// `Host.setKsmTune` parameters, with the keys and integer values VDSM's `ksmTune` takes
/// (`run`: 0 stop, 1 run, 2 unmerge; `merge_across_nodes`: 0 or 1).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SetKsmTuneParams {
    tuning_params: TuningParams,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TuningParams {
    #[serde(default)]
    run: Option<u64>,
    #[serde(default)]
    pages_to_scan: Option<u64>,
    #[serde(default)]
    sleep_millisecs: Option<u64>,
    #[serde(default)]
    merge_across_nodes: Option<u64>,
}

impl TuningParams {
    fn into_tune(self) -> Result<KsmTune, RpcError> {
        let run = match self.run {
            None => None,
            Some(0) => Some(KsmRun::Stop),
            Some(1) => Some(KsmRun::Run),
            Some(2) => Some(KsmRun::Unmerge),
            Some(v) => {
                return Err(RpcError::invalid_params(format!(
                    "Host.setKsmTune: run must be 0 (stop), 1 (run) or 2 (unmerge), got {v}"
                )))
            }
        };
        let merge_across_nodes = match self.merge_across_nodes {
            None => None,
            Some(v @ (0 | 1)) => Some(v == 1),
            Some(v) => {
                return Err(RpcError::invalid_params(format!(
                    "Host.setKsmTune: merge_across_nodes must be 0 or 1, got {v}"
                )))
            }
        };
        let tune = KsmTune {
            run,
            pages_to_scan: self.pages_to_scan,
            sleep_millisecs: self.sleep_millisecs,
            merge_across_nodes,
        };
        if tune == KsmTune::default() {
            return Err(RpcError::invalid_params(
                "Host.setKsmTune: tuningParams names no setting (run, pages_to_scan, sleep_millisecs, merge_across_nodes)",
            ));
        }
        Ok(tune)
    }
}

impl HostRequest {
    pub fn parse(method: &str, p: Map<String, Value>) -> Result<HostRequest, RpcError> {
        let req = match method {
            "Host.ping" => HostRequest::Ping,
            "Host.getCapabilities" => HostRequest::GetCapabilities,
            "Host.getStats" => HostRequest::GetStats,
            "Host.getAllVmStats" => {
                let t: AllVmStatsParams = params(method, p)?;
                let monitor_timeout = match t.monitor_timeout {
                    None => None,
                    Some(s) if s.is_finite() && s > 0.0 && s <= 60.0 => {
                        Some(std::time::Duration::from_secs_f64(s))
                    }
                    Some(s) => {
                        return Err(RpcError::invalid_params(format!(
                            "Host.getAllVmStats: monitorTimeout {s} must be in (0, 60] seconds"
                        )))
                    }
                };
                return Ok(HostRequest::GetAllVmStats { monitor_timeout });
            }
            "Host.getJobs" => HostRequest::GetJobs,
            "Host.getStorageRepoStats" => HostRequest::GetStorageRepoStats,
            "Host.setKsmTune" => {
                let t: SetKsmTuneParams = params(method, p)?;
                return Ok(HostRequest::SetKsmTune(t.tuning_params.into_tune()?));
            }
            other => return Err(RpcError::method_not_found(other)),
        };
        no_params(method, &p)?;
        Ok(req)
    }
}

impl From<KsmError> for ApiError {
    fn from(e: KsmError) -> ApiError {
        let code = match &e {
            KsmError::OutOfRange { .. } => ErrorCode::InvalidParameter,
            _ => ErrorCode::Unexpected,
        };
        ApiError::new(code, super::storage::error_chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<HostRequest, RpcError> {
        HostRequest::parse("Host.setKsmTune", v.as_object().unwrap().clone())
    }

    #[test]
    fn all_vm_stats_takes_an_optional_monitor_timeout() {
        let all = |v: Value| HostRequest::parse("Host.getAllVmStats", v.as_object().unwrap().clone());
        assert_eq!(
            all(serde_json::json!({})).unwrap(),
            HostRequest::GetAllVmStats {
                monitor_timeout: None
            }
        );
        assert_eq!(
            all(serde_json::json!({"monitorTimeout": 1.5})).unwrap(),
            HostRequest::GetAllVmStats {
                monitor_timeout: Some(std::time::Duration::from_millis(1500))
            }
        );
        for bad in [
            serde_json::json!({"monitorTimeout": 0}),
            serde_json::json!({"monitorTimeout": -1}),
            serde_json::json!({"monitorTimeout": 61}),
            serde_json::json!({"monitorTimeout": "5"}),
            serde_json::json!({"timeout": 5}),
        ] {
            let e = all(bad.clone()).unwrap_err();
            assert_eq!(e.code, oxvirt_rpc::jsonrpc::INVALID_PARAMS, "{bad}: {e:?}");
        }
    }

    #[test]
    fn ksm_tuning_takes_vdsm_keys_and_refuses_bad_values() {
        let r = parse(serde_json::json!({"tuningParams": {"run": 1, "pages_to_scan": 64}})).unwrap();
        assert_eq!(
            r,
            HostRequest::SetKsmTune(KsmTune {
                run: Some(KsmRun::Run),
                pages_to_scan: Some(64),
                ..Default::default()
            })
        );
        for bad in [
            serde_json::json!({"tuningParams": {"run": 3}}),
            serde_json::json!({"tuningParams": {"merge_across_nodes": 2}}),
            serde_json::json!({"tuningParams": {}}),
            serde_json::json!({"tuningParams": {"npages": 5}}),
            serde_json::json!({"run": 1}),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert_eq!(e.code, oxvirt_rpc::jsonrpc::INVALID_PARAMS, "{bad}: {e:?}");
        }
    }
}
