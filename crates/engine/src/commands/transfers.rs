//! Image transfers: uploading a disk's guest data from a client, or downloading it, through a
//! host (oVirt's `/imagetransfers`, which the SDK's examples, `ovirt_imageio.client` and
//! Ansible's `ovirt_disk` drive).
//!
//! The command validates and starts [`ImageTransferSaga`], and answers once the transfer is
//! recorded (`initializing`). The saga:
//!
//! ```text
//!  lock ─► record ─► export (host: NBD.start_server on the disk's leaf, or a disk snapshot's
//!                             volume for a snapshot download, with the chain below it)
//!       ─► ticket (host: Host.add_image_ticket) ─► serve (transfer_url; `transferring`)
//!       ─► wait (until finalize; polling the ticket: progress, inactivity, extension)
//!       ─► close (ticket removed, NBD server stopped) ─► verify ─► finish (`finished_success`)
//! ```
//!
//! A cancel (the user's, or the system's after `inactivity_timeout` idle seconds), a host that
//! lost the ticket, or any failed step unwinds it: the ticket and NBD server go, the phase ends
//! `finished_failure`, and — as in oVirt, where a cancelled upload "removes the partial image"
//! — a failed upload deletes the disk; a failed download only unlocks it. The saga's log makes
//! all of it resume after an engine crash (the `wait` step just polls again).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::app::App;
use crate::model::{
    DcId, DiskFormat, DiskId, DiskStatus, HostStatus, HostUuid, ImageTransfer, SdUuid, TransferDirection,
    TransferId, TransferPhase, VolUuid,
};
use crate::nodes::NodeClient;
use crate::saga::{SagaDef, StartOptions, Step, StepCtx, StepError};

use super::step_err;
use super::storage::{delete_image, disk_lock_step, forget_disk};
use super::{CommandError, Commands};

/// Seconds a ticket lives without being extended; the saga extends it on every poll, so only
/// an engine that stopped polling lets it lapse.
pub const TICKET_TIMEOUT: u64 = 300;
/// oVirt's default `inactivity_timeout`.
pub const DEFAULT_INACTIVITY: u64 = 60;
/// How often the saga asks the host about the ticket (progress, idleness, extension).
const POLL: Duration = Duration::from_secs(1);
/// How often it looks for a finalize or cancel in the database: a client waiting on finalize
/// waits at most this long for the saga to notice.
const PHASE_POLL: Duration = Duration::from_millis(100);
/// How long a failed upload waits for an SPM to delete its disk before the saga gives up
/// (stuck: an admin retries it).
const SPM_WAIT: Duration = Duration::from_secs(120);

