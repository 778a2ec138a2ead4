//! REST benchmark (issue 9): `GET /ovirt-engine/api/vms` (XML) with 10,000 VMs over real HTTPS,
//! latency p50/p99 and the engine's CPU per request, against bare baselines measured in the
//! same run.
//!
//! ```text
//! cargo run -p oxvirt-engine --example rest_bench -- [--vms 10000] [--requests 40] [--pg URL]
//! ```
//!
//! The engine runs in a child process (this binary with `--serve`), so that its CPU time
//! (`utime + stime` from `/proc/<pid>/stat`) is the engine's alone: the driver process only
//! sends requests over one kept-alive HTTPS connection and reads the answers. The child seeds
//! its database through the DB layer (every VM with a disk and a NIC, as `engine_bench` does)
//! and serves the real REST routes plus one bare route, `/bench/bytes`, that answers a
//! prebuilt body of exactly the size of the `/vms` answer: the same TLS, HTTP and socket work
//! with no database and no XML. The other baseline is the child's own `Db::vm_list` of all VMs
//! (the `SELECT` with decoding into the model), timed in-process. Last, the child's resident set
//! (`VmRSS`, peak `VmHWM`): the whole engine daemon with the database of `--vms` VMs.

#[path = "../tests/it/rest_common/mod.rs"]
mod rest_common;
#[path = "seed/mod.rs"]
mod seed;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use oxvirt_engine::app::EngineSettings;
use oxvirt_engine::daemon::{Engine, EngineConfig};
use oxvirt_engine::db::ListQuery;
use oxvirt_engine::model::*;
use oxvirt_engine::Db;
use oxvirt_rpc::Reply;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// `n` VMs in a `bench` cluster, their disks on a `bench` domain.
async fn seed_all(db: &Db, n: usize) {
    let dc = db.dc_insert(&DataCenter::new("bench")).await.unwrap();
    let cl = db.cluster_insert(&Cluster::new("bench", dc.id)).await.unwrap();
    let sd = db
        .sd_insert(&StorageDomain::new(
            "bench",
            SdType::Data,
            StorageType::Localfs,
            "/srv/bench",
        ))
        .await
        .unwrap();
    seed::seed(db, 0, n, cl.id, sd.id).await;
}

