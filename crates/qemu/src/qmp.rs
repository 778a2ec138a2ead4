//! QMP, the QEMU Machine Protocol: an async client over the VM's control socket.
//!
//! One [`Qmp`] is one connection: [`Qmp::connect`] reads the greeting, negotiates capabilities
//! and starts a reader task that routes replies to their callers by `id` and events, in order,
//! into the [`EventStream`] returned beside it. The stream ends when QEMU closes the socket
//! (it quit or died, or another client took the socket), which is how callers learn that the
//! connection is gone. Reconnecting after a node restart is a new [`Qmp::connect`] to the same
//! path: QEMU's `server=on,wait=off` socket accepts a new client once the old one is gone.
//!
//! Commands are typed: each implements [`QmpCommand`] (name, arguments, reply type); anything
//! else goes through [`Qmp::execute_raw`]. Events are parsed into [`Event`]; unknown events are
//! kept as [`Event::Other`] rather than dropped.
//!
//! We write our own instead of using the `qapi` crates: their types are generated from a newer
//! QEMU schema than the 7.2 we run, and a required field missing from one reply would fail the
//! whole call. Here every reply field we do not need is simply not declared.
//!
//! Architecture invariant: the client keeps no VM state; it is a pipe with types. Who reacts to
//! an event is the node's business.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP protocol error on {path}: {detail}")]
    Protocol { path: PathBuf, detail: String },
    /// QEMU answered the command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP connection {path} closed before {command} was answered")]
    Closed { path: PathBuf, command: String },
    #[error("reply to QMP command {command} does not match its type: {detail}")]
    BadReply { command: String, detail: String },
    /// QEMU did not answer in time: its monitor is stuck (a stopped process, a hung
    /// storage read in the main loop). The connection stays usable: a late answer is dropped.
    #[error("QEMU on {path} did not answer QMP command {command} within {after:?}")]
    Timeout {
        path: PathBuf,
        command: String,
        after: std::time::Duration,
    },
}

impl QmpError {
    /// Whether QEMU left the command unanswered past its time limit.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// QEMU's error class (`GenericError`, `DeviceNotFound`...) when QEMU refused a command.
    pub fn class(&self) -> Option<&str> {
        match self {
            Self::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// A command with typed arguments (the struct itself, serialized) and a typed reply.
pub trait QmpCommand: Serialize {
    const NAME: &'static str;
    type Reply: DeserializeOwned;
}

/// The QEMU version from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

/// How long a command waits for QEMU's answer unless the caller says otherwise. Every
/// command we send answers at once in a healthy QEMU (long work runs as jobs that report by
/// events); this bounds what a stuck one costs the caller.
pub const DEFAULT_COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One QMP connection. Cheap to share behind an `Arc`; commands may be issued concurrently.
pub struct Qmp {
    path: PathBuf,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    version: QemuVersion,
    reader: tokio::task::JoinHandle<()>,
}

/// Events in the order QEMU sent them; `None` from [`EventStream::recv`] means the socket closed.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl EventStream {
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).finish()
    }
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<(Qmp, EventStream), QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (rd, wr) = stream.into_split();
        let mut lines = BufReader::new(rd).lines();
        let io = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let proto = |detail: String| QmpError::Protocol {
            path: path.to_path_buf(),
            detail,
        };
        let greeting = lines
            .next_line()
            .await
            .map_err(io)?
            .ok_or_else(|| proto("socket closed before the greeting".into()))?;
        let greeting: Value = serde_json::from_str(&greeting).map_err(|e| proto(format!("greeting: {e}")))?;
        let version: QemuVersion = serde_json::from_value(greeting["QMP"]["version"]["qemu"].clone())
            .map_err(|e| proto(format!("greeting without a QEMU version: {e}")))?;

