//! Monitoring: the engine's continuous reconciliation of what it knows with what nodes report.
//!
//! Every `monitor_interval`, or sooner when a command or a node's event kicks it, for each host
//! that is not in maintenance:
//! - poll `Host.getStats` and `Host.getAllVmStats`: a host answering is `up`; one that fails
//!   `non_responsive_after` polls in a row is `non_responsive`;
//! - reconcile VM statuses: a VM the node reports down is recorded down (and cleaned from the
//!   node), one the node no longer has is down;
//! - keep the host connected to its data center's pool (again after a node restart, seen as a
//!   new boot id);
//! - read its domain monitor (`Host.getStorageRepoStats`): a host that reports an active pool
//!   domain bad for `storage_problem_grace` while other hosts use it is `non_operational` (a
//!   domain bad everywhere is the domain's problem, see [`host_storage_problem`]).
//!
//! For each data center with storage: elect an SPM when it has none (among up, connected hosts,
//! highest SPM priority first), track domain space and health, and turn attached domains
//! `active` once the pool is served.
//!
//! Then the HA loop ([`crate::ha`]) restarts highly available VMs whose host died or whose
//! QEMU crashed, and, once a minute, the balancer ([`crate::balance`]) migrates VMs off
//! over-utilized hosts.
//!
//! Events: the monitor follows each monitored node's event stream (`GET /events`: VM status
//! changes, job ends, network changes). An event only kicks a round; what is recorded still
//! comes from the polls, so a lost or reordered event costs latency, never correctness, and
//! a node whose stream is down is simply polled. That is how a VM's pause, crash or migration
//! reaches the database in well under a second while polls stay a few seconds apart.
//!
//! SPM safety does not rest on the monitor: a node takes the SPM lease only when the previous
//! holder's host id is dead on storage, so the monitor may ask as often as it likes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::app::App;
use crate::commands::{CommandError, Commands};
use crate::db::{DbError, HostFilter, ListQuery, Ref, VmFilter};
use crate::model::{
    DcId, DcStatus, DiskAttachment, Host, HostStats, HostStatus, HostUuid, LowSpace, NewEvent, SdStatus,
    SdUuid, Severity, SpmStatus, Vm, VmId, VmRuntime, VmStatus,
};
use crate::time::Timestamp;

/// Hosts the monitor polls (others wait for an admin or for enrollment). A host preparing for
/// maintenance still runs VMs (until its evacuation ends), so it is watched too.
fn monitored(s: HostStatus) -> bool {
    matches!(
        s,
        HostStatus::Up
            | HostStatus::Initializing
            | HostStatus::Connecting
            | HostStatus::NonResponsive
            | HostStatus::NonOperational
            | HostStatus::PreparingForMaintenance
    )
}

pub struct Monitor {
    cmds: Commands,
    /// Data centers whose SPM election runs now (elections can wait for leases).
    electing: Arc<Mutex<HashSet<DcId>>>,
    /// The HA loop's memory (backoffs, last hosts, fenced hosts).
    pub ha: Arc<Mutex<crate::ha::HaTracker>>,
    /// The load balancer's memory.
    pub balancer: Arc<Mutex<crate::balance::Balancer>>,
    /// Hosts whose event stream a task follows now.
    following: Arc<Mutex<HashSet<HostUuid>>>,
    /// When the OVF stores were last brought up to date, and whether a pass runs now.
    ovf: Arc<Mutex<(std::time::Instant, bool)>>,
}

