//! vCPU hot plug and unplug (VDSM's `VM.setNumberOfCpus`).
//!
//! A VM starts with `cpus` vCPUs out of `max_cpus` possible (QEMU's `-smp cpus,maxcpus`). One
//! added while it runs is a QEMU device, `cpu-hot-<n>`, in the first free slot
//! `query-hotpluggable-cpus` lists, and is recorded so that a restarted node reports it and a
//! migration destination adds the same device on its command line. Only hot plugged vCPUs go
//! again, newest first; the guest must release each (ACPI eject: Linux takes the CPU offline
//! itself), which QEMU confirms with `DEVICE_DELETED`.
//!
//! QEMU 7.2 under TCG aborts ("corrupted double-linked list") when a vCPU is plugged after one
//! was unplugged, whatever the slot or id: under TCG a VM that lost a vCPU takes no new one
//! until it restarts (`cpus_unplugged` in the record), and the admin is told so.
//!
//! QEMU is the truth about what is plugged: the record is rebuilt from its slots before each
//! change, so a node that died between a change and the record's write converges at the next.

use std::time::Duration;

use oxvirt_qemu::qmp::{self, HotpluggableCpu};
use oxvirt_qemu::CpuDevice;
use oxvirt_types::VmId;
use serde::{Deserialize, Serialize};

use super::{Op, VmCreate, VmError, VmInfo, VmManager};

/// Device ids of hot plugged vCPUs start with this.
pub const CPU_DEVICE_PREFIX: &str = "cpu-hot-";
/// How long a guest gets to release a vCPU.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);

/// A VM's vCPUs as `VM.getInfo` reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusInfo {
    /// Started with (`-smp cpus`).
    pub boot: u16,
    /// At most (`-smp maxcpus`).
    pub max: u16,
    /// Hot plugged since.
    pub devices: Vec<CpuDevice>,
}

impl CpusInfo {
    pub fn of(c: &VmCreate) -> CpusInfo {
        CpusInfo {
            boot: c.cpus,
            max: c.max_cpus.unwrap_or(c.cpus),
            devices: c.cpu_devices.clone(),
        }
    }

    /// The vCPUs the VM has.
    pub fn count(&self) -> usize {
        usize::from(self.boot) + self.devices.len()
    }
}

/// The hot plugged vCPUs among QEMU's slots, oldest first (by the number in their id).
fn plugged(slots: &[HotpluggableCpu]) -> Vec<CpuDevice> {
    let mut out: Vec<(u32, CpuDevice)> = slots
        .iter()
        .filter_map(|s| {
            let id = s.qom_path.as_deref()?.strip_prefix("/machine/peripheral/")?;
            let n = id.strip_prefix(CPU_DEVICE_PREFIX)?.parse::<u32>().ok()?;
            Some((
                n,
                CpuDevice {
                    id: id.to_string(),
                    driver: s.driver.clone(),
                    props: s.props.clone(),
                },
            ))
        })
        .collect();
    out.sort_by_key(|(n, _)| *n);
    out.into_iter().map(|(_, d)| d).collect()
}

