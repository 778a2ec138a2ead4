//! The HTTPS server loop shared by the node API (and the engine's enrollment endpoint).
//!
//! One task accepts connections; each connection gets a task that performs the TLS handshake
//! (bounded by `handshake_timeout`), reads the client certificate's identity, and serves
//! HTTP/1.1. Before the handler runs, the body is read under `max_body` (413 beyond it). A
//! semaphore caps concurrent connections: excess connections wait in the kernel's backlog
//! instead of consuming memory. On shutdown the listener closes and open connections finish
//! their current request; event streams end.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use oxvirt_pki::PeerIdentity;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body: usize,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    /// Bound on a handler's run time; verbs that take longer return a task/job id instead.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: 1 << 20,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// A request after limits were applied.
#[derive(Debug)]
pub struct HttpRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: SocketAddr,
    /// Role and name from the client certificate (mutual TLS only).
    pub client: Option<PeerIdentity>,
}

/// What a handler answers.
pub enum Reply {
    Full {
        status: StatusCode,
        content_type: &'static str,
        body: Bytes,
    },
    /// A long-lived response; each received chunk is written as it comes, and the response ends
    /// when the sender is dropped or the server shuts down.
    Stream {
        content_type: &'static str,
        rx: mpsc::Receiver<Bytes>,
    },
    /// A whole response with extra headers (the REST API's `Location`, `Version`…).
    Headers {
        status: StatusCode,
        content_type: &'static str,
        headers: HeaderMap,
        body: Bytes,
    },
}

impl Reply {
    pub fn json(status: StatusCode, v: &serde_json::Value) -> Reply {
        Reply::Full {
            status,
            content_type: "application/json",
            body: Bytes::from(v.to_string()),
        }
    }
    pub fn text(status: StatusCode, s: impl Into<String>) -> Reply {
        Reply::Full {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from(s.into()),
        }
    }
}

pub type Handler = Arc<dyn Fn(HttpRequest) -> BoxFuture<'static, Reply> + Send + Sync>;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Serves until `shutdown` resolves. `tls: None` serves plain HTTP (tests of the engine's REST
/// layer use it; nodes always use TLS).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: Handler,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let acceptor = tls.map(TlsAcceptor::from);
    let limits = Arc::new(limits);
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
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, handler, limits, stop) =
            (acceptor.clone(), handler.clone(), limits.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let client = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| oxvirt_pki::peer_identity(c));
                    serve_conn(TokioIo::new(tls), peer, client, handler, limits, stop).await
                }
                None => serve_conn(TokioIo::new(tcp), peer, None, handler, limits, stop).await,
            }
        });
    }
    let _ = stop_tx.send(true);
    Ok(())
}

async fn serve_conn<IO>(
    io: IO,
    peer: SocketAddr,
    client: Option<PeerIdentity>,
    handler: Handler,
    limits: Arc<Limits>,
    mut stop: watch::Receiver<bool>,
) where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let stop_streams = stop.clone();
    let svc_limits = limits.clone();
    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let (handler, client, limits, stop) = (
            handler.clone(),
            client.clone(),
            svc_limits.clone(),
            stop_streams.clone(),
        );
        async move { Ok::<_, Infallible>(handle(req, peer, client, handler, &limits, stop).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

async fn handle(
    req: http::Request<Incoming>,
    peer: SocketAddr,
    client: Option<PeerIdentity>,
    handler: Handler,
    limits: &Limits,
    stop: watch::Receiver<bool>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return too_large(limits.max_body);
    }
    let body = match Limited::new(body, limits.max_body).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return too_large(limits.max_body)
        }
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        }
    };
    let request = HttpRequest {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers,
        body,
        peer,
        client,
    };
    let reply = match tokio::time::timeout(limits.request_timeout, handler(request)).await {
        Ok(r) => r,
        Err(_) => return plain(StatusCode::GATEWAY_TIMEOUT, "the request took too long"),
    };
    match reply {
        Reply::Full {
            status,
            content_type,
            body,
        } => Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(body).boxed_unsync())
            .expect("valid response"),
        Reply::Headers {
            status,
            content_type,
            headers,
            body,
        } => {
            let mut r = Response::new(Full::new(body).boxed_unsync());
            *r.status_mut() = status;
            *r.headers_mut() = headers;
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            r
        }
        Reply::Stream { content_type, rx } => {
            let chunks = futures_util::stream::unfold((rx, stop), |(mut rx, mut stop)| async move {
                let next = tokio::select! {
                    c = rx.recv() => c,
                    _ = stopped(&mut stop) => None,
                };
                next.map(|c| (Ok::<_, Infallible>(Frame::data(c)), (rx, stop)))
            });
            let body: Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>> =
                Box::pin(chunks.fuse());
            Response::builder()
                .status(StatusCode::OK)
                .header(http::header::CONTENT_TYPE, content_type)
                .header(http::header::CACHE_CONTROL, "no-cache")
                .body(BodyExt::boxed_unsync(StreamBody::new(body)))
                .expect("valid response")
        }
    }
}

fn plain(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(msg.into())).boxed_unsync())
        .expect("valid response")
}

fn too_large(max: usize) -> Response<Body> {
    plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {max} bytes"),
    )
}

/// Resolves once shutdown began (or the server is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it before any other await.
    let _ = stop.wait_for(|s| *s).await.is_ok();
}
