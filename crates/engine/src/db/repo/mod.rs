//! Repository functions: one implementation each, exposed on [`Db`](super::Db) and on
//! [`Tx`](super::Tx) by the `repo!` macro.

use sqlx::any::AnyRow;

use super::sql::Sql;
use super::{Conn, DbError};

/// Declares repository functions. `read` ones run on the read pool when called on `Db`;
/// `write` ones run in their own transaction on the writer. On `Tx` both run in the
/// transaction.
macro_rules! repo {
    ($( $(#[$m:meta])* $mode:ident $name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty = $imp:path; )*) => {
        impl crate::db::Db {
            $(
                $(#[$m])*
                pub async fn $name(&self, $($arg: $ty),*) -> Result<$ret, crate::db::DbError> {
                    repo!(@db $mode self [$imp] ($($arg),*))
                }
            )*
        }
        impl crate::db::Tx {
            $(
                $(#[$m])*
                pub async fn $name(&mut self, $($arg: $ty),*) -> Result<$ret, crate::db::DbError> {
                    $imp(&mut self.ctx(), $($arg),*).await
                }
            )*
        }
    };
    (@db read $self:ident [$imp:path] ($($arg:ident),*)) => {{
        let mut c = $self.read_conn().await?;
        $imp(&mut $self.ctx(&mut c), $($arg),*).await
    }};
    (@db write $self:ident [$imp:path] ($($arg:ident),*)) => {{
        let mut tx = $self.begin().await?;
        let out = $imp(&mut tx.ctx(), $($arg),*).await?;
        tx.commit().await?;
        Ok(out)
    }};
}

mod infra;
mod networks;
mod ops;
mod ovf;
mod qos;
pub(crate) mod sagas;
mod storage;
mod tags;
mod transfers;
mod users;
mod vms;

pub use infra::{ClusterFilter, ClusterSort, DcFilter, DcSort, HostFilter, HostSort};
pub use ops::{EventFilter, EventSort, JobFilter, JobSort};
pub use sagas::{SagaRecord, SagaState, SagaStepRecord, SagaStepStatus};
pub use storage::{DiskFilter, DiskSort, SdFilter, SdSort};
pub use users::{AdminBootstrap, IssuedToken, TokenInfo, UserFilter, UserSort};
pub use vms::{TemplateFilter, TemplateSort, VmFilter, VmParts, VmSort};

impl Conn<'_> {
    pub(crate) async fn all(&mut self, q: &Sql) -> Result<Vec<AnyRow>, DbError> {
        q.query()
            .fetch_all(&mut *self.c)
            .await
            .map_err(DbError::sql("select"))
    }

    pub(crate) async fn opt(&mut self, q: &Sql) -> Result<Option<AnyRow>, DbError> {
        q.query()
            .fetch_optional(&mut *self.c)
            .await
            .map_err(DbError::sql("select"))
    }

    /// Runs a write; returns the number of rows it changed.
    pub(crate) async fn exec(&mut self, q: &Sql) -> Result<u64, DbError> {
        q.query()
            .execute(&mut *self.c)
            .await
            .map(|r| r.rows_affected())
            .map_err(DbError::sql("write"))
    }

    /// Runs a write, mapping constraint violations for an object of `kind` named `key`.
    pub(crate) async fn exec_as(
        &mut self,
        q: &Sql,
        kind: &'static str,
        key: impl ToString,
    ) -> Result<u64, DbError> {
        q.query()
            .execute(&mut *self.c)
            .await
            .map(|r| r.rows_affected())
            .map_err(DbError::on_write(kind, key))
    }

    /// Runs a delete, mapping a foreign-key violation to [`DbError::InUse`].
    pub(crate) async fn delete_as(
        &mut self,
        q: &Sql,
        kind: &'static str,
        id: impl ToString,
    ) -> Result<u64, DbError> {
        q.query()
            .execute(&mut *self.c)
            .await
            .map(|r| r.rows_affected())
            .map_err(DbError::on_delete(kind, id))
    }

    pub(crate) async fn count(&mut self, q: &Sql) -> Result<u64, DbError> {
        use super::sql::RowExt;
        let row = q
            .query()
            .fetch_one(&mut *self.c)
            .await
            .map_err(DbError::sql("count"))?;
        row.uint("n")
    }
}

/// The error for an update that changed no row: the row is gone, or it changed since it was
/// read (`revision`) or is not in the expected state.
pub(crate) async fn missing_or_conflict(
    c: &mut Conn<'_>,
    table: &str,
    kind: &'static str,
    id: &str,
    detail: impl FnOnce() -> String,
) -> DbError {
    let mut q = Sql::new("SELECT COUNT(*) AS n FROM ");
    q.push(table).push(" WHERE id = ").arg(id);
    match c.count(&q).await {
        Ok(0) => DbError::not_found(kind, id),
        Ok(_) => DbError::Conflict {
            kind,
            id: id.to_string(),
            detail: detail(),
        },
        Err(e) => e,
    }
}
