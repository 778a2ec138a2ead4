//! Thin disks: volumes whose allocation is capped and grown on demand while the guest writes.
//!
//! On a block domain a thin volume is a logical volume of fixed size holding a qcow2 image that
//! grows inside it. File domains here get the same mechanics: the volume file (the stand-in for
//! the LV) is attached to a loop device, and QEMU opens the qcow2 with the `host_device` driver
//! on that device, so allocation beyond the device's size fails with ENOSPC exactly as on an LV.
//!
//! The cycle, driven by the VM manager:
//! 1. arm `block-set-write-threshold` on the layer's protocol node at `size - free_margin`;
//! 2. `BLOCK_WRITE_THRESHOLD` (or, if the guest outran us, a `BLOCK_IO_ERROR` with `nospace`
//!    and the VM paused in run state `io-error` thanks to `werror=enospc`) triggers an extend;
//! 3. the extend REQUEST goes through [`ExtendRequester`]: the SPM makes the volume larger;
//! 4. the node refreshes its view (`LOOP_SET_CAPACITY`, what `losetup -c` does), re-arms the
//!    threshold at the new size, and `cont`s a VM paused on ENOSPC, which retries the write.
//!    The guest never sees the error.
//!
//! Where the mailbox plugs in: a node that is not the SPM implements [`ExtendRequester`] by
//! sending VDSM's `xtnd` message (sdUUID, volUUID, new size in MiB) through the pool's mailbox
//! and resolving when the SPM's reply shows the volume at least `new_size` long; that is
//! `storage`'s mailbox, wired by the node daemon. [`LocalSpmExtender`] is the path when this node
//! is the SPM (or the domain is local): it grows the file itself.
//!
//! Architecture invariant: the node never grows a volume behind the SPM's back except through
//! the requester it was given; it only refreshes its own view of the device.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use oxvirt_types::{ImgUuid, SdUuid, VmId, VolUuid};
use serde::{Deserialize, Serialize};

/// The volume a thin disk's active layer lives on, as the mailbox names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRef {
    pub sd: SdUuid,
    pub img: ImgUuid,
    pub vol: VolUuid,
}

/// When and by how much a thin volume grows (VDSM: chunk 2.5 GiB, threshold at 20% of a chunk
/// left; the test guest uses MiBs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinPolicy {
    /// Growth per extend.
    pub chunk_bytes: u64,
    /// The threshold sits this far below the current size.
    pub free_margin_bytes: u64,
    /// Never grow beyond this (VDSM: virtual size × 1.1 for qcow2).
    pub max_bytes: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("thin policy: chunk must be positive and at least the free margin ({chunk} < {margin})")]
    Chunk { chunk: u64, margin: u64 },
    #[error("thin policy: sizes must be multiples of 512 bytes")]
    Alignment,
}

impl ThinPolicy {
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.chunk_bytes == 0 || self.chunk_bytes < self.free_margin_bytes {
            return Err(PolicyError::Chunk {
                chunk: self.chunk_bytes,
                margin: self.free_margin_bytes,
            });
        }
        if !(self.chunk_bytes | self.free_margin_bytes | self.max_bytes).is_multiple_of(512) {
            return Err(PolicyError::Alignment);
        }
        Ok(())
    }

    /// The write threshold for a volume of `size` bytes; `None` when it cannot grow any more
    /// (then there is nothing to ask for and the threshold stays off).
    pub fn threshold(&self, size: u64) -> Option<u64> {
        (size < self.max_bytes).then(|| size.saturating_sub(self.free_margin_bytes).max(1))
    }

    /// The size to ask for next, or `None` at the cap.
    pub fn next_size(&self, size: u64) -> Option<u64> {
        (size < self.max_bytes).then(|| (size + self.chunk_bytes).min(self.max_bytes))
    }
}

/// One extend request: "make this volume at least `new_size` bytes".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtendRequest {
    pub vm: VmId,
    /// The disk's slot.
    pub disk: usize,
    pub volume: Option<VolumeRef>,
    /// The volume's backing storage (the file behind the loop device).
    pub backing_file: PathBuf,
    pub current_size: u64,
    pub new_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtendError {
    #[error("cannot extend {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the SPM refused to extend the volume: {reason}")]
    Refused { reason: String },
    #[error("the extend request for {path} got no answer in time")]
    Timeout { path: PathBuf },
}

pub type ExtendFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ExtendError>> + Send + 'a>>;

/// Asks whoever may change pool metadata to grow a volume. Resolves once the volume's backing
/// storage is at least `new_size` bytes; the node then refreshes its device.
pub trait ExtendRequester: Send + Sync + 'static {
    fn extend<'a>(&'a self, req: &'a ExtendRequest) -> ExtendFuture<'a>;
}

/// The SPM-local path: grows the volume file directly (never shrinks it).
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalSpmExtender;

