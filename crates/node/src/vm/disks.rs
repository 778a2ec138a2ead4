//! Disk hot plug and unplug on a running VM.
//!
//! Every VM gets [`DISK_PORTS`] PCIe root ports for its disks; a disk keeps its slot (root
//! port, device id `disk<slot>`, block node names) for life, so unplugging one disk moves no
//! other and a migration destination built from the source's disks (with slots, from
//! `VM.getInfo`) has the same PCI layout. Inside the node a disk is still addressed by its
//! index in the record (snapshots, merges, loop devices); an unplug removes that index from
//! every per-disk list at once, under the VM's device lock, and is refused while a live
//! snapshot or merge recorded by index is still being settled.
//!
//! Hot plug opens the chain with `blockdev-add` (the same nodes the command line opens) and
//! adds a `virtio-blk-pci` on the slot's root port; hot unplug asks the guest to release the
//! device (`device_del`, answered by `DEVICE_DELETED`), then closes the chain top down. Both
//! record the change as pending (a plug with its disk) before QEMU is asked and clear it once
//! done; a node that dies in between asks QEMU on recovery whether the device is there, and the
//! record follows ([`settle_pending_device`]). Plugging a disk the VM has answers with the VM
//! as is, and unplugging a device QEMU no longer has finishes the unplug, so the engine's
//! retries converge.

use std::time::Duration;

use oxvirt_qemu::cmdline::{disk_blockdevs, disk_device_json};
use oxvirt_qemu::{DiskBus, DiskSpec};
use oxvirt_types::VmId;

use super::{thin, ImageRef, LoopDevice, Op, PendingDevice, Vm, VmDisk, VmError, VmInfo, VmManager};

/// PCIe root ports every VM gets for disks: the most disks a VM can have.
pub const DISK_PORTS: u8 = 16;

/// How long a guest may take to release an unplugged disk (Linux waits 5 s after the
/// attention button before it powers a PCIe slot off).
pub const UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);

/// Gives every disk without a slot the lowest free one, SATA disks first (a SATA disk's slot is
/// its port, of which there are few); refuses duplicates and overflow.
pub fn assign_slots(vm: VmId, disks: &mut [VmDisk]) -> Result<(), VmError> {
    let invalid = |reason: String| VmError::Invalid { vm, reason };
    if disks.len() > usize::from(DISK_PORTS) {
        return Err(invalid(format!(
            "{} disks; a VM has at most {DISK_PORTS}",
            disks.len()
        )));
    }
    let mut used: Vec<u8> = Vec::new();
    for d in disks.iter() {
        if let Some(s) = d.slot {
            if used.contains(&s) || s >= DISK_PORTS {
                return Err(invalid(format!("disk slot {s} is taken or beyond {DISK_PORTS}")));
            }
            used.push(s);
        }
    }
    let (mut sata, mut others): (Vec<_>, Vec<_>) = disks
        .iter_mut()
        .filter(|d| d.slot.is_none())
        .partition(|d| d.bus == DiskBus::Sata);
    for d in sata.iter_mut().chain(others.iter_mut()) {
        let free = (0..DISK_PORTS)
            .find(|s| !used.contains(s))
            .ok_or_else(|| invalid("no free disk slot".into()))?;
        d.slot = Some(free);
        used.push(free);
    }
    Ok(())
}

