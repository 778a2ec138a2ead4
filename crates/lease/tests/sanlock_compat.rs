//! Compatibility with the real sanlock 3.8 (`/usr/sbin/sanlock`, run unprivileged): what we
//! write, sanlock reads and acquires; what sanlock writes, we read and acquire; a sanlock daemon
//! and our implementation contend for one resource and never hold it at once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxvirt_lease::direct;
use oxvirt_lease::lockspace::AcquireOptions;
use oxvirt_lease::{HostStatus, LeaseError, Lockspace, LockspaceConfig, SystemClock};

const MIB: u64 = 1024 * 1024;

fn sanlock(args: &[&str]) -> Output {
    let bin = oxvirt_testkit::require_tool("sanlock");
    Command::new(bin)
        .args(args)
        .env("SANLOCK_PRIVILEGED", "0")
        .output()
        .expect("run sanlock")
}

fn sanlock_ok(args: &[&str]) -> String {
    let out = sanlock(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "sanlock {args:?} failed: {text}");
    text
}

fn touch(p: &Path) {
    std::fs::write(p, b"").unwrap();
}

fn config(host_id: u64) -> LockspaceConfig {
    let mut c = LockspaceConfig::new(
        "LS",
        host_id,
        &format!("oxvirt-host-{host_id}"),
        Duration::from_secs(1),
    );
    c.fence_margin = Duration::from_secs(1);
    c
}

fn field(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .trim()
        .to_string()
}

#[test]
fn init_is_byte_identical_to_sanlock_direct_init() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours");
    let theirs = dir.path().join("theirs");
    touch(&ours);
    touch(&theirs);
    direct::init_lockspace(&ours, 0, "3f1c2a9e-5b1d-4c53-9e4a-0c1b2d3e4f50", 10).unwrap();
    sanlock_ok(&[
        "direct",
        "init",
        "-s",
        &format!("3f1c2a9e-5b1d-4c53-9e4a-0c1b2d3e4f50:0:{}:0", theirs.display()),
    ]);
    direct::init_resource(&ours, MIB, "3f1c2a9e-5b1d-4c53-9e4a-0c1b2d3e4f50", "SDM").unwrap();
    sanlock_ok(&[
        "direct",
        "init",
        "-r",
        &format!(
            "3f1c2a9e-5b1d-4c53-9e4a-0c1b2d3e4f50:SDM:{}:{MIB}",
            theirs.display()
        ),
    ]);
    let a = std::fs::read(&ours).unwrap();
    let b = std::fs::read(&theirs).unwrap();
    assert_eq!(a.len(), 2 * MIB as usize);
    assert_eq!(a.len(), b.len());
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "lease areas differ");

    // io_timeout other than the default lands in every delta lease.
    let ours1 = dir.path().join("ours1");
    let theirs1 = dir.path().join("theirs1");
    touch(&ours1);
    touch(&theirs1);
    direct::init_lockspace(&ours1, 0, "LS", 1).unwrap();
    sanlock_ok(&[
        "direct",
        "init",
        "-o",
        "1",
        "-s",
        &format!("LS:0:{}:0", theirs1.display()),
    ]);
    assert_eq!(std::fs::read(&ours1).unwrap(), std::fs::read(&theirs1).unwrap());
}

