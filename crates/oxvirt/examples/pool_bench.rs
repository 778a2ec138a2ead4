//! Benchmark of the pool's SPM failover and mailbox, on real `oxvirt node` processes sharing a
//! directory as storage (the engine's enrollment runs in this process, which plays the engine).
//!
//! ```sh
//! cargo build -p oxvirt && cargo run -p oxvirt --example pool_bench -- [requests] [io_timeouts...]
//! ```
//!
//! Defaults: 1000 mailbox extend requests from 3 HSM nodes (one SPM, four nodes in all), then
//! SPM failover (kill -9 of the SPM → another node is SPM → it serves an extend) for
//! io_timeout 1 s and 10 s, with the fence margin M = N (oxvirt-only hosts).

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxvirt_engine::enroll::{handler, Enrollment};
use oxvirt_pki::{client_config, server_config, CertAuthority, Identity, Role};
use oxvirt_rpc::{Limits, RpcClient};
use oxvirt_types::{ImgUuid, PoolUuid, SdUuid, VolUuid};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

struct Node {
    child: Child,
    client: Arc<RpcClient>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn oxvirt_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("oxvirt");
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build -p oxvirt` first",
        bin.display()
    );
    bin
}

async fn call(c: &RpcClient, m: &str, p: Value) -> Value {
    c.call(m, p.clone())
        .await
        .unwrap_or_else(|e| panic!("{m}({p}): {e}"))
}

async fn wait_task(c: &RpcClient, task: &Value) -> Value {
    loop {
        let st = call(c, "Task.getStatus", json!({ "taskID": task })).await["taskStatus"].clone();
        if st["taskState"] != "running" {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let requests: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let timeouts: Vec<f64> = if args.len() > 1 {
        args[1..]
            .iter()
            .map(|s| s.parse().expect("io timeout seconds"))
            .collect()
    } else {
        vec![1.0, 10.0]
    };
    let ca = CertAuthority::generate("bench CA").unwrap();
    let identity = ca.issue(Role::Engine, "engine", &["127.0.0.1".into()]).unwrap();
    let enrollment = Arc::new(Enrollment::new(ca, |_| {}));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let engine_addr = listener.local_addr().unwrap();
    let tls = Arc::new(server_config(&identity, None).unwrap());
    tokio::spawn(oxvirt_rpc::serve(
        listener,
        Some(tls),
        handler(enrollment.clone()),
        Limits::default(),
        std::future::pending(),
    ));
    for (i, n) in timeouts.iter().enumerate() {
        run(
            &identity,
            &enrollment,
            engine_addr,
            *n,
            if i == 0 { requests } else { 20 },
        )
        .await;
    }
}

async fn run(
    identity: &Identity,
    enrollment: &Enrollment,
    engine_addr: SocketAddr,
    io_timeout: f64,
    requests: usize,
) {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let mut nodes = Vec::new();
    for i in 1..=4 {
        let data = dir.path().join(format!("host-{i}"));
        std::fs::create_dir_all(&data).unwrap();
        let addr = StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let token = enrollment.issue_token(Duration::from_secs(300));
        let child = Command::new(oxvirt_binary())
            .args([
                "node",
                "--name",
                &format!("host-{i}"),
                "--listen",
                &addr.to_string(),
                "--data",
            ])
            .arg(&data)
            .args([
                "--engine",
                &engine_addr.to_string(),
                "--token",
                &token,
                "--accel",
                "tcg",
            ])
            .env("OXVIRT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data.join("node.log")).unwrap())
            .spawn()
            .unwrap();
        let client = Arc::new(
            RpcClient::new(
                addr,
                "127.0.0.1",
                client_config(&identity.ca_pem, Some(identity)).unwrap(),
            )
            .unwrap()
            .with_timeout(Duration::from_secs(600)),
        );
        while client.call("Host.ping", json!({})).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        call(
            &client,
            "StoragePool.connectStorageServer",
            json!({ "connectionParams": [{ "id": "s", "kind": "localfs", "path": shared }] }),
        )
        .await;
        nodes.push(Node { child, client });
    }
    let (pool, sd) = (PoolUuid::new_random(), SdUuid::new_random());
    let c0 = nodes[0].client.clone();
    call(
        &c0,
        "StorageDomain.create",
        json!({ "sdUUID": sd, "connectionID": "s", "description": "bench", "storageType": "localfs" }),
    )
    .await;
    call(
        &c0,
        "StoragePool.create",
        json!({ "spUUID": pool, "poolName": "bench", "masterDom": sd, "masterVersion": 1 }),
    )
    .await;
    let t0 = Instant::now();
    let mut joins = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let c = n.client.clone();
        joins.push(tokio::spawn(async move {
            call(
                &c,
                "StoragePool.connect",
                json!({ "spUUID": pool, "hostID": i + 1, "msdUUID": sd, "masterVersion": 1,
                "ioTimeout": io_timeout, "fenceMargin": io_timeout, "maxHostID": 8 }),
            )
            .await
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    println!(
        "io_timeout {io_timeout} s: 4 nodes connected (host ids acquired) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let t = call(
        &c0,
        "StoragePool.spmStart",
        json!({ "spUUID": pool, "prevID": -1, "prevLver": -1 }),
    )
    .await;
    assert_eq!(wait_task(&c0, &t).await["taskResult"], "success");
    let (img, vol) = (ImgUuid::new_random(), VolUuid::new_random());
    let t = call(
        &c0,
        "Volume.create",
        json!({ "sdUUID": sd, "spUUID": pool, "imgUUID": img, "size": MIB,
        "volFormat": "RAW", "preallocate": "SPARSE", "volUUID": vol }),
    )
    .await;
    assert_eq!(wait_task(&c0, &t).await["taskResult"], "success");

    // Mailbox: `requests` extends from the 3 HSM nodes at once, each node's requests in turn.
    let per = requests.div_ceil(3);
    let start = Instant::now();
    let mut joins = Vec::new();
    for (k, n) in nodes[1..].iter().enumerate() {
        let c = n.client.clone();
        joins.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for r in 0..per {
                let size = (1 + (r * 3 + k) as u64) * MIB;
                let v = call(
                    &c,
                    "StoragePool.sendExtendMsg",
                    json!({ "spUUID": pool, "sdUUID": sd, "volUUID": vol, "newSize": size }),
                )
                .await;
                lat.push(v["latencyMs"].as_f64().unwrap());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for j in joins {
        lat.extend(j.await.unwrap());
    }
    let wall = start.elapsed();
    lat.sort_by(f64::total_cmp);
    println!(
        "io_timeout {io_timeout} s: mailbox extend request->reply over {} requests from 3 HSM nodes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({:.1} s wall)",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat[lat.len() - 1],
        wall.as_secs_f64()
    );

    // Failover: kill -9 the SPM; the engine asks node 2 at once and keeps asking.
    let lver =
        call(&c0, "StoragePool.getSpmStatus", json!({ "spUUID": pool })).await["spm_st"]["spmLver"].clone();
    nodes[0].child.kill().unwrap();
    nodes[0].child.wait().unwrap();
    let killed = Instant::now();
    let c1 = nodes[1].client.clone();
    loop {
        let t = call(
            &c1,
            "StoragePool.spmStart",
            json!({ "spUUID": pool, "prevID": 1, "prevLver": lver }),
        )
        .await;
        if wait_task(&c1, &t).await["taskResult"] == "success" {
            break;
        }
    }
    let spm = killed.elapsed();
    let c2 = nodes[2].client.clone();
    call(
        &c2,
        "StoragePool.sendExtendMsg",
        json!({ "spUUID": pool, "sdUUID": sd, "volUUID": vol, "newSize": 2u64 << 30 }),
    )
    .await;
    let serving = killed.elapsed();
    let n = io_timeout;
    println!(
        "io_timeout {io_timeout} s: SPM failover kill -9 -> new SPM {:.1} s, -> serving extends {:.1} s (host dead bound 8N+M = {:.0} s)",
        spm.as_secs_f64(),
        serving.as_secs_f64(),
        8.0 * n + n
    );
}