/// Asks the guest to release vCPU device `device` and waits until QEMU's slot is free. QEMU
/// announces a vCPU's removal only for its parts (`DEVICE_DELETED` of `…/lapic`), so the
/// slots are what is watched.
async fn unplug_cpu(q: &qmp::Qmp, vm: VmId, device: &str) -> Result<(), VmError> {
    let qe = |source| VmError::Qmp { vm, source };
    match q
        .execute_raw("device_del", serde_json::json!({ "id": device }))
        .await
    {
        Ok(_) => {}
        // Gone already: an earlier unplug timed out and the guest let it go later.
        Err(qmp::QmpError::Command { class, .. }) if class == "DeviceNotFound" => return Ok(()),
        Err(e) => return Err(qe(e)),
    }
    let path = format!("/machine/peripheral/{device}");
    let deadline = tokio::time::Instant::now() + UNPLUG_TIMEOUT;
    loop {
        let slots = q.execute(&qmp::QueryHotpluggableCpus {}).await.map_err(qe)?;
        if !slots.iter().any(|s| s.qom_path.as_deref() == Some(path.as_str())) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(VmError::Timeout {
                vm,
                what: "the guest to release a vCPU",
                timeout: UNPLUG_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A slot's place in the topology: socket, die, core, thread.
fn topology_key(s: &HotpluggableCpu) -> [i64; 4] {
    ["socket-id", "die-id", "core-id", "thread-id"].map(|k| s.props.get(k).copied().unwrap_or(0))
}

impl VmManager {
    /// Gives the running VM `n` vCPUs, hot plugging or unplugging the difference; returns the
    /// VM.
    pub async fn set_cpus(&self, id: VmId, n: u16) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Devices)?;
        let _devices = vm.devices.lock().await;
        let invalid = |reason: String| VmError::Invalid { vm: id, reason };
        let q = vm.qmp()?;
        let qe = |source| VmError::Qmp { vm: id, source };
        let slots = q.execute(&qmp::QueryHotpluggableCpus {}).await.map_err(qe)?;
        let mut devices = plugged(&slots);
        let (boot, max, no_replug) = {
            let mut rec = vm.record.lock().unwrap();
            if rec.create.cpu_devices != devices {
                tracing::info!(vm_id = %id, "vCPU record follows QEMU's slots");
                rec.create.cpu_devices = devices.clone();
            }
            let tcg = rec.create.accel.resolve(&self.accel_probe) == oxvirt_qemu::Accel::Tcg;
            (
                rec.create.cpus,
                rec.create.max_cpus.unwrap_or(rec.create.cpus),
                tcg && rec.create.cpus_unplugged,
            )
        };
        vm.persist()?;
        if n > max {
            return Err(invalid(format!(
                "{n} vCPUs is more than the {max} the VM was started to allow"
            )));
        }
        if n < boot {
            return Err(invalid(format!(
                "the VM started with {boot} vCPUs, which stay: only hot plugged ones can go"
            )));
        }
        let want = usize::from(n - boot);
        if want > devices.len() && no_replug {
            return Err(invalid(
                "a vCPU was unplugged from this VM, and QEMU 7.2 under TCG aborts when one is \
                 plugged after that: the VM takes more vCPUs after it restarts"
                    .into(),
            ));
        }
        if want > devices.len() {
            // Free slots in topology order, so vCPUs fill sockets and cores as at boot.
            let mut free: Vec<&HotpluggableCpu> = slots.iter().filter(|s| s.qom_path.is_none()).collect();
            free.sort_by_key(|s| topology_key(s));
            let first = devices
                .iter()
                .filter_map(|d| d.id.strip_prefix(CPU_DEVICE_PREFIX)?.parse::<u32>().ok())
                .max()
                .map_or(1, |m| m + 1);
            let todo = want - devices.len();
            for (next, slot) in (first..).zip(free.into_iter().take(todo)) {
                let dev = CpuDevice {
                    id: format!("{CPU_DEVICE_PREFIX}{next}"),
                    driver: slot.driver.clone(),
                    props: slot.props.clone(),
                };
                q.execute_raw("device_add", dev.device_json()).await.map_err(qe)?;
                tracing::info!(vm_id = %id, device = %dev.id, "vCPU hot plugged");
                devices.push(dev);
                vm.record.lock().unwrap().create.cpu_devices = devices.clone();
                vm.persist()?;
            }
            if devices.len() < want {
                return Err(invalid(format!(
                    "QEMU has no free vCPU slot left for {n} vCPUs (it has {})",
                    usize::from(boot) + devices.len()
                )));
            }
        }
        while devices.len() > want {
            let dev = devices.last().expect("more than wanted").clone();
            vm.record.lock().unwrap().create.cpus_unplugged = true;
            vm.persist()?;
            unplug_cpu(&q, id, &dev.id).await?;
            tracing::info!(vm_id = %id, device = %dev.id, "vCPU unplugged");
            devices.pop();
            vm.record.lock().unwrap().create.cpu_devices = devices.clone();
            vm.persist()?;
        }
        Ok(vm.info())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(socket: i64, qom: Option<&str>) -> HotpluggableCpu {
        HotpluggableCpu {
            driver: "qemu64-x86_64-cpu".into(),
            vcpus_count: 1,
            props: [("socket-id".to_string(), socket)].into(),
            qom_path: qom.map(str::to_string),
        }
    }

    #[test]
    fn only_our_hot_plugged_devices_count_and_in_the_order_they_came() {
        let slots = [
            slot(3, Some("/machine/peripheral/cpu-hot-10")),
            slot(2, Some("/machine/peripheral/cpu-hot-2")),
            slot(1, None),
            slot(0, Some("/machine/unattached/device[0]")),
            slot(4, Some("/machine/peripheral/nic0")),
        ];
        let ids: Vec<String> = plugged(&slots).into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["cpu-hot-2", "cpu-hot-10"]);
    }
}
