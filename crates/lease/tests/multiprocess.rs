//! Several OS processes contend for leases in real files with O_DIRECT I/O, and a holder is
//! killed with SIGKILL. The test binary re-executes itself; `OXVIRT_LEASE_CHILD` selects the
//! child's role (see `child_entry`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxvirt_lease::lockspace::AcquireOptions;
use oxvirt_lease::{direct, HostStatus, LeaseError, Lockspace, LockspaceConfig, OwnerWait, SystemClock};

const MIB: u64 = 1024 * 1024;
const N: Duration = Duration::from_secs(1);
const M: Duration = Duration::from_secs(1);

fn config(host_id: u64) -> LockspaceConfig {
    let mut c = LockspaceConfig::new(
        "LS",
        host_id,
        &format!("proc-{host_id}-{}", std::process::id()),
        N,
    );
    c.fence_margin = M;
    c
}

fn wall() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn env_path(k: &str) -> PathBuf {
    PathBuf::from(std::env::var(k).unwrap_or_else(|_| panic!("{k} not set")))
}

fn env_u64(k: &str) -> u64 {
    std::env::var(k)
        .unwrap_or_else(|_| panic!("{k} not set"))
        .parse()
        .unwrap()
}

/// Child roles; a no-op when run as a normal test.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var("OXVIRT_LEASE_CHILD") else {
        return;
    };
    let code = match role.as_str() {
        "contend" => contend(),
        "hold" => hold(),
        other => panic!("unknown child role {other}"),
    };
    std::process::exit(code);
}

/// Acquires the resource again and again until the deadline, logging each holding; one that
/// has not held it by then goes on until it has (the others have stopped contending), up to a
/// hard limit. The algorithm promises no fairness among contenders, so on a loaded machine a
/// process may lose every round of the run; it must still get the lease once it is free.
fn contend() -> i32 {
    let (ids, leases, log) = (env_path("IDS"), env_path("LEASES"), env_path("LOG"));
    let host = env_u64("HOST_ID");
    let until = Instant::now() + Duration::from_millis(env_u64("RUN_MS"));
    let hard_limit = until + Duration::from_secs(60);
    let ls = Lockspace::acquire(&ids, 0, config(host), Arc::new(SystemClock)).unwrap();
    let mut out = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let mut held = 0;
    while Instant::now() < until || (held == 0 && Instant::now() < hard_limit) {
        match ls.acquire_resource(&leases, MIB, "SDM", AcquireOptions::default()) {
            Ok(lease) => {
                assert!(lease.is_valid());
                out.write_all(format!("S {host} {} {:.6}\n", lease.lver(), wall()).as_bytes())
                    .unwrap();
                std::thread::sleep(Duration::from_millis(60 + 20 * host));
                out.write_all(format!("E {host} {} {:.6}\n", lease.lver(), wall()).as_bytes())
                    .unwrap();
                lease.release().unwrap();
                held += 1;
            }
            Err(LeaseError::OwnedByOther { .. }) | Err(LeaseError::Contended { .. }) => {}
            Err(e) => panic!("host {host}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    ls.release().unwrap();
    if held > 0 {
        0
    } else {
        3
    }
}

/// Takes host id HOST_ID and the resource, says so on stdout, and holds them until killed.
fn hold() -> i32 {
    let (ids, leases) = (env_path("IDS"), env_path("LEASES"));
    let ls = Lockspace::acquire(&ids, 0, config(env_u64("HOST_ID")), Arc::new(SystemClock)).unwrap();
    let lease = ls
        .acquire_resource(&leases, MIB, "SDM", AcquireOptions::default())
        .unwrap();
    println!("HOLDING {}", lease.lver());
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        assert!(lease.is_valid());
    }
}

fn spawn(role: &str, ids: &Path, leases: &Path, host: u64, extra: &[(&str, String)]) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "child_entry", "--nocapture", "--test-threads", "1"])
        .env("OXVIRT_LEASE_CHILD", role)
        .env("IDS", ids)
        .env("LEASES", leases)
        .env("HOST_ID", host.to_string())
        .stdout(Stdio::piped());
    for (k, v) in extra {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn lease_files(dir: &Path) -> (PathBuf, PathBuf) {
    let ids = dir.join("ids");
    let leases = dir.join("leases");
    std::fs::write(&ids, b"").unwrap();
    std::fs::write(&leases, b"").unwrap();
    direct::init_lockspace(&ids, 0, "LS", 1).unwrap();
    direct::init_resource(&leases, MIB, "LS", "SDM").unwrap();
    (ids, leases)
}

#[test]
fn processes_contending_never_hold_the_resource_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, leases) = lease_files(dir.path());
    let log = dir.path().join("holds.log");
    std::fs::write(&log, b"").unwrap();
    let children: Vec<Child> = (1..=4)
        .map(|h| {
            spawn(
                "contend",
                &ids,
                &leases,
                h,
                &[("LOG", log.display().to_string()), ("RUN_MS", "6000".into())],
            )
        })
        .collect();
    for mut c in children {
        let status = c.wait().unwrap();
        assert!(
            status.success(),
            "a contender failed or never held the lease: {status}"
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let mut holds: Vec<(f64, f64, u64, u64)> = Vec::new();
    let mut open: std::collections::HashMap<u64, (f64, u64)> = Default::default();
    for l in text.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let (host, lver, t): (u64, u64, f64) = (
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
            f[3].parse().unwrap(),
        );
        if f[0] == "S" {
            assert!(open.insert(host, (t, lver)).is_none());
        } else {
            let (s, lv) = open.remove(&host).unwrap();
            assert_eq!(lv, lver);
            holds.push((s, t, host, lver));
        }
    }
    holds.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    assert!(holds.len() >= 8, "too little contention: {holds:?}");
    for w in holds.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlapping holders: {:?} and {:?}", w[0], w[1]);
        assert!(w[0].3 < w[1].3, "lver did not grow: {:?} then {:?}", w[0], w[1]);
    }
    let hosts: std::collections::HashSet<u64> = holds.iter().map(|h| h.2).collect();
    assert_eq!(hosts.len(), 4, "every process held the lease at least once");
    // Every contender released its host id on exit.
    for e in direct::read_lockspace(&ids, 0).unwrap().iter().take(4) {
        assert_eq!(
            e.record.as_ref().unwrap().timestamp,
            0,
            "host {} not released",
            e.host_id
        );
    }
}

