//! Image transfers: the node's ovirt-imageio.
//!
//! The engine uploads or downloads a disk through a host in three steps, as with VDSM and
//! ovirt-imageio: `NBD.start_server` exports the volume (and its backing chain) with `qemu-nbd`
//! on a Unix socket under `run/nbd/`; `Host.add_image_ticket` registers a ticket naming that
//! socket, the operations it allows and its lifetime; the client then talks HTTPS to
//! `/images/<ticket>` on this node's transfer listener ([`http`]), speaking ovirt-imageio's
//! protocol (OPTIONS, GET with Range, PUT with Content-Range, PATCH zero/flush, GET extents), so
//! the `ovirt_imageio` client, the SDK's examples and Ansible's `ovirt_disk` work unmodified.
//!
//! This module owns the tickets and the NBD servers. Invariants:
//! - A request is served only under a ticket that exists, has not expired on the injected
//!   clock, is not being removed, and allows the operation (`write` implies `read`).
//! - Removing a ticket refuses new requests at once and waits for those in flight, so once
//!   `Host.remove_image_ticket` returns no byte more reaches the volume; stopping the NBD server
//!   then flushes and closes the image.
//! - Tickets live in memory: a restarted node has none, and its `qemu-nbd`s died with it
//!   (`PR_SET_PDEATHSIG`); the engine sees the ticket gone and fails the transfer.

pub mod http;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use oxvirt_lease::Clock;
use oxvirt_qemu::nbd::{NbdError, NbdExport, QemuNbd};
use oxvirt_qemu::ImageFormat;

/// Longest `Host.remove_image_ticket` waits for requests in flight.
pub const REMOVE_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TicketOp {
    Read,
    Write,
}

/// A ticket as the engine sends it (VDSM's `Host.add_image_ticket` fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ticket {
    pub uuid: String,
    /// Bytes the client may address.
    pub size: u64,
    /// Where the data is: `nbd:unix:<socket>` from `NBD.start_server`.
    pub url: String,
    pub ops: Vec<TicketOp>,
    /// Seconds until the ticket expires (the engine extends it while the transfer goes on).
    pub timeout: u64,
    #[serde(default)]
    pub sparse: bool,
    #[serde(default)]
    pub dirty: bool,
    #[serde(default)]
    pub transfer_id: Option<String>,
    #[serde(default)]
    pub filename: Option<String>,
    #[serde(default)]
    pub inactivity_timeout: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("ticket id {0:?} is not a UUID-like token")]
    BadTicketId(String),
    #[error("ticket {uuid} has unsupported url {url:?} (only nbd:unix:<socket>)")]
    BadUrl { uuid: String, url: String },
    #[error("ticket {uuid} allows no operation")]
    NoOps { uuid: String },
    #[error("ticket {0} already exists with different contents")]
    Exists(String),
    #[error("no such ticket {0}")]
    NoTicket(String),
    #[error("ticket {0} expired")]
    Expired(String),
    #[error("ticket {0} is being removed")]
    Canceled(String),
    #[error("ticket {uuid} does not allow {op:?}")]
    Forbidden { uuid: String, op: TicketOp },
    #[error("ticket {uuid} still has {active} requests in flight after {secs} s")]
    Busy { uuid: String, active: usize, secs: u64 },
    #[error("NBD server id {0:?} is not a UUID-like token")]
    BadServerId(String),
    #[error("NBD server {0} already runs")]
    ServerExists(String),
    #[error("no NBD server {0}")]
    NoServer(String),
    #[error("NBD server {id}")]
    Nbd {
        id: String,
        #[source]
        source: NbdError,
    },
}

/// A registered ticket and what happened under it.
#[derive(Debug)]
pub struct TicketEntry {
    pub ticket: Ticket,
    /// Path of the NBD socket the URL names.
    pub socket: PathBuf,
    expires: Mutex<Duration>,
    last_activity: Mutex<Duration>,
    transferred: AtomicU64,
    active: AtomicUsize,
    connections: AtomicUsize,
    canceled: AtomicBool,
}

impl TicketEntry {
    pub fn may(&self, op: TicketOp) -> bool {
        self.ticket.ops.contains(&op) || (op == TicketOp::Read && self.ticket.ops.contains(&TicketOp::Write))
    }

    pub fn canceled(&self) -> bool {
        self.canceled.load(Ordering::SeqCst)
    }

    pub fn add_transferred(&self, n: u64) {
        self.transferred.fetch_add(n, Ordering::Relaxed);
    }
}

