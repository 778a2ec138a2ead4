//! Test databases on both backends: a fresh SQLite file, or a fresh schema in the PostgreSQL
//! server named by `OXVIRT_TEST_PG_URL` (scripts/test starts one; the PostgreSQL half of every
//! test fails, naming the variable, when it is unset).
#![allow(dead_code)]

use std::sync::Arc;

use oxvirt_engine::db::DbOptions;
use oxvirt_engine::time::{Clock, SystemClock};
use oxvirt_engine::Db;

pub const PG_ENV: &str = "OXVIRT_TEST_PG_URL";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestDb {
    pub db: Db,
    pub url: String,
    pub clock: Arc<dyn Clock>,
    pub dir: tempfile::TempDir,
}

pub fn pg_base_url() -> String {
    match std::env::var(PG_ENV) {
        Ok(u) if !u.is_empty() => u,
        _ => panic!(
            "{PG_ENV} is not set: these tests need a PostgreSQL server. Run scripts/test, or \
             `eval \"$(scripts/pg-test.sh start)\"` and re-run (Debian package: postgresql)"
        ),
    }
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        Self::with_clock(backend, Arc::new(SystemClock)).await
    }

    pub async fn with_clock(backend: Backend, clock: Arc<dyn Clock>) -> TestDb {
        let (url, dir) = fresh_database(backend).await;
        let db = Db::connect_with(&url, opts(&clock))
            .await
            .expect("open test database");
        TestDb { db, url, clock, dir }
    }

    /// Closes every connection and opens the database again, as an engine restart would.
    pub async fn reopen(&mut self) {
        self.db.close().await;
        self.db = Db::connect_with(&self.url, opts(&self.clock))
            .await
            .expect("reopen test database");
    }
}

/// The URL of a fresh, empty database on `backend` (a SQLite file in the returned directory, or
/// a new schema on the PostgreSQL test server).
pub async fn fresh_database(backend: Backend) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}?mode=rwc", dir.path().join("engine.db").display()),
        Backend::Postgres => {
            let base = pg_base_url();
            oxvirt_engine::db::testing::fresh_postgres_schema(&base)
                .await
                .unwrap_or_else(|e| panic!("cannot make a test schema on {PG_ENV}={base}: {e}"))
        }
    };
    (url, dir)
}

/// An engine serving the REST API on a fresh database of `backend` (SQLite in its data
/// directory, or a schema of the PostgreSQL test server).
pub async fn start_engine_on(backend: Backend) -> crate::rest_common::TestEngine {
    let dir = tempfile::tempdir().unwrap();
    let url = match backend {
        Backend::Sqlite => None,
        b => Some(fresh_database(b).await.0),
    };
    crate::rest_common::start_engine_with(dir, url).await
}

fn opts(clock: &Arc<dyn Clock>) -> DbOptions {
    DbOptions {
        clock: clock.clone(),
        ..DbOptions::default()
    }
}

/// Runs an `async fn(Backend)` test once per backend, as `<name>::sqlite` and
/// `<name>::postgres`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::common::Backend::Postgres).await
            }
        }
    )+};
}
