//! No single point of failure, with real processes: an in-process engine and three real
//! `oxvirt node` processes (each with its fence watchdog) sharing one directory as storage,
//! io_timeout 1 s, fence margin 2 s. A highly available VM whose guest keeps writing to its disk
//! runs on the SPM node; that node is killed with `kill -9` (the VM and the SPM role must move);
//! then the node now running the VM is frozen with SIGSTOP past its lease (the watchdog must
//! kill its QEMU, the VM must move again); last its QEMU is killed on a live host (the VM must
//! restart in place). Throughout, a sampler checks that no two live QEMU processes ever run the
//! VM, and the storage domain checks clean.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{attach_data_domain, cow_disk, start_cluster, start_cluster_at, Cluster};
use oxvirt_engine::allinone;
use oxvirt_engine::commands::{AddVm, VmStartOptions};
use oxvirt_engine::daemon::Engine;
use oxvirt_engine::model::{HighAvailability, HostStatus, HostUuid, SpmStatus, VmStatus, BLANK_TEMPLATE_ID};
use oxvirt_types::VmId;

const MIB: u64 = 1 << 20;

/// Live (not zombie) processes whose command line mentions `needle`.
fn live_processes_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmd).contains(needle) || !String::from_utf8_lossy(&cmd).contains("qemu")
        {
            continue;
        }
        if alive(pid) {
            out.push(pid);
        }
    }
    out
}

use oxvirt_testkit::process_alive as alive;

