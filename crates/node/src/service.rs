//! The node's state and its dispatcher.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use oxvirt_qemu::Accel;
use oxvirt_rpc::RpcError;
use oxvirt_types::api::ErrorCode;
use oxvirt_types::VmId;

use crate::api::host::HostRequest;
use crate::api::{ApiError, Request};
use crate::events::EventBus;
use crate::host::HostSampler;
use crate::jobs::Jobs;
use crate::storage::pool::{PoolExtender, PoolService};
use crate::storage::resume::{Change, ResumeLog};
use crate::storage::StorageService;
use crate::vm::ksm::{Ksm, KsmRun, KsmState};
use crate::vm::{VmManager, VmManagerConfig, VmStatus};

/// How long a restarted node with running VMs waits for its own storage reconnect before it
/// serves (see `storage::resume`).
const RESUME_WAIT: Duration = Duration::from_secs(30);

/// Static configuration given on the command line or by the engine.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The host's name as the engine knows it.
    pub name: String,
    /// Run directory: QMP sockets, VM specs, pid files, mount points. Derivable state only.
    pub run_dir: PathBuf,
    /// Accelerator for VMs that do not ask for one.
    pub accel: Accel,
    /// Address incoming migrations listen on.
    pub migration_host: String,
    /// Network namespace holding the host network this node manages (`None`: its own).
    pub netns: Option<String>,
    /// Admin hook scripts run at VM lifecycle points (`None`: no hooks).
    pub hooks_dir: Option<PathBuf>,
    /// QEMU's TLS credentials for encrypted migrations (see [`crate::daemon`]); `None`: the
    /// node refuses them.
    pub migration_tls: Option<PathBuf>,
}

