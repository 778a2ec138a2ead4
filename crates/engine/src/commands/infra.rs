//! Data centers, clusters and hosts.

use serde::{Deserialize, Serialize};

use crate::db::{ListQuery, VmFilter};
use crate::model::{
    Cluster, ClusterId, DataCenter, DcId, Host, HostStatus, HostUuid, SchedulingPolicy, VmStatus,
};

use super::{CommandError, Commands};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AddDataCenter {
    pub name: String,
    pub description: String,
    pub local: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddCluster {
    pub name: String,
    pub description: String,
    pub data_center: DcId,
    pub cpu_type: Option<String>,
    pub scheduling_policy: Option<SchedulingPolicy>,
    pub memory_overcommit_percent: Option<u32>,
    /// The cluster's own policy property values (see [`Cluster::scheduling_properties`]).
    #[serde(default)]
    pub scheduling_properties: std::collections::BTreeMap<String, String>,
    /// See [`Cluster::migration_bandwidth_mbps`].
    #[serde(default)]
    pub migration_bandwidth_mbps: Option<u32>,
    /// See [`Cluster::migration_encrypted`].
    #[serde(default)]
    pub migration_encrypted: bool,
}

/// The admin adds a host by name and address; it joins when its node enrolls (with a token, or
/// with the CA fingerprint — then this record is its approval).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddHost {
    pub name: String,
    /// `ip` or `ip:port` of the node API (default port 54321).
    pub address: String,
    pub cluster: ClusterId,
    pub spm_priority: Option<i32>,
}

impl Commands {
    pub async fn add_data_center(&self, req: AddDataCenter) -> Result<DataCenter, CommandError> {
        let mut dc = DataCenter::new(&req.name);
        dc.description = req.description;
        dc.local = req.local;
        let dc = self.app.db.dc_insert(&dc).await?;
        self.ensure_management_network(dc.id).await?;
        Ok(dc)
    }

    /// Removes a data center without storage or clusters (`force` detaches nothing: oVirt's
    /// force only skips storage cleanup, which oxvirt never needs for an empty data center).
    pub async fn remove_data_center(&self, id: DcId) -> Result<(), CommandError> {
        let dc = self.app.dc(id).await?;
        if !self.app.db.pool_members(id).await?.is_empty() {
            return Err(CommandError::Conflict(format!(
                "data center {} still has storage domains attached",
                dc.name
            )));
        }
        Ok(self.app.db.dc_delete(id).await?)
    }

    pub async fn add_cluster(&self, req: AddCluster) -> Result<Cluster, CommandError> {
        self.app.dc(req.data_center).await?;
        let mut cl = Cluster::new(&req.name, req.data_center);
        cl.description = req.description;
        if let Some(t) = req.cpu_type {
            cl.cpu_type = t;
        }
        if let Some(p) = req.scheduling_policy {
            cl.scheduling_policy = p;
        }
        if let Some(o) = req.memory_overcommit_percent {
            super::scheduling::check_overcommit(o)?;
            cl.memory_overcommit_percent = o;
        }
        cl.scheduling_properties =
            super::scheduling::check_scheduling_properties(&req.scheduling_properties)?;
        cl.migration_bandwidth_mbps =
            super::scheduling::check_migration_bandwidth(req.migration_bandwidth_mbps)?;
        cl.migration_encrypted = req.migration_encrypted;
        let cl = self.app.db.cluster_insert(&cl).await?;
        self.ensure_cluster_management(cl.id).await?;
        Ok(cl)
    }

    pub async fn remove_cluster(&self, id: ClusterId) -> Result<(), CommandError> {
        Ok(self.app.db.cluster_delete(id).await?)
    }

    pub async fn add_host(&self, req: AddHost) -> Result<Host, CommandError> {
        self.app.cluster(req.cluster).await?;
        let (address, port) = split_address(&req.address)?;
        let mut h = Host::new(&req.name, &address, port, req.cluster);
        if let Some(p) = req.spm_priority {
            if !(-1..=10).contains(&p) {
                return Err(CommandError::invalid(format!(
                    "SPM priority {p} is outside -1..=10"
                )));
            }
            h.spm_priority = p;
        }
        Ok(self.app.db.host_insert(&h).await?)
    }

    /// Records a host whose node just enrolled (or updates the one the admin added).
    pub async fn host_enrolled(
        &self,
        name: &str,
        address: &str,
        cluster: Option<ClusterId>,
        fingerprint: Option<String>,
    ) -> Result<Host, CommandError> {
        let (ip, port) = split_address(address)?;
        let db = &self.app.db;
        let mut h = match db.host_get_by_name(name).await? {
            Some(mut h) => {
                h.address = ip;
                h.port = port;
                h
            }
            None => {
                let cluster = match cluster {
                    Some(c) => c,
                    None => db
                        .cluster_list(&ListQuery::default())
                        .await?
                        .first()
                        .map(|c| c.id)
                        .ok_or_else(|| CommandError::Conflict("no cluster to put a new host in".into()))?,
                };
                db.host_insert(&Host::new(name, &ip, port, cluster)).await?
            }
        };
        h.certificate_fingerprint = fingerprint;
        let h = db.host_update(&h).await?;
        self.app.nodes.forget(h.id);
        // The monitor takes it from here to `up`.
        db.host_set_status(h.id, &[], HostStatus::Initializing, None)
            .await?;
        Ok(db.host_get(h.id).await?.unwrap_or(h))
    }

