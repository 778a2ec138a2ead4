//! Statistics of hosts and VMs, named and typed as oVirt's `/statistics` sub-collections
//! (`memory.installed`, `cpu.current.total`, …), which monitoring tools read.
//!
//! Figures come from where they are current: a running VM's memory from its node
//! (`VM.getStats`, one call bounded by the poll timeout), an up host's from the monitor's last
//! `Host.getStats` (kept in [`crate::app::HostRuntime::stats`]), CPU shares of VMs from the
//! monitor's samples ([`crate::app::App::vm_cpu`], the use between its last two polls),
//! migration progress from the source's events. A VM that is down, or whose node does not
//! answer, reports its configured memory and zeros, as oVirt does for a VM that is down; a host
//! that is not up reports what monitoring last learnt of its memory.
//!
//! Invariant: a statistic's id is derived from its name alone, so it is the same for every
//! object and across engine restarts.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::model::{HostStatus, HostUuid, VmId};

use super::{CommandError, Commands};

/// oVirt's `StatisticKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    Gauge,
    Counter,
}

/// oVirt's `StatisticUnit` (the ones used here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatUnit {
    Bytes,
    Percent,
    Seconds,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StatValue {
    Integer(u64),
    Decimal(f64),
}

/// One statistic of a host or VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Statistic {
    pub name: &'static str,
    pub description: &'static str,
    pub kind: StatKind,
    pub unit: StatUnit,
    pub value: StatValue,
}

impl StatKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StatKind::Gauge => "gauge",
            StatKind::Counter => "counter",
        }
    }
}

impl StatUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            StatUnit::Bytes => "bytes",
            StatUnit::Percent => "percent",
            StatUnit::Seconds => "seconds",
            StatUnit::None => "none",
        }
    }
}

impl StatValue {
    /// oVirt's `ValueType`.
    pub fn type_name(self) -> &'static str {
        match self {
            StatValue::Integer(_) => "integer",
            StatValue::Decimal(_) => "decimal",
        }
    }
}

impl std::fmt::Display for StatValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatValue::Integer(n) => write!(f, "{n}"),
            // Two decimals, trailing zeros dropped: "12.5", "0".
            StatValue::Decimal(x) => {
                let s = format!("{x:.2}");
                let s = s.trim_end_matches('0').trim_end_matches('.');
                f.write_str(if s.is_empty() || s == "-0" { "0" } else { s })
            }
        }
    }
}

impl Statistic {
    fn new(name: &'static str, description: &'static str, unit: StatUnit, value: StatValue) -> Self {
        Statistic {
            name,
            description,
            kind: StatKind::Gauge,
            unit,
            value,
        }
    }

    /// The statistic's id: a name-based (version 5 layout) UUID of its name.
    pub fn id(&self) -> uuid::Uuid {
        let d = Sha256::digest(format!("oxvirt statistic {}", self.name).as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        b[6] = (b[6] & 0x0f) | 0x50;
        b[8] = (b[8] & 0x3f) | 0x80;
        uuid::Uuid::from_bytes(b)
    }
}

const MIB: u64 = 1 << 20;

fn bytes(name: &'static str, description: &'static str, n: u64) -> Statistic {
    Statistic::new(name, description, StatUnit::Bytes, StatValue::Integer(n))
}

fn percent(name: &'static str, description: &'static str, x: f64) -> Statistic {
    Statistic::new(
        name,
        description,
        StatUnit::Percent,
        StatValue::Decimal(x.clamp(0.0, 100.0)),
    )
}

/// A VM's statistics from its configured memory and, when it runs, its node's `VM.getStats`
/// (`None`: down, or no answer) and the monitor's CPU shares.
pub fn vm_statistics(
    memory_bytes: u64,
    node: Option<&Value>,
    cpu: Option<crate::balance::VmCpuUsage>,
    migration: Option<u8>,
) -> Vec<Statistic> {
    let used = node
        .and_then(|s| s["rss_bytes"].as_u64())
        .unwrap_or(0)
        .min(memory_bytes);
    let total = cpu.map_or(0.0, |c| c.total);
    let guest = cpu.and_then(|c| c.guest).unwrap_or(0.0).min(total);
    vec![
        bytes("memory.installed", "Total memory configured", memory_bytes),
        bytes(
            "memory.used",
            "Memory used (the resident memory of the VM's QEMU process)",
            used,
        ),
        bytes("memory.free", "Memory not used", memory_bytes - used),
        percent("cpu.current.guest", "CPU used by guest", guest),
        percent("cpu.current.hypervisor", "CPU overhead", total - guest),
        percent("cpu.current.total", "Total CPU used", total),
        percent(
            "migration.progress",
            "Migration progress",
            f64::from(migration.unwrap_or(0)),
        ),
    ]
}

/// A host's statistics from its node's `Host.getStats` (`None`: what monitoring last learnt,
/// `total` and `free` bytes of memory).
pub fn host_statistics(node: Option<&Value>, total: u64, free: u64) -> Vec<Statistic> {
    let n = |k: &str| node.and_then(|s| s[k].as_u64());
    let f = |k: &str| node.and_then(|s| s[k].as_f64()).unwrap_or(0.0);
    let total = n("memTotalMib").map_or(total, |m| m * MIB);
    let free = n("memAvailableMib").map_or(free, |m| m * MIB).min(total);
    let swap_total = n("swapTotalMib").unwrap_or(0) * MIB;
    let swap_free = (n("swapFreeMib").unwrap_or(0) * MIB).min(swap_total);
    let (user, system) = (f("cpuUserPct"), f("cpuSysPct"));
    let boot = node
        .map(|s| (f("sampledAt") - s["uptimeSecs"].as_f64().unwrap_or(0.0)).max(0.0) as u64)
        .unwrap_or(0);
    vec![
        bytes("memory.total", "Total memory", total),
        bytes("memory.used", "Used memory", total - free),
        bytes("memory.free", "Free memory", free),
        bytes("swap.total", "Total swap", swap_total),
        bytes("swap.free", "Free swap", swap_free),
        bytes("swap.used", "Used swap", swap_total - swap_free),
        percent("cpu.current.user", "User CPU usage", user),
        percent("cpu.current.system", "System CPU usage", system),
        percent(
            "cpu.current.idle",
            "Idle CPU usage",
            100.0 - (user + system).min(100.0),
        ),
        Statistic::new(
            "cpu.load.avg.5m",
            "CPU 5 minute load average",
            StatUnit::None,
            StatValue::Decimal(f("loadAvg5")),
        ),
        Statistic::new(
            "boot.time",
            "Boot time of the machine",
            StatUnit::Seconds,
            StatValue::Integer(boot),
        ),
    ]
}

impl Commands {
    /// `vm`'s statistics (see the module docs for where each comes from).
    pub async fn vm_statistics(&self, vm: VmId) -> Result<Vec<Statistic>, CommandError> {
        let v = self.vm(vm).await?;
        let mut node = None;
        if let (true, Some(h)) = (v.runtime.status.is_running(), v.runtime.run_on_host) {
            match self.app.host(h).await.and_then(|h| self.app.client(&h)) {
                Ok(c) => match c
                    .within(self.app.settings.poll_timeout())
                    .call("VM.getStats", json!({ "vmID": vm }))
                    .await
                {
                    Ok(s) => node = Some(s),
                    Err(e) => tracing::warn!(vm = %v.name, error = %e, "no statistics from the VM's host"),
                },
                Err(e) => tracing::warn!(vm = %v.name, error = %e, "no statistics from the VM's host"),
            }
        }
        let cpu = if v.runtime.status.is_running() {
            self.app.vm_cpu.lock().expect("vm cpu").usage_split(vm)
        } else {
            None
        };
        Ok(vm_statistics(
            v.memory_bytes,
            node.as_ref(),
            cpu,
            self.app.migration_progress(vm),
        ))
    }