#[test]
fn sanlock_reads_and_acquires_what_we_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids");
    let leases = dir.path().join("leases");
    touch(&ids);
    touch(&leases);
    direct::init_lockspace(&ids, 0, "LS", 1).unwrap();
    direct::init_resource(&leases, MIB, "LS", "SDM").unwrap();

    let ls = Lockspace::acquire(&ids, 0, config(3), Arc::new(SystemClock)).unwrap();
    let lease = ls
        .acquire_resource(&leases, MIB, "SDM", AcquireOptions::default())
        .unwrap();
    assert_eq!(lease.lver(), 1);

    // sanlock verifies magic, version, names and checksum of our records.
    let delta = sanlock_ok(&[
        "direct",
        "read_leader",
        "-s",
        &format!("LS:3:{}:0", ids.display()),
    ]);
    assert!(delta.contains("read_leader done 0"), "{delta}");
    assert_eq!(field(&delta, "owner_id"), "3");
    assert_eq!(field(&delta, "owner_generation"), "1");
    assert_eq!(field(&delta, "resource_name"), "oxvirt-host-3");
    assert_eq!(field(&delta, "io_timeout"), "1");
    let leader = sanlock_ok(&[
        "direct",
        "read_leader",
        "-r",
        &format!("LS:SDM:{}:{MIB}", leases.display()),
    ]);
    assert!(leader.contains("read_leader done 0"), "{leader}");
    assert_eq!(field(&leader, "owner_id"), "3");
    assert_eq!(field(&leader, "lver"), "1");
    assert_eq!(field(&leader, "write_id"), "3");
    let dump = sanlock_ok(&["direct", "dump", &format!("{}:1M", leases.display())]);
    let line = dump
        .lines()
        .find(|l| l.contains("SDM"))
        .expect("resource in dump");
    assert!(line.trim_end().ends_with("0003 0001 1"), "{dump}");
    let dump = sanlock_ok(&["direct", "dump", &ids.display().to_string()]);
    assert!(dump.contains("oxvirt-host-3"), "{dump}");

    // After our release sanlock (host id 5, which it takes first) acquires the resource
    // (lver 2) and we see it as the owner.
    lease.release().unwrap();
    sanlock_ok(&[
        "direct",
        "acquire_id",
        "-o",
        "1",
        "-s",
        &format!("LS:5:{}:0", ids.display()),
    ]);
    let out = sanlock_ok(&[
        "direct",
        "acquire",
        "-i",
        "5",
        "-g",
        "1",
        "-r",
        &format!("LS:SDM:{}:{MIB}", leases.display()),
    ]);
    assert!(out.contains("acquire done 0"), "{out}");
    let l = direct::read_paxos_leader(&leases, MIB, "LS", "SDM").unwrap();
    assert_eq!((l.owner_id, l.owner_generation, l.lver, l.write_id), (5, 1, 2, 5));
    match ls.acquire_resource(&leases, MIB, "SDM", AcquireOptions::default()) {
        Err(LeaseError::OwnedByOther {
            host_id,
            generation,
            lver,
            ..
        }) => assert_eq!((host_id, generation, lver), (5, 1, 2)),
        other => panic!("expected OwnedByOther, got {other:?}"),
    }
    // Once sanlock's host 5 frees its host id, its lease may be taken at once.
    sanlock_ok(&["direct", "release_id", "-s", &format!("LS:5:{}:0", ids.display())]);
    let lease = ls
        .acquire_resource(&leases, MIB, "SDM", AcquireOptions::default())
        .unwrap();
    assert_eq!(lease.lver(), 3);
    lease.release().unwrap();
    ls.release().unwrap();
    let after = direct::read_delta_leader(&ids, 0, "LS", 3).unwrap();
    assert_eq!(after.timestamp, 0, "release frees the host id");
}

#[test]
fn we_read_and_acquire_what_sanlock_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids");
    let leases = dir.path().join("leases");
    touch(&ids);
    touch(&leases);
    sanlock_ok(&[
        "direct",
        "init",
        "-o",
        "1",
        "-s",
        &format!("LS:0:{}:0", ids.display()),
    ]);
    sanlock_ok(&[
        "direct",
        "init",
        "-r",
        &format!("LS:SDM:{}:{MIB}", leases.display()),
    ]);

    // sanlock takes host id 2 (one shot, nobody renews it afterwards).
    let start = Instant::now();
    sanlock_ok(&[
        "direct",
        "acquire_id",
        "-o",
        "1",
        "-s",
        &format!("LS:2:{}:0", ids.display()),
    ]);
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "sanlock waits 2N for a free host id"
    );
    let rec = direct::read_delta_leader(&ids, 0, "LS", 2).unwrap();
    assert_eq!((rec.owner_id, rec.owner_generation, rec.io_timeout), (2, 1, 1));
    let sanlock_name = rec.resource_name.to_string();
    assert!(!sanlock_name.is_empty());

    let ls = Lockspace::acquire(&ids, 0, config(1), Arc::new(SystemClock)).unwrap();
    let obs = ls.host_observation(2).expect("first look at the lockspace");
    assert_eq!(obs.owner_name.to_string(), sanlock_name);
    assert_eq!(ls.host_status(2), HostStatus::Unknown, "no change seen yet");
    assert_eq!(ls.host_status(7), HostStatus::Free);

    let lease = ls
        .acquire_resource(&leases, MIB, "SDM", AcquireOptions::default())
        .unwrap();
    assert_eq!(lease.lver(), 1);
    let dump = sanlock_ok(&["direct", "dump", &format!("{}:1M", leases.display())]);
    assert!(
        dump.lines()
            .any(|l| l.contains("SDM") && l.trim_end().ends_with("0001 0001 1")),
        "{dump}"
    );
    lease.release().unwrap();
    let l = direct::read_paxos_leader(&leases, MIB, "LS", "SDM").unwrap();
    assert_eq!(l.timestamp, 0, "released leader is free");
    ls.release().unwrap();

    // A record sanlock would reject, we reject too.
    let mut bytes = std::fs::read(&ids).unwrap();
    bytes[512 + 60] ^= 0xff; // host 2's lockspace name
    std::fs::write(&ids, &bytes).unwrap();
    assert!(matches!(
        direct::read_delta_leader(&ids, 0, "LS", 2),
        Err(LeaseError::BadRecord { .. })
    ));
    let out = sanlock(&[
        "direct",
        "read_leader",
        "-s",
        &format!("LS:2:{}:0", ids.display()),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("read_leader done 0"), "{text}");
}

/// A sanlock daemon in its own run directory; shut down on drop.
struct Daemon {
    run_dir: PathBuf,
    child: std::process::Child,
}

