//! Portal sessions: the same users and tokens as the REST API's SSO, carried in a cookie.
//!
//! Logging in verifies the password ([`Db::user_verify_password`](crate::db::Db)) and issues a
//! database token ([`Db::token_issue`](crate::db::Db)); the token travels only in the
//! `oxvirt_portal` cookie (`HttpOnly; Secure; SameSite=Strict`), so page scripts never see it.
//! Logging out revokes it. Every POST must carry the session's CSRF token (derived from the
//! session token, so it needs no storage) and, when the browser sends `Origin`, come from this
//! very origin.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};

use crate::db::{Db, DbError};
use crate::model::User;

/// The session cookie's name.
pub const COOKIE: &str = "oxvirt_portal";
/// How long a portal session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// A logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: User,
    pub token: String,
    pub csrf: String,
}

/// The session token from the request's cookies.
pub fn cookie_token(h: &HeaderMap) -> Option<String> {
    for v in h.get_all(http::header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split(';') {
            if let Some((k, val)) = part.trim().split_once('=') {
                if k == COOKIE && !val.is_empty() {
                    return Some(val.to_string());
                }
            }
        }
    }
    None
}

/// The CSRF token bound to a session token.
pub fn csrf_for(token: &str) -> String {
    let d = Sha256::new()
        .chain_update(b"oxvirt-portal-csrf\0")
        .chain_update(token.as_bytes())
        .finalize();
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Compares in constant time (the token is a secret).
pub fn csrf_ok(session: &Session, given: Option<&str>) -> bool {
    let Some(g) = given else { return false };
    let (a, b) = (session.csrf.as_bytes(), g.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The request's session, if its cookie holds a valid token.
pub async fn session(db: &Db, h: &HeaderMap) -> Result<Option<Session>, DbError> {
    let Some(token) = cookie_token(h) else {
        return Ok(None);
    };
    Ok(db.token_validate(&token).await?.map(|t| Session {
        user: t.user,
        csrf: csrf_for(&token),
        token,
    }))
}

/// Whether a state-changing request comes from our own pages: when the browser names an
/// `Origin`, its host must be the `Host` the request was sent to.
pub fn same_origin(h: &HeaderMap) -> bool {
    let host = h
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match h.get(http::header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(o) => {
            let rest = o.strip_prefix("https://").or_else(|| o.strip_prefix("http://"));
            rest.is_some_and(|r| !host.is_empty() && r.eq_ignore_ascii_case(host))
        }
    }
}

pub fn set_cookie(token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
        SESSION_TTL.as_secs()
    ))
    .expect("a URL-safe token is a valid header")
}

pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("oxvirt_portal=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; oxvirt_portal=tok-en_1; b=2")]);
        assert_eq!(cookie_token(&h).as_deref(), Some("tok-en_1"));
        assert_eq!(cookie_token(&headers(&[("cookie", "oxvirt_portal=")])), None);
        assert_eq!(cookie_token(&headers(&[("cookie", "xoxvirt_portal=1")])), None);
    }

    #[test]
    fn csrf_is_bound_to_the_session() {
        let s = Session {
            user: User {
                id: crate::model::UserId::new_random(),
                name: "admin".into(),
                domain: "internal".into(),
                email: None,
                admin: true,
                created_at: crate::time::Timestamp::from_millis(0),
            },
            token: "t1".into(),
            csrf: csrf_for("t1"),
        };
        assert_eq!(s.csrf.len(), 32);
        assert!(csrf_ok(&s, Some(&csrf_for("t1"))));
        assert!(!csrf_ok(&s, Some(&csrf_for("t2"))));
        assert!(!csrf_ok(&s, None));
        assert!(!csrf_ok(&s, Some("")));
    }

    #[test]
    fn origin_must_match_the_host() {
        assert!(same_origin(&headers(&[("host", "127.0.0.1:8443")])));
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:8443"),
            ("origin", "https://127.0.0.1:8443")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:8443"),
            ("origin", "https://evil.example")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:8443"),
            ("origin", "null")
        ])));
    }

    #[test]
    fn cookies_are_locked_down() {
        let c = set_cookie("abc");
        let c = c.to_str().unwrap();
        for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(attr), "{c}");
        }
    }
}
