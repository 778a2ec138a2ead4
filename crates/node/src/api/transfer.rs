//! Image transfer verbs, with VDSM's names: `NBD.start_server`, `NBD.stop_server`,
//! `Host.add_image_ticket`, `Host.get_image_ticket`, `Host.extend_image_ticket`,
//! `Host.remove_image_ticket` (see [`crate::imageio`]).

use serde::Deserialize;
use serde_json::{json, Map, Value};

use oxvirt_rpc::RpcError;
use oxvirt_types::api::ErrorCode;
use oxvirt_types::{ImgUuid, SdUuid, VolUuid};

use super::storage::error_chain;
use super::{params, ApiError};
use crate::imageio::{Ticket, TransferError, REMOVE_WAIT};
use crate::service::Node;

pub const VERBS: &[&str] = &[
    "NBD.start_server",
    "NBD.stop_server",
    "Host.add_image_ticket",
    "Host.get_image_ticket",
    "Host.extend_image_ticket",
    "Host.remove_image_ticket",
];

#[derive(Debug, Clone, PartialEq)]
pub enum TransferRequest {
    StartServer { id: String, config: NbdConfig },
    StopServer { id: String },
    AddTicket(Ticket),
    GetTicket { uuid: String },
    ExtendTicket { uuid: String, timeout: u64 },
    RemoveTicket { uuid: String },
}

/// What `NBD.start_server` exports.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    pub sd_id: SdUuid,
    pub img_id: ImgUuid,
    pub vol_id: VolUuid,
    #[serde(default)]
    pub readonly: bool,
    /// Export the guest data of the whole chain below the volume (VDSM's default); `false`
    /// is not offered: a lone qcow2 layer's holes would read as zeroes, not as its backing.
    #[serde(default = "yes")]
    pub backing_chain: bool,
    #[serde(default)]
    pub discard: bool,
    #[serde(default)]
    pub detect_zeroes: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartParams {
    server_id: String,
    config: NbdConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerId {
    server_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddParams {
    ticket: Ticket,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Uuid {
    uuid: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Extend {
    uuid: String,
    timeout: u64,
}

impl TransferRequest {
    pub fn parse(method: &str, p: Map<String, Value>) -> Result<TransferRequest, RpcError> {
        Ok(match method {
            "NBD.start_server" => {
                let s: StartParams = params(method, p)?;
                if !s.config.backing_chain {
                    return Err(RpcError::invalid_params(
                        "NBD.start_server: backing_chain=false is not offered (only whole-chain exports)",
                    ));
                }
                TransferRequest::StartServer {
                    id: s.server_id,
                    config: s.config,
                }
            }
            "NBD.stop_server" => TransferRequest::StopServer {
                id: params::<ServerId>(method, p)?.server_id,
            },
            "Host.add_image_ticket" => TransferRequest::AddTicket(params::<AddParams>(method, p)?.ticket),
            "Host.get_image_ticket" => TransferRequest::GetTicket {
                uuid: params::<Uuid>(method, p)?.uuid,
            },
            "Host.extend_image_ticket" => {
                let e: Extend = params(method, p)?;
                TransferRequest::ExtendTicket {
                    uuid: e.uuid,
                    timeout: e.timeout,
                }
            }
            "Host.remove_image_ticket" => TransferRequest::RemoveTicket {
                uuid: params::<Uuid>(method, p)?.uuid,
            },
            other => return Err(RpcError::method_not_found(other)),
        })
    }
}

impl From<TransferError> for ApiError {
    fn from(e: TransferError) -> ApiError {
        let code = match &e {
            TransferError::BadTicketId(_)
            | TransferError::BadUrl { .. }
            | TransferError::NoOps { .. }
            | TransferError::BadServerId(_) => ErrorCode::InvalidParameter,
            TransferError::Busy { .. } => ErrorCode::Busy,
            _ => ErrorCode::ImageTransfer,
        };
        ApiError::new(code, error_chain(&e))
    }
}

pub async fn execute(node: &Node, req: TransferRequest) -> Result<Value, ApiError> {
    let images = &node.images;
    Ok(match req {
        TransferRequest::StartServer { id, config } => {
            let layers = {
                let storage = node.storage.clone();
                let c = config.clone();
                tokio::task::spawn_blocking(move || storage.layers(c.sd_id, c.img_id, Some(c.vol_id)))
                    .await
                    .map_err(|e| {
                        ApiError::new(ErrorCode::Unexpected, format!("storage worker failed: {e}"))
                    })??
            };
            let top = layers.last().ok_or_else(|| {
                ApiError::new(
                    ErrorCode::VolumeNotFound,
                    format!("image {} has no volume {}", config.img_id, config.vol_id),
                )
            })?;
            let in_use = node.vms.lease_needs().iter().any(|n| {
                n.volumes
                    .iter()
                    .any(|v| v.sd == config.sd_id && v.vol == config.vol_id)
            });
            if !config.readonly && in_use {
                return Err(ApiError::new(
                    ErrorCode::VolumeLocked,
                    format!("volume {} is in use by a VM on this host", config.vol_id),
                ));
            }
            let direct = crate::api::vm::direct_io_supported(&top.path);
            let url = images
                .start_server(&id, &top.path, top.format, config.readonly, direct)
                .await?;
            json!({ "url": url })
        }
        TransferRequest::StopServer { id } => {
            images.stop_server(&id).await?;
            json!(true)
        }
        TransferRequest::AddTicket(t) => {
            images.add_ticket(t)?;
            json!({ "port": images.port() })
        }
        TransferRequest::GetTicket { uuid } => images.ticket_status(&uuid)?,
        TransferRequest::ExtendTicket { uuid, timeout } => {
            images.extend_ticket(&uuid, timeout)?;
            json!(true)
        }
        TransferRequest::RemoveTicket { uuid } => {
            images.remove_ticket(&uuid, REMOVE_WAIT).await?;
            json!(true)
        }
    })
}