pub struct Node {
    pub config: NodeConfig,
    pub events: Arc<EventBus>,
    pub storage: Arc<StorageService>,
    /// The storage pool connection: host ids, SPM role, tasks, mailbox.
    pub pools: Arc<PoolService>,
    pub vms: Arc<VmManager>,
    /// Host networking: logical networks, rollback, VM taps.
    pub net: Arc<crate::net::NetworkService>,
    /// Image transfer tickets and NBD servers (the data plane is `imageio::http`).
    pub images: Arc<crate::imageio::ImageService>,
    pub jobs: Jobs,
    /// Kernel same-page merging (`/sys/kernel/mm/ksm`), reported and tuned as MoM does.
    pub ksm: Ksm,
    sampler: HostSampler,
    pub domain_monitor: crate::storage::monitor::DomainMonitor,
    /// One lock per VM id, held while its leases are taken for a new instance and while the
    /// leases of an instance that went down are given back: so a release meant for an old
    /// instance never takes the leases of the next one started right after it.
    lease_locks: std::sync::Mutex<std::collections::HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
    /// The last storage and pool connections the engine gave, replayed at start for VMs that
    /// outlived the previous process (see `storage::resume`).
    resume: ResumeLog,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeStartError {
    #[error("cannot start the VM manager")]
    Vm(#[from] crate::vm::VmError),
    #[error("cannot start the network service")]
    Net(#[from] crate::net::NetError),
}

impl Node {
    /// Serializes lease taking and giving back for one VM id (see `lease_locks`).
    pub(crate) async fn lock_vm_leases(&self, vm: VmId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .lease_locks
            .lock()
            .expect("lease locks")
            .entry(vm)
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Gives back, in the background, the leases of a VM reported down, unless a new
    /// instance of it runs by then (reports arrive late: a VM suspended and resumed at once,
    /// or powered off and started again, on this host). The publisher never waits for a start.
    fn release_leases_of_down_vm(self: Arc<Self>, vm: VmId) {
        tokio::spawn(async move { self.release_leases_if_down(vm).await });
    }

    /// Gives back the VM's leases unless an instance of it runs (under its lease lock).
    pub(crate) async fn release_leases_if_down(&self, vm: VmId) {
        let _g = self.lock_vm_leases(vm).await;
        match self.vms.status(vm) {
            Ok(info) if !info.status.is_down() => {
                tracing::debug!(vm_id = %vm, "a down report of an earlier instance: its leases stay with the new one");
            }
            _ => self.release_vm_leases(vm).await,
        }
    }

    /// Opens the run directory, recovering running VMs, and starts publishing their status
    /// changes as events.
    pub async fn start(config: NodeConfig) -> Result<Arc<Node>, NodeStartError> {
        let storage = Arc::new(StorageService::new(config.run_dir.join("mnt")));
        let pools = Arc::new(PoolService::new(storage.clone(), &config.name));
        let mut vm_cfg = VmManagerConfig::new(&config.run_dir);
        vm_cfg.migration_host = config.migration_host.clone();
        vm_cfg.migration_tls = config.migration_tls.clone();
        vm_cfg.hooks = crate::vm::hooks::Hooks::new(config.hooks_dir.clone(), Duration::from_secs(30));
        // Thin disks grow through the pool's mailbox (or locally on the SPM).
        vm_cfg.extender = Arc::new(PoolExtender {
            pools: pools.clone(),
            timeout: Duration::from_secs(60),
        });
        let events = Arc::new(EventBus::new());
        let net = crate::net::NetworkService::open(crate::net::NetConfig {
            state_dir: config.run_dir.join("net"),
            netns: config.netns.clone(),
            clock: Arc::new(oxvirt_lease::SystemClock),
            events: Some(events.clone()),
        })
        .await?;
        vm_cfg.networks = net.clone();
        let vms = VmManager::open(vm_cfg).await?;
        let resume = ResumeLog::open(&config.run_dir);
        let images = Arc::new(crate::imageio::ImageService::new(
            &config.run_dir,
            Arc::new(oxvirt_lease::SystemClock),
        ));
        let node = Arc::new(Node {
            images,
            storage,
            pools,
            jobs: Jobs::new(events.clone()),
            events,
            vms,
            net,
            config,
            ksm: Ksm::default(),
            sampler: HostSampler::new(),
            domain_monitor: Default::default(),
            lease_locks: Default::default(),
            resume,
        });
        // Self-fencing: losing our host id on a domain kills the VMs holding leases there,
        // confirmed by their exit, before other hosts may take those leases (8N + margin).
        let (vms, handle) = (node.vms.clone(), tokio::runtime::Handle::current());
        node.pools.set_fence_hook(Arc::new(move |sd| {
            let vms = vms.clone();
            handle.spawn(async move {
                match vms.fence_storage_domain(sd, Duration::from_secs(10)).await {
                    Ok(r) => tracing::error!(sd = %sd, killed = ?r.killed, elapsed_ms = r.elapsed_ms, "self-fenced VMs"),
                    Err(e) => tracing::error!(sd = %sd, error = %e, "self-fencing incomplete"),
                }
            });
        }));
        // VMs that outlived an earlier node process keep that process's host ids alive.
        let vms = node.vms.clone();
        node.pools
            .set_holders_probe(Arc::new(move |sd| vms.relies_on_domain(sd)));
        if node.vms.list().iter().any(|v| !v.status.is_down()) {
            // Bounded: a node whose storage hangs still comes up to answer the engine, and
            // the reconnect goes on behind.
            let resume = tokio::spawn(node.clone().resume_storage());
            if tokio::time::timeout(RESUME_WAIT, resume).await.is_err() {
                tracing::warn!(wait = ?RESUME_WAIT, "still reconnecting storage; serving meanwhile");
            }
        }
        tokio::spawn(publish_vm_status(Arc::downgrade(&node)));
        tokio::spawn(publish_migration_progress(Arc::downgrade(&node)));
        tokio::spawn(monitor_domains(Arc::downgrade(&node)));
        tokio::spawn(settle_io_pauses(Arc::downgrade(&node)));
        // SPM role changes go out as events at once (the engine elects and serves from them).
        let events = node.events.clone();
        node.pools.set_spm_observer(Arc::new(move |pool, host_id, st| {
            events.publish(
                format!("|storage|spm_status|{pool}"),
                json!({ "spUUID": pool, "hostID": host_id, "spmStatus": st.vdsm(), "state": to_json(st) }),
            );
        }));
        Ok(node)
    }

    /// Records a change of the storage connections for the next process (a failure is logged:
    /// the engine still reconnects a restarted node; only its absence makes the record matter).
    fn record_storage_change(&self, change: Change) {
        // Only the connections that did connect.
        let change = match change {
            Change::Connected(conns) => Change::Connected(
                conns
                    .into_iter()
                    .filter(|c| self.storage.connection_path(&c.id).is_some())
                    .collect(),
            ),
            other => other,
        };
        if let Err(e) = self.resume.apply(change) {
            tracing::error!(error = %crate::api::storage::error_chain(&e), "storage connections not recorded");
        }
    }

    /// Reconnects, for the VMs found running at start, the storage and the pool the previous
    /// process had, so their host ids are renewed again before the fence watchdog's deadline
    /// even with the engine away. Through the same requests the engine sends, so a pool
    /// connect takes the VMs' leases back; when the engine reconnects too, its requests find
    /// everything connected.
    async fn resume_storage(self: Arc<Self>) {
        use crate::api::storage::{PoolRequest, StorageRequest};
        let rec = self.resume.record();
        if rec.is_empty() {
            return;
        }
        tracing::info!(connections = rec.connections.len(), pool = ?rec.pool.as_ref().map(|p| p.pool),
            "VMs outlived the previous node process: reconnecting its storage");
        if !rec.connections.is_empty() {
            let req = StorageRequest::ConnectStorageServer {
                connections: rec.connections.clone(),
            };
            if let Err(e) = self.execute(Request::Storage(req)).await {
                tracing::error!(error = %e, "reconnecting the storage servers failed");
            }
        }
        let Some(mut p) = rec.pool else { return };
        // The engine may have moved the master while we were away: follow the newest master
        // the domains themselves name.
        let domains = self.storage.domains();
        let roots: Vec<_> = domains.iter().map(|(_, root)| root.clone()).collect();
        if let Ok((root, pm)) = oxvirt_storage::pool::find_master(&roots, p.pool) {
            if let Some((sd, _)) = domains.iter().find(|(_, r)| *r == root) {
                if pm.master_version > p.master_version {
                    tracing::info!(pool = %p.pool, master = %sd, version = pm.master_version, "the master moved while the node was away");
                    (p.master, p.master_version) = (*sd, pm.master_version);
                }
            }
        }
        let req = StorageRequest::Pool(PoolRequest::Connect(crate::api::storage::PoolConnect {
            pool: p.pool,
            host_id: p.host_id,
            master: p.master,
            master_version: p.master_version,
            io_timeout: p.io_timeout,
            fence_margin: p.fence_margin,
            max_host_id: p.max_host_id,
        }));
        match self.execute(Request::Storage(req)).await {
            Ok(_) => {
                tracing::info!(pool = %p.pool, host_id = p.host_id, "reconnected the storage pool after a restart")
            }
            Err(e) => {
                tracing::error!(pool = %p.pool, error = %e, "reconnecting the storage pool after a restart failed")
            }
        }
    }

    /// Parses and executes one call.
    pub async fn call(self: &Arc<Self>, method: &str, params: Map<String, Value>) -> Result<Value, RpcError> {
        let req = Request::parse(method, params)?;
        self.execute(req).await.map_err(RpcError::from)
    }

    pub async fn execute(self: &Arc<Self>, req: Request) -> Result<Value, ApiError> {
        match req {
            Request::Host(h) => self.execute_host(h).await,
            Request::Vm(v) => self.execute_vm(v).await,
            Request::Net(n) => crate::api::net::execute(self, n).await,
            Request::Transfer(t) => crate::api::transfer::execute(self, t).await,
            // It waits for other hosts' leases (up to 8N + M): a job, answered at once.
            Request::Storage(crate::api::storage::StorageRequest::Pool(
                crate::api::storage::PoolRequest::ForcedDetach(f),
            )) => {
                let timing = f.timing()?;
                let pools = self.pools.clone();
                let job = self.jobs.start("forcedDetach", None, async move {
                    let left =
                        tokio::task::spawn_blocking(move || pools.forced_detach(f.sd, f.host_id, timing))
                            .await
                            .map_err(|e| {
                                ApiError::new(
                                    oxvirt_types::api::ErrorCode::Unexpected,
                                    format!("forced detach worker failed: {e}"),
                                )
                            })??;
                    Ok(json!({ "pools": left }))
                });
                Ok(json!({ "jobID": job }))
            }
            Request::Storage(s) => {
                let connect = matches!(
                    s,
                    crate::api::storage::StorageRequest::Pool(crate::api::storage::PoolRequest::Connect(_))
                );
                let change = crate::api::storage::resume_change(&s);
                let r = crate::api::storage::execute(self.storage.clone(), self.pools.clone(), s).await?;
                if let Some(change) = change {
                    self.record_storage_change(change);
                }
                if connect {
                    self.readopt_vm_leases().await;
                }
                Ok(r)
            }
        }
    }

    async fn execute_host(&self, req: HostRequest) -> Result<Value, ApiError> {
        Ok(match req {
            HostRequest::Ping => json!({ "name": self.config.name, "bootId": self.events.boot_id() }),
            HostRequest::GetCapabilities => {
                let storage = self
                    .storage
                    .domains()
                    .into_iter()
                    .map(|(sd, path)| oxvirt_types::api::StorageConnectivity {
                        sd_uuid: sd.to_string(),
                        reachable: crate::host::path_reachable(&path.join("dom_md")),
                        path: path.display().to_string(),
                    })
                    .collect();
                let mut caps = to_json(&self.sampler.capabilities(storage));
                caps["verbs"] = json!(crate::api::verbs());
                if let Value::Object(net) = self.net.capabilities().await? {
                    caps.as_object_mut().expect("an object").extend(net);
                }
                caps
            }
            HostRequest::GetStats => {
                let mut stats = to_json(&self.sampler.stats(self.vms.list().len() as u32));
                // KSM as MoM sees it; a kernel without KSM reports why instead.
                let ksm = self.ksm.clone();
                let ksm = tokio::task::spawn_blocking(move || ksm.state())
                    .await
                    .map_err(|e| ApiError::new(ErrorCode::Unexpected, format!("KSM read failed: {e}")))?;
                let obj = stats.as_object_mut().expect("an object");
                match ksm {
                    Ok(k) => {
                        obj.insert("ksm".into(), ksm_json(&k));
                    }
                    Err(e) => {
                        obj.insert("ksm".into(), Value::Null);
                        obj.insert("ksmError".into(), json!(e.to_string()));
                    }
                }
                stats
            }
            HostRequest::SetKsmTune(tune) => {
                let ksm = self.ksm.clone();
                let t = tune.clone();
                let state = tokio::task::spawn_blocking(move || ksm.apply(&t))
                    .await
                    .map_err(|e| ApiError::new(ErrorCode::Unexpected, format!("KSM write failed: {e}")))??;
                tracing::info!(?tune, "KSM tuned");
                ksm_json(&state)
            }
            HostRequest::GetAllVmStats { monitor_timeout } => {
                // Each VM's stats are a few QMP round trips to its own QEMU: ask them all at
                // once, so the verb costs the slowest VM, not the sum of them.
                let infos = self.vms.list();
                let stats = futures_util::future::join_all(
                    infos.iter().map(|i| self.vms.stats_within(i.id, monitor_timeout)),
                )
                .await;
                Value::Array(
                    infos
                        .into_iter()
                        .zip(stats)
                        .map(|(info, stats)| {
                            let monitor = stats.as_ref().map_or(0, |s| s.monitor_response);
                            json!({ "vmID": info.id, "vmName": info.name, "status": to_json(&info.status),
                                    "pid": info.pid, "disks": to_json(&info.disks),
                                    "monitorResponse": monitor,
                                    "pauseCode": self.vms.pause_code(info.id).map(|c| c.vdsm_name()),
                                    "stats": stats.ok().map(|s| to_json(&s)) })
                        })
                        .collect(),
                )
            }
            HostRequest::GetJobs => to_json(&self.jobs.list()),
            HostRequest::GetStorageRepoStats => self.domain_monitor.repo_stats(std::time::Instant::now()),
        })
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("API types serialize")
}

/// KSM's state with VDSM's `getStats` names (`ksmState`, `ksmPages`) and the sysfs knobs.
fn ksm_json(k: &KsmState) -> Value {
    json!({
        "ksmState": k.run == KsmRun::Run,
        "run": match k.run { KsmRun::Stop => 0, KsmRun::Run => 1, KsmRun::Unmerge => 2 },
        "ksmPages": k.pages_to_scan,
        "pages_to_scan": k.pages_to_scan,
        "sleep_millisecs": k.sleep_millisecs,
        "merge_across_nodes": k.merge_across_nodes.map(u8::from),
        "pages_shared": k.pages_shared,
        "pages_sharing": k.pages_sharing,
        "full_scans": k.full_scans,
    })
}

/// The domain monitor's loop (see [`crate::storage::monitor`]): checks the connected pool's
/// domains each interval, each on its own blocking thread, and publishes changes.
async fn monitor_domains(node: std::sync::Weak<Node>) {
    use crate::storage::monitor::stat_json;
    let publish = |n: &Node, sd: oxvirt_types::SdUuid, c: &crate::storage::monitor::DomainCheck| {
        if !c.valid {
            tracing::warn!(sd = %sd, error = ?c.error, acquired = c.acquired, "storage domain check failed");
        }
        let mut body = stat_json(c, Duration::ZERO);
        body["sdUUID"] = json!(sd);
        n.events.publish(format!("|storage|domain_monitor|{sd}"), body);
    };
    loop {
        let interval = {
            let Some(n) = node.upgrade() else { return };
            match n.pools.current() {
                None => {
                    n.domain_monitor.retain(&[]);
                    Duration::from_secs(1)
                }
                Some(cp) => {
                    let domains = cp.monitored_domains();
                    n.domain_monitor.retain(&domains);
                    let interval = cp.monitor_interval();
                    for (sd, c) in n.domain_monitor.stuck(interval, std::time::Instant::now()) {
                        publish(&n, sd, &c);
                    }
                    for sd in domains {
                        if !n.domain_monitor.begin(sd, std::time::Instant::now()) {
                            continue;
                        }
                        let (cp, weak) = (cp.clone(), node.clone());
                        tokio::task::spawn_blocking(move || {
                            let check = cp.check_domain(sd);
                            let Some(n) = weak.upgrade() else { return };
                            if let Some(c) = n.domain_monitor.finish(sd, check, std::time::Instant::now()) {
                                publish(&n, sd, &c);
                            }
                        });
                    }
                    interval
                }
            }
        };
        tokio::time::sleep(interval).await;
    }
}

/// How often VMs stopped on storage errors are looked at (cheap: no I/O, no QMP unless one
/// is acted on). The domain monitor's interval (≥ 0.5 s) dominates the resume latency.
const IO_PAUSE_TICK: Duration = Duration::from_millis(200);

/// Resumes or kills VMs stopped on storage errors as their resume behaviour and the domain
/// monitor's checks decide (see [`crate::vm::io_errors`]). Acts one VM at a time, awaiting
/// each, so a VM is never acted on twice for one pause.
async fn settle_io_pauses(node: std::sync::Weak<Node>) {
    use crate::vm::io_errors::{kill_after, verdict, IoPause, ResumeBackoff, Verdict};
    let mut backoff: std::collections::HashMap<oxvirt_types::VmId, ResumeBackoff> = Default::default();
    loop {
        tokio::time::sleep(IO_PAUSE_TICK).await;
        let Some(n) = node.upgrade() else { return };
        let now = std::time::Instant::now();
        backoff.retain(|_, b| !b.stale(now));
        let paused = n.vms.io_paused();
        if paused.is_empty() {
            continue;
        }
        let cp = n.pools.current();
        let io_timeout = cp
            .as_ref()
            .map_or(oxvirt_lease::timeouts::DEFAULT_IO_TIMEOUT, |cp| cp.io_timeout());
        let interval = cp.as_ref().map_or(io_timeout, |cp| cp.monitor_interval());
        for p in paused {
            let seen: Vec<_> = p.domains.iter().map(|sd| n.domain_monitor.seen(*sd)).collect();
            let now = std::time::Instant::now();
            let b = backoff.entry(p.id).or_default();
            let stopped = IoPause {
                since: b.stopped_since(p.pause.since),
                ..p.pause
            };
            match verdict(p.behavior, stopped, &seen, now, kill_after(io_timeout)) {
                Verdict::Wait => {}
                Verdict::Resume => {
                    if !b.ready(p.pause.since, now, interval) {
                        continue;
                    }
                    b.resumed(p.pause.since, now);
                    if let Err(e) = n.vms.resume_after_io_error(p.id).await {
                        tracing::warn!(vm_id = %p.id, error = %e, "resume after the storage error failed");
                    }
                }
                Verdict::Kill => {
                    let paused_for = now.saturating_duration_since(stopped.since);
                    if let Err(e) = n.vms.kill_paused(p.id, paused_for).await {
                        tracing::error!(vm_id = %p.id, error = %e, "cannot kill a VM paused too long");
                    }
                }
            }
        }
    }
}

/// Publishes each progress sample of an outgoing migration (`|virt|VM_migration_progress|<id>`).
async fn publish_migration_progress(node: std::sync::Weak<Node>) {
    use tokio::sync::broadcast::error::RecvError;
    let Some(mut samples) = node.upgrade().map(|n| n.vms.migration_progress()) else {
        return;
    };
    loop {
        match samples.recv().await {
            Ok(p) => {
                let Some(n) = node.upgrade() else { return };
                n.events.publish(
                    format!("|virt|VM_migration_progress|{}", p.vm),
                    json!({ "vmID": p.vm, "progress": p.progress, "remainingBytes": p.remaining_bytes,
                            "totalBytes": p.total_bytes, "mbps": p.mbps, "elapsedMs": p.elapsed_ms }),
                );
            }
            // Samples are superseded by the next one: losing some is harmless.
            Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

/// Publishes `|virt|VM_status|<vmID>` on every VM status change, from the manager's change
/// stream (so a pause undone a millisecond later is still two events), plus a VM's first
/// status when it appears and its removal when it leaves the manager (checked every 100 ms).
async fn publish_vm_status(node: std::sync::Weak<Node>) {
    use tokio::sync::broadcast::error::RecvError;
    let Some(mut changes) = node.upgrade().map(|n| n.vms.changes()) else {
        return;
    };
    let mut known: std::collections::HashSet<VmId> = Default::default();
    loop {
        let change = tokio::time::timeout(Duration::from_millis(100), changes.recv()).await;
        let Some(n) = node.upgrade() else { return };
        let publish = async |id: VmId, status: &VmStatus| {
            n.events.publish(
                format!("|virt|VM_status|{id}"),
                json!({ "vmID": id, "status": to_json(status) }),
            );
            // A VM that stopped (crashed, powered off, migrated away) gives up its lease.
            if status.is_down() {
                n.clone().release_leases_of_down_vm(id);
            }
        };
        let listed = n.vms.list();
        let mut just_published = None;
        match change {
            Ok(Ok((id, status))) => {
                publish(id, &status).await;
                just_published = Some(id);
            }
            // Missed changes: everyone's current status instead.
            Ok(Err(RecvError::Lagged(_))) => {
                for i in &listed {
                    publish(i.id, &i.status).await;
                }
            }
            Ok(Err(RecvError::Closed)) => return,
            Err(_) => {} // the periodic look for VMs that came or went
        }
        let now: std::collections::HashSet<VmId> = listed.iter().map(|i| i.id).collect();
        for i in listed
            .iter()
            .filter(|i| !known.contains(&i.id) && just_published != Some(i.id))
        {
            publish(i.id, &i.status).await;
        }
        // A destroyed VM leaves the manager; its last word is that it is down and gone.
        for id in known.iter().filter(|id| !now.contains(id)) {
            n.clone().release_leases_of_down_vm(*id);
            n.events.publish(
                format!("|virt|VM_status|{id}"),
                json!({ "vmID": id, "status": { "state": "down" }, "removed": true }),
            );
        }
        known = now;
    }
}
