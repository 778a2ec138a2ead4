//! Power management: a host's optional fence agent and fencing through it.
//!
//! A fence agent is a command (program and arguments, stored in `hosts.fence_agent`) that acts
//! on the host's power, as oVirt's fence agents (`fence_ipmilan`, …): the engine runs it with
//! the action appended as the last argument and `action=<action>` on its standard input.
//! Actions: `on`, `off`, `status`. Exit status: 0 success (for `status`: powered on), 2 for
//! `status`: powered off, anything else: failure.
//!
//! Fencing (`off`, then `status` until it reports off) is what the HA loop does to an
//! unreachable host whose VM leases are not free yet (see [`crate::ha`]). It only makes the
//! host stop for sure; its leases still expire on their own timeline (8N + M after its last
//! renewal), so fencing never lets anyone take a lease early — it turns "may be running for
//! ever" (a node cut from the engine but not from storage) into "dead within 8N + M".
//!
//! A fenced host is recorded `down` with the reason; an admin brings it back (`on`, then
//! activation).

use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::app::App;
use crate::commands::{CommandError, Commands};
use crate::db::sql::{Arg, Sql};
use crate::model::{HostStatus, HostUuid, NewEvent, Severity};

/// How long one agent run may take.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceAgent {
    /// The program (an absolute path) and its arguments.
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    On,
    Off,
    Status,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::On => "on",
            PowerAction::Off => "off",
            PowerAction::Status => "status",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerStatus {
    On,
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("fence agent {program}: cannot run it")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fence agent {program} {action} did not finish within {timeout:?}")]
    Timeout {
        program: String,
        action: &'static str,
        timeout: Duration,
    },
    #[error("fence agent {program} {action} failed with status {status}: {stderr}")]
    Failed {
        program: String,
        action: &'static str,
        status: i32,
        stderr: String,
    },
}

impl FenceAgent {
    /// Checks the command names an executable program by absolute path.
    pub fn validate(&self) -> Result<(), CommandError> {
        let Some(program) = self.command.first() else {
            return Err(CommandError::invalid("a fence agent needs a command"));
        };
        let p = std::path::Path::new(program);
        if !p.is_absolute() {
            return Err(CommandError::invalid(format!(
                "fence agent {program:?} must be an absolute path"
            )));
        }
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(p) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
            _ => Err(CommandError::invalid(format!(
                "fence agent {program} is not an executable file"
            ))),
        }
    }

    /// Runs the agent once.
    pub async fn run(&self, action: PowerAction, timeout: Duration) -> Result<PowerStatus, FenceError> {
        let program = self.command[0].clone();
        let mut child = tokio::process::Command::new(&program)
            .args(&self.command[1..])
            .arg(action.as_str())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| FenceError::Spawn {
                program: program.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin
                .write_all(format!("action={}\n", action.as_str()).as_bytes())
                .await;
        }
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| FenceError::Timeout {
                program: program.clone(),
                action: action.as_str(),
                timeout,
            })?
            .map_err(|source| FenceError::Spawn {
                program: program.clone(),
                source,
            })?;
        let code = out.status.code().unwrap_or(-1);
        match (action, code) {
            (_, 0) if action != PowerAction::Off => Ok(PowerStatus::On),
            (PowerAction::Off, 0) => Ok(PowerStatus::Off),
            (PowerAction::Status, 2) => Ok(PowerStatus::Off),
            _ => Err(FenceError::Failed {
                program,
                action: action.as_str(),
                status: code,
                stderr: String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .chars()
                    .take(500)
                    .collect(),
            }),
        }
    }
}

/// The host's fence agent, if it has one.
pub async fn agent_of(app: &App, host: HostUuid) -> Result<Option<FenceAgent>, CommandError> {
    let mut tx = app.db.begin().await?;
    let mut q = Sql::new("SELECT fence_agent FROM hosts WHERE id = ");
    q.arg(host.to_string());
    let row = tx.ctx().opt(&q).await?;
    tx.commit().await?;
    let Some(row) = row else {
        return Err(CommandError::not_found("host", host));
    };
    let text: Option<String> =
        sqlx::Row::try_get(&row, "fence_agent").map_err(crate::db::DbError::sql("read fence agent"))?;
    match text {
        None => Ok(None),
        Some(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| CommandError::Conflict(format!("host {host} has an unreadable fence agent: {e}"))),
    }
}

