//! Power management: a host's optional fence agent and fencing through it.
//!
//! A fence agent is a command (program and arguments, stored in `hosts.fence_agent`) that acts
//! on the host's power, as oVirt's fence agents (`fence_ipmilan`, …): the engine runs it with
//! the action appended as the last argument and `action=<action>` on its standard input.
//! Actions: `on`, `off`, `status`. Exit status: 0 success (for `status`: powered on), 2 for
//! `status`: powered off, anything else: failure.
//!
//! Fencing (`off`, then `status` until it reports off) is what the HA loop does to an
//! unreachable host whose VM leases are not free yet (see [`crate::ha`]), and what the SPM
//! election does to an unreachable host that storage still names as the SPM
//! ([`fence_unreachable_spm`]). It only makes the
//! host stop for sure; its leases still expire on their own timeline (8N + M after its last
//! renewal), so fencing never lets anyone take a lease early — it turns "may be running for
//! ever" (a node cut from the engine but not from storage) into "dead within 8N + M".
//!
//! A fenced host is recorded `down` with the reason; an admin brings it back (`on`, then
//! activation).
//!
//! Administrators reach this through the REST API in oVirt's terms: a host's fence agent
//! ([`AgentParams`]: `type`, `address`, `username`, `password`, `port`, `options`, mapped onto the
//! agent's command as [`AgentParams::to_agent`] describes; one agent per host, as
//! `hosts.fence_agent` holds one) and the host's `fence` action ([`FenceType`]), including
//! `manual`: an administrator's word that a host which stopped responding was rebooted
//! ([`Commands::confirm_host_rebooted`]).

use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::app::App;
use crate::commands::{CommandError, Commands};
use crate::db::sql::{Arg, Sql};
use crate::db::{ListQuery, Ref, VmFilter};
use crate::model::{HostStatus, HostUuid, NewEvent, Severity, VmRuntime};

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

/// Where oVirt's fence agent types (`fence_ipmilan`, `fence_apc`, …) are looked for.
pub const AGENT_DIRS: &[&str] = &[
    "/usr/sbin",
    "/sbin",
    "/usr/bin",
    "/usr/local/sbin",
    "/usr/local/bin",
];

/// The option of a `script` agent that names its program.
pub const SCRIPT_COMMAND: &str = "command";
/// An option with this name is a positional argument (its value, as it is).
pub const POSITIONAL: &str = "arg";

/// A fence agent in oVirt's terms (the REST API's `<agent>`), which maps onto a command:
///
/// - the program: for `type` `script`, the absolute path given as the option `command`; for
///   any other type T, the installed `fence_T` (in one of [`AGENT_DIRS`]), as oVirt runs
///   `fence_ipmilan` for type `ipmilan`;
/// - the arguments, in this order: `--ip=ADDRESS`, `--username=USER`, `--password=PASSWORD`,
///   `--ipport=PORT` (each when given; the fence-agents' long options), then one per other
///   option in order: `--NAME=VALUE`, `--NAME` for an empty value, or the bare value for an
///   option named `arg`;
/// - then, as for every agent, the action (`on`, `off`, `status`) as the last argument and
///   `action=ACTION` on standard input.
///
/// [`AgentParams::from_agent`] reverses this (an agent set up otherwise shows as a `script`
/// with its arguments as options); the password never leaves the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentParams {
    pub agent_type: String,
    pub address: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub port: Option<u16>,
    /// Name and value pairs, in order (the `command` of a script included).
    pub options: Vec<(String, String)>,
}

fn valid_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The installed program for fence agent type `t`, if any.
pub fn program_of_type(t: &str) -> Option<std::path::PathBuf> {
    AGENT_DIRS
        .iter()
        .map(|d| std::path::Path::new(d).join(format!("fence_{t}")))
        .find(|p| p.is_file())
}

