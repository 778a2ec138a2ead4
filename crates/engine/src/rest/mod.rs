//! The oVirt REST API v4 and its SSO, served so that the official Python SDK (`ovirtsdk4`) and
//! the `ovirt.ovirt` Ansible modules work unmodified.
//!
//! - [`routes()`] builds the [`ExtraRoutes`] that [`Engine::start`] serves next to enrollment:
//!   `/ovirt-engine/sso/oauth/token` (password grant), `/ovirt-engine/services/sso-logout`,
//!   `/ovirt-engine/services/pki-resource` (the CA certificate),
//!   and everything under `/ovirt-engine/api` (bearer token or HTTP Basic);
//! - [`routes::ROUTES`] is the route table: dispatch and the OpenAPI description
//!   ([`openapi`], served at `/ovirt-engine/api/openapi.json`) both come from it, so the
//!   description lists exactly what is served;
//! - [`out`] writes XML (default) or JSON (`Accept: application/json`), [`input`] reads
//!   either, [`search`] translates `search=` into the database's typed filters, [`fault`]
//!   maps the engine's errors onto statuses and `<fault>` bodies.
//!
//! Semantics the SDK depends on: GET answers 200; an add answers 201 with the entity and
//! `Location`, or — when storage work runs (disks, VMs cloned from a template, templates,
//! snapshots) — 202 at once with the entity still locked, unless the client sent
//! `Expect: 201-created` (then 201 once the work is done); DELETE answers 200 with an
//! `<action>` body (never 204); an action answers 200
//! with `<action><status>complete</status></action>`, or 202 `pending` with `<async>true`;
//! errors are `<fault>` with 400/401/404/409. Commands record jobs and events with the
//! request's `Correlation-Id` (header or `correlation_id=`).
//!
//! Architecture invariant: a translation layer only — every change goes through
//! [`crate::commands::Commands`] (or, for rows that have no command, one repository call).

pub mod fault;
mod handlers;
pub mod input;
pub mod openapi;
pub mod out;
pub mod routes;
pub mod search;
mod sso;
mod write;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use oxvirt_rpc::{HttpRequest, Reply};

use crate::daemon::{Engine, ExtraRoutes};
use crate::model::User;

use fault::ApiError;
use out::{Format, Out};

/// Where the API lives.
pub const API: &str = "/ovirt-engine/api";
/// The SSO token endpoint.
pub const SSO_TOKEN: &str = "/ovirt-engine/sso/oauth/token";
/// The SSO logout endpoint.
pub const SSO_LOGOUT: &str = "/ovirt-engine/services/sso-logout";
/// oVirt's PKI download (`?resource=ca-certificate&format=X509-PEM-CA`): the engine's CA,
/// unauthenticated, as clients fetch it for `ca_file` (the SDK, ovirt-imageio).
pub const PKI_RESOURCE: &str = "/ovirt-engine/services/pki-resource";
/// How long an SSO token lives (oVirt's default session lifetime is hours, not days).
pub const TOKEN_TTL: Duration = Duration::from_secs(10 * 3600);

/// The routes to pass to [`Engine::start`]: `Engine::start(cfg, Some(oxvirt_engine::rest::routes()))`.
pub fn routes() -> ExtraRoutes {
    Arc::new(|engine: Arc<Engine>, req: HttpRequest| Box::pin(handle(engine, req)))
}

fn pki_resource(engine: &Engine, req: &HttpRequest) -> Reply {
    let query = parse_query(req.query.as_deref().unwrap_or(""));
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    match (get("resource"), get("format")) {
        (Some("ca-certificate"), None | Some("X509-PEM-CA" | "X509-PEM")) => Reply::Full {
            status: http::StatusCode::OK,
            content_type: "application/x-x509-ca-cert",
            body: bytes::Bytes::from(engine.ca_pem()),
        },
        (r, f) => Reply::text(
            http::StatusCode::NOT_FOUND,
            format!(
                "no PKI resource {r:?} in format {f:?} (only resource=ca-certificate&format=X509-PEM-CA)"
            ),
        ),
    }
}