impl Daemon {
    fn start(run_dir: &Path) -> Daemon {
        std::fs::create_dir_all(run_dir).unwrap();
        let child = Command::new(oxvirt_testkit::require_tool("sanlock"))
            .args(["daemon", "-D", "-w", "0", "-l", "0", "-U", "root", "-G", "root"])
            .env("SANLOCK_PRIVILEGED", "0")
            .env("SANLOCK_RUN_DIR", run_dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(run_dir.join("daemon.log")).unwrap())
            .spawn()
            .expect("start sanlock daemon");
        let d = Daemon {
            run_dir: run_dir.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.client(&["status"]).status.success() {
            assert!(Instant::now() < deadline, "sanlock daemon did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    fn client(&self, args: &[&str]) -> Output {
        Command::new(oxvirt_testkit::require_tool("sanlock"))
            .arg("client")
            .args(args)
            .env("SANLOCK_PRIVILEGED", "0")
            .env("SANLOCK_RUN_DIR", &self.run_dir)
            .output()
            .expect("run sanlock client")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.client(&["shutdown", "-f", "1"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wall() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn sanlock_daemon_and_we_never_hold_the_resource_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids");
    let leases = dir.path().join("leases");
    touch(&ids);
    touch(&leases);
    direct::init_lockspace(&ids, 0, "LS", 1).unwrap();
    direct::init_resource(&leases, MIB, "LS", "SDM").unwrap();

    let daemon = Daemon::start(&dir.path().join("run"));
    let ls_spec = format!("LS:2:{}:0", ids.display());
    let out = daemon.client(&["add_lockspace", "-o", "1", "-s", &ls_spec]);
    assert!(
        out.status.success(),
        "add_lockspace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ls = Lockspace::acquire(&ids, 0, config(1), Arc::new(SystemClock)).unwrap();

    let log = dir.path().join("sanlock-holds.log");
    let res_spec = format!("LS:SDM:{}:{MIB}", leases.display());
    let script = format!(
        "echo start $(date +%s.%N) >> {log}; sleep 0.4; echo end $(date +%s.%N) >> {log}",
        log = log.display()
    );
    let stop_at = Instant::now() + Duration::from_secs(14);
    let sanlock_side = {
        let run_dir = daemon.run_dir.clone();
        std::thread::spawn(move || {
            let (mut ok, mut refused) = (0, 0);
            while Instant::now() < stop_at {
                let out = Command::new(oxvirt_testkit::require_tool("sanlock"))
                    .args([
                        "client", "command", "-r", &res_spec, "-c", "/bin/sh", "-c", &script,
                    ])
                    .env("SANLOCK_PRIVILEGED", "0")
                    .env("SANLOCK_RUN_DIR", &run_dir)
                    .output()
                    .unwrap();
                if out.status.success() {
                    ok += 1;
                } else {
                    refused += 1;
                }
                std::thread::sleep(Duration::from_millis(150));
            }
            (ok, refused)
        })
    };
    let mut ours = Vec::new();
    let mut refused = 0;
    let mut lvers = Vec::new();
    while Instant::now() < stop_at {
        match ls.acquire_resource(&leases, MIB, "SDM", AcquireOptions::default()) {
            Ok(lease) => {
                let start = wall();
                lvers.push(lease.lver());
                std::thread::sleep(Duration::from_millis(400));
                let end = wall();
                lease.release().unwrap();
                ours.push((start, end));
            }
            Err(LeaseError::OwnedByOther { host_id, .. }) => {
                assert_eq!(host_id, 2, "only the sanlock host competes");
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (sanlock_ok_count, sanlock_refused) = sanlock_side.join().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut theirs = Vec::new();
    let mut start = None;
    for l in text.lines() {
        let (kind, t) = l.split_once(' ').unwrap();
        let t: f64 = t.parse().unwrap();
        match kind {
            "start" => start = Some(t),
            _ => theirs.push((start.take().unwrap(), t)),
        }
    }
    eprintln!(
        "we held {} times (refused {refused}), sanlock held {} times (refused {sanlock_refused})",
        ours.len(),
        theirs.len()
    );
    assert!(
        ours.len() >= 2 && theirs.len() >= 2,
        "both sides must have held the lease: ours {ours:?} theirs {theirs:?}"
    );
    assert!(
        refused > 0 && sanlock_refused > 0,
        "both sides must have been refused while the other held it"
    );
    assert_eq!(sanlock_ok_count, theirs.len());
    for (a0, a1) in &ours {
        for (b0, b1) in &theirs {
            assert!(a1 < b0 || b1 < a0, "overlap: ours {a0}..{a1}, sanlock {b0}..{b1}");
        }
    }
    assert!(lvers.windows(2).all(|w| w[0] < w[1]), "lver grows: {lvers:?}");
    let _ = daemon.client(&["rem_lockspace", "-s", &ls_spec]);
    ls.release().unwrap();
}
