//! An in-process engine (real database, real HTTPS, real enrollment) with real `oxvirt node`
//! processes on loopback sharing one directory as storage, and the data domain on it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use oxvirt_engine::allinone;
use oxvirt_engine::commands::{AddDisk, AddStorageDomain, AddVmDisk};
use oxvirt_engine::daemon::{Engine, EngineConfig};
use oxvirt_engine::model::{
    DataCenter, DiskFormat, DiskInterface, SdType, SdUuid, StorageDomain, StorageType,
};
use oxvirt_types::VmId;

use super::{free_port, NodeProc};

pub struct Cluster {
    pub engine: Arc<Engine>,
    pub nodes: Vec<(String, PathBuf, NodeProc)>,
    _dirs: Vec<tempfile::TempDir>,
    pub storage: PathBuf,
}

/// QEMU outlives its node by design: a test that fails midway must not leave guests running.
impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, data, _) in &self.nodes {
            super::kill_qemus(&data.join("run"));
        }
    }
}

impl Cluster {
    /// The index of node `name` in `nodes`.
    pub fn node(&self, name: &str) -> usize {
        self.nodes.iter().position(|(n, _, _)| n == name).unwrap()
    }
    /// A VM's serial console log on `host`.
    pub fn console(&self, host: &str, vm: VmId) -> PathBuf {
        self.nodes[self.node(host)]
            .1
            .join("run/vms")
            .join(vm.to_string())
            .join("serial.log")
    }
    /// The pid of the VM's QEMU on `host`, when its node has recorded one.
    pub fn qemu_pid_now(&self, host: &str, vm: VmId) -> Option<u32> {
        let p = self.nodes[self.node(host)]
            .1
            .join("run/vms")
            .join(vm.to_string())
            .join("qemu.pid");
        std::fs::read_to_string(&p).ok()?.trim().parse().ok()
    }
    pub fn qemu_pid(&self, host: &str, vm: VmId) -> u32 {
        self.qemu_pid_now(host, vm)
            .expect("the node recorded its QEMU's pid")
    }
}

pub async fn start_cluster(n: usize) -> Cluster {
    start_cluster_with(n, super::fast_engine_settings()).await
}

pub async fn start_cluster_with(n: usize, settings: oxvirt_engine::app::EngineSettings) -> Cluster {
    start_cluster_via(n, settings, &[]).await
}

/// Nodes started through `wrapper` (see `super::spawn_node_via`).
pub async fn start_cluster_via(
    n: usize,
    settings: oxvirt_engine::app::EngineSettings,
    wrapper: &[&str],
) -> Cluster {
    start_cluster_at(n, settings, wrapper, "127.0.0.1:0".parse().unwrap()).await
}

/// The engine listening on `listen` (a test that restarts it needs a known address).
pub async fn start_cluster_at(
    n: usize,
    settings: oxvirt_engine::app::EngineSettings,
    wrapper: &[&str],
    listen: std::net::SocketAddr,
) -> Cluster {
    start_cluster_on(n, settings, wrapper, listen, None).await
}

/// The engine on a fresh schema of the PostgreSQL test server (`OXVIRT_TEST_PG_URL`).
pub async fn start_cluster_on_postgres(n: usize) -> Cluster {
    let url = super::fresh_postgres_url().await;
    start_cluster_on(
        n,
        super::fast_engine_settings(),
        &[],
        "127.0.0.1:0".parse().unwrap(),
        Some(url),
    )
    .await
}

