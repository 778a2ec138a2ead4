//! Networks end to end: two `oxvirt node` processes, each managing the host network of a
//! network namespace of its own (`--netns`), cabled to each other by a veth pair. Both get a VM
//! network through `Host.setupNetworks`; a change the engine never confirms is rolled back by
//! the node; guests on the two nodes ping each other over the network; link down cuts them
//! off and link up restores them; a NIC is hot plugged and unplugged; a migration keeps the
//! NIC working and a destination without the network refuses the VM.
//!
//! Only namespaces made by the test hold addresses; the nodes' APIs are on loopback in the
//! test's own namespace. Namespaces and QEMU processes are removed even when the test fails.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{engine_client, free_port, spawn_node, start_engine, wait_up, Engine, NodeProc, QemuReaper};
use oxvirt_rpc::RpcClient;
use oxvirt_testkit::netns::TestNs;
use oxvirt_testkit::TestGuest;
use oxvirt_types::VmId;
use serde_json::{json, Value};

struct Host {
    ns: TestNs,
    data: tempfile::TempDir,
    _proc: NodeProc,
    c: RpcClient,
}

async fn start_host(engine: &Engine, ns: TestNs, name: &str, migration_ip: &str) -> Host {
    let data = tempfile::tempdir().unwrap();
    let token = engine.enrollment.issue_token(Duration::from_secs(300));
    let addr = free_port();
    let mut proc = spawn_node(
        name,
        data.path(),
        addr,
        &[
            "--engine",
            &engine.addr.to_string(),
            "--token",
            &token,
            "--accel",
            "tcg",
            "--netns",
            &ns.name,
            "--migration-host",
            migration_ip,
        ],
    );
    let c = engine_client(engine, addr);
    wait_up(&c, &mut proc).await;
    Host {
        ns,
        data,
        _proc: proc,
        c,
    }
}

impl Host {
    fn console(&self, vm: VmId) -> PathBuf {
        self.data
            .path()
            .join("run/vms")
            .join(vm.to_string())
            .join("serial.log")
    }

    /// `ip -o link show` inside the host's namespace.
    fn links(&self) -> String {
        self.ns.exec(&["ip", "-o", "link", "show"])
    }
}

fn vm_params(vm: VmId, name: &str, guest: &TestGuest, script: &str, nics: Value) -> Value {
    let append = TestGuest::append(&[&TestGuest::run_arg(script)]);
    json!({
        "vmID": vm, "vmName": name, "smp": 1, "memSize": 192, "vnc": false, "balloon": false,
        "boot": { "kernel": guest.kernel, "initrd": guest.initrd, "cmdline": append },
        "nics": nics,
    })
}

/// Occurrences of `needle` in the console after byte `from`.
fn count_after(path: &Path, from: usize, needle: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.get(from..).unwrap_or("").matches(needle).count()
}

fn console_len(path: &Path) -> usize {
    std::fs::metadata(path).map_or(0, |m| m.len() as usize)
}

