//! `oxvirt up`: the all-in-one — the engine on SQLite, N node processes on loopback sharing one
//! storage directory, a `Default` data center and cluster and a local storage domain, all under
//! one data directory that a second run reuses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use oxvirt_engine::allinone;
use oxvirt_engine::daemon::{Engine, EngineConfig};
use oxvirt_qemu::{probe_kvm, QemuTool};

use crate::engine_cmd::{print_access, Tuning};

#[derive(clap::Args)]
pub struct UpArgs {
    /// Data directory: database, certificates, storage, node state. Reused by a second run.
    #[arg(long, default_value = "/var/lib/oxvirt")]
    data: PathBuf,
    /// Address the engine's API listens on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Number of node processes to start.
    #[arg(long, default_value_t = 1)]
    nodes: u16,
    /// First node's API port; node i listens on this + i.
    #[arg(long, default_value_t = 54321)]
    node_port: u16,
    #[command(flatten)]
    tuning: Tuning,
}

struct Nodes(Vec<(String, Child)>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            // SAFETY: kill(2) on our own child; SIGTERM lets the node stop gracefully.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        for (name, c) in &mut self.0 {
            match c.wait() {
                Ok(st) => tracing::info!(node = %name, status = %st, "node stopped"),
                Err(e) => tracing::warn!(node = %name, error = %e, "cannot wait for node"),
            }
        }
    }
}

fn spawn_node(
    data: &Path,
    name: &str,
    listen: SocketAddr,
    engine: SocketAddr,
    token: &str,
    accel: &str,
) -> anyhow::Result<Child> {
    let dir = data.join("nodes").join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))?;
    let exe = std::env::current_exe().context("locating the oxvirt binary")?;
    Command::new(exe)
        .args([
            "node",
            "--name",
            name,
            "--listen",
            &listen.to_string(),
            "--engine",
            &engine.to_string(),
            "--accel",
            accel,
        ])
        .arg("--data")
        .arg(&dir)
        .env("OXVIRT_ENROLL_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting node {name}"))
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=64).contains(&args.nodes), "--nodes must be 1..=64");
    std::fs::create_dir_all(&args.data).with_context(|| format!("creating {}", args.data.display()))?;
    host_check(false)?;
    let data = std::fs::canonicalize(&args.data)?;
    let mut settings = args.tuning.settings()?;
    settings.accel = settings.accel.or_else(|| Some("auto".into()));
    let cfg = EngineConfig {
        data_dir: data.join("engine"),
        db_url: None,
        listen: args.listen,
        admin_password: std::env::var("OXVIRT_ADMIN_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty()),
        settings,
    };
    let accel = args.tuning.accel.clone().unwrap_or_else(|| "auto".into());
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let engine = Engine::start(cfg, crate::routes())
            .await
            .context("starting the engine")?;
        let (dc, cluster) = allinone::ensure_default(&engine).await?;
        let mut nodes = Nodes(Vec::new());
        for i in 0..args.nodes {
            let name = format!("node{}", i + 1);
            let listen = SocketAddr::new(args.listen.ip(), args.node_port + i);
            let token = engine.enroll_token(Some(cluster), Duration::from_secs(600));
            nodes.0.push((
                name.clone(),
                spawn_node(&data, &name, listen, engine.addr, &token, &accel)?,
            ));
        }
        println!(
            "starting {} node(s); logs in {}/nodes/*/node.log",
            args.nodes,
            data.display()
        );
        allinone::wait_hosts_up(&engine, args.nodes as usize, Duration::from_secs(120)).await?;
        let timeout = args.tuning.settings()?.io_timeout * 30 + Duration::from_secs(120);
        let sd = allinone::ensure_local_storage(&engine, dc, &data.join("storage"), "data", timeout).await?;
        println!();
        print_access(&engine);
        println!(
            "data center:      {} (storage domain \"data\" {sd} in {}/storage)",
            allinone::DEFAULT,
            data.display()
        );
        println!("oxvirt is up; Ctrl-C stops the engine and the nodes (running VMs keep running).");
        crate::node_cmd::shutdown_signal().await;
        engine.shutdown().await;
        drop(nodes);
        println!("stopped");
        anyhow::Ok(())
    })
}

pub fn host_check(json: bool) -> anyhow::Result<()> {
    let tools: Vec<(QemuTool, Result<String, String>)> =
        [QemuTool::SystemX86_64, QemuTool::Img, QemuTool::Io, QemuTool::Nbd]
            .into_iter()
            .map(|t| (t, t.version().map(|v| v.to_string()).map_err(|e| e.to_string())))
            .collect();
    let kvm = probe_kvm();
    if json {
        let v = serde_json::json!({
            "tools": tools.iter().map(|(t, r)| (t.binary_name().to_string(), match r {
                Ok(v) => serde_json::json!({"version": v}),
                Err(e) => serde_json::json!({"error": e}),
            })).collect::<serde_json::Map<_, _>>(),
            "kvm": kvm,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (t, r) in &tools {
            match r {
                Ok(v) => println!("{:<20} {v}", t.binary_name()),
                Err(e) => println!("{:<20} MISSING: {e}", t.binary_name()),
            }
        }
        match &kvm {
            oxvirt_qemu::KvmProbe::Usable { api_version } => {
                println!("{:<20} usable (API {api_version})", "kvm")
            }
            oxvirt_qemu::KvmProbe::Unusable { reason } => {
                println!("{:<20} unusable: {reason} (TCG is used)", "kvm")
            }
        }
    }
    if let Some((t, Err(e))) = tools.iter().find(|(_, r)| r.is_err()) {
        anyhow::bail!("{} is required: {e}", t.binary_name());
    }
    Ok(())
}
