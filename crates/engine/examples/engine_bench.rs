//! Engine benchmark (issue 8): the engine's memory with N VMs in its database, the time to
//! list 10,000 VMs through `Db::vm_list`, and the time of an engine backup with them, on SQLite
//! and on PostgreSQL.
//!
//! ```text
//! cargo run --release -p oxvirt-engine --example engine_bench -- [--vms 1000] [--list 10000] [--pg URL]
//! ```
//!
//! Memory: a child process opens the database as the engine does (pools, migrations check) and
//! lists every VM with its typed model, then reports its peak RSS (`VmHWM`); the bare tool
//! (`sqlite3` or `psql`) printing the same `SELECT * FROM vms` is measured by `wait4`'s
//! `ru_maxrss`. The driver process never opens the database, so what a spawned child inherits
//! in `ru_maxrss` from it (about 3 MiB) stays below both figures.
//! Listing: median of 7 interleaved runs of `vm_list` over all VMs, against the bare driver (`sqlx`
//! `fetch_all` of `SELECT * FROM vms` on the same pool, no decoding into the model).
//! Backup: median of 5 interleaved runs of `backup::backup` (database and PKI into one tar)
//! against the bare tools doing the same job (`sqlite3 .backup` or `pg_dump -Fc`, then `tar` of
//! the copy and the PKI). Without `--pg`, only SQLite runs; `--pg` takes a server URL (e.g. `OXVIRT_TEST_PG_URL` from
//! `eval "$(scripts/pg-test.sh start)"`) and uses a fresh schema in it.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use oxvirt_engine::db::{ListQuery, VmFilter, VmSort};
use oxvirt_engine::model::*;
use oxvirt_engine::Db;
use sqlx::Connection;

