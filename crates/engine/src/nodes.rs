//! Talking to nodes: one pooled mutual-TLS JSON-RPC client per host, typed calls, and waiting
//! for SPM tasks and node jobs.
//!
//! Architecture invariant: this is the engine's only path to a node; nothing else opens
//! connections to hosts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use oxvirt_pki::Identity;
use oxvirt_rpc::{ClientError, RpcClient};
use oxvirt_types::{JobId, TaskId};

use crate::model::{Host, HostUuid};

/// The longest pause between two looks at a node's task or job: a command made of several
/// storage tasks (a live disk move runs nine) waits up to this long after each one ends, and a
/// look is one small request on a kept connection.
const POLL_MAX: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("host {host} ({addr}) is unreachable")]
    Unreachable {
        host: String,
        addr: String,
        #[source]
        source: ClientError,
    },
    #[error("host {host}: {method} failed: {message} (code {code})")]
    Verb {
        host: String,
        method: String,
        code: i64,
        message: String,
    },
    #[error("host {host}: {method} returned an unexpected reply: {detail}")]
    Reply {
        host: String,
        method: String,
        detail: String,
    },
    #[error("host {host}: address {addr:?} is not ip:port")]
    Address { host: String, addr: String },
    #[error("host {host}: task {task} failed: {message}")]
    Task {
        host: String,
        task: TaskId,
        message: String,
    },
    #[error("host {host}: job {job} failed: {message}")]
    Job {
        host: String,
        job: JobId,
        message: String,
    },
    #[error("host {host}: {what} did not finish within {timeout:?}")]
    Timeout {
        host: String,
        what: String,
        timeout: Duration,
    },
    #[error("TLS configuration")]
    Tls(#[from] oxvirt_pki::PkiError),
}

impl NodeError {
    /// The node's stable error code, when the node answered with one.
    pub fn code(&self) -> Option<i64> {
        match self {
            NodeError::Verb { code, .. } => Some(*code),
            _ => None,
        }
    }
    /// The node could not be reached at all (as opposed to refusing the call).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, NodeError::Unreachable { .. })
    }
}

/// A host's address as clients dial it.
fn socket_addr(h: &Host) -> Result<SocketAddr, NodeError> {
    format!("{}:{}", h.address, h.port)
        .parse()
        .map_err(|_| NodeError::Address {
            host: h.name.clone(),
            addr: format!("{}:{}", h.address, h.port),
        })
}

/// A client for one host.
#[derive(Clone)]
pub struct NodeClient {
    pub host_id: HostUuid,
    pub name: String,
    rpc: Arc<RpcClient>,
    /// Bound on each call made through this client, tighter than the transport's (see
    /// [`NodeClient::within`]).
    limit: Option<Duration>,
}

impl std::fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeClient")
            .field("host", &self.name)
            .field("addr", &self.rpc.addr())
            .finish()
    }
}

impl NodeClient {
    pub fn rpc(&self) -> &RpcClient {
        &self.rpc
    }

    /// The same client with every call bounded by `limit`. Monitoring uses it: a frozen node
    /// accepts connections but never answers, and must not hold a monitoring round for the
    /// transport's long timeout (meant for slow verbs run by commands).
    pub fn within(&self, limit: Duration) -> NodeClient {
        NodeClient {
            limit: Some(limit),
            ..self.clone()
        }
    }

