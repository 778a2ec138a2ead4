//! The host network configuration as the engine gives it, and the pure planning from it to
//! kernel operations.
//!
//! [`SetupNetworks`] is VDSM's `Host.setupNetworks` request: networks and bonds to add, change
//! or remove. Applied to the current [`RunningConfig`] it yields the next one, which
//! [`RunningConfig::validate`] checks against the host's links before anything is touched.
//! [`RunningConfig::desired`] turns a configuration into the links it needs ([`Desired`]:
//! bridges named after their network, VLAN devices `<base>.<id>`, bonds, host NICs as ports),
//! and [`plan`] diffs the observed [`HostNet`] against a desired state into ordered [`Op`]s.
//! Rollback uses the same planner with a target built from the previous configuration and the
//! snapshot of the host NICs taken before the change ([`Desired::rollback_target`]).
//!
//! Invariant: nothing here does I/O; everything that decides what to change is unit-tested here.
//! Invariant: links whose names are not in the old or new desired state are never touched.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Largest VLAN id (4095 is reserved by 802.1Q).
pub const MAX_VLAN_ID: u16 = 4094;
/// The smallest MTU IPv4 allows.
pub const MIN_MTU: u32 = 68;
pub const MAX_MTU: u32 = 65535;
pub const DEFAULT_MTU: u32 = 1500;
/// Linux's IFNAMSIZ less the terminating NUL.
pub const MAX_IFNAME: usize = 15;

/// An IPv4 address with its prefix length (`10.0.0.1/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 = p.parse().map_err(|_| format!("{p:?} is not a prefix length"))?;
        if prefix > 32 {
            return Err(format!("prefix length {prefix} is over 32"));
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> String {
        c.to_string()
    }
}

impl Ipv4Cidr {
    fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = prefix_mask(self.prefix);
        u32::from(self.addr) & mask == u32::from(ip) & mask
    }
}

fn prefix_mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// A dotted netmask as a prefix length; `None` when its ones are not contiguous.
pub fn netmask_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// How a network's interface gets its IPv4 address (VDSM's `bootproto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProto {
    /// Static (`ipaddr` + `prefix`/`netmask`) or no address at all.
    #[default]
    None,
    Dhcp,
}

/// One logical network on this host, as the engine defines it (VDSM's `networks` entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkAttrs {
    /// The host NIC carrying it; none (with no `bonding`) for a bridge of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bonding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// A VM network: a Linux bridge named after the network, for VM taps.
    #[serde(default = "yes")]
    pub bridged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub bootproto: BootProto,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipaddr: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<u8>,
    /// Alternative to `prefix`, as VDSM accepts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netmask: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// This network's gateway is the host's default route.
    #[serde(default)]
    pub default_route: bool,
}

fn yes() -> bool {
    true
}

impl NetworkAttrs {
    pub fn mtu(&self) -> u32 {
        self.mtu.unwrap_or(DEFAULT_MTU)
    }

    /// The link under the network: its NIC or bond, if any.
    pub fn base(&self) -> Option<&str> {
        self.nic.as_deref().or(self.bonding.as_deref())
    }

    /// The link that carries the network's traffic below the bridge (base or its VLAN device).
    pub fn device(&self) -> Option<String> {
        let base = self.base()?;
        Some(match self.vlan {
            Some(id) => vlan_device_name(base, id),
            None => base.to_string(),
        })
    }

    /// The link that holds the network's address: the bridge, or the device when bridgeless.
    pub fn top(&self, name: &str) -> Option<String> {
        if self.bridged {
            Some(name.to_string())
        } else {
            self.device()
        }
    }

    pub fn address(&self) -> Option<Ipv4Cidr> {
        let addr = self.ipaddr?;
        let prefix = self.prefix.or_else(|| self.netmask.and_then(netmask_prefix))?;
        Some(Ipv4Cidr { addr, prefix })
    }
}

/// VLAN device names as VDSM makes them: `<base>.<id>`.
pub fn vlan_device_name(base: &str, id: u16) -> String {
    format!("{base}.{id}")
}

/// Bonding driver options (VDSM's `options` string, `mode=... miimon=...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BondOptions {
    /// Kernel bonding mode number (0 balance-rr … 6 balance-alb).
    pub mode: u8,
    pub miimon: u32,
}

const BOND_MODES: [&str; 7] = [
    "balance-rr",
    "active-backup",
    "balance-xor",
    "broadcast",
    "802.3ad",
    "balance-tlb",
    "balance-alb",
];

impl BondOptions {
    pub fn parse(s: &str) -> Result<BondOptions, String> {
        // VDSM's default when the engine gives none.
        let mut o = BondOptions { mode: 4, miimon: 100 };
        for kv in s.split_whitespace() {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("bond option {kv:?} is not KEY=VALUE"))?;
            match k {
                "mode" => {
                    o.mode = match v.parse::<u8>() {
                        Ok(n) if usize::from(n) < BOND_MODES.len() => n,
                        _ => BOND_MODES
                            .iter()
                            .position(|m| *m == v)
                            .ok_or_else(|| format!("unknown bonding mode {v:?}"))?
                            as u8,
                    }
                }
                "miimon" => o.miimon = v.parse().map_err(|_| format!("miimon {v:?} is not a number"))?,
                other => return Err(format!("unsupported bond option {other:?} (mode and miimon are)")),
            }
        }
        Ok(o)
    }

    pub fn mode_name(&self) -> &'static str {
        BOND_MODES
            .get(usize::from(self.mode))
            .copied()
            .unwrap_or("unknown")
    }
}

/// One bond (VDSM's `bondings` entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BondAttrs {
    pub nics: Vec<String>,
    #[serde(default)]
    pub options: String,
}

/// Everything this node runs because the engine said so. Held in memory and in the run
/// directory; rebuilt by the engine's next `setupNetworks` after a host reboot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningConfig {
    #[serde(default)]
    pub networks: BTreeMap<String, NetworkAttrs>,
    #[serde(default)]
    pub bondings: BTreeMap<String, BondAttrs>,
}

