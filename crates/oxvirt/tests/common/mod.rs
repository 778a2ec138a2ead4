//! Test fixtures shared by the binary's end-to-end tests: an in-process engine enrollment
//! service (the engine's real enrollment code on a real TLS listener) and `oxvirt node` processes.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oxvirt_engine::enroll::{handler, Enrollment};
use oxvirt_pki::{client_config, server_config, CertAuthority, Identity, Role};
use oxvirt_rpc::{Limits, RpcClient};
use serde_json::{json, Value};
use tokio::sync::oneshot;

pub struct Engine {
    pub addr: SocketAddr,
    pub enrollment: Arc<Enrollment>,
    pub identity: Identity,
    pub enrolled: Arc<Mutex<Vec<String>>>,
    _stop: oneshot::Sender<()>,
}

pub async fn start_engine() -> Engine {
    let ca = CertAuthority::generate("oxvirt test CA").unwrap();
    let identity = ca.issue(Role::Engine, "engine", &["127.0.0.1".into()]).unwrap();
    let enrolled = Arc::new(Mutex::new(Vec::new()));
    let e2 = enrolled.clone();
    let enrollment = Arc::new(Enrollment::new(ca, move |h| {
        e2.lock().unwrap().push(h.name.clone())
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = Arc::new(server_config(&identity, None).unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(oxvirt_rpc::serve(
        listener,
        Some(tls),
        handler(enrollment.clone()),
        Limits::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    Engine {
        addr,
        enrollment,
        identity,
        enrolled,
        _stop: stop,
    }
}

pub fn free_port() -> SocketAddr {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

pub struct NodeProc {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn_node(name: &str, data: &Path, addr: SocketAddr, extra: &[&str]) -> NodeProc {
    let child = Command::new(env!("CARGO_BIN_EXE_oxvirt"))
        .args(["node", "--name", name, "--listen", &addr.to_string(), "--data"])
        .arg(data)
        .args(extra)
        .env("OXVIRT_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    NodeProc { child, addr }
}

pub fn engine_client(engine: &Engine, node: SocketAddr) -> RpcClient {
    RpcClient::new(
        node,
        "127.0.0.1",
        client_config(&engine.identity.ca_pem, Some(&engine.identity)).unwrap(),
    )
    .unwrap()
    .with_timeout(Duration::from_secs(20))
}

pub async fn wait_up(c: &RpcClient, node: &mut NodeProc) -> Value {
    let start = Instant::now();
    loop {
        match c.call("Host.ping", json!({})).await {
            Ok(v) => return v,
            Err(e) => {
                if let Some(st) = node.child.try_wait().unwrap() {
                    let mut err = String::new();
                    std::io::Read::read_to_string(node.child.stderr.as_mut().unwrap(), &mut err).unwrap();
                    panic!("node exited with {st}: {err}");
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "node did not come up: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub fn files_under(p: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        out.push(e.path().display().to_string());
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        }
    }
    out.sort();
    out
}
