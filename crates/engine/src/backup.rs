//! Engine backup and restore (oVirt's `engine-backup`): everything the engine keeps — its
//! database and its PKI (the CA every node trusts, the engine's own certificate) — in one tar
//! file, taken while the engine runs, and put back into a new data directory.
//!
//! The archive holds `oxvirt-backup.json` (the [`Manifest`]), `pki/…` and the database:
//! `db/engine.db` for SQLite, made with `VACUUM INTO` on a read-only connection (a consistent
//! snapshot however busy the engine is; WAL readers never block its writer), or
//! `db/engine.pgdump` for PostgreSQL, made by `pg_dump --format=custom` (one snapshot too).
//!
//! Invariants: a backup file appears whole or not at all (written beside its name, fsynced,
//! renamed, the directory fsynced) and is readable by its owner only (it holds the CA's key
//! and the password hashes). A restore writes into a hidden directory beside the target and
//! renames it into place, so a failure leaves no half-restored engine; it refuses a target that
//! holds an engine already, an archive entry outside `db/` and `pki/`, and a database newer
//! than this engine knows (an older one is migrated when the engine starts). A PostgreSQL
//! database is restored into the empty database (or schema) the URL names, in one transaction.
//!
//! After a restore the engine reconciles with what the nodes report, as after any restart:
//! VMs that run are found running, work done since the backup by the nodes is seen.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::db::{DbError, SCHEMA_VERSION, SQLITE_FILE};

const MANIFEST: &str = "oxvirt-backup.json";
const DB_SQLITE: &str = "db/engine.db";
const DB_PGDUMP: &str = "db/engine.pgdump";
const PKI: &str = "pki";
/// The archive layout's version.
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database")]
    Db(#[from] DbError),
    #[error("database copy into {}", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("{tool} failed: {stderr}")]
    Tool { tool: String, stderr: String },
    #[error("{tool} is not installed (Debian package postgresql-client)")]
    MissingTool { tool: &'static str },
    #[error("{0}")]
    Invalid(String),
}

impl BackupError {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
        let path = path.to_path_buf();
        move |source| BackupError::Io { what, path, source }
    }
}

type Result<T, E = BackupError> = std::result::Result<T, E>;

/// Which database a backup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbKind {
    Sqlite,
    Postgres,
}

/// What an archive holds, read before anything is restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The oxvirt version that made it.
    pub oxvirt: String,
    pub database: DbKind,
    /// The newest migration applied to the database.
    pub schema_version: i64,
    /// Milliseconds since the epoch.
    pub created_at: u64,
}

/// Where an engine keeps its state: the data directory (its PKI, and the SQLite database
/// unless `db_url` names a PostgreSQL one).
#[derive(Debug, Clone)]
pub struct EngineState {
    pub data_dir: PathBuf,
    pub db_url: Option<String>,
}

impl EngineState {
    fn kind(&self) -> Result<DbKind> {
        match self.db_url.as_deref() {
            None => Ok(DbKind::Sqlite),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => Ok(DbKind::Postgres),
            Some(u) => Err(BackupError::Invalid(format!(
                "database URL {} is neither PostgreSQL nor absent (SQLite in the data directory)",
                crate::db::redact(u)
            ))),
        }
    }
}

