//! The engine process dies and comes back, with real processes throughout: an engine sets up
//! storage, a template and a running VM on a real `oxvirt node`, then stops; the VM and the SPM
//! go on without it. The `oxvirt engine` binary then starts on the same data directory and
//! database (PostgreSQL here) and reconciles without restarting anything (same QEMU process);
//! it is `kill -9`ed (SIGKILL at an exact saga step, `OXVIRT_TEST_CRASH_AT`) in the middle of
//! creating a VM from the template — after the SPM created the clone's volume, before the
//! engine recorded it — and restarted: the half-done command is finished or undone, the
//! database and the storage agree, and the running VM was never touched.

use crate::common;

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, NodeProc};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use oxvirt_engine::allinone;
use oxvirt_engine::commands::{AddDisk, AddVm, AddVmDisk, VmStartOptions};
use oxvirt_engine::daemon::{Engine, EngineConfig};
use oxvirt_engine::model::{DiskFormat, DiskInterface, VmStatus, BLANK_TEMPLATE_ID};
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

const MIB: u64 = 1 << 20;
const PASSWORD: &str = "restart-test";

/// The `oxvirt engine` binary with the settings the in-process engine used.
fn spawn_engine(data: &Path, db_url: &str, listen: SocketAddr, crash_at: Option<&str>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("engine-stderr.log"))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_oxvirt"));
    cmd.args(["engine", "--data"])
        .arg(data)
        .args(["--db-url", db_url])
        .args(["--listen", &listen.to_string()])
        .args([
            "--io-timeout",
            "1",
            "--fence-margin",
            "2",
            "--monitor-interval",
            "0.5",
        ])
        .args(["--accel", "tcg"])
        .env("OXVIRT_ADMIN_PASSWORD", PASSWORD)
        .env("OXVIRT_LOG", "info")
        .env_remove("OXVIRT_TEST_CRASH_AT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(at) = crash_at {
        cmd.env("OXVIRT_TEST_CRASH_AT", at);
    }
    cmd.spawn().unwrap()
}

/// A small client of the engine's REST API trusting its CA; errors are returned, not
/// panicked on, since the engine may die under it.
struct Rest {
    addr: SocketAddr,
    tls: TlsConnector,
    token: Option<String>,
}

impl Rest {
    fn new(data: &Path, addr: SocketAddr) -> Rest {
        let ca = std::fs::read_to_string(data.join("pki/ca.pem")).unwrap();
        let cfg = oxvirt_pki::client_config(&ca, None).unwrap();
        Rest {
            addr,
            tls: TlsConnector::from(Arc::new(cfg)),
            token: None,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        ctype: &str,
        body: &str,
    ) -> Result<(StatusCode, String), String> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let tls = self
            .tls
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut b = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", ctype)
            .header("accept", "application/xml")
            .header("version", "4");
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Logs in, retrying while the engine starts.
    async fn login(&mut self, engine: &mut Child) {
        let start = Instant::now();
        loop {
            let r = self
                .send(
                    Method::POST,
                    "/ovirt-engine/sso/oauth/token",
                    "application/x-www-form-urlencoded",
                    &format!("grant_type=password&scope=ovirt-app-api&username=admin%40internal&password={PASSWORD}"),
                )
                .await;
            if let Ok((StatusCode::OK, body)) = &r {
                let v: serde_json::Value = serde_json::from_str(body).unwrap();
                self.token = Some(v["access_token"].as_str().unwrap().to_string());
                return;
            }
            assert!(engine.try_wait().unwrap().is_none(), "the engine exited: {r:?}");
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the engine did not serve logins: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn get(&self, path: &str) -> String {
        let (st, body) = self
            .send(
                Method::GET,
                &format!("/ovirt-engine/api/{path}"),
                "application/xml",
                "",
            )
            .await
            .unwrap();
        assert_eq!(st, StatusCode::OK, "GET {path}: {body}");
        body
    }
}

/// The text of the first `<name>` element inside `body`.
fn xml_field(body: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let i = body.find(&open)? + open.len();
    let j = body[i..].find(&format!("</{name}>"))?;
    Some(body[i..i + j].to_string())
}

/// The QEMU process running `vm`, found by its command line.
fn qemu_pid(vm: oxvirt_types::VmId) -> Option<u32> {
    let id = vm.to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.contains("qemu-system") && cmd.contains(&id)).then_some(pid)
    })
}

