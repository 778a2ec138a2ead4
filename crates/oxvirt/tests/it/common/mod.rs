//! Test fixtures shared by the binary's end-to-end tests: an in-process engine enrollment
//! service (the engine's real enrollment code on a real TLS listener) and `oxvirt node` processes.

#![allow(dead_code)]

pub mod cluster;
pub mod up;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oxvirt_engine::enroll::{handler, Enrollment};
use oxvirt_engine::model::{HostStatus, HostUuid};
use oxvirt_pki::{client_config, server_config, CertAuthority, Identity, Role};
use oxvirt_rpc::{Limits, RpcClient};
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// Engine settings for tests on real processes: leases on a 1 s io_timeout with a 2 s fence
/// margin, hosts polled every 0.5 s, guests under TCG.
/// A fresh, empty schema on the PostgreSQL test server named by `OXVIRT_TEST_PG_URL`
/// (scripts/test starts one); fails naming the variable when it is unset.
pub async fn fresh_postgres_url() -> String {
    const PG_ENV: &str = "OXVIRT_TEST_PG_URL";
    let base = match std::env::var(PG_ENV) {
        Ok(u) if !u.is_empty() => u,
        _ => panic!(
            "{PG_ENV} is not set: this test needs a PostgreSQL server. Run scripts/test, or \
             `eval \"$(scripts/pg-test.sh start)\"` and re-run (Debian package: postgresql)"
        ),
    };
    oxvirt_engine::db::testing::fresh_postgres_schema(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot make a test schema on {PG_ENV}={base}: {e}"))
}

pub fn fast_engine_settings() -> oxvirt_engine::app::EngineSettings {
    oxvirt_engine::app::EngineSettings {
        io_timeout: Duration::from_secs(1),
        fence_margin: Duration::from_secs(2),
        monitor_interval: Duration::from_millis(500),
        accel: Some("tcg".into()),
        ..Default::default()
    }
}

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
    pub log: std::path::PathBuf,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The file a test node's stderr (its log) goes to: `node-stderr.log` beside its data directory.
pub fn node_log_path(data: &Path) -> std::path::PathBuf {
    let mut p = data.as_os_str().to_owned();
    p.push("-stderr.log");
    p.into()
}

fn node_log(data: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node_log_path(data))
        .unwrap()
}

impl NodeProc {
    /// The last lines of the node's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

pub fn spawn_node(name: &str, data: &Path, addr: SocketAddr, extra: &[&str]) -> NodeProc {
    spawn_node_via(&[], name, data, addr, extra)
}

/// [`spawn_node`] run through `wrapper` (a command that execs the rest of its arguments, such
/// as `unshare --mount`), so that the child's pid is the node's.
pub fn spawn_node_via(
    wrapper: &[&str],
    name: &str,
    data: &Path,
    addr: SocketAddr,
    extra: &[&str],
) -> NodeProc {
    let mut cmd = match wrapper.split_first() {
        Some((prog, args)) => {
            let mut c = Command::new(prog);
            c.args(args).arg(env!("CARGO_BIN_EXE_oxvirt"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_oxvirt")),
    };
    let child = cmd
        .args(["node", "--name", name, "--listen", &addr.to_string(), "--data"])
        .arg(data)
        .args(extra)
        .env("OXVIRT_LOG", "info")
        .stdout(Stdio::null())
        // A file, not a pipe: nobody drains a pipe during the test, and a full one would block
        // the node's logging (and so the node) in a long test.
        .stderr(node_log(data))
        .spawn()
        .unwrap();
    NodeProc {
        child,
        addr,
        log: node_log_path(data),
    }
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
                    panic!("node exited with {st}: {}", node.log_tail());
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

/// Kills every QEMU whose command line names this run directory's QMP socket.
/// Kills the QEMU processes nodes left in their run directories when it drops (QEMU outlives
/// its node by design: a test that fails midway must not leave guests running).
pub struct QemuReaper(pub Vec<std::path::PathBuf>);

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for run in &self.0 {
            kill_qemus(run);
        }
    }
}

pub fn kill_qemus(run_dir: &Path) {
    let Ok(rd) = std::fs::read_dir(run_dir.join("vms")) else {
        return;
    };
    for e in rd.filter_map(Result::ok) {
        let Ok(pid) = std::fs::read_to_string(e.path().join("qemu.pid")) else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let marker = e.path().join("qmp.sock");
        if String::from_utf8_lossy(&cmdline).contains(marker.to_str().unwrap_or("-")) {
            // SAFETY: kill(2) on a pid whose command line we just checked.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Waits until the engine records host `id` as `want`, kicking its monitor.
pub async fn wait_host(
    e: &oxvirt_engine::daemon::Engine,
    id: HostUuid,
    want: HostStatus,
    timeout: Duration,
) -> oxvirt_engine::model::Host {
    let start = Instant::now();
    loop {
        let h = e.app().db.host_get(id).await.unwrap().unwrap();
        if h.status == want {
            return h;
        }
        assert!(
            start.elapsed() < timeout,
            "host {} is {} ({:?}), not {want}, after {timeout:?}",
            h.name,
            h.status,
            h.status_detail
        );
        e.app().kick.notify_one();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every storage domain under `storage` passes `oxvirt domain check` (metadata, leases,
/// volume chains).
pub fn check_domains(storage: &Path) {
    for sd in std::fs::read_dir(storage).unwrap().flatten() {
        if !sd.path().join("dom_md").is_dir() {
            continue;
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_oxvirt"))
            .args(["domain", "check"])
            .arg(sd.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "domain check of {} failed: {}{}",
            sd.path().display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
