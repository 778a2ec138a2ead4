//! Small helpers between Rust values and the portable column encoding (text ids and enums,
//! integer times and booleans), and a builder for queries whose `WHERE` is assembled at run time.

use std::fmt::Display;
use std::str::FromStr;

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, Row};

use super::DbError;
use crate::time::Timestamp;

/// A bound value, typed so that PostgreSQL sees `NULL`s of the column's type.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Text(Option<String>),
    Int(Option<i64>),
}

impl From<&str> for Arg {
    fn from(s: &str) -> Self {
        Arg::Text(Some(s.to_string()))
    }
}
impl From<String> for Arg {
    fn from(s: String) -> Self {
        Arg::Text(Some(s))
    }
}
impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::Int(Some(v))
    }
}

/// A query under construction: SQL text with `$n` placeholders and their values.
#[derive(Debug, Default)]
pub(crate) struct Sql {
    pub text: String,
    pub args: Vec<Arg>,
}

impl Sql {
    pub fn new(text: &str) -> Self {
        Sql {
            text: text.to_string(),
            args: Vec::new(),
        }
    }
    pub fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }
    /// Appends a placeholder bound to `a`.
    pub fn arg(&mut self, a: impl Into<Arg>) -> &mut Self {
        self.args.push(a.into());
        let n = self.args.len();
        self.text.push('$');
        self.text.push_str(&n.to_string());
        self
    }
    pub fn query(&self) -> Query<'_, Any, AnyArguments<'_>> {
        let mut q = sqlx::query(&self.text);
        for a in &self.args {
            q = match a {
                Arg::Text(v) => q.bind(v.clone()),
                Arg::Int(v) => q.bind(*v),
            };
        }
        q
    }
}

pub(crate) fn b2i(b: bool) -> i64 {
    i64::from(b)
}

/// Checked conversion of a size or count to the signed column type.
pub(crate) fn u2i(what: &'static str, v: u64) -> Result<i64, DbError> {
    i64::try_from(v).map_err(|_| DbError::Invalid {
        what,
        detail: format!("{v} is too large"),
    })
}

/// Typed column access with errors that name the column.
pub(crate) trait RowExt {
    fn text(&self, col: &str) -> Result<String, DbError>;
    /// Borrowed text: parsing ids and enums without allocating.
    fn str_ref(&self, col: &str) -> Result<&str, DbError>;
    fn opt_str_ref(&self, col: &str) -> Result<Option<&str>, DbError>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, DbError>;
    fn int(&self, col: &str) -> Result<i64, DbError>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, DbError>;
    fn flag(&self, col: &str) -> Result<bool, DbError> {
        Ok(self.int(col)? != 0)
    }
    fn uint(&self, col: &str) -> Result<u64, DbError> {
        let v = self.int(col)?;
        u64::try_from(v).map_err(|_| corrupt(col, v))
    }
    fn opt_uint(&self, col: &str) -> Result<Option<u64>, DbError> {
        self.opt_int(col)?
            .map(|v| u64::try_from(v).map_err(|_| corrupt(col, v)))
            .transpose()
    }
    fn opt_u32(&self, col: &str) -> Result<Option<u32>, DbError> {
        self.opt_int(col)?
            .map(|v| u32::try_from(v).map_err(|_| corrupt(col, v)))
            .transpose()
    }
    fn u32(&self, col: &str) -> Result<u32, DbError> {
        let v = self.int(col)?;
        u32::try_from(v).map_err(|_| corrupt(col, v))
    }
    fn ts(&self, col: &str) -> Result<Timestamp, DbError> {
        Ok(Timestamp::from_millis(self.int(col)?))
    }
    fn opt_ts(&self, col: &str) -> Result<Option<Timestamp>, DbError> {
        Ok(self.opt_int(col)?.map(Timestamp::from_millis))
    }
    fn parse<T: FromStr>(&self, col: &str) -> Result<T, DbError>
    where
        T::Err: Display,
    {
        let s = self.str_ref(col)?;
        s.parse().map_err(|e: T::Err| DbError::Corrupt {
            column: col.to_string(),
            detail: e.to_string(),
        })
    }
    fn opt_parse<T: FromStr>(&self, col: &str) -> Result<Option<T>, DbError>
    where
        T::Err: Display,
    {
        match self.opt_str_ref(col)? {
            None => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|e: T::Err| DbError::Corrupt {
                column: col.to_string(),
                detail: e.to_string(),
            }),
        }
    }
}

fn corrupt(col: &str, v: impl Display) -> DbError {
    DbError::Corrupt {
        column: col.to_string(),
        detail: format!("{v} is out of range"),
    }
}

fn decode_err(col: &str, e: sqlx::Error) -> DbError {
    DbError::Corrupt {
        column: col.to_string(),
        detail: e.to_string(),
    }
}

impl RowExt for AnyRow {
    fn str_ref(&self, col: &str) -> Result<&str, DbError> {
        self.try_get::<&str, _>(col).map_err(|e| decode_err(col, e))
    }
    fn opt_str_ref(&self, col: &str) -> Result<Option<&str>, DbError> {
        self.try_get::<Option<&str>, _>(col)
            .map_err(|e| decode_err(col, e))
    }
    fn text(&self, col: &str) -> Result<String, DbError> {
        self.try_get::<String, _>(col).map_err(|e| decode_err(col, e))
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, DbError> {
        self.try_get::<Option<String>, _>(col)
            .map_err(|e| decode_err(col, e))
    }
    fn int(&self, col: &str) -> Result<i64, DbError> {
        self.try_get::<i64, _>(col).map_err(|e| decode_err(col, e))
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>, DbError> {
        self.try_get::<Option<i64>, _>(col)
            .map_err(|e| decode_err(col, e))
    }
}
