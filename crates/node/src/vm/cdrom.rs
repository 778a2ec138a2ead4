//! The CD-ROM drive: the ISO a VM starts with, and changing or ejecting it while it runs.
//!
//! A VM has at most one CD-ROM ([`CDROM_DEVICE`]), created with the VM (empty or not) and never
//! hot plugged. Changing its media is QEMU's tray sequence: open the tray (forced: the guest may
//! have locked it), remove the medium, close every media node this VM opened before, open the
//! new ISO as node `cd-<generation>`, insert it (opening the tray again if the guest closed it
//! meanwhile), close the tray. The guest sees a media change,
//! as with a real drive. QEMU is the truth about what is inserted: the old nodes are found by
//! name in QEMU, not in the record, so a node that died between the change and the record's
//! write closes the stray node at the next change, and a repeated change converges.

use std::path::PathBuf;

use oxvirt_qemu::cmdline::{cdrom_media_blockdev, CDROM_DEVICE, CDROM_NODE_PREFIX};
use oxvirt_qemu::{qmp, CdromBus};
use oxvirt_types::VmId;
use serde::{Deserialize, Serialize};

use super::{ImageRef, Op, VmError, VmInfo, VmManager};

/// A VM's CD-ROM drive as the node keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCdrom {
    pub bus: CdromBus,
    pub media: Option<CdMedia>,
    /// The media node's number (`cd-<generation>`).
    #[serde(default)]
    pub generation: u32,
}

/// An ISO in the drive: the storage image it lives in (what the engine calls the ISO disk) and
/// its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdMedia {
    pub image: ImageRef,
    pub path: PathBuf,
}

/// The CD-ROM as `VM.getInfo` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdromInfo {
    pub bus: CdromBus,
    /// The image of the ISO in the drive; `None`: empty.
    pub image: Option<ImageRef>,
}

impl VmCdrom {
    pub fn info(&self) -> CdromInfo {
        CdromInfo {
            bus: self.bus,
            image: self.media.as_ref().map(|m| m.image),
        }
    }
}

impl VmManager {
    /// Puts `media` into the running VM's CD-ROM (`None`: ejects it); returns the VM. The ISO
    /// already in the drive is not changed again.
    pub async fn change_cd(&self, id: VmId, media: Option<CdMedia>) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        vm.check(Op::Devices)?;
        let _devices = vm.devices.lock().await;
        let Some(cd) = vm.record.lock().unwrap().create.cdrom.clone() else {
            return Err(VmError::Invalid {
                vm: id,
                reason: "the VM has no CD-ROM drive (it was started without one)".into(),
            });
        };
        if cd.media.as_ref().map(|m| &m.path) == media.as_ref().map(|m| &m.path) {
            return Ok(vm.info());
        }
        if let Some(m) = &media {
            if !m.path.is_file() {
                return Err(VmError::Invalid {
                    vm: id,
                    reason: format!("ISO {} is not a file", m.path.display()),
                });
            }
        }
        let q = vm.qmp()?;
        let qe = |source| VmError::Qmp { vm: id, source };
        let device = CDROM_DEVICE.to_string();
        q.execute(&qmp::BlockdevOpenTray {
            id: device.clone(),
            force: true,
        })
        .await
        .map_err(qe)?;
        q.execute(&qmp::BlockdevRemoveMedium { id: device.clone() })
            .await
            .map_err(qe)?;
        let nodes = q
            .execute(&qmp::QueryNamedBlockNodes { flat: true })
            .await
            .map_err(qe)?;
        let mut generation = cd.generation;
        for n in nodes
            .iter()
            .filter(|n| n.node_name.starts_with(CDROM_NODE_PREFIX))
        {
            if let Ok(g) = n.node_name[CDROM_NODE_PREFIX.len()..].parse::<u32>() {
                generation = generation.max(g);
            }
            if let Err(e) = q
                .execute(&qmp::BlockdevDel {
                    node_name: n.node_name.clone(),
                })
                .await
            {
                tracing::warn!(vm_id = %id, node = %n.node_name, error = %e, "cannot close the old CD-ROM media");
            }
        }
        generation += 1;
        // Empty now: so recorded until the new ISO is in, should opening it fail.
        let record = |media: Option<CdMedia>| {
            vm.record.lock().unwrap().create.cdrom = Some(VmCdrom {
                bus: cd.bus,
                media,
                generation,
            });
            vm.persist()
        };
        record(None)?;
        if let Some(m) = &media {
            q.execute(&qmp::BlockdevAdd {
                options: cdrom_media_blockdev(&m.path, generation),
            })
            .await
            .map_err(qe)?;
            // A guest that opens the empty drive closes its tray (Linux's cdrom autoclose), and
            // a medium goes only into an open tray: open it again and retry until it is in.
            let mut attempt = 0;
            loop {
                let inserted = q
                    .execute(&qmp::BlockdevInsertMedium {
                        id: device.clone(),
                        node_name: format!("{CDROM_NODE_PREFIX}{generation}"),
                    })
                    .await;
                match inserted {
                    Ok(()) => break,
                    Err(e) if attempt < 20 => {
                        attempt += 1;
                        tracing::debug!(vm_id = %id, error = %e, "the tray closed before the ISO went in");
                        q.execute(&qmp::BlockdevOpenTray {
                            id: device.clone(),
                            force: true,
                        })
                        .await
                        .map_err(qe)?;
                    }
                    Err(e) => return Err(qe(e)),
                }
            }
        }
        q.execute(&qmp::BlockdevCloseTray { id: device })
            .await
            .map_err(qe)?;
        record(media.clone())?;
        tracing::info!(vm_id = %id, iso = ?media.as_ref().map(|m| &m.path), "CD-ROM media changed");
        Ok(vm.info())
    }
}
