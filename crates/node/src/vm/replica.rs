//! Live copy of a disk to another storage domain under the running guest: the node's half of
//! a live storage migration (VDSM's `diskReplicateStart` and `diskReplicateFinish`).
//!
//! Before [`VmManager::replicate_start`] the SPM has made the disk's chain again on the
//! destination (same volume ids, empty, ILLEGAL) and copied the data of every volume but the
//! leaf into it: those are read-only for the guest, so their copies are final. The start opens
//! the copy's chain in QEMU and runs a `blockdev-mirror` of the active layer onto the copy's
//! leaf (`sync: top`, the copy's backing holds the rest) in write-blocking mode: once the job
//! is ready every guest write lands on both. [`VmManager::replicate_finish`] then switches the
//! device to the copy (`job-complete`) and closes the source's nodes — or, asked to finish onto
//! the source itself (VDSM's way to abort), cancels the job and closes the copy's.
//!
//! The replica is recorded in `vm.json` ([`PendingReplica`]) before the job starts and until the
//! chain is settled, and the mirror job lives in QEMU: a node that restarts in between finds
//! both, and a finish asked of it settles them. Whether the switch happened is read from QEMU
//! (`query-block`), never assumed.
//!
//! While a replica runs the disk's chain must not change under it: snapshots, merges, disk
//! size changes, hot unplug, migration and hibernation are refused.

use std::time::{Duration, Instant};

use oxvirt_qemu::cmdline::{disk_blockdevs, format_node_name};
use oxvirt_qemu::qmp::{self, Event};
use oxvirt_qemu::{DiskSpec, LayerSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{
    delete_block_nodes, disk_block_info, layer_node_names, thin, ImageRef, Op, Vm, VmError, VmManager,
};
use oxvirt_types::VmId;

/// A disk being copied to another domain, from `replicate_start` until the finish settles it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReplica {
    /// The disk's slot (indices move with unplugs; slots do not).
    pub slot: u8,
    /// Where the copy is: the same image on another domain.
    pub target: ImageRef,
    /// The copy's chain, base first: the disk's volumes on the target.
    pub layers: Vec<LayerSpec>,
    /// The QEMU mirror job.
    pub job: String,
}

/// How a replica ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    /// The disk runs on the copy now.
    pub pivoted: bool,
    pub elapsed_ms: u64,
}

/// How long a finish waits between looks at QEMU's jobs.
const POLL: Duration = Duration::from_millis(200);

