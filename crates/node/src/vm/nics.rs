//! VM NICs: taps on logical networks, slots, link state, hot plug and unplug.
//!
//! A NIC on a logical network ([`NicBackend::Network`]) gets a tap that the node creates on the
//! network's bridge before QEMU starts — also on a migration destination, which therefore
//! refuses a VM whose network it lacks — and deletes after QEMU ends. Every VM has
//! [`NIC_PORTS`] PCIe root ports; a NIC keeps its slot (root port, device and netdev ids) for
//! life, so unplugging one NIC does not move the others and a destination built from the
//! source's NIC list (with slots, from `VM.getInfo`) has the same PCI layout.
//!
//! Hot plug is `netdev_add` + `device_add` on the NIC's root port; hot unplug is `device_del`,
//! then — once the guest has released the device (`DEVICE_DELETED`) — `netdev_del` and the
//! tap's removal. Link state is QMP `set_link`, re-applied after a start.

use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use oxvirt_qemu::cmdline::{
    nic_device_id_of_slot, nic_device_json, nic_netdev_id, nic_netdev_json, nic_slot,
};
use oxvirt_qemu::{NicBackend, NicSpec};
use oxvirt_types::VmId;

use super::{Op, Vm, VmError, VmInfo, VmManager};

/// PCIe root ports every VM gets for NICs: the most NICs a VM can have.
pub const NIC_PORTS: u8 = 8;

/// How long a guest may take to release an unplugged NIC.
pub const UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The host network as the VM manager needs it.
pub trait NicNetworks: Send + Sync {
    /// Creates tap `tap` on logical network `network`'s bridge.
    fn plug<'a>(&'a self, tap: &'a str, network: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Deletes tap `tap` (absent is fine).
    fn unplug<'a>(&'a self, tap: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// The namespace QEMU runs in (where the taps are), if not the node's own.
    fn netns_fd(&self) -> Option<RawFd>;
}

/// A manager without host networking: NICs on logical networks are refused.
pub struct NoNetworks;

impl NicNetworks for NoNetworks {
    fn plug<'a>(&'a self, _tap: &'a str, network: &'a str) -> BoxFuture<'a, Result<(), String>> {
        let msg = format!("network {network:?}: this node manages no networks");
        Box::pin(async move { Err(msg) })
    }
    fn unplug<'a>(&'a self, _tap: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn netns_fd(&self) -> Option<RawFd> {
        None
    }
}

