//! `setupNetworks` on real kernel links in a network namespace of its own per test: bridges,
//! MTUs, addresses, the default route, taps; the rollback countdown on a simulated clock; the
//! errors for kernels without VLAN or bonding support; refused requests change nothing.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxvirt_lease::SimClock;
use oxvirt_node::net::model::{HostNet, SetupNetworks};
use oxvirt_node::net::{NetConfig, NetError, NetworkService};
use serde_json::json;

use oxvirt_testkit::netns::{ip, DhcpServer, TestNs};

async fn open(ns: &TestNs, dir: &Path, clock: &SimClock) -> Arc<NetworkService> {
    NetworkService::open(NetConfig {
        state_dir: dir.to_path_buf(),
        netns: Some(ns.name.clone()),
        clock: Arc::new(clock.clone()),
        events: None,
    })
    .await
    .unwrap()
}

fn req(v: serde_json::Value) -> SetupNetworks {
    serde_json::from_value(v).unwrap()
}

/// Links as the kernel shows them, without counters (which move on their own).
async fn links(svc: &NetworkService) -> HostNet {
    let mut h = svc.observe().await.unwrap();
    for l in h.links.values_mut() {
        l.stats = Default::default();
        l.carrier = false;
    }
    h
}

async fn wait_rolled_back(svc: &NetworkService, n: usize) {
    let start = Instant::now();
    while svc.rollbacks().len() < n {
        assert!(start.elapsed() < Duration::from_secs(20), "no rollback happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_unconfirmed_change_is_rolled_back_when_the_deadline_passes() {
    let ns = TestNs::new("rb");
    ns.veth("eth1", "peer1");
    ns.exec(&["ip", "addr", "add", "192.168.50.2/24", "dev", "eth1"]);
    ns.exec(&["ip", "route", "add", "default", "via", "192.168.50.1"]);
    let dir = tempfile::tempdir().unwrap();
    let clock = SimClock::new(Duration::from_secs(1000));
    let svc = open(&ns, dir.path(), &clock).await;
    let before = links(&svc).await;
    // The management address moves from the NIC to a bridge over it, with a bigger MTU.
    let report = svc
        .setup_networks(req(json!({
            "networks": {"mgmt": {"nic": "eth1", "mtu": 9000, "ipaddr": "192.168.50.2", "prefix": 24,
                                  "gateway": "192.168.50.1", "defaultRoute": true}},
            "options": {"connectivityTimeout": 120}
        })))
        .await
        .unwrap();
    assert_eq!(report.status, "pending");
    let after = links(&svc).await;
    let br = &after.links["mgmt"];
    assert_eq!(br.kind.as_deref(), Some("bridge"));
    assert_eq!(br.mtu, 9000);
    assert_eq!(br.ipv4, vec!["192.168.50.2/24".parse().unwrap()]);
    assert_eq!(after.links["eth1"].master.as_deref(), Some("mgmt"));
    assert!(after.links["eth1"].ipv4.is_empty());
    assert_eq!(after.default_route.as_ref().unwrap().dev, "mgmt");
    assert!(dir.path().join("pending.json").exists());
    // Another change waits for this one.
    let e = svc.setup_networks(req(json!({}))).await.unwrap_err();
    assert!(matches!(e, NetError::Pending { .. }), "{e}");
    clock.advance(Duration::from_secs(119));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(svc.rollbacks().is_empty(), "rolled back before the deadline");
    assert!(links(&svc).await.links.contains_key("mgmt"));
    clock.advance(Duration::from_secs(2));
    wait_rolled_back(&svc, 1).await;
    assert!(svc.rollbacks()[0].errors.is_empty(), "{:?}", svc.rollbacks());
    assert_eq!(links(&svc).await, before, "the host is as before the change");
    assert!(svc.running().await.networks.is_empty());
    assert!(!dir.path().join("pending.json").exists());
}

#[tokio::test]
async fn a_confirmed_change_stays_and_a_later_removal_restores_the_nic() {
    let ns = TestNs::new("ok");
    ns.veth("eth1", "peer1");
    let dir = tempfile::tempdir().unwrap();
    let clock = SimClock::new(Duration::from_secs(1000));
    let svc = open(&ns, dir.path(), &clock).await;
    let before = links(&svc).await;
    svc.setup_networks(req(json!({
        "networks": {"vmnet": {"nic": "eth1", "mtu": 1400}},
        "options": {"connectivityTimeout": 10}
    })))
    .await
    .unwrap();
    assert!(svc.confirm().await.unwrap(), "a change was pending");
    assert!(!svc.confirm().await.unwrap(), "confirming twice is harmless");
    clock.advance(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(svc.rollbacks().is_empty());
    assert_eq!(links(&svc).await.links["vmnet"].mtu, 1400);
    // A VM tap joins the bridge with its MTU; an unknown network is refused.
    svc.plug_tap("oxtaptest0", "vmnet").await.unwrap();
    let h = links(&svc).await;
    let tap = &h.links["oxtaptest0"];
    assert_eq!(
        (tap.master.as_deref(), tap.mtu, tap.up),
        (Some("vmnet"), 1400, true)
    );
    assert!(matches!(
        svc.plug_tap("oxtaptest1", "nonet").await.unwrap_err(),
        NetError::NoNetwork(_)
    ));
    let caps = svc.capabilities().await.unwrap();
    assert_eq!(caps["networks"]["vmnet"]["present"], true, "{caps}");
    assert_eq!(
        caps["bridges"]["vmnet"]["ports"],
        json!(["eth1", "oxtaptest0"]),
        "{caps}"
    );
    assert!(caps["nics"].get("eth1").is_some(), "{caps}");
    assert!(
        caps["nics"].get("oxtaptest0").is_none(),
        "taps are not host NICs: {caps}"
    );
    let stats = svc.stats().await.unwrap();
    assert_eq!(stats["oxtaptest0"].kind, "tun");
    // A bridge with VM taps on it is not removed under them.
    let e = svc
        .setup_networks(req(json!({"networks": {"vmnet": {"remove": true}}})))
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::InUse { .. }), "{e}");
    assert!(e.to_string().contains("oxtaptest0"), "{e}");
    assert!(links(&svc).await.links.contains_key("vmnet"));
    svc.unplug_tap("oxtaptest0").await.unwrap();
    // Without the connectivity check the change is final at once.
    let r = svc
        .setup_networks(req(json!({
            "networks": {"vmnet": {"remove": true}},
            "options": {"connectivityCheck": false}
        })))
        .await
        .unwrap();
    assert_eq!(r.status, "done");
    let mut after = links(&svc).await;
    // The NIC keeps the MTU the network gave it, as VDSM leaves it.
    after.links.get_mut("eth1").unwrap().mtu = 1500;
    assert_eq!(after, before);
}

#[tokio::test]
async fn a_pending_change_survives_a_node_restart_and_still_rolls_back() {
    let ns = TestNs::new("rs");
    ns.veth("eth1", "peer1");
    let dir = tempfile::tempdir().unwrap();
    let clock = SimClock::new(Duration::from_secs(1000));
    let svc = open(&ns, dir.path(), &clock).await;
    let before = links(&svc).await;
    svc.setup_networks(req(json!({
        "networks": {"n1": {"nic": "eth1", "ipaddr": "10.9.0.1", "prefix": 24}},
        "options": {"connectivityTimeout": 30}
    })))
    .await
    .unwrap();
    drop(svc);
    // A new node process: its clock starts elsewhere; the wall-clock deadline carries over.
    let clock2 = SimClock::new(Duration::from_secs(5));
    let svc2 = open(&ns, dir.path(), &clock2).await;
    assert!(svc2.pending_secs().await.unwrap() <= 30);
    assert_eq!(svc2.running().await.networks.len(), 1);
    clock2.advance(Duration::from_secs(31));
    wait_rolled_back(&svc2, 1).await;
    assert_eq!(links(&svc2).await, before);
}

#[tokio::test]
async fn vlans_and_bonds_need_kernel_support_and_refusals_change_nothing() {
    let ns = TestNs::new("kf");
    ns.veth("eth1", "peer1");
    ns.veth("eth2", "peer2");
    let dir = tempfile::tempdir().unwrap();
    let clock = SimClock::new(Duration::from_secs(1000));
    let svc = open(&ns, dir.path(), &clock).await;
    let before = links(&svc).await;
    let has_8021q = ip_supports(
        &ns,
        &[
            "link", "add", "link", "eth1", "name", "eth1.7", "type", "vlan", "id", "7",
        ],
    );
    let r = svc
        .setup_networks(req(json!({"networks": {"v7": {"nic": "eth1", "vlan": 7}}})))
        .await;
    if has_8021q {
        r.unwrap();
        let h = links(&svc).await;
        assert_eq!(h.links["eth1.7"].vlan, Some(("eth1".into(), 7)));
        assert_eq!(h.links["eth1.7"].master.as_deref(), Some("v7"));
        svc.confirm().await.unwrap();
    } else {
        let e = r.unwrap_err();
        assert!(matches!(e, NetError::KernelFeature { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("8021q") && msg.contains("eth1.7"), "{msg}");
        assert_eq!(links(&svc).await, before, "a refused change changes nothing");
    }
    let has_bonding = ip_supports(&ns, &["link", "add", "oxbtest", "type", "bond"]);
    let r = svc
        .setup_networks(req(json!({
            "bondings": {"bond0": {"nics": ["eth2"], "options": "mode=1"}},
            "networks": {"b": {"bonding": "bond0"}}
        })))
        .await;
    if has_bonding {
        r.unwrap();
        assert_eq!(links(&svc).await.links["eth2"].master.as_deref(), Some("bond0"));
    } else {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("bonding") && e.contains("bond0"), "{e}");
        assert_eq!(links(&svc).await, before);
    }
    // Invalid requests: every reason, no change.
    let before = links(&svc).await;
    let e = svc
        .setup_networks(req(json!({"networks": {
            "x": {"nic": "eth9"},
            "y": {"nic": "eth1", "mtu": 10, "vlan": 5000}
        }})))
        .await
        .unwrap_err()
        .to_string();
    for needle in ["eth9", "MTU 10", "VLAN id 5000"] {
        assert!(e.contains(needle), "{needle} missing from: {e}");
    }
    assert_eq!(links(&svc).await, before);
    // DHCP needs nothing from the host: the node has its own client.
    svc.setup_networks(req(
        json!({"networks": {"d": {"nic": "eth1", "bootproto": "dhcp"}}}),
    ))
    .await
    .unwrap();
    svc.confirm().await.unwrap();
    // The network bridges the NIC by default: the client runs on the bridge.
    assert_eq!(svc.dhcp_links().await, vec!["d".to_string()]);
}

#[tokio::test]
async fn a_change_failing_half_way_is_undone_at_once() {
    let ns = TestNs::new("hf");
    ns.veth("eth1", "peer1");
    // A bridge made outside oxvirt: the kernel refuses to make it a port of another bridge,
    // which only shows once the new bridge exists.
    ns.exec(&["ip", "link", "add", "xbr0", "type", "bridge"]);
    let dir = tempfile::tempdir().unwrap();
    let clock = SimClock::new(Duration::from_secs(1000));
    let svc = open(&ns, dir.path(), &clock).await;
    let before = links(&svc).await;
    let e = svc
        .setup_networks(req(json!({"networks": {
            "ok": {"nic": "eth1", "ipaddr": "10.3.0.1", "prefix": 24},
            "nested": {"nic": "xbr0"}
        }})))
        .await
        .unwrap_err();
    match &e {
        NetError::Apply { op, rolled_back, .. } => {
            assert!(op.contains("xbr0"), "{e}");
            assert!(*rolled_back, "{e}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(links(&svc).await, before, "nothing of the failed change stays");
    assert!(svc.running().await.networks.is_empty());
    assert!(!dir.path().join("pending.json").exists());
    let e = svc
        .setup_networks(req(json!({"networks": {"l": {"nic": "lo"}}})))
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::Invalid(_)), "loopback is no NIC: {e}");
}

/// Whether `ip` can make this link kind in the namespace (then removes it again).
fn ip_supports(ns: &TestNs, args: &[&str]) -> bool {
    let mut full = vec!["ip"];
    full.extend_from_slice(args);
    let ok = ns.try_exec(&full);
    if ok {
        let name = args
            .iter()
            .position(|a| *a == "name")
            .map(|i| args[i + 1])
            .unwrap_or(args[2]);
        ns.exec(&["ip", "link", "del", name]);
    }
    ok
}

#[test]
fn the_fixture_cleans_up_its_namespace() {
    let name = {
        let ns = TestNs::new("fx");
        ns.veth("eth1", "peer1");
        assert!(ip(&["netns", "list"]).contains(&ns.name));
        ns.name.clone()
    };
    assert!(!ip(&["netns", "list"]).contains(&name));
}

/// Waits until `ok` holds for the host's links, up to 30 s.
async fn wait_links(svc: &NetworkService, what: &str, ok: impl Fn(&HostNet) -> bool) -> HostNet {
    let start = Instant::now();
    loop {
        let h = links(svc).await;
        if ok(&h) {
            return h;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: {h:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn dhcp_addr(h: &HostNet, link: &str) -> Option<String> {
    h.links
        .get(link)?
        .ipv4
        .iter()
        .map(|a| a.to_string())
        .find(|a| a.starts_with("10.77.0.5") && a.ends_with("/24"))
}

#[tokio::test]
async fn a_dhcp_network_takes_its_address_and_route_from_the_server_and_nothing_else() {
    let host = TestNs::new("dh");
    let server_ns = TestNs::new("ds");
    host.cable("eth1", &server_ns, "srv0");
    server_ns.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", "srv0"]);
    let server = DhcpServer::start(&server_ns, "srv0", "10.77.0.50", "10.77.0.59", "10.77.0.1");
    let resolv = std::fs::read("/etc/resolv.conf").ok();
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn oxvirt_lease::clock::Clock> = Arc::new(oxvirt_lease::clock::SystemClock);
    let open_real = || async {
        NetworkService::open(NetConfig {
            state_dir: dir.path().to_path_buf(),
            netns: Some(host.name.clone()),
            clock: clock.clone(),
            events: None,
        })
        .await
        .unwrap()
    };
    let svc = open_real().await;
    svc.setup_networks(req(json!({
        "networks": {"mgmt": {"nic": "eth1", "bootproto": "dhcp", "defaultRoute": true}},
        "options": {"connectivityTimeout": 120}
    })))
    .await
    .unwrap();
    svc.confirm().await.unwrap();
    let h = wait_links(&svc, "a DHCP address and route on the bridge", |h| {
        dhcp_addr(h, "mgmt").is_some()
            && h.default_route
                .as_ref()
                .is_some_and(|r| r.dev == "mgmt" && r.gateway.to_string() == "10.77.0.1")
    })
    .await;
    let addr = dhcp_addr(&h, "mgmt").unwrap();
    let mac = h.links["mgmt"].mac.clone().unwrap();
    let leases = server.leases();
    assert!(
        leases
            .iter()
            .any(|l| l.contains(&mac) && l.contains(addr.trim_end_matches("/24"))),
        "the server did not record {mac} at {addr}: {leases:?}"
    );
    assert_eq!(h.links["mgmt"].ipv4.len(), 1, "{h:#?}");
    assert!(h.links["eth1"].ipv4.is_empty());
    let caps = svc.capabilities().await.unwrap();
    let net = &caps["networks"]["mgmt"];
    assert_eq!(net["bootproto"], "dhcp", "{caps}");
    assert_eq!(net["gateway"], "10.77.0.1", "{caps}");
    assert_eq!(net["dhcpLease"]["address"], addr.as_str(), "{caps}");
    assert!(net["dhcpLease"]["expiresInSecs"].as_u64().unwrap() > 60, "{caps}");
    assert_eq!(caps["bridges"]["mgmt"]["dhcpv4"], true, "{caps}");
    assert_eq!(caps["nics"]["eth1"]["dhcpv4"], false, "{caps}");
    // The server offered a DNS server too; the host's resolver configuration is not ours.
    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), resolv);

    // A restarted node takes the client up again and keeps the address.
    drop(svc);
    let svc = open_real().await;
    assert_eq!(svc.dhcp_links().await, vec!["mgmt".to_string()]);
    assert_eq!(dhcp_addr(&links(&svc).await, "mgmt").as_ref(), Some(&addr));

    // Static addressing replaces the lease: the client stops and its address goes.
    svc.setup_networks(req(json!({
        "networks": {"mgmt": {"nic": "eth1", "ipaddr": "10.77.0.9", "prefix": 24,
                              "gateway": "10.77.0.1", "defaultRoute": true}},
        "options": {"connectivityCheck": false}
    })))
    .await
    .unwrap();
    assert!(svc.dhcp_links().await.is_empty());
    let h = links(&svc).await;
    assert_eq!(h.links["mgmt"].ipv4, vec!["10.77.0.9/24".parse().unwrap()]);
    assert_eq!(h.default_route.as_ref().map(|r| r.dev.as_str()), Some("mgmt"));
    // Time enough for a stopped client to have renewed: nothing comes back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        links(&svc).await.links["mgmt"].ipv4,
        vec!["10.77.0.9/24".parse().unwrap()]
    );

    // DHCP again, now without the default route: the static route goes and none comes.
    svc.setup_networks(req(json!({
        "networks": {"mgmt": {"nic": "eth1", "bootproto": "dhcp"}},
        "options": {"connectivityCheck": false}
    })))
    .await
    .unwrap();
    let h = wait_links(&svc, "a DHCP address instead of the static one", |h| {
        dhcp_addr(h, "mgmt").is_some() && h.links["mgmt"].ipv4.len() == 1
    })
    .await;
    assert_eq!(h.default_route, None);
    let lease = dhcp_addr(&h, "mgmt").unwrap();

    // An unconfirmed move to static addressing is undone: the client runs again, the lease
    // comes back and the static address goes.
    let r = svc
        .setup_networks(req(json!({
            "networks": {"mgmt": {"nic": "eth1", "ipaddr": "10.77.0.9", "prefix": 24}},
            "options": {"connectivityTimeout": 1}
        })))
        .await
        .unwrap();
    assert_eq!(r.status, "pending");
    assert!(svc.dhcp_links().await.is_empty());
    wait_rolled_back(&svc, 1).await;
    assert!(svc.rollbacks()[0].errors.is_empty(), "{:?}", svc.rollbacks());
    let h = wait_links(&svc, "the lease back after the rollback", |h| {
        h.links["mgmt"].ipv4.len() == 1 && dhcp_addr(h, "mgmt").is_some()
    })
    .await;
    assert_eq!(dhcp_addr(&h, "mgmt"), Some(lease));
    assert_eq!(svc.dhcp_links().await, vec!["mgmt".to_string()]);

    // Removing the network stops the client with the bridge.
    svc.setup_networks(req(json!({
        "networks": {"mgmt": {"remove": true}},
        "options": {"connectivityCheck": false}
    })))
    .await
    .unwrap();
    assert!(svc.dhcp_links().await.is_empty());
    let h = links(&svc).await;
    assert!(!h.links.contains_key("mgmt"));
    assert!(
        h.links["eth1"].ipv4.is_empty() && h.links["eth1"].master.is_none(),
        "{h:#?}"
    );
    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), resolv);
}
