//! Benchmark of the node daemon's footprint and its `Host.getAllVmStats` latency: one real
//! `oxvirt node` process, enrolled with an engine CA played by this process, driven over mutual
//! TLS, running 10 test-guest VMs under TCG.
//!
//! ```sh
//! scripts/test-guest.sh && cargo build -p oxvirt --examples && \
//!   cargo run -p oxvirt --example node_bench -- [vms] [rounds] [mem_mib]
//! ```
//!
//! Defaults: 10 VMs of 128 MiB, 300 rounds. Reports the node's RSS (`VmRSS`, `RssAnon`, peak
//! `VmHWM`, threads) idle and with the VMs up, and the latency of `Host.getAllVmStats` against
//! `Host.ping` — the trivial verb, over the same pooled TLS connection, interleaved call by call,
//! so the ratio is the cost of collecting the stats and nothing of the transport.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxvirt_engine::enroll::{handler, Enrollment};
use oxvirt_pki::{client_config, server_config, CertAuthority, Role};
use oxvirt_rpc::{Limits, RpcClient};
use oxvirt_testkit::TestGuest;
use oxvirt_types::VmId;
use serde_json::{json, Value};

/// The node process, and the QEMUs it started (they outlive it by design, so a bench that
/// stops half-way kills them here).
struct NodeProc {
    child: Child,
    run_dir: PathBuf,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let Ok(rd) = std::fs::read_dir(self.run_dir.join("vms")) else {
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
                // SAFETY: kill(2) on a QEMU whose command line names this node's run directory.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
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

/// The memory figures of `/proc/<pid>/status`, in KiB, and the thread count.
#[derive(Debug, Clone, Copy)]
struct Mem {
    rss: u64,
    anon: u64,
    hwm: u64,
    threads: u64,
}

fn mem(pid: u32) -> Mem {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("node status");
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in /proc/{pid}/status"))
    };
    Mem {
        rss: field("VmRSS:"),
        anon: field("RssAnon:"),
        hwm: field("VmHWM:"),
        threads: field("Threads:"),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn call(c: &RpcClient, m: &str, p: Value) -> Value {
    c.call(m, p.clone())
        .await
        .unwrap_or_else(|e| panic!("{m}({p}): {e}"))
}

/// `rounds` interleaved calls of each verb (alternating which goes first); sorted latencies
/// in milliseconds.
async fn latencies(c: &RpcClient, verbs: [&str; 2], rounds: usize) -> [Vec<f64>; 2] {
    let mut out = [Vec::new(), Vec::new()];
    for r in 0..rounds {
        for k in 0..2 {
            let i = (k + r) % 2;
            let t = Instant::now();
            call(c, verbs[i], json!({})).await;
            out[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    for v in &mut out {
        v.sort_by(f64::total_cmp);
    }
    out
}

fn line(what: &str, v: &[f64], base: &[f64]) {
    println!(
        "| {what} | p50 {:.2} ms, p99 {:.2} ms | p50 {:.2} ms, p99 {:.2} ms | {:.2} / {:.2} |",
        pct(v, 0.5),
        pct(v, 0.99),
        pct(base, 0.5),
        pct(base, 0.99),
        pct(v, 0.5) / pct(base, 0.5),
        pct(v, 0.99) / pct(base, 0.99),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nvms: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(10);
    let rounds: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(300);
    let mem_mib: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(128);
    let guest = TestGuest::get();

    // The engine's enrollment service on a TLS listener in this process.
    let ca = CertAuthority::generate("bench CA").unwrap();
    let engine_id = ca.issue(Role::Engine, "engine", &["127.0.0.1".into()]).unwrap();
    let enrollment = Arc::new(Enrollment::new(ca, |_| {}));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let engine_addr = listener.local_addr().unwrap();
    tokio::spawn(oxvirt_rpc::serve(
        listener,
        Some(Arc::new(server_config(&engine_id, None).unwrap())),
        handler(enrollment.clone()),
        Limits::default(),
        std::future::pending(),
    ));

    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let token = enrollment.issue_token(Duration::from_secs(300));
    let child = Command::new(oxvirt_binary())
        .args(["node", "--name", "bench", "--listen", &addr.to_string(), "--data"])
        .arg(dir.path())
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
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn oxvirt node");
    let mut node = NodeProc {
        child,
        run_dir: dir.path().join("run"),
    };
    let pid = node.child.id();
    let c = RpcClient::new(
        addr,
        "127.0.0.1",
        client_config(&engine_id.ca_pem, Some(&engine_id)).unwrap(),
    )
    .unwrap()
    .with_timeout(Duration::from_secs(60));
    let start = Instant::now();
    while c.call("Host.ping", json!({})).await.is_err() {
        if let Some(st) = node.child.try_wait().unwrap() {
            panic!("node exited with {st}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "node did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Idle: serving, enrolled, no VMs; a few calls of every kind first so that lazily
    // initialised state (TLS session, sampler, verb tables) is counted.
    for m in ["Host.getCapabilities", "Host.getStats", "Host.getAllVmStats"] {
        call(&c, m, json!({})).await;
    }
    let idle_lat = latencies(&c, ["Host.getAllVmStats", "Host.ping"], rounds).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = mem(pid);

    // 10 VMs: the test guest stays up after printing its marker (no oxvirt.poweroff).
    let t_boot = Instant::now();
    let mut vms = Vec::new();
    for i in 0..nvms {
        let id = VmId::new_random();
        let marker = format!("bench-{i}");
        call(
            &c,
            "VM.create",
            json!({
                "vmID": id, "vmName": format!("bench{i}"), "smp": 1, "memSize": mem_mib,
                "boot": { "kernel": guest.kernel, "initrd": guest.initrd,
                          "cmdline": TestGuest::append(&[&format!("oxvirt.marker={marker}")]) },
            }),
        )
        .await;
        vms.push((id, marker));
    }
    for (id, marker) in &vms {
        let console = node.run_dir.join("vms").join(id.to_string()).join("serial.log");
        oxvirt_testkit::wait_for_text(
            &console,
            &format!("OXVIRT-MARKER {marker}"),
            Duration::from_secs(600),
        )
        .unwrap_or_else(|e| panic!("VM {id}: {e}"));
    }
    let boot_s = t_boot.elapsed().as_secs_f64();
    let all = call(&c, "Host.getAllVmStats", json!({})).await;
    let n = all.as_array().map_or(0, Vec::len);
    assert_eq!(n, nvms, "getAllVmStats lists every VM: {all}");
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .all(|v| v["stats"]["rss_bytes"].as_u64().unwrap_or(0) > 0
                || v["stats"]["rssBytes"].as_u64().unwrap_or(0) > 0),
        "every VM has stats: {all}"
    );
    let busy_lat = latencies(&c, ["Host.getAllVmStats", "Host.ping"], rounds).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = mem(pid);

    for (id, _) in &vms {
        call(&c, "VM.destroy", json!({ "vmID": id })).await;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    println!(
        "node_bench: {nvms} VMs x {mem_mib} MiB (TCG), booted in {boot_s:.1} s; {rounds} rounds; loadavg {}",
        load.trim()
    );
    println!();
    println!("| node RSS | VmRSS | RssAnon | VmHWM (peak) | threads |");
    println!("|---|---|---|---|---|");
    for (what, m) in [("idle", idle), (&*format!("{nvms} VMs running"), busy)] {
        println!(
            "| {what} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} |",
            mib(m.rss),
            mib(m.anon),
            mib(m.hwm),
            m.threads
        );
    }
    println!();
    println!("| verb | latency | Host.ping, same connection | ratio p50 / p99 |");
    println!("|---|---|---|---|");
    line("Host.getAllVmStats, 0 VMs", &idle_lat[0], &idle_lat[1]);
    line(
        &format!("Host.getAllVmStats, {nvms} VMs"),
        &busy_lat[0],
        &busy_lat[1],
    );
    drop(node);
}
