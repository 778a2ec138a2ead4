//! Image transfers (uploads and downloads of disks).
//!
//! The phase changes by compare-and-set: the REST actions ask (`transferring` → `finalizing_*`
//! or `cancelled_*`) and the transfer's saga answers; neither overwrites the other.

use sqlx::any::AnyRow;

use crate::db::sql::{u2i, Arg, RowExt, Sql};
use crate::db::{Conn, DbError};
use crate::model::*;

const COLS: &str = "id, disk_id, host_id, direction, format, phase, transfer_url, inactivity_timeout, \
    transferred, active, message, saga_id, created_at, updated_at";

fn from_row(r: &AnyRow) -> Result<ImageTransfer, DbError> {
    Ok(ImageTransfer {
        id: r.parse("id")?,
        disk_id: r.parse("disk_id")?,
        host_id: r.parse("host_id")?,
        direction: r.parse("direction")?,
        format: r.parse("format")?,
        phase: r.parse("phase")?,
        transfer_url: r.opt_text("transfer_url")?,
        inactivity_timeout: r.uint("inactivity_timeout")?,
        transferred: r.uint("transferred")?,
        active: r.flag("active")?,
        message: r.opt_text("message")?,
        saga_id: r.opt_parse("saga_id")?,
        created_at: r.ts("created_at")?,
        updated_at: r.ts("updated_at")?,
    })
}

async fn transfer_insert(c: &mut Conn<'_>, t: &ImageTransfer) -> Result<(), DbError> {
    let mut q = Sql::new(&format!("INSERT INTO image_transfers ({COLS}) VALUES ("));
    q.arg(t.id.to_string())
        .push(", ")
        .arg(t.disk_id.to_string())
        .push(", ")
        .arg(t.host_id.to_string())
        .push(", ")
        .arg(t.direction.as_str())
        .push(", ")
        .arg(t.format.as_str())
        .push(", ")
        .arg(t.phase.as_str())
        .push(", ")
        .arg(Arg::Text(t.transfer_url.clone()))
        .push(", ")
        .arg(u2i("inactivity timeout", t.inactivity_timeout)?)
        .push(", ")
        .arg(u2i("transferred", t.transferred)?)
        .push(", ")
        .arg(i64::from(t.active))
        .push(", ")
        .arg(Arg::Text(t.message.clone()))
        .push(", ")
        .arg(Arg::Text(t.saga_id.map(|s| s.to_string())))
        .push(", ")
        .arg(c.now.as_millis())
        .push(", ")
        .arg(c.now.as_millis())
        .push(")");
    c.exec_as(&q, "image transfer", t.id).await?;
    Ok(())
}

async fn transfer_get(c: &mut Conn<'_>, id: TransferId) -> Result<Option<ImageTransfer>, DbError> {
    let mut q = Sql::new(&format!("SELECT {COLS} FROM image_transfers WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(from_row).transpose()
}

/// Every transfer, oldest first.
async fn transfer_list(c: &mut Conn<'_>) -> Result<Vec<ImageTransfer>, DbError> {
    let q = Sql::new(&format!(
        "SELECT {COLS} FROM image_transfers ORDER BY created_at, id"
    ));
    c.all(&q).await?.iter().map(from_row).collect()
}

/// Moves the phase to `to` if it is one of `from` (with `message`, when given); answers
/// whether it moved. Already in `to` counts as moved (steps repeat after a crash).
async fn transfer_set_phase(
    c: &mut Conn<'_>,
    id: TransferId,
    from: &[TransferPhase],
    to: TransferPhase,
    message: Option<&str>,
) -> Result<bool, DbError> {
    let mut q = Sql::new("UPDATE image_transfers SET phase = ");
    q.arg(to.as_str()).push(", updated_at = ").arg(c.now.as_millis());
    if let Some(m) = message {
        q.push(", message = ").arg(m);
    }
    q.push(" WHERE id = ").arg(id.to_string()).push(" AND phase IN (");
    for (i, p) in from.iter().chain([&to]).enumerate() {
        if i > 0 {
            q.push(", ");
        }
        q.arg(p.as_str());
    }
    q.push(")");
    if c.exec(&q).await? > 0 {
        return Ok(true);
    }
    match transfer_get(c, id).await? {
        None => Err(DbError::not_found("image transfer", id)),
        Some(_) => Ok(false),
    }
}

/// Records where the host serves the transfer and starts it (`initializing` → `transferring`).
async fn transfer_serving(c: &mut Conn<'_>, id: TransferId, url: &str) -> Result<bool, DbError> {
    let mut q = Sql::new("UPDATE image_transfers SET transfer_url = ");
    q.arg(url)
        .push(", phase = 'transferring', updated_at = ")
        .arg(c.now.as_millis())
        .push(" WHERE id = ")
        .arg(id.to_string())
        .push(" AND phase = 'initializing'");
    Ok(c.exec(&q).await? > 0)
}

async fn transfer_progress(
    c: &mut Conn<'_>,
    id: TransferId,
    transferred: u64,
    active: bool,
) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE image_transfers SET transferred = ");
    q.arg(u2i("transferred", transferred)?)
        .push(", active = ")
        .arg(i64::from(active))
        .push(", updated_at = ")
        .arg(c.now.as_millis())
        .push(" WHERE id = ")
        .arg(id.to_string());
    c.exec(&q).await?;
    Ok(())
}

repo! {
    write transfer_insert(t: &ImageTransfer) -> () = transfer_insert;
    read transfer_get(id: TransferId) -> Option<ImageTransfer> = transfer_get;
    read transfer_list() -> Vec<ImageTransfer> = transfer_list;
    /// Compare-and-set of the phase (see the module docs).
    write transfer_set_phase(id: TransferId, from: &[TransferPhase], to: TransferPhase, message: Option<&str>) -> bool = transfer_set_phase;
    write transfer_serving(id: TransferId, url: &str) -> bool = transfer_serving;
    write transfer_progress(id: TransferId, transferred: u64, active: bool) -> () = transfer_progress;
}