/// A `networks` entry of a request: the attributes, or `remove`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkRequest {
    #[serde(default)]
    pub remove: bool,
    #[serde(default)]
    pub nic: Option<String>,
    #[serde(default)]
    pub bonding: Option<String>,
    #[serde(default)]
    pub vlan: Option<u16>,
    #[serde(default = "yes")]
    pub bridged: bool,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub bootproto: BootProto,
    #[serde(default)]
    pub ipaddr: Option<Ipv4Addr>,
    #[serde(default)]
    pub prefix: Option<u8>,
    #[serde(default)]
    pub netmask: Option<Ipv4Addr>,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub default_route: bool,
}

impl NetworkRequest {
    fn attrs(&self) -> NetworkAttrs {
        NetworkAttrs {
            nic: self.nic.clone(),
            bonding: self.bonding.clone(),
            vlan: self.vlan,
            bridged: self.bridged,
            mtu: self.mtu,
            bootproto: self.bootproto,
            ipaddr: self.ipaddr,
            prefix: self.prefix,
            netmask: self.netmask,
            gateway: self.gateway,
            default_route: self.default_route,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BondRequest {
    #[serde(default)]
    pub remove: bool,
    #[serde(default)]
    pub nics: Vec<String>,
    #[serde(default)]
    pub options: String,
}

/// `Host.setupNetworks` options, as VDSM names them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetupOptions {
    /// Wait for the engine's confirmation and roll back without it.
    #[serde(default = "yes")]
    pub connectivity_check: bool,
    /// Seconds to wait for the confirmation.
    #[serde(default = "default_connectivity_timeout")]
    pub connectivity_timeout: u64,
}

impl Default for SetupOptions {
    fn default() -> Self {
        SetupOptions {
            connectivity_check: true,
            connectivity_timeout: default_connectivity_timeout(),
        }
    }
}

/// VDSM's default.
pub fn default_connectivity_timeout() -> u64 {
    120
}

/// The `Host.setupNetworks` request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetupNetworks {
    #[serde(default)]
    pub networks: BTreeMap<String, NetworkRequest>,
    #[serde(default)]
    pub bondings: BTreeMap<String, BondRequest>,
    #[serde(default)]
    pub options: SetupOptions,
}

impl RunningConfig {
    /// The configuration after `req`; unknown removals are errors.
    pub fn with_changes(&self, req: &SetupNetworks) -> Result<RunningConfig, String> {
        let mut next = self.clone();
        for (name, r) in &req.networks {
            if r.remove {
                if next.networks.remove(name).is_none() {
                    return Err(format!("cannot remove network {name:?}: it is not on this host"));
                }
            } else {
                next.networks.insert(name.clone(), r.attrs());
            }
        }
        for (name, b) in &req.bondings {
            if b.remove {
                if next.bondings.remove(name).is_none() {
                    return Err(format!("cannot remove bond {name:?}: it is not on this host"));
                }
            } else {
                next.bondings.insert(
                    name.clone(),
                    BondAttrs {
                        nics: b.nics.clone(),
                        options: b.options.clone(),
                    },
                );
            }
        }
        Ok(next)
    }