#[test]
fn kill_9_of_the_holder_lets_another_host_take_over_after_8n_plus_margin() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, leases) = lease_files(dir.path());
    let mut holder = spawn("hold", &ids, &leases, 1, &[]);
    let ls = Lockspace::acquire(&ids, 0, config(2), Arc::new(SystemClock)).unwrap();
    // The child's stdout also carries the test harness's own output; read it on a thread
    // (keeping the pipe open) so a stuck child fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = holder.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(i) = line.find("HOLDING ") {
                let _ = tx.send(line[i + 8..].trim().parse::<u64>().unwrap());
            }
        }
    });
    let held_lver = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the holder did not report holding the lease");
    // Wait until we have seen the holder renew.
    let deadline = Instant::now() + Duration::from_secs(15);
    while ls.host_status(1) != HostStatus::Live {
        assert!(Instant::now() < deadline, "holder never seen alive");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(matches!(
        ls.acquire_resource(&leases, MIB, "SDM", AcquireOptions::default()),
        Err(LeaseError::OwnedByOther { host_id: 1, .. })
    ));

    // SAFETY: kill(2) on the pid of our own child.
    assert_eq!(unsafe { libc::kill(holder.id() as i32, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    holder.wait().unwrap();
    let lease = ls
        .acquire_resource(
            &leases,
            MIB,
            "SDM",
            AcquireOptions {
                wait: OwnerWait::Watch(Duration::from_secs(60)),
                ..AcquireOptions::default()
            },
        )
        .unwrap();
    let took = killed.elapsed();
    eprintln!("takeover {took:?} after kill -9 (8N + M = {:?})", 8 * N + M);
    // The holder's last renewal was at most 2N before the kill, and while watching we see a
    // renewal within N/4 of it: takeover lies within [8N + M - 2N, 8N + M + N/4], plus I/O and
    // scheduling time on a loaded machine.
    assert!(took >= 8 * N + M - 2 * N, "took over too early: {took:?}");
    assert!(
        took <= 8 * N + M + Duration::from_secs(3),
        "took over too late: {took:?}"
    );
    assert!(lease.lver() > held_lver);
    // The renewal thread's view saw the holder's last renewal up to 2N after the kill, so it
    // calls the holder dead within 2N of the takeover.
    let deadline = Instant::now() + 2 * N + Duration::from_secs(3);
    while ls.host_status(1) != HostStatus::Dead {
        assert!(
            Instant::now() < deadline,
            "holder not seen dead: {:?}",
            ls.host_status(1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lease.release().unwrap();
    ls.release().unwrap();
}
