//! The transfer listener: ovirt-imageio's HTTP protocol over TLS.
//!
//! | request | what |
//! |---|---|
//! | `OPTIONS /images/<ticket>` | `{"features": [...], "max_readers", "max_writers"}` |
//! | `GET /images/<ticket>` (`Range: bytes=a-b`) | guest data (206; 200 for the whole image) |
//! | `PUT /images/<ticket>` (`Content-Range: bytes a-b/*`, `?flush=y\|n`) | write guest data |
//! | `PATCH /images/<ticket>` `{"op":"zero","offset","size","flush"}` / `{"op":"flush"}` | |
//! | `GET /images/<ticket>/extents?context=zero` | `[{"start","length","zero","hole"}]` |
//!
//! The server presents the node's certificate and asks for none: the ticket id in the path is
//! the credential (as in ovirt-imageio), and tickets are short-lived and engine-issued. Each
//! HTTP connection keeps one NBD connection for the ticket it uses, so a client's workers (one
//! connection each, up to [`MAX_CONNECTIONS`]) write in parallel through `qemu-nbd --shared`.
//! Bodies stream: a PUT is written in pieces of at most [`CHUNK`] bytes as they arrive.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, OwnedMutexGuard, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::{ConnectionGuard, ImageService, Operation, TicketOp, TransferError};
use oxvirt_qemu::nbd::{NbdClient, NbdError};

/// Parallel connections the listener serves (and `qemu-nbd --shared`): what OPTIONS advertises
/// as `max_readers`/`max_writers`.
pub const MAX_CONNECTIONS: usize = 8;
/// Largest piece read from or written to NBD at once.
pub const CHUNK: usize = 4 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_PATCH: usize = 64 << 10;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    svc: Arc<ImageService>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    // More connections than qemu-nbd's clients wait in the backlog.
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS * 2));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => p.expect("semaphore never closes"),
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "transfer listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, svc) = (acceptor.clone(), svc.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "transfer listener: TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let conn = Arc::new(Conn {
                svc,
                nbd: Arc::new(Mutex::new(None)),
            });
            let service = hyper::service::service_fn(move |req| {
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(conn.handle(req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "transfer connection ended with an error");
            }
        });
    }
}

/// The NBD connection an HTTP connection keeps for its ticket.
struct Cached {
    ticket: String,
    client: NbdClient,
    _counted: ConnectionGuard,
}

struct Conn {
    svc: Arc<ImageService>,
    nbd: Arc<Mutex<Option<Cached>>>,
}

/// A reply with a message, as ovirt-imageio sends errors (text, newline-terminated).
fn text(status: StatusCode, msg: impl std::fmt::Display) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

fn json_reply(v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(v.to_string())));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn refused(e: &TransferError) -> Response<Body> {
    match e {
        TransferError::NoTicket(_)
        | TransferError::Expired(_)
        | TransferError::Canceled(_)
        | TransferError::Forbidden { .. } => text(
            StatusCode::FORBIDDEN,
            format!("You are not allowed to access this resource: {e}"),
        ),
        other => text(StatusCode::INTERNAL_SERVER_ERROR, other),
    }
}