async fn wait_console(path: &Path, from: usize, needle: &str, n: usize, timeout: Duration) {
    let start = Instant::now();
    while count_after(path, from, needle) < n {
        assert!(
            start.elapsed() < timeout,
            "{n}× {needle:?} did not appear in {} within {timeout:?}; it holds:\n{}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_status(c: &RpcClient, vm: VmId, want: &str, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        if let Ok(info) = c.call("VM.getInfo", json!({ "vmID": vm })).await {
            if info["status"]["state"] == want {
                return info;
            }
        }
        assert!(
            start.elapsed() < timeout,
            "VM {vm} is not {want} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn code(e: &oxvirt_rpc::ClientError) -> i64 {
    match e {
        oxvirt_rpc::ClientError::Rpc(r) => r.code,
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_on_two_nodes_talk_over_a_vm_network() {
    let guest = TestGuest::get();
    let engine = start_engine().await;
    let (nsa, nsb) = (TestNs::new("na"), TestNs::new("nb"));
    // The VM network's cable between the two hosts, and the migration network's.
    nsa.cable("eth1", &nsb, "eth1");
    nsa.cable("mig0", &nsb, "mig0");
    nsa.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", "mig0"]);
    nsb.exec(&["ip", "addr", "add", "10.77.0.2/24", "dev", "mig0"]);
    let a = start_host(&engine, nsa, "net-a", "10.77.0.1").await;
    let b = start_host(&engine, nsb, "net-b", "10.77.0.2").await;
    let _reaper = QemuReaper(vec![a.data.path().join("run"), b.data.path().join("run")]);

    // The VM network on both hosts, confirmed.
    for h in [&a, &b] {
        let r = h
            .c
            .call(
                "Host.setupNetworks",
                json!({ "networks": { "vmnet": { "nic": "eth1" } }, "options": { "connectivityTimeout": 60 } }),
            )
            .await
            .unwrap();
        assert_eq!(r["status"], "pending", "{r}");
        let ok = h.c.call("Host.setSafeNetworkConfig", json!({})).await.unwrap();
        assert_eq!(ok["confirmed"], true);
        let caps = h.c.call("Host.getCapabilities", json!({})).await.unwrap();
        assert_eq!(caps["networks"]["vmnet"]["present"], true, "{caps}");
        assert_eq!(caps["bridges"]["vmnet"]["ports"], json!(["eth1"]), "{caps}");
        assert!(
            caps["nics"]["mig0"]["ipv4addrs"].as_array().unwrap().len() == 1,
            "{caps}"
        );
    }

    // A change the engine never confirms is undone by the node.
    let mut events = a.c.events().await.unwrap();
    let r =
        a.c.call(
            "Host.setupNetworks",
            json!({ "networks": {
                        "vmnet": { "nic": "eth1", "mtu": 1400 },
                        "lab": { "nic": "mig0", "ipaddr": "10.88.0.1", "prefix": 24 } },
                    "options": { "connectivityTimeout": 2 } }),
        )
        .await
        .unwrap();
    assert_eq!(r["rollbackInSecs"], 2, "{r}");
    assert!(a.links().contains("lab:"), "applied: {}", a.links());
    let err = a.c.call("Host.setupNetworks", json!({})).await.unwrap_err();
    assert_eq!(code(&err), 2002, "{err}");
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(30), "no rollback event");
        if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            if ev.to_string().contains("|net|rollback|") {
                assert_eq!(ev["params"]["body"]["errors"], json!([]), "{ev}");
                break;
            }
        }
    }
    let caps = a.c.call("Host.getCapabilities", json!({})).await.unwrap();
    assert!(caps["networks"].get("lab").is_none(), "{caps}");
    assert_eq!(caps["bridges"]["vmnet"]["mtu"], 1500, "{caps}");
    assert_eq!(
        caps["nics"]["mig0"]["ipv4addrs"],
        json!(["10.77.0.1/24"]),
        "{caps}"
    );
    assert_eq!(caps["nics"]["mig0"]["master"], Value::Null, "{caps}");
    assert!(!a.links().contains("lab:"));

    // Two guests, one per host, on the VM network. The second pings the first every second.
    let (vm1, vm2) = (VmId::new_random(), VmId::new_random());
    let serve = "ip addr add 10.50.0.1/24 dev eth0; ip link set eth0 up; echo OXVIRT-NET up";
    let pinger = "ip addr add 10.50.0.2/24 dev eth0; ip link set eth0 up; echo OXVIRT-NET up
(while true; do
  if ping -c 1 -W 1 10.50.0.1 >/dev/null 2>&1; then echo OXVIRT-PING ok; else echo OXVIRT-PING fail; fi
  if [ -e /sys/class/net/eth1 ]; then echo OXVIRT-NIC eth1 present; else echo OXVIRT-NIC eth1 absent; fi
  sleep 1
done) &";
    let nic1 = json!([{ "mac": "56:6f:00:00:11:01", "network": "vmnet" }]);
    a.c.call("VM.create", vm_params(vm1, "pong", &guest, serve, nic1.clone()))
        .await
        .unwrap();
    b.c.call(
        "VM.create",
        vm_params(
            vm2,
            "ping",
            &guest,
            pinger,
            json!([{ "mac": "56:6f:00:00:11:02", "network": "vmnet" }]),
        ),
    )
    .await
    .unwrap();
    let info1 = a.c.call("VM.getInfo", json!({ "vmID": vm1 })).await.unwrap();
    let tap1 = info1["nics"][0]["backend"]["network"]["tap"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        a.links()
            .lines()
            .any(|l| l.contains(&format!("{tap1}:")) && l.contains("master vmnet")),
        "the tap is on the bridge: {}",
        a.links()
    );
    let (con1, con2) = (a.console(vm1), b.console(vm2));
    wait_console(&con1, 0, "OXVIRT-NET up", 1, Duration::from_secs(90)).await;
    wait_console(&con2, 0, "OXVIRT-PING ok", 2, Duration::from_secs(90)).await;

    // Link down on the first guest's NIC cuts it off; link up brings it back.
    let mark = console_len(&con2);
    a.c.call(
        "VM.setLinkState",
        json!({ "vmID": vm1, "mac": "56:6f:00:00:11:01", "linkActive": false }),
    )
    .await
    .unwrap();
    wait_console(&con2, mark, "OXVIRT-PING fail", 2, Duration::from_secs(30)).await;
    let mark = console_len(&con2);
    a.c.call(
        "VM.updateDevice",
        json!({ "vmID": vm1, "params": { "deviceType": "interface", "macAddr": "56:6f:00:00:11:01", "linkActive": true } }),
    )
    .await
    .unwrap();
    wait_console(&con2, mark, "OXVIRT-PING ok", 2, Duration::from_secs(30)).await;

    // Hot plug a second NIC into the pinging guest, then unplug it.
    let mark = console_len(&con2);
    let info =
        b.c.call(
            "VM.hotplugNic",
            json!({ "vmID": vm2, "nic": { "mac": "56:6f:00:00:11:03", "network": "vmnet" } }),
        )
        .await
        .unwrap();
    assert_eq!(info["nics"][1]["slot"], 1, "{info}");
    let tap3 = info["nics"][1]["backend"]["network"]["tap"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(b.links().contains(&format!("{tap3}:")));
    wait_console(&con2, mark, "OXVIRT-NIC eth1 present", 1, Duration::from_secs(30)).await;
    let err =
        b.c.call(
            "VM.hotplugNic",
            json!({ "vmID": vm2, "nic": { "mac": "56:6f:00:00:11:03", "network": "vmnet" } }),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("two NICs"), "{err}");
    let mark = console_len(&con2);
    let info =
        b.c.call(
            "VM.hotunplugNic",
            json!({ "vmID": vm2, "mac": "56:6f:00:00:11:03" }),
        )
        .await
        .unwrap();
    assert_eq!(info["nics"].as_array().unwrap().len(), 1, "{info}");
    assert!(!b.links().contains(&format!("{tap3}:")), "the tap is gone");
    wait_console(&con2, mark, "OXVIRT-NIC eth1 absent", 1, Duration::from_secs(30)).await;

    // A destination without the VM's network refuses it and keeps nothing.
    let stray = VmId::new_random();
    let err =
        b.c.call(
            "VM.migrationCreate",
            vm_params(
                stray,
                "stray",
                &guest,
                serve,
                json!([{ "mac": "56:6f:00:00:11:09", "network": "nonet" }]),
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), 27, "{err}");
    assert!(err.to_string().contains("nonet"), "{err}");
    assert!(b.c.call("VM.getInfo", json!({ "vmID": stray })).await.is_err());

    // Migrate the first guest to the second host: it keeps answering over the network.
    let mut params = vm_params(vm1, "pong", &guest, serve, json!([]));
    params["nics"] = json!(info1["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| json!({ "mac": n["mac"], "network": "vmnet", "slot": n["slot"] }))
        .collect::<Vec<_>>());
    let incoming = b.c.call("VM.migrationCreate", params).await.unwrap();
    let uri = incoming["uri"].as_str().unwrap().to_string();
    assert!(uri.contains("10.77.0.2"), "{uri}");
    a.c.call("VM.migrate", json!({ "vmID": vm1, "dstUri": uri }))
        .await
        .unwrap();
    wait_status(&b.c, vm1, "up", Duration::from_secs(120)).await;
    wait_status(&a.c, vm1, "down", Duration::from_secs(60)).await;
    a.c.call("VM.destroy", json!({ "vmID": vm1 })).await.unwrap();
    assert!(
        !a.links().contains(&format!("{tap1}:")),
        "the source's tap is gone"
    );
    assert!(
        b.links().contains(&format!("{tap1}:")),
        "the destination has its own tap"
    );
    let mark = console_len(&con2);
    wait_console(&con2, mark, "OXVIRT-PING ok", 2, Duration::from_secs(60)).await;

    for vm in [vm1, vm2] {
        b.c.call("VM.destroy", json!({ "vmID": vm })).await.unwrap();
    }
    assert!(!b.links().contains(&format!("{tap1}:")));
}
