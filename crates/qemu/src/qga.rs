//! The QEMU guest agent protocol, spoken to an agent inside the guest over the virtio-serial
//! channel the VM spec adds (see [`crate::cmdline::GUEST_AGENT_PORT`]).
//!
//! Unlike QMP there is no greeting and no request id: one request, one reply, in order. Since an
//! earlier client may have left a reply unread, every session starts with `guest-sync` carrying
//! a fresh random id and discards lines until the echo of that id arrives. Every call is
//! bounded by a timeout: an agent that is not running simply never answers.
//!
//! Architecture invariant: a missing or hung agent costs at most the timeout and never blocks
//! the VM's own operations.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("cannot reach the guest agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent on {path} did not answer {command} within {timeout:?}")]
    Timeout {
        path: PathBuf,
        command: String,
        timeout: Duration,
    },
    #[error("guest agent I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent on {path} closed the channel during {command}")]
    Closed { path: PathBuf, command: String },
    #[error("guest agent command {command} failed: {desc}")]
    Command { command: String, desc: String },
}

/// A synchronized session with the guest agent.
pub struct GuestAgent {
    path: PathBuf,
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    writer: tokio::net::unix::OwnedWriteHalf,
    timeout: Duration,
}

impl GuestAgent {
    /// Connects and synchronizes; fails with `Timeout` when no agent answers.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<GuestAgent, QgaError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QgaError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (rd, writer) = stream.into_split();
        let mut ga = GuestAgent {
            path: path.to_path_buf(),
            lines: BufReader::new(rd).lines(),
            writer,
            timeout,
        };
        let id = sync_id();
        ga.send("guest-sync", serde_json::json!({ "id": id })).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = ga.read_reply("guest-sync", deadline).await?;
            if v.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(ga);
            }
            // A stale reply to an earlier client's request: skip it.
        }
    }

    /// `guest-ping`.
    pub async fn ping(&mut self) -> Result<(), QgaError> {
        self.call("guest-ping", Value::Null).await.map(drop)
    }

    /// Freezes the guest's file systems; returns how many were frozen.
    pub async fn fsfreeze_freeze(&mut self) -> Result<u64, QgaError> {
        let v = self.call("guest-fsfreeze-freeze", Value::Null).await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// Thaws them; returns how many were thawed.
    pub async fn fsfreeze_thaw(&mut self) -> Result<u64, QgaError> {
        let v = self.call("guest-fsfreeze-thaw", Value::Null).await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `frozen` or `thawed`.
    pub async fn fsfreeze_status(&mut self) -> Result<String, QgaError> {
        let v = self.call("guest-fsfreeze-status", Value::Null).await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Any command; returns its `return` value.
    pub async fn call(&mut self, command: &str, args: Value) -> Result<Value, QgaError> {
        self.send(command, args).await?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let v = self.read_reply(command, deadline).await?;
        if let Some(e) = v.get("error") {
            return Err(QgaError::Command {
                command: command.into(),
                desc: e["desc"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }

    async fn send(&mut self, command: &str, args: Value) -> Result<(), QgaError> {
        let mut msg = serde_json::json!({ "execute": command });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let io = |source| QgaError::Io {
            path: self.path.clone(),
            source,
        };
        self.writer.write_all(line.as_bytes()).await.map_err(io)?;
        Ok(())
    }

    async fn read_reply(&mut self, command: &str, deadline: tokio::time::Instant) -> Result<Value, QgaError> {
        loop {
            let line = match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
                Err(_) => {
                    return Err(QgaError::Timeout {
                        path: self.path.clone(),
                        command: command.into(),
                        timeout: self.timeout,
                    })
                }
                Ok(Err(source)) => {
                    return Err(QgaError::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
                Ok(Ok(None)) => {
                    return Err(QgaError::Closed {
                        path: self.path.clone(),
                        command: command.into(),
                    })
                }
                Ok(Ok(Some(l))) => l,
            };
            // guest-sync-delimited replies start with 0xFF; agents may also emit blank lines.
            let line = line.trim_start_matches('\u{FF}').trim();
            if line.is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(line) {
                Ok(v) => return Ok(v),
                Err(_) => tracing::debug!(qga = %self.path.display(), line, "guest agent noise"),
            }
        }
    }
}

/// A sync id nobody else would have sent: time and pid mixed, kept within JSON's safe integers.
fn sync_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    (t ^ (u64::from(std::process::id()) << 20)) & ((1 << 52) - 1)
}
