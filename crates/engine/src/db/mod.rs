//! The engine's database: the only place engine state lives.
//!
//! [`Db`] is a cheap, clonable handle over a connection pool to SQLite (a file in the data
//! directory, the default) or PostgreSQL (given a `postgres://` URL). Both go through sqlx's
//! `Any` driver with runtime queries in the portable SQL subset both understand (`$n`
//! placeholders, `RETURNING`, partial indexes), so there is one code path; the few differences
//! (auto-increment keys, case-sensitive wildcard matching) are confined to [`Backend`] helpers.
//!
//! Repository functions exist twice with the same name: on [`Db`] (each call is its own
//! transaction; reads go to the read pool) and on [`Tx`] (several calls that commit or roll back
//! together). They are generated from one implementation by the `repo!` macro.
//!
//! Invariants:
//! - The schema is exactly the embedded migrations, applied in order and recorded in
//!   `oxvirt_schema_migrations` with their checksums; opening a database applies the missing ones
//!   and refuses one that is newer than this engine or whose applied migrations were edited.
//! - On SQLite, every write goes through the single writer connection (WAL journal), so a write
//!   transaction never meets another writer mid-way (no `SQLITE_BUSY` upgrade deadlocks); reads
//!   use a separate pool and see the last committed state.
//! - Rows that two commands may race on carry a `revision`; updates are compare-and-set on it
//!   (or on the expected status) and fail with [`DbError::Conflict`] instead of overwriting.
//! - Nothing is cached in memory: a second engine process on the same database sees the same
//!   state (after a crash, the database is all there is).

mod migrate;
pub(crate) mod sql;

pub mod list;
pub(crate) mod repo;

/// Test support: a fresh, empty PostgreSQL schema to run an engine on.
pub mod testing {
    use sqlx::Connection;

    /// Makes a new schema on the server at `base` and returns the URL of a database whose
    /// search path is that schema (an engine opened on it starts empty).
    pub async fn fresh_postgres_schema(base: &str) -> Result<String, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut c = sqlx::AnyConnection::connect(base).await?;
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut c)
            .await?;
        c.close().await.ok();
        let sep = if base.contains('?') { '&' } else { '?' };
        Ok(format!("{base}{sep}options[search_path]={schema}"))
    }

    /// Drops the schema a URL from [`fresh_postgres_schema`] names, with all it holds (a lost
    /// database, for restore tests).
    pub async fn drop_postgres_schema(url: &str) -> Result<(), sqlx::Error> {
        let (base, schema) = url
            .split_once("options[search_path]=")
            .ok_or_else(|| sqlx::Error::Configuration(format!("{url} names no schema").into()))?;
        let base = base.trim_end_matches(['?', '&']);
        sqlx::any::install_default_drivers();
        let mut c = sqlx::AnyConnection::connect(base).await?;
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut c)
            .await?;
        c.close().await.ok();
        Ok(())
    }
}

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::any::AnyPoolOptions;
use sqlx::AnyConnection;
use sqlx::{Any, AnyPool, Executor};

use crate::time::{Clock, SystemClock, Timestamp};

pub use list::{ListQuery, Ref, SortDir, TextMatch};
pub use migrate::{MIGRATIONS, SCHEMA_VERSION};
pub use repo::*;

