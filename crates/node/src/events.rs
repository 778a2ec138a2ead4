//! The node's event bus. Published now: VM status changes (`|virt|VM_status|<id>`, including a
//! migration's start and end on both sides), an outgoing migration's progress every 500 ms
//! (`|virt|VM_migration_progress|<id>`), job status at each job's end (`|jobs|status|<id>`:
//! migrations, shutdowns, merges), this host's SPM role changes (`|storage|spm_status|<pool>`),
//! the domain monitor's changes (`|storage|domain_monitor|<sd>`: valid or not, host id held or
//! not), network changes and their confirmation or rollback.
//! Producers call [`EventBus::publish`]; each `GET /events` subscriber gets every event
//! published after it subscribed, in order, each with a sequence number. The engine follows
//! the stream to poll at once instead of at its next interval (progress samples it only
//! records).
//!
//! A subscriber that falls behind by more than the buffer loses events; it is told so with an
//! `|node|events_lost|` event (and should poll). Sequence numbers make gaps visible too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use oxvirt_types::api::Event;
use tokio::sync::{broadcast, mpsc};

const BUFFER: usize = 1024;

pub struct EventBus {
    tx: broadcast::Sender<Event>,
    seq: AtomicU64,
    boot_id: String,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BUFFER);
        let boot = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Self {
            tx,
            seq: AtomicU64::new(1),
            boot_id: format!("{boot:x}"),
        }
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    pub fn publish(&self, topic: impl Into<String>, body: serde_json::Value) {
        let ev = Event {
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            boot_id: self.boot_id.clone(),
            topic: topic.into(),
            body,
        };
        tracing::debug!(seq = ev.seq, topic = %ev.topic, "event");
        // No subscribers is fine: the engine polls when it is not listening.
        let _ = self.tx.send(ev);
    }

    /// A stream of NDJSON lines (JSON-RPC notifications) for one subscriber.
    pub fn subscribe_lines(&self) -> mpsc::Receiver<Bytes> {
        let mut rx = self.tx.subscribe();
        let (out, lines) = mpsc::channel(64);
        let boot_id = self.boot_id.clone();
        tokio::spawn(async move {
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(n)) => Event {
                        seq: 0,
                        boot_id: boot_id.clone(),
                        topic: "|node|events_lost|".into(),
                        body: serde_json::json!({ "lost": n }),
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let note =
                    oxvirt_rpc::jsonrpc::notification(&ev.topic, serde_json::to_value(&ev).expect("event"));
                if out.send(Bytes::from(format!("{note}\n"))).await.is_err() {
                    return;
                }
            }
        });
        lines
    }
}