impl VmManager {
    /// Hot plugs `disk` into a running VM; returns the VM with it (and its slot). A disk from
    /// an image the VM already has is not plugged twice: the answer is the VM as it is.
    pub async fn hotplug_disk(&self, id: VmId, mut disk: VmDisk) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Devices)?;
        let _devices = vm.devices.lock().await;
        let mut rec = vm.record.lock().unwrap().clone();
        if disk.image.is_some() && rec.create.disks.iter().any(|d| d.image == disk.image) {
            tracing::info!(vm_id = %id, image = ?disk.image, "disk already plugged");
            return Ok(vm.info());
        }
        if !disk.bus.hot_pluggable() {
            return Err(VmError::Invalid {
                vm: id,
                reason: "a SATA disk cannot be plugged into a running VM: plug it while the VM is down, \
                         or choose virtio or virtio-scsi"
                    .into(),
            });
        }
        // The disk as it will be (its slot, a thin one's loop device), checked against the
        // whole VM first.
        disk.slot = None;
        rec.create.disks.push(disk);
        assign_slots(id, &mut rec.create.disks)?;
        self.validate(&rec.create)?;
        let index = rec.create.disks.len() - 1;
        let slot = rec.slot(index);
        let disk = rec.create.disks[index].clone();
        let lp = match &disk.thin {
            Some(_) => {
                let file = disk.layers.last().expect("validated").path.clone();
                let device = thin::loop_attach(&file).map_err(|source| VmError::Loop {
                    vm: id,
                    disk: slot,
                    source,
                })?;
                Some(LoopDevice { file, device })
            }
            None => None,
        };
        let new_domain = disk
            .image
            .map(|i| i.sd)
            .filter(|sd| !rec.create.lease_domains.contains(sd));
        // Recorded, pending, before QEMU is asked; changed in place (other fields of the
        // record move meanwhile, such as the balloon target).
        {
            let mut r = vm.record.lock().unwrap();
            r.create.disks.push(disk);
            r.loops.push(lp.clone());
            r.create.lease_domains.extend(new_domain);
            r.pending_device = Some(PendingDevice {
                slot: slot as u8,
                plug: true,
            });
        }
        let undo = |vm: &Vm| {
            if let Some(lp) = &lp {
                let _ = thin::loop_detach(&lp.device);
            }
            {
                let mut r = vm.record.lock().unwrap();
                if let Some(i) = r.disk_at_slot(slot) {
                    r.create.disks.remove(i);
                    r.loops.remove(i);
                }
                r.create.lease_domains.retain(|d| Some(*d) != new_domain);
                r.pending_device = None;
            }
            let _ = vm.persist();
        };
        if let Err(e) = vm.persist() {
            undo(&vm);
            return Err(e);
        }
        super::test_crash_point("disk-plug-recorded");
        let now = vm.record.lock().unwrap().clone();
        if let Err(e) = self.plug_chain(&vm, &now, index).await {
            undo(&vm);
            return Err(e);
        }
        super::test_crash_point("disk-plugged");
        vm.record.lock().unwrap().pending_device = None;
        vm.persist()?;
        super::arm_thresholds(&vm).await;
        apply_io_tunes(&vm).await;
        tracing::info!(vm_id = %id, slot, "disk hot plugged");
        Ok(vm.info())
    }

    /// Opens disk `index` of `rec` in QEMU and adds its device; on failure closes what it
    /// opened.
    async fn plug_chain(&self, vm: &super::Vm, rec: &super::VmRecord, index: usize) -> Result<(), VmError> {
        let id = vm.id;
        self.build_spec(&vm.dir, rec, None)
            .to_args()
            .map_err(|source| VmError::Spec {
                vm: id,
                what: "invalid disk",
                source,
            })?;
        let spec = rec.disk_spec(index);
        let slot = rec.slot(index);
        let q = vm.qmp()?;
        let qe = |source| VmError::Qmp { vm: id, source };
        let (nodes, drive) = disk_blockdevs(slot, &spec);
        let mut added: Vec<String> = Vec::new();
        let res = async {
            for node in nodes {
                let name = node["node-name"].as_str().unwrap_or_default().to_string();
                q.execute(&oxvirt_qemu::qmp::BlockdevAdd { options: node })
                    .await
                    .map_err(qe)?;
                added.push(name);
            }
            q.execute_raw("device_add", disk_device_json(slot, &spec, &drive, true))
                .await
                .map_err(qe)?;
            Ok(())
        }
        .await;
        if res.is_err() {
            super::delete_block_nodes(vm, added.into_iter().rev(), "a disk not plugged").await;
        }
        res
    }

    /// Hot unplugs the disk of `image`; returns once the guest released it and its chain is
    /// closed. The volume leases are the caller's to give back.
    pub async fn hotunplug_disk(
        &self,
        id: VmId,
        image: ImageRef,
        timeout: Duration,
    ) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Devices)?;
        let _devices = vm.devices.lock().await;
        let invalid = |reason: String| VmError::Invalid { vm: id, reason };
        let (index, slot, spec) = {
            let r = vm.record.lock().unwrap();
            let index = r
                .create
                .disks
                .iter()
                .position(|d| d.image == Some(image))
                .ok_or_else(|| invalid(format!("no disk from image {} on domain {}", image.img, image.sd)))?;
            r.refuse_while_replicating(id, "disk unplug")?;
            if r.pending_merge.is_some() || !r.pending_overlays.is_empty() {
                return Err(invalid(
                    "a live snapshot or merge is still being settled: unplug the disk after it".into(),
                ));
            }
            if !r.create.disks[index].bus.hot_pluggable() {
                return Err(invalid(format!(
                    "the disk from image {} is on SATA, which cannot unplug from a running VM",
                    image.img
                )));
            }
            (index, r.slot(index), r.disk_spec(index))
        };
        vm.record.lock().unwrap().pending_device = Some(PendingDevice {
            slot: slot as u8,
            plug: false,
        });
        vm.persist()?;
        let released = super::unplug_device(
            &vm,
            &oxvirt_qemu::cmdline::disk_device_id(slot),
            timeout,
            "the guest releasing the unplugged disk",
        )
        .await;
        if let Err(e) = released {
            // The device may still go later (the guest acts on the request): a repeated unplug
            // or a restarted node finds out.
            vm.record.lock().unwrap().pending_device = None;
            let _ = vm.persist();
            return Err(e);
        }
        forget_disk(&vm, index, slot, &spec).await?;
        tracing::info!(vm_id = %id, slot, image = %image.img, "disk hot unplugged");
        Ok(vm.info())
    }
}