/// Which database server the engine is using.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// What failed in the database layer, and with which object.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open database {url}")]
    Open {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("unsupported database URL {0:?}: use a file path, sqlite://PATH or postgres://...")]
    BadUrl(String),
    #[error("migration {version} ({name}) failed")]
    Migration {
        version: i64,
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("migration {version} ({name}) was edited after it was applied (recorded checksum {recorded}, embedded {embedded})")]
    MigrationChanged {
        version: i64,
        name: &'static str,
        recorded: String,
        embedded: String,
    },
    #[error("database schema version {found} is newer than this engine's ({known}): upgrade the engine")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} {key} already exists")]
    AlreadyExists { kind: &'static str, key: String },
    #[error("{kind} {id} is in use ({detail})")]
    InUse {
        kind: &'static str,
        id: String,
        detail: String,
    },
    #[error("{kind} {id} was changed concurrently: {detail}")]
    Conflict {
        kind: &'static str,
        id: String,
        detail: String,
    },
    #[error("{kind} refers to an object that does not exist ({detail})")]
    MissingReference { kind: &'static str, detail: String },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("corrupt value in column {column}: {detail}")]
    Corrupt { column: String, detail: String },
    #[error("no free {what}")]
    Exhausted { what: &'static str },
    #[error("database {op} failed")]
    Sql {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("password hashing failed: {0}")]
    Password(String),
}

impl DbError {
    pub(crate) fn sql(op: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
        move |source| DbError::Sql { op, source }
    }

    pub(crate) fn not_found(kind: &'static str, id: impl ToString) -> DbError {
        DbError::NotFound {
            kind,
            id: id.to_string(),
        }
    }

    /// Maps constraint violations of an insert or update to the errors a caller can act on.
    pub(crate) fn on_write(kind: &'static str, key: impl ToString) -> impl FnOnce(sqlx::Error) -> DbError {
        move |e| match constraint_kind(&e) {
            Some(sqlx::error::ErrorKind::UniqueViolation) => DbError::AlreadyExists {
                kind,
                key: key.to_string(),
            },
            Some(sqlx::error::ErrorKind::ForeignKeyViolation) => DbError::MissingReference {
                kind,
                detail: format!("{} {}", kind, key.to_string()),
            },
            Some(sqlx::error::ErrorKind::CheckViolation) => DbError::Invalid {
                what: kind,
                detail: format!("{} violates a constraint", key.to_string()),
            },
            _ => DbError::Sql {
                op: "write",
                source: e,
            },
        }
    }

    /// Maps a foreign-key violation of a delete to [`DbError::InUse`].
    pub(crate) fn on_delete(kind: &'static str, id: impl ToString) -> impl FnOnce(sqlx::Error) -> DbError {
        move |e| match constraint_kind(&e) {
            Some(sqlx::error::ErrorKind::ForeignKeyViolation) => DbError::InUse {
                kind,
                id: id.to_string(),
                detail: "other objects still refer to it".into(),
            },
            _ => DbError::Sql {
                op: "delete",
                source: e,
            },
        }
    }

    /// Whether retrying the same operation could succeed (a lost race on a unique key).
    pub fn is_already_exists(&self) -> bool {
        matches!(self, DbError::AlreadyExists { .. })
    }
}

fn constraint_kind(e: &sqlx::Error) -> Option<sqlx::error::ErrorKind> {
    match e {
        sqlx::Error::Database(d) => Some(d.kind()),
        _ => None,
    }
}

/// How to open the database beyond its location.
#[derive(Clone)]
pub struct DbOptions {
    /// The time source for every stored timestamp (creation, jobs, events, token expiry).
    pub clock: Arc<dyn Clock>,
    /// Connections for reads (SQLite) or for everything (PostgreSQL).
    pub max_connections: u32,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            max_connections: 4,
        }
    }
}

/// A handle on the engine's database. Clone it freely: clones share the pools.
#[derive(Clone)]
pub struct Db {
    inner: Arc<DbInner>,
}

pub(crate) struct DbInner {
    backend: Backend,
    reader: AnyPool,
    writer: AnyPool,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.inner.backend)
            .finish()
    }
}

/// The SQLite file the engine uses inside its data directory.
pub const SQLITE_FILE: &str = "engine.db";

impl Db {
    /// The engine's rule: PostgreSQL when `url` is given, else SQLite at `<data_dir>/engine.db`.
    pub async fn open_in(data_dir: &Path, url: Option<&str>) -> Result<Db, DbError> {
        match url {
            Some(u) => Db::connect(u).await,
            None => Db::open_sqlite(&data_dir.join(SQLITE_FILE)).await,
        }
    }

    /// Opens (creating if needed) an SQLite database file and applies missing migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Db, DbError> {
        Db::open_sqlite_with(path, DbOptions::default()).await
    }

    pub async fn open_sqlite_with(path: &Path, opts: DbOptions) -> Result<Db, DbError> {
        let url = sqlite_url(path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DbError::Open {
                url: url.clone(),
                source: sqlx::Error::Io(e),
            })?;
        }
        Db::connect_with(&url, opts).await
    }

    /// Opens `postgres://…`, `postgresql://…`, `sqlite://PATH` or `sqlite:PATH`.
    pub async fn connect(url: &str) -> Result<Db, DbError> {
        Db::connect_with(url, DbOptions::default()).await
    }

    pub async fn connect_with(url: &str, opts: DbOptions) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(DbError::BadUrl(redact(url)));
        };
        let open_err = |source| DbError::Open {
            url: redact(url),
            source,
        };
        let max = opts.max_connections.max(1);
        let (reader, writer) = match backend {
            Backend::Sqlite => {
                let url = if url.contains('?') {
                    url.to_string()
                } else {
                    format!("{url}?mode=rwc")
                };
                // One writer: SQLite has one write lock anyway, and waiting for it in the pool
                // (instead of inside a deferred transaction) avoids SQLITE_BUSY on upgrade.
                let writer = AnyPoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .acquire_timeout(Duration::from_secs(60))
                    .after_connect(|c, _| sqlite_setup(c, true))
                    .connect(&url)
                    .await
                    .map_err(open_err)?;
                let reader = AnyPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(Duration::from_secs(60))
                    .after_connect(|c, _| sqlite_setup(c, false))
                    .connect(&url)
                    .await
                    .map_err(open_err)?;
                (reader, writer)
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(Duration::from_secs(60))
                    .connect(url)
                    .await
                    .map_err(open_err)?;
                (pool.clone(), pool)
            }
        };
        let db = Db {
            inner: Arc::new(DbInner {
                backend,
                reader,
                writer,
                clock: opts.clock,
            }),
        };
        migrate::run(&db).await?;
        tracing::debug!(backend = ?backend, schema = SCHEMA_VERSION, "database open");
        Ok(db)
    }

    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Starts a transaction on the writer. Keep it short: on SQLite it holds the only writer,
    /// so never keep one open across a call to a node, and while one is open make the task's
    /// writes through it, not through `Db` (a `Db` write would wait for the writer it holds).
    pub async fn begin(&self) -> Result<Tx, DbError> {
        let w = &self.inner.writer;
        let tx = match self.inner.backend {
            // Take the write lock up front: a deferred transaction that read first could be
            // refused (SQLITE_BUSY_SNAPSHOT) by another process's write, with no waiting.
            Backend::Sqlite => w.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => w.begin().await,
        }
        .map_err(DbError::sql("begin"))?;
        Ok(Tx { tx, db: self.clone() })
    }

    /// Runs `f` in a transaction, committing when it returns `Ok`.
    pub async fn transaction<T, F>(&self, f: F) -> Result<T, DbError>
    where
        F: for<'t> FnOnce(&'t mut Tx) -> BoxFuture<'t, Result<T, DbError>>,
    {
        let mut tx = self.begin().await?;
        let out = f(&mut tx).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Closes the pools; other clones become unusable.
    pub async fn close(&self) {
        self.inner.reader.close().await;
        self.inner.writer.close().await;
    }

    /// The highest applied migration.
    pub async fn schema_version(&self) -> Result<i64, DbError> {
        let mut c = self.read_conn().await?;
        migrate::current_version(&mut c).await
    }

    pub(crate) async fn read_conn(&self) -> Result<sqlx::pool::PoolConnection<Any>, DbError> {
        self.inner.reader.acquire().await.map_err(DbError::sql("acquire"))
    }

    pub(crate) async fn write_conn(&self) -> Result<sqlx::pool::PoolConnection<Any>, DbError> {
        self.inner.writer.acquire().await.map_err(DbError::sql("acquire"))
    }

    pub(crate) fn ctx<'a>(&'a self, c: &'a mut AnyConnection) -> Conn<'a> {
        Conn {
            c,
            backend: self.inner.backend,
            now: self.inner.clock.now(),
        }
    }
}

