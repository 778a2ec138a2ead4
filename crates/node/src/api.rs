//! The node's verbs as an internal command enum, and the one dispatcher every transport uses.
//!
//! JSON-RPC, XML-RPC and the REST view are thin: they turn a request into a [`Request`] with
//! [`Request::parse`] and hand it to [`Node::execute`](crate::service::Node::execute). Adding a
//! verb means adding a variant, its parse arm and its execute arm — nothing in the transports.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use oxvirt_rpc::RpcError;
use oxvirt_types::api::ErrorCode;

/// An error a verb returns: a stable code and a message naming the object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<ApiError> for RpcError {
    fn from(e: ApiError) -> RpcError {
        RpcError::new(e.code.code(), e.message)
    }
}

/// A parsed call.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    HostPing,
    HostGetCapabilities,
    HostGetStats,
    HostGetAllVmStats,
}

/// Every verb name this node serves, for `Host.getCapabilities` and error messages.
pub const VERBS: &[&str] = &[
    "Host.ping",
    "Host.getCapabilities",
    "Host.getStats",
    "Host.getAllVmStats",
];

fn no_params(method: &str, params: &Map<String, Value>) -> Result<(), RpcError> {
    if params.is_empty() {
        Ok(())
    } else {
        let keys: Vec<_> = params.keys().map(String::as_str).collect();
        Err(RpcError::invalid_params(format!(
            "{method} takes no parameters, got {}",
            keys.join(", ")
        )))
    }
}

/// Decodes named parameters into a typed struct, naming the verb in the error.
pub fn params<T: DeserializeOwned>(method: &str, params: Map<String, Value>) -> Result<T, RpcError> {
    serde_json::from_value(Value::Object(params))
        .map_err(|e| RpcError::invalid_params(format!("{method}: {e}")))
}

impl Request {
    pub fn parse(method: &str, p: Map<String, Value>) -> Result<Request, RpcError> {
        Ok(match method {
            "Host.ping" => {
                no_params(method, &p)?;
                Request::HostPing
            }
            "Host.getCapabilities" => {
                no_params(method, &p)?;
                Request::HostGetCapabilities
            }
            "Host.getStats" => {
                no_params(method, &p)?;
                Request::HostGetStats
            }
            "Host.getAllVmStats" => {
                no_params(method, &p)?;
                Request::HostGetAllVmStats
            }
            other => return Err(RpcError::method_not_found(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_and_stray_params_are_refused() {
        assert_eq!(
            Request::parse("Host.getStats", Map::new()).unwrap(),
            Request::HostGetStats
        );
        let e = Request::parse("Host.reboot", Map::new()).unwrap_err();
        assert_eq!(e.code, oxvirt_rpc::jsonrpc::METHOD_NOT_FOUND);
        let mut p = Map::new();
        p.insert("x".into(), 1.into());
        let e = Request::parse("Host.getStats", p).unwrap_err();
        assert_eq!(e.code, oxvirt_rpc::jsonrpc::INVALID_PARAMS);
        assert!(e.message.contains('x'));
    }
}
