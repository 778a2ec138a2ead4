//! Host networking: VDSM's `setupNetworks` with its safety rollback, and VM taps.
//!
//! [`NetworkService`] owns the host's logical networks as the engine defines them: Linux
//! bridges named after VM networks, VLAN devices, bonds, MTUs, IPv4 addresses and the default
//! route, all through rtnetlink ([`rtnl`]) in the node's network namespace ([`netns`]). What
//! to change is decided by the pure planner in [`model`]; this module runs the plan.
//!
//! A change with the connectivity check (the default) goes through these states:
//!
//! ```text
//!   Idle ──setupNetworks──► Pending{previous, snapshot, deadline}
//!     ▲                         │            │
//!     │   setSafeNetworkConfig  │            │ deadline passes (clock)
//!     └─────────────────────────┘            ▼
//!     ▲                               RollingBack ── restores previous + snapshot ──┐
//!     └──────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! While pending, the previous configuration and a snapshot of every host NIC the change
//! touches (master, MTU, state, addresses, default route) are kept in memory and in
//! `<run_dir>/net/pending.json`; if the engine does not confirm (`Host.setSafeNetworkConfig`)
//! before the deadline, the node restores them by itself — also after a node restart, using the
//! wall-clock deadline from the file. A change that fails half-way is rolled back at once.
//! Another change is refused while one is pending.
//!
//! The node persists only the engine's configuration (`running.json`) and the pending record,
//! both in its run directory; a rebooted host gets its networks from the engine again.
//!
//! DHCP is the node's own client ([`dhcp`]), one thread per link, started and stopped by the
//! plan's `StartDhcp`/`StopDhcp` ops and restarted when the node opens the service again. Its
//! lease changes come back here and are applied through netlink under the client table's lock,
//! so a stopped client's late lease can never land after the plan removed its address. It
//! touches nothing but the link's address and (when the network says so) the default route:
//! not `/etc/resolv.conf`, not the hostname.
//!
//! VLANs and bonds are created through netlink; a kernel without them (no 8021q or bonding
//! module) is detected by a throwaway probe link before anything changes and reported as
//! [`NetError::KernelFeature`].
//!
//! Invariant: a refused request changes nothing; an accepted one is either confirmed or undone.
//! Invariant: links not named by the old or new configuration are never touched (except VM
//! taps, which [`NetworkService::plug_tap`] creates and [`NetworkService::unplug_tap`] deletes).

pub mod dhcp;
pub mod model;
pub mod netns;
pub mod rtnl;
pub mod tap;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use oxvirt_lease::clock::{Clock, Wake};
use serde::{Deserialize, Serialize};
use serde_json::json;