/// A transaction: repository calls on it commit together or not at all. Dropping it without
/// [`Tx::commit`] rolls back.
pub struct Tx {
    tx: sqlx::Transaction<'static, Any>,
    db: Db,
}

impl Tx {
    pub async fn commit(self) -> Result<(), DbError> {
        self.tx.commit().await.map_err(DbError::sql("commit"))
    }

    pub async fn rollback(self) -> Result<(), DbError> {
        self.tx.rollback().await.map_err(DbError::sql("rollback"))
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub(crate) fn ctx(&mut self) -> Conn<'_> {
        Conn {
            c: &mut self.tx,
            backend: self.db.inner.backend,
            now: self.db.inner.clock.now(),
        }
    }
}

/// What a repository function runs on: a connection (in a transaction or not), the backend's
/// dialect and the time of the call.
pub(crate) struct Conn<'a> {
    pub c: &'a mut AnyConnection,
    pub backend: Backend,
    pub now: Timestamp,
}

async fn sqlite_setup_inner(c: &mut AnyConnection, writer: bool) -> Result<(), sqlx::Error> {
    // journal_mode is persistent in the file; set it from the writer before readers exist.
    if writer {
        c.execute("PRAGMA journal_mode = WAL").await?;
    }
    c.execute("PRAGMA foreign_keys = ON").await?;
    c.execute("PRAGMA busy_timeout = 10000").await?;
    // FULL: a committed saga step survives power loss, not only a process crash.
    c.execute("PRAGMA synchronous = FULL").await?;
    Ok(())
}

fn sqlite_setup(c: &mut AnyConnection, writer: bool) -> BoxFuture<'_, Result<(), sqlx::Error>> {
    Box::pin(sqlite_setup_inner(c, writer))
}

/// `sqlite://` URL for a path, percent-encoding what the URL syntax would misread.
fn sqlite_url(path: &Path) -> Result<String, DbError> {
    let s = path.to_str().ok_or_else(|| DbError::Invalid {
        what: "database path",
        detail: format!("{} is not UTF-8", path.display()),
    })?;
    let mut out = String::from("sqlite://");
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/._-~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push_str("?mode=rwc");
    Ok(out)
}

/// A URL fit for logs and errors: without its password.
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((creds, host)) = rest.split_once('@') {
            let user = creds.split(':').next().unwrap_or("");
            return format!("{scheme}://{user}:***@{host}");
        }
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://oxvirt:secret@db:5432/engine"),
            "postgres://oxvirt:***@db:5432/engine"
        );
        assert_eq!(redact("sqlite:///x/engine.db"), "sqlite:///x/engine.db");
    }

    #[test]
    fn sqlite_urls_escape_special_characters() {
        assert_eq!(
            sqlite_url(Path::new("/data/a b?#.db")).unwrap(),
            "sqlite:///data/a%20b%3F%23.db?mode=rwc"
        );
    }
}