        let pending: Pending = Arc::default();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(path.to_path_buf(), lines, pending.clone(), ev_tx));
        let qmp = Qmp {
            path: path.to_path_buf(),
            writer: tokio::sync::Mutex::new(wr),
            pending,
            next_id: AtomicU64::new(1),
            version,
            reader,
        };
        qmp.execute(&QmpCapabilities {}).await?;
        tracing::debug!(qmp = %path.display(), ?version, "QMP connected");
        Ok((qmp, EventStream { rx: ev_rx }))
    }

    pub fn version(&self) -> QemuVersion {
        self.version
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn execute<C: QmpCommand>(&self, cmd: &C) -> Result<C::Reply, QmpError> {
        self.execute_within(cmd, DEFAULT_COMMAND_TIMEOUT).await
    }

    /// [`Qmp::execute`] with its own time limit.
    pub async fn execute_within<C: QmpCommand>(
        &self,
        cmd: &C,
        limit: std::time::Duration,
    ) -> Result<C::Reply, QmpError> {
        let args = serde_json::to_value(cmd).map_err(|e| QmpError::BadReply {
            command: C::NAME.into(),
            detail: format!("arguments do not serialize: {e}"),
        })?;
        let v = self.execute_raw_within(C::NAME, args, limit).await?;
        // Commands without a return value answer `{}`; unit replies accept it.
        let v = match v {
            Value::Object(ref m) if m.is_empty() && is_unit::<C::Reply>() => Value::Null,
            v => v,
        };
        serde_json::from_value(v).map_err(|e| QmpError::BadReply {
            command: C::NAME.into(),
            detail: e.to_string(),
        })
    }

    /// Runs any command; `args` may be `null` or an object.
    pub async fn execute_raw(&self, command: &str, args: Value) -> Result<Value, QmpError> {
        self.execute_raw_within(command, args, DEFAULT_COMMAND_TIMEOUT)
            .await
    }

    /// [`Qmp::execute_raw`] with its own time limit.
    pub async fn execute_raw_within(
        &self,
        command: &str,
        args: Value,
        limit: std::time::Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(limit, self.send_and_wait(id, command, args)).await {
            Ok(r) => r,
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(QmpError::Timeout {
                    path: self.path.clone(),
                    command: command.into(),
                    after: limit,
                })
            }
        }
    }

    async fn send_and_wait(&self, id: u64, command: &str, args: Value) -> Result<Value, QmpError> {
        let mut msg = serde_json::json!({ "execute": command, "id": id });
        match args {
            Value::Null => {}
            Value::Object(m) if m.is_empty() => {}
            a => msg["arguments"] = a,
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        tracing::trace!(qmp = %self.path.display(), %line, "QMP send");
        let write = async {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await?;
            w.flush().await
        };
        if let Err(source) = write.await {
            self.pending.lock().unwrap().remove(&id);
            return Err(if is_disconnect(&source) {
                QmpError::Closed {
                    path: self.path.clone(),
                    command: command.into(),
                }
            } else {
                QmpError::Io {
                    path: self.path.clone(),
                    source,
                }
            });
        }
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err((class, desc))) => Err(QmpError::Command {
                command: command.into(),
                class,
                desc,
            }),
            Err(_) => Err(QmpError::Closed {
                path: self.path.clone(),
                command: command.into(),
            }),
        }
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::NotConnected
    )
}

fn is_unit<T: DeserializeOwned>() -> bool {
    serde_json::from_value::<T>(Value::Null).is_ok()
}

