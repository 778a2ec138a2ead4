//! Storage verbs: `StoragePool.*`, `StorageDomain.*`, `Volume.*`, `Image.*`, `Task.*`, `SDM.*`.
//!
//! The verbs here read storage or create domains, which any host may do. Verbs that change pool
//! metadata or volumes run on the SPM only.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use oxvirt_rpc::RpcError;
use oxvirt_storage::{DomainType, NewDomain};
use oxvirt_types::api::ErrorCode;
use oxvirt_types::{ImgUuid, SdUuid, VolUuid};

use super::{params, ApiError};
use crate::storage::pool::PoolService;
use crate::storage::resume::{Change, PoolConnection};
use crate::storage::{Connection, ConnectionKind, StorageService, StorageServiceError};

mod pool_verbs;
use pool_verbs::execute_pool;
pub use pool_verbs::{Connect as PoolConnect, ForcedDetach, PoolRequest};

#[derive(Debug, Clone, PartialEq)]
pub enum StorageRequest {
    ConnectStorageServer {
        connections: Vec<Connection>,
    },
    DisconnectStorageServer {
        ids: Vec<String>,
    },
    DomainCreate(DomainCreate),
    DomainGetInfo {
        sd: SdUuid,
    },
    DomainGetStats {
        sd: SdUuid,
    },
    DomainFormat {
        sd: SdUuid,
    },
    DomainGetImages {
        sd: SdUuid,
    },
    /// The domains found on one storage connection (VDSM's `Host.getStorageDomains` for a
    /// connection's path): what an import of an existing domain looks for.
    ConnectionGetDomains {
        connection: String,
    },
    /// An image's volumes, base first (VDSM's `Image.getVolumes`).
    ImageGetVolumes {
        sd: SdUuid,
        img: ImgUuid,
    },
    VolumeGetInfo {
        sd: SdUuid,
        img: ImgUuid,
        vol: VolUuid,
    },
    /// `Volume.readData`: oxvirt's JSON-RPC form of VDSM's image stream download (`GET /`
    /// with a `Range`), at most [`pool_verbs::DATA_CHUNK`] bytes.
    VolumeReadData {
        sd: SdUuid,
        img: ImgUuid,
        vol: VolUuid,
        offset: u64,
        length: u64,
    },
    ImagePrepare {
        sd: SdUuid,
        img: ImgUuid,
        vol: Option<VolUuid>,
    },
    /// Pool, SPM, task, volume-lease and SPM volume verbs (`storage::pool`).
    Pool(PoolRequest),
}