impl AgentParams {
    /// The command this agent runs (checked by [`FenceAgent::validate`] when it is set).
    pub fn to_agent(&self) -> Result<FenceAgent, CommandError> {
        let t = self.agent_type.trim().to_ascii_lowercase();
        if !valid_word(&t) {
            return Err(CommandError::invalid(format!(
                "fence agent type {:?} is not a word (script, ipmilan, apc, …)",
                self.agent_type
            )));
        }
        let mut options = self.options.clone();
        let program = if t == "script" {
            let i = options
                .iter()
                .position(|(n, _)| n == SCRIPT_COMMAND)
                .ok_or_else(|| {
                    CommandError::invalid(format!(
                        "a fence agent of type script needs the option {SCRIPT_COMMAND} (the program's absolute path)"
                    ))
                })?;
            options.remove(i).1
        } else {
            program_of_type(&t)
                .ok_or_else(|| {
                    CommandError::invalid(format!(
                        "fence agent type {t}: no program fence_{t} in {} (install fence-agents, or use type script)",
                        AGENT_DIRS.join(", ")
                    ))
                })?
                .display()
                .to_string()
        };
        let mut command = vec![program];
        let mut flag = |name: &str, v: &Option<String>| -> Result<(), CommandError> {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                if v.contains(['\n', '\0']) {
                    return Err(CommandError::invalid(format!(
                        "fence agent {name} must be one line"
                    )));
                }
                command.push(format!("--{name}={v}"));
            }
            Ok(())
        };
        flag("ip", &self.address)?;
        flag("username", &self.username)?;
        flag("password", &self.password)?;
        flag("ipport", &self.port.map(|p| p.to_string()))?;
        for (n, v) in &options {
            if v.contains(['\n', '\0']) {
                return Err(CommandError::invalid(format!(
                    "fence agent option {n} must be one line"
                )));
            }
            if n == POSITIONAL {
                command.push(v.clone());
            } else if !valid_word(n) || n == SCRIPT_COMMAND {
                return Err(CommandError::invalid(format!(
                    "fence agent option name {n:?} must be letters, digits, '-' or '_'"
                )));
            } else if v.is_empty() {
                command.push(format!("--{n}"));
            } else {
                command.push(format!("--{n}={v}"));
            }
        }
        Ok(FenceAgent { command })
    }

    /// The agent in oVirt's terms (see the type's description for the mapping).
    pub fn from_agent(a: &FenceAgent) -> AgentParams {
        let program = a.command.first().cloned().unwrap_or_default();
        let typed = std::path::Path::new(&program)
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_prefix("fence_"))
            .filter(|t| {
                valid_word(t) && program_of_type(t).is_some_and(|p| p.display().to_string() == program)
            })
            .map(str::to_string);
        let mut p = AgentParams {
            agent_type: typed.clone().unwrap_or_else(|| "script".into()),
            ..Default::default()
        };
        if typed.is_none() {
            p.options.push((SCRIPT_COMMAND.into(), program));
        }
        for arg in a.command.iter().skip(1) {
            let Some(long) = arg.strip_prefix("--") else {
                p.options.push((POSITIONAL.into(), arg.clone()));
                continue;
            };
            let (n, v) = long.split_once('=').unwrap_or((long, ""));
            match n {
                "ip" if p.address.is_none() => p.address = Some(v.into()),
                "username" if p.username.is_none() => p.username = Some(v.into()),
                "password" if p.password.is_none() => p.password = Some(v.into()),
                "ipport" if p.port.is_none() && v.parse::<u16>().is_ok() => p.port = v.parse().ok(),
                _ if valid_word(n) => p.options.push((n.into(), v.into())),
                _ => p.options.push((POSITIONAL.into(), arg.clone())),
            }
        }
        p
    }
}

/// A change to a host's fence agent; `None` keeps the field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateAgent {
    pub agent_type: Option<String>,
    pub address: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub port: Option<u16>,
    /// Replaces all options (a script's `command` included) when given.
    pub options: Option<Vec<(String, String)>>,
}

/// What the host `fence` action does (oVirt's `fence_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceType {
    /// Asks the agent whether the host is powered on.
    Status,
    /// Powers the host off (and waits until the agent reports it off).
    Stop,
    /// Powers the host on; a fenced (`down`) host is then brought up by monitoring.
    Start,
    /// Stop, then start.
    Restart,
    /// The administrator confirms that a host which stopped responding was rebooted.
    Manual,
}