/// Samples every 50 ms how many QEMUs run the VM; remembers the maximum.
struct TwiceSampler {
    max: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TwiceSampler {
    fn start(vm: VmId) -> TwiceSampler {
        let (max, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (m, s) = (max.clone(), stop.clone());
        let needle = format!("vms/{vm}/");
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let n = live_processes_with(&needle).len();
                m.fetch_max(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        TwiceSampler {
            max,
            stop,
            thread: Some(thread),
        }
    }
    fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

impl Drop for TwiceSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn host_name(e: &Engine, id: HostUuid) -> String {
    e.app().db.host_get(id).await.unwrap().unwrap().name
}

/// The host the engine records the VM running on.
async fn vm_host(e: &Engine, vm: VmId) -> HostUuid {
    let v = e.app().db.vm_get(vm).await.unwrap().unwrap();
    v.runtime.run_on_host.expect("the VM runs somewhere")
}

async fn spm_of(e: &Engine) -> Option<HostUuid> {
    let d = e.app().db.dc_get_by_name("Default").await.unwrap().unwrap();
    match (d.spm_status, d.spm_host) {
        (SpmStatus::Spm, Some(h)) => Some(h),
        _ => None,
    }
}

/// Records when the SPM role first rests on a host other than `from`, polling every 100 ms from
/// now; fails after 60 s.
fn watch_spm_leaving(e: Arc<Engine>, from: HostUuid, since: Instant) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        loop {
            if spm_of(&e).await.is_some_and(|s| s != from) {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < Duration::from_secs(60),
                "the SPM role did not leave its host"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Waits until the VM is up on a host other than `away_from` and its guest writes there;
/// returns (host, time to up, time to the guest's first pass).
async fn wait_moved(
    c: &Cluster,
    vm: VmId,
    away_from: HostUuid,
    since: Instant,
) -> (String, Duration, Duration) {
    let e = &c.engine;
    let (h, up_at) = loop {
        let v = e.app().db.vm_get(vm).await.unwrap().unwrap();
        if v.runtime.status == VmStatus::Up && v.runtime.run_on_host.is_some_and(|h| h != away_from) {
            break (v.runtime.run_on_host.unwrap(), since.elapsed());
        }
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "the HA VM did not come back elsewhere: {} ({:?})",
            v.runtime.status,
            v.runtime.status_detail
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let name = host_name(e, h).await;
    oxvirt_testkit::wait_for_text(
        &c.console(&name, vm),
        "OXVIRT-GUEST pass 0",
        Duration::from_secs(90),
    )
    .unwrap();
    (name, up_at, since.elapsed())
}

fn console_len(p: &Path) -> usize {
    std::fs::read_to_string(p).map(|s| s.len()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ha_vm_survives_kill_of_the_spm_node_and_a_frozen_node_never_running_twice() {
    let mut c = start_cluster(3).await;
    let e = c.engine.clone();
    let cmds = &e.cmds;
    let db = &e.app().db;
    let cluster = db.cluster_get_by_name("Default").await.unwrap().unwrap();
    let (_, sd) = attach_data_domain(&c, "host1").await;
    let spm1 = spm_of(&e).await.expect("an SPM");

    // A highly available VM whose guest keeps rewriting its disk.
    let vm = cmds
        .add_vm(
            AddVm {
                name: "havm".into(),
                description: String::new(),
                cluster: cluster.id,
                template: BLANK_TEMPLATE_ID,
                memory_bytes: Some(256 * MIB),
                cpu: None,
                os: common::cluster::guest_os(&["oxvirt.writer=8"]),
                ha: Some(HighAvailability {
                    enabled: true,
                    priority: 1,
                }),
                resume_behavior: None,
            },
            None,
        )
        .await
        .unwrap();
    cmds.add_disk(cow_disk("havm_disk", sd.id, 64 * MIB, Some((vm.id, true))), None)
        .await
        .unwrap();
    let sampler = TwiceSampler::start(vm.id);

    // It runs on the SPM node.
    cmds.start_vm(
        vm.id,
        VmStartOptions {
            host: Some(spm1),
            paused: false,
            run_once: None,
        },
        None,
    )
    .await
    .unwrap();
    let spm1_name = host_name(&e, spm1).await;
    oxvirt_testkit::wait_for_text(
        &c.console(&spm1_name, vm.id),
        "OXVIRT-GUEST pass 0",
        Duration::from_secs(90),
    )
    .unwrap();
    let info = e.cmds.app.db.vm_get(vm.id).await.unwrap().unwrap();
    assert_eq!(info.runtime.run_on_host, Some(spm1));

    // 1. kill -9 the SPM node: its QEMU survives it until the watchdog kills it; the VM comes
    //    back elsewhere and the SPM role moves.
    let old_qemu = c.qemu_pid(&spm1_name, vm.id);
    let i = c.node(&spm1_name);
    let killed = Instant::now();
    let spm_watch = watch_spm_leaving(e.clone(), spm1, killed);
    c.nodes[i].2.child.kill().unwrap();
    let _ = c.nodes[i].2.child.wait();
    assert!(
        alive(old_qemu),
        "QEMU outlives its node (the watchdog must act, not the node's death)"
    );
    let (h2_name, up1, pass1) = wait_moved(&c, vm.id, spm1, killed).await;
    assert!(!alive(old_qemu), "the fence watchdog killed the orphaned QEMU");
    let old_console = c.console(&spm1_name, vm.id);
    let frozen_len = console_len(&old_console);
    let spm_moved = spm_watch.await.expect("the SPM role moved");
    eprintln!(
        "BENCH kill -9 of the SPM node: HA VM up on {h2_name} after {up1:?}, guest writing after {pass1:?}; SPM moved after {spm_moved:?}"
    );
    assert_eq!(
        db.host_get(spm1).await.unwrap().unwrap().status,
        HostStatus::NonResponsive
    );
    // The dead host cannot be selected as SPM, and asking changes nothing.
    let spm_now = spm_of(&e).await;
    let err = cmds.force_select_spm(spm1).await.unwrap_err().to_string();
    assert!(err.contains("cannot be the SPM"), "{err}");
    assert_eq!(spm_of(&e).await, spm_now);

    // 2. Freeze the node now running the VM past its lease: the watchdog (not frozen) kills its
    //    QEMU at the lease's expiry; the VM comes back on the last host.
    let h2 = vm_host(&e, vm.id).await;
    // It becomes the SPM as well (the admin's "select as SPM"), so that both roles must move.
    cmds.force_select_spm(h2).await.unwrap();
    assert_eq!(spm_of(&e).await, Some(h2));
    let qemu2 = c.qemu_pid(&h2_name, vm.id);
    let j = c.node(&h2_name);
    let pid2 = c.nodes[j].2.child.id() as i32;
    let frozen = Instant::now();
    let spm_watch = watch_spm_leaving(e.clone(), h2, frozen);
    // SAFETY: signalling the node process this test spawned.
    assert_eq!(unsafe { libc::kill(pid2, libc::SIGSTOP) }, 0);
    let (h3_name, up2, pass2) = wait_moved(&c, vm.id, h2, frozen).await;
    assert!(!alive(qemu2), "the frozen node's QEMU was killed by its watchdog");
    assert_ne!(h3_name, spm1_name);
    let spm_moved2 = spm_watch.await.expect("the SPM role left the frozen node");
    eprintln!(
        "BENCH SIGSTOP of the VM's node (also SPM): HA VM up on {h3_name} after {up2:?}, guest writing after {pass2:?}; SPM moved after {spm_moved2:?}"
    );

    // Never twice: at most one live QEMU ran the VM at any sampled moment, and the dead and
    // frozen nodes' guests wrote nothing more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sampler.max(), 1, "the VM ran in two QEMUs at once");
    assert_eq!(
        console_len(&old_console),
        frozen_len,
        "the killed node's guest kept writing"
    );
    assert_eq!(live_processes_with(&format!("vms/{}/", vm.id)).len(), 1);
    // Metadata intact.
    common::check_domains(&c.storage);
    // The frozen node, thawed, finds its lease expired and does not run the VM again.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid2, libc::SIGCONT) }, 0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(live_processes_with(&format!("vms/{}/", vm.id)).len(), 1);
    assert_eq!(sampler.max(), 1);

    // 3. Its QEMU crashes on a host that is up: the VM is restarted in place.
    let h3 = vm_host(&e, vm.id).await;
    let qemu3 = c.qemu_pid(&h3_name, vm.id);
    let crashed = Instant::now();
    // SAFETY: signalling a QEMU this test's node started.
    assert_eq!(unsafe { libc::kill(qemu3 as i32, libc::SIGKILL) }, 0);
    let back = loop {
        let v = db.vm_get(vm.id).await.unwrap().unwrap();
        let pid = c.qemu_pid_now(&h3_name, vm.id);
        if v.runtime.status == VmStatus::Up && pid.is_some_and(|p| p != qemu3 && alive(p)) {
            assert_eq!(v.runtime.run_on_host, Some(h3), "restarted in place");
            break crashed.elapsed();
        }
        assert!(
            crashed.elapsed() < Duration::from_secs(60),
            "the crashed VM did not come back in place: {} ({:?})",
            v.runtime.status,
            v.runtime.status_detail
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("BENCH QEMU killed on a live host: HA VM up again in place after {back:?}");
    assert_eq!(live_processes_with(&format!("vms/{}/", vm.id)).len(), 1);
    assert_eq!(sampler.max(), 1);
    drop(sampler);
    cmds.stop_vm(vm.id).await.unwrap();

    // 4. Removed, the VM gives its lease's slot in `xleases` back.
    let dom = oxvirt_storage::FileStorageDomain::open(&c.storage.join(sd.id.to_string())).unwrap();
    let lease_id = vm.id.to_string();
    assert!(
        dom.lookup_xlease(&lease_id).unwrap().is_some(),
        "no lease to give back"
    );
    cmds.remove_vm(vm.id, false, None).await.unwrap();
    assert!(
        dom.lookup_xlease(&lease_id).unwrap().is_none(),
        "the removed VM's lease slot is left in xleases"
    );
    e.shutdown().await;
}

/// A network namespace joined to the root one by a veth pair; removed on drop.
struct Netns {
    name: String,
    veth: String,
    root_ip: String,
    ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn create() -> Netns {
        oxvirt_testkit::require_tool("ip");
        let tag = std::process::id() % 200 + 20;
        let n = Netns {
            name: format!("oxha{tag}"),
            veth: format!("oxha{tag}r"),
            root_ip: format!("10.213.{tag}.1"),
            ns_ip: format!("10.213.{tag}.2"),
        };
        let peer = format!("oxha{tag}n");
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &n.name])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &n.veth])
            .output();
        ip(&["netns", "add", &n.name]);
        ip(&["link", "add", &n.veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &n.name]);
        ip(&["addr", "add", &format!("{}/24", n.root_ip), "dev", &n.veth]);
        ip(&["link", "set", &n.veth, "up"]);
        ip(&[
            "-n",
            &n.name,
            "addr",
            "add",
            &format!("{}/24", n.ns_ip),
            "dev",
            &peer,
        ]);
        ip(&["-n", &n.name, "link", "set", &peer, "up"]);
        ip(&["-n", &n.name, "link", "set", "lo", "up"]);
        n
    }

    /// Cuts the namespace off: the engine (and the other nodes) no longer reach it; storage,
    /// a directory, stays reachable.
    fn cut(&self) {
        ip(&["link", "set", &self.veth, "down"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A process killed on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// host3 lives in the namespace (the engine reaches it only through the veth) and has power
/// management: an agent that kills its node by pid (as cutting the power would); its QEMU is
/// then the watchdog's to kill. Answers the node process, its directory and its host row.
async fn node_in_netns_with_agent(
    ns: &Netns,
    e: &Arc<Engine>,
    cluster: &oxvirt_engine::model::Cluster,
) -> (Killed, tempfile::TempDir, oxvirt_engine::model::Host) {
    let d3 = tempfile::tempdir().unwrap();
    let token = e.enroll_token(Some(cluster.id), Duration::from_secs(300));
    let port = 20000 + (std::process::id() % 20000) as u16;
    let log = std::fs::File::create(d3.path().join("node.log")).unwrap();
    let node3 = Killed(
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                env!("CARGO_BIN_EXE_oxvirt"),
                "node",
                "--name",
                "host3",
            ])
            .args(["--listen", &format!("{}:{port}", ns.ns_ip), "--data"])
            .arg(d3.path().join("data"))
            .args([
                "--engine",
                &e.addr.to_string(),
                "--token",
                &token,
                "--accel",
                "tcg",
            ])
            .env("OXVIRT_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    allinone::wait_hosts_up(e, 3, Duration::from_secs(60))
        .await
        .unwrap();
    let host3 = e.app().db.host_get_by_name("host3").await.unwrap().unwrap();
    let pidfile = d3.path().join("node.pid");
    std::fs::write(&pidfile, node3.0.id().to_string()).unwrap();
    let agent = d3.path().join("fence-agent.sh");
    std::fs::write(
        &agent,
        r#"#!/bin/sh
pid=$(cat "$1")
alive() { st=$(awk '{print $3}' /proc/$pid/stat 2>/dev/null); [ -n "$st" ] && [ "$st" != Z ]; }
case "$2" in
  off) kill -9 "$pid" 2>/dev/null; exit 0;;
  status) alive && exit 0; exit 2;;
  on) exit 0;;
  *) exit 1;;
esac
"#,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    e.cmds
        .set_fence_agent(
            host3.id,
            Some(oxvirt_engine::fence::FenceAgent {
                command: vec![agent.display().to_string(), pidfile.display().to_string()],
            }),
        )
        .await
        .unwrap();
    (node3, d3, host3)
}

/// The SPM, with no VM at all, is cut from the engine but keeps its storage: it renews its
/// lease for ever, so only fencing lets the role move. The election fences it through its
/// agent (no HA VM asks for it) and the role moves once its lease is dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_spm_cut_from_the_engine_is_fenced_by_its_agent_and_the_role_moves() {
    let ns = Netns::create();
    let listen: std::net::SocketAddr = format!("{}:0", ns.root_ip).parse().unwrap();
    let mut c = start_cluster_at(2, common::fast_engine_settings(), &[], listen).await;
    let e = c.engine.clone();
    let db = &e.app().db;
    let cluster = db.cluster_get_by_name("Default").await.unwrap().unwrap();
    let (node3, _d3, host3) = node_in_netns_with_agent(&ns, &e, &cluster).await;
    attach_data_domain(&c, "host1").await;
    e.cmds.force_select_spm(host3.id).await.unwrap();
    assert_eq!(spm_of(&e).await, Some(host3.id));

    let cut = Instant::now();
    let spm_watch = watch_spm_leaving(e.clone(), host3.id, cut);
    ns.cut();
    let moved = spm_watch.await.expect("the SPM role left the cut host");
    let h3 = db.host_get(host3.id).await.unwrap().unwrap();
    assert_eq!(h3.status, HostStatus::Down, "{:?}", h3.status_detail);
    assert!(
        h3.status_detail.as_deref().unwrap_or("").contains("fenced"),
        "{:?}",
        h3.status_detail
    );
    let fenced = db
        .event_list(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|ev| ev.code == 9020 && ev.host_id == Some(host3.id))
        .count();
    assert_eq!(fenced, 1, "fenced once, not every monitoring round");
    eprintln!("BENCH SPM cut from the engine, fenced by its agent: role moved after {moved:?}");
    common::check_domains(&c.storage);
    e.shutdown().await;
    drop(node3);
    c.nodes.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ha_vm_of_a_node_cut_from_the_engine_comes_back_after_fencing_by_its_agent() {
    let ns = Netns::create();
    let listen: std::net::SocketAddr = format!("{}:0", ns.root_ip).parse().unwrap();
    let mut c = start_cluster_at(2, common::fast_engine_settings(), &[], listen).await;
    let e = c.engine.clone();
    let cmds = &e.cmds;
    let db = &e.app().db;
    let cluster = db.cluster_get_by_name("Default").await.unwrap().unwrap();

    let (node3, d3, host3) = node_in_netns_with_agent(&ns, &e, &cluster).await;
    let (_, sd) = attach_data_domain(&c, "host1").await;

    let vm = cmds
        .add_vm(
            AddVm {
                name: "havm".into(),
                description: String::new(),
                cluster: cluster.id,
                template: BLANK_TEMPLATE_ID,
                memory_bytes: Some(256 * MIB),
                cpu: None,
                os: common::cluster::guest_os(&["oxvirt.writer=8"]),
                ha: Some(HighAvailability {
                    enabled: true,
                    priority: 1,
                }),
                resume_behavior: None,
            },
            None,
        )
        .await
        .unwrap();
    cmds.add_disk(cow_disk("havm_disk", sd.id, 64 * MIB, Some((vm.id, true))), None)
        .await
        .unwrap();
    let sampler = TwiceSampler::start(vm.id);
    cmds.start_vm(
        vm.id,
        VmStartOptions {
            host: Some(host3.id),
            paused: false,
            run_once: None,
        },
        None,
    )
    .await
    .unwrap();
    let console3 = d3
        .path()
        .join("data/run/vms")
        .join(vm.id.to_string())
        .join("serial.log");
    oxvirt_testkit::wait_for_text(&console3, "OXVIRT-GUEST pass 0", Duration::from_secs(90)).unwrap();
    let qemu3: u32 = std::fs::read_to_string(
        d3.path()
            .join("data/run/vms")
            .join(vm.id.to_string())
            .join("qemu.pid"),
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();

    // host3 is the SPM too: cut from the engine, it keeps that role (and writes) until fenced.
    cmds.force_select_spm(host3.id).await.unwrap();
    assert_eq!(spm_of(&e).await, Some(host3.id));

    // Cut: host3 keeps its storage and keeps renewing, so its lease never frees by itself; the
    // engine fences it through the agent, then restarts the VM once the lease is dead.
    let cut = Instant::now();
    let spm_watch = watch_spm_leaving(e.clone(), host3.id, cut);
    ns.cut();
    let (name, up, pass) = wait_moved(&c, vm.id, host3.id, cut).await;
    assert_ne!(name, "host3");
    assert!(!alive(qemu3), "the fenced node's QEMU is gone");
    let h3 = db.host_get(host3.id).await.unwrap().unwrap();
    assert_eq!(h3.status, HostStatus::Down, "{:?}", h3.status_detail);
    let events = db
        .event_list(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|ev| ev.description.contains("fenced"))
        .count();
    assert!(events >= 1, "the fencing is recorded");
    let spm_moved = spm_watch.await.expect("the SPM role left the fenced host");
    eprintln!("BENCH node cut from the engine (also SPM), fenced by its agent: HA VM up on {name} after {up:?}, guest writing after {pass:?}; SPM moved after {spm_moved:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sampler.max(), 1, "the VM ran in two QEMUs at once");
    common::check_domains(&c.storage);
    drop(sampler);
    cmds.stop_vm(vm.id).await.unwrap();
    e.shutdown().await;
    drop(node3);
    c.nodes.clear();
}