/// The child: an engine with `n` VMs serving the REST API and `/bench/bytes`. Prints its
/// address once ready, then answers `size N` (set the bare body's size) and `list` (time one
/// `Db::vm_list` in microseconds) on stdin.
async fn serve(n: usize, pg: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        data_dir: dir.path().to_path_buf(),
        db_url: pg,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_password: Some(rest_common::ADMIN_PASSWORD.into()),
        settings: EngineSettings {
            monitor_interval: Duration::from_secs(3600),
            ..EngineSettings::default()
        },
    };
    let bare = Arc::new(std::sync::RwLock::new(Bytes::new()));
    let rest = oxvirt_engine::rest::routes();
    let b2 = bare.clone();
    let routes: oxvirt_engine::daemon::ExtraRoutes = Arc::new(move |e, req| {
        if req.path == "/bench/bytes" {
            let body = b2.read().unwrap().clone();
            return Box::pin(async move {
                Reply::Headers {
                    status: StatusCode::OK,
                    content_type: "application/xml",
                    headers: HeaderMap::new(),
                    body,
                }
            });
        }
        rest(e, req)
    });
    let engine = Engine::start(cfg, Some(routes)).await.unwrap();
    let t0 = Instant::now();
    seed_all(&engine.app().db, n).await;
    eprintln!("seeded {n} VMs in {:.1} s", t0.elapsed().as_secs_f64());
    std::fs::write(dir.path().join("bench-ca.pem"), engine.enrollment.ca().cert_pem()).unwrap();
    println!("{} {}", engine.addr, dir.path().join("bench-ca.pem").display());
    let mut lines = BufReader::new(std::io::stdin()).lines();
    while let Some(Ok(l)) = tokio::task::block_in_place(|| lines.next()) {
        let mut out = std::io::stdout();
        if let Some(sz) = l.strip_prefix("size ") {
            *bare.write().unwrap() = Bytes::from(vec![b'x'; sz.parse().unwrap()]);
            writeln!(out, "ok").unwrap();
        } else if l == "list" {
            let t = Instant::now();
            let vms = engine.app().db.vm_list(&ListQuery::default()).await.unwrap();
            assert_eq!(vms.len(), n);
            writeln!(out, "{}", t.elapsed().as_micros()).unwrap();
        } else {
            break;
        }
        out.flush().unwrap();
    }
    engine.shutdown().await;
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) : utime is 14th, stime 15th overall.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = arg("--vms").map_or(10_000, |v| v.parse().unwrap());
    let pg = arg("--pg");
    if std::env::args().any(|a| a == "--serve") {
        return serve(n, pg).await;
    }
    let reqs: usize = arg("--requests").map_or(40, |v| v.parse().unwrap());
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--serve", "--vms", &n.to_string()]);
    if let Some(u) = &pg {
        cmd.args(["--pg", u]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .env("OXVIRT_LOG", "warn")
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = from_child.next().unwrap().unwrap();
    let (addr, ca) = first.split_once(' ').unwrap();
    let ca_pem = std::fs::read_to_string(ca).unwrap();
    let mut c = rest_common::Client::with_ca(addr.parse().unwrap(), &ca_pem);
    c.login().await;

    // Warm-up (connection, caches, allocator), then interleaved rounds of both paths so that
    // load from other processes hits them alike.
    measure_all(&c, pid, "vms", 2).await;
    let size = c.api(Method::GET, "vms", "").await.body.len();
    writeln!(to_child, "size {size}").unwrap();
    assert_eq!(from_child.next().unwrap().unwrap(), "ok");
    measure_all(&c, pid, "/bench/bytes", 2).await;
    let rounds = 4;
    let mut vms_lat = Vec::new();
    let mut bare_lat = Vec::new();
    let (mut vms_cpu, mut bare_cpu) = (0.0, 0.0);
    for _ in 0..rounds {
        let v = measure_all(&c, pid, "vms", reqs / rounds).await;
        vms_cpu += v.1;
        vms_lat.extend(v.0);
        let b = measure_all(&c, pid, "/bench/bytes", reqs / rounds).await;
        bare_cpu += b.1;
        bare_lat.extend(b.0);
    }
    vms_lat.sort();
    bare_lat.sort();
    let mut lists = Vec::new();
    for _ in 0..5 {
        writeln!(to_child, "list").unwrap();
        let us: u64 = from_child.next().unwrap().unwrap().parse().unwrap();
        lists.push(Duration::from_micros(us));
    }
    lists.sort();
    let (rss, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    writeln!(to_child, "quit").unwrap();
    drop(to_child);
    let _ = child.wait();

    let db = if pg.is_some() { "PostgreSQL" } else { "SQLite" };
    println!(
        "GET /ovirt-engine/api/vms, {n} VMs ({db}), XML {} bytes, {} requests:",
        size,
        vms_lat.len()
    );
    println!(
        "  /vms          p50 {:7.1} ms  p99 {:7.1} ms  engine CPU {:6.1} ms/request",
        ms(pct(&vms_lat, 0.5)),
        ms(pct(&vms_lat, 0.99)),
        vms_cpu / rounds as f64
    );
    println!(
        "  bare bytes    p50 {:7.1} ms  p99 {:7.1} ms  engine CPU {:6.1} ms/request",
        ms(pct(&bare_lat, 0.5)),
        ms(pct(&bare_lat, 0.99)),
        bare_cpu / rounds as f64
    );
    println!(
        "  Db::vm_list   median {:7.1} ms (in the engine process, no HTTP)",
        ms(lists[lists.len() / 2])
    );
    println!(
        "  ratio /vms : bare bytes (p50) = {:.1}",
        pct(&vms_lat, 0.5).as_secs_f64() / pct(&bare_lat, 0.5).as_secs_f64()
    );
    println!(
        "  engine process (whole daemon: REST, monitor, database pool) RSS {:.1} MiB, peak {:.1} MiB",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
}

/// A `/proc/<pid>/status` figure in KiB.
fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Latencies of `reqs` requests and the child's CPU per request (ms).
async fn measure_all(c: &rest_common::Client, pid: u32, path: &str, reqs: usize) -> (Vec<Duration>, f64) {
    let hz = 100.0;
    let cpu0 = cpu_ticks(pid);
    let mut lat = Vec::with_capacity(reqs);
    for _ in 0..reqs {
        let t = Instant::now();
        let r = c.api(Method::GET, path, "").await;
        lat.push(t.elapsed());
        assert_eq!(r.status, StatusCode::OK, "{path}");
    }
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / hz * 1e3 / reqs as f64;
    (lat, cpu)
}