/// What `POST /imagetransfers` asks for.
#[derive(Debug, Clone)]
pub struct AddImageTransfer {
    pub disk: DiskId,
    /// A disk snapshot (oVirt's: the id of the volume holding the disk's data as of a
    /// snapshot) to download instead of the disk's present; its disk is `disk`.
    pub snapshot: Option<VolUuid>,
    pub direction: TransferDirection,
    /// The host to go through; default: an up host of the disk's data center that reaches its
    /// domain (the SPM last).
    pub host: Option<HostUuid>,
    /// `raw` (the default): guest data through NBD, whatever the disk's format.
    pub format: Option<DiskFormat>,
    pub inactivity_timeout: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageTransferParams {
    pub transfer: TransferId,
    pub disk: DiskId,
    pub dc: DcId,
    pub sd: SdUuid,
    /// The disk's leaf: what an upload writes and a download reads (with the chain below).
    pub volume: VolUuid,
    pub size: u64,
    pub host: HostUuid,
    pub direction: TransferDirection,
    pub inactivity_timeout: u64,
}

async fn host_of(app: &App, host: HostUuid) -> Result<(crate::model::Host, NodeClient), StepError> {
    let h = app.host(host).await.map_err(step_err)?;
    let c = app.client(&h).map_err(step_err)?;
    Ok((h, c))
}

/// Ends a transfer that failed: `finished_failure` (unless it finished already), and for an
/// upload its disk deleted. Only a transfer that was recorded gets this far, so a failure
/// before `record` touches no disk.
async fn fail_transfer(
    app: &App,
    p: &ImageTransferParams,
    saga: crate::model::SagaId,
) -> Result<(), StepError> {
    let Some(t) = app.db.transfer_get(p.transfer).await? else {
        return Ok(());
    };
    if t.phase == TransferPhase::FinishedSuccess {
        return Ok(());
    }
    const UNFINISHED: &[TransferPhase] = &[
        TransferPhase::Initializing,
        TransferPhase::Transferring,
        TransferPhase::FinalizingSuccess,
        TransferPhase::CancelledUser,
        TransferPhase::CancelledSystem,
    ];
    app.db
        .transfer_set_phase(p.transfer, UNFINISHED, TransferPhase::FinalizingFailure, None)
        .await?;
    if p.direction == TransferDirection::Upload && app.db.disk_get(p.disk).await?.is_some() {
        // The SPM may be coming back (a node that restarted was both the transfer's host and
        // the SPM): wait for it rather than leave the saga stuck.
        let give_up = app.db.now().saturating_add(SPM_WAIT);
        loop {
            match delete_image(app, p.dc, p.sd, p.disk).await {
                Ok(()) => break,
                Err(e) if app.db.now() < give_up => {
                    tracing::info!(transfer = %p.transfer, error = %e, "failed upload: waiting to delete its disk");
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => return Err(e),
            }
        }
        forget_disk(&app.db, p.disk).await?;
        tracing::info!(transfer = %p.transfer, disk = %p.disk, "failed upload: disk removed");
    }
    // A cancel says why itself; any other failure is the failed step's error.
    let message = match t.message {
        Some(m) => m,
        None => app
            .db
            .saga_get(saga)
            .await?
            .and_then(|r| r.error)
            .unwrap_or_else(|| "the transfer failed".into()),
    };
    let mut from = UNFINISHED.to_vec();
    from.push(TransferPhase::FinalizingFailure);
    app.db
        .transfer_set_phase(p.transfer, &from, TransferPhase::FinishedFailure, Some(&message))
        .await?;
    Ok(())
}

/// Removes the ticket and stops the NBD server; with `strict`, a host that cannot be reached
/// fails the step (before `verify`, so nothing is written after it). Undos are lenient: a host
/// that went away took its tickets and `qemu-nbd` with it, and a live one lets the ticket
/// lapse after [`TICKET_TIMEOUT`].
async fn close(app: &App, p: &ImageTransferParams, strict: bool) -> Result<(), StepError> {
    let r = async {
        let (_, node) = host_of(app, p.host).await?;
        // The last count, for a client quicker than the saga's polls.
        if let Ok(st) = node
            .call("Host.get_image_ticket", json!({ "uuid": p.transfer }))
            .await
        {
            if let Some(n) = st["transferred"].as_u64() {
                app.db.transfer_progress(p.transfer, n, false).await?;
            }
        }
        node.call("Host.remove_image_ticket", json!({ "uuid": p.transfer }))
            .await
            .map_err(step_err)?;
        node.call("NBD.stop_server", json!({ "server_id": p.transfer }))
            .await
            .map_err(step_err)?;
        Ok::<_, StepError>(())
    }
    .await;
    match r {
        Err(e) if !strict => {
            tracing::warn!(transfer = %p.transfer, host = %p.host, error = %e, "cannot clean up the transfer on its host");
            Ok(())
        }
        r => r,
    }
}

/// The system cancels a transfer that is serving, saying why (the next look at the phase
/// fails the `wait` step with it).
async fn cancel_by_system(app: &App, p: &ImageTransferParams, why: &str) -> Result<(), StepError> {
    app.db
        .transfer_set_phase(
            p.transfer,
            &[TransferPhase::Transferring],
            TransferPhase::CancelledSystem,
            Some(why),
        )
        .await?;
    Ok(())
}

/// Polls the transfer until it is finalized; fails it on a cancel, on inactivity, or when the
/// host lost the ticket.
async fn wait_for_client(app: &App, p: &ImageTransferParams) -> Result<(), StepError> {
    // On the engine's clock (injected in tests), as every deadline of the engine.
    let mut unreachable_since: Option<crate::time::Timestamp> = None;
    let mut last_poll: Option<std::time::Instant> = None;
    loop {
        let t = app
            .db
            .transfer_get(p.transfer)
            .await?
            .ok_or_else(|| step_err(format!("image transfer {} is gone", p.transfer)))?;
        match t.phase {
            TransferPhase::FinalizingSuccess => return Ok(()),
            TransferPhase::Transferring => {}
            TransferPhase::CancelledUser => return Err(step_err("cancelled by the user")),
            TransferPhase::CancelledSystem => {
                return Err(step_err(
                    t.message.unwrap_or_else(|| "cancelled by the system".into()),
                ))
            }
            other => return Err(step_err(format!("image transfer {} is {other}", p.transfer))),
        }
        if last_poll.is_some_and(|l| l.elapsed() < POLL) {
            tokio::time::sleep(PHASE_POLL).await;
            continue;
        }
        last_poll = Some(std::time::Instant::now());
        // The ticket's state, or the error's code (when the host answered) and text.
        let status = match host_of(app, p.host).await {
            Ok((_, node)) => {
                let st = node
                    .call("Host.get_image_ticket", json!({ "uuid": p.transfer }))
                    .await
                    .map_err(|e| (e.code(), e.to_string()));
                if st.is_ok() {
                    let _ = node
                        .call(
                            "Host.extend_image_ticket",
                            json!({ "uuid": p.transfer, "timeout": TICKET_TIMEOUT }),
                        )
                        .await;
                }
                st
            }
            Err(e) => Err((None, e.to_string())),
        };
        match status {
            Ok(st) => {
                unreachable_since = None;
                let transferred = st["transferred"].as_u64().unwrap_or(t.transferred);
                let active = st["active"].as_bool().unwrap_or(false);
                if transferred != t.transferred || active != t.active {
                    app.db.transfer_progress(p.transfer, transferred, active).await?;
                }
                let idle = st["idle_time"].as_u64().unwrap_or(0);
                if !active && idle >= p.inactivity_timeout {
                    let msg = format!(
                        "no request for {idle} s (inactivity_timeout {} s)",
                        p.inactivity_timeout
                    );
                    cancel_by_system(app, p, &msg).await?;
                    continue;
                }
            }
            Err((Some(code), e)) if code == oxvirt_types::api::ErrorCode::ImageTransfer.code() => {
                let msg = format!("host {} lost the transfer's ticket (restarted?): {e}", p.host);
                cancel_by_system(app, p, &msg).await?;
                continue;
            }
            Err((_, e)) => {
                let now = app.db.now();
                let since = *unreachable_since.get_or_insert(now);
                let secs = (now.as_millis() - since.as_millis()).max(0) as u64 / 1000;
                if secs >= p.inactivity_timeout {
                    let msg = format!("host {} unreachable for {secs} s: {e}", p.host);
                    cancel_by_system(app, p, &msg).await?;
                    continue;
                }
            }
        }
        tokio::time::sleep(PHASE_POLL).await;
    }
}

pub struct ImageTransferSaga;

impl SagaDef for ImageTransferSaga {
    type Ctx = App;
    type Params = ImageTransferParams;
    const NAME: &'static str = "image_transfer";

    fn description(p: &Self::Params) -> String {
        let verb = match p.direction {
            TransferDirection::Upload => "Uploading",
            TransferDirection::Download => "Downloading",
        };
        format!("{verb} disk {} through host {}", p.disk, p.host)
    }

    fn steps() -> Vec<Step<Self>> {
        vec![
            disk_lock_step(|p: &Self::Params| p.disk).describe("Locking the disk"),
            Step::new(
                "record",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    if c.db().transfer_get(p.transfer).await?.is_none() {
                        let now = c.db().now();
                        c.db()
                            .transfer_insert(&ImageTransfer {
                                id: p.transfer,
                                disk_id: p.disk,
                                host_id: p.host,
                                direction: p.direction,
                                format: DiskFormat::Raw,
                                phase: TransferPhase::Initializing,
                                transfer_url: None,
                                inactivity_timeout: p.inactivity_timeout,
                                transferred: 0,
                                active: false,
                                message: None,
                                saga_id: Some(c.saga_id),
                                created_at: now,
                                updated_at: now,
                            })
                            .await?;
                    }
                    Ok(())
                },
                |c: StepCtx<Self>| async move { fail_transfer(c.app(), c.params(), c.saga_id).await },
            )
            .describe("Recording the transfer"),
            Step::new(
                "export",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let (_, node) = host_of(c.app(), p.host).await?;
                    let r = node
                        .call(
                            "NBD.start_server",
                            json!({
                                "server_id": p.transfer,
                                "config": {
                                    "sd_id": p.sd, "img_id": p.disk, "vol_id": p.volume,
                                    "readonly": p.direction == TransferDirection::Download,
                                },
                            }),
                        )
                        .await
                        .map_err(step_err)?;
                    let url = r["url"]
                        .as_str()
                        .ok_or_else(|| step_err(format!("NBD.start_server answered {r}")))?;
                    Ok(url.to_string())
                },
                |c: StepCtx<Self>| async move { close(c.app(), c.params(), false).await },
            )
            .describe("Exporting the disk on the host"),
            Step::new(
                "ticket",
                |c: StepCtx<Self>| async move {
                    let p = c.params();
                    let url: String = c.output("export")?;
                    let (_, node) = host_of(c.app(), p.host).await?;
                    let ops = match p.direction {
                        TransferDirection::Upload => json!(["write"]),
                        TransferDirection::Download => json!(["read"]),
                    };
                    let r = node
                        .call(
                            "Host.add_image_ticket",
                            json!({ "ticket": {
                                "uuid": p.transfer, "size": p.size, "url": url, "ops": ops,
                                "timeout": TICKET_TIMEOUT, "sparse": true,
                                "transfer_id": p.transfer, "inactivity_timeout": p.inactivity_timeout,
                            }}),
                        )
                        .await
                        .map_err(step_err)?;
                    r["port"]
                        .as_u64()
                        .filter(|p| (1..=65535).contains(p))
                        .ok_or_else(|| step_err(format!("the host serves no transfers (answered {r})")))
                },
                |c: StepCtx<Self>| async move { close(c.app(), c.params(), false).await },
            )
            .describe("Adding the transfer's ticket on the host"),
            Step::without_undo("serve", |c: StepCtx<Self>| async move {
                let p = c.params();
                let port: u64 = c.output("ticket")?;
                let (h, _) = host_of(c.app(), p.host).await?;
                let addr = match h.address.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V6(a)) => format!("[{a}]"),
                    _ => h.address.clone(),
                };
                let url = format!("https://{addr}:{port}/images/{}", p.transfer);
                if !c.db().transfer_serving(p.transfer, &url).await? {
                    let t = c.db().transfer_get(p.transfer).await?;
                    if t.as_ref().map(|t| t.phase) != Some(TransferPhase::Transferring) {
                        return Err(step_err(format!(
                            "image transfer {} is {} before it started",
                            p.transfer,
                            t.map(|t| t.phase.as_str()).unwrap_or("gone")
                        )));
                    }
                }
                Ok(())
            })
            .describe("Serving the transfer"),
            Step::without_undo("wait", |c: StepCtx<Self>| async move {
                wait_for_client(c.app(), c.params()).await
            })
            .describe("Waiting for the client to transfer the data and finalize"),
            Step::without_undo("close", |c: StepCtx<Self>| async move {
                close(c.app(), c.params(), true).await
            })
            .describe("Closing the transfer on the host"),
            Step::without_undo("verify", |c: StepCtx<Self>| async move {
                let p = c.params();
                if p.direction == TransferDirection::Download {
                    return Ok(());
                }
                let (_, node) = host_of(c.app(), p.host).await?;
                let info = node
                    .call(
                        "Volume.getInfo",
                        json!({ "sdUUID": p.sd, "imgUUID": p.disk, "volUUID": p.volume }),
                    )
                    .await
                    .map_err(step_err)?;
                if let Some(size) = info["true_size"].as_u64() {
                    c.db().disk_set_actual_size(p.disk, size).await?;
                }
                Ok(())
            })
            .describe("Checking the uploaded volume"),
            Step::without_undo("finish", |c: StepCtx<Self>| async move {
                let p = c.params();
                c.db().disk_unlock(p.disk, c.saga_id, DiskStatus::Ok).await?;
                c.db()
                    .transfer_set_phase(
                        p.transfer,
                        &[TransferPhase::FinalizingSuccess],
                        TransferPhase::FinishedSuccess,
                        None,
                    )
                    .await?;
                Ok(())
            })
            .point_of_no_return()
            .describe("Unlocking the disk"),
        ]
    }
}

