//! The all-in-one setup behind `oxvirt up`: a `Default` data center and cluster (as oVirt
//! installs them) and a local storage domain, created once and found again on later runs.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::commands::{AddCluster, AddDataCenter, AddStorageDomain, CommandError};
use crate::daemon::Engine;
use crate::db::{HostFilter, ListQuery};
use crate::model::{ClusterId, DcId, HostStatus, SdType, SdUuid, StorageType};

pub const DEFAULT: &str = "Default";

/// The `Default` data center and cluster, created when missing.
pub async fn ensure_default(engine: &Engine) -> Result<(DcId, ClusterId), CommandError> {
    let db = &engine.app().db;
    let dc = match db.dc_get_by_name(DEFAULT).await? {
        Some(dc) => dc,
        None => {
            engine
                .cmds
                .add_data_center(AddDataCenter {
                    name: DEFAULT.into(),
                    description: "The default data center".into(),
                    local: false,
                })
                .await?
        }
    };
    let cl = match db.cluster_get_by_name(DEFAULT).await? {
        Some(cl) => cl,
        None => {
            engine
                .cmds
                .add_cluster(AddCluster {
                    name: DEFAULT.into(),
                    description: "The default cluster".into(),
                    data_center: dc.id,
                    cpu_type: None,
                    scheduling_policy: None,
                    memory_overcommit_percent: None,
                    scheduling_properties: Default::default(),
                    migration_bandwidth_mbps: None,
                    migration_encrypted: false,
                })
                .await?
        }
    };
    Ok((dc.id, cl.id))
}

/// Waits until `count` hosts are up.
pub async fn wait_hosts_up(engine: &Engine, count: usize, timeout: Duration) -> Result<(), CommandError> {
    let start = Instant::now();
    loop {
        let up = engine
            .app()
            .db
            .host_count(&HostFilter {
                status: vec![HostStatus::Up],
                ..Default::default()
            })
            .await? as usize;
        if up >= count {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(CommandError::Conflict(format!(
                "only {up} of {count} hosts are up after {timeout:?}"
            )));
        }
        engine.app().kick.notify_one();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A local storage domain named `name` in `dir`, attached to the data center and active.
pub async fn ensure_local_storage(
    engine: &Engine,
    dc: DcId,
    dir: &Path,
    name: &str,
    timeout: Duration,
) -> Result<SdUuid, CommandError> {
    let db = &engine.app().db;
    let sd = match db.sd_get_by_name(name).await? {
        Some(sd) => sd,
        None => {
            std::fs::create_dir_all(dir)
                .map_err(|e| CommandError::invalid(format!("cannot create {}: {e}", dir.display())))?;
            let host = db
                .host_list(&ListQuery {
                    filter: HostFilter {
                        status: vec![HostStatus::Up],
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .await?
                .into_iter()
                .next()
                .ok_or_else(|| CommandError::Conflict("no host is up to create the storage domain".into()))?;
            engine
                .cmds
                .add_storage_domain(
                    AddStorageDomain {
                        name: name.into(),
                        description: "Local storage of the all-in-one".into(),
                        domain_type: SdType::Data,
                        storage_type: StorageType::Localfs,
                        address: None,
                        path: dir.display().to_string(),
                        vfs_type: None,
                        mount_options: None,
                        host: host.id,
                    },
                    None,
                )
                .await?
        }
    };
    if db.pool_attachments(sd.id).await?.is_empty() {
        engine.cmds.attach_storage_domain(dc, sd.id, None).await?;
    }
    let start = Instant::now();
    while !served(engine, dc, sd.id).await {
        if start.elapsed() > timeout {
            return Err(CommandError::Conflict(format!(
                "data center {DEFAULT} is not served after {timeout:?}: no SPM that finds storage domain {name} valid"
            )));
        }
        engine.app().kick.notify_one();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    engine
        .cmds
        .wait_domain_active(dc, sd.id, timeout.saturating_sub(start.elapsed()))
        .await?;
    Ok(sd.id)
}

/// Whether the data center is served now: the host recorded as its SPM answers that it is, and
/// finds the domain valid. After a restart the records say what the last run saw, so they
/// alone do not tell.
async fn served(engine: &Engine, dc: DcId, sd: SdUuid) -> bool {
    let app = engine.app();
    let Ok(d) = app.dc(dc).await else {
        return false;
    };
    let Ok((_, spm)) = app.spm(&d).await else {
        return false;
    };
    let role = spm
        .call("StoragePool.getSpmStatus", json!({ "spUUID": d.storage_pool_id }))
        .await;
    if !role.is_ok_and(|r| r["spm_st"]["spmStatus"] == "SPM") {
        return false;
    }
    spm.call("StorageDomain.getStats", json!({ "sdUUID": sd }))
        .await
        .is_ok_and(|s| s["valid"] == true)
}