/// Forgets the disk at `index` (slot `slot`, opened as `spec`) that QEMU no longer has: its
/// chain is closed, it leaves the record with the pending mark, and its loop device goes.
async fn forget_disk(vm: &Vm, index: usize, slot: usize, spec: &DiskSpec) -> Result<(), VmError> {
    super::delete_block_nodes(
        vm,
        super::layer_node_names(slot, &spec.layers),
        "an unplugged disk",
    )
    .await;
    let lp = {
        let mut r = vm.record.lock().unwrap();
        r.create.disks.remove(index);
        r.pending_device = None;
        r.loops.remove(index)
    };
    vm.persist()?;
    if let Some(lp) = lp {
        if let Err(e) = thin::loop_detach(&lp.device) {
            tracing::warn!(vm_id = %vm.id, device = %lp.device.display(), error = %e, "cannot detach loop device");
        }
    }
    Ok(())
}

/// On recovery, a disk plug or unplug the node died in: QEMU says whether the device is
/// there. A plugged device keeps its disk in the record (an unplugged one leaves it); a device
/// that is gone takes its disk out and its chain is closed.
pub(super) async fn settle_pending_device(vm: &Vm) -> Result<(), VmError> {
    let Some(p) = vm.record.lock().unwrap().pending_device else {
        return Ok(());
    };
    let slot = usize::from(p.slot);
    let present = super::disk_block_info(vm, slot).await?.is_some();
    let gone = {
        let r = vm.record.lock().unwrap();
        r.disk_at_slot(slot)
            .filter(|_| !present)
            .map(|i| (i, r.disk_spec(i)))
    };
    match gone {
        Some((index, spec)) => forget_disk(vm, index, slot, &spec).await?,
        None => {
            vm.record.lock().unwrap().pending_device = None;
            vm.persist()?;
        }
    }
    tracing::warn!(vm_id = %vm.id, slot, plug = p.plug, present, "settled a disk plug or unplug the node died in");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(slot: Option<u8>) -> VmDisk {
        VmDisk {
            slot,
            ..VmDisk::new(Vec::new())
        }
    }

    #[test]
    fn slots_fill_the_lowest_free_and_refuse_duplicates_and_overflow() {
        let vm: VmId = "4f1c9a0e-2b3d-4c5e-8f70-0123456789ab".parse().unwrap();
        let mut disks = vec![disk(Some(0)), disk(None), disk(Some(1)), disk(None)];
        assign_slots(vm, &mut disks).unwrap();
        assert_eq!(
            disks.iter().map(|d| d.slot.unwrap()).collect::<Vec<_>>(),
            [0, 2, 1, 3]
        );
        let mut twice = vec![disk(Some(4)), disk(Some(4))];
        assert!(assign_slots(vm, &mut twice)
            .unwrap_err()
            .to_string()
            .contains("slot 4 is taken"));
        let mut beyond = vec![disk(Some(DISK_PORTS))];
        assert!(assign_slots(vm, &mut beyond).is_err());
        let mut many: Vec<VmDisk> = (0..=DISK_PORTS).map(|_| disk(None)).collect();
        assert!(assign_slots(vm, &mut many)
            .unwrap_err()
            .to_string()
            .contains("at most 16"));
    }
}

