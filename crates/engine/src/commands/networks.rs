//! Networks: logical networks of data centers (with the management network each data center
//! and cluster gets), their attachment to clusters, host network setup, host compliance for
//! the monitor, the scheduler's network input, and VM NICs.
//!
//! Host network setup is a saga ([`SetupNetworksSaga`]):
//!
//! ```text
//!   apply ──► confirm ──► record
//! ```
//!
//! - `apply`: `Host.setupNetworks` with the connectivity check; the node applies the change
//!   and waits for a confirmation (a change that fails half-way it undoes at once);
//! - `confirm`: the engine calls the host again over the network it manages it through and,
//!   when that works, `Host.setSafeNetworkConfig`. When the host no longer answers, nothing is
//!   confirmed and the node restores its previous configuration by itself at the deadline —
//!   which is why neither step has an undo: the node owns the rollback;
//! - `record`: the host's attachments in the database, and what it now reports.
//!
//! VM NICs: on a VM that is down only the database changes. On a running VM (up or paused) a
//! plugged NIC is hot plugged on its host, unplugging hot unplugs it, and `linked` sets the
//! link state; network, MAC and model of a plugged NIC of a running VM cannot change (unplug
//! it first). The node is called before the database is written, and a NIC row added for a
//! hot plug that then fails is removed again, so a refused change leaves the NIC as it was.
//!
//! MAC addresses come from the VM's cluster pool (see `Db::nic_insert_pooled`): a NIC row is
//! the allocation, so removing the NIC releases its address.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::app::App;
use crate::model::{
    ClusterId, DcId, Host, HostStatus, HostUuid, MacAddr, Nic, NicId, NicInterface, VmId, VmStatus,
};
use crate::network::{
    host_compliance, host_networks, node_nic, setup_networks_request, validate_network, with_bonds,
    ClusterNetwork, Compliance, HostAttachment, HostBond, LogicalNetwork, MacPool, MacRange,
    NetworkAttachment, NetworkAttachmentId, NetworkId, MANAGEMENT_NETWORK,
};
use crate::nodes::NodeClient;
use crate::saga::{SagaDef, Step, StepCtx, StepError};

use super::step_err;
use super::{CommandError, Commands};

/// A new logical network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddNetwork {
    pub name: String,
    pub description: String,
    pub data_center: DcId,
    pub mtu: Option<u32>,
    pub vlan: Option<u16>,
    pub vm_network: bool,
}

/// Changes to a logical network (`None`: unchanged; `Some(None)`: back to the default).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateNetwork {
    pub name: Option<String>,
    pub description: Option<String>,
    pub mtu: Option<Option<u32>>,
    pub vlan: Option<Option<u16>>,
    pub vm_network: Option<bool>,
}

/// A `setupNetworks` on one host: networks to attach (or re-attach differently), networks to
/// detach.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetupHostNetworks {
    pub attach: Vec<(NetworkId, HostAttachment)>,
    pub detach: Vec<NetworkId>,
    /// Bonds to create or change; a network attached to one names it as its NIC.
    #[serde(default)]
    pub bonds: Vec<HostBond>,
    /// Bonds to delete, by name.
    #[serde(default)]
    pub removed_bonds: Vec<String>,
    /// Wait for the engine's confirmation on the node and roll back without it (oVirt's
    /// `check_connectivity`, default on).
    pub check_connectivity: bool,
    /// Seconds the node waits for the confirmation (VDSM's default 120).
    pub connectivity_timeout: Option<u64>,
}

impl Default for SetupHostNetworks {
    fn default() -> Self {
        SetupHostNetworks {
            attach: Vec::new(),
            detach: Vec::new(),
            bonds: Vec::new(),
            removed_bonds: Vec::new(),
            check_connectivity: true,
            connectivity_timeout: None,
        }
    }
}