use self::model::{
    needed_features, plan, Desired, HostNet, Ipv4Cidr, KernelFeature, Link, LinkStats, Op, RunningConfig,
    SetupNetworks, Snapshot,
};
use self::netns::NetNs;
use self::rtnl::{Rtnl, RtnlError};
use crate::events::EventBus;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid network configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("{what} needs {}, which this host's kernel lacks ({detail})", .feature.describe())]
    KernelFeature {
        feature: KernelFeature,
        what: String,
        detail: String,
    },
    #[error("a network change awaits the engine's confirmation (rollback in {remaining_secs} s); confirm it with Host.setSafeNetworkConfig first")]
    Pending { remaining_secs: u64 },
    #[error("network {0:?} is not on this host")]
    NoNetwork(String),
    #[error("bridge {bridge:?} is in use by VM taps {taps:?}; unplug or migrate those NICs first")]
    InUse { bridge: String, taps: Vec<String> },
    #[error("network {0:?} is not a VM network (it has no bridge)")]
    NotVmNetwork(String),
    #[error("network {network:?}: its bridge is missing from the host")]
    BridgeMissing { network: String },
    #[error("applying the network change failed at {op}; {}", if *.rolled_back { "the previous configuration was restored" } else { "restoring the previous configuration failed too" })]
    Apply {
        op: String,
        #[source]
        source: RtnlError,
        rolled_back: bool,
    },
    #[error("netlink")]
    Rtnl(#[from] RtnlError),
    #[error("tap {name}")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {name:?}")]
    Namespace {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network state file {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What `setupNetworks` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetupReport {
    /// `pending` (awaiting confirmation) or `done`.
    pub status: String,
    /// Seconds until the automatic rollback, while pending.
    pub rollback_in_secs: Option<u64>,
    /// Kernel changes made.
    pub changes: usize,
    pub elapsed_ms: u64,
}

/// What a rollback did (also published as the `|net|rollback|` event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RollbackReport {
    pub changes: usize,
    pub errors: Vec<String>,
    pub elapsed_ms: u64,
}

/// `<run_dir>/net/pending.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingRecord {
    previous: RunningConfig,
    snapshot: Snapshot,
    /// Milliseconds since the Unix epoch; survives node restarts.
    wall_deadline_ms: u64,
}

struct Pending {
    seq: u64,
    record: PendingRecord,
    /// On the service's clock.
    deadline: Duration,
    wake: Arc<Wake>,
}

struct State {
    running: RunningConfig,
    pending: Option<Pending>,
    seq: u64,
}

/// The host's network service. Changes are serialized.
pub struct NetworkService {
    ns: NetNs,
    rtnl: Rtnl,
    clock: Arc<dyn Clock>,
    dir: PathBuf,
    state: tokio::sync::Mutex<State>,
    events: Option<Arc<EventBus>>,
    rt: tokio::runtime::Handle,
    /// Weak self, for watchdog threads.
    this: Mutex<Weak<NetworkService>>,
    /// Rollbacks done since start (for tests and stats).
    rollbacks: Mutex<Vec<RollbackReport>>,
    /// The DHCP clients by link. Lease changes are applied under this lock.
    dhcp: tokio::sync::Mutex<BTreeMap<String, DhcpClient>>,
    dhcp_generation: AtomicU64,
    /// Where the clients' threads send their lease changes.
    leases: tokio::sync::mpsc::UnboundedSender<LeaseUpdate>,
}

struct DhcpClient {
    /// Tells this client's lease changes from those of one it replaced.
    generation: u64,
    client: dhcp::Client,
    /// The lease in force, as last applied.
    lease: Option<dhcp::Lease>,
}

struct LeaseUpdate {
    link: String,
    generation: u64,
    default_route: bool,
    change: dhcp::Change,
}

/// How to open the service.
pub struct NetConfig {
    /// Holds `running.json`, `pending.json` and DHCP client files.
    pub state_dir: PathBuf,
    /// `None`: the node's own namespace.
    pub netns: Option<String>,
    pub clock: Arc<dyn Clock>,
    pub events: Option<Arc<EventBus>>,
}

impl NetworkService {
    /// Opens the service; a change left pending by a previous node process resumes its
    /// countdown (rolling back at once if its deadline has passed).
    pub async fn open(cfg: NetConfig) -> Result<Arc<NetworkService>, NetError> {
        let ns = match &cfg.netns {
            None => NetNs::current(),
            Some(n) => NetNs::named(n).map_err(|source| NetError::Namespace {
                name: n.clone(),
                source,
            })?,
        };
        let rtnl = Rtnl::connect(&ns).map_err(|source| NetError::Namespace {
            name: cfg.netns.clone().unwrap_or_else(|| "(own)".into()),
            source,
        })?;
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| NetError::State {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let running: RunningConfig = read_json(&cfg.state_dir.join("running.json"))?.unwrap_or_default();
        let pending: Option<PendingRecord> = read_json(&cfg.state_dir.join("pending.json"))?;
        let (lease_tx, mut lease_rx) = tokio::sync::mpsc::unbounded_channel();
        let svc = Arc::new(NetworkService {
            ns,
            rtnl,
            clock: cfg.clock,
            dir: cfg.state_dir,
            state: tokio::sync::Mutex::new(State {
                running,
                pending: None,
                seq: 0,
            }),
            events: cfg.events,
            rt: tokio::runtime::Handle::current(),
            this: Mutex::new(Weak::new()),
            rollbacks: Mutex::new(Vec::new()),
            dhcp: tokio::sync::Mutex::new(BTreeMap::new()),
            dhcp_generation: AtomicU64::new(0),
            leases: lease_tx,
        });
        *svc.this.lock().unwrap() = Arc::downgrade(&svc);
        let weak = Arc::downgrade(&svc);
        tokio::spawn(async move {
            while let Some(u) = lease_rx.recv().await {
                let Some(svc) = weak.upgrade() else { break };
                svc.apply_lease(u).await;
            }
        });
        if let Some(rec) = pending {
            let remaining = Duration::from_millis(rec.wall_deadline_ms.saturating_sub(wall_ms()));
            tracing::warn!(
                remaining_ms = remaining.as_millis() as u64,
                "resuming a pending network change"
            );
            let mut st = svc.state.lock().await;
            svc.arm(&mut st, rec, remaining);
        }
        svc.resume_dhcp().await?;
        Ok(svc)
    }

    /// Starts the DHCP clients of the configuration in force (the node's threads died with its
    /// previous process), each asking for the address its link still has.
    async fn resume_dhcp(&self) -> Result<(), NetError> {
        // Held throughout, so a rollback due at once runs before or after, not in between.
        let st = self.state.lock().await;
        let desired = st.running.desired();
        let host = self.rtnl.observe().await?;
        for (name, spec) in &desired.links {
            if spec.ipv4 != model::Ipv4Want::Dhcp || !host.links.contains_key(name) {
                continue;
            }
            let prefer = host.links[name].ipv4.first().map(|a| a.addr);
            let route = desired.dhcp_default_route.as_deref() == Some(name.as_str());
            if let Err(e) = self.start_dhcp(name, route, prefer).await {
                tracing::warn!(link = %name, error = %e, "cannot restart the DHCP client");
            }
        }
        Ok(())
    }

    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    pub async fn running(&self) -> RunningConfig {
        self.state.lock().await.running.clone()
    }

    /// Seconds until the pending change rolls back, if one is pending.
    pub async fn pending_secs(&self) -> Option<u64> {
        let st = self.state.lock().await;
        st.pending
            .as_ref()
            .map(|p| p.deadline.saturating_sub(self.clock.now()).as_secs())
    }

    pub fn rollbacks(&self) -> Vec<RollbackReport> {
        self.rollbacks.lock().unwrap().clone()
    }

    pub async fn observe(&self) -> Result<HostNet, NetError> {
        Ok(self.rtnl.observe().await?)
    }

    /// `Host.setupNetworks`.
    pub async fn setup_networks(&self, req: SetupNetworks) -> Result<SetupReport, NetError> {
        let start = Instant::now();
        let mut st = self.state.lock().await;
        if let Some(p) = &st.pending {
            return Err(NetError::Pending {
                remaining_secs: p.deadline.saturating_sub(self.clock.now()).as_secs(),
            });
        }
        let next = st
            .running
            .with_changes(&req)
            .map_err(|e| NetError::Invalid(vec![e]))?;
        let host = self.rtnl.observe().await?;
        let old = st.running.desired();
        next.validate(&host, &old.owned()).map_err(NetError::Invalid)?;
        let new = next.desired();
        let have = needed_features(&old);
        for f in needed_features(&new).difference(&have) {
            self.probe(*f, &new).await?;
        }
        let snapshot = Snapshot::take(&host, &old, &new);
        let ops = plan(&host, &old, &new);
        // Deleting a bridge would cut its VMs off (VDSM's "bridge is in use").
        for op in &ops {
            if let Op::DeleteLink { name } = op {
                let taps: Vec<String> = host
                    .links
                    .values()
                    .filter(|l| l.kind.as_deref() == Some("tun") && l.master.as_deref() == Some(name))
                    .map(|l| l.name.clone())
                    .collect();
                if !taps.is_empty() {
                    return Err(NetError::InUse {
                        bridge: name.clone(),
                        taps,
                    });
                }
            }
        }
        let check = req.options.connectivity_check;
        let timeout = Duration::from_secs(req.options.connectivity_timeout);
        let record = PendingRecord {
            previous: st.running.clone(),
            snapshot,
            wall_deadline_ms: wall_ms() + timeout.as_millis() as u64,
        };
        // Written before the first change: a node that dies mid-change rolls back on restart.
        self.write_state("pending.json", &record)?;
        tracing::info!(changes = ops.len(), ?ops, "setupNetworks: applying");
        if let Err((op, source)) = self.apply(&ops).await {
            tracing::error!(%op, error = %source, "setupNetworks failed; rolling back");
            let rb = self.restore(&new, &record).await;
            let rolled_back = rb.errors.is_empty();
            self.remove_state("pending.json");
            return Err(NetError::Apply {
                op,
                source,
                rolled_back,
            });
        }
        st.running = next;
        self.write_state("running.json", &st.running)?;
        let elapsed_ms = start.elapsed().as_millis() as u64;
        if check {
            self.arm(&mut st, record, timeout);
            tracing::info!(
                elapsed_ms,
                timeout_s = timeout.as_secs(),
                "setupNetworks applied; awaiting confirmation"
            );
            Ok(SetupReport {
                status: "pending".into(),
                rollback_in_secs: Some(timeout.as_secs()),
                changes: ops.len(),
                elapsed_ms,
            })
        } else {
            self.remove_state("pending.json");
            Ok(SetupReport {
                status: "done".into(),
                rollback_in_secs: None,
                changes: ops.len(),
                elapsed_ms,
            })
        }
    }

    /// `Host.setSafeNetworkConfig`: the engine reached us; the current configuration stays.
    /// Returns whether a change was pending.
    pub async fn confirm(&self) -> Result<bool, NetError> {
        let mut st = self.state.lock().await;
        let Some(p) = st.pending.take() else {
            return Ok(false);
        };
        p.wake.signal();
        self.remove_state("pending.json");
        tracing::info!("network change confirmed");
        Ok(true)
    }

    /// Starts the countdown of a pending change.
    fn arm(&self, st: &mut State, record: PendingRecord, timeout: Duration) {
        st.seq += 1;
        let seq = st.seq;
        let deadline = self.clock.now() + timeout;
        let wake = Arc::new(Wake::new());
        st.pending = Some(Pending {
            seq,
            record,
            deadline,
            wake: wake.clone(),
        });
        let clock = self.clock.clone();
        let this = self.this.lock().unwrap().clone();
        let rt = self.rt.clone();
        std::thread::Builder::new()
            .name("net-rollback".into())
            .spawn(move || {
                if clock.sleep_until(deadline, &wake) {
                    return;
                }
                if let Some(svc) = this.upgrade() {
                    rt.block_on(svc.rollback_pending(seq));
                }
            })
            .expect("spawn the rollback watchdog");
    }

    /// The deadline passed without confirmation: restore the previous configuration.
    async fn rollback_pending(&self, seq: u64) {
        let mut st = self.state.lock().await;
        match &st.pending {
            Some(p) if p.seq == seq => {}
            _ => return,
        }
        let p = st.pending.take().expect("checked");
        tracing::warn!("network change not confirmed in time; rolling back");
        let current = st.running.desired();
        let report = self.restore(&current, &p.record).await;
        st.running = p.record.previous.clone();
        if let Err(e) = self.write_state("running.json", &st.running) {
            tracing::error!(error = %e, "cannot record the restored network configuration");
        }
        self.remove_state("pending.json");
        if let Some(ev) = &self.events {
            ev.publish(
                "|net|rollback|",
                serde_json::to_value(&report).unwrap_or_default(),
            );
        }
        self.rollbacks.lock().unwrap().push(report);
    }

    /// Takes the host from `current` back to the record's previous configuration and NIC
    /// snapshot. Best effort: every op is tried; failures are reported.
    async fn restore(&self, current: &Desired, rec: &PendingRecord) -> RollbackReport {
        let start = Instant::now();
        let target = Desired::rollback_target(&rec.previous.desired(), &rec.snapshot);
        let mut errors = Vec::new();
        let mut changes = 0;
        // Twice at most: a first pass may fail on an op that a later one unblocks.
        for _ in 0..2 {
            let host = match self.rtnl.observe().await {
                Ok(h) => h,
                Err(e) => {
                    errors.push(e.to_string());
                    break;
                }
            };
            let ops = plan(&host, current, &target);
            if ops.is_empty() {
                errors.clear();
                break;
            }
            errors.clear();
            for op in &ops {
                changes += 1;
                if let Err(e) = self.run_op(op).await {
                    errors.push(e.to_string());
                }
            }
            if errors.is_empty() {
                break;
            }
        }
        let report = RollbackReport {
            changes,
            errors,
            elapsed_ms: start.elapsed().as_millis() as u64,
        };
        tracing::warn!(changes, errors = ?report.errors, elapsed_ms = report.elapsed_ms, "network configuration restored");
        report
    }

    async fn apply(&self, ops: &[Op]) -> Result<(), (String, RtnlError)> {
        for op in ops {
            self.run_op(op).await.map_err(|e| (format!("{op:?}"), e))?;
        }
        Ok(())
    }

    async fn run_op(&self, op: &Op) -> Result<(), RtnlError> {
        match op {
            Op::StartDhcp { name, default_route } => self.start_dhcp(name, *default_route, None).await,
            Op::StopDhcp { name } => {
                self.stop_dhcp(name).await;
                Ok(())
            }
            _ => self.rtnl.execute(op).await,
        }
    }

    /// Starts the DHCP client of `link`, replacing one already running there.
    async fn start_dhcp(
        &self,
        link: &str,
        default_route: bool,
        prefer: Option<std::net::Ipv4Addr>,
    ) -> Result<(), RtnlError> {
        let mut clients = self.dhcp.lock().await;
        if let Some(old) = clients.remove(link) {
            let _ = tokio::task::spawn_blocking(move || old.client.stop()).await;
        }
        let generation = self.dhcp_generation.fetch_add(1, Ordering::SeqCst);
        let tx = self.leases.clone();
        let name = link.to_string();
        let on_change = Box::new(move |change| {
            let _ = tx.send(LeaseUpdate {
                link: name.clone(),
                generation,
                default_route,
                change,
            });
        });
        let client =
            dhcp::Client::start(&self.ns, link, prefer, self.clock.clone(), on_change).map_err(|e| {
                RtnlError {
                    what: format!("DHCP client on {link}"),
                    errno: e.raw_os_error(),
                    detail: e.to_string(),
                }
            })?;
        tracing::info!(link, default_route, "DHCP client started");
        clients.insert(
            link.to_string(),
            DhcpClient {
                generation,
                client,
                lease: None,
            },
        );
        Ok(())
    }

    async fn stop_dhcp(&self, link: &str) {
        let mut clients = self.dhcp.lock().await;
        if let Some(old) = clients.remove(link) {
            let _ = tokio::task::spawn_blocking(move || old.client.stop()).await;
            tracing::info!(link, "DHCP client stopped");
        }
    }

    /// Links with a DHCP client running.
    pub async fn dhcp_links(&self) -> Vec<String> {
        self.dhcp.lock().await.keys().cloned().collect()
    }

    /// Applies a lease change of a client that is still the link's current one.
    async fn apply_lease(&self, u: LeaseUpdate) {
        let mut clients = self.dhcp.lock().await;
        let Some(entry) = clients.get_mut(&u.link).filter(|c| c.generation == u.generation) else {
            return;
        };
        entry.lease = match &u.change {
            dhcp::Change::Bound { lease, .. } => Some(lease.clone()),
            dhcp::Change::Lost(_) => None,
        };
        let link = u.link.clone();
        let mut ops = Vec::new();
        let event = match &u.change {
            dhcp::Change::Bound { lease, replaces } => {
                if let Some(old) = replaces {
                    ops.push(Op::DelAddr {
                        name: link.clone(),
                        addr: old.addr,
                    });
                }
                ops.push(Op::AddAddr {
                    name: link.clone(),
                    addr: lease.addr,
                });
                if let (true, Some(gateway)) = (u.default_route, lease.router) {
                    ops.push(Op::ReplaceDefaultRoute(model::DefaultRoute {
                        gateway,
                        dev: link.clone(),
                    }));
                }
                json!({"link": link, "state": "bound", "address": lease.addr.to_string(),
                       "router": lease.router.map(|r| r.to_string()), "server": lease.server.to_string(),
                       "leaseSecs": lease.lease_time.as_secs()})
            }
            dhcp::Change::Lost(lease) => {
                ops.push(Op::DelAddr {
                    name: link.clone(),
                    addr: lease.addr,
                });
                json!({"link": link, "state": "lost", "address": lease.addr.to_string()})
            }
        };
        for op in &ops {
            match self.rtnl.execute(op).await {
                // A renewal adds the address the link already has.
                Err(e) if matches!(op, Op::AddAddr { .. }) && e.errno == Some(libc::EEXIST) => {}
                Err(e) => tracing::warn!(link, op = ?op, error = %e, "applying a DHCP lease failed"),
                Ok(()) => {}
            }
        }
        drop(clients);
        if let Some(ev) = &self.events {
            ev.publish("|net|dhcp|", event);
        }
    }

    /// Checks that the kernel can make `feature`'s links, with a throwaway link, and names the
    /// first network that needs it when it cannot.
    async fn probe(&self, feature: KernelFeature, d: &Desired) -> Result<(), NetError> {
        let tag = std::process::id() % 100_000;
        let base = format!("oxprb{tag}");
        let what = d
            .links
            .iter()
            .find(|(_, s)| match feature {
                KernelFeature::Vlan => matches!(s.kind, model::LinkKind::Vlan { .. }),
                KernelFeature::Bonding => matches!(s.kind, model::LinkKind::Bond(_)),
            })
            .map(|(n, _)| format!("link {n}"))
            .unwrap_or_default();
        let (probe, cleanup) = match feature {
            KernelFeature::Vlan => {
                let vlan = format!("oxprv{tag}");
                self.rtnl
                    .execute(&Op::CreateBridge { name: base.clone() })
                    .await?;
                let r = self
                    .rtnl
                    .execute(&Op::CreateVlan {
                        name: vlan.clone(),
                        base: base.clone(),
                        id: 1,
                    })
                    .await;
                (r, vec![vlan, base])
            }
            KernelFeature::Bonding => {
                let bond = format!("oxprb{tag}");
                let r = self
                    .rtnl
                    .execute(&Op::CreateBond {
                        name: bond.clone(),
                        options: model::BondOptions { mode: 1, miimon: 100 },
                    })
                    .await;
                (r, vec![bond])
            }
        };
        for name in cleanup {
            let _ = self.rtnl.execute(&Op::DeleteLink { name }).await;
        }
        match probe {
            Ok(()) => Ok(()),
            Err(e) if e.errno == Some(libc::EOPNOTSUPP) => Err(NetError::KernelFeature {
                feature,
                what,
                detail: format!(
                    "creating a {} link: {}; /sys/module/{} {}",
                    match feature {
                        KernelFeature::Vlan => "vlan",
                        KernelFeature::Bonding => "bond",
                    },
                    e.detail,
                    feature.module(),
                    if Path::new("/sys/module").join(feature.module()).exists() {
                        "exists"
                    } else {
                        "is absent"
                    }
                ),
            }),
            Err(e) => Err(NetError::Rtnl(e)),
        }
    }

    // ---- VM taps ----------------------------------------------------------------------------

    /// Creates tap `tap` on the bridge of VM network `network`, with the bridge's MTU, up.
    pub async fn plug_tap(&self, tap: &str, network: &str) -> Result<(), NetError> {
        {
            let st = self.state.lock().await;
            let n = st
                .running
                .networks
                .get(network)
                .ok_or_else(|| NetError::NoNetwork(network.to_string()))?;
            if !n.bridged {
                return Err(NetError::NotVmNetwork(network.to_string()));
            }
        }
        match self.rtnl.index(network).await {
            Ok(_) => {}
            Err(e) if e.errno == Some(libc::ENODEV) => {
                return Err(NetError::BridgeMissing {
                    network: network.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        }
        // A tap of this name can only be a leftover of this very NIC.
        self.unplug_tap(tap).await?;
        tap::create_tap(&self.ns, tap).map_err(|source| NetError::Tap {
            name: tap.to_string(),
            source,
        })?;
        if let Err(e) = self.rtnl.enslave(tap, network).await {
            let _ = self.unplug_tap(tap).await;
            return Err(e.into());
        }
        tracing::info!(tap, network, "tap plugged");
        Ok(())
    }

    /// Deletes tap `tap` if it exists.
    pub async fn unplug_tap(&self, tap: &str) -> Result<(), NetError> {
        self.rtnl
            .execute(&Op::DeleteLink {
                name: tap.to_string(),
            })
            .await
            .map_err(NetError::from)
    }

    // ---- Reporting --------------------------------------------------------------------------

    /// The `networks`/`nics`/`bridges`/`vlans`/`bonds` sections of `Host.getCapabilities`.
    pub async fn capabilities(&self) -> Result<serde_json::Value, NetError> {
        let host = self.rtnl.observe().await?;
        let (running, pending) = {
            let st = self.state.lock().await;
            (
                st.running.clone(),
                st.pending
                    .as_ref()
                    .map(|p| p.deadline.saturating_sub(self.clock.now()).as_secs()),
            )
        };
        let owned = running.desired().owned();
        let now = self.clock.now();
        let leases: BTreeMap<String, Option<serde_json::Value>> = self
            .dhcp
            .lock()
            .await
            .iter()
            .map(|(link, c)| {
                let lease = c.lease.as_ref().map(|l| {
                    json!({"address": l.addr.to_string(), "router": l.router, "server": l.server,
                           "expiresInSecs": (l.acquired + l.lease_time).saturating_sub(now).as_secs()})
                });
                (link.clone(), lease)
            })
            .collect();
        let link_json = |l: &Link| {
            json!({
                "name": l.name, "mtu": l.mtu, "up": l.up, "carrier": l.carrier, "hwaddr": l.mac,
                "ipv4addrs": l.ipv4.iter().map(Ipv4Cidr::to_string).collect::<Vec<_>>(),
                "master": l.master, "dhcpv4": leases.contains_key(&l.name),
            })
        };
        let mut nics = BTreeMap::new();
        let mut bridges = BTreeMap::new();
        let mut vlans = BTreeMap::new();
        let mut bonds = BTreeMap::new();
        for l in host.links.values() {
            match l.kind.as_deref() {
                Some("bridge") => {
                    let ports: Vec<&str> = host
                        .links
                        .values()
                        .filter(|p| p.master.as_deref() == Some(&l.name))
                        .map(|p| p.name.as_str())
                        .collect();
                    let mut j = link_json(l);
                    j["ports"] = json!(ports);
                    bridges.insert(l.name.clone(), j);
                }
                Some("vlan") => {
                    let mut j = link_json(l);
                    if let Some((base, id)) = &l.vlan {
                        j["iface"] = json!(base);
                        j["vlanid"] = json!(id);
                    }
                    vlans.insert(l.name.clone(), j);
                }
                Some("bond") => {
                    let slaves: Vec<&str> = host
                        .links
                        .values()
                        .filter(|p| p.master.as_deref() == Some(&l.name))
                        .map(|p| p.name.as_str())
                        .collect();
                    let mut j = link_json(l);
                    j["slaves"] = json!(slaves);
                    bonds.insert(l.name.clone(), j);
                }
                Some("tun") => {}
                _ if l.name == "lo" || owned.contains(&l.name) => {}
                _ => {
                    nics.insert(l.name.clone(), link_json(l));
                }
            }
        }
        let mut networks = BTreeMap::new();
        for (name, n) in &running.networks {
            let d = RunningConfig {
                networks: [(name.clone(), n.clone())].into(),
                bondings: running.bondings.clone(),
            }
            .desired();
            let missing: Vec<&String> = d.links.keys().filter(|l| !host.links.contains_key(*l)).collect();
            let top = n.top(name);
            let top_link = top.as_ref().and_then(|t| host.links.get(t));
            networks.insert(
                name.clone(),
                json!({
                    "bridged": n.bridged, "bridge": n.bridged.then_some(name),
                    "iface": top, "nic": n.nic, "bonding": n.bonding, "vlan": n.vlan,
                    "mtu": top_link.map(|l| l.mtu), "bootproto": n.bootproto,
                    "ipv4addrs": top_link.map(|l| l.ipv4.iter().map(Ipv4Cidr::to_string).collect::<Vec<_>>()),
                    "gateway": n.gateway.map(|g| g.to_string()).or_else(|| {
                        let lease = top.as_ref().and_then(|t| leases.get(t)).and_then(Option::as_ref);
                        lease.and_then(|l| l["router"].as_str().map(str::to_string))
                    }),
                    "dhcpLease": top.as_ref().and_then(|t| leases.get(t)).cloned().flatten(),
                    "defaultRoute": n.default_route,
                    "present": missing.is_empty(), "missingLinks": missing,
                }),
            );
        }
        Ok(json!({
            "networks": networks, "nics": nics, "bridges": bridges, "vlans": vlans, "bonds": bonds,
            "defaultRoute": host.default_route,
            "pendingNetworkChange": pending.map(|s| json!({ "rollbackInSecs": s })),
        }))
    }

    /// `Host.getNetworkStats`: per-link counters (VM taps included).
    pub async fn stats(&self) -> Result<BTreeMap<String, NetStats>, NetError> {
        let host = self.rtnl.observe().await?;
        Ok(host
            .links
            .into_values()
            .filter(|l| l.name != "lo")
            .map(|l| {
                (
                    l.name.clone(),
                    NetStats {
                        state: if l.up && l.carrier { "up" } else { "down" }.into(),
                        kind: l.kind.unwrap_or_else(|| "nic".into()),
                        counters: l.stats,
                    },
                )
            })
            .collect())
    }

    // ---- State files ------------------------------------------------------------------------

    fn write_state<T: Serialize>(&self, file: &str, v: &T) -> Result<(), NetError> {
        let path = self.dir.join(file);
        write_json_atomic(&path, v).map_err(|source| NetError::State { path, source })
    }

    fn remove_state(&self, file: &str) {
        let path = self.dir.join(file);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(path = %path.display(), error = %e, "cannot remove network state file");
            }
        }
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetStats {
    pub state: String,
    pub kind: String,
    #[serde(flatten)]
    pub counters: LinkStats,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, NetError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| NetError::State {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NetError::State {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Temp file, fsync, rename, fsync the directory.
fn write_json_atomic<T: Serialize>(path: &Path, v: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
