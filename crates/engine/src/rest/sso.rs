//! SSO as oVirt's engine serves it to the SDK: the OAuth password grant, logout, and the
//! bearer-token (or HTTP Basic) check on every API request.
//!
//! Replies are JSON with `Content-Type: application/json` (the SDK refuses anything else);
//! failures are `{"error_code", "error"}` with 400, as oVirt's SSO answers them. Tokens are
//! stored hashed in the database with an expiry ([`super::TOKEN_TTL`]); an expired or revoked
//! token is a 401, on which the SDK logs in again once.

use http::{HeaderMap, Method, StatusCode};
use oxvirt_rpc::{HttpRequest, Reply};
use serde_json::json;

use crate::daemon::Engine;
use crate::model::User;

use super::fault::ApiError;
use super::{parse_query, TOKEN_TTL};

const SCOPE: &str = "ovirt-app-api";

fn sso_error(status: StatusCode, code: &str, msg: impl Into<String>) -> Reply {
    Reply::json(status, &json!({ "error_code": code, "error": msg.into() }))
}

/// `/ovirt-engine/sso/oauth/token` (`token == true`) or `/ovirt-engine/services/sso-logout`.
pub async fn handle(engine: &Engine, req: &HttpRequest, token: bool) -> Reply {
    if req.method != Method::POST && req.method != Method::GET {
        return sso_error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request", "use POST");
    }
    let mut form = parse_query(req.query.as_deref().unwrap_or(""));
    if req.method == Method::POST {
        match std::str::from_utf8(&req.body) {
            Ok(b) => form.extend(parse_query(b.trim())),
            Err(_) => {
                return sso_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the form is not UTF-8",
                )
            }
        }
    }
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let db = &engine.cmds.app.db;
    if !token {
        if let Some(t) = get("token") {
            if let Err(e) = db.token_revoke(t).await {
                return sso_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string());
            }
        }
        return Reply::json(StatusCode::OK, &json!({}));
    }
    match get("grant_type") {
        Some("password") => {}
        Some(g) => {
            return sso_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("grant type {g:?} is not supported; use password"),
            )
        }
        None => {
            return sso_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is missing",
            )
        }
    }
    let (Some(user), Some(password)) = (get("username"), get("password")) else {
        return sso_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "username and password are required",
        );
    };
    let scope = get("scope").filter(|s| !s.is_empty()).unwrap_or(SCOPE);
    match db.user_verify_password(user, password).await {
        Ok(Some(u)) => match db.token_issue(u.id, TOKEN_TTL).await {
            Ok(t) => {
                tracing::info!(user = %u.principal(), "SSO login");
                // oVirt's audit log records every login (USER_VDC_LOGIN, code 30); clients such
                // as the Ansible host module read the newest event as their starting cursor.
                let ev = crate::model::NewEvent::new(
                    crate::model::Severity::Normal,
                    30,
                    format!("User {} logged in.", u.principal()),
                );
                if let Err(e) = db.event_add(&ev).await {
                    tracing::warn!(error = %e, "cannot record the login event");
                }
                Reply::json(
                    StatusCode::OK,
                    &json!({
                        "access_token": t.token,
                        "scope": scope,
                        "exp": (t.expires_at.as_millis() / 1000).to_string(),
                        "token_type": "bearer",
                    }),
                )
            }
            Err(e) => sso_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()),
        },
        Ok(None) => {
            tracing::info!(user, "SSO login refused");
            sso_error(
                StatusCode::BAD_REQUEST,
                "access_denied",
                format!("Cannot authenticate user '{user}': The username or password is incorrect."),
            )
        }
        Err(e) => sso_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()),
    }
}

/// The user a request acts as: `Authorization: Bearer <token>` or `Basic <user:password>`.
pub async fn authenticate(engine: &Engine, h: &HeaderMap) -> Result<User, ApiError> {
    let db = &engine.cmds.app.db;
    let auth = h
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::unauthorized("authentication required: log in at /ovirt-engine/sso/oauth/token")
        })?;
    let (scheme, cred) = auth.trim().split_once(' ').unwrap_or((auth, ""));
    let cred = cred.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return match db.token_validate(cred).await? {
            Some(t) => Ok(t.user),
            None => Err(ApiError::unauthorized("the token is invalid or has expired")),
        };
    }
    if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(cred)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| ApiError::unauthorized("malformed Basic credentials"))?;
        let (user, pw) = raw
            .split_once(':')
            .ok_or_else(|| ApiError::unauthorized("malformed Basic credentials"))?;
        return db
            .user_verify_password(user, pw)
            .await?
            .ok_or_else(|| ApiError::unauthorized(format!("cannot authenticate user '{user}'")));
    }
    Err(ApiError::unauthorized(format!(
        "unsupported authorization scheme {scheme:?}"
    )))
}