/// Backs up the engine's state into `file` (see the module docs); the engine may run.
pub async fn backup(state: &EngineState, file: &Path) -> Result<Manifest> {
    let kind = state.kind()?;
    let pki = state.data_dir.join(PKI);
    if !pki.join("ca.key").is_file() {
        return Err(BackupError::Invalid(format!(
            "{} holds no engine CA: is it the engine's data directory?",
            state.data_dir.display()
        )));
    }
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let scratch = tempfile::Builder::new()
        .prefix(".oxvirt-backup-")
        .tempdir_in(dir)
        .map_err(BackupError::io("make a scratch directory in", dir))?;
    let (db_file, db_entry, schema_version) = match kind {
        DbKind::Sqlite => {
            let src = state.data_dir.join(SQLITE_FILE);
            let copy = scratch.path().join("engine.db");
            let v = sqlite_snapshot(&src, &copy).await?;
            (copy, DB_SQLITE, v)
        }
        DbKind::Postgres => {
            let url = state.db_url.as_deref().expect("postgres has a URL");
            let copy = scratch.path().join("engine.pgdump");
            pg_dump(url, &copy).await?;
            let v = pg_schema_version(url).await?;
            (copy, DB_PGDUMP, v)
        }
    };
    let manifest = Manifest {
        format: FORMAT,
        oxvirt: env!("CARGO_PKG_VERSION").to_string(),
        database: kind,
        schema_version,
        created_at: crate::time::Clock::now(&crate::time::SystemClock).as_millis() as u64,
    };
    let tmp = scratch.path().join("backup.tar");
    write_archive(&tmp, &manifest, &db_file, db_entry, &pki)?;
    std::fs::rename(&tmp, file).map_err(BackupError::io("move the backup to", file))?;
    fsync_dir(dir)?;
    tracing::info!(file = %file.display(), database = ?kind, schema_version, "engine backed up");
    Ok(manifest)
}

/// A consistent copy of SQLite database `src` in `dst`; returns its schema version.
async fn sqlite_snapshot(src: &Path, dst: &Path) -> Result<i64> {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, Connection, Row};
    if !src.is_file() {
        return Err(BackupError::Invalid(format!(
            "no engine database at {}",
            src.display()
        )));
    }
    let err = |source| BackupError::Sqlite {
        path: dst.to_path_buf(),
        source,
    };
    let mut c = SqliteConnectOptions::new()
        .filename(src)
        .read_only(true)
        .connect()
        .await
        .map_err(err)?;
    sqlx::query("VACUUM INTO ?")
        .bind(dst.to_string_lossy().into_owned())
        .execute(&mut c)
        .await
        .map_err(err)?;
    c.close().await.ok();
    let mut copy = SqliteConnectOptions::new()
        .filename(dst)
        .read_only(true)
        .connect()
        .await
        .map_err(err)?;
    let check: String = sqlx::query("PRAGMA integrity_check")
        .fetch_one(&mut copy)
        .await
        .map_err(err)?
        .try_get(0)
        .map_err(err)?;
    if check != "ok" {
        return Err(BackupError::Invalid(format!(
            "the database copy is damaged: {check}"
        )));
    }
    let v: i64 = sqlx::query("SELECT MAX(version) FROM oxvirt_schema_migrations")
        .fetch_one(&mut copy)
        .await
        .map_err(err)?
        .try_get(0)
        .map_err(err)?;
    copy.close().await.ok();
    Ok(v)
}

fn write_archive(tmp: &Path, m: &Manifest, db: &Path, db_entry: &str, pki: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(BackupError::io("create", tmp))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(f));
    b.mode(tar::HeaderMode::Deterministic);
    let manifest = serde_json::to_vec_pretty(m).expect("a manifest serializes");
    let mut h = tar::Header::new_gnu();
    h.set_size(manifest.len() as u64);
    h.set_mode(0o600);
    h.set_cksum();
    b.append_data(&mut h, MANIFEST, manifest.as_slice())
        .map_err(BackupError::io("write", tmp))?;
    b.append_path_with_name(db, db_entry)
        .map_err(BackupError::io("write", tmp))?;
    b.append_dir_all(PKI, pki)
        .map_err(BackupError::io("add the PKI from", pki))?;
    let w = b.into_inner().map_err(BackupError::io("write", tmp))?;
    let f = w.into_inner().map_err(|e| BackupError::Io {
        what: "write",
        path: tmp.to_path_buf(),
        source: e.into_error(),
    })?;
    f.sync_all().map_err(BackupError::io("sync", tmp))
}

