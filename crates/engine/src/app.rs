//! The engine's application context: what commands, sagas and monitors share — the database,
//! the node clients and the settings.

use std::sync::Arc;
use std::time::Duration;

use oxvirt_types::HostId;

use crate::commands::CommandError;
use crate::db::Db;
use crate::model::{DataCenter, DcId, Host, HostStatus, SdUuid, SpmStatus, VmId};
use crate::nodes::{NodeClient, NodeClients};

/// Tunables; `Default` gives oVirt's production values.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Lease I/O timeout N for pools (renew 2N, fail 8N). oVirt: 10 s.
    pub io_timeout: Duration,
    /// Extra wait before a dead host's leases may be taken, covering its self-fencing. 60 s is
    /// safe with sanlock hosts in the pool; oxvirt-only pools may use less (see the lease crate).
    pub fence_margin: Duration,
    /// How often hosts are polled (events arrive in between).
    pub monitor_interval: Duration,
    /// Consecutive failed polls before a host is `non_responsive`.
    pub non_responsive_after: u32,
    /// Bound on one SPM task (volume creation, copy, merge).
    pub task_timeout: Duration,
    /// Bound on a live migration.
    pub migration_timeout: Duration,
    /// Accelerator VMs run with (`None`: each node's default).
    pub accel: Option<String>,
    /// How long a host may report a pool domain bad that other hosts use before it is
    /// `non_operational`. oVirt: 5 min (`StorageDomainFailureTimeoutInMinutes`).
    pub storage_problem_grace: Duration,
    /// How commands retry a step past their point of no return before waiting for an admin.
    pub forward_retry: crate::saga::ForwardRetry,
    /// How often the load balancer runs over each cluster. oVirt: one minute.
    pub balance_interval: Duration,
    /// How often the OVF stores are brought up to date. oVirt: one hour.
    pub ovf_update_interval: Duration,
}

impl EngineSettings {
    /// Bound on one monitoring call: a few polling intervals, 2 to 10 s. A frozen node turns
    /// non-responsive within `non_responsive_after` of these, not the transport's long timeout.
    pub fn poll_timeout(&self) -> Duration {
        (self.monitor_interval * 4).clamp(Duration::from_secs(2), Duration::from_secs(10))
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(10),
            fence_margin: Duration::from_secs(60),
            monitor_interval: Duration::from_secs(3),
            non_responsive_after: 3,
            task_timeout: Duration::from_secs(3600),
            migration_timeout: Duration::from_secs(600),
            accel: None,
            storage_problem_grace: Duration::from_secs(300),
            forward_retry: Default::default(),
            balance_interval: crate::balance::BALANCE_INTERVAL,
            ovf_update_interval: crate::commands::ovf::OVF_UPDATE_INTERVAL,
        }
    }
}

/// What monitoring knows about a host beyond its database row: live figures and the state of
/// its connection to the pool. In memory only — a restarted engine learns it again within one
/// monitoring round.
#[derive(Debug, Clone, Default)]
pub struct HostRuntime {
    pub cpu_load_pct: f64,
    pub mem_total_mib: u64,
    pub mem_free_mib: u64,
    pub swap_free_mib: u64,
    /// The host's last `Host.getStats` answer, as the node gave it (its statistics).
    pub stats: Option<serde_json::Value>,
    /// The node process's boot id: a change means it restarted and must be reconnected.
    pub boot_id: Option<String>,
    /// The pool and master version this host is connected with.
    pub pool: Option<(oxvirt_types::PoolUuid, i64)>,
    /// Storage domains the host reaches.
    pub domains: std::collections::BTreeSet<SdUuid>,
    /// Consecutive failed polls.
    pub failures: u32,
    /// The pool's domains as the host's domain monitor last saw them (`Host.getStorageRepoStats`).
    pub repo: std::collections::BTreeMap<SdUuid, crate::monitor::DomainView>,
    /// Since when the host has reported each domain bad.
    pub domain_bad_since: std::collections::BTreeMap<SdUuid, crate::time::Timestamp>,
    /// When the engine last fenced the host for holding the SPM role while unreachable.
    pub spm_fenced_at: Option<std::time::Instant>,
}