async fn read_loop(
    path: PathBuf,
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: mpsc::UnboundedSender<Event>,
) {
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(qmp = %path.display(), error = %e, "QMP read failed");
                break;
            }
        };
        let msg: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(qmp = %path.display(), error = %e, %line, "QMP sent invalid JSON");
                continue;
            }
        };
        tracing::trace!(qmp = %path.display(), %line, "QMP recv");
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let data = msg.get("data").cloned().unwrap_or(Value::Null);
            // A receiver that went away only means nobody listens for events any more.
            let _ = events.send(Event::parse(name, data));
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::warn!(qmp = %path.display(), %line, "QMP reply without our id");
            continue;
        };
        let Some(tx) = pending.lock().unwrap().remove(&id) else {
            continue;
        };
        let res = if let Some(r) = msg.get("return") {
            Ok(r.clone())
        } else {
            let e = msg.get("error").cloned().unwrap_or(Value::Null);
            Err((
                e["class"].as_str().unwrap_or("Unknown").to_string(),
                e["desc"].as_str().unwrap_or("").to_string(),
            ))
        };
        let _ = tx.send(res);
    }
    // Dropping the senders wakes every waiting caller with `Closed`.
    pending.lock().unwrap().clear();
}

/// An asynchronous QMP event. Field names follow QEMU's schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// QEMU is about to exit or, with `-no-shutdown`, stop. `reason` is e.g. `guest-shutdown`,
    /// `host-qmp-quit`, `host-signal`, `guest-reset`.
    Shutdown {
        guest: bool,
        reason: String,
    },
    Reset {
        guest: bool,
        reason: String,
    },
    /// The guest was asked (ACPI) to power down.
    Powerdown,
    Stop,
    Resume,
    BlockJobCompleted(BlockJobInfo),
    BlockJobCancelled(BlockJobInfo),
    /// A mirror or active commit has converged and waits for `job-complete`.
    BlockJobReady(BlockJobInfo),
    BlockJobError {
        device: String,
        operation: String,
        action: String,
    },
    JobStatusChange {
        id: String,
        status: String,
    },
    BlockWriteThreshold {
        node_name: String,
        amount_exceeded: u64,
        write_threshold: u64,
    },
    BlockIoError {
        device: String,
        node_name: Option<String>,
        operation: String,
        action: String,
        nospace: bool,
        reason: String,
    },
    /// Migration status changes (`setup`, `active`, `completed`, `failed`, `cancelled`...).
    Migration {
        status: String,
    },
    MigrationPass {
        pass: u64,
    },
    BalloonChange {
        actual: u64,
    },
    Other {
        name: String,
        data: Value,
    },
}

/// The fields of BLOCK_JOB_COMPLETED / CANCELLED / READY we use.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobInfo {
    /// The job id (QEMU calls it `device` for historical reasons).
    pub device: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub len: u64,
    pub offset: u64,
    #[serde(default)]
    pub error: Option<String>,
}