impl VmManager {
    /// Starts copying the disk on `image` to the same volumes on `target.sd` (`layers`, base
    /// first, made and synced but for the leaf by the SPM). Returns once QEMU's mirror job
    /// runs; asked again for the same copy, it does nothing.
    pub async fn replicate_start(
        &self,
        id: VmId,
        image: ImageRef,
        target: ImageRef,
        layers: Vec<LayerSpec>,
    ) -> Result<(), VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Merge)?;
        let _devices = vm.devices.lock().await;
        let invalid = |reason: String| VmError::Invalid { vm: id, reason };
        let rec = vm.record.lock().unwrap().clone();
        if let Some(p) = &rec.pending_replica {
            let same = p.target == target
                && rec
                    .disk_at_slot(p.slot.into())
                    .is_some_and(|d| rec.create.disks[d].image == Some(image));
            return if same {
                Ok(())
            } else {
                Err(invalid(format!(
                    "its disk at slot {} is being copied to domain {} already",
                    p.slot, p.target.sd
                )))
            };
        }
        let disk = rec
            .create
            .disks
            .iter()
            .position(|d| d.image == Some(image))
            .ok_or_else(|| invalid(format!("no disk from image {} on domain {}", image.img, image.sd)))?;
        let d = &rec.create.disks[disk];
        if target.img != image.img || target.sd == image.sd {
            return Err(invalid(format!(
                "a disk is copied to the same image on another domain, not to image {} on domain {}",
                target.img, target.sd
            )));
        }
        if d.read_only {
            return Err(invalid(format!("the disk from image {} is read-only", image.img)));
        }
        if d.thin.is_some() {
            return Err(invalid(format!(
                "the active layer of the disk from image {} is a thin volume on a loop device: snapshot it first",
                image.img
            )));
        }
        if let Some(pm) = &rec.pending_merge {
            return Err(invalid(format!(
                "the live merge of {} is still running",
                pm.top.display()
            )));
        }
        let names = |ls: &[LayerSpec]| {
            ls.iter()
                .map(|l| l.path.file_name().map(|n| n.to_os_string()))
                .collect::<Vec<_>>()
        };
        if names(&layers) != names(&d.layers) {
            return Err(invalid(format!(
                "the copy's chain {:?} is not the disk's {:?}",
                names(&layers),
                names(&d.layers)
            )));
        }
        if let Some(l) = layers.iter().find(|l| !l.path.is_file()) {
            return Err(invalid(format!("volume {} does not exist", l.path.display())));
        }
        let slot = rec.slot(disk);
        let spec = rec.disk_spec(disk);
        let copy = DiskSpec {
            layers: layers.clone(),
            ..spec.clone()
        };
        let q = vm.qmp()?;
        let qe = |source| VmError::Qmp { vm: id, source };
        let (nodes, copy_top) = disk_blockdevs(slot, &copy);
        let mut added = Vec::new();
        for node in nodes {
            let name = node["node-name"].as_str().unwrap_or_default().to_string();
            if let Err(e) = q.execute(&qmp::BlockdevAdd { options: node }).await {
                added.reverse();
                delete_block_nodes(&vm, added, "a replica's layer").await;
                return Err(qe(e));
            }
            added.push(name);
        }
        let job = format!(
            "replica-{slot}-{}",
            vm.job_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        {
            let mut r = vm.record.lock().unwrap();
            r.pending_replica = Some(PendingReplica {
                slot: slot as u8,
                target,
                layers: layers.clone(),
                job: job.clone(),
            });
            if !r.create.lease_domains.contains(&target.sd) {
                r.create.lease_domains.push(target.sd);
            }
        }
        let started = match vm.persist() {
            Ok(()) => q
                .execute(&qmp::BlockdevMirror {
                    job_id: job.clone(),
                    device: format_node_name(slot, &spec.layers.last().expect("a disk has layers").path),
                    target: copy_top,
                    sync: "top".into(),
                    copy_mode: "write-blocking".into(),
                    auto_finalize: true,
                    auto_dismiss: true,
                })
                .await
                .map_err(qe),
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            added.reverse();
            delete_block_nodes(&vm, added, "a replica's layer").await;
            vm.record.lock().unwrap().pending_replica = None;
            let _ = vm.persist();
            return Err(e);
        }
        tracing::info!(vm_id = %id, slot, job = %job, target = %target.sd, "disk replica started");
        Ok(())
    }

    /// Ends the copy of the disk on `image`: with `target` the copy's image, waits (at most
    /// `timeout`) until the mirror is in step, switches the disk to the copy and closes the
    /// source's layers; with `target == image`, drops the copy and the disk stays where it
    /// is. Asked again after it ended, reports how it ended. A copy whose job failed is
    /// dropped and reported as an error.
    pub async fn replicate_finish(
        &self,
        id: VmId,
        image: ImageRef,
        target: ImageRef,
        timeout: Duration,
    ) -> Result<ReplicaReport, VmError> {
        let start = Instant::now();
        let vm = self.get(id)?;
        let _devices = vm.devices.lock().await;
        let invalid = |reason: String| VmError::Invalid { vm: id, reason };
        let abort = image == target;
        let report = |pivoted| ReplicaReport {
            pivoted,
            elapsed_ms: start.elapsed().as_millis() as u64,
        };
        let rec = vm.record.lock().unwrap().clone();
        let Some(p) = rec.pending_replica.clone() else {
            // Settled already (an answer lost with a node restart): the disk says how.
            let on = |i: ImageRef| rec.create.disks.iter().any(|d| d.image == Some(i));
            return match (abort, on(image), on(target)) {
                (true, true, _) => Ok(report(false)),
                (false, _, true) => Ok(report(true)),
                _ => Err(invalid(format!(
                    "no copy of the disk from image {} is running",
                    image.img
                ))),
            };
        };
        let disk = rec
            .disk_at_slot(p.slot.into())
            .filter(|&d| {
                let i = rec.create.disks[d].image;
                i == Some(image) || i == Some(p.target)
            })
            .ok_or_else(|| {
                invalid(format!(
                    "the disk being copied is not the one from image {}",
                    image.img
                ))
            })?;
        if !abort && p.target != target {
            return Err(invalid(format!(
                "the disk from image {} is being copied to domain {}, not {}",
                image.img, p.target.sd, target.sd
            )));
        }
        if vm.status().is_down() {
            // QEMU is gone, and the copy with it: the disk stays on its source.
            vm.record.lock().unwrap().pending_replica = None;
            vm.persist()?;
            return if abort {
                Ok(report(false))
            } else {
                Err(invalid("it is down: the copy ended with its QEMU".into()))
            };
        }
        let mut events = vm.events.subscribe();
        let ended = self.run_replica_job(&vm, &p, abort, &mut events, timeout).await?;
        super::test_crash_point("replica-ended");
        let slot = usize::from(p.slot);
        // The device's top node says where it runs (file names may come back as `json:`
        // descriptions once the backing was given as a node).
        let copy_top = format_node_name(slot, &p.layers.last().expect("a chain has a volume").path);
        let top = disk_block_info(&vm, slot)
            .await?
            .and_then(|b| b.inserted)
            .and_then(|i| i.node_name);
        let pivoted = top.as_deref() == Some(copy_top.as_str());
        if pivoted {
            let source = vm.record.lock().unwrap().disk_spec(disk);
            delete_block_nodes(
                &vm,
                layer_node_names(slot, &source.layers),
                "a replicated disk's source",
            )
            .await;
            let lp = {
                let mut r = vm.record.lock().unwrap();
                let lp = r.loops.get_mut(disk).and_then(Option::take);
                let d = &mut r.create.disks[disk];
                d.layers = p.layers.clone();
                d.image = Some(p.target);
                d.thin = None;
                let still_used = r
                    .create
                    .disks
                    .iter()
                    .any(|d| d.image.is_some_and(|i| i.sd == image.sd))
                    || r.create.vm_lease == Some(image.sd);
                if !still_used {
                    r.create.lease_domains.retain(|sd| *sd != image.sd);
                }
                r.pending_replica = None;
                lp
            };
            vm.persist()?;
            if let Some(lp) = lp {
                if let Err(e) = thin::loop_detach(&lp.device) {
                    tracing::warn!(vm_id = %id, device = %lp.device.display(), error = %e, "cannot detach the source's loop device");
                }
            }
            tracing::info!(vm_id = %id, slot, target = %p.target.sd, "disk switched to its replica");
            // A finish that meant to abort found the switch made (by an earlier finish whose
            // answer was lost): the disk is on the copy, and says so.
            return Ok(report(true));
        }
        delete_block_nodes(
            &vm,
            layer_node_names(slot, &p.layers),
            "a dropped replica's layer",
        )
        .await;
        {
            let mut r = vm.record.lock().unwrap();
            r.pending_replica = None;
            if !r
                .create
                .disks
                .iter()
                .any(|d| d.image.is_some_and(|i| i.sd == p.target.sd))
                && r.create.vm_lease != Some(p.target.sd)
            {
                r.create.lease_domains.retain(|sd| *sd != p.target.sd);
            }
        }
        vm.persist()?;
        tracing::info!(vm_id = %id, slot, abort, "disk replica dropped");
        if abort {
            Ok(report(false))
        } else {
            Err(VmError::BlockJob {
                vm: id,
                job: p.job.clone(),
                reason: ended.unwrap_or_else(|| {
                    format!(
                        "the copy ended before the switch (the disk runs on node {})",
                        top.as_deref().unwrap_or("none")
                    )
                }),
            })
        }
    }

    /// Drives the mirror job to its end: completes it once ready (or cancels it, to abort)
    /// and waits until QEMU has dropped it. Returns the job's error, if it reported one.
    async fn run_replica_job(
        &self,
        vm: &Vm,
        p: &PendingReplica,
        abort: bool,
        events: &mut broadcast::Receiver<Event>,
        timeout: Duration,
    ) -> Result<Option<String>, VmError> {
        let id = vm.id;
        let qe = |source| VmError::Qmp { vm: id, source };
        let deadline = Instant::now() + timeout;
        let mut asked = false;
        let mut error = None;
        // The job's own error, from its events (QEMU drops the job itself once it ended).
        let note = |ev: Event, error: &mut Option<String>| match ev {
            Event::BlockJobCompleted(i) if i.device == p.job && error.is_none() => *error = i.error,
            Event::BlockJobError {
                device, operation, ..
            } if device == p.job && error.is_none() => *error = Some(format!("{operation} error")),
            _ => {}
        };
        loop {
            loop {
                match events.try_recv() {
                    Ok(ev) => note(ev, &mut error),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                    Err(_) => break,
                }
            }
            let q = vm.qmp()?;
            let jobs = q.execute(&qmp::QueryJobs {}).await.map_err(qe)?;
            let Some(j) = jobs.iter().find(|j| j.id == p.job) else {
                return Ok(error);
            };
            if j.error.is_some() {
                error = j.error.clone();
            }
            let ready = j.status == "ready";
            if !asked && (ready || abort) && !matches!(j.status.as_str(), "concluded" | "aborting" | "null") {
                let r = if abort {
                    q.execute(&qmp::JobCancel { id: p.job.clone() }).await
                } else {
                    q.execute(&qmp::JobComplete { id: p.job.clone() }).await
                };
                match r {
                    Ok(()) => asked = true,
                    // Moved on meanwhile (ended, or not ready after all): look again.
                    Err(e) => {
                        tracing::debug!(vm_id = %id, job = %p.job, error = %e, "replica job not settled yet")
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(VmError::Timeout {
                    vm: id,
                    what: if abort { "replica cancel" } else { "replica switch" },
                    timeout,
                });
            }
            // Woken by QEMU's next event (the job ready, or ended), else a look after POLL.
            if let Ok(Ok(ev)) = tokio::time::timeout(POLL, events.recv()).await {
                note(ev, &mut error);
            }
        }
    }
}