#[path = "seed/mod.rs"]
mod seed;
use seed::seed;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Runs a command to completion and returns its peak RSS in KiB.
fn peak_rss_kib(cmd: &mut Command) -> u64 {
    #[allow(clippy::zombie_processes)] // reaped by the wait4 below, which also gives its rusage
    let child = cmd
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut status = 0;
    // SAFETY: rusage is plain data, zero-initialised; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32, "wait4 failed");
    let st = std::process::ExitStatus::from_raw(status);
    assert!(st.success(), "{cmd:?} failed: {st}");
    ru.ru_maxrss as u64
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Seeds VMs `from..to` into the database at `url`, creating the data center, cluster and
/// storage domain on first use.
async fn seed_cmd(url: &str, from: usize, to: usize) {
    let db = Db::connect(url).await.unwrap();
    let dc = match db.dc_get_by_name("bench").await.unwrap() {
        Some(d) => d,
        None => db.dc_insert(&DataCenter::new("bench")).await.unwrap(),
    };
    let cl = match db.cluster_get_by_name("bench").await.unwrap() {
        Some(c) => c,
        None => db.cluster_insert(&Cluster::new("bench", dc.id)).await.unwrap(),
    };
    let sd = match db.sd_get_by_name("bench").await.unwrap() {
        Some(s) => s,
        None => db
            .sd_insert(&StorageDomain::new(
                "bench",
                SdType::Data,
                StorageType::Localfs,
                "/srv/bench",
            ))
            .await
            .unwrap(),
    };
    let t0 = Instant::now();
    seed(&db, from, to, cl.id, sd.id).await;
    eprintln!("seeded VMs {from}..{to} in {:?}", t0.elapsed());
    db.close().await;
}

/// What the engine does to serve `GET /vms`: open the database, list every VM.
async fn rss_cmd(url: &str) {
    let db = Db::connect(url).await.unwrap();
    let vms = db.vm_list(&ListQuery::new()).await.unwrap();
    println!("{} {}", vms.len(), status_kib("VmHWM:"));
}

async fn time_cmd(label: &str, url: &str, list: usize) {
    let db = Db::connect(url).await.unwrap();
    let q = ListQuery::filtered(VmFilter::default()).sort_by(VmSort::Name, oxvirt_engine::db::SortDir::Asc);
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(url).await.unwrap();
    // Interleaved, so that load from elsewhere on the machine hits both alike.
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let t = Instant::now();
        let v = db.vm_list(&q).await.unwrap();
        ours.push(t.elapsed());
        assert_eq!(v.len(), list);
        let t = Instant::now();
        let rows = sqlx::query("SELECT * FROM vms ORDER BY name, id")
            .fetch_all(&mut c)
            .await
            .unwrap();
        raw.push(t.elapsed());
        assert_eq!(rows.len(), list);
    }
    let (o, r) = (median(ours), median(raw));
    println!(
        "| {label} | list {list} VMs (`vm_list`, sorted by name) | {:.1} ms | bare sqlx `fetch_all` {:.1} ms | {:.2}x |",
        o.as_secs_f64() * 1e3,
        r.as_secs_f64() * 1e3,
        o.as_secs_f64() / r.as_secs_f64()
    );
    db.close().await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn run_self(args: &[&str]) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Memory and listing for one backend. The driver (this process) never opens the database, so
/// its small footprint is all the children inherit in `ru_maxrss`.
fn bench(label: &str, url: &str, mut bare: Command, vms: usize, list: usize) {
    run_self(&["--seed", url, "0", &vms.to_string()]);
    let exe = std::env::current_exe().unwrap();
    let out = run_self(&["--rss", url]);
    let mut it = out.split_whitespace();
    let (n, hwm): (usize, u64) = (
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap().parse().unwrap(),
    );
    assert_eq!(n, vms);
    let ours_ru = peak_rss_kib(Command::new(&exe).args(["--rss", url]));
    let theirs = peak_rss_kib(&mut bare);
    let driver = status_kib("VmHWM:");
    println!(
        "| {label} | engine peak RSS, {vms} VMs listed | {:.1} MiB | bare `{}` {:.1} MiB | {:.2}x |",
        hwm as f64 / 1024.0,
        bare.get_program().to_string_lossy(),
        theirs as f64 / 1024.0,
        hwm as f64 / theirs as f64
    );
    eprintln!(
        "{label}: engine VmHWM {hwm} KiB, ru_maxrss {ours_ru} KiB; bare {theirs} KiB; driver {driver} KiB"
    );
    run_self(&["--seed", url, &vms.to_string(), &list.to_string()]);
    print!("{}", run_self(&["--time", url, &list.to_string(), label]));
}

/// Times an engine backup of the database at `db_url` (SQLite in `data` when `None`) and the
/// PKI in `data`, against `bare_db` (which writes the database copy to `copy`) plus `tar`.
fn backup_bench(
    label: &str,
    data: &std::path::Path,
    db_url: Option<String>,
    mut bare_db: Command,
    copy: &std::path::Path,
) {
    use oxvirt_engine::backup;
    oxvirt_pki::CertAuthority::load_or_create(&data.join("pki"), "bench CA").unwrap();
    let state = backup::EngineState {
        data_dir: data.to_path_buf(),
        db_url,
    };
    let out = tempfile::tempdir().unwrap();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let rt = runtime();
    let mut size = 0;
    for i in 0..5 {
        let file = out.path().join(format!("b{i}"));
        let t = Instant::now();
        rt.block_on(backup::backup(&state, &file)).unwrap();
        ours.push(t.elapsed());
        size = std::fs::metadata(&file).unwrap().len();
        std::fs::remove_file(&file).unwrap();
        let _ = std::fs::remove_file(copy);
        let t = Instant::now();
        assert!(bare_db.status().unwrap().success(), "{bare_db:?}");
        let tar = out.path().join(format!("t{i}.tar"));
        let st = Command::new("tar")
            .arg("cf")
            .arg(&tar)
            .arg("-C")
            .arg(copy.parent().unwrap())
            .arg(copy.file_name().unwrap())
            .arg("-C")
            .arg(data)
            .arg("pki")
            .status()
            .unwrap();
        assert!(st.success());
        theirs.push(t.elapsed());
        std::fs::remove_file(&tar).unwrap();
    }
    let (o, b) = (median(ours), median(theirs));
    println!(
        "| {label} | engine backup, 10,000 VMs ({:.1} MiB) | {:.1} ms | `{}` + `tar` {:.1} ms | {:.2} |",
        size as f64 / (1 << 20) as f64,
        o.as_secs_f64() * 1e3,
        bare_db.get_program().to_string_lossy(),
        b.as_secs_f64() * 1e3,
        o.as_secs_f64() / b.as_secs_f64()
    );
}

fn main() {
    if let Some(url) = arg("--seed") {
        let args: Vec<String> = std::env::args().collect();
        let from: usize = args[3].parse().unwrap();
        let to: usize = args[4].parse().unwrap();
        return runtime().block_on(seed_cmd(&url, from, to));
    }
    if let Some(url) = arg("--rss") {
        return runtime().block_on(rss_cmd(&url));
    }
    if let Some(url) = arg("--time") {
        let args: Vec<String> = std::env::args().collect();
        return runtime().block_on(time_cmd(&args[4], &url, args[3].parse().unwrap()));
    }
    let vms: usize = arg("--vms").map_or(1000, |v| v.parse().expect("--vms N"));
    let list: usize = arg("--list").map_or(10_000, |v| v.parse().expect("--list N"));
    assert!(list >= vms, "--list must be at least --vms");
    println!("| backend | what | oxvirt | bare tool | ratio |");
    println!("|---|---|---|---|---|");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("engine.db");
    let url = format!("sqlite://{}?mode=rwc", file.display());
    let mut bare = Command::new("sqlite3");
    bare.arg(&file).arg("SELECT * FROM vms");
    bench("SQLite", &url, bare, vms, list);
    let copy = dir.path().join("copy/engine.db");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    let mut bare = Command::new("sqlite3");
    bare.arg(&file).arg(format!(".backup {}", copy.display()));
    backup_bench("SQLite", dir.path(), None, bare, &copy);

    if let Some(base) = arg("--pg") {
        let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let psql = |sql: &str| {
            let st = Command::new("psql")
                .args([base.as_str(), "-q", "-c", sql])
                .env("PGOPTIONS", "-c client_min_messages=warning")
                .status()
                .expect("psql");
            assert!(st.success(), "psql {sql}");
        };
        psql(&format!("CREATE SCHEMA {schema}"));
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options[search_path]={schema}");
        let mut bare = Command::new("psql");
        bare.arg(&base)
            .arg("-c")
            .arg(format!("SELECT * FROM {schema}.vms"));
        bench("PostgreSQL", &url, bare, vms, list);
        let pdir = tempfile::tempdir().unwrap();
        let copy = pdir.path().join("copy/engine.pgdump");
        std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
        let mut bare = Command::new("pg_dump");
        bare.arg("--format=custom")
            .arg(format!("--dbname={base}"))
            .arg(format!("--schema={schema}"))
            .arg("--file")
            .arg(&copy);
        backup_bench("PostgreSQL", pdir.path(), Some(url.clone()), bare, &copy);
        psql(&format!("DROP SCHEMA {schema} CASCADE"));
    }
}