impl Event {
    pub fn parse(name: &str, data: Value) -> Event {
        #[derive(Deserialize)]
        struct GuestReason {
            guest: bool,
            reason: String,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "kebab-case")]
        struct Threshold {
            node_name: String,
            amount_exceeded: u64,
            write_threshold: u64,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "kebab-case")]
        struct IoError {
            device: String,
            #[serde(default)]
            node_name: Option<String>,
            operation: String,
            action: String,
            #[serde(default)]
            nospace: bool,
            #[serde(default)]
            reason: String,
        }
        #[derive(Deserialize)]
        struct JobError {
            device: String,
            operation: String,
            action: String,
        }
        #[derive(Deserialize)]
        struct JobStatus {
            id: String,
            status: String,
        }
        #[derive(Deserialize)]
        struct Status {
            status: String,
        }
        #[derive(Deserialize)]
        struct Pass {
            pass: u64,
        }
        #[derive(Deserialize)]
        struct Actual {
            actual: u64,
        }
        fn de<T: DeserializeOwned>(d: &Value) -> Option<T> {
            serde_json::from_value(d.clone()).ok()
        }
        let parsed = match name {
            "SHUTDOWN" => de::<GuestReason>(&data).map(|g| Event::Shutdown {
                guest: g.guest,
                reason: g.reason,
            }),
            "RESET" => de::<GuestReason>(&data).map(|g| Event::Reset {
                guest: g.guest,
                reason: g.reason,
            }),
            "POWERDOWN" => Some(Event::Powerdown),
            "STOP" => Some(Event::Stop),
            "RESUME" => Some(Event::Resume),
            "BLOCK_JOB_COMPLETED" => de(&data).map(Event::BlockJobCompleted),
            "BLOCK_JOB_CANCELLED" => de(&data).map(Event::BlockJobCancelled),
            "BLOCK_JOB_READY" => de(&data).map(Event::BlockJobReady),
            "BLOCK_JOB_ERROR" => de::<JobError>(&data).map(|j| Event::BlockJobError {
                device: j.device,
                operation: j.operation,
                action: j.action,
            }),
            "JOB_STATUS_CHANGE" => de::<JobStatus>(&data).map(|j| Event::JobStatusChange {
                id: j.id,
                status: j.status,
            }),
            "BLOCK_WRITE_THRESHOLD" => de::<Threshold>(&data).map(|t| Event::BlockWriteThreshold {
                node_name: t.node_name,
                amount_exceeded: t.amount_exceeded,
                write_threshold: t.write_threshold,
            }),
            "BLOCK_IO_ERROR" => de::<IoError>(&data).map(|e| Event::BlockIoError {
                device: e.device,
                node_name: e.node_name,
                operation: e.operation,
                action: e.action,
                nospace: e.nospace,
                reason: e.reason,
            }),
            "MIGRATION" => de::<Status>(&data).map(|s| Event::Migration { status: s.status }),
            "MIGRATION_PASS" => de::<Pass>(&data).map(|p| Event::MigrationPass { pass: p.pass }),
            "BALLOON_CHANGE" => de::<Actual>(&data).map(|a| Event::BalloonChange { actual: a.actual }),
            _ => None,
        };
        parsed.unwrap_or_else(|| Event::Other {
            name: name.to_string(),
            data,
        })
    }
}

// ---- Typed commands -------------------------------------------------------------------------

