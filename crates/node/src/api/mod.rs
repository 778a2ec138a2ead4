//! The node's verbs as an internal command enum, and the one dispatcher every transport uses.
//!
//! JSON-RPC, XML-RPC and the REST view are thin: they turn a request into a [`Request`] with
//! [`Request::parse`] and hand it to [`Node::execute`](crate::service::Node::execute). Verbs are
//! grouped by namespace, one module each: [`host`] (`Host.*`), [`vm`] (`VM.*`), [`storage`]
//! (`StoragePool.*`, `StorageDomain.*`, `Volume.*`, `Image.*`, `Task.*`, `SDM.*`), [`net`]
//! (host networks and VM NICs), [`transfer`] (`NBD.*` and the image tickets). Adding a verb
//! means a variant, its parse arm and its execute arm in one module — nothing in the transports.

pub mod host;
pub mod net;
pub mod storage;
pub mod transfer;
pub mod vm;

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
    Host(host::HostRequest),
    Vm(vm::VmRequest),
    Storage(storage::StorageRequest),
    Net(net::NetRequest),
    Transfer(transfer::TransferRequest),
}

/// Every verb name this node serves.
pub fn verbs() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = Vec::new();
    v.extend(host::VERBS);
    v.extend(vm::VERBS);
    v.extend(storage::VERBS);
    v.extend(net::VERBS);
    v.extend(transfer::VERBS);
    v
}

/// Refuses parameters for verbs that take none.
pub fn no_params(method: &str, params: &Map<String, Value>) -> Result<(), RpcError> {
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

/// Decodes named parameters into a typed struct (unknown keys refused with
/// `#[serde(deny_unknown_fields)]` on the struct), naming the verb in the error.
pub fn params<T: DeserializeOwned>(method: &str, params: Map<String, Value>) -> Result<T, RpcError> {
    serde_json::from_value(Value::Object(params))
        .map_err(|e| RpcError::invalid_params(format!("{method}: {e}")))
}

impl Request {
    pub fn parse(method: &str, p: Map<String, Value>) -> Result<Request, RpcError> {
        if net::VERBS.contains(&method) {
            return net::NetRequest::parse(method, p).map(Request::Net);
        }
        if transfer::VERBS.contains(&method) {
            return transfer::TransferRequest::parse(method, p).map(Request::Transfer);
        }
        let ns = method.split('.').next().unwrap_or_default();
        match ns {
            // The domains on a storage connection: storage's to answer.
            "Host" if method == "Host.getStorageDomains" => {
                storage::StorageRequest::parse(method, p).map(Request::Storage)
            }
            "Host" => host::HostRequest::parse(method, p).map(Request::Host),
            "VM" => vm::VmRequest::parse(method, p).map(Request::Vm),
            "StoragePool" | "StorageDomain" | "Volume" | "Image" | "Task" | "SDM" | "Lease" => {
                storage::StorageRequest::parse(method, p).map(Request::Storage)
            }
            _ => Err(RpcError::method_not_found(method)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_and_stray_params_are_refused() {
        assert_eq!(
            Request::parse("Host.getStats", Map::new()).unwrap(),
            Request::Host(host::HostRequest::GetStats)
        );
        for m in ["Host.reboot", "Nope.x", "", "VM.fly"] {
            let e = Request::parse(m, Map::new()).unwrap_err();
            assert_eq!(e.code, oxvirt_rpc::jsonrpc::METHOD_NOT_FOUND, "{m}");
        }
        let mut p = Map::new();
        p.insert("x".into(), 1.into());
        let e = Request::parse("Host.getStats", p).unwrap_err();
        assert_eq!(e.code, oxvirt_rpc::jsonrpc::INVALID_PARAMS);
        assert!(e.message.contains('x'));
    }

    #[test]
    fn every_listed_verb_parses_its_namespace() {
        for v in verbs() {
            // Parsing may fail on missing parameters, never on an unknown method.
            if let Err(e) = Request::parse(v, Map::new()) {
                assert_ne!(
                    e.code,
                    oxvirt_rpc::jsonrpc::METHOD_NOT_FOUND,
                    "{v} is listed but not parsed"
                );
            }
        }
    }
}