/// A disk's I/O limits, as VDSM's `ioTune` names them (bytes and operations per second; 0:
/// unlimited). Applied with `block_set_io_throttle` on the disk's device as soon as QEMU
/// answers (at start, after a hot plug, after a migration), and changed live by
/// `VM.setIoTune`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoTune {
    pub total_bytes_sec: u64,
    pub read_bytes_sec: u64,
    pub write_bytes_sec: u64,
    pub total_iops_sec: u64,
    pub read_iops_sec: u64,
    pub write_iops_sec: u64,
}

impl IoTune {
    pub fn is_unlimited(&self) -> bool {
        *self == IoTune::default()
    }

    /// Why QEMU would refuse these limits, if it would: a total excludes its parts.
    pub fn check(&self) -> Result<(), String> {
        if self.total_bytes_sec > 0 && (self.read_bytes_sec > 0 || self.write_bytes_sec > 0) {
            return Err("total_bytes_sec excludes read_bytes_sec and write_bytes_sec".into());
        }
        if self.total_iops_sec > 0 && (self.read_iops_sec > 0 || self.write_iops_sec > 0) {
            return Err("total_iops_sec excludes read_iops_sec and write_iops_sec".into());
        }
        Ok(())
    }

    /// The QMP command for the device whose block backend is `qdev` (a virtio-blk-pci's is
    /// its inner `virtio-backend`, which `query-block` names).
    fn qmp(&self, qdev: String) -> oxvirt_qemu::qmp::BlockSetIoThrottle {
        oxvirt_qemu::qmp::BlockSetIoThrottle {
            id: qdev,
            bps: self.total_bytes_sec,
            bps_rd: self.read_bytes_sec,
            bps_wr: self.write_bytes_sec,
            iops: self.total_iops_sec,
            iops_rd: self.read_iops_sec,
            iops_wr: self.write_iops_sec,
        }
    }

    fn of(b: &oxvirt_qemu::qmp::BlockDeviceInfo) -> IoTune {
        IoTune {
            total_bytes_sec: b.bps,
            read_bytes_sec: b.bps_rd,
            write_bytes_sec: b.bps_wr,
            total_iops_sec: b.iops,
            read_iops_sec: b.iops_rd,
            write_iops_sec: b.iops_wr,
        }
    }
}

