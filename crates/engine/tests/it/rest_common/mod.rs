//! An in-process engine serving the REST API over its real HTTPS listener, and a small HTTP/1.1
//! client that trusts the engine's CA (shared by the REST tests and the REST benchmark).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use oxvirt_engine::app::EngineSettings;
use oxvirt_engine::daemon::{Engine, EngineConfig};
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

pub const ADMIN_PASSWORD: &str = "s3cret pass";

pub struct TestEngine {
    pub engine: Arc<Engine>,
    pub dir: tempfile::TempDir,
}

pub async fn start_engine() -> TestEngine {
    let dir = tempfile::tempdir().unwrap();
    start_engine_in(dir).await
}

pub async fn start_engine_in(dir: tempfile::TempDir) -> TestEngine {
    start_engine_with(dir, None).await
}

/// An engine in `dir` on the database at `db_url` (`None`: SQLite in `dir`).
pub async fn start_engine_with(dir: tempfile::TempDir, db_url: Option<String>) -> TestEngine {
    let cfg = EngineConfig {
        data_dir: dir.path().to_path_buf(),
        db_url,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_password: Some(ADMIN_PASSWORD.into()),
        settings: EngineSettings {
            monitor_interval: Duration::from_millis(500),
            forward_retry: oxvirt_engine::saga::ForwardRetry {
                attempts: 2,
                first_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(10),
            },
            ..EngineSettings::default()
        },
    };
    let engine = Engine::start(cfg, Some(oxvirt_engine::rest::routes()))
        .await
        .unwrap();
    TestEngine { engine, dir }
}

pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Response {
    pub fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// The text of the first `<name>` element (a crude XPath for assertions).
    pub fn xml_text(&self, name: &str) -> Option<String> {
        xml_text(&self.body, name)
    }
}

pub fn xml_text(body: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let i = body.find(&open)? + open.len();
    let j = body[i..].find(&format!("</{name}>"))? + i;
    Some(body[i..j].to_string())
}

/// The `id` attribute of the document's root element.
pub fn root_id(body: &str) -> String {
    let start = body.find("?>").map(|i| i + 2).unwrap_or(0);
    let i = body[start..].find(" id=\"").unwrap() + start + 5;
    let j = body[i..].find('"').unwrap() + i;
    body[i..j].to_string()
}

/// Counts elements `<name ` / `<name>` in a document.
pub fn count(body: &str, name: &str) -> usize {
    body.matches(&format!("<{name} ")).count() + body.matches(&format!("<{name}>")).count()
}

pub struct Client {
    pub addr: SocketAddr,
    connector: TlsConnector,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
    pub token: Option<String>,
}

impl Client {
    pub fn new(e: &Engine) -> Client {
        Client::with_ca(e.addr, &e.enrollment.ca().cert_pem())
    }

    /// A client of the engine at `addr` whose CA certificate is `ca` (PEM).
    pub fn with_ca(addr: SocketAddr, ca: &str) -> Client {
        let cfg = oxvirt_pki::client_config(ca, None).unwrap();
        Client {
            addr,
            connector: TlsConnector::from(Arc::new(cfg)),
            conn: tokio::sync::Mutex::new(None),
            token: None,
        }
    }

    async fn connect(&self) -> SendRequest<Full<Bytes>> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let tls = self
            .connector
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender
    }

    /// One request on a kept-alive connection.
    pub async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let mut slot = self.conn.lock().await;
        let mut sender = match slot.take() {
            Some(mut s) => match s.ready().await {
                Ok(()) => s,
                Err(_) => self.connect().await,
            },
            None => self.connect().await,
        };
        let mut b = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string());
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = sender
            .send_request(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        *slot = Some(sender);
        Response {
            status,
            headers,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }

    /// Logs in as admin@internal (password grant) and keeps the token.
    pub async fn login(&mut self) {
        let r = self
            .send(
                Method::POST,
                "/ovirt-engine/sso/oauth/token",
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("accept", "application/json"),
                ],
                &format!(
                    "grant_type=password&scope=ovirt-app-api&username=admin%40internal&password={}",
                    ADMIN_PASSWORD.replace(' ', "+")
                ),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        self.token = Some(r.json()["access_token"].as_str().unwrap().to_string());
    }

    /// An API request with the token, `Version: 4` and XML both ways (as the SDK sends them).
    pub async fn api(&self, method: Method, path: &str, body: &str) -> Response {
        self.api_with(method, path, body, &[]).await
    }

    pub async fn api_with(&self, method: Method, path: &str, body: &str, extra: &[(&str, &str)]) -> Response {
        let auth = format!("Bearer {}", self.token.as_deref().expect("logged in"));
        let mut h = vec![
            ("authorization", auth.as_str()),
            ("version", "4"),
            ("content-type", "application/xml"),
            ("accept", "application/xml"),
        ];
        for (k, v) in extra {
            h.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
            h.push((k, v));
        }
        let full = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/ovirt-engine/api/{path}")
        };
        self.send(method, &full, &h, body).await
    }

    pub async fn get(&self, path: &str) -> Response {
        self.api(Method::GET, path, "").await
    }
    pub async fn post(&self, path: &str, body: &str) -> Response {
        self.api(Method::POST, path, body).await
    }
    /// Data center `dc` with cluster `cl` in it, both checked created.
    pub async fn dc_and_cluster(&self) {
        let r = self
            .post("datacenters", "<data_center><name>dc</name></data_center>")
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let r = self
            .post(
                "clusters",
                "<cluster><name>cl</name><data_center><name>dc</name></data_center></cluster>",
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    pub async fn put(&self, path: &str, body: &str) -> Response {
        self.api(Method::PUT, path, body).await
    }
    pub async fn delete(&self, path: &str) -> Response {
        self.api(Method::DELETE, path, "").await
    }
}

/// A storage domain `sd` straight in the database (no storage behind it) with a 1 MiB raw disk
/// per name: for tests of rows, not of storage.
pub async fn db_disks(
    db: &oxvirt_engine::db::Db,
    names: &[&str],
) -> (oxvirt_engine::model::SdUuid, Vec<oxvirt_engine::model::DiskId>) {
    use oxvirt_engine::model::{Disk, DiskFormat, SdType, StorageDomain, StorageType};
    let sd = db
        .sd_insert(&StorageDomain::new(
            "sd",
            SdType::Data,
            StorageType::Localfs,
            "/srv/x",
        ))
        .await
        .unwrap();
    let mut disks = Vec::new();
    for n in names {
        let d = db
            .disk_insert(&Disk::new(n, sd.id, DiskFormat::Raw, 1 << 20))
            .await
            .unwrap();
        disks.push(d.id);
    }
    (sd.id, disks)
}

/// A data domain recorded (not on storage) as the active master of data center `dc`: for
/// tests of what the API does with domains without running a node.
pub async fn active_domain(
    db: &oxvirt_engine::db::Db,
    dc: oxvirt_engine::model::DcId,
    name: &str,
) -> oxvirt_engine::model::StorageDomain {
    use oxvirt_engine::model::{PoolMember, SdStatus, SdType, StorageDomain, StorageType};
    let sd = db
        .sd_insert(&StorageDomain::new(
            name,
            SdType::Data,
            StorageType::Localfs,
            &format!("/srv/{name}"),
        ))
        .await
        .unwrap();
    db.pool_attach(&PoolMember {
        data_center_id: dc,
        storage_domain_id: sd.id,
        status: SdStatus::Active,
        master: true,
    })
    .await
    .unwrap();
    sd
}
