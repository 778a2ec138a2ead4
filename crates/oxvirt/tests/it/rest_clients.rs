//! oVirt's real clients against oxvirt: the Python SDK (`ovirtsdk4`) and an Ansible playbook
//! of `ovirt.ovirt` modules, unmodified, from the venv `scripts/py-clients.sh` builds. Each
//! test starts an in-process engine serving the REST API on its real HTTPS listener and two
//! `oxvirt node` processes that enroll with the CA fingerprint only — so the hosts join when
//! the client adds them — and runs its scenario (crates/oxvirt/tests/clients/) to the end:
//! data center, cluster, hosts, storage domain, attach, VM with a disk booting the test guest
//! under TCG, snapshot, migration, stop, template, VM from the template, removal.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, NodeProc};
use oxvirt_engine::daemon::{Engine, EngineConfig};
use oxvirt_testkit::{repo_root, TestGuest};

const PASSWORD: &str = "clients-test";

struct Live {
    engine: Arc<Engine>,
    nodes: Vec<(String, PathBuf, NodeProc)>,
    storage: PathBuf,
    _dirs: Vec<tempfile::TempDir>,
}

/// A failed scenario leaves its VMs' QEMUs (detached from their nodes by design) behind:
/// they go with the test.
impl Drop for Live {
    fn drop(&mut self) {
        for (_, data, _) in &self.nodes {
            common::kill_qemus(&data.join("run"));
        }
    }
}

impl Live {
    async fn start(n: usize) -> Live {
        let engine_dir = tempfile::tempdir().unwrap();
        let storage = tempfile::tempdir().unwrap();
        let cfg = EngineConfig {
            data_dir: engine_dir.path().to_path_buf(),
            db_url: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_password: Some(PASSWORD.into()),
            settings: common::fast_engine_settings(),
        };
        let engine = Engine::start(cfg, Some(oxvirt_engine::rest::routes()))
            .await
            .unwrap();
        let fp = engine.ca_fingerprint();
        let mut nodes = Vec::new();
        let mut dirs = vec![engine_dir];
        for i in 0..n {
            let d = tempfile::tempdir().unwrap();
            let name = format!("node{}", i + 1);
            let addr = free_port();
            let p = common::spawn_node(
                &name,
                d.path(),
                addr,
                &[
                    "--engine",
                    &engine.addr.to_string(),
                    "--ca-fingerprint",
                    &fp,
                    "--accel",
                    "tcg",
                ],
            );
            nodes.push((name, d.path().to_path_buf(), p));
            dirs.push(d);
        }
        let storage_path = storage.path().to_path_buf();
        dirs.push(storage);
        Live {
            engine,
            nodes,
            storage: storage_path,
            _dirs: dirs,
        }
    }

    fn env(&self, prefix: &str) -> Vec<(String, String)> {
        let guest = TestGuest::get();
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|(n, _, p)| format!("{n}={}", p.addr))
            .collect();
        let dirs: Vec<String> = self
            .nodes
            .iter()
            .map(|(n, d, _)| format!("{n}={}", d.display()))
            .collect();
        vec![
            (
                "OXVIRT_URL".into(),
                format!("https://{}/ovirt-engine/api", self.engine.addr),
            ),
            ("OXVIRT_PASSWORD".into(), PASSWORD.into()),
            ("OXVIRT_NODES".into(), nodes.join(",")),
            ("OXVIRT_NODE_DIRS".into(), dirs.join(",")),
            ("OXVIRT_STORAGE".into(), self.storage.display().to_string()),
            ("OXVIRT_KERNEL".into(), guest.kernel.display().to_string()),
            ("OXVIRT_INITRD".into(), guest.initrd.display().to_string()),
            ("OXVIRT_CMDLINE".into(), TestGuest::append(&["oxvirt.writer=4"])),
            ("OXVIRT_PREFIX".into(), prefix.into()),
        ]
    }
}

/// The venv with the SDK and Ansible (built once by scripts/py-clients.sh).
fn venv() -> PathBuf {
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/py-clients.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/py-clients.sh");
    assert!(
        out.status.success(),
        "scripts/py-clients.sh failed ({}): it needs gcc, python3-dev and libxml2-dev (scripts/deps.sh) and PyPI",
        out.status
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Runs a client program to its end; panics with its output when it fails.
async fn run_client(mut cmd: tokio::process::Command, env: &[(String, String)], limit: Duration) -> String {
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let start = Instant::now();
    let child = cmd.spawn().expect("start the client");
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(r) => r.unwrap(),
        Err(_) => panic!("the client did not finish within {limit:?}"),
    };
    let text = format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "client failed ({}) after {:?}:\n{text}",
        out.status,
        start.elapsed()
    );
    eprintln!(
        "client finished in {:.1} s:\n{text}",
        start.elapsed().as_secs_f64()
    );
    text
}