    /// Maintenance: the host must run no VMs (migrate or stop them first; the REST layer's
    /// `deactivate` does that through [`Commands::evacuate_host`]) and serve no image transfer.
    pub async fn host_maintenance(&self, id: HostUuid) -> Result<Host, CommandError> {
        let h = self.app.host(id).await?;
        // An image transfer's data goes through its host: it ends first, as in oVirt.
        if let Some(t) = self
            .app
            .db
            .transfer_list()
            .await?
            .into_iter()
            .find(|t| t.host_id == id && !t.phase.is_finished())
        {
            return Err(CommandError::Conflict(format!(
                "host {} serves image transfer {} of disk {} ({}): finalize or cancel it first",
                h.name, t.id, t.disk_id, t.phase
            )));
        }
        let running = self
            .app
            .db
            .vm_count(&VmFilter {
                host: Some(crate::db::Ref::Id(id)),
                ..Default::default()
            })
            .await?;
        if running > 0 {
            self.evacuate_host(id).await?;
        }
        let still = self
            .app
            .db
            .vm_list(&ListQuery {
                filter: VmFilter {
                    host: Some(crate::db::Ref::Id(id)),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await?;
        // Back to where it was (evacuation left it preparing for maintenance).
        let restore = async || {
            let _ = self
                .app
                .db
                .host_set_status(id, &[HostStatus::PreparingForMaintenance], h.status, None)
                .await;
        };
        if let Some(vm) = still.iter().find(|v| v.runtime.status != VmStatus::Down) {
            restore().await;
            return Err(CommandError::Conflict(format!(
                "host {} still runs VM {}",
                h.name, vm.name
            )));
        }
        if let Err(e) = self.release_spm_if_held(&h).await {
            restore().await;
            return Err(e);
        }
        self.app
            .db
            .host_set_status(id, &[], HostStatus::Maintenance, Some("maintenance requested"))
            .await?;
        self.app.host(id).await
    }

    /// Maintenance that an earlier engine left half done (a host still preparing for it: the
    /// engine stopped while emptying it) goes on, in the background: the VMs still there are
    /// moved or stopped and the host ends in maintenance. Answers the hosts it resumed.
    pub async fn resume_interrupted_maintenance(&self) -> Result<Vec<HostUuid>, CommandError> {
        let hosts = self
            .app
            .db
            .host_list(&ListQuery {
                filter: crate::db::HostFilter {
                    status: vec![HostStatus::PreparingForMaintenance],
                    ..Default::default()
                },
                ..Default::default()
            })
            .await?;
        let mut ids = Vec::new();
        for h in hosts {
            tracing::info!(host = %h.name, "resuming the maintenance an earlier engine began");
            let cmds = self.clone();
            tokio::spawn(async move {
                // Placing its VMs wants hosts this engine has seen: wait for a first poll of
                // every host recorded up (bounded), not the statuses an earlier engine left.
                let s = &cmds.app.settings;
                let bound = (s.monitor_interval + s.poll_timeout()) * 3;
                let start = std::time::Instant::now();
                while start.elapsed() < bound {
                    let up = cmds
                        .app
                        .db
                        .host_list(&ListQuery {
                            filter: crate::db::HostFilter {
                                status: vec![HostStatus::Up],
                                ..Default::default()
                            },
                            ..Default::default()
                        })
                        .await
                        .unwrap_or_default();
                    if up.iter().all(|u| cmds.app.host_rt(u.id).boot_id.is_some()) {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                if let Err(e) = cmds.host_maintenance(h.id).await {
                    tracing::warn!(host = %h.name, error = %e, "resumed maintenance failed");
                }
            });
            ids.push(h.id);
        }
        Ok(ids)
    }

    /// Out of maintenance: the monitor brings it up.
    pub async fn host_activate(&self, id: HostUuid) -> Result<Host, CommandError> {
        let h = self.app.host(id).await?;
        if h.status == HostStatus::Up {
            return Ok(h);
        }
        self.app
            .db
            .host_set_status(id, &[], HostStatus::Initializing, Some("activation requested"))
            .await?;
        self.app.host(id).await
    }

    pub async fn remove_host(&self, id: HostUuid) -> Result<(), CommandError> {
        let h = self.app.host(id).await?;
        if !matches!(
            h.status,
            HostStatus::Maintenance
                | HostStatus::NonResponsive
                | HostStatus::Installing
                | HostStatus::InstallFailed
                | HostStatus::PendingApproval
        ) {
            return Err(CommandError::Conflict(format!(
                "host {} is {}: move it to maintenance first",
                h.name, h.status
            )));
        }
        self.app.nodes.forget(id);
        Ok(self.app.db.host_delete(id).await?)
    }
}

/// `ip` or `ip:port` (IPv6 as `[addr]:port`); the default port is VDSM's 54321.
pub(crate) fn split_address(a: &str) -> Result<(String, u16), CommandError> {
    let bad = || CommandError::invalid(format!("host address {a:?} is not an IP address or ip:port"));
    if let Ok(sa) = a.parse::<std::net::SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    if let Ok(ip) = a.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return Ok((ip.to_string(), 54321));
    }
    Err(bad())
}
