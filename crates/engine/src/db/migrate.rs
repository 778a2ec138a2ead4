//! Versioned schema migrations, embedded in the binary.
//!
//! Each migration runs in its own transaction together with the row that records it, so a crash
//! mid-migration leaves the previous version intact and the next start applies it again. On
//! PostgreSQL the transaction first locks the record table, so two engines starting at once
//! apply each migration once. A recorded migration whose embedded text has changed since is an
//! error: the schema would no longer be what the code expects.

use sha2::{Digest, Sha256};
use sqlx::AnyConnection;
use sqlx::Row;

use super::{Backend, Db, DbError};

/// One schema step.
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// All migrations, in order. Append only: never edit one that has shipped.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "vm_os",
        sql: include_str!("migrations/0002_vm_os.sql"),
    },
    Migration {
        version: 3,
        name: "fence_agent",
        sql: include_str!("migrations/0003_fence_agent.sql"),
    },
    Migration {
        version: 4,
        name: "networks",
        sql: include_str!("migrations/0004_networks.sql"),
    },
    Migration {
        version: 5,
        name: "affinity_group_details",
        sql: include_str!("migrations/0005_affinity_group_details.sql"),
    },
    Migration {
        version: 6,
        name: "vm_hibernation",
        sql: include_str!("migrations/0006_vm_hibernation.sql"),
    },
    Migration {
        version: 7,
        name: "snapshot_memory",
        sql: include_str!("migrations/0007_snapshot_memory.sql"),
    },
    Migration {
        version: 8,
        name: "cluster_scheduling_properties",
        sql: include_str!("migrations/0008_cluster_scheduling_properties.sql"),
    },
    Migration {
        version: 9,
        name: "template_nics",
        sql: include_str!("migrations/0009_template_nics.sql"),
    },
    Migration {
        version: 10,
        name: "cluster_migration_bandwidth",
        sql: include_str!("migrations/0010_cluster_migration_bandwidth.sql"),
    },
    Migration {
        version: 11,
        name: "image_transfers",
        sql: include_str!("migrations/0011_image_transfers.sql"),
    },
    Migration {
        version: 12,
        name: "cluster_migration_encrypted",
        sql: include_str!("migrations/0012_cluster_migration_encrypted.sql"),
    },
    Migration {
        version: 13,
        name: "cdrom",
        sql: include_str!("migrations/0013_cdrom.sql"),
    },
    Migration {
        version: 14,
        name: "external_events",
        sql: include_str!("migrations/0014_external_events.sql"),
    },
    Migration {
        version: 15,
        name: "ovf_stores",
        sql: include_str!("migrations/0015_ovf_stores.sql"),
    },
    Migration {
        version: 16,
        name: "resume_behavior",
        sql: include_str!("migrations/0016_resume_behavior.sql"),
    },
    Migration {
        version: 17,
        name: "space_thresholds",
        sql: include_str!("migrations/0017_space_thresholds.sql"),
    },
    Migration {
        version: 18,
        name: "tags",
        sql: include_str!("migrations/0018_tags.sql"),
    },
    Migration {
        version: 19,
        name: "storage_qos",
        sql: include_str!("migrations/0019_storage_qos.sql"),
    },
];

/// The schema version this engine expects.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

const CREATE_RECORD: &str = "CREATE TABLE IF NOT EXISTS oxvirt_schema_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)";