    /// `host`'s statistics (see the module docs).
    pub async fn host_statistics(&self, host: HostUuid) -> Result<Vec<Statistic>, CommandError> {
        let h = self.app.host(host).await?;
        let node = match h.status {
            HostStatus::Up => self.app.host_rt(host).stats,
            _ => None,
        };
        Ok(host_statistics(
            node.as_ref(),
            h.memory_bytes.unwrap_or(0),
            h.free_memory_bytes.unwrap_or(0),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(s: &'a [Statistic], name: &str) -> &'a Statistic {
        s.iter()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn a_down_vm_has_its_memory_and_zeros_and_ids_follow_names() {
        let s = vm_statistics(512 * MIB, None, None, None);
        assert_eq!(get(&s, "memory.installed").value, StatValue::Integer(512 * MIB));
        assert_eq!(get(&s, "memory.used").value, StatValue::Integer(0));
        assert_eq!(get(&s, "cpu.current.total").value.to_string(), "0");
        let again = vm_statistics(1, None, None, None);
        assert_eq!(get(&s, "memory.used").id(), get(&again, "memory.used").id());
        assert_ne!(get(&s, "memory.used").id(), get(&s, "memory.free").id());
        assert_eq!(get(&s, "memory.used").id().get_version_num(), 5);
    }

    #[test]
    fn a_running_vm_splits_its_cpu_and_caps_memory() {
        let node = json!({ "rss_bytes": 600 * MIB });
        let cpu = crate::balance::VmCpuUsage {
            total: 37.5,
            guest: Some(30.0),
        };
        let s = vm_statistics(512 * MIB, Some(&node), Some(cpu), Some(40));
        assert_eq!(
            get(&s, "memory.used").value,
            StatValue::Integer(512 * MIB),
            "capped"
        );
        assert_eq!(get(&s, "memory.free").value, StatValue::Integer(0));
        assert_eq!(get(&s, "cpu.current.guest").value.to_string(), "30");
        assert_eq!(get(&s, "cpu.current.hypervisor").value.to_string(), "7.5");
        assert_eq!(get(&s, "cpu.current.total").value.to_string(), "37.5");
        assert_eq!(get(&s, "migration.progress").value.to_string(), "40");
    }

    #[test]
    fn host_figures_come_from_the_node_or_monitoring() {
        let node = json!({
            "memTotalMib": 4096, "memAvailableMib": 1024, "swapTotalMib": 100, "swapFreeMib": 40,
            "cpuUserPct": 20.25, "cpuSysPct": 5.0, "loadAvg5": 0.42,
            "sampledAt": 1_700_000_100.5, "uptimeSecs": 100,
        });
        let s = host_statistics(Some(&node), 0, 0);
        assert_eq!(get(&s, "memory.used").value, StatValue::Integer(3072 * MIB));
        assert_eq!(get(&s, "swap.used").value, StatValue::Integer(60 * MIB));
        assert_eq!(get(&s, "cpu.current.idle").value.to_string(), "74.75");
        assert_eq!(get(&s, "cpu.load.avg.5m").value.to_string(), "0.42");
        assert_eq!(get(&s, "boot.time").value, StatValue::Integer(1_700_000_000));
        let s = host_statistics(None, 8 * MIB, 2 * MIB);
        assert_eq!(get(&s, "memory.used").value, StatValue::Integer(6 * MIB));
        assert_eq!(get(&s, "cpu.current.idle").value.to_string(), "100");
    }
}
