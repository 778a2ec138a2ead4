//! The engine's REST API as the CLI uses it: JSON in and out with the stored bearer token,
//! `<fault>`s turned into errors that say what failed, names resolved to ids through
//! `search=name=…`, and the SSO login/logout exchanges.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;

use super::config::Session;
use super::transport::{encode, Endpoint, Http, Trust};

pub const API: &str = "/ovirt-engine/api";
const SSO_TOKEN: &str = "/ovirt-engine/sso/oauth/token";
const SSO_LOGOUT: &str = "/ovirt-engine/services/sso-logout";

/// How long one request may take. Synchronous actions (a VM start, a storage domain
/// activation) answer only when done, so this is generous.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

pub struct Api {
    pub http: Http,
    token: String,
    user: String,
}

/// The answer to a successful SSO password grant.
pub struct Login {
    pub token: String,
    pub expires: Option<u64>,
}

/// Asks the engine's SSO for a token; a refusal is an error carrying the engine's reason.
pub async fn sso_login(http: &Http, user: &str, password: &str) -> anyhow::Result<Login> {
    let form = format!(
        "grant_type=password&scope=ovirt-app-api&username={}&password={}",
        encode(user),
        encode(password)
    );
    let r = http
        .send(
            Method::POST,
            SSO_TOKEN,
            &[("accept", "application/json".into())],
            Some(("application/x-www-form-urlencoded", Bytes::from(form))),
        )
        .await?;
    let v: Value = serde_json::from_slice(&r.body).with_context(|| {
        format!(
            "the engine's SSO answered HTTP {} with something that is not JSON",
            r.status
        )
    })?;
    if !r.status.is_success() {
        let why = v["error"].as_str().unwrap_or("no reason given");
        anyhow::bail!("login as {user} refused: {why}");
    }
    let token = v["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| anyhow::anyhow!("the engine's SSO answered without an access_token"))?
        .to_string();
    let expires = v["exp"].as_str().and_then(|s| s.parse().ok());
    Ok(Login { token, expires })
}

/// Revokes a token at the SSO.
pub async fn sso_logout(http: &Http, token: &str) -> anyhow::Result<()> {
    let form = format!("scope=&token={}", encode(token));
    let r = http
        .send(
            Method::POST,
            SSO_LOGOUT,
            &[],
            Some(("application/x-www-form-urlencoded", Bytes::from(form))),
        )
        .await?;
    anyhow::ensure!(
        r.status.is_success(),
        "the engine refused the logout (HTTP {})",
        r.status
    );
    Ok(())
}

/// Fetches the engine's CA certificate (PEM) without checking the server (it is checked by
/// fingerprint afterwards).
pub async fn fetch_ca(ep: &Endpoint) -> anyhow::Result<String> {
    let http = Http::new(ep.clone(), &Trust::Insecure, Duration::from_secs(30))?;
    let r = http
        .send(Method::GET, oxvirt_types::api::CA_PATH, &[], None)
        .await?;
    anyhow::ensure!(
        r.status == StatusCode::OK,
        "the engine at {} did not serve its CA certificate (HTTP {})",
        ep.url(),
        r.status
    );
    String::from_utf8(r.body.to_vec()).context("the engine's CA certificate is not text")
}

impl Api {
    pub fn new(http: Http, token: String, user: String) -> Api {
        Api { http, token, user }
    }

    pub fn from_session(s: &Session) -> anyhow::Result<Api> {
        let ep = Endpoint::parse(&s.url)?;
        let http = Http::new(ep, &s.trust()?, REQUEST_TIMEOUT)?;
        Ok(Api::new(http, s.token.clone(), s.user.clone()))
    }

    /// One API request; `path` is relative to `/ovirt-engine/api` and may carry a query.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        correlation_id: Option<&str>,
    ) -> anyhow::Result<Value> {
        let full = format!("{API}{path}");
        let mut headers = vec![
            ("authorization", format!("Bearer {}", self.token)),
            ("accept", "application/json".to_string()),
            ("version", "4".to_string()),
        ];
        if let Some(c) = correlation_id {
            headers.push(("correlation-id", c.to_string()));
        }
        // An add answers once its storage work is done (the request's job shows how it goes),
        // not 202 at once.
        if method == Method::POST {
            headers.push(("expect", "201-created".to_string()));
        }
        let body = body.map(|b| ("application/json", Bytes::from(b.to_string())));
        let r = self.http.send(method.clone(), &full, &headers, body).await?;
        if r.status == StatusCode::UNAUTHORIZED {
            anyhow::bail!(
                "the engine refused the stored session of {} (expired or logged out): log in again with \
                 `oxvirt login --url {} --user {}`",
                self.user,
                self.http.endpoint().url(),
                self.user
            );
        }
        let v: Value = if r.body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&r.body).with_context(|| {
                format!(
                    "{method} {full}: the engine answered HTTP {} with something that is not JSON: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
                )
            })?
        };
        if !r.status.is_success() {
            let reason = v["reason"].as_str().unwrap_or("");
            let detail = v["detail"].as_str().unwrap_or("");
            anyhow::bail!(
                "{} (HTTP {}{})",
                if detail.is_empty() { reason } else { detail },
                r.status.as_u16(),
                if reason.is_empty() || detail.is_empty() {
                    String::new()
                } else {
                    format!(" {reason}")
                }
            );
        }
        Ok(v)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.request(Method::GET, path, None, None).await
    }

    /// A collection as a list of its members (`{"vm": [...]}`, or `{}` when empty).
    pub async fn list(&self, coll: &str, elem: &str, query: &[(&str, String)]) -> anyhow::Result<Vec<Value>> {
        let mut path = format!("/{coll}");
        for (i, (k, v)) in query.iter().enumerate() {
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str(k);
            path.push('=');
            path.push_str(&encode(v));
        }
        let mut v = self.get(&path).await?;
        Ok(match v.get_mut(elem).map(Value::take) {
            Some(Value::Array(a)) => a,
            Some(Value::Null) | None => Vec::new(),
            Some(other) => vec![other],
        })
    }

    /// The id of the `kind` named `name_or_id`: an id is taken as it is; a name is looked up
    /// with `search=name="…"` and must match exactly one object.
    pub async fn resolve(&self, kind: &super::kinds::Kind, name_or_id: &str) -> anyhow::Result<String> {
        if looks_like_id(name_or_id) {
            return Ok(name_or_id.to_string());
        }
        anyhow::ensure!(
            !name_or_id.is_empty() && !name_or_id.contains('*'),
            "{:?} is not a {} name",
            name_or_id,
            kind.what
        );
        let q = format!(
            "name=\"{}\"",
            name_or_id.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let found = self.list(kind.coll, kind.elem, &[("search", q)]).await?;
        let ids: Vec<&str> = found
            .iter()
            .filter(|o| o["name"].as_str() == Some(name_or_id))
            .filter_map(|o| o["id"].as_str())
            .collect();
        match ids.as_slice() {
            [id] => Ok(id.to_string()),
            [] => anyhow::bail!("no {} named {name_or_id:?}", kind.what),
            _ => anyhow::bail!(
                "{} {}s are named {name_or_id:?}: give the id",
                ids.len(),
                kind.what
            ),
        }
    }
}

/// A UUID (`8-4-4-4-12` hex digits).
pub fn looks_like_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_recognised() {
        assert!(looks_like_id("5b0e9b3c-0000-4000-8000-000000000000"));
        assert!(!looks_like_id("my-vm"));
        assert!(!looks_like_id("5b0e9b3c-0000-4000-8000-00000000000g"));
    }
}
