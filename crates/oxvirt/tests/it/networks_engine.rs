//! Networks through the engine: an in-process engine and three `oxvirt node` processes, each
//! managing the host network of a network namespace of its own (`--netns`); hosts A and B are
//! cabled to each other (the VM network's `eth1`, the migration network's `mig0`), host C is
//! not. Everything goes through the engine's commands: the management network comes with the
//! data center, a VM network is set up on A with a static address (confirmed by the engine), a
//! VLAN is refused where the kernel has no 8021q, the scheduler puts a VM with a NIC on the
//! network only on a host that has it and refuses to migrate it where none has, the network
//! becomes required and host C turns non_operational, a NIC is hot plugged, the link goes down
//! and up, the VM migrates to B keeping both NICs and its connectivity, and a NIC removal hot
//! unplugs it and returns its MAC to the pool.
//!
//! The guest pings host A's address on the network every second and reports whether its
//! second NIC exists, on its serial console.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, NodeProc, QemuReaper};
use oxvirt_engine::allinone;
use oxvirt_engine::app::EngineSettings;
use oxvirt_engine::commands::{
    AddNetwork, AddNic, AddVm, MigrateOptions, SetupHostNetworks, UpdateNic, VmStartOptions,
};
use oxvirt_engine::daemon::{Engine, EngineConfig};
use oxvirt_engine::model::{HostStatus, VmStatus, BLANK_TEMPLATE_ID};
use oxvirt_engine::network::{HostAttachment, HostBond, HostIp, MANAGEMENT_NETWORK};
use oxvirt_testkit::netns::TestNs;
use oxvirt_testkit::TestGuest;

const MIB: u64 = 1 << 20;

struct Node {
    name: String,
    _ns: TestNs,
    data: tempfile::TempDir,
    _proc: NodeProc,
}

fn console(nodes: &[Node], host: &str, vm: oxvirt_types::VmId) -> PathBuf {
    let n = nodes.iter().find(|n| n.name == host).unwrap();
    n.data
        .path()
        .join("run/vms")
        .join(vm.to_string())
        .join("serial.log")
}

fn count_after(path: &Path, from: usize, needle: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.get(from..).unwrap_or("").matches(needle).count()
}

fn console_len(path: &Path) -> usize {
    std::fs::metadata(path).map_or(0, |m| m.len() as usize)
}

