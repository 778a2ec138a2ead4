//! The saga log: each saga's parameters and state, each step's status and output.
//!
//! Written only by the saga executor (`crate::saga`), one transition per transaction; read by
//! it on resume and by admins (REST, CLI) to see what a command did or where it is stuck.

use std::str::FromStr;

use serde_json::Value;
use sqlx::any::AnyRow;

use crate::db::sql::{Arg, RowExt, Sql};
use crate::db::{Conn, DbError};
use crate::model::{JobId, SagaId, StepId, UnknownValue};
use crate::time::Timestamp;

macro_rules! str_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            pub const fn as_str(self) -> &'static str { match self { $($name::$v => $s),+ } }
        }
        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($s => Ok($name::$v),)+
                    _ => Err(UnknownValue { kind: stringify!($name), value: s.chars().take(64).collect() }),
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

str_enum!(
    /// A saga's state.
    ///
    /// `running` → `done`; `running` → `unwinding` (a step failed) → `unwound` (every
    /// completed step undone) or `stuck` (an undo failed: an admin must look, then retry);
    /// `running` → `blocked` (a step past the point of no return kept failing: an admin
    /// retries it forward). See `crate::saga`.
    SagaState {
        Running = "running",
        Unwinding = "unwinding",
        Done = "done",
        Unwound = "unwound",
        Stuck = "stuck",
        Blocked = "blocked",
    }
);

impl SagaState {
    /// Whether the executor still has work to do on it after a restart.
    pub fn is_unfinished(self) -> bool {
        matches!(self, SagaState::Running | SagaState::Unwinding)
    }
}

str_enum!(
    /// A step's status. No row means the step never started.
    ///
    /// `started` (recorded before the action runs) → `done` (with its output) or `failed`;
    /// then, when unwinding, → `undo_started` → `undone` or `undo_failed`.
    SagaStepStatus {
        Started = "started",
        Done = "done",
        Failed = "failed",
        UndoStarted = "undo_started",
        Undone = "undone",
        UndoFailed = "undo_failed",
    }
);

/// One step as the saga log has it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaStepRecord {
    pub index: usize,
    pub name: String,
    pub status: SagaStepStatus,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub job_step_id: Option<StepId>,
    pub updated_at: Timestamp,
}

/// A saga as the log has it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRecord {
    pub id: SagaId,
    pub name: String,
    pub params: Value,
    pub state: SagaState,
    /// Why it unwound (the failed step's error).
    pub error: Option<String>,
    /// Why it is stuck (the failed undo's error).
    pub undo_error: Option<String>,
    pub job_id: Option<JobId>,
    pub correlation_id: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub steps: Vec<SagaStepRecord>,
}

impl SagaRecord {
    pub fn step(&self, index: usize) -> Option<&SagaStepRecord> {
        self.steps.iter().find(|s| s.index == index)
    }
}

fn json(col: &str, s: &str) -> Result<Value, DbError> {
    serde_json::from_str(s).map_err(|e| DbError::Corrupt {
        column: col.to_string(),
        detail: e.to_string(),
    })
}

const SAGA_COLS: &str =
    "id, name, params, state, error, undo_error, job_id, correlation_id, created_at, updated_at";

async fn saga_rows(c: &mut Conn<'_>, q: &Sql) -> Result<Vec<SagaRecord>, DbError> {
    let rows: Vec<AnyRow> = c.all(q).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(SagaRecord {
            id: r.parse("id")?,
            name: r.text("name")?,
            params: json("params", &r.text("params")?)?,
            state: r.parse("state")?,
            error: r.opt_text("error")?,
            undo_error: r.opt_text("undo_error")?,
            job_id: r.opt_parse("job_id")?,
            correlation_id: r.opt_text("correlation_id")?,
            created_at: r.ts("created_at")?,
            updated_at: r.ts("updated_at")?,
            steps: Vec::new(),
        });
    }
    for s in &mut out {
        let mut q = Sql::new(
            "SELECT step_index, name, status, output, error, job_step_id, updated_at FROM saga_steps WHERE saga_id = ",
        );
        q.arg(s.id.to_string()).push(" ORDER BY step_index");
        for r in c.all(&q).await? {
            s.steps.push(SagaStepRecord {
                index: r.uint("step_index")? as usize,
                name: r.text("name")?,
                status: r.parse("status")?,
                output: r.opt_text("output")?.map(|o| json("output", &o)).transpose()?,
                error: r.opt_text("error")?,
                job_step_id: r.opt_parse("job_step_id")?,
                updated_at: r.ts("updated_at")?,
            });
        }
    }
    Ok(out)
}

