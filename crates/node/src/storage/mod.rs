//! The node's view of storage: storage server connections and the domains found on them.
//!
//! A connection is a directory the node reaches storage through: a local directory (`localfs`),
//! a POSIX file system mounted by the admin or by us (`posixfs`), or an NFS export (`nfs`, which
//! needs the kernel's NFS client). The engine sends the connections when it activates a host (as
//! oVirt's `connectStorageServer`); the node acts on the list in memory only. A restarted node
//! learns it again from the engine, except that VMs which outlived the previous process make it
//! replay the last list by itself (`resume`: their host ids must be renewed before the fence
//! watchdog's deadline, engine or not). Domains are found by scanning the
//! connections for `<sdUUID>/dom_md/metadata`.
//!
//! Architecture invariant: ids reach paths only as typed UUIDs; every path the node opens on
//! behalf of a request lies under a connection the engine gave.

pub mod monitor;
pub mod pool;
pub mod resume;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use oxvirt_qemu::{BlockProtocol, ImageFormat, LayerSpec};
use oxvirt_storage::{FileStorageDomain, StorageError, VolFormat};
use oxvirt_types::{ImgUuid, SdUuid, VolUuid};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionKind {
    Localfs,
    Posixfs,
    Nfs,
}

/// One storage server connection as the engine describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Connection {
    /// The engine's id for the connection.
    pub id: String,
    pub kind: ConnectionKind,
    /// localfs: the directory. posixfs: the device/spec to mount, or a directory already
    /// mounted when `vfsType` is absent. nfs: `server:/export`.
    pub path: String,
    #[serde(default)]
    pub vfs_type: Option<String>,
    #[serde(default)]
    pub mount_options: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    pub id: String,
    /// 0 on success, else an error code.
    pub status: i64,
    pub message: String,
    /// Where the node reaches it.
    pub local_path: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageServiceError {
    #[error("storage domain {0} not found on any connected storage")]
    DomainNotFound(SdUuid),
    #[error("connection {id}: {reason}")]
    Connection { id: String, reason: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub struct StorageService {
    /// Root for mount points of `nfs`/`posixfs` connections we mount ourselves.
    mount_root: PathBuf,
    connections: RwLock<BTreeMap<String, (Connection, PathBuf)>>,
}

fn valid_conn_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl StorageService {
    pub fn new(mount_root: PathBuf) -> Self {
        Self {
            mount_root,
            connections: RwLock::new(BTreeMap::new()),
        }
    }

    /// Connects each entry; failures are reported per connection and change nothing for it.
    pub fn connect(&self, conns: Vec<Connection>) -> Vec<ConnectionStatus> {
        conns
            .into_iter()
            .map(|c| match self.connect_one(&c) {
                Ok(local) => {
                    let status = ConnectionStatus {
                        id: c.id.clone(),
                        status: 0,
                        message: "OK".into(),
                        local_path: Some(local.clone()),
                    };
                    self.connections
                        .write()
                        .expect("connections")
                        .insert(c.id.clone(), (c, local));
                    status
                }
                Err(reason) => {
                    tracing::warn!(id = %c.id, path = %c.path, %reason, "storage connection failed");
                    ConnectionStatus {
                        id: c.id,
                        status: 477,
                        message: reason,
                        local_path: None,
                    }
                }
            })
            .collect()
    }

    fn connect_one(&self, c: &Connection) -> Result<PathBuf, String> {
        if !valid_conn_id(&c.id) {
            return Err(format!("invalid connection id {:?}", c.id));
        }
        let dir_ok = |p: &Path| -> Result<PathBuf, String> {
            let md = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
            if !md.is_dir() {
                return Err(format!("{} is not a directory", p.display()));
            }
            Ok(p.to_path_buf())
        };
        match (c.kind, c.vfs_type.as_deref()) {
            (ConnectionKind::Localfs, _) | (ConnectionKind::Posixfs, None) => {
                let p = Path::new(&c.path);
                if !p.is_absolute() || c.path.split('/').any(|s| s == "..") {
                    return Err(format!("path {:?} must be absolute and without '..'", c.path));
                }
                dir_ok(p)
            }
            (ConnectionKind::Nfs, _) | (ConnectionKind::Posixfs, Some(_)) => {
                let fstype = match c.kind {
                    ConnectionKind::Nfs => "nfs",
                    _ => c.vfs_type.as_deref().unwrap_or_default(),
                };
                let target = self.mount_root.join(mount_dir_name(&c.path));
                if is_mountpoint(&target) {
                    return Ok(target);
                }
                std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
                let mut cmd = std::process::Command::new("mount");
                cmd.args(["-t", fstype]);
                if let Some(o) = mount_options(c.kind, c.mount_options.as_deref()) {
                    cmd.args(["-o", &o]);
                }
                let out = cmd
                    .arg(&c.path)
                    .arg(&target)
                    .output()
                    .map_err(|e| format!("cannot run mount: {e}"))?;
                if !out.status.success() {
                    let _ = std::fs::remove_dir(&target);
                    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    let hint = if fstype == "nfs" && !kernel_has_fs("nfs") {
                        " (this kernel has no NFS client: use a posixfs or localfs connection)"
                    } else {
                        ""
                    };
                    return Err(format!("mount -t {fstype} {} failed: {err}{hint}", c.path));
                }
                Ok(target)
            }
        }
    }

    /// Forgets connections (unmounting those we mounted).
    pub fn disconnect(&self, ids: &[String]) -> Vec<ConnectionStatus> {
        let mut conns = self.connections.write().expect("connections");
        ids.iter()
            .map(|id| match conns.remove(id) {
                None => ConnectionStatus {
                    id: id.clone(),
                    status: 0,
                    message: "not connected".into(),
                    local_path: None,
                },
                Some((_, local)) => {
                    if local.starts_with(&self.mount_root) && is_mountpoint(&local) {
                        let _ = std::process::Command::new("umount").arg(&local).status();
                        let _ = std::fs::remove_dir(&local);
                    }
                    ConnectionStatus {
                        id: id.clone(),
                        status: 0,
                        message: "OK".into(),
                        local_path: Some(local),
                    }
                }
            })
            .collect()
    }

    pub fn connections(&self) -> Vec<(Connection, PathBuf)> {
        self.connections
            .read()
            .expect("connections")
            .values()
            .cloned()
            .collect()
    }

    /// The local path of a connection.
    pub fn connection_path(&self, id: &str) -> Option<PathBuf> {
        self.connections
            .read()
            .expect("connections")
            .get(id)
            .map(|(_, p)| p.clone())
    }

    /// Finds and opens a domain on any connection.
    pub fn domain(&self, sd: SdUuid) -> Result<FileStorageDomain, StorageServiceError> {
        for (_, local) in self.connections() {
            let root = local.join(sd.to_string());
            if root.join("dom_md").is_dir() {
                return Ok(FileStorageDomain::open(&root)?);
            }
        }
        Err(StorageServiceError::DomainNotFound(sd))
    }

    /// Removes an unattached domain from storage (VDSM's `formatStorageDomain`): renamed out
    /// of the way first, so a crash leaves a hidden directory, never a half-deleted domain.
    pub fn format_domain(&self, sd: SdUuid) -> Result<(), StorageServiceError> {
        let dom = self.domain(sd)?;
        if !dom.metadata().pools.is_empty() {
            return Err(StorageServiceError::Storage(StorageError::InvalidArgument {
                what: "storage domain",
                reason: format!("{sd} belongs to pool {:?}: detach it first", dom.metadata().pools),
            }));
        }
        let root = dom.root().to_path_buf();
        drop(dom);
        let parent = root.parent().expect("a domain lives under its mount");
        let doomed = parent.join(format!(".{sd}.removing"));
        std::fs::rename(&root, &doomed).map_err(StorageError::io("rename for removal", &root))?;
        std::fs::remove_dir_all(&doomed).map_err(StorageError::io("remove", &doomed))?;
        tracing::info!(sd = %sd, "storage domain formatted");
        Ok(())
    }

    /// Every domain on every connection.
    pub fn domains(&self) -> Vec<(SdUuid, PathBuf)> {
        let mut out = Vec::new();
        for (_, local) in self.connections() {
            if let Ok(found) = FileStorageDomain::scan(&local) {
                out.extend(found);
            }
        }
        out
    }

    /// The layers of an image's chain up to `top` (the leaf when `None`), base first, as a VM
    /// opens them.
    pub fn layers(
        &self,
        sd: SdUuid,
        img: ImgUuid,
        top: Option<VolUuid>,
    ) -> Result<Vec<LayerSpec>, StorageServiceError> {
        let dom = self.domain(sd)?;
        let chain = dom.chain(img)?;
        let ids = chain.ids();
        let end = match top {
            None => ids.len(),
            Some(t) => ids
                .iter()
                .position(|v| *v == t)
                .map(|i| i + 1)
                .ok_or_else(|| StorageServiceError::Storage(StorageError::NoVolume { img, vol: t }))?,
        };
        Ok(ids[..end]
            .iter()
            .map(|v| LayerSpec {
                path: dom.volume_path(img, *v),
                format: match chain.get(*v).map(|c| c.meta.format) {
                    Some(VolFormat::Raw) => ImageFormat::Raw,
                    _ => ImageFormat::Qcow2,
                },
                protocol: BlockProtocol::File,
            })
            .collect())
    }
}

/// VDSM names mount points after the remote path with `/` replaced by `_`.
fn mount_dir_name(remote: &str) -> String {
    remote.replace('_', "__").replace('/', "_")
}

fn is_mountpoint(p: &Path) -> bool {
    let target = p.display().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(target.as_str()))
        })
        .unwrap_or(false)
}

