//! Image transfers end to end, with real processes: an in-process engine serving the REST API,
//! one `oxvirt node` process, a local storage domain. The `oxvirt disk upload` and `download`
//! commands move a qcow2 image into a new disk and back out (only its data travels), timed
//! against `qemu-img convert` of the same image on the same machine (BENCHMARKS.md). Then the
//! engine stops in the middle of a transfer and a new engine on the same database picks the
//! transfer's saga up: the client's writes still land, finalize still finishes it. A node killed
//! mid-upload takes its `qemu-nbd` with it and the transfer fails, its disk removed. Bad input
//! (a missing file, a transfer of a disk that is gone, a finalize before anything was served)
//! is refused and changes nothing.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::free_port;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use oxvirt_engine::commands::AddImageTransfer;
use oxvirt_engine::daemon::{Engine, EngineConfig};
use oxvirt_engine::model::{DiskStatus, TransferDirection, TransferPhase};
use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio_rustls::TlsConnector;

pub(crate) const PASSWORD: &str = "transfer-test password";
/// Data in the uploaded image (the benchmark's size).
const DATA_MIB: u64 = 128;

pub(crate) fn engine_cfg(dir: &Path) -> EngineConfig {
    EngineConfig {
        data_dir: dir.to_path_buf(),
        db_url: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_password: Some(PASSWORD.into()),
        settings: common::fast_engine_settings(),
    }
}

/// `oxvirt ARGS` with the test's session; panics with the output unless `ok` says otherwise.
pub(crate) async fn oxvirt(work: &Path, args: &[&str], ok: bool) -> (String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_oxvirt"))
        .args(args)
        .env("OXVIRT_CLI_CONFIG", work.join("cli.json"))
        .env("HOME", work)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("OXVIRT_URL")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), out)
        .await
        .unwrap_or_else(|_| panic!("oxvirt {args:?} did not finish within 240 s"))
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(
        out.status.success(),
        ok,
        "oxvirt {args:?}: exit {:?}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
        out.status.code()
    );
    (stdout, stderr)
}

/// `oxvirt login` as admin into `engine` (its data in `engine_dir`, its CA trusted by file),
/// then data center `dc1` with cluster `cl1`.
pub(crate) async fn login_with_dc1_and_cl1(work: &Path, engine_dir: &Path, engine: &Engine) {
    login(work, engine_dir, engine).await;
    oxvirt(work, &["dc", "create", "dc1"], true).await;
    oxvirt(work, &["cluster", "create", "cl1", "--dc", "dc1"], true).await;
}

/// `oxvirt login` as admin@internal with [`PASSWORD`], trusting the CA in `engine_dir`.
pub(crate) async fn login(work: &Path, engine_dir: &Path, engine: &Engine) {
    let pw = work.join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let ca = engine_dir.join("pki/ca.pem");
    let url = format!("https://{}", engine.addr);
    oxvirt(
        work,
        &[
            "login",
            "--url",
            &url,
            "--user",
            "admin@internal",
            "--password-file",
            pw.to_str().unwrap(),
            "--ca-file",
            ca.to_str().unwrap(),
        ],
        true,
    )
    .await;
}

fn qemu(tool: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} (qemu-utils) cannot run: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One HTTPS request to a host's transfer listener, trusting the engine's CA.
async fn host_request(
    url: &str,
    ca: &str,
    method: Method,
    headers: &[(&str, String)],
    body: Bytes,
) -> (StatusCode, Bytes) {
    let (status, _, body) = https_request(url, ca, method, headers, body).await;
    (status, body)
}