macro_rules! command {
    ($(#[$m:meta])* $ty:ident $({ $($(#[$fm:meta])* $f:ident : $ft:ty),* $(,)? })? => $name:literal, $reply:ty) => {
        $(#[$m])*
        #[derive(Debug, Clone, Serialize)]
        #[serde(rename_all = "kebab-case")]
        pub struct $ty { $($($(#[$fm])* pub $f: $ft),*)? }
        impl QmpCommand for $ty {
            const NAME: &'static str = $name;
            type Reply = $reply;
        }
    };
}

command!(QmpCapabilities => "qmp_capabilities", ());
command!(QueryStatus => "query-status", StatusInfo);
command!(Stop => "stop", ());
command!(Cont => "cont", ());
command!(
    /// ACPI power button.
    SystemPowerdown => "system_powerdown", ()
);
command!(SystemReset => "system_reset", ());
command!(Quit => "quit", ());
command!(QueryCpusFast => "query-cpus-fast", Vec<CpuInfoFast>);
command!(QueryHotpluggableCpus => "query-hotpluggable-cpus", Vec<HotpluggableCpu>);
command!(QueryMemoryDevices => "query-memory-devices", Vec<MemoryDevice>);
command!(QueryBlockstats => "query-blockstats", Vec<BlockStatsEntry>);
command!(QueryBalloon => "query-balloon", BalloonInfo);
command!(
    /// Sets the balloon's target guest memory size in bytes.
    Balloon { value: u64 } => "balloon", ()
);
command!(QueryNamedBlockNodes { flat: bool } => "query-named-block-nodes", Vec<BlockNodeInfo>);
command!(
    /// Adds a block node; the argument is the node's full description.
    BlockdevAdd {
        #[serde(flatten)]
        options: Value,
    } => "blockdev-add", ()
);
command!(BlockdevDel { node_name: String } => "blockdev-del", ());
command!(
    /// Opens a removable drive's tray (`force`: even when the guest has locked it).
    BlockdevOpenTray { id: String, force: bool } => "blockdev-open-tray", ()
);
command!(
    /// Takes the medium out of a drive whose tray is open (nothing to take: no error).
    BlockdevRemoveMedium { id: String } => "blockdev-remove-medium", ()
);
command!(
    /// Puts the block node `node_name` into an empty drive whose tray is open.
    BlockdevInsertMedium { id: String, node_name: String } => "blockdev-insert-medium", ()
);
command!(BlockdevCloseTray { id: String } => "blockdev-close-tray", ());
command!(
    /// Makes `overlay` (opened, with no backing) the new active layer above `node`.
    BlockdevSnapshot { node: String, overlay: String } => "blockdev-snapshot", ()
);
command!(
    /// Commits `top_node` (or the active layer when `top_node` is the active one) into `base_node`.
    BlockCommit {
        job_id: String,
        device: String,
        top_node: String,
        base_node: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        backing_file: Option<String>,
        auto_finalize: bool,
        auto_dismiss: bool,
    } => "block-commit", ()
);
command!(
    /// Runs the actions (`{"type": ..., "data": ...}`) atomically: all or none.
    Transaction { actions: Vec<Value> } => "transaction", ()
);
command!(
    /// Copies `device`'s data onto `target` (opened already) and keeps the two in step until
    /// `job-complete` switches the device to `target` (or `job-cancel` leaves it on `device`).
    /// `sync` "top": only the active layer's data (the target's backing holds the rest);
    /// `copy_mode` "write-blocking": a guest write completes once on both, so the job
    /// converges however fast the guest writes.
    BlockdevMirror {
        job_id: String,
        device: String,
        target: String,
        sync: String,
        copy_mode: String,
        auto_finalize: bool,
        auto_dismiss: bool,
    } => "blockdev-mirror", ()
);
command!(JobComplete { id: String } => "job-complete", ());
command!(JobCancel { id: String } => "job-cancel", ());
command!(JobDismiss { id: String } => "job-dismiss", ());
command!(JobFinalize { id: String } => "job-finalize", ());
command!(QueryJobs => "query-jobs", Vec<JobInfo>);
command!(QueryBlock => "query-block", Vec<BlockInfo>);
command!(
    /// Throttles a disk device's I/O (bytes and operations per second; 0: unlimited). A
    /// total excludes its read and write parts.
    BlockSetIoThrottle {
        id: String,
        bps: u64,
        #[serde(rename = "bps_rd")]
        bps_rd: u64,
        #[serde(rename = "bps_wr")]
        bps_wr: u64,
        iops: u64,
        #[serde(rename = "iops_rd")]
        iops_rd: u64,
        #[serde(rename = "iops_wr")]
        iops_wr: u64,
    } => "block_set_io_throttle", ()
);
command!(
    /// Grows the virtual size of the image behind a block node (a qcow2 header, a raw file).
    BlockResize { node_name: String, size: u64 } => "block_resize", ()
);
command!(
    /// Arms a one-shot BLOCK_WRITE_THRESHOLD event (0 disarms).
    BlockSetWriteThreshold { node_name: String, write_threshold: u64 } => "block-set-write-threshold", ()
);
command!(MigrateSetCapabilities { capabilities: Vec<MigrationCapability> } => "migrate-set-capabilities", ());
command!(
    MigrateSetParameters {
        #[serde(skip_serializing_if = "Option::is_none")]
        downtime_limit: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        max_bandwidth: Option<u64>,
        /// The id of a TLS credentials object: the stream is encrypted ("" turns it off).
        #[serde(skip_serializing_if = "Option::is_none")]
        tls_creds: Option<String>,
        /// The name the destination's certificate must carry (default: the URI's host).
        #[serde(skip_serializing_if = "Option::is_none")]
        tls_hostname: Option<String>,
    } => "migrate-set-parameters", ()
);
command!(QueryMigrateParameters => "query-migrate-parameters", MigrationParameters);
command!(
    /// A `tls-creds-x509` object reading `dir`'s `ca-cert.pem` and, for `endpoint` "server",
    /// `server-cert.pem`/`server-key.pem`, for "client" `client-cert.pem`/`client-key.pem`.
    ObjectAddTlsCreds {
        qom_type: String,
        id: String,
        dir: String,
        endpoint: String,
        verify_peer: bool,
    } => "object-add", ()
);
command!(ObjectDel { id: String } => "object-del", ());
command!(
    /// A display's password (VNC: only its first 8 characters count).
    SetPassword {
        protocol: String,
        password: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        display: Option<String>,
    } => "set_password", ()
);
command!(
    /// When the password stops working: `+SECONDS`, `now` or `never`.
    ExpirePassword {
        protocol: String,
        time: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        display: Option<String>,
    } => "expire_password", ()
);
command!(QueryVncServers => "query-vnc-servers", Vec<VncServer>);

/// One VNC server of `query-vnc-servers`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VncServer {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub server: Vec<VncListener>,
    #[serde(default)]
    pub clients: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VncListener {
    pub host: String,
    /// The port (or, for a UNIX socket, the path).
    pub service: String,
    pub family: String,
}

/// What `query-migrate-parameters` answers (the part we read).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    #[serde(default)]
    pub tls_creds: Option<String>,
    #[serde(default)]
    pub tls_hostname: Option<String>,
    #[serde(default)]
    pub downtime_limit: Option<u64>,
}
command!(Migrate { uri: String } => "migrate", ());
command!(MigrateIncoming { uri: String } => "migrate-incoming", ());
command!(MigrateCancel => "migrate_cancel", ());
command!(QueryMigrate => "query-migrate", MigrationInfo);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    /// `running`, `paused`, `io-error`, `inmigrate`, `postmigrate`, `shutdown`, ...
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfoFast {
    pub cpu_index: u32,
    pub thread_id: i64,
}

/// A vCPU slot: plugged when it has a `qom_path` (`/machine/peripheral/<id>` for one hot
/// plugged with an id, `/machine/unattached/…` for one the VM started with).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HotpluggableCpu {
    #[serde(rename = "type")]
    pub driver: String,
    pub vcpus_count: u32,
    pub props: std::collections::BTreeMap<String, i64>,
    #[serde(default)]
    pub qom_path: Option<String>,
}

/// A memory device (`query-memory-devices`): a DIMM has `type` `dimm` and its id and size.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemoryDevice {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: MemoryDeviceData,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemoryDeviceData {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStatsEntry {
    #[serde(default)]
    pub qdev: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
    pub stats: BlockStats,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    #[serde(default)]
    pub wr_highest_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BalloonInfo {
    /// Guest memory in bytes as the balloon reports it.
    pub actual: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockNodeInfo {
    pub node_name: String,
    pub file: String,
    pub drv: String,
    #[serde(default)]
    pub backing_file: Option<String>,
    pub ro: bool,
    #[serde(default)]
    pub write_threshold: u64,
    /// The image behind the node (its virtual size is what the guest sees of a disk's top).
    #[serde(default)]
    pub image: Option<NodeImage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NodeImage {
    pub virtual_size: u64,
}

/// A block device as `query-block` shows it: its image chain is the one QEMU has open.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockInfo {
    #[serde(default)]
    pub qdev: Option<String>,
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
    /// `ok`, `failed` or `nospace`: the device's last I/O error, for devices that stop on
    /// errors (`werror`/`rerror` `stop` or `enospc`).
    #[serde(rename = "io-status", default)]
    pub io_status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockDeviceInfo {
    pub image: ImageInfo,
    /// The device's top block node.
    #[serde(rename = "node-name", default)]
    pub node_name: Option<String>,
    /// I/O throttling in force (bytes and operations per second; 0: none).
    #[serde(default)]
    pub bps: u64,
    #[serde(default)]
    pub bps_rd: u64,
    #[serde(default)]
    pub bps_wr: u64,
    #[serde(default)]
    pub iops: u64,
    #[serde(default)]
    pub iops_rd: u64,
    #[serde(default)]
    pub iops_wr: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    #[serde(default)]
    pub backing_image: Option<Box<ImageInfo>>,
}

impl ImageInfo {
    /// The chain's files, top first.
    pub fn files(&self) -> Vec<String> {
        let mut out = vec![file_of(&self.filename)];
        let mut cur = self.backing_image.as_deref();
        while let Some(i) = cur {
            out.push(file_of(&i.filename));
            cur = i.backing_image.as_deref();
        }
        out
    }
}

/// The file under an image's `filename`: QEMU names an image whose backing was given as a
/// node (after a mirror's switch, say) by a `json:{…}` description of its options instead,
/// whose protocol layer holds the file.
fn file_of(filename: &str) -> String {
    let Some(desc) = filename.strip_prefix("json:") else {
        return filename.to_string();
    };
    let Ok(v) = serde_json::from_str::<Value>(desc) else {
        return filename.to_string();
    };
    let mut cur = &v;
    // The format layer's `file` (the protocol node), down to a `filename`.
    for _ in 0..4 {
        if let Some(f) = cur["filename"].as_str() {
            return f.to_string();
        }
        cur = &cur["file"];
    }
    filename.to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
    pub current_progress: u64,
    pub total_progress: u64,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrationCapability {
    pub capability: String,
    pub state: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    #[serde(default)]
    pub status: Option<String>,
    /// Milliseconds since the migration started (final value once completed).
    #[serde(default)]
    pub total_time: Option<u64>,
    /// Milliseconds the guest was paused at the switch-over.
    #[serde(default)]
    pub downtime: Option<u64>,
    #[serde(default)]
    pub expected_downtime: Option<u64>,
    #[serde(default)]
    pub error_desc: Option<String>,
    /// On an incoming side, where it listens (the real port when `:0` was asked).
    #[serde(default)]
    pub socket_address: Vec<SocketAddress>,
    #[serde(default)]
    pub ram: Option<MigrationRam>,
}

/// RAM transfer counters of an outgoing migration (bytes; `mbps` the current throughput).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationRam {
    #[serde(default)]
    pub transferred: u64,
    #[serde(default)]
    pub remaining: u64,
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub mbps: f64,
    #[serde(default)]
    pub dirty_pages_rate: u64,
}

impl MigrationRam {
    /// Percent done as VDSM reports it: the share of guest RAM not left to send (a dirtying
    /// guest can make it go back).
    pub fn progress(&self) -> u8 {
        if self.total == 0 {
            return 0;
        }
        let left = self.remaining.min(self.total) as u128 * 100 / self.total as u128;
        (100 - left) as u8
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SocketAddress {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_chain_s_files_are_read_through_json_filenames() {
        // As QEMU 7.2 names a top whose backing was given as a node (after a mirror's switch).
        let top = r#"json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/d/base"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "/d/top"}}"#;
        let info: BlockInfo = serde_json::from_value(json!({
            "qdev": "/machine/peripheral/disk0/virtio-backend",
            "inserted": { "node-name": "fmt-top", "image": {
                "filename": top, "backing-image": { "filename": "/d/base" } } }
        }))
        .unwrap();
        let ins = info.inserted.unwrap();
        assert_eq!(ins.image.files(), ["/d/top", "/d/base"]);
        assert_eq!(ins.node_name.as_deref(), Some("fmt-top"));
        assert_eq!(file_of("json:{not json"), "json:{not json");
        assert_eq!(file_of("/plain"), "/plain");
    }

    #[test]
    fn migration_ram_counters_parse_and_give_progress() {
        // As QEMU 7.2 answers query-migrate while active (fields trimmed).
        let info: MigrationInfo = serde_json::from_value(json!({
            "status": "active", "total-time": 812, "expected-downtime": 300,
            "ram": { "transferred": 1_048_576, "remaining": 201_326_592, "total": 268_435_456,
                     "duplicate": 16000, "normal": 256, "mbps": 16.7, "dirty-pages-rate": 12 }
        }))
        .unwrap();
        let ram = info.ram.unwrap();
        assert_eq!(
            (ram.remaining, ram.total, ram.dirty_pages_rate),
            (201_326_592, 268_435_456, 12)
        );
        assert_eq!(ram.progress(), 25);
        let done = MigrationRam {
            remaining: 0,
            total: 10,
            ..Default::default()
        };
        assert_eq!(done.progress(), 100);
        // No counters yet (setup): 0, not a division by zero.
        assert_eq!(MigrationRam::default().progress(), 0);
        // remaining above total (a guest dirtying memory right at the start) stays at 0.
        let odd = MigrationRam {
            remaining: 20,
            total: 10,
            ..Default::default()
        };
        assert_eq!(odd.progress(), 0);
    }

    #[test]
    fn known_events_parse_and_unknown_ones_are_kept() {
        assert_eq!(
            Event::parse("SHUTDOWN", json!({"guest": true, "reason": "guest-shutdown"})),
            Event::Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            }
        );
        assert_eq!(
            Event::parse(
                "BLOCK_WRITE_THRESHOLD",
                json!({"node-name": "d0l1", "amount-exceeded": 512, "write-threshold": 1024})
            ),
            Event::BlockWriteThreshold {
                node_name: "d0l1".into(),
                amount_exceeded: 512,
                write_threshold: 1024
            }
        );
        assert_eq!(
            Event::parse(
                "BLOCK_IO_ERROR",
                json!({"device": "", "node-name": "d0l0", "operation": "write",
                       "action": "stop", "nospace": true, "reason": "No space left on device"})
            ),
            Event::BlockIoError {
                device: "".into(),
                node_name: Some("d0l0".into()),
                operation: "write".into(),
                action: "stop".into(),
                nospace: true,
                reason: "No space left on device".into()
            }
        );
        match Event::parse(
            "BLOCK_JOB_READY",
            json!({"device": "j1", "type": "commit", "len": 10, "offset": 10, "speed": 0, "busy": false}),
        ) {
            Event::BlockJobReady(i) => assert_eq!((i.device.as_str(), i.len), ("j1", 10)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Event::parse("MIGRATION", json!({"status": "completed"})),
            Event::Migration {
                status: "completed".into()
            }
        );
        // Malformed data for a known name is kept rather than lost.
        assert_eq!(
            Event::parse("SHUTDOWN", json!({})),
            Event::Other {
                name: "SHUTDOWN".into(),
                data: json!({})
            }
        );
        assert!(matches!(
            Event::parse("RTC_CHANGE", json!({"offset": 1})),
            Event::Other { .. }
        ));
    }

    #[test]
    fn commands_serialize_with_qemu_names() {
        let c = BlockCommit {
            job_id: "m1".into(),
            device: "d0l2".into(),
            top_node: "d0l1".into(),
            base_node: "d0l0".into(),
            backing_file: None,
            auto_finalize: true,
            auto_dismiss: false,
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"job-id": "m1", "device": "d0l2", "top-node": "d0l1", "base-node": "d0l0",
                   "auto-finalize": true, "auto-dismiss": false})
        );
        let add = BlockdevAdd {
            options: json!({"driver": "qcow2", "node-name": "n"}),
        };
        assert_eq!(
            serde_json::to_value(&add).unwrap(),
            json!({"driver": "qcow2", "node-name": "n"})
        );
        assert_eq!(serde_json::to_value(&Stop {}).unwrap(), json!({}));
        assert!(is_unit::<()>());
        assert!(!is_unit::<StatusInfo>());
    }
}
