//! The safety net of host network setup, end to end: the engine reaches a node only across the
//! link a network change touches, so a bad change really cuts the engine off.
//!
//! The node (`oxvirt node --netns host`) listens on loopback as usual, but the engine knows it
//! by a relay: engine → 127.0.0.1:Q (a relay in the test's namespace, which connects from
//! namespace `eng`) → cable → 10.88.0.2 on `eth1` in namespace `host` (a relay there) → the
//! node. Moving the management network onto `eth1` with a wrong address makes 10.88.0.2 vanish:
//! the engine's connectivity check fails, nobody confirms, and the node restores `eth1` by
//! itself at the deadline; the engine records nothing and reaches the host again. The same
//! change with the right address (the address moving from the NIC onto the bridge, VDSM's
//! classic) keeps the engine connected, so it is confirmed and recorded; so is the move to
//! DHCP, served from the engine's side of the cable.

use crate::common;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::free_port;
use oxvirt_engine::allinone;
use oxvirt_engine::app::EngineSettings;
use oxvirt_engine::commands::SetupHostNetworks;
use oxvirt_engine::daemon::{Engine, EngineConfig};
use oxvirt_engine::model::HostStatus;
use oxvirt_engine::network::{HostAttachment, HostIp, MANAGEMENT_NETWORK};
use oxvirt_testkit::netns::{DhcpServer, TestNs};

