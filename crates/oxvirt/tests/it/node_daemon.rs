//! `oxvirt node` as a real process on loopback: enrollment with the engine's CA, the API over
//! mutual TLS (JSON-RPC, XML-RPC, REST view, events), refusals, and restarts.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{engine_client, files_under, free_port, spawn_node, start_engine, wait_up};
use http::{Method, StatusCode};
use oxvirt_pki::{client_config, CertAuthority, Identity, Role};
use oxvirt_rpc::{xmlrpc, RpcClient};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_enrolls_with_a_token_and_serves_all_transports_over_mutual_tls() {
    let engine = start_engine().await;
    let data = tempfile::tempdir().unwrap();
    let token = engine.enrollment.issue_token(Duration::from_secs(300));
    let addr = free_port();
    let mut node = spawn_node(
        "host-a",
        data.path(),
        addr,
        &["--engine", &engine.addr.to_string(), "--token", &token],
    );
    let c = engine_client(&engine, addr);
    let ping = wait_up(&c, &mut node).await;
    assert_eq!(ping["name"], "host-a");
    assert_eq!(*engine.enrolled.lock().unwrap(), vec!["host-a".to_string()]);

    // Key stored 0600, certificate issued by the engine's CA for this host.
    let key_mode = std::fs::metadata(data.path().join("pki/key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    let id = Identity::load(&data.path().join("pki")).unwrap().unwrap();
    assert_eq!(
        id.subject().unwrap(),
        oxvirt_pki::PeerIdentity {
            role: Role::Node,
            name: "host-a".into()
        }
    );
    assert_eq!(id.ca_pem, engine.identity.ca_pem);

    // JSON-RPC.
    let caps = c.call("Host.getCapabilities", json!({})).await.unwrap();
    assert!(
        caps["qemuVersion"]
            .as_str()
            .unwrap()
            .starts_with(char::is_numeric),
        "{caps}"
    );
    assert!(caps["cpuCores"].as_u64().unwrap() >= 1);
    let stats = c.call("Host.getStats", json!({})).await.unwrap();
    assert!(stats["memTotalMib"].as_u64().unwrap() > 0);
    let err = c.call("Host.getStats", json!({"bogus": 1})).await.unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
    let err = c.call("No.suchVerb", json!({})).await.unwrap_err();
    assert!(err.to_string().contains("No.suchVerb"), "{err}");

    // XML-RPC, same dispatcher.
    let body = xmlrpc::call("Host.ping", &[json!({})]);
    let (status, reply) = c
        .request(Method::POST, "/RPC2", "text/xml", Bytes::from(body))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(xmlrpc::parse_response(&reply).unwrap().unwrap()["name"], "host-a");
    let (_, reply) = c
        .request(
            Method::POST,
            "/RPC2",
            "text/xml",
            Bytes::from(xmlrpc::call("Nope", &[])),
        )
        .await
        .unwrap();
    assert!(xmlrpc::parse_response(&reply).unwrap().is_err());

    // REST view, same authentication.
    let (status, reply) = c
        .request(Method::GET, "/api/host", "application/json", Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(v["name"], "host-a");
    assert!(v["capabilities"]["memTotalMib"].as_u64().unwrap() > 0);
    let (status, _) = c
        .request(Method::GET, "/api/nothing", "application/json", Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The other resources answer too: no VMs, domains, jobs or pool tasks yet.
    for (path, want) in [
        ("/api/vms", json!([])),
        ("/api/storagedomains", json!([])),
        ("/api/jobs", json!([])),
        ("/api/tasks", json!({ "allTasksStatus": {} })),
    ] {
        let (status, reply) = c
            .request(Method::GET, path, "application/json", Bytes::new())
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{path}");
        let v: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(v, want, "{path}");
    }

    // The event stream opens.
    let _events = c.events().await.unwrap();

    // Refusals leave no trace.
    let before = files_under(data.path());
    let anon = RpcClient::new(
        addr,
        "127.0.0.1",
        client_config(&engine.identity.ca_pem, None).unwrap(),
    )
    .unwrap();
    assert!(
        anon.call("Host.ping", json!({})).await.is_err(),
        "no client certificate must be refused"
    );
    let other = CertAuthority::generate("rogue CA").unwrap();
    let rogue = other.issue(Role::Engine, "engine", &[]).unwrap();
    let mut roots = engine.identity.ca_pem.clone();
    roots.push_str(&other.cert_pem());
    let rogue_client =
        RpcClient::new(addr, "127.0.0.1", client_config(&roots, Some(&rogue)).unwrap()).unwrap();
    assert!(
        rogue_client.call("Host.ping", json!({})).await.is_err(),
        "another CA's certificate must be refused"
    );
    let (status, reply) = c
        .request(
            Method::POST,
            "/jsonrpc",
            "application/json",
            Bytes::from_static(b"{\"jsonrpc\":"),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&reply).unwrap()["error"]["code"],
        -32700
    );
    // The node answers 413 as soon as it sees the declared length; a client still writing the
    // body may see the connection close instead. Either way the request is refused.
    match c
        .request(
            Method::POST,
            "/jsonrpc",
            "application/json",
            Bytes::from(vec![b'x'; 2 << 20]),
        )
        .await
    {
        Ok((status, _)) => assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE),
        Err(oxvirt_rpc::ClientError::Http { .. }) => {}
        Err(e) => panic!("oversized request: unexpected error {e}"),
    }
    assert_eq!(
        files_under(data.path()),
        before,
        "bad requests must not change the node's files"
    );
    // A new client: the oversized request may have left `c`'s pooled connection closed by
    // the node (by design), which is the client's state, not the node's.
    let r = engine_client(&engine, addr).call("Host.ping", json!({})).await;
    assert!(r.is_ok(), "node still serves after bad requests: {r:?}");

    // Graceful stop (SIGTERM), then a restart without any enrollment flags reuses the identity.
    let pid = node.child.id() as i32;
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let st = node.child.wait().unwrap();
    assert!(st.success(), "SIGTERM exits cleanly, got {st}");
    let mut node = spawn_node("host-a", data.path(), addr, &[]);
    let c = engine_client(&engine, addr);
    wait_up(&c, &mut node).await;
    assert_eq!(
        engine.enrolled.lock().unwrap().len(),
        1,
        "a restarted node does not enroll again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_token_is_refused_and_a_fingerprint_enrollment_waits_for_approval() {
    let engine = start_engine().await;
    let token = engine.enrollment.issue_token(Duration::from_secs(300));
    let d1 = tempfile::tempdir().unwrap();
    let a1 = free_port();
    let mut n1 = spawn_node(
        "host-b",
        d1.path(),
        a1,
        &["--engine", &engine.addr.to_string(), "--token", &token],
    );
    wait_up(&engine_client(&engine, a1), &mut n1).await;

    // The same token again: the second node exits with an error and has no identity.
    let d2 = tempfile::tempdir().unwrap();
    let mut n2 = spawn_node(
        "host-c",
        d2.path(),
        free_port(),
        &["--engine", &engine.addr.to_string(), "--token", &token],
    );
    let st = n2.child.wait().unwrap();
    let err = std::fs::read_to_string(&n2.log).unwrap();
    assert!(!st.success());
    assert!(err.contains("403") || err.contains("token"), "{err}");
    assert!(Identity::load(&d2.path().join("pki")).unwrap().is_none());

    // A wrong fingerprint is refused before anything is sent.
    let d3 = tempfile::tempdir().unwrap();
    let mut n3 = spawn_node(
        "host-d",
        d3.path(),
        free_port(),
        &["--engine", &engine.addr.to_string(), "--ca-fingerprint", "00:11"],
    );
    assert!(!n3.child.wait().unwrap().success());
    assert!(engine.enrollment.pending().is_empty());

    // The right fingerprint: pending until approved, then serving.
    let fp = engine.enrollment.ca().fingerprint();
    let d4 = tempfile::tempdir().unwrap();
    let a4 = free_port();
    let mut n4 = spawn_node(
        "host-e",
        d4.path(),
        a4,
        &["--engine", &engine.addr.to_string(), "--ca-fingerprint", &fp],
    );
    let start = Instant::now();
    while engine.enrollment.pending().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "enrollment request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(n4.child.try_wait().unwrap().is_none(), "node waits while pending");
    engine.enrollment.approve("host-e").unwrap();
    let ping = wait_up(&engine_client(&engine, a4), &mut n4).await;
    assert_eq!(ping["name"], "host-e");
}

/// Storage and VM verbs through a real `oxvirt node`: connect a directory as storage, create a
/// domain, boot the test guest from a volume in it (drives named by ids), watch status events,
/// read stats, destroy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_creates_a_domain_and_runs_a_vm_from_it() {
    let guest = oxvirt_testkit::TestGuest::get();
    let engine = start_engine().await;
    let data = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let token = engine.enrollment.issue_token(Duration::from_secs(300));
    let addr = free_port();
    let mut node = spawn_node(
        "host-vm",
        data.path(),
        addr,
        &[
            "--engine",
            &engine.addr.to_string(),
            "--token",
            &token,
            "--accel",
            "tcg",
        ],
    );
    let c = engine_client(&engine, addr);
    wait_up(&c, &mut node).await;
    let mut events = c.events().await.unwrap();

    let r = c
        .call(
            "StoragePool.connectStorageServer",
            json!({ "connectionParams": [{ "id": "c1", "kind": "localfs", "path": shared.path() }] }),
        )
        .await
        .unwrap();
    assert_eq!(r["statuslist"][0]["status"], 0, "{r}");
    let bad = c
        .call(
            "StoragePool.connectStorageServer",
            json!({ "connectionParams": [{ "id": "c2", "kind": "localfs", "path": "/no/such/dir" }] }),
        )
        .await
        .unwrap();
    assert_ne!(bad["statuslist"][0]["status"], 0);

    let sd = oxvirt_types::SdUuid::new_random();
    c.call(
        "StorageDomain.create",
        json!({ "sdUUID": sd, "connectionID": "c1", "description": "data1", "storageType": "localfs" }),
    )
    .await
    .unwrap();
    let err = c
        .call(
            "StorageDomain.create",
            json!({ "sdUUID": sd, "connectionID": "c1", "description": "again", "storageType": "localfs" }),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("exists"), "{err}");
    let info = c
        .call("StorageDomain.getInfo", json!({ "sdUUID": sd }))
        .await
        .unwrap();
    assert_eq!(info["name"], "data1");
    assert_eq!(info["version"], 5);
    let stats = c
        .call("StorageDomain.getStats", json!({ "sdUUID": sd }))
        .await
        .unwrap();
    assert_eq!(stats["valid"], true, "{stats}");
    assert!(stats["diskFree"].as_u64().unwrap() > 0);
    let missing = oxvirt_types::SdUuid::new_random();
    let err = c
        .call("StorageDomain.getInfo", json!({ "sdUUID": missing }))
        .await
        .unwrap_err();
    assert!(
        matches!(err, oxvirt_rpc::ClientError::Rpc(ref e) if e.code == 358),
        "{err}"
    );
    let err = c
        .call("StorageDomain.getInfo", json!({ "sdUUID": "../../etc" }))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("storage domain id"), "{err}");

    // A volume in the domain (the SPM verbs that create volumes arrive with the pool).
    let dom = oxvirt_storage::FileStorageDomain::find(shared.path(), sd).unwrap();
    let (img, vol) = (
        oxvirt_types::ImgUuid::new_random(),
        oxvirt_types::VolUuid::new_random(),
    );
    dom.create_volume(
        img,
        vol,
        &oxvirt_storage::VolumeSpec::new(
            64 << 20,
            oxvirt_storage::VolFormat::Cow,
            oxvirt_storage::Allocation::Sparse,
        ),
    )
    .unwrap();

    let vm = oxvirt_types::VmId::new_random();
    let append = oxvirt_testkit::TestGuest::append(&["oxvirt.write_mib=2", "oxvirt.marker=api-vm"]);
    let created = c
        .call(
            "VM.create",
            json!({
                "vmID": vm, "vmName": "apivm", "smp": 1, "memSize": 256,
                "boot": { "kernel": guest.kernel, "initrd": guest.initrd, "cmdline": append },
                "drives": [{ "domainID": sd, "imageID": img }],
            }),
        )
        .await
        .unwrap();
    assert_eq!(created["id"], json!(vm));
    let console = data
        .path()
        .join("run/vms")
        .join(vm.to_string())
        .join("serial.log");
    oxvirt_testkit::wait_for_text(&console, "OXVIRT-MARKER api-vm", Duration::from_secs(60)).unwrap();

    let err = c
        .call(
            "VM.create",
            json!({ "vmID": vm, "vmName": "dup", "memSize": 128 }),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, oxvirt_rpc::ClientError::Rpc(ref e) if e.code == 4),
        "{err}"
    );
    let stats = c.call("VM.getStats", json!({ "vmID": vm })).await.unwrap();
    assert!(
        stats["rssBytes"]
            .as_u64()
            .unwrap_or(stats["rss_bytes"].as_u64().unwrap_or(0))
            > 0,
        "{stats}"
    );
    let all = c.call("Host.getAllVmStats", json!({})).await.unwrap();
    assert_eq!(all[0]["vmID"], json!(vm));

    c.call("VM.destroy", json!({ "vmID": vm })).await.unwrap();
    // Status events arrive for the VM: up, then down.
    let mut seen = Vec::new();
    let start = Instant::now();
    while !seen
        .iter()
        .any(|s: &Value| s.to_string().contains("down") || s.to_string().contains("Down"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no down event; saw {seen:?}"
        );
        if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            if ev["method"].as_str().is_some_and(|m| m.contains("VM_status")) {
                seen.push(ev["params"]["body"]["status"].clone());
            }
        }
    }
    assert!(seen.len() >= 2, "expected at least up and down: {seen:?}");
    let err = c
        .call("VM.getStats", json!({ "vmID": oxvirt_types::VmId::new_random() }))
        .await
        .unwrap_err();
    assert!(
        matches!(err, oxvirt_rpc::ClientError::Rpc(ref e) if e.code == 1),
        "{err}"
    );
}
