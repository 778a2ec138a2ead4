//! REST errors: an HTTP status with oVirt's `<fault><reason/><detail/></fault>`.
//!
//! The mapping from the engine's errors is the one the SDK relies on: 404 (NotFoundError) for
//! a missing object, 401 (AuthError) for a missing or expired token, 409 for an object in the
//! wrong state or a name already taken, 400 for a request the engine refuses as invalid or a
//! command that failed and was rolled back; 500 only for the engine's own failures.

use http::StatusCode;

use crate::commands::CommandError;
use crate::db::DbError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub reason: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, reason: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            reason,
            detail: detail.into(),
        }
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad Request", detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "Not Found", detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "Operation Failed", detail)
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error", detail)
    }
}

/// The error and its sources, `: `-separated (errors here do not repeat their source).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        let detail = chain(&e);
        match e {
            DbError::NotFound { .. } => ApiError::not_found(detail),
            DbError::AlreadyExists { .. } | DbError::InUse { .. } | DbError::Conflict { .. } => {
                ApiError::conflict(detail)
            }
            DbError::Invalid { .. } | DbError::MissingReference { .. } => ApiError::bad_request(detail),
            _ => ApiError::internal(detail),
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::NotFound { .. } => ApiError::not_found(e.to_string()),
            CommandError::Invalid(m) => ApiError::bad_request(m),
            CommandError::Conflict(m) => ApiError::conflict(m),
            CommandError::Db(d) => d.into(),
            CommandError::Failed { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "Operation Failed", e.to_string())
            }
            CommandError::Node(_)
            | CommandError::Stuck { .. }
            | CommandError::Blocked { .. }
            | CommandError::Saga(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Operation Failed", chain(&e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_errors_map_to_the_statuses_the_sdk_expects() {
        let nf: ApiError = CommandError::not_found("VM", "x").into();
        assert_eq!(nf.status, StatusCode::NOT_FOUND);
        let c: ApiError = CommandError::Conflict("VM a is up".into()).into();
        assert_eq!(
            (c.status, c.detail.as_str()),
            (StatusCode::CONFLICT, "VM a is up")
        );
        let i: ApiError = CommandError::invalid("bad").into();
        assert_eq!(i.status, StatusCode::BAD_REQUEST);
        let dup: ApiError = CommandError::Db(DbError::AlreadyExists {
            kind: "VM",
            key: "a".into(),
        })
        .into();
        assert_eq!(dup.status, StatusCode::CONFLICT);
        let f: ApiError = CommandError::Failed {
            description: "Creating disk".into(),
            error: "no space".into(),
            job: None,
        }
        .into();
        assert_eq!(f.status, StatusCode::BAD_REQUEST);
        assert!(f.detail.contains("no space"));
    }
}