impl Commands {
    /// Starts an upload or download of a disk whose VMs are down; answers the transfer as
    /// recorded (`initializing`), while the saga goes on to serve it.
    pub async fn add_image_transfer(
        &self,
        req: AddImageTransfer,
        correlation_id: Option<String>,
    ) -> Result<ImageTransfer, CommandError> {
        match req.format {
            None | Some(DiskFormat::Raw) => {}
            Some(DiskFormat::Cow) => {
                return Err(CommandError::invalid(
                    "image transfers carry guest data (format raw, through NBD, as the SDK's examples and Ansible ask); format cow (an image file's bytes as they are) is refused",
                ))
            }
        }
        let inactivity_timeout = req.inactivity_timeout.unwrap_or(DEFAULT_INACTIVITY);
        if !(1..=86_400).contains(&inactivity_timeout) {
            return Err(CommandError::invalid(format!(
                "inactivity_timeout must be 1..86400 seconds, not {inactivity_timeout}"
            )));
        }
        let d0 = self
            .app
            .db
            .disk_get(req.disk)
            .await?
            .ok_or_else(|| CommandError::not_found("disk", req.disk))?;
        let chain = self.app.db.volume_chain(d0.id).await?;
        let leaf = chain
            .last()
            .map(|v| v.id)
            .ok_or_else(|| CommandError::Conflict(format!("disk {} has no volumes", d0.name)))?;
        // A disk snapshot is read while the VM may run: its volume is one the VM no longer
        // writes. The present (the leaf) only moves with the disk's VMs down.
        let (d, dc, volume) = match req.snapshot {
            Some(vol) => {
                if req.direction != TransferDirection::Download {
                    return Err(CommandError::invalid(
                        "a disk snapshot is downloaded, never uploaded: upload into a disk",
                    ));
                }
                if !chain.iter().any(|v| v.id == vol) {
                    return Err(CommandError::not_found("disk snapshot", vol));
                }
                if vol == leaf {
                    return Err(CommandError::invalid(format!(
                        "{vol} is the present of disk {}, not a snapshot of it: transfer the disk",
                        d0.name
                    )));
                }
                if d0.status != DiskStatus::Ok {
                    return Err(CommandError::Conflict(format!(
                        "disk {} is {}",
                        d0.name, d0.status
                    )));
                }
                let dc = self.domain_dc(d0.storage_domain_id).await?;
                (d0, dc, vol)
            }
            None => {
                let (d, _, dc, _) = self
                    .disk_transfer_check(req.disk, d0.storage_domain_id, "is transferred on", false)
                    .await?;
                (d, dc, leaf)
            }
        };
        let host = match req.host {
            Some(h) => {
                let host = self.app.host(h).await?;
                let hosts = self.app.dc_hosts(dc.id, false).await?;
                if !hosts.iter().any(|x| x.id == h) {
                    return Err(CommandError::Conflict(format!(
                        "host {} is not in data center {}, where disk {} is",
                        host.name, dc.name, d.name
                    )));
                }
                if host.status != HostStatus::Up {
                    return Err(CommandError::Conflict(format!(
                        "host {} is {}: transfers go through an up host",
                        host.name, host.status
                    )));
                }
                h
            }
            None => {
                let mut hosts = self.app.dc_hosts(dc.id, true).await?;
                // Spare the SPM, which has the pool's metadata work to do.
                hosts.sort_by_key(|h| (h.spm_status == crate::model::SpmStatus::Spm, h.name.clone()));
                hosts
                    .into_iter()
                    .find(|h| self.app.host_rt(h.id).domains.contains(&d.storage_domain_id))
                    .map(|h| h.id)
                    .ok_or_else(|| {
                        CommandError::Conflict(format!(
                            "no up host of data center {} reaches the storage domain of disk {}",
                            dc.name, d.name
                        ))
                    })?
            }
        };
        let params = ImageTransferParams {
            transfer: TransferId::new_random(),
            disk: d.id,
            dc: dc.id,
            sd: d.storage_domain_id,
            volume,
            size: d.provisioned_size,
            host,
            direction: req.direction,
            inactivity_timeout,
        };
        let id = params.transfer;
        let verb = match req.direction {
            TransferDirection::Upload => "Uploading",
            TransferDirection::Download => "Downloading",
        };
        let what = format!("{verb} disk {}", d.name);
        let mut handle = self
            .sagas
            .start::<ImageTransferSaga>(
                params,
                StartOptions {
                    correlation_id,
                    description: Some(what.clone()),
                },
            )
            .await?;
        let recorded = handle.steps_done(2).await;
        if !recorded || handle.is_finished() && self.app.db.transfer_get(id).await?.is_none() {
            return match super::outcome(what, handle).await {
                Err(e) => Err(e),
                Ok(_) => Err(CommandError::Conflict(format!(
                    "image transfer {id} ended at once"
                ))),
            };
        }
        tokio::spawn(async move {
            let _ = handle.wait().await;
        });
        self.app
            .db
            .transfer_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("image transfer", id))
    }

    /// Asks the transfer's saga to finish: the client is done. Finalizing twice is fine.
    pub async fn finalize_image_transfer(&self, id: TransferId) -> Result<ImageTransfer, CommandError> {
        self.ask_transfer(id, TransferPhase::FinalizingSuccess, None)
            .await
    }

    /// Asks the transfer's saga to stop and roll back (an upload's disk is removed).
    pub async fn cancel_image_transfer(&self, id: TransferId) -> Result<ImageTransfer, CommandError> {
        self.ask_transfer(id, TransferPhase::CancelledUser, Some("cancelled by the user"))
            .await
    }

    async fn ask_transfer(
        &self,
        id: TransferId,
        to: TransferPhase,
        message: Option<&str>,
    ) -> Result<ImageTransfer, CommandError> {
        let from: &[TransferPhase] = match to {
            TransferPhase::FinalizingSuccess => &[TransferPhase::Transferring],
            _ => &[TransferPhase::Initializing, TransferPhase::Transferring],
        };
        if !self.app.db.transfer_set_phase(id, from, to, message).await? {
            let t = self
                .app
                .db
                .transfer_get(id)
                .await?
                .ok_or_else(|| CommandError::not_found("image transfer", id))?;
            let done = to == TransferPhase::FinalizingSuccess && t.phase == TransferPhase::FinishedSuccess;
            if !done {
                return Err(CommandError::Conflict(format!(
                    "image transfer {id} is {}: it cannot be {}",
                    t.phase,
                    if to == TransferPhase::FinalizingSuccess {
                        "finalized"
                    } else {
                        "cancelled"
                    }
                )));
            }
        }
        self.app
            .db
            .transfer_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("image transfer", id))
    }
}
