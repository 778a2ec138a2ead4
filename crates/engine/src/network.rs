//! Logical networks as the engine reasons about them, without a database or a node: the MAC
//! address pool, validation of network definitions, and host network compliance.
//!
//! - [`MacPool`]: MAC ranges (oVirt's default `56:6f:00:00:00:00`–`56:6f:ff:ff:ff:ff`),
//!   allocation without duplicates, release, custom MACs; its whole state is a serde value
//!   ([`MacPoolState`]) the caller stores with the cluster (or the pool several clusters share).
//! - [`LogicalNetwork`] and [`validate_network`]: name (a VM network's name is its bridge's on
//!   the hosts, so at most 15 characters), MTU bounds, VLAN id 0..=4094, unique names and VLAN
//!   ids within a data center.
//! - [`host_compliance`]: a host lacking any of the cluster's required networks is
//!   `non_operational`, with a reason naming them; [`host_networks`] reads what a host has from
//!   its `Host.getCapabilities`; [`vm_networks`] is what a VM needs, for the scheduler's
//!   network filter (`oxvirt_scheduler` `Host::networks` / `Vm::networks`).
//! - [`setup_networks_request`]: the `Host.setupNetworks` request for attachments and
//!   removals; [`node_nic`]: a VM NIC as the node's `VM.create`/`VM.hotplugNic` take it.
//!
//! The management network (oVirt's `ovirtmgmt`, [`MANAGEMENT_NETWORK`]) is created with each
//! data center and attached to each of its clusters as their management network. It is the
//! network the engine reaches hosts over, so a host the engine polls carries it by definition
//! and compliance never faults a host for it; it becomes a bridge VMs can use only once a
//! host attachment puts it on a NIC.
//!
//! Invariant: pure functions and values; every refusal names the object and the rule.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::{DcId, HostUuid, MacAddr, Nic};
use crate::time::Timestamp;
pub use oxvirt_types::{NetworkAttachmentId, NetworkId, VnicProfileId};

/// The name of the management network each data center gets.
pub const MANAGEMENT_NETWORK: &str = "ovirtmgmt";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("MAC range {start}-{end}: {reason}")]
    BadRange {
        start: MacAddr,
        end: MacAddr,
        reason: String,
    },
    #[error("MAC pool exhausted: all {size} addresses of its ranges are in use")]
    Exhausted { size: u64 },
    #[error("MAC address {0} is already in use")]
    InUse(MacAddr),
    #[error("MAC address {0} is not a unicast address")]
    NotUnicast(MacAddr),
    #[error("invalid logical network {name:?}: {}", .reasons.join("; "))]
    Invalid { name: String, reasons: Vec<String> },
}

fn to_u64(m: MacAddr) -> u64 {
    m.0.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

fn from_u64(v: u64) -> MacAddr {
    let b = v.to_be_bytes();
    MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]])
}

fn unicast(m: MacAddr) -> bool {
    m.0[0] & 1 == 0
}

/// An inclusive range of MAC addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacRange {
    pub start: MacAddr,
    pub end: MacAddr,
}

impl MacRange {
    pub fn new(start: MacAddr, end: MacAddr) -> MacRange {
        MacRange { start, end }
    }

    /// oVirt's default range.
    pub fn ovirt_default() -> MacRange {
        let [a, b] = MacAddr::POOL_PREFIX;
        MacRange {
            start: MacAddr([a, b, 0, 0, 0, 0]),
            end: MacAddr([a, b, 0xff, 0xff, 0xff, 0xff]),
        }
    }

    pub fn size(&self) -> u64 {
        to_u64(self.end) - to_u64(self.start) + 1
    }

    pub fn contains(&self, m: MacAddr) -> bool {
        (to_u64(self.start)..=to_u64(self.end)).contains(&to_u64(m))
    }
}

/// A pool's persistent state: ranges, what is taken, where the next search starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacPoolState {
    pub ranges: Vec<MacRange>,
    /// Every MAC handed out or registered, inside the ranges or not (custom MACs).
    pub allocated: BTreeSet<MacAddr>,
    /// The next search starts here, so a released address is not handed out again at once.
    #[serde(default)]
    pub cursor: Option<MacAddr>,
}

/// A MAC address pool. Allocation never returns an address in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacPool {
    state: MacPoolState,
}