/// One HTTPS request (a host's listener, the engine's portal), trusting the CA in file `ca`:
/// the status, the headers and the body.
pub(crate) async fn https_request(
    url: &str,
    ca: &str,
    method: Method,
    headers: &[(&str, String)],
    body: Bytes,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let rest = url.strip_prefix("https://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let (host, _) = authority.rsplit_once(':').unwrap();
    let tcp = tokio::net::TcpStream::connect(authority).await.unwrap();
    let cfg = oxvirt_pki::client_config(ca, None).unwrap();
    let tls = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(host.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_LENGTH, body.len());
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    let resp = send.send_request(b.body(Full::new(body)).unwrap()).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (
        status,
        headers,
        resp.into_body().collect().await.unwrap().to_bytes(),
    )
}

async fn until_phase(engine: &Engine, id: oxvirt_types::TransferId, want: TransferPhase) {
    let start = Instant::now();
    loop {
        let t = engine.cmds.app.db.transfer_get(id).await.unwrap().unwrap();
        if t.phase == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "transfer {id} is {} ({:?}), not {want}",
            t.phase,
            t.message
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_download_and_an_engine_restart_mid_transfer() {
    let engine_dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let storage = tempfile::tempdir().unwrap();
    let node_dir = tempfile::tempdir().unwrap();
    let w = work.path();
    let engine = Engine::start(engine_cfg(engine_dir.path()), Some(oxvirt_engine::rest::routes()))
        .await
        .unwrap();
    let node_addr = free_port();
    let mut node = common::spawn_node(
        "node1",
        node_dir.path(),
        node_addr,
        &[
            "--engine",
            &engine.addr.to_string(),
            "--ca-fingerprint",
            &engine.ca_fingerprint(),
        ],
    );
    let ca_file = engine_dir.path().join("pki/ca.pem");
    login_with_dc1_and_cl1(w, engine_dir.path(), &engine).await;
    let addr = node_addr.to_string();
    oxvirt(
        w,
        &["host", "create", "node1", "--address", &addr, "--cluster", "cl1"],
        true,
    )
    .await;
    let sp = storage.path().to_str().unwrap();
    oxvirt(
        w,
        &[
            "sd", "create", "data1", "--host", "node1", "--path", sp, "--dc", "dc1",
        ],
        true,
    )
    .await;

    // A qcow2 image: DATA_MIB of data in two runs with a hole between, 512 MiB virtual.
    let src = w.join("src.qcow2");
    let s = src.to_str().unwrap();
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", s, "512M"]);
    let half = DATA_MIB / 2;
    qemu(
        "qemu-io",
        &["-f", "qcow2", "-c", &format!("write -P 0x3c 0 {half}M"), s],
    );
    qemu(
        "qemu-io",
        &["-f", "qcow2", "-c", &format!("write -P 0xc3 300M {half}M"), s],
    );

    // The bare tool in the same run: qemu-img copying the image to another local qcow2.
    let bare_dst = w.join("bare.qcow2");
    let t0 = Instant::now();
    qemu(
        "qemu-img",
        &[
            "convert",
            "-t",
            "none",
            "-O",
            "qcow2",
            s,
            bare_dst.to_str().unwrap(),
        ],
    );
    let bare = t0.elapsed();

    let t0 = Instant::now();
    let (out, err) = oxvirt(
        w,
        &[
            "disk", "upload", s, "--sd", "data1", "--name", "up1", "-o", "json",
        ],
        true,
    )
    .await;
    let up = t0.elapsed();
    let line = err
        .lines()
        .find(|l| l.contains("MiB of data"))
        .unwrap_or_else(|| panic!("no summary: {err}"));
    println!("upload: {line}");
    let disk: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    assert_eq!(disk["status"], "ok", "{disk}");
    assert_eq!(
        disk["provisioned_size"].as_str().unwrap_or_default(),
        (512u64 << 20).to_string()
    );
    let disk_id = disk["id"].as_str().unwrap().to_string();

    let dst = w.join("down.raw");
    let t0 = Instant::now();
    let (out, _) = oxvirt(
        w,
        &[
            "disk",
            "download",
            "up1",
            dst.to_str().unwrap(),
            "--format",
            "raw",
        ],
        true,
    )
    .await;
    let down = t0.elapsed();
    println!("download: {}", out.trim());
    assert!(out.contains(&format!("{DATA_MIB} MiB of data")), "{out}");
    qemu(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s, dst.to_str().unwrap()],
    );
    println!(
        "BENCH transfer of {DATA_MIB} MiB of data (512 MiB image): upload {:.2} s, download {:.2} s; \
         qemu-img convert {:.2} s; ratios {:.1} / {:.1}",
        up.as_secs_f64(),
        down.as_secs_f64(),
        bare.as_secs_f64(),
        up.as_secs_f64() / bare.as_secs_f64(),
        down.as_secs_f64() / bare.as_secs_f64()
    );

    // Refusals that change nothing: a missing file makes no disk; a file that is there stays.
    oxvirt(
        w,
        &["disk", "upload", "/nonexistent.qcow2", "--sd", "data1"],
        false,
    )
    .await;
    let (_, err) = oxvirt(w, &["disk", "download", "up1", dst.to_str().unwrap()], false).await;
    assert!(err.contains("exists"), "{err}");
    let (out, _) = oxvirt(w, &["disk", "list", "-o", "json"], true).await;
    let disks: Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = disks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, [disk_id.as_str()], "only the uploaded disk: {out}");

    // The node dies mid-upload (its tickets and qemu-nbd with it) and comes back: the transfer
    // fails, and the upload's disk goes, as a cancelled one does.
    let d3 = new_disk(w, "d3").await;
    let t3 = start_transfer(&engine, d3, TransferDirection::Upload)
        .await
        .unwrap();
    until_phase(&engine, t3.id, TransferPhase::Transferring).await;
    assert_eq!(
        qemu_nbds_of(&t3.id.to_string(), 1),
        1,
        "the transfer's qemu-nbd runs"
    );
    drop(node); // SIGKILL
    assert_eq!(
        qemu_nbds_of(&t3.id.to_string(), 0),
        0,
        "qemu-nbd outlived its node"
    );
    node = common::spawn_node("node1", node_dir.path(), node_addr, &[]);
    until_phase(&engine, t3.id, TransferPhase::FinishedFailure).await;
    let t3 = engine.cmds.app.db.transfer_get(t3.id).await.unwrap().unwrap();
    assert!(
        t3.message.as_deref().unwrap_or("").contains("ticket"),
        "{:?}",
        t3.message
    );
    assert!(
        engine.cmds.app.db.disk_get(d3).await.unwrap().is_none(),
        "the failed upload's disk stays"
    );
    let start = Instant::now();
    while engine
        .cmds
        .app
        .db
        .host_get_by_name("node1")
        .await
        .unwrap()
        .unwrap()
        .status
        != oxvirt_engine::model::HostStatus::Up
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "node1 is not up again: {}",
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A transfer started, then the engine stops: the new engine's saga goes on serving it.
    let d2 = new_disk(w, "d2").await;
    let t = start_transfer(&engine, d2, TransferDirection::Upload)
        .await
        .unwrap();
    until_phase(&engine, t.id, TransferPhase::Transferring).await;
    // The host serving it does not go to maintenance meanwhile.
    let e = engine.cmds.host_maintenance(t.host_id).await.unwrap_err();
    assert!(e.to_string().contains("finalize or cancel it first"), "{e}");
    // A transfer of a disk that is not there is refused.
    let missing = oxvirt_types::ImgUuid::new_random();
    let e = start_transfer(&engine, missing, TransferDirection::Download)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    engine.shutdown().await;
    drop(engine);

    let engine = Engine::start(engine_cfg(engine_dir.path()), Some(oxvirt_engine::rest::routes()))
        .await
        .unwrap();
    let tr = engine.cmds.app.db.transfer_get(t.id).await.unwrap().unwrap();
    assert_eq!(tr.phase, TransferPhase::Transferring);
    let url = tr.transfer_url.clone().unwrap();
    let ca = std::fs::read_to_string(&ca_file).unwrap();
    let data = Bytes::from(vec![0x7eu8; 1 << 20]);
    let (st, body) = host_request(
        &url,
        &ca,
        Method::PUT,
        &[("content-range", format!("bytes {}-{}/*", 4 << 20, (5 << 20) - 1))],
        data,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    engine.cmds.finalize_image_transfer(t.id).await.unwrap();
    until_phase(&engine, t.id, TransferPhase::FinishedSuccess).await;
    let d = engine.cmds.app.db.disk_get(d2).await.unwrap().unwrap();
    assert_eq!(d.status, DiskStatus::Ok);
    let tr = engine.cmds.app.db.transfer_get(t.id).await.unwrap().unwrap();
    assert_eq!(tr.transferred, 1 << 20);
    // The ticket is gone from the host: the URL no longer serves.
    let (st, _) = host_request(&url, &ca, Method::OPTIONS, &[], Bytes::new()).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let e = engine.cmds.cancel_image_transfer(t.id).await.unwrap_err();
    assert!(e.to_string().contains("finished_success"), "{e}");
    // The written MiB is in the disk's volume.
    let vol = find_volume(storage.path(), &d2.to_string());
    let out = qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-r",
            "-c",
            "read -P 0x7e 4M 1M",
            vol.to_str().unwrap(),
        ],
    );
    assert!(!out.contains("verification failed"), "{out}");
    engine.shutdown().await;
}