/// A new VM NIC. `network` is a network of the VM's data center by name (`None`: oVirt's empty
/// profile, no network); `mac: None` takes the next address of the cluster's pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddNic {
    pub name: String,
    pub network: Option<String>,
    pub mac: Option<MacAddr>,
    pub interface: NicInterface,
    pub plugged: bool,
    pub linked: bool,
}

impl AddNic {
    pub fn on(name: &str, network: Option<&str>) -> AddNic {
        AddNic {
            name: name.to_string(),
            network: network.map(str::to_string),
            mac: None,
            interface: NicInterface::Virtio,
            plugged: true,
            linked: true,
        }
    }
}

/// Changes to a VM NIC (`None`: unchanged; `network: Some(None)`: the empty profile).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateNic {
    pub name: Option<String>,
    pub network: Option<Option<String>>,
    pub mac: Option<MacAddr>,
    pub interface: Option<NicInterface>,
    pub plugged: Option<bool>,
    pub linked: Option<bool>,
}

/// Whether a VM's NIC changes go to a node: `Some(host)` when it runs, `None` when it is down.
fn hot_host(vm: &crate::model::Vm) -> Result<Option<HostUuid>, CommandError> {
    match vm.runtime.status {
        VmStatus::Down => Ok(None),
        VmStatus::Up | VmStatus::Paused => vm
            .runtime
            .run_on_host
            .map(Some)
            .ok_or_else(|| CommandError::Conflict(format!("VM {} runs nowhere", vm.name))),
        s => Err(CommandError::Conflict(format!(
            "VM {} is {s}: NICs change while it is down, up or paused",
            vm.name
        ))),
    }
}

impl Commands {
    // ---- Logical networks -----------------------------------------------------------------

    pub async fn add_network(&self, req: AddNetwork) -> Result<LogicalNetwork, CommandError> {
        self.app.dc(req.data_center).await?;
        let mut n = LogicalNetwork::new(&req.name, req.data_center);
        n.description = req.description;
        n.mtu = req.mtu;
        n.vlan = req.vlan;
        n.vm_network = req.vm_network;
        let others = self.app.db.network_list(Some(req.data_center)).await?;
        validate_network(&n, &others).map_err(|e| CommandError::invalid(e.to_string()))?;
        let n = self.app.db.network_insert(&n).await?;
        tracing::info!(network = %n.name, dc = %n.data_center_id, vlan = ?n.vlan, mtu = ?n.mtu, "logical network added");
        Ok(n)
    }