impl MacPool {
    /// A pool over `ranges`: each unicast and non-empty, none overlapping another.
    pub fn new(ranges: Vec<MacRange>) -> Result<MacPool, NetworkError> {
        check_ranges(&ranges)?;
        Ok(MacPool {
            state: MacPoolState {
                ranges,
                ..Default::default()
            },
        })
    }

    /// A pool over oVirt's default range.
    pub fn ovirt_default() -> MacPool {
        MacPool::new(vec![MacRange::ovirt_default()]).expect("the default range is valid")
    }

    /// A pool from stored state (its ranges re-checked).
    pub fn from_state(state: MacPoolState) -> Result<MacPool, NetworkError> {
        check_ranges(&state.ranges)?;
        Ok(MacPool { state })
    }

    pub fn state(&self) -> &MacPoolState {
        &self.state
    }

    pub fn size(&self) -> u64 {
        self.state.ranges.iter().map(MacRange::size).sum()
    }

    /// Addresses of the ranges still free.
    pub fn free(&self) -> u64 {
        let used = self
            .state
            .allocated
            .iter()
            .filter(|m| self.in_ranges(**m))
            .count() as u64;
        self.size() - used
    }

    pub fn is_allocated(&self, m: MacAddr) -> bool {
        self.state.allocated.contains(&m)
    }

    pub fn in_ranges(&self, m: MacAddr) -> bool {
        self.state.ranges.iter().any(|r| r.contains(m))
    }

    /// The next free address of the ranges, after the cursor, wrapping around.
    pub fn allocate(&mut self) -> Result<MacAddr, NetworkError> {
        // Ranges in order, starting inside the range holding the cursor.
        let n = self.state.ranges.len();
        let cursor = self.state.cursor;
        let first = cursor
            .and_then(|c| self.state.ranges.iter().position(|r| r.contains(c)))
            .unwrap_or(0);
        for k in 0..=n {
            let r = self.state.ranges[(first + k) % n];
            let lo = to_u64(r.start);
            let hi = to_u64(r.end);
            // The first pass starts after the cursor; the last (k == n) covers what it skipped.
            let (from, to) = match (k, cursor) {
                (0, Some(c)) if r.contains(c) => (to_u64(c) + 1, hi),
                (k, Some(c)) if k == n && r.contains(c) => (lo, to_u64(c)),
                (k, _) if k == n => continue,
                _ => (lo, hi),
            };
            if let Some(m) = self.first_free(from, to) {
                self.state.allocated.insert(m);
                self.state.cursor = Some(m);
                return Ok(m);
            }
        }
        Err(NetworkError::Exhausted { size: self.size() })
    }

    /// The lowest free address in `from..=to`, skipping runs of allocated ones.
    fn first_free(&self, from: u64, to: u64) -> Option<MacAddr> {
        let mut v = from;
        for m in self.state.allocated.range(from_u64(from.min(to))..=from_u64(to)) {
            let x = to_u64(*m);
            if x > v {
                break;
            }
            if x == v {
                v += 1;
            }
        }
        (v <= to && from <= to).then(|| from_u64(v))
    }

    /// Registers an address chosen by the user (inside the ranges or not).
    pub fn allocate_specific(&mut self, m: MacAddr) -> Result<(), NetworkError> {
        if !unicast(m) {
            return Err(NetworkError::NotUnicast(m));
        }
        if !self.state.allocated.insert(m) {
            return Err(NetworkError::InUse(m));
        }
        Ok(())
    }

    /// Gives an address back; whether it was allocated.
    pub fn release(&mut self, m: MacAddr) -> bool {
        self.state.allocated.remove(&m)
    }

    /// Registers every NIC's MAC (rebuilding a pool's state from the database's NICs); fails on
    /// the first duplicate.
    pub fn register_nics<'a>(&mut self, nics: impl IntoIterator<Item = &'a Nic>) -> Result<(), NetworkError> {
        for n in nics {
            self.allocate_specific(n.mac)?;
        }
        Ok(())
    }
}

