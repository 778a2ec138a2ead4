//! The web admin portal: server-rendered pages under `/portal/`, served by the engine next to
//! the REST API, with a little vanilla JavaScript and no build step.
//!
//! - [`routes_with`] wraps another [`ExtraRoutes`] (the REST API): the portal serves `/` (a
//!   redirect) and `/portal/…`, everything else goes to the wrapped routes;
//! - [`auth`]: login with the API's users, the session cookie backed by the database's tokens,
//!   CSRF tokens and the same-origin check on every POST;
//! - [`pages`]: the dashboard and the object pages (data centers … events), rendered from the
//!   database with no node call; most list pages read each table once, but a few read per
//!   row (a data center's pool members, a VM's snapshots on the snapshots page, a job's saga),
//!   which the page sizes bound (the snapshots page lists 100 VMs at a time);
//! - [`actions`]: POSTs that run commands (start, stop, migrate, snapshot, …) in the background,
//!   tagged with a correlation id so that their jobs' progress shows; an in-memory log reports
//!   their outcome to the browser;
//! - [`live`]: the small JSON endpoints the page script polls every two seconds (statuses,
//!   job progress, new events, chart history, a VM's serial console);
//! - [`history`]: the bounded in-memory CPU/memory history behind the charts, filled by a
//!   sampler task started with the first request;
//! - `assets/`: the stylesheet and the script, compiled into the binary.
//!
//! Architecture invariant: a view over [`crate::commands::Commands`] and the database like the
//! REST layer — every change goes through a command; nothing the portal keeps in memory (the
//! history, the action log) is state a restart needs.

pub mod actions;
pub mod auth;
pub mod history;
pub mod html;
pub mod live;
pub mod pages;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use oxvirt_rpc::{HttpRequest, Reply};
use serde_json::Value;

use crate::commands::CommandError;
use crate::daemon::{Engine, ExtraRoutes};
use crate::db::DbError;

use auth::Session;
use history::History;

/// Where the portal lives.
pub const PREFIX: &str = "/portal";
/// How often the sampler records host and VM figures by default.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

const CSS: &str = include_str!("assets/portal.css");
const JS: &str = include_str!("assets/portal.js");
const ICON: &str = include_str!("assets/icon.svg");

/// The portal's in-memory parts: chart history and the log of actions started from it.
pub struct Portal {
    pub history: Arc<History>,
    pub actions: actions::ActionLog,
    sample_interval: Duration,
    sampler: OnceLock<()>,
}

impl Portal {
    pub fn new() -> Arc<Portal> {
        Self::with_sample_interval(SAMPLE_INTERVAL)
    }

    pub fn with_sample_interval(sample_interval: Duration) -> Arc<Portal> {
        Arc::new(Portal {
            history: Arc::new(History::new()),
            actions: actions::ActionLog::default(),
            sample_interval,
            sampler: OnceLock::new(),
        })
    }

    /// Whether `path` is the portal's (the rest belongs to the REST API).
    pub fn claims(path: &str) -> bool {
        path == "/" || path == PREFIX || path.starts_with("/portal/")
    }

    /// Starts the history sampler once; it ends when the engine is dropped.
    pub fn ensure_sampler(&self, engine: &Arc<Engine>) {
        self.sampler.get_or_init(|| {
            tokio::spawn(history::run_sampler(
                Arc::downgrade(engine),
                self.history.clone(),
                self.sample_interval,
            ));
        });
    }

    /// Serves one portal request.
    pub async fn handle(self: &Arc<Self>, engine: Arc<Engine>, req: HttpRequest) -> Reply {
        self.ensure_sampler(&engine);
        let started = std::time::Instant::now();
        let path = req.path.clone();
        let reply = match self.route(&engine, req).await {
            Ok(r) => r,
            Err(e) => e.reply(),
        };
        tracing::debug!(path = %path, elapsed_ms = started.elapsed().as_millis() as u64, "portal request");
        reply
    }