    /// Checks the configuration against the host's links (`host`, as observed). Every problem
    /// is reported at once, one sentence each.
    pub fn validate(&self, host: &HostNet, owned_before: &BTreeSet<String>) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        // Loopback and taps are never NICs a network can sit on.
        let is_host_nic = |n: &str| {
            host.links
                .get(n)
                .is_some_and(|l| n != "lo" && !owned_before.contains(n) && l.kind.as_deref() != Some("tun"))
        };
        let mut bond_slaves: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, b) in &self.bondings {
            if let Err(e) = check_ifname(name) {
                errs.push(format!("bond {name:?}: {e}"));
            }
            if let Some(l) = host.links.get(name) {
                if !owned_before.contains(name) && l.kind.as_deref() != Some("bond") {
                    errs.push(format!(
                        "bond {name:?}: an interface of that name exists and is not a bond"
                    ));
                }
            }
            if b.nics.is_empty() {
                errs.push(format!("bond {name:?} has no NICs"));
            }
            if let Err(e) = BondOptions::parse(&b.options) {
                errs.push(format!("bond {name:?}: {e}"));
            }
            for n in &b.nics {
                if !is_host_nic(n) {
                    errs.push(format!("bond {name:?}: NIC {n:?} is not on this host"));
                }
                if let Some(other) = bond_slaves.insert(n, name) {
                    errs.push(format!("NIC {n:?} is in two bonds, {other:?} and {name:?}"));
                }
            }
        }
        // Per base link: the untagged network and the VLAN ids on it.
        let mut untagged: BTreeMap<String, &str> = BTreeMap::new();
        let mut vlans: BTreeMap<(String, u16), &str> = BTreeMap::new();
        let mut default_routes = Vec::new();
        for (name, n) in &self.networks {
            let err = |m: String| format!("network {name:?}: {m}");
            if n.bridged {
                if let Err(e) = check_ifname(name) {
                    errs.push(err(format!("a VM network's name is its bridge's: {e}")));
                }
                if let Some(l) = host.links.get(name) {
                    if !owned_before.contains(name) && l.kind.as_deref() != Some("bridge") {
                        errs.push(err(format!(
                            "an interface named {name:?} exists and is not a bridge"
                        )));
                    }
                }
            } else if name.is_empty() || name.len() > 64 {
                errs.push(err("a name must have 1 to 64 characters".into()));
            }
            match (&n.nic, &n.bonding) {
                (Some(_), Some(_)) => errs.push(err("give either nic or bonding, not both".into())),
                (Some(nic), None) => {
                    if !is_host_nic(nic) {
                        errs.push(err(format!("NIC {nic:?} is not on this host")));
                    } else if let Some(b) = bond_slaves.get(nic.as_str()) {
                        errs.push(err(format!("NIC {nic:?} is a slave of bond {b:?}")));
                    }
                }
                (None, Some(b)) => {
                    if !self.bondings.contains_key(b) {
                        errs.push(err(format!("bond {b:?} is not defined")));
                    }
                }
                (None, None) => {
                    if !n.bridged {
                        errs.push(err("a network without a bridge needs a nic or a bonding".into()));
                    }
                    if n.vlan.is_some() {
                        errs.push(err("a VLAN needs a nic or a bonding".into()));
                    }
                }
            }
            if let Some(id) = n.vlan {
                if id > MAX_VLAN_ID {
                    errs.push(err(format!("VLAN id {id} is outside 0..={MAX_VLAN_ID}")));
                }
                if let Some(base) = n.base() {
                    let dev = vlan_device_name(base, id);
                    if let Err(e) = check_ifname(&dev) {
                        errs.push(err(format!("VLAN device {dev:?}: {e}")));
                    }
                    if let Some(other) = vlans.insert((base.to_string(), id), name) {
                        errs.push(err(format!(
                            "VLAN {id} on {base:?} is already network {other:?}'s"
                        )));
                    }
                }
            } else if let Some(base) = n.base() {
                if let Some(other) = untagged.insert(base.to_string(), name) {
                    errs.push(err(format!(
                        "{base:?} already carries network {other:?} untagged"
                    )));
                }
            }
            if let Some(m) = n.mtu {
                if !(MIN_MTU..=MAX_MTU).contains(&m) {
                    errs.push(err(format!("MTU {m} is outside {MIN_MTU}..={MAX_MTU}")));
                }
            }
            match n.bootproto {
                BootProto::Dhcp => {
                    if n.ipaddr.is_some() || n.gateway.is_some() {
                        errs.push(err("bootproto dhcp takes no ipaddr or gateway".into()));
                    }
                }
                BootProto::None => {
                    if n.ipaddr.is_some() && n.address().is_none() {
                        errs.push(err(match n.netmask {
                            Some(m) if n.prefix.is_none() => format!("netmask {m} is not contiguous"),
                            _ => "an ipaddr needs a prefix (or netmask)".into(),
                        }));
                    }
                    if let Some(p) = n.prefix.filter(|p| *p > 32) {
                        errs.push(err(format!("prefix {p} is over 32")));
                    }
                    if let Some(gw) = n.gateway {
                        match n.address() {
                            None => errs.push(err("a gateway needs a static address".into())),
                            Some(a) if !a.contains(gw) => {
                                errs.push(err(format!("gateway {gw} is outside {a}")))
                            }
                            _ => {}
                        }
                    }
                }
            }
            if n.default_route {
                if n.gateway.is_none() && n.bootproto != BootProto::Dhcp {
                    errs.push(err("defaultRoute needs a gateway".into()));
                }
                default_routes.push(name.as_str());
            }
        }
        if default_routes.len() > 1 {
            errs.push(format!(
                "only one network may be the default route, not {default_routes:?}"
            ));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    /// The links this configuration needs and the default route it sets.
    pub fn desired(&self) -> Desired {
        let mut links: BTreeMap<String, LinkSpec> = BTreeMap::new();
        // Every link a network sits on carries at least that network's MTU.
        let mut need_mtu: BTreeMap<String, u32> = BTreeMap::new();
        let mut raise = |name: &str, mtu: u32| {
            let e = need_mtu.entry(name.to_string()).or_insert(mtu);
            *e = (*e).max(mtu);
        };
        for n in self.networks.values() {
            if let Some(b) = n.base() {
                raise(b, n.mtu());
            }
        }
        for (name, b) in &self.bondings {
            let opts = BondOptions::parse(&b.options).unwrap_or(BondOptions { mode: 4, miimon: 100 });
            links.insert(
                name.clone(),
                LinkSpec {
                    kind: LinkKind::Bond(opts),
                    master: None,
                    mtu: need_mtu.get(name).copied(),
                    up: true,
                    ipv4: Ipv4Want::Exact(vec![]),
                },
            );
            for nic in &b.nics {
                links.insert(
                    nic.clone(),
                    LinkSpec {
                        kind: LinkKind::Nic,
                        master: Some(name.clone()),
                        // The bond sets its slaves' MTU.
                        mtu: None,
                        up: true,
                        ipv4: Ipv4Want::Exact(vec![]),
                    },
                );
            }
        }
        let mut default_route = None;
        let mut dhcp_default_route = None;
        for (name, n) in &self.networks {
            if let Some(nic) = &n.nic {
                links.entry(nic.clone()).or_insert(LinkSpec {
                    kind: LinkKind::Nic,
                    master: None,
                    mtu: need_mtu.get(nic).copied(),
                    up: true,
                    ipv4: Ipv4Want::Exact(vec![]),
                });
            }
            if let (Some(base), Some(id)) = (n.base(), n.vlan) {
                links.insert(
                    vlan_device_name(base, id),
                    LinkSpec {
                        kind: LinkKind::Vlan {
                            base: base.to_string(),
                            id,
                        },
                        master: None,
                        mtu: Some(n.mtu()),
                        up: true,
                        ipv4: Ipv4Want::Exact(vec![]),
                    },
                );
            }
            if n.bridged {
                links.insert(
                    name.clone(),
                    LinkSpec {
                        kind: LinkKind::Bridge,
                        master: None,
                        mtu: Some(n.mtu()),
                        up: true,
                        ipv4: Ipv4Want::Exact(vec![]),
                    },
                );
                if let Some(dev) = n.device() {
                    if let Some(l) = links.get_mut(&dev) {
                        l.master = Some(name.clone());
                    }
                }
            }
            if let Some(top) = n.top(name) {
                if let Some(l) = links.get_mut(&top) {
                    l.ipv4 = match n.bootproto {
                        BootProto::Dhcp => Ipv4Want::Dhcp,
                        BootProto::None => Ipv4Want::Exact(n.address().into_iter().collect()),
                    };
                }
                if n.default_route && n.bootproto == BootProto::Dhcp {
                    dhcp_default_route = Some(top.clone());
                }
                if n.default_route {
                    if let Some(gw) = n.gateway {
                        default_route = Some(DefaultRoute {
                            gateway: gw,
                            dev: top,
                        });
                    }
                }
            }
        }
        Desired {
            links,
            default_route,
            dhcp_default_route,
        }
    }
}

fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_IFNAME {
        return Err(format!("{name:?} must have 1 to {MAX_IFNAME} characters"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not an interface name"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "{name:?} may only hold letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

// ---- Observed and desired state --------------------------------------------------------------

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The rtnetlink kind (`bridge`, `vlan`, `bond`, `veth`, `tun`…); `None` for hardware NICs.
    pub kind: Option<String>,
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Carrier (IFF_LOWER_UP).
    pub carrier: bool,
    pub master: Option<String>,
    pub mac: Option<String>,
    /// For VLAN devices: the base link and the id.
    pub vlan: Option<(String, u16)>,
    pub ipv4: Vec<Ipv4Cidr>,
    pub stats: LinkStats,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DefaultRoute {
    pub gateway: Ipv4Addr,
    pub dev: String,
}

/// The host's links and default route, observed in one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNet {
    pub links: BTreeMap<String, Link>,
    pub default_route: Option<DefaultRoute>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkKindTag {
    Nic,
    Bridge,
    Vlan,
    Bond,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkKind {
    /// A link that exists independently of oxvirt (hardware NIC, veth): never created or deleted.
    Nic,
    Bridge,
    Vlan {
        base: String,
        id: u16,
    },
    Bond(BondOptions),
}

impl LinkKind {
    /// Created and deleted by oxvirt.
    pub fn owned(&self) -> bool {
        !matches!(self, LinkKind::Nic)
    }

    /// Whether the observed link is this kind (and, for VLANs, the same base and id).
    fn matches(&self, l: &Link) -> bool {
        match self {
            LinkKind::Nic => true,
            LinkKind::Bridge => l.kind.as_deref() == Some("bridge"),
            LinkKind::Bond(_) => l.kind.as_deref() == Some("bond"),
            LinkKind::Vlan { base, id } => {
                l.kind.as_deref() == Some("vlan") && l.vlan.as_ref() == Some(&(base.clone(), *id))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ipv4Want {
    /// Exactly these addresses (none: no IPv4 address).
    Exact(Vec<Ipv4Cidr>),
    /// Whatever a DHCP client gets.
    Dhcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSpec {
    pub kind: LinkKind,
    pub master: Option<String>,
    /// `None`: leave as is.
    pub mtu: Option<u32>,
    pub up: bool,
    pub ipv4: Ipv4Want,
}

/// Links wanted and the default route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub links: BTreeMap<String, LinkSpec>,
    pub default_route: Option<DefaultRoute>,
    /// The DHCP link whose lease's router becomes the default route (the gateway is not known
    /// until the lease comes, so it cannot be a [`DefaultRoute`]).
    #[serde(default)]
    pub dhcp_default_route: Option<String>,
}

/// What the host NICs a change touches looked like before it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub nics: BTreeMap<String, Link>,
    pub default_route: Option<DefaultRoute>,
}

impl Snapshot {
    /// The host NICs named in `a` or `b`, as observed now.
    pub fn take(host: &HostNet, a: &Desired, b: &Desired) -> Snapshot {
        let nics = a
            .links
            .iter()
            .chain(b.links.iter())
            .filter(|(_, s)| s.kind == LinkKind::Nic)
            .filter_map(|(n, _)| host.links.get(n).map(|l| (n.clone(), l.clone())))
            .collect();
        Snapshot {
            nics,
            default_route: host.default_route.clone(),
        }
    }
}

impl Desired {
    /// The names of links oxvirt creates for this state.
    pub fn owned(&self) -> BTreeSet<String> {
        self.links
            .iter()
            .filter(|(_, s)| s.kind.owned())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Where a rollback goes: the previous configuration's links, with every host NIC as the
    /// snapshot saw it (master, MTU, state, addresses) and the snapshot's default route.
    pub fn rollback_target(previous: &Desired, snap: &Snapshot) -> Desired {
        let mut t = previous.clone();
        for (name, l) in &snap.nics {
            let ipv4 = match previous.links.get(name).map(|s| &s.ipv4) {
                Some(Ipv4Want::Dhcp) => Ipv4Want::Dhcp,
                _ => Ipv4Want::Exact(l.ipv4.clone()),
            };
            t.links.insert(
                name.clone(),
                LinkSpec {
                    kind: LinkKind::Nic,
                    master: l.master.clone(),
                    mtu: Some(l.mtu),
                    up: l.up,
                    ipv4,
                },
            );
        }
        t.default_route = snap.default_route.clone();
        t
    }
}

/// One kernel change. Links are named; the executor resolves names to indexes when it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    DeleteLink {
        name: String,
    },
    CreateBridge {
        name: String,
    },
    CreateVlan {
        name: String,
        base: String,
        id: u16,
    },
    CreateBond {
        name: String,
        options: BondOptions,
    },
    SetMaster {
        name: String,
        master: Option<String>,
    },
    SetMtu {
        name: String,
        mtu: u32,
    },
    SetUp {
        name: String,
        up: bool,
    },
    AddAddr {
        name: String,
        addr: Ipv4Cidr,
    },
    DelAddr {
        name: String,
        addr: Ipv4Cidr,
    },
    /// Starts (or restarts) the DHCP client of the link; with `default_route`, the lease's
    /// router becomes the default route.
    StartDhcp {
        name: String,
        default_route: bool,
    },
    /// Stops the link's DHCP client; the lease's address stays for the plan to keep or remove.
    StopDhcp {
        name: String,
    },
    ReplaceDefaultRoute(DefaultRoute),
    DelDefaultRoute(DefaultRoute),
}

/// The ordered changes that take the host from `from` (what oxvirt last set up) to `to`, given
/// what the kernel shows now. Running it twice is harmless: the second plan is empty.
pub fn plan(host: &HostNet, from: &Desired, to: &Desired) -> Vec<Op> {
    let mut ops = Vec::new();
    let exists = |n: &str| host.links.contains_key(n);
    let observed = |n: &str| host.links.get(n);
    // 1. Owned links that must go: no longer wanted, or wanted as something else. Bridges
    //    first (releasing their ports), then VLAN devices, then bonds.
    let mut recreate: BTreeSet<String> = BTreeSet::new();
    for (name, want) in &to.links {
        if let (true, Some(l)) = (want.kind.owned(), observed(name)) {
            if !want.kind.matches(l) || bond_differs(want, from.links.get(name)) {
                recreate.insert(name.clone());
            }
        }
    }
    for tag in [LinkKindTag::Bridge, LinkKindTag::Vlan, LinkKindTag::Bond] {
        for (name, spec) in &from.links {
            let gone = !to.links.get(name).is_some_and(|w| w.kind.owned());
            if kind_tag(&spec.kind) == tag && (gone || recreate.contains(name)) && exists(name) {
                ops.push(Op::DeleteLink { name: name.clone() });
            }
        }
    }
    for name in &recreate {
        if !from.links.contains_key(name) {
            ops.push(Op::DeleteLink { name: name.clone() });
        }
    }
    let deleted: BTreeSet<String> = ops
        .iter()
        .filter_map(|o| match o {
            Op::DeleteLink { name } => Some(name.clone()),
            _ => None,
        })
        .collect();
    let present = |n: &str| exists(n) && !deleted.contains(n);
    // 2. Host NICs no longer used are released and lose what the configuration gave them.
    for (name, spec) in &from.links {
        if spec.kind == LinkKind::Nic && !to.links.contains_key(name) {
            if let Some(l) = observed(name) {
                if l.master.as_ref().is_some_and(|m| !deleted.contains(m)) {
                    ops.push(Op::SetMaster {
                        name: name.clone(),
                        master: None,
                    });
                }
                if spec.ipv4 == Ipv4Want::Dhcp {
                    ops.push(Op::StopDhcp { name: name.clone() });
                    // Its addresses came from the lease.
                    for a in &l.ipv4 {
                        ops.push(Op::DelAddr {
                            name: name.clone(),
                            addr: *a,
                        });
                    }
                }
            }
        }
    }
    for (name, spec) in &from.links {
        if spec.ipv4 == Ipv4Want::Dhcp
            && to.links.get(name).is_none_or(|w| w.ipv4 != Ipv4Want::Dhcp)
            && (spec.kind != LinkKind::Nic || to.links.contains_key(name))
        {
            ops.push(Op::StopDhcp { name: name.clone() });
        }
    }
    // 3. Create what is missing: bonds, VLAN devices (on NICs or bonds), bridges.
    for tag in [LinkKindTag::Bond, LinkKindTag::Vlan, LinkKindTag::Bridge] {
        for (name, spec) in &to.links {
            if kind_tag(&spec.kind) != tag || present(name) {
                continue;
            }
            ops.push(match &spec.kind {
                LinkKind::Bond(options) => Op::CreateBond {
                    name: name.clone(),
                    options: *options,
                },
                LinkKind::Vlan { base, id } => Op::CreateVlan {
                    name: name.clone(),
                    base: base.clone(),
                    id: *id,
                },
                LinkKind::Bridge => Op::CreateBridge { name: name.clone() },
                LinkKind::Nic => unreachable!("filtered by tag"),
            });
        }
    }
    let fresh = |n: &str| !present(n);
    // 4. Masters. A NIC joins a bond only while down.
    for (name, spec) in &to.links {
        let current = if fresh(name) {
            None
        } else {
            observed(name).and_then(|l| l.master.clone())
        };
        let current = current.filter(|m| !deleted.contains(m));
        if current != spec.master {
            if let Some(m) = &spec.master {
                if to
                    .links
                    .get(m)
                    .is_some_and(|s| matches!(s.kind, LinkKind::Bond(_)))
                {
                    ops.push(Op::SetUp {
                        name: name.clone(),
                        up: false,
                    });
                }
            }
            ops.push(Op::SetMaster {
                name: name.clone(),
                master: spec.master.clone(),
            });
        }
    }
    // 5. MTUs, lower links first so upper ones may rise to them.
    for tag in [
        LinkKindTag::Nic,
        LinkKindTag::Bond,
        LinkKindTag::Vlan,
        LinkKindTag::Bridge,
    ] {
        for (name, spec) in &to.links {
            if kind_tag(&spec.kind) != tag {
                continue;
            }
            if let Some(mtu) = spec.mtu {
                let cur = if fresh(name) {
                    None
                } else {
                    observed(name).map(|l| l.mtu)
                };
                if cur != Some(mtu) {
                    ops.push(Op::SetMtu {
                        name: name.clone(),
                        mtu,
                    });
                }
            }
        }
    }
    // 6. Link state (a NIC downed to join a bond comes up again here).
    for (name, spec) in &to.links {
        let cur = if fresh(name) {
            false
        } else {
            observed(name).is_some_and(|l| l.up)
        };
        let downed = ops
            .iter()
            .any(|o| matches!(o, Op::SetUp { name: n, up: false } if n == name));
        if (spec.up && (!cur || downed)) || (!spec.up && cur && !downed) {
            ops.push(Op::SetUp {
                name: name.clone(),
                up: spec.up,
            });
        }
    }
    // 7. Addresses.
    for (name, spec) in &to.links {
        let cur: Vec<Ipv4Cidr> = if fresh(name) {
            vec![]
        } else {
            observed(name).map(|l| l.ipv4.clone()).unwrap_or_default()
        };
        match &spec.ipv4 {
            Ipv4Want::Exact(want) => {
                for a in cur.iter().filter(|a| !want.contains(a)) {
                    ops.push(Op::DelAddr {
                        name: name.clone(),
                        addr: *a,
                    });
                }
                for a in want.iter().filter(|a| !cur.contains(a)) {
                    ops.push(Op::AddAddr {
                        name: name.clone(),
                        addr: *a,
                    });
                }
            }
            Ipv4Want::Dhcp => {
                // Static addresses oxvirt set before make way for the lease.
                if let Some(LinkSpec {
                    ipv4: Ipv4Want::Exact(had),
                    ..
                }) = from.links.get(name)
                {
                    for a in had.iter().filter(|a| cur.contains(a)) {
                        ops.push(Op::DelAddr {
                            name: name.clone(),
                            addr: *a,
                        });
                    }
                }
                let route = to.dhcp_default_route.as_deref() == Some(name.as_str());
                let had_route = from.dhcp_default_route.as_deref() == Some(name.as_str());
                if from.links.get(name).is_none_or(|s| s.ipv4 != Ipv4Want::Dhcp)
                    || fresh(name)
                    || route != had_route
                {
                    ops.push(Op::StartDhcp {
                        name: name.clone(),
                        default_route: route,
                    });
                }
            }
        }
    }
    // 8. The default route.
    match (&to.default_route, &host.default_route) {
        // Removing an address takes the routes through it along (the kernel flushes them), so
        // a link that loses one gets its default route again even if it looked unchanged.
        (Some(want), cur)
            if cur.as_ref() != Some(want)
                || fresh(&want.dev)
                || ops
                    .iter()
                    .any(|o| matches!(o, Op::DelAddr { name, .. } if *name == want.dev)) =>
        {
            ops.push(Op::ReplaceDefaultRoute(want.clone()))
        }
        (None, Some(cur))
            if (from.default_route.as_ref() == Some(cur)
                || from.dhcp_default_route.as_ref() == Some(&cur.dev))
                && to.dhcp_default_route.as_ref() != Some(&cur.dev)
                && present(&cur.dev) =>
        {
            ops.push(Op::DelDefaultRoute(cur.clone()))
        }
        _ => {}
    }
    ops
}

fn bond_differs(want: &LinkSpec, had: Option<&LinkSpec>) -> bool {
    match (&want.kind, had.map(|h| &h.kind)) {
        (LinkKind::Bond(a), Some(LinkKind::Bond(b))) => a != b,
        _ => false,
    }
}

fn kind_tag(k: &LinkKind) -> LinkKindTag {
    match k {
        LinkKind::Nic => LinkKindTag::Nic,
        LinkKind::Bridge => LinkKindTag::Bridge,
        LinkKind::Vlan { .. } => LinkKindTag::Vlan,
        LinkKind::Bond(_) => LinkKindTag::Bond,
    }
}

/// The kernel features a configuration needs beyond bridges.
pub fn needed_features(d: &Desired) -> BTreeSet<KernelFeature> {
    d.links
        .values()
        .filter_map(|s| match s.kind {
            LinkKind::Vlan { .. } => Some(KernelFeature::Vlan),
            LinkKind::Bond(_) => Some(KernelFeature::Bonding),
            _ => None,
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum KernelFeature {
    Vlan,
    Bonding,
}

impl KernelFeature {
    /// The feature as an admin looks for it.
    pub fn describe(self) -> &'static str {
        match self {
            KernelFeature::Vlan => "802.1Q VLAN support (kernel module 8021q)",
            KernelFeature::Bonding => "bonding support (kernel module bonding)",
        }
    }

    pub fn module(self) -> &'static str {
        match self {
            KernelFeature::Vlan => "8021q",
            KernelFeature::Bonding => "bonding",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, index: u32) -> Link {
        Link {
            index,
            name: name.into(),
            kind: Some("veth".into()),
            mtu: 1500,
            up: true,
            carrier: true,
            master: None,
            mac: None,
            vlan: None,
            ipv4: vec![],
            stats: LinkStats::default(),
        }
    }

    fn host(links: Vec<Link>) -> HostNet {
        HostNet {
            links: links.into_iter().map(|l| (l.name.clone(), l)).collect(),
            default_route: None,
        }
    }

    fn req(json: serde_json::Value) -> SetupNetworks {
        serde_json::from_value(json).unwrap()
    }

    /// Applies ops to an observed state the way the kernel would (enough for planning tests).
    fn simulate(h: &HostNet, ops: &[Op]) -> HostNet {
        let mut h = h.clone();
        let mut next = 100;
        let mut new = |name: &str, kind: &str| {
            next += 1;
            let mut l = nic(name, next);
            l.kind = Some(kind.into());
            l.up = false;
            l
        };
        for op in ops {
            match op {
                Op::DeleteLink { name } => {
                    h.links.remove(name);
                    for l in h.links.values_mut() {
                        if l.master.as_ref() == Some(name) {
                            l.master = None;
                        }
                    }
                    h.links
                        .retain(|_, l| l.vlan.as_ref().is_none_or(|(b, _)| b != name));
                }
                Op::CreateBridge { name } => {
                    h.links.insert(name.clone(), new(name, "bridge"));
                }
                Op::CreateBond { name, .. } => {
                    h.links.insert(name.clone(), new(name, "bond"));
                }
                Op::CreateVlan { name, base, id } => {
                    let mut l = new(name, "vlan");
                    l.vlan = Some((base.clone(), *id));
                    h.links.insert(name.clone(), l);
                }
                Op::SetMaster { name, master } => h.links.get_mut(name).unwrap().master = master.clone(),
                Op::SetMtu { name, mtu } => h.links.get_mut(name).unwrap().mtu = *mtu,
                Op::SetUp { name, up } => h.links.get_mut(name).unwrap().up = *up,
                Op::AddAddr { name, addr } => h.links.get_mut(name).unwrap().ipv4.push(*addr),
                Op::DelAddr { name, addr } => h.links.get_mut(name).unwrap().ipv4.retain(|a| a != addr),
                Op::ReplaceDefaultRoute(r) => h.default_route = Some(r.clone()),
                Op::DelDefaultRoute(_) => h.default_route = None,
                Op::StartDhcp { .. } | Op::StopDhcp { .. } => {}
            }
        }
        h
    }

    #[test]
    fn a_vm_network_on_a_nic_becomes_a_bridge_with_the_nic_as_port() {
        let h = host(vec![nic("eth1", 2)]);
        let cfg = RunningConfig::default()
            .with_changes(&req(serde_json::json!({
                "networks": {"vmnet": {"nic": "eth1", "mtu": 9000, "ipaddr": "10.0.0.1", "prefix": 24}}
            })))
            .unwrap();
        cfg.validate(&h, &BTreeSet::new()).unwrap();
        let d = cfg.desired();
        let ops = plan(&h, &Desired::default(), &d);
        assert_eq!(ops[0], Op::CreateBridge { name: "vmnet".into() });
        assert!(ops.contains(&Op::SetMaster {
            name: "eth1".into(),
            master: Some("vmnet".into())
        }));
        let mtu_nic = ops.iter().position(|o| {
            *o == Op::SetMtu {
                name: "eth1".into(),
                mtu: 9000,
            }
        });
        let mtu_br = ops.iter().position(|o| {
            *o == Op::SetMtu {
                name: "vmnet".into(),
                mtu: 9000,
            }
        });
        assert!(mtu_nic.unwrap() < mtu_br.unwrap(), "{ops:?}");
        assert!(ops.contains(&Op::AddAddr {
            name: "vmnet".into(),
            addr: "10.0.0.1/24".parse().unwrap()
        }));
        let after = simulate(&h, &ops);
        assert_eq!(plan(&after, &d, &d), vec![], "a second plan is empty");
    }

    #[test]
    fn dhcp_transitions_plan_the_client_and_the_addresses_and_route_around_it() {
        let cfg = |v: serde_json::Value| RunningConfig::default().with_changes(&req(v)).unwrap().desired();
        let dhcp_route = cfg(
            serde_json::json!({"networks": {"m": {"nic": "eth1", "bridged": false,
            "bootproto": "dhcp", "defaultRoute": true}}}),
        );
        let dhcp = cfg(
            serde_json::json!({"networks": {"m": {"nic": "eth1", "bridged": false,
            "bootproto": "dhcp"}}}),
        );
        let fixed = cfg(
            serde_json::json!({"networks": {"m": {"nic": "eth1", "bridged": false,
            "ipaddr": "10.0.0.9", "prefix": 24, "gateway": "10.0.0.1", "defaultRoute": true}}}),
        );
        let (leased, gw) = ("10.0.0.50/24".parse().unwrap(), "10.0.0.1".parse().unwrap());
        let eth1 = |name: &str| name.to_string();
        let fresh = host(vec![nic("eth1", 2)]);
        assert_eq!(dhcp_route.dhcp_default_route.as_deref(), Some("eth1"));
        let ops = plan(&fresh, &Desired::default(), &dhcp_route);
        assert!(ops.contains(&Op::StartDhcp {
            name: eth1("eth1"),
            default_route: true
        }));
        // What the client then sets up; planning again changes nothing.
        let mut h = fresh.clone();
        h.links.get_mut("eth1").unwrap().ipv4 = vec![leased];
        h.default_route = Some(DefaultRoute {
            gateway: gw,
            dev: eth1("eth1"),
        });
        assert_eq!(plan(&h, &dhcp_route, &dhcp_route), vec![]);
        // Dropping the route restarts the client without it and deletes the route it set.
        let ops = plan(&h, &dhcp_route, &dhcp);
        assert!(ops.contains(&Op::StartDhcp {
            name: eth1("eth1"),
            default_route: false
        }));
        assert!(ops.contains(&Op::DelDefaultRoute(h.default_route.clone().unwrap())));
        assert!(!ops.iter().any(|o| matches!(o, Op::DelAddr { .. })), "{ops:?}");
        // Static addressing: the client stops first, the lease's address goes, and the route
        // (same gateway) is set again because removing the address flushed it.
        let ops = plan(&h, &dhcp_route, &fixed);
        assert_eq!(ops[0], Op::StopDhcp { name: eth1("eth1") });
        assert!(ops.contains(&Op::DelAddr {
            name: eth1("eth1"),
            addr: leased
        }));
        assert!(ops.contains(&Op::AddAddr {
            name: eth1("eth1"),
            addr: "10.0.0.9/24".parse().unwrap()
        }));
        assert_eq!(
            ops.last(),
            Some(&Op::ReplaceDefaultRoute(DefaultRoute {
                gateway: gw,
                dev: eth1("eth1")
            }))
        );
        // And back: the static address makes way for the lease.
        let after = simulate(&h, &ops);
        let ops = plan(&after, &fixed, &dhcp);
        assert!(ops.contains(&Op::DelAddr {
            name: eth1("eth1"),
            addr: "10.0.0.9/24".parse().unwrap()
        }));
        assert!(ops.contains(&Op::StartDhcp {
            name: eth1("eth1"),
            default_route: false
        }));
        // A released NIC loses the client and the lease's address.
        let ops = plan(&h, &dhcp_route, &Desired::default());
        assert!(ops.contains(&Op::StopDhcp { name: eth1("eth1") }));
        assert!(ops.contains(&Op::DelAddr {
            name: eth1("eth1"),
            addr: leased
        }));
    }

    #[test]
    fn removing_a_network_deletes_its_bridge_and_releases_the_nic_and_rollback_restores() {
        let mut h = host(vec![nic("eth1", 2)]);
        h.links.get_mut("eth1").unwrap().ipv4 = vec!["192.168.7.2/24".parse().unwrap()];
        h.default_route = Some(DefaultRoute {
            gateway: "192.168.7.1".parse().unwrap(),
            dev: "eth1".into(),
        });
        let old = RunningConfig::default();
        let new = old
            .with_changes(&req(serde_json::json!({
                "networks": {"mgmt": {"nic": "eth1", "ipaddr": "192.168.7.2", "netmask": "255.255.255.0",
                                      "gateway": "192.168.7.1", "defaultRoute": true}}
            })))
            .unwrap();
        new.validate(&h, &BTreeSet::new()).unwrap();
        let (d_old, d_new) = (old.desired(), new.desired());
        let snap = Snapshot::take(&h, &d_old, &d_new);
        let ops = plan(&h, &d_old, &d_new);
        assert!(ops.contains(&Op::DelAddr {
            name: "eth1".into(),
            addr: "192.168.7.2/24".parse().unwrap()
        }));
        assert!(ops.contains(&Op::ReplaceDefaultRoute(DefaultRoute {
            gateway: "192.168.7.1".parse().unwrap(),
            dev: "mgmt".into()
        })));
        let applied = simulate(&h, &ops);
        assert_eq!(applied.links["eth1"].master.as_deref(), Some("mgmt"));
        // Roll back: the bridge goes, the NIC gets its address and route back.
        let target = Desired::rollback_target(&d_old, &snap);
        let back = plan(&applied, &d_new, &target);
        assert_eq!(back[0], Op::DeleteLink { name: "mgmt".into() });
        let restored = simulate(&applied, &back);
        assert_eq!(restored.links["eth1"], h.links["eth1"]);
        assert_eq!(restored.default_route, h.default_route);
        assert_eq!(restored.links.len(), 1);
    }

    #[test]
    fn vlans_and_bonds_are_planned_in_dependency_order() {
        let h = host(vec![nic("eth1", 2), nic("eth2", 3)]);
        let cfg = RunningConfig::default()
            .with_changes(&req(serde_json::json!({
                "bondings": {"bond0": {"nics": ["eth1", "eth2"], "options": "mode=active-backup miimon=50"}},
                "networks": {"v100": {"bonding": "bond0", "vlan": 100, "mtu": 1400}}
            })))
            .unwrap();
        cfg.validate(&h, &BTreeSet::new()).unwrap();
        let d = cfg.desired();
        assert_eq!(needed_features(&d).len(), 2);
        let ops = plan(&h, &Desired::default(), &d);
        let pos = |op: &Op| {
            ops.iter()
                .position(|o| o == op)
                .unwrap_or_else(|| panic!("{op:?} in {ops:?}"))
        };
        let bond = pos(&Op::CreateBond {
            name: "bond0".into(),
            options: BondOptions { mode: 1, miimon: 50 },
        });
        let vlan = pos(&Op::CreateVlan {
            name: "bond0.100".into(),
            base: "bond0".into(),
            id: 100,
        });
        let br = pos(&Op::CreateBridge { name: "v100".into() });
        let down = pos(&Op::SetUp {
            name: "eth1".into(),
            up: false,
        });
        let enslave = pos(&Op::SetMaster {
            name: "eth1".into(),
            master: Some("bond0".into()),
        });
        let up = ops
            .iter()
            .rposition(|o| {
                *o == Op::SetUp {
                    name: "eth1".into(),
                    up: true,
                }
            })
            .unwrap();
        assert!(
            bond < vlan && vlan < br && down < enslave && enslave < up,
            "{ops:?}"
        );
        assert!(ops.contains(&Op::SetMaster {
            name: "bond0.100".into(),
            master: Some("v100".into())
        }));
        let after = simulate(&h, &ops);
        assert_eq!(plan(&after, &d, &d), vec![]);
        // Removing everything deletes bridge, VLAN device and bond, in that order.
        let empty = Desired::default();
        let ops = plan(&after, &d, &empty);
        let names: Vec<_> = ops
            .iter()
            .filter_map(|o| match o {
                Op::DeleteLink { name } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["v100", "bond0.100", "bond0"]);
    }

    #[test]
    fn bad_configurations_are_refused_with_every_reason() {
        let h = host(vec![nic("eth1", 2), nic("eth2", 3)]);
        let bad = RunningConfig::default()
            .with_changes(&req(serde_json::json!({
                "networks": {
                    "a-name-longer-than-15": {"nic": "eth1"},
                    "v": {"nic": "eth9", "vlan": 4095, "mtu": 20},
                    "x": {"nic": "eth1", "ipaddr": "10.0.0.1"},
                    "g": {"nic": "eth2", "ipaddr": "10.0.0.1", "prefix": 24, "gateway": "10.1.0.1", "defaultRoute": true},
                    "eth1": {},
                    "d": {"bridged": false, "bootproto": "dhcp", "ipaddr": "10.0.0.9", "defaultRoute": true}
                }
            })))
            .unwrap();
        let errs = bad.validate(&h, &BTreeSet::new()).unwrap_err();
        let all = errs.join("\n");
        for needle in [
            "must have 1 to 15",
            "eth9",
            "4095",
            "MTU 20",
            "needs a prefix",
            "outside 10.0.0.1/24",
            "exists and is not a bridge",
            "without a bridge needs a nic",
            "dhcp takes no ipaddr",
            "only one network may be the default route",
            "already carries network",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        let e = RunningConfig::default()
            .with_changes(&req(serde_json::json!({"networks": {"nope": {"remove": true}}})))
            .unwrap_err();
        assert!(e.contains("nope"), "{e}");
        let e = RunningConfig::default()
            .with_changes(&req(serde_json::json!({
                "bondings": {"b": {"nics": ["eth1"], "options": "mode=9"}},
                "networks": {"n": {"nic": "eth1"}}
            })))
            .unwrap()
            .validate(&h, &BTreeSet::new())
            .unwrap_err()
            .join("\n");
        assert!(
            e.contains("unknown bonding mode") && e.contains("slave of bond"),
            "{e}"
        );
        assert!(
            serde_json::from_value::<SetupNetworks>(serde_json::json!({"networks": {"n": {"vlna": 3}}}))
                .is_err()
        );
    }

    #[test]
    fn netmasks_and_cidrs() {
        assert_eq!(netmask_prefix("255.255.255.0".parse().unwrap()), Some(24));
        assert_eq!(netmask_prefix("0.0.0.0".parse().unwrap()), Some(0));
        assert_eq!(netmask_prefix("255.255.255.255".parse().unwrap()), Some(32));
        assert_eq!(netmask_prefix("255.0.255.0".parse().unwrap()), None);
        assert!("10.0.0.1/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.1".parse::<Ipv4Cidr>().is_err());
        let c: Ipv4Cidr = "10.1.2.3/16".parse().unwrap();
        assert!(c.contains("10.1.200.1".parse().unwrap()) && !c.contains("10.2.0.1".parse().unwrap()));
    }

    #[test]
    fn changing_a_vlan_id_recreates_the_device_and_an_mtu_change_is_in_place() {
        let h = host(vec![nic("eth1", 2)]);
        let a = RunningConfig::default()
            .with_changes(&req(
                serde_json::json!({"networks": {"n": {"nic": "eth1", "vlan": 10}}}),
            ))
            .unwrap();
        let after_a = simulate(&h, &plan(&h, &Desired::default(), &a.desired()));
        let b = a
            .with_changes(&req(
                serde_json::json!({"networks": {"n": {"nic": "eth1", "vlan": 11, "mtu": 1400}}}),
            ))
            .unwrap();
        let ops = plan(&after_a, &a.desired(), &b.desired());
        assert!(
            ops.contains(&Op::DeleteLink {
                name: "eth1.10".into()
            }),
            "{ops:?}"
        );
        assert!(ops.contains(&Op::CreateVlan {
            name: "eth1.11".into(),
            base: "eth1".into(),
            id: 11
        }));
        assert!(
            !ops.contains(&Op::CreateBridge { name: "n".into() }),
            "the bridge stays: {ops:?}"
        );
        assert!(ops.contains(&Op::SetMtu {
            name: "n".into(),
            mtu: 1400
        }));
        let after_b = simulate(&after_a, &ops);
        assert_eq!(after_b.links["eth1.11"].master.as_deref(), Some("n"));
        assert_eq!(plan(&after_b, &b.desired(), &b.desired()), vec![]);
    }
}