    pub async fn network(&self, id: NetworkId) -> Result<LogicalNetwork, CommandError> {
        self.app
            .db
            .network_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("network", id))
    }

    /// Changes a network. Its name (the bridge's on hosts), VLAN, MTU and kind are fixed while
    /// hosts carry it, and its name while NICs use it.
    pub async fn update_network(
        &self,
        id: NetworkId,
        req: UpdateNetwork,
    ) -> Result<LogicalNetwork, CommandError> {
        let old = self.network(id).await?;
        let mut n = old.clone();
        if let Some(x) = req.name {
            n.name = x;
        }
        if let Some(x) = req.description {
            n.description = x;
        }
        if let Some(x) = req.mtu {
            n.mtu = x;
        }
        if let Some(x) = req.vlan {
            n.vlan = x;
        }
        if let Some(x) = req.vm_network {
            n.vm_network = x;
        }
        let wire_changed =
            n.name != old.name || n.mtu != old.mtu || n.vlan != old.vlan || n.vm_network != old.vm_network;
        if wire_changed && self.app.db.network_attachment_count(id).await? > 0 {
            return Err(CommandError::Conflict(format!(
                "network {} is set up on hosts: detach it from them before changing its name, VLAN, MTU or kind",
                old.name
            )));
        }
        if n.name != old.name {
            if old.name == MANAGEMENT_NETWORK {
                return Err(CommandError::Conflict(format!(
                    "the management network {MANAGEMENT_NETWORK} keeps its name"
                )));
            }
            if self.app.db.network_nic_count(&old).await? > 0 {
                return Err(CommandError::Conflict(format!(
                    "network {} is used by VM NICs: it keeps its name",
                    old.name
                )));
            }
        }
        if !n.vm_network && old.vm_network && self.app.db.network_nic_count(&old).await? > 0 {
            return Err(CommandError::Conflict(format!(
                "network {} is used by VM NICs: it stays a VM network",
                old.name
            )));
        }
        let others = self.app.db.network_list(Some(n.data_center_id)).await?;
        validate_network(&n, &others).map_err(|e| CommandError::invalid(e.to_string()))?;
        Ok(self.app.db.network_update(&n).await?)
    }

    /// Removes a network no NIC, host or cluster (as its management network) uses.
    pub async fn remove_network(&self, id: NetworkId) -> Result<(), CommandError> {
        let n = self.network(id).await?;
        if self
            .app
            .db
            .network_clusters(id)
            .await?
            .iter()
            .any(|(_, c)| c.management)
        {
            return Err(CommandError::Conflict(format!(
                "network {} is a cluster's management network",
                n.name
            )));
        }
        let nics = self.app.db.network_nic_count(&n).await?;
        if nics > 0 {
            return Err(CommandError::Conflict(format!(
                "network {} is used by {nics} VM NIC(s)",
                n.name
            )));
        }
        let hosts = self.app.db.network_attachment_count(id).await?;
        if hosts > 0 {
            return Err(CommandError::Conflict(format!(
                "network {} is set up on {hosts} host(s): detach it first",
                n.name
            )));
        }
        self.app.db.network_delete(id).await?;
        Ok(())
    }

    /// The data center's management network, created when it has none (data centers made
    /// before networks existed get theirs here).
    pub async fn ensure_management_network(&self, dc: DcId) -> Result<LogicalNetwork, CommandError> {
        if let Some(n) = self.app.db.network_get_by_name(dc, MANAGEMENT_NETWORK).await? {
            return Ok(n);
        }
        let mut n = LogicalNetwork::new(MANAGEMENT_NETWORK, dc);
        n.description = "Management Network".into();
        match self.app.db.network_insert(&n).await {
            Ok(n) => Ok(n),
            // Another command created it at the same time.
            Err(e) if e.is_already_exists() => self
                .app
                .db
                .network_get_by_name(dc, MANAGEMENT_NETWORK)
                .await?
                .ok_or_else(|| CommandError::not_found("network", MANAGEMENT_NETWORK)),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives a cluster its data center's management network when it has no management network.
    pub async fn ensure_cluster_management(&self, cluster: ClusterId) -> Result<(), CommandError> {
        if self
            .app
            .db
            .cluster_networks(cluster)
            .await?
            .iter()
            .any(|c| c.management)
        {
            return Ok(());
        }
        let cl = self.app.cluster(cluster).await?;
        let mgmt = self.ensure_management_network(cl.data_center_id).await?;
        self.app
            .db
            .cluster_network_set(cluster, mgmt.id, true, true)
            .await?;
        Ok(())
    }

    /// The networks attached to a cluster, with their definitions.
    pub async fn cluster_networks(
        &self,
        cluster: ClusterId,
    ) -> Result<Vec<(LogicalNetwork, ClusterNetwork)>, CommandError> {
        self.ensure_cluster_management(cluster).await?;
        let mut out = Vec::new();
        for cn in self.app.db.cluster_networks(cluster).await? {
            out.push((self.network(cn.network_id).await?, cn));
        }
        Ok(out)
    }

    /// Attaches a network of the cluster's data center to it (or changes whether it is
    /// required). Hosts lacking a required network turn `non_operational` at the next
    /// monitoring round.
    pub async fn attach_cluster_network(
        &self,
        cluster: ClusterId,
        network: NetworkId,
        required: bool,
    ) -> Result<ClusterNetwork, CommandError> {
        let cl = self.app.cluster(cluster).await?;
        let n = self.network(network).await?;
        if n.data_center_id != cl.data_center_id {
            return Err(CommandError::invalid(format!(
                "network {} belongs to another data center than cluster {}",
                n.name, cl.name
            )));
        }
        self.ensure_cluster_management(cluster).await?;
        let current = self.app.db.cluster_networks(cluster).await?;
        let management = current.iter().any(|c| c.network_id == network && c.management);
        if management && !required {
            return Err(CommandError::Conflict(format!(
                "network {} is cluster {}'s management network: it is always required",
                n.name, cl.name
            )));
        }
        self.app
            .db
            .cluster_network_set(cluster, network, required, management)
            .await?;
        self.app.kick.notify_one();
        Ok(ClusterNetwork {
            network_id: network,
            name: n.name,
            required,
            management,
        })
    }

    pub async fn detach_cluster_network(
        &self,
        cluster: ClusterId,
        network: NetworkId,
    ) -> Result<(), CommandError> {
        let current = self.app.db.cluster_networks(cluster).await?;
        let cn = current
            .iter()
            .find(|c| c.network_id == network)
            .ok_or_else(|| CommandError::not_found("cluster network", network))?;
        if cn.management {
            return Err(CommandError::Conflict(format!(
                "network {} is the cluster's management network",
                cn.name
            )));
        }
        self.app.db.cluster_network_remove(cluster, network).await?;
        self.app.kick.notify_one();
        Ok(())
    }

    // ---- MAC pools -------------------------------------------------------------------------

    /// The cluster's MAC address pool (ranges, and the addresses its NICs use).
    pub async fn mac_pool(&self, cluster: ClusterId) -> Result<MacPool, CommandError> {
        self.app.cluster(cluster).await?;
        Ok(self.app.db.mac_pool_of(cluster).await?)
    }

    /// Replaces the ranges of a cluster's pool (each unicast, non-empty, none overlapping).
    /// NICs keep their addresses, inside the new ranges or not; new NICs draw from the new ones.
    pub async fn set_mac_pool_ranges(
        &self,
        cluster: ClusterId,
        ranges: Vec<MacRange>,
    ) -> Result<MacPool, CommandError> {
        self.mac_pool(cluster).await?;
        MacPool::new(ranges.clone()).map_err(|e| CommandError::invalid(e.to_string()))?;
        self.app.db.mac_pool_set_ranges(cluster, &ranges).await?;
        self.mac_pool(cluster).await
    }

    // ---- Hosts ------------------------------------------------------------------------------

    /// The host's `Host.getCapabilities` network sections, live.
    pub async fn host_network_capabilities(&self, host: HostUuid) -> Result<Value, CommandError> {
        let h = self.app.host(host).await?;
        let node = self.app.client(&h)?;
        Ok(node.call("Host.getCapabilities", json!({})).await?)
    }

    /// Applies a network change on a host through `Host.setupNetworks` with the connectivity
    /// check, confirms it, and records the host's attachments; returns them.
    pub async fn setup_host_networks(
        &self,
        host: HostUuid,
        req: SetupHostNetworks,
        correlation_id: Option<String>,
    ) -> Result<Vec<NetworkAttachment>, CommandError> {
        let h = self.app.host(host).await?;
        if !matches!(
            h.status,
            HostStatus::Up | HostStatus::NonOperational | HostStatus::Maintenance
        ) {
            return Err(CommandError::Conflict(format!(
                "host {} is {}: its networks change while it is up, non-operational or in maintenance",
                h.name, h.status
            )));
        }
        let dc = self.app.host_dc(&h).await?;
        let defs: BTreeMap<String, LogicalNetwork> = self
            .app
            .db
            .network_list(Some(dc.id))
            .await?
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        let by_id = |id: NetworkId| {
            defs.values().find(|n| n.id == id).ok_or_else(|| {
                CommandError::invalid(format!("network {id} is not in data center {}", dc.name))
            })
        };
        let current = self.app.db.host_attachments(host).await?;
        let mut attach = BTreeMap::new();
        let mut set = Vec::new();
        for (id, a) in &req.attach {
            let n = by_id(*id)?;
            if attach.insert(n.name.clone(), a.clone()).is_some() {
                return Err(CommandError::invalid(format!(
                    "network {} is attached twice in one request",
                    n.name
                )));
            }
            set.push(NetworkAttachment {
                id: current
                    .iter()
                    .find(|c| c.network_id == *id)
                    .map(|c| c.id)
                    .unwrap_or_else(NetworkAttachmentId::new_random),
                host_id: host,
                network_id: *id,
                network: n.name.clone(),
                attachment: a.clone(),
            });
        }
        let caps = self.host_network_capabilities(host).await?;
        let on_host = caps["networks"].as_object().cloned().unwrap_or_default();
        let mut removals = BTreeSet::new();
        for id in &req.detach {
            let n = by_id(*id)?;
            let known = current.iter().any(|c| c.network_id == *id);
            if !known && !on_host.contains_key(&n.name) {
                return Err(CommandError::invalid(format!(
                    "network {} is not attached to host {}",
                    n.name, h.name
                )));
            }
            if on_host.contains_key(&n.name) {
                removals.insert(n.name.clone());
            }
        }
        let mut request = setup_networks_request(&defs, &attach, &removals).map_err(CommandError::Invalid)?;
        let host_bonds: BTreeSet<String> = caps["bonds"]
            .as_object()
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default();
        let removed_bonds = req.removed_bonds.iter().cloned().collect();
        with_bonds(&mut request, &req.bonds, &removed_bonds, &host_bonds).map_err(CommandError::Invalid)?;
        request["options"] = json!({
            "connectivityCheck": req.check_connectivity,
            "connectivityTimeout": req.connectivity_timeout.unwrap_or(120),
        });
        self.run::<SetupNetworksSaga>(
            SetupNetworksParams {
                host,
                host_name: h.name.clone(),
                request,
                check_connectivity: req.check_connectivity,
                set,
                removed: req.detach.clone(),
            },
            correlation_id,
        )
        .await?;
        Ok(self.app.db.host_attachments(host).await?)
    }

    // ---- VM NICs ----------------------------------------------------------------------------

    pub(super) async fn nic_network_check(
        &self,
        dc: DcId,
        network: &Option<String>,
    ) -> Result<(), CommandError> {
        let Some(name) = network else {
            return Ok(());
        };
        let n =
            self.app.db.network_get_by_name(dc, name).await?.ok_or_else(|| {
                CommandError::invalid(format!("network {name} is not in the VM's data center"))
            })?;
        if !n.vm_network {
            return Err(CommandError::invalid(format!(
                "network {name} is not a VM network: VM NICs cannot use it"
            )));
        }
        Ok(())
    }

    async fn vm_and_dc(&self, vm: VmId) -> Result<(crate::model::Vm, DcId), CommandError> {
        let v = self
            .app
            .db
            .vm_get(vm)
            .await?
            .ok_or_else(|| CommandError::not_found("VM", vm))?;
        let cl = self.app.cluster(v.cluster_id).await?;
        Ok((v, cl.data_center_id))
    }

    pub(super) async fn node_of(&self, host: HostUuid) -> Result<NodeClient, CommandError> {
        let h = self.app.host(host).await?;
        self.app.client(&h)
    }

    /// Adds a NIC; on a running VM a plugged NIC is hot plugged.
    pub async fn add_nic(&self, vm: VmId, req: AddNic) -> Result<Nic, CommandError> {
        let (v, dc) = self.vm_and_dc(vm).await?;
        if req.name.is_empty() {
            return Err(CommandError::invalid("a NIC needs a name"));
        }
        self.nic_network_check(dc, &req.network).await?;
        let hot = hot_host(&v)?;
        let nic = Nic {
            id: NicId::new_random(),
            vm_id: vm,
            name: req.name,
            network: req.network,
            mac: MacAddr([0; 6]),
            interface: req.interface,
            plugged: req.plugged,
            linked: req.linked,
        };
        let nic = self
            .app
            .db
            .nic_insert_pooled(&nic, v.cluster_id, req.mac)
            .await
            .map_err(|e| match e {
                crate::db::DbError::AlreadyExists { kind, key } => {
                    CommandError::Conflict(format!("{kind} {key} of VM {} is already in use", v.name))
                }
                crate::db::DbError::Exhausted { what } => {
                    CommandError::Conflict(format!("no free {what} for VM {}", v.name))
                }
                crate::db::DbError::Invalid { what, detail } => {
                    CommandError::invalid(format!("{what} of VM {}: {detail}", v.name))
                }
                other => other.into(),
            })?;
        if let (Some(h), true) = (hot, nic.plugged) {
            let r = async {
                self.node_of(h)
                    .await?
                    .call("VM.hotplugNic", json!({ "vmID": vm, "nic": node_nic(&nic) }))
                    .await
                    .map_err(CommandError::from)
            }
            .await;
            if let Err(e) = r {
                self.app.db.nic_remove(nic.id).await?;
                return Err(e);
            }
        }
        tracing::info!(vm = %v.name, nic = %nic.name, mac = %nic.mac, network = ?nic.network, hot = hot.is_some(), "NIC added");
        Ok(nic)
    }

    async fn vm_nic(&self, vm: VmId, nic: NicId) -> Result<Nic, CommandError> {
        self.app
            .db
            .nic_get(nic)
            .await?
            .filter(|n| n.vm_id == vm)
            .ok_or_else(|| CommandError::not_found("NIC", nic))
    }

    /// Changes a NIC; on a running VM plugging, unplugging and the link state go to its host.
    pub async fn update_nic(&self, vm: VmId, nic: NicId, req: UpdateNic) -> Result<Nic, CommandError> {
        let (v, dc) = self.vm_and_dc(vm).await?;
        let old = self.vm_nic(vm, nic).await?;
        let mut n = old.clone();
        if let Some(x) = req.name {
            if x.is_empty() {
                return Err(CommandError::invalid("a NIC needs a name"));
            }
            n.name = x;
        }
        if let Some(x) = req.network {
            n.network = x;
        }
        if let Some(x) = req.mac {
            if x.0[0] & 1 == 1 {
                return Err(CommandError::invalid(format!(
                    "MAC address {x} is not a unicast address"
                )));
            }
            n.mac = x;
        }
        if let Some(x) = req.interface {
            n.interface = x;
        }
        if let Some(x) = req.plugged {
            n.plugged = x;
        }
        if let Some(x) = req.linked {
            n.linked = x;
        }
        if n.network != old.network {
            self.nic_network_check(dc, &n.network).await?;
        }
        if let Some(h) = hot_host(&v)? {
            let wiring = n.network != old.network || n.mac != old.mac || n.interface != old.interface;
            let node = self.node_of(h).await?;
            match (old.plugged, n.plugged) {
                (true, true) if wiring => {
                    return Err(CommandError::Conflict(format!(
                    "NIC {} of running VM {} is plugged: unplug it before changing its network, MAC or model",
                    old.name, v.name
                )))
                }
                (true, true) if n.linked != old.linked => {
                    node.call(
                        "VM.setLinkState",
                        json!({ "vmID": vm, "mac": old.mac, "linkActive": n.linked && n.network.is_some() }),
                    )
                    .await?;
                }
                (true, false) => {
                    node.call("VM.hotunplugNic", json!({ "vmID": vm, "mac": old.mac }))
                        .await?;
                }
                (false, true) => {
                    node.call("VM.hotplugNic", json!({ "vmID": vm, "nic": node_nic(&n) }))
                        .await?;
                }
                _ => {}
            }
        }
        Ok(self.app.db.nic_update(&n).await?)
    }

    /// Removes a NIC (hot unplugging it from a running VM); its MAC returns to the pool.
    pub async fn remove_nic(&self, vm: VmId, nic: NicId) -> Result<(), CommandError> {
        let (v, _) = self.vm_and_dc(vm).await?;
        let n = self.vm_nic(vm, nic).await?;
        if let (Some(h), true) = (hot_host(&v)?, n.plugged) {
            self.node_of(h)
                .await?
                .call("VM.hotunplugNic", json!({ "vmID": vm, "mac": n.mac }))
                .await?;
        }
        self.app.db.nic_remove(nic).await?;
        tracing::info!(vm = %v.name, nic = %n.name, mac = %n.mac, "NIC removed");
        Ok(())
    }
}

// ---- Host network setup saga -----------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetupNetworksParams {
    pub host: HostUuid,
    pub host_name: String,
    /// The `Host.setupNetworks` request, options included.
    pub request: Value,
    pub check_connectivity: bool,
    pub set: Vec<NetworkAttachment>,
    pub removed: Vec<NetworkId>,
}