impl Monitor {
    pub fn new(cmds: Commands) -> Self {
        Self {
            cmds,
            electing: Default::default(),
            ha: Default::default(),
            balancer: Default::default(),
            following: Default::default(),
            ovf: Arc::new(Mutex::new((std::time::Instant::now(), false))),
        }
    }

    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let interval = self.cmds.app.settings.monitor_interval;
        loop {
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e, "monitoring round failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.cmds.app.kick.notified() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }

    /// One pass over hosts and data centers.
    pub async fn round(&self) -> Result<(), CommandError> {
        let app = &self.cmds.app;
        let hosts = app.db.host_list(&ListQuery::default()).await?;
        for h in hosts.iter().filter(|h| monitored(h.status)) {
            self.follow_events(h);
        }
        // Who is up as the round starts: the hosts whose domain reports count for the others.
        let up: Arc<Vec<Host>> = Arc::new(
            hosts
                .iter()
                .filter(|h| h.status == HostStatus::Up)
                .cloned()
                .collect(),
        );
        let polls = hosts.into_iter().filter(|h| monitored(h.status)).map(|h| {
            let (app, up) = (app.clone(), up.clone());
            async move {
                if let Err(e) = poll_host(&app, &h, &up).await {
                    tracing::debug!(host = %h.name, error = %e, "host poll failed");
                }
            }
        });
        futures_util::future::join_all(polls).await;
        for dc in app.db.dc_list(&ListQuery::default()).await? {
            // A data center in maintenance has its pool down on purpose (see
            // `Commands::deactivate_storage_domain`).
            if dc.status == DcStatus::Maintenance || app.db.pool_master(dc.id).await?.is_none() {
                continue;
            }
            self.ensure_spm(dc.id);
            if let Err(e) = domains_round(app, dc.id).await {
                tracing::debug!(dc = %dc.name, error = %e, "domain monitoring failed");
            }
        }
        if let Err(e) = crate::ha::round(&self.cmds, &self.ha).await {
            tracing::warn!(error = %e, "HA round failed");
        }
        if let Err(e) = crate::balance::round(&self.cmds, &self.balancer).await {
            tracing::warn!(error = %e, "balancing round failed");
        }
        self.ovf_round();
        Ok(())
    }

    /// Every `ovf_update_interval` (the first one after start, as oVirt), a pass over the OVF
    /// stores in a task of its own: writes go through the SPM and must not hold up monitoring.
    fn ovf_round(&self) {
        {
            let mut o = self.ovf.lock().expect("ovf");
            if o.1 || o.0.elapsed() < self.cmds.app.settings.ovf_update_interval {
                return;
            }
            o.1 = true;
        }
        let (cmds, ovf) = (self.cmds.clone(), self.ovf.clone());
        tokio::spawn(async move {
            match cmds.update_all_ovf_stores().await {
                Ok(n) => tracing::debug!(written = n, "OVF store pass done"),
                Err(e) => tracing::warn!(error = %e, "OVF store pass failed"),
            }
            *ovf.lock().expect("ovf") = (std::time::Instant::now(), false);
        });
    }

    /// Follows the host's event stream (unless a task already does), kicking a round on every
    /// event. The task ends with the stream (node gone or restarted); the next round starts a
    /// new one. A node that refuses the stream is left to polls for one interval.
    fn follow_events(&self, h: &Host) {
        if !self.following.lock().expect("following").insert(h.id) {
            return;
        }
        let (app, following, host) = (self.cmds.app.clone(), self.following.clone(), h.clone());
        tokio::spawn(async move {
            let stream = match app.client(&host) {
                Ok(c) => c.rpc().events().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match stream {
                Ok(mut events) => {
                    tracing::debug!(host = %host.name, "following the node's events");
                    while let Some(ev) = events.recv().await {
                        tracing::trace!(host = %host.name, event = %ev["method"], "node event");
                        // Progress samples change no state the monitor keeps: record, no round.
                        if let Some(vm) = ev["method"]
                            .as_str()
                            .and_then(|m| m.strip_prefix("|virt|VM_migration_progress|"))
                            .and_then(|id| id.parse::<VmId>().ok())
                        {
                            if let Some(p) = ev["params"]["body"]["progress"].as_u64() {
                                app.migration_progress
                                    .lock()
                                    .expect("migration progress")
                                    .insert(vm, p.min(100) as u8);
                            }
                            continue;
                        }
                        app.kick.notify_one();
                    }
                    tracing::debug!(host = %host.name, "the node's event stream ended");
                    app.kick.notify_one();
                }
                Err(e) => {
                    tracing::debug!(host = %host.name, error = %e, "cannot follow the node's events");
                    tokio::time::sleep(app.settings.monitor_interval).await;
                }
            }
            following.lock().expect("following").remove(&host.id);
        });
    }

    fn ensure_spm(&self, dc: DcId) {
        if !self.electing.lock().expect("electing").insert(dc) {
            return;
        }
        let (app, electing) = (self.cmds.app.clone(), self.electing.clone());
        tokio::spawn(async move {
            // A forced selection running now decides; the next round looks again.
            if let Ok(_election) = app.spm_elections.try_lock() {
                let spm_of = async |app: &App| app.dc(dc).await.ok().map(|d| (d.spm_host, d.spm_status));
                let before = spm_of(&app).await;
                match elect_spm(&app, dc, None).await {
                    // A new SPM: look at the pool's domains now rather than a round later.
                    Ok(()) if spm_of(&app).await != before => app.kick.notify_one(),
                    Ok(()) => {}
                    Err(e) => tracing::info!(dc = %dc, error = %e, "no SPM elected this round"),
                }
            }
            electing.lock().expect("electing").remove(&dc);
        });
    }
}

async fn event(
    app: &App,
    severity: Severity,
    code: i32,
    text: String,
    host: Option<HostUuid>,
    vm: Option<VmId>,
) {
    let mut e = NewEvent::new(severity, code, text);
    e.host_id = host;
    e.vm_id = vm;
    if let Err(err) = app.db.event_add(&e).await {
        tracing::warn!(error = %err, "cannot record event");
    }
}

async fn poll_host(app: &Arc<App>, h: &Host, up: &[Host]) -> Result<(), CommandError> {
    // Every call of the poll is bounded (see `NodeClient::within`).
    let node = app.client(h)?.within(app.settings.poll_timeout());
    let stats = match node.call("Host.getStats", json!({})).await {
        Ok(s) => s,
        Err(e) => {
            let mut failures = 0;
            app.update_host_rt(h.id, |rt| {
                rt.failures += 1;
                failures = rt.failures;
            });
            if failures >= app.settings.non_responsive_after && h.status != HostStatus::NonResponsive {
                app.db
                    .host_set_status(h.id, &[h.status], HostStatus::NonResponsive, Some(&e.to_string()))
                    .await?;
                event(
                    app,
                    Severity::Error,
                    9006,
                    format!("Host {} is not responding: {e}", h.name),
                    Some(h.id),
                    None,
                )
                .await;
                mark_vms_unknown(app, h.id).await?;
            }
            return Err(e.into());
        }
    };
    let ping = node.call("Host.ping", json!({})).await?;
    let boot_id = ping["bootId"].as_str().map(str::to_string);
    let mut restarted = false;
    app.update_host_rt(h.id, |rt| {
        rt.failures = 0;
        restarted = rt.boot_id.is_some() && rt.boot_id != boot_id;
        if restarted || rt.boot_id.is_none() {
            rt.pool = None;
        }
        rt.boot_id = boot_id.clone();
        rt.cpu_load_pct = stats["cpuUsedPct"].as_f64().unwrap_or(0.0);
        rt.mem_total_mib = stats["memTotalMib"].as_u64().unwrap_or(0);
        rt.mem_free_mib = stats["memAvailableMib"].as_u64().unwrap_or(0);
        rt.swap_free_mib = stats["swapFreeMib"].as_u64().unwrap_or(0);
        rt.stats = Some(stats.clone());
    });
    if restarted {
        tracing::info!(host = %h.name, "node restarted; reconnecting its storage");
    }
    if h.cpu_cores.is_none() || h.status != HostStatus::Up {
        let caps = node.call("Host.getCapabilities", json!({})).await?;
        app.db
            .host_update_stats(
                h.id,
                &HostStats {
                    cpu_cores: caps["cpuCores"].as_u64().map(|c| c as u32),
                    memory_bytes: caps["memTotalMib"].as_u64().map(|m| m << 20),
                    free_memory_bytes: stats["memAvailableMib"].as_u64().map(|m| m << 20),
                },
            )
            .await?;
    } else {
        app.db
            .host_update_stats(
                h.id,
                &HostStats {
                    cpu_cores: h.cpu_cores,
                    memory_bytes: h.memory_bytes,
                    free_memory_bytes: stats["memAvailableMib"].as_u64().map(|m| m << 20),
                },
            )
            .await?;
    }
    let dc = app.host_dc(h).await?;
    if dc.status != DcStatus::Maintenance && app.db.pool_master(dc.id).await?.is_some() {
        if let Err(e) = ensure_pool_connected(app, h.id, dc.id).await {
            tracing::info!(host = %h.name, error = %e, "cannot connect the host to its pool yet");
        }
    }
    // Lacking a required network of its cluster (issue 11), or a storage domain the others use,
    // makes a host non_operational.
    // (status detail, event code, event text): the detail stays the same while the problem
    // does, so the event is sent once.
    let problem = match crate::commands::host_network_problem(app, h, &node).await? {
        Some(reason) => Some((reason.clone(), 519, reason)),
        None => storage_problem(app, h, dc.id, up, &node)
            .await?
            .map(|(detail, error)| (detail.clone(), 522, format!("{detail}: {error}"))),
    };
    if h.status == HostStatus::PreparingForMaintenance {
        // Its evacuation decides where it goes next; its VMs are reconciled below.
    } else if let Some((reason, code, text)) = problem {
        if h.status != HostStatus::NonOperational || h.status_detail.as_deref() != Some(reason.as_str()) {
            app.db
                .host_set_status(h.id, &[h.status], HostStatus::NonOperational, Some(&reason))
                .await?;
            event(app, Severity::Error, code, text, Some(h.id), None).await;
        }
    } else if h.status != HostStatus::Up {
        app.db
            .host_set_status(h.id, &[h.status], HostStatus::Up, None)
            .await?;
        event(
            app,
            Severity::Normal,
            13,
            format!("Host {} is up", h.name),
            Some(h.id),
            None,
        )
        .await;
    }
    // The rows as they were before the node was asked (see `reconcile_vms`).
    let before = HostView::read(app, h.id).await?;
    // Half the poll's limit for each VM's QEMU: a stuck one is reported not responding
    // and the host's answer still arrives in time.
    let monitor_timeout = app.settings.poll_timeout().as_secs_f64() / 2.0;
    let vms = node
        .call("Host.getAllVmStats", json!({ "monitorTimeout": monitor_timeout }))
        .await?;
    sample_vm_cpu(app, &vms).await;
    reconcile_vms(app, h, &node, &vms, before).await
}

/// Records the VMs' CPU time (QEMU's user + system, and its vCPUs') for the balancer and the
/// statistics.
async fn sample_vm_cpu(app: &App, reported: &Value) {
    let now = app.db.now();
    for r in reported.as_array().into_iter().flatten() {
        let Some(id) = r["vmID"].as_str().and_then(|s| s.parse::<VmId>().ok()) else {
            continue;
        };
        let st = &r["stats"];
        let (Some(u), Some(s)) = (st["cpu_user_ms"].as_u64(), st["cpu_system_ms"].as_u64()) else {
            continue;
        };
        let vcpu_ms = st["vcpu_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).sum::<u64>());
        let vcpus = match app.db.vm_get(id).await {
            Ok(Some(v)) => v.cpu.vcpus() as u32,
            _ => continue,
        };
        app.vm_cpu
            .lock()
            .expect("vm cpu")
            .sample_split(id, vcpus, u + s, vcpu_ms, now);
    }
}

/// The VMs the database places on `host`.
async fn vms_on_host(app: &App, host: HostUuid) -> Result<Vec<Vm>, CommandError> {
    let q = ListQuery {
        filter: VmFilter {
            host: Some(Ref::Id(host)),
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(app.db.vm_list(&q).await?)
}

/// What the database had on a host's VMs before its node was asked about them.
pub struct HostView {
    /// The VMs placed on the host.
    pub vms: Vec<Vm>,
    /// Their disk attachments.
    pub attachments: Vec<DiskAttachment>,
}

impl HostView {
    pub async fn read(app: &App, host: HostUuid) -> Result<HostView, CommandError> {
        Ok(HostView {
            vms: vms_on_host(app, host).await?,
            attachments: app.db.attachments_on_host(host).await?,
        })
    }
}

/// Writes `rt` over VM `id` if its status is still `was`, the status the report being
/// applied was compared with: false when a command changed the VM since (its word is newer)
/// or removed it.
async fn settle_vm(app: &App, id: VmId, was: VmStatus, rt: &VmRuntime) -> Result<bool, CommandError> {
    match app.db.vm_set_runtime(id, &[was], rt).await {
        Ok(_) => Ok(true),
        Err(DbError::Conflict { .. } | DbError::NotFound { .. }) => {
            tracing::debug!(vm = %id, was = %was, "the VM changed while its host was polled: its newer state stands");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

async fn mark_vms_unknown(app: &App, host: HostUuid) -> Result<(), CommandError> {
    for vm in vms_on_host(app, host).await? {
        if vm.runtime.status.is_running() {
            let rt = VmRuntime {
                status: VmStatus::Unknown,
                ..vm.runtime.clone()
            };
            settle_vm(app, vm.id, vm.runtime.status, &rt).await?;
        }
    }
    Ok(())
}

/// Whether a VM's `status_detail` is a storage pause code (see `io_pause_event`).
fn is_pause_code(detail: Option<&str>) -> bool {
    matches!(detail, Some("eio" | "enospc" | "eperm" | "eother"))
}

/// oVirt's audit event for a VM that storage errors paused, by VDSM pause code (lower case):
/// `VM_PAUSED_EIO` (145), `VM_PAUSED_ENOSPC` (138), `VM_PAUSED_EPERM` (146), else
/// `VM_PAUSED_ERROR` (139); all of severity error.
fn io_pause_event(vm: &str, code: &str) -> (Severity, i32, String) {
    let (n, why) = match code {
        "eio" => (145, "storage I/O problem"),
        "enospc" => (138, "no Storage space error"),
        "eperm" => (146, "storage permissions problem"),
        _ => (139, "unknown storage error"),
    };
    (
        Severity::Error,
        n,
        format!("VM {vm} has been paused due to {why}."),
    )
}

/// What the node's state word means for the engine's record.
fn engine_status(node_state: &str) -> Option<VmStatus> {
    Some(match node_state {
        "up" => VmStatus::Up,
        "paused" => VmStatus::Paused,
        "powering_down" => VmStatus::PoweringDown,
        "wait_for_launch" => VmStatus::WaitForLaunch,
        "migration_source" => VmStatus::Migrating,
        "down" => VmStatus::Down,
        // Also `saving_state` (a state streaming to a file): the suspend saga has the VM
        // `saving_state` already, and a snapshot with memory leaves it `up`.
        _ => return None,
    })
}

/// Brings the database's VMs in line with what `h`'s node reports (`Host.getAllVmStats`).
/// `before` is what the database had on `h`'s VMs *before* the node was asked: each write
/// compares against what was read then, so a VM a command changed meanwhile (a resume, a new
/// start, a migration's switch, a disk plugged) keeps the command's newer word instead of the
/// older report's, and the next poll settles it. A running VM's disks settle too: the node
/// acts first and the row follows, so a row an engine crash left behind takes the node's word.
pub async fn reconcile_vms(
    app: &App,
    h: &Host,
    node: &crate::nodes::NodeClient,
    reported: &Value,
    before: HostView,
) -> Result<(), CommandError> {
    let mut attachments: HashMap<VmId, Vec<DiskAttachment>> = HashMap::new();
    for a in before.attachments {
        attachments.entry(a.vm_id).or_default().push(a);
    }
    let before: HashMap<VmId, Vm> = before.vms.into_iter().map(|v| (v.id, v)).collect();
    let mut seen = HashSet::new();
    for r in reported.as_array().into_iter().flatten() {
        let Some(id) = r["vmID"].as_str().and_then(|s| s.parse::<VmId>().ok()) else {
            continue;
        };
        seen.insert(id);
        // Not on this host before the poll: read now (a VM started or migrated here since
        // is in the report only because that already happened).
        let vm = match before.get(&id) {
            Some(v) => v.clone(),
            None => match app.db.vm_get(id).await? {
                Some(v) => v,
                None => {
                    tracing::warn!(host = %h.name, vm = %id, "node runs a VM the engine does not know");
                    continue;
                }
            },
        };
        let state = r["status"]["state"].as_str().unwrap_or("");
        if state == "migration_destination" {
            continue; // the migration saga owns it
        }
        let Some(mut want) = engine_status(state) else {
            continue;
        };
        // A running VM whose QEMU does not answer its monitor is not_responding, as oVirt
        // shows it; it is still running there (HA leaves it be while its host is up).
        if r["monitorResponse"].as_i64() == Some(-1) && matches!(want, VmStatus::Up | VmStatus::Paused) {
            want = VmStatus::NotResponding;
        }
        // A guest storage errors stopped: its VDSM pause code is its status detail.
        let want_detail = r["pauseCode"]
            .as_str()
            .filter(|_| want == VmStatus::Paused)
            .map(str::to_ascii_lowercase);
        let ours = vm.runtime.run_on_host == Some(h.id);
        if want == VmStatus::Down {
            // A migration's source goes down once the destination runs it; the saga cleans it.
            let migrated_away = vm.runtime.run_on_host.is_some() && !ours;
            // Saving its state ends a VM's QEMU too; the suspend saga records it.
            if ours && !matches!(vm.runtime.status, VmStatus::Migrating | VmStatus::SavingState) {
                let reason = r["status"]["reason"].to_string();
                let down = VmRuntime {
                    status_detail: Some(reason.clone()),
                    ..Default::default()
                };
                if !settle_vm(app, id, vm.runtime.status, &down).await? {
                    continue;
                }
                event(
                    app,
                    Severity::Normal,
                    61,
                    format!("VM {} is down: {reason}", vm.name),
                    Some(h.id),
                    Some(id),
                )
                .await;
            }
            if ours || migrated_away || vm.runtime.run_on_host.is_none() {
                let _ = crate::commands::destroy_on_node(node, id).await;
            }
            continue;
        }
        if !ours {
            continue;
        }
        if matches!(vm.runtime.status, VmStatus::Up | VmStatus::Paused) && before.contains_key(&id) {
            let atts = attachments.remove(&id).unwrap_or_default();
            settle_disks(app, h, &vm, &atts, &r["disks"]).await?;
        }
        // Commands set transitional statuses; the node's word settles them.
        let had_io_pause =
            vm.runtime.status == VmStatus::Paused && is_pause_code(vm.runtime.status_detail.as_deref());
        let settle = match (vm.runtime.status, want) {
            (s, w) if s == w => {
                vm.runtime.status_detail != want_detail && (want_detail.is_some() || had_io_pause)
            }
            (VmStatus::Migrating | VmStatus::SavingState, _) => false,
            (
                VmStatus::WaitForLaunch | VmStatus::PoweringUp | VmStatus::Unknown | VmStatus::NotResponding,
                _,
            ) => true,
            (VmStatus::Up | VmStatus::Paused, VmStatus::Up | VmStatus::Paused) => true,
            (VmStatus::PoweringDown, VmStatus::Up) => false,
            (_, _) => true,
        };
        if settle {
            let rt = VmRuntime {
                status: want,
                status_detail: want_detail.clone(),
                run_on_host: Some(h.id),
                ..Default::default()
            };
            if settle_vm(app, id, vm.runtime.status, &rt).await? {
                let news = match (want, want_detail.as_deref()) {
                    (VmStatus::NotResponding, _) => Some((
                        Severity::Warning,
                        126,
                        format!("VM {} is not responding", vm.name),
                    )),
                    (VmStatus::Paused, Some(code)) => Some(io_pause_event(&vm.name, code)),
                    (VmStatus::Up, _) if had_io_pause => Some((
                        Severity::Normal,
                        196,
                        format!("VM {} has recovered from paused back to up.", vm.name),
                    )),
                    _ => None,
                };
                if let Some((severity, code, text)) = news {
                    event(app, severity, code, text, Some(h.id), Some(id)).await;
                }
            }
        }
    }
    // VMs the engine placed on this host that the node no longer runs.
    for vm in before.values() {
        let transient = matches!(
            vm.runtime.status,
            VmStatus::WaitForLaunch
                | VmStatus::Migrating
                | VmStatus::ImageLocked
                | VmStatus::SavingState
                | VmStatus::RestoringState
        );
        if !seen.contains(&vm.id) && vm.runtime.status.is_running() && !transient {
            let gone = VmRuntime {
                status_detail: Some("gone from its host".into()),
                ..Default::default()
            };
            if !settle_vm(app, vm.id, vm.runtime.status, &gone).await? {
                continue;
            }
            event(
                app,
                Severity::Warning,
                61,
                format!("VM {} is down: its host no longer runs it", vm.name),
                Some(h.id),
                Some(vm.id),
            )
            .await;
        }
    }
    Ok(())
}

/// Makes the attachments `atts` of running VM `vm` (read before the poll) say which disks its
/// QEMU has, as `disks` (the node's report) lists them; a report without the list changes
/// nothing. Each change compares with the row read then.
async fn settle_disks(
    app: &App,
    h: &Host,
    vm: &Vm,
    atts: &[DiskAttachment],
    disks: &Value,
) -> Result<(), CommandError> {
    let Some(disks) = disks.as_array() else {
        return Ok(());
    };
    // A disk is its image on storage; one being plugged or unplugged is left to that command.
    let image = |d: &Value| d["image"]["img"].as_str().map(str::to_string);
    let plugged: HashSet<String> = disks.iter().filter_map(image).collect();
    let pending: HashSet<String> = disks
        .iter()
        .filter(|d| d["pending"] == true)
        .filter_map(image)
        .collect();
    for a in atts {
        let disk = a.disk_id.to_string();
        if pending.contains(&disk) {
            continue;
        }
        let on_node = plugged.contains(&disk);
        if on_node == a.active
            || !app
                .db
                .attachment_set_active(vm.id, a.disk_id, a.active, on_node)
                .await?
        {
            continue;
        }
        let (code, what) = if on_node {
            (2000, "plugged into")
        } else {
            (2002, "unplugged from")
        };
        event(
            app,
            Severity::Warning,
            code,
            format!(
                "Disk {} is {what} VM {} on its host: its attachment now says so",
                a.disk_id, vm.name
            ),
            Some(h.id),
            Some(vm.id),
        )
        .await;
    }
    for img in &plugged {
        if !atts.iter().any(|a| a.disk_id.to_string() == *img) {
            tracing::warn!(vm = %vm.name, image = %img, "the VM runs with a disk it has no attachment for");
        }
    }
    Ok(())
}

/// Connects `host` to the data center's pool (storage connections, host id, pool) unless it
/// already is with the current master version.
pub async fn ensure_pool_connected(app: &App, host: HostUuid, dc: DcId) -> Result<(), CommandError> {
    let d = app.dc(dc).await?;
    let Some(master) = app.db.pool_master(dc).await? else {
        return Ok(());
    };
    if app.host_rt(host).pool == Some((d.storage_pool_id, d.master_version)) {
        return Ok(());
    }
    let h = app.host(host).await?;
    let node = app.client(&h)?;
    let mut domains = Vec::new();
    for m in app.db.pool_members(dc).await? {
        if let Some(sd) = app.db.sd_get(m.storage_domain_id).await? {
            domains.push(sd);
        }
    }
    crate::commands::connect_storage_servers(&node, &domains).await?;
    let host_id = app.lockspace_id(dc, host).await?;
    let r = node
        .call(
            "StoragePool.connect",
            json!({
                "spUUID": d.storage_pool_id, "hostID": host_id.get(), "msdUUID": master,
                "masterVersion": d.master_version,
                "ioTimeout": app.settings.io_timeout.as_secs_f64(),
                "fenceMargin": app.settings.fence_margin.as_secs_f64(),
            }),
        )
        .await;
    match r {
        Ok(_) => {}
        // Connected by an earlier round whose reply we lost: refresh to the current master.
        Err(e) if e.code() == Some(2002) || e.to_string().contains("already connected") => {
            node.call(
                "StoragePool.refresh",
                json!({ "spUUID": d.storage_pool_id, "msdUUID": master, "masterVersion": d.master_version }),
            )
            .await?;
        }
        Err(e) => return Err(e.into()),
    }
    let sds = domains.iter().map(|s| s.id).collect();
    app.update_host_rt(host, |rt| {
        rt.pool = Some((d.storage_pool_id, d.master_version));
        rt.domains = sds;
    });
    tracing::info!(host = %h.name, dc = %d.name, host_id = host_id.get(), "host connected to the storage pool");
    Ok(())
}

/// Makes sure the data center has an SPM: keeps the current one when it is up and still SPM on
/// storage, else asks the best connected host to take the role. With `prefer` (an admin's
/// forced selection), the current SPM steps down for that host and only that host is asked.
/// Callers hold `App::spm_elections`.
pub(crate) async fn elect_spm(app: &App, dc: DcId, prefer: Option<HostUuid>) -> Result<(), CommandError> {
    let d = app.dc(dc).await?;
    if let (SpmStatus::Spm, Some(h)) = (d.spm_status, d.spm_host) {
        let host = app.host(h).await?;
        if host.status == HostStatus::Up && prefer.is_some_and(|p| p != h) {
            // Its node refuses while SPM tasks run; the role then stays where it is.
            let node = app.client(&host)?.within(app.settings.poll_timeout());
            node.call("StoragePool.spmStop", json!({ "spUUID": d.storage_pool_id }))
                .await?;
            app.db.dc_spm_clear(dc, h).await?;
            tracing::info!(dc = %d.name, host = %host.name, "the SPM stepped down for a forced selection");
            return Box::pin(elect_spm(app, dc, prefer)).await;
        }
        if host.status == HostStatus::Up {
            // Still SPM on storage? A restarted node process is not, whatever the database says.
            // Bounded: a frozen SPM must not hold the election for the transport's timeout.
            let node = app.client(&host)?.within(app.settings.poll_timeout());
            let st = node
                .call("StoragePool.getSpmStatus", json!({ "spUUID": d.storage_pool_id }))
                .await;
            match st {
                Ok(s) if s["spm_st"]["spmStatus"] == "SPM" => return Ok(()),
                Ok(_) | Err(_) => {
                    tracing::info!(dc = %d.name, host = %host.name, "the recorded SPM no longer holds the role");
                    app.db.dc_spm_clear(dc, h).await?;
                    return Box::pin(elect_spm(app, dc, prefer)).await;
                }
            }
        }
        if !matches!(
            host.status,
            HostStatus::NonResponsive | HostStatus::Maintenance | HostStatus::Down
        ) {
            return Ok(());
        }
        // The SPM host is gone from the engine's view. The role moves only when storage says its
        // lease can be taken; spmStart below fails until then.
        tracing::info!(dc = %d.name, spm = %host.name, "SPM host is {}; looking for a new SPM", host.status);
    }
    let q = ListQuery {
        filter: HostFilter {
            data_center: Some(Ref::Id(dc)),
            status: vec![HostStatus::Up],
            ..Default::default()
        },
        ..Default::default()
    };
    // Up hosts connected to the pool, with their host ids in its lockspaces.
    let mut connected: Vec<(Host, i64)> = Vec::new();
    for h in app.db.host_list(&q).await? {
        if app
            .host_rt(h.id)
            .pool
            .is_some_and(|(p, _)| p == d.storage_pool_id)
        {
            let id = app
                .db
                .host_spm_id(dc, h.id)
                .await?
                .map_or(-1, |i| i64::from(i.get()));
            connected.push((h, id));
        }
    }
    let mut candidates: Vec<Host> = connected
        .iter()
        .map(|(h, _)| h.clone())
        .filter(|h| h.spm_priority >= 0 && prefer.is_none_or(|p| p == h.id))
        .collect();
    candidates.sort_by_key(|h| std::cmp::Reverse(h.spm_priority));
    let Some(cand) = candidates.into_iter().next() else {
        return Err(CommandError::Conflict(match prefer {
            Some(p) => format!(
                "host {p} cannot be the SPM of data center {}: it is not up, not connected to the pool, or its SPM priority is -1",
                d.name
            ),
            None => format!("data center {} has no connected host to be SPM", d.name),
        }));
    };
    if let Some(old) = d.spm_host.filter(|o| *o != cand.id) {
        app.db.dc_spm_clear(dc, old).await?;
    }
    if d.spm_host != Some(cand.id) {
        app.db.dc_spm_contend(dc, cand.id).await?;
    }
    // Status calls are bounded like polls; the spmStart task has its own, longer bound.
    let node = app.client(&cand)?.within(app.settings.poll_timeout());
    let status = node
        .call("StoragePool.getSpmStatus", json!({ "spUUID": d.storage_pool_id }))
        .await?;
    let st = &status["spm_st"];
    if st["spmStatus"] == "SPM" {
        app.db
            .dc_spm_won(dc, cand.id, st["spmLver"].as_i64().unwrap_or(0))
            .await?;
        app.db.dc_set_status(dc, DcStatus::Up).await?;
        return Ok(());
    }
    let prev_id = st["spmId"].as_i64().unwrap_or(-1);
    let prev_lver = st["spmLver"].as_i64().unwrap_or(-1);
    // Storage names another up host as the SPM (the engine lost track of it: a network cut
    // that healed before its lease expired, an engine restart): that host is the SPM. Adopt
    // it, or for a forced selection ask it to step down; spmStart elsewhere would only wait
    // for a lease that a live SPM keeps renewing.
    if let Some((holder, _)) = connected.iter().find(|(h, id)| *id == prev_id && h.id != cand.id) {
        let hn = app.client(holder)?.within(app.settings.poll_timeout());
        // A holder that does not answer is left to spmStart below, which waits for its lease.
        let hs = hn
            .call("StoragePool.getSpmStatus", json!({ "spUUID": d.storage_pool_id }))
            .await
            .unwrap_or_default();
        if hs["spm_st"]["spmStatus"] == "SPM" {
            if prefer.is_none() {
                // The candidate contends in the database by now: the holder takes its place.
                app.db.dc_spm_clear(dc, cand.id).await?;
                app.db.dc_spm_contend(dc, holder.id).await?;
                let lver = hs["spm_st"]["spmLver"].as_i64().unwrap_or(0);
                tracing::info!(dc = %d.name, spm = %holder.name, lver, "found the SPM on storage");
                return spm_won(app, &d, holder, lver).await;
            }
            hn.call("StoragePool.spmStop", json!({ "spUUID": d.storage_pool_id }))
                .await?;
            tracing::info!(dc = %d.name, host = %holder.name, "the SPM found on storage stepped down for a forced selection");
        }
    }
    // The SPM on storage is on no host the engine reaches: fence it if it can be (its lease
    // then dies within 8N + M); spmStart below fails until the lease is dead either way.
    if prev_id > 0 && !connected.iter().any(|(_, id)| *id == prev_id) {
        if let Err(e) = crate::fence::fence_unreachable_spm(app, &d, prev_id).await {
            tracing::error!(dc = %d.name, spm_id = prev_id, error = %e, "fencing the unreachable SPM failed");
        }
    }
    let timeout = app.settings.io_timeout * 8 + app.settings.fence_margin + Duration::from_secs(30);
    let r = node
        .run_task(
            "StoragePool.spmStart",
            json!({ "spUUID": d.storage_pool_id, "prevID": prev_id, "prevLver": prev_lver }),
            timeout,
        )
        .await;
    if let Err(e) = r {
        app.db.dc_spm_clear(dc, cand.id).await?;
        return Err(e.into());
    }
    let status = node
        .call("StoragePool.getSpmStatus", json!({ "spUUID": d.storage_pool_id }))
        .await?;
    let lver = status["spm_st"]["spmLver"].as_i64().unwrap_or(0);
    tracing::info!(dc = %d.name, spm = %cand.name, lver, "SPM elected");
    spm_won(app, &d, &cand, lver).await
}

/// Records `host`, contending now, as the data center's SPM with lease version `lver`.
async fn spm_won(
    app: &App,
    d: &crate::model::DataCenter,
    host: &Host,
    lver: i64,
) -> Result<(), CommandError> {
    app.db.dc_spm_won(d.id, host.id, lver).await?;
    app.db.dc_set_status(d.id, DcStatus::Up).await?;
    event(
        app,
        Severity::Normal,
        204,
        format!(
            "Host {} is the SPM of data center {} (lver {lver})",
            host.name, d.name
        ),
        Some(host.id),
        None,
    )
    .await;
    Ok(())
}

/// Whether a low-space event of `level` is due for a domain whose last one was `last`: the
/// first, a change of level, or one per period while it lasts (oVirt's flood regulation:
/// 12 h for the warning, 15 min for the critical event).
pub fn space_alert_due(last: Option<(LowSpace, Timestamp)>, level: LowSpace, now: Timestamp) -> bool {
    let period = match level {
        LowSpace::Warning => Duration::from_secs(12 * 3600),
        LowSpace::Critical => Duration::from_secs(15 * 60),
    };
    match last {
        Some((l, at)) if l == level => now >= at.saturating_add(period),
        _ => true,
    }
}

/// Raises oVirt's low-space event for an active domain whose monitored free space is under
/// its thresholds: `IRS_DISK_SPACE_LOW` (26, warning) or `IRS_DISK_SPACE_LOW_ERROR` (201).
async fn space_alert(app: &App, sd: SdUuid) -> Result<(), CommandError> {
    let Some(d) = app.db.sd_get(sd).await? else {
        return Ok(());
    };
    let Some(level) = d.low_space() else {
        app.space_alerts.lock().expect("space alerts").remove(&sd);
        return Ok(());
    };
    let now = app.db.now();
    {
        let mut alerts = app.space_alerts.lock().expect("space alerts");
        if !space_alert_due(alerts.get(&sd).copied(), level, now) {
            return Ok(());
        }
        alerts.insert(sd, (level, now));
    }
    let gib = d.free_bytes.unwrap_or(0) >> 30;
    let (severity, code, what) = match level {
        LowSpace::Warning => (Severity::Warning, 26, "Warning"),
        LowSpace::Critical => (Severity::Error, 201, "Critical"),
    };
    tracing::warn!(sd = %d.name, free_gib = gib, ?level, "storage domain low on space");
    let mut e = NewEvent::new(
        severity,
        code,
        format!(
            "{what}, Low disk space. {} domain has {gib} GB of free space.",
            d.name
        ),
    );
    e.storage_domain_id = Some(sd);
    app.db.event_add(&e).await?;
    Ok(())
}

/// Space and health of the pool's domains; attached domains turn active once the pool is
/// served by an SPM.
async fn domains_round(app: &App, dc: DcId) -> Result<(), CommandError> {
    let d = app.dc(dc).await?;
    let Ok((_, spm)) = app.spm(&d).await else {
        return Ok(());
    };
    let spm = spm.within(app.settings.poll_timeout());
    for m in app.db.pool_members(dc).await? {
        match spm
            .call("StorageDomain.getStats", json!({ "sdUUID": m.storage_domain_id }))
            .await
        {
            Ok(s) => {
                if let (Some(total), Some(free)) = (s["diskTotal"].as_u64(), s["diskFree"].as_u64()) {
                    app.db.sd_set_space(m.storage_domain_id, total, free).await?;
                    if m.status == SdStatus::Active {
                        space_alert(app, m.storage_domain_id).await?;
                    }
                }
                let valid = s["valid"] == true;
                let to = match (m.status, valid) {
                    (SdStatus::Activating | SdStatus::Unknown | SdStatus::Inactive, true) => {
                        Some(SdStatus::Active)
                    }
                    (SdStatus::Active, false) => Some(SdStatus::Inactive),
                    _ => None,
                };
                if let Some(to) = to {
                    app.db
                        .pool_set_status(dc, m.storage_domain_id, &[m.status], to)
                        .await?;
                }
            }
            Err(e) => {
                tracing::info!(sd = %m.storage_domain_id, error = %e, "domain stats failed");
                if m.status == SdStatus::Active {
                    app.db
                        .pool_set_status(dc, m.storage_domain_id, &[SdStatus::Active], SdStatus::Inactive)
                        .await?;
                }
            }
        }
    }
    Ok(())
}

/// A pool domain as one host's domain monitor last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainView {
    pub valid: bool,
    /// The host holds its host id in the domain's lockspace.
    pub acquired: bool,
    pub error: Option<String>,
}

impl DomainView {
    fn good(&self) -> bool {
        self.valid && self.acquired
    }
}

/// Reads the host's domain monitor, then decides with every host's last report whether it
/// cannot use its pool's storage: the status detail and the host's error.
async fn storage_problem(
    app: &App,
    h: &Host,
    dc: DcId,
    up: &[Host],
    node: &crate::nodes::NodeClient,
) -> Result<Option<(String, String)>, CommandError> {
    let Ok(stats) = node.call("Host.getStorageRepoStats", json!({})).await else {
        return Ok(None); // an older node without a domain monitor: nothing to judge by
    };
    let repo: std::collections::BTreeMap<SdUuid, DomainView> = stats
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(sd, v)| {
            Some((
                sd.parse().ok()?,
                DomainView {
                    valid: v["valid"] == true,
                    acquired: v["acquired"] == true,
                    error: v["error"].as_str().map(str::to_string),
                },
            ))
        })
        .collect();
    let active: Vec<SdUuid> = app
        .db
        .pool_members(dc)
        .await?
        .into_iter()
        .filter(|m| m.status == SdStatus::Active)
        .map(|m| m.storage_domain_id)
        .collect();
    let others: Vec<_> = up
        .iter()
        .filter(|o| o.id != h.id && o.cluster_id == h.cluster_id)
        .map(|o| app.host_rt(o.id).repo)
        .collect();
    let now = app.db.now();
    let mut verdict = None;
    app.update_host_rt(h.id, |rt| {
        rt.repo = repo;
        // What the host reaches, as its domain monitor says (the scheduler's storage filter):
        // a domain attached since the host connected counts once it holds its id there, one it
        // lost stops counting. Before the first report, the pool's domains at connect stand.
        if !rt.repo.is_empty() {
            rt.domains = rt
                .repo
                .iter()
                .filter(|(_, v)| v.good())
                .map(|(sd, _)| *sd)
                .collect();
        }
        let others: Vec<_> = others.iter().collect();
        verdict = host_storage_problem(
            now,
            app.settings.storage_problem_grace,
            &active,
            &rt.repo,
            &others,
            &mut rt.domain_bad_since,
        );
    });
    Ok(verdict.map(|(sd, error)| {
        (
            format!(
                "Host {} cannot access storage domain {sd} that other hosts use",
                h.name
            ),
            error,
        )
    }))
}

/// Whether a host cannot use its pool's storage (pure): it has reported an active domain bad
/// (invalid, or without its host id there) for at least `grace`, while another host reports the
/// same domain good. A domain bad on every host is the domain's problem (the SPM's stats turn it
/// inactive), and blaming each host would take the whole cluster down. `bad_since` remembers
/// when this host first reported each domain bad; a good report clears it. Returns the domain
/// and the host's error.
pub fn host_storage_problem(
    now: crate::time::Timestamp,
    grace: Duration,
    active: &[SdUuid],
    mine: &std::collections::BTreeMap<SdUuid, DomainView>,
    others: &[&std::collections::BTreeMap<SdUuid, DomainView>],
    bad_since: &mut std::collections::BTreeMap<SdUuid, crate::time::Timestamp>,
) -> Option<(SdUuid, String)> {
    bad_since.retain(|sd, _| active.contains(sd));
    let mut verdict = None;
    for sd in active {
        // Not checked yet (just connected): no judgement either way.
        let Some(view) = mine.get(sd) else { continue };
        if view.good() {
            bad_since.remove(sd);
            continue;
        }
        let since = *bad_since.entry(*sd).or_insert(now);
        let used_elsewhere = others.iter().any(|o| o.get(sd).is_some_and(DomainView::good));
        let long = now.as_millis() - since.as_millis() >= grace.as_millis() as i64;
        if long && used_elsewhere && verdict.is_none() {
            let error = match (&view.error, view.valid) {
                (Some(e), _) => e.clone(),
                (None, false) => "invalid".to_string(),
                (None, true) => "no host id in its lockspace".to_string(),
            };
            verdict = Some((*sd, error));
        }
    }
    verdict
}

#[cfg(test)]
mod storage_problem_tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn low_space_events_are_raised_once_per_period_and_level() {
        let t0 = Timestamp::from_millis(1_000_000);
        let min = |m: u64| t0.saturating_add(Duration::from_secs(60 * m));
        assert!(space_alert_due(None, LowSpace::Warning, t0), "the first");
        let warned = Some((LowSpace::Warning, t0));
        assert!(!space_alert_due(warned, LowSpace::Warning, min(60)));
        assert!(
            space_alert_due(warned, LowSpace::Warning, min(12 * 60)),
            "again after 12 h"
        );
        assert!(
            space_alert_due(warned, LowSpace::Critical, min(1)),
            "worse: at once"
        );
        let critical = Some((LowSpace::Critical, t0));
        assert!(!space_alert_due(critical, LowSpace::Critical, min(14)));
        assert!(
            space_alert_due(critical, LowSpace::Critical, min(15)),
            "again after 15 min"
        );
        assert!(
            space_alert_due(critical, LowSpace::Warning, min(1)),
            "better but still low"
        );
    }

    fn view(valid: bool, acquired: bool) -> DomainView {
        DomainView {
            valid,
            acquired,
            error: (!valid).then(|| "checksum mismatch".to_string()),
        }
    }

    #[test]
    fn a_host_is_blamed_only_after_the_grace_and_only_when_others_use_the_domain() {
        let (a, b) = (SdUuid::new_random(), SdUuid::new_random());
        let grace = Duration::from_secs(300);
        let t = |s: i64| Timestamp::from_millis(s * 1000);
        let mine = BTreeMap::from([(a, view(false, true)), (b, view(true, true))]);
        let peer_ok = BTreeMap::from([(a, view(true, true)), (b, view(true, true))]);
        let peer_bad = BTreeMap::from([(a, view(false, true))]);
        let mut since = BTreeMap::new();
        let active = [a, b];
        // First bad report starts the clock.
        assert_eq!(
            host_storage_problem(t(0), grace, &active, &mine, &[&peer_ok], &mut since),
            None
        );
        assert_eq!(since.get(&a), Some(&t(0)));
        assert_eq!(
            host_storage_problem(t(299), grace, &active, &mine, &[&peer_ok], &mut since),
            None
        );
        assert_eq!(
            host_storage_problem(t(300), grace, &active, &mine, &[&peer_ok], &mut since),
            Some((a, "checksum mismatch".into()))
        );
        // Bad everywhere: the domain's problem, nobody blamed; no peers: nobody to compare with.
        assert_eq!(
            host_storage_problem(t(400), grace, &active, &mine, &[&peer_bad], &mut since),
            None
        );
        assert_eq!(
            host_storage_problem(t(400), grace, &active, &mine, &[], &mut since),
            None
        );
        // A lost host id counts as bad too.
        let no_id = BTreeMap::from([(a, view(true, true)), (b, view(true, false))]);
        assert_eq!(
            host_storage_problem(t(500), grace, &active, &no_id, &[&peer_ok], &mut since),
            None
        );
        assert!(!since.contains_key(&a), "a good report clears the clock");
        assert_eq!(
            host_storage_problem(t(800), grace, &active, &no_id, &[&peer_ok], &mut since),
            Some((b, "no host id in its lockspace".into()))
        );
        // A domain that left the pool (or went inactive) is forgotten.
        assert_eq!(
            host_storage_problem(t(900), grace, &[a], &no_id, &[&peer_ok], &mut since),
            None
        );
        assert!(since.is_empty());
        // Not yet checked: no judgement.
        assert_eq!(
            host_storage_problem(t(2000), grace, &active, &BTreeMap::new(), &[&peer_ok], &mut since),
            None
        );
    }
}
