//! `oxvirt engine-backup` (oVirt's engine-backup) with real processes, on SQLite and on
//! PostgreSQL: a backup taken while the engine runs and takes requests, restored into a new
//! data directory after the old one is lost; the restored engine has what the backup saw and
//! nothing after it, the same CA (so its nodes trust it) and the same admin password. Refused
//! with a clear error and no change: restoring over an engine, a file that is no backup, a
//! backup of a directory that is no engine's.

use crate::common;
use crate::transfers::{engine_cfg, login, login_with_dc1_and_cl1, oxvirt};

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use oxvirt_engine::daemon::Engine;

/// `oxvirt engine-backup ARGS`: (success, stdout + stderr).
async fn engine_backup(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_oxvirt"))
        .arg("engine-backup")
        .args(args)
        .env_remove("OXVIRT_DB_URL")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn vm_names(work: &Path) -> Vec<String> {
    let (out, _) = oxvirt(work, &["vm", "list", "--output", "json"], true).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let mut names: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .filter_map(|x| x["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// The scenario on the database `db_url` names (SQLite in the data directory when `None`);
/// `lose_db` drops what the engine kept there, as a lost server would.
async fn backup_and_restore(db_url: Option<String>, lose_db: impl AsyncFnOnce()) {
    let base = tempfile::tempdir().unwrap();
    let (data, restored, work) = (
        base.path().join("engine"),
        base.path().join("restored"),
        base.path().join("work"),
    );
    std::fs::create_dir_all(&work).unwrap();
    let mut cfg = engine_cfg(&data);
    cfg.db_url = db_url.clone();
    let engine = Engine::start(cfg, Some(oxvirt_engine::rest::routes()))
        .await
        .unwrap();
    let fingerprint = engine.ca_fingerprint();
    login_with_dc1_and_cl1(&work, &data, &engine).await;
    oxvirt(&work, &["vm", "create", "before", "--cluster", "cl1"], true).await;

    // Taken while the engine runs, with requests going on meanwhile.
    let file = base.path().join("engine.backup");
    let mut args = vec![
        "--mode",
        "backup",
        "--file",
        file.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ];
    if let Some(u) = &db_url {
        args.extend(["--db-url", u.as_str()]);
    }
    let (busy, (ok, out)) = tokio::join!(oxvirt(&work, &["vm", "list"], true), engine_backup(&args));
    drop(busy);
    assert!(ok, "{out}");
    assert!(out.contains("schema version"), "{out}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup holds the CA's key: owner only");
    oxvirt(&work, &["vm", "create", "after", "--cluster", "cl1"], true).await;
    engine.shutdown().await;

    // The server is lost: its data directory and database.
    std::fs::remove_dir_all(&data).unwrap();
    lose_db().await;

    let mut args = vec![
        "--mode",
        "restore",
        "--file",
        file.to_str().unwrap(),
        "--data",
        restored.to_str().unwrap(),
    ];
    if let Some(u) = &db_url {
        args.extend(["--db-url", u.as_str()]);
    }
    let (ok, out) = engine_backup(&args).await;
    assert!(ok, "{out}");
    let key = std::fs::metadata(restored.join("pki/ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key & 0o077, 0, "the CA key stays owner only: {key:o}");
    // Over an engine: refused, nothing touched.
    let before = std::fs::read_dir(&restored).unwrap().count();
    let (ok, out) = engine_backup(&args).await;
    assert!(!ok && out.contains("not empty"), "{out}");
    assert_eq!(std::fs::read_dir(&restored).unwrap().count(), before);

    let mut cfg = engine_cfg(&restored);
    cfg.db_url = db_url.clone();
    // The password comes from the backup, not from the configuration.
    cfg.admin_password = None;
    let engine = Engine::start(cfg, Some(oxvirt_engine::rest::routes()))
        .await
        .unwrap();
    assert_eq!(engine.ca_fingerprint(), fingerprint, "the nodes' trust holds");
    // The same admin password logs in; what the backup saw is there, and only that.
    let work2 = base.path().join("work2");
    std::fs::create_dir_all(&work2).unwrap();
    login(&work2, &restored, &engine).await;
    assert_eq!(vm_names(&work2).await, vec!["before".to_string()]);
    oxvirt(&work2, &["vm", "create", "later", "--cluster", "cl1"], true).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_on_sqlite_is_backed_up_while_running_and_restored_elsewhere() {
    backup_and_restore(None, async || {}).await;

    // Not a backup, not an engine: clear errors, nothing made.
    let d = tempfile::tempdir().unwrap();
    let junk = d.path().join("junk");
    std::fs::write(&junk, b"not a tar").unwrap();
    let target = d.path().join("new");
    let (ok, out) = engine_backup(&[
        "--mode",
        "restore",
        "--file",
        junk.to_str().unwrap(),
        "--data",
        target.to_str().unwrap(),
    ])
    .await;
    assert!(!ok, "{out}");
    assert!(!target.exists(), "a failed restore leaves nothing");
    let out_file = d.path().join("b");
    let (ok, out) = engine_backup(&[
        "--mode",
        "backup",
        "--file",
        out_file.to_str().unwrap(),
        "--data",
        d.path().to_str().unwrap(),
    ])
    .await;
    assert!(!ok && out.contains("no engine CA"), "{out}");
    assert!(!out_file.exists());
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "no scratch left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_on_postgres_is_backed_up_while_running_and_restored_elsewhere() {
    let url = common::fresh_postgres_url().await;
    let lost = url.clone();
    backup_and_restore(Some(url), async move || {
        oxvirt_engine::db::testing::drop_postgres_schema(&lost)
            .await
            .unwrap();
    })
    .await;
}