impl ExtendRequester for LocalSpmExtender {
    fn extend<'a>(&'a self, req: &'a ExtendRequest) -> ExtendFuture<'a> {
        Box::pin(async move {
            let path = req.backing_file.clone();
            let new_size = req.new_size;
            tokio::task::spawn_blocking(move || grow_file(&path, new_size))
                .await
                .map_err(|e| ExtendError::Io {
                    path: req.backing_file.clone(),
                    source: std::io::Error::other(e),
                })?
        })
    }
}

fn grow_file(path: &Path, new_size: u64) -> Result<(), ExtendError> {
    let io = |source| ExtendError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::OpenOptions::new().write(true).open(path).map_err(io)?;
    if f.metadata().map_err(io)?.len() < new_size {
        f.set_len(new_size).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("cannot run losetup for {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("losetup failed for {path}: {stderr}")]
    Losetup { path: PathBuf, stderr: String },
    #[error("loop device {device}")]
    Device {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Attaches `file` to a free loop device; returns the device path.
pub fn loop_attach(file: &Path) -> Result<PathBuf, LoopError> {
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(file)
        .output()
        .map_err(|source| LoopError::Spawn {
            path: file.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(LoopError::Losetup {
            path: file.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

/// Detaches a loop device (the kernel frees it once QEMU has closed it).
pub fn loop_detach(device: &Path) -> Result<(), LoopError> {
    let out = std::process::Command::new("losetup")
        .arg("-d")
        .arg(device)
        .output()
        .map_err(|source| LoopError::Spawn {
            path: device.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(LoopError::Losetup {
            path: device.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The file behind a loop device, from sysfs (recovery checks the device is still ours).
pub fn loop_backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim()))
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;

/// The block device's size in bytes.
pub fn device_size(device: &Path) -> Result<u64, LoopError> {
    let f = File::open(device).map_err(|source| LoopError::Device {
        device: device.to_path_buf(),
        source,
    })?;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if r < 0 {
        return Err(LoopError::Device {
            device: device.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(size)
}

/// Makes the loop device pick up its backing file's new size (`losetup -c`).
pub fn loop_refresh(device: &Path) -> Result<u64, LoopError> {
    let f = File::open(device).map_err(|source| LoopError::Device {
        device: device.to_path_buf(),
        source,
    })?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_CAPACITY, 0) };
    if r < 0 {
        return Err(LoopError::Device {
            device: device.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    drop(f);
    device_size(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn policy_arithmetic() {
        let p = ThinPolicy {
            chunk_bytes: 16 * MIB,
            free_margin_bytes: 8 * MIB,
            max_bytes: 40 * MIB,
        };
        p.validate().unwrap();
        assert_eq!(p.threshold(16 * MIB), Some(8 * MIB));
        assert_eq!(
            p.threshold(4 * MIB),
            Some(1),
            "tiny volumes fire on the first write"
        );
        assert_eq!(p.next_size(16 * MIB), Some(32 * MIB));
        assert_eq!(p.next_size(32 * MIB), Some(40 * MIB), "capped at the maximum");
        assert_eq!(p.next_size(40 * MIB), None);
        assert_eq!(p.threshold(40 * MIB), None, "nothing to ask for at the cap");
        let bad = ThinPolicy {
            chunk_bytes: MIB,
            free_margin_bytes: 2 * MIB,
            max_bytes: 40 * MIB,
        };
        assert!(matches!(bad.validate(), Err(PolicyError::Chunk { .. })));
        let bad = ThinPolicy {
            chunk_bytes: 16 * MIB + 1,
            ..p
        };
        assert_eq!(bad.validate(), Err(PolicyError::Alignment));
    }

    #[tokio::test]
    async fn local_extend_grows_the_file_and_the_loop_device_follows() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vol");
        std::fs::write(&file, vec![7u8; MIB as usize]).unwrap();
        let dev = loop_attach(&file).unwrap_or_else(|e| panic!("this test needs loop devices: {e}"));
        let res = async {
            assert_eq!(loop_backing_file(&dev).unwrap(), file);
            assert_eq!(device_size(&dev).unwrap(), MIB);
            let req = ExtendRequest {
                vm: VmId::new_random(),
                disk: 0,
                volume: None,
                backing_file: file.clone(),
                current_size: MIB,
                new_size: 3 * MIB,
            };
            LocalSpmExtender.extend(&req).await.unwrap();
            assert_eq!(std::fs::metadata(&file).unwrap().len(), 3 * MIB);
            assert_eq!(device_size(&dev).unwrap(), MIB, "not refreshed yet");
            assert_eq!(loop_refresh(&dev).unwrap(), 3 * MIB);
            // Never shrinks.
            let smaller = ExtendRequest {
                new_size: 2 * MIB,
                ..req
            };
            LocalSpmExtender.extend(&smaller).await.unwrap();
            assert_eq!(std::fs::metadata(&file).unwrap().len(), 3 * MIB);
        }
        .await;
        loop_detach(&dev).unwrap();
        res
    }
}