    async fn route(self: &Arc<Self>, engine: &Arc<Engine>, req: HttpRequest) -> Result<Reply, PortalError> {
        if req.path == "/" || req.path == PREFIX {
            return Ok(redirect("/portal/"));
        }
        let path = req.path.trim_end_matches('/');
        let rest = path.strip_prefix(PREFIX).unwrap_or(path).to_string();
        let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        match (&req.method, segs.as_slice()) {
            (&Method::GET, ["static", file]) => return static_file(file),
            (&Method::GET, ["login"]) => return Ok(pages::login_page(req.query.as_deref(), None)),
            (&Method::POST, ["login"]) => return actions::login(engine, &req).await,
            _ => {}
        }
        let db = &engine.cmds.app.db;
        let session = auth::session(db, &req.headers).await?;
        let is_api = segs.first() == Some(&"api");
        let Some(session) = session else {
            if req.method == Method::GET && !is_api {
                let next = match &req.query {
                    Some(q) => format!("{}?{q}", req.path),
                    None => req.path.clone(),
                };
                return Ok(redirect(&format!("/portal/login?next={}", url_encode(&next))));
            }
            return Err(PortalError::Unauthorized("log in first".into()));
        };
        let query = crate::rest::parse_query(req.query.as_deref().unwrap_or(""));
        let ctx = Ctx {
            portal: self.clone(),
            engine: engine.clone(),
            session,
            query,
        };
        if req.method == Method::GET {
            return match segs.as_slice() {
                ["api", "live"] => live::live(&ctx).await,
                ["api", "history"] => live::history(&ctx).await,
                ["api", "console"] => live::console(&ctx).await,
                ["api", "console.vv"] => live::console_file(&ctx).await,
                _ => pages::page(&ctx, &segs, &req).await,
            };
        }
        if req.method != Method::POST {
            return Err(PortalError::MethodNotAllowed(format!(
                "{} {}",
                req.method, req.path
            )));
        }
        if !auth::same_origin(&req.headers) {
            return Err(PortalError::Forbidden("cross-origin request refused".into()));
        }
        let form = crate::rest::parse_query(std::str::from_utf8(&req.body).unwrap_or(""));
        let form = Form(form);
        if !auth::csrf_ok(&ctx.session, form.get("csrf")) {
            return Err(PortalError::Forbidden(
                "the form's CSRF token is missing or stale: reload the page".into(),
            ));
        }
        let fetch = req.headers.contains_key("x-portal-fetch");
        actions::post(&ctx, &segs, &form, fetch).await
    }
}

/// The portal's routes, falling back to `fallback` for every path the portal does not claim.
///
/// `oxvirt_engine::portal::routes_with(oxvirt_engine::rest::routes())` serves both.
pub fn routes_with(fallback: ExtraRoutes) -> ExtraRoutes {
    let portal = Portal::new();
    Arc::new(move |engine: Arc<Engine>, req: HttpRequest| {
        let (portal, fallback) = (portal.clone(), fallback.clone());
        Box::pin(async move {
            if Portal::claims(&req.path) {
                portal.handle(engine, req).await
            } else {
                portal.ensure_sampler(&engine);
                fallback(engine, req).await
            }
        })
    })
}

/// The portal alone (every other path is a 404).
pub fn routes() -> ExtraRoutes {
    routes_with(Arc::new(|_e, req: HttpRequest| {
        Box::pin(async move { Reply::text(StatusCode::NOT_FOUND, format!("no such path {}", req.path)) })
    }))
}

/// One authenticated portal request.
pub struct Ctx {
    pub portal: Arc<Portal>,
    pub engine: Arc<Engine>,
    pub session: Session,
    pub query: Vec<(String, String)>,
}

impl Ctx {
    pub fn db(&self) -> &crate::db::Db {
        &self.engine.cmds.app.db
    }
    pub fn cmds(&self) -> &crate::commands::Commands {
        &self.engine.cmds
    }
    pub fn q(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// A decoded form body.
pub struct Form(pub Vec<(String, String)>);

impl Form {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }
    pub fn required(&self, name: &str, what: &str) -> Result<&str, PortalError> {
        self.get(name)
            .ok_or_else(|| PortalError::Bad(format!("{what} is required")))
    }
    pub fn parse<T: std::str::FromStr>(&self, name: &str, what: &str) -> Result<Option<T>, PortalError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| PortalError::Bad(format!("{what} {v:?} is not valid"))),
        }
    }
}

/// Why a portal request failed.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Internal(String),
}

impl From<DbError> for PortalError {
    fn from(e: DbError) -> Self {
        PortalError::Internal(error_chain(&e))
    }
}

impl From<CommandError> for PortalError {
    fn from(e: CommandError) -> Self {
        match &e {
            CommandError::NotFound { .. } => PortalError::NotFound(e.to_string()),
            CommandError::Invalid(_) => PortalError::Bad(e.to_string()),
            CommandError::Conflict(_) | CommandError::Failed { .. } => PortalError::Conflict(e.to_string()),
            _ => PortalError::Internal(error_chain(&e)),
        }
    }
}

/// An error with its sources, for the admin to read.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