impl std::str::FromStr for FenceType {
    type Err = CommandError;
    fn from_str(s: &str) -> Result<Self, CommandError> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "status" => FenceType::Status,
            "stop" => FenceType::Stop,
            "start" => FenceType::Start,
            "restart" => FenceType::Restart,
            "manual" => FenceType::Manual,
            other => {
                return Err(CommandError::invalid(format!(
                    "fence type {other:?} is not one of status, stop, start, restart, manual"
                )))
            }
        })
    }
}

impl PowerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerStatus::On => "on",
            PowerStatus::Off => "off",
        }
    }
}

/// `status_detail` of VMs whose host an administrator confirmed rebooted or powered off: it
/// starts with the text the HA loop reads as "restart elsewhere" ([`crate::ha`]), which still
/// waits for the VM lease.
fn gone_detail(why: &str) -> String {
    format!("gone from its host ({why})")
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

    /// Writes the agent column; with `only_if_none`, only when the host has none (two adds
    /// racing: one wins, the other is a conflict).
    async fn write_agent(
        &self,
        host: HostUuid,
        agent: Option<&FenceAgent>,
        only_if_none: bool,
    ) -> Result<bool, CommandError> {
        let text = agent.map(|a| serde_json::to_string(a).expect("a fence agent serializes"));
        let mut tx = self.app.db.begin().await?;
        let mut q = Sql::new("UPDATE hosts SET fence_agent = ");
        q.arg(Arg::Text(text)).push(" WHERE id = ").arg(host.to_string());
        if only_if_none {
            q.push(" AND fence_agent IS NULL");
        }
        let n = tx.ctx().exec(&q).await?;
        tx.commit().await?;
        Ok(n == 1)
    }

    /// The host's fence agent in oVirt's terms, if it has one.
    pub async fn fence_agent(&self, host: HostUuid) -> Result<Option<AgentParams>, CommandError> {
        Ok(agent_of(&self.app, host)
            .await?
            .as_ref()
            .map(AgentParams::from_agent))
    }

    /// Gives a host its fence agent; a host has at most one.
    pub async fn add_fence_agent(
        &self,
        host: HostUuid,
        params: &AgentParams,
    ) -> Result<AgentParams, CommandError> {
        let h = self.app.host(host).await?;
        let agent = params.to_agent()?;
        agent.validate()?;
        if !self.write_agent(host, Some(&agent), true).await? {
            return Err(CommandError::Conflict(format!(
                "host {} already has a fence agent (oxvirt keeps one per host): update or remove it",
                h.name
            )));
        }
        tracing::info!(host = %h.name, program = %agent.command[0], "fence agent set");
        Ok(AgentParams::from_agent(&agent))
    }

    /// Changes a host's fence agent: the fields given replace the stored ones.
    pub async fn update_fence_agent(
        &self,
        host: HostUuid,
        req: UpdateAgent,
    ) -> Result<AgentParams, CommandError> {
        let h = self.app.host(host).await?;
        let mut p = agent_of(&self.app, host)
            .await?
            .as_ref()
            .map(AgentParams::from_agent)
            .ok_or_else(|| CommandError::not_found("fence agent of host", &h.name))?;
        if let Some(t) = req.agent_type {
            // A script's program is an option: moving to a typed agent drops it.
            if !t.eq_ignore_ascii_case("script") {
                p.options.retain(|(n, _)| n != SCRIPT_COMMAND);
            }
            p.agent_type = t;
        }
        if req.address.is_some() {
            p.address = req.address;
        }
        if req.username.is_some() {
            p.username = req.username;
        }
        if req.password.is_some() {
            p.password = req.password;
        }
        if req.port.is_some() {
            p.port = req.port;
        }
        if let Some(o) = req.options {
            p.options = o;
        }
        let agent = p.to_agent()?;
        agent.validate()?;
        self.write_agent(host, Some(&agent), false).await?;
        Ok(AgentParams::from_agent(&agent))
    }

    /// Removes a host's fence agent (the HA loop can then no longer fence it).
    pub async fn remove_fence_agent(&self, host: HostUuid) -> Result<(), CommandError> {
        let h = self.app.host(host).await?;
        if agent_of(&self.app, host).await?.is_none() {
            return Err(CommandError::not_found("fence agent of host", &h.name));
        }
        self.write_agent(host, None, false).await?;
        Ok(())
    }

    /// The host `fence` action; `Status` answers the power state, the others `None`.
    pub async fn fence_action(
        &self,
        host: HostUuid,
        t: FenceType,
    ) -> Result<Option<PowerStatus>, CommandError> {
        let h = self.app.host(host).await?;
        let agent = || async {
            agent_of(&self.app, host)
                .await?
                .ok_or_else(|| CommandError::Conflict(format!("host {} has no fence agent", h.name)))
        };
        match t {
            FenceType::Manual => {
                self.confirm_host_rebooted(host).await?;
                Ok(None)
            }
            FenceType::Status => Ok(Some(
                agent()
                    .await?
                    .run(PowerAction::Status, AGENT_TIMEOUT)
                    .await
                    .map_err(|e| CommandError::Conflict(format!("host {}: {e}", h.name)))?,
            )),
            FenceType::Stop => {
                agent().await?;
                self.fence_host(host).await?;
                self.vms_gone_from_host(
                    host,
                    &format!("host {} was powered off by its fence agent", h.name),
                )
                .await?;
                Ok(None)
            }
            FenceType::Start => {
                self.power_on(host).await?;
                Ok(None)
            }
            FenceType::Restart => {
                agent().await?;
                self.fence_host(host).await?;
                self.vms_gone_from_host(host, &format!("host {} was restarted by its fence agent", h.name))
                    .await?;
                self.power_on(host).await?;
                Ok(None)
            }
        }
    }

    /// Powers a host on through its agent; a host recorded `down` is handed to monitoring,
    /// which brings it up once its node answers (other statuses are left to the admin).
    async fn power_on(&self, host: HostUuid) -> Result<(), CommandError> {
        let h = self.app.host(host).await?;
        let agent = agent_of(&self.app, host)
            .await?
            .ok_or_else(|| CommandError::Conflict(format!("host {} has no fence agent", h.name)))?;
        agent
            .run(PowerAction::On, AGENT_TIMEOUT)
            .await
            .map_err(|e| CommandError::Conflict(format!("host {}: {e}", h.name)))?;
        if h.status == HostStatus::Down {
            self.app
                .db
                .host_set_status(
                    host,
                    &[HostStatus::Down],
                    HostStatus::Initializing,
                    Some("powered on by its fence agent"),
                )
                .await?;
        }
        let mut e = NewEvent::new(
            Severity::Normal,
            9022,
            format!("Host {} was powered on by its fence agent", h.name),
        );
        e.host_id = Some(host);
        if let Err(err) = self.app.db.event_add(&e).await {
            tracing::warn!(error = %err, "cannot record event");
        }
        Ok(())
    }

    /// oVirt's "confirm host has been rebooted" (`fence_type=manual`): the administrator
    /// vouches that a host which stopped responding no longer runs anything. The host is
    /// recorded `down` and its VMs `down` as gone from it, so that the HA loop restarts the
    /// highly available ones elsewhere and an admin may start the others. This decides
    /// nothing about storage: a restart still takes each VM's leases first, which a VM still
    /// running there holds (or holds until they expire), so a wrong confirmation cannot run a
    /// VM twice on pool storage.
    pub async fn confirm_host_rebooted(&self, host: HostUuid) -> Result<(), CommandError> {
        let h = self.app.host(host).await?;
        if !matches!(h.status, HostStatus::NonResponsive | HostStatus::Down) {
            return Err(CommandError::Conflict(format!(
                "host {} is {}: confirming a reboot is only for a host that does not respond (non_responsive) or is down",
                h.name, h.status
            )));
        }
        if h.status != HostStatus::Down {
            self.app
                .db
                .host_set_status(
                    host,
                    &[h.status],
                    HostStatus::Down,
                    Some("an administrator confirmed it was rebooted"),
                )
                .await?;
        }
        self.vms_gone_from_host(
            host,
            &format!("an administrator confirmed host {} was rebooted", h.name),
        )
        .await?;
        let mut e = NewEvent::new(
            Severity::Warning,
            9023,
            format!("An administrator confirmed that host {} was rebooted", h.name),
        );
        e.host_id = Some(host);
        if let Err(err) = self.app.db.event_add(&e).await {
            tracing::warn!(error = %err, "cannot record event");
        }
        tracing::warn!(host = %h.name, "host confirmed rebooted by an administrator");
        Ok(())
    }

    /// Records the VMs the engine places on `host` as down, gone from it (compare-and-set on
    /// the status each was read with: a VM that moved meanwhile is left alone).
    async fn vms_gone_from_host(&self, host: HostUuid, why: &str) -> Result<(), CommandError> {
        let q = ListQuery {
            filter: VmFilter {
                host: Some(Ref::Id(host)),
                ..Default::default()
            },
            ..Default::default()
        };
        for vm in self.app.db.vm_list(&q).await? {
            if !vm.runtime.status.is_running() || vm.runtime.run_on_host != Some(host) {
                continue;
            }
            let rt = VmRuntime {
                status_detail: Some(gone_detail(why)),
                ..Default::default()
            };
            match self.app.db.vm_set_runtime(vm.id, &[vm.runtime.status], &rt).await {
                Ok(_) => tracing::info!(vm = %vm.name, why, "VM recorded down: gone from its host"),
                Err(e) if matches!(e, crate::db::DbError::Conflict { .. }) => {
                    tracing::info!(vm = %vm.name, error = %e, "VM changed meanwhile; left as it is")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Powers the host off through its agent and waits until the agent reports it off; the
    /// host is then recorded `down`.
    pub async fn fence_host(&self, host: HostUuid) -> Result<(), CommandError> {
        power_off(&self.app, host).await
    }
}

/// The SPM on storage (host id `spm_id` in data center `d`) sits on a host the engine cannot
/// reach. Cut from the engine but not from storage, it keeps renewing its SDM lease for ever
/// and no other host can become SPM; powered off, its lease dies within 8N + M. So a host
/// with a fence agent is fenced, at most once per [`SPM_FENCE_PERIOD`] (a failed or
/// ineffective fence is not repeated every monitoring round). Answers whether it fenced.
pub async fn fence_unreachable_spm(
    app: &App,
    d: &crate::model::DataCenter,
    spm_id: i64,
) -> Result<bool, CommandError> {
    let q = ListQuery {
        filter: crate::db::HostFilter {
            data_center: Some(Ref::Id(d.id)),
            status: vec![HostStatus::NonResponsive],
            ..Default::default()
        },
        ..Default::default()
    };
    let mut holder = None;
    for h in app.db.host_list(&q).await? {
        if app.db.host_spm_id(d.id, h.id).await?.map(|i| i64::from(i.get())) == Some(spm_id) {
            holder = Some(h);
            break;
        }
    }
    let Some(h) = holder else { return Ok(false) };
    if agent_of(app, h.id).await?.is_none() {
        tracing::warn!(dc = %d.name, host = %h.name,
            "the SPM's host is unreachable and has no fence agent: the role moves only once its lease dies");
        return Ok(false);
    }
    {
        let mut rt = app.hosts_rt.lock().expect("host runtime");
        let r = rt.entry(h.id).or_default();
        let now = std::time::Instant::now();
        if r.spm_fenced_at
            .is_some_and(|t| now.duration_since(t) < SPM_FENCE_PERIOD)
        {
            return Ok(false);
        }
        r.spm_fenced_at = Some(now);
    }
    tracing::warn!(dc = %d.name, host = %h.name, "the SPM's host is unreachable: fencing it so the role can move");
    power_off(app, h.id).await?;
    Ok(true)
}

/// How often one host is fenced at most for holding the SPM role while unreachable.
pub const SPM_FENCE_PERIOD: Duration = Duration::from_secs(300);

async fn power_off(app: &App, host: HostUuid) -> Result<(), CommandError> {
    let h = app.host(host).await?;
    let agent = agent_of(app, host)
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
    let _ = app
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
    if let Err(err) = app.db.event_add(&e).await {
        tracing::warn!(error = %err, "cannot record event");
    }
    tracing::warn!(host = %h.name, "host fenced");
    Ok(())
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