fn check_ranges(ranges: &[MacRange]) -> Result<(), NetworkError> {
    let bad = |r: &MacRange, reason: &str| NetworkError::BadRange {
        start: r.start,
        end: r.end,
        reason: reason.into(),
    };
    for (i, r) in ranges.iter().enumerate() {
        if to_u64(r.start) > to_u64(r.end) {
            return Err(bad(r, "its start is after its end"));
        }
        // A range is unicast when every address in it is: the first octet cannot change
        // parity inside a range unless the range crosses octet boundaries.
        if !unicast(r.start) || !unicast(r.end) || r.start.0[0] != r.end.0[0] {
            return Err(bad(r, "it must lie within one unicast first octet"));
        }
        for o in &ranges[..i] {
            if to_u64(r.start) <= to_u64(o.end) && to_u64(o.start) <= to_u64(r.end) {
                return Err(bad(r, &format!("it overlaps {}-{}", o.start, o.end)));
            }
        }
    }
    Ok(())
}

// ---- Logical networks ------------------------------------------------------------------------

/// A logical network of a data center.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogicalNetwork {
    pub id: NetworkId,
    pub name: String,
    pub data_center_id: DcId,
    #[serde(default)]
    pub description: String,
    /// `None`: the default, 1500.
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub vlan: Option<u16>,
    /// A VM network: hosts carry it on a bridge and VM NICs plug into it.
    pub vm_network: bool,
    #[serde(default = "epoch")]
    pub created_at: Timestamp,
    #[serde(default)]
    pub revision: i64,
}

fn epoch() -> Timestamp {
    Timestamp::from_millis(0)
}

impl LogicalNetwork {
    /// A VM network with the default MTU and no VLAN.
    pub fn new(name: &str, data_center_id: DcId) -> LogicalNetwork {
        LogicalNetwork {
            id: NetworkId::new_random(),
            name: name.to_string(),
            data_center_id,
            description: String::new(),
            mtu: None,
            vlan: None,
            vm_network: true,
            created_at: epoch(),
            revision: 0,
        }
    }

    /// The network's one vNIC profile (oVirt creates one per VM network, named after it); its
    /// id is the network's, so neither needs a lookup to find the other.
    pub fn vnic_profile(&self) -> VnicProfileId {
        vnic_profile_of(self.id)
    }
}

/// The vNIC profile of network `id`.
pub fn vnic_profile_of(id: NetworkId) -> VnicProfileId {
    VnicProfileId::from_uuid(*id.as_uuid())
}

/// The network a vNIC profile belongs to.
pub fn network_of_profile(p: VnicProfileId) -> NetworkId {
    NetworkId::from_uuid(*p.as_uuid())
}

pub const MIN_MTU: u32 = 68;
pub const MAX_MTU: u32 = 65535;
pub const MAX_VLAN_ID: u16 = 4094;
/// Host interface names (IFNAMSIZ) bound VM network names: the bridge is named after the network.
pub const MAX_NETWORK_NAME: usize = 15;

/// Checks `net` on its own and against the data center's other networks (`others`, which may
/// contain `net`'s own previous version, with the same id: it is skipped).
pub fn validate_network(net: &LogicalNetwork, others: &[LogicalNetwork]) -> Result<(), NetworkError> {
    let mut reasons = Vec::new();
    if net.name.is_empty() || net.name.len() > MAX_NETWORK_NAME {
        reasons.push(format!("a name has 1 to {MAX_NETWORK_NAME} characters"));
    }
    if !net
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        reasons.push("a name holds only letters, digits, '_' and '-'".into());
    }
    if matches!(net.name.as_str(), "lo" | "default" | "all") {
        reasons.push(format!("{:?} is reserved by the kernel", net.name));
    }
    if let Some(m) = net.mtu {
        if !(MIN_MTU..=MAX_MTU).contains(&m) {
            reasons.push(format!("MTU {m} is outside {MIN_MTU}..={MAX_MTU}"));
        }
    }
    if let Some(v) = net.vlan {
        if v > MAX_VLAN_ID {
            reasons.push(format!("VLAN id {v} is outside 0..={MAX_VLAN_ID}"));
        }
    }
    for o in others
        .iter()
        .filter(|o| o.data_center_id == net.data_center_id && o.id != net.id)
    {
        if o.name == net.name {
            reasons.push(format!("network {:?} already exists in the data center", o.name));
        } else if o.name.eq_ignore_ascii_case(&net.name) {
            reasons.push(format!("network {:?} differs only in case", o.name));
        }
        if net.vlan.is_some() && o.vlan == net.vlan {
            reasons.push(format!(
                "VLAN {} is already network {:?}'s",
                net.vlan.unwrap_or_default(),
                o.name
            ));
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(NetworkError::Invalid {
            name: net.name.clone(),
            reasons,
        })
    }
}