impl PortalError {
    pub fn status(&self) -> StatusCode {
        match self {
            PortalError::NotFound(_) => StatusCode::NOT_FOUND,
            PortalError::Bad(_) => StatusCode::BAD_REQUEST,
            PortalError::Conflict(_) => StatusCode::CONFLICT,
            PortalError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            PortalError::Forbidden(_) => StatusCode::FORBIDDEN,
            PortalError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            PortalError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn reply(&self) -> Reply {
        if self.status().is_server_error() {
            tracing::warn!(error = %self, "portal request failed");
        }
        let mut body = html::Html::new();
        body.heading(self.status().canonical_reason().unwrap_or("Error"), None)
            .raw("<p class=\"error\">")
            .text(self.to_string())
            .raw("</p><p><a href=\"/portal/\">Back to the dashboard</a></p>");
        html_reply(
            self.status(),
            html::layout("Error", "", None, None, &body.finish()),
        )
    }
}

fn security_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h
}

/// A file to save (`Content-Disposition: attachment`), never cached.
pub fn file_reply(content_type: &'static str, filename: &str, body: String) -> Reply {
    let mut headers = security_headers();
    headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let safe: String = filename
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
        headers.insert(http::header::CONTENT_DISPOSITION, v);
    }
    Reply::Headers {
        status: StatusCode::OK,
        content_type,
        headers,
        body: Bytes::from(body),
    }
}

pub fn html_reply(status: StatusCode, body: String) -> Reply {
    let mut headers = security_headers();
    headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Reply::Headers {
        status,
        content_type: "text/html; charset=utf-8",
        headers,
        body: Bytes::from(body),
    }
}

pub fn json_reply(status: StatusCode, v: &Value) -> Reply {
    let mut headers = security_headers();
    headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Reply::Headers {
        status,
        content_type: "application/json",
        headers,
        body: Bytes::from(v.to_string()),
    }
}

pub fn redirect(location: &str) -> Reply {
    redirect_with(location, None)
}

pub fn redirect_with(location: &str, cookie: Option<HeaderValue>) -> Reply {
    let mut headers = security_headers();
    headers.insert(
        http::header::LOCATION,
        HeaderValue::from_str(location).unwrap_or(HeaderValue::from_static("/portal/")),
    );
    if let Some(c) = cookie {
        headers.insert(http::header::SET_COOKIE, c);
    }
    headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Reply::Headers {
        status: StatusCode::SEE_OTHER,
        content_type: "text/plain; charset=utf-8",
        headers,
        body: Bytes::new(),
    }
}

/// Serves a compiled-in asset; with `OXVIRT_PORTAL_ASSETS=<dir>` (working on the portal) the
/// file is read from that directory on each request instead, so edits show without a rebuild.
fn static_file(name: &str) -> Result<Reply, PortalError> {
    let (ct, body) = match name {
        "portal.css" => ("text/css; charset=utf-8", CSS),
        "portal.js" => ("text/javascript; charset=utf-8", JS),
        "icon.svg" => ("image/svg+xml", ICON),
        _ => return Err(PortalError::NotFound(format!("no such file {name}"))),
    };
    let body = match std::env::var_os("OXVIRT_PORTAL_ASSETS") {
        Some(dir) => Bytes::from(
            std::fs::read(std::path::Path::new(&dir).join(name))
                .map_err(|e| PortalError::NotFound(format!("asset {name} in OXVIRT_PORTAL_ASSETS: {e}")))?,
        ),
        None => Bytes::from_static(body.as_bytes()),
    };
    let mut headers = security_headers();
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=300"),
    );
    Ok(Reply::Headers {
        status: StatusCode::OK,
        content_type: ct,
        headers,
        body,
    })
}

/// Percent-encodes a query value.
pub fn url_encode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => o.push(b as char),
            _ => o.push_str(&format!("%{b:02X}")),
        }
    }
    o
}

/// A `back`/`next` target is followed only when it stays inside the portal.
pub fn safe_back(target: Option<&str>) -> String {
    match target {
        Some(t) if t.starts_with("/portal/") && !t.starts_with("//") && !t.contains('\\') => t.to_string(),
        _ => "/portal/".to_string(),
    }
}

#[cfg(test)]
mod flow_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_only_the_portal() {
        assert!(Portal::claims("/"));
        assert!(Portal::claims("/portal"));
        assert!(Portal::claims("/portal/vms"));
        assert!(!Portal::claims("/portalx"));
        assert!(!Portal::claims("/ovirt-engine/api"));
    }

    #[test]
    fn redirects_stay_inside() {
        assert_eq!(safe_back(Some("/portal/vms?x=1")), "/portal/vms?x=1");
        for bad in [
            "https://evil",
            "//evil/portal/",
            "/ovirt-engine/api",
            "/portal\\x",
        ] {
            assert_eq!(safe_back(Some(bad)), "/portal/", "{bad}");
        }
        assert_eq!(url_encode("/portal/vms?a=b c"), "/portal/vms%3Fa%3Db%20c");
    }
}
