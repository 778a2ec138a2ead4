//! The node's state and its dispatcher.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use oxvirt_rpc::RpcError;

use crate::api::{ApiError, Request};
use crate::events::EventBus;
use crate::host::HostSampler;

/// Static configuration given on the command line or by the engine.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The host's name as the engine knows it.
    pub name: String,
    /// Run directory: QMP sockets, VM specs, pid files. Derivable state only.
    pub run_dir: PathBuf,
}

pub struct Node {
    pub config: NodeConfig,
    pub events: Arc<EventBus>,
    sampler: HostSampler,
}

impl Node {
    pub fn new(config: NodeConfig) -> Arc<Node> {
        Arc::new(Node {
            config,
            events: Arc::new(EventBus::new()),
            sampler: HostSampler::new(),
        })
    }

    /// Parses and executes one call.
    pub async fn call(&self, method: &str, params: Map<String, Value>) -> Result<Value, RpcError> {
        let req = Request::parse(method, params)?;
        self.execute(req).await.map_err(RpcError::from)
    }

    pub async fn execute(&self, req: Request) -> Result<Value, ApiError> {
        Ok(match req {
            Request::HostPing => json!({ "name": self.config.name, "bootId": self.events.boot_id() }),
            Request::HostGetCapabilities => {
                let mut caps = to_json(&self.sampler.capabilities(Vec::new()));
                caps["verbs"] = json!(crate::api::VERBS);
                caps
            }
            Request::HostGetStats => to_json(&self.sampler.stats(0)),
            Request::HostGetAllVmStats => json!([]),
        })
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("API types serialize")
}