/// Serves one request (also usable without HTTP, e.g. from benchmarks and tests).
pub async fn handle(engine: Arc<Engine>, req: HttpRequest) -> Reply {
    let path = req.path.trim_end_matches('/').to_string();
    if path == SSO_TOKEN || path == SSO_LOGOUT {
        return sso::handle(&engine, &req, path == SSO_TOKEN).await;
    }
    if path == PKI_RESOURCE {
        return pki_resource(&engine, &req);
    }
    let fmt = response_format(&req.headers, req.query.as_deref());
    let Some(rest) = path.strip_prefix(API) else {
        return fault_reply(fmt, &ApiError::not_found(format!("no such path {}", req.path)));
    };
    let rest = if rest.is_empty() { "/" } else { rest }.to_string();
    let user = match sso::authenticate(&engine, &req.headers).await {
        Ok(u) => u,
        Err(e) => return fault_reply(fmt, &e),
    };
    let query = parse_query(req.query.as_deref().unwrap_or(""));
    let correlation_id = req
        .headers
        .get("correlation-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            query
                .iter()
                .find(|(k, _)| k == "correlation_id")
                .map(|(_, v)| v.clone())
        })
        .filter(|s| !s.is_empty());
    // oVirt answers an add whose storage work runs 202 at once, unless asked to wait.
    let blocking = req
        .headers
        .get_all(http::header::EXPECT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|e| e.trim().eq_ignore_ascii_case("201-created")));
    let json_body = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let (op, params) = match routes::resolve(&req.method, &rest) {
        Ok(x) => x,
        Err(e) => return fault_reply(fmt, &e),
    };
    let ctx = Req {
        engine,
        method: req.method,
        params,
        query,
        body: req.body,
        fmt,
        json_body,
        correlation_id,
        blocking,
        user,
    };
    // `max` applies to every collection (see `Req::out`): a bad one fails the request.
    if let Err(e) = ctx.list_params() {
        return fault_reply(fmt, &e);
    }
    let started = std::time::Instant::now();
    let r = handlers::dispatch(op, &ctx).await;
    tracing::debug!(op = ?op, path = %rest, elapsed_ms = started.elapsed().as_millis() as u64, "REST request");
    match r {
        Ok(resp) => resp.into_reply(fmt),
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(path = %rest, reason = e.reason, detail = %e.detail, "REST request failed");
            }
            fault_reply(fmt, &e)
        }
    }
}

/// JSON when `Accept` asks for it (or `?accept=application/json`), else XML.
fn response_format(h: &HeaderMap, query: Option<&str>) -> Format {
    let accept = h
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("application/json") && !accept.contains("xml") {
        return Format::Json;
    }
    if query.is_some_and(|q| q.contains("accept=application%2Fjson") || q.contains("accept=application/json"))
    {
        return Format::Json;
    }
    Format::Xml
}

/// Decodes `a=b&c=d+e` (percent escapes, `+` as space).
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

pub fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One API request after authentication and routing.
pub struct Req {
    pub engine: Arc<Engine>,
    pub method: Method,
    /// Path parameters in route order.
    pub params: Vec<String>,
    pub query: Vec<(String, String)>,
    pub body: Bytes,
    pub fmt: Format,
    pub json_body: bool,
    pub correlation_id: Option<String>,
    /// `Expect: 201-created`: an add answers once its storage work is done.
    pub blocking: bool,
    pub user: User,
}

/// A successful answer.
pub enum Resp {
    Doc {
        status: StatusCode,
        body: String,
        location: Option<String>,
    },
    /// A JSON document whatever the requested format (the OpenAPI description).
    Json(serde_json::Value),
}

impl Resp {
    pub fn ok(out: Out) -> Resp {
        Resp::Doc {
            status: StatusCode::OK,
            body: out.finish(),
            location: None,
        }
    }
    pub fn created(out: Out, location: String) -> Resp {
        Resp::Doc {
            status: StatusCode::CREATED,
            body: out.finish(),
            location: Some(location),
        }
    }
    /// The answer to an add: 201 with `Location`, or 202 when it was answered while its
    /// storage work went on (see [`Req::adding`]; the entity's `href` says where to watch it).
    pub fn added(out: Out, location: String, pending: bool) -> Resp {
        if pending {
            Resp::accepted(out)
        } else {
            Resp::created(out, location)
        }
    }
    pub fn accepted(out: Out) -> Resp {
        Resp::Doc {
            status: StatusCode::ACCEPTED,
            body: out.finish(),
            location: None,
        }
    }