/// Reads the manifest of backup `file`.
pub fn manifest(file: &Path) -> Result<Manifest> {
    let f = std::fs::File::open(file).map_err(BackupError::io("open", file))?;
    let mut a = tar::Archive::new(f);
    for e in a.entries().map_err(BackupError::io("read", file))? {
        let mut e = e.map_err(BackupError::io("read", file))?;
        if e.path().map_err(BackupError::io("read", file))?.as_ref() == Path::new(MANIFEST) {
            let mut text = String::new();
            e.read_to_string(&mut text)
                .map_err(BackupError::io("read", file))?;
            return serde_json::from_str(&text)
                .map_err(|e| BackupError::Invalid(format!("{}: bad manifest: {e}", file.display())));
        }
    }
    Err(BackupError::Invalid(format!(
        "{} is no oxvirt engine backup (it has no {MANIFEST})",
        file.display()
    )))
}

/// Restores backup `file` into `target` (see the module docs).
pub async fn restore(file: &Path, target: &EngineState) -> Result<Manifest> {
    let m = manifest(file)?;
    if m.format != FORMAT {
        return Err(BackupError::Invalid(format!(
            "backup format {} is not {FORMAT}, the one this oxvirt reads",
            m.format
        )));
    }
    if m.schema_version > SCHEMA_VERSION {
        return Err(BackupError::Invalid(format!(
            "the backup's database is at schema version {}, newer than this oxvirt's {SCHEMA_VERSION}: \
             restore it with oxvirt {} or later",
            m.schema_version, m.oxvirt
        )));
    }
    let kind = target.kind()?;
    if kind != m.database {
        return Err(BackupError::Invalid(format!(
            "the backup holds a {:?} database and the target is {:?}: give --db-url for \
             PostgreSQL, none for SQLite",
            m.database, kind
        )));
    }
    let dir = &target.data_dir;
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(BackupError::io("list", dir))?;
        if entries.next().is_some() {
            return Err(BackupError::Invalid(format!(
                "{} is not empty: restore into a new data directory (the engine there stopped)",
                dir.display()
            )));
        }
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(BackupError::io("create", parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".oxvirt-restore-")
        .tempdir_in(parent)
        .map_err(BackupError::io("make a staging directory in", parent))?;
    unpack(file, staging.path())?;
    if kind == DbKind::Postgres {
        let url = target.db_url.as_deref().expect("postgres has a URL");
        let dump = staging.path().join(DB_PGDUMP);
        pg_restore(url, &dump).await?;
        std::fs::remove_dir_all(staging.path().join("db")).map_err(BackupError::io("clean", &dump))?;
    } else {
        let db = staging.path().join(DB_SQLITE);
        if !db.is_file() {
            return Err(BackupError::Invalid(format!(
                "{} holds no {DB_SQLITE}",
                file.display()
            )));
        }
        let to = staging.path().join(SQLITE_FILE);
        std::fs::rename(&db, &to).map_err(BackupError::io("move", &db))?;
        std::fs::remove_dir(staging.path().join("db")).map_err(BackupError::io("clean", &db))?;
    }
    if !staging.path().join(PKI).join("ca.key").is_file() {
        return Err(BackupError::Invalid(format!(
            "{} holds no engine CA",
            file.display()
        )));
    }
    let staged = staging.keep();
    if dir.exists() {
        std::fs::remove_dir(dir).map_err(BackupError::io("replace", dir))?;
    }
    std::fs::rename(&staged, dir).map_err(BackupError::io("move the restored engine to", dir))?;
    fsync_dir(parent)?;
    tracing::info!(file = %file.display(), data = %dir.display(), "engine restored");
    Ok(m)
}

/// Unpacks the archive's files into `to`, refusing entries outside `db/` and `pki/`. Keys
/// keep their owner-only mode; nothing is readable by others.
fn unpack(file: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let f = std::fs::File::open(file).map_err(BackupError::io("open", file))?;
    let mut a = tar::Archive::new(f);
    for e in a.entries().map_err(BackupError::io("read", file))? {
        let mut e = e.map_err(BackupError::io("read", file))?;
        let path = e.path().map_err(BackupError::io("read", file))?.into_owned();
        if path == Path::new(MANIFEST) {
            continue;
        }
        let inside = path.components().all(|c| matches!(c, Component::Normal(_)))
            && (path.starts_with("db") || path.starts_with(PKI));
        if !inside {
            return Err(BackupError::Invalid(format!(
                "{} has an entry {} outside db/ and pki/",
                file.display(),
                path.display()
            )));
        }
        let dst = to.join(&path);
        match e.header().entry_type() {
            tar::EntryType::Directory => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dst)
                .map_err(BackupError::io("create", &dst))?,
            tar::EntryType::Regular => {
                if let Some(p) = dst.parent() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(p)
                        .map_err(BackupError::io("create", p))?;
                }
                let mode = e.header().mode().unwrap_or(0o600) & 0o700;
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode.max(0o400))
                    .open(&dst)
                    .map_err(BackupError::io("create", &dst))?;
                std::io::copy(&mut e, &mut out).map_err(BackupError::io("write", &dst))?;
                out.flush().map_err(BackupError::io("write", &dst))?;
                out.sync_all().map_err(BackupError::io("sync", &dst))?;
            }
            other => {
                return Err(BackupError::Invalid(format!(
                    "{} has an entry {} of type {other:?}: only files and directories",
                    file.display(),
                    path.display()
                )))
            }
        }
    }
    Ok(())
}