pub(crate) async fn saga_insert(
    c: &mut Conn<'_>,
    id: SagaId,
    name: &str,
    params: &Value,
    job_id: JobId,
    correlation_id: Option<&str>,
) -> Result<(), DbError> {
    let mut q = Sql::new(&format!("INSERT INTO sagas ({SAGA_COLS}) VALUES ("));
    q.arg(id.to_string())
        .push(", ")
        .arg(name)
        .push(", ")
        .arg(params.to_string())
        .push(", 'running', NULL, NULL, ")
        .arg(job_id.to_string())
        .push(", ")
        .arg(Arg::Text(correlation_id.map(str::to_string)))
        .push(", ")
        .arg(c.now.as_millis())
        .push(", ")
        .arg(c.now.as_millis())
        .push(")");
    c.exec_as(&q, "saga", id).await?;
    Ok(())
}

pub(crate) async fn saga_set_state(
    c: &mut Conn<'_>,
    id: SagaId,
    state: SagaState,
    error: Option<&str>,
    undo_error: Option<&str>,
) -> Result<(), DbError> {
    let mut q = Sql::new("UPDATE sagas SET state = ");
    q.arg(state.as_str())
        .push(", error = COALESCE(")
        .arg(Arg::Text(error.map(str::to_string)))
        .push(", error), undo_error = ")
        .arg(Arg::Text(undo_error.map(str::to_string)))
        .push(", updated_at = ")
        .arg(c.now.as_millis())
        .push(" WHERE id = ")
        .arg(id.to_string());
    if c.exec(&q).await? == 0 {
        return Err(DbError::not_found("saga", id));
    }
    Ok(())
}

/// Records a step's status; `output` and `job_step_id` keep their previous values when
/// `None`.
#[allow(clippy::too_many_arguments)] // one column each; called only by the executor
pub(crate) async fn saga_step_record(
    c: &mut Conn<'_>,
    saga: SagaId,
    index: usize,
    name: &str,
    status: SagaStepStatus,
    output: Option<&Value>,
    error: Option<&str>,
    job_step_id: Option<StepId>,
) -> Result<(), DbError> {
    let mut q = Sql::new(
        "INSERT INTO saga_steps (saga_id, step_index, name, status, output, error, job_step_id, updated_at) VALUES (",
    );
    q.arg(saga.to_string())
        .push(", ")
        .arg(index as i64)
        .push(", ")
        .arg(name)
        .push(", ")
        .arg(status.as_str())
        .push(", ")
        .arg(Arg::Text(output.map(|o| o.to_string())))
        .push(", ")
        .arg(Arg::Text(error.map(str::to_string)))
        .push(", ")
        .arg(Arg::Text(job_step_id.map(|s| s.to_string())))
        .push(", ")
        .arg(c.now.as_millis())
        .push(
            ") ON CONFLICT (saga_id, step_index) DO UPDATE SET status = excluded.status, \
             output = COALESCE(excluded.output, saga_steps.output), error = excluded.error, \
             job_step_id = COALESCE(excluded.job_step_id, saga_steps.job_step_id), \
             updated_at = excluded.updated_at",
        );
    c.exec_as(&q, "saga step", format!("{index} ({name}) of saga {saga}"))
        .await?;
    let mut q = Sql::new("UPDATE sagas SET updated_at = ");
    q.arg(c.now.as_millis())
        .push(" WHERE id = ")
        .arg(saga.to_string());
    c.exec(&q).await?;
    Ok(())
}

async fn saga_get(c: &mut Conn<'_>, id: SagaId) -> Result<Option<SagaRecord>, DbError> {
    let mut q = Sql::new(&format!("SELECT {SAGA_COLS} FROM sagas WHERE id = "));
    q.arg(id.to_string());
    Ok(saga_rows(c, &q).await?.pop())
}

/// Sagas in one of `states` (all when empty), oldest first.
async fn saga_list(c: &mut Conn<'_>, states: &[SagaState]) -> Result<Vec<SagaRecord>, DbError> {
    let mut q = Sql::new(&format!("SELECT {SAGA_COLS} FROM sagas"));
    if !states.is_empty() {
        q.push(" WHERE state IN (");
        for (i, s) in states.iter().enumerate() {
            if i > 0 {
                q.push(", ");
            }
            q.arg(s.as_str());
        }
        q.push(")");
    }
    q.push(" ORDER BY created_at, id");
    saga_rows(c, &q).await
}

/// Deletes finished sagas (done or unwound) that ended before `before`. Returns how many.
async fn sagas_clear_finished(c: &mut Conn<'_>, before: Timestamp) -> Result<u64, DbError> {
    let mut q = Sql::new("DELETE FROM sagas WHERE state IN ('done', 'unwound') AND updated_at < ");
    q.arg(before.as_millis());
    c.exec(&q).await
}

repo! {
    read saga_get(id: SagaId) -> Option<SagaRecord> = saga_get;
    /// Sagas in one of `states` (all when empty), oldest first.
    read saga_list(states: &[SagaState]) -> Vec<SagaRecord> = saga_list;
    write sagas_clear_finished(before: Timestamp) -> u64 = sagas_clear_finished;
}