fn image_dirs(storage: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sd in std::fs::read_dir(storage).unwrap().flatten() {
        if let Ok(imgs) = std::fs::read_dir(sd.path().join("images")) {
            out.extend(
                imgs.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
    }
    out.sort();
    out
}

fn count_passes(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("OXVIRT-GUEST pass")
        .count()
}

/// Waits until the guest has written `more` further passes (it is alive and writing).
async fn guest_progresses(log: &Path, more: usize, within: Duration) {
    let before = count_passes(log);
    let start = Instant::now();
    while count_passes(log) < before + more {
        assert!(start.elapsed() < within, "the guest stopped making progress");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_engine_is_killed_mid_command_and_restarted_while_its_vm_runs_on() {
    let data_dir = tempfile::tempdir().unwrap();
    let storage_dir = tempfile::tempdir().unwrap();
    let node_dir = tempfile::tempdir().unwrap();
    let data = data_dir.path().to_path_buf();
    let storage: PathBuf = storage_dir.path().to_path_buf();
    let listen = free_port();

    // 1. An engine (in process) sets up storage, a template and a running VM on a real node.
    // On PostgreSQL, as a production engine whose database outlives it (the other real-node
    // tests run on SQLite).
    let db_url = common::fresh_postgres_url().await;
    let cfg = EngineConfig {
        data_dir: data.clone(),
        db_url: Some(db_url.clone()),
        listen,
        admin_password: Some(PASSWORD.into()),
        settings: common::fast_engine_settings(),
    };
    let engine = Engine::start(cfg, None).await.unwrap();
    let (dc, cluster) = allinone::ensure_default(&engine).await.unwrap();
    let token = engine.enroll_token(Some(cluster), Duration::from_secs(300));
    let node_addr = free_port();
    let _node: NodeProc = common::spawn_node(
        "host1",
        node_dir.path(),
        node_addr,
        &[
            "--engine",
            &listen.to_string(),
            "--token",
            &token,
            "--accel",
            "tcg",
        ],
    );
    allinone::wait_hosts_up(&engine, 1, Duration::from_secs(60))
        .await
        .unwrap();
    let sd = allinone::ensure_local_storage(&engine, dc, &storage, "data", Duration::from_secs(120))
        .await
        .unwrap();
    let cmds = &engine.cmds;
    let os = common::cluster::guest_os(&["oxvirt.writer=8"]);
    let add_vm = |name: &str, template| AddVm {
        name: name.into(),
        description: String::new(),
        cluster,
        template,
        memory_bytes: Some(256 * MIB),
        cpu: None,
        os: os.clone(),
        ha: None,
        resume_behavior: None,
    };
    let base = cmds
        .add_vm(add_vm("base", BLANK_TEMPLATE_ID), None)
        .await
        .unwrap();
    cmds.add_disk(
        AddDisk {
            name: "base_disk".into(),
            description: String::new(),
            storage_domain: sd,
            provisioned_size: 32 * MIB,
            format: DiskFormat::Cow,
            sparse: true,
            shareable: false,
            content_type: oxvirt_engine::model::DiskContentType::Data,
            attach_to: Some(AddVmDisk {
                vm: base.id,
                interface: DiskInterface::Virtio,
                bootable: true,
                active: true,
            }),
            disk_profile: None,
        },
        None,
    )
    .await
    .unwrap();
    let tmpl = cmds.add_template(base.id, "tmpl", "", None).await.unwrap();
    let runner = cmds.add_vm(add_vm("runner", tmpl.id), None).await.unwrap();
    cmds.start_vm(runner.id, VmStartOptions::default(), None)
        .await
        .unwrap();
    cmds.wait_vm_status(runner.id, VmStatus::Up, Duration::from_secs(30))
        .await
        .unwrap();
    let console = node_dir
        .path()
        .join("run/vms")
        .join(runner.id.to_string())
        .join("serial.log");
    guest_progresses(&console, 1, Duration::from_secs(90)).await;
    let pid = qemu_pid(runner.id).expect("the runner's QEMU process");

    // 2. The engine stops; the VM goes on writing without it.
    engine.shutdown().await;
    drop(engine);
    guest_progresses(&console, 1, Duration::from_secs(60)).await;
    assert_eq!(qemu_pid(runner.id), Some(pid));

    // 3. The binary starts on the same data and reconciles: the VM is up, same process.
    let images_before = image_dirs(&storage);
    let mut eng = spawn_engine(&data, &db_url, listen, Some("add_vm:clone:after"));
    let mut rest = Rest::new(&data, listen);
    rest.login(&mut eng).await;
    let runner_path = format!("vms/{}", runner.id);
    let start = Instant::now();
    loop {
        let body = rest.get(&runner_path).await;
        if xml_field(&body, "status").as_deref() == Some("up") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "runner never reported up: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        qemu_pid(runner.id),
        Some(pid),
        "reconciling must not restart the VM"
    );

    // 4. Creating a VM from the template kills the engine after the clone's volume was made.
    let req = format!(
        "<vm><name>crashy</name><cluster><name>Default</name></cluster>\
         <template><name>tmpl</name></template><memory>{}</memory></vm>",
        256 * MIB
    );
    let r = rest
        .send(Method::POST, "/ovirt-engine/api/vms", "application/xml", &req)
        .await;
    let st = tokio::task::spawn_blocking(move || {
        let st = eng.wait().unwrap();
        (st, eng)
    })
    .await
    .unwrap();
    assert_eq!(
        st.0.signal(),
        Some(libc::SIGKILL),
        "the engine died by SIGKILL at the crash point (reply: {r:?})"
    );
    let created: Vec<String> = image_dirs(&storage)
        .into_iter()
        .filter(|i| !images_before.contains(i))
        .collect();
    assert_eq!(
        created.len(),
        1,
        "the clone's image was created before the crash: {created:?}"
    );
    guest_progresses(&console, 1, Duration::from_secs(60)).await;

    // 5. Restarted without the crash point: the command is finished or undone, and storage and
    // database agree; the running VM was not touched.
    let mut eng = spawn_engine(&data, &db_url, listen, None);
    rest.login(&mut eng).await;
    let start = Instant::now();
    let outcome = loop {
        let jobs = rest.get("jobs").await;
        let vms = rest.get("vms?search=name%3Dcrashy").await;
        let running_jobs = jobs.matches("<status>started</status>").count();
        if running_jobs == 0 {
            break vms;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the interrupted command never ended: {jobs}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let images_after = image_dirs(&storage);
    if outcome.contains("<vm ") {
        // Finished: the VM has its clone, on storage and in the database.
        let vm_id = outcome
            .split("<vm href=")
            .nth(1)
            .and_then(|s| s.split("id=\"").nth(1))
            .map(|s| s[..36].to_string())
            .unwrap();
        let atts = rest.get(&format!("vms/{vm_id}/diskattachments")).await;
        let disk_id = atts
            .split("<disk href=")
            .nth(1)
            .and_then(|s| s.split("id=\"").nth(1))
            .map(|s| s[..36].to_string())
            .expect(&atts);
        assert_eq!(
            vec![disk_id.clone()],
            created,
            "the VM's disk is the image made before the crash"
        );
        let disk = rest.get(&format!("disks/{disk_id}")).await;
        assert_eq!(xml_field(&disk, "status").as_deref(), Some("ok"), "{disk}");
        assert!(images_after.contains(&disk_id));
    } else {
        // Undone: no VM, and the clone's image left storage.
        assert_eq!(images_after, images_before, "an undone clone leaves no image");
    }
    let body = rest.get(&runner_path).await;
    assert_eq!(xml_field(&body, "status").as_deref(), Some("up"), "{body}");
    assert_eq!(
        qemu_pid(runner.id),
        Some(pid),
        "the running VM was never restarted"
    );
    guest_progresses(&console, 1, Duration::from_secs(60)).await;

    // Clean up: stop the runner through the API and the engine with SIGTERM.
    let (st, body) = rest
        .send(
            Method::POST,
            &format!("/ovirt-engine/api/vms/{}/stop", runner.id),
            "application/xml",
            "<action/>",
        )
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK, "{body}");
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(eng.id() as i32, libc::SIGTERM);
    }
    let st = eng.wait().unwrap();
    assert!(st.success(), "engine exit: {st}");
}
