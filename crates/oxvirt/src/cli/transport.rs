//! The CLI's HTTPS transport: HTTP/1.1 over rustls to one engine, a few pooled keep-alive
//! connections, whole bodies in and out.
//!
//! Trust is explicit: the engine's CA (PEM, from `--ca-file` or pinned by fingerprint at login)
//! or, with `--insecure`, none. A request is sent at most once: a pooled connection the server
//! closed is dropped before use, and nothing is retried after it was written.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

/// Where the engine is: `https://host:port` (any path after it is ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn parse(url: &str) -> anyhow::Result<Endpoint> {
        let rest = url.strip_prefix("https://").ok_or_else(|| {
            anyhow::anyhow!("engine URL {url:?} must start with https:// (the API is served over TLS only)")
        })?;
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| anyhow::anyhow!("engine URL {url:?}: unclosed [ in the address"))?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        anyhow::ensure!(!host.is_empty(), "engine URL {url:?} has no host");
        let port = match port {
            None => 443,
            Some(p) => p
                .parse()
                .map_err(|_| anyhow::anyhow!("engine URL {url:?}: port {p:?} is not a number"))?,
        };
        Ok(Endpoint { host, port })
    }

    /// The canonical URL (`https://host:port`).
    pub fn url(&self) -> String {
        if self.host.contains(':') {
            format!("https://[{}]:{}", self.host, self.port)
        } else {
            format!("https://{}:{}", self.host, self.port)
        }
    }
}

/// How the engine's certificate is checked.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Signed by this CA (PEM).
    Ca(String),
    /// Not checked at all (`--insecure`).
    Insecure,
}

pub struct Http {
    ep: Endpoint,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    timeout: Duration,
}

/// A reply: status and the whole body.
pub struct HttpReply {
    pub status: StatusCode,
    pub body: Bytes,
}

const MAX_IDLE: usize = 4;

impl Http {
    pub fn new(ep: Endpoint, trust: &Trust, timeout: Duration) -> anyhow::Result<Http> {
        let tls = match trust {
            Trust::Ca(pem) => oxvirt_pki::client_config(pem, None).context("loading the engine's CA")?,
            Trust::Insecure => oxvirt_pki::trust_any_server_config()?,
        };
        let server_name = ServerName::try_from(ep.host.clone())
            .map_err(|_| anyhow::anyhow!("{:?} is not a valid server name", ep.host))?;
        Ok(Http {
            ep,
            server_name,
            connector: TlsConnector::from(Arc::new(tls)),
            idle: Mutex::new(Vec::new()),
            timeout,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.ep
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let target = (self.ep.host.as_str(), self.ep.port);
        let tcp = TcpStream::connect(target)
            .await
            .with_context(|| format!("cannot connect to the engine at {}", self.ep.url()))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .with_context(|| {
                format!(
                    "TLS handshake with {} failed (is the engine's CA the one given at login? \
                     --ca-file, --ca-fingerprint or --insecure)",
                    self.ep.url()
                )
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .with_context(|| format!("HTTP handshake with {}", self.ep.url()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn checkout(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
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

    /// One request; `path` includes the query.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&'static str, String)],
        body: Option<(&'static str, Bytes)>,
    ) -> anyhow::Result<HttpReply> {
        let exchange = async {
            let mut sender = self.checkout().await?;
            let mut req = http::Request::builder()
                .method(method.clone())
                .uri(path)
                .header(http::header::HOST, format!("{}:{}", self.ep.host, self.ep.port));
            for (k, v) in headers {
                req = req.header(*k, HeaderValue::from_str(v).context("header value")?);
            }
            let body = match body {
                Some((ct, b)) => {
                    req = req.header(http::header::CONTENT_TYPE, ct);
                    b
                }
                None => Bytes::new(),
            };
            let req = req.body(Full::new(body)).context("building the request")?;
            let resp = sender
                .send_request(req)
                .await
                .with_context(|| format!("{method} {path} on {}", self.ep.url()))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .with_context(|| format!("reading the reply to {method} {path}"))?
                .to_bytes();
            let mut idle = self.idle.lock().await;
            if idle.len() < MAX_IDLE {
                idle.push(sender);
            }
            anyhow::Ok(HttpReply { status, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => anyhow::bail!(
                "the engine at {} did not answer {method} {path} within {:?}",
                self.ep.url(),
                self.timeout
            ),
        }
    }
}

/// Percent-encodes a query or form value (RFC 3986 unreserved characters pass).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let e = Endpoint::parse("https://127.0.0.1:8443/ovirt-engine/api").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 8443));
        assert_eq!(e.url(), "https://127.0.0.1:8443");
        let e = Endpoint::parse("https://[::1]:9000").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 9000));
        assert_eq!(e.url(), "https://[::1]:9000");
        assert_eq!(Endpoint::parse("https://engine").unwrap().port, 443);
        assert!(Endpoint::parse("http://engine:80").is_err());
        assert!(Endpoint::parse("https://engine:x").is_err());
        assert!(Endpoint::parse("https://:1").is_err());
    }

    #[test]
    fn encoding() {
        assert_eq!(encode("name=\"a b\""), "name%3D%22a%20b%22");
        assert_eq!(encode("p@ss&w=rd"), "p%40ss%26w%3Drd");
    }
}
