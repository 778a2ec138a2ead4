//! Lease timings against their formulas and against bare `sanlock direct`, on real files.
//!
//! ```text
//! cargo run --release -p oxvirt-lease --example lease_bench -- [--io-timeouts 1,10] [--fence-margin 2] [--takeovers 3]
//! ```
//!
//! For each io_timeout N: time to acquire a free host id (formula 2N) and a free resource (no
//! wait, six I/Os), then the time until another host, watching the resource
//! (`OwnerWait::Watch`) from right after the kill, takes it over once its holder's process was
//! killed with SIGKILL (formula 8N + max(M, N), counted from when the watcher starts). `sanlock direct acquire_id` and `sanlock direct acquire` are timed in the same
//! run on the same files. The holder runs in a child process (this example re-executed).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxvirt_lease::lockspace::AcquireOptions;
use oxvirt_lease::{direct, HostStatus, Lockspace, LockspaceConfig, OwnerWait, SystemClock};

const MIB: u64 = 1024 * 1024;

fn config(host_id: u64, n: u64, m: u64) -> LockspaceConfig {
    let mut c = LockspaceConfig::new(
        "BENCH",
        host_id,
        &format!("bench-{host_id}-{}", std::process::id()),
        Duration::from_secs(n),
    );
    c.fence_margin = Duration::from_secs(m);
    c
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn files(dir: &Path, n: u64) -> (PathBuf, PathBuf) {
    let ids = dir.join(format!("ids-{n}"));
    let leases = dir.join(format!("leases-{n}"));
    std::fs::write(&ids, b"").unwrap();
    std::fs::write(&leases, b"").unwrap();
    direct::init_lockspace(&ids, 0, "BENCH", n as u16).unwrap();
    direct::init_resource(&leases, MIB, "BENCH", "SDM").unwrap();
    (ids, leases)
}

fn sanlock_bin() -> Option<PathBuf> {
    ["/usr/sbin/sanlock", "/usr/bin/sanlock"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn sanlock_time(bin: &Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new(bin)
        .args(args)
        .env("SANLOCK_PRIVILEGED", "0")
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "sanlock {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Child role: hold host id `host` and the resource until killed.
fn hold(ids: &Path, leases: &Path, host: u64, n: u64, m: u64) -> ! {
    let ls = Lockspace::acquire(ids, 0, config(host, n, m), Arc::new(SystemClock)).unwrap();
    let lease = ls
        .acquire_resource(leases, MIB, "SDM", AcquireOptions::default())
        .unwrap();
    println!("HOLDING {}", lease.lver());
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if std::env::var("LEASE_BENCH_CHILD").is_ok() {
        let n = arg(&args, "--n", "1").parse().unwrap();
        let m = arg(&args, "--m", "2").parse().unwrap();
        hold(
            Path::new(&arg(&args, "--ids", "")),
            Path::new(&arg(&args, "--leases", "")),
            arg(&args, "--host", "2").parse().unwrap(),
            n,
            m,
        );
    }
    let ns: Vec<u64> = arg(&args, "--io-timeouts", "1,10")
        .split(',')
        .map(|s| s.parse().expect("io timeout in seconds"))
        .collect();
    let m: u64 = arg(&args, "--fence-margin", "2").parse().unwrap();
    let takeovers: usize = arg(&args, "--takeovers", "3").parse().unwrap();
    let base = std::env::temp_dir().join(format!("lease-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    let sanlock = sanlock_bin();
    println!("| N | measurement | oxvirt-lease | formula | bare sanlock | ratio |");
    println!("|---|---|---|---|---|---|");
    for &n in &ns {
        let (ids, leases) = files(&base, n);
        let nd = Duration::from_secs(n);

        let t = Instant::now();
        let ls = Lockspace::acquire(&ids, 0, config(1, n, m), Arc::new(SystemClock)).unwrap();
        let host_id = t.elapsed();
        let t = Instant::now();
        let lease = ls
            .acquire_resource(&leases, MIB, "SDM", AcquireOptions::default())
            .unwrap();
        let resource = t.elapsed();
        lease.release().unwrap();

        let (s_host, s_res) = match &sanlock {
            Some(bin) => {
                let h = sanlock_time(
                    bin,
                    &[
                        "direct",
                        "acquire_id",
                        "-o",
                        &n.to_string(),
                        "-s",
                        &format!("BENCH:5:{}:0", ids.display()),
                    ],
                );
                let r = sanlock_time(
                    bin,
                    &[
                        "direct",
                        "acquire",
                        "-i",
                        "5",
                        "-g",
                        "1",
                        "-r",
                        &format!("BENCH:SDM:{}:{MIB}", leases.display()),
                    ],
                );
                // Free what sanlock took so the takeover below starts from a clean lease.
                let l = direct::read_paxos_leader(&leases, MIB, "BENCH", "SDM").unwrap();
                sanlock_time(
                    bin,
                    &[
                        "direct",
                        "release_id",
                        "-s",
                        &format!("BENCH:5:{}:0", ids.display()),
                    ],
                );
                assert_eq!(l.owner_id, 5);
                (Some(h), Some(r))
            }
            None => (None, None),
        };
        let ratio = |ours: Duration, theirs: Option<Duration>| {
            theirs.map_or("-".into(), |t| {
                format!("{:.2}", ours.as_secs_f64() / t.as_secs_f64())
            })
        };
        println!(
            "| {n} s | acquire free host id | {} | 2N = {} | {} | {} |",
            secs(host_id),
            secs(2 * nd),
            s_host.map_or("-".into(), secs),
            ratio(host_id, s_host)
        );
        println!(
            "| {n} s | acquire free resource | {} | 6 I/Os, no wait | {} | {} |",
            secs(resource),
            s_res.map_or("-".into(), secs),
            ratio(resource, s_res)
        );

        let mut results = Vec::new();
        for run in 0..takeovers {
            // Each holder is a new host with its own host id (a dead host's id is only reused
            // after its own 8N + M wait).
            let holder = 10 + run as u64;
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--n",
                    &n.to_string(),
                    "--m",
                    &m.to_string(),
                    "--host",
                    &holder.to_string(),
                ])
                .args([
                    "--ids",
                    &ids.display().to_string(),
                    "--leases",
                    &leases.display().to_string(),
                ])
                .env("LEASE_BENCH_CHILD", "1")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert!(line.starts_with("HOLDING"), "holder said {line:?}");
            while ls.host_status(holder) != HostStatus::Live {
                std::thread::sleep(Duration::from_millis(100));
            }
            // Kill at a random point of the holder's renewal cycle.
            std::thread::sleep(Duration::from_millis(
                (std::process::id() as u64 * 7919 + results.len() as u64 * 104_729) % (2000 * n),
            ));
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let killed = Instant::now();
            child.wait().unwrap();
            let lease = ls
                .acquire_resource(
                    &leases,
                    MIB,
                    "SDM",
                    AcquireOptions {
                        wait: OwnerWait::Watch(Duration::from_secs(20 * n + 120)),
                        ..AcquireOptions::default()
                    },
                )
                .unwrap();
            results.push(killed.elapsed());
            lease.release().unwrap();
        }
        results.sort();
        let min = results.first().copied().unwrap_or_default();
        let max = results.last().copied().unwrap_or_default();
        let mean = results.iter().sum::<Duration>() / results.len().max(1) as u32;
        println!(
            "| {n} s | takeover after kill -9 of the holder ({} runs, M = {m} s) | mean {} (min {}, max {}) | 8N + max(M, N) = {} | sanlock's formula 8N + 60 = {} | {:.2} |",
            results.len(),
            secs(mean),
            secs(min),
            secs(max),
            secs(8 * nd + Duration::from_secs(m).max(nd)),
            secs(8 * nd + Duration::from_secs(60)),
            mean.as_secs_f64() / (8 * nd + Duration::from_secs(60)).as_secs_f64()
        );
        ls.release().unwrap();
    }
    let _ = std::fs::remove_dir_all(&base);
}