pub struct App {
    pub db: Db,
    pub nodes: NodeClients,
    pub settings: EngineSettings,
    pub hosts_rt: std::sync::Mutex<std::collections::HashMap<crate::model::HostUuid, HostRuntime>>,
    /// Wakes the monitor early (after a command changed what it watches).
    pub kick: tokio::sync::Notify,
    /// Held through an SPM election: the monitor's, or an admin's forced selection, never both.
    pub spm_elections: tokio::sync::Mutex<()>,
    /// Percent done of each running live migration, from the source node's progress events
    /// (in memory: it only means something while the migration runs).
    pub migration_progress: std::sync::Mutex<std::collections::HashMap<VmId, u8>>,
    /// The VMs' CPU use, from the monitor's samples (in memory, as oVirt's statistics are
    /// between two samples).
    pub vm_cpu: std::sync::Mutex<crate::balance::VmCpu>,
    /// Held while OVF stores are read or written (see `commands::ovf`).
    pub ovf_lock: tokio::sync::Mutex<()>,
    /// Attached domains whose storage was searched for OVF stores and held none (in memory: a
    /// restarted engine searches once more); cleared when a domain is detached.
    pub ovf_searched: std::sync::Mutex<std::collections::HashSet<SdUuid>>,
    /// The last low-space event raised per domain, and when (see `monitor::space_alert_due`;
    /// in memory, as oVirt's event flood regulator).
    pub space_alerts:
        std::sync::Mutex<std::collections::HashMap<SdUuid, (crate::model::LowSpace, crate::time::Timestamp)>>,
}

impl App {
    pub fn new(db: Db, nodes: NodeClients, settings: EngineSettings) -> Arc<App> {
        Arc::new(App {
            db,
            nodes,
            settings,
            hosts_rt: Default::default(),
            kick: tokio::sync::Notify::new(),
            spm_elections: tokio::sync::Mutex::new(()),
            migration_progress: Default::default(),
            vm_cpu: Default::default(),
            ovf_lock: Default::default(),
            ovf_searched: Default::default(),
            space_alerts: Default::default(),
        })
    }

    /// The last reported progress of `vm`'s live migration, while one runs.
    pub fn migration_progress(&self, vm: VmId) -> Option<u8> {
        self.migration_progress
            .lock()
            .expect("migration progress")
            .get(&vm)
            .copied()
    }

    pub fn host_rt(&self, id: crate::model::HostUuid) -> HostRuntime {
        self.hosts_rt
            .lock()
            .expect("host runtime")
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }

    pub fn update_host_rt(&self, id: crate::model::HostUuid, f: impl FnOnce(&mut HostRuntime)) {
        f(self.hosts_rt.lock().expect("host runtime").entry(id).or_default())
    }

    pub async fn dc(&self, id: DcId) -> Result<DataCenter, CommandError> {
        self.db
            .dc_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("data center", id))
    }

    pub async fn cluster(&self, id: crate::model::ClusterId) -> Result<crate::model::Cluster, CommandError> {
        self.db
            .cluster_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("cluster", id))
    }

    pub async fn host(&self, id: crate::model::HostUuid) -> Result<Host, CommandError> {
        self.db
            .host_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("host", id))
    }

    /// The data center a host belongs to (through its cluster).
    pub async fn host_dc(&self, h: &Host) -> Result<DataCenter, CommandError> {
        let cl = self.cluster(h.cluster_id).await?;
        self.dc(cl.data_center_id).await
    }

    pub fn client(&self, h: &Host) -> Result<NodeClient, CommandError> {
        Ok(self.nodes.client(h)?)
    }

    /// The client of host `id`.
    pub async fn host_client(&self, id: crate::model::HostUuid) -> Result<NodeClient, CommandError> {
        let h = self.host(id).await?;
        self.client(&h)
    }

    /// The SPM's client; a conflict when the data center has none.
    pub async fn spm(&self, dc: &DataCenter) -> Result<(Host, NodeClient), CommandError> {
        let host_id = match (dc.spm_status, dc.spm_host) {
            (SpmStatus::Spm, Some(h)) => h,
            _ => {
                return Err(CommandError::Conflict(format!(
                    "data center {} has no SPM yet",
                    dc.name
                )))
            }
        };
        let h = self.host(host_id).await?;
        if h.status != HostStatus::Up {
            return Err(CommandError::Conflict(format!(
                "the SPM of data center {} (host {}) is {}",
                dc.name, h.name, h.status
            )));
        }
        let c = self.client(&h)?;
        Ok((h, c))
    }

    /// Data center `id` and its SPM's client (a storage verb's target).
    pub async fn dc_spm(&self, id: DcId) -> Result<(DataCenter, NodeClient), CommandError> {
        let dc = self.dc(id).await?;
        let (_, spm) = self.spm(&dc).await?;
        Ok((dc, spm))
    }

    /// Up hosts of a data center.
    pub async fn dc_hosts(&self, dc: DcId, only_up: bool) -> Result<Vec<Host>, CommandError> {
        let q = crate::db::ListQuery {
            filter: crate::db::HostFilter {
                data_center: Some(crate::db::Ref::Id(dc)),
                status: if only_up { vec![HostStatus::Up] } else { vec![] },
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(self.db.host_list(&q).await?)
    }

    /// The host's id in the data center's lockspaces, allocated on first use.
    pub async fn lockspace_id(&self, dc: DcId, host: crate::model::HostUuid) -> Result<HostId, CommandError> {
        Ok(self.db.host_spm_id_allocate(dc, host).await?)
    }

    /// Connection id the engine uses for a domain's storage server connection.
    pub fn connection_id(sd: SdUuid) -> String {
        format!("sd-{sd}")
    }
}