    fn into_reply(self, fmt: Format) -> Reply {
        let (status, body, location) = match self {
            Resp::Doc {
                status,
                body,
                location,
            } => (status, body, location),
            Resp::Json(v) => return reply(StatusCode::OK, Format::Json, HeaderMap::new(), v.to_string()),
        };
        let mut headers = HeaderMap::new();
        if let Some(l) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            headers.insert(http::header::LOCATION, l);
        }
        reply(status, fmt, headers, body)
    }
}

fn reply(status: StatusCode, fmt: Format, mut headers: HeaderMap, body: String) -> Reply {
    headers.insert("version", HeaderValue::from_static("4"));
    Reply::Headers {
        status,
        content_type: fmt.content_type(),
        headers,
        body: Bytes::from(body),
    }
}

pub fn fault_doc(fmt: Format, e: &ApiError) -> String {
    let mut o = Out::new(fmt);
    o.root("fault", None, None);
    o.leaf("reason", e.reason);
    o.leaf("detail", &e.detail);
    o.close("fault");
    o.finish()
}

pub fn fault_reply(fmt: Format, e: &ApiError) -> Reply {
    let mut headers = HeaderMap::new();
    if e.status == StatusCode::UNAUTHORIZED {
        headers.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"RESTAPI\""),
        );
    }
    reply(e.status, fmt, headers, fault_doc(fmt, e))
}

impl Req {
    pub fn db(&self) -> &crate::db::Db {
        &self.engine.cmds.app.db
    }
    pub fn cmds(&self) -> &crate::commands::Commands {
        &self.engine.cmds
    }
    /// The commands for an add with storage work: answering once it is recorded, unless the
    /// client sent `Expect: 201-created`. Such an add answers 202 when the command says its
    /// work was pending ([`crate::commands::Added`]: by the kind of request, as oVirt decides,
    /// not by whether the work happened to end first).
    pub fn adding(&self) -> crate::commands::Commands {
        use crate::commands::Answer;
        let answer = if self.blocking {
            Answer::WhenDone
        } else {
            Answer::WhenRecorded
        };
        self.engine.cmds.answering(answer)
    }
    pub fn q(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn q_bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.q(name) {
            None => Ok(None),
            Some("") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(ApiError::bad_request(format!(
                "query parameter {name} must be true or false, not {v:?}"
            ))),
        }
    }
    pub fn param(&self, i: usize) -> &str {
        &self.params[i]
    }
    /// The path parameter `i` as a typed id; a malformed id is a missing object (404).
    pub fn id<T: std::str::FromStr>(&self, i: usize, kind: &str) -> Result<T, ApiError> {
        self.params[i]
            .parse()
            .map_err(|_| ApiError::not_found(format!("{kind} {} not found", self.params[i])))
    }
    pub fn body(&self, root: &str) -> Result<input::Elem, ApiError> {
        input::parse_body(&self.body, self.json_body, root)
    }
    /// An action's body; an empty body is an empty `<action/>`.
    pub fn action_body(&self) -> Result<input::Elem, ApiError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(input::Elem::new("action"));
        }
        self.body("action")
    }
    /// The reply's writer; collections written to it honour `max` (checked at dispatch).
    pub fn out(&self) -> Out {
        let max = self.list_params().ok().and_then(|p| p.max).map(|m| m as usize);
        Out::new(self.fmt).with_max(max)
    }
    pub fn list_params(&self) -> Result<search::ListParams, ApiError> {
        let max = match self.q("max") {
            None | Some("") | Some("-1") => None,
            Some(v) => Some(
                v.parse::<u32>()
                    .map_err(|_| ApiError::bad_request(format!("max must be a number, not {v:?}")))?,
            ),
        };
        Ok(search::ListParams {
            max,
            case_sensitive: self.q_bool("case_sensitive")?.unwrap_or(true),
        })
    }
    pub fn search(&self) -> Result<search::Search, ApiError> {
        search::parse(self.q("search").unwrap_or(""))
    }
    /// `follow=a,b.c` as a list of dotted paths.
    pub fn follow(&self) -> Vec<String> {
        self.q("follow")
            .unwrap_or("")
            .split(',')
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = parse_query("search=name%3D%22my+vm%22+and+status%3Dup&max=10&follow=nics");
        assert_eq!(q[0], ("search".into(), "name=\"my vm\" and status=up".into()));
        assert_eq!(q[1], ("max".into(), "10".into()));
        assert_eq!(url_decode("a%2"), "a%2");
        assert_eq!(url_decode("%e2%82%ac"), "€");
    }
}