/// The engine on `db_url` (`None`: SQLite in its data directory).
pub async fn start_cluster_on(
    n: usize,
    settings: oxvirt_engine::app::EngineSettings,
    wrapper: &[&str],
    listen: std::net::SocketAddr,
    db_url: Option<String>,
) -> Cluster {
    let engine_dir = tempfile::tempdir().unwrap();
    let storage = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        data_dir: engine_dir.path().to_path_buf(),
        db_url,
        listen,
        admin_password: Some("secret".into()),
        settings,
    };
    let engine = Engine::start(cfg, None).await.unwrap();
    let (_, cluster) = allinone::ensure_default(&engine).await.unwrap();
    let mut nodes = Vec::new();
    let mut dirs = vec![engine_dir];
    for i in 0..n {
        let d = tempfile::tempdir().unwrap();
        let name = format!("host{}", i + 1);
        let token = engine.enroll_token(Some(cluster), Duration::from_secs(300));
        let addr = free_port();
        let p = super::spawn_node_via(
            wrapper,
            &name,
            d.path(),
            addr,
            &[
                "--engine",
                &engine.addr.to_string(),
                "--token",
                &token,
                "--accel",
                "tcg",
            ],
        );
        nodes.push((name, d.path().to_path_buf(), p));
        dirs.push(d);
    }
    allinone::wait_hosts_up(&engine, n, Duration::from_secs(60))
        .await
        .unwrap();
    let storage_path = storage.path().to_path_buf();
    dirs.push(storage);
    Cluster {
        engine,
        nodes,
        _dirs: dirs,
        storage: storage_path,
    }
}

/// The "data" localfs domain at `path`, added through `host`.
pub fn data_domain(path: &str, host: oxvirt_engine::model::HostUuid) -> AddStorageDomain {
    AddStorageDomain {
        name: "data".into(),
        description: String::new(),
        domain_type: SdType::Data,
        storage_type: StorageType::Localfs,
        address: None,
        path: path.into(),
        vfs_type: None,
        mount_options: None,
        host,
    }
}

/// The "data" domain on the cluster's storage, added through `host`, attached to the Default
/// data center and active; returns both.
pub async fn attach_data_domain(c: &Cluster, host: &str) -> (DataCenter, StorageDomain) {
    let (cmds, db) = (&c.engine.cmds, &c.engine.app().db);
    let dc = db.dc_get_by_name("Default").await.unwrap().unwrap();
    let host = db.host_get_by_name(host).await.unwrap().unwrap();
    let sd = cmds
        .add_storage_domain(data_domain(&c.storage.display().to_string(), host.id), None)
        .await
        .unwrap();
    cmds.attach_storage_domain(dc.id, sd.id, None).await.unwrap();
    cmds.wait_domain_active(dc.id, sd.id, Duration::from_secs(90))
        .await
        .unwrap();
    (dc, sd)
}

/// The test guest as a VM's OS: its kernel and initramfs, booted with `args` (`oxvirt.*` words).
pub fn guest_os(args: &[&str]) -> oxvirt_engine::model::VmOs {
    let g = oxvirt_testkit::TestGuest::get();
    oxvirt_engine::model::VmOs {
        kernel: Some(g.kernel.display().to_string()),
        initrd: Some(g.initrd.display().to_string()),
        cmdline: Some(oxvirt_testkit::TestGuest::append(args)),
        ..Default::default()
    }
}

/// A 128 MiB VM from Blank in the Default cluster, booting the test guest with `args`; not
/// highly available, the default resume behaviour.
pub async fn guest_vm(engine: &Engine, name: &str, args: &[&str]) -> oxvirt_engine::commands::AddVm {
    let cluster = engine
        .app()
        .db
        .cluster_get_by_name("Default")
        .await
        .unwrap()
        .expect("the Default cluster");
    oxvirt_engine::commands::AddVm {
        name: name.into(),
        description: String::new(),
        cluster: cluster.id,
        template: oxvirt_engine::model::BLANK_TEMPLATE_ID,
        memory_bytes: Some(128 << 20),
        cpu: None,
        os: guest_os(args),
        ha: None,
        resume_behavior: None,
    }
}

/// A new thin disk (qcow2, sparse) of `size` bytes on `sd`; with `attach`, attached active
/// to that VM, bootable or not.
pub fn cow_disk(name: &str, sd: SdUuid, size: u64, attach: Option<(VmId, bool)>) -> AddDisk {
    AddDisk {
        name: name.into(),
        description: String::new(),
        storage_domain: sd,
        provisioned_size: size,
        format: DiskFormat::Cow,
        sparse: true,
        shareable: false,
        content_type: oxvirt_engine::model::DiskContentType::Data,
        attach_to: attach.map(|(vm, bootable)| AddVmDisk {
            vm,
            interface: DiskInterface::Virtio,
            bootable,
            active: true,
        }),
        disk_profile: None,
    }
}
