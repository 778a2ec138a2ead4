//! Memory hot plug (VDSM's `VM.hotplugMemory`).
//!
//! A VM starts with room to grow (`-m size,slots,maxmem`); hot plugged memory is a DIMM: RAM
//! backend `mem-dimm-<n>` and `pc-dimm` device `dimm-<n>`, recorded so that a restarted node
//! reports it and a migration destination adds the same on its command line. The guest takes
//! the new memory online (Linux: udev, or `memhp_default_state=online`). Sizes are whole
//! 128 MiB blocks, the unit Linux onlines on x86. Memory is never unplugged here: a smaller
//! size applies at the VM's next start (oVirt unplugs only DIMMs it plugged, and only when
//! the guest lets them go; the engine does not ask for that).
//!
//! QEMU is the truth about which DIMMs exist: the record is rebuilt from
//! `query-memory-devices` before each change, so a node that died between a plug and the
//! record's write converges at the next.

use oxvirt_qemu::cmdline::MEMORY_SLOTS;
use oxvirt_qemu::qmp;
use oxvirt_qemu::Dimm;
use oxvirt_types::VmId;
use serde::{Deserialize, Serialize};

use super::{Op, VmCreate, VmError, VmInfo, VmManager};

/// Device ids of hot plugged DIMMs start with this.
pub const DIMM_PREFIX: &str = "dimm-";
/// The block Linux onlines memory in on x86, and so the unit of a hot plug.
pub const BLOCK_MIB: u64 = 128;

/// A VM's memory as `VM.getInfo` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Started with (`-m size`).
    pub boot_mib: u64,
    /// At most (`-m maxmem`).
    pub max_mib: u64,
    /// Hot plugged since.
    pub dimms: Vec<Dimm>,
}

impl MemoryInfo {
    pub fn of(c: &VmCreate) -> MemoryInfo {
        MemoryInfo {
            boot_mib: c.memory_mib,
            max_mib: c.max_memory_mib.unwrap_or(c.memory_mib),
            dimms: c.dimms.clone(),
        }
    }

    /// The memory the VM has.
    pub fn total_mib(&self) -> u64 {
        self.boot_mib + self.dimms.iter().map(|d| d.size_mib).sum::<u64>()
    }
}

/// Our DIMMs among QEMU's memory devices, oldest first (by the number in their id).
fn dimms(devices: &[qmp::MemoryDevice]) -> Vec<Dimm> {
    let mut out: Vec<(u32, Dimm)> = devices
        .iter()
        .filter(|d| d.kind == "dimm")
        .filter_map(|d| {
            let id = d.data.id.as_deref()?;
            let n = id.strip_prefix(DIMM_PREFIX)?.parse::<u32>().ok()?;
            Some((
                n,
                Dimm {
                    id: id.to_string(),
                    size_mib: d.data.size >> 20,
                },
            ))
        })
        .collect();
    out.sort_by_key(|(n, _)| *n);
    out.into_iter().map(|(_, d)| d).collect()
}

impl VmManager {
    /// Adds `size_mib` of memory to the running VM as one DIMM; returns the VM.
    pub async fn hotplug_memory(&self, id: VmId, size_mib: u64) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Devices)?;
        let _devices = vm.devices.lock().await;
        let invalid = |reason: String| VmError::Invalid { vm: id, reason };
        if size_mib == 0 || !size_mib.is_multiple_of(BLOCK_MIB) {
            return Err(invalid(format!(
                "{size_mib} MiB is not a whole number of {BLOCK_MIB} MiB memory blocks"
            )));
        }
        let q = vm.qmp()?;
        let qe = |source| VmError::Qmp { vm: id, source };
        let mut have = dimms(&q.execute(&qmp::QueryMemoryDevices {}).await.map_err(qe)?);
        let info = {
            let mut rec = vm.record.lock().unwrap();
            if rec.create.dimms != have {
                tracing::info!(vm_id = %id, "DIMM record follows QEMU's memory devices");
                rec.create.dimms = have.clone();
            }
            MemoryInfo::of(&rec.create)
        };
        vm.persist()?;
        if info.max_mib <= info.boot_mib {
            return Err(invalid(
                "the VM was started without room for more memory (no maxmem)".into(),
            ));
        }
        if info.total_mib() + size_mib > info.max_mib {
            return Err(invalid(format!(
                "{} MiB more would make {} MiB, past the {} MiB the VM was started to allow",
                size_mib,
                info.total_mib() + size_mib,
                info.max_mib
            )));
        }
        if have.len() >= MEMORY_SLOTS {
            return Err(invalid(format!("all {MEMORY_SLOTS} DIMM slots are taken")));
        }
        let n = have
            .iter()
            .filter_map(|d| d.id.strip_prefix(DIMM_PREFIX)?.parse::<u32>().ok())
            .max()
            .map_or(1, |m| m + 1);
        let dimm = Dimm {
            id: format!("{DIMM_PREFIX}{n}"),
            size_mib,
        };
        q.execute_raw("object-add", dimm.backend_json())
            .await
            .map_err(qe)?;
        if let Err(e) = q.execute_raw("device_add", dimm.device_json()).await {
            let backend = format!("mem-{}", dimm.id);
            if let Err(d) = q
                .execute_raw("object-del", serde_json::json!({ "id": backend }))
                .await
            {
                tracing::warn!(vm_id = %id, backend, error = %d, "a memory backend stays");
            }
            return Err(qe(e));
        }
        tracing::info!(vm_id = %id, device = %dimm.id, size_mib, "memory hot plugged");
        have.push(dimm);
        vm.record.lock().unwrap().create.dimms = have;
        vm.persist()?;
        Ok(vm.info())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(kind: &str, id: Option<&str>, mib: u64) -> qmp::MemoryDevice {
        qmp::MemoryDevice {
            kind: kind.into(),
            data: qmp::MemoryDeviceData {
                id: id.map(str::to_string),
                size: mib << 20,
            },
        }
    }

    #[test]
    fn only_our_dimms_count_and_in_the_order_they_came() {
        let found = dimms(&[
            dev("dimm", Some("dimm-10"), 256),
            dev("dimm", Some("dimm-2"), 128),
            dev("virtio-mem", Some("dimm-3"), 128),
            dev("dimm", None, 128),
            dev("dimm", Some("other"), 128),
        ]);
        assert_eq!(
            found,
            [
                Dimm {
                    id: "dimm-2".into(),
                    size_mib: 128
                },
                Dimm {
                    id: "dimm-10".into(),
                    size_mib: 256
                },
            ]
        );
    }
}