fn nbd_failed(e: &NbdError) -> Response<Body> {
    let status = match e {
        NbdError::OutOfRange { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        NbdError::ReadOnly { .. } => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(status, crate::api::storage::error_chain(e))
}

/// `bytes=a-b` or `bytes=a-` against an image of `size` bytes: the inclusive range.
fn parse_range(v: &str, size: u64) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end: u64 = match b.trim() {
        "" => size.checked_sub(1)?,
        b => b.parse::<u64>().ok()?.min(size.checked_sub(1)?),
    };
    (start <= end && start < size).then_some((start, end))
}

/// `bytes a-b/*` (or `/total`): the first offset and the length.
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes ")?;
    let (range, _total) = spec.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end: u64 = b.trim().parse().ok()?;
    (start <= end).then(|| (start, end - start + 1))
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Patch {
    Zero {
        offset: u64,
        size: u64,
        #[serde(default)]
        flush: bool,
    },
    Flush,
}

impl Conn {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let Some(rest) = path.strip_prefix("/images/") else {
            return text(StatusCode::NOT_FOUND, format!("no such path {path}"));
        };
        let (ticket, extents) = match rest.strip_suffix("/extents") {
            Some(t) => (t.to_string(), true),
            None => (rest.to_string(), false),
        };
        let query = req.uri().query().unwrap_or_default().to_string();
        tracing::debug!(method = %req.method(), ticket = %ticket, extents, "transfer request");
        match (req.method().clone(), extents) {
            (Method::OPTIONS, false) => self.options(&ticket),
            (Method::GET, true) => self.extents(&ticket, &query).await,
            (Method::GET, false) => self.get(&ticket, &req).await,
            (Method::PUT, false) => self.put(&ticket, &query, req).await,
            (Method::PATCH, false) => self.patch(&ticket, req).await,
            _ => text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not allowed on {path}", req.method()),
            ),
        }
    }

    /// The NBD connection for the ticket, opened on first use on this HTTP connection.
    async fn client(&self, op: &Operation) -> Result<OwnedMutexGuard<Option<Cached>>, NbdError> {
        let mut guard = self.nbd.clone().lock_owned().await;
        let entry = op.entry();
        if guard.as_ref().is_none_or(|c| c.ticket != entry.ticket.uuid) {
            *guard = None;
            let client = NbdClient::connect(&entry.socket).await?;
            *guard = Some(Cached {
                ticket: entry.ticket.uuid.clone(),
                client,
                _counted: self.svc.connection(entry),
            });
        }
        Ok(guard)
    }

    fn options(&self, ticket: &str) -> Response<Body> {
        let all = json!({
            "features": ["extents", "zero", "flush"],
            "max_readers": MAX_CONNECTIONS,
            "max_writers": MAX_CONNECTIONS,
        });
        if ticket == "*" {
            return json_reply(&all);
        }
        let op = match self.svc.authorize(ticket, TicketOp::Read) {
            Ok(op) => op,
            Err(e) => return refused(&e),
        };
        if op.entry().may(TicketOp::Write) {
            json_reply(&all)
        } else {
            json_reply(&json!({
                "features": ["extents"],
                "max_readers": MAX_CONNECTIONS,
                "max_writers": MAX_CONNECTIONS,
            }))
        }
    }

    async fn extents(&self, ticket: &str, query: &str) -> Response<Body> {
        let context = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("context="))
            .unwrap_or("zero");
        if context != "zero" {
            return text(
                StatusCode::NOT_FOUND,
                format!("ticket {ticket} has no {context:?} extents (only \"zero\")"),
            );
        }
        let op = match self.svc.authorize(ticket, TicketOp::Read) {
            Ok(op) => op,
            Err(e) => return refused(&e),
        };
        let mut guard = match self.client(&op).await {
            Ok(g) => g,
            Err(e) => return nbd_failed(&e),
        };
        let c = &mut guard.as_mut().expect("connected").client;
        let size = op.entry().ticket.size.min(c.size());
        match c.extents(0, size).await {
            Ok(ext) => json_reply(&json!(ext
                .iter()
                .map(|e| json!({"start": e.start, "length": e.length, "zero": e.zero, "hole": e.hole}))
                .collect::<Vec<_>>())),
            Err(e) => nbd_failed(&e),
        }
    }

    async fn get(&self, ticket: &str, req: &Request<Incoming>) -> Response<Body> {
        let op = match self.svc.authorize(ticket, TicketOp::Read) {
            Ok(op) => op,
            Err(e) => return refused(&e),
        };
        let mut guard = match self.client(&op).await {
            Ok(g) => g,
            Err(e) => return nbd_failed(&e),
        };
        let size = op
            .entry()
            .ticket
            .size
            .min(guard.as_ref().expect("connected").client.size());
        let range = req
            .headers()
            .get(http::header::RANGE)
            .map(|v| v.to_str().unwrap_or(""));
        let (start, end, partial) = match range {
            None if size == 0 => return Response::new(full(Bytes::new())),
            None => (0, size - 1, false),
            Some(r) => match parse_range(r, size) {
                Some((a, b)) => (a, b, true),
                None => {
                    let mut resp = text(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        format!("range {r:?} is not within the image's {size} bytes"),
                    );
                    resp.headers_mut().insert(
                        http::header::CONTENT_RANGE,
                        HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
                    );
                    return resp;
                }
            },
        };
        let length = end - start + 1;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
        tokio::spawn(async move {
            let c = &mut guard.as_mut().expect("connected").client;
            let mut at = start;
            while at <= end {
                if op.entry().canceled() {
                    let _ = tx
                        .send(Err(std::io::Error::other("the ticket was removed")))
                        .await;
                    return;
                }
                let n = ((end - at + 1) as usize).min(CHUNK);
                let mut buf = vec![0u8; n];
                if let Err(e) = c.read(at, &mut buf).await {
                    tracing::warn!(error = %e, "transfer read failed");
                    // A dead NBD connection is not reused.
                    *guard = None;
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
                op.entry().add_transferred(n as u64);
                if tx.send(Ok(Frame::data(Bytes::from(buf)))).await.is_err() {
                    return;
                }
                at += n as u64;
            }
        });
        let stream =
            futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
        let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
        if partial {
            h.insert(
                http::header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")).expect("ascii"),
            );
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        }
        resp
    }

    async fn put(&self, ticket: &str, query: &str, req: Request<Incoming>) -> Response<Body> {
        let op = match self.svc.authorize(ticket, TicketOp::Write) {
            Ok(op) => op,
            Err(e) => return refused(&e),
        };
        let headers = req.headers();
        let Some(length) = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return text(StatusCode::LENGTH_REQUIRED, "PUT needs a Content-Length");
        };
        let offset = match headers.get(http::header::CONTENT_RANGE) {
            None => 0,
            Some(v) => match v.to_str().ok().and_then(parse_content_range) {
                Some((start, n)) if n == length => start,
                _ => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("Content-Range {v:?} does not match Content-Length {length}"),
                    )
                }
            },
        };
        let flush = !query.split('&').any(|kv| kv == "flush=n");
        let size = op.entry().ticket.size;
        if offset.checked_add(length).is_none_or(|e| e > size) {
            return text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("{length} bytes at offset {offset} do not fit the image's {size} bytes"),
            );
        }
        let mut guard = match self.client(&op).await {
            Ok(g) => g,
            Err(e) => return nbd_failed(&e),
        };
        let mut body = req.into_body();
        let mut buf = BytesMut::with_capacity(CHUNK.min(length as usize));
        let mut at = offset;
        let mut received = 0u64;
        loop {
            let frame = match body.frame().await {
                None => None,
                Some(Ok(f)) => Some(f),
                Some(Err(e)) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the request body: {e}"),
                    )
                }
            };
            let end = frame.is_none();
            if let Some(data) = frame.and_then(|f| f.into_data().ok()) {
                received += data.len() as u64;
                if received > length {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("body longer than Content-Length {length}"),
                    );
                }
                buf.extend_from_slice(&data);
            }
            while buf.len() >= CHUNK || (end && !buf.is_empty()) {
                if op.entry().canceled() {
                    return refused(&TransferError::Canceled(ticket.to_string()));
                }
                let piece = buf.split_to(buf.len().min(CHUNK));
                let c = &mut guard.as_mut().expect("connected").client;
                if let Err(e) = c.write(at, &piece).await {
                    *guard = None;
                    return nbd_failed(&e);
                }
                op.entry().add_transferred(piece.len() as u64);
                at += piece.len() as u64;
            }
            if end {
                break;
            }
        }
        if received != length {
            return text(
                StatusCode::BAD_REQUEST,
                format!("body of {received} bytes, Content-Length said {length}"),
            );
        }
        if flush {
            if let Err(e) = guard.as_mut().expect("connected").client.flush().await {
                *guard = None;
                return nbd_failed(&e);
            }
        }
        Response::new(full(Bytes::new()))
    }

    async fn patch(&self, ticket: &str, req: Request<Incoming>) -> Response<Body> {
        let op = match self.svc.authorize(ticket, TicketOp::Write) {
            Ok(op) => op,
            Err(e) => return refused(&e),
        };
        let body = match http_body_util::Limited::new(req.into_body(), MAX_PATCH)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the PATCH body: {e}"),
                )
            }
        };
        let patch: Patch = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("invalid PATCH body: {e}")),
        };
        let mut guard = match self.client(&op).await {
            Ok(g) => g,
            Err(e) => return nbd_failed(&e),
        };
        let c = &mut guard.as_mut().expect("connected").client;
        let r = match patch {
            Patch::Zero { offset, size, flush } => {
                let limit = op.entry().ticket.size;
                if offset.checked_add(size).is_none_or(|e| e > limit) {
                    return text(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        format!(
                            "zero of {size} bytes at offset {offset} does not fit the image's {limit} bytes"
                        ),
                    );
                }
                let r = c.zero(offset, size, op.entry().ticket.sparse).await;
                let r = match r {
                    Ok(()) if flush => c.flush().await,
                    r => r,
                };
                if r.is_ok() {
                    op.entry().add_transferred(size);
                }
                r
            }
            Patch::Flush => c.flush().await,
        };
        match r {
            Ok(()) => Response::new(full(Bytes::new())),
            Err(e) => {
                *guard = None;
                nbd_failed(&e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imageio::{Ticket, REMOVE_WAIT};
    use oxvirt_qemu::img::{CreateRequest, QemuImg};
    use oxvirt_qemu::ImageFormat;

    /// A TLS client trusting `ca` that sends one request per connection.
    async fn request(
        addr: std::net::SocketAddr,
        ca: &str,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> (StatusCode, http::HeaderMap, Bytes) {
        let cfg = oxvirt_pki::client_config(ca, None).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(addr.ip().to_string()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::CONTENT_LENGTH, body.len());
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        let resp = send.send_request(b.body(Full::new(body)).unwrap()).await.unwrap();
        let (parts, body) = resp.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes(),
        )
    }

    #[tokio::test]
    async fn serves_the_imageio_protocol_over_tls_into_a_qcow2_volume() {
        let dir = tempfile::tempdir().unwrap();
        let size: u64 = 64 << 20;
        let vol = dir.path().join("vol");
        QemuImg::locate()
            .unwrap_or_else(|e| panic!("{e}"))
            .create(&CreateRequest {
                path: &vol,
                format: ImageFormat::Qcow2,
                size: Some(size),
                qcow2_compat: Some("1.1"),
                backing: None,
                preallocation: None,
                unsafe_backing: false,
            })
            .unwrap();
        let ca = oxvirt_pki::CertAuthority::generate("test-ca").unwrap();
        let id = ca
            .issue(oxvirt_pki::Role::Node, "node-a", &["127.0.0.1".to_string()])
            .unwrap();
        let tls = Arc::new(oxvirt_pki::server_config(&id, None).unwrap());
        let svc = Arc::new(ImageService::new(dir.path(), Arc::new(oxvirt_lease::SystemClock)));
        let url = svc
            .start_server("srv-1", &vol, ImageFormat::Qcow2, false, false)
            .await
            .unwrap();
        let ticket = |uuid: &str, ops| Ticket {
            uuid: uuid.into(),
            size,
            url: url.clone(),
            ops,
            timeout: 300,
            sparse: true,
            dirty: false,
            transfer_id: None,
            filename: None,
            inactivity_timeout: None,
        };
        svc.add_ticket(ticket("up", vec![TicketOp::Write])).unwrap();
        svc.add_ticket(ticket("down", vec![TicketOp::Read])).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, tls, svc.clone(), async move {
            let _ = stopped.await;
        }));
        let ca_pem = ca.cert_pem();
        let req = |m: Method, p: &str, h: Vec<(&'static str, String)>, b: Bytes| {
            let (ca_pem, p) = (ca_pem.clone(), p.to_string());
            async move { request(addr, &ca_pem, m, &p, &h, b).await }
        };

        let (st, _, body) = req(Method::OPTIONS, "/images/up", vec![], Bytes::new()).await;
        assert_eq!(st, StatusCode::OK);
        let opts: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(opts["features"], json!(["extents", "zero", "flush"]));
        assert_eq!(opts["max_writers"], MAX_CONNECTIONS);
        let (_, _, body) = req(Method::OPTIONS, "/images/down", vec![], Bytes::new()).await;
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["features"],
            json!(["extents"])
        );

        // 5 MiB of data at 1 MiB (more than one CHUNK), then zero 1 MiB inside it, then flush.
        let data: Vec<u8> = (0..5 << 20).map(|i: u32| (i % 253) as u8 + 1).collect();
        let (st, _, body) = req(
            Method::PUT,
            "/images/up?flush=n",
            vec![(
                "content-range",
                format!("bytes {}-{}/*", 1 << 20, (1 << 20) + data.len() - 1),
            )],
            Bytes::from(data.clone()),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let zero = json!({"op": "zero", "offset": 3 << 20, "size": 1 << 20, "flush": false});
        let (st, _, _) = req(Method::PATCH, "/images/up", vec![], Bytes::from(zero.to_string())).await;
        assert_eq!(st, StatusCode::OK);
        let (st, _, _) = req(
            Method::PATCH,
            "/images/up",
            vec![],
            Bytes::from(r#"{"op":"flush"}"#),
        )
        .await;
        assert_eq!(st, StatusCode::OK);

        // Extents: a hole before the data, data, and the untouched rest a hole again.
        let (st, _, body) = req(
            Method::GET,
            "/images/down/extents?context=zero",
            vec![],
            Bytes::new(),
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        let ext: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            ext[0],
            json!({"start": 0, "length": 1 << 20, "zero": true, "hole": true})
        );
        assert_eq!(ext[1]["zero"], false, "{ext:?}");
        assert_eq!(
            ext.iter().map(|e| e["length"].as_u64().unwrap()).sum::<u64>(),
            size
        );
        let (st, _, _) = req(
            Method::GET,
            "/images/down/extents?context=dirty",
            vec![],
            Bytes::new(),
        )
        .await;
        assert_eq!(st, StatusCode::NOT_FOUND);

        // Read back through the read-only ticket: what was written, with the zeroed MiB.
        let mut want = data.clone();
        want[2 << 20..3 << 20].fill(0);
        let (st, h, body) = req(
            Method::GET,
            "/images/down",
            vec![(
                "range",
                format!("bytes={}-{}", 1 << 20, (1 << 20) + want.len() - 1),
            )],
            Bytes::new(),
        )
        .await;
        assert_eq!(st, StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            h["content-range"],
            format!("bytes {}-{}/{size}", 1 << 20, (1 << 20) + want.len() - 1)
        );
        assert!(body[..] == want[..], "downloaded data differs");

        // Refusals: writing under a read ticket, an unknown ticket, beyond the end, a bad range.
        let (st, _, _) = req(Method::PUT, "/images/down", vec![], Bytes::from_static(b"x")).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, _, body) = req(Method::GET, "/images/nope", vec![], Bytes::new()).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        assert!(String::from_utf8_lossy(&body).contains("no such ticket nope"));
        let (st, _, _) = req(
            Method::PUT,
            "/images/up",
            vec![("content-range", format!("bytes {}-{}/*", size - 1, size))],
            Bytes::from_static(b"xy"),
        )
        .await;
        assert_eq!(st, StatusCode::RANGE_NOT_SATISFIABLE);
        let (st, _, _) = req(
            Method::GET,
            "/images/down",
            vec![("range", format!("bytes={size}-"))],
            Bytes::new(),
        )
        .await;
        assert_eq!(st, StatusCode::RANGE_NOT_SATISFIABLE);
        let (st, _, _) = req(
            Method::PATCH,
            "/images/up",
            vec![],
            Bytes::from_static(b"{\"op\":\"fly\"}"),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let (st, _, _) = req(Method::DELETE, "/images/up", vec![], Bytes::new()).await;
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);

        let status = svc.ticket_status("up").unwrap();
        assert_eq!(status["transferred"], (5u64 << 20) + (1 << 20));
        assert_eq!(status["active"], false);
        svc.remove_ticket("up", REMOVE_WAIT).await.unwrap();
        let (st, _, _) = req(Method::OPTIONS, "/images/up", vec![], Bytes::new()).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        svc.remove_ticket("down", REMOVE_WAIT).await.unwrap();
        svc.stop_server("srv-1").await.unwrap();
        let _ = stop.send(());
        server.await.unwrap();
        // The data is in the qcow2 volume for qemu-img too.
        let map = QemuImg::locate().unwrap().map(&vol, None).unwrap();
        assert!(map.iter().any(|m| m.data && m.start <= 1 << 20), "{map:?}");
    }

    #[test]
    fn ranges_parse_as_imageio_clients_send_them() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some((0, 99)));
        assert_eq!(parse_range("bytes=900-", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=900-5000", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=1000-1001", 1000), None);
        assert_eq!(parse_range("bytes=5-4", 1000), None);
        assert_eq!(parse_range("items=0-1", 1000), None);
        assert_eq!(parse_content_range("bytes 0-4095/*"), Some((0, 4096)));
        assert_eq!(parse_content_range("bytes 10-19/100"), Some((10, 10)));
        assert_eq!(parse_content_range("bytes 19-10/*"), None);
        assert_eq!(parse_content_range("0-10/*"), None);
    }
}
