//! A line protocol onto [`VmManager`], for running the manager as a separate process before
//! the node daemon exists (tests with two nodes, or a node killed with SIGKILL, use it through
//! the `oxvirt-vm-node` binary).
//!
//! One JSON object per line in, `{"seq": N, "op": "<verb>", ...arguments}`; one per line out,
//! `{"seq": N, "ok": <result>}` or `{"seq": N, "error": "<message>"}`. Requests run
//! concurrently (a `migrate_cancel` must overtake the `migrate` it cancels), so replies may come
//! out of order; `seq` pairs them. The node daemon's JSON-RPC verbs map onto the same manager
//! methods one to one (`VM.create` → `create`, `VM.migrate` → `migrate`, ...).
//!
//! Architecture invariant: a thin translation — no logic beyond decoding, calling the manager
//! and encoding.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use oxvirt_types::{SdUuid, VmId};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{MigrateParams, SnapshotDisk, VmCreate, VmManager};

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Create {
        vm: VmCreate,
    },
    PrepareIncoming {
        vm: VmCreate,
    },
    List,
    Status {
        id: VmId,
    },
    /// Waits until the VM reaches the state named as VDSM does (`Up`, `Down`, ...).
    WaitFor {
        id: VmId,
        state: String,
        timeout_ms: u64,
    },
    Pause {
        id: VmId,
    },
    Resume {
        id: VmId,
    },
    Shutdown {
        id: VmId,
        timeout_ms: u64,
    },
    Destroy {
        id: VmId,
    },
    Stats {
        id: VmId,
    },
    Balloon {
        id: VmId,
        target_mib: u64,
    },
    Snapshot {
        id: VmId,
        disks: Vec<SnapshotDisk>,
    },
    Merge {
        id: VmId,
        disk: usize,
        base: PathBuf,
        top: PathBuf,
        timeout_ms: u64,
    },
    Migrate {
        id: VmId,
        params: MigrateParams,
    },
    MigrateCancel {
        id: VmId,
    },
    Fence {
        sd: SdUuid,
        within_ms: u64,
    },
}

#[derive(Debug, Deserialize)]
struct Envelope {
    seq: u64,
    #[serde(flatten)]
    req: Request,
}

/// Runs one request against the manager.
pub async fn handle(mgr: &VmManager, req: Request) -> Result<Value, String> {
    fn ok<T: serde::Serialize>(v: T) -> Result<Value, String> {
        serde_json::to_value(v).map_err(|e| e.to_string())
    }
    let e = |e: super::VmError| error_chain(&e);
    match req {
        Request::Create { vm } => ok(mgr.create(vm).await.map_err(e)?),
        Request::PrepareIncoming { vm } => ok(mgr.prepare_incoming(vm).await.map_err(e)?),
        Request::List => ok(mgr.list()),
        Request::Status { id } => ok(mgr.status(id).map_err(e)?),
        Request::WaitFor {
            id,
            state,
            timeout_ms,
        } => ok(mgr
            .wait_for(id, Duration::from_millis(timeout_ms), |s| s.vdsm_name() == state)
            .await
            .map_err(e)?),
        Request::Pause { id } => ok(mgr.pause(id).await.map_err(e)?),
        Request::Resume { id } => ok(mgr.resume(id).await.map_err(e)?),
        Request::Shutdown { id, timeout_ms } => ok(mgr
            .shutdown(id, Duration::from_millis(timeout_ms))
            .await
            .map_err(e)?),
        Request::Destroy { id } => ok(mgr.destroy(id).await.map_err(e)?),
        Request::Stats { id } => ok(mgr.stats(id).await.map_err(e)?),
        Request::Balloon { id, target_mib } => ok(mgr.set_balloon(id, target_mib).await.map_err(e)?),
        Request::Snapshot { id, disks } => ok(mgr.snapshot(id, disks).await.map_err(e)?),
        Request::Merge {
            id,
            disk,
            base,
            top,
            timeout_ms,
        } => ok(mgr
            .merge(id, disk, &base, &top, Duration::from_millis(timeout_ms))
            .await
            .map_err(e)?),
        Request::Migrate { id, params } => ok(mgr.migrate(id, params).await.map_err(e)?),
        Request::MigrateCancel { id } => ok(mgr.migrate_cancel(id).await.map_err(e)?),
        Request::Fence { sd, within_ms } => ok(mgr
            .fence_storage_domain(sd, Duration::from_millis(within_ms))
            .await
            .map_err(e)?),
    }
}

/// An error with its sources, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Serves requests from `input` until it closes. The VMs keep running afterwards.
pub async fn serve(
    mgr: Arc<VmManager>,
    input: impl AsyncBufRead + Unpin,
    mut output: impl AsyncWrite + Unpin + Send + 'static,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            if output.write_all(line.as_bytes()).await.is_err() || output.flush().await.is_err() {
                break;
            }
        }
    });
    let mut lines = input.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        let tx = tx.clone();
        let env: Envelope = match serde_json::from_str(&line) {
            Ok(env) => env,
            Err(err) => {
                let seq = serde_json::from_str::<Value>(&line)
                    .ok()
                    .and_then(|v| v["seq"].as_u64());
                let _ = tx.send(format!(
                    "{}\n",
                    json!({"seq": seq, "error": format!("bad request: {err}")})
                ));
                continue;
            }
        };
        let mgr = mgr.clone();
        tokio::spawn(async move {
            let reply = match handle(&mgr, env.req).await {
                Ok(v) => json!({"seq": env.seq, "ok": v}),
                Err(e) => json!({"seq": env.seq, "error": e}),
            };
            let _ = tx.send(format!("{reply}\n"));
        });
    }
    drop(tx);
    let _ = writer.await;
}