pub(super) async fn run(db: &Db) -> Result<(), DbError> {
    {
        let mut tx = db.begin().await?;
        lock(db, &mut tx).await.map_err(DbError::sql("lock migrations"))?;
        sqlx::query(CREATE_RECORD)
            .execute(&mut *tx.tx)
            .await
            .map_err(DbError::sql("create migration table"))?;
        tx.commit().await?;
    }
    for m in MIGRATIONS {
        apply(db, m).await?;
    }
    let mut c = db.write_conn().await?;
    let found = current_version(&mut c).await?;
    if found > SCHEMA_VERSION {
        return Err(DbError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    Ok(())
}

pub(super) async fn current_version(c: &mut AnyConnection) -> Result<i64, DbError> {
    let row = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM oxvirt_schema_migrations")
        .fetch_one(&mut *c)
        .await
        .map_err(DbError::sql("read schema version"))?;
    row.try_get::<i64, _>("v")
        .map_err(DbError::sql("read schema version"))
}

fn checksum(sql: &str) -> String {
    let d = Sha256::digest(sql.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

async fn apply(db: &Db, m: &Migration) -> Result<(), DbError> {
    let err = |source| DbError::Migration {
        version: m.version,
        name: m.name,
        source,
    };
    let sum = checksum(m.sql);
    let mut tx = db.begin().await?;
    lock(db, &mut tx).await.map_err(err)?;
    let recorded = sqlx::query("SELECT checksum FROM oxvirt_schema_migrations WHERE version = $1")
        .bind(m.version)
        .fetch_optional(&mut *tx.tx)
        .await
        .map_err(err)?;
    if let Some(row) = recorded {
        let recorded: String = row.try_get("checksum").map_err(err)?;
        if recorded != sum {
            return Err(DbError::MigrationChanged {
                version: m.version,
                name: m.name,
                recorded,
                embedded: sum,
            });
        }
        return Ok(());
    }
    let sql = render(m.sql, db.backend());
    for stmt in split_statements(&sql) {
        sqlx::query(stmt).execute(&mut *tx.tx).await.map_err(err)?;
    }
    sqlx::query(
        "INSERT INTO oxvirt_schema_migrations (version, name, checksum, applied_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(m.version)
    .bind(m.name)
    .bind(&sum)
    .bind(db.now().as_millis())
    .execute(&mut *tx.tx)
    .await
    .map_err(err)?;
    tx.tx.commit().await.map_err(err)?;
    tracing::info!(version = m.version, name = m.name, "applied schema migration");
    Ok(())
}

/// Serialises migrations between engines starting at once: on PostgreSQL a transaction-scoped
/// advisory lock (even `CREATE TABLE IF NOT EXISTS` races there); SQLite's `BEGIN IMMEDIATE`
/// already holds the database's write lock.
async fn lock(db: &Db, tx: &mut super::Tx) -> Result<(), sqlx::Error> {
    if db.backend() == Backend::Postgres {
        // Wrapped so that the result is an integer the Any driver can decode (not `void`).
        sqlx::query("SELECT 1 AS locked FROM (SELECT pg_advisory_xact_lock(7270001)) AS l")
            .execute(&mut *tx.tx)
            .await?;
    }
    Ok(())
}

/// Replaces the backend-specific tokens of the portable migration text.
fn render(sql: &str, backend: Backend) -> String {
    let serial = match backend {
        Backend::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
        Backend::Postgres => "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    };
    sql.replace("@SERIAL_PK@", serial)
}

/// Splits a script into statements on `;`, outside quotes and `--` comments.
fn split_statements(sql: &str) -> Vec<&str> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    let mut in_quote = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_quote {
            if b == b'\'' {
                in_quote = false;
            }
        } else if b == b'\'' {
            in_quote = true;
        } else if b == b'-' && bytes.get(i + 1) == Some(&b'-') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        } else if b == b';' {
            push_statement(&mut out, &sql[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    push_statement(&mut out, &sql[start..]);
    out
}

fn push_statement<'a>(out: &mut Vec<&'a str>, s: &'a str) {
    let has_code = s
        .lines()
        .map(str::trim)
        .any(|l| !l.is_empty() && !l.starts_with("--"));
    if has_code {
        out.push(s.trim());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_semicolons_outside_quotes_and_comments() {
        let s = "-- a; comment\nCREATE TABLE a (x TEXT DEFAULT ';');\n\nINSERT INTO a VALUES ('it''s; ok');\n-- trailing;\n";
        let v = split_statements(s);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].ends_with("DEFAULT ';')"));
        assert_eq!(v[1], "INSERT INTO a VALUES ('it''s; ok')");
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{}", m.name);
        }
        assert!(!split_statements(MIGRATIONS[0].sql).is_empty());
    }
}