impl Commands {
    /// Sets (or with `None` removes) a host's fence agent.
    pub async fn set_fence_agent(
        &self,
        host: HostUuid,
        agent: Option<FenceAgent>,
    ) -> Result<(), CommandError> {
        self.app.host(host).await?;
        if let Some(a) = &agent {
            a.validate()?;
        }
        let text = agent
            .as_ref()
            .map(|a| serde_json::to_string(a).expect("a fence agent serializes"));
        let mut tx = self.app.db.begin().await?;
        let mut q = Sql::new("UPDATE hosts SET fence_agent = ");
        q.arg(Arg::Text(text)).push(" WHERE id = ").arg(host.to_string());
        tx.ctx().exec(&q).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Powers the host off through its agent and waits until the agent reports it off; the
    /// host is then recorded `down`.
    pub async fn fence_host(&self, host: HostUuid) -> Result<(), CommandError> {
        let h = self.app.host(host).await?;
        let agent = agent_of(&self.app, host)
            .await?
            .ok_or_else(|| CommandError::Conflict(format!("host {} has no fence agent", h.name)))?;
        let fail = |e: FenceError| CommandError::Conflict(e.to_string());
        tracing::warn!(host = %h.name, "fencing: powering the host off through its agent");
        agent.run(PowerAction::Off, AGENT_TIMEOUT).await.map_err(fail)?;
        let start = std::time::Instant::now();
        loop {
            match agent.run(PowerAction::Status, AGENT_TIMEOUT).await {
                Ok(PowerStatus::Off) => break,
                Ok(PowerStatus::On) | Err(_) if start.elapsed() < AGENT_TIMEOUT => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Ok(PowerStatus::On) => {
                    return Err(CommandError::Conflict(format!(
                        "host {} is still powered on after its fence agent's off",
                        h.name
                    )))
                }
                Err(e) => return Err(fail(e)),
            }
        }
        let _ = self
            .app
            .db
            .host_set_status(
                host,
                &[],
                HostStatus::Down,
                Some("fenced: powered off by its fence agent"),
            )
            .await;
        let mut e = NewEvent::new(
            Severity::Warning,
            9020,
            format!("Host {} was fenced (powered off by its fence agent)", h.name),
        );
        e.host_id = Some(host);
        if let Err(err) = self.app.db.event_add(&e).await {
            tracing::warn!(error = %err, "cannot record event");
        }
        tracing::warn!(host = %h.name, "host fenced");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &std::path::Path, body: &str) -> FenceAgent {
        let p = dir.join("agent.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        FenceAgent {
            command: vec![
                p.display().to_string(),
                "--state".into(),
                dir.join("power").display().to_string(),
            ],
        }
    }

    #[tokio::test]
    async fn a_script_agent_powers_off_and_reports_status() {
        let dir = tempfile::tempdir().unwrap();
        // The agent keeps the power state in a file; it reads the action from stdin too.
        let a = script(
            dir.path(),
            r#"state="$2"; read line; [ "$line" = "action=$3" ] || exit 9
case "$3" in
  on) echo on > "$state";;
  off) echo off > "$state";;
  status) [ "$(cat "$state" 2>/dev/null)" = off ] && exit 2; exit 0;;
  *) exit 1;;
esac"#,
        );
        a.validate().unwrap();
        let t = Duration::from_secs(10);
        assert_eq!(a.run(PowerAction::Status, t).await.unwrap(), PowerStatus::On);
        assert_eq!(a.run(PowerAction::Off, t).await.unwrap(), PowerStatus::Off);
        assert_eq!(a.run(PowerAction::Status, t).await.unwrap(), PowerStatus::Off);
        assert_eq!(a.run(PowerAction::On, t).await.unwrap(), PowerStatus::On);
        assert_eq!(a.run(PowerAction::Status, t).await.unwrap(), PowerStatus::On);
    }

    #[tokio::test]
    async fn failures_and_bad_agents_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let a = script(dir.path(), "echo 'no such outlet' >&2; exit 1");
        let e = a
            .run(PowerAction::Off, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no such outlet"), "{e}");
        let slow = script(dir.path(), "sleep 5");
        let e = slow
            .run(PowerAction::Status, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, FenceError::Timeout { .. }), "{e}");
        let rel = FenceAgent {
            command: vec!["agent.sh".into()],
        };
        assert!(rel.validate().is_err());
        let missing = FenceAgent {
            command: vec!["/nonexistent/agent".into()],
        };
        assert!(missing.validate().is_err());
        assert!(FenceAgent { command: vec![] }.validate().is_err());
    }
}
