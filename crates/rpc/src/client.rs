//! An HTTPS client for the node API: JSON-RPC calls, XML-RPC and REST requests, and the event
//! stream. Connections are pooled (HTTP/1.1 keep-alive, one request at a time per
//! connection); a pooled connection the server closed is discarded before use, never retried
//! after a request was sent, so a call is never executed twice by the client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};
use tokio_rustls::TlsConnector;

use crate::jsonrpc::{self, RpcError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with {addr} failed")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("{addr} answered HTTP {status}: {body}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
        body: String,
    },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("invalid server name {0:?}")]
    ServerName(String),
    #[error("{addr} sent an invalid reply: {detail}")]
    Protocol { addr: SocketAddr, detail: String },
    #[error(transparent)]
    Rpc(#[from] RpcError),
}

pub struct RpcClient {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    next_id: AtomicU64,
    timeout: Duration,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

const MAX_IDLE: usize = 4;

impl RpcClient {
    /// `server_name` is checked against the server certificate (an IP address or DNS name).
    pub fn new(addr: SocketAddr, server_name: &str, tls: rustls::ClientConfig) -> Result<Self, ClientError> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| ClientError::ServerName(server_name.into()))?;
        Ok(Self {
            addr,
            server_name,
            connector: TlsConnector::from(Arc::new(tls)),
            idle: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            timeout: Duration::from_secs(60),
        })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let addr = self.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| ClientError::Tls { addr, source })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|source| ClientError::Http { addr, source })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn checkout(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        loop {
            let Some(mut s) = self.idle.lock().await.pop() else {
                break;
            };
            if s.ready().await.is_ok() {
                return Ok(s);
            }
        }
        self.connect().await
    }

    /// One HTTP request; returns the status and the whole body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let addr = self.addr;
        let exchange = async {
            let mut sender = self.checkout().await?;
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, addr.to_string())
                .header(http::header::CONTENT_TYPE, content_type)
                .body(Full::new(body))
                .expect("valid request");
            let resp = sender
                .send_request(req)
                .await
                .map_err(|source| ClientError::Http { addr, source })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|source| ClientError::Http { addr, source })?
                .to_bytes();
            let mut idle = self.idle.lock().await;
            if idle.len() < MAX_IDLE {
                idle.push(sender);
            }
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                addr,
                timeout: self.timeout,
            })?
    }

    /// A JSON-RPC call with named parameters.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = Bytes::from(jsonrpc::request(id, method, params).to_string());
        let (status, body) = self
            .request(Method::POST, "/jsonrpc", "application/json", body)
            .await?;
        let addr = self.addr;
        if status != StatusCode::OK {
            return Err(ClientError::Status {
                addr,
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let mut v: Value = serde_json::from_slice(&body).map_err(|e| ClientError::Protocol {
            addr,
            detail: format!("reply is not JSON: {e}"),
        })?;
        if v["id"] != id {
            return Err(ClientError::Protocol {
                addr,
                detail: format!("reply id {} for call {id}", v["id"]),
            });
        }
        if let Some(err) = v.get("error") {
            let err: RpcError = serde_json::from_value(err.clone()).map_err(|e| ClientError::Protocol {
                addr,
                detail: format!("bad error object: {e}"),
            })?;
            return Err(err.into());
        }
        Ok(v.get_mut("result").map(Value::take).unwrap_or(Value::Null))
    }

    /// Subscribes to the node's event stream (`GET /events`, one JSON-RPC notification per
    /// line). The stream has its own connection; the receiver ends when the connection does.
    pub async fn events(&self) -> Result<mpsc::Receiver<Value>, ClientError> {
        let addr = self.addr;
        let mut sender = self.connect().await?;
        let req = http::Request::builder()
            .method(Method::GET)
            .uri("/events")
            .header(http::header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        let resp = tokio::time::timeout(self.timeout, sender.send_request(req))
            .await
            .map_err(|_| ClientError::Timeout {
                addr,
                timeout: self.timeout,
            })?
            .map_err(|source| ClientError::Http { addr, source })?;
        if resp.status() != StatusCode::OK {
            return Err(ClientError::Status {
                addr,
                status: resp.status(),
                body: String::new(),
            });
        }
        let (tx, rx) = mpsc::channel(256);
        let mut body = resp.into_body();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else { continue };
                buf.extend_from_slice(&data);
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                        if tx.send(v).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}