pub const VERBS: &[&str] = &[
    "StoragePool.connectStorageServer",
    "StoragePool.disconnectStorageServer",
    "StorageDomain.create",
    "StorageDomain.getInfo",
    "StorageDomain.getStats",
    "StorageDomain.getImages",
    "Host.getStorageDomains",
    "Image.getVolumes",
    "Volume.getInfo",
    "Volume.readData",
    "Image.prepare",
    "StoragePool.create",
    "StoragePool.connect",
    "StoragePool.disconnect",
    "StoragePool.refresh",
    "StoragePool.spmStart",
    "StoragePool.spmStop",
    "StoragePool.getSpmStatus",
    "StoragePool.getInfo",
    "StoragePool.attachStorageDomain",
    "StoragePool.activateStorageDomain",
    "StoragePool.deactivateStorageDomain",
    "StoragePool.detachStorageDomain",
    // VDSM's StorageDomain namespace names the same four.
    "StorageDomain.attach",
    "StorageDomain.activate",
    "StorageDomain.deactivate",
    "StorageDomain.detach",
    "StoragePool.switchMaster",
    "StoragePool.forcedDetachStorageDomain",
    "StoragePool.sendExtendMsg",
    "StoragePool.getAllTasksStatuses",
    "Volume.create",
    "Volume.delete",
    "Volume.extendSize",
    "Volume.setLegality",
    "Volume.setDescription",
    "Volume.writeData",
    "Volume.acquireLease",
    "Volume.releaseLease",
    "Volume.getLeaseStatus",
    "Image.delete",
    "Image.move",
    "Image.copy",
    "Image.cloneStructure",
    "Image.syncData",
    "Image.mergeSnapshots",
    "Image.prepareMerge",
    "Image.finalizeMerge",
    "StorageDomain.format",
    "Lease.create",
    "Lease.delete",
    "Lease.info",
    "Task.getStatus",
    "Task.getInfo",
    "Task.clear",
    "Task.stop",
];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DomainCreate {
    #[serde(rename = "sdUUID")]
    pub sd: SdUuid,
    /// The storage server connection the domain is created on.
    #[serde(rename = "connectionID")]
    pub connection: String,
    pub description: String,
    pub storage_type: ConnectionKind,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Sd {
    #[serde(rename = "sdUUID")]
    sd: SdUuid,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadData {
    #[serde(rename = "sdUUID")]
    sd: SdUuid,
    #[serde(rename = "spUUID", default)]
    _pool: Option<oxvirt_types::PoolUuid>,
    #[serde(rename = "imgUUID")]
    img: ImgUuid,
    #[serde(rename = "volUUID")]
    vol: VolUuid,
    offset: u64,
    length: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Vol {
    #[serde(rename = "sdUUID")]
    sd: SdUuid,
    #[serde(rename = "imgUUID")]
    img: ImgUuid,
    #[serde(rename = "volUUID")]
    vol: VolUuid,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Img {
    #[serde(rename = "sdUUID")]
    sd: SdUuid,
    #[serde(rename = "imgUUID")]
    img: ImgUuid,
    #[serde(rename = "volUUID", default)]
    vol: Option<VolUuid>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImgRef {
    #[serde(rename = "sdUUID")]
    sd: SdUuid,
    #[serde(rename = "imgUUID")]
    img: ImgUuid,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionRef {
    #[serde(rename = "connectionID")]
    connection: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Connect {
    connection_params: Vec<Connection>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Disconnect {
    #[serde(rename = "connectionIDs")]
    ids: Vec<String>,
}

impl StorageRequest {
    pub fn parse(method: &str, p: Map<String, Value>) -> Result<StorageRequest, RpcError> {
        Ok(match method {
            "StoragePool.connectStorageServer" => StorageRequest::ConnectStorageServer {
                connections: params::<Connect>(method, p)?.connection_params,
            },
            "StoragePool.disconnectStorageServer" => StorageRequest::DisconnectStorageServer {
                ids: params::<Disconnect>(method, p)?.ids,
            },
            "StorageDomain.create" => StorageRequest::DomainCreate(params(method, p)?),
            "StorageDomain.getInfo" => StorageRequest::DomainGetInfo {
                sd: params::<Sd>(method, p)?.sd,
            },
            "StorageDomain.getStats" => StorageRequest::DomainGetStats {
                sd: params::<Sd>(method, p)?.sd,
            },
            "StorageDomain.format" => StorageRequest::DomainFormat {
                sd: params::<Sd>(method, p)?.sd,
            },
            "StorageDomain.getImages" => StorageRequest::DomainGetImages {
                sd: params::<Sd>(method, p)?.sd,
            },
            "Host.getStorageDomains" => StorageRequest::ConnectionGetDomains {
                connection: params::<ConnectionRef>(method, p)?.connection,
            },
            "Image.getVolumes" => {
                let i: ImgRef = params(method, p)?;
                StorageRequest::ImageGetVolumes { sd: i.sd, img: i.img }
            }
            "Volume.getInfo" => {
                let v: Vol = params(method, p)?;
                StorageRequest::VolumeGetInfo {
                    sd: v.sd,
                    img: v.img,
                    vol: v.vol,
                }
            }
            "Volume.readData" => {
                let r: ReadData = params(method, p)?;
                StorageRequest::VolumeReadData {
                    sd: r.sd,
                    img: r.img,
                    vol: r.vol,
                    offset: r.offset,
                    length: r.length,
                }
            }
            "Image.prepare" => {
                let i: Img = params(method, p)?;
                StorageRequest::ImagePrepare {
                    sd: i.sd,
                    img: i.img,
                    vol: i.vol,
                }
            }
            other => StorageRequest::Pool(PoolRequest::parse(other, p)?),
        })
    }
}

/// The local path of connection `id`, which must be connected.
fn connection_mount(svc: &StorageService, id: &str) -> Result<std::path::PathBuf, ApiError> {
    svc.connection_path(id).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotConnected,
            format!("storage connection {id:?} is not connected"),
        )
    })
}

impl From<StorageServiceError> for ApiError {
    fn from(e: StorageServiceError) -> ApiError {
        let code = match &e {
            StorageServiceError::DomainNotFound(_) => ErrorCode::StorageDomainNotFound,
            StorageServiceError::Connection { .. } => ErrorCode::NotConnected,
            StorageServiceError::Storage(s) => storage_code(s),
        };
        ApiError::new(code, error_chain(&e))
    }
}

impl From<oxvirt_storage::StorageError> for ApiError {
    fn from(e: oxvirt_storage::StorageError) -> ApiError {
        ApiError::new(storage_code(&e), error_chain(&e))
    }
}

fn storage_code(e: &oxvirt_storage::StorageError) -> ErrorCode {
    use oxvirt_storage::StorageError as E;
    match e {
        E::InvalidArgument { .. } => ErrorCode::InvalidParameter,
        E::NoImage { .. } => ErrorCode::ImageNotFound,
        E::NoVolume { .. } => ErrorCode::VolumeNotFound,
        E::NoDomain(_) | E::DomainUnavailable(_) => ErrorCode::StorageDomainNotFound,
        _ => ErrorCode::StorageError,
    }
}

/// The error and its sources, joined: the API's only chance to carry the cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("API types serialize")
}

/// Runs blocking storage I/O off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unexpected, format!("storage worker failed: {e}")))?
}

/// How a request, once it succeeded, changes what a restarted node reconnects to
/// (`storage::resume`); `None` for requests that change no connection.
pub fn resume_change(req: &StorageRequest) -> Option<Change> {
    Some(match req {
        StorageRequest::ConnectStorageServer { connections } => Change::Connected(connections.clone()),
        StorageRequest::DisconnectStorageServer { ids } => Change::Disconnected(ids.clone()),
        StorageRequest::Pool(PoolRequest::Connect(c)) => Change::PoolConnected(PoolConnection {
            pool: c.pool,
            host_id: c.host_id,
            master: c.master,
            master_version: c.master_version,
            io_timeout: c.io_timeout,
            fence_margin: c.fence_margin,
            max_host_id: c.max_host_id,
        }),
        StorageRequest::Pool(PoolRequest::Disconnect(p)) => Change::PoolDisconnected(p.pool),
        StorageRequest::Pool(PoolRequest::Refresh(r)) => Change::Master {
            pool: r.pool,
            master: r.master,
            version: r.master_version,
        },
        StorageRequest::Pool(PoolRequest::SwitchMaster(m)) => Change::Master {
            pool: m.pool,
            master: m.new_master,
            version: m.master_version,
        },
        _ => return None,
    })
}

pub async fn execute(
    svc: std::sync::Arc<StorageService>,
    pools: std::sync::Arc<PoolService>,
    req: StorageRequest,
) -> Result<Value, ApiError> {
    blocking(move || match req {
        StorageRequest::Pool(p) => execute_pool(&pools, p),
        StorageRequest::ConnectStorageServer { connections } => {
            Ok(json!({ "statuslist": to_json(&svc.connect(connections)) }))
        }
        StorageRequest::DisconnectStorageServer { ids } => {
            Ok(json!({ "statuslist": to_json(&svc.disconnect(&ids)) }))
        }
        StorageRequest::DomainCreate(c) => {
            let mount = connection_mount(&svc, &c.connection)?;
            let domain_type = match c.storage_type {
                ConnectionKind::Localfs => DomainType::LocalFs,
                ConnectionKind::Posixfs => DomainType::PosixFs,
                ConnectionKind::Nfs => DomainType::Nfs,
            };
            let remote_path = svc
                .connections()
                .into_iter()
                .find(|(k, _)| k.id == c.connection)
                .map(|(k, _)| k.path);
            let dom = oxvirt_storage::FileStorageDomain::create(
                &mount,
                &NewDomain {
                    sd: c.sd,
                    description: c.description,
                    domain_type,
                    remote_path,
                },
            )?;
            Ok(json!({ "sdUUID": dom.sd(), "path": dom.root() }))
        }
        StorageRequest::DomainGetInfo { sd } => {
            let dom = svc.domain(sd)?;
            let md = dom.metadata();
            Ok(json!({
                "uuid": md.sd,
                "version": md.version,
                "type": md.domain_type.as_str(),
                "class": format!("{:?}", md.class),
                "role": format!("{:?}", md.role),
                "name": md.description,
                "pool": md.pools,
                "remotePath": md.remote_path,
                "path": dom.root(),
            }))
        }
        StorageRequest::DomainGetStats { sd } => {
            let dom = svc.domain(sd)?;
            let stats = dom.stats()?;
            let health = dom.health();
            Ok(json!({
                "diskTotal": stats.disk_total,
                "diskFree": stats.disk_free,
                "images": stats.images,
                "volumes": stats.volumes,
                "valid": health.valid,
                "readDelaySecs": health.read_delay.as_secs_f64(),
                "error": health.error,
            }))
        }
        StorageRequest::DomainFormat { sd } => {
            svc.format_domain(sd)?;
            Ok(json!(true))
        }
        StorageRequest::DomainGetImages { sd } => Ok(to_json(&svc.domain(sd)?.images()?)),
        StorageRequest::ConnectionGetDomains { connection } => {
            let mount = connection_mount(&svc, &connection)?;
            let found = oxvirt_storage::FileStorageDomain::scan(&mount)?;
            Ok(json!(found.iter().map(|(sd, _)| sd).collect::<Vec<_>>()))
        }
        StorageRequest::ImageGetVolumes { sd, img } => Ok(json!(svc.domain(sd)?.chain(img)?.ids())),
        StorageRequest::VolumeGetInfo { sd, img, vol } => {
            Ok(to_json(&svc.domain(sd)?.volume_info(img, vol)?))
        }
        StorageRequest::VolumeReadData {
            sd,
            img,
            vol,
            offset,
            length,
        } => {
            use base64::Engine as _;
            if length > pool_verbs::DATA_CHUNK as u64 {
                return Err(ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!(
                        "a read returns at most {} bytes, not {length}",
                        pool_verbs::DATA_CHUNK
                    ),
                ));
            }
            let data = svc.domain(sd)?.read_volume_data(img, vol, offset, length)?;
            Ok(json!(base64::engine::general_purpose::STANDARD.encode(data)))
        }
        StorageRequest::ImagePrepare { sd, img, vol } => {
            let layers = svc.layers(sd, img, vol)?;
            Ok(json!({ "layers": to_json(&layers) }))
        }
    })
    .await
}