impl NicNetworks for crate::net::NetworkService {
    fn plug<'a>(&'a self, tap: &'a str, network: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.plug_tap(tap, network).await.map_err(|e| error_chain(&e)) })
    }
    fn unplug<'a>(&'a self, tap: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.unplug_tap(tap).await.map_err(|e| error_chain(&e)) })
    }
    fn netns_fd(&self) -> Option<RawFd> {
        self.netns().fd()
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Gives every NIC without a slot the lowest free one; refuses duplicates and overflow.
pub fn assign_slots(vm: VmId, nics: &mut [NicSpec]) -> Result<(), VmError> {
    let invalid = |reason: String| VmError::Invalid { vm, reason };
    if nics.len() > usize::from(NIC_PORTS) {
        return Err(invalid(format!(
            "{} NICs; a VM has at most {NIC_PORTS}",
            nics.len()
        )));
    }
    let mut used: Vec<u8> = nics.iter().filter_map(|n| n.slot).collect();
    for (i, n) in nics.iter().enumerate() {
        if nics[..i].iter().any(|o| o.mac.eq_ignore_ascii_case(&n.mac)) {
            return Err(invalid(format!("MAC {} is on two NICs", n.mac)));
        }
    }
    for n in nics.iter_mut().filter(|n| n.slot.is_none()) {
        let free = (0..NIC_PORTS)
            .find(|s| !used.contains(s))
            .ok_or_else(|| invalid("no free NIC slot".into()))?;
        n.slot = Some(free);
        used.push(free);
    }
    // Taps of network NICs are named after the VM and the slot unless the caller named them.
    for n in nics.iter_mut() {
        let slot = n.slot.expect("assigned above");
        if let NicBackend::Network { tap, .. } = &mut n.backend {
            if tap.is_empty() {
                *tap = crate::net::tap::tap_name(vm, slot);
            }
        }
    }
    Ok(())
}

/// Creates the taps of `nics`' network NICs; on failure, removes those it made.
pub async fn plug_all(net: &dyn NicNetworks, vm: VmId, nics: &[NicSpec]) -> Result<(), VmError> {
    let mut done: Vec<&str> = Vec::new();
    for n in nics {
        if let NicBackend::Network { network, tap } = &n.backend {
            if let Err(reason) = net.plug(tap, network).await {
                for t in done {
                    let _ = net.unplug(t).await;
                }
                return Err(VmError::Nic {
                    vm,
                    mac: n.mac.clone(),
                    reason,
                });
            }
            done.push(tap);
        }
    }
    Ok(())
}

/// Removes the taps of `nics`' network NICs (logging failures).
pub async fn unplug_all(net: &dyn NicNetworks, vm: VmId, nics: &[NicSpec]) {
    for n in nics {
        if let NicBackend::Network { tap, .. } = &n.backend {
            if let Err(e) = net.unplug(tap).await {
                tracing::warn!(vm_id = %vm, tap, error = %e, "cannot delete tap");
            }
        }
    }
}

/// Puts down the links of NICs created with their link down.
pub(super) async fn apply_link_states(vm: &Vm) {
    let down: Vec<(usize, NicSpec)> = {
        let r = vm.record.lock().unwrap();
        r.create
            .nics
            .iter()
            .cloned()
            .enumerate()
            .filter(|(_, n)| !n.link_up)
            .collect()
    };
    for (i, n) in down {
        if let Err(e) = set_link_qmp(vm, nic_slot(i, &n), false).await {
            tracing::error!(vm_id = %vm.id, mac = %n.mac, error = %e, "cannot put the NIC's link down");
        }
    }
}

async fn set_link_qmp(vm: &Vm, slot: u8, up: bool) -> Result<(), VmError> {
    vm.qmp()?
        .execute_raw(
            "set_link",
            serde_json::json!({ "name": nic_device_id_of_slot(slot), "up": up }),
        )
        .await
        .map(drop)
        .map_err(|source| VmError::Qmp { vm: vm.id, source })
}

impl VmManager {
    /// Hot plugs `nic` into a running VM; returns the VM with the NIC (and its slot).
    pub async fn hotplug_nic(&self, id: VmId, mut nic: NicSpec) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Devices)?;
        let mut nics = vm.record.lock().unwrap().create.nics.clone();
        nic.slot = None;
        nics.push(nic);
        assign_slots(id, &mut nics)?;
        let nic = nics.last().expect("pushed").clone();
        // The whole VM's spec validates the MAC, the tap name and the slot.
        {
            let mut rec = vm.record.lock().unwrap().clone();
            rec.create.nics = nics.clone();
            self.build_spec(&vm.dir, &rec, None)
                .to_args()
                .map_err(|source| VmError::Spec {
                    vm: id,
                    what: "invalid NIC",
                    source,
                })?;
        }
        let slot = nic.slot.expect("assigned");
        plug_all(self.cfg.networks.as_ref(), id, std::slice::from_ref(&nic)).await?;
        let q = vm.qmp()?;
        let qe = |source| VmError::Qmp { vm: id, source };
        let res = async {
            q.execute_raw("netdev_add", nic_netdev_json(slot, &nic))
                .await
                .map_err(qe)?;
            if let Err(e) = q.execute_raw("device_add", nic_device_json(slot, &nic)).await {
                let _ = q
                    .execute_raw("netdev_del", serde_json::json!({ "id": nic_netdev_id(slot) }))
                    .await;
                return Err(qe(e));
            }
            Ok(())
        }
        .await;
        if let Err(e) = res {
            unplug_all(self.cfg.networks.as_ref(), id, std::slice::from_ref(&nic)).await;
            return Err(e);
        }
        if !nic.link_up {
            set_link_qmp(&vm, slot, false).await?;
        }
        vm.record.lock().unwrap().create.nics = nics;
        vm.persist()?;
        tracing::info!(vm_id = %id, mac = %nic.mac, slot, "NIC hot plugged");
        Ok(vm.info())
    }

    /// Hot unplugs the NIC with MAC `mac`; returns once the guest released it and its tap is
    /// gone.
    pub async fn hotunplug_nic(&self, id: VmId, mac: &str, timeout: Duration) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Devices)?;
        let (index, nic) = find_nic(&vm, mac)?;
        let slot = nic_slot(index, &nic);
        let device = nic_device_id_of_slot(slot);
        super::unplug_device(&vm, &device, timeout, "the guest releasing the unplugged NIC").await?;
        let q = vm.qmp()?;
        if let Err(e) = q
            .execute_raw("netdev_del", serde_json::json!({ "id": nic_netdev_id(slot) }))
            .await
        {
            tracing::warn!(vm_id = %id, error = %e, "netdev_del after unplug");
        }
        vm.record
            .lock()
            .unwrap()
            .create
            .nics
            .retain(|n| !n.mac.eq_ignore_ascii_case(mac));
        vm.persist()?;
        unplug_all(self.cfg.networks.as_ref(), id, std::slice::from_ref(&nic)).await;
        tracing::info!(vm_id = %id, mac, slot, "NIC hot unplugged");
        Ok(vm.info())
    }

    /// Sets the link state of the NIC with MAC `mac` (the guest sees the cable plugged or not).
    pub async fn set_nic_link(&self, id: VmId, mac: &str, up: bool) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Devices)?;
        let (index, nic) = find_nic(&vm, mac)?;
        set_link_qmp(&vm, nic_slot(index, &nic), up).await?;
        if let Some(n) = vm
            .record
            .lock()
            .unwrap()
            .create
            .nics
            .iter_mut()
            .find(|n| n.mac.eq_ignore_ascii_case(mac))
        {
            n.link_up = up;
        }
        vm.persist()?;
        Ok(vm.info())
    }

    /// The networks this manager's host has taps on, for tests and stats.
    pub fn networks(&self) -> Arc<dyn NicNetworks> {
        self.cfg.networks.clone()
    }
}