pub struct SetupNetworksSaga;

async fn client_of(app: &App, host: HostUuid) -> Result<NodeClient, StepError> {
    app.host_client(host).await.map_err(step_err)
}

impl SagaDef for SetupNetworksSaga {
    type Ctx = App;
    type Params = SetupNetworksParams;
    const NAME: &'static str = "setup_networks";

    fn description(p: &Self::Params) -> String {
        format!("Setting up networks on host {}", p.host_name)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            Step::without_undo("apply", |c: StepCtx<Self>| async move {
                let p = c.params();
                let node = client_of(c.app(), p.host).await?;
                node.call("Host.setupNetworks", p.request.clone())
                    .await
                    .map_err(step_err)
            })
            .describe("Applying the change on the host"),
            Step::without_undo("confirm", |c: StepCtx<Self>| async move {
                let p = c.params();
                if !p.check_connectivity {
                    return Ok(());
                }
                let node = client_of(c.app(), p.host).await?;
                // The host must still answer the engine: only then is the change safe to keep.
                let rollback = p.request["options"]["connectivityTimeout"].as_u64().unwrap_or(120);
                let ping = tokio::time::timeout(Duration::from_secs(rollback.max(1)), node.call("Host.ping", json!({})))
                    .await;
                match ping {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        return Err(step_err(format!(
                            "host {} lost connectivity with the engine after the change ({e}); it restores its previous networks within {rollback} s",
                            p.host_name
                        )))
                    }
                    Err(_) => {
                        return Err(step_err(format!(
                            "host {} did not answer the engine within {rollback} s of the change; it restores its previous networks",
                            p.host_name
                        )))
                    }
                }
                let r = node
                    .call("Host.setSafeNetworkConfig", json!({}))
                    .await
                    .map_err(step_err)?;
                if r["confirmed"] != true {
                    return Err(step_err(format!(
                        "host {} had no change to confirm: it was rolled back already",
                        p.host_name
                    )));
                }
                Ok(())
            })
            .describe("Confirming the engine still reaches the host"),
            Step::without_undo("record", |c: StepCtx<Self>| async move {
                let p = c.params();
                c.db()
                    .host_attachments_apply(p.host, &p.set, &p.removed)
                    .await?;
                let node = client_of(c.app(), p.host).await?;
                if let Ok(caps) = node.call("Host.getCapabilities", json!({})).await {
                    c.db()
                        .host_reported_networks_set(p.host, &host_networks(&caps))
                        .await?;
                }
                c.app().kick.notify_one();
                Ok(())
            })
            .describe("Recording the host's networks"),
        ]
    }
}

