//! Host capabilities and statistics, read from procfs and sysfs.
//!
//! Sampling is cheap by design: a handful of small procfs reads, no processes spawned. Rates
//! (CPU use, network throughput) are deltas against the previous sample, kept in
//! [`HostSampler`]; the first sample reports rates since boot.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use oxvirt_qemu::{probe_kvm, KvmProbe, QemuTool};
use oxvirt_types::api::{HostCapabilities, HostStats, NicStats, StorageConnectivity};

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Parses `/proc/cpuinfo`: model, flags, logical CPUs, sockets.
pub fn parse_cpuinfo(text: &str) -> (String, Vec<String>, u32, u32) {
    let mut model = String::new();
    let mut flags = Vec::new();
    let mut cpus = 0;
    let mut sockets = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "processor" => cpus += 1,
            "model name" if model.is_empty() => model = v.to_string(),
            "flags" if flags.is_empty() => flags = v.split_whitespace().map(String::from).collect(),
            "physical id" => {
                sockets.insert(v.to_string());
            }
            _ => {}
        }
    }
    (model, flags, cpus, sockets.len().max(1) as u32)
}

/// `/proc/meminfo` values in KiB by key.
pub fn parse_meminfo(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, rest) = l.split_once(':')?;
            let kib = rest.split_whitespace().next()?.parse().ok()?;
            Some((k.to_string(), kib))
        })
        .collect()
}

/// The aggregate `cpu` line of `/proc/stat`: (user+nice, system+irq+softirq, idle+iowait, total).
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64, u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 7 {
        return None;
    }
    let user = v[0] + v[1];
    let sys = v[2] + v[5] + v[6];
    let idle = v[3] + v[4];
    let total: u64 = v.iter().take(8).sum();
    Some((user, sys, idle, total))
}

/// `/proc/net/dev`: per interface (rx bytes, rx errors, tx bytes, tx errors).
pub fn parse_net_dev(text: &str) -> Vec<(String, u64, u64, u64, u64)> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            (v.len() >= 16).then(|| (name.trim().to_string(), v[0], v[2], v[8], v[10]))
        })
        .collect()
}

struct Prev {
    at: Instant,
    cpu: (u64, u64, u64, u64),
    net: HashMap<String, (u64, u64)>,
}

/// Keeps the previous sample so that rates are deltas.
pub struct HostSampler {
    prev: Mutex<Option<Prev>>,
}

impl Default for HostSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl HostSampler {
    pub fn new() -> Self {
        Self {
            prev: Mutex::new(None),
        }
    }

    pub fn capabilities(&self, storage: Vec<StorageConnectivity>) -> HostCapabilities {
        let (cpu_model, cpu_flags, cpu_cores, cpu_sockets) = parse_cpuinfo(&read("/proc/cpuinfo"));
        let mem = parse_meminfo(&read("/proc/meminfo"));
        let kvm = probe_kvm();
        HostCapabilities {
            hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
            kernel_release: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu_model,
            cpu_flags,
            cpu_cores,
            cpu_sockets,
            mem_total_mib: mem.get("MemTotal").copied().unwrap_or(0) / 1024,
            kvm_enabled: kvm.usable(),
            kvm_reason: match kvm {
                KvmProbe::Usable { .. } => None,
                KvmProbe::Unusable { reason } => Some(reason),
            },
            qemu_version: QemuTool::SystemX86_64.version().ok().map(|v| v.to_string()),
            qemu_img_version: QemuTool::Img.version().ok().map(|v| v.to_string()),
            oxvirt_version: env!("CARGO_PKG_VERSION").to_string(),
            storage,
        }
    }