/// A PostgreSQL URL split for libpq's tools: the URL without sqlx's
/// `options[search_path]=SCHEMA` parameter, and that schema.
fn libpq_url(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut schema = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("options[search_path]=") {
            Some(s) => {
                schema = Some(s.to_string());
                false
            }
            None => true,
        })
        .collect();
    if kept.is_empty() {
        (base.to_string(), schema)
    } else {
        (format!("{base}?{}", kept.join("&")), schema)
    }
}

async fn run_tool(tool: &'static str, args: Vec<std::ffi::OsString>) -> Result<()> {
    let out = tokio::process::Command::new(tool)
        .args(&args)
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BackupError::MissingTool { tool },
            _ => BackupError::Tool {
                tool: tool.into(),
                stderr: e.to_string(),
            },
        })?;
    if !out.status.success() {
        return Err(BackupError::Tool {
            tool: tool.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The newest migration applied to the PostgreSQL database at `url` (read only).
async fn pg_schema_version(url: &str) -> Result<i64> {
    use sqlx::{Connection, Row};
    sqlx::any::install_default_drivers();
    let err = |source| {
        BackupError::Db(DbError::Open {
            url: crate::db::redact(url),
            source,
        })
    };
    let mut c = sqlx::AnyConnection::connect(url).await.map_err(err)?;
    let v: i64 = sqlx::query("SELECT MAX(version) FROM oxvirt_schema_migrations")
        .fetch_one(&mut c)
        .await
        .map_err(err)?
        .try_get(0)
        .map_err(err)?;
    c.close().await.ok();
    Ok(v)
}

async fn pg_dump(url: &str, to: &Path) -> Result<()> {
    let (url, schema) = libpq_url(url);
    let mut args: Vec<std::ffi::OsString> = vec![
        "--format=custom".into(),
        "--no-owner".into(),
        "--no-privileges".into(),
        format!("--dbname={url}").into(),
        "--file".into(),
        to.into(),
    ];
    if let Some(s) = schema {
        args.push(format!("--schema={s}").into());
    }
    run_tool("pg_dump", args).await
}

async fn pg_restore(url: &str, dump: &Path) -> Result<()> {
    let (url, _) = libpq_url(url);
    let args: Vec<std::ffi::OsString> = vec![
        "--no-owner".into(),
        "--no-privileges".into(),
        "--exit-on-error".into(),
        "--single-transaction".into(),
        format!("--dbname={url}").into(),
        dump.into(),
    ];
    run_tool("pg_restore", args).await
}

fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(BackupError::io("sync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_urls_lose_the_sqlx_schema_option() {
        assert_eq!(
            libpq_url("postgres://u@h:5/db?options[search_path]=t_1"),
            ("postgres://u@h:5/db".to_string(), Some("t_1".to_string()))
        );
        assert_eq!(
            libpq_url("postgres://h/db?sslmode=disable&options[search_path]=s"),
            (
                "postgres://h/db?sslmode=disable".to_string(),
                Some("s".to_string())
            )
        );
        assert_eq!(
            libpq_url("postgres://h/db"),
            ("postgres://h/db".to_string(), None)
        );
    }
}