/// The MAC of link `dev` in network namespace `ns`.
fn mac_of(ns: &str, dev: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-br", "link", "show", "dev", dev])
        .output()
        .expect("ip (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC for {dev} in {ns}: {text:?}"))
        .to_string()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn engine_sets_up_networks_places_and_migrates_vm_nics() {
    let engine_dir = tempfile::tempdir().unwrap();
    let settings = EngineSettings {
        monitor_interval: Duration::from_millis(500),
        migration_timeout: Duration::from_secs(120),
        accel: Some("tcg".into()),
        ..EngineSettings::default()
    };
    let cfg = EngineConfig {
        data_dir: engine_dir.path().to_path_buf(),
        db_url: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_password: Some("secret".into()),
        settings,
    };
    let e: Arc<Engine> = Engine::start(cfg, None).await.unwrap();
    let (dc, cluster) = allinone::ensure_default(&e).await.unwrap();
    let cmds = &e.cmds;
    let db = &e.app().db;

    // The management network came with the data center and is the cluster's.
    let mgmt = db
        .network_get_by_name(dc, MANAGEMENT_NETWORK)
        .await
        .unwrap()
        .expect("the data center has its management network");
    let cnets = db.cluster_networks(cluster).await.unwrap();
    assert!(
        cnets
            .iter()
            .any(|c| c.network_id == mgmt.id && c.management && c.required),
        "{cnets:?}"
    );

    // Three hosts: A and B cabled together, C alone.
    let (na, nb, nc) = (TestNs::new("ea"), TestNs::new("eb"), TestNs::new("ec"));
    na.cable("eth1", &nb, "eth1");
    na.cable("mig0", &nb, "mig0");
    nc.veth("eth1", "sw1");
    na.veth("eth2", "sw2");
    na.exec(&["ip", "addr", "add", "10.78.0.1/24", "dev", "mig0"]);
    nb.exec(&["ip", "addr", "add", "10.78.0.2/24", "dev", "mig0"]);
    let (ns_a, ns_b) = (na.name.clone(), nb.name.clone());
    let mut nodes = Vec::new();
    for (name, ns, mig) in [
        ("ha", na, "10.78.0.1"),
        ("hb", nb, "10.78.0.2"),
        ("hc", nc, "10.78.0.3"),
    ] {
        let data = tempfile::tempdir().unwrap();
        let token = e.enroll_token(Some(cluster), Duration::from_secs(300));
        let addr = free_port();
        let p = common::spawn_node(
            name,
            data.path(),
            addr,
            &[
                "--engine",
                &e.addr.to_string(),
                "--token",
                &token,
                "--accel",
                "tcg",
                "--netns",
                &ns.name,
                "--migration-host",
                mig,
            ],
        );
        nodes.push(Node {
            name: name.into(),
            _ns: ns,
            data,
            _proc: p,
        });
    }
    let _reaper = QemuReaper(nodes.iter().map(|n| n.data.path().join("run")).collect());
    allinone::wait_hosts_up(&e, 3, Duration::from_secs(90))
        .await
        .unwrap();
    let host = |n: &str| {
        let n = n.to_string();
        async move { db.host_get_by_name(&n).await.unwrap().unwrap() }
    };
    let (ha, hb, hc) = (host("ha").await, host("hb").await, host("hc").await);

    // A VM network, and a VLAN network.
    let vmnet = cmds
        .add_network(AddNetwork {
            name: "vmnet".into(),
            description: "guests".into(),
            data_center: dc,
            mtu: None,
            vlan: None,
            vm_network: true,
        })
        .await
        .unwrap();
    let bad = cmds
        .add_network(AddNetwork {
            name: "vmnet".into(),
            description: String::new(),
            data_center: dc,
            mtu: Some(20),
            vlan: None,
            vm_network: true,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(bad.contains("already exists") && bad.contains("MTU 20"), "{bad}");
    let vl7 = cmds
        .add_network(AddNetwork {
            name: "vl7".into(),
            description: String::new(),
            data_center: dc,
            mtu: None,
            vlan: Some(7),
            vm_network: false,
        })
        .await
        .unwrap();

    // The VM network on A with an address, applied and confirmed by the engine.
    let on_a = HostAttachment {
        nic: "eth1".into(),
        ip: HostIp::Static {
            address: "10.50.0.1".parse().unwrap(),
            prefix: 24,
            gateway: None,
        },
        default_route: false,
    };
    let setup = |net, att: HostAttachment| SetupHostNetworks {
        attach: vec![(net, att)],
        connectivity_timeout: Some(30),
        ..Default::default()
    };
    let atts = cmds
        .setup_host_networks(ha.id, setup(vmnet.id, on_a.clone()), None)
        .await
        .unwrap();
    assert_eq!(atts.len(), 1, "{atts:?}");
    assert_eq!(atts[0].attachment, on_a);
    assert!(db.host_reported_networks(ha.id).await.unwrap().contains("vmnet"));
    let caps = cmds.host_network_capabilities(ha.id).await.unwrap();
    assert_eq!(
        caps["bridges"]["vmnet"]["ports"],
        serde_json::json!(["eth1"]),
        "{caps}"
    );
    assert_eq!(
        caps["pendingNetworkChange"],
        serde_json::Value::Null,
        "confirmed: {caps}"
    );

    // A VLAN needs the kernel's 8021q: without it the node refuses and nothing changes.
    let vlan = cmds
        .setup_host_networks(
            ha.id,
            setup(
                vl7.id,
                HostAttachment {
                    nic: "eth1".into(),
                    ip: HostIp::None,
                    default_route: false,
                },
            ),
            None,
        )
        .await;
    if Path::new("/sys/module/8021q").exists() {
        vlan.expect("the kernel has 8021q");
    } else {
        let err = vlan.unwrap_err().to_string();
        assert!(err.contains("8021q"), "{err}");
        assert_eq!(db.host_attachments(ha.id).await.unwrap().len(), 1);
    }

    // A bond needs the kernel's bonding: with it, the bond comes and goes; without it, the node
    // refuses naming the module and nothing changes.
    let bond = HostBond {
        name: "bond0".into(),
        slaves: vec!["eth2".into()],
        options: "mode=1 miimon=100".into(),
    };
    let bonded = cmds
        .setup_host_networks(
            ha.id,
            SetupHostNetworks {
                bonds: vec![bond],
                connectivity_timeout: Some(30),
                ..Default::default()
            },
            None,
        )
        .await;
    if Path::new("/sys/class/net/bonding_masters").exists() {
        bonded.expect("the kernel has bonding");
        let caps = cmds.host_network_capabilities(ha.id).await.unwrap();
        assert_eq!(
            caps["bonds"]["bond0"]["slaves"],
            serde_json::json!(["eth2"]),
            "{caps}"
        );
        cmds.setup_host_networks(
            ha.id,
            SetupHostNetworks {
                removed_bonds: vec!["bond0".into()],
                connectivity_timeout: Some(30),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    } else {
        let err = bonded.unwrap_err().to_string();
        assert!(err.contains("bonding") && err.contains("bond0"), "{err}");
    }
    let caps = cmds.host_network_capabilities(ha.id).await.unwrap();
    assert!(caps["bonds"].get("bond0").is_none(), "{caps}");
    assert_eq!(db.host_attachments(ha.id).await.unwrap().len(), 1);
    // A bond without slaves is refused by the engine before any node sees it.
    let err = cmds
        .setup_host_networks(
            ha.id,
            SetupHostNetworks {
                bonds: vec![HostBond {
                    name: "bond1".into(),
                    slaves: vec![],
                    options: String::new(),
                }],
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least one slave"), "{err}");

    // Optional in the cluster: every host stays up.
    cmds.attach_cluster_network(cluster, vmnet.id, false)
        .await
        .unwrap();

    // A VM with a NIC on the network; its MAC comes from the cluster's pool.
    let script = "ip addr add 10.50.0.2/24 dev eth0; ip link set eth0 up; echo OXVIRT-NET up
(while true; do
  if ping -c 1 -W 1 10.50.0.1 >/dev/null 2>&1; then echo OXVIRT-PING ok; else echo OXVIRT-PING fail; fi
  if [ -e /sys/class/net/eth1 ]; then echo OXVIRT-NIC eth1 present; else echo OXVIRT-NIC eth1 absent; fi
  sleep 1
done) &";
    let vm = cmds
        .add_vm(
            AddVm {
                name: "netvm".into(),
                description: String::new(),
                cluster,
                template: BLANK_TEMPLATE_ID,
                memory_bytes: Some(192 * MIB),
                cpu: None,
                os: common::cluster::guest_os(&[&TestGuest::run_arg(script)]),
                ha: None,
                resume_behavior: None,
            },
            None,
        )
        .await
        .unwrap();
    let nic1 = cmds
        .add_nic(vm.id, AddNic::on("nic1", Some("vmnet")))
        .await
        .unwrap();
    assert_eq!(nic1.mac.0[..2], [0x56, 0x6f], "{}", nic1.mac);
    let spare = cmds
        .add_nic(vm.id, AddNic::on("spare", Some("vmnet")))
        .await
        .unwrap();
    assert_ne!(spare.mac, nic1.mac);
    let dup = AddNic {
        mac: Some(nic1.mac),
        ..AddNic::on("dup", None)
    };
    let err = cmds.add_nic(vm.id, dup).await.unwrap_err().to_string();
    assert!(err.contains(&nic1.mac.to_string()), "{err}");
    let err = cmds
        .add_nic(vm.id, AddNic::on("nowhere", Some("vl7")))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a VM network"), "{err}");
    cmds.remove_nic(vm.id, spare.id).await.unwrap();
    assert_eq!(db.nics_of_vm(vm.id).await.unwrap().len(), 1);

    // The scheduler puts it where the network is: host A.
    let up = cmds
        .start_vm(vm.id, VmStartOptions::default(), None)
        .await
        .unwrap();
    assert_eq!(up.runtime.run_on_host, Some(ha.id), "only host A has vmnet");
    cmds.wait_vm_status(vm.id, VmStatus::Up, Duration::from_secs(30))
        .await
        .unwrap();
    let con_a = console(&nodes, "ha", vm.id);
    wait_console(&con_a, 0, "OXVIRT-PING ok", 2, Duration::from_secs(120)).await;

    // No other host has the network: no migration.
    let err = cmds
        .migrate_vm(vm.id, MigrateOptions::default(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("'vmnet'"), "{err}");

    // B gets the network; then it becomes required and C, lacking it, non_operational.
    cmds.setup_host_networks(
        hb.id,
        setup(
            vmnet.id,
            HostAttachment {
                nic: "eth1".into(),
                ip: HostIp::None,
                default_route: false,
            },
        ),
        None,
    )
    .await
    .unwrap();
    cmds.attach_cluster_network(cluster, vmnet.id, true)
        .await
        .unwrap();
    let c_now = common::wait_host(&e, hc.id, HostStatus::NonOperational, Duration::from_secs(20)).await;
    let reason = c_now.status_detail.unwrap_or_default();
    assert!(reason.contains("'vmnet'") && reason.contains("hc"), "{reason}");
    for h in [ha.id, hb.id] {
        assert_eq!(db.host_get(h).await.unwrap().unwrap().status, HostStatus::Up);
    }

    // Hot plug a second NIC; the guest sees it.
    let mark = console_len(&con_a);
    let nic2 = cmds
        .add_nic(vm.id, AddNic::on("nic2", Some("vmnet")))
        .await
        .unwrap();
    wait_console(
        &con_a,
        mark,
        "OXVIRT-NIC eth1 present",
        1,
        Duration::from_secs(30),
    )
    .await;

    // Link down cuts the guest off; link up brings it back.
    let mark = console_len(&con_a);
    let link = |linked| UpdateNic {
        linked: Some(linked),
        ..Default::default()
    };
    let n = cmds.update_nic(vm.id, nic1.id, link(false)).await.unwrap();
    assert!(!n.linked);
    wait_console(&con_a, mark, "OXVIRT-PING fail", 2, Duration::from_secs(30)).await;
    let mark = console_len(&con_a);
    cmds.update_nic(vm.id, nic1.id, link(true)).await.unwrap();
    wait_console(&con_a, mark, "OXVIRT-PING ok", 2, Duration::from_secs(30)).await;
    let err = cmds
        .update_nic(
            vm.id,
            nic1.id,
            UpdateNic {
                network: Some(None),
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unplug it"), "{err}");

    // Migration: the scheduler's only choice is B; both NICs come along and the guest still
    // reaches A's address, now across the cable.
    let moved = cmds
        .migrate_vm(vm.id, MigrateOptions::default(), None)
        .await
        .unwrap();
    assert_eq!(moved.runtime.run_on_host, Some(hb.id));
    // Both bridges keep their uplink's MAC, with the VM's taps gone from A and now on B: a tap
    // that lent A's bridge its MAC would take it along, and the guest's ARP entry for A's
    // address would point nowhere until it expired (about 30 s of lost pings).
    for ns in [&ns_a, &ns_b] {
        assert_eq!(mac_of(ns, "vmnet"), mac_of(ns, "eth1"), "bridge of {ns}");
    }
    let con_b = console(&nodes, "hb", vm.id);
    let mark = console_len(&con_b);
    wait_console(&con_b, mark, "OXVIRT-PING ok", 2, Duration::from_secs(60)).await;
    assert!(count_after(&con_b, mark, "OXVIRT-NIC eth1 present") >= 1);

    // Removing the hot plugged NIC unplugs it from the running guest; its MAC is free again.
    let mark = console_len(&con_b);
    cmds.remove_nic(vm.id, nic2.id).await.unwrap();
    wait_console(&con_b, mark, "OXVIRT-NIC eth1 absent", 1, Duration::from_secs(30)).await;
    let again = AddNic {
        mac: Some(nic2.mac),
        plugged: false,
        ..AddNic::on("again", Some("vmnet"))
    };
    assert_eq!(cmds.add_nic(vm.id, again).await.unwrap().mac, nic2.mac);

    // Optional again: C comes back up.
    cmds.attach_cluster_network(cluster, vmnet.id, false)
        .await
        .unwrap();
    common::wait_host(&e, hc.id, HostStatus::Up, Duration::from_secs(20)).await;

    cmds.stop_vm(vm.id).await.unwrap();
    e.shutdown().await;
}
