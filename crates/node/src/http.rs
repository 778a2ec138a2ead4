//! The node's transports, all over one HTTPS listener with mutual TLS:
//!
//! | path | what |
//! |---|---|
//! | `POST /jsonrpc` | JSON-RPC 2.0 (single calls and batches) |
//! | `POST /RPC2` | XML-RPC, the same verbs |
//! | `GET /api/{host,vms,storagedomains,jobs,tasks}` | read-only REST view (JSON; `tasks` are the pool's SPM tasks) |
//! | `GET /events` | event stream, one JSON-RPC notification per line |
//!
//! Every path parses into a [`Request`](crate::api::Request) and goes through
//! [`Node::call`]/[`Node::execute`]; nothing here knows a verb's meaning.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};

use oxvirt_rpc::jsonrpc::{self, Incoming};
use oxvirt_rpc::{xmlrpc, Handler, HttpRequest, Reply, RpcError};

use crate::api::host::HostRequest;
use crate::api::storage::StorageRequest;
use crate::api::Request;
use crate::service::Node;

pub fn handler(node: Arc<Node>) -> Handler {
    Arc::new(move |req: HttpRequest| {
        let node = node.clone();
        Box::pin(async move { route(&node, req).await })
    })
}

async fn route(node: &Arc<Node>, req: HttpRequest) -> Reply {
    let who = req
        .client
        .as_ref()
        .map(|c| c.name.as_str())
        .unwrap_or("-")
        .to_string();
    tracing::debug!(peer = %req.peer, client = %who, method = %req.method, path = %req.path, "request");
    match (&req.method, req.path.as_str()) {
        (&Method::POST, "/jsonrpc") => json_rpc(node, &req.body).await,
        (&Method::POST, "/RPC2") => xml_rpc(node, &req.body).await,
        (&Method::GET, "/events") => Reply::Stream {
            content_type: "application/x-ndjson",
            rx: node.events.subscribe_lines(),
        },
        (&Method::GET, path) if path.starts_with("/api/") => rest(node, &path[5..]).await,
        (_, "/jsonrpc" | "/RPC2" | "/events") => {
            Reply::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => Reply::text(StatusCode::NOT_FOUND, format!("no such path {}", req.path)),
    }
}

async fn json_rpc(node: &Arc<Node>, body: &Bytes) -> Reply {
    let one = |c: Result<jsonrpc::Call, (Value, RpcError)>| async move {
        match c {
            Err((id, e)) => Some(jsonrpc::error_response(id, &e)),
            Ok(call) => {
                let res = node.call(&call.method, call.params).await;
                let id = call.id?; // notifications get no reply
                Some(match res {
                    Ok(v) => jsonrpc::success_response(id, v),
                    Err(e) => jsonrpc::error_response(id, &e),
                })
            }
        }
    };
    match jsonrpc::parse(body) {
        Err(resp) => Reply::json(StatusCode::OK, &resp),
        Ok(Incoming::Single(c)) => match one(c).await {
            Some(v) => Reply::json(StatusCode::OK, &v),
            None => Reply::Full {
                status: StatusCode::NO_CONTENT,
                content_type: "application/json",
                body: Bytes::new(),
            },
        },
        Ok(Incoming::Batch(items)) => {
            let mut out = Vec::new();
            for c in items {
                if let Some(v) = one(c).await {
                    out.push(v);
                }
            }
            Reply::json(StatusCode::OK, &Value::Array(out))
        }
    }
}

async fn xml_rpc(node: &Arc<Node>, body: &Bytes) -> Reply {
    let xml = |s: String| Reply::Full {
        status: StatusCode::OK,
        content_type: "text/xml",
        body: Bytes::from(s),
    };
    let (method, params) = match xmlrpc::parse_call(body) {
        Ok(x) => x,
        Err(e) => return xml(xmlrpc::fault_response(jsonrpc::PARSE_ERROR, &e.to_string())),
    };
    let params = match params {
        Value::Object(m) => m,
        _ => {
            return xml(xmlrpc::fault_response(
                jsonrpc::INVALID_PARAMS,
                "pass the parameters as one struct of named parameters",
            ))
        }
    };
    match node.call(&method, params).await {
        Ok(v) => xml(xmlrpc::success_response(&v)),
        Err(e) => xml(xmlrpc::fault_response(e.code, &e.message)),
    }
}

async fn rest(node: &Arc<Node>, resource: &str) -> Reply {
    let run = |r: Request| async move { node.execute(r).await };
    let result = match resource.trim_end_matches('/') {
        "host" => match (
            run(Request::Host(HostRequest::GetCapabilities)).await,
            run(Request::Host(HostRequest::GetStats)).await,
        ) {
            (Ok(caps), Ok(stats)) => {
                Ok(json!({ "name": node.config.name, "capabilities": caps, "stats": stats }))
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
        "vms" => {
            run(Request::Host(HostRequest::GetAllVmStats {
                monitor_timeout: None,
            }))
            .await
        }
        "storagedomains" => {
            let mut out = Vec::new();
            for (sd, _) in node.storage.domains() {
                let info = run(Request::Storage(StorageRequest::DomainGetInfo { sd })).await;
                let stats = run(Request::Storage(StorageRequest::DomainGetStats { sd })).await;
                out.push(json!({ "sdUUID": sd, "info": info.ok(), "stats": stats.ok() }));
            }
            Ok(Value::Array(out))
        }
        "jobs" => run(Request::Host(HostRequest::GetJobs)).await,
        // The pool's SPM tasks this node knows (its own and those journaled on the master
        // domain), as `StoragePool.getAllTasksStatuses` lists them; none when not connected.
        "tasks" => match node.pools.current() {
            None => Ok(json!({ "allTasksStatus": {} })),
            Some(cp) => {
                let mut p = serde_json::Map::new();
                p.insert("spUUID".into(), json!(cp.pool));
                match crate::api::storage::PoolRequest::parse("StoragePool.getAllTasksStatuses", p) {
                    Ok(r) => run(Request::Storage(StorageRequest::Pool(r))).await,
                    Err(e) => return Reply::text(StatusCode::INTERNAL_SERVER_ERROR, e.message),
                }
            }
        },
        other => return Reply::text(StatusCode::NOT_FOUND, format!("no such resource {other:?}")),
    };
    match result {
        Ok(v) => Reply::json(StatusCode::OK, &v),
        Err(e) => Reply::json(
            StatusCode::CONFLICT,
            &json!({ "code": e.code.code(), "message": e.message }),
        ),
    }
}