fn node_logs(live: &Live) -> String {
    live.nodes
        .iter()
        .map(|(n, d, _)| {
            format!(
                "--- {n} ---\n{}",
                std::fs::read_to_string(d.join("node.log")).unwrap_or_default()
            )
        })
        .collect()
}

async fn assert_clean(live: &Live, prefix: &str) {
    let db = &live.engine.app().db;
    let vms = db.vm_list(&Default::default()).await.unwrap();
    assert!(
        vms.iter().all(|v| !v.name.starts_with(prefix)),
        "VMs left: {:?}",
        vms.iter().map(|v| &v.name).collect::<Vec<_>>()
    );
    let disks = db.disk_list(&Default::default()).await.unwrap();
    assert!(disks.is_empty(), "disks left: {disks:?}");
    // Every job the clients caused ended; none failed unexpectedly and left things half-done.
    let jobs = db.job_list(&Default::default()).await.unwrap();
    assert!(
        jobs.iter()
            .all(|j| j.status != oxvirt_engine::model::JobStatus::Started),
        "jobs still running: {jobs:?}"
    );
}

/// Images on the domains under `storage`, other than their OVF stores (which stay with a
/// domain as long as it exists).
fn image_dirs(storage: &Path) -> usize {
    let ovf_store = |img: &Path| {
        std::fs::read_dir(img).into_iter().flatten().flatten().any(|f| {
            f.path().extension().is_some_and(|e| e == "meta")
                && std::fs::read_to_string(f.path()).is_ok_and(|m| m.lines().any(|l| l == "DISKTYPE=OVFS"))
        })
    };
    std::fs::read_dir(storage)
        .unwrap()
        .flatten()
        .filter_map(|sd| std::fs::read_dir(sd.path().join("images")).ok())
        .flat_map(|d| d.flatten())
        .filter(|img| !ovf_store(&img.path()))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_sdk_drives_a_vm_life() {
    let venv = venv();
    let live = Live::start(2).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/sdk_scenario.py");
    let mut cmd = tokio::process::Command::new(venv.join("bin/python"));
    cmd.arg(&script);
    let env = live.env("sdk");
    let out = tokio::spawn(async move { run_client(cmd, &env, Duration::from_secs(240)).await });
    let out = match out.await {
        Ok(o) => o,
        Err(e) => panic!("{e}\n{}", node_logs(&live)),
    };
    assert!(out.contains("] done"), "{out}");
    // The migration after the cluster's update went encrypted, the ones before it (the
    // storage moves did none) plain: what the engine told both nodes.
    let sagas = live.engine.app().db.saga_list(&[]).await.unwrap();
    let migrations: Vec<bool> = sagas
        .iter()
        .filter(|s| s.name == "migrate_vm")
        .map(|s| s.params["encrypted"] == true)
        .collect();
    assert!(
        migrations.contains(&true),
        "no encrypted migration: {migrations:?}"
    );
    assert_clean(&live, "sdk").await;
    assert_eq!(image_dirs(&live.storage), 0, "images left on storage");
    live.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ansible_playbook_drives_a_vm_life() {
    let venv = venv();
    let live = Live::start(2).await;
    let playbook = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/ansible_scenario.yml");
    let mut cmd = tokio::process::Command::new(venv.join("bin/ansible-playbook"));
    cmd.arg(&playbook)
        .env(
            "PATH",
            format!(
                "{}:{}",
                venv.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("ANSIBLE_PYTHON_INTERPRETER", venv.join("bin/python"))
        .env("ANSIBLE_LOCALHOST_WARNING", "false")
        .env("ANSIBLE_INVENTORY_UNPARSED_WARNING", "false")
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_HOME", live._dirs[0].path().join("ansible"));
    let env = live.env("ans");
    let out = tokio::spawn(async move { run_client(cmd, &env, Duration::from_secs(240)).await });
    let out = match out.await {
        Ok(o) => o,
        Err(e) => panic!("{e}\n{}", node_logs(&live)),
    };
    assert!(out.contains("failed=0"), "{out}");
    assert_clean(&live, "ans").await;
    live.engine.shutdown().await;
}