/// Enters namespace `ns` (the test process's own when `None`: threads inherit the namespace
/// of the thread that made them, so a relay's threads must say where they go).
fn enter(ns: Option<&str>) -> io::Result<()> {
    let path = match ns {
        Some(ns) => format!("/run/netns/{ns}"),
        None => "/proc/self/ns/net".to_string(),
    };
    let f = std::fs::File::open(path)?;
    // SAFETY: setns only reads its arguments; the file stays open for the call.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP relay: accepts on `listen` inside `listen_ns` and connects each client to `to` from
/// inside `connect_ns`, copying bytes both ways. Stops accepting when dropped.
struct Relay {
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(listen_ns: Option<&str>, listen: SocketAddr, connect_ns: Option<&str>, to: SocketAddr) -> Relay {
        let stop = Arc::new(AtomicBool::new(false));
        let (listen_ns, connect_ns) = (listen_ns.map(str::to_string), connect_ns.map(str::to_string));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        std::thread::spawn(move || {
            let l = enter(listen_ns.as_deref())
                .and_then(|()| TcpListener::bind(listen))
                .and_then(|l| l.set_nonblocking(true).map(|()| l));
            let l = match l {
                Ok(l) => {
                    ready_tx.send(Ok(())).unwrap();
                    l
                }
                Err(e) => {
                    ready_tx.send(Err(e)).unwrap();
                    return;
                }
            };
            while !flag.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((client, _)) => {
                        let connect_ns = connect_ns.clone();
                        std::thread::spawn(move || {
                            // A thread of its own: its namespace is the outbound socket's.
                            let server = enter(connect_ns.as_deref())
                                .and_then(|()| TcpStream::connect_timeout(&to, Duration::from_secs(3)));
                            let Ok(server) = server else { return };
                            let _ = client.set_nonblocking(false);
                            pipe(client, server);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => return,
                }
            }
        });
        ready_rx
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("relay on {listen}: {e}"));
        Relay { stop }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    };
    std::thread::spawn(move || copy(a, b2));
    copy(b, a2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_that_cuts_the_engine_off_is_rolled_back_by_the_node_and_a_good_one_is_kept() {
    let engine_dir = tempfile::tempdir().unwrap();
    let settings = EngineSettings {
        monitor_interval: Duration::from_millis(500),
        ..EngineSettings::default()
    };
    let e: Arc<Engine> = Engine::start(
        EngineConfig {
            data_dir: engine_dir.path().to_path_buf(),
            db_url: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_password: Some("secret".into()),
            settings,
        },
        None,
    )
    .await
    .unwrap();
    let (dc, cluster) = allinone::ensure_default(&e).await.unwrap();
    let (cmds, db) = (&e.cmds, &e.app().db);
    let mgmt = db
        .network_get_by_name(dc, MANAGEMENT_NETWORK)
        .await
        .unwrap()
        .unwrap();

    // The host's NIC eth1 (10.88.0.2) is cabled to the engine's side (10.88.0.1).
    let (host_ns, eng_ns) = (TestNs::new("rh"), TestNs::new("re"));
    host_ns.cable("eth1", &eng_ns, "e0");
    host_ns.exec(&["ip", "addr", "add", "10.88.0.2/24", "dev", "eth1"]);
    eng_ns.exec(&["ip", "addr", "add", "10.88.0.1/24", "dev", "e0"]);
    let data = tempfile::tempdir().unwrap();
    let token = e.enroll_token(Some(cluster), Duration::from_secs(300));
    let node_addr = free_port();
    let mut node = common::spawn_node(
        "rh",
        data.path(),
        node_addr,
        &[
            "--engine",
            &e.addr.to_string(),
            "--token",
            &token,
            "--netns",
            &host_ns.name,
        ],
    );
    allinone::wait_hosts_up(&e, 1, Duration::from_secs(60))
        .await
        .unwrap_or_else(|err| panic!("{err}: {}", node.log_tail()));
    let mut h = db.host_get_by_name("rh").await.unwrap().unwrap();

    // From now on the engine reaches the node across the cable only.
    let far: SocketAddr = "10.88.0.2:7443".parse().unwrap();
    let _in_host = Relay::start(Some(&host_ns.name), far, None, node_addr);
    let near = free_port();
    let _in_eng = Relay::start(None, near, Some(&eng_ns.name), far);
    h.port = near.port();
    db.host_update(&h).await.unwrap();
    let caps = cmds.host_network_capabilities(h.id).await.unwrap();
    assert_eq!(
        caps["nics"]["eth1"]["ipv4addrs"],
        serde_json::json!(["10.88.0.2/24"]),
        "{caps}"
    );

    // The management network onto eth1 with a wrong address: the engine loses the host, does
    // not confirm, and the node restores eth1 by itself.
    let attach = |address: &str| SetupHostNetworks {
        attach: vec![(
            mgmt.id,
            HostAttachment {
                nic: "eth1".into(),
                ip: HostIp::Static {
                    address: address.parse().unwrap(),
                    prefix: 24,
                    gateway: None,
                },
                default_route: false,
            },
        )],
        connectivity_timeout: Some(4),
        ..Default::default()
    };
    let start = Instant::now();
    let err = cmds
        .setup_host_networks(h.id, attach("10.99.0.2"), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("did not answer") || err.contains("lost connectivity") || err.contains("rolled back"),
        "{err}"
    );
    assert!(
        start.elapsed() >= Duration::from_secs(3),
        "failed too early: {err}"
    );
    assert!(
        db.host_attachments(h.id).await.unwrap().is_empty(),
        "the engine recorded an unconfirmed change"
    );
    // Reached again once the node rolled back: eth1 as it was, no bridge, nothing pending.
    let deadline = Instant::now() + Duration::from_secs(30);
    let caps = loop {
        if let Ok(caps) = cmds.host_network_capabilities(h.id).await {
            if caps["pendingNetworkChange"].is_null() {
                break caps;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the host never came back: {}",
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        caps["nics"]["eth1"]["ipv4addrs"],
        serde_json::json!(["10.88.0.2/24"]),
        "{caps}"
    );
    assert!(caps["bridges"].get(MANAGEMENT_NETWORK).is_none(), "{caps}");
    assert!(
        node.log_tail().contains("network configuration restored"),
        "the node did not roll back: {}",
        node.log_tail()
    );
    common::wait_host(&e, h.id, HostStatus::Up, Duration::from_secs(30)).await;

    // The right address moves from the NIC onto the bridge: the engine still reaches the host
    // (across the same cable), confirms and records the change.
    let atts = cmds
        .setup_host_networks(h.id, attach("10.88.0.2"), None)
        .await
        .unwrap_or_else(|err| panic!("{err}: {}", node.log_tail()));
    assert_eq!(atts.len(), 1, "{atts:?}");
    let caps = cmds.host_network_capabilities(h.id).await.unwrap();
    assert_eq!(caps["pendingNetworkChange"], serde_json::Value::Null, "{caps}");
    assert_eq!(
        caps["bridges"][MANAGEMENT_NETWORK]["ipv4addrs"],
        serde_json::json!(["10.88.0.2/24"]),
        "{caps}"
    );
    assert_eq!(
        caps["bridges"][MANAGEMENT_NETWORK]["ports"],
        serde_json::json!(["eth1"]),
        "{caps}"
    );
    assert_eq!(db.host_attachments(h.id).await.unwrap().len(), 1);
    // Past the deadline the change stays: it was confirmed.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let caps = cmds.host_network_capabilities(h.id).await.unwrap();
    assert!(caps["bridges"].get(MANAGEMENT_NETWORK).is_some(), "{caps}");

    // The management network by DHCP: the engine's side serves the host its own address, so
    // the engine loses it only until the lease comes, confirms, and records the DHCP attachment.
    let _dhcp = DhcpServer::start(&eng_ns, "e0", "10.88.0.2", "10.88.0.2", "10.88.0.1");
    let by_dhcp = SetupHostNetworks {
        attach: vec![(
            mgmt.id,
            HostAttachment {
                nic: "eth1".into(),
                ip: HostIp::Dhcp,
                default_route: false,
            },
        )],
        connectivity_timeout: Some(20),
        ..Default::default()
    };
    let atts = cmds
        .setup_host_networks(h.id, by_dhcp, None)
        .await
        .unwrap_or_else(|err| panic!("{err}: {}", node.log_tail()));
    assert_eq!(atts[0].attachment.ip, HostIp::Dhcp, "{atts:?}");
    let caps = cmds.host_network_capabilities(h.id).await.unwrap();
    let net = &caps["networks"][MANAGEMENT_NETWORK];
    assert_eq!(net["bootproto"], "dhcp", "{caps}");
    assert_eq!(net["dhcpLease"]["address"], "10.88.0.2/24", "{caps}");
    assert_eq!(caps["bridges"][MANAGEMENT_NETWORK]["dhcpv4"], true, "{caps}");
    assert_eq!(caps["pendingNetworkChange"], serde_json::Value::Null, "{caps}");
    assert!(node.child.try_wait().unwrap().is_none(), "the node exited");
}