    /// Calls a verb and returns its raw result.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, NodeError> {
        let call = self.rpc.call(method, params);
        let r = match self.limit {
            None => call.await,
            Some(limit) => match tokio::time::timeout(limit, call).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(NodeError::Timeout {
                        host: self.name.clone(),
                        what: method.to_string(),
                        timeout: limit,
                    })
                }
            },
        };
        r.map_err(|e| match e {
            ClientError::Rpc(r) => NodeError::Verb {
                host: self.name.clone(),
                method: method.to_string(),
                code: r.code,
                message: r.message,
            },
            other => NodeError::Unreachable {
                host: self.name.clone(),
                addr: self.rpc.addr().to_string(),
                source: other,
            },
        })
    }

    /// Calls a verb and decodes its result.
    pub async fn call_as<T: DeserializeOwned>(&self, method: &str, params: Value) -> Result<T, NodeError> {
        let v = self.call(method, params).await?;
        serde_json::from_value(v).map_err(|e| NodeError::Reply {
            host: self.name.clone(),
            method: method.to_string(),
            detail: e.to_string(),
        })
    }

    /// Waits for an SPM task (`Task.getStatus`) to finish; clears it when it succeeded.
    pub async fn wait_task(&self, task: TaskId, timeout: Duration) -> Result<(), NodeError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(20);
        loop {
            let st = self.call("Task.getStatus", json!({ "taskID": task })).await?;
            let s = &st["taskStatus"];
            if s["taskState"] == "finished" {
                return if s["taskResult"] == "success" {
                    let _ = self.call("Task.clear", json!({ "taskID": task })).await;
                    Ok(())
                } else {
                    Err(NodeError::Task {
                        host: self.name.clone(),
                        task,
                        message: s["message"].as_str().unwrap_or("failed").to_string(),
                    })
                };
            }
            if start.elapsed() > timeout {
                return Err(NodeError::Timeout {
                    host: self.name.clone(),
                    what: format!("task {task}"),
                    timeout,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(POLL_MAX);
        }
    }

    /// Waits for a node job (`Host.getJobs`) to end; returns its result.
    pub async fn wait_job(&self, job: JobId, timeout: Duration) -> Result<Value, NodeError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(20);
        loop {
            let jobs = self.call("Host.getJobs", json!({})).await?;
            if let Some(j) = jobs
                .as_array()
                .and_then(|a| a.iter().find(|j| j["id"] == json!(job)))
            {
                match j["status"].as_str() {
                    Some("done") => return Ok(j["result"].clone()),
                    Some("failed") => {
                        return Err(NodeError::Job {
                            host: self.name.clone(),
                            job,
                            message: j["error"]["message"].as_str().unwrap_or("failed").to_string(),
                        })
                    }
                    _ => {}
                }
            }
            if start.elapsed() > timeout {
                return Err(NodeError::Timeout {
                    host: self.name.clone(),
                    what: format!("job {job}"),
                    timeout,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(POLL_MAX);
        }
    }

    /// Runs a node verb that starts a job (`{"jobID": …}`) and waits for the job's result.
    pub async fn run_job(&self, method: &str, params: Value, timeout: Duration) -> Result<Value, NodeError> {
        #[derive(serde::Deserialize)]
        struct Started {
            #[serde(rename = "jobID")]
            job: JobId,
        }
        let started: Started = self.call_as(method, params).await?;
        self.wait_job(started.job, timeout).await
    }

    /// Runs an SPM verb that returns a task id and waits for the task.
    pub async fn run_task(&self, method: &str, params: Value, timeout: Duration) -> Result<(), NodeError> {
        let task: TaskId = self.call_as(method, params).await?;
        self.wait_task(task, timeout).await
    }
}

/// Clients for every host, created on first use and replaced when a host's address changes.
pub struct NodeClients {
    identity: Identity,
    clients: Mutex<HashMap<HostUuid, (String, NodeClient)>>,
    timeout: Duration,
}

impl NodeClients {
    pub fn new(identity: Identity, timeout: Duration) -> Self {
        Self {
            identity,
            clients: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn client(&self, h: &Host) -> Result<NodeClient, NodeError> {
        let key = format!("{}:{}", h.address, h.port);
        let mut clients = self.clients.lock().expect("node clients");
        if let Some((k, c)) = clients.get(&h.id) {
            if *k == key {
                return Ok(c.clone());
            }
        }
        let addr = socket_addr(h)?;
        let tls = oxvirt_pki::client_config(&self.identity.ca_pem, Some(&self.identity))?;
        let rpc = RpcClient::new(addr, &h.address, tls)
            .map_err(|e| NodeError::Unreachable {
                host: h.name.clone(),
                addr: key.clone(),
                source: e,
            })?
            .with_timeout(self.timeout);
        let c = NodeClient {
            host_id: h.id,
            name: h.name.clone(),
            rpc: Arc::new(rpc),
            limit: None,
        };
        clients.insert(h.id, (key, c.clone()));
        Ok(c)
    }

    pub fn forget(&self, host: HostUuid) {
        self.clients.lock().expect("node clients").remove(&host);
    }
}