    pub fn stats(&self, vm_count: u32) -> HostStats {
        let now = Instant::now();
        let mem = parse_meminfo(&read("/proc/meminfo"));
        let cpu = parse_proc_stat(&read("/proc/stat")).unwrap_or_default();
        let net = parse_net_dev(&read("/proc/net/dev"));
        let mut prev = self.prev.lock().expect("sampler lock");
        let (p_cpu, p_net, secs) = match prev.as_ref() {
            Some(p) => (
                p.cpu,
                Some(&p.net),
                now.duration_since(p.at).as_secs_f64().max(1e-3),
            ),
            None => ((0, 0, 0, 0), None, uptime_secs().max(1.0)),
        };
        let dt = cpu.3.saturating_sub(p_cpu.3).max(1) as f64;
        let pct = |a: u64, b: u64| 100.0 * a.saturating_sub(b) as f64 / dt;
        let (user, sys) = (pct(cpu.0, p_cpu.0), pct(cpu.1, p_cpu.1));
        let network = net
            .iter()
            .map(|(name, rx, rxe, tx, txe)| {
                let (prx, ptx) = p_net.and_then(|m| m.get(name)).copied().unwrap_or((0, 0));
                NicStats {
                    name: name.clone(),
                    rx_bytes: *rx,
                    tx_bytes: *tx,
                    rx_bytes_per_sec: rx.saturating_sub(prx) as f64 / secs,
                    tx_bytes_per_sec: tx.saturating_sub(ptx) as f64 / secs,
                    rx_errors: *rxe,
                    tx_errors: *txe,
                }
            })
            .collect();
        *prev = Some(Prev {
            at: now,
            cpu,
            net: net
                .iter()
                .map(|(n, rx, _, tx, _)| (n.clone(), (*rx, *tx)))
                .collect(),
        });
        let total = mem.get("MemTotal").copied().unwrap_or(0);
        let avail = mem.get("MemAvailable").copied().unwrap_or(0);
        let loadavg = read("/proc/loadavg");
        let load_avg = |i: usize| {
            loadavg
                .split_whitespace()
                .nth(i)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0)
        };
        HostStats {
            cpu_used_pct: (user + sys).min(100.0),
            cpu_user_pct: user,
            cpu_sys_pct: sys,
            load_avg_1: load_avg(0),
            load_avg_5: load_avg(1),
            mem_total_mib: total / 1024,
            mem_available_mib: avail / 1024,
            mem_used_pct: if total == 0 {
                0.0
            } else {
                100.0 * (total - avail.min(total)) as f64 / total as f64
            },
            swap_total_mib: mem.get("SwapTotal").copied().unwrap_or(0) / 1024,
            swap_free_mib: mem.get("SwapFree").copied().unwrap_or(0) / 1024,
            ksm_running: read("/sys/kernel/mm/ksm/run").trim() == "1",
            uptime_secs: uptime_secs() as u64,
            vm_count,
            network,
            sampled_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }
    }
}

fn uptime_secs() -> f64 {
    read("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

/// Whether a storage path answers a metadata read (used for connectivity in capabilities).
pub fn path_reachable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_procfs_samples() {
        let cpuinfo = "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu vmx sse\nphysical id\t: 0\n\n\
                       processor\t: 1\nmodel name\t: Test CPU\nflags\t\t: fpu vmx sse\nphysical id\t: 0\n";
        let (model, flags, cpus, sockets) = parse_cpuinfo(cpuinfo);
        assert_eq!((model.as_str(), cpus, sockets), ("Test CPU", 2, 1));
        assert!(flags.contains(&"vmx".to_string()));
        let mem = parse_meminfo("MemTotal:       24000000 kB\nMemAvailable:   12000000 kB\n");
        assert_eq!(mem["MemTotal"], 24_000_000);
        assert_eq!(
            parse_proc_stat("cpu  10 2 30 400 5 6 7 0 0 0\ncpu0 1 1 1 1 1 1 1\n"),
            Some((12, 43, 405, 460))
        );
        let net = "Inter-|   Receive\n face |bytes packets\n  lo: 100 1 2 0 0 0 0 0 200 2 3 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(net), vec![("lo".to_string(), 100, 2, 200, 3)]);
    }

    #[test]
    fn live_samples_are_sane() {
        let s = HostSampler::new();
        let caps = s.capabilities(vec![]);
        assert!(caps.cpu_cores >= 1 && caps.mem_total_mib > 0);
        assert!(
            caps.qemu_version.is_some(),
            "qemu-system-x86_64 is installed on test machines"
        );
        let _ = s.stats(0);
        let st = s.stats(3);
        assert!((0.0..=100.0).contains(&st.cpu_used_pct), "{}", st.cpu_used_pct);
        assert!(st.mem_available_mib <= st.mem_total_mib);
        assert_eq!(st.vm_count, 3);
        assert!(st.network.iter().any(|n| n.name == "lo"));
    }
}