/// A network attached to a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNetwork {
    pub network_id: NetworkId,
    pub name: String,
    /// Hosts without it are `non_operational`.
    pub required: bool,
    /// The cluster's management network: hosts reach the engine over it, so it never makes a
    /// host non-compliant (see the module docs).
    #[serde(default)]
    pub management: bool,
}

/// A host's standing with respect to its cluster's networks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Compliance {
    /// Every required network is there (`optional_missing` lists optional ones that are not).
    Operational { optional_missing: Vec<String> },
    /// The host must not run VMs: `reason` is the sentence for `status_detail`.
    NonOperational { missing: Vec<String>, reason: String },
}

/// Decides whether host `host_name` may be `up` in its cluster, given the networks it reports
/// (the management network counts as present: the engine reached the host to ask).
pub fn host_compliance(
    host_name: &str,
    cluster: &[ClusterNetwork],
    host_networks: &BTreeSet<String>,
) -> Compliance {
    let mut missing = Vec::new();
    let mut optional_missing = Vec::new();
    for n in cluster {
        if !host_networks.contains(&n.name) && !n.management {
            if n.required {
                missing.push(n.name.clone());
            } else {
                optional_missing.push(n.name.clone());
            }
        }
    }
    if missing.is_empty() {
        Compliance::Operational { optional_missing }
    } else {
        let list = missing
            .iter()
            .map(|m| format!("'{m}'"))
            .collect::<Vec<_>>()
            .join(", ");
        Compliance::NonOperational {
            reason: format!(
                "host {host_name} does not comply with the cluster's networks; missing required networks: {list}"
            ),
            missing,
        }
    }
}

/// The networks a host has, from its `Host.getCapabilities` (`networks.<name>.present`).
pub fn host_networks(capabilities: &serde_json::Value) -> BTreeSet<String> {
    capabilities["networks"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v["present"].as_bool().unwrap_or(false))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The networks a VM's plugged NICs need on its host (the scheduler's network filter input).
pub fn vm_networks<'a>(nics: impl IntoIterator<Item = &'a Nic>) -> BTreeSet<String> {
    nics.into_iter()
        .filter(|n| n.plugged)
        .filter_map(|n| n.network.clone())
        .collect()
}

/// The `networks` part of `Host.setupNetworks` for attaching `attachments` (network name →
/// how the host carries it) and removing `removals`, with the data center's definitions: what
/// the engine sends a node.
pub fn setup_networks_request(
    defs: &BTreeMap<String, LogicalNetwork>,
    attachments: &BTreeMap<String, HostAttachment>,
    removals: &BTreeSet<String>,
) -> Result<serde_json::Value, String> {
    let mut nets = serde_json::Map::new();
    for name in removals {
        if attachments.contains_key(name) {
            return Err(format!("network {name:?} is both attached and removed"));
        }
        nets.insert(name.clone(), serde_json::json!({ "remove": true }));
    }
    for (name, a) in attachments {
        let d = defs
            .get(name)
            .ok_or_else(|| format!("network {name:?} is not defined in the data center"))?;
        if a.nic.is_empty() {
            return Err(format!("network {name:?} needs a host NIC to carry it"));
        }
        let mut v = serde_json::json!({ "nic": a.nic, "bridged": d.vm_network });
        if let Some(m) = d.mtu {
            v["mtu"] = m.into();
        }
        if let Some(id) = d.vlan {
            v["vlan"] = id.into();
        }
        match &a.ip {
            HostIp::None => {}
            HostIp::Dhcp => v["bootproto"] = "dhcp".into(),
            HostIp::Static {
                address,
                prefix,
                gateway,
            } => {
                if *prefix > 32 {
                    return Err(format!("network {name:?}: prefix length {prefix} is over 32"));
                }
                v["ipaddr"] = address.to_string().into();
                v["prefix"] = (*prefix).into();
                if let Some(g) = gateway {
                    v["gateway"] = g.to_string().into();
                    v["defaultRoute"] = a.default_route.into();
                }
            }
        }
        nets.insert(name.clone(), v);
    }
    Ok(serde_json::json!({ "networks": nets }))
}

