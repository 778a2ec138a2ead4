//! setupNetworks apply and rollback times against iproute2 doing the same changes.
//!
//! In a namespace of its own with 4 veth "NICs": `setupNetworks` puts a bridged network with a
//! static address and an MTU on each (one request), then the rollback restores the host (the
//! countdown is a simulated clock, so only the restore is timed). The bare tool is one
//! `ip -batch` making the same links, ports, MTUs and addresses, and one undoing them.
//!
//!     cargo run --release -p oxvirt-node --example net_bench

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxvirt_lease::SimClock;
use oxvirt_node::net::model::SetupNetworks;
use oxvirt_node::net::{NetConfig, NetworkService};
use oxvirt_testkit::netns::TestNs;
use serde_json::json;

const NICS: usize = 4;
const ROUNDS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ip_batch(ns: &TestNs, script: &str) -> f64 {
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args(["-n", &ns.name, "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "ip -batch failed");
    start.elapsed().as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let ns = TestNs::new("bench");
    for i in 0..NICS {
        ns.veth(&format!("eth{i}"), &format!("peer{i}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = SimClock::new(Duration::from_secs(1));
    let svc = NetworkService::open(NetConfig {
        state_dir: dir.path().to_path_buf(),
        netns: Some(ns.name.clone()),
        clock: Arc::new(clock.clone()),
        events: None,
    })
    .await
    .unwrap();
    let mut nets = serde_json::Map::new();
    let mut up = String::new();
    let mut down = String::new();
    for i in 0..NICS {
        nets.insert(
            format!("net{i}"),
            json!({ "nic": format!("eth{i}"), "mtu": 9000, "ipaddr": format!("10.60.{i}.1"), "prefix": 24 }),
        );
        up += &format!(
            "link add net{i} type bridge\nlink set eth{i} mtu 9000\nlink set eth{i} master net{i}\n\
             link set net{i} mtu 9000\nlink set net{i} up\naddr add 10.60.{i}.1/24 dev net{i}\n"
        );
        down += &format!("link del net{i}\nlink set eth{i} mtu 1500\n");
    }
    let req: SetupNetworks = serde_json::from_value(json!({ "networks": nets })).unwrap();
    let (mut apply, mut rollback, mut bare_apply, mut bare_undo) = (vec![], vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        // Alternate which side goes first so neither always meets a warm cache.
        let ours_first = round % 2 == 0;
        if !ours_first {
            bare_apply.push(ip_batch(&ns, &up));
            bare_undo.push(ip_batch(&ns, &down));
        }
        let start = Instant::now();
        svc.setup_networks(req.clone()).await.unwrap();
        apply.push(start.elapsed().as_secs_f64() * 1000.0);
        clock.advance(Duration::from_secs(121));
        let t = Instant::now();
        while svc.rollbacks().len() <= round {
            assert!(t.elapsed() < Duration::from_secs(30), "no rollback");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let rb = svc.rollbacks()[round].clone();
        assert!(rb.errors.is_empty(), "{rb:?}");
        rollback.push(rb.elapsed_ms as f64);
        if ours_first {
            bare_apply.push(ip_batch(&ns, &up));
            bare_undo.push(ip_batch(&ns, &down));
        }
    }
    let (a, r, ba, bu) = (
        median(apply),
        median(rollback),
        median(bare_apply),
        median(bare_undo),
    );
    println!("setupNetworks, {NICS} bridged networks with MTU and address, median of {ROUNDS}:");
    println!(
        "  apply     {a:8.2} ms   ip -batch {ba:8.2} ms   ratio {:.2}",
        a / ba
    );
    println!(
        "  rollback  {r:8.2} ms   ip -batch {bu:8.2} ms   ratio {:.2}",
        r / bu
    );
}