/// Sets the limits of the disk device at `slot`.
async fn throttle(vm: &Vm, slot: usize, t: IoTune) -> Result<(), VmError> {
    let qdev = super::disk_block_info(vm, slot)
        .await?
        .and_then(|b| b.qdev)
        .ok_or_else(|| VmError::Invalid {
            vm: vm.id,
            reason: format!("QEMU has no block device for the disk at slot {slot}"),
        })?;
    vm.qmp()?
        .execute(&t.qmp(qdev))
        .await
        .map_err(|source| VmError::Qmp { vm: vm.id, source })
}

/// Sends every limited disk's limits to QEMU (what the record says).
pub(super) async fn apply_io_tunes(vm: &Vm) {
    let tunes: Vec<(usize, IoTune)> = {
        let rec = vm.record.lock().unwrap();
        rec.create
            .disks
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((rec.slot(i), d.io_tune.filter(|t| !t.is_unlimited())?)))
            .collect()
    };
    for (slot, t) in tunes {
        if let Err(e) = throttle(vm, slot, t).await {
            tracing::error!(vm_id = %vm.id, slot, error = %e, "cannot apply the disk's I/O limits");
        }
    }
}

impl VmManager {
    /// Changes the I/O limits of the VM's disk from image `image`, in QEMU and in the record.
    pub async fn set_io_tune(&self, id: VmId, image: ImageRef, tune: IoTune) -> Result<(), VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Devices)?;
        tune.check()
            .map_err(|reason| VmError::Invalid { vm: id, reason })?;
        let _devices = vm.devices.lock().await;
        let (index, slot) = {
            let rec = vm.record.lock().unwrap();
            let i = rec
                .create
                .disks
                .iter()
                .position(|d| d.image == Some(image))
                .ok_or_else(|| VmError::Invalid {
                    vm: id,
                    reason: format!(
                        "the VM has no disk from image {} of domain {}",
                        image.img, image.sd
                    ),
                })?;
            (i, rec.slot(i))
        };
        throttle(&vm, slot, tune).await?;
        vm.record.lock().unwrap().create.disks[index].io_tune = Some(tune);
        vm.persist()?;
        tracing::info!(vm_id = %id, slot, ?tune, "disk I/O limits changed");
        Ok(())
    }

    /// The I/O limits QEMU applies to each of the VM's disks from a storage image.
    pub async fn io_tunes(&self, id: VmId) -> Result<Vec<(ImageRef, IoTune)>, VmError> {
        let vm = self.get(id)?;
        let disks: Vec<(usize, ImageRef)> = {
            let rec = vm.record.lock().unwrap();
            rec.create
                .disks
                .iter()
                .enumerate()
                .filter_map(|(i, d)| Some((rec.slot(i), d.image?)))
                .collect()
        };
        let mut out = Vec::new();
        for (slot, image) in disks {
            if let Some(b) = super::disk_block_info(&vm, slot).await? {
                let t = b.inserted.as_ref().map(IoTune::of).unwrap_or_default();
                out.push((image, t));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod io_tune_tests {
    use super::IoTune;

    #[test]
    fn a_total_excludes_its_parts() {
        let ok = IoTune {
            write_bytes_sec: 1 << 20,
            total_iops_sec: 50,
            ..Default::default()
        };
        assert_eq!(ok.check(), Ok(()));
        assert!(!ok.is_unlimited() && IoTune::default().is_unlimited());
        let bad = IoTune {
            total_bytes_sec: 1,
            read_bytes_sec: 1,
            ..Default::default()
        };
        assert!(bad.check().is_err());
        let q = ok.qmp("/machine/peripheral/disk3/virtio-backend".into());
        assert_eq!((q.bps_wr, q.iops), (1 << 20, 50));
        let json = serde_json::to_value(&q).unwrap();
        assert_eq!(json["bps_wr"], 1 << 20, "QMP's own argument names: {json}");
    }
}