/// A bond a `setupNetworks` creates or changes on a host (oVirt's `host_nic` with `bonding`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostBond {
    pub name: String,
    pub slaves: Vec<String>,
    /// Bonding driver options as VDSM takes them (`mode=1 miimon=100`); empty: the node's
    /// default (802.3ad).
    pub options: String,
}

/// Linux's limit on an interface name (IFNAMSIZ less the terminating NUL).
const IFNAME_MAX: usize = 15;

/// Adds bonds to a `setupNetworks` request made by [`setup_networks_request`]: `bonds` to
/// create or change, `removed` to delete (each must be one of `host_bonds`, the bonds the host
/// has). A network whose host NIC is a bond (asked for now, or already on the host and kept)
/// is carried with `bonding` instead of `nic`, as VDSM takes it. Refused: names that are not
/// `bond…` or too long, bonds without slaves, a NIC enslaved twice or carrying a network
/// directly, a network on a removed bond.
pub fn with_bonds(
    request: &mut serde_json::Value,
    bonds: &[HostBond],
    removed: &BTreeSet<String>,
    host_bonds: &BTreeSet<String>,
) -> Result<(), String> {
    let mut bondings = serde_json::Map::new();
    let mut slaves_of: BTreeMap<&str, &str> = BTreeMap::new();
    for b in bonds {
        if !b.name.starts_with("bond") || b.name.len() > IFNAME_MAX || b.name.contains(['/', ' ']) {
            return Err(format!(
                "bond name {:?} must start with \"bond\" and be at most {IFNAME_MAX} characters",
                b.name
            ));
        }
        if removed.contains(&b.name) {
            return Err(format!("bond {} is both changed and removed", b.name));
        }
        if b.slaves.is_empty() {
            return Err(format!("bond {} needs at least one slave NIC", b.name));
        }
        for s in &b.slaves {
            if let Some(other) = slaves_of.insert(s, &b.name) {
                return Err(format!(
                    "NIC {s} cannot be a slave of both {other} and {}",
                    b.name
                ));
            }
        }
        bondings.insert(
            b.name.clone(),
            serde_json::json!({ "nics": b.slaves, "options": b.options }),
        );
    }
    for name in removed {
        if !host_bonds.contains(name) {
            return Err(format!("bond {name} is not on the host"));
        }
        bondings.insert(name.clone(), serde_json::json!({ "remove": true }));
    }
    let is_bond =
        |n: &str| bonds.iter().any(|b| b.name == n) || (host_bonds.contains(n) && !removed.contains(n));
    if let Some(nets) = request["networks"].as_object_mut() {
        for (net, v) in nets.iter_mut() {
            let Some(nic) = v["nic"].as_str().map(str::to_string) else {
                continue;
            };
            if removed.contains(&nic) {
                return Err(format!("network {net} is on bond {nic}, which is being removed"));
            }
            if let Some(b) = slaves_of.get(nic.as_str()) {
                return Err(format!(
                    "network {net} is on NIC {nic}, a slave of bond {b}: attach it to the bond"
                ));
            }
            if is_bond(&nic) {
                let o = v.as_object_mut().expect("a network entry is an object");
                o.remove("nic");
                o.insert("bonding".into(), nic.into());
            }
        }
    }
    if !bondings.is_empty() {
        request["bondings"] = bondings.into();
    }
    Ok(())
}

/// A VM NIC as the node's `VM.create`, `VM.migrationCreate` and `VM.hotplugNic` take it: on
/// its network's bridge, or — with no network (oVirt's empty profile) — with its cable out.
pub fn node_nic(n: &Nic) -> serde_json::Value {
    let mut v = serde_json::json!({ "mac": n.mac, "linkActive": n.linked && n.network.is_some() });
    if let Some(net) = &n.network {
        v["network"] = net.clone().into();
    }
    v
}

/// A host network attachment as stored: network `network_id` (named `network`) on host
/// `host_id`, carried as `attachment` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAttachment {
    pub id: NetworkAttachmentId,
    pub host_id: HostUuid,
    pub network_id: NetworkId,
    pub network: String,
    pub attachment: HostAttachment,
}