/// Held while a request runs under a ticket: counts it active and stamps its end.
pub struct Operation {
    entry: Arc<TicketEntry>,
    clock: Arc<dyn Clock>,
}

impl Operation {
    pub fn entry(&self) -> &Arc<TicketEntry> {
        &self.entry
    }
}

impl Drop for Operation {
    fn drop(&mut self) {
        *self.entry.last_activity.lock().expect("ticket") = self.clock.now();
        self.entry.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts an HTTP connection that used a ticket.
pub struct ConnectionGuard(Arc<TicketEntry>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct ImageService {
    clock: Arc<dyn Clock>,
    nbd_dir: PathBuf,
    tickets: Mutex<HashMap<String, Arc<TicketEntry>>>,
    servers: tokio::sync::Mutex<HashMap<String, QemuNbd>>,
    port: AtomicU16,
}

/// Ticket and server ids become paths and URL segments: only UUID-like tokens pass.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The socket of an `nbd:unix:<path>[:exportname=<name>]` URL.
fn nbd_socket(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("nbd:unix:")?;
    let path = rest.split(":exportname=").next()?;
    (!path.is_empty() && Path::new(path).is_absolute()).then(|| PathBuf::from(path))
}

impl ImageService {
    pub fn new(run_dir: &Path, clock: Arc<dyn Clock>) -> ImageService {
        ImageService {
            clock,
            nbd_dir: run_dir.join("nbd"),
            tickets: Mutex::default(),
            servers: tokio::sync::Mutex::default(),
            port: AtomicU16::new(0),
        }
    }

    /// The transfer listener's port, once it is up (0 before).
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    pub fn set_port(&self, port: u16) {
        self.port.store(port, Ordering::SeqCst);
    }

    /// Exports `layers`' top (with its chain below it) on `run/nbd/<id>.sock`.
    pub async fn start_server(
        &self,
        id: &str,
        top: &Path,
        format: ImageFormat,
        read_only: bool,
        direct_io: bool,
    ) -> Result<String, TransferError> {
        if !valid_id(id) {
            return Err(TransferError::BadServerId(id.to_string()));
        }
        let mut servers = self.servers.lock().await;
        if servers.contains_key(id) {
            return Err(TransferError::ServerExists(id.to_string()));
        }
        std::fs::create_dir_all(&self.nbd_dir).map_err(|source| TransferError::Nbd {
            id: id.to_string(),
            source: NbdError::Io {
                socket: self.nbd_dir.clone(),
                source,
            },
        })?;
        let socket = self.nbd_dir.join(format!("{id}.sock"));
        let server = QemuNbd::start(
            &socket,
            &NbdExport {
                path: top,
                format,
                read_only,
                direct_io,
                shared: http::MAX_CONNECTIONS as u32,
            },
        )
        .await
        .map_err(|source| TransferError::Nbd {
            id: id.to_string(),
            source,
        })?;
        tracing::info!(server = id, path = %top.display(), read_only, pid = ?server.pid(), "NBD server started");
        servers.insert(id.to_string(), server);
        Ok(format!("nbd:unix:{}", socket.display()))
    }

    /// Stops an NBD server; stopping one that does not run succeeds (the engine's cleanup may
    /// repeat after a crash).
    pub async fn stop_server(&self, id: &str) -> Result<(), TransferError> {
        if !valid_id(id) {
            return Err(TransferError::BadServerId(id.to_string()));
        }
        let server = self.servers.lock().await.remove(id);
        if let Some(s) = server {
            s.stop().await;
            tracing::info!(server = id, "NBD server stopped");
        }
        Ok(())
    }

    pub fn add_ticket(&self, ticket: Ticket) -> Result<(), TransferError> {
        if !valid_id(&ticket.uuid) {
            return Err(TransferError::BadTicketId(ticket.uuid));
        }
        let socket = nbd_socket(&ticket.url).ok_or_else(|| TransferError::BadUrl {
            uuid: ticket.uuid.clone(),
            url: ticket.url.clone(),
        })?;
        if ticket.ops.is_empty() {
            return Err(TransferError::NoOps { uuid: ticket.uuid });
        }
        let mut tickets = self.tickets.lock().expect("tickets");
        if let Some(old) = tickets.get(&ticket.uuid) {
            // Adding the same ticket again (an engine retry) only extends it.
            if old.ticket != ticket {
                return Err(TransferError::Exists(ticket.uuid));
            }
        }
        let now = self.clock.now();
        let uuid = ticket.uuid.clone();
        tickets.insert(
            uuid.clone(),
            Arc::new(TicketEntry {
                expires: Mutex::new(now + Duration::from_secs(ticket.timeout)),
                last_activity: Mutex::new(now),
                ticket,
                socket,
                transferred: AtomicU64::new(0),
                active: AtomicUsize::new(0),
                connections: AtomicUsize::new(0),
                canceled: AtomicBool::new(false),
            }),
        );
        tracing::info!(ticket = %uuid, "image ticket added");
        Ok(())
    }

    fn entry(&self, uuid: &str) -> Result<Arc<TicketEntry>, TransferError> {
        self.tickets
            .lock()
            .expect("tickets")
            .get(uuid)
            .cloned()
            .ok_or_else(|| TransferError::NoTicket(uuid.to_string()))
    }

    pub fn extend_ticket(&self, uuid: &str, timeout: u64) -> Result<(), TransferError> {
        let e = self.entry(uuid)?;
        *e.expires.lock().expect("ticket") = self.clock.now() + Duration::from_secs(timeout);
        Ok(())
    }

    /// The ticket's state as `Host.get_image_ticket` reports it.
    pub fn ticket_status(&self, uuid: &str) -> Result<Value, TransferError> {
        let e = self.entry(uuid)?;
        let now = self.clock.now();
        let active = e.active.load(Ordering::SeqCst);
        let expires = *e.expires.lock().expect("ticket");
        let idle = if active > 0 {
            Duration::ZERO
        } else {
            now.saturating_sub(*e.last_activity.lock().expect("ticket"))
        };
        Ok(json!({
            "uuid": e.ticket.uuid,
            "size": e.ticket.size,
            "url": e.ticket.url,
            "ops": e.ticket.ops,
            "timeout": expires.saturating_sub(now).as_secs(),
            "transfer_id": e.ticket.transfer_id,
            "active": active > 0,
            "connections": e.connections.load(Ordering::SeqCst),
            "transferred": e.transferred.load(Ordering::Relaxed),
            "idle_time": idle.as_secs(),
            "canceled": e.canceled(),
        }))
    }

    /// Refuses new requests under the ticket, waits for those in flight, then forgets it.
    /// Removing a missing ticket succeeds (the engine's cleanup may repeat).
    pub async fn remove_ticket(&self, uuid: &str, wait: Duration) -> Result<(), TransferError> {
        let e = match self.entry(uuid) {
            Ok(e) => e,
            Err(_) => return Ok(()),
        };
        e.canceled.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + wait;
        while e.active.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return Err(TransferError::Busy {
                    uuid: uuid.to_string(),
                    active: e.active.load(Ordering::SeqCst),
                    secs: wait.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.tickets.lock().expect("tickets").remove(uuid);
        tracing::info!(ticket = %uuid, transferred = e.transferred.load(Ordering::Relaxed), "image ticket removed");
        Ok(())
    }

    /// Starts a request under ticket `uuid` for `op`, or says why not.
    pub fn authorize(&self, uuid: &str, op: TicketOp) -> Result<Operation, TransferError> {
        let e = self.entry(uuid)?;
        if e.canceled() {
            return Err(TransferError::Canceled(uuid.to_string()));
        }
        let now = self.clock.now();
        if now >= *e.expires.lock().expect("ticket") {
            return Err(TransferError::Expired(uuid.to_string()));
        }
        if !e.may(op) {
            return Err(TransferError::Forbidden {
                uuid: uuid.to_string(),
                op,
            });
        }
        e.active.fetch_add(1, Ordering::SeqCst);
        // Re-check after counting, so a concurrent remove either sees us or we see it.
        if e.canceled() {
            e.active.fetch_sub(1, Ordering::SeqCst);
            return Err(TransferError::Canceled(uuid.to_string()));
        }
        *e.last_activity.lock().expect("ticket") = now;
        Ok(Operation {
            entry: e,
            clock: self.clock.clone(),
        })
    }

    /// Counts a connection that started using `entry`.
    pub fn connection(&self, entry: &Arc<TicketEntry>) -> ConnectionGuard {
        entry.connections.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard(entry.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxvirt_lease::SimClock;

    fn ticket(uuid: &str, ops: Vec<TicketOp>) -> Ticket {
        Ticket {
            uuid: uuid.into(),
            size: 1 << 20,
            url: "nbd:unix:/run/x.sock".into(),
            ops,
            timeout: 300,
            sparse: true,
            dirty: false,
            transfer_id: None,
            filename: None,
            inactivity_timeout: None,
        }
    }

    #[test]
    fn tickets_authorize_their_ops_until_they_expire() {
        let clock = SimClock::new(Duration::from_secs(100));
        let svc = ImageService::new(Path::new("/nonexistent"), Arc::new(clock.clone()));
        svc.add_ticket(ticket("t-1", vec![TicketOp::Read])).unwrap();
        svc.add_ticket(ticket("t-2", vec![TicketOp::Write])).unwrap();
        assert!(svc.authorize("t-1", TicketOp::Read).is_ok());
        assert!(matches!(
            svc.authorize("t-1", TicketOp::Write),
            Err(TransferError::Forbidden { .. })
        ));
        // Write implies read, as in ovirt-imageio.
        assert!(svc.authorize("t-2", TicketOp::Read).is_ok());
        assert!(matches!(
            svc.authorize("nope", TicketOp::Read),
            Err(TransferError::NoTicket(_))
        ));
        clock.advance(Duration::from_secs(299));
        let op = svc.authorize("t-1", TicketOp::Read).unwrap();
        assert_eq!(svc.ticket_status("t-1").unwrap()["active"], true);
        assert_eq!(svc.ticket_status("t-1").unwrap()["idle_time"], 0);
        drop(op);
        clock.advance(Duration::from_secs(1));
        assert!(matches!(
            svc.authorize("t-1", TicketOp::Read),
            Err(TransferError::Expired(_))
        ));
        let st = svc.ticket_status("t-1").unwrap();
        assert_eq!(st["idle_time"], 1);
        assert_eq!(st["timeout"], 0);
        svc.extend_ticket("t-1", 60).unwrap();
        assert!(svc.authorize("t-1", TicketOp::Read).is_ok());
    }

    #[test]
    fn bad_tickets_are_refused_and_an_identical_retry_is_accepted() {
        let svc = ImageService::new(Path::new("/nonexistent"), Arc::new(SimClock::default()));
        assert!(matches!(
            svc.add_ticket(ticket("../etc", vec![TicketOp::Read])),
            Err(TransferError::BadTicketId(_))
        ));
        let mut t = ticket("t-3", vec![TicketOp::Read]);
        t.url = "file:///etc/passwd".into();
        assert!(matches!(svc.add_ticket(t), Err(TransferError::BadUrl { .. })));
        assert!(matches!(
            svc.add_ticket(ticket("t-4", vec![])),
            Err(TransferError::NoOps { .. })
        ));
        svc.add_ticket(ticket("t-5", vec![TicketOp::Read])).unwrap();
        svc.add_ticket(ticket("t-5", vec![TicketOp::Read])).unwrap();
        assert!(matches!(
            svc.add_ticket(ticket("t-5", vec![TicketOp::Write])),
            Err(TransferError::Exists(_))
        ));
        assert_eq!(
            nbd_socket("nbd:unix:/a/b.sock:exportname=x"),
            Some("/a/b.sock".into())
        );
        assert_eq!(nbd_socket("nbd:unix:rel.sock"), None);
    }

    #[tokio::test]
    async fn removing_a_ticket_refuses_new_requests_and_waits_for_those_in_flight() {
        let svc = Arc::new(ImageService::new(
            Path::new("/nonexistent"),
            Arc::new(SimClock::default()),
        ));
        svc.add_ticket(ticket("t-6", vec![TicketOp::Write])).unwrap();
        let op = svc.authorize("t-6", TicketOp::Write).unwrap();
        let remover = {
            let svc = svc.clone();
            tokio::spawn(async move { svc.remove_ticket("t-6", Duration::from_secs(20)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !remover.is_finished(),
            "removal must wait for the request in flight"
        );
        assert!(matches!(
            svc.authorize("t-6", TicketOp::Read),
            Err(TransferError::Canceled(_))
        ));
        drop(op);
        remover.await.unwrap().unwrap();
        assert!(matches!(
            svc.ticket_status("t-6"),
            Err(TransferError::NoTicket(_))
        ));
        // A request that never ends makes removal report it instead of hanging.
        svc.add_ticket(ticket("t-7", vec![TicketOp::Read])).unwrap();
        let _stuck = svc.authorize("t-7", TicketOp::Read).unwrap();
        let e = svc
            .remove_ticket("t-7", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, TransferError::Busy { active: 1, .. }), "{e}");
        // Removing what is not there is fine (cleanup repeats).
        svc.remove_ticket("t-6", Duration::ZERO).await.unwrap();
    }
}