fn kernel_has_fs(fs: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .map(|t| t.lines().any(|l| l.split_whitespace().last() == Some(fs)))
        .unwrap_or(false)
}

/// VDSM's NFS mount options: a soft mount that gives up after `retrans` tries of `timeo`
/// deciseconds (10 s) each, so a dead server turns into I/O errors the domain monitor and the
/// leases see, instead of processes hung for ever in the kernel (a hard mount); `nosharecache`
/// keeps two exports of one server apart. The engine's own options come after them and win.
pub const NFS_DEFAULT_OPTIONS: &str = "soft,nosharecache,timeo=100,retrans=3";

/// The `-o` of a mount: NFS gets [`NFS_DEFAULT_OPTIONS`] before the engine's; other file
/// systems only the engine's.
pub fn mount_options(kind: ConnectionKind, given: Option<&str>) -> Option<String> {
    let given = given.map(str::trim).filter(|o| !o.is_empty());
    match (kind, given) {
        (ConnectionKind::Nfs, Some(o)) => Some(format!("{NFS_DEFAULT_OPTIONS},{o}")),
        (ConnectionKind::Nfs, None) => Some(NFS_DEFAULT_OPTIONS.to_string()),
        (_, o) => o.map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfs_mounts_are_soft_with_vdsm_timeouts_unless_the_engine_says_otherwise() {
        assert_eq!(
            mount_options(ConnectionKind::Nfs, None).as_deref(),
            Some("soft,nosharecache,timeo=100,retrans=3")
        );
        // mount(8) takes the last of repeated options: the engine's win.
        assert_eq!(
            mount_options(ConnectionKind::Nfs, Some("vers=4.2,timeo=600")).as_deref(),
            Some("soft,nosharecache,timeo=100,retrans=3,vers=4.2,timeo=600")
        );
        assert_eq!(
            mount_options(ConnectionKind::Nfs, Some("  ")),
            mount_options(ConnectionKind::Nfs, None)
        );
        assert_eq!(mount_options(ConnectionKind::Posixfs, None), None);
        assert_eq!(
            mount_options(ConnectionKind::Posixfs, Some("noatime")).as_deref(),
            Some("noatime")
        );
    }

    #[test]
    fn localfs_connections_validate_paths_and_find_domains() {
        let dir = tempfile::tempdir().unwrap();
        let svc = StorageService::new(dir.path().join("mnt"));
        let bad = svc.connect(vec![
            Connection {
                id: "a".into(),
                kind: ConnectionKind::Localfs,
                path: "relative".into(),
                vfs_type: None,
                mount_options: None,
            },
            Connection {
                id: "b".into(),
                kind: ConnectionKind::Localfs,
                path: "/nonexistent/x".into(),
                vfs_type: None,
                mount_options: None,
            },
            Connection {
                id: "../c".into(),
                kind: ConnectionKind::Localfs,
                path: "/tmp".into(),
                vfs_type: None,
                mount_options: None,
            },
        ]);
        assert!(bad.iter().all(|s| s.status != 0), "{bad:?}");
        assert!(svc.connections().is_empty());
        let sd = SdUuid::new_random();
        assert!(matches!(
            svc.domain(sd),
            Err(StorageServiceError::DomainNotFound(_))
        ));
        let ok = svc.connect(vec![Connection {
            id: "local".into(),
            kind: ConnectionKind::Localfs,
            path: dir.path().display().to_string(),
            vfs_type: None,
            mount_options: None,
        }]);
        assert_eq!(ok[0].status, 0);
        FileStorageDomain::create(
            dir.path(),
            &oxvirt_storage::NewDomain {
                sd,
                description: "d".into(),
                domain_type: oxvirt_storage::DomainType::LocalFs,
                remote_path: None,
            },
        )
        .unwrap();
        assert_eq!(svc.domain(sd).unwrap().sd(), sd);
        assert_eq!(svc.domains().len(), 1);
        svc.disconnect(&["local".into()]);
        assert!(svc.domain(sd).is_err());
    }

    #[test]
    fn mount_dir_names_are_flat() {
        assert_eq!(
            mount_dir_name("server:/exports/data_1"),
            "server:_exports_data__1"
        );
    }
}