/// Which host NIC carries a network and how the host addresses itself on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAttachment {
    pub nic: String,
    pub ip: HostIp,
    #[serde(default)]
    pub default_route: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "boot_protocol", rename_all = "snake_case")]
pub enum HostIp {
    None,
    Dhcp,
    Static {
        address: std::net::Ipv4Addr,
        prefix: u8,
        gateway: Option<std::net::Ipv4Addr>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NicInterface;

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_pool_hands_out_each_address_once_and_wraps_after_release() {
        let mut p = MacPool::new(vec![MacRange::new(
            mac("56:6f:00:00:00:00"),
            mac("56:6f:00:00:00:03"),
        )])
        .unwrap();
        assert_eq!(p.size(), 4);
        p.allocate_specific(mac("56:6f:00:00:00:01")).unwrap();
        let got: Vec<MacAddr> = (0..3).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(
            got,
            [
                mac("56:6f:00:00:00:00"),
                mac("56:6f:00:00:00:02"),
                mac("56:6f:00:00:00:03")
            ]
        );
        assert!(matches!(p.allocate(), Err(NetworkError::Exhausted { size: 4 })));
        assert!(p.release(mac("56:6f:00:00:00:00")));
        assert!(!p.release(mac("56:6f:00:00:00:00")), "released twice");
        assert_eq!(p.allocate().unwrap(), mac("56:6f:00:00:00:00"), "wraps around");
        // Custom addresses outside the ranges are tracked for duplicates too.
        p.allocate_specific(mac("02:00:00:00:00:01")).unwrap();
        assert_eq!(
            p.allocate_specific(mac("02:00:00:00:00:01")),
            Err(NetworkError::InUse(mac("02:00:00:00:00:01")))
        );
        assert!(matches!(
            p.allocate_specific(mac("01:00:5e:00:00:01")),
            Err(NetworkError::NotUnicast(_))
        ));
        assert_eq!(p.free(), 0);
    }

    #[test]
    fn the_cursor_spreads_reuse_and_the_state_round_trips() {
        let mut p = MacPool::new(vec![
            MacRange::new(mac("56:6f:00:00:00:00"), mac("56:6f:00:00:00:01")),
            MacRange::new(mac("56:6f:00:00:10:00"), mac("56:6f:00:00:10:01")),
        ])
        .unwrap();
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.release(a);
        // The next allocation moves on to the second range rather than reusing `a` at once.
        let c = p.allocate().unwrap();
        assert_eq!(
            (a, b, c),
            (
                mac("56:6f:00:00:00:00"),
                mac("56:6f:00:00:00:01"),
                mac("56:6f:00:00:10:00")
            )
        );
        let json = serde_json::to_string(p.state()).unwrap();
        let mut q = MacPool::from_state(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(q, p);
        assert_eq!(q.allocate().unwrap(), mac("56:6f:00:00:10:01"));
        assert_eq!(q.allocate().unwrap(), a, "finally reused after wrapping");
        let mut all: Vec<MacAddr> = q.state().allocated.iter().copied().collect();
        all.dedup();
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn a_large_pool_allocates_many_without_duplicates() {
        let mut p = MacPool::ovirt_default();
        assert_eq!(p.size(), 1 << 32);
        let mut seen = BTreeSet::new();
        for _ in 0..10_000 {
            let m = p.allocate().unwrap();
            assert_eq!(m.0[..2], MacAddr::POOL_PREFIX);
            assert!(seen.insert(m), "{m} twice");
        }
    }

    #[test]
    fn bad_ranges_are_refused() {
        let r = |a: &str, b: &str| MacRange::new(mac(a), mac(b));
        for (ranges, needle) in [
            (vec![r("56:6f:00:00:00:09", "56:6f:00:00:00:01")], "after its end"),
            (vec![r("57:00:00:00:00:00", "57:00:00:00:00:09")], "unicast"),
            (vec![r("56:00:00:00:00:00", "58:00:00:00:00:00")], "unicast"),
            (
                vec![
                    r("56:6f:00:00:00:00", "56:6f:00:00:00:09"),
                    r("56:6f:00:00:00:05", "56:6f:00:00:00:20"),
                ],
                "overlaps",
            ),
        ] {
            let e = MacPool::new(ranges).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    fn net(name: &str, vlan: Option<u16>, mtu: Option<u32>) -> LogicalNetwork {
        LogicalNetwork {
            mtu,
            vlan,
            ..LogicalNetwork::new(name, "00000000-0000-4000-8000-000000000001".parse().unwrap())
        }
    }

    #[test]
    fn network_definitions_are_checked() {
        validate_network(&net("ovirtmgmt", None, None), &[]).unwrap();
        let v100 = net("v100", Some(100), Some(9000));
        let old = LogicalNetwork {
            mtu: None,
            ..v100.clone()
        };
        validate_network(&v100, &[old]).expect("its own previous version does not clash");
        let s = validate_network(&v100, &[net("v100", None, None)])
            .unwrap_err()
            .to_string();
        assert!(s.contains("already exists"), "{s}");
        let e = validate_network(&net("a name too long!", Some(4095), Some(20)), &[]).unwrap_err();
        let s = e.to_string();
        for needle in ["1 to 15", "letters", "VLAN id 4095", "MTU 20"] {
            assert!(s.contains(needle), "{needle}: {s}");
        }
        let s = validate_network(
            &net("b", Some(7), None),
            &[net("a", Some(7), None), net("B", None, None)],
        )
        .unwrap_err()
        .to_string();
        assert!(
            s.contains("VLAN 7 is already network \"a\"'s") && s.contains("case"),
            "{s}"
        );
        assert!(validate_network(&net("lo", None, None), &[]).is_err());
    }

    fn nic(network: Option<&str>, plugged: bool) -> Nic {
        Nic {
            id: crate::model::NicId::new_random(),
            vm_id: crate::model::VmId::new_random(),
            name: "nic1".into(),
            network: network.map(Into::into),
            mac: mac("56:6f:00:00:00:01"),
            interface: NicInterface::Virtio,
            plugged,
            linked: true,
        }
    }

    #[test]
    fn hosts_missing_required_networks_are_non_operational() {
        let cn = |name: &str, required: bool, management: bool| ClusterNetwork {
            network_id: NetworkId::new_random(),
            name: name.into(),
            required,
            management,
        };
        let cluster = vec![
            cn("ovirtmgmt", true, true),
            cn("vmnet", true, false),
            cn("storage", true, false),
            cn("backup", false, false),
        ];
        let caps = serde_json::json!({ "networks": {
            "storage": { "present": true }, "vmnet": { "present": false } } });
        let have = host_networks(&caps);
        assert_eq!(have, BTreeSet::from(["storage".to_string()]));
        match host_compliance("h1", &cluster, &have) {
            Compliance::NonOperational { missing, reason } => {
                assert_eq!(missing, ["vmnet"], "the management network is never missing");
                assert!(reason.contains("h1") && reason.contains("'vmnet'"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let all = BTreeSet::from(["vmnet".to_string(), "storage".to_string()]);
        assert_eq!(
            host_compliance("h1", &cluster, &all),
            Compliance::Operational {
                optional_missing: vec!["backup".into()]
            }
        );
        let nics = [
            nic(Some("vmnet"), true),
            nic(Some("backup"), false),
            nic(None, true),
        ];
        assert_eq!(vm_networks(&nics), BTreeSet::from(["vmnet".to_string()]));
    }

    #[test]
    fn attachments_become_a_setup_networks_request() {
        let defs = BTreeMap::from([
            ("vmnet".to_string(), net("vmnet", Some(10), Some(9000))),
            (
                "mgmt".to_string(),
                LogicalNetwork {
                    vm_network: false,
                    ..net("mgmt", None, None)
                },
            ),
        ]);
        let att = BTreeMap::from([
            (
                "vmnet".to_string(),
                HostAttachment {
                    nic: "eth1".into(),
                    ip: HostIp::None,
                    default_route: false,
                },
            ),
            (
                "mgmt".to_string(),
                HostAttachment {
                    nic: "eth0".into(),
                    ip: HostIp::Static {
                        address: "10.0.0.5".parse().unwrap(),
                        prefix: 24,
                        gateway: Some("10.0.0.1".parse().unwrap()),
                    },
                    default_route: true,
                },
            ),
        ]);
        let r = setup_networks_request(&defs, &att, &BTreeSet::from(["old".to_string()])).unwrap();
        assert_eq!(r["networks"]["old"], serde_json::json!({ "remove": true }));
        assert_eq!(
            r["networks"]["vmnet"],
            serde_json::json!({ "nic": "eth1", "bridged": true, "mtu": 9000, "vlan": 10 })
        );
        assert_eq!(r["networks"]["mgmt"]["gateway"], "10.0.0.1");
        assert_eq!(r["networks"]["mgmt"]["defaultRoute"], true);
        assert_eq!(r["networks"]["mgmt"]["bridged"], false);
        let missing = BTreeMap::from([("nope".to_string(), att["vmnet"].clone())]);
        assert!(setup_networks_request(&defs, &missing, &BTreeSet::new())
            .unwrap_err()
            .contains("nope"));
        let both = BTreeSet::from(["vmnet".to_string()]);
        assert!(setup_networks_request(&defs, &att, &both)
            .unwrap_err()
            .contains("both"));
        let mut bad = att.clone();
        bad.get_mut("vmnet").unwrap().nic.clear();
        assert!(setup_networks_request(&defs, &bad, &BTreeSet::new())
            .unwrap_err()
            .contains("host NIC"));
    }

    #[test]
    fn bonds_join_the_request_and_networks_on_them_use_bonding() {
        let bond = |name: &str, slaves: &[&str]| HostBond {
            name: name.into(),
            slaves: slaves.iter().map(|s| s.to_string()).collect(),
            options: "mode=1 miimon=100".into(),
        };
        let req = || {
            serde_json::json!({ "networks": {
                "a": { "nic": "bond0", "bridged": true },
                "b": { "nic": "eth3", "bridged": true },
                "c": { "nic": "bond7", "bridged": false },
            }})
        };
        let host = BTreeSet::from(["bond7".to_string(), "bond9".to_string()]);
        let mut r = req();
        with_bonds(
            &mut r,
            &[bond("bond0", &["eth1", "eth2"])],
            &BTreeSet::from(["bond9".to_string()]),
            &host,
        )
        .unwrap();
        assert_eq!(
            r["bondings"],
            serde_json::json!({
                "bond0": { "nics": ["eth1", "eth2"], "options": "mode=1 miimon=100" },
                "bond9": { "remove": true },
            })
        );
        assert_eq!(
            r["networks"]["a"],
            serde_json::json!({ "bonding": "bond0", "bridged": true })
        );
        assert_eq!(r["networks"]["b"]["nic"], "eth3");
        assert_eq!(r["networks"]["c"]["bonding"], "bond7");

        let err = |bonds: &[HostBond], removed: &[&str]| {
            let removed = removed.iter().map(|s| s.to_string()).collect();
            with_bonds(&mut req(), bonds, &removed, &host).unwrap_err()
        };
        assert!(err(&[bond("team0", &["eth1"])], &[]).contains("must start with"));
        assert!(err(&[bond("bond0123456789012", &["eth1"])], &[]).contains("at most 15"));
        assert!(err(&[bond("bond0", &[])], &[]).contains("at least one slave"));
        assert!(
            err(&[bond("bond0", &["eth1"]), bond("bond1", &["eth1"])], &[]).contains("both bond0 and bond1")
        );
        assert!(err(&[bond("bond0", &["eth1"])], &["bond5"]).contains("bond5 is not on the host"));
        assert!(err(&[bond("bond0", &["eth1"])], &["bond7"]).contains("network c is on bond bond7"));
        assert!(
            err(&[bond("bond0", &["eth1"]), bond("bond1", &["eth3"])], &[]).contains("slave of bond bond1")
        );
        assert!(err(&[bond("bond7", &["eth1"])], &["bond7"]).contains("both changed and removed"));
    }

    #[test]
    fn vm_nics_go_to_the_node_on_their_network_or_unplugged() {
        let mut n = nic(Some("vmnet"), true);
        assert_eq!(
            node_nic(&n),
            serde_json::json!({ "mac": "56:6f:00:00:00:01", "network": "vmnet", "linkActive": true })
        );
        n.linked = false;
        assert_eq!(node_nic(&n)["linkActive"], false);
        let empty = nic(None, true);
        assert_eq!(
            node_nic(&empty),
            serde_json::json!({ "mac": "56:6f:00:00:00:01", "linkActive": false })
        );
        let id = NetworkId::new_random();
        assert_eq!(network_of_profile(vnic_profile_of(id)), id);
    }
}