// ---- Monitoring and scheduling ---------------------------------------------------------------

/// The monitor's network check of a host it just reached: records the networks the host
/// reports and returns why the host must be `non_operational`, if it must (a required network
/// of its cluster is missing).
pub(crate) async fn host_network_problem(
    app: &App,
    h: &Host,
    node: &NodeClient,
) -> Result<Option<String>, CommandError> {
    let caps = node.call("Host.getCapabilities", json!({})).await?;
    let have = host_networks(&caps);
    app.db.host_reported_networks_set(h.id, &have).await?;
    let cluster = app.db.cluster_networks(h.cluster_id).await?;
    Ok(match host_compliance(&h.name, &cluster, &have) {
        Compliance::Operational { .. } => None,
        Compliance::NonOperational { reason, .. } => Some(reason),
    })
}

/// The scheduler's network input for a cluster: the networks each host reports and the
/// networks each VM's plugged NICs need.
pub(crate) async fn scheduling_networks(
    app: &App,
    cluster: ClusterId,
) -> Result<
    (
        BTreeMap<HostUuid, BTreeSet<String>>,
        BTreeMap<VmId, BTreeSet<String>>,
    ),
    CommandError,
> {
    Ok((
        app.db.cluster_reported_networks(cluster).await?,
        app.db.cluster_vm_networks(cluster).await?,
    ))
}