fn find_nic(vm: &Vm, mac: &str) -> Result<(usize, NicSpec), VmError> {
    let r = vm.record.lock().unwrap();
    r.create
        .nics
        .iter()
        .enumerate()
        .find(|(_, n)| n.mac.eq_ignore_ascii_case(mac))
        .map(|(i, n)| (i, n.clone()))
        .ok_or_else(|| VmError::Nic {
            vm: vm.id,
            mac: mac.to_string(),
            reason: "no such NIC on this VM".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_fill_the_lowest_free_and_refuse_duplicates() {
        let vm: VmId = "4f1c9a0e-2b3d-4c5e-8f70-0123456789ab".parse().unwrap();
        let mut nics = vec![
            NicSpec {
                slot: Some(0),
                ..NicSpec::new("52:54:00:00:00:01", NicBackend::User)
            },
            NicSpec::new("52:54:00:00:00:02", NicBackend::User),
            NicSpec {
                slot: Some(1),
                ..NicSpec::new("52:54:00:00:00:03", NicBackend::User)
            },
        ];
        assign_slots(vm, &mut nics).unwrap();
        assert_eq!(
            nics.iter().map(|n| n.slot.unwrap()).collect::<Vec<_>>(),
            [0, 2, 1]
        );
        nics.push(NicSpec::new("52:54:00:00:00:01", NicBackend::User));
        assert!(assign_slots(vm, &mut nics)
            .unwrap_err()
            .to_string()
            .contains("two NICs"));
        let mut many: Vec<NicSpec> = (0..9)
            .map(|i| NicSpec::new(&format!("52:54:00:00:00:{i:02x}"), NicBackend::User))
            .collect();
        assert!(assign_slots(vm, &mut many)
            .unwrap_err()
            .to_string()
            .contains("at most 8"));
    }
}