/// How many `qemu-nbd` processes serve the NBD socket of transfer `id`, once that is `want`
/// or after 5 s (qemu-nbd dies with its parent through `PR_SET_PDEATHSIG`: give it a moment).
fn qemu_nbds_of(id: &str, want: usize) -> usize {
    let count = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .filter(|c| c.starts_with(b"qemu-nbd") || c.windows(9).any(|w| w == b"/qemu-nbd"))
            .filter(|c| c.windows(id.len()).any(|w| w == id.as_bytes()))
            .count()
    };
    let start = Instant::now();
    loop {
        let n = count();
        if n == want || start.elapsed() > Duration::from_secs(5) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A new 16 MiB disk on `data1`, made with the CLI.
async fn new_disk(work: &Path, name: &str) -> oxvirt_types::ImgUuid {
    let (out, _) = oxvirt(
        work,
        &[
            "disk", "create", name, "--size", "16M", "--sd", "data1", "-o", "json",
        ],
        true,
    )
    .await;
    let d: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    d["id"].as_str().unwrap().parse().unwrap()
}

/// A transfer of `disk` through any host, idle for up to 120 s.
async fn start_transfer(
    engine: &Engine,
    disk: oxvirt_types::ImgUuid,
    direction: TransferDirection,
) -> Result<oxvirt_engine::model::ImageTransfer, oxvirt_engine::commands::CommandError> {
    engine
        .cmds
        .add_image_transfer(
            AddImageTransfer {
                snapshot: None,
                disk,
                direction,
                host: None,
                format: None,
                inactivity_timeout: Some(120),
            },
            None,
        )
        .await
}

/// The only volume of image `img` on the local domain under `storage`.
fn find_volume(storage: &Path, img: &str) -> PathBuf {
    for sd in std::fs::read_dir(storage).unwrap() {
        let dir = sd.unwrap().path().join("images").join(img);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let vols: Vec<PathBuf> = entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_none())
                .collect();
            assert_eq!(vols.len(), 1, "{vols:?}");
            return vols[0].clone();
        }
    }
    panic!("no image {img} under {}", storage.display());
}
