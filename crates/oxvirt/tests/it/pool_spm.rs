//! Three real `oxvirt node` processes share one directory as shared storage, each with its own
//! host id and loopback port; the test process plays the engine. It creates a pool, starts the
//! SPM, checks that only the SPM changes volumes, sends mailbox extends from HSM nodes, then
//! `kill -9`s the SPM in the middle of a three-job merge task. Another node becomes SPM once
//! the lease allows (io_timeout 1 s), recovers the task despite a stale task record left in the
//! journal, and the domain validates clean with the storage checker and `qemu-img check`.
//! Volume leases are contended between the two surviving nodes.

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{engine_client, free_port, start_engine, Engine};
use oxvirt_rpc::client::ClientError;
use oxvirt_rpc::RpcClient;
use oxvirt_storage::{FileStorageDomain, Legality, VolRole};
use oxvirt_types::{ImgUuid, PoolUuid, SdUuid, VolUuid};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

pub struct Node {
    pub child: Child,
    pub addr: SocketAddr,
    pub client: RpcClient,
    pub log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn(engine: &Engine, name: &str, root: &Path, env: &[(&str, &str)]) -> Node {
    let data = root.join(name);
    std::fs::create_dir_all(&data).unwrap();
    let addr = free_port();
    let token = engine.enrollment.issue_token(Duration::from_secs(300));
    let log = data.join("node.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_oxvirt"));
    cmd.args(["node", "--name", name, "--listen", &addr.to_string(), "--data"])
        .arg(&data)
        .args([
            "--engine",
            &engine.addr.to_string(),
            "--token",
            &token,
            "--accel",
            "tcg",
        ])
        .env("OXVIRT_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let client = engine_client(engine, addr).with_timeout(Duration::from_secs(60));
    let start = Instant::now();
    while client.call("Host.ping", json!({})).await.is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "node {name} exited with {st}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "node {name} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Node {
        child,
        addr,
        client,
        log,
    }
}

async fn call(n: &Node, m: &str, p: Value) -> Value {
    match n.client.call(m, p.clone()).await {
        Ok(v) => v,
        Err(e) => panic!("{m}({p}) on {}: {e}\n{}", n.addr, tail(&n.log)),
    }
}

fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn rpc_err(r: Result<Value, ClientError>) -> oxvirt_rpc::RpcError {
    match r {
        Err(ClientError::Rpc(e)) => e,
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

/// Polls a task until it is no longer running.
async fn wait_task(n: &Node, task: &str, limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let st = call(n, "Task.getStatus", json!({ "taskID": task })).await["taskStatus"].clone();
        if st["taskState"] != "running" {
            return st;
        }
        assert!(
            start.elapsed() < limit,
            "task {task} still running after {limit:?}: {st}\n{}",
            tail(&n.log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_spm(n: &Node, pool: PoolUuid, limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let st = call(n, "StoragePool.getSpmStatus", json!({ "spUUID": pool })).await;
        if st["spm_st"]["spmStatus"] == "SPM" {
            return st;
        }
        assert!(
            start.elapsed() < limit,
            "not SPM after {limit:?}: {st}\n{}",
            tail(&n.log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn qemu_io(path: &Path, cmd: &str) -> String {
    let tool = oxvirt_testkit::require_tool("qemu-io");
    let out = Command::new(tool)
        .args(["-f", "qcow2", "-c", cmd])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io {cmd} {}: {text}", path.display());
    text
}

struct Cluster {
    _engine: Engine,
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    pool: PoolUuid,
    sd: SdUuid,
}

impl Cluster {
    fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    fn domain(&self) -> FileStorageDomain {
        FileStorageDomain::open(&self.shared().join(self.sd.to_string())).unwrap()
    }
}

async fn cluster(pause_on_node1: Option<&str>) -> Cluster {
    let engine = start_engine().await;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let env: Vec<(&str, &str)> = match (i, pause_on_node1) {
            (1, Some(p)) => vec![(oxvirt_storage::tasks::PAUSE_ENV, p)],
            _ => vec![],
        };
        nodes.push(spawn(&engine, &format!("host-{i}"), dir.path(), &env).await);
    }
    for n in &nodes {
        let r = call(
            n,
            "StoragePool.connectStorageServer",
            json!({ "connectionParams": [{ "id": "shared", "kind": "localfs", "path": shared }] }),
        )
        .await;
        assert_eq!(r["statuslist"][0]["status"], 0, "{r}");
    }
    let (pool, sd) = (PoolUuid::new_random(), SdUuid::new_random());
    call(
        &nodes[0],
        "StorageDomain.create",
        json!({ "sdUUID": sd, "connectionID": "shared", "description": "data", "storageType": "localfs" }),
    )
    .await;
    let pm = call(
        &nodes[0],
        "StoragePool.create",
        json!({ "spUUID": pool, "poolName": "dc1", "masterDom": sd, "masterVersion": 1 }),
    )
    .await;
    assert_eq!(pm["master_version"], 1);
    // Connect all three at once (each acquires its host id).
    let connect = |i: usize| {
        nodes[i].client.call(
            "StoragePool.connect",
            json!({ "spUUID": pool, "hostID": i + 1, "msdUUID": sd, "masterVersion": 1,
                    "ioTimeout": 1, "fenceMargin": 2, "maxHostID": 8 }),
        )
    };
    let (r1, r2, r3) = tokio::join!(connect(0), connect(1), connect(2));
    for (i, r) in [r1, r2, r3].into_iter().enumerate() {
        let info = r.unwrap_or_else(|e| panic!("connect host {}: {e}\n{}", i + 1, tail(&nodes[i].log)));
        assert_eq!(info["hostId"], i + 1);
        assert_eq!(
            info["hostIds"][sd.to_string()]["valid"],
            true,
            "{info}\n{}",
            tail(&nodes[i].log)
        );
    }
    Cluster {
        _engine: engine,
        dir,
        nodes,
        pool,
        sd,
    }
}

async fn create_volume(
    n: &Node,
    c: &Cluster,
    img: ImgUuid,
    vol: VolUuid,
    src: Option<(ImgUuid, VolUuid)>,
) -> Value {
    let mut p = json!({ "sdUUID": c.sd, "spUUID": c.pool, "imgUUID": img, "size": 64 * MIB,
                        "volFormat": "COW", "preallocate": "SPARSE", "volUUID": vol, "desc": "t" });
    if let Some((si, sv)) = src {
        p["srcImgUUID"] = json!(si);
        p["srcVolUUID"] = json!(sv);
    }
    let task = call(n, "Volume.create", p).await;
    wait_task(n, task.as_str().unwrap(), Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spm_failover_mid_task_recovers_and_the_mailbox_serves_extends() {
    let mut c = cluster(Some("mergeSnapshots:1")).await;
    let (pool, sd) = (c.pool, c.sd);

    // The engine starts the SPM on host 1.
    let t = call(
        &c.nodes[0],
        "StoragePool.spmStart",
        json!({ "spUUID": pool, "prevID": -1, "prevLver": -1 }),
    )
    .await;
    let st = wait_task(&c.nodes[0], t.as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(st["taskResult"], "success", "{st}");
    let spm1 = wait_spm(&c.nodes[0], pool, Duration::from_secs(5)).await;
    assert_eq!(spm1["spm_st"]["spmId"], 1);
    let lver1 = spm1["spm_st"]["spmLver"].as_i64().unwrap();
    assert!(lver1 >= 1);
    assert_eq!(spm1["metadata"]["spmId"], 1);
    assert_eq!(spm1["metadata"]["lver"], lver1);
    // Everyone sees the same SPM on storage.
    let seen = call(&c.nodes[2], "StoragePool.getSpmStatus", json!({ "spUUID": pool })).await;
    assert_eq!(
        (
            seen["spm_st"]["spmId"].as_i64(),
            seen["spm_st"]["spmStatus"].as_str()
        ),
        (Some(1), Some("Free"))
    );

    // Only the SPM changes volumes.
    let (img, base, top) = (
        ImgUuid::new_random(),
        VolUuid::new_random(),
        VolUuid::new_random(),
    );
    let e = rpc_err(
        c.nodes[1]
            .client
            .call(
                "Volume.create",
                json!({ "sdUUID": sd, "spUUID": pool, "imgUUID": img, "size": 64 * MIB, "volFormat": "COW",
                        "preallocate": "SPARSE", "volUUID": base }),
            )
            .await,
    );
    assert_eq!(e.code, 654, "{e:?}");
    assert!(e.message.contains("not the SPM"), "{e:?}");
    assert!(!c.domain().image_exists(img), "a refused verb changes nothing");
    let st = create_volume(&c.nodes[0], &c, img, base, None).await;
    assert_eq!(st["taskResult"], "success", "{st}");
    let st = create_volume(&c.nodes[0], &c, img, top, Some((img, base))).await;
    assert_eq!(st["taskResult"], "success", "{st}");
    let dom = c.domain();
    qemu_io(&dom.volume_path(img, top), "write -P 0xab 0 1M");
    assert_eq!(dom.chain(img).unwrap().ids(), vec![base, top]);
    // Deleting, extending and merging (cold, or finalizing a live one) are the SPM's too.
    let vol = json!({ "sdUUID": sd, "spUUID": pool, "imgUUID": img, "volUUID": top });
    let merge = json!({ "sdUUID": sd, "spUUID": pool, "imgUUID": img, "ancestor": base, "successor": top });
    let mut extend = vol.clone();
    extend["newSize"] = json!(128 * MIB);
    for (verb, args) in [
        ("Volume.delete", vol.clone()),
        ("Volume.extendSize", extend),
        ("Image.mergeSnapshots", merge.clone()),
        ("Image.finalizeMerge", merge),
        (
            "Image.delete",
            json!({ "sdUUID": sd, "spUUID": pool, "imgUUID": img }),
        ),
    ] {
        let e = rpc_err(c.nodes[2].client.call(verb, args).await);
        assert_eq!(
            (e.code, e.message.contains("not the SPM")),
            (654, true),
            "{verb}: {e:?}"
        );
    }
    assert_eq!(
        dom.chain(img).unwrap().ids(),
        vec![base, top],
        "refused verbs change nothing"
    );
    assert_eq!(dom.read_meta(img, top).unwrap().capacity, 64 * MIB);

    // Mailbox: HSM hosts 2 and 3 ask the SPM to extend the top volume's file.
    let top_path = dom.volume_path(img, top);
    let mut lat = Vec::new();
    for k in 1..=20u64 {
        let n = &c.nodes[1 + (k as usize % 2)];
        let r = call(
            n,
            "StoragePool.sendExtendMsg",
            json!({ "spUUID": pool, "sdUUID": sd, "volUUID": top, "newSize": (16 + k) * MIB }),
        )
        .await;
        assert_eq!(r["sizeMib"], 16 + k, "{r}");
        assert!(std::fs::metadata(&top_path).unwrap().len() >= (16 + k) * MIB);
        lat.push(r["latencyMs"].as_f64().unwrap());
    }
    lat.sort_by(f64::total_cmp);
    let p50 = lat[lat.len() / 2];
    eprintln!(
        "mailbox extend round trip over 20 requests: p50 {p50:.1} ms, max {:.1} ms",
        lat[lat.len() - 1]
    );
    assert!(p50 < 250.0, "median extend round trip {p50} ms");
    // An unknown volume is refused through the mailbox, not left hanging.
    let e = rpc_err(
        c.nodes[2]
            .client
            .call(
                "StoragePool.sendExtendMsg",
                json!({ "spUUID": pool, "sdUUID": sd, "volUUID": VolUuid::new_random(), "newSize": MIB }),
            )
            .await,
    );
    assert!(e.message.contains("refused"), "{e:?}");

    // A three-job merge; host 1 is parked before job 1 (the commit, after the commit point).
    let task = call(
        &c.nodes[0],
        "Image.mergeSnapshots",
        json!({ "sdUUID": sd, "spUUID": pool, "imgUUID": img, "ancestor": base, "successor": top }),
    )
    .await;
    let task = task.as_str().unwrap().to_string();
    let start = Instant::now();
    loop {
        let info = call(&c.nodes[0], "Task.getInfo", json!({ "taskID": task })).await;
        if info["started"] == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "merge never reached job 1: {info}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Other nodes read the task from the journal on the master domain.
    let seen = call(&c.nodes[1], "Task.getInfo", json!({ "taskID": task })).await;
    assert_eq!(seen["state"], "running");
    assert_eq!(
        dom.read_meta(img, base).unwrap().legality,
        Legality::Illegal,
        "prepare ran"
    );
    // While a task runs, the SPM neither stops nor moves the master (the task journals on
    // it), and the refusal changes nothing: the SPM keeps its mailbox and its metadata.
    for (verb, args) in [
        ("StoragePool.spmStop", json!({ "spUUID": pool })),
        (
            "StoragePool.switchMaster",
            json!({ "spUUID": pool, "oldMasterUUID": sd, "newMasterUUID": SdUuid::new_random(), "masterVersion": 2 }),
        ),
    ] {
        let e = rpc_err(c.nodes[0].client.call(verb, args).await);
        assert_eq!(e.code, 2003, "{verb}: {e:?}");
        assert!(e.message.contains("task job(s) running"), "{verb}: {e:?}");
    }
    let still = call(&c.nodes[0], "StoragePool.getSpmStatus", json!({ "spUUID": pool })).await;
    assert_eq!(
        (
            still["spm_st"]["spmStatus"].as_str(),
            still["metadata"]["spmId"].as_i64()
        ),
        (Some("SPM"), Some(1)),
        "{still}"
    );

    // kill -9 the SPM mid-task, and leave a corrupt task record in the journal.
    c.nodes[0].child.kill().unwrap();
    c.nodes[0].child.wait().unwrap();
    let killed = Instant::now();
    let junk = dom
        .root()
        .join("master/tasks")
        .join(VolUuid::new_random().to_string());
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(
        junk.join(format!("{}.task", junk.file_name().unwrap().to_string_lossy())),
        b"{ not json",
    )
    .unwrap();

    // The engine moves the SPM role to host 2 (prevID/prevLver as last seen).
    // The engine keeps asking until host 1 is dead for the lease (a renewal seen after the
    // kill makes the lease owner look alive and the attempt fail).
    loop {
        let t = call(
            &c.nodes[1],
            "StoragePool.spmStart",
            json!({ "spUUID": pool, "prevID": 1, "prevLver": lver1 }),
        )
        .await;
        let st = wait_task(&c.nodes[1], t.as_str().unwrap(), Duration::from_secs(60)).await;
        if st["taskResult"] == "success" {
            break;
        }
        assert!(
            st["message"].as_str().unwrap().contains("owned by host 1"),
            "{st}"
        );
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "no takeover: {st}\n{}",
            tail(&c.nodes[1].log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let became_spm = killed.elapsed();
    let spm2 = wait_spm(&c.nodes[1], pool, Duration::from_secs(5)).await;
    assert_eq!(spm2["spm_st"]["spmId"], 2);
    let lver2 = spm2["spm_st"]["spmLver"].as_i64().unwrap();
    assert!(lver2 > lver1, "lver is the fencing token: {lver2} > {lver1}");
    assert_eq!(spm2["metadata"]["lver"], lver2);
    // The lease could not be taken before host 1 was dead: 8N + M = 10 s after its last renewal.
    assert!(
        became_spm >= Duration::from_secs(7),
        "SPM moved after {became_spm:?}, before host 1 could be dead"
    );
    // Serving: an HSM extend goes through the new SPM.
    let r = call(
        &c.nodes[2],
        "StoragePool.sendExtendMsg",
        json!({ "spUUID": pool, "sdUUID": sd, "volUUID": base, "newSize": 80 * MIB }),
    )
    .await;
    let serving = killed.elapsed();
    assert_eq!(r["sizeMib"], 80);
    eprintln!(
        "SPM failover with io_timeout 1 s: kill -9 -> new SPM {:.1} s, -> serving extends {:.1} s",
        became_spm.as_secs_f64(),
        serving.as_secs_f64()
    );
    assert!(serving < Duration::from_secs(40), "failover took {serving:?}");

    // The merge was rolled forward by the new SPM; the stale record did not block it.
    let info = call(&c.nodes[1], "StoragePool.getInfo", json!({ "spUUID": pool })).await;
    let rec = &info["lastRecovery"]["tasks"];
    assert_eq!(rec["finished"][0], json!(task), "{info}");
    assert_eq!(rec["unreadable"].as_array().unwrap().len(), 1, "{info}");
    let st = call(&c.nodes[1], "Task.getStatus", json!({ "taskID": task })).await["taskStatus"].clone();
    assert_eq!(
        (st["taskState"].as_str(), st["taskResult"].as_str()),
        (Some("finished"), Some("success")),
        "{st}"
    );
    let tinfo = call(&c.nodes[1], "Task.getInfo", json!({ "taskID": task })).await;
    assert_eq!(tinfo["recovered_by"], 2);
    let dom = c.domain();
    let chain = dom.chain(img).unwrap();
    assert_eq!(chain.ids(), vec![base]);
    let m = dom.read_meta(img, base).unwrap();
    assert_eq!((m.legality, m.role), (Legality::Legal, VolRole::Leaf));
    assert!(qemu_io(&dom.volume_path(img, base), "read -P 0xab 0 1M").contains("read 1048576/1048576"));
    // The checker (with qemu-img check per volume) finds nothing but the corrupt task record,
    // which is outside its scope; remove it and clear the finished task.
    std::fs::remove_dir_all(&junk).unwrap();
    call(&c.nodes[1], "Task.clear", json!({ "taskID": task })).await;
    assert!(!dom.root().join("master/tasks").join(&task).exists());
    let report = dom.check(true).unwrap();
    assert!(report.is_clean(), "{report:?}");

    // Volume leases: host 2 holds base's lease; host 3 is refused naming host 2.
    let vref = json!({ "sdUUID": sd, "imgUUID": img, "volUUID": base });
    call(&c.nodes[1], "Volume.acquireLease", vref.clone()).await;
    let e = rpc_err(c.nodes[2].client.call("Volume.acquireLease", vref.clone()).await);
    assert!(
        e.message.contains(&format!("volume {base} is locked by host 2")),
        "{e:?}"
    );
    let owner = call(&c.nodes[2], "Volume.getLeaseStatus", vref.clone()).await;
    assert_eq!(owner["owner"], 2);
    call(&c.nodes[1], "Volume.releaseLease", vref.clone()).await;
    call(&c.nodes[2], "Volume.acquireLease", vref.clone()).await;
    call(&c.nodes[2], "Volume.releaseLease", vref.clone()).await;
    assert_eq!(
        call(&c.nodes[1], "Volume.getLeaseStatus", vref).await["owner"],
        Value::Null
    );

    // SPM tasks change no volume another host writes. Host 3 holds a new leaf's lease (as for
    // its running VM): the SPM's cold merge of it ends before its first job, naming host 3;
    // deleting or moving it is refused at once. The SPM's own holder is refused the same way.
    let top2 = VolUuid::new_random();
    let st = create_volume(&c.nodes[1], &c, img, top2, Some((img, base))).await;
    assert_eq!(st["taskResult"], "success", "{st}");
    let lref = json!({ "sdUUID": sd, "imgUUID": img, "volUUID": top2 });
    let merge = json!({ "sdUUID": sd, "spUUID": pool, "imgUUID": img, "ancestor": base, "successor": top2 });
    for (holder, host) in [(2usize, 3), (1, 2)] {
        call(&c.nodes[holder], "Volume.acquireLease", lref.clone()).await;
        let t = call(&c.nodes[1], "Image.mergeSnapshots", merge.clone()).await;
        let st = wait_task(&c.nodes[1], t.as_str().unwrap(), Duration::from_secs(30)).await;
        assert_eq!(st["taskResult"], "cleanSuccess", "{st}");
        assert!(
            st["message"]
                .as_str()
                .unwrap()
                .contains(&format!("volume {top2} is locked by host {host}")),
            "{st}"
        );
        call(&c.nodes[1], "Task.clear", json!({ "taskID": t })).await;
        assert_eq!(dom.chain(img).unwrap().ids(), vec![base, top2], "nothing merged");
        assert_eq!(dom.read_meta(img, base).unwrap().legality, Legality::Legal);
        let del = json!({ "sdUUID": sd, "spUUID": pool, "imgUUID": img, "volUUID": top2 });
        let e = rpc_err(c.nodes[1].client.call("Volume.delete", del).await);
        assert!(e.message.contains(&format!("held by host {host}")), "{e:?}");
        let mv = json!({ "spUUID": pool, "srcDomUUID": sd, "dstDomUUID": sd, "imgUUID": img, "op": "move" });
        let e = rpc_err(c.nodes[1].client.call("Image.move", mv).await);
        assert!(e.message.contains("so it is not moved"), "{e:?}");
        call(&c.nodes[holder], "Volume.releaseLease", lref.clone()).await;
    }
    // Image.cloneStructure (the first step of a live storage migration) makes the chain on
    // another domain, empty and ILLEGAL until its data is synced.
    let sd2 = SdUuid::new_random();
    call(
        &c.nodes[1],
        "StorageDomain.create",
        json!({ "sdUUID": sd2, "connectionID": "shared", "description": "data2", "storageType": "localfs" }),
    )
    .await;
    let t = call(
        &c.nodes[1],
        "Image.cloneStructure",
        json!({ "spUUID": pool, "sdUUID": sd, "imgUUID": img, "dstSdUUID": sd2 }),
    )
    .await;
    let st = wait_task(&c.nodes[1], t.as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(st["taskResult"], "success", "{st}");
    call(&c.nodes[1], "Task.clear", json!({ "taskID": t })).await;
    let dom2 = FileStorageDomain::open(&c.shared().join(sd2.to_string())).unwrap();
    let cloned = dom2.chain(img).unwrap();
    assert_eq!(cloned.ids(), vec![base, top2]);
    assert!(
        cloned
            .volumes
            .iter()
            .all(|v| v.meta.legality == Legality::Illegal),
        "{cloned:?}"
    );
    assert_eq!(
        dom.chain(img).unwrap().ids(),
        vec![base, top2],
        "the source is untouched"
    );
    // Only the SPM clones.
    let e = rpc_err(
        c.nodes[2]
            .client
            .call(
                "Image.cloneStructure",
                json!({ "spUUID": pool, "sdUUID": sd, "imgUUID": img, "dstSdUUID": sd2 }),
            )
            .await,
    );
    assert_eq!(e.code, 654, "{e:?}");

    // Released: the merge runs, holding the leases it changes meanwhile, and gives them back.
    let t = call(&c.nodes[1], "Image.mergeSnapshots", merge).await;
    let st = wait_task(&c.nodes[1], t.as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(st["taskResult"], "success", "{st}");
    // The REST view lists the pool's tasks, on an HSM node too (read from the journal).
    let (status, body) = c.nodes[2]
        .client
        .request(
            http::Method::GET,
            "/api/tasks",
            "application/json",
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(status, http::StatusCode::OK);
    let listed: Value = serde_json::from_slice(&body).unwrap();
    let rest = &listed["allTasksStatus"][t.as_str().unwrap()];
    assert_eq!(
        (rest["verb"].as_str(), rest["taskResult"].as_str()),
        (Some("mergeSnapshots"), Some("success")),
        "{listed}"
    );
    call(&c.nodes[1], "Task.clear", json!({ "taskID": t })).await;
    assert_eq!(dom.chain(img).unwrap().ids(), vec![base]);
    let bref = json!({ "sdUUID": sd, "imgUUID": img, "volUUID": base });
    assert_eq!(
        call(&c.nodes[2], "Volume.getLeaseStatus", bref).await["owner"],
        Value::Null
    );

    // spmStop gives the role up; the pool metadata says no SPM, the lver stays.
    call(&c.nodes[1], "StoragePool.spmStop", json!({ "spUUID": pool })).await;
    let st = call(&c.nodes[2], "StoragePool.getSpmStatus", json!({ "spUUID": pool })).await;
    assert_eq!(st["spm_st"]["spmId"], -1, "{st}");
    assert_eq!(st["metadata"]["spmId"], -1);
    assert_eq!(st["metadata"]["lver"], lver2);
    // Host 3 takes over at once (the lease was released, nothing to wait for).
    let t0 = Instant::now();
    let t = call(
        &c.nodes[2],
        "StoragePool.spmStart",
        json!({ "spUUID": pool, "prevID": -1, "prevLver": -1 }),
    )
    .await;
    let st = wait_task(&c.nodes[2], t.as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(st["taskResult"], "success", "{st}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "clean handover took {:?}",
        t0.elapsed()
    );
    let (img2, vol2) = (ImgUuid::new_random(), VolUuid::new_random());
    let st = create_volume(&c.nodes[2], &c, img2, vol2, None).await;
    assert_eq!(st["taskResult"], "success", "{st}");
    let report = c.domain().check(true).unwrap();
    assert!(report.is_clean(), "{report:?}");

    // Host 2 disconnects from the pool: its host id is free on storage at once (host 3's is
    // held), and pool verbs there say it is not connected.
    let ids = c.domain().root().join("dom_md/ids");
    let delta = |h: u64| oxvirt_lease::direct::read_delta_leader(&ids, 0, &sd.to_string(), h).unwrap();
    assert!(!delta(2).is_free(), "host 2 holds its host id while connected");
    call(&c.nodes[1], "StoragePool.disconnect", json!({ "spUUID": pool })).await;
    assert!(delta(2).is_free(), "{:?}", delta(2));
    assert!(!delta(3).is_free());
    let e = rpc_err(
        c.nodes[1]
            .client
            .call("StoragePool.getSpmStatus", json!({ "spUUID": pool }))
            .await,
    );
    assert!(e.message.contains("not connected"), "{e:?}");
}

/// Waits for the next event on `topic` whose body satisfies `pred`.
async fn wait_event(
    events: &mut tokio::sync::mpsc::Receiver<Value>,
    topic: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no {topic} event within {limit:?}"))
            .expect("event stream ended");
        if ev["method"] == topic && pred(&ev["params"]["body"]) {
            return ev["params"]["body"].clone();
        }
    }
}

/// The node's domain monitor checks each pool domain every io_timeout (1 s here) and reports
/// it (`Host.getStorageRepoStats`); a domain going bad or good, and the SPM role changing, reach
/// event subscribers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_monitor_and_spm_changes_are_published() {
    let c = cluster(None).await;
    let (pool, sd) = (c.pool, c.sd);
    let mut events = c.nodes[0].client.events().await.unwrap();
    let spm_topic = format!("|storage|spm_status|{pool}");
    let dm_topic = format!("|storage|domain_monitor|{sd}");

    let t = call(
        &c.nodes[0],
        "StoragePool.spmStart",
        json!({ "spUUID": pool, "prevID": -1, "prevLver": -1 }),
    )
    .await;
    wait_event(&mut events, &spm_topic, Duration::from_secs(30), |b| {
        b["spmStatus"] == "SPM" && b["hostID"] == 1
    })
    .await;
    wait_task(&c.nodes[0], t.as_str().unwrap(), Duration::from_secs(30)).await;

    // Every node monitors the domain: valid, host id held.
    let repo = async |n: &Node| call(n, "Host.getStorageRepoStats", json!({})).await[sd.to_string()].clone();
    let start = Instant::now();
    for n in &c.nodes {
        loop {
            let st = repo(n).await;
            if st["valid"] == true && st["acquired"] == true {
                assert_eq!(st["code"], 0, "{st}");
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{st}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Metadata that no longer matches its checksum: the domain is invalid for everyone.
    let md = c.shared().join(sd.to_string()).join("dom_md/metadata");
    let good = std::fs::read_to_string(&md).unwrap();
    assert!(good.contains("DESCRIPTION=data\n"), "{good}");
    let broken = Instant::now();
    std::fs::write(&md, good.replace("DESCRIPTION=data\n", "DESCRIPTION=dbta\n")).unwrap();
    let bad = wait_event(&mut events, &dm_topic, Duration::from_secs(10), |b| {
        b["valid"] == false
    })
    .await;
    let noticed = broken.elapsed();
    assert!(bad["error"].as_str().is_some_and(|e| !e.is_empty()), "{bad}");
    assert_eq!(bad["acquired"], true, "{bad}");
    let st = repo(&c.nodes[2]).await;
    let start = Instant::now();
    let mut st = st;
    while st["valid"] != false {
        assert!(start.elapsed() < Duration::from_secs(10), "{st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        st = repo(&c.nodes[2]).await;
    }
    assert_ne!(st["code"], 0, "{st}");
    eprintln!("domain monitor: a broken domain reported after {noticed:?} (interval 1 s)");
    assert!(noticed < Duration::from_secs(5), "{noticed:?}");

    std::fs::write(&md, &good).unwrap();
    wait_event(&mut events, &dm_topic, Duration::from_secs(10), |b| {
        b["valid"] == true
    })
    .await;

    call(&c.nodes[0], "StoragePool.spmStop", json!({ "spUUID": pool })).await;
    wait_event(&mut events, &spm_topic, Duration::from_secs(10), |b| {
        b["spmStatus"] == "Free"
    })
    .await;
}