/// Adds to `VM.migrationCreate` parameters the PCI slot each NIC and disk has on the source,
/// its vCPUs, memory and CD, so the destination builds the same devices (those hot plugged and
/// unplugged included).
pub(crate) async fn with_source_slots(
    app: &App,
    src: HostUuid,
    vm: VmId,
    mut params: Value,
) -> Result<Value, CommandError> {
    let h = app.host(src).await?;
    let info = app.client(&h)?.call("VM.getInfo", json!({ "vmID": vm })).await?;
    let mac = |n: &Value| Some(n["mac"].as_str()?.to_lowercase());
    copy_slots(&info["nics"], mac, &mut params["nics"], mac);
    copy_slots(
        &info["disks"],
        |d| Some(d["image"]["img"].as_str()?.to_string()),
        &mut params["drives"],
        |d| Some(d["imageID"].as_str()?.to_string()),
    );
    // The vCPUs the source started with and those hot plugged since, as devices: the
    // destination's must be the same (the configuration may have changed meanwhile).
    if let Some(c) = info.get("cpus").filter(|c| !c.is_null()) {
        params["smp"] = c["boot"].clone();
        params["maxVCpus"] = c["max"].clone();
        params["cpuDevices"] = c["devices"].clone();
    }
    // And the memory it started with, its maximum and the DIMMs hot plugged since.
    if let Some(m) = info.get("memory").filter(|m| !m.is_null()) {
        params["memSize"] = m["boot_mib"].clone();
        params["maxMemSize"] = m["max_mib"].clone();
        params["dimms"] = m["dimms"].clone();
    }
    // The CD in the source's drive now (changed with current=true, or a run once's), and no
    // drive where the source has none: the destination's devices must be the source's.
    match info.get("cdrom").filter(|c| !c.is_null()) {
        Some(cd) => {
            params["cdrom"]["drive"] = match cd["image"].is_null() {
                true => Value::Null,
                false => json!({ "domainID": cd["image"]["sd"], "imageID": cd["image"]["img"] }),
            };
        }
        None => {
            if let Some(p) = params.as_object_mut() {
                p.remove("cdrom");
            }
        }
    }
    Ok(params)
}

/// Gives each entry of the list `to` the `slot` of the entry of the list `from` with the same
/// key.
fn copy_slots(
    from: &Value,
    from_key: impl Fn(&Value) -> Option<String>,
    to: &mut Value,
    to_key: impl Fn(&Value) -> Option<String>,
) {
    let slots: BTreeMap<String, &Value> = from
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| !n["slot"].is_null())
        .filter_map(|n| Some((from_key(n)?, &n["slot"])))
        .collect();
    for n in to.as_array_mut().into_iter().flatten() {
        if let Some(slot) = to_key(n).and_then(|k| slots.get(&k).copied()) {
            n["slot"] = slot.clone();
        }
    }
}
